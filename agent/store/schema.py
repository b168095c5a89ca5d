"""The tables of an autoexplain database, each declared once.

Each table is one ``TypedDict`` whose fields are its columns, in order, with ``Annotated`` markers saying what a
Python type alone cannot (primary key, NOT NULL, JSON, BIGINT, a default, a comment). Everything else derives
from these declarations: the DDL (:meth:`Table.ddl`), the primary keys, the JSON columns, and the static types of
the rows the store writes (mypy checks ``RunRow(run_id=..., status=...)`` against the columns). The declarations
are ``total=False`` because an upsert may name only some columns (a status change names the key and the status).

Migrations (:mod:`autoexplain.agent.store.migrations`) are the history that brings an older file to this shape; a
test checks that a database migrated from version 1 has exactly the columns, types, NOT NULLs and defaults
declared here. A new table is one declaration here plus one migration holding the DDL the declaration derives,
*as text* (print it with :func:`create_table` and paste it): a shipped migration never changes, while a
declaration does whenever a later migration alters its table.

Python types map to DuckDB types: ``str`` varchar, ``int`` integer (``BIGINT`` marker: bigint), ``float`` double,
``bool`` boolean, ``datetime`` timestamp, ``list[str|int|bool]`` varchar[] / integer[] / boolean[], and any type
marked ``JSON`` json (dicts and lists are written as JSON text).
"""

from __future__ import annotations

import datetime as dt
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, TypedDict, Union


# ----------------------------------------------------------------------------- markers
@dataclass(frozen=True)
class _Marker:
    name: str


KEY = _Marker("key")  #: part of the primary key (implies NOT NULL)
NOT_NULL = _Marker("not null")
JSON = _Marker("json")  #: a JSON column: dict/list values are stored as JSON text
BIGINT = _Marker("bigint")


@dataclass(frozen=True)
class Default:
    """A column default, as SQL text (``Default("false")``)."""

    sql: str


@dataclass(frozen=True)
class Doc:
    """What a column holds (becomes a comment in the DDL)."""

    text: str


Json = Any  #: the Python side of a JSON column: dicts, lists, numbers, strings or None
#: A row as writers hand it over: one of the declarations below (or a plain dict naming some of its columns).
Row = Mapping[str, Any]


# ----------------------------------------------------------------------------- the tables
class RunRow(TypedDict, total=False):
    """``runs``: one row per command or plan run."""

    run_id: Annotated[str, KEY]
    kind: Annotated[str, NOT_NULL, Doc("demo | zoo | label | harvest | circuit | plan | bench | heads | trace")]
    status: Annotated[str, NOT_NULL, Doc("running | done | failed | interrupted")]
    policy: Annotated[str | None, Doc("offline | llm")]
    config: Annotated[Json, JSON, Doc("the run's arguments (never secrets)")]
    summary: Annotated[Json, JSON, Doc("what the run produced, filled in at the end")]
    started_at: Annotated[dt.datetime, NOT_NULL]
    finished_at: dt.datetime | None
    host: str | None
    version: str | None


class WorkItemRow(TypedDict, total=False):
    """``work_items``: one feature to label or one behaviour whose circuit to find."""

    item_id: Annotated[str, KEY, Doc("stable: derived from the run plan, so resume finds it")]
    run_id: Annotated[str, NOT_NULL]
    kind: Annotated[str, NOT_NULL, Doc("feature | circuit")]
    target: Annotated[str, NOT_NULL, Doc("'sae_id#index' or a task name")]
    status: Annotated[str, NOT_NULL, Doc("pending | running | done | failed | budget_limited")]
    attempts: Annotated[int, NOT_NULL, Default("0")]
    error: str | None
    budget: Annotated[Json, JSON, Doc("steps, tokens and seconds used")]
    started_at: dt.datetime | None
    finished_at: dt.datetime | None


class ToolCallRow(TypedDict, total=False):
    """``tool_calls``: every tool call the agent made, with the bounded summary the policy saw."""

    call_id: Annotated[str, KEY]
    run_id: Annotated[str, NOT_NULL]
    item_id: str | None
    tool: Annotated[str, NOT_NULL]
    args: Annotated[Json, JSON]
    summary: Annotated[str | None, Doc("the bounded summary the LLM saw")]
    error: str | None
    duration_s: float | None
    cache_key: Annotated[str | None, Doc("(model, sae, tool, args) hash: a resumed item reuses the result")]
    created_at: Annotated[dt.datetime, NOT_NULL]


