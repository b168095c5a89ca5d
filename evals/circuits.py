"""Scores of a found circuit: correctness (faithfulness), completeness, succinctness (minimality), MIB's CPR/CMD
curves, and ROC AUC / recall / precision against a ground-truth edge set.

Everything here is **interventional** evidence (:attr:`CausalLevel.INTERVENTION`): every number comes from
patching (ablating) edges of the model's graph with the setup's ablation (resample by default), reading the
setup's metric at the answer position, over the setup's prompt pairs. A score says how the circuit behaves under
*that* ablation, metric and task distribution; it says nothing about what the components compute elsewhere, and
numbers under different ablations or metrics are not comparable (Miller et al.), so every stored row records the
ablation, the patch type (always ``edge``) and the metric. All evaluations go through the one patching core
(:meth:`PatchSetup.evaluate_many` with :meth:`Graph.mask`); nothing is re-implemented here.

Notation
--------
M is the set of all edges, C ⊆ M the circuit, K ⊆ C a knock-out set. ``m(S)`` is the metric with every edge
*outside* S patched (S runs clean), so ``m(M)`` is the unpatched model and ``m(∅)`` the fully ablated one.

``F(S) = (m(S) − m(∅)) / (m(M) − m(∅))`` is the faithfulness of an edge set (:func:`faithfulness`, the same
function as :func:`autoexplain.tools.circuits.faithfulness`). F(M) = 1 and F(∅) = 0 by definition. It is a ratio
of metric changes, not a probability: it can exceed 1 (the circuit does the task *better* than the model, e.g.
when negative components were left out) or fall below 0.

The scores
----------
* **correctness = faithfulness F(C)**. Typically [0, 1]; 1: the circuit alone (everything else ablated) reproduces
  the model's metric; 0: it does no better than the fully ablated model. Claim supported: *the circuit's edges are
  sufficient* (under this ablation) for the model's behaviour on this task.

* **completeness** (IOI-style, Wang et al. 2022). For knock-out sets K ⊆ C compare ``F(C∖K)`` with ``F(M∖K)``:
  a complete circuit loses exactly what the whole model loses when K is knocked out. ``gap(K) = |F(C∖K) −
  F(M∖K)|``. Subsets tried (:func:`completeness`): K = ∅ (gap = |F(C) − 1|), K = C (gap = |F(M∖C)|: can the rest
  of the model still do the task without the circuit?), for every circuit node the circuit edges touching it,
  and ``n_subsets`` random edge subsets of C of sizes ``fraction`` x |C| (deduplicated). Reported: the worst gap
  ``max_K gap(K)``, the mean gap, the number of subsets and the worst K. Range of a gap: ≥ 0, typically [0, 1];
  small = complete. The IOI-style score ``completeness_ioi = max(0, 1 − worst_gap)`` is in [0, 1], 1 = complete
  (the reported completeness also accounts for necessary components outside C, below).
  Claim supported: *no mechanism outside the circuit (backup heads, parallel paths) compensates for, or
  contributes to, the behaviour in a way the circuit misses*, for the subsets tried. Caveat: IOI also searches
  for the worst K greedily; sampling can miss it, so a high score is an upper bound on completeness. Knock-outs
  only remove edges *of C*, so they are blind to a component outside C that matters only jointly with one
  inside (an AND gate whose other input C left out): the necessity check below catches that.

* **necessity** (the noising view, next to faithfulness' denoising/sufficiency view). ``necessity(C) = (m(M) −
  m(M∖C)) / (m(M) − m(∅)) = 1 − F(M∖C)``: the share of the effect lost when only the circuit's edges are patched in
  the otherwise clean model. Typically [0, 1]; 1 = corrupting the circuit removes the whole behaviour. And the
  **necessary components outside C** (:func:`necessary_outside`, on
  :func:`autoexplain.tools.circuits.noising_scan`): every head and MLP is noised alone in the full model (all
  its outgoing edges patched); one that no circuit edge touches and that moves the metric by at least
  ``tau x |m(M) − m(∅)|`` is missing from the circuit. Then single edges from ``embed`` or a necessary node into a
  necessary node or ``logits`` (edges into ``logits`` all, the others by priority up to a budget, default 2 x the
  number of nodes): one outside C that moves the metric by at least that much is missing too. Why both views:
  components that matter only *jointly* (an AND gate: the induction head's query and key) are invisible to
  sufficiency (a circuit with only the value path still reproduces the answer, F(C) = 1, and IOI-style knock-outs
  of C's own edges see nothing outside C), but noising either input alone breaks the behaviour. Caveat: noising
  cannot see *redundant* components (two backup heads: noising one moves nothing); faithfulness and the
  completeness knock-outs can. Candidates beyond the budget stay unchecked and are reported (``n_unchecked``).

* **completeness as reported** = ``min(IOI completeness, 1 − largest share of the effect moved by a necessary
  component outside C)`` (share = |m(component noised) − m(M)| / |m(M) − m(∅)|, capped at 1). A circuit that
  leaves out a component whose noising alone removes half the effect scores at most 0.5, however well it does
  under its own knock-outs; the score's details name the missing components and their effects.

* **succinctness = minimality**. ``edge_fraction = |C| / |M|`` (in (0, 1]; small = a small circuit). Each
  circuit node (the source or destination node of a kept edge; a head's q/k/v inputs belong to the head;
  ``embed`` and ``logits`` are excluded) is knocked out by removing every kept edge touching it:
  ``drop(v) = F(C) − F(C∖E_v)``. The node is *necessary* when ``|drop(v)| ≥ tol`` (default 0.01, i.e. 1 % of the
  full ablation effect), else *unnecessary*. The absolute value follows IOI's minimality: a node whose removal
  makes the circuit overshoot (a negative head) also matters. ``succinctness = (1 − edge_fraction) x
  necessary_fraction``, in [0, 1]: high = few edges and no passengers. A circuit with no nodes counts as
  necessary_fraction 1 (so the empty circuit scores 1: read succinctness together with correctness). Claim supported:
  *each node is necessary for the circuit's behaviour*. Caveat: knocking
  out one node at a time (IOI's K = ∅ case) calls two redundant nodes both unnecessary; the result's
  ``joint_unnecessary_drop`` (all unnecessary nodes removed together) shows when that happens. On large graphs
  ``1 − edge_fraction`` is close to 1 for any reasonable circuit, so the node factor does the discriminating.

* **CPR / CMD** (MIB, Mueller et al. 2025). Rank edges by |score| (``signed=True``: by score, largest first; MIB
  accepts a separately ranked submission for CPR), take the top ``k = ceil(p % x |M|)`` (at least 1) edges for each
  p in :data:`~autoexplain.tools.circuits.CURVE_PERCENTS` (0.1 … 100 %) and measure ``f(p) = F(top k)``.
  With ``x = p / 100`` and the trapezoid rule over the given points:
  ``CPR = ∫ f dx / (x_max − x_min)`` (higher is better; 1 = every circuit on the grid is as good as the model;
  can exceed 1) and ``CMD = ∫ |1 − f| dx / (x_max − x_min)`` (≥ 0, lower is better; 0 = every circuit reproduces
  the model exactly). They judge the *ranking* (the edge scores), not one selected circuit. Deviations from MIB's
  code: MIB does not divide by ``x_max − x_min`` (on its grid that is a factor 0.999); MIB takes ``int(p x |M|)``
  edges (possibly 0) and prunes edges not connected to both ``embed`` and ``logits`` before evaluating, we keep at
  least one edge and do not prune; MIB's CMD ranks by |score| and its CPR by signed score when both are submitted.

* **ROC AUC, recall, precision** against ground-truth edges (planted circuits). ROC AUC of |score| as a classifier
  of membership in the true set: the probability that a random true edge scores above a random other edge (ties
  count ½), by the rank (Mann-Whitney) formula; [0, 1], 0.5 = chance, 1 = every true edge ranked above every other.
  ``recall = |C ∩ T| / |T|``, ``precision = |C ∩ T| / |C|``. These are about the *search*, not the model: they
  need a ground truth that is itself causal (planted by construction).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Collection, Iterable, Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field

from autoexplain.evals.scores import Score
from autoexplain.tools.circuits import (
    CURVE_PERCENTS,
    DEFAULT_THRESHOLD,
    WEAK_EFFECT,
    Circuit,
    CurvePoint,
    EdgeScores,
    effect_note,
    noising_scan,
)
from autoexplain.tools.circuits import faithfulness as _tool_faithfulness
from autoexplain.tools.errors import InputError
from autoexplain.tools.patching import PatchSetup, check_effect
from autoexplain.tools.vocab import Ablation, Edge, Method, PatchMetric, PatchType

#: Random knock-out subsets drawn by :func:`completeness` (on top of the deterministic ones).
DEFAULT_N_SUBSETS = 20
#: Sizes of the random knock-out subsets, as fractions of the circuit's edges (drawn round-robin).
DEFAULT_FRACTIONS: tuple[float, ...] = (0.1, 0.25, 0.5)
#: A node is necessary when removing its edges moves faithfulness by at least this much (1 % of the effect).
DEFAULT_TOL = 0.01
#: Masks per batched :meth:`PatchSetup.evaluate_many` call on CUDA (bounds the memory of the stacked masks).
_MASKS_PER_CALL = 64

Keep = Iterable[int] | Circuit


# ============================================================================= edge sets and their faithfulness
def kept_edges(setup: PatchSetup, keep: Keep) -> list[int]:
    """The circuit's edge indices (sorted, unique) from indices or a :class:`Circuit` found on the same graph."""
    g = setup.graph
    if isinstance(keep, Circuit):
        if tuple(keep.scores.edges) != g.names:
            raise InputError(f"the circuit was found on another graph ({len(keep.scores.edges)} edges) than this "
                             f"setup's ({g.n_edges} edges): score it with a setup built from the same model")
        return [i for i, k in enumerate(keep.in_circuit) if k]
    ids = sorted({int(i) for i in keep})
    bad = [i for i in ids if not 0 <= i < g.n_edges]
    if bad:
        raise InputError(f"edge indices {bad[:5]} are outside this graph (0..{g.n_edges - 1}); use "
                         "setup.graph.edge_ids(names) to turn edge names into indices")
    return ids


