"""Domain results turned into rows: the one place that decides which column a value of a tool or scorer lands in.

Tools and scorers return domain objects (a :class:`~autoexplain.tools.circuits.Circuit`, feature statistics,
scores, judgements); these functions map them onto the declared tables (:mod:`autoexplain.agent.store.schema`) and
return ``{table: rows}`` for :meth:`Store.upsert_many` or an outbox.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from autoexplain.agent.store.schema import (
    CausalTraceCellRow,
    CausalTraceRow,
    CircuitEdgeRow,
    CircuitNodeRow,
    CircuitRow,
    ExplanationRow,
    FeatureCircuitEdgeRow,
    FeatureCircuitNodeRow,
    FeatureCircuitRow,
    FeatureExampleRow,
    HeadRoleRow,
    JudgementSetRow,
    ScoreRow,
)
from autoexplain.tools.vocab import Edge, Explanation

if TYPE_CHECKING:
    from autoexplain.evals.circuits import CircuitScores
    from autoexplain.evals.claims import ClaimCheck
    from autoexplain.evals.feature_circuits import FeatureCircuitScores
    from autoexplain.evals.features import Example, ExampleJudgement, FeatureScores
    from autoexplain.evals.mechanism import MediationResult, NodeClaim
    from autoexplain.evals.scores import Score
    from autoexplain.tools.circuits import Circuit
    from autoexplain.tools.feature_circuits import FeatureCircuit
    from autoexplain.tools.heads import RoleTable
    from autoexplain.tools.tracing import TraceGrid


def utc_now() -> dt.datetime:
    """The current UTC time without a zone (DuckDB ``timestamp``)."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def explanation_row(explanation_id: str, run_id: str, item_id: str, expl: Explanation, *,
                    hypothesis_id: str | None = None, dead: bool = False) -> ExplanationRow:
    """A draft explanation's ``explanations`` row (not final; the agent marks its choice when it accepts)."""
    return {"explanation_id": explanation_id, "run_id": run_id, "item_id": item_id, "target": expl.target,
            "text": expl.text, "author": expl.author, "llm_model": expl.llm_model,
            "causal_level": expl.causal_level.value,
            "supported_level": expl.supported_level.value if expl.supported_level else None,
            "overclaimed": expl.overclaimed,
            "evidence": {"calls": list(expl.evidence), "hypothesis": hypothesis_id, "dead": dead},
            "is_final": False, "budget_limited": False, "created_at": utc_now()}


def circuit_id(model_id: str, fingerprint: str, method: str, top_k: int | None, threshold: float | None) -> str:
    """Deterministic, so running the same search again replaces its rows instead of adding new ones."""
    key = json.dumps([model_id, fingerprint, method, top_k, threshold])
    return "circ-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def circuit_rows(circuit_id: str, run_id: str, model_id: str, task_name: str, task_path: str, circ: Circuit, *,
                 item_id: str | None = None) -> dict[str, list[CircuitRow] | list[CircuitEdgeRow]]:
    """The ``circuits`` row and every scored edge's ``circuit_edges`` row of one found circuit.

    ``circuit_id`` fixes the model and method, so the edge set (every edge of the model's graph) is the same on
    every re-run: upserts replace each row, none is left over.
    """
    s = circ.scores
    ranks = circ.ranks()
    row: CircuitRow = {
        "circuit_id": circuit_id, "run_id": run_id, "item_id": item_id, "model_id": model_id, "task": task_name,
        "method": s.method.value, "ablation": s.ablation.value, "patch_type": s.patch_type.value,
        "metric": s.metric.value, "threshold": circ.threshold, "top_k": circ.top_k, "n_edges_total": len(s.edges),
        "n_edges": circ.n_edges, "faithfulness": circ.faithfulness, "necessity": circ.necessity,
        "details": {"task_file": task_path, "m_clean": s.m_clean, "m_ablated": s.m_ablated, "seconds": s.seconds,
                    "curve": [p.model_dump() for p in circ.curve], "method_details": s.details,
                    "threshold_is_relative_to": "|m(M) - m(empty)|", "note": circ.note,
                    "pruned": circ.pruned},
        "created_at": utc_now(),
    }
    edges: list[CircuitEdgeRow] = []
    for i, name in enumerate(s.edges):
        edge = Edge.parse(str(name))
        edges.append({"circuit_id": circuit_id, "edge": str(name), "src": str(edge.src), "dst": str(edge.dst),
                      "score": s.scores[i], "in_circuit": circ.in_circuit[i], "rank": ranks[i]})
    return {"circuits": [row], "circuit_edges": edges}


