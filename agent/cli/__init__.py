"""The ``autoexplain`` command line (typer): one module per command group, assembled here.

Only commands that work are registered. Every bad input is an :class:`InputError`: one line on stderr, exit
code 2, and nothing written (inputs are validated before the database is opened). Heavy libraries are imported
inside the commands, so ``autoexplain --help`` stays fast.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from autoexplain.agent.cli.bench import bench_app
from autoexplain.agent.cli.circuit import circuit
from autoexplain.agent.cli.common import fail
from autoexplain.agent.cli.demo import demo
from autoexplain.agent.cli.export_graph import export_graph
from autoexplain.agent.cli.feature_circuit import feature_circuit
from autoexplain.agent.cli.harvest import check, harvest_cmd
from autoexplain.agent.cli.heads import heads
from autoexplain.agent.cli.interventions import ablate, dla, lens, steer
from autoexplain.agent.cli.mcp import mcp
from autoexplain.agent.cli.report import report
from autoexplain.agent.cli.run import label, run
from autoexplain.agent.cli.show import show_app
from autoexplain.agent.cli.sql import sql, tools_cmd
from autoexplain.agent.cli.trace import trace
from autoexplain.agent.cli.zoo import zoo_app
from autoexplain.tools.errors import InputError, Interrupted

app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, add_completion=False,
                  pretty_exceptions_enable=False, context_settings={"max_content_width": 120},
                  help="Explain what happens inside language models: SAE feature labels and circuits, in DuckDB.")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"autoexplain {version('autoexplain')}")
        raise typer.Exit()


@app.callback()
def _root(show_version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                     help="print the version and exit")] = False) -> None:
    """Explain what happens inside language models: SAE feature labels and circuits, in DuckDB."""


app.command("sql")(sql)
app.command("tools")(tools_cmd)
app.add_typer(zoo_app, name="zoo")
app.command("check")(check)
app.command("harvest")(harvest_cmd)
app.command("demo")(demo)
app.command("label")(label)
app.command("run")(run)
app.command("circuit")(circuit)
app.add_typer(bench_app, name="bench")
app.add_typer(show_app, name="show")
app.command("ablate")(ablate)
app.command("steer")(steer)
app.command("lens")(lens)
app.command("dla")(dla)
app.command("heads")(heads)
app.command("trace")(trace)
app.command("feature-circuit")(feature_circuit)
app.command("export-graph")(export_graph)
app.command("report")(report)
app.command("mcp")(mcp)


def main() -> None:
    """Entry point: every user error is one stderr line and exit code 2."""
    from typer.exceptions import TyperException

    try:
        code = app(standalone_mode=False)
    except InputError as exc:
        fail(exc.message)
    except Interrupted as exc:  # a command that knows what it kept says so
        print(f"autoexplain: {exc.message}", file=sys.stderr)
        sys.exit(130)
    except typer.Abort as exc:  # Ctrl-C anywhere else: click turns KeyboardInterrupt into Abort
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, Interrupted):
            print(f"autoexplain: {cause.message}", file=sys.stderr)
        else:
            print("autoexplain: interrupted", file=sys.stderr)
        sys.exit(130)
    except TyperException as exc:  # usage errors of the (vendored) click parser
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            print(ctx.get_help())
            sys.exit(0)
        where = ctx.command_path if ctx is not None else "autoexplain"
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        fail(f"{message} (see {where} --help)")
    # the command is complete and its results are stored: a Ctrl-C while the interpreter shuts down (closing the
    # database, joining threads) must not turn a finished run into a traceback or a killed process
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code if isinstance(code, int) else 0)
