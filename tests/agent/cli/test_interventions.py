"""``autoexplain ablate|steer|lens|dla`` on the ``tiny`` toy world, the README's Python quick-start run as written,
and bad flags refused before any model loads.

The command-line runs share one module fixture that starts them together on a small pool (each subprocess pays
~6 s of imports and a model load); each test asserts its own case against the same tool called in process.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from cli_support import CLI, Result, assert_input_error, cli_env, run_cli, snapshot

ROOT = Path(__file__).resolve().parents[3]
TEXT = "red cat owl cake ball apple drink , red cat owl cake"
PROMPT = "When Mary and John went to the store , John gave a drink to"


@pytest.fixture(scope="module")
def tiny(tiny_zoo, one_thread) -> dict[str, Any]:
    """The tiny model and res0 loaded in process, and the feature of res0 that fires most on TEXT (not at BOS)."""
    from autoexplain.tools.loading import load_model, load_sae
    from autoexplain.tools.probe import FeatureActivationsIn, feature_activations
    from autoexplain.tools.registry import ToolContext

    lm = load_model("toy:tiny", device="cpu")
    sae = load_sae("toy:tiny/res0", lm)
    ctx = ToolContext(model=lm, saes={sae.sae_id: sae})
    best, peak = -1, 0.0
    for start in range(0, sae.d_sae, 64):
        feats = list(range(start, min(start + 64, sae.d_sae)))
        out = feature_activations(ctx, FeatureActivationsIn(sae_id=sae.sae_id, features=feats, texts=[TEXT]))
        for tr in out.items[0].features:  # silent at BOS, so the KL there must be exactly 0
            if tr.activations[0] == 0 and max(tr.activations[1:]) > peak:
                best, peak = tr.feature, max(tr.activations[1:])
    assert peak > 0, "no feature of toy:tiny/res0 fires on the test text"
    return {"lm": lm, "sae": sae, "ctx": ctx, "feature": best}


def _run(args: list[str], cwd: Path) -> Result:
    """The real CLI with the session's toy world (the model loads; nothing is built)."""
    before = snapshot(cwd)
    env = {**cli_env(cwd), "AUTOEXPLAIN_CACHE": os.environ["AUTOEXPLAIN_CACHE"]}
    t0 = time.perf_counter()
    p = subprocess.run([*CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return Result(args, p.returncode, p.stdout, p.stderr, time.perf_counter() - t0, before, snapshot(cwd))


@pytest.fixture(scope="module")
def runs(tiny: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Path, Future]]]:
    root = tmp_path_factory.mktemp("interventions")
    f = str(tiny["feature"])
    cases = {
        "ablate": ["ablate", "--model", "toy:tiny", "--sae", "toy:tiny/res0", "--feature", f, "--text", TEXT,
                   "--top-k", "3"],
        "steer": ["steer", "--model", "toy:tiny", "--sae", "toy:tiny/res0", "--feature", f, "--scale", "8",
                  "--text", TEXT, "--db", "tool.duckdb"],
        "lens": ["lens", "--model", "toy:tiny", "--text", PROMPT, "--target", " Mary", "--target", " John",
                 "--top-k", "3"],
        "dla": ["dla", "--model", "toy:tiny", "--text", PROMPT, "--target", " Mary", "--baseline", " John",
                "--top-n", "50"],
    }
    pool = ThreadPoolExecutor(max_workers=2)
    futures = {}
    for name, args in cases.items():
        d = root / name
        d.mkdir()
        futures[name] = (d, pool.submit(_run, args, d))
    yield futures
    pool.shutdown(wait=True)


def _ok(fut: Future) -> Result:
    res = fut.result()
    assert res.returncode == 0, f"{res.args}: exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res


def test_ablating_a_firing_feature_changes_the_output(runs: dict, tiny: dict[str, Any]) -> None:
    from autoexplain.tools.probe import AblateFeatureIn, ablate_feature

    _, fut = runs["ablate"]
    res = _ok(fut)
    out = res.stdout
    assert res.after == res.before, "ablate without --db wrote something"
    want = ablate_feature(tiny["ctx"], AblateFeatureIn(sae_id=tiny["sae"].sae_id, features=[tiny["feature"]],
                                                       texts=[TEXT], top_k=3)).items[0]
    assert want.kl_max > 0 and want.kl_max_position is not None  # the feature fires: zeroing it moves predictions
    assert f"ablating features {tiny['feature']} of toy:tiny/res0 ({tiny['sae'].sae_id})" in out
    assert f"max {want.kl_max:.4g}, largest at position {want.kl_max_position}" in out
    assert "KL per position: '<|endoftext|>':0 " in out  # before the feature fires nothing moves
    assert f"token probabilities (position {want.kl_max_position}" in out
    for s in want.rose + want.fell:
        assert f"{s.delta:+.4g}" in out


def test_steer_records_the_call_with_db(runs: dict, tiny: dict[str, Any]) -> None:
    from autoexplain.agent.store import run_query

    d, fut = runs["steer"]
    res = _ok(fut)
    assert f"steering toy:tiny/res0 ({tiny['sae'].sae_id}): adding 8 x W_dec[{tiny['feature']}]" in res.stdout
    assert "token probabilities (mean over positions)" in res.stdout
    m = re.search(r"recorded: run (tool-\w+), tool call (call-\w+)", res.stderr)
    assert m, res.stderr
    db = d / "tool.duckdb"
    assert run_query(db, "select kind, status from runs where run_id = ?", [m.group(1)])[1] == [("tool", "done")]
    (tool, args, summary, key), = run_query(db, "select tool, args, summary, cache_key from tool_calls")[1]
    assert tool == "steer_feature" and f'"feature":{tiny["feature"]}' in args.replace(" ", "")
    assert summary.startswith("steering")
    assert run_query(db, "select count(*) from tool_cache where cache_key = ?", [key])[1] == [(1,)]
    assert run_query(db, "select spec, sae_id from sae_aliases")[1] == [("toy:tiny/res0", tiny["sae"].sae_id)]


