"""The command line does what a plan says (#20): the README's plan finishes every item, a run that leaves items
pending says so and exits 3, ``live:N`` labels features that fired, and Ctrl-C ends in one line, exit 130, with the
run marked interrupted and resumable."""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

from tests.agent.test_agent_offline import CLI, agent_env, rows, run_agent_cli

README = Path(__file__).resolve().parents[3] / "README.md"


def readme_plan() -> str:
    """The YAML block after "A plan (YAML or JSON)" in the README, as written."""
    text = README.read_text(encoding="utf-8")
    start = text.index("A plan (YAML or JSON)")
    m = re.search(r"```yaml\n(.*?)```", text[start:], re.S)
    assert m, "the README lost its plan example"
    return m.group(1)


def test_the_readmes_plan_runs_as_written_and_finishes_every_item(tiny_zoo, tmp_path: Path) -> None:
    """The README's plan with small sizes (the tiny toy world, a few features): every item finishes, although
    the run budget names only seconds (the other limits must not fall back to the per-item 40 steps)."""
    plan = readme_plan()
    assert "run_budget: {seconds: 36000}" in plan
    small = (plan.replace("toy:small", "toy:tiny").replace('features: "0-511"', 'features: "0-5"')
             .replace('features: "live:50"', 'features: "live:3"'))
    assert small.count("toy:tiny") >= 3, small
    (tmp_path / "overnight.yaml").write_text(small, encoding="utf-8")
    res = run_agent_cli(["run", "overnight.yaml", "--db", "out.duckdb"], tmp_path, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    db = tmp_path / "out.duckdb"
    statuses = dict(rows(db, "select status, count(*) from work_items group by all"))
    assert sum(statuses.values()) == 6 + 3 + 1, statuses
    assert not {"pending", "running", "failed"} & set(statuses), statuses
    assert rows(db, "select status from runs where kind = 'plan'") == [("done",)]
    steps = rows(db, "select sum(json_extract(budget, '$.steps')::int) from work_items")[0][0]
    assert steps > 40, "the run must go past the per-item default of 40 steps in total"
    assert "pending" in res.stdout  # the summary table has a pending column


def test_a_run_that_leaves_items_pending_says_so_and_exits_3(tiny_zoo, tmp_path: Path) -> None:
    (tmp_path / "plan.yaml").write_text(
        "name: short\nmodel: toy:tiny\nrun_budget: {steps: 4}\nitems:\n"
        "  - label: {sae: toy:tiny/res0, features: \"live:4\"}\n", encoding="utf-8")
    res = run_agent_cli(["run", "plan.yaml", "--db", "out.duckdb"], tmp_path, timeout=600)
    assert res.returncode == 3, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr
    assert "not started (the run budget ran out): autoexplain run plan.yaml --resume" in res.flat_stdout
    db = tmp_path / "out.duckdb"
    left = rows(db, "select count(*) from work_items where status = 'pending'")[0][0]
    assert left >= 1
    # --resume starts them with a new run budget
    again = run_agent_cli(["run", "plan.yaml", "--db", "out.duckdb", "--resume"], tmp_path, timeout=600)
    assert again.returncode in (0, 3)
    assert rows(db, "select count(*) from work_items where status = 'pending'")[0][0] < left


def test_live_n_labels_only_features_that_fired(tiny_zoo, tmp_path: Path) -> None:
    res = run_agent_cli(["label", "--model", "toy:tiny", "--sae", "toy:tiny/mlp1", "--features", "live:3",
                         "--tokens", "8000", "--db", "out.duckdb"], tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    db = tmp_path / "out.duckdb"
    labelled = rows(db, "select f.feature_index, f.is_dead from work_items w join features f "
                        "on w.target = f.sae_id || '#' || f.feature_index order by 1")
    live = rows(db, "select feature_index from features where not is_dead order by 1 limit 3")
    assert [i for i, _ in labelled] == [i for (i,) in live] and not any(d for _, d in labelled)
    assert not any(t.startswith("dead feature") for (t,) in rows(db, "select text from explanations"))


def test_ctrl_c_marks_the_run_interrupted_and_says_how_to_resume(tiny_zoo, tmp_path: Path) -> None:
    """SIGINT after a few items have finished: exit 130, one last stderr line saying which run is marked
    interrupted, where its results are and how to resume; ``--resume`` then finishes the run."""
    import threading

    args = ["label", "--model", "toy:tiny", "--sae", "toy:tiny/res0", "--features", "0-60", "--tokens", "8000",
            "--db", "out.duckdb"]
    proc = subprocess.Popen([*CLI, *args], cwd=tmp_path, env=agent_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    three = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if sum(bool(re.match(r"\s+(done|weak)\s+sae-", x)) for x in lines) >= 3:
                three.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert three.wait(600), "".join(lines)[-2000:]
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        reader.join(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = "".join(lines)
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert "Traceback" not in err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("autoexplain: interrupted: run label-") and "is marked interrupted" in last, last
    db = tmp_path / "out.duckdb"
    assert str(db.resolve()) in last and "--resume" in last
    assert rows(db, "select status from runs where kind = 'label'") == [("interrupted",)]
    finished = rows(db, "select count(*) from work_items where status not in ('pending', 'running')")[0][0]
    assert 3 <= finished < 61
    again = run_agent_cli([*args, "--resume"], tmp_path, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    assert rows(db, "select status from runs where kind = 'label'") == [("done",)]
    assert rows(db, "select count(*) from work_items where status in ('pending', 'running')") == [(0,)]
