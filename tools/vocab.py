"""The shared names: sites, graph nodes and edges, features, causal levels.

Tools, the agent, the store and the prompts all speak this vocabulary, and the string forms below are the keys
stored in DuckDB and shown to the LLM. Raw runtime hook names never travel around the codebase: a :class:`Site`
is converted to its runtime hook name in exactly one place, :func:`autoexplain.tools.models.hook_name`.

String forms
------------
Sites (where a tool reads or writes activations), zero-based layer ``L`` and head ``H``:

=================  ======================================================================
``resid_pre.L``    residual stream entering block L (``resid_pre.0`` = token + position embeddings)
``resid_mid.L``    residual stream between attention and MLP of block L
``resid_post.L``   residual stream leaving block L
``attn_out.L``     attention output of block L (sum over heads, bias included)
``mlp_in.L``       MLP input of block L (after the residual; before LayerNorm)
``mlp_out.L``      MLP output of block L
``mlp_post.L``     MLP hidden activations (neurons) of block L
``z.L``            per-head attention values mixed by the pattern, ``[.., head, d_head]``
``head_out.L.H``   output of head H of block L written to the residual stream
``q_in.L.H``       the residual input to head H's query (likewise ``k_in``, ``v_in``)
``pattern.L``      attention pattern of block L, ``[batch, head, query, key]``
=================  ======================================================================

Graph nodes: ``embed``, ``a{L}.{H}`` (attention head), ``m{L}`` (MLP), ``logits`` (the unembedding input).
Edges: ``src->dst`` and, when ``dst`` is a head, the input it feeds: ``embed->a1.2.q``, ``a0.3->a1.2.k``,
``a1.2->logits``, ``m0->m1``.
Features: ``sae_id#index``.

Typed values, string forms at the edges
---------------------------------------
:class:`Site`, :class:`Node`, :class:`Edge` and :class:`FeatureRef` are small frozen value types; code passes them
around, never their strings. Where data is serialised (JSON tool outputs and arguments, DuckDB rows, prompts),
pydantic writes each as its string form and reads it back from that form (see :class:`Term`), so a field typed
``list[Edge]`` dumps to the same JSON as the ``list[str]`` it replaced and has the same JSON schema. A value also
compares and hashes equal to its string form, so tables keyed by the stored strings find typed values.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field, GetCoreSchemaHandler
from pydantic_core import core_schema

from autoexplain.tools.errors import InputError


class Term:
    """Base of the vocabulary's value types: typed in Python, a string wherever pydantic serialises.

    A subclass defines ``_format`` (its string form, also ``str(value)``) and :meth:`parse` (the inverse, raising
    :class:`InputError`).
    As a pydantic field it validates from an instance or its string form (a malformed string is a validation
    error carrying the parse message), serialises to the string form in both Python and JSON dumps, and has
    the JSON schema ``{"type": "string"}``. Equality and hashing go through the string form, which therefore
    must identify the value; an instance equals its string too.
    """

    __slots__ = ()
    #: What a value is called in messages, and an example of its string form.
    noun: ClassVar[str] = "value"
    example: ClassVar[str] = ""

    @classmethod
    def parse(cls, text: str) -> Self:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    @cached_property
    def text(self) -> str:
        """The string form (computed once)."""
        return self._format()

    def _format(self) -> str:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    def __str__(self) -> str:
        return self.text

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            return self.text == other
        if type(other) is type(self):
            return self.text == other.text
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.text)

    @classmethod
    def coerce(cls, value: object) -> Self:
        """``value`` as this type: an instance as is, a string parsed (:class:`InputError` if malformed)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        raise ValueError(f"expected a {cls.noun} (a string such as {cls.example!r}), got {type(value).__name__}")

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls.coerce, json_schema_input_schema=core_schema.str_schema(),
            serialization=core_schema.plain_serializer_function_ser_schema(
                str, return_schema=core_schema.str_schema()))


class SiteKind(StrEnum):
    RESID_PRE = "resid_pre"
    RESID_MID = "resid_mid"
    RESID_POST = "resid_post"
    ATTN_OUT = "attn_out"
    MLP_IN = "mlp_in"
    MLP_OUT = "mlp_out"
    MLP_POST = "mlp_post"
    Z = "z"
    HEAD_OUT = "head_out"
    Q_IN = "q_in"
    K_IN = "k_in"
    V_IN = "v_in"
    PATTERN = "pattern"


#: Kinds whose site names one head (``head_out.L.H``); the others name a whole layer.
HEAD_KINDS: frozenset[SiteKind] = frozenset({SiteKind.HEAD_OUT, SiteKind.Q_IN, SiteKind.K_IN, SiteKind.V_IN})
#: Kinds that exist only in models with MLPs.
MLP_KINDS: frozenset[SiteKind] = frozenset({SiteKind.MLP_IN, SiteKind.MLP_OUT, SiteKind.MLP_POST, SiteKind.RESID_MID})


