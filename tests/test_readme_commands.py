"""Every ``autoexplain`` command line of the README's shell blocks runs (#20), with small sizes.

The lines are read from the README and run through bash as written, with four substitutions that keep them
small: the ``tiny`` toy world for ``small``, fewer tokens and features, and the ids of this database's circuit and
run for the README's example ids. Lines that need something a test cannot have (your own model or SAE, an LLM
endpoint, a peer's venv, a network install) are skipped by an explicit list of patterns, and a test fails when a
line matches none: a new README command is run or deliberately listed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.agent.test_agent_offline import agent_env, rows

README = Path(__file__).resolve().parents[1] / "README.md"

#: README lines not run here, and why.
SKIPPED = {
    r"pip install|python3 -m venv": "installs into an environment",
    r"my-gpt2|my-sae|texts\.jsonl": "a user's own model, SAE and data",
    r"OPENAI_": "an LLM endpoint (tests/agent/test_agent_llm.py and test_llama_cpp_server.py cover it)",
    r"llama_cpp\.server": "a llama.cpp server (opt-in slow test)",
    r"benchmarks/": "benchmarks (minutes; not tests)",
    r"autoexplain bench truth": "the ground-truth suite (tests/evals cover its parts)",
    r"autoexplain run overnight\.yaml": "the README plan (tests/agent/cli/test_run_cli.py runs it)",
    r"autoexplain demo": "the demo (tests/test_readme.py runs it)",
    r"autoexplain mcp": "a server that runs until its client leaves (tests/agent/test_mcp.py runs it)",
    r"kind = 'bench'|kind = 'demo'": "queries about bench or demo runs (tests/test_readme.py)",
}


def command_lines() -> list[str]:
    """Every line of the README's ``bash`` blocks that runs autoexplain, continuation lines joined."""
    text = README.read_text(encoding="utf-8")
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        out += [code(ln) for ln in joined.splitlines() if "autoexplain" in ln or ln.startswith("python")]
    return out


def code(line: str) -> str:
    """The line without a trailing comment (two spaces and '#'; not the '#' of a feature index)."""
    return re.sub(r"\s{2,}#.*$", "", line).strip()


def small(line: str, ids: dict[str, str]) -> str:
    line = re.sub(r"\s\[[^\]]*\]", "", code(line))  # optional arguments shown as [--db F]
    line = (line.replace("toy:small", "toy:tiny")
            .replace("$(autoexplain zoo path)", "$(autoexplain zoo path --name tiny)")
            .replace("--tokens 200000", "--tokens 8000").replace("--features 0-99", "--features 0-3"))
    line = re.sub(r"circ-[0-9a-f]+", ids.get("circuit", "circ-none"), line)
    return re.sub(r"demo-[0-9a-f]+", ids.get("run", "run-none"), line)


def test_every_readme_command_line_is_run_or_listed_as_skipped() -> None:
    """A line that does not start with ``autoexplain`` cannot be run by the test below: it must be listed."""
    lines = command_lines()
    assert len(lines) >= 15
    for line in lines:
        assert line.startswith("autoexplain ") or any(re.search(p, line) for p in SKIPPED), line


def test_the_readmes_command_lines_run_as_written_with_small_sizes(tiny_zoo, tmp_path: Path) -> None:
    env = {**agent_env(), "AUTOEXPLAIN_DB": str(tmp_path / "readme.duckdb"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    runnable = [ln for ln in command_lines() if not any(re.search(p, ln) for p in SKIPPED)]
    # commands that write come first, then the ones that read what they wrote (show, sql)
    runnable.sort(key=lambda ln: ln.startswith(("autoexplain show", "autoexplain sql")))
    ids: dict[str, str] = {}
    ran = []
    for line in runnable:
        if line.startswith(("autoexplain show", "autoexplain sql")) and not ids:
            db = tmp_path / "readme.duckdb"
            ids = {"circuit": rows(db, "select circuit_id from circuits limit 1")[0][0],
                   "run": rows(db, "select run_id from runs where kind = 'label' limit 1")[0][0]}
        cmd = small(line, ids)
        p = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, f"{cmd}\n{p.stderr[-2000:]}"
        assert "Traceback" not in p.stderr, cmd
        ran.append(cmd)
    assert sum(c.startswith("autoexplain show") for c in ran) == 3
    assert {c.split()[1] for c in ran} >= {"label", "circuit", "harvest", "ablate", "steer", "lens", "dla", "sql",
                                            "show"}, ran


@pytest.mark.parametrize("line", ["autoexplain show feature toy:small/res0#7 [--db F] [--no-color]   # or ./my-sae#7",
                                  "autoexplain harvest --model toy:small --tokens 200000"])
def test_small_keeps_the_command_and_shrinks_it(line: str) -> None:
    got = small(line, {})
    assert "toy:tiny" in got and "[" not in got and "my-sae" not in got and "200000" not in got
