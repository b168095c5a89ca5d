"""The DuckDB store: schema, migrations, and the only place in the project that writes SQL.

Every run, work item, tool call, hypothesis, explanation, score and circuit lands here, so a researcher can ask
questions of all results in SQL (``autoexplain sql``).

Concurrency
-----------
DuckDB lets one process hold a file read-write, and while it does no other process can open the file at all,
read-only included. A run that kept its connection open for hours would lock ``autoexplain sql`` out for hours.
So a run holds the file only while it is busy (:meth:`Store.hold`): the connection is let go after a short idle
spell, and at once when a reader announces itself (:func:`announce_reader`, which :func:`run_query` does). Outside
a run each write opens the file, commits one transaction and closes it. Readers open the file read-only for the
length of one query. Either side that meets the other's lock waits and retries with a short backoff
(:func:`connect`), so a query made mid-run answers within a write's length and sees every committed row. (The
agent's rows reach the store in groups: :mod:`autoexplain.agent.store.outbox`.)

A writer waits for an announced reader as long as it lives (a slow query pauses a run, it never fails it); the
announcement is a file under ``flock``, so a killed reader stops counting at once. One process writes a run at a time
(:meth:`Store.run_lock`). A file DuckDB cannot use (truncated, not DuckDB, in a read-only folder, under a file) is
one :class:`InputError` line, never a traceback.

Idempotence
-----------
Every table has a natural primary key and every write is an upsert (``INSERT OR REPLACE … BY NAME``), so an item
that re-runs after a crash rewrites the same rows rather than duplicating them. Bulk rows go through Arrow (about
2 M rows/s), never ``executemany`` (about 300 rows/s on a file with a primary key).

Migrations
----------
``MIGRATIONS`` is an append-only list. ``schema_migrations`` records which ran; opening a database for writing
applies the missing ones in order inside one transaction. A database written by a newer autoexplain is refused.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import orjson

from autoexplain.agent.store import schema
from autoexplain.agent.store.migrations import MIGRATIONS
from autoexplain.agent.store.rows import utc_now
from autoexplain.agent.store.schema import ModelRow, Row, RunRow, SaeRow
from autoexplain.tools.errors import InputError

if TYPE_CHECKING:
    from autoexplain.tools.models import LoadedModel
    from autoexplain.tools.saes import LoadedSAE

DEFAULT_DB_ENV = "AUTOEXPLAIN_DB"
DEFAULT_DB_NAME = "autoexplain.duckdb"


def table_key(table: str) -> tuple[str, ...]:
    """The primary key of a table rows can be written to; ``ValueError`` for anything else (views included)."""
    return schema.table(table).key


def merge_rows(into: dict[tuple[Any, ...], dict[str, Any]], table: str,
               rows: Sequence[Row]) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Merge ``rows`` into ``into`` (primary key -> row) column by column, later values winning — the same rule
    an upsert applies to a stored row. Every row is checked for its key before any is merged; returns ``into``."""
    key = table_key(table)
    for r in rows:
        if any(k not in r for k in key):
            raise ValueError(f"row for {table} lacks its key {key}: {sorted(r)}")
    for r in rows:
        k = tuple(r[c] for c in key)
        into[k] = {**into[k], **r} if k in into else (r if isinstance(r, dict) else dict(r))
    return into


def default_db_path() -> Path:
    """``$AUTOEXPLAIN_DB`` if set, else ``./autoexplain.duckdb``."""
    return Path(os.environ.get(DEFAULT_DB_ENV) or DEFAULT_DB_NAME)


def _is_lock_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, duckdb.IOException) and ("lock" in text or "conflicting" in text)


