"""Build the static report: read the store in bulk, write one page per feature and circuit, and the index.

The site opens from disk with no server and no network: pages link each other by relative paths, the stylesheet
and the index's script are copied from this package (``static/``), the feature index is a script file
(``data/features.js``), and plots are inline SVG. Feature pages are written SAE by SAE in slices of
:data:`SLICE` features (one query per table per slice), so memory stays bounded by a slice, not by the SAE.

What is included: without ``run_id`` every run, every harvested feature of every SAE (labelled or not) and every
circuit; with ``run_id`` that run, the features its items labelled and the circuits it found. Circuit pages compute
attention patterns and a logit lens with the model when its stored spec loads here (``with_model``).
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
from pydantic import BaseModel

from autoexplain.agent.report.circuits import CircuitView, circuit_page, node_of
from autoexplain.agent.report.feature_circuits import feature_circuits_html
from autoexplain.agent.report.features import FeatureView, feature_page
from autoexplain.agent.report.index import FEATURE_COLUMNS, CircuitLine, index_page
from autoexplain.agent.store import queries
from autoexplain.agent.store.queries import (
    Reads,
    ReportExplanation,
    ReportHypothesis,
    ReportItem,
    ReportToolCall,
    StoredScore,
)

if TYPE_CHECKING:
    from autoexplain.tools.models import LoadedModel

#: Features read and written per slice.
SLICE = 1024
_THREE = ("correctness", "completeness", "succinctness")


class ReportResult(BaseModel):
    """What :func:`build_report` wrote."""

    out: Path
    index: Path
    runs: int
    features: int
    labelled: int
    circuits: int
    pages: int
    seconds: float
    notes: list[str]


def check_out_dir(out: Path) -> None:
    """Refuse (an :class:`InputError`, before anything is written) a path that is a file, or a non-empty folder
    that is not a report: building replaces the pages of an earlier report, never someone's other files."""
    from autoexplain.tools.errors import InputError

    if out.exists() and not out.is_dir():
        raise InputError(f"--out {str(out)!r} is a file: give a folder to write the report into")
    if out.is_dir() and any(out.iterdir()) and not (out / "index.html").is_file():
        raise InputError(f"--out {str(out)!r} is a non-empty folder that holds no report (no index.html): give a "
                         "new or empty folder, or an earlier report's folder to replace it")


