"""Harvest throughput against the physical limit, and peak memory as the dataset grows.

The limit is a **bare pass**: the same token windows, the same batch size, a forward pass stopped at the SAE's
layer plus ``sae.encode`` — the work any harvest must do — and nothing else. The ratio harvest ÷ bare says what
the bookkeeping (streaming top-k, priority samples, histograms, window file, checkpoints, example assembly) costs;
the target is ≥ 0.8. Two ratios are reported: ``ratio_stream_over_bare`` compares the pass over the data
(what scales with the dataset) and ``ratio_harvest_over_bare`` the whole call, which also pays a fixed cost once
per SAE (logit effects ``W_dec @ W_U`` — 16k x 768 x 50k multiply-adds for the big case — and assembling the
example rows); at a realistic dataset size that cost amortises. Storing the rows in DuckDB is timed separately.

Cases: the toy world (``toy:small`` + ``res0``) and a GPT-2-small-shaped model with random weights (d_model 768,
12 layers, 12 heads, vocab 50,257) with a TopK SAE of d_sae 16,384 at ``resid_post.6``. Memory: peak RSS of
separate processes harvesting N and 10·N tokens.

Run (threads pinned, one process at a time)::

    python benchmarks/harvest_bench.py --delphi-venv .peers/delphi-venv \
        --out benchmarks/results/harvest.json

Part ``gpt2`` (issue #12, memory independent of SAE width): a GPT-2-small model with random weights
(``GPT2Config()`` defaults: 12 x 768, vocab 50,257; the toy tokenizer) and a random standard SAE at
``blocks.8.hook_resid_pre`` of each ``--gpt2-widths`` (biases set so each feature fires on a log-uniform fraction of
tokens between ``a`` and ``50 a``, ``a`` chosen for an L0 of about 100: a realistic sparsity, not the half of all
features a zero-bias random SAE fires). Each width runs in a fresh process that loads the model and SAE (resident
memory after that load is the baseline), harvests ``--gpt2-tokens`` tokens into a real DuckDB store
(``harvest_sink``: the whole write path), then reports its peak resident memory (``getrusage`` ``ru_maxrss`` and
``VmHWM``), pass and finish seconds (finish: logit effects, example assembly and the store's writes, chunk by
chunk), and times a bare pass on the same batches in the same process before and after the harvest (the ratios
use their mean: the shared host's speed drifts over minutes; the peak of the bare pass before, which builds the
dense ``[batch, ctx, d_sae]`` tensor the harvest avoids, is forgotten by resetting ``VmHWM``, the peak reported).
Target: peak <= weights + 1.5 GB, finish <= 0.25 x pass, bare / (pass + finish) >= 0.8::

    python benchmarks/harvest_bench.py --parts gpt2 --gpt2-widths 24576 --gpt2-tokens 50000 \
        --out benchmarks/results/harvest.json

delphi (PyPI ``eai-delphi``) runs in its own venv (setup in ``benchmarks/delphi_peer.py``) on the same windows,
model and SAE; its time covers its latent cache plus building the same per-feature top-k contexts (and its
quantile and random samples). Ours starts from raw text.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _gpt2_small_shaped(root: Path) -> tuple[str, str]:
    """A random GPT-2-small-shaped HF model (toy tokenizer) and a random TopK SAE at resid_post.6."""
    import torch
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    from autoexplain.tools.zoo import ensure_model

    model_dir, sae_dir = root / "gpt2-small-shaped", root / "sae-16k"
    if not (model_dir / "config.json").exists():
        tok = GPT2TokenizerFast.from_pretrained(str(ensure_model("small").model_dir))
        tok.save_pretrained(str(model_dir))
        torch.manual_seed(0)
        cfg = GPT2Config(vocab_size=50257, n_positions=1024, n_ctx=1024, n_embd=768, n_layer=12, n_head=12,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        GPT2LMHeadModel(cfg).save_pretrained(str(model_dir))
    if not (sae_dir / "cfg.json").exists():
        torch.manual_seed(0)
        TopKSAE(TopKSAEConfig(d_in=768, d_sae=16384, k=32,
                              metadata=SAEMetadata(hook_name="blocks.6.hook_resid_post"))).save_model(str(sae_dir))
    return str(model_dir), str(sae_dir)


def _measure(model: str, sae: str, dataset: str, tokens: int, batch: int, ctx: int,
             repeats: int = 3) -> dict[str, Any]:
    import torch

    from autoexplain.agent.store import Store
    from autoexplain.agent.store.harvest import rows_sink
    from autoexplain.tools.data import iter_texts, iter_windows
    from autoexplain.tools.harvest import HarvestIn, harvest
    from autoexplain.tools.loading import load_model, load_sae
    from autoexplain.tools.registry import ToolContext
    from autoexplain.tools.saes import feature_activations

    lm = load_model(model)
    s = load_sae(sae, lm)
    wins = list(iter_windows(iter_texts(dataset), lm.tokenizer, ctx=ctx, n_ctx=lm.n_ctx, batch_windows=batch,
                             max_tokens=tokens))
    feature_activations(lm, s, wins[0].tokens)  # warm-up
    n_tok = sum(w.n_tokens for w in wins)
    rows: dict[str, list[dict[str, Any]]] = {}  # the last harvest's rows (cleared before each)
    ctx_ = ToolContext(model=lm, saes={s.sae_id: s},
                       sink=rows_sink(lambda table, r: rows.setdefault(table, []).extend(r)))
    bare_times: list[float] = []
    harvest_times: list[float] = []
    stream_times: list[float] = []
    # alternate the two and keep each one's best: shared cores make single timings noisy
    for _ in range(repeats):
        t = time.perf_counter()
        for w in wins:
            feature_activations(lm, s, w.tokens).max()
        bare_times.append(time.perf_counter() - t)
        rows.clear()
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            out = harvest(ctx_, HarvestIn(sae_id=s.sae_id, dataset=dataset, n_tokens=tokens, ctx=ctx,
                                          batch_size=batch), work_dir=Path(tmp) / "work")
            harvest_times.append(time.perf_counter() - t)
            stream_times.append(out.stream_seconds)
    bare, harv, stream = min(bare_times), min(harvest_times), min(stream_times)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "bench.duckdb")
        t = time.perf_counter()
        for table, r in rows.items():
            store.upsert(table, r)
        db = time.perf_counter() - t
    return {"model": model, "sae": sae, "d_sae": s.d_sae, "tokens": n_tok, "batch": batch, "ctx": ctx,
            "bare_s": round(bare, 3), "harvest_s": round(harv, 3), "store_s": round(db, 3), "repeats": repeats,
            "bare_all_s": [round(x, 3) for x in bare_times], "harvest_all_s": [round(x, 3) for x in harvest_times],
            "bare_tok_per_s": round(n_tok / bare), "harvest_tok_per_s": round(n_tok / harv),
            "ratio_harvest_over_bare": round(bare / harv, 3),
            "stream_s": round(stream, 3), "finish_s": round(harv - stream, 3),
            "ratio_stream_over_bare": round(bare / stream, 3),
            "rows": {k: len(v) for k, v in rows.items()}, "n_dead": out.n_dead,
            "threads": torch.get_num_threads()}


def _peak_rss(model: str, sae: str, dataset: str, tokens: int) -> dict[str, Any]:
    """Harvest in a fresh process and report its peak resident memory."""
    # VmHWM (peak resident set of this process image) resets at exec, unlike getrusage's ru_maxrss,
    # which a child inherits from the parent that forked it.
    code = (
        "import collections, tempfile, os, torch; from pathlib import Path\n"
        "torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', '1')))\n"
        "def kb(field): return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(field))\n"
        "from autoexplain.tools.loading import load_model, load_sae\n"
        "from autoexplain.tools.harvest import HarvestIn, harvest; from autoexplain.tools.registry import ToolContext\n"
        f"lm = load_model({model!r}); s = load_sae({sae!r}, lm)\n"
        "base = kb('VmHWM:')\n"
        "ctx = ToolContext(model=lm, saes={s.sae_id: s},\n"
        "                  sink=lambda result: collections.deque(result.chunks, maxlen=0))\n"
        f"out = harvest(ctx, HarvestIn(sae_id=s.sae_id, dataset={dataset!r}, n_tokens={tokens}),"
        " work_dir=Path(tempfile.mkdtemp()) / 'w')\n"
        "print(base, kb('VmHWM:'), out.n_tokens)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    base, peak, n = (int(x) for x in res.stdout.split()[-3:])
    return {"tokens": n, "peak_rss_after_load_mb": round(base / 1024, 1), "peak_rss_mb": round(peak / 1024, 1)}


def _delphi(venv: Path, model: str, sae: str, dataset: str, tokens: int, batch: int, ctx: int,
            top_k: int) -> dict[str, Any]:
    """delphi's caching + example construction on the same windows, in its own venv (benchmarks/delphi_peer.py)."""
    import torch

    from autoexplain.tools.data import iter_texts, iter_windows
    from autoexplain.tools.loading import load_model, load_sae

    lm = load_model(model)
    s = load_sae(sae, lm)
    wins = torch.cat([w.tokens for w in iter_windows(iter_texts(dataset), lm.tokenizer, ctx=ctx, n_ctx=lm.n_ctx,
                                                     batch_windows=batch, max_tokens=tokens)])
    wins = wins[: len(wins) // batch * batch]  # delphi drops a last partial batch; give it none
    with tempfile.TemporaryDirectory() as tmp:
        tok_file, out = Path(tmp) / "tokens.pt", Path(tmp) / "delphi.json"
        torch.save(wins, tok_file)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        subprocess.run([str(venv / "bin" / "python"), str(Path(__file__).with_name("delphi_peer.py")),
                        "--model-dir", str(lm.source_dir), "--sae-dir", str(s.source_dir),
                        "--tokens-file", str(tok_file), "--batch-size", str(batch), "--top-k", str(top_k),
                        "--out", str(out)], check=True, env=env, capture_output=True, text=True)
        report = json.loads(out.read_text())
    return {k: report[k] for k in ("cache_s", "save_s", "examples_s", "total_s", "topk_only_s") if k in report} | {
        "windows": len(wins), "tokens": int(wins.numel())}


def _big_corpus(root: Path, src: Path, copies: int) -> str:
    """The toy corpus repeated (with a line number so texts differ): a dataset large enough for 10x runs."""
    out = root / f"corpus-x{copies}.txt"
    if not out.exists():
        lines = src.read_text().splitlines()
        with out.open("w") as fh:
            for c in range(copies):
                fh.writelines(f"{line} {c}\n" for line in lines)
    return str(out)


def _gpt2_small_resid8(root: Path, d_sae: int, dataset: str, l0: float = 100.0) -> tuple[str, str]:
    """GPT-2-small with random weights (``GPT2Config()`` defaults; the toy tokenizer) and a random standard SAE of
    width ``d_sae`` at ``blocks.8.hook_resid_pre``, saved with ``save_pretrained`` / sae-lens ``save_model``.

    The SAE's ``b_enc`` is calibrated on 2,048 tokens of ``dataset``: feature ``i`` gets a target firing rate
    ``p_i`` log-uniform in ``[a, 50 a]`` (mean ``l0 / d_sae``) and ``b_enc_i = -(mean_i + z(1 - p_i) sd_i)`` of
    its pre-activation (a Gaussian approximation: the rates come out near, not at, the targets)."""
    import torch
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    from autoexplain.tools.data import iter_texts, iter_windows
    from autoexplain.tools.loading import load_model
    from autoexplain.tools.zoo import ensure_model

    model_dir, sae_dir = root / "gpt2-small-random", root / f"sae-resid8-{d_sae}"
    if not (model_dir / "config.json").exists():
        tok = GPT2TokenizerFast.from_pretrained(str(ensure_model("small").model_dir))
        tok.save_pretrained(str(model_dir))
        torch.manual_seed(0)
        cfg = GPT2Config(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        GPT2LMHeadModel(cfg).save_pretrained(str(model_dir))
    if not (sae_dir / "cfg.json").exists():
        torch.manual_seed(1)
        sae = StandardSAE(StandardSAEConfig(d_in=768, d_sae=d_sae,
                                            metadata=SAEMetadata(hook_name="blocks.8.hook_resid_pre")))
        lm = load_model(str(model_dir))
        batch = next(iter(iter_windows(iter_texts(dataset), lm.tokenizer, ctx=64, n_ctx=lm.n_ctx,
                                       batch_windows=32, max_tokens=2048)))
        _, cache = lm.model.run_with_cache(batch.tokens, names_filter="blocks.8.hook_resid_pre", stop_at_layer=9)
        x = cache["blocks.8.hook_resid_pre"].reshape(-1, 768)[batch.valid.reshape(-1)]
        a = l0 / d_sae * math.log(50) / 49  # log-uniform in [a, 50 a] has mean 49 a / ln 50
        p = torch.exp(torch.empty(d_sae).uniform_(math.log(a), math.log(50 * a)))
        z = torch.distributions.Normal(0.0, 1.0).icdf(1 - p)
        with torch.no_grad():
            for lo in range(0, d_sae, 8192):
                pre = (x - sae.b_dec) @ sae.W_enc[:, lo : lo + 8192]
                sae.b_enc[lo : lo + 8192] = -(pre.mean(0) + z[lo : lo + 8192] * pre.std(0))
        sae.save_model(str(sae_dir))
    return str(model_dir), str(sae_dir)


def _gpt2_child(spec: dict[str, Any]) -> dict[str, Any]:
    """One width, in this (fresh) process: load, harvest into DuckDB, read the peak, then the bare pass."""
    import resource

    import torch

    from autoexplain.agent.store import Store
    from autoexplain.agent.store.harvest import harvest_sink
    from autoexplain.tools.data import iter_texts, iter_windows
    from autoexplain.tools.harvest import HarvestIn, harvest
    from autoexplain.tools.loading import load_model, load_sae
    from autoexplain.tools.registry import ToolContext
    from autoexplain.tools.saes import feature_activations

    def status_mb(field: str) -> float:
        kb = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith(field))
        return round(kb / 1024, 1)

    def maxrss_mb() -> float:
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

    torch.set_num_threads(spec["threads"])
    lm = load_model(spec["model"])
    s = load_sae(spec["sae"], lm)
    weights = sum(t.numel() * t.element_size() for t in [*lm.model.parameters(), *s.sae.parameters()])
    after_load = {"rss_mb": status_mb("VmRSS:"), "maxrss_mb": maxrss_mb(), "hwm_mb": status_mb("VmHWM:"),
                  "weights_mb": round(weights / 2**20, 1)}
    args = HarvestIn(sae_id=s.sae_id, dataset=spec["dataset"], n_tokens=spec["tokens"], ctx=64, batch_size=32)
    wins = list(iter_windows(iter_texts(spec["dataset"]), lm.tokenizer, ctx=64, n_ctx=lm.n_ctx, batch_windows=32,
                             max_tokens=spec["tokens"]))

    def bare_pass() -> float:
        t = time.perf_counter()
        for w in wins:
            feature_activations(lm, s, w.tokens).max()
        return time.perf_counter() - t

    def reset_peak() -> bool:
        """VmHWM back to the current RSS (Linux >= 4.0: ``clear_refs`` 5); ru_maxrss cannot be reset."""
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            return True
        except OSError:
            return False

    # the host's speed drifts over minutes: the bare pass is timed before and after the harvest and the ratios
    # use their mean; the peak of the pass before is forgotten (VmHWM reset), so the harvest's peak is its own
    bare_before = bare_pass() if reset_peak() else None
    reset_peak()
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "bench.duckdb")
        upsert_s = [0.0]
        real_upsert = store.upsert

        def timed_upsert(*a: Any, **k: Any) -> int:  # instrumentation: the store's share of finish
            t = time.perf_counter()
            try:
                return real_upsert(*a, **k)
            finally:
                upsert_s[0] += time.perf_counter() - t

        store.upsert = timed_upsert  # type: ignore[method-assign]
        store.start_run("bench", "harvest", {})
        pass_peak: dict[str, float] = {}

        def progress(done: int, total: int) -> None:  # the peak up to the end of the pass, before finish
            pass_peak.update(hwm_mb=status_mb("VmHWM:"), rss_mb=status_mb("VmRSS:"))

        out = harvest(ToolContext(model=lm, saes={s.sae_id: s}, sink=harvest_sink(store, "bench")), args,
                      work_dir=Path(tmp) / "work", progress=progress)
        # without a VmHWM reset (not Linux) ru_maxrss is the harvest's peak: nothing ran before it
        hwm = status_mb("VmHWM:") if bare_before is not None else maxrss_mb()
        peak = {"peak_mb": hwm, "maxrss_mb": maxrss_mb(), "pass_peak_mb": pass_peak["hwm_mb"],
                "pass_end_rss_mb": pass_peak["rss_mb"]}
        n_rows = store.query("select count(*) from feature_examples")[1][0][0]
        db_mb = round((Path(tmp) / "bench.duckdb").stat().st_size / 2**20, 1)
    bare_after = bare_pass()
    bare = bare_after if bare_before is None else (bare_before + bare_after) / 2
    total = out.stream_seconds + out.finish_seconds
    return {"d_sae": s.d_sae, "tokens": out.n_tokens, "windows": out.n_windows, "threads": spec["threads"],
            "after_load": after_load, "peak": peak,
            "peak_over_load_mb": round(peak["peak_mb"] - after_load["rss_mb"], 1),
            "pass_s": out.stream_seconds, "finish_s": out.finish_seconds, "store_upsert_s": round(upsert_s[0], 2),
            "bare_s": round(bare, 2), "bare_before_s": None if bare_before is None else round(bare_before, 2),
            "bare_after_s": round(bare_after, 2),
            "finish_over_pass": round(out.finish_seconds / out.stream_seconds, 3),
            "ratio_pass_over_bare": round(bare / out.stream_seconds, 3),
            "ratio_harvest_over_bare": round(bare / total, 3),
            "example_rows": n_rows, "db_mb": db_mb, "n_dead": out.n_dead,
            "density_quantiles": out.density_quantiles}


