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

from autoexplain.agent.policies import offline_circuits
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


def _context_rule(examples: list[Any], members: set[str]) -> list[str] | None:
    """Preceding tokens that decide whether ``members`` fire, when the explain-split examples show one.

    Over every occurrence of a member token: the fewest preceding tokens (at most 3) covering ≥ 85 % of the
    firing occurrences; kept only if ≥ 80 % of the occurrences they precede fire and at least 3 non-firing
    occurrences follow other tokens (otherwise the condition explains nothing)."""
    fired: Counter[str] = Counter()
    occ: list[tuple[str, bool]] = []
    for e in examples:
        for i in range(1, len(e.tokens)):
            if _clean(e.tokens[i]).lower() in members:
                prev = _clean(e.tokens[i - 1])
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
        if notes.get("dead") or notes.get("unreadable") or notes.get("probed") or notes.get("refined"):
            return PolicyStep()  # ready to propose
        probes = notes.get("probe_texts") or []
        if not probes:
            return PolicyStep(notes={"probed": True})
        return PolicyStep(requests=[ToolRequest(tool="feature_activations",
                                                args={"sae_id": sae_id, "features": [f],
                                                      "texts": [p["text"] for p in probes]})],
                          notes={"probed": True})

    def _feature_observe(self, state: ItemState, item: WorkItem, results: list[ToolResult]) -> PolicyStep:
        res = results[0]
        if res.error:
            raise RuntimeError(f"offline policy: {res.request.tool} failed: {res.error}")
        if res.request.tool == "feature_examples":
            return self._read_examples(item, res)
        return self._read_probes(state, item, res)

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
        if context:
            base = f"{category} words" if category else _token_label(listed)
            hyps.append(Hypothesis(hypothesis_id=stable_id("hyp", item.item_id, "context"),
                                   text=f"fires on {base} only after {_or(context)}", evidence=[res.call_id]))
        return PolicyStep(hypotheses=hyps, notes={
            "ranked": ranked[:40], "listed": listed, "category": category, "context": context,
            "probe_texts": self._probe_texts(out, listed, category, seen.get(category or "", []), ranked)})

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
        for h in hyps.values():
            if h.status is HypothesisStatus.REFUTED:
                continue
            if h.hypothesis_id == stable_id("hyp", item.item_id, "tokens"):
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
            drafts.append(Draft(text=text, evidence=h.evidence, hypothesis_id=h.hypothesis_id,
                                causal_level=CausalLevel.ASSOCIATION))
        return PolicyStep(drafts=drafts)

    # ------------------------------------------------------------------------------------------------ circuits
    def _circuit_plan(self, state: ItemState, item: WorkItem) -> PolicyStep:
        return offline_circuits.plan(state, item)

    def _circuit_observe(self, state: ItemState, item: WorkItem, results: list[ToolResult]) -> PolicyStep:
        return offline_circuits.observe(state, item, results)

    def _circuit_propose(self, state: ItemState, item: WorkItem) -> PolicyStep:
        return offline_circuits.propose(state, item)