def test_lens_shows_every_layer(runs: dict, tiny: dict[str, Any]) -> None:
    _, fut = runs["lens"]
    res = _ok(fut)
    assert res.after == res.before
    lm = tiny["lm"]
    rows = [line for line in res.stdout.splitlines() if re.match(r"^│ (resid_\w+\.\d+|model output)", line)]
    sites = [line.split("│")[1].strip() for line in rows]
    assert sites == [f"resid_pre.{L}" for L in range(lm.n_layers)] + [f"resid_post.{lm.n_layers - 1}",
                                                                      "model output"]
    assert "' Mary' rank (p)" in res.stdout and "' John' rank (p)" in res.stdout
    # the last residual stream decodes to exactly the model's own prediction
    assert rows[-2].split("│")[2:] == rows[-1].split("│")[2:]


def test_dla_lists_every_node_and_sums_to_the_total(runs: dict, tiny: dict[str, Any]) -> None:
    from autoexplain.tools.lens import DLAIn, direct_logit_attribution

    _, fut = runs["dla"]
    res = _ok(fut)
    want = direct_logit_attribution(tiny["ctx"], DLAIn(texts=[PROMPT], target=" Mary", baseline=" John"))
    assert f"total {want.total:+.4f}" in res.stdout
    shown = dict(re.findall(r"^│ (\S+) +│ ([+-]\d+\.\d{4}) ", res.stdout, re.M))
    lm = tiny["lm"]
    heads = {f"a{L}.{h}" for L in range(lm.n_layers) for h in range(lm.n_heads)}
    assert heads | {f"m{L}" for L in range(lm.n_layers)} | {"embed", "unembed.bias"} <= set(shown)
    assert set(shown) == set(want.contributions)
    assert sum(float(v) for v in shown.values()) == pytest.approx(want.total, abs=5e-3)


# ============================================================================= refused before the model loads
@pytest.mark.parametrize(("args", "needles"), [
    (["ablate", "--model", "toy:tiny", "--sae", "toy:tiny/res0", "--feature", "x", "--text", "a"], ["--feature 'x'"]),
    (["ablate", "--model", "toy:tiny", "--sae", "toy:tiny/res0", "--feature", "3,3", "--text", "a"],
     ["--feature", "duplicate"]),
    (["ablate", "--model", "toy:tiny", "--sae", "toy:tiny/res0", "--feature", "3", "--text", ""], ["--text"]),
    (["ablate", "--model", "toy:tiny", "--sae", "/no/such/sae", "--feature", "3", "--text", "a"], ["/no/such/sae"]),
    (["steer", "--model", "toy:tiny", "--sae", "toy:tiny/res0", "--feature", "3", "--text", "a"],
     ["--scale", "--value", "exactly one"]),
    (["steer", "--model", "toy:tiny", "--sae", "toy:tiny/res0", "--feature", "3", "--text", "a", "--scale", "1",
      "--value", "2"], ["exactly one"]),
    (["steer", "--model", "toy:tiny", "--sae", "toy:tiny/res0", "--feature", "3", "--text", "a", "--scale", "1e9"],
     ["--scale/--value"]),
    (["lens", "--model", "toy:tiny", "--text", "a", "--top-k", "0"], ["--top-k"]),
    (["lens", "--model", "toy:tiny", "--text", "a", "--format", "csv"], ["--format csv"]),
    (["dla", "--model", "toy:tiny", "--text", "a"], ["--target"]),
    (["dla", "--model", "toy:tiny", "--text", "a", "--target", " x", "--db", "/no/such/dir/r.duckdb"],
     ["/no/such/dir", "does not exist"]),
    (["lens", "--model", "/no/such/model", "--text", "a"], ["/no/such/model"]),
], ids=["feature-syntax", "feature-duplicate", "empty-text", "missing-sae", "steer-neither", "steer-both",
        "steer-scale-range", "lens-top-k", "lens-csv", "dla-no-target", "dla-bad-db", "missing-model"])
def test_bad_flags_are_refused_before_loading(tmp_path: Path, args: list[str], needles: list[str]) -> None:
    res = run_cli(args, tmp_path, timeout=60)  # its own empty cache: loading toy:tiny would build it there
    assert_input_error(res, *needles)
    assert not (tmp_path / "cache").exists(), "the toy world was built: the model loaded before the refusal"
    assert res.seconds < 30, f"took {res.seconds:.1f} s"


# ============================================================================= the README's Python quick-start
def test_readme_python_quickstart_runs_as_written(tiny_zoo, one_thread, capsys: pytest.CaptureFixture) -> None:
    text = (ROOT / "README.md").read_text()
    block = text.split("\n### Python quick-start\n", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert 'MODEL = "toy:small"' in block
    code = block.replace('MODEL = "toy:small"', 'MODEL = "toy:tiny"', 1)  # the world the tests build
    ns: dict[str, Any] = {"__name__": "quickstart"}
    exec(compile(code, "README.md (Python quick-start)", "exec"), ns)
    printed = capsys.readouterr().out
    assert ns["peak"] > 0 and f"feature {ns['best'].feature} peaks at" in printed
    effect = ns["effect"]
    assert effect.kl_max > 0 and effect.kl_max_position is not None  # ablating a firing feature changes the output
    assert "zero-ablating" in printed  # the summary an LLM sees
    assert len(ns["lens"].readings[0].layers) == ns["lm"].n_layers + 1
    assert ns["dla"].residual_error < 1e-3 and "logit diff" in printed
