"""Circuit search: known-answer planted models (EAP-IG and ACDC recover the planted edges), ACDC resume,
selection and faithfulness, the catalogue, the tool, and the ``autoexplain circuit`` command (bad inputs and an
end-to-end run on the tiny toy world)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from sklearn.metrics import roc_auc_score

from autoexplain.evals.truth.planted_circuits import PlantedCircuit, induction, induction_and, suppression
from autoexplain.tools.circuits import (
    CURVE_PERCENTS,
    METHODS,
    CircuitSearchIn,
    CircuitSearchOut,
    EdgeScores,
    Method,
    SearchConfig,
    default_metric,
    evaluate_masks,
    faithfulness,
    find_circuit,
    necessity,
    noising_scan,
    prune_dangling,
    register,
    score_edges,
)
from autoexplain.tools.errors import InputError
from autoexplain.tools.patching import PatchSetup
from autoexplain.tools.registry import SUMMARY_MAX_CHARS, ToolContext, default_registry
from autoexplain.tools.vocab import Edge

from cli_support import CLI, assert_input_error, cli_env, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def planted() -> dict[str, PlantedCircuit]:
    return {"induction": induction(), "suppression": suppression(), "induction_and": induction_and(),
            "induction_and_sharp": induction_and(sharpness=40)}


#: Heads and MLPs that carry nothing to the answer under resample ablation (planted_circuits.py): no circuit edge may
#: touch them.
DISTRACTOR_NODES = {"induction": {"a0.1", "a0.2", "a0.3", "a1.0", "a1.2", "a1.3", "m0"},
                    "suppression": {"a0.0", "a0.2", "a0.3", "a1.0", "a1.1", "a1.3", "m0", "m1"}}


def _auc(p: PlantedCircuit, scores: EdgeScores) -> float:
    return roc_auc_score([e in p.planted for e in scores.edges], [abs(s) for s in scores.scores])


# ============================================================================= known answers
@pytest.mark.parametrize("name", ["induction", "suppression"])
@pytest.mark.parametrize("method", ["eap-ig", "acdc", "eap-ig+noising"])
def test_planted_circuits_are_recovered(planted, name, method) -> None:
    p = planted[name]
    setup = PatchSetup(p.lm, p.task, metric=default_metric(method, p.task))
    # the planted circuit alone is fully faithful, and every planted edge matters on its own
    g = setup.graph
    assert faithfulness(setup, g.edge_ids(p.planted)) == pytest.approx(1.0, abs=1e-4)
    circ = find_circuit(setup, method)
    auc = _auc(p, circ.scores)
    assert auc >= 0.98, (name, method, auc)
    assert p.planted <= set(circ.edges), (name, method, p.planted - set(circ.edges))
    assert circ.faithfulness >= 0.95
    assert circ.curve[-1].faithfulness == pytest.approx(1.0, abs=1e-5) and len(circ.curve) == len(CURVE_PERCENTS)


@pytest.mark.parametrize("name", ["induction", "induction_and", "induction_and_sharp", "suppression"])
def test_default_search_finds_every_planted_edge_and_no_distractor(planted, name) -> None:
    """The default search (EAP-IG + noising checks) on every planted model, the AND gate sharp and soft: every planted
    edge, no edge touching a distractor, the ranking near perfect, the circuit a graph from embed to logits."""
    p = planted[name]
    setup = PatchSetup(p.lm, p.task, metric=default_metric(Method.EAP_IG_NOISING, p.task))
    assert setup.metric.value == "logit_diff"
    circ = find_circuit(setup, CircuitSearchIn.model_fields["method"].default, curve=False)
    assert circ.scores.method is Method.EAP_IG_NOISING
    kept = {str(e) for e in circ.edges}
    assert p.planted <= kept, p.planted - kept
    distractors = DISTRACTOR_NODES["suppression" if name == "suppression" else "induction"]
    touching = {e for e in circ.edges if {str(e.src), str(e.dst)} & distractors}
    assert not touching, touching
    assert _auc(p, circ.scores) >= 0.98
    assert circ.faithfulness >= 0.95 and circ.necessity is not None and circ.necessity >= 0.95
    assert prune_dangling(setup, circ.scores.select()) == sorted(setup.graph.edge_ids(kept))


def test_eap_ig_misses_the_sharp_and_gate_and_noising_finds_it(planted) -> None:
    """The issue: at sharpness 40 the induction head's softmax saturates along EAP-IG's whole path, so EAP-IG keeps
    only the value path (sufficient: faithfulness 1) and misses the query, the key and the previous-token head; each
    of them, noised alone in the full model, moves the logit difference by half the effect."""
    p = planted["induction_and_sharp"]
    setup = PatchSetup(p.lm, p.task)
    gate = {"embed->a1.1.q", "a0.0->a1.1.k", "embed->a0.0.v"}
    ig = find_circuit(setup, "eap-ig", curve=False)
    assert not gate & {str(e) for e in ig.edges} and ig.faithfulness == pytest.approx(1.0, abs=1e-3)
    found = find_circuit(setup, "eap-ig+noising", curve=False)
    d = found.scores.details
    assert set(d["raised_by_noising"]) == gate and d["necessary_nodes"] == ["a0.0", "a1.1", "m1"]
    g = setup.graph
    for name in gate:  # the combined score of a raised edge is its measured noising effect
        e = g.index[name]
        assert found.scores.scores[e] == pytest.approx(setup.evaluate(g.mask([e])) - setup.m_clean, abs=1e-6)
        assert found.scores.scores[e] == pytest.approx(-0.5 * setup.effect, rel=1e-3)
    # edges EAP-IG selected keep their EAP-IG score
    for e in ig.scores.select():
        assert found.scores.scores[e] == ig.scores.scores[e]
    assert d["noising_passes"] == d["noising_checked"] + 10 and d["n_unchecked"] == 0


def test_noising_budget_is_honoured_and_reported(planted) -> None:
    p = planted["induction_and_sharp"]
    setup = PatchSetup(p.lm, p.task)
    scores = score_edges(setup, "eap-ig+noising", SearchConfig(noising_edges=0))
    d = scores.details
    # only the edges into logits (no forward pass) are checked: the gate's inputs stay unchecked, and it says so
    assert d["noising_budget"] == 0 and d["n_unchecked"] > 0 and "embed->a1.1.q" in d["unchecked"]
    assert not {"embed->a1.1.q", "a0.0->a1.1.k"} & {setup.graph.names[i] for i in scores.select()}
    assert all(name.endswith("->logits") for name in d["raised_by_noising"])
    with pytest.raises(InputError, match="max_edges"):
        noising_scan(setup, max_edges=-1)


def test_prune_dangling_removes_only_edges_that_cannot_matter(planted) -> None:
    p = planted["induction"]
    g = PatchSetup(p.lm, p.task).graph
    setup = PatchSetup(p.lm, p.task)
    planted_ids = g.edge_ids(p.planted)
    dead_end = g.edge_ids(["embed->a1.0.q", "a0.0->a1.0.k"])  # into a1.0, whose output is not kept
    unfed = g.edge_ids(["a0.2->logits"])  # out of a0.2, whose inputs are all patched
    keep = planted_ids + dead_end + unfed
    assert prune_dangling(setup, keep) == sorted(planted_ids)
    assert faithfulness(setup, keep) == pytest.approx(faithfulness(setup, planted_ids), abs=1e-5)
    # under zero ablation a node with all inputs zeroed computes f(0), not 0: its outgoing edges stay
    zero = PatchSetup(p.lm, p.task, ablation="zero")
    assert prune_dangling(zero, keep) == sorted(planted_ids + unfed)
    assert prune_dangling(setup, []) == []
    circ = find_circuit(setup, "eap-ig", top_k=12, curve=False, prune=True)
    assert circ.n_edges <= 12 and set(circ.pruned).isdisjoint({str(e) for e in circ.edges})
    assert circ.n_edges + len(circ.pruned) == 12


def test_noising_scan_and_necessity_are_measured_values(planted) -> None:
    p = planted["induction"]
    setup = PatchSetup(p.lm, p.task)
    g = setup.graph
    scan = noising_scan(setup)
    assert scan.necessary_nodes == ["a0.0", "a1.1", "m1"]
    for node in DISTRACTOR_NODES["induction"]:
        assert abs(scan.node_effects[node]) < 1e-4, node
    assert set(scan.necessary_edges()) == set(p.planted)  # noising alone finds the planted circuit here
    for name, value in list(scan.edge_effects.items())[:6]:
        e = g.index[name]
        assert value == pytest.approx(setup.evaluate(g.mask([e])) - setup.m_clean, abs=1e-6)
    masks = [g.mask(range(k, g.n_edges, 5)) for k in range(3)] + [g.mask(g.edge_ids(["m1->logits"]))]
    assert evaluate_masks(setup, masks) == pytest.approx([setup.evaluate(m) for m in masks], abs=1e-5)
    keep = g.edge_ids(p.planted)
    assert necessity(setup, keep) == pytest.approx(1.0, abs=1e-3)
    assert necessity(setup, []) == 0.0
    half = g.edge_ids(["m1->logits"])
    assert necessity(setup, half) == pytest.approx((setup.m_clean - setup.evaluate(g.mask(half))) / setup.effect)


def test_eap_is_blind_where_attention_saturates(planted) -> None:
    """Plain EAP (the gradient at the clean run) misses the duplicate-token head's query: its softmax is saturated.
    EAP-IG, integrating from the corrupt input, does not (the test above)."""
    p = planted["suppression"]
    circ = find_circuit(PatchSetup(p.lm, p.task), "eap", curve=False)
    assert "embed->a0.1.q" not in circ.edges and _auc(p, circ.scores) >= 0.98


def test_constant_head_is_blamed_by_zero_ablation_only(planted) -> None:
    p = planted["suppression"]
    head = p.constant_head
    resample = PatchSetup(p.lm, p.task, metric="kl")
    g = resample.graph
    chunk = resample.chunks[0]
    gi = next(i for i, sg in enumerate(g.src_groups) if sg.kind == "heads" and sg.layer == 1)
    h = int(head.split(".")[1])
    ar = torch.arange(chunk.size)
    delta = resample.chunks[0].delta_src[gi][ar, chunk.pos, h]  # corrupt - clean output at the answer
    out = (resample.chunks[0].patched_src[gi][ar, chunk.pos, h])
    assert delta.abs().max() < 1e-4 and out.norm(dim=-1).min() > 3  # identical on clean and corrupt, and large
    zero = PatchSetup(p.lm, p.task, metric="kl", ablation="zero")
    edge = g.edge_ids([f"{head}->logits"])
    # zero-ablating the one edge head -> logits moves the output as much as zero-ablating everything (KL 0.84
    # vs 0.81 nats); resample-ablating it changes nothing
    assert zero.evaluate(g.mask(edge)) > 0.5 * zero.m_ablated > 0.3
    assert resample.evaluate(g.mask(edge)) < 1e-6
    for method in ("eap-ig", "acdc"):
        assert f"{head}->logits" in find_circuit(zero, method, curve=False).edges  # zero ablation blames it
        assert f"{head}->logits" not in find_circuit(resample, method, curve=False).edges  # resample does not


# ============================================================================= ACDC resume
def test_acdc_resumes_where_it_stopped(planted, tmp_path) -> None:
    p = planted["induction"]
    setup = PatchSetup(p.lm, p.task, metric="kl")
    whole = score_edges(setup, "acdc", SearchConfig())
    ckpt = tmp_path / "acdc.json"
    part = score_edges(setup, "acdc", SearchConfig(checkpoint=ckpt, max_receivers=4))
    assert not part.complete and part.details["receivers_done"] == 4
    state = json.loads(ckpt.read_text())
    assert state["next_receiver"] == 4 and state["receiver_done"] == "a1.2"  # logits, m1, a1.3, a1.2
    resumed = score_edges(setup, "acdc", SearchConfig(checkpoint=ckpt))
    assert resumed.complete and resumed.details["resumed_at_receiver"] == 4
    assert resumed.scores == whole.scores
    assert resumed.select(threshold=0.02) == whole.select(threshold=0.02)
    assert resumed.details["passes"] == whole.details["passes"]
    with pytest.raises(InputError, match="belongs to another search"):
        score_edges(setup, "acdc", SearchConfig(checkpoint=ckpt, threshold=0.5))
    # speculation (several removals per batched pass, the CUDA default) makes the same decisions
    spec = score_edges(setup, "acdc", SearchConfig(speculate=4))
    assert spec.select(threshold=0.02) == whole.select(threshold=0.02)
    assert spec.scores == pytest.approx(whole.scores, abs=1e-5) and spec.details["passes"] > whole.details["passes"]
    g = setup.graph
    masks = torch.stack([g.mask(range(k, g.n_edges, 7)) for k in range(5)])
    assert setup.evaluate_many(masks, start_layer=0) == pytest.approx([setup.evaluate(m) for m in masks], abs=1e-5)
    ckpt.write_text("{not json")
    with pytest.raises(InputError, match="unreadable"):
        score_edges(setup, "acdc", SearchConfig(checkpoint=ckpt))


# ============================================================================= selection, catalogue, tool
def test_selection_and_faithfulness(planted) -> None:
    p = planted["induction"]
    setup = PatchSetup(p.lm, p.task)
    scores = score_edges(setup, "eap-ig")
    assert len(scores.select(top_k=6)) == 6 and set(scores.select(top_k=6)) == set(scores.select())
    assert scores.select(threshold=0.0) == [i for i, s in enumerate(scores.scores) if s != 0]
    with pytest.raises(InputError, match="not both"):
        scores.select(top_k=3, threshold=0.1)
    with pytest.raises(InputError, match="not both"):
        find_circuit(setup, "eap", top_k=3, threshold=0.1)
    with pytest.raises(InputError, match="top_k must be between"):
        find_circuit(setup, "eap", top_k=10_000)
    assert faithfulness(setup, range(setup.graph.n_edges)) == pytest.approx(1.0)
    assert faithfulness(setup, []) == pytest.approx(0.0)
    circ = find_circuit(setup, "eap-ig", top_k=3)
    assert circ.n_edges == 3 and circ.threshold is None
    assert sorted(circ.ranks()) == list(range(1, setup.graph.n_edges + 1))
    same = PatchSetup(p.lm, type(p.task)(**{**p.task.__dict__, "corrupt": p.task.clean}))
    with pytest.raises(InputError, match="nothing to explain"):
        score_edges(same, "eap")


def test_catalogue_and_tool(tiny_model) -> None:
    assert set(METHODS) == set(Method)
    with pytest.raises(ValueError, match="already registered"):
        register(Method.EAP)(lambda setup, config: None)  # type: ignore[arg-type,return-value]
    reg = default_registry()
    assert {"activation_patching", "edge_patching", "circuit_search"} <= {t.name for t in reg}
    ctx = ToolContext(model=tiny_model)
    prompts = [{"clean": "John gave a drink to", "corrupt": "Mary gave a drink to", "answers": [" Mary"],
                "wrong_answers": [" John"]},
               {"clean": "the cat sat on the", "corrupt": "the dog sat on the", "answers": [" mat"]}]
    out = reg.call(ctx, "circuit_search", {"prompts": prompts, "method": "acdc", "top_k": 5, "curve": False})
    assert out.metric.value == "kl" and out.n_edges == 5 and len(out.edges) == 5 and out.n_edges_total == 110
    out = reg.call(ctx, "circuit_search", {"prompts": prompts, "steps": 3})  # no wrong answers everywhere
    assert out.method is Method.EAP_IG_NOISING and out.necessity is not None
    assert out.metric.value == "answer_prob" and len(out.summary()) <= SUMMARY_MAX_CHARS
    assert "faithfulness" in out.summary() and len(out.curve) == len(CURVE_PERCENTS)
    assert f"necessity {out.necessity:.3f}" in out.summary() and "noising:" in out.summary()
    assert out.circuit().necessity == out.necessity
    # outputs cached before necessity was measured still load, with necessity None ("not measured")
    old = json.loads(out.model_dump_json())
    del old["necessity"], old["pruned"]
    legacy = CircuitSearchOut.model_validate_json(json.dumps(old))
    assert legacy.necessity is None and "necessity not measured" in legacy.summary()
    # typed edges in Python, the edge strings in JSON (the tool cache), and back
    assert isinstance(out.edges[0].edge, Edge) and out.all_scores is not None
    dumped = json.loads(out.model_dump_json())
    assert dumped["edges"][0]["edge"] == str(out.edges[0].edge)
    assert dumped["all_scores"]["edges"] == [str(e) for e in out.all_scores.edges]
    again = type(out).model_validate_json(out.model_dump_json())
    assert again == out and isinstance(again.all_scores.edges[0], Edge)
    with pytest.raises(InputError, match="top_k or threshold, not both"):
        reg.call(ctx, "circuit_search", {"prompts": prompts, "top_k": 3, "threshold": 0.1})


# ============================================================================= the command line
def _run_e2e(root: Path, cache: Path, task: Path) -> subprocess.CompletedProcess[str]:
    env = {**cli_env(root), "AUTOEXPLAIN_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    return subprocess.run([*CLI, "circuit", "--model", "toy:tiny", "--task", str(task), "--db", "out.duckdb",
                           "--device", "cpu"], cwd=root, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, tiny_zoo):
    """The circuit command's cases, started together (each pays ~6 s of imports in a fresh interpreter)."""
    root = tmp_path_factory.mktemp("circuit-cli")
    good = json.dumps({"prompts": [{"clean": "a b", "corrupt": "a c", "answers": [" d"]}]})
    cases = {}
    for name in ("both", "malformed", "missing_field", "e2e"):
        (root / name).mkdir()
    (root / "malformed" / "task.json").write_text("{\"prompts\": [")
    (root / "missing_field" / "task.json").write_text(json.dumps({"prompts": [{"clean": "a"}]}))
    (root / "both" / "task.json").write_text(good)
    cache = Path(os.environ["AUTOEXPLAIN_CACHE"])
    with ThreadPoolExecutor(max_workers=4) as pool:
        cases["e2e"] = pool.submit(_run_e2e, root / "e2e", cache, tiny_zoo.task_file("induction"))
        for name, extra in (("both", ["--top-k", "3", "--threshold", "0.1"]), ("malformed", []),
                            ("missing_field", [])):
            cases[name] = pool.submit(run_cli, ["circuit", "--model", "toy:tiny", "--task", "task.json",
                                                "--db", "out.duckdb", *extra], root / name)
        done = {k: f.result() for k, f in cases.items()}
    done["root"] = root
    return done