class _Faithfulness:
    """F(S) for many edge sets S, memoised, on the patching core.

    Each mask's pass starts at the first layer it patches (the layers before it run clean, so the cached clean
    residual is reused; a mask that patches only edges into ``logits`` runs no layer at all). On CUDA masks with
    the same start layer share batched passes (:meth:`PatchSetup.evaluate_many`); on CPU a pass K times as large
    costs more than K passes (see :class:`~autoexplain.tools.circuits.SearchConfig`), so masks go one at a time.
    """

    def __init__(self, setup: PatchSetup) -> None:
        check_effect(setup)
        self.setup = setup
        g = setup.graph
        self.all = frozenset(range(g.n_edges))
        self.memo: dict[frozenset[int], float] = {}
        self.evaluations = 0
        self._dst_layer = torch.tensor([dg.layer for dg in g.dst_groups for _ in range(dg.size)])
        self._per_call = _MASKS_PER_CALL if setup.device.type == "cuda" else 1

    def _start_layer(self, mask: torch.Tensor) -> int:
        cols = mask.bool().any(0)
        return int(self._dst_layer[cols].min()) if bool(cols.any()) else self.setup.graph.n_layers

    def many(self, edge_sets: Sequence[Collection[int]]) -> list[float]:
        keys = [frozenset(s) for s in edge_sets]
        todo = list(dict.fromkeys(k for k in keys if k not in self.memo))
        g, s = self.setup.graph, self.setup
        masks = {k: g.mask(sorted(self.all - k)) for k in todo}
        starts = {k: self._start_layer(m) for k, m in masks.items()}
        todo.sort(key=lambda k: (starts[k], len(k)))
        i = 0
        while i < len(todo):
            block = [todo[i]]
            while (len(block) < self._per_call and i + len(block) < len(todo)
                   and starts[todo[i + len(block)]] == starts[todo[i]]):
                block.append(todo[i + len(block)])
            values = s.evaluate_many(torch.stack([masks[k] for k in block]), start_layer=starts[block[0]])
            for k, m in zip(block, values, strict=True):
                self.memo[k] = (m - s.m_ablated) / s.effect
            self.evaluations += len(block)
            i += len(block)
        return [self.memo[k] for k in keys]

    def one(self, edge_set: Collection[int]) -> float:
        return self.many([edge_set])[0]


