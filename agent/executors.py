"""Where a run's work items execute: here, one after another (``serial``), or on Ray actors (``ray``).

:func:`autoexplain.agent.runner.run_plan` prepares a run (model, harvest, held-out splits, the list of items) and
hands the items to an :class:`~autoexplain.agent.runner.ItemExecutor`. Both executors keep the same contract: the
same per-item agent graph, rows written by this process alone through the run's group commit, finished items never
redone on ``--resume``, one outcome per item in the plan's order, and the same results.

* :class:`SerialExecutor` is today's loop (:func:`autoexplain.agent.runner._loop`), unchanged.
* :class:`~autoexplain.agent.ray_executor.RayExecutor` spreads the items over Ray actors that each load the model
  once (see :mod:`autoexplain.agent.ray_executor`). Ray is an optional dependency (the ``ray`` extra), imported only
  when this executor runs.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import ValidationError

from autoexplain.agent.ray_executor import RayExecutor, RayOptions
from autoexplain.tools.errors import InputError

if TYPE_CHECKING:
    from autoexplain.agent.graph import AgentEnv
    from autoexplain.agent.runner import ItemExecutor, ItemOutcome, NodeHook, Prepared
    from autoexplain.agent.state import WorkItem
    from autoexplain.agent.store import Store

ExecutorName = Literal["serial", "ray"]

__all__ = ["ExecutorName", "RayExecutor", "RayOptions", "SerialExecutor", "make_executor"]


class SerialExecutor:
    """The items one after another in this process: exactly what ``run_plan`` does without an executor."""

    def run_items(self, store: Store, env: AgentEnv, items: list[WorkItem], ckpt: Path, prep: Prepared,
                  report: Callable[[str, int, int], None], on_item: Callable[[ItemOutcome], None] | None,
                  on_node: NodeHook | None) -> list[ItemOutcome]:
        from autoexplain.agent.runner import _loop

        return _loop(store, env, items, ckpt, report, on_item, on_node)


def make_executor(name: str, *, address: str | None = None, workers: int | None = None,
                  gpus_per_worker: float | None = None, llm_rate: float | None = None) -> ItemExecutor:
    """The executor the command line asks for; every problem is one :class:`InputError` line (the Ray options
    without ``--executor ray``, a bad address or count, Ray not installed), raised before anything loads."""
    ray_only = {"--address": address, "--workers": workers, "--gpus-per-worker": gpus_per_worker,
                "--llm-rate": llm_rate}
    if name == "serial":
        given = [flag for flag, v in ray_only.items() if v is not None]
        if given:
            raise InputError(f"{', '.join(given)} only apply to --executor ray")
        return SerialExecutor()
    if name != "ray":
        raise InputError(f"--executor {name!r}: choose serial or ray")
    fields = {"address": address, "workers": workers, "gpus_per_worker": gpus_per_worker, "llm_rate": llm_rate}
    try:
        options = RayOptions.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        flag = "--" + str(err["loc"][0]).replace("_", "-") if err["loc"] else "--executor ray"
        raise InputError(f"{flag}: {err['msg']} (got {err.get('input')!r})") from None
    if importlib.util.find_spec("ray") is None:
        raise InputError("--executor ray needs Ray: pip install 'autoexplain[ray]' (or pip install ray)")
    return RayExecutor(options)
