"""Scoring feature explanations on held-out examples: correctness, completeness, succinctness.

Held-out split
--------------
:func:`split_examples` assigns every harvested example of a feature (``feature_examples`` kinds ``top``,
``quantile``, ``random``) to ``explain`` (what the explainer may see) or ``score`` (what the scorers use). The unit
of assignment is a *context group*: examples that share a harvested window (``window_index``) or have identical
tokens always land on the same side, so no scored context was shown to the explainer, even when the same window
is both a top and a quantile example (delphi's leak). Groups are stratified (quantile bin, else top, else random),
ordered by a 64-bit hash of ``(sae_id, seed, feature_index, group)`` and dealt to the two sides in the ratio
``explain_fraction`` — deterministic, and independent of the order rows come in. Write the result back with
:func:`autoexplain.agent.store.rows.split_rows` (``feature_examples.split``) so the split can be checked in SQL.
One vectorised function (:func:`split_explain_mask`) splits any number of features' examples at once, so a
harvest's millions of rows are split as they are written; splits already stored (an older autoexplain ordered
groups by sha256) are kept as they are, never recomputed.

Rare features: within a stratum the first group dealt goes to ``score``, so a feature whose few activating
windows each sit alone in their stratum (≤ 10 windows is typical) would have *every* activating group scored and
none left to explain from. So after dealing, if no *activating* group (one holding a ``top``/``quantile``
example with ``max_act > 0``) is on the explain side, the first activating group in dealing order moves there:
with two or more activating groups each side keeps at least one; with exactly one, it is explained from and the
score side has no positives (detection, fuzzing … are then None with the reason in their details — an honest
"cannot be scored", never "dead"). Dead means ``features.density == 0`` and nothing else.

Scorers (all on the ``score`` side only)
----------------------------------------
Each scorer is one entry of the catalogue :data:`SCORERS` (a function of a :class:`ScoringContext` returning a
:class:`ScorerOutcome`: its raw metrics as :class:`~autoexplain.evals.scores.Score` objects and its per-example
:class:`ExampleJudgement` records); a new scorer is one more entry, its metrics and judgements are stored with the
others. The scorers run in catalogue order and share one random generator.

* **detection** — the judge sees the explanation and a context and says whether the feature fires in it.
  Positives: score-side ``quantile`` then ``top`` examples (up to ``n_activating``, 50 as in delphi); negatives:
  score-side ``random`` examples (non-activating, up to ``n_nonactivating``, 50) — or, when the harvest's
  random pool held none (a dense feature fires in nearly every window), the ``background`` windows the caller
  passes: windows from elsewhere in the dataset on which the feature's activations were computed and are all
  <= 0 (kind ``background``; ``details["negatives_from"]`` says which). Batches of ``batch_size`` contexts per
  call (default: the judge's own; the LLM judge's 50). Metric: balanced accuracy ``(TPR + TNR) / 2`` over the
  judgements that succeeded; range [0, 1], 0.5 = chance, 1 = perfect, < 0.5 = anti-correlated.
* **token_detection** — the judge sees the explanation, a score-side activating window and one token position,
  and says whether the feature fires *on that token* (:meth:`~autoexplain.evals.judges.Judge.judge_tokens`).
  Positives: firing tokens of the positives; negatives: their non-firing tokens (not blank, not BOS), at most
  :data:`TOKENS_PER_WINDOW` (3) of each per window, up to ``n_activating`` / ``n_nonactivating``. Metric:
  balanced accuracy over tokens, same interval. It runs only when the score side has no non-activating window
  (otherwise its metric is None, "not run"); it needs none, so it is defined for dense features. It is None
  when the activating windows have no non-firing token (a feature firing on every token) or no positive is
  held out. Caveat: tokens of one window are correlated (hence the per-window cap), so
  its interval is somewhat narrower than the evidence warrants.
* **fuzzing** — for each activating example two versions: the true firing tokens highlighted (truth yes), and the
  same number of randomly chosen non-firing tokens of the same context highlighted (truth no). The judge says
  whether the highlighted tokens are the ones that fire. Metric: balanced accuracy, [0, 1], 0.5 = chance. It
  measures whether the explanation identifies *which* tokens fire, not merely which contexts.
* **simulation** — the judge predicts, from the explanation alone, the activation on every token (0–10) of the
  same contexts detection uses (positives and negatives together); as in OpenAI's "Language models can explain
  neurons in language models" (Bills et al., 2023; delphi's *simulation* scorer too). True activations are
  normalised per feature to [0, 10] by their maximum over those contexts (negatives are all 0). Metric:
  ``simulation_correlation`` = Pearson r between simulated and true activations over *all* tokens of the
  successfully simulated contexts (activating and non-activating together, one long vector); range [−1, 1],
  0 = chance, 1 = the explanation predicts where and how strongly it fires. None when either side is constant
  (e.g. every simulation failed, or the judge predicted 0 everywhere). The lexical judge predicts 0/10, so it
  cannot reproduce graded activations: even an exact description scores below 1 on a graded feature (0.88 on
  the planted four-level animal feature, 0.93–0.96 on the two- and three-level ones, 1.0 on the one-token one).
  A row per context goes to ``judgements`` (scorer ``simulation``: truth = the context activates, prediction =
  some simulated value > 0, raw = the simulated values and the context's own r where defined).
* **embedding** — cosine similarity (MiniLM) of the explanation to activating vs non-activating contexts; metric:
  ROC AUC, [0, 1], 0.5 = chance. Needs an :class:`~autoexplain.evals.judges.EmbeddingJudge` (passed as ``judge``
  or ``embedder``); None otherwise.

The three scores
----------------
* **correctness** = detection balanced accuracy when the score side has both activating and non-activating
  windows (pool or background); otherwise, when it has activating windows only (a dense feature), the
  token-level detection balanced accuracy. ``correctness_from`` (and the stored correctness row's
  ``details.scorer``) names which; ``n_positive`` / ``n_negative`` and the interval are that scorer's. When
  neither is defined, correctness is None with the reason: the draft is *unscored*, and the agent ranks it below
  every scored one (never as if it were 0). High: the explanation predicts which contexts (tokens) fire. A too-broad
  explanation ("any word") gets TPR 1, TNR ≈ 0 → ≈ 0.5. The simulation correlation is reported beside it as its
  own metric (``simulation``), not folded in. Why not ``mean(BA, (1 + r)/2)``: the two live on different
  scales (r = 0 is chance, but r's spread under chance depends on how many tokens fire, while BA's 0.5 does
  not); r is capped below 1 for judges that cannot grade (lexical: 0/10) and for MiniLM on single tokens, so
  mixing it in would penalise an exact description for its judge's limits, and a judge-dependent offset would
  blur the known-answer tests (true ≫ false, broad ≈ 0.5) that make correctness interpretable. Read both:
  correctness says *which contexts*, simulation says *which tokens and how strongly*.
* **completeness** = ``½·R + ½·max(0, 2·F − 1)`` where ``R`` is the mean over activation-quantile bins of the
  detection recall on that bin's score-side ``quantile`` examples (weak bins count as much as strong ones), and
  ``F`` the fuzzing balanced accuracy, rescaled so that chance is 0. When one part is missing (no quantile
  examples, or every fuzzing judgement failed) the other alone is used; None if both are. Range [0, 1]. High:
  the explanation covers weak activations as well as strong ones, and names the tokens that fire. A too-narrow
  explanation (one member of a category — typically the strongest one) misses the bins it does not name.
* **succinctness** = ``exp(−(words − 1) / L) / (1 + C · extra_disjuncts)`` with ``L = 16`` words and ``C = 0.5``;
  ``words`` = whitespace-separated pieces containing a letter or digit (at least 1), ``extra_disjuncts`` = number
  of ``' or '``, ``'/'``, ``'|'``, ``';'`` and ``','`` in the text (each adds an alternative to a list). Range (0, 1],
  1 for a one-word explanation, strictly decreasing in both counts. Caveat: a comma in a subordinate clause
  counts as a disjunct too, and ``' and '`` does not (it usually joins conditions, not alternatives).

Small n: confidence intervals
-----------------------------
The detection score carries its counts and intervals in its details (and on :class:`FeatureScores`):
``n_positive`` / ``n_negative`` (successful judgements of each class), 95 % Wilson score intervals for recall
(TPR) and specificity (TNR), and ``interval`` for the balanced accuracy ``BA = (r + s)/2``. The BA interval
recovers the variance of the sum from the two Wilson intervals (Zou & Donner's MOVER, as in Newcombe's interval
for a difference of proportions): ``L = (r + s − sqrt((r − l_r)² + (s − l_s)²)) / 2`` and
``U = (r + s + sqrt((u_r − r)² + (u_s − s)²)) / 2``. Its coverage is close to the nominal 95 % down to small n
(checked by simulation in the tests), where averaging the bounds of per-rate intervals would be needlessly wide
and a Wald interval collapses to zero width at 0/n and n/n — exactly the small-n cases a rare feature produces.
The interval covers sampling noise of the held-out examples only, not judge bias or the choice of harvest.
Correctness is detection BA, so it carries the same interval. A score that cannot be computed (no score-side
positive or negative, every judgement failed) stays None and says why in ``details["reason"]``
(and :attr:`FeatureScores.reasons`).

Caveats: scores depend on the judge (the lexical judge only reads named tokens and a few categories); failures
(``ok=False``) are excluded from every metric and reported as ``n_failures`` / ``failure_rate``; with few
held-out examples (the harvest's defaults keep 20 top, 20 quantile, 20 random per feature, half of them scored)
the scores are noisy — see the ``n_*`` fields.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import random
import re
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np
from pydantic import BaseModel, Field

from autoexplain.evals.judges import (
    SIM_MAX,
    EmbeddingJudge,
    Judge,
    Judgement,
    Simulation,
    context_text,
)
from autoexplain.evals.scores import Score, by_metric

SUCCINCTNESS_L = 16.0
SUCCINCTNESS_C = 0.5
SPLITS = ("explain", "score")


class Example(BaseModel):
    """One harvested context of a feature (a ``feature_examples`` row)."""

    kind: str
    example_id: int
    quantile: int | None = None
    split: str | None = None
    tokens: list[str]
    acts: list[float]
    max_act: float = 0.0
    window_index: int | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Example:
        """From a store row (dict); JSON strings in ``tokens`` / ``acts`` are decoded."""
        d = dict(row)
        for k in ("tokens", "acts"):
            if isinstance(d.get(k), str):
                d[k] = json.loads(d[k])
        return cls.model_validate({k: d.get(k) for k in cls.model_fields if k in d})

    @property
    def activating(self) -> bool:
        return self.kind != "random" and self.max_act > 0

    @property
    def text(self) -> str:
        return context_text(self.tokens)


def examples_from_query(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[Example]:
    """A query result (column names and rows with at least kind, example_id, tokens, acts …) as :class:`Example`s."""
    return [Example.from_row(dict(zip(columns, r, strict=True))) for r in rows]


def _h(*parts: Any) -> str:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()


# ============================================================================= held-out split
class SplitKey(NamedTuple):
    """What the held-out split reads of one example: cheap to build from a store row (no validation), so a harvest
    of millions of examples is split without making a pydantic object per row."""

    kind: str
    example_id: int
    quantile: int | None
    text: Hashable  # the example's tokens as a hashable value (a tuple): equal texts share a side
    window_index: int | None
    activating: bool  # a top or quantile example that fired (see :attr:`Example.activating`)

    @classmethod
    def of(cls, e: Example) -> SplitKey:
        return cls(e.kind, e.example_id, e.quantile, tuple(e.tokens), e.window_index, e.activating)

    @classmethod
    def of_row(cls, row: Mapping[str, Any]) -> SplitKey:
        """From a ``feature_examples`` row (``tokens`` a list, or JSON text as DuckDB returns it)."""
        tokens = row["tokens"]
        if isinstance(tokens, str):
            tokens = json.loads(tokens)
        kind = str(row["kind"])
        return cls(kind, int(row["example_id"]), row.get("quantile"), tuple(tokens), row.get("window_index"),
                   kind != "random" and float(row.get("max_act") or 0.0) > 0)


def split_sides(keys: Sequence[SplitKey], sae_id: str, feature_index: int, *, explain_fraction: float = 0.5,
                seed: int = 0) -> list[str]:
    """'explain' or 'score' for each example of one feature (see the module docstring), in order."""
    texts: dict[Hashable, int] = {}
    explain = split_explain_mask(
        sae_id, np.full(len(keys), feature_index, dtype=np.int64),
        kind=np.array([KIND_CODES.get(k.kind, OTHER_KIND) for k in keys], dtype=np.int64),
        example_id=np.array([k.example_id for k in keys], dtype=np.int64),
        quantile=np.array([-1 if k.quantile is None else k.quantile for k in keys], dtype=np.int64),
        text=np.array([texts.setdefault(k.text, len(texts)) for k in keys], dtype=np.int64),
        window=np.array([-1 if k.window_index is None else k.window_index for k in keys], dtype=np.int64),
        activating=np.array([k.activating for k in keys], dtype=bool),
        explain_fraction=explain_fraction, seed=seed)
    return [SPLITS[0] if e else SPLITS[1] for e in explain.tolist()]


#: Example kinds as :func:`split_explain_mask` reads them (any other kind: :data:`OTHER_KIND`).
KIND_CODES = {"top": 0, "quantile": 1, "random": 2}
OTHER_KIND = 3


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 values (wrapping arithmetic): a fixed, well-mixed 64-bit hash."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _pair_ids(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """An id per entry, equal exactly when both ``a`` and ``b`` are equal (ids 0, 1, ... in sorted order)."""
    order = np.lexsort((b, a))
    new = np.r_[True, (a[order][1:] != a[order][:-1]) | (b[order][1:] != b[order][:-1])]
    ids = np.empty(len(a), dtype=np.int64)
    ids[order] = np.cumsum(new) - 1
    return ids


def _components(n: int, links: Sequence[np.ndarray]) -> np.ndarray:
    """Connected components of ``n`` items joined when they share a value of any ``links`` array (-1: no link):
    each item's label is the smallest item index of its component (min-label propagation with pointer jumping)."""
    label = np.arange(n, dtype=np.int64)
    groups = []
    for link in links:
        idx = np.flatnonzero(link >= 0)
        if not idx.size:
            continue
        idx = idx[np.argsort(link[idx], kind="stable")]
        starts = np.flatnonzero(np.r_[True, link[idx][1:] != link[idx][:-1]])
        groups.append((idx, starts, np.repeat(np.arange(starts.size), np.diff(np.r_[starts, idx.size]))))
    while True:
        before = label.copy()
        for idx, starts, member in groups:
            low = np.minimum.reduceat(label[idx], starts)
            np.minimum.at(label, label[idx], low[member])  # join the roots too, so chains collapse quickly
            label[idx] = np.minimum(label[idx], low[member])
        while True:  # pointer jumping: every label to its root
            nxt = label[label]
            if np.array_equal(nxt, label):
                break
            label = nxt
        if np.array_equal(label, before):
            return label