def faithfulness(setup: PatchSetup, keep: Keep) -> float:
    """F(C) = (m(C) − m(∅)) / (m(M) − m(∅)): :func:`autoexplain.tools.circuits.faithfulness` (every edge outside
    the circuit patched with the setup's ablation)."""
    return _tool_faithfulness(setup, kept_edges(setup, keep))


def faithfulness_many(setup: PatchSetup, edge_sets: Sequence[Collection[int]]) -> list[float]:
    """F of several edge sets at once (the same ratio as :func:`faithfulness`), several masks per forward pass."""
    return _Faithfulness(setup).many(edge_sets)


def circuit_nodes(setup: PatchSetup, keep: Keep) -> dict[str, list[int]]:
    """Each circuit node (forward order) -> the circuit's edges touching it. A node is the source or destination
    node of a kept edge (``a1.2.q`` belongs to ``a1.2``); ``embed`` and ``logits`` are left out."""
    g = setup.graph
    out: dict[str, list[int]] = {}
    for e in kept_edges(setup, keep):
        for node in (g.sources[g.edge_src[e]], g.node_of_dest(g.edge_dst[e])):
            if node not in ("embed", "logits"):
                out.setdefault(node, []).append(e)
    order = {name: i for i, name in enumerate(g.sources)}
    return {n: out[n] for n in sorted(out, key=order.__getitem__)}


# ============================================================================= completeness
class Knockout(BaseModel):
    """One knock-out set K ⊆ C and what it does to the circuit and to the whole model."""

    kind: str = Field(description="empty | all | node:<name> | random:<fraction>")
    edges: list[str] = Field(description="the edges of K")
    f_circuit: float = Field(description="F(C∖K)")
    f_model: float = Field(description="F(M∖K)")
    gap: float = Field(description="|F(C∖K) − F(M∖K)|")


class CompletenessResult(BaseModel):
    """IOI-style completeness: gaps between the circuit and the model under the same knock-outs."""

    score: float = Field(description="max(0, 1 − worst_gap), [0,1], 1 = complete")
    worst_gap: float = Field(description="max over K of |F(C∖K) − F(M∖K)|, ≥ 0, small = complete")
    mean_gap: float
    n_subsets: int
    n_random: int
    fractions: list[float]
    seed: int
    worst: Knockout
    knockouts: list[Knockout]


def _knockout_sets(setup: PatchSetup, circuit: list[int], n_subsets: int, fractions: Sequence[float],
                   seed: int) -> list[tuple[str, frozenset[int]]]:
    """The deterministic subsets (∅, C, each node's edges), then up to ``n_subsets`` new random ones."""
    sets: dict[frozenset[int], str] = {frozenset(): "empty"}
    sets.setdefault(frozenset(circuit), "all")
    for node, edges in circuit_nodes(setup, circuit).items():
        sets.setdefault(frozenset(edges), f"node:{node}")
    rng = random.Random(f"completeness:{seed}")
    added, tries = 0, 0
    while circuit and added < n_subsets and tries < 5 * n_subsets:
        frac = fractions[tries % len(fractions)]
        tries += 1
        size = min(len(circuit), max(1, round(frac * len(circuit))))
        k = frozenset(rng.sample(circuit, size))
        if k not in sets:
            sets[k] = f"random:{frac:g}"
            added += 1
    return [(kind, k) for k, kind in sets.items()]


