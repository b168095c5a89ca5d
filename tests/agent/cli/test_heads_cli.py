"""``autoexplain heads`` on the tiny random-weight GPT-2 (shape of the output and exit codes only: random weights
have no roles to find; the planted models, which do, are tested in tests/tools/test_heads.py)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from cli_support import OK_TASK, assert_input_error, run_cli


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("heads-cli")
    (d / "task.json").write_text(json.dumps(OK_TASK))
    return d


def test_table_with_task(tiny_gpt2_dir: Path, work: Path) -> None:
    res = run_cli(["heads", "--model", str(tiny_gpt2_dir), "--task", str(work / "task.json"), "--seqs", "4"], work)
    assert res.returncode == 0, res.stderr
    out = res.flat_stdout
    assert "head roles of" in out and "4 repeated random sequences" in out
    for head in ("a0.0", "a0.3", "a1.0", "a1.3"):
        assert head in out
    assert "attention at the answer position" in out and "prompt 1" in out
    assert res.after == res.before  # writes nothing


def test_json_is_the_role_table(tiny_gpt2_dir: Path, work: Path) -> None:
    from autoexplain.tools.heads import RoleTable

    res = run_cli(["heads", "--model", str(tiny_gpt2_dir), "--format", "json", "--seqs", "2",
                   "--task", str(work / "task.json")], work)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    att = data.pop("task_attention")
    table = RoleTable.model_validate(data)
    assert len(table.heads) == 8 and table.sequences["n_seqs"] == 2
    assert all(set(h.scores) == {"previous_token", "duplicate_token", "induction", "attends_bos", "copying",
                                 "suppression"} for h in table.heads)
    assert all(s.score is None or 0 <= s.score <= 1 for s in table.scores)
    assert len(att["prompts"]) == 2 and len(att["prompts"][0]["queries"]) == 8


def test_csv(tiny_gpt2_dir: Path, work: Path) -> None:
    res = run_cli(["heads", "--model", str(tiny_gpt2_dir), "--format", "csv", "--seqs", "2"], work)
    assert res.returncode == 0, res.stderr
    rows = list(csv.reader(io.StringIO(res.stdout)))
    assert rows[0][:3] == ["head", "best_role", "score"] and len(rows) == 9


@pytest.mark.parametrize(("args", "needle"), [
    (["--seqs", "0"], "--seqs"),
    (["--task", "missing.json"], "missing.json"),
    (["--task", "toy:nope/induction"], "nope"),
    (["--task", "toy:tiny/nonsense"], "nonsense"),
])
def test_bad_input_is_one_line_before_loading(tiny_gpt2_dir: Path, work: Path, args: list[str], needle: str) -> None:
    res = run_cli(["heads", "--model", str(tiny_gpt2_dir), *args], work)
    assert_input_error(res, needle)
    assert res.seconds < 30


def test_bad_model(work: Path) -> None:
    assert_input_error(run_cli(["heads", "--model", str(work / "no-such-model")], work), "no-such-model")
