"""Policies that drive the agent graph: offline (deterministic rules) and llm (OpenAI-compatible).

:data:`POLICIES` is the catalogue a run picks from by name (a plan's ``policy:``): each entry builds its policy
from the run's :class:`PolicyDeps`, importing the policy's module only when it is picked.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

from autoexplain.agent.policies.base import Policy
from autoexplain.tools.errors import InputError

if TYPE_CHECKING:
    from autoexplain.agent.llm import LLMClient
    from autoexplain.tools.registry import Registry


@dataclass(frozen=True)
class PolicyDeps:
    """What a run offers a policy to be built from; each policy takes what it needs."""

    registry: Registry  # the tools the run executes (an LLM is offered their schemas)
    model_id: str  # the model under study
    lexicon: Mapping[str, frozenset[str]] | None = None  # category -> words (the offline policy's world knowledge)
    llm: LLMClient | None = None  # the run's one LLM client, when the policy or the judge is llm


PolicyFactory = Callable[[PolicyDeps], Policy]


def _offline(deps: PolicyDeps) -> Policy:
    from autoexplain.agent.policies.offline import OfflinePolicy

    return OfflinePolicy(lexicon=deps.lexicon)


def _llm(deps: PolicyDeps) -> Policy:
    from autoexplain.agent.policies.llm import LLMPolicy, offered_tools

    if deps.llm is None:
        raise ValueError("the llm policy needs the run's LLM client (PolicyDeps.llm)")
    return LLMPolicy(deps.llm, tools=offered_tools(deps.registry), model_id=deps.model_id)


#: policy name (a plan's ``policy:``) -> how to build it
POLICIES: Mapping[str, PolicyFactory] = MappingProxyType({"offline": _offline, "llm": _llm})


def make_policy(name: str, deps: PolicyDeps) -> Policy:
    """The policy called ``name`` (a key of :data:`POLICIES`), built from ``deps``; an unknown name is an
    :class:`InputError`."""
    try:
        factory = POLICIES[name]
    except KeyError:
        raise InputError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}") from None
    return factory(deps)


__all__ = ["POLICIES", "Policy", "PolicyDeps", "PolicyFactory", "make_policy"]
