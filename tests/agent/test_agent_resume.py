"""Crash safety of agent runs: ``kill -9`` at random points and emulated crashes, then ``--resume``.

What must hold after any crash and resume (DESIGN §6-§7):

* every item completes exactly once: one ``work_items`` row per item, finished; an item finished before a crash
  is never redone (its rows, their timestamps and its tool calls are untouched);
* no duplicate rows: one final explanation per item, one score per (explanation, metric), and the same rows,
  tool calls and tool-cache entries as an uninterrupted run of the same plan (compared target by target);
* tool results are never recomputed: a cached forward-pass result is reused, never written again;
* ``--resume`` continues the newest unfinished run of the same plan (same run id); a changed plan starts a new run.

The uninterrupted reference run and the crashed runs all label copies of one harvested database (see
``test_agent_offline.harvested_template``). Kill points are drawn from a seeded generator and always land after
the run made progress; the assertions are invariants, never timings.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, NoReturn

import pytest

from cli_support import CLI
from test_agent_offline import (
    OK,
    SAES,
    agent_env,
    copy_db,
    features_spec,
    harvested_template,
    has_circuit_scoring,
    plan_data,
    rows,
)

OK_SQL = str(OK)  # as an SQL list

CIRCUIT = "greater_than" if has_circuit_scoring() else None


# ============================================================================= helpers
def content(db: Path, run_id: str) -> dict[str, list[Any]]:
    """Everything a run produced, by target (not by id: ids derive from the run id), in a comparable form."""
    def q(sql: str) -> list[Any]:
        return sorted(rows(db, sql, [run_id]), key=repr)

    return {
        "items": q("select target, kind, status from work_items where run_id = ?"),
        "explanations": q("select target, text, is_final, budget_limited, causal_level, round(overall, 4) "
                          "from explanations where run_id = ?"),
        "scores": q("select e.target, e.text, s.metric, round(s.value, 4), s.n from scores s "
                    "join explanations e using (explanation_id) where e.run_id = ?"),
        "judgements": q("select e.target, j.scorer, count(*), count(*) filter (where j.prediction) from judgements j "
                        "join explanations e using (explanation_id) where e.run_id = ? group by all"),
        "hypotheses": q("select w.target, h.text, h.status from hypotheses h join work_items w using (item_id) "
                        "where h.run_id = ?"),
        "tool_calls": q("select w.target, t.tool, t.args::varchar, t.error, t.cache_key from tool_calls t "
                        "join work_items w using (item_id) where t.run_id = ?"),
        "circuits": q("select task, method, n_edges, round(faithfulness, 4) from circuits where run_id = ?"),
    }


def assert_no_duplicates(db: Path, run_id: str) -> None:
    finals = rows(db, "select w.target, count(e.explanation_id) filter (where e.is_final) from work_items w "
                      "left join explanations e using (item_id) where w.run_id = ? group by all", [run_id])
    assert finals and all(n == 1 for _, n in finals), [f for f in finals if f[1] != 1]
    assert rows(db, "select s.explanation_id, s.metric, count(*) from scores s join explanations e "
                    "using (explanation_id) where e.run_id = ? group by all having count(*) > 1", [run_id]) == []
    assert rows(db, "select target, count(*) from work_items where run_id = ? group by all having count(*) > 1",
                [run_id]) == []
    # every cached call has its result, and the cache holds nothing no call asked for
    keys = {k for (k,) in rows(db, "select distinct cache_key from tool_calls where cache_key is not null")}
    assert keys == {k for (k,) in rows(db, "select cache_key from tool_cache")}


def plan_runs(db: Path) -> list[tuple[str, str]]:
    return rows(db, "select run_id, status from runs where kind = 'plan' order by started_at")


class Spy:
    """Counts the tool calls the agent makes, in process: which ran, which came from the cache."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from autoexplain.agent.toolrun import ToolRunner
        from autoexplain.tools.registry import Cost

        self.calls: list[tuple[str, bool, bool]] = []  # (tool, forward, cached)
        orig = ToolRunner._one
        spy = self

        def one(runner: Any, item_id: str, step: int, index: int, req: Any) -> Any:
            fwd, ran = runner.registry.get(req.tool).cost is not Cost.CHEAP, runner.executed
            try:
                res = orig(runner, item_id, step, index, req)
            except BaseException:  # a crash inside the call, after the tool itself ran: it still counts
                if runner.executed > ran:
                    spy.calls.append((req.tool, fwd, False))
                raise
            spy.calls.append((req.tool, fwd, res.cached))
            return res

        monkeypatch.setattr(ToolRunner, "_one", one)

    def forward_runs(self) -> int:
        """Forward-pass tool calls that really ran (not served from the cache)."""
        return sum(1 for _, fwd, cached in self.calls if fwd and not cached)