class ModelRow(TypedDict, total=False):
    """``models``: every model a run loaded."""

    model_id: Annotated[str, KEY]
    spec: Annotated[str, NOT_NULL]
    info: Annotated[Json, JSON]


class SaeRow(TypedDict, total=False):
    """``saes``: every SAE a run loaded, with its hook and width."""

    sae_id: Annotated[str, KEY, Doc("content hash of the SAE weights")]
    spec: Annotated[str, NOT_NULL]
    model_id: str | None
    hook_name: Annotated[str, NOT_NULL]
    site: Annotated[str, NOT_NULL, Doc("e.g. resid_post.1")]
    d_in: Annotated[int, NOT_NULL]
    d_sae: Annotated[int, NOT_NULL]
    architecture: str | None
    info: Annotated[Json, JSON]


class FeatureRow(TypedDict, total=False):
    """``features``: one SAE feature's harvested statistics."""

    sae_id: Annotated[str, KEY]
    feature_index: Annotated[int, KEY]
    density: Annotated[float | None, Doc("fraction of harvested tokens where the feature fires")]
    max_act: float | None
    mean_act: Annotated[float | None, Doc("mean over firing tokens")]
    n_tokens: Annotated[int | None, BIGINT, Doc("tokens harvested")]
    is_dead: bool | None
    histogram: Annotated[Json, JSON]
    top_logits: Annotated[Json, JSON, Doc("tokens the feature's decoder direction promotes most")]
    bottom_logits: Annotated[Json, JSON]
    run_id: str | None
    harvest_id: Annotated[str | None, Doc("the harvest these statistics come from (harvests)")]


class FeatureExampleRow(TypedDict, total=False):
    """``feature_examples``: a context window of a feature (top, quantile or random), per-token activations."""

    sae_id: Annotated[str, KEY]
    feature_index: Annotated[int, KEY]
    kind: Annotated[str, KEY, Doc("top | quantile | random")]
    example_id: Annotated[int, KEY]
    quantile: Annotated[int | None, Doc("bin for quantile samples")]
    split: Annotated[str | None, Doc("explain | score: which side of the held-out split")]
    tokens: Annotated[Json, JSON, Doc("the window's token strings")]
    acts: Annotated[Json, JSON, Doc("per-token activations")]
    max_act: float | None
    window_index: Annotated[int | None, BIGINT]
    run_id: str | None
    harvest_id: Annotated[str | None, Doc("the harvest this example comes from (harvests)")]


class HypothesisRow(TypedDict, total=False):
    """``hypotheses``: what the agent set out to test, and how it came out."""

    hypothesis_id: Annotated[str, KEY]
    run_id: Annotated[str, NOT_NULL]
    item_id: Annotated[str, NOT_NULL]
    text: Annotated[str, NOT_NULL]
    status: Annotated[str, NOT_NULL, Doc("open | confirmed | refuted | inconclusive")]
    causal_level: Annotated[str | None, Doc("association | intervention | counterfactual")]
    evidence: Annotated[Json, JSON, Doc("tool call ids")]
    created_at: Annotated[dt.datetime, NOT_NULL]
    updated_at: dt.datetime | None


class ExplanationRow(TypedDict, total=False):
    """``explanations``: every draft explanation; the agent's choice is ``is_final``."""

    explanation_id: Annotated[str, KEY]
    run_id: Annotated[str, NOT_NULL]
    item_id: Annotated[str, NOT_NULL]
    target: Annotated[str, NOT_NULL]
    text: Annotated[str, NOT_NULL]
    author: Annotated[str, NOT_NULL, Doc("policy name")]
    llm_model: str | None
    causal_level: Annotated[str, NOT_NULL]
    evidence: Annotated[Json, JSON]
    is_final: Annotated[bool, NOT_NULL, Default("false")]
    budget_limited: Annotated[bool, NOT_NULL, Default("false")]
    created_at: Annotated[dt.datetime, NOT_NULL]
    overall: float | None
    judge: str | None
    supported_level: Annotated[str | None, Doc("the highest causal level among the tool calls it cites (association |"
                                               " intervention | counterfactual); null: it cites no evidence")]
    overclaimed: Annotated[bool | None, Doc("true when causal_level (claimed) is above supported_level")]


