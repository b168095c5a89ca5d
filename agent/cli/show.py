"""``autoexplain show feature|circuit|run``: read what the database holds about one thing, in the terminal.

Everything here reads the file read-only (:class:`~autoexplain.agent.store.queries.ReadOnlyStore`): nothing is
created, migrated or written, no model is loaded, and it answers while a run writes the same file. A feature is
named ``SPEC#INDEX`` where SPEC is any spec its SAE was loaded under (``toy:small/res0``, a folder as typed or as
an absolute path, ``RELEASE/SAE_ID``) or its ``sae_id`` (``sae-…``); the database maps specs to SAEs
(``sae_aliases``), so the spec a user typed keeps working after the content hash became the SAE's name.

Firing tokens are highlighted in colour on a terminal; in a pipe, a log or with ``--no-color`` each firing token
is written ``[tok 1.23]`` (its activation after it), so the output stays readable as plain text.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer

from autoexplain.agent.cli.common import DbOpt, console, node_table, scored_effect
from autoexplain.tools.errors import InputError

if TYPE_CHECKING:
    from autoexplain.agent.store import Store
    from autoexplain.agent.store.queries import ReadOnlyStore, StoredExample, StoredScore

show_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, add_completion=False,
                       help="Show what the database holds about a feature, a circuit or a run (read-only).")

NoColorOpt = Annotated[bool, typer.Option("--no-color", help="plain text: firing tokens as [tok 1.23] (also when "
                                                             "stdout is not a terminal, or NO_COLOR is set)")]
_THREE = ("correctness", "completeness", "succinctness")


# ============================================================================= shared
def parse_feature(name: str) -> tuple[str, int]:
    """``SPEC#INDEX`` -> (SPEC, INDEX); one :class:`InputError` line for anything else (checked before the
    database is opened)."""
    spec, sep, index = name.strip().rpartition("#")
    if not sep or not spec.strip() or not index.strip().isdigit():
        raise InputError(f"feature {name!r} is not SPEC#INDEX: write the SAE's spec or sae_id, '#', and a "
                         "feature index, e.g. toy:small/res0#7 or sae-0123456789abcdef#7")
    return spec.strip(), int(index)


def _reader(db: Path | None) -> ReadOnlyStore:
    from autoexplain.agent.store import default_db_path
    from autoexplain.agent.store.queries import ReadOnlyStore

    return ReadOnlyStore(db or default_db_path())


def _plain(no_color: bool) -> bool:
    """Whether to write plain text (brackets instead of colour)."""
    return no_color or bool(os.environ.get("NO_COLOR")) or not console().is_terminal


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}" if abs(x) >= 10 ** -digits or x == 0 else f"{x:.2e}"


def _score_line(scores: list[StoredScore]) -> str:
    """The three scores first, then the raw metrics, each with its n (``correctness 0.750 (n 100)``)."""
    def one(s: StoredScore) -> str:
        return f"{s.metric} {_fmt(s.value)}" + (f" (n {s.n})" if s.n is not None else "")

    three = [one(s) for s in scores if s.metric in _THREE]
    raw = [one(s) for s in scores if s.metric not in _THREE]
    return "; ".join(three) + (f" | raw: {', '.join(raw)}" if raw else "") if scores else "not scored"


def _print(con: Any, text: str) -> None:
    """Print data (labels, tokens, explanations) literally: never as rich markup, never cut."""
    con.print(text, markup=False, highlight=False, overflow="ignore", crop=False)


# ============================================================================= show feature
def feature(name: Annotated[str, typer.Argument(metavar="SPEC#INDEX", help="e.g. toy:small/res0#7, ./my-sae#7, "
                                                                             "sae-0123456789abcdef#7")],
            db: DbOpt = None,
            examples: Annotated[int, typer.Option("--examples", "-n", help="contexts shown per kind (top, "
                                                                            "quantile)")] = 5,
            judged: Annotated[int, typer.Option("--judged", help="judged contexts shown per scorer")] = 8,
            no_color: NoColorOpt = False) -> None:
    """A feature: its labels (final first) with scores, n and causal level; density, histogram, top and bottom
    logits; top and quantile contexts with the firing tokens highlighted and the explain/score split marked; and
    the judged contexts with the judge's prediction against the truth."""
    spec, index = parse_feature(name)
    if examples < 0 or judged < 0:
        raise InputError("--examples and --judged must be >= 0")
    from autoexplain.agent.store import queries

    store = _reader(db)
    sae = _resolve_sae(store, spec, index)
    target = f"{sae.sae_id}#{index}"
    stats = queries.feature_details(store, sae.sae_id, index)
    labels = queries.explanations_of_target(store, target)
    if stats is None and not labels:
        raise InputError(f"feature {index} of {spec} ({sae.sae_id}) has no stored statistics or labels "
                         f"({sae.n_features} of its {sae.d_sae} features are harvested): harvest or label it first")
    plain = _plain(no_color)
    con = console()
    others = [s for s in sae.specs if s != spec]
    _print(con, f"feature {spec}#{index}  = {target}   (SAE at {sae.site}, d_sae {sae.d_sae}, model "
                f"{sae.model_id or '-'}" + (f"; also named {', '.join(others)}" if others else "") + ")")
    if sae.note:
        _print(con, sae.note)

    con.print()
    con.print("[bold]labels[/bold] (final first; scores on the held-out score split)")
    scores = queries.explanation_scores(store, [e.explanation_id for e in labels])
    if not labels:
        _print(con, "  none: this feature was never labelled (autoexplain label)")
    for e in labels:
        tag = "final" if e.is_final else "draft"
        if e.budget_limited:
            tag += ", budget-limited"
        author = e.author + (f" ({e.llm_model})" if e.llm_model else "")
        _print(con, f"  [{tag}] {e.text}")
        _print(con, f"      causal level {e.causal_level}; author {author}; judge {e.judge or '-'}; overall "
                    f"{_fmt(e.overall)}; run {e.run_id}")
        _print(con, f"      {_score_line(scores.get(e.explanation_id, []))}")

    con.print()
    if stats is None:
        _print(con, "statistics: not harvested")
    else:
        dead = " DEAD (never fired)" if stats.is_dead else ""
        _print(con, f"statistics: density {_fmt(stats.density, 5)} over {stats.n_tokens or 0:,} tokens; max "
                    f"activation {_fmt(stats.max_act)}; mean when firing {_fmt(stats.mean_act)}{dead}")
        if stats.histogram:
            _histogram(con, stats.histogram)
        for what, logits in (("top logits (promoted)", stats.top_logits),
                             ("bottom logits (suppressed)", stats.bottom_logits)):
            if logits:
                _print(con, f"{what}: " + "  ".join(f"{t!r} {v:+.3f}" for t, v in logits[:10]))

    ex = queries.stored_examples(store, sae.sae_id, index)
    if ex:
        con.print()
        _print(con, "contexts: E = explain split (what the labeller saw), S = score split (held out for scoring)"
                    + ("; firing tokens as [tok activation]" if plain else "; firing tokens highlighted"))
        for kind, title in (("top", "top contexts"), ("quantile", "quantile contexts (strongest bin first)")):
            rows = [x for x in ex if x.kind == kind]
            if not rows:
                continue
            shown = rows if kind == "top" else _spread_quantiles(rows, examples)
            con.print(f"[bold]{title}[/bold] ({min(len(shown), examples)} of {len(rows)})")
            for x in shown[:examples]:
                _context_line(con, x, plain)

    _judgements(con, store, labels, ex, judged, plain)


