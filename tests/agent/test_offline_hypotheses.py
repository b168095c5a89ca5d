"""The offline policy writes the right kind of explanation for every kind of planted feature (issue #14, item 2).

The planted harvest (:func:`plant_kinds_harvest`) holds one feature per kind: dense category, category, single
token, rare token, first token, position band, "any word after 'on'", "animals after 'big'", numbers,
capitalised words, the n-gram 'went store', a dense '.', and two dead features — exact activations, no model.
The policy runs its own steps (``feature_examples`` on the explain split, its probes answered by the planted
rules), its drafts are scored on the held-out split with the lexical judge, and the best by the graph's ranking
must be of the planted kind, scored (correctness not NULL), and beat a wrong label of the same kind.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from autoexplain.agent.agent_tools import FeatureExamplesOut, ShownExample
from autoexplain.agent.graph import rank
from autoexplain.agent.policies.base import overall
from autoexplain.agent.policies.offline import OfflinePolicy
from autoexplain.agent.state import ItemKind, ToolRequest, ToolResult, WorkItem
from autoexplain.evals.features import Example, score_explanation, split_examples
from autoexplain.evals.judges import LexicalJudge
from autoexplain.evals.truth.planted_features import (
    KIND_DEAD,
    KIND_EXPECTED,
    KIND_RULES,
    KIND_TRUE,
    KIND_WRONG,
    label_kind,
    plant_kinds_harvest,
)
from autoexplain.tools.probe import FeatureActivationsOut, FeatureTrace, TextActivations

SAE = "kinds"
BOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def kinds():
    return plant_kinds_harvest()


def _tokens(text: str) -> list[str]:
    """The planted world's word-level tokenizer: BOS, then one token per word (leading space kept)."""
    return [BOS, *re.findall(r" ?[^ ]+", text)]


def _examples_out(h: Any, f: int) -> tuple[FeatureExamplesOut, list[Example]]:
    exs = split_examples([Example.from_row(r) for r in h.examples[f]], SAE, f)
    shown = sorted((e for e in exs if e.split == "explain"), key=lambda e: -e.max_act)
    act = [e for e in shown if e.max_act > 0][:40]
    quiet = [e for e in shown if e.max_act <= 0][:8]
    density = h.density(f)
    out = FeatureExamplesOut(
        sae_id=SAE, feature_index=f, density=density, max_act=max((e.max_act for e in exs), default=0.0),
        n_tokens=sum(len(w) - 1 for w in h.windows), is_dead=density == 0,
        examples=[ShownExample(kind=e.kind, quantile=e.quantile, max_act=e.max_act, tokens=e.tokens, acts=e.acts)
                  for e in act + quiet], n_hidden=sum(e.split == "score" for e in exs))
    return out, exs


def _execute(h: Any, f: int, req: ToolRequest, call_id: str, examples_out: FeatureExamplesOut) -> ToolResult:
    if req.tool == "feature_examples":
        out: Any = examples_out
    elif req.tool == "feature_activations":
        items = []
        for text in req.args["texts"]:
            toks = _tokens(text)
            acts = h.acts_on(f, toks)
            top = max(acts)
            items.append(TextActivations(text=text, tokens=toks, features=[FeatureTrace(
                feature=f, activations=acts, max=top, argmax_position=acts.index(top) if top > 0 else None,
                argmax_token=toks[acts.index(top)] if top > 0 else None)]))
        out = FeatureActivationsOut(sae_id=SAE, items=items)
    else:  # pragma: no cover - the planted harvest has no logit effects, so no output test is asked for
        raise AssertionError(f"unexpected tool {req.tool}")
    return ToolResult(call_id=call_id, request=req, summary=out.summary(), output=out)