def circuit_node_rows(circuit_id: str, nodes: Sequence[str], in_circuit: set[str], *,
                      mediation: MediationResult | None = None, claims: Sequence[NodeClaim] = (),
                      checks: Sequence[ClaimCheck] = (), roles: RoleTable | None = None) -> list[CircuitNodeRow]:
    """One ``circuit_nodes`` row per node: its mediation (TE, NDE, NIE, interaction, ratio), the share of prompts
    on which noising it hurts, and the role the explanation claims for it with the detector's score and whether
    the claim's intervention check held (several roles claimed for one node: the first, all in details)."""
    med = mediation.by_node() if mediation is not None else {}
    share = {c.node: c.holds_share for c in claims}
    claimed: dict[str, list[ClaimCheck]] = {}
    for c in checks:
        if c.claim.kind == "role":
            claimed.setdefault(c.claim.node, []).append(c)
    scores = {(str(s.node), s.role.value): s.score for s in roles.scores} if roles is not None else {}
    rows: list[CircuitNodeRow] = []
    for n in nodes:
        m = med.get(n)
        mine = claimed.get(n, [])
        first = mine[0] if mine else None
        role = first.claim.role.value if first is not None and first.claim.role is not None else None
        rows.append({
            "circuit_id": circuit_id, "node": n, "in_circuit": n in in_circuit, "role": role,
            "role_score": scores.get((n, role)) if role else None,
            "role_verified": first.verified if first is not None else None,
            "total_effect": m.total if m else None, "direct_effect": m.direct if m else None,
            "indirect_effect": m.indirect if m else None, "interaction": m.interaction if m else None,
            "mediation_ratio": m.ratio if m else None, "prompt_share": share.get(n),
            "details": {"fractions_of_effect": None if m is None else {
                            "total": m.total_frac, "direct": m.direct_frac, "indirect": m.indirect_frac,
                            "interaction": m.interaction_frac},
                        "ratio_note": m.ratio_note if m else None,
                        "claims": [{"role": c.claim.role.value if c.claim.role else None, "verified": c.verified,
                                    "effect": c.effect, "method": c.method, "why": c.why} for c in mine],
                        "ablation": mediation.ablation.value if mediation else None,
                        "metric": mediation.metric.value if mediation else None}})
    return rows


def head_role_rows(model_id: str, table: RoleTable, run_id: str | None = None) -> list[HeadRoleRow]:
    """Every (head, role) score of a role table as ``head_roles`` rows; ``is_best`` marks each head's best role."""
    best = {str(h.node): h.best_role.value if h.best_role else None for h in table.heads}
    now = utc_now()
    return [{"model_id": model_id, "node": str(s.node), "role": s.role.value, "score": s.score,
             "is_best": best.get(str(s.node)) == s.role.value, "details": {**s.details, "cut": table.cut},
             "run_id": run_id, "created_at": now} for s in table.scores]


def trace_rows(trace_id: str, model_id: str, grid: TraceGrid, *, task: str | None = None,
               run_id: str | None = None) -> dict[str, list[CausalTraceRow] | list[CausalTraceCellRow]]:
    """A causal trace's header row (probabilities, noise, the per-prompt detail as JSON) and one
    ``causal_trace_cells`` row per (state, layer, column) of its grids."""
    head: CausalTraceRow = {"trace_id": trace_id, "run_id": run_id, "model_id": model_id, "task": task,
                            "noise": grid.noise_scale, "n_samples": grid.n_samples, "restore_window": grid.window,
                            "p_clean": grid.p_clean, "p_corrupted": grid.p_corrupted,
                            "details": {"noise_multiple": grid.noise, "embed_std": grid.embed_std,
                                        "alignment": grid.alignment, "columns": grid.columns, "seed": grid.seed,
                                        "n_used": grid.n_used, "notes": grid.notes,
                                        "peak": grid.peak.model_dump(mode="json") if grid.peak else None,
                                        "prompts": [p.model_dump(mode="json", exclude={"effect"})
                                                    for p in grid.prompts]},
                            "created_at": utc_now()}
    cells: list[CausalTraceCellRow] = []
    for state, g in grid.grids.items():
        for layer, row in enumerate(g.effect):
            for col, value in enumerate(row):
                norm = g.normalized[layer][col] if g.normalized is not None else None
                cells.append({"trace_id": trace_id, "state": str(state), "layer": layer, "pos": col,
                              "label": grid.columns[col] if col < len(grid.columns) else None,
                              "site": g.sites[layer] if layer < len(g.sites) else None, "effect": value,
                              "normalized": norm})
    return {"causal_traces": [head], "causal_trace_cells": cells}


