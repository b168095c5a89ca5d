"""Does every CUDA path run, and does it agree with CPU? One script, run once per device, then compared.

On the ``tiny`` toy world (``tools/zoo.py``) it runs and times, on ``--device``:

1. ``load_model("toy:tiny")`` (which checks that every hook site fires) and ``load_sae("toy:tiny/res0")``;
2. a harvest of ``res0`` over ~20k tokens of the toy corpus (densities, max/mean activations, top windows);
3. circuit search for the ``induction`` and ``greater_than`` tasks with EAP, EAP-IG and ACDC (resample ablation,
   each method's default metric): kept edges, faithfulness, every edge score, and ``evals.circuits.score_circuit``
   of each. Caveat, measured: on ``tiny`` both tasks' full effects are small (logit_diff 0.019 and 0.0015, KL
   ~5e-4; the code warns), so edges near the threshold are decided by noise: across devices compare edge scores
   with a tolerance before reading much into a different kept set;
4. the agent end to end (``agent.runner.Plan/prepare/run_plan``, offline policy, lexical judge) with a plan of
   ten feature labels and one circuit, into a temporary DuckDB: each outcome's text and scores.

Every step's result and wall time go to one JSON file. ``--compare CPU.json CUDA.json`` then writes both sides
and their differences (max absolute differences, kept-edge set differences, label mismatches).

Run::

    AUTOEXPLAIN_CACHE=.gpucache python benchmarks/gpu_check.py --device cpu --out /tmp/cpu.json
    AUTOEXPLAIN_CACHE=.gpucache python benchmarks/gpu_check.py --device cuda --out /tmp/cuda.json
    python benchmarks/gpu_check.py --compare /tmp/cpu.json /tmp/cuda.json --out benchmarks/results/gpu_check.json

Without a GPU, ``--device cpu --emulate-cuda-batching`` takes the CUDA-only batching branches on CPU (row budget,
ACDC speculation, several masks per pass); compare it with a plain CPU run (``--label-b``).

On a device machine with no internet (python3 with torch, no transformer-lens/sae-lens/duckdb/langgraph): carry the
wheels of the venv's exact versions in ``.whl/`` (git-excluded; wandb repacked without its ``bin/`` binaries, which
only ``wandb.init`` runs) and the built zoo in ``.gpucache/``, then::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    mkdir -p /tmp/pkg/autoexplain && touch /tmp/pkg/autoexplain/__init__.py
    for d in agent tools evals; do ln -sfn $PWD/$d /tmp/pkg/autoexplain/$d; done
    PYTHONPATH=/tmp/pkg:/tmp/site AUTOEXPLAIN_CACHE=$PWD/.gpucache python3 benchmarks/gpu_check.py --device cuda ...

A step that raises is recorded (type, message, the innermost project frames of its traceback) and the next
step still runs, so one CUDA bug does not hide the others.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

N_TOKENS = 20_000
N_FIRST = 20
METHODS = ("eap", "eap-ig", "acdc")


# ============================================================================================ one device
def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _step(out: dict[str, Any], name: str, device: str, fn: Callable[[], dict[str, Any]]) -> Any:
    """Run ``fn``, store its result (or its error) under ``out['steps'][name]`` with its wall time."""
    t0 = time.perf_counter()
    try:
        res = fn()
        _sync(device)
        res = {"ok": True, **res}
    except Exception as exc:
        tb = traceback.extract_tb(exc.__traceback__)
        frames = [f"{Path(f.filename).as_posix().split('/main/')[-1]}:{f.lineno} in {f.name}" for f in tb]
        res = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).strip()[:2000]}", "traceback": frames[-25:]}
        print(f"[{name}] FAILED: {res['error']}", file=sys.stderr)
        traceback.print_exc()
    res["seconds"] = round(time.perf_counter() - t0, 4)
    out["steps"][name] = res
    print(f"[{name}] {'ok' if res['ok'] else 'FAILED'} in {res['seconds']:.2f} s", file=sys.stderr, flush=True)
    return res


def _env(device: str) -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    vers = {}
    for d in ("torch", "transformers", "transformer-lens", "sae-lens", "duckdb", "langgraph", "numpy", "pydantic"):
        try:
            vers[d] = md.version(d)
        except md.PackageNotFoundError:
            vers[d] = None
    env: dict[str, Any] = {"device": device, "python": platform.python_version(), "machine": platform.machine(),
                           "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                           "loadavg_at_start": [round(x, 2) for x in os.getloadavg()], "versions": vers}
    if device.startswith("cuda"):
        env["cuda_device"] = torch.cuda.get_device_name(0)
        env["cuda_version"] = torch.version.cuda
        env["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
    return env


def _devices_of(lm: Any, sae: Any) -> dict[str, Any]:
    return {"lm.device": str(lm.device),
            "model_param_devices": sorted({str(p.device) for p in lm.model.parameters()}),
            "model_buffer_devices": sorted({str(b.device) for b in lm.model.buffers()}),
            "sae_param_devices": sorted({str(p.device) for p in sae.sae.parameters()}),
            "model_dtype": str(next(lm.model.parameters()).dtype)}


def run_device(device: str, *, n_tokens: int = N_TOKENS, task_name: str = "induction",
               circuit_tasks: tuple[str, ...] = ("induction", "greater_than")) -> dict[str, Any]:
    """Every step on ``device``; circuits for each of ``circuit_tasks``, the agent's circuit item on ``task_name``."""
    import numpy as np

    from autoexplain.tools.cache import cache_root

    out: dict[str, Any] = {"env": _env(device), "cache_root": str(cache_root()), "steps": {}}
    held: dict[str, Any] = {}

    # ---------------------------------------------------------------- 0. the toy world (built or from the cache)
    def zoo() -> dict[str, Any]:
        from autoexplain.tools.zoo import ensure_model

        built = ensure_model("tiny")
        held["built"] = built
        return {"root": built.root.name, "fingerprint": built.fingerprint, "task_accuracy":
                built.manifest.get("task_accuracy")}

    _step(out, "zoo", device, zoo)

    # ---------------------------------------------------------------- 1. model + SAE (load checks every site)
    def load() -> dict[str, Any]:
        from autoexplain.tools.loading import load_model, load_sae

        t0 = time.perf_counter()
        lm = load_model("toy:tiny", device=device)
        _sync(device)
        t_lm = time.perf_counter() - t0
        sae = load_sae("toy:tiny/res0", lm)
        _sync(device)
        t_sae = time.perf_counter() - t0 - t_lm
        t1 = time.perf_counter()
        fired = lm.check_sites()  # again, explicitly: every hook site of the model fires on this device
        _sync(device)
        held.update(lm=lm, sae=sae)
        return {"model_id": lm.model_id, "sae_id": sae.sae_id, "d_sae": sae.d_sae, "n_sites_checked": len(fired),
                "load_model_seconds": round(t_lm, 4), "load_sae_seconds": round(t_sae, 4),
                "check_sites_seconds": round(time.perf_counter() - t1, 4), **_devices_of(lm, sae)}

    _step(out, "load", device, load)

    # ---------------------------------------------------------------- 2. harvest (twice: cold, then warm)
    def harvest_once(tag: str) -> dict[str, Any]:
        from autoexplain.agent.store.harvest import rows_sink
        from autoexplain.tools.harvest import HarvestIn, harvest
        from autoexplain.tools.registry import ToolContext

        lm, sae, built = held["lm"], held["sae"], held["built"]
        rows: dict[str, list[dict[str, Any]]] = {}

        def sink(table: str, r: list[dict[str, Any]]) -> None:
            rows.setdefault(table, []).extend(r)

        with tempfile.TemporaryDirectory() as tmp:
            res = harvest(ToolContext(model=lm, saes={sae.sae_id: sae}, sink=rows_sink(sink)),
                          HarvestIn(sae_id=sae.sae_id, dataset=str(built.corpus), n_tokens=n_tokens,
                                    ctx=min(64, lm.n_ctx)), work_dir=Path(tmp) / "work")
        r = res.result
        tops: dict[int, list[int]] = {}
        for ex in rows.get("feature_examples", []):
            if ex["kind"] == "top" and ex["feature_index"] < N_FIRST:
                tops.setdefault(ex["feature_index"], []).append(int(ex["window_index"]))
        return {"n_tokens": res.n_tokens, "n_windows": res.n_windows, "n_dead": res.n_dead,
                "harvest_seconds": res.seconds, "stream_seconds": res.stream_seconds,
                "finish_seconds": res.finish_seconds,
                "density_first20": [float(x) for x in r.density[:N_FIRST]],
                "density": [float(x) for x in r.density], "max_act": [float(x) for x in r.max_act],
                "mean_act": [float(x) for x in r.mean_act],
                "top_windows_first20": {str(k): v for k, v in sorted(tops.items())},
                "top_logits_first5": [row["top_logits"][:3] if row["top_logits"] else None
                                      for row in rows.get("features", [])[:5]],
                "n_feature_rows": len(rows.get("features", [])),
                "n_example_rows": len(rows.get("feature_examples", [])),
                "_density_sum": float(np.sum(r.density))}

    if "lm" in held:
        _step(out, "harvest", device, lambda: harvest_once("cold"))
        _step(out, "harvest_warm", device, lambda: {k: v for k, v in harvest_once("warm").items()
                                                    if k.endswith("seconds")})

    # ---------------------------------------------------------------- 3. circuits (+ score_circuit)
    def circuit(method: str, task_name: str) -> dict[str, Any]:
        from autoexplain.evals.circuits import score_circuit
        from autoexplain.tools.circuits import default_metric, find_circuit
        from autoexplain.tools.data import load_task_file, tokenize_task
        from autoexplain.tools.patching import PatchSetup

        lm, built = held["lm"], held["built"]
        task_file = load_task_file(built.task_file(task_name))
        task = tokenize_task(task_file, lm.tokenizer, n_ctx=lm.n_ctx)
        t0 = time.perf_counter()
        setup = PatchSetup(lm, task, ablation="resample", metric=default_metric(method, task))
        _sync(device)
        t_setup = time.perf_counter() - t0
        t1 = time.perf_counter()
        circ = find_circuit(setup, method)
        _sync(device)
        t_find = time.perf_counter() - t1
        res: dict[str, Any] = {
            "task": task_name, "metric": setup.metric.value, "n_prompts": setup.n_prompts,
            "n_edges_total": setup.graph.n_edges, "m_clean": setup.m_clean, "m_ablated": setup.m_ablated,
            "n_kept": circ.n_edges, "kept": [str(e) for e in circ.edges], "faithfulness": circ.faithfulness,
            "curve": [[p.percent, p.n_edges, p.faithfulness] for p in circ.curve], "note": circ.note,
            "scores": circ.scores.scores, "search_seconds": round(circ.scores.seconds, 4),
            "setup_seconds": round(t_setup, 4), "find_circuit_seconds": round(t_find, 4),
            "details": {k: v for k, v in circ.scores.details.items() if isinstance(v, (int, float, str, bool))}}
        t2 = time.perf_counter()
        try:
            sc = score_circuit(setup, circ)
            _sync(device)
            d = sc.model_dump(mode="json")
            res["score_circuit"] = {k: d[k] for k in (
                "correctness", "faithfulness", "completeness", "completeness_worst_gap", "completeness_mean_gap",
                "succinctness", "edge_fraction", "cpr", "cmd", "evaluations", "n_edges")}
            res["score_circuit_seconds"] = round(time.perf_counter() - t2, 4)
            res["score_circuit_ok"] = True
        except Exception as exc:
            tb = traceback.extract_tb(exc.__traceback__)
            res["score_circuit_ok"] = False
            res["score_circuit_error"] = f"{type(exc).__name__}: {str(exc).strip()[:2000]}"
            res["score_circuit_traceback"] = [f"{Path(f.filename).as_posix().split('/main/')[-1]}:{f.lineno} in "
                                              f"{f.name}" for f in tb][-25:]
            traceback.print_exc()
        return res

    if "lm" in held:
        for t in circuit_tasks:
            for m in METHODS:
                _step(out, f"circuit_{t}_{m}", device, lambda m=m, t=t: circuit(m, t))

    # ---------------------------------------------------------------- 4. the agent end to end
    def agent() -> dict[str, Any]:
        from autoexplain.agent.runner import Plan, prepare, run_plan
        from autoexplain.agent.store import Store

        plan = Plan.model_validate({"model": "toy:tiny", "device": device, "items": [
            {"label": {"sae": "toy:tiny/res0", "features": "0-9"}}, {"circuit": {"task": task_name}}]})
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            prep = prepare(plan)
            t_prep = time.perf_counter() - t0
            store = Store(Path(tmp) / "run.duckdb")
            t1 = time.perf_counter()
            res = run_plan(store, prep)
            _sync(device)
            t_run = time.perf_counter() - t1
            n_feat = store.query("select count(*) from features")[1][0][0]
            n_expl = store.query("select count(*) from explanations")[1][0][0]
        outcomes = [{"target": o.target, "kind": o.kind.value, "status": o.status.value, "text": o.text,
                     "scores": o.scores, "overall": o.overall, "error": o.error} for o in res.outcomes]
        return {"prepare_seconds": round(t_prep, 4), "run_seconds": round(t_run, 4),
                "harvest_seconds": round(res.harvest_seconds, 4), "lm_device": str(prep.lm.device),
                "n_features_stored": n_feat, "n_explanations": n_expl,
                "statuses": sorted({o["status"] for o in outcomes}),
                "failed": [o for o in outcomes if o["status"] == "failed"], "outcomes": outcomes}

    _step(out, "agent", device, agent)
    out["all_ok"] = all(s["ok"] and s.get("score_circuit_ok", True) and not s.get("failed")
                        for s in out["steps"].values())
    return out


