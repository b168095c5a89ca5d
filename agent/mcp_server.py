"""Serving autoexplain's tools, store and feature pages over the Model Context Protocol (``autoexplain mcp``).

Any MCP client (a coding assistant, another research agent) can then call the same tools our agent calls, query the
results database read-only, and read a feature's page. Built on the official ``mcp`` SDK's low-level
:class:`mcp.server.lowlevel.Server`: the tools already carry their JSON schemas (pydantic input and output models),
so the server lists them as they are instead of re-deriving schemas from Python signatures, as the SDK's
decorator-based ``MCPServer`` would.

What is served
--------------
* **Tools** of the registry (:func:`autoexplain.tools.registry.default_registry`) plus ``mediation``, when the
  server was started with a model (``--model``, ``--sae``). Each is listed with its input schema (the pydantic
  input model's JSON schema), its output schema, and its causal level and cost: in the description (for an LLM
  reading it), and in ``_meta`` (``autoexplain/causal_level``: association | intervention | counterfactual, or
  ``none`` for descriptive tools such as ``model_info``; ``autoexplain/cost``: cheap | forward). Tools that pass
  over a whole dataset (``harvest``) are not served: they write to the database and take minutes (``autoexplain
  harvest`` does that).
  A result carries the tool's bounded text summary (what an LLM should read) as content and the full output as
  ``structuredContent``, checked against the output schema before it is sent.
* **Store reads**, when there is a database: ``sql`` (one read-only statement, see :func:`sql_query`) and
  ``feature_page`` (the same page as the resource below, for clients without resource support).
* **Resources**: ``autoexplain://feature/{sae_id}/{index}``, a feature's page (labels, final first, with their
  scores and causal level; statistics; top and quantile contexts) as Markdown and as JSON. The SAE part may also be
  any spec the SAE was loaded under, URL-encoded (``autoexplain://feature/toy%3Atiny%2Fres0/7``).
  ``resources/list`` lists the features that have a final label.

Errors
------
Bad arguments, unknown tools and tool refusals (:class:`~autoexplain.tools.errors.InputError`) come back as a
tool result with ``isError`` and the one-line message; any other exception inside a tool is logged to stderr
with its traceback and also comes back as ``isError`` (``internal error in TOOL: …``): the server keeps serving.
An unknown or malformed resource URI is a protocol error (``INVALID_PARAMS``), as the SDK's own server does.

Caveats
-------
The model and SAEs load once, on the first call that needs them (loading inside the ``initialize`` handshake would
time out clients on a large model), through the CLI's loaders (:mod:`autoexplain.tools.loading`). Tool calls run
in a worker thread, one at a time (hooks on one model are not re-entrant); the event loop keeps answering
(``ping``, listings, store reads) meanwhile. Tool results are not cached and nothing is written to the database:
the server never holds the file for writing, so it runs beside ``autoexplain run`` on the same database (each
read announces itself, so the run commits its finished items and lets go, see
:func:`autoexplain.agent.store.db.run_query`). ``task_file`` arguments name files on the server's machine; the
HTTP transport binds 127.0.0.1 only, with the SDK's DNS-rebinding protection.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

from pydantic import BaseModel, ConfigDict, Field

from autoexplain.tools.errors import InputError
from autoexplain.tools.registry import Cost, ToolContext, ToolOutput, ToolSpec, default_registry, short_repr
from autoexplain.tools.vocab import CausalLevel

if TYPE_CHECKING:
    import mcp_types
    from mcp.server.context import ServerRequestContext
    from mcp.server.lowlevel import Server

    from autoexplain.agent.store.queries import ReadOnlyStore

logger = logging.getLogger(__name__)

SERVER_NAME = "autoexplain"
FEATURE_URI = "autoexplain://feature/"
FEATURE_TEMPLATE = FEATURE_URI + "{sae_id}/{index}"
META_LEVEL = "autoexplain/causal_level"
META_COST = "autoexplain/cost"
#: Statement kinds the ``sql`` tool runs (DuckDB's own parse): SELECT covers WITH, FROM-first, VALUES, SHOW,
#: DESCRIBE and SUMMARIZE; everything else (INSERT, CREATE, COPY, ATTACH, SET, PRAGMA, CALL, LOAD …) is refused.
READ_STATEMENTS = ("SELECT", "EXPLAIN")
#: Features listed by ``resources/list`` (the template reaches every feature).
LISTED_FEATURES = 500


class ServeConfig(BaseModel):
    """What one server serves: a database (read-only) and/or a model with SAEs. Checked by the CLI first."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    db: Path | None = Field(default=None, description="results database read by sql, feature_page and resources")
    model: str | None = Field(default=None, description="model spec (local dir, hub name, toy:NAME)")
    saes: tuple[str, ...] = Field(default=(), description="SAE specs spliced into the model")
    device: str | None = None
    sql_timeout_s: float = Field(default=30.0, gt=0, description="seconds a read waits while a run holds the file")


