"""The Ray executor (``--executor ray``): the same results as a serial run, and the same crash safety.

* 2 local Ray workers label the same features (and explain the same circuit) as a serial run: identical
  explanations, scores, hypotheses, tool calls and judgements, compared target by target (ids derive from the run id);
* a worker process killed after it took an item: its item goes to a fresh actor, the run completes, nothing twice;
* the driver (the ``autoexplain run`` process) killed with SIGKILL mid-run: ``--resume --executor ray`` completes,
  and the items the killed driver had received are recovered from its checkpoints, not run again;
* the LLM token bucket spaces requests from several processes; bad executor flags are one line, exit code 2.

Every Ray test in this process shares ONE local Ray session (2 CPUs, module scope): the executor uses a session it
finds instead of starting its own. The CLI tests start their own local Ray, as a user's command does.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import statistics
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from cli_support import CLI, assert_input_error
from fake_openai import FakeOpenAI
from test_agent_llm import KEY, Researcher
from test_agent_offline import OK, SAES, agent_env, copy_db, features_spec, harvested_template, plan_data, rows
from test_agent_resume import CIRCUIT, _item_lines, _wait, assert_no_duplicates, content, kill_9, plan_runs

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def llm_server() -> Any:
    """A scripted OpenAI-compatible server for the module, named in the environment before Ray starts (local Ray
    workers inherit the driver's environment; the llm test sets its script)."""
    with FakeOpenAI() as srv, pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENAI_BASE_URL", srv.base_url)
        mp.setenv("OPENAI_API_KEY", KEY)
        yield srv


@pytest.fixture(scope="module")
def ray_local(tiny_zoo, llm_server) -> Any:
    """One local Ray for the module (started after the isolated cache is set: the workers inherit it)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR, object_store_memory=128 * 1024**2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def kit(tiny_zoo, one_thread) -> dict[str, Any]:
    """3 live + 1 dead feature of each tiny SAE (and one circuit when circuit scoring exists)."""
    from autoexplain.agent.runner import Plan, prepare

    template, picked = harvested_template()
    data = plan_data({s: features_spec(picked[s], 3, 1) for s in SAES}, circuit=CIRCUIT, name="ray-test")
    return {"template": template, "data": data, "prep": prepare(Plan.model_validate(data))}


@pytest.fixture(scope="module")
def serial(kit: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The reference: the plan run serially."""
    from autoexplain.agent.runner import run_plan
    from autoexplain.agent.store import Store

    db = copy_db(kit["template"], tmp_path_factory.mktemp("serial") / "serial.duckdb")
    res = run_plan(Store(db), kit["prep"])
    assert all(o.status.value in OK for o in res.outcomes), [(o.target, o.status, o.error) for o in res.outcomes]
    return {"res": res, "content": content(db, res.run_id)}


def outcome_key(o: Any) -> tuple[Any, ...]:
    return o.target, o.status, o.text, o.scores, o.overall


def test_ray_run_equals_a_serial_run(ray_local: Any, kit: dict[str, Any], serial: dict[str, Any],
                                     tmp_path: Path) -> None:
    from autoexplain.agent.ray_executor import RayExecutor, RayOptions
    from autoexplain.agent.runner import run_plan
    from autoexplain.agent.store import Store

    db = copy_db(kit["template"], tmp_path / "ray.duckdb")
    pids: list[int] = []
    ex = RayExecutor(RayOptions(workers=2), on_dispatch=lambda item_id, pid: pids.append(pid))
    res = run_plan(Store(db), kit["prep"], executor=ex)
    assert len(set(pids)) == 2 and os.getpid() not in pids, "both workers took items, none ran in the driver"
    assert [outcome_key(o) for o in res.outcomes] == [outcome_key(o) for o in serial["res"].outcomes]
    got = content(db, res.run_id)
    for key, want in serial["content"].items():
        assert got[key] == want, f"{key} differ from the serial run"
    assert_no_duplicates(db, res.run_id)
    assert rows(db, "select status from runs where run_id = ?", [res.run_id]) == [("done",)]
    assert rows(db, "select count(*) from work_items where run_id = ? and attempts = 1", [res.run_id]) == \
        [(len(res.outcomes),)]
    assert not Path(str(db) + ".checkpoints.sqlite").exists() or \
        rows(db, "select 1 from work_items where run_id = ? and status not in ('done', 'weak', 'no_behaviour')",
             [res.run_id]) == []


def test_a_killed_worker_s_item_is_retried_with_no_duplicate_rows(ray_local: Any, kit: dict[str, Any],
                                                                   serial: dict[str, Any], tmp_path: Path) -> None:
    from autoexplain.agent.ray_executor import RayExecutor, RayOptions
    from autoexplain.agent.runner import run_plan
    from autoexplain.agent.store import Store

    db = copy_db(kit["template"], tmp_path / "killed.duckdb")
    dispatched: list[tuple[str, int]] = []
    killed: list[tuple[str, int]] = []

    def on_dispatch(item_id: str, pid: int) -> None:
        dispatched.append((item_id, pid))
        if len(dispatched) == 3:  # the third item: kill its worker once it is working on it (or its next one)
            killed.append((item_id, pid))
            threading.Timer(0.1, os.kill, (pid, signal.SIGKILL)).start()

    ex = RayExecutor(RayOptions(workers=2), on_dispatch=on_dispatch)
    res = run_plan(Store(db), kit["prep"], executor=ex)
    (_, pid), = killed
    times = Counter(i for i, _ in dispatched)
    again = {i for i, n in times.items() if n > 1}
    assert again, "no item of the killed worker was given to another actor"
    assert ex.retried == sum(n - 1 for n in times.values())
    last = dict(dispatched)  # item -> the worker it ran on last
    assert all(last[i] != pid for i in again), "retried on a new actor, not the dead one"
    for i, n in times.items():  # every dispatch counts as an attempt, the dead worker's included
        assert rows(db, "select attempts from work_items where item_id = ?", [i]) == [(n,)]
    assert [outcome_key(o) for o in res.outcomes] == [outcome_key(o) for o in serial["res"].outcomes]
    got = content(db, res.run_id)
    for key, want in serial["content"].items():
        assert got[key] == want, f"{key} differ from the serial run"
    assert_no_duplicates(db, res.run_id)


def test_driver_killed_then_resume_completes(tiny_zoo, kit: dict[str, Any], serial: dict[str, Any],
                                            tmp_path: Path) -> None:
    db = copy_db(kit["template"], tmp_path / "driver.duckdb")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(kit["data"]))
    cmd = [*CLI, "run", str(plan), "--db", str(db), "--executor", "ray", "--workers", "2"]
    log_path = tmp_path / "first.err"
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=agent_env(), stdout=subprocess.DEVNULL, stderr=log)
    try:  # killed once the driver has received two items (not committed yet: the group commit waits 30 s)
        alive = _wait(lambda: len(_item_lines(log_path)) >= 2, proc, 300)
    finally:
        kill_9(proc, log)
    assert alive and proc.returncode == -signal.SIGKILL, log_path.read_text()[-2000:]
    received = len(_item_lines(log_path))
    (run_id, status), = plan_runs(db)
    assert status == "running"
    p = subprocess.run([*cmd, "--resume"], cwd=tmp_path, env=agent_env(), capture_output=True, text=True,
                       timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    assert plan_runs(db) == [(run_id, "done")], "--resume continued the killed run"
    lines = [ln for ln in p.stderr.splitlines() if ln.strip().startswith(tuple(f"{s} " for s in OK))]
    assert len(lines) == len(serial["res"].outcomes), p.stderr[-3000:]
    assert sum("(resumed" in ln for ln in lines) >= received, "items the killed driver had received ran again"
    got = content(db, run_id)
    for key, want in serial["content"].items():
        assert got[key] == want, f"{key} differ from the serial run"
    assert_no_duplicates(db, run_id)


def test_llm_policy_on_ray_equals_serial_and_shares_one_rate_limit(ray_local: Any, llm_server: Any,
                                                                   kit: dict[str, Any], tmp_path: Path) -> None:
    """The llm policy on 2 workers: the same explanations, scores and LLM calls as a serial run against the same
    scripted model, and the requests of both workers together never faster than the shared limit."""
    from autoexplain.agent.ray_executor import RayExecutor, RayOptions
    from autoexplain.agent.runner import Plan, prepare, run_plan
    from autoexplain.agent.store import Store

    _, picked = harvested_template()
    items = [{"label": {"sae": s, "features": features_spec(picked[s], n, 0)}} for s, n in zip(SAES, (2, 1))]
    plan = Plan.model_validate({"name": "ray-llm", "model": "toy:tiny", "policy": "llm", "llm_model": "fake",
                                "items": items})
    prep = prepare(plan)
    arrivals: list[float] = []
    script = Researcher()

    def timed(body: dict[str, Any], n: int) -> Any:
        arrivals.append(time.monotonic())
        return script(body, n)

    llm_server.responder = timed
    serial_db = copy_db(kit["template"], tmp_path / "serial.duckdb")
    want = run_plan(Store(serial_db), prep)
    n_serial = len(arrivals)
    serial_gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    arrivals.clear()
    ray_db = copy_db(kit["template"], tmp_path / "ray.duckdb")
    rate = 4.0
    got = run_plan(Store(ray_db), prep, executor=RayExecutor(RayOptions(workers=2, llm_rate=rate, llm_burst=1)))
    assert all(o.status.value in OK for o in got.outcomes), [(o.target, o.status, o.error) for o in got.outcomes]
    assert [outcome_key(o) for o in got.outcomes] == [outcome_key(o) for o in want.outcomes]
    assert content(ray_db, got.run_id) == content(serial_db, want.run_id)
    # every request the workers made is logged in the driver's database, charged to its item (request hashes
    # differ between the runs: the messages quote tool call ids, which derive from the run id)
    calls = "select w.target, c.purpose, c.attempt, c.ok, c.mode from llm_calls c join work_items w using (item_id) " \
            "where c.run_id = ?"
    assert sorted(rows(ray_db, calls, [got.run_id])) == sorted(rows(serial_db, calls, [want.run_id]))
    assert len(arrivals) == n_serial > 4
    # 4 requests per second over both workers: slots 0.25 s apart. A request reaches the server some time after
    # its slot (process scheduling on a loaded machine), so single gaps jitter: the span and the median gap tell
    # (without the shared bucket the two workers' requests come tens of milliseconds apart)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert arrivals[-1] - arrivals[0] >= 0.95 * (len(arrivals) - 1) / rate, gaps
    assert statistics.median(gaps) >= 0.9 / rate, gaps
    assert statistics.median(serial_gaps) < 0.9 / rate, serial_gaps  # the check tells (serial: not limited)


def stored(db: Path, table: str, sae_id: str) -> list[tuple[Any, ...]]:
    """Every row of ``table`` for ``sae_id``, without the columns that name a run or a time."""
    from autoexplain.agent.store import run_query

    cols, got = run_query(db, f"select * from {table} where sae_id = ?", [sae_id])
    keep = [i for i, c in enumerate(cols) if c != "run_id" and not c.endswith("_at") and not c.endswith("_s")]
    return sorted((tuple(r[i] for i in keep) for r in got), key=repr)


def test_ray_sharded_harvest_equals_one_pass(ray_local: Any, tmp_path: Path) -> None:
    """``--executor ray`` harvests an SAE in shards (one Ray task per worker) merged exactly: the stored features
    and examples equal those of the serial run's single pass, and so do the labels."""
    from autoexplain.agent.ray_executor import RayExecutor, RayOptions
    from autoexplain.agent.runner import Plan, prepare, run_plan
    from autoexplain.agent.store import Store

    plan = Plan.model_validate({"name": "ray-harvest", "model": "toy:tiny",
                                "items": [{"label": {"sae": SAES[0], "features": "0", "tokens": 6000}}]})
    prep = prepare(plan)
    sae_id = prep.saes[SAES[0]].sae_id
    want = run_plan(Store(tmp_path / "serial.duckdb"), prep)
    ex = RayExecutor(RayOptions(workers=2))
    got = run_plan(Store(tmp_path / "ray.duckdb"), prep, executor=ex)
    assert ex.shards_run == 2, "the harvest did not run in shards on Ray"
    for table in ("features", "feature_examples"):
        a, b = stored(tmp_path / "serial.duckdb", table, sae_id), stored(tmp_path / "ray.duckdb", table, sae_id)
        assert a and a == b, f"{table} differ from the single pass"
    assert [outcome_key(o) for o in got.outcomes] == [outcome_key(o) for o in want.outcomes]


def test_token_bucket_spaces_requests_known_answer() -> None:
    from autoexplain.agent.ray_executor import TokenBucket

    bucket = TokenBucket(rate=10.0, burst=3)
    waits = [bucket.reserve() for _ in range(6)]
    # three at once (the burst), then one every 0.1 s
    assert waits[:3] == [0.0, 0.0, 0.0]
    assert [round(w, 1) for w in waits[3:]] == [0.1, 0.2, 0.3]


def test_token_bucket_is_shared_across_processes(ray_local: Any) -> None:
    from autoexplain.agent.ray_executor import TokenBucket

    bucket = ray.remote(num_cpus=0)(TokenBucket).remote(20.0, 1)

    @ray.remote(num_cpus=0)
    def caller(n: int) -> list[float]:
        out = []
        for _ in range(n):
            time.sleep(ray.get(bucket.reserve.remote()))
            out.append(time.time())
        return out

    times = sorted(t for ts in ray.get([caller.remote(5), caller.remote(5)]) for t in ts)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert min(gaps) > 0.04, gaps  # 20 per second over both processes: 0.05 s apart (clock jitter allowed)
    assert times[-1] - times[0] >= 0.4


@pytest.mark.parametrize(("args", "needle"), [
    (["--workers", "3"], "--workers only apply to --executor ray"),
    (["--executor", "ray", "--address", "not an address"], "--address"),
    (["--executor", "ray", "--workers", "0"], "--workers"),
])
def test_bad_executor_flags_are_one_line(tmp_path: Path, args: list[str], needle: str) -> None:
    from cli_support import run_cli

    res = run_cli(["label", "--model", "toy:tiny", "--sae", "toy:tiny/res0", "--db", "out.duckdb", *args], tmp_path)
    assert_input_error(res, needle)
    assert not (tmp_path / "out.duckdb").exists()
