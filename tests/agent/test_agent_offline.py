"""The offline agent on the ``tiny`` toy world: labels, dead features, scores on held-out data, budgets, and the
``autoexplain label`` / ``autoexplain run`` command line (bad input refused before anything is written).

Harvesting is the slow part of a labelling run, so one harvested database (both tiny SAEs, no split, no agent run)
is built once per session into the session's cache folder (:func:`harvested_template`) and every test labels a
copy of it. The features to label are picked from that harvest (live and dead ones of each SAE), so the tests do
not depend on which features the trained toy SAEs happened to kill.

``test_agent_resume.py`` imports the helpers of this module.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from cli_support import CLI, Result, assert_input_error, snapshot

SAES = ("toy:tiny/res0", "toy:tiny/mlp1")
#: Finished with an explanation: done, or a weak label / a task the model does not do (honest statuses on the tiny
#: toy world, whose circuits are no_behaviour and some of whose labels cannot be told from chance).
OK = ("done", "weak", "no_behaviour")
FINISHED = (*OK, "budget_limited", "failed")
SCORE_METRICS = ("correctness", "completeness", "succinctness")


def has_circuit_scoring() -> bool:
    """Circuit items need ``autoexplain.evals.circuits`` (written in parallel with the agent)."""
    try:
        return importlib.util.find_spec("autoexplain.evals.circuits") is not None
    except ModuleNotFoundError:
        return False


# ============================================================================= shared helpers (also for resume)
def cache_root() -> Path:
    return Path(os.environ["AUTOEXPLAIN_CACHE"])  # conftest's session-wide isolated cache


def copy_db(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    if src.with_name(src.name + ".wal").exists():
        shutil.copyfile(src.with_name(src.name + ".wal"), dst.with_name(dst.name + ".wal"))
    return dst


def harvested_template() -> tuple[Path, dict[str, dict[str, list[int]]]]:
    """(a DuckDB file with both tiny SAEs harvested, {sae spec: {"live": [...], "dead": [...]}} of the first
    features of each kind). Built once per session (the file lives in the session cache)."""
    root = cache_root() / "agent-tests"
    db, meta = root / "harvested.duckdb", root / "features.json"
    if not meta.exists():
        from autoexplain.agent.runner import Plan, prepare
        from autoexplain.agent.store import Store
        from autoexplain.agent.store.harvest import rows_sink
        from autoexplain.tools.harvest import HarvestIn, harvest
        from autoexplain.tools.registry import ToolContext

        root.mkdir(parents=True, exist_ok=True)
        tmp = root / "building.duckdb"
        tmp.unlink(missing_ok=True)
        prep = prepare(Plan.model_validate({"model": "toy:tiny",
                                            "items": [{"label": {"sae": s, "features": "0"}} for s in SAES]}))
        store = Store(tmp)
        store.start_run("harvest-template", "harvest", {"what": "test template"})
        for entry, dataset, _ in prep.label_jobs:
            sae = prep.saes[entry.sae]

            def sink(table: str, rows: list[dict[str, Any]]) -> None:
                store.upsert(table, [{**r, "run_id": "harvest-template"} for r in rows])

            # the runner would harvest with HarvestIn's default ctx (64), longer than toy:tiny's context (48)
            harvest(ToolContext(model=prep.lm, saes={sae.sae_id: sae}, sink=rows_sink(sink)),
                    HarvestIn(sae_id=sae.sae_id, dataset=dataset, n_tokens=40_000, ctx=min(64, prep.lm.n_ctx)))
        store.finish_run("harvest-template", "done", {})
        feats = {}
        for spec, sae in prep.saes.items():
            rows = store.query("select feature_index, is_dead from features where sae_id = ? order by feature_index",
                               [sae.sae_id])[1]
            assert len(rows) == sae.d_sae
            feats[spec] = {"live": [f for f, dead in rows if not dead][:4], "dead": [f for f, dead in rows if dead][:2]}
        assert sum(len(v["dead"]) for v in feats.values()) >= 1, f"no dead feature in the tiny SAEs: {feats}"
        tmp.rename(db)
        meta.write_text(json.dumps(feats))
    return db, json.loads(meta.read_text())


def features_spec(picked: dict[str, list[int]], n_live: int = 4, n_dead: int = 2) -> str:
    return ",".join(str(f) for f in sorted(picked["live"][:n_live] + picked["dead"][:n_dead]))


def plan_data(features: dict[str, str], *, circuit: str | None = None, **extra: Any) -> dict[str, Any]:
    """A plan dict: label ``features[sae]`` of each SAE (+ one circuit item)."""
    items: list[dict[str, Any]] = [{"label": {"sae": s, "features": f}} for s, f in features.items()]
    if circuit:
        items.append({"circuit": {"task": circuit}})
    return {"name": "agent-test", "model": "toy:tiny", "items": items, **extra}


def rows(db: Path, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    """A read-only query (retries while a run holds the file)."""
    from autoexplain.agent.store import run_query

    return run_query(db, sql, params, timeout_s=60)[1]


def expected_targets(prep: Any) -> set[str]:
    from autoexplain.agent.runner import parse_features

    out = set()
    for entry, _, feats in prep.label_jobs:
        sae = prep.saes[entry.sae]
        assert feats == parse_features(entry.features, sae.d_sae)
        out |= {f"{sae.sae_id}#{f}" for f in feats}
    return out | {name for _, name, _ in prep.circuit_jobs}


# ============================================================================= a labelling run (in process)
@pytest.fixture(scope="module")
def template(tiny_zoo) -> tuple[Path, dict[str, dict[str, list[int]]]]:
    return harvested_template()


@pytest.fixture(scope="module")
def labelled(template, tmp_path_factory: pytest.TempPathFactory, one_thread) -> dict[str, Any]:
    from autoexplain.agent.runner import Plan, prepare, run_plan
    from autoexplain.agent.store import Store

    src, picked = template
    db = copy_db(src, tmp_path_factory.mktemp("labelled") / "run.duckdb")
    prep = prepare(Plan.model_validate(plan_data({s: features_spec(picked[s]) for s in SAES})))
    store = Store(db)
    res = run_plan(store, prep)
    return {"db": db, "store": store, "res": res, "prep": prep, "picked": picked}


def _dead_targets(db: Path, run_id: str) -> tuple[set[str], set[str]]:
    """(dead, live) feature targets of the run's items, by ``features.is_dead``."""
    dead, live = set(), set()
    for target, is_dead in rows(db, "select w.target, f.is_dead from work_items w join features f "
                                    "on w.target = f.sae_id || '#' || f.feature_index where w.run_id = ?", [run_id]):
        (dead if is_dead else live).add(target)
    return dead, live