class _Sae:
    def __init__(self, sae_id: str, site: str, d_sae: int, model_id: str | None, specs: list[str],
                 n_features: int, note: str) -> None:
        self.sae_id, self.site, self.d_sae, self.model_id = sae_id, site, d_sae, model_id
        self.specs, self.n_features, self.note = specs, n_features, note


def _resolve_sae(store: ReadOnlyStore, spec: str, index: int) -> _Sae:
    """The SAE ``spec`` names in this database (latest loaded under it), or one line listing the known ones."""
    from autoexplain.agent.store import queries

    known = {k.sae_id: k for k in queries.known_saes(store)}
    found = [s for s in queries.sae_ids_for_spec(store, spec) if s in known]
    if not found:
        listing = "; ".join(f"{' = '.join(k.specs[:2])} ({k.sae_id}, {k.n_features} features harvested)"
                            for k in known.values()) or "none (run autoexplain harvest, label or demo)"
        raise InputError(f"unknown SAE {spec!r} in {str(store.path)!r}: the SAEs stored there are {listing}")
    k = known[found[0]]
    if index >= k.d_sae:
        raise InputError(f"feature {index} is out of range for {spec} ({k.sae_id}): its features are "
                         f"0..{k.d_sae - 1}")
    note = "" if len(found) == 1 else (f"note: {spec!r} also named {', '.join(found[1:])} (loaded under it "
                                       "earlier); showing the latest")
    return _Sae(k.sae_id, k.site, k.d_sae, k.model_id, k.specs, k.n_features, note)


