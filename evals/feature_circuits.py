"""Scores of a sparse feature circuit: sufficiency (faithfulness), necessity, completeness, and ROC AUC of node
and edge scores against a planted ground truth.

Every number here is **interventional**: a node set S is evaluated by running the clean prompts with every node
*outside* S at its value on the corrupt prompt (resample ablation; SAE error terms are nodes and are ablated like
features) while the nodes in S are computed from their possibly changed inputs
(:meth:`autoexplain.tools.feature_circuits.SplicedModel.evaluate`). ``m(S)`` is the metric of that run, M the set of
all nodes, C the circuit, ∅ the empty set (the corrupt run).

* **sufficiency = faithfulness** ``F(C) = (m(C) - m(∅)) / (m(M) - m(∅))``: 1 when the circuit alone reproduces the
  behaviour. Marks et al.'s faithfulness.
* **necessity** ``1 - F(M∖C)``: the share of the effect lost when only the circuit's nodes are ablated (Marks et
  al. report ``F(M∖C)`` itself as their "completeness": near 0 when nothing outside the circuit can do the task;
  it is kept as ``complement_faithfulness``).
* **completeness** (IOI-style, as for head circuits: :mod:`autoexplain.evals.circuits`): for knock-out sets
  K ⊆ C, ``gap(K) = |F(C∖K) - F(M∖K)|``; K = ∅, K = C, every single node of C (up to ``max_single``) and
  ``n_subsets`` random halves; ``completeness = max(0, 1 - worst gap)``. Sampling can miss the worst K, so this is an
  upper bound.
* ROC AUC against ground truth: nodes scored by ``|effect|``; edges by ``|weight|`` over every *candidate* edge
  (every node of an earlier site, or ``embed``, into every node of a later site, and every node into ``logits``),
  an edge never computed counting as weight 0.

Caveat: all of these hold under resample ablation, this metric and these prompts; under zero or mean ablation, or
another metric, the numbers differ and are not comparable.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

from pydantic import BaseModel, Field

from autoexplain.evals.circuits import rank_auc
from autoexplain.tools.errors import InputError
from autoexplain.tools.feature_circuits import FeatureCircuit, SplicedModel

DEFAULT_N_SUBSETS = 10
DEFAULT_MAX_SINGLE = 24


class FeatureCircuitScores(BaseModel):
    n_nodes: int = Field(description="nodes in the circuit (logits excluded)")
    m_clean: float
    m_ablated: float
    faithfulness: float | None = Field(description="F(C); None for an empty circuit")
    complement_faithfulness: float = Field(description="F(M∖C): what the rest of the model does without the circuit")
    necessity: float = Field(description="1 - F(M∖C)")
    completeness: float | None = Field(description="max(0, 1 - worst |F(C∖K) - F(M∖K)|); None for an empty circuit")
    worst_gap: float | None
    worst_knockout: list[str] = Field(default_factory=list)
    n_knockouts: int = 0
    ablation: str = "resample"
    metric: str

    def summary(self) -> str:
        def f(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.3f}"

        return (f"{self.n_nodes} nodes: sufficiency (faithfulness) {f(self.faithfulness)}, necessity "
                f"{f(self.necessity)}, completeness {f(self.completeness)} (worst gap {f(self.worst_gap)} over "
                f"{self.n_knockouts} knock-outs); {self.ablation} ablation of every node outside, error terms "
                f"included; metric {self.metric}")


def faithfulness_many(sm: SplicedModel, node_sets: Sequence[Iterable[str]], m_clean: float,
                      m_ablated: float, *, invert: Sequence[bool] | None = None) -> list[float]:
    """F(S) of each node set (``invert[k]``: set k names the nodes ablated, everything else runs)."""
    effect = m_clean - m_ablated
    if effect == 0:
        raise InputError("m(M) = m(∅): faithfulness is undefined when the corrupt prompts do not change the metric")
    return [(m - m_ablated) / effect for m in sm.evaluate(node_sets, invert=invert)]


def score_feature_circuit(sm: SplicedModel, circuit: FeatureCircuit, *, n_subsets: int = DEFAULT_N_SUBSETS,
                          max_single: int = DEFAULT_MAX_SINGLE, seed: int = 0) -> FeatureCircuitScores:
    """Sufficiency, necessity and IOI-style completeness of ``circuit`` on the prompts of ``sm`` (which may be a
    held-out set: node keys are independent of the prompts)."""
    m_clean, m_ablated = sm.evaluate([[], []], invert=[True, False])
    kept = sorted(k for k in circuit.kept_keys() if k != "logits")
    knockouts: list[list[str]] = []
    if kept:
        knockouts.append([])
        knockouts.append(list(kept))
        knockouts += [[k] for k in kept[:max_single]]
        rng = random.Random(f"feature-completeness:{seed}")
        seen = {tuple(k) for k in knockouts}
        for _ in range(n_subsets):
            if len(kept) < 2:
                break
            sub = tuple(sorted(rng.sample(kept, max(1, len(kept) // 2))))
            if sub not in seen:
                seen.add(sub)
                knockouts.append(list(sub))
    sets: list[list[str]] = [kept]  # inverted: M∖C (everything but the circuit runs)
    invert = [True]
    for k in knockouts:
        ks = set(k)
        sets += [[x for x in kept if x not in ks], list(k)]  # C∖K; and M∖K (inverted)
        invert += [False, True]
    values = faithfulness_many(sm, sets, m_clean, m_ablated, invert=invert)
    complement = values[0]
    faith = worst = None
    worst_k: list[str] = []
    if kept:
        faith = values[1]  # C∖∅ = C
        gaps = [abs(values[1 + 2 * i] - values[2 + 2 * i]) for i in range(len(knockouts))]
        j = max(range(len(gaps)), key=gaps.__getitem__)
        worst, worst_k = gaps[j], knockouts[j]
    return FeatureCircuitScores(n_nodes=len(kept), m_clean=m_clean, m_ablated=m_ablated, faithfulness=faith,
                                complement_faithfulness=complement, necessity=1 - complement,
                                completeness=None if worst is None else max(0.0, 1 - worst), worst_gap=worst,
                                worst_knockout=worst_k, n_knockouts=len(knockouts), metric=sm.metric.value)


# ============================================================================= against ground truth
def node_roc_auc(circuit: FeatureCircuit, true_nodes: Iterable[str]) -> float | None:
    """ROC AUC of |node effect| for membership in ``true_nodes`` (``logits`` ignored; every true node must be a
    node of the circuit's graph)."""
    truth = {k for k in true_nodes if k != "logits"}
    keys = [n.key for n in circuit.nodes]
    unknown = sorted(truth - set(keys))
    if unknown:
        raise InputError(f"ground-truth nodes {unknown[:5]} are not nodes of this feature circuit")
    return rank_auc([abs(n.effect) for n in circuit.nodes], [n.key in truth for n in circuit.nodes])


def candidate_edges(sm: SplicedModel, circuit: FeatureCircuit) -> list[tuple[str, str]]:
    """Every edge the linear approximation could give: a node of an earlier site into a node of a later site, and
    every node into ``logits``."""
    site_of = {n.key: (0 if n.node.site is None or n.node.kind.value == "embed" else
                       1 + [str(s) for s in circuit.sites].index(str(n.node.site))) for n in circuit.nodes}
    keys = [n.key for n in circuit.nodes]
    out = [(s, d) for s in keys for d in keys if site_of[s] < site_of[d]]
    return out + [(s, "logits") for s in keys]


def edge_roc_auc(sm: SplicedModel, circuit: FeatureCircuit, true_edges: Iterable[str]) -> float | None:
    """ROC AUC of |edge weight| for membership in ``true_edges`` (``'SRC->DST'`` keys) over every candidate edge;
    edges the search did not compute count as 0 (find the circuit with ``all_edges`` for a fair curve)."""
    weights = {(e.src, e.dst): abs(e.weight) for e in circuit.edges}
    cands = candidate_edges(sm, circuit)
    truth = set(true_edges)
    names = {f"{s}->{d}" for s, d in cands}
    unknown = sorted(truth - names)
    if unknown:
        raise InputError(f"ground-truth edges {unknown[:5]} are not candidate edges of this feature circuit")
    return rank_auc([weights.get(c, 0.0) for c in cands], [f"{s}->{d}" in truth for s, d in cands])
