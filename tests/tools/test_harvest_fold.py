"""The harvest pass's bookkeeping in isolation (no model): kept-set admission, the sparse scan of encoder output,
and the quantile picks, each against a plain reference written from its docstring."""

from __future__ import annotations

import numpy as np
import torch

from autoexplain.tools.harvest import HarvestIn, _admit, _nonzero_flat, _quantile_picks, _State


def _ref_best(entries: list[tuple[float, int]], k: int, largest: bool) -> set[int]:
    """The windows of the best ``k`` (key, window) entries: key first (largest or smallest), ties by tie rank."""
    def rank(e: tuple[float, int]) -> tuple[float, int]:
        key, win = e  # the tie rank as the docstring of _tie_rank defines it: window x odd constant mod 2^32
        return (-key if largest else key, (win * 2654435761) % 2**32)
    return {w for _, w in sorted(entries, key=rank)[:k]}


def test_admission_keeps_the_best_k_and_moves_no_survivor() -> None:
    """Random kept sets (some rows empty, some part-filled, some full; keys from few values: ties) against sparse
    candidates in any order, rows with 0 to 12 candidates: the kept set becomes the best K of old and new under
    (key, tie rank); kept entries that stay keep their slots; entering candidates fill exactly the freed slots."""
    gen = torch.Generator().manual_seed(7)
    for largest in (True, False):
        sentinel = -torch.inf if largest else torch.inf
        for _trial in range(40):
            f, k = 30, int(torch.randint(1, 8, (1,), generator=gen))
            keys = torch.full((f, k), sentinel)
            wins = torch.full((f, k), -1, dtype=torch.int64)
            for r in range(f):
                n = int(torch.randint(0, k + 1, (1,), generator=gen))
                slots = torch.randperm(k, generator=gen)[:n]
                keys[r, slots] = torch.randint(0, 4, (n,), generator=gen).float()
                wins[r, slots] = torch.randperm(100, generator=gen)[:n]
            row, win, key = [], [], []
            for r in range(f):
                n = int(torch.randint(0, 13, (1,), generator=gen))
                row += [r] * n
                win += (100 + torch.randperm(100, generator=gen)[:n]).tolist()
                key += torch.randint(0, 4, (n,), generator=gen).float().tolist()
            perm = torch.randperm(len(row), generator=gen)
            row_t, win_t, key_t = torch.tensor(row)[perm], torch.tensor(win)[perm], torch.tensor(key)[perm]
            before = {(r, s): (float(keys[r, s]), int(wins[r, s])) for r in range(f) for s in range(k)}
            rows, slots, i = _admit(keys, wins, row_t, key_t, win_t, largest)
            assert len(set(zip(rows.tolist(), slots.tolist(), strict=True))) == len(rows)
            new_keys, new_wins = keys.clone(), wins.clone()
            new_keys[rows, slots], new_wins[rows, slots] = key_t[i], win_t[i]
            for r in range(f):
                old = [(kk, w) for (rr, _), (kk, w) in before.items() if rr == r and w >= 0]
                cand = [(float(kk), int(w)) for rr, kk, w in zip(row, key, win, strict=True) if rr == r]
                assert {int(w) for w in new_wins[r] if w >= 0} == _ref_best(old + cand, k, largest)
                kept_now = {int(w) for w in new_wins[r] if w >= 0}
                for s in range(k):  # a survivor stays in its slot, with its key
                    key_before, win_before = before[(r, s)]
                    if win_before >= 0 and win_before in kept_now:
                        assert int(new_wins[r, s]) == win_before and float(new_keys[r, s]) == key_before
                assert int(((new_wins[r] < 0) != (new_keys[r] == sentinel)).sum()) == 0


def test_the_word_scan_finds_what_nonzero_finds() -> None:
    """Non-zero entries of encoder output by 64-bit words: the same indices (in order) and values as
    ``nonzero()``, with -0.0 dropped, NaN kept, odd sizes and all-zero blocks."""
    gen = torch.Generator().manual_seed(0)
    for shape in ((7, 33), (8, 64), (1, 5), (3, 1), (16, 1000)):
        x = torch.randn(shape, generator=gen).relu()
        x[torch.rand(shape, generator=gen) < 0.1] = -0.0
        x.view(-1)[:: max(1, x.numel() // 3)] = torch.nan
        for acts in (x, torch.zeros(shape)):
            at, val = _nonzero_flat(acts)
            want = acts.reshape(-1).nonzero().flatten()
            assert torch.equal(at, want)
            assert torch.equal(val.view(torch.int32), acts.reshape(-1)[want].view(torch.int32))
            assert not bool((val == 0).any())


def _ref_quantile_picks(state: _State, lo: int, hi: int, args: HarvestIn) -> list[tuple[int, int, int, int]]:
    """Feature by feature, as the docstring says: members in (key, window) order give ranks; bins of equal count
    over the activation order (ties by rank); the ``per_quantile`` members of smallest rank from each bin."""
    out = []
    for f in range(lo, hi):
        members = [m for m in range(state.res_key.shape[1]) if np.isfinite(float(state.res_key[f, m]))]
        members.sort(key=lambda m: (float(state.res_key[f, m]), int(state.res_win[f, m])))
        rank = {m: i for i, m in enumerate(members)}
        order = sorted(members, key=lambda m: (float(state.res_val[f, m]), rank[m]))
        n = len(order)
        b = min(args.n_quantiles, n)
        j = 0
        for q in range(b):
            for m in sorted(order[q * n // b : (q + 1) * n // b], key=rank.__getitem__)[: args.per_quantile]:
                out.append((f, j, q, m))
                j += 1
    return out


def test_quantile_picks_follow_their_rule() -> None:
    rng = np.random.default_rng(3)
    for _trial in range(60):
        f, r = int(rng.integers(1, 12)), int(rng.integers(1, 30))
        args = HarvestIn(sae_id="s", dataset="d", reservoir=r, n_quantiles=int(rng.integers(1, 12)),
                         per_quantile=int(rng.integers(1, 4)))
        state = _State.empty(f, args)
        for row in range(f):
            n = int(rng.integers(0, r + 1))
            slots = rng.choice(r, n, replace=False)
            state.res_key[row, slots] = torch.from_numpy(rng.integers(0, 3, n).astype(np.float32) / 3)  # ties
            state.res_val[row, slots] = torch.from_numpy(rng.integers(1, 4, n).astype(np.float32))
            state.res_win[row, slots] = torch.from_numpy(rng.choice(500, n, replace=False))
        lo = int(rng.integers(0, f))
        hi = int(rng.integers(lo + 1, f + 1))
        got = list(zip(*(a.tolist() for a in _quantile_picks(state, lo, hi, args)), strict=True))
        assert got == _ref_quantile_picks(state, lo, hi, args)