# ============================================================================= scores
def score_id(explanation_id: str, metric: str, *qualifiers: str) -> str:
    """Deterministic id of a ``scores`` row: 24 hex characters of sha256 of the explanation, the metric and the
    qualifiers (a feature score adds its judge), joined by ``\\x1f``. Scoring again replaces the row."""
    return hashlib.sha256("\x1f".join((explanation_id, metric, *qualifiers)).encode()).hexdigest()[:24]


def score_rows(explanation_id: str, scores: Sequence[Score], *, qualifiers: Sequence[str] = (),
               details: Mapping[str, Any] | None = None) -> list[ScoreRow]:
    """One ``scores`` row per :class:`~autoexplain.evals.scores.Score` of ``explanation_id``; ``qualifiers`` go
    into the ids, ``details`` are appended to every score's details."""
    now = utc_now()
    extra = dict(details or {})
    return [{"score_id": score_id(explanation_id, s.metric, *qualifiers), "explanation_id": explanation_id,
             "metric": s.metric, "value": s.value, "n": s.n, "details": {**s.details, **extra}, "created_at": now}
            for s in scores]


def feature_score_rows(result: FeatureScores) -> list[ScoreRow]:
    """The ``scores`` rows of a scored feature explanation: the three scores and every scorer's raw metric, ids
    qualified by the judge (the same explanation scored by two judges keeps both sets)."""
    return score_rows(result.explanation_id, result.scores(), qualifiers=(result.judge,))


def circuit_score_rows(result: CircuitScores, explanation_id: str, circuit_id: str | None = None) -> list[ScoreRow]:
    """The ``scores`` rows of a scored circuit explanation; each row's details carry the ablation, the patch type
    and the patch metric, and ``circuit_id`` when given (the ``circuits`` row the scores belong to)."""
    return score_rows(explanation_id, result.scores(),
                      details={"circuit_id": circuit_id} if circuit_id is not None else None)


# ============================================================================= judgements
#: judgement_sets list columns, from the per-example fields
_SET_LISTS = (("judgement_ids", "judgement_id"), ("example_kinds", "example_kind"), ("example_ids", "example_id"),
              ("splits", "split"), ("truths", "truth"), ("predictions", "prediction"), ("oks", "ok"),
              ("errors", "error"), ("raws", "raw"))


def judgement_sets(judgements: Sequence[ExampleJudgement], *, explanation_id: str, sae_id: str,
                   feature_index: int, created_at: dt.datetime) -> list[JudgementSetRow]:
    """Per-example judgements grouped into ``judgement_sets`` rows: one per (scorer, judge), in order of first
    appearance, the per-example values as parallel lists. A set is written whole: writing one replaces the
    stored set (the view ``judgements`` unnests them again)."""
    sets: dict[tuple[str, str], dict[str, list[Any]]] = {}
    for j in judgements:
        lists = sets.setdefault((j.scorer, j.judge), {col: [] for col, _ in _SET_LISTS})
        for col, field in _SET_LISTS:
            lists[col].append(getattr(j, field))
    rows: list[JudgementSetRow] = []
    for (scorer, judge), lists in sets.items():
        rows.append({"explanation_id": explanation_id, "scorer": scorer, "judge": judge, "sae_id": sae_id,
                     "feature_index": feature_index, "created_at": created_at,
                     "judgement_ids": lists["judgement_ids"], "example_kinds": lists["example_kinds"],
                     "example_ids": lists["example_ids"], "splits": lists["splits"], "truths": lists["truths"],
                     "predictions": lists["predictions"], "oks": lists["oks"], "errors": lists["errors"],
                     "raws": lists["raws"]})
    return rows


def judgement_set_rows(result: FeatureScores) -> list[JudgementSetRow]:
    """The ``judgement_sets`` rows of a scored feature explanation (every per-example judge decision)."""
    return judgement_sets(result.judgements, explanation_id=result.explanation_id, sae_id=result.sae_id,
                          feature_index=result.feature_index, created_at=result.scored_at)


