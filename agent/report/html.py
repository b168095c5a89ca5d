"""HTML and SVG building blocks of the report: escaping, page frame, highlighted contexts and small plots.

Everything a database holds is untrusted text (harvested contexts, labels an LLM wrote, tool summaries): every value
goes through :func:`esc` before it reaches markup, and the pages run no inline script (a Content-Security-Policy
forbids it), so a context holding ``<script>`` shows as text and could not run even if an escape were missed. The
plots are inline SVG written here (no plotting library, nothing fetched): histograms, bar charts, a line chart and a
heatmap, each with its axes labelled and its values in ``<title>`` tooltips.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from functools import lru_cache

#: Content-Security-Policy of every page: scripts and styles only from files (``file:`` too: browsers disagree on
#: whether 'self' covers other files), no inline script, no network (inline style attributes colour the tokens).
CSP = ("default-src 'none'; script-src 'self' file:; style-src 'self' file: 'unsafe-inline'; img-src 'self' file: "
       "data:; connect-src 'none'; base-uri 'none'; form-action 'none'")


def esc(value: object) -> str:
    """``value`` as HTML text (quotes escaped too, so it is safe inside attributes)."""
    if type(value) is str and len(value) <= 64:  # short strings repeat (kinds, splits, tokens): memoised
        return _esc_short(value)
    return html.escape(str(value), quote=True)


@lru_cache(maxsize=65536)
def _esc_short(value: str) -> str:
    return html.escape(value, quote=True)


def fmt(x: float | None, digits: int = 3) -> str:
    """A number for a table cell; '–' for a value that could not be computed (stored as NULL)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if x != 0 and abs(x) < 10 ** -digits:
        return f"{x:.1e}"
    return f"{x:.{digits}f}"


def page(title: str, body: str, *, root: str, scripts: Sequence[str] = ()) -> str:
    """A whole document: ``root`` is the relative path to the report's top folder ("", "../", "../../")."""
    tags = "".join(f'<script src="{esc(root + s)}"></script>' for s in scripts)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{esc(title)}</title><link rel="stylesheet" href="{esc(root)}static/report.css"></head>'
            f'<body><nav><a href="{esc(root)}index.html">autoexplain report</a></nav><main>{body}</main>{tags}'
            f'</body></html>')


