"""Where a harvest's results go: rows of the ``features`` and ``feature_examples`` tables.

:func:`autoexplain.tools.harvest.harvest` hands its :class:`~autoexplain.tools.harvest.HarvestResult` (domain
values: :class:`~autoexplain.tools.harvest.FeatureStats`, :class:`~autoexplain.tools.harvest.FeatureExample`) to
a sink; this module is the one place that turns them into rows. The run's sink, :func:`harvest_sink`, tags every
row with the run and gives each example its held-out split as it is written
(:func:`autoexplain.agent.store.rows.with_split`), so labelling never rewrites them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from autoexplain.agent.store.db import Store
    from autoexplain.agent.store.schema import FeatureExampleRow, FeatureRow
    from autoexplain.tools.harvest import FeatureExample, FeatureStats, HarvestResult, HarvestSink

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
    """A harvest sink that writes the result's rows with ``write(table, rows)``: features first, then examples.

    ``run_id`` tags every row with the run; ``split`` fills in each example's held-out split.
    """

    def tagged(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        return list(rows) if run_id is None else [{**r, "run_id": run_id} for r in rows]

    def sink(result: HarvestResult) -> None:
        write("features", tagged([dict(feature_row(s)) for s in result.features]))
        examples: list[dict[str, Any]] = [dict(example_row(e)) for e in result.examples]
        if split:
            from autoexplain.agent.store.rows import with_split

            examples = with_split(examples)
        write("feature_examples", tagged(examples))

    return sink


def harvest_sink(store: Store, run_id: str) -> HarvestSink:
    """Where a run's harvest goes: the store, every row tagged with ``run_id``, every example with its held-out
    split (:func:`autoexplain.agent.store.rows.with_split`)."""
    return rows_sink(store.upsert, run_id=run_id, split=True)