def _histogram(con: Any, hist: dict[str, Any]) -> None:
    """The activation histogram (fixed log-spaced bins; one bin below the first edge, one above the last) as bars,
    from the first to the last non-empty bin."""
    edges, counts = list(hist.get("edges") or []), list(hist.get("counts") or [])
    nonzero = [i for i, c in enumerate(counts) if c]
    if not nonzero:
        _print(con, "histogram: no firing tokens")
        return
    top = max(counts)
    _print(con, f"histogram of activations when firing ({sum(counts):,} tokens):")
    for i in range(nonzero[0], nonzero[-1] + 1):
        lo = "" if i == 0 else f"{edges[i - 1]:.3g}"
        hi = "" if i >= len(edges) else f"{edges[i]:.3g}"
        label = f"< {hi}" if not lo else (f">= {lo}" if not hi else f"{lo}-{hi}")
        bar = "#" * max(1 if counts[i] else 0, round(40 * counts[i] / top))
        _print(con, f"  {label:>13} | {bar} {counts[i]:,}")


def _spread_quantiles(rows: list[StoredExample], n: int) -> list[StoredExample]:
    """Up to ``n`` quantile examples spread over the bins (one per bin first, strongest bin first)."""
    by_bin: dict[Any, list[StoredExample]] = {}
    for x in rows:
        by_bin.setdefault(x.quantile, []).append(x)
    out: list[StoredExample] = []
    while len(out) < min(n, len(rows)):
        for b in list(by_bin):
            if by_bin[b] and len(out) < n:
                out.append(by_bin[b].pop(0))
    return out


def _tok(t: str) -> str:
    return t.replace("\n", "\u21b5").replace("\r", "\\r").replace("\t", "\\t")


def render_context(tokens: list[str], acts: list[float], plain: bool, peak: float | None = None) -> Any:
    """One context as text: firing tokens (activation > 0) as ``[tok 1.23]`` in plain mode, else a rich Text with
    the firing tokens' background graded by their activation relative to ``peak`` (default: the context's max)."""
    from rich.text import Text

    top = peak or max([a for a in acts if a > 0], default=0.0) or 1.0
    out = Text()
    for tok, a in zip(tokens, acts, strict=False):
        t = _tok(tok)
        if a <= 0:
            out.append(t)
            continue
        body = t.lstrip(" ")
        lead = t[: len(t) - len(body)]
        if plain:
            out.append(f"{lead}[{body or t} {a:.2f}]")
        else:
            share = a / top
            style = "bold black on bright_yellow" if share > 0.66 else (
                "black on yellow" if share > 0.33 else "black on grey70")
            out.append(lead)
            out.append(body or t, style=style)
    return out


#: Tokens shown before and after a context's peak (a random context without one: its last tokens).
_BEFORE, _AFTER = 20, 8


