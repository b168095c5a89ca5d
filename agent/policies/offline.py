"""The offline policy: deterministic rules, no network — the default, and the floor the LLM policy must beat.

Features
--------
1. Read the feature (``feature_examples``: statistics and explain-split contexts only). A feature with no
   firing in the harvest (``density == 0``, and nothing else) is *dead*: one explanation saying so, never a
   label. A live feature whose explain side shows no activating context (a harvest split before rare features
   kept one there) is not dead either: it gets one explanation saying it is live but unreadable, which is
   scored like any draft (and scores as no label).
2. Hypotheses from the firing tokens of the explain-split contexts, weighted by activation:
   * **tokens** — the few tokens carrying ≥ 90 % of the activation mass ("fires on ' cat', ' dog', ' fox'");
   * **category** — broader: a lexicon category holding ≥ 60 % of the mass ("fires on animal words");
   * **narrow** — the single strongest token.
3. Probe them (``feature_activations`` on texts the policy writes): the strongest explain-split context is cut
   after its peak token and the peak is replaced by (a) category members never seen firing, (b) the listed
   tokens, (c) control words that did not fire. The activation on the substituted (last) token decides: the
   category is confirmed if ≥ 60 % of unseen members fire and ≤ 20 % of controls do, refuted below 30 %.
   Probes are association-level evidence (they show where the feature fires, not what it does).
   Beyond token lists (issue #14), each from the explain-split contexts and kept only when it fits them at least
   as well as the token list does (token-level balanced accuracy of the label as the lexical judge reads it):
   * **position** — firing concentrated on the first token of a text, or on positions 1-k (k ≤ 4), with most
     tokens there firing;
   * **context** — "X after 'Y'" / "X before 'Y'" (the neighbour decides whether X fires), and "any word after
     'Y'" when the firing tokens are many but the preceding token is always the same;
   * **n-gram** — one token firing only right after one other: "the end of the phrase 'Y X'";
   * **token class** — capitalised words, numbers, punctuation (≥ 80 % of the mass, ≥ 3 distinct tokens, and
     most tokens of the class firing);
   * **output** — "promotes 'T'": the tokens the decoder direction promotes most (the harvest's logit effects),
     tested by intervention (``output_effect``: steer the feature up at its natural maximum, zero it where it
     fires, and compare the named tokens' log-probability change with random tokens'). Confirmed only when both
     steering and ablation put the named tokens above random ones (AUC ≥ 0.8); then every label carries the
     output clause and claims ``intervention`` (the output_effect call is cited, so the supported level is
     intervention too).
4. Propose every hypothesis not refuted; the graph scores each on held-out data; the best by the overall score
   (:func:`~autoexplain.agent.policies.base.overall`) is kept. If the best correctness is below 0.75 the policy
   refines once: a longer token list reaching into the weak quantiles.

Circuits
--------
See :mod:`autoexplain.agent.policies.offline_circuits`: the circuit (EAP-IG plus noising checks, found on the fit
half of the prompts), each node's mediation, the heads' roles checked by intervention, and one explanation that
names the mechanism and claims only what was checked.

The lexicon (category → member words) is the offline stand-in for world knowledge. The default is the lexical
judge's; a dataset that ships one (the toy world's ``categories.json``) can extend it. Caveat: with a lexicon
the policy can only name categories it knows; anything else is labelled by its token list.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping
from typing import Any

from autoexplain.agent.policies import offline_circuits, offline_feature_circuits
from autoexplain.agent.policies.base import Policy, PolicyStep
from autoexplain.agent.state import (
    Draft,
    Hypothesis,
    HypothesisStatus,
    ItemKind,
    ItemState,
    ToolRequest,
    ToolResult,
    WorkItem,
    stable_id,
)
from autoexplain.tools.vocab import CausalLevel

TOKEN_MASS = 0.9
MAX_LISTED = 8
CATEGORY_MASS = 0.6
CONFIRM_FIRE = 0.6
REFUTE_FIRE = 0.3
CONTROL_FIRE = 0.2
REFINE_BELOW = 0.75
CONTEXT_COVER = 0.85
CONTEXT_PRECISION = 0.8
POSITION_COVER = 0.85
POSITION_PRECISION = 0.8
MAX_BAND = 4
CLASS_MASS = 0.8
CLASS_PRECISION = 0.6
OUTPUT_CONFIRM = 0.8
OUTPUT_TOKENS = 3
OUTPUT_TEXTS = 8
#: token classes the policy can name, with the phrase the lexical judge reads for each
TOKEN_CLASSES: dict[str, tuple[str, str]] = {
    "capitalised": (r"[A-Z][A-Za-z'-]*", "capitalised words"),
    "number": (r"\d+([.,]\d+)?", "numbers"),
    "punctuation": (r"[.,;:!?'\"()-]+", "punctuation"),
}


def _clean(token: str) -> str:
    return token.strip()


def _is_special(token: str) -> bool:
    return token.startswith("<|") and token.endswith("|>") or token in ("<s>", "</s>", "[CLS]", "[SEP]", "<pad>")


def _quote(tokens: list[str]) -> str:
    return ", ".join(f"'{_clean(t)}'" for t in tokens)


def _or(tokens: list[str]) -> str:
    return " or ".join(f"'{t}'" for t in tokens)


def _token_label(tokens: list[str]) -> str:
    """"the token 'x'" or "the tokens 'x', 'y'"."""
    return f"the token{'s' if len(tokens) > 1 else ''} {_quote(tokens)}"


def _context_rule(examples: list[Any], members: set[str] | frozenset[str] | None,
                  side: str = "after") -> list[str] | None:
    """Neighbouring tokens that decide whether ``members`` fire, when the explain-split examples show one.

    Over every occurrence of a member token (``members`` None: every real token): the fewest preceding tokens
    (``side="after"``; the following ones for ``"before"``), at most 3, covering ≥ 85 % of the firing
    occurrences; kept only if ≥ 80 % of the occurrences they neighbour fire and at least 3 non-firing
    occurrences neighbour other tokens (otherwise the condition explains nothing)."""
    fired: Counter[str] = Counter()
    occ: list[tuple[str, bool]] = []
    step = -1 if side == "after" else 1
    for e in examples:
        for i in range(len(e.tokens)):
            j = i + step
            if not 0 <= j < len(e.tokens) or _is_special(e.tokens[i]) or not _clean(e.tokens[i]):
                continue
            if members is None or _clean(e.tokens[i]).lower() in members:
                prev = _clean(e.tokens[j])
                occ.append((prev, e.acts[i] > 0))
                if e.acts[i] > 0:
                    fired[prev] += 1
    n_fired = sum(fired.values())
    if n_fired < 5:
        return None
    chosen, covered = [], 0
    for prev, c in fired.most_common(3):
        chosen.append(prev)
        covered += c
        if covered >= CONTEXT_COVER * n_fired:
            break
    if covered < CONTEXT_COVER * n_fired or not all(p for p in chosen):
        return None
    inside = [f for prev, f in occ if prev in chosen]
    outside_quiet = sum(1 for prev, f in occ if prev not in chosen and not f)
    if sum(inside) / len(inside) < CONTEXT_PRECISION or outside_quiet < 3:
        return None
    return chosen


def _position_rule(examples: list[Any]) -> int | None:
    """k when the firing concentrates on positions 1..k of a text (k ≤ :data:`MAX_BAND`, counted from the first
    real token as the lexical judge counts): ≥ 85 % of the firing tokens there, ≥ 80 % of the tokens there firing,
    and at least 3 distinct tokens firing there (fewer are better named as tokens)."""
    from autoexplain.evals.judges import real_positions

    seen: Counter[int] = Counter()
    fired: Counter[int] = Counter()
    words: dict[int, set[str]] = defaultdict(set)
    for e in examples:
        for i, p in real_positions(e.tokens).items():
            seen[p] += 1
            if e.acts[i] > 0:
                fired[p] += 1
                words[p].add(_clean(e.tokens[i]).lower())
    total = sum(fired.values())
    if total < 5:
        return None
    for k in range(1, MAX_BAND + 1):
        cov = sum(fired[p] for p in range(1, k + 1))
        there = sum(seen[p] for p in range(1, k + 1))
        distinct = set().union(*(words[p] for p in range(1, k + 1)))
        if cov >= POSITION_COVER * total and there and cov / there >= POSITION_PRECISION and len(distinct) >= 3:
            return k
    return None


def _class_rule(examples: list[Any], merged: Mapping[str, float]) -> str | None:
    """The token class (:data:`TOKEN_CLASSES`) holding ≥ 80 % of the firing mass over ≥ 3 distinct tokens, with
    ≥ 60 % of that class's tokens in the explain-split contexts firing; None if there is none."""
    import re

    total = sum(merged.values()) or 1.0
    for name, (pattern, _) in TOKEN_CLASSES.items():
        members = [t for t in merged if re.fullmatch(pattern, t)]
        if len(members) < 3 or sum(merged[t] for t in members) / total < CLASS_MASS:
            continue
        hits = [a > 0 for e in examples for t, a in zip(e.tokens, e.acts, strict=True)
                if re.fullmatch(pattern, _clean(t)) and not _is_special(t)]
        if hits and sum(hits) / len(hits) >= CLASS_PRECISION:
            return name
    return None