class SimulatedCrash(KeyboardInterrupt):
    """An emulated ``kill -9`` (in process), raised where the process dies. A KeyboardInterrupt, so the runner does
    not take it for an item's failure; :class:`Kill` makes sure it also commits nothing on its way out."""


class ProcessGone(RuntimeError):
    """What a group commit meets once the run was killed (the runner's commit on its way out swallows it)."""


class Kill:
    """Emulates ``kill -9`` inside one ``run_plan`` call: :meth:`now` raises :class:`SimulatedCrash`, and from then
    on the run's outbox commits nothing and the run is not marked (a killed process never reaches the commit and
    the ``interrupted`` mark the runner makes on its way out after a Ctrl-C), so the checkpoints and the earlier
    commits are all a resume finds. ``mp``: a monkeypatch
    context that lasts exactly that call."""

    def __init__(self, mp: pytest.MonkeyPatch) -> None:
        from autoexplain.agent.store.outbox import Outbox

        self.dead = False
        orig_flush = Outbox.flush
        kill = self

        def flush(out: Any) -> list[str]:
            if kill.dead:
                raise ProcessGone("the process was killed: it commits nothing more")
            return orig_flush(out)

        mp.setattr(Outbox, "flush", flush)
        from autoexplain.agent.store import Store

        orig_finish = Store.finish_run

        def finish_run(store: Any, *args: Any, **kwargs: Any) -> None:
            if kill.dead:  # a killed process never marks its run (Ctrl-C does: the run reads 'interrupted')
                raise ProcessGone("the process was killed: it marks nothing")
            orig_finish(store, *args, **kwargs)

        mp.setattr(Store, "finish_run", finish_run)

    def now(self, why: str) -> NoReturn:
        self.dead = True
        raise SimulatedCrash(why)

    def after_nodes(self, n: int) -> Callable[[str, str], None]:
        """A ``run_plan(on_node=...)`` hook that kills the run after its ``n``-th graph node (over all items)."""
        nodes = [0]

        def on_node(item_id: str, node: str) -> None:
            nodes[0] += 1
            if nodes[0] >= n:
                self.now(f"emulated crash after node {n} ({node} of {item_id})")

        return on_node


# ============================================================================= fixtures
@pytest.fixture(scope="module")
def kit(tiny_zoo, one_thread) -> dict[str, Any]:
    """The plan the crash tests run (2 live + 1 dead feature of each SAE, and one circuit if available)."""
    from autoexplain.agent.runner import Plan, prepare

    template, picked = harvested_template()
    data = plan_data({s: features_spec(picked[s], 3, 1) for s in SAES}, circuit=CIRCUIT)
    return {"template": template, "picked": picked, "data": data, "prep": prepare(Plan.model_validate(data))}