def _window(tokens: list[str], acts: list[float]) -> tuple[list[str], list[float], bool, bool]:
    """The part of a context worth a line: ``_BEFORE`` tokens before its peak and ``_AFTER`` after (a context
    that never fires: its last tokens), with whether something was cut on the left and on the right."""
    n = len(tokens)
    if n <= _BEFORE + _AFTER + 1:
        return tokens, acts, False, False
    peak = max(range(n), key=lambda i: acts[i]) if any(a > 0 for a in acts[:n]) else n - 1 - _AFTER
    lo, hi = max(0, peak - _BEFORE), min(n, peak + _AFTER + 1)
    return tokens[lo:hi], acts[lo:hi], lo > 0, hi < n


def _context_line(con: Any, x: StoredExample, plain: bool, prefix: str = "") -> None:
    from rich.text import Text

    side = {"explain": "E", "score": "S"}.get(x.split or "", "-")
    q = f"q{x.quantile}" if x.quantile is not None else x.kind[:3]
    head = Text(f"  {prefix}{side} {q:>4} max {_fmt(x.max_act, 2):>6} | ")
    tokens, acts, left, right = _window(x.tokens, x.acts)
    head.append("…" if left else "")
    head.append_text(render_context(tokens, acts, plain, peak=max(x.acts, default=0.0) or None))
    head.append("…" if right else "")
    con.print(head, overflow="ignore", crop=False)


def _judgements(con: Any, store: ReadOnlyStore, labels: list[Any], ex: list[StoredExample], per_scorer: int,
                plain: bool) -> None:
    """The final label's judged contexts (the ``judgements`` view): per scorer and judge, what the judge predicted
    from the label against the truth (did the context activate?)."""
    from autoexplain.agent.store import queries

    chosen = next((e for e in labels if e.is_final), labels[0] if labels else None)
    if chosen is None or per_scorer == 0:
        return
    rows = queries.explanation_judgements(store, chosen.explanation_id)
    con.print()
    if not rows:
        _print(con, f"judged contexts: none stored for the {'final' if chosen.is_final else 'best'} label "
                    "(dead features are not scored; --judgements all keeps drafts' rows)")
        return
    by_key = {(x.kind, x.example_id): x for x in ex}
    groups: dict[tuple[str, str], list[Any]] = {}
    for j in rows:
        groups.setdefault((j.scorer, j.judge), []).append(j)
    _print(con, f"judged contexts of the {'final' if chosen.is_final else 'best'} label (score split; predicted = "
                "what the judge said from the label, truth = whether the context activates):")
    for (scorer, judge), js in groups.items():
        right = sum(1 for j in js if j.ok and j.prediction == j.truth)
        failed = sum(1 for j in js if not j.ok)
        con.print(f"[bold]{scorer}[/bold] by {judge}: {right} of {len(js)} right" +
                  (f", {failed} unparseable" if failed else ""))
        # wrong ones first: they say most about the label
        ordered = sorted(js, key=lambda j: (j.ok and j.prediction == j.truth, not j.truth))
        for j in ordered[:per_scorer]:
            pred = "fail" if not j.ok else ("yes" if j.prediction else "no")
            mark = "ok   " if j.ok and j.prediction == j.truth else "WRONG"
            tag = f"{mark} predicted {pred:<4} truth {'yes' if j.truth else 'no':<3} "
            x = by_key.get((j.example_kind, j.example_id))
            if x is None:
                _print(con, f"  {tag}({j.example_kind} #{j.example_id}: context not stored)")
            else:
                _context_line(con, x, plain, prefix=tag)


