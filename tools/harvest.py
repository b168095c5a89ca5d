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
The finished harvest is a :class:`HarvestResult`: per-feature arrays (density, max, mean) and a stream of
feature-complete :class:`HarvestChunk` values holding per-feature :class:`FeatureStats` and the examples
(:class:`ExampleColumns`: column lists, no object per example unless one asks for :attr:`HarvestChunk.examples`;
hundreds of thousands of examples are built without per-row validation). It goes to ``ctx.sink`` (a
:class:`HarvestSink`), which pulls the chunks; tools know nothing of tables: the store turns the results into
rows (:mod:`autoexplain.agent.store.harvest`), chunk by chunk in one transaction.

Memory
------
Nothing grows with the dataset, and nothing but the running state grows with the SAE's width:

* the pass encodes each batch a block of features at a time (:data:`FEATURE_BLOCK_BYTES` of dense activations;
  token sub-batches of full width, :data:`ENCODE_BYTES`, for TopK-like architectures) and keeps only the non-zero
  entries (:class:`_Firings`); no ``[batch, ctx, d_sae]`` tensor exists;
* the fold works on the (window, feature) pairs that fire (:func:`_update`, :func:`_admit`): no ``[batch,
  d_sae]`` tensor either, and its cost follows the firings, not the width;
* the state keeps, per kept example, the ``left + right + 1`` activations around its max (all an example shows),
  not the whole window, and the random pool as firing flags: about 0.57 GB at 98,304 features with the defaults;
* the finish does not hold the state: it reads the final checkpoint memory-mapped, anew for each chunk of
  features (:func:`deliver`), so the state's memory goes back to the system when the pass ends;
* the finish assembles, and the sink writes, :data:`EXAMPLES_PER_CHUNK` examples at a time as numpy columns
  (:class:`ExampleColumns`: no Python object per example or token), the next chunk prepared in a background
  thread while the sink writes this one; logit effects are kept as top-``n_logits`` index/value arrays (a few
  MB), computed on another background thread while the pass runs (:class:`_LogitTables`), one feature range at a
  time.

The result is bit-identical to encoding whole batches and assembling everything at once (same random keys, drawn
per batch; same example order; the CPU sgemm gives each entry the same bits whatever the block or sub-batch; see
:func:`_batch_firings`).

Shards
------
Every kept set is "the best ``K`` under a total order" (ties by window: :func:`_admit`), every random key
is seeded by the global batch index, and activation sums are added pairwise in a tree fixed by batch indices
(:func:`_push_sum`). So the pass can be split into shards of consecutive batches run by separate workers and merged
into exactly the state of one pass: :mod:`autoexplain.tools.harvest_merge` (result version 2; version 1 broke
ties as ``torch.topk`` happened to, and summed activations in one running float64 sum, which differs from the
pairwise sum in the last bit of ``mean_act``).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
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
from autoexplain.tools.prefetch import prefetch
from autoexplain.tools.registry import Cost, ToolContext, ToolOutput, ToolSpec
from autoexplain.tools.vocab import CausalLevel, FeatureRef, SiteKind

if TYPE_CHECKING:
    from autoexplain.tools.models import LoadedModel
    from autoexplain.tools.saes import LoadedSAE

#: Histogram bin edges (activation values); counts has one more bin below the first edge and one above the last.
HIST_EDGES: tuple[float, ...] = tuple(float(x) for x in np.logspace(-3, 3, 25))
_RESIDUAL_WRITERS = {SiteKind.RESID_PRE, SiteKind.RESID_MID, SiteKind.RESID_POST, SiteKind.ATTN_OUT,
                     SiteKind.MLP_OUT}
#: The checkpoint layout (2: per-token activations kept as the example slice, not the whole window; pool as
#: firing flags; 3: activation sums as pairwise blocks over batch indices, see _push_sum). A checkpoint of
#: another version is not resumed: the pass starts again.
STATE_VERSION = 3
#: What a harvest's results mean, part of its identity (:func:`harvest_identity`): bumped only when the same inputs
#: would give other rows, not when the checkpoint layout changes.
#: 2: ties among kept examples broken by window (the earlier kept), sums pairwise over batches (shard-exact).
RESULT_VERSION = 2
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
    finish_seconds: float = Field(description="once per SAE: example assembly and the sink storing it "
                                            "(interleaved, chunk by chunk), plus any logit effects (W_dec @ W_U, "
                                            "on a background thread during the pass) not done when it ended")
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
def _slice_len(args: HarvestIn) -> tuple[int, int]:
    """(tokens kept before the max, slice length) of the per-token activations the state keeps per example.

    Examples only ever show ``left`` tokens before the max and ``right`` after it, so the state keeps that slice,
    not the whole window: ``[F, K, left + right + 1]`` float16 instead of ``[F, K, ctx]`` (``left``/``right`` past
    the window are clamped, as no example can show more than the window)."""
    lc, rc = min(args.left, args.ctx - 1), min(args.right, args.ctx - 1)
    return lc, lc + rc + 1


@dataclass
class _State:
    """Everything the streaming pass accumulates: O(features x (top_k + reservoir) x (left + right + 1)), not
    O(dataset) and not O(ctx). For an SAE of 98,304 features with the defaults that is about 0.57 GB, most of it
    the per-token activation slices (float16)."""

    batches_done: int
    windows_done: int
    n_tokens: int
    fire_count: torch.Tensor  # [F] int64
    # sums of activations: per maximal aligned block of batches [start, start + len) (see _push_sum), [F] float64
    sum_start: list[int]
    sum_len: list[int]
    sum_val: list[torch.Tensor]
    act_max: torch.Tensor  # [F]
    hist: torch.Tensor  # [F, len(HIST_EDGES)+1] int64
    top_val: torch.Tensor  # [F, K]  (-inf = empty)
    top_win: torch.Tensor  # [F, K] int64 global window index
    top_pos: torch.Tensor  # [F, K] int64
    top_acts: torch.Tensor  # [F, K, L] float16: positions pos - left ... pos + right (see _slice_len)
    res_key: torch.Tensor  # [F, R]  (+inf = empty)
    res_val: torch.Tensor
    res_win: torch.Tensor
    res_pos: torch.Tensor
    res_acts: torch.Tensor  # [F, R, L] float16
    pool_key: torch.Tensor  # [P]
    pool_win: torch.Tensor  # [P]
    pool_fires: torch.Tensor  # [P, F] bool: does the feature fire anywhere in the pooled window

    @classmethod
    def empty(cls, n_features: int, args: HarvestIn) -> _State:
        f, k, r, p = n_features, args.top_k, args.reservoir, args.random_pool
        _, n = _slice_len(args)
        return cls(
            batches_done=0, windows_done=0, n_tokens=0,
            fire_count=torch.zeros(f, dtype=torch.int64), sum_start=[], sum_len=[], sum_val=[],
            act_max=torch.zeros(f), hist=torch.zeros(f, len(HIST_EDGES) + 1, dtype=torch.int64),
            top_val=torch.full((f, k), -torch.inf), top_win=torch.full((f, k), -1, dtype=torch.int64),
            top_pos=torch.zeros(f, k, dtype=torch.int64), top_acts=torch.zeros(f, k, n, dtype=torch.float16),
            res_key=torch.full((f, r), torch.inf), res_val=torch.zeros(f, r),
            res_win=torch.full((f, r), -1, dtype=torch.int64), res_pos=torch.zeros(f, r, dtype=torch.int64),
            res_acts=torch.zeros(f, r, n, dtype=torch.float16),
            pool_key=torch.full((p,), torch.inf), pool_win=torch.full((p,), -1, dtype=torch.int64),
            pool_fires=torch.zeros(p, f, dtype=torch.bool),
        )

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def act_sum(self) -> torch.Tensor:
        """[F] float64: every feature's sum of activations, the blocks' sums added left to right."""
        total = torch.zeros(self.fire_count.shape[0], dtype=torch.float64)
        for i, val in enumerate(self.sum_val):
            total = val.clone() if i == 0 else total + val
        return total


