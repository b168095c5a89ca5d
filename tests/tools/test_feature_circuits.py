"""Sparse feature circuits: the planted model's known circuit (nodes and edges recovered, ROC AUC, attribution equal
to ablation on its linear path, the head that carries the edge, an SAE that misses the mechanism so the error term
must carry it), scores by ablation, storage, and the toy world's ioi and induction circuits with both SAEs."""

from __future__ import annotations

import pytest
import torch

from autoexplain.evals.feature_circuits import edge_roc_auc, node_roc_auc, score_feature_circuit
from autoexplain.evals.truth.planted_feature_circuits import A, V, build, planted_sae
from autoexplain.tools.errors import InputError
from autoexplain.tools.feature_circuits import (
    FeatureCircuitConfig,
    FeatureCircuitOut,
    SplicedModel,
    find_feature_circuit,
)
from autoexplain.tools.registry import SUMMARY_MAX_CHARS


@pytest.fixture(scope="module")
def planted():
    return build(n_prompts=12)


def test_planted_circuit_is_recovered(planted) -> None:
    sm = SplicedModel(planted.lm, planted.task, planted.saes)
    full = find_feature_circuit(planted.lm, planted.task, planted.saes,
                                FeatureCircuitConfig(node_threshold=0.0, all_edges=True), spliced=sm)
    assert node_roc_auc(full, planted.nodes) >= 0.98
    assert edge_roc_auc(sm, full, planted.edges) >= 0.98
    # IG completeness of the edge pass: the direct edges of every node into logits add up to m(M) - m(∅)
    assert sum(e.weight for e in full.edges if e.dst == "logits") == pytest.approx(full.effect, abs=1e-5)
    fc = find_feature_circuit(planted.lm, planted.task, planted.saes, spliced=sm)
    assert fc.kept_keys() == planted.nodes - {"logits"}
    assert {f"{e.src}->{e.dst}" for e in fc.circuit_edges()} == planted.edges
    assert fc.m_clean == pytest.approx(3.0) and fc.m_ablated == pytest.approx(0.0, abs=1e-6)
    assert fc.faithfulness == pytest.approx(1.0, abs=1e-5)
    scores = score_feature_circuit(sm, fc)
    assert scores.necessity == pytest.approx(1.0, abs=1e-5) and scores.completeness == pytest.approx(1.0, abs=1e-5)
    assert scores.n_nodes == 3 and scores.n_knockouts >= 5
    out = FeatureCircuitOut(circuit=fc)
    assert len(out.summary()) <= SUMMARY_MAX_CHARS and f"{planted.saes[0].sae_id}#{A}" in out.summary()


def test_attribution_equals_ablation_on_the_linear_path(planted) -> None:
    sm = SplicedModel(planted.lm, planted.task, planted.saes)
    fc = find_feature_circuit(planted.lm, planted.task, planted.saes, FeatureCircuitConfig(node_threshold=0.0),
                              spliced=sm)
    keys = [n.key for n in fc.nodes if n.node.kind.value == "feature"]
    ablated = sm.evaluate([[k] for k in keys], invert=[True] * len(keys))  # one node at its corrupt value
    effects = {n.key: n.effect for n in fc.nodes}
    for key, m in zip(keys, ablated, strict=True):
        assert effects[key] == pytest.approx(fc.m_clean - m, abs=1e-5), key
    w = {(e.src, e.dst): e.weight for e in fc.edges}
    r0, r1 = planted.saes[0].sae_id, planted.saes[1].sae_id
    assert w[(f"{r0}#{A}", f"{r1}#{V}")] == pytest.approx(3.0, abs=1e-5)


