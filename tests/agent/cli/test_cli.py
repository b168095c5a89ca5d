"""The real ``autoexplain`` command line, in subprocesses: every bad input is exit 2, one stderr line, no writes.

A ``check`` that loads a model costs a fresh interpreter about 6 s of imports (torch, transformers, TransformerLens,
sae-lens), so the model-loading cases are started together by one module fixture on a small process pool; each
test still asserts its own case. Every case runs in its own folder (cwd, inputs and ``AUTOEXPLAIN_CACHE``), so
"nothing was written" is a before/after snapshot of that folder.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from cli_support import CLI, D_MODEL, OK_TASK, OK_TEXTS, assert_input_error, cli_env, run_cli, save_sae, snapshot


# ============================================================================= model-loading cases, run together
@dataclass
class Case:
    dir: Path
    extra: list[str]  # arguments after ``check --model <tiny>``
    bad: Path | None = None  # the input the error must name


@pytest.fixture(scope="module")
def checks(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Case, Future]]]:
    root = tmp_path_factory.mktemp("cli-checks")
    cases: dict[str, Case] = {}

    def case(name: str) -> Path:
        d = root / name
        d.mkdir()
        return d

    d = case("wrong_d_in")
    cases["wrong_d_in"] = Case(d, ["--sae", str(sae := save_sae(d / "sae", D_MODEL + 16, "blocks.0.hook_resid_post"))],
                               sae)
    d = case("missing_layer")
    cases["missing_layer"] = Case(d, ["--sae", str(sae := save_sae(d / "sae", D_MODEL, "blocks.7.hook_resid_post"))],
                                  sae)
    d = case("unknown_site")
    cases["unknown_site"] = Case(d, ["--sae", str(sae := save_sae(d / "sae", D_MODEL, "blocks.0.foo"))], sae)
    d = case("no_hook")
    cases["no_hook"] = Case(d, ["--sae", str(sae := save_sae(d / "sae", D_MODEL, None))], sae)

    d = case("task_not_json")
    (bad := d / "task.json").write_text('{"prompts": [{"clean": "the cat",\n', encoding="utf-8")
    cases["task_not_json"] = Case(d, ["--task", str(bad)], bad)
    d = case("task_schema")
    (bad := d / "task.json").write_text(json.dumps({"prompts": [OK_TASK["prompts"][0], {
        "clean": "the cat sat on the", "corrupt": "the dog sat on the", "answers": []}]}), encoding="utf-8")
    cases["task_schema"] = Case(d, ["--task", str(bad)], bad)
    d = case("task_multi_token")
    (bad := d / "task.json").write_text(json.dumps({"prompts": [OK_TASK["prompts"][0], {
        "clean": "John gave a drink to", "corrupt": "Mary gave a drink to", "answers": [" Marylandia"]}]}),
        encoding="utf-8")
    cases["task_multi_token"] = Case(d, ["--task", str(bad)], bad)
    d = case("empty_dataset")
    (bad := d / "empty.txt").write_text("\n\n   \n\t\n\n", encoding="utf-8")
    cases["empty_dataset"] = Case(d, ["--dataset", str(bad)], bad)

    d = case("happy")
    sae = save_sae(d / "sae", D_MODEL, "blocks.1.hook_resid_post")
    (d / "data.txt").write_text("\n".join(OK_TEXTS) + "\n", encoding="utf-8")
    (d / "task.json").write_text(json.dumps(OK_TASK), encoding="utf-8")
    cases["happy"] = Case(d, ["--sae", str(sae), "--dataset", str(d / "data.txt"), "--task", str(d / "task.json"),
                              "--device", "cpu"])

    model_before = snapshot(tiny_gpt2_dir)
    pool = ThreadPoolExecutor(max_workers=max(2, min(len(cases), os.cpu_count() or 2)))
    futures = {name: (c, pool.submit(run_cli, ["check", "--model", str(tiny_gpt2_dir), *c.extra], c.dir))
               for name, c in cases.items()}
    yield futures
    pool.shutdown(wait=True)
    assert snapshot(tiny_gpt2_dir) == model_before, "check wrote into the model directory"


def _check_error(checks: dict[str, tuple[Case, Future]], name: str, *needles: str) -> str:
    case, fut = checks[name]
    res = fut.result()
    line = assert_input_error(res, str(case.bad), *needles)
    # the model itself loaded fine before the bad input was refused
    assert "sites exist and fire" in res.flat_stdout
    return line


def test_sae_with_wrong_width(checks: dict) -> None:
    _check_error(checks, "wrong_d_in", f"d_in {D_MODEL + 16}", f"width {D_MODEL}", "blocks.0.hook_resid_post")


def test_sae_hook_missing_from_model(checks: dict) -> None:
    _check_error(checks, "missing_layer", "blocks.7.hook_resid_post", "layers 0..1")


def test_sae_hook_not_a_known_site(checks: dict) -> None:
    case, fut = checks["unknown_site"]
    # the message names the hook (not the SAE's path): see the report
    assert_input_error(fut.result(), "'blocks.0.foo'", "not a site", "blocks.L.hook_resid_post")


def test_sae_without_hook_name(checks: dict) -> None:
    _check_error(checks, "no_hook", "names no hook", "hook_name")


def test_task_file_not_json(checks: dict) -> None:
    _check_error(checks, "task_not_json", "not valid JSON", "line 2")


def test_task_file_fails_schema(checks: dict) -> None:
    _check_error(checks, "task_schema", "prompts[1].answers", "non-empty list")


def test_task_answer_not_single_token(checks: dict) -> None:
    case, fut = checks["task_multi_token"]
    # names the prompt, the answer and its pieces (not the task file's path): see the report
    assert_input_error(fut.result(), "prompt 1", "' Marylandia'", "5 tokens", "' Mary'", "single-token answer")


def test_empty_dataset(checks: dict) -> None:
    _check_error(checks, "empty_dataset", "is empty")


def test_check_happy_path(checks: dict, tiny_gpt2_dir: Path) -> None:
    from transformers import AutoTokenizer

    from autoexplain.tools.data import load_texts, tokenize_windows

    case, fut = checks["happy"]
    res = fut.result()
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == ""
    out = res.flat_stdout
    assert "sites exist and fire" in out
    assert f"2 layers x 4 heads, d_model {D_MODEL}, context 32, on cpu" in out
    assert f"d_in {D_MODEL} -> d_sae 64 at resid_post.1 (blocks.1.hook_resid_post): fits the model" in out
    # the dataset line agrees with the library on the same tokenizer
    win = tokenize_windows(load_texts(str(case.dir / "data.txt")), AutoTokenizer.from_pretrained(str(tiny_gpt2_dir)),
                           ctx=32, n_ctx=32)
    assert f"{len(OK_TEXTS)} texts (first 10,000 read) -> {win.n_windows:,} windows of 32 tokens " \
           f"({win.n_tokens:,} tokens, BOS first)" in out
    m = re.search(r"2 prompts valid; model top-1 accuracy (\d+\.\d)%", out)
    assert m and float(m.group(1)) in (0.0, 50.0, 100.0), out  # two prompts: 0, 1 or 2 right
    assert res.after == res.before  # check writes nothing


# ============================================================================= fast cases, run one by one
def test_check_missing_model_path(tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist"
    assert_input_error(run_cli(["check", "--model", str(missing)], tmp_path), str(missing), "does not exist")


def test_check_dir_without_config(tmp_path: Path) -> None:
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\0" * 16)
    assert_input_error(run_cli(["check", "--model", str(folder)], tmp_path), str(folder), "no config.json")


def test_check_hub_name_offline_fails_fast(tmp_path: Path) -> None:
    res = run_cli(["check", "--model", "gpt2"], tmp_path, timeout=60)
    assert_input_error(res, "'gpt2'", "HF_HUB_OFFLINE")
    assert res.seconds < 15, f"took {res.seconds:.1f} s"


@pytest.mark.parametrize("args", [["sql", "select 1"], ["zoo", "build", "--name", "tiny"]], ids=["sql", "zoo-build"])
def test_garbage_db_is_refused_untouched(tmp_path: Path, args: list[str]) -> None:
    garbage = tmp_path / "results.duckdb"
    garbage.write_bytes(b"PK\x03\x04 definitely not duckdb " * 300)
    res = run_cli([*args, "--db", str(garbage)], tmp_path)
    assert_input_error(res, str(garbage), "not a DuckDB database")  # also: bytes unchanged, no .wal, no cache
    assert not (tmp_path / "cache").exists()


def test_zoo_build_unknown_name(tmp_path: Path) -> None:
    res = run_cli(["zoo", "build", "--name", "nosuch"], tmp_path)
    assert_input_error(res, "'nosuch'", "small", "tiny")
    assert not (tmp_path / "autoexplain.duckdb").exists()
    assert res.after == {}


def test_sql_missing_db_and_write_statement(tmp_path: Path) -> None:
    assert_input_error(run_cli(["sql", "select 1"], tmp_path), "no database", "autoexplain.duckdb")
    from autoexplain.agent.store import Store

    db = tmp_path / "r.duckdb"
    Store(db)
    res = run_cli(["sql", "drop table runs", "--db", str(db)], tmp_path)
    assert_input_error(res, "read-only")
    for empty in ("", "  ", "/* only a comment */", ";"):  # DuckDB answers these with no cursor at all
        assert_input_error(run_cli(["sql", empty, "--db", str(db)], tmp_path), "no SQL statement")
    ok = run_cli(["sql", "select count(*) as n from runs", "--db", str(db), "-f", "json"], tmp_path)
    assert ok.returncode == 0 and json.loads(ok.stdout) == [{"n": 0}]


# ============================================================================= happy paths without a model
def test_tools_json_lists_schemas(tmp_path: Path) -> None:
    res = run_cli(["tools", "-f", "json"], tmp_path)
    assert res.returncode == 0, res.stderr
    tools = {t["name"]: t for t in json.loads(res.stdout)}
    assert {"model_info", "tokenize"} <= set(tools)
    for t in tools.values():
        assert t["cost"] in ("cheap", "forward", "dataset")
        assert t["description"]
        assert t["input_schema"]["type"] == "object" and "properties" in t["input_schema"]
        assert t["output_schema"]["type"] == "object"
    assert tools["model_info"]["input_schema"]["properties"] == {}
    tok = tools["tokenize"]["input_schema"]
    assert tok["properties"]["texts"]["type"] == "array"
    assert tok["properties"]["texts"]["items"] == {"type": "string"}
    assert "texts" in tok["required"]
    assert res.after == res.before


def test_sql_formats(tmp_path: Path) -> None:
    import datetime as dt

    from autoexplain.agent.store import Store

    db = tmp_path / "r.duckdb"
    Store(db).upsert("runs", [{"run_id": f"r{i}", "kind": "zoo", "status": "done", "config": {"n": i},
                               "started_at": dt.datetime(2024, 1, 1)} for i in range(3)])
    q = "select run_id, config->>'$.n' as n from runs order by run_id"
    res = run_cli(["sql", q, "--db", str(db), "-f", "csv"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert list(csv.reader(io.StringIO(res.stdout))) == [["run_id", "n"], ["r0", "0"], ["r1", "1"], ["r2", "2"]]
    res = run_cli(["sql", q, "--db", str(db), "-f", "json"], tmp_path)
    assert json.loads(res.stdout) == [{"run_id": f"r{i}", "n": str(i)} for i in range(3)]
    res = run_cli(["sql", q, "--db", str(db)], tmp_path)
    assert res.returncode == 0 and "r2" in res.stdout and "3 rows" in res.stdout
    empty = run_cli(["sql", "select run_id from runs where false", "--db", str(db), "-f", "csv"], tmp_path)
    assert empty.stdout.strip() == "run_id"  # a header row even with no rows
    assert not (tmp_path / "r.duckdb.wal").exists()


def test_zoo_path_prints_the_built_folder(tiny_zoo, tmp_path: Path) -> None:
    """`zoo path` prints only the folder on stdout (for "$(autoexplain zoo path)/corpus/train.txt")."""
    env = {**cli_env(tmp_path), "AUTOEXPLAIN_CACHE": os.environ["AUTOEXPLAIN_CACHE"]}
    p = subprocess.run([*CLI, "zoo", "path", "--name", "tiny"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert Path(p.stdout.strip()) == tiny_zoo.root and (tiny_zoo.root / "corpus" / "train.txt").is_file()
    assert_input_error(run_cli(["zoo", "path", "--name", "nosuch"], tmp_path), "nosuch")


# ==================================================================== issue 19: harvest writes nothing when refused
def _harvest_args(tiny_gpt2_dir: Path, tmp_path: Path, dataset: Path, *extra: str) -> list[str]:
    sae = save_sae(tmp_path / "sae", D_MODEL, "blocks.0.hook_resid_post")
    return ["harvest", "--model", str(tiny_gpt2_dir), "--sae", str(sae), "--dataset", str(dataset),
            "--tokens", "500", "--db", str(tmp_path / "h.duckdb"), "--device", "cpu", *extra]


def test_harvest_ctx_beyond_the_model_writes_nothing(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    """Issue 19 (6): ``harvest --ctx`` beyond the model's context exited 2 but left a database with a failed run
    and model/SAE rows. It is refused before the database is opened (the default is capped to the context)."""
    data = tmp_path / "t.txt"
    data.write_text("\n".join(OK_TEXTS * 20) + "\n")
    res = run_cli(_harvest_args(tiny_gpt2_dir, tmp_path, data, "--ctx", "100000"), tmp_path)
    assert_input_error(res, "ctx 100000 exceeds the model's context of 32")
    assert not (tmp_path / "h.duckdb").exists()


def test_harvest_jsonl_broken_on_line_two_writes_nothing(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    """Issue 19 (6): a ``.jsonl`` with a broken second line exited 2 but left a run ``running``. Every line the
    pass will read is parsed before anything is written."""
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"text": "the cat sat on the mat"}) + "\n{broken\n")
    res = run_cli(_harvest_args(tiny_gpt2_dir, tmp_path, data, "--ctx", "16"), tmp_path)
    assert_input_error(res, "line 2 is not valid JSON")
    assert not (tmp_path / "h.duckdb").exists()
