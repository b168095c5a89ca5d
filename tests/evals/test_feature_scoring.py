"""Scoring of feature explanations, tested on planted features whose true description is known.

The planted SAE (the ``planted`` fixture, built by evals/truth/planted_features.py) fires exactly on:
feature 0 ' cat',' dog',' fox',' owl' (activation 1, 1.5, 2, 2.5 — so ' owl' is the strongest, ' cat' the
weakest); 1 ' red',' green',' blue'; 2 ' Mary',' John'; 4 ' the'.
"""

from __future__ import annotations

import json
import math
import threading
import typing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import duckdb
import pytest

from autoexplain.agent.llm import LLMClient, LLMConfig
from autoexplain.agent.store import MIGRATIONS, Store
from autoexplain.agent.store import db as store_mod
from autoexplain.agent.store.harvest import rows_sink
from autoexplain.agent.store.rows import (
    feature_score_rows,
    judgement_set_rows,
    judgement_sets,
    score_id,
    split_rows,
    utc_now,
)
from autoexplain.evals.features import (
    SCORERS,
    SPLITS,
    Example,
    ExampleJudgement,
    ScorerOutcome,
    ScoringContext,
    examples_from_query,
    explanation_size,
    pearson,
    score_explanation,
    split_examples,
    succinctness,
)
from autoexplain.evals.judges import (
    JUDGES,
    EmbeddingJudge,
    Judgement,
    LexicalJudge,
    LLMJudge,
    Simulation,
    lexical_terms,
    make_judge,
)
from autoexplain.evals.scores import Score
from autoexplain.evals.truth.planted_features import (
    DEFAULT_VOCAB,
    PLANTED_DESCRIPTIONS,
    PLANTED_FEATURES,
    default_texts,
    load_planted,
    plant_features,
    vocab_for,
    write_corpus,
)
from autoexplain.tools.errors import InputError
from autoexplain.tools.harvest import HarvestIn, harvest
from autoexplain.tools.models import load_model
from autoexplain.tools.registry import ToolContext
from autoexplain.tools.saes import load_sae

#: the true description of each planted feature, and false ones (each the true one of another feature, or none's)
TRUE = dict(PLANTED_DESCRIPTIONS)
FALSE = [*TRUE.values(), "numbers", "punctuation"]
EXAMPLE_COLS = "kind, example_id, quantile, split, tokens, acts, max_act, window_index"


@pytest.fixture(scope="module")
def harvested(planted, one_thread, tmp_path_factory: pytest.TempPathFactory):
    """The planted SAE harvested over random word sequences (planted and non-planted words), split and stored."""
    root = tmp_path_factory.mktemp("scoring")
    corpus = write_corpus(root / "corpus.txt", default_texts(0, 400))
    lm = load_model(str(planted.model_dir), device="cpu")
    sae = load_sae(str(planted.sae_dir), lm)
    store = Store(root / "scores.duckdb")
    ctx = ToolContext(model=lm, saes={sae.sae_id: sae}, sink=rows_sink(store.upsert))
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
def test_harvested_rows_get_the_same_split_as_the_stored_one(harvested, planted) -> None:
    """``with_split`` (what a harvest's sink applies as it writes) matches ``split_examples`` feature by feature,
    and leaves rows whose feature already has a split alone."""
    from autoexplain.agent.store.rows import with_split

    store, _ = harvested
    cols, rows = store.query(f"select feature_index, sae_id, {EXAMPLE_COLS} from feature_examples "
                             "where feature_index in (0, 1) order by all")
    stored = [dict(zip(cols, r, strict=True)) for r in rows]
    fresh = with_split([{**r, "split": None} for r in stored])
    assert [r["split"] for r in fresh] == [r["split"] for r in stored]
    assert {r["split"] for r in fresh} == set(SPLITS)
    mixed = [{**r, "split": "explain" if r["feature_index"] == 0 else None} for r in stored]
    out = with_split(mixed)
    assert all(r["split"] == "explain" for r in out if r["feature_index"] == 0)
    assert [r["split"] for r in out if r["feature_index"] == 1] == [r["split"] for r in stored
                                                                    if r["feature_index"] == 1]


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
    assert rows and {r.scorer for r in rows} == {"detection", "fuzzing", "simulation"}
    assert all(r.split == "score" for r in rows)
    explain = {(e.kind, e.example_id) for e in _examples(store, 0) if e.split == "explain"}
    assert not explain & {(r.example_kind, r.example_id) for r in rows}
    store.upsert("judgement_sets", judgement_set_rows(res))
    store.upsert("scores", feature_score_rows(res))
    # in SQL: every judged example is a score-side example, no judged window was on the explain side
    bad = store.query("""select count(*) from judgements j join feature_examples x
        on x.sae_id = j.sae_id and x.feature_index = j.feature_index and x.kind = j.example_kind
        and x.example_id = j.example_id where x.split <> 'score'""")[1][0][0]
    assert bad == 0
    assert store.query("select count(*) from judgements")[1][0][0] == len(rows) == (
        res.n_detection + res.n_fuzzing + res.n_simulation)
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
    assert set(metrics) >= {"correctness", "completeness", "succinctness", "detection", "fuzzing", "simulation"}
    assert metrics["simulation"] == pytest.approx(res.simulation_correlation)
    # stored a set at a time (one row per scorer), read back per example, each the same as scored
    assert store.query("select count(*) from judgement_sets")[1][0][0] == 3
    got = store.query("select judgement_id, example_kind, example_id, truth, prediction, ok, raw from judgements")[1]
    assert sorted((g[0], g[1], g[2], g[3], g[4], g[5], json.loads(g[6])) for g in got) == sorted(
        (r.judgement_id, r.example_kind, r.example_id, r.truth, r.prediction, r.ok, r.raw)
        for r in rows)
    # re-scoring rewrites the same sets (idempotent ids)
    store.upsert("judgement_sets", judgement_set_rows(_score(harvested, TRUE[0], 0)))
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


