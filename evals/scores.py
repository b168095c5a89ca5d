"""A score: one named number about an explanation, with how many observations it rests on and what it depends on.

The domain shape of DESIGN §3's *Score* ``(explanation, metric, value, n, details)`` without the explanation: the
scorers (:mod:`autoexplain.evals.features`, :mod:`autoexplain.evals.circuits`) return lists of :class:`Score`, and
the store (:mod:`autoexplain.agent.store.rows`) binds them to an explanation, gives them ids and writes them.

``metric`` is the *name of the score* (``correctness``, ``completeness``, ``detection``, ``cpr`` …), not the
patching metric a circuit number was measured with (``logit_diff`` …, :class:`~autoexplain.tools.vocab`'s patch
metric), which a circuit score records in its ``details``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Score(BaseModel):
    """One number about one explanation. ``value`` is None when the scorer could not compute it (too few
    examples, every judgement failed); ``details`` holds whatever the value depends on (judge, ablation, patch
    type, patch metric, the parts it combines) as JSON-able values, in the order they should be shown."""

    model_config = ConfigDict(frozen=True)

    metric: str = Field(description="the score's name: correctness | completeness | succinctness | detection | ...")
    value: float | None
    n: int = Field(description="observations the value rests on (judged examples, prompts, knock-out sets ...)")
    details: dict[str, Any] = Field(default_factory=dict)


def by_metric(scores: Sequence[Score]) -> dict[str, Score]:
    """``scores`` keyed by their metric (a metric that repeats is an error: each names one number)."""
    out: dict[str, Score] = {}
    for s in scores:
        if s.metric in out:
            raise ValueError(f"score {s.metric!r} appears twice")
        out[s.metric] = s
    return out
