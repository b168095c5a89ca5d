"""Sparse feature circuits on the toy world: time and peak memory, and the speed-up of attribution (integrated
gradients) over ablating every node one at a time.

Case: ``toy:small`` with both SAEs (``res0`` at resid_post.0, ``mlp1`` at mlp_out.1, 512 features each: 1,027
nodes with the two error terms and the embeddings), the ``ioi`` task, 64 prompts, summed nodes, default settings
(10 IG steps, node threshold 0.01, edge threshold 0.02), CPU, one thread.

Measured, side by side in one process:

* ``find_seconds``: :func:`find_feature_circuit` end to end (clean/corrupt capture, IG node effects, the IG edge
  pass over the kept nodes, faithfulness of the circuit); best of ``--repeats``;
* ``node_effects_seconds``: the IG node effects alone (what ablation replaces);
* ``ablation_seconds``: the same 1,027 node effects measured exactly, one node at its corrupt value at a time
  (batched: many single-node ablations per forward pass, so this is the fair, fast way to ablate);
* ``speedup`` = ablation / node effects, and how well the estimates agree with the measured effects (Pearson r,
  and the largest absolute error as a share of m(M) - m(∅));
* ``peak_rss_mb_over_baseline``: peak resident memory of the process during one find (``VmHWM`` after resetting it
  through ``/proc/self/clear_refs``) minus resident memory before it.

Run::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/feature_circuits_bench.py \
        --out benchmarks/results/feature_circuits.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path


def _rss_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", default="small")
    ap.add_argument("--task", default="ioi")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from autoexplain.evals.feature_circuits import score_feature_circuit
    from autoexplain.tools.attribution import ig_alphas
    from autoexplain.tools.data import load_task_file, tokenize_task
    from autoexplain.tools.feature_circuits import (
        FeatureCircuitConfig,
        SplicedModel,
        find_feature_circuit,
        node_effects,
    )
    from autoexplain.tools.loading import load_model, load_sae
    from autoexplain.tools.zoo import ensure_model

    built = ensure_model(args.world)
    lm = load_model(f"toy:{args.world}", device="cpu")
    saes = [load_sae(f"toy:{args.world}/res0", lm), load_sae(f"toy:{args.world}/mlp1", lm)]
    task = tokenize_task(load_task_file(built.task_file(args.task)), lm.tokenizer, n_ctx=lm.n_ctx)
    task = task.subset(list(range(min(args.prompts, task.n_prompts))))
    cfg = FeatureCircuitConfig()
    load_before = os.getloadavg()

    # warm-up (allocator, kernels), then the measured runs
    find_feature_circuit(lm, task.subset(list(range(4))), saes, cfg)
    rss0 = _rss_mb("VmRSS")
    peak_ok = _reset_peak()
    times = []
    fc = None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        fc = find_feature_circuit(lm, task, saes, cfg)
        times.append(time.perf_counter() - t0)
    peak = _rss_mb("VmHWM")
    assert fc is not None

    sm = SplicedModel(lm, task, saes)
    t0 = time.perf_counter()
    effects, _, _ = node_effects(sm, ig_alphas("ig", cfg.steps))
    t_nodes = time.perf_counter() - t0
    keys = [n.key for n in fc.nodes]
    t0 = time.perf_counter()
    ablated = sm.evaluate([[k] for k in keys], invert=[True] * len(keys))
    t_abl = time.perf_counter() - t0
    measured = torch.tensor([fc.m_clean - m for m in ablated], dtype=torch.float64)
    estimated = torch.tensor([n.effect for n in fc.nodes], dtype=torch.float64)
    r = float(torch.corrcoef(torch.stack([measured, estimated]))[0, 1])
    worst = float((measured - estimated).abs().max() / abs(fc.effect))
    scores = score_feature_circuit(sm, fc)

    result = {
        "case": f"toy:{args.world} {args.task}, {task.n_prompts} prompts, SAEs res0 + mlp1 "
                f"({' + '.join(str(s.d_sae) for s in saes)} features), summed nodes, {cfg.steps} IG steps",
        "nodes": len(fc.nodes),
        "kept_nodes": len(fc.kept()),
        "kept_edges": len(fc.circuit_edges()),
        "find_seconds_best": min(times),
        "find_seconds_all": times,
        "node_effects_seconds": t_nodes,
        "ablation_seconds": t_abl,
        "speedup_attribution_over_ablation": t_abl / t_nodes,
        "estimate_vs_ablation_pearson_r": r,
        "estimate_vs_ablation_max_abs_error_share": worst,
        "faithfulness": scores.faithfulness,
        "necessity": scores.necessity,
        "completeness": scores.completeness,
        "m_clean": fc.m_clean,
        "m_ablated": fc.m_ablated,
        "rss_mb_before": rss0,
        "peak_rss_mb": peak if peak_ok else None,
        "peak_rss_mb_over_baseline": (peak - rss0) if peak_ok and peak is not None and rss0 is not None else None,
        "threads": torch.get_num_threads(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
