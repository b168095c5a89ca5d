"""The vectorised held-out split (split_explain_mask) against a plain per-feature reference written from the
module docstring's rules, on random inputs built to share windows and texts across kinds and features."""

from __future__ import annotations

import hashlib
import math
import random

import numpy as np
import pytest

from autoexplain.evals.features import KIND_CODES, SplitKey, split_explain_mask, split_sides

M64 = (1 << 64) - 1


def _mix(x: int) -> int:
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def _reference(keys: list[SplitKey], sae_id: str, feature: int, fraction: float = 0.5, seed: int = 0) -> list[str]:
    """One feature, in plain Python: union-find over shared windows/texts, strata, hash order, dealing, rare rule."""
    parent = list(range(len(keys)))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    seen: dict[tuple[str, object], int] = {}
    for i, k in enumerate(keys):
        for link in [("t", k.text)] + ([("w", k.window_index)] if k.window_index is not None else []):
            if link in seen:
                parent[find(i)] = find(seen[link])
            else:
                seen[link] = i
    groups: dict[int, list[int]] = {}
    for i in range(len(keys)):
        groups.setdefault(find(i), []).append(i)
    base = int.from_bytes(hashlib.sha256(f"split\x1f{sae_id}\x1f{seed}".encode()).digest()[:8], "little")
    dealt = []
    for members in groups.values():
        qs = [max(keys[i].quantile if keys[i].quantile is not None else 0, 0) for i in members
              if keys[i].kind == "quantile"]
        stratum = (0, min(qs)) if qs else (1, 0) if any(keys[i].kind == "top" for i in members) else (2, 0)
        ident = min(KIND_CODES.get(keys[i].kind, 3) * (1 << 40) + keys[i].example_id for i in members)
        h = _mix(_mix(base ^ feature) ^ ident)
        dealt.append((stratum, h, ident, members))
    dealt.sort()
    side = [""] * len(keys)
    j, last = 0, None
    order = []
    for stratum, _, _, members in dealt:
        j = j + 1 if stratum == last else 0
        last = stratum
        s = "explain" if math.floor((j + 1) * fraction) > math.floor(j * fraction) else "score"
        for i in members:
            side[i] = s
        order.append(members)
    firing = [m for m in order if any(keys[i].activating for i in m)]
    if firing and not any(side[m[0]] == "explain" for m in firing):
        for i in firing[0]:
            side[i] = "explain"
    return side


def _random_keys(rng: random.Random, n_windows: int, n_texts: int) -> list[SplitKey]:
    keys = []
    for kind, count in (("top", rng.randrange(0, 12)), ("quantile", rng.randrange(0, 14)),
                        ("random", rng.randrange(0, 8)), ("background", rng.randrange(0, 2))):
        for j in range(count):
            w = rng.randrange(n_windows) if kind != "random" else 1000 + rng.randrange(n_windows + 3)
            keys.append(SplitKey(kind, j, j % 5 if kind == "quantile" else None, ("t", rng.randrange(n_texts)),
                                 None if rng.random() < 0.1 else w, kind in ("top", "quantile") and rng.random() < 0.8))
    return keys


@pytest.mark.parametrize("fraction", [0.5, 0.3])
def test_split_sides_equals_the_reference(fraction: float) -> None:
    rng = random.Random(7)
    for case in range(300):
        keys = _random_keys(rng, rng.choice([1, 2, 3, 8, 40]), rng.choice([2, 6, 100]))
        want = _reference(keys, "sae-x", case, fraction)
        assert split_sides(keys, "sae-x", case, explain_fraction=fraction) == want, case


def test_many_features_at_once_equal_one_at_a_time_in_any_order() -> None:
    """The columns of many features, shuffled, give each feature the sides it gets alone."""
    rng = random.Random(11)
    per = {f: _random_keys(rng, rng.choice([1, 3, 20]), rng.choice([3, 50])) for f in range(60)}
    rows = [(f, i, k) for f, keys in per.items() for i, k in enumerate(keys)]
    rng.shuffle(rows)
    texts: dict[object, int] = {}
    explain = split_explain_mask(
        "sae-x", np.array([f for f, _, _ in rows]),
        kind=np.array([KIND_CODES.get(k.kind, 3) for _, _, k in rows]),
        example_id=np.array([k.example_id for _, _, k in rows]),
        quantile=np.array([-1 if k.quantile is None else k.quantile for _, _, k in rows]),
        text=np.array([texts.setdefault(k.text, len(texts)) for _, _, k in rows]),
        window=np.array([-1 if k.window_index is None else k.window_index for _, _, k in rows]),
        activating=np.array([k.activating for _, _, k in rows]))
    got = {(f, i): "explain" if e else "score" for (f, i, _), e in zip(rows, explain.tolist(), strict=True)}
    for f, keys in per.items():
        assert [got[(f, i)] for i in range(len(keys))] == split_sides(keys, "sae-x", f)


def test_a_chain_of_shared_windows_and_texts_is_one_group() -> None:
    """a-b share a window, b-c a text, c-d a window: all four on one side, whatever the hash says."""
    keys = [SplitKey("top", 0, None, ("x",), 1, True), SplitKey("quantile", 0, 3, ("y",), 1, True),
            SplitKey("quantile", 1, 0, ("y",), 2, True), SplitKey("random", 0, None, ("z",), 2, False)]
    for f in range(40):
        assert len(set(split_sides(keys, "s", f))) == 1
