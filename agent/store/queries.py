"""Every read the rest of the code makes of the store, as named functions with typed results.

A caller asks a question ("the final labels of this run"); only this module (and the rest of the store) spells
table and column names. ``Store.query`` reads through the run's held connection when a run holds the file, so
these work mid-run; rows still waiting in an outbox are the outbox's to answer (see
:func:`autoexplain.agent.store.caches.cached_output`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

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
    status: str  # the work item's: done, weak, no_behaviour, budget_limited …


class KindSummary(NamedTuple):
    """How the items of one kind (feature, circuit) of a run ended, and their mean scores."""

    kind: str
    items: int
    done: int
    weak: int
    no_behaviour: int
    budget_limited: int
    failed: int
    pending: int  # not finished: never started (a run budget ran out) or cut off (pending / running)
    dead: int
    mean_correctness: float | None
    mean_completeness: float | None
    mean_succinctness: float | None


def final_labels(store: Store, run_id: str) -> list[FinalLabel]:
    """The final explanation of every item of ``run_id``: circuits first, then features by correctness."""
    rows = store.query(
        "select e.target, e.text, b.correctness, b.completeness, b.succinctness, e.causal_level, w.status "
        "from explanations e join work_items w using (item_id) left join best_explanations b using (explanation_id) "
        "where w.run_id = ? and e.is_final order by w.kind desc, b.correctness desc nulls last, e.target",
        [run_id])[1]
    return [FinalLabel(*r) for r in rows]


def live_features(store: Store, sae_id: str) -> list[int]:
    """The indices of ``sae_id``'s harvested features that fired (``not is_dead``), ascending."""
    rows = store.query("select feature_index from features where sae_id = ? and not is_dead order by 1", [sae_id])[1]
    return [int(r[0]) for r in rows]


def latest_run(store: Store, kind: str) -> tuple[str, str] | None:
    """``(run_id, status)`` of the newest run of ``kind``, if any."""
    rows = store.query("select run_id, status from runs where kind = ? order by started_at desc limit 1", [kind])[1]
    return (str(rows[0][0]), str(rows[0][1])) if rows else None


