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
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import duckdb

from autoexplain.tools.errors import InputError
from autoexplain.tools.prefetch import prefetch

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
#: files beyond it. A 98,304-feature harvest of 50k tokens peaked at 3,199 MB with 512 MB, 3,026 MB with 256 MB;
#: 128 MB fails (the open transaction's primary-key index must stay in memory: about 350 MB for its 4.6 M rows, the
#: one part of a harvest's memory that still grows with the SAE's width).
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
            con.execute("set threads = 1")  # measured at 98,304 features: 70 MB less and no slower
            try:
                _write(con, result)
            finally:
                with contextlib.suppress(duckdb.Error):
                    con.execute("reset memory_limit")
                    con.execute("reset threads")

    def _write(con: duckdb.DuckDBPyConnection, result: HarvestResult) -> None:
        for table in ("feature_examples", "features"):  # every stored row of the SAE (this harvest's too: a re-run
            con.execute(f"delete from {table} where sae_id = ?", [result.sae_id])  # writes them again, whole)
        if result.harvest_id:
            store.upsert("harvests", [harvest_row(result, run_id)], con=con)
        tag = {"run_id": run_id, "harvest_id": result.harvest_id or None}
        # the Arrow tables of the next chunk are built in a background thread (numpy and Arrow, mostly outside the
        # GIL) while DuckDB inserts this one's (outside the GIL too); the chunks themselves are assembled one
        # step further ahead (HarvestResult.chunks)
        for features, examples in prefetch(_tables(result, tag), depth=1, name="harvest-tables"):
            # the SAE's rows were deleted above, so every key is new: plain bulk inserts (see Store.insert_new);
            # DuckDB scans each Arrow table by its variable name (measured: con.register held GBs instead)
            arrow_rows = features
            con.execute("insert into features by name select * from arrow_rows")
            if examples is not None:
                arrow_rows = examples  # noqa: F841
                con.execute("insert into feature_examples by name select * from arrow_rows")

    return sink


def _tables(result: HarvestResult, tag: dict[str, Any]) -> Iterator[tuple[Any, Any | None]]:
    """Per chunk of ``result``: its ``features`` and ``feature_examples`` rows as Arrow tables (None: no
    examples), tagged with ``tag`` (run and harvest)."""
    vocab_json: dict[int, Any] = {}  # one per vocabulary (every chunk of a harvest shares one)
    for chunk in result.chunks:
        cols = chunk.columns
        examples = None
        if len(cols):
            if id(cols.vocab) not in vocab_json:
                vocab_json[id(cols.vocab)] = token_json(cols.vocab)
            examples = examples_table(cols, vocab_json=vocab_json[id(cols.vocab)], **tag)
        yield features_table(chunk.features, **tag), examples


def features_table(stats: Sequence[FeatureStats], *, run_id: str | None, harvest_id: str | None) -> Any:
    """The ``features`` rows of a chunk's statistics as one Arrow table tagged with ``run_id`` and ``harvest_id``:
    the values and JSON texts of :func:`feature_row` + ``Store.insert_new`` (tested), without a dict per row."""
    import orjson
    import pyarrow as pa

    opts = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY

    def text(value: Any) -> str | None:
        return None if value is None else orjson.dumps(value, option=opts).decode()

    n = len(stats)
    return pa.table({
        "sae_id": pa.array([s.feature.sae_id for s in stats], pa.string()),
        "feature_index": pa.array([s.feature.index for s in stats], pa.int64()),
        "density": pa.array([s.density for s in stats], pa.float64()),
        "max_act": pa.array([s.max_act for s in stats], pa.float64()),
        "mean_act": pa.array([s.mean_act for s in stats], pa.float64()),
        "n_tokens": pa.array([s.n_tokens for s in stats], pa.int64()),
        "is_dead": pa.array([s.is_dead for s in stats], pa.bool_()),
        "histogram": pa.array([text({"edges": list(s.hist_edges), "counts": s.hist_counts}) for s in stats],
                              pa.string()),
        "top_logits": pa.array([text(s.top_logits) for s in stats], pa.string()),
        "bottom_logits": pa.array([text(s.bottom_logits) for s in stats], pa.string()),
        "run_id": pa.array([run_id] * n, pa.string()),
        "harvest_id": pa.array([harvest_id] * n, pa.string()),
    })


