"""Feature circuits inside the agent (issue #15 items 3 and 5): a plan's ``feature_circuit:`` entry finds the sparse
feature circuit, labels its unlabelled features on demand (ordinary feature items, listed before it), and one
``feature_circuit`` item writes the behaviour's explanation through those labels and is scored by intervention on
held-out prompts.

Known answer: the planted model of :mod:`autoexplain.evals.truth.planted_feature_circuits`, whose circuit is
``embed -> res0#A -> res1#OUT -> logits`` (A = token 1, OUT = feature 12 of res1). Nobody labelled anything before
the run, so exactly those two features get feature items, and the explanation must name them with the labels those
items wrote, and no distractor feature.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

import pytest

from autoexplain.agent.runner import FeatureCircuitEntry, Plan, PlanEntry, Prepared, _feature_circuit_job, run_plan
from autoexplain.agent.store import Store
from autoexplain.evals.truth.planted_feature_circuits import END, FILLERS, NO, YES, A, V, build

pytestmark = pytest.mark.usefixtures("one_thread")


def _with_tokenizer(lm: Any, where: Path) -> Any:
    """The planted model with a word-level tokenizer over its ids (``"<7>"`` is token 7, ``"<0>"`` is BOS)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(WordLevel({f"<{i}>": i for i in range(V)}, unk_token="<0>"))
    core.pre_tokenizer = WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<0>", eos_token="<0>", pad_token="<0>",
                                  unk_token="<0>")
    tok.save_pretrained(str(where))  # reloaded from a folder, as TransformerLens expects of a tokenizer
    tok = PreTrainedTokenizerFast.from_pretrained(str(where))
    lm.model.set_tokenizer(tok)  # the feature tools tokenise probe texts with the model's own to_tokens
    return dataclasses.replace(lm, tokenizer=tok)


def _world(tmp_path: Path) -> tuple[Any, Any, Path, Path]:
    """(planted, lm with tokenizer, task file, corpus): the task's prompts as text (BOS added back by
    tokenisation), and a corpus of short texts over the model's tokens for the harvest."""
    planted = build(n_prompts=16)
    lm = _with_tokenizer(planted.lm, tmp_path / "tokenizer")
    task = {"name": "planted_fc", "prompts": [
        {"clean": p.clean.removeprefix("<0> "), "corrupt": p.corrupt.removeprefix("<0> "), "answers": [f"<{YES}>"],
         "wrong_answers": [f"<{NO}>"]} for p in planted.task.prompts.prompts]}
    task_path = tmp_path / "planted_fc.json"
    task_path.write_text(json.dumps(task))
    rng = random.Random(0)
    words = [A, 2, *FILLERS, END]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(f"<{rng.choice(words)}>" for _ in range(7)) for _ in range(600)) + "\n")
    return planted, lm, task_path, corpus


def _prepared(planted: Any, lm: Any, task_path: Path, corpus: Path, **entry: Any) -> Prepared:
    fc = FeatureCircuitEntry(task=str(task_path), saes=[s.spec for s in planted.saes], dataset=str(corpus),
                             tokens=3000, **entry)
    plan = Plan(name="fc", model="planted:feature-circuit", items=[PlanEntry(feature_circuit=fc)])
    saes = {s.spec: s for s in planted.saes}
    label_jobs: list[Any] = []
    job = _feature_circuit_job(fc, lm, saes, None, label_jobs)
    return Prepared(plan=plan, lm=lm, saes=saes, label_jobs=label_jobs, circuit_jobs=[],
                    feature_circuit_jobs=[job])


def q(store: Store, sql: str) -> list[tuple]:
    return store.query(sql)[1]