# ----------------------------------------------------------------------------- served tools
@dataclass(frozen=True)
class ServedTool:
    """One tool as the server lists and runs it: a registry :class:`ToolSpec` bound to the model session, or a
    store read bound to the database."""

    name: str
    description: str
    input_model: type[BaseModel]
    output_model: type[ToolOutput]
    cost: Cost
    level: CausalLevel | None
    run: Callable[[BaseModel], ToolOutput]

    def listing(self) -> mcp_types.Tool:
        """The ``tools/list`` entry: schemas from the pydantic models; causal level and cost in the description
        and in ``_meta``; read-only, closed-world hints (no tool changes the model's weights or the database)."""
        import mcp_types

        level = self.level.value if self.level else "none"
        tail = f"[causal level: {level if self.level else 'none (descriptive)'}; cost: {self.cost.value}]"
        return mcp_types.Tool(name=self.name, description=f"{self.description} {tail}",
                              input_schema=self.input_model.model_json_schema(),
                              output_schema=self.output_model.model_json_schema(),
                              annotations=mcp_types.ToolAnnotations(read_only_hint=True, destructive_hint=False,
                                                                    idempotent_hint=True, open_world_hint=False),
                              _meta={META_LEVEL: level, META_COST: self.cost.value})

    def parse(self, arguments: dict[str, Any]) -> BaseModel:
        """The arguments validated by the input model; one :class:`InputError` line otherwise (the registry's
        wording, :meth:`~autoexplain.tools.registry.Registry.parse_args`)."""
        from pydantic import ValidationError

        try:
            return self.input_model.model_validate(arguments)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "arguments"
            raise InputError(f"bad arguments for {self.name}: {where}: {err['msg']} "
                             f"(schema: {sorted(self.input_model.model_fields)})") from None


class ModelSession:
    """The model and SAEs, loaded once on first use through the CLI's loaders; tool calls one at a time."""

    def __init__(self, model: str, saes: Sequence[str], device: str | None) -> None:
        self.model, self.saes, self.device = model, tuple(saes), device
        self._ctx: ToolContext | None = None
        self._lock = threading.Lock()  # loading and running: hooks on one model are not re-entrant

    def _context(self) -> ToolContext:
        if self._ctx is None:
            from autoexplain.tools.loading import load_model, load_sae

            logger.warning("loading %s%s", self.model, f" with {', '.join(self.saes)}" if self.saes else "")
            lm = load_model(self.model, self.device, sae_specs=self.saes)
            loaded = [load_sae(s, lm) for s in self.saes]
            self._ctx = ToolContext(model=lm, saes={s.sae_id: s for s in loaded})
        return self._ctx

    def call(self, spec: ToolSpec, args: BaseModel) -> ToolOutput:
        with self._lock:
            return spec.fn(self._context(), args)


