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

    _assert_rows_equal_an_uninterrupted_harvest(planted_ctx, corpus, tmp_path, tmp_path / "k.duckdb")


def test_ctrl_c_says_what_was_kept_and_the_same_command_resumes(planted, planted_ctx, tmp_path) -> None:
    """SIGINT mid-harvest: exit 130, one line naming the run (marked interrupted) and the checkpoint folder; the same
    command then resumes after the finished batches."""
    corpus = tmp_path / "big.txt"
    corpus.write_text("\n".join(SENTENCES[(i * 7) % len(SENTENCES)] for i in range(3000)) + "\n")
    cache = tmp_path / "cache"
    env = {**os.environ, "AUTOEXPLAIN_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    db = tmp_path / "i.duckdb"
    cmd = [sys.executable, "-m", "autoexplain.agent.cli", "harvest", "--model", str(planted.model_dir),
           "--sae", str(planted.sae_dir), "--dataset", str(corpus), "--tokens", "30000", "--ctx", "16",
           "--batch-size", "8", "--top-k", "5", "--checkpoint-every", "5", "--db", str(db), "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if list(cache.glob("harvest/*/state.pt")):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "harvest ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-800:]
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("autoexplain: interrupted: run harvest-") and "checkpointed in" in last, last
    assert "Traceback" not in err
    assert Store(db).query("select status from runs")[1] == [("interrupted",)]
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-800:]
    assert "resumed after batch" in " ".join(again.stdout.split())


def _assert_rows_equal_an_uninterrupted_harvest(planted_ctx, corpus: Path, tmp_path: Path, db: Path, *,
                                                n_tokens: int = 30000) -> None:
    """``db``'s feature rows equal those of one uninterrupted in-process harvest of the same inputs (the CLI's
    30,000 tokens, ctx 16, batch 8, top 5), written as the CLI writes them (examples with their held-out split)."""
    from autoexplain.agent.store.harvest import harvest_sink

    lm, sae = planted_ctx
    ref = Store(tmp_path / "ref.duckdb")
    harvest(ToolContext(model=lm, saes={sae.sae_id: sae}, sink=harvest_sink(ref, "ref")),
            HarvestIn(sae_id=sae.sae_id, dataset=str(corpus), n_tokens=n_tokens, ctx=16, batch_size=8, top_k=5),
            work_dir=tmp_path / "refwork")
    got = Store(db)
    for q in ("select * exclude (run_id) from features order by all",
              "select * exclude (run_id) from feature_examples order by all"):
        assert got.query(q)[1] == ref.query(q)[1]


# ============================================================================= issue 19: work folders, reuse, notes
def _args(sae, corpus: Path, **kw) -> HarvestIn:
    base = dict(sae_id=sae.sae_id, dataset=str(corpus), n_tokens=3000, ctx=16, batch_size=8, top_k=5, reservoir=20,
                n_quantiles=4, per_quantile=2, n_random=5, random_pool=32)
    return HarvestIn(**{**base, **kw})


def test_a_work_folder_has_one_owner(planted_ctx, corpus, tmp_path) -> None:
    """Issue 19 (1): two harvests of the same inputs shared one work folder with no lock (wrong contexts stored,
    the other crashed). The folder is keyed by every input and owned by one holder; the second is refused."""
    from autoexplain.tools.harvest import harvest_work
    from autoexplain.tools.locks import LockBusy

    lm, sae = planted_ctx
    store = Store(tmp_path / "h.duckdb")
    ctx = ToolContext(model=lm, saes={sae.sae_id: sae}, sink=rows_sink(store.upsert))
    with harvest_work(lm.model_id, sae.sae_id, _args(sae, corpus), root=tmp_path / "work") as owned:
        with pytest.raises(LockBusy, match="another process is harvesting the same SAE, dataset and arguments"):
            harvest(ctx, _args(sae, corpus), work_dir=tmp_path / "work")
        # other inputs (a token budget, a changed dataset) are another folder, harvested side by side
        other = harvest(ctx, _args(sae, corpus, n_tokens=2000), work_dir=tmp_path / "work")
        assert other.harvest_id != owned.identity.harvest_id
    assert store.query("select count(*) from features")[1] == [(sae.d_sae,)]


def test_two_harvest_processes_of_the_same_inputs(planted, planted_ctx, tmp_path) -> None:
    """Issue 19 (1), end to end: two ``autoexplain harvest`` of the same inputs at once (into two databases, as in
    the report). The second is refused with one line and exit code 2, writing nothing; the first stores exactly
    what a harvest alone stores."""
    corpus = tmp_path / "big.txt"
    # enough text that the first harvest still holds its folder while the second starts (seconds under load)
    corpus.write_text("\n".join(SENTENCES[(i * 7) % len(SENTENCES)] for i in range(30000)) + "\n")
    cache = tmp_path / "cache"
    env = {**os.environ, "AUTOEXPLAIN_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}

    def cmd(db: str) -> list[str]:
        return [sys.executable, "-m", "autoexplain.agent.cli", "harvest", "--model", str(planted.model_dir),
                "--sae", str(planted.sae_dir), "--dataset", str(corpus), "--tokens", "300000", "--ctx", "16",
                "--batch-size", "8", "--top-k", "5", "--checkpoint-every", "2", "--db", str(tmp_path / db),
                "--device", "cpu"]

    first = subprocess.Popen(cmd("a.duckdb"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None and not list(cache.glob("harvest/*/state.pt")):
            time.sleep(0.01)
        assert first.poll() is None, f"the first harvest ended too soon: {first.stderr.read().decode()[-500:]}"
        second = subprocess.run(cmd("b.duckdb"), env=env, capture_output=True, text=True, timeout=300)
        assert first.wait(timeout=300) == 0, first.stderr.read().decode()[-800:]
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 2, second.stderr[-800:]
    lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "another process is harvesting the same SAE" in lines[0], lines
    assert not (tmp_path / "b.duckdb").exists()  # refused before the database was opened
    assert not list(cache.glob("harvest/*"))  # the work folder and its lock are gone
    _assert_rows_equal_an_uninterrupted_harvest(planted_ctx, corpus, tmp_path, tmp_path / "a.duckdb",
                                                n_tokens=300000)


def test_stored_harvest_is_reused_only_for_the_same_inputs(planted_ctx, corpus, tmp_path) -> None:
    """Issue 19 (3): once an SAE had feature rows they were reused whatever dataset and token budget were asked
    for. Rows now record their harvest, reuse needs the same model, SAE, dataset identity, tokens and ctx, and a
    new harvest of the SAE replaces the old one's rows (both harvests stay in ``harvests``)."""
    from autoexplain.agent.store.harvest import harvest_sink, reuse_decision
    from autoexplain.tools.harvest import harvest_identity

    lm, sae = planted_ctx
    short = tmp_path / "short.txt"
    short.write_text("cat\n")
    store = Store(tmp_path / "h.duckdb")
    ctx = ToolContext(model=lm, saes={sae.sae_id: sae}, sink=harvest_sink(store, "r1"))

    def decide(data: Path, **kw) -> str | None:
        return reuse_decision(store, harvest_identity(lm.model_id, sae.sae_id, _args(sae, data, **kw)),
                              sae_spec="my-sae", d_sae=sae.d_sae)

    assert decide(short) is None  # nothing stored: harvest
    out = harvest(ctx, _args(sae, short), work_dir=tmp_path / "work")
    assert out.note and "gave only" in out.note and "WARNING" in out.summary_text()  # (5): not silent
    assert store.query("select note from harvests")[1] == [(out.note,)]  # and stored
    assert decide(short) == "reuse"
    for kw, data in (({}, corpus), ({"n_tokens": 999}, short), ({"ctx": 12}, short)):
        with pytest.raises(InputError, match=r"SAE my-sae is already harvested in this database from .*short\.txt"
                                             r".* autoexplain harvest --sae my-sae") as e:
            decide(data, **kw)
        assert "\n" not in str(e.value)
        # the file is unchanged: only the token budget, ctx or path differ, and the refusal must not say otherwise
        assert "changed since" not in str(e.value)
    short.write_text("cat dog\n")  # the same path, other content
    with pytest.raises(InputError, match="the file changed since"):
        decide(short)
    # harvesting the real corpus replaces the rows: nothing of the short harvest is left in features/examples
    out2 = harvest(ctx, _args(sae, corpus), work_dir=tmp_path / "work")
    assert out2.note is None and out2.harvest_id != out.harvest_id
    assert store.query("select distinct harvest_id from features")[1] == [(out2.harvest_id,)]
    assert store.query("select distinct harvest_id from feature_examples")[1] == [(out2.harvest_id,)]
    assert store.query("select count(*) from harvests")[1] == [(2,)]
    assert decide(corpus) == "reuse"
    # rows whose harvest is not recorded (older files, rows_sink): reused, with a note that says so
    legacy = Store(tmp_path / "legacy.duckdb")
    harvest(ToolContext(model=lm, saes={sae.sae_id: sae}, sink=rows_sink(legacy.upsert)), _args(sae, corpus),
            work_dir=tmp_path / "work")
    note = reuse_decision(legacy, harvest_identity(lm.model_id, sae.sae_id, _args(sae, corpus)), sae_spec="s",
                          d_sae=sae.d_sae)
    assert note is not None and "were not recorded" in note


def test_crashed_harvest_folders_do_not_pile_up(planted_ctx, corpus, tmp_path) -> None:
    """Issue 19 (9): a crashed harvest's folder stayed in the cache for ever. Folders no command can resume (the
    dataset changed) or untouched for a week are removed when a harvest starts; an owned folder never is."""
    from autoexplain.tools.harvest import STALE_WORK_DAYS, harvest_work, prune_work

    lm, sae = planted_ctx
    data = tmp_path / "d.txt"
    data.write_text(corpus.read_text())
    root = tmp_path / "work"
    with harvest_work(lm.model_id, sae.sae_id, _args(sae, data), root=root) as crashed:
        (crashed.path / "state.pt").write_bytes(b"x")
    with harvest_work(lm.model_id, sae.sae_id, _args(sae, corpus, n_tokens=100), root=root) as old:
        pass
    os.utime(old.path, (time.time() - (STALE_WORK_DAYS + 1) * 86400,) * 2)
    with harvest_work(lm.model_id, sae.sae_id, _args(sae, corpus), root=root) as owned:
        assert prune_work(root) == []  # the dataset is unchanged and the folder is fresh; the owned one is kept
        assert crashed.path.exists() and owned.path.exists() and not old.path.exists()
        data.write_text("other text\n")
        assert prune_work(root) == [crashed.path]  # can never resume: its dataset changed
    assert owned.path.exists()


# ============================================================================= issue 12 (4): bounded memory
def _rows(store: Store) -> dict[str, list[tuple]]:
    return {q: store.query(q)[1] for q in ("select * exclude (run_id) from features order by all",
                                            "select * exclude (run_id) from feature_examples order by all")}


@pytest.mark.parametrize("cut", ["features", "tokens"])
def test_sub_batched_encoder_gives_the_firings_of_one_encode(cut, planted_ctx, tmp_path, monkeypatch) -> None:
    """The model sees a batch in groups of windows (FORWARD_TOKENS); the encoder sees it in feature blocks (a
    StandardSAE: all tokens, a few features at a time) or, where features are not independent, in token
    sub-batches (dense output bounded by FEATURE_BLOCK_BYTES / ENCODE_BYTES) and keeps only non-zero entries:
    exactly the entries, values and order of ``nonzero()`` on one forward and one dense encode of the whole batch,
    BOS and padding dropped."""
    import torch

    from autoexplain.tools import harvest as hv
    from autoexplain.tools.data import iter_texts, iter_windows
    from autoexplain.tools.saes import FeatureSliceEncoder, feature_activations

    lm, sae = planted_ctx
    assert FeatureSliceEncoder.of(sae) is not None
    monkeypatch.setattr(hv, "FORWARD_TOKENS", 3 * 16)  # the model sees 3, 3 and 2 windows of a batch of 8
    if cut == "tokens":
        monkeypatch.setattr(FeatureSliceEncoder, "of", classmethod(lambda cls, loaded: None))
        monkeypatch.setattr(hv, "ENCODE_BYTES", 4 * sae.d_sae * 10)  # about 10 tokens per encode
        assert len(hv._token_chunks(8 * 16, sae.d_sae)) > 5
    else:
        monkeypatch.setattr(hv, "FEATURE_BLOCK_BYTES", 4 * 8 * 16 * 4)  # 4 features per block
        assert len(hv._feature_blocks(sae.d_sae, 8 * 16)) == 2
    data = tmp_path / "few.txt"  # runs out mid-window: the last window is padded, and padding must be dropped too
    data.write_text("\n".join(SENTENCES * 4) + "\n")
    batches = list(iter_windows(iter_texts(str(data)), lm.tokenizer, ctx=16, n_ctx=lm.n_ctx, batch_windows=8,
                                max_tokens=10_000))
    assert not batches[-1].valid.all()
    n_fired = 0
    for batch in batches:
        fired, mask = hv._batch_firings(lm, sae, batch.tokens, batch.valid)
        dense = feature_activations(lm, sae, batch.tokens).float() * mask[..., None]
        b, t, f = dense.nonzero(as_tuple=True)
        assert fired.shape == tuple(dense.shape)
        for got, want in ((fired.b, b), (fired.t, t), (fired.f, f), (fired.val, dense[b, t, f])):
            assert torch.equal(got, want)
        n_fired += len(b)
    assert n_fired > 50


def test_chunked_encode_and_assembly_store_the_same_rows(planted_ctx, corpus, tmp_path, monkeypatch) -> None:
    """Running the model on a few windows at a time, encoding in tiny feature blocks (or, for an architecture that
    cannot be cut by features, tiny token sub-batches) and assembling/writing a few features per chunk stores
    exactly the rows of one forward and one encode per batch and one chunk for all features."""
    from autoexplain.tools import harvest as hv

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    lm, sae = planted_ctx
    assert len(hv._feature_chunks(sae.d_sae, 20, lm.model.cfg.d_vocab)) == 1
    store_a, _ = _run(planted_ctx, tmp_path / "a" / "h.duckdb", corpus)
    monkeypatch.setattr(hv, "FORWARD_TOKENS", 3 * 16)
    monkeypatch.setattr(hv, "FEATURE_BLOCK_BYTES", 4 * 8 * 16 * 4)  # 4 features per block
    monkeypatch.setattr(hv, "ENCODE_BYTES", 4 * sae.d_sae * 10)
    monkeypatch.setattr(hv, "EXAMPLES_PER_CHUNK", 40)  # 2 features per chunk
    assert len(hv._feature_chunks(sae.d_sae, 20, lm.model.cfg.d_vocab)) == 4
    store_b, _ = _run(planted_ctx, tmp_path / "b" / "h.duckdb", corpus)
    assert _rows(store_a) == _rows(store_b)
    from autoexplain.tools.saes import FeatureSliceEncoder

    monkeypatch.setattr(FeatureSliceEncoder, "of", classmethod(lambda cls, loaded: None))  # token sub-batches
    (tmp_path / "c").mkdir()
    store_c, _ = _run(planted_ctx, tmp_path / "c" / "h.duckdb", corpus)
    assert _rows(store_a) == _rows(store_c)


def test_a_sink_failing_part_way_keeps_the_old_harvest(planted_ctx, corpus, tmp_path, monkeypatch) -> None:
    """The store writes a harvest chunk by chunk inside one transaction: an error after some chunks were written
    rolls all of them back (the old harvest stays, whole); the re-run resumes after the pass and stores what an
    uninterrupted harvest stores."""
    import dataclasses

    from autoexplain.agent.store.harvest import harvest_sink
    from autoexplain.tools import harvest as hv

    lm, sae = planted_ctx
    monkeypatch.setattr(hv, "EXAMPLES_PER_CHUNK", 40)  # 4 chunks of 2 features
    store = Store(tmp_path / "h.duckdb")
    first = harvest(ToolContext(model=lm, saes={sae.sae_id: sae}, sink=harvest_sink(store, "r1")),
                    _args(sae, corpus, n_tokens=1500), work_dir=tmp_path / "work")
    before = _rows(store)
    assert before[next(iter(before))]
    real = harvest_sink(store, "r2")
    written: list[int] = []

    def failing(result) -> None:
        def chunks():
            for i, chunk in enumerate(result.chunks):
                if i == 3:
                    raise OSError("disk full")
                written.append(len(chunk.examples))
                yield chunk

        real(dataclasses.replace(result, chunks=chunks()))

    ctx = ToolContext(model=lm, saes={sae.sae_id: sae}, sink=failing)
    with pytest.raises(OSError, match="disk full"):
        harvest(ctx, _args(sae, corpus), work_dir=tmp_path / "work")
    assert len(written) == 3 and sum(written) > 0  # rows of three chunks went into the transaction ...
    assert _rows(store) == before  # ... and were rolled back with it
    assert store.query("select harvest_id from harvests")[1] == [(first.harvest_id,)]
    again = harvest(ToolContext(model=lm, saes={sae.sae_id: sae}, sink=real), _args(sae, corpus),
                    work_dir=tmp_path / "work")
    assert again.resumed_from_batch > 0
    ref = Store(tmp_path / "ref.duckdb")
    harvest(ToolContext(model=lm, saes={sae.sae_id: sae}, sink=harvest_sink(ref, "r3")), _args(sae, corpus),
            work_dir=tmp_path / "refwork")
    assert _rows(store) == _rows(ref)


def test_a_checkpoint_of_the_old_layout_is_not_resumed(planted_ctx, corpus, tmp_path) -> None:
    """STATE_VERSION 2 keeps per-token activations as the example slice: a version-1 checkpoint (whole windows)
    in the work folder is ignored, and the harvest starts over, with the result of a fresh run."""
    import torch

    from autoexplain.tools.harvest import STATE_VERSION, harvest_work

    lm, sae = planted_ctx
    assert STATE_VERSION == 3
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    store_a, _ = _run(planted_ctx, tmp_path / "a" / "h.duckdb", corpus)
    args = _args(sae, corpus)
    with harvest_work(lm.model_id, sae.sae_id, args, root=tmp_path / "b" / "work") as owned:
        torch.save({"version": 1, "args": args.model_dump(), "state": {"batches_done": 3}}, owned.path / "state.pt")
    store_b, out = _run(planted_ctx, tmp_path / "b" / "h.duckdb", corpus)
    assert out.resumed_from_batch == 0
    assert _rows(store_a) == _rows(store_b)


def test_the_write_memory_cap_does_not_outlive_the_harvest(planted_ctx, corpus, tmp_path) -> None:
    """harvest_sink caps DuckDB's memory while it writes (the open transaction spills instead of growing); on a
    connection the store holds across writes, the limit is back to DuckDB's default afterwards."""
    from autoexplain.agent.store.harvest import harvest_sink

    lm, sae = planted_ctx
    store = Store(tmp_path / "h.duckdb")
    setting = "select current_setting('memory_limit'), current_setting('threads')"
    with store.hold(idle_s=60):
        before = store.query(setting)[1]
        harvest(ToolContext(model=lm, saes={sae.sae_id: sae}, sink=harvest_sink(store, "r")), _args(sae, corpus),
                work_dir=tmp_path / "work")
        assert store.query(setting)[1] == before
    assert store.query("select count(*) from features")[1] == [(sae.d_sae,)]


def test_windows_longer_than_the_saes_training_context_are_refused(planted_ctx, corpus, tmp_path) -> None:
    """An SAE whose config records context_size 8 (sae-lens' training windows, BOS included): a 16-token harvest is
    refused before anything is written; the default window fits it."""
    import dataclasses

    from autoexplain.tools.harvest import default_ctx

    lm, sae = planted_ctx
    short = dataclasses.replace(sae, context_size=8)
    assert default_ctx(lm.n_ctx, short) == 8 and default_ctx(lm.n_ctx, sae) == min(64, lm.n_ctx)
    with pytest.raises(InputError, match="exceeds SAE .* training context_size of 8"):
        _run((lm, short), tmp_path / "h.duckdb", corpus)
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())
    no_bos = dataclasses.replace(sae, prepend_bos=False)
    with pytest.raises(InputError, match="without a BOS token"):
        _run((lm, no_bos), tmp_path / "h2.duckdb", corpus)


def test_the_finish_reports_its_progress_chunk_by_chunk(planted_ctx, corpus, tmp_path, monkeypatch) -> None:
    """The finish (logit effects, example assembly, writes: minutes for a wide SAE) reports each feature chunk."""
    from autoexplain.tools import harvest as hv

    lm, sae = planted_ctx
    monkeypatch.setattr(hv, "EXAMPLES_PER_CHUNK", 40)  # 2 features per chunk
    calls: list[tuple[int, int]] = []
    store = Store(tmp_path / "f.duckdb")
    ctx = ToolContext(model=lm, saes={sae.sae_id: sae}, sink=rows_sink(store.upsert))
    args = HarvestIn(sae_id=sae.sae_id, dataset=str(corpus), n_tokens=3000, ctx=16, batch_size=8, top_k=5,
                     reservoir=20, n_quantiles=4, per_quantile=2, n_random=5, random_pool=32)
    per_feature = args.top_k + args.n_quantiles * args.per_quantile + args.n_random
    n = len(hv._feature_chunks(sae.d_sae, per_feature, lm.model.cfg.d_vocab))
    assert n > 1
    harvest(ctx, args, work_dir=tmp_path / "work", finish_progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, n) for i in range(1, n + 1)]


