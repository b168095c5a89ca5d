"""How a circuit's effect is carried: causal mediation per node, per-prompt effects, held-out scores, robustness.

A circuit found and scored on the same prompts, with mean effects only, can hide three things: a node whose effect
reaches the answer only through later components (or only directly), a mean carried by a few prompts, and a circuit
that fits its own prompts but not others (or changes when the prompts change). The functions here measure each,
on the one patching core (:class:`~autoexplain.tools.patching.PatchSetup`: graph masks, ``evaluate_prompts``), so
every number is **interventional** (:attr:`CausalLevel.INTERVENTION`) and holds for the setup's ablation (resample
by default), metric and prompt distribution only. ``m(S)`` is the metric with the edges in S patched ("noised"),
``m(M)`` the clean model, ``m(∅)`` everything patched; ``E = m(M) - m(∅)`` is the full effect. Numbers "in units
of the effect" are divided by the signed E, so positive always means "supports the clean behaviour", for ``kl``
too (where ablation raises the metric).

1. Causal mediation per node (:func:`mediation`; Pearl 2001, Vig et al. 2020). Treatment: the node's output
   (clean vs ablated); outcome: the metric; mediators: every later component that reads the node. With edge
   patching the three quantities are exact interventions, not estimates:

   * total effect ``TE = m(M) - m(every outgoing edge of n patched)`` (the same as patching the node's output);
   * natural direct effect ``NDE = m(M) - m(only n -> logits patched)``: downstream components still see n's clean
     output, only the direct write to the logits input is ablated;
   * natural indirect effect ``NIE = m(M) - m(every outgoing edge except n -> logits patched)``: downstream
     components see the ablated output, the direct write stays clean;
   * interaction ``TE - NDE - NIE`` and the mediation ratio ``NIE / TE`` (None, with the reason, when |TE| is
     below ``min_total`` x |E|: a ratio of two near-zero numbers is noise).

   What the interaction measures, exactly: in TE every downstream component sees the same ablated value of n as in
   NIE, so the logits input of the TE run is the NIE run's plus the direct change. The paths therefore meet only at
   the output: **TE = NDE + NIE exactly whenever the metric is linear in the final residual stream** (``logit_diff``
   on a model without a final norm), however nonlinear the mediators are; the interaction is the second-order term
   of the metric (softmax in ``answer_prob``/``kl``, the final LayerNorm). Nonlinear *mediators* (an MLP with a
   ReLU threshold, attention whose pattern moves) show instead in the per-mediator split (``per_edge=True``): the
   effect of patching each indirect edge alone, and ``mediator_interaction = NIE - sum of them``, which is zero
   exactly when the indirect paths combine additively. A node with no edge to the logits (none in a standard
   graph, but handled) has NDE = 0 by construction and TE = NIE. Caveat: under resample ablation the "treatment"
   is the clean/corrupt difference of the node's output, so a node that does the same thing on both prompts has
   TE = 0 whatever it computes.

2. Per-prompt effects (:func:`circuit_per_prompt`, :func:`node_claims`). The circuit's recovered share per prompt
   ``(m_i(C) - m_i(∅)) / (m_i(M) - m_i(∅))`` (prompt i's own values), summarised by mean, median, std, 10th/90th
   percentiles and the share of prompts on which it is at least 0.5. Prompts whose own effect is below
   ``min_prompt_effect`` x |E| are excluded and counted (their ratio is 0/0). The mean of per-prompt shares is not
   faithfulness (a ratio of means): both are reported. A node claim "noising n lowers the metric" holds on prompt i
   when patching every outgoing edge of n moves prompt i's metric toward its ablated value by at least
   ``min_drop`` of that prompt's own effect.

3. Held-out scores (:func:`held_out`). The prompts are split (seeded); the circuit is found on one part and the
   same edge set is scored on the other with a fresh setup. In-sample faithfulness is optimistic: the search chose
   the edges that work on exactly those prompts. The gap is the overfitting.

4. Robustness (:func:`robustness`). The search is rerun on R seeded subsets of the prompts (``fraction`` of them);
   each subset's circuit is compared with the full-data circuit: edge Jaccard, Spearman correlation of all edge
   scores, which edges survive every resample, and each resample circuit's faithfulness on all prompts. Cost: R + 1
   searches plus R faithfulness evaluations; :data:`DEFAULT_RESAMPLES` keeps it to a few times one search.
   Caveat: subsets overlap (75 % of the same prompts), so agreement is an upper bound on agreement across
   independent prompt sets; Spearman over all edges mixes the ranking of the circuit's edges with the ordering of
   near-zero ones (on clean planted models those are numerically zero and tied).
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, Field

from autoexplain.evals.circuits import Keep, average_ranks, kept_edges
from autoexplain.evals.scores import Score
from autoexplain.tools.circuits import DEFAULT_STEPS, find_circuit
from autoexplain.tools.errors import InputError
from autoexplain.tools.models import LoadedModel
from autoexplain.tools.patching import PatchSetup, check_effect, default_metric_for, summary_fit
from autoexplain.tools.vocab import Ablation, CausalLevel, Edge, Method, PatchMetric

#: ``NIE / TE`` is reported only when |TE| is at least this fraction of |m(M) - m(∅)|.
DEFAULT_MIN_TOTAL = 0.01
#: A prompt whose own |m_i(M) - m_i(∅)| is below this fraction of |m(M) - m(∅)| is left out of per-prompt ratios.
DEFAULT_MIN_PROMPT_EFFECT = 0.05
#: A node claim holds on a prompt when noising the node moves it by at least this fraction of its own effect.
DEFAULT_MIN_DROP = 0.05
#: Searches on resampled prompt sets. Each is a full circuit search on ``fraction`` of the prompts, so the whole
#: check costs about ``1 + R x fraction`` searches: with R = 4 at 75 %, 4-5x one search (measured on the 2-layer toy
#: model, 100 prompts, CPU under load: EAP-IG 3.2 s -> 14.7 s, ACDC 5.4 s -> 23 s).
DEFAULT_RESAMPLES = 4
#: Share of the prompts in each resample.
DEFAULT_RESAMPLE_FRACTION = 0.75
#: Masks per ``evaluate_prompts`` call (bounds the memory of the stacked masks; the core splits passes further).
_MASKS_PER_CALL = 64
LEVEL = CausalLevel.INTERVENTION

if TYPE_CHECKING:
    from autoexplain.tools.data import TokenizedTask


# ============================================================================= shared helpers
def _prompt_values(setup: PatchSetup, masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-prompt metric ``[K, n_prompts]`` for K masks; masks are grouped by the first layer they patch, so each
    pass starts there from the cached clean residual (a mask patching only ``logits`` edges runs no layer)."""
    g = setup.graph
    dst_layer = torch.tensor([dg.layer for dg in g.dst_groups for _ in range(dg.size)])
    out = torch.zeros(len(masks), setup.n_prompts, dtype=torch.float64)
    by_start: dict[int, list[int]] = {}
    for k, m in enumerate(masks):
        cols = m.bool().any(0)
        start = int(dst_layer[cols].min()) if bool(cols.any()) else g.n_layers
        by_start.setdefault(start, []).append(k)
    for start, ks in by_start.items():
        for i in range(0, len(ks), _MASKS_PER_CALL):
            block = ks[i:i + _MASKS_PER_CALL]
            out[block] = setup.evaluate_prompts(torch.stack([masks[k] for k in block]), start_layer=start)
    return out


