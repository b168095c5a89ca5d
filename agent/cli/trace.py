"""``autoexplain trace``: causal tracing (ROME) on a task whose prompts name their subject, stored as a grid.

The subject's input embeddings are noised, then one clean state (residual stream, attention output or MLP output)
at one (layer, position) is restored at a time; the grid says where restoring brings the answer back
(:mod:`autoexplain.tools.tracing`). Everything checkable without weights (flags, the task, the database path) is
checked first.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Annotated

import typer

from autoexplain.agent.cli.common import (
    DbOpt,
    DeviceOpt,
    Fmt,
    ModelOpt,
    check_db_path,
    console,
    open_store,
    print_rows,
    resolve_task,
    resolved_task_path,
    run_guard,
)
from autoexplain.tools.errors import InputError

_STATES = ("resid", "attn", "mlp")


def trace(model: ModelOpt,
          task: Annotated[str, typer.Option("--task", "-t", help="task file whose prompts carry a \"subject\", "
                                                                 "toy:WORLD/TASK, or for a toy model a toy task "
                                                                 "name (facts)")],
          states: Annotated[str, typer.Option(help="state kinds to restore, comma-separated: resid, attn, "
                                                   "mlp")] = "resid,attn,mlp",
          noise: Annotated[float, typer.Option(help="noise std as a multiple of the token-embedding std "
                                                    "(ROME: 3)")] = 3.0,
          samples: Annotated[int, typer.Option(help="noise samples per prompt")] = 10,
          window: Annotated[int, typer.Option(help="layers restored together for attn and mlp cells")] = 1,
          prompts: Annotated[int, typer.Option(help="prompts of the task to trace (the first N)")] = 20,
          db: DbOpt = None,
          format: Annotated[Fmt, typer.Option("--format", "-o", help="table (default), json or csv")] = Fmt.table,
          device: DeviceOpt = None) -> None:
    """Causal tracing (ROME): noise the subject tokens' embeddings, restore one clean state per (layer, position),
    and print how much of the answer's probability each restores (normalised: 1 = all of it). Stored in
    causal_traces and causal_trace_cells. Intervention-level evidence for these prompts."""
    kinds = [s.strip() for s in states.split(",") if s.strip()]
    bad = [s for s in kinds if s not in _STATES]
    if not kinds or bad:
        raise InputError(f"--states {states!r}: choose among {', '.join(_STATES)} (comma-separated)")
    if not 0 < noise <= 100:
        raise InputError(f"--noise must be in (0, 100], got {noise}")
    if not 1 <= samples <= 64:
        raise InputError(f"--samples must be between 1 and 64, got {samples}")
    if not 1 <= window <= 64:
        raise InputError(f"--window must be between 1 and 64, got {window}")
    if not 1 <= prompts <= 32:
        raise InputError(f"--prompts must be between 1 and 32, got {prompts}")
    label, path = resolve_task(task, model)
    if path is not None:
        _check_subjects(path)
    check_db_path(db)
    from autoexplain.tools.loading import check_specs, load_model

    check_specs(model)
    lm = load_model(model, device=device)
    from autoexplain.agent.store.rows import trace_rows
    from autoexplain.tools.tracing import causal_trace, prompts_from_task_file

    texts, subjects, answers = prompts_from_task_file(resolved_task_path(label, path), limit=prompts)
    store = open_store(db)
    run_id = f"trace-{uuid.uuid4().hex[:10]}"
    store.start_run(run_id, "trace", {"model": model, "task": label, "states": kinds, "noise": noise,
                                      "samples": samples, "window": window, "prompts": prompts})
    with run_guard(store, run_id):
        grid = causal_trace(lm, texts, subject=subjects, answers=answers, states=kinds, noise=noise,
                            n_samples=samples, window=window)
        store.record_model_and_saes(lm, [])
        trace_id = f"trace-{uuid.uuid4().hex[:12]}"
        store.upsert_many(trace_rows(trace_id, lm.model_id, grid, task=label, run_id=run_id))
        store.finish_run(run_id, "done", {"trace_id": trace_id, "prompts_used": grid.n_used})
    if format is Fmt.json:
        print(json.dumps({"trace_id": trace_id, **grid.model_dump(mode="json")}, indent=1))
        return
    con = console()
    con.print(grid.summary_text(), markup=False, highlight=False)
    for kind, g in grid.grids.items():
        values = g.normalized if g.normalized is not None else g.effect
        what = "normalised effect" if g.normalized is not None else "effect (p_restored - p_corrupted)"
        if format is Fmt.table:
            con.print(f"{kind}: {what}, rows = restored state, columns = positions", markup=False, highlight=False)
        print_rows(["state", *grid.columns],
                   [(site, *("-" if v is None else f"{v:.2f}" for v in row)) for site, row in zip(g.sites, values,
                                                                                                  strict=True)],
                   format)
    con.print(f"database: {store.path.resolve()}  (run {run_id}, trace {trace_id}; tables causal_traces, "
              "causal_trace_cells)", markup=False, highlight=False)


def _check_subjects(path: Path) -> None:
    """A task for tracing names each prompt's subject: refuse one that does not before any weights load."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8")).get("prompts") or []
    except (OSError, json.JSONDecodeError, AttributeError):
        return  # the loader says what is wrong with the file
    missing = [i for i, r in enumerate(raw) if not isinstance(r, dict) or not r.get("subject")]
    if missing:
        raise InputError(f"--task {str(path)!r}: prompts {missing[:5]} name no \"subject\" (the tokens causal "
                         "tracing noises); add a \"subject\" string to every prompt, as the toy world's facts task "
                         "does")
