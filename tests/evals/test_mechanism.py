"""Mechanism evals (evals/mechanism.py): causal mediation per node, per-prompt effects, held-out scores and
robustness, on the hand-planted circuits whose answers are known by construction, and on variants of their tasks
built here (a rare prompt that corrupts the query token instead of the earlier occurrence; prompts without any
corruption) where the mean hides what the per-prompt, held-out and resampled views must reveal."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from autoexplain.evals import mechanism as mech
from autoexplain.evals.truth.planted_circuits import PlantedCircuit, induction, suppression
from autoexplain.tools.circuits import faithfulness as tool_faithfulness
from autoexplain.tools.data import TokenizedTask
from autoexplain.tools.errors import InputError
from autoexplain.tools.patching import PatchSetup

pytestmark = pytest.mark.usefixtures("one_thread")

INDUCTION_DISTRACTORS = ["a0.1", "a0.2", "a0.3", "m0", "a1.0", "a1.2", "a1.3"]
QUERY_EDGE = "embed->a1.1.q"


@pytest.fixture(scope="module")
def ind() -> tuple[PlantedCircuit, PatchSetup]:
    p = induction()
    return p, PatchSetup(p.lm, p.task)


def _query_corrupt(task: TokenizedTask, rows: list[int]) -> TokenizedTask:
    """For ``rows``, the corrupt prompt is the clean one with its last token replaced by a token that does not occur
    in the prompt: the earlier occurrence stays, but the induction head's *query* finds no match. Only the query
    edge (embed -> a1.1.q), not the planted key path, carries the clean/corrupt difference on those prompts."""
    corrupt = task.corrupt.clone()
    for i in rows:
        pos = int(task.answer_pos[i])
        present = set(task.clean[i, :pos + 1].tolist())
        corrupt[i] = task.clean[i]
        corrupt[i, pos] = next(t for t in range(1, 24) if t not in present)
    return dataclasses.replace(task, corrupt=corrupt)


def _uncorrupted(task: TokenizedTask, rows: list[int]) -> TokenizedTask:
    corrupt = task.corrupt.clone()
    corrupt[rows] = task.clean[rows]
    return dataclasses.replace(task, corrupt=corrupt)


# ============================================================================= mediation
def test_mediation_on_the_planted_induction_circuit(ind: tuple[PlantedCircuit, PatchSetup]) -> None:
    _, setup = ind
    res = mech.mediation(setup)
    by = res.by_node()
    assert set(by) == {s for s in setup.graph.sources if s != "embed"}
    a11, a00, m1 = by["a1.1"], by["a0.0"], by["m1"]
    # the induction head: all of the effect, part direct (a1.1 -> logits), part through m1 (a1.1 -> m1 -> logits)
    assert a11.total_frac == pytest.approx(1.0, abs=1e-3)
    assert a11.direct_frac > 0.3 and a11.indirect_frac > 0.2
    assert a11.ratio is not None and 0.2 < a11.ratio < 0.6
    assert str(a11.direct_edge) == "a1.1->logits" and a11.n_indirect_edges == 1
    # the same numbers as single unbatched evaluations of the patching core
    g = setup.graph
    out = [i for i, e in enumerate(g.edges) if str(e.src) == "a1.1"]
    assert a11.total == pytest.approx(setup.m_clean - setup.evaluate(g.mask(out)), abs=1e-5)
    assert a11.direct == pytest.approx(setup.m_clean - setup.evaluate(g.mask(g.edge_ids(["a1.1->logits"]))), abs=1e-5)
    # its indirect effect is exactly m1's total effect: m1 reads OUT, which only a1.1 writes
    assert a11.indirect == pytest.approx(m1.total, abs=1e-4)
    # the previous-token head: everything goes through the induction head's key
    assert a00.total_frac == pytest.approx(1.0, abs=1e-3)
    assert abs(a00.direct_frac) < 1e-4 and a00.ratio == pytest.approx(1.0, abs=1e-3)
    # m1 is in the last layer: its only edge is to the logits, so it is entirely direct
    assert m1.n_indirect_edges == 0 and m1.ratio == pytest.approx(0.0, abs=1e-6) and m1.direct == m1.total
    for name in INDUCTION_DISTRACTORS:
        n = by[name]
        assert abs(n.total_frac) < 1e-4 and abs(n.direct_frac) < 1e-4 and abs(n.indirect_frac) < 1e-4, name
        assert n.ratio is None and "TE" in n.ratio_note, name
    assert res.evaluations == 3 * len(by) and "a1.1" in res.summary_text()
    assert len(res.summary_text()) < 1600


@pytest.mark.parametrize("make", [induction, suppression])
def test_mediation_decomposes_exactly_when_the_output_is_linear(make) -> None:
    """With logit_diff on a model without a final norm, the direct and the indirect paths meet only in a linear
    read-out: TE = NDE + NIE for every node, however nonlinear the mediators (m1's thresholded ReLU, attention).
    With answer_prob (a softmax over the same logits) the decomposition is no longer exact for the node whose
    direct and indirect paths both raise the answer logit."""
    p = make()
    res = mech.mediation(PatchSetup(p.lm, p.task))
    for n in res.nodes:
        assert abs(n.total - n.direct - n.indirect) < 1e-5, n.node
        assert n.interaction == pytest.approx(n.total - n.direct - n.indirect, abs=1e-12)
    if p.name == "induction":
        a11 = mech.mediation(PatchSetup(p.lm, p.task, metric="answer_prob"), ["a1.1"]).nodes[0]
        assert abs(a11.interaction_frac) > 0.02
        assert a11.total == pytest.approx(a11.direct + a11.indirect + a11.interaction, abs=1e-9)


def _two_induction_heads(threshold: bool) -> PlantedCircuit:
    """The induction model with a1.0 writing OUT as a1.1 does, so the previous-token head a0.0 reaches the answer
    through two mediators (a1.0's key and a1.1's key) whose outputs meet in m1. With m1's ReLU threshold (b_in =
    -2) the two paths combine nonlinearly; without it (b_in = 0, and OUT is never negative) m1 is linear on them."""
    p = induction()
    blk = p.lm.model.blocks[1]
    with torch.no_grad():
        blk.attn.W_O[0] = blk.attn.W_O[1].clone()
        if not threshold:
            blk.mlp.b_in.zero_()
    return p


def test_mediator_interaction_is_zero_on_linear_paths_and_not_through_a_relu_threshold() -> None:
    got = {}
    for threshold in (False, True):
        p = _two_induction_heads(threshold)
        setup = PatchSetup(p.lm, p.task)
        a00 = mech.mediation(setup, ["a0.0"], per_edge=True).nodes[0]
        assert a00.mediators is not None and a00.mediator_interaction is not None
        assert len(a00.mediators) == a00.n_indirect_edges
        med = {str(m.edge): m.fraction for m in a00.mediators}
        assert med["a0.0->a1.0.k"] > 0.3 and med["a0.0->a1.1.k"] > 0.3
        assert abs(a00.total - a00.direct - a00.indirect) < 1e-5  # the output is linear in both variants
        got[threshold] = a00.mediator_interaction / setup.effect
    assert abs(got[False]) < 1e-5  # linear mediator: the two indirect paths add exactly
    assert got[True] < -0.1  # thresholded ReLU: patching both loses less than the sum of patching each


def test_mediation_without_a_direct_edge(ind: tuple[PlantedCircuit, PatchSetup], monkeypatch) -> None:
    """A node with no edge to logits: NDE is 0 by construction, TE = NIE, two masks per node instead of three."""
    _, setup = ind
    real = mech._out_edges

    def no_direct(s: PatchSetup, node: str) -> tuple[int | None, list[int]]:
        direct, indirect = real(s, node)
        return None, indirect  # a1.1 -> logits left out of the graph

    full = mech.mediation(setup, ["a1.1"]).nodes[0]
    monkeypatch.setattr(mech, "_out_edges", no_direct)
    res = mech.mediation(setup, ["a1.1"])
    n = res.nodes[0]
    assert n.direct_edge is None and n.direct == 0.0 and n.indirect == n.total and n.interaction == 0.0
    assert n.total == pytest.approx(full.indirect, abs=1e-6)  # only the path through m1 is patched
    assert n.ratio == 1.0 and res.evaluations == 1


def test_mediation_refuses_bad_nodes(ind: tuple[PlantedCircuit, PatchSetup]) -> None:
    _, setup = ind
    for bad in ("embed", "logits", "a5.0", "m9", "banana"):
        with pytest.raises(InputError, match="not a head or MLP"):
            mech.mediation(setup, [bad])
    with pytest.raises(InputError, match="min_total"):
        mech.mediation(setup, ["a1.1"], min_total=-1)
    with pytest.raises(InputError, match="at least one node"):
        mech.mediation(setup, [])


# ============================================================================= per-prompt effects
def test_per_prompt_shares_planted_and_partial(ind: tuple[PlantedCircuit, PatchSetup]) -> None:
    p, setup = ind
    g = setup.graph
    full = mech.circuit_per_prompt(setup, g.edge_ids(p.planted))
    assert full.n_used == p.task.n_prompts and full.n_excluded == 0
    assert all(s is not None and s >= 0.5 for s in full.shares)
    assert full.spread is not None and full.spread.min > 0.99 and full.share_at_least_half == 1.0

    # a task where half the prompts corrupt the query token: the planted edge set (no query edge) recovers all of
    # half the prompts and nothing of the other half: a mean of 0.5 that no prompt has
    mixed = _query_corrupt(p.task, list(range(0, p.task.n_prompts, 2)))
    ms = PatchSetup(p.lm, mixed)
    part = mech.circuit_per_prompt(ms, g.edge_ids(p.planted))
    assert part.spread is not None and part.spread.std > 0.4
    assert part.spread.p10 < 0.05 and part.spread.p90 > 0.95 and part.share_at_least_half == pytest.approx(0.5)
    assert 0.3 < part.faithfulness < 0.7
    whole = mech.circuit_per_prompt(ms, g.edge_ids(set(p.planted) | {QUERY_EDGE}))
    assert whole.spread is not None and whole.spread.min > 0.99
    # each per-prompt share is the faithfulness of the same edge set on that prompt alone (a fresh setup, the
    # tools' own faithfulness, unbatched)
    for i in (0, 1):
        alone = PatchSetup(p.lm, mixed.subset([i]))
        assert part.shares[i] == pytest.approx(tool_faithfulness(alone, g.edge_ids(p.planted)), abs=1e-5)
    assert part.faithfulness == pytest.approx(tool_faithfulness(ms, g.edge_ids(p.planted)), abs=1e-6)
    assert "median" in part.summary_text()


def test_per_prompt_counts_prompts_without_effect() -> None:
    p = induction()
    rows = list(range(1, p.task.n_prompts, 2))
    setup = PatchSetup(p.lm, _uncorrupted(p.task, rows))
    res = mech.circuit_per_prompt(setup, setup.graph.edge_ids(p.planted))
    assert res.excluded == rows and res.n_excluded == len(rows) and res.n_used == p.task.n_prompts - len(rows)
    assert all(res.shares[i] is None for i in rows)
    assert res.spread is not None and res.spread.min > 0.99
    with pytest.raises(InputError, match="min_prompt_effect"):
        mech.circuit_per_prompt(setup, [], min_prompt_effect=1.5)


def test_node_claims_per_prompt(ind: tuple[PlantedCircuit, PatchSetup]) -> None:
    p, setup = ind
    claims = {c.node: c for c in mech.node_claims(setup, ["a0.0", "a1.1", "m1", "a0.1"])}
    assert claims["a0.0"].holds_share == 1.0 and claims["a1.1"].holds_share == 1.0
    assert claims["m1"].holds_share == 1.0 and claims["a0.1"].holds_share == 0.0
    # on query-corrupted prompts the previous-token head's output is the same on clean and corrupt: the claim
    # "noising a0.0 lowers the metric" holds on exactly the other half
    rows = list(range(0, p.task.n_prompts, 2))
    ms = PatchSetup(p.lm, _query_corrupt(p.task, rows))
    mixed = {c.node: c for c in mech.node_claims(ms, ["a0.0", "a1.1"])}
    assert mixed["a0.0"].holds_share == pytest.approx(0.5)
    assert [i for i, d in enumerate(mixed["a0.0"].drops) if d is not None and d < 0.05] == rows
    assert mixed["a1.1"].holds_share == 1.0


# ============================================================================= held-out
@pytest.mark.parametrize("method", ["acdc", "eap-ig"])
@pytest.mark.parametrize("make", [induction, suppression])
def test_held_out_on_planted_circuits(make, method: str) -> None:
    p = make()
    res = mech.held_out(p.lm, p.task, method, seed=3)
    assert {str(e) for e in res.edges} == set(p.planted)
    assert sorted(res.fit.rows + res.held_out.rows) == list(range(p.task.n_prompts))
    assert len(res.fit.rows) == len(res.held_out.rows) == p.task.n_prompts // 2
    assert res.fit.faithfulness is not None and res.held_out.faithfulness is not None
    assert res.fit.faithfulness > 0.95 and res.gap is not None and abs(res.gap) < 0.05
    assert res.held_out.prompts is not None and res.held_out.prompts.share_at_least_half == 1.0
    rows = {s.metric: s for s in res.scores()}
    assert rows["heldout_faithfulness"].value == res.held_out.faithfulness
    assert rows["heldout_faithfulness"].details["ablation"] == "resample"
    assert "held-out" in res.summary_text()


def test_held_out_exposes_a_mechanism_the_fit_part_never_saw() -> None:
    """One prompt of 8 corrupts the query token. When it lands in the held-out part, the circuit found on the fit
    part has no query edge, and the held-out score must show it; in-sample stays perfect."""
    p = induction(n_prompts=8)
    task = _query_corrupt(p.task, [0])
    res = next(r for r in (mech.held_out(p.lm, task, "acdc", seed=s) for s in range(20)) if 0 in r.held_out.rows)
    assert QUERY_EDGE not in {str(e) for e in res.edges}
    assert res.fit.faithfulness == pytest.approx(1.0, abs=1e-3)
    assert res.gap is not None and res.gap > 0.1
    assert res.held_out.prompts is not None
    shares = res.held_out.prompts.shares
    assert shares[res.held_out.rows.index(0)] == pytest.approx(0.0, abs=0.05)
    assert res.held_out.prompts.share_at_least_half == pytest.approx(0.75)


def test_held_out_refuses_tiny_tasks_and_reports_undefined_scores() -> None:
    p = induction(n_prompts=3)
    with pytest.raises(InputError, match="at least 2 prompts on each side"):
        mech.held_out(p.lm, p.task, "eap-ig")
    with pytest.raises(InputError, match="fraction"):
        mech.held_out(p.lm, p.task, "eap-ig", fraction=1.0)
    # a held-out part whose corrupt prompts equal the clean ones: faithfulness is undefined, not 0
    q = induction(n_prompts=8)
    res = mech.held_out(q.lm, q.task, "eap-ig", seed=0)
    task = _uncorrupted(q.task, res.held_out.rows)
    res = mech.held_out(q.lm, task, "eap-ig", seed=0)
    assert res.held_out.faithfulness is None and res.gap is None and "nothing to explain" in res.held_out.note
    assert {s.metric: s for s in res.scores()}["heldout_faithfulness"].value is None


# ============================================================================= robustness
@pytest.mark.parametrize("method", ["acdc", "eap-ig"])
@pytest.mark.parametrize("make", [induction, suppression])
def test_robustness_on_planted_circuits(make, method: str) -> None:
    p = make()
    res = mech.robustness(p.lm, p.task, method, n_resamples=3)
    assert {str(e) for e in res.full_edges} == set(p.planted)
    assert res.jaccard_mean == 1.0 and res.jaccard_min == 1.0
    assert {str(e) for e in res.always} == set(p.planted) and res.sometimes == []
    assert res.spearman_min is not None and res.spearman_min > 0.9
    assert all(len(r.rows) == 18 and r.faithfulness_on_full == pytest.approx(1.0, abs=1e-3) for r in res.runs)
    assert res.seconds_total >= res.seconds_full > 0
    assert {s.metric for s in res.scores()} == {"robustness_jaccard", "robustness_spearman"}


def test_robustness_drops_when_a_rare_prompt_carries_a_mechanism() -> None:
    """One prompt of 8 needs the query edge. Resamples that leave it out find a circuit without that edge (and
    with it, one that loses that prompt on the full data); resamples that keep it find the full circuit."""
    p = induction(n_prompts=8)
    clean = mech.robustness(p.lm, p.task, "acdc", n_resamples=8, seed=1)
    assert clean.jaccard_min == 1.0
    res = mech.robustness(p.lm, _query_corrupt(p.task, [0]), "acdc", n_resamples=8, seed=1)
    assert QUERY_EDGE in {str(e) for e in res.full_edges}
    without = [r for r in res.runs if 0 not in r.rows]
    assert without, "seed 1 should give a resample without prompt 0; pick another seed"
    for r in res.runs:
        if 0 in r.rows:
            assert r.jaccard == 1.0
        else:
            assert r.jaccard == pytest.approx(6 / 7) and r.faithfulness_on_full is not None
            assert r.faithfulness_on_full < 0.95
    assert res.jaccard_min < 1.0 and QUERY_EDGE not in {str(e) for e in res.always}
    unstable = {str(s.edge): s for s in res.sometimes}
    assert unstable[QUERY_EDGE].kept_in == len(res.runs) - len(without) and unstable[QUERY_EDGE].in_full
    assert "unstable" in res.summary_text()


def test_robustness_refuses_bad_settings() -> None:
    p = induction(n_prompts=2)
    with pytest.raises(InputError, match="at least 2 prompts"):
        mech.robustness(p.lm, p.task, "eap-ig")
    q = induction(n_prompts=8)
    with pytest.raises(InputError, match="n_resamples"):
        mech.robustness(q.lm, q.task, "eap-ig", n_resamples=0)


# ============================================================================= small statistics
def test_spearman_jaccard_and_spread_against_references() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        a = rng.integers(0, 5, 30).astype(float).tolist()  # many ties
        b = (np.array(a) + rng.normal(0, 2, 30)).round().tolist()
        assert mech.spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    assert mech.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None
    assert mech.jaccard(set(), set()) == 1.0 and mech.jaccard({1, 2}, {2, 3}) == pytest.approx(1 / 3)
    v = rng.normal(size=17).tolist()
    s = mech.spread(v)
    assert s is not None
    assert s.p10 == pytest.approx(np.percentile(v, 10)) and s.p90 == pytest.approx(np.percentile(v, 90))
    assert s.median == pytest.approx(np.median(v)) and s.std == pytest.approx(np.std(v))
    assert mech.spread([]) is None
