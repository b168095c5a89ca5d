"""A circuit's page: its graph, faithfulness curve, mechanism, per-prompt effects, model views and traces.

The graph is SVG: nodes by layer (``embed`` at the bottom, each layer's heads then its MLP, ``logits`` on top), one
curve per scored edge from source to destination (a head input ``.q``/``.k``/``.v`` is written on the curve's
tooltip), its width the edge's |score| over the largest, its colour the score's sign (blue: negative, red:
positive; what a sign means depends on the method and metric, stated under the graph), the circuit's edges drawn
solid and on top, the other scored edges faint. Then the faithfulness curve (faithfulness against the share of
edges kept, from the search and from held-out scoring when stored), the node table (claimed role and its
intervention check; total, direct and indirect effect as shares of m(M) - m(∅)), each prompt's recovered share,
attention heatmaps of the circuit's heads and a logit-lens grid computed with the model
(:mod:`autoexplain.agent.report.model_views`), the causal-tracing grid when one is stored for the task, and any
feature circuits stored for it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from autoexplain.agent.report.html import bars_svg, esc, fmt, heatmap_svg, line_svg, page, table

if TYPE_CHECKING:
    from autoexplain.agent.report.model_views import ModelViews
    from autoexplain.agent.store.queries import (
        CircuitRecord,
        ReportExplanation,
        ReportTrace,
        StoredEdge,
        StoredNode,
        StoredScore,
    )

#: Scored edges outside the circuit drawn at most (the strongest); the circuit's own edges are always drawn.
MAX_FAINT_EDGES = 400
_NODE_RE = re.compile(r"^a(\d+)\.(\d+)$|^m(\d+)$")


@dataclass
class CircuitView:
    circuit: CircuitRecord
    mechanism: dict[str, float | None]
    edges: list[StoredEdge]
    nodes: list[StoredNode]
    explanations: list[ReportExplanation] = field(default_factory=list)
    scores: dict[str, list[StoredScore]] = field(default_factory=dict)
    traces: list[ReportTrace] = field(default_factory=list)
    model: ModelViews | None = None
    feature_circuits: str = ""  #: HTML of the feature-circuit section ('' when the table does not exist)
    status: str | None = None


def node_of(end: str) -> str:
    """The graph node an edge end names (``a1.2.k`` -> ``a1.2``)."""
    return end.rsplit(".", 1)[0] if end.endswith((".q", ".k", ".v")) else end


def _row(node: str, n_layers: int) -> float:
    """Vertical slot: embed 0, heads of layer L at 1 + 2L, its MLP at 2 + 2L, logits above the last layer."""
    if node == "embed":
        return 0
    if node == "logits":
        return 1 + 2 * n_layers
    m = _NODE_RE.match(node)
    if not m:
        return 0.5
    return 1 + 2 * int(m.group(1)) if m.group(1) is not None else 2 + 2 * int(m.group(3))


def graph_svg(edges: list[StoredEdge]) -> str:
    """The circuit graph (see the module docstring); every circuit edge is a ``path.edge.in`` carrying its edge
    string in ``data-edge``."""
    if not edges:
        return '<p class="muted">no scored edges stored</p>'
    names = {node_of(e.src) for e in edges} | {node_of(e.dst) for e in edges}
    layers = [int(m.group(1) or m.group(3)) for m in (_NODE_RE.match(n) for n in names) if m]
    n_layers = max(layers, default=-1) + 1
    rows: dict[float, list[str]] = {}
    for n in names:
        rows.setdefault(_row(n, n_layers), []).append(n)

    def order(n: str) -> tuple[int, int]:
        m = _NODE_RE.match(n)
        return (int(m.group(2)), 0) if m and m.group(2) is not None else (0, 0)

    width = max(420, 90 * max(len(v) for v in rows.values()) + 60)
    slots = sorted(rows)
    height = 60 * len(slots) + 40
    pos: dict[str, tuple[float, float]] = {}
    for i, r in enumerate(slots):
        members = sorted(rows[r], key=order)
        for j, n in enumerate(members):
            pos[n] = (width * (j + 1) / (len(members) + 1), height - 30 - 60 * i)
    kept = [e for e in edges if e.in_circuit]
    faint = sorted((e for e in edges if not e.in_circuit), key=lambda e: -abs(e.score or 0))[:MAX_FAINT_EDGES]
    top = max((abs(e.score or 0) for e in edges), default=0) or 1.0
    out = [f'<svg class="graph circuit" viewBox="0 0 {width:.0f} {height}" width="{width:.0f}" height="{height}" '
           'role="img" aria-label="circuit graph">']
    for cls, group in (("edge out", faint), ("edge in", kept)):
        for e in group:
            (x1, y1), (x2, y2) = pos[node_of(e.src)], pos[node_of(e.dst)]
            bend = 18 if e.dst.endswith(".q") else -18 if e.dst.endswith(".v") else 0
            mx, my = (x1 + x2) / 2 + bend + (25 if x1 == x2 else 0), (y1 + y2) / 2
            s = e.score or 0.0
            w = 0.6 + 5.5 * abs(s) / top if "in" in cls.split() else 0.4 + 1.2 * abs(s) / top
            sign = "neg" if s < 0 else "pos"
            out.append(f'<path class="{cls} {sign}" data-edge="{esc(e.edge)}" d="M{x1:.1f},{y1:.1f} Q{mx:.1f},'
                       f'{my:.1f} {x2:.1f},{y2:.1f}" stroke-width="{w:.2f}"><title>{esc(e.edge)}: score '
                       f'{esc(fmt(e.score, 4))}, rank {esc(e.rank if e.rank is not None else "–")}'
                       f'{" (in the circuit)" if e.in_circuit else ""}</title></path>')
    in_nodes = {node_of(e.src) for e in kept} | {node_of(e.dst) for e in kept}
    for n, (x, y) in pos.items():
        cls = "node in" if n in in_nodes else "node"
        out.append(f'<g class="{cls}" data-node="{esc(n)}"><rect x="{x - 26:.1f}" y="{y - 11:.1f}" width="52" '
                   f'height="22" rx="5"/><text x="{x:.1f}" y="{y + 4:.1f}" text-anchor="middle">{esc(n)}</text></g>')
    out.append("</svg>")
    return "".join(out)


def _curve(v: CircuitView) -> str:
    series: list[tuple[str, list[tuple[float, float | None]]]] = []
    curve = v.circuit.details.get("curve") or []
    pts = [(float(p["percent"]), p.get("faithfulness")) for p in curve if p.get("percent") is not None]
    if pts:
        series.append(("search prompts", pts))
    for e in v.explanations:
        for s in v.scores.get(e.explanation_id, []):
            if s.metric == "cpr" and s.details.get("circuit_id") in (None, v.circuit.circuit_id):
                xs, ys = s.details.get("percents") or [], s.details.get("faithfulness_at") or []
                if xs and len(xs) == len(ys):
                    series.append(("held-out prompts (CPR)", [(float(x), y) for x, y in zip(xs, ys, strict=True)]))
                break
    if not series:
        return '<p class="muted">no faithfulness curve stored</p>'
    return ("<figure>" + line_svg(series, x_label="% of edges kept (by |score|)", y_label="faithfulness", log_x=True)
            + "<figcaption>faithfulness = (m(C) − m(∅)) / (m(M) − m(∅)) with the top edges kept</figcaption></figure>")


def _effect(d: dict[str, Any]) -> float | None:
    for clean, ablated in (("scored_m_clean", "scored_m_ablated"), ("m_clean", "m_ablated")):
        if d.get(clean) is not None and d.get(ablated) is not None:
            return float(d[clean]) - float(d[ablated])
    return None


def _nodes(v: CircuitView) -> str:
    if not v.nodes:
        return '<p class="muted">no node roles or mediation stored for this circuit</p>'
    effect = _effect(v.circuit.details)

    def share(x: float | None) -> str:
        return "–" if x is None or not effect else f"{x / effect:+.0%}"

    rows = []
    for n in v.nodes:
        check = {True: '<span class="ok">verified</span>', False: '<span class="bad">NOT verified</span>',
                 None: '<span class="muted">unchecked</span>'}[n.role_verified]
        rows.append([esc(n.node), "yes" if n.in_circuit else "", f"{esc(n.role)} ({check})" if n.role else "–",
                     esc(fmt(n.role_score, 2)), share(n.total_effect), share(n.direct_effect),
                     share(n.indirect_effect), esc(fmt(n.mediation_ratio, 2)),
                     "–" if n.prompt_share is None else f"{n.prompt_share:.0%}"])
    return ('<p class="muted">causal mediation per node as shares of m(M) − m(∅); role = what the explanation '
            "claims, checked by intervention</p>" +
            table(["node", "in circuit", "role (check)", "role score", "total", "direct", "indirect",
                   "indirect / total", "prompts hurt"], rows))


def _per_prompt(v: CircuitView) -> str:
    for e in v.explanations:
        for s in v.scores.get(e.explanation_id, []):
            shares = s.details.get("shares") if s.metric == "prompts_recovered" else None
            if s.details.get("circuit_id") not in (None, v.circuit.circuit_id) or not shares:
                continue
            labels = [f"prompt {i}" for i in range(len(shares))]
            vals = [max(0.0, float(x)) if x is not None else 0.0 for x in shares]
            missing = sum(1 for x in shares if x is None)
            cap = (f"share of each scored prompt's own effect the circuit recovers; {fmt(s.value, 2)} of prompts "
                   f"recover at least half (n {s.n})" + (f"; {missing} prompts without an effect of their own "
                                                          "(drawn empty)" if missing else ""))
            plot = bars_svg(labels, vals, x_label="prompt", y_label="recovered", cls="bar pp",
                            tick_every=max(1, len(vals) // 8))
            return f"<figure>{plot}<figcaption>{esc(cap)}</figcaption></figure>"
    return '<p class="muted">no per-prompt effects stored</p>'


def _model_views(v: CircuitView) -> str:
    mv = v.model
    if mv is None:
        return '<p class="muted">model views not computed (the report was built without the model: --no-model)</p>'
    out = []
    if mv.note:
        out.append(f'<p class="note">{esc(mv.note)}</p>')
    if mv.attention:
        out.append("<h3>attention patterns of the circuit's heads</h3><div class=\"row\">")
        for m in mv.attention:
            labels = [f"{i} {t}" for i, t in enumerate(m.tokens)]
            out.append(heatmap_svg(m.weights, labels, labels, caption=f"{m.head} on {m.prompt!r} (row = query, "
                                   "column = key; colour = attention weight)", cell=16))
        out.append("</div>")
    for g in mv.lens:
        rows = [f"{r}" + (f" p={p:.2f}" if p is not None else "") for r, p in zip(g.rows, g.answer_probs,
                                                                                    strict=True)]
        cols = [f"{i} {t}" for i, t in enumerate(g.tokens)]
        cap = (f"logit lens on {g.prompt!r}: each cell the top token the residual stream decodes to (colour = its "
               "probability)" + (f"; p = probability of the answer {g.answer!r} at the last position"
                                 if g.answer else ""))
        out.append("<h3>logit lens</h3>" + heatmap_svg(g.top_probs, rows, cols, cell_text=g.top_tokens, caption=cap,
                                                       cell=30))
    return "".join(out) or '<p class="muted">nothing computed</p>'


def _traces(v: CircuitView) -> str:
    if not v.traces:
        return ""
    out = ["<h2>causal tracing</h2>"]
    for t in v.traces:
        for state in sorted({c[0] for c in t.cells}):
            cells = [c for c in t.cells if c[0] == state]
            layers = sorted({c[1] for c in cells})
            poss = sorted({c[2] for c in cells})
            label = {c[2]: c[3] or str(c[2]) for c in cells}
            grid: list[list[float | None]] = [[None] * len(layers) for _ in poss]
            for _, layer, p, _, val in cells:
                grid[poss.index(p)][layers.index(layer)] = val
            out.append(heatmap_svg(grid, [label[p] for p in poss], [f"L{layer}" for layer in layers],
                                   caption=f"{state}: restored effect / (p_clean − p_corrupted) (p_clean "
                                           f"{fmt(t.p_clean, 3)}, p_corrupted {fmt(t.p_corrupted, 3)}; {t.trace_id})",
                                   lo=0.0, hi=1.0))
    return "".join(out)


def _explanations(v: CircuitView) -> str:
    if not v.explanations:
        return '<p class="muted">none stored (the circuit was found outside the agent)</p>'
    out = []
    for e in v.explanations:
        own = [s for s in v.scores.get(e.explanation_id, []) if s.details.get("circuit_id") in (None,
                                                                                                v.circuit.circuit_id)]
        tag = "final" if e.is_final else "draft"
        level = f"causal level {e.causal_level} claimed / {e.supported_level or 'none cited'} supported"
        rows = [[esc(s.metric), esc(fmt(s.value, 3)), esc(s.n if s.n is not None else "–"),
                 esc(s.details.get("unscored") or s.details.get("from") or "")] for s in own]
        out.append(f'<div class="expl"><span class="tag {tag}">{tag}</span> <span class="muted">{esc(level)}; by '
                   f'{esc(e.author)}</span><p class="label">{esc(e.text)}</p>' +
                   (table(["metric", "value", "n", "note"], rows) if rows else "") + "</div>")
    return "".join(out)


def circuit_page(v: CircuitView, *, root: str) -> str:
    c = v.circuit
    m = v.mechanism
    sel = f"top {c.top_k} edges" if c.top_k is not None else (
        f"|score| ≥ {c.threshold:g} × |m(M) − m(∅)|" if c.threshold is not None else "–")
    facts = table(["method", "ablation", "patching", "metric", "edges kept", "faithfulness", "necessity",
                   "held-out faithfulness", "robustness (Jaccard / Spearman)"],
                  [[esc(c.method), esc(c.ablation), esc(c.patch_type), esc(c.metric),
                    f"{esc(fmt(c.n_edges))} of {esc(fmt(c.n_edges_total))} ({esc(sel)})", esc(fmt(c.faithfulness)),
                    esc(fmt(m.get("necessity"))), esc(fmt(m.get("held_out_faithfulness"))),
                    f"{esc(fmt(m.get('robustness_jaccard'), 2))} / {esc(fmt(m.get('robustness_spearman'), 2))}"]])
    kept = [e for e in v.edges if e.in_circuit]
    edge_rows = [[esc(e.rank if e.rank is not None else "–"), f"<code>{esc(e.edge)}</code>", esc(fmt(e.score, 4))]
                 for e in kept]
    note = f'<p class="note">note: {esc(c.details["note"])}</p>' if c.details.get("note") else ""
    body = (f"<h1>circuit: {esc(c.task)}</h1><p class=\"muted\">{esc(c.circuit_id)} · model {esc(c.model_id)} · run "
            f"{esc(c.run_id)} · item status {esc(v.status or '–')}</p>{facts}{note}"
            "<h2>explanation</h2>" + _explanations(v) +
            f"<h2>graph</h2><p class=\"muted\">{len(kept)} circuit edges (solid) of {len(v.edges)} scored "
            f"(faint: the strongest {MAX_FAINT_EDGES} others at most); width = |score|; blue = negative score, red = "
            "positive (for logit-difference metrics a negative score means ablating the edge lowers the metric: the "
            "edge supports the behaviour)</p>" + graph_svg(v.edges) +
            "<h2>faithfulness curve</h2>" + _curve(v) +
            "<h2>nodes: roles and mediation</h2>" + _nodes(v) +
            "<h2>per-prompt effects</h2>" + _per_prompt(v) +
            "<h2>computed with the model</h2>" + _model_views(v) + _traces(v) + v.feature_circuits +
            "<h2>circuit edges</h2>" + table(["rank", "edge", "score"], edge_rows, "edges"))
    return page(f"circuit {c.task}", body, root=root)
