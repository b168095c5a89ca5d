"""The Ray executor: a run's work items on a pool of Ray actors, its results written by the driver alone.

How a run goes
--------------
The driver (the ``autoexplain run`` / ``label`` process) prepares the run as a serial run does: it loads the model,
harvests, fixes the held-out splits and lists the items. Then:

1. Items already finished in the store, or finished in the driver's checkpoints but not committed (a driver that
   was killed), are settled here exactly as the serial loop settles them (:func:`autoexplain.agent.runner._run_items`
   reads them back; nothing is recomputed).
2. The driver checkpoints the database and copies it once (the *snapshot*): every actor opens its own private copy,
   so the tools, the scorers and the dead-feature check read the harvest, the splits and the tool cache as they
   would in the driver, while the driver keeps the only writable handle on the real file. A local cluster gets the
   snapshot's path; a remote one (``--address``) gets its bytes through Ray's object store.
3. ``workers`` actors each load the model and SAEs once (:func:`autoexplain.agent.runner.prepare`, the loading path
   of any run) and then run items one at a time through the same per-item agent graph as a serial run
   (:func:`autoexplain.agent.runner._run_items` on a one-item list, with an in-memory checkpointer). Every row an
   item writes, the rows written at once included (tool results over a second, LLM calls), is captured in the
   actor and comes back with the item's outcome.
4. The driver receives finished items as they come. It first makes each durable in its own checkpointer: one
   langgraph checkpoint per item (``update_state(..., as_node="accept")``) carrying all its rows and its outcome,
   which is exactly the state of a serial item that finished but was not committed yet. Then the rows go through the
   run's :class:`~autoexplain.agent.store.outbox.Outbox` and are committed in groups with the usual policy; a
   committed item's checkpoint is deleted. A driver killed at any point therefore loses nothing finished:
   ``--resume`` (serial or Ray) recovers those items from the checkpoints and runs only the others.

The harvest before the items (an SAE not harvested yet) is sharded too when the run uses this executor
(:meth:`RayExecutor.harvest`, through :mod:`autoexplain.tools.harvest_merge`): one Ray task per worker runs a
contiguous range of the harvest's batches, and the driver merges the partial statistics exactly (the stored rows
equal one pass's) and stores them. Shard tasks run on the CPU unless ``gpus_per_worker`` > 0, so a driver on a GPU
gets a CPU harvest's values (equal to a serial CPU harvest, not bit-equal to a GPU one).

A worker that dies (its process killed, its node lost) loses only the item it was running, whose rows never left
it: the driver starts a fresh actor in its place and gives the item to the next free actor, so no row is written
twice (each actor holds up to :attr:`RayExecutor.DEPTH` items, all given to other actors when it dies). An item
whose workers died ``max_retries + 1`` times is stored ``failed`` with the reason; its ``attempts`` count every
actor it was given to.

Caveats
-------
* Results equal a serial run's (timings and the ``cached`` flag of tool calls aside: an actor's tool cache is the
  snapshot plus what it computed itself, so a result another actor computed is recomputed, to the same value).
* The run budget (``run_budget``) is checked by the driver between items: items already running finish, and an
  item is never stopped mid-way by the run budget as in a serial run (per-item budgets apply as usual).
* ``on_node`` hooks are not called (the nodes run in other processes); progress is per item, on the driver.
* LLM calls of every actor share one token bucket (a Ray actor, ``llm_rate`` requests per second); an actor that
  dies loses its LLM responses not yet returned, so a retried item may repeat those calls.
* The snapshot is a copy of the whole database file per actor: fine for the harvests of a few SAEs, costly for a
  database of many gigabytes.
* A sharded harvest is not resumable part-way (a serial harvest resumes from its work folder): a driver killed
  during it reruns the shards on ``--resume``.
* Fixed costs: starting a local Ray (~7 s on 2 cores) and the actors (each imports torch and loads the model): on
  the toy world Ray pays off from a few hundred items (``benchmarks/ray_bench.py``).
* A remote cluster (``--address``) needs autoexplain, the model and SAE specs, the datasets and, for the llm policy,
  ``OPENAI_API_KEY`` on its nodes: the key is never sent through Ray (``AUTOEXPLAIN_*``, ``HF_*`` and
  ``OPENAI_BASE_URL`` are forwarded).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from autoexplain.agent.state import FINISHED, ItemKind, ItemStatus, Usage, WorkItem, now
from autoexplain.agent.store import Store, queries
from autoexplain.agent.store.schema import Row
from autoexplain.tools.errors import InputError

if TYPE_CHECKING:
    from autoexplain.agent.graph import AgentEnv
    from autoexplain.agent.runner import ItemOutcome, NodeHook, Prepared
    from autoexplain.tools.harvest import HarvestIn, HarvestOut, HarvestWork
    from autoexplain.tools.harvest_merge import Shard, ShardPartial
    from autoexplain.tools.registry import ToolContext

log = logging.getLogger(__name__)

_ADDRESS = re.compile(r"auto|ray://[A-Za-z0-9_.\-\[\]:]+:\d+|[A-Za-z0-9_.\-\[\]:]+:\d+")


class RayOptions(BaseModel):
    """Where and how wide a Ray run goes."""

    model_config = ConfigDict(extra="forbid")

    address: str | None = Field(default=None, description="None: start a local Ray on this machine (and stop it "
                                "afterwards); 'auto': the cluster this machine belongs to; 'ray://HOST:PORT': a "
                                "remote cluster through Ray Client")
    workers: int = Field(default=2, ge=1, le=1024, description="actors, each with the model and SAEs loaded once")
    gpus_per_worker: float = Field(default=0.0, ge=0, description="GPUs each actor reserves (fractions share one)")
    cpus_per_worker: float = Field(default=1.0, gt=0, description="CPUs each actor reserves (and its torch threads)")
    llm_rate: float | None = Field(default=5.0, gt=0, description="LLM requests per second over all actors (a "
                                   "shared token bucket); None: unlimited")
    llm_burst: int = Field(default=5, ge=1, description="requests the bucket lets through at once after a pause")
    max_retries: int = Field(default=2, ge=0, description="times an item is given to a new actor after its actor "
                             "died; then it is stored failed")

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None and not _ADDRESS.fullmatch(v.strip()):
            raise ValueError("give auto, ray://HOST:PORT or HOST:PORT")
        return v.strip() if v is not None else None


# ============================================================================================ in the actors
class CapturingStore(Store):
    """A :class:`Store` on an actor's private copy of the database that records every row written to it, in order,
    as ``{"table", "rows"}`` entries (the shape of a checkpoint's ``outbox``): what the driver replays.

    Rows written one by one (tool results computed slowly, LLM calls and responses, the item's bookkeeping) are
    also written to the copy. Of an item's group commit (:meth:`upsert_many`) only the tool results are: nothing
    else an item commits is read by a later item (in a serial run they would still be waiting in the outbox, which
    serves only its own rows and the tool cache), and skipping them halves the actor's per-item cost."""

    #: Tables of a group commit also written to the actor's copy (later items on this actor read them).
    KEEP_LOCAL = ("tool_cache",)

    def __init__(self, path: str | Path) -> None:
        self.captured: list[dict[str, Any]] = []
        super().__init__(path)

    def upsert(self, table: str, rows: Sequence[Row], *, con: Any = None) -> int:
        n = super().upsert(table, rows, con=con)
        if rows:
            self.captured.append({"table": table, "rows": [dict(r) for r in rows]})
        return n

    def upsert_many(self, tables: Mapping[str, Sequence[Row]]) -> int:
        self.captured.extend({"table": t, "rows": [dict(r) for r in rows]} for t, rows in tables.items() if rows)
        with self.transaction() as con:
            return sum(Store.upsert(self, t, rows, con=con) for t, rows in tables.items()
                       if rows and t in self.KEEP_LOCAL)


class ItemWorker:
    """One actor: the model and SAEs loaded once, the run's agent environment over a private database copy."""

    def __init__(self, plan_json: str, run_id: str, snapshot: str | bytes, keep_rejected: bool,
                 threads: int, limiter: Any = None, work_root: str | None = None) -> None:
        import torch

        from autoexplain.agent.runner import Plan, _env, prepare
        from autoexplain.agent.store.outbox import Outbox

        torch.set_num_threads(max(1, threads))
        # its private copy: under the driver's folder on a local cluster (removed with it, whatever happens to
        # the actor), else in this node's temporary folder (removed by close())
        self.dir = Path(tempfile.mkdtemp(prefix="autoexplain-ray-worker-", dir=work_root))
        db = self.dir / "worker.duckdb"
        if isinstance(snapshot, bytes):
            db.write_bytes(snapshot)
        else:
            shutil.copyfile(snapshot, db)
        if limiter is not None:
            _limit_llm_requests(limiter)
        prep = prepare(Plan.model_validate_json(plan_json))
        self.store = CapturingStore(db)
        # one open connection for the actor's life, as a run holds its store (no other process reads this copy)
        self._held = contextlib.ExitStack()
        self._held.enter_context(self.store.hold(idle_s=3600.0))
        self.env = _env(self.store, Outbox(self.store, keep_rejected=keep_rejected), run_id, prep)
        self.env.run_budget = None  # the driver keeps the run's budget, over all actors
        # checkpoints in memory: an actor that dies loses its item, which a fresh actor runs from the start, so
        # they need not outlive the process (a file cost ~0.2 s per item: its tables, fsyncs and VACUUM)
        self.ckpt = Path(":memory:")
        gc.collect()
        gc.freeze()  # as the serial loop does: the loaded model is never scanned by the collector again

    def ready(self) -> int:
        return os.getpid()

    def close(self) -> None:
        """Let go of the database copy and remove it (the actor is killed next)."""
        self._held.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def run(self, item_json: str) -> dict[str, Any]:
        """Run one item to its end; its outcome and every row it wrote."""
        from autoexplain.agent.runner import _no_report, _run_items

        item = WorkItem.model_validate_json(item_json)
        self.store.captured = []
        (outcome,) = _run_items(self.store, self.env, [item], self.ckpt, _no_report, None, None)
        rows, self.store.captured = self.store.captured, []
        return {"outcome": outcome.model_dump(mode="json"), "rows": rows, "pid": os.getpid()}


class TokenBucket:
    """Requests per second over every actor (generic cell rate algorithm): :meth:`reserve` books the next free slot
    and says how long the caller waits for it (the caller sleeps, so the bucket never blocks)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.interval, self.burst = 1.0 / rate, burst
        self.tat = 0.0  # theoretical arrival time of the next request (monotonic seconds)

    def reserve(self) -> float:
        t = time.monotonic()
        tat = max(self.tat, t)
        start = max(t, tat - (self.burst - 1) * self.interval)  # up to ``burst`` requests may go ahead of the rate
        self.tat = tat + self.interval
        return start - t


def _limit_llm_requests(limiter: Any) -> None:
    """In this actor process: every HTTP attempt of the LLM client first takes a slot from the shared bucket.

    Patches the client class of this process only (an actor's process is its own): the policy's and the judge's
    calls all go through :meth:`LLMClient._post`, one HTTP request each."""
    import ray

    from autoexplain.agent.llm import LLMClient

    post = LLMClient._post

    def limited(client: LLMClient, kwargs: dict[str, Any], parse_schema: Any) -> dict[str, Any]:
        wait = ray.get(limiter.reserve.remote())
        if wait > 0:
            time.sleep(wait)
        return post(client, kwargs, parse_schema)

    LLMClient._post = limited  # type: ignore[method-assign,assignment]


# ============================================================================================ the driver
@contextlib.contextmanager
def ray_session(options: RayOptions) -> Iterator[None]:
    """Ray for the block. A session already started in this process (e.g. by tests) is used as it is; otherwise a
    local Ray is started (no dashboard, workers' logs not forwarded) and stopped afterwards, or the cluster at
    ``options.address`` is joined and left."""
    import ray

    if ray.is_initialized():
        yield
        return
    quiet: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR, "include_dashboard": False}
    if options.address is None:
        ray.init(address="local", num_cpus=max(1, round(options.workers * options.cpus_per_worker)),
                 object_store_memory=256 * 1024**2, **quiet)
    else:
        forwarded = {k: v for k, v in os.environ.items()
                     if k.startswith(("AUTOEXPLAIN_", "HF_")) or k in ("TRANSFORMERS_OFFLINE", "OPENAI_BASE_URL")}
        try:
            ray.init(address=options.address, runtime_env={"env_vars": forwarded} if forwarded else None,
                     **{k: v for k, v in quiet.items() if k != "include_dashboard"})
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise InputError(f"--address {options.address}: cannot connect to Ray ({_last_line(exc)}); the run is "
                             "kept: fix the address and resume it with --resume") from None
    try:
        yield
    finally:
        ray.shutdown()


def snapshot_db(store: Store, dst: Path) -> Path:
    """Checkpoint the database (its WAL folded into the file) and copy the file to ``dst``: what the actors read.
    Runs in the driver, the only writer, between writes, so the copy is a consistent state."""
    queries.fold_wal(store)
    shutil.copyfile(store.path, dst)
    wal = store.path.with_name(store.path.name + ".wal")
    if wal.exists():  # (empty after the checkpoint; copied in case another reader kept it)
        shutil.copyfile(wal, dst.with_name(dst.name + ".wal"))
    return dst


class _Pool:
    """The actors, by slot; a dead one is replaced in its slot."""

    def __init__(self, make: Callable[[], Any], n: int) -> None:

        self.make = make
        self.actors = [make() for _ in range(n)]
        self.pids = self._started(self.actors)

    @staticmethod
    def _started(actors: list[Any]) -> list[int]:
        """The actors' process ids, once each has loaded the model; an actor that cannot start (a model or SAE
        its node cannot load) is one error line."""
        import ray

        try:
            return list(ray.get([a.ready.remote() for a in actors]))
        except ray.exceptions.RayActorError as exc:
            raise InputError(f"a Ray worker could not start: {_last_line(exc)}") from None

    def replace(self, slot: int) -> None:
        import ray

        with contextlib.suppress(Exception):
            ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self.make()
        self.pids[slot] = self._started([self.actors[slot]])[0]

    def close(self) -> None:
        import ray

        with contextlib.suppress(Exception):  # each removes its database copy (a dead one cannot: see ItemWorker)
            ray.get([a.close.remote() for a in self.actors], timeout=30)
        for a in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(a, no_restart=True)


class RayExecutor:
    """An :class:`~autoexplain.agent.runner.ItemExecutor` that runs items on Ray actors (see the module doc).

    ``on_dispatch(item_id, pid)``: called on the driver when an item is handed to the actor with process id ``pid``
    (progress displays, tests)."""

    #: Items handed to each actor at a time: the next one waits in the actor's queue, so the actor never idles
    #: while the driver takes in a result (the run budget may therefore let up to this many start per actor).
    DEPTH = 2

    def __init__(self, options: RayOptions | None = None, *,
                 on_dispatch: Callable[[str, int], None] | None = None) -> None:
        self.options = options or RayOptions()
        self.on_dispatch = on_dispatch
        self.retried = 0  # items given to a new actor after theirs died (reports, tests)
        self.shards_run = 0  # harvest shards run on Ray (reports, tests)
        self._session: contextlib.ExitStack | None = None  # Ray, from the harvest to the end of the items

    def _open_session(self) -> None:
        if self._session is None:
            self._session = contextlib.ExitStack()
            self._session.enter_context(ray_session(self.options))

    def _close_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.close()

    def harvest(self, ctx: ToolContext, args: HarvestIn, *, work: HarvestWork,
                progress: Callable[[int, int], None] | None = None,
                finish_progress: Callable[[int, int], None] | None = None) -> HarvestOut:
        """A sharded harvest (:mod:`autoexplain.tools.harvest_merge`): the batches cut into one shard per worker,
        each run by a Ray task that loads the model and SAE, the partial statistics merged here exactly (the stored
        rows equal one pass's) and stored by this process through ``ctx.sink``. A task whose worker dies is rerun
        by Ray (``max_retries``; a shard's result is deterministic). Ray stays up for the items that follow."""
        import ray

        from autoexplain.tools.harvest_merge import finish_shards, plan_shards

        t0 = time.perf_counter()
        opts = self.options
        self._open_session()
        sae = ctx.sae(args.sae_id)
        shards = plan_shards(args, opts.workers)
        task = ray.remote(_harvest_shard).options(num_cpus=opts.cpus_per_worker, num_gpus=opts.gpus_per_worker,
                                                  max_retries=opts.max_retries)
        device = "cpu" if opts.gpus_per_worker == 0 else None  # (a worker without a GPU reserved runs on its CPU)
        refs = [task.remote(ctx.model.spec, sae.spec, device, args.model_dump(mode="json"), s,
                            max(1, int(opts.cpus_per_worker))) for s in shards]
        left = list(refs)
        while left:  # progress by shard; the partials are merged in shard order below
            if progress is not None:
                progress(len(refs) - len(left), len(refs))
            _, left = ray.wait(left, num_returns=1)
        if progress is not None:
            progress(len(refs), len(refs))
        partials = ray.get(refs)
        self.shards_run += len(partials)
        return finish_shards(ctx, args, partials, work=work, started=t0)

    def run_items(self, store: Store, env: AgentEnv, items: list[WorkItem], ckpt: Path, prep: Prepared,
                  report: Callable[[str, int, int], None], on_item: Callable[[ItemOutcome], None] | None,
                  on_node: NodeHook | None) -> list[ItemOutcome]:
        last: list[tuple[str, int, int]] = []

        def once(stage: str, done: int, total: int) -> None:  # one progress display: each state said once
            if last[-1:] != [(stage, done, total)]:
                last[:] = [(stage, done, total)]
                report(stage, done, total)

        try:
            return self._settle_and_run(store, env, items, ckpt, prep, once, on_item)
        finally:
            self._close_session()  # (a Ray the harvest started)

    def _settle_and_run(self, store: Store, env: AgentEnv, items: list[WorkItem], ckpt: Path, prep: Prepared,
                        report: Callable[[str, int, int], None],
                        on_item: Callable[[ItemOutcome], None] | None) -> list[ItemOutcome]:
        from langgraph.checkpoint.sqlite import SqliteSaver

        from autoexplain.agent.graph import build_graph
        from autoexplain.agent.runner import _run_items

        stored = queries.item_states(store, env.run_id)
        finished = {s.value for s in FINISHED}
        local, remote = [], []
        with SqliteSaver.from_conn_string(str(ckpt)) as saver:
            graph = build_graph(env, saver)
            for item in items:
                state = stored.get(item.item_id)
                if state is not None and state.status in finished:
                    local.append(item)
                    continue
                snap = graph.get_state({"configurable": {"thread_id": item.item_id}})
                if snap.values and not snap.next and snap.values.get("outcome"):
                    local.append(item)  # finished before a crash, not committed: recovered from its checkpoints
                else:
                    if snap.values:  # an item a serial run left half done: an actor runs it from the start
                        saver.delete_thread(item.item_id)
                    remote.append(item)
        # a feature circuit's explanation reads the labels this run's feature items write: it runs after all of
        # them have come back, here in the driver (as a serial run would), never beside them on an actor
        later = [it for it in remote if it.kind is ItemKind.FEATURE_CIRCUIT]
        remote = [it for it in remote if it.kind is not ItemKind.FEATURE_CIRCUIT]
        outcomes: dict[str, ItemOutcome] = {}
        total = len(items)
        if local:  # exactly as a serial run settles them (nothing runs)
            for o in _run_items(store, env, local, ckpt, lambda s, d, t: report(s, d, total), on_item, None):
                outcomes[o.item_id] = o
        if remote:
            outcomes.update(self._run_remote(store, env, remote, ckpt, prep, report, on_item, stored,
                                             done=len(local), total=len(items)))
        if later:
            done = len(outcomes)
            for o in _run_items(store, env, later, ckpt, lambda s, d, t: report(s, done + d, total), on_item, None):
                outcomes[o.item_id] = o
        report("items", len(items), len(items))
        return [outcomes[item.item_id] for item in items]

    def _run_remote(self, store: Store, env: AgentEnv, items: list[WorkItem], ckpt: Path, prep: Prepared,
                    report: Callable[[str, int, int], None], on_item: Callable[[ItemOutcome], None] | None,
                    stored: dict[str, Any], *, done: int, total: int) -> dict[str, ItemOutcome]:
        import ray
        from langgraph.checkpoint.sqlite import SqliteSaver

        from autoexplain.agent.graph import build_graph
        from autoexplain.agent.runner import ItemOutcome

        opts, out = self.options, env.out
        new = [{"item_id": it.item_id, "run_id": it.run_id, "kind": it.kind.value, "target": it.target,
                "status": ItemStatus.PENDING.value, "attempts": 0} for it in items if it.item_id not in stored]
        if new:  # at once, as a serial run does: a query made mid-run sees every item of the run
            store.upsert("work_items", new)
        outcomes: dict[str, ItemOutcome] = {}
        tmp = Path(tempfile.mkdtemp(prefix="autoexplain-ray-"))
        pool: _Pool | None = None
        try:
            with ray_session(opts), SqliteSaver.from_conn_string(str(ckpt)) as saver:
                graph = build_graph(env, saver)

                def commit(*, final: bool = False) -> None:
                    for item_id in out.flush() if final else out.try_flush():
                        saver.delete_thread(item_id)

                try:
                    snap = snapshot_db(store, tmp / "snapshot.duckdb")
                    source: Any = str(snap) if opts.address is None else ray.put(snap.read_bytes())
                    uses_llm = prep.plan.policy == "llm" or prep.plan.judge == "llm"
                    limiter = (ray.remote(num_cpus=0)(TokenBucket).remote(opts.llm_rate, opts.llm_burst)
                               if uses_llm and opts.llm_rate else None)
                    worker = ray.remote(ItemWorker).options(num_cpus=opts.cpus_per_worker,
                                                            num_gpus=opts.gpus_per_worker, max_restarts=0)
                    plan_json = prep.plan.model_dump_json()
                    keep = prep.plan.judgements == "all"
                    threads = max(1, int(opts.cpus_per_worker))
                    n_workers = min(opts.workers, len(items))  # never more actors than items
                    report("ray workers", 0, n_workers)
                    root = str(tmp) if opts.address is None else None
                    pool = _Pool(lambda: worker.remote(plan_json, env.run_id, source, keep, threads, limiter, root),
                                 n_workers)
                    report("ray workers", n_workers, n_workers)
                    queue = deque(items)
                    deaths: dict[str, int] = {}
                    running: dict[Any, tuple[int, WorkItem, Any]] = {}  # result -> (slot, item, actor)
                    report("items", done, total)
                    while queue or running:
                        limit = env.run_limit()
                        while limit and queue:  # the run budget is spent: later items are not started
                            item = queue.popleft()
                            outcomes[item.item_id] = ItemOutcome(
                                item_id=item.item_id, kind=item.kind, target=item.target, status=ItemStatus.PENDING,
                                error=f"not started: {limit} reached; --resume runs it")
                            if on_item is not None:
                                on_item(outcomes[item.item_id])
                        busy = [0] * len(pool.actors)
                        for slot, _, _ in running.values():
                            busy[slot] += 1
                        for slot, actor in enumerate(pool.actors):
                            while queue and busy[slot] < self.DEPTH:
                                item = queue.popleft()
                                running[actor.run.remote(item.model_dump_json())] = (slot, item, actor)
                                busy[slot] += 1
                                if self.on_dispatch is not None:
                                    self.on_dispatch(item.item_id, pool.pids[slot])
                        if not running:
                            break
                        ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
                        for ref in ready:
                            slot, item, actor = running.pop(ref)
                            try:
                                res = ray.get(ref)
                            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
                                deaths[item.item_id] = deaths.get(item.item_id, 0) + 1
                                if pool.actors[slot] is actor:  # (its other item found it replaced already)
                                    pool.replace(slot)
                                if deaths[item.item_id] <= opts.max_retries:
                                    self.retried += 1
                                    queue.appendleft(item)
                                    continue
                                res = _worker_failed(item, exc, deaths[item.item_id])
                            outcome = self._receive(graph, env, item, res, deaths.get(item.item_id, 0))
                            outcomes[item.item_id] = outcome
                            done += 1
                            if on_item is not None:
                                on_item(outcome)
                            report("items", done, total)
                        if out.due():
                            commit()
                    commit(final=True)
                except BaseException:
                    # on the way out (Ctrl-C, a bug): commit what is finished; if that fails too, the checkpoints
                    # still hold every finished item's rows for --resume
                    with contextlib.suppress(Exception):
                        commit(final=True)
                    raise
                finally:
                    if pool is not None:
                        pool.close()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return outcomes

    @staticmethod
    def _receive(graph: Any, env: AgentEnv, item: WorkItem, res: dict[str, Any], deaths: int) -> ItemOutcome:
        """Make a finished item durable (one checkpoint with all its rows and its outcome: what ``--resume``
        recovers), then hand its rows to the group commit."""
        from autoexplain.agent.runner import ItemOutcome

        outcome = ItemOutcome.model_validate(res["outcome"])
        entries: list[dict[str, Any]] = list(res["rows"])
        if deaths:  # the attempts the dead actors made count too
            got = [r for e in entries if e["table"] == "work_items" for r in e["rows"]
                   if r.get("item_id") == item.item_id and r.get("attempts") is not None]
            attempts = int(got[-1]["attempts"]) if got else 1
            entries.append({"table": "work_items", "rows": [{"item_id": item.item_id, "attempts": attempts + deaths}]})
        state = {"outbox": entries, "usage": outcome.usage.model_dump(),
                 "outcome": {"status": outcome.status.value, "text": outcome.text, "scores": outcome.scores,
                             "overall": outcome.overall, "why": outcome.error}}
        graph.update_state({"configurable": {"thread_id": item.item_id}}, state, as_node="accept")
        out = env.out
        out.begin(item.item_id)
        out.replay(entries)
        out.finished(item.item_id)
        out.begin(None)
        u = outcome.usage
        env.run_usage = env.run_usage.plus(steps=u.steps, seconds=u.seconds, llm_calls=u.llm_calls,
                                           prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens)
        return outcome


def _harvest_shard(model_spec: str, sae_spec: str, device: str | None, args: dict[str, Any], shard: Shard,
                   threads: int) -> ShardPartial:
    """A Ray task: load the model and SAE, run one shard of a harvest (its partial statistics)."""
    import torch

    from autoexplain.tools.harvest import HarvestIn
    from autoexplain.tools.harvest_merge import harvest_shard
    from autoexplain.tools.loading import load_model, load_sae

    torch.set_num_threads(threads)
    lm = load_model(model_spec, device=device, sae_specs=[sae_spec])
    return harvest_shard(lm, load_sae(sae_spec, lm), HarvestIn.model_validate(args), shard)


def _last_line(exc: BaseException) -> str:
    """The last non-empty line of an error's text (for a Ray error: the original exception, after its traceback)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1][:300] if lines else type(exc).__name__


def _worker_failed(item: WorkItem, exc: BaseException, deaths: int) -> dict[str, Any]:
    """The result of an item whose actors kept dying: a failed item with the reason (stored like any failure)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    err = f"worker failed {deaths} time(s) running this item: {type(exc).__name__}: {first}"[:500]
    row = {"item_id": item.item_id, "run_id": item.run_id, "kind": item.kind.value, "target": item.target,
           "status": ItemStatus.FAILED.value, "error": err, "finished_at": now(), "attempts": 0,
           "budget": {**Usage().model_dump(), "stopped_by": None}}
    outcome = {"item_id": item.item_id, "kind": item.kind.value, "target": item.target,
               "status": ItemStatus.FAILED.value, "error": err}
    return {"outcome": outcome, "rows": [{"table": "work_items", "rows": [row]}], "pid": None}
