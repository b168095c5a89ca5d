"""The project's one wrapper around an OpenAI-compatible chat endpoint (used by the agent's ``llm`` policy).

Two calls, both on ``POST /v1/chat/completions``:

* :meth:`LLMClient.chat_tools` — tool calling (native, or tool calls as JSON for servers without it; see
  "Adapting to the endpoint"). It returns an :class:`AssistantTurn` whose tool calls keep
  their ``arguments`` as the raw string the model wrote, malformed JSON included: the agent validates them against
  the tool registry (``Registry.parse_args``) and returns errors to the model as tool messages. Nothing is parsed
  or repaired here.
* :meth:`LLMClient.structured` — a pydantic object out of the model (see "Structured output" below).

What every request carries (so that every common server accepts it)
    ``max_tokens`` always (``LLMConfig.max_tokens``, default 1024; llama.cpp ignores ``max_completion_tokens`` and
    without a cap a weak model generates until its context is full); ``tool_choice: "auto"`` whenever tools are
    offered (OpenAI and vLLM default to "auto", llama-cpp-python to "none"); ``content: ""`` — never null — on
    assistant turns (llama-cpp-python answers HTTP 500 to ``content: null``); ``temperature`` unless None. The
    timeout fits the token cap: ``timeout_s`` or, unset, ``20 s + 0.1 s per max_tokens`` (≥ 10 tokens/s).

Retry policy
    The ``openai`` client is built with ``max_retries=0``; this module retries itself so every HTTP attempt is
    visible (``on_call``) and the waits are ours. Retried: ``RateLimitError`` (429), ``InternalServerError``
    (5xx), 408 and 409 (as the SDK does), ``APIConnectionError``, a 200 response that is not a chat completion
    (non-JSON body from a proxy, no ``choices``), and ``APITimeoutError`` — but a timed-out request is retried
    at most ``max_timeout_retries`` times (default 1): the server usually goes on generating the abandoned
    request, and every retry queues one more generation behind it. At most ``1 + max_retries`` attempts.
    Before attempt k+1 we sleep ``min(cap, base · 2^(k-1)) · U(0.5, 1)`` ("equal jitter"), unless the failed
    response carried ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date): then we sleep that long
    (plus up to 10 % jitter, never less), capped at ``backoff_cap_s``. When attempts run out:
    :class:`LLMUnavailable`. Not retried: 400, 401, 403, 404, 422 and other 4xx → :class:`LLMConfigError`
    (an :class:`~autoexplain.tools.errors.InputError`: one readable line, the CLI exits 2). Caveat: a 400 for
    a context that is too long is also an LLMConfigError (its ``code`` is then ``"context_length_exceeded"`` on
    OpenAI): the caller decides whether to shorten the history. A rejection of the request's *shape* (the
    response format, the tools) is not an error but a step down (below), whatever its status code: servers
    answer 400, 422 or 500 for it.

Adapting to the endpoint (:class:`EndpointProfile`, one per base URL and model, shared by the run)
    Structured output steps down a ladder on any rejection that names the response format (``response_format``,
    ``json_schema``, ``json_object`` …, any status): ``strict`` (``response_format`` json_schema, strict) →
    ``json`` (``{"type": "json_object", "schema": …}``: JSON mode plus the schema, which llama-cpp-python
    turns into a grammar and servers without the extension ignore; the schema is in the system prompt too) →
    ``json_bare`` (``{"type": "json_object"}``, schema in the prompt) → ``plain`` (schema in the prompt only).
    A rejection naming ``json_object`` skips the JSON-mode steps at once. Tool calling is ``native`` (the
    ``tools`` parameter) until a rejection names the tools (Ollama: "… does not support tools"; vLLM without
    ``--enable-auto-tool-choice``: '"auto" tool choice requires …'); then ``json``: the tools are described in
    the system prompt, the reply is a JSON object ``{"tool_calls": [{"name", "arguments"}], "content"}``
    constrained by a schema (in the structured mode in use, ``json`` at best: tool parameter schemas are not
    strict-compatible), the history is sent as plain turns (tool results as user messages), and the calls come
    back as ordinary :class:`ToolCallRequest` s (ids derived from the request hash, so a resumed run replays
    them). Each step down is remembered in the profile for the rest of the run (every client sharing the
    :class:`Adaptations` — the policy's and the judge's — skips the rejected modes), and each rejected attempt
    is in ``on_call`` (``ok=False``, its status code) so ``llm_calls`` shows why. ``structured_mode`` /
    ``tools_mode`` other than ``auto`` pin a mode: a rejection is then an :class:`LLMConfigError`.

Structured output
    The reply's content is validated with ``schema.model_validate_json`` (code fences and prose around one JSON
    object are tolerated). An invalid reply (not JSON, wrong shape, cut off by the token limit) is answered with
    the reply and a user message "your reply was not valid: …" and asked again, up to ``max_repairs`` times; then
    :class:`LLMBadOutput`. A refusal or a content-filter stop is an immediate LLMBadOutput. The returned
    :class:`Usage` sums every round of the call. A new process starts at the top of the ladder again (one
    rejected request per process on a server without strict support); pin ``structured_mode="json"`` to avoid it.

Response cache (crash-resume)
    ``cache`` is any object with ``get(key) -> dict | None`` and ``put(key, value: dict)`` (:class:`DictCache` for
    tests; the agent backs it with DuckDB). The key is :func:`request_hash` of the exact request (model, messages,
    tools, response format and sampling parameters). A hit returns the stored completion without any HTTP request;
    every successful HTTP response is stored (its raw JSON body, from which :class:`AssistantTurn` or the parsed
    object are rebuilt) — replies that later fail validation included, so a resumed run replays the same repair
    conversation. Same messages → same key → no repeated call. On a hit the ``on_call`` record has
    ``cached=True`` and 0 tokens (nothing was spent now), while the returned usage is the *original* usage, so
    token budgets replay exactly as in an uninterrupted run. Caveat: with temperature > 0 a cache makes a rerun
    deterministic, which is what resume wants but not what a fresh sample wants (use a fresh cache).

Accounting
    ``on_call(record)`` is called once per HTTP attempt (success or failure) and once per cache hit with a JSON-able
    dict (see :func:`LLMClient._record` for the keys). Exceptions raised by ``on_call`` propagate (a broken store
    is a bug, not a flaky endpoint).

Secrets
    The API key lives in a ``SecretStr``: not in ``repr``/``str`` of the config, not in :meth:`LLMConfig.public`,
    and :func:`redact` removes it — and any fragment of it: a prefix or suffix, a masked echo such as OpenAI's
    "Incorrect API key provided: sk-proj-abcd****wxyz" — and any ``Bearer …`` token from every recorded error and
    every exception message this module raises. The original ``openai`` exception stays reachable as ``__context__`` for
    debugging; its text comes from the server and is *not* redacted there.

An :class:`LLMClient` keeps mutable state (its endpoint profile) and is not meant to be shared between threads.
Nothing is created at import.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import hashlib
import json
import os
import random
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, Self, TypeVar
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from autoexplain.tools.errors import InputError

T = TypeVar("T", bound=BaseModel)
StructuredMode = Literal["strict", "json", "json_bare", "plain"]
ToolsMode = Literal["native", "json"]
#: The structured-output ladder, best first (see "Adapting to the endpoint").
LADDER: tuple[StructuredMode, ...] = ("strict", "json", "json_bare", "plain")
_JSON_OBJECT_MODES = frozenset({"json", "json_bare"})
_MAX_ERROR_CHARS = 2000


# ============================================================================= errors
class LLMConfigError(InputError):
    """The endpoint refused the request for a reason retrying cannot fix (bad key, no access, unknown model,
    bad request). One readable line; ``status_code`` and ``code`` (the API's error code) are kept."""

    def __init__(self, message: str, *, status_code: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status_code, self.code = status_code, code


class LLMUnavailable(Exception):
    """Every attempt failed with a transient error. ``last_error`` is the redacted ``"Type: message"`` of the last
    attempt, ``error_type`` its exception type name, ``status_code`` its HTTP status (None for network errors)."""

    def __init__(self, message: str, *, last_error: str, error_type: str, attempts: int,
                 status_code: int | None = None) -> None:
        super().__init__(message)
        self.last_error, self.error_type = last_error, error_type
        self.attempts, self.status_code = attempts, status_code


class LLMBadOutput(Exception):
    """A structured reply could not be used: invalid after every repair round, or refused. ``last_error`` says
    why, ``content`` is the last reply's text (truncated), ``rounds`` how many replies were tried."""

    def __init__(self, message: str, *, last_error: str, content: str | None, rounds: int) -> None:
        super().__init__(message)
        self.last_error, self.content, self.rounds = last_error, content, rounds


class _BadResponse(Exception):
    """A 200 response that is not a chat completion (transient: retried)."""


class _FormatRejected(Exception):
    """The server rejected the request's shape: the structured-output mode (``what="format"``; ``no_json_object``:
    the rejection names JSON mode itself) or the tools (``what="tools"``), whatever the status code."""

    def __init__(self, message: str, status_code: int | None, code: str | None, *, what: str = "format",
                 no_json_object: bool = False) -> None:
        super().__init__(message)
        self.status_code, self.code = status_code, code
        self.what, self.no_json_object = what, no_json_object


class _Invalid(Exception):
    """A structured reply that does not validate (answered with a repair round)."""


# ============================================================================= redaction
_BEARER = re.compile(r"(?i)\b(bearer\s+)[^\s'\",]+")
#: A "word" that may carry a key or a fragment of one: key characters plus the characters servers mask keys with.
_WORD = re.compile(r"[\w\-.*…+/=~]+")
_MASK = re.compile(r"\*|…|\.\.\.|x{4,}|X{4,}")
#: Fragment rules apply to secrets at least this long (API keys); shorter ones (a URL password) only whole.
_FRAGMENT_MIN_SECRET = 12
_PREFIX, _INNER, _SUFFIX = 6, 8, 4


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _is_fragment(word: str, secret: str) -> bool:
    """Whether ``word`` shows part of ``secret``: it starts like it (≥ 6 characters), holds 8 consecutive
    characters of it anywhere, or is a masked echo (``*``, ``…``, ``...``, ``xxxx``) ending like it (≥ 4)."""
    core = word.rstrip(".,;:!?)]}'\"")
    if _common_prefix(core, secret) >= _PREFIX:
        return True
    if any(core[i:i + _INNER] in secret for i in range(len(core) - _INNER + 1)):
        return True
    masked = _MASK.search(core) is not None
    return masked and _common_prefix(core[::-1], secret[::-1]) >= _SUFFIX


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """``text`` with every secret (4 characters or more; shorter ones would mangle ordinary text), every fragment
    of a long secret (an API key: its prefix, 8 characters of it, a masked echo such as ``sk-ab…wxyz`` or
    ``sk-abcd****wxyz``; the whole word carrying it goes) and every ``Bearer <token>`` replaced by
    ``[REDACTED]``."""
    keep = sorted((s for s in secrets if s and len(s) >= 4), key=len, reverse=True)
    for secret in keep:
        text = text.replace(secret, "[REDACTED]")
    long_ = [s for s in keep if len(s) >= _FRAGMENT_MIN_SECRET]
    if long_:
        text = _WORD.sub(lambda m: "[REDACTED]" if any(_is_fragment(m.group(0), s) for s in long_)
                         else m.group(0), text)
    return _BEARER.sub(r"\1[REDACTED]", text)


def _strip_userinfo(url: str | None) -> str | None:
    """``url`` without ``user:password@`` (credentials in a base URL must not reach logs either)."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


# ============================================================================= config
def _env_key() -> SecretStr | None:
    key = os.environ.get("OPENAI_API_KEY")
    return SecretStr(key) if key else None


_MISSING_KEY = ("no API key for the LLM endpoint: set OPENAI_API_KEY (and OPENAI_BASE_URL for an endpoint other "
                "than api.openai.com), or use the offline policy")


class LLMSettings(BaseModel):
    """The LLM settings a plan (``llm:``) or the CLI (``--llm-max-tokens``, ``--llm-timeout``) may set; None keeps
    :class:`LLMConfig`'s default. Part of a plan's identity only when set (a different cap, a different run)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_tokens: int | None = Field(None, gt=0, description="completion tokens per LLM call (sent as max_tokens)")
    timeout_s: float | None = Field(None, gt=0, description="seconds per HTTP attempt (default: fits max_tokens)")
    max_retries: int | None = Field(None, ge=0, description="retries of a failed attempt (429, 5xx, network)")
    max_timeout_retries: int | None = Field(None, ge=0, description="of those, retries after a timeout")
    temperature: float | None = Field(None, ge=0)
    structured_mode: Literal["auto", "strict", "json", "json_bare", "plain"] | None = None
    tools_mode: Literal["auto", "native", "json"] | None = None

    def overrides(self) -> dict[str, Any]:
        """The settings that were given, as :class:`LLMConfig` keyword arguments."""
        return self.model_dump(exclude_none=True)


class LLMConfig(BaseModel):
    """How to reach the endpoint and how hard to try. ``repr``/``str`` never show the key; store :meth:`public`.

    ``temperature=None`` omits the parameter (some reasoning models reject any value but the default).
    ``max_tokens`` is sent with every request; ``timeout_s=None`` derives the timeout from it
    (:attr:`timeout`). ``max_repairs``: repair rounds of :meth:`LLMClient.structured`. ``structured_mode`` and
    ``tools_mode``: ``auto`` starts at the best mode and steps down on rejection (see the module docstring).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(min_length=1)
    base_url: str | None = Field(default_factory=lambda: os.environ.get("OPENAI_BASE_URL") or None)
    api_key: SecretStr | None = Field(default_factory=_env_key, repr=False)
    timeout_s: float | None = Field(None, gt=0)
    max_retries: int = Field(4, ge=0)
    max_timeout_retries: int = Field(1, ge=0)
    backoff_base_s: float = Field(1.0, ge=0)
    backoff_cap_s: float = Field(30.0, ge=0)
    temperature: float | None = 0.0
    max_tokens: int = Field(1024, gt=0)
    max_repairs: int = Field(2, ge=0)
    structured_mode: Literal["auto", "strict", "json", "json_bare", "plain"] = "auto"
    tools_mode: Literal["auto", "native", "json"] = "auto"

    @property
    def timeout(self) -> float:
        """Seconds per HTTP attempt: ``timeout_s``, or 20 s plus 0.1 s per token of ``max_tokens`` (a server
        generating 10 tokens/s still finishes a full-length reply)."""
        return self.timeout_s if self.timeout_s is not None else 20.0 + 0.1 * self.max_tokens

    @property
    def endpoint(self) -> tuple[str, str]:
        """(base URL without credentials, model): what an :class:`EndpointProfile` is remembered by."""
        return (_strip_userinfo(self.base_url) or "https://api.openai.com/v1", self.model)

    @classmethod
    def from_env(cls, model: str, **overrides: Any) -> LLMConfig:
        """A config for ``model`` with the key from ``OPENAI_API_KEY`` and the URL from ``OPENAI_BASE_URL``
        (``overrides`` win). A missing key is an :class:`InputError` saying to set OPENAI_API_KEY."""
        if overrides.get("api_key") is None:
            overrides.pop("api_key", None)
            if _env_key() is None:
                raise InputError(_MISSING_KEY)
        return cls(model=model, **overrides)

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            yield name, _strip_userinfo(value) if name == "base_url" else value

    def public(self) -> dict[str, Any]:
        """Every setting except the key (``api_key_set`` says whether one is present); safe to store and print."""
        data = self.model_dump(mode="json", exclude={"api_key"})
        data["base_url"] = _strip_userinfo(self.base_url)
        data["api_key_set"] = self.api_key is not None
        return data

    def secrets(self) -> list[str]:
        """What :func:`redact` must remove: the key and any password in the base URL."""
        out = [self.api_key.get_secret_value()] if self.api_key is not None else []
        if self.base_url and urlsplit(self.base_url).password:
            out.append(urlsplit(self.base_url).password or "")
        return out


# ============================================================================= results
class Usage(BaseModel):
    """Tokens of one call (or the sum of several: ``a + b``)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens + other.prompt_tokens,
                     completion_tokens=self.completion_tokens + other.completion_tokens)

    @classmethod
    def from_completion(cls, data: dict[str, Any]) -> Usage:
        usage = data.get("usage") or {}
        return cls(prompt_tokens=int(usage.get("prompt_tokens") or 0),
                   completion_tokens=int(usage.get("completion_tokens") or 0))


class ToolCallRequest(BaseModel):
    """One tool call as the model wrote it. ``arguments`` is the raw string (may be malformed JSON)."""

    id: str
    name: str
    arguments: str


class AssistantTurn(BaseModel):
    """The assistant's reply to :meth:`LLMClient.chat_tools`.

    ``usage`` is the completion's usage, also on a cache hit (``cached=True``; see the module docstring).
    ``request_hash`` is the cache key of the request that produced it.
    """

    content: str | None = None
    tool_calls: list[ToolCallRequest] = Field(default_factory=list)
    refusal: str | None = None
    finish_reason: str | None = None
    usage: Usage = Field(default_factory=Usage)
    cached: bool = False
    request_hash: str = ""

    def as_message(self) -> dict[str, Any]:
        """The assistant message to append to the history (JSON-able; tool call ids are the ones the tool
        messages must answer with ``tool_call_id``). ``content`` is ``""`` rather than null, also next to tool
        calls: llama-cpp-python answers HTTP 500 to a null content."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content or ""}
        if self.tool_calls:
            msg["tool_calls"] = [{"id": tc.id, "type": "function",
                                  "function": {"name": tc.name, "arguments": tc.arguments}}
                                 for tc in self.tool_calls]
        return msg

    @classmethod
    def from_completion(cls, data: dict[str, Any], *, cached: bool = False, request_hash: str = "") -> AssistantTurn:
        """Rebuild a turn from a raw chat.completion dict (what the cache stores)."""
        choice = data["choices"][0]
        message = choice["message"]
        calls = []
        for i, tc in enumerate(message.get("tool_calls") or []):
            fn = tc.get("function") or {}
            args = fn.get("arguments")
            args = "" if args is None else args if isinstance(args, str) else json.dumps(args)
            calls.append(ToolCallRequest(id=tc.get("id") or f"call_{i}", name=fn.get("name") or "", arguments=args))
        return cls(content=message.get("content"), tool_calls=calls, refusal=message.get("refusal"),
                   finish_reason=choice.get("finish_reason"), usage=Usage.from_completion(data), cached=cached,
                   request_hash=request_hash)


# ============================================================================= cache
class ResponseCache(Protocol):
    """What :class:`LLMClient` needs of a response cache."""

    def get(self, key: str) -> dict[str, Any] | None: ...

    def put(self, key: str, value: dict[str, Any]) -> None: ...


class DictCache:
    """An in-memory :class:`ResponseCache` (tests). Values are copied in and out via JSON, like a real store."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}

    def get(self, key: str) -> dict[str, Any] | None:
        raw = self.data.get(key)
        return None if raw is None else json.loads(raw)

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.data[key] = json.dumps(value)

    def __len__(self) -> int:
        return len(self.data)


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace, UTF-8 kept: the form :func:`request_hash` hashes. Raises TypeError for values
    that are not JSON (pass plain dicts, e.g. ``AssistantTurn.as_message()``)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def request_hash(model: str, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None,
                 response_format: dict[str, Any] | None = None, params: dict[str, Any] | None = None) -> str:
    """sha256 hex of the canonical JSON of the request: the response-cache key. ``params`` holds the sampling
    parameters and ``tool_choice`` that were sent (None values dropped)."""
    payload = {"model": model, "messages": messages, "tools": tools or None, "response_format": response_format,
               "params": {k: v for k, v in (params or {}).items() if v is not None}}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


# ============================================================================= structured helpers
SCHEMA_PROMPT = ("Reply with one JSON object only — no prose, no code fences — that matches this JSON schema:\n"
                 "{schema}")
REPAIR_PROMPT = "Your reply was not valid: {error}. Reply again with only a JSON object that matches the schema."


def schema_json(schema: type[BaseModel]) -> str:
    return json.dumps(schema.model_json_schema(), sort_keys=True, separators=(",", ":"))


def with_schema_prompt(messages: list[dict[str, Any]], schema: type[BaseModel],
                       json_schema: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """``messages`` with the schema instruction (``json_schema``, default ``schema``'s own) appended to a leading
    system message (or a new one first)."""
    shown = schema_json(schema) if json_schema is None else json.dumps(json_schema, sort_keys=True,
                                                                       separators=(",", ":"))
    prompt = SCHEMA_PROMPT.format(schema=shown)
    if messages and messages[0].get("role") in ("system", "developer") and isinstance(messages[0].get("content"), str):
        first = {**messages[0], "content": f"{messages[0]['content']}\n\n{prompt}"}
        return [first, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


def wire_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` as sent: an assistant turn's null content becomes ``""`` (histories checkpointed by an older
    version may hold null)."""
    return [{**m, "content": ""} if m.get("role") == "assistant" and m.get("content") is None else m
            for m in messages]


# ----------------------------------------------------------------------------- tool calls as JSON
TOOLS_PROMPT = ("You can call these tools. To call tools, reply with one JSON object only: "
                '{{"tool_calls": [{{"name": TOOL, "arguments": {{...}}}}, ...], "content": "what you are doing"}}. '
                'When you need no tool, reply {{"tool_calls": [], "content": "your answer"}}. Tools (name: '
                "description; JSON schema of the arguments):\n{tools}")
TOOL_RESULT = "Result of tool call {id} ({name}):\n{content}"


class JsonToolCall(BaseModel):
    """One tool call written as JSON (the fallback for servers without native tool calling)."""

    name: str
    arguments: dict[str, Any] | str = Field(default_factory=dict)


class JsonToolTurn(BaseModel):
    """An assistant turn written as JSON: the tool calls to make (none: the model is done) and its text."""

    tool_calls: list[JsonToolCall] = Field(default_factory=list)
    content: str = ""


def tool_turn_schema(tools: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON schema of a :class:`JsonToolTurn` whose calls are one of ``tools`` (name fixed by ``enum``,
    arguments by the tool's parameter schema): what a grammar-constrained server can hold the model to."""
    calls = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                                               "arguments": t["function"].get("parameters") or {"type": "object"}},
              "required": ["name", "arguments"]} for t in tools]
    item: dict[str, Any] = {"anyOf": calls} if calls else {"type": "object"}
    return {"title": "JsonToolTurn", "type": "object",
            "properties": {"tool_calls": {"type": "array", "items": item}, "content": {"type": "string"}},
            "required": ["tool_calls", "content"]}


def json_tools_history(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` for a server without native tool calling: the tools described in the system message,
    assistant tool calls written as their JSON turn, tool results as user messages naming the call."""
    listing = "\n".join(f"- {t['function']['name']}: {t['function'].get('description', '')}; "
                        f"{json.dumps(t['function'].get('parameters') or {}, sort_keys=True)}" for t in tools)
    names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for m in messages:
        role = m.get("role")
        if role == "assistant" and m.get("tool_calls"):
            calls = []
            for tc in m["tool_calls"]:
                fn = tc.get("function") or {}
                names[tc.get("id", "")] = fn.get("name", "")
                try:
                    args: Any = json.loads(fn.get("arguments") or "{}")
                except ValueError:
                    args = fn.get("arguments") or ""
                calls.append({"name": fn.get("name", ""), "arguments": args})
            out.append({"role": "assistant", "content": json.dumps({"tool_calls": calls,
                                                                    "content": m.get("content") or ""})})
        elif role == "tool":
            cid = m.get("tool_call_id", "")
            out.append({"role": "user", "content": TOOL_RESULT.format(id=cid, name=names.get(cid, "?"),
                                                                      content=m.get("content") or "")})
        else:
            out.append(m)
    prompt = TOOLS_PROMPT.format(tools=listing)
    if out and out[0].get("role") in ("system", "developer") and isinstance(out[0].get("content"), str):
        return [{**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}, *out[1:]]
    return [{"role": "system", "content": prompt}, *out]


def _json_candidates(content: str) -> list[str]:
    """The content as sent, then without code fences, then its outermost ``{...}`` (tolerated model habits)."""
    out = [content]
    fenced = re.fullmatch(r"\s*```(?:json)?\s*(.*?)\s*```\s*", content, re.DOTALL)
    if fenced:
        out.append(fenced.group(1))
    start, end = content.find("{"), content.rfind("}")
    if 0 <= start < end:
        out.append(content[start:end + 1])
    return list(dict.fromkeys(out))


def _summarise(exc: ValidationError) -> str:
    errs = exc.errors(include_url=False)
    parts = [f"{'.'.join(str(p) for p in e['loc']) or 'reply'}: {e['msg']}" for e in errs[:3]]
    more = f" (and {len(errs) - 3} more errors)" if len(errs) > 3 else ""
    return "; ".join(parts) + more


def validate_reply(content: str | None, schema: type[T], finish_reason: str | None = None) -> T:
    """``schema`` validated from a reply's content; :class:`_Invalid` with a short reason otherwise."""
    if content is None or not content.strip():
        raise _Invalid("the reply was empty")
    first: ValidationError | None = None
    for candidate in _json_candidates(content):
        try:
            return schema.model_validate_json(candidate)
        except ValidationError as exc:
            first = first or exc
    assert first is not None
    reason = _summarise(first)
    if finish_reason == "length":
        reason = f"the reply was cut off by the token limit ({reason}); be shorter"
    raise _Invalid(reason)


def _completion_dict(text: str) -> dict[str, Any]:
    """The JSON body of a 200 response, checked to be a chat completion (else :class:`_BadResponse`)."""
    try:
        data = json.loads(text)
    except ValueError:
        raise _BadResponse(f"the endpoint answered 200 with a body that is not JSON: {text[:200]!r}") from None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        raise _BadResponse(f"the endpoint answered 200 with an error: {str(data['error'].get('message'))[:300]}")
    choices = data.get("choices") if isinstance(data, dict) else None
    if (not choices or not isinstance(choices, list) or not isinstance(choices[0], dict)
            or not isinstance(choices[0].get("message"), dict)):
        raise _BadResponse(f"the endpoint answered 200 with something that is not a chat completion: "
                           f"{text[:200]!r}")
    return data


def _is_completion(data: Any) -> bool:
    try:
        _completion_dict(json.dumps(data))
    except (_BadResponse, TypeError, ValueError, AttributeError):
        return False
    return True


def _is_timeout(exc: BaseException) -> bool:
    import openai

    return isinstance(exc, openai.APITimeoutError)


def _retry_after_s(headers: Any) -> float | None:
    """Seconds from ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date); None if absent/unreadable."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) * scale)
        except ValueError:
            pass
    value = headers.get("retry-after")
    try:
        when = email.utils.parsedate_to_datetime(value) if value else None
    except (TypeError, ValueError):
        return None
    return None if when is None else max(0.0, when.timestamp() - time.time())


def _error_text(exc: Any) -> str:
    return f"{getattr(exc, 'message', '')} {getattr(exc, 'body', '')}".lower()


def _format_rejection(exc: Any, status: int | None) -> bool:
    """Whether an error response is about the response format (structured output not supported as sent). Any
    status: llama-cpp-python answers 500 to ``json_schema``. For a 5xx only the parameter's own names count."""
    text = _error_text(exc)
    words: tuple[str, ...] = ("response_format", "json_schema", "json_object", "guided_json", "response format")
    if status is None or status < 500:
        words += ("structured output", "strict")
    return getattr(exc, "param", None) == "response_format" or any(w in text for w in words)


def _tools_rejection(exc: Any) -> bool:
    """Whether an error response refuses native tool calling (Ollama: "… does not support tools"; vLLM without a
    tool parser: '"auto" tool choice requires --enable-auto-tool-choice …'; others naming tool_choice/tools)."""
    text = _error_text(exc)
    return (getattr(exc, "param", None) in ("tools", "tool_choice")
            or any(w in text for w in ("does not support tools", "tool choice", "tool_choice", "tool-call-parser",
                                       "tool calling", "tools are not supported", "function calling")))


# ============================================================================= endpoint profiles
@dataclass
class EndpointProfile:
    """What a run learned about one endpoint and model: the structured-output mode and the tool-calling mode
    that work, and why each step down happened (``steps``: ``"strict -> json: HTTP 500: …"``)."""

    structured: StructuredMode = "strict"
    tools: ToolsMode = "native"
    steps: list[str] = field(default_factory=list)


class Adaptations:
    """The :class:`EndpointProfile` of each (base URL, model) a run talks to. One per run, shared by every
    client of the run (the policy's and the judge's), so a mode rejected once is never tried again."""

    def __init__(self) -> None:
        self._profiles: dict[tuple[str, str], EndpointProfile] = {}

    def profile(self, config: LLMConfig) -> EndpointProfile:
        key = config.endpoint
        if key not in self._profiles:
            structured: StructuredMode = "strict" if config.structured_mode == "auto" else config.structured_mode
            tools: ToolsMode = "native" if config.tools_mode == "auto" else config.tools_mode
            self._profiles[key] = EndpointProfile(structured=structured, tools=tools)
        return self._profiles[key]


# ============================================================================= client
class LLMClient:
    """A chat endpoint with our retries, endpoint adaptation, response cache and per-attempt records.

    ``on_call(record)``: called per HTTP attempt and per cache hit (see :meth:`_record`). ``cache``: a
    :class:`ResponseCache` or None. ``adaptations``: the run's :class:`Adaptations` (default: the client's own).
    ``sleep`` and ``rng`` are injectable for tests; ``openai_client`` replaces the ``openai.OpenAI`` built from
    the config (it should have ``max_retries=0``).
    """

    def __init__(self, config: LLMConfig, *, on_call: Callable[[dict[str, Any]], Any] | None = None,
                 cache: ResponseCache | None = None, sleep: Callable[[float], Any] = time.sleep,
                 rng: random.Random | None = None, openai_client: Any = None,
                 adaptations: Adaptations | None = None) -> None:
        if config.api_key is None and openai_client is None:
            raise InputError(_MISSING_KEY)
        self.config, self.on_call, self.cache = config, on_call, cache
        self._sleep, self._rng = sleep, rng or random.Random()
        self._secrets = config.secrets()
        self.adaptations = adaptations or Adaptations()
        self.profile = self.adaptations.profile(config)
        if openai_client is None:
            import openai

            assert config.api_key is not None
            openai_client = openai.OpenAI(api_key=config.api_key.get_secret_value(), base_url=config.base_url,
                                          timeout=config.timeout, max_retries=0)
        self._openai = openai_client

    def __repr__(self) -> str:
        return (f"LLMClient(model={self.config.model!r}, base_url={_strip_userinfo(self.config.base_url)!r}, "
                f"structured_mode={self.profile.structured!r}, tools_mode={self.profile.tools!r})")

    @property
    def structured_mode(self) -> StructuredMode:
        """The structured-output mode in use now (it only ever steps down the :data:`LADDER`)."""
        return self.profile.structured

    @property
    def tools_mode(self) -> ToolsMode:
        """How tools are offered now: ``native`` or ``json`` (tool calls written as JSON in the reply)."""
        return self.profile.tools

    def close(self) -> None:
        self._openai.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ public calls
    def chat_tools(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], *, purpose: str,
                   tool_choice: str | dict[str, Any] | None = None) -> AssistantTurn:
        """One assistant turn with tool calling. ``tools``: ``ToolSpec.openai_schema()`` dicts (an empty list sends
        none). ``tool_choice`` defaults to ``"auto"`` when tools are offered (sent explicitly: llama-cpp-python
        reads a missing one as "none"). Tool arguments come back as raw strings, unvalidated. On an endpoint
        without native tool calling (see the module docstring) the turn is asked for as JSON."""
        messages = wire_messages(messages)
        while tools and self.profile.tools == "native":
            kwargs: dict[str, Any] = {"messages": messages, "tools": tools, "tool_choice": tool_choice or "auto"}
            try:
                data, cached, key = self._complete(kwargs, purpose=purpose, mode="tools", response_format=None)
            except _FormatRejected as exc:
                if self.config.tools_mode != "auto":
                    raise LLMConfigError(f"the LLM endpoint rejected native tool calling ({exc}); use "
                                         "tools_mode='auto' or 'json'", status_code=exc.status_code,
                                         code=exc.code) from None
                self.profile.tools = "json"  # remembered for the run
                self.profile.steps.append(f"tools native -> json: {exc}")
                continue
            return AssistantTurn.from_completion(data, cached=cached, request_hash=key)
        if tools:
            return self._json_tool_turn(messages, tools, purpose)
        data, cached, key = self._complete({"messages": messages}, purpose=purpose, mode="tools",
                                           response_format=None)
        return AssistantTurn.from_completion(data, cached=cached, request_hash=key)

    def structured(self, messages: list[dict[str, Any]], schema: type[T], *, purpose: str,
                   repairs: int | None = None) -> tuple[T, Usage]:
        """A ``schema`` instance from the model and the usage summed over every round (see the module docstring).

        Raises :class:`LLMBadOutput` (invalid after ``repairs`` repair rounds, default ``config.max_repairs``;
        or a refusal), :class:`LLMUnavailable`, :class:`LLMConfigError`."""
        obj, usage, _ = self._structured(wire_messages(messages), schema, purpose=purpose, repairs=repairs)
        return obj, usage

    # ------------------------------------------------------------------ tool calls as JSON
    def _json_tool_turn(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                        purpose: str) -> AssistantTurn:
        """A tool-calling turn from a server without native tool calling: the reply is a schema-constrained
        :class:`JsonToolTurn`, turned back into tool calls (ids from the request hash: stable on resume)."""
        history = json_tools_history(messages, tools)
        try:
            turn, usage, key = self._structured(history, JsonToolTurn, purpose=purpose, repairs=None,
                                                json_schema=tool_turn_schema(tools), tools_json=True)
        except LLMBadOutput as exc:  # the model could not write a tool turn: an empty turn, the error as its text
            return AssistantTurn(content=f"(no valid tool-call JSON: {exc.last_error})", finish_reason="stop")
        calls = [ToolCallRequest(id=f"call_{key[:12]}_{i}", name=c.name,
                                 arguments=c.arguments if isinstance(c.arguments, str) else json.dumps(c.arguments))
                 for i, c in enumerate(turn.tool_calls)]
        return AssistantTurn(content=turn.content, tool_calls=calls, usage=usage, request_hash=key,
                             finish_reason="tool_calls" if calls else "stop")

    # ------------------------------------------------------------------ structured modes
    def _structured(self, messages: list[dict[str, Any]], schema: type[T], *, purpose: str, repairs: int | None,
                    json_schema: dict[str, Any] | None = None, tools_json: bool = False) -> tuple[T, Usage, str]:
        """(object, usage over every round, request hash of the last round): the repair loop."""
        repairs = self.config.max_repairs if repairs is None else repairs
        history, total = list(messages), Usage()
        error, content = "", None
        for round_ in range(1, repairs + 2):
            data, key = self._structured_once(history, schema, purpose, json_schema, tools_json)
            choice, total = data["choices"][0], total + Usage.from_completion(data)
            message, finish = choice["message"], choice.get("finish_reason")
            content = message.get("content")
            if message.get("refusal") or finish == "content_filter":
                why = message.get("refusal") or "the reply was stopped by the content filter"
                raise LLMBadOutput(self._clean(f"the model refused ({purpose}): {why}"),
                                   last_error=self._clean(f"refusal: {why}"), content=None, rounds=round_)
            try:
                return validate_reply(content, schema, finish), total, key
            except _Invalid as exc:
                error = self._clean(str(exc))[:1000]
            history += [{"role": "assistant", "content": content or ""},
                        {"role": "user", "content": REPAIR_PROMPT.format(error=error)}]
        raise LLMBadOutput(self._clean(f"no valid {schema.__name__} from the model after {repairs + 1} replies "
                                       f"({purpose}): {error}"),
                           last_error=error, content=None if content is None else self._clean(content)[:2000],
                           rounds=repairs + 1)

    def _structured_once(self, history: list[dict[str, Any]], schema: type[BaseModel], purpose: str,
                         json_schema: dict[str, Any] | None, tools_json: bool) -> tuple[dict[str, Any], str]:
        """One completion in the current mode, stepping down the ladder on a format rejection. ``json_schema``:
        the schema to send instead of ``schema``'s own (tool turns); ``tools_json`` never uses strict mode."""
        while True:
            mode = self.profile.structured
            if tools_json and mode == "strict":
                mode = "json"
            sent_schema = json_schema or schema.model_json_schema()
            label = f"tools-{mode}" if tools_json else mode
            try:
                if mode == "strict":
                    fmt = {"type": "json_schema", "json_schema": {"name": schema.__name__, "strict": True,
                                                                  "schema": sent_schema}}
                    data, _, key = self._complete({"messages": history}, purpose=purpose, mode=label,
                                                  response_format=fmt, parse_schema=schema)
                    return data, key
                kwargs: dict[str, Any] = {"messages": with_schema_prompt(history, schema, sent_schema)}
                fmt2: dict[str, Any] | None = ({"type": "json_object", "schema": sent_schema} if mode == "json"
                                               else {"type": "json_object"} if mode == "json_bare" else None)
                if fmt2 is not None:
                    kwargs["response_format"] = fmt2
                data, _, key = self._complete(kwargs, purpose=purpose, mode=label, response_format=fmt2)
                return data, key
            except _FormatRejected as exc:
                nxt = self._next_mode(mode, exc)
                if nxt is None or self.config.structured_mode != "auto":
                    raise LLMConfigError(
                        f"the LLM endpoint rejected structured output in {mode!r} mode ({exc}); "
                        "use structured_mode='auto' or a mode it supports", status_code=exc.status_code,
                        code=exc.code) from None
                self.profile.steps.append(f"{mode} -> {nxt}: {exc}")
                self.profile.structured = nxt  # remembered for the rest of the run, by every client sharing it

    @staticmethod
    def _next_mode(mode: StructuredMode, exc: _FormatRejected) -> StructuredMode | None:
        """The next rung below ``mode``, skipping the JSON-mode rungs when the rejection names JSON mode."""
        for nxt in LADDER[LADDER.index(mode) + 1:]:
            if exc.no_json_object and nxt in _JSON_OBJECT_MODES:
                continue
            return nxt
        return None

    # ------------------------------------------------------------------ one request, with retries and cache
    def _params(self) -> dict[str, Any]:
        cfg = self.config
        return {k: v for k, v in (("temperature", cfg.temperature), ("max_tokens", cfg.max_tokens))
                if v is not None}

    def _complete(self, kwargs: dict[str, Any], *, purpose: str, mode: str, response_format: dict[str, Any] | None,
                  parse_schema: type[BaseModel] | None = None) -> tuple[dict[str, Any], bool, str]:
        """(completion dict, cached, request hash) for one logical request: cache, then up to 1+max_retries
        attempts (of which at most 1+max_timeout_retries may time out). ``response_format`` is what the hash
        records (for strict mode: the schema we asked for)."""
        params = {**self._params(), "tool_choice": kwargs.get("tool_choice")}
        key = request_hash(self.config.model, kwargs["messages"], tools=kwargs.get("tools"),
                           response_format=response_format, params=params)
        base = {"purpose": purpose, "mode": mode, "request_hash": key}
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None and _is_completion(hit):  # anything else stored under the key is ignored
                finish = (hit.get("choices") or [{}])[0].get("finish_reason")
                self._record(base, attempt=0, ok=True, cached=True, duration_s=0.0, finish_reason=finish)
                return hit, True, key
        attempts = self.config.max_retries + 1
        timeouts = 0
        for attempt in range(1, attempts + 1):
            started = time.monotonic()
            try:
                data = self._post(kwargs, parse_schema)
            except Exception as exc:
                timeouts += _is_timeout(exc)
                last = attempt == attempts or timeouts > self.config.max_timeout_retries
                self._failed(exc, base, attempt, attempts, time.monotonic() - started, last=last)
                continue
            usage = Usage.from_completion(data)
            self._record(base, attempt=attempt, ok=True, duration_s=time.monotonic() - started, usage=usage,
                         finish_reason=data["choices"][0].get("finish_reason"), status_code=200)
            if self.cache is not None:
                self.cache.put(key, data)
            return data, False, key
        raise AssertionError("unreachable: the last failed attempt raises")  # pragma: no cover

    def _post(self, kwargs: dict[str, Any], parse_schema: type[BaseModel] | None) -> dict[str, Any]:
        """One HTTP attempt; the raw JSON body of the 200 response."""
        raw_api = self._openai.chat.completions.with_raw_response
        args = {"model": self.config.model, **self._params(), **kwargs}
        if parse_schema is not None:
            raw = raw_api.parse(response_format=parse_schema, **args)
        else:
            raw = raw_api.create(**args)
        return _completion_dict(raw.text)

    def _failed(self, exc: Exception, base: dict[str, Any], attempt: int, attempts: int, duration_s: float, *,
                last: bool) -> None:
        """Record a failed attempt, then sleep (transient, not ``last``) or raise the right error: a rejection
        of the request's shape (response format, tools) is a :class:`_FormatRejected` whatever its status."""
        import openai

        status = getattr(exc, "status_code", None)
        error_type = type(exc).__name__ if not isinstance(exc, _BadResponse) else "BadResponse"
        error = self._clean(f"{error_type}: {exc}")[:_MAX_ERROR_CHARS]
        rejected = None
        if isinstance(exc, openai.APIStatusError) and status not in (401, 403, 404, 429):
            text = _error_text(exc)
            if base["mode"] != "tools" and _format_rejection(exc, status):
                rejected = _FormatRejected(f"HTTP {status}: {self._clean(str(getattr(exc, 'message', exc)))[:300]}",
                                           status, getattr(exc, "code", None),
                                           no_json_object="json_object" in text and "json_schema" not in text)
            elif base["mode"] == "tools" and _tools_rejection(exc):
                rejected = _FormatRejected(f"HTTP {status}: {self._clean(str(getattr(exc, 'message', exc)))[:300]}",
                                           status, getattr(exc, "code", None), what="tools")
        transient = rejected is None and (
            isinstance(exc, (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError,
                             _BadResponse)) or status in (408, 409))
        wait = self._retry_wait(attempt, exc) if transient and not last else None
        self._record(base, attempt=attempt, ok=False, duration_s=duration_s, status_code=status,
                     error_type=error_type, error=error, retry_in_s=wait)
        if rejected is not None:
            raise rejected from None
        if wait is not None:
            self._sleep(wait)
            return
        if transient:
            why = " (timeouts are retried at most max_timeout_retries times)" if _is_timeout(exc) else ""
            raise LLMUnavailable(
                self._clean(f"the LLM endpoint failed {attempt} attempt(s) ({base['purpose']}){why}; last error: "
                            f"{error}"),
                last_error=error, error_type=error_type, attempts=attempt, status_code=status) from None
        if isinstance(exc, openai.APIStatusError):
            code = getattr(exc, "code", None)
            message = self._clean(str(getattr(exc, "message", exc)))[:300]
            raise LLMConfigError(self._config_message(status, message), status_code=status, code=code) from None
        raise exc  # a bug or an SDK error we do not know: not ours to hide

    def _retry_wait(self, attempt: int, exc: Exception) -> float:
        cfg = self.config
        after = _retry_after_s(getattr(getattr(exc, "response", None), "headers", None))
        if after is not None:
            return min(cfg.backoff_cap_s, after * (1 + 0.1 * self._rng.random()))
        return min(cfg.backoff_cap_s, cfg.backoff_base_s * 2 ** (attempt - 1)) * (0.5 + 0.5 * self._rng.random())

    def _config_message(self, status: int | None, message: str) -> str:
        model, url = self.config.model, _strip_userinfo(self.config.base_url) or "the default OpenAI URL"
        if status == 401:
            return f"the LLM endpoint rejected the API key (HTTP 401: {message}); check OPENAI_API_KEY"
        if status == 403:
            return f"the LLM endpoint refused access to model {model!r} (HTTP 403: {message}); check the key's access"
        if status == 404:
            return (f"the LLM endpoint has no model {model!r} or no such URL (HTTP 404: {message}); check the model "
                    f"name and the base URL {url} (it usually ends in /v1)")
        return f"the LLM endpoint rejected the request for model {model!r} (HTTP {status}: {message})"

    # ------------------------------------------------------------------ records
    def _clean(self, text: str) -> str:
        return redact(" ".join(str(text).split()), self._secrets)

    def _record(self, base: dict[str, Any], *, attempt: int, ok: bool, duration_s: float,
                usage: Usage | None = None, cached: bool = False, finish_reason: str | None = None,
                status_code: int | None = None, error_type: str | None = None, error: str | None = None,
                retry_in_s: float | None = None) -> None:
        """Report one attempt to ``on_call``. Keys: purpose, model, mode (tools, strict, json, json_bare, plain;
        tools-json … for a tool turn asked for as JSON), attempt
        (1-based; 0 for a cache hit), cached, ok, status_code, error_type, error (redacted ``"Type: message"``),
        prompt_tokens, completion_tokens (0 on a cache hit), duration_s, request_hash, finish_reason, retry_in_s
        (the sleep before the next attempt, None if none), started_at (UTC ISO time the attempt started)."""
        if self.on_call is None:
            return
        usage = usage or Usage()
        started = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=duration_s)
        self.on_call({
            "purpose": base["purpose"], "model": self.config.model, "mode": base["mode"], "attempt": attempt,
            "cached": cached, "ok": ok, "status_code": status_code, "error_type": error_type, "error": error,
            "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "duration_s": round(duration_s, 4), "request_hash": base["request_hash"],
            "finish_reason": finish_reason, "retry_in_s": None if retry_in_s is None else round(retry_in_s, 4),
            "started_at": started.isoformat(timespec="milliseconds"),
        })
