"""Domain values turned into rows: the vocabulary's Explanation becomes an ``explanations`` row that round-trips."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from autoexplain.agent.store import Store, schema
from autoexplain.agent.store.rows import explanation_row
from autoexplain.tools.vocab import CausalLevel, Explanation, FeatureRef


def test_an_explanation_is_stored_with_its_author_evidence_and_level(tmp_path: Path) -> None:
    expl = Explanation(target=str(FeatureRef(sae_id="sae-1", index=3)), text="the token 'cat'", author="offline",
                       causal_level=CausalLevel.INTERVENTION, evidence=("call-a", "call-b"))
    row = explanation_row("expl-1", "run-1", "item-1", expl, hypothesis_id="hyp-1")
    assert set(row) == set(schema.table("explanations").column_names) - {"overall", "judge"}
    assert row["overclaimed"] is True and row["supported_level"] is None  # cites calls, none with a level
    store = Store(tmp_path / "e.duckdb")
    store.upsert("explanations", [row])
    got = store.query("select target, text, author, llm_model, causal_level, evidence->'calls', "
                      "evidence->>'hypothesis', is_final from explanations")[1]
    assert got == [("sae-1#3", "the token 'cat'", "offline", None, "intervention", '["call-a","call-b"]', "hyp-1",
                    False)]


def test_an_explanation_is_a_value() -> None:
    expl = Explanation(target="ioi", text="a0.1 copies the name", author="llm", llm_model="m")
    with pytest.raises(ValidationError):
        expl.text = "changed"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        Explanation(target="ioi", text="", author="llm")


def test_with_split_on_raw_rows_equals_split_examples_on_examples() -> None:
    """with_split reads raw rows (no pydantic object per row); its sides must be exactly split_examples'."""
    import random

    from autoexplain.agent.store.rows import with_split
    from autoexplain.evals.features import Example, split_examples

    rng = random.Random(3)
    rows = []
    for f in range(6):
        n_win = [1, 2, 3, 7, 15, 30][f]
        for kind, count in (("top", 10), ("quantile", 12), ("random", 6)):
            for j in range(count):
                w = rng.randrange(n_win) if kind != "random" else 1000 + rng.randrange(50)
                rows.append({"sae_id": "sae-x", "feature_index": f, "kind": kind, "example_id": j,
                             "quantile": j % 4 if kind == "quantile" else None, "tokens": [f"t{w}", f"u{w % 3}"],
                             "acts": [0.0, 1.0], "max_act": 0.0 if kind == "random" else 1.0 + j,
                             "window_index": w})
    got = with_split(rows)
    for f in range(6):
        mine = [r for r in rows if r["feature_index"] == f]
        want = split_examples([Example.from_row(r) for r in mine], "sae-x", f)
        assert [r["split"] for r in got if r["feature_index"] == f] == [e.split for e in want]
    assert {r["split"] for r in got} == {"explain", "score"}
