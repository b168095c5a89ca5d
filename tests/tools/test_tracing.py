"""Causal tracing on a hand-planted fact-recall model whose answer is known, plus determinism, validation and the
tool through a registry."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from autoexplain.tools.errors import InputError
from autoexplain.tools.tracing import ROLES, TraceGrid, causal_trace, locate_subject, prompts_from_task_file

pytestmark = pytest.mark.usefixtures("one_thread")

# ----------------------------------------------------------------------------- the planted fact-recall model
# Vocabulary: 0 BOS, 1 "the", 2-4 adjectives, 5-10 subjects, 11 "lives", 12 "in", 13-18 attributes, 19 filler.
V, N_CTX, D_HEAD, J = 20, 8, 24, 16
THE, LIVES, IN = 1, 11, 12
ADJ = (2, 3, 4)
SUBJECTS = tuple(range(5, 11))
FACT = {s: 13 + (3 * i + 2) % 6 for i, s in enumerate(SUBJECTS)}  # a fixed permutation of the attributes
A, P = 20.0, 10.0  # the attribute's magnitude, the position embedding's
OFFSET = 3  # the mover attends three tokens back: the last subject token in every prompt below


def _planted() -> Any:
    """2 layers, no LayerNorm. The layer-0 MLP looks the subject's attribute up at the subject token (one ReLU per
    subject, reading its token, writing A x its attribute into ATTR); head a1.0 at the final position attends
    three tokens back (by position: robust to the noise) and copies ATTR into OUT, which the unembedding reads.
    Token embeddings also carry a random +-2 junk part nobody reads, so their std (the noise unit) is realistic
    (about 0.9) and noise of 3 std drowns the one-hot token identity the MLP reads. Everything else is zero."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from autoexplain.tools.models import LoadedModel

    tok, junk, pos, attr, out = 0, V, V + J, V + J + N_CTX, 2 * V + J + N_CTX
    d_model = 3 * V + J + N_CTX
    cfg = HookedTransformerConfig(n_layers=2, d_model=d_model, n_heads=2, d_head=D_HEAD, d_mlp=8, act_fn="relu",
                                  d_vocab=V, n_ctx=N_CTX, normalization_type=None, use_attn_scale=False,
                                  positional_embedding_type="standard", device="cpu", seed=0)
    model = HookedTransformer(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for t in range(V):
            model.W_E[t, tok + t] = 1.0
        model.W_E[:, junk : junk + J] = (torch.randint(0, 2, (V, J), generator=g) * 4 - 2).float()
        for p in range(N_CTX):
            model.W_pos[p, pos + p] = P
        m0 = model.blocks[0].mlp
        for i, s in enumerate(SUBJECTS):
            m0.W_in[tok + s, i] = 1.0
            m0.W_out[i, attr + FACT[s]] = A
        a1 = model.blocks[1].attn
        for p in range(N_CTX):
            a1.W_Q[0, pos + p, p] = 1.0
            if p + OFFSET < N_CTX:
                a1.W_K[0, pos + p, p + OFFSET] = 1.0
        for a in range(V):
            a1.W_V[0, attr + a, a] = 1.0
            a1.W_O[0, a, out + a] = 1.0
            model.W_U[out + a, a] = 1.0
    model.eval()
    return LoadedModel(spec="planted:facts", model_id="planted-facts", model=model, tokenizer=None,
                       device=torch.device("cpu"))


@pytest.fixture(scope="module")
def facts() -> Any:
    return _planted()


def _prompts(n: int = 6, *, adjective: bool = True) -> tuple[list[list[int]], list[tuple[int, int]], list[int]]:
    """[BOS the adj subj lives in the] (subject span = adj subj) or, without adjective, [BOS the subj lives in the]."""
    prompts, spans, answers = [], [], []
    for i in range(n):
        s = SUBJECTS[i % len(SUBJECTS)]
        if adjective:
            prompts.append([0, THE, ADJ[i % 3], s, LIVES, IN, THE])
            spans.append((2, 4))
        else:
            prompts.append([0, THE, s, LIVES, IN, THE])
            spans.append((2, 3))
        answers.append(FACT[s])
    return prompts, spans, answers


def test_the_planted_model_knows_its_facts(facts: Any) -> None:
    prompts, _, answers = _prompts()
    with torch.no_grad():
        logits = facts.model(torch.tensor(prompts))[:, -1]
    assert logits.argmax(-1).tolist() == answers


def test_mlp_peaks_at_layer0_last_subject_token_and_resid_moves_from_subject_to_final(facts: Any) -> None:
    prompts, spans, answers = _prompts()
    res = causal_trace(facts, prompts, subject=spans, answers=answers, n_samples=16, seed=1)
    assert res.alignment == "position" and res.n_used == 6 and len(res.columns) == 7
    assert res.p_clean > 0.99 and res.p_corrupted < 0.5, (res.p_clean, res.p_corrupted)
    drop = res.p_clean - res.p_corrupted
    mlp, resid, attn = (res.grids[k] for k in ("mlp", "resid", "attn"))
    # the MLP grid peaks where the lookup happens: layer 0, the last subject token (position 3)
    assert mlp.peak is not None and (mlp.peak.layer, mlp.peak.column) == (0, 3)
    assert mlp.normalized is not None and mlp.normalized[0][3] > 0.8
    # the residual carries the effect at the subject early and at the final position late
    assert resid.normalized is not None
    assert resid.normalized[0][3] > 0.9 and resid.normalized[1][6] > 0.99
    assert abs(resid.effect[0][6]) < 1e-6 and abs(resid.effect[1][3]) < 1e-6  # too early / nobody reads it
    assert attn.normalized is not None and attn.normalized[1][6] > 0.99  # the mover's output
    # non-subject, non-final positions: nothing comes back (they are never noised, and nothing reads them later)
    for grid in (mlp, resid, attn):
        for layer in range(2):
            for col in (0, 1, 4, 5):
                value = grid.effect[layer][col]
                assert value is not None and abs(value) < 1e-3 * drop, (grid.state, layer, col)
    # the first subject token (an adjective, no fact attached) restores little
    assert resid.normalized[0][2] < 0.2 and mlp.normalized[0][2] < 0.05
    assert res.grids["mlp"].effect[1] == [0.0] * 7  # the layer-1 MLP is zero: restoring it changes nothing
    assert res.peak is not None and res.peak.column in (3, 6)
    assert res.prompts[0].subject == (2, 4) and res.subject_positions()[0] == [2, 3]
    text = res.summary()
    assert "peak" in text and "mlp" in text and len(text) <= 2000


def test_role_alignment_when_prompts_differ_in_length(facts: Any) -> None:
    long_p, long_s, long_a = _prompts(3)
    short_p, short_s, short_a = _prompts(3, adjective=False)
    res = causal_trace(facts, long_p + short_p, subject=long_s + short_s, answers=long_a + short_a, n_samples=8,
                       states=("mlp", "resid"))
    assert res.alignment == "role" and res.columns == list(ROLES) and set(res.grids) == {"mlp", "resid"}
    mlp = res.grids["mlp"]
    assert mlp.peak is not None and mlp.peak.label == "last subject" and mlp.peak.layer == 0
    # "middle subject" exists in no prompt (spans have 1 or 2 tokens): no value, not a zero
    assert all(row[ROLES.index("middle subject")] is None for row in mlp.effect)
    resid = res.grids["resid"]
    assert resid.peak is not None and resid.peak.label in ("last subject", "last token")
    last = resid.normalized
    assert last is not None
    assert last[1][ROLES.index("last token")] > 0.99 and last[0][ROLES.index("last token")] < 1e-3


def test_windows_restore_neighbouring_layers(facts: Any) -> None:
    prompts, spans, answers = _prompts(3)
    res = causal_trace(facts, prompts, subject=spans, answers=answers, n_samples=8, window=2, states=("mlp",))
    # window 2 centred at layer 1 restores layers 0 and 1: the layer-0 lookup now shows up in row 1 too
    mlp = res.grids["mlp"]
    assert mlp.window == 2 and mlp.normalized is not None and mlp.normalized[1][3] > 0.8


def test_same_seed_same_grid_and_another_seed_differs(facts: Any) -> None:
    prompts, spans, answers = _prompts(4)
    a = causal_trace(facts, prompts, subject=spans, answers=answers, n_samples=6, seed=3)
    b = causal_trace(facts, prompts, subject=spans, answers=answers, n_samples=6, seed=3, batch_size=7)
    c = causal_trace(facts, prompts, subject=spans, answers=answers, n_samples=6, seed=4)
    assert a.model_dump() == b.model_dump()  # batching does not change results
    assert a.grids["mlp"].effect != c.grids["mlp"].effect


def test_unknown_prompts_are_flagged_and_left_out(facts: Any) -> None:
    prompts, spans, answers = _prompts(4)
    wrong = [answers[0], answers[1], 19, answers[3]]  # the model never says 19 (filler)
    res = causal_trace(facts, prompts, subject=spans, answers=wrong, n_samples=4)
    assert [p.known for p in res.prompts] == [True, True, False, True] and res.n_used == 3
    assert not res.prompts[2].used and "not known" in res.summary()
    kept = causal_trace(facts, prompts, subject=spans, answers=wrong, n_samples=4, only_known=False)
    assert kept.n_used == 4 and kept.prompts[2].used and not kept.prompts[2].known
    with pytest.raises(InputError, match="none of the 1 prompts"):
        causal_trace(facts, prompts[:1], subject=spans[:1], answers=[19], n_samples=2)


def test_small_noise_gives_no_normalised_effect(facts: Any) -> None:
    prompts, spans, answers = _prompts(2)
    res = causal_trace(facts, prompts, subject=spans, answers=answers, n_samples=4, noise=0.01)
    assert all(g.normalized is None for g in res.grids.values())
    assert any("barely lowers" in n for n in res.notes)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"subject": [(3, 9)]}, "not inside"),
    ({"subject": [(4, 4)]}, "not inside"),
    ({"answers": [FACT[5], FACT[6]]}, "1 prompts, 1 subjects and 2 answers"),
    ({"states": ("resid", "logits")}, "states must be"),
    ({"noise": 0.0}, "noise must be"),
    ({"window": 5}, "wider than"),
    ({"subject": ["red"]}, "no tokenizer"),
    ({"answers": [99]}, "outside the vocabulary"),
])
def test_bad_input_is_refused(facts: Any, kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"subject": [(2, 4)], "answers": [FACT[5]], **kwargs}
    with pytest.raises(InputError, match=match):
        causal_trace(facts, [[0, THE, 2, 5, LIVES, IN, THE]], **args)