class ScoreRow(TypedDict, total=False):
    """``scores``: one number about one explanation."""

    score_id: Annotated[str, KEY]
    explanation_id: Annotated[str, NOT_NULL]
    metric: Annotated[str, NOT_NULL, Doc("correctness | completeness | succinctness | detection | ...")]
    value: float | None
    n: int | None
    details: Annotated[Json, JSON, Doc("ablation, patch type, metric, judge ... whatever the value depends on")]
    created_at: Annotated[dt.datetime, NOT_NULL]


class CircuitRow(TypedDict, total=False):
    """``circuits``: a circuit found for a task, with how it was found and its faithfulness."""

    circuit_id: Annotated[str, KEY]
    run_id: Annotated[str, NOT_NULL]
    item_id: str | None
    model_id: Annotated[str, NOT_NULL]
    task: Annotated[str, NOT_NULL]
    method: Annotated[str, NOT_NULL, Doc("eap | eap-ig | acdc")]
    ablation: Annotated[str, NOT_NULL, Doc("resample | mean | zero")]
    patch_type: Annotated[str, NOT_NULL, Doc("edge | path")]
    metric: Annotated[str, NOT_NULL]
    threshold: float | None
    top_k: int | None
    n_edges_total: int | None
    n_edges: int | None
    faithfulness: float | None
    details: Annotated[Json, JSON]
    created_at: Annotated[dt.datetime, NOT_NULL]
    necessity: Annotated[float | None, Doc("(m(M) - m(circuit noised in the clean model)) / (m(M) - m(empty)): "
                                           "faithfulness is sufficiency, this is necessity")]
    held_out_faithfulness: Annotated[float | None, Doc("faithfulness of the same edges on prompts the search never "
                                                       "saw")]
    robustness_jaccard: Annotated[float | None, Doc("mean edge Jaccard of circuits found on resampled prompt sets")]
    robustness_spearman: Annotated[float | None, Doc("mean Spearman correlation of their edge scores")]


class CircuitNodeRow(TypedDict, total=False):
    """``circuit_nodes``: the mechanism of a circuit node by node: the role claimed for it and whether its
    intervention check held, and causal mediation (total, direct and indirect effect) under the circuit's
    ablation and metric."""

    circuit_id: Annotated[str, KEY]
    node: Annotated[str, KEY, Doc("'a1.2', 'm0'")]
    in_circuit: Annotated[bool, NOT_NULL]
    role: Annotated[str | None, Doc("the role the explanation claims (head_roles.role vocabulary)")]
    role_score: Annotated[float | None, Doc("the detector's score for that role, 0..1")]
    role_verified: Annotated[bool | None, Doc("the role's intervention check; null: not checked or could not run")]
    total_effect: Annotated[float | None, Doc("TE = m(M) - m(every outgoing edge noised), metric units")]
    direct_effect: Annotated[float | None, Doc("NDE: only the edge to the logits noised")]
    indirect_effect: Annotated[float | None, Doc("NIE: every outgoing edge but the one to the logits noised")]
    interaction: Annotated[float | None, Doc("TE - NDE - NIE: zero where the paths combine linearly")]
    mediation_ratio: Annotated[float | None, Doc("NIE / TE; null when TE is too small to divide by")]
    prompt_share: Annotated[float | None, Doc("share of prompts on which noising the node moves the metric toward "
                                              "the corrupt run")]
    details: Annotated[Json, JSON]


class HeadRoleRow(TypedDict, total=False):
    """``head_roles``: what each attention head of a model does, detector by detector (previous-token, induction,
    copying ...). Attention patterns and weights: association-level evidence."""

    model_id: Annotated[str, KEY]
    node: Annotated[str, KEY, Doc("'a1.2'")]
    role: Annotated[str, KEY, Doc("previous_token | duplicate_token | induction | copying | suppression | "
                                  "attends_bos")]
    score: Annotated[float | None, Doc("0..1; null: could not be computed (details say why)")]
    is_best: Annotated[bool, NOT_NULL, Default("false"), Doc("this is the head's best role, above the cut")]
    details: Annotated[Json, JSON, Doc("technique, sequences and positions used, raw values")]
    run_id: str | None
    created_at: Annotated[dt.datetime, NOT_NULL]