def safe_name(text: str) -> str:
    """A file-name-safe form of an id (sae ids and circuit ids are already safe; anything else is mapped)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:120] or "_"


def feature_href(sae_id: str, index: int) -> str:
    return f"features/{safe_name(sae_id)}/{index}.html"


def circuit_href(circuit_id: str) -> str:
    return f"circuits/{safe_name(circuit_id)}.html"


def _target(target: str) -> tuple[str, int] | None:
    sae_id, sep, idx = target.rpartition("#")
    return (sae_id, int(idx)) if sep and idx.isdigit() else None


def build_report(store: Reads, out: Path, *, run_id: str | None = None, with_model: bool = True,
                 loaded: Mapping[str, LoadedModel] | None = None,
                 progress: Callable[[str], None] | None = None) -> ReportResult:
    """Write the report of ``store`` (or of run ``run_id`` only) into folder ``out`` (created; pages already there
    are replaced). ``loaded``: models already in memory, by spec (the demo passes its own). Returns what was
    written."""
    t0 = time.perf_counter()
    say = progress or (lambda _msg: None)
    out = Path(out)
    (out / "static").mkdir(parents=True, exist_ok=True)
    (out / "data").mkdir(exist_ok=True)
    for name in ("report.css", "index.js"):
        src = resources.files("autoexplain.agent.report").joinpath("static", name)
        (out / "static" / name).write_bytes(src.read_bytes())
    notes: list[str] = []

    runs = queries.report_runs(store, run_id)
    items = queries.report_items(store, run_id)
    expl = queries.report_explanations(store, run_id)
    scores = queries.report_scores(store, run_id)
    hyps = queries.report_hypotheses(store, run_id)
    calls = {c.call_id: c for c in queries.report_tool_calls(store, run_id)}
    saes = queries.report_sae_specs(store)

    items_by_target: dict[str, list[ReportItem]] = {}
    for it in items:
        items_by_target.setdefault(it.target, []).append(it)
    expl_by_target: dict[str, list[ReportExplanation]] = {}
    for e in expl:
        expl_by_target.setdefault(e.target, []).append(e)
    hyps_by_item: dict[str, list[ReportHypothesis]] = {}
    for h in hyps:
        hyps_by_item.setdefault(h.item_id, []).append(h)

    # which features get a page, per SAE
    wanted: dict[str, set[int] | None] = {}  # None: every harvested feature
    for target in {*(i.target for i in items if i.kind == "feature"), *(e.target for e in expl)}:
        parsed = _target(target)
        if parsed:
            got = wanted.setdefault(parsed[0], set())
            if got is not None:
                got.add(parsed[1])
    if run_id is None:
        for sae_id in {*saes, *queries.report_feature_saes(store)}:
            wanted[sae_id] = None

    slices: list[_Slice] = []
    for sae_id, only in sorted(wanted.items()):
        sae = saes.get(sae_id)  # None: harvested by a run that did not record the SAE
        spec = sae.specs[0] if sae and sae.specs else sae_id
        lo, hi, n = queries.report_feature_range(store, sae_id)
        indices = sorted(only) if only is not None else list(range(lo, hi + 1))
        if only is None:  # every harvested feature, plus labelled ones never harvested
            labelled = {p[1] for t in expl_by_target if (p := _target(t)) and p[0] == sae_id}
            indices = sorted(set(indices) | labelled)
        say(f"features of {spec}: {len(indices):,}")
        for start in range(0, len(indices), SLICE):
            chunk = indices[start:start + SLICE]
            targets = [f"{sae_id}#{i}" for i in chunk]
            its = {t: items_by_target[t] for t in targets if t in items_by_target}
            labels = {t: expl_by_target[t] for t in targets if t in expl_by_target}
            hs = {it.item_id: hyps_by_item[it.item_id] for v in its.values() for it in v
                  if it.item_id in hyps_by_item}
            slices.append(_Slice(
                out=out, sae_id=sae_id, spec=spec, site=sae.site if sae else "–",
                model_id=sae.model_id if sae else None, indices=chunk, all_harvested=only is None, items=its,
                labels=labels, scores={e.explanation_id: scores.get(e.explanation_id, [])
                                       for v in labels.values() for e in v},
                hypotheses=hs, calls={cid: calls[cid] for v in hs.values() for h in v for cid in h.evidence
                                      if cid in calls}))

    index_rows: list[list[object]] = []
    written: set[tuple[str, int]] = set()
    final_scores: dict[str, list[float | None]] = {k: [] for k in _THREE}
    pages = 0
    results = [_render_slice(store, sl) for sl in slices]
    for r in results:
        index_rows += r.rows
        written |= r.written
        pages += len(r.written)
        for k, vals in r.finals.items():
            final_scores[k] += vals

    # circuits
    circuits = queries.report_circuits(store, run_id)
    lines: list[CircuitLine] = []
    models = None
    if circuits and with_model:
        from autoexplain.agent.report.model_views import Models

        models = Models(loaded)
    items_by_id = {i.item_id: i for i in items}
    final_texts = {e.target: e.text for e in (expl if run_id is None else queries.report_explanations(store))
                   if e.is_final}
    for c in circuits:
        say(f"circuit {c.task} ({c.circuit_id})")
        c_expl = [e for e in expl if e.item_id == c.item_id] if c.item_id else []
        c_scores = queries.explanation_scores(store, [e.explanation_id for e in c_expl])
        edges = queries.circuit_edges(store, c.circuit_id)
        view = CircuitView(circuit=c, mechanism=queries.circuit_mechanism_scores(store, c.circuit_id), edges=edges,
                           nodes=queries.circuit_nodes(store, c.circuit_id), explanations=c_expl, scores=c_scores,
                           traces=queries.report_traces(store, c.model_id, c.task),
                           status=items_by_id[c.item_id].status if c.item_id in items_by_id else None)
        view.feature_circuits = feature_circuits_html(
            store, c.model_id, c.task, lambda sae, i: feature_href(sae, i) if (sae, i) in written else None,
            final_texts)
        if models is not None:
            from autoexplain.agent.report.model_views import circuit_views

            kept = [e for e in edges if e.in_circuit]
            heads: list[str] = []
            for edge in kept:
                for node in (node_of(edge.src), node_of(edge.dst)):
                    if node.startswith("a") and node not in heads:
                        heads.append(node)
            view.model = circuit_views(models, queries.model_spec(store, c.model_id), c.model_id,
                                       c.details.get("task_file"), heads)
        href = circuit_href(c.circuit_id)
        (out / href).parent.mkdir(parents=True, exist_ok=True)
        (out / href).write_text(circuit_page(view, root="../"), encoding="utf-8")
        pages += 1
        final = next((e for e in c_expl if e.is_final), None)
        own = [s for s in c_scores.get(final.explanation_id, []) if s.details.get("circuit_id") in
               (None, c.circuit_id)] if final else []
        lines.append(CircuitLine(href, c.task, c.method, c.n_edges, c.n_edges_total, c.faithfulness, _three(own),
                                 view.status, final.text if final else None))

    (out / "data" / "features.js").write_bytes(
        b"window.AE_FEATURES = " + orjson.dumps({"cols": list(FEATURE_COLUMNS), "rows": index_rows}) + b";\n")
    if run_id is not None and not runs:
        notes.append(f"run {run_id} is not in the database")
    title = f"autoexplain report: run {run_id}" if run_id else "autoexplain report"
    generated = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    n_labelled = sum(1 for r in index_rows if r[2])
    (out / "index.html").write_text(
        index_page(title=title, runs=runs, items=items, circuits=lines, final_scores=final_scores,
                   n_features=len(index_rows), n_labelled=n_labelled, notes=notes, generated=generated),
        encoding="utf-8")
    return ReportResult(out=out, index=out / "index.html", runs=len(runs), features=len(index_rows),
                        labelled=n_labelled, circuits=len(lines), pages=pages + 1,
                        seconds=round(time.perf_counter() - t0, 2), notes=notes)


@dataclass
class _Slice:
    """What the pages of one slice of one SAE's features need besides the store."""

    out: Path
    sae_id: str
    spec: str
    site: str
    model_id: str | None
    indices: list[int]
    all_harvested: bool  #: the slice lists every index in range: keep only harvested or labelled ones
    items: dict[str, list[ReportItem]]
    labels: dict[str, list[ReportExplanation]]
    scores: dict[str, list[StoredScore]]
    hypotheses: dict[str, list[ReportHypothesis]]
    calls: dict[str, ReportToolCall]