def model_tools(session: ModelSession) -> list[ServedTool]:
    """The registry's tools (and ``mediation``) bound to ``session``; dataset-wide tools are left out."""
    from autoexplain.agent.agent_tools import MEDIATION

    specs = [s for s in default_registry() if s.cost is not Cost.DATASET] + [MEDIATION]

    def bound(spec: ToolSpec) -> Callable[[BaseModel], ToolOutput]:
        return lambda args: session.call(spec, args)

    return [ServedTool(s.name, s.description, s.input_model, s.output_model, s.cost, s.level, bound(s))
            for s in specs]


# ----------------------------------------------------------------------------- sql
class SqlIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1, max_length=20_000, description="one read-only SQL statement (SELECT, WITH, "
                                                                    "SHOW, DESCRIBE, EXPLAIN) in DuckDB's dialect")
    max_rows: int = Field(default=200, ge=1, le=5000, description="rows to return at most")


class SqlOut(ToolOutput):
    columns: list[str]
    rows: list[list[Any]] = Field(description="values as JSON: timestamps ISO 8601, decimals and blobs as "
                                              "strings, non-finite floats as 'nan' / 'inf' / '-inf'")
    n_rows: int = Field(description="rows returned (at most max_rows)")
    truncated: bool = Field(description="true when the query had more rows than max_rows")

    def summary_text(self) -> str:
        head = f"{self.n_rows} row{'s' * (self.n_rows != 1)}" + (" (truncated)" if self.truncated else "")
        lines = [" | ".join(self.columns)] + [" | ".join(json.dumps(v, ensure_ascii=False) for v in r)
                                               for r in self.rows[:40]]
        more = f"\n… {self.n_rows - 40} more rows in the structured result" if self.n_rows > 40 else ""
        return f"{head}:\n" + "\n".join(lines) + more


def jsonable(value: Any) -> Any:
    """A DuckDB value as JSON, never silently changed to null: non-finite floats become strings."""
    import datetime as dt
    import decimal
    import uuid

    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [jsonable(v) for v in value]
    return str(value)


def check_read_only(query: str) -> None:
    """Refuse anything but one SELECT-style statement, by DuckDB's own parse (no database needed). The read itself
    then runs on a read-only connection with file access off (:func:`~autoexplain.agent.store.db.run_query`):
    this check only makes the refusal early and clear."""
    from autoexplain.agent.store.queries import statement_types

    statements = statement_types(query)
    if len(statements) != 1:
        raise InputError(f"query holds {len(statements)} SQL statements: the sql tool runs exactly one")
    kind = statements[0]
    if kind not in READ_STATEMENTS:
        raise InputError(f"the sql tool is read-only: a {kind} statement is refused (only SELECT, WITH, SHOW, "
                         "DESCRIBE, EXPLAIN … are run)")


def sql_query(db: Path, args: SqlIn, timeout_s: float) -> SqlOut:
    """Run one read-only statement the way ``autoexplain sql`` does, and return at most ``args.max_rows`` rows."""
    from autoexplain.agent.store import run_query

    check_read_only(args.query)
    cols, rows = run_query(db, args.query, timeout_s=timeout_s)
    kept = rows[: args.max_rows]
    return SqlOut(columns=cols, rows=[[jsonable(v) for v in r] for r in kept], n_rows=len(kept),
                  truncated=len(rows) > args.max_rows)


# ----------------------------------------------------------------------------- feature pages
class FeaturePageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sae: str = Field(min_length=1, description="the SAE's sae_id (sae-…) or any spec it was loaded under "
                                               "(toy:small/res0, a folder, RELEASE/SAE_ID)")
    feature_index: int = Field(ge=0, description="the feature")
    n_examples: int = Field(default=10, ge=0, le=100, description="top and quantile contexts shown (each)")


class PageScore(BaseModel):
    value: float | None = Field(description="null: the scorer could not compute it (see details)")
    n: int | None
    details: dict[str, Any] = Field(default_factory=dict)


