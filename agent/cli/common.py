"""What every command shares: options, the console, tables, progress, the store, the toy world, input checks.

Public names only: a command module imports what it needs from here and never another command module's privates.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import sys
import uuid
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from autoexplain.tools.errors import InputError

if TYPE_CHECKING:
    from autoexplain.agent.runner import ItemExecutor, ItemOutcome, Plan, Prepared, RunResult
    from autoexplain.agent.store import Store
    from autoexplain.tools.data import TaskFile
    from autoexplain.tools.models import LoadedModel
    from autoexplain.tools.saes import LoadedSAE
    from autoexplain.tools.zoo import BuiltZoo


DbOpt = Annotated[Path | None, typer.Option("--db", help="DuckDB file (default: $AUTOEXPLAIN_DB or "
                                                         "./autoexplain.duckdb)")]
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="local HF dir, hub name or toy:NAME")]
class PolicyChoice(StrEnum):
    """Who drives the agent loop (``Plan.policy``)."""

    offline = "offline"
    llm = "llm"


class JudgeChoice(StrEnum):
    """Who scores feature labels (``Plan.judge``)."""

    lexical = "lexical"
    embedding = "embedding"
    llm = "llm"


class KeepChoice(StrEnum):
    """Which per-example judge decisions to keep (``Plan.judgements``)."""

    final = "final"
    all = "all"


PolicyOpt = Annotated[PolicyChoice, typer.Option("--policy", help="offline (deterministic, default) or llm "
                                                         "(OPENAI_API_KEY, OPENAI_BASE_URL, --llm-model)")]
LLMModelOpt = Annotated[str | None, typer.Option("--llm-model", help="model name at the OpenAI-compatible "
                                                                     "endpoint (policy or judge llm)")]
JudgeOpt = Annotated[JudgeChoice, typer.Option("--judge", help=("who scores labels: lexical (default), embedding "
                                                               "(MiniLM, needs the [judges] extra) or llm"))]
StepsOpt = Annotated[int, typer.Option("--max-steps", help="graph steps per item before it ends with the best "
                                                           "explanation so far")]
TokensOpt = Annotated[int, typer.Option("--max-tokens", help="LLM tokens per item")]
LLMMaxTokensOpt = Annotated[int | None, typer.Option("--llm-max-tokens", help="completion tokens per LLM call "
                                                                             "(sent as max_tokens; default 1024)")]
LLMTimeoutOpt = Annotated[float | None, typer.Option("--llm-timeout", help="seconds per LLM HTTP attempt "
                                                                           "(default: 20 + 0.1 per max token)")]
SecondsOpt = Annotated[float, typer.Option("--max-seconds", help="wall seconds per item")]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N (default: cuda if present)")]


class Fmt(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


def console(stderr: bool = False) -> Any:
    from rich.console import Console

    con = Console(stderr=stderr, highlight=False, soft_wrap=True)
    if not con.is_terminal:  # logs and pipes: wide tables rather than cells wrapped to 80 columns
        con = Console(stderr=stderr, highlight=False, soft_wrap=True, width=200)
    return con



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
        con = console()
        con.print(table)
        con.print(f"{len(rows)} row{'s' if len(rows) != 1 else ''}")



@contextlib.contextmanager
def progress() -> Any:
    """A ``report(stage, done, total)`` callback: live bars on a terminal; in a log (no terminal), one line per
    stage at most every 15 s and when it completes, so overnight runs show progress in their logs too."""
    import time

    err = console(stderr=True)
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



def build_zoo(name: str, *, rebuild: bool = False) -> BuiltZoo:
    from autoexplain.tools.zoo import ensure_model

    with progress() as report:
        return ensure_model(name, progress=report, rebuild=rebuild)


def show_zoo(built: BuiltZoo) -> None:
    from rich.table import Table

    m = built.manifest
    spec = m["spec"]
    con = console()
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


def check_db_path(db: Path | None) -> None:
    """The checks :class:`~autoexplain.agent.store.Store` makes on its path, without creating anything, so a bad
    ``--db`` is refused before a model loads: not a directory, its folder exists and is a folder, writable when
    the file is new, and an existing file starts like a DuckDB database (the magic ``DUCK`` at byte 8; an empty
    file is left to DuckDB)."""
    import os

    from autoexplain.agent.store.db import default_db_path

    path = Path(db) if db is not None else default_db_path()
    if path.is_dir():
        raise InputError(f"--db {str(path)!r} is a directory: pass a file path such as results.duckdb")
    parent = path.parent
    if not parent.exists():
        raise InputError(f"--db {str(path)!r}: folder {str(parent)!r} does not exist; create it or pass a path in "
                         "an existing folder")
    if not parent.is_dir():
        raise InputError(f"--db {str(path)!r}: {str(parent)!r} is a file, not a folder: pass a path in a folder")
    if not path.exists():
        if not os.access(parent, os.W_OK):
            raise InputError(f"--db {str(path)!r} cannot be created: folder {str(parent)!r} is not writable "
                             "(read-only file system?): pass a path in a folder you can write")
        return
    try:
        with path.open("rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise InputError(f"--db {str(path)!r} cannot be read ({exc.strerror}): pass a file you can read") from None
    if head and head[8:12] != b"DUCK":
        raise InputError(f"--db {str(path)!r} exists but is not a DuckDB database: pass a new file name or a "
                         "database autoexplain wrote")


def open_store(db: Path | None) -> Store:
    from autoexplain.agent.store import Store

    return Store(db)


def record_zoo(store: Store, built: BuiltZoo, *, kind: str) -> tuple[str, LoadedModel, list[LoadedSAE]]:
    """Start a run; load the built model and SAEs through the public loaders (proving they load) and record
    them. Returns the run id (still running), the model and the SAEs."""
    from autoexplain.tools.loading import load_model, load_sae

    run_id = f"{kind}-{uuid.uuid4().hex[:10]}"
    spec = f"toy:{built.name}"
    store.start_run(run_id, kind, {"zoo": built.name, "fingerprint": built.fingerprint})
    lm = load_model(spec)
    quality = {f"{spec}/{q['name']}": {"l0": q["l0"], "fvu": q["fvu"], "k": q["k"]} for q in built.manifest["saes"]}
    saes = [load_sae(name, lm) for name in quality]
    store.record_model_and_saes(lm, saes, extra=quality)
    return run_id, lm, saes



@contextlib.contextmanager
def run_guard(store: Store, run_id: str) -> Iterator[None]:
    """Mark the run interrupted (Ctrl-C) or failed (any error) instead of leaving it 'running'."""
    try:
        yield
    except KeyboardInterrupt:
        store.finish_run(run_id, "interrupted", {})
        raise
    except BaseException as exc:
        store.finish_run(run_id, "failed", {"error": f"{exc.__class__.__name__}: {exc}"[:500]})
        raise


def dataset_probe(spec: str) -> Any:
    from autoexplain.tools.data import iter_texts

    return iter_texts(spec)


def validated(model_cls: Any, **kwargs: Any) -> Any:
    """Build a tool's input model from CLI values; a pydantic error becomes one InputError line."""
    from pydantic import ValidationError

    try:
        return model_cls(**kwargs)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise InputError(f"--{where.replace('_', '-')}: {err['msg']}") from None




