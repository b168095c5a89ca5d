"""The tool registry: typed inputs/outputs, bounded summaries, refusals an LLM can act on."""

from __future__ import annotations

import pytest

from autoexplain.tools.errors import InputError
from autoexplain.tools.registry import SUMMARY_MAX_CHARS, ToolContext, default_registry


def test_catalogue_has_schemas() -> None:
    reg = default_registry()
    names = [t.name for t in reg]
    assert names == sorted(names) and {"model_info", "tokenize"} <= set(names)
    for t in reg:
        schema = t.openai_schema()
        assert schema["function"]["name"] == t.name and schema["function"]["parameters"]["type"] == "object"
        assert len(t.description) > 40
    with pytest.raises(ValueError, match="already registered"):
        reg.register(reg.get("tokenize"))


def test_calls_and_summaries(tiny_model) -> None:
    reg = default_registry()
    ctx = ToolContext(model=tiny_model)
    info = reg.call(ctx, "model_info", {})
    assert info.n_layers == 2 and "resid_post.1" in info.sites and "head_out.1.3" in info.sites
    out = reg.call(ctx, "tokenize", '{"texts": ["Mary and John", "the cat"]}')
    assert out.items[0].tokens == ["<|endoftext|>", "Mary", " and", " John"]
    assert out.items[0].ids[0] == tiny_model.tokenizer.bos_token_id
    long = reg.call(ctx, "tokenize", {"texts": ["the cat sat on the mat " * 20] * 64})
    assert len(long.summary()) <= SUMMARY_MAX_CHARS and "more texts" in long.summary()


def test_bad_calls_are_actionable(tiny_model) -> None:
    reg = default_registry()
    ctx = ToolContext(model=tiny_model)
    with pytest.raises(InputError, match="unknown tool 'drop_table'.*model_info"):
        reg.call(ctx, "drop_table", {})
    with pytest.raises(InputError, match="texts.*at least 1"):
        reg.call(ctx, "tokenize", {"texts": []})
    with pytest.raises(InputError, match="bad arguments for tokenize"):
        reg.call(ctx, "tokenize", "{not json")
    with pytest.raises(InputError, match="Extra inputs"):
        reg.call(ctx, "model_info", {"layer": 3})


def test_every_tool_declares_its_causal_level():
    """Explanations derive their supported level from the tools they cite: each tool states its rung, typed."""
    from autoexplain.tools.registry import default_registry
    from autoexplain.tools.vocab import CausalLevel

    levels = {s.name: s.level for s in default_registry()}
    assert all(v is None or isinstance(v, CausalLevel) for v in levels.values())
    assert levels["model_info"] is None
    assert levels["feature_activations"] is CausalLevel.ASSOCIATION
    for name in ("activation_patching", "edge_patching", "circuit_search", "ablate_feature", "steer_feature"):
        assert levels[name] is CausalLevel.INTERVENTION, name
