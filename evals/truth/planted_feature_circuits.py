"""A hand-planted model with SAEs whose feature circuit is known exactly.

The model is a 2-layer, 2-head attention-only transformer with no LayerNorm and unscaled attention scores; its
residual stream is split into one-hot subspaces: TOK (which token), POS (which position), OUT (evidence for the
answer) and JUNK. Two sae-lens ``StandardSAE``\\ s (ReLU, identity-like encoders) are spliced at
``resid_post.0`` and ``resid_post.1``:

* ``res0`` (layer 0; the layer's own weights are zero, so ``resid_post.0`` is the embedding): one feature per token
  (feature ``t`` reads TOK dimension ``t``); the position embedding is left to the error term.
* ``res1`` (layer 1): the same token features, plus feature ``V`` (OUT) and feature ``V + 1`` (JUNK).

Prompts are ``[BOS, X, f1, f2, END]``; clean X = A (token 1), corrupt X = B (token 2), fillers f1, f2 random (and
different between clean and corrupt, so their features change but matter not at all). The answer YES over NO.

Mechanism: head ``a1.0`` attends from every position to position 1 (its query is a constant bias, its key reads
POS; the pattern never depends on the tokens), reads TOK[A] and writes OUT; the unembedding reads OUT into the YES
logit. So the planted feature circuit is ``embed -> res0#A -> res1#OUT -> logits``, and the head that carries the
middle edge is ``a1.0``. The path is **linear** end to end (ReLUs stay in their linear region, the pattern is
fixed), so attribution and ablation effects agree exactly. Distractors: head ``a1.1`` attends to the same place,
reads TOK[B] and writes JUNK (``res1#JUNK`` fires on corrupt prompts; nothing reads it); the token features of B
and of the fillers change between clean and corrupt; ``res1``'s token features copy the residual but nothing after
layer 1 reads TOK.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from autoexplain.tools.data import TokenizedTask
    from autoexplain.tools.models import LoadedModel
    from autoexplain.tools.saes import LoadedSAE

V = 12  # 0 BOS, 1 A, 2 B, 3..8 fillers, 9 END, 10 YES, 11 NO
A, B, END, YES, NO = 1, 2, 9, 10, 11
FILLERS = tuple(range(3, 9))
N_CTX = 8
D_HEAD = 4
TOK = slice(0, V)
POS = slice(V, V + N_CTX)
OUT = V + N_CTX
JUNK = OUT + 1
D_MODEL = JUNK + 1
#: the logit of YES per unit of OUT
W_YES = 3.0
#: attention score to position 1 (the pattern puts e^-20 elsewhere)
SCORE = 20.0


@dataclass
class PlantedFeatureCircuit:
    lm: LoadedModel
    saes: list[LoadedSAE]
    task: TokenizedTask
    #: node keys of the planted circuit (see :mod:`autoexplain.tools.feature_circuits`), summed over positions
    nodes: frozenset[str]
    #: edges ``src->dst`` between those keys
    edges: frozenset[str]
    #: the head that carries ``res0#A -> res1#OUT``
    head: str = "a1.0"


def build(n_prompts: int = 16, seed: int = 0) -> PlantedFeatureCircuit:
    """The planted model, its two SAEs and a task of ``n_prompts`` clean/corrupt pairs."""
    lm = _model()
    saes = [planted_sae("planted-res0", 0, V), planted_sae("planted-res1", 1, V + 2)]
    task = _task(n_prompts, seed)
    res0, res1 = saes[0].sae_id, saes[1].sae_id
    nodes = frozenset({"embed", f"{res0}#{A}", f"{res1}#{V}", "logits"})
    edges = frozenset({f"embed->{res0}#{A}", f"{res0}#{A}->{res1}#{V}", f"{res1}#{V}->logits"})
    return PlantedFeatureCircuit(lm=lm, saes=saes, task=task, nodes=nodes, edges=edges)


def _model() -> LoadedModel:
    import warnings

    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformerConfig

    from autoexplain.tools.models import LoadedModel

    cfg = HookedTransformerConfig(n_layers=2, d_model=D_MODEL, n_heads=2, d_head=D_HEAD, attn_only=True,
                                  d_vocab=V, n_ctx=N_CTX, normalization_type=None, use_attn_scale=False,
                                  positional_embedding_type="standard", device="cpu", seed=0, act_fn="relu")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        model = HookedSAETransformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for t in range(V):
            model.W_E[t, TOK.start + t] = 1.0
        for p in range(N_CTX):
            model.W_pos[p, POS.start + p] = 1.0
        attn = model.blocks[1].attn
        for h, (reads, writes) in enumerate(((A, OUT), (B, JUNK))):
            attn.b_Q[h, 0] = 1.0  # a constant query ...
            attn.W_K[h, POS.start + 1, 0] = SCORE  # ... that matches position 1 only
            attn.W_V[h, TOK.start + reads, 0] = 1.0
            attn.W_O[h, 0, writes] = 1.0
        model.W_U[OUT, YES] = W_YES
    model.eval()
    return LoadedModel(spec="planted:feature-circuit", model_id="planted-feature-circuit", model=model,
                       tokenizer=None, device=torch.device("cpu"))


def planted_sae(sae_id: str, layer: int, d_sae: int) -> LoadedSAE:
    """A StandardSAE on ``resid_post.layer`` whose feature ``i < V`` reads TOK dimension i, then OUT and JUNK."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from autoexplain.tools.saes import LoadedSAE
    from autoexplain.tools.vocab import Site, SiteKind

    hook = f"blocks.{layer}.hook_resid_post"
    sae = StandardSAE(StandardSAEConfig(d_in=D_MODEL, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook)))
    dims = list(range(V)) + [OUT, JUNK]
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
        for i in range(d_sae):
            sae.W_enc[dims[i], i] = 1.0
            sae.W_dec[i, dims[i]] = 1.0
    sae.eval()
    return LoadedSAE(spec=f"planted:{sae_id}", sae_id=sae_id, sae=sae,
                     site=Site(kind=SiteKind.RESID_POST, layer=layer), hook_name=hook)


def _task(n_prompts: int, seed: int) -> TokenizedTask:
    from autoexplain.tools.data import TaskFile, TaskPrompt, TokenizedTask

    g = torch.Generator().manual_seed(seed)
    clean, corrupt = [], []
    for _ in range(n_prompts):
        f = [FILLERS[int(i)] for i in torch.randint(len(FILLERS), (4,), generator=g)]
        clean.append([0, A, f[0], f[1], END])
        corrupt.append([0, B, f[2], f[3], END])

    def spell(ids: list[int]) -> str:
        return " ".join(f"<{i}>" for i in ids)

    prompts = TaskFile(prompts=[TaskPrompt(clean=spell(c), corrupt=spell(k), answers=[spell([YES])],
                                           wrong_answers=[spell([NO])]) for c, k in zip(clean, corrupt, strict=True)])
    n = len(clean)
    return TokenizedTask(clean=torch.tensor(clean), corrupt=torch.tensor(corrupt),
                         answer_pos=torch.full((n,), 4, dtype=torch.long),
                         answers=torch.full((n, 1), YES, dtype=torch.long),
                         wrong=torch.full((n, 1), NO, dtype=torch.long),
                         seq_lens=torch.full((n,), 5, dtype=torch.long), prompts=prompts)