def table(head: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    """A table whose cells are already HTML (escape text before passing it)."""
    h = "".join(f"<th>{c}</th>" for c in head)
    b = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{esc(cls)}"><thead><tr>{h}</tr></thead><tbody>{b}</tbody></table>'


# ----------------------------------------------------------------------------- highlighted contexts
@lru_cache(maxsize=65536)
def _tok_text(token: str) -> str:
    """A token as visible, escaped text: newlines and tabs shown as symbols (spaces kept: the CSS keeps them)."""
    return esc(token.replace("\n", "↵").replace("\t", "⇥") or "∅")


@lru_cache(maxsize=65536)
def _cold(token: str) -> str:
    return f"<i>{_tok_text(token)}</i>"


def context_html(tokens: Sequence[str], acts: Sequence[float], peak: float | None) -> str:
    """One context, every token an ``i`` element (short markup: a feature page holds thousands); a firing token
    (activation > 0) is ``i.h``, its background opacity its activation over ``peak`` (the feature's maximum) and its
    activation in the tooltip. The number of ``.ctx i`` equals ``len(tokens)``; of ``.ctx i.h``, the number of
    positive activations (the browser test counts both)."""
    if not acts or max(acts) <= 0:
        return '<span class="ctx">' + "".join(map(_cold, tokens)) + "</span>"
    return _highlighted(tokens, acts, peak, _cold)


def context_compact(tokens: Sequence[str], acts: Sequence[float], peak: float | None) -> str:
    """A context as text with only its firing tokens marked (``i.h``): for lists that repeat contexts (judged
    contexts), a fraction of :func:`context_html`'s size."""
    if not acts or max(acts) <= 0:
        return '<span class="ctx">' + esc("".join(tokens).replace("\n", "↵")) + "</span>"
    return _highlighted(tokens, acts, peak, _tok_text)


def _highlighted(tokens: Sequence[str], acts: Sequence[float], peak: float | None,
                 cold: Callable[[str], str]) -> str:
    """A context whose firing tokens are ``i.h`` (opacity: activation over ``peak``, else over the context's
    maximum) and whose other tokens are rendered by ``cold``."""
    top = peak if peak and peak > 0 else max(a for a in acts if a > 0)
    parts = ['<span class="ctx">']
    add = parts.append
    for tok, a in zip(tokens, acts, strict=False):
        if a > 0:
            add(f'<i class="h" style="--a:{max(min(1.0, a / top), 0.08):.2f}" title="{a:.3g}">{_tok_text(tok)}</i>')
        else:
            add(cold(tok))
    add("</span>")
    return "".join(parts)


# ----------------------------------------------------------------------------- plots (inline SVG)
_W, _H, _PAD = 360, 150, 34


def _axis(x_label: str, y_label: str, w: int = _W, h: int = _H) -> str:
    return (f'<line class="ax" x1="{_PAD}" y1="{h - _PAD}" x2="{w - 6}" y2="{h - _PAD}"/>'
            f'<line class="ax" x1="{_PAD}" y1="6" x2="{_PAD}" y2="{h - _PAD}"/>'
            f'<text class="lbl" x="{(w + _PAD) / 2:.0f}" y="{h - 4}" text-anchor="middle">{esc(x_label)}</text>'
            f'<text class="lbl" x="10" y="{(h - _PAD) / 2:.0f}" text-anchor="middle" '
            f'transform="rotate(-90 10 {(h - _PAD) / 2:.0f})">{esc(y_label)}</text>')


def bars_svg(labels: Sequence[str], values: Sequence[float], *, x_label: str, y_label: str, cls: str = "bar",
             tick_every: int = 1) -> str:
    """Vertical bars, one per label (values >= 0)."""
    n = max(len(values), 1)
    top = max(values, default=0) or 1
    bw = (_W - _PAD - 10) / n
    out = [f'<svg class="plot" viewBox="0 0 {_W} {_H}" width="{_W}" height="{_H}" role="img">',
           _axis(x_label, y_label)]
    for i, (lab, v) in enumerate(zip(labels, values, strict=True)):
        h = (_H - _PAD - 10) * v / top
        x = _PAD + 2 + i * bw
        out.append(f'<rect class="{esc(cls)}" x="{x:.1f}" y="{_H - _PAD - h:.1f}" width="{max(bw - 1, 0.5):.1f}" '
                   f'height="{h:.1f}"><title>{esc(lab)}: {esc(fmt(v, 3) if isinstance(v, float) else v)}</title>'
                   '</rect>')
        if i % tick_every == 0:
            out.append(f'<text class="tick" x="{x + bw / 2:.1f}" y="{_H - _PAD + 11}" text-anchor="middle">'
                       f'{esc(lab)}</text>')
    out.append(f'<text class="tick" x="{_PAD - 3}" y="14" text-anchor="end">{top:.3g}</text></svg>')
    return "".join(out)


def histogram_svg(hist: dict[str, object] | None) -> str:
    """A feature's activation histogram (``features.histogram``: bin edges and counts, with one bin below the
    first edge and one above the last)."""
    if not hist:
        return '<p class="muted">no histogram stored</p>'
    edges = [float(e) for e in hist.get("edges") or []]  # type: ignore[attr-defined]
    counts = [float(c) for c in hist.get("counts") or []]  # type: ignore[attr-defined]
    if not edges or not counts:
        return '<p class="muted">no histogram stored</p>'
    nz = [i for i, c in enumerate(counts) if c > 0]
    if not nz:
        return '<p class="muted">never fired: empty histogram</p>'
    a, b = max(0, nz[0] - 1), min(len(counts), nz[-1] + 2)  # the bins that fired, one empty bin either side
    labels: list[str] = []
    for i in range(a, b):
        lo = edges[i - 1] if 0 < i <= len(edges) else None
        hi = edges[i] if i < len(edges) else None
        labels.append(f"<{hi:.3g}" if lo is None and hi is not None else
                      f"≥{lo:.3g}" if hi is None and lo is not None else f"{lo:.3g}–{hi:.3g}")
    tick = max(1, (b - a) // 5)
    return bars_svg(labels, counts[a:b], x_label="activation (firing tokens; log-spaced bins)", y_label="tokens",
                    tick_every=tick)


def distribution_svg(values: Sequence[float | None], *, name: str, bins: int = 10) -> str:
    """How ``values`` (scores in [0, 1]) spread: a histogram of ``bins`` equal bins; missing values counted in the
    caption, never as 0."""
    have = [v for v in values if v is not None]
    counts = [0.0] * bins
    for v in have:
        counts[min(bins - 1, max(0, int(v * bins)))] += 1
    labels = [f"{i / bins:.1f}–{(i + 1) / bins:.1f}" for i in range(bins)]
    missing = len(values) - len(have)
    cap = f"{name}: {len(have)} scored" + (f", {missing} not computed" if missing else "")
    return (f'<figure>{bars_svg(labels, counts, x_label=name, y_label="labels", tick_every=2)}'
            f"<figcaption>{esc(cap)}</figcaption></figure>")


def line_svg(series: Sequence[tuple[str, Sequence[tuple[float, float | None]]]], *, x_label: str, y_label: str,
             log_x: bool = False, y_range: tuple[float, float] | None = None) -> str:
    """Lines through (x, y) points, one per named series (points with y None are skipped)."""
    pts = [(x, y) for _, s in series for x, y in s if y is not None]
    if not pts:
        return '<p class="muted">no points stored</p>'

    def tx(x: float) -> float:
        return math.log10(max(x, 1e-9)) if log_x else x

    xs = [tx(x) for x, _ in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = y_range or (min(0.0, round(min(y for _, y in pts), 2)), max(1.0, round(max(y for _, y in pts), 2)))
    w, h = 420, 200

    def px(x: float) -> float:
        return _PAD + (w - _PAD - 10) * ((tx(x) - x0) / ((x1 - x0) or 1))

    def py(y: float) -> float:
        return h - _PAD - (h - _PAD - 10) * ((y - y0) / ((y1 - y0) or 1))

    out = [f'<svg class="plot" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img">',
           _axis(x_label, y_label, w, h)]
    for yv in (y0, y1):
        out.append(f'<text class="tick" x="{_PAD - 3}" y="{py(yv) + 4:.1f}" text-anchor="end">{yv:.2f}</text>')
    for x, _ in series[0][1] if series else []:
        out.append(f'<text class="tick" x="{px(x):.1f}" y="{h - _PAD + 11}" text-anchor="middle">{x:g}</text>')
    for i, (name, s) in enumerate(series):
        ok = [(x, y) for x, y in s if y is not None]
        d = " ".join(f"{'M' if j == 0 else 'L'}{px(x):.1f},{py(y):.1f}" for j, (x, y) in enumerate(ok))
        out.append(f'<path class="line s{i}" d="{d}"><title>{esc(name)}</title></path>')
        out += [f'<circle class="dot s{i}" cx="{px(x):.1f}" cy="{py(y):.1f}" r="3"><title>{esc(name)}: '
                f'{x:g} → {y:.3f}</title></circle>' for x, y in ok]
        out.append(f'<text class="legend s{i}" x="{_PAD + 8}" y="{16 + 14 * i}">{esc(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def heatmap_svg(values: Sequence[Sequence[float | None]], rows: Sequence[str], cols: Sequence[str], *,
                lo: float = 0.0, hi: float = 1.0, cell_text: Sequence[Sequence[str]] | None = None,
                caption: str = "", cell: int = 22, diverging: bool = False) -> str:
    """A grid of coloured cells (rows x cols); a None cell is hatched grey ("not computed"), never coloured as 0.
    ``diverging``: negative values red, positive blue (scale ``max(|lo|, |hi|)``)."""
    left = 8 + 7 * max((len(r) for r in rows), default=4)
    top = 8 + 6 * min(14, max((len(c) for c in cols), default=4))
    w, h = left + cell * len(cols) + 8, top + cell * len(rows) + 8
    out = [f'<svg class="heat" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img">']
    for j, c in enumerate(cols):
        x = left + j * cell + cell / 2
        out.append(f'<text class="tick" transform="translate({x:.1f},{top - 4}) rotate(-60)">{esc(c[:14])}</text>')
    scale = max(abs(lo), abs(hi)) or 1.0
    for i, r in enumerate(rows):
        y = top + i * cell
        out.append(f'<text class="tick" x="{left - 4}" y="{y + cell / 2 + 4:.1f}" text-anchor="end">{esc(r)}</text>')
        for j, v in enumerate(values[i]):
            x = left + j * cell
            label = f"{rows[i]} × {cols[j]}: " + ("not computed" if v is None else f"{v:.3g}")
            if cell_text is not None:
                label += f" ({cell_text[i][j]})"
            if v is None:
                out.append(f'<rect class="na" x="{x}" y="{y}" width="{cell}" height="{cell}">'
                           f"<title>{esc(label)}</title></rect>")
                continue
            if diverging:
                a = min(1.0, abs(v) / scale)
                fill = f"rgba(33,102,172,{a:.2f})" if v >= 0 else f"rgba(178,24,43,{a:.2f})"
            else:
                a = min(1.0, max(0.0, (v - lo) / ((hi - lo) or 1)))
                fill = f"rgba(230,85,13,{a:.2f})"
            out.append(f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="{fill}" class="cell">'
                       f"<title>{esc(label)}</title></rect>")
            if cell_text is not None and cell_text[i][j]:
                out.append(f'<text class="ctext" x="{x + cell / 2:.1f}" y="{y + cell / 2 + 3:.1f}" '
                           f'text-anchor="middle">{esc(cell_text[i][j][:4])}</text>')
    out.append("</svg>")
    fig = "".join(out)
    return f"<figure>{fig}<figcaption>{esc(caption)}</figcaption></figure>" if caption else fig