def _ngram(context: list[str] | None, listed: list[str]) -> str | None:
    """"the end of the phrase 'Y X'" when one token X fires only right after one token Y."""
    if context and len(context) == 1 and len(listed) == 1 and not _is_special(context[0]):
        return f"the end of the phrase '{context[0]} {_clean(listed[0])}'"
    return None


def _explain_fit(label: str, examples: list[Any], lexicon: Mapping[str, frozenset[str]]) -> float | None:
    """Token-level balanced accuracy of ``label`` (as the lexical judge reads it) on the explain-split contexts:
    how well the label predicts which tokens fire, on the data the policy saw (never the held-out side)."""
    from autoexplain.evals.judges import CATEGORIES, LexicalJudge

    judge = LexicalJudge(lexicon={**CATEGORIES, **lexicon})  # the judge's classes (numbers) and the policy's words
    tp = fn = tn = fp = 0
    for e in examples:
        hit = judge.firing_positions(label, e.tokens)
        for i, (t, a) in enumerate(zip(e.tokens, e.acts, strict=True)):
            if _is_special(t):
                continue
            if a > 0:
                tp, fn = tp + (i in hit), fn + (i not in hit)
            else:
                fp, tn = fp + (i in hit), tn + (i not in hit)
    if not tp + fn or not tn + fp:
        return None
    return (tp / (tp + fn) + tn / (tn + fp)) / 2