class PageLabel(BaseModel):
    text: str
    is_final: bool
    budget_limited: bool
    causal_level: str
    author: str
    llm_model: str | None
    judge: str | None
    overall: float | None
    run_id: str
    scores: dict[str, PageScore]


class PageExample(BaseModel):
    kind: str = Field(description="top | quantile | random")
    quantile: int | None
    split: str | None = Field(description="explain (what the labeller saw) | score (held out) | null (not split)")
    max_act: float | None
    tokens: list[str]
    acts: list[float]

    def marked(self) -> str:
        return "".join(f"[[{t}]]({a:.2g})" if a > 0 else t for t, a in zip(self.tokens, self.acts, strict=True))


class FeaturePage(ToolOutput):
    uri: str
    sae_id: str
    feature_index: int
    specs: list[str] = Field(description="every spec this SAE was loaded under, latest first")
    site: str
    d_sae: int
    model_id: str | None
    labels: list[PageLabel] = Field(description="final first, then drafts by overall score")
    statistics: dict[str, Any] | None = Field(description="harvested statistics; null: never harvested")
    examples: list[PageExample]

    def summary_text(self) -> str:
        return self.markdown(max_examples=5)

    def markdown(self, max_examples: int | None = None) -> str:
        name = f"{self.specs[0] if self.specs else self.sae_id}#{self.feature_index}"
        out = [f"# feature {name} ({self.sae_id}#{self.feature_index}, SAE at {self.site}, d_sae {self.d_sae})", "",
               "## labels"]
        if not self.labels:
            out.append("- none: this feature was never labelled")
        for lab in self.labels:
            tag = ("final" if lab.is_final else "draft") + (", budget-limited" if lab.budget_limited else "")
            three = "; ".join(f"{m} {'-' if s.value is None else f'{s.value:.3f}'} (n {s.n})"
                              for m, s in lab.scores.items() if m in ("correctness", "completeness", "succinctness"))
            out.append(f"- [{tag}] {lab.text} (causal level {lab.causal_level}; {three or 'not scored'})")
        out += ["", "## statistics"]
        st = self.statistics
        if st is None:
            out.append("not harvested")
        else:
            out.append(f"density {st.get('density')} over {st.get('n_tokens')} tokens; max activation "
                       f"{st.get('max_act')}; mean when firing {st.get('mean_act')}"
                       + ("; DEAD (never fired)" if st.get("is_dead") else ""))
            if st.get("top_logits"):
                out.append("promotes: " + ", ".join(repr(t) for t, _ in st["top_logits"][:10]))
        shown = self.examples if max_examples is None else self.examples[:max_examples]
        if shown:
            out += ["", "## contexts (firing tokens as [[token]](activation))"]
            out += [f"- {e.kind}{'' if e.quantile is None else f' q{e.quantile}'} ({e.split or 'unsplit'}, max "
                    f"{e.max_act}): {e.marked()}" for e in shown]
        return "\n".join(out)


def feature_uri(sae_id: str, index: int) -> str:
    return f"{FEATURE_URI}{quote(sae_id, safe='')}/{index}"


def parse_feature_uri(uri: str) -> tuple[str, int]:
    """``autoexplain://feature/{sae}/{index}`` -> (sae, index), the SAE part URL-decoded; InputError otherwise."""
    if not uri.startswith(FEATURE_URI):
        raise InputError(f"unknown resource {short_repr(uri, 80)}: feature pages are {FEATURE_TEMPLATE}")
    sae, sep, index = uri[len(FEATURE_URI):].rpartition("/")
    if not sep or not sae or not index.isdigit():
        raise InputError(f"resource {short_repr(uri, 80)} is not {FEATURE_TEMPLATE} (e.g. "
                         f"{FEATURE_URI}sae-0123456789abcdef/7)")
    return unquote(sae), int(index)


