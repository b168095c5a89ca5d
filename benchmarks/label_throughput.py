"""Offline labelling throughput on the toy world, and the share of run time spent in DuckDB.

What it measures (issue: ≥ 1,000 features per hour on 2 cores, DuckDB writes ≤ 2 % of run time):

1. Build the toy world and harvest one toy SAE into a fresh database (timed separately: *excluded*; the held-out
   split is fixed as the examples are written).
2. Label the features with the agent's offline policy, scoring included (held-out split, lexical judge), exactly
   as ``autoexplain label`` does, through :func:`autoexplain.agent.runner.run_plan`: group commit, checkpoints
   and all. Each repeat labels a fresh copy of the harvested database.
3. Report features per hour (live and dead counted separately — dead features cost one store read), and the time
   spent inside the store: write transactions (every commit: the run's bookkeeping and the group commits of
   explanations, scores, judgements, tool calls …, the Arrow conversion of their rows included) and read-only
   queries (tool cache lookups, examples), as shares of the labelling time. The store is timed by wrapping its two
   entry points in the same process, side by side with the run itself. With ``--repeats`` > 1 the median and the
   worst repeat are reported as well.

Run: ``.venv/bin/python benchmarks/label_throughput.py [--features all] [--sae res0] [--repeats 3]
[--judgements final|all] [--out results.json]``. Numbers depend on the machine (and on other load: the share
moves with it); the README quotes the ones measured on the project's 2-vCPU machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", default="all", help="which features of the SAE (all, 0-199, …)")
    ap.add_argument("--sae", default="res0")
    ap.add_argument("--zoo", default="small")
    ap.add_argument("--repeats", type=int, default=3)
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
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "harvested.duckdb"
        harvest_plan = Plan.model_validate({"name": "bench-harvest", "model": spec, "items": [
            {"label": {"sae": f"{spec}/{args.sae}", "features": "0"}}]})
        t0 = time.perf_counter()
        run_plan(Store(base), prepare(harvest_plan), kind="bench")
        harvest_s = time.perf_counter() - t0  # harvest + one feature

        plan = Plan.model_validate({"name": "bench-label", "model": spec, "judgements": args.judgements, "items": [
            {"label": {"sae": f"{spec}/{args.sae}", "features": args.features}}]})
        prep = prepare(plan)
        for i in range(args.repeats):
            db = Path(tmp) / f"label{i}.duckdb"
            shutil.copy(base, db)
            store = TimedStore(db)
            TimedStore.write_s = TimedStore.read_s = 0.0
            TimedStore.writes = TimedStore.reads = 0
            t0 = time.perf_counter()
            res = run_plan(store, prep, kind="bench")
            label_s = time.perf_counter() - t0
            n = len(res.outcomes)
            dead = sum(1 for o in res.outcomes if (o.text or "").startswith("dead feature"))
            runs.append({
                "features": n, "dead": dead, "live": n - dead, "label_s": round(label_s, 2),
                "features_per_hour": round(n / label_s * 3600),
                "live_features_per_hour": round((n - dead) / label_s * 3600),
                "db_write_s": round(TimedStore.write_s, 3), "db_write_share": round(TimedStore.write_s / label_s, 4),
                "db_writes": TimedStore.writes, "db_read_s": round(TimedStore.read_s, 2),
                "db_read_share": round(TimedStore.read_s / label_s, 4), "db_reads": TimedStore.reads,
                "status": {s: sum(1 for o in res.outcomes if o.status.value == s)
                           for s in {o.status.value for o in res.outcomes}},
            })
            print(json.dumps(runs[-1]), flush=True)

    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "zoo": args.zoo, "sae": args.sae, "features": args.features, "judgements": args.judgements,
        "harvest_s": round(harvest_s, 1), "repeats": runs,
        "median": {k: med(k) for k in ("label_s", "features_per_hour", "live_features_per_hour", "db_write_s",
                                       "db_write_share", "db_read_share")},
        "worst_db_write_share": max(r["db_write_share"] for r in runs),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "repeats"}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
