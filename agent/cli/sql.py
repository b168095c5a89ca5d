"""``autoexplain sql`` (read-only queries of the results database) and ``autoexplain tools`` (the catalogue)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from autoexplain.agent.cli.common import DbOpt, Fmt, print_rows


def sql(query: Annotated[str, typer.Argument(help="a SQL query (read-only)")], db: DbOpt = None,
        format: Annotated[Fmt, typer.Option("--format", "-o", help="table, csv or json")] = Fmt.table,
        timeout: Annotated[float, typer.Option(help="seconds to wait while a run holds the file")] = 30.0) -> None:
    """Query the results database. Works while a run is writing it (waits for the current write, at most TIMEOUT)."""
    from autoexplain.agent.store import default_db_path, run_query

    cols, rows = run_query(db or default_db_path(), query, timeout_s=timeout)
    print_rows(cols, rows, format)



def tools_cmd(format: Annotated[Fmt, typer.Option("--format", "-o", help="table or json (full schemas)")]
              = Fmt.table) -> None:
    """The tool catalogue: every tool the agent, the CLI and Python share, with its causal level and argument
    schema."""
    from autoexplain.tools.registry import default_registry

    reg = default_registry()
    if format is Fmt.json:
        print(json.dumps([{"name": t.name, "cost": t.cost.value, "causal_level": t.level and t.level.value,
                           "description": t.description,
                           "input_schema": t.json_schema(), "output_schema": t.output_model.model_json_schema()}
                          for t in reg], indent=1))
        return
    rows = []
    for t in reg:
        props = t.json_schema().get("properties", {})
        args = ", ".join(f"{k}: {v.get('type', 'object')}" for k, v in props.items()) or "-"
        rows.append((t.name, t.cost.value, t.level.value if t.level else "-", args, t.description))
    print_rows(["tool", "cost", "causal level", "arguments", "description"], rows, format)