def feature_page(store: ReadOnlyStore, sae: str, index: int, n_examples: int = 10) -> FeaturePage:
    """What the database holds about one feature (``autoexplain show feature`` as data)."""
    from autoexplain.agent.store import queries

    known = {k.sae_id: k for k in queries.known_saes(store)}
    found = [s for s in queries.sae_ids_for_spec(store, sae) if s in known]
    if not found:
        listing = "; ".join(f"{k.sae_id} ({', '.join(k.specs[:2])})" for k in known.values()) or "none"
        raise InputError(f"unknown SAE {short_repr(sae, 80)}: the SAEs in the database are {listing}")
    k = known[found[0]]
    if index >= k.d_sae:
        raise InputError(f"feature {index} is out of range for {k.sae_id}: its features are 0..{k.d_sae - 1}")
    stats = queries.feature_details(store, k.sae_id, index)
    labels = queries.explanations_of_target(store, f"{k.sae_id}#{index}")
    if stats is None and not labels:
        raise InputError(f"feature {index} of {k.sae_id} has no stored statistics or labels ({k.n_features} of "
                         f"its {k.d_sae} features are harvested)")
    scores = queries.explanation_scores(store, [e.explanation_id for e in labels])
    page_labels = [PageLabel(text=e.text, is_final=bool(e.is_final), budget_limited=bool(e.budget_limited),
                             causal_level=e.causal_level, author=e.author, llm_model=e.llm_model, judge=e.judge,
                             overall=e.overall, run_id=e.run_id,
                             scores={s.metric: PageScore(value=s.value, n=s.n, details=jsonable(s.details))
                                     for s in scores.get(e.explanation_id, [])})
                   for e in labels]
    examples = queries.stored_examples(store, k.sae_id, index)
    picked = ([x for x in examples if x.kind == "top"][:n_examples]
              + [x for x in examples if x.kind == "quantile"][:n_examples])
    return FeaturePage(uri=feature_uri(k.sae_id, index), sae_id=k.sae_id, feature_index=index, specs=k.specs,
                       site=k.site, d_sae=k.d_sae, model_id=k.model_id, labels=page_labels,
                       statistics=None if stats is None else jsonable(stats._asdict()),
                       examples=[PageExample(kind=x.kind, quantile=x.quantile, split=x.split, max_act=x.max_act,
                                             tokens=x.tokens, acts=x.acts) for x in picked])


def store_tools(db: Path, timeout_s: float) -> list[ServedTool]:
    """``sql`` and ``feature_page`` on the database ``db`` (read-only)."""
    from autoexplain.agent.store.queries import ReadOnlyStore

    def run_sql(args: BaseModel) -> ToolOutput:
        assert isinstance(args, SqlIn)
        return sql_query(db, args, timeout_s)

    def run_page(args: BaseModel) -> ToolOutput:
        assert isinstance(args, FeaturePageIn)
        return feature_page(ReadOnlyStore(db, timeout_s=timeout_s), args.sae, args.feature_index, args.n_examples)

    return [
        ServedTool("sql", "Query the results database (DuckDB) read-only: one SELECT-style statement (tables runs, "
                          "work_items, tool_calls, hypotheses, explanations, scores, judgements, features, "
                          "feature_examples, circuits, circuit_edges, circuit_nodes, …; 'show tables' lists them). "
                          "Writes, file access and several statements are refused. Not evidence by itself: it "
                          "reads results other tools produced.",
                   SqlIn, SqlOut, Cost.CHEAP, None, run_sql),
        ServedTool("feature_page", "A stored feature's page: its labels (final first) with correctness, "
                                   "completeness and succinctness on held-out data and the causal level each "
                                   "claims, its harvested statistics, and its top and quantile contexts (split "
                                   f"marked). The same page is the resource {FEATURE_TEMPLATE}.",
                   FeaturePageIn, FeaturePage, Cost.CHEAP, None, run_page),
    ]