# ============================================================================= show circuit
def sign_convention(method: str, metric: str, ablation: str) -> str:
    """What the sign of a stored edge score means for a search ``method`` on ``metric`` (tools/circuits.py)."""
    if method == "acdc":
        what = "the increase of KL to the clean run" if metric == "kl" else f"|change| of {metric}"
        return (f"edge scores (ACDC): {what} measured when the edge is {ablation}-ablated on top of the edges "
                "already removed; never negative (unsigned); an edge is kept when its score >= tau")
    if metric == "kl":
        meaning = ("positive = ablating the edge moves the output away from the clean run (the edge matters); "
                   "negative = ablating it moves the output closer to the clean run")
    else:
        meaning = (f"negative = ablating the edge lowers {metric} (the edge supports the clean behaviour); "
                   f"positive = ablating it raises {metric} (the edge works against it)")
    how = ("the EAP-IG estimate of m(edge {a}-ablated) - m(clean), replaced by the measured change when noising "
           "that one edge (or its source node) in the clean model moved the metric more" if method == "eap-ig+noising"
           else "estimated m(edge {a}-ablated) - m(clean), the first-order change of {m} when that one edge is "
                "patched").format(a=ablation, m=metric)
    return f"edge score sign ({method}): score = {how}; {meaning}; edges are ranked and kept by |score|"


def circuit(circuit_id: Annotated[str, typer.Argument(metavar="ID", help="a circuit id (circ-…), as printed by "
                                                                          "autoexplain circuit")],
            db: DbOpt = None,
            all_edges: Annotated[bool, typer.Option("--all-edges", help="list every scored edge, not only the "
                                                                        "circuit's")] = False) -> None:
    """A circuit: how it was found, its full explanation and scores, its edges with their scores (and what the
    sign of an edge score means), and its nodes."""
    from autoexplain.agent.store import queries

    if not circuit_id.strip():
        raise InputError("pass a circuit id (autoexplain sql \"select circuit_id, task from circuits\" lists them)")
    store = _reader(db)
    c = queries.circuit_record(store, circuit_id.strip())
    if c is None:
        have = queries.circuit_listing(store)
        listing = ", ".join(f"{cid} ({task}, {method}, {n} edges)" for cid, task, method, n in have[:10]) or "none"
        more = f" and {len(have) - 10} more" if len(have) > 10 else ""
        raise InputError(f"unknown circuit {circuit_id!r} in {str(store.path)!r}: stored circuits are "
                         f"{listing}{more}")
    con = console()
    d = c.details
    sel = f"top {c.top_k} edges" if c.top_k is not None else (
        f"|score| >= {c.threshold:g} x |m(M) - m(empty)|" if c.threshold is not None else "-")
    _print(con, f"circuit {c.circuit_id}: task {c.task}, model {c.model_id}")
    _print(con, f"  {c.method}, {c.ablation} ablation, {c.patch_type} patching, metric {c.metric}; {c.n_edges} of "
                f"{c.n_edges_total} edges kept ({sel})")
    _print(con, f"  faithfulness {_fmt(c.faithfulness)}   m(M) {_fmt(d.get('m_clean'), 4)}   m(empty) "
                f"{_fmt(d.get('m_ablated'), 4)}   run {c.run_id}   created {c.created_at}")
    mech = queries.circuit_mechanism_scores(store, c.circuit_id)
    if mech:
        _print(con, f"  necessity {_fmt(mech['necessity'])}   held-out faithfulness "
                    f"{_fmt(mech['held_out_faithfulness'])}   robustness: edge Jaccard "
                    f"{_fmt(mech['robustness_jaccard'])}, Spearman {_fmt(mech['robustness_spearman'])}")
    if d.get("task_file"):
        _print(con, f"  task file {d['task_file']}")
    if d.get("note"):
        _print(con, f"  note: {d['note']}")
    if d.get("curve"):
        _print(con, "  faithfulness by % of edges kept: " + "  ".join(
            f"{p.get('percent'):g}%: {_fmt(p.get('faithfulness'), 2)}" for p in d["curve"]))

    expl = queries.explanations_of_item(store, c.item_id) if c.item_id else []
    scores = queries.explanation_scores(store, [e.explanation_id for e in expl])
    con.print()
    if not expl:
        _print(con, "explanation: none stored (the circuit was found outside the agent)")
    for e in expl:
        tag = "final" if e.is_final else "draft"
        _print(con, f"explanation [{tag}, causal level {e.causal_level}, author {e.author}]:")
        _print(con, e.text)  # never cut
        own = [s for s in scores.get(e.explanation_id, []) if s.details.get("circuit_id") in (None, c.circuit_id)]
        _print(con, f"  scores: {_score_line(own)}")
        if own:
            det = own[0].details
            keys = [k for k in ("ablation", "patch_type", "metric") if k in det]
            if keys:
                _print(con, "  scored with " + ", ".join(f"{k} {det[k]}" for k in keys))

    edges = queries.circuit_edges(store, c.circuit_id)
    con.print()
    _print(con, sign_convention(c.method, c.metric, c.ablation))
    kept = [x for x in edges if x.in_circuit]
    if kept and c.method != "acdc":
        neg = sum(1 for x in kept if (x.score or 0) < 0)
        _print(con, f"  in this circuit: {neg} of {len(kept)} kept edges negative, {len(kept) - neg} positive")
    from rich.table import Table

    shown = edges if all_edges else kept
    t = Table("rank", "edge", "score", "in circuit")
    for x in shown:
        t.add_row(str(x.rank), x.edge, _fmt(x.score, 4) if x.score is None or abs(x.score) >= 1e-4 else
                  f"{x.score:.2e}", "yes" if x.in_circuit else "")
    con.print(t)
    if not all_edges and len(edges) > len(kept):
        _print(con, f"({len(edges) - len(kept)} scored edges outside the circuit: --all-edges lists them)")

    nodes: dict[str, list[int]] = {}
    for x in kept:
        nodes.setdefault(x.src, [0, 0])[1] += 1
        dst = x.dst.rsplit(".", 1)[0] if x.dst.endswith((".q", ".k", ".v")) else x.dst
        nodes.setdefault(dst, [0, 0])[0] += 1
    if nodes:
        _print(con, "nodes (edges in, out): " + ", ".join(f"{n} ({i}, {o})" for n, (i, o) in sorted(nodes.items())))
    mech_nodes = queries.circuit_nodes(store, c.circuit_id)
    if mech_nodes:
        con.print(node_table(mech_nodes, scored_effect(d)))
    else:
        _print(con, "mechanism: no node roles or mediation stored for this circuit")
    if c.item_id:
        _node_effects(con, store, c.item_id, set(nodes))


