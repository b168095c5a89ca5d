"""Sharded harvest (issue 17 item 2): shards merged exactly equal one pass, byte for byte in the stored rows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autoexplain.agent.store import Store
from autoexplain.agent.store.harvest import harvest_sink
from autoexplain.tools.errors import InputError
from autoexplain.tools.harvest import HarvestIn, _admit, _push_sum, _State, harvest
from autoexplain.tools.harvest_merge import (
    ShardPartial,
    _merge_best,
    finish_shards,
    harvest_shard,
    harvest_sharded,
    plan_shards,
)
from autoexplain.tools.models import load_model
from autoexplain.tools.registry import ToolContext
from autoexplain.tools.saes import load_sae

SENTENCES = [
    "the cat sat on the mat and the dog ran to the park .",
    "Mary and John went to the store , John gave a drink to Mary .",
    "red green blue fox owl",
    "the owl and the fox sat on the red mat .",
    "10 11 12 13 14 15 16 17 18 19 20",
]
QUERIES = ("select * exclude (run_id) from features order by all",
           "select * exclude (run_id) from feature_examples order by all",
           "select * exclude (run_id, created_at) from harvests order by all")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "texts.txt"
    path.write_text("\n".join(SENTENCES[(i * 7) % len(SENTENCES)] for i in range(300)) + "\n")
    return path


@pytest.fixture(scope="module")
def planted_ctx(planted):
    lm = load_model(str(planted.model_dir), device="cpu")
    return lm, load_sae(str(planted.sae_dir), lm)


def _args(sae, dataset: Path, **kw) -> HarvestIn:
    # small kept sets and a small pool: top-k, samples and pool all overflow, so every merge path decides something
    base = dict(sae_id=sae.sae_id, dataset=str(dataset), n_tokens=3000, ctx=16, batch_size=8, top_k=5,
                reservoir=12, n_quantiles=4, per_quantile=2, n_random=5, random_pool=16)
    return HarvestIn(**{**base, **kw})


def _rows(store: Store) -> list[list[tuple]]:
    return [store.query(q)[1] for q in QUERIES]


def _one_pass(lm, sae, args: HarvestIn, root: Path) -> list[list[tuple]]:
    store = Store(root / "one.duckdb")
    harvest(ToolContext(model=lm, saes={sae.sae_id: sae}, sink=harvest_sink(store, "r")), args,
            work_dir=root / "one-work")
    return _rows(store)


def _sharded(lm, sae, args: HarvestIn, root: Path, bounds: list[int], name: str) -> list[list[tuple]]:
    store = Store(root / f"{name}.duckdb")
    out = harvest_sharded(ToolContext(model=lm, saes={sae.sae_id: sae}, sink=harvest_sink(store, "r")), args,
                          bounds=bounds, work_dir=root / f"{name}-work")
    assert out.n_tokens > 0
    return _rows(store)


def test_planted_shards_merge_to_the_single_pass(planted_ctx, corpus, tmp_path) -> None:
    """2 and 3 uneven shards of a planted SAE (many exactly equal activations: ties everywhere) store the single
    pass's rows exactly; so does a plan with an empty shard after the data ends."""
    lm, sae = planted_ctx
    args = _args(sae, corpus)
    batches = len(list(__import__("autoexplain.tools.data", fromlist=["x"]).iter_windows(
        __import__("autoexplain.tools.data", fromlist=["x"]).iter_texts(str(corpus)), lm.tokenizer, ctx=16,
        n_ctx=lm.n_ctx, batch_windows=8, max_tokens=3000)))
    assert batches >= 20  # enough batches for uneven shards and several levels of pairwise sums
    one = _one_pass(lm, sae, args, tmp_path)
    assert one[1], "the single pass stored examples"
    assert _sharded(lm, sae, args, tmp_path, [0, 7], "two") == one
    assert _sharded(lm, sae, args, tmp_path, [0, 3, 16], "three") == one
    assert _sharded(lm, sae, args, tmp_path, [0, batches - 1, batches + 5], "tail") == one


def test_toy_world_shards_merge_to_the_single_pass(tiny_zoo, tmp_path) -> None:
    """The toy world's trained TopK SAE on its own corpus: 2 and 3 uneven shards equal one pass; a partial that
    went through a file (what a remote worker sends back) merges the same."""
    lm = load_model(str(tiny_zoo.model_dir), device="cpu")
    sae = load_sae(str(tiny_zoo.sae_dir("res0")), lm)
    args = HarvestIn(sae_id=sae.sae_id, dataset=str(tiny_zoo.corpus), n_tokens=6000, ctx=24, batch_size=8,
                     top_k=6, reservoir=16, n_quantiles=4, per_quantile=2, n_random=4, random_pool=24)
    one = _one_pass(lm, sae, args, tmp_path)
    assert _sharded(lm, sae, args, tmp_path, [0, 20], "two") == one
    plan = plan_shards(args, bounds=[0, 5, 22])
    partials = []
    for shard in reversed(plan):  # workers finish in any order
        path = tmp_path / f"shard{shard.index}.pt"
        harvest_shard(lm, sae, args, shard).save(path)
        partials.append(ShardPartial.load(path))
    store = Store(tmp_path / "files.duckdb")
    finish_shards(ToolContext(model=lm, saes={sae.sae_id: sae}, sink=harvest_sink(store, "r")), args, partials,
                  work_dir=tmp_path / "files-work")
    assert _rows(store) == one


