"""``autoexplain label`` and ``autoexplain run PLAN``: the agent over many items.

Each builds a :class:`~autoexplain.agent.runner.Plan`, validates it completely (model, SAEs, datasets, tasks,
feature ranges, LLM settings) before the database is opened, then runs it through the agent with a live display:
a progress bar of items, one line per finished item (status, explanation, scores) and a final table.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

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

if TYPE_CHECKING:
    from autoexplain.agent.runner import ItemExecutor


class ExecutorChoice(StrEnum):
    serial = "serial"
    ray = "ray"


ExecutorOpt = Annotated[ExecutorChoice, typer.Option(
    "--executor", help="where the items run: serial (here, one after another) or ray (Ray actors that each load "
                       "the model once; this process alone writes the database)")]
AddressOpt = Annotated[str | None, typer.Option(
    "--address", help="with --executor ray: auto (the cluster this machine belongs to) or ray://HOST:PORT "
                      "(default: start a local Ray on this machine)")]
WorkersOpt = Annotated[int | None, typer.Option("--workers", help="with --executor ray: actors (default 2)")]
GpusOpt = Annotated[float | None, typer.Option("--gpus-per-worker", help="with --executor ray: GPUs each actor "
                                                                         "reserves (default 0)")]
LLMRateOpt = Annotated[float | None, typer.Option("--llm-rate", help="with --executor ray: LLM requests per "
                                                                     "second over all actors (default 5)")]


def _executor(executor: ExecutorChoice, address: str | None, workers: int | None, gpus: float | None,
              llm_rate: float | None) -> ItemExecutor:
    from autoexplain.agent.executors import make_executor

    return make_executor(executor.value, address=address, workers=workers, gpus_per_worker=gpus,
                         llm_rate=llm_rate)


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
        executor: ExecutorOpt = ExecutorChoice.serial, address: AddressOpt = None, workers: WorkersOpt = None,
        gpus_per_worker: GpusOpt = None, llm_rate: LLMRateOpt = None,
) -> None:
    """Label SAE features with the agent: harvest (if needed), explain from the explain split, score each
    explanation on the held-out split, keep the best. Dead features are stored as dead, never labelled."""
    items_on = _executor(executor, address, workers, gpus_per_worker, llm_rate)
    plan = plan_from({"name": "label", "model": model, "policy": policy.value, "llm_model": llm_model,
                      "judge": judge.value, "embedding": embedding, "device": device, "judgements": judgements.value,
                  "budget": {"steps": max_steps, "llm_tokens": max_tokens, "seconds": max_seconds},
                  "llm": llm_settings(llm_max_tokens, llm_timeout),
                  "items": [{"label": {"sae": sae, "dataset": dataset, "features": features, "tokens": tokens}}]})
    res, store, _ = execute(plan, db, kind="label", resume=resume, executor=items_on)
    show_summary(res, store)
    console().print(f"database: {store.path.resolve()}  (run {res.run_id})")
    exit_if_pending(res, "run the same command with --resume to continue")


def run(plan_file: Annotated[Path, typer.Argument(help="YAML or JSON plan (see README)")],
        resume: Annotated[bool, typer.Option(help="continue the newest unfinished run of this plan: finished "
                                                  "items are kept, the interrupted one resumes")] = False,
        db: DbOpt = None, llm_max_tokens: LLMMaxTokensOpt = None, llm_timeout: LLMTimeoutOpt = None,
        executor: ExecutorOpt = ExecutorChoice.serial, address: AddressOpt = None, workers: WorkersOpt = None,
        gpus_per_worker: GpusOpt = None, llm_rate: LLMRateOpt = None) -> None:
    """Run a plan of many items (overnight batches); crash-safe and resumable with --resume. --llm-max-tokens
    and --llm-timeout override the plan's llm: settings (a changed max_tokens is a different plan). Exit code 3:
    items left unstarted by the run budget (--resume continues); 130: interrupted. --executor ray runs the items
    on Ray actors (a local Ray unless --address), with the same results and the same crash safety."""
    from autoexplain.agent.runner import load_plan

    items_on = _executor(executor, address, workers, gpus_per_worker, llm_rate)
    plan = load_plan(plan_file)
    if llm_max_tokens is not None or llm_timeout is not None:
        plan = plan_from({**plan.model_dump(mode="json"),
                          "llm": {**plan.llm.overrides(), **llm_settings(llm_max_tokens, llm_timeout)}})
    res, store, _ = execute(plan, db, kind="plan", resume=resume,
                            resume_hint=f"autoexplain run {plan_file} --resume continues the run", executor=items_on)
    show_summary(res, store)
    console().print(f"database: {store.path.resolve()}  (run {res.run_id})")
    exit_if_pending(res, f"autoexplain run {plan_file} --resume continues the run")
