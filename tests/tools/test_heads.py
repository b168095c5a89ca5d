"""Head roles on the hand-planted models, where every head's job is known by construction."""

from __future__ import annotations

import pytest
import torch

from autoexplain.tools.errors import InputError
from autoexplain.tools.heads import (
    TOOLS,
    HeadRole,
    RoleTable,
    composition_baseline,
    repeated_sequences,
    role_table,
    verify_role,
    vocab_projection,
)
from autoexplain.tools.registry import Registry, ToolContext
from autoexplain.tools.vocab import CausalLevel


@pytest.fixture(scope="module")
def ind(one_thread):
    from autoexplain.evals.truth.planted_circuits import induction

    return induction()


@pytest.fixture(scope="module")
def sup(one_thread):
    from autoexplain.evals.truth.planted_circuits import suppression

    return suppression()


@pytest.fixture(scope="module")
def ind_table(ind) -> RoleTable:
    return role_table(ind.lm)


@pytest.fixture(scope="module")
def sup_table(sup) -> RoleTable:
    return role_table(sup.lm)


def _score(table: RoleTable, node: str, role: HeadRole) -> float | None:
    return next(h.scores[role.value] for h in table.heads if h.node == node)


def test_repeated_sequences_repeat_and_avoid_bos(ind) -> None:
    toks, k, details = repeated_sequences(ind.lm, 5, seed=3)
    assert toks.shape == (5, 2 * k + 1) and k == 7  # n_ctx 16
    assert bool((toks[:, 1:k + 1] == toks[:, k + 1:]).all())
    assert bool((toks[:, 0] == 0).all()) and bool((toks[:, 1:] != 0).all())
    assert all(len(set(r[1:k + 1].tolist())) == k for r in toks)  # distinct within a half
    assert details["n_seqs"] == 5 and details["seq_len"] == 15
    assert torch.equal(toks, repeated_sequences(ind.lm, 5, seed=3)[0])  # seeded


def test_attention_roles_on_the_induction_model(ind_table: RoleTable) -> None:
    prev = HeadRole.PREVIOUS_TOKEN
    for head in ("a0.0", "a0.1"):  # a0.1 attends to p-1 by construction too (it writes junk)
        assert _score(ind_table, head, prev) >= 0.9
    for head in ("a0.2", "a0.3", "a1.0", "a1.1", "a1.2", "a1.3"):
        assert _score(ind_table, head, prev) <= 0.2, head
    for head in ("a1.1", "a1.0"):  # a1.0: the same attention as a1.1, writes junk
        assert _score(ind_table, head, HeadRole.INDUCTION) >= 0.9
    for head in ("a0.0", "a0.1", "a0.2", "a0.3", "a1.2", "a1.3"):
        assert _score(ind_table, head, HeadRole.INDUCTION) <= 0.2, head
    best = {str(h.node): h.best_role for h in ind_table.heads}
    assert best["a1.1"] is HeadRole.INDUCTION and best["a0.0"] is HeadRole.PREVIOUS_TOKEN
    assert best["a0.3"] is None  # attends to itself: no role


def test_ov_scores(ind_table: RoleTable, sup_table: RoleTable) -> None:
    assert _score(ind_table, "a1.1", HeadRole.COPYING) >= 0.9
    assert _score(ind_table, "a1.1", HeadRole.SUPPRESSION) <= 0.1
    assert _score(sup_table, "a1.0", HeadRole.COPYING) >= 0.9  # the name mover
    assert _score(sup_table, "a1.2", HeadRole.SUPPRESSION) >= 0.9  # the suppressor
    assert _score(sup_table, "a1.2", HeadRole.COPYING) <= 0.1
    assert _score(sup_table, "a1.0", HeadRole.SUPPRESSION) <= 0.1
    # heads writing nothing the unembedding reads: not computable (None with a reason), never 0
    junk = next(s for s in ind_table.scores if s.node == "a1.0" and s.role is HeadRole.COPYING)
    assert junk.score is None and "reason" in junk.details
    raw = next(s for s in sup_table.scores if s.node == "a1.2" and s.role is HeadRole.SUPPRESSION)
    assert raw.details["elhage_ratio"] == pytest.approx(-1.0, abs=1e-6)


def test_duplicate_token_head(sup_table: RoleTable) -> None:
    assert _score(sup_table, "a0.1", HeadRole.DUPLICATE_TOKEN) >= 0.9
    others = [h for h in sup_table.heads if h.node != "a0.1"]
    assert all(h.scores[HeadRole.DUPLICATE_TOKEN.value] <= 0.3 for h in others)


def test_k_composition_above_baseline_and_unrelated_pairs(ind) -> None:
    from autoexplain.tools.heads import composition_scores

    comps = composition_scores(ind.lm)
    k = {(str(c.src), str(c.dst)): c for c in comps if c.kind == "k"}
    true = k[("a0.0", "a1.1")]
    assert true.score >= 1.8 * true.baseline
    for src in ("a0.1", "a0.2", "a0.3"):  # write junk / nothing a1.1's key reads
        assert k[(src, "a1.1")].score < 0.5 * true.score
    table_edges = {f"{c.src}->{c.dst}.{c.kind}" for c in role_table(ind.lm, n_seqs=4).composition}
    assert "a0.0->a1.1.k" in table_edges and "a0.2->a1.1.k" not in table_edges
    b = composition_baseline(96, 48)
    assert 0.08 < b < 0.13  # ~ 1/sqrt(d_model) for random factors


