"""A scripted OpenAI-compatible server for tests (a module tests import, not a pytest plugin).

``FakeOpenAI`` is a stdlib ``ThreadingHTTPServer`` on ``127.0.0.1:0`` speaking HTTP/1.1 with ``Content-Length``
(the shapes the real ``openai`` client expects; see shared/notes/dependencies.md §4). It serves
``POST /v1/chat/completions`` and ``GET /v1/models``. What each chat request gets back is decided by a *script*:
a callable ``responder(request_body, n) -> Reply`` written by the test, where ``n`` counts the requests that
reached the responder (0, 1, 2 …; requests answered by a server mode such as ``reject_strict`` or a wrong API
key do not reach it and do not count).

Replies (build them with the helpers below, never by hand):

* :func:`text` — a normal completion with content (``finish_reason`` and ``usage`` settable);
* :func:`tool_calls` / :func:`call` — a completion whose message carries tool calls, arguments sent verbatim
  (a malformed JSON string stays malformed);
* :func:`structured` — a completion whose content is the JSON of a dict or pydantic object;
* :func:`refusal` — a structured-output refusal (``message.refusal`` set, content null);
* :func:`http_error` / :func:`api_error` — a status code with a body (the real API's
  ``{"error": {"message", "type", "param", "code"}}`` shape for :func:`api_error`) and headers such as
  ``retry-after-ms``;
* :func:`delay` — sleep, then send another reply (a client with a shorter timeout gives up first);
* :func:`garbage` — a 200 response whose body is not JSON.

:func:`sequence` turns a list of replies into a responder; :func:`fault_injector` wraps a responder so that a
deterministic fraction of requests get a fault instead (429, 500, timeout, garbage, malformed tool arguments,
unknown tool name, non-JSON structured output).

Caveats: streaming (SSE) and the Responses API are not served. Usage numbers are whatever the reply says (default
``prompt_tokens`` = characters of the request's messages // 4 + 1, ``completion_tokens`` = characters of the
reply // 4 + 1): deterministic, not a tokenizer.
"""

from __future__ import annotations

import json
import random
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

#: The real API's message when a model does not support strict JSON-schema output.
STRICT_REJECTION = ("Invalid parameter: 'response_format' of type 'json_schema' is not supported with this model. "
                    "Learn more about supported models at the Structured Outputs guide.")
JSON_MODE_REJECTION = "Invalid parameter: 'response_format' of type 'json_object' is not supported with this model."


# ============================================================================= replies
@dataclass(frozen=True)
class ToolCall:
    """One tool call in a scripted reply. ``arguments`` is sent exactly as given (a dict is JSON-encoded)."""

    name: str
    arguments: str
    id: str | None = None


@dataclass(frozen=True)
class Reply:
    """What the server sends for one request. Build with :func:`text`, :func:`tool_calls`, :func:`http_error` …

    ``kind`` is ``"completion"``, ``"http_error"`` or ``"garbage"``; ``delay_s`` is slept before sending.
    """

    kind: str = "completion"
    content: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    refusal: str | None = None
    finish_reason: str | None = None
    usage: tuple[int, int] | None = None  # (prompt_tokens, completion_tokens); None: computed
    status: int = 200
    body: Any = None  # http_error: dict (sent as JSON) or str (sent as text)
    headers: tuple[tuple[str, str], ...] = ()
    delay_s: float = 0.0


def text(content: str, *, finish_reason: str = "stop", usage: tuple[int, int] | None = None) -> Reply:
    """A normal chat completion whose message content is ``content``."""
    return Reply(content=content, finish_reason=finish_reason, usage=usage)


def call(name: str, arguments: str | dict[str, Any], id: str | None = None) -> ToolCall:
    """A tool call; a dict is JSON-encoded, a string is sent verbatim (malformed JSON included)."""
    return ToolCall(name, arguments if isinstance(arguments, str) else json.dumps(arguments), id)