def _baselines(setup: PatchSetup) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt m_i(M) and m_i(∅), each ``[n_prompts]``."""
    g = setup.graph
    vals = setup.evaluate_prompts(torch.stack([torch.zeros(len(g.sources), len(g.dests)), g.mask()]))
    return vals[0], vals[1]


def _node_index(setup: PatchSetup, node: str) -> int:
    g = setup.graph
    if node in ("embed", "logits") or node not in g.sources:
        heads = f"a0.0..a{g.n_layers - 1}.{g.n_heads - 1}"
        mlps = f", m0..m{g.n_layers - 1}" if g.has_mlp else ""
        raise InputError(f"node {node!r} is not a head or MLP of this model ({heads}{mlps})")
    return g.sources.index(node)


def _out_edges(setup: PatchSetup, node: str) -> tuple[int | None, list[int]]:
    """The node's edge to ``logits`` (None when there is none) and its other outgoing edges, in graph order."""
    g = setup.graph
    s = _node_index(setup, node)
    logits = len(g.dests) - 1
    direct, indirect = None, []
    for e, (src, dst) in enumerate(zip(g.edge_src, g.edge_dst, strict=True)):
        if src == s:
            if dst == logits:
                direct = e
            else:
                indirect.append(e)
    return direct, indirect


class Spread(BaseModel):
    """Summary statistics of per-prompt values."""

    n: int
    mean: float
    median: float
    std: float = Field(description="population standard deviation (0 with one value)")
    p10: float
    p90: float
    min: float
    max: float