def test_every_item_done(labelled: dict[str, Any]) -> None:
    db, res, prep = labelled["db"], labelled["res"], labelled["prep"]
    targets = expected_targets(prep)
    assert len(targets) == sum(len(labelled["picked"][s]["live"][:4] + labelled["picked"][s]["dead"][:2])
                               for s in SAES)
    assert {o.target for o in res.outcomes} == targets
    # done, or weak (a label the held-out data cannot tell from chance) with the reason in ``error``
    assert all(o.status.value in ("done", "weak") and (o.error is None) == (o.status.value == "done")
               and not o.skipped for o in res.outcomes), \
        [(o.target, o.status, o.error) for o in res.outcomes if o.status.value != "done"]
    assert all(o.error.startswith("weak: ") for o in res.outcomes if o.status.value == "weak")
    items = rows(db, "select target, status, attempts, error, finished_at from work_items where run_id = ?",
                 [res.run_id])
    assert sorted(r[0] for r in items) == sorted(targets)  # one row per item
    assert {(r[1], r[2], r[3] is None) for r in items} <= {("done", 1, True), ("weak", 1, False)}
    assert all(r[4] is not None for r in items)
    (status, summary), = rows(db, "select status, summary from runs where run_id = ?", [res.run_id])
    by_status = json.loads(summary)["by_status"]
    assert status == "done" and set(by_status) <= {"done", "weak"} and sum(by_status.values()) == len(targets)