# ----------------------------------------------------------------------------- the server
class AutoexplainMCP:
    """The served tools and resources, and the MCP request handlers over them."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        tools: list[ServedTool] = []
        if cfg.model is not None:
            tools += model_tools(ModelSession(cfg.model, cfg.saes, cfg.device))
        elif cfg.saes:
            raise InputError("--sae needs --model: the SAEs are spliced into a model")
        if cfg.db is not None:
            tools += store_tools(cfg.db, cfg.sql_timeout_s)
        if not tools:
            raise InputError("nothing to serve: pass --model (and --sae) for the tools, or --db for the results")
        self.tools = {t.name: t for t in tools}
        if len(self.tools) != len(tools):  # a registry tool named like a store tool would shadow it silently
            names = [t.name for t in tools]
            raise ValueError(f"tool names served twice: {sorted({n for n in names if names.count(n) > 1})}")
        self._listing: list[mcp_types.Tool] | None = None

    def _reader(self) -> ReadOnlyStore:
        from autoexplain.agent.store.queries import ReadOnlyStore

        assert self.cfg.db is not None
        return ReadOnlyStore(self.cfg.db, timeout_s=self.cfg.sql_timeout_s)

    # -- tools
    async def list_tools(self, ctx: ServerRequestContext[Any], params: Any) -> mcp_types.ListToolsResult:
        import mcp_types

        if self._listing is None:  # schemas are built once: the tools do not change while serving
            self._listing = [t.listing() for t in self.tools.values()]
        return mcp_types.ListToolsResult(tools=self._listing)

    def run_tool(self, name: str, arguments: dict[str, Any]) -> tuple[ToolOutput, dict[str, Any]]:
        """Validate and run one call (blocking); returns the output and its JSON, checked against its schema."""
        import pydantic_core
        from pydantic import ValidationError

        tool = self.tools.get(name)
        if tool is None:
            raise InputError(f"unknown tool {name!r}: available tools are {', '.join(sorted(self.tools))}")
        out = tool.run(tool.parse(arguments))
        payload = out.model_dump(mode="json")
        # the JSON the SDK will send (non-finite floats become null) must read back as the output model, or a
        # client checking it against the output schema rejects the whole result: say why here instead (a tool bug).
        # pydantic's own check of its model is ~300x faster than a JSON-schema validator (0.2 ms against 60 ms
        # for a 19 kB feature_activations result)
        try:
            tool.output_model.model_validate_json(pydantic_core.to_json(payload, inf_nan_mode="null"))
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "output"
            raise RuntimeError(f"the output does not fit {name}'s output schema: {where}: {err['msg']} (a "
                               "non-finite number is sent as null)") from None
        return out, payload

    async def call_tool(self, ctx: ServerRequestContext[Any],
                        params: mcp_types.CallToolRequestParams) -> mcp_types.CallToolResult:
        import anyio
        import mcp_types

        def failed(message: str) -> mcp_types.CallToolResult:
            return mcp_types.CallToolResult(content=[mcp_types.TextContent(type="text", text=message)],
                                            is_error=True)

        try:
            out, payload = await anyio.to_thread.run_sync(self.run_tool, params.name, params.arguments or {})
        except InputError as exc:
            return failed(exc.message)
        except Exception as exc:  # a bug in a tool must not take the server down: log it, answer with an error
            logger.exception("tool %r failed", params.name)
            return failed(f"internal error in {params.name}: {exc.__class__.__name__}: {str(exc)[:500]}")
        return mcp_types.CallToolResult(content=[mcp_types.TextContent(type="text", text=out.summary())],
                                        structured_content=payload)

    # -- resources
    async def list_resources(self, ctx: ServerRequestContext[Any], params: Any) -> mcp_types.ListResourcesResult:
        import anyio
        import mcp_types

        rows = await anyio.to_thread.run_sync(self._listed)
        return mcp_types.ListResourcesResult(resources=[
            mcp_types.Resource(name=f"{sae_id}#{index}", uri=feature_uri(sae_id, index), description=label,
                               mime_type="text/markdown") for sae_id, index, label in rows])

    def _listed(self) -> list[tuple[str, int, str]]:
        try:
            from autoexplain.agent.store.queries import labelled_features

            return labelled_features(self._reader(), LISTED_FEATURES)
        except InputError:  # no database (yet): nothing to list
            return []

    async def list_templates(self, ctx: ServerRequestContext[Any],
                             params: Any) -> mcp_types.ListResourceTemplatesResult:
        import mcp_types

        return mcp_types.ListResourceTemplatesResult(resource_templates=[mcp_types.ResourceTemplate(
            name="feature", uri_template=FEATURE_TEMPLATE, mime_type="text/markdown",
            description="A feature's page: labels with scores and causal level, statistics, contexts (Markdown, "
                        "then the same as JSON). sae_id: sae-… or a spec it was loaded under, URL-encoded.")])

    async def read_resource(self, ctx: ServerRequestContext[Any],
                            params: mcp_types.ReadResourceRequestParams) -> mcp_types.ReadResourceResult:
        import anyio
        import mcp_types
        from mcp.shared.exceptions import MCPError

        uri = str(params.uri)
        try:
            sae, index = parse_feature_uri(uri)
            page = await anyio.to_thread.run_sync(feature_page, self._reader(), sae, index)
        except InputError as exc:
            raise MCPError(code=mcp_types.INVALID_PARAMS, message=exc.message, data={"uri": uri}) from None
        return mcp_types.ReadResourceResult(contents=[
            mcp_types.TextResourceContents(uri=uri, mime_type="text/markdown", text=page.markdown()),
            mcp_types.TextResourceContents(uri=uri, mime_type="application/json", text=page.model_dump_json())])

    def server(self) -> Server[Any]:
        """The SDK's low-level server with these handlers (resources only when there is a database)."""
        from importlib.metadata import version

        from mcp.server.lowlevel import Server

        has_db = self.cfg.db is not None
        return Server(SERVER_NAME, version=version("autoexplain"),
                      instructions=instructions(self.cfg, sorted(self.tools)),
                      on_list_tools=self.list_tools, on_call_tool=self.call_tool,
                      on_list_resources=self.list_resources if has_db else None,
                      on_list_resource_templates=self.list_templates if has_db else None,
                      on_read_resource=self.read_resource if has_db else None)