class CausalTraceRow(TypedDict, total=False):
    """``causal_traces``: one causal-tracing run (ROME): noise on the subject's input embeddings, one clean state
    restored at a time; its grid is in ``causal_trace_cells``."""

    trace_id: Annotated[str, KEY]
    run_id: str | None
    model_id: Annotated[str, NOT_NULL]
    task: Annotated[str | None, Doc("the task or prompt set traced")]
    noise: Annotated[float | None, Doc("noise scale: standard deviations of the token embeddings")]
    n_samples: Annotated[int | None, Doc("noise samples per prompt")]
    restore_window: Annotated[int | None, Doc("layers restored together around each cell (attn and mlp states)")]
    p_clean: Annotated[float | None, Doc("answer probability on the clean prompts")]
    p_corrupted: Annotated[float | None, Doc("answer probability with the subject noised")]
    details: Annotated[Json, JSON]
    created_at: Annotated[dt.datetime, NOT_NULL]


class CausalTraceCellRow(TypedDict, total=False):
    """``causal_trace_cells``: the grid of a causal trace, one (state, layer, pos) cell a row."""

    trace_id: Annotated[str, KEY]
    state: Annotated[str, KEY, Doc("resid | attn | mlp")]
    layer: Annotated[int, KEY]
    pos: Annotated[int, KEY, Doc("the grid column: a token position, or a position role when prompts differ")]
    label: Annotated[str | None, Doc("the column's label: \"3 ' owl'\" (position) or 'last subject' (role)")]
    site: Annotated[str | None, Doc("the state restored, e.g. mlp_out.0 (a window's centre layer)")]
    effect: Annotated[float | None, Doc("p_restored(answer) - p_corrupted(answer), mean over samples and prompts")]
    normalized: Annotated[float | None, Doc("effect / (p_clean - p_corrupted)")]


class CircuitEdgeRow(TypedDict, total=False):
    """``circuit_edges``: every scored edge of a circuit search, in the circuit or not."""

    circuit_id: Annotated[str, KEY]
    edge: Annotated[str, KEY, Doc("'a0.3->a1.2.k'")]
    src: Annotated[str, NOT_NULL]
    dst: Annotated[str, NOT_NULL]
    score: float | None
    in_circuit: Annotated[bool, NOT_NULL]
    rank: int | None


class JudgementSetRow(TypedDict, total=False):
    """``judgement_sets``: one scorer's per-example judge decisions on one explanation, as parallel lists (the
    view ``judgements`` unnests them into one row per example)."""

    explanation_id: Annotated[str, KEY]
    scorer: Annotated[str, KEY, Doc("detection | fuzzing | simulation | embedding")]
    judge: Annotated[str, KEY, Doc("lexical:<lexicon> | embedding:<model> | llm:<model>")]
    sae_id: Annotated[str, NOT_NULL]
    feature_index: Annotated[int, NOT_NULL]
    judgement_ids: Annotated[list[str], NOT_NULL, Doc("one entry per judged example, all lists in the same order")]
    example_kinds: Annotated[list[str], NOT_NULL, Doc("feature_examples.kind")]
    example_ids: Annotated[list[int], NOT_NULL, Doc("feature_examples.example_id")]
    splits: Annotated[list[str], NOT_NULL, Doc("always 'score'")]
    truths: Annotated[list[bool], NOT_NULL]
    predictions: Annotated[list[bool], NOT_NULL, Doc("an entry is null when that example's ok is false")]
    oks: Annotated[list[bool], NOT_NULL]
    errors: Annotated[list[str], NOT_NULL]
    raws: Annotated[Json, JSON, NOT_NULL, Doc("a JSON array: what the judge saw and said, per example")]
    created_at: Annotated[dt.datetime, NOT_NULL]


