"""The DuckDB store: the only code that knows table and column names.

* :mod:`~autoexplain.agent.store.schema` — one declaration per table (DDL, keys, JSON columns and row types derive
  from it); :mod:`~autoexplain.agent.store.migrations` — the history that brings older files to it.
* :mod:`~autoexplain.agent.store.db` — connections, the lock dance with readers, upserts (:class:`Store`).
* :mod:`~autoexplain.agent.store.rows` — domain results (feature statistics, scored edges, scores, judgements)
  turned into rows; :mod:`~autoexplain.agent.store.queries` — every read the rest of the code makes.
* :mod:`~autoexplain.agent.store.outbox` — group commit; :mod:`~autoexplain.agent.store.caches` — the tool cache,
  the LLM response cache and the ``llm_calls`` log.

It imports ``tools`` and ``evals`` (whose results it stores) and nothing else of ``agent``.
"""

from autoexplain.agent.store.db import (
    DEFAULT_DB_ENV,
    DEFAULT_DB_NAME,
    Store,
    announce_reader,
    connect,
    default_db_path,
    merge_rows,
    open_connection,
    readers_waiting,
    run_query,
    table_key,
)
from autoexplain.agent.store.migrations import MIGRATIONS, Migration
from autoexplain.agent.store.schema import TABLES, VIEWS

__all__ = ["DEFAULT_DB_ENV", "DEFAULT_DB_NAME", "MIGRATIONS", "TABLES", "VIEWS", "Migration", "Store",
           "announce_reader", "connect", "default_db_path", "merge_rows", "open_connection", "readers_waiting",
           "run_query", "table_key"]