@dataclass
class _SliceOut:
    rows: list[list[object]]
    written: set[tuple[str, int]]
    finals: dict[str, list[float | None]]


def _render_slice(store: Reads, sl: _Slice) -> _SliceOut:
    """Read one slice's statistics, contexts and judgements in bulk and write its feature pages."""
    a, b = sl.indices[0], sl.indices[-1] + 1
    stats = {f.feature_index: f for f in queries.report_features(store, sl.sae_id, a, b)}
    chunk = [i for i in sl.indices if i in stats or f"{sl.sae_id}#{i}" in sl.labels] if sl.all_harvested \
        else sl.indices
    examples = queries.report_examples(store, sl.sae_id, a, b)
    finals = {i: next((e for e in sl.labels.get(f"{sl.sae_id}#{i}", []) if e.is_final), None) for i in chunk}
    judged = queries.report_judgements(store, [e.explanation_id for e in finals.values() if e is not None])
    res = _SliceOut([], set(), {k: [] for k in _THREE})
    (sl.out / feature_href(sl.sae_id, 0)).parent.mkdir(parents=True, exist_ok=True)
    for i in chunk:
        target = f"{sl.sae_id}#{i}"
        its = sl.items.get(target, [])
        labels = sl.labels.get(target, [])
        v = FeatureView(name=f"{sl.spec}#{i}", sae_id=sl.sae_id, index=i, site=sl.site, model_id=sl.model_id,
                        stats=stats.get(i), labels=labels,
                        scores={e.explanation_id: sl.scores.get(e.explanation_id, []) for e in labels},
                        examples=queries.decode_examples(examples.get(i, [])), items=its,
                        hypotheses=[h for it in its for h in sl.hypotheses.get(it.item_id, [])])
        final = finals.get(i)
        if final is not None:
            v.judgements = judged.get(final.explanation_id, [])
        v.calls = {cid: sl.calls[cid] for h in v.hypotheses for cid in h.evidence if cid in sl.calls}
        href = feature_href(sl.sae_id, i)
        (sl.out / href).write_text(feature_page(v, root="../../"), encoding="utf-8")
        res.written.add((sl.sae_id, i))
        three = _three(sl.scores.get(final.explanation_id, [])) if final else (None, None, None)
        if final is not None:
            for k, x in zip(_THREE, three, strict=True):
                res.finals[k].append(x)
        status = its[-1].status if its else ("dead" if v.stats and v.stats.is_dead else "")
        res.rows.append([v.name, href, final.text if final else "", *three, status,
                         v.stats.density if v.stats else None])
    return res


def _three(scores: list[StoredScore]) -> tuple[float | None, float | None, float | None]:
    by = {s.metric: s.value for s in scores}
    return by.get("correctness"), by.get("completeness"), by.get("succinctness")