class ToolCacheRow(TypedDict, total=False):
    """``tool_cache``: a tool's full output, by (model, SAEs, tool, arguments)."""

    cache_key: Annotated[str, KEY, Doc("sha256 of (model, SAEs, tool, canonical arguments)")]
    tool: Annotated[str, NOT_NULL]
    output: Annotated[Json, JSON, NOT_NULL, Doc("the tool's full output model, as JSON")]
    created_at: Annotated[dt.datetime, NOT_NULL]


class LLMCallRow(TypedDict, total=False):
    """``llm_calls``: every attempt at an LLM call, its tokens, time and error."""

    llm_call_id: Annotated[str, KEY]
    run_id: Annotated[str, NOT_NULL]
    item_id: str | None
    purpose: Annotated[str, NOT_NULL, Doc("plan | explain | judge ...")]
    model: Annotated[str, NOT_NULL]
    attempt: Annotated[int, NOT_NULL]
    ok: Annotated[bool, NOT_NULL]
    cached: Annotated[bool, NOT_NULL, Default("false")]
    prompt_tokens: int | None
    completion_tokens: int | None
    duration_s: float | None
    finish_reason: str | None
    error: Annotated[str | None, Doc("never holds an API key")]
    request_hash: str | None
    created_at: Annotated[dt.datetime, NOT_NULL]
    mode: Annotated[str | None, Doc("tools | tools-json | strict | json | json_bare | plain (the request's shape)")]
    status_code: Annotated[int | None, Doc("HTTP status (200, 429, 500 ...); null: no response (timeout, network)")]
    retry_in_s: Annotated[float | None, Doc("seconds waited before the next attempt; null: none followed")]


class LLMCacheRow(TypedDict, total=False):
    """``llm_cache``: LLM responses by request hash (what makes a resumed item repeat no call)."""

    request_hash: Annotated[str, KEY, Doc("sha256 of (model, messages, tools, response format)")]
    response: Annotated[Json, JSON, NOT_NULL, Doc("the completion as the API returned it")]
    created_at: Annotated[dt.datetime, NOT_NULL]


class HarvestRow(TypedDict, total=False):
    """``harvests``: one harvest of an SAE over a dataset: what it was run on, so later runs reuse its rows only
    for the same inputs (the latest harvest of an SAE is the one its ``features`` rows hold)."""

    harvest_id: Annotated[str, KEY, Doc("hash of model, SAE, dataset identity and every argument")]
    sae_id: Annotated[str, NOT_NULL]
    model_id: str | None
    dataset: Annotated[str | None, Doc("the dataset's path or hub name")]
    inputs: Annotated[Json, JSON, NOT_NULL, Doc("model, sae, dataset identity, n_tokens asked, ctx: what reuse "
                                                "compares")]
    n_tokens: Annotated[int | None, BIGINT, Doc("tokens harvested (BOS and padding excluded)")]
    n_windows: Annotated[int | None, BIGINT]
    note: Annotated[str | None, Doc("a warning about the inputs, e.g. a dataset far smaller than asked")]
    run_id: str | None
    created_at: Annotated[dt.datetime, NOT_NULL]


class SaeAliasRow(TypedDict, total=False):
    """``sae_aliases``: every spec an SAE was loaded under (``toy:small/res0``, a folder as typed and as an absolute
    path, ``RELEASE/SAE_ID``), so a feature can be named by the spec a user typed instead of its content hash. A
    spec may name several SAEs over time (a folder overwritten, a toy world rebuilt): ``seen_at`` says which was
    loaded under it last."""

    spec: Annotated[str, KEY, Doc("the spec as typed, or the absolute path of a folder spec")]
    sae_id: Annotated[str, KEY]
    model_id: str | None
    seen_at: Annotated[dt.datetime, NOT_NULL, Doc("when an SAE was last loaded under this spec")]


