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
"""

from __future__ import annotations

import re
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, model_validator

from autoexplain.tools.errors import InputError


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


class Site(BaseModel):
    """A place in the model where activations are read or written: a kind, a layer and (for per-head kinds) a head."""

    model_config = ConfigDict(frozen=True)

    kind: SiteKind
    layer: int = Field(ge=0)
    head: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _head_matches_kind(self) -> Site:
        if (self.kind in HEAD_KINDS) != (self.head is not None):
            need = "needs a head index" if self.kind in HEAD_KINDS else "takes no head index"
            raise ValueError(f"site kind {self.kind.value!r} {need}")
        return self

    def __str__(self) -> str:
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


class Metric(StrEnum):
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


# ----------------------------------------------------------------------------------------------- graph
_NODE_RE = re.compile(r"^(embed|logits|a(\d+)\.(\d+)|m(\d+))$")
_EDGE_RE = re.compile(r"^(?P<src>[^-]+)->(?P<dst>[a-z0-9.]+?)(?:\.(?P<qkv>[qkv]))?$")


class Node(BaseModel):
    """A node of the computational graph: ``embed``, ``a{L}.{H}``, ``m{L}`` or ``logits``."""

    model_config = ConfigDict(frozen=True)

    name: str

    @model_validator(mode="after")
    def _valid(self) -> Node:
        if not _NODE_RE.match(self.name):
            raise ValueError(f"unknown node {self.name!r}: use embed, aL.H, mL or logits")
        return self

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

    def __str__(self) -> str:
        return self.name


class Edge(BaseModel):
    """A directed edge ``src->dst`` of the graph; ``qkv`` names the head input it feeds when ``dst`` is a head."""

    model_config = ConfigDict(frozen=True)

    src: Node
    dst: Node
    qkv: str | None = None

    @model_validator(mode="after")
    def _valid(self) -> Edge:
        if self.dst.is_head != (self.qkv in ("q", "k", "v")):
            raise ValueError(f"edge into {self.dst} must {'name q, k or v' if self.dst.is_head else 'not name q/k/v'}")
        if self.src.name == "logits" or self.dst.name == "embed":
            raise ValueError("edges leave embed/heads/MLPs and enter heads/MLPs/logits")
        return self

    def __str__(self) -> str:
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


class FeatureRef(BaseModel):
    """One SAE feature: a stable ``sae_id`` (content hash of the weights) and the feature index."""

    model_config = ConfigDict(frozen=True)

    sae_id: str
    index: int = Field(ge=0)

    def __str__(self) -> str:
        return f"{self.sae_id}#{self.index}"