@pytest.fixture(scope="module")
def clean(kit: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An uninterrupted run of the plan: the reference every crashed run must reproduce."""
    from autoexplain.agent.runner import run_plan
    from autoexplain.agent.store import Store

    db = copy_db(kit["template"], tmp_path_factory.mktemp("clean") / "clean.duckdb")
    with pytest.MonkeyPatch.context() as mp:
        spy = Spy(mp)
        res = run_plan(Store(db), kit["prep"])
    assert all(o.status.value in OK for o in res.outcomes), [(o.target, o.status, o.error) for o in res.outcomes]
    assert_no_duplicates(db, res.run_id)
    return {"db": db, "res": res, "content": content(db, res.run_id), "forward_runs": spy.forward_runs(),
            "cache": set(rows(db, "select cache_key, tool from tool_cache"))}


# ============================================================================= emulated crashes (in process)
def test_emulated_crashes_then_resume_match_an_uninterrupted_run(kit: dict[str, Any], clean: dict[str, Any],
                                                                 tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from autoexplain.agent.runner import run_plan
    from autoexplain.agent.store import Store
    from autoexplain.agent.store.outbox import GroupCommit, Outbox

    spy = Spy(monkeypatch)
    replayed: list[int] = []
    orig_replay = Outbox.replay
    monkeypatch.setattr(Outbox, "replay", lambda self, entries: replayed.append(orig_replay(self, entries)) or
                        replayed[-1])
    store = Store(copy_db(kit["template"], tmp_path / "crash.duckdb"))
    every2 = GroupCommit(items=2)  # a commit after every second item: crashes land before and after commits
    run_id = None
    finished_before: dict[str, tuple[Any, ...]] = {}
    # nodes per call before the emulated crash: land in different items and at different nodes (a feature item
    # takes 6 to 15 nodes); each resumed call counts from zero again. The second lands right after an act whose
    # tools ran forward passes (the resumed observe must read them from the cache)
    for n in (2, 3, 9, 14, 4):
        with pytest.MonkeyPatch.context() as mp, pytest.raises(SimulatedCrash):
            run_plan(store, kit["prep"], resume=run_id is not None, on_node=Kill(mp).after_nodes(n), commit=every2)
        runs = plan_runs(store.path)
        run_id = run_id or runs[0][0]
        assert runs == [(run_id, "running")], "a crashed run stays unfinished, and resume continued it"
        finished = str((*OK, "budget_limited", "failed"))
        now = {r[0]: r[1:] for r in rows(store.path, "select item_id, status, attempts, finished_at from work_items "
                                                     f"where run_id = ? and status in {finished}", [run_id])}
        for item_id, before in finished_before.items():
            assert now[item_id] == before, "a finished item was run again"
        finished_before = now
        assert len(rows(store.path, "select 1 from work_items where run_id = ? and status = 'running'",
                        [run_id])) <= 1
    assert finished_before, "the emulated crashes should come after some items finished"
    assert sum(replayed) > 0, "rows not committed before a crash should have come back from the checkpoints"
    res = run_plan(store, kit["prep"], resume=True, commit=every2)
    assert res.run_id == run_id and plan_runs(store.path) == [(run_id, "done")]
    # skipped: committed before (never run again), or finished in a checkpoint whose commit never came (recovered)
    assert {o.target for o in res.outcomes if o.skipped} >= {
        t for (t,) in rows(store.path, "select target from work_items where item_id in (select unnest(?))",
                           [list(finished_before)])}
    assert all(o.status.value in OK for o in res.outcomes)
    # the same results as the uninterrupted run, row for row
    got = content(store.path, run_id)
    for key, want in clean["content"].items():
        assert got[key] == want, f"{key} differ from an uninterrupted run"
    finals = {o.target: o.text for o in res.outcomes}
    assert finals == {o.target: o.text for o in clean["res"].outcomes}
    assert_no_duplicates(store.path, run_id)
    # every forward-pass result was computed once: resumed nodes read it from the cache
    assert set(rows(store.path, "select cache_key, tool from tool_cache")) == clean["cache"]
    assert spy.forward_runs() == clean["forward_runs"] == len(clean["cache"])
    assert any(cached for _, fwd, cached in spy.calls if fwd), "a resumed node should have hit the tool cache"


def test_crashes_inside_nodes_then_resume_match_an_uninterrupted_run(kit: dict[str, Any], clean: dict[str, Any],
                                                                    tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Crashes in the middle of a node, right after one of its writes (the node runs again on resume and must
    write the same rows, not new ones), and inside a group commit's transaction (rolled back: the rows come back
    from the checkpoints)."""
    from autoexplain.agent.runner import run_plan
    from autoexplain.agent.store import Store
    from autoexplain.agent.store.outbox import GroupCommit, Outbox

    spy = Spy(monkeypatch)
    store = Store(copy_db(kit["template"], tmp_path / "crash.duckdb"))
    # every computed result committed at once (as a slow forward pass would be): none may be computed twice
    commit = GroupCommit(items=2, cache_now_s=0.0)
    orig_add, orig_upsert = Outbox.upsert, Store.upsert
    hit: list[str] = []
    run_id = None
    res = None
    # the n-th node write of each call is its last; calls with n % 3 == 0 crash inside their first group commit
    for n in (9, 14, 11, 17, 8, 13, 19, 10, 15, 12, 1000):
        count = [0]
        in_commit = n % 3 == 0 and n < 1000
        with pytest.MonkeyPatch.context() as mp:
            kill = Kill(mp)

            def add(self: Any, table: str, data: Any, *, step: bool = True, n: int = n, count: list = count,
                    in_commit: bool = in_commit, kill: Kill = kill) -> int:
                out = orig_add(self, table, data, step=step)
                if step and not in_commit:  # a node's write (not the runner's own bookkeeping)
                    count[0] += 1
                    if count[0] >= n:
                        hit.append(table)
                        kill.now(f"emulated crash after node write {n}")
                return out

            def upsert(self: Any, table: str, data: Any, *, con: Any = None, in_commit: bool = in_commit,
                       kill: Kill = kill) -> int:
                out = orig_upsert(self, table, data, con=con)
                if in_commit and con is not None and table == "explanations":  # mid-transaction: rolled back
                    hit.append("group commit")
                    kill.now("emulated crash inside a commit")
                return out

            mp.setattr(Outbox, "upsert", add)
            mp.setattr(Store, "upsert", upsert)
            try:
                res = run_plan(store, kit["prep"], resume=run_id is not None, commit=commit)
            except SimulatedCrash:
                pass
        run_id = run_id or plan_runs(store.path)[0][0]
        if res is not None:
            break
        assert plan_runs(store.path) == [(run_id, "running")]
    assert res is not None, f"the run did not finish within 1000 writes: {hit}"
    assert len(hit) >= 5 and len(set(hit)) >= 4 and "group commit" in hit, \
        f"the crashes should land in different kinds of writes and in a commit: {hit}"
    assert res.run_id == run_id and plan_runs(store.path) == [(run_id, "done")]
    assert any(o.skipped for o in res.outcomes) and all(o.status.value in OK for o in res.outcomes)
    got = content(store.path, run_id)
    for key, want in clean["content"].items():
        assert got[key] == want, f"{key} differ from an uninterrupted run (crashes after: {hit})"
    assert_no_duplicates(store.path, run_id)
    assert set(rows(store.path, "select cache_key, tool from tool_cache")) == clean["cache"]
    assert spy.forward_runs() == clean["forward_runs"], hit  # a computed result is never computed again
    attempts = [a for (a,) in rows(store.path, "select attempts from work_items where run_id = ?", [run_id])]
    assert max(attempts) >= 2 and min(attempts) == 1


def test_a_crash_between_a_nodes_writes_and_its_checkpoint_loses_nothing(kit: dict[str, Any],
                                                                         clean: dict[str, Any], tmp_path: Path) -> None:
    """The soak's lost item, made deterministic: killed after ``accept``'s writes were saved to the checkpointer
    but before its checkpoint was, an item reads as finished on resume (langgraph applies the saved writes instead
    of running the node again) although no checkpoint in its history holds ``accept``'s rows. They must still be
    replayed: before the fix the item stayed ``running`` with no final explanation while the run said done."""
    from langgraph.checkpoint.sqlite import SqliteSaver

    from autoexplain.agent.runner import run_plan
    from autoexplain.agent.store import Store

    store = Store(copy_db(kit["template"], tmp_path / "crash.duckdb"))
    orig_put = SqliteSaver.put
    run_id = None
    for crash_at in (1, 2):  # the first and the second item's final checkpoint of each call
        seen = [0]
        with pytest.MonkeyPatch.context() as mp:
            kill = Kill(mp)

            def put(self: Any, config: Any, checkpoint: Any, metadata: Any, new_versions: Any,
                    seen: list[int] = seen, crash_at: int = crash_at, kill: Kill = kill) -> Any:
                if (checkpoint.get("channel_values") or {}).get("outcome"):
                    seen[0] += 1
                    if seen[0] == crash_at:
                        kill.now("emulated crash between a node's saved writes and its checkpoint")
                return orig_put(self, config, checkpoint, metadata, new_versions)

            mp.setattr(SqliteSaver, "put", put)
            with pytest.raises(SimulatedCrash):
                run_plan(store, kit["prep"], resume=run_id is not None)
        run_id = run_id or plan_runs(store.path)[0][0]
    res = run_plan(store, kit["prep"], resume=True)
    assert res.run_id == run_id and plan_runs(store.path) == [(run_id, "done")]
    assert any(o.skipped for o in res.outcomes), "the crashed items should have been recovered, not run again"
    got = content(store.path, run_id)
    for key, want in clean["content"].items():
        assert got[key] == want, f"{key} differ from an uninterrupted run"
    assert_no_duplicates(store.path, run_id)


# ============================================================================= kill -9 (subprocesses)
def _wait(cond: Callable[[], bool], proc: subprocess.Popen, timeout: float) -> bool:
    """Poll ``cond`` until it holds (True) or the process ends (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if cond():
            return True
        time.sleep(0.2)
    raise AssertionError(f"no progress within {timeout} s")


def _item_lines(log: Path) -> list[str]:
    """A ``run`` process's per-item lines on stderr so far."""
    return [ln for ln in log.read_text(errors="replace").splitlines()
            if ln.strip().startswith(tuple(f"{s} " for s in (*OK, "budget_limited", "failed")))]


def _ran(log: Path) -> int:
    """Items a ``run`` process has finished itself (resumed ones not counted)."""
    return sum(1 for ln in _item_lines(log) if "(resumed" not in ln)


def _lines(log: Path) -> int:
    """Items a ``run`` process has gone through (finished by itself or earlier)."""
    return len(_item_lines(log))


def _finished(db: Path) -> dict[str, tuple[Any, ...]]:
    return {r[0]: r[1:] for r in rows(db, "select item_id, status, attempts, finished_at from work_items "
                                          f"where status in {(*OK, 'budget_limited', 'failed')!s}")}


def _rows_of(db: Path, item_ids: list[str]) -> dict[str, set[tuple[Any, ...]]]:
    """The stored rows of finished items, with their timestamps (rewritten rows would change them)."""
    ids = [list(item_ids)]
    return {
        "tool_calls": set(rows(db, "select call_id, tool, created_at, summary from tool_calls "
                                   "where item_id in (select unnest(?))", ids)),
        "explanations": set(rows(db, "select explanation_id, created_at, is_final, overall from explanations "
                                     "where item_id in (select unnest(?))", ids)),
        "scores": set(rows(db, "select s.score_id, s.created_at, s.value from scores s join explanations e "
                               "using (explanation_id) where e.item_id in (select unnest(?))", ids)),
        "hypotheses": set(rows(db, "select hypothesis_id, updated_at, status from hypotheses "
                                   "where item_id in (select unnest(?))", ids)),
    }


def assert_untouched_since_kills(db: Path, final: dict[str, tuple[Any, ...]],
                                 snapshots: list[tuple[dict[str, tuple[Any, ...]], dict[str, set[tuple[Any, ...]]],
                                                       dict[str, Any]]]) -> None:
    """Items finished before a kill were never touched again, and cached tool results never recomputed: each
    snapshot (finished items, their rows, the tool cache) taken after a kill still holds in the final database."""
    for done, stored, cache in snapshots:
        assert {i: final[i] for i in done} == done
        now = _rows_of(db, list(done))
        for table, before_rows in stored.items():
            assert now[table] == before_rows, f"{table} of items finished before a kill changed on resume"
        now_cache = dict(rows(db, "select cache_key, created_at from tool_cache"))
        assert {k: now_cache[k] for k in cache} == cache, "a cached tool result was computed again"


def kill_9(proc: subprocess.Popen[bytes], log: IO[str]) -> None:
    """``kill -9`` the process if it still runs, reap it and close its log (also when waiting for the moment
    to kill went wrong)."""
    try:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def test_kill_9_at_random_points_then_resume(kit: dict[str, Any], clean: dict[str, Any], tmp_path: Path) -> None:
    rng = random.Random(20240607)
    db = copy_db(kit["template"], tmp_path / "kill.duckdb")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(kit["data"]))
    n_items = len(clean["content"]["items"])
    run_id = None
    kills = 0
    snapshots: list[tuple[dict[str, tuple[Any, ...]], dict[str, set[tuple[Any, ...]]], dict[str, Any]]] = []
    for cycle in range(4):
        before = _finished(db)
        log = (tmp_path / f"cycle{cycle}.err").open("w")
        proc = subprocess.Popen([*CLI, "run", str(plan), "--db", str(db), *(["--resume"] if cycle else [])],
                                cwd=tmp_path, env=agent_env(), stdout=subprocess.DEVNULL, stderr=log)
        try:
            if cycle == 0:  # soon after the run starts: splitting examples, or in the first items
                alive = _wait(lambda: bool(rows(db, "select 1 from runs where kind = 'plan'")), proc, 300)
                pause = rng.uniform(0.0, 1.0)
            elif cycle == 3 and CIRCUIT:  # in the last items: the circuit (the last one) takes a few seconds
                alive = _wait(lambda c=cycle: _lines(tmp_path / f"cycle{c}.err") >= 1, proc, 300)
                pause = rng.uniform(0.2, 1.0)
            else:  # cycle 1: after this process ran one item; later: once it reached its items (its first line
                # is an item recovered or already done). Then somewhere in the next ones (an item takes ~0.1-1 s).
                # The item lines on stderr tell: the database shows an item only once a group commit holds it.
                # (Waiting for a newly run item in cycle 2 could mean waiting for the whole circuit item.)
                count = _ran if cycle == 1 else _lines
                alive = _wait(lambda c=cycle, f=count: f(tmp_path / f"cycle{c}.err") >= 1, proc, 300)
                pause = rng.uniform(0.0, 0.15)
            if alive:
                time.sleep(pause)
        finally:
            kill_9(proc, log)
        runs = plan_runs(db)
        run_id = run_id or runs[0][0]
        if proc.returncode == 0 or runs == [(run_id, "done")]:
            break  # it finished before the kill landed: nothing left to resume
        assert proc.returncode == -signal.SIGKILL, (tmp_path / f"cycle{cycle}.err").read_text()[-2000:]
        kills += 1
        assert runs == [(run_id, "running")], runs
        done = _finished(db)
        assert all(done[i] == v for i, v in before.items()), "a finished item changed after a kill"
        snapshots.append((done, _rows_of(db, list(done)),
                          dict(rows(db, "select cache_key, created_at from tool_cache"))))
    assert kills >= 3, f"only {kills} kills landed before the run finished"

    # let it finish (unless the last process finished the run before its kill landed)
    if plan_runs(db) != [(run_id, "done")]:
        n_done = len(_finished(db))
        p = subprocess.run([*CLI, "run", str(plan), "--db", str(db), "--resume"], cwd=tmp_path, env=agent_env(),
                           capture_output=True, text=True, timeout=600, check=False)
        assert p.returncode == 0, p.stderr[-3000:]
        assert plan_runs(db) == [(run_id, "done")], "--resume continued the killed run"
        # one line per item; not run again: the items committed before the last kill, and any that had finished
        # in a checkpoint whose commit the kill cut off (their rows came back from it)
        lines = [ln for ln in p.stderr.splitlines()
                 if ln.strip().startswith(tuple(f"{s} " for s in (*OK, "budget_limited", "failed")))]
        ran = [ln for ln in lines if "(resumed" not in ln]
        assert len(lines) == n_items and len(ran) <= n_items - n_done, p.stderr[-3000:]
    final = _finished(db)
    assert len(final) == n_items and {v[0] for v in final.values()} <= set(OK)
    assert rows(db, "select count(*) from work_items") == [(n_items,)]
    assert any(v[1] >= 2 for v in final.values()), "no kill landed inside an item"

    assert_untouched_since_kills(db, final, snapshots)

    # the same results as the uninterrupted run, and nothing twice
    got = content(db, run_id)
    for key, want in clean["content"].items():
        assert got[key] == want, f"{key} differ from an uninterrupted run"
    assert_no_duplicates(db, run_id)
    assert set(rows(db, "select cache_key, tool from tool_cache")) == clean["cache"]
    assert len({c for (c,) in rows(db, "select call_id from tool_calls")}) == \
        rows(db, "select count(*) from tool_calls")[0][0]