# ' Mary' and ' John' fire equally (2.0) and share most windows of the planted corpus ("Mary and John went …"), so
# how much of feature 2 the narrow ' John' label covers depends on which of the tied windows the harvest keeps
# (a fixed scramble of the window index since result version 2): a smaller margin there
@pytest.mark.parametrize(("f", "narrow", "margin"), [(0, "the word ' owl'", 0.3), (0, "the word ' cat'", 0.3),
                                                     (1, "the word ' blue'", 0.3), (2, "the token ' John'", 0.15)])
def test_too_narrow_description_loses_on_completeness(harvested, f: int, narrow: str, margin: float) -> None:
    true, part = _score(harvested, TRUE[f], f), _score(harvested, narrow, f)
    assert true.completeness is not None and true.completeness > 0.9
    assert part.completeness < true.completeness - margin
    assert min(part.quantile_recall.values()) < 0.5 < true.quantile_recall_mean


def test_top_only_description_misses_the_weak_quantiles(harvested) -> None:
    """The strongest token (' owl') explains the top bins; the weakest bins are where it fails."""
    part = _score(harvested, "the word ' owl'", 0)
    q = part.quantile_recall
    bins = sorted(q)
    weak, strong = [q[b] for b in bins[: len(bins) // 2]], [q[b] for b in bins[len(bins) // 2:]]
    # every bin of the stronger half is recalled, every bin of the weaker half (a few held-out samples each) is
    # mostly missed
    assert min(strong) > 0.8 and max(weak) <= 0.2 and sum(weak) / len(weak) < 0.2


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


# ============================================================================= simulation
class _Oracle(LexicalJudge):
    """Simulates the true activations (``sign`` -1: their mirror image) — the scorer's r must be exactly ±1."""

    name = "oracle"

    def __init__(self, examples: list[Example], sign: int = 1) -> None:
        super().__init__()
        self.acts = {json.dumps(e.tokens): e.acts for e in examples}
        self.top = max(max(e.acts) for e in examples)
        self.sign = sign

    def judge_simulation(self, explanation, contexts):
        out = []
        for c in contexts:
            v = [10 * max(0.0, a) / self.top for a in self.acts[json.dumps(list(c))]]
            out.append(Simulation(values=v if self.sign > 0 else [10 - x for x in v]))
        return out


@pytest.mark.parametrize("f", [0, 1, 2, 4])
def test_simulation_correlation_on_planted_features(harvested, f: int) -> None:
    true = _score(harvested, TRUE[f], f)
    print(f, TRUE[f], true.simulation_correlation)
    assert true.simulation_correlation > 0.8
    for text in FALSE:
        if text != TRUE[f]:
            r = _score(harvested, text, f).simulation_correlation
            print("  false", text, r)
            assert r is None or r < 0.1, (f, text, r)  # near 0 or below; None: predicted 0 everywhere
    broad = _score(harvested, "any word", f).simulation_correlation
    print("  broad", broad)
    assert broad < 0.4 and broad < true.simulation_correlation - 0.5


def test_simulation_rows_and_metric(harvested) -> None:
    store, _ = harvested
    res = _score(harvested, TRUE[0], 0)
    rows = [r for r in res.judgements if r.scorer == "simulation"]
    det = [r for r in res.judgements if r.scorer == "detection"]
    # the same contexts as detection, score side only, truth = the context activates
    assert {(r.example_kind, r.example_id, r.truth) for r in rows} == {
        (r.example_kind, r.example_id, r.truth) for r in det}
    assert len(rows) == res.n_simulation and all(r.ok and r.split == "score" for r in rows)
    # "fires somewhere" agrees with the lexical judge's detection answer, and every activating context is found
    answer = {(r.example_kind, r.example_id): r.prediction for r in det}
    assert all(r.prediction == answer[(r.example_kind, r.example_id)] for r in rows)
    assert all(r.prediction for r in rows if r.truth)
    # r recomputed from the stored per-token predictions and the examples' activations (normalised to 0–10)
    acts = {(e.kind, e.example_id): e.acts for e in _examples(store, 0)}
    top = max(max(acts[(r.example_kind, r.example_id)]) for r in rows)
    pred = [v for r in rows for v in r.raw["values"]]
    truth = [10 * a / top for r in rows for a in acts[(r.example_kind, r.example_id)]]
    assert len(pred) == res.n_simulation_tokens
    assert pearson(pred, truth) == pytest.approx(res.simulation_correlation)
    # per-context r is stored where defined (activating contexts), absent where the truth is flat (negatives)
    assert all(("correlation" in r.raw) == r.truth for r in rows)
    # the lexical judge cannot grade: ' owl' (2.5) and ' cat' (1) both get 10, so r < 1 on the graded feature 0
    assert res.simulation_correlation < 0.999
    # correctness stays the detection balanced accuracy; the simulation r is its own metric
    assert res.correctness == res.detection_balanced_accuracy
    (row,) = [r for r in feature_score_rows(res) if r["metric"] == "simulation"]
    assert row["value"] == res.simulation_correlation and row["n"] == res.n_simulation


@pytest.mark.parametrize("f", [0, 1])
def test_simulation_of_the_truth_correlates_exactly(harvested, f: int) -> None:
    exs = _examples(harvested[0], f)
    assert _score(harvested, "x", f, _Oracle(exs)).simulation_correlation == pytest.approx(1.0)
    assert _score(harvested, "x", f, _Oracle(exs, -1)).simulation_correlation == pytest.approx(-1.0)


def test_simulation_guards() -> None:
    with pytest.raises(ValueError, match="exactly when ok"):
        Simulation(values=None)  # a missing simulation must never pass as "predicts 0"
    with pytest.raises(ValueError, match="exactly when ok"):
        Simulation(values=[0.0], ok=False)
    with pytest.raises(ValueError, match=r"in \[0, 10\]"):
        Simulation(values=[11.0])
    with pytest.raises(ValueError, match=r"in \[0, 10\]"):
        Simulation(values=[math.nan])
    assert Simulation.failure("x").values is None
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0) and pearson([1, 2, 3], [3, 2, 1]) == -1.0
    assert pearson([1, 1, 1], [1, 2, 3]) is None and pearson([1], [1]) is None
    # the lexical judge: 10 on the named tokens (also inside a multi-word term), 0 elsewhere
    (sim,) = LexicalJudge().judge_simulation("animals, and the phrase 'went to'", [["Mary", " went", " to", " the",
                                                                                      " fox", "."]])
    assert sim.values == [0, 10, 10, 0, 10, 0]


def test_embedding_judge_simulation(harvested) -> None:
    """MiniLM per token is crude: ask only that the true description correlates and beats the false ones."""
    judge = EmbeddingJudge()
    true = _score(harvested, "animals", 0, judge)
    print("embedding", true.simulation_correlation)
    assert true.simulation_correlation > 0.3
    assert all(r.raw["threshold_from"] == "calibrated on explain split" for r in true.judgements
               if r.scorer == "simulation")
    for text in ("colours", "numbers", "punctuation"):
        other = _score(harvested, text, 0, judge).simulation_correlation
        print("  embedding false", text, other)
        assert other is None or other < true.simulation_correlation - 0.3, text


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
    assert {r.scorer for r in true.judgements} == {"detection", "fuzzing", "embedding", "simulation"}
    assert all(r.raw["threshold_from"] == "calibrated on explain split" for r in true.judgements
               if r.scorer == "detection")
    for text in ("colours", "people's names", "numbers", "any word"):
        other = _score(harvested, text, 0, judge)
        assert true.correctness > other.correctness + 0.15, (text, other.correctness)
        assert true.embedding_auc > other.embedding_auc, text
    # the lexical judge can carry an embedder for the embedding AUC alone
    mixed = _score(harvested, "animals", 0, LexicalJudge(), embedder=judge)
    assert mixed.embedding_auc == pytest.approx(true.embedding_auc)
    assert mixed.correctness == pytest.approx(_score(harvested, "animals", 0).correctness)


# ============================================================================= LLM judge against a scripted server
ANIMALS = (" cat", " dog", " fox", " owl")


def _simulation_contexts(user: str) -> list[list[str]]:
    """The token lists of a simulation prompt (lines ``<text>.<position> <JSON token>``)."""
    out: dict[int, list[str]] = {}
    for line in user.splitlines():
        head, _, tok = line.partition(" ")
        i, dot, j = head.partition(".")
        if dot and i.isdigit() and j.isdigit():
            out.setdefault(int(i), []).append(json.loads(tok))
    return [out[i] for i in sorted(out)]


def _simulation_reply(n: int, contexts: list[list[str]]) -> str:
    """Every third call garbage; the next the first text's list one value short; else 10 on animals, 0 elsewhere."""
    if n % 3 == 1:
        return "Sure! The cat is a 10, everything else 0."  # not JSON
    values = [[10 if t in ANIMALS else 0 for t in c] for c in contexts]
    if n % 3 == 2:
        values[0] = values[0][:-1]  # wrong length for text 1 only
    return json.dumps({"activations": values})


class _Script(BaseHTTPRequestHandler):
    """Scripted judge: call n answers right when n % 3 == 0, garbage when 1, a wrong count/length when 2 — unless
    ``replies`` is set, in which case call n gets ``replies[n]`` verbatim."""

    calls: typing.ClassVar[list[int]] = []  # contexts per call
    kinds: typing.ClassVar[list[str]] = []  # detection | fuzzing | simulation per call
    replies: typing.ClassVar[list[str] | None] = None

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
        n = len(_Script.calls)
        if "simulating" in system:
            contexts = _simulation_contexts(user)
            _Script.calls.append(len(contexts))
            _Script.kinds.append("simulation")
            content = _simulation_reply(n, contexts)
        else:
            texts = [json.loads(line.split(". ", 1)[1]) for line in user.splitlines() if line[:1].isdigit()
                     and ". " in line]
            _Script.calls.append(len(texts))
            _Script.kinds.append("fuzzing" if "<<" in user else "detection")
            content = self._judge(n, user, texts)
        if _Script.replies is not None:
            content = _Script.replies[n]
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

    @staticmethod
    def _judge(n: int, user: str, texts: list[str]) -> str:
        animals = ANIMALS
        if n % 3 == 1:
            return "Sure! I think the answers are yes, no, yes."  # not JSON
        if n % 3 == 2:
            return json.dumps({"answers": [True]})  # wrong count
        if "<<" in user:
            return json.dumps({"answers": [all(any(a.strip() in seg for a in animals)
                                                   for seg in t.split("<<")[1:]) for t in texts]})
        return json.dumps({"answers": [any(a in t for a in animals) for t in texts]})


@pytest.fixture
def fake_llm():
    _Script.calls, _Script.kinds, _Script.replies = [], [], None
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Script)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def _llm_judge(base_url: str, on_call=None, **kw) -> LLMJudge:
    """An LLM judge on the agent's client pointed at the scripted server; no retries and no repair rounds, so each
    judge call is exactly one request (the script answers call by call)."""
    cfg = LLMConfig(model="fake-model", base_url=base_url, api_key="sk-fake", timeout_s=10, max_retries=0,
                    max_repairs=0)
    return LLMJudge(LLMClient(cfg, on_call=on_call), "fake-model", **kw)