@dataclass(frozen=True, eq=False)
class Site(Term):
    """A place in the model where activations are read or written: a kind, a layer and (for per-head kinds) a head."""

    noun: ClassVar[str] = "site"
    example: ClassVar[str] = "head_out.1.2"

    kind: SiteKind
    layer: int
    head: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", SiteKind(self.kind))
        if self.layer < 0 or (self.head is not None and self.head < 0):
            raise ValueError(f"site layer and head must be >= 0, got layer {self.layer}, head {self.head}")
        if (self.kind in HEAD_KINDS) != (self.head is not None):
            need = "needs a head index" if self.kind in HEAD_KINDS else "takes no head index"
            raise ValueError(f"site kind {self.kind.value!r} {need}")

    def _format(self) -> str:
        return f"{self.kind.value}.{self.layer}" + ("" if self.head is None else f".{self.head}")

    @classmethod
    def parse(cls, text: str) -> Site:
        """Parse ``'resid_post.1'`` or ``'head_out.1.2'``; raise :class:`InputError` with the valid forms."""
        parts = text.strip().split(".")
        kinds = ", ".join(k.value for k in SiteKind)
        try:
            kind = SiteKind(parts[0])
            nums = [int(p) for p in parts[1:]]
        except ValueError:
            raise InputError(
                f"unknown site {text!r}: write KIND.LAYER or KIND.LAYER.HEAD with KIND one of {kinds}"
            ) from None
        expected = 2 if kind in HEAD_KINDS else 1
        if len(nums) != expected or any(n < 0 for n in nums):
            form = "KIND.LAYER.HEAD" if expected == 2 else "KIND.LAYER"
            raise InputError(f"site {text!r} is malformed: {kind.value} sites are written {form}, e.g. "
                             f"{kind.value}.0{'.1' if expected == 2 else ''}")
        return cls(kind=kind, layer=nums[0], head=nums[1] if expected == 2 else None)


class CausalLevel(StrEnum):
    """How strong a claim the evidence behind a hypothesis or explanation supports (after Pearl's ladder).

    ``association``: the explanation matches where a component is active (top activations, lens, probes).
    ``intervention``: changing the component changes the output as predicted (patching, ablation, steering).
    ``counterfactual``: the explanation predicts the outcome of specific counterfactual inputs, item by item.
    """

    ASSOCIATION = "association"
    INTERVENTION = "intervention"
    COUNTERFACTUAL = "counterfactual"

    @property
    def rung(self) -> int:
        """1, 2, 3: the level's place on the ladder (higher claims more)."""
        return (CausalLevel.ASSOCIATION, CausalLevel.INTERVENTION, CausalLevel.COUNTERFACTUAL).index(self) + 1


def supported_level(levels: Iterable[CausalLevel | None]) -> CausalLevel | None:
    """The causal level a body of evidence supports: the highest level among the tool results it cites (each tool
    declares its level, :attr:`autoexplain.tools.registry.ToolSpec.level`). None when nothing cited is evidence
    about the model's computation. A claim above this level is an overclaim."""
    known = [lv for lv in levels if lv is not None]
    return max(known, key=lambda lv: lv.rung) if known else None


class Explanation(BaseModel):
    """What someone claims happens: the text, who wrote it (a policy, and the LLM behind it if any), the evidence it
    rests on (tool call ids) and the causal level that evidence supports. Its numbers are
    :class:`autoexplain.evals.scores.Score`s, stored against it."""

    model_config = ConfigDict(frozen=True)

    target: str = Field(description="what is explained: a feature 'sae_id#index' or a task name")
    text: str = Field(min_length=1)
    author: str = Field(description="who wrote it: a policy name (offline, llm)")
    llm_model: str | None = None
    causal_level: CausalLevel = Field(default=CausalLevel.ASSOCIATION, description="the level its author claims")
    evidence: tuple[str, ...] = Field(default=(), description="tool call ids")
    supported_level: CausalLevel | None = Field(default=None, description="the highest level among the cited tool "
                                                "calls (see supported_level); None: no evidence cited or not checked")

    @property
    def overclaimed(self) -> bool | None:
        """True when the claimed level is above the supported one (a supported level of None, with evidence cited,
        means the cited calls are no evidence about the computation: any claim is above it). None when nothing is
        cited (a dead feature's note)."""
        if not self.evidence:
            return None
        return self.causal_level.rung > (self.supported_level.rung if self.supported_level else 0)


# ----------------------------------------------------------------------------------------------- interventions
class Ablation(StrEnum):
    """What a patched activation is replaced with (see the module doc)."""

    RESAMPLE = "resample"
    MEAN = "mean"
    ZERO = "zero"


class PatchType(StrEnum):
    NODE = "node"
    EDGE = "edge"
    PATH = "path"


