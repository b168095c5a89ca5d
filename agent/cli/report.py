"""``autoexplain report``: the static HTML report of a database (or of one run), readable offline from disk."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from autoexplain.agent.cli.common import DbOpt, console
from autoexplain.tools.errors import InputError

if TYPE_CHECKING:
    from autoexplain.agent.store.queries import Reads


def report(out: Annotated[Path, typer.Option("--out", "-o", help="folder to write the site into (created)")],
           db: DbOpt = None,
           run: Annotated[str | None, typer.Option("--run", help="only this run (default: everything in the "
                                                                 "database)")] = None,
           model: Annotated[bool, typer.Option("--model/--no-model", help="compute attention patterns and the "
                                                                          "logit lens of circuits with the model "
                                                                          "(loaded from the spec stored with the "
                                                                          "run)")] = True) -> None:
    """Write a static HTML report (index with runs, score distributions and a searchable feature list; one page per
    feature and per circuit) that opens from disk with no server and no network. Reads the database read-only."""
    from autoexplain.agent.report import check_out_dir
    from autoexplain.agent.store import default_db_path, queries
    from autoexplain.agent.store.queries import ReadOnlyStore

    check_out_dir(out)
    store = ReadOnlyStore(db or default_db_path())
    if run is not None and not queries.run_exists(store, run):  # type: ignore[arg-type]
        have = ", ".join(f"{r} ({k}, {s})" for r, k, s in queries.run_listing(store, 10)) or "none"
        raise InputError(f"unknown run {run!r} in {str(store.path)!r}: the newest runs are {have}")
    path = write_report(store, out, run_id=run, with_model=model)
    console().print(f"report: {path}")


def write_report(store: Reads, out: Path, *, run_id: str | None = None, with_model: bool = True) -> Path:
    """Build the report with progress on stderr; return the index page's path (absolute)."""
    from autoexplain.agent.report import build_report

    err = console(stderr=True)
    res = build_report(store, out, run_id=run_id, with_model=with_model,
                       progress=lambda msg: err.print(f"[dim]report: {msg}[/dim]"))
    for note in res.notes:
        err.print(f"report: {note}")
    err.print(f"[dim]report: {res.pages:,} pages ({res.features:,} features, {res.circuits} circuits) in "
              f"{res.seconds:.1f} s[/dim]")
    return res.index.resolve()
