"""Harvest: known answers on planted features, streaming bounds, resume equals an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from autoexplain.agent.store import Store
from autoexplain.agent.store.harvest import rows_sink
from autoexplain.tools.errors import InputError
from autoexplain.tools.harvest import HarvestIn, harvest
from autoexplain.tools.models import load_model
from autoexplain.tools.registry import ToolContext, default_registry
from autoexplain.tools.saes import load_sae

SENTENCES = [
    "the cat sat on the mat and the dog ran to the park .",
    "Mary and John went to the store , John gave a drink to Mary .",
    "red green blue fox owl",
    "the owl and the fox sat on the red mat .",
    "10 11 12 13 14 15 16 17 18 19 20",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "texts.txt"
    lines = [SENTENCES[(i * 7) % len(SENTENCES)] for i in range(300)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def planted_ctx(planted):
    lm = load_model(str(planted.model_dir), device="cpu")
    sae = load_sae(str(planted.sae_dir), lm)
    return lm, sae


def _run(planted_ctx, db: Path, corpus: Path, **kw) -> tuple[Store, object]:
    lm, sae = planted_ctx
    store = Store(db)
    ctx = ToolContext(model=lm, saes={sae.sae_id: sae}, sink=rows_sink(store.upsert))
    args = HarvestIn(sae_id=sae.sae_id, dataset=str(corpus), n_tokens=3000, ctx=16, batch_size=8, top_k=5,
                     reservoir=20, n_quantiles=4, per_quantile=2, n_random=5, random_pool=32, **kw)
    return store, harvest(ctx, args, work_dir=db.parent / "work")


def test_planted_features_known_answers(planted, planted_ctx, corpus, tmp_path) -> None:
    lm, sae = planted_ctx
    store, out = _run(planted_ctx, tmp_path / "h.duckdb", corpus)
    # the exact count of each feature's tokens in the harvested windows (BOS and padding excluded)
    from autoexplain.tools.data import iter_texts, iter_windows

    counts = {f: 0 for f in planted.features}
    n_tok = 0
    for b in iter_windows(iter_texts(str(corpus)), lm.tokenizer, ctx=16, n_ctx=lm.n_ctx, batch_windows=8,
                          max_tokens=3000):
        toks = b.tokens[:, 1:][b.valid[:, 1:]]
        n_tok += toks.numel()
        for f, ids in planted.token_ids.items():
            counts[f] += sum(int((toks == t).sum()) for t in ids)
    assert out.n_tokens == n_tok
    rows = dict((r[0], r[1:]) for r in store.query(
        "select feature_index, density, is_dead, max_act from features order by 1")[1])
    for f in planted.features:
        density, dead, max_act = rows[f]
        assert density == pytest.approx(counts[f] / n_tok, abs=1e-12), f
        assert not dead
        assert max_act == pytest.approx(max(planted.strengths[t] for t in planted.token_ids[f]), abs=1e-3)
    for f in planted.dead:
        assert rows[f][0] == 0.0 and rows[f][1] is True
        assert store.query("select count(*) from feature_examples where feature_index = ? and kind <> 'random'",
                           [f])[1][0][0] == 0
    # top contexts of feature f: the max token is one of its tokens, and every firing token is one of them
    words = {f: {lm.tokenizer.decode([t]) for t in ids} for f, ids in planted.token_ids.items()}
    for f in planted.features:
        ex = store.query("select tokens, acts, max_act, kind from feature_examples where feature_index = ? "
                         "and kind in ('top', 'quantile')", [f])[1]
        assert ex and len([e for e in ex if e[3] == "top"]) == 5
        for tokens, acts, mx, _ in ex:
            tokens, acts = json.loads(tokens), json.loads(acts)
            assert mx > 0
            assert {t for t, a in zip(tokens, acts, strict=True) if a > 0} <= words[f]
            assert all((a > 0) == (t in words[f]) for t, a in zip(tokens, acts, strict=True))
        # non-activating examples contain none of the feature's tokens
        for (tokens,) in store.query("select tokens from feature_examples where feature_index = ? and "
                                     "kind = 'random'", [f])[1]:
            assert not set(json.loads(tokens)) & words[f]
    # quantile samples of a feature with several strengths span weak and strong activations
    qs = store.query("select quantile, max_act from feature_examples where feature_index = 0 and "
                     "kind = 'quantile' order by quantile", [])[1]
    assert qs[0][1] <= qs[-1][1] and qs[0][0] == 0
    # logit effects are stored for a residual-stream SAE
    top = json.loads(store.query("select top_logits from features where feature_index = 0")[1][0][0])
    assert len(top) == 10 and isinstance(top[0][0], str)
    assert out.n_dead == len(planted.dead)
    assert "dead" in out.summary() and len(out.summary()) < 2000


def _stop_after(n: int) -> Callable[[int, int], None]:
    """A progress callback that interrupts the pass once ``n`` batches are done (as a user's Ctrl-C would)."""

    def progress(done: int, total: int) -> None:
        if done >= n:
            raise KeyboardInterrupt(f"stopped after {done} of {total} batches")

    return progress


def test_interrupted_harvest_resumes_to_the_same_result(planted_ctx, corpus, tmp_path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    store_a, _ = _run(planted_ctx, tmp_path / "a" / "h.duckdb", corpus)
    with pytest.raises(KeyboardInterrupt):
        lm, sae = planted_ctx
        store = Store(tmp_path / "b" / "h.duckdb")
        ctx = ToolContext(model=lm, saes={sae.sae_id: sae}, sink=rows_sink(store.upsert))
        args = HarvestIn(sae_id=sae.sae_id, dataset=str(corpus), n_tokens=3000, ctx=16, batch_size=8, top_k=5,
                         reservoir=20, n_quantiles=4, per_quantile=2, n_random=5, random_pool=32,
                         checkpoint_every=2)
        harvest(ctx, args, work_dir=tmp_path / "b" / "work", progress=_stop_after(7))
    assert store.query("select count(*) from features")[1][0][0] == 0  # nothing stored from a partial run
    store_b, out = _run(planted_ctx, tmp_path / "b" / "h.duckdb", corpus, checkpoint_every=2)
    assert out.resumed_from_batch == 7
    for q in ("select * from features order by all", "select * exclude (run_id) from feature_examples order by all"):
        assert store_a.query(q)[1] == store_b.query(q)[1]


def test_bad_harvest_arguments(planted_ctx, corpus) -> None:
    lm, sae = planted_ctx
    ctx = ToolContext(model=lm, saes={sae.sae_id: sae}, sink=lambda result: None)
    reg = default_registry()
    with pytest.raises(InputError, match="unknown sae_id"):
        reg.call(ctx, "harvest", {"sae_id": "nope", "dataset": str(corpus)})
    with pytest.raises(InputError, match="exceeds the model's context"):
        reg.call(ctx, "harvest", {"sae_id": sae.sae_id, "dataset": str(corpus), "ctx": 4096})
    with pytest.raises(InputError, match="does not exist"):
        reg.call(ctx, "harvest", {"sae_id": sae.sae_id, "dataset": "./missing.txt", "ctx": 16})
    with pytest.raises(InputError, match="somewhere to store"):
        reg.call(ToolContext(model=lm, saes={sae.sae_id: sae}), "harvest",
                 {"sae_id": sae.sae_id, "dataset": str(corpus)})


def test_kill_9_then_resume_equals_uninterrupted(planted, planted_ctx, tmp_path) -> None:
    """A real harvest process killed with SIGKILL mid-run, then started again, stores what an uninterrupted run
    stores (and does not redo the batches finished before the kill)."""
    corpus = tmp_path / "big.txt"
    corpus.write_text("\n".join(SENTENCES[(i * 7) % len(SENTENCES)] for i in range(3000)) + "\n")
    cache = tmp_path / "cache"
    env = {**os.environ, "AUTOEXPLAIN_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "autoexplain.agent.cli", "harvest", "--model", str(planted.model_dir),
           "--sae", str(planted.sae_dir), "--dataset", str(corpus), "--tokens", "30000", "--ctx", "16",
           "--batch-size", "8", "--top-k", "5", "--checkpoint-every", "5", "--db", str(tmp_path / "k.duckdb"),
           "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if list(cache.glob("harvest/*/state.pt")):
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"harvest ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-800:]
    assert "resumed after batch" in " ".join(again.stdout.split())
    assert not list(cache.glob("harvest/*")), "the work dir is removed once results are stored"

    from autoexplain.agent.store.harvest import harvest_sink

    lm, sae = planted_ctx
    ref = Store(tmp_path / "ref.duckdb")  # (written as the CLI writes: examples with their held-out split)
    harvest(ToolContext(model=lm, saes={sae.sae_id: sae}, sink=harvest_sink(ref, "ref")),
            HarvestIn(sae_id=sae.sae_id, dataset=str(corpus), n_tokens=30000, ctx=16, batch_size=8, top_k=5),
            work_dir=tmp_path / "refwork")
    killed = Store(tmp_path / "k.duckdb")
    for q in ("select * exclude (run_id) from features order by all",
              "select * exclude (run_id) from feature_examples order by all"):
        assert killed.query(q)[1] == ref.query(q)[1]
