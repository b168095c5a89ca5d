"""Scoring of feature explanations, tested on planted features whose true description is known.

The planted SAE (tests/conftest.py) fires exactly on: feature 0 ' cat',' dog',' fox',' owl' (activation 1, 1.5, 2,
2.5 — so ' owl' is the strongest, ' cat' the weakest); 1 ' red',' green',' blue'; 2 ' Mary',' John'; 4 ' the'.
"""

from __future__ import annotations

import json
import random
import threading
import typing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import duckdb
import pytest
from autoexplain.agent import store as store_mod
from autoexplain.agent.store import MIGRATIONS, Store
from autoexplain.evals.features import (
    SPLITS,
    Example,
    examples_from_query,
    explanation_size,
    score_explanation,
    split_examples,
    split_rows,
    succinctness,
)
from autoexplain.evals.judges import (
    EmbeddingJudge,
    Judgement,
    LexicalJudge,
    LLMJudge,
    lexical_terms,
)
from autoexplain.tools.harvest import HarvestIn, harvest
from autoexplain.tools.models import load_model
from autoexplain.tools.registry import ToolContext
from autoexplain.tools.saes import load_sae

#: the true description of each planted feature, and false ones (each the true one of another feature, or none's)
TRUE = {0: "animals", 1: "colour words", 2: "people's names", 4: "the word ' the'"}
FALSE = [*TRUE.values(), "numbers", "punctuation"]
EXAMPLE_COLS = "kind, example_id, quantile, split, tokens, acts, max_act, window_index"


@pytest.fixture(scope="module")
def harvested(planted, one_thread, tmp_path_factory: pytest.TempPathFactory):
    """The planted SAE harvested over random word sequences (planted and non-planted words), split and stored."""
    root = tmp_path_factory.mktemp("scoring")
    rng = random.Random(0)
    vocab = ("the cat sat on mat and dog ran to park . Mary John went store , gave a drink red green blue fox owl "
             "10 11 12").split()
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(vocab) for _ in range(rng.randint(5, 12)))
                                for _ in range(400)) + "\n")
    lm = load_model(str(planted.model_dir), device="cpu")
    sae = load_sae(str(planted.sae_dir), lm)
    store = Store(root / "scores.duckdb")
    ctx = ToolContext(model=lm, saes={sae.sae_id: sae}, sink=store.upsert)
    harvest(ctx, HarvestIn(sae_id=sae.sae_id, dataset=str(corpus), n_tokens=8000, ctx=16, batch_size=16, top_k=20,
                           reservoir=100, n_quantiles=4, per_quantile=10, n_random=40, random_pool=256, left=6,
                           right=3), work_dir=root / "work")
    for f in planted.features:
        store.upsert("feature_examples", split_rows(split_examples(_examples(store, f), sae.sae_id, f), sae.sae_id, f))
    return store, sae.sae_id


def _examples(store: Store, f: int) -> list[Example]:
    return examples_from_query(*store.query(f"select {EXAMPLE_COLS} from feature_examples where feature_index = ? "
                                            "order by kind, example_id", [f]))


def _score(harvested, text: str, f: int, judge=None, **kw):
    store, sae_id = harvested
    return score_explanation(text, _examples(store, f), judge or LexicalJudge(), sae_id=sae_id, feature_index=f, **kw)


# ============================================================================= held-out split
def test_split_is_stored_deterministic_and_leak_free(harvested, planted) -> None:
    store, sae_id = harvested
    # every example of a planted feature has a side, and both sides hold activating and non-activating examples
    rows = store.query("select feature_index, split, kind, count(*) from feature_examples where feature_index in "
                       "(0, 1, 2, 4) group by all order by all")[1]
    assert {r[1] for r in rows} == set(SPLITS)
    for f in planted.features:
        for split in SPLITS:
            kinds = {r[2] for r in rows if r[0] == f and r[1] == split}
            assert kinds == {"top", "quantile", "random"}, (f, split, kinds)
    # no scored context was shown to the explainer: neither the same window nor the same tokens (checked in SQL)
    leaks = store.query("""select count(*) from feature_examples s join feature_examples e
        on s.sae_id = e.sae_id and s.feature_index = e.feature_index
        and (s.window_index = e.window_index or s.tokens::varchar = e.tokens::varchar)
        where s.split = 'score' and e.split = 'explain'""")[1][0][0]
    assert leaks == 0
    # the top windows that are also quantile samples exist here (the case delphi leaks on) and stay together
    shared = store.query("""select count(*) from feature_examples t join feature_examples q
        using (sae_id, feature_index, window_index) where t.kind = 'top' and q.kind = 'quantile'""")[1][0][0]
    assert shared > 0
    # deterministic: independent of row order; seeded by (sae_id, feature) — another feature index splits otherwise
    exs = _examples(store, 0)
    again = split_examples(list(reversed([e.model_copy(update={"split": None}) for e in exs])), sae_id, 0)
    assert {(e.kind, e.example_id): e.split for e in again} == {(e.kind, e.example_id): e.split for e in exs}
    other = split_examples(exs, sae_id, 99)
    assert [e.split for e in other] != [e.split for e in exs]
    # every quantile bin has examples on the score side (completeness needs them)
    bins = store.query("select count(distinct quantile) from feature_examples where feature_index = 0 and "
                       "kind = 'quantile' and split = 'score'")[1][0][0]
    assert bins == 4