#: Named PatchMetric, not Metric: score names ("correctness", …) are metrics of explanations, this is a patching
#: measurement.
class PatchMetric(StrEnum):
    """What is measured at the answer position; ``kl`` is a divergence (0 = the clean run), the others grow with
    the clean behaviour."""

    LOGIT_DIFF = "logit_diff"
    ANSWER_PROB = "answer_prob"
    KL = "kl"


class Direction(StrEnum):
    """Node patching: ``noising`` patches ablated values into the clean run (necessity); ``denoising`` patches
    clean values into the corrupt run (sufficiency)."""

    NOISING = "noising"
    DENOISING = "denoising"


class Method(StrEnum):
    """Circuit search methods (catalogue in :mod:`autoexplain.tools.circuits`)."""

    EAP = "eap"
    EAP_IG = "eap-ig"
    ACDC = "acdc"
    #: EAP-IG scores, then noising checks of nodes and edges in the full model (finds AND gates)
    EAP_IG_NOISING = "eap-ig+noising"


# ----------------------------------------------------------------------------------------------- graph
_NODE_RE = re.compile(r"^(embed|logits|a(\d+)\.(\d+)|m(\d+))$")
_EDGE_RE = re.compile(r"^(?P<src>[^-]+)->(?P<dst>[a-z0-9.]+?)(?:\.(?P<qkv>[qkv]))?$")


@dataclass(frozen=True, eq=False)
class Node(Term):
    """A node of the computational graph: ``embed``, ``a{L}.{H}``, ``m{L}`` or ``logits``."""

    noun: ClassVar[str] = "node"
    example: ClassVar[str] = "a1.2"

    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NODE_RE.match(self.name):
            raise ValueError(f"unknown node {self.name!r}: use embed, aL.H, mL or logits")

    @classmethod
    def parse(cls, text: str) -> Node:
        """Parse ``'a1.2'``; raise :class:`InputError` on anything else."""
        try:
            return cls(name=text.strip())
        except ValueError as exc:
            raise InputError(str(exc)) from None

    @property
    def layer(self) -> int | None:
        m = _NODE_RE.match(self.name)
        assert m
        return int(m.group(2) or m.group(4)) if (m.group(2) or m.group(4)) else None

    @property
    def head(self) -> int | None:
        m = _NODE_RE.match(self.name)
        assert m
        return int(m.group(3)) if m.group(3) else None

    @property
    def is_head(self) -> bool:
        return self.name.startswith("a")

    def _format(self) -> str:
        return self.name


@dataclass(frozen=True, eq=False)
class Edge(Term):
    """A directed edge ``src->dst`` of the graph; ``qkv`` names the head input it feeds when ``dst`` is a head."""

    noun: ClassVar[str] = "edge"
    example: ClassVar[str] = "a0.3->a1.2.k"

    src: Node
    dst: Node
    qkv: str | None = None

    def __post_init__(self) -> None:
        if self.dst.is_head != (self.qkv in ("q", "k", "v")):
            raise ValueError(f"edge into {self.dst} must {'name q, k or v' if self.dst.is_head else 'not name q/k/v'}")
        if self.src.name == "logits" or self.dst.name == "embed":
            raise ValueError("edges leave embed/heads/MLPs and enter heads/MLPs/logits")

    def _format(self) -> str:
        return f"{self.src}->{self.dst}" + (f".{self.qkv}" if self.qkv else "")

    @classmethod
    def parse(cls, text: str) -> Edge:
        """Parse ``'a0.3->a1.2.k'``; raise :class:`InputError` on anything else (never ignore an unknown edge)."""
        m = _EDGE_RE.match(text.strip())
        try:
            if not m:
                raise ValueError("expected SRC->DST")
            return cls(src=Node(name=m["src"]), dst=Node(name=m["dst"]), qkv=m["qkv"])
        except ValueError as exc:
            raise InputError(f"malformed edge {text!r} ({exc}): write e.g. embed->a1.2.q, a0.3->m1 or "
                             "m1->logits") from None


@dataclass(frozen=True, eq=False)
class FeatureRef(Term):
    """One SAE feature: a stable ``sae_id`` (content hash of the weights) and the feature index."""

    noun: ClassVar[str] = "feature"
    example: ClassVar[str] = "sae-0123456789abcdef#12"

    sae_id: str
    index: int

    def __post_init__(self) -> None:
        if self.index < 0:
            raise ValueError(f"feature index must be >= 0, got {self.index}")

    def _format(self) -> str:
        return f"{self.sae_id}#{self.index}"

    @classmethod
    def parse(cls, text: str) -> FeatureRef:
        """Parse ``'SAE_ID#INDEX'``; raise :class:`InputError` on anything else."""
        sae_id, sep, index = text.strip().rpartition("#")
        try:
            if not sep or not index.isdigit():
                raise ValueError("expected SAE_ID#INDEX")
            return cls(sae_id=sae_id, index=int(index))
        except ValueError as exc:
            raise InputError(f"malformed feature {text!r} ({exc}): write SAE_ID#INDEX, e.g. {cls.example}") from None
