"""Circuit discovery on the patching core: EAP, EAP-IG and ACDC, selection by threshold or top-k, faithfulness.

Every method has one signature, ``(setup: PatchSetup, config: SearchConfig) -> EdgeScores``, and sits in one
catalogue (:data:`METHODS`), so callers never dispatch on strings. An :class:`EdgeScores` maps every edge of the
graph to a score in units of the metric; a circuit is the edges kept by :meth:`EdgeScores.select`.

A circuit C is judged by **faithfulness** ``(m(C) - m(∅)) / (m(M) - m(∅))``: m(C) is the metric with every edge
outside C patched (ablated), m(M) the unpatched model, m(∅) everything patched. 1 means the circuit alone
reproduces the model's behaviour on the task; 0 that it does no better than the ablated model. Circuits are
intervention-level evidence, and only for the ablation, metric and task distribution they were found with.

The methods
-----------
* **EAP** (edge attribution patching): one forward and one backward pass. ``score(s -> d) = (patched_s -
  clean_s) . d metric / d (input of d)`` at the clean run, summed over positions and averaged over prompts: the
  first-order estimate of what patching that one edge does to the metric. Fast, but blind where the metric is
  flat at the clean run (KL divergence, saturated softmaxes), so prefer EAP-IG.
* **EAP-IG** over inputs (Hanna et al.; MIB's recommended default): the same product, with the gradient averaged
  over ``steps`` points on the straight line between the ablated and the clean *input embeddings*
  (``resid_pre.0 = patched + alpha (clean - patched)``, ``alpha = k / steps``, k = 1..steps; for resample
  ablation the ablated input is the corrupt prompt's embedding, for zero and mean ablation the zero or mean
  embedding). It integrates the gradient, not the edge mask: every edge sees the same interpolated run.
* **ACDC** (Conmy et al.): start from the full graph; visit receivers (``logits``, then every MLP and head, last
  layer first) in reverse topological order; for each edge into the receiver (sources last-first; for a head its q,
  then k, then v inputs), tentatively patch it on top of the edges already removed; keep the removal if the metric
  moves by less than τ (for ``kl``: if it *increases* by less than τ; for the others: by less than τ in absolute
  value). An edge's score is that measured change (negative KL changes clipped to 0), so ``score >= τ`` is exactly
  the kept set. A receiver none of whose outgoing edges survives has all its incoming edges removed without a
  forward pass (their effect is exactly zero). Passes for a receiver in layer L start at layer L from the cached
  clean residual (nothing before it is patched yet); on CUDA several tentative removals are evaluated in one
  batched pass, each on top of the ones before it (speculation: the decisions are those of one-at-a-time ACDC).
  Progress (removed edges, scores, the next receiver, the current metric) is saved to a JSON checkpoint after
  each receiver; a killed run resumes where it stopped, with the same result as an uninterrupted run.

* **EAP-IG + noising** (``eap-ig+noising``, the default): EAP-IG, then *necessity* checks by noising in the full
  (otherwise clean) model, so that components which matter only jointly are found. Sufficiency-style views
  (faithfulness, EAP-IG's interpolation from the corrupt input) cannot see an AND gate: with the value path kept,
  the circuit reproduces the answer, and along the interpolation both inputs of the gate move together, so a
  saturated softmax keeps its pattern and its gradient vanishes. Noising one input of the gate alone breaks it.
  What it computes, in order (τ = ``threshold`` x |m(M) - m(∅)|, the selection cut):

  1. EAP-IG scores (``steps`` integration points), as above.
  2. Node level: for every head and MLP n, m(M with every outgoing edge of n patched) - m(M) (one pass each; the
     node's output, as every reader sees it, replaced by its ablated value). n is *necessary* if that moves the
     metric by at least τ.
  3. Edge level: each edge from ``embed`` or a necessary node into a necessary node or into ``logits`` that EAP-IG
     did not already select is patched alone in the full model: m(M with that edge patched) - m(M). Edges into
     ``logits`` need no forward pass and are all checked; the others in order of priority w(src) x w(dst),
     w = |node effect| (``embed``: the full effect), at most ``noising_edges`` of them (default
     :data:`NOISING_EDGES_PER_NODE` x the number of nodes).
  4. An edge's score is its EAP-IG score, replaced by its measured noising effect where that was measured and is
     larger in magnitude (both are in metric units and both estimate "patch this one edge"; EAP-IG linearly). So an
     edge whose noising moves the metric by τ or more is selected by the default threshold, and EAP-IG's view is
     kept for the rest.
  5. Selection (:func:`find_circuit`) then prunes dangling edges (:func:`prune_dangling`): edges into a node from
     which no kept edge leads on to ``logits`` and, under resample ablation, edges out of a node that no kept edge
     reaches from ``embed`` (such a node computes exactly its corrupt value). Neither changes the circuit's metric.

  Cost: EAP-IG, plus one patched pass per head and MLP, plus at most ``noising_edges`` single-edge passes (each
  starts at the destination's layer from the cached clean residual; batched on CUDA). Measured on CPU, one thread,
  scoring only: 1.5-1.9x EAP-IG on 110-edge models, 2.9x on a random 1,519-edge model where 33 of 36 nodes count
  as necessary (``benchmarks/results/circuits_default_search.json``). What it can still miss:
  redundant components (an OR gate, a backup head: noising one of two redundant heads moves nothing, so only
  EAP-IG's view can catch them, and it does unless its gradients vanish too); an edge into a node that is not
  necessary as a whole, or out of a node whose outgoing effects cancel (neither is checked); candidate edges beyond the
  budget on models where many nodes are necessary (``details["n_unchecked"]`` says how many; raise
  ``noising_edges`` to check them); interactions that need three or more components corrupted together.

Every circuit is reported with both views: **faithfulness** (sufficiency: m(C) with everything outside C patched)
and **necessity** ``(m(M) - m(M with C's edges patched)) / (m(M) - m(∅))`` (:func:`necessity`: how much of the
effect is lost when only the circuit is corrupted in the otherwise clean model).

Thresholds are **relative**: ``threshold`` is a fraction of ``|m(M) - m(∅)|`` (for ACDC, τ = threshold x that
effect), so one default works across metrics, tasks and models.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from autoexplain.tools.errors import InputError
from autoexplain.tools.patching import (
    Ablation,
    PatchMetric,
    PatchSetup,
    PatchType,
    TaskArgs,
    check_effect,
    default_metric_for,
    load_task_for,
    summary_fit,
)
from autoexplain.tools.registry import Cost, ToolContext, ToolOutput, ToolSpec
from autoexplain.tools.vocab import CausalLevel, Edge, Method

if TYPE_CHECKING:
    from autoexplain.tools.data import TokenizedTask

#: Default selection threshold: keep edges whose |score| is at least 2 % of |m(M) - m(∅)| (ACDC: τ likewise).
DEFAULT_THRESHOLD = 0.02
#: Default integration steps for EAP-IG.
DEFAULT_STEPS = 10
#: The default search: EAP-IG plus noising checks (finds components that matter only jointly).
DEFAULT_METHOD = Method.EAP_IG_NOISING
#: eap-ig+noising checks at most this many single edges per node of the graph (edges into ``logits`` are free).
NOISING_EDGES_PER_NODE = 2
#: Masks per batched :meth:`PatchSetup.evaluate_many` call on CUDA (bounds the memory of the stacked masks).
MASKS_PER_CALL = 64
#: Percentages of edges at which the faithfulness curve is measured (MIB's grid).
CURVE_PERCENTS: tuple[float, ...] = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100)
CHECKPOINT_FORMAT = 1
#: Below these |m(M) - m(∅)| the ablation hardly moves the metric: edge scores and faithfulness ratios are then
#: dominated by noise (a model that does not do the task, or corrupt prompts that do not change it).
WEAK_EFFECT: dict[PatchMetric, float] = {PatchMetric.LOGIT_DIFF: 0.1, PatchMetric.ANSWER_PROB: 0.01,
                                         PatchMetric.KL: 0.01}


@dataclass(frozen=True, kw_only=True)
class SearchConfig:
    """Settings of a circuit search. ``threshold`` is relative to ``|m(M) - m(∅)|`` (ACDC's τ);
    ``checkpoint``: ACDC's progress file; ``max_receivers``: stop ACDC after that many receivers (a partial,
    resumable result, ``complete=False``); ``speculate``: ACDC removals tried per batched forward pass (the
    decisions are those of one-at-a-time ACDC). Default: 8 on CUDA, 1 (off) on CPU, where a batch K times as
    large costs more than K passes (measured: 1.5-4x per mask). ``noising_edges``: eap-ig+noising's budget of
    single-edge noising checks (None: :data:`NOISING_EDGES_PER_NODE` x the number of heads and MLPs)."""

    steps: int = DEFAULT_STEPS
    threshold: float = DEFAULT_THRESHOLD
    checkpoint: Path | None = None
    max_receivers: int | None = None
    speculate: int | None = None
    noising_edges: int | None = None  # eap-ig+noising: single-edge checks (None: NOISING_EDGES_PER_NODE x nodes)


class EdgeScores(BaseModel):
    """A score for every edge of the graph (graph order), in units of the metric, and how it was obtained."""

    model_config = ConfigDict(frozen=True)

    method: Method
    ablation: Ablation
    metric: PatchMetric
    patch_type: PatchType = PatchType.EDGE
    edges: list[Edge]
    scores: list[float]
    m_clean: float = Field(description="m(M): the metric of the unpatched model")
    m_ablated: float = Field(description="m(∅): the metric with every edge patched")
    complete: bool = Field(default=True, description="False for an ACDC run stopped early (resumable)")
    seconds: float = 0.0
    details: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _same_length(self) -> EdgeScores:
        if len(self.edges) != len(self.scores):
            raise ValueError("edges and scores differ in length")
        return self

    @property
    def effect(self) -> float:
        return self.m_clean - self.m_ablated

    def as_dict(self) -> dict[Edge, float]:
        return dict(zip(self.edges, self.scores, strict=True))

    def order(self) -> list[int]:
        """Edge indices by |score|, largest first (ties: graph order)."""
        return sorted(range(len(self.scores)), key=lambda i: (-abs(self.scores[i]), i))

    def select(self, *, top_k: int | None = None, threshold: float | None = None) -> list[int]:
        """The circuit: the ``top_k`` edges by |score|, or those with |score| >= ``threshold`` x |m(M) - m(∅)|
        (default :data:`DEFAULT_THRESHOLD`). Indices in graph order."""
        if top_k is not None and threshold is not None:
            raise InputError("give top_k or threshold, not both: top_k keeps a number of edges, threshold keeps "
                             "edges above a score")
        if top_k is not None:
            return sorted(self.order()[:top_k])
        cut = (DEFAULT_THRESHOLD if threshold is None else threshold) * abs(self.effect)
        return [i for i, s in enumerate(self.scores) if abs(s) >= cut and s != 0.0]


ScoreFn = Callable[[PatchSetup, SearchConfig], EdgeScores]
#: The catalogue: every circuit search method, one signature.
METHODS: dict[Method, ScoreFn] = {}


def register(method: Method) -> Callable[[ScoreFn], ScoreFn]:
    def deco(fn: ScoreFn) -> ScoreFn:
        if method in METHODS:
            raise ValueError(f"circuit method {method.value!r} is already registered")
        METHODS[method] = fn
        return fn

    return deco


def score_edges(setup: PatchSetup, method: Method | str, config: SearchConfig | None = None) -> EdgeScores:
    """Score every edge of ``setup``'s graph with ``method``."""
    check_effect(setup)
    return METHODS[Method(method)](setup, config or SearchConfig())