def test_feature_circuit_item_labels_its_features_and_explains_through_them(tmp_path, monkeypatch):
    import autoexplain.tools.feature_circuits as fc_mod

    planted, lm, task_path, corpus = _world(tmp_path)
    searches = []
    real = fc_mod.find_feature_circuit

    def counted(*args: Any, **kw: Any) -> Any:
        searches.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(fc_mod, "find_feature_circuit", counted)
    store = Store(tmp_path / "fc.duckdb")
    res = run_plan(store, _prepared(planted, lm, task_path, corpus))
    r0, r1 = (s.sae_id for s in planted.saes)
    a_feat, out_feat = f"{r0}#{A}", f"{r1}#{V}"

    # labels on demand: exactly the planted features (no distractor), labelled before the circuit item
    kinds = [(o.kind.value, o.target) for o in res.outcomes]
    assert kinds == [("feature", a_feat), ("feature", out_feat), ("feature_circuit", "planted_fc")], kinds
    assert all(o.status.value in ("done", "weak") for o in res.outcomes), [(o.target, o.error) for o in res.outcomes]
    assert len(searches) == 1  # found once when the items were listed; the item's own call is a cache hit
    labels = dict(q(store, "select target, text from explanations where is_final and target like '%#%'"))
    assert set(labels) == {a_feat, out_feat}
    # the circuit item read labels not committed yet (it committed the finished feature items first), and every
    # committed item's checkpoints are gone
    import sqlite3

    with sqlite3.connect(tmp_path / "fc.duckdb.checkpoints.sqlite") as ck:
        assert ck.execute("select count(distinct thread_id) from checkpoints").fetchone() == (0,)

    # the explanation names each planted feature with its label, and no distractor
    text = res.outcomes[-1].text or ""
    assert f"{a_feat} ({labels[a_feat]!r})" in text and f"{out_feat} ({labels[out_feat]!r})" in text, text
    assert f"{r0}#2 " not in text and f"{r1}#{V + 1}" not in text and "unlabelled" not in text, text
    assert "the input embeddings" in text and "e.g. '<10>' over '<11>'" in text, text

    # scored like a circuit explanation, on held-out prompts, by intervention
    (fid, item_id, held, n_nodes) = q(store, "select feature_circuit_id, item_id, held_out_faithfulness, n_nodes "
                                            "from feature_circuits")[0]
    assert item_id == res.outcomes[-1].item_id and n_nodes == 3 and held == pytest.approx(1.0, abs=1e-4)
    kept = {n for (n,) in q(store, f"select node from feature_circuit_nodes where feature_circuit_id = '{fid}' "
                                   "and in_circuit")}
    assert kept == planted.nodes - {"logits"}
    scores = {m: (v, json.loads(d)) for m, v, d in q(
        store, "select s.metric, s.value, s.details from scores s join explanations e using (explanation_id) "
               "where e.target = 'planted_fc'")}
    assert scores["correctness"][0] == pytest.approx(1.0, abs=1e-4)
    assert scores["correctness"][1]["scored_on"] == "held-out prompts"
    assert scores["heldout_faithfulness"][0] == pytest.approx(1.0, abs=1e-4)
    assert scores["necessity"][0] > 0.99 and scores["completeness"][0] > 0.99
    assert 0 < scores["succinctness"][0] < 1
    assert all(d["feature_circuit_id"] == fid for _, d in scores.values())
    level = q(store, "select causal_level from explanations where is_final and target = 'planted_fc'")
    assert level == [("intervention",)]

    # a resume after completion recomputes nothing: same items, all skipped, no search
    again = run_plan(store, _prepared(planted, lm, task_path, corpus), resume=True, run_id=res.run_id)
    assert [o.item_id for o in again.outcomes] == [o.item_id for o in res.outcomes]
    assert all(o.skipped for o in again.outcomes) and len(searches) == 1
    assert q(store, "select count(*) from work_items")[0][0] == 3

    # a new run of the same plan: the features are labelled now (by another run), so only the circuit item runs,
    # and it reads the stored labels
    fresh = run_plan(store, _prepared(planted, lm, task_path, corpus))
    assert [o.kind.value for o in fresh.outcomes] == ["feature_circuit"] and len(searches) == 1
    assert f"{a_feat} ({labels[a_feat]!r})" in (fresh.outcomes[0].text or "")


def test_label_zero_labels_nothing_and_says_unlabelled(tmp_path):
    planted, lm, task_path, corpus = _world(tmp_path)
    store = Store(tmp_path / "fc0.duckdb")
    res = run_plan(store, _prepared(planted, lm, task_path, corpus, label=0))
    (o,) = res.outcomes
    assert o.kind.value == "feature_circuit" and o.status.value == "done", (o.status, o.error)
    assert "(unlabelled)" in (o.text or "")


def test_plan_entries_are_validated() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="either {label"):
        PlanEntry.model_validate({"circuit": {"task": "ioi"}, "feature_circuit": {"task": "ioi", "saes": ["x"]}})
    with pytest.raises(ValidationError, match="same SAE twice"):
        FeatureCircuitEntry(task="ioi", saes=["toy:tiny/res0", "toy:tiny/res0"])
    with pytest.raises(ValidationError):
        FeatureCircuitEntry(task="ioi", saes=[])
    assert FeatureCircuitEntry(task="ioi", saes=["a"]).label == 8


# ----------------------------------------------------------------------------- the command line
PLAN = """name: fc
model: toy:tiny
items:
  - feature_circuit: {task: ioi, saes: [toy:tiny/res0, toy:tiny/mlp1], label: 2, tokens: 4000, steps: 3}
"""