def run_policy(h: Any, f: int) -> tuple[list[dict[str, Any]], list[Example], dict[str, Any]]:
    """The policy's plan/observe loop on feature ``f``, then its drafts scored on the held-out split."""
    policy = OfflinePolicy()
    item = WorkItem(item_id=f"item-{f}", run_id="run", kind=ItemKind.FEATURE, target=f"{SAE}#{f}",
                    params={"sae_id": SAE, "feature_index": f})
    examples_out, exs = _examples_out(h, f)
    state: dict[str, Any] = {"notes": {}, "hypotheses": {}, "calls": []}
    for step in range(6):
        plan = policy.plan(state, item)
        state["notes"] = {**state["notes"], **plan.notes}
        if not plan.requests:
            break
        results = [_execute(h, f, r, f"call-{f}-{step}-{i}", examples_out) for i, r in enumerate(plan.requests)]
        state["calls"] += [r.call_id for r in results]
        obs = policy.observe(state, item, results)
        state["notes"] = {**state["notes"], **obs.notes}
        state["hypotheses"] = {**state["hypotheses"],
                               **{x.hypothesis_id: x.model_dump(mode="json") for x in obs.hypotheses}}
    drafts = policy.propose(state, item).drafts
    scored = []
    for d in drafts:
        if d.dead:
            scored.append({"text": d.text, "dead": True})
            continue
        res = score_explanation(d.text, exs, LexicalJudge(), sae_id=SAE, feature_index=f)
        sc = {"correctness": res.correctness, "completeness": res.completeness, "succinctness": res.succinctness}
        scored.append({"text": d.text, "scores": sc, "overall": overall(sc), "causal_level": d.causal_level})
    return scored, exs, state["notes"]


def test_the_planted_set_has_every_kind(kinds) -> None:
    assert set(KIND_EXPECTED.values()) == {"category", "tokens", "position", "context", "class", "ngram"}
    for f in KIND_RULES:
        assert kinds.density(f) > 0, f
    for f in KIND_DEAD:
        assert kinds.density(f) == 0


@pytest.mark.parametrize("f", sorted(KIND_RULES))
def test_each_live_feature_gets_its_kind_of_label(kinds, f: int) -> None:
    scored, exs, notes = run_policy(kinds, f)
    assert scored and not any(s.get("dead") for s in scored)
    for s in scored:  # every draft of a live feature is scored
        assert s["scores"]["correctness"] is not None, (f, s["text"])
    best = max(scored, key=rank)
    assert label_kind(best["text"]) == KIND_EXPECTED[f], (f, best["text"], [(s["text"], s["overall"])
                                                                             for s in scored])
    assert best["scores"]["correctness"] >= 0.85, (f, best)
    # the true label of the kind beats a wrong label of the same kind on held-out correctness
    true, wrong = (score_explanation(t, exs, LexicalJudge(), sae_id=SAE, feature_index=f).correctness
                   for t in (KIND_TRUE[f], KIND_WRONG[f]))
    assert true is not None and wrong is not None and true > wrong, (f, true, wrong)


@pytest.mark.parametrize("f", KIND_DEAD)
def test_dead_features_stay_dead(kinds, f: int) -> None:
    scored, _, notes = run_policy(kinds, f)
    assert notes.get("dead") and [s.get("dead") for s in scored] == [True]


def test_a_token_list_is_kept_when_no_other_kind_fits(kinds) -> None:
    """Competing hypotheses are kept only when they fit the explain side at least as well as the token list:
    the single-token feature gets no position, class or context label."""
    _, _, notes = run_policy(kinds, 2)
    assert not set(notes.get("labels") or {}) & {"position", "class", "any_after", "any_before"}


# ============================================================================= output side, through the runner
OUT_FEATURES = {0: (" cat", " dog", " fox", " owl"), 1: (" Mary",)}
OUT_PROMOTES = {1: (" sat", " park")}
OUT_DEAD = (2, 3)


