"""Hand-planted circuits: HookedTransformers whose weights are set by construction, so the true circuit is known.

Both models are 2 layers x 4 heads with MLPs, no LayerNorm (so subspaces never mix: a component that writes into
dimensions nobody reads has exactly zero effect on the output), attention scores unscaled. The residual stream is
split into named one-hot subspaces (token identity, position, ...); every head and MLP reads and writes chosen
subspaces only. Each model has a task (clean/corrupt prompt pairs) and the set of edges through which the
clean/corrupt difference reaches the answer: the planted circuit. Every other edge carries exactly (or, where
noted, up to e^-12) zero effect under resample ablation, yet most of them are "active": distractor heads attend,
read changing tokens and write into a junk subspace; distractor MLPs fire on tokens.

1. ``induction``: a previous-token head ``a0.0`` (attends p-1, copies the token into PREV) feeds the induction
   head ``a1.1`` through K-composition (its key reads PREV, its query reads the current token), which copies the
   token that followed the earlier occurrence into the OUT subspace the unembedding reads; MLP ``m1`` boosts a
   strong OUT direction. Clean ``[BOS] s1..sk s1..sj`` -> ``s(j+1)``; corrupt replaces the first ``s1..sk`` by
   unrelated tokens (no earlier occurrence to match). Distractors: ``a0.1`` (a second previous-token head writing
   junk), ``a1.0`` (an induction-like head that K-composes with ``a0.0`` but writes junk), ``a0.2``, ``a0.3``,
   ``a1.2``, ``a1.3``, ``m0`` (fires on tokens) and junk neurons in ``m1``.
2. ``suppression`` (IOI-like): the name mover ``a1.0`` copies both names of ``[BOS] A B f f S f END`` to the output
   (attending to positions 1 and 2: identical on clean and corrupt, and large); the duplicate-token head ``a0.1``
   flags the repeated name S; the suppressor ``a1.2`` attends to the flagged position (K-composition) and writes
   minus that name. Clean S = B -> answer A over B; corrupt S = C (a third name) -> no duplicate, a tie. Zero
   ablation of the mover changes the output distribution a lot; resample ablation must not blame it.
   Distractors: ``a1.1`` (K-composes with ``a0.1`` but writes junk), ``a0.0``, ``a0.2``, ``a0.3``, ``a1.3``, MLPs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from sae_lens import HookedSAETransformer

    from autoexplain.tools.data import TaskFile, TokenizedTask
    from autoexplain.tools.models import LoadedModel

V = 24  # vocabulary: 0 = BOS
N_CTX = 16
D_HEAD = 48
N_JUNK = 8


@dataclass
class PlantedCircuit:
    name: str
    lm: LoadedModel
    task: TokenizedTask
    planted: frozenset[str]  # the true circuit's edges
    constant_head: str | None = None  # a head identical on clean and corrupt but large


class _Layout:
    """Named slices of the residual stream."""

    def __init__(self, *parts: tuple[str, int]) -> None:
        self.slices: dict[str, slice] = {}
        start = 0
        for name, size in parts:
            self.slices[name] = slice(start, start + size)
            start += size
        self.d_model = start

    def __getitem__(self, key: tuple[str, int]) -> int:
        name, i = key
        s = self.slices[name]
        assert 0 <= i < s.stop - s.start, key
        return s.start + i


def zeroed_model(cfg: Any) -> HookedSAETransformer:
    """A HookedSAETransformer of ``cfg`` (a ``HookedTransformerConfig``) with every weight zero: the blank a planted
    model's mechanism is written into."""
    import warnings

    from sae_lens import HookedSAETransformer

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        model = HookedSAETransformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def _model(d_model: int, n_mlp: int) -> HookedSAETransformer:
    from transformer_lens import HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=d_model, n_heads=4, d_head=D_HEAD, d_mlp=n_mlp, act_fn="relu",
                                  d_vocab=V, n_ctx=N_CTX, normalization_type=None, use_attn_scale=False,
                                  positional_embedding_type="standard", device="cpu", seed=0)
    model = zeroed_model(cfg)
    model.eval()
    return model