def test_the_planted_head_carries_the_edge() -> None:
    pc = build(n_prompts=6)
    assert pc.head == "a1.0"
    with torch.no_grad():
        pc.lm.model.blocks[1].attn.W_O[1].zero_()  # silencing the distractor a1.1 changes nothing
    fc = find_feature_circuit(pc.lm, pc.task, pc.saes)
    assert {f"{e.src}->{e.dst}" for e in fc.circuit_edges()} == pc.edges
    with torch.no_grad():
        pc.lm.model.blocks[1].attn.W_O[0].zero_()  # silencing a1.0 removes the behaviour
    with pytest.raises(InputError, match="no behaviour"):
        find_feature_circuit(pc.lm, pc.task, pc.saes)


def test_error_term_carries_what_the_sae_misses(planted) -> None:
    """res1 without the OUT feature: the mechanism lives in its error term, which must be a node of the circuit
    (ablating everything outside, error terms included, would otherwise claim faithfulness it does not have)."""
    saes = [planted.saes[0], planted_sae("narrow-res1", 1, V)]
    fc = find_feature_circuit(planted.lm, planted.task, saes)
    assert fc.kept_keys() == {"embed", f"{saes[0].sae_id}#{A}", "narrow-res1#err"}
    assert fc.faithfulness == pytest.approx(1.0, abs=1e-5)
    err = next(n for n in fc.nodes if n.key == "narrow-res1#err")
    assert err.effect == pytest.approx(3.0, abs=1e-5)


def test_per_position_nodes(planted) -> None:
    fc = find_feature_circuit(planted.lm, planted.task, planted.saes, FeatureCircuitConfig(per_position=True))
    r0, r1 = planted.saes[0].sae_id, planted.saes[1].sae_id
    assert fc.kept_keys() == {"embed@1", f"{r0}#{A}@1", f"{r1}#{V}@4"}
    assert {(e.src, e.dst) for e in fc.circuit_edges()} == {("embed@1", f"{r0}#{A}@1"),
                                                           (f"{r0}#{A}@1", f"{r1}#{V}@4"), (f"{r1}#{V}@4", "logits")}
    assert fc.faithfulness == pytest.approx(1.0, abs=1e-5)


def test_bad_inputs(planted) -> None:
    with pytest.raises(InputError, match="at least one SAE"):
        SplicedModel(planted.lm, planted.task, [])
    with pytest.raises(InputError, match="same SAE"):
        SplicedModel(planted.lm, planted.task, [planted.saes[0], planted.saes[0]])
    with pytest.raises(InputError, match="same site"):
        SplicedModel(planted.lm, planted.task, [planted.saes[0], planted_sae("other", 0, V)])
    with pytest.raises(InputError, match="thresholds"):
        find_feature_circuit(planted.lm, planted.task, planted.saes, FeatureCircuitConfig(node_threshold=-1))


def test_rows_round_trip_with_labels(planted, tmp_path) -> None:
    from autoexplain.agent.store import Store, queries
    from autoexplain.agent.store.rows import feature_circuit_id, feature_circuit_rows, utc_now

    sm = SplicedModel(planted.lm, planted.task, planted.saes)
    fc = find_feature_circuit(planted.lm, planted.task, planted.saes, spliced=sm)
    scores = score_feature_circuit(sm, fc)
    fid = feature_circuit_id(fc.model_id, "t", fc.saes, {"x": 1})
    store = Store(tmp_path / "fc.duckdb")
    store.upsert_many(feature_circuit_rows(fid, "run-1", "planted", fc, scores))
    r0 = planted.saes[0].sae_id
    store.upsert("explanations", [{"explanation_id": "e1", "run_id": "run-1", "item_id": "i1",
                                   "target": f"{r0}#{A}", "text": "the token A", "author": "offline",
                                   "causal_level": "association", "is_final": True, "overall": 0.8,
                                   "created_at": utc_now()}])
    rec = queries.feature_circuit_record(store, fid)
    assert rec is not None and rec.n_nodes == 3 and rec.faithfulness == pytest.approx(1.0, abs=1e-5)
    assert rec.saes == fc.saes and rec.sites == ["resid_post.0", "resid_post.1"]
    nodes = queries.feature_circuit_nodes(store, fid)
    assert [n.node for n in nodes][0] in {"embed", f"{r0}#{A}"} and len(nodes) == 3
    by = {n.node: n for n in nodes}
    assert by[f"{r0}#{A}"].label == "the token A" and by[f"{planted.saes[1].sae_id}#{V}"].label is None
    assert len(queries.feature_circuit_edges(store, fid)) == 3
    assert queries.feature_circuit_listing(store)[0][0] == fid