def tool_calls(*calls: ToolCall | tuple[str, str | dict[str, Any]], content: str | None = None,
               usage: tuple[int, int] | None = None) -> Reply:
    """A completion with ``finish_reason="tool_calls"`` carrying ``calls`` (``ToolCall`` or ``(name, args)``)."""
    tcs = tuple(c if isinstance(c, ToolCall) else call(*c) for c in calls)
    return Reply(content=content, tool_calls=tcs, finish_reason="tool_calls", usage=usage)


def structured(obj: Any, *, usage: tuple[int, int] | None = None) -> Reply:
    """A completion whose content is the JSON of ``obj`` (a dict, list or pydantic model)."""
    data = obj.model_dump(mode="json") if hasattr(obj, "model_dump") else obj
    return text(json.dumps(data), usage=usage)


def refusal(message: str = "I'm sorry, I can't help with that.") -> Reply:
    """A structured-output refusal: content null, ``message.refusal`` set."""
    return Reply(content=None, refusal=message, finish_reason="stop")


def http_error(status: int, body: Any = None, headers: dict[str, str] | None = None) -> Reply:
    """A non-200 response. ``body``: a dict (sent as JSON), a string (sent as text) or None (an api_error body)."""
    if body is None:
        return api_error(status, f"fake error {status}", headers=headers)
    return Reply(kind="http_error", status=status, body=body, headers=tuple((headers or {}).items()))


def api_error(status: int, message: str, *, type: str | None = None, param: str | None = None,
              code: str | None = None, headers: dict[str, str] | None = None) -> Reply:
    """An error in the real API's shape: ``{"error": {"message", "type", "param", "code"}}``."""
    default_type = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
                    404: "invalid_request_error", 429: "rate_limit_error"}.get(status, "server_error")
    body = {"error": {"message": message, "type": type or default_type, "param": param, "code": code}}
    return Reply(kind="http_error", status=status, body=body, headers=tuple((headers or {}).items()))


def rate_limited(retry_after_ms: int | None = 50, retry_after_s: float | None = None) -> Reply:
    """A 429 like the real API's, with ``retry-after-ms`` and/or ``retry-after`` headers when given."""
    headers = {}
    if retry_after_ms is not None:
        headers["retry-after-ms"] = str(retry_after_ms)
    if retry_after_s is not None:
        headers["retry-after"] = str(retry_after_s)
    return api_error(429, "Rate limit reached for requests. Please try again later.", code="rate_limit_exceeded",
                     headers=headers)


def server_error(status: int = 500) -> Reply:
    return api_error(status, "The server had an error while processing your request. Sorry about that!")


def delay(seconds: float, then: Reply) -> Reply:
    """Sleep ``seconds`` before sending ``then`` (to make a client with a shorter timeout give up)."""
    return replace(then, delay_s=then.delay_s + seconds)


def garbage(body: str = "<html><body>502 Bad Gateway</body></html>") -> Reply:
    """A 200 response whose body is not JSON (a misbehaving proxy)."""
    return Reply(kind="garbage", body=body)


Responder = Callable[[dict[str, Any], int], Reply]


def sequence(*replies: Reply, then: Reply | None = None) -> Responder:
    """A responder that sends ``replies`` in order, then ``then`` for ever — or, without ``then``, a 400 saying the
    script is exhausted (not retried by clients, so a test that makes too many requests fails loudly)."""

    def responder(body: dict[str, Any], n: int) -> Reply:
        if n < len(replies):
            return replies[n]
        if then is not None:
            return then
        return api_error(400, f"fake server script exhausted: request {n} but only {len(replies)} replies scripted")

    return responder


# ============================================================================= fault injection
FAULT_KINDS = ("429", "500", "timeout", "garbage", "bad_args", "unknown_tool", "bad_json")
#: Faults that replace the reply (the responder's reply is not delivered, so its index is not consumed).
TRANSPORT_FAULTS = frozenset({"429", "500", "timeout", "garbage"})