def test_dead_features_get_one_dead_explanation_and_no_scores(labelled: dict[str, Any]) -> None:
    db, run_id = labelled["db"], labelled["res"].run_id
    dead, live = _dead_targets(db, run_id)
    assert dead and live, "the picked features must include dead and live ones"
    expl = rows(db, "select target, explanation_id, text, is_final, budget_limited from explanations "
                    "where run_id = ?", [run_id])
    for t in dead:
        mine = [e for e in expl if e[0] == t]
        assert len(mine) == 1, mine
        _, eid, text, final, limited = mine[0]
        assert text.startswith("dead feature") and final and not limited
        assert rows(db, "select count(*) from scores where explanation_id = ?", [eid]) == [(0,)]
        assert rows(db, "select count(*) from judgements where explanation_id = ?", [eid]) == [(0,)]
        assert rows(db, "select count(*) from hypotheses h join work_items w using (item_id) where w.target = ? "
                        "and w.run_id = ?", [t, run_id]) == [(0,)]
    # and no live feature is called dead
    assert not [e for e in expl if e[0] in live and e[2].startswith("dead")]
    # what the run printed agrees with the store
    for o in labelled["res"].outcomes:
        if o.target in dead:
            assert o.text.startswith("dead feature") and o.scores == {}


def test_live_features_final_explanation_is_the_best_scored(labelled: dict[str, Any]) -> None:
    from autoexplain.agent.policies.base import overall

    db, run_id = labelled["db"], labelled["res"].run_id
    _, live = _dead_targets(db, run_id)
    outcomes = {o.target: o for o in labelled["res"].outcomes}
    n_correct = 0
    for t in sorted(live):
        expl = rows(db, "select explanation_id, text, is_final, overall, author, causal_level, judge "
                        "from explanations where run_id = ? and target = ?", [run_id, t])
        finals = [e for e in expl if e[2]]
        assert len(finals) == 1, (t, expl)
        for eid, text, _, ov, author, level, judge in expl:
            # a label naming what the feature promotes rests on steering/ablation (output_effect): intervention
            want = "intervention" if "; promotes " in text else "association"
            assert author == "offline" and level == want and judge.startswith("lexical"), (text, level, judge)
            sc = dict(rows(db, "select metric, value from scores where explanation_id = ?", [eid]))
            assert set(SCORE_METRICS) <= set(sc), (t, text, sc)
            for m in ("completeness", "succinctness"):
                assert sc[m] is not None and 0.0 <= sc[m] <= 1.0, (t, m, sc[m])
            if sc["correctness"] is None:
                # only undefined when the held-out side has no non-activating example (specificity undefined)
                (details,), = rows(db, "select details from scores where explanation_id = ? and metric = 'detection'",
                                   [eid])
                assert json.loads(details)["specificity"] is None, (t, details)
            else:
                assert 0.0 <= sc["correctness"] <= 1.0
            assert ov == pytest.approx(overall(sc)), (t, text)
        best = max(e[3] for e in expl)
        eid, text, _, ov, *_ = finals[0]
        assert ov == pytest.approx(best), f"{t}: final {text!r} ({ov}) is not the best scored ({best})"
        o = outcomes[t]
        assert o.text == text and o.overall == pytest.approx(ov) and set(SCORE_METRICS) <= set(o.scores)
        n_correct += o.scores["correctness"] is not None
    assert n_correct >= len(live) / 2, "most live labels must have a correctness score"


def test_judgements_only_use_the_score_split(labelled: dict[str, Any]) -> None:
    db, run_id = labelled["db"], labelled["res"].run_id
    n, n_score, n_joined, n_background, n_background_true = rows(db, """
        select count(*), count(*) filter (where j.split = 'score'),
               count(*) filter (where fe.split = 'score'),
               count(*) filter (where j.example_kind = 'background'),
               count(*) filter (where j.example_kind = 'background' and j.truth)
        from judgements j join explanations e using (explanation_id)
        left join feature_examples fe on fe.sae_id = j.sae_id and fe.feature_index = j.feature_index
             and fe.kind = j.example_kind and fe.example_id = j.example_id
        where e.run_id = ?""", [run_id])[0]
    assert n > 100
    assert n_score == n, "a judgement row not marked split 'score'"
    # background windows (a dense feature's negatives, from other features' stored windows, run through the model
    # where the feature never fired) are not this feature's examples; every other judged example is held out
    assert n_joined + n_background == n, "a judged example is not a held-out (score split) example"
    assert n_background_true == 0, "a background window is a non-activating context"
    # every scored (live) explanation has judgement rows
    _, live = _dead_targets(db, run_id)
    judged = {t for (t,) in rows(db, "select distinct e.target from judgements j join explanations e "
                                     "using (explanation_id) where e.run_id = ?", [run_id])}
    assert judged == live