@pytest.mark.parametrize("task_name", ["ioi", "induction"])
def test_toy_world_feature_circuits(tiny_zoo, task_name: str) -> None:
    from autoexplain.tools.data import load_task_file, tokenize_task
    from autoexplain.tools.loading import load_model, load_sae

    lm = load_model("toy:tiny", device="cpu")
    saes = [load_sae("toy:tiny/res0", lm), load_sae("toy:tiny/mlp1", lm)]
    task = tokenize_task(load_task_file(tiny_zoo.task_file(task_name)), lm.tokenizer, n_ctx=lm.n_ctx)
    task = task.subset(list(range(12)))
    sm = SplicedModel(lm, task, saes)
    try:
        fc = find_feature_circuit(lm, task, saes, FeatureCircuitConfig(steps=4), spliced=sm)
    except InputError as exc:  # the tiny model may not tell clean from corrupt at all: then it must say so
        assert "no behaviour" in str(exc)
        return
    assert fc.saes == [s.sae_id for s in saes] and fc.n_prompts == 12
    assert fc.faithfulness is not None and abs(fc.faithfulness) < 50
    scores = score_feature_circuit(sm, fc, n_subsets=2, max_single=4)
    assert scores.faithfulness == pytest.approx(fc.faithfulness, abs=1e-6)
    assert 0 <= (scores.completeness or 0) <= 1
    sites = {n.node.site for n in fc.nodes if n.node.site is not None}
    assert {str(s) for s in sites} == {"resid_pre.0", "resid_post.0", "mlp_out.1"}
    # the direct edges of every node into logits add up to m(M) - m(∅) (IG's completeness over all the leaves)
    from autoexplain.tools.attribution import ig_alphas
    from autoexplain.tools.feature_circuits import edge_weights, node_effects

    _, _, grads = node_effects(sm, ig_alphas("ig", 2))
    every = {n.key for n in fc.nodes}
    w = edge_weights(sm, grads, [], every, False, ig_alphas("ig", 16))
    assert sum(v for (_, d), v in w.items() if d == "logits") == pytest.approx(fc.effect, rel=0.03)
    # the IG node effects of one site add up to that site's whole effect (completeness axiom) up to Riemann error
    total = sum(n.effect for n in fc.nodes if n.key.startswith(saes[0].sae_id))
    embed = next(n.effect for n in fc.nodes if n.key == "embed")
    assert total == pytest.approx(embed, rel=0.25, abs=0.05 * abs(fc.effect))


def test_the_registered_tool(tiny_zoo) -> None:
    from autoexplain.tools.loading import load_model, load_sae
    from autoexplain.tools.registry import ToolContext, default_registry

    lm = load_model("toy:tiny", device="cpu")
    saes = [load_sae("toy:tiny/res0", lm), load_sae("toy:tiny/mlp1", lm)]
    ctx = ToolContext(model=lm, saes={s.sae_id: s for s in saes})
    out = default_registry().call(ctx, "feature_circuit", {"task_file": str(tiny_zoo.task_file("induction")),
                                                           "steps": 2, "part": "fit"})
    assert isinstance(out, FeatureCircuitOut) and set(out.circuit.saes) == set(ctx.saes)
    assert out.circuit.n_prompts == 20 and len(out.summary()) <= SUMMARY_MAX_CHARS
    with pytest.raises(InputError, match="unknown sae_id"):
        default_registry().call(ctx, "feature_circuit", {"task_file": str(tiny_zoo.task_file("induction")),
                                                         "sae_ids": ["nope"]})
