"""agent/llm.py against a scripted OpenAI-compatible server (tests/fake_openai.py) with the real openai client."""

from __future__ import annotations

import json
import time

import pytest
from pydantic import BaseModel, Field

from autoexplain.agent.llm import (
    AssistantTurn,
    DictCache,
    LLMBadOutput,
    LLMClient,
    LLMConfig,
    LLMConfigError,
    LLMUnavailable,
    Usage,
    redact,
    request_hash,
)
from autoexplain.tools.errors import InputError
from autoexplain.tools.registry import Cost, Registry, ToolOutput, ToolSpec
from autoexplain.tools.vocab import CausalLevel

from fake_openai import (
    FakeOpenAI,
    api_error,
    call,
    delay,
    fault_injector,
    garbage,
    rate_limited,
    refusal,
    sequence,
    server_error,
    structured,
    text,
    tool_calls,
)

KEY = "sk-test-SECRET-0123456789abcdef"
USER = [{"role": "system", "content": "You explain features."}, {"role": "user", "content": "Explain feature 7."}]


class FeatureLabel(BaseModel):
    feature_id: int
    label: str
    confidence: float = Field(ge=0, le=1)


LABEL = {"feature_id": 7, "label": "fox detector", "confidence": 0.9}


class Ablate(BaseModel):
    feature_id: int
    layer: int


class Done(ToolOutput):
    def summary_text(self) -> str:
        return "done"


ABLATE = ToolSpec("ablate_feature", "Zero one SAE feature.", Ablate, Done, lambda ctx, a: Done(), Cost.FORWARD,
                  CausalLevel.INTERVENTION)


@pytest.fixture
def records():
    """Every on_call record of the test; afterwards: all JSON-able, none holding the key."""
    out: list[dict] = []
    yield out
    dumped = json.dumps(out)
    assert KEY not in dumped


def client(srv: FakeOpenAI, records: list | None = None, cache=None, **cfg) -> LLMClient:
    settings = {"timeout_s": 5.0, "max_retries": 3, "backoff_base_s": 0.01, "backoff_cap_s": 1.0, **cfg}
    config = LLMConfig(model="fake-model", base_url=srv.base_url, api_key=KEY, **settings)
    return LLMClient(config, on_call=None if records is None else records.append, cache=cache)


# ============================================================================= tool calling
def test_tool_call_round_trip_keeps_arguments_raw(records) -> None:
    malformed = '{"feature_id": 3, "layer":'
    script = sequence(tool_calls(call("ablate_feature", {"feature_id": 3, "layer": 0}),
                                 call("ablate_feature", malformed), usage=(20, 9)),
                      text("Feature 3 matters.", usage=(40, 5)))
    reg = Registry()
    reg.register(ABLATE)
    tools = [spec.openai_schema() for spec in reg]
    with FakeOpenAI(script) as srv, client(srv, records) as llm:
        turn = llm.chat_tools(list(USER), tools, purpose="plan")
        assert turn.finish_reason == "tool_calls" and turn.content is None and not turn.cached
        assert [(t.name, t.arguments) for t in turn.tool_calls] == [
            ("ablate_feature", '{"feature_id": 3, "layer": 0}'), ("ablate_feature", malformed)]
        assert turn.usage == Usage(prompt_tokens=20, completion_tokens=9)
        # the agent validates arguments itself: the good one parses, the malformed one is an InputError message
        assert reg.parse_args("ablate_feature", turn.tool_calls[0].arguments) == Ablate(feature_id=3, layer=0)
        with pytest.raises(InputError, match="bad arguments"):
            reg.parse_args("ablate_feature", turn.tool_calls[1].arguments)
        history = [*USER, turn.as_message()]
        history += [{"role": "tool", "tool_call_id": tc.id, "content": "ok"} for tc in turn.tool_calls]
        json.dumps(history)
        final = llm.chat_tools(history, tools, purpose="plan")
    assert final.content == "Feature 3 matters." and final.tool_calls == [] and final.finish_reason == "stop"
    assert final.as_message() == {"role": "assistant", "content": "Feature 3 matters."}
    second = srv.bodies[1]
    assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant", "tool", "tool"]
    assert second["messages"][2]["tool_calls"][1]["function"]["arguments"] == malformed  # sent back verbatim
    assert second["tools"] == tools and second["temperature"] == 0
    assert [(r["ok"], r["prompt_tokens"], r["completion_tokens"], r["mode"]) for r in records] == [
        (True, 20, 9, "tools"), (True, 40, 5, "tools")]


