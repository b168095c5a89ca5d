"""A feature's page, after Neuronpedia's: labels with their scores, statistics, histogram, logits, contexts.

Shown, in order: every label of the feature (final first) with correctness, completeness, succinctness, the
simulation score and the causal level it claims against the level its cited evidence supports; density and the
activation histogram; the tokens its decoder direction promotes and suppresses (top and bottom logits); the top and
quantile contexts with every token coloured by its activation (opacity = activation / the feature's maximum) and
each context marked E (explain split: what the labeller saw) or S (score split: held out for scoring); each judged
context with what the judge predicted from the label against the truth; and the hypotheses the agent tested with
the tool calls each rests on. A score that could not be computed shows '–' (it is NULL in the database), never 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from autoexplain.agent.report.html import context_compact, context_html, esc, fmt, histogram_svg, page, table

if TYPE_CHECKING:
    from autoexplain.agent.store.queries import (
        ReportExplanation,
        ReportFeature,
        ReportHypothesis,
        ReportItem,
        ReportJudgementSet,
        ReportToolCall,
        StoredExample,
        StoredScore,
    )

#: The scores shown beside each label, in order (others are listed in the label's details).
LABEL_SCORES = ("correctness", "completeness", "succinctness", "simulation", "detection", "fuzzing")


@dataclass
class FeatureView:
    """Everything one feature page shows (read from the store in bulk by the builder)."""

    name: str  #: the spec a user types: toy:small/res0#7
    sae_id: str
    index: int
    site: str
    model_id: str | None
    stats: ReportFeature | None
    labels: list[ReportExplanation] = field(default_factory=list)
    scores: dict[str, list[StoredScore]] = field(default_factory=dict)
    judgements: list[ReportJudgementSet] = field(default_factory=list)
    examples: list[StoredExample] = field(default_factory=list)
    items: list[ReportItem] = field(default_factory=list)
    hypotheses: list[ReportHypothesis] = field(default_factory=list)
    calls: dict[str, ReportToolCall] = field(default_factory=dict)


def _score_cells(scores: Sequence[StoredScore]) -> list[str]:
    by = {s.metric: s for s in scores}
    out = []
    for m in LABEL_SCORES:
        s = by.get(m)
        out.append("–" if s is None else f'<span class="num">{esc(fmt(s.value, 2))}</span>'
                   f'<span class="n">n {esc(s.n if s.n is not None else "–")}</span>')
    return out


def _level(e: ReportExplanation) -> str:
    sup = e.supported_level or "none cited"
    warn = ' <span class="bad">overclaimed</span>' if e.overclaimed else ""
    return f"{esc(e.causal_level)} / {esc(sup)}{warn}"


def _labels(v: FeatureView) -> str:
    if not v.labels:
        return '<p class="muted">never labelled (autoexplain label)</p>'
    rows = []
    for e in v.labels:
        tag = "final" if e.is_final else "draft"
        if e.budget_limited:
            tag += ", budget-limited"
        author = e.author + (f" ({e.llm_model})" if e.llm_model else "")
        rows.append([f'<span class="tag {"final" if e.is_final else "draft"}">{esc(tag)}</span>',
                     f'<span class="label">{esc(e.text)}</span><div class="muted">by {esc(author)}; judge '
                     f'{esc(e.judge or "–")}; run {esc(e.run_id)}</div>',
                     *_score_cells(v.scores.get(e.explanation_id, [])), _level(e)])
    return table(["", "label", *LABEL_SCORES, "causal level claimed / supported"], rows, "labels")


def _stats(v: FeatureView) -> str:
    s = v.stats
    if s is None:
        return '<p class="muted">statistics: not harvested</p>'
    dead = ' <span class="bad">dead (never fired)</span>' if s.is_dead else ""
    facts = (f"<p>density <b>{esc(fmt(s.density, 5))}</b> over {esc(fmt(s.n_tokens))} tokens; max activation "
             f"<b>{esc(fmt(s.max_act))}</b>; mean when firing {esc(fmt(s.mean_act))}{dead}</p>")
    logits = []
    for title, lst, cls in (("top logits (promoted)", s.top_logits, "pos"), ("bottom logits (suppressed)",
                                                                             s.bottom_logits, "neg")):
        if lst:
            logits.append(f'<div class="logits"><h3>{esc(title)}</h3>' + table(
                ["token", "effect"], [[f'<span class="tokbox">{esc(t)}</span>', f'<span class="{cls}">{v:+.3f}</span>']
                                      for t, v in lst[:10]]) + "</div>")
    return (facts + '<div class="row"><figure>' + histogram_svg(s.histogram) +
            "<figcaption>activations when firing</figcaption></figure>" + "".join(logits) + "</div>")


def _example_row(x: StoredExample, peak: float | None, prefix: str = "") -> str:
    split = {"explain": ("E", "explain split: the labeller saw this context"),
             "score": ("S", "score split: held out for scoring")}.get(x.split or "", ("?", "split never fixed"))
    what = f"q{x.quantile}" if x.kind == "quantile" and x.quantile is not None else x.kind
    return (f'<div class="ex" data-kind="{esc(x.kind)}" data-id="{x.example_id}">{prefix}'
            f'<span class="split {esc(x.split or "none")}" title="{esc(split[1])}">{split[0]}</span>'
            f'<span class="meta">{esc(what)} max {esc(fmt(x.max_act, 2))}</span>'
            f"{context_html(x.tokens, x.acts, peak)}</div>")


def _examples(v: FeatureView) -> str:
    peak = v.stats.max_act if v.stats else None
    out = []
    for kind, title in (("top", "top contexts"), ("quantile", "quantile contexts (strongest bin first)")):
        rows = [x for x in v.examples if x.kind == kind]
        if rows:
            out.append(f'<h3>{esc(title)} ({len(rows)})</h3><div class="examples" data-kind="{kind}">' +
                       "".join(_example_row(x, peak) for x in rows) + "</div>")
    if not out:
        return '<p class="muted">no contexts stored</p>'
    return ('<p class="muted">E = explain split (what the labeller saw); S = score split (held out for scoring); a '
            "token's colour is its activation over the feature's maximum (hover for the value).</p>" + "".join(out))


def _judged(v: FeatureView) -> str:
    """Each judged context once, with every scorer's predictions from the final label against their truth;
    contexts some judge got wrong first. A scorer may judge one context more than once (fuzzing: with its real
    highlighting and with a random one), and its truth is then not whether the context activates: each such entry
    shows its own truth."""
    final = next((e for e in v.labels if e.is_final), None)
    if final is None:
        return ""
    if not v.judgements:
        return ('<h2>judged contexts</h2><p class="muted">none stored for the final label (dead features are not '
                "scored)</p>")
    peak = v.stats.max_act if v.stats else None
    by_key = {(x.kind, x.example_id): x for x in v.examples}
    n_sets = len(v.judgements)
    # (kind, id) -> per set, its entries: (right?, what the judge said, truth)
    verdicts: dict[tuple[str, int], list[list[tuple[bool, str, bool]]]] = {}
    summary = []
    for s, js in enumerate(v.judgements):
        right = 0
        for kind, i, truth, pred, ok in zip(js.example_kinds, js.example_ids, js.truths, js.predictions, js.oks,
                                            strict=True):
            good = bool(ok) and pred == truth
            right += good
            cells = verdicts.setdefault((kind, i), [[] for _ in range(n_sets)])
            cells[s].append((good, "fail" if not ok else ("yes" if pred else "no"), bool(truth)))
        summary.append(f"<li><b>{esc(js.scorer)}</b> by {esc(js.judge)}: {right} of {len(js.truths)} right</li>")

    def order(kv: tuple[tuple[str, int], list[list[tuple[bool, str, bool]]]]) -> tuple[bool, str, int]:
        return (all(c[0] for cell in kv[1] for c in cell), kv[0][0], kv[0][1])

    rows = []
    for (kind, i), cells in sorted(verdicts.items(), key=order):
        x = by_key.get((kind, i))
        fires = (x.max_act or 0) > 0 if x is not None else None
        shown = []
        for cell in cells:
            shown.append(" ".join(
                f'<span class="verdict {"ok" if good else "wrong"}">{said}</span>'
                + ("" if fires is not None and truth == fires else f'<span class="n">truth {"yes" if truth else "no"}'
                                                                  "</span>")
                for good, said, truth in cell))
        why = ("a window stored for another feature, drawn as a negative; its tokens are not kept with the "
               "judgement" if kind == "background" else "context not stored")
        ctx = (context_compact(x.tokens, x.acts, peak) if x is not None else
               f'<span class="muted">{esc(kind)} #{i}: {why}</span>')
        rows.append([f"{esc(kind)} #{i}", "–" if fires is None else ("yes" if fires else "no"), *shown,
                     f'<div class="ex">{ctx}</div>'])
    head = ["context", "fires", *(f'{esc(js.scorer)}<br><span class="n">{esc(js.judge)}</span>'
                                  for js in v.judgements), "tokens (firing tokens marked)"]
    return ('<h2>judged contexts</h2><p class="muted">score split; each cell is what a judge predicted from the '
            "final label, green when it matches the truth (for detection: does the context fire; a scorer whose "
            "truth is something else, such as fuzzing's real or random highlighting, shows it under the answer); "
            "contexts a judge got wrong first</p><ul>" + "".join(summary) + "</ul>" + table(head, rows, "judged"))


def _hypotheses(v: FeatureView) -> str:
    if not v.hypotheses:
        return ""
    rows = []
    for h in v.hypotheses:
        calls = []
        for cid in h.evidence:
            c = v.calls.get(cid)
            if c is None:
                calls.append(f"<li>{esc(cid)} (not stored)</li>")
                continue
            err = f' <span class="bad">error: {esc(c.error)}</span>' if c.error else ""
            calls.append(f"<li><details><summary><code>{esc(c.tool)}</code> {esc(cid)}"
                         f'{err}<span class="muted"> {esc(fmt(c.duration_s, 2))} s</span></summary>'
                         f"<pre>{esc(c.args)}</pre><pre>{esc(c.summary or '')}</pre></details></li>")
        rows.append([esc(h.text), f'<span class="tag {esc(h.status)}">{esc(h.status)}</span>',
                     esc(h.causal_level or "–"), "<ul>" + "".join(calls) + "</ul>"])
    return "<h2>hypotheses tested</h2>" + table(["hypothesis", "status", "causal level", "tool calls"], rows)


def feature_page(v: FeatureView, *, root: str) -> str:
    """The HTML of one feature's page."""
    status = ", ".join(sorted({i.status for i in v.items})) or "not a work item"
    head = (f"<h1>feature {esc(v.name)}</h1><p class=\"muted\">{esc(v.sae_id)}#{v.index} · SAE at {esc(v.site)} · "
            f"model {esc(v.model_id or '–')} · item status {esc(status)}</p>")
    body = (head + "<h2>labels</h2>" + _labels(v) + "<h2>statistics</h2>" + _stats(v) + "<h2>contexts</h2>" +
            _examples(v) + _judged(v) + _hypotheses(v))
    return page(f"feature {v.name}", body, root=root)

