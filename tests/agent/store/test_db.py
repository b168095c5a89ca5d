"""The DuckDB store on real files: schema, migrations, upserts, bad paths, and a reader beside a live writer."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Annotated, TypedDict

import duckdb
import pytest

import autoexplain.agent.store.db as store_mod
from autoexplain.agent.store import MIGRATIONS, TABLES, VIEWS, Migration, Store, run_query, schema
from autoexplain.tools.errors import InputError

T0 = dt.datetime(2024, 1, 1, 12, 0, 0)


def _run(run_id: str, **extra: object) -> dict[str, object]:
    return {"run_id": run_id, "kind": "zoo", "status": "running", "started_at": T0, **extra}


def _objects(path: Path) -> dict[str, str]:
    """name -> table_type ('BASE TABLE' or 'VIEW') of the main schema, straight from DuckDB."""
    con = duckdb.connect(str(path), read_only=True)
    try:
        rows = con.execute("select table_name, table_type from information_schema.tables "
                           "where table_schema = 'main'").fetchall()
    finally:
        con.close()
    return dict(rows)


def _columns(path: Path, table: str) -> list[str]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return [r[0] for r in con.execute("select column_name from information_schema.columns where table_name = ? "
                                          "order by ordinal_position", [table]).fetchall()]
    finally:
        con.close()


# ============================================================================= schema and migrations
def test_fresh_db_has_every_table_and_view(tmp_path: Path) -> None:
    path = tmp_path / "fresh.duckdb"
    store = Store(path)
    objects = _objects(path)
    for table in TABLES:
        assert objects.get(table) == "BASE TABLE", table
    for view in VIEWS:
        assert objects.get(view) == "VIEW", view
    assert objects.get("schema_migrations") == "BASE TABLE"
    assert set(objects) == {*TABLES, *VIEWS, "schema_migrations"}
    assert store.schema_version() == MIGRATIONS[-1].version
    for table in TABLES:  # every table is empty and queryable
        assert store.query(f"select count(*) from {table}")[1] == [(0,)]
    assert store.query("select * from best_explanations")[1] == []

    # re-opening is a no-op: no duplicate migration rows, nothing dropped
    store.upsert("runs", [_run("r1")])
    again = Store(path)
    assert again.schema_version() == MIGRATIONS[-1].version
    cols, rows = again.query("select version, count(*) from schema_migrations group by version order by version")
    assert rows == [(m.version, 1) for m in MIGRATIONS]
    assert again.query("select run_id from runs")[1] == [("r1",)]
    assert not (tmp_path / "fresh.duckdb.wal").exists()  # every connection was closed cleanly


def test_newer_db_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "newer.duckdb"
    Store(path)
    future = MIGRATIONS[-1].version + 41
    con = duckdb.connect(str(path))
    con.execute("insert into schema_migrations values (?, 'from the future', current_timestamp)", [future])
    con.close()
    with pytest.raises(InputError) as e:
        Store(path)
    msg = str(e.value)
    assert "newer" in msg and str(future) in msg and str(path) in msg
    assert "\n" not in msg
    # refusing it changed nothing
    con = duckdb.connect(str(path), read_only=True)
    assert con.execute("select max(version), count(*) from schema_migrations").fetchall() == [
        (future, len(MIGRATIONS) + 1)]
    con.close()


def test_pending_migration_is_applied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "old.duckdb"
    old = Store(path)
    old.upsert("runs", [_run("kept", policy="offline")])
    base = MIGRATIONS[-1].version
    assert old.schema_version() == base
    assert "note" not in _columns(path, "runs")

    v2 = Migration(version=base + 1, description="runs.note", statements=(
        "alter table runs add column note varchar",
        "update runs set note = 'migrated'",
    ))
    monkeypatch.setattr(store_mod, "MIGRATIONS", (*MIGRATIONS, v2))
    new = Store(path)
    assert new.schema_version() == base + 1
    assert _columns(path, "runs")[-1] == "note"
    assert new.query("select run_id, policy, note from runs")[1] == [("kept", "offline", "migrated")]
    assert new.query("select version, description from schema_migrations order by version")[1] == [
        *((m.version, m.description) for m in MIGRATIONS), (base + 1, "runs.note")]
    # the new column is writable through upsert, and opening again applies nothing twice
    new.upsert("runs", [{"run_id": "kept", "note": "hello"}])
    assert Store(path).query("select note, kind from runs")[1] == [("hello", "zoo")]
    assert new.query("select count(*) from schema_migrations")[1] == [(len(MIGRATIONS) + 1,)]


def test_failing_migration_rolls_back_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "old.duckdb"
    Store(path)
    broken = Migration(version=MIGRATIONS[-1].version + 1, description="half broken", statements=(
        "alter table runs add column note varchar",
        "alter table no_such_table add column x integer",
    ))
    monkeypatch.setattr(store_mod, "MIGRATIONS", (*MIGRATIONS, broken))
    with pytest.raises(duckdb.Error):
        Store(path)
    monkeypatch.setattr(store_mod, "MIGRATIONS", MIGRATIONS)
    assert "note" not in _columns(path, "runs")  # the first statement was rolled back too
    assert Store(path).schema_version() == MIGRATIONS[-1].version


# ============================================================================= upserts
def test_upsert_twice_keeps_one_copy(tmp_path: Path) -> None:
    store = Store(tmp_path / "u.duckdb")
    runs = [_run(f"r{i}", policy="offline") for i in range(5)]
    examples = [{"sae_id": "s", "feature_index": f, "kind": "top", "example_id": e, "max_act": f + e / 10}
                for f in range(3) for e in range(4)]
    for _ in range(2):
        assert store.upsert("runs", runs) == 5
        assert store.upsert("feature_examples", examples) == 12
    assert store.query("select count(*), count(distinct run_id) from runs")[1] == [(5, 5)]
    assert store.query("select count(*) from feature_examples")[1] == [(12,)]
    assert store.query("select max_act from feature_examples where feature_index = 2 and example_id = 3")[1] == [
        (2.3,)]
    assert store.upsert("runs", []) == 0
    with pytest.raises(ValueError):
        store.upsert("not_a_table", runs)


def test_partial_upsert_updates_only_given_columns(tmp_path: Path) -> None:
    store = Store(tmp_path / "u.duckdb")
    store.upsert("runs", [_run("r1", policy="llm", config={"k": 3}, host="box"), _run("r2", host="other")])
    store.upsert("runs", [{"run_id": "r1", "status": "done", "finished_at": T0 + dt.timedelta(hours=1)}])
    cols, rows = store.query("select run_id, kind, status, policy, config->>'$.k', host, started_at, finished_at "
                             "from runs order by run_id")
    assert rows == [
        ("r1", "zoo", "done", "llm", "3", "box", T0, T0 + dt.timedelta(hours=1)),
        ("r2", "zoo", "running", None, None, "other", T0, None),
    ]
    # a default applies on insert only: attempts stays 0 on insert, then a partial write leaves it alone
    store.upsert("work_items", [{"item_id": "i1", "run_id": "r1", "kind": "feature", "target": "s#1",
                                 "status": "pending"}])
    store.upsert("work_items", [{"item_id": "i1", "attempts": 2}])
    store.upsert("work_items", [{"item_id": "i1", "status": "done"}])
    assert store.query("select status, attempts, target from work_items")[1] == [("done", 2, "s#1")]


def test_json_values_are_queryable(tmp_path: Path) -> None:
    store = Store(tmp_path / "j.duckdb")
    config = {"zoo": "tiny", "layers": [0, 1], "nested": {"lr": 0.001, "name": "x"}}
    store.upsert("runs", [_run("r1", config=config, summary=["a", "b"])])
    store.upsert("features", [{"sae_id": "s", "feature_index": 7, "histogram": [1, 2, 3],
                               "top_logits": [{"token": " Mary", "logit": 1.5}]}])
    cols, rows = store.query("select config->>'$.zoo', config->>'$.layers[1]', config->>'$.nested.name', "
                             "cast(config->>'$.nested.lr' as double), json_array_length(summary), "
                             "summary->>'$[0]', typeof(config) from runs")
    assert rows == [("tiny", "1", "x", 0.001, 2, "a", "JSON")]
    assert json.loads(store.query("select config from runs")[1][0][0]) == config
    assert store.query("select top_logits->>'$[0].token', json_array_length(histogram) from features")[1] == [
        (" Mary", 3)]


def test_rows_with_different_keys(tmp_path: Path) -> None:
    store = Store(tmp_path / "k.duckdb")
    store.upsert("runs", [_run("a"), _run("b", policy="llm")])  # either refused, or 'b' keeps its policy
    assert store.query("select run_id, policy from runs order by run_id")[1] == [("a", None), ("b", "llm")]


def test_repeated_key_in_one_call_keeps_the_last_row(tmp_path: Path) -> None:
    store = Store(tmp_path / "dup.duckdb")
    assert store.upsert("runs", [_run("a", policy="offline"), _run("a", policy="llm")]) == 1
    assert store.query("select run_id, policy from runs")[1] == [("a", "llm")]


def test_bulk_upsert_50k_rows(tmp_path: Path) -> None:
    store = Store(tmp_path / "bulk.duckdb")
    rows = [{"sae_id": "sae-x", "feature_index": i // 20, "kind": "top", "example_id": i % 20, "split": "explain",
             "tokens": ["the", " cat", " sat"], "acts": [0.0, float(i % 7), 0.5], "max_act": float(i % 7),
             "window_index": i} for i in range(50_000)]
    t0 = time.perf_counter()
    assert store.upsert("feature_examples", rows) == 50_000
    elapsed = time.perf_counter() - t0
    assert elapsed < 20, f"50,000 rows took {elapsed:.1f} s"
    assert store.query("select count(*), count(distinct feature_index), sum(window_index), max(max_act) "
                       "from feature_examples")[1] == [(50_000, 2_500, sum(range(50_000)), 6.0)]
    assert store.query("select acts->>'$[1]' from feature_examples where window_index = 12")[1] == [("5.0",)]


# ============================================================================= bad paths
def test_garbage_file_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "results.duckdb"
    garbage = bytes(range(256)) * 40 + b"not a database"
    path.write_bytes(garbage)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(InputError) as e:
        Store(path)
    assert "not a DuckDB database" in str(e.value) and str(path) in str(e.value)
    with pytest.raises(InputError) as e:
        run_query(path, "select 1")
    assert "not a DuckDB database" in str(e.value)
    assert path.read_bytes() == garbage
    assert sorted(os.listdir(tmp_path)) == before  # no .wal, no lock file, nothing new


def test_directory_and_missing_folder_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError) as e:
        Store(tmp_path)
    assert "is a directory" in str(e.value)
    missing = tmp_path / "no" / "such" / "folder" / "r.duckdb"
    with pytest.raises(InputError) as e:
        Store(missing)
    assert "does not exist" in str(e.value) and str(missing.parent) in str(e.value)
    assert os.listdir(tmp_path) == []


def test_run_query_missing_file_and_read_only(tmp_path: Path) -> None:
    missing = tmp_path / "missing.duckdb"
    with pytest.raises(InputError) as e:
        run_query(missing, "select 1")
    assert "no database" in str(e.value) and str(missing) in str(e.value)
    assert not missing.exists()

    path = tmp_path / "r.duckdb"
    Store(path).upsert("runs", [_run("r1")])
    for stmt in ("drop table runs", "delete from runs", "insert into runs (run_id, kind, status, started_at) "
                 "values ('x', 'k', 's', now())", "create table t (a int)"):
        with pytest.raises(InputError) as e:
            run_query(path, stmt)
        assert "read-only" in str(e.value), stmt
    assert run_query(path, "select run_id from runs") == (["run_id"], [("r1",)])
    with pytest.raises(InputError) as e:
        run_query(path, "select * from no_such_table")
    assert "query failed" in str(e.value) and "no_such_table" in str(e.value)
    assert run_query(path, "select ? + ?", [2, 3])[1] == [(5,)]
    for empty in ("", "-- nothing", ";"):
        with pytest.raises(InputError, match="no SQL statement"):
            run_query(path, empty)


# ============================================================================= a reader beside a live writer
WRITER = textwrap.dedent("""
    import datetime as dt, sys, time
    from autoexplain.agent.store import Store

    store = Store(sys.argv[1])
    n_tx, per_tx = int(sys.argv[2]), int(sys.argv[3])
    for t in range(n_tx):
        store.upsert("runs", [{"run_id": f"w{t:04d}-{j}", "kind": "bench", "status": "running",
                               "config": {"t": t}, "started_at": dt.datetime(2024, 1, 1)} for j in range(per_tx)])
        time.sleep(0.01)
    print(store.query("select count(*) from runs")[1][0][0], flush=True)