def test_judgements_use_only_score_examples_and_are_stored(harvested) -> None:
    store, _ = harvested
    res = _score(harvested, TRUE[0], 0)
    rows = res.judgements
    assert rows and {r["scorer"] for r in rows} == {"detection", "fuzzing"}
    assert all(r["split"] == "score" for r in rows)
    explain = {(e.kind, e.example_id) for e in _examples(store, 0) if e.split == "explain"}
    assert not explain & {(r["example_kind"], r["example_id"]) for r in rows}
    store.upsert("judgements", rows)
    store.upsert("scores", [{**r, "explanation_id": res.explanation_id} for r in res.score_rows()])
    # in SQL: every judged example is a score-side example, no judged window was on the explain side
    bad = store.query("""select count(*) from judgements j join feature_examples x
        on x.sae_id = j.sae_id and x.feature_index = j.feature_index and x.kind = j.example_kind
        and x.example_id = j.example_id where x.split <> 'score'""")[1][0][0]
    assert bad == 0
    assert store.query("select count(*) from judgements")[1][0][0] == len(rows) == res.n_detection + res.n_fuzzing
    leak = store.query("""select count(*) from judgements j join feature_examples x
        on x.sae_id = j.sae_id and x.feature_index = j.feature_index and x.kind = j.example_kind
        and x.example_id = j.example_id join feature_examples e on e.sae_id = x.sae_id
        and e.feature_index = x.feature_index and e.window_index = x.window_index where e.split = 'explain'""")[1][0][0]
    assert leak == 0
    # balanced accuracy recomputed from the stored rows equals the reported correctness
    (ba,) = store.query("""select (avg(case when prediction then 1.0 else 0 end) filter (where truth)
        + avg(case when prediction then 0.0 else 1 end) filter (where not truth)) / 2
        from judgements where scorer = 'detection' and ok""")[1][0]
    assert ba == pytest.approx(res.correctness)
    metrics = dict(store.query("select metric, value from scores")[1])
    assert metrics["correctness"] == pytest.approx(res.correctness)
    assert set(metrics) >= {"correctness", "completeness", "succinctness", "detection", "fuzzing"}
    # re-scoring rewrites the same rows (idempotent ids)
    store.upsert("judgements", _score(harvested, TRUE[0], 0).judgements)
    assert store.query("select count(*) from judgements")[1][0][0] == len(rows)


# ============================================================================= the scorers on planted features
@pytest.mark.parametrize("f", [0, 1, 2, 4])
def test_true_description_beats_false_ones_on_correctness(harvested, f: int) -> None:
    true = _score(harvested, TRUE[f], f)
    assert true.correctness is not None and true.correctness > 0.85
    for text in FALSE:
        if text == TRUE[f]:
            continue
        other = _score(harvested, text, f)
        assert true.correctness > other.correctness + 0.2, (f, text, other.correctness)


@pytest.mark.parametrize("f", [0, 1, 2])
def test_too_broad_description_loses_on_correctness(harvested, f: int) -> None:
    true, broad = _score(harvested, TRUE[f], f), _score(harvested, "any word", f)
    assert broad.detection_recall == 1.0  # it does fire everywhere it says ...
    assert broad.correctness == pytest.approx(0.5, abs=0.05)  # ... and everywhere else too
    assert true.correctness > broad.correctness + 0.3


@pytest.mark.parametrize(("f", "narrow"), [(0, "the word ' owl'"), (0, "the word ' cat'"), (1, "the word ' blue'"),
                                           (2, "the token ' John'")])
def test_too_narrow_description_loses_on_completeness(harvested, f: int, narrow: str) -> None:
    true, part = _score(harvested, TRUE[f], f), _score(harvested, narrow, f)
    assert true.completeness is not None and true.completeness > 0.9
    assert part.completeness < true.completeness - 0.3
    assert min(part.quantile_recall.values()) < 0.5 < true.quantile_recall_mean