def test_llm_judge_garbage_becomes_failure_rows(harvested, fake_llm: str) -> None:
    judge = _llm_judge(fake_llm, batch_size=5, simulation_batch=5)  # small batches: many calls, every fault kind
    res = _score(harvested, "animals", 0, judge, n_activating=15, n_nonactivating=15)
    rows = res.judgements
    assert judge.calls == len(_Script.calls) > 3
    failed = [r for r in rows if not r.ok]
    good = [r for r in rows if r.ok]
    # two calls in three fail (garbage, wrong count): every context of those calls is a failure row — except a
    # simulation reply whose first list alone has the wrong length: that context alone fails ...
    calls = list(zip(_Script.calls, _Script.kinds, strict=True))
    assert {k for _, k in calls} == {"detection", "fuzzing", "simulation"}
    expected = sum(1 if (i % 3 == 2 and k == "simulation") else c for i, (c, k) in enumerate(calls) if i % 3)
    assert len(failed) == expected and expected > 0
    # ... with no prediction (never a default 'no') and the error kept
    assert all(r.prediction is None and r.error for r in failed)
    # (the client's LLMBadOutput names the schema the reply failed to validate against, and why)
    assert any("no valid JudgeReply" in r.error and "Invalid JSON" in r.error for r in failed)
    assert any("expected" in r.error and "answers" in r.error for r in failed)
    sim_failed = [r for r in failed if r.scorer == "simulation"]
    assert any("no valid SimulationReply" in r.error and "Invalid JSON" in r.error for r in sim_failed)
    assert any(r.error.startswith("expected") and "values for text 1" in r.error
               for r in sim_failed)
    assert all("values" not in r.raw for r in sim_failed)  # a failure predicts nothing, not zeros
    assert all(isinstance(r.prediction, bool) for r in good) and good
    assert res.n_failures == len(failed) and 0 < res.failure_rate < 1
    # metrics come from the successful rows only: the scripted judge is right whenever it answers
    assert res.correctness == pytest.approx(1.0)
    assert res.n_detection == 30 == res.n_simulation
    # simulation: r over the successfully simulated contexts only; the script simulates like the lexical judge
    sim_ok = [r for r in good if r.scorer == "simulation"]
    assert sim_ok and all(len(r.raw["values"]) > 0 for r in sim_ok)
    assert res.simulation_correlation > 0.8
    assert res.n_simulation_tokens == sum(len(r.raw["values"]) for r in sim_ok)


