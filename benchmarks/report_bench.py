"""``autoexplain report`` on a large store: build time and peak memory for 10,000 labelled features.

A synthetic database shaped like a labelling run over one SAE at the harvest's defaults: per feature the stored
statistics (histogram, 10 top and 10 bottom logits), 20 top + 20 quantile contexts of 33 tokens and 20 random
contexts of 63 tokens (what ``HarvestIn``'s defaults store), one work item, two explanations (one final) with 10
scores each, three judgement sets of 40 judged contexts for the final label, two hypotheses and two tool calls. The
rows are written through the store (not timed); the report is then built by the real command line in a fresh
process (``autoexplain report --no-model``: no circuits here), timed by wall clock; its memory is the high-water
mark of its resident set (``VmHWM``, read from /proc every 0.1 s: ``ru_maxrss`` would count the benchmark process
it was forked from, which holds the synthetic rows), and the peak summed resident memory of it and any children.
Side by side in the same run, a **read-only pass**: a fresh process making the same bulk reads the
builder makes (every slice of features, examples and judgements, decoded) and rendering nothing; build ÷ read (one
worker) says what writing the pages costs on top of reading the data. Goals (issue #16): build <= 60 s and peak
memory <= 1 GB on the 2-vCPU machine. The machine is shared: the pair (read-only pass, build) runs ``--repeat``
times, every run is recorded with the load average after it, and the median build time is the one compared with
the goal; timings under load are several times an idle machine's.

When Chromium is installed, the index page is also opened in it (headless, playwright) and the client-side search
timed: load to a rendered first page, and one filter pass over every feature (a label search plus a score range).

Run::

    OMP_NUM_THREADS=1 python benchmarks/report_bench.py --features 10000 --repeat 3 --out benchmarks/results/report.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WORDS = ("the cat sat on mat and dog ran to park Mary John went store gave drink red green blue fox owl lives in "
         "hive war lasted from to apple bread cheese river beach castle forest letter key ring hat book").split()
SAE_ID = "sae-bench0000000000"
METRICS = ("correctness", "completeness", "succinctness", "detection", "fuzzing", "simulation", "embedding_auc",
           "quantile_recall", "token_detection", "embedding")


def _context(rng: random.Random, n: int, peak: float, fire: bool) -> tuple[list[str], list[float]]:
    toks = [" " + rng.choice(WORDS) for _ in range(n)]
    acts = [0.0] * n
    if fire:
        at = min(n - 1, 24)
        acts[at] = peak
        for _ in range(rng.randint(0, 4)):
            acts[rng.randrange(n)] = round(rng.uniform(0.05, peak), 3)
    return toks, acts


def build_store(db: Path, n_features: int, seed: int = 0) -> dict[str, int]:
    """Write the synthetic database (see the module docstring); return row counts."""
    from autoexplain.agent.store import Store

    rng = random.Random(seed)
    store = Store(db)
    now = dt.datetime.now()
    run_id = "bench-run"
    store.start_run(run_id, "label", {"what": "report benchmark"}, policy="offline")
    store.upsert("saes", [{"sae_id": SAE_ID, "spec": "bench/sae", "hook_name": "blocks.1.hook_resid_post",
                           "site": "resid_post.1", "d_in": 128, "d_sae": n_features}])
    counts = {"features": 0, "feature_examples": 0, "explanations": 0, "scores": 0, "judgement_sets": 0}
    edges = [round(10 ** (-3 + 0.25 * i), 6) for i in range(25)]
    chunk = 500
    for start in range(0, n_features, chunk):
        tables: dict[str, list[dict[str, Any]]] = {k: [] for k in ("features", "feature_examples", "work_items",
                                                                   "explanations", "scores", "judgement_sets",
                                                                   "hypotheses", "tool_calls")}
        for f in range(start, min(n_features, start + chunk)):
            peak = round(rng.uniform(0.5, 8.0), 3)
            counts_h = [0] * 26
            for _ in range(200):
                counts_h[rng.randint(10, 16)] += 1
            tables["features"].append({
                "sae_id": SAE_ID, "feature_index": f, "density": rng.uniform(1e-4, 0.05), "max_act": peak,
                "mean_act": peak / 3, "n_tokens": 200_000, "is_dead": False,
                "histogram": {"edges": edges, "counts": counts_h},
                "top_logits": [[" " + rng.choice(WORDS), rng.uniform(0.1, 1)] for _ in range(10)],
                "bottom_logits": [[" " + rng.choice(WORDS), -rng.uniform(0.1, 1)] for _ in range(10)],
                "run_id": run_id})
            ex = tables["feature_examples"]
            for i in range(20):
                toks, acts = _context(rng, 33, peak * (1 - i / 40), True)
                ex.append({"sae_id": SAE_ID, "feature_index": f, "kind": "top", "example_id": i,
                           "split": "explain" if i % 2 else "score", "tokens": toks, "acts": acts,
                           "max_act": max(acts), "run_id": run_id})
            for i in range(20):
                toks, acts = _context(rng, 33, peak * (i // 2 + 1) / 11, True)
                ex.append({"sae_id": SAE_ID, "feature_index": f, "kind": "quantile", "example_id": i,
                           "quantile": i // 2, "split": "explain" if i % 2 else "score", "tokens": toks,
                           "acts": acts, "max_act": max(acts), "run_id": run_id})
            for i in range(20):
                toks, acts = _context(rng, 63, 0, False)
                ex.append({"sae_id": SAE_ID, "feature_index": f, "kind": "random", "example_id": i, "split": "score",
                           "tokens": toks, "acts": acts, "max_act": 0.0, "run_id": run_id})
            item = f"item-{f}"
            tables["work_items"].append({"item_id": item, "run_id": run_id, "kind": "feature",
                                         "target": f"{SAE_ID}#{f}", "status": rng.choice(["done", "weak"]),
                                         "attempts": 1, "budget": {"steps": 15, "tool_calls": 2, "seconds": 0.4}})
            calls = [f"call-{f}-{k}" for k in range(2)]
            for k, cid in enumerate(calls):
                tables["tool_calls"].append({"call_id": cid, "run_id": run_id, "item_id": item,
                                             "tool": "feature_activations" if k else "feature_examples",
                                             "args": {"feature": f}, "summary": "synthetic summary " * 8,
                                             "duration_s": 0.01, "created_at": now})
            for k in range(2):
                tables["hypotheses"].append({"hypothesis_id": f"hyp-{f}-{k}", "run_id": run_id, "item_id": item,
                                             "text": f"fires on the token '{rng.choice(WORDS)}'",
                                             "status": rng.choice(["confirmed", "refuted", "inconclusive"]),
                                             "causal_level": "association", "evidence": calls, "created_at": now})
            for k in range(2):
                eid = f"expl-{f}-{k}"
                tables["explanations"].append({
                    "explanation_id": eid, "run_id": run_id, "item_id": item, "target": f"{SAE_ID}#{f}",
                    "text": f"{rng.choice(WORDS)} and {rng.choice(WORDS)} words", "author": "offline",
                    "causal_level": "association", "supported_level": "association", "overclaimed": False,
                    "is_final": k == 0, "created_at": now, "overall": rng.random()})
                for m in METRICS:
                    tables["scores"].append({"score_id": f"s-{eid}-{m}", "explanation_id": eid, "metric": m,
                                             "value": rng.random(), "n": 30, "details": {"judge": "lexical"},
                                             "created_at": now})
            for scorer in ("detection", "fuzzing", "simulation"):
                n = 40
                tables["judgement_sets"].append({
                    "explanation_id": f"expl-{f}-0", "scorer": scorer, "judge": "lexical:bench", "sae_id": SAE_ID,
                    "feature_index": f, "judgement_ids": [f"j-{f}-{scorer}-{i}" for i in range(n)],
                    "example_kinds": ["top"] * 10 + ["quantile"] * 10 + ["random"] * 20,
                    "example_ids": list(range(10)) + list(range(10)) + list(range(20)), "splits": ["score"] * n,
                    "truths": [True] * 20 + [False] * 20, "predictions": [rng.random() < 0.7 for _ in range(n)],
                    "oks": [True] * n, "errors": [""] * n, "raws": [{"said": "yes"}] * n, "created_at": now})
        with store.transaction() as con:
            for table, rows in tables.items():
                if rows:
                    store.insert_new(table, rows, con=con)
                    counts[table] = counts.get(table, 0) + len(rows)
    store.finish_run(run_id, "done", {"features": n_features})
    return counts


_READ_ONLY = """
import sys
from pathlib import Path
from autoexplain.agent.report.build import SLICE
from autoexplain.agent.store import queries
from autoexplain.agent.store.queries import ReadOnlyStore
store = ReadOnlyStore(Path(sys.argv[1]))
expl = queries.report_explanations(store)
scores = queries.report_scores(store)
hyps = queries.report_hypotheses(store)
calls = queries.report_tool_calls(store)
finals = {e.target: e.explanation_id for e in expl if e.is_final}
for sae_id in queries.report_feature_saes(store):
    lo, hi, n = queries.report_feature_range(store, sae_id)
    for a in range(lo, hi + 1, SLICE):
        stats = queries.report_features(store, sae_id, a, a + SLICE)
        ex = queries.report_examples(store, sae_id, a, a + SLICE)
        for rows in ex.values():  # decoded feature by feature, as the builder does
            queries.decode_examples(rows)
        js = queries.report_judgements(store, [finals[f"{sae_id}#{i}"] for i in range(a, min(hi + 1, a + SLICE))
                                               if f"{sae_id}#{i}" in finals])