def emulate_cuda_batching() -> dict[str, Any]:
    """Make a CPU run take the branches the code takes on CUDA, apart from the device itself: the CUDA row budget
    (``tools/patching.py`` ``row_budget``), ACDC's speculative batched passes (``tools/circuits.py``
    ``speculate`` 8) and ``evals/circuits.py``'s several masks per forward pass (``_MASKS_PER_CALL``). Their
    results must equal the plain CPU run's (to float tolerance): what a machine without a GPU can check of the
    CUDA paths."""
    import dataclasses

    import autoexplain.evals.circuits as ec
    import autoexplain.tools.circuits as tc
    import autoexplain.tools.patching as tp

    tp.row_budget = lambda device: tp.ROW_BUDGET
    plain_score_edges = tc.score_edges

    def score_edges(setup: Any, method: Any, config: Any = None) -> Any:
        config = config or tc.SearchConfig()
        if config.speculate is None:
            config = dataclasses.replace(config, speculate=8)
        return plain_score_edges(setup, method, config)

    tc.score_edges = score_edges
    plain_init = ec._Faithfulness.__init__

    def init(self: Any, setup: Any) -> None:
        plain_init(self, setup)
        self._per_call = ec._MASKS_PER_CALL

    ec._Faithfulness.__init__ = init
    return {"row_budget": tp.ROW_BUDGET, "acdc_speculate": 8, "masks_per_call": ec._MASKS_PER_CALL}