def _node_name(site: str) -> str:
    """``head_out.1.2`` -> ``a1.2``, ``mlp_out.1`` -> ``m1`` (graph node names); other sites as they are."""
    kind, _, rest = site.partition(".")
    return {"head_out": f"a{rest}", "mlp_out": f"m{rest}"}.get(kind, site)


def _node_effects(con: Any, store: ReadOnlyStore, item_id: str, in_circuit: set[str]) -> None:
    """Each node's own effect from the item's stored activation-patching calls (node patching: the share of the
    full effect one node's patch alone carries), circuit nodes marked."""
    import json

    from autoexplain.agent.store import queries

    for raw in queries.item_tool_outputs(store, item_id, "activation_patching"):
        out = json.loads(raw)
        effects = sorted(out.get("effects") or [], key=lambda e: -abs(e.get("effect") or 0))
        if not effects:
            continue
        _print(con, f"node effects ({out.get('direction')} activation patching of every {out.get('kind')}, "
                    f"{out.get('ablation')} ablation, metric {out.get('metric')}; 1 = this node's patch alone moves "
                    "the metric as far as ablating everything; * = in the circuit):")
        names = [_node_name(str(e["site"])) for e in effects[:16]]
        _print(con, "  " + "  ".join(f"{n}{'*' if n in in_circuit else ''} {e['effect']:+.2f}"
                                     for n, e in zip(names, effects, strict=False)))


