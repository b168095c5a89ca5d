"""Opt-in: the agent against a real ``llama-cpp-python`` OpenAI-compatible server (``python -m llama_cpp.server``,
chat format ``chatml-function-calling``) serving a tiny GGUF model this test writes itself (``tests/tiny_gguf.py``:
random weights, a character vocabulary in the GGUF metadata; nothing is downloaded).

Run with ``python -m pytest --runslow tests/agent/test_llama_cpp_server.py`` after
``pip install gguf "llama-cpp-python[server]==0.3.36"`` (a source build of llama.cpp; not a project dependency). Skipped
unless ``--runslow`` is given and ``llama_cpp`` and ``gguf`` import.

The model writes nonsense, but the server is real: its 500 for ``json_schema``, its ``json_object`` + ``schema``
grammar, its reading of a missing ``tool_choice`` as "none", its 500 for ``content: null``, its ``max_tokens``.
What is checked is the path, not the prose: no item fails, the client steps down once (strict → JSON mode with
the schema) and every later request succeeds, every live feature gets a final label written by the model, the
judge's calls go through the same adapted client.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (pip install llama-cpp-python==0.3.36)")
    pytest.importorskip("llama_cpp.server.app", reason="needs llama-cpp-python[server] (uvicorn, fastapi)")
    pytest.importorskip("gguf", reason="needs gguf (pip install gguf)")
    from tiny_gguf import write_tiny_llama

    root = tmp_path_factory.mktemp("llama-cpp")
    model = write_tiny_llama(root / "tiny.gguf")
    port = _free_port()
    log = (root / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
                             "--port", str(port), "--chat_format", "chatml-function-calling", "--n_ctx", "32768",
                             "--model_alias", "tiny"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(600):
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited: {(root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_label_with_llm_policy_and_judge_against_llama_cpp_server(llama_server, tmp_path, monkeypatch) -> None:
    from autoexplain.agent.cli import app
    from autoexplain.agent.store import Store

    monkeypatch.setenv("OPENAI_BASE_URL", llama_server)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-local-not-checked-0123456789")
    db = tmp_path / "real.duckdb"
    plan = {"name": "llama-cpp", "model": "toy:tiny", "policy": "llm", "llm_model": "tiny", "judge": "llm",
            "llm": {"max_tokens": 400, "timeout_s": 120, "temperature": 1.0},
            "budget": {"steps": 20, "llm_tokens": 400_000, "seconds": 600},
            "items": [{"label": {"sae": "toy:tiny/res0", "features": "0-2", "tokens": 5000}}]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    t0 = time.monotonic()
    app(["run", str(tmp_path / "plan.json"), "--db", str(db)], standalone_mode=False)
    seconds = time.monotonic() - t0
    store = Store(db)
    q = lambda sql: store.query(sql)[1]  # noqa: E731
    status = dict(q("select target, status from work_items"))
    assert status and "failed" not in status.values(), status
    dead = {f"{sae}#{i}" for sae, i in q("select sae_id, feature_index from features where is_dead")}
    live = [t for t in status if t not in dead]
    finals = dict(q("select w.target, e.author from explanations e join work_items w using (item_id) "
                    "where e.is_final"))
    assert live and all(finals.get(t) == "llm" for t in live), (finals, live)
    calls = q("select purpose, mode, ok, status_code from llm_calls where not cached order by created_at")
    failed = [(p, m, s) for p, m, ok, s in calls if not ok]
    assert [(m, s) for _, m, s in failed] == [("strict", 500)], failed  # once per run, then remembered
    assert {m for _, m, ok, _ in calls if ok} <= {"tools", "json"}
    assert any(p == "judge" for p, *_ in calls) and all(s == 200 for _, _, ok, s in calls if ok)
    print(f"\nllama.cpp run: {len(status)} items, {len(calls)} LLM calls, {seconds:.1f} s", file=sys.stderr)
    assert os.environ["OPENAI_BASE_URL"] == llama_server
