"""The agent's vocabulary: work items, hypotheses, drafts, budgets, and the per-item graph state.

The graph state (:class:`ItemState`) holds plain JSON values only — ids, short texts, numbers — because langgraph
writes the whole state to the checkpointer after every step (large or non-JSON state makes checkpoints huge or
corrupt). Tool outputs, tensors and examples live in the tools' caches and in DuckDB; the state keeps what a
policy distilled from them (``notes``) and the ids of the tool calls behind each hypothesis. One exception:
``outbox`` carries the database rows the last node wrote (plain values and datetimes) until a group commit
writes them (:mod:`autoexplain.agent.store.outbox`); each checkpoint holds only its own node's rows.

Every id is derived from the item and the step that made it (never random), so a node that re-runs after a
crash writes the same rows again instead of new ones.
"""

from __future__ import annotations

import hashlib
import json
import time
from enum import StrEnum
from typing import Any, Literal, TypedDict

from pydantic import BaseModel, Field

from autoexplain.tools.vocab import CausalLevel, FeatureRef


class ItemKind(StrEnum):
    FEATURE = "feature"
    CIRCUIT = "circuit"
    #: a task's sparse feature circuit, explained through its features' labels (plan item ``feature_circuit:``)
    FEATURE_CIRCUIT = "feature_circuit"


class HypothesisStatus(StrEnum):
    OPEN = "open"
    CONFIRMED = "confirmed"
    REFUTED = "refuted"
    INCONCLUSIVE = "inconclusive"


class ItemStatus(StrEnum):
    """Where a work item stands. The finished ones say how far to trust the result:

    * ``done``: an explanation scored above what chance or noise gives;
    * ``weak``: a feature label whose correctness is not distinguishable from chance (the confidence interval of
      detection balanced accuracy includes 0.5), or could not be computed at all — kept, but not to be trusted;
    * ``no_behaviour``: a circuit task the model does not do (ablating everything moves the metric by less than
      noise), so there is nothing to explain and the circuit's scores are not reported;
    * ``budget_limited``: a budget ended the item early (its best explanation so far is kept; the stored reason
      also names a weak or no-behaviour verdict);
    * ``failed``: an error ended it (the step and message are stored).
    """

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    WEAK = "weak"
    NO_BEHAVIOUR = "no_behaviour"
    FAILED = "failed"
    BUDGET_LIMITED = "budget_limited"


#: Statuses of items that are finished (never run again on ``--resume``).
FINISHED = frozenset({ItemStatus.DONE, ItemStatus.WEAK, ItemStatus.NO_BEHAVIOUR, ItemStatus.BUDGET_LIMITED,
                      ItemStatus.FAILED})


def stable_id(prefix: str, *parts: Any, n: int = 16) -> str:
    """``prefix-<sha256 of the parts>``: the same inputs give the same id in every process."""
    key = json.dumps(parts, sort_keys=True, default=str)
    return f"{prefix}-{hashlib.sha256(key.encode()).hexdigest()[:n]}"


class Budget(BaseModel):
    """Limits of one item (or of a whole run). ``None`` = unlimited. A step is one graph node execution."""

    steps: int | None = Field(default=40, ge=1)
    llm_tokens: int | None = Field(default=200_000, ge=1)
    seconds: float | None = Field(default=600.0, gt=0)

    def exceeded(self, used: Usage) -> str | None:
        """The name of the first limit ``used`` reached, or None."""
        if self.steps is not None and used.steps >= self.steps:
            return "steps"
        if self.llm_tokens is not None and used.tokens >= self.llm_tokens:
            return "llm_tokens"
        if self.seconds is not None and used.seconds >= self.seconds:
            return "seconds"
        return None


class RunBudget(Budget):
    """Limits of a whole run. Unlike an item's :class:`Budget`, every limit left out is unlimited: a plan that says
    ``run_budget: {seconds: 36000}`` means ten hours and nothing else (not the per-item default of 40 steps)."""

    steps: int | None = Field(default=None, ge=1)
    llm_tokens: int | None = Field(default=None, ge=1)
    seconds: float | None = Field(default=None, gt=0)


class Usage(BaseModel):
    """What an item (or run) has used so far."""

    steps: int = 0
    tool_calls: int = 0
    llm_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def plus(self, **delta: float) -> Usage:
        return self.model_copy(update={k: getattr(self, k) + v for k, v in delta.items()})


