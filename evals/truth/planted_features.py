"""Planted features: a GPT-2 and a sae-lens SAE whose features fire exactly on known tokens.

Why: an explanation score means something only if we know the right answer. Here the right answer is built in.

Construction (:func:`plant_features`), for a GPT-2 saved with ``save_pretrained`` (the test fixture's tiny model
or a toy-zoo model):

1. Copy the model directory. In the copy, zero residual dimensions ``0 … D−1`` (``D`` = number of features,
   planted and dead) in both the token embedding ``wte`` and the position embedding ``wpe``. The residual stream
   at ``resid_pre.0`` is exactly ``wte[token] + wpe[position]``, so dimension ``f`` is now 0 at every position of
   every input.
2. For planted feature ``f`` with words ``w_0, w_1, …`` (each must be one token of this tokenizer), set
   ``wte[id(w_r), f] = 2 + 0.5·r``. Dimension ``f`` is now nonzero exactly on those tokens.
3. Save a sae-lens ``StandardSAE`` (ReLU) at ``blocks.0.hook_resid_pre`` with ``d_sae = D``: encoder
   ``W_enc[f, f] = 1`` for planted features (0 for dead ones), ``b_enc = −1``, decoder ``W_dec[f, f] = 1`` for
   every feature, ``b_dec = 0``. Feature ``f`` therefore fires exactly on its words, with activation
   ``1 + 0.5·r`` (the first word is the weakest, the last the strongest), and dead features never fire.

Feature index = residual dimension, so every index must be below ``d_model``, and planted ∪ dead must be
exactly ``0 … D−1`` (no gaps: a gap would be a feature nobody declared).

Caveats: zeroing residual dimensions changes the model's outputs (for a trained model, slightly; it is still a
fine host for harvesting and scoring, not for reading off what the original model computes). Only
``resid_pre.0`` is supported: any later site mixes attention and MLP outputs into the planted dimensions, and
the features would no longer be exact. Only GPT-2-architecture models (``wte`` + ``wpe``) are supported.

The default set (:data:`PLANTED_FEATURES`) uses words that are single tokens both in the tests' tiny tokenizer
and in the toy zoo's (where every category word is one token): feature 0 animals, 1 colours, 2 names, 4 " the";
3, 5, 6, 7 dead. :func:`default_texts` writes a corpus mixing those words with unplanted ones, for harvesting.
"""

from __future__ import annotations

import random
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from pydantic import BaseModel, ConfigDict

#: feature index -> the words (leading space included) on which it fires, weakest first.
PLANTED_FEATURES: Mapping[int, tuple[str, ...]] = MappingProxyType({
    0: (" cat", " dog", " fox", " owl"),
    1: (" red", " green", " blue"),
    2: (" Mary", " John"),
    4: (" the",),
})
#: features that never fire
PLANTED_DEAD: tuple[int, ...] = (3, 5, 6, 7)
#: a true one-line description of each default planted feature (what a good explanation says)
PLANTED_DESCRIPTIONS: Mapping[int, str] = MappingProxyType({0: "animals", 1: "colour words",
                                                           2: "people's names", 4: "the word ' the'"})
#: the words :func:`default_texts` draws from: planted (cat, red, Mary, the …) and unplanted (sat, park, 10 …)
_DEFAULT_WORDS = ("the cat sat on mat and dog ran to park . Mary John went store , gave a drink red green blue fox "
                  "owl 10 11 12")
DEFAULT_VOCAB: tuple[str, ...] = tuple(_DEFAULT_WORDS.split())

BASE_STRENGTH = 2.0  # residual value of a feature's first (weakest) word; the SAE bias subtracts 1
STEP = 0.5  # each further word of a feature is this much stronger
SAE_BIAS = -1.0
MANIFEST = "planted.json"
SUPPORTED_SITE = "resid_pre.0"


