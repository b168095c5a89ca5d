"""The catalogue of tools: one entry per tool, shared by Python users, the CLI and the LLM.

Every tool is a plain function ``fn(ctx, args) -> output`` with a pydantic input model and a pydantic output model.
The output carries the full result for Python and a bounded :meth:`ToolOutput.summary` for the LLM (top-N lists,
rounded numbers, never raw tensors). The registry refuses duplicate names, and :meth:`Registry.call` validates
arguments so a bad call becomes one :class:`InputError` line an LLM can act on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from autoexplain.tools.errors import InputError
from autoexplain.tools.vocab import CausalLevel

if TYPE_CHECKING:
    from autoexplain.tools.harvest import HarvestSink
    from autoexplain.tools.models import LoadedModel
    from autoexplain.tools.saes import LoadedSAE

#: Hard cap on what a summary may hand the LLM, whatever a tool writes.
SUMMARY_MAX_CHARS = 2000


def short_repr(text: str, width: int = 40) -> str:
    """``repr`` of ``text`` cut to ``width`` characters with an ellipsis: how summaries and errors quote texts."""
    return repr(text if len(text) <= width else text[: width - 1] + "…")


def round_sig(x: float, digits: int = 4) -> float:
    """Round to ``digits`` significant digits for summaries: tiny values stay visible, zeros and non-finite values
    are returned as they are."""
    import math

    return x if x == 0 or not math.isfinite(x) else float(f"{x:.{digits}g}")


class Cost(StrEnum):
    """How expensive one call is, so a planner can budget: ``cheap`` (no forward pass or one tiny one),
    ``forward`` (forward passes over a handful of texts), ``dataset`` (a pass over a dataset)."""

    CHEAP = "cheap"
    FORWARD = "forward"
    DATASET = "dataset"


class ToolOutput(BaseModel):
    """Base of every tool output: the full result as fields, plus a bounded text summary for an LLM."""

    def summary_text(self) -> str:  # pragma: no cover - each tool overrides
        raise NotImplementedError

    def summary(self) -> str:
        text = self.summary_text()
        return text if len(text) <= SUMMARY_MAX_CHARS else text[: SUMMARY_MAX_CHARS - 20] + " … (truncated)"


@dataclass
class ToolContext:
    """What tools run against: the loaded model and SAEs (by ``sae_id``), and where their records go.

    ``sink`` receives the results a tool produces for the results database (harvest's
    :class:`~autoexplain.tools.harvest.HarvestResult`). Tools know nothing of DuckDB: the agent or CLI passes the
    store's writer here (:func:`autoexplain.agent.store.harvest.harvest_sink`). Without a sink, a tool that must
    persist refuses to run rather than silently keeping nothing.
    """

    model: LoadedModel
    saes: dict[str, LoadedSAE] = field(default_factory=dict)  # by sae_id
    sink: HarvestSink | None = None

    def sae(self, sae_id: str) -> LoadedSAE:
        """The loaded SAE ``sae_id``, or an :class:`InputError` listing the loaded ones."""
        if sae_id in self.saes:
            return self.saes[sae_id]
        if not self.saes:
            raise InputError(f"unknown sae_id {sae_id!r}: no SAE is loaded in this session; start it with an SAE "
                             "(--sae) to use the feature tools")
        raise InputError(f"unknown sae_id {sae_id!r}: the loaded SAEs are {', '.join(sorted(self.saes))}; "
                         "pass one of these ids (model_info lists them)")


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str  # for an LLM and a human: what it measures and what causal claim it supports
    input_model: type[BaseModel]
    output_model: type[ToolOutput]
    fn: Callable[[ToolContext, Any], ToolOutput]
    cost: Cost
    #: The rung of Pearl's ladder a result of this tool supports: ``association`` (where something is active:
    #: activations, lenses, harvests, attention patterns, weight-based scores), ``intervention`` (the output changes
    #: when the tool changes the model: patching, ablation, steering), ``counterfactual`` (per-example interchange
    #: interventions whose item-by-item outcome is predicted). None: not evidence about the model's computation
    #: (metadata such as ``model_info``). An explanation's supported level is the highest level among the calls it
    #: cites; a claim above it is flagged.
    level: CausalLevel | None

    def json_schema(self) -> dict[str, Any]:
        return self.input_model.model_json_schema()

    def openai_schema(self) -> dict[str, Any]:
        """The function-calling schema OpenAI-compatible endpoints take."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.json_schema()}}


class Registry:
    """Name -> tool. Refuses duplicates; unknown names and bad arguments are :class:`InputError`."""

    def __init__(self) -> None:
        self._tools: dict[str, ToolSpec] = {}

    def register(self, spec: ToolSpec) -> ToolSpec:
        if spec.name in self._tools:
            raise ValueError(f"tool {spec.name!r} is already registered")
        self._tools[spec.name] = spec
        return spec

    def __iter__(self) -> Iterator[ToolSpec]:
        return iter(sorted(self._tools.values(), key=lambda s: s.name))

    def __len__(self) -> int:
        return len(self._tools)

    def get(self, name: str) -> ToolSpec:
        if name not in self._tools:
            raise InputError(f"unknown tool {name!r}: available tools are {', '.join(sorted(self._tools))}")
        return self._tools[name]

    def parse_args(self, name: str, args: dict[str, Any] | str) -> BaseModel:
        spec = self.get(name)
        try:
            if isinstance(args, str):
                return spec.input_model.model_validate_json(args)
            return spec.input_model.model_validate(args)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "arguments"
            raise InputError(f"bad arguments for {name}: {where}: {err['msg']} "
                             f"(schema: {sorted(spec.input_model.model_fields)})") from None

    def call(self, ctx: ToolContext, name: str, args: dict[str, Any] | str) -> ToolOutput:
        spec = self.get(name)
        return spec.fn(ctx, self.parse_args(name, args))


def default_registry() -> Registry:
    """A fresh registry with every built-in tool (built on demand: no registry exists at import time)."""
    import importlib

    reg = Registry()
    for module in TOOL_MODULES:
        for spec in importlib.import_module(f"autoexplain.tools.{module}").TOOLS:
            reg.register(spec)
    return reg


#: Modules of ``autoexplain.tools`` that export a ``TOOLS`` tuple of :class:`ToolSpec`.
TOOL_MODULES: tuple[str, ...] = ("info", "probe", "lens", "harvest", "patching", "circuits", "heads",
                                 "tracing", "attribution", "feature_circuits", "identifiability")