""")


def test_cli_queries_answer_while_another_process_writes(tmp_path: Path) -> None:
    path = tmp_path / "live.duckdb"
    Store(path)  # exists before the first query, so every query must succeed
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    n_tx, per_tx = 150, 4
    writer = subprocess.Popen([sys.executable, str(script), str(path), str(n_tx), str(per_tx)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    counts: list[int] = []
    try:
        while writer.poll() is None or len(counts) < 5:
            q = subprocess.run([sys.executable, "-m", "autoexplain.agent.cli", "sql", "select count(*) as n from runs",
                                "--db", str(path), "-o", "json"], capture_output=True, text=True, timeout=60)
            assert q.returncode == 0, q.stderr
            counts.append(json.loads(q.stdout)[0]["n"])
            assert len(counts) < 200
        out, err = writer.communicate(timeout=120)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert writer.returncode == 0, err
    final = n_tx * per_tx
    assert int(out.strip()) == final
    assert Store(path).query("select count(*), count(distinct config->>'$.t') from runs")[1] == [(final, n_tx)]
    assert counts == sorted(counts), counts
    assert all(c % per_tx == 0 for c in counts), counts  # a query sees whole transactions only
    assert any(0 < c < final for c in counts), counts  # at least one answered mid-run
    assert not (tmp_path / "live.duckdb.wal").exists()


def test_sql_cannot_write_other_files(tmp_path: Path) -> None:
    store = Store(tmp_path / "x.duckdb")
    leak = tmp_path / "leak.csv"
    with pytest.raises(InputError, match="cannot touch other files"):
        run_query(store.path, f"copy (select 42) to '{leak}'")
    assert not leak.exists()


def _declared_columns(db: Path) -> dict[str, list[tuple[str, str, bool, str | None]]]:
    """Every table's columns as (name, type, nullable, default), in order, as DuckDB reports them."""
    out: dict[str, list[tuple[str, str, bool, str | None]]] = {}
    for table, col, typ, nullable, default in run_query(db,
            "select table_name, column_name, data_type, is_nullable = 'YES', column_default "
            "from information_schema.columns where table_name in (select unnest(?)) "
            "order by table_name, ordinal_position", [list(TABLES)])[1]:
        out.setdefault(table, []).append((col, typ, nullable, default))
    return out


