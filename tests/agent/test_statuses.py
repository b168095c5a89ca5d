"""Statuses that do not overstate: a circuit on a model that cannot do its task is ``no_behaviour`` (its scores
stored as unscored, with the reason), never ``done`` with a faithfulness that measures noise."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.agent.test_agent_offline import rows


@pytest.fixture(scope="module")
def random_twin(tiny_zoo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny toy model's architecture and tokenizer with freshly initialised (untrained) weights."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("random-twin")
    for f in tiny_zoo.model_dir.iterdir():
        if f.is_file() and not f.name.startswith("model"):
            shutil.copy(f, out / f.name)
    torch.manual_seed(1)
    GPT2LMHeadModel(GPT2Config.from_pretrained(str(tiny_zoo.model_dir))).save_pretrained(str(out))
    return out


def test_a_circuit_on_a_model_without_the_behaviour_is_no_behaviour(tiny_zoo, random_twin: Path,
                                                                     tmp_path: Path, one_thread) -> None:
    from autoexplain.agent.runner import Plan, prepare, run_plan
    from autoexplain.agent.store import Store

    task = tiny_zoo.task_file("greater_than")
    plan = Plan.model_validate({"name": "random", "model": str(random_twin),
                                "items": [{"circuit": {"task": str(task), "method": "eap"}}]})
    db = tmp_path / "r.duckdb"
    res = run_plan(Store(db), prepare(plan))
    [o] = res.outcomes
    assert o.status.value == "no_behaviour", (o.status, o.error)
    assert o.error and "no behaviour" in o.error
    assert rows(db, "select status, error from work_items")[0][0] == "no_behaviour"
    scores = dict(rows(db, "select metric, value from scores"))
    for metric in ("correctness", "completeness", "succinctness", "faithfulness"):
        assert scores[metric] is None, metric
    assert scores["full_effect"] is not None and abs(scores["full_effect"]) < 0.1
    [(why,)] = rows(db, "select details->>'$.unscored' from scores where metric = 'correctness'")
    assert "does not do this task" in why


def test_a_label_at_chance_is_weak(tiny_zoo, tmp_path: Path) -> None:
    """Scored on held-out data with the lexical judge, a label naming a word the feature never fires on detects
    nothing: its correctness interval includes 0.5 and the scorer gives the weak verdict with the reason."""
    import datetime as dt

    from autoexplain.agent.scoring import FeatureScorer
    from autoexplain.agent.state import ItemKind, WorkItem
    from autoexplain.agent.store import Store
    from autoexplain.evals.judges import LexicalJudge
    from tests.agent.test_agent_offline import copy_db, harvested_template

    template, _ = harvested_template()
    store = Store(copy_db(template, tmp_path / "w.duckdb"))
    (sae_id, f), = store.query("select sae_id, feature_index from features where not is_dead and density > 0.01 "
                               "order by density desc limit 1")[1]
    item = WorkItem(item_id="i", run_id="r", kind=ItemKind.FEATURE, target=f"{sae_id}#{f}",
                    params={"sae_id": sae_id, "feature_index": f})
    text = "the token 'zzzzqqq'"
    store.upsert("explanations", [{"explanation_id": "x-bad", "run_id": "r", "item_id": "i", "target": item.target,
                                   "text": text, "author": "test", "causal_level": "association",
                                   "created_at": dt.datetime.now()}])
    [bad] = FeatureScorer(store, store, LexicalJudge()).score(item, [{"explanation_id": "x-bad", "text": text}])
    assert bad["verdict"]["status"] == "weak" and bad["verdict"]["why"].startswith("weak: "), bad
    assert bad["correctness"] is None or bad["correctness"] <= 0.6
