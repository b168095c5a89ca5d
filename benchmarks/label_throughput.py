"""Offline labelling throughput on the toy world, and the share of run time spent in DuckDB.

What it measures (issue: ≥ 1,000 features per hour on 2 cores, DuckDB writes ≤ 2 % of run time):

1. Build the toy world and harvest one toy SAE into a fresh database (timed separately: *excluded*).
2. Label N features with the agent's offline policy, scoring included (held-out split, lexical judge), exactly
   as ``autoexplain label`` does, through :func:`autoexplain.agent.runner.run_plan`.
3. Report features per hour (live and dead counted separately — dead features cost one store read), and the time
   spent inside the store: write transactions (upserts: explanations, scores, judgements, tool calls …) and
   read-only queries (tool cache lookups, examples), as shares of the labelling time. The store is timed by
   wrapping its two entry points in one process, side by side with the run itself.

Run: ``.venv/bin/python benchmarks/label_throughput.py [--features 0-199] [--sae res0] [--out results.json]``.
Numbers depend on the machine; the README quotes the ones measured on the project's 2-vCPU machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", default="0-199")
    ap.add_argument("--sae", default="res0")
    ap.add_argument("--zoo", default="small")
    ap.add_argument("--judgements", default="final", choices=["final", "all"],
                    help="per-example judge decisions kept: the final label's, or every scored draft's")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from autoexplain.agent.runner import Plan, prepare, run_plan
    from autoexplain.agent.store import Store

    class TimedStore(Store):
        write_s = 0.0
        read_s = 0.0
        writes = 0
        reads = 0

        @contextlib.contextmanager
        def transaction(self) -> Any:
            t0 = time.perf_counter()
            with super().transaction() as con:
                yield con
            TimedStore.write_s += time.perf_counter() - t0
            TimedStore.writes += 1

        def query(self, sql: str, params: Any = None) -> Any:
            t0 = time.perf_counter()
            try:
                return super().query(sql, params)
            finally:
                TimedStore.read_s += time.perf_counter() - t0
                TimedStore.reads += 1

    spec = f"toy:{args.zoo}"
    with tempfile.TemporaryDirectory() as tmp:
        store = TimedStore(Path(tmp) / "bench.duckdb")
        harvest_plan = Plan.model_validate({"name": "bench-harvest", "model": spec, "items": [
            {"label": {"sae": f"{spec}/{args.sae}", "features": "0"}}]})
        prep = prepare(harvest_plan)
        t0 = time.perf_counter()
        run_plan(store, prep, kind="bench")
        harvest_s = time.perf_counter() - t0  # harvest + one feature

        plan = Plan.model_validate({"name": "bench-label", "model": spec, "judgements": args.judgements, "items": [
            {"label": {"sae": f"{spec}/{args.sae}", "features": args.features}}]})
        prep = prepare(plan)
        TimedStore.write_s = TimedStore.read_s = 0.0
        TimedStore.writes = TimedStore.reads = 0
        t0 = time.perf_counter()
        res = run_plan(store, prep, kind="bench")
        label_s = time.perf_counter() - t0
        dead = sum(1 for o in res.outcomes if (o.text or "").startswith("dead feature"))
        n = len(res.outcomes)
        result = {
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
            "zoo": args.zoo, "sae": args.sae, "features": n, "dead": dead, "live": n - dead,
            "harvest_s": round(harvest_s, 1), "label_s": round(label_s, 1),
            "features_per_hour": round(n / label_s * 3600), "live_features_per_hour":
                round((n - dead) / max(1e-9, label_s) * 3600),
            "db_write_s": round(TimedStore.write_s, 2), "db_write_share": round(TimedStore.write_s / label_s, 4),
            "db_writes": TimedStore.writes, "db_read_s": round(TimedStore.read_s, 2),
            "db_read_share": round(TimedStore.read_s / label_s, 4), "db_reads": TimedStore.reads,
            "status": {s: sum(1 for o in res.outcomes if o.status.value == s) for s in
                       {o.status.value for o in res.outcomes}},
        }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