"""


def _tree_memory(pid: int) -> tuple[int, int]:
    """(summed VmRSS, largest VmHWM) in bytes of ``pid`` and its descendants (Linux /proc); (0, 0) once gone."""
    total, hwm, todo = 0, 0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{p}/status").read_text().splitlines())
            total += int(fields["VmRSS"].split()[0]) * 1024
            hwm = max(hwm, int(fields["VmHWM"].split()[0]) * 1024)
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, KeyError, ValueError):
            continue
    return total, hwm


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, int, int, int]:
    """(wall seconds, high-water resident memory of its largest process, peak summed resident memory of its
    process tree, exit code) of a child process (memory sampled every 0.1 s)."""
    import threading

    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = [0, 0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            total, hwm = _tree_memory(p.pid)
            peak[0], peak[1] = max(peak[0], hwm), max(peak[1], total)
            done.wait(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, status, _ = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0 and p.stderr is not None:
        sys.stderr.write(p.stderr.read().decode(errors="replace"))
    return wall, peak[0], peak[1], p.returncode


def _browser_timing(index: Path) -> dict[str, Any] | None:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        return None
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        page = b.new_page()
        t0 = time.perf_counter()
        page.goto(index.resolve().as_uri())
        page.wait_for_function("() => document.querySelectorAll('#features tbody tr').length > 0")
        load_s = time.perf_counter() - t0
        filter_ms = page.evaluate("""() => {
            const q = document.getElementById('q'), lo = document.getElementById('min');
            q.value = 'cat'; lo.value = '0.5';
            const t = performance.now();
            document.getElementById('filters').dispatchEvent(new Event('submit', {cancelable: true}));
            return performance.now() - t; }""")
        count = page.inner_text("#count")
        b.close()
    return {"index_load_to_first_page_s": round(load_s, 3), "filter_pass_ms": round(filter_ms, 1),
            "filter_result": count}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", type=int, default=10_000)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--keep", type=Path, default=None, help="keep the database and site in this folder")
    ap.add_argument("--repeat", type=int, default=3, help="builds (each with its read-only pass) to time")
    ap.add_argument("--reuse", action="store_true", help="with --keep: reuse the database a previous run left there")
    args = ap.parse_args()
    load_before = os.getloadavg()
    work = args.keep or Path(tempfile.mkdtemp(prefix="report-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    db, site = work / "bench.duckdb", work / "site"
    shutil.rmtree(site, ignore_errors=True)
    t0 = time.perf_counter()
    if args.reuse and db.is_file():
        counts: dict[str, int] = {"reused": 1}
    else:
        db.unlink(missing_ok=True)
        counts = build_store(db, args.features)
    store_s = time.perf_counter() - t0
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    runs = []
    for _ in range(args.repeat):  # the machine is shared: repeat, report every run and the median
        shutil.rmtree(site, ignore_errors=True)
        read = _run([sys.executable, "-c", _READ_ONLY, str(db)], env)
        build = _run([sys.executable, "-m", "autoexplain.agent.cli", "report", "--db", str(db), "--out", str(site),
                      "--no-model"], env)
        if read[3] or build[3]:
            raise SystemExit(f"a child failed: read-only {read[3]}, report {build[3]}")
        runs.append({"report_build_s": round(build[0], 2), "report_peak_rss_mb": round(build[1] / 2**20, 1),
                     "report_peak_rss_with_children_mb": round(build[2] / 2**20, 1),
                     "read_only_pass_s": round(read[0], 2), "read_only_peak_rss_mb": round(read[1] / 2**20, 1),
                     "loadavg_1min_after": round(os.getloadavg()[0], 2)})
    build_s = sorted(r["report_build_s"] for r in runs)[len(runs) // 2]
    peak = max(max(r["report_peak_rss_mb"], r["report_peak_rss_with_children_mb"]) for r in runs)
    files = [p for p in site.rglob("*") if p.is_file()]
    result = {
        "what": "autoexplain report --no-model on a synthetic labelled store (see benchmarks/report_bench.py)",
        "features": args.features, "rows": counts, "store_write_s": round(store_s, 1),
        "report_build_s_median": build_s, "report_peak_rss_mb_max": peak, "runs": runs,
        "ratio_build_over_read_median": round(sorted(r["report_build_s"] / r["read_only_pass_s"] for r in runs)[
            len(runs) // 2], 2),
        "files": len(files), "meets_goals_median": build_s <= 60 and peak <= 1024,
        "site_mb": round(sum(p.stat().st_size for p in files) / 2**20, 1),
        "goals": {"build_s": 60, "peak_rss_mb": 1024},
        "browser": _browser_timing(site / "index.html"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_before_after": [load_before, os.getloadavg()]},
        "measured_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
