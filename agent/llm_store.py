"""The LLM client as a run uses it: every attempt logged to ``llm_calls``, responses cached in ``llm_cache``.

The cache is what makes a resumed item not repeat the LLM calls it already made: the conversation is in the
checkpointed graph state, so the resumed node sends an identical request, whose hash is found here. Token usage
is charged to the item being run (its budget) and stored per call; API keys are never stored (the client
redacts them from every record).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from autoexplain.agent.state import Usage, now


class StoreCache:
    """:class:`autoexplain.agent.llm.ResponseCache` on the store's ``llm_cache`` table."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def get(self, key: str) -> dict[str, Any] | None:
        rows = self.store.query("select response from llm_cache where request_hash = ?", [key])[1]
        return json.loads(rows[0][0]) if rows else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.store.upsert("llm_cache", [{"request_hash": key, "response": json.dumps(value), "created_at": now()}])


def make_client(model: str, store: Any, run_id: str, holder: dict[str, Any], **overrides: Any) -> Any:
    """An :class:`~autoexplain.agent.llm.LLMClient` from the environment (OPENAI_API_KEY, OPENAI_BASE_URL) whose
    calls are logged and charged to ``holder["env"].current_item``."""
    from autoexplain.agent.llm import LLMClient, LLMConfig

    config = LLMConfig.from_env(model, **overrides)

    def on_call(rec: dict[str, Any]) -> None:
        env = holder.get("env")
        item = env.current_item if env is not None else None
        store.upsert("llm_calls", [{
            "llm_call_id": f"llm-{uuid.uuid4().hex[:16]}", "run_id": run_id, "item_id": item,
            "purpose": rec.get("purpose") or "?", "model": rec.get("model") or model,
            "attempt": int(rec.get("attempt") or 0), "ok": bool(rec.get("ok")), "cached": bool(rec.get("cached")),
            "prompt_tokens": rec.get("prompt_tokens"), "completion_tokens": rec.get("completion_tokens"),
            "duration_s": rec.get("duration_s"), "finish_reason": rec.get("finish_reason"),
            "error": rec.get("error"), "request_hash": rec.get("request_hash"), "created_at": now()}])
        if env is not None and item is not None and not rec.get("cached"):
            used = env.llm_meter.get(item, Usage())
            env.llm_meter[item] = used.plus(llm_calls=1, prompt_tokens=int(rec.get("prompt_tokens") or 0),
                                            completion_tokens=int(rec.get("completion_tokens") or 0))

    return LLMClient(config, on_call=on_call, cache=StoreCache(store))