def instructions(cfg: ServeConfig, tools: list[str]) -> str:
    parts = ["autoexplain: tools that explain what happens inside a language model (SAE features, circuits)."]
    if cfg.model:
        parts.append(f"Model {cfg.model}" + (f" with SAEs {', '.join(cfg.saes)}" if cfg.saes else "")
                     + ": call model_info first (it lists the sites and the SAEs' sae_id). Each tool's causal "
                       "level (association < intervention < counterfactual) is the strongest claim its result "
                       "supports.")
    if cfg.db:
        parts.append(f"Results database {cfg.db}: sql (read-only) and feature pages ({FEATURE_TEMPLATE}).")
    parts.append(f"Tools: {', '.join(tools)}.")
    return " ".join(parts)


async def serve_stdio(app: AutoexplainMCP) -> None:
    """Serve over stdin/stdout until the client closes stdin (the SDK points fd 1 at stderr meanwhile, so stray
    prints cannot corrupt the protocol)."""
    from mcp.server.stdio import stdio_server

    server = app.server()
    async with stdio_server() as (read, write):
        await server.run(read, write, server.create_initialization_options())


def serve_http(app: AutoexplainMCP, port: int, *, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve streamable HTTP at ``http://127.0.0.1:PORT/mcp`` (127.0.0.1 only) until interrupted."""
    import uvicorn

    server = app.server()
    asgi = server.streamable_http_app(host="127.0.0.1")
    config = uvicorn.Config(asgi, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    web = uvicorn.Server(config)
    if on_ready is not None:
        on_ready(f"http://127.0.0.1:{port}/mcp")
    web.run()