def run_summary(store: Store, run_id: str) -> list[KindSummary]:
    """One :class:`KindSummary` per item kind of ``run_id`` (dead: feature items whose stored ``features.is_dead``
    is true — never what a label says, which an LLM may word any way)."""
    rows = store.query(
        "select w.kind, count(*), count(*) filter (where w.status = 'done'), "
        "count(*) filter (where w.status = 'weak'), count(*) filter (where w.status = 'no_behaviour'), "
        "count(*) filter (where w.status = 'budget_limited'), count(*) filter (where w.status = 'failed'), "
        "count(*) filter (where w.status in ('pending', 'running')), "
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


def tool_call_key_and_args(store: Store, call_id: str) -> tuple[str | None, dict[str, Any]]:
    """(cache key, arguments) of stored tool call ``call_id``; (None, {}) for an unknown call."""
    rows = store.query("select cache_key, args from tool_calls where call_id = ?", [call_id])[1]
    if not rows:
        return None, {}
    key, args = rows[0]
    return key, (json.loads(args) if isinstance(args, str) else dict(args or {}))


def tool_call_outcomes(store: Store, call_ids: Sequence[str]) -> dict[str, tuple[str, str | None]]:
    """``call_id -> (tool, error)`` of stored tool calls (unknown ids are left out)."""
    if not call_ids:
        return {}
    rows = store.query("select call_id, tool, error from tool_calls where call_id in (select unnest(?))",
                       [list(call_ids)])[1]
    return {cid: (tool, err) for cid, tool, err in rows}


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


def background_windows(store: Store, sae_id: str, feature_index: int, limit: int = 128) -> list[list[str]]:
    """Token lists of up to ``limit`` distinct windows stored for *other* features of ``sae_id`` (random-pool
    windows first, then the rest), none of them a window ``feature_index`` has examples from. Whether the feature
    fires on them is unknown until computed (:class:`autoexplain.agent.scoring.ModelBackground` does)."""
    rows = store.query(
        "select any_value(tokens) from feature_examples where sae_id = ? and feature_index <> ? "
        "and (window_index is null or window_index not in (select window_index from feature_examples "
        "where sae_id = ? and feature_index = ? and window_index is not null)) "
        "group by coalesce(window_index::varchar, tokens::varchar) "
        "order by min(case when kind = 'random' then 0 else 1 end), min(window_index) limit ?",
        [sae_id, feature_index, sae_id, feature_index, limit])[1]
    return [json.loads(t) if isinstance(t, str) else list(t) for (t,) in rows]


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


# ----------------------------------------------------------------------------- inspecting results (autoexplain show)
class Reads(Protocol):
    """Anything the reads below can ask: a :class:`Store`, or a :class:`ReadOnlyStore`."""

    def query(self, sql: str, params: Sequence[Any] | None = None) -> tuple[list[str], list[tuple[Any, ...]]]: ...


class ReadOnlyStore:
    """A database file read without ever opening it for writing: what ``autoexplain show`` uses.

    A :class:`Store` creates a missing file and migrates an older one, both writes; a command that only shows
    results must do neither, and must answer while a run writes the same file. Each query opens the file
    read-only (announcing itself, so a run holding it lets go: see :func:`autoexplain.agent.store.db.run_query`).
    A file written before a table existed simply lacks it: callers ask :meth:`has_table`.
    """

    def __init__(self, path: Path, *, timeout_s: float = 30.0) -> None:
        from autoexplain.tools.errors import InputError

        self.path, self.timeout_s = Path(path), timeout_s
        if not self.path.is_file():
            raise InputError(f"no database at {str(self.path)!r}: run a command that writes one (e.g. autoexplain "
                             "demo) or pass --db PATH")

    def query(self, sql: str, params: Sequence[Any] | None = None) -> tuple[list[str], list[tuple[Any, ...]]]:
        from autoexplain.agent.store.db import run_query

        return run_query(self.path, sql, params, timeout_s=self.timeout_s)

    def has_table(self, name: str) -> bool:
        return has_table(self, name)


def has_table(store: Reads, name: str) -> bool:
    """Whether the database has table (or view) ``name`` (an older file may lack later tables)."""
    return bool(store.query("select 1 from information_schema.tables where table_schema = 'main' and "
                            "table_name = ?", [name])[1])


def sae_spec_aliases(spec: str) -> list[str]:
    """The names an SAE loaded under ``spec`` is found by: the spec as typed and, when it is an existing folder,
    its absolute path (so ``./my-sae`` typed in one folder is found from another as ``/home/me/my-sae``)."""
    spec = spec.strip()
    out = [spec]
    path = Path(spec).expanduser()
    if not spec.startswith("toy:") and path.exists():
        resolved = str(path.resolve())
        if resolved != spec:
            out.append(resolved)
    return out


class KnownSae(NamedTuple):
    """An SAE the database knows: its id, where it reads, its width, and every spec it was loaded under (the
    most recently used first)."""

    sae_id: str
    site: str
    d_sae: int
    model_id: str | None
    specs: list[str]
    n_features: int  #: features with harvested statistics


def known_saes(store: Reads) -> list[KnownSae]:
    """Every SAE in ``saes``, with its specs (``sae_aliases`` where the file has it, else the one ``saes.spec``)."""
    rows = store.query("select s.sae_id, s.site, s.d_sae, s.model_id, s.spec, (select count(*) from features f "
                       "where f.sae_id = s.sae_id) from saes s order by s.spec, s.sae_id")[1]
    aliases: dict[str, list[str]] = {}
    if has_table(store, "sae_aliases"):
        for sae_id, spec in store.query("select sae_id, spec from sae_aliases order by seen_at desc, spec")[1]:
            aliases.setdefault(sae_id, []).append(spec)
    out = []
    for sae_id, site, d_sae, model_id, spec, n in rows:
        specs = aliases.get(sae_id) or [spec]
        out.append(KnownSae(sae_id, site, int(d_sae), model_id, specs if spec in specs else [*specs, spec], int(n)))
    return out


def sae_ids_for_spec(store: Reads, spec: str) -> list[str]:
    """The SAEs ``spec`` names in this database, the one loaded under it most recently first: ``spec`` may be an
    ``sae_id`` itself, or any spec an SAE was loaded under (a folder also by its absolute path). Empty: none."""
    spec = spec.strip()
    if store.query("select 1 from saes where sae_id = ?", [spec])[1]:
        return [spec]
    names = sae_spec_aliases(spec)
    marks = ", ".join("?" for _ in names)
    found: list[str] = []
    if has_table(store, "sae_aliases"):
        found = [r[0] for r in store.query(f"select sae_id from sae_aliases where spec in ({marks}) "
                                           "group by sae_id order by max(seen_at) desc", names)[1]]
    for (sae_id,) in store.query(f"select sae_id from saes where spec in ({marks}) order by sae_id", names)[1]:
        if sae_id not in found:
            found.append(sae_id)
    return found


class FeatureDetails(NamedTuple):
    """One feature's harvested statistics, JSON columns decoded."""

    density: float | None
    max_act: float | None
    mean_act: float | None
    n_tokens: int | None
    is_dead: bool | None
    histogram: dict[str, Any] | None  #: {"edges": [...], "counts": [...]} (one bin below, one above the edges)
    top_logits: list[tuple[str, float]] | None
    bottom_logits: list[tuple[str, float]] | None
    harvest_id: str | None


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def feature_details(store: Reads, sae_id: str, feature_index: int) -> FeatureDetails | None:
    """The stored statistics of feature ``feature_index`` of ``sae_id``, or None if it was never harvested."""
    rows = store.query("select density, max_act, mean_act, n_tokens, is_dead, histogram, top_logits, bottom_logits, "
                       "harvest_id from features where sae_id = ? and feature_index = ?", [sae_id, feature_index])[1]
    if not rows:
        return None
    r = rows[0]
    logits = [None if v is None else [(str(t), float(x)) for t, x in _json(v)] for v in (r[6], r[7])]
    return FeatureDetails(r[0], r[1], r[2], r[3], r[4], _json(r[5]), logits[0], logits[1], r[8])


class StoredExample(NamedTuple):
    """One stored context of a feature, JSON decoded."""

    kind: str  #: top | quantile | random
    example_id: int
    quantile: int | None
    split: str | None  #: explain | score (None: the split was never fixed)
    max_act: float | None
    tokens: list[str]
    acts: list[float]


def stored_examples(store: Reads, sae_id: str, feature_index: int) -> list[StoredExample]:
    """Every stored context of one feature: top (strongest first), then quantile (strongest bin first), then
    random."""
    rows = store.query("select kind, example_id, quantile, split, max_act, tokens, acts from feature_examples "
                       "where sae_id = ? and feature_index = ? order by case kind when 'top' then 0 when 'quantile' "
                       "then 1 else 2 end, quantile desc nulls last, max_act desc nulls last, example_id",
                       [sae_id, feature_index])[1]
    return [StoredExample(k, int(i), q, s, m, list(_json(t)), [float(a) for a in _json(a)])
            for k, i, q, s, m, t, a in rows]


class StoredExplanation(NamedTuple):
    """One explanation (a label or a circuit explanation) of a target, with who wrote it and its standing."""

    explanation_id: str
    run_id: str
    item_id: str
    text: str
    author: str
    llm_model: str | None
    causal_level: str
    is_final: bool
    budget_limited: bool
    overall: float | None
    judge: str | None
    created_at: Any


_EXPLANATION_COLS = ("explanation_id, run_id, item_id, text, author, llm_model, causal_level, is_final, "
                     "budget_limited, overall, judge, created_at")


def explanations_of_target(store: Reads, target: str) -> list[StoredExplanation]:
    """Every explanation of ``target`` ('sae_id#index' or a task name): final ones first (newest first), then the
    others by overall score."""
    rows = store.query(f"select {_EXPLANATION_COLS} from explanations where target = ? order by is_final desc, "
                       "case when is_final then epoch(created_at) else 0 end desc, overall desc nulls last, "
                       "created_at desc", [target])[1]
    return [StoredExplanation(*r) for r in rows]


def explanations_of_item(store: Reads, item_id: str) -> list[StoredExplanation]:
    """Every explanation written for work item ``item_id``: the final one first, then by overall score."""
    rows = store.query(f"select {_EXPLANATION_COLS} from explanations where item_id = ? order by is_final desc, "
                       "overall desc nulls last, created_at desc", [item_id])[1]
    return [StoredExplanation(*r) for r in rows]


class StoredScore(NamedTuple):
    metric: str
    value: float | None
    n: int | None
    details: dict[str, Any]


def explanation_scores(store: Reads, explanation_ids: Sequence[str]) -> dict[str, list[StoredScore]]:
    """The ``scores`` rows of each explanation, by explanation id (the three scores first, then raw metrics)."""
    if not explanation_ids:
        return {}
    marks = ", ".join("?" for _ in explanation_ids)
    rows = store.query(f"select explanation_id, metric, value, n, details from scores where explanation_id in "
                       f"({marks}) order by explanation_id, case metric when 'correctness' then 0 when 'completeness' "
                       "then 1 when 'succinctness' then 2 else 3 end, metric", list(explanation_ids))[1]
    out: dict[str, list[StoredScore]] = {e: [] for e in explanation_ids}
    for eid, metric, value, n, details in rows:
        out[eid].append(StoredScore(metric, value, n, _json(details) or {}))
    return out


class StoredJudgement(NamedTuple):
    """One per-example judge decision behind a feature score (the ``judgements`` view)."""

    scorer: str
    judge: str
    example_kind: str
    example_id: int
    truth: bool
    prediction: bool | None  #: None when the judge's reply could not be parsed (``ok`` false)
    ok: bool
    error: str | None


def explanation_judgements(store: Reads, explanation_id: str) -> list[StoredJudgement]:
    """The per-example judge decisions stored for ``explanation_id`` (kept for the final label by default)."""
    if not has_table(store, "judgements"):
        return []
    rows = store.query("select scorer, judge, example_kind, example_id, truth, prediction, ok, error from judgements "
                       "where explanation_id = ? order by scorer, judge, judgement_id", [explanation_id])[1]
    return [StoredJudgement(*r) for r in rows]


class CircuitRecord(NamedTuple):
    """One ``circuits`` row, details decoded."""

    circuit_id: str
    run_id: str
    item_id: str | None
    model_id: str
    task: str
    method: str
    ablation: str
    patch_type: str
    metric: str
    threshold: float | None
    top_k: int | None
    n_edges_total: int | None
    n_edges: int | None
    faithfulness: float | None
    details: dict[str, Any]
    created_at: Any


def circuit_mechanism_scores(store: Reads, circuit_id: str) -> dict[str, float | None]:
    """``necessity``, ``held_out_faithfulness`` and the robustness columns of a circuit ({} before schema 8)."""
    if not has_table(store, "circuit_nodes"):  # the columns came with the table (migration 8)
        return {}
    cols = ("necessity", "held_out_faithfulness", "robustness_jaccard", "robustness_spearman")
    rows = store.query(f"select {', '.join(cols)} from circuits where circuit_id = ?", [circuit_id])[1]
    return dict(zip(cols, rows[0], strict=True)) if rows else {}


def circuit_record(store: Reads, circuit_id: str) -> CircuitRecord | None:
    rows = store.query("select circuit_id, run_id, item_id, model_id, task, method, ablation, patch_type, metric, "
                       "threshold, top_k, n_edges_total, n_edges, faithfulness, details, created_at from circuits "
                       "where circuit_id = ?", [circuit_id])[1]
    if not rows:
        return None
    r = list(rows[0])
    r[14] = _json(r[14]) or {}
    return CircuitRecord(*r)


def circuit_listing(store: Reads) -> list[tuple[str, str, str, int | None]]:
    """(circuit_id, task, method, kept edges) of every stored circuit, newest first: what an unknown id lists."""
    rows = store.query("select circuit_id, task, method, n_edges from circuits order by created_at desc")[1]
    return [(str(c), str(t), str(m), n) for c, t, m, n in rows]


class StoredEdge(NamedTuple):
    edge: str
    src: str
    dst: str
    score: float | None
    in_circuit: bool
    rank: int | None


def circuit_edges(store: Reads, circuit_id: str) -> list[StoredEdge]:
    """Every scored edge of a circuit search, by rank (1 = largest |score|)."""
    rows = store.query("select edge, src, dst, score, in_circuit, rank from circuit_edges where circuit_id = ? "
                       "order by rank nulls last, edge", [circuit_id])[1]
    return [StoredEdge(*r) for r in rows]


class StoredNode(NamedTuple):
    """One ``circuit_nodes`` row: a node's claimed role and its check, and its causal mediation."""

    node: str
    in_circuit: bool
    role: str | None
    role_score: float | None
    role_verified: bool | None
    total_effect: float | None
    direct_effect: float | None
    indirect_effect: float | None
    mediation_ratio: float | None
    prompt_share: float | None


def circuit_nodes(store: Reads, circuit_id: str) -> list[StoredNode]:
    """The mechanism rows of a circuit, largest |total effect| first (none in a file from before schema 8)."""
    if not has_table(store, "circuit_nodes"):
        return []
    rows = store.query("select node, in_circuit, role, role_score, role_verified, total_effect, direct_effect, "
                       "indirect_effect, mediation_ratio, prompt_share from circuit_nodes where circuit_id = ? "
                       "order by abs(total_effect) desc nulls last, node", [circuit_id])[1]
    return [StoredNode(*r) for r in rows]


class RunRecord(NamedTuple):
    """One ``runs`` row, JSON decoded."""

    run_id: str
    kind: str
    status: str
    policy: str | None
    config: dict[str, Any]
    summary: dict[str, Any]
    started_at: Any
    finished_at: Any
    host: str | None
    version: str | None


def run_record(store: Reads, run_id: str) -> RunRecord | None:
    rows = store.query("select run_id, kind, status, policy, config, summary, started_at, finished_at, host, version "
                       "from runs where run_id = ?", [run_id])[1]
    if not rows:
        return None
    r = list(rows[0])
    r[4], r[5] = _json(r[4]) or {}, _json(r[5]) or {}
    return RunRecord(*r)


def run_listing(store: Reads, limit: int = 10) -> list[tuple[str, str, str]]:
    """(run_id, kind, status) of the newest ``limit`` runs."""
    rows = store.query("select run_id, kind, status from runs order by started_at desc limit ?", [limit])[1]
    return [(str(r), str(k), str(s)) for r, k, s in rows]


class ItemCount(NamedTuple):
    kind: str
    status: str
    items: int


def run_item_counts(store: Reads, run_id: str) -> list[ItemCount]:
    """How many work items of ``run_id`` ended in each status, per kind."""
    rows = store.query("select kind, status, count(*) from work_items where run_id = ? group by kind, status "
                       "order by kind, status", [run_id])[1]
    return [ItemCount(*r) for r in rows]


class UsageTotals(NamedTuple):
    """What a run's items used, summed and at most per item (from ``work_items.budget``)."""

    items: int
    steps: int
    max_steps: int
    tool_calls: int
    llm_calls: int
    tokens: int
    max_tokens: int
    seconds: float
    max_seconds: float
    stopped_by: dict[str, int]  #: budget that stopped items -> how many


def run_usage(store: Reads, run_id: str) -> UsageTotals:
    rows = store.query("select budget from work_items where run_id = ? and budget is not null", [run_id])[1]
    used = [_json(r[0]) or {} for r in rows]

    def col(key: str) -> list[float]:
        return [float(u.get(key) or 0) for u in used]

    tokens = [float(u.get("prompt_tokens") or 0) + float(u.get("completion_tokens") or 0) for u in used]
    stopped: dict[str, int] = {}
    for u in used:
        if u.get("stopped_by"):
            stopped[str(u["stopped_by"])] = stopped.get(str(u["stopped_by"]), 0) + 1
    return UsageTotals(len(used), int(sum(col("steps"))), int(max(col("steps"), default=0)),
                       int(sum(col("tool_calls"))), int(sum(col("llm_calls"))), int(sum(tokens)),
                       int(max(tokens, default=0)), round(sum(col("seconds")), 2),
                       round(max(col("seconds"), default=0.0), 2), stopped)


class ItemLine(NamedTuple):
    """A work item of a run with its final explanation, for listing."""

    kind: str
    target: str
    status: str
    error: str | None
    text: str | None
    overall: float | None


def run_items(store: Reads, run_id: str, limit: int = 50) -> list[ItemLine]:
    """The first ``limit`` items of ``run_id`` (circuits first, then features by target) with their final text."""
    rows = store.query("select w.kind, w.target, w.status, w.error, e.text, e.overall from work_items w left join "
                       "explanations e on e.item_id = w.item_id and e.is_final where w.run_id = ? "
                       "order by w.kind, w.target limit ?", [run_id, limit])[1]
    return [ItemLine(*r) for r in rows]


def item_tool_outputs(store: Reads, item_id: str, tool: str) -> list[str]:
    """The stored outputs (JSON) of every cached ``tool`` call of work item ``item_id``, oldest first."""
    rows = store.query("select c.output from tool_calls t join tool_cache c using (cache_key) where t.item_id = ? "
                       "and t.tool = ? and t.error is null order by t.created_at", [item_id, tool])[1]
    return [str(r[0]) for r in rows]


# ----------------------------------------------------------------------------- the HTML report (bulk reads)
# The report reads whole tables at a time (one query per table, or per slice of features), never one feature at a
# time: a ReadOnlyStore opens the file for every query, and a report covers tens of thousands of features.
class ReportRun(NamedTuple):
    run_id: str
    kind: str
    status: str
    policy: str | None
    started_at: Any
    finished_at: Any
    config: dict[str, Any]
    summary: dict[str, Any]


def report_runs(store: Reads, run_id: str | None = None) -> list[ReportRun]:
    """Every run (or only ``run_id``), newest first, JSON decoded."""
    where, params = ("where run_id = ?", [run_id]) if run_id else ("", [])
    rows = store.query(f"select run_id, kind, status, policy, started_at, finished_at, config, summary from runs "
                       f"{where} order by started_at desc", params)[1]
    return [ReportRun(r[0], r[1], r[2], r[3], r[4], r[5], _json(r[6]) or {}, _json(r[7]) or {}) for r in rows]


class ReportItem(NamedTuple):
    """A work item with its final explanation (if any)."""

    item_id: str
    run_id: str
    kind: str  #: feature | circuit
    target: str
    status: str
    error: str | None
    budget: dict[str, Any]


def report_items(store: Reads, run_id: str | None = None) -> list[ReportItem]:
    """Every work item (or those of ``run_id``), by run, kind and target."""
    where, params = ("where run_id = ?", [run_id]) if run_id else ("", [])
    rows = store.query(f"select item_id, run_id, kind, target, status, error, budget from work_items {where} "
                       "order by run_id, kind, target", params)[1]
    return [ReportItem(r[0], r[1], r[2], r[3], r[4], r[5], _json(r[6]) or {}) for r in rows]


class ReportExplanation(NamedTuple):
    """An explanation with its claimed and supported causal level and the three scores (None: not computed)."""

    explanation_id: str
    run_id: str
    item_id: str
    target: str
    text: str
    author: str
    llm_model: str | None
    causal_level: str
    supported_level: str | None
    overclaimed: bool | None
    is_final: bool
    budget_limited: bool
    overall: float | None
    judge: str | None


def report_explanations(store: Reads, run_id: str | None = None) -> list[ReportExplanation]:
    """Every explanation (or those of ``run_id``'s items): per target, final ones first (newest first), then by
    overall score."""
    where, params = ("where run_id = ?", [run_id]) if run_id else ("", [])
    rows = store.query("select explanation_id, run_id, item_id, target, text, author, llm_model, causal_level, "
                       "supported_level, overclaimed, is_final, budget_limited, overall, judge from explanations "
                       f"{where} order by target, is_final desc, case when is_final then epoch(created_at) else 0 "
                       "end desc, overall desc nulls last, created_at desc", params)[1]
    return [ReportExplanation(*r) for r in rows]


def report_scores(store: Reads, run_id: str | None = None, *, with_details: bool = False
                  ) -> dict[str, list[StoredScore]]:
    """The ``scores`` rows of every explanation (or of ``run_id``'s), by explanation id; details decoded only when
    asked (they are large and the feature pages need few of them)."""
    where, params = ("where e.run_id = ?", [run_id]) if run_id else ("", [])
    det = "s.details" if with_details else "null"
    rows = store.query(f"select s.explanation_id, s.metric, s.value, s.n, {det} from scores s join explanations e "
                       f"using (explanation_id) {where} order by s.explanation_id, case s.metric when 'correctness' "
                       "then 0 when 'completeness' then 1 when 'succinctness' then 2 else 3 end, s.metric",
                       params)[1]
    out: dict[str, list[StoredScore]] = {}
    for eid, metric, value, n, details in rows:
        out.setdefault(eid, []).append(StoredScore(metric, value, n, _json(details) or {}))
    return out


class ReportJudgementSet(NamedTuple):
    """One scorer's per-example judge decisions on one explanation, as parallel lists (``judgement_sets``)."""

    scorer: str
    judge: str
    example_kinds: list[str]
    example_ids: list[int]
    truths: list[bool]
    predictions: list[bool | None]  #: None where the judge's reply could not be parsed (ok false)
    oks: list[bool]


def report_judgements(store: Reads, explanation_ids: Sequence[str]) -> dict[str, list[ReportJudgementSet]]:
    """The judgement sets of each of ``explanation_ids`` (the final labels), by explanation id: the sets' parallel
    lists as stored, not the unnesting ``judgements`` view (several times faster for thousands of labels)."""
    if not explanation_ids or not has_table(store, "judgement_sets"):
        return {}
    rows = store.query("select explanation_id, scorer, judge, example_kinds, example_ids, truths, predictions, oks "
                       "from judgement_sets where explanation_id in (select unnest(?)) order by explanation_id, "
                       "scorer, judge", [list(explanation_ids)])[1]
    out: dict[str, list[ReportJudgementSet]] = {}
    for eid, scorer, judge, kinds, ids, truths, preds, oks in rows:
        out.setdefault(eid, []).append(ReportJudgementSet(scorer, judge, list(kinds), [int(i) for i in ids],
                                                          list(truths), list(preds), list(oks)))
    return out


class ReportHypothesis(NamedTuple):
    hypothesis_id: str
    item_id: str
    text: str
    status: str
    causal_level: str | None
    evidence: list[str]  #: tool call ids


class ReportToolCall(NamedTuple):
    call_id: str
    item_id: str | None
    tool: str
    args: dict[str, Any]
    summary: str | None
    error: str | None
    duration_s: float | None


def report_hypotheses(store: Reads, run_id: str | None = None) -> list[ReportHypothesis]:
    """Every hypothesis (or ``run_id``'s), by item and time."""
    where, params = ("where run_id = ?", [run_id]) if run_id else ("", [])
    rows = store.query(f"select hypothesis_id, item_id, text, status, causal_level, evidence from hypotheses {where} "
                       "order by item_id, created_at, hypothesis_id", params)[1]
    return [ReportHypothesis(r[0], r[1], r[2], r[3], r[4], [str(x) for x in (_json(r[5]) or [])]) for r in rows]


def report_tool_calls(store: Reads, run_id: str | None = None) -> list[ReportToolCall]:
    """Every tool call (or ``run_id``'s), by item and time, with the bounded summary the policy saw."""
    where, params = ("where run_id = ?", [run_id]) if run_id else ("", [])
    rows = store.query(f"select call_id, item_id, tool, args, summary, error, duration_s from tool_calls {where} "
                       "order by item_id, created_at, call_id", params)[1]
    return [ReportToolCall(r[0], r[1], r[2], _json(r[3]) or {}, *r[4:]) for r in rows]


class ReportFeature(NamedTuple):
    """One feature's harvested statistics (JSON decoded)."""

    sae_id: str
    feature_index: int
    density: float | None
    max_act: float | None
    mean_act: float | None
    n_tokens: int | None
    is_dead: bool | None
    histogram: dict[str, Any] | None
    top_logits: list[tuple[str, float]] | None
    bottom_logits: list[tuple[str, float]] | None


def report_features(store: Reads, sae_id: str, lo: int = 0, hi: int | None = None) -> list[ReportFeature]:
    """The stored statistics of ``sae_id``'s features with index in [lo, hi), by index."""
    rows = store.query("select sae_id, feature_index, density, max_act, mean_act, n_tokens, is_dead, histogram, "
                       "top_logits, bottom_logits from features where sae_id = ? and feature_index >= ? and "
                       "feature_index < ? order by feature_index", [sae_id, lo, hi if hi is not None else 2**31 - 1])[1]
    out = []
    for r in rows:
        logits = [None if v is None else [(str(t), float(x)) for t, x in _json(v)] for v in (r[8], r[9])]
        out.append(ReportFeature(r[0], int(r[1]), r[2], r[3], r[4], r[5], r[6], _json(r[7]), logits[0], logits[1]))
    return out


def report_feature_range(store: Reads, sae_id: str) -> tuple[int, int, int]:
    """(smallest index, largest index, count) of ``sae_id``'s stored features ((0, -1, 0) when none)."""
    lo, hi, n = store.query("select min(feature_index), max(feature_index), count(*) from features where sae_id = ?",
                            [sae_id])[1][0]
    return (0, -1, 0) if not n else (int(lo), int(hi), int(n))


#: A stored context as read, its tokens and activations still JSON text (decoded per feature by
#: :func:`decode_examples`, so a slice of thousands of features holds text, not millions of Python objects).
RawExample = tuple[str, int, int | None, str | None, float | None, Any, Any]


def report_examples(store: Reads, sae_id: str, lo: int, hi: int) -> dict[int, list[RawExample]]:
    """Every stored context of ``sae_id``'s features with index in [lo, hi), per feature, in the order of
    :func:`stored_examples` (top, quantile by bin, random), undecoded: pass a feature's list to
    :func:`decode_examples`."""
    rows = store.query("select feature_index, kind, example_id, quantile, split, max_act, tokens, acts from "
                       "feature_examples where sae_id = ? and feature_index >= ? and feature_index < ? order by "
                       "feature_index, case kind when 'top' then 0 when 'quantile' then 1 else 2 end, quantile desc "
                       "nulls last, max_act desc nulls last, example_id", [sae_id, lo, hi])[1]
    out: dict[int, list[RawExample]] = {}
    for f, k, i, q, s, m, t, a in rows:
        out.setdefault(int(f), []).append((k, int(i), q, s, m, t, a))
    return out


def decode_examples(rows: Sequence[RawExample]) -> list[StoredExample]:
    """:func:`report_examples`' rows of one feature as :class:`StoredExample` (a context whose maximum is 0 gets
    zeros without parsing its activations: most stored contexts are non-activating samples)."""
    import orjson

    def load(v: Any) -> Any:
        return orjson.loads(v) if isinstance(v, str | bytes) else v

    out = []
    for k, i, q, s, m, t, a in rows:
        tokens = list(load(t))
        acts = [0.0] * len(tokens) if m == 0 else list(load(a))
        out.append(StoredExample(k, i, q, s, m, tokens, acts))
    return out


def report_circuits(store: Reads, run_id: str | None = None) -> list[CircuitRecord]:
    """Every stored circuit (or ``run_id``'s), newest first."""
    where, params = ("where run_id = ?", [run_id]) if run_id else ("", [])
    ids = [str(r[0]) for r in store.query(f"select circuit_id from circuits {where} order by created_at desc",
                                          params)[1]]
    return [c for c in (circuit_record(store, i) for i in ids) if c is not None]


def model_spec(store: Reads, model_id: str) -> str | None:
    """The spec model ``model_id`` was loaded from (``models.spec``), if the database recorded it."""
    rows = store.query("select spec from models where model_id = ?", [model_id])[1]
    return str(rows[0][0]) if rows else None


class ReportTrace(NamedTuple):
    trace_id: str
    task: str | None
    p_clean: float | None
    p_corrupted: float | None
    cells: list[tuple[str, int, int, str | None, float | None]]  #: (state, layer, pos, label, normalized)


def report_traces(store: Reads, model_id: str, task: str) -> list[ReportTrace]:
    """The causal traces stored for ``model_id`` on ``task`` (none before the tables existed), newest first."""
    if not has_table(store, "causal_traces"):
        return []
    rows = store.query("select trace_id, task, p_clean, p_corrupted from causal_traces where model_id = ? and "
                       "task = ? order by created_at desc", [model_id, task])[1]
    out = []
    for tid, t, pc, pk in rows:
        cells = store.query("select state, layer, pos, label, normalized from causal_trace_cells where trace_id = ? "
                            "order by state, layer, pos", [tid])[1]
        out.append(ReportTrace(tid, t, pc, pk, [(str(c[0]), int(c[1]), int(c[2]), c[3], c[4]) for c in cells]))
    return out


class ReportFeatureCircuit(NamedTuple):
    """A feature circuit (``feature_circuits``) with its kept nodes and edges."""

    feature_circuit_id: str
    saes: list[str]
    sites: list[str]
    metric: str
    ablation: str
    n_nodes: int | None
    n_nodes_total: int | None
    n_edges: int | None
    faithfulness: float | None
    necessity: float | None
    completeness: float | None
    #: (node, kind, sae_id, feature_index, position, effect) of the kept nodes, largest |effect| first
    nodes: list[tuple[str, str, str | None, int | None, int | None, float | None]]
    edges: list[tuple[str, str, float | None]]  #: (src, dst, weight) of the kept edges


def report_feature_circuits(store: Reads, model_id: str, task: str) -> list[ReportFeatureCircuit] | None:
    """The feature circuits stored for ``model_id`` on ``task``, newest first; None when the file has no
    ``feature_circuits`` table (written before it existed)."""
    if not has_table(store, "feature_circuits"):
        return None
    rows = store.query("select feature_circuit_id, saes, sites, metric, ablation, n_nodes, n_nodes_total, n_edges, "
                       "faithfulness, necessity, completeness from feature_circuits where model_id = ? and task = ? "
                       "order by created_at desc", [model_id, task])[1]
    out = []
    for r in rows:
        nodes = store.query("select node, kind, sae_id, feature_index, position, effect from feature_circuit_nodes "
                            "where feature_circuit_id = ? and in_circuit order by abs(effect) desc nulls last, node",
                            [r[0]])[1]
        edges = store.query("select src, dst, weight from feature_circuit_edges where feature_circuit_id = ? and "
                            "in_circuit order by abs(weight) desc nulls last", [r[0]])[1]
        out.append(ReportFeatureCircuit(str(r[0]), list(r[1]), list(r[2]), r[3], r[4], r[5], r[6], r[7], r[8], r[9],
                                        r[10], [(str(n[0]), str(n[1]), n[2], n[3], n[4], n[5]) for n in nodes],
                                        [(str(e[0]), str(e[1]), e[2]) for e in edges]))
    return out


def report_sae_specs(store: Reads) -> dict[str, KnownSae]:
    """Every SAE the database knows, by sae_id."""
    return {s.sae_id: s for s in known_saes(store)}


# ----------------------------------------------------------------------------- sparse feature circuits
class FeatureCircuitRecord(NamedTuple):
    """One ``feature_circuits`` row, details decoded."""

    feature_circuit_id: str
    run_id: str
    model_id: str
    task: str
    saes: list[str]
    sites: list[str]
    metric: str
    ablation: str
    per_position: bool
    node_threshold: float | None
    edge_threshold: float | None
    n_prompts: int | None
    m_clean: float | None
    m_ablated: float | None
    n_nodes: int | None
    n_edges: int | None
    faithfulness: float | None
    necessity: float | None
    completeness: float | None
    held_out_faithfulness: float | None
    details: dict[str, Any]


def feature_circuit_record(store: Reads, fc_id: str) -> FeatureCircuitRecord | None:
    """A stored feature circuit (None when the id is unknown or the file predates schema 9)."""
    if not has_table(store, "feature_circuits"):
        return None
    rows = store.query("select feature_circuit_id, run_id, model_id, task, saes, sites, metric, ablation, "
                       "per_position, node_threshold, edge_threshold, n_prompts, m_clean, m_ablated, n_nodes, "
                       "n_edges, faithfulness, necessity, completeness, held_out_faithfulness, details "
                       "from feature_circuits where feature_circuit_id = ?", [fc_id])[1]
    if not rows:
        return None
    r = list(rows[0])
    r[4], r[5] = list(r[4] or []), list(r[5] or [])
    r[20] = _json(r[20]) or {}
    return FeatureCircuitRecord(*r)


def feature_circuit_listing(store: Reads) -> list[tuple[str, str, int | None]]:
    """(feature_circuit_id, task, kept nodes) of every stored feature circuit, newest first."""
    if not has_table(store, "feature_circuits"):
        return []
    rows = store.query("select feature_circuit_id, task, n_nodes from feature_circuits order by created_at desc")[1]
    return [(str(i), str(t), n) for i, t, n in rows]


class LabelledNode(NamedTuple):
    """A ``feature_circuit_nodes`` row with its feature's best stored label and scores (None: unlabelled)."""

    node: str
    kind: str
    sae_id: str | None
    feature_index: int | None
    site: str | None
    position: int | None
    effect: float | None
    activation: float | None
    in_circuit: bool
    label: str | None
    correctness: float | None
    completeness: float | None
    succinctness: float | None
    density: float | None


def feature_circuit_nodes(store: Reads, fc_id: str, *, kept_only: bool = True) -> list[LabelledNode]:
    """The nodes of a feature circuit, largest |effect| first, each feature joined to its best explanation
    (``best_explanations``, the final one first, then the best overall, across judges) and to ``features``."""
    if not has_table(store, "feature_circuit_nodes"):
        return []
    rows = store.query(
        "with b as (select target, text, correctness, completeness, succinctness, row_number() over ("
        "partition by target order by is_final desc, overall desc nulls last, correctness desc nulls last) as rk "
        "from best_explanations) "
        "select n.node, n.kind, n.sae_id, n.feature_index, n.site, n.position, n.effect, n.activation, "
        "n.in_circuit, b.text, b.correctness, b.completeness, b.succinctness, f.density "
        "from feature_circuit_nodes n "
        "left join b on b.rk = 1 and b.target = n.sae_id || '#' || cast(n.feature_index as varchar) "
        "left join features f on f.sae_id = n.sae_id and f.feature_index = n.feature_index "
        "where n.feature_circuit_id = ?" + (" and n.in_circuit" if kept_only else "") +
        " order by abs(n.effect) desc nulls last, n.node", [fc_id])[1]
    return [LabelledNode(*r) for r in rows]


def feature_circuit_edges(store: Reads, fc_id: str, *, kept_only: bool = True) -> list[tuple[str, str, float | None,
                                                                                              bool]]:
    """(src, dst, weight, in_circuit) of a feature circuit's edges, largest |weight| first."""
    if not has_table(store, "feature_circuit_edges"):
        return []
    rows = store.query("select src, dst, weight, in_circuit from feature_circuit_edges where feature_circuit_id = ?"
                       + (" and in_circuit" if kept_only else "") + " order by abs(weight) desc nulls last, src, dst",
                       [fc_id])[1]
    return [(str(s), str(d), w, bool(k)) for s, d, w, k in rows]


def report_feature_saes(store: Reads) -> list[str]:
    """Every sae_id with harvested features (an SAE harvested by a run that never recorded it in ``saes`` too)."""
    return [str(r[0]) for r in store.query("select distinct sae_id from features order by 1")[1]]


# ----------------------------------------------------------------------------- MCP server (agent/mcp_server.py)
def labelled_features(store: Reads, limit: int = 500) -> list[tuple[str, int, str]]:
    """(sae_id, feature index, final label) of the features of known SAEs that have a final label, newest first,
    at most ``limit``."""
    rows = store.query("select s.sae_id, e.target, e.text from explanations e join saes s on starts_with(e.target, "
                       "s.sae_id || '#') where e.is_final order by e.created_at desc, e.target limit ?", [limit])[1]
    return [(str(sae_id), int(str(target).rpartition("#")[2]), str(text)) for sae_id, target, text in rows]


def statement_types(sql: str) -> list[str]:
    """The kind of each statement in ``sql`` by DuckDB's own parser (``SELECT``, ``INSERT``, ``CREATE``, ``SET``,
    ``COPY``, ``ATTACH``, ...), read without opening any database; SELECT covers WITH, FROM-first, VALUES, SHOW,
    DESCRIBE and SUMMARIZE. A parse error is one :class:`~autoexplain.tools.errors.InputError` line."""
    import duckdb

    from autoexplain.tools.errors import InputError

    con = duckdb.connect(":memory:")
    try:
        return [s.type.name for s in con.extract_statements(sql)]
    except duckdb.Error as exc:
        raise InputError(f"query failed: {str(exc).strip().splitlines()[0]}") from None
    finally:
        con.close()


def sae_widths(store: Reads) -> dict[str, int]:
    """d_sae of every SAE the database knows, by sae_id."""
    rows = store.query("select sae_id, d_sae from saes")[1] if has_table(store, "saes") else []
    return {str(i): int(w) for i, w in rows if w is not None}


def targets_labelled_elsewhere(store: Store, targets: Sequence[str], run_id: str) -> set[str]:
    """The features among ``targets`` (``SAE_ID#INDEX``) with a final label written by another run than
    ``run_id`` (a feature circuit's labels on demand: what was stored before the run started)."""
    if not targets:
        return set()
    rows = store.query("select distinct target from explanations where is_final and run_id <> ? and target in "
                       f"({', '.join('?' for _ in targets)})", [run_id, *targets])[1]
    return {str(t) for (t,) in rows}


def final_labels_of(store: Store, targets: Sequence[str]) -> dict[str, tuple[str, float | None]]:
    """target -> (final label, its best correctness), the newest final label of each of ``targets``."""
    if not targets:
        return {}
    rows = store.query(
        "select e.target, e.text, max(b.correctness) from explanations e left join best_explanations b "
        "using (explanation_id) where e.is_final and e.target in "
        f"({', '.join('?' for _ in targets)}) group by e.target, e.text, e.created_at order by e.created_at desc",
        list(targets))[1]
    out: dict[str, tuple[str, float | None]] = {}
    for target, text, corr in rows:
        out.setdefault(str(target), (str(text), None if corr is None else float(corr)))
    return out


def fold_wal(store: Store) -> None:
    """DuckDB's ``CHECKPOINT``: the write-ahead log folded into the database file (before copying the file)."""
    store.query("checkpoint")


def sae_architectures(store: Reads) -> dict[str, str]:
    """The sae-lens architecture of every SAE the database knows (``standard``, ``topk``, ``transcoder`` …), by
    sae_id."""
    rows = store.query("select sae_id, architecture from saes")[1] if has_table(store, "saes") else []
    return {str(i): str(a) for i, a in rows if a is not None}