def test_the_columnar_store_writer_equals_the_row_path(planted_ctx, corpus, tmp_path) -> None:
    """harvest_sink writes examples as one Arrow table per chunk (examples_table: no dict per row); its rows equal,
    value for value and JSON text for JSON text, those of the row path (example_row + with_split + upsert)."""
    from autoexplain.agent.store.harvest import harvest_sink

    lm, sae = planted_ctx
    args = _args(sae, corpus)
    by_rows = Store(tmp_path / "rows.duckdb")
    harvest(ToolContext(model=lm, saes={sae.sae_id: sae}, sink=rows_sink(by_rows.upsert, split=True)), args,
            work_dir=tmp_path / "w1")
    by_table = Store(tmp_path / "table.duckdb")
    harvest(ToolContext(model=lm, saes={sae.sae_id: sae}, sink=harvest_sink(by_table, "r")), args,
            work_dir=tmp_path / "w2")
    for q, n in (("select * exclude (run_id, harvest_id) from features order by all", 8),
                 ("select * exclude (run_id, harvest_id) from feature_examples order by all", 50)):
        got, want = by_table.query(q)[1], by_rows.query(q)[1]
        assert got == want and len(want) >= n
    # the JSON texts go in typed as JSON, unchecked by DuckDB: every one must parse, as the same array
    assert by_table.query("select count(*) from feature_examples where not json_valid(tokens) or not json_valid(acts) "
                          "or json_array_length(tokens) <> json_array_length(acts)")[1] == [(0,)]
    splits = dict(by_table.query("select split, count(*) from feature_examples group by 1")[1])
    assert splits.get("explain") and splits.get("score") and None not in splits