def _check_fractions(fraction: float | Sequence[float]) -> list[float]:
    fractions = [float(fraction)] if isinstance(fraction, int | float) else [float(f) for f in fraction]
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise InputError(f"fraction must be in (0, 1] (the share of the circuit's edges knocked out), got {fraction}")
    return fractions


def _completeness(ev: _Faithfulness, circuit: list[int], n_subsets: int, fraction: float | Sequence[float],
                  seed: int) -> CompletenessResult:
    if n_subsets < 0:
        raise InputError(f"n_subsets must be >= 0, got {n_subsets}")
    fractions = _check_fractions(fraction)
    setup = ev.setup
    subsets = _knockout_sets(setup, circuit, n_subsets, fractions, seed)
    c = frozenset(circuit)
    values = ev.many([c - k for _, k in subsets] + [ev.all - k for _, k in subsets])
    n = len(subsets)
    names = setup.graph.names
    knockouts = [Knockout(kind=kind, edges=[names[e] for e in sorted(k)], f_circuit=fc, f_model=fm,
                          gap=abs(fc - fm))
                 for (kind, k), fc, fm in zip(subsets, values[:n], values[n:], strict=True)]
    worst = max(knockouts, key=lambda k: k.gap)
    return CompletenessResult(score=max(0.0, 1.0 - worst.gap), worst_gap=worst.gap,
                              mean_gap=sum(k.gap for k in knockouts) / n, n_subsets=n,
                              n_random=sum(k.kind.startswith("random") for k in knockouts), fractions=fractions,
                              seed=seed, worst=worst, knockouts=knockouts)


def completeness(setup: PatchSetup, keep: Keep, *, n_subsets: int = DEFAULT_N_SUBSETS,
                 fraction: float | Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0) -> CompletenessResult:
    """IOI-style completeness of the circuit ``keep``: for K ∈ {∅, C, each node's circuit edges} plus
    ``n_subsets`` random edge subsets of C (sizes ``fraction`` x |C|, round-robin, deterministic in ``seed``),
    the gap |F(C∖K) − F(M∖K)|. Two evaluations per subset, batched."""
    return _completeness(_Faithfulness(setup), kept_edges(setup, keep), n_subsets, fraction, seed)


# ============================================================================= necessity
class NecessaryComponent(BaseModel):
    """A head, MLP or edge outside the circuit whose noising alone (in the otherwise clean model) moves the metric."""

    kind: Literal["node", "edge"]
    name: str
    effect: float = Field(description="m(M with it patched) − m(M), metric units")
    share: float = Field(description="|effect| / |m(M) − m(∅)|, capped at 1")


class NecessityResult(BaseModel):
    """The noising view of a circuit: how much corrupting it alone costs, and what outside it is also necessary."""

    necessity: float = Field(description="(m(M) − m(M∖C)) / (m(M) − m(∅)) = 1 − F(M∖C), 1 = fully necessary")
    tau: float = Field(description="relative: a component is necessary when it moves the metric by tau x |effect|")
    missing: list[NecessaryComponent] = Field(description="necessary components outside C, largest share first")
    largest_missing_share: float = Field(description="0 when nothing necessary is missing")
    necessary_nodes: list[str] = Field(description="every necessary head and MLP, inside C or not")
    n_nodes_checked: int
    n_edges_checked: int
    n_candidates: int
    n_unchecked: int = Field(description="candidate edges left unchecked by the budget")
    unchecked: list[str] = Field(description="the first unchecked candidates, by priority")
    evaluations: int


def _necessity(ev: _Faithfulness, circuit: list[int], tau: float, max_edges: int | None) -> NecessityResult:
    setup = ev.setup
    value = 1.0 - ev.one(ev.all - frozenset(circuit))
    scan = noising_scan(setup, tau=tau, skip=circuit, max_edges=max_edges)
    inside = set(circuit_nodes(setup, circuit))
    span = abs(setup.effect)
    missing = [NecessaryComponent(kind="node", name=n, effect=scan.node_effects[n],
                                  share=min(1.0, abs(scan.node_effects[n]) / span))
               for n in scan.necessary_nodes if n not in inside]
    missing += [NecessaryComponent(kind="edge", name=name, effect=v, share=min(1.0, abs(v) / span))
                for name, v in scan.necessary_edges().items()]
    missing.sort(key=lambda c: (-c.share, c.kind, c.name))
    return NecessityResult(necessity=value, tau=tau, missing=missing,
                           largest_missing_share=max((c.share for c in missing), default=0.0),
                           necessary_nodes=scan.necessary_nodes, n_nodes_checked=len(scan.node_effects),
                           n_edges_checked=scan.n_checked, n_candidates=scan.n_candidates,
                           n_unchecked=scan.n_unchecked, unchecked=scan.unchecked, evaluations=scan.evaluations)


def necessity(setup: PatchSetup, keep: Keep) -> float:
    """(m(M) − m(M∖C)) / (m(M) − m(∅)): the share of the effect lost when only the circuit's edges are patched in the
    otherwise clean model (:func:`autoexplain.tools.circuits.necessity`)."""
    return 1.0 - _Faithfulness(setup).one(frozenset(range(setup.graph.n_edges)) - frozenset(kept_edges(setup, keep)))