def test_policy_saw_only_the_explain_split(labelled: dict[str, Any]) -> None:
    from autoexplain.agent.agent_tools import ShownExample

    db, run_id = labelled["db"], labelled["res"].run_id
    dead, live = _dead_targets(db, run_id)
    calls = rows(db, "select w.target, t.args, t.summary, t.error from tool_calls t join work_items w using (item_id) "
                     "where t.run_id = ? and t.tool = 'feature_examples'", [run_id])
    assert sorted(c[0] for c in calls if c[0] in live) == sorted(live)  # one per live item
    for target, args, summary, error in calls:
        assert error is None
        sae_id, f = target.split("#")
        assert json.loads(args)["sae_id"] == sae_id and json.loads(args)["feature_index"] == int(f)
        if target in dead:  # a dead feature needs no look (its explanation comes from features.is_dead)
            assert "(dead)" in summary
            continue
        lines: dict[str, set[str]] = {"explain": set(), "score": set()}
        for kind, q, m, toks, acts, split in rows(
                db, "select kind, quantile, max_act, tokens, acts, split from feature_examples "
                    "where sae_id = ? and feature_index = ?", [sae_id, int(f)]):
            ex = ShownExample(kind=kind, quantile=q, max_act=m, tokens=json.loads(toks), acts=json.loads(acts))
            lines[split].add(f"- {kind}{'' if q is None else f' q{q}'}: {ex.marked()}")
        assert lines["explain"] and lines["score"]
        shown = [ln for ln in summary.split("\n") if ln.startswith("- ") and not ln.endswith("(truncated)")]
        assert shown, summary[:300]
        for ln in shown:
            assert ln in lines["explain"], f"{target}: the policy saw an example not in the explain split: {ln[:120]}"
            assert ln not in lines["score"] - lines["explain"]
        n_hidden = rows(db, "select count(*) from feature_examples where sae_id = ? and feature_index = ? "
                            "and split = 'score'", [sae_id, int(f)])[0][0]
        assert f"{n_hidden} held out for scoring" in summary


def test_hypotheses_are_recorded_with_statuses(labelled: dict[str, Any]) -> None:
    db, run_id = labelled["db"], labelled["res"].run_id
    _, live = _dead_targets(db, run_id)
    hyps = rows(db, "select w.target, h.text, h.status, h.causal_level, h.evidence from hypotheses h "
                    "join work_items w using (item_id) where h.run_id = ?", [run_id])
    assert {h[0] for h in hyps} == live  # every live item, and only live items
    assert {h[2] for h in hyps} <= {"open", "confirmed", "refuted", "inconclusive"}
    statuses = Counter(h[2] for h in hyps)
    assert statuses["confirmed"] + statuses["refuted"] >= len(live), statuses  # probes decided most of them
    call_ids = {c for (c,) in rows(db, "select call_id from tool_calls where run_id = ?", [run_id])}
    for target, text, _, level, evidence in hyps:
        # input-side hypotheses rest on examples (association); the output side is tested by intervention
        assert (text.startswith("fires on") and level == "association") or \
            (text.startswith("promotes") and level in ("association", "intervention")), (text, level)
        ev = json.loads(evidence)
        assert ev and set(ev) <= call_ids, (target, ev)