def check_cuda_refusal() -> dict[str, Any]:
    """Without CUDA, asking for it must be one clear InputError (tools/device.py), not a torch crash."""
    import torch

    from autoexplain.tools.errors import InputError
    from autoexplain.tools.loading import load_model

    if torch.cuda.is_available():
        return {"skipped": "CUDA is available"}
    try:
        load_model("toy:tiny", device="cuda")
    except InputError as exc:
        return {"refused_with_input_error": True, "message": str(exc)}
    except Exception as exc:
        return {"refused_with_input_error": False, "message": f"{type(exc).__name__}: {exc}"}
    return {"refused_with_input_error": False, "message": "loaded?"}


# ============================================================================================ comparison
def _maxdiff(a: list[Any] | None, b: list[Any] | None) -> float | None:
    if a is None or b is None or len(a) != len(b):
        return None
    ds = [abs(float(x) - float(y)) for x, y in zip(a, b, strict=True)
          if x is not None and y is not None and math.isfinite(float(x)) and math.isfinite(float(y))]
    return max(ds, default=0.0)


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def compare(cpu: dict[str, Any], gpu: dict[str, Any], *, atol: float = 1e-5, label_b: str = "cuda") -> dict[str, Any]:
    """Differences between two runs; pairs are [cpu, second run] (the second named ``label_b``; "only_cuda" and
    "cpu_over_cuda" keys refer to it)."""
    cs, gs = cpu["steps"], gpu["steps"]
    cmp: dict[str, Any] = {"steps_ok": {k: {"cpu": cs.get(k, {}).get("ok"), label_b: gs.get(k, {}).get("ok")}
                                        for k in sorted(set(cs) | set(gs))}}
    timings: dict[str, Any] = {}
    for k in sorted(set(cs) & set(gs)):
        t = {"step": [cs[k]["seconds"], gs[k]["seconds"]]}
        for key in cs[k]:
            if key.endswith("seconds") and key in gs[k]:
                t[key] = [cs[k][key], gs[k][key]]
        timings[k] = {kk: {"cpu": v[0], label_b: v[1], f"cpu_over_{label_b}": round(v[0] / v[1], 2) if v[1] else None}
                      for kk, v in t.items()}
    cmp["timings"] = timings

    h_c, h_g = cs.get("harvest", {}), gs.get("harvest", {})
    if h_c.get("ok") and h_g.get("ok"):
        d20 = _maxdiff(h_c["density_first20"], h_g["density_first20"])
        dall = _maxdiff(h_c["density"], h_g["density"])
        cmp["harvest"] = {
            "n_tokens": [h_c["n_tokens"], h_g["n_tokens"]], "n_dead": [h_c["n_dead"], h_g["n_dead"]],
            "density_first20_max_abs_diff": d20, "density_all_max_abs_diff": dall,
            "density_features_differing": [i for i, (x, y) in enumerate(zip(h_c["density"], h_g["density"],
                                                                             strict=True)) if abs(x - y) > atol],
            "max_act_max_abs_diff": _maxdiff(h_c["max_act"], h_g["max_act"]),
            "mean_act_max_abs_diff": _maxdiff(h_c["mean_act"], h_g["mean_act"]),
            "top_windows_first20_equal": h_c["top_windows_first20"] == h_g["top_windows_first20"],
            "top_windows_features_differing": sorted(
                int(k) for k in set(h_c["top_windows_first20"]) | set(h_g["top_windows_first20"])
                if sorted(h_c["top_windows_first20"].get(k, [])) != sorted(h_g["top_windows_first20"].get(k, []))),
            "top_logits_first5_equal": [[t[0] for t in (r or [])] for r in h_c["top_logits_first5"]]
            == [[t[0] for t in (r or [])] for r in h_g["top_logits_first5"]],
            "n_example_rows": [h_c["n_example_rows"], h_g["n_example_rows"]],
            "density_equal": dall is not None and dall <= atol,
        }

    circ: dict[str, Any] = {}
    for m in sorted(k for k in set(cs) & set(gs) if k.startswith("circuit_")):
        c, g = cs[m], gs[m]
        if not (c.get("ok") and g.get("ok")):
            continue
        kc, kg = set(c["kept"]), set(g["kept"])
        r: dict[str, Any] = {
            "n_kept": [c["n_kept"], g["n_kept"]], "kept_equal": kc == kg,
            "kept_only_cpu": sorted(kc - kg), "kept_only_cuda": sorted(kg - kc),
            "faithfulness": [c["faithfulness"], g["faithfulness"]],
            "faithfulness_abs_diff": abs(c["faithfulness"] - g["faithfulness"]),
            "m_clean_abs_diff": abs(c["m_clean"] - g["m_clean"]),
            "m_ablated_abs_diff": abs(c["m_ablated"] - g["m_ablated"]),
            "edge_scores_max_abs_diff": _maxdiff(c["scores"], g["scores"]),
            "curve_max_abs_diff": _maxdiff([p[2] for p in c["curve"]], [p[2] for p in g["curve"]]),
        }
        sc, sg = c.get("score_circuit"), g.get("score_circuit")
        if sc and sg:
            r["score_circuit_abs_diff"] = {k: (abs(sc[k] - sg[k]) if _num(sc[k]) and _num(sg[k]) else
                                               (None if sc[k] == sg[k] else [sc[k], sg[k]])) for k in sc}
            r["score_circuit_max_abs_diff"] = max((v for k, v in r["score_circuit_abs_diff"].items()
                                                   if _num(v) and k != "evaluations"), default=0.0)
        r["score_circuit_ok"] = [c.get("score_circuit_ok"), g.get("score_circuit_ok")]
        circ[m] = r
    cmp["circuits"] = circ
    if circ:
        cmp["circuits_max"] = {
            "faithfulness_abs_diff": max(r["faithfulness_abs_diff"] for r in circ.values()),
            "edge_scores_max_abs_diff": max((r["edge_scores_max_abs_diff"] or 0.0) for r in circ.values()),
            "score_circuit_max_abs_diff": max((r.get("score_circuit_max_abs_diff") or 0.0) for r in circ.values()),
            "all_kept_equal": all(r["kept_equal"] for r in circ.values())}

    a_c, a_g = cs.get("agent", {}), gs.get("agent", {})
    if a_c.get("ok") and a_g.get("ok"):
        rows = []
        for oc, og in zip(a_c["outcomes"], a_g["outcomes"], strict=False):
            keys = set(oc["scores"]) | set(og["scores"])
            sd = {k: (abs(oc["scores"][k] - og["scores"][k]) if _num(oc["scores"].get(k)) and
                      _num(og["scores"].get(k)) else (None if oc["scores"].get(k) == og["scores"].get(k)
                                                      else [oc["scores"].get(k), og["scores"].get(k)]))
                  for k in sorted(keys)}
            rows.append({"target": oc["target"], "status": [oc["status"], og["status"]],
                         "text_equal": oc["text"] == og["text"],
                         **({} if oc["text"] == og["text"] else {"text_cpu": oc["text"], "text_cuda": og["text"]}),
                         "overall": [oc["overall"], og["overall"]],
                         "scores_max_abs_diff": max((v for v in sd.values() if _num(v)), default=0.0),
                         "scores_mismatch": {k: v for k, v in sd.items() if not _num(v) and v is not None}})
        cmp["agent"] = {"n_outcomes": [len(a_c["outcomes"]), len(a_g["outcomes"])],
                        "all_texts_equal": all(r["text_equal"] for r in rows),
                        "all_status_equal": all(r["status"][0] == r["status"][1] for r in rows),
                        "scores_max_abs_diff": max((r["scores_max_abs_diff"] for r in rows), default=0.0),
                        "items": rows}
    return cmp