class PlantedFeatures(BaseModel):
    """A planted-feature model and SAE on disk, and the ground truth they were built from.

    ``token_ids[f]`` are feature ``f``'s token ids (weakest first); ``strengths[token_id]`` is the activation of
    the feature that token belongs to (``1 + 0.5·rank``); ``words[token_id]`` is the planted word.
    """

    model_config = ConfigDict(frozen=True)

    model_dir: Path
    sae_dir: Path
    features: dict[int, tuple[str, ...]]
    dead: tuple[int, ...]
    token_ids: dict[int, list[int]]
    strengths: dict[int, float]
    hook_site: str = SUPPORTED_SITE
    hook_name: str = "blocks.0.hook_resid_pre"
    d_sae: int
    #: output-side features: feature -> the words it promotes (see :func:`plant_features`' ``outputs``)
    outputs: dict[int, tuple[str, ...]] = {}

    def activation(self, feature: int, token_id: int) -> float:
        """The exact activation of ``feature`` on a token (0 when the token is not one of its words)."""
        return self.strengths[token_id] if token_id in self.token_ids.get(feature, []) else 0.0


# ============================================================================= checks
def _check_layout(features: Mapping[int, Sequence[str]], dead: Sequence[int], hook_site: str) -> int:
    """Validate the feature layout; return ``d_sae``."""
    if hook_site != SUPPORTED_SITE:
        raise ValueError(f"planted features live at {SUPPORTED_SITE} only (the embedding output), not {hook_site!r}: "
                         "later sites mix attention and MLP outputs into the planted dimensions")
    if not features:
        raise ValueError("plant at least one feature")
    both = set(features) & set(dead)
    if both:
        raise ValueError(f"features {sorted(both)} are both planted and dead")
    indices = set(features) | set(dead)
    if min(indices) < 0:
        raise ValueError("feature indices must be >= 0")
    d_sae = max(indices) + 1
    gaps = sorted(set(range(d_sae)) - indices)
    if gaps:
        raise ValueError(f"feature indices {gaps} are neither planted nor dead: list them in dead")
    for f, words in features.items():
        if not words:
            raise ValueError(f"feature {f} has no words")
        if len(set(words)) != len(words):
            raise ValueError(f"feature {f} lists a word twice: {list(words)}")
    owners: dict[str, int] = {}
    for f, words in sorted(features.items()):
        for w in words:
            if w in owners:  # one token, one feature: strengths are recorded per token
                raise ValueError(f"word {w!r} is planted in features {owners[w]} and {f}: give each word one feature")
            owners[w] = f
    return d_sae