@contextlib.contextmanager
def connect(path: Path, *, read_only: bool, timeout_s: float = 30.0,
            external_access: bool = True) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open ``path`` for one short unit of work, waiting while another process holds the file.

    ``external_access=False`` also forbids the query from touching other files (``COPY … TO``, ``ATTACH``,
    ``read_csv``): what ``autoexplain sql`` uses, so a query can neither change results nor write elsewhere.

    Raises :class:`InputError` if the file is not a DuckDB database, or if the lock is not released within
    ``timeout_s`` (naming the process that holds it).
    """
    con = open_connection(path, read_only=read_only, timeout_s=timeout_s, external_access=external_access)
    try:
        yield con
    finally:
        con.close()


def open_connection(path: Path, *, read_only: bool, timeout_s: float = 30.0,
                    external_access: bool = True) -> duckdb.DuckDBPyConnection:
    """:func:`connect` without the context manager: the caller closes the connection.

    A writer waits for readers that announced themselves (:func:`announce_reader`) as long as they live, however
    long their query takes: a slow ``autoexplain sql`` pauses a run, it never fails it. ``timeout_s`` bounds the
    wait for anything else holding the file (another writer, a reader that could not announce itself); then
    :class:`StoreBusy` says which process holds it.
    """
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only,
                                  config={} if external_access else {"enable_external_access": False})
        except duckdb.IOException as exc:
            text = str(exc)
            if "not a valid duckdb database" in text.lower():
                raise InputError(f"--db {str(path)!r} exists but is not a DuckDB database: pass a new file "
                                 "name or an autoexplain database (the file was left untouched)") from None
            if not _is_lock_error(exc):
                raise InputError(_unusable_db(path, text)) from None
            if not read_only and readers_waiting(path):
                deadline = max(deadline, time.monotonic() + timeout_s)  # an announced reader: wait for it
            if time.monotonic() > deadline:
                raise StoreBusy(f"database {str(path)!r} stayed locked by another process for {timeout_s:.0f} s "
                                f"({_lock_holder(text)}); try again when it finishes") from None
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.2)


class StoreBusy(InputError):
    """Another process kept the database file locked longer than the store's timeout."""


def _lock_holder(message: str) -> str:
    """Who holds the file, from DuckDB's lock error (``… Conflicting lock is held in /usr/bin/python (PID 12)``),
    as whole words: never a cut-off fragment of the message."""
    m = re.search(r"held in (\S+) \(PID (\d+)\)", message)
    if m:
        return f"process {m.group(2)}, {Path(m.group(1)).name}"
    m = re.search(r"PID (\d+)", message)
    return f"process {m.group(1)}" if m else "another process"


def _unusable_db(path: Path, message: str) -> str:
    """One line for a database file DuckDB cannot open for a reason other than a lock."""
    low = message.lower()
    where = f"--db {str(path)!r}"
    if "not a directory" in low:
        return f"{where}: a part of the path above the file is a file, not a folder: pass a path in a folder"
    if "read-only file system" in low or "permission denied" in low:
        why = "read-only file system" if "read-only" in low else "permission denied"
        return f"{where} cannot be written here ({why}): pass a path in a folder you can write"
    if "could not read enough bytes" in low or "truncated" in low or "corrupt" in low or "checksum" in low:
        return (f"{where} is damaged (truncated or corrupt: DuckDB cannot read it): restore it from a copy or "
                "pass a new file name (the file was left untouched)")
    first = message.strip().splitlines()[0] if message.strip() else type(message).__name__
    return f"{where} cannot be opened: {first}"


# ----------------------------------------------------------------------------- readers waiting
def _readers_dir(path: Path) -> Path:
    return path.with_name(path.name + ".readers")


