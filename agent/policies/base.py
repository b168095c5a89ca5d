"""What a policy is: the decisions of the agent loop, separated from the loop itself.

The graph (:mod:`autoexplain.agent.graph`) owns the loop, the budgets, the store writes and the checkpoints. A
policy only decides, at four points of each round:

* :meth:`Policy.plan` — which hypotheses to hold and which tool calls to make next (none: ready to propose);
* :meth:`Policy.observe` — what the tool results mean for the hypotheses (status, evidence, causal level);
* :meth:`Policy.propose` — the explanation drafts to score;
* :meth:`Policy.decide` — after scoring: refine (another round) or accept.

Each returns a :class:`PolicyStep`; the graph applies it. Policies keep anything they need between calls in
``notes`` (plain JSON in the graph state), so a resumed item continues with what the policy had learnt.

:class:`Policy` is a protocol: anything with these four methods (and a ``name``) drives the graph. A policy gets
what it needs (the tools to offer, an LLM client, a lexicon) through its constructor; the catalogue
:data:`autoexplain.agent.policies.POLICIES` builds each one from the run's
:class:`~autoexplain.agent.policies.PolicyDeps`.
"""

from __future__ import annotations

from typing import Any, Protocol

from pydantic import BaseModel, Field

from autoexplain.agent.state import Draft, Hypothesis, ItemState, Route, ToolRequest, ToolResult, WorkItem

#: How the candidate explanations of one item are ranked: a weighted mean of the three scores (a missing score
#: counts 0). Correctness weighs most: a short, complete explanation that predicts nothing is worthless.
OVERALL_WEIGHTS = {"correctness": 0.5, "completeness": 0.3, "succinctness": 0.2}


def overall(scores: dict[str, float | None]) -> float:
    """``0.5·correctness + 0.3·completeness + 0.2·succinctness`` (missing = 0); range [0, 1]."""
    return sum(w * float(scores.get(k) or 0.0) for k, w in OVERALL_WEIGHTS.items())


class PolicyStep(BaseModel):
    """A policy's decision at one point of the loop; empty fields change nothing."""

    hypotheses: list[Hypothesis] = Field(default_factory=list, description="new or updated hypotheses")
    requests: list[ToolRequest] = Field(default_factory=list, description="tool calls to make next")
    drafts: list[Draft] = Field(default_factory=list, description="explanations to score")
    notes: dict[str, Any] = Field(default_factory=dict, description="merged into the policy's notes")
    messages: list[dict[str, Any]] | None = Field(default=None, description="the LLM conversation, replaced")
    route: Route | None = None


class Policy(Protocol):
    """Decides; never writes to the store and never touches the model except through tool requests.

    ``name`` is stored as each explanation's ``author``; ``llm_model`` (the model behind it, if any) with it."""

    name: str
    llm_model: str | None

    def plan(self, state: ItemState, item: WorkItem) -> PolicyStep: ...

    def observe(self, state: ItemState, item: WorkItem, results: list[ToolResult]) -> PolicyStep: ...

    def propose(self, state: ItemState, item: WorkItem) -> PolicyStep: ...

    def decide(self, state: ItemState, item: WorkItem) -> PolicyStep: ...