def test_best_explanations_view_one_row_per_target(labelled: dict[str, Any]) -> None:
    db, run_id = labelled["db"], labelled["res"].run_id
    view = rows(db, "select target, explanation_id, is_final from best_explanations where run_id = ?", [run_id])
    targets = [t for (t,) in rows(db, "select target from work_items where run_id = ?", [run_id])]
    assert sorted(v[0] for v in view) == sorted(targets)
    finals = dict(rows(db, "select target, explanation_id from explanations where run_id = ? and is_final",
                       [run_id]))
    assert {v[0]: v[1] for v in view} == finals and all(v[2] for v in view)


# ============================================================================= routing
class _ConfusedPolicy:
    """A policy that proposes a dead-feature draft next to a live label: a state no router may guess a way out of."""

    name, llm_model = "confused", None

    def plan(self, state: Any, item: Any) -> Any:
        from autoexplain.agent.policies.base import PolicyStep

        return PolicyStep()  # no tool calls: ready to propose

    def observe(self, state: Any, item: Any, results: Any) -> Any:
        raise AssertionError("no tool call was made")

    def propose(self, state: Any, item: Any) -> Any:
        from autoexplain.agent.policies.base import PolicyStep
        from autoexplain.agent.state import Draft

        return PolicyStep(drafts=[Draft(text="dead feature: never fired", dead=True), Draft(text="fires on cats")])

    def decide(self, state: Any, item: Any) -> Any:
        raise AssertionError("a dead draft never reaches decide")


def test_a_router_raises_on_an_impossible_state(tmp_path: Path) -> None:
    from autoexplain.agent.graph import AgentEnv, GraphStateError, build_graph, initial_state
    from autoexplain.agent.state import ItemKind, WorkItem
    from autoexplain.agent.store import Store
    from autoexplain.agent.store.outbox import Outbox

    store = Store(tmp_path / "graph.duckdb")
    out = Outbox(store)
    item = WorkItem(item_id="item-1", run_id="run-1", kind=ItemKind.FEATURE, target="sae-x#0",
                    params={"sae_id": "sae-x", "feature_index": 0})
    out.begin(item.item_id)
    # no tool runs and nothing is scored on this path: the runner and scorer are never touched
    env = AgentEnv(store=store, out=out, runner=None, policy=_ConfusedPolicy(), scorer=None,  # type: ignore[arg-type]
                   run_id=item.run_id)
    with pytest.raises(GraphStateError, match=r"after propose of item item-1 \(sae-x#0\): a dead-feature draft"):
        build_graph(env).invoke(initial_state(item))


def test_a_plan_names_exactly_the_policies_and_judges_of_the_catalogues() -> None:
    from typing import get_args

    from autoexplain.agent.policies import POLICIES
    from autoexplain.agent.runner import JudgeName, PolicyName
    from autoexplain.evals.judges import JUDGES

    assert set(get_args(PolicyName)) == set(POLICIES)
    assert set(get_args(JudgeName)) == set(JUDGES)


# ============================================================================= budgets
@pytest.fixture(scope="module")
def budget_prep(template, one_thread) -> Any:
    """Two live features and one dead one of res0."""
    from autoexplain.agent.runner import Plan, prepare

    _, picked = template
    return lambda **extra: prepare(Plan.model_validate(
        plan_data({SAES[0]: features_spec(picked[SAES[0]], 2, 1)}, **extra)))


def _run(template: tuple[Path, Any], tmp_path: Path, prep: Any) -> tuple[Path, Any]:
    from autoexplain.agent.runner import run_plan
    from autoexplain.agent.store import Store

    db = copy_db(template[0], tmp_path / "run.duckdb")
    return db, run_plan(Store(db), prep)


def test_item_step_budget_ends_budget_limited(template, budget_prep, tmp_path: Path) -> None:
    db, res = _run(template, tmp_path, budget_prep(budget={"steps": 3}))
    assert len(res.outcomes) == 3
    dead, live = _dead_targets(db, res.run_id)
    assert len(dead) == 1 and len(live) == 2
    items = {r[0]: r[1:] for r in rows(db, "select target, status, error, budget from work_items where run_id = ?",
                                       [res.run_id])}
    assert len(items) == 3
    for target in live:
        status, error, budget = items[target]
        assert status == "budget_limited" and error == "stopped by budget: steps", (target, status, error)
        b = json.loads(budget)
        assert b["stopped_by"] == "steps" and b["steps"] == 3
    outcomes = {o.target: o for o in res.outcomes}
    assert all(outcomes[t].status.value == "budget_limited" and outcomes[t].text is None for t in live)
    # three steps (plan, act, observe) propose nothing: no explanation, and no crash
    assert rows(db, "select count(*) from explanations where run_id = ? and target in (select unnest(?))",
                [res.run_id, sorted(live)]) == [(0,)]
    # a dead feature is recorded as dead within the budget
    for target in dead:
        assert items[target][0] == "done"
        assert outcomes[target].text.startswith("dead feature")
    assert rows(db, "select status from runs where run_id = ?", [res.run_id]) == [("done",)]


