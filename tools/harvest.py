"""Harvest SAE features: one streaming pass of a dataset through model + SAE, for every feature at once.

What it collects, per feature
-----------------------------
* **top-k contexts**: the ``top_k`` windows where the feature's maximum activation is highest, with per-token
  activations (a running top-k merged batch by batch, so memory does not grow with the dataset);
* **quantile samples**: a uniform sample of the windows where the feature fires (priority sampling: every
  (feature, window) pair gets a seeded random key and the ``reservoir`` smallest keys are kept), split at the end
  into ``n_quantiles`` bins by activation, ``per_quantile`` windows from each — weak activations included, which
  is what completeness scoring needs;
* **random non-activating contexts**: from a uniform sample of ``random_pool`` windows, those where the feature
  never fires (for scoring: the negatives);
* **statistics**: firing density over tokens, max and mean (over firing tokens) activation, a histogram with fixed
  log-spaced bins (:data:`HIST_EDGES`), and **logit effects**: the tokens the decoder direction promotes and
  suppresses most through the unembedding (``W_dec @ W_U``).

Caveats
-------
Position 0 (BOS) and padding are excluded everywhere: BOS is an attention sink with outlier norms on which many
features fire for no reason about text. Logit effects ignore the final LayerNorm and everything downstream of the
SAE's site: they describe the decoder direction's direct path to the logits, not the feature's full effect.
All of this is association-level evidence (where the feature fires); interventions live in ``probe``.

Work folder
-----------
The pass keeps its windows and checkpoints in ``<cache>/harvest/<key>/``, ``key`` a hash of everything that
determines its content: the model and SAE (content hashes), the dataset's identity
(:func:`~autoexplain.tools.data.dataset_identity`: path, size and modification time, or hub name and revision), and
every argument but ``checkpoint_every`` — the same as the harvest's id (:func:`harvest_identity`). One process owns
a folder at a time (:func:`harvest_work`: an ``flock`` on ``<key>.lock`` the operating system releases when the
process dies); a second process with the same inputs is refused with one line (exit code 2) instead of sharing the
files. A crashed harvest's folder is resumed by the same command; folders no command can resume (their dataset
changed since) and folders untouched for :data:`STALE_WORK_DAYS` days are removed when a harvest starts.

Crash safety: the state is checkpointed every ``checkpoint_every`` batches (atomically); a re-run with the same
arguments resumes after the last checkpoint and gives exactly the result of an uninterrupted run (the random keys
are seeded per batch, so they do not depend on where a run stopped). A ``progress`` callback may stop the pass by
raising (a user's stop request, or a test emulating an interruption): the batches done so far are checkpointed
first, so the re-run resumes right after them.

Results
-------
The finished harvest is a :class:`HarvestResult`: per-feature :class:`FeatureStats` and per-example
:class:`FeatureExample` values (plain dataclasses: hundreds of thousands of examples are built without per-row
validation). It goes to ``ctx.sink`` (a :class:`HarvestSink`); tools know nothing of tables: the store turns the
results into rows (:mod:`autoexplain.agent.store.harvest`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from autoexplain.tools.cache import cache_root
from autoexplain.tools.errors import InputError
from autoexplain.tools.locks import exclusive, is_locked
from autoexplain.tools.registry import Cost, ToolContext, ToolOutput, ToolSpec
from autoexplain.tools.vocab import FeatureRef, SiteKind

if TYPE_CHECKING:
    from autoexplain.tools.data import TokenWindows
    from autoexplain.tools.models import LoadedModel
    from autoexplain.tools.saes import LoadedSAE

#: Histogram bin edges (activation values); counts has one more bin below the first edge and one above the last.
HIST_EDGES: tuple[float, ...] = tuple(float(x) for x in np.logspace(-3, 3, 25))
_RESIDUAL_WRITERS = {SiteKind.RESID_PRE, SiteKind.RESID_MID, SiteKind.RESID_POST, SiteKind.ATTN_OUT,
                     SiteKind.MLP_OUT}
STATE_VERSION = 1
#: Unlocked work folders older than this are removed when a harvest starts (crashed harvests never resumed).
STALE_WORK_DAYS = 7.0
#: A harvest whose dataset gives less than this fraction of the tokens asked for carries a note saying so.
SHORT_DATASET_FRACTION = 0.5


class HarvestIn(BaseModel):
    """Arguments of a harvest (also the tool's input schema)."""

    model_config = ConfigDict(extra="forbid")

    sae_id: str = Field(description="which loaded SAE to harvest")
    dataset: str = Field(description=".txt/.jsonl/.parquet file or hub dataset name")
    n_tokens: int = Field(200_000, ge=1, description="stop after this many tokens (windows include BOS)")
    ctx: int = Field(64, ge=2, description="window length in tokens (BOS first), at most the model's context")
    batch_size: int = Field(32, ge=1, le=4096, description="windows per forward pass")
    top_k: int = Field(20, ge=1, le=500)
    n_quantiles: int = Field(10, ge=1, le=50)
    per_quantile: int = Field(2, ge=1, le=50)
    reservoir: int = Field(40, ge=1, le=1000, description="activating windows sampled per feature for quantiles")
    n_random: int = Field(20, ge=0, le=500, description="non-activating windows kept per feature")
    random_pool: int = Field(256, ge=1, le=10_000)
    n_logits: int = Field(10, ge=1, le=100)
    left: int = Field(24, ge=0, description="tokens kept before the max token in stored examples")
    right: int = Field(8, ge=0, description="tokens kept after the max token in stored examples")
    seed: int = 0
    checkpoint_every: int = Field(20, ge=1, description="batches between checkpoints")


class HarvestOut(ToolOutput):
    sae_id: str
    n_tokens: int
    n_windows: int
    n_features: int
    n_dead: int
    resumed_from_batch: int
    seconds: float
    stream_seconds: float = Field(description="the pass over the data (this run's batches)")
    finish_seconds: float = Field(description="once per SAE: logit effects (W_dec @ W_U) and example assembly")
    density_quantiles: dict[str, float]
    densest: list[tuple[int, float]]
    harvest_id: str = Field("", description="which harvest the stored rows come from (features.harvest_id)")
    note: str | None = Field(None, description="a warning about the inputs, e.g. a dataset far smaller than asked")
    _result: HarvestResult | None = PrivateAttr(default=None)

    @property
    def result(self) -> HarvestResult:
        assert self._result is not None
        return self._result

    def summary_text(self) -> str:
        dq = ", ".join(f"{k} {v:.2e}" for k, v in self.density_quantiles.items())
        dense = ", ".join(f"#{i} ({d:.1%})" for i, d in self.densest[:8])
        return (f"harvested {self.n_features} features of {self.sae_id} over {self.n_tokens:,} tokens "
                f"({self.n_windows:,} windows) in {self.seconds:.1f} s; {self.n_dead} dead (never fired). "
                f"Firing density quantiles: {dq}. Densest: {dense}. Top contexts, quantile samples and "
                f"non-activating contexts are stored per feature (tables features, feature_examples)."
                + (f" WARNING: {self.note}" if self.note else ""))


# ----------------------------------------------------------------------------- running state
@dataclass
class _State:
    """Everything the streaming pass accumulates; O(features x (top_k + reservoir) x ctx), not O(dataset)."""

    batches_done: int
    windows_done: int
    n_tokens: int
    fire_count: torch.Tensor  # [F] int64
    act_sum: torch.Tensor  # [F] float64
    act_max: torch.Tensor  # [F]
    hist: torch.Tensor  # [F, len(HIST_EDGES)+1] int64
    top_val: torch.Tensor  # [F, K]  (-inf = empty)
    top_win: torch.Tensor  # [F, K] int64 global window index
    top_pos: torch.Tensor  # [F, K] int64
    top_acts: torch.Tensor  # [F, K, ctx] float16
    res_key: torch.Tensor  # [F, R]  (+inf = empty)
    res_val: torch.Tensor
    res_win: torch.Tensor
    res_pos: torch.Tensor
    res_acts: torch.Tensor  # [F, R, ctx] float16
    pool_key: torch.Tensor  # [P]
    pool_win: torch.Tensor  # [P]
    pool_max: torch.Tensor  # [P, F]

    @classmethod
    def empty(cls, n_features: int, args: HarvestIn) -> _State:
        f, k, r, p, t = n_features, args.top_k, args.reservoir, args.random_pool, args.ctx
        return cls(
            batches_done=0, windows_done=0, n_tokens=0,
            fire_count=torch.zeros(f, dtype=torch.int64), act_sum=torch.zeros(f, dtype=torch.float64),
            act_max=torch.zeros(f), hist=torch.zeros(f, len(HIST_EDGES) + 1, dtype=torch.int64),
            top_val=torch.full((f, k), -torch.inf), top_win=torch.full((f, k), -1, dtype=torch.int64),
            top_pos=torch.zeros(f, k, dtype=torch.int64), top_acts=torch.zeros(f, k, t, dtype=torch.float16),
            res_key=torch.full((f, r), torch.inf), res_val=torch.zeros(f, r),
            res_win=torch.full((f, r), -1, dtype=torch.int64), res_pos=torch.zeros(f, r, dtype=torch.int64),
            res_acts=torch.zeros(f, r, t, dtype=torch.float16),
            pool_key=torch.full((p,), torch.inf), pool_win=torch.full((p,), -1, dtype=torch.int64),
            pool_max=torch.zeros(p, f),
        )

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _admit(keys: torch.Tensor, cand: torch.Tensor, largest: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which batch candidates enter a per-row set of ``K`` best keys, and which slots they evict.

    ``keys`` [F, K] is the kept set (unordered), ``cand`` [F, B] the batch's candidates. Returns flat index
    triples ``(row, slot, b)``: candidate ``b`` of ``row`` replaces slot ``slot``. Survivors stay where they are,
    so per-batch data movement is proportional to the entries that change, not to the whole store.
    """
    k = keys.shape[1]
    # only rows where some candidate beats the worst kept key can change (after warm-up: few rows)
    if largest:
        live = (cand.max(1).values > keys.min(1).values).nonzero().flatten()
    else:
        live = (cand.min(1).values < keys.max(1).values).nonzero().flatten()
    if live.numel() == 0:
        empty = torch.empty(0, dtype=torch.long)
        return empty, empty, empty
    keys, cand = keys[live], cand[live]
    sel = torch.topk(torch.cat([keys, cand], 1), k, dim=1, largest=largest, sorted=False).indices
    chosen = torch.zeros(len(live), k + cand.shape[1], dtype=torch.bool)
    chosen.scatter_(1, sel, True)
    kept, entering = chosen[:, :k], chosen[:, k:]
    n_new = entering.sum(1)
    # evicted slots and entering candidates, each listed first per row (stable), paired by rank
    width = min(k, cand.shape[1])
    slots = torch.argsort(kept.to(torch.int8), dim=1, stable=True)[:, :width]
    news = torch.argsort((~entering).to(torch.int8), dim=1, stable=True)[:, :width]
    take = torch.arange(width)[None, :] < n_new[:, None]
    rows = live[:, None].expand_as(take)[take]
    return rows, slots[take], news[take]


def _update(state: _State, acts: torch.Tensor, mask: torch.Tensor, win_offset: int, gen: torch.Generator) -> None:
    """Fold one batch of activations ``[B, T, F]`` into the state; ``mask`` [B, T] marks the counted tokens.

    Works on the non-zero entries (one pass over the dense tensor to find them): SAE activations are sparse,
    so the statistics cost O(firings), not O(B x T x F).
    """
    b, t, f = acts.shape
    nz_b, nz_t, nz_f = acts.nonzero(as_tuple=True)
    keep = mask[nz_b, nz_t]  # drop BOS and padding
    nz_b, nz_t, nz_f = nz_b[keep], nz_t[keep], nz_f[keep]
    vals = acts[nz_b, nz_t, nz_f]
    state.fire_count += torch.bincount(nz_f, minlength=f)
    state.act_sum += torch.bincount(nz_f, weights=vals.double(), minlength=f)
    bins = torch.bucketize(vals, torch.tensor(HIST_EDGES, dtype=vals.dtype))
    state.hist.view(-1).index_add_(0, nz_f * state.hist.shape[1] + bins, torch.ones_like(nz_f))
    # per (window, feature): the max and the first position reaching it
    cell = nz_b * f + nz_f
    win_max = torch.zeros(b * f, dtype=acts.dtype).scatter_reduce_(0, cell, vals, reduce="amax")
    at_max = vals == win_max[cell]
    win_arg = torch.zeros(b * f, dtype=torch.int64).fill_(t).scatter_reduce_(0, cell[at_max], nz_t[at_max],
                                                                              reduce="amin")
    win_max, win_arg = win_max.view(b, f), win_arg.masked_fill_(win_arg == t, 0).view(b, f)
    state.act_max = torch.maximum(state.act_max, win_max.max(dim=0).values)
    masked = mask.to(acts.dtype)

    def per_token(bb: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return acts[bb, :, rows] * masked[bb]

    wm, wa = win_max.T, win_arg.T  # [F, B]

    # running top-k by window max (windows where the feature never fires never enter)
    cand = torch.where(wm > 0, wm, torch.full_like(wm, -torch.inf))
    rows, slots, bb = _admit(state.top_val, cand, largest=True)
    state.top_val[rows, slots] = cand[rows, bb]
    state.top_win[rows, slots] = win_offset + bb
    state.top_pos[rows, slots] = wa[rows, bb]
    state.top_acts[rows, slots] = per_token(bb, rows).to(state.top_acts.dtype)
    # priority sample of activating windows: uniform, without replacement
    keys = torch.rand(wm.shape, generator=gen)
    keys = torch.where(wm > 0, keys, torch.full_like(keys, torch.inf))
    rows, slots, bb = _admit(state.res_key, keys, largest=False)
    state.res_key[rows, slots] = keys[rows, bb]
    state.res_val[rows, slots] = wm[rows, bb]
    state.res_win[rows, slots] = win_offset + bb
    state.res_pos[rows, slots] = wa[rows, bb]
    state.res_acts[rows, slots] = per_token(bb, rows).to(state.res_acts.dtype)
    # a uniform pool of windows, for non-activating examples
    pkeys = torch.rand(1, b, generator=gen)
    _, slots, bb = _admit(state.pool_key[None, :], pkeys, largest=False)
    state.pool_key[slots] = pkeys[0, bb]
    state.pool_win[slots] = win_offset + bb
    state.pool_max[slots] = win_max[bb]


# ----------------------------------------------------------------------------- result
#: A token and a logit effect (how much the decoder direction raises or lowers that token's logit).
LogitEffect = tuple[str, float]


@dataclass(frozen=True, slots=True)
class FeatureStats:
    """One feature's statistics over the harvested tokens."""

    feature: FeatureRef
    density: float  # fraction of counted tokens where the feature fires
    max_act: float
    mean_act: float  # over firing tokens
    n_tokens: int  # counted tokens (BOS and padding excluded)
    hist_edges: tuple[float, ...]  # :data:`HIST_EDGES`
    hist_counts: list[int]  # one bin below the first edge, one above the last
    top_logits: list[LogitEffect] | None  # tokens the decoder direction promotes most (None: not a residual SAE)
    bottom_logits: list[LogitEffect] | None  # ... and suppresses most

    @property
    def is_dead(self) -> bool:
        return self.density == 0


class ExampleKind(StrEnum):
    """Why a context window was kept: among the ``top`` activations, a ``quantile`` sample, or a ``random``
    window where the feature does not fire."""

    TOP = "top"
    QUANTILE = "quantile"
    RANDOM = "random"


@dataclass(frozen=True, slots=True)
class FeatureExample:
    """A context window of one feature, cut around its maximum, with per-token activations."""

    feature: FeatureRef
    kind: ExampleKind
    example_id: int  # rank within (feature, kind)
    quantile: int | None  # activation bin of a quantile sample, weakest first
    tokens: list[str]
    acts: list[float]  # rounded to 4 decimals; all 0 for random windows
    max_act: float
    window_index: int  # which harvested window (global order of the pass)


@dataclass
class HarvestResult:
    """The finished harvest: statistics as arrays, plus every feature's stats and examples for the store."""

    sae_id: str
    n_tokens: int
    n_windows: int
    density: np.ndarray
    max_act: np.ndarray
    mean_act: np.ndarray
    features: list[FeatureStats]
    examples: list[FeatureExample]
    harvest_id: str = ""  # see :func:`harvest_identity`
    inputs: dict[str, Any] | None = None  # what reuse compares (:func:`harvest_identity`)
    note: str | None = None  # a warning about the inputs (a dataset far smaller than asked)

    @property
    def dead(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(self.density == 0)]


class HarvestSink(Protocol):
    """Where a finished harvest goes (the store's writer: :func:`autoexplain.agent.store.harvest.harvest_sink`)."""

    def __call__(self, result: HarvestResult, /) -> None: ...


class _Windows:
    """Every harvested window's tokens, appended to a file as the pass goes (memory stays flat)."""

    def __init__(self, path: Path, ctx: int) -> None:
        self.path, self.ctx = path, ctx

    def truncate(self, n_windows: int) -> None:
        with open(self.path, "ab") as fh:
            fh.truncate(n_windows * self.ctx * 4)

    def append(self, tokens: torch.Tensor) -> None:
        with open(self.path, "ab") as fh:
            fh.write(tokens.to(torch.int32).numpy().tobytes())

    def sync(self) -> None:
        """Make every appended window durable (called before each checkpoint that counts them)."""
        with open(self.path, "ab") as fh:
            os.fsync(fh.fileno())

    def rows(self, idx: np.ndarray) -> np.ndarray:
        mm = np.memmap(self.path, dtype=np.int32, mode="r").reshape(-1, self.ctx)
        return np.asarray(mm[idx])


@dataclass(frozen=True)
class HarvestIdentity:
    """What a harvest's result depends on. ``harvest_id`` hashes all of it (and names its work folder);
    ``inputs`` is what decides whether stored rows may be reused for a new request: model, SAE, dataset identity,
    token budget and window length (the sampling settings change which examples are drawn, not what they are of)."""

    harvest_id: str
    inputs: dict[str, Any]
    full: dict[str, Any]


def harvest_identity(model_id: str, sae_id: str, args: HarvestIn) -> HarvestIdentity:
    """The identity of harvesting ``args`` with model ``model_id`` and SAE ``sae_id`` (reads the dataset's
    metadata, not its content: see :func:`~autoexplain.tools.data.dataset_identity`)."""
    from autoexplain.tools.data import dataset_identity

    inputs = {"model": model_id, "sae": sae_id, "dataset": dataset_identity(args.dataset),
              "n_tokens": args.n_tokens, "ctx": args.ctx}
    full = {**inputs, "args": args.model_dump(exclude={"checkpoint_every", "sae_id", "dataset"}),
            "version": STATE_VERSION}
    digest = hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()[:16]
    return HarvestIdentity(harvest_id=f"harvest-{digest}", inputs=inputs, full=full)


@dataclass(frozen=True)
class HarvestWork:
    """A work folder owned by this process for as long as :func:`harvest_work` holds it."""

    path: Path
    identity: HarvestIdentity


def _harvest_root() -> Path:
    return cache_root() / "harvest"


@contextlib.contextmanager
def harvest_work(model_id: str, sae_id: str, args: HarvestIn, *, root: Path | None = None) -> Iterator[HarvestWork]:
    """Own the work folder of this harvest for the block (see the module doc): lock it, or raise
    :class:`~autoexplain.tools.locks.LockBusy` (one line, exit code 2) when another live process harvests the same
    inputs. Take it before anything is written, so a refused command writes nothing. Also removes the folders of
    crashed harvests that can never be resumed (:func:`prune_work`)."""
    identity = harvest_identity(model_id, sae_id, args)
    base = root or _harvest_root()
    key = identity.harvest_id.removeprefix("harvest-")
    with exclusive(base / f"{key}.lock", f"harvesting {sae_id} from {args.dataset}",
                   f"another process is harvesting the same SAE, dataset and arguments right now (its work folder "
                   f"{str(base / key)!r} is in use): wait for it to finish, then run this again"):
        prune_work(base, keep=key)
        work = base / key
        work.mkdir(parents=True, exist_ok=True)
        (work / "identity.json").write_text(json.dumps(identity.full, sort_keys=True))
        yield HarvestWork(path=work, identity=identity)


def prune_work(base: Path, *, keep: str = "") -> list[Path]:
    """Remove work folders no process owns that no command can resume: their dataset file changed or vanished
    since, or they were untouched for :data:`STALE_WORK_DAYS` days. Returns what was removed."""
    from autoexplain.tools.data import dataset_identity

    removed: list[Path] = []
    try:
        folders = [p for p in base.iterdir() if p.is_dir() and p.name != keep]
    except OSError:
        return removed
    now = time.time()
    for folder in folders:
        lock = base / f"{folder.name}.lock"
        if is_locked(lock):
            continue
        try:
            ident = json.loads((folder / "identity.json").read_text())
            data = ident["dataset"]
            gone = "path" in data and dataset_identity(data["path"]) != data
        except (OSError, ValueError, KeyError, TypeError):
            gone = False
        try:
            old = now - folder.stat().st_mtime > STALE_WORK_DAYS * 86400
        except OSError:
            continue
        if gone or old:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def harvest(ctx: ToolContext, args: HarvestIn, *, progress: Callable[[int, int], None] | None = None,
            work_dir: Path | None = None, work: HarvestWork | None = None) -> HarvestOut:
    """Run (or resume) the harvest described by ``args``; send the result to ``ctx.sink``; return the summary.

    ``progress(batches_done, total_batches)`` is called after every batch. It may stop the pass by raising (e.g.
    ``KeyboardInterrupt``): the state is checkpointed first and the exception propagates; nothing is stored, and
    a re-run with the same arguments resumes after that batch.

    ``work``: a work folder the caller already owns (:func:`harvest_work`); otherwise it is taken here, in the
    cache, or under ``work_dir`` (tests) — refused if another process owns it.
    """
    lm, sae = ctx.model, ctx.sae(args.sae_id)
    if ctx.sink is None:
        raise InputError("harvest needs somewhere to store its results: pass a database (--db)")
    check_args(args, lm.n_ctx)
    if work is not None:
        return _harvest(ctx, args, work, progress)
    with harvest_work(lm.model_id, sae.sae_id, args, root=work_dir) as own:
        return _harvest(ctx, args, own, progress)


def check_args(args: HarvestIn, n_ctx: int) -> None:
    """Refuse arguments that cannot work with a model of context ``n_ctx`` (before anything is written)."""
    if args.ctx > n_ctx:
        raise InputError(f"ctx {args.ctx} exceeds the model's context of {n_ctx} tokens: pass --ctx {n_ctx} "
                         "or less")
    if args.n_quantiles * args.per_quantile > args.reservoir:
        raise InputError(f"n_quantiles x per_quantile = {args.n_quantiles * args.per_quantile} exceeds reservoir "
                         f"{args.reservoir}: raise reservoir or sample fewer per quantile")


def _harvest(ctx: ToolContext, args: HarvestIn, owned: HarvestWork,
             progress: Callable[[int, int], None] | None) -> HarvestOut:
    from autoexplain.tools.data import iter_texts, iter_windows

    assert ctx.sink is not None
    lm, sae = ctx.model, ctx.sae(args.sae_id)
    work = owned.path
    windows = _Windows(work / "windows.i32", args.ctx)
    state_path = work / "state.pt"
    n_features = sae.d_sae
    state = _load_state(state_path, args) or _State.empty(n_features, args)
    resumed_from = state.batches_done
    windows.truncate(state.windows_done)
    total_batches = -(-args.n_tokens // (args.ctx * args.batch_size))
    t0 = time.perf_counter()
    stream = _prefetch(iter_windows(iter_texts(args.dataset), lm.tokenizer, ctx=args.ctx, n_ctx=lm.n_ctx,
                                    batch_windows=args.batch_size, max_tokens=args.n_tokens))
    for i, batch in enumerate(stream):
        if i < state.batches_done:
            continue  # finished before the interruption: tokenised again (cheap), not recomputed
        acts, mask = _batch_acts(lm, sae, batch.tokens, batch.valid)
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + i)  # per batch: resume-independent
        _update(state, acts, mask, state.windows_done, gen)
        windows.append(batch.tokens)
        state.windows_done += batch.n_windows
        state.n_tokens += int(mask.sum())  # the counted tokens: valid and not BOS
        state.batches_done = i + 1
        if progress:
            try:
                progress(state.batches_done, total_batches)
            except BaseException:  # a stop request: keep what is done, then stop
                windows.sync()
                _save_state(state_path, state, args)
                raise
        if state.batches_done % args.checkpoint_every == 0:
            windows.sync()
            _save_state(state_path, state, args)
    windows.sync()
    _save_state(state_path, state, args)
    t_stream = time.perf_counter()
    result = _finish(state, lm, sae, args, windows)
    result.harvest_id, result.inputs = owned.identity.harvest_id, owned.identity.inputs
    if state.n_tokens < SHORT_DATASET_FRACTION * args.n_tokens:
        result.note = (f"dataset {args.dataset!r} gave only {state.n_tokens:,} of the {args.n_tokens:,} tokens "
                       "asked for: its statistics and examples rest on that little text")
    seconds = time.perf_counter() - t0
    ctx.sink(result)
    shutil.rmtree(work, ignore_errors=True)
    dens = result.density
    alive = dens[dens > 0]
    qs = {f"p{q}": float(np.quantile(alive, q / 100)) for q in (10, 50, 90)} if alive.size else {}
    order = np.argsort(-dens)[:10]
    out = HarvestOut(sae_id=sae.sae_id, n_tokens=state.n_tokens, n_windows=state.windows_done,
                     n_features=n_features, n_dead=len(result.dead), resumed_from_batch=resumed_from,
                     seconds=round(seconds, 2), stream_seconds=round(t_stream - t0, 2),
                     finish_seconds=round(seconds - (t_stream - t0), 2), density_quantiles=qs,
                     densest=[(int(i), float(dens[i])) for i in order], harvest_id=result.harvest_id,
                     note=result.note)
    out._result = result
    return out


def _prefetch(it: Iterator[TokenWindows], depth: int = 2) -> Iterator[TokenWindows]:
    """Run ``it`` (reading and tokenising) in a background thread, ``depth`` items ahead of the model.

    Order is preserved and an exception from the producer (e.g. an InputError on a bad row) is raised here.
    """
    import queue
    import threading

    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("end", None))
        except BaseException as exc:  # handed to the consumer
            q.put(("error", exc))

    thread = threading.Thread(target=produce, daemon=True, name="harvest-prefetch")
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()


def _batch_acts(lm: LoadedModel, sae: LoadedSAE, tokens: torch.Tensor,
                valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature activations [B, T, F] (CPU float32) and the mask of counted tokens: valid and not BOS."""
    from autoexplain.tools.saes import feature_activations

    acts = feature_activations(lm, sae, tokens).float().cpu()
    mask = valid.clone()
    mask[:, 0] = False  # BOS (windows always start with it here)
    return acts, mask


def _save_state(path: Path, state: _State, args: HarvestIn) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"version": STATE_VERSION, "args": args.model_dump(), "state": state.to_dict()}, tmp)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _load_state(path: Path, args: HarvestIn) -> _State | None:
    if not path.exists():
        return None
    blob = torch.load(path, weights_only=True)
    same = {k: v for k, v in blob["args"].items() if k != "checkpoint_every"} == args.model_dump(
        exclude={"checkpoint_every"})
    if blob.get("version") != STATE_VERSION or not same:
        return None
    return _State(**blob["state"])


#: An example chosen for a feature: (feature, kind, example_id, quantile, window, position of the max or -1,
#: per-token activations of the window or None).
_Pick = tuple[int, ExampleKind, int, int | None, int, int, torch.Tensor | None]


def _finish(state: _State, lm: LoadedModel, sae: LoadedSAE, args: HarvestIn, windows: _Windows) -> HarvestResult:
    """Turn the state into per-feature statistics and examples."""
    n_tok = max(state.n_tokens, 1)
    count = state.fire_count.numpy()
    density = count / n_tok
    mean_act = np.where(count > 0, state.act_sum.numpy() / np.maximum(count, 1), 0.0)
    max_act = state.act_max.numpy().astype(np.float64)
    promote, suppress = _logit_effects(lm, sae, args.n_logits)
    vocab = lm.token_strs(range(lm.model.cfg.d_vocab))
    hist = state.hist.numpy()

    refs = [FeatureRef(sae_id=sae.sae_id, index=f) for f in range(sae.d_sae)]  # one per feature, shared
    features = [
        FeatureStats(feature=refs[f], density=float(density[f]), max_act=float(max_act[f]),
                     mean_act=float(mean_act[f]), n_tokens=int(state.n_tokens), hist_edges=HIST_EDGES,
                     hist_counts=hist[f].tolist(), top_logits=promote[f] if promote is not None else None,
                     bottom_logits=suppress[f] if suppress is not None else None)
        for f in range(sae.d_sae)]

    picks: list[_Pick] = []
    # the kept sets are unordered: rank top contexts by activation (ties: earlier window first)
    by_win = torch.argsort(state.top_win, dim=1, stable=True)
    top_order = by_win.gather(1, torch.argsort(-state.top_val.gather(1, by_win), dim=1, stable=True))
    pool_order = torch.argsort(state.pool_key)
    pool_win, pool_max = state.pool_win[pool_order], state.pool_max[pool_order]
    for f in range(sae.d_sae):
        for j, slot in enumerate(top_order[f].tolist()):
            if state.top_val[f, slot] > -torch.inf:
                picks.append((f, ExampleKind.TOP, j, None, int(state.top_win[f, slot]),
                              int(state.top_pos[f, slot]), state.top_acts[f, slot]))
        picks.extend(_quantile_picks(state, f, args))
        silent = [int(w) for w, m in zip(pool_win.tolist(), pool_max[:, f].tolist(), strict=True)
                  if w >= 0 and m == 0.0][: args.n_random]
        picks.extend((f, ExampleKind.RANDOM, j, None, w, -1, None) for j, w in enumerate(silent))

    win_ids = np.array(sorted({p[4] for p in picks}), dtype=np.int64)
    rows_by_win = dict(zip(win_ids.tolist(), windows.rows(win_ids), strict=True)) if win_ids.size else {}
    examples = []
    for f, kind, j, q, w, pos, acts in picks:
        toks = rows_by_win[w]
        lo, hi = (1, args.ctx) if pos < 0 else (max(1, pos - args.left), min(args.ctx, pos + args.right + 1))
        per_tok = [0.0] * (hi - lo) if acts is None else np.round(acts[lo:hi].double().numpy(), 4).tolist()
        examples.append(FeatureExample(feature=refs[f], kind=kind, example_id=j, quantile=q,
                                       tokens=[vocab[t] for t in toks[lo:hi].tolist()], acts=per_tok,
                                       max_act=max(per_tok) if per_tok else 0.0, window_index=w))
    return HarvestResult(sae_id=sae.sae_id, n_tokens=state.n_tokens, n_windows=state.windows_done,
                         density=density, max_act=max_act, mean_act=mean_act, features=features, examples=examples)


def _quantile_picks(state: _State, f: int, args: HarvestIn) -> Iterator[_Pick]:
    """Split feature ``f``'s uniform sample of activating windows into activation quantiles; take a few of each."""
    ok = torch.isfinite(state.res_key[f])
    if not ok.any():
        return
    idx = ok.nonzero().flatten()
    order = idx[torch.argsort(state.res_val[f, idx], stable=True)].tolist()
    keys = state.res_key[f].tolist()
    n_bins = min(args.n_quantiles, len(order))
    j = 0
    for q in range(n_bins):  # equal-count bins by activation, weakest first
        members = order[q * len(order) // n_bins : (q + 1) * len(order) // n_bins]
        for m in sorted(members, key=keys.__getitem__)[: args.per_quantile]:
            yield (f, ExampleKind.QUANTILE, j, q, int(state.res_win[f, m]), int(state.res_pos[f, m]),
                   state.res_acts[f, m])
            j += 1


def _logit_effects(lm: LoadedModel, sae: LoadedSAE,
                   n: int) -> tuple[list[list[LogitEffect]] | None, list[list[LogitEffect]] | None]:
    """Per feature, the ``n`` tokens whose logits the decoder row raises (lowers) most: ``W_dec @ W_U``."""
    if sae.site.kind not in _RESIDUAL_WRITERS:
        return None, None
    vocab = lm.token_strs(range(lm.model.cfg.d_vocab))
    w_u = lm.model.W_U.detach()
    promote: list[list[LogitEffect]] = []
    suppress: list[list[LogitEffect]] = []
    with torch.no_grad():
        for lo in range(0, sae.d_sae, 2048):
            eff = sae.sae.W_dec[lo : lo + 2048].to(w_u.dtype) @ w_u  # [chunk, vocab]
            top = torch.topk(eff, n, dim=1)
            bot = torch.topk(eff, n, dim=1, largest=False)
            for vals, ids in ((top.values, top.indices), (bot.values, bot.indices)):
                rows = [[(vocab[i], round(v, 4)) for i, v in zip(r_i, r_v, strict=True)]
                        for r_i, r_v in zip(ids.tolist(), vals.tolist(), strict=True)]
                (promote if vals is top.values else suppress).extend(rows)
    return promote, suppress


TOOLS = (
    ToolSpec(name="harvest", input_model=HarvestIn, output_model=HarvestOut, fn=harvest, cost=Cost.DATASET,
             description="Stream a dataset through the model and an SAE once and record, for every feature: "
                         "top activating contexts, samples across activation quantiles, non-activating "
                         "contexts, firing density, max/mean activation, a histogram, and the tokens its decoder "
                         "direction promotes or suppresses. Results go to the features and feature_examples "
                         "tables. Association-level evidence: where a feature fires, not what it causes. "
                         "Expensive: run once per SAE and dataset, then read the stored examples."),
)
