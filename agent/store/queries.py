"""Every read the rest of the code makes of the store, as named functions with typed results.

A caller asks a question ("the final labels of this run"); only this module (and the rest of the store) spells
table and column names. ``Store.query`` reads through the run's held connection when a run holds the file, so
these work mid-run; rows still waiting in an outbox are the outbox's to answer (see
:func:`autoexplain.agent.store.caches.cached_output`).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from autoexplain.agent.store.db import Store
    from autoexplain.evals.features import Example


class FinalLabel(NamedTuple):
    """An item's final explanation with its three scores (None: not computed)."""

    target: str
    text: str
    correctness: float | None
    completeness: float | None
    succinctness: float | None
    causal_level: str


class KindSummary(NamedTuple):
    """How the items of one kind (feature, circuit) of a run ended, and their mean scores."""

    kind: str
    items: int
    done: int
    budget_limited: int
    failed: int
    dead: int
    mean_correctness: float | None
    mean_completeness: float | None
    mean_succinctness: float | None


def final_labels(store: Store, run_id: str) -> list[FinalLabel]:
    """The final explanation of every item of ``run_id``: circuits first, then features by correctness."""
    rows = store.query(
        "select e.target, e.text, b.correctness, b.completeness, b.succinctness, e.causal_level "
        "from explanations e join work_items w using (item_id) left join best_explanations b using (explanation_id) "
        "where w.run_id = ? and e.is_final order by w.kind desc, b.correctness desc nulls last, e.target",
        [run_id])[1]
    return [FinalLabel(*r) for r in rows]


def run_summary(store: Store, run_id: str) -> list[KindSummary]:
    """One :class:`KindSummary` per item kind of ``run_id`` (dead: feature items whose stored ``features.is_dead``
    is true — never what a label says, which an LLM may word any way)."""
    rows = store.query(
        "select w.kind, count(*), count(*) filter (where w.status = 'done'), "
        "count(*) filter (where w.status = 'budget_limited'), count(*) filter (where w.status = 'failed'), "
        "count(*) filter (where f.is_dead), avg(b.correctness), avg(b.completeness), "
        "avg(b.succinctness) from work_items w "
        "left join explanations e on e.item_id = w.item_id and e.is_final "
        "left join best_explanations b on b.explanation_id = e.explanation_id "
        "left join features f on w.kind = 'feature' and w.target = f.sae_id || '#' || f.feature_index "
        "where w.run_id = ? group by w.kind order by w.kind", [run_id])[1]
    return [KindSummary(*r) for r in rows]


def circuit_of_item(store: Store, item_id: str) -> str | None:
    """The id of the circuit stored for work item ``item_id``, if any."""
    rows = store.query("select circuit_id from circuits where item_id = ?", [item_id])[1]
    return str(rows[0][0]) if rows else None


def circuit_search_output(store: Store, item_id: str) -> str | None:
    """The cached output (JSON) of the newest ``circuit_search`` call of work item ``item_id``, if any."""
    rows = store.query("select c.output from tool_calls t join tool_cache c using (cache_key) where t.item_id = ? "
                       "and t.tool = 'circuit_search' order by t.created_at desc limit 1", [item_id])[1]
    return str(rows[0][0]) if rows else None


def tool_cache_output(store: Store, key: str) -> str | None:
    """The stored tool output (JSON) under cache key ``key``, if any."""
    rows = store.query("select output from tool_cache where cache_key = ?", [key])[1]
    return str(rows[0][0]) if rows else None


def llm_cache_response(store: Store, request_hash: str) -> str | None:
    """The stored LLM response (JSON) for ``request_hash``, if any."""
    rows = store.query("select response from llm_cache where request_hash = ?", [request_hash])[1]
    return str(rows[0][0]) if rows else None


def run_exists(store: Store, run_id: str) -> bool:
    return bool(store.query("select 1 from runs where run_id = ?", [run_id])[1])


def schema_version(store: Store) -> int:
    return int(store.query("select max(version) from schema_migrations")[1][0][0])


# ----------------------------------------------------------------------------- runs and work items
class ItemState(NamedTuple):
    status: str
    attempts: int


class StoredOutcome(NamedTuple):
    """How an item finished in an earlier process: its status and error, and its final explanation if any."""

    status: str
    error: str | None
    text: str | None
    overall: float | None


def resumable_run(store: Store, kind: str, plan_hash: str) -> str | None:
    """The newest unfinished run of ``kind`` with this plan hash (what ``--resume`` continues), if any."""
    rows = store.query("select run_id from runs where kind = ? and config->>'plan_hash' = ? and status <> 'done' "
                       "order by started_at desc limit 1", [kind, plan_hash])[1]
    return str(rows[0][0]) if rows else None


def item_states(store: Store, run_id: str) -> dict[str, ItemState]:
    """Every stored work item of ``run_id``: its status and how often it was attempted."""
    rows = store.query("select item_id, status, attempts from work_items where run_id = ?", [run_id])[1]
    return {item_id: ItemState(status, attempts) for item_id, status, attempts in rows}