def examples_table(examples: ExampleColumns, *, run_id: str | None, harvest_id: str | None,
                   vocab_json: Any | None = None) -> Any:
    """The ``feature_examples`` rows of a feature-complete chunk's examples as one Arrow table, each with its
    held-out split (:func:`~autoexplain.evals.features.split_explain_mask`: the same sides
    :func:`autoexplain.agent.store.rows.with_split` gives, feature by feature) and tagged with ``run_id`` and
    ``harvest_id``.

    Column by column, with no Python work per row or per token: the JSON texts of ``tokens`` and ``acts`` are
    joined by Arrow from the JSON text of each distinct token (``vocab_json``: :func:`token_json` of the
    harvest's vocabulary, made once per harvest) and of each distinct activation value (orjson, as ``Store``
    writes JSON columns) — the same text, byte for byte, as :func:`example_row` + ``with_split`` +
    ``Store.insert_new`` (tested)."""
    import numpy as np
    import orjson
    import pyarrow as pa
    import pyarrow.compute as pc

    from autoexplain.evals.features import KIND_CODES, mix64, split_explain_mask
    from autoexplain.tools.harvest import EXAMPLE_KINDS

    e = examples
    n = len(e)
    kind_names = np.array([k.value for k in EXAMPLE_KINDS], dtype=object)
    codes = np.array([KIND_CODES[k] for k in kind_names], dtype=np.int64)[e.kind]
    lengths = np.diff(e.offsets)
    within = np.arange(len(e.token_ids)) - np.repeat(e.offsets[:-1], lengths)
    # equal token-string sequences get equal ids (the split keeps identical texts on one side): a 64-bit hash of
    # each example's canonical token ids by position; two texts sharing a hash by chance would only be kept on one
    # side together (the safe direction), at odds of about n^2 / 2^64
    with np.errstate(over="ignore"):
        term = mix64(e.vocab_canon[e.token_ids].astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
                     + within.astype(np.uint64))
        text = (mix64(np.add.reduceat(term, e.offsets[:-1]) ^ lengths.astype(np.uint64)).view(np.int64)
                if n else np.zeros(0, np.int64))
    explain = split_explain_mask(e.sae_id, e.feature, kind=codes, example_id=e.example_id, quantile=e.quantile,
                                 text=text, window=e.window_index,
                                 activating=(codes != KIND_CODES["random"]) & (e.max_act > 0))
    offsets = pa.array(e.offsets, pa.int64())
    tokens_json = vocab_json if vocab_json is not None else token_json(e.vocab)
    # distinct activation values by their bits (so -0.0 keeps its sign, as orjson writes it); most are +0.0
    bits = e.acts.view(np.int64)
    nonzero = bits != 0
    distinct, inverse = np.unique(bits[nonzero], return_inverse=True)
    act_index = np.zeros(len(bits), dtype=np.int64)  # 0: "0.0"
    act_index[nonzero] = inverse.reshape(-1) + 1
    act_text = pa.array(["0.0"] + [orjson.dumps(v).decode() for v in distinct.view(np.float64).tolist()],
                        pa.string())
    def json_lists(values: Any) -> Any:
        joined = pc.binary_join(pa.LargeListArray.from_arrays(offsets, values), ",")
        text = pc.binary_join_element_wise("[", joined, "]", "")
        # typed as JSON for DuckDB, which then stores the text as it is instead of parsing each one to check it
        # (about 15 % of the insert; the texts are orjson's, joined: valid by construction, and tested); pyarrow
        # before 19 has no JSON type: plain text, which DuckDB checks
        json_type = getattr(pa, "json_", None)
        return text.cast(json_type(text.type)) if json_type is not None else text

    return pa.table({
        "sae_id": pa.array([e.sae_id] * n, pa.string()),
        "feature_index": pa.array(e.feature, pa.int64()),
        "kind": pa.array(kind_names[e.kind].tolist(), pa.string()),
        "example_id": pa.array(e.example_id, pa.int64()),
        "quantile": pa.array(e.quantile, pa.int64(), mask=e.quantile < 0),
        "split": pa.array(np.where(explain, "explain", "score").tolist(), pa.string()),
        "tokens": json_lists(tokens_json.take(pa.array(e.token_ids))),
        "acts": json_lists(act_text.take(pa.array(act_index))),
        "max_act": pa.array(e.max_act, pa.float64()),
        "window_index": pa.array(e.window_index, pa.int64()),
        "run_id": pa.array([run_id] * n, pa.string()),
        "harvest_id": pa.array([harvest_id] * n, pa.string()),
    })


def token_json(vocab: Sequence[str]) -> Any:
    """Each token's JSON text (orjson, as ``Store`` writes JSON), as an Arrow string array indexed by token id."""
    import orjson
    import pyarrow as pa

    return pa.array([orjson.dumps(t).decode() for t in vocab], pa.string())


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
