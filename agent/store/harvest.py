"""Where a harvest's results go: rows of the ``features`` and ``feature_examples`` tables.

:func:`autoexplain.tools.harvest.harvest` hands its :class:`~autoexplain.tools.harvest.HarvestResult` (domain
values: :class:`~autoexplain.tools.harvest.FeatureStats`, :class:`~autoexplain.tools.harvest.FeatureExample`) to
a sink; this module is the one place that turns them into rows. The run's sink, :func:`harvest_sink`, tags every
row with the run and gives each example its held-out split as it is written
(:func:`autoexplain.agent.store.rows.with_split`), so labelling never rewrites them.

Which harvest
-------------
Every row records its ``harvest_id``, and the ``harvests`` table what each harvest was run on (model, SAE, dataset
identity, token budget, window length) and any note (a dataset far smaller than asked). An SAE holds the rows of
one harvest at a time: storing a new one replaces the old one's rows in the same transaction (its ``harvests`` row
stays, as history), so rows of two harvests never mix. :func:`reuse_decision` is how a run decides whether the
stored rows fit what it asks for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import duckdb

from autoexplain.tools.errors import InputError

if TYPE_CHECKING:
    from autoexplain.agent.store.db import Store
    from autoexplain.agent.store.schema import FeatureExampleRow, FeatureRow, HarvestRow
    from autoexplain.tools.harvest import (
        ExampleColumns,
        FeatureExample,
        FeatureStats,
        HarvestIdentity,
        HarvestResult,
        HarvestSink,
    )

#: DuckDB's memory limit while a harvest is written (see :func:`harvest_sink`); the rows spill to its temporary
#: files beyond it. A 98,304-feature harvest of 50k tokens peaked at 3,199 MB with 512 MB, 3,026 MB with 256 MB.
WRITE_MEMORY_LIMIT = "256MB"
#: Writes rows to a table: ``Store.upsert`` or anything shaped like it.
TableWriter = Callable[[str, list[dict[str, Any]]], object]


def feature_row(s: FeatureStats) -> FeatureRow:
    """The ``features`` row of one feature's statistics."""
    return {
        "sae_id": s.feature.sae_id, "feature_index": s.feature.index, "density": s.density, "max_act": s.max_act,
        "mean_act": s.mean_act, "n_tokens": s.n_tokens, "is_dead": s.is_dead,
        "histogram": {"edges": list(s.hist_edges), "counts": s.hist_counts},
        "top_logits": None if s.top_logits is None else [[t, v] for t, v in s.top_logits],
        "bottom_logits": None if s.bottom_logits is None else [[t, v] for t, v in s.bottom_logits],
    }


def example_row(e: FeatureExample) -> FeatureExampleRow:
    """The ``feature_examples`` row of one example (without ``split``: see :func:`harvest_sink`)."""
    return {
        "sae_id": e.feature.sae_id, "feature_index": e.feature.index, "kind": e.kind.value,
        "example_id": e.example_id, "quantile": e.quantile, "tokens": e.tokens, "acts": e.acts,
        "max_act": e.max_act, "window_index": e.window_index,
    }