def test_item_step_budget_keeps_the_best_explanation_so_far(template, budget_prep, tmp_path: Path) -> None:
    db, res = _run(template, tmp_path, budget_prep(budget={"steps": 8}))
    dead, live = _dead_targets(db, res.run_id)
    assert len(dead) == 1 and len(live) == 2
    status = dict(rows(db, "select target, status from work_items where run_id = ?", [res.run_id]))
    assert all(status[t] == "done" for t in dead)  # a dead feature needs fewer steps
    assert all(status[t] == "budget_limited" for t in live)
    for t in live:
        finals = rows(db, "select text, budget_limited, explanation_id from explanations "
                          "where run_id = ? and target = ? and is_final", [res.run_id, t])
        assert len(finals) == 1 and finals[0][1] is True
        assert {m for (m,) in rows(db, "select metric from scores where explanation_id = ?", [finals[0][2]])} \
            >= set(SCORE_METRICS)
    for o in res.outcomes:
        # the limit is checked in plan, after observe and in decide: propose and score may still run, then accept
        assert o.usage.steps <= 8 + 3, (o.target, o.usage)


def test_run_budget_stops_the_run_cleanly_and_resume_finishes_it(template, tmp_path: Path, one_thread) -> None:
    from autoexplain.agent.runner import Plan, prepare, run_plan
    from autoexplain.agent.store import Store

    _, picked = template
    prep = prepare(Plan.model_validate(plan_data({SAES[0]: features_spec(picked[SAES[0]], 4, 0)},
                                                 run_budget={"steps": 15})))
    db, res = _run(template, tmp_path, prep)
    assert rows(db, "select status, summary->>'stopped_by' from runs where run_id = ?", [res.run_id]) == [
        ("budget_limited", "run steps")]
    order = [o.target for o in res.outcomes]
    items = {r[0]: r[1:] for r in rows(db, "select target, status, error, budget from work_items where run_id = ?",
                                       [res.run_id])}
    assert len(items) == 4 and items[order[0]][0] in ("done", "weak")
    # the item running when the budget ran out ends with its best explanation; the later ones are not started
    pending = [t for t in order if items[t][0] == "pending"]
    assert pending and pending == order[order.index(pending[0]):], "every item after the limit stays pending"
    assert all(items[t][0] in ("done", "weak", "budget_limited") for t in order[:order.index(pending[0])])
    assert all("run steps reached" in (o.error or "") for o in res.outcomes if o.target in pending)
    steps = sum(json.loads(items[t][2])["steps"] for t in order if items[t][2])
    assert steps <= 15 + len(order), steps
    for t in pending:  # no work at all
        assert rows(db, "select count(*) from tool_calls t join work_items w using (item_id) where w.target = ? "
                        "and w.run_id = ?", [t, res.run_id]) == [(0,)]
    # each --resume (with a fresh run budget) starts where the last stopped; the finished items are kept
    left = len(pending)
    for _ in range(4):
        again = run_plan(Store(db), prep, resume=True)
        assert again.run_id == res.run_id
        (n,), = rows(db, "select count(*) from work_items where run_id = ? and status = 'pending'", [res.run_id])
        assert n < left, "a resumed run made no progress"
        left = n
        if not left:
            break
    assert rows(db, "select status from runs where run_id = ?", [res.run_id]) == [("done",)]
    assert {t: s for t, s, *_ in rows(db, "select target, status from work_items where run_id = ?",
                                      [res.run_id])}[order[0]] in ("done", "weak")