def fail(message: str) -> None:
    """One line on stderr, exit code 2 (every user error ends here)."""
    print(f"autoexplain: error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(2)


# ----------------------------------------------------------------------------- running a plan
def llm_settings(max_tokens: int | None, timeout_s: float | None) -> dict[str, Any]:
    """The plan's ``llm:`` from ``--llm-max-tokens`` / ``--llm-timeout`` (only what was given)."""
    return {k: v for k, v in (("max_tokens", max_tokens), ("timeout_s", timeout_s)) if v is not None}


def plan_from(data: dict[str, Any]) -> Plan:
    from pydantic import ValidationError

    from autoexplain.agent.runner import Plan, validation_message

    try:
        return Plan.model_validate(data)
    except ValidationError as exc:
        raise InputError(validation_message(exc, "arguments", as_flags=True)) from None


def execute(plan: Plan, db: Path | None, *, kind: str, resume: bool = False,
            resume_hint: str = "run the same command with --resume to continue",
            executor: ItemExecutor | None = None) -> tuple[RunResult, Store, Prepared]:
    """Validate, open the store, run with a live display (the items on ``executor``: default serial, here);
    return the RunResult. Ctrl-C (or SIGTERM) ends in one
    line (:class:`~autoexplain.tools.errors.Interrupted`, exit code 130) saying what was kept and ``resume_hint``."""
    from autoexplain.agent.runner import prepare, run_plan

    check_db_path(db)  # with every other input, before the model loads (prepare checks the plan first)
    if plan.policy == "llm" or plan.judge == "llm":
        from autoexplain.agent.llm import LLMConfig

        LLMConfig.from_env(plan.llm_model)  # a missing key or endpoint fails before anything is written
    with progress() as report:
        prep = prepare(plan)
    store = open_store(db)
    con = console(stderr=True)

    def on_item(o: ItemOutcome) -> None:
        sc = "  ".join(f"{k[:4]} {v:.2f}" for k, v in o.scores.items() if v is not None)
        tag = "(resumed: already done)" if o.skipped else ""
        text = (o.text or o.error or "")[:90]
        used = "" if o.skipped else f"{o.usage.steps} steps, {o.usage.tool_calls} tools, " \
                                    f"{o.usage.tokens} LLM tokens, {o.usage.seconds:.1f} s"
        # explanations may hold brackets ("'[', ']'"): printed as text, never as rich markup
        con.print(f"  {o.status.value:>14}  {o.target[:40]:<40} {sc:<34} [{used}] {text} {tag}", markup=False)

    try:
        with progress() as report:
            res = run_plan(store, prep, kind=kind, resume=resume, report=report, on_item=on_item,
                           executor=executor)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the runner marked the run interrupted and committed what finished
        from autoexplain.agent.store import queries
        from autoexplain.tools.errors import Interrupted

        last = queries.latest_run(store, kind)
        saved = f"run {last[0]} is marked {last[1]}; " if last else ""
        raise Interrupted(f"interrupted: {saved}finished items are saved in {store.path.resolve()}; "
                          f"{resume_hint}") from None
    return res, store, prep


#: Exit code of ``label``, ``run``, ``circuit`` and ``demo`` when items were left pending (a run budget ran out
#: before they started): the results so far are stored, and ``--resume`` continues the run.
EXIT_PENDING = 3


def exit_if_pending(res: RunResult, resume_hint: str) -> None:
    """Say how many items are left and exit with :data:`EXIT_PENDING` when the run did not finish every item."""
    from autoexplain.agent.state import ItemStatus

    left = sum(o.status is ItemStatus.PENDING for o in res.outcomes)
    if left:
        console().print(f"{left} of {len(res.outcomes)} items not started (the run budget ran out): {resume_hint}")
        raise typer.Exit(EXIT_PENDING)


def show_summary(res: RunResult, store: Store) -> None:
    from rich.table import Table

    from autoexplain.agent.store import queries
    con = console()
    t = Table("kind", "items", "done", "weak", "no behaviour", "budget-limited", "failed", "pending", "dead",
              "mean correctness", "mean completeness", "mean succinctness")
    rows = queries.run_summary(store, res.run_id)
    for r in rows:
        t.add_row(*(str(x) for x in r[:9]), *("-" if x is None else f"{x:.3f}" for x in r[9:]))
    con.print(t)
    con.print(f"run {res.run_id}: {len(res.outcomes)} items in {res.seconds:.1f} s "
              f"(harvest {res.harvest_seconds:.1f} s)")
    if any(r.weak for r in rows):
        con.print("weak: labels whose correctness cannot be told from chance (95 % interval includes 0.5); "
                  "their reasons: autoexplain show run " + res.run_id)
    if any(r.no_behaviour for r in rows):
        con.print("no behaviour: circuit tasks the model does not do (ablating everything moves the metric by "
                  "less than noise); their scores are stored as unscored")
    for note in res.harvest_notes:  # also in the run's summary and the harvests table
        con.print(f"WARNING: {note}")


# ----------------------------------------------------------------------------- tasks
def resolve_task(task: str, model: str) -> tuple[str, Path | None]:
    """Check a ``--task`` without weights. Returns (label, file): a task file path (validated), or for a toy task
    ``(toy:WORLD/TASK, None)`` when its world is not built yet (it is built with the model)."""
    from autoexplain.tools.data import load_task_file
    from autoexplain.tools.zoo import TASKS, ensure_model, get_spec, zoo_root

    t = task.strip()
    path = Path(t).expanduser()
    if path.exists():
        load_task_file(path)
        return str(path), path
    world: str | None = None
    name = t
    if t.startswith("toy:"):
        world, sep, name = t[4:].partition("/")
        if not sep or not world or not name:
            raise InputError(f"--task {task!r}: write toy:WORLD/TASK, e.g. toy:small/induction")
    elif model.strip().startswith("toy:") and t.replace("_", "").isalpha():
        world = model.strip()[4:]
    if world is None:
        load_task_file(path)  # missing file: one line
        raise AssertionError("unreachable")
    get_spec(world)  # unknown world: one line
    if name not in TASKS:
        raise InputError(f"--task {task!r}: unknown toy task {name!r}; the toy tasks are {', '.join(TASKS)}")
    if (zoo_root(get_spec(world)) / "manifest.json").exists():
        return f"toy:{world}/{name}", ensure_model(world).task_file(name)
    return f"toy:{world}/{name}", None


def load_resolved_task(label: str, path: Path | None) -> TaskFile:
    """The task file a :func:`resolve_task` result names (building its toy world if needed), loaded."""
    from autoexplain.tools.data import load_task_file

    return load_task_file(resolved_task_path(label, path))


def resolved_task_path(label: str, path: Path | None) -> Path:
    """The file of a :func:`resolve_task` result (a toy world is built when it is not yet)."""
    from autoexplain.tools.zoo import ensure_model

    if path is None:
        world, _, name = label[4:].partition("/")
        path = ensure_model(world).task_file(name)
    return path


# ----------------------------------------------------------------------------- circuits
def scored_effect(details: dict[str, Any]) -> float | None:
    """m(M) - m(∅) on the prompts a circuit was scored on (its ``circuits.details``): what its mediation shares
    are relative to; the search's own effect for circuits stored before scoring recorded it."""
    for clean, ablated in (("scored_m_clean", "scored_m_ablated"), ("m_clean", "m_ablated")):
        if details.get(clean) is not None and details.get(ablated) is not None:
            return float(details[clean]) - float(details[ablated])
    return None


def node_table(nodes: list[Any], effect: float | None) -> Any:
    """The ``circuit_nodes`` rows as a table: role claimed (and whether its intervention check held), total,
    direct and indirect effect as shares of the full effect ``effect`` (m(M) - m(∅)), and the prompt share."""
    from rich.table import Table

    def share(x: float | None) -> str:
        return "-" if x is None or not effect else f"{x / effect:+.0%}"

    t = Table("node", "in circuit", "role (check)", "total", "direct", "indirect", "prompts hurt",
              title="mechanism: causal mediation per node (shares of m(M) - m(∅)) and claimed roles")
    for n in nodes:
        check = {True: "verified", False: "NOT verified", None: "unchecked"}[n.role_verified]
        t.add_row(n.node, "yes" if n.in_circuit else "", f"{n.role} ({check})" if n.role else "-",
                  share(n.total_effect), share(n.direct_effect), share(n.indirect_effect),
                  "-" if n.prompt_share is None else f"{n.prompt_share:.0%}")
    return t
