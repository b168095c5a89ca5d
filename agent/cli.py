"""The ``autoexplain`` command line (typer).

Only commands that work are registered. Every bad input is an :class:`InputError`: one line on stderr, exit
code 2, and nothing written (inputs are validated before the database is opened).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import sys
import uuid
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from autoexplain.tools.errors import InputError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Explain what happens inside language models: SAE feature labels and circuits, in DuckDB.")
zoo_app = typer.Typer(no_args_is_help=True, help="The toy world: a corpus, a trained GPT-2, SAEs and task files.")
app.add_typer(zoo_app, name="zoo")

DbOpt = Annotated[Path | None, typer.Option("--db", help="DuckDB file (default: $AUTOEXPLAIN_DB or "
                                                         "./autoexplain.duckdb)")]


class Fmt(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    con = Console(stderr=stderr, highlight=False, soft_wrap=True)
    if not con.is_terminal:  # logs and pipes: wide tables rather than cells wrapped to 80 columns
        con = Console(stderr=stderr, highlight=False, soft_wrap=True, width=200)
    return con


# ----------------------------------------------------------------------------- sql
@app.command()
def sql(query: Annotated[str, typer.Argument(help="a SQL query (read-only)")], db: DbOpt = None,
        format: Annotated[Fmt, typer.Option("--format", "-f", help="table, csv or json")] = Fmt.table,
        timeout: Annotated[float, typer.Option(help="seconds to wait while a run holds the file")] = 30.0) -> None:
    """Query the results database. Works while a run is writing it (waits for the current write, at most TIMEOUT)."""
    from autoexplain.agent.store import default_db_path, run_query

    cols, rows = run_query(db or default_db_path(), query, timeout_s=timeout)
    print_rows(cols, rows, format)


def print_rows(cols: list[str], rows: list[tuple[Any, ...]], fmt: Fmt) -> None:
    if fmt is Fmt.csv:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(cols)
        w.writerows(rows)
        sys.stdout.write(buf.getvalue())
    elif fmt is Fmt.json:
        print(json.dumps([dict(zip(cols, r, strict=True)) for r in rows], default=str, indent=1))
    else:
        from rich.table import Table

        table = Table(*cols, show_lines=False)
        for r in rows:
            table.add_row(*("NULL" if v is None else str(v) for v in r))
        con = _console()
        con.print(table)
        con.print(f"{len(rows)} row{'s' if len(rows) != 1 else ''}")


# ----------------------------------------------------------------------------- tools
@app.command("tools")
def tools_cmd(format: Annotated[Fmt, typer.Option("--format", "-f", help="table or json (full schemas)")]
              = Fmt.table) -> None:
    """The tool catalogue: every tool the agent, the CLI and Python share, with its argument schema."""
    from autoexplain.tools.registry import default_registry

    reg = default_registry()
    if format is Fmt.json:
        print(json.dumps([{"name": t.name, "cost": t.cost.value, "description": t.description,
                           "input_schema": t.json_schema(), "output_schema": t.output_model.model_json_schema()}
                          for t in reg], indent=1))
        return
    rows = []
    for t in reg:
        props = t.json_schema().get("properties", {})
        args = ", ".join(f"{k}: {v.get('type', 'object')}" for k, v in props.items()) or "-"
        rows.append((t.name, t.cost.value, args, t.description))
    print_rows(["tool", "cost", "arguments", "description"], rows, format)


# ----------------------------------------------------------------------------- zoo
@zoo_app.command("build")
def zoo_build(name: Annotated[str, typer.Option(help="which toy world (small, tiny)")] = "small",
              db: DbOpt = None) -> None:
    """Build the toy world (cached; instant when already built) and record it in the database."""
    from autoexplain.tools.zoo import get_spec

    get_spec(name)  # validate before anything is written
    store = _open_store(db)
    built = _build_zoo(name)
    run_id, _, _ = _record_zoo(store, built, kind="zoo")
    store.finish_run(run_id, "done", {"task_accuracy": built.manifest["task_accuracy"],
                                      "timings": built.manifest["timings"]})
    _show_zoo(built)
    _console().print(f"database: {store.path.resolve()}")


@zoo_app.command("show")
def zoo_show(name: Annotated[str, typer.Option(help="which toy world (small, tiny)")] = "small") -> None:
    """Show a built toy world: sizes, task accuracy, SAEs and where its files are."""
    from autoexplain.tools.zoo import get_spec, zoo_root

    if not (zoo_root(get_spec(name)) / "manifest.json").exists():
        raise InputError(f"toy world {name!r} is not built yet: run autoexplain zoo build --name {name}")
    _show_zoo(_build_zoo(name))


@contextlib.contextmanager
def _progress() -> Any:
    """A ``report(stage, done, total)`` callback: live bars on a terminal; in a log (no terminal), one line per
    stage at most every 15 s and when it completes, so overnight runs show progress in their logs too."""
    import time

    err = _console(stderr=True)
    if err.is_terminal:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), TimeRemainingColumn(), console=err) as prog:
            tasks: dict[str, Any] = {}

            def live(stage: str, done: int, total: int) -> None:
                key = stage.split(" (")[0]
                if key not in tasks:
                    tasks[key] = prog.add_task(stage, total=total)
                prog.update(tasks[key], completed=done, total=total, description=stage)

            yield live
        return
    start = time.monotonic()
    last: dict[str, float] = {}

    def lines(stage: str, done: int, total: int) -> None:
        key = stage.split(" (")[0]
        now = time.monotonic()
        if done >= total or now - last.get(key, -1e9) >= 15:
            last[key] = now
            print(f"{stage}: {done}/{total} ({now - start:.0f} s)", file=sys.stderr, flush=True)

    yield lines


@zoo_app.command("path")
def zoo_path(name: Annotated[str, typer.Option(help="which toy world (small, tiny)")] = "small") -> None:
    """Print the folder of a toy world (building it first if needed), for use in shell commands:
    ``autoexplain harvest ... --dataset "$(autoexplain zoo path)/corpus/train.txt"``."""
    from autoexplain.tools.zoo import get_spec

    get_spec(name)
    print(_build_zoo(name).root)


def _build_zoo(name: str) -> Any:
    from autoexplain.tools.zoo import ensure_model

    with _progress() as report:
        return ensure_model(name, progress=report)


def _show_zoo(built: Any) -> None:
    from rich.table import Table

    m = built.manifest
    spec = m["spec"]
    con = _console()
    con.print(f"[bold]toy:{built.name}[/bold]  ({built.root})")
    con.print(f"  corpus: {m['corpus']['documents']:,} documents, {m['corpus']['tokens']:,} tokens "
              f"({built.corpus})")
    con.print(f"  model: GPT-2, {spec['n_layers']} layers x {spec['n_heads']} heads, d_model {spec['d_model']}, "
              f"context {spec['n_ctx']}, vocab {m['model']['d_vocab']}, {m['model']['n_params']:,} parameters, "
              f"{spec['train_steps']} steps, final loss {m['model']['final_train_loss']}")
    t = Table("task", "top-1 accuracy", "prompts", "file")
    for task, acc in m["task_accuracy"].items():
        t.add_row(task, f"{acc:.1%}", str(spec["task_prompts"]), str(built.task_file(task)))
    con.print(t)
    s = Table("SAE", "site", "d_sae", "k", "L0", "FVU", "spec")
    for sae in m["saes"]:
        s.add_row(sae["name"], sae["site"], str(sae["d_sae"]), str(sae["k"]), str(sae["l0"]), str(sae["fvu"]),
                  f"toy:{built.name}/{sae['name']}")
    con.print(s)
    tm = m["timings"]
    con.print(f"  built in {tm['total_s']:.0f} s on {m['threads']} threads (model {tm['train_model_s']:.0f} s, "
              f"SAEs {tm['train_saes_s']:.0f} s)")


def _open_store(db: Path | None) -> Any:
    from autoexplain.agent.store import Store

    return Store(db)


def _record_zoo(store: Any, built: Any, *, kind: str) -> tuple[str, Any, list[Any]]:
    """Start a run; load the built model and SAEs through the public loaders (proving they load) and record
    them. Returns the run id (still running), the model and the SAEs."""
    from autoexplain.tools.models import load_model
    from autoexplain.tools.saes import load_sae

    run_id = f"{kind}-{uuid.uuid4().hex[:10]}"
    spec = f"toy:{built.name}"
    store.start_run(run_id, kind, {"zoo": built.name, "fingerprint": built.fingerprint})
    lm = load_model(spec)
    quality = {f"{spec}/{q['name']}": {"l0": q["l0"], "fvu": q["fvu"], "k": q["k"]} for q in built.manifest["saes"]}
    saes = [load_sae(name, lm) for name in quality]
    store.record_model_and_saes(lm, saes, extra=quality)
    return run_id, lm, saes


# ----------------------------------------------------------------------------- check
@app.command()
def check(model: Annotated[str, typer.Option("--model", "-m", help="local HF dir, hub name or toy:NAME")],
          sae: Annotated[list[str] | None, typer.Option("--sae", "-s", help="sae-lens dir, toy:MODEL/NAME or "
                                                                            "RELEASE/ID (repeatable)")] = None,
          dataset: Annotated[str | None, typer.Option("--dataset", "-d", help=".txt/.jsonl/.parquet or hub "
                                                                               "name")] = None,
          task: Annotated[Path | None, typer.Option("--task", "-t", help="circuit task file (JSON)")] = None,
          ctx: Annotated[int | None, typer.Option(help="token window for the dataset (default: model "
                                                         "context, at most 128)")] = None,
          device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N (default: cuda if present)")]
          = None) -> None:
    """Load a model (and SAEs, a dataset, a task file) and check they fit together; writes nothing.

    Every site is checked to exist and fire; each SAE's hook and width are checked against the model; the
    dataset is tokenised into windows; the task file is validated and the model's top-1 accuracy on it shown.
    """
    from autoexplain.tools.data import load_task_file, load_texts, tokenize_task, tokenize_windows
    from autoexplain.tools.models import load_model
    from autoexplain.tools.saes import load_sae
    from autoexplain.tools.zoo import task_accuracy

    con = _console()
    lm = load_model(model, device=device)
    d = lm.describe()
    con.print(f"model {lm.model_id}: {d['architecture']}, {lm.n_layers} layers x {lm.n_heads} heads, d_model "
              f"{lm.d_model}, context {lm.n_ctx}, on {lm.device}; {len(lm.sites())} sites exist and fire")
    for spec in sae or []:
        s = load_sae(spec, lm)
        con.print(f"SAE {s.sae_id}: {s.architecture}, d_in {s.d_in} -> d_sae {s.d_sae} at {s.site} "
                  f"({s.hook_name}): fits the model")
    if dataset is not None:
        texts = load_texts(dataset, limit=10_000)
        win = tokenize_windows(texts, lm.tokenizer, ctx=ctx or min(lm.n_ctx, 128), n_ctx=lm.n_ctx)
        con.print(f"dataset {dataset}: {len(texts):,} texts (first 10,000 read) -> {win.n_windows:,} windows of "
                  f"{win.ctx} tokens ({win.n_tokens:,} tokens, BOS first)")
    if task is not None:
        try:
            tt = tokenize_task(load_task_file(task), lm.tokenizer, n_ctx=lm.n_ctx)
        except InputError as exc:
            raise InputError(exc.message if str(task) in exc.message else f"task file {str(task)!r}: {exc}") from None
        con.print(f"task {task}: {tt.n_prompts} prompts valid; model top-1 accuracy {task_accuracy(lm, tt):.1%}")


# ----------------------------------------------------------------------------- harvest
@app.command("harvest")
def harvest_cmd(
        model: Annotated[str, typer.Option("--model", "-m", help="local HF dir, hub name or toy:NAME")],
        sae: Annotated[str, typer.Option("--sae", "-s", help="sae-lens dir, toy:MODEL/NAME or RELEASE/ID")],
        dataset: Annotated[str, typer.Option("--dataset", "-d", help=".txt/.jsonl/.parquet or hub name")],
        tokens: Annotated[int, typer.Option("--tokens", "-n", help="tokens to stream through")] = 200_000,
        ctx: Annotated[int, typer.Option(help="window length (BOS first)")] = 64,
        batch_size: Annotated[int, typer.Option(help="windows per forward pass")] = 32,
        top_k: Annotated[int, typer.Option(help="top contexts kept per feature")] = 20,
        checkpoint_every: Annotated[int, typer.Option(help="batches between checkpoints")] = 20,
        db: DbOpt = None,
        device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N (default: cuda if present)")] = None,
) -> None:
    """Stream a dataset through model + SAE once; store every feature's statistics and examples.

    Interrupted runs resume: run the same command again and finished batches are not recomputed.
    """
    from autoexplain.tools.harvest import HarvestIn
    from autoexplain.tools.models import load_model
    from autoexplain.tools.saes import load_sae

    lm = load_model(model, device=device)
    s = load_sae(sae, lm)
    args = _validated(HarvestIn, sae_id=s.sae_id, dataset=dataset, n_tokens=tokens, ctx=ctx,
                      batch_size=batch_size, top_k=top_k, checkpoint_every=checkpoint_every)
    next(iter(_dataset_probe(dataset)))  # a missing or empty dataset fails before anything is written
    store = _open_store(db)
    run_id = f"harvest-{uuid.uuid4().hex[:10]}"
    store.start_run(run_id, "harvest", {"model": model, "sae": sae, **args.model_dump()})
    store.record_model_and_saes(lm, [s])
    with _run_guard(store, run_id):
        out = _harvest_into(store, run_id, lm, s, args)
        store.finish_run(run_id, "done", out.model_dump())
    con = _console()
    con.print(out.summary())
    if out.resumed_from_batch:
        con.print(f"(resumed after batch {out.resumed_from_batch})")
    con.print(f"database: {store.path.resolve()}  (run {run_id})")


def _harvest_into(store: Any, run_id: str, lm: Any, sae: Any, args: Any) -> Any:
    """Run a harvest with a progress bar, its rows going to ``store`` tagged with ``run_id``."""
    from autoexplain.agent.runner import harvest_sink
    from autoexplain.tools.harvest import harvest
    from autoexplain.tools.registry import ToolContext

    with _progress() as report:
        stage = f"harvest {sae.spec} ({sae.sae_id})"
        return harvest(ToolContext(model=lm, saes={sae.sae_id: sae}, sink=harvest_sink(store, run_id)), args,
                       progress=lambda done, total: report(stage, done, total))


@contextlib.contextmanager
def _run_guard(store: Any, run_id: str) -> Any:
    """Mark the run interrupted (Ctrl-C) or failed (any error) instead of leaving it 'running'."""
    try:
        yield
    except KeyboardInterrupt:
        store.finish_run(run_id, "interrupted", {})
        raise
    except BaseException as exc:
        store.finish_run(run_id, "failed", {"error": f"{exc.__class__.__name__}: {exc}"[:500]})
        raise


def _dataset_probe(spec: str) -> Any:
    from autoexplain.tools.data import iter_texts

    return iter_texts(spec)


def _validated(model_cls: Any, **kwargs: Any) -> Any:
    """Build a tool's input model from CLI values; a pydantic error becomes one InputError line."""
    from pydantic import ValidationError

    try:
        return model_cls(**kwargs)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise InputError(f"--{where.replace('_', '-')}: {err['msg']}") from None