def _loaded(name: str, model: HookedSAETransformer) -> LoadedModel:
    from autoexplain.tools.models import LoadedModel

    return LoadedModel(spec=f"planted:{name}", model_id=f"planted-{name}", model=model, tokenizer=None,
                       device=torch.device("cpu"))


def _task(clean: list[list[int]], corrupt: list[list[int]], answers: list[int], wrong: list[int]) -> TokenizedTask:
    """Token-id prompts as a task. The planted models have no tokenizer: the task's ``prompts`` spell each
    prompt's token ids (``"<3> <7> …"``) so that it reads as a task file; nothing computes from them."""
    from autoexplain.tools.data import TaskFile, TaskPrompt, TokenizedTask

    def spell(ids: list[int]) -> str:
        return " ".join(f"<{i}>" for i in ids)

    prompts = TaskFile(prompts=[TaskPrompt(clean=spell(c), corrupt=spell(k), answers=[spell([a])],
                                           wrong_answers=[spell([w])])
                                for c, k, a, w in zip(clean, corrupt, answers, wrong, strict=True)])

    width = max(len(c) for c in clean)
    pad = lambda rows: torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long)  # noqa: E731
    lens = torch.tensor([len(c) for c in clean], dtype=torch.long)
    return TokenizedTask(clean=pad(clean), corrupt=pad(corrupt), answer_pos=lens - 1,
                         answers=torch.tensor(answers)[:, None], wrong=torch.tensor(wrong)[:, None], seq_lens=lens,
                         prompts=prompts)


# ============================================================================= 1. induction
def induction(n_prompts: int = 24, seed: int = 0) -> PlantedCircuit:
    """The induction model on prompts whose corrupt run has no earlier occurrence to match (attention changes)."""
    model = _induction_model()
    planted = frozenset({"embed->a0.0.v", "a0.0->a1.1.k", "embed->a1.1.v", "a1.1->logits", "a1.1->m1",
                         "m1->logits"})
    return PlantedCircuit("induction", _loaded("induction", model),
                          _repeated_task(n_prompts, seed, same_query=True), planted)


def _repeated_task(n_prompts: int, seed: int, *, same_query: bool) -> TokenizedTask:
    """Clean ``[BOS] s1..s6 s1..sj`` -> s(j+1); corrupt ``[BOS] r1..r6`` then ``s1..sj`` (``same_query``: nothing
    earlier to match) or ``r1..rj`` (another repeated sequence: the same attention pattern), wrong answer r(j+1)."""
    g = torch.Generator().manual_seed(seed)
    clean, corrupt, answers, wrong = [], [], [], []
    for _ in range(n_prompts):
        k = 6
        j = int(torch.randint(2, k, (1,), generator=g))
        toks = (torch.randperm(V - 1, generator=g) + 1).tolist()
        s, r = toks[:k], toks[k:2 * k]
        clean.append([0] + s + s[:j])
        corrupt.append([0] + r + (s[:j] if same_query else r[:j]))
        answers.append(s[j])
        wrong.append(r[j])
    return _task(clean, corrupt, answers, wrong)


