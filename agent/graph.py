"""The agent loop as a langgraph graph, one thread per work item.

::

    START → plan ─┬─(tool calls)──→ act → observe → plan …
                  ├─(ready)───────→ propose → score → decide ─┬─(refine)→ plan …
                  └─(budget)──────→ accept ← ─────────────────┴─(accept)
    accept → END

* ``plan``: the policy names hypotheses and tool calls (or none: ready to propose).
* ``act``: the calls run through :class:`~autoexplain.agent.toolrun.ToolRunner` (validated, cached, logged).
* ``observe``: the policy reads the results and updates the hypotheses (status, evidence, causal level).
* ``propose``: the policy drafts explanations; each is stored (``explanations``, not final yet).
* ``score``: each draft is scored on held-out data (:mod:`autoexplain.agent.scoring`); scores are stored.
* ``decide``: the policy refines (another round) or accepts.
* ``accept``: the best scored draft (:func:`rank`: every draft with a correctness above every *unscored* one, then
  by :func:`~autoexplain.agent.policies.base.overall`) becomes final; the
  work item is marked done — or ``weak`` / ``no_behaviour`` when the chosen draft's scores say so (the scorer's
  verdict), or ``budget_limited`` when a budget ended it early (its reason then also names any verdict).

Nodes write their rows (tool calls, hypotheses, drafts, scores …) to ``env.out``, an
:class:`~autoexplain.agent.store.outbox.Outbox` committed to DuckDB a group at a time; the rows each node wrote also go
into that node's checkpoint (the ``outbox`` channel), which is what makes the grouping crash-safe.

Budgets (steps, LLM tokens, seconds; per item and per run) are checked in ``plan``, ``act``, after ``observe``
and in ``decide``: when one is reached the item goes straight to ``accept`` with the best explanation so far (a
``propose`` → ``score`` already under way finishes first, so an item can end a few steps past its limit). Every node's
side effects are idempotent
(deterministic ids, upserts), because after a crash langgraph re-runs the interrupted node from its start.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from langgraph.graph import END, START, StateGraph

from autoexplain.agent.policies.base import Policy, PolicyStep, overall
from autoexplain.agent.state import (
    Budget,
    Clock,
    Draft,
    ItemState,
    ItemStatus,
    LLMMeter,
    ToolRequest,
    ToolResult,
    Usage,
    WorkItem,
    now,
    stable_id,
)
from autoexplain.agent.store import queries
from autoexplain.agent.store.rows import explanation_row
from autoexplain.agent.toolrun import ToolRunner
from autoexplain.tools.errors import InputError
from autoexplain.tools.vocab import CausalLevel, Explanation, supported_level

if TYPE_CHECKING:
    from langgraph.checkpoint.base import BaseCheckpointSaver
    from langgraph.graph.state import CompiledStateGraph

    from autoexplain.agent.store import Store
    from autoexplain.agent.store.outbox import Outbox
    from autoexplain.agent.store.schema import ExplanationRow, HypothesisRow, WorkItemRow


class Scorer(Protocol):
    """Scores drafts on held-out data and stores every number (:mod:`autoexplain.agent.scoring`).

    ``drafts``: state entries (a :class:`Draft` plus its ``explanation_id``). Returns, per draft in order,
    ``{"correctness", "completeness", "succinctness"}`` (None: not computed), plus ``"verdict"`` when the scores
    say the result is not to be trusted: ``{"status": "weak" | "no_behaviour", "why": "..."}`` (the item ends
    with that status if the draft is chosen)."""

    def score(self, item: WorkItem, drafts: list[dict[str, Any]]) -> list[dict[str, Any]]: ...


class GraphStateError(RuntimeError):
    """A router met a state no node produces: a bug in a node or a policy, never a reason to guess a route."""


def _no_dead_feature(item: WorkItem) -> str | None:
    return None


@dataclass
class AgentEnv:
    """Everything the nodes need that is not state: the store, the tools, the policy, the scorer, budgets.

    ``meter``: the run's LLM usage per item (the LLM client charges it, each node takes its item's share).
    ``dead_text``: "dead feature: …" for a feature the harvest never saw fire (None otherwise): such a feature is
    stored as dead by every policy, never labelled."""

    store: Store  # reads
    out: Outbox  # every row a node writes
    runner: ToolRunner
    policy: Policy
    scorer: Scorer
    run_id: str
    budget: Budget = field(default_factory=Budget)
    run_budget: Budget | None = None  # for the whole run (this process)
    meter: LLMMeter = field(default_factory=LLMMeter)
    dead_text: Callable[[WorkItem], str | None] = _no_dead_feature
    run_usage: Usage = field(default_factory=Usage)
    _outputs: dict[tuple[str, int], list[ToolResult]] = field(default_factory=dict)

    def run_limit(self) -> str | None:
        """Why the whole run must stop, or None."""
        reason = self.run_budget.exceeded(self.run_usage) if self.run_budget is not None else None
        return f"run {reason}" if reason else None


def _item(state: ItemState) -> WorkItem:
    return WorkItem.model_validate(state["item"])


def _usage(state: ItemState) -> Usage:
    return Usage.model_validate(state.get("usage") or {})


def _apply(state: ItemState, step: PolicyStep, item: WorkItem, env: AgentEnv) -> dict[str, Any]:
    """State updates for a policy step; new or changed hypotheses are written to the store."""
    out: dict[str, Any] = {}
    if step.hypotheses:
        hyps = dict(state.get("hypotheses") or {})
        rows: list[HypothesisRow] = []
        for h in step.hypotheses:
            old = hyps.get(h.hypothesis_id)
            hyps[h.hypothesis_id] = h.model_dump(mode="json")
            row: HypothesisRow = {"hypothesis_id": h.hypothesis_id, "run_id": item.run_id, "item_id": item.item_id,
                                  "text": h.text, "status": h.status.value, "causal_level": h.causal_level.value,
                                  "evidence": h.evidence, "updated_at": now()}
            if not old:
                row["created_at"] = now()
            rows.append(row)
        env.out.upsert("hypotheses", rows)
        out["hypotheses"] = hyps
    if step.notes:
        out["notes"] = {**(state.get("notes") or {}), **step.notes}
    if step.messages is not None:
        out["messages"] = step.messages
    return out


def _store_drafts(env: AgentEnv, item: WorkItem, step: int, drafts: list[Draft]) -> list[dict[str, Any]]:
    """Write ``drafts`` as (not yet final) explanations; return them as state entries with their ids."""
    out: list[dict[str, Any]] = []
    rows: list[ExplanationRow] = []
    for i, d in enumerate(drafts):
        eid = stable_id("expl", item.item_id, step, i, d.text)
        out.append({**d.model_dump(mode="json"), "explanation_id": eid})
        expl = Explanation(target=item.target, text=d.text, author=env.policy.name, llm_model=env.policy.llm_model,
                           causal_level=d.causal_level, evidence=tuple(d.evidence),
                           supported_level=_supported_level(env, d.evidence))
        rows.append(explanation_row(eid, item.run_id, item.item_id, expl, hypothesis_id=d.hypothesis_id,
                                    dead=d.dead))
    if rows:
        env.out.upsert("explanations", rows)
    return out


def _supported_level(env: AgentEnv, call_ids: list[str]) -> CausalLevel | None:
    """The causal level the cited calls support: the highest level their tools declare, counting only calls that
    succeeded (a refused call is no evidence). Calls not yet committed are read from the outbox."""
    outcomes: dict[str, tuple[str, str | None]] = {}
    missing = []
    for cid in call_ids:
        row = env.out.get("tool_calls", (cid,))
        if row is None:
            missing.append(cid)
        else:
            outcomes[cid] = (row["tool"], row.get("error"))
    outcomes.update(queries.tool_call_outcomes(env.store, missing))
    levels = []
    for tool, error in outcomes.values():
        if error is None:
            try:
                levels.append(env.runner.registry.get(tool).level)
            except InputError:  # a tool no longer in the registry: it supports nothing now
                continue
    return supported_level(levels)


def build_graph(env: AgentEnv, checkpointer: BaseCheckpointSaver[Any] | None = None
                ) -> CompiledStateGraph[ItemState, None, ItemState, ItemState]:
    """The compiled graph; ``checkpointer`` (e.g. a SqliteSaver) makes every item resumable."""

    def metered(name: str, fn: Callable[[ItemState], dict[str, Any]]) -> Callable[[ItemState], dict[str, Any]]:
        def node(state: ItemState) -> dict[str, Any]:
            item = _item(state)
            with Clock() as clock:
                update = fn(state)
            llm = env.meter.take(item.item_id)
            used = _usage(state).plus(steps=1, seconds=clock.seconds, llm_calls=llm.llm_calls,
                                      prompt_tokens=llm.prompt_tokens, completion_tokens=llm.completion_tokens)
            if name == "act":
                used = used.plus(tool_calls=len(update.get("results", [])))
            update["usage"] = used.model_dump()
            update["outbox"] = env.out.take_step()  # this node's rows travel with its checkpoint
            env.run_usage = env.run_usage.plus(steps=1, seconds=clock.seconds, llm_calls=llm.llm_calls,
                                               prompt_tokens=llm.prompt_tokens,
                                               completion_tokens=llm.completion_tokens)
            if name == "observe" and not update.get("stop"):
                # a budget reached here routes straight to accept: record why in the state, so accept marks the
                # item budget_limited (and a resumed item takes the same route)
                reason = env.budget.exceeded(used) or env.run_limit()
                if reason:
                    update["stop"] = reason
            return update

        node.__name__ = name
        return node

    def stop_reason(state: ItemState) -> str | None:
        if state.get("stop"):
            return state["stop"]
        reason = env.budget.exceeded(_usage(state))
        return reason or env.run_limit()

    # -- nodes ----------------------------------------------------------------------------------------------
    def plan(state: ItemState) -> dict[str, Any]:
        item = _item(state)
        reason = stop_reason(state)
        if reason:
            return {"stop": reason, "pending": []}
        dead = env.dead_text(item) if not state.get("step") else None
        if dead:  # a feature that never fired is stored as dead by every policy, never labelled
            return {"pending": [], "step": 1, "drafts": _store_drafts(env, item, 0, [Draft(text=dead, dead=True)])}
        step = env.policy.plan(state, item)
        out = _apply(state, step, item, env)
        out["pending"] = [r.model_dump(mode="json") for r in step.requests]
        out["step"] = int(state.get("step") or 0) + 1
        return out

    def act(state: ItemState) -> dict[str, Any]:
        item = _item(state)
        reason = stop_reason(state)
        if reason:  # the plan used the last step: its calls are not run (a forward pass the budget has not got)
            return {"stop": reason, "pending": [], "results": []}
        requests = [ToolRequest.model_validate(r) for r in state.get("pending") or []]
        step_no = int(state.get("step") or 0)
        results = env.runner.run(item.item_id, step_no, requests)
        env._outputs[(item.item_id, step_no)] = results
        return {"results": [r.model_dump(mode="json") for r in results], "pending": [],
                "calls": [*(state.get("calls") or []), *(r.call_id for r in results)]}

    def observe(state: ItemState) -> dict[str, Any]:
        item = _item(state)
        step_no = int(state.get("step") or 0)
        results = env._outputs.pop((item.item_id, step_no), None)
        if results is None:  # resumed after a crash between act and observe: cached calls cost nothing
            requests = [ToolResult.model_validate(r).request for r in state.get("results") or []]
            results = env.runner.run(item.item_id, step_no, requests)
        return _apply(state, env.policy.observe(state, item, results), item, env)

    def propose(state: ItemState) -> dict[str, Any]:
        item = _item(state)
        step = env.policy.propose(state, item)
        out = _apply(state, step, item, env)
        drafts = _store_drafts(env, item, int(state.get("step") or 0), step.drafts)
        out["drafts"] = drafts
        return out

    def score(state: ItemState) -> dict[str, Any]:
        item = _item(state)
        drafts = [d for d in state.get("drafts") or [] if not d.get("dead")]
        scored = list(state.get("scored") or [])
        done = {s["explanation_id"] for s in scored}
        todo = [d for d in drafts if d["explanation_id"] not in done]
        for d, scores in zip(todo, env.scorer.score(item, todo), strict=True):
            verdict = scores.pop("verdict", None)
            scored.append({"explanation_id": d["explanation_id"], "text": d["text"],
                           "causal_level": d["causal_level"], "scores": scores, "overall": overall(scores),
                           **({"verdict": verdict} if verdict else {})})
        return {"scored": scored, "drafts": [d for d in state.get("drafts") or [] if d.get("dead")]}

    def decide(state: ItemState) -> dict[str, Any]:
        item = _item(state)
        if stop_reason(state):
            return {"stop": stop_reason(state)}
        step = env.policy.decide(state, item)
        out = _apply(state, step, item, env)
        out["notes"] = {**out.get("notes", state.get("notes") or {}), "route": step.route or "accept"}
        return out

    def accept(state: ItemState) -> dict[str, Any]:
        item = _item(state)
        stop = state.get("stop")
        dead = [d for d in state.get("drafts") or [] if d.get("dead")]
        scored = state.get("scored") or []
        best = max(scored, key=rank) if scored else None
        chosen = dead[0]["explanation_id"] if dead else (best["explanation_id"] if best else None)
        verdict = best.get("verdict") if best and not dead else None
        # a verdict replaces "done"; an item a budget cut short stays budget_limited (resumable work was left), and
        # its reason then names the verdict too
        status = ItemStatus.BUDGET_LIMITED if stop else ItemStatus(verdict["status"]) if verdict else ItemStatus.DONE
        why = "; ".join(x for x in (verdict["why"] if verdict else None, f"stopped by budget: {stop}" if stop
                                    else None) if x) or None
        # every draft of the item: final or not, budget-limited or not, and its overall score
        marks: dict[str, float | None] = {d["explanation_id"]: None for d in dead}  # dead drafts have no overall
        # an unscored draft (no correctness) has no overall: a number would rank it as if correctness were 0
        marks.update({s["explanation_id"]: None if unscored(s) else s["overall"] for s in scored})
        marked: list[ExplanationRow] = []
        for eid, overall_score in marks.items():
            row: ExplanationRow = {"explanation_id": eid, "is_final": eid == chosen, "budget_limited": bool(stop)}
            if overall_score is not None:
                row["overall"] = overall_score
            marked.append(row)
        env.out.upsert("explanations", marked)
        finished: WorkItemRow = {
            "item_id": item.item_id, "run_id": item.run_id, "kind": item.kind.value, "target": item.target,
            "status": status.value, "error": why,
            "budget": {**_usage(state).model_dump(), "stopped_by": stop}, "finished_at": now()}
        env.out.upsert("work_items", [finished])
        return {"outcome": {"explanation_id": chosen, "status": status.value, "stopped_by": stop, "why": why,
                            "text": dead[0]["text"] if dead else (best["text"] if best else None),
                            "scores": best["scores"] if best and not dead else {},
                            "overall": best["overall"] if best and not dead and not unscored(best) else None}}

    # -- routing --------------------------------------------------------------------------------------------
    # Each router names the states its node can leave behind and raises GraphStateError on any other: an
    # impossible state is a bug to see, not an item to accept quietly.
    def impossible(node: str, state: ItemState, why: str) -> GraphStateError:
        item = state.get("item") or {}
        return GraphStateError(f"after {node} of item {item.get('item_id', '?')} ({item.get('target', '?')}): {why}")

    def dead_drafts(state: ItemState) -> list[dict[str, Any]]:
        return [d for d in state.get("drafts") or [] if d.get("dead")]

    def after_plan(state: ItemState) -> str:
        pending = state.get("pending") or []
        if state.get("stop") or dead_drafts(state):  # a budget, or a dead feature stored as such
            if pending:
                raise impossible("plan", state, f"{len(pending)} tool call(s) pending, but the item is ending "
                                                f"({state.get('stop') or 'dead feature'})")
            return "accept"
        return "act" if pending else "propose"

    def after_act(state: ItemState) -> str:
        if state.get("stop"):
            return "accept"
        if not state.get("results"):
            raise impossible("act", state, "no tool call ran and no budget stopped the item")
        return "observe"

    def after_observe(state: ItemState) -> str:
        return "accept" if state.get("stop") else "plan"

    def after_propose(state: ItemState) -> str:
        drafts = state.get("drafts") or []
        dead = dead_drafts(state)
        if dead:  # the policy found the feature dead: stored as such, never scored
            if len(dead) != len(drafts):
                raise impossible("propose", state, "a dead-feature draft among labels of a live feature")
            return "accept"
        return "score" if drafts else "decide"

    def after_decide(state: ItemState) -> str:
        if state.get("stop"):
            return "accept"
        route = (state.get("notes") or {}).get("route")
        if route == "refine":
            return "plan"
        if route == "accept":
            return "accept"
        raise impossible("decide", state, f"route {route!r} is neither 'refine' nor 'accept'")

    g = StateGraph(ItemState)
    for name, fn in (("plan", plan), ("act", act), ("observe", observe), ("propose", propose), ("score", score),
                     ("decide", decide), ("accept", accept)):
        g.add_node(name, metered(name, fn))
    g.add_edge(START, "plan")
    g.add_conditional_edges("plan", after_plan, {"act": "act", "propose": "propose", "accept": "accept"})
    g.add_conditional_edges("act", after_act, {"observe": "observe", "accept": "accept"})
    g.add_conditional_edges("observe", after_observe, {"plan": "plan", "accept": "accept"})
    g.add_conditional_edges("propose", after_propose, {"score": "score", "decide": "decide", "accept": "accept"})
    g.add_edge("score", "decide")
    g.add_conditional_edges("decide", after_decide, {"plan": "plan", "accept": "accept"})
    g.add_edge("accept", END)
    return g.compile(checkpointer=checkpointer)


def unscored(entry: dict[str, Any]) -> bool:
    """A scored-state entry whose correctness could not be computed (None): it is *unscored*."""
    return (entry.get("scores") or {}).get("correctness") is None


def rank(entry: dict[str, Any]) -> tuple[bool, float, int]:
    """How ``accept`` ranks drafts: every scored draft above every unscored one, then by overall score, then the
    shorter text. An unscored draft's ``overall`` (which counts the missing correctness as 0) only orders unscored
    drafts among themselves, and is stored as NULL."""
    return (not unscored(entry), float(entry["overall"]), -len(entry["text"]))


def initial_state(item: WorkItem) -> ItemState:
    return {"item": item.model_dump(mode="json"), "step": 0, "pending": [], "results": [], "calls": [],
            "hypotheses": {}, "drafts": [], "scored": [], "messages": [], "notes": {}, "usage": Usage().model_dump(),
            "stop": None, "outcome": None, "outbox": []}