def effect_note(setup: PatchSetup) -> str:
    """A warning when the ablation barely moves the metric (see :data:`WEAK_EFFECT`), else ''."""
    if abs(setup.effect) >= WEAK_EFFECT[setup.metric]:
        return ""
    return (f"warning: ablating every edge moves {setup.metric.value} by only {abs(setup.effect):.3g} "
            f"(m(M) {setup.m_clean:.4g}, m(∅) {setup.m_ablated:.4g}); the model barely uses the clean/corrupt "
            "difference here, so scores and faithfulness are mostly noise")


def _result(setup: PatchSetup, method: Method, scores: Sequence[float], t0: float, **extra: Any) -> EdgeScores:
    return EdgeScores(method=method, ablation=setup.ablation, metric=setup.metric, edges=list(setup.graph.edges),
                      scores=[float(s) for s in scores], m_clean=setup.m_clean, m_ablated=setup.m_ablated,
                      seconds=time.perf_counter() - t0, **extra)


# ============================================================================= EAP and EAP-IG
@register(Method.EAP)
def eap(setup: PatchSetup, config: SearchConfig) -> EdgeScores:
    """Edge attribution patching: the gradient at the clean run (one forward, one backward pass)."""
    t0 = time.perf_counter()
    return _result(setup, Method.EAP, setup.edge_attribution([1.0]).tolist(), t0)