def test_llm_simulation_replies(fake_llm: str) -> None:
    """Out-of-range values, wrong outer counts and refusals of a simulation reply are failures of every context."""
    judge = _llm_judge(fake_llm)
    contexts = [["The", " cat", " sat"], [" red", " owl"]]
    _Script.replies = [json.dumps({"activations": [[0, 7, 0], [0, 10]]}),
                       json.dumps({"activations": [[0, 11, 0], [0, 10]]}),  # 11 is off the scale
                       json.dumps({"activations": [[0, 7, 0]]}),  # one list for two texts
                       json.dumps({"activations": [[0, 2.5, 0], [0, 10]]})]  # not integers
    good = judge.judge_simulation("animals", contexts)
    assert [s.values for s in good] == [[0, 7, 0], [0, 10]] and all(s.ok for s in good)
    for _ in range(3):
        bad = judge.judge_simulation("animals", contexts)
        assert [s.ok for s in bad] == [False, False] and all(s.values is None and s.error for s in bad)
    # the prompt listed every token, numbered by text and position
    assert _Script.calls == [2, 2, 2, 2] and _Script.kinds == ["simulation"] * 4
    # more than SIMULATION_BATCH (40) contexts: one call per 40
    _Script.replies = None
    n0 = judge.calls
    out = judge.judge_simulation("animals", [[" cat"]] * 41)
    assert judge.calls - n0 == 2 and len(out) == 41