def test_top_only_description_misses_the_weak_quantiles(harvested) -> None:
    """The strongest token (' owl') explains the top bins; the weakest bins are where it fails."""
    part = _score(harvested, "the word ' owl'", 0)
    q = part.quantile_recall
    assert q[max(q)] > 0.8 and q[min(q)] < 0.2


def test_long_token_list_loses_on_succinctness(harvested) -> None:
    long = "the tokens ' cat', ' dog', ' fox', ' owl', ' kitten', ' puppy', ' wolf', ' bird', ' horse', ' cow'"
    a, b = _score(harvested, TRUE[0], 0), _score(harvested, long, 0)
    assert b.correctness == pytest.approx(a.correctness)  # as correct ...
    assert b.succinctness < a.succinctness / 4  # ... but far less succinct
    assert b.n_extra_disjuncts == 9


def test_succinctness_formula() -> None:
    assert succinctness("animals") == 1.0
    assert explanation_size("dogs or cats / birds, fish") == (5, 3)
    # monotone decreasing in words and in disjuncts; range (0, 1]
    texts = ["animals", "animal words", "names of animals", "names of animals in lists", "cats or dogs",
             "cats, dogs or birds", "cats, dogs, birds or fish"]
    values = [succinctness(t) for t in texts]
    assert all(0 < v <= 1 for v in values)
    assert values[0] > values[1] > values[2] > values[3]
    assert values[4] > values[5] > values[6]
    assert succinctness(" ".join(["word"] * 400)) > 0
    assert succinctness("cats or dogs") < succinctness("cats and dogs")


def test_lexical_terms() -> None:
    terms, numbers, universal = lexical_terms("words such as cat, dog or 'fox'")
    assert {"cat", "dog", "fox"} <= terms and not numbers and not universal
    assert "mary" in lexical_terms("people's names")[0]
    assert lexical_terms("numbers")[1] and lexical_terms("any token")[2]
    assert lexical_terms("the word ' the'")[0] == {"the"}


# ============================================================================= embedding judge
def test_embedding_judge_on_planted_features(harvested) -> None:
    judge = EmbeddingJudge()
    true = _score(harvested, "animals", 0, judge)
    assert true.embedding_auc > 0.9 and true.correctness > 0.8
    assert {r["scorer"] for r in true.judgements} == {"detection", "fuzzing", "embedding"}
    assert all(r["raw"]["threshold_from"] == "calibrated on explain split" for r in true.judgements
               if r["scorer"] == "detection")
    for text in ("colours", "people's names", "numbers", "any word"):
        other = _score(harvested, text, 0, judge)
        assert true.correctness > other.correctness + 0.15, (text, other.correctness)
        assert true.embedding_auc > other.embedding_auc, text
    # the lexical judge can carry an embedder for the embedding AUC alone
    mixed = _score(harvested, "animals", 0, LexicalJudge(), embedder=judge)
    assert mixed.embedding_auc == pytest.approx(true.embedding_auc)
    assert mixed.correctness == pytest.approx(_score(harvested, "animals", 0).correctness)