def _quantile(sorted_vals: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of sorted values."""
    pos = q * (len(sorted_vals) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def spread(values: Sequence[float]) -> Spread | None:
    """Mean, median, std, 10th/90th percentile, min and max of ``values``; None when empty."""
    if not values:
        return None
    v = sorted(float(x) for x in values)
    return Spread(n=len(v), mean=statistics.fmean(v), median=statistics.median(v), std=statistics.pstdev(v),
                  p10=_quantile(v, 0.1), p90=_quantile(v, 0.9), min=v[0], max=v[-1])


# ============================================================================= 1. mediation
class MediatorEffect(BaseModel):
    edge: Edge
    effect: float = Field(description="m(M) - m(only this edge patched)")
    fraction: float = Field(description="effect / (m(M) - m(∅))")


class NodeMediation(BaseModel):
    """TE, NDE, NIE and their interaction for one node, in metric units and in units of the full effect."""

    node: str
    direct_edge: Edge | None = Field(description="the node's edge to logits (None: no direct path, NDE = 0)")
    n_indirect_edges: int
    total: float = Field(description="TE = m(M) - m(all outgoing edges patched)")
    direct: float = Field(description="NDE = m(M) - m(only node -> logits patched)")
    indirect: float = Field(description="NIE = m(M) - m(all outgoing edges but node -> logits patched)")
    interaction: float = Field(description="TE - NDE - NIE: 0 when direct and indirect paths add at the output")
    total_frac: float
    direct_frac: float
    indirect_frac: float
    interaction_frac: float
    ratio: float | None = Field(description="NIE / TE: 1 = entirely indirect, 0 = entirely direct; None when |TE| "
                                            "is too small (see ratio_note)")
    ratio_note: str = ""
    mediators: list[MediatorEffect] | None = Field(
        default=None, description="per indirect edge, the effect of patching it alone (with per_edge=True)")
    mediator_interaction: float | None = Field(
        default=None, description="NIE - sum of the mediators' effects: 0 when the indirect paths add up")


class MediationResult(BaseModel):
    ablation: Ablation
    metric: PatchMetric
    level: CausalLevel = LEVEL
    n_prompts: int
    m_clean: float
    m_ablated: float
    effect: float = Field(description="m(M) - m(∅)")
    min_total: float = Field(description="ratio reported when |TE| >= min_total x |m(M) - m(∅)|")
    nodes: list[NodeMediation]
    evaluations: int = Field(description="patched edge sets evaluated")
    seconds: float

    def by_node(self) -> dict[str, NodeMediation]:
        return {n.node: n for n in self.nodes}

    def summary_text(self, top_n: int = 12) -> str:
        head = (f"causal mediation per node ({self.ablation.value} ablation, edge patching, metric "
                f"{self.metric.value}, {self.n_prompts} prompts; fractions of m(M)-m(∅) = {self.effect:.4g}): "
                "TE total, NDE direct (node->logits only), NIE indirect (through later components), ratio NIE/TE. "
                "Intervention-level evidence.")
        ranked = sorted(self.nodes, key=lambda n: -abs(n.total_frac))[:top_n]
        lines = [f"{n.node}: TE {n.total_frac:+.3f}, NDE {n.direct_frac:+.3f}, NIE {n.indirect_frac:+.3f}, "
                 f"interaction {n.interaction_frac:+.3f}, ratio "
                 f"{'n/a (' + n.ratio_note + ')' if n.ratio is None else f'{n.ratio:.2f}'}" for n in ranked]
        return summary_fit(head, lines)


def mediation(setup: PatchSetup, nodes: Iterable[str] | None = None, *, min_total: float = DEFAULT_MIN_TOTAL,
              per_edge: bool = False) -> MediationResult:
    """TE, NDE, NIE, interaction and NIE/TE for each node (default: every head and MLP), all masks batched.

    Three patched runs per node (two when it has no direct edge), plus one per indirect edge with ``per_edge``.
    Raises :class:`InputError` when ablating everything does not move the metric (every fraction would be 0/0)."""
    t0 = time.perf_counter()
    check_effect(setup)
    if min_total < 0:
        raise InputError(f"min_total must be >= 0 (a fraction of |m(M) - m(∅)|), got {min_total}")
    g = setup.graph
    names = [s for s in g.sources if s != "embed"] if nodes is None else list(dict.fromkeys(nodes))
    if not names:
        raise InputError("give at least one node (a head a{L}.{H} or an MLP m{L})")
    plans = [(n, *_out_edges(setup, n)) for n in names]  # unknown nodes fail before any work
    masks: list[torch.Tensor] = []
    slots: list[dict[str, Any]] = []
    for _, direct, indirect in plans:
        slot: dict[str, Any] = {"total": len(masks)}
        masks.append(g.mask(([] if direct is None else [direct]) + indirect))
        if direct is not None:
            slot["direct"] = len(masks)
            masks.append(g.mask([direct]))
            slot["indirect"] = len(masks)
            masks.append(g.mask(indirect))
        if per_edge:
            slot["edges"] = list(range(len(masks), len(masks) + len(indirect)))
            masks += [g.mask([e]) for e in indirect]
        slots.append(slot)
    values = _prompt_values(setup, masks).mean(1).tolist()
    effect = setup.effect
    m0 = setup.m_clean
    out = []
    for (name, direct, indirect), slot in zip(plans, slots, strict=True):
        te = m0 - values[slot["total"]]
        if direct is None:  # no direct path: NDE is zero by construction, everything goes through mediators
            nde, nie = 0.0, te
        else:
            nde, nie = m0 - values[slot["direct"]], m0 - values[slot["indirect"]]
        inter = te - nde - nie
        ratio, why = None, ""
        if abs(te) < min_total * abs(effect) or te == 0.0:
            why = f"|TE| {abs(te):.3g} < {min_total:g} x |m(M)-m(∅)|"
        else:
            ratio = nie / te
        mediators = mi = None
        if per_edge:
            mediators = [MediatorEffect(edge=g.edges[e], effect=m0 - values[k], fraction=(m0 - values[k]) / effect)
                         for e, k in zip(indirect, slot["edges"], strict=True)]
            mi = nie - sum(m.effect for m in mediators)
        out.append(NodeMediation(
            node=name, direct_edge=None if direct is None else g.edges[direct], n_indirect_edges=len(indirect),
            total=te, direct=nde, indirect=nie, interaction=inter, total_frac=te / effect, direct_frac=nde / effect,
            indirect_frac=nie / effect, interaction_frac=inter / effect, ratio=ratio, ratio_note=why,
            mediators=mediators, mediator_interaction=mi))
    return MediationResult(ablation=setup.ablation, metric=setup.metric, n_prompts=setup.n_prompts, m_clean=m0,
                           m_ablated=setup.m_ablated, effect=effect, min_total=min_total, nodes=out,
                           evaluations=len(masks), seconds=time.perf_counter() - t0)


# ============================================================================= 2. per-prompt effects
class PromptShares(BaseModel):
    """A circuit's recovered share per prompt, and how it spreads."""

    n_prompts: int
    n_used: int
    n_excluded: int = Field(description="prompts whose own effect is below min_prompt_effect x |m(M) - m(∅)|")
    excluded: list[int] = Field(description="their row indices")
    min_prompt_effect: float
    faithfulness: float = Field(description="the ratio of means (m(C) - m(∅)) / (m(M) - m(∅)) over all prompts")
    shares: list[float | None] = Field(description="per prompt (task row order); None = excluded")
    spread: Spread | None = Field(description="of the used prompts' shares; None when none is left")
    share_at_least_half: float | None = Field(description="share of used prompts whose share is >= 0.5")
    note: str = ""

    def summary_text(self) -> str:
        if self.spread is None:
            return f"per-prompt circuit shares: none computable ({self.note})"
        s = self.spread
        return (f"per-prompt circuit shares over {self.n_used}/{self.n_prompts} prompts ({self.n_excluded} with ~0 "
                f"own effect left out): mean {s.mean:.3f}, median {s.median:.3f}, std {s.std:.3f}, p10 {s.p10:.3f}, "
                f"p90 {s.p90:.3f}; >= 0.5 on {self.share_at_least_half:.0%} of prompts (faithfulness, the ratio of "
                f"means: {self.faithfulness:.3f}). Intervention-level evidence.")


def _check_min(name: str, value: float) -> None:
    if not 0 <= value < 1:
        raise InputError(f"{name} must be in [0, 1) (a fraction of the effect), got {value}")


def circuit_per_prompt(setup: PatchSetup, keep: Keep, *,
                       min_prompt_effect: float = DEFAULT_MIN_PROMPT_EFFECT) -> PromptShares:
    """Per prompt i, ``(m_i(C) - m_i(∅)) / (m_i(M) - m_i(∅))`` for the circuit ``keep`` (edge indices or a
    :class:`~autoexplain.tools.circuits.Circuit` on this graph), every edge outside it patched. Two batched
    evaluations (m(∅) and m(C)); the clean values are cached."""
    check_effect(setup)
    _check_min("min_prompt_effect", min_prompt_effect)
    g = setup.graph
    kept = set(kept_edges(setup, keep))
    vals = _prompt_values(setup, [g.mask(), g.mask([e for e in range(g.n_edges) if e not in kept])])
    m_none, m_c = vals[0], vals[1]
    m_full = setup.evaluate_prompts(None)[0]
    own = m_full - m_none
    floor = min_prompt_effect * abs(setup.effect)
    shares: list[float | None] = []
    excluded = []
    for i in range(setup.n_prompts):
        if abs(float(own[i])) < floor or abs(float(own[i])) == 0.0:
            shares.append(None)
            excluded.append(i)
        else:
            shares.append(float((m_c[i] - m_none[i]) / own[i]))
    used = [s for s in shares if s is not None]
    faith = float((m_c.mean() - m_none.mean()) / (m_full.mean() - m_none.mean()))
    note = "" if used else f"every prompt's own effect is below {floor:.3g}: no per-prompt share is defined"
    return PromptShares(n_prompts=setup.n_prompts, n_used=len(used), n_excluded=len(excluded), excluded=excluded,
                        min_prompt_effect=min_prompt_effect, faithfulness=faith, shares=shares, spread=spread(used),
                        share_at_least_half=(sum(s >= 0.5 for s in used) / len(used)) if used else None, note=note)


class NodeClaim(BaseModel):
    """Does "noising the node moves the metric toward the ablated run" hold prompt by prompt?"""

    node: str
    claim: str
    holds_share: float | None = Field(description="share of used prompts on which it holds; None when none is used")
    n_holds: int
    n_used: int
    n_excluded: int
    min_drop: float
    drops: list[float | None] = Field(description="per prompt (m_i(M) - m_i(node noised)) / (m_i(M) - m_i(∅))")
    spread: Spread | None


def node_claims(setup: PatchSetup, nodes: Iterable[str], *, min_drop: float = DEFAULT_MIN_DROP,
                min_prompt_effect: float = DEFAULT_MIN_PROMPT_EFFECT) -> list[NodeClaim]:
    """For each node, on each prompt: the drop when every outgoing edge of the node is patched, as a fraction of the
    prompt's own effect; the claim holds on that prompt when the drop is at least ``min_drop``. One batched
    evaluation per node."""
    check_effect(setup)
    _check_min("min_drop", min_drop)
    _check_min("min_prompt_effect", min_prompt_effect)
    names = list(dict.fromkeys(nodes))
    if not names:
        raise InputError("give at least one node (a head a{L}.{H} or an MLP m{L})")
    g = setup.graph
    masks = []
    for n in names:
        direct, indirect = _out_edges(setup, n)
        masks.append(g.mask(([] if direct is None else [direct]) + indirect))
    vals = _prompt_values(setup, masks)
    m_full, m_none = _baselines(setup)
    own = m_full - m_none
    floor = min_prompt_effect * abs(setup.effect)
    ok = [abs(float(own[i])) >= floor and float(own[i]) != 0.0 for i in range(setup.n_prompts)]
    out = []
    for k, n in enumerate(names):
        drops: list[float | None] = [float((m_full[i] - vals[k, i]) / own[i]) if ok[i] else None
                                     for i in range(setup.n_prompts)]
        used = [d for d in drops if d is not None]
        holds = sum(d >= min_drop for d in used)
        out.append(NodeClaim(node=n, claim=f"noising {n} moves the metric toward the ablated run by >= {min_drop:g} "
                                           "of the prompt's own effect",
                             holds_share=holds / len(used) if used else None, n_holds=holds, n_used=len(used),
                             n_excluded=setup.n_prompts - len(used), min_drop=min_drop, drops=drops,
                             spread=spread(used)))
    return out


# ============================================================================= 3. held-out scores
class PartScores(BaseModel):
    """One part of a split: the circuit's faithfulness there (None, with the reason, when undefined)."""

    rows: list[int]
    m_clean: float
    m_ablated: float
    faithfulness: float | None
    prompts: PromptShares | None
    note: str = ""


def _score_part(setup: PatchSetup, rows: list[int], keep: list[int]) -> PartScores:
    try:
        check_effect(setup)
    except InputError as exc:
        return PartScores(rows=rows, m_clean=setup.m_clean, m_ablated=setup.m_ablated, faithfulness=None,
                          prompts=None, note=str(exc))
    shares = circuit_per_prompt(setup, keep)
    return PartScores(rows=rows, m_clean=setup.m_clean, m_ablated=setup.m_ablated, faithfulness=shares.faithfulness,
                      prompts=shares)


class HeldOutResult(BaseModel):
    method: Method
    ablation: Ablation
    metric: PatchMetric
    level: CausalLevel = LEVEL
    seed: int
    fraction: float
    n_edges: int
    n_edges_total: int
    edges: list[Edge] = Field(description="the circuit found on the fit part")
    fit: PartScores = Field(description="in-sample: the prompts the circuit was found on")
    held_out: PartScores = Field(description="the other prompts, a fresh setup")
    gap: float | None = Field(description="in-sample minus held-out faithfulness")
    seconds: float

    def summary_text(self) -> str:
        def f(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.3f}"

        def med(p: PartScores) -> str:
            return "n/a" if p.prompts is None or p.prompts.spread is None else f"{p.prompts.spread.median:.3f}"

        return (f"held-out check of a {self.method.value} circuit ({self.n_edges}/{self.n_edges_total} edges, "
                f"{self.ablation.value} ablation, metric {self.metric.value}): found on {len(self.fit.rows)} prompts, "
                f"faithfulness {f(self.fit.faithfulness)} there (median per prompt {med(self.fit)}); on "
                f"{len(self.held_out.rows)} held-out prompts {f(self.held_out.faithfulness)} (median "
                f"{med(self.held_out)}); gap {f(self.gap)}. Intervention-level evidence."
                + (f" Held-out: {self.held_out.note}" if self.held_out.note else ""))

    def scores(self) -> list[Score]:
        """``heldout_faithfulness`` and ``insample_faithfulness`` rows for the store (details: the split)."""
        common = {"ablation": self.ablation.value, "patch_type": "edge", "metric": self.metric.value,
                  "method": self.method.value, "seed": self.seed, "fraction": self.fraction,
                  "n_edges": self.n_edges}
        rows = []
        for name, part in (("insample_faithfulness", self.fit), ("heldout_faithfulness", self.held_out)):
            extra: dict[str, Any] = {"rows": part.rows, "m_clean": part.m_clean, "m_ablated": part.m_ablated}
            if part.prompts is not None and part.prompts.spread is not None:
                extra |= {"per_prompt_median": part.prompts.spread.median,
                          "per_prompt_at_least_half": part.prompts.share_at_least_half}
            if part.note:
                extra["unscored"] = part.note
            rows.append(Score(metric=name, value=part.faithfulness, n=len(part.rows), details={**common, **extra}))
        return rows


def _metric(task_metric: PatchMetric | str | None, task: TokenizedTask) -> PatchMetric:
    return default_metric_for(task) if task_metric is None else PatchMetric(task_metric)


def held_out(lm: LoadedModel, task: TokenizedTask, method: Method | str, *,
             ablation: Ablation | str = Ablation.RESAMPLE, metric: PatchMetric | str | None = None,
             position: int | None = None, fraction: float = 0.5,
             seed: int = 0, top_k: int | None = None, threshold: float | None = None,
             steps: int = DEFAULT_STEPS) -> HeldOutResult:
    """Find the circuit with ``method`` on a seeded ``fraction`` of ``task``'s prompts (a
    :class:`~autoexplain.tools.data.TokenizedTask`) and score the same edges on the rest with a fresh setup.

    ``metric`` defaults to ``logit_diff`` (``answer_prob`` when a prompt has no wrong answers) for every method,
    so the two parts are comparable. Raises :class:`InputError` for tasks with fewer than 2 prompts on a side, or
    when the fit part's ablation does not move the metric; a held-out part without effect gives faithfulness None
    with the reason."""
    t0 = time.perf_counter()
    fit_rows, test_rows = task.split(fraction, seed)
    m = _metric(metric, task)
    fit_setup = PatchSetup(lm, task.subset(fit_rows), ablation=ablation, metric=m, position=position)
    circuit = find_circuit(fit_setup, method, top_k=top_k, threshold=threshold, steps=steps, curve=False)
    keep = [i for i, k in enumerate(circuit.in_circuit) if k]
    test_setup = PatchSetup(lm, task.subset(test_rows), ablation=ablation, metric=m, position=position)
    fit, test = _score_part(fit_setup, fit_rows, keep), _score_part(test_setup, test_rows, keep)
    gap = None if fit.faithfulness is None or test.faithfulness is None else fit.faithfulness - test.faithfulness
    return HeldOutResult(method=Method(method), ablation=fit_setup.ablation, metric=m, seed=seed, fraction=fraction,
                         n_edges=len(keep), n_edges_total=fit_setup.graph.n_edges,
                         edges=[fit_setup.graph.edges[e] for e in keep], fit=fit, held_out=test, gap=gap,
                         seconds=time.perf_counter() - t0)


# ============================================================================= 4. robustness
def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman rank correlation (Pearson on average ranks); None when either side is constant."""
    if len(a) != len(b):
        raise ValueError("spearman needs two sequences of the same length")
    ra, rb = average_ranks(a), average_ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return None if va == 0 or vb == 0 else cov / math.sqrt(va * vb)


def jaccard(a: set[int], b: set[int]) -> float:
    """|a ∩ b| / |a ∪ b|; two empty sets are identical (1.0)."""
    return 1.0 if not a and not b else len(a & b) / len(a | b)


class ResampleRun(BaseModel):
    index: int
    rows: list[int] = Field(description="the task rows of this resample")
    n_edges: int
    jaccard: float = Field(description="edge Jaccard against the full-data circuit")
    spearman: float | None = Field(description="Spearman of all edge scores against the full-data scores")
    faithfulness_on_full: float | None = Field(description="this resample's circuit scored on all prompts")
    seconds: float


class EdgeStability(BaseModel):
    edge: Edge
    kept_in: int = Field(description="resamples whose circuit has the edge")
    in_full: bool


class RobustnessResult(BaseModel):
    method: Method
    ablation: Ablation
    metric: PatchMetric
    level: CausalLevel = LEVEL
    seed: int
    n_resamples: int
    fraction: float
    n_prompts: int
    full_edges: list[Edge]
    full_faithfulness: float
    runs: list[ResampleRun]
    jaccard_mean: float
    jaccard_min: float
    spearman_mean: float | None = Field(description="None when some resample's scores were constant")
    spearman_min: float | None
    always: list[Edge] = Field(description="edges in every resample's circuit")
    sometimes: list[EdgeStability] = Field(description="edges in some circuits (resamples or full) but not all")
    seconds_full: float = Field(description="the full-data search")
    seconds_total: float

    def summary_text(self) -> str:
        sp = "n/a" if self.spearman_mean is None else f"{self.spearman_mean:.3f} (min {self.spearman_min:.3f})"
        unstable = [f"{s.edge} ({s.kept_in}/{self.n_resamples}{', full' if s.in_full else ''})"
                    for s in self.sometimes[:10]]
        return (f"robustness of a {self.method.value} circuit ({len(self.full_edges)} edges, {self.ablation.value} "
                f"ablation, metric {self.metric.value}) over {self.n_resamples} resamples of "
                f"{self.fraction:.0%} of {self.n_prompts} prompts: edge Jaccard vs full {self.jaccard_mean:.3f} (min "
                f"{self.jaccard_min:.3f}), score Spearman {sp}; {len(self.always)} edges kept in every resample"
                + (f"; unstable: {', '.join(unstable)}" if unstable else "")
                + f". {self.seconds_total:.1f} s. Intervention-level evidence.")

    def scores(self) -> list[Score]:
        """``robustness_jaccard`` (mean, min in details) and ``robustness_spearman`` rows for the store."""
        common = {"ablation": self.ablation.value, "patch_type": "edge", "metric": self.metric.value,
                  "method": self.method.value, "seed": self.seed, "fraction": self.fraction,
                  "n_prompts": self.n_prompts}
        return [Score(metric="robustness_jaccard", value=self.jaccard_mean, n=self.n_resamples,
                      details={**common, "min": self.jaccard_min, "always": [str(e) for e in self.always][:50],
                               "unstable": {str(s.edge): s.kept_in for s in self.sometimes[:50]}}),
                Score(metric="robustness_spearman", value=self.spearman_mean, n=self.n_resamples,
                      details={**common, "min": self.spearman_min,
                               **({} if self.spearman_mean is not None else
                                  {"unscored": "some resample scored every edge the same"})})]


def robustness(lm: LoadedModel, task: TokenizedTask, method: Method | str, *, n_resamples: int = DEFAULT_RESAMPLES,
               fraction: float = DEFAULT_RESAMPLE_FRACTION, seed: int = 0,
               ablation: Ablation | str = Ablation.RESAMPLE, metric: PatchMetric | str | None = None,
               position: int | None = None, top_k: int | None = None, threshold: float | None = None,
               steps: int = DEFAULT_STEPS) -> RobustnessResult:
    """Rerun the circuit search on ``n_resamples`` seeded subsets (``fraction`` of the prompts each, at least 2)
    of ``task`` and compare each circuit with the one found on all prompts.

    Cost: ``n_resamples + 1`` searches (each resample on ``fraction`` of the prompts) plus one batched
    faithfulness evaluation per resample (see :data:`DEFAULT_RESAMPLES`). ``metric`` defaults as in
    :func:`held_out`. Raises :class:`InputError` when a resample would have fewer than 2 prompts or all of them."""
    t_all = time.perf_counter()
    if n_resamples < 1:
        raise InputError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0 < fraction < 1:
        raise InputError(f"fraction must be in (0, 1) (the share of prompts per resample), got {fraction}")
    n = task.n_prompts
    size = round(n * fraction)
    if size < 2 or size >= n:
        raise InputError(f"resamples of {fraction:g} of {n} prompts have {size}; each needs at least 2 prompts and "
                         "fewer than all: use a task with more prompts or another fraction")
    m = _metric(metric, task)
    full_setup = PatchSetup(lm, task, ablation=ablation, metric=m, position=position)
    t0 = time.perf_counter()
    full = find_circuit(full_setup, method, top_k=top_k, threshold=threshold, steps=steps, curve=False)
    seconds_full = time.perf_counter() - t0
    full_set = {i for i, k in enumerate(full.in_circuit) if k}
    g = full_setup.graph
    rng = random.Random(f"mechanism-resample:{seed}")
    runs, sets, resample_masks = [], [], []
    for r in range(n_resamples):
        t0 = time.perf_counter()
        rows = sorted(rng.sample(range(n), size))
        setup = PatchSetup(lm, task.subset(rows), ablation=ablation, metric=m, position=position)
        c = find_circuit(setup, method, top_k=top_k, threshold=threshold, steps=steps, curve=False)
        kept = {i for i, k in enumerate(c.in_circuit) if k}
        sets.append(kept)
        resample_masks.append(g.mask([e for e in range(g.n_edges) if e not in kept]))
        runs.append(ResampleRun(index=r, rows=rows, n_edges=len(kept), jaccard=jaccard(kept, full_set),
                                spearman=spearman(c.scores.scores, full.scores.scores), faithfulness_on_full=None,
                                seconds=time.perf_counter() - t0))
    faith = ((_prompt_values(full_setup, resample_masks).mean(1) - full_setup.m_ablated) / full_setup.effect).tolist()
    runs = [r.model_copy(update={"faithfulness_on_full": f}) for r, f in zip(runs, faith, strict=True)]
    counts = [sum(e in s for s in sets) for e in range(g.n_edges)]
    always = [g.edges[e] for e in range(g.n_edges) if counts[e] == n_resamples]
    sometimes = [EdgeStability(edge=g.edges[e], kept_in=counts[e], in_full=e in full_set) for e in range(g.n_edges)
                 if (0 < counts[e] < n_resamples) or (counts[e] == 0 and e in full_set)]
    sometimes.sort(key=lambda s: (-s.kept_in, str(s.edge)))
    jac = [r.jaccard for r in runs]
    sp = [r.spearman for r in runs]
    sp_ok = [s for s in sp if s is not None]
    return RobustnessResult(
        method=Method(method), ablation=full_setup.ablation, metric=m, seed=seed, n_resamples=n_resamples,
        fraction=fraction, n_prompts=n, full_edges=[g.edges[e] for e in sorted(full_set)],
        full_faithfulness=full.faithfulness, runs=runs, jaccard_mean=statistics.fmean(jac), jaccard_min=min(jac),
        spearman_mean=statistics.fmean(sp_ok) if len(sp_ok) == len(sp) else None,
        spearman_min=min(sp_ok) if len(sp_ok) == len(sp) else None, always=always, sometimes=sometimes,
        seconds_full=seconds_full, seconds_total=time.perf_counter() - t_all)
