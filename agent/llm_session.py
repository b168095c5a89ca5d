"""The LLM client as a run uses it: every attempt logged to ``llm_calls``, responses cached in ``llm_cache``,
token usage charged to the item being run (its budget).

A run makes one client (:func:`make_client`) and hands it to whatever talks to the model: the ``llm`` policy and
the ``llm`` judge alike, so the judge's calls are logged, cached for resume and counted like the policy's, and
what the client learns about the endpoint (the structured-output and tool-calling modes it accepts) holds for
both. The API key stays inside the client (:class:`~autoexplain.agent.llm.LLMConfig` keeps it as a secret and
the records it reports are redacted); nothing here sees it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from autoexplain.agent.state import LLMMeter
from autoexplain.agent.store.caches import StoreCache, llm_call_row

if TYPE_CHECKING:
    from autoexplain.agent.llm import LLMClient
    from autoexplain.agent.store import Store


def make_client(model: str, store: Store, run_id: str, meter: LLMMeter, **overrides: Any) -> LLMClient:
    """An :class:`~autoexplain.agent.llm.LLMClient` from the environment (OPENAI_API_KEY, OPENAI_BASE_URL) whose
    calls are logged (``llm_calls``, against ``meter.current``) and charged to that item through ``meter``.
    ``overrides``: :class:`~autoexplain.agent.llm.LLMConfig` fields (timeouts, retries …)."""
    from autoexplain.agent.llm import LLMClient, LLMConfig

    config = LLMConfig.from_env(model, **overrides)

    def on_call(rec: dict[str, Any]) -> None:
        item = meter.current
        store.upsert("llm_calls", [llm_call_row(run_id, item, model, rec)])
        if item is not None and not rec.get("cached"):
            meter.charge(item, prompt_tokens=int(rec.get("prompt_tokens") or 0),
                         completion_tokens=int(rec.get("completion_tokens") or 0))

    return LLMClient(config, on_call=on_call, cache=StoreCache(store))
