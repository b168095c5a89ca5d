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

from typing import Any

from autoexplain.agent.state import WorkItem
from autoexplain.agent.store import queries


class FeatureScorer:
    """Scores feature labels with ``judge`` (lexical, embedding or LLM) and optionally an embedding judge."""

    def __init__(self, store: Any, out: Any, judge: Any, *, embedder: Any = None, n_activating: int = 50,
                 n_nonactivating: int = 50) -> None:
        self.store, self.out, self.judge, self.embedder = store, out, judge, embedder
        self.n_activating, self.n_nonactivating = n_activating, n_nonactivating

    def score(self, item: WorkItem, drafts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from autoexplain.agent.store.rows import feature_score_rows, judgement_set_rows
        from autoexplain.evals.features import score_explanation

        sae_id, f = item.feature.sae_id, item.feature.index
        examples = queries.feature_examples(self.store, sae_id, f)
        out = []
        for d in drafts:
            res = score_explanation(d["text"], examples, self.judge, sae_id=sae_id, feature_index=f,
                                    explanation_id=d["explanation_id"], embedder=self.embedder,
                                    n_activating=self.n_activating, n_nonactivating=self.n_nonactivating)
            self.out.upsert_many({"scores": feature_score_rows(res), "judgement_sets": judgement_set_rows(res),
                                  "explanations": [{"explanation_id": d["explanation_id"], "judge": res.judge}]})
            verdict = label_verdict(res)
            out.append({"correctness": res.correctness, "completeness": res.completeness,
                        "succinctness": res.succinctness, **({"verdict": verdict} if verdict else {})})
        return out


def label_verdict(res: Any) -> dict[str, str] | None:
    """``{"status": "weak", "why": ...}`` when a label's correctness does not show it beats chance: its confidence
    interval (:attr:`~autoexplain.evals.features.FeatureScores.correctness_interval`) reaches down to 0.5, or it
    could not be computed at all (the reason the scorer gave is kept). None for a label the data supports."""
    if res.correctness is None:
        why = res.reasons.get("correctness") or "no held-out judgement of both classes"
        return {"status": "weak", "why": f"weak: correctness could not be computed ({why})"}
    iv = res.correctness_interval
    if iv is None:  # correctness needs both classes, and so does its interval: never reached, but not "done"
        return {"status": "weak", "why": f"weak: correctness {res.correctness:.2f} has no confidence interval"}
    if iv[0] > 0.5:
        return None
    return {"status": "weak", "why": f"weak: correctness {res.correctness:.2f} is not distinguishable from chance "
                                     f"(its 95 % interval [{iv[0]:.2f}, {iv[1]:.2f}] includes 0.5; "
                                     f"{res.n_positive} activating and {res.n_negative} non-activating held-out "
                                     "contexts judged)"}


class CircuitScorer:
    """Scores circuit explanations by the circuit they rest on (faithfulness, completeness, minimality)."""

    def __init__(self, store: Any, out: Any, lm: Any, run_id: str, *,
                 true_edges: dict[str, set[str]] | None = None) -> None:
        self.store, self.out, self.lm, self.run_id = store, out, lm, run_id
        self.true_edges = true_edges or {}

    def _search_output(self, call_id: str) -> Any:
        from autoexplain.agent.store.caches import cached_output
        from autoexplain.tools.circuits import CircuitSearchOut

        call = self.out.get("tool_calls", (call_id,))
        if call is not None:
            key = call["cache_key"]
        else:
            key = queries.tool_call_cache_key(self.store, call_id)
        output = cached_output(self.store, self.out, key) if key else None
        if output is None:
            raise RuntimeError(f"circuit scoring: no cached circuit_search output for call {call_id}")
        return CircuitSearchOut.model_validate_json(output)

    def score(self, item: WorkItem, drafts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from autoexplain.agent.store.rows import circuit_id as make_circuit_id
        from autoexplain.agent.store.rows import circuit_rows, circuit_score_rows
        from autoexplain.evals.circuits import score_circuit
        from autoexplain.tools.data import load_task_file, tokenize_task
        from autoexplain.tools.patching import PatchSetup

        out: list[dict[str, Any]] = []
        for d in drafts:
            search = self._search_output(d["evidence"][0])
            circ = search.circuit()
            path = item.params["task_file"]
            task = tokenize_task(load_task_file(path), self.lm.tokenizer, n_ctx=self.lm.n_ctx)
            setup = PatchSetup(self.lm, task, ablation=search.ablation, metric=search.metric)
            circuit_id = make_circuit_id(self.lm.model_id, setup.fingerprint(), search.method.value,
                                         search.top_k, search.threshold)
            res = score_circuit(setup, circ, true_edges=self.true_edges.get(item.target))
            if not circ.curve and res.curve is not None:  # the search skipped its curve: scoring measured it
                circ = circ.model_copy(update={"curve": res.curve.points})
            self.out.upsert_many(circuit_rows(circuit_id, self.run_id, self.lm.model_id, item.target, str(path),
                                              circ, item_id=item.item_id))
            self.out.upsert("scores", circuit_score_rows(res, d["explanation_id"], circuit_id))
            if res.no_behaviour:  # nothing to explain: the scores measured noise and are stored as unscored
                why = next(s.details["unscored"] for s in res.scores() if "unscored" in s.details)
                out.append({"correctness": None, "completeness": None, "succinctness": None,
                            "verdict": {"status": "no_behaviour", "why": why}})
                continue
            out.append({"correctness": res.correctness, "completeness": res.completeness,
                        "succinctness": res.succinctness})
        return out