class FaultInjector:
    """A responder wrapper that turns a deterministic fraction ``rate`` of requests into faults.

    Whether request ``n`` is faulted, and how, depends only on ``(seed, n)`` (``random.Random(f"{seed}:{n}")``),
    so a test run is reproducible. Transport faults (429 with ``retry-after-ms``, 500, timeout, garbage body)
    replace the reply and do not consume the base responder's index: the base responder sees its own counter
    ``m`` of replies actually delivered, so a :func:`sequence` script is not skipped ahead by a retried fault.
    Content faults mutate the delivered reply: ``bad_args`` makes tool arguments malformed JSON,
    ``unknown_tool`` renames the first tool call to ``no_such_tool``, ``bad_json`` replaces text content with
    prose. A content fault that does not apply to the reply (``bad_args`` on a text reply) delivers it unchanged.
    ``max_consecutive`` bounds faults in a row so a client with enough retries always gets through.
    ``log`` holds ``(n, kind or None)`` for every request. The base responder must be pure in ``(body, m)``
    (a timed-out reply is asked for again with the same ``m``).
    """

    def __init__(self, base: Responder, rate: float, seed: int = 0, kinds: Sequence[str] = FAULT_KINDS, *,
                 timeout_delay_s: float = 1.0, retry_after_ms: int = 10,
                 max_consecutive: int | None = None) -> None:
        unknown = set(kinds) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FAULT_KINDS}")
        if not kinds:
            raise ValueError("kinds must not be empty")
        self.base, self.rate, self.seed, self.kinds = base, rate, seed, tuple(kinds)
        self.timeout_delay_s, self.retry_after_ms = timeout_delay_s, retry_after_ms
        self.max_consecutive = max_consecutive
        self.log: list[tuple[int, str | None]] = []
        self._m = 0
        self._streak = 0

    def choose(self, n: int) -> str | None:
        """The fault for request ``n`` (None: no fault), before ``max_consecutive`` is applied."""
        rng = random.Random(f"{self.seed}:{n}")
        return rng.choice(self.kinds) if rng.random() < self.rate else None

    def __call__(self, body: dict[str, Any], n: int) -> Reply:
        kind = self.choose(n)
        if kind is not None and self.max_consecutive is not None and self._streak >= self.max_consecutive:
            kind = None
        if kind in TRANSPORT_FAULTS:
            reply = self._transport_fault(kind, body)
        else:
            reply = self.base(body, self._m)
            self._m += 1
            mutated = _mutate(reply, kind) if kind else None
            kind = kind if mutated is not None else None
            reply = mutated or reply
        self._streak = self._streak + 1 if kind else 0
        self.log.append((n, kind))
        return reply

    def _transport_fault(self, kind: str, body: dict[str, Any]) -> Reply:
        if kind == "429":
            return rate_limited(retry_after_ms=self.retry_after_ms)
        if kind == "500":
            return server_error(500)
        if kind == "garbage":
            return garbage()
        return delay(self.timeout_delay_s, self.base(body, self._m))  # "timeout": same m next time


def _mutate(reply: Reply, kind: str) -> Reply | None:
    """The reply with content fault ``kind`` applied, or None when it does not apply to this reply."""
    if reply.kind != "completion":
        return None
    if kind == "bad_args" and reply.tool_calls:
        first = reply.tool_calls[0]
        return replace(reply, tool_calls=(replace(first, arguments=first.arguments[:-1] + ",,"),
                                          *reply.tool_calls[1:]))
    if kind == "unknown_tool" and reply.tool_calls:
        return replace(reply, tool_calls=(replace(reply.tool_calls[0], name="no_such_tool"), *reply.tool_calls[1:]))
    if kind == "bad_json" and not reply.tool_calls and reply.content is not None:
        return replace(reply, content="Sure! I think the answer is the one about animals.")
    return None


