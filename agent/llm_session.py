"""The LLM client as a run uses it: every attempt logged to ``llm_calls``, responses cached in ``llm_cache``,
token usage charged to the item being run (its budget)."""

from __future__ import annotations

from typing import Any

from autoexplain.agent.state import Usage
from autoexplain.agent.store.caches import StoreCache, llm_call_row


def make_client(model: str, store: Any, run_id: str, holder: dict[str, Any], **overrides: Any) -> Any:
    """An :class:`~autoexplain.agent.llm.LLMClient` from the environment (OPENAI_API_KEY, OPENAI_BASE_URL) whose
    calls are logged and charged to ``holder["env"].current_item``."""
    from autoexplain.agent.llm import LLMClient, LLMConfig

    config = LLMConfig.from_env(model, **overrides)

    def on_call(rec: dict[str, Any]) -> None:
        env = holder.get("env")
        item = env.current_item if env is not None else None
        store.upsert("llm_calls", [llm_call_row(run_id, item, model, rec)])
        if env is not None and item is not None and not rec.get("cached"):
            used = env.llm_meter.get(item, Usage())
            env.llm_meter[item] = used.plus(llm_calls=1, prompt_tokens=int(rec.get("prompt_tokens") or 0),
                                            completion_tokens=int(rec.get("completion_tokens") or 0))

    return LLMClient(config, on_call=on_call, cache=StoreCache(store))
