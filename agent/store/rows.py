"""Domain results turned into rows: the one place that decides which column a value of a tool or scorer lands in.

Tools and scorers return domain objects (a :class:`~autoexplain.tools.circuits.Circuit`, feature statistics,
scores, judgements); these functions map them onto the declared tables (:mod:`autoexplain.agent.store.schema`) and
return ``{table: rows}`` for :meth:`Store.upsert_many` or an outbox.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import TYPE_CHECKING

from autoexplain.agent.store.schema import CircuitEdgeRow, CircuitRow
from autoexplain.tools.vocab import Edge

if TYPE_CHECKING:
    from autoexplain.tools.circuits import Circuit


def utc_now() -> dt.datetime:
    """The current UTC time without a zone (DuckDB ``timestamp``)."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


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
        "n_edges": circ.n_edges, "faithfulness": circ.faithfulness,
        "details": {"task_file": task_path, "m_clean": s.m_clean, "m_ablated": s.m_ablated, "seconds": s.seconds,
                    "curve": [p.model_dump() for p in circ.curve], "method_details": s.details,
                    "threshold_is_relative_to": "|m(M) - m(empty)|", "note": circ.note},
        "created_at": utc_now(),
    }
    edges: list[CircuitEdgeRow] = []
    for i, name in enumerate(s.edges):
        edge = Edge.parse(str(name))
        edges.append({"circuit_id": circuit_id, "edge": str(name), "src": str(edge.src), "dst": str(edge.dst),
                      "score": s.scores[i], "in_circuit": circ.in_circuit[i], "rank": ranks[i]})
    return {"circuits": [row], "circuit_edges": edges}