def test_shards_that_do_not_tile_the_stream_are_refused(planted_ctx, corpus, tmp_path) -> None:
    lm, sae = planted_ctx
    args = _args(sae, corpus, n_tokens=1000)
    a, b = plan_shards(args, 2)
    pa, pb = harvest_shard(lm, sae, args, a), harvest_shard(lm, sae, args, b)
    ctx = ToolContext(model=lm, saes={sae.sae_id: sae}, sink=lambda result: None)
    with pytest.raises(InputError, match="of one plan"):  # a shard missing
        finish_shards(ctx, args, [pa], work_dir=tmp_path / "w1")
    with pytest.raises(InputError, match="other arguments"):
        finish_shards(ctx, _args(sae, corpus, n_tokens=1000, top_k=4), [pa, pb], work_dir=tmp_path / "w2")
    with pytest.raises(InputError, match="not decrease"):
        plan_shards(args, bounds=[0, 5, 3])
    gap = harvest_shard(lm, sae, args, plan_shards(args, bounds=[0, b.first_batch + 1])[1])
    with pytest.raises(InputError, match="starts at batch"):
        finish_shards(ctx, args, [pa, gap], work_dir=tmp_path / "w3")


def test_pairwise_sums_do_not_depend_on_where_shards_are_cut() -> None:
    """Float64 sums pushed batch by batch, or as the blocks of any contiguous shards, give the same bits (a plain
    running sum of the same values generally does not)."""
    gen = torch.Generator().manual_seed(0)
    vals = [torch.rand(4, generator=gen, dtype=torch.float64) * 10 ** torch.randint(-8, 8, (4,), generator=gen)
            for _ in range(37)]

    def pushed(cuts: list[int]) -> torch.Tensor:
        merged = _State.empty(4, HarvestIn(sae_id="s", dataset="d"))
        for lo, hi in zip(cuts, [*cuts[1:], len(vals)], strict=True):
            part = _State.empty(4, HarvestIn(sae_id="s", dataset="d"))
            for i in range(lo, hi):
                _push_sum(part, i, 1, vals[i])
            for s, n, v in zip(part.sum_start, part.sum_len, part.sum_val, strict=True):
                _push_sum(merged, s, n, v)
        assert len(merged.sum_val) <= 6  # O(log batches) blocks
        return merged.act_sum()

    one = pushed([0])
    for cuts in ([0, 1], [0, 13], [0, 5, 6, 30], [0, 16, 32], list(range(37))):
        assert torch.equal(pushed(cuts), one), cuts


def test_admitting_in_batches_equals_merging_kept_sets_with_ties() -> None:
    """Adversarial ties: keys from a handful of values. Admitting candidates batch by batch keeps the best K under
    (key, tie rank of the window), and merging two halves' kept sets gives the same set."""
    gen = torch.Generator().manual_seed(3)
    f, k, n_batches, b = 6, 4, 9, 5
    batches = [torch.randint(0, 3, (f, b), generator=gen).float() for _ in range(n_batches)]

    def admit(which: range) -> tuple[torch.Tensor, torch.Tensor]:
        keys, wins = torch.full((f, k), -torch.inf), torch.full((f, k), -1, dtype=torch.int64)
        for i in which:
            # sparse candidates (the windows where the feature fires), offered in a scrambled order
            row, col = (batches[i] > 0).nonzero(as_tuple=True)
            perm = torch.randperm(row.numel(), generator=gen)
            key, win = batches[i][row, col][perm], (i * b + col)[perm]
            rows, slots, j = _admit(keys, wins, row[perm], key, win, True)
            assert len({(int(r), int(s)) for r, s in zip(rows, slots, strict=True)}) == len(rows)  # no slot twice
            keys[rows, slots], wins[rows, slots] = key[j], win[j]
        return keys, wins

    full_k, full_w = admit(range(n_batches))
    left, right = admit(range(4)), admit(range(4, n_batches))
    mk, mw = _merge_best(list(left), list(right), largest=True)
    allv = torch.cat(batches, 1)
    for r in range(f):
        # the expected set: firing windows by value desc, then by the window's tie rank
        order = sorted((-float(v), (w * 2654435761) % 2**32, w) for w, v in enumerate(allv[r].tolist()) if v > 0)
        want = {w for *_, w in order[:k]}
        assert {int(w) for w in full_w[r] if w >= 0} == want
        assert {int(w) for w in mw[r] if w >= 0} == want