def _keys(db: Path) -> dict[str, tuple[str, ...]]:
    rows = run_query(db, "select table_name, constraint_column_names from duckdb_constraints() "
                       "where constraint_type = 'PRIMARY KEY'")[1]
    return {t: tuple(cols) for t, cols in rows if t in TABLES}


def test_migrations_build_exactly_the_declared_schema(tmp_path: Path) -> None:
    """The declarations in ``schema`` are the schema: a file migrated from version 1 has exactly their columns,
    types, NOT NULLs, defaults and keys, and so does a file built from the DDL the declarations derive."""
    migrated = Store(tmp_path / "migrated.duckdb").path
    derived = tmp_path / "derived.duckdb"
    con = duckdb.connect(str(derived))
    for name in TABLES:
        con.execute(schema.create_table(name))
    con.close()
    assert _declared_columns(migrated) == _declared_columns(derived)
    assert _keys(migrated) == _keys(derived) == {t: schema.table(t).key for t in TABLES}
    json_cols = {t: {c for c, typ, _, _ in cols if typ == "JSON"} for t, cols in _declared_columns(migrated).items()}
    assert json_cols == {t: set(schema.table(t).json_columns) for t in TABLES}


class _NoKey(TypedDict, total=False):
    a: str


class _Weird(TypedDict, total=False):
    a: Annotated[str, schema.KEY]
    b: set[int]