@contextlib.contextmanager
def announce_reader(path: Path) -> Iterator[None]:
    """Tell a writer holding ``path`` (see :meth:`Store.hold`) that a reader waits: it lets go of the file.

    The announcement is a file in ``<db>.readers/`` that this process holds an ``flock`` on for the block: the
    operating system drops the lock when the process dies (``kill -9`` included), and :func:`readers_waiting`
    counts only locked files (removing the others), so a killed reader never keeps a writer waiting.
    """
    from autoexplain.tools.locks import release, try_acquire

    d = _readers_dir(path)
    name = f"{os.getpid()}-{random.getrandbits(48):012x}"
    held: tuple[Path, int] | None = None
    try:
        d.mkdir(exist_ok=True)
        tmp = d / f".{name}"  # locked before it gets the name writers look at: never seen unlocked while alive
        fd = try_acquire(tmp, "autoexplain sql reading")
        if fd is not None:
            os.rename(tmp, d / name)
            held = (d / name, fd)
    except OSError:  # a read-only folder: the writer will let go when idle anyway
        held = None
    try:
        yield
    finally:
        if held is not None:
            release(*held)
            with contextlib.suppress(OSError):  # leave no folder behind (fails while other readers wait)
                d.rmdir()


def readers_waiting(path: Path) -> bool:
    """Whether a live reader has announced itself for ``path``; files left by dead readers are removed."""
    from autoexplain.tools.locks import is_locked

    d = _readers_dir(path)
    live = False
    try:
        with os.scandir(d) as it:
            entries = [e.path for e in it if not e.name.startswith(".")]
    except OSError:
        return False
    for entry in entries:
        if is_locked(Path(entry)):
            live = True
        else:  # its process died: the announcement cannot outlive it
            with contextlib.suppress(OSError):
                os.unlink(entry)
    return live


@contextlib.contextmanager
def _atomic(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """One transaction on ``con``: committed on success, rolled back on any error."""
    con.execute("begin transaction")
    try:
        yield con
    except BaseException:
        con.execute("rollback")
        raise
    con.execute("commit")


def _jsonable(value: Any) -> Any:
    """dict/list values as JSON text (orjson: ~5x json.dumps; NaN becomes null, numpy scalars and arrays and
    datetimes are written as numbers, lists and ISO strings), others as they are."""
    if isinstance(value, (dict, list, tuple)):
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY).decode()
    return value