def necessary_outside(setup: PatchSetup, keep: Keep, *, tau: float = DEFAULT_THRESHOLD,
                      max_edges: int | None = None) -> list[NecessaryComponent]:
    """Heads, MLPs and edges outside the circuit ``keep`` that are necessary in the full model: noised alone they
    move the metric by at least ``tau`` x |m(M) − m(∅)|. Nodes first (every head and MLP, one pass each), then
    single edges from ``embed`` or a necessary node into a necessary node or ``logits`` (up to ``max_edges``
    single-edge passes, default 2 x the number of nodes; edges into ``logits`` are free). Largest share first."""
    return _necessity(_Faithfulness(setup), kept_edges(setup, keep), tau, max_edges).missing


# ============================================================================= minimality
class NodeRemoval(BaseModel):
    node: str
    n_edges: int = Field(description="circuit edges touching the node (all removed together)")
    faithfulness_without: float = Field(description="F(C∖E_node)")
    drop: float = Field(description="F(C) − F(C∖E_node); negative: the circuit does better without it")
    necessary: bool = Field(description="|drop| >= tol")


class MinimalityResult(BaseModel):
    """Edges kept, and whether each node of the circuit is needed (see the module doc)."""

    n_edges: int
    n_edges_total: int
    edge_fraction: float = Field(description="n_edges / n_edges_total, (0,1]")
    faithfulness: float = Field(description="F(C)")
    tol: float
    nodes: list[NodeRemoval]
    unnecessary: list[str] = Field(description="nodes whose removal moves faithfulness by less than tol")
    necessary_fraction: float = Field(description="share of circuit nodes that are necessary (1 with no nodes)")
    succinctness: float = Field(description="(1 − edge_fraction) x necessary_fraction, [0,1]")
    joint_unnecessary_drop: float | None = Field(
        default=None, description="F(C) − F(C without every unnecessary node): large = redundant, not useless")


def _minimality(ev: _Faithfulness, circuit: list[int], tol: float) -> MinimalityResult:
    if tol < 0:
        raise InputError(f"tol must be >= 0 (a fraction of the full ablation effect), got {tol}")
    setup = ev.setup
    c = frozenset(circuit)
    nodes = circuit_nodes(setup, circuit)
    values = ev.many([c] + [c - frozenset(edges) for edges in nodes.values()])
    f_c = values[0]
    removals = [NodeRemoval(node=n, n_edges=len(edges), faithfulness_without=f, drop=f_c - f,
                            necessary=abs(f_c - f) >= tol)
                for (n, edges), f in zip(nodes.items(), values[1:], strict=True)]
    unnecessary = [r.node for r in removals if not r.necessary]
    joint = None
    if unnecessary:
        dropped = frozenset(e for n in unnecessary for e in nodes[n])
        joint = f_c - ev.one(c - dropped)
    necessary_fraction = 1.0 if not removals else 1.0 - len(unnecessary) / len(removals)
    n_total = setup.graph.n_edges
    fraction = len(circuit) / n_total
    return MinimalityResult(n_edges=len(circuit), n_edges_total=n_total, edge_fraction=fraction, faithfulness=f_c,
                            tol=tol, nodes=removals, unnecessary=unnecessary, necessary_fraction=necessary_fraction,
                            succinctness=(1.0 - fraction) * necessary_fraction, joint_unnecessary_drop=joint)


def minimality(setup: PatchSetup, keep: Keep, *, tol: float = DEFAULT_TOL) -> MinimalityResult:
    """Edge fraction of the circuit ``keep`` and, for each of its nodes, the faithfulness drop when all its circuit
    edges are removed; nodes with |drop| < ``tol`` are unnecessary. One evaluation per node, batched."""
    return _minimality(_Faithfulness(setup), kept_edges(setup, keep), tol)


# ============================================================================= MIB curves
class CurveResult(BaseModel):
    """Faithfulness of the top-k edges over a grid of k, and MIB's areas (see the module doc)."""

    ranking: str = Field(description="abs: by |score|; signed: by score, largest first")
    points: list[CurvePoint]
    cpr: float = Field(description="∫ f dx / (x_max − x_min), higher is better")
    cmd: float = Field(description="∫ |1 − f| dx / (x_max − x_min), ≥ 0, lower is better")


def _top_k(percent: float, n: int) -> int:
    # the small epsilon keeps e.g. 10 % of 110 at 11 edges where floating point says 11.000000000000002
    return min(n, max(1, math.ceil(percent * n / 100 - 1e-9)))


def _areas(xs: Sequence[float], fs: Sequence[float]) -> tuple[float, float]:
    span = xs[-1] - xs[0]
    under = sum((x2 - x1) * (f1 + f2) / 2 for x1, x2, f1, f2 in zip(xs, xs[1:], fs, fs[1:]))
    off = sum((x2 - x1) * (abs(1 - f1) + abs(1 - f2)) / 2 for x1, x2, f1, f2 in zip(xs, xs[1:], fs, fs[1:]))
    return under / span, off / span