def test_llm_judge_all_failures_gives_no_score(harvested) -> None:
    class Broken:
        def structured(self, messages, schema, *, purpose):
            raise ConnectionError("endpoint down")

    judge = LLMJudge(Broken(), "m")
    res = _score(harvested, "animals", 0, judge, n_activating=5, n_nonactivating=5)
    assert res.correctness is None and res.completeness is None and res.failure_rate == 1.0
    assert res.simulation_correlation is None and res.n_simulation_tokens == 0
    assert all(r.prediction is None and "endpoint down" in r.error for r in res.judgements)
    assert Judgement.failure("x").ok is False


def test_llm_judge_calls_go_through_the_client_as_judge_calls(fake_llm: str) -> None:
    """The judge never builds its own endpoint client: every call is the client's (logged with purpose 'judge');
    a client that returns the bare reply works too; a configuration error stops the run, never a failure row."""
    records: list[dict] = []
    judge = _llm_judge(fake_llm, on_call=records.append)
    assert judge.name == "llm:fake-model"
    out = judge.judge_detection("animals", [[" the", " cat"], [" red"]])
    assert [j.prediction for j in out] == [True, False]
    assert [r["purpose"] for r in records] == ["judge"] and records[0]["ok"]

    class Bare:
        def structured(self, messages, schema, *, purpose):
            assert purpose == "judge" and messages[0]["role"] == "system"
            return schema(answers=[True, False])

    assert [j.prediction for j in LLMJudge(Bare(), "m").judge_detection("x", [["a"], ["b"]])] == [True, False]

    class Misconfigured:
        def structured(self, messages, schema, *, purpose):
            raise InputError("the LLM endpoint rejected the API key")

    with pytest.raises(InputError, match="API key"):
        LLMJudge(Misconfigured(), "m").judge_detection("x", [["a"]])


def test_judges_are_one_catalogue_entry_each(fake_llm: str) -> None:
    assert set(JUDGES) == {"lexical", "embedding", "llm"}
    assert make_judge("lexical").name == "lexical"
    assert make_judge("lexical", lexicon={"animal": frozenset({"cat"})}).name.startswith("lexical:")
    assert isinstance(make_judge("embedding"), EmbeddingJudge)
    client = LLMClient(LLMConfig(model="fake-model", base_url=fake_llm, api_key="sk-fake", max_retries=0))
    judge = make_judge("llm", llm_client=client, model_name="fake-model")
    assert isinstance(judge, LLMJudge) and judge.name == "llm:fake-model" and judge.client is client
    with pytest.raises(InputError, match="needs an LLM client"):
        make_judge("llm", model_name="fake-model")
    with pytest.raises(InputError, match="unknown judge 'oracle'.*lexical, embedding, llm"):
        make_judge("oracle")


def test_a_new_scorer_is_one_catalogue_entry(harvested) -> None:
    """A scorer added to the catalogue is run after the others (their results unchanged), and its metric and
    judgements are stored like theirs."""

    def constant(ctx: ScoringContext) -> ScorerOutcome:
        e = ctx.positives[0]
        return ScorerOutcome(metrics=[Score(metric="constant", value=0.5, n=1, details={"why": "test"})],
                             judgements=[ctx.judged("constant", "none", e, True, Judgement(prediction=True))])

    base = _score(harvested, TRUE[0], 0)
    res = _score(harvested, TRUE[0], 0, scorers={**SCORERS, "constant": constant})
    assert res.model_dump(exclude={"metrics", "judgements", "scored_at", "n_failures", "failure_rate"}) == \
        base.model_dump(exclude={"metrics", "judgements", "scored_at", "n_failures", "failure_rate"})
    rows = {r["metric"]: r for r in feature_score_rows(res)}
    assert rows["constant"]["value"] == 0.5 and rows["constant"]["details"] == {
        "judge": "lexical", "sae_id": harvested[1], "feature_index": 0, "split": "score", "n_failures": 0,
        "why": "test"}
    assert {r["metric"] for r in feature_score_rows(base)} == set(rows) - {"constant"}
    sets = {(r["scorer"], r["judge"]): r for r in judgement_set_rows(res)}
    assert sets["constant", "none"]["judgement_ids"] == [res.judgements[-1].judgement_id]