def _push_sum(state: _State, start: int, length: int, val: torch.Tensor) -> None:
    """Add the activation sums ``val`` of batches ``start .. start + length - 1`` (an aligned block) to the state.

    The sum over batches is pairwise in a fixed tree over *global* batch indices: two adjacent blocks of equal
    length ``n``, the left one starting at a multiple of ``2n``, are replaced by their sum (left + right). So every
    float64 addition is fixed by the batch indices alone, and a sharded harvest whose shards push their blocks in
    order gets the same bits as one pass (floating-point addition is not associative: a plain running sum would
    differ in the last bit). The stack holds O(log batches) blocks."""
    state.sum_start.append(start)
    state.sum_len.append(length)
    state.sum_val.append(val)
    while len(state.sum_len) >= 2:
        ls, ll, rs, rl = state.sum_start[-2], state.sum_len[-2], state.sum_start[-1], state.sum_len[-1]
        if not (ll == rl and ls % (2 * ll) == 0 and rs == ls + ll):
            break
        right = state.sum_val.pop()
        state.sum_start.pop()
        state.sum_len.pop()
        state.sum_val[-1] = state.sum_val[-1] + right
        state.sum_len[-1] = 2 * ll


def _admit(keys: torch.Tensor, kept_win: torch.Tensor, row: torch.Tensor, key: torch.Tensor, win: torch.Tensor,
           largest: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which candidates enter per-row sets of ``K`` best keys, and which slots they evict.

    ``keys`` [F, K] is the kept set (unordered) and ``kept_win`` [F, K] the windows of its entries (-1: empty).
    Candidates are sparse: candidate ``i`` offers key ``key[i]`` of window ``win[i]`` to row ``row[i]`` (a row's
    candidates have distinct windows; any order). Returns flat index triples ``(row, slot, i)``: candidate ``i``
    replaces slot ``slot`` of ``row``. Survivors stay where they are, so per-batch data movement is proportional to
    the entries that change, not to the whole store; entering candidates take the evicted slots in order (the
    lowest window the lowest evicted slot).

    Ties are broken by window (:func:`_tie_rank`: a fixed scramble of its index): the kept set is the best ``K``
    under the total order (key, tie rank), a function of the candidates alone — whatever batches or shards they
    come in (:mod:`autoexplain.tools.harvest_merge` relies on this; ``torch.topk`` alone picks among equal keys as it
    likes). An empty slot (window -1) beats a candidate of the same sentinel key, so a sentinel never enters.

    Cost: only candidates that can enter are looked at (better than, or tied with, their row's worst kept key:
    after warm-up, few), and nothing of size features x batch is built. Their rows are merged with their kept sets
    in dense blocks of rows with similar candidate counts (:func:`_count_blocks`), so a feature firing in every
    window of a batch does not widen the blocks of the many that fire in one."""
    empty = torch.empty(0, dtype=torch.long)
    if row.numel() == 0:
        return empty, empty, empty
    if largest:
        worst = keys.min(1).values[row]
        can = (key > worst) | ((key == worst) & torch.isfinite(worst))
    else:
        worst = keys.max(1).values[row]
        can = (key < worst) | ((key == worst) & torch.isfinite(worst))
    idx = can.nonzero().flatten()
    if idx.numel() == 0:
        return empty, empty, empty
    # candidates in (row, window) order: the columns of a row's dense block
    idx = idx[torch.argsort(win[idx], stable=True)]
    idx = idx[torch.argsort(row[idx], stable=True)]
    live, counts = torch.unique_consecutive(row[idx], return_counts=True)
    col = torch.arange(idx.numel()) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    row_pos = torch.repeat_interleave(torch.arange(live.numel()), counts)  # each candidate's row, in live
    sentinel = -torch.inf if largest else torch.inf
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    # rows with at least as many empty slots as candidates (warm-up: most) need no merge: every candidate enters
    # and they take the last empty slots, as the merge would give them (it keeps the first empty slots, which
    # come first among equal sentinel keys)
    free = ((kept_win < 0) & (keys == sentinel))[live]  # [rows, K] (flags first: no int64 gather)
    easy = counts <= free.sum(1)
    if bool(easy.any()):
        er = easy.nonzero().flatten()
        fr = free[er]
        take = fr & (fr.flip(1).cumsum(1).flip(1) <= counts[er][:, None])  # the last counts[r] empty slots
        r_loc, slot = take.nonzero(as_tuple=True)  # row-major: rows as candidates are, slots ascending
        parts.append((live[er][r_loc], slot, idx[easy[row_pos]]))
    for block in _count_blocks(counts, (~easy).nonzero().flatten()):
        local = torch.full((live.numel(),), -1, dtype=torch.long)
        local[block] = torch.arange(block.numel())
        lr = local[row_pos]
        mine = (lr >= 0).nonzero().flatten()
        lr, c, ci = lr[mine], col[mine], idx[mine]
        width = int(counts[block].max())
        ck = torch.full((block.numel(), width), sentinel, dtype=keys.dtype)
        cw = torch.zeros(block.numel(), width, dtype=torch.long)  # padding: sentinel key, so it never enters
        cid = torch.full((block.numel(), width), -1, dtype=torch.long)
        ck[lr, c], cw[lr, c], cid[lr, c] = key[ci].to(keys.dtype), win[ci], ci
        r, slots, news = _admit_rows(keys, kept_win, live[block], ck, cw, largest)
        parts.append((live[block][r], slots, cid[r, news]))
    if not parts:
        return empty, empty, empty
    return tuple(torch.cat(p) for p in zip(*parts, strict=True))  # type: ignore[return-value]


#: Rows of the kept sets that :func:`_admit` merges at once (bounds its [rows, K + candidates] temporaries).
_ADMIT_ROWS = 8192


def _count_blocks(counts: torch.Tensor, which: torch.Tensor) -> Iterator[torch.Tensor]:
    """The row positions ``which`` grouped by their number of candidates ``counts[which]`` (1, 2, 3-4, 5-8, ...),
    in blocks of at most :data:`_ADMIT_ROWS` rows: the dense merge of a block is as wide as its widest row."""
    level = torch.ceil(torch.log2(counts[which].double())).long()
    for lv in torch.unique(level).tolist():
        rows = which[level == lv]
        for i in range(0, rows.numel(), _ADMIT_ROWS):
            yield rows[i : i + _ADMIT_ROWS]


def _tie_rank(wins: torch.Tensor) -> torch.Tensor:
    """How ties between equal keys are broken: by a fixed scramble of the global window index (a bijection of
    indices below 2^32: multiplication by an odd constant modulo 2^32), so a feature whose activation is the same
    in many windows keeps a spread of them, not the first ones of the dataset; empty slots (window -1) first."""
    return torch.where(wins < 0, torch.full_like(wins, -1), (wins * 2654435761) % 2**32)


def _best_order(keys: torch.Tensor, wins: torch.Tensor, largest: bool) -> torch.Tensor:
    """Per row, the column order of ``keys`` best first (largest or smallest), ties by :func:`_tie_rank`."""
    by_win = torch.argsort(_tie_rank(wins), dim=1, stable=True)
    return by_win.gather(1, torch.argsort(keys.gather(1, by_win), dim=1, stable=True, descending=largest))


def _admit_rows(keys: torch.Tensor, kept_win: torch.Tensor, live: torch.Tensor, cand: torch.Tensor,
                cand_win: torch.Tensor, largest: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The dense merge behind :func:`_admit`: rows ``live`` of the kept sets against candidates ``cand`` [rows, C]
    of windows ``cand_win`` [rows, C], columns in window order. Returns ``(local row, slot, column)`` triples."""
    k = keys.shape[1]
    wins = torch.cat([kept_win[live], cand_win], 1)
    sel = _best_order(torch.cat([keys[live], cand], 1), wins, largest)[:, :k]
    chosen = torch.zeros(len(live), k + cand.shape[1], dtype=torch.bool)
    chosen.scatter_(1, sel, True)
    kept, entering = chosen[:, :k], chosen[:, k:]
    n_new = entering.sum(1)
    # evicted slots and entering candidates, each listed first per row (stable), paired by rank
    width = min(k, cand.shape[1])
    slots = torch.argsort(kept.to(torch.int8), dim=1, stable=True)[:, :width]
    news = torch.argsort((~entering).to(torch.int8), dim=1, stable=True)[:, :width]
    take = torch.arange(width)[None, :] < n_new[:, None]
    rows = torch.arange(len(live))[:, None].expand_as(take)[take]
    return rows, slots[take], news[take]


@dataclass
class _Firings:
    """One batch's counted feature activations in sparse form: entry ``i`` is feature ``f[i]`` firing with
    ``val[i]`` at position ``t[i]`` of window ``b[i]``, in row-major (b, t, f) order — the order
    ``dense.nonzero()`` gives — with BOS and padding already dropped. ``shape`` is (B, T, F) of the dense batch."""

    b: torch.Tensor
    t: torch.Tensor
    f: torch.Tensor
    val: torch.Tensor  # float32
    shape: tuple[int, int, int]


def _update(state: _State, fired: _Firings, mask: torch.Tensor, win_offset: int, gen: torch.Generator,
            args: HarvestIn, batch: int) -> None:
    """Fold one batch (global index ``batch``) of firings into the state; ``mask`` [B, T] marks the counted tokens.

    Works on the non-zero entries only: the statistics cost O(firings), and nothing of size B x T x F or B x F is
    built — the kept sets see the batch as (window, feature) pairs where the feature fires, each with its max in
    the window and the first position reaching it (:func:`_admit`). The per-token activations of an admitted pair
    are rebuilt from the firings, as the ``left + right + 1`` slice around the window's max.
    """
    b, t, f = fired.shape
    nz_b, nz_t, nz_f, vals = fired.b, fired.t, fired.f, fired.val
    state.fire_count += torch.bincount(nz_f, minlength=f)
    _push_sum(state, batch, 1, torch.bincount(nz_f, weights=vals.double(), minlength=f))
    bins = torch.bucketize(vals, torch.tensor(HIST_EDGES, dtype=vals.dtype))
    state.hist.view(-1).index_add_(0, nz_f * state.hist.shape[1] + bins, torch.ones_like(nz_f))
    # per (window, feature) pair that fires: the max (at least 0, as the dense maxima it replaces) and the first
    # position reaching it
    cells, pair = torch.unique(nz_b * f + nz_f, return_inverse=True)
    p_b, p_f = cells // f, cells % f
    p_max = torch.zeros(cells.numel(), dtype=vals.dtype).scatter_reduce_(0, pair, vals, reduce="amax")
    at_max = vals == p_max[pair]
    p_arg = torch.full((cells.numel(),), t, dtype=torch.int64).scatter_reduce_(0, pair[at_max], nz_t[at_max],
                                                                                 reduce="amin")
    p_arg.masked_fill_(p_arg == t, 0)
    state.act_max.scatter_reduce_(0, p_f, p_max, reduce="amax")
    left, width = _slice_len(args)

    def per_token(sel: torch.Tensor) -> torch.Tensor:
        """[n, width] float16: the activations of pair ``sel[i]`` at positions ``p_arg[sel[i]] - left ...``
        (0 where it does not fire, outside the window, at BOS and padding)."""
        out = torch.zeros(len(sel), width, dtype=torch.float16)
        if len(sel) == 0:
            return out
        which = torch.full((cells.numel(),), -1, dtype=torch.int64)
        which[sel] = torch.arange(len(sel))
        which = which[pair]
        hit = (which >= 0).nonzero().flatten()
        which = which[hit]
        rel = nz_t[hit] - p_arg[sel][which] + left
        ok = (rel >= 0) & (rel < width)
        out[which[ok], rel[ok]] = vals[hit[ok]].to(torch.float16)
        return out

    fires = (p_max > 0).nonzero().flatten()  # pairs where the feature fires (a negative max never counts)
    p_win = win_offset + p_b
    # running top-k by window max
    rows, slots, i = _admit(state.top_val, state.top_win, p_f[fires], p_max[fires], p_win[fires], True)
    sel = fires[i]
    _put(rows, slots, (state.top_val, p_max[sel]), (state.top_win, p_win[sel]), (state.top_pos, p_arg[sel]),
         (state.top_acts, per_token(sel)))
    # priority sample of activating windows: uniform, without replacement (keys drawn for every (feature, window)
    # of the batch at once: the same draws whatever the sub-batching of the encoder)
    keys = torch.rand((f, b), generator=gen)[p_f[fires], p_b[fires]]
    rows, slots, i = _admit(state.res_key, state.res_win, p_f[fires], keys, p_win[fires], False)
    sel = fires[i]
    _put(rows, slots, (state.res_key, keys[i]), (state.res_val, p_max[sel]), (state.res_win, p_win[sel]),
         (state.res_pos, p_arg[sel]), (state.res_acts, per_token(sel)))
    # a uniform pool of windows, for non-activating examples
    pkeys = torch.rand(b, generator=gen)
    cand_win = win_offset + torch.arange(b)
    _, slots, bb = _admit(state.pool_key[None, :], state.pool_win[None, :], torch.zeros(b, dtype=torch.long), pkeys,
                          cand_win, False)
    state.pool_key[slots] = pkeys[bb]
    state.pool_win[slots] = cand_win[bb]
    slot_of = torch.full((b,), -1, dtype=torch.long)
    slot_of[bb] = torch.arange(bb.numel())
    s = slot_of[p_b]
    on = ((s >= 0) & (p_max != 0)).nonzero().flatten()
    pooled = torch.zeros(bb.numel(), f, dtype=torch.bool)
    pooled[s[on], p_f[on]] = True
    state.pool_fires[slots] = pooled


def _put(rows: torch.Tensor, slots: torch.Tensor, *pairs: tuple[torch.Tensor, torch.Tensor]) -> None:
    """``dest[rows, slots] = src`` for each ``(dest, src)`` of ``[F, K, ...]`` kept-set tensors, as one
    ``index_copy_`` over the flattened first two dimensions (cheaper than advanced-index assignment)."""
    for dest, src in pairs:
        k = dest.shape[1]
        dest.view(-1, *dest.shape[2:]).index_copy_(0, rows * k + slots, src.to(dest.dtype))


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


@dataclass(frozen=True, slots=True)
class ExampleColumns:
    """A chunk's examples column by column, as numpy arrays: entry ``i`` of every per-example array is example
    ``i`` (the fields of :class:`FeatureExample`), ordered by feature, kind (top, quantile, random) and
    ``example_id``; example ``i``'s tokens and activations are ``token_ids[offsets[i]:offsets[i + 1]]`` and
    ``acts[...]`` of the flat arrays. A sink that writes columns (the store's Arrow insert) does no Python work
    per example or per token; :meth:`rows` gives the objects.

    ``vocab`` maps token ids to strings and ``vocab_canon`` ids to a canonical id shared by ids of equal strings
    (so equal token-string sequences can be found from ids: the held-out split groups identical texts); both are
    the harvest's own, shared by its chunks."""

    sae_id: str
    feature: np.ndarray  # int64
    kind: np.ndarray  # int64: index into EXAMPLE_KINDS
    example_id: np.ndarray  # int64
    quantile: np.ndarray  # int64; -1 = none
    window_index: np.ndarray  # int64
    max_act: np.ndarray  # float64
    offsets: np.ndarray  # int64 [n + 1]
    token_ids: np.ndarray  # int64, flat
    acts: np.ndarray  # float64, flat, rounded to 4 decimals (0 for random windows)
    vocab: Sequence[str]
    vocab_canon: np.ndarray

    @classmethod
    def empty(cls, sae_id: str = "", vocab: Sequence[str] = (), vocab_canon: np.ndarray | None = None,
              ) -> ExampleColumns:
        i, x = np.zeros(0, np.int64), np.zeros(0, np.float64)
        canon = canonical_ids(vocab) if vocab_canon is None else vocab_canon
        return cls(sae_id, i, i, i, i, i, x, np.zeros(1, np.int64), i, x, vocab, canon)

    def __len__(self) -> int:
        return len(self.kind)

    def token_lists(self) -> list[list[str]]:
        strs = np.asarray(self.vocab, dtype=object)[self.token_ids].tolist()
        return [strs[i:j] for i, j in itertools.pairwise(self.offsets.tolist())]

    def act_lists(self) -> list[list[float]]:
        vals = self.acts.tolist()
        return [vals[i:j] for i, j in itertools.pairwise(self.offsets.tolist())]

    def rows(self) -> list[FeatureExample]:
        return [FeatureExample(feature=FeatureRef(sae_id=self.sae_id, index=f), kind=EXAMPLE_KINDS[k],
                               example_id=j, quantile=None if q < 0 else q, tokens=t, acts=a, max_act=m,
                               window_index=w)
                for f, k, j, q, t, a, m, w in zip(self.feature.tolist(), self.kind.tolist(),
                                                  self.example_id.tolist(), self.quantile.tolist(),
                                                  self.token_lists(), self.act_lists(), self.max_act.tolist(),
                                                  self.window_index.tolist(), strict=True)]


def canonical_ids(vocab: Sequence[str]) -> np.ndarray:
    """For each token id, the smallest id of a token with the same string (tokenizers may render two ids alike)."""
    if not len(vocab):
        return np.zeros(0, np.int64)
    _, first, inverse = np.unique(np.asarray(vocab, dtype=object), return_index=True, return_inverse=True)
    return first[inverse.reshape(-1)].astype(np.int64)


@dataclass(frozen=True, slots=True)
class HarvestChunk:
    """The statistics and examples of a run of consecutive features (``features[i]`` and every example of it are
    in the same chunk: a chunk is feature-complete)."""

    features: list[FeatureStats]
    columns: ExampleColumns

    @property
    def examples(self) -> list[FeatureExample]:
        """The examples as objects (built on each access: a bulk writer reads :attr:`columns`)."""
        return self.columns.rows()


@dataclass
class HarvestResult:
    """The finished harvest: statistics as arrays, plus every feature's stats and examples, in bounded chunks.

    ``chunks`` yields :class:`HarvestChunk` values in feature order, each assembled when it is asked for (logit
    effects, window tokens and per-token activations of a few hundred features at a time), so memory does not grow
    with the SAE's width or the number of examples: a sink writes a chunk and lets it go. It can be iterated
    again (it re-assembles), but only while the harvest's work folder exists: inside the sink.
    """

    sae_id: str
    n_tokens: int
    n_windows: int
    density: np.ndarray
    max_act: np.ndarray
    mean_act: np.ndarray
    chunks: Iterable[HarvestChunk]
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
            "version": RESULT_VERSION}
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
            work_dir: Path | None = None, work: HarvestWork | None = None,
            finish_progress: Callable[[int, int], None] | None = None) -> HarvestOut:
    """Run (or resume) the harvest described by ``args``; send the result to ``ctx.sink``; return the summary.

    ``progress(batches_done, total_batches)`` is called after every batch. It may stop the pass by raising (e.g.
    ``KeyboardInterrupt``): the state is checkpointed first and the exception propagates; nothing is stored, and
    a re-run with the same arguments resumes after that batch. ``finish_progress(chunks_done, total_chunks)``
    is called as the finish (logit effects, example assembly, the sink's writes) goes through its feature chunks:
    minutes for a wide SAE.

    ``work``: a work folder the caller already owns (:func:`harvest_work`); otherwise it is taken here, in the
    cache, or under ``work_dir`` (tests) — refused if another process owns it.
    """
    lm, sae = ctx.model, ctx.sae(args.sae_id)
    if ctx.sink is None:
        raise InputError("harvest needs somewhere to store its results: pass a database (--db)")
    check_args(args, lm.n_ctx, sae)
    if work is not None:
        return _harvest(ctx, args, work, progress, finish_progress)
    with harvest_work(lm.model_id, sae.sae_id, args, root=work_dir) as own:
        return _harvest(ctx, args, own, progress, finish_progress)