def test_autoexplain_run_with_a_feature_circuit_entry(tiny_zoo, tmp_path: Path) -> None:
    from tests.agent.test_agent_offline import rows, run_agent_cli

    (tmp_path / "plan.yaml").write_text(PLAN, encoding="utf-8")
    res = run_agent_cli(["run", "plan.yaml", "--db", "out.duckdb"], tmp_path, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "feature_circuit" in res.stdout  # its own line in the run table
    db = tmp_path / "out.duckdb"
    items = rows(db, "select kind, status, item_id from work_items order by kind")
    assert [k for k, _, _ in items] == ["feature", "feature", "feature_circuit"], items
    assert all(s in ("done", "weak") for _, s, _ in items), items
    fc_item = items[-1][2]
    (fid, item_id, n_prompts) = rows(db, "select feature_circuit_id, item_id, n_prompts from feature_circuits")[0]
    assert item_id == fc_item and n_prompts >= 4
    labelled = {t for (t,) in rows(db, "select e.target from explanations e join work_items w using (item_id) "
                                       "where e.is_final and w.kind = 'feature'")}
    kept = {f"{s}#{i}" for s, i in rows(db, "select sae_id, feature_index from feature_circuit_nodes where "
                                            f"feature_circuit_id = '{fid}' and in_circuit and kind = 'feature'")}
    assert len(labelled) == 2 and labelled <= kept
    text = rows(db, "select text from explanations where is_final and target = 'ioi'")[0][0]
    assert all(t in text for t in labelled), text
    metrics = {m for (m,) in rows(db, "select s.metric from scores s join explanations e using (explanation_id) "
                                      "where e.target = 'ioi'")}
    assert {"correctness", "completeness", "succinctness", "necessity", "heldout_faithfulness"} <= metrics


@pytest.mark.parametrize(("entry", "needle"), [
    ("{task: ioi, saes: [toy:tiny/res0, toy:tiny/res0]}", "same SAE twice"),
    ("{task: ioi, saes: []}", "saes"),
    ("{task: ioi, saes: [toy:tiny/res0], label: -1}", "label"),
    ("{task: nosuchtask.json, saes: [toy:tiny/res0]}", "nosuchtask.json"),
    ("{task: ioi, saes: [toy:tiny/res0], circuit: 3}", "circuit"),
])
def test_bad_feature_circuit_entries_are_one_line_exit_2(tmp_path: Path, entry: str, needle: str) -> None:
    from tests.agent.test_agent_offline import run_agent_cli

    (tmp_path / "plan.yaml").write_text(f"model: toy:tiny\nitems:\n  - feature_circuit: {entry}\n", encoding="utf-8")
    res = run_agent_cli(["run", "plan.yaml", "--db", "out.duckdb"], tmp_path, timeout=300)
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr and needle in res.stderr, res.stderr
    assert not (tmp_path / "out.duckdb").exists()


def test_the_llm_policy_starts_a_feature_circuit_item(tmp_path: Path) -> None:
    """The LLM policy's first turn for the new kind names the tools to call (no LLM call is made here)."""
    from types import SimpleNamespace

    from autoexplain.agent.policies.llm import LLMPolicy
    from autoexplain.agent.state import ItemKind, WorkItem

    policy = LLMPolicy(SimpleNamespace(config=SimpleNamespace(model="m")), tools=[])  # type: ignore[arg-type]
    item = WorkItem(item_id="i", run_id="r", kind=ItemKind.FEATURE_CIRCUIT, target="ioi",
                    params={"task_file": "ioi.json", "sae_ids": ["res0", "mlp1"]})
    system, user = policy._start(item, "toy")
    assert "feature_circuit" in user["content"] and "feature_labels" in user["content"]
    assert "res0, mlp1" in user["content"] and "ioi.json" in user["content"]


def test_a_run_stopped_midway_resumes_with_the_same_items_and_no_new_search(tmp_path, monkeypatch):
    """Stopped (as Ctrl-C does) inside the second feature item: --resume lists the same three items (the first
    feature's label, written by this run, does not shrink the selection), skips the finished one, and reads the
    circuit back from the tool cache."""
    import autoexplain.tools.feature_circuits as fc_mod

    planted, lm, task_path, corpus = _world(tmp_path)
    searches = []
    real = fc_mod.find_feature_circuit
    monkeypatch.setattr(fc_mod, "find_feature_circuit", lambda *a, **k: (searches.append(1), real(*a, **k))[1])
    store = Store(tmp_path / "stop.duckdb")
    seen: list[str] = []

    def stop_in_second_item(item_id: str, node: str) -> None:
        seen.append(item_id)
        if len(set(seen)) == 2:
            raise KeyboardInterrupt("stop")

    with pytest.raises(KeyboardInterrupt):
        run_plan(store, _prepared(planted, lm, task_path, corpus), on_node=stop_in_second_item)
    (run_id,) = q(store, "select run_id from runs")[0]
    assert q(store, "select status from runs") == [("interrupted",)]
    again = run_plan(store, _prepared(planted, lm, task_path, corpus), resume=True)
    assert again.run_id == run_id and len(searches) == 1
    assert [(o.kind.value, o.skipped) for o in again.outcomes] == [
        ("feature", True), ("feature", False), ("feature_circuit", False)]
    assert q(store, "select count(*) from work_items") == [(3,)]
    assert all(o.status.value in ("done", "weak") for o in again.outcomes)