@register(Method.EAP_IG)
def eap_ig(setup: PatchSetup, config: SearchConfig) -> EdgeScores:
    """EAP with the gradient integrated over inputs interpolated from the ablated to the clean embeddings."""
    if config.steps < 1:
        raise InputError(f"steps must be at least 1, got {config.steps}")
    t0 = time.perf_counter()
    alphas = [k / config.steps for k in range(1, config.steps + 1)]
    return _result(setup, Method.EAP_IG, setup.edge_attribution(alphas).tolist(), t0,
                   details={"steps": config.steps})


# ============================================================================= ACDC
@dataclass(frozen=True)
class _Receiver:
    node: str
    layer: int  # where a pass for it may start
    edges: tuple[int, ...]  # incoming edges in visiting order


def _head_receivers(setup: PatchSetup, layer: int, incoming: dict[int, list[int]]) -> list[_Receiver]:
    g = setup.graph
    if layer < 0:
        return []
    groups = {dg.kind: dg for dg in g.dst_groups if dg.layer == layer and dg.kind in ("q", "k", "v")}
    out = []
    for h in reversed(range(g.n_heads)):
        edges: list[int] = []
        for kind in ("q", "k", "v"):
            edges += sorted(incoming[groups[kind].start + h], reverse=True)
        out.append(_Receiver(f"a{layer}.{h}", layer, tuple(edges)))
    return out


def _receiver_order(setup: PatchSetup) -> list[_Receiver]:
    """logits, then for each layer L from the last: mL (if any), then aL.{H-1} … aL.0."""
    g = setup.graph
    incoming: dict[int, list[int]] = {}
    for e in range(g.n_edges):
        incoming.setdefault(g.edge_dst[e], []).append(e)
    by_name = {g.dests[dg.start]: dg for dg in g.dst_groups if dg.kind in ("mlp", "logits")}
    out = [_Receiver("logits", g.n_layers, tuple(sorted(incoming[by_name["logits"].start], reverse=True)))]
    for L in reversed(range(g.n_layers)):
        if f"m{L}" in by_name:
            out.append(_Receiver(f"m{L}", L, tuple(sorted(incoming[by_name[f"m{L}"].start], reverse=True))))
        out.extend(_head_receivers(setup, L, incoming))
    return out