def fault_injector(base_responder: Responder, rate: float, seed: int = 0, kinds: Sequence[str] = FAULT_KINDS,
                   **kwargs: Any) -> FaultInjector:
    """Wrap ``base_responder`` so a deterministic fraction ``rate`` of requests are faults (see FaultInjector)."""
    return FaultInjector(base_responder, rate, seed, kinds, **kwargs)


# ============================================================================= server profiles
@dataclass(frozen=True)
class ServerProfile:
    """How a real OpenAI-compatible server treats the parts of a request that differ between servers. Each field
    reproduces documented behaviour (sources in :data:`PROFILES`' comments):

    * ``json_schema``: ``response_format: {"type": "json_schema"}`` is ``"ok"``, or rejected with 400 / 500;
    * ``tool_choice_default``: what a request with ``tools`` and no ``tool_choice`` means (``"auto"`` / ``"none"``:
      tools are not shown to the model, so it answers in text);
    * ``native_tools``: ``"ok"``; ``"reject"``: any request with ``tools`` gets a 400 (a model without tool
      support); ``"no_auto"``: ``tool_choice: "auto"`` (explicit or by default) gets a 400 (no tool parser);
    * ``null_content``: ``"ok"`` or ``"reject"`` (500) for an assistant message whose ``content`` is null;
    * ``caps``: the token-cap parameters it honours; a request with none of them runs away (``runaway_s``: the
      reply is delayed that long, as a weak model generating until its context is full);
    * ``error_shape``: ``"openai"`` (``{"error": {...}}``) or ``"vllm"`` (``{"object": "error", "message", ...}``).
    """

    name: str
    json_schema: str = "ok"
    tool_choice_default: str = "auto"
    native_tools: str = "ok"
    null_content: str = "ok"
    caps: frozenset[str] = frozenset({"max_tokens", "max_completion_tokens"})
    runaway_s: float = 0.0
    error_shape: str = "openai"


#: The profiles, by name. Sources for each quirk:
#: * openai — the reference behaviour (platform.openai.com docs: tool_choice defaults to "auto" when tools are
#:   present; strict json_schema supported; content may be null next to tool_calls).
#: * vllm — vLLM's OpenAI server (protocol.py: a request with tools and no tool_choice gets "auto"; json_schema
#:   served by guided decoding; errors as ``{"object": "error", ...}``); ``vllm-no-tool-parser`` is the same
#:   server started without ``--enable-auto-tool-choice``: '"auto" tool choice requires
#:   --enable-auto-tool-choice and --tool-call-parser to be set' (HTTP 400; vllm-project/vllm#9986).
#: * llama-cpp — llama-cpp-python 0.3.36 ``python -m llama_cpp.server`` (read in its source:
#:   llama_types.ChatCompletionRequestResponseFormat is ``type: Literal["text", "json_object"]`` plus a ``schema``
#:   extension; server/errors.py RouteErrorHandler turns every exception, request validation included, into a
#:   500 ``internal_server_error`` whose message is the error text; the assistant message's ``content`` is
#:   ``NotRequired[str]``, so null is a validation error → 500; llama_chat_format.chatml_function_calling treats
#:   ``tool_choice`` None like "none"; server/types.py has ``max_tokens`` but no ``max_completion_tokens``,
#:   which pydantic ignores).
#: * ollama — Ollama's OpenAI compatibility (docs.ollama.com/api/openai-compatibility: response_format,
#:   max_tokens and tools supported, tool_choice listed late and ignored by older servers: the model decides,
#:   i.e. "auto"); ``ollama-no-tools`` is a model whose template has no tools: HTTP 400 "registry.ollama.ai/
#:   library/<model> does not support tools" (ollama/ollama#6027, #14795).
PROFILES: dict[str, ServerProfile] = {p.name: p for p in (
    ServerProfile("openai"),
    ServerProfile("vllm", error_shape="vllm"),
    ServerProfile("vllm-no-tool-parser", native_tools="no_auto", error_shape="vllm"),
    ServerProfile("llama-cpp", json_schema="reject_500", tool_choice_default="none", null_content="reject",
                  caps=frozenset({"max_tokens"}), runaway_s=3.0),
    ServerProfile("ollama", caps=frozenset({"max_tokens"})),
    ServerProfile("ollama-no-tools", native_tools="reject", caps=frozenset({"max_tokens"})),
)}