# ----------------------------------------------------------------------------- demo
#: Tokens the demo harvests per SAE: enough for every live feature to show top contexts, fast on 2 cores.
DEMO_TOKENS = 60_000
#: Features the demo labels per toy SAE (the issue asks for at least 20).
DEMO_FEATURES = "0-23"


@app.command()
def demo(db: DbOpt = None) -> None:
    """The main job on the toy world, offline: build it, then let the agent label features of both toy SAEs and
    find and explain the circuit of every toy task, scoring everything on held-out data, all into the database."""
    from autoexplain.agent.run_cli import _plan, execute, show_summary

    built = _build_zoo("small")
    plan = _plan({"name": "demo", "model": "toy:small",
                  "items": [*({"label": {"sae": f"toy:small/{s['name']}", "features": DEMO_FEATURES,
                                         "tokens": DEMO_TOKENS}} for s in built.manifest["saes"]),
                            *({"circuit": {"task": t}} for t in built.manifest["task_accuracy"])]})
    res, store, _ = execute(plan, db, kind="demo")
    _show_zoo(built)
    _show_labels(store, res.run_id)
    show_summary(res, store)
    con = _console()
    path = store.path.resolve()
    flag = f" --db {path}" if db else ""
    con.print(f"\n[bold]results[/bold]: {path}  (run {res.run_id})")
    con.print("try:")
    for q in ("select target, text, round(correctness, 2) as correctness, round(completeness, 2) as completeness, "
              "round(succinctness, 2) as succinctness from best_explanations order by correctness desc nulls last "
              "limit 10",
              "select w.target, t.tool, t.summary from tool_calls t join work_items w using (item_id) "
              "where w.kind = 'circuit' order by t.created_at limit 6",
              "select c.task, e.rank, e.edge, round(e.score, 3) as score from circuits c join circuit_edges e "
              "using (circuit_id) where e.in_circuit order by c.task, e.rank"):
        con.print(f'  autoexplain sql "{q}"{flag}')