@register(Method.ACDC)
def acdc(setup: PatchSetup, config: SearchConfig) -> EdgeScores:
    """ACDC at τ = ``config.threshold`` x |m(M) - m(∅)| (see the module doc), resumable from ``checkpoint``."""
    t0 = time.perf_counter()
    g = setup.graph
    tau = config.threshold * abs(setup.effect)
    key = {"format": CHECKPOINT_FORMAT, "setup": setup.fingerprint(), "tau": tau, "n_edges": g.n_edges}
    receivers = _receiver_order(setup)
    state = _load_checkpoint(config.checkpoint, key)
    removed = torch.zeros(g.n_edges, dtype=torch.bool)
    scores = [0.0] * g.n_edges
    next_receiver, m_cur, n_passes = 0, setup.m_clean, 0
    if state is not None:
        for name in state["removed"]:
            removed[g.index[name]] = True
        for name, value in state["scores"].items():
            scores[g.index[name]] = float(value)
        next_receiver, m_cur, n_passes = int(state["next_receiver"]), float(state["m_cur"]), int(state["passes"])
    resumed_at = next_receiver
    out_edges: dict[str, list[int]] = {}
    for e in range(g.n_edges):
        out_edges.setdefault(g.sources[g.edge_src[e]], []).append(e)
    src_t, dst_t = torch.tensor(g.edge_src), torch.tensor(g.edge_dst)
    mask = torch.zeros(len(g.sources), len(g.dests))
    mask[src_t[removed], dst_t[removed]] = 1.0
    signed = setup.metric is PatchMetric.KL
    speculate = config.speculate or (8 if setup.device.type == "cuda" else 1)
    done_now = 0
    while next_receiver < len(receivers):
        if config.max_receivers is not None and done_now >= config.max_receivers:
            break
        r = receivers[next_receiver]
        alive = r.node == "logits" or any(not removed[e] for e in out_edges.get(r.node, ()))
        cands = [e for e in r.edges if not removed[e]]
        if not alive:  # nothing downstream reads this node any more: its inputs cannot matter
            for e in cands:
                removed[e] = True
                mask[g.edge_src[e], g.edge_dst[e]] = 1.0
                scores[e] = 0.0
            cands = []
        i = 0
        while i < len(cands):
            # speculation: evaluate the next k removals cumulatively (each on top of the ones before it), as
            # if each is accepted; the first rejected one invalidates the rest, which are then re-evaluated
            window = cands[i:i + max(1, speculate)]
            masks = mask.repeat(len(window), 1, 1)
            for j, e in enumerate(window):
                masks[j:, g.edge_src[e], g.edge_dst[e]] = 1.0
            values = setup.evaluate_many(masks, start_layer=r.layer)
            n_passes += len(window)
            i += len(window)
            for j, (e, m_new) in enumerate(zip(window, values, strict=True)):
                change = m_new - m_cur if signed else abs(m_new - m_cur)
                scores[e] = max(change, 0.0)
                if change < tau:
                    removed[e] = True
                    mask[g.edge_src[e], g.edge_dst[e]] = 1.0
                    m_cur = m_new
                else:
                    i -= len(window) - j - 1
                    break
        next_receiver += 1
        done_now += 1
        if config.checkpoint is not None:
            _save_checkpoint(config.checkpoint, {
                **key, "next_receiver": next_receiver, "receiver_done": r.node, "m_cur": m_cur, "passes": n_passes,
                "removed": [g.names[e] for e in range(g.n_edges) if removed[e]],
                "scores": {g.names[e]: scores[e] for e in range(g.n_edges) if scores[e] != 0.0}})
    complete = next_receiver >= len(receivers)
    return _result(setup, Method.ACDC, scores, t0, complete=complete,
                   details={"tau": tau, "threshold": config.threshold, "passes": n_passes,
                            "receivers_done": next_receiver, "receivers": len(receivers),
                            "resumed_at_receiver": resumed_at, "kept": int((~removed).sum())})


def _load_checkpoint(path: Path | None, key: dict[str, Any]) -> dict[str, Any] | None:
    if path is None or not Path(path).exists():
        return None
    try:
        state = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise InputError(f"ACDC checkpoint {str(path)!r} is unreadable ({exc.__class__.__name__}): delete it to "
                         "start over") from None
    if not isinstance(state, dict) or any(state.get(k) != v for k, v in key.items()):
        raise InputError(f"ACDC checkpoint {str(path)!r} belongs to another search (different model, task, "
                         "ablation, metric or threshold): delete it or pass another checkpoint path")
    return state


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)


# ============================================================================= noising (necessity) checks
def start_layer_of(setup: PatchSetup, mask: torch.Tensor) -> int:
    """The first layer whose inputs ``mask`` patches (``n_layers`` when it patches only the logits input): a pass
    for the mask may start there from the cached clean residual."""
    g = setup.graph
    cols = mask.bool().any(0)
    layers = [dg.layer for dg in g.dst_groups if bool(cols[dg.start:dg.stop].any())]
    return min(layers) if layers else g.n_layers


def evaluate_masks(setup: PatchSetup, masks: Sequence[torch.Tensor]) -> list[float]:
    """The metric for each mask (``[n_sources, n_dests]``, 1 = patched), each pass starting at the first layer its
    mask patches. On CUDA masks with the same start layer share batched passes (up to :data:`MASKS_PER_CALL`); on
    CPU they go one at a time (a pass K times as large costs more than K passes there)."""
    starts = [start_layer_of(setup, m) for m in masks]
    order = sorted(range(len(masks)), key=lambda i: (starts[i], i))
    per_call = MASKS_PER_CALL if setup.device.type == "cuda" else 1
    out = [0.0] * len(masks)
    i = 0
    while i < len(order):
        block = [order[i]]
        while (len(block) < per_call and i + len(block) < len(order)
               and starts[order[i + len(block)]] == starts[order[i]]):
            block.append(order[i + len(block)])
        values = setup.evaluate_many(torch.stack([masks[j] for j in block]), start_layer=starts[block[0]])
        for j, v in zip(block, values, strict=True):
            out[j] = v
        i += len(block)
    return out