def _output_candidates(top_logits: list[tuple[str, float]]) -> list[str]:
    """The tokens the decoder direction promotes clearly: up to 3 with a logit effect ≥ half the largest (> 0)."""
    if not top_logits or top_logits[0][1] <= 0:
        return []
    top = top_logits[0][1]
    return [t for t, v in top_logits[:OUTPUT_TOKENS] if v >= 0.5 * top and _readable(t)]


def _readable(token: str) -> bool:
    """A token a label can quote: printable, not special, holding a letter, a digit or punctuation."""
    import re

    t = _clean(token)
    return bool(t) and t.isprintable() and not _is_special(t) and bool(re.search(r"[\w.,;:!?'\"()-]", t))


def _window_text(tokens: list[str]) -> str:
    """A context's text without special tokens, cut to three quarters of its tokens (re-tokenized window text can
    run longer than the window, and the intervention tools refuse texts longer than the model's context)."""
    real = [t for t in tokens if not _is_special(t)]
    return "".join(real[: max(1, 3 * len(real) // 4)])


class OfflinePolicy(Policy):
    """Deterministic rules (see the module docstring). ``lexicon``: category name → member words."""

    name = "offline"
    llm_model: str | None = None

    def __init__(self, lexicon: Mapping[str, frozenset[str] | set[str] | tuple[str, ...]] | None = None) -> None:
        if lexicon is None:
            from autoexplain.evals.judges import CATEGORIES

            lexicon = CATEGORIES
        self.lexicon = {k: frozenset(w.lower() for w in v) for k, v in lexicon.items() if v}

    # ------------------------------------------------------------------------------------------------ dispatch
    def plan(self, state: ItemState, item: WorkItem) -> PolicyStep:
        return self._feature_plan(state, item) if item.kind is ItemKind.FEATURE else self._circuit_plan(state, item)

    def observe(self, state: ItemState, item: WorkItem, results: list[ToolResult]) -> PolicyStep:
        if item.kind is ItemKind.FEATURE:
            return self._feature_observe(state, item, results)
        return self._circuit_observe(state, item, results)

    def propose(self, state: ItemState, item: WorkItem) -> PolicyStep:
        if item.kind is ItemKind.FEATURE:
            return self._feature_propose(state, item)
        return self._circuit_propose(state, item)

    def decide(self, state: ItemState, item: WorkItem) -> PolicyStep:
        notes = state.get("notes") or {}
        scored = state.get("scored") or []
        if item.kind is ItemKind.FEATURE and scored and not notes.get("refined"):
            best = max(scored, key=lambda s: s["overall"])
            more = [t for t, _ in notes.get("ranked", [])][len(notes.get("listed", [])):]
            if (best["scores"].get("correctness") or 0) < REFINE_BELOW and more:
                return PolicyStep(route="refine", notes={"refined": True})
        return PolicyStep(route="accept")

    # ------------------------------------------------------------------------------------------------ features
    def _feature_plan(self, state: ItemState, item: WorkItem) -> PolicyStep:
        notes = state.get("notes") or {}
        sae_id, f = item.feature.sae_id, item.feature.index
        if "ranked" not in notes and not notes.get("dead") and not notes.get("unreadable"):
            return PolicyStep(requests=[ToolRequest(tool="feature_examples",
                                                    args={"sae_id": sae_id, "feature_index": f, "n": 40})])
        if notes.get("dead") or notes.get("unreadable") or notes.get("refined"):
            return PolicyStep()  # ready to propose
        if notes.get("probed"):
            return PolicyStep()  # ready to propose
        # one step: the probes of the input side and the intervention test of the output side together
        requests = []
        probes = notes.get("probe_texts") or []
        if probes:
            requests.append(ToolRequest(tool="feature_activations", args={
                "sae_id": sae_id, "features": [f], "texts": [p["text"] for p in probes]}))
        texts = notes.get("output_texts") or []
        if notes.get("output_candidates") and texts:
            requests.append(ToolRequest(tool="output_effect", args={
                "sae_id": sae_id, "feature": f, "tokens": notes["output_candidates"], "texts": texts,
                "scale": notes.get("output_scale") or 1.0}))
        return PolicyStep(requests=requests, notes={"probed": True})

    def _feature_observe(self, state: ItemState, item: WorkItem, results: list[ToolResult]) -> PolicyStep:
        steps = [self._observe_one(state, item, res) for res in results]
        if len(steps) == 1:
            return steps[0]
        return PolicyStep(hypotheses=[h for st in steps for h in st.hypotheses],
                          notes={k: v for st in steps for k, v in st.notes.items()})

    def _observe_one(self, state: ItemState, item: WorkItem, res: ToolResult) -> PolicyStep:
        if res.error and res.request.tool == "output_effect":  # no output-side evidence: the labels stay input-side
            return PolicyStep(notes={"output": {"confirmed": False, "error": res.error}})
        if res.error:
            raise RuntimeError(f"offline policy: {res.request.tool} failed: {res.error}")
        if res.request.tool == "feature_examples":
            return self._read_examples(item, res)
        if res.request.tool == "output_effect":
            return self._read_output(state, item, res)
        return self._read_probes(state, item, res)

    def _read_output(self, state: ItemState, item: WorkItem, res: ToolResult) -> PolicyStep:
        """The output hypothesis is confirmed when steering raises the named tokens above random ones and zeroing
        the feature where it fires lowers them (both AUC ≥ :data:`OUTPUT_CONFIRM`), refuted when steering does
        not, inconclusive otherwise (e.g. it never fires in the texts, so ablation says nothing)."""
        out = res.output
        steer_ok = out.steer_auc >= OUTPUT_CONFIRM
        abl_ok = out.ablate_auc is not None and out.ablate_auc >= OUTPUT_CONFIRM
        status = (HypothesisStatus.CONFIRMED if steer_ok and abl_ok else
                  HypothesisStatus.REFUTED if not steer_ok else HypothesisStatus.INCONCLUSIVE)
        hid = stable_id("hyp", item.item_id, "output")
        old = Hypothesis.model_validate((state.get("hypotheses") or {})[hid])
        upd = old.model_copy(update={"status": status, "evidence": [*old.evidence, res.call_id],
                                     "causal_level": CausalLevel.INTERVENTION})
        return PolicyStep(hypotheses=[upd], notes={"output": {
            "confirmed": status is HypothesisStatus.CONFIRMED, "tokens": out.tokens, "call_id": res.call_id,
            "steer_auc": out.steer_auc, "ablate_auc": out.ablate_auc}})

    def _read_examples(self, item: WorkItem, res: ToolResult) -> PolicyStep:
        out = res.output
        if out.is_dead:  # density 0: the only meaning of dead
            return PolicyStep(notes={"dead": True, "n_tokens": out.n_tokens})
        if not any(e.max_act > 0 for e in out.examples):  # live, but nothing on the explain side to read
            return PolicyStep(notes={"unreadable": True, "n_tokens": out.n_tokens, "density": out.density,
                                     "n_hidden": out.n_hidden})
        mass: Counter[str] = Counter()
        for e in out.examples:
            for t, a in zip(e.tokens, e.acts, strict=True):
                if a > 0 and _clean(t):
                    mass[t] += a
        merged: Counter[str] = Counter()  # ' John' and 'John' are one word to a reader
        for t, m in mass.items():
            merged[_clean(t)] += m
        total = sum(merged.values())
        ranked = [(t, round(m / total, 5)) for t, m in merged.most_common()]
        listed, acc = [], 0.0
        for t, share in ranked:
            if acc >= TOKEN_MASS or len(listed) >= MAX_LISTED:
                break
            listed.append(t)
            acc += share
        by_cat: dict[str, float] = defaultdict(float)
        seen: dict[str, list[str]] = defaultdict(list)
        for t, share in ranked:
            for cat, members in self.lexicon.items():
                if _clean(t).lower() in members:
                    by_cat[cat] += share
                    seen[cat].append(_clean(t).lower())
        category = max(by_cat, key=lambda c: by_cat[c]) if by_cat else None
        if category is not None and by_cat[category] < CATEGORY_MASS:
            category = None
        hyps = [Hypothesis(hypothesis_id=stable_id("hyp", item.item_id, "tokens"),
                           text=f"fires on {_token_label(listed)}", evidence=[res.call_id])]
        if category:
            hyps.append(Hypothesis(hypothesis_id=stable_id("hyp", item.item_id, "category"),
                                   text=f"fires on {category} words (broader than the tokens seen)",
                                   evidence=[res.call_id]))
        if len(listed) > 1:
            hyps.append(Hypothesis(hypothesis_id=stable_id("hyp", item.item_id, "narrow"),
                                   text=f"fires on '{_clean(listed[0])}' only (narrower)", evidence=[res.call_id]))
        members = set(self.lexicon[category]) if category else {t.lower() for t in listed}
        context = _context_rule(out.examples, members)
        if context and not _ngram(context, listed):  # one token after one token: the n-gram label says it
            base = f"{category} words" if category else _token_label(listed)
            hyps.append(Hypothesis(hypothesis_id=stable_id("hyp", item.item_id, "context"),
                                   text=f"fires on {base} only after {_or(context)}", evidence=[res.call_id]))
        labels = self._other_labels(out.examples, merged, listed, category, members, context)
        for key, text in labels.items():
            hyps.append(Hypothesis(hypothesis_id=stable_id("hyp", item.item_id, key), text=f"fires on {text}",
                                   evidence=[res.call_id]))
        candidates = _output_candidates([(t, float(v)) for t, v in out.top_logits])
        texts = [_window_text(e.tokens) for e in out.examples if e.max_act > 0][:OUTPUT_TEXTS]
        if candidates:
            hyps.append(Hypothesis(hypothesis_id=stable_id("hyp", item.item_id, "output"),
                                   text=f"promotes {_quote(candidates)} (the tokens its decoder direction "
                                        "promotes most)", evidence=[res.call_id]))
        return PolicyStep(hypotheses=hyps, notes={
            "ranked": ranked[:40], "listed": listed, "category": category, "context": context, "labels": labels,
            "output_candidates": candidates, "output_texts": [t for t in texts if t.strip()],
            "output_scale": float(out.max_act or 1.0),
            "probe_texts": self._probe_texts(out, listed, category, seen.get(category or "", []), ranked)})

    def _other_labels(self, examples: list[Any], merged: Mapping[str, float], listed: list[str],
                      category: str | None, members: set[str] | frozenset[str],
                      context: list[str] | None) -> dict[str, str]:
        """Position, context (any word after / before), n-gram and token-class labels that the explain-split
        contexts support, each kept only if its token-level fit there is at least the token list's."""
        cands: dict[str, str] = {}
        k = _position_rule(examples)
        if k == 1:
            cands["position"] = "the first token of a text"
        elif k:
            cands["position"] = f"tokens at positions 1-{k} of a text"
        cls = _class_rule(examples, merged)
        if cls:
            cands["class"] = TOKEN_CLASSES[cls][1]
        ngram = _ngram(context, listed)
        if ngram:
            cands["ngram"] = ngram
        before = _context_rule(examples, members, "before")
        if before:
            base = f"{category} words" if category else _token_label(listed)
            cands["context_before"] = f"{base} before {_or(before)}"
        if len(merged) > MAX_LISTED:  # many firing tokens: maybe any word in one context
            for side in ("after", "before"):
                anyword = _context_rule(examples, None, side)
                if anyword:
                    cands[f"any_{side}"] = f"any word {side} {_or(anyword)}"
                    break
        floor = _explain_fit(_token_label(listed), examples, self.lexicon) or 0.0
        out = {}
        for key, text in cands.items():
            fit = _explain_fit(text, examples, self.lexicon)
            if fit is not None and fit >= floor:
                out[key] = text
        return out

    def _probe_texts(self, out: Any, listed: list[str], category: str | None, seen: list[str],
                     ranked: list[tuple[str, float]]) -> list[dict[str, Any]]:
        """Texts ending in a substituted word, built from the strongest context cut after its peak."""
        tops = [e for e in out.examples if e.max_act > 0]
        if not tops:
            return []
        best = tops[0]
        peak = best.acts.index(max(best.acts))
        prefix = [t for t in best.tokens[:peak] if not _is_special(t)]
        space = " " if best.tokens[peak].startswith(" ") else ""
        fired = {_clean(t).lower() for t, _ in ranked}
        probes: list[dict[str, Any]] = []
        if category:
            unseen = sorted(self.lexicon[category] - set(seen) - fired)[:6]
            probes += [{"word": w, "role": "member"} for w in unseen]
        probes += [{"word": _clean(t), "role": "listed"} for t in listed[:6]]
        quiet = []
        for e in out.examples:
            for t, a in zip(e.tokens, e.acts, strict=True):
                w = _clean(t)
                if a <= 0 and w.isalpha() and w.lower() not in fired and w not in quiet and not _is_special(t):
                    if not any(w.lower() in m for m in self.lexicon.get(category or "", frozenset())):
                        quiet.append(w)
        probes += [{"word": w, "role": "control"} for w in quiet[:6]]
        return [{**p, "text": "".join(prefix) + space + p["word"]} for p in probes]

    def _read_probes(self, state: ItemState, item: WorkItem, res: ToolResult) -> PolicyStep:
        notes = state.get("notes") or {}
        probes = notes.get("probe_texts") or []
        fired: dict[str, list[bool]] = defaultdict(list)
        for p, it in zip(probes, res.output.items, strict=True):
            if not it.tokens or _clean(it.tokens[-1]) != p["word"]:
                continue  # the word is not one token of this model: the probe says nothing about it
            acts = it.features[0].activations
            fired[p["role"]].append(bool(acts) and acts[-1] > 0)
        rate = {role: sum(v) / len(v) for role, v in fired.items() if v}
        hyps = {k: Hypothesis.model_validate(v) for k, v in (state.get("hypotheses") or {}).items()}
        keys = {stable_id("hyp", item.item_id, k): k for k in ("tokens", "category", "narrow", "context")}
        keys.update({stable_id("hyp", item.item_id, k): k for k in ("output", *(notes.get("labels") or {}))})
        updates = []
        for h in hyps.values():
            key = keys.get(h.hypothesis_id)
            status = h.status
            if key == "category" and "member" in rate:
                ok_controls = rate.get("control", 0.0) <= CONTROL_FIRE
                status = (HypothesisStatus.CONFIRMED if rate["member"] >= CONFIRM_FIRE and ok_controls
                          else HypothesisStatus.REFUTED if rate["member"] < REFUTE_FIRE
                          else HypothesisStatus.INCONCLUSIVE)
            elif key == "tokens" and "listed" in rate:
                status = HypothesisStatus.CONFIRMED if rate["listed"] >= CONFIRM_FIRE else HypothesisStatus.INCONCLUSIVE
            elif key == "narrow" and "listed" in rate:
                others = fired["listed"][1:]
                status = HypothesisStatus.REFUTED if others and any(others) else HypothesisStatus.INCONCLUSIVE
            elif key not in ("tokens", "category", "narrow", "context"):
                continue  # position, context, class and output hypotheses are not tested by these probes
            updates.append(h.model_copy(update={"status": status, "evidence": [*h.evidence, res.call_id]}))
        return PolicyStep(hypotheses=updates, notes={"probe_rates": rate})

    def _feature_propose(self, state: ItemState, item: WorkItem) -> PolicyStep:
        notes = state.get("notes") or {}
        if notes.get("dead"):
            return PolicyStep(drafts=[Draft(text=f"dead feature: never fired in {notes.get('n_tokens')} harvested "
                                                 "tokens", dead=True)])
        if notes.get("unreadable"):
            return PolicyStep(drafts=[Draft(
                text=f"live feature (density {notes.get('density') or 0:.3g} over {notes.get('n_tokens')} "
                     "tokens) with no activating example on the explain side: not labelled",
                evidence=state.get("calls", []))])
        hyps = {k: Hypothesis.model_validate(v) for k, v in (state.get("hypotheses") or {}).items()}
        listed = notes.get("listed") or []
        if notes.get("refined"):  # a longer list, reaching the weak quantiles
            longer = [t for t, _ in notes.get("ranked", [])][: 2 * MAX_LISTED]
            return PolicyStep(drafts=[Draft(text=_token_label(longer), evidence=state.get("calls", []))])
        drafts = []
        labels = notes.get("labels") or {}
        by_id = {stable_id("hyp", item.item_id, k): k for k in labels}
        output = notes.get("output") or {}
        out_hyp = hyps.get(stable_id("hyp", item.item_id, "output"))
        confirmed = bool(output.get("confirmed")) and out_hyp is not None
        suffix = f"; promotes {_quote(output['tokens'])}" if confirmed else ""
        for h in hyps.values():
            if h.status is HypothesisStatus.REFUTED or h.hypothesis_id == stable_id("hyp", item.item_id, "output"):
                continue
            if h.hypothesis_id in by_id:
                text = labels[by_id[h.hypothesis_id]]
            elif h.hypothesis_id == stable_id("hyp", item.item_id, "tokens"):
                text = _token_label(listed)
            elif h.hypothesis_id == stable_id("hyp", item.item_id, "category"):
                text = f"{notes['category']} words"
            elif h.hypothesis_id == stable_id("hyp", item.item_id, "context"):
                cat = hyps.get(stable_id("hyp", item.item_id, "category"))
                usable = cat is not None and cat.status is not HypothesisStatus.REFUTED
                base = f"{notes['category']} words" if usable else _token_label(listed)
                text = f"{base} after {_or(notes['context'])}"
            else:
                text = f"the token '{_clean(listed[0])}'"
            if confirmed and out_hyp is not None:  # the output side, checked by intervention, is part of the label
                drafts.append(Draft(text=text + suffix, evidence=[*h.evidence, *out_hyp.evidence],
                                    hypothesis_id=h.hypothesis_id, causal_level=CausalLevel.INTERVENTION))
            else:
                drafts.append(Draft(text=text, evidence=h.evidence, hypothesis_id=h.hypothesis_id,
                                    causal_level=CausalLevel.ASSOCIATION))
        return PolicyStep(drafts=drafts)

    # ------------------------------------------------------------------------------------------------ circuits
    def _circuit_plan(self, state: ItemState, item: WorkItem) -> PolicyStep:
        if item.kind is ItemKind.FEATURE_CIRCUIT:  # a sparse feature circuit, explained through its labels
            return offline_feature_circuits.plan(state, item)
        return offline_circuits.plan(state, item)

    def _circuit_observe(self, state: ItemState, item: WorkItem, results: list[ToolResult]) -> PolicyStep:
        if item.kind is ItemKind.FEATURE_CIRCUIT:
            return offline_feature_circuits.observe(state, item, results)
        return offline_circuits.observe(state, item, results)

    def _circuit_propose(self, state: ItemState, item: WorkItem) -> PolicyStep:
        if item.kind is ItemKind.FEATURE_CIRCUIT:  # a sparse feature circuit, explained through its labels
            return offline_feature_circuits.propose(state, item)
        return offline_circuits.propose(state, item)