def test_feature_score_rows_have_stable_ids_and_the_judge_in_details(harvested) -> None:
    res = _score(harvested, TRUE[0], 0)
    rows = feature_score_rows(res)
    assert [r["metric"] for r in rows] == ["correctness", "completeness", "succinctness", "detection",
                                           "quantile_recall", "fuzzing", "embedding_auc", "simulation",
                                           "token_detection"]
    # token level runs only for dense features (no non-activating window): here it says so
    assert rows[-1]["value"] is None and rows[-1]["details"]["reason"].startswith("not run")
    for r in rows:
        assert r["score_id"] == score_id(res.explanation_id, r["metric"], "lexical")
        assert list(r["details"])[:5] == ["judge", "sae_id", "feature_index", "split", "n_failures"]
    again = feature_score_rows(_score(harvested, TRUE[0], 0))
    assert [r["score_id"] for r in again] == [r["score_id"] for r in rows]
    assert [(r["value"], r["n"], r["details"]) for r in again] == [(r["value"], r["n"], r["details"]) for r in rows]


# ============================================================================= store migration
def test_v1_database_is_migrated_to_the_current_schema(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
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
    assert new.schema_version() == MIGRATIONS[-1].version >= 2  # v2 (judgements) and any later migration
    assert new.query("select count(*) from feature_examples")[1] == [(1,)]  # nothing lost
    new.upsert("judgement_sets", judgement_sets([ExampleJudgement(
        judgement_id="j", scorer="detection", judge="lexical", example_kind="top", example_id=0, split="score",
        truth=True, prediction=None, ok=False, error="bad", raw={"reply": "??"})], explanation_id="x", sae_id="s",
        feature_index=0, created_at=utc_now()))
    assert new.query("select ok, prediction, raw->>'reply' from judgements")[1] == [(False, None, "??")]


def test_v3_judgements_move_into_sets_and_read_back_unchanged(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Migration 4 stores judgements a set at a time; the rows a v3 database held read back the same (view)."""
    path = tmp_path / "v3.duckdb"
    monkeypatch.setattr(store_mod, "MIGRATIONS", MIGRATIONS[:3])
    old = Store(path)
    now = utc_now()
    rows = [{"judgement_id": f"j{i}", "explanation_id": f"x{i % 2}", "sae_id": "s", "feature_index": 3,
             "scorer": "detection" if i < 4 else "fuzzing", "judge": "lexical", "example_kind": "top",
             "example_id": i, "split": "score", "truth": i % 3 == 0, "prediction": None if i == 5 else i % 2 == 0,
             "ok": i != 5, "error": "bad reply" if i == 5 else None, "raw": {"i": i}, "created_at": now}
            for i in range(7)]
    names = list(rows[0])
    with old.transaction() as con:  # (v3 wrote judgements row by row; the declared tables no longer include it)
        con.executemany(f"insert into judgements ({', '.join(names)}) values ({', '.join('?' * len(names))})",
                        [[json.dumps(r[k]) if k == "raw" else r[k] for k in names] for r in rows])
    cols = ("judgement_id, explanation_id, sae_id, feature_index, scorer, judge, example_kind, example_id, split, "
            "truth, prediction, ok, error, json(raw)::varchar, created_at")  # (json(): minified)
    before = sorted(old.query(f"select {cols} from judgements")[1])
    monkeypatch.setattr(store_mod, "MIGRATIONS", MIGRATIONS)
    new = Store(path)
    assert new.schema_version() >= 4
    assert new.query("select count(*) from judgement_sets")[1] == [(4,)]  # (x0|x1) x (detection|fuzzing)
    assert sorted(new.query(f"select {cols} from judgements")[1]) == before


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


# ============================================================================= planted features as a library
def test_planted_fixture_is_the_library_construction(planted, tmp_path: Path) -> None:
    assert planted.features == dict(PLANTED_FEATURES) and planted.d_sae == 8
    assert load_planted(planted.model_dir.parent) == planted  # the manifest round-trips
    # activations 1 + 0.5·rank, by token id
    assert [planted.strengths[t] for t in planted.token_ids[0]] == [1.0, 1.5, 2.0, 2.5]
    assert planted.activation(0, planted.token_ids[0][3]) == 2.5 and planted.activation(1, planted.token_ids[0][0]) == 0
    # a corpus for harvesting: deterministic, every planted word present, unplanted words too
    texts = default_texts(3, 50)
    assert texts == default_texts(3, 50) != default_texts(4, 50)
    words = {w for t in texts for w in t.split()}
    assert {w.strip() for ws in PLANTED_FEATURES.values() for w in ws} <= words and {"park", "10"} <= words
    assert vocab_for({0: (" horse", " bear")}, ["ran", "horse"]) == ("horse", "bear", "ran")
    assert set(vocab_for({0: (" horse",)})) == {"horse"} | (set(DEFAULT_VOCAB) - {
        w.strip() for ws in PLANTED_FEATURES.values() for w in ws})


def test_plant_features_refuses_bad_layouts(tiny_gpt2_dir: Path, tiny_neox_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'elephantine'.*exactly one token|exactly one token.*' elephantine'"):
        plant_features(tiny_gpt2_dir, tmp_path / "a", {0: (" cat", " elephantine")}, ())
    with pytest.raises(ValueError, match=r"\[1\] are neither planted nor dead"):
        plant_features(tiny_gpt2_dir, tmp_path / "b", {0: (" cat",), 2: (" dog",)}, ())
    with pytest.raises(ValueError, match="' cat' is planted in features 0 and 1"):
        plant_features(tiny_gpt2_dir, tmp_path / "h", {0: (" cat",), 1: (" dog", " cat")}, ())
    with pytest.raises(ValueError, match="both planted and dead"):
        plant_features(tiny_gpt2_dir, tmp_path / "c", {0: (" cat",)}, (0,))
    with pytest.raises(ValueError, match="resid_pre.0 only"):
        plant_features(tiny_gpt2_dir, tmp_path / "d", {0: (" cat",)}, (), hook_site="resid_post.0")
    with pytest.raises(ValueError, match="d_model = 32"):
        plant_features(tiny_gpt2_dir, tmp_path / "e", {40: (" cat",)}, tuple(range(40)))
    with pytest.raises(ValueError, match="GPT-2 model"):
        plant_features(tiny_neox_dir, tmp_path / "g", {0: (" cat",)}, ())
    assert not (tmp_path / "a").exists() and not (tmp_path / "g").exists()  # nothing half-built
    plant_features(tiny_gpt2_dir, tmp_path / "f", {0: (" cat",)}, ())
    with pytest.raises(FileExistsError, match="overwrite"):
        plant_features(tiny_gpt2_dir, tmp_path / "f", {0: (" cat",)}, ())
    again = plant_features(tiny_gpt2_dir, tmp_path / "f", {0: (" dog",)}, (), overwrite=True)
    assert again.features == {0: (" dog",)}


def test_plant_features_on_a_toy_zoo_model(tiny_zoo, tmp_path: Path) -> None:
    """The zoo tokenizer makes every category word one token: any of them can be planted; the features are exact."""
    from autoexplain.tools.registry import default_registry

    cats = json.loads((tiny_zoo.root / "corpus" / "categories.json").read_text())
    features = {0: tuple(f" {w}" for w in cats["animal"][4:7]), 1: tuple(f" {w}" for w in cats["food"][:2]),
                2: (" Alice", " Bob")}
    p = plant_features(tiny_zoo.model_dir, tmp_path / "zoo-planted", features, (3,))
    assert p.d_sae == 4 and [p.strengths[t] for t in p.token_ids[0]] == [1.0, 1.5, 2.0]
    lm = load_model(str(p.model_dir), device="cpu")
    sae = load_sae(str(p.sae_dir), lm)
    texts = [f"Alice saw a{features[0][2]} eat{features[1][1]} with Bob and the{features[0][0]}."]
    out = default_registry().call(ToolContext(model=lm, saes={sae.sae_id: sae}), "feature_activations",
                                  {"sae_id": sae.sae_id, "features": [0, 1, 2, 3], "texts": texts})
    ids = lm.to_tokens(texts[0])[0].tolist()
    for trace in out.items[0].features:
        assert trace.activations == pytest.approx([p.activation(trace.feature, t) for t in ids], abs=1e-4)
    fired = {t.feature: t.max for t in out.items[0].features}
    assert fired[0] == pytest.approx(2.0) and fired[1] == pytest.approx(1.5) and fired[2] == pytest.approx(1.5)
    assert fired[3] == 0.0  # dead
    with pytest.raises(ValueError, match="exactly one token"):
        plant_features(tiny_zoo.model_dir, tmp_path / "bad", {0: (" hippopotamus",)}, ())


def test_a_custom_lexicon_names_the_judge_the_same_in_every_process() -> None:
    """Issue 19 (soak): the name hashed ``repr`` of frozensets, whose order follows the per-process string hash;
    a resumed item's scores then got new ids (the judge is part of them) and duplicated the old ones."""
    import os
    import subprocess
    import sys

    words = "{'cat', 'dog', 'owl', 'fox', 'cow', 'bee', 'ant', 'elk', 'yak', 'emu'}"
    code = ("from autoexplain.evals.judges import make_judge; "
            f"print(make_judge('lexical', lexicon={{'animal': frozenset({words})}}).name)")
    names = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout.strip() for seed in range(8)}
    assert len(names) == 1 and next(iter(names)).startswith("lexical:"), names


# ============================================================================= rare features and small n (issue 12)
def _synthetic(n_windows: int, n_random: int = 6) -> list:
    """A feature that fires on ' owl' in ``n_windows`` windows: each window one top and one quantile example
    (the harvest keeps both for a rare feature), plus ``n_random`` non-activating random windows."""
    from autoexplain.evals.features import Example

    out = []
    for w in range(n_windows):
        toks, acts = ["the", " owl", " sat", f" {w}"], [0.0, 1.5 + w / 10, 0.0, 0.0]
        out.append(Example(kind="top", example_id=w, tokens=toks, acts=acts, max_act=max(acts), window_index=w))
        out.append(Example(kind="quantile", example_id=100 + w, quantile=w % 10, tokens=toks, acts=acts,
                           max_act=max(acts), window_index=w))
    for r in range(n_random):
        toks = ["the", " cat", " ran", f" {r}"]
        out.append(Example(kind="random", example_id=200 + r, tokens=toks, acts=[0.0] * 4, max_act=0.0,
                           window_index=1000 + r))
    return out


@pytest.mark.parametrize("n_windows", [1, 2, 3, 5, 10])
@pytest.mark.parametrize("feature", range(6))
def test_split_keeps_an_activating_window_to_explain(n_windows: int, feature: int) -> None:
    split = split_examples(_synthetic(n_windows), "sae-rare", feature)
    sides: dict[str, set[int]] = {"explain": set(), "score": set()}
    for e in split:
        if e.activating:
            sides[e.split].add(e.window_index)
    assert len(sides["explain"]) >= 1  # one window: explained from; two or more: one at least on each side
    if n_windows >= 2:
        assert len(sides["score"]) >= 1
    for e in split:  # a window never straddles the split
        assert all(o.split == e.split for o in split if o.window_index == e.window_index)


def test_wilson_interval_and_the_balanced_accuracy_interval() -> None:
    from autoexplain.evals.features import balanced_accuracy_interval, wilson_interval

    assert wilson_interval(0, 0) is None
    lo, hi = wilson_interval(1, 1)  # one success in one trial: far from certain
    assert lo == pytest.approx(0.2065, abs=1e-3) and hi == 1.0
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-3) and hi == pytest.approx(0.7634, abs=1e-3)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and 0 < hi < 0.2
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
    iv = balanced_accuracy_interval(4, 4, 6, 6)
    r, s = wilson_interval(4, 4), wilson_interval(6, 6)
    assert iv == pytest.approx((1 - ((1 - r[0]) ** 2 + (1 - s[0]) ** 2) ** 0.5 / 2, 1.0))  # MOVER at r = s = 1
    assert iv[1] == 1.0 and iv[0] < 0.75  # perfect on 10 examples still leaves a wide interval
    big = balanced_accuracy_interval(400, 400, 600, 600)
    assert big[0] > 0.985 and big[0] > iv[0] + 0.2  # ... which narrows with n
    assert balanced_accuracy_interval(1, 1, 0, 0) is None