class NoisingScan(BaseModel):
    """Necessity in the full model, one component at a time: what patching (noising) a node's outputs, or one
    edge, does to the metric while everything else runs clean. Effects are ``m(patched) - m(M)`` in metric units
    (the sign convention of EAP scores); a component is necessary when ``|effect| >= tau x |m(M) - m(∅)|``."""

    ablation: Ablation
    metric: PatchMetric
    patch_type: PatchType = PatchType.EDGE
    tau: float = Field(description="relative: a fraction of |m(M) - m(∅)|")
    cut: float = Field(description="absolute: tau x |m(M) - m(∅)|")
    m_clean: float
    m_ablated: float
    node_effects: dict[str, float] = Field(description="every head and MLP: m(all its outgoing edges patched) - m(M)")
    necessary_nodes: list[str]
    edge_effects: dict[str, float] = Field(description="the checked edges: m(that edge patched) - m(M)")
    n_candidates: int = Field(description="edges from embed or a necessary node into a necessary node or logits, "
                                          "outside the skipped set")
    n_checked: int
    n_unchecked: int = Field(description="candidates left unchecked by the budget")
    unchecked: list[str] = Field(description="the first 20 unchecked candidates, by priority")
    max_edges: int = Field(description="budget of single-edge checks (edges into logits are not counted)")
    evaluations: int
    seconds: float

    def necessary_edges(self) -> dict[str, float]:
        """Checked edges whose noising moves the metric by at least the cut, strongest first."""
        return dict(sorted(((k, v) for k, v in self.edge_effects.items() if abs(v) >= self.cut),
                           key=lambda kv: -abs(kv[1])))


def noising_scan(setup: PatchSetup, *, tau: float = DEFAULT_THRESHOLD, skip: Collection[int] = (),
                 max_edges: int | None = None) -> NoisingScan:
    """Noise every head and MLP (all its outgoing edges patched) in the otherwise clean model, then single edges
    from ``embed`` or a necessary node into a necessary node or ``logits`` (not those in ``skip``): every edge
    into ``logits`` (no forward pass needed), the others by priority ``w(src) x w(dst)`` with ``w`` = |node effect|
    (``embed``: the full effect), at most ``max_edges`` of them (default :data:`NOISING_EDGES_PER_NODE` x the
    number of nodes). Edges out of an unnecessary node are not candidates: the node's outgoing edges together move
    the metric by less than τ, so one of them can exceed τ only if others cancel it. Cost: one patched pass per
    node and per checked edge (see :func:`evaluate_masks`)."""
    check_effect(setup)
    if tau < 0:
        raise InputError(f"tau must be >= 0 (a fraction of |m(M) - m(∅)|), got {tau}")
    if max_edges is not None and max_edges < 0:
        raise InputError(f"max_edges must be >= 0, got {max_edges}")
    t0 = time.perf_counter()
    g = setup.graph
    cut = tau * abs(setup.effect)
    src_of = [g.sources[s] for s in g.edge_src]
    dst_of = [g.node_of_dest(d) for d in g.edge_dst]
    outgoing: dict[str, list[int]] = {}
    for e, name in enumerate(src_of):
        outgoing.setdefault(name, []).append(e)
    nodes = [n for n in g.sources if n != "embed"]
    values = evaluate_masks(setup, [g.mask(outgoing[n]) for n in nodes])
    node_effects = {n: v - setup.m_clean for n, v in zip(nodes, values, strict=True)}
    necessary = [n for n in nodes if abs(node_effects[n]) >= cut and node_effects[n] != 0.0]
    weight = {**{n: abs(v) for n, v in node_effects.items()}, "embed": abs(setup.effect),
              "logits": abs(setup.effect)}
    targets = set(necessary) | {"logits"}
    feeders = set(necessary) | {"embed"}
    skipped = set(skip)
    cands = [e for e in range(g.n_edges)
             if dst_of[e] in targets and src_of[e] in feeders and e not in skipped]
    free = [e for e in cands if dst_of[e] == "logits"]
    paid = sorted((e for e in cands if dst_of[e] != "logits"),
                  key=lambda e: (-weight[src_of[e]] * weight[dst_of[e]], e))
    budget = NOISING_EDGES_PER_NODE * len(nodes) if max_edges is None else max_edges
    checked = sorted(free + paid[:budget])
    effects = evaluate_masks(setup, [g.mask([e]) for e in checked])
    return NoisingScan(ablation=setup.ablation, metric=setup.metric, tau=tau, cut=cut, m_clean=setup.m_clean,
                       m_ablated=setup.m_ablated, node_effects=node_effects, necessary_nodes=necessary,
                       edge_effects={g.names[e]: v - setup.m_clean for e, v in zip(checked, effects, strict=True)},
                       n_candidates=len(cands), n_checked=len(checked), n_unchecked=len(paid[budget:]),
                       unchecked=[g.names[e] for e in paid[budget:budget + 20]], max_edges=budget,
                       evaluations=len(nodes) + len(checked), seconds=time.perf_counter() - t0)


@register(Method.EAP_IG_NOISING)
def eap_ig_noising(setup: PatchSetup, config: SearchConfig) -> EdgeScores:
    """EAP-IG, then noising checks in the full model (nodes, then single edges into necessary nodes and logits);
    an edge's score is the larger in magnitude of its EAP-IG score and its measured noising effect (see the
    module doc for what this finds, what it costs and what it can still miss)."""
    t0 = time.perf_counter()
    ig = eap_ig(setup, config)
    selected = ig.select(threshold=config.threshold)
    scan = noising_scan(setup, tau=config.threshold, skip=selected, max_edges=config.noising_edges)
    g = setup.graph
    scores = list(ig.scores)
    raised: dict[str, float] = {}
    for name, effect in scan.edge_effects.items():
        e = g.index[name]
        if abs(effect) > abs(scores[e]):
            scores[e] = effect
            if abs(effect) >= scan.cut:  # not selected by EAP-IG (skipped otherwise), selected now
                raised[name] = effect
    return _result(setup, Method.EAP_IG_NOISING, scores, t0, details={
        "steps": config.steps, "threshold": config.threshold, "tau": scan.cut,
        "eap_ig_selected": len(selected), "raised_by_noising": raised,
        "necessary_nodes": scan.necessary_nodes, "node_effects": scan.node_effects,
        "noising_candidates": scan.n_candidates, "noising_checked": scan.n_checked,
        "n_unchecked": scan.n_unchecked, "unchecked": scan.unchecked, "noising_budget": scan.max_edges,
        "noising_passes": scan.evaluations, "seconds_eap_ig": ig.seconds, "seconds_noising": scan.seconds})


