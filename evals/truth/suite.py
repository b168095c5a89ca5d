"""The ground-truth suite: does the search find planted circuits, and do labels name planted features?

Two parts, both offline and deterministic:

* **Planted circuits** (:mod:`.planted_circuits`: hand-set weights, so the true edge set is known exactly): every
  search method (EAP, EAP-IG, ACDC) runs under resample ablation with the task's default metric; each found
  circuit is scored (:func:`autoexplain.evals.circuits.score_circuit`) against the planted edges — edge ROC AUC of
  the search's scores, recall and precision of the kept edges, faithfulness, completeness, succinctness.
* **Planted features** (:mod:`.planted_features`: an SAE whose features fire exactly on known words): the agent
  (offline policy, run by ``autoexplain bench truth``) labels every feature; :func:`judge_label` says whether the
  final label is right — it names the feature's category, or lists at least three of its words (all of them
  when it has fewer), and names no word of another feature; dead features must be labelled dead.

This module holds what does not need the agent (the circuit cases and the label check); the CLI command in
``agent/`` runs the agent on the planted features and stores everything as a ``bench`` run.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

#: Category words a label may use for each default planted feature (stems; matched case-insensitively).
CATEGORY_WORDS: Mapping[int, tuple[str, ...]] = {0: ("animal",), 1: ("colour", "color"), 2: ("name", "person",
                                                                                               "people")}


class CircuitCase(BaseModel):
    """One planted circuit found by one method, scored against the truth."""

    case: str
    method: str
    n_edges: int
    n_edges_total: int
    n_true: int
    edge_roc_auc: float | None
    recall: float | None
    precision: float | None
    faithfulness: float
    completeness: float | None
    succinctness: float | None
    seconds: float


def circuit_cases(methods: Sequence[str] | None = None) -> list[tuple[CircuitCase, Any, Any, Any]]:
    """Run every method on every planted circuit: (case row, setup, circuit, CircuitScores) each."""
    from autoexplain.evals.circuits import score_circuit
    from autoexplain.evals.truth.planted_circuits import induction, suppression
    from autoexplain.tools.circuits import default_metric, find_circuit
    from autoexplain.tools.patching import PatchSetup
    from autoexplain.tools.vocab import Ablation, Method

    out = []
    for planted in (induction(), suppression()):
        for method in [Method(m) for m in (methods or [m.value for m in Method])]:
            t0 = time.perf_counter()
            setup = PatchSetup(planted.lm, planted.task, ablation=Ablation.RESAMPLE,
                               metric=default_metric(method, planted.task))
            circ = find_circuit(setup, method)
            sc = score_circuit(setup, circ, true_edges=planted.planted)
            case = CircuitCase(case=planted.name, method=method.value, n_edges=circ.n_edges,
                               n_edges_total=len(circ.scores.edges), n_true=len(planted.planted),
                               edge_roc_auc=sc.edge_roc_auc, recall=sc.edge_recall, precision=sc.edge_precision,
                               faithfulness=sc.faithfulness, completeness=sc.completeness,
                               succinctness=sc.succinctness, seconds=time.perf_counter() - t0)
            out.append((case, setup, circ, sc))
    return out


class FeatureCase(BaseModel):
    """One planted feature, its final label, and whether the label is right."""

    feature: int
    truth: str  # the planted words, or 'dead'
    label: str | None
    correct: bool
    correctness: float | None = None
    completeness: float | None = None
    succinctness: float | None = None
    dead: bool
    flagged_dead: bool


def _named(label: str) -> set[str]:
    """The words a label names: its quoted strings if it quotes any, else its words."""
    quoted = [next(g for g in m if g) for m in re.findall(r"'([^']+)'|\"([^\"]+)\"", label)]
    if quoted:
        return {q.strip().lower() for q in quoted}
    return {w.lower() for w in re.findall(r"[A-Za-z0-9]+", label)}


def judge_label(feature: int, label: str | None, features: Mapping[int, Sequence[str]],
                dead: Sequence[int]) -> bool:
    """Is ``label`` a right description of planted feature ``feature`` (see the module docstring)?"""
    if label is None:
        return False
    is_dead_label = label.lower().startswith("dead feature")
    if feature in dead:
        return is_dead_label
    if is_dead_label:
        return False
    words = _named(label)
    own = {w.strip().lower() for w in features[feature]}
    others = {w.strip().lower() for f, ws in features.items() if f != feature for w in ws} - own
    if words & others:
        return False
    if any(re.search(rf"\b{c}", label.lower()) for c in CATEGORY_WORDS.get(feature, ())):
        return True
    return len(words & own) >= min(3, len(own))
