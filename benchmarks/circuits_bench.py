"""Circuit search, side by side: our EAP, EAP-IG and ACDC against auto-circuit 1.0.1 on the same weights, prompts
and edge graph, one thread each, plus the memory of our single-forward edge patching as the patched set grows.

What it does
------------
* Builds two HookedTransformers with random weights (seeded): ``small`` 2 layers x 4 heads, d_model 64, MLPs
  (110 edges) and ``medium`` 4 layers x 8 heads, d_model 128, MLPs (1,519 edges); a random single-token task:
  64 prompts of 16 tokens, corrupt = the clean prompt with 4 random positions (not BOS) replaced, answer and wrong
  answer random tokens, metric at the last position (no padding, so auto-circuit's ``last_seq`` slice matches).
* Saves weights + config + tokens to a ``.pt`` file, runs ``autocircuit_peer.py`` in auto-circuit's venv
  (subprocess, ``OMP_NUM_THREADS=1``), then runs ours in this process with ``torch.set_num_threads(1)``.
* Timing: best of ``--repeats`` runs for EAP and EAP-IG (ACDC: one run). Ours includes building the
  ``PatchSetup`` (clean + corrupt forward passes; auto-circuit recomputes its ablations inside every call too);
  auto-circuit's one-time ``patchable_model`` wrapping is excluded (reported as ``wrap_seconds``).
* Same settings: EAP = gradient at the clean run, logit-diff metric, resample ablation from the corrupt prompt.
  EAP-IG: ``steps`` = 10 on both sides, but the algorithms differ: ours integrates over the input embeddings
  (Hanna et al.), auto-circuit's ``integrated_grad_samples`` over the edge masks (11 mask values 0..1, summed), so
  only its *time* is comparable (its score agreement is reported for information). ACDC: KL metric at the last
  position, one τ = ``threshold`` x KL(clean || corrupt) (ours is relative; the peer gets the same absolute τ);
  agreement = Jaccard of the kept edge sets.
* EAP agreement: edge names mapped (``Resid Start``->``embed``, ``Resid End``->``logits``, ``A1.2.Q``->``a1.2.q``,
  ``MLP 0``->``m0``); auto-circuit's EAP score is d(-mean logit diff)/d(mask), i.e. minus ours, so it is negated.
* Planted: the ``suppression`` model from ``evals/truth/planted_circuits.py`` (fixed-length prompts) is exported too;
  ROC AUC of |score| against the planted edges for both tools. ``induction`` has variable-length right-padded
  prompts, which auto-circuit's ``last_seq`` slice cannot read, so it is not exported.
* Memory (ours): ``setup.evaluate(mask)`` on the medium model with k random edges patched, k = 0..all; peak RSS
  growth above the pre-call level and peak glibc heap in use (``mallinfo2``), sampled every 0.2 ms by a thread,
  and the time per pass; a plain no-grad forward of the same batch is the reference. RSS growth is mostly 0 after
  warm-up (glibc keeps freed pages), so read the heap column.

Usage
-----
One-time peer venv (auto-circuit must never enter our venv; ``.peers/`` is git-excluded)::

    python3.11 -m venv .peers/autocircuit-venv
    .peers/autocircuit-venv/bin/pip install torch==2.13.0          # the local CPU wheel, first
    .peers/autocircuit-venv/bin/pip install transformer-lens==2.18.0 transformers==4.57.6 numpy==1.26.4 \
        datasets==2.21.0 pyarrow==16.1.0 jax==0.4.30 jaxlib==0.4.30 ml_dtypes==0.4.1 chex==0.1.86 dm-haiku==0.0.12
    .peers/autocircuit-venv/bin/pip install --no-deps auto-circuit==1.0.1
    .peers/autocircuit-venv/bin/pip install plotly blobfile ordered-set

Then (from the repository root, our venv)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/circuits_bench.py            # all (ACDC medium: ~2-3 min)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/circuits_bench.py --no-acdc-medium --repeats 1

Each model also times our default search (EAP-IG + noising checks) against auto-circuit's EAP-IG, its nearest
method (auto-circuit has no noising check).

Writes ``benchmarks/results/circuits.json`` and prints a table.

The default search's cost (no peer needed)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/circuits_bench.py --default-search [--repeats 3]

times ``eap-ig+noising`` (the default: EAP-IG, then noising checks) against ``eap-ig`` alone, edge scoring only
(``PatchSetup`` + ``score_edges``, as above; the circuit's faithfulness and necessity cost the same for both), on
the random ``small`` and ``medium`` (1,519 edges) models and the planted models (``induction``, ``induction_and``
soft and sharp, ``suppression``; 24 prompts). Runs alternate (EAP-IG, default, EAP-IG, ...) and each takes the best
of ``--repeats``, so load from other processes hits both alike; the load average (``/proc/loadavg``) before and
after is recorded. For the planted models it also records whether every planted edge was found (recall) and the
ROC AUC of both methods. Writes ``benchmarks/results/circuits_default_search.json``.

Pitfalls
--------
* Torch first (the local CPU wheel), or pip pulls a CUDA torch. ``pip install auto-circuit`` without
  ``--no-deps`` resolves transformer-lens 4.x (no ``HookedTransformer``): import fails. auto-circuit imports
  plotly, blobfile and ordered_set (and tracr -> jax) at import time though they are not all in its metadata
  usefully; ``pip check`` still complains about tracr-pypi, vscode-tqdm and word2word: harmless here.
* The peer rebuilds the model with TransformerLens 2.18 from a hand-picked config dict (not ``cfg.to_dict()``:
  3.x has fields 2.18 does not know); the state dict loads strictly apart from buffers.
* auto-circuit's ACDC uses only the first batch: the loader has one batch of all 64 prompts.
* auto-circuit's ``model.edges`` is a ``set``; ACDC sorts it by destination layer only, so the order in which it
  tries edges within a layer (and hence, greedy as ACDC is, its kept set) depends on ``PYTHONHASHSEED``: the peer
  runs with ``PYTHONHASHSEED=0``. Expect ACDC Jaccard < 1 against ours (different visit order), not a bug.
* Pin threads: two threads on the shared cores make timings ~10x noisier.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PEER_PY = ROOT / ".peers" / "autocircuit-venv" / "bin" / "python"
PEER = Path(__file__).with_name("autocircuit_peer.py")
RESULTS = Path(__file__).with_name("results") / "circuits.json"
DEFAULT_RESULTS = Path(__file__).with_name("results") / "circuits_default_search.json"
CFG_KEYS = ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "act_fn", "d_vocab", "n_ctx", "normalization_type",
            "use_attn_scale", "positional_embedding_type", "seed", "attn_only")
METHODS_ORDER = ("eap", "eap-ig", "acdc")


# ----------------------------------------------------------------------------- models and data
def random_model(n_layers: int, n_heads: int, d_model: int, d_vocab: int = 128, seed: int = 0):
    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformerConfig

    from autoexplain.tools.models import LoadedModel

    cfg = HookedTransformerConfig(n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_model // n_heads,
                                  d_mlp=4 * d_model, act_fn="gelu", d_vocab=d_vocab, n_ctx=32,
                                  normalization_type="LN", positional_embedding_type="standard", device="cpu",
                                  seed=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        model = HookedSAETransformer(cfg)
    model.eval()
    return LoadedModel(spec=f"random:{n_layers}x{n_heads}", model_id=f"random-{n_layers}x{n_heads}x{d_model}",
                       model=model, tokenizer=None, device=torch.device("cpu"))


def random_task(d_vocab: int, n: int = 64, seq: int = 16, n_changed: int = 4, seed: int = 1):
    from autoexplain.tools.data import TokenizedTask

    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(1, d_vocab, (n, seq), generator=g)
    clean[:, 0] = 0
    corrupt = clean.clone()
    for i in range(n):
        pos = torch.randperm(seq - 1, generator=g)[:n_changed] + 1
        corrupt[i, pos] = (clean[i, pos] + torch.randint(1, d_vocab - 1, (n_changed,), generator=g)) % (d_vocab - 1) + 1
    ans = torch.randint(1, d_vocab, (n,), generator=g)
    wrong = (ans + torch.randint(1, d_vocab - 1, (n,), generator=g) - 1) % (d_vocab - 1) + 1
    wrong = torch.where(wrong == ans, wrong % (d_vocab - 1) + 1, wrong)
    lens = torch.full((n,), seq)
    return TokenizedTask(clean=clean, corrupt=corrupt, answer_pos=lens - 1, answers=ans[:, None],
                         wrong=wrong[:, None], seq_lens=lens, prompts=None)


def export(lm, task, path: Path, *, steps: int, tau: float | None, methods, repeats: int) -> None:
    cfg = {k: getattr(lm.model.cfg, k) for k in CFG_KEYS}
    cfg["device"] = "cpu"
    sd = {k: v for k, v in lm.model.state_dict().items()}
    assert (task.seq_lens == task.clean.shape[1]).all(), "the peer reads the last position: no padding"
    torch.save({"cfg": cfg, "state_dict": sd, "clean": task.clean, "corrupt": task.corrupt,
                "answers": task.answers[:, 0], "wrong": task.wrong[:, 0], "steps": steps, "tau": tau,
                "methods": list(methods), "repeats": repeats}, path)


def run_peer(path: Path) -> dict:
    out = path.with_suffix(".json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "JAX_PLATFORMS": "cpu",
           "TQDM_DISABLE": "1",
           "PYTHONHASHSEED": "0"}  # auto-circuit keeps edges in a set: its ACDC visit order follows the hash seed
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([str(PEER_PY), str(PEER), str(path), str(out)], env=env, capture_output=True, text=True,
                          timeout=1800, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"auto-circuit peer failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


# ----------------------------------------------------------------------------- names and agreement
def our_name(theirs: str) -> str:
    def node(s: str) -> str:
        s = s.strip()
        if s == "Resid Start":
            return "embed"
        if s == "Resid End":
            return "logits"
        if m := re.fullmatch(r"MLP (\d+)", s):
            return f"m{m[1]}"
        if m := re.fullmatch(r"A(\d+)\.(\d+)(?:\.([QKV]))?", s):
            return f"a{m[1]}.{m[2]}" + (f".{m[3].lower()}" if m[3] else "")
        raise ValueError(f"unknown auto-circuit node {s!r}")

    src, dst = theirs.split("->")
    return f"{node(src)}->{node(dst)}"


def agreement(ours: dict[str, float], theirs: dict[str, float], sign: float = 1.0) -> dict:
    mapped = {our_name(k): v for k, v in theirs.items()}
    common = sorted(set(ours) & set(mapped))
    a = torch.tensor([ours[k] for k in common], dtype=torch.float64)
    b = sign * torch.tensor([float(mapped[k]) for k in common], dtype=torch.float64)
    corr = float(torch.corrcoef(torch.stack([a, b]))[0, 1]) if len(common) > 1 else float("nan")
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    spearman = float(torch.corrcoef(torch.stack([ra, rb]))[0, 1]) if len(common) > 1 else float("nan")
    return {"n_ours": len(ours), "n_theirs": len(mapped), "n_common": len(common),
            "only_ours": sorted(set(ours) - set(mapped))[:10], "only_theirs": sorted(set(mapped) - set(ours))[:10],
            "pearson": corr, "spearman": spearman, "max_abs_diff": float((a - b).abs().max()),
            "max_abs_score": float(a.abs().max())}


def acdc_agreement(ours_kept: set[str], theirs: dict[str, float | str]) -> dict:
    kept = {our_name(k) for k, v in theirs.items() if v == "inf"}
    union = ours_kept | kept
    return {"kept_ours": len(ours_kept), "kept_theirs": len(kept),
            "jaccard": len(ours_kept & kept) / len(union) if union else 1.0,
            "only_ours": sorted(ours_kept - kept)[:10], "only_theirs": sorted(kept - ours_kept)[:10]}


def auc(planted: frozenset[str], scores: dict[str, float]) -> float:
    from sklearn.metrics import roc_auc_score

    names = sorted(scores, key=str)
    vals = [abs(float(scores[n])) if scores[n] != "inf" else float("inf") for n in names]
    finite_max = max([v for v in vals if math.isfinite(v)] + [0.0])
    vals = [v if math.isfinite(v) else finite_max + 1.0 for v in vals]
    return float(roc_auc_score([n in planted for n in names], vals))


# ----------------------------------------------------------------------------- ours
def run_ours(lm, task, *, steps: int, threshold: float, methods, repeats: int) -> dict:
    from autoexplain.tools.circuits import SearchConfig, score_edges
    from autoexplain.tools.patching import PatchSetup

    out: dict = {}
    for name in methods:
        metric = "kl" if name == "acdc" else "logit_diff"
        times, res = [], None
        for _ in range(repeats if name != "acdc" else 1):
            t0 = time.perf_counter()
            setup = PatchSetup(lm, task, metric=metric)
            res = score_edges(setup, name, SearchConfig(steps=steps, threshold=threshold))
            times.append(time.perf_counter() - t0)
        assert res is not None
        entry = {"seconds": min(times), "all_seconds": times, "scores": res.as_dict(),
                 "m_clean": res.m_clean, "m_ablated": res.m_ablated}
        if name == "acdc":
            entry["tau"] = res.details["tau"]
            entry["kept"] = [str(res.edges[i]) for i in range(len(res.edges)) if res.scores[i] >= res.details["tau"]]
            entry["passes"] = res.details.get("passes")
        out[name] = entry
        print(f"  ours {name}: {min(times):.3f} s", flush=True)
    return out


def kl_clean_corrupt(lm, task) -> float:
    from autoexplain.tools.patching import PatchSetup

    return abs(PatchSetup(lm, task, metric="kl").effect)


# ----------------------------------------------------------------------------- memory
class _Sampler:
    def __init__(self) -> None:
        try:
            libc = ctypes.CDLL("libc.so.6")

            class MI2(ctypes.Structure):
                _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                            "fsmblks", "uordblks", "fordblks", "keepcost")]
            libc.mallinfo2.restype = MI2
            self._mi = libc.mallinfo2
        except (OSError, AttributeError):
            self._mi = None
        self._page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def heap(self) -> int:
        if self._mi is None:
            return 0
        m = self._mi()
        return int(m.uordblks + m.hblkhd)  # in use: small blocks + mmapped blocks

    def peak_during(self, fn) -> tuple[int, int, float]:
        base_rss, base_heap = self.rss(), self.heap()
        peak = [base_rss, base_heap]
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], self.rss())
                peak[1] = max(peak[1], self.heap())
                time.sleep(0.0002)

        th = threading.Thread(target=loop, daemon=True)
        th.start()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        stop.set()
        th.join()
        return peak[0] - base_rss, peak[1] - base_heap, dt


def memory_curve(lm, task, ks=(0, 1, 10, 100, 300, 1000, None), reps: int = 3) -> list[dict]:
    from autoexplain.tools.patching import PatchSetup

    setup = PatchSetup(lm, task, metric="logit_diff")
    g = setup.graph
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(g.n_edges, generator=gen).tolist()
    s = _Sampler()
    setup.evaluate(g.mask(perm[:10]))  # warm-up
    rows = []
    with torch.no_grad():  # reference: one plain forward pass of the clean batch
        lm.model(task.clean)
        best = [1 << 62, 1 << 62, 1e9]
        for _ in range(reps):
            r, h, dt = s.peak_during(lambda: lm.model(task.clean))
            best = [min(best[0], r), min(best[1], h), min(best[2], dt)]
    rows.append({"patched_edges": "plain forward (reference)", "rss_growth_mb": best[0] / 2**20,
                 "heap_peak_growth_mb": best[1] / 2**20, "seconds": best[2]})
    print(f"  memory plain forward: heap +{best[1] / 2**20:.2f} MB, {best[2] * 1e3:.1f} ms", flush=True)
    for k in ks:
        k = g.n_edges if k is None else k
        mask = g.mask(perm[:k]) if k else None
        best = [1 << 62, 1 << 62, 1e9]
        for _ in range(reps):
            r, h, dt = s.peak_during(lambda m=mask: setup.evaluate(m))
            best = [min(best[0], r), min(best[1], h), min(best[2], dt)]
        rows.append({"patched_edges": k, "rss_growth_mb": best[0] / 2**20, "heap_peak_growth_mb": best[1] / 2**20,
                     "seconds": best[2]})
        print(f"  memory k={k}: rss +{best[0] / 2**20:.2f} MB, heap +{best[1] / 2**20:.2f} MB, {best[2] * 1e3:.1f} ms",
              flush=True)
    return rows


# ----------------------------------------------------------------------------- the default search's cost
def _load() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def default_search_cost(name: str, lm, task, *, repeats: int, steps: int, threshold: float,
                        planted: frozenset[str] | None = None) -> dict:
    """Seconds of eap-ig and of eap-ig+noising (PatchSetup + score_edges, best of ``repeats``, alternating), the
    noising work done, and for planted models recall of the planted edges and ROC AUC of both."""
    from autoexplain.evals.circuits import edge_roc_auc, recall
    from autoexplain.tools.circuits import SearchConfig, find_circuit, score_edges
    from autoexplain.tools.patching import PatchSetup

    times: dict[str, list[float]] = {"eap-ig": [], "eap-ig+noising": []}
    last: dict = {}
    for _ in range(repeats):
        for method in times:
            t0 = time.perf_counter()
            setup = PatchSetup(lm, task, metric="logit_diff")
            last[method] = score_edges(setup, method, SearchConfig(steps=steps, threshold=threshold))
            times[method].append(time.perf_counter() - t0)
    d = last["eap-ig+noising"].details
    row: dict = {"n_edges": len(last["eap-ig"].edges), "n_prompts": int(task.clean.shape[0]),
                 "effect_logit_diff": last["eap-ig"].effect,
                 "eap_ig_s": min(times["eap-ig"]), "default_s": min(times["eap-ig+noising"]),
                 "ratio": min(times["eap-ig+noising"]) / min(times["eap-ig"]),
                 "all_seconds": times, "eap_ig_selected": d["eap_ig_selected"],
                 "necessary_nodes": len(d["necessary_nodes"]), "noising_passes": d["noising_passes"],
                 "noising_checked": d["noising_checked"], "noising_candidates": d["noising_candidates"],
                 "noising_unchecked": d["n_unchecked"], "noising_budget": d["noising_budget"],
                 "raised_by_noising": sorted(d["raised_by_noising"])}
    if planted is not None:
        setup = PatchSetup(lm, task, metric="logit_diff")
        for method in times:
            circ = find_circuit(setup, method, steps=steps, threshold=threshold, curve=False)
            row[method] = {"recall": recall(circ.edges, planted), "auc": edge_roc_auc(circ.scores, planted),
                           "n_edges": circ.n_edges, "faithfulness": circ.faithfulness, "necessity": circ.necessity,
                           "missed": sorted(planted - {str(e) for e in circ.edges})}
    print(f"  {name}: eap-ig {row['eap_ig_s']:.3f} s, eap-ig+noising {row['default_s']:.3f} s, "
          f"ratio {row['ratio']:.2f} ({row['noising_passes']} noising passes)", flush=True)
    return row


def run_default_search(args: argparse.Namespace) -> None:
    from autoexplain.evals.truth.planted_circuits import induction, induction_and, suppression

    results: dict = {"settings": {"threads": torch.get_num_threads(), "steps": args.steps,
                                  "threshold": args.threshold, "repeats": args.repeats, "torch": torch.__version__,
                                  "timing": "PatchSetup + score_edges, best of repeats, methods alternating"},
                     "load_before": _load(), "models": {}}
    print(f"load before: {results['load_before']}", flush=True)
    task = random_task(128)
    results["models"]["small_2x4_d64"] = default_search_cost("small", random_model(2, 4, 64), task,
                                                             repeats=args.repeats, steps=args.steps,
                                                             threshold=args.threshold)
    results["models"]["medium_4x8_d128"] = default_search_cost("medium", random_model(4, 8, 128), task,
                                                               repeats=args.repeats, steps=args.steps,
                                                               threshold=args.threshold)
    for key, p in (("induction", induction()), ("induction_and", induction_and()),
                   ("induction_and_sharp40", induction_and(sharpness=40)), ("suppression", suppression())):
        results["models"][f"planted_{key}"] = default_search_cost(key, p.lm, p.task, repeats=args.repeats,
                                                                  steps=args.steps, threshold=args.threshold,
                                                                  planted=p.planted)
    results["load_after"] = _load()
    print(f"load after: {results['load_after']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\n{'model':<30}{'edges':>6}{'eap-ig s':>10}{'default s':>11}{'ratio':>7}{'passes':>8}{'unchecked':>10}")
    for name, r in results["models"].items():
        print(f"{name:<30}{r['n_edges']:>6}{r['eap_ig_s']:>10.3f}{r['default_s']:>11.3f}{r['ratio']:>7.2f}"
              f"{r['noising_passes']:>8}{r['noising_unchecked']:>10}"
              + (f"  recall {r['eap-ig']['recall']:.2f} -> {r['eap-ig+noising']['recall']:.2f}" if "eap-ig" in r
                 else ""))
    print(f"wrote {args.out}")


# ----------------------------------------------------------------------------- main
def compare(name: str, lm, task, args, tmp: Path, *, acdc: bool, planted: frozenset[str] | None = None) -> dict:
    methods = [m for m in METHODS_ORDER if m != "acdc" or acdc]
    kl = kl_clean_corrupt(lm, task)
    tau = args.threshold * kl
    path = tmp / f"{name}.pt"
    export(lm, task, path, steps=args.steps, tau=tau if acdc else None, methods=methods, repeats=args.repeats)
    print(f"[{name}] auto-circuit ...", flush=True)
    theirs = run_peer(path)
    print(f"[{name}] ours ...", flush=True)
    ours = run_ours(lm, task, steps=args.steps, threshold=args.threshold, methods=methods, repeats=args.repeats)
    row: dict = {"n_edges_ours": len(next(iter(ours.values()))["scores"]), "n_edges_theirs": theirs["n_edges"],
                 "auto_circuit_wrap_seconds": theirs["wrap_seconds"], "kl_clean_corrupt": kl, "acdc_tau": tau,
                 "methods": {}}
    for m in methods:
        o, t = ours[m], theirs["methods"][m]
        e: dict = {"ours_s": o["seconds"], "theirs_s": t["seconds"], "ratio": o["seconds"] / t["seconds"]}
        if m == "eap":
            e["agreement"] = agreement(o["scores"], t["scores"], sign=-1.0)
        elif m == "eap-ig":
            e["agreement_info_only"] = agreement(o["scores"], t["scores"], sign=-1.0 / (args.steps + 1))
        else:
            e["agreement"] = acdc_agreement(set(o["kept"]), t["scores"])
            e["passes_ours"] = o["passes"]
        if planted is not None:
            e["auc_ours"] = auc(planted, o["scores"])
            e["auc_theirs"] = auc(planted, {our_name(k): v for k, v in t["scores"].items()})
        row["methods"][m] = e
    if "eap-ig" in theirs["methods"]:
        # our default search (EAP-IG + noising checks) against auto-circuit's EAP-IG, its nearest method: auto-circuit
        # has no noising check, so this prices what finding jointly-necessary components costs over its search
        print(f"[{name}] ours, default search ...", flush=True)
        dc = default_search_cost(name, lm, task, repeats=args.repeats, steps=args.steps, threshold=args.threshold,
                                 planted=planted)
        t = theirs["methods"]["eap-ig"]
        e = {"ours_s": dc["default_s"], "theirs_s": t["seconds"], "ratio": dc["default_s"] / t["seconds"],
             "against": "auto-circuit eap-ig (no noising in auto-circuit)", "ours_eap_ig_s": dc["eap_ig_s"],
             "noising_passes": dc["noising_passes"], "agreement": {}}
        if planted is not None:
            e["auc_ours"] = dc["eap-ig+noising"]["auc"]
            e["auc_theirs"] = auc(planted, {our_name(k): v for k, v in t["scores"].items()})
        row["methods"]["eap-ig+noising"] = e
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threshold", type=float, default=0.02)
    ap.add_argument("--no-acdc-medium", action="store_true", help="skip ACDC on the 1,519-edge model (slowest)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--default-search", action="store_true",
                    help="only time the default search (eap-ig+noising) against eap-ig (no peer needed)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.default_search:
        args.out = args.out or DEFAULT_RESULTS
        run_default_search(args)
        return
    args.out = args.out or RESULTS
    if not PEER_PY.exists():
        sys.exit(f"no auto-circuit venv at {PEER_PY}: see this module's docstring")
    sys.path.insert(0, str(ROOT / "tests"))
    results: dict = {"settings": {"threads": 1, "prompts": 64, "seq": 16, "steps": args.steps,
                                  "threshold": args.threshold, "repeats": args.repeats, "torch": torch.__version__},
                     "models": {}}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        small = random_model(2, 4, 64)
        medium = random_model(4, 8, 128)
        task = random_task(128)
        results["models"]["small_2x4_d64"] = compare("small", small, task, args, tmp, acdc=True)
        results["models"]["medium_4x8_d128"] = compare("medium", medium, task, args, tmp, acdc=not args.no_acdc_medium)
        try:
            from autoexplain.evals.truth.planted_circuits import suppression

            p = suppression(n_prompts=64)
            results["models"]["planted_suppression"] = compare("planted", p.lm, p.task, args, tmp, acdc=True,
                                                               planted=p.planted)
        except Exception as exc:
            results["models"]["planted_suppression"] = {"error": repr(exc)[:500]}
        results["planted_induction"] = ("not exported: variable-length right-padded prompts "
                                        "(auto-circuit reads last_seq)")
    if not args.no_memory:
        print("[memory] ours, medium model ...", flush=True)
        results["memory_ours_medium"] = memory_curve(medium, task)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print_table(results)
    print(f"wrote {args.out}")


def print_table(results: dict) -> None:
    print(f"\n{'model':<22}{'method':<15}{'ours s':>9}{'theirs s':>10}{'ratio':>7}  agreement / AUC")
    for mname, row in results["models"].items():
        if "error" in row:
            print(f"{mname:<22} error: {row['error']}")
            continue
        for m, e in row["methods"].items():
            ag = e.get("agreement") or e.get("agreement_info_only") or {}
            if "against" in e:
                s = f"vs {e['against']}"
            elif "pearson" in ag:
                s = f"r={ag['pearson']:.4f} rho={ag['spearman']:.3f} maxdiff={ag['max_abs_diff']:.2e}" + \
                    (" (info: IG over masks)" if "agreement_info_only" in e else "")
            else:
                s = f"kept {ag.get('kept_ours')}/{ag.get('kept_theirs')} jaccard={ag.get('jaccard', float('nan')):.3f}"
            if "auc_ours" in e:
                s += f" AUC {e['auc_ours']:.3f}/{e['auc_theirs']:.3f}"
            print(f"{mname:<22}{m:<15}{e['ours_s']:>9.3f}{e['theirs_s']:>10.3f}{e['ratio']:>7.2f}  {s}")
    for r in results.get("memory_ours_medium", []):
        print(f"memory k={r['patched_edges']!s:>5}: rss +{r['rss_growth_mb']:.2f} MB "
              f"heap +{r['heap_peak_growth_mb']:.2f}"
              f" MB {r['seconds'] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