def prune_dangling(setup: PatchSetup, keep: Iterable[int]) -> list[int]:
    """The edges of ``keep`` that lie on a path ``embed -> ... -> logits`` of kept edges (graph order).

    Removed: edges into a node from which no kept edge leads on to ``logits`` (that node's value reaches the output
    only through patched edges, so these edges cannot change the metric, under any ablation) and, under resample
    ablation only, edges out of a node that no kept edge reaches from ``embed`` (all its inputs are patched, so it
    computes exactly its corrupt value, which is what a patched edge carries anyway). Under mean or zero ablation
    such a node computes f(ablated inputs), not the ablated value of its output, so those edges are kept."""
    g = setup.graph
    kept = sorted(set(keep))
    src = {e: g.sources[g.edge_src[e]] for e in kept}
    dst = {e: g.node_of_dest(g.edge_dst[e]) for e in kept}
    alive, fed = {"logits"}, {"embed"}
    changed = True
    while changed:
        changed = False
        for e in kept:
            if dst[e] in alive and src[e] not in alive:
                alive.add(src[e])
                changed = True
            if src[e] in fed and dst[e] not in fed:
                fed.add(dst[e])
                changed = True
    forward = setup.ablation is Ablation.RESAMPLE
    return [e for e in kept if dst[e] in alive and (src[e] in fed or not forward)]


# ============================================================================= faithfulness
def faithfulness(setup: PatchSetup, keep: Iterable[int]) -> float:
    """(m(C) - m(∅)) / (m(M) - m(∅)) for the circuit ``keep`` (edge indices): every other edge patched."""
    check_effect(setup)
    kept = set(keep)
    patched = [e for e in range(setup.graph.n_edges) if e not in kept]
    return (setup.evaluate(setup.graph.mask(patched)) - setup.m_ablated) / setup.effect


def necessity(setup: PatchSetup, keep: Iterable[int]) -> float:
    """(m(M) - m(M with C's edges patched)) / (m(M) - m(∅)) for the circuit ``keep`` (edge indices): the share of
    the effect lost when only the circuit is corrupted in the otherwise clean model. 1: noising the circuit
    removes the whole behaviour; 0: the model does as well without it (a backup elsewhere, or a circuit that does
    nothing). Faithfulness is the sufficiency view of the same circuit."""
    check_effect(setup)
    mask = setup.graph.mask(sorted(set(keep)))
    return (setup.m_clean - setup.evaluate(mask, start_layer=start_layer_of(setup, mask))) / setup.effect


class CurvePoint(BaseModel):
    percent: float
    n_edges: int
    faithfulness: float


def faithfulness_curve(setup: PatchSetup, scores: EdgeScores,
                       percents: Sequence[float] = CURVE_PERCENTS) -> list[CurvePoint]:
    """Faithfulness of the top-k edges by |score| for k = ceil(percent % of the edges) (at least 1)."""
    order = scores.order()
    n = len(order)
    points = []
    for pct in percents:
        k = min(n, max(1, math.ceil(pct / 100 * n)))
        points.append(CurvePoint(percent=pct, n_edges=k, faithfulness=faithfulness(setup, order[:k])))
    return points


# ============================================================================= a whole search
class Circuit(BaseModel):
    """A found circuit: every edge's score, which edges are in, and how faithful the circuit is."""

    scores: EdgeScores
    in_circuit: list[bool]
    top_k: int | None
    threshold: float | None = Field(description="relative threshold used for selection (None with top_k)")
    faithfulness: float = Field(description="sufficiency: (m(C) - m(∅)) / (m(M) - m(∅)), everything outside C "
                                            "patched")
    curve: list[CurvePoint]
    note: str = Field(default="", description="a warning when the ablation barely moves the metric")
    necessity: float | None = Field(default=None, description="(m(M) - m(M with C patched)) / (m(M) - m(∅)); None "
                                                              "in outputs stored before it was measured")
    pruned: list[str] = Field(default_factory=list, description="edges above the selection cut removed as "
                                                                "dangling (prune_dangling)")

    @property
    def edges(self) -> list[Edge]:
        return [e for e, keep in zip(self.scores.edges, self.in_circuit, strict=True) if keep]

    @property
    def n_edges(self) -> int:
        return sum(self.in_circuit)

    def kept_by_rank(self) -> list[int]:
        """Indices of the circuit's edges, strongest first."""
        ranks = self.ranks()
        return sorted((i for i, k in enumerate(self.in_circuit) if k), key=lambda i: ranks[i])

    def ranks(self) -> list[int]:
        """1-based rank of every edge by |score|."""
        out = [0] * len(self.scores.edges)
        for r, i in enumerate(self.scores.order(), start=1):
            out[i] = r
        return out


