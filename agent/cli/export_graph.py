"""``autoexplain export-graph``: a stored circuit as attribution-graph JSON (circuit-tracer / Neuronpedia format),
written to a folder with its ``graph-metadata.json`` index (:mod:`autoexplain.tools.graph_export`).

Reads the database read-only. A feature circuit carries its display prompt (stored when it was found); a
head-level circuit's prompt is the first prompt of its task file, tokenised by its model (loaded for that).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from autoexplain.agent.cli.common import DbOpt, console
from autoexplain.tools.errors import InputError


def export_graph(
        out: Annotated[Path, typer.Option("--out", help="folder to write {slug}.json and graph-metadata.json into")],
        circuit: Annotated[str | None, typer.Option("--circuit", help="a head-level circuit id (circuits)")] = None,
        feature_circuit: Annotated[str | None, typer.Option("--feature-circuit", help="a feature circuit id "
                                                                                      "(feature_circuits)")] = None,
        slug: Annotated[str | None, typer.Option(help="the graph's slug (file name; default: the circuit id)")]
        = None,
        db: DbOpt = None,
) -> None:
    """Export a stored circuit (--circuit) or feature circuit (--feature-circuit) as attribution-graph JSON that
    circuit-tracer's graph UI and Neuronpedia read: metadata, nodes (their node-id conventions; labels in clerp)
    and links; checked against the format before it is written."""
    if (circuit is None) == (feature_circuit is None):
        raise InputError("give exactly one of --circuit ID or --feature-circuit ID")
    if slug is not None and not slug.replace("-", "").replace("_", "").isalnum():
        raise InputError(f"--slug {slug!r}: use letters, digits, '-' and '_' only")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {str(out)!r} is a file: pass a folder")
    from autoexplain.agent.store.db import default_db_path
    from autoexplain.agent.store.queries import ReadOnlyStore

    store = ReadOnlyStore(db or default_db_path())
    graph = _feature_graph(store, feature_circuit, slug) if feature_circuit else _head_graph(store, circuit or "",
                                                                                            slug)
    from autoexplain.tools.graph_export import write_graph

    path = write_graph(graph, out)
    console().print(f"wrote {path} ({len(graph['nodes'])} nodes, {len(graph['links'])} links) and "
                    f"{out / 'graph-metadata.json'}", markup=False, highlight=False)


def _feature_graph(store: Any, fc_id: str, slug: str | None) -> dict[str, Any]:
    from autoexplain.agent.store import queries
    from autoexplain.tools.graph_export import ExportLink, ExportNode, ExportPrompt, build_graph
    from autoexplain.tools.vocab import Site

    rec = queries.feature_circuit_record(store, fc_id)
    if rec is None:
        known = ", ".join(i for i, _, _ in queries.feature_circuit_listing(store)[:5]) or "none"
        raise InputError(f"no feature circuit {fc_id!r} in the database (stored: {known})")
    display = rec.details.get("display")
    if not display or rec.details.get("n_layers") is None:
        raise InputError(f"feature circuit {fc_id} was stored without its display prompt: find it again with "
                         "autoexplain feature-circuit")
    from autoexplain.tools.saes import TRANSCODER_ARCHITECTURES

    arch = queries.sae_architectures(store)
    nodes: list[ExportNode] = []
    for n in queries.feature_circuit_nodes(store, fc_id):
        layer = Site.parse(n.site).layer if n.site else None
        kind = n.kind if n.kind in ("embed", "feature", "error") else "feature"
        text = None
        if n.kind == "feature":
            text = f"{n.label} ({n.node})" if n.label else f"unlabelled ({n.node})"
        nodes.append(ExportNode(key=n.node, kind=kind, layer=layer, index=n.feature_index, position=n.position,
                                label=text, effect=n.effect, activation=n.activation,
                                transcoder=arch.get(str(n.sae_id)) in TRANSCODER_ARCHITECTURES))
    nodes.append(ExportNode(key="logits", kind="logits"))
    links = [ExportLink(src=s, dst=d, weight=w or 0.0) for s, d, w, _ in queries.feature_circuit_edges(store, fc_id)]
    offsets = _offsets(rec.saes, rec.sites, store)
    return build_graph(slug=slug or fc_id, scan=f"autoexplain:{'+'.join(rec.saes)}",
                       prompt=ExportPrompt.model_validate(display), nodes=nodes, links=links,
                       n_layers=int(rec.details["n_layers"]), effect=_effect(rec.m_clean, rec.m_ablated),
                       node_threshold=rec.node_threshold, offsets=offsets,
                       info={"kind": "feature circuit", "id": fc_id, "task": rec.task, "model_id": rec.model_id,
                             "metric": rec.metric, "faithfulness": rec.faithfulness,
                             "positions": "per position" if rec.per_position else
                             "nodes summed over positions, drawn at the answer position",
                             "link_weights": "linear-approximation edge effects in metric units"})


def _offsets(saes: list[str], sites: list[str], store: Any) -> dict[str, int]:
    """Index offsets for SAEs that share a layer (node ids are layer_index_pos)."""
    from autoexplain.agent.store import queries
    from autoexplain.tools.vocab import Site

    widths = queries.sae_widths(store)
    offsets: dict[str, int] = {}
    used: dict[int, int] = {}
    for sae_id, site in zip(saes, sites, strict=True):
        layer = Site.parse(site).layer
        if layer in used:
            if sae_id not in widths and not used[layer]:
                raise InputError(f"SAE {sae_id} shares layer {layer} with another SAE and its width is not stored")
            offsets[sae_id] = used[layer]
        used[layer] = used.get(layer, 0) + widths.get(sae_id, 0) + 1
    return offsets


def _effect(m_clean: float | None, m_ablated: float | None) -> float | None:
    return None if m_clean is None or m_ablated is None else m_clean - m_ablated


def _head_graph(store: Any, circuit_id: str, slug: str | None) -> dict[str, Any]:
    from autoexplain.agent.store import queries
    from autoexplain.tools.data import load_task_file, tokenize_task
    from autoexplain.tools.graph_export import ExportLink, ExportNode, build_graph, display_prompt
    from autoexplain.tools.loading import load_model
    from autoexplain.tools.vocab import Node

    rec = queries.circuit_record(store, circuit_id)
    if rec is None:
        known = ", ".join(c for c, _, _, _ in queries.circuit_listing(store)[:5]) or "none"
        raise InputError(f"no circuit {circuit_id!r} in the database (stored: {known})")
    edges = [e for e in queries.circuit_edges(store, circuit_id) if e.in_circuit]
    task_file = rec.details.get("task_file")
    spec = queries.model_spec(store, rec.model_id)
    if not task_file or not Path(task_file).exists() or spec is None:
        raise InputError(f"circuit {circuit_id}: its task file ({task_file}) or model spec is no longer available, "
                         "so its prompt cannot be drawn")
    lm = load_model(spec)
    task = tokenize_task(load_task_file(task_file), lm.tokenizer, n_ctx=lm.n_ctx)
    roles = {n.node: n for n in queries.circuit_nodes(store, circuit_id)}
    names = sorted({e.src for e in edges} | {e.dst for e in edges})
    nodes: list[ExportNode] = []
    for name in names:
        node = Node.parse(name)
        if name in ("embed", "logits"):
            nodes.append(ExportNode(key=name, kind=name))  # type: ignore[arg-type]
            continue
        r = roles.get(name)
        what = "attention head" if node.is_head else "MLP"
        role = f": {r.role} ({'verified' if r.role_verified else 'unverified'})" if r is not None and r.role else ""
        nodes.append(ExportNode(key=name, kind="head" if node.is_head else "mlp", layer=node.layer,
                                index=node.head if node.is_head else lm.n_heads, label=f"{name} ({what}){role}",
                                effect=r.total_effect if r is not None else None))
    if "logits" not in names:
        nodes.append(ExportNode(key="logits", kind="logits"))
    links = [ExportLink(src=e.src, dst=e.dst, weight=e.score or 0.0) for e in edges]
    m_clean, m_ablated = rec.details.get("m_clean"), rec.details.get("m_ablated")
    return build_graph(slug=slug or circuit_id, scan=f"autoexplain:{rec.model_id}", prompt=display_prompt(lm, task),
                       nodes=nodes, links=links, n_layers=lm.n_layers, effect=_effect(m_clean, m_ablated),
                       info={"kind": "head-level circuit", "id": circuit_id, "task": rec.task, "method": rec.method,
                             "model_id": rec.model_id, "metric": rec.metric, "faithfulness": rec.faithfulness,
                             "positions": "edges are not per position: every node is drawn at the answer position",
                             "link_weights": "edge scores in metric units; q, k and v edges into a head summed"})
