"""``autoexplain label``, ``autoexplain run PLAN`` and the agent side of ``autoexplain circuit``.

Each builds a :class:`~autoexplain.agent.runner.Plan`, validates it completely (model, SAEs, datasets, tasks,
feature ranges, LLM settings) before the database is opened, then runs it through the agent with a live display:
a progress bar of items, one line per finished item (status, explanation, scores) and a final table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from autoexplain.tools.errors import InputError

DbOpt = Annotated[Path | None, typer.Option("--db", help="DuckDB file (default: $AUTOEXPLAIN_DB or "
                                                         "./autoexplain.duckdb)")]
PolicyOpt = Annotated[str, typer.Option("--policy", help="offline (deterministic, default) or llm "
                                                         "(OPENAI_API_KEY, OPENAI_BASE_URL, --llm-model)")]
LLMModelOpt = Annotated[str | None, typer.Option("--llm-model", help="model name at the OpenAI-compatible "
                                                                     "endpoint (policy or judge llm)")]
JudgeOpt = Annotated[str, typer.Option("--judge", help="who scores labels: lexical (default), embedding "
                                                       "(MiniLM, needs the [judges] extra) or llm")]
StepsOpt = Annotated[int, typer.Option("--max-steps", help="graph steps per item before it ends with the best "
                                                           "explanation so far")]
TokensOpt = Annotated[int, typer.Option("--max-tokens", help="LLM tokens per item")]
SecondsOpt = Annotated[float, typer.Option("--max-seconds", help="wall seconds per item")]


def _plan(data: dict[str, Any]) -> Any:
    from pydantic import ValidationError

    from autoexplain.agent.runner import Plan, validation_message

    try:
        return Plan.model_validate(data)
    except ValidationError as exc:
        raise InputError(validation_message(exc, "arguments", as_flags=True)) from None


def execute(plan: Any, db: Path | None, *, kind: str, resume: bool = False) -> Any:
    """Validate, open the store, run with a live display, print the summary; return the RunResult."""
    from autoexplain.agent.cli import _console, _open_store, _progress
    from autoexplain.agent.runner import prepare, run_plan

    if plan.policy == "llm" or plan.judge == "llm":
        from autoexplain.agent.llm import LLMConfig

        LLMConfig.from_env(plan.llm_model)  # a missing key or endpoint fails before anything is written
    with _progress() as report:
        prep = prepare(plan)
    store = _open_store(db)
    con = _console(stderr=True)

    def on_item(o: Any) -> None:
        sc = "  ".join(f"{k[:4]} {v:.2f}" for k, v in o.scores.items() if v is not None)
        tag = "(resumed: already done)" if o.skipped else ""
        text = (o.text or o.error or "")[:90]
        used = "" if o.skipped else f"{o.usage.steps} steps, {o.usage.tool_calls} tools, " \
                                    f"{o.usage.tokens} LLM tokens, {o.usage.seconds:.1f} s"
        con.print(f"  {o.status.value:>14}  {o.target[:40]:<40} {sc:<34} [{used}] {text} {tag}")

    with _progress() as report:
        res = run_plan(store, prep, kind=kind, resume=resume, report=report, on_item=on_item)
    return res, store, prep


def show_summary(res: Any, store: Any) -> None:
    from rich.table import Table

    from autoexplain.agent.cli import _console

    con = _console()
    t = Table("kind", "items", "done", "budget-limited", "failed", "dead", "mean correctness", "mean completeness",
              "mean succinctness")
    rows = store.query(
        "select w.kind, count(*), count(*) filter (where w.status = 'done'), "
        "count(*) filter (where w.status = 'budget_limited'), count(*) filter (where w.status = 'failed'), "
        "count(*) filter (where e.text like 'dead feature%'), avg(b.correctness), avg(b.completeness), "
        "avg(b.succinctness) from work_items w "
        "left join explanations e on e.item_id = w.item_id and e.is_final "
        "left join best_explanations b on b.explanation_id = e.explanation_id "
        "where w.run_id = ? group by w.kind order by w.kind", [res.run_id])[1]
    for r in rows:
        t.add_row(*(str(x) for x in r[:6]), *("-" if x is None else f"{x:.3f}" for x in r[6:]))
    con.print(t)
    con.print(f"run {res.run_id}: {len(res.outcomes)} items in {res.seconds:.1f} s "
              f"(harvest {res.harvest_seconds:.1f} s)")


def label(
        model: Annotated[str, typer.Option("--model", "-m", help="local HF dir, hub name or toy:NAME")],
        sae: Annotated[str, typer.Option("--sae", "-s", help="sae-lens dir, toy:MODEL/NAME or RELEASE/ID")],
        dataset: Annotated[str | None, typer.Option("--dataset", "-d", help=".txt/.jsonl/.parquet or hub name "
                                                                            "(default for toy models: the toy "
                                                                            "corpus)")] = None,
        features: Annotated[str, typer.Option("--features", "-f", help="all, 0-99, or 1,5,9")] = "all",
        tokens: Annotated[int, typer.Option("--tokens", "-n", help="tokens to harvest if not harvested yet")]
        = 60_000,
        policy: PolicyOpt = "offline", llm_model: LLMModelOpt = None, judge: JudgeOpt = "lexical",
        embedding: Annotated[bool, typer.Option(help="also score with MiniLM embeddings (needs [judges])")] = False,
        judgements: Annotated[str, typer.Option("--judgements", help="per-example judge decisions to keep: final "
                                                                     "(the chosen label's) or all (every scored "
                                                                     "draft's)")] = "final",
        max_steps: StepsOpt = 40, max_tokens: TokensOpt = 200_000, max_seconds: SecondsOpt = 600.0,
        resume: Annotated[bool, typer.Option(help="continue the newest unfinished identical run")] = False,
        db: DbOpt = None,
        device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N (default: cuda if present)")] = None,
) -> None:
    """Label SAE features with the agent: harvest (if needed), explain from the explain split, score each
    explanation on the held-out split, keep the best. Dead features are stored as dead, never labelled."""
    plan = _plan({"name": "label", "model": model, "policy": policy, "llm_model": llm_model, "judge": judge,
                  "embedding": embedding, "device": device, "judgements": judgements,
                  "budget": {"steps": max_steps, "llm_tokens": max_tokens, "seconds": max_seconds},
                  "items": [{"label": {"sae": sae, "dataset": dataset, "features": features, "tokens": tokens}}]})
    res, store, _ = execute(plan, db, kind="label", resume=resume)
    show_summary(res, store)
    from autoexplain.agent.cli import _console

    _console().print(f"database: {store.path.resolve()}  (run {res.run_id})")


def run(plan_file: Annotated[Path, typer.Argument(help="YAML or JSON plan (see README)")],
        resume: Annotated[bool, typer.Option(help="continue the newest unfinished run of this plan: finished "
                                                  "items are kept, the interrupted one resumes")] = False,
        db: DbOpt = None) -> None:
    """Run a plan of many items (overnight batches); crash-safe and resumable with --resume."""
    from autoexplain.agent.runner import load_plan

    res, store, _ = execute(load_plan(plan_file), db, kind="plan", resume=resume)
    show_summary(res, store)
    from autoexplain.agent.cli import _console

    _console().print(f"database: {store.path.resolve()}  (run {res.run_id})")
