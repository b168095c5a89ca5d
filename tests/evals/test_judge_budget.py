"""LLM judging within budget (issue #14 item 6): >= 20 contexts per judge call with one answer per context, at
most 10 judge calls per labelled feature (3 drafts), measured on the scripted server; batched judgements agree
with one-context-per-call ones on the planted features.

The scripted model answers each text on its own (a deterministic oracle: a token fires when it is a word the
label names, read by the lexical judge's rules), so agreement here checks the plumbing (answer i belongs to text
i at any batch size, nothing shifted or dropped), not a real model's attention over 40 texts."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from autoexplain.agent.llm import LLMClient, LLMConfig
from autoexplain.evals.features import score_explanation
from autoexplain.evals.judges import LexicalJudge, LLMJudge
from autoexplain.evals.truth.planted_features import (
    MIXED_DESCRIPTIONS,
    MIXED_KINDS,
    MIXED_WRONG,
    plant_mixed_harvest,
)
from tests.fake_openai import FakeOpenAI, Reply, structured

LISTED = re.compile(r"^\d+\. (\".*\")$", re.M)
TOKEN = re.compile(r"^(\d+)\.\d+ (\".*\")$", re.M)
LEX = LexicalJudge()


class Oracle:
    """Answers judge requests text by text with the lexical judge's reading of the label; counts contexts."""

    def __init__(self) -> None:
        self.sizes: list[tuple[str, int]] = []

    def __call__(self, body: dict[str, Any], n: int) -> Reply:
        system = body["messages"][0]["content"]
        user = body["messages"][-1]["content"]
        label = user.splitlines()[0].removeprefix("Explanation: ")
        if "simulating" in system:
            texts: dict[int, list[str]] = {}
            for i, tok in TOKEN.findall(user):
                texts.setdefault(int(i), []).append(json.loads(tok))
            ctxs = [texts[i] for i in sorted(texts)]
            self.sizes.append(("simulation", len(ctxs)))
            return structured({"activations": [[int(v) for v in s.values or []]
                                               for s in LEX.judge_simulation(label, ctxs)]})
        texts_ = [json.loads(t) for t in LISTED.findall(user)]
        if "<<" in user:
            self.sizes.append(("fuzzing", len(texts_)))
            answers = []
            for t in texts_:
                parts = re.split(r"(<<.*?>>)", t)
                toks = [p[2:-2] if p.startswith("<<") else p for p in parts if p]
                hl = [i for i, p in enumerate(q for q in parts if q) if p.startswith("<<")]
                answers.append(bool(LEX.judge_fuzzing(label, [toks], [hl])[0].prediction))
            return structured({"answers": answers})
        self.sizes.append(("detection", len(texts_)))
        return structured({"answers": [bool(LEX.judge_detection(label, [re.findall(r"\s*\S+", t)])[0].prediction)
                                       for t in texts_]})


@pytest.fixture(scope="module")
def mixed():
    return plant_mixed_harvest()


def _judge(server: FakeOpenAI, **kw: Any) -> LLMJudge:
    cfg = LLMConfig(model="fake", base_url=server.base_url, api_key="sk-fake", timeout_s=10, max_retries=0,
                    max_repairs=0)
    return LLMJudge(LLMClient(cfg), "fake", **kw)


def _drafts(f: int) -> list[str]:
    return [MIXED_DESCRIPTIONS[f], MIXED_WRONG[f], "the word 'zebra'" if f != 3 else "the word 'Mary'"]


def test_judge_calls_per_labelled_feature_and_agreement(mixed) -> None:
    oracle = Oracle()
    with FakeOpenAI(oracle) as server:
        batched, single = _judge(server), _judge(server, batch_size=1, simulation_batch=1)
        per_feature: dict[int, int] = {}
        agree = total = 0
        sizes: dict[int, list[tuple[str, int]]] = {}
        for f in MIXED_KINDS:
            n0, start = batched.calls, len(oracle.sizes)
            results = {}
            for text in _drafts(f):
                results[text] = score_explanation(text, mixed.examples[f], batched, sae_id="mixed", feature_index=f,
                                                  background=None)
            per_feature[f] = batched.calls - n0
            sizes[f] = oracle.sizes[start:]
            ref = score_explanation(MIXED_DESCRIPTIONS[f], mixed.examples[f], single, sae_id="mixed",
                                    feature_index=f)
            got = {j.judgement_id: j.prediction for j in results[MIXED_DESCRIPTIONS[f]].judgements}
            for j in ref.judgements:
                total += 1
                agree += got.get(j.judgement_id) == j.prediction
            assert ref.correctness == pytest.approx(results[MIXED_DESCRIPTIONS[f]].correctness)
            for res in results.values():
                assert res.correctness is not None and res.n_failures == 0, (f, res.reasons)
            assert results[MIXED_DESCRIPTIONS[f]].correctness > results[MIXED_WRONG[f]].correctness
    print(f"judge calls per feature (3 drafts): {per_feature}; batched vs single agreement {agree}/{total}")
    assert max(per_feature.values()) <= 10, per_feature
    assert agree == total and total > 0
    # one call per scorer and draft, each holding >= 20 contexts — except the rare feature's, whose whole held-out
    # set is smaller (it still takes one call per scorer)
    for f, got in sizes.items():
        assert len(got) == per_feature[f] == 9 and {k for k, _ in got} == {"detection", "fuzzing", "simulation"}
        assert f == 3 or all(n >= 20 for _, n in got), (f, got)