# ============================================================================= resume semantics
@pytest.fixture(scope="module")
def small(kit: dict[str, Any]) -> Callable[..., Any]:
    """A small plan (one live, one dead feature of res0), prepared; keywords change the plan."""
    from autoexplain.agent.runner import Plan, prepare

    def make(**extra: Any) -> Any:
        data = plan_data({SAES[0]: features_spec(kit["picked"][SAES[0]], 1, 1)}, **extra)
        return prepare(Plan.model_validate(data))

    return make


def test_resume_continues_the_newest_unfinished_run_of_the_same_plan(kit: dict[str, Any], small: Any,
                                                                    tmp_path: Path) -> None:
    from autoexplain.agent.runner import run_plan
    from autoexplain.agent.store import Store

    store = Store(copy_db(kit["template"], tmp_path / "r.duckdb"))
    prep = small()
    with pytest.MonkeyPatch.context() as mp, pytest.raises(SimulatedCrash):
        run_plan(store, prep, on_node=Kill(mp).after_nodes(3))
    with pytest.MonkeyPatch.context() as mp, pytest.raises(SimulatedCrash):
        run_plan(store, prep, on_node=Kill(mp).after_nodes(3))  # no --resume: a second run of the same plan
    (a, sa), (b, sb) = plan_runs(store.path)
    assert a != b and sa == sb == "running"
    res = run_plan(store, prep, resume=True)
    assert res.run_id == b, "resume continues the newest unfinished run"
    assert dict(plan_runs(store.path)) == {a: "running", b: "done"}
    assert all(o.status.value in OK for o in res.outcomes)
    # the older run was left alone
    assert {s for (s,) in rows(store.path, "select status from work_items where run_id = ?", [a])} <= \
        {"pending", "running", *OK}
    unfinished = f"select count(*) from work_items where run_id = ? and status not in {OK_SQL}"
    assert rows(store.path, unfinished, [a])[0][0] >= 1
    # and can still be finished later: resume now finds it
    res_a = run_plan(store, prep, resume=True)
    assert res_a.run_id == a and dict(plan_runs(store.path)) == {a: "done", b: "done"}