def rows_sink(write: TableWriter, *, run_id: str | None = None, split: bool = False) -> HarvestSink:
    """A harvest sink that writes the result's rows with ``write(table, rows)``, chunk by chunk
    (:attr:`~autoexplain.tools.harvest.HarvestResult.chunks`): each chunk's features, then its examples. ``write``
    is called several times per table; no more than one chunk's rows exist at once.

    ``run_id`` tags every row with the run; ``split`` fills in each example's held-out split (chunks are
    feature-complete, so the split of a feature sees all its examples, as :func:`with_split` needs).
    """

    def tagged(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        return list(rows) if run_id is None else [{**r, "run_id": run_id} for r in rows]

    def sink(result: HarvestResult) -> None:
        for chunk in result.chunks:
            write("features", tagged([dict(feature_row(s)) for s in chunk.features]))
            examples: list[dict[str, Any]] = [dict(example_row(e)) for e in chunk.examples]
            if split:
                from autoexplain.agent.store.rows import with_split

                examples = with_split(examples)
            if examples:
                write("feature_examples", tagged(examples))

    return sink


def harvest_row(result: HarvestResult, run_id: str | None) -> HarvestRow:
    """The ``harvests`` row of a finished harvest."""
    from autoexplain.agent.store.rows import utc_now

    inputs = dict(result.inputs or {})
    data = inputs.get("dataset") or {}
    return {"harvest_id": result.harvest_id, "sae_id": result.sae_id, "model_id": inputs.get("model"),
            "dataset": data.get("path") or data.get("hub"), "inputs": inputs, "n_tokens": result.n_tokens,
            "n_windows": result.n_windows, "note": result.note, "run_id": run_id, "created_at": utc_now()}


def harvest_sink(store: Store, run_id: str) -> HarvestSink:
    """Where a run's harvest goes: the store, in one transaction — its ``harvests`` row, then its features and
    examples (every row tagged with ``run_id`` and the harvest, every example with its held-out split:
    :func:`autoexplain.agent.store.rows.with_split`), replacing the rows an earlier harvest of the SAE left.

    The rows are assembled and written chunk by chunk inside that one transaction (:func:`rows_sink`), so memory
    stays bounded however many examples there are, and a crash or error part-way rolls everything back: the store
    holds the whole new harvest or, untouched, the old one."""

    def sink(result: HarvestResult) -> None:
        with store.transaction() as con:
            # DuckDB keeps an open transaction's rows and primary-key index in memory up to its memory limit (80%
            # of RAM by default): about 0.5 GB per million example rows. Capped here, it spills them to its
            # temporary files instead (measured: same speed). The store sets no limit of its own, so the default is
            # what RESET gives back; if the transaction was aborted by an error the RESET may fail, and the cap
            # then lasts until the connection closes.
            con.execute(f"set memory_limit = '{WRITE_MEMORY_LIMIT}'")
            try:
                _write(con, result)
            finally:
                with contextlib.suppress(duckdb.Error):
                    con.execute("reset memory_limit")

    def _write(con: duckdb.DuckDBPyConnection, result: HarvestResult) -> None:
        for table in ("feature_examples", "features"):  # every stored row of the SAE (this harvest's too: a re-run
            con.execute(f"delete from {table} where sae_id = ?", [result.sae_id])  # writes them again, whole)
        if result.harvest_id:
            store.upsert("harvests", [harvest_row(result, run_id)], con=con)
        tag = {"run_id": run_id, "harvest_id": result.harvest_id or None}
        for chunk in result.chunks:
            # the SAE's rows were deleted above, so every key is new: plain bulk inserts (see Store.insert_new)
            store.insert_new("features", [{**feature_row(s), **tag} for s in chunk.features], con=con)
            if len(chunk.columns):
                arrow_rows = examples_table(chunk.columns, **tag)  # noqa: F841 (scanned by name)
                con.execute("insert into feature_examples by name select * from arrow_rows")

    return sink


def examples_table(examples: ExampleColumns, *, run_id: str | None, harvest_id: str | None) -> Any:
    """The ``feature_examples`` rows of a feature-complete chunk's examples as one Arrow table, each with its
    held-out split (:func:`~autoexplain.evals.features.split_sides`, per feature, as
    :func:`autoexplain.agent.store.rows.with_split` gives it) and tagged with ``run_id`` and ``harvest_id``.

    Column by column, with no object or dict per row: the same values, JSON text included (orjson, as ``Store``
    writes JSON columns), as :func:`example_row` + ``with_split`` + ``Store.insert_new`` (tested) — several times
    faster for the million-row harvests of a wide SAE."""
    import orjson
    import pyarrow as pa

    from autoexplain.evals.features import SplitKey, split_sides

    e = examples
    n = len(e)
    kinds = [k.value for k in e.kind]
    by_feature: dict[tuple[str, int], list[int]] = {}
    for i, ref in enumerate(e.refs):
        by_feature.setdefault((ref.sae_id, ref.index), []).append(i)
    split = [""] * n
    for (sae_id, f), idx in by_feature.items():
        keys = [SplitKey(kinds[i], e.example_id[i], e.quantile[i], tuple(e.tokens[i]), e.window_index[i],
                         kinds[i] != "random" and e.max_act[i] > 0) for i in idx]
        for i, side in zip(idx, split_sides(keys, sae_id, f), strict=True):
            split[i] = side
    dumps = orjson.dumps
    return pa.table({
        "sae_id": pa.array([r.sae_id for r in e.refs], pa.string()),
        "feature_index": pa.array([r.index for r in e.refs], pa.int64()),
        "kind": pa.array(kinds, pa.string()),
        "example_id": pa.array(e.example_id, pa.int64()),
        "quantile": pa.array(e.quantile, pa.int64()),
        "split": pa.array(split, pa.string()),
        "tokens": pa.array([dumps(t).decode() for t in e.tokens], pa.string()),
        "acts": pa.array([dumps(a).decode() for a in e.acts], pa.string()),
        "max_act": pa.array(e.max_act, pa.float64()),
        "window_index": pa.array(e.window_index, pa.int64()),
        "run_id": pa.array([run_id] * n, pa.string()),
        "harvest_id": pa.array([harvest_id] * n, pa.string()),
    })


def reuse_decision(store: Store, identity: HarvestIdentity, *, sae_spec: str, d_sae: int) -> str | None:
    """Whether a run may reuse the stored harvest of ``identity``'s SAE: ``"reuse"`` when the stored rows come from
    a harvest with the same inputs (model, SAE, dataset identity, token budget, window length), ``None`` when the
    SAE has no complete harvest yet (harvest it). Stored rows from other inputs are refused with one line that says
    how to choose, never silently reused.

    Rows whose harvest is not recorded (written by an autoexplain before schema version 6, or straight through
    :func:`rows_sink`) have unknown inputs: they are reused, and the answer is a note saying so (the runner stores
    it in the run's summary and the CLI prints it), so the reuse is visible rather than silent.
    """
    from autoexplain.agent.store import queries

    sae_id = identity.inputs["sae"]
    stored = queries.stored_harvest(store, sae_id)
    if stored is None or stored.n_features < d_sae:
        return None
    if stored.inputs == identity.inputs:
        return "reuse"
    asked = identity.inputs
    if stored.inputs is None:
        return (f"SAE {sae_spec}: reused stored features whose harvest inputs were not recorded (an older "
                "autoexplain); their dataset and token budget are unknown: run autoexplain harvest to replace them")
    else:
        data = stored.inputs.get("dataset") or {}
        now = asked["dataset"] or {}
        # the same path whose recorded identity (size, modification time) differs: the file was changed since;
        # the same file asked with another token budget or ctx is not a changed file
        changed = " (the file changed since)" if data.get("path") and data.get("path") == now.get("path") \
            and data != now else ""
        what = (f"from {data.get('path') or data.get('hub')!r}{changed} with {stored.inputs.get('n_tokens'):,} "
                f"tokens asked and ctx {stored.inputs.get('ctx')}")
    data = asked["dataset"]
    raise InputError(
        f"SAE {sae_spec} is already harvested in this database {what}, but this run asks for "
        f"{data.get('path') or data.get('hub')!r} with {asked['n_tokens']:,} tokens and ctx {asked['ctx']}: to "
        f"label from the new data, first run autoexplain harvest --sae {sae_spec} --dataset ... --tokens "
        f"{asked['n_tokens']} --ctx {asked['ctx']} on this database (it replaces the stored harvest), or pass "
        "another --db; to reuse the stored harvest, ask for its dataset and tokens")