# ----------------------------------------------------------------------------- text prompts and the registry
def test_subject_strings_are_located_in_the_tokens(tiny_model: Any) -> None:
    ids = tiny_model.to_tokens("the red fox sat on the")[0].tolist()
    start, end = locate_subject(tiny_model, ids, "red fox")
    assert "".join(tiny_model.token_str(i) for i in ids[start:end]).strip() == "red fox"
    with pytest.raises(InputError, match="not in prompt"):
        locate_subject(tiny_model, ids, "blue owl")
    with pytest.raises(InputError, match="tokenises to"):
        causal_trace(tiny_model, ["the red fox sat on the"], subject="red fox", answers=[" mat and"])


def test_the_tool_through_a_registry(tiny_model: Any) -> None:
    from autoexplain.tools.registry import Registry, ToolContext
    from autoexplain.tools.tracing import TOOLS
    from autoexplain.tools.vocab import CausalLevel

    reg = Registry()
    for spec in TOOLS:
        reg.register(spec)
    spec = reg.get("causal_trace")
    assert spec.level == CausalLevel.INTERVENTION
    ctx = ToolContext(model=tiny_model)
    args = {"prompts": ["the red fox sat on the", "Mary and John went to the"], "subjects": ["red fox", "Mary"],
            "answers": [" mat", " store"], "n_samples": 3, "only_known": False}
    out = reg.call(ctx, "causal_trace", args)
    assert isinstance(out, TraceGrid) and out.alignment == "role" and out.n_used == 2
    assert set(out.grids) == {"resid", "attn", "mlp"}
    assert all(len(g.effect) == tiny_model.n_layers for g in out.grids.values())
    assert len(out.summary()) <= 2000 and "causal tracing" in out.summary()
    with pytest.raises(InputError, match="bad arguments for causal_trace"):
        reg.call(ctx, "causal_trace", {**args, "states": ["heads"]})
    with pytest.raises(InputError, match="none of the 2 prompts"):  # a random model knows no fact
        reg.call(ctx, "causal_trace", {**args, "only_known": True})