@pytest.fixture(scope="module")
def output_run(tiny_gpt2_dir, tmp_path_factory, one_thread) -> dict[str, Any]:
    """The real path (prepare → harvest → split → offline policy with its tools → scoring into DuckDB) on a
    planted model whose feature 1 fires on ' Mary' and promotes ' sat' and ' park'."""
    from autoexplain.agent.runner import Plan, prepare, run_plan
    from autoexplain.agent.store import Store
    from autoexplain.evals.truth.planted_features import default_texts, plant_features, vocab_for, write_corpus

    root = tmp_path_factory.mktemp("output-run")
    planted = plant_features(tiny_gpt2_dir, root / "planted", OUT_FEATURES, OUT_DEAD, outputs=OUT_PROMOTES)
    corpus = write_corpus(root / "corpus.txt", default_texts(0, 600, vocab_for(OUT_FEATURES)))
    prep = prepare(Plan.model_validate({
        "name": "outputs", "model": str(planted.model_dir),
        "items": [{"label": {"sae": str(planted.sae_dir), "dataset": str(corpus), "features": "0-3",
                             "tokens": 6_000}}]}))
    store = Store(root / "outputs.duckdb")
    res = run_plan(store, prep)
    return {"store": store, "res": res, "sae_id": next(iter(prep.saes.values())).sae_id, "prep": prep}


def _final(run: dict[str, Any], f: int) -> tuple[Any, ...]:
    rows = run["store"].query("select explanation_id, text, causal_level, supported_level, overclaimed from "
                              "explanations where target = ? and is_final", [f"{run['sae_id']}#{f}"])[1]
    assert len(rows) == 1, rows
    return rows[0]


def _output_row(run: dict[str, Any], explanation_id: str) -> tuple[Any, ...]:
    import json

    rows = run["store"].query("select value, n, details from scores where explanation_id = ? and metric = "
                              "'output'", [explanation_id])[1]
    assert len(rows) == 1, rows
    value, n, details = rows[0]
    return value, n, json.loads(details) if isinstance(details, str) else details


def test_output_feature_is_labelled_by_its_output_at_intervention_level(output_run) -> None:
    eid, text, claimed, supported, overclaimed = _final(output_run, 1)
    assert ("'Mary'" in text or "name" in text) and "promotes" in text and "'sat'" in text and "'park'" in text, text
    assert claimed == "intervention" and supported == "intervention" and not overclaimed
    value, n, details = _output_row(output_run, eid)
    assert value is not None and value >= 0.9 and n > 0, details
    assert details["promotes"]["ablate_auc"] is None or details["promotes"]["ablate_auc"] >= 0.8


def test_input_only_feature_gets_no_output_claim_and_a_null_output_row(output_run) -> None:
    eid, text, claimed, supported, _ = _final(output_run, 0)
    assert "promotes" not in text and claimed == "association", text
    value, n, details = _output_row(output_run, eid)
    assert value is None and n == 0 and "no output tokens" in details["unscored"]
    for f in OUT_DEAD:
        assert _final(output_run, f)[1].startswith("dead feature")


def test_true_output_label_beats_a_wrong_one_on_the_output_score(output_run) -> None:
    from autoexplain.agent.scoring import OutputScorer
    from autoexplain.agent.store import queries
    from autoexplain.tools.registry import ToolContext

    prep, sae_id = output_run["prep"], output_run["sae_id"]
    ctx = ToolContext(model=prep.lm, saes={s.sae_id: s for s in prep.saes.values()})
    examples = queries.feature_examples(output_run["store"], sae_id, 1)
    score = OutputScorer(ctx)
    true = score(sae_id, 1, "the token 'Mary'; promotes 'sat', 'park'", examples)
    wrong = score(sae_id, 1, "the token 'Mary'; promotes 'dog', 'red'", examples)
    suppress = score(sae_id, 1, "the token 'Mary'; suppresses 'sat', 'park'", examples)
    assert true.value is not None and wrong.value is not None and suppress.value is not None
    assert true.value > wrong.value + 0.2 and true.value > suppress.value + 0.5, (true, wrong, suppress)
    unknown = score(sae_id, 1, "the token 'Mary'; promotes 'zzqqxxyy unknownword'", examples)
    assert unknown.value is None and "one token" in unknown.details["unscored"]

