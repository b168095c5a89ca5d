"""Sharded harvest: split one harvest's batches across workers, then merge their partial states exactly.

A harvest (:mod:`autoexplain.tools.harvest`) is one pass over a stream of token batches. Here the stream is cut into
**shards**: contiguous ranges of batch indices ``[first_batch, stop_batch)`` (the last one open-ended, to the end of
the data). Each worker runs :func:`harvest_shard` on its shard and returns a :class:`ShardPartial` (picklable; or
saved with :meth:`ShardPartial.save`): the same running state a single pass keeps — fire counts, histograms, maxima,
activation sums, kept top-k sets, priority samples, random pool — over its batches only, with *global* window
indices, plus the tokens of its windows. :func:`finish_shards` merges the partials in shard order and hands the
result to the sink exactly as a single pass would: **the stored rows equal those of one pass, byte for byte**
(tested on planted and toy SAEs with 2 and 3 uneven shards).

How each statistic merges exactly
---------------------------------
* counts, histograms, token and window counts: integer sums; maxima: ``max`` (exact, any order).
* **activation sums** (for the mean): float64 addition is not associative, so a running sum per shard would differ
  from one pass in the last bit. The pass sums per batch and combines the batch sums pairwise in a tree fixed by the
  global batch index (:func:`~autoexplain.tools.harvest._push_sum`); a shard's partial holds its maximal aligned
  blocks, and pushing the shards' blocks in order rebuilds the very tree (and bits) of one pass.
* **top-k contexts, priority samples, random pool**: each is "the best ``K`` under a total order" — (activation,
  window) for top-k, (random key, window) for the samples and the pool, ties by a fixed scramble of the window
  index (:func:`~autoexplain.tools.harvest._tie_rank`) — which is a
  function of the candidates alone, so best-K of the union of the shards' best-K sets is the pass's set. The random
  keys are drawn per batch from a generator seeded by the global batch index (never by the shard, the worker or
  the position in a shard's loop), so each (feature, window) gets the same key in any shard. That is why shards
  are cut at batch boundaries: a batch's keys are drawn for the whole batch at once.
* everything the finish derives (example order, quantile bins, non-activating windows) reads the kept sets in that
  canonical order, never in the order of their storage slots.

For an executor (e.g. Ray)
--------------------------
::

    shards = plan_shards(args, n_workers)                   # or plan_shards(args, bounds=[0, 40, 70])
    partials = [harvest_shard(lm, sae, args, s) for s in shards]   # one per worker, any order, any machine
    out = finish_shards(ctx, args, partials)                  # one process: merge, assemble, store

Each worker needs the model, the SAE and the dataset; it tokenises the stream from the start and skips the batches
before its shard (tokenising is cheap next to the model; the skipped batches' window counts give its global window
offset). A shard is not checkpointed: a failed worker reruns its shard (the result is deterministic). The partial
of a shard holds the full-width state (about 0.57 GB at 98,304 features with the defaults) and its windows' tokens
(4 bytes a token); the merge holds the merged state and one partial at a time. Window tokens of all shards are
written to the merging process's work folder for the finish, which then proceeds as a single pass's (bounded
chunks, logit effects, one store transaction).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from autoexplain.tools.errors import InputError
from autoexplain.tools.harvest import (
    BatchFolder,
    HarvestIn,
    HarvestOut,
    HarvestWork,
    _best_order,
    _LogitTables,
    _push_sum,
    _State,
    _Windows,
    check_args,
    deliver,
    harvest_work,
    map_large_blocks,
)
from autoexplain.tools.registry import ToolContext

if TYPE_CHECKING:
    from autoexplain.tools.models import LoadedModel
    from autoexplain.tools.saes import LoadedSAE

#: Rows of the kept sets merged at once (bounds the [rows, 2K] temporaries of a wide SAE).
MERGE_ROWS = 8192


@dataclass(frozen=True)
class Shard:
    """Batches ``first_batch .. stop_batch - 1`` of a harvest's stream (``stop_batch`` None: to the end)."""

    index: int
    n_shards: int
    first_batch: int
    stop_batch: int | None


