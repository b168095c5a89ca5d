"""``autoexplain heads``: the role of every attention head (previous-token, duplicate-token, induction, copying,
suppression, attends-BOS), with scores and composition edges, and optionally where each head attends on a task.

Everything checkable without weights (flags, the task, the model spec) is checked first: a bad call costs no model
load. The data is the pydantic :class:`~autoexplain.tools.heads.RoleTable` (:func:`head_roles_data` returns it
for callers that store it); ``--format json`` prints it whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from autoexplain.agent.cli.common import (
    DeviceOpt,
    Fmt,
    ModelOpt,
    check_db_path,
    console,
    load_resolved_task,
    open_store,
    print_rows,
    resolve_task,
    run_guard,
)
from autoexplain.tools.errors import InputError

if TYPE_CHECKING:
    from autoexplain.tools.data import TaskFile
    from autoexplain.tools.heads import AttentionPatternOut, RoleTable
    from autoexplain.tools.models import LoadedModel

TaskOpt = Annotated[str | None, typer.Option("--task", "-t", help="a circuit task file, toy:WORLD/TASK, or (for a toy "
                                                                  "model) a toy task name such as induction")]
#: Prompts of the task whose answer-position attention is printed.
_TASK_PROMPTS = 3


def head_roles_data(lm: LoadedModel, seqs: int = 32) -> RoleTable:
    """The role table the command prints (for callers that store it)."""
    from autoexplain.tools.heads import role_table

    return role_table(lm, n_seqs=seqs)


def task_attention(lm: LoadedModel, task: TaskFile, n_prompts: int = _TASK_PROMPTS,
                   top_k: int = 3) -> AttentionPatternOut:
    """Every head's top attended positions at the answer position of the task's first clean prompts."""
    from autoexplain.tools.data import tokenize_task
    from autoexplain.tools.heads import attention_patterns

    if lm.tokenizer is None:
        raise InputError("--task needs a model with a tokenizer (task prompts are text)")
    tt = tokenize_task(task, lm.tokenizer, n_ctx=lm.n_ctx)
    prompts = []
    for i in range(min(n_prompts, tt.n_prompts)):
        ids = tt.clean[i, : int(tt.seq_lens[i])].tolist()
        prompts.append((task.prompts[i].clean, [int(x) for x in ids]))
    return attention_patterns(lm, prompts, positions=[-1], top_k=top_k)


def _store(db: Path, lm: LoadedModel, table: RoleTable) -> None:
    """The table as ``head_roles`` rows, in a run of kind ``heads``."""
    import uuid

    from autoexplain.agent.store.rows import head_role_rows

    store = open_store(db)
    run_id = f"heads-{uuid.uuid4().hex[:10]}"
    store.start_run(run_id, "heads", {"model": lm.spec, "n_seqs": table.sequences.get("n_seqs")})
    with run_guard(store, run_id):
        store.record_model_and_saes(lm, [])
        store.upsert("head_roles", head_role_rows(lm.model_id, table, run_id))
        store.finish_run(run_id, "done", {"heads": len(table.heads)})


def _rows(table: RoleTable) -> tuple[list[str], list[tuple[Any, ...]]]:
    cols = ["head", "best_role", "score", "other_notable", "composed_from", "composes_into",
            *(f"{r}" for r in ("previous_token", "duplicate_token", "induction", "attends_bos", "copying",
                               "suppression"))]
    rows = []
    for h in table.heads:
        other = ", ".join(f"{r.value} {h.scores[r.value]:.2f}" for r in h.notable if r != h.best_role)
        rows.append((str(h.node), h.best_role.value if h.best_role else "-",
                     "-" if h.best_score is None else f"{h.best_score:.3f}", other or "-",
                     ",".join(h.composed_from) or "-", ",".join(h.composes_into) or "-",
                     *("n/a" if h.scores[c] is None else f"{h.scores[c]:.3f}" for c in cols[6:])))
    return cols, rows


def heads(model: ModelOpt, task: TaskOpt = None,
          format: Annotated[Fmt, typer.Option("--format", "-o", help="table (default), json or csv")] = Fmt.table,
          seqs: Annotated[int, typer.Option("--seqs", help="repeated random sequences for the attention "
                                                           "scores")] = 32,
          device: DeviceOpt = None,
          db: Annotated[Path | None, typer.Option("--db", help="also store the table in this DuckDB file "
                                                                "(table head_roles)")] = None) -> None:
    """Head roles: previous-token, duplicate-token, induction, attends-BOS (attention on repeated random token
    sequences), copying and suppression (OV-circuit eigenvalues), the best role per head (cut 0.5) and
    Q/K/V-composition edges above a random baseline. Association-level evidence; check a role by intervention with
    the verify_head_role tool. With --task, also where every head attends at the answer position of the task's
    first clean prompts."""
    if not 1 <= seqs <= 512:
        raise InputError(f"--seqs must be between 1 and 512, got {seqs}")
    from autoexplain.tools.loading import check_specs, load_model

    resolved = resolve_task(task, model) if task is not None else None
    if db is not None:
        check_db_path(db)
    check_specs(model)
    lm = load_model(model, device=device)
    task_file = load_resolved_task(*resolved) if resolved is not None else None
    att = task_attention(lm, task_file) if task_file is not None else None  # tokenisation refused before the table
    table = head_roles_data(lm, seqs)
    if db is not None:
        _store(db, lm, table)
    if format is Fmt.json:
        import json

        data = table.model_dump(mode="json")
        if att is not None:
            data["task_attention"] = {"task": resolved[0] if resolved else None, **att.model_dump(mode="json")}
        print(json.dumps(data, indent=1))
        return
    cols, rows = _rows(table)
    if format is Fmt.csv:
        print_rows(cols, rows, Fmt.csv)
        return
    con = console()
    s = table.sequences
    con.print(f"head roles of {table.model_id}: attention on {s['n_seqs']} repeated random sequences of length "
              f"{s['seq_len']}, OV eigenvalues; cut {table.cut}; {table.seconds:.2f} s (association only)",
              markup=False, highlight=False)
    print_rows(cols[:6], [r[:6] for r in rows], Fmt.table)
    if table.composition:
        top = sorted(table.composition, key=lambda c: -c.ratio)[:12]
        con.print("composition above " f"{table.composition_ratio}x baseline ({top[0].baseline:.3g}): "
                  + "; ".join(f"{c.src}->{c.dst}.{c.kind} {c.score:.3f}" for c in top)
                  + (f" (+{len(table.composition) - 12} more)" if len(table.composition) > 12 else ""),
                  markup=False, highlight=False)
    for note in table.notes:
        con.print(f"note: {note}", markup=False, highlight=False)
    if att is not None and resolved is not None:
        from rich.table import Table

        t = Table("head", *(f"prompt {i} @{p.tokens[-1]!r}" for i, p in enumerate(att.prompts)),
                  title=f"attention at the answer position, {resolved[0]} (top 3 positions: token weight)")
        by_head: dict[str, list[str]] = {}
        for p in att.prompts:
            for q in p.queries:
                by_head.setdefault(str(q.head), []).append(
                    "  ".join(f"{a.position}{a.token!r} {a.weight:.2f}" for a in q.top))
        for head, cells in by_head.items():
            t.add_row(head, *cells)
        con.print(t)
