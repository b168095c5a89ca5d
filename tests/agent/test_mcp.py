"""``autoexplain mcp`` through the official SDK's own client, against the real command in a subprocess.

The server serves the ``tiny`` toy world (``toy:tiny`` with ``toy:tiny/res0``) and a hand-written results database
(one SAE, one harvested feature with two labels and their scores, two contexts). Every result is compared with what
the same tool gives in this process, so the server cannot answer from anything but the real tool; bad arguments
must come back as errors while the same server keeps answering; the ``sql`` tool must leave the database as it was
whatever it is sent.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import pytest

from cli_support import CLI, assert_input_error, run_cli

SPEC = "toy:tiny/res0"
FEATURE = 5
FINAL = "the colour words ' red', ' green' and ' blue'"
DRAFT = "the token ' red'"


@pytest.fixture(scope="module")
def world(tiny_zoo, tmp_path_factory: pytest.TempPathFactory, one_thread) -> dict[str, Any]:
    """The tiny model and SAE loaded here, and a database holding one labelled feature of that SAE."""
    from autoexplain.agent.store import Store
    from autoexplain.tools.loading import load_model, load_sae
    from autoexplain.tools.registry import ToolContext

    lm = load_model("toy:tiny", "cpu", sae_specs=[SPEC])
    sae = load_sae(SPEC, lm)
    root = tmp_path_factory.mktemp("mcp")
    db = root / "results.duckdb"
    store = Store(db)
    store.record_model_and_saes(lm, [sae])
    now = dt.datetime.now(dt.UTC)
    store.start_run("run-mcp", "label", {})
    store.upsert("features", [{"sae_id": sae.sae_id, "feature_index": FEATURE, "density": 0.0125, "max_act": 3.5,
                               "mean_act": 1.25, "n_tokens": 4000, "is_dead": False,
                               "top_logits": [[" red", 0.5], [" blue", 0.25]], "run_id": "run-mcp"}])
    store.upsert("feature_examples", [
        {"sae_id": sae.sae_id, "feature_index": FEATURE, "kind": "top", "example_id": i, "split": split,
         "tokens": ["the", " red", " owl"], "acts": [0.0, act, 0.0], "max_act": act, "run_id": "run-mcp"}
        for i, (split, act) in enumerate([("explain", 3.5), ("score", 2.0)])])
    target = f"{sae.sae_id}#{FEATURE}"
    store.upsert("explanations", [
        {"explanation_id": "e-final", "run_id": "run-mcp", "item_id": "i-1", "target": target, "text": FINAL,
         "author": "offline", "causal_level": "association", "is_final": True, "created_at": now, "overall": 0.8},
        {"explanation_id": "e-draft", "run_id": "run-mcp", "item_id": "i-1", "target": target, "text": DRAFT,
         "author": "offline", "causal_level": "association", "is_final": False, "created_at": now, "overall": 0.5}])
    store.upsert("scores", [
        {"score_id": "s-1", "explanation_id": "e-final", "metric": "correctness", "value": 0.875, "n": 40,
         "created_at": now},
        {"score_id": "s-2", "explanation_id": "e-final", "metric": "completeness", "value": None, "n": 0,
         "details": {"reason": "no activating examples"}, "created_at": now}])
    return {"lm": lm, "sae": sae, "ctx": ToolContext(model=lm, saes={sae.sae_id: sae}), "db": db, "root": root,
            "task": str(tiny_zoo.task_file("induction"))}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "AUTOEXPLAIN_DB"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    return env  # AUTOEXPLAIN_CACHE: the session's cache, where the tiny world is built


@asynccontextmanager
async def stdio_client(world: dict[str, Any], *args: str) -> AsyncIterator[Any]:
    from mcp import Client, StdioServerParameters

    params = StdioServerParameters(command=sys.executable, args=[*CLI[1:], "mcp", *args], env=_env(),
                                   cwd=str(world["root"]))
    async with Client(params, read_timeout_seconds=300) as client:
        yield client


def local(world: dict[str, Any], tool: str, args: dict[str, Any]) -> dict[str, Any]:
    """What the registry's tool gives in this process (the known answer the server must reproduce)."""
    from autoexplain.tools.registry import default_registry

    out: dict[str, Any] = default_registry().call(world["ctx"], tool, args).model_dump(mode="json")
    return out


def db_state(db: Path) -> list[tuple[Any, ...]]:
    from autoexplain.agent.store import run_query

    return run_query(db, "select (select count(*) from explanations), (select count(*) from scores), "
                         "(select count(*) from information_schema.tables)")[1]


