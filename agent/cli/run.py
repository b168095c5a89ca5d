"""``autoexplain label`` and ``autoexplain run PLAN``: the agent over many items.

Each builds a :class:`~autoexplain.agent.runner.Plan`, validates it completely (model, SAEs, datasets, tasks,
feature ranges, LLM settings) before the database is opened, then runs it through the agent with a live display:
a progress bar of items, one line per finished item (status, explanation, scores) and a final table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from autoexplain.agent.cli.common import (
    DbOpt,
    JudgeChoice,
    JudgeOpt,
    KeepChoice,
    LLMMaxTokensOpt,
    LLMModelOpt,
    LLMTimeoutOpt,
    PolicyChoice,
    PolicyOpt,
    SecondsOpt,
    StepsOpt,
    TokensOpt,
    console,
    execute,
    exit_if_pending,
    llm_settings,
    plan_from,
    show_summary,
)


def label(
        model: Annotated[str, typer.Option("--model", "-m", help="local HF dir, hub name or toy:NAME")],
        sae: Annotated[str, typer.Option("--sae", "-s", help="sae-lens dir, toy:MODEL/NAME or RELEASE/ID")],
        dataset: Annotated[str | None, typer.Option("--dataset", "-d", help=".txt/.jsonl/.parquet file, a folder "
                                                                            "of them, or hub name (default for toy "
                                                                            "models: the toy corpus)")] = None,
        features: Annotated[str, typer.Option("--features", "-f", help="all, 0-99, 1,5,9, or live / live:N (the "
                                                                       "features that fired, or the first N of "
                                                                       "them)")] = "all",
        tokens: Annotated[int, typer.Option("--tokens", "-n", help="tokens to harvest if not harvested yet")]
        = 60_000,
        policy: PolicyOpt = PolicyChoice.offline, llm_model: LLMModelOpt = None,
        judge: JudgeOpt = JudgeChoice.lexical,
        llm_max_tokens: LLMMaxTokensOpt = None, llm_timeout: LLMTimeoutOpt = None,
        embedding: Annotated[bool, typer.Option(help=("also score with MiniLM embeddings (needs the [judges] "
                                                             "extra)"))] = False,
        judgements: Annotated[KeepChoice, typer.Option(
            "--judgements", help="per-example judge decisions to keep: final (the chosen label's) or all (every "
                                 "scored draft's)")] = KeepChoice.final,
        max_steps: StepsOpt = 40, max_tokens: TokensOpt = 200_000, max_seconds: SecondsOpt = 600.0,
        resume: Annotated[bool, typer.Option(help="continue the newest unfinished identical run")] = False,
        db: DbOpt = None,
        device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N (default: cuda if present)")] = None,
) -> None:
    """Label SAE features with the agent: harvest (if needed), explain from the explain split, score each
    explanation on the held-out split, keep the best. Dead features are stored as dead, never labelled."""
    plan = plan_from({"name": "label", "model": model, "policy": policy.value, "llm_model": llm_model,
                      "judge": judge.value, "embedding": embedding, "device": device, "judgements": judgements.value,
                  "budget": {"steps": max_steps, "llm_tokens": max_tokens, "seconds": max_seconds},
                  "llm": llm_settings(llm_max_tokens, llm_timeout),
                  "items": [{"label": {"sae": sae, "dataset": dataset, "features": features, "tokens": tokens}}]})
    res, store, _ = execute(plan, db, kind="label", resume=resume)
    show_summary(res, store)
    console().print(f"database: {store.path.resolve()}  (run {res.run_id})")
    exit_if_pending(res, "run the same command with --resume to continue")


def run(plan_file: Annotated[Path, typer.Argument(help="YAML or JSON plan (see README)")],
        resume: Annotated[bool, typer.Option(help="continue the newest unfinished run of this plan: finished "
                                                  "items are kept, the interrupted one resumes")] = False,
        db: DbOpt = None, llm_max_tokens: LLMMaxTokensOpt = None, llm_timeout: LLMTimeoutOpt = None) -> None:
    """Run a plan of many items (overnight batches); crash-safe and resumable with --resume. --llm-max-tokens
    and --llm-timeout override the plan's llm: settings (a changed max_tokens is a different plan). Exit code 3:
    items left unstarted by the run budget (--resume continues); 130: interrupted."""
    from autoexplain.agent.runner import load_plan

    plan = load_plan(plan_file)
    if llm_max_tokens is not None or llm_timeout is not None:
        plan = plan_from({**plan.model_dump(mode="json"),
                          "llm": {**plan.llm.overrides(), **llm_settings(llm_max_tokens, llm_timeout)}})
    res, store, _ = execute(plan, db, kind="plan", resume=resume,
                            resume_hint=f"autoexplain run {plan_file} --resume continues the run")
    show_summary(res, store)
    console().print(f"database: {store.path.resolve()}  (run {res.run_id})")
    exit_if_pending(res, f"autoexplain run {plan_file} --resume continues the run")