# ============================================================================= the command line
def agent_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("AUTOEXPLAIN_DB", "OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL")}
    env.update(AUTOEXPLAIN_CACHE=str(cache_root()), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


def run_agent_cli(args: list[str], cwd: Path, timeout: float = 300) -> Result:
    """``autoexplain ARGS`` in ``cwd`` with the session's toy zoo (the cache lives outside ``cwd``)."""
    before = snapshot(cwd)
    t0 = time.perf_counter()
    p = subprocess.run([*CLI, *args], cwd=cwd, env=agent_env(), capture_output=True, text=True, timeout=timeout,
                       check=False)
    return Result(args, p.returncode, p.stdout, p.stderr, time.perf_counter() - t0, before, snapshot(cwd))


LABEL = ["label", "--model", "toy:tiny", "--sae", "toy:tiny/res0", "--db", "out.duckdb"]


def _plan_file(d: Path, text: str, name: str = "plan.yaml") -> list[str]:
    (d / name).write_text(text, encoding="utf-8")
    return ["run", name, "--db", "out.duckdb"]


@pytest.fixture(scope="module")
def bad_inputs(tiny_zoo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Future]]:
    """Every bad-input case, started together on two workers (the model-loading ones take ~10 s each)."""
    root = tmp_path_factory.mktemp("agent-cli-bad")
    cases: dict[str, list[str]] = {}

    def case(name: str) -> Path:
        (d := root / name).mkdir()
        return d

    # the slow ones first (they load the model before refusing)
    cases["features_backwards"] = [*LABEL, "--features", "5-2"]
    cases["features_beyond_width"] = [*LABEL, "--features", "0-3,999"]
    cases["features_garbage"] = [*LABEL, "--features", "abc"]
    cases["dataset_missing_file"] = [*LABEL, "--dataset", "missing.txt"]
    cases["dataset_missing_hub"] = [*LABEL, "--dataset", "no-such-user/no-such-dataset"]
    cases["unknown_policy"] = [*LABEL, "--policy", "magic"]
    cases["llm_no_key"] = [*LABEL, "--policy", "llm", "--llm-model", "gpt-test"]
    cases["llm_no_model"] = [*LABEL, "--policy", "llm"]
    cases["plan_missing"] = ["run", "nope.yaml", "--db", "out.duckdb"]
    dirs = {name: case(name) for name in cases}
    for name, text in {
        "plan_bad_yaml": "model: toy:tiny\nitems: [\n  - {label: {sae: toy:tiny/res0}\n",
        "plan_unknown_key": "model: toy:tiny\nbogus: 1\nitems:\n  - label: {sae: toy:tiny/res0}\n",
        "plan_unknown_item_key": "model: toy:tiny\nitems:\n  - label: {sae: toy:tiny/res0, featurs: 0-3}\n",
        "plan_both": "model: toy:tiny\nitems:\n  - label: {sae: toy:tiny/res0}\n    circuit: {task: ioi}\n",
        "plan_no_items": "model: toy:tiny\nitems: []\n",
    }.items():
        dirs[name] = case(name)
        cases[name] = _plan_file(dirs[name], text)
    pool = ThreadPoolExecutor(max_workers=2)
    futures = {name: pool.submit(run_agent_cli, args, dirs[name]) for name, args in cases.items()}
    yield futures
    pool.shutdown(wait=True)


def _refused(res: Result, *needles: str) -> str:
    line = assert_input_error(res, *needles)  # exit 2, one stderr line, nothing written in the case's folder
    assert "out.duckdb" not in res.after and "out.duckdb.checkpoints.sqlite" not in res.after
    return line