def _profile_error(profile: ServerProfile, status: int, message: str, type_: str) -> Reply:
    if profile.error_shape == "vllm":
        body = {"object": "error", "message": message, "type": type_, "param": None, "code": status}
        return Reply(kind="http_error", status=status, body=body)
    return api_error(status, message, type=type_)


def profile_rejection(profile: ServerProfile, body: dict[str, Any]) -> Reply | None:
    """The error ``profile``'s server answers ``body`` with, or None when it accepts the request."""
    for m in body.get("messages") or []:
        if m.get("role") == "assistant" and "content" in m and m["content"] is None and profile.null_content != "ok":
            return _profile_error(profile, 500, "[{'type': 'string_type', 'loc': ('body', 'messages', 'assistant', "
                                                "'content'), 'msg': 'Input should be a valid string', 'input': None}]",
                                  "internal_server_error")
    fmt = (body.get("response_format") or {}).get("type")
    if fmt == "json_schema" and profile.json_schema != "ok":
        status = 500 if profile.json_schema == "reject_500" else 400
        return _profile_error(profile, status, "[{'type': 'literal_error', 'loc': ('body', 'response_format', "
                                               "'type'), 'msg': \"Input should be 'text' or 'json_object'\", "
                                               "'input': 'json_schema'}]", "internal_server_error")
    if body.get("tools"):
        if profile.native_tools == "reject":
            return _profile_error(profile, 400, f"registry.ollama.ai/library/{body.get('model')} does not support "
                                                "tools", "api_error")
        choice = body.get("tool_choice", profile.tool_choice_default)
        if profile.native_tools == "no_auto" and choice == "auto":
            return _profile_error(profile, 400, '"auto" tool choice requires --enable-auto-tool-choice and '
                                                "--tool-call-parser to be set", "BadRequestError")
    return None


def profile_reply(profile: ServerProfile, body: dict[str, Any], reply: Reply) -> Reply:
    """``reply`` as ``profile``'s server would deliver it: no tool calls when the tools were not shown to the model
    (``tool_choice`` none, or missing where that means none), delayed when no honoured token cap was sent."""
    if reply.kind != "completion":
        return reply
    shown = bool(body.get("tools")) and body.get("tool_choice", profile.tool_choice_default) != "none"
    if reply.tool_calls and not shown:
        names = ", ".join(tc.name for tc in reply.tool_calls)
        reply = replace(reply, tool_calls=(), finish_reason="stop",
                        content=reply.content or f"I would like to use {names} but I cannot call tools.")
    if not profile.caps & set(body):
        reply = replace(reply, delay_s=reply.delay_s + profile.runaway_s)
    return reply


