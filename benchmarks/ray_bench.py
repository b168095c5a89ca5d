"""Labelling throughput with the Ray executor (``--executor ray``) against a serial run, and Ray's per-item overhead.

What it measures, in one process, side by side on copies of one harvested database:

1. Build the toy world (``--zoo``) and harvest one SAE into a template database (excluded from every timing).
2. **serial**: label the features with the offline policy through :func:`autoexplain.agent.runner.run_plan`, as
   ``autoexplain label`` does (group commit, checkpoints and all).
3. **ray**: the same plan on a fresh copy through :class:`~autoexplain.agent.ray_executor.RayExecutor` with
   ``--workers`` actors on a local Ray. Reported separately: starting Ray (``ray.init``), starting the actors
   (each loads the model and SAEs and copies the database snapshot), and the items phase (first dispatch to last
   result), whose items per hour is the throughput to compare with the serial items phase.
4. **per-item overhead**: the time an item occupies its runner beyond its graph nodes (``usage.seconds``, the same
   work in both modes): serial, the items phase / items − mean node time; Ray, workers × items phase / items − mean
   node time (the worker's one-item loop, its bookkeeping, moving rows to the driver, idle gaps). Also the
   driver's dispatch-to-result time minus node time, mean and median (it includes the wait in the actor's queue:
   each actor holds ``RayExecutor.DEPTH`` items).

The results of both runs are compared (status, text, scores of every item) and the benchmark fails if they differ.
Numbers depend on the machine and on other load (print ``/proc/loadavg``; it is stored with the results).

Run: ``.venv/bin/python benchmarks/ray_bench.py [--zoo small] [--sae res0] [--features 0-63] [--workers 2]
[--tokens 50000] [--out benchmarks/results/ray_throughput.json]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default="small")
    ap.add_argument("--sae", default="res0")
    ap.add_argument("--features", default="0-63")
    ap.add_argument("--tokens", type=int, default=50_000, help="tokens to harvest (excluded from the timings)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import ray
    import torch

    from autoexplain.agent.ray_executor import RayExecutor, RayOptions
    from autoexplain.agent.runner import Plan, prepare, run_plan
    from autoexplain.agent.store import Store

    torch.set_num_threads(1)
    spec = f"toy:{args.zoo}/{args.sae}"
    tmp = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    try:
        template = tmp / "template.duckdb"
        harvest_plan = Plan.model_validate({"name": "ray-bench", "model": f"toy:{args.zoo}",
                                            "items": [{"label": {"sae": spec, "features": "0",
                                                                 "tokens": args.tokens}}]})
        t0 = time.perf_counter()
        run_plan(Store(template), prepare(harvest_plan))  # harvest (and one item), excluded
        harvest_s = time.perf_counter() - t0
        plan = Plan.model_validate({"name": "ray-bench", "model": f"toy:{args.zoo}",
                                    "items": [{"label": {"sae": spec, "features": args.features,
                                                         "tokens": args.tokens}}]})
        prep = prepare(plan)

        def phase_clock() -> tuple[dict[str, float], Any]:
            marks: dict[str, float] = {}

            def report(stage: str, done: int, total: int) -> None:
                if stage == "items" and "items" not in marks:
                    marks["items"] = time.perf_counter()
                if stage == "ray workers":
                    marks[f"workers{done}"] = time.perf_counter()

            return marks, report

        # -- serial
        load_serial = loadavg()
        db = shutil.copyfile(template, tmp / "serial.duckdb")
        marks, report = phase_clock()
        t0 = time.perf_counter()
        serial = run_plan(Store(db), prep, report=report)
        t_end = time.perf_counter()
        serial_items_s = t_end - marks["items"]
        n = len(serial.outcomes)

        # -- ray
        load_ray = loadavg()
        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=args.workers, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR, object_store_memory=256 * 1024**2)
        ray_init_s = time.perf_counter() - t0
        try:
            dispatched: dict[str, float] = {}
            received: dict[str, float] = {}

            def on_item(o: Any) -> None:
                received[o.item_id] = time.perf_counter()

            ex = RayExecutor(RayOptions(workers=args.workers),
                             on_dispatch=lambda item_id, pid: dispatched.setdefault(item_id, time.perf_counter()))
            db = shutil.copyfile(template, tmp / "ray.duckdb")
            marks, report = phase_clock()
            t0 = time.perf_counter()
            res = run_plan(Store(db), prep, report=report, on_item=on_item, executor=ex)
            t_end = time.perf_counter()
        finally:
            ray.shutdown()
        actors_s = marks[f"workers{args.workers}"] - marks["workers0"]
        first = min(dispatched.values())
        ray_items_s = max(received.values()) - first
        overhead = [received[o.item_id] - dispatched[o.item_id] - o.usage.seconds for o in res.outcomes
                    if o.item_id in dispatched]
        node_s = {"serial": statistics.mean(o.usage.seconds for o in serial.outcomes),
                  "ray": statistics.mean(o.usage.seconds for o in res.outcomes)}

        def key(o: Any) -> tuple[Any, ...]:
            return o.target, o.status.value, o.text, o.scores, o.overall

        same = [key(o) for o in res.outcomes] == [key(o) for o in serial.outcomes]
        out = {
            "what": f"offline labelling of {n} features of {spec} ({args.features}), serial vs Ray with "
                    f"{args.workers} local workers; harvest excluded",
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads_per_process": 1,
                        "device": "cpu"},
            "load_before_serial": load_serial, "load_before_ray": load_ray, "load_after": loadavg(),
            "harvest_s": round(harvest_s, 2),
            "serial": {"items": n, "items_s": round(serial_items_s, 2),
                       "features_per_hour": round(n / serial_items_s * 3600),
                       "mean_node_s_per_item": round(node_s["serial"], 4),
                       "overhead_s_per_item": round(serial_items_s / n - node_s["serial"], 4)},
            "ray": {"workers": args.workers, "ray_init_s": round(ray_init_s, 2), "actors_start_s": round(actors_s, 2),
                    "run_plan_s": round(t_end - t0, 2), "items_s": round(ray_items_s, 2),
                    "features_per_hour": round(n / ray_items_s * 3600),
                    "mean_node_s_per_item": round(node_s["ray"], 4),
                    "overhead_s_per_item": round(args.workers * ray_items_s / n - node_s["ray"], 4),
                    "dispatch_to_result_minus_nodes_s": {"mean": round(statistics.mean(overhead), 4),
                                                         "median": round(statistics.median(overhead), 4)}},
            "speedup_items_phase": round(serial_items_s / ray_items_s, 2),
            "identical_results": same,
        }
        print(json.dumps(out, indent=2))
        if args.out:
            args.out.write_text(json.dumps(out, indent=2) + "\n")
        if not same:
            raise SystemExit("the Ray run's results differ from the serial run's")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
