"""Feature circuits (SAE features as circuit nodes, ``autoexplain feature-circuit``) on a circuit page.

A file written before the ``feature_circuits`` table existed simply lacks it, and the section is left out. For each
feature circuit stored for the page's model and task: its scores (faithfulness, necessity, completeness, nodes and
edges kept), and its graph in SVG — one column per stage (``embed``, each SAE in forward order, ``logits``), nodes
ordered by |effect|, edges' width their |weight| and colour its sign — with every feature node named by its final
label (when it has one) and linked to its feature page. Only kept nodes and edges are drawn.
"""

from __future__ import annotations

from collections.abc import Callable

from autoexplain.agent.report.html import esc, fmt, table
from autoexplain.agent.store import queries
from autoexplain.agent.store.queries import Reads, ReportFeatureCircuit

#: Nodes drawn per column at most (the largest |effect|).
MAX_PER_COLUMN = 12


def feature_circuits_html(store: Reads, model_id: str, task: str, feature_href: Callable[[str, int], str | None],
                          labels: dict[str, str]) -> str:
    """The section's HTML ('' when the database has no ``feature_circuits`` table). ``labels``: final label text by
    target (``sae_id#index``); ``feature_href``: a feature's page, None when the report has none for it."""
    found = queries.report_feature_circuits(store, model_id, task)
    if found is None:
        return ""
    out = ["<h2>feature circuits</h2>"]
    if not found:
        out.append(f'<p class="muted">none stored for task {esc(task)} on this model (autoexplain '
                   "feature-circuit)</p>")
    for fc in found:
        out.append(f"<h3>{esc(fc.feature_circuit_id)}</h3>" + table(
            ["SAEs (sites)", "metric", "ablation", "nodes kept", "edges kept", "faithfulness", "necessity",
             "completeness"],
            [[esc(", ".join(fc.sites)), esc(fc.metric), esc(fc.ablation),
              f"{esc(fmt(fc.n_nodes))} of {esc(fmt(fc.n_nodes_total))}", esc(fmt(fc.n_edges)),
              esc(fmt(fc.faithfulness)), esc(fmt(fc.necessity)), esc(fmt(fc.completeness))]]))
        out.append(graph_svg(fc, feature_href, labels))
    return "".join(out)


def _column(node: str, kind: str, sae_id: str | None, saes: list[str]) -> int:
    if node == "embed" or kind == "embed":
        return 0
    if node == "logits":
        return len(saes) + 1
    return saes.index(sae_id) + 1 if sae_id in saes else len(saes)


def graph_svg(fc: ReportFeatureCircuit, feature_href: Callable[[str, int], str | None], labels: dict[str, str]) -> str:
    info = {n[0]: n for n in fc.nodes}
    names = list(info)
    for s, d, _ in fc.edges:
        for n in (s, d):
            if n not in info and n not in names:
                names.append(n)
    cols: dict[int, list[str]] = {}
    for n in names:
        kind, sae_id = (info[n][1], info[n][2]) if n in info else ("", None)
        cols.setdefault(_column(n, kind, sae_id, fc.saes), []).append(n)
    cols = {c: ns[:MAX_PER_COLUMN] for c, ns in cols.items()}
    drawn = {n for ns in cols.values() for n in ns}
    if not drawn:
        return '<p class="muted">no kept nodes stored</p>'
    col_w, row_h, box_w = 230, 46, 190
    width = col_w * (max(cols) + 1) + 40
    height = row_h * max(len(ns) for ns in cols.values()) + 40
    pos = {n: (20 + col_w * c, 30 + row_h * i) for c, ns in cols.items() for i, n in enumerate(ns)}
    top = max((abs(w) for _, _, w in fc.edges if w is not None), default=0) or 1.0
    out = [f'<svg class="graph fc" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
           f'aria-label="feature circuit {esc(fc.feature_circuit_id)}">']
    for s, d, w in fc.edges:
        if s not in pos or d not in pos:
            continue
        (x1, y1), (x2, y2) = pos[s], pos[d]
        sign = "neg" if (w or 0) < 0 else "pos"
        out.append(f'<path class="edge in {sign}" data-edge="{esc(s)}->{esc(d)}" d="M{x1 + box_w},{y1} '
                   f'C{x1 + box_w + 20},{y1} {x2 - 20},{y2} {x2},{y2}" '
                   f'stroke-width="{0.8 + 4 * abs(w or 0) / top:.2f}">'
                   f"<title>{esc(s)} → {esc(d)}: weight {esc(fmt(w, 4))}</title></path>")
    for n, (x, y) in pos.items():
        node = info.get(n)
        label = None
        href = None
        if node is not None and node[1] == "feature" and node[2] is not None and node[3] is not None:
            label = labels.get(f"{node[2]}#{node[3]}")
            href = feature_href(node[2], int(node[3]))
        short = f"#{node[3]}" if node and node[1] == "feature" else ("error" if node and node[1] == "error" else n)
        if node and node[4] is not None:
            short += f" @{node[4]}"
        text = short + (f" {label}" if label else "")
        text = text if len(text) <= 30 else text[:29] + "…"
        effect = f"; effect {fmt(node[5], 4)}" if node else ""
        box = (f'<g class="node in" data-node="{esc(n)}"><rect x="{x}" y="{y - 13}" width="{box_w}" height="26" '
               f'rx="5"/><text x="{x + box_w / 2}" y="{y + 4}" text-anchor="middle">{esc(text)}</text>'
               f"<title>{esc(n)}{esc(effect)}{esc(': ' + label if label else '')}</title></g>")
        out.append(f'<a href="../{esc(href)}">{box}</a>' if href else box)
    out.append("</svg>")
    return "".join(out)