def induction_and(n_prompts: int = 24, seed: int = 0, *, sharpness: float = 12.0) -> PlantedCircuit:
    """The same induction model, but clean and corrupt are two *different* repeated random sequences
    (``[BOS] s1..sk s1..sj`` vs ``[BOS] r1..rk r1..rj``): the induction head attends to the same positions on both,
    so its query (current token) and key (previous token via a0.0) inputs matter only *jointly*, an AND gate.
    Patching everything outside a circuit that keeps only the value path still reproduces the clean answer
    (sufficiency cannot see the gate); noising the query or the key alone in the full model breaks the match
    (necessity can). Planted edges: the previous-token head's value input and its K-composition into a1.1, a1.1's
    query and value inputs, and the output path. ``sharpness`` scales the induction head's attention logits: at 40
    its softmax is saturated along the whole EAP-IG interpolation path, so gradients through Q and K vanish and
    attribution alone misses both (and the previous-token head): the case the issue found."""
    model = _induction_model(c_ind=sharpness)
    planted = frozenset({"embed->a0.0.v", "a0.0->a1.1.k", "embed->a1.1.q", "embed->a1.1.v", "a1.1->logits",
                         "a1.1->m1", "m1->logits"})
    return PlantedCircuit("induction_and", _loaded("induction_and", model),
                          _repeated_task(n_prompts, seed, same_query=False), planted)


def _induction_model(*, c_ind: float = 12.0) -> HookedSAETransformer:
    lay = _Layout(("tok", V), ("pos", N_CTX), ("prev", V), ("out", V), ("junk", N_JUNK))
    model = _model(lay.d_model, n_mlp=V + N_JUNK)
    c_pos, c_sink, gain = 20.0, 9.0, 4.0
    with torch.no_grad():
        for t in range(V):
            model.W_E[t, lay["tok", t]] = 1.0
        for p in range(N_CTX):
            model.W_pos[p, lay["pos", p]] = 1.0
        b0, b1 = model.blocks[0].attn, model.blocks[1].attn
        # a0.0 previous-token head: query at p matches key at p-1; copies the token into PREV
        for h, out in ((0, "prev"), (1, "junk")):  # a0.1: the same attention, writes junk
            for p in range(N_CTX):
                b0.W_Q[h, lay["pos", p], p] = c_pos
                if p + 1 < N_CTX:
                    b0.W_K[h, lay["pos", p], p + 1] = 1.0
            for t in range(V):
                b0.W_V[h, lay["tok", t], t] = 1.0
                b0.W_O[h, t, lay[out, t] if out == "prev" else lay["junk", t % N_JUNK]] = 1.0
        # a0.2: uniform attention over tokens -> junk; a0.3: attends to the current token -> junk
        for t in range(V):
            b0.W_V[2, lay["tok", t], t] = 1.0
            b0.W_O[2, t, lay["junk", (t + 3) % N_JUNK]] = 0.5
        for p in range(N_CTX):
            b0.W_Q[3, lay["pos", p], p] = c_pos
            b0.W_K[3, lay["pos", p], p] = 1.0
        for t in range(V):
            b0.W_V[3, lay["tok", t], t] = 1.0
            b0.W_O[3, t, lay["junk", (t + 5) % N_JUNK]] = 2.0
        # a1.1 induction head (query: current token; key: PREV, K-composition with a0.0; sink at BOS)
        # a1.0 the same attention, but writes junk
        for h, writes_out in ((1, True), (0, False)):
            for t in range(1, V):
                b1.W_Q[h, lay["tok", t], t] = c_ind
                b1.W_K[h, lay["prev", t], t] = 1.0
                b1.W_V[h, lay["tok", t], t] = 1.0
                if writes_out:
                    b1.W_O[h, t, lay["out", t]] = gain
                else:
                    b1.W_O[h, t, lay["junk", t % N_JUNK]] = 1.0
            b1.b_Q[h, 0] = c_sink
            b1.W_K[h, lay["pos", 0], 0] = 1.0
        # a1.2 reads junk (from a0.1-3, m0) -> junk; a1.3 uniform over tokens -> junk
        for j in range(N_JUNK):
            b1.W_Q[2, lay["junk", j], j] = 1.0
            b1.W_K[2, lay["junk", j], j] = 1.0
            b1.W_V[2, lay["junk", j], j] = 1.0
            b1.W_O[2, j, lay["junk", (j + 1) % N_JUNK]] = 1.0
        for t in range(V):
            b1.W_V[3, lay["tok", t], t] = 1.0
            b1.W_O[3, t, lay["junk", (t + 2) % N_JUNK]] = 1.0
        # m0 fires on tokens -> junk; m1: boosts a strong OUT direction (planted) + junk neurons
        m0, m1 = model.blocks[0].mlp, model.blocks[1].mlp
        for t in range(1, V):
            m0.W_in[lay["tok", t], t] = 1.0
            m0.W_out[t, lay["junk", t % N_JUNK]] = 1.0
            m1.W_in[lay["out", t], t] = 1.0
            m1.b_in[t] = -2.0
            m1.W_out[t, lay["out", t]] = 1.0
        for j in range(N_JUNK):
            m1.W_in[lay["junk", j], V + j] = 1.0
            m1.W_out[V + j, lay["junk", (j + 3) % N_JUNK]] = 1.0
        for t in range(V):
            model.W_U[lay["out", t], t] = 1.0
    return model