def split_explain_mask(sae_id: str, feature: np.ndarray, *, kind: np.ndarray, example_id: np.ndarray,
                       quantile: np.ndarray, text: np.ndarray, window: np.ndarray, activating: np.ndarray,
                       explain_fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """The held-out split of many features' examples at once, column by column: ``True`` = explain side.

    One entry per example: ``feature`` its feature index, ``kind`` a :data:`KIND_CODES` value, ``example_id``,
    ``quantile`` (-1: none), ``text`` an id equal for equal token sequences (within a feature), ``window`` the
    harvested window (-1: unknown) and ``activating`` (a top/quantile example that fired). Context groups (shared
    window or text, within a feature) are stratified (quantile bin, else top, else the rest), ordered by a 64-bit
    hash of (``sae_id``, ``seed``, feature, the group's smallest (kind, example_id)) and dealt in the ratio
    ``explain_fraction``; then the rare-feature rule (module docstring). Vectorised: no Python work per example,
    so a harvest's millions of rows are split as they are written; :func:`split_sides` is the same function for one
    feature's list of keys. Depends only on the examples' values, not on their order."""
    if not 0.0 < explain_fraction < 1.0:
        raise ValueError("explain_fraction must be in (0, 1)")
    n = len(feature)
    if n == 0:
        return np.zeros(0, dtype=bool)
    feature = feature.astype(np.int64)
    # context groups: examples of one feature that share a window or a text
    win_key = np.where(window >= 0, _pair_ids(feature, window), -1)
    text_key = _pair_ids(feature, text)
    group = np.unique(_components(n, [win_key, text_key]), return_inverse=True)[1].reshape(-1)
    n_groups = int(group.max()) + 1
    # per group: its feature, stratum (quantile bin < top < the rest), identity and whether it fires
    g_feature = np.zeros(n_groups, dtype=np.int64)
    g_feature[group] = feature
    big = np.int64(1 << 32)
    is_q = kind == KIND_CODES["quantile"]
    member_stratum = np.where(is_q, np.maximum(quantile, 0),
                              np.where(kind == KIND_CODES["top"], big, 2 * big))
    g_stratum = np.full(n_groups, 3 * big, dtype=np.int64)
    np.minimum.at(g_stratum, group, member_stratum)
    g_ident = np.full(n_groups, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(g_ident, group, kind.astype(np.int64) * (np.int64(1) << 40) + example_id)
    g_fires = np.zeros(n_groups, dtype=bool)
    np.logical_or.at(g_fires, group, activating.astype(bool))
    base = int.from_bytes(hashlib.sha256(f"split\x1f{sae_id}\x1f{seed}".encode()).digest()[:8], "little")
    h = mix64(mix64(np.uint64(base) ^ g_feature.astype(np.uint64)) ^ g_ident.astype(np.uint64))
    order = np.lexsort((g_ident, h, g_stratum, g_feature))  # dealing order: feature, stratum, hash
    f_o, s_o = g_feature[order], g_stratum[order]
    new_run = np.r_[True, (f_o[1:] != f_o[:-1]) | (s_o[1:] != s_o[:-1])]
    run_start = np.maximum.accumulate(np.where(new_run, np.arange(n_groups), 0))
    j = (np.arange(n_groups) - run_start).astype(np.float64)  # rank within (feature, stratum)
    explain_o = np.floor((j + 1) * explain_fraction) > np.floor(j * explain_fraction)
    # rare features: no firing group explained -> the first firing group (dealing order) is
    fires_o = g_fires[order]
    new_feature = np.r_[True, f_o[1:] != f_o[:-1]]
    feat_run = np.cumsum(new_feature) - 1
    has_explained = np.zeros(int(feat_run[-1]) + 1, dtype=bool)
    np.logical_or.at(has_explained, feat_run, fires_o & explain_o)
    first_firing = np.full(has_explained.size, n_groups, dtype=np.int64)
    firing_pos = np.flatnonzero(fires_o)
    np.minimum.at(first_firing, feat_run[firing_pos], firing_pos)
    fix = first_firing[(first_firing < n_groups) & ~has_explained]
    explain_o[fix] = True
    g_explain = np.empty(n_groups, dtype=bool)
    g_explain[order] = explain_o
    return g_explain[group]


def split_examples(examples: Sequence[Example], sae_id: str, feature_index: int, *,
                   explain_fraction: float = 0.5, seed: int = 0) -> list[Example]:
    """Copies of ``examples`` with ``split`` set to 'explain' or 'score' (see the module docstring)."""
    sides = split_sides([SplitKey.of(e) for e in examples], sae_id, feature_index,
                        explain_fraction=explain_fraction, seed=seed)
    return [e.model_copy(update={"split": s}) for e, s in zip(examples, sides, strict=True)]


# ============================================================================= metrics
def succinctness(text: str) -> float:
    """``exp(−(words − 1)/16) / (1 + 0.5·extra_disjuncts)``; range (0, 1]; see the module docstring."""
    words, extra = explanation_size(text)
    return math.exp(-(words - 1) / SUCCINCTNESS_L) / (1.0 + SUCCINCTNESS_C * extra)


def explanation_size(text: str) -> tuple[int, int]:
    """(words, extra disjuncts) as succinctness counts them."""
    words = max(1, sum(1 for w in text.split() if re.search(r"\w", w)))
    extra = len(re.findall(r"\sor\s", f" {text.lower()} ")) + sum(text.count(c) for c in "/|;,")
    return words, extra


#: the two-sided 95 % normal quantile
Z_95 = 1.959963984540054
CONFIDENCE = 0.95


def wilson_interval(k: int, n: int, z: float = Z_95) -> tuple[float, float] | None:
    """Wilson score interval for a proportion ``k / n``; None when ``n == 0``.

    ``(p + z²/2n ± z·sqrt(p(1−p)/n + z²/4n²)) / (1 + z²/n)``; stays inside [0, 1] and has width > 0 at
    ``k = 0`` and ``k = n`` (unlike the Wald interval)."""
    if n <= 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval needs 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def balanced_accuracy_interval(tp: int, n_pos: int, tn: int, n_neg: int) -> tuple[float, float] | None:
    """A 95 % interval for balanced accuracy from the counts of TPR (``tp / n_pos``) and TNR (``tn / n_neg``):
    MOVER over their Wilson intervals (see the module docstring). None unless both classes exist."""
    ri, si = wilson_interval(tp, n_pos), wilson_interval(tn, n_neg)
    if ri is None or si is None:
        return None
    r, s = tp / n_pos, tn / n_neg
    lo = (r + s - math.hypot(r - ri[0], s - si[0])) / 2
    hi = (r + s + math.hypot(ri[1] - r, si[1] - s)) / 2
    return max(0.0, lo), min(1.0, hi)


def _rounded(iv: tuple[float, float] | None) -> list[float] | None:
    return None if iv is None else [round(iv[0], 5), round(iv[1], 5)]


def balanced_accuracy(truth: Sequence[bool], pred: Sequence[bool]) -> float | None:
    """(TPR + TNR) / 2; None unless both classes are present."""
    pos = [p for t, p in zip(truth, pred, strict=True) if t]
    neg = [p for t, p in zip(truth, pred, strict=True) if not t]
    if not pos or not neg:
        return None
    return (sum(pos) / len(pos) + sum(not p for p in neg) / len(neg)) / 2


def roc_auc(pos: Sequence[float], neg: Sequence[float]) -> float | None:
    """Probability that a random positive scores above a random negative (ties count ½); None if a side is empty."""
    if not pos or not neg:
        return None
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation of two equal-length sequences; None if shorter than 2 or either is constant."""
    if len(x) != len(y):
        raise ValueError(f"pearson needs equal lengths, got {len(x)} and {len(y)}")
    n = len(x)
    if n < 2:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx <= 1e-12 * n or syy <= 1e-12 * n:
        return None
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))


class ExampleJudgement(BaseModel):
    """One judge decision about one held-out example of a feature, as a scorer recorded it.

    ``judgement_id`` is stable: a hash of (explanation, scorer, judge, example, variant), so scoring the same
    explanation again reproduces the same ids. ``prediction`` is None exactly when ``ok`` is False (a failed
    judgement predicts nothing). ``raw`` is what the judge saw and said (JSON-able).
    """

    judgement_id: str
    scorer: str = Field(description="detection | fuzzing | simulation | embedding | ...")
    judge: str
    example_kind: str
    example_id: int
    split: str | None
    truth: bool
    prediction: bool | None
    ok: bool
    error: str | None = None
    raw: dict[str, Any] = Field(default_factory=dict)


class FeatureScores(BaseModel):
    """The three scores of one explanation of one feature, the raw metrics behind them, and every judgement.

    :meth:`scores` lists them as :class:`~autoexplain.evals.scores.Score` objects (the store writes those);
    ``metrics`` holds each scorer's raw metrics in catalogue order (a new scorer's metrics appear there without
    a field of their own); the typed fields below name the ones the three scores are built from.
    """

    explanation_id: str
    sae_id: str
    feature_index: int
    explanation: str
    judge: str
    scored_at: dt.datetime = Field(default_factory=lambda: dt.datetime.now(dt.UTC).replace(tzinfo=None),
                                   description="when the judgements were made (UTC, no zone)")
    correctness: float | None = Field(description="detection balanced accuracy (window level, else token level "
                                                  "for dense features), [0,1], 0.5 = chance")
    correctness_from: str | None = Field(default=None, description="the scorer correctness comes from: detection "
                                         "| token_detection; None when it could not be computed")
    negatives_from: str = Field(default="harvest random pool", description="where detection's non-activating "
                                "contexts come from: harvest random pool | background windows | none")
    token_detection_balanced_accuracy: float | None = None
    n_token_detection: int = 0
    completeness: float | None = Field(description="½·mean quantile recall + ½·max(0, 2·fuzzing − 1), [0,1]")
    succinctness: float = Field(description="exp(−(words−1)/16) / (1 + 0.5·extra_disjuncts), (0,1]")
    detection_balanced_accuracy: float | None = None
    detection_recall: float | None = None
    detection_specificity: float | None = None
    quantile_recall: dict[int, float] = Field(default_factory=dict, description="detection recall per bin")
    quantile_recall_mean: float | None = None
    fuzzing_balanced_accuracy: float | None = None
    embedding_auc: float | None = None
    simulation_correlation: float | None = Field(
        default=None, description="Pearson r of simulated vs true (0–10 normalised) activations over all tokens")
    n_words: int = 0
    n_extra_disjuncts: int = 0
    n_detection: int = 0
    n_fuzzing: int = 0
    n_embedding: int = 0
    n_simulation: int = 0
    n_simulation_tokens: int = Field(default=0, description="tokens in the correlation (successful contexts)")
    n_failures: int = 0
    failure_rate: float = 0.0
    n_explain_examples: int = 0
    n_score_examples: int = 0
    n_positive: int = Field(default=0, description="successful judgements of the positives correctness counts "
                                                   "(activating windows, or firing tokens at token level)")
    n_negative: int = Field(default=0, description="successful judgements of its negatives (non-activating windows, "
                                                   "or non-firing tokens at token level)")
    correctness_interval: tuple[float, float] | None = Field(
        default=None, description="95 % interval of correctness (MOVER over Wilson intervals of TPR and TNR)")
    detection_recall_interval: tuple[float, float] | None = Field(default=None, description="95 % Wilson interval")
    detection_specificity_interval: tuple[float, float] | None = Field(default=None,
                                                                       description="95 % Wilson interval")
    reasons: dict[str, str] = Field(default_factory=dict,
                                    description="score name -> why it is None (only scores that could not be computed)")
    metrics: list[Score] = Field(default_factory=list, description="each scorer's raw metrics, catalogue order")
    judgements: list[ExampleJudgement] = Field(default_factory=list, description="one per judged example")

    def scores(self) -> list[Score]:
        """Correctness, completeness and succinctness, then every scorer's raw metrics; each one's details start
        with the judge, the feature, the split and the number of failed judgements."""
        common = {"judge": self.judge, "sae_id": self.sae_id, "feature_index": self.feature_index,
                  "split": "score", "n_failures": self.n_failures}
        def why(metric: str) -> dict[str, str]:
            return {"reason": self.reasons[metric]} if metric in self.reasons else {}

        iv = self.correctness_interval
        three = [
            Score(metric="correctness", value=self.correctness,
                  n=self.n_token_detection if self.correctness_from == "token_detection" else self.n_detection,
                  details={"from": _CORRECTNESS_FROM.get(self.correctness_from or "", "not computed"),
                           "scorer": self.correctness_from, "negatives_from": self.negatives_from,
                           "simulation": self.simulation_correlation,
                           "n_positive": self.n_positive, "n_negative": self.n_negative,
                           "interval": None if iv is None else list(iv), "confidence": CONFIDENCE,
                           **why("correctness")}),
            Score(metric="completeness", value=self.completeness, n=self.n_detection + self.n_fuzzing,
                  details={"quantile_recall": {str(k): v for k, v in self.quantile_recall.items()},
                           "fuzzing": self.fuzzing_balanced_accuracy, **why("completeness")}),
            Score(metric="succinctness", value=self.succinctness, n=1,
                  details={"words": self.n_words, "extra_disjuncts": self.n_extra_disjuncts,
                           "L": SUCCINCTNESS_L, "C": SUCCINCTNESS_C}),
        ]
        return [s.model_copy(update={"details": {**common, **s.details}}) for s in [*three, *self.metrics]]


_CORRECTNESS_FROM = {"detection": "detection balanced accuracy",
                     "token_detection": "token-level detection balanced accuracy (no non-activating window: "
                                        "non-firing tokens of activating windows are the negatives)"}


def _judge_in_batches(fn: Any, items: list[Any], batch_size: int | None,
                      failure: Any = Judgement.failure) -> list[Any]:
    """``fn`` on consecutive chunks of ``items`` (all at once when ``batch_size`` is None); a chunk answered with
    the wrong count fails item by item."""
    out: list[Any] = []
    step = batch_size or max(1, len(items))
    for i in range(0, len(items), step):
        chunk = items[i:i + step]
        res = fn(chunk)
        if len(res) != len(chunk):  # a judge that miscounts: every item of the batch fails
            res = [failure(f"judge returned {len(res)} answers for {len(chunk)} items")] * len(chunk)
        out.extend(res)
    return out


# ============================================================================= the scorer catalogue
@dataclass(kw_only=True)
class ScoringContext:
    """What every scorer of one explanation sees: the explanation, the judges, the held-out items and the shared
    random generator (drawn from in catalogue order, so a scorer added at the end changes no earlier draw).

    ``positives`` are score-side activating examples (quantile bins first, then top), ``negatives`` score-side
    non-activating random ones; ``detection_items`` both, labelled and shuffled (the contexts detection and
    simulation judge, in the same order).
    """

    explanation: str
    explanation_id: str
    judge: Judge
    embedder: EmbeddingJudge | None
    positives: list[Example]
    negatives: list[Example]
    detection_items: list[tuple[Example, bool]]
    rng: random.Random
    batch_size: int | None
    #: (positive example, token position, fires there) for token-level detection (see :func:`token_items`)
    token_items: list[tuple[Example, int, bool]] = field(default_factory=list)
    #: where ``negatives`` come from: "harvest random pool", "background windows" or "none"
    negatives_from: str = "harvest random pool"

    def judged(self, scorer: str, judge_name: str, e: Example, truth: bool, j: Judgement,
               variant: str = "") -> ExampleJudgement:
        """The record of judgement ``j`` of example ``e`` (its quantile bin and the variant go into ``raw``)."""
        return ExampleJudgement(
            judgement_id=_h(self.explanation_id, scorer, judge_name, e.kind, e.example_id, variant)[:24],
            scorer=scorer, judge=judge_name, example_kind=e.kind, example_id=e.example_id, split=e.split,
            truth=truth, prediction=j.prediction if j.ok else None, ok=j.ok, error=j.error,
            raw={**j.raw, **({"variant": variant} if variant else {}),
                 **({"quantile": e.quantile} if e.quantile is not None else {})})


class ScorerOutcome(BaseModel):
    """What a scorer returns: its raw metrics (explanation-independent scores, details without the common
    judge/feature keys) and its per-example judgements."""

    metrics: list[Score]
    judgements: list[ExampleJudgement] = Field(default_factory=list)


class FeatureScorer(Protocol):
    """A feature scorer: judges held-out examples of one explanation and returns metrics and judgements."""

    def __call__(self, ctx: ScoringContext, /) -> ScorerOutcome: ...


def detection(ctx: ScoringContext) -> ScorerOutcome:
    """Balanced accuracy of "does it fire in this context?" over ``detection_items`` (metric ``detection``, with
    recall and specificity), and the mean over quantile bins of the recall on each bin (``quantile_recall``)."""
    items = ctx.detection_items
    det = _judge_in_batches(lambda ch: ctx.judge.judge_detection(ctx.explanation, [e.tokens for e, _ in ch]),
                            items, ctx.batch_size)
    rows = [ctx.judged("detection", ctx.judge.name, e, t, j) for (e, t), j in zip(items, det, strict=True)]
    ok = [(t, bool(j.prediction)) for (_, t), j in zip(items, det, strict=True) if j.ok]
    ba = balanced_accuracy([t for t, _ in ok], [p for _, p in ok])
    pos_p = [p for t, p in ok if t]
    neg_p = [p for t, p in ok if not t]
    details = _ba_details(sum(pos_p), len(pos_p), sum(not p for p in neg_p), len(neg_p))
    details["negatives_from"] = ctx.negatives_from
    if ba is None:
        details["reason"] = _detection_reason(ctx, len(pos_p), len(neg_p))
    q_recall = quantile_recall(rows)
    q_mean = sum(q_recall.values()) / len(q_recall) if q_recall else None
    q_details = {} if q_mean is not None else {"reason": "no successful detection judgement of a score-side "
                                                         "quantile example"}
    return ScorerOutcome(metrics=[
        Score(metric="detection", value=ba, n=len(items), details=details),
        Score(metric="quantile_recall", value=q_mean, n=len(items), details=q_details),
    ], judgements=rows)


def _ba_details(tp: int, n_pos: int, tn: int, n_neg: int) -> dict[str, Any]:
    """Recall, specificity, their counts and 95 % intervals, and the balanced-accuracy interval (MOVER)."""
    return {
        "recall": tp / n_pos if n_pos else None, "specificity": tn / n_neg if n_neg else None,
        "n_positive": n_pos, "n_negative": n_neg,
        "recall_interval": _rounded(wilson_interval(tp, n_pos)),
        "specificity_interval": _rounded(wilson_interval(tn, n_neg)),
        "interval": _rounded(balanced_accuracy_interval(tp, n_pos, tn, n_neg)),
        "confidence": CONFIDENCE,
        "interval_method": "MOVER over 95% Wilson intervals of TPR and TNR"}


def _detection_reason(ctx: ScoringContext, n_pos_ok: int, n_neg_ok: int) -> str:
    """Why detection has no balanced accuracy (it needs a successful judgement of each class)."""
    if not ctx.positives:
        return ("no score-side activating example: the feature fired in too few harvested windows for the "
                "held-out split to keep one for scoring (its only activating window was explained from)")
    if not ctx.negatives:
        return ("no non-activating context: the feature fired in every harvested random-pool window and no "
                "background window was given (token-level detection scores it instead)")
    missing = "activating" if not n_pos_ok else "non-activating"
    return f"every detection judgement of a {missing} example failed"


def quantile_recall(judgements: Sequence[ExampleJudgement]) -> dict[int, float]:
    """Detection recall per activation-quantile bin, from the successful detection judgements of quantile
    examples (bins in order)."""
    by_bin: dict[int, list[bool]] = {}
    for r in judgements:
        q = r.raw.get("quantile")
        if r.scorer == "detection" and r.ok and r.truth and r.example_kind == "quantile" and q is not None:
            by_bin.setdefault(int(q), []).append(bool(r.prediction))
    return {q: sum(v) / len(v) for q, v in sorted(by_bin.items())}


def fuzzing(ctx: ScoringContext) -> ScorerOutcome:
    """Each positive twice, its firing tokens highlighted (truth yes) and as many random non-firing ones (truth
    no); balanced accuracy of "are these the tokens where it fires?" (metric ``fuzzing``)."""
    items: list[tuple[Example, bool, list[int]]] = []
    for e in ctx.positives:
        true_hl, wrong_hl = _fuzz_tokens(e, ctx.rng, positions=True)
        if not true_hl or not wrong_hl:
            continue
        items.append((e, True, true_hl))
        items.append((e, False, wrong_hl))
    ctx.rng.shuffle(items)
    fz = _judge_in_batches(lambda ch: ctx.judge.judge_fuzzing(ctx.explanation, [e.tokens for e, _, _ in ch],
                                                              [h for _, _, h in ch]), items, ctx.batch_size)
    rows = [ctx.judged("fuzzing", ctx.judge.name, e, t, j.model_copy(update={"raw": {**j.raw, "highlight": h}}),
                       variant="true" if t else "random")
            for (e, t, h), j in zip(items, fz, strict=True)]
    ok = [(t, bool(j.prediction)) for (_, t, _), j in zip(items, fz, strict=True) if j.ok]
    ba = balanced_accuracy([t for t, _ in ok], [p for _, p in ok])
    details: dict[str, Any] = {}
    if ba is None:
        details["reason"] = ("no score-side activating example to highlight" if not ctx.positives
                             else "no activating example with a non-firing token to contrast" if not items
                             else "every fuzzing judgement of one class failed")
    return ScorerOutcome(metrics=[Score(metric="fuzzing", value=ba, n=len(items), details=details)],
                         judgements=rows)


def embedding(ctx: ScoringContext) -> ScorerOutcome:
    """ROC AUC of the embedder's explanation-context similarity, positives against negatives (metric
    ``embedding_auc``); None without an embedding judge or without both classes."""
    emb = ctx.embedder
    if emb is None or not ctx.positives or not ctx.negatives:
        why = ("no embedding judge" if emb is None else "no score-side activating example" if not ctx.positives
               else "no score-side non-activating example")
        return ScorerOutcome(metrics=[Score(metric="embedding_auc", value=None, n=0, details={"reason": why})])
    items = [(e, True) for e in ctx.positives] + [(e, False) for e in ctx.negatives]
    sims = emb.similarities(ctx.explanation, [e.text for e, _ in items])
    thr, how = emb.threshold_for(ctx.explanation, "detection")
    rows = [ctx.judged("embedding", emb.name, e, t, Judgement(prediction=bool(s >= thr), raw={
        "similarity": round(float(s), 5), "threshold": round(thr, 5), "threshold_from": how}))
        for (e, t), s in zip(items, sims, strict=True)]
    auc = roc_auc([float(s) for (_, t), s in zip(items, sims, strict=True) if t],
                  [float(s) for (_, t), s in zip(items, sims, strict=True) if not t])
    return ScorerOutcome(metrics=[Score(metric="embedding_auc", value=auc, n=len(items))], judgements=rows)


def simulation(ctx: ScoringContext) -> ScorerOutcome:
    """Per-token activations predicted for the detection contexts, correlated with the truth (metric
    ``simulation``: Pearson r over all tokens of the successfully simulated contexts; see the module doc)."""
    items = ctx.detection_items
    sims = _judge_in_batches(lambda ch: ctx.judge.judge_simulation(ctx.explanation, [e.tokens for e, _ in ch]),
                             items, ctx.batch_size, failure=Simulation.failure)
    rows: list[ExampleJudgement] = []
    corr, n_tokens = _simulation_rows(items, sims, lambda e, t, j: rows.append(
        ctx.judged("simulation", ctx.judge.name, e, t, j)))
    details: dict[str, Any] = {"tokens": n_tokens, "method": "pearson r, all tokens, truth normalised to [0,10]"}
    if corr is None:
        details["reason"] = ("no score-side activating example (the true activations are all 0)"
                             if not ctx.positives else "no successful simulation" if not n_tokens
                             else "the simulated or the true activations are constant")
    return ScorerOutcome(metrics=[Score(metric="simulation", value=corr, n=len(items), details=details)],
                         judgements=rows)


def token_detection(ctx: ScoringContext) -> ScorerOutcome:
    """Balanced accuracy of "does it fire on this token?" over ``token_items`` (metric ``token_detection``):
    firing tokens of score-side activating windows are the positives, their non-firing tokens the negatives. It
    needs no non-activating window, so it is defined for dense features; correctness falls back to it when
    window-level detection has no negative (see the module docstring)."""
    items = ctx.token_items
    det = _judge_in_batches(lambda ch: ctx.judge.judge_tokens(ctx.explanation, [e.tokens for e, _, _ in ch],
                                                              [p for _, p, _ in ch]), items, ctx.batch_size)
    rows = [ctx.judged("token_detection", ctx.judge.name, e, t, j, variant=f"token{p}")
            for (e, p, t), j in zip(items, det, strict=True)]
    ok = [(t, bool(j.prediction)) for (_, _, t), j in zip(items, det, strict=True) if j.ok]
    pos_p = [p for t, p in ok if t]
    neg_p = [p for t, p in ok if not t]
    details = _ba_details(sum(pos_p), len(pos_p), sum(not p for p in neg_p), len(neg_p))
    details["windows"] = len({e.example_id for e, _, _ in items})
    details["unit"] = ("tokens of score-side activating windows (at most "
                       f"{TOKENS_PER_WINDOW} firing and {TOKENS_PER_WINDOW} non-firing per window)")
    ba = balanced_accuracy([t for t, _ in ok], [p for _, p in ok])
    if ba is None:
        details["reason"] = ("not run: window-level detection has non-activating windows" if ctx.negatives
                             else "no score-side activating example" if not ctx.positives
                             else "no non-firing token in the score-side activating windows (the feature fires "
                                  "on every token it was seen on)" if not any(not t for _, _, t in items)
                             else "every token judgement of one class failed")
    return ScorerOutcome(metrics=[Score(metric="token_detection", value=ba, n=len(items), details=details)],
                         judgements=rows)


#: scorer name -> scorer, run in this order (they share one random generator: append new scorers at the end).
#: A new feature scorer is one entry here; its metrics are stored as ``scores`` rows, its judgements as sets.
SCORERS: dict[str, FeatureScorer] = {"detection": detection, "fuzzing": fuzzing, "embedding": embedding,
                                     "simulation": simulation, "token_detection": token_detection}

#: token-level detection takes at most this many firing and this many non-firing tokens from one window (tokens
#: of one window are correlated; spreading the sample over windows keeps the interval honest)
TOKENS_PER_WINDOW = 3
_SPECIAL = re.compile(r"^<\|.*\|>$|^<s>$|^</s>$|^\[CLS\]$|^\[SEP\]$")


def token_items(positives: Sequence[Example], rng: random.Random, *, n_firing: int, n_silent: int,
                per_window: int = TOKENS_PER_WINDOW) -> list[tuple[Example, int, bool]]:
    """(example, position, fires) for token-level detection: from each activating window up to ``per_window``
    firing tokens (activation > 0) and ``per_window`` non-firing ones (activation <= 0, not blank, not a special
    token such as BOS), drawn window by window in turns until ``n_firing`` / ``n_silent`` are reached."""
    fire: list[list[int]] = []
    silent: list[list[int]] = []
    for e in positives:
        f = [i for i, a in enumerate(e.acts) if a > 0]
        s_ = [i for i, a in enumerate(e.acts) if a <= 0 and e.tokens[i].strip() and not _SPECIAL.match(e.tokens[i])]
        rng.shuffle(f)
        rng.shuffle(s_)
        fire.append(f[:per_window])
        silent.append(s_[:per_window])
    out: list[tuple[Example, int, bool]] = []
    for lists, cap, truth in ((fire, n_firing, True), (silent, n_silent, False)):
        taken = 0
        for rnd in range(per_window):
            for e, ps in zip(positives, lists, strict=True):
                if taken < cap and rnd < len(ps):
                    out.append((e, ps[rnd], truth))
                    taken += 1
    rng.shuffle(out)
    return out


def score_explanation(explanation_text: str, examples: Sequence[Example | Mapping[str, Any]], judge: Judge, *,
                      sae_id: str, feature_index: int, explanation_id: str | None = None,
                      n_activating: int = 50, n_nonactivating: int = 50, batch_size: int | None = None,
                      seed: int = 0, embedder: EmbeddingJudge | None = None, explain_fraction: float = 0.5,
                      scorers: Mapping[str, FeatureScorer] | None = None,
                      background: Sequence[Example | Mapping[str, Any]] | None = None) -> FeatureScores:
    """Score one explanation of feature ``(sae_id, feature_index)`` on its held-out examples.

    ``examples`` are the feature's harvested examples (:class:`Example` or store rows). If their ``split`` is
    unset, :func:`split_examples` assigns it (same result as the stored split for the same seed). Only
    ``score``-side examples are judged; ``explain``-side ones are used for nothing but calibrating an embedding
    judge's threshold. ``scorers`` (default :data:`SCORERS`) run in order. ``batch_size``: contexts per judge
    call (default: the judge's own :attr:`~autoexplain.evals.judges.Judge.batch_size`). ``background``:
    non-activating windows of this feature from elsewhere in the dataset (its activations computed on them, all
    <= 0), used as negatives only when the score side has no non-activating example (a dense feature's random
    pool is empty); they were never shown to the explainer. Returns the scores and every judgement (the caller
    stores them: :mod:`autoexplain.agent.store.rows`).
    """
    exs = [e if isinstance(e, Example) else Example.from_row(e) for e in examples]
    unsplit = sum(e.split not in SPLITS for e in exs)
    if unsplit == len(exs):
        exs = split_examples(exs, sae_id, feature_index, explain_fraction=explain_fraction, seed=seed)
    elif unsplit:
        # re-splitting would move examples the explainer may already have seen to the score side
        raise ValueError(f"{unsplit} of {len(exs)} examples of {sae_id}#{feature_index} have no split while the "
                         "others do: split all of them (split_examples) before scoring")
    explain = [e for e in exs if e.split == "explain"]
    scored = [e for e in exs if e.split == "score"]
    explanation_id = explanation_id or "x" + _h(sae_id, feature_index, explanation_text)[:16]
    rng = random.Random(_h("score", sae_id, feature_index, seed))
    scored_at = dt.datetime.now(dt.UTC).replace(tzinfo=None)

    quant = [e for e in scored if e.kind == "quantile" and e.max_act > 0]
    top = [e for e in scored if e.kind == "top" and e.max_act > 0]
    rng.shuffle(quant)
    rng.shuffle(top)
    positives = (quant + top)[:n_activating]
    negatives = [e for e in scored if e.kind == "random" and e.max_act <= 0]
    negatives_from = "harvest random pool"
    if not negatives and background:
        shown = {tuple(e.tokens) for e in explain}
        negatives = [b.model_copy(update={"kind": "background", "split": "score"})
                     for b in (x if isinstance(x, Example) else Example.from_row(x) for x in background)
                     if b.max_act <= 0 and all(a <= 0 for a in b.acts) and tuple(b.tokens) not in shown]
        negatives_from = "background windows"
    if not negatives:
        negatives_from = "none"
    rng.shuffle(negatives)
    negatives = negatives[:n_nonactivating]
    # token level only where window level has no negative (it would cost judge calls for nothing otherwise)
    tok_items = [] if negatives else token_items(positives, random.Random(_h("tokens", sae_id, feature_index, seed)),
                                                 n_firing=n_activating, n_silent=n_nonactivating)

    emb = embedder if embedder is not None else (judge if isinstance(judge, EmbeddingJudge) else None)
    _prepare_embeddings(explanation_text, exs, explain, judge, emb, sae_id, feature_index, seed)

    # detection (order shuffled so batches mix positives and negatives); simulation judges the same contexts
    det_items = [(e, True) for e in positives] + [(e, False) for e in negatives]
    rng.shuffle(det_items)
    ctx = ScoringContext(explanation=explanation_text, explanation_id=explanation_id, judge=judge, embedder=emb,
                         positives=positives, negatives=negatives, detection_items=det_items, rng=rng,
                         batch_size=batch_size if batch_size is not None else judge.batch_size,
                         token_items=tok_items, negatives_from=negatives_from)
    metrics: list[Score] = []
    rows: list[ExampleJudgement] = []
    for scorer in (SCORERS if scorers is None else scorers).values():
        outcome = scorer(ctx)
        metrics += outcome.metrics
        rows += outcome.judgements
    m = by_metric(metrics)

    def value(metric: str) -> float | None:
        return m[metric].value if metric in m else None

    def n(metric: str) -> int:
        return m[metric].n if metric in m else 0

    det_ba, fz_ba = value("detection"), value("fuzzing")
    # correctness: window-level detection when the score side has both classes; token-level detection when it
    # has activating windows but no non-activating one (dense features); None otherwise, with the reason
    tok_ba = value("token_detection")
    correctness, correctness_from = det_ba, "detection" if det_ba is not None else None
    if det_ba is None and positives and not negatives and tok_ba is not None:
        correctness, correctness_from = tok_ba, "token_detection"
    q_recall = quantile_recall(rows)
    q_mean = value("quantile_recall")
    fz_part = None if fz_ba is None else max(0.0, 2 * fz_ba - 1)
    parts = [p for p in (q_mean, fz_part) if p is not None]
    completeness = sum(parts) / len(parts) if parts else None
    words, extra = explanation_size(explanation_text)
    n_fail = sum(1 for r in rows if not r.ok)
    det_details = m["detection"].details if "detection" in m else {}
    corr_details = m[correctness_from].details if correctness_from in m else det_details
    sim_details = m["simulation"].details if "simulation" in m else {}
    reasons = {s.metric: str(s.details["reason"]) for s in metrics if s.value is None and "reason" in s.details}
    if correctness is None:
        why = reasons.get("detection", "no detection scorer ran")
        if positives and not negatives:
            why += "; token level: " + reasons.get("token_detection", "no token_detection scorer ran")
        reasons["correctness"] = why
    if completeness is None:
        reasons["completeness"] = ("neither quantile recall nor fuzzing could be computed: "
                                   + reasons.get("quantile_recall", reasons.get("fuzzing", "no scorer for them")))

    def interval(key: str, details: Mapping[str, Any] = corr_details) -> tuple[float, float] | None:
        v = details.get(key)
        return None if v is None else (float(v[0]), float(v[1]))
    return FeatureScores(
        explanation_id=explanation_id, sae_id=sae_id, feature_index=feature_index, explanation=explanation_text,
        judge=judge.name, scored_at=scored_at, correctness=correctness, correctness_from=correctness_from,
        negatives_from=negatives_from, token_detection_balanced_accuracy=tok_ba,
        n_token_detection=n("token_detection"), completeness=completeness,
        succinctness=succinctness(explanation_text), detection_balanced_accuracy=det_ba,
        detection_recall=det_details.get("recall"), detection_specificity=det_details.get("specificity"),
        quantile_recall=q_recall, quantile_recall_mean=q_mean, fuzzing_balanced_accuracy=fz_ba,
        embedding_auc=value("embedding_auc"), n_words=words, n_extra_disjuncts=extra, n_detection=n("detection"),
        n_fuzzing=n("fuzzing"), n_embedding=n("embedding_auc"), simulation_correlation=value("simulation"),
        n_simulation=n("simulation"), n_simulation_tokens=int(sim_details.get("tokens", 0)), n_failures=n_fail,
        failure_rate=n_fail / len(rows) if rows else 0.0, n_explain_examples=len(explain),
        n_score_examples=len(scored), n_positive=int(corr_details.get("n_positive", 0)),
        n_negative=int(corr_details.get("n_negative", 0)), correctness_interval=interval("interval"),
        detection_recall_interval=interval("recall_interval", det_details),
        detection_specificity_interval=interval("specificity_interval", det_details), reasons=reasons,
        metrics=metrics,
        judgements=rows)


def _prepare_embeddings(explanation_text: str, exs: Sequence[Example], explain: Sequence[Example], judge: Judge,
                        emb: EmbeddingJudge | None, sae_id: str, feature_index: int, seed: int) -> None:
    """Embed every text an embedding judge will see in one encode call, and calibrate an embedding judge's
    thresholds on the explain side only (see :class:`~autoexplain.evals.judges.EmbeddingJudge`)."""
    for j in {id(x): x for x in (judge, emb) if isinstance(x, EmbeddingJudge)}.values():  # one encode call
        j.embed([explanation_text, *(e.text for e in exs),
                 *(" ".join(t.strip() for t, a in zip(e.tokens, e.acts, strict=True) if a > 0) for e in exs),
                 *(t.strip() for e in exs for t in e.tokens if t.strip())])
    if not isinstance(judge, EmbeddingJudge):
        return
    cal_rng = random.Random(_h("calibrate", sae_id, feature_index, seed))
    ex_pos = [e for e in explain if e.activating]
    ex_neg = [e for e in explain if e.kind == "random" and e.max_act <= 0]
    judge.calibrate(explanation_text, [e.text for e in ex_pos], [e.text for e in ex_neg], task="detection")
    judge.calibrate(explanation_text, [" ".join(t.strip() for t, a in zip(e.tokens, e.acts) if a > 0)
                                       for e in ex_pos],
                    [" ".join(t.strip() for t in _fuzz_tokens(e, cal_rng)[1]) for e in ex_pos], task="fuzzing")
    judge.calibrate(explanation_text,
                    [t.strip() for e in ex_pos for t, a in zip(e.tokens, e.acts, strict=True) if a > 0],
                    [t.strip() for e in [*ex_pos, *ex_neg] for t, a in zip(e.tokens, e.acts, strict=True)
                     if a <= 0 and t.strip()], task="simulation")


def _simulation_rows(items: Sequence[tuple[Example, bool]], sims: Sequence[Simulation],
                     add: Callable[[Example, bool, Judgement], Any]) -> tuple[float | None, int]:
    """Record one judgement per simulated context (via ``add``) and return (Pearson r, tokens used).

    Truth is normalised to [0, 10] by the maximum activation over ``items``; a context whose simulation failed,
    or whose length does not match its tokens, contributes nothing. A row's prediction is "fires somewhere"
    (max simulated value > 0); its raw keeps the simulated values (1 decimal) and the context's own r if defined.
    """
    top = max((max(e.acts, default=0.0) for e, _ in items), default=0.0)
    scale = SIM_MAX / top if top > 0 else 0.0
    pred_all: list[float] = []
    true_all: list[float] = []
    for (e, t), s in zip(items, sims, strict=True):
        if s.ok and s.values is not None and len(s.values) != len(e.acts):
            s = Simulation.failure(f"simulated {len(s.values)} values for {len(e.acts)} tokens", **s.raw)
        if not s.ok or s.values is None:
            add(e, t, Judgement.failure(s.error or "simulation failed", **s.raw))
            continue
        truth = [max(0.0, a) * scale for a in e.acts]
        pred_all += s.values
        true_all += truth
        r = pearson(s.values, truth)
        raw = {**s.raw, "values": [round(v, 1) for v in s.values], **({"correlation": round(r, 5)} if r is not None
                                                                       else {})}
        add(e, t, Judgement(prediction=max(s.values, default=0.0) > 0, raw=raw))
    return pearson(pred_all, true_all), len(pred_all)


def _fuzz_tokens(e: Example, rng: random.Random, *, positions: bool = False) -> tuple[list[Any], list[Any]]:
    """(firing, random non-firing of the same count) — as positions if ``positions`` else as token strings."""
    fire = [i for i, a in enumerate(e.acts) if a > 0]
    rest = [i for i, a in enumerate(e.acts) if a <= 0 and e.tokens[i].strip()]
    wrong = sorted(rng.sample(rest, min(len(fire), len(rest)))) if rest else []
    if positions:
        return fire, wrong
    return [e.tokens[i] for i in fire], [e.tokens[i] for i in wrong]