def test_cli_refuses_bad_input_before_writing(cli_runs) -> None:
    assert_input_error(cli_runs["both"], "--top-k or --threshold, not both")
    assert_input_error(cli_runs["malformed"], "task.json", "not valid JSON")
    assert_input_error(cli_runs["missing_field"], "task.json", "prompts[0].corrupt")


def test_cli_stores_a_circuit_on_the_toy_world(cli_runs) -> None:
    import duckdb

    res = cli_runs["e2e"]
    assert res.returncode == 0, res.stderr[-2000:]
    assert "faithfulness" in res.stdout and "eap-ig+noising circuit for induction" in " ".join(res.stdout.split())
    con = duckdb.connect(str(cli_runs["root"] / "e2e" / "out.duckdb"), read_only=True)
    try:
        (cid, method, ablation, patch, metric, n, total, faith, details), = con.execute(
            "select circuit_id, method, ablation, patch_type, metric, n_edges, n_edges_total, faithfulness, details "
            "from circuits").fetchall()
        assert (method, ablation, patch, metric, total) == ("eap-ig+noising", "resample", "edge", "logit_diff", 110)
        rows = con.execute("select count(*), sum(in_circuit::int), count(distinct rank) from circuit_edges "
                           "where circuit_id = ?", [cid]).fetchall()
        assert rows == [(total, n, total)]  # every scored edge is stored; the circuit's rows are among them
        assert 0 < n < total
        printed = float(re.search(r"faithfulness\)? (-?[\d.]+)", res.stdout)[1])  # what the user was told is stored
        assert faith == pytest.approx(printed, abs=5e-4)
        assert len(json.loads(details)["curve"]) == len(CURVE_PERCENTS)
        (status, kind), = con.execute("select status, kind from runs").fetchall()
        assert (status, kind) == ("done", "circuit")
    finally:
        con.close()