def default_metric(method: Method | str, task: TokenizedTask) -> PatchMetric:
    """``kl`` for ACDC (its usual metric); for the attribution methods and eap-ig+noising ``logit_diff``, or
    ``answer_prob`` when some prompt has no wrong answers (gradient attribution is blind under ``kl``, whose
    gradient vanishes at the clean run)."""
    return PatchMetric.KL if Method(method) is Method.ACDC else default_metric_for(task)


#: Methods whose selection prunes dangling edges by default (:func:`prune_dangling`).
PRUNED_BY_DEFAULT = frozenset({Method.EAP_IG_NOISING})


def find_circuit(setup: PatchSetup, method: Method | str, *, top_k: int | None = None,
                 threshold: float | None = None, steps: int = DEFAULT_STEPS, checkpoint: Path | None = None,
                 curve: bool = True, prune: bool | None = None, noising_edges: int | None = None) -> Circuit:
    """Score edges with ``method``, select by ``top_k`` or ``threshold`` (default :data:`DEFAULT_THRESHOLD`), and
    measure the circuit's faithfulness (sufficiency), its necessity and the faithfulness curve.

    ACDC runs at τ = ``threshold`` (or the default); its threshold circuit is exactly the edges it kept. With
    ``top_k`` it runs at the default τ and the k edges with the largest ACDC scores are kept. eap-ig+noising
    checks at the same τ. ``prune`` (default: on for the methods in :data:`PRUNED_BY_DEFAULT`) removes dangling
    edges after selection (:func:`prune_dangling`), so a ``top_k`` circuit may then hold fewer than k edges.
    ``noising_edges``: eap-ig+noising's budget of single-edge checks."""
    if top_k is not None and threshold is not None:
        raise InputError("give top_k or threshold, not both: top_k keeps a number of edges, threshold keeps "
                         "edges above a score")
    if top_k is not None and not 1 <= top_k <= setup.graph.n_edges:
        raise InputError(f"top_k must be between 1 and the number of edges ({setup.graph.n_edges}), got {top_k}")
    if threshold is not None and not 0 <= threshold:
        raise InputError(f"threshold must be >= 0 (a fraction of |m(M) - m(∅)|), got {threshold}")
    rel = DEFAULT_THRESHOLD if threshold is None else threshold
    scores = score_edges(setup, method, SearchConfig(steps=steps, threshold=rel, checkpoint=checkpoint,
                                                     noising_edges=noising_edges))
    keep = scores.select(top_k=top_k, threshold=None if top_k is not None else rel)
    pruned: list[str] = []
    if (Method(method) in PRUNED_BY_DEFAULT) if prune is None else prune:
        connected = prune_dangling(setup, keep)
        pruned = [setup.graph.names[e] for e in sorted(set(keep) - set(connected))]
        keep = connected
    kept = set(keep)
    return Circuit(scores=scores, in_circuit=[i in kept for i in range(len(scores.edges))], top_k=top_k,
                   threshold=None if top_k is not None else rel, faithfulness=faithfulness(setup, keep),
                   necessity=necessity(setup, keep), pruned=pruned,
                   curve=faithfulness_curve(setup, scores) if curve else [], note=effect_note(setup))


# ============================================================================= tool: circuit_search
class CircuitSearchIn(TaskArgs):
    method: Method = Field(default=DEFAULT_METHOD, description="eap-ig+noising (default: EAP-IG plus necessity "
                                                               "checks, finds AND gates), eap-ig, eap or acdc")
    ablation: Ablation = Field(default=Ablation.RESAMPLE, description="resample (default), mean or zero")
    metric: PatchMetric | None = Field(default=None, description="logit_diff, answer_prob or kl; default: kl for acdc, "
                                                             "logit_diff otherwise")
    top_k: int | None = Field(default=None, ge=1, description="keep this many edges (exclusive with threshold)")
    threshold: float | None = Field(default=None, ge=0, description="keep edges with |score| >= threshold x "
                                                                      "|m(M) - m(∅)| (default 0.02; acdc's tau)")
    steps: int = Field(default=DEFAULT_STEPS, ge=1, le=100, description="EAP-IG integration steps")
    noising_edges: int | None = Field(default=None, ge=0, description="eap-ig+noising: at most this many single-edge "
                                                                      "noising checks (default 2 x heads+MLPs)")
    curve: bool = Field(default=True, description="also measure faithfulness at 0.1 … 100 % of edges")
    top_n: int = Field(default=15, ge=1, le=100, description="circuit edges to list in the summary")

    @model_validator(mode="after")
    def _one_selector(self) -> CircuitSearchIn:
        if self.top_k is not None and self.threshold is not None:
            raise ValueError("give top_k or threshold, not both")
        return self


class ScoredEdge(BaseModel):
    edge: Edge
    score: float
    rank: int


