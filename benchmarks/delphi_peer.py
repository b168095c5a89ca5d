"""Peer measurement: delphi's latent caching + top-activation example construction on our model, SAE and tokens.

Runs INSIDE delphi's own venv (never imports autoexplain). Setup, from the repository root (the venv lives in
``.peers/``, which is listed in ``.git/info/exclude``; ~1.4 GB, 754 MB of it the CPU torch)::

    python3.11 -m venv .peers/delphi-venv
    .peers/delphi-venv/bin/pip install torch==2.13.0                      # the local CPU wheel, first
    .peers/delphi-venv/bin/pip install --no-deps eai-delphi==0.1.3        # skips vLLM and its CUDA stack (~6.7 GB)
    .peers/delphi-venv/bin/pip install transformers==4.57.6 jaxtyping simple_parsing faiss-cpu blobfile orjson \
        asyncer scipy scikit-learn
    .peers/delphi-venv/bin/pip install --no-deps "sentence-transformers<6"  # 5.7.0: imported, never used here

Pitfalls: ``delphi.latents/__init__`` imports ``constructors``, which imports faiss and sentence_transformers at
module level, so both must be installed although only the FAISS negatives use them (sentence-transformers 6 also
needs httpx and wants transformers 5; 5.x does not). transformers is pinned below 5 because delphi 0.1.3 mis-decodes
1-D token tensors with transformers 5 (only ``str_tokens`` suffer, not activations). sae-lens is not needed: the SAE
is read from its sae-lens files and encoded here exactly as sae-lens does (standard and TopK, incl.
``rescale_acts_by_decoder_norm`` and ``apply_b_dec_to_input``; ``--check-encode`` compares with a file written by
sae-lens). As in delphi's CLI the model is ``AutoModel`` (no LM head) and it runs every layer, not just up to the
SAE's (``--truncate-after-hook`` to measure without the extra layers). delphi's default ``filter_bos`` drops BOS
tokens from its data; our windows start with BOS, so by default the encoder zeroes position 0 instead (``--keep-bos``
to keep it), as our harvest does. ``LatentCache.run`` silently drops the windows after the last full batch.
``ConstructorConfig`` defaults would re-cut windows into 32 tokens and drop every feature with fewer than 200
activating windows: here ``example_ctx_len`` = the window length and ``min_examples`` = 1. Its docstring of
``center_examples`` is inverted: True (the default, used here) selects ``pool_max_activation_windows`` (whole
windows ranked by their max), False the re-centred windows. Cached activations are stored as float16.

Usage::

    OMP_NUM_THREADS=1 .peers/delphi-venv/bin/python benchmarks/delphi_peer.py --model-dir M --sae-dir S \
        --tokens-file tokens.pt --batch-size 32 --top-k 20 --out delphi.json [--check-features 1,2,3]

Timings: ``cache_s`` = ``LatentCache.run`` (forward passes, encode, non-zero extraction); ``save_s`` =
``save_splits`` + ``save_config`` (delphi's hand-off between the two stages is on disk); ``examples_s`` = building
a ``LatentDataset`` over the cache and iterating every feature through delphi's ``constructor`` (top windows +
random non-activating windows) and ``sampler`` (quantile train/test samples, token decoding); ``total_s`` = all
three. ``examples_s`` is almost all ``tokenizer.batch_decode`` of 1-D token tensors, one ``decode`` call per token
(~140 windows x ctx per feature); ``topk_only_s`` (not in ``total_s``) is the lower bound: only
``pool_max_activation_windows`` per feature over the cache. The check lists (window index, position of the max,
activation) come from that pass and are checked against the records' values; window order on ties is not defined
(delphi ranks float16 window maxima with an unstable argsort).
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # run as its own venv's script: pin threads before torch loads (never on import)
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import logging
import platform
import re
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def sae_encoder(sae_dir: Path, *, mask_bos: bool) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict[str, Any]]:
    """A dense ``[.., d_in] -> [.., d_sae]`` encoder reproducing sae-lens' ``encode`` from its files."""
    from safetensors.torch import load_file

    cfg = json.loads((sae_dir / "cfg.json").read_text())
    w = load_file(str(sae_dir / "sae_weights.safetensors"))
    arch = cfg.get("architecture", "standard")
    if arch not in ("standard", "topk"):
        raise SystemExit(f"architecture {arch!r} not reproduced here (standard and topk are)")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise SystemExit(f"normalize_activations={cfg['normalize_activations']!r} not reproduced here")
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise SystemExit(f"reshape_activations={cfg['reshape_activations']!r} not reproduced here")
    dtype = getattr(torch, cfg.get("dtype", "float32"))
    w_enc, b_enc, b_dec = w["W_enc"].to(dtype), w["b_enc"].to(dtype), w["b_dec"].to(dtype)
    b_in = b_dec if cfg.get("apply_b_dec_to_input", True) else torch.zeros_like(b_dec)
    dec_norm = w["W_dec"].to(dtype).norm(dim=-1) if cfg.get("rescale_acts_by_decoder_norm", False) else None
    k = int(cfg["k"]) if arch == "topk" else None

    def encode(x: torch.Tensor) -> torch.Tensor:
        pre = (x.to(dtype) - b_in) @ w_enc + b_enc
        if arch == "topk":
            if dec_norm is not None:
                pre = pre * dec_norm
            vals, idx = torch.topk(pre, k=k, dim=-1, sorted=False)
            acts = torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
        else:
            acts = pre.relu()
        if mask_bos and acts.dim() == 3:
            acts[:, 0] = 0  # windows start with BOS (see module doc)
        return acts

    info = {"architecture": arch, "d_in": int(w_enc.shape[0]), "d_sae": int(w_enc.shape[1]), "k": k,
            "hook_name": (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name"),
            "rescale_acts_by_decoder_norm": dec_norm is not None,
            "apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input", True))}
    return encode, info


