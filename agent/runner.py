"""Runs of many work items: plans, preparation (harvest, held-out split), the checkpointed loop, resume, budgets.

A **plan** (YAML or JSON; :class:`Plan`) names one model and a list of items: ``label`` entries (an SAE, a
dataset, which features) and ``circuit`` entries (a task file or a toy task name). ``autoexplain label`` and
``autoexplain circuit --policy`` build a one-entry plan; ``autoexplain run PLAN`` takes a file.

Crash safety
------------
* Each item is one langgraph thread (``thread_id`` = the item id) in a SQLite checkpointer next to the database
  (``<db>.checkpoints.sqlite``), written synchronously after every node (``durability="sync"``). A killed run
  resumes an unfinished item at the node that was running.
* Rows are committed to DuckDB in groups (:mod:`autoexplain.agent.store.outbox`: every ``commit.seconds``, every
  ``commit.items`` finished items, when a reader waits, and at the end); until then each node's rows travel in its
  checkpoint, and ``--resume`` puts back the rows of checkpoints whose commit never came. A committed item's
  checkpoints are deleted.
* Finished items (``work_items.status`` done / weak / no_behaviour / budget_limited / failed) are never redone on
  ``--resume``; nor is an item whose last checkpoint is finished but whose rows were not committed yet (its rows
  come back from the checkpoints; its outcome is reported ``skipped`` like the others).
* Tool results are cached by (model, SAEs, tool, arguments) in ``tool_cache`` and LLM responses by request hash in
  ``llm_cache``: a resumed item does not recompute forward passes or repeat LLM calls it already made.
* Item ids derive from the run id and the target; ``--resume`` finds the newest unfinished run of the same plan
  (same content hash) and continues it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import hashlib
import json
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from autoexplain.agent.llm import LLMSettings
from autoexplain.agent.state import (
    FINISHED,
    Budget,
    ItemKind,
    ItemStatus,
    LLMMeter,
    RunBudget,
    Usage,
    WorkItem,
    now,
    stable_id,
)
from autoexplain.agent.store import queries
from autoexplain.agent.store.outbox import GroupCommit
from autoexplain.tools.errors import InputError
from autoexplain.tools.vocab import Ablation, Method

if TYPE_CHECKING:
    from langchain_core.runnables import RunnableConfig

    from autoexplain.agent.graph import AgentEnv, Scorer
    from autoexplain.agent.llm import LLMClient
    from autoexplain.agent.store import Store
    from autoexplain.agent.store.outbox import Outbox
    from autoexplain.agent.store.schema import WorkItemRow
    from autoexplain.evals.judges import Judge
    from autoexplain.tools.data import TaskFile
    from autoexplain.tools.harvest import HarvestIn, HarvestWork
    from autoexplain.tools.models import LoadedModel
    from autoexplain.tools.saes import LoadedSAE

#: ``on_node(item_id, node)``: called after each graph node of an item, once its checkpoint is written
NodeHook = Callable[[str, str], None]


class ItemExecutor(Protocol):
    """Runs a run's work items once they are prepared (harvested, split, listed): the seam between the run and
    where its items execute. Without one, :func:`run_plan` runs them here, one after another (:func:`_loop`);
    :mod:`autoexplain.agent.executors` has the serial executor and the Ray one. An executor returns one outcome per
    item, in ``items`` order, and keeps the run's crash-safety contract (rows through ``env.out``, committed in
    groups; finished items never redone)."""

    def run_items(self, store: Store, env: AgentEnv, items: list[WorkItem], ckpt: Path, prep: Prepared,
                  report: Callable[[str, int, int], None], on_item: Callable[[ItemOutcome], None] | None,
                  on_node: NodeHook | None) -> list[ItemOutcome]: ...

PolicyName = Literal["offline", "llm"]
JudgeName = Literal["lexical", "embedding", "llm"]


class LabelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sae: str = Field(description="sae-lens dir, toy:MODEL/NAME or RELEASE/ID")
    dataset: str | None = Field(default=None, description="texts to harvest (default: the toy corpus for toy SAEs)")
    features: str = Field(default="all", description="'all', '0-99', '1,5,9', or 'live' / 'live:N' (the live "
                                                      "features, or the first N of them, once harvested)")
    tokens: int = Field(default=60_000, ge=1, description="tokens to harvest if the SAE is not harvested yet")


class CircuitEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str = Field(description="task file (auto-circuit layout), or a toy task name (ioi, induction …)")
    method: Method = Method.EAP_IG_NOISING
    ablation: Ablation = Ablation.RESAMPLE
    top_k: int | None = Field(default=None, ge=1)
    threshold: float | None = Field(default=None, ge=0)
    held_out: bool = Field(default=True, description="find the circuit on half of the prompts and compute every "
                                                     "score on the other half (tasks with at least 4 prompts)")
    robustness: int = Field(default=2, ge=0, le=20, description="searches on resampled prompt sets whose agreement "
                                                               "(edge Jaccard, Spearman) is stored; 0: none")

    @model_validator(mode="after")
    def _one_selector(self) -> CircuitEntry:
        if self.top_k is not None and self.threshold is not None:
            raise ValueError("give top_k or threshold, not both: top_k keeps a number of edges, threshold keeps "
                             "edges scoring above a fraction of the full effect")
        return self


class FeatureCircuitEntry(BaseModel):
    """A task's sparse feature circuit over one or more SAEs, explained through its features' labels: the run
    finds the circuit (on the fit half of the prompts when ``held_out``), labels the ``label`` kept features with
    the largest |effect| that have no final label yet (ordinary feature items, their SAEs harvested first), then
    one ``feature_circuit`` item writes and scores the explanation."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(description="task file (auto-circuit layout), or a toy task name (ioi, induction …)")
    saes: list[str] = Field(min_length=1, description="SAE specs whose features are the circuit's nodes")
    threshold: float = Field(default=0.01, ge=0, description="keep nodes with |effect| >= THRESHOLD x |m(M) - m(∅)|")
    edge_threshold: float = Field(default=0.02, ge=0, description="keep edges with |weight| >= this x |m(M) - m(∅)|")
    steps: int = Field(default=10, ge=1, le=64, description="integrated-gradient steps")
    held_out: bool = Field(default=True, description="find the circuit on half of the prompts and score it on the "
                                                     "other half (tasks with at least 8 prompts)")
    label: int = Field(default=8, ge=0, le=100, description="label at most this many kept, unlabelled features "
                                                            "(largest |effect| first); 0: none")
    dataset: str | None = Field(default=None, description="texts to harvest for the labels (default: the toy "
                                                          "corpus for toy models)")
    tokens: int = Field(default=60_000, ge=1, description="tokens to harvest if an SAE is not harvested yet")

    @model_validator(mode="after")
    def _distinct(self) -> FeatureCircuitEntry:
        if len({s.strip() for s in self.saes}) != len(self.saes):
            raise ValueError(f"saes names the same SAE twice ({', '.join(self.saes)})")
        return self


class PlanEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: LabelEntry | None = None
    circuit: CircuitEntry | None = None
    feature_circuit: FeatureCircuitEntry | None = None

    @model_validator(mode="after")
    def _one(self) -> PlanEntry:
        if sum(x is not None for x in (self.label, self.circuit, self.feature_circuit)) != 1:
            raise ValueError("each item is either {label: {...}}, {circuit: {...}} or {feature_circuit: {...}} "
                             "(exactly one)")
        return self


class Plan(BaseModel):
    """A batch of work on one model (the file ``autoexplain run`` takes)."""

    model_config = ConfigDict(extra="forbid")

    name: str = "plan"
    model: str = Field(description="local HF dir, hub name or toy:NAME")
    policy: PolicyName = "offline"
    llm_model: str | None = Field(default=None, description="model name at the OpenAI-compatible endpoint")
    llm: LLMSettings = Field(default_factory=LLMSettings,
                             description="LLM call settings: max_tokens, timeout_s, retries, modes (policy and judge)")
    judge: JudgeName = "lexical"
    embedding: bool = Field(default=False, description="also score with MiniLM embeddings (needs [judges])")
    lexicon: str | None = Field(default=None, description="JSON file: category -> member words")
    budget: Budget = Field(default_factory=Budget, description="per item")
    run_budget: RunBudget = Field(default_factory=RunBudget,
                                  description="for the whole run; every limit left out is unlimited")
    device: str | None = None
    judgements: Literal["final", "all"] = Field(
        default="final", description="per-example judge decisions to keep: the final explanation's (the drafts "
                                     "the agent rejected keep their scores), or every scored draft's")
    commit: GroupCommit = Field(default_factory=GroupCommit,
                                description="how often results are committed to DuckDB (not part of the plan's "
                                            "identity: changing it does not start a new run)")
    items: list[PlanEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _llm_model(self) -> Plan:
        if (self.policy == "llm" or self.judge == "llm") and not self.llm_model:
            raise ValueError("policy llm and judge llm need llm_model (the model name at the endpoint)")
        return self

    def content_hash(self) -> str:
        # LLM settings count when given (a plan written before they existed keeps its identity)
        skip = {"commit"} | ({"llm"} if self.llm == LLMSettings() else set())
        return hashlib.sha256(self.model_dump_json(exclude=skip).encode()).hexdigest()[:16]


def load_plan(path: Path) -> Plan:
    """Read and validate a plan file; any problem is one :class:`InputError` line."""
    if not path.is_file():
        raise InputError(f"plan {str(path)!r} does not exist: pass a YAML or JSON plan file")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:
        mark = getattr(exc, "problem_mark", None)  # YAML: where the parser gave up
        line = getattr(exc, "lineno", None) or (mark.line + 1 if mark is not None else None)
        at = f" (line {line})" if line else ""
        raise InputError(f"plan {str(path)!r} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}{at}: "
                         f"{getattr(exc, 'problem', None) or str(exc).splitlines()[0]}") from None
    try:
        return Plan.model_validate(data)
    except ValidationError as exc:
        raise InputError(f"plan {str(path)!r}: {validation_message(exc, 'plan')}") from None


#: The CLI flag that sets each plan field the commands build plans from (``label``, ``circuit``, ``demo``).
PLAN_FLAGS = {"budget.steps": "--max-steps", "budget.llm_tokens": "--max-tokens", "budget.seconds": "--max-seconds",
              "llm.max_tokens": "--llm-max-tokens", "llm.timeout_s": "--llm-timeout", "llm_model": "--llm-model",
              "items.label.tokens": "--tokens", "items.label.features": "--features",
              "items.label.dataset": "--dataset", "items.label.sae": "--sae", "items.circuit.top_k": "--top-k",
              "items.circuit.threshold": "--threshold", "items.circuit.task": "--task", "model": "--model",
              "device": "--device", "policy": "--policy", "judge": "--judge", "judgements": "--judgements"}


def validation_message(exc: ValidationError, default: str, *, as_flags: bool = False) -> str:
    """The first problem of a pydantic error as one line: where, what, and the value given when it is short.

    ``as_flags``: name the CLI flag that set the field (:data:`PLAN_FLAGS`; else the field's last name as a
    flag), not the plan field the command built from it."""
    err = exc.errors()[0]
    parts = [str(p) for p in err["loc"] if not (as_flags and isinstance(p, int))]
    if as_flags and parts:
        where = PLAN_FLAGS.get(".".join(parts)) or "--" + parts[-1].replace("_", "-")
    else:
        where = ".".join(parts)
    where = where or default
    given = err.get("input")
    shown = f" (got {given!r})" if isinstance(given, (str, int, float)) and len(repr(given)) <= 60 else ""
    return f"{where}: {err['msg']}{shown}"


def feature_ranges(spec: str) -> list[tuple[int, int]] | None:
    """The syntax of a feature selection, checked without the SAE: None for 'all', else the inclusive ranges of
    '0-99' | '1,5,9' (mixable: '0-9,20'). Raises :class:`InputError` on anything else, so a typo is refused
    before a model loads."""
    if spec.strip() == "all":
        return None
    ranges = []
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise InputError(f"--features {spec!r}: {part!r} is not an index or a range; use e.g. 0-99, 1,5,9 or all")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise InputError(f"--features {spec!r}: range {part} runs backwards")
        ranges.append((lo, hi))
    return ranges


def live_selection(spec: str) -> int | None:
    """For ``'live'`` the number -1 (every live feature), for ``'live:N'`` N (the first N live features by index),
    else None. Which features are live is known only after the harvest: :func:`_harvest_and_split` resolves it."""
    m = re.fullmatch(r"\s*live(?::(\d+))?\s*", spec)
    if m is None:
        return None
    n = int(m.group(1)) if m.group(1) else -1
    if n == 0:
        raise InputError(f"--features {spec!r}: live:N needs N >= 1")
    return n


def parse_features(spec: str, d_sae: int) -> list[int]:
    """'all' | '0-99' | '1,5,9' (mixable: '0-9,20') → sorted indices, each checked against the SAE width."""
    ranges = feature_ranges(spec)
    if ranges is None:
        return list(range(d_sae))
    out: set[int] = set()
    for lo, hi in ranges:
        if hi >= d_sae:
            raise InputError(f"--features {spec!r}: {hi} is out of range, the SAE has {d_sae} features (0-{d_sae - 1})")
        out.update(range(lo, hi + 1))
    return sorted(out)


# ============================================================================================ preparation
@dataclass
class Prepared:
    """A validated plan, loaded: everything checked before the database is written."""

    plan: Plan
    lm: LoadedModel
    saes: dict[str, LoadedSAE]  # spec -> SAE
    label_jobs: list[tuple[LabelEntry, str, list[int]]]  # (entry, dataset, features)
    circuit_jobs: list[tuple[CircuitEntry, str, str]]  # (entry, task name, task path)
    lexicon: dict[str, frozenset[str]] | None = None
    #: (entry, task name, task path, the indices in ``label_jobs`` of its harvest-only label jobs, one per SAE;
    #: empty when it labels nothing)
    feature_circuit_jobs: list[tuple[FeatureCircuitEntry, str, str, list[int]]] = dataclasses.field(
        default_factory=list)


def check_plan(plan: Plan) -> None:
    """Every check of ``plan`` that needs no weights, each an :class:`InputError` line: the model and SAE specs
    (:func:`autoexplain.tools.loading.check_specs`: paths exist and hold what they should, hub names …), every
    dataset (:func:`autoexplain.tools.data.check_dataset_spec`: exists, known format, not empty; a hub dataset's
    name, and then its first row, which fails at once offline),
    feature-selection syntax (ranges beyond the SAE's width are checked once it is loaded), task files (a file
    is validated; a name that is not a file must be a toy task name of a toy model) and the lexicon.
    :func:`prepare` calls it before loading anything, so a typo costs no model load."""
    from autoexplain.tools.data import check_dataset_spec, iter_texts, load_task_file
    from autoexplain.tools.loading import check_specs

    toy = plan.model.strip().startswith("toy:")
    labels = [p.label for p in plan.items if p.label]
    hub: list[str] = []
    for e in labels:
        if live_selection(e.features) is not None:
            pass  # which features are live is known once harvested
        elif (d_sae := _local_d_sae(e.sae)) is None:
            feature_ranges(e.features)
        else:
            parse_features(e.features, d_sae)  # beyond the SAE's width: refused before the model loads
        if e.dataset is not None:
            check_dataset_spec(e.dataset)  # local: exists, known format, a text; a hub name: its syntax
            if not Path(e.dataset.strip()).expanduser().exists():
                hub.append(e.dataset)
        elif not toy:
            raise InputError(f"label item for {e.sae}: give a dataset (only toy models have a default corpus)")
    fcs = [p.feature_circuit for p in plan.items if p.feature_circuit]
    for fc in fcs:
        if fc.label and fc.dataset is not None:
            check_dataset_spec(fc.dataset)
            if not Path(fc.dataset.strip()).expanduser().exists():
                hub.append(fc.dataset)
        elif fc.label and not toy:
            raise InputError(f"feature_circuit item for {fc.task}: give a dataset to harvest for the labels (only "
                             "toy models have a default corpus), or label: 0")
    tasks = [*(p.circuit.task for p in plan.items if p.circuit), *(fc.task for fc in fcs)]
    for task in tasks:
        path = Path(task)
        if path.exists() or not (toy and re.fullmatch(r"[a-z_]+", task)):
            load_task_file(path)  # missing or malformed: refused now (a toy task name is resolved after the build)
    if plan.lexicon:
        load_lexicon(Path(plan.lexicon))
    check_specs(plan.model, list(dict.fromkeys([*(e.sae for e in labels), *(s for fc in fcs for s in fc.saes)])))
    for name in dict.fromkeys(hub):  # last: the only check that may wait on the network
        texts = iter_texts(name)
        try:
            next(texts)  # reachable, first row readable (fails at once offline)
        finally:
            texts.close()


def _local_d_sae(spec: str) -> int | None:
    """``d_sae`` from a local sae-lens folder's ``cfg.json`` (None when there is none to read: a toy or hub spec,
    or a cfg without a usable width — the loaded SAE is checked later anyway)."""
    cfg = Path(spec.strip()).expanduser() / "cfg.json"
    try:
        d_sae = json.loads(cfg.read_text()).get("d_sae")
    except (OSError, ValueError, AttributeError):
        return None
    return d_sae if isinstance(d_sae, int) and not isinstance(d_sae, bool) and d_sae > 0 else None


def prepare(plan: Plan) -> Prepared:
    """Check the plan (:func:`check_plan`, no weights), then load the model and SAEs, resolve datasets and tasks,
    and validate every entry against them (no writes)."""
    from autoexplain.tools.data import load_task_file
    from autoexplain.tools.loading import load_model, load_sae

    check_plan(plan)
    sae_specs = list(dict.fromkeys([*(p.label.sae for p in plan.items if p.label),
                                    *(s for p in plan.items if p.feature_circuit for s in p.feature_circuit.saes)]))
    lm = load_model(plan.model, device=plan.device, sae_specs=sae_specs)
    toy = plan.model.startswith("toy:")
    built = None
    if toy:
        from autoexplain.tools.zoo import ensure_model

        built = ensure_model(plan.model.split(":", 1)[1])
    saes: dict[str, LoadedSAE] = {}
    label_jobs = []
    for e in (p.label for p in plan.items if p.label):
        if e.sae not in saes:
            saes[e.sae] = load_sae(e.sae, lm)
        dataset = e.dataset or (str(built.corpus) if built is not None else None)
        if dataset is None:
            raise InputError(f"label item for {e.sae}: give a dataset (only toy models have a default corpus)")
        from autoexplain.tools.data import iter_texts

        texts = iter_texts(dataset)
        try:
            next(texts)  # an unreachable or empty hub dataset fails before any write
        finally:
            texts.close()
        label_jobs.append((e, dataset, [] if live_selection(e.features) is not None
                           else parse_features(e.features, saes[e.sae].d_sae)))
    circuit_jobs = []
    for c in (p.circuit for p in plan.items if p.circuit):
        path = _task_path(c.task, built)
        task = load_task_file(path)
        _check_circuit_entry(lm, c, task, path)
        circuit_jobs.append((c, task.name or path.stem, str(path)))
    fc_jobs = [_feature_circuit_job(fc, lm, saes, built, label_jobs) for fc in
               (p.feature_circuit for p in plan.items if p.feature_circuit)]
    lexicon = None
    if plan.lexicon:
        lexicon = load_lexicon(Path(plan.lexicon))
    elif built is not None:
        lexicon = load_lexicon(built.root / "corpus" / "categories.json")
    return Prepared(plan=plan, lm=lm, saes=saes, label_jobs=label_jobs, circuit_jobs=circuit_jobs, lexicon=lexicon,
                    feature_circuit_jobs=fc_jobs)


def _task_path(task: str, built: Any) -> Path:
    """A plan entry's task: a task file, or (on a toy model) a toy task name resolved in the built world."""
    path = Path(task)
    if not path.exists() and built is not None and re.fullmatch(r"[a-z_]+", task):
        path = built.task_file(task)
        if not path.exists():
            raise InputError(f"toy task {task!r} does not exist: the toy tasks are "
                             f"{', '.join(built.manifest['task_accuracy'])}")
    return path


def _feature_circuit_job(fc: FeatureCircuitEntry, lm: LoadedModel, saes: dict[str, LoadedSAE], built: Any,
                         label_jobs: list[tuple[LabelEntry, str, list[int]]]
                         ) -> tuple[FeatureCircuitEntry, str, str, list[int]]:
    """Load a feature-circuit entry's SAEs into ``saes``, resolve its task (a toy task name as circuit entries
    do), check that it tokenises for the model, and add one harvest-only label job per SAE to ``label_jobs`` (no
    features yet: :func:`_choose_circuit_features` fills them in once the circuit is known, so the SAEs are
    harvested and split exactly as a label entry's are). Returns (entry, task name, task path, the indices of
    those label jobs)."""
    from autoexplain.tools.data import iter_texts, load_task_file, tokenize_task
    from autoexplain.tools.feature_circuits import SplicedModel
    from autoexplain.tools.loading import load_sae

    for spec in fc.saes:
        if spec not in saes:
            saes[spec] = load_sae(spec, lm)
    path = _task_path(fc.task, built)
    task = load_task_file(path)
    if lm.tokenizer is None:
        raise InputError(f"model {lm.spec!r} has no tokenizer, so the task's text prompts cannot be used with it")
    try:
        tokenized = tokenize_task(task, lm.tokenizer, n_ctx=lm.n_ctx)
    except InputError as exc:
        raise InputError(exc.message if str(path) in exc.message else f"task file {str(path)!r}: {exc}") from None
    # the SAEs can be spliced together (one per site, none at the embedding): checked on two prompts, now
    SplicedModel(lm, tokenized.subset(range(min(2, tokenized.n_prompts))), [saes[s] for s in fc.saes])
    jobs: list[int] = []
    if fc.label:
        dataset = fc.dataset or (str(built.corpus) if built is not None else None)
        if dataset is None:
            raise InputError(f"feature_circuit item for {fc.task}: give a dataset (only toy models have a default "
                             "corpus)")
        texts = iter_texts(dataset)
        try:
            next(texts)  # an unreachable or empty hub dataset fails before any write
        finally:
            texts.close()
        for spec in fc.saes:
            jobs.append(len(label_jobs))
            label_jobs.append((LabelEntry(sae=spec, dataset=dataset, features="all", tokens=fc.tokens), dataset, []))
    return fc, task.name or path.stem, str(path), jobs


def _check_circuit_entry(lm: LoadedModel, entry: CircuitEntry, task: TaskFile, path: Path) -> None:
    """The task tokenises for this model, its ablation moves the metric at all, and top_k fits the graph."""
    from autoexplain.tools.circuits import check_effect, default_metric
    from autoexplain.tools.data import tokenize_task
    from autoexplain.tools.patching import PatchSetup

    try:
        tokenized = tokenize_task(task, lm.tokenizer, n_ctx=lm.n_ctx)
    except InputError as exc:
        raise InputError(exc.message if str(path) in exc.message else f"task file {str(path)!r}: {exc}") from None
    setup = PatchSetup(lm, tokenized, ablation=entry.ablation, metric=default_metric(entry.method, tokenized))
    check_effect(setup)
    if entry.top_k is not None and entry.top_k > setup.graph.n_edges:
        raise InputError(f"--top-k {entry.top_k} is more than the model's {setup.graph.n_edges} edges")


def load_lexicon(path: Path) -> dict[str, frozenset[str]]:
    """A category lexicon: JSON ``{"animal": ["cat", "dog", …], …}``, merged over the built-in one."""
    from autoexplain.evals.judges import CATEGORIES

    try:
        data = json.loads(path.read_text())
        assert isinstance(data, dict) and all(isinstance(v, list) for v in data.values())
    except (OSError, json.JSONDecodeError, AssertionError):
        raise InputError(f"lexicon {str(path)!r} must be a JSON object of category -> list of words") from None
    merged = {k: frozenset(v) for k, v in CATEGORIES.items()}
    for k, words in data.items():
        merged[k] = merged.get(k, frozenset()) | frozenset(str(w).lower() for w in words)
    return merged


# ============================================================================================ the run
class ItemOutcome(BaseModel):
    item_id: str
    kind: ItemKind
    target: str
    status: ItemStatus
    text: str | None = None
    scores: dict[str, float | None] = Field(default_factory=dict)
    overall: float | None = None
    usage: Usage = Field(default_factory=Usage)
    skipped: bool = False  # finished before this process (read back from the store or its checkpoints)
    error: str | None = None


class RunResult(BaseModel):
    run_id: str
    outcomes: list[ItemOutcome]
    seconds: float
    harvest_seconds: float = 0.0
    harvest_notes: list[str] = Field(default_factory=list)  # warnings about the harvests' inputs (also stored)


def checkpoint_path(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + ".checkpoints.sqlite")


def find_resumable(store: Store, kind: str, plan_hash: str) -> str | None:
    return queries.resumable_run(store, kind, plan_hash)


class Interrupted(KeyboardInterrupt):
    """A termination signal (SIGTERM, SIGHUP) received while a run was going: stops it as Ctrl-C does."""


@contextlib.contextmanager
def _marks_interrupted(store: Store, run_id: str) -> Iterator[None]:
    """For the block: SIGTERM and SIGHUP raise :class:`Interrupted` (in the main thread; elsewhere signals are not
    ours to take), and a run stopped by Ctrl-C or such a signal is marked ``interrupted`` in ``runs`` (it stays
    resumable) instead of staying ``running``. The previous handlers come back afterwards."""
    import signal
    import threading

    previous: dict[int, Any] = {}

    def stop(signum: int, frame: Any) -> None:
        raise Interrupted(f"stopped by {signal.Signals(signum).name}")

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is not None:
                previous[sig] = signal.signal(sig, stop)
    try:
        yield
    except KeyboardInterrupt as exc:
        if queries.run_exists(store, run_id):
            with contextlib.suppress(Exception):  # the original interruption is the one to see
                store.finish_run(run_id, "interrupted", {"stopped_by": str(exc) or "KeyboardInterrupt"})
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_plan(store: Store, prep: Prepared, *, kind: str = "plan", resume: bool = False,
             run_id: str | None = None, report: Callable[[str, int, int], None] | None = None,
             on_item: Callable[[ItemOutcome], None] | None = None, on_node: NodeHook | None = None,
             commit: GroupCommit | None = None, executor: ItemExecutor | None = None) -> RunResult:
    """Run (or resume) every item of ``prep``; return what each item ended with.

    ``report(stage, done, total)``: progress of the harvest and of the items. ``on_item(outcome)``: after each item
    (finished now or before). ``on_node(item_id, node)``: after each graph node, once its checkpoint is written (a
    finer progress). What it raises counts as raised by that node: a ``KeyboardInterrupt`` stops the run as Ctrl-C
    does (finished items are committed, the item resumes after that node); an ``Exception`` fails the item.
    ``commit``: when results are committed to DuckDB (default: the plan's ``commit``). ``executor``: where the
    items run (default: here, serially; see :mod:`autoexplain.agent.executors`).
    """
    # one open connection for the run's many small writes (let go for readers)
    with store.hold(), contextlib.ExitStack() as owned:
        if run_id is None and resume:
            run_id = find_resumable(store, kind, prep.plan.content_hash())
        run_id = run_id or f"{kind}-{uuid.uuid4().hex[:10]}"
        owned.enter_context(store.run_lock(run_id))  # one writer per run: a second --resume is refused (exit 2)
        owned.enter_context(_marks_interrupted(store, run_id))  # Ctrl-C or SIGTERM: the run reads 'interrupted'
        harvests = _own_harvests(store, prep, owned)  # before anything is written: reuse checked, folders owned
        return _run_plan(store, prep, kind=kind, resume=resume, run_id=run_id, report=report, on_item=on_item,
                         on_node=on_node, commit=commit or prep.plan.commit, harvests=harvests,
                         executor=executor)


def _run_plan(store: Store, prep: Prepared, *, kind: str, resume: bool, run_id: str | None,
              report: Callable[[str, int, int], None] | None, on_item: Callable[[ItemOutcome], None] | None,
              on_node: NodeHook | None, commit: GroupCommit,
              harvests: dict[str, HarvestWork | str | None], executor: ItemExecutor | None = None) -> RunResult:
    from autoexplain.agent.store.outbox import Outbox

    plan = prep.plan
    plan_hash = plan.content_hash()
    if run_id is None and resume:
        run_id = find_resumable(store, kind, plan_hash)
    run_id = run_id or f"{kind}-{uuid.uuid4().hex[:10]}"
    t_start = time.monotonic()
    store.start_run(run_id, kind, {"plan": plan.model_dump(mode="json"), "plan_hash": plan_hash},
                    policy=plan.policy)
    store.record_model_and_saes(prep.lm, list(prep.saes.values()))
    report = report or _no_report

    env = _env(store, Outbox(store, commit, keep_rejected=plan.judgements == "all"), run_id, prep)
    _choose_circuit_features(store, env, run_id, prep, report)  # before the harvest: it splits what they pick
    harvest_s = _harvest_and_split(store, run_id, prep, report, harvests, executor)
    items = _items(run_id, prep)
    ckpt = checkpoint_path(store.path)
    outcomes = _loop(store, env, items, ckpt, report, on_item, on_node) if executor is None else \
        executor.run_items(store, env, items, ckpt, prep, report, on_item, on_node)
    if prep.feature_circuit_jobs:
        _prune_committed(store, run_id, ckpt)
    seconds = time.monotonic() - t_start
    left = sum(o.status is ItemStatus.PENDING for o in outcomes)
    summary = {"items": len(outcomes), "by_status": _count(o.status.value for o in outcomes),
               "seconds": round(seconds, 2), "harvest_seconds": round(harvest_s, 2),
               "group_commits": env.out.commits, **({"stopped_by": env.run_limit()} if left else {}),
               **({"harvest_notes": notes} if (notes := _harvest_notes(store, run_id, harvests)) else {})}
    # a run budget that left items unstarted: the run stays resumable (--resume starts them, with a new budget)
    store.finish_run(run_id, "budget_limited" if left else "done", summary)
    return RunResult(run_id=run_id, outcomes=outcomes, seconds=seconds, harvest_seconds=harvest_s,
                     harvest_notes=notes)


def _no_report(stage: str, done: int, total: int) -> None:
    pass


def _count(values: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def _harvest_args(prep: Prepared, entry: LabelEntry, dataset: str) -> HarvestIn:
    from autoexplain.tools.harvest import HarvestIn, check_args, default_ctx

    sae = prep.saes[entry.sae]
    args = HarvestIn(sae_id=sae.sae_id, dataset=dataset, n_tokens=entry.tokens, ctx=default_ctx(prep.lm.n_ctx, sae))
    check_args(args, prep.lm.n_ctx, sae)
    return args


def _own_harvests(store: Store, prep: Prepared, owned: contextlib.ExitStack) -> dict[str, HarvestWork | str | None]:
    """Per SAE to label: the work folder of the harvest it needs, owned by this process until ``owned`` closes
    (another process harvesting the same inputs: refused), or what stored harvest is reused (``"reuse"``, or a note
    when its inputs are unknown). Stored rows from other inputs are refused; a dataset the harvest will read is
    read and tokenised once here, so a broken line fails before anything is written. Writes nothing."""
    from autoexplain.agent.store.harvest import reuse_decision
    from autoexplain.tools.data import available_tokens
    from autoexplain.tools.harvest import harvest_identity, harvest_work

    out: dict[str, HarvestWork | str | None] = {}
    for entry, dataset, _ in prep.label_jobs:
        sae = prep.saes[entry.sae]
        if sae.sae_id in out:
            continue
        args = _harvest_args(prep, entry, dataset)
        reuse = reuse_decision(store, harvest_identity(prep.lm.model_id, sae.sae_id, args), sae_spec=entry.sae,
                               d_sae=sae.d_sae)
        if reuse is not None:
            out[sae.sae_id] = reuse
            continue
        available_tokens(dataset, prep.lm.tokenizer, ctx=args.ctx, n_ctx=prep.lm.n_ctx, max_tokens=args.n_tokens)
        out[sae.sae_id] = owned.enter_context(harvest_work(prep.lm.model_id, sae.sae_id, args))
    return out


def _harvest_notes(store: Store, run_id: str, harvests: dict[str, HarvestWork | str | None]) -> list[str]:
    """Warnings about the harvests a run made or reused (a dataset far smaller than asked; unknown inputs)."""
    reused = [h for h in harvests.values() if isinstance(h, str) and h != "reuse"]
    return [*queries.harvest_notes(store, run_id), *reused]


def _harvest_and_split(store: Store, run_id: str, prep: Prepared, report: Callable[[str, int, int], None],
                       harvests: dict[str, HarvestWork | str | None], executor: ItemExecutor | None = None) -> float:
    """Harvest each SAE that needs it (into the work folder :func:`_own_harvests` owns; resumable), and fix the
    held-out split of the features to label. An ``executor`` with a ``harvest`` method (same arguments and result
    as :func:`autoexplain.tools.harvest.harvest`) runs the harvests: the Ray one shards them (exact merge)."""
    from autoexplain.agent.store.harvest import harvest_sink
    from autoexplain.agent.store.rows import split_rows
    from autoexplain.evals.features import split_examples
    from autoexplain.tools.harvest import HarvestWork, harvest
    from autoexplain.tools.registry import ToolContext

    t0 = time.monotonic()
    done: set[str] = set()
    for j, (entry, dataset, features) in enumerate(prep.label_jobs):
        sae = prep.saes[entry.sae]
        if sae.sae_id not in done:
            work = harvests.get(sae.sae_id)
            if isinstance(work, HarvestWork):
                run_harvest = getattr(executor, "harvest", None) or harvest
                run_harvest(ToolContext(model=prep.lm, saes={sae.sae_id: sae}, sink=harvest_sink(store, run_id)),
                            _harvest_args(prep, entry, dataset), work=work,
                            progress=functools.partial(report, f"harvest {sae.spec}"),
                            finish_progress=functools.partial(report, f"store {sae.spec}"))
            done.add(sae.sae_id)
        n_live = live_selection(entry.features)
        if n_live is not None:  # 'live' / 'live:N': now that the SAE is harvested
            live = queries.live_features(store, sae.sae_id)
            features = live if n_live < 0 else live[:n_live]
            prep.label_jobs[j] = (entry, dataset, features)
        unsplit = queries.unsplit_examples(store, sae.sae_id, set(features))
        if unsplit:
            split = []
            for f, exs in unsplit.items():
                split += split_rows(split_examples(exs, sae.sae_id, f), sae.sae_id, f)
            store.upsert("feature_examples", split)
    return time.monotonic() - t0


def _choose_circuit_features(store: Store, env: AgentEnv, run_id: str, prep: Prepared,
                             report: Callable[[str, int, int], None]) -> None:
    """Labels on demand: for each feature-circuit entry, find its circuit (through the run's tool cache, so a
    resumed run, or the item's own ``feature_circuit`` call later, reads it back instead of computing it again),
    and put into its harvest-only label jobs the kept features with no final label from another run, at most
    ``label`` of them, largest |effect| first (ties by key). Labels this run writes do not count, so a resumed run
    picks the same features and lists the same items. A circuit that cannot be found (e.g. no behaviour) picks
    nothing here; the feature-circuit item then fails with the tool's reason."""
    from autoexplain.agent.feature_labels import labelled_elsewhere
    from autoexplain.agent.policies.offline_feature_circuits import tool_args
    from autoexplain.agent.store.caches import cache_key, cached_output
    from autoexplain.tools.feature_circuits import FeatureCircuitOut

    runner = env.runner
    spec = runner.registry.get("feature_circuit")
    for n, (entry, _, path, jobs) in enumerate(prep.feature_circuit_jobs):
        if not jobs:
            continue
        report("feature circuits", n, len(prep.feature_circuit_jobs))
        params = _feature_circuit_params(prep, entry, path)
        args = runner.registry.parse_args("feature_circuit", tool_args(params)).model_dump(mode="json")
        key = cache_key(runner.ctx.model.model_id, list(runner.ctx.saes), "feature_circuit", args)
        hit = cached_output(store, env.out, key)
        if hit is not None:
            circ = FeatureCircuitOut.model_validate_json(hit).circuit
        else:
            try:
                output = spec.fn(runner.ctx, runner.registry.parse_args("feature_circuit", args))
            except InputError:
                continue  # the item's own call gets the same error, and fails with it
            # written at once: a forward-and-backward search is never computed twice, even after a crash
            store.upsert("tool_cache", [{"cache_key": key, "tool": "feature_circuit",
                                         "output": output.model_dump_json(), "created_at": now()}])
            circ = FeatureCircuitOut.model_validate(output).circuit
        kept = sorted((x for x in circ.kept() if x.node.kind.value == "feature"), key=lambda x: (-abs(x.effect), x.key))
        features = list(dict.fromkeys((str(x.node.sae_id), int(x.node.index or 0)) for x in kept))
        done = labelled_elsewhere(store, [f"{s}#{i}" for s, i in features], run_id)
        chosen = [(s, i) for s, i in features if f"{s}#{i}" not in done][:entry.label]
        for j in jobs:
            job_entry, dataset, _ = prep.label_jobs[j]
            sae_id = prep.saes[job_entry.sae].sae_id
            prep.label_jobs[j] = (job_entry, dataset, sorted(i for s, i in chosen if s == sae_id))


def _prune_committed(store: Store, run_id: str, ckpt: Path) -> None:
    """Delete the checkpoints of this run's committed items. A feature-circuit item reading labels this run wrote
    commits the finished feature items itself (``feature_labels``); the loop prunes only what its own commits
    wrote, so their checkpoints are pruned here."""
    from langgraph.checkpoint.sqlite import SqliteSaver

    finished = {s.value for s in FINISHED}
    status = {i: st.status for i, st in queries.item_states(store, run_id).items()}
    if not ckpt.exists():
        return
    with SqliteSaver.from_conn_string(str(ckpt)) as saver:
        for item_id in {c.config["configurable"]["thread_id"] for c in saver.list(None)}:
            if status.get(item_id) in finished:
                saver.delete_thread(item_id)


def _feature_circuit_params(prep: Prepared, entry: FeatureCircuitEntry, path: str) -> dict[str, Any]:
    return {"task_file": path, "sae_ids": [prep.saes[s].sae_id for s in entry.saes], "threshold": entry.threshold,
            "edge_threshold": entry.edge_threshold, "steps": entry.steps, "held_out": entry.held_out,
            "label": entry.label}


def _items(run_id: str, prep: Prepared) -> list[WorkItem]:
    """The run's work items, in order: features (a feature-circuit entry's features after the label entries'),
    circuits, then one item per feature circuit (after the features it reads the labels of). An item listed
    twice (a feature both a label entry and a feature circuit ask for) is listed once."""
    items: list[WorkItem] = []
    for entry, _, features in prep.label_jobs:
        sae = prep.saes[entry.sae]
        for f in features:
            target = f"{sae.sae_id}#{f}"
            items.append(WorkItem(item_id=stable_id("item", run_id, "feature", target), run_id=run_id,
                                  kind=ItemKind.FEATURE, target=target,
                                  params={"sae_id": sae.sae_id, "feature_index": f}))
    for job, name, path in prep.circuit_jobs:
        items.append(WorkItem(item_id=stable_id("item", run_id, "circuit", name, job.method.value), run_id=run_id,
                              kind=ItemKind.CIRCUIT, target=name,
                              params={"task_file": path, "method": job.method.value,
                                      "ablation": job.ablation.value, "top_k": job.top_k,
                                      "threshold": job.threshold, "held_out": job.held_out,
                                      "robustness": job.robustness}))
    for fc, name, path, _ in prep.feature_circuit_jobs:
        params = _feature_circuit_params(prep, fc, path)
        identity = {k: v for k, v in params.items() if k != "task_file"}  # SAEs, thresholds, steps, split, label
        items.append(WorkItem(item_id=stable_id("item", run_id, "feature_circuit", name, identity),
                              run_id=run_id, kind=ItemKind.FEATURE_CIRCUIT, target=name, params=params))
    first: dict[str, WorkItem] = {}
    for it in items:
        first.setdefault(it.item_id, it)
    return list(first.values())


def _env(store: Store, out: Outbox, run_id: str, prep: Prepared) -> AgentEnv:
    """The run's agent environment: one LLM client (when the policy or the judge is llm), the tools, the judge
    and scorers, the policy, and the budgets."""
    from autoexplain.agent import llm_session
    from autoexplain.agent.agent_tools import agent_registry
    from autoexplain.agent.feature_labels import feature_labels_spec
    from autoexplain.agent.graph import AgentEnv
    from autoexplain.agent.policies import PolicyDeps, make_policy
    from autoexplain.agent.scoring import CircuitScorer, FeatureCircuitScorer, FeatureScorer, ModelBackground
    from autoexplain.agent.toolrun import ToolRunner
    from autoexplain.tools.registry import ToolContext

    plan = prep.plan
    meter = LLMMeter()
    llm = None
    if plan.policy == "llm" or plan.judge == "llm":  # one client: the judge's calls are logged and charged too
        llm = llm_session.make_client(plan.llm_model or "", store, run_id, meter, **plan.llm.overrides())
    ctx = ToolContext(model=prep.lm, saes={s.sae_id: s for s in prep.saes.values()}, sink=None)
    registry = agent_registry(store)
    registry.register(feature_labels_spec(store, out, run_id))
    runner = ToolRunner(store, out, registry, ctx, run_id)
    judge = _judge(plan, prep, llm)
    embedder = None
    if plan.embedding or plan.judge == "embedding":
        from autoexplain.evals.judges import EmbeddingJudge

        embedder = judge if isinstance(judge, EmbeddingJudge) else EmbeddingJudge()
    # dense features: non-activating windows from the rest of the dataset (the model and SAE decide, exactly)
    features = FeatureScorer(store, out, judge, embedder=embedder, background=ModelBackground(store, ctx))
    scorer = _ByKind(features, CircuitScorer(store, out, prep.lm, run_id),
                     FeatureCircuitScorer(store, out, prep.lm, list(prep.saes.values()), run_id))
    policy = make_policy(plan.policy, PolicyDeps(registry=registry, model_id=prep.lm.model_id,
                                                 lexicon=prep.lexicon, llm=llm))
    return AgentEnv(store=store, out=out, runner=runner, policy=policy, scorer=scorer, run_id=run_id,
                    budget=plan.budget, run_budget=plan.run_budget, meter=meter, dead_text=_dead_features(store))


def _dead_features(store: Store) -> Callable[[WorkItem], str | None]:
    """``dead_text(item)``: "dead feature: …" for a feature item whose feature never fired in its harvest (the
    store's ``features.is_dead``, read once per SAE), None for any other item."""
    dead: dict[str, dict[int, int]] = {}  # sae_id -> dead feature -> tokens harvested

    def dead_text(item: WorkItem) -> str | None:
        if item.kind is not ItemKind.FEATURE:
            return None
        sae_id = item.feature.sae_id
        if sae_id not in dead:
            dead[sae_id] = queries.dead_features(store, sae_id)
        n_tokens = dead[sae_id].get(item.feature.index)
        return f"dead feature: never fired in {n_tokens} harvested tokens" if n_tokens is not None else None

    return dead_text


class _ByKind:
    """A :class:`~autoexplain.agent.graph.Scorer` that hands each item to the scorer of its kind."""

    def __init__(self, feature: Scorer, circuit: Scorer, feature_circuit: Scorer | None = None) -> None:
        self.feature, self.circuit, self.feature_circuit = feature, circuit, feature_circuit

    def score(self, item: WorkItem, drafts: list[dict[str, Any]]) -> list[dict[str, float | None]]:
        by = {ItemKind.FEATURE: self.feature, ItemKind.CIRCUIT: self.circuit,
              ItemKind.FEATURE_CIRCUIT: self.feature_circuit}
        scorer = by.get(item.kind)
        if scorer is None:
            raise ValueError(f"no scorer for {item.kind.value} items")
        return scorer.score(item, drafts)


def _judge(plan: Plan, prep: Prepared, llm: LLMClient | None) -> Judge:
    """The plan's judge (``judge:``, from the catalogue :data:`autoexplain.evals.judges.JUDGES`). An llm judge
    talks through the run's one LLM client ``llm``, so its calls are logged (``llm_calls``, purpose ``judge``),
    cached for resume and charged to the item being scored, and it never holds the API key."""
    from autoexplain.evals.judges import make_judge

    return make_judge(plan.judge, lexicon=prep.lexicon, llm_client=llm, model_name=plan.llm_model)


def _loop(store: Store, env: AgentEnv, items: list[WorkItem], ckpt: Path, report: Callable[[str, int, int], None],
          on_item: Callable[[ItemOutcome], None] | None, on_node: NodeHook | None) -> list[ItemOutcome]:
    """Run each unfinished item's graph; rows go through ``env.out`` (group commit, see :mod:`agent.outbox`)."""
    # the model, tokenizer and SAEs are loaded: move every object alive now out of the collector's sight. Full
    # collections then scan only what the items allocate (on the toy world they took ~10 % of the run time, and a
    # pause landing in a group commit doubled its length). Unfrozen at the end: frozen objects are never collected,
    # and at exit native bindings would report them as leaked.
    gc.collect()
    gc.freeze()
    try:
        return _run_items(store, env, items, ckpt, report, on_item, on_node)
    finally:
        gc.unfreeze()


def _run_items(store: Store, env: AgentEnv, items: list[WorkItem], ckpt: Path,
               report: Callable[[str, int, int], None], on_item: Callable[[ItemOutcome], None] | None,
               on_node: NodeHook | None) -> list[ItemOutcome]:
    from langgraph.checkpoint.sqlite import SqliteSaver

    from autoexplain.agent.graph import build_graph, initial_state

    out = env.out
    stored = queries.item_states(store, env.run_id)
    status = {i: s.status for i, s in stored.items()}
    attempts = {i: s.attempts for i, s in stored.items()}
    pending = [it for it in items if it.item_id not in status]
    if pending:  # at once: a query made mid-run sees every item of the run
        rows: list[WorkItemRow] = [{"item_id": it.item_id, "run_id": it.run_id, "kind": it.kind.value,
                                    "target": it.target, "status": ItemStatus.PENDING.value, "attempts": 0}
                                   for it in pending]
        store.upsert("work_items", rows)
    outcomes: list[ItemOutcome] = []
    finished = {s.value for s in FINISHED}
    with SqliteSaver.from_conn_string(str(ckpt)) as saver:
        graph = build_graph(env, saver)

        def commit(*, final: bool = False) -> None:
            # mid-run, a file another process keeps locked defers the commit (rows kept, tried again later: never
            # charged to the item running); the last commit raises, and the checkpoints keep the rows for --resume
            for item_id in out.flush() if final else out.try_flush():  # committed: checkpoints no longer needed
                saver.delete_thread(item_id)

        # threads of items committed just before a crash (the commit landed, the pruning did not)
        for item_id in {c.config["configurable"]["thread_id"] for c in saver.list(None)}:
            if status.get(item_id) in finished:
                saver.delete_thread(item_id)
        try:
            for n, item in enumerate(items):
                report("items", n, len(items))
                if status.get(item.item_id) in finished:
                    outcomes.append(_stored_outcome(store, item))
                    if on_item is not None:
                        on_item(outcomes[-1])
                    continue
                cfg: RunnableConfig = {"configurable": {"thread_id": item.item_id}, "recursion_limit": 10_000}
                snap = graph.get_state(cfg)
                recovered = bool(snap.values and not snap.next and snap.values.get("outcome"))
                limit = None if recovered else env.run_limit()
                if limit:  # the run budget is spent: later items are not started (they stay pending)
                    outcomes.append(ItemOutcome(item_id=item.item_id, kind=item.kind, target=item.target,
                                                status=ItemStatus.PENDING,
                                                error=f"not started: {limit} reached; --resume runs it"))
                    if on_item is not None:
                        on_item(outcomes[-1])
                    continue
                out.begin(item.item_id)
                if snap.values:  # checkpoints of a process that died: put back the rows it had not committed
                    history = list(graph.get_state_history(cfg))
                    out.replay(e for h in reversed(history) for e in h.values.get("outbox") or [])
                    # a node whose writes were saved but whose checkpoint was not (killed in between, e.g. right
                    # after ``accept``): langgraph applies those pending writes instead of running the node again,
                    # so its rows are in the current state only, never in the history. Replayed last (the newest).
                    out.replay(snap.values.get("outbox") or [])
                if not recovered:  # lands with the item's other rows (a query sees it pending, then finished),
                    # travelling in the first checkpoint this attempt writes (so a recovered item keeps its count)
                    before = int(attempts.get(item.item_id) or 0)
                    if snap.values:
                        replayed = out.get("work_items", (item.item_id,)) or {}
                        before = max(before, int(replayed.get("attempts") or 1))
                    running: WorkItemRow = {
                        "item_id": item.item_id, "run_id": item.run_id, "kind": item.kind.value,
                        "target": item.target, "status": ItemStatus.RUNNING.value, "started_at": now(),
                        "attempts": before + 1}
                    out.upsert("work_items", [running])
                env.meter.current = item.item_id  # its LLM calls (policy and judge) are charged to it
                inp = None if snap.values and snap.next else initial_state(item)
                t_item, used_before = time.monotonic(), Usage.model_validate((snap.values or {}).get("usage") or {})
                try:
                    if not recovered:  # (a recovered item finished before the crash: its rows are back, not redone)
                        for update in graph.stream(inp, cfg, durability="sync", stream_mode="updates"):
                            if on_node is not None:
                                for node in update:
                                    on_node(item.item_id, node)
                            if out.due():
                                commit()
                    state = graph.get_state(cfg).values
                    oc = state["outcome"]
                    res = ItemOutcome(item_id=item.item_id, kind=item.kind, target=item.target,
                                      status=ItemStatus(oc["status"]), text=oc.get("text"),
                                      scores=oc.get("scores", {}), overall=oc.get("overall"), error=oc.get("why"),
                                      usage=Usage.model_validate(state.get("usage") or {}), skipped=recovered)
                except KeyboardInterrupt:
                    raise
                except Exception as exc:
                    step, used = _failed_step(graph, cfg, env, item, used_before, time.monotonic() - t_item)
                    err = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                    err = f"{step} failed: {err}" if step else err
                    failed: WorkItemRow = {"item_id": item.item_id, "run_id": item.run_id, "kind": item.kind.value,
                                           "target": item.target, "status": ItemStatus.FAILED.value,
                                           "error": err[:500], "finished_at": now(),
                                           "budget": {**used.model_dump(), "stopped_by": None}}
                    out.upsert("work_items", [failed], step=False)
                    res = ItemOutcome(item_id=item.item_id, kind=item.kind, target=item.target,
                                      status=ItemStatus.FAILED, error=err[:500], usage=used)
                out.finished(item.item_id)
                outcomes.append(res)
                if on_item is not None:
                    on_item(res)
                if out.due():
                    commit()
            commit(final=True)
            _compact(saver)
        except BaseException:
            # on the way out (Ctrl-C, a bug): commit what is finished; if that fails too the checkpoints still
            # hold every row, and the original error is the one to see
            with contextlib.suppress(Exception):
                commit(final=True)
            raise
        report("items", len(items), len(items))
    return outcomes


def _compact(saver: Any) -> None:
    """Give the checkpoint file's free pages back to the file system once every item is committed.

    A committed item's checkpoints are deleted, but SQLite keeps the pages they used (a run of hundreds of items
    left a 64 MB file holding no rows); ``VACUUM`` rewrites the file at its live size. Not needed for correctness:
    a failure here is ignored (the next run's compaction tries again)."""
    import sqlite3

    with contextlib.suppress(sqlite3.Error), saver.lock:  # a busy or full disk: the next run tries again
        saver.conn.commit()
        saver.conn.execute("VACUUM")


#: What each graph node does, for the error of an item that failed in it.
_STEPS = {"plan": "plan (the LLM's tool-calling turn)", "act": "act (the tool calls)", "observe": "observe",
          "propose": "propose (the LLM's explain call)", "score": "score (scoring the drafts; the judge)",
          "decide": "decide", "accept": "accept"}


def _failed_step(graph: Any, cfg: RunnableConfig, env: AgentEnv, item: WorkItem, before: Usage,
                 seconds: float) -> tuple[str | None, Usage]:
    """(the step an item failed in, what it used, the failed step included): the node the last checkpoint says
    was next, and the usage of the last checkpoint plus the LLM calls the failed node made (the meter still holds
    them) and this attempt's wall time — a failed item's usage is what it spent, not zero."""
    try:
        snap = graph.get_state(cfg)
        node = next(iter(snap.next), None) if snap.next else None
        used = Usage.model_validate((snap.values or {}).get("usage") or {})
    except Exception:  # the checkpointer itself failed: the usage of what we know
        node, used = None, before
    llm = env.meter.take(item.item_id)
    used = used.plus(steps=1 if node else 0, llm_calls=llm.llm_calls, prompt_tokens=llm.prompt_tokens,
                     completion_tokens=llm.completion_tokens)
    used = used.model_copy(update={"seconds": round(before.seconds + seconds, 3)})
    return (_STEPS.get(node, node) if node else None), used


def _stored_outcome(store: Store, item: WorkItem) -> ItemOutcome:
    """The outcome of an item finished in an earlier process (read back from the store)."""
    got = queries.stored_outcome(store, item.item_id)
    return ItemOutcome(item_id=item.item_id, kind=item.kind, target=item.target, status=ItemStatus(got.status),
                       text=got.text, overall=got.overall, skipped=True, error=got.error)