# ============================================================================================ CLI
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], help="run every step on this device")
    ap.add_argument("--compare", nargs=2, metavar=("CPU_JSON", "CUDA_JSON"), help="compare two runs (CUDA_JSON "
                    "may be a --emulate-cuda-batching CPU run)")
    ap.add_argument("--label-b", default="cuda", help="key of the second run in the --compare output")
    ap.add_argument("--note", default="", help="a note stored at the top of the --compare output")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--tokens", type=int, default=N_TOKENS)
    ap.add_argument("--task", default="induction", help="the agent's circuit task")
    ap.add_argument("--emulate-cuda-batching", action="store_true",
                    help="with --device cpu: take the CUDA-only batching branches (see emulate_cuda_batching)")
    ap.add_argument("--circuit-tasks", default="induction,greater_than", help="tasks for step 3, comma-separated")
    a = ap.parse_args(argv)
    if (a.device is None) == (a.compare is None):
        ap.error("give --device or --compare")
    if a.compare:
        cpu, gpu = (json.loads(Path(p).read_text()) for p in a.compare)
        doc = {"cpu": cpu, a.label_b: gpu, "comparison": {"pairs_are": ["cpu", a.label_b],
                                                           **compare(cpu, gpu, label_b=a.label_b)}}
        if a.label_b != "cuda":
            doc["cuda"] = None
        if a.note:
            doc = {"note": a.note, **doc}
    else:
        emulated = emulate_cuda_batching() if a.emulate_cuda_batching else None
        doc = run_device(a.device, n_tokens=a.tokens, task_name=a.task,
                         circuit_tasks=tuple(t for t in a.circuit_tasks.split(",") if t))
        doc["env"]["emulated_cuda_batching"] = emulated
        if a.device == "cpu":
            doc["cuda_refusal"] = check_cuda_refusal()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1, default=str))
    print(f"wrote {a.out}", file=sys.stderr)
    return 0 if doc.get("all_ok", True) else 1


if __name__ == "__main__":
    raise SystemExit(main())
