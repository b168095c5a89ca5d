"""Scoring drafts inside the agent loop, on held-out data, with every number stored.

* Features: :func:`autoexplain.evals.features.score_explanation` on the feature's **score-split** examples (the
  explain split is what ``feature_examples`` showed the policy). Stored: the ``scores`` rows (the three scores
  and the raw metrics) and every per-example judge decision (``judgement_sets``, read through the view
  ``judgements``).
* Circuits: :func:`autoexplain.evals.circuits.score_circuit` on the circuit the draft's ``circuit_search`` call
  found (read back from the tool cache, so nothing is searched twice). Stored: the circuit (``circuits``,
  ``circuit_edges``, tagged with the work item) and its ``scores`` rows, each recording ablation, patch type and
  metric.

Rows go to the run's :class:`~autoexplain.agent.store.outbox.Outbox` (group commit); reads see its waiting rows.

A scorer returns, per draft, ``{"correctness", "completeness", "succinctness"}`` for the policy to compare.
"""

from __future__ import annotations

import json
from typing import Any

from autoexplain.agent.state import WorkItem
from autoexplain.agent.store import queries


class FeatureScorer:
    """Scores feature labels with ``judge`` (lexical, embedding or LLM) and optionally an embedding judge.

    ``background(sae_id, feature_index, examples)``, when given, returns non-activating windows of the feature
    from elsewhere in the dataset (:class:`~autoexplain.evals.features.Example`, activations computed, all <= 0);
    it is called once per item, only when the feature's stored examples hold no score-side non-activating one (a
    dense feature), and its windows become detection's negatives. :class:`ModelBackground` is one (it runs the
    model on windows stored for the SAE's other features). Without it, such a feature's correctness is token-level
    detection (see :mod:`autoexplain.evals.features`).

    ``output(sae_id, feature_index, text, examples) -> Score`` (:class:`OutputScorer`) scores a label's output
    side by intervention; its ``output`` row is stored for every draft (NULL with the reason when the label names
    no output tokens). Default: an :class:`OutputScorer` on the model of a :class:`ModelBackground` given as
    ``background`` (the run's model and SAEs), none otherwise."""

    def __init__(self, store: Any, out: Any, judge: Any, *, embedder: Any = None, n_activating: int = 50,
                 n_nonactivating: int = 50, background: Any = None, output: Any = None) -> None:
        self.store, self.out, self.judge, self.embedder = store, out, judge, embedder
        self.n_activating, self.n_nonactivating = n_activating, n_nonactivating
        self.background = background
        if output is None and isinstance(background, ModelBackground):
            output = OutputScorer(background.ctx)
        self.output = output

    def score(self, item: WorkItem, drafts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from autoexplain.agent.store.rows import feature_score_rows, judgement_set_rows, score_rows
        from autoexplain.evals.features import score_explanation, split_examples

        sae_id, f = item.feature.sae_id, item.feature.index
        examples = queries.feature_examples(self.store, sae_id, f)
        background = None
        if self.background is not None and drafts:
            sided = examples if all(e.split for e in examples) else split_examples(examples, sae_id, f)
            if not any(e.split == "score" and e.kind == "random" and e.max_act <= 0 for e in sided):
                background = self.background(sae_id, f, examples)
        out = []
        for d in drafts:
            res = score_explanation(d["text"], examples, self.judge, sae_id=sae_id, feature_index=f,
                                    explanation_id=d["explanation_id"], embedder=self.embedder,
                                    n_activating=self.n_activating, n_nonactivating=self.n_nonactivating,
                                    background=background)
            rows = feature_score_rows(res)
            output = self.output(sae_id, f, d["text"], examples) if self.output is not None else None
            if output is not None:
                rows += score_rows(d["explanation_id"], [output])
            self.out.upsert_many({"scores": rows, "judgement_sets": judgement_set_rows(res),
                                  "explanations": [{"explanation_id": d["explanation_id"], "judge": res.judge}]})
            verdict = label_verdict(res)
            extra = {"output": output.value} if output is not None and output.value is not None else {}
            out.append({"correctness": res.correctness, "completeness": res.completeness,
                        "succinctness": res.succinctness, **extra, **({"verdict": verdict} if verdict else {})})
        return out


def label_verdict(res: Any) -> dict[str, str] | None:
    """``{"status": "weak", "why": ...}`` when a label's correctness does not show it beats chance: its confidence
    interval (:attr:`~autoexplain.evals.features.FeatureScores.correctness_interval`) reaches down to 0.5, or it
    could not be computed at all — the draft is *unscored* (the reason the scorer gave is kept; the graph ranks
    it below every scored draft). A token-level correctness (dense feature) says so. None for a label the data
    supports."""
    if res.correctness is None:
        why = res.reasons.get("correctness") or "no held-out judgement of both classes"
        return {"status": "weak", "why": f"weak: unscored, correctness could not be computed ({why})"}
    unit = ("firing and non-firing tokens" if getattr(res, "correctness_from", None) == "token_detection"
            else "activating and non-activating held-out contexts")
    iv = res.correctness_interval
    if iv is None:  # correctness needs both classes, and so does its interval: never reached, but not "done"
        return {"status": "weak", "why": f"weak: correctness {res.correctness:.2f} has no confidence interval"}
    if iv[0] > 0.5:
        return None
    return {"status": "weak", "why": f"weak: correctness {res.correctness:.2f} is not distinguishable from chance "
                                     f"(its 95 % interval [{iv[0]:.2f}, {iv[1]:.2f}] includes 0.5; "
                                     f"{res.n_positive} + {res.n_negative} {unit} judged)"}


class ModelBackground:
    """Non-activating windows of a feature from the rest of the dataset, for :class:`FeatureScorer`'s
    ``background``: windows stored for the SAE's other features (:func:`queries.background_windows`, random-pool
    windows first) are run through the model and SAE (``feature_activations``, ``ctx`` a
    :class:`~autoexplain.tools.registry.ToolContext`), and those where the feature fires on no token (BOS
    excluded) are kept, up to ``n``. The activations are computed on exactly the text the judge will see (the
    window's text re-tokenized after BOS), so the label "does not fire" is exact, not assumed. Caveat: the
    candidates are what the harvest stored, a sample of the dataset, not all of it; a feature that fires in
    every one gets none (its correctness is then token-level)."""

    def __init__(self, store: Any, ctx: Any, *, n: int = 50, candidates: int = 128) -> None:
        self.store, self.ctx, self.n, self.candidates = store, ctx, n, candidates

    def __call__(self, sae_id: str, feature_index: int, examples: Any = ()) -> list[Any]:
        from autoexplain.evals.features import Example
        from autoexplain.evals.judges import context_text
        from autoexplain.tools.probe import FeatureActivationsIn, feature_activations

        texts = [t for t in (context_text(w).strip() for w in
                             queries.background_windows(self.store, sae_id, feature_index, self.candidates)) if t]
        # a window's text can re-tokenize longer than the window was (merges differ at its cut edges): keep those
        # that fit the context with BOS, as the probe requires
        lm = self.ctx.model
        lengths = lm.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        texts = [t for t, ids in zip(texts, lengths, strict=True) if len(ids) + 1 <= lm.n_ctx]
        out: list[Example] = []
        for i in range(0, len(texts), 64):
            res = feature_activations(self.ctx, FeatureActivationsIn(sae_id=sae_id, features=[feature_index],
                                                                     texts=texts[i:i + 64]))
            for item in res.items:
                acts = item.features[0].activations[1:]  # position 0 is BOS (excluded everywhere, as in harvest)
                if acts and max(acts) <= 0 and len(out) < self.n:
                    out.append(Example(kind="background", example_id=len(out), split="score",
                                       tokens=item.tokens[1:], acts=acts, max_act=0.0))
        return out


class OutputScorer:
    """The ``output`` score of a feature label: does the feature push the model toward the tokens the label says
    it promotes (and away from those it says it suppresses)?

    Output-centric evaluation in the spirit of Gur-Arieh et al. (2025): the label's output clause ("…; promotes
    'a', 'b'", read by :func:`autoexplain.evals.judges.output_tokens`) names tokens; the feature is steered up by
    its natural maximum activation (the largest in its harvested examples) at every position of the feature's
    **held-out** (score-split) contexts, and each named token's change in next-token log-probability is compared
    with ``n_random`` random vocabulary tokens (:func:`autoexplain.tools.probe.output_effect`). The value is the
    AUC that a promoted token rises more than a random one (for suppressed tokens, that it falls more), averaged
    over the two lists; 0.5 is chance. The zero-ablation AUC at the positions where the feature fires is kept in
    the details (None where it fires in none of the contexts). NULL, with the reason, when the label names no
    output tokens, none of them is one token of the vocabulary, or there is no held-out context.
    Intervention-level: the only difference between the compared runs is the feature's value."""

    def __init__(self, ctx: Any, *, n_texts: int = 16, n_random: int = 64) -> None:
        self.ctx, self.n_texts, self.n_random = ctx, n_texts, n_random

    def __call__(self, sae_id: str, feature_index: int, text: str, examples: Any) -> Any:
        from autoexplain.evals.judges import _SPECIAL_TOKEN, output_tokens
        from autoexplain.evals.scores import Score
        from autoexplain.tools.errors import InputError
        from autoexplain.tools.probe import OutputEffectIn, output_effect

        promoted, suppressed = output_tokens(text)
        if not promoted and not suppressed:
            return Score(metric="output", value=None, n=0,
                         details={"unscored": "the label names no output tokens (no 'promotes …' clause)"})
        held = sorted((e for e in examples if e.split == "score" and e.kind != "background"),
                      key=lambda e: -e.max_act)
        texts = []
        for e in held:
            real = [t for t in e.tokens if not _SPECIAL_TOKEN.match(t.strip())]
            cut = "".join(real[: max(1, 3 * len(real) // 4)])  # re-tokenized windows can outgrow the context
            if cut.strip():
                texts.append(cut)
        texts = texts[: self.n_texts]
        if not texts:
            return Score(metric="output", value=None, n=0, details={"unscored": "no held-out context to steer on"})
        scale = max((e.max_act for e in examples), default=0.0) or 1.0
        parts: dict[str, Any] = {}
        aucs: list[float] = []
        for sign, tokens in (("promotes", promoted), ("suppresses", suppressed)):
            if not tokens:
                continue
            try:
                res = output_effect(self.ctx, OutputEffectIn(sae_id=sae_id, feature=feature_index,
                                                             tokens=list(tokens)[:20], texts=texts, scale=scale,
                                                             n_random=self.n_random))
            except InputError as exc:
                parts[sign] = {"unscored": exc.message}
                continue
            steer = res.steer_auc if sign == "promotes" else 1.0 - res.steer_auc
            abl = res.ablate_auc if sign == "promotes" or res.ablate_auc is None else 1.0 - res.ablate_auc
            aucs.append(steer)
            parts[sign] = {"tokens": res.tokens, "unresolved": res.unresolved, "steer_auc": round(steer, 4),
                           "ablate_auc": None if abl is None else round(abl, 4), "steer_delta": res.steer_delta,
                           "random_steer_mean": res.random_steer_mean,
                           "n_firing_positions": res.n_firing_positions}
        details: dict[str, Any] = {"from": "steering AUC of the named tokens vs random tokens on held-out contexts",
                                   "scale": scale, "n_texts": len(texts), "n_random": self.n_random, **parts}
        if not aucs:
            details["unscored"] = "none of the named output tokens is one token of the vocabulary"
            return Score(metric="output", value=None, n=0, details=details)
        return Score(metric="output", value=round(sum(aucs) / len(aucs), 4), n=len(texts), details=details)


class CircuitScorer:
    """Scores circuit explanations by the circuit they rest on and the mechanism they claim.

    * **Out of sample.** When the search ran on the *fit* part of a seeded prompt split (the offline policy's
      default), every score is computed on the *held-out* part; the in-sample faithfulness the search reported is
      kept as ``insample_faithfulness``. A search on all prompts is scored on all of them, and a held-out
      faithfulness is measured by searching again on one half and scoring the other
      (:func:`autoexplain.evals.mechanism.held_out`).
    * **Sufficiency and necessity** (:func:`autoexplain.evals.circuits.score_circuit`): faithfulness, necessity,
      completeness that fails when a component outside the circuit is necessary, minimality.
    * **Claims.** Every role and composition claim in the text is read back and checked by its intervention
      (:mod:`autoexplain.evals.claims`); correctness = faithfulness (clipped to [0, 1]) x the share of claims
      verified, and the checks are stored with the ``claims_verified`` score.
    * **Mechanism rows**: mediation per circuit node (``circuit_nodes``), the model's head roles (``head_roles``,
      once per model), robustness over ``robustness`` resampled prompt sets (edge Jaccard, Spearman).
    """

    def __init__(self, store: Any, out: Any, lm: Any, run_id: str, *,
                 true_edges: dict[str, set[str]] | None = None) -> None:
        self.store, self.out, self.lm, self.run_id = store, out, lm, run_id
        self.true_edges = true_edges or {}
        self._roles: Any = None  # the model's role table, computed once per scorer

    def _call(self, call_id: str) -> tuple[str | None, dict[str, Any]]:
        """(cache key, arguments) of a tool call, from the outbox or the store."""
        call = self.out.get("tool_calls", (call_id,))
        if call is not None:
            args = call.get("args") or {}
            return call["cache_key"], (json.loads(args) if isinstance(args, str) else dict(args))
        return queries.tool_call_key_and_args(self.store, call_id)

    def _search_output(self, call_id: str) -> tuple[Any, dict[str, Any]]:
        from autoexplain.agent.store.caches import cached_output
        from autoexplain.tools.circuits import CircuitSearchOut

        key, args = self._call(call_id)
        output = cached_output(self.store, self.out, key) if key else None
        if output is None:
            raise RuntimeError(f"circuit scoring: no cached circuit_search output for call {call_id}")
        return CircuitSearchOut.model_validate_json(output), args

    def role_table(self) -> Any:
        """The model's head-role table (computed once; stored in ``head_roles``)."""
        from autoexplain.agent.store.rows import head_role_rows
        from autoexplain.tools.heads import role_table

        if self._roles is None:
            self._roles = role_table(self.lm)
            self.out.upsert("head_roles", head_role_rows(self.lm.model_id, self._roles, self.run_id))
        return self._roles

    def score(self, item: WorkItem, drafts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from autoexplain.agent.store.rows import circuit_id as make_circuit_id
        from autoexplain.agent.store.rows import circuit_node_rows, circuit_rows, circuit_score_rows, score_rows
        from autoexplain.evals.circuits import score_circuit
        from autoexplain.evals.claims import check_claims, parse_claims, verified_share
        from autoexplain.evals.mechanism import circuit_per_prompt, held_out, mediation, node_claims, robustness
        from autoexplain.tools.data import load_task_file, tokenize_task
        from autoexplain.tools.errors import InputError
        from autoexplain.tools.patching import PatchSetup, check_effect

        out: list[dict[str, Any]] = []
        for d in drafts:
            search, args = self._search_output(d["evidence"][0])
            circ = search.circuit()
            path = item.params["task_file"]
            task = tokenize_task(load_task_file(path), self.lm.tokenizer, n_ctx=self.lm.n_ctx)
            part = args.get("part")
            fraction, seed = float(args.get("split_fraction", 0.5)), int(args.get("split_seed", 0))
            # the search ran on one part of the split: score on the other (either way round)
            found_rows, other_rows = (None, None)
            if part:
                fit_rows, held_rows = task.split(fraction, seed)
                found_rows, other_rows = (fit_rows, held_rows) if part == "fit" else (held_rows, fit_rows)
            score_task = task.subset(other_rows) if other_rows is not None else task
            fit_task = task.subset(found_rows) if found_rows is not None else task
            setup = PatchSetup(self.lm, score_task, ablation=search.ablation, metric=search.metric)
            circuit_id = make_circuit_id(self.lm.model_id, setup.fingerprint(), search.method.value,
                                         search.top_k, search.threshold)
            res = score_circuit(setup, circ, true_edges=self.true_edges.get(item.target))
            sample = {"scored_on": "held-out prompts" if part else "the prompts the circuit was found on",
                      "scored_rows": other_rows, "split_seed": seed if part else None,
                      # the effect every scored share (and circuit_nodes' mediation) is relative to
                      "scored_m_clean": setup.m_clean, "scored_m_ablated": setup.m_ablated}
            extra: list[Any] = []
            held = None
            if part:
                held = res.faithfulness if not res.no_behaviour else None
            elif item.params.get("held_out", True) and task.n_prompts >= 4:
                try:
                    ho = held_out(self.lm, task, search.method, ablation=search.ablation, metric=search.metric,
                                  top_k=search.top_k, threshold=search.threshold)
                    held = ho.held_out.faithfulness
                    extra += ho.scores()
                except InputError as exc:  # e.g. the fit half does not move the metric: say so, store nothing
                    sample["held_out_unscored"] = exc.message
            robust = None
            n_res = int(item.params.get("robustness", 0) or 0)
            if n_res and fit_task.n_prompts >= 4 and not res.no_behaviour:
                try:
                    robust = robustness(self.lm, fit_task, search.method, n_resamples=n_res,
                                        ablation=search.ablation, metric=search.metric, top_k=search.top_k,
                                        threshold=search.threshold)
                    extra += robust.scores()
                except InputError as exc:
                    sample["robustness_unscored"] = exc.message
            # the mechanism: claims read from the text and checked; mediation of the circuit's nodes
            kept = {n for e in circ.edges for n in _nodes_of_edge(str(e))}
            checks = []
            med = prompt_claims = per_prompt = None
            if not res.no_behaviour:
                checks = check_claims(self.lm, setup, parse_claims(d["text"]))
                try:
                    check_effect(setup)
                    nodes = sorted(kept)
                    per_prompt = circuit_per_prompt(setup, [i for i, k in enumerate(circ.in_circuit) if k])
                    if nodes:
                        med = mediation(setup, nodes)
                        prompt_claims = node_claims(setup, nodes)
                except InputError as exc:  # the scored prompts' ablation moves nothing: say why, in the data
                    med = prompt_claims = None
                    sample["mechanism_unscored"] = exc.message
            share = verified_share(checks)
            correctness = res.correctness
            if correctness is not None and share is not None:
                correctness = min(1.0, max(0.0, correctness)) * share
            roles = self.role_table() if any(c.claim.kind == "role" for c in checks) else None
            if not circ.curve and res.curve is not None:  # the search skipped its curve: scoring measured it
                circ = circ.model_copy(update={"curve": res.curve.points})
            rows = circuit_rows(circuit_id, self.run_id, self.lm.model_id, item.target, str(path), circ,
                                item_id=item.item_id)
            crow = rows["circuits"][0]
            crow.update({"held_out_faithfulness": held,  # type: ignore[typeddict-item]
                         "robustness_jaccard": robust.jaccard_mean if robust else None,
                         "robustness_spearman": robust.spearman_mean if robust else None})
            crow["details"] = {**crow["details"], **sample, "insample_faithfulness": search.faithfulness}
            self.out.upsert_many(rows)
            nodes_all = sorted(kept | {c.claim.node for c in checks})
            self.out.upsert("circuit_nodes", circuit_node_rows(circuit_id, nodes_all, kept, mediation=med,
                                                               claims=prompt_claims or (), checks=checks,
                                                               roles=roles))
            score_list = circuit_score_rows(res, d["explanation_id"], circuit_id)
            for row in score_list:
                row["details"] = {**(row.get("details") or {}), **sample}
                if row["metric"] == "correctness" and share is not None and not res.no_behaviour:
                    row["value"] = correctness
                    row["details"]["from"] = ("faithfulness (clipped to [0, 1]) x share of the explanation's "
                                              "mechanistic claims verified by intervention")
                    row["details"]["faithfulness"] = res.correctness
                    row["details"]["claims_verified"] = share
            self.out.upsert("scores", score_list)
            mech = [*extra, *_claim_scores(checks, share), *_prompt_scores(per_prompt)]
            if part:
                from autoexplain.evals.scores import Score

                common = {"ablation": search.ablation.value, "patch_type": "edge", "metric": search.metric.value,
                          "method": search.method.value, "seed": seed, "fraction": fraction}
                mech += [Score(metric="insample_faithfulness", value=search.faithfulness, n=fit_task.n_prompts,
                               details={**common, "from": "the search's faithfulness on the prompts it was found on"}),
                         Score(metric="heldout_faithfulness", value=held, n=score_task.n_prompts,
                               details={**common, "from": "the same edges on the held-out prompts"})]
            if mech:
                self.out.upsert("scores", score_rows(d["explanation_id"], mech, details={"circuit_id": circuit_id}))
            if res.no_behaviour:  # nothing to explain: the scores measured noise and are stored as unscored
                why = next(s.details["unscored"] for s in res.scores() if "unscored" in s.details)
                out.append({"correctness": None, "completeness": None, "succinctness": None,
                            "verdict": {"status": "no_behaviour", "why": why}})
                continue
            out.append({"correctness": correctness, "completeness": res.completeness,
                        "succinctness": res.succinctness})
        return out


def _nodes_of_edge(edge: str) -> list[str]:
    """The head/MLP nodes an edge string joins (``a0.0->a1.1.k`` -> a0.0, a1.1; embed and logits left out)."""
    src, dst = edge.split("->")
    dst = ".".join(dst.split(".")[:2]) if dst.startswith("a") else dst
    return [n for n in (src, dst) if n not in ("embed", "logits")]


def _prompt_scores(shares: Any) -> list[Any]:
    """``prompts_recovered``: the share of (scored) prompts on which the circuit recovers at least half of that
    prompt's own effect, with the per-prompt spread in the details (means hide a behaviour carried by a few
    prompts)."""
    from autoexplain.evals.scores import Score

    if shares is None:
        return []
    details: dict[str, Any] = {"from": "share of prompts whose own (m_i(C) - m_i(∅)) / (m_i(M) - m_i(∅)) >= 0.5",
                               "spread": shares.spread.model_dump() if shares.spread else None,
                               "n_excluded": shares.n_excluded, "min_prompt_effect": shares.min_prompt_effect,
                               "shares": shares.shares}
    if shares.share_at_least_half is None:
        details["unscored"] = shares.note or "no prompt has an effect of its own to recover"
    return [Score(metric="prompts_recovered", value=shares.share_at_least_half, n=shares.n_used, details=details)]


def _claim_scores(checks: list[Any], share: float | None) -> list[Any]:
    """The ``claims_verified`` score: the share of mechanistic claims in the text whose intervention check held
    (None with the reason when the text makes no claim the parser recognises)."""
    from autoexplain.evals.scores import Score

    details: dict[str, Any] = {
        "claims": [{"kind": c.claim.kind, "node": c.claim.node,
                    "role": c.claim.role.value if c.claim.role else None,
                    "edge": str(c.claim.edge) if c.claim.edge else None, "verified": c.verified,
                    "effect": c.effect, "method": c.method, "why": c.why, "sentence": c.claim.text}
                   for c in checks]}
    if share is None:
        details["unscored"] = "the explanation makes no role or composition claim the claims parser recognises"
    return [Score(metric="claims_verified", value=share, n=len(checks), details=details)]


class FeatureCircuitScorer:
    """Scores feature-circuit explanations (:class:`~autoexplain.agent.state.ItemKind.FEATURE_CIRCUIT` items) by
    the sparse feature circuit they rest on, by intervention, on prompts the circuit was not found on.

    The circuit is the draft's first evidence call (``feature_circuit``), read back from the tool cache. It is
    evaluated with :func:`autoexplain.evals.feature_circuits.score_feature_circuit`: every node outside a set at
    its corrupt value (resample ablation; SAE error terms are nodes and are ablated too). When the call ran on the
    *fit* part of the task's seeded split (the offline policy's default), the scores come from the *held-out* part;
    otherwise from the prompts it was found on (said so in each score's details).

    * correctness = held-out sufficiency (faithfulness) ``F(C)``, clipped to [0, 1] (the raw value is kept as
      ``heldout_faithfulness``, with ``insample_faithfulness``);
    * completeness = IOI-style completeness over knock-out sets (an upper bound: sampled sets);
    * succinctness = ``1 - kept nodes / all nodes`` (features, error terms, embeddings; read it with correctness:
      the empty circuit is perfectly succinct);
    * ``necessity`` = ``1 - F(M∖C)``.

    Stored through the outbox: the circuit (``feature_circuits``, ``feature_circuit_nodes``,
    ``feature_circuit_edges``, tagged with the work item; in-sample and held-out scores in its row) and the
    ``scores`` rows, each naming the ``feature_circuit_id``. Causal level: intervention. A task whose held-out
    prompts show no behaviour (m(M) = m(∅)) is a ``no_behaviour`` verdict with its reason, never a score of 0.
    """

    def __init__(self, store: Any, out: Any, lm: Any, saes: Any, run_id: str) -> None:
        self.store, self.out, self.lm, self.run_id = store, out, lm, run_id
        self.saes = {s.sae_id: s for s in saes}  # sae_id -> LoadedSAE

    def _circuit_output(self, call_id: str) -> tuple[Any, dict[str, Any]]:
        from autoexplain.agent.store.caches import cached_output
        from autoexplain.tools.feature_circuits import FeatureCircuitOut

        call = self.out.get("tool_calls", (call_id,))
        if call is not None:
            args = call.get("args") or {}
            key, args = call["cache_key"], (json.loads(args) if isinstance(args, str) else dict(args))
        else:
            key, args = queries.tool_call_key_and_args(self.store, call_id)
        output = cached_output(self.store, self.out, key) if key else None
        if output is None:
            raise RuntimeError(f"feature-circuit scoring: no cached feature_circuit output for call {call_id}")
        return FeatureCircuitOut.model_validate_json(output).circuit, args

    def score(self, item: WorkItem, drafts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        import hashlib

        from autoexplain.agent.store.rows import feature_circuit_id, feature_circuit_rows, score_rows
        from autoexplain.evals.feature_circuits import FeatureCircuitScores, score_feature_circuit
        from autoexplain.evals.scores import Score
        from autoexplain.tools.data import load_task_file, tokenize_task
        from autoexplain.tools.errors import InputError
        from autoexplain.tools.feature_circuits import SplicedModel

        out: list[dict[str, Any]] = []
        for d in drafts:
            circ, args = self._circuit_output(d["evidence"][0])
            saes = [self.saes[s] for s in circ.saes]
            task = tokenize_task(load_task_file(item.params["task_file"]), self.lm.tokenizer, n_ctx=self.lm.n_ctx)
            part = args.get("part")
            fraction, seed = float(args.get("split_fraction", 0.5)), int(args.get("split_seed", 0))
            fit_task = score_task = task
            if part:
                fit_rows, held_rows = task.split(fraction, seed)
                if part != "fit":
                    fit_rows, held_rows = held_rows, fit_rows
                fit_task, score_task = task.subset(fit_rows), task.subset(held_rows)
            fp = hashlib.sha256()
            for t in (fit_task.clean, fit_task.corrupt, fit_task.answers, fit_task.wrong):
                fp.update(t.cpu().numpy().tobytes())
            settings = {"threshold": circ.node_threshold, "edge_threshold": circ.edge_threshold,
                        "per_position": circ.per_position, "steps": circ.steps, "prompts": fit_task.n_prompts}
            fid = feature_circuit_id(self.lm.model_id, fp.hexdigest()[:16], circ.saes, settings)
            sample = {"scored_on": "held-out prompts" if part else "the prompts the circuit was found on",
                      "scored_prompts": score_task.n_prompts, "split_seed": seed if part else None,
                      "feature_circuit_id": fid, "ablation": "resample (every node outside, error terms included)",
                      "metric": circ.metric.value}
            insample = score_feature_circuit(SplicedModel(self.lm, fit_task, saes, metric=circ.metric), circ)
            held: FeatureCircuitScores | None = insample
            why: str | None = None
            if part:
                try:
                    held = score_feature_circuit(SplicedModel(self.lm, score_task, saes, metric=circ.metric), circ)
                except InputError as exc:  # the held-out prompts show no behaviour: nothing to score
                    held, why = None, exc.message
            self.out.upsert_many(feature_circuit_rows(
                fid, self.run_id, item.target, circ, insample, held_out=held if part else None,
                item_id=item.item_id, details={"task_file": item.params["task_file"], "sae_ids": list(circ.saes),
                                               "held_out_prompts": score_task.n_prompts if part else 0,
                                               "held_out_note": why, "explanation_id": d["explanation_id"]}))
            if held is None or held.faithfulness is None:
                why = why or "the circuit keeps no node: there is nothing to score"
                self.out.upsert("scores", score_rows(d["explanation_id"], [
                    Score(metric=m, value=None, n=score_task.n_prompts, details={"unscored": why})
                    for m in ("correctness", "completeness", "succinctness")], details=sample))
                out.append({"correctness": None, "completeness": None, "succinctness": None,
                            "verdict": {"status": "no_behaviour" if held is None else "weak", "why": why}})
                continue
            n_total = len(circ.nodes)
            succinct = 1.0 - held.n_nodes / n_total if n_total else None
            correctness = min(1.0, max(0.0, held.faithfulness))
            scores = [
                Score(metric="correctness", value=correctness, n=score_task.n_prompts,
                      details={"from": "sufficiency (faithfulness) F(C) of the feature circuit, clipped to [0, 1]",
                               "faithfulness": held.faithfulness}),
                Score(metric="completeness", value=held.completeness, n=held.n_knockouts,
                      details={"from": "max(0, 1 - worst |F(C\\K) - F(M\\K)|) over sampled knock-out sets K",
                               "worst_gap": held.worst_gap, "worst_knockout": held.worst_knockout}),
                Score(metric="succinctness", value=succinct, n=n_total,
                      details={"from": "1 - kept nodes / all nodes (features, error terms, embeddings)",
                               "kept": held.n_nodes, "nodes": n_total}),
                Score(metric="necessity", value=held.necessity, n=score_task.n_prompts,
                      details={"from": "1 - F(M\\C): the share of the effect lost when only the circuit is ablated"}),
                Score(metric="heldout_faithfulness" if part else "faithfulness", value=held.faithfulness,
                      n=score_task.n_prompts, details={"from": "F(C), not clipped"}),
                Score(metric="insample_faithfulness", value=insample.faithfulness, n=fit_task.n_prompts,
                      details={"from": "F(C) on the prompts the circuit was found on"}),
            ]
            self.out.upsert("scores", score_rows(d["explanation_id"], scores, details=sample))
            out.append({"correctness": correctness, "completeness": held.completeness, "succinctness": succinct})
        return out
