"""The caches a run reads and writes: tool results (``tool_cache``), LLM responses (``llm_cache``), and the log of
LLM calls (``llm_calls``).

Tool cache: a tool's output depends on the model, the SAEs loaded, the tool and its arguments, so the key is the
sha256 of exactly those (:func:`cache_key`); outputs are the tool's own output model in JSON.

LLM cache: what makes a resumed item not repeat the LLM calls it already made — the conversation is in the
checkpointed graph state, so the resumed node sends an identical request, whose hash is found here. API keys are
never stored (the client redacts them from every record it hands to :func:`llm_call_row`).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import TYPE_CHECKING, Any

from autoexplain.agent.store import queries
from autoexplain.agent.store.rows import utc_now
from autoexplain.agent.store.schema import LLMCallRow

if TYPE_CHECKING:
    from autoexplain.agent.store.db import Store
    from autoexplain.agent.store.outbox import Outbox


class StoreCache:
    """:class:`autoexplain.agent.llm.ResponseCache` on the store's ``llm_cache`` table."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def get(self, key: str) -> dict[str, Any] | None:
        found = queries.llm_cache_response(self.store, key)
        return json.loads(found) if found is not None else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.store.upsert("llm_cache", [{"request_hash": key, "response": json.dumps(value), "created_at": utc_now()}])


def llm_call_row(run_id: str, item_id: str | None, default_model: str, rec: dict[str, Any]) -> LLMCallRow:
    """The ``llm_calls`` row of one attempt the client recorded (``rec``: purpose, model, attempt, ok, tokens...)."""
    return {"llm_call_id": f"llm-{uuid.uuid4().hex[:16]}", "run_id": run_id, "item_id": item_id,
            "purpose": rec.get("purpose") or "?", "model": rec.get("model") or default_model,
            "attempt": int(rec.get("attempt") or 0), "ok": bool(rec.get("ok")), "cached": bool(rec.get("cached")),
            "prompt_tokens": rec.get("prompt_tokens"), "completion_tokens": rec.get("completion_tokens"),
            "duration_s": rec.get("duration_s"), "finish_reason": rec.get("finish_reason"),
            "error": rec.get("error"), "request_hash": rec.get("request_hash"), "created_at": utc_now(),
            "mode": rec.get("mode"), "status_code": rec.get("status_code"), "retry_in_s": rec.get("retry_in_s")}


def cache_key(model_id: str, sae_ids: list[str], tool: str, args: dict[str, Any]) -> str:
    """The tool-cache key: sha256 of (model, sorted SAE ids, tool, canonical arguments)."""
    payload = json.dumps([model_id, sorted(sae_ids), tool, args], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def cached_output(store: Store, out: Outbox, key: str) -> str | None:
    """The cached output (JSON) under ``key``: a row waiting in ``out``, else one in the store, else None."""
    row = out.get("tool_cache", (key,))
    if row is not None:
        return str(row["output"])
    return queries.tool_cache_output(store, key)