def _show_labels(store: Any, run_id: str) -> None:
    from rich.table import Table

    t = Table("target", "explanation", "correct.", "complete.", "succinct.", "level")
    rows = store.query(
        "select e.target, e.text, b.correctness, b.completeness, b.succinctness, e.causal_level "
        "from explanations e join work_items w using (item_id) left join best_explanations b using (explanation_id) "
        "where w.run_id = ? and e.is_final order by w.kind desc, b.correctness desc nulls last", [run_id])[1]
    for target, text, c, m, s, level in rows:
        t.add_row(target, text[:110] + ("…" if len(text) > 110 else ""),
                  *("-" if v is None else f"{v:.2f}" for v in (c, m, s)), level)
    _console().print(t)


from autoexplain.agent.circuit_cli import circuit  # noqa: E402
from autoexplain.agent.run_cli import label, run  # noqa: E402

app.command("circuit")(circuit)
app.command("label")(label)
app.command("run")(run)
from autoexplain.agent.bench_cli import bench_app  # noqa: E402

app.add_typer(bench_app, name="bench")


def main() -> None:
    """Entry point: every user error is one stderr line and exit code 2."""
    from typer.exceptions import TyperException

    try:
        code = app(standalone_mode=False)
    except InputError as exc:
        _fail(exc.message)
    except typer.Abort:
        _fail("interrupted")
    except TyperException as exc:  # usage errors of the (vendored) click parser
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            print(ctx.get_help())
            sys.exit(0)
        where = ctx.command_path if ctx is not None else "autoexplain"
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        _fail(f"{message} (see {where} --help)")
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str) -> None:
    print(f"autoexplain: error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
