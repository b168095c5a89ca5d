"""Every live feature gets a correctness (issue #14 item 1): dense features are scored at token level or on
background windows, rare ones with a wide interval, and an unscored draft never outranks a scored one.

Uses the model-free planted harvest (:func:`plant_mixed_harvest`): exact activations, instant."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from autoexplain.evals.features import Example, score_explanation
from autoexplain.evals.judges import LexicalJudge
from autoexplain.evals.truth.planted_features import (
    MIXED_DESCRIPTIONS,
    MIXED_KINDS,
    MIXED_WRONG,
    plant_mixed_harvest,
)

SAE = "mixed"


@pytest.fixture(scope="module")
def mixed():
    return plant_mixed_harvest()


def _score(h, f: int, text: str, **kw: Any):
    return score_explanation(text, h.examples[f], LexicalJudge(), sae_id=SAE, feature_index=f, **kw)


def test_the_planted_set_has_every_kind(mixed) -> None:
    assert set(MIXED_KINDS.values()) >= {"dense category", "dense single token", "rare", "single token",
                                         "category", "position"}
    for f in mixed.dead:
        assert mixed.density(f) == 0 and not any(r["kind"] != "random" for r in mixed.examples[f])
    for f, kind in MIXED_KINDS.items():
        assert mixed.density(f) > 0
        randoms = [r for r in mixed.examples[f] if r["kind"] == "random"]
        assert (not randoms) == kind.startswith("dense") or kind == "position", (f, kind, len(randoms))
    assert 0 < sum(r["kind"] == "top" for r in mixed.examples[3]) <= 4  # rare: a handful of windows


@pytest.mark.parametrize("background", [False, True])
def test_every_live_feature_is_scored_and_the_true_label_wins(mixed, background: bool) -> None:
    for f, kind in MIXED_KINDS.items():
        bg = mixed.background(f) if background else None
        true, wrong = _score(mixed, f, MIXED_DESCRIPTIONS[f], background=bg), _score(mixed, f, MIXED_WRONG[f],
                                                                                    background=bg)
        for res in (true, wrong):
            assert res.correctness is not None, (f, kind, res.reasons)
            assert res.correctness_interval is not None and res.correctness_interval[0] <= res.correctness
            assert res.n_positive > 0 and res.n_negative > 0
        assert true.correctness > wrong.correctness, (f, kind, true.correctness, wrong.correctness)
        assert true.correctness_interval[0] > 0.5, (f, kind, true.correctness_interval)
        dense_pool = not any(r["kind"] == "random" for r in mixed.examples[f])
        if not dense_pool:
            assert true.correctness_from == "detection" and true.negatives_from == "harvest random pool"
        elif background and bg:
            assert true.correctness_from == "detection" and true.negatives_from == "background windows"
            assert {j.example_kind for j in true.judgements if j.scorer == "detection" and not j.truth} == \
                {"background"}
        else:
            assert true.correctness_from == "token_detection" and true.negatives_from in ("none",)
            assert true.correctness == true.token_detection_balanced_accuracy
            tok = [j for j in true.judgements if j.scorer == "token_detection"]
            assert tok and {j.truth for j in tok} == {True, False}
            # negatives are non-firing tokens of the activating windows, at most 3 of each class per window
            per_window: dict[tuple[str, int, bool], int] = {}
            for j in tok:
                key = (j.example_kind, j.example_id, j.truth)
                per_window[key] = per_window.get(key, 0) + 1
            assert max(per_window.values()) <= 3
        # stored: the correctness row names the scorer it comes from (SQL can tell them apart)
        row = next(s for s in true.scores() if s.metric == "correctness")
        assert row.details["scorer"] == true.correctness_from and row.details["interval"]


def test_rare_feature_small_n_keeps_a_wide_interval(mixed) -> None:
    res = _score(mixed, 3, MIXED_DESCRIPTIONS[3])
    lo, hi = res.correctness_interval
    # (a window kept both as a top and as a quantile example counts twice: 3-4 windows, up to 8 positives)
    assert res.n_positive <= 8 and hi - lo > 0.15


def test_token_level_undefined_when_every_token_fires() -> None:
    exs = [Example(kind="top", example_id=i, tokens=[" x", f" y{i}"], acts=[1.0, 2.0], max_act=2.0,
                   window_index=i) for i in range(6)]
    res = score_explanation("the word 'x'", exs, LexicalJudge(), sae_id=SAE, feature_index=0)
    assert res.correctness is None and res.correctness_from is None
    assert "non-firing token" in res.reasons["correctness"] and "non-activating" in res.reasons["correctness"]


def test_background_windows_that_fire_are_not_negatives(mixed) -> None:
    firing = [{**r, "kind": "background"} for r in mixed.examples[0] if r["kind"] == "top"][:5]
    res = _score(mixed, 0, MIXED_DESCRIPTIONS[0], background=firing)
    assert res.negatives_from == "none" and res.correctness_from == "token_detection"


def test_unscored_drafts_rank_below_scored_ones() -> None:
    from autoexplain.agent.graph import rank, unscored
    from autoexplain.agent.policies.base import overall

    months = {"correctness": None, "completeness": 0.9, "succinctness": 0.3}  # issue #14: overall 0.31 unscored
    poor = {"correctness": 0.52, "completeness": 0.0, "succinctness": 0.1}
    entries = [{"text": t, "scores": sc, "overall": overall(sc)} for t, sc in (("months", months), ("poor", poor))]
    assert entries[0]["overall"] > entries[1]["overall"]
    assert unscored(entries[0]) and not unscored(entries[1])
    assert max(entries, key=rank)["text"] == "poor"
    assert max(entries[:1], key=rank)["text"] == "months"  # alone, an unscored draft is still the best there is


def test_label_verdict_names_unscored_and_token_level(mixed) -> None:
    from autoexplain.agent.scoring import label_verdict

    undefined = score_explanation("the word 'x'", [Example(kind="top", example_id=0, tokens=[" x"], acts=[1.0],
                                                           max_act=1.0, window_index=0)] * 1,
                                  LexicalJudge(), sae_id=SAE, feature_index=0)
    assert label_verdict(undefined)["why"].startswith("weak: unscored")
    wrong = _score(mixed, 4, "the word 'zebra'")
    v = label_verdict(wrong)
    assert wrong.correctness_from == "token_detection" and v is not None and "tokens" in v["why"]
    assert label_verdict(_score(mixed, 4, MIXED_DESCRIPTIONS[4])) is None


def test_feature_scorer_asks_for_background_only_for_dense_features(mixed, tmp_path: Path) -> None:
    from autoexplain.agent.scoring import FeatureScorer
    from autoexplain.agent.state import ItemKind, WorkItem
    from autoexplain.agent.store import Store, queries
    from autoexplain.agent.store.rows import with_split

    store = Store(tmp_path / "dense.duckdb")
    store.upsert("feature_examples", with_split([{**r, "sae_id": SAE, "feature_index": f, "split": None}
                                                 for f in mixed.examples for r in mixed.examples[f]]))
    asked: list[int] = []

    def background(sae_id: str, f: int, examples: Any) -> list[Example]:
        asked.append(f)
        return [Example.from_row({**r, "split": "score"}) for r in mixed.background(f)]

    scorer = FeatureScorer(store, store, LexicalJudge(), background=background)
    got = {}
    for f in (0, 1):
        item = WorkItem(item_id=f"i{f}", run_id="r", kind=ItemKind.FEATURE, target=f"{SAE}#{f}",
                        params={"sae_id": SAE, "feature_index": f})
        store.upsert("explanations", [{"explanation_id": f"x{f}", "run_id": "r", "item_id": f"i{f}",
                                       "target": item.target, "text": MIXED_DESCRIPTIONS[f], "author": "test",
                                       "causal_level": "association", "created_at": dt.datetime.now()}])
        [got[f]] = scorer.score(item, [{"explanation_id": f"x{f}", "text": MIXED_DESCRIPTIONS[f]}])
    assert asked == [0] and got[0]["correctness"] == pytest.approx(1.0) and "verdict" not in got[0]
    (details,), = store.query("select details from scores where explanation_id = 'x0' and metric = 'correctness'")[1]
    assert '"scorer":"detection"' in details and '"negatives_from":"background windows"' in details
    # the candidate windows for the model-backed background come from other features, never this one's
    own = {r["window_index"] for r in mixed.examples[0]}
    cands = queries.background_windows(store, SAE, 0, limit=500)
    assert cands and all(c not in [mixed.windows[w] for w in own] for c in cands)