class JsonToolsModel:
    """A scripted model that also follows the JSON tool-calling prompt (``agent.llm`` ``json_tools_history``), as a
    model served without native tool calling would: a request whose ``response_format`` schema has a
    ``tool_calls`` property is turned back into the native conversation for ``base`` (assistant JSON turns →
    tool_calls, "Result of tool call …" user messages → tool messages, no response_format), and ``base``'s
    reply is written as the JSON turn. Other requests go to ``base`` unchanged."""

    RESULT = re.compile(r"^Result of tool call (\S+) \((.*?)\):\n", re.S)

    def __init__(self, base: Responder) -> None:
        self.base, self.json_turns = base, 0

    @staticmethod
    def is_json_tools(body: dict[str, Any]) -> bool:
        first = (body.get("messages") or [{}])[0]
        return first.get("role") == "system" and "To call tools, reply" in (first.get("content") or "")

    def __call__(self, body: dict[str, Any], n: int) -> Reply:
        if not self.is_json_tools(body):
            return self.base(body, n)
        self.json_turns += 1
        native: list[dict[str, Any]] = []
        for i, m in enumerate(body["messages"]):
            hit = self.RESULT.match(m.get("content") or "") if m.get("role") == "user" else None
            if hit:
                native.append({"role": "tool", "tool_call_id": hit.group(1), "content": m["content"][hit.end():]})
                continue
            if m.get("role") == "assistant":
                try:
                    turn = json.loads(m.get("content") or "")
                except ValueError:
                    turn = None
                if isinstance(turn, dict) and turn.get("tool_calls"):
                    ids = [self.RESULT.match(x.get("content") or "") for x in body["messages"][i + 1:]]
                    ids = [h.group(1) for h in ids if h]
                    native.append({"role": "assistant", "content": turn.get("content") or "", "tool_calls": [
                        {"id": ids[k] if k < len(ids) else f"call_{k}", "type": "function",
                         "function": {"name": c["name"], "arguments": json.dumps(c.get("arguments") or {})}}
                        for k, c in enumerate(turn["tool_calls"])]})
                    continue
            native.append(m)
        reply = self.base({**{k: v for k, v in body.items() if k != "response_format"}, "messages": native,
                           "tools": [{"type": "function", "function": {"name": "?"}}]}, n)
        if reply.kind != "completion":
            return reply
        calls = [{"name": tc.name, "arguments": _loads_or_raw(tc.arguments)} for tc in reply.tool_calls]
        return text(json.dumps({"tool_calls": calls, "content": reply.content or ""}), usage=reply.usage)


def _loads_or_raw(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


# ============================================================================= server
@dataclass
class Received:
    """One request as the server saw it: path, JSON body (None if not JSON) and lower-cased headers."""

    path: str
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


def completion_body(reply: Reply, request: dict[str, Any], n: int) -> dict[str, Any]:
    """The chat.completion JSON for a completion reply (the real API's shape)."""
    message: dict[str, Any] = {"role": "assistant", "content": reply.content, "refusal": reply.refusal}
    if reply.tool_calls:
        message["tool_calls"] = [{"id": tc.id or f"call_{n}_{i}", "type": "function",
                                  "function": {"name": tc.name, "arguments": tc.arguments}}
                                 for i, tc in enumerate(reply.tool_calls)]
    if reply.usage is not None:
        prompt, completion = reply.usage
    else:
        prompt = len(json.dumps(request.get("messages", []))) // 4 + 1
        out = (reply.content or "") + "".join(tc.name + tc.arguments for tc in reply.tool_calls)
        completion = len(out) // 4 + 1
    return {"id": f"chatcmpl-{n}", "object": "chat.completion", "created": 1_700_000_000 + n,
            "model": request.get("model", "fake-model"), "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "finish_reason": reply.finish_reason or "stop", "logprobs": None,
                         "message": message}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion}}


