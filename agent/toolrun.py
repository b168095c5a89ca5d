"""Executing tool calls for the agent: validation, the result cache, and one ``tool_calls`` row per call.

Cache
-----
A tool's output depends on the model, the SAEs loaded, the tool and its arguments, so the cache key is the
sha256 of exactly those (the model and SAE ids are content hashes; arguments are canonical JSON after pydantic
validation, so ``{"texts": ["a"]}`` and a call that spells out every default share a key). Outputs are stored as
the tool's own output model in JSON (table ``tool_cache``) and rebuilt with ``model_validate_json``. A resumed item
(or any later item asking the same question) gets the stored result without a forward pass. ``cheap`` tools
(descriptions, tokenisation, store reads) are not cached: recomputing them costs less than a database round trip,
and store reads must see the current data.

Rows go to the run's :class:`~autoexplain.agent.store.outbox.Outbox` (committed in groups, carried by the step's
checkpoint until then); lookups see its waiting rows first. A result that took longer than
``GroupCommit.cache_now_s`` to compute is committed at once instead, so a crash later in the same step never
makes it run twice.

Errors
------
Dataset-wide tools (``harvest``) are not the agent's: the LLM is never offered them, and a call that names one
anyway is refused here like an unknown tool (the run harvests before its items start). Bad arguments, unknown
tools and tool refusals (:class:`InputError`) become the call's ``error``: a line the
policy (or the LLM) can act on. They are logged like any call. Other exceptions are bugs and propagate.

Call ids are derived from (item, step, position in the step), so a step re-run after a crash rewrites its rows.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from autoexplain.agent.state import ToolRequest, ToolResult, now, stable_id
from autoexplain.agent.store.caches import cache_key, cached_output
from autoexplain.tools.errors import InputError
from autoexplain.tools.registry import Cost, Registry, ToolContext, ToolOutput

if TYPE_CHECKING:
    from autoexplain.agent.store import Store
    from autoexplain.agent.store.outbox import Outbox
    from autoexplain.agent.store.schema import ToolCacheRow, ToolCallRow


class ToolRunner:
    """Runs :class:`ToolRequest`s against one model session, caching and logging each call in the store."""

    def __init__(self, store: Store, out: Outbox, registry: Registry, ctx: ToolContext, run_id: str) -> None:
        self.store, self.out, self.registry, self.ctx, self.run_id = store, out, registry, ctx, run_id
        self.executed = 0  # calls that really ran (not served from the cache), for tests and reports

    def run(self, item_id: str, step: int, requests: list[ToolRequest]) -> list[ToolResult]:
        return [self._one(item_id, step, i, r) for i, r in enumerate(requests)]

    def _one(self, item_id: str, step: int, index: int, req: ToolRequest) -> ToolResult:
        call_id = stable_id("call", item_id, step, index)
        t0 = time.monotonic()
        key: str | None = None
        output: ToolOutput | None = None
        error: str | None = None
        cached = False
        args_json: dict[str, Any] | str = req.args
        try:
            spec = self.registry.get(req.tool)
            if spec.cost is Cost.DATASET:  # never offered to the agent (see agent.policies.llm): refused, not run
                raise InputError(f"tool {req.tool!r} is not available to the agent: it passes over a whole dataset, "
                                 "which the run does before its items start; use feature_examples for harvested "
                                 "results")
            parsed = self.registry.parse_args(req.tool, req.args)
            args_json = parsed.model_dump(mode="json")
            if spec.cost is not Cost.CHEAP:
                key = cache_key(self.ctx.model.model_id, list(self.ctx.saes), req.tool, args_json)
                hit = cached_output(self.store, self.out, key)
                if hit is not None:
                    output, cached = spec.output_model.model_validate_json(hit), True
            if output is None:
                output = spec.fn(self.ctx, parsed)
                self.executed += 1
        except InputError as exc:
            error = exc.message
        duration = time.monotonic() - t0
        summary = output.summary() if output is not None else ""
        row: ToolCallRow = {"call_id": call_id, "run_id": self.run_id, "item_id": item_id, "tool": req.tool,
                            "args": args_json if isinstance(args_json, dict) else {"raw": str(args_json)[:2000]},
                            "summary": summary, "error": error, "duration_s": duration, "cache_key": key,
                            "created_at": now()}
        if output is not None and key is not None and not cached:
            entry: ToolCacheRow = {"cache_key": key, "tool": req.tool, "output": output.model_dump_json(),
                                   "created_at": now()}
            if duration >= self.out.policy.cache_now_s:
                self.store.upsert("tool_cache", [entry])
            else:
                self.out.upsert("tool_cache", [entry])
        self.out.upsert("tool_calls", [row])
        return ToolResult(call_id=call_id, request=req, summary=summary, error=error, cached=cached, output=output)
