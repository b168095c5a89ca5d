"""``autoexplain check`` (load and validate, write nothing) and ``autoexplain harvest``."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from autoexplain.agent.cli.common import (
    DbOpt,
    check_db_path,
    console,
    dataset_probe,
    open_store,
    progress,
    run_guard,
    validated,
)
from autoexplain.tools.errors import InputError

if TYPE_CHECKING:
    from autoexplain.agent.store import Store
    from autoexplain.tools.harvest import HarvestIn, HarvestOut, HarvestWork
    from autoexplain.tools.models import LoadedModel
    from autoexplain.tools.saes import LoadedSAE

def check(model: Annotated[str, typer.Option("--model", "-m", help="local HF dir, hub name or toy:NAME")],
          sae: Annotated[list[str] | None, typer.Option("--sae", "-s", help="sae-lens dir, toy:MODEL/NAME or "
                                                                            "RELEASE/ID (repeatable)")] = None,
          dataset: Annotated[str | None, typer.Option("--dataset", "-d", help=".txt/.jsonl/.parquet file, a "
                                                                               "folder of them, or hub name")]
          = None,
          task: Annotated[Path | None, typer.Option("--task", "-t", help="circuit task file (JSON)")] = None,
          ctx: Annotated[int | None, typer.Option(help="token window for the dataset (default: model "
                                                         "context, at most 128)")] = None,
          device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N (default: cuda if present)")]
          = None) -> None:
    """Load a model (and SAEs, a dataset, a task file) and check they fit together; writes nothing.

    Every site is checked to exist and fire; each SAE's hook and width are checked against the model; the
    dataset is tokenised into windows; the task file is validated and the model's top-1 accuracy on it shown.
    """
    from autoexplain.tools.data import check_dataset_spec, load_task_file, load_texts, tokenize_task, tokenize_windows
    from autoexplain.tools.loading import check_specs, load_model, load_sae
    from autoexplain.tools.zoo import task_accuracy

    # everything that needs no weights first: a typo costs no model load
    check_specs(model, sae or [])
    if dataset is not None:
        check_dataset_spec(dataset)
    task_file = load_task_file(task) if task is not None else None
    con = console()
    lm = load_model(model, device=device, sae_specs=sae or [])
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
    if task is not None and task_file is not None:
        try:
            tt = tokenize_task(task_file, lm.tokenizer, n_ctx=lm.n_ctx)
        except InputError as exc:
            raise InputError(exc.message if str(task) in exc.message else f"task file {str(task)!r}: {exc}") from None
        con.print(f"task {task}: {tt.n_prompts} prompts valid; model top-1 accuracy {task_accuracy(lm, tt):.1%}")



def harvest_cmd(
        model: Annotated[str, typer.Option("--model", "-m", help="local HF dir, hub name or toy:NAME")],
        sae: Annotated[str, typer.Option("--sae", "-s", help="sae-lens dir, toy:MODEL/NAME or RELEASE/ID")],
        dataset: Annotated[str, typer.Option("--dataset", "-d", help=".txt/.jsonl/.parquet file, a folder of "
                                                                     "them, or hub name")],
        tokens: Annotated[int, typer.Option("--tokens", "-n", help="tokens to stream through")] = 200_000,
        ctx: Annotated[int | None, typer.Option(help="window length (BOS first; default 64, at most the model's "
                                                     "context and the SAE's training context_size)")] = None,
        batch_size: Annotated[int, typer.Option(help="windows per forward pass")] = 32,
        top_k: Annotated[int, typer.Option(help="top contexts kept per feature")] = 20,
        checkpoint_every: Annotated[int, typer.Option(help="batches between checkpoints")] = 20,
        db: DbOpt = None,
        device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N (default: cuda if present)")] = None,
) -> None:
    """Stream a dataset through model + SAE once; store every feature's statistics and examples.

    Interrupted runs resume: run the same command again and finished batches are not recomputed. The SAE's stored
    rows from an earlier harvest (another dataset or token budget) are replaced; later label and run reuse
    this harvest when they ask for the same dataset, tokens and window. Two processes harvesting the same inputs at
    once: the second is refused (exit code 2) — it does not wait.
    """
    from autoexplain.tools.data import available_tokens, check_dataset_spec
    from autoexplain.tools.harvest import HarvestIn, check_args, default_ctx, harvest_work
    from autoexplain.tools.loading import check_specs, load_model, load_sae

    # everything that needs no weights first: a typo costs no model load
    validated(HarvestIn, sae_id=sae, dataset=dataset, n_tokens=tokens, ctx=64 if ctx is None else ctx,
              batch_size=batch_size, top_k=top_k, checkpoint_every=checkpoint_every)
    check_specs(model, [sae])
    check_dataset_spec(dataset)
    check_db_path(db)
    lm = load_model(model, device=device, sae_specs=[sae])
    s = load_sae(sae, lm)
    args = validated(HarvestIn, sae_id=s.sae_id, dataset=dataset, n_tokens=tokens,
                     ctx=default_ctx(lm.n_ctx, s) if ctx is None else ctx, batch_size=batch_size, top_k=top_k,
                     checkpoint_every=checkpoint_every)
    check_args(args, lm.n_ctx, s)  # --ctx beyond the model's or the SAE's context: refused before the db opens
    next(iter(dataset_probe(dataset)))  # a missing or empty dataset fails before anything is written
    # every line the pass will read is parsed and tokenised now: a broken one fails before anything is written
    available_tokens(dataset, lm.tokenizer, ctx=args.ctx, n_ctx=lm.n_ctx, max_tokens=args.n_tokens)
    with harvest_work(lm.model_id, s.sae_id, args) as work:  # another process on the same inputs: refused
        store = open_store(db)
        run_id = f"harvest-{uuid.uuid4().hex[:10]}"
        store.start_run(run_id, "harvest", {"model": model, "sae": sae, **args.model_dump()})
        store.record_model_and_saes(lm, [s])
        try:
            with run_guard(store, run_id):
                out = harvest_into(store, run_id, lm, s, args, work)
                store.finish_run(run_id, "done", out.model_dump())
        except KeyboardInterrupt:  # the pass checkpointed the batches it finished before stopping
            from autoexplain.tools.errors import Interrupted

            raise Interrupted(f"interrupted: run {run_id} is marked interrupted; the harvest's finished batches are "
                              f"checkpointed in {work.path}; run the same command again to resume after them "
                              "(nothing was stored in the database yet)") from None
    con = console()
    con.print(out.summary())
    if out.resumed_from_batch:
        con.print(f"(resumed after batch {out.resumed_from_batch})")
    con.print(f"database: {store.path.resolve()}  (run {run_id})")


def harvest_into(store: Store, run_id: str, lm: LoadedModel, sae: LoadedSAE, args: HarvestIn,
                 work: HarvestWork | None = None) -> HarvestOut:
    """Run a harvest with a progress bar, its rows going to ``store`` tagged with ``run_id`` (``work``: a work
    folder the caller owns, see :func:`autoexplain.tools.harvest.harvest_work`)."""
    from autoexplain.agent.store.harvest import harvest_sink
    from autoexplain.tools.harvest import harvest
    from autoexplain.tools.registry import ToolContext

    with progress() as report:
        stage = f"harvest {sae.spec} ({sae.sae_id})"
        return harvest(ToolContext(model=lm, saes={sae.sae_id: sae}, sink=harvest_sink(store, run_id)), args,
                       progress=lambda done, total: report(stage, done, total), work=work,
                       finish_progress=lambda done, total: report(f"store {sae.spec}", done, total))