def test_verify_roles(ind) -> None:
    ok = verify_role(ind.lm, "a1.1", HeadRole.INDUCTION)
    assert ok.verified is True and ok.effect >= 0.9
    bad = verify_role(ind.lm, "a0.2", "induction")
    assert bad.verified is False
    prev = verify_role(ind.lm, "a0.0", HeadRole.PREVIOUS_TOKEN)
    assert prev.verified is True and "a1.1" in prev.details["downstream"]
    junk_prev = verify_role(ind.lm, "a0.1", HeadRole.PREVIOUS_TOKEN)  # attends p-1, but nothing reads its output
    assert junk_prev.verified is False
    assert verify_role(ind.lm, "a1.1", HeadRole.COPYING).verified is True


def test_verify_suppression_and_copying_on_task_prompts(sup) -> None:
    prompts = sup.task.clean.tolist()
    s = verify_role(sup.lm, "a1.2", HeadRole.SUPPRESSION, prompts=prompts)
    assert s.verified is True and s.effect > 1
    assert s.details["direct_effect"] == pytest.approx(s.effect, rel=1e-3)  # nothing later reads a1.2's output
    assert verify_role(sup.lm, "a1.2", HeadRole.COPYING, prompts=prompts).verified is False
    assert verify_role(sup.lm, "a1.0", HeadRole.COPYING, prompts=prompts).verified is True
    assert verify_role(sup.lm, "a0.1", HeadRole.DUPLICATE_TOKEN).verified is True


def test_vocab_projection(sup) -> None:
    out = vocab_projection(sup.lm, "a1.2", input_ids=[3])
    assert out.rows[0].suppressed[0].token_id == 3  # the suppressor writes minus the name it reads
    diag = vocab_projection(sup.lm, "a1.0")
    assert {t.token_id for t in diag.rows[0].promoted[:8]} == set(range(1, 9))  # copies the names
    with pytest.raises(InputError, match="neuron"):
        vocab_projection(sup.lm, "m0")


def test_mlp_neuron_projection(ind) -> None:
    out = vocab_projection(ind.lm, "m1", neuron=5)  # neuron t of m1 boosts OUT_t, which W_U reads as token t
    assert out.rows[0].promoted[0].token_id == 5 and out.rows[0].promoted[0].value > 0
    with pytest.raises(InputError, match="m0 .. m1"):
        vocab_projection(ind.lm, "m4", neuron=0)


def test_bad_inputs(ind) -> None:
    with pytest.raises(InputError, match="a0.0 .. a1.3"):
        verify_role(ind.lm, "a5.0", HeadRole.INDUCTION)
    with pytest.raises(InputError, match="roles are"):
        verify_role(ind.lm, "a1.1", "banana")
    with pytest.raises(InputError, match="half_len"):
        repeated_sequences(ind.lm, 2, half_len=9)
    with pytest.raises(InputError, match="copying and suppression checks only"):
        verify_role(ind.lm, "a1.1", HeadRole.INDUCTION, prompts=[[0, 1, 2]])


def test_tool_specs_through_a_registry(ind) -> None:
    reg = Registry()
    for spec in TOOLS:
        reg.register(spec)
    assert {s.name: s.level for s in reg} == {
        "head_roles": CausalLevel.ASSOCIATION, "attention_pattern": CausalLevel.ASSOCIATION,
        "composition_scores": CausalLevel.ASSOCIATION, "vocab_projection": CausalLevel.ASSOCIATION,
        "verify_head_role": CausalLevel.INTERVENTION}
    ctx = ToolContext(model=ind.lm)
    table = reg.call(ctx, "head_roles", {"n_seqs": 8})
    assert "a1.1: induction" in table.summary() and len(table.summary()) <= 2000
    att = reg.call(ctx, "attention_pattern", {"token_ids": [[0, 5, 6, 7, 5, 6]], "heads": ["a1.1"]})
    top = att.prompts[0].queries[0].top[0]  # query '6' at 5: the token after the earlier 6 is 7 at position 3
    assert top.position == 3
    comp = reg.call(ctx, "composition_scores", {"kinds": ["k"], "min_ratio": 1.5})
    assert any(c.src == "a0.0" and c.dst == "a1.1" for c in comp.scores)
    ver = reg.call(ctx, "verify_head_role", {"node": "a1.1", "role": "induction", "n_seqs": 8})
    assert ver.summary().startswith("VERIFIED")
    with pytest.raises(InputError):
        reg.call(ctx, "verify_head_role", {"node": "a9.9", "role": "induction"})
    with pytest.raises(InputError, match="Extra inputs"):
        reg.call(ctx, "head_roles", {"n_seq": 8})
    with pytest.raises(InputError, match="no tokenizer"):
        reg.call(ctx, "attention_pattern", {"texts": ["hello"]})