# ============================================================================= the held-out split
def split_rows(examples: Sequence[Example], sae_id: str, feature_index: int) -> list[FeatureExampleRow]:
    """Partial ``feature_examples`` rows (key + ``split``) for ``Store.upsert``: only ``split`` is replaced."""
    return [{"sae_id": sae_id, "feature_index": feature_index, "kind": e.kind, "example_id": e.example_id,
             "split": e.split} for e in examples]


def with_split(example_rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Harvested ``feature_examples`` rows with ``split`` filled in by
    :func:`~autoexplain.evals.features.split_examples`, feature by feature (rows whose feature already has a split
    are left alone): the held-out split is fixed once, when the examples are written."""
    from autoexplain.evals.features import SPLITS, SplitKey, split_sides

    by_feature: dict[tuple[str, int], list[int]] = {}
    for i, r in enumerate(example_rows):
        by_feature.setdefault((r["sae_id"], int(r["feature_index"])), []).append(i)
    out = [dict(r) for r in example_rows]
    for (sae_id, f), idx in by_feature.items():
        if any(out[i].get("split") in SPLITS for i in idx):
            continue
        sides = split_sides([SplitKey.of_row(out[i]) for i in idx], sae_id, f)  # no per-row validation
        for i, side in zip(idx, sides, strict=True):
            out[i]["split"] = side
    return out


# ----------------------------------------------------------------------------- sparse feature circuits
def feature_circuit_id(model_id: str, task_fingerprint: str, saes: Sequence[str], settings: Mapping[str, Any]) -> str:
    """Deterministic, so finding the same feature circuit again replaces its rows instead of adding new ones."""
    key = json.dumps([model_id, task_fingerprint, list(saes), dict(sorted(settings.items()))], default=str)
    return "fcirc-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def feature_circuit_rows(fc_id: str, run_id: str, task_name: str, circ: FeatureCircuit,
                         scores: FeatureCircuitScores | None = None, *, details: Mapping[str, Any] | None = None,
                         held_out: FeatureCircuitScores | None = None, item_id: str | None = None
                         ) -> dict[str, list[Any]]:
    """The ``feature_circuits`` row, a ``feature_circuit_nodes`` row for every node whose effect is not exactly 0
    (kept or not), and a ``feature_circuit_edges`` row for every computed edge. ``scores``: on the prompts the
    circuit was found on; ``held_out``: on prompts it never saw."""
    row: FeatureCircuitRow = {
        "feature_circuit_id": fc_id, "run_id": run_id, "item_id": item_id, "model_id": circ.model_id,
        "task": task_name,
        "saes": list(circ.saes), "sites": [str(s) for s in circ.sites], "metric": circ.metric.value,
        "ablation": circ.ablation, "per_position": circ.per_position, "steps": circ.steps,
        "node_threshold": circ.node_threshold, "edge_threshold": circ.edge_threshold, "n_prompts": circ.n_prompts,
        "m_clean": circ.m_clean, "m_ablated": circ.m_ablated, "n_nodes": len(circ.kept()),
        "n_nodes_total": len(circ.nodes), "n_edges": len(circ.circuit_edges()),
        "faithfulness": scores.faithfulness if scores is not None else circ.faithfulness,
        "necessity": scores.necessity if scores is not None else None,
        "completeness": scores.completeness if scores is not None else None,
        "held_out_faithfulness": held_out.faithfulness if held_out is not None else None,
        "details": {"seconds": circ.seconds, "threshold_is_relative_to": "|m(M) - m(empty)|",
                    "scores": scores.model_dump(mode="json") if scores is not None else None,
                    "held_out_scores": held_out.model_dump(mode="json") if held_out is not None else None,
                    **(details or {})},
        "created_at": utc_now(),
    }
    nodes: list[FeatureCircuitNodeRow] = [
        {"feature_circuit_id": fc_id, "node": n.key, "kind": n.node.kind.value, "sae_id": n.node.sae_id,
         "feature_index": n.node.index, "site": None if n.node.site is None else str(n.node.site),
         "position": n.node.position, "effect": n.effect, "activation": n.activation, "in_circuit": n.in_circuit}
        for n in circ.nodes if n.effect != 0.0 or n.in_circuit]
    edges: list[FeatureCircuitEdgeRow] = [
        {"feature_circuit_id": fc_id, "src": e.src, "dst": e.dst, "weight": e.weight, "in_circuit": e.in_circuit}
        for e in circ.edges]
    return {"feature_circuits": [row], "feature_circuit_nodes": nodes, "feature_circuit_edges": edges}