def test_stdio_tools_resources_and_errors(world: dict[str, Any]) -> None:
    from mcp import MCPError

    from autoexplain.agent.agent_tools import MEDIATION
    from autoexplain.tools.registry import Cost, default_registry

    sae_id = world["sae"].sae_id
    before = db_state(world["db"])
    texts = ["the red owl lives in the hive", "green bear milk red ball , green bear milk"]
    fa_args = {"sae_id": sae_id, "features": [FEATURE, 0, 1], "texts": texts}
    cs_args = {"task_file": world["task"], "method": "eap", "curve": False}

    async def session() -> None:
        async with stdio_client(world, "--model", "toy:tiny", "--sae", SPEC, "--db", str(world["db"])) as c:
            # every registry tool but the dataset-wide ones, with its schema and causal level
            listed = {t.name: t for t in (await c.list_tools()).tools}
            specs = {s.name: s for s in [*default_registry(), MEDIATION]}
            assert set(listed) == {n for n, s in specs.items() if s.cost is not Cost.DATASET} | {"sql",
                                                                                                  "feature_page"}
            assert "harvest" in specs and "harvest" not in listed
            for name, spec in specs.items():
                if name in listed:
                    level = spec.level.value if spec.level else "none"
                    assert listed[name].input_schema == spec.json_schema(), name
                    assert listed[name].output_schema == spec.output_model.model_json_schema(), name
                    assert listed[name].meta == {"autoexplain/causal_level": level,
                                                 "autoexplain/cost": spec.cost.value}, name
                    assert f"[causal level: {level}" in (listed[name].description or ""), name
            assert listed["circuit_search"].meta["autoexplain/causal_level"] == "intervention"

            info = await c.call_tool("model_info", {})
            assert not info.is_error, info.content
            assert info.structured_content == local(world, "model_info", {})
            assert [s["sae_id"] for s in info.structured_content["saes"]] == [sae_id]

            fa = await c.call_tool("feature_activations", fa_args)
            assert not fa.is_error, fa.content
            assert fa.structured_content == local(world, "feature_activations", fa_args)
            assert fa.content[0].text.startswith("activations of 3 features of " + sae_id)

            cs = await c.call_tool("circuit_search", cs_args)
            assert not cs.is_error, cs.content
            want = local(world, "circuit_search", cs_args)
            assert cs.structured_content["method"] == "eap"
            assert cs.structured_content["edges"] == want["edges"] and want["edges"]

            # bad arguments and unknown names: an error result each, and the server keeps answering
            for tool, args, needle in [
                    ("feature_activations", {**fa_args, "texts": []}, "bad arguments for feature_activations: texts"),
                    ("feature_activations", {**fa_args, "sae_id": "sae-nope"}, "unknown sae_id 'sae-nope'"),
                    ("feature_activations", {**fa_args, "features": [10_000]}, "10000"),
                    ("circuit_search", {"task_file": str(world["root"] / "none.json")}, "none.json"),
                    ("circuit_search", {"method": "eap"}, "give exactly one of task_file or prompts"),
                    ("no_such_tool", {}, "unknown tool 'no_such_tool'")]:
                bad = await c.call_tool(tool, args)
                assert bad.is_error, (tool, args, bad.content)
                assert needle in bad.content[0].text, (needle, bad.content[0].text)
                assert "Traceback" not in bad.content[0].text
            again = await c.call_tool("model_info", {})
            assert not again.is_error and again.structured_content == info.structured_content

            # sql: reads answer, anything else is refused and changes nothing
            ok = await c.call_tool("sql", {"query": "select text from explanations where is_final"})
            assert not ok.is_error, ok.content
            assert ok.structured_content["rows"] == [[FINAL]] and ok.structured_content["columns"] == ["text"]
            for query in ["delete from explanations", "drop table scores", "create table x (a int)",
                          "insert into scores (score_id, explanation_id, metric, created_at) values "
                          "('s', 'e', 'm', now())", "update explanations set text = 'x'",
                          f"copy explanations to '{world['root'] / 'out.csv'}'",
                          f"attach '{world['root'] / 'other.duckdb'}' as other", "set threads = 1",
                          "select 1; delete from scores", "checkpoint"]:
                refused = await c.call_tool("sql", {"query": query})
                assert refused.is_error, query
            assert "read-only" in (await c.call_tool("sql", {"query": "delete from scores"})).content[0].text
            assert (await c.call_tool("sql", {"query": "select * from read_csv('/etc/hostname')"})).is_error

            # feature pages: the template, the listing, and the page itself (markdown, then JSON)
            templates = (await c.list_resource_templates()).resource_templates
            assert [t.uri_template for t in templates] == ["autoexplain://feature/{sae_id}/{index}"]
            uri = f"autoexplain://feature/{sae_id}/{FEATURE}"
            assert [(r.uri, r.description) for r in (await c.list_resources()).resources] == [(uri, FINAL)]
            page = (await c.read_resource(uri)).contents
            assert [p.mime_type for p in page] == ["text/markdown", "application/json"]
            assert f"[final] {FINAL}" in page[0].text and "correctness 0.875 (n 40)" in page[0].text
            data = json.loads(page[1].text)
            assert [(lab["text"], lab["is_final"]) for lab in data["labels"]] == [(FINAL, True), (DRAFT, False)]
            assert data["labels"][0]["scores"]["completeness"] == {"value": None, "n": 0,
                                                                  "details": {"reason": "no activating examples"}}
            assert [e["split"] for e in data["examples"]] == ["explain", "score"]
            by_spec = (await c.read_resource(f"autoexplain://feature/{quote(SPEC, safe='')}/{FEATURE}")).contents
            assert json.loads(by_spec[1].text) == data
            tool_page = await c.call_tool("feature_page", {"sae": SPEC, "feature_index": FEATURE})
            assert not tool_page.is_error and tool_page.structured_content == data
            for bad_uri, needle in [(f"autoexplain://feature/{sae_id}/{FEATURE + 1}", "no stored statistics"),
                                    (f"autoexplain://feature/{sae_id}/99999", "out of range"),
                                    ("autoexplain://feature/sae-nope/1", "unknown SAE"),
                                    ("autoexplain://run/x", "unknown resource")]:
                with pytest.raises(MCPError) as exc:
                    await c.read_resource(bad_uri)
                assert needle in exc.value.message, (bad_uri, exc.value.message)
            assert not (await c.call_tool("tokenize", {"texts": ["red"]})).is_error

    anyio.run(session)
    assert db_state(world["db"]) == before
    assert not (world["root"] / "out.csv").exists() and not (world["root"] / "other.duckdb").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_http_serves_the_store(world: dict[str, Any]) -> None:
    """Streamable HTTP on 127.0.0.1 with only a database: the store tools and the pages, no model tools."""
    from mcp import Client

    port = _free_port()
    proc = subprocess.Popen([*CLI, "mcp", "--db", str(world["db"]), "--http", str(port)], env=_env(),
                            cwd=world["root"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "the HTTP server did not start"
            time.sleep(0.2)

        async def session() -> None:
            async with Client(f"http://127.0.0.1:{port}/mcp") as c:
                assert {t.name for t in (await c.list_tools()).tools} == {"sql", "feature_page"}
                res = await c.call_tool("sql", {"query": "select count(*) as n from explanations"})
                assert res.structured_content["rows"] == [[2]]
                assert (await c.call_tool("model_info", {})).is_error  # no model was given
                page = await c.read_resource(f"autoexplain://feature/{world['sae'].sae_id}/{FEATURE}")
                assert FINAL in page.contents[0].text

        anyio.run(session)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_bad_command_lines_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "notadb.duckdb").write_text("hello")
    for args, needle in [(["mcp"], "nothing to serve"),
                         (["mcp", "--sae", SPEC], "--sae needs --model"),
                         (["mcp", "--db", "missing.duckdb"], "no such database"),
                         (["mcp", "--db", "notadb.duckdb"], "not a DuckDB database"),
                         (["mcp", "--model", "toy:nope"], "unknown toy model 'nope'"),
                         (["mcp", "--model", "toy:tiny", "--sae", "toy:tiny/res9"], "res9"),
                         (["mcp", "--model", "toy:tiny", "--http", "70000"], "1..65535")]:
        assert_input_error(run_cli(args, tmp_path), needle)


@pytest.mark.filterwarnings("ignore:Pydantic serializer warnings")
def test_a_failing_tool_is_an_error_result_not_a_crash(world: dict[str, Any]) -> None:
    """In process: a tool that raises, or whose output does not fit its own output schema, answers isError with
    the reason; the server goes on answering."""
    from mcp import Client

    from autoexplain.agent.mcp_server import AutoexplainMCP, ServeConfig, ServedTool, SqlIn, SqlOut
    from autoexplain.tools.registry import Cost, ToolOutput

    def boom(args: Any) -> Any:
        raise RuntimeError("CUDA out of memory")

    def misfit(args: Any) -> Any:  # rows must be a list of lists: a client would reject this result
        return SqlOut.model_construct(columns=["a"], rows="not rows", n_rows=1, truncated=False)

    class Number(ToolOutput):
        x: float

        def summary_text(self) -> str:
            return f"x = {self.x}"

    def nan(args: Any) -> Any:  # sent as null: a client checking the schema ("number") would reject it
        return Number(x=math.nan)

    app = AutoexplainMCP(ServeConfig(db=world["db"]))
    app.tools["boom"] = ServedTool("boom", "raises", SqlIn, SqlOut, Cost.CHEAP, None, boom)
    app.tools["misfit"] = ServedTool("misfit", "bad output", SqlIn, SqlOut, Cost.CHEAP, None, misfit)
    app.tools["nan"] = ServedTool("nan", "not a number", SqlIn, Number, Cost.CHEAP, None, nan)

    async def session() -> None:
        async with Client(app.server()) as c:
            res = await c.call_tool("boom", {"query": "select 1"})
            assert res.is_error and res.content[0].text == "internal error in boom: RuntimeError: CUDA out of memory"
            res = await c.call_tool("misfit", {"query": "select 1"})
            assert res.is_error and "does not fit misfit's output schema: rows" in res.content[0].text
            res = await c.call_tool("nan", {"query": "select 1"})
            assert res.is_error and "does not fit nan's output schema: x" in res.content[0].text
            res = await c.call_tool("sql", {"query": "select 41 + 1 as x"})
            assert not res.is_error and res.structured_content["rows"] == [[42]]

    anyio.run(session)