# ============================================================================= 2. suppression
NAMES = tuple(range(1, 9))
FILLERS = tuple(range(9, 23))
END = 23


def suppression(n_prompts: int = 24, seed: int = 1) -> PlantedCircuit:
    lay = _Layout(("tok", V), ("pos", N_CTX), ("one", 1), ("dup", 1), ("out", V), ("junk", N_JUNK))
    model = _model(lay.d_model, n_mlp=V + N_JUNK)
    c_dup, c_dup_sink, c_sup, c_sup_sink, c_mov, gamma, mu = 14.0, 8.0, 12.0, 6.0, 14.0, 3.0, 6.0
    with torch.no_grad():
        for t in range(V):
            model.W_E[t, lay["tok", t]] = 1.0
            if t != 0:
                model.W_E[t, lay["one", 0]] = 1.0
        for p in range(N_CTX):
            model.W_pos[p, lay["pos", p]] = 1.0
        b0, b1 = model.blocks[0].attn, model.blocks[1].attn
        # a0.1 duplicate-token head: query = current token (minus itself), key = token; sink at BOS; writes DUP
        for t in range(1, V):
            b0.W_Q[1, lay["tok", t], t] = c_dup
        for t in range(V):
            b0.W_K[1, lay["tok", t], t] = 1.0
        for p in range(N_CTX):
            b0.W_Q[1, lay["pos", p], V + p] = -c_dup
            b0.W_K[1, lay["pos", p], V + p] = 1.0
        b0.b_Q[1, 0] = c_dup_sink
        b0.W_V[1, lay["one", 0], 0] = 1.0
        b0.W_O[1, 0, lay["dup", 0]] = 1.0
        # distractors in layer 0: a0.0 previous-token -> junk; a0.2 uniform tokens -> junk; a0.3 self -> junk
        for p in range(N_CTX):
            b0.W_Q[0, lay["pos", p], p] = 20.0
            if p + 1 < N_CTX:
                b0.W_K[0, lay["pos", p], p + 1] = 1.0
            b0.W_Q[3, lay["pos", p], p] = 20.0
            b0.W_K[3, lay["pos", p], p] = 1.0
        for t in range(V):
            for h, shift in ((0, 1), (2, 4), (3, 6)):
                b0.W_V[h, lay["tok", t], t] = 1.0
                b0.W_O[h, t, lay["junk", (t + shift) % N_JUNK]] = 1.0
        # a1.2 suppressor: constant query, key = DUP (K-composition with a0.1), sink at BOS; writes -name
        # a1.1 the same attention, writes junk
        for h, writes_out in ((2, True), (1, False)):
            b1.b_Q[h, 0] = c_sup
            b1.W_K[h, lay["dup", 0], 0] = 1.0
            b1.b_Q[h, 1] = c_sup_sink
            b1.W_K[h, lay["pos", 0], 1] = 1.0
            for t in NAMES:
                b1.W_V[h, lay["tok", t], t] = 1.0
                if writes_out:
                    b1.W_O[h, t, lay["out", t]] = -gamma
                else:
                    b1.W_O[h, t, lay["junk", t % N_JUNK]] = 1.0
        # a1.0 name mover: attends to the two name slots (positions 1 and 2), copies both names (large, constant)
        b1.b_Q[0, 0] = c_mov
        b1.W_K[0, lay["pos", 1], 0] = 1.0
        b1.W_K[0, lay["pos", 2], 0] = 1.0
        for t in NAMES:
            b1.W_V[0, lay["tok", t], t] = 1.0
            b1.W_O[0, t, lay["out", t]] = mu
        # a1.3 reads junk -> junk
        for j in range(N_JUNK):
            b1.W_Q[3, lay["junk", j], j] = 1.0
            b1.W_K[3, lay["junk", j], j] = 1.0
            b1.W_V[3, lay["junk", j], j] = 1.0
            b1.W_O[3, j, lay["junk", (j + 5) % N_JUNK]] = 1.0
        # MLPs: m0 fires on tokens -> junk; m1 junk -> junk
        m0, m1 = model.blocks[0].mlp, model.blocks[1].mlp
        for t in range(1, V):
            m0.W_in[lay["tok", t], t] = 1.0
            m0.W_out[t, lay["junk", (t + 2) % N_JUNK]] = 1.0
        for j in range(N_JUNK):
            m1.W_in[lay["junk", j], V + j] = 1.0
            m1.b_in[V + j] = -0.5
            m1.W_out[V + j, lay["junk", (j + 7) % N_JUNK]] = 1.0
        for t in range(V):
            model.W_U[lay["out", t], t] = 1.0
    g = torch.Generator().manual_seed(seed)
    clean, corrupt, answers, wrong = [], [], [], []
    for _ in range(n_prompts):
        a, b, c = (NAMES[i] for i in torch.randperm(len(NAMES), generator=g)[:3].tolist())
        f = [FILLERS[i] for i in torch.randperm(len(FILLERS), generator=g)[:3].tolist()]
        clean.append([0, a, b, f[0], f[1], b, f[2], END])
        corrupt.append([0, a, b, f[0], f[1], c, f[2], END])
        answers.append(a)
        wrong.append(b)
    planted = frozenset({"embed->a0.1.q", "a0.1->a1.2.k", "embed->a1.2.v", "a1.2->logits"})
    return PlantedCircuit("suppression", _loaded("suppression", model), _task(clean, corrupt, answers, wrong),
                          planted, constant_head="a1.0")