def stored_outcome(store: Store, item_id: str) -> StoredOutcome:
    """The stored status, error and final explanation of work item ``item_id`` (which must exist)."""
    found = store.query("select status, error from work_items where item_id = ?", [item_id])[1]
    if not found:
        raise LookupError(f"work item {item_id} is not in the store")
    status, error = found[0]
    final = store.query("select text, overall from explanations where item_id = ? and is_final", [item_id])[1]
    return StoredOutcome(status, error, *(final[0] if final else (None, None)))


def tool_call_cache_key(store: Store, call_id: str) -> str | None:
    """The tool-cache key of stored tool call ``call_id`` (None: unknown call, or a call not cached)."""
    rows = store.query("select cache_key from tool_calls where call_id = ?", [call_id])[1]
    return rows[0][0] if rows else None


# ----------------------------------------------------------------------------- features
class FeatureSummary(NamedTuple):
    density: float | None
    max_act: float | None
    n_tokens: int | None
    is_dead: bool | None
    top_logits: str | None  #: JSON


class ShownExampleRow(NamedTuple):
    kind: str
    quantile: int | None
    max_act: float | None
    tokens: str  #: JSON
    acts: str  #: JSON
    split: str | None


def harvested_features(store: Store, sae_id: str) -> int:
    """How many features of ``sae_id`` have stored statistics."""
    return int(store.query("select count(*) from features where sae_id = ?", [sae_id])[1][0][0])


class StoredHarvest(NamedTuple):
    """The harvest an SAE's stored ``features`` rows come from: its id and inputs (None when not recorded or when
    rows of several harvests are mixed) and how many features it covers."""

    harvest_id: str | None
    inputs: dict[str, Any] | None
    n_features: int


def stored_harvest(store: Store, sae_id: str) -> StoredHarvest | None:
    """Which harvest the stored features of ``sae_id`` come from, or None when none are stored."""
    rows = store.query("select f.harvest_id, count(*), any_value(h.inputs) from features f left join harvests h "
                       "using (harvest_id) where f.sae_id = ? group by f.harvest_id", [sae_id])[1]
    if not rows:
        return None
    n = sum(int(r[1]) for r in rows)
    if len(rows) > 1 or rows[0][2] is None:
        return StoredHarvest(harvest_id=None, inputs=None, n_features=n)
    return StoredHarvest(harvest_id=str(rows[0][0]), inputs=json.loads(rows[0][2]), n_features=n)


def harvest_notes(store: Store, run_id: str) -> list[str]:
    """The notes (warnings about their inputs) of the harvests run ``run_id`` made."""
    return [str(r[0]) for r in store.query("select note from harvests where run_id = ? and note is not null "
                                           "order by created_at", [run_id])[1]]


def dead_features(store: Store, sae_id: str) -> dict[int, int]:
    """The dead features of ``sae_id`` and the number of tokens each was harvested over."""
    return {int(f): int(n) for f, n in store.query("select feature_index, n_tokens from features where sae_id = ? "
                                                   "and is_dead", [sae_id])[1]}


def feature_summary(store: Store, sae_id: str, feature_index: int) -> FeatureSummary | None:
    """One feature's harvested statistics, or None if it was never harvested."""
    rows = store.query("select density, max_act, n_tokens, is_dead, top_logits from features "
                       "where sae_id = ? and feature_index = ?", [sae_id, feature_index])[1]
    return FeatureSummary(*rows[0]) if rows else None


def shown_examples(store: Store, sae_id: str, feature_index: int) -> list[ShownExampleRow]:
    """A feature's stored examples, strongest first and random samples last, with their split."""
    rows = store.query("select kind, quantile, max_act, tokens, acts, split from feature_examples "
                       "where sae_id = ? and feature_index = ? order by kind = 'random', max_act desc, "
                       "example_id", [sae_id, feature_index])[1]
    return [ShownExampleRow(*r) for r in rows]


def feature_examples(store: Store, sae_id: str, feature_index: int) -> list[Example]:
    """Every stored example of one feature (both sides of the split), as
    :class:`~autoexplain.evals.features.Example`."""
    from autoexplain.evals.features import examples_from_query

    return examples_from_query(*store.query(
        "select kind, example_id, quantile, split, tokens, acts, max_act, window_index from feature_examples "
        "where sae_id = ? and feature_index = ? order by kind, example_id", [sae_id, feature_index]))


def unsplit_examples(store: Store, sae_id: str, features: set[int]) -> dict[int, list[Example]]:
    """The examples of ``features`` (of ``sae_id``) whose held-out split is not fixed yet, per feature."""
    from autoexplain.evals.features import examples_from_query

    cols, rows = store.query(
        "select feature_index, kind, example_id, quantile, split, tokens, acts, max_act, window_index "
        "from feature_examples where sae_id = ? and split is null", [sae_id])
    by_f: dict[int, list[tuple[object, ...]]] = {}
    for r in rows:
        if r[0] in features:
            by_f.setdefault(r[0], []).append(r[1:])
    return {f: examples_from_query(cols[1:], rs) for f, rs in by_f.items()}
