"""The report's front page: runs, their items and budgets, circuits, score distributions, and the feature browser.

The feature browser is a table filled by ``static/index.js`` from ``data/features.js`` (one compact array per
feature: name, page, final label, three scores, status, density), so the page stays small and searching,
filtering by score and paging stay fast with tens of thousands of features: filtering is one pass over an array in
the browser, and only one page of rows (50) is ever in the DOM. The data is a script file rather than JSON because
a page opened from disk may not ``fetch`` a neighbouring file (browsers treat ``file://`` as an opaque origin).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from autoexplain.agent.report.html import distribution_svg, esc, fmt, page, table

if TYPE_CHECKING:
    from autoexplain.agent.store.queries import ReportItem, ReportRun

#: The columns of each row of ``data/features.js`` (index.js reads them by position).
FEATURE_COLUMNS = ("name", "href", "label", "correctness", "completeness", "succinctness", "status", "density")


@dataclass
class CircuitLine:
    href: str
    task: str
    method: str
    n_edges: int | None
    n_edges_total: int | None
    faithfulness: float | None
    scores: tuple[float | None, float | None, float | None]
    status: str | None
    text: str | None


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _budget(items: Sequence[ReportItem]) -> str:
    used = [i.budget for i in items if i.budget]
    steps = sum(int(u.get("steps") or 0) for u in used)
    calls = sum(int(u.get("tool_calls") or 0) for u in used)
    tokens = sum(int(u.get("prompt_tokens") or 0) + int(u.get("completion_tokens") or 0) for u in used)
    secs = sum(float(u.get("seconds") or 0) for u in used)
    stopped: dict[str, int] = {}
    for u in used:
        if u.get("stopped_by"):
            stopped[str(u["stopped_by"])] = stopped.get(str(u["stopped_by"]), 0) + 1
    stop = "; stopped by " + ", ".join(f"{k} ×{n}" for k, n in sorted(stopped.items())) if stopped else ""
    return esc(f"{steps:,} steps, {calls:,} tool calls, {tokens:,} LLM tokens, {secs:,.1f} s{stop}")


def _limits(config: dict[str, Any]) -> str:
    budget = config.get("budget") or (config.get("plan") or {}).get("budget") if isinstance(config, dict) else None
    if not isinstance(budget, dict) or not budget:
        return "–"
    return esc(", ".join(f"{k} {v}" for k, v in budget.items() if v is not None))


def index_page(*, title: str, runs: Sequence[ReportRun], items: Sequence[ReportItem], circuits: Sequence[CircuitLine],
               final_scores: dict[str, list[float | None]], n_features: int, n_labelled: int, notes: Sequence[str],
               generated: str) -> str:
    by_run: dict[str, list[ReportItem]] = {}
    for i in items:
        by_run.setdefault(i.run_id, []).append(i)
    run_rows = []
    for r in runs:
        its = by_run.get(r.run_id, [])
        counts: dict[str, int] = {}
        for i in its:
            counts[f"{i.kind} {i.status}"] = counts.get(f"{i.kind} {i.status}", 0) + 1
        run_rows.append([f"<code>{esc(r.run_id)}</code>", esc(r.kind), f'<span class="tag {esc(r.status)}">'
                         f"{esc(r.status)}</span>", esc(r.policy or "–"), esc(str(r.started_at)[:19]),
                         esc(str(r.finished_at)[:19] if r.finished_at else "–"),
                         esc(", ".join(f"{k}: {n}" for k, n in sorted(counts.items())) or "none"),
                         _budget(its), _limits(r.config)])
    circ_rows = [[f'<a href="{esc(c.href)}">{esc(c.task)}</a>', esc(c.method),
                  f"{esc(fmt(c.n_edges))} / {esc(fmt(c.n_edges_total))}", esc(fmt(c.faithfulness, 2)),
                  *(esc(fmt(s, 2)) for s in c.scores), esc(c.status or "–"),
                  f'<span class="label">{esc(_cut(c.text or "–", 240))}</span>'] for c in circuits]
    dists = "".join(distribution_svg(v, name=k) for k, v in final_scores.items())
    note_html = "".join(f'<p class="note">{esc(n)}</p>' for n in notes)
    body = (f"<h1>{esc(title)}</h1><p class=\"muted\">generated {esc(generated)} · {len(runs)} runs · "
            f"{n_features:,} features ({n_labelled:,} labelled) · {len(circuits)} circuits</p>{note_html}"
            "<h2>runs</h2>" + table(["run", "kind", "status", "policy", "started", "finished", "items",
                                     "budget used", "budget limits"], run_rows) +
            "<h2>circuits</h2>" + (table(["task", "method", "edges", "faithfulness", "correctness", "completeness",
                                          "succinctness", "status", "explanation"], circ_rows)
                                   if circ_rows else '<p class="muted">none</p>') +
            "<h2>score distributions (final feature labels)</h2>" +
            (f'<div class="row">{dists}</div>' if n_labelled else '<p class="muted">no feature labels</p>') +
            _browser())
    return page(title, body, root="", scripts=("data/features.js", "static/index.js"))


def _browser() -> str:
    return ('<h2>features</h2><form id="filters" class="filters" autocomplete="off">'
            '<label>label contains <input id="q" type="search" placeholder="e.g. colour"></label>'
            '<label>score <select id="metric"><option value="3">correctness</option>'
            '<option value="4">completeness</option><option value="5">succinctness</option></select></label>'
            '<label>from <input id="min" type="number" step="0.05" min="0" max="1" value="0"></label>'
            '<label>to <input id="max" type="number" step="0.05" min="0" max="1" value="1"></label>'
            '<label>status <select id="status"><option value="">any</option></select></label>'
            '<label><input id="labelled" type="checkbox"> labelled only</label>'
            '<label>sort <select id="sort"><option value="name">feature</option>'
            '<option value="score">score (high first)</option><option value="density">density</option></select>'
            '</label></form><p id="count" class="muted">loading…</p>'
            '<table id="features"><thead><tr><th>feature</th><th>label</th><th>correctness</th><th>completeness</th>'
            '<th>succinctness</th><th>status</th><th>density</th></tr></thead><tbody></tbody></table>'
            '<p class="pager"><button id="prev" type="button">← previous</button> <span id="pageinfo"></span> '
            '<button id="next" type="button">next →</button></p>')
