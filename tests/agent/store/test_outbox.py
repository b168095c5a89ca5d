"""Group commit (agent/outbox.py): rows wait per work item, merge by key, and land one finished item at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from autoexplain.agent.store import Store, announce_reader, run_query
from autoexplain.agent.store.outbox import GroupCommit, Outbox
from autoexplain.agent.store.rows import utc_now as _now


def _expl(eid: str, item: str, **extra: Any) -> dict[str, Any]:
    return {"explanation_id": eid, "run_id": "r", "item_id": item, "target": "t", "text": f"label {eid}",
            "author": "offline", "causal_level": "association", "created_at": _now(), **extra}


def _judged(eid: str, n: int = 3) -> dict[str, Any]:
    return {"explanation_id": eid, "scorer": "detection", "judge": "lexical", "sae_id": "s", "feature_index": 0,
            "judgement_ids": [f"{eid}-{i}" for i in range(n)], "example_kinds": ["top"] * n,
            "example_ids": list(range(n)), "splits": ["score"] * n, "truths": [True] * n,
            "predictions": [True] * n, "oks": [True] * n, "errors": [None] * n, "raws": [{"i": i} for i in range(n)],
            "created_at": _now()}


def _q(store: Store, sql: str) -> list[tuple[Any, ...]]:
    return run_query(store.path, sql)[1]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "o.duckdb")


def test_rows_merge_by_key_and_land_only_when_their_item_finished(store: Store) -> None:
    out = Outbox(store)
    out.begin("item-a")
    out.upsert("explanations", [_expl("e1", "item-a")])  # propose
    out.upsert("explanations", [{"explanation_id": "e1", "judge": "lexical"}])  # score
    out.upsert("explanations", [{"explanation_id": "e1", "is_final": True, "overall": 0.7}])  # accept
    out.finished("item-a")
    out.begin("item-b")
    out.upsert("explanations", [_expl("e2", "item-b")])
    assert out.get("explanations", ("e1",))["judge"] == "lexical"  # a run reads its own waiting rows
    assert out.get("explanations", ("e2",))["text"] == "label e2"
    assert _q(store, "select count(*) from explanations") == [(0,)]

    assert out.flush() == ["item-a"]
    # one row, every column from the three writes; item-b (still running) is not committed, half or whole
    assert _q(store, "select explanation_id, text, judge, is_final, overall from explanations") == [
        ("e1", "label e1", "lexical", True, 0.7)]
    assert out.get("explanations", ("e1",)) is None and out.get("explanations", ("e2",)) is not None
    out.finished("item-b")
    assert out.flush() == ["item-b"] and out.commits == 2
    assert _q(store, "select count(*) from explanations") == [(2,)]


def test_each_step_hands_its_own_rows_to_the_checkpoint_and_replay_puts_them_back(store: Store) -> None:
    out = Outbox(store)
    out.begin("item-a")
    out.upsert("explanations", [_expl("e1", "item-a")])
    out.upsert("hypotheses", [{"hypothesis_id": "h1", "run_id": "r", "item_id": "item-a", "text": "h",
                               "status": "open", "created_at": _now()}])
    step1 = out.take_step()
    assert [e["table"] for e in step1] == ["explanations", "hypotheses"]
    out.upsert("explanations", [{"explanation_id": "e1", "is_final": True}])
    step2 = out.take_step()
    assert step2 == [{"table": "explanations", "rows": [{"explanation_id": "e1", "is_final": True}]}]
    assert out.take_step() == []

    # a new process (the old one was killed before committing): the checkpoints' rows come back, merged
    again = Outbox(store)
    again.begin("item-a")
    assert again.replay([*step1, *step2]) == 3
    assert again.take_step() == []  # replayed rows are already in the checkpoints
    again.finished("item-a")
    again.flush()
    assert _q(store, "select text, is_final from explanations") == [("label e1", True)]
    assert _q(store, "select count(*) from hypotheses") == [(1,)]


def test_a_failed_commit_writes_nothing_and_keeps_the_rows(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    out = Outbox(store)
    out.begin("item-a")
    out.upsert("explanations", [_expl("e1", "item-a")])
    out.upsert("hypotheses", [{"hypothesis_id": "h1", "run_id": "r", "item_id": "item-a", "text": "h",
                               "status": "open", "created_at": _now()}])
    out.finished("item-a")
    orig = Store.upsert

    def failing(self: Store, table: str, rows: Any, *, con: Any = None) -> int:
        n = orig(self, table, rows, con=con)
        if table == "hypotheses":
            raise OSError("disk full")
        return n

    monkeypatch.setattr(Store, "upsert", failing)
    with pytest.raises(OSError, match="disk full"):
        out.flush()
    assert _q(store, "select count(*) from explanations") == [(0,)]  # the transaction rolled back
    monkeypatch.setattr(Store, "upsert", orig)
    assert out.flush() == ["item-a"]  # the rows were still waiting
    assert _q(store, "select (select count(*) from explanations), (select count(*) from hypotheses)") == [(1, 1)]


def test_a_commit_is_due_after_enough_items_after_enough_time_or_when_a_reader_waits(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    import autoexplain.agent.store.outbox as outbox_mod

    clock = [1000.0]
    monkeypatch.setattr(outbox_mod.time, "monotonic", lambda: clock[0])
    out = Outbox(store, GroupCommit(items=3, seconds=30))
    out.begin("a")
    out.upsert("explanations", [_expl("e1", "a")])
    assert not out.due()  # nothing finished: never due, however old
    clock[0] += 100
    assert not out.due()
    for item in ("a", "b"):
        out.finished(item)
    assert not out.due()
    out.finished("c")
    assert out.due()  # three finished items
    out.flush()
    out.finished("d")
    clock[0] += 29
    assert not out.due()
    clock[0] += 1
    assert out.due()  # the oldest finished item waited 30 s
    out.flush()
    out.finished("e")
    assert not out.due()
    with announce_reader(store.path):
        assert out.due()  # `autoexplain sql` mid-run: commit now, so it sees every finished item


@pytest.mark.parametrize("keep", [False, True])
def test_per_example_judgements_of_rejected_drafts_are_dropped_unless_kept(store: Store, keep: bool) -> None:
    out = Outbox(store, keep_rejected=keep)
    out.begin("a")
    out.upsert("explanations", [_expl("e1", "a"), _expl("e2", "a")])
    out.upsert("judgement_sets", [_judged("e1"), _judged("e2", 4)])
    out.upsert("scores", [{"score_id": f"s-{e}", "explanation_id": e, "metric": "correctness", "value": 0.5,
                           "created_at": _now()} for e in ("e1", "e2")])
    out.upsert("explanations", [{"explanation_id": "e1", "is_final": False}, {"explanation_id": "e2",
                                                                                "is_final": True}])
    out.finished("a")
    out.flush()
    judged = dict(_q(store, "select explanation_id, count(*) from judgements group by all"))
    assert judged == ({"e1": 3, "e2": 4} if keep else {"e2": 4})
    assert _q(store, "select count(*) from scores") == [(2,)]  # every draft keeps its scores
    assert _q(store, "select raw->>'i' from judgements where explanation_id = 'e2' order by example_id") == [
        ("0",), ("1",), ("2",), ("3",)]


def test_unknown_tables_and_rows_without_their_key_are_refused(store: Store) -> None:
    out = Outbox(store)
    with pytest.raises(ValueError, match="unknown table 'judgements' .a view over judgement_sets"):
        out.upsert("judgements", [{"judgement_id": "j"}])  # judgements are written as sets
    with pytest.raises(ValueError, match="unknown table 'nope'"):
        store.upsert("nope", [{"x": 1}])
    with pytest.raises(ValueError, match="lacks its key"):
        out.upsert("explanations", [{"text": "no id"}])