@pytest.mark.parametrize(("n_pos", "n_neg", "tpr", "tnr"), [(10, 10, 0.8, 0.7), (5, 15, 0.6, 0.9),
                                                          (30, 30, 0.95, 0.5), (8, 4, 0.5, 0.5)])
def test_the_balanced_accuracy_interval_covers_the_truth_about_95_percent_of_the_time(n_pos: int, n_neg: int,
                                                                                        tpr: float,
                                                                                        tnr: float) -> None:
    """Coverage by simulation (seeded): the interval contains the true BA in roughly 95 % of draws, at small n too
    (neither collapsing like Wald nor ballooning like Bonferroni-averaged bounds)."""
    import random

    from autoexplain.evals.features import balanced_accuracy_interval

    rng = random.Random(7)
    truth, hits, widths = (tpr + tnr) / 2, 0, []
    for _ in range(4000):
        tp = sum(rng.random() < tpr for _ in range(n_pos))
        tn = sum(rng.random() < tnr for _ in range(n_neg))
        lo, hi = balanced_accuracy_interval(tp, n_pos, tn, n_neg)
        hits += lo <= truth <= hi
        widths.append(hi - lo)
    assert 0.925 <= hits / 4000 <= 0.99, hits / 4000
    assert sum(widths) / len(widths) < 0.5