# ============================================================================= show run
def run(run_id: Annotated[str, typer.Argument(metavar="ID", help="a run id, as printed by the command that ran "
                                                                  "it")],
        db: DbOpt = None,
        items: Annotated[int, typer.Option("--items", help="work items listed")] = 20) -> None:
    """A run: its status and times, items by status, the budgets it had and what it used, its summary, and its
    items with their final explanations."""
    from autoexplain.agent.store import queries

    if not run_id.strip():
        raise InputError("pass a run id (autoexplain sql \"select run_id, kind from runs\" lists them)")
    if items < 0:
        raise InputError("--items must be >= 0")
    store = _reader(db)
    r = queries.run_record(store, run_id.strip())
    if r is None:
        have = queries.run_listing(store, 10)
        listing = ", ".join(f"{rid} ({kind}, {status})" for rid, kind, status in have) or "none"
        raise InputError(f"unknown run {run_id!r} in {str(store.path)!r}: the newest runs there are {listing}")
    con = console()
    took = ""
    if r.finished_at is not None and r.started_at is not None:
        took = f" ({(r.finished_at - r.started_at).total_seconds():.1f} s)"
    _print(con, f"run {r.run_id}: {r.kind}, status {r.status}" + (f", policy {r.policy}" if r.policy else ""))
    _print(con, f"  started {r.started_at}, finished {r.finished_at or '-'}{took}; host {r.host or '-'}, "
                f"autoexplain {r.version or '-'}")
    plan = r.config.get("plan") or {}
    if plan:
        _print(con, f"  model {plan.get('model')}, judge {plan.get('judge', '-')}, {len(plan.get('items') or [])} "
                    "plan entries")
    elif r.config:
        _print(con, "  config: " + ", ".join(f"{k} {v}" for k, v in r.config.items()))

    counts = queries.run_item_counts(store, r.run_id)
    con.print()
    if counts:
        _print(con, "items by status: " + "; ".join(
            f"{kind} {status} {n}" for kind, status, n in counts))
        # run_summary is typed for a Store; it only calls .query, which a ReadOnlyStore answers read-only
        for s in queries.run_summary(cast("Store", store), r.run_id):
            _print(con, f"  {s.kind}: {s.items} items, {s.done} done, {s.weak} weak, {s.no_behaviour} no behaviour, "
                        f"{s.budget_limited} budget-limited, {s.failed} failed, {s.pending} pending, {s.dead} dead; "
                        f"mean correctness {_fmt(s.mean_correctness)}, completeness "
                        f"{_fmt(s.mean_completeness)}, succinctness {_fmt(s.mean_succinctness)}")
        u = queries.run_usage(store, r.run_id)
        budget, run_budget = plan.get("budget") or {}, plan.get("run_budget") or {}
        _print(con, f"budgets used: {u.steps} graph steps (most by one item {u.max_steps}; limit per item "
                    f"{budget.get('steps', '-')}), {u.tokens:,} LLM tokens (most {u.max_tokens:,}; limit "
                    f"{budget.get('llm_tokens', '-')}), {u.seconds:.1f} item-seconds (most {u.max_seconds:.1f}; "
                    f"limit {budget.get('seconds', '-')}); {u.tool_calls} tool calls, {u.llm_calls} LLM calls")
        limits = ", ".join(f"{k} {v}" for k, v in run_budget.items() if v is not None)
        if limits:
            _print(con, f"  run budget: {limits}")
        if u.stopped_by:
            _print(con, "  items stopped by a budget: " + ", ".join(f"{k} {n}" for k, n in u.stopped_by.items()))
    else:
        _print(con, "items: none (this run kind has no work items)")

    if r.summary:
        con.print()
        _print(con, "summary:")
        for k, v in r.summary.items():
            _print(con, f"  {k}: {v}")
    if counts and items:
        listed = queries.run_items(store, r.run_id, items)
        con.print()
        _print(con, f"items (first {len(listed)}):")
        for it in listed:
            text = it.text or (f"error: {it.error}" if it.error else "-")
            _print(con, f"  {it.status:>14}  {it.kind:<8} {it.target}  overall {_fmt(it.overall)}  {text}")


show_app.command("feature")(feature)
show_app.command("circuit")(circuit)
show_app.command("run")(run)