def _cpr_cmd(ev: _Faithfulness, scores: EdgeScores, percents: Sequence[float], signed: bool) -> CurveResult:
    pcts = [float(p) for p in percents]
    if len(pcts) < 2 or any(not 0 < p <= 100 for p in pcts) or pcts != sorted(set(pcts)):
        raise InputError(f"percents must be at least two increasing values in (0, 100], got {list(percents)}")
    g = ev.setup.graph
    if tuple(scores.edges) != g.names:
        raise InputError(f"the edge scores belong to another graph ({len(scores.edges)} edges) than this setup's "
                         f"({g.n_edges} edges)")
    n = len(scores.scores)
    order = (sorted(range(n), key=lambda i: (-scores.scores[i], i)) if signed else scores.order())
    ks = [_top_k(p, n) for p in pcts]
    fs = ev.many([order[:k] for k in ks])
    cpr, cmd = _areas([p / 100 for p in pcts], fs)
    return CurveResult(ranking="signed" if signed else "abs",
                       points=[CurvePoint(percent=p, n_edges=k, faithfulness=f) for p, k, f in zip(pcts, ks, fs)],
                       cpr=cpr, cmd=cmd)


def cpr_cmd(setup: PatchSetup, scores: EdgeScores, percents: Sequence[float] = CURVE_PERCENTS, *,
            signed: bool = False) -> CurveResult:
    """MIB's CPR (area under the faithfulness curve, higher is better) and CMD (area between the curve and 1, lower
    is better) of an edge ranking, with the top ``ceil(p % of the edges)`` (at least 1) kept for each p."""
    return _cpr_cmd(_Faithfulness(setup), scores, percents, signed)


