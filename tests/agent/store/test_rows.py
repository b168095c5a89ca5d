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
