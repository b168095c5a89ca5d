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

    d = case("folder")
    (d / "corpus" / "part2").mkdir(parents=True)
    (d / "corpus" / "a.txt").write_text("\n".join(OK_TEXTS[:2]) + "\n", encoding="utf-8")
    (d / "corpus" / "part2" / "b.jsonl").write_text(json.dumps({"text": OK_TEXTS[2]}) + "\n", encoding="utf-8")
    cases["folder"] = Case(d, ["--dataset", str(d / "corpus"), "--device", "cpu"])

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


def _check_error(checks: dict[str, tuple[Case, Future]], name: str, *needles: str, loaded: bool | None = None) -> str:
    """The case's one-line error; ``loaded``: whether the model must have loaded before the refusal (False for
    inputs checked without weights — datasets, task-file syntax —, None where it depends on the SAE checks)."""
    case, fut = checks[name]
    res = fut.result()
    line = assert_input_error(res, str(case.bad), *needles)
    if loaded is not None:
        assert ("sites exist and fire" in res.flat_stdout) is loaded, res.stdout
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
    _check_error(checks, "task_not_json", "not valid JSON", "line 2", loaded=False)


def test_task_file_fails_schema(checks: dict) -> None:
    _check_error(checks, "task_schema", "prompts[1].answers", "non-empty list", loaded=False)


def test_task_answer_not_single_token(checks: dict) -> None:
    case, fut = checks["task_multi_token"]
    # names the prompt, the answer and its pieces (not the task file's path): see the report
    assert_input_error(fut.result(), "prompt 1", "' Marylandia'", "5 tokens", "' Mary'", "single-token answer")


def test_empty_dataset(checks: dict) -> None:
    _check_error(checks, "empty_dataset", "is empty", loaded=False)


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
    ok = run_cli(["sql", "select count(*) as n from runs", "--db", str(db), "-o", "json"], tmp_path)
    assert ok.returncode == 0 and json.loads(ok.stdout) == [{"n": 0}]