# ============================================================================= against ground truth
def _canonical(edges: Iterable[str | Edge]) -> set[str]:
    return {str(e) if isinstance(e, Edge) else str(Edge.parse(e)) for e in edges}


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks of ``values``; tied values share the average rank of their group (what ROC AUC by the
    Mann-Whitney statistic and Spearman correlation both need)."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def rank_auc(values: Sequence[float], labels: Sequence[bool]) -> float | None:
    """ROC AUC of ``values`` as a score for ``labels`` by the rank (Mann-Whitney U) formula, ties at average rank
    (counted ½); None unless both classes are present."""
    if len(values) != len(labels):
        raise ValueError("values and labels differ in length")
    n_pos = sum(bool(x) for x in labels)
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = average_ranks(values)
    r_pos = sum(r for r, lab in zip(ranks, labels, strict=True) if lab)
    return (r_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _truth(edges: Sequence[str], true_edges: Iterable[str | Edge]) -> set[str]:
    """Canonical ground-truth edge names, all of which must be edges of the graph (never silently ignored)."""
    truth = _canonical(true_edges)
    unknown = sorted(truth - set(edges))
    if unknown:
        raise InputError(f"ground-truth edges {unknown[:5]} are not edges of this graph ({len(edges)} edges)")
    return truth


def edge_roc_auc(scores: EdgeScores, true_edges: Iterable[str | Edge]) -> float | None:
    """ROC AUC of |score| against membership in ``true_edges`` (every one must be an edge of the graph); None when
    the truth is empty or covers every edge."""
    truth = _truth([str(e) for e in scores.edges], true_edges)
    return rank_auc([abs(s) for s in scores.scores], [e in truth for e in scores.edges])


def recall(kept_edges: Iterable[str | Edge], true_edges: Iterable[str | Edge]) -> float | None:
    """|kept ∩ true| / |true|; None for an empty truth."""
    kept, truth = _canonical(kept_edges), _canonical(true_edges)
    return len(kept & truth) / len(truth) if truth else None


def precision(kept_edges: Iterable[str | Edge], true_edges: Iterable[str | Edge]) -> float | None:
    """|kept ∩ true| / |kept|; None for an empty circuit."""
    kept, truth = _canonical(kept_edges), _canonical(true_edges)
    return len(kept & truth) / len(kept) if kept else None


# ============================================================================= everything at once
class CircuitScores(BaseModel):
    """Every score of one circuit under one setup (ablation, metric, task), with the raw values behind them."""

    ablation: Ablation
    patch_type: PatchType = PatchType.EDGE
    metric: PatchMetric
    method: Method
    search_ablation: Ablation = Field(description="the ablation the circuit was found with")
    search_metric: PatchMetric = Field(description="the metric the circuit was found with")
    n_edges: int
    n_edges_total: int
    n_prompts: int
    m_clean: float
    m_ablated: float
    correctness: float = Field(description="faithfulness F(C), typically [0,1], 1 = reproduces the model")
    faithfulness: float
    completeness: float = Field(description="min(IOI completeness, 1 − largest share of the effect moved by a "
                                            "necessary component outside C), [0,1], 1 = complete")
    completeness_ioi: float | None = Field(default=None, description="max(0, 1 − worst knock-out gap) alone")
    necessity: float | None = Field(default=None, description="(m(M) − m(M∖C)) / (m(M) − m(∅)), 1 = corrupting C "
                                                              "alone removes the whole effect")
    missing_necessary: list[NecessaryComponent] = Field(default_factory=list, description="necessary components "
                                                                                          "outside C")
    completeness_worst_gap: float
    completeness_mean_gap: float
    succinctness: float = Field(description="(1 − edge_fraction) x necessary node fraction, [0,1]")
    edge_fraction: float
    cpr: float | None = None
    cmd: float | None = None
    edge_roc_auc: float | None = None
    edge_recall: float | None = None
    edge_precision: float | None = None
    n_true: int | None = Field(default=None, description="ground-truth edges, when given")
    completeness_detail: CompletenessResult
    necessity_detail: NecessityResult | None = None
    minimality_detail: MinimalityResult
    curve: CurveResult | None = None
    evaluations: int = Field(description="patched forward evaluations (edge sets) this scoring ran")
    seconds: float
    note: str = ""
    no_behaviour: bool = Field(False, description="ablating every edge moves the metric by less than noise "
                                                  "(tools.circuits.WEAK_EFFECT): the model does not do this task "
                                                  "with these prompts, so the scores measure noise")

    def summary(self) -> str:
        """One short paragraph for a person or an LLM."""
        parts = [(f"{self.n_edges}/{self.n_edges_total} edges ({self.ablation.value} ablation, edge patching, "
                  f"metric {self.metric.value}): correctness (faithfulness, sufficiency) {self.correctness:.3f}, "
                  f"necessity {_fmt(self.necessity)}, completeness {self.completeness:.3f} (worst gap "
                  f"{self.completeness_worst_gap:.3f} at {self.completeness_detail.worst.kind}"
                  + ("; necessary but missing: " + ", ".join(f"{c.name} {c.share:.0%}"
                                                              for c in self.missing_necessary[:6])
                     if self.missing_necessary else "")
                  + f"), succinctness {self.succinctness:.3f}")]
        if self.minimality_detail.unnecessary:
            parts.append(f"unnecessary nodes: {', '.join(self.minimality_detail.unnecessary[:10])}")
        if self.cpr is not None:
            parts.append(f"CPR {self.cpr:.3f}, CMD {self.cmd:.3f}")
        if self.n_true is not None:
            parts.append(f"vs {self.n_true} true edges: ROC AUC {_fmt(self.edge_roc_auc)}, recall "
                         f"{_fmt(self.edge_recall)}, precision {_fmt(self.edge_precision)}")
        return "; ".join(parts) + ". Intervention-level evidence." + (f" {self.note}" if self.note else "")

    def scores(self) -> list[Score]:
        """One :class:`~autoexplain.evals.scores.Score` per metric (the ground-truth metrics only when a truth was
        given). Every score's details start with the ablation, the patch type and the patch metric the value
        depends on, and the method, search settings and sizes."""
        common = {"ablation": self.ablation.value, "patch_type": self.patch_type.value, "metric": self.metric.value,
                  "method": self.method.value, "search_ablation": self.search_ablation.value,
                  "search_metric": self.search_metric.value, "n_edges": self.n_edges,
                  "n_edges_total": self.n_edges_total, "n_prompts": self.n_prompts}
        comp, mini = self.completeness_detail, self.minimality_detail
        worst = {"worst_kind": comp.worst.kind, "worst_edges": comp.worst.edges[:50],
                 "worst_f_circuit": comp.worst.f_circuit, "worst_f_model": comp.worst.f_model}
        nodes = {r.node: round(r.drop, 6) for r in mini.nodes}
        rows: list[tuple[str, float | None, int, dict[str, Any]]] = [
            ("correctness", self.correctness, self.n_prompts,
             {"from": "faithfulness (m(C) - m(∅)) / (m(M) - m(∅))", "m_clean": self.m_clean,
              "m_ablated": self.m_ablated}),
            ("completeness", self.completeness, comp.n_subsets,
             {"from": "min(IOI completeness max(0, 1 - worst |F(C∖K) - F(M∖K)|), 1 - largest share of the effect "
                      "moved by a necessary component outside C noised alone)",
              "ioi_completeness": self.completeness_ioi, **worst, "mean_gap": comp.mean_gap,
              "n_random": comp.n_random, "fractions": comp.fractions, "seed": comp.seed, **self._missing_details()}),
            ("necessity", self.necessity, self.n_prompts,
             {"from": "(m(M) - m(M with C's edges patched)) / (m(M) - m(∅)) = 1 - F(M∖C)",
              "m_clean": self.m_clean, "m_ablated": self.m_ablated, **self._missing_details()}),
            ("succinctness", self.succinctness, len(mini.nodes),
             {"from": "(1 - edge_fraction) x necessary node fraction", "edge_fraction": mini.edge_fraction,
              "necessary_fraction": mini.necessary_fraction, "unnecessary_nodes": mini.unnecessary,
              "node_drops": nodes, "tol": mini.tol, "joint_unnecessary_drop": mini.joint_unnecessary_drop}),
            ("faithfulness", self.faithfulness, self.n_prompts,
             {"m_clean": self.m_clean, "m_ablated": self.m_ablated}),
            ("completeness_worst_gap", self.completeness_worst_gap, comp.n_subsets, worst),
            ("completeness_mean_gap", self.completeness_mean_gap, comp.n_subsets, {"n_random": comp.n_random}),
            ("edge_fraction", self.edge_fraction, self.n_edges_total, {}),
        ]
        if self.curve is not None:
            curve = {"ranking": self.curve.ranking, "percents": [p.percent for p in self.curve.points],
                     "n_edges_at": [p.n_edges for p in self.curve.points],
                     "faithfulness_at": [p.faithfulness for p in self.curve.points],
                     "x": "fraction of edges, trapezoid, divided by (x_max - x_min)"}
            rows += [("cpr", self.cpr, len(self.curve.points), curve),
                     ("cmd", self.cmd, len(self.curve.points), curve)]
        if self.n_true is not None:
            truth = {"n_true": self.n_true}
            rows += [("edge_roc_auc", self.edge_roc_auc, self.n_edges_total, {**truth, "by": "|score|"}),
                     ("edge_recall", self.edge_recall, self.n_true, truth),
                     ("edge_precision", self.edge_precision, self.n_edges, truth)]
        threshold = WEAK_EFFECT[self.metric]
        rows.append(("full_effect", self.m_clean - self.m_ablated, self.n_prompts,
                     {"from": "m(M) - m(∅): how much ablating every edge moves the metric",
                      "noise_threshold": threshold}))
        if self.no_behaviour:  # every number below measures noise: stored as unscored, with the reason
            why = (f"no behaviour: ablating every edge moves {self.metric.value} by only "
                   f"{abs(self.m_clean - self.m_ablated):.3g} (< {threshold}); the model does not do this task")
            rows = [(m, v, n, extra) if m in ("full_effect", "edge_fraction") else
                    (m, None, n, {**extra, "unscored": why, "measured": v}) for m, v, n, extra in rows]
        return [Score(metric=m, value=v, n=n, details={**common, **extra}) for m, v, n, extra in rows]


    def _missing_details(self) -> dict[str, Any]:
        nd = self.necessity_detail
        if nd is None:
            return {"necessity_checked": False}
        why = ("no necessary component outside the circuit among those checked" if not nd.missing else
               f"{len(nd.missing)} component(s) outside the circuit are necessary in the full model; the largest, "
               f"{nd.missing[0].name}, noised alone moves {self.metric.value} by {nd.missing[0].effect:+.4g} "
               f"({nd.missing[0].share:.0%} of the effect)")
        return {"necessity_checked": True, "necessity_tau": nd.tau, "why": why,
                "missing_necessary": [c.model_dump() for c in nd.missing[:20]],
                "largest_missing_share": nd.largest_missing_share, "necessary_nodes": nd.necessary_nodes,
                "noising_edges_checked": nd.n_edges_checked, "noising_candidates": nd.n_candidates,
                "noising_unchecked": nd.n_unchecked}


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def score_circuit(setup: PatchSetup, circuit: Circuit, *, true_edges: Iterable[str | Edge] | None = None,
                  n_subsets: int = DEFAULT_N_SUBSETS, fraction: float | Sequence[float] = DEFAULT_FRACTIONS,
                  seed: int = 0, tol: float = DEFAULT_TOL, percents: Sequence[float] | None = CURVE_PERCENTS,
                  signed: bool = False, necessity_tau: float = DEFAULT_THRESHOLD,
                  necessity_edges: int | None = None) -> CircuitScores:
    """Score ``circuit`` under ``setup`` (its ablation, metric and prompts): correctness (faithfulness), necessity
    and the necessary components outside it (``necessity_tau``, ``necessity_edges``: see
    :func:`necessary_outside`), completeness (IOI-style, lowered by any missing necessary component), succinctness,
    CPR/CMD of the circuit's edge ranking (skipped with ``percents=None``) and, with ``true_edges``, ROC AUC /
    recall / precision. Edge sets shared between the scores are evaluated once."""
    t0 = time.perf_counter()
    ev = _Faithfulness(setup)
    keep = kept_edges(setup, circuit)
    truth = None if true_edges is None else _truth(setup.graph.names, true_edges)  # bad names fail before work
    comp = _completeness(ev, keep, n_subsets, fraction, seed)
    nec = _necessity(ev, keep, necessity_tau, necessity_edges)
    mini = _minimality(ev, keep, tol)
    curve = None if percents is None else _cpr_cmd(ev, circuit.scores, percents, signed)
    names = [setup.graph.names[e] for e in keep]
    s = circuit.scores
    return CircuitScores(
        ablation=setup.ablation, metric=setup.metric, method=s.method, search_ablation=s.ablation,
        search_metric=s.metric, n_edges=len(keep), n_edges_total=setup.graph.n_edges, n_prompts=setup.n_prompts,
        m_clean=setup.m_clean, m_ablated=setup.m_ablated, correctness=mini.faithfulness,
        faithfulness=mini.faithfulness, completeness=max(0.0, min(comp.score, 1.0 - nec.largest_missing_share)),
        completeness_ioi=comp.score, necessity=nec.necessity, missing_necessary=nec.missing,
        necessity_detail=nec, completeness_worst_gap=comp.worst_gap,
        completeness_mean_gap=comp.mean_gap, succinctness=mini.succinctness, edge_fraction=mini.edge_fraction,
        cpr=None if curve is None else curve.cpr, cmd=None if curve is None else curve.cmd,
        edge_roc_auc=None if truth is None else edge_roc_auc(s, truth),
        edge_recall=None if truth is None else recall(names, truth),
        edge_precision=None if truth is None else precision(names, truth),
        n_true=None if truth is None else len(truth), completeness_detail=comp, minimality_detail=mini, curve=curve,
        evaluations=ev.evaluations + nec.evaluations, seconds=time.perf_counter() - t0, note=effect_note(setup),
        no_behaviour=abs(setup.effect) < WEAK_EFFECT[setup.metric])