def default_ctx(n_ctx: int, sae: LoadedSAE | None = None) -> int:
    """The window length a harvest uses when none is given: 64 tokens, at most the model's context and the SAE's
    training ``context_size`` (when its config records one)."""
    limits = [64, n_ctx] + ([sae.context_size] if sae is not None and sae.context_size else [])
    return max(2, min(limits))


def check_args(args: HarvestIn, n_ctx: int, sae: LoadedSAE | None = None) -> None:
    """Refuse arguments that cannot work with a model of context ``n_ctx``, or with how ``sae`` was trained
    (:func:`autoexplain.tools.saes.check_window`), before anything is written."""
    if sae is not None:
        from autoexplain.tools.saes import check_window

        check_window(sae, args.ctx)
    if args.ctx > n_ctx:
        raise InputError(f"ctx {args.ctx} exceeds the model's context of {n_ctx} tokens: pass --ctx {n_ctx} "
                         "or less")
    if args.n_quantiles * args.per_quantile > args.reservoir:
        raise InputError(f"n_quantiles x per_quantile = {args.n_quantiles * args.per_quantile} exceeds reservoir "
                         f"{args.reservoir}: raise reservoir or sample fewer per quantile")


def _harvest(ctx: ToolContext, args: HarvestIn, owned: HarvestWork, progress: Callable[[int, int], None] | None,
             finish_progress: Callable[[int, int], None] | None = None) -> HarvestOut:
    from autoexplain.tools.data import iter_texts, iter_windows

    assert ctx.sink is not None
    lm, sae = ctx.model, ctx.sae(args.sae_id)
    map_large_blocks()
    release_free_memory()  # what earlier work in this process freed is not kept resident through the harvest
    work = owned.path
    windows = _Windows(work / "windows.i32", args.ctx)
    state_path = work / "state.pt"
    n_features = sae.d_sae
    state = _load_state(state_path, args) or _State.empty(n_features, args)
    resumed_from = state.batches_done
    windows.truncate(state.windows_done)
    total_batches = -(-args.n_tokens // (args.ctx * args.batch_size))
    t0 = time.perf_counter()
    logits = _LogitTables(lm, sae, args)
    logits.start()  # on a second thread, while the pass runs (see _LogitTables)
    stream = prefetch(iter_windows(iter_texts(args.dataset), lm.tokenizer, ctx=args.ctx, n_ctx=lm.n_ctx,
                                    batch_windows=args.batch_size, max_tokens=args.n_tokens), name="harvest-prefetch")
    with BatchFolder(lm, sae, args, state) as folder:  # the fold of each batch overlaps the next one's forward
        for i, batch in enumerate(stream):
            if i < state.batches_done:
                continue  # finished before the interruption: tokenised again (cheap), not recomputed
            folder.fold(batch, i)
            windows.append(batch.tokens)
            if progress:
                try:
                    progress(i + 1, total_batches)
                except BaseException:  # a stop request: keep what is done, then stop
                    folder.wait()
                    windows.sync()
                    _save_state(state_path, state, args)
                    raise
            if (i + 1) % args.checkpoint_every == 0:
                folder.wait()
                windows.sync()
                _save_state(state_path, state, args)
    windows.sync()
    _save_state(state_path, state, args)
    del state  # the finish reads the final checkpoint, mapped from disk (see deliver): its memory goes back now
    release_free_memory()  # (the state's smaller tensors live in the heap)
    out = deliver(ctx, args, state_path, windows, owned.identity, started=t0, finish_progress=finish_progress,
                  logits=logits)
    out.resumed_from_batch = resumed_from
    shutil.rmtree(work, ignore_errors=True)
    return out


class BatchFolder:
    """Fold batches into ``state`` one batch behind the model: :meth:`fold` runs a batch through model and SAE on
    the calling thread, then hands its firings to a second thread that folds them into the state
    (:func:`_update`) while the caller goes on to the next batch. At most one fold is in flight, folds run in batch
    order, and each batch's random keys are seeded by ``args.seed`` and its index alone — so the state is bit for
    bit that of folding on the calling thread (and a batch gives the same draws in a resumed pass or in a shard:
    :mod:`autoexplain.tools.harvest_merge`).

    Why: at 98,304 features the fold is about 5 % of the pass; on a second core it overlaps the next batch's
    forward pass instead of adding to it. It holds one batch's firings (a few MB) beyond the serial pass.

    Read ``state`` only after :meth:`wait` (a checkpoint, a stop, the end): until then the last batch may still be
    folding. A fold's exception is raised by the next :meth:`fold` or :meth:`wait`. Use as a context manager: on
    exit any fold in flight is finished, the thread joined, and the folder lets go of the state (a harvest drops
    its state before the finish: a reference kept here held 0.34 GB more through the finish at 98,304 features)."""

    def __init__(self, lm: LoadedModel, sae: LoadedSAE, args: HarvestIn, state: _State) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.lm, self.sae, self.args = lm, sae, args
        self.state: _State | None = state
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="harvest-fold")
        self._pending: Any = None

    def __enter__(self) -> BatchFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self.wait()
            elif self._pending is not None:  # unwinding: let the fold finish, keep the first error
                self._pending.exception()
        finally:
            self._pool.shutdown(wait=True)
            self.state = None

    def fold(self, batch: Any, index: int, offset: int = 0) -> None:
        """Run batch ``index`` (a :class:`~autoexplain.tools.data.TokenWindows`, the ``index``-th of the dataset's
        stream) through model and SAE and queue its fold; its first window is the ``offset + windows_done``-th
        (``offset``: windows before a shard's first batch)."""
        state = self.state
        if state is None:
            raise RuntimeError("BatchFolder used after its with block")
        fired, mask = _batch_firings(self.lm, self.sae, batch.tokens, batch.valid)
        self.wait()  # the previous batch is folded: windows_done is current
        self._pending = self._pool.submit(_fold_and_trim, state, fired, mask, batch.n_windows, index,
                                          offset + state.windows_done, self.args)

    def wait(self) -> None:
        """Until every queued fold is in the state."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()


def _fold_and_trim(state: _State, fired: _Firings, mask: torch.Tensor, n_windows: int, index: int,
                   first_window: int, args: HarvestIn) -> None:
    """:func:`_fold`, then the free memory of the heaps goes back to the system (see :func:`map_large_blocks`)."""
    _fold(state, fired, mask, n_windows, index, first_window, args)
    del fired
    release_free_memory()


def _fold(state: _State, fired: _Firings, mask: torch.Tensor, n_windows: int, index: int, first_window: int,
          args: HarvestIn) -> None:
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + index)  # per batch: resume- and shard-independent
    _update(state, fired, mask, first_window, gen, args, index)
    state.windows_done += n_windows
    state.n_tokens += int(mask.sum())  # the counted tokens: valid and not BOS
    state.batches_done = index + 1


def deliver(ctx: ToolContext, args: HarvestIn, source: _State | Path, windows: _Windows,
            identity: HarvestIdentity, *, started: float, finish_progress: Callable[[int, int], None] | None = None,
            logits: _LogitTables | None = None) -> HarvestOut:
    """Finish a completed pass (or the exact merge of its shards: :mod:`autoexplain.tools.harvest_merge`): turn
    its state into a :class:`HarvestResult`, hand it to ``ctx.sink`` (which assembles and writes it chunk by chunk)
    and return the summary. ``started``: ``time.perf_counter()`` when the pass began (for the timings).

    ``source`` is the state, or the path of its checkpoint: then nothing of it is held in memory during the
    finish — the checkpoint is memory-mapped, anew for each chunk of features, so only the rows that chunk reads
    become resident, and they are let go with it (the state is the largest thing a harvest of a wide SAE holds:
    0.57 GB at 98,304 features)."""
    assert ctx.sink is not None
    lm, sae = ctx.model, ctx.sae(args.sae_id)
    n_features = sae.d_sae
    t0 = started
    t_stream = time.perf_counter()
    state = _mapped_state(source) if isinstance(source, Path) else source
    result = _finish(state, lm, sae, args, windows, finish_progress, logits=logits,
                     chunk_state=(lambda: _mapped_state(source)) if isinstance(source, Path) else None)
    result.harvest_id, result.inputs = identity.harvest_id, identity.inputs
    if state.n_tokens < SHORT_DATASET_FRACTION * args.n_tokens:
        result.note = (f"dataset {args.dataset!r} gave only {state.n_tokens:,} of the {args.n_tokens:,} tokens "
                       "asked for: its statistics and examples rest on that little text")
    ctx.sink(result)  # assembles the examples chunk by chunk as it writes them
    seconds = time.perf_counter() - t0
    dens = result.density
    alive = dens[dens > 0]
    qs = {f"p{q}": float(np.quantile(alive, q / 100)) for q in (10, 50, 90)} if alive.size else {}
    order = np.argsort(-dens)[:10]
    out = HarvestOut(sae_id=sae.sae_id, n_tokens=state.n_tokens, n_windows=state.windows_done,
                     n_features=n_features, n_dead=len(result.dead), resumed_from_batch=0,
                     seconds=round(seconds, 2), stream_seconds=round(t_stream - t0, 2),
                     finish_seconds=round(seconds - (t_stream - t0), 2), density_quantiles=qs,
                     densest=[(int(i), float(dens[i])) for i in order], harvest_id=result.harvest_id,
                     note=result.note)
    out._result = result
    return out


#: Bytes of dense activations ([tokens, d_sae] float32) in one token sub-batch, for architectures whose features
#: cannot be encoded a block at a time (see :func:`_batch_firings`). Above glibc's largest dynamic
#: mmap threshold (32 MiB) on purpose: blocks that size are always mapped and unmapped, never carved from the heap,
#: where the small long-lived tensors kept between them fragmented it (measured at 98,304 features: 32 MiB
#: sub-batches peaked about 600 MB above the state after a few batches, 64 MiB ones about 150 MB).
ENCODE_BYTES = 64 * 2**20
#: Bytes of one feature block's dense activations ([tokens, block] float32) in a feature-sliced encode (see
#: :func:`_batch_firings`): below :data:`MMAP_THRESHOLD`, so the blocks' memory is reused from the heap batch
#: after batch instead of being mapped and faulted in anew (1.8 GB of page faults per 2,048 tokens at 98,304
#: features otherwise); 512 features per block at 2,048 tokens, wide enough for the matrix product's full speed.
FEATURE_BLOCK_BYTES = 4 * 2**20
#: Blocks at least this large are served by their own memory mapping during a harvest (see :func:`map_large_blocks`).
MMAP_THRESHOLD = 8 * 2**20


def map_large_blocks() -> None:
    """Have glibc's malloc serve every block of :data:`MMAP_THRESHOLD` bytes or more by its own memory mapping,
    given back to the system when freed, and smaller ones from its heaps (reused, batch after batch, without new
    page faults). glibc's default moves that threshold as blocks are freed; fixing it keeps the policy the same
    all through a harvest. Process-wide and lasting. A no-op where the C library has no ``mallopt`` (macOS,
    Windows).

    The trade-off, measured at GPT-2-small shape x 98,304 features (12k tokens, pass only, same code otherwise):
    with a 1 MiB threshold every per-batch temporary of the model and the encoder is mapped and faulted in anew
    (14 M page faults; pass 48 s against a bare pass of 34 s) but nothing freed stays resident (peak 2,543 MB);
    with 32 MiB the pass takes 35-39 s, but freed memory stays resident in the heaps, most of all those of the
    threads that fold and compute logit effects (peak up to 2,914 MB). With 8 MiB, and the pass's hot
    temporaries kept below it (:data:`FORWARD_TOKENS`, :data:`FEATURE_BLOCK_BYTES`), plus
    :func:`release_free_memory` after each fold: 2 M page faults, pass 38 s against a bare pass of 40-44 s in the
    same process, peak 2,511 MB."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD


