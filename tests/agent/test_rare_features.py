"""Rare features are labelled, never stored as dead (issue #12, part 3).

A planted SAE on the tests' tiny GPT-2 (:mod:`autoexplain.evals.truth.planted_features`): feature 0 fires only on
' cat', 1 on ' red', 2 on ' Mary', 3 on ' dog'; 4 never fires. The corpus is written so that each planted word
occurs in exactly 1, 2, 5 and 10 harvest windows (every occurrence is separated from the next by more filler
tokens than a window holds). The real path runs: ``prepare`` → harvest → held-out split → the offline policy →
scoring, into a DuckDB file. Then: every live feature has density > 0 and a label that is not "dead", its explain
side holds an activating example whenever it fired in two windows or more, and its correctness score carries
its counts and a confidence interval (or None with the reason, when no activating window is left to score).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from autoexplain.evals.truth.planted_features import plant_features, write_corpus

#: feature -> (its word, the number of windows it fires in)
RARE = {0: ("cat", 1), 1: ("red", 2), 2: ("Mary", 5), 3: ("dog", 10)}
DEAD = (4,)
FILLER = ("sat on mat and ran to park went store gave a drink the 10 11 12").split()


def _corpus() -> list[str]:
    """Lines of filler, with each planted word once in its own line; 4 filler lines (> 40 tokens, more than a
    window of 32) separate consecutive occurrences, so each occurrence lands in its own window."""
    lines: list[str] = []
    k = 0

    def filler(n: int = 10) -> str:
        nonlocal k
        k += 1
        return " ".join(FILLER[(k + i) % len(FILLER)] for i in range(n))

    for _ in range(4):
        lines.append(filler())
    for word, count in RARE.values():
        for _ in range(count):
            lines.append(f"{filler(5)} {word} {filler(5)}")
            lines += [filler() for _ in range(4)]
    return lines


@pytest.fixture(scope="module")
def rare_run(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory, one_thread) -> dict[str, Any]:
    from autoexplain.agent.runner import Plan, prepare, run_plan
    from autoexplain.agent.store import Store

    root = tmp_path_factory.mktemp("rare")
    planted = plant_features(tiny_gpt2_dir, root / "planted", {f: (f" {w}",) for f, (w, _) in RARE.items()}, DEAD)
    corpus = write_corpus(root / "corpus.txt", _corpus())
    prep = prepare(Plan.model_validate({
        "name": "rare", "model": str(planted.model_dir),
        "items": [{"label": {"sae": str(planted.sae_dir), "dataset": str(corpus), "features": "0-4",
                             "tokens": 20_000}}]}))
    store = Store(root / "rare.duckdb")
    res = run_plan(store, prep)
    sae_id = next(iter(prep.saes.values())).sae_id
    return {"store": store, "res": res, "sae_id": sae_id}


def _q(run: dict[str, Any], sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
    return run["store"].query(sql, params)[1]


def test_rare_features_fire_in_exactly_the_planted_number_of_windows(rare_run) -> None:
    sae_id = rare_run["sae_id"]
    for f, (_, count) in RARE.items():
        (density, is_dead), = _q(rare_run, "select density, is_dead from features where sae_id = ? and "
                                           "feature_index = ?", [sae_id, f])
        assert density > 0 and not is_dead, f
        windows = _q(rare_run, "select distinct window_index from feature_examples where sae_id = ? and "
                               "feature_index = ? and max_act > 0 and kind <> 'random'", [sae_id, f])
        assert len(windows) == count, (f, windows)
    (dead,), = _q(rare_run, "select is_dead from features where sae_id = ? and feature_index = 4", [sae_id])
    assert dead


def test_explain_side_keeps_an_activating_example(rare_run) -> None:
    sae_id = rare_run["sae_id"]
    for f, (_, count) in RARE.items():
        by_side = dict(_q(rare_run, "select split, count(distinct window_index) from feature_examples where "
                                    "sae_id = ? and feature_index = ? and max_act > 0 and kind <> 'random' "
                                    "group by split", [sae_id, f]))
        assert by_side.get("explain", 0) >= 1, (f, by_side)  # with one window: that one, explained from
        if count >= 2:
            assert by_side.get("score", 0) >= 1, (f, by_side)


def test_rare_features_are_labelled_not_dead(rare_run) -> None:
    sae_id = rare_run["sae_id"]
    outcomes = {o.target: o for o in rare_run["res"].outcomes}
    for f, (word, count) in RARE.items():
        o = outcomes[f"{sae_id}#{f}"]
        # labelled; "weak" when its correctness cannot be told from chance (or, with one window, not computed)
        assert o.status.value in ("done", "weak"), o
        if count == 1:
            assert o.status.value == "weak", o
        assert "dead" not in (o.text or "").lower() and "not labelled" not in (o.text or ""), o.text
        # labelled from its explain-side window: a draft names the word (the final one may name its category)
        drafts = [t for (t,) in _q(rare_run, "select text from explanations where target = ?", [o.target])]
        assert any(f"'{word}'" in t for t in drafts), drafts
    assert (outcomes[f"{sae_id}#4"].text or "").startswith("dead feature"), outcomes[f"{sae_id}#4"].text


def test_scores_carry_n_and_an_interval(rare_run) -> None:
    sae_id = rare_run["sae_id"]
    for f, (_, count) in RARE.items():
        rows = _q(rare_run, "select s.value, s.n, s.details from scores s join explanations e using "
                            "(explanation_id) where e.target = ? and e.is_final and s.metric = 'correctness'",
                  [f"{sae_id}#{f}"])
        assert len(rows) == 1, (f, rows)
        value, n, details = rows[0]
        details = json.loads(details) if isinstance(details, str) else details
        assert n is not None and "n_positive" in details and "n_negative" in details, details
        if count == 1:  # the only activating window was explained from: nothing left to score it on
            assert value is None and details["n_positive"] == 0 and details["interval"] is None
            assert "no score-side activating example" in details["reason"], details
        else:
            assert value is not None and details["n_positive"] >= 1 and details["n_negative"] >= 1, details
            lo, hi = details["interval"]
            assert 0.0 <= lo <= value <= hi <= 1.0, details
            assert details["confidence"] == 0.95
            if details["n_positive"] <= 5:  # a handful of positives cannot pin the accuracy down
                assert hi - lo > 0.2, details