def test_no_tools_sends_no_tools_key() -> None:
    with FakeOpenAI() as srv, client(srv) as llm:
        assert llm.chat_tools(list(USER), [], purpose="p").content == "ok"
    assert "tools" not in srv.bodies[0]


# ============================================================================= structured output
def test_structured_happy_path_is_strict(records) -> None:
    with FakeOpenAI(sequence(structured(LABEL, usage=(30, 12)))) as srv, client(srv, records) as llm:
        obj, usage = llm.structured(list(USER), FeatureLabel, purpose="label")
    assert obj == FeatureLabel(**LABEL) and usage == Usage(prompt_tokens=30, completion_tokens=12)
    fmt = srv.bodies[0]["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["name"] == "FeatureLabel"
    assert llm.structured_mode == "strict" and len(records) == 1 and records[0]["mode"] == "strict"


def test_strict_rejection_falls_back_to_json_mode_and_remembers(records) -> None:
    with FakeOpenAI(lambda body, n: structured(LABEL), reject_strict=True) as srv, client(srv, records) as llm:
        obj, _ = llm.structured(list(USER), FeatureLabel, purpose="label")
        assert obj.label == "fox detector" and llm.structured_mode == "json"
        assert [b["response_format"]["type"] for b in srv.bodies] == ["json_schema", "json_object"]
        system = srv.bodies[1]["messages"][0]
        assert system["role"] == "system" and system["content"].startswith("You explain features.")
        assert '"feature_id"' in system["content"] and "JSON schema" in system["content"]
        llm.structured(list(USER), FeatureLabel, purpose="label")  # remembered: no strict attempt
    assert [b["response_format"]["type"] for b in srv.bodies] == ["json_schema", "json_object", "json_object"]
    assert [(r["mode"], r["ok"], r["status_code"]) for r in records] == [
        ("strict", False, 400), ("json", True, 200), ("json", True, 200)]  # the HTTP status of every attempt


def test_json_mode_rejection_falls_back_to_plain() -> None:
    with FakeOpenAI(lambda body, n: text("```json\n" + json.dumps(LABEL) + "\n```"), reject_strict=True,
                    reject_json_object=True) as srv, client(srv) as llm:
        obj, _ = llm.structured([{"role": "user", "content": "label it"}], FeatureLabel, purpose="label")
    assert obj.feature_id == 7 and llm.structured_mode == "plain"  # fenced JSON is tolerated
    assert "response_format" not in srv.bodies[2] and srv.bodies[2]["messages"][0]["role"] == "system"


def test_fixed_strict_mode_rejection_is_a_config_error() -> None:
    with (
        FakeOpenAI(reject_strict=True) as srv,
        client(srv, structured_mode="strict") as llm,
        pytest.raises(LLMConfigError, match="structured output"),
    ):
        llm.structured(list(USER), FeatureLabel, purpose="label")
    assert len(srv.requests) == 1


def test_invalid_structured_reply_is_repaired(records) -> None:
    script = sequence(text("Sure! It detects foxes.", usage=(10, 5)), structured({"feature_id": 7}, usage=(30, 6)),
                      structured(LABEL, usage=(50, 9)))
    with FakeOpenAI(script) as srv, client(srv, records) as llm:
        obj, usage = llm.structured(list(USER), FeatureLabel, purpose="label")
    assert obj == FeatureLabel(**LABEL) and usage == Usage(prompt_tokens=90, completion_tokens=20)
    last = srv.bodies[2]["messages"]
    assert [m["role"] for m in last] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert last[2]["content"] == "Sure! It detects foxes." and "not valid" in last[3]["content"]
    assert "Invalid JSON" in last[3]["content"] and "label: Field required" in last[5]["content"]
    assert len({r["request_hash"] for r in records}) == 3


def test_invalid_structured_reply_gives_up_after_repairs() -> None:
    with (
        FakeOpenAI(lambda body, n: text("I cannot produce JSON today.")) as srv,
        client(srv) as llm,
        pytest.raises(LLMBadOutput, match="no valid FeatureLabel") as err,
    ):
        llm.structured(list(USER), FeatureLabel, purpose="label", repairs=2)
    assert len(srv.requests) == 3 and err.value.rounds == 3
    assert "Invalid JSON" in err.value.last_error and err.value.content == "I cannot produce JSON today."


def test_refusal_is_bad_output_without_retry() -> None:
    with (
        FakeOpenAI(sequence(refusal("I won't label this."))) as srv,
        client(srv) as llm,
        pytest.raises(LLMBadOutput, match="refused"),
    ):
        llm.structured(list(USER), FeatureLabel, purpose="label")
    assert len(srv.requests) == 1


# ============================================================================= retries
def test_429_retry_after_ms_is_honoured_not_the_exponential_default(records) -> None:
    with FakeOpenAI(sequence(rate_limited(retry_after_ms=150), text("ok"))) as srv, \
            client(srv, records, backoff_base_s=2.0, backoff_cap_s=10.0) as llm:
        t0 = time.monotonic()
        assert llm.chat_tools(list(USER), [], purpose="p").content == "ok"
        elapsed = time.monotonic() - t0
    assert 0.15 <= elapsed < 0.9  # the exponential default would have slept >= 1 s
    assert records[0]["status_code"] == 429 and 0.15 <= records[0]["retry_in_s"] <= 0.166
    assert [r["ok"] for r in records] == [False, True] and records[1]["attempt"] == 2


def test_retry_after_seconds_is_capped() -> None:
    waits: list[float] = []
    cfg = LLMConfig(model="m", api_key=KEY, backoff_cap_s=0.05, max_retries=1)
    with FakeOpenAI(sequence(rate_limited(retry_after_ms=None, retry_after_s=120), text("ok"))) as srv:
        llm = LLMClient(cfg.model_copy(update={"base_url": srv.base_url}), sleep=waits.append)
        assert llm.chat_tools(list(USER), [], purpose="p").content == "ok"
    assert waits == [0.05]


def test_500_then_success(records) -> None:
    with FakeOpenAI(sequence(server_error(500), text("ok"))) as srv, client(srv, records) as llm:
        assert llm.chat_tools(list(USER), [], purpose="p").content == "ok"
    assert [(r["ok"], r["status_code"], r["error_type"]) for r in records] == [
        (False, 500, "InternalServerError"), (True, 200, None)]
    assert records[0]["request_hash"] == records[1]["request_hash"]


def test_timeout_then_success(records) -> None:
    with FakeOpenAI(sequence(delay(2.0, text("slow")), text("fast"))) as srv, \
            client(srv, records, timeout_s=0.3) as llm:
        t0 = time.monotonic()
        assert llm.chat_tools(list(USER), [], purpose="p").content == "fast"
        assert time.monotonic() - t0 < 1.5
    assert records[0]["error_type"] == "APITimeoutError" and 0.25 < records[0]["duration_s"] < 1.0


def test_garbage_body_is_retried(records) -> None:
    with FakeOpenAI(sequence(garbage(), text("ok"))) as srv, client(srv, records) as llm:
        assert llm.chat_tools(list(USER), [], purpose="p").content == "ok"
    assert records[0]["error_type"] == "BadResponse" and "not JSON" in records[0]["error"]


def test_exhausted_retries_raise_unavailable(records) -> None:
    with (
        FakeOpenAI(lambda body, n: server_error(503)) as srv,
        client(srv, records, max_retries=2) as llm,
        pytest.raises(LLMUnavailable, match="3 attempt") as err,
    ):
        llm.chat_tools(list(USER), [], purpose="p")
    assert len(srv.requests) == 3 and err.value.attempts == 3 and err.value.status_code == 503
    assert "InternalServerError" in err.value.last_error
    assert [r["attempt"] for r in records] == [1, 2, 3] and records[-1]["retry_in_s"] is None


def test_401_is_a_config_error_not_retried_and_the_key_is_redacted(records) -> None:
    with (
        FakeOpenAI(api_key="sk-the-right-key") as srv,
        client(srv, records) as llm,
        pytest.raises(LLMConfigError, match="OPENAI_API_KEY") as err,
    ):
        llm.chat_tools(list(USER), [], purpose="p")
    assert KEY in srv.requests[0].headers["authorization"]  # the fake echoes the sent key in its 401 message
    assert len(srv.requests) == 1 and err.value.status_code == 401 and isinstance(err.value, InputError)
    assert KEY not in str(err.value) and "[REDACTED]" in str(err.value) and "\n" not in str(err.value)
    assert len(records) == 1 and "[REDACTED]" in records[0]["error"]


def test_404_names_the_model() -> None:
    reply = api_error(404, "The model `fake-model` does not exist", code="model_not_found")
    with (
        FakeOpenAI(sequence(reply)) as srv,
        client(srv) as llm,
        pytest.raises(LLMConfigError, match="no model 'fake-model'") as err,
    ):
        llm.chat_tools(list(USER), [], purpose="p")
    assert err.value.code == "model_not_found" and len(srv.requests) == 1


# ============================================================================= cache
def test_cache_hit_makes_no_request(records) -> None:
    cache = DictCache()
    script = sequence(tool_calls(("ablate_feature", '{"feature_id": 1, "layer": 0}'), usage=(11, 4)),
                      text("Sure!", usage=(5, 2)), structured(LABEL, usage=(7, 3)))
    with FakeOpenAI(script) as srv:
        with client(srv, records, cache=cache) as first:
            turn = first.chat_tools(list(USER), [ABLATE.openai_schema()], purpose="plan")
            obj, usage = first.structured(list(USER), FeatureLabel, purpose="label")  # one repair round
        assert len(srv.requests) == 3 and len(cache) == 3
        with client(srv, records, cache=cache) as resumed:  # a new process after a crash
            again = resumed.chat_tools(list(USER), [ABLATE.openai_schema()], purpose="plan")
            obj2, usage2 = resumed.structured(list(USER), FeatureLabel, purpose="label")
        assert len(srv.requests) == 3  # nothing asked again
    assert again.cached and again.tool_calls == turn.tool_calls and again.usage == turn.usage
    assert obj2 == obj and usage2 == usage == Usage(prompt_tokens=12, completion_tokens=5)
    hits = records[3:]
    assert [(r["cached"], r["attempt"], r["prompt_tokens"], r["completion_tokens"]) for r in hits] == [
        (True, 0, 0, 0)] * 3
    assert [r["request_hash"] for r in hits] == [r["request_hash"] for r in records[:3]]


def test_request_hash_is_canonical() -> None:
    a = request_hash("m", [{"role": "user", "content": "x"}], params={"temperature": 0, "tool_choice": None})
    b = request_hash("m", [{"content": "x", "role": "user"}], params={"temperature": 0})
    assert a == b and len(a) == 64
    assert a != request_hash("m", [{"role": "user", "content": "y"}], params={"temperature": 0})
    assert a != request_hash("m", [{"role": "user", "content": "x"}], params={"temperature": 0},
                             response_format={"type": "json_object"})


# ============================================================================= config and secrets
def test_config_never_shows_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(InputError, match="set OPENAI_API_KEY"):
        LLMConfig.from_env("gpt-x")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://user:hunter22@localhost:9/v1")
    cfg = LLMConfig.from_env("gpt-x", max_retries=1)
    assert cfg.api_key.get_secret_value() == KEY and cfg.max_retries == 1
    shown = [repr(cfg), str(cfg), json.dumps(cfg.public()), repr(LLMClient(cfg))]
    assert all(KEY not in s and "hunter22" not in s for s in shown)
    assert cfg.public()["api_key_set"] is True and cfg.public()["base_url"] == "http://localhost:9/v1"


def test_redact() -> None:
    assert redact(f"bad key {KEY}; header Authorization: Bearer abc.def", [KEY, None, "ab"]) == (
        "bad key [REDACTED]; header Authorization: Bearer [REDACTED]")


# ============================================================================= fault injection
def test_fault_injector_is_deterministic_and_survivable(records) -> None:
    base = sequence(then=tool_calls(("ablate_feature", '{"feature_id": 2, "layer": 0}')))
    kinds = ("429", "500", "garbage", "bad_args", "unknown_tool")
    inj = fault_injector(base, rate=0.5, seed=3, kinds=kinds, retry_after_ms=5, max_consecutive=2)
    assert [inj.choose(n) for n in range(30)] == [fault_injector(base, 0.5, 3, kinds).choose(n) for n in range(30)]
    names, args = [], []
    with FakeOpenAI(inj) as srv, client(srv, records, max_retries=2) as llm:
        for _ in range(12):
            turn = llm.chat_tools(list(USER), [ABLATE.openai_schema()], purpose="plan")
            names.append(turn.tool_calls[0].name)
            args.append(turn.tool_calls[0].arguments)
    faults = [k for _, k in inj.log if k]
    assert len(inj.log) == len(srv.requests) and faults
    assert names.count("no_such_tool") == faults.count("unknown_tool")
    assert sum(a.endswith(",,") for a in args) == faults.count("bad_args")
    transport = sum(k in ("429", "500", "garbage") for k in faults)
    assert sum(not r["ok"] for r in records) == transport


def test_fault_injector_timeout_and_bad_json() -> None:
    inj = fault_injector(lambda body, n: structured(LABEL), rate=1.0, seed=0, kinds=("timeout", "bad_json"),
                         timeout_delay_s=1.0, max_consecutive=1)
    with FakeOpenAI(inj) as srv, client(srv, timeout_s=0.3, max_retries=1) as llm:
        obj, _ = llm.structured(list(USER), FeatureLabel, purpose="label")
    assert obj.feature_id == 7 and inj.log[1][1] is None  # max_consecutive=1: every other request is clean
    assert {k for _, k in inj.log[::2]} <= {"timeout", "bad_json"} and len(srv.requests) == len(inj.log)


def test_assistant_turn_rebuilds_from_a_completion_dict() -> None:
    data = {"choices": [{"finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None,
        "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]}}]}
    turn = AssistantTurn.from_completion(data)
    assert turn.tool_calls[0].id == "call_0" and turn.tool_calls[0].arguments == '{"a": 1}'
    assert turn.usage == Usage() and turn.as_message()["tool_calls"][0]["id"] == "call_0"


def test_a_corrupt_cache_entry_is_a_miss() -> None:
    cache = DictCache()
    with FakeOpenAI() as srv, client(srv, cache=cache) as llm:
        key = llm.chat_tools(list(USER), [], purpose="p").request_hash
        cache.put(key, {"junk": True})
        turn = llm.chat_tools(list(USER), [], purpose="p")
    assert not turn.cached and len(srv.requests) == 2 and cache.get(key)["choices"]


# ============================================================================= real servers' quirks (issue 18)
def test_llama_cpp_json_schema_500_steps_down_to_json_object_with_schema_without_retrying(records) -> None:
    """llama-cpp-python answers ``json_schema`` with HTTP 500 naming response_format: a step down (to its
    ``{"type": "json_object", "schema": …}`` extension), not five retries and LLMUnavailable."""
    with FakeOpenAI(lambda body, n: structured(LABEL), profile="llama-cpp") as srv, client(srv, records) as llm:
        obj, _ = llm.structured(list(USER), FeatureLabel, purpose="label")
        llm.structured(list(USER), FeatureLabel, purpose="label")  # remembered
    assert obj == FeatureLabel(**LABEL) and llm.structured_mode == "json"
    fmts = [b["response_format"] for b in srv.bodies]
    assert [f["type"] for f in fmts] == ["json_schema", "json_object", "json_object"]
    assert fmts[1]["schema"] == FeatureLabel.model_json_schema()  # the schema travels: the server's grammar
    assert [(r["mode"], r["ok"], r["status_code"], r["retry_in_s"]) for r in records] == [
        ("strict", False, 500, None), ("json", True, 200, None), ("json", True, 200, None)]
    assert llm.profile.steps and "response_format" in llm.profile.steps[0]
    assert all(b["max_tokens"] == 1024 for b in srv.bodies)  # always a cap (llama.cpp ignores the other name)


def test_json_object_rejection_skips_the_json_mode_rungs() -> None:
    with FakeOpenAI(lambda body, n: structured(LABEL), reject_strict=True, reject_json_object=True) as srv, \
            client(srv) as llm:
        llm.structured(list(USER), FeatureLabel, purpose="label")
    assert [(b.get("response_format") or {}).get("type") for b in srv.bodies] == ["json_schema", "json_object", None]
    assert llm.structured_mode == "plain"


def test_tool_choice_auto_is_sent_and_tool_turns_carry_empty_content(records) -> None:
    """llama-cpp-python treats a missing tool_choice as "none" (no tool is ever called) and answers 500 to an
    assistant message with ``content: null``: we send "auto" and ""."""
    script = sequence(tool_calls(call("ablate_feature", {"feature_id": 3, "layer": 0})), text("done"), text("done"))
    tools = [ABLATE.openai_schema()]
    with FakeOpenAI(script, profile="llama-cpp") as srv, client(srv, records) as llm:
        turn = llm.chat_tools(list(USER), tools, purpose="plan")
        assert [t.name for t in turn.tool_calls] == ["ablate_feature"]  # the server showed the tools
        msg = turn.as_message()
        assert msg["content"] == "" and msg["tool_calls"]
        history = [*USER, msg, {"role": "tool", "tool_call_id": turn.tool_calls[0].id, "content": "ok"}]
        assert llm.chat_tools(history, tools, purpose="plan").content == "done"
        # a history checkpointed with null content (an older version) is sent with "" too
        old = [*USER, {**msg, "content": None}, history[-1]]
        assert llm.chat_tools(old, tools, purpose="plan").content == "done"
    assert all(b["tool_choice"] == "auto" for b in srv.bodies)
    assert srv.bodies[1]["messages"][2]["content"] == "" and srv.bodies[2]["messages"][2]["content"] == ""
    assert all(r["ok"] for r in records)


def test_max_tokens_is_always_sent_and_the_timeout_fits_it() -> None:
    assert LLMConfig(model="m", api_key=KEY).timeout == pytest.approx(20 + 102.4)
    assert LLMConfig(model="m", api_key=KEY, max_tokens=100).timeout == pytest.approx(30.0)
    assert LLMConfig(model="m", api_key=KEY, max_tokens=100, timeout_s=7).timeout == 7
    with FakeOpenAI() as srv, client(srv, max_tokens=64) as llm:
        llm.chat_tools(list(USER), [], purpose="p")
    assert srv.bodies[0]["max_tokens"] == 64 and "max_completion_tokens" not in srv.bodies[0]


def test_timeouts_are_retried_at_most_once(records) -> None:
    """A timed-out request keeps the server busy: retrying it again and again queues generation after generation.
    Timeouts get ``max_timeout_retries`` (1) retries, whatever ``max_retries`` allows."""
    slow = delay(2.0, text("late"))
    with (
        FakeOpenAI(sequence(slow, slow, text("ok"))) as srv,
        client(srv, records, timeout_s=0.4, max_retries=4) as llm,
        pytest.raises(LLMUnavailable, match="timeouts are retried at most") as err,
    ):
        llm.chat_tools(list(USER), [], purpose="p")
    assert len(srv.requests) == 2 and err.value.attempts == 2
    assert [(r["error_type"], r["status_code"]) for r in records] == [("APITimeoutError", None)] * 2
    assert records[0]["retry_in_s"] is not None and records[1]["retry_in_s"] is None


@pytest.mark.parametrize("profile", ["ollama-no-tools", "vllm-no-tool-parser"])
def test_a_server_without_native_tools_gets_tool_calls_as_json(records, profile) -> None:
    """Ollama with a model without tools ("… does not support tools") and vLLM without a tool parser ('"auto"
    tool choice requires …') refuse native tool calling: the turn is asked for as schema-constrained JSON, and
    the endpoint is remembered as such."""
    from fake_openai import JsonToolsModel

    model = JsonToolsModel(sequence(tool_calls(call("ablate_feature", {"feature_id": 3, "layer": 0})),
                                    text("Feature 3 matters.")))
    tools = [ABLATE.openai_schema()]
    with FakeOpenAI(model, profile=profile) as srv, client(srv, records) as llm:
        turn = llm.chat_tools(list(USER), tools, purpose="plan")
        assert llm.tools_mode == "json" and turn.finish_reason == "tool_calls"
        assert [(t.name, json.loads(t.arguments)) for t in turn.tool_calls] == [
            ("ablate_feature", {"feature_id": 3, "layer": 0})]
        history = [*USER, turn.as_message(),
                   {"role": "tool", "tool_call_id": turn.tool_calls[0].id, "content": "ablated: logit -2.1"}]
        final = llm.chat_tools(history, tools, purpose="plan")
    assert final.content == "Feature 3 matters." and final.tool_calls == []
    assert model.json_turns == 2
    assert [(r["mode"], r["ok"], r["status_code"]) for r in records] == [
        ("tools", False, 400), ("tools-json", True, 200), ("tools-json", True, 200)]
    sent = srv.bodies[1]
    assert "tools" not in sent and sent["response_format"]["type"] == "json_object"
    assert sent["response_format"]["schema"]["properties"]["tool_calls"]["items"]["anyOf"][0]["properties"][
        "name"] == {"type": "string", "enum": ["ablate_feature"]}
    last = srv.bodies[2]["messages"]
    assert [m["role"] for m in last] == ["system", "user", "assistant", "user"]  # plain turns, no tool role
    assert "Result of tool call" in last[3]["content"] and "ablated" in last[3]["content"]


def test_clients_sharing_adaptations_share_what_was_learned() -> None:
    from autoexplain.agent.llm import Adaptations

    shared = Adaptations()
    with FakeOpenAI(lambda body, n: structured(LABEL), profile="llama-cpp") as srv:
        cfg = LLMConfig(model="fake-model", base_url=srv.base_url, api_key=KEY, timeout_s=5)
        with LLMClient(cfg, adaptations=shared) as policy, LLMClient(cfg, adaptations=shared) as judge:
            policy.structured(list(USER), FeatureLabel, purpose="explain")
            judge.structured(list(USER), FeatureLabel, purpose="judge")
    assert [b["response_format"]["type"] for b in srv.bodies] == ["json_schema", "json_object", "json_object"]


@pytest.mark.parametrize("echo", ["masked", "ellipsis"])
def test_a_masked_echo_of_the_key_is_redacted(records, echo) -> None:
    """OpenAI's 401 quotes the key masked ("sk-test-****…cdef"); other servers cut it ("sk-test-SECRET-0…abcdef").
    No fragment of the key may be stored or printed."""
    with (
        FakeOpenAI(api_key="sk-the-right-key", key_echo=echo) as srv,
        client(srv, records) as llm,
        pytest.raises(LLMConfigError, match="OPENAI_API_KEY") as err,
    ):
        llm.chat_tools(list(USER), [], purpose="p")
    assert srv.requests[0].headers["authorization"] == f"Bearer {KEY}"
    shown = str(err.value) + json.dumps(records)
    assert "Incorrect API key provided: [REDACTED]" in shown
    for fragment in (KEY[:8], KEY[-4:], KEY[:16], KEY[-6:]):
        assert fragment not in shown, fragment


def test_redact_removes_fragments_of_a_key() -> None:
    key = "sk-test-SECRETMASTER-123"
    cases = {"Incorrect API key provided: sk-test-SECRETMA…ER-123. See": "Incorrect API key provided: [REDACTED] See",
             "key sk-test-****************-123 bad": "key [REDACTED] bad",
             "middle SECRETMASTER here": "middle [REDACTED] here",
             "prefix 'sk-test-SEC'": "prefix '[REDACTED]'",
             "plain words -123 and sk- stay": "plain words -123 and sk- stay"}
    for text_, want in cases.items():
        assert redact(text_, [key]) == want
