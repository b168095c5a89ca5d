"""Circuit scores (evals/circuits.py): known answers on the hand-planted circuits (faithfulness, completeness,
minimality, CPR/CMD, ROC AUC), how the scores react to a padded or a broken circuit, the rank AUC against
sklearn, and the rows for the ``scores`` table."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
from sklearn.metrics import roc_auc_score

from autoexplain.agent.store.rows import circuit_score_rows, score_id
from autoexplain.evals.circuits import (
    CircuitScores,
    circuit_nodes,
    completeness,
    cpr_cmd,
    edge_roc_auc,
    faithfulness,
    faithfulness_many,
    minimality,
    necessary_outside,
    necessity,
    precision,
    rank_auc,
    recall,
    score_circuit,
)
from autoexplain.evals.truth.planted_circuits import PlantedCircuit, induction, induction_and, suppression
from autoexplain.tools.circuits import Circuit, EdgeScores, faithfulness_curve, find_circuit, score_edges
from autoexplain.tools.circuits import faithfulness as tool_faithfulness
from autoexplain.tools.errors import InputError
from autoexplain.tools.patching import PatchSetup

pytestmark = pytest.mark.usefixtures("one_thread")

#: Edges that carry nothing to the answer (junk writers and readers; the constant name mover under resample).
DISTRACTORS = {
    "induction": {"embed->a0.1.v", "a0.1->a1.2.q", "a1.2->logits"},
    "suppression": {"embed->a0.0.v", "a0.0->a1.3.v", "a1.3->logits", "a1.0->logits"},
}
PLANTED_NODES = {"induction": ["a0.0", "a1.1", "m1"], "suppression": ["a0.1", "a1.2"]}
METRICS = {"correctness", "completeness", "necessity", "succinctness", "faithfulness", "completeness_worst_gap",
           "completeness_mean_gap", "edge_fraction", "cpr", "cmd", "edge_roc_auc", "edge_recall", "edge_precision",
           "full_effect"}


@pytest.fixture(scope="module")
def planted() -> dict[str, tuple[PlantedCircuit, PatchSetup, EdgeScores]]:
    out = {}
    for p in (induction(), suppression()):
        setup = PatchSetup(p.lm, p.task)
        out[p.name] = (p, setup, score_edges(setup, "eap-ig"))
    return out


def _circuit(scores: EdgeScores, edges: set[str]) -> Circuit:
    return Circuit(scores=scores, in_circuit=[e in edges for e in scores.edges], top_k=None, threshold=None,
                   faithfulness=float("nan"), curve=[])


# ============================================================================= known answers
@pytest.mark.parametrize("name", ["induction", "suppression"])
def test_planted_circuit_scores_as_a_true_circuit(planted, name) -> None:
    p, setup, scores = planted[name]
    res = score_circuit(setup, _circuit(scores, set(p.planted)), true_edges=p.planted)
    assert res.faithfulness == pytest.approx(1.0, abs=1e-4) and res.correctness == res.faithfulness
    assert res.completeness_worst_gap < 1e-3 and res.completeness == pytest.approx(1.0, abs=1e-3)
    assert res.necessity == pytest.approx(1.0, abs=1e-3) and res.missing_necessary == []
    assert res.completeness_ioi == pytest.approx(res.completeness)
    comp = res.completeness_detail
    kinds = [k.kind for k in comp.knockouts]
    assert kinds[:2] == ["empty", "all"] and {f"node:{n}" for n in PLANTED_NODES[name]} <= set(kinds)
    assert comp.n_random > 0 and comp.n_subsets == len(kinds)
    mini = res.minimality_detail
    assert [n.node for n in mini.nodes] == PLANTED_NODES[name]
    assert mini.unnecessary == [] and all(n.drop > 0.3 for n in mini.nodes), mini.nodes
    assert mini.necessary_fraction == 1.0 and mini.joint_unnecessary_drop is None
    assert res.edge_fraction == pytest.approx(len(p.planted) / 110)
    assert res.succinctness == pytest.approx(1 - len(p.planted) / 110)
    assert res.edge_roc_auc == pytest.approx(1.0, abs=0.01) and res.edge_recall == 1.0 and res.edge_precision == 1.0
    assert not res.no_behaviour and all(s.value is not None for s in res.scores())
    # the circuit EAP-IG selects by itself is judged against the truth the same way
    found = find_circuit(setup, "eap-ig", curve=False)
    assert recall(found.edges, p.planted) == 1.0 and edge_roc_auc(found.scores, p.planted) >= 0.99


@pytest.mark.parametrize("name", ["induction", "suppression"])
def test_distractors_are_unnecessary_and_cost_succinctness(planted, name) -> None:
    p, setup, scores = planted[name]
    g = setup.graph
    base = minimality(setup, g.edge_ids(p.planted))
    padded = minimality(setup, g.edge_ids(p.planted | DISTRACTORS[name]))
    distractor_nodes = set(circuit_nodes(setup, g.edge_ids(DISTRACTORS[name]))) - set(PLANTED_NODES[name])
    assert distractor_nodes and set(padded.unnecessary) == distractor_nodes
    assert all(abs(n.drop) < 1e-3 for n in padded.nodes if n.node in distractor_nodes)
    assert padded.faithfulness == pytest.approx(1.0, abs=1e-4)  # the passengers do not hurt faithfulness...
    assert padded.joint_unnecessary_drop == pytest.approx(0.0, abs=1e-3)  # ...alone or together (not redundancy)
    assert padded.succinctness < base.succinctness - 0.2  # ...but they cost succinctness
    assert padded.necessary_fraction == pytest.approx(1 - len(distractor_nodes) / len(padded.nodes))
    res = score_circuit(setup, _circuit(scores, set(p.planted | DISTRACTORS[name])), true_edges=p.planted)
    n_true, n_extra = len(p.planted), len(DISTRACTORS[name])
    assert res.edge_recall == 1.0 and res.edge_precision == pytest.approx(n_true / (n_true + n_extra))
    assert res.succinctness == pytest.approx(padded.succinctness) and res.completeness > 0.99


@pytest.mark.parametrize("name", ["induction", "suppression"])
def test_a_circuit_missing_a_planted_edge_is_caught(planted, name) -> None:
    p, setup, _ = planted[name]
    g = setup.graph
    full = completeness(setup, g.edge_ids(p.planted))
    for edge in sorted(p.planted):
        keep = g.edge_ids(p.planted - {edge})
        comp = completeness(setup, keep)
        f = faithfulness(setup, keep)
        empty = next(k for k in comp.knockouts if k.kind == "empty")
        assert empty.gap == pytest.approx(abs(1 - f), abs=1e-6)  # K = ∅ compares F(C) with F(M) = 1
        assert comp.worst_gap >= 0.3 and comp.score <= 0.7, (edge, f, comp.worst_gap)
        assert comp.mean_gap > full.mean_gap + 0.05


def test_completeness_sees_what_the_rest_of_the_model_can_do(planted) -> None:
    """K = C: the planted edges are the only route, so the model without them does nothing (gap 0); a circuit made
    of one planted edge leaves the rest of the route outside, where the model still uses it."""
    p, setup, _ = planted["induction"]
    g = setup.graph
    comp = completeness(setup, g.edge_ids(p.planted))
    whole = next(k for k in comp.knockouts if k.kind == "all")
    assert whole.f_circuit == 0.0 and abs(whole.f_model) < 1e-3
    part = completeness(setup, g.edge_ids(["a1.1->m1"]))
    assert part.worst_gap > 0.5


def test_completeness_subsets_are_deterministic_and_sized(planted) -> None:
    p, setup, _ = planted["induction"]
    keep = setup.graph.edge_ids(p.planted | DISTRACTORS["induction"])  # 9 edges
    a = completeness(setup, keep, n_subsets=12, fraction=(0.25, 0.5), seed=3)
    b = completeness(setup, keep, n_subsets=12, fraction=(0.25, 0.5), seed=3)
    c = completeness(setup, keep, n_subsets=12, fraction=(0.25, 0.5), seed=4)
    assert a == b and [k.edges for k in a.knockouts] != [k.edges for k in c.knockouts]
    rand = [k for k in a.knockouts if k.kind.startswith("random")]
    assert len(rand) == a.n_random == 12
    assert {len(k.edges) for k in rand} == {2, 4}  # round(0.25 x 9), round(0.5 x 9)
    assert len({tuple(k.edges) for k in a.knockouts}) == a.n_subsets  # no subset twice
    only = completeness(setup, keep, n_subsets=0)
    assert only.n_random == 0 and only.n_subsets == 2 + len(circuit_nodes(setup, keep))
    with pytest.raises(InputError, match="fraction"):
        completeness(setup, keep, fraction=1.5)
    empty = completeness(setup, [])
    assert empty.worst_gap == pytest.approx(1.0) and empty.n_subsets == 1


def test_faithfulness_many_matches_the_tool(planted) -> None:
    _, setup, _ = planted["suppression"]
    n = setup.graph.n_edges
    rng = random.Random(0)
    logits_only = [i for i, name in enumerate(setup.graph.names) if not name.endswith("->logits")]  # patch logits
    sets = [rng.sample(range(n), rng.randrange(0, n + 1)) for _ in range(6)] + [logits_only, list(range(n)), []]
    got = faithfulness_many(setup, sets)
    assert got == pytest.approx([tool_faithfulness(setup, s) for s in sets], abs=1e-5)
    assert got[-2] == 1.0 and got[-1] == 0.0
    with pytest.raises(InputError, match="outside this graph"):
        faithfulness(setup, [n])


# ============================================================================= necessity
def test_a_sufficient_circuit_missing_an_and_gate_fails_completeness() -> None:
    """EAP-IG on the sharp AND gate keeps only the value path: faithfulness 1 (sufficient), the IOI knock-outs of its
    own edges see nothing, necessity 1 (corrupting it removes everything). Yet the previous-token head, the key
    and the query, each noised alone in the full model, remove half the effect: completeness must fail."""
    p = induction_and(sharpness=40)
    setup = PatchSetup(p.lm, p.task)
    circ = find_circuit(setup, "eap-ig", curve=False)
    res = score_circuit(setup, circ, true_edges=p.planted, percents=None)
    assert res.faithfulness == pytest.approx(1.0, abs=1e-3) and res.completeness_ioi > 0.99  # the silent "complete"
    assert res.necessity == pytest.approx(1.0, abs=1e-3)
    missing = {c.name: c for c in res.missing_necessary}
    assert {"a0.0", "embed->a1.1.q", "a0.0->a1.1.k", "embed->a0.0.v"} == set(missing)
    assert missing["a0.0"].kind == "node" and missing["embed->a1.1.q"].kind == "edge"
    for c in missing.values():
        assert c.share == pytest.approx(0.5, abs=1e-3) and c.effect == pytest.approx(-0.5 * setup.effect, rel=1e-3)
    assert res.completeness == pytest.approx(0.5, abs=1e-3) and res.necessity_detail.n_unchecked == 0
    by = {s.metric: s for s in res.scores()}
    comp = by["completeness"].details
    assert comp["ioi_completeness"] == res.completeness_ioi and comp["largest_missing_share"] == pytest.approx(0.5,
                                                                                                              abs=1e-3)
    assert "necessary in the full model" in comp["why"] and len(comp["missing_necessary"]) == 4
    assert (comp["ablation"], comp["patch_type"], comp["metric"]) == ("resample", "edge", "logit_diff")
    assert by["necessity"].value == res.necessity and by["necessity"].details["metric"] == "logit_diff"
    assert "necessary but missing: " in res.summary()
    # the default search's circuit passes the same checks
    found = score_circuit(setup, find_circuit(setup, "eap-ig+noising", curve=False), percents=None)
    assert found.missing_necessary == [] and found.completeness > 0.99 and found.necessity > 0.99


def test_necessity_is_the_noising_view(planted) -> None:
    p, setup, _ = planted["induction"]
    g = setup.graph
    part = g.edge_ids(["a1.1->logits"])  # the direct path only: m1 still carries a third of the effect
    m = setup.evaluate(g.mask(part))
    assert necessity(setup, part) == pytest.approx((setup.m_clean - m) / setup.effect, abs=1e-6)
    assert necessity(setup, part) == pytest.approx(1 - faithfulness(setup, sorted(set(range(g.n_edges)) -
                                                                                   set(part))), abs=1e-6)
    assert necessity(setup, range(g.n_edges)) == pytest.approx(1.0) and necessity(setup, []) == 0.0
    out = necessary_outside(setup, part)
    names = [c.name for c in out]
    assert "a0.0" in names and "embed->a1.1.v" in names and "a1.1" not in names  # a1.1 is touched by the circuit
    assert not {"a0.1", "a0.2", "a0.3", "a1.0", "a1.2", "a1.3", "m0"} & set(names)  # distractors are not necessary
    assert [c.share for c in out] == sorted((c.share for c in out), reverse=True)
    assert necessary_outside(setup, g.edge_ids(p.planted)) == []
    assert necessary_outside(setup, part, tau=2.0) == []  # nothing moves the metric by twice the full effect


# ============================================================================= MIB curves
def test_cpr_cmd_rank_true_edges_first(planted) -> None:
    p, setup, scores = planted["induction"]
    truth = [1.0 if e in p.planted else 0.0 for e in scores.edges]
    perfect = scores.model_copy(update={"scores": truth})
    reverse = scores.model_copy(update={"scores": [1.0 - t for t in truth]})
    good, bad = cpr_cmd(setup, perfect), cpr_cmd(setup, reverse)
    assert good.cpr > 0.9 and bad.cpr < 0.3 and good.cmd < 0.1 and bad.cmd > 0.7
    assert [pt.faithfulness for pt in good.points] == pytest.approx(
        [pt.faithfulness for pt in faithfulness_curve(setup, perfect)], abs=1e-6)
    assert good.points[-1].faithfulness == pytest.approx(1.0) and good.points[0].n_edges == 1
    # known answer: with every planted edge ranked last, half the edges do nothing and all do everything:
    # trapezoid over x = 0.5 .. 1 of f = 0 .. 1 -> CPR = CMD = 0.5
    two = cpr_cmd(setup, reverse, percents=(50, 100))
    assert two.cpr == pytest.approx(0.5, abs=1e-3) and two.cmd == pytest.approx(0.5, abs=1e-3)
    # the ranking is by |score| unless signed: negating the scores changes nothing, then everything
    negated = perfect.model_copy(update={"scores": [-t for t in truth]})
    assert cpr_cmd(setup, negated).cpr == pytest.approx(good.cpr)
    assert cpr_cmd(setup, negated, signed=True).cpr < 0.3
    with pytest.raises(InputError, match="percents"):
        cpr_cmd(setup, perfect, percents=(10, 5))


# ============================================================================= against ground truth
def test_rank_auc_matches_sklearn_with_ties() -> None:
    rng = random.Random(1)
    for _ in range(20):
        n = rng.randrange(2, 60)
        values = [float(rng.randrange(0, 6)) for _ in range(n)]  # many ties
        labels = [rng.random() < 0.3 for _ in range(n)]
        if len(set(labels)) < 2:
            assert rank_auc(values, labels) is None
            continue
        assert rank_auc(values, labels) == pytest.approx(roc_auc_score(labels, values))
    assert rank_auc([3.0, 1.0, 2.0], [True, False, False]) == 1.0
    assert rank_auc([1.0, 1.0], [True, False]) == 0.5


def test_recall_precision_and_unknown_truth(planted) -> None:
    _, _, scores = planted["induction"]
    truth = ["a1.1->logits", " m1->logits", "embed->a0.0.v"]  # names are canonicalised
    assert recall(["a1.1->logits", "a0.3->m1"], truth) == pytest.approx(1 / 3)
    assert precision(["a1.1->logits", "a0.3->m1"], truth) == pytest.approx(1 / 2)
    assert precision([], truth) is None and recall(["a1.1->logits"], []) is None
    with pytest.raises(InputError, match="not edges of this graph"):
        edge_roc_auc(scores, ["a5.0->logits"])
    with pytest.raises(InputError, match="malformed edge"):
        recall(["a1.1=>logits"], truth)


# ============================================================================= rows for the store
def test_score_rows_carry_the_setup_and_have_stable_ids(planted, tmp_path) -> None:
    p, setup, scores = planted["suppression"]
    res = score_circuit(setup, _circuit(scores, set(p.planted)), true_edges=p.planted)
    rows = circuit_score_rows(res, "xc1")
    assert [s.metric for s in res.scores()] == [r["metric"] for r in rows]  # the domain scores, bound to xc1
    assert {r["metric"] for r in rows} == METRICS and len(rows) == len(METRICS)
    for r in rows:
        d = r["details"]
        assert (d["ablation"], d["patch_type"], d["metric"]) == ("resample", "edge", "logit_diff"), r["metric"]
        assert re.fullmatch(r"[0-9a-f]{24}", r["score_id"]) and r["score_id"] == score_id("xc1", r["metric"])
        assert r["created_at"].tzinfo is None and r["explanation_id"] == "xc1" and isinstance(r["n"], int)
        json.dumps(d)
    by = {r["metric"]: r for r in rows}
    assert by["completeness"]["value"] == res.completeness and by["cpr"]["details"]["percents"][0] == 0.1
    assert [r["score_id"] for r in circuit_score_rows(res, "xc1")] == [r["score_id"] for r in rows]  # deterministic
    assert not {r["score_id"] for r in circuit_score_rows(res, "xc2")} & {r["score_id"] for r in rows}
    tagged = circuit_score_rows(res, "xc1", "circ-1")  # the circuits row the scores belong to: same ids
    assert [r["score_id"] for r in tagged] == [r["score_id"] for r in rows]
    assert all(r["details"] == {**o["details"], "circuit_id": "circ-1"} for r, o in zip(tagged, rows, strict=True))
    assert len({r["score_id"] for r in rows}) == len(rows)
    bare = score_circuit(setup, _circuit(scores, set(p.planted)), percents=None)
    assert {r["metric"] for r in circuit_score_rows(bare, "xc1")} == METRICS - {
        "cpr", "cmd", "edge_roc_auc", "edge_recall", "edge_precision"}
    assert "Intervention-level" in res.summary() and len(res.summary()) < 1000
    assert CircuitScores.model_validate_json(res.model_dump_json()) == res
    from autoexplain.agent.store import Store

    store = Store(tmp_path / "scores.duckdb")
    store.upsert("scores", rows)
    store.upsert("scores", circuit_score_rows(res, "xc1"))  # idempotent on the same ids
    _, got = store.query("select count(*), count(distinct details->>'ablation') from scores")
    assert got == [(len(METRICS), 1)]


def test_a_circuit_from_another_graph_is_refused(planted) -> None:
    _, setup, _ = planted["induction"]
    other = planted["suppression"][2].model_copy(update={"edges": ["embed->a0.0.q"] * 110})
    with pytest.raises(InputError, match="another graph"):
        score_circuit(setup, _circuit(other, {"embed->a0.0.q"}))
    with pytest.raises(InputError, match="not edges of this graph"):  # refused before any evaluation
        score_circuit(setup, _circuit(planted["induction"][2], {"a1.1->logits"}), true_edges=["a5.0->logits"])


def test_scores_a_found_circuit_on_the_tiny_toy_world(tiny_zoo) -> None:
    from autoexplain.tools.data import load_task_file, tokenize_task
    from autoexplain.tools.loading import load_model

    lm = load_model("toy:tiny", device="cpu")
    task = tokenize_task(load_task_file(tiny_zoo.task_file("induction")), lm.tokenizer, n_ctx=lm.n_ctx)
    setup = PatchSetup(lm, task)
    circ = find_circuit(setup, "eap-ig", top_k=20, curve=False)
    res = score_circuit(setup, circ, n_subsets=8)
    assert res.n_edges == 20 and res.faithfulness == pytest.approx(faithfulness(setup, circ), abs=1e-6)
    assert 0 <= res.completeness <= 1 and 0 <= res.succinctness < 1 and res.cmd >= 0
    assert res.completeness_detail.n_random == 8 and all(torch.isfinite(torch.tensor(
        [res.cpr, res.cmd, res.completeness_mean_gap])))


def test_a_task_the_model_does_not_do_is_no_behaviour_and_its_scores_are_unscored(tiny_zoo) -> None:
    """The tiny toy model gives induction prompts almost the same logit difference clean and corrupt: every
    circuit score would measure noise, so each is stored as None with the reason and the measured value."""
    from autoexplain.tools.data import load_task_file, tokenize_task
    from autoexplain.tools.loading import load_model

    lm = load_model("toy:tiny", device="cpu")
    task = tokenize_task(load_task_file(tiny_zoo.task_file("induction")), lm.tokenizer, n_ctx=lm.n_ctx)
    setup = PatchSetup(lm, task)
    assert abs(setup.effect) < 0.1
    res = score_circuit(setup, find_circuit(setup, "eap", top_k=10, curve=False), n_subsets=4, percents=None)
    assert res.no_behaviour
    by = {s.metric: s for s in res.scores()}
    for metric in ("correctness", "completeness", "succinctness", "faithfulness"):
        assert by[metric].value is None and "no behaviour" in by[metric].details["unscored"], metric
        assert by[metric].details["measured"] is not None
    assert by["full_effect"].value == pytest.approx(setup.m_clean - setup.m_ablated)
