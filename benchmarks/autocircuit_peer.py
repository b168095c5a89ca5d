"""auto-circuit side of ``circuits_bench.py``: runs inside ``.peers/autocircuit-venv``, never imports autoexplain.

Usage (the bench calls it; by hand)::

    OMP_NUM_THREADS=1 .peers/autocircuit-venv/bin/python benchmarks/autocircuit_peer.py IN.pt OUT.json

``IN.pt`` (``torch.save``) holds ``cfg`` (HookedTransformerConfig kwargs), ``state_dict``, ``clean`` and
``corrupt`` (LongTensor [n, seq]), ``answers`` and ``wrong`` (LongTensor [n]), ``steps`` (EAP-IG samples),
``tau`` (ACDC's absolute KL threshold, or None to skip ACDC), ``methods`` (subset of eap, eap-ig, acdc) and
``repeats``. The metric is read at the last position (``slice_output="last_seq"``), so prompts must not be padded.

Writes JSON: per method the best-of-``repeats`` wall time and the per-edge scores keyed by auto-circuit's edge
names (``Resid Start->A0.1.V``). Scores are auto-circuit's raw values: for EAP/EAP-IG the gradient of
``-mean(logit diff)`` with respect to the edge masks (EAP-IG: summed over ``steps + 1`` mask values 0..1, i.e.
integrated over *masks*, not inputs); for ACDC the change in KL at removal for removed edges and ``inf`` for kept
ones (one τ).
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings

import torch


def main(inp: str, out: str) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from auto_circuit.data import PromptDataLoader, PromptDataset
    from auto_circuit.prune_algos.ACDC import acdc_prune_scores
    from auto_circuit.prune_algos.mask_gradient import mask_gradient_prune_scores
    from auto_circuit.utils.graph_utils import patchable_model
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    d = torch.load(inp, weights_only=False)
    cfg = HookedTransformerConfig(**d["cfg"])
    model = HookedTransformer(cfg)
    # attention buffers (causal mask, IGNORE) differ between TL 3.x (lazy, empty) and 2.18: keep 2.18's own
    sd = {k: v for k, v in d["state_dict"].items() if not k.endswith((".mask", ".IGNORE"))}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    bad_missing = [k for k in missing if not k.endswith(("IGNORE", "mask"))]
    if bad_missing or unexpected:
        raise SystemExit(f"state dict mismatch: missing {bad_missing}, unexpected {unexpected}")
    model.cfg.use_attn_result = True
    model.cfg.use_attn_in = True
    model.cfg.use_split_qkv_input = True
    model.cfg.use_hook_mlp_in = True
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)

    clean, corrupt = d["clean"], d["corrupt"]
    answers = [a.view(1) for a in d["answers"]]
    wrong = [w.view(1) for w in d["wrong"]]
    ds = PromptDataset(clean, corrupt, answers, wrong)
    loader = PromptDataLoader(ds, seq_len=None, diverge_idx=0, batch_size=len(clean), shuffle=False)

    t0 = time.perf_counter()
    pm = patchable_model(model, factorized=True, slice_output="last_seq", separate_qkv=True,
                         device=torch.device("cpu"))
    wrap_s = time.perf_counter() - t0
    edges = sorted(pm.edges, key=lambda e: e.name)
    res: dict = {"n_edges": len(edges), "wrap_seconds": wrap_s, "methods": {}}

    def as_dict(ps) -> dict[str, float]:
        return {e.name: float(ps[e.dest.module_name][e.patch_idx]) for e in edges}

    runs = {
        "eap": lambda: mask_gradient_prune_scores(pm, loader, None, grad_function="logit",
                                                  answer_function="avg_diff", mask_val=0.0),
        "eap-ig": lambda: mask_gradient_prune_scores(pm, loader, None, grad_function="logit",
                                                     answer_function="avg_diff",
                                                     integrated_grad_samples=d["steps"]),
        "acdc": lambda: acdc_prune_scores(pm, loader, None, tao_exps=[0], tao_bases=[d["tau"]]),
    }
    for name in d["methods"]:
        if name == "acdc" and d.get("tau") is None:
            continue
        times, ps = [], None
        for _ in range(d.get("repeats", 1) if name != "acdc" else 1):
            for w in pm.dest_wrappers:  # fresh mask gradients each run
                if w.patch_mask.grad is not None:
                    w.patch_mask.grad = None
            t0 = time.perf_counter()
            ps = runs[name]()
            times.append(time.perf_counter() - t0)
        scores = as_dict(ps)
        res["methods"][name] = {"seconds": min(times), "all_seconds": times,
                                "scores": {k: (v if math.isfinite(v) else "inf") for k, v in scores.items()}}
        print(f"auto-circuit {name}: {min(times):.3f} s", file=sys.stderr)
    with open(out, "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
