"""The agent explains a circuit as a mechanism, end to end, on planted models nobody tuned the search to.

The AND-gate induction model (``induction_and``, sharpness 40): clean and corrupt are two different repeated random
sequences, so the induction head attends to the same positions on both and its query and key matter only jointly.
EAP-IG alone misses the previous-token head and both Q/K inputs there while faithfulness reads 1.0. The agent's
default search must recover them, and its explanation must name the previous-token head, the K-composition and the
induction head, each claim checked by intervention, every score computed on held-out prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autoexplain.agent.runner import CircuitEntry, Plan, Prepared, run_plan
from autoexplain.agent.store import Store

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(tmp_path: Path, pc, **entry) -> tuple[Store, object]:
    from autoexplain.evals.truth.planted_circuits import with_tokenizer

    lm, task = with_tokenizer(pc)
    path = tmp_path / f"{pc.name}.json"
    path.write_text(task.model_dump_json())
    job = CircuitEntry(task=str(path), **entry)
    plan = Plan(name="mech", model=f"planted:{pc.name}", items=[{"circuit": job.model_dump(mode="json")}])
    prep = Prepared(plan=plan, lm=lm, saes={}, label_jobs=[], circuit_jobs=[(job, pc.name, str(path))])
    store = Store(tmp_path / "m.duckdb")
    return store, run_plan(store, prep, kind="circuit")


def q(store: Store, sql: str) -> list[tuple]:
    return store.query(sql)[1]


def test_and_gate_mechanism_is_found_named_checked_and_scored_out_of_sample(tmp_path):
    from autoexplain.evals.truth.planted_circuits import induction_and

    pc = induction_and(sharpness=40.0)
    store, res = _run(tmp_path, pc)
    (o,) = res.outcomes
    assert o.status.value == "done", (o.status, o.error, o.text)
    text = o.text or ""
    assert "a0.0 is a previous-token head" in text and "a1.1 is an induction head" in text, text
    assert "previous-token head (previous-token 1.00, checked by intervention); its output feeds a1.1's key" in text
    for distractor in ("a0.1", "a0.2", "a0.3", "a1.0", "a1.2", "a1.3"):
        assert distractor not in text, (distractor, text)

    (cid, kept, nec, held, jac) = q(store, "select circuit_id, n_edges, necessity, held_out_faithfulness, "
                                          "robustness_jaccard from circuits")[0]
    edges = {e for (e,) in q(store, f"select edge from circuit_edges where circuit_id = '{cid}' and in_circuit")}
    assert pc.planted <= edges, pc.planted - edges
    assert not {e for e in edges if any(d in e for d in ("a0.1", "a0.2", "a0.3", "a1.0", "a1.2", "a1.3"))}
    assert nec > 0.95 and held > 0.95 and jac == 1.0

    scores = dict(q(store, "select metric, value from scores"))
    assert scores["claims_verified"] == 1.0 and scores["correctness"] > 0.95
    assert scores["heldout_faithfulness"] > 0.95 and scores["insample_faithfulness"] > 0.95
    assert scores["prompts_recovered"] == 1.0  # every held-out prompt, not only the mean
    details = json.loads(q(store, "select details from scores where metric = 'correctness'")[0][0])
    assert details["scored_on"] == "held-out prompts" and len(details["scored_rows"]) == 12
    claims = json.loads(q(store, "select details from scores where metric = 'claims_verified'")[0][0])["claims"]
    assert {(c["node"], c["role"] or c["edge"]) for c in claims} >= {
        ("a0.0", "previous_token"), ("a1.1", "induction"), ("a1.1", "a0.0->a1.1.k")}

    nodes = {n: rest for n, *rest in q(store, "select node, role, role_verified, mediation_ratio, direct_effect, "
                                              "prompt_share from circuit_nodes")}
    assert nodes["a0.0"][:2] == ["previous_token", True] and nodes["a0.0"][2] == pytest.approx(1.0, abs=1e-6)
    assert nodes["a1.1"][:2] == ["induction", True] and nodes["a1.1"][3] > 0  # a direct path to the logits
    assert all(share == 1.0 for *_, share in nodes.values())
    roles = dict(q(store, "select node, role from head_roles where is_best"))
    assert roles["a0.0"] == "previous_token" and roles["a1.1"] == "induction"
    level = q(store, "select causal_level, supported_level, overclaimed from explanations where is_final")
    assert level == [("intervention", "intervention", False)]


def test_a_claim_that_fails_its_check_lowers_correctness(tmp_path):
    """The scorer reads claims from any text: an explanation that calls a distractor an induction head and claims a
    composition that does not matter gets correctness = faithfulness x the verified share."""
    from autoexplain.agent.scoring import CircuitScorer
    from autoexplain.agent.state import ItemKind, WorkItem
    from autoexplain.evals.truth.planted_circuits import induction_and

    pc = induction_and()
    store, _ = _run(tmp_path, pc)
    call = q(store, "select call_id from tool_calls where tool = 'circuit_search'")[0][0]
    item = WorkItem(item_id="x", run_id="r", kind=ItemKind.CIRCUIT, target=pc.name,
                    params={"task_file": str(tmp_path / f"{pc.name}.json"), "robustness": 0})
    from autoexplain.agent.store.outbox import Outbox
    from autoexplain.evals.truth.planted_circuits import with_tokenizer

    lm, _ = with_tokenizer(pc)
    scorer = CircuitScorer(store, Outbox(store), lm, "r")
    good = "a0.0 is a previous-token head; its output feeds a1.1's key. a1.1 is an induction head."
    bad = "a0.2 is an induction head; its output feeds a1.1's key. a1.1 is an induction head."
    (g, b) = scorer.score(item, [{"explanation_id": "e-good", "text": good, "evidence": [call]},
                                 {"explanation_id": "e-bad", "text": bad, "evidence": [call]}])
    assert g["correctness"] > 0.95
    assert b["correctness"] == pytest.approx(g["correctness"] / 3, rel=1e-6)


def test_a_suppression_mechanism_is_named_and_the_constant_mover_is_not_blamed(tmp_path):
    """Another mechanism the rules were not written around: a duplicate-token head whose output keys a suppressor
    that writes minus the repeated name; the name mover is large but identical on clean and corrupt prompts, so
    under resample ablation it is not part of the circuit and no role is claimed for it."""
    from autoexplain.evals.truth.planted_circuits import suppression

    pc = suppression()
    store, res = _run(tmp_path, pc)
    (o,) = res.outcomes
    assert o.status.value == "done", (o.status, o.error)
    text = o.text or ""
    assert "a0.1 is a duplicate-token head" in text and "its output feeds a1.2's key" in text, text
    assert "a1.2 suppresses the token it attends to" in text and "a1.0" not in text, text
    edges = {e for (e,) in q(store, "select edge from circuit_edges where in_circuit")}
    assert edges == set(pc.planted)
    scores = dict(q(store, "select metric, value from scores"))
    assert scores["claims_verified"] == 1.0 and scores["heldout_faithfulness"] > 0.95 and scores["necessity"] > 0.95
