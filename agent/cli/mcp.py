"""``autoexplain mcp``: serve the tools, the results database (read-only) and feature pages to MCP clients.

Every input is checked before anything is served (specs without loading weights, the database file, the port);
the model and SAEs load on the first tool call that needs them. See :mod:`autoexplain.agent.mcp_server`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from autoexplain.agent.cli.common import DbOpt, DeviceOpt, check_db_path
from autoexplain.tools.errors import InputError

McpModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m", metavar="SPEC",
    help="model to serve the tools on: local HF dir, hub name or toy:NAME (loaded on first use)")]
McpSaeOpt = Annotated[list[str] | None, typer.Option(
    "--sae", "-s", metavar="SPEC",
    help="SAE spliced into the model (repeat for several): sae-lens dir, toy:MODEL/NAME or RELEASE/ID")]
HttpOpt = Annotated[int | None, typer.Option("--http", metavar="PORT", help="serve streamable HTTP on "
                                                                            "http://127.0.0.1:PORT/mcp instead of "
                                                                            "stdio")]


def _check_toy(model: str, saes: list[str]) -> None:
    """Toy specs name a world and SAEs the zoo knows (checked without building anything)."""
    from autoexplain.tools.zoo import get_spec

    if model.strip().startswith("toy:"):
        get_spec(model.strip()[4:])
    for spec in saes:
        if not spec.strip().startswith("toy:"):
            continue
        world, _, name = spec.strip()[4:].partition("/")
        known = [s.name for s in get_spec(world).saes]
        if name not in known:
            raise InputError(f"--sae {spec!r}: toy world {world!r} has the SAEs {', '.join(known)}")


def _check_port(port: int) -> None:
    import socket

    if not 1 <= port <= 65535:
        raise InputError(f"--http {port}: a port is 1..65535")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            raise InputError(f"--http {port}: cannot listen on 127.0.0.1:{port} ({exc.strerror}); pick a free "
                             "port") from None


def mcp(db: DbOpt = None, model: McpModelOpt = None, sae: McpSaeOpt = None, device: DeviceOpt = None,
        http: HttpOpt = None,
        timeout: Annotated[float, typer.Option(help="seconds a database read waits while a run holds the "
                                                    "file")] = 30.0) -> None:
    """Serve autoexplain over the Model Context Protocol (stdio, or streamable HTTP on 127.0.0.1 with --http):
    every tool with its JSON schema and causal level (with --model/--sae), read-only SQL on the results database,
    and feature pages as resources (autoexplain://feature/{sae_id}/{index})."""
    import logging

    from autoexplain.agent.store import default_db_path

    saes = [s.strip() for s in sae or []]
    if saes and model is None:
        raise InputError("--sae needs --model: the SAEs are spliced into a model")
    if timeout <= 0:
        raise InputError("--timeout must be > 0")
    if http is not None:
        _check_port(http)
    check_db_path(db)
    path = Path(db) if db is not None else default_db_path()
    if not path.exists():
        if db is not None:
            raise InputError(f"--db {str(path)!r}: no such database: pass a database autoexplain wrote")
        if model is None:
            raise InputError(f"nothing to serve: no database at {str(path)!r} and no --model; pass --db FILE "
                             "and/or --model SPEC [--sae SPEC]")
    if model is not None:  # without loading weights (torch is imported only here)
        from autoexplain.tools.loading import check_specs

        _check_toy(model, saes)
        check_specs(model, saes)
    from autoexplain.agent.mcp_server import AutoexplainMCP, ServeConfig, serve_http, serve_stdio

    cfg = ServeConfig(db=path.resolve() if path.exists() else None, model=model, saes=tuple(saes), device=device,
                      sql_timeout_s=timeout)
    app = AutoexplainMCP(cfg)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="autoexplain mcp: %(message)s")
    what = f"{len(app.tools)} tools" + (f", database {cfg.db}" if cfg.db else "")
    if http is None:
        print(f"autoexplain mcp: serving {what} over stdio", file=sys.stderr)
        import anyio

        anyio.run(serve_stdio, app)
    else:
        serve_http(app, http, on_ready=lambda url: print(f"autoexplain mcp: serving {what} at {url}",
                                                         file=sys.stderr, flush=True))