def test_the_finish_maps_the_checkpoint_chunk_by_chunk(planted_ctx, corpus, tmp_path, monkeypatch) -> None:
    """A harvest's finish holds no state in memory: it maps the final checkpoint once for the statistics and anew
    for every chunk of features (each mapping let go with its chunk)."""
    from autoexplain.tools import harvest as hv

    lm, sae = planted_ctx
    monkeypatch.setattr(hv, "EXAMPLES_PER_CHUNK", 40)  # several chunks
    args = _args(sae, corpus)
    per_feature = args.top_k + args.n_quantiles * args.per_quantile + args.n_random
    n_chunks = len(hv._feature_chunks(sae.d_sae, per_feature, lm.model.cfg.d_vocab))
    assert n_chunks > 1
    mapped: list[Path] = []
    real = hv._mapped_state
    monkeypatch.setattr(hv, "_mapped_state", lambda path: mapped.append(path) or real(path))
    store, _ = _run(planted_ctx, tmp_path / "h.duckdb", corpus)
    assert len(mapped) == 1 + n_chunks and len(set(mapped)) == 1 and mapped[0].name == "state.pt"
    assert store.query("select count(distinct feature_index) from features")[1] == [(sae.d_sae,)]


def test_folding_one_batch_behind_equals_folding_in_turn(planted_ctx, corpus) -> None:
    """BatchFolder folds each batch on a second thread while the next one runs through the model: the state is
    bit for bit that of running and folding the batches one after the other on one thread."""
    import torch

    from autoexplain.tools import harvest as hv
    from autoexplain.tools.data import iter_texts, iter_windows

    lm, sae = planted_ctx
    args = _args(sae, corpus)
    batches = list(iter_windows(iter_texts(args.dataset), lm.tokenizer, ctx=args.ctx, n_ctx=lm.n_ctx,
                                batch_windows=args.batch_size, max_tokens=args.n_tokens))
    assert len(batches) > 2
    serial, behind = hv._State.empty(sae.d_sae, args), hv._State.empty(sae.d_sae, args)
    for i, batch in enumerate(batches):
        fired, mask = hv._batch_firings(lm, sae, batch.tokens, batch.valid)
        hv._fold(serial, fired, mask, batch.n_windows, i, serial.windows_done, args)
    with hv.BatchFolder(lm, sae, args, behind) as folder:
        for i, batch in enumerate(batches):
            folder.fold(batch, i)
    for name, want in serial.to_dict().items():
        got = behind.to_dict()[name]
        if name == "sum_val":
            assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)) and len(got) == len(want)
        else:
            assert torch.equal(got, want) if isinstance(want, torch.Tensor) else got == want, name
    assert serial.batches_done == len(batches) and serial.fire_count.sum() > 0