class FeatureCircuitRow(TypedDict, total=False):
    """``feature_circuits``: a sparse feature circuit (Marks et al.) found for a task over one or more SAEs: nodes
    are SAE features, SAE error terms and the embeddings; node effects by integrated gradients, edges by the linear
    approximation; scores by ablating every node outside (error terms included), resample ablation."""

    feature_circuit_id: Annotated[str, KEY]
    run_id: Annotated[str, NOT_NULL]
    item_id: Annotated[str | None, Doc("the work item that found it (agent runs); null: the CLI")]
    model_id: Annotated[str, NOT_NULL]
    task: Annotated[str, NOT_NULL]
    saes: Annotated[list[str], NOT_NULL, Doc("sae_ids in forward order")]
    sites: Annotated[list[str], NOT_NULL, Doc("their sites, e.g. resid_post.0")]
    metric: Annotated[str, NOT_NULL]
    ablation: Annotated[str, NOT_NULL, Doc("resample: nodes outside take their corrupt-prompt values")]
    per_position: Annotated[bool, NOT_NULL, Doc("one node per (feature, position) instead of summed")]
    steps: Annotated[int | None, Doc("integrated-gradient steps")]
    node_threshold: Annotated[float | None, Doc("kept nodes: |effect| >= this x |m(M) - m(empty)|")]
    edge_threshold: Annotated[float | None, Doc("kept edges: |weight| >= this x |m(M) - m(empty)|")]
    n_prompts: int | None
    m_clean: Annotated[float | None, Doc("m(M): the model (SAEs spliced, error terms kept)")]
    m_ablated: Annotated[float | None, Doc("m(empty): every node at its corrupt value")]
    n_nodes: Annotated[int | None, Doc("nodes kept")]
    n_nodes_total: int | None
    n_edges: Annotated[int | None, Doc("edges kept")]
    faithfulness: Annotated[float | None, Doc("sufficiency F(C) = (m(C) - m(empty)) / (m(M) - m(empty))")]
    necessity: Annotated[float | None, Doc("1 - F(M minus C)")]
    completeness: Annotated[float | None, Doc("max(0, 1 - worst |F(C minus K) - F(M minus K)|) over knock-outs K")]
    held_out_faithfulness: Annotated[float | None, Doc("F(C) on prompts the search never saw; null: no held-out "
                                                       "split")]
    details: Annotated[Json, JSON]
    created_at: Annotated[dt.datetime, NOT_NULL]


class FeatureCircuitNodeRow(TypedDict, total=False):
    """``feature_circuit_nodes``: every node of a feature circuit with a nonzero effect, kept or not. Feature nodes
    join ``features`` on (sae_id, feature_index) and ``best_explanations`` on target = sae_id || '#' || index."""

    feature_circuit_id: Annotated[str, KEY]
    node: Annotated[str, KEY, Doc("'embed', 'SAE_ID#12', 'SAE_ID#err', with '@POS' for per-position nodes")]
    kind: Annotated[str, NOT_NULL, Doc("embed | feature | error")]
    sae_id: str | None
    feature_index: Annotated[int | None, Doc("features only")]
    site: str | None
    position: Annotated[int | None, Doc("null: summed over positions")]
    effect: Annotated[float | None, Doc("IG estimate of m(clean) - m(node at its corrupt value)")]
    activation: Annotated[float | None, Doc("clean activation (features): summed over positions, mean over prompts")]
    in_circuit: Annotated[bool, NOT_NULL]


class FeatureCircuitEdgeRow(TypedDict, total=False):
    """``feature_circuit_edges``: edges computed between a feature circuit's nodes (and into 'logits')."""

    feature_circuit_id: Annotated[str, KEY]
    src: Annotated[str, KEY]
    dst: Annotated[str, KEY, Doc("a node, or 'logits'")]
    weight: Annotated[float | None, Doc("linear approximation of src's effect through dst, directly")]
    in_circuit: Annotated[bool, NOT_NULL]


#: Every table and its row declaration, in creation order.
DECLARATIONS: dict[str, type] = {
    "runs": RunRow, "work_items": WorkItemRow, "tool_calls": ToolCallRow, "models": ModelRow, "saes": SaeRow,
    "features": FeatureRow, "feature_examples": FeatureExampleRow, "hypotheses": HypothesisRow,
    "explanations": ExplanationRow, "scores": ScoreRow, "circuits": CircuitRow, "circuit_edges": CircuitEdgeRow,
    "judgement_sets": JudgementSetRow, "tool_cache": ToolCacheRow, "llm_calls": LLMCallRow,
    "llm_cache": LLMCacheRow, "harvests": HarvestRow, "sae_aliases": SaeAliasRow, "circuit_nodes": CircuitNodeRow,
    "head_roles": HeadRoleRow, "causal_traces": CausalTraceRow, "causal_trace_cells": CausalTraceCellRow,
    "feature_circuits": FeatureCircuitRow, "feature_circuit_nodes": FeatureCircuitNodeRow,
    "feature_circuit_edges": FeatureCircuitEdgeRow,
}
#: Views over the tables: read them like tables, never write them.
VIEWS = ("judgements", "best_explanations")
#: The table names, in creation order.
TABLES = tuple(DECLARATIONS)


