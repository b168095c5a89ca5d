"""Where a harvest's results go: the store, tagged with the run, each example with its held-out split."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from autoexplain.agent.store.db import Store


def harvest_sink(store: Store, run_id: str) -> Callable[[str, list[dict[str, Any]]], None]:
    """Where a harvest's rows go: the store, tagged with ``run_id``; examples get their held-out split as they
    are written (:func:`autoexplain.evals.features.with_split`), so labelling never rewrites them."""
    from autoexplain.evals.features import with_split

    def sink(table: str, rows: list[dict[str, Any]]) -> None:
        if table == "feature_examples":
            rows = with_split(rows)
        store.upsert(table, [{**r, "run_id": run_id} for r in rows])

    return sink