class LLMMeter:
    """The LLM usage of a run, charged to the work item being run.

    One meter per run, shared by the runner, the LLM client's call log and the graph: the runner names the item it
    runs (:attr:`current`); every LLM call the client makes meanwhile (the policy's and the judge's) is logged
    against that item and its tokens are charged to it (:meth:`charge`); the graph node that made the calls takes
    them into the item's budget when it ends (:meth:`take`). A plain object (not graph state): what it holds is
    taken by the node that made the calls, before that node's checkpoint is written.
    """

    def __init__(self) -> None:
        self.current: str | None = None  # the item being run (None: between items)
        self._pending: dict[str, Usage] = {}  # item_id -> usage not yet taken into the item's budget

    def charge(self, item_id: str, *, prompt_tokens: int, completion_tokens: int) -> None:
        """Count one LLM call of ``item_id``."""
        used = self._pending.get(item_id, Usage())
        self._pending[item_id] = used.plus(llm_calls=1, prompt_tokens=prompt_tokens,
                                           completion_tokens=completion_tokens)

    def take(self, item_id: str) -> Usage:
        """The usage charged to ``item_id`` since the last call (and forget it)."""
        return self._pending.pop(item_id, Usage())


class WorkItem(BaseModel):
    """One thing to explain: a feature ``sae_id#index`` or a task's circuit."""

    item_id: str
    run_id: str
    kind: ItemKind
    target: str = Field(description="'sae_id#index' for a feature, the task name for a circuit or a feature "
                                    "circuit")
    params: dict[str, Any] = Field(default_factory=dict, description="sae_id, feature_index / task_file, method …")

    @property
    def feature(self) -> FeatureRef:
        """The feature a feature item explains (``ValueError`` for a circuit item)."""
        if self.kind is not ItemKind.FEATURE:
            raise ValueError(f"work item {self.item_id} explains a {self.kind.value}, not a feature")
        return FeatureRef(sae_id=self.params["sae_id"], index=int(self.params["feature_index"]))


class ToolRequest(BaseModel):
    """A tool call a policy asks for. ``request_id``: the LLM's tool-call id, echoed back in the tool message."""

    tool: str
    args: dict[str, Any] | str = Field(default_factory=dict, description="a dict, or the LLM's raw JSON string")
    request_id: str | None = None
    hypothesis_id: str | None = Field(default=None, description="the hypothesis this call tests, if any")


class Hypothesis(BaseModel):
    hypothesis_id: str
    text: str
    status: HypothesisStatus = HypothesisStatus.OPEN
    causal_level: CausalLevel = CausalLevel.ASSOCIATION
    evidence: list[str] = Field(default_factory=list, description="tool call ids")


class Draft(BaseModel):
    """A proposed explanation, before it is scored."""

    text: str = Field(min_length=1, max_length=2000)
    causal_level: CausalLevel = CausalLevel.ASSOCIATION
    evidence: list[str] = Field(default_factory=list, description="tool call ids")
    hypothesis_id: str | None = None
    dead: bool = Field(default=False, description="the feature never fired: stored, never scored as a label")


class ToolResult(BaseModel):
    """What a policy sees of one executed call: the bounded summary always, the full output for offline rules."""

    model_config = {"arbitrary_types_allowed": True}

    call_id: str
    request: ToolRequest
    summary: str
    error: str | None = None
    cached: bool = False
    output: Any = Field(default=None, exclude=True, description="the tool's output model (not stored in state)")


Route = Literal["refine", "accept"]


class ItemState(TypedDict, total=False):
    """The langgraph state of one work item (JSON values only, but for the rows in ``outbox``)."""

    item: dict[str, Any]  # WorkItem
    step: int  # plan rounds so far
    pending: list[dict[str, Any]]  # ToolRequest, to execute next
    results: list[dict[str, Any]]  # ToolResult of the last act (summaries; outputs are re-read from the cache)
    calls: list[str]  # every tool call id of this item
    hypotheses: dict[str, dict[str, Any]]  # id -> Hypothesis
    drafts: list[dict[str, Any]]  # Draft + explanation_id, not yet scored
    scored: list[dict[str, Any]]  # {explanation_id, text, causal_level, scores, overall}
    messages: list[dict[str, Any]]  # the LLM conversation (llm policy)
    notes: dict[str, Any]  # the policy's own distilled facts
    usage: dict[str, Any]  # Usage
    stop: str | None  # why the item stopped early ('steps', 'llm_tokens', 'seconds', 'run budget'), if it did
    outcome: dict[str, Any] | None  # the accepted explanation and the item's final status
    outbox: list[dict[str, Any]]  # the rows the last node wrote ({table, rows}; agent.outbox): replayed on resume


def now() -> Any:
    import datetime as dt

    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Clock:
    """Seconds spent inside a node, added to the item's usage (so a resumed item keeps counting)."""

    def __enter__(self) -> Clock:
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.monotonic() - self.t0