@pytest.mark.parametrize("name,needles", [
    ("features_backwards", ["--features '5-2'", "backwards"]),
    ("features_beyond_width", ["999", "out of range", "128 features"]),
    ("features_garbage", ["'abc'", "not an index or a range"]),
    ("dataset_missing_file", ["'missing.txt'", "does not exist"]),
    ("unknown_policy", ["--policy", "'offline', 'llm'"]),
    ("llm_no_key", ["OPENAI_API_KEY"]),
    ("llm_no_model", ["llm_model"]),
    ("plan_missing", ["'nope.yaml'", "does not exist"]),
    ("plan_bad_yaml", ["'plan.yaml'", "not valid YAML"]),
    ("plan_unknown_key", ["'plan.yaml'", "bogus", "Extra inputs"]),
    ("plan_unknown_item_key", ["items.0.label.featurs", "Extra inputs"]),
    ("plan_both", ["items.0", "either {label"]),
    ("plan_no_items", ["items", "at least 1"]),
])
def test_bad_input_is_refused_before_anything_is_written(bad_inputs: dict[str, Future], name: str,
                                                         needles: list[str]) -> None:
    _refused(bad_inputs[name].result(), *needles)


def test_missing_hub_dataset_is_refused_before_anything_is_written(bad_inputs: dict[str, Future]) -> None:
    """A dataset that is neither a file nor a reachable hub dataset (offline) is refused like a missing file."""
    _refused(bad_inputs["dataset_missing_hub"].result(), "no-such-user/no-such-dataset")


def test_run_plan_happy_path(tiny_zoo, tmp_path: Path) -> None:
    """``autoexplain run plan.yaml`` on a fresh database: harvest, label, (explain a circuit), all stored."""
    circuit = "greater_than" if has_circuit_scoring() else None
    (tmp_path / "plan.yaml").write_text(
        "name: happy\nmodel: toy:tiny\nitems:\n"
        + "".join(f"  - label: {{sae: {s}, features: 0-3, tokens: 8000}}\n" for s in SAES)
        + (f"  - circuit: {{task: {circuit}}}\n" if circuit else ""), encoding="utf-8")
    res = run_agent_cli(["run", "plan.yaml", "--db", "out.duckdb"], tmp_path, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    db = tmp_path / "out.duckdb"
    n_items = 8 + bool(circuit)
    (run_id, status, summary), = rows(db, "select run_id, status, summary from runs where kind = 'plan'")
    assert status == "done" and json.loads(summary)["items"] == n_items
    assert f"(run {run_id})" in res.flat_stdout and str(db.resolve()) in res.flat_stdout
    items = rows(db, "select target, kind, status from work_items where run_id = ?", [run_id])
    assert len(items) == n_items and {r[2] for r in items if r[1] == "label"} <= {"done", "weak"}
    # the tiny toy model gives greater_than prompts the same logit difference clean and corrupt: nothing to explain
    assert {r[2] for r in items if r[1] == "circuit"} <= {"no_behaviour"}
    # one line per finished item on stderr, naming its target
    for target, _, _ in items:
        assert target[:40] in res.stderr
    finals = rows(db, "select target, text from explanations where run_id = ? and is_final", [run_id])
    assert len(finals) == n_items and len({t for t, _ in finals}) == n_items
    harvested = rows(db, "select sae_id, count(*), max(n_tokens) from features group by sae_id")
    assert len(harvested) == 2 and all(n == 128 and 0 < tok <= 8000 for _, n, tok in harvested)
    if circuit:
        (item_id, target), = rows(db, "select item_id, target from work_items where run_id = ? and kind = 'circuit'",
                                  [run_id])
        assert target == circuit
        (text, level, eid), = rows(db, "select text, causal_level, explanation_id from explanations "
                                       "where item_id = ? and is_final", [item_id])
        assert text.startswith(f"{circuit}:") and "faithfulness" in text and level == "intervention"
        assert rows(db, "select count(*) from circuits where item_id = ?", [item_id])[0][0] >= 1
        metrics = {m for (m,) in rows(db, "select metric from scores where explanation_id = ?", [eid])}
        assert set(SCORE_METRICS) <= metrics
        tools = {t for (t,) in rows(db, "select tool from tool_calls where item_id = ?", [item_id])}
        assert {"circuit_search", "mediation", "head_roles"} <= tools
    # autoexplain sql answers on the result
    q = run_agent_cli(["sql", "select count(*) as n from best_explanations", "--db", "out.duckdb", "-o", "json"],
                      tmp_path)
    assert q.returncode == 0 and json.loads(q.stdout) == [{"n": n_items}]