class CircuitSearchOut(ToolOutput):
    method: Method
    ablation: Ablation
    metric: PatchMetric
    patch_type: PatchType = PatchType.EDGE
    n_edges_total: int
    n_edges: int
    edges: list[ScoredEdge] = Field(description="the circuit's edges, by |score|")
    faithfulness: float = Field(description="sufficiency: everything outside the circuit patched")
    necessity: float | None = Field(default=None, description="only the circuit patched, in the full model; None in "
                                                              "outputs cached before it was measured")
    pruned: list[str] = Field(default_factory=list, description="dangling edges removed after selection")
    curve: list[CurvePoint]
    m_clean: float
    m_ablated: float
    threshold: float | None
    top_k: int | None
    seconds: float
    note: str = ""
    top_n: int = 15
    all_scores: EdgeScores | None = Field(default=None, description="every edge's score (for storing and scoring "
                                                                    "the circuit; never in the summary)")

    def circuit(self) -> Circuit:
        """The :class:`Circuit` this search found (needs ``all_scores``)."""
        if self.all_scores is None:
            raise ValueError("this output was made without all_scores")
        kept = {e.edge for e in self.edges}
        return Circuit(scores=self.all_scores, in_circuit=[e in kept for e in self.all_scores.edges],
                       top_k=self.top_k, threshold=self.threshold, faithfulness=self.faithfulness, curve=self.curve,
                       note=self.note, necessity=self.necessity, pruned=self.pruned)

    def summary_text(self) -> str:
        sel = f"top {self.top_k}" if self.top_k is not None else f"|score| >= {self.threshold:g} x |m(M)-m(∅)|"
        nec = "not measured" if self.necessity is None else f"{self.necessity:.3f}"
        head = (f"{self.method.value} circuit ({self.ablation.value} ablation, edge patching, metric "
                f"{self.metric.value}): {self.n_edges}/{self.n_edges_total} edges ({sel}), faithfulness "
                f"{self.faithfulness:.3f} (sufficiency: everything else ablated), necessity {nec} (only the circuit "
                f"ablated); m(M) {self.m_clean:.4g}, m(∅) {self.m_ablated:.4g}. "
                "Intervention-level: holds for this task, ablation and metric."
                + (f" {self.note[0].upper()}{self.note[1:]}." if self.note else ""))
        lines = [f"{e.edge} {e.score:+.4g}" for e in self.edges[:self.top_n]]
        d = self.all_scores.details if self.all_scores is not None else {}
        if "necessary_nodes" in d:
            raised = ", ".join(list(d["raised_by_noising"])[:8]) or "none"
            lines.insert(0, f"noising: {len(d['necessary_nodes'])} necessary nodes; edges added by noising "
                            f"(EAP-IG missed them): {raised}; checked {d['noising_checked']} of "
                            f"{d['noising_candidates']} candidate edges"
                            + (f" ({d['n_unchecked']} left by the budget)" if d["n_unchecked"] else ""))
        if self.pruned:
            lines.insert(0, f"pruned {len(self.pruned)} dangling edges")
        if self.curve:
            lines.append("faithfulness by % of edges: " + ", ".join(f"{p.percent:g}%:{p.faithfulness:.2f}"
                                                                    for p in self.curve))
        more = len(self.edges) - self.top_n
        return summary_fit(head, lines, f"(+{more} more circuit edges)" if more > 0 else "")


def circuit_search(ctx: ToolContext, args: CircuitSearchIn) -> CircuitSearchOut:
    """Find the edges that carry a task's behaviour (EAP-IG + noising by default, EAP-IG, EAP or ACDC) and measure
    how sufficient (faithfulness) and how necessary they are."""
    task = load_task_for(ctx.model, args)
    metric = args.metric or default_metric(args.method, task)
    setup = PatchSetup(ctx.model, task, ablation=args.ablation, metric=metric, position=args.position)
    checkpoint = None
    if args.method is Method.ACDC:  # an interrupted ACDC search resumes from its last receiver
        from autoexplain.tools.cache import cache_root

        tau = args.threshold if args.threshold is not None else "default"
        checkpoint = cache_root() / "circuits" / f"acdc-{setup.fingerprint()}-{tau}.json"
    circ = find_circuit(setup, args.method, top_k=args.top_k, threshold=args.threshold, steps=args.steps,
                        curve=args.curve, checkpoint=checkpoint, noising_edges=args.noising_edges)
    ranks = circ.ranks()
    kept = circ.kept_by_rank()
    s = circ.scores
    return CircuitSearchOut(method=s.method, ablation=s.ablation, metric=s.metric, n_edges_total=len(s.edges),
                            n_edges=circ.n_edges,
                            edges=[ScoredEdge(edge=s.edges[i], score=s.scores[i], rank=ranks[i]) for i in kept],
                            faithfulness=circ.faithfulness, necessity=circ.necessity, pruned=circ.pruned,
                            curve=circ.curve, m_clean=s.m_clean,
                            m_ablated=s.m_ablated, threshold=circ.threshold, top_k=circ.top_k, seconds=s.seconds,
                            note=circ.note, top_n=args.top_n, all_scores=s)


TOOLS = (
    ToolSpec(name="circuit_search", level=CausalLevel.INTERVENTION,
             input_model=CircuitSearchIn, output_model=CircuitSearchOut, fn=circuit_search,
             cost=Cost.FORWARD,
             description="Circuit discovery on a task (clean/corrupt prompt pairs): score every edge of the "
                         "model's graph (embed, heads aL.H, MLPs mL, logits; edges like a0.3->a1.2.k) with "
                         "EAP-IG + noising checks (default: also finds components that matter only jointly, AND "
                         "gates), EAP-IG, EAP or ACDC, keep the top_k edges or those above a threshold, and report "
                         "the circuit's faithfulness (m(C)-m(∅))/(m(M)-m(∅)) with everything outside it ablated "
                         "(sufficiency) and its necessity (share of the effect lost when only the circuit is "
                         "ablated), plus faithfulness at 0.1-100 % of edges. Intervention-level evidence for this "
                         "task, ablation (resample by default; zero ablation over-blames constant components) and "
                         "metric."),
)