def total_batches(args: HarvestIn) -> int:
    """How many batches the harvest's token budget can fill (fewer when the dataset runs out first)."""
    return -(-args.n_tokens // (args.ctx * args.batch_size))


def plan_shards(args: HarvestIn, n_shards: int | None = None, *, bounds: Sequence[int] | None = None) -> list[Shard]:
    """Cut the harvest's batches into ``n_shards`` near-equal contiguous shards, or at explicit batch ``bounds``
    (``[0, b1, b2, ...]``: shard ``i`` is ``bounds[i] .. bounds[i+1] - 1``, the last to the end of the data). The
    last shard is always open-ended, so a dataset that gives more or fewer batches than the budget's estimate is
    still covered whole."""
    if bounds is None:
        if n_shards is None or n_shards < 1:
            raise InputError(f"n_shards must be at least 1, got {n_shards}")
        total = total_batches(args)
        bounds = [total * i // n_shards for i in range(n_shards)]
    bounds = list(bounds)
    if not bounds or bounds[0] != 0 or any(b > a for a, b in zip(bounds[1:], bounds, strict=False)):
        raise InputError(f"shard bounds must start at 0 and not decrease, got {bounds}")
    n = len(bounds)
    return [Shard(index=i, n_shards=n, first_batch=bounds[i], stop_batch=bounds[i + 1] if i + 1 < n else None)
            for i in range(n)]


@dataclass
class ShardPartial:
    """What one shard's worker returns: its running state (global window indices) and its windows' tokens."""

    shard: Shard
    model_id: str
    sae_id: str
    args: dict[str, Any]  # HarvestIn.model_dump() of the harvest (every shard must have the same)
    first_window: int  # global index of the shard's first window
    reached_end: bool  # the data ended inside (or before) this shard
    state: _State
    windows: np.ndarray  # [state.windows_done, ctx] int32

    def save(self, path: Path) -> None:
        """Write the partial to one file (``torch.save``; read back with :meth:`load`)."""
        torch.save({"shard": self.shard.__dict__, "model_id": self.model_id, "sae_id": self.sae_id,
                    "args": self.args, "first_window": self.first_window, "reached_end": self.reached_end,
                    "state": self.state.to_dict(), "windows": torch.from_numpy(self.windows)}, path)

    @classmethod
    def load(cls, path: Path) -> ShardPartial:
        blob = torch.load(path, weights_only=True)
        return cls(shard=Shard(**blob["shard"]), model_id=blob["model_id"], sae_id=blob["sae_id"],
                   args=blob["args"], first_window=blob["first_window"], reached_end=blob["reached_end"],
                   state=_State(**blob["state"]), windows=blob["windows"].numpy())


def harvest_shard(lm: LoadedModel, sae: LoadedSAE, args: HarvestIn, shard: Shard) -> ShardPartial:
    """Run the batches of ``shard`` through model and SAE (a worker's whole job); see the module doc."""
    from autoexplain.tools.data import iter_texts, iter_windows

    check_args(args, lm.n_ctx, sae)
    map_large_blocks()
    state = _State.empty(sae.d_sae, args)
    first_window = 0
    tokens: list[np.ndarray] = []
    reached_end = True
    with BatchFolder(lm, sae, args, state) as folder:
        for i, batch in enumerate(iter_windows(iter_texts(args.dataset), lm.tokenizer, ctx=args.ctx,
                                               n_ctx=lm.n_ctx, batch_windows=args.batch_size,
                                               max_tokens=args.n_tokens)):
            if shard.stop_batch is not None and i >= shard.stop_batch:
                reached_end = False
                break
            if i < shard.first_batch:
                first_window += batch.n_windows  # tokenised to count its windows, not run
                continue
            folder.fold(batch, i, offset=first_window)
            tokens.append(batch.tokens.to(torch.int32).numpy())
    state.batches_done = max(state.batches_done, shard.first_batch)
    wins = np.concatenate(tokens) if tokens else np.zeros((0, args.ctx), dtype=np.int32)
    return ShardPartial(shard=shard, model_id=lm.model_id, sae_id=sae.sae_id, args=args.model_dump(),
                        first_window=first_window, reached_end=reached_end, state=state, windows=wins)


def _merge_best(a: list[torch.Tensor], b: list[torch.Tensor], largest: bool) -> list[torch.Tensor]:
    """Best ``K`` per row of two kept sets: ``a`` and ``b`` are ``[keys, wins, *payload]`` ([F, K] keys and
    windows, payloads [F, K, ...]); ties by window (the order :func:`_admit` keeps)."""
    k = a[0].shape[1]
    out = [x.clone() for x in a]
    for lo in range(0, a[0].shape[0], MERGE_ROWS):
        hi = min(lo + MERGE_ROWS, a[0].shape[0])
        cat = [torch.cat([x[lo:hi], y[lo:hi]], 1) for x, y in zip(a, b, strict=True)]
        sel = _best_order(cat[0], cat[1], largest)[:, :k]
        for o, c in zip(out, cat, strict=True):
            idx = sel.view(*sel.shape, *([1] * (c.dim() - 2))).expand(-1, -1, *c.shape[2:])
            o[lo:hi] = c.gather(1, idx)
    return out


def merge_partials(partials: Sequence[ShardPartial], args: HarvestIn, n_features: int) -> tuple[_State, np.ndarray]:
    """The state of one pass over all the shards' batches, and all windows' tokens in global order. Refuses
    partials of other arguments, or shards that do not tile the stream (gaps, overlaps, out of order)."""
    if not partials:
        raise InputError("no shard partials to merge")
    want = args.model_dump()
    parts = sorted(partials, key=lambda p: p.shard.index)
    state = _State.empty(n_features, args)
    windows: list[np.ndarray] = []
    ended = False
    for k, p in enumerate(parts):
        if p.args != want or p.sae_id != parts[0].sae_id or p.model_id != parts[0].model_id:
            raise InputError(f"shard {p.shard.index} was harvested with other arguments, model or SAE")
        if p.state.fire_count.shape[0] != n_features:
            raise InputError(f"shard {p.shard.index} has {p.state.fire_count.shape[0]} features, not {n_features}")
        if p.shard.index != k or p.shard.n_shards != len(parts):
            raise InputError(f"shards must be 0 .. {len(parts) - 1} of one plan, got shard {p.shard.index} of "
                             f"{p.shard.n_shards}")
        if k and parts[k - 1].shard.stop_batch != p.shard.first_batch:
            raise InputError(f"shard {k} starts at batch {p.shard.first_batch}, not where shard {k - 1} stopped")
        if ended and p.state.windows_done:
            raise InputError(f"shard {k} has windows after the data ended in an earlier shard")
        if p.first_window != state.windows_done and p.state.windows_done:
            raise InputError(f"shard {k} starts at window {p.first_window}, not {state.windows_done}")
        s = p.state
        state.fire_count += s.fire_count
        state.hist += s.hist
        state.act_max = torch.maximum(state.act_max, s.act_max)
        for start, length, val in zip(s.sum_start, s.sum_len, s.sum_val, strict=True):
            _push_sum(state, start, length, val)
        state.top_val, state.top_win, state.top_pos, state.top_acts = _merge_best(
            [state.top_val, state.top_win, state.top_pos, state.top_acts],
            [s.top_val, s.top_win, s.top_pos, s.top_acts], largest=True)
        state.res_key, state.res_win, state.res_val, state.res_pos, state.res_acts = _merge_best(
            [state.res_key, state.res_win, state.res_val, state.res_pos, state.res_acts],
            [s.res_key, s.res_win, s.res_val, s.res_pos, s.res_acts], largest=False)
        pool = _merge_best([state.pool_key[None, :], state.pool_win[None, :], state.pool_fires[None]],
                           [s.pool_key[None, :], s.pool_win[None, :], s.pool_fires[None]], largest=False)
        state.pool_key, state.pool_win, state.pool_fires = pool[0][0], pool[1][0], pool[2][0]
        state.n_tokens += s.n_tokens
        state.windows_done += s.windows_done
        state.batches_done = max(state.batches_done, s.batches_done)
        windows.append(p.windows)
        ended = ended or p.reached_end
    if not ended:
        raise InputError("the last shard did not reach the end of the data: its stop_batch must be None")
    return state, np.concatenate(windows)


def finish_shards(ctx: ToolContext, args: HarvestIn, partials: Sequence[ShardPartial], *,
                  work: HarvestWork | None = None, work_dir: Path | None = None,
                  started: float | None = None) -> HarvestOut:
    """Merge the shards' partials and store the result through ``ctx.sink``, exactly as one pass would (same
    harvest id, rows and summary). ``work``: the harvest's work folder if the caller owns it already
    (:func:`~autoexplain.tools.harvest.harvest_work`), else it is taken here (under ``work_dir`` if given)."""
    if ctx.sink is None:
        raise InputError("harvest needs somewhere to store its results: pass a database (--db)")
    lm, sae = ctx.model, ctx.sae(args.sae_id)
    check_args(args, lm.n_ctx, sae)
    t0 = time.perf_counter() if started is None else started
    if work is None:
        with harvest_work(lm.model_id, sae.sae_id, args, root=work_dir) as own:
            return _finish_in(ctx, args, partials, own, t0)
    return _finish_in(ctx, args, partials, work, t0)


def _finish_in(ctx: ToolContext, args: HarvestIn, partials: Sequence[ShardPartial], work: HarvestWork,
               t0: float) -> HarvestOut:
    import shutil

    lm, sae = ctx.model, ctx.sae(args.sae_id)
    if any(p.model_id != lm.model_id or p.sae_id != sae.sae_id for p in partials):
        raise InputError("shard partials come from another model or SAE than this harvest's")
    logits = _LogitTables(lm, sae, args)
    logits.start()  # overlaps the merge
    state, tokens = merge_partials(partials, args, sae.d_sae)
    windows = _Windows(work.path / "windows.i32", args.ctx)
    windows.truncate(0)
    windows.append(torch.from_numpy(tokens))
    out = deliver(ctx, args, state, windows, work.identity, started=t0, logits=logits)
    shutil.rmtree(work.path, ignore_errors=True)
    return out


def harvest_sharded(ctx: ToolContext, args: HarvestIn, n_shards: int | None = None, *,
                    bounds: Sequence[int] | None = None, work_dir: Path | None = None) -> HarvestOut:
    """The reference executor: every shard in this process, one after another, then :func:`finish_shards`
    (what a distributed executor does with one worker per shard)."""
    lm, sae = ctx.model, ctx.sae(args.sae_id)
    t0 = time.perf_counter()
    partials = [harvest_shard(lm, sae, args, s) for s in plan_shards(args, n_shards, bounds=bounds)]
    return finish_shards(ctx, args, partials, work_dir=work_dir, started=t0)