# ----------------------------------------------------------------------------- the toy world's facts task
def test_toy_facts_task_and_corpus_state_the_fixed_facts() -> None:
    """The toy world's ``facts`` task is correct by construction (checked on strings, no model): each clean prompt
    names a subject whose home is the answer, the corrupt prompt another animal whose home is the wrong answer,
    and every fact sentence of the corpus agrees with :data:`FACTS`."""
    import re

    from autoexplain.tools import zoo

    assert set(zoo.FACTS) == set(zoo.CATEGORIES["animal"])
    assert sorted(zoo.FACTS.values()) == sorted(zoo.CATEGORIES["home"])  # one home per animal
    assert "facts" in zoo.TASKS
    for p in zoo.task_prompts("facts", 7, 60)["prompts"]:
        _, color, animal, *_ = p["clean"].split()
        other = p["corrupt"].split()[2]
        assert p["clean"] == f"The {color} {animal} lives in the" and p["subject"] == f"{color} {animal}"
        assert p["answers"] == [f" {zoo.FACTS[animal]}"] and p["wrong_answers"] == [f" {zoo.FACTS[other]}"]
        assert other != animal and p["corrupt"] == p["clean"].replace(f" {animal} ", f" {other} ")
    stated = 0
    for doc in zoo.documents(0, 3000):
        m = re.search(r"(\w+) (?:lives in|goes back to) the (\w+)\.$", doc)
        if m:
            stated += 1
            assert zoo.FACTS[m.group(1)] == m.group(2), doc
    assert 200 < stated < 400  # about a tenth of the corpus


@pytest.mark.slow
def test_causal_tracing_on_the_toy_facts_task() -> None:
    """The demo toy world (a 3-minute build on 2 idle cores) knows its facts; noising the subject destroys them;
    the answer comes back in full from the final position's last residual state and never from positions before
    the subject. Measured (seed 0, 100 prompts): the rest is spread, not localised at the subject: the layer-1 MLP
    at the final position restores ~0.43 of the drop, the layer-0 residual at the last subject token ~0.16."""
    from autoexplain.tools.loading import load_model
    from autoexplain.tools.zoo import ensure_model

    built = ensure_model("small")
    lm = load_model("toy:small", device="cpu")
    prompts, subjects, answers = prompts_from_task_file(built.task_file("facts"), limit=30)
    res = causal_trace(lm, prompts, subject=subjects, answers=answers, n_samples=8)
    assert res.n_used == 30 and res.p_clean > 0.9 and res.p_corrupted < 0.2
    resid = res.grids["resid"].normalized
    assert resid is not None
    assert resid[-1][-1] > 0.99 and all(abs(resid[L][c]) < 1e-6 for L in range(2) for c in (0, 1))
    assert resid[0][3] > resid[0][2]  # the last subject token carries more than the first (the colour)