@pytest.mark.parametrize("n_windows", [2, 5, 10])
def test_scores_of_a_rare_feature_carry_n_and_an_interval(n_windows: int) -> None:
    res = score_explanation("the token 'owl'", _synthetic(n_windows), LexicalJudge(), sae_id="sae-rare",
                            feature_index=0)
    assert res.correctness is not None and res.n_positive >= 1 and res.n_negative >= 1
    lo, hi = res.correctness_interval
    assert 0.0 <= lo <= res.correctness <= hi <= 1.0
    assert res.detection_recall_interval is not None and res.detection_specificity_interval is not None
    (corr,) = [s for s in res.scores() if s.metric == "correctness"]
    assert corr.details["interval"] == [lo, hi] and corr.details["n_positive"] == res.n_positive
    assert corr.details["confidence"] == 0.95 and "reason" not in corr.details
    (det,) = [s for s in res.scores() if s.metric == "detection"]
    assert det.details["recall_interval"] is not None and det.details["specificity_interval"] is not None


def test_a_feature_with_one_window_has_no_score_and_says_why() -> None:
    res = score_explanation("the token 'owl'", _synthetic(1), LexicalJudge(), sae_id="sae-rare", feature_index=0)
    assert res.n_explain_examples >= 2  # its window (top + quantile) was explained from
    assert res.correctness is None and res.correctness_interval is None and res.n_positive == 0
    assert "no score-side activating example" in res.reasons["correctness"]
    assert "completeness" in res.reasons and res.completeness is None
    by = {s.metric: s for s in res.scores()}
    assert by["correctness"].value is None and "no score-side activating" in by["correctness"].details["reason"]
    assert by["completeness"].details["reason"] and by["fuzzing"].details["reason"]
    assert by["simulation"].value is None and by["simulation"].details["reason"]
    assert by["succinctness"].value is not None  # needs no examples