# ============================================================================= with text
def with_tokenizer(pc: PlantedCircuit) -> tuple[LoadedModel, TaskFile]:
    """The planted model with a word-level tokenizer over its id vocabulary (``"<7>"`` is token 7, ``"<0>"`` is
    BOS), and its task as a task file (prompts without their leading BOS, which tokenisation adds back): what the
    agent, the CLI tools and the scorers need, since they read prompts as text. Tokenising the task file gives
    back exactly ``pc.task``'s token ids."""
    import dataclasses

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    from autoexplain.tools.data import TaskFile, TaskPrompt

    words = {f"<{i}>": i for i in range(V)}
    core = Tokenizer(WordLevel(words, unk_token="<0>"))
    core.pre_tokenizer = WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<0>", eos_token="<0>", pad_token="<0>",
                                  unk_token="<0>")

    def strip_bos(text: str) -> str:
        return text[len("<0> "):] if text.startswith("<0> ") else text

    prompts = [TaskPrompt(clean=strip_bos(p.clean), corrupt=strip_bos(p.corrupt), answers=list(p.answers),
                          wrong_answers=list(p.wrong_answers)) for p in pc.task.prompts.prompts]
    return dataclasses.replace(pc.lm, tokenizer=tok), TaskFile(prompts=prompts, name=pc.name)