def _gpt2(root: Path, dataset: str, widths: list[int], tokens: int, threads: int) -> dict[str, Any]:
    """Each width in a fresh process (its peak memory is its own), with the machine's load before and after."""
    runs = []
    for d_sae in widths:
        # built in a process of its own: this one stays small, so a child's ru_maxrss (which starts from its
        # parent's at fork) is the child's own
        setup = subprocess.run([sys.executable, __file__, "--gpt2-setup", json.dumps([str(root), d_sae, dataset])],
                               capture_output=True, text=True)
        if setup.returncode != 0:
            raise RuntimeError(f"d_sae {d_sae} setup: {setup.stderr[-2000:]}")
        model, sae = json.loads(setup.stdout.strip().splitlines()[-1])
        spec = {"model": model, "sae": sae, "dataset": dataset, "tokens": tokens, "threads": threads}
        before = _load_avg()
        res = subprocess.run([sys.executable, __file__, "--gpt2-child", json.dumps(spec)], capture_output=True,
                             text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        if res.returncode != 0:
            raise RuntimeError(f"d_sae {d_sae}: {res.stderr[-2000:]}")
        run = json.loads(res.stdout.strip().splitlines()[-1])
        run["load_avg_before"], run["load_avg_after"] = before, _load_avg()
        print(json.dumps(run), flush=True)
        runs.append(run)
    return {"model": "GPT-2-small shape, random weights (GPT2Config defaults), toy tokenizer",
            "site": "blocks.8.hook_resid_pre", "ctx": 64, "batch": 32, "runs": runs}


def _load_avg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def _gpt2_markdown(res: dict[str, Any], machine: dict[str, Any], date: str) -> str:
    rows = ["| d_sae | tokens | weights MB | RSS after load MB | peak RSS MB (VmHWM) | bound: weights + 1.5 GB | "
            "pass peak MB | pass s | finish s | finish/pass | bare s (before / after) | bare/pass | "
            "bare/(pass+finish) | example rows | load avg before / after |", "|" + "---|" * 15]
    for r in res["runs"]:
        bound = round(r["after_load"]["weights_mb"] + 1536, 1)
        rows.append(f"| {r['d_sae']:,} | {r['tokens']:,} | {r['after_load']['weights_mb']:,} | "
                    f"{r['after_load']['rss_mb']:,} | {r['peak']['peak_mb']:,} | {bound:,} | "
                    f"{r['peak']['pass_peak_mb']:,} | {r['pass_s']} | {r['finish_s']} | {r['finish_over_pass']} | "
                    f"{r['bare_s']} ({r['bare_before_s']} / {r['bare_after_s']}) | {r['ratio_pass_over_bare']} | "
                    f"{r['ratio_harvest_over_bare']} | "
                    f"{r['example_rows']:,} | {r['load_avg_before']} / {r['load_avg_after']} |")
    return (f"# Harvest at GPT-2-small shape ({date})\n\n{res['model']}; SAE at {res['site']}; ctx {res['ctx']}, "
            f"batch {res['batch']}. Machine: {machine}.\n\n" + "\n".join(rows) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--toy-tokens", type=int, default=204_800, help="a multiple of 32 x 64 (delphi's batches)")
    ap.add_argument("--delphi-venv", type=Path, default=None,
                    help="delphi's venv (see benchmarks/delphi_peer.py), e.g. .peers/delphi-venv")
    ap.add_argument("--big-tokens", type=int, default=16_384)
    ap.add_argument("--mem-tokens", type=int, default=50_000, help="N for the memory check (N and 10 N)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (pinned: shared cores are noisy)")
    ap.add_argument("--parts", default="toy,big,memory", help="comma-separated subset of toy,big,memory,gpt2")
    ap.add_argument("--gpt2-widths", default="24576,98304", help="SAE widths of part gpt2 (comma-separated)")
    ap.add_argument("--gpt2-tokens", type=int, default=50_000)
    ap.add_argument("--gpt2-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--gpt2-setup", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help="results JSON (parts not run keep their old entry)")
    args = ap.parse_args()
    if args.gpt2_child:
        print(json.dumps(_gpt2_child(json.loads(args.gpt2_child))), flush=True)
        return
    if args.gpt2_setup:
        root, d_sae, dataset = json.loads(args.gpt2_setup)
        print(json.dumps(_gpt2_small_resid8(Path(root), d_sae, dataset)), flush=True)
        return
    import torch

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the memory-check processes

    from autoexplain.tools.cache import cache_root
    from autoexplain.tools.zoo import ensure_model

    zoo = ensure_model("small")
    work = cache_root() / "bench"
    work.mkdir(parents=True, exist_ok=True)
    corpus = _big_corpus(work, zoo.corpus, 12)
    parts = set(args.parts.split(","))
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out and args.out.exists() else {}
    results["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                          "threads": args.threads}
    results["date"] = time.strftime("%Y-%m-%d")
    if "toy" in parts:
        results["toy"] = _measure("toy:small", "toy:small/res0", corpus, args.toy_tokens, batch=32, ctx=64)
        print(json.dumps(results["toy"]), flush=True)
        if args.delphi_venv is not None:
            peer = _delphi(args.delphi_venv, "toy:small", "toy:small/res0", corpus, args.toy_tokens, batch=32,
                           ctx=64, top_k=20)
            peer["ratio_delphi_total_over_harvest"] = round(peer["total_s"] / results["toy"]["harvest_s"], 2)
            results["delphi_toy"] = peer
            print(json.dumps(peer), flush=True)
    if "big" in parts:
        model, sae = _gpt2_small_shaped(work)
        results["gpt2_small_shaped"] = _measure(model, sae, corpus, args.big_tokens, batch=16, ctx=64, repeats=2)
        print(json.dumps(results["gpt2_small_shaped"]), flush=True)
    if "memory" in parts:
        small = _peak_rss("toy:small", "toy:small/res0", corpus, args.mem_tokens)
        large = _peak_rss("toy:small", "toy:small/res0", corpus, args.mem_tokens * 10)
        results["memory"] = {"n": small, "10n": large,
                             "peak_growth_mb": round(large["peak_rss_mb"] - small["peak_rss_mb"], 1)}
        print(json.dumps(results["memory"]), flush=True)
    if "gpt2" in parts:
        widths = [int(w) for w in args.gpt2_widths.split(",")]
        res = _gpt2(work, corpus, widths, args.gpt2_tokens, args.threads)
        key = f"gpt2_resid8_{args.gpt2_tokens}"
        results[key] = res
        if args.out:
            args.out.with_name(f"harvest_{key}.md").write_text(
                _gpt2_markdown(res, results["machine"], results["date"]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