class Store:
    """All reads and writes of one autoexplain database file.

    ``Store(path)`` validates the file (creating and migrating it if needed) before anything else is written, so
    a bad ``--db`` is refused without side effects.
    """

    def __init__(self, path: str | Path | None = None, *, timeout_s: float = 30.0) -> None:
        self.path = Path(path) if path is not None else default_db_path()
        self.timeout_s = timeout_s
        self._held: duckdb.DuckDBPyConnection | None = None  # see hold()
        self._holding = False
        self._lock = threading.RLock()
        self._last_use = 0.0
        if self.path.exists() and self.path.is_dir():
            raise InputError(f"--db {str(self.path)!r} is a directory: pass a file path such as results.duckdb")
        if not self.path.parent.exists():
            raise InputError(f"--db {str(self.path)!r}: folder {str(self.path.parent)!r} does not exist; create it "
                             "or pass a path in an existing folder")
        if not self.path.parent.is_dir():
            raise InputError(f"--db {str(self.path)!r}: {str(self.path.parent)!r} is a file, not a folder: pass a "
                             "path in a folder")
        if not self.path.exists() and not os.access(self.path.parent, os.W_OK):
            raise InputError(f"--db {str(self.path)!r} cannot be created: folder {str(self.path.parent)!r} is not "
                             "writable (read-only file system?): pass a path in a folder you can write")
        try:
            self._migrate()
        except duckdb.IOException as exc:  # a truncated file DuckDB opened but cannot read
            raise InputError(_unusable_db(self.path, str(exc))) from None

    # -- connections ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-write connection inside one transaction; committed on success, rolled back on error. A file
        found damaged while reading it (DuckDB reads a truncated block only when a statement needs it) is one
        :class:`InputError` line, never a traceback."""
        with self._damage_is_input_error():
            with self._transaction() as con:
                yield con

    @contextlib.contextmanager
    def _damage_is_input_error(self) -> Iterator[None]:
        try:
            yield
        except duckdb.IOException as exc:
            if "could not read enough bytes" not in str(exc).lower():
                raise
            raise InputError(f"--db {str(self.path)!r} is damaged (truncated or corrupt: DuckDB could not read a "
                             "block it needs); the transaction was rolled back, nothing was added: restore the file "
                             "from a copy or pass a new file name") from None

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        if self._holding:
            with self._lock:
                try:
                    with _atomic(self._held_connection()) as con:
                        yield con
                finally:
                    self._last_use = time.monotonic()
            return
        with connect(self.path, read_only=False, timeout_s=self.timeout_s) as con, _atomic(con):
            yield con

    @contextlib.contextmanager
    def hold(self, idle_s: float = 0.25) -> Iterator[Store]:
        """Keep one read-write connection open across writes and reads (a run's many small transactions).

        Opening and closing the file costs ~40 ms on a 2-core machine (closing checkpoints the WAL), against
        ~7 ms for a small transaction on an open connection. But a held file locks every other process out,
        ``autoexplain sql`` included, so the connection is let go (a) after ``idle_s`` without use, by a
        background thread, and (b) as soon as a reader announces itself (:func:`announce_reader`, which
        :func:`run_query` does): the next write finds the request, closes the file and waits (at most 2 s) for
        the readers to finish. Reads through :meth:`query` use the held connection.
        """
        self._holding = True
        stop = threading.Event()

        def closer() -> None:
            while not stop.wait(0.05):
                if self._held is None or not self._lock.acquire(blocking=False):
                    continue
                try:
                    idle = time.monotonic() - self._last_use > idle_s
                    if self._held is not None and (idle or readers_waiting(self.path)):
                        self._held.close()
                        self._held = None
                finally:
                    self._lock.release()

        thread = threading.Thread(target=closer, name="autoexplain-store-closer", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            with self._lock:
                self._holding = False
                if self._held is not None:
                    self._held.close()
                    self._held = None

    def _held_connection(self) -> duckdb.DuckDBPyConnection:
        """The held connection (under ``_lock``), reopened after readers waiting have had their turn."""
        if readers_waiting(self.path):
            if self._held is not None:
                self._held.close()
                self._held = None
            deadline = time.monotonic() + 2.0
            while readers_waiting(self.path) and time.monotonic() < deadline:
                time.sleep(0.005)
        if self._held is None:
            self._held = open_connection(self.path, read_only=False, timeout_s=self.timeout_s)
        self._last_use = time.monotonic()
        return self._held

    # -- schema ---------------------------------------------------------------------------------------
    def _migrate(self) -> None:
        latest = MIGRATIONS[-1].version
        with self.transaction() as con:
            con.execute("create table if not exists schema_migrations (version integer primary key, "
                        "description varchar not null, applied_at timestamp not null)")
            have = {r[0] for r in con.execute("select version from schema_migrations").fetchall()}
            if have and max(have) > latest:
                raise InputError(f"database {str(self.path)!r} has schema version {max(have)}, newer than this "
                                 f"autoexplain understands ({latest}): upgrade autoexplain")
            for mig in MIGRATIONS:
                if mig.version in have:
                    continue
                for stmt in mig.statements:
                    con.execute(stmt)
                con.execute("insert into schema_migrations values (?, ?, current_timestamp)",
                            [mig.version, mig.description])

    def schema_version(self) -> int:
        from autoexplain.agent.store import queries

        return queries.schema_version(self)

    # -- generic writes ----------------------------------------------------------------------------------
    def upsert(self, table: str, rows: Sequence[Row], *,
               con: duckdb.DuckDBPyConnection | None = None) -> int:
        """Insert or replace ``rows`` (dicts keyed by column name) in one Arrow bulk insert; return the count.

        On a key conflict only the columns present in the dicts are replaced; the others keep their stored values
        (or get their defaults on insert). dict/list values are stored as JSON.
        """
        # rows repeating a key are merged first (DuckDB's INSERT OR REPLACE would keep the first of them)
        latest = merge_rows({}, table, rows)
        # rows with different column sets go in separate inserts, so no row loses (or nulls) a column
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for r in latest.values():
            groups.setdefault(tuple(sorted(r)), []).append(r)
        if con is None:
            with self.transaction() as own:
                self._insert_groups(own, table, groups)
        else:
            self._insert_groups(con, table, groups)
        return len(latest)

    def upsert_many(self, tables: Mapping[str, Sequence[Row]]) -> int:
        """:meth:`upsert` the rows of several tables in one transaction (all or nothing); return the row count."""
        with self.transaction() as con:
            return sum(self.upsert(table, rows, con=con) for table, rows in tables.items() if rows)

    def insert_new(self, table: str, rows: Sequence[Row], *, con: duckdb.DuckDBPyConnection) -> int:
        """Bulk-insert ``rows`` whose keys are not stored yet, inside the caller's transaction ``con``; return the
        count. A plain ``INSERT``: several times faster than :meth:`upsert`'s ``INSERT OR REPLACE`` (which looks
        every key up to replace it) for bulk rows the caller has just made room for, e.g. a harvest after deleting
        the SAE's old rows. A key that is stored already is DuckDB's constraint error, never a silent replace."""
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for r in rows:
            groups.setdefault(tuple(sorted(r)), []).append(dict(r))
        self._insert_groups(con, table, groups, replace=False)
        return len(rows)

    @staticmethod
    def _insert_groups(con: duckdb.DuckDBPyConnection, table: str,
                       groups: dict[tuple[str, ...], list[dict[str, Any]]], *, replace: bool = True) -> None:
        import pyarrow as pa

        json_cols = schema.table(table).json_columns
        for cols, group in groups.items():
            # column by column in one pass over the rows (several times faster than from_pylist); values of JSON
            # columns become JSON text
            values = zip(*map(itemgetter(*cols), group), strict=True) if len(cols) > 1 else \
                iter([[r[cols[0]] for r in group]])
            columns = {k: [_jsonable(v) for v in vs] if k in json_cols else list(vs)
                       for k, vs in zip(cols, values, strict=True)}
            arrow_rows = pa.table(columns)  # noqa: F841 (scanned by name)
            con.execute(f"insert {'or replace ' if replace else ''}into {table} by name select * from arrow_rows")

    # -- reads ----------------------------------------------------------------------------------------
    def query(self, sql: str, params: Sequence[Any] | None = None) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Run one read-only query; return (column names, rows)."""
        if self._holding:
            with self._lock, self._damage_is_input_error():
                try:
                    cur = self._held_connection().execute(sql, list(params) if params else None)
                    if cur is None or cur.description is None:
                        return [], []
                    return [d[0] for d in cur.description], cur.fetchall()
                finally:
                    self._last_use = time.monotonic()
        return run_query(self.path, sql, params, timeout_s=self.timeout_s)

    def record_model_and_saes(self, lm: LoadedModel, saes: Sequence[LoadedSAE],
                              extra: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """Upsert the model and SAEs a run used (``extra``: more info per SAE spec, e.g. training quality), and
        the specs each SAE was loaded under (``sae_aliases``: the spec as typed and, for a folder, its absolute
        path), so ``autoexplain show feature SPEC#N`` finds the SAE without loading anything."""
        from autoexplain.agent.store.queries import sae_spec_aliases
        from autoexplain.agent.store.schema import SaeAliasRow

        extra = extra or {}
        model: ModelRow = {"model_id": lm.model_id, "spec": lm.spec, "info": lm.describe()}
        rows: list[SaeRow] = [{"sae_id": s.sae_id, "spec": s.spec, "model_id": lm.model_id, "hook_name": s.hook_name,
                               "site": str(s.site), "d_in": s.d_in, "d_sae": s.d_sae, "architecture": s.architecture,
                               "info": {**s.describe(), **extra.get(s.spec, {})}} for s in saes]
        now = utc_now()
        aliases: list[SaeAliasRow] = [{"spec": spec, "sae_id": s.sae_id, "model_id": lm.model_id, "seen_at": now}
                                      for s in saes for spec in sae_spec_aliases(s.spec)]
        self.upsert_many({"models": [model], "saes": rows, "sae_aliases": aliases})

    # -- runs -----------------------------------------------------------------------------------------
    def start_run(self, run_id: str, kind: str, config: Mapping[str, Any], *, policy: str | None = None) -> None:
        import platform
        from importlib.metadata import version

        from autoexplain.agent.store import queries

        if queries.run_exists(self, run_id):  # resumed: keeps its start and config
            resumed: RunRow = {"run_id": run_id, "status": "running", "finished_at": None}
            self.upsert("runs", [resumed])
            return
        row: RunRow = {"run_id": run_id, "kind": kind, "status": "running", "policy": policy, "config": dict(config),
                       "started_at": utc_now(), "host": platform.node(), "version": version("autoexplain")}
        self.upsert("runs", [row])

    def finish_run(self, run_id: str, status: str, summary: Mapping[str, Any]) -> None:
        row: RunRow = {"run_id": run_id, "status": status, "summary": dict(summary), "finished_at": utc_now()}
        self.upsert("runs", [row])

    @contextlib.contextmanager
    def run_lock(self, run_id: str) -> Iterator[None]:
        """One writer per run: hold ``<db>.locks/<run_id>.lock`` for the block (an ``flock`` the operating system
        releases when the process dies, so a killed run leaves no stale lock). A second process writing the same
        run (two ``--resume`` at once) gets one :class:`~autoexplain.tools.locks.LockBusy` line instead."""
        from autoexplain.tools.locks import exclusive

        lock = self.path.with_name(self.path.name + ".locks") / f"{run_id}.lock"
        with exclusive(lock, f"writing run {run_id}",
                       f"run {run_id} in {str(self.path)!r} is being written by another process: wait for it to "
                       "finish (or stop it) before resuming it"):
            yield
        with contextlib.suppress(OSError):  # leave no folder behind (fails while other runs hold theirs)
            lock.parent.rmdir()


def run_query(path: Path, sql: str, params: Sequence[Any] | None = None, *,
              timeout_s: float = 30.0) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Answer one query from a read-only connection (works while a run is writing the same file)."""
    if not path.exists():
        raise InputError(f"no database at {str(path)!r}: run a command that writes one (e.g. autoexplain demo) "
                         "or pass --db PATH")
    with announce_reader(path), connect(path, read_only=True, timeout_s=timeout_s, external_access=False) as con:
        try:
            n_statements = len(con.extract_statements(sql))
            if n_statements > 1:  # DuckDB would run them all and show only the last result
                raise InputError(f"query failed: it holds {n_statements} SQL statements; autoexplain sql runs one "
                                 "at a time: pass each statement on its own")
            cur = con.execute(sql, list(params) if params else None)
        except duckdb.Error as exc:
            msg = str(exc).strip().splitlines()[0]
            if "could not read enough bytes" in msg.lower():  # a truncated file: DuckDB finds out mid-query
                raise InputError(_unusable_db(path, msg)) from None
            if "read-only" in msg.lower():
                msg = "autoexplain sql is read-only: only SELECT-style queries are allowed"
            elif "disabled by config" in msg.lower() and "directory" in msg.lower() and "extensions" in msg.lower():
                # duckdb_extensions() lists DuckDB's extension folder: a file-system read DuckDB refuses once
                # external access is off (checked with DuckDB 1.x), whatever the query
                msg = ("this function reads DuckDB's extension folder, and autoexplain sql turns off every file "
                       "access outside the database (DuckDB cannot allow it read-only): run it in duckdb itself")
            elif "disabled by config" in msg.lower():
                msg = "autoexplain sql cannot touch other files: use --format csv|json to export results"
            raise InputError(f"query failed: {msg}") from None
        if cur is None:  # DuckDB returns None for a query with no statement: '', ';' or only a comment
            raise InputError("query failed: the query holds no SQL statement: pass e.g. 'select count(*) from runs'")
        if cur.description is None:
            return [], []
        cols = [d[0] for d in cur.description]
        return cols, cur.fetchall()