# ----------------------------------------------------------------------------- what derives from them
@dataclass(frozen=True)
class Column:
    name: str
    sql_type: str
    not_null: bool
    json: bool
    default: str | None
    doc: str | None

    def ddl(self) -> str:
        parts = [self.name, self.sql_type]
        if self.not_null:
            parts.append("not null")
        if self.default is not None:
            parts.append(f"default {self.default}")
        return " ".join(parts)


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]

    @property
    def json_columns(self) -> frozenset[str]:
        return frozenset(c.name for c in self.columns if c.json)

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def ddl(self) -> str:
        """``create table`` for this declaration (single-column keys inline, composite keys as a clause)."""
        entries = [(c.ddl() + (" primary key" if self.key == (c.name,) else ""), c.doc) for c in self.columns]
        if len(self.key) > 1:
            entries.append((f"primary key ({', '.join(self.key)})", None))
        lines = [f"    {text}{',' if i < len(entries) - 1 else ''}{'  -- ' + doc if doc else ''}"
                 for i, (text, doc) in enumerate(entries)]
        return f"create table {self.name} (\n" + "\n".join(lines) + "\n)"


_SCALARS: dict[Any, str] = {str: "varchar", int: "integer", float: "double", bool: "boolean", dt.datetime: "timestamp"}


def _sql_type(py: Any, markers: list[Any], where: str) -> str:
    if JSON in markers:
        return "json"
    if BIGINT in markers:
        return "bigint"
    origin = typing.get_origin(py)
    if origin in (Union, types.UnionType):
        rest = [a for a in typing.get_args(py) if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"{where}: a column holds one type (or None), got {py}")
        return _sql_type(rest[0], markers, where)
    if origin is list:
        (inner,) = typing.get_args(py)
        return _sql_type(inner, [], where) + "[]"
    if py in _SCALARS:
        return _SCALARS[py]
    raise TypeError(f"{where}: no DuckDB type for {py!r}; mark JSON columns with JSON")


def _table(name: str, decl: type) -> Table:
    hints = typing.get_type_hints(decl, include_extras=True)
    columns, key = [], []
    for col, hint in hints.items():
        markers: list[Any] = []
        py = hint
        if typing.get_origin(hint) is Annotated:
            py, *markers = typing.get_args(hint)
        if KEY in markers:
            key.append(col)
        default = next((m.sql for m in markers if isinstance(m, Default)), None)
        doc = next((m.text for m in markers if isinstance(m, Doc)), None)
        columns.append(Column(col, _sql_type(py, markers, f"{name}.{col}"),
                              not_null=KEY in markers or NOT_NULL in markers, json=JSON in markers,
                              default=default, doc=doc))
    if not key:
        raise TypeError(f"table {name} declares no KEY column")
    return Table(name, tuple(columns), tuple(key))


@cache
def tables() -> dict[str, Table]:
    """Every table, derived from :data:`DECLARATIONS` (computed once, on first use — not at import)."""
    return {name: _table(name, decl) for name, decl in DECLARATIONS.items()}


def table(name: str) -> Table:
    """The declared table ``name``; ``ValueError`` for anything else (views included)."""
    found = tables().get(name)
    if found is None:
        hint = " (a view over judgement_sets: write sets, see agent.store.rows.judgement_set_rows)" \
            if name == "judgements" else ""
        raise ValueError(f"unknown table {name!r}{hint}")
    return found


def create_table(name: str) -> str:
    """The DDL of a declared table as it is declared now: to paste into a new migration (never call it from one —
    a migration's statements are frozen history) and for the test that migrations reach the declarations."""
    return table(name).ddl()
