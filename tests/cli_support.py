"""Running the real ``autoexplain`` command line in a subprocess, with a before/after snapshot of its folder:
shared by the CLI tests of every package (``tests/tools``, ``tests/agent``)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CLI = [sys.executable, "-m", "autoexplain.agent.cli"]
D_MODEL = 32  # tiny_gpt2_dir: 2 layers, 4 heads, d_model 32, context 32

OK_TEXTS = ["the cat sat on the mat", "Mary and John went to the store , John gave a drink to Mary .",
            "red green blue fox owl 10 11 12 13 14 15 16 17 18 19 20"]
OK_TASK = {"name": "tiny", "prompts": [
    {"clean": "the cat sat on the", "corrupt": "the dog sat on the", "answers": [" mat"], "wrong_answers": [" park"]},
    {"clean": "John gave a drink to", "corrupt": "Mary gave a drink to", "answers": [" Mary"]},
]}


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` -> a digest of its bytes ('<dir>' for folders)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def cli_env(cwd: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "AUTOEXPLAIN_DB"}
    env.update(AUTOEXPLAIN_CACHE=str(cwd / "cache"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1")
    return env


@dataclass
class Result:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    before: dict[str, str]
    after: dict[str, str]

    @property
    def flat_stdout(self) -> str:
        """stdout with rich's line wrapping undone."""
        return " ".join(self.stdout.split())


def run_cli(args: list[str], cwd: Path, timeout: float = 120) -> Result:
    before = snapshot(cwd)
    t0 = time.perf_counter()
    p = subprocess.run([*CLI, *args], cwd=cwd, env=cli_env(cwd), capture_output=True, text=True, timeout=timeout)
    return Result(args, p.returncode, p.stdout, p.stderr, time.perf_counter() - t0, before, snapshot(cwd))


def assert_input_error(res: Result, *needles: str) -> str:
    """Exit 2, exactly one non-empty stderr line ``autoexplain: error: ...`` naming each needle, nothing written."""
    assert res.returncode == 2, f"{res.args}: exit {res.returncode}\nstdout: {res.stdout}\nstderr: {res.stderr}"
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"{res.args}: expected one stderr line, got {lines}"
    line = lines[0]
    assert line.startswith("autoexplain: error: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    assert "Traceback" not in res.stdout + res.stderr
    assert res.after == res.before, f"{res.args} wrote to its folder: {set(res.after) ^ set(res.before)}"
    return line


def save_sae(out: Path, d_in: int, hook_name: str | None) -> Path:
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    metadata = SAEMetadata(hook_name=hook_name) if hook_name else SAEMetadata()
    StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=64, metadata=metadata)).save_model(str(out))
    return out