def test_a_declaration_that_cannot_be_stored_is_refused() -> None:
    with pytest.raises(TypeError, match="no KEY"):
        schema._table("nokey", _NoKey)
    with pytest.raises(TypeError, match="no DuckDB type"):
        schema._table("weird", _Weird)
    with pytest.raises(ValueError, match="view over judgement_sets"):
        schema.table("judgements")


def test_rows_repeating_a_key_in_one_upsert_merge_column_by_column(tmp_path: Path) -> None:
    """Within one call the rule is the one an upsert applies to a stored row: later values win, no column is lost."""
    store = Store(tmp_path / "m.duckdb")
    store.upsert("runs", [_run("r1"), {"run_id": "r1", "status": "done"}, {"run_id": "r1", "policy": "offline"}])
    assert store.query("select kind, status, policy from runs")[1] == [(_run("r1")["kind"], "done", "offline")]
    with pytest.raises(ValueError, match="lacks its key"):
        store.upsert("runs", [_run("r2"), {"status": "done"}])
    assert store.query("select count(*) from runs")[1] == [(1,)]  # nothing of a refused call is written


# ============================================================================= issue 19: locks, readers, bad files
_READER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from autoexplain.agent.store.db import announce_reader
    with announce_reader(Path(sys.argv[1])):
        Path(sys.argv[2]).write_text("announced")
        time.sleep(600)