def release_free_memory() -> None:
    """Give the free memory inside glibc's heaps back to the system (``malloc_trim``: every thread's heap, its free
    pages only). Cheap next to a fold; a no-op without glibc."""
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


#: Tokens per forward pass of the model in a harvest (whole windows; at least one): the model's per-layer
#: temporaries (the MLP's ``[tokens, 4 d_model]`` activations above all: 6.3 MB at GPT-2-small width) scale with it
#: and stay below :data:`MMAP_THRESHOLD`; the SAE then encodes the whole batch's activations (see
#: :func:`_batch_firings`). Each window's activations have the same bits in any group (rows of a matrix product
#: are computed independently, attention stays within a window).
FORWARD_TOKENS = 512
#: Fewest tokens in an encoder sub-batch (a one-row matrix product may take another BLAS path: see _token_chunks).
MIN_ENCODE_ROWS = 8
#: Fewest features in a feature block of the encoder (a one-column product may take another BLAS path).
MIN_BLOCK_FEATURES = 4


def _token_chunks(n: int, width: int, limit: int | None = None, least: int = MIN_ENCODE_ROWS,
                  ) -> list[tuple[int, int]]:
    """Split ``n`` token rows into contiguous, near-equal sub-batches of at most ``limit`` (default
    :data:`ENCODE_BYTES`) bytes of float32 width ``width`` each, none smaller than ``least`` rows (unless ``n``
    is)."""
    per = max(least, (ENCODE_BYTES if limit is None else limit) // max(1, 4 * width))
    k = max(1, min(-(-n // per), n // least))
    edges = [n * i // k for i in range(k + 1)]
    return list(itertools.pairwise(edges))


def _feature_blocks(n_features: int, n_tokens: int) -> list[tuple[int, int]]:
    """Split ``n_features`` into contiguous, near-equal blocks whose ``[n_tokens, block]`` float32 output is at
    most :data:`FEATURE_BLOCK_BYTES`, none narrower than :data:`MIN_BLOCK_FEATURES` columns (unless
    ``n_features`` is)."""
    return _token_chunks(n_features, n_tokens, FEATURE_BLOCK_BYTES, least=MIN_BLOCK_FEATURES)


def _batch_firings(lm: LoadedModel, sae: LoadedSAE, tokens: torch.Tensor,
                   valid: torch.Tensor) -> tuple[_Firings, torch.Tensor]:
    """A batch's feature firings (sparse, CPU float32) and the mask of counted tokens: valid and not BOS.

    The model runs to the SAE's hook on groups of whole windows (:data:`FORWARD_TOKENS` tokens each); the encoder
    output is never dense for the whole batch, and each piece is reduced to its non-zero entries at once:

    * where the architecture encodes every feature on its own (standard, JumpReLU, gated:
      :class:`~autoexplain.tools.saes.FeatureSliceEncoder`), all tokens are encoded a block of features at a time
      (:func:`_feature_blocks`): each encoder column is read once per batch, and the matrix products run at the
      speed of one whole product (measured at GPT-2-small shape x 98,304 features: 1.9 s per 2,048 tokens against
      2.0 s whole and 3.4 s in 170-token sub-batches);
    * otherwise (TopK and any architecture whose features compete within a token) the flattened tokens are encoded
      in sub-batches of full feature width (:func:`_token_chunks`), so TopK, thresholds and per-token normalisation
      behave exactly as on the whole batch.

    Peak memory is one block or sub-batch (:data:`FEATURE_BLOCK_BYTES`, :data:`ENCODE_BYTES`), whatever the SAE
    width and batch size; the firings themselves are O(tokens x features firing per token). Entries are returned
    in ``dense.nonzero()`` order (token-major), so every sum downstream adds in the same order whichever way the
    batch was cut.

    Caveat: the result equals one ``encode`` of the whole batch bit for bit when the BLAS computes each entry of a
    matrix product independently of how many rows and columns it is given — true of the CPU (MKL/oneDNN) sgemm for
    two rows or columns or more (checked at GPT-2-small shape, and by the tests), hence :data:`MIN_ENCODE_ROWS` and
    :data:`MIN_BLOCK_FEATURES`; a GPU library may differ in the last bit. A (-0.0) activation (JumpReLU of a
    negative pre-activation) counts as zero, as ``nonzero()`` always did.
    """
    from autoexplain.tools.saes import FeatureSliceEncoder

    grabbed: list[torch.Tensor] = []

    def grab(act: torch.Tensor, hook: Any) -> None:
        grabbed.append(act)

    mask = valid.clone()
    mask[:, 0] = False  # BOS (windows always start with it here)
    b, t = tokens.shape
    d_sae = sae.d_sae
    flat_mask = mask.reshape(-1).to(lm.device)
    idx: list[torch.Tensor] = []
    vals: list[torch.Tensor] = []
    sliced = FeatureSliceEncoder.of(sae)
    n_groups = min(b, max(1, -(-b * t // FORWARD_TOKENS)))  # near-equal groups of whole windows
    groups = list(itertools.pairwise(b * i // n_groups for i in range(n_groups + 1)))
    with torch.no_grad():
        on_device = tokens.to(lm.device)
        parts: list[torch.Tensor] = []
        for lo, hi in groups:
            lm.model.run_with_hooks(on_device[lo:hi], fwd_hooks=[(sae.hook_name, grab)],
                                    stop_at_layer=sae.site.layer + 1)
            if len(grabbed) != 1:
                raise RuntimeError(f"hook {sae.hook_name} fired {len(grabbed)} times, expected once")
            hooked = grabbed.pop()  # [tokens, ...]: sae-lens reshapes heads itself
            parts.append(hooked.reshape((hi - lo) * t, *hooked.shape[2:]))
            del hooked
        flat = torch.cat(parts) if len(parts) > 1 else parts[0]
        del parts
        if sliced is not None:
            for lo, hi in _feature_blocks(d_sae, b * t):
                acts = sliced(flat, lo, hi).float()  # [tokens, hi - lo]
                at, val = _nonzero_flat(acts)
                tok = at // (hi - lo)
                keep = flat_mask[tok]
                vals.append(val[keep].cpu())
                idx.append((tok[keep] * d_sae + lo + at[keep] % (hi - lo)).cpu())
                del acts
        else:
            for lo, hi in _token_chunks(b * t, d_sae):
                acts = sae.sae.encode(flat[lo:hi]).float()  # [n, d_sae]
                at, val = _nonzero_flat(acts)
                keep = flat_mask[lo + at // d_sae]  # drop BOS and padding
                vals.append(val[keep].cpu())
                idx.append((at[keep] + lo * d_sae).cpu())
                del acts
    cell, val = torch.cat(idx), torch.cat(vals)
    if sliced is not None and len(idx) > 1:  # blocks are feature-major: back to token-major (nonzero) order
        cell, order = torch.sort(cell)
        val = val[order]
    tok_all, nz_f = cell // d_sae, cell % d_sae
    fired = _Firings(b=tok_all // t, t=tok_all % t, f=nz_f, val=val, shape=(b, t, d_sae))
    return fired, mask


def _nonzero_flat(acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat indices (ascending, as ``acts.nonzero()`` orders them) and values of the non-zero entries of the
    contiguous float32 tensor ``acts``. On the CPU the scan runs over 64-bit words (two activations each; an SAE's
    output is mostly zero words) and only the halves of non-zero words are tested as floats — about 30 % less time
    than ``nonzero`` on the floats at GPT-2-small shape. A (-0.0) is not zero as bits but is as a float: dropped,
    as ``nonzero`` drops it."""
    flat = acts.reshape(-1)
    if flat.device.type != "cpu" or flat.dtype != torch.float32 or flat.numel() % 2 or flat.storage_offset() % 2:
        at = flat.nonzero().flatten()
        return at, flat[at]
    words = flat.view(torch.int64).nonzero().flatten()
    at = torch.stack([2 * words, 2 * words + 1], 1).flatten()
    val = flat[at]
    keep = val != 0
    return at[keep], val[keep]


def _save_state(path: Path, state: _State, args: HarvestIn) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"version": STATE_VERSION, "args": args.model_dump(), "state": state.to_dict()}, tmp)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _mapped_state(path: Path) -> _State:
    """The checkpoint at ``path`` with its tensors memory-mapped from the file (pages are read when touched)."""
    return _State(**torch.load(path, mmap=True, weights_only=True)["state"])


def _load_state(path: Path, args: HarvestIn) -> _State | None:
    if not path.exists():
        return None
    blob = torch.load(path, weights_only=True)
    same = {k: v for k, v in blob["args"].items() if k != "checkpoint_every"} == args.model_dump(
        exclude={"checkpoint_every"})
    if blob.get("version") != STATE_VERSION or not same:
        return None
    return _State(**blob["state"])


#: Examples assembled per chunk of the finished harvest (:func:`_finish`): bounds the Python objects and rows alive
#: at once (about 2 kB per example through to the store).
EXAMPLES_PER_CHUNK = 16_384
#: Logit-effect entries (features x vocabulary, float32) computed at once.
LOGIT_ELEMENTS = 16 * 2**20


def _feature_chunks(n_features: int, per_feature: int, d_vocab: int) -> list[tuple[int, int]]:
    """Consecutive feature ranges of about :data:`EXAMPLES_PER_CHUNK` examples and at most
    :data:`LOGIT_ELEMENTS` logit effects each; a last range of one feature is merged into the one before it (a
    one-row product may take another BLAS path than the rows around it)."""
    size = max(2, min(EXAMPLES_PER_CHUNK // max(1, per_feature), LOGIT_ELEMENTS // max(1, d_vocab)))
    edges = list(range(0, n_features, size)) + [n_features]
    if len(edges) > 2 and edges[-1] - edges[-2] == 1:
        del edges[-2]
    return list(itertools.pairwise(edges))


def _finish(state: _State, lm: LoadedModel, sae: LoadedSAE, args: HarvestIn, windows: _Windows,
            report: Callable[[int, int], None] | None = None, *,
            logits: _LogitTables | None = None, chunk_state: Callable[[], _State] | None = None) -> HarvestResult:
    """Turn the state into per-feature statistics (arrays, at once) and a re-iterable stream of feature-complete
    chunks of stats and examples (:class:`HarvestResult`), assembled lazily by :func:`_chunk` — from the state
    ``chunk_state()`` gives for each chunk when given (a fresh mapping of the checkpoint), else from ``state``."""
    n_tok = max(state.n_tokens, 1)
    count = state.fire_count.numpy()
    density = count / n_tok
    mean_act = np.where(count > 0, state.act_sum().numpy() / np.maximum(count, 1), 0.0)
    max_act = state.act_max.numpy().astype(np.float64)
    per_feature = args.top_k + args.n_quantiles * args.per_quantile + args.n_random
    d_vocab = lm.model.cfg.d_vocab
    ranges = _feature_chunks(sae.d_sae, per_feature, d_vocab)
    tables = logits if logits is not None else _LogitTables(lm, sae, args)
    cache: dict[str, Any] = {"logits": tables}

    def assemble() -> Iterator[HarvestChunk]:
        if "vocab" not in cache:
            cache["vocab"] = lm.token_strs(range(d_vocab))
            # pool in (key, window) order: a function of the pooled set, not of the slots (see _admit)
            cache["pool_order"] = _best_order(state.pool_key[None, :], state.pool_win[None, :], False)[0]
            cache["refs"] = [FeatureRef(sae_id=sae.sae_id, index=f) for f in range(sae.d_sae)]
            cache["vocab_canon"] = canonical_ids(cache["vocab"])
        for i, (lo, hi) in enumerate(ranges):
            # a fresh mapping of the checkpoint per chunk (when given): its pages are let go with the chunk
            yield _chunk(chunk_state() if chunk_state is not None else state, lm, sae, args, windows, lo, hi,
                         density=density, max_act=max_act, mean_act=mean_act, **cache)
            if report is not None:  # the sink has taken the chunk (the prefetch runs at most one ahead)
                report(i + 1, len(ranges))

    class _Chunks:
        def __iter__(self) -> Iterator[HarvestChunk]:
            # the next chunk is assembled in a background thread while the sink stores this one: its logit
            # effects (a matrix product and top-k, outside the GIL) overlap the sink's Python and DuckDB's insert;
            # at most two chunks wait (bounded memory)
            return prefetch(assemble(), depth=1, name="harvest-assemble")

    return HarvestResult(sae_id=sae.sae_id, n_tokens=state.n_tokens, n_windows=state.windows_done,
                         density=density, max_act=max_act, mean_act=mean_act, chunks=_Chunks())


def _chunk(state: _State, lm: LoadedModel, sae: LoadedSAE, args: HarvestIn, windows: _Windows, lo: int, hi: int, *,
           density: np.ndarray, max_act: np.ndarray, mean_act: np.ndarray, vocab: list[str],
           pool_order: torch.Tensor, refs: list[FeatureRef], vocab_canon: np.ndarray,
           logits: _LogitTables) -> HarvestChunk:
    """Stats and examples of features ``lo .. hi-1``, in the order the store has always received them: per
    feature its top contexts (by activation, ties: earlier window first), then its quantile samples (weakest bin
    first), then its non-activating windows (in pool order). Window tokens are read from the window file for this
    chunk only; per-token activations come from the state's slices (:func:`_slice_len`)."""
    promote, suppress = logits.effects(lo, hi, vocab)
    hist = state.hist[lo:hi].numpy()
    features = [
        FeatureStats(feature=refs[f], density=float(density[f]), max_act=float(max_act[f]),
                     mean_act=float(mean_act[f]), n_tokens=int(state.n_tokens), hist_edges=HIST_EDGES,
                     hist_counts=hist[f - lo].tolist(), top_logits=promote[f - lo] if promote is not None else None,
                     bottom_logits=suppress[f - lo] if suppress is not None else None)
        for f in range(lo, hi)]

    # picks: (feature, kind rank, j, quantile or -1, window, max position or -1, row in `acts` or -1)
    cols: list[np.ndarray] = []
    act_rows: list[torch.Tensor] = []
    n_act = 0
    # top contexts: the kept sets are unordered; rank by activation (ties: earlier window first)
    top_win, top_val = state.top_win[lo:hi], state.top_val[lo:hi]
    by_win = torch.argsort(top_win, dim=1, stable=True)
    order = by_win.gather(1, torch.argsort(-top_val.gather(1, by_win), dim=1, stable=True))
    r, j = (top_val.gather(1, order) > -torch.inf).nonzero(as_tuple=True)  # the filled slots sort first
    slot = order[r, j]
    if len(r):
        act_rows.append(state.top_acts[lo + r, slot])
        cols.append(np.stack([(lo + r).numpy(), np.zeros(len(r), np.int64), j.numpy(), np.full(len(r), -1),
                              top_win[r, slot].numpy(), state.top_pos[lo + r, slot].numpy(),
                              np.arange(n_act, n_act + len(r))], 1))
        n_act += len(r)
    # quantile samples
    q_f, q_j, q_q, q_m = _quantile_picks(state, lo, hi, args)
    if len(q_f):
        fq, mq = torch.from_numpy(q_f), torch.from_numpy(q_m)
        act_rows.append(state.res_acts[fq, mq])
        cols.append(np.stack([q_f, np.ones(len(q_f), np.int64), q_j, q_q, state.res_win[fq, mq].numpy(),
                              state.res_pos[fq, mq].numpy(), np.arange(n_act, n_act + len(q_f))], 1))
        n_act += len(q_f)
    # non-activating windows: the first n_random pooled windows (in key order) where the feature never fires
    if args.n_random:
        pwin = state.pool_win[pool_order]
        silent = (pwin >= 0)[:, None] & ~state.pool_fires[:, lo:hi][pool_order]  # [P, n]
        take = silent & (silent.cumsum(0) <= args.n_random)
        f_r, p_r = take.T.nonzero(as_tuple=True)  # by feature, then pool order
        if len(f_r):
            j_r = (take.T.cumsum(1) - 1)[f_r, p_r]
            n = len(f_r)
            cols.append(np.stack([(lo + f_r).numpy(), np.full(n, 2), j_r.numpy(), np.full(n, -1),
                                  pwin[p_r].numpy(), np.full(n, -1), np.full(n, -1)], 1))
    examples = ExampleColumns.empty(sae.sae_id, vocab, vocab_canon)
    if cols:
        picks = np.concatenate(cols).astype(np.int64)
        picks = picks[np.lexsort((picks[:, 2], picks[:, 1], picks[:, 0]))]
        examples = _examples(picks, torch.cat(act_rows) if act_rows else None, args, windows, vocab, vocab_canon,
                             sae.sae_id)
    return HarvestChunk(features=features, columns=examples)


#: The kinds in the order of :attr:`ExampleColumns.kind` codes (and of the examples of a feature).
EXAMPLE_KINDS = (ExampleKind.TOP, ExampleKind.QUANTILE, ExampleKind.RANDOM)


def _examples(picks: np.ndarray, acts: torch.Tensor | None, args: HarvestIn, windows: _Windows, vocab: list[str],
              vocab_canon: np.ndarray, sae_id: str) -> ExampleColumns:
    """Cut each pick's window around its max (``left`` tokens before, ``right`` after; BOS never shown; random
    windows whole) and pair it with its per-token activations (rounded to 4 decimals; zeros for random windows).

    Column by column: every example's tokens and activations are gathered into one flat array each (one numpy
    gather) with per-example offsets; no Python work per example or token."""
    win = picks[:, 4]
    ids, inv = np.unique(win, return_inverse=True)
    toks = windows.rows(ids)  # [unique windows, ctx]
    pos = picks[:, 5]
    lo = np.where(pos < 0, 1, np.maximum(1, pos - args.left))
    hi = np.where(pos < 0, args.ctx, np.minimum(args.ctx, pos + args.right + 1))
    left, _ = _slice_len(args)
    start = lo - (pos - left)  # where lo falls in the stored slice
    n = hi - lo  # >= 1: the max is never at BOS, random windows are whole
    offsets = np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
    within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], n)  # position inside each example
    row = np.repeat(np.arange(len(picks)), n)
    flat_tok = toks[inv.reshape(-1)[row], lo[row] + within].astype(np.int64)
    flat_act = np.zeros(offsets[-1], dtype=np.float64)
    a = picks[:, 6]
    if acts is not None:
        rounded = np.round(acts.double().numpy(), 4)
        has = a[row] >= 0
        flat_act[has] = rounded[a[row][has], (start[row] + within)[has]]
    max_act = np.maximum.reduceat(flat_act, offsets[:-1]) if len(picks) else np.zeros(0)
    return ExampleColumns(sae_id=sae_id, feature=picks[:, 0].copy(), kind=picks[:, 1].copy(),
                          example_id=picks[:, 2].copy(), quantile=picks[:, 3].copy(), window_index=win.copy(),
                          max_act=max_act, offsets=offsets, token_ids=flat_tok, acts=flat_act, vocab=vocab,
                          vocab_canon=vocab_canon)


def _quantile_picks(state: _State, lo: int, hi: int,
                    args: HarvestIn) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For features ``lo .. hi-1``: split each one's uniform sample of activating windows into equal-count bins by
    activation (weakest first) and take the ``per_quantile`` samples of smallest key from each. Returns arrays
    (feature, j, quantile, reservoir slot), by feature, then bin, then key; ``j`` numbers a feature's picks.

    All features of the range at once: a member's rank is its place in (key, window) order (so the picks depend
    on the sampled set, not on which slot holds what); with ``n`` members and ``b = min(n_quantiles, n)`` bins,
    bin ``q`` holds the members at places ``q n // b ... (q + 1) n // b - 1`` of the activation order (ties by
    rank), i.e. the member at place ``p`` is in bin ``((p + 1) b - 1) // n``."""
    keys, vals, wins = state.res_key[lo:hi].numpy(), state.res_val[lo:hi].numpy(), state.res_win[lo:hi].numpy()
    rows, slots = keys.shape
    valid = np.isfinite(keys)
    # rank: place in (key, window) order; empty slots (key +inf) last
    by_key = np.lexsort((wins, keys), axis=1)
    rank = np.empty_like(by_key)
    np.put_along_axis(rank, by_key, np.arange(slots)[None, :], axis=1)
    # place in activation order, ties by rank; empty slots last
    in_rank = np.where(np.take_along_axis(valid, by_key, 1), np.take_along_axis(vals, by_key, 1), np.inf)
    by_val = np.take_along_axis(by_key, np.argsort(in_rank, axis=1, kind="stable"), 1)
    place = np.empty_like(by_val)
    np.put_along_axis(place, by_val, np.arange(slots)[None, :], axis=1)
    n = valid.sum(1)
    r, m = np.nonzero(valid)  # members, by row
    n_bins = np.minimum(args.n_quantiles, n)[r]
    q = ((place[r, m] + 1) * n_bins - 1) // n[r]
    o = np.lexsort((rank[r, m], q, r))  # by row, bin, rank
    r, m, q = r[o], m[o], q[o]
    first = np.ones(len(r), dtype=bool)
    first[1:] = (r[1:] != r[:-1]) | (q[1:] != q[:-1])
    starts = np.flatnonzero(first)
    within = np.arange(len(r)) - np.repeat(starts, np.diff(np.append(starts, len(r))))
    keep = within < args.per_quantile
    r, m, q = r[keep], m[keep], q[keep]
    new_row = np.ones(len(r), dtype=bool)
    new_row[1:] = r[1:] != r[:-1]
    row_starts = np.flatnonzero(new_row)
    j = np.arange(len(r)) - np.repeat(row_starts, np.diff(np.append(row_starts, len(r))))
    return (lo + r).astype(np.int64), j.astype(np.int64), q.astype(np.int64), m.astype(np.int64)


class _LogitTables:
    """Every feature's ``n_logits`` most promoted and suppressed tokens (``W_dec @ W_U``), as index and value
    arrays ``[d_sae, n]`` (a few MB), computed once — by default on a background thread started with the pass.

    The product is the finish's largest fixed cost (1.9 TFLOP at 24,576 features and GPT-2's vocabulary: about 20 s
    on one core). Started with the pass, it runs on a second core while the model runs on the first, so the finish
    only looks the rows up; on a machine with one free core it simply competes with the pass (same total work).
    The product is taken over the same feature ranges as the finish's chunks (:func:`_feature_chunks`), so every
    value has the bits a per-chunk product gives. ``start()`` is optional: ``effects`` computes what is missing.
    """

    def __init__(self, lm: LoadedModel, sae: LoadedSAE, args: HarvestIn) -> None:
        import threading

        self.lm, self.sae, self.n = lm, sae, args.n_logits
        per_feature = args.top_k + args.n_quantiles * args.per_quantile + args.n_random
        self.ranges = _feature_chunks(sae.d_sae, per_feature, lm.model.cfg.d_vocab)
        self.residual = sae.site.kind in _RESIDUAL_WRITERS
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._done: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._buffer: torch.Tensor | None = None

    def start(self) -> None:
        import threading

        if not self.residual or self._thread is not None:
            return

        def run() -> None:
            try:
                for lo, _ in self.ranges:
                    self._range(lo)
            except BaseException as exc:  # re-raised by effects() (it recomputes the missing ranges itself)
                self._error = exc

        self._thread = threading.Thread(target=run, daemon=True, name="harvest-logit-effects")
        self._thread.start()

    def _range(self, lo: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        with self._lock:
            if lo not in self._done:
                hi = dict(self.ranges)[lo]
                w_u = self.lm.model.W_U.detach()
                with torch.no_grad():
                    if self._buffer is None or self._buffer.dtype != w_u.dtype:
                        # one product buffer for all ranges: a fresh 64 MB block per range is mapped and
                        # page-faulted anew (map_large_blocks), about 5 M page faults at 98,304 features
                        self._buffer = torch.empty(max(h - lo_ for lo_, h in self.ranges) * w_u.shape[1],
                                                   dtype=w_u.dtype, device=w_u.device)
                    eff = self._buffer[: (hi - lo) * w_u.shape[1]].view(hi - lo, w_u.shape[1])
                    torch.matmul(self.sae.sae.W_dec[lo:hi].to(w_u.dtype), w_u, out=eff)  # [chunk, vocab]
                    top = torch.topk(eff, self.n, dim=1)
                    bot = torch.topk(eff, self.n, dim=1, largest=False)
                    del eff
                if len(self._done) + 1 == len(self.ranges):
                    self._buffer = None
                self._done[lo] = (top.indices.cpu(), top.values.cpu(), bot.indices.cpu(), bot.values.cpu())
            return self._done[lo]

    def effects(self, lo: int, hi: int, vocab: list[str],
                ) -> tuple[list[list[LogitEffect]] | None, list[list[LogitEffect]] | None]:
        """The logit effects of features ``lo .. hi-1`` (a range of :func:`_feature_chunks`), as token strings
        and values rounded to 4 decimals; ``(None, None)`` for an SAE that does not write the residual stream."""
        if not self.residual:
            return None, None
        if self._error is not None:
            raise self._error
        ti, tv, bi, bv = self._range(lo)
        assert dict(self.ranges)[lo] == hi
        n = self.n

        def lists(idx: torch.Tensor, val: torch.Tensor) -> list[list[LogitEffect]]:
            pairs = list(zip(map(vocab.__getitem__, idx.flatten().tolist()),
                             map(round, val.flatten().tolist(), itertools.repeat(4)), strict=True))
            return [pairs[i : i + n] for i in range(0, len(pairs), n)]

        return lists(ti, tv), lists(bi, bv)


TOOLS = (
    ToolSpec(name="harvest", level=CausalLevel.ASSOCIATION,
             input_model=HarvestIn, output_model=HarvestOut, fn=harvest, cost=Cost.DATASET,
             description="Stream a dataset through the model and an SAE once and record, for every feature: "
                         "top activating contexts, samples across activation quantiles, non-activating "
                         "contexts, firing density, max/mean activation, a histogram, and the tokens its decoder "
                         "direction promotes or suppresses. Results go to the features and feature_examples "
                         "tables. Association-level evidence: where a feature fires, not what it causes. "
                         "Expensive: run once per SAE and dataset, then read the stored examples."),
)
