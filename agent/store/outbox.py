"""Group commit: the rows a run's work items produce, held in memory and written to DuckDB a group at a time.

Why
---
An agent step writes a handful of small rows (a tool call, a hypothesis, a draft, its scores). Committed one step
at a time that was ~7 DuckDB transactions per labelled feature at ~8 ms each on a 2-core machine: half the run time
of the offline policy went into commits. Here the rows wait in an :class:`Outbox`, one bucket per work item, and
the buckets of finished items are written in one transaction per group: every ``GroupCommit.seconds`` or
``GroupCommit.items`` finished items, when the current step ends if a reader has announced itself
(``autoexplain sql`` mid-run), and at the end of the run. An item's rows land together, so a query never sees half an
item (while an item runs, its
``work_items`` row says ``pending``).

Why nothing is lost
-------------------
Rows that are not committed yet still have to survive a ``kill -9``. They do, because they also travel in the
item's langgraph checkpoint: after each node, :meth:`Outbox.take_step` hands the rows that node wrote to the graph,
which stores them in the state's ``outbox`` channel of the checkpoint it writes synchronously (the SQLite
checkpointer). Every checkpointed node's rows are therefore in DuckDB or in that checkpoint. ``--resume`` reads an
unfinished item's checkpoint history and puts its rows back (:meth:`Outbox.replay`) before the item goes on; an
item whose last checkpoint is finished but whose rows were never committed is recovered from its checkpoints, not
run again. Once a commit holds everything an item wrote, the item's checkpoints are deleted (the checkpoint file
stays small on overnight runs).

Rows are upserts keyed by each table's primary key (``Store.upsert``); rows for one key are merged column by
column, later values winning, so a draft written by ``propose``, given its judge by ``score`` and marked final by
``accept`` becomes one row. While rows wait, :meth:`Outbox.get` answers reads of them (the tool cache, circuit
scoring), so a run always sees its own writes.

Written at once, not grouped: LLM calls and responses (``llm_calls``, ``llm_cache``: an LLM call costs far more
than a commit, and its record must survive a crash inside the node that made it), and the result of any tool call
that took longer than ``GroupCommit.cache_now_s`` to compute (a long forward pass or circuit search is never
computed twice, even when the crash comes later in the same step).

A file another process keeps locked
-----------------------------------
A writer waits for announced readers however long their query runs (:func:`autoexplain.agent.store.db.open_connection`).
Should the file still stay locked past the store's timeout (a process that did not announce itself), a group commit
made mid-run (:meth:`Outbox.try_flush`) keeps its rows and is tried again a few seconds later: no item is charged
with it and the run goes on. Only the run's last commit (:meth:`Outbox.flush`) raises, and then the checkpoints still
hold every row for ``--resume``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from autoexplain.agent.store import Store, merge_rows, readers_waiting
from autoexplain.agent.store.db import StoreBusy
from autoexplain.agent.store.schema import Row


class GroupCommit(BaseModel):
    """When the rows of finished items are committed: whichever comes first."""

    model_config = ConfigDict(extra="forbid")

    seconds: float = Field(default=30.0, gt=0, description="at most this long after the oldest finished item (a "
                           "reader announcing itself gets a commit when the current step ends)")
    items: int = Field(default=1000, ge=1, description="after this many finished items")
    cache_now_s: float = Field(default=1.0, ge=0, description="tool results that took longer are written at once")


class Outbox:
    """Rows waiting for the next group commit, one bucket per work item, merged by primary key.

    A drop-in writer for ``Store.upsert`` / ``upsert_many``. Rows go to the bucket of the item :meth:`begin`
    named; :meth:`flush` commits the buckets of items :meth:`finished` (never half an item, so a reader sees each
    item whole or not at all). ``keep_rejected=False`` drops the per-example ``judgements`` of drafts the agent
    did not choose when their item is committed (their ``scores`` stay): most of the rows a run writes.
    """

    def __init__(self, store: Store, policy: GroupCommit | None = None, *, keep_rejected: bool = False) -> None:
        self.store = store
        self.policy = policy or GroupCommit()
        self.keep_rejected = keep_rejected
        self._buckets: dict[str | None, dict[str, dict[tuple[Any, ...], dict[str, Any]]]] = {}
        self._current: str | None = None
        self._step: list[dict[str, Any]] = []  # rows since the last take_step, in order
        self._done: list[str | None] = []  # finished items' buckets, oldest first
        self._since: float | None = None  # when the oldest finished bucket finished
        self._lock = threading.RLock()
        self.commits = 0  # group commits made (reports, tests)
        self.deferred = 0  # group commits put off because another process kept the file locked
        self._retry_at = 0.0  # after a deferred commit: not due again before this (monotonic seconds)

    # -- writing ---------------------------------------------------------------------------------------
    def begin(self, item_id: str | None) -> None:
        """Rows from now on belong to ``item_id`` (None: the run's own rows, committed with the next group).

        Rows no node took for its checkpoint (a node that raised) stay in their item's bucket but do not travel
        with the next item's checkpoints."""
        with self._lock:
            self._current = item_id
            self._buckets.setdefault(item_id, {})
            self._step = []

    def upsert(self, table: str, rows: Sequence[Row], *, step: bool = True) -> int:
        """Hold ``rows`` for ``table`` (merged with waiting rows of the same key); return how many.

        ``step=False``: rows that need not travel with the current node's checkpoint (the runner's own bookkeeping,
        rows put back from a checkpoint).
        """
        rows = [dict(r) for r in rows]
        with self._lock:
            merge_rows(self._buckets.setdefault(self._current, {}).setdefault(table, {}), table, rows)
            if rows and step:
                self._step.append({"table": table, "rows": rows})
        return len(rows)

    def upsert_many(self, tables: Mapping[str, Sequence[Row]]) -> None:
        for table, rows in tables.items():
            self.upsert(table, rows)

    def get(self, table: str, key: tuple[Any, ...]) -> dict[str, Any] | None:
        """The waiting row of ``table`` with primary key ``key`` (the current item's first), or None."""
        with self._lock:
            for bucket in (self._buckets.get(self._current, {}), *self._buckets.values()):
                row = bucket.get(table, {}).get(key)
                if row is not None:
                    return dict(row)
        return None

    # -- checkpoints -----------------------------------------------------------------------------------
    def take_step(self) -> list[dict[str, Any]]:
        """The rows written since the last call, as ``[{"table", "rows"}]``: what a node's checkpoint carries."""
        with self._lock:
            out, self._step = self._step, []
        return out

    def replay(self, entries: Iterable[dict[str, Any]]) -> int:
        """Put back rows a checkpoint carried (oldest first) into the current item's bucket; return how many."""
        return sum(self.upsert(e["table"], e["rows"], step=False) for e in entries)

    # -- committing -------------------------------------------------------------------------------------
    def finished(self, item_id: str | None) -> None:
        """``item_id`` wrote its last row: its bucket goes with the next commit."""
        with self._lock:
            if item_id not in self._done:
                self._done.append(item_id)
            if self._since is None:
                self._since = time.monotonic()

    def due(self) -> bool:
        """Whether a group commit is due: enough finished items, the oldest one old enough, or a reader waiting."""
        with self._lock:
            if not self._done or time.monotonic() < self._retry_at:
                return False
            if len(self._done) >= self.policy.items:
                return True
            if self._since is not None and time.monotonic() - self._since >= self.policy.seconds:
                return True
        return readers_waiting(self.store.path)

    def flush(self) -> list[str]:
        """Commit the finished items' rows (and the run's own) in one transaction; return those items' ids.

        On an error nothing is committed and the rows stay waiting (the checkpoints still hold them).
        """
        with self._lock:
            ids = [i for i in dict.fromkeys([*self._done, None]) if i in self._buckets]
            tables: dict[str, list[dict[str, Any]]] = {}
            for i in ids:
                for table, rows in self._rows_to_commit(self._buckets[i]).items():
                    tables.setdefault(table, []).extend(rows)
            if tables:
                self.store.upsert_many(tables)
                self.commits += 1
            for i in ids:
                if i != self._current:
                    del self._buckets[i]
                else:
                    self._buckets[i] = {}
            self._done.clear()
            self._since = None
        return [i for i in ids if i is not None]

    #: Seconds a deferred group commit waits before it is tried again.
    RETRY_S = 5.0

    def try_flush(self) -> list[str]:
        """:meth:`flush`, except that a file another process keeps locked past the store's timeout
        (:class:`~autoexplain.agent.store.db.StoreBusy`) defers the commit: the rows stay waiting (and in the
        checkpoints), :meth:`due` says so again after :data:`RETRY_S`, and ``[]`` is returned."""
        try:
            return self.flush()
        except StoreBusy:
            with self._lock:
                self.deferred += 1
                self._retry_at = time.monotonic() + self.RETRY_S
            return []

    def _rows_to_commit(self, bucket: dict[str, dict[tuple[Any, ...], dict[str, Any]]]
                        ) -> dict[str, list[dict[str, Any]]]:
        out = {t: list(rows.values()) for t, rows in bucket.items() if rows}
        if not self.keep_rejected and out.get("judgement_sets"):
            rejected = {r["explanation_id"] for r in out.get("explanations", []) if r.get("is_final") is False}
            out["judgement_sets"] = [r for r in out["judgement_sets"] if r["explanation_id"] not in rejected]
        return out