# ============================================================================= LLM judge against a scripted server
class _Script(BaseHTTPRequestHandler):
    calls: typing.ClassVar[list[int]] = []

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        user = body["messages"][-1]["content"]
        texts = [json.loads(line.split(". ", 1)[1]) for line in user.splitlines() if line[:1].isdigit()
                 and ". " in line]
        n = len(_Script.calls)
        _Script.calls.append(len(texts))
        animals = (" cat", " dog", " fox", " owl")
        if n % 3 == 1:
            content = "Sure! I think the answers are yes, no, yes."  # not JSON
        elif n % 3 == 2:
            content = json.dumps({"answers": [True]})  # wrong count
        elif "<<" in user:
            content = json.dumps({"answers": [all(any(a.strip() in seg for a in animals)
                                                  for seg in t.split("<<")[1:]) for t in texts]})
        else:
            content = json.dumps({"answers": [any(a in t for a in animals) for t in texts]})
        out = json.dumps({"id": f"c{n}", "object": "chat.completion", "created": 0, "model": body["model"],
                          "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                                       "message": {"role": "assistant", "content": content, "refusal": None}}],
                          "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        try:
            self.wfile.write(out)
        except BrokenPipeError:
            pass


@pytest.fixture
def fake_llm():
    _Script.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Script)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_llm_judge_garbage_becomes_failure_rows(harvested, fake_llm: str) -> None:
    judge = LLMJudge("fake-model", base_url=fake_llm, api_key="sk-fake", timeout_s=10, max_retries=0)
    res = _score(harvested, "animals", 0, judge, n_activating=15, n_nonactivating=15)
    rows = res.judgements
    assert judge.calls == len(_Script.calls) > 3
    failed = [r for r in rows if not r["ok"]]
    good = [r for r in rows if r["ok"]]
    # two calls in three fail (garbage, wrong count): every context of those calls is a failure row ...
    n_failed_calls = sum(1 for i, _ in enumerate(_Script.calls) if i % 3)
    assert len(failed) == sum(c for i, c in enumerate(_Script.calls) if i % 3) and n_failed_calls > 0
    # ... with no prediction (never a default 'no') and the error kept
    assert all(r["prediction"] is None and r["error"] for r in failed)
    assert any("ValidationError" in r["error"] for r in failed)
    assert any("expected" in r["error"] and "answers" in r["error"] for r in failed)
    assert all(isinstance(r["prediction"], bool) for r in good) and good
    assert res.n_failures == len(failed) and 0 < res.failure_rate < 1
    # metrics come from the successful rows only: the scripted judge is right whenever it answers
    assert res.correctness == pytest.approx(1.0)
    assert res.n_detection == 30


def test_llm_judge_all_failures_gives_no_score(harvested) -> None:
    class Broken:
        class chat:
            class completions:
                @staticmethod
                def parse(**kw):
                    raise ConnectionError("endpoint down")

    judge = LLMJudge("m", client=Broken())
    res = _score(harvested, "animals", 0, judge, n_activating=5, n_nonactivating=5)
    assert res.correctness is None and res.completeness is None and res.failure_rate == 1.0
    assert all(r["prediction"] is None and "endpoint down" in r["error"] for r in res.judgements)
    assert Judgement.failure("x").ok is False


# ============================================================================= store migration
def test_v1_database_is_migrated_to_v2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "v1.duckdb"
    monkeypatch.setattr(store_mod, "MIGRATIONS", MIGRATIONS[:1])
    old = Store(path)
    assert old.schema_version() == 1
    old.upsert("feature_examples", [{"sae_id": "s", "feature_index": 0, "kind": "top", "example_id": 0,
                                     "split": "score", "tokens": ["a"], "acts": [1.0]}])
    con = duckdb.connect(str(path), read_only=True)
    assert not con.execute("select count(*) from information_schema.tables where table_name = 'judgements'"
                           ).fetchall()[0][0]
    con.close()
    monkeypatch.setattr(store_mod, "MIGRATIONS", MIGRATIONS)
    new = Store(path)
    assert new.schema_version() == 2 == MIGRATIONS[-1].version
    assert new.query("select count(*) from feature_examples")[1] == [(1,)]  # nothing lost
    new.upsert("judgements", [{"judgement_id": "j", "explanation_id": "x", "sae_id": "s", "feature_index": 0,
                               "scorer": "detection", "judge": "lexical", "example_kind": "top", "example_id": 0,
                               "split": "score", "truth": True, "prediction": None, "ok": False, "error": "bad",
                               "raw": {"reply": "??"}, "created_at": store_mod._now()}])
    assert new.query("select ok, prediction, raw->>'reply' from judgements")[1] == [(False, None, "??")]


# ============================================================================= guards
def test_a_judgement_predicts_exactly_when_it_is_ok() -> None:
    with pytest.raises(ValueError, match="exactly when ok"):
        Judgement(prediction=None)  # a missing answer must never pass as an ok "no"
    with pytest.raises(ValueError, match="exactly when ok"):
        Judgement(prediction=False, ok=False)
    assert Judgement.failure("x").prediction is None


def test_half_split_examples_are_refused(harvested) -> None:
    exs = _examples(harvested[0], 0)
    mixed = [e.model_copy(update={"split": None}) if i % 2 else e for i, e in enumerate(exs)]
    with pytest.raises(ValueError, match="have no split"):
        score_explanation("animals", mixed, LexicalJudge(), sae_id=harvested[1], feature_index=0)


def test_embedding_calibration_is_never_reused_across_features() -> None:
    judge = EmbeddingJudge()
    assert judge.calibrate("animals", ["the cat"], ["the red"]) is not None
    assert judge.threshold_for("animals")[1] == "calibrated on explain split"
    assert judge.calibrate("animals", ["the cat"], []) is None  # another feature with nothing to calibrate on
    assert judge.threshold_for("animals")[1] != "calibrated on explain split"