def test_a_changed_plan_starts_a_new_run(kit: dict[str, Any], small: Any, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from autoexplain.agent.runner import run_plan
    from autoexplain.agent.store import Store

    store = Store(copy_db(kit["template"], tmp_path / "r.duckdb"))
    with pytest.MonkeyPatch.context() as mp, pytest.raises(SimulatedCrash):
        run_plan(store, small(), on_node=Kill(mp).after_nodes(4))
    (a, _), = plan_runs(store.path)
    changed = small(budget={"steps": 30})
    res = run_plan(store, changed, resume=True)
    assert res.run_id != a
    assert dict(plan_runs(store.path)) == {a: "running", res.run_id: "done"}
    # its items are its own (ids derive from the run), and nothing was skipped as "already done"
    assert not any(o.skipped for o in res.outcomes)
    assert not {o.item_id for o in res.outcomes} & {i for (i,) in rows(
        store.path, "select item_id from work_items where run_id = ?", [a])}
    # a finished plan is not resumed either: --resume starts afresh, and the tool cache answers every forward pass
    spy = Spy(monkeypatch)
    again = run_plan(store, changed, resume=True)
    assert again.run_id not in (a, res.run_id)
    assert spy.calls and spy.forward_runs() == 0
    assert [o.text for o in again.outcomes] == [o.text for o in res.outcomes]


# ============================================================================= readers mid-run
def test_a_query_mid_run_sees_finished_items_without_waiting_for_the_group(kit: dict[str, Any],
                                                                          tmp_path: Path) -> None:
    """With group commit set to an hour, a reader that announces itself (``autoexplain sql`` does) still gets the
    finished items committed when the current step ends; it never sees half an item."""
    db = copy_db(kit["template"], tmp_path / "mid.duckdb")
    picked = kit["picked"]
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(plan_data({s: features_spec(picked[s], 12, 4) for s in SAES},
                                         commit={"seconds": 3600, "items": 1000})))
    log = (tmp_path / "run.err").open("w")
    proc = subprocess.Popen([*CLI, "run", str(plan), "--db", str(db)], cwd=tmp_path, env=agent_env(),
                            stdout=subprocess.DEVNULL, stderr=log)
    seen: list[tuple[int, int]] = []  # (items the process had finished, items the query saw finished)
    try:
        _wait(lambda: _ran(tmp_path / "run.err") >= 1, proc, 300)
        while proc.poll() is None:
            ran = _ran(tmp_path / "run.err")
            (done,), = rows(db, f"select count(*) from work_items where status in {OK_SQL}")
            if proc.poll() is None:
                seen.append((ran, done))
                # whole items only: every item the query sees as done has its final explanation and scores
                (partial,), = rows(db, f"select count(*) from work_items w where w.status in {OK_SQL} and not exists ("
                                       "select 1 from explanations e where e.item_id = w.item_id and e.is_final "
                                       "and (e.text like 'dead feature%' or exists (select 1 from scores s "
                                       "where s.explanation_id = e.explanation_id)))")
                assert partial == 0
            time.sleep(0.05)
        assert proc.wait(timeout=300) == 0, (tmp_path / "run.err").read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    (n,), = rows(db, "select count(*) from work_items")
    assert n >= 8 and rows(db, f"select count(*) from work_items where status in {OK_SQL}") == [(n,)]
    assert any(0 < done < n for _, done in seen), f"no finished item became visible while others ran: {seen}"


def test_the_checkpoint_file_is_compacted_once_every_item_is_committed(clean: dict[str, Any]) -> None:
    """Committed items' checkpoints are deleted and the file gives their pages back (it stays small)."""
    import sqlite3

    from autoexplain.agent.runner import checkpoint_path

    con = sqlite3.connect(checkpoint_path(clean["db"]))
    try:
        assert con.execute("select count(*) from checkpoints").fetchone()[0] == 0
        assert con.execute("pragma freelist_count").fetchone()[0] == 0, "deleted checkpoints' pages were kept"
    finally:
        con.close()