# ============================================================================= happy paths without a model
def test_tools_json_lists_schemas(tmp_path: Path) -> None:
    res = run_cli(["tools", "-o", "json"], tmp_path)
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
    res = run_cli(["sql", q, "--db", str(db), "-o", "csv"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert list(csv.reader(io.StringIO(res.stdout))) == [["run_id", "n"], ["r0", "0"], ["r1", "1"], ["r2", "2"]]
    res = run_cli(["sql", q, "--db", str(db), "-o", "json"], tmp_path)
    assert json.loads(res.stdout) == [{"run_id": f"r{i}", "n": str(i)} for i in range(3)]
    res = run_cli(["sql", q, "--db", str(db)], tmp_path)
    assert res.returncode == 0 and "r2" in res.stdout and "3 rows" in res.stdout
    empty = run_cli(["sql", "select run_id from runs where false", "--db", str(db), "-o", "csv"], tmp_path)
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


def test_check_reads_a_folder_dataset(checks: dict, tiny_gpt2_dir: Path) -> None:
    """Issue 12 (6): a folder of .txt / .jsonl / .parquet files is one dataset, its files in sorted order."""
    from transformers import AutoTokenizer

    from autoexplain.tools.data import tokenize_windows

    case, fut = checks["folder"]
    res = fut.result()
    assert res.returncode == 0, res.stderr
    win = tokenize_windows(OK_TEXTS, AutoTokenizer.from_pretrained(str(tiny_gpt2_dir)), ctx=32, n_ctx=32)
    assert f"{len(OK_TEXTS)} texts (first 10,000 read) -> {win.n_windows:,} windows of 32 tokens " \
           f"({win.n_tokens:,} tokens, BOS first)" in res.flat_stdout
    assert res.after == res.before


# ==================================================================== issue 12: refused before the model loads
@pytest.fixture(scope="module")
def unloadable(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A model folder that passes every check made without weights (config, tokenizer, a weights file) but whose
    weights are garbage, so loading it fails with its own error; and a real SAE for it. A command refused with
    *another* error never reached ``load_model``."""
    import shutil

    root = tmp_path_factory.mktemp("unloadable")
    model = root / "model"
    shutil.copytree(tiny_gpt2_dir, model)
    weights = [p for p in model.iterdir() if p.suffix in (".safetensors", ".bin")]
    assert weights
    for w in weights:
        w.write_bytes(b"\0garbage, not a tensor file" * 64)
    data = root / "data.txt"
    data.write_text("\n".join(OK_TEXTS) + "\n", encoding="utf-8")
    return {"model": model, "sae": save_sae(root / "sae", D_MODEL, "blocks.0.hook_resid_post"), "data": data}


def test_the_unloadable_model_really_fails_to_load(unloadable: dict[str, Path], tmp_path: Path) -> None:
    res = run_cli(["check", "--model", str(unloadable["model"]), "--device", "cpu"], tmp_path)
    assert res.returncode != 0 and "sites exist and fire" not in res.stdout


@pytest.mark.parametrize("name", ["features", "features-backwards", "features-beyond", "missing-dataset",
                                  "empty-folder", "db-folder", "db-garbage", "hub-syntax", "task-missing",
                                  "harvest-dataset", "harvest-db", "harvest-tokens"])
def test_bad_input_is_refused_before_the_model_loads(unloadable: dict[str, Path], tmp_path: Path,
                                                     name: str) -> None:
    m, sae, data = str(unloadable["model"]), str(unloadable["sae"]), str(unloadable["data"])
    label = ["label", "--model", m, "--sae", sae, "--dataset", data, "--device", "cpu"]
    harvest = ["harvest", "--model", m, "--sae", sae, "--dataset", data, "--device", "cpu"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "garbage.duckdb").write_bytes(b"PK\x03\x04 not duckdb " * 100)
    args, needles = {
        "features": ([*label, "--features", "abc"], ["--features 'abc'", "'abc' is not an index"]),
        "features-backwards": ([*label, "--features", "9-3"], ["runs backwards"]),
        "features-beyond": ([*label, "--features", "0-999"], ["999 is out of range", "64 features"]),  # cfg.json
        "missing-dataset": ([*label[:-4], "--dataset", str(tmp_path / "nope.txt")], ["nope.txt", "does not exist"]),
        "empty-folder": ([*label[:-4], "--dataset", str(tmp_path / "empty")], ["holds no"]),
        "db-folder": ([*label, "--db", str(tmp_path / "no" / "such" / "x.duckdb")], ["folder", "does not exist"]),
        "db-garbage": ([*label, "--db", str(tmp_path / "garbage.duckdb")], ["not a DuckDB database"]),
        "hub-syntax": ([*label[:-4], "--dataset", "not a dataset name"], ["not a dataset name"]),
        "task-missing": (["circuit", "--model", m, "--task", str(tmp_path / "t.json"), "--device", "cpu"],
                         ["t.json", "does not exist"]),
        "harvest-dataset": ([*harvest[:-4], "--dataset", str(tmp_path / "nope.jsonl")], ["does not exist"]),
        "harvest-db": ([*harvest, "--db", str(tmp_path / "empty")], ["is a directory"]),
        "harvest-tokens": ([*harvest, "--tokens", "0"], ["--n-tokens"]),
    }[name]
    res = run_cli(args, tmp_path)
    line = assert_input_error(res, *needles)
    assert "weights" not in line.lower() and "safetensors" not in line.lower(), line  # not the load's error


def _commands() -> list[tuple[str, object]]:
    import typer

    from autoexplain.agent.cli import app

    root = typer.main.get_command(app)
    out = []

    def walk(cmd: object, path: list[str]) -> None:
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(sub, [*path, name])
        else:
            out.append((" ".join(path), cmd))

    walk(root, [])
    return out


def test_every_help_text_is_printed_word_for_word(tmp_path: Path) -> None:
    """Issue 12 (6): typer renders help with rich markup, which ate '[judges]'. Every word of every option's help must
    appear in that command's --help, square brackets included."""
    from concurrent.futures import ThreadPoolExecutor

    cmds = _commands()
    assert {"label", "harvest", "check", "run", "circuit", "demo"} <= {name for name, _ in cmds}
    env = {**cli_env(tmp_path), "COLUMNS": "250", "TERMINAL_WIDTH": "250"}

    def helptext(name: str) -> str:
        p = subprocess.run([*CLI, *name.split(), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 0, p.stderr
        return " ".join(re.sub(r"[│╭╮╰╯─]", " ", p.stdout).split())

    with ThreadPoolExecutor(max_workers=2) as pool:
        shown = dict(zip([n for n, _ in cmds], pool.map(helptext, [n for n, _ in cmds]), strict=True))
    missing = []
    for name, cmd in cmds:
        texts = [p.help for p in cmd.params if getattr(p, "help", None)]
        flat = re.sub(r"\s+", "", shown[name])  # help is wrapped, also at hyphens ("comma-" / "separated")
        for text in texts:
            for word in text.replace("\\[", "[").split():
                if word not in flat:
                    missing.append(f"{name}: {word!r} of {text!r}")
    assert not missing, missing
    assert "needs the [judges] extra" in shown["label"]


def test_check_db_path_accepts_a_real_database_and_refuses_the_rest(tmp_path: Path) -> None:
    import duckdb

    from autoexplain.agent.cli.common import check_db_path
    from autoexplain.tools.errors import InputError

    real = tmp_path / "real.duckdb"
    con = duckdb.connect(str(real))
    con.execute("create table t (a int)")
    con.close()
    check_db_path(real)
    check_db_path(tmp_path / "new.duckdb")  # a new file in an existing folder
    (tmp_path / "text.duckdb").write_text("hello, this is not a database at all")
    for bad, needle in [(tmp_path / "text.duckdb", "not a DuckDB database"), (tmp_path, "is a directory"),
                        (tmp_path / "a" / "b.duckdb", "does not exist"), (real / "x.duckdb", "not a folder")]:
        with pytest.raises(InputError, match=needle):
            check_db_path(bad)