def single_token_ids(tokenizer: object, words: Sequence[str]) -> list[int]:
    """The token id of each word; ValueError naming every word this tokenizer splits into several tokens."""
    ids, bad = [], []
    for w in words:
        pieces = tokenizer(w, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
        if len(pieces) == 1:
            ids.append(int(pieces[0]))
        else:
            bad.append(f"{w!r} -> {tokenizer.convert_ids_to_tokens(pieces)}")  # type: ignore[attr-defined]
    if bad:
        raise ValueError("a planted word must be exactly one token of the model's tokenizer; these are not: "
                         + "; ".join(bad) + " (mind the leading space: ' cat' and 'cat' are different tokens)")
    return ids


# ============================================================================= construction
def plant_features(base_model_dir: Path, out_dir: Path,
                   features: Mapping[int, Sequence[str]] = PLANTED_FEATURES,
                   dead: Sequence[int] = PLANTED_DEAD, *, hook_site: str = SUPPORTED_SITE,
                   outputs: Mapping[int, Sequence[str]] | None = None,
                   overwrite: bool = False) -> PlantedFeatures:
    """Build ``out_dir/model`` (the edited GPT-2) and ``out_dir/sae`` (the planted SAE); see the module docstring.

    ``base_model_dir`` is a GPT-2 directory written by ``save_pretrained`` (weights, config and tokenizer), e.g.
    a toy-zoo model's ``BuiltZoo.model_dir``. It is only read. ``out_dir/planted.json`` records the ground truth
    (:func:`load_planted` reads it back). Existing output is refused unless ``overwrite``.

    ``outputs`` plants output-side features: feature ``f`` (planted, with its input words) promotes the given
    words (each one token). The unembedding is untied from the embedding (``tie_word_embeddings=False``; the
    copy starts equal to ``wte``), dimensions ``0 … D−1`` of the copy are zeroed, and ``lm_head[id(w), f] =``
    :data:`OUTPUT_WEIGHT`: dimension ``f`` of the final residual stream then raises exactly those words' logits
    (directly; the layers in between also read it), and no planted input feature promotes anything directly. The
    words need not be planted anywhere else; a word's weight stays below the SAE bias, so nothing fires on it.
    """
    from transformers import AutoConfig, AutoTokenizer, GPT2LMHeadModel

    d_sae = _check_layout(features, dead, hook_site)
    out_dir = Path(out_dir)
    model_dir, sae_dir = out_dir / "model", out_dir / "sae"
    if model_dir.exists() or sae_dir.exists():
        if not overwrite:
            raise FileExistsError(f"{out_dir} already holds a planted model: pass overwrite=True to rebuild it")
        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.rmtree(sae_dir, ignore_errors=True)
    cfg = AutoConfig.from_pretrained(str(base_model_dir))
    if cfg.model_type != "gpt2":
        raise ValueError(f"planted features need a GPT-2 model (wte + wpe), not {cfg.model_type!r}")
    d_model = int(cfg.n_embd)
    if d_sae > d_model:
        raise ValueError(f"{d_sae} features need {d_sae} residual dimensions; the model has d_model = {d_model}")
    tok = AutoTokenizer.from_pretrained(str(base_model_dir))
    token_ids = {int(f): single_token_ids(tok, words) for f, words in features.items()}

    hf = GPT2LMHeadModel.from_pretrained(str(base_model_dir))
    out_ids = {int(f): single_token_ids(tok, words) for f, words in (outputs or {}).items()}
    missing = sorted(set(out_ids) - set(token_ids))
    if missing:
        raise ValueError(f"output features {missing} are not planted: give them input words in features too")
    if out_ids:
        _untie_and_plant_outputs(hf, out_ids, d_sae)
    strengths = _edit_embeddings(hf, token_ids, d_sae)
    shutil.copytree(base_model_dir, model_dir)
    hf.save_pretrained(str(model_dir))
    _save_sae(sae_dir, d_model, d_sae, planted=set(token_ids))
    planted = PlantedFeatures(model_dir=model_dir, sae_dir=sae_dir,
                              features={int(f): tuple(w) for f, w in features.items()},
                              dead=tuple(sorted(int(d) for d in dead)), token_ids=token_ids, strengths=strengths,
                              d_sae=d_sae, outputs={int(f): tuple(w) for f, w in (outputs or {}).items()})
    (out_dir / MANIFEST).write_text(planted.model_dump_json(indent=1))
    return planted


OUTPUT_WEIGHT = 1.0  # lm_head weight of a promoted word on its feature's dimension (< 1 - SAE_BIAS: never fires)


def _untie_and_plant_outputs(hf: object, out_ids: Mapping[int, Sequence[int]], d_sae: int) -> None:
    """Give the model its own unembedding (a copy of wte), zero dimensions ``0 … d_sae−1`` there, and write each
    output feature's promoted words."""
    import torch

    with torch.no_grad():
        wte = hf.transformer.wte.weight  # type: ignore[attr-defined]
        head = torch.nn.Linear(wte.shape[1], wte.shape[0], bias=False)
        head.weight.copy_(wte)
        head.weight[:, :d_sae] = 0.0
        for f, ids in out_ids.items():
            for tid in ids:
                head.weight[tid, f] = OUTPUT_WEIGHT
    hf.config.tie_word_embeddings = False  # type: ignore[attr-defined]
    hf.lm_head = head  # type: ignore[attr-defined]


def _edit_embeddings(hf: object, token_ids: Mapping[int, Sequence[int]], d_sae: int) -> dict[int, float]:
    """Zero dimensions ``0 … d_sae−1`` of wte and wpe, then write each feature's words; return the activations."""
    import torch

    strengths: dict[int, float] = {}
    with torch.no_grad():
        wte = hf.transformer.wte.weight  # type: ignore[attr-defined]
        wpe = hf.transformer.wpe.weight  # type: ignore[attr-defined]
        wte[:, :d_sae] = 0.0
        wpe[:, :d_sae] = 0.0
        for f, ids in token_ids.items():
            for rank, tid in enumerate(ids):
                wte[tid, f] = BASE_STRENGTH + STEP * rank
                strengths[tid] = BASE_STRENGTH + STEP * rank + SAE_BIAS
    return strengths


def _save_sae(sae_dir: Path, d_model: int, d_sae: int, planted: set[int]) -> None:
    """A StandardSAE reading dimension f into feature f (planted ones only), bias −1, identity decoder."""
    import torch
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = StandardSAE(StandardSAEConfig(d_in=d_model, d_sae=d_sae,
                                        metadata=SAEMetadata(hook_name="blocks.0.hook_resid_pre")))
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_dec.zero_()
        sae.b_dec.zero_()
        sae.b_enc.fill_(SAE_BIAS)
        for f in range(d_sae):
            if f in planted:
                sae.W_enc[f, f] = 1.0
            sae.W_dec[f, f] = 1.0
    sae.save_model(str(sae_dir))


def load_planted(out_dir: Path) -> PlantedFeatures:
    """The :class:`PlantedFeatures` that :func:`plant_features` recorded in ``out_dir``."""
    return PlantedFeatures.model_validate_json((Path(out_dir) / MANIFEST).read_text())


# ============================================================================= corpus
def default_texts(seed: int, n: int, vocab: Sequence[str] = DEFAULT_VOCAB, *, min_words: int = 5,
                  max_words: int = 12) -> list[str]:
    """``n`` lines of ``min_words``–``max_words`` words drawn uniformly (with replacement) from ``vocab``.

    With the default vocabulary, planted words (cat, dog, fox, owl, red, green, blue, Mary, John, the) and
    unplanted ones (sat, park, drink, 10 …) mix: every planted feature fires in many lines, and many lines have
    no planted word at all, so harvesting yields top, quantile and non-activating random examples. Deterministic
    for a given seed. The words are joined with spaces, so each word after the first carries a leading space (the
    planted token); a line's first word does not, and does not fire. Write the lines to a ``.txt`` file (one
    text per line) to harvest it.
    """
    if not vocab:
        raise ValueError("default_texts needs a non-empty vocabulary")
    rng = random.Random(seed)
    return [" ".join(rng.choice(vocab) for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]


def vocab_for(features: Mapping[int, Sequence[str]], fillers: Sequence[str] = ()) -> tuple[str, ...]:
    """A :func:`default_texts` vocabulary: every planted word (without its leading space) plus ``fillers``.

    With no fillers, the unplanted words of :data:`DEFAULT_VOCAB` are used. Make sure the fillers are not planted
    words and, for a clean benchmark, that they are single tokens too (a split filler is harmless, only slower).
    """
    planted = [w.strip() for words in features.values() for w in words]
    rest = list(fillers) or [w for w in DEFAULT_VOCAB if w not in {p.strip() for ws in PLANTED_FEATURES.values()
                                                                     for p in ws}]
    return tuple(dict.fromkeys([*planted, *(w for w in rest if w not in planted)]))


def write_corpus(path: Path, texts: Sequence[str]) -> Path:
    """Write ``texts`` one per line (the ``.txt`` dataset format harvest reads); returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(t.replace("\n", " ") for t in texts) + "\n")
    return path


# ============================================================================= every kind of density, without a model
#: feature index -> the tokens it fires on (weakest first), for :func:`plant_mixed_harvest`. 0: a dense category
#: (articles: in every window of the harvest's random pool); 1: a category (animals); 2: a single token; 3: a rare
#: single token (a handful of windows); 4: a dense single token (every line ends with '.'); 5: a position feature
#: (the first word of every window, whatever it is). 6 and 7 are dead.
MIXED_FEATURES: Mapping[int, tuple[str, ...]] = MappingProxyType({
    0: (" the", " a"), 1: (" cat", " dog", " fox", " owl"), 2: (" Mary",), 3: (" zebra",), 4: (".",), 5: ()})
MIXED_DEAD: tuple[int, ...] = (6, 7)
MIXED_KINDS: Mapping[int, str] = MappingProxyType({0: "dense category", 1: "category", 2: "single token",
                                                   3: "rare", 4: "dense single token", 5: "position"})
#: a true description per live feature, and a wrong one (another feature's, or a category absent from it)
MIXED_DESCRIPTIONS: Mapping[int, str] = MappingProxyType({
    0: "articles", 1: "animals", 2: "the word 'Mary'", 3: "the word 'zebra'", 4: "the token '.'",
    5: "the first token of a text"})
MIXED_WRONG: Mapping[int, str] = MappingProxyType({
    0: "colour words", 1: "people's names", 2: "animals", 3: "colour words", 4: "numbers", 5: "colour words"})
_MIXED_FILLERS = ("sat", "ran", "park", "went", "store", "red", "blue", "John", "10", "12", "on", "to", "big", "old")
_BOS = "<|endoftext|>"


class PlantedRule(BaseModel):
    """When a planted feature of :func:`plant_kinds_harvest` fires (exactly; activation ``1 + 0.5·rank`` of the
    firing token in ``words``, 1.0 for any other token a rule lets fire).

    * ``tokens``: on the ``words``, anywhere;
    * ``after``: on the ``words`` (empty: any word, i.e. any token with a letter or digit) right after one of
      ``neighbours``;
    * ``position``: on whatever token sits at positions ``1..band`` after BOS;
    * ``pattern``: on every token matching the regular expression ``pattern`` (a token class).
    """

    model_config = ConfigDict(frozen=True)

    kind: Literal["tokens", "after", "position", "pattern"]
    words: tuple[str, ...] = ()
    neighbours: tuple[str, ...] = ()
    band: int = 1
    pattern: str | None = None

    def acts(self, tokens: Sequence[str]) -> list[float]:
        out = []
        for i, t in enumerate(tokens):
            strength = 1.0 + STEP * self.words.index(t) if t in self.words else None
            if self.kind == "tokens":
                a = strength or 0.0
            elif self.kind == "after":
                word = strength if self.words else (1.0 if re.search(r"\w", t) and t != _BOS else None)
                a = word if word and i > 0 and tokens[i - 1] in self.neighbours else 0.0
            elif self.kind == "position":
                a = 1.0 if 1 <= i <= self.band else 0.0
            else:
                a = 1.0 if t != _BOS and re.fullmatch(self.pattern or "", t.strip()) else 0.0
            out.append(a)
        return out


class PlantedHarvest(BaseModel):
    """A harvest emulated in pure Python over a generated corpus, with exact activations (no model, no SAE).

    ``windows[i]`` is window ``i``'s tokens (BOS first); ``examples[f]`` are feature ``f``'s ``feature_examples``
    rows as the harvest would store them (kinds top, quantile, random; ``window_index`` set, ``split`` unset);
    ``pool`` the windows of the random pool. Activations: feature ``f`` fires ``1 + 0.5·rank`` on its ``rank``-th
    word; the position feature fires 1.0 on the first word after BOS; BOS never fires.
    """

    model_config = ConfigDict(frozen=True)

    features: dict[int, tuple[str, ...]]
    dead: tuple[int, ...]
    windows: list[list[str]]
    pool: list[int]
    examples: dict[int, list[dict[str, object]]]
    rules: dict[int, PlantedRule] = {}

    def acts(self, feature: int, window: int) -> list[float]:
        """Feature ``feature``'s exact activation on every token of window ``window``."""
        return self.acts_on(feature, self.windows[window])

    def acts_on(self, feature: int, tokens: Sequence[str]) -> list[float]:
        """Feature ``feature``'s exact activation on every token of any token list (BOS first), e.g. a probe."""
        if feature in self.rules:
            return self.rules[feature].acts(tokens)
        return _mixed_acts(self.features, feature, tokens)

    def density(self, feature: int) -> float:
        """Fraction of (non-BOS) tokens on which ``feature`` fires, over the whole corpus."""
        fired = sum(a > 0 for w in range(len(self.windows)) for a in self.acts(feature, w)[1:])
        return fired / sum(len(w) - 1 for w in self.windows)

    def background(self, feature: int, n: int = 40) -> list[dict[str, object]]:
        """Up to ``n`` windows outside the random pool on which ``feature`` never fires, as ``background``
        example rows (what a caller computing the feature on more of the dataset would pass to scoring)."""
        pool = set(self.pool)
        rows: list[dict[str, object]] = []
        for w in range(len(self.windows)):
            a = self.acts(feature, w)
            if w not in pool and max(a) <= 0 and len(rows) < n:
                rows.append({"kind": "background", "example_id": w, "quantile": None, "tokens": self.windows[w],
                             "acts": a, "max_act": 0.0, "window_index": w})
        return rows


def _mixed_acts(features: Mapping[int, Sequence[str]], feature: int, tokens: Sequence[str]) -> list[float]:
    """The activation rule of :data:`MIXED_FEATURES` (words, or the position feature when its word list is empty)."""
    words = features.get(feature, ())
    if feature in features and not words:  # the position feature
        return [1.0 if i == 1 else 0.0 for i in range(len(tokens))]
    return [1.0 + STEP * words.index(t) if t in words else 0.0 for t in tokens]


def plant_mixed_harvest(seed: int = 0, n_windows: int = 600, *, random_pool: int = 256, top_k: int = 20,
                        n_quantiles: int = 4, per_quantile: int = 5, n_random: int = 20,
                        rare_windows: int = 4) -> PlantedHarvest:
    """A corpus and the harvest of :data:`MIXED_FEATURES` over it (see :class:`PlantedHarvest`).

    Lines are 5–10 words from the animal, name and filler words, ending in '.'. Every line in the random pool
    (the first ``random_pool`` windows) holds an article, so feature 0 has no non-activating pool window (dense);
    one line in ten outside the pool has none (what ``background`` returns). ' zebra' appears in
    ``rare_windows`` lines only. Feature 4 ('.') and the position feature 5 fire in every window. Examples are
    selected like :mod:`autoexplain.tools.harvest` does: the ``top_k`` windows by maximum activation, a seeded
    uniform sample of firing windows binned into ``n_quantiles`` by activation (``per_quantile`` each), and up
    to ``n_random`` pool windows where the feature never fires. Deterministic for a seed.
    """
    rng = random.Random(seed)
    content = [" cat", " dog", " fox", " owl", " Mary", *(" " + w for w in _MIXED_FILLERS)]
    rare_at = set(rng.sample(range(n_windows), rare_windows))
    windows: list[list[str]] = []
    for i in range(n_windows):
        words = [rng.choice(content) for _ in range(rng.randint(4, 9))]
        if i < random_pool or rng.random() >= 0.1:
            words.insert(rng.randrange(1, len(words) + 1), rng.choice((" the", " a")))
        if i in rare_at:
            words.insert(rng.randrange(1, len(words) + 1), " zebra")
        first = words[0].strip()
        windows.append([_BOS, first, *words[1:], "."])
    features = {int(f): tuple(w) for f, w in MIXED_FEATURES.items()}
    pool = list(range(min(random_pool, n_windows)))
    examples = _select_examples(windows, pool, [*features, *MIXED_DEAD],
                                lambda f, w: _mixed_acts(features, f, w), seed=seed, top_k=top_k,
                                n_quantiles=n_quantiles, per_quantile=per_quantile, n_random=n_random)
    return PlantedHarvest(features=features, dead=MIXED_DEAD, windows=windows, pool=pool, examples=examples)


def _select_examples(windows: list[list[str]], pool: list[int], feats: Sequence[int],
                     rule: Callable[[int, list[str]], list[float]], *, seed: int, top_k: int, n_quantiles: int,
                     per_quantile: int, n_random: int) -> dict[int, list[dict[str, object]]]:
    """Examples per feature as :mod:`autoexplain.tools.harvest` selects them (see :func:`plant_mixed_harvest`)."""
    n_windows = len(windows)
    examples: dict[int, list[dict[str, object]]] = {}
    for f in feats:
        acts = [rule(f, w) for w in windows]
        peak = [max(a) for a in acts]
        firing = [w for w in range(n_windows) if peak[w] > 0]
        rows: list[dict[str, object]] = []

        def add(kind: str, w: int, q: int | None, rows: list[dict[str, object]] = rows,
                acts: list[list[float]] = acts, peak: list[float] = peak) -> None:
            rows.append({"kind": kind, "example_id": sum(r["kind"] == kind for r in rows), "quantile": q,
                         "tokens": windows[w], "acts": acts[w], "max_act": peak[w], "window_index": w})

        for w in sorted(firing, key=lambda w: (-peak[w], w))[:top_k]:
            add("top", w, None)
        frng = random.Random(f"{seed}/{f}")
        sample = sorted(frng.sample(firing, min(len(firing), n_quantiles * per_quantile)), key=lambda w: (peak[w], w))
        for j, w in enumerate(sample):
            add("quantile", w, j * n_quantiles // max(1, len(sample)))
        for w in [w for w in pool if peak[w] <= 0][:n_random]:
            add("random", w, None)
        examples[f] = rows
    return examples


# ============================================================================= every kind of explanation
#: the lexical judge's animal words (a category feature fires on members the corpus never shows, as probes test)
_ANIMALS = tuple(f" {w}" for w in ("cat dog fox owl wolf bird horse cow pig sheep mouse rat lion tiger bear fish duck "
                                   "goat rabbit deer kitten puppy").split())
#: feature -> its rule, for :func:`plant_kinds_harvest`: one feature per kind of explanation the offline policy
#: can write. 12 and 13 are dead. (The output-side kind needs a model: :func:`plant_features` with ``outputs``.)
KIND_RULES: Mapping[int, PlantedRule] = MappingProxyType({
    0: PlantedRule(kind="tokens", words=(" the", " a", " an")),                # dense category (articles)
    1: PlantedRule(kind="tokens", words=_ANIMALS),                              # category (every animal word)
    2: PlantedRule(kind="tokens", words=(" Mary",)),                            # single token
    3: PlantedRule(kind="tokens", words=(" zebra",)),                           # rare single token
    4: PlantedRule(kind="position", band=1),                                    # first token of a text
    5: PlantedRule(kind="after", neighbours=(" on",)),                          # any word after ' on'
    6: PlantedRule(kind="after", words=(" cat", " dog", " fox", " owl"), neighbours=(" big",)),  # animals after big
    7: PlantedRule(kind="pattern", pattern=r"\d+"),                             # numbers
    8: PlantedRule(kind="pattern", pattern=r"[A-Z][a-z]+"),                      # capitalised words
    9: PlantedRule(kind="after", words=(" store",), neighbours=(" went",)),     # the n-gram 'went store'
    10: PlantedRule(kind="tokens", words=(".",)),                               # dense single token
    11: PlantedRule(kind="position", band=3),                                   # a position band (1-3)
})
KIND_DEAD: tuple[int, ...] = (12, 13)
#: the kind of explanation each live feature should get (as :func:`label_kind` classifies a label)
KIND_EXPECTED: Mapping[int, str] = MappingProxyType({
    0: "category", 1: "category", 2: "tokens", 3: "tokens", 4: "position", 5: "context", 6: "context",
    7: "class", 8: "class", 9: "ngram", 10: "tokens", 11: "position"})
#: a true description per live feature and a wrong one of the same kind
KIND_TRUE: Mapping[int, str] = MappingProxyType({
    0: "articles", 1: "animals", 2: "the word 'Mary'", 3: "the word 'zebra'", 4: "the first token of a text",
    5: "any word after 'on'", 6: "animals after 'big'", 7: "numbers", 8: "capitalised words",
    9: "the end of the phrase 'went store'", 10: "the token '.'", 11: "tokens at positions 1-3 of a text"})
KIND_WRONG: Mapping[int, str] = MappingProxyType({
    0: "colour words", 1: "people's names", 2: "the word 'John'", 3: "the word 'fox'",
    4: "tokens at positions 4-5 of a text", 5: "any word after 'big'", 6: "animals after 'on'",
    7: "punctuation", 8: "numbers", 9: "the end of the phrase 'went park'", 10: "the token ','",
    11: "tokens at positions 5-7 of a text"})
_KIND_CONTENT = (" cat", " dog", " fox", " owl", " Mary", " John", " Paris", " Rome", " 10", " 12", " 7", " 3",
                 " sat", " ran", " park", " went", " store", " on", " big", " old", " red", ",")


def label_kind(text: str) -> str:
    """The kind of an explanation's input side: position, ngram, context, class, category or tokens (the first
    that applies, in that order). An output clause ("; promotes 'T'") is not looked at: test it separately."""
    low = text.lower()
    if re.search(r"\bfirst token\b|\bpositions? \d", low):
        return "position"
    if "end of the phrase" in low:
        return "ngram"
    if re.search(r" (after|before) '", low):
        return "context"
    if re.fullmatch(r"(numbers|capitalised words|punctuation)", low.strip()):
        return "class"
    if re.search(r"\bwords?\b", low) and "'" not in low:
        return "category"
    return "tokens"


def plant_kinds_harvest(seed: int = 0, n_windows: int = 800, *, random_pool: int = 256, top_k: int = 20,
                        n_quantiles: int = 4, per_quantile: int = 5, n_random: int = 20,
                        rare_windows: int = 4) -> PlantedHarvest:
    """A corpus and the harvest of :data:`KIND_RULES` over it: one feature per kind of explanation.

    Lines are 4–9 words from animals, names, digits, city names and fillers (' on', ' big', ' went', ' store'
    among them), ending in '.'; every random-pool line holds an article (feature 0 is dense); ' zebra' is in
    ``rare_windows`` lines; ' went store' is written as a phrase in one line in five (and both words also occur
    alone). Exact activations (:class:`PlantedRule`), examples selected as the harvest does. Deterministic.
    """
    rng = random.Random(seed)
    rare_at = set(rng.sample(range(n_windows), rare_windows))
    windows: list[list[str]] = []
    for i in range(n_windows):
        words = [rng.choice(_KIND_CONTENT) for _ in range(rng.randint(4, 9))]
        if i < random_pool or rng.random() >= 0.1:
            words.insert(rng.randrange(1, len(words) + 1), rng.choice((" the", " a")))
        if rng.random() < 0.2:
            at = rng.randrange(1, len(words) + 1)
            words[at:at] = [" went", " store"]
        if i in rare_at:
            words.insert(rng.randrange(1, len(words) + 1), " zebra")
        windows.append([_BOS, words[0].strip() if words[0] != "," else "so", *words[1:], "."])
    pool = list(range(min(random_pool, n_windows)))
    rules = dict(KIND_RULES)
    examples = _select_examples(windows, pool, [*rules, *KIND_DEAD],
                                lambda f, w: rules[f].acts(w) if f in rules else [0.0] * len(w), seed=seed,
                                top_k=top_k, n_quantiles=n_quantiles, per_quantile=per_quantile, n_random=n_random)
    return PlantedHarvest(features={f: r.words for f, r in rules.items()}, dead=KIND_DEAD, windows=windows,
                          pool=pool, examples=examples, rules=rules)


__all__ = ["KIND_DEAD", "KIND_EXPECTED", "KIND_RULES", "KIND_TRUE", "KIND_WRONG", "PlantedRule", "label_kind",
           "plant_kinds_harvest", "DEFAULT_VOCAB", "PLANTED_DEAD", "PLANTED_DESCRIPTIONS", "PLANTED_FEATURES",
           "PlantedFeatures",
           "MIXED_DEAD", "MIXED_DESCRIPTIONS", "MIXED_FEATURES", "MIXED_KINDS", "MIXED_WRONG", "PlantedHarvest",
           "default_texts", "load_planted", "plant_features", "plant_mixed_harvest", "single_token_ids",
           "vocab_for", "write_corpus"]