class FakeOpenAI:
    """A scripted OpenAI-compatible server; use as a context manager.

    ``responder``: the script (default: every request gets ``text("ok")``). ``reject_strict``: answer 400 (the real
    API's message) to any request whose ``response_format.type`` is ``json_schema``, without calling the responder;
    ``reject_json_object`` likewise for ``json_object``. ``api_key``: when set, a request with another bearer key
    gets a 401 whose message quotes the key it sent (to test that clients redact it): whole (``key_echo="full"``),
    masked like OpenAI's ``sk-proj-abcd****…wxyz`` (``"masked"``) or cut ``sk-test-SECRETMA…ER-123``
    (``"ellipsis"``). ``profile``: a :class:`ServerProfile` or its name in :data:`PROFILES` (a real server's
    quirks, applied around the responder). ``requests`` lists every
    request received (see :class:`Received`); ``n_responder_calls`` counts the ones the responder answered.
    """

    def __init__(self, responder: Responder | None = None, *, reject_strict: bool = False,
                 reject_json_object: bool = False, api_key: str | None = None, key_echo: str = "full",
                 profile: ServerProfile | str | None = None) -> None:
        self.responder: Responder = responder or (lambda body, n: text("ok"))
        self.key_echo = key_echo
        self.profile = PROFILES[profile] if isinstance(profile, str) else profile
        self.reject_strict, self.reject_json_object, self.api_key = reject_strict, reject_json_object, api_key
        self.requests: list[Received] = []
        self.n_responder_calls = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> FakeOpenAI:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="fake-openai", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # wakes handlers sleeping in a delay
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeOpenAI is not running: use it as a context manager or call start()")
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    @property
    def bodies(self) -> list[Any]:
        """The JSON bodies of the chat requests received, in order."""
        return [r.body for r in self.requests if r.path.endswith("/chat/completions")]

    # ------------------------------------------------------------------ answering
    def answer(self, path: str, body: Any, headers: dict[str, str]) -> tuple[Reply, int]:
        """Decide the reply for one request and the responder index it got (-1: answered by the server itself).
        Called by the handler thread; records the request."""
        reply = self._server_reply(path, body, headers)
        if reply is not None:
            return reply, -1
        with self._lock:
            n = self.n_responder_calls
            self.n_responder_calls += 1
            reply = self.responder(body, n)
            return (reply if self.profile is None else profile_reply(self.profile, body, reply)), n

    def _server_reply(self, path: str, body: Any, headers: dict[str, str]) -> Reply | None:
        with self._lock:
            self.requests.append(Received(path, body, headers))
            if self.api_key is not None:
                sent = headers.get("authorization", "").removeprefix("Bearer ").strip()
                if sent != self.api_key:
                    shown = {"full": sent, "masked": sent[:8] + "*" * max(0, len(sent) - 12) + sent[-4:],
                             "ellipsis": sent[:16] + "…" + sent[-6:]}[self.key_echo]
                    return api_error(401, f"Incorrect API key provided: {shown}. You can find your API key at "
                                          "https://platform.openai.com/account/api-keys.", code="invalid_api_key")
            if not path.endswith("/chat/completions"):
                return api_error(404, f"Invalid URL (POST {path})")
            if not isinstance(body, dict):
                return api_error(400, "We could not parse the JSON body of your request.")
            fmt = (body.get("response_format") or {}).get("type")
            if self.reject_strict and fmt == "json_schema":
                return api_error(400, STRICT_REJECTION, param="response_format")
            if self.reject_json_object and fmt == "json_object":
                return api_error(400, JSON_MODE_REJECTION, param="response_format")
            return None if self.profile is None else profile_rejection(self.profile, body)

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if the server is stopping (then the reply is not sent)."""
        return self._stop.wait(seconds)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeOpenAI  # set on the per-server subclass

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            self._send(200, {"object": "list", "data": [{"id": "fake-model", "object": "model", "created": 0,
                                                          "owned_by": "fake"}]})
        else:
            self._send(404, {"error": {"message": f"Invalid URL (GET {self.path})", "type": "invalid_request_error",
                                       "param": None, "code": None}})

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("content-length") or 0))
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        headers = {k.lower(): v for k, v in self.headers.items()}
        reply, n = self.fake.answer(self.path, body, headers)
        if reply.delay_s and self.fake.wait(reply.delay_s):
            return
        if reply.kind == "garbage":
            self._send(200, reply.body if isinstance(reply.body, str) else str(reply.body))
        elif reply.kind == "http_error":
            self._send(reply.status, reply.body, dict(reply.headers))
        else:
            self._send(200, completion_body(reply, body or {}, n),
                       dict(reply.headers))

    def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        is_json = not isinstance(payload, str)
        data = (json.dumps(payload) if is_json else payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json" if is_json else "text/html")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout) before the reply was ready
