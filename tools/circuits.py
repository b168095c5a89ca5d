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

Thresholds are **relative**: ``threshold`` is a fraction of ``|m(M) - m(∅)|`` (for ACDC, τ = threshold x that
effect), so one default works across metrics, tasks and models.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
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
    large costs more than K passes (measured: 1.5-4x per mask)."""

    steps: int = DEFAULT_STEPS
    threshold: float = DEFAULT_THRESHOLD
    checkpoint: Path | None = None
    max_receivers: int | None = None
    speculate: int | None = None


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


# ============================================================================= faithfulness
def faithfulness(setup: PatchSetup, keep: Iterable[int]) -> float:
    """(m(C) - m(∅)) / (m(M) - m(∅)) for the circuit ``keep`` (edge indices): every other edge patched."""
    check_effect(setup)
    kept = set(keep)
    patched = [e for e in range(setup.graph.n_edges) if e not in kept]
    return (setup.evaluate(setup.graph.mask(patched)) - setup.m_ablated) / setup.effect


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
    faithfulness: float
    curve: list[CurvePoint]
    note: str = Field(default="", description="a warning when the ablation barely moves the metric")

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
    """``kl`` for ACDC (its usual metric); ``logit_diff`` for attribution, or ``answer_prob`` when some prompt
    has no wrong answers."""
    return PatchMetric.KL if Method(method) is Method.ACDC else default_metric_for(task)


def find_circuit(setup: PatchSetup, method: Method | str, *, top_k: int | None = None,
                 threshold: float | None = None, steps: int = DEFAULT_STEPS, checkpoint: Path | None = None,
                 curve: bool = True) -> Circuit:
    """Score edges with ``method``, select by ``top_k`` or ``threshold`` (default :data:`DEFAULT_THRESHOLD`), and
    measure the circuit's faithfulness and the faithfulness curve.

    ACDC runs at τ = ``threshold`` (or the default); its threshold circuit is exactly the edges it kept. With
    ``top_k`` it runs at the default τ and the k edges with the largest ACDC scores are kept."""
    if top_k is not None and threshold is not None:
        raise InputError("give top_k or threshold, not both: top_k keeps a number of edges, threshold keeps "
                         "edges above a score")
    if top_k is not None and not 1 <= top_k <= setup.graph.n_edges:
        raise InputError(f"top_k must be between 1 and the number of edges ({setup.graph.n_edges}), got {top_k}")
    if threshold is not None and not 0 <= threshold:
        raise InputError(f"threshold must be >= 0 (a fraction of |m(M) - m(∅)|), got {threshold}")
    rel = DEFAULT_THRESHOLD if threshold is None else threshold
    scores = score_edges(setup, method, SearchConfig(steps=steps, threshold=rel, checkpoint=checkpoint))
    keep = scores.select(top_k=top_k, threshold=None if top_k is not None else rel)
    kept = set(keep)
    return Circuit(scores=scores, in_circuit=[i in kept for i in range(len(scores.edges))], top_k=top_k,
                   threshold=None if top_k is not None else rel, faithfulness=faithfulness(setup, keep),
                   curve=faithfulness_curve(setup, scores) if curve else [], note=effect_note(setup))


# ============================================================================= tool: circuit_search
class CircuitSearchIn(TaskArgs):
    method: Method = Field(default=Method.EAP_IG, description="eap-ig (default), eap or acdc")
    ablation: Ablation = Field(default=Ablation.RESAMPLE, description="resample (default), mean or zero")
    metric: PatchMetric | None = Field(default=None, description="logit_diff, answer_prob or kl; default: kl for acdc, "
                                                             "logit_diff otherwise")
    top_k: int | None = Field(default=None, ge=1, description="keep this many edges (exclusive with threshold)")
    threshold: float | None = Field(default=None, ge=0, description="keep edges with |score| >= threshold x "
                                                                      "|m(M) - m(∅)| (default 0.02; acdc's tau)")
    steps: int = Field(default=DEFAULT_STEPS, ge=1, le=100, description="EAP-IG integration steps")
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
    faithfulness: float
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
                       note=self.note)

    def summary_text(self) -> str:
        sel = f"top {self.top_k}" if self.top_k is not None else f"|score| >= {self.threshold:g} x |m(M)-m(∅)|"
        head = (f"{self.method.value} circuit ({self.ablation.value} ablation, edge patching, metric "
                f"{self.metric.value}): {self.n_edges}/{self.n_edges_total} edges ({sel}), faithfulness "
                f"{self.faithfulness:.3f} (m(M) {self.m_clean:.4g}, m(∅) {self.m_ablated:.4g}). "
                "Intervention-level: holds for this task, ablation and metric."
                + (f" {self.note[0].upper()}{self.note[1:]}." if self.note else ""))
        lines = [f"{e.edge} {e.score:+.4g}" for e in self.edges[:self.top_n]]
        if self.curve:
            lines.append("faithfulness by % of edges: " + ", ".join(f"{p.percent:g}%:{p.faithfulness:.2f}"
                                                                    for p in self.curve))
        more = len(self.edges) - self.top_n
        return summary_fit(head, lines, f"(+{more} more circuit edges)" if more > 0 else "")


def circuit_search(ctx: ToolContext, args: CircuitSearchIn) -> CircuitSearchOut:
    """Find the edges that carry a task's behaviour (EAP-IG, EAP or ACDC) and measure how faithful they are."""
    task = load_task_for(ctx.model, args)
    metric = args.metric or default_metric(args.method, task)
    setup = PatchSetup(ctx.model, task, ablation=args.ablation, metric=metric, position=args.position)
    checkpoint = None
    if args.method is Method.ACDC:  # an interrupted ACDC search resumes from its last receiver
        from autoexplain.tools.cache import cache_root

        tau = args.threshold if args.threshold is not None else "default"
        checkpoint = cache_root() / "circuits" / f"acdc-{setup.fingerprint()}-{tau}.json"
    circ = find_circuit(setup, args.method, top_k=args.top_k, threshold=args.threshold, steps=args.steps,
                        curve=args.curve, checkpoint=checkpoint)
    ranks = circ.ranks()
    kept = circ.kept_by_rank()
    s = circ.scores
    return CircuitSearchOut(method=s.method, ablation=s.ablation, metric=s.metric, n_edges_total=len(s.edges),
                            n_edges=circ.n_edges,
                            edges=[ScoredEdge(edge=s.edges[i], score=s.scores[i], rank=ranks[i]) for i in kept],
                            faithfulness=circ.faithfulness, curve=circ.curve, m_clean=s.m_clean,
                            m_ablated=s.m_ablated, threshold=circ.threshold, top_k=circ.top_k, seconds=s.seconds,
                            note=circ.note, top_n=args.top_n, all_scores=s)


TOOLS = (
    ToolSpec(name="circuit_search", level=CausalLevel.INTERVENTION,
             input_model=CircuitSearchIn, output_model=CircuitSearchOut, fn=circuit_search,
             cost=Cost.FORWARD,
             description="Circuit discovery on a task (clean/corrupt prompt pairs): score every edge of the "
                         "model's graph (embed, heads aL.H, MLPs mL, logits; edges like a0.3->a1.2.k) with EAP-IG "
                         "(default), EAP or ACDC, keep the top_k edges or those above a threshold, and report the "
                         "circuit's faithfulness (m(C)-m(∅))/(m(M)-m(∅)) with everything outside it ablated, plus "
                         "faithfulness at 0.1-100 % of edges. Intervention-level evidence for this task, ablation "
                         "(resample by default; zero ablation over-blames constant components) and metric."),
)