def hf_module_for(hook_name: str) -> str:
    """TransformerLens hook name -> module name in a GPT-2 ``AutoModel`` (``GPT2Model``) whose output it is."""
    m = re.fullmatch(r"blocks\.(\d+)\.(hook_resid_post|hook_resid_pre|hook_mlp_out|hook_attn_out)", hook_name or "")
    if not m:
        raise SystemExit(f"cannot map hook {hook_name!r} to a module: pass --hookpoint")
    layer, kind = int(m.group(1)), m.group(2)
    if kind == "hook_resid_pre":
        return "drop" if layer == 0 else f"h.{layer - 1}"
    return {"hook_resid_post": f"h.{layer}", "hook_mlp_out": f"h.{layer}.mlp", "hook_attn_out": f"h.{layer}.attn"}[kind]


def pick_check_features(locations: torch.Tensor, d_sae: int, n: int = 5) -> list[int]:
    """``n`` alive features spread over firing-count ranks (densest first), deterministic."""
    counts = torch.bincount(locations[:, 2].long(), minlength=d_sae)
    alive = torch.argsort(-counts, stable=True)[: int((counts > 0).sum())]
    if alive.numel() == 0:
        return []
    picks = torch.linspace(0, alive.numel() - 1, steps=min(n, alive.numel())).round().long()
    return [int(alive[i]) for i in picks]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", required=True, help="local HF GPT-2 directory")
    ap.add_argument("--sae-dir", required=True, help="sae-lens directory (cfg.json + sae_weights.safetensors)")
    ap.add_argument("--tokens-file", required=True, help=".pt LongTensor [n_windows, ctx]")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--hookpoint", default=None, help="module name to hook (default: mapped from the SAE's hook)")
    ap.add_argument("--check-features", default=None, help="comma-separated feature ids (default: 5 picked)")
    ap.add_argument("--check-encode", default=None, help=".pt with {'x': [N, d_in], 'acts': [N, d_sae]} from sae-lens")
    ap.add_argument("--keep-bos", action="store_true", help="do not zero position 0 (BOS)")
    ap.add_argument("--truncate-after-hook", action="store_true",
                    help="drop the blocks after the hooked one (not delphi's behaviour; isolates its overhead)")
    ap.add_argument("--n-splits", type=int, default=5, help="delphi's CacheConfig.n_splits")
    ap.add_argument("--work-dir", default=None, help="where the cache splits go (default: a temp dir, removed)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    logging.getLogger("delphi").setLevel(logging.ERROR)
    import transformers
    from transformers import AutoModel, AutoTokenizer

    transformers.logging.set_verbosity_error()
    import delphi
    from delphi.config import CacheConfig, ConstructorConfig, SamplerConfig
    from delphi.latents import LatentCache, LatentDataset
    from delphi.latents.constructors import pool_max_activation_windows
    from delphi.latents.loader import TensorBuffer

    out: dict[str, Any] = {"peer": "delphi", "delphi_version": delphi.__version__, "torch": torch.__version__,
                           "transformers": transformers.__version__, "python": platform.python_version(),
                           "threads": {"torch_num_threads": torch.get_num_threads(),
                                       "torch_interop_threads": torch.get_num_interop_threads(),
                                       "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                                       "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS")}}

    encode, sae_info = sae_encoder(Path(args.sae_dir), mask_bos=not args.keep_bos)
    out["sae"] = {"dir": str(args.sae_dir), **sae_info}
    if args.check_encode:
        ref = torch.load(args.check_encode, weights_only=True)
        mine = encode(ref["x"])
        diff = (mine - ref["acts"].to(mine.dtype)).abs()
        same_support = bool(((mine > 0) == (ref["acts"] > 0)).all())
        out["encode_check"] = {"n_vectors": int(ref["x"].shape[0]), "max_abs_diff": float(diff.max()),
                               "same_support": same_support}
        if not same_support or float(diff.max()) > 1e-4:
            raise SystemExit(f"encode differs from sae-lens: {out['encode_check']}")

    tokens = torch.load(args.tokens_file, weights_only=True)
    if not (isinstance(tokens, torch.Tensor) and tokens.dim() == 2):
        raise SystemExit("--tokens-file must hold a 2-D LongTensor [n_windows, ctx]")
    tokens = tokens.long().contiguous()
    n_win, ctx = tokens.shape

    model = AutoModel.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    hookpoint = args.hookpoint or hf_module_for(sae_info["hook_name"])
    if hookpoint not in dict(model.named_modules()):
        raise SystemExit(f"module {hookpoint!r} not in the model")
    if args.truncate_after_hook:
        m = re.match(r"h\.(\d+)", hookpoint)
        keep = int(m.group(1)) + 1 if m else 0
        model.h = model.h[:keep]
    out.update({"model_dir": str(args.model_dir), "model_class": type(model).__name__, "hookpoint": hookpoint,
                "n_layers_run": len(model.h), "truncate_after_hook": args.truncate_after_hook,
                "mask_bos": not args.keep_bos, "batch_size": args.batch_size, "top_k": args.top_k,
                "n_windows_given": n_win, "ctx": ctx})

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="delphi-peer-"))
    latents_dir = work / "latents"
    if latents_dir.exists():
        shutil.rmtree(latents_dir)
    latents_dir.mkdir(parents=True)
    try:
        # ---- stage 1: cache (delphi's LatentCache)
        cache = LatentCache(model, {hookpoint: encode}, batch_size=args.batch_size)
        n_tokens = n_win * ctx
        t0 = time.perf_counter()
        cache.run(n_tokens, tokens)
        t1 = time.perf_counter()
        cache_cfg = CacheConfig(dataset_repo="local-tokens-file", dataset_split="all", batch_size=args.batch_size,
                                cache_ctx_len=ctx, n_tokens=n_tokens, n_splits=args.n_splits)
        cache.save_splits(n_splits=args.n_splits, save_dir=latents_dir)
        cache.save_config(save_dir=latents_dir, cfg=cache_cfg, model_name=str(args.model_dir))
        t2 = time.perf_counter()
        locs = cache.cache.latent_locations[hookpoint]
        n_done = int(cache.cache.tokens[hookpoint].shape[0])
        n_nonzero = int(locs.shape[0])
        check = ([int(f) for f in args.check_features.split(",")] if args.check_features
                 else pick_check_features(locs, sae_info["d_sae"]))
        del cache, locs

        # ---- stage 2: examples (delphi's LatentDataset -> constructor -> sampler), every feature
        constructor_cfg = ConstructorConfig(example_ctx_len=ctx, min_examples=1, center_examples=True,
                                            non_activating_source="random")
        sampler_cfg = SamplerConfig()
        t3 = time.perf_counter()
        dataset = LatentDataset(raw_dir=latents_dir, sampler_cfg=sampler_cfg, constructor_cfg=constructor_cfg,
                                modules=[hookpoint], tokenizer=tokenizer)
        top: dict[int, list[float]] = {}
        n_records = 0
        for record in dataset:
            n_records += 1
            top[record.latent.latent_index] = [ex.max_activation for ex in record.examples[: args.top_k]]
        t4 = time.perf_counter()

        # ---- stage 2b: top windows only (delphi's pool_max_activation_windows per feature, no sampler, no
        # decoding): a lower bound for its example construction. Pooled over window ids instead of tokens (same
        # shape and dtype, so the same cost), which also gives the check lists their window indices.
        lists: dict[str, list[list[Any]]] = {}
        wanted = set(check)
        window_ids = torch.arange(n_done)[:, None].expand(n_done, ctx).contiguous()
        t5 = time.perf_counter()
        for buf in dataset.buffers:
            loaded = TensorBuffer(buf.path, buf.module_path).load_data_per_latent()
            for latent, loc, act in zip(*loaded, strict=True):
                flat = loc[:, 0] * ctx + loc[:, 1]
                win_of, act_win = pool_max_activation_windows(activations=act, tokens=window_ids,
                                                              ctx_indices=flat // ctx, index_within_ctx=flat % ctx,
                                                              ctx_len=ctx)
                if int(latent) in wanted:
                    lists[str(int(latent))] = [[int(w[0]), int(a.argmax()), round(float(a.max()), 5)]
                                               for w, a in zip(win_of[: args.top_k], act_win[: args.top_k],
                                                               strict=True)]
        t6 = time.perf_counter()
        for f, rows in lists.items():
            if [r[2] for r in rows] != [round(v, 5) for v in top.get(int(f), [])]:
                raise SystemExit(f"feature {f}: pooled top-k differs from the dataset's records")
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    n_tok = n_done * ctx
    content = n_done * (ctx - 1) if not args.keep_bos else n_tok
    total = (t1 - t0) + (t2 - t1) + (t4 - t3)
    out.update({
        "n_windows_processed": n_done, "n_windows_dropped": n_win - n_done,
        "n_tokens_processed": n_tok, "n_content_tokens": content, "n_nonzero_cached": n_nonzero,
        "n_features_with_examples": n_records,
        "cache_s": round(t1 - t0, 4), "save_s": round(t2 - t1, 4), "examples_s": round(t4 - t3, 4),
        "topk_only_s": round(t6 - t5, 4),
        "total_s": round(total, 4),
        "tokens_per_s": round(n_tok / total, 1), "cache_tokens_per_s": round(n_tok / (t1 - t0), 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "constructor_cfg": constructor_cfg.to_dict(), "sampler_cfg": sampler_cfg.to_dict(),
        "check": {"features": check, "top_k": lists,
                  "columns": ["window_index", "position", "activation (float16, as delphi stores it)"]},
    })
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    keys = ("cache_s", "save_s", "examples_s", "topk_only_s", "total_s", "tokens_per_s", "n_tokens_processed",
            "n_features_with_examples")
    print(json.dumps({k: out[k] for k in keys}))
    return out


if __name__ == "__main__":
    main()