""")


def test_a_killed_reader_leaves_no_announcement(tmp_path: Path) -> None:
    """Issue 19 (7): a reader killed with SIGKILL left its file in ``<db>.readers/``, and writers waited on it for
    60 s at every store access. Its announcement is an OS-released lock: dead at once, and cleared."""
    db = tmp_path / "r.duckdb"
    Store(db)
    flag = tmp_path / "flag"
    proc = subprocess.Popen([sys.executable, "-c", _READER, str(db), str(flag)])
    try:
        deadline = time.monotonic() + 60
        while not flag.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the reader never announced itself"
            time.sleep(0.05)
        assert store_mod.readers_waiting(db)  # alive: a writer lets go for it
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not store_mod.readers_waiting(db)  # at once, not 60 s later
    assert list((db.with_name(db.name + ".readers")).iterdir()) == []  # and its file is gone


def test_run_lock_admits_one_writer_per_run(tmp_path: Path) -> None:
    """Issue 19 (4): one writer per run; the lock is the OS's, so a dead holder leaves no stale lock."""
    from autoexplain.tools.locks import LockBusy

    store = Store(tmp_path / "l.duckdb")
    with store.run_lock("plan-1"):
        with pytest.raises(LockBusy, match=r"run plan-1 .* is being written by another process.*pid \d+") as e:
            with Store(store.path).run_lock("plan-1"):
                pass
        assert "\n" not in str(e.value)
        with store.run_lock("plan-2"):  # another run of the same file is another lock
            pass
    with store.run_lock("plan-1"):  # released: free again
        pass
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        from pathlib import Path
        from autoexplain.agent.store import Store
        with Store(Path(sys.argv[1])).run_lock("plan-1"):
            Path(sys.argv[2]).write_text("held")
            time.sleep(600)
    """), str(store.path), str(tmp_path / "held")])
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "held").exists():
            assert holder.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(LockBusy), store.run_lock("plan-1"):
            pass
        holder.kill()  # kill -9: the OS releases its lock
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    with store.run_lock("plan-1"):
        pass


def test_unusable_db_paths_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 19 (5): a truncated DuckDB file, ``--db some_file/db.duckdb`` and a read-only folder raised
    tracebacks; each is one InputError line now, and nothing is written."""
    good = tmp_path / "good.duckdb"
    Store(good).upsert("runs", [_run(f"r{i}", config={"pad": "x" * 2000}) for i in range(300)])
    data = good.read_bytes()
    for n in (100, 5000, len(data) // 2):
        bad = tmp_path / f"trunc{n}.duckdb"
        bad.write_bytes(data[:n])
        # cut in its header: refused on opening; cut later: DuckDB opens it and finds out on the first missing block
        opens = [lambda p: Store(p), lambda p: run_query(p, "select 1")] if n < 10_000 else []
        for open_it in (*opens, lambda p: run_query(p, "select count(*), max(config::varchar) from runs")):
            with pytest.raises(InputError, match="is damaged|not a DuckDB database") as e:
                open_it(bad)
            assert "\n" not in str(e.value)
        assert bad.read_bytes() == data[:n]
    some_file = tmp_path / "some_file"
    some_file.write_text("x")
    with pytest.raises(InputError, match="is a file, not a folder"):
        Store(some_file / "db.duckdb")
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(store_mod.os, "access", lambda p, mode: False if Path(p) == ro else real_access(p, mode))
    with pytest.raises(InputError, match="not writable"):
        Store(ro / "db.duckdb")
    assert list(ro.iterdir()) == []

    def read_only_fs(path: str, **kw: object) -> None:
        raise duckdb.IOException(f'IO Error: Cannot open file "{path}": Read-only file system')

    monkeypatch.setattr(store_mod.duckdb, "connect", read_only_fs)
    with pytest.raises(InputError, match=r"cannot be written here \(read-only file system\)") as e:
        Store(tmp_path / "elsewhere.duckdb")
    assert "Traceback" not in str(e.value) and "\n" not in str(e.value)


def test_lock_timeout_message_names_the_holder_in_whole_words() -> None:
    """Issue 19 (2): the message ended in a cut-off DuckDB fragment."""
    msg = ('IO Error: Could not set lock on file "/x/db.duckdb": Conflicting lock is held in '
           '/root/.venv/bin/python3.12 (PID 4242) by user root. See also https://duckdb.org/docs/stable/connect/'
           'concurrency')
    assert store_mod._lock_holder(msg) == "process 4242, python3.12"
    assert store_mod._lock_holder("IO Error: lock") == "another process"


def test_sql_with_several_statements_says_so(tmp_path: Path) -> None:
    """Issue 19 (9): DuckDB runs every statement and returns the last result: the first ones vanished silently."""
    db = tmp_path / "s.duckdb"
    Store(db).upsert("runs", [_run("r1")])
    assert run_query(db, "select count(*) from runs;")[1] == [(1,)]  # one statement and a semicolon: fine
    with pytest.raises(InputError, match="holds 2 SQL statements"):
        run_query(db, "select count(*) from runs; select 42")


def test_duckdb_extensions_refusal_says_why(tmp_path: Path) -> None:
    """Issue 19 (9): ``duckdb_extensions()`` was refused as "cannot touch other files". Checked: DuckDB itself
    refuses it once external access is off (it lists the extension folder), and allowing that folder would let
    ``COPY … TO`` write there, so it stays refused — with a message that says which function and why. Table
    functions that read only the database are answered."""
    db = tmp_path / "e.duckdb"
    Store(db)
    assert run_query(db, "select count(*) > 0 from duckdb_settings()")[1] == [(True,)]
    assert run_query(db, "select count(*) > 0 from duckdb_functions()")[1] == [(True,)]
    with pytest.raises(InputError, match="extension folder") as e:
        run_query(db, "select * from duckdb_extensions()")
    assert "cannot touch other files" not in str(e.value)


def test_summary_counts_dead_features_from_the_store_not_from_label_text(tmp_path: Path) -> None:
    """Issue 19 (9): the summary counted as dead every final label starting with "dead feature", LLM-written ones
    included. Dead now means the stored ``features.is_dead``."""
    from autoexplain.agent.store import queries

    store = Store(tmp_path / "d.duckdb")
    store.upsert("runs", [_run("r1")])
    labels = {0: (True, "never fires"), 1: (False, "dead feature-like: fires on 'dead'"),
              2: (False, "dead feature words"), 3: (False, "the token 'cat'")}
    store.upsert("features", [{"sae_id": "s", "feature_index": f, "is_dead": dead} for f, (dead, _) in labels.items()])
    store.upsert("work_items", [{"item_id": f"i{f}", "run_id": "r1", "kind": "feature", "target": f"s#{f}",
                                 "status": "done", "attempts": 1} for f in labels])
    store.upsert("explanations", [{"explanation_id": f"e{f}", "run_id": "r1", "item_id": f"i{f}", "target": f"s#{f}",
                                   "text": text, "author": "llm", "causal_level": "association", "is_final": True,
                                   "created_at": T0}
                                  for f, (_, text) in labels.items()])
    (summary,) = queries.run_summary(store, "r1")
    assert (summary.items, summary.dead) == (4, 1)


def test_a_file_cut_in_its_data_blocks_is_one_line_when_a_write_meets_it(tmp_path: Path) -> None:
    """DuckDB reads a truncated block only when a statement needs it: the store turns that into one InputError
    (the CLI's one line and exit code 2), never a traceback, and the transaction adds nothing."""
    full = tmp_path / "full.duckdb"
    store = Store(full)
    store.upsert("runs", [_run(f"r{i}", config={"pad": "x" * 2000}) for i in range(3000)])
    cut = tmp_path / "cut.duckdb"
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="is damaged"):
        damaged = Store(cut)
        damaged.upsert("runs", [_run(f"x{i}", config={"pad": "y" * 2000}) for i in range(3000)])


def test_insert_new_writes_new_keys_and_refuses_a_stored_key(tmp_path: Path) -> None:
    """The harvest's bulk path: a plain INSERT of new keys (JSON columns encoded like upsert's); an existing key is
    a constraint error inside the caller's transaction, never a silent replace."""
    from autoexplain.agent.store import Store

    store = Store(tmp_path / "i.duckdb")
    row = {"sae_id": "s", "feature_index": 1, "density": 0.5, "max_act": 1.0, "mean_act": 0.5, "n_tokens": 10,
           "is_dead": False, "histogram": {"edges": [1.0], "counts": [0, 1]}}
    with store.transaction() as con:
        assert store.insert_new("features", [row, {**row, "feature_index": 2}], con=con) == 2
    assert store.query("select feature_index, histogram->>'$.counts' from features order by 1")[1] == \
        [(1, "[0,1]"), (2, "[0,1]")]
    with pytest.raises(duckdb.ConstraintException), store.transaction() as con:
        store.insert_new("features", [{**row, "density": 0.9}], con=con)
    assert store.query("select density from features where feature_index = 1")[1] == [(0.5,)]
