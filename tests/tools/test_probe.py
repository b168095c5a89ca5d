"""Feature probes (read, ablate, steer) against the planted model, whose SAE features fire on known tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autoexplain.tools.errors import InputError
from autoexplain.tools.registry import SUMMARY_MAX_CHARS, ToolContext, default_registry

TEXTS = ["the cat sat on the mat", "Mary and John went to the store , John gave a drink to Mary",
         "red green blue fox owl", "the dog"]


@pytest.fixture(scope="module")
def lm(planted):
    from autoexplain.tools.models import load_model

    return load_model(str(planted.model_dir), device="cpu")


@pytest.fixture(scope="module")
def sae(planted, lm):
    from autoexplain.tools.saes import load_sae

    return load_sae(str(planted.sae_dir), lm)


@pytest.fixture(scope="module")
def ctx(lm, sae) -> ToolContext:
    return ToolContext(model=lm, saes={sae.sae_id: sae})


@pytest.fixture(scope="module")
def reg():
    return default_registry()


def _ids(lm, text: str) -> list[int]:
    return lm.to_tokens(text)[0].tolist()


# ----------------------------------------------------------------------------- feature_activations
def test_activations_are_exactly_the_planted_ones(planted, lm, sae, ctx, reg) -> None:
    features = list(range(sae.d_sae))
    out = reg.call(ctx, "feature_activations", {"sae_id": sae.sae_id, "features": features, "texts": TEXTS})
    assert [it.text for it in out.items] == TEXTS
    for item in out.items:
        ids = _ids(lm, item.text)
        assert len(item.tokens) == len(ids)  # real length: no padding reported
        for trace in item.features:
            planted_ids = planted.token_ids.get(trace.feature, [])
            expected = [planted.strengths[t] if t in planted_ids else 0.0 for t in ids]
            assert trace.activations == pytest.approx(expected, abs=1e-4), (item.text, trace.feature)
            assert trace.max == pytest.approx(max(expected), abs=1e-4)
            if trace.feature in planted.dead or max(expected) == 0:
                assert trace.argmax_token is None and set(trace.activations) == {0.0}
            else:
                assert ids[trace.argmax_position] in planted_ids
                assert trace.argmax_token == item.tokens[trace.argmax_position]
    cat = out.items[0].features[0]
    assert cat.argmax_token == " cat" and cat.max == pytest.approx(1.0)
    assert "f0: max 1.00 at ' cat'; fires on ' cat'(1.00)" in out.summary_text()
    assert "silent: f1 f2 f3" in out.summary_text()


def test_padding_is_not_reported(sae, ctx, reg) -> None:
    short, long = "the dog", "Mary and John went to the store , John gave a drink to Mary"
    both = reg.call(ctx, "feature_activations", {"sae_id": sae.sae_id, "features": [2, 4], "texts": [short, long]})
    alone = reg.call(ctx, "feature_activations", {"sae_id": sae.sae_id, "features": [2, 4], "texts": [short]})
    assert len(both.items[0].tokens) == 3 < len(both.items[1].tokens)
    assert both.items[0] == alone.items[0]  # batching with a longer text changes nothing
    no_bos = reg.call(ctx, "feature_activations", {"sae_id": sae.sae_id, "features": [4], "texts": [short],
                                                   "prepend_bos": False})
    assert no_bos.items[0].tokens == ["the", " dog"]


# ----------------------------------------------------------------------------- ablate_feature
def test_ablating_a_dead_feature_changes_nothing(planted, sae, ctx, reg) -> None:
    out = reg.call(ctx, "ablate_feature", {"sae_id": sae.sae_id, "features": list(planted.dead), "texts": TEXTS})
    for e in out.items:
        assert set(e.kl_per_position) == {0.0} and e.kl_max == 0 and e.kl_max_position is None
        assert abs(e.delta_loss) <= 1e-6 and e.rose == [] and e.fell == []
    assert out.summary_text().count("no change") == len(TEXTS)


def test_ablating_a_live_feature_acts_from_its_token_on(lm, sae, ctx, reg) -> None:
    text = "the cat sat on the mat"
    pos = _ids(lm, text).index(lm.tokenizer(" cat", add_special_tokens=False)["input_ids"][0])
    out = reg.call(ctx, "ablate_feature", {"sae_id": sae.sae_id, "features": [0], "texts": [text, "red green blue"]})
    cat, colours = out.items
    assert pos == 2 and cat.kl_per_position[:pos] == [0.0] * pos  # causal attention: exactly nothing before
    assert all(k > 0 for k in cat.kl_per_position[pos:])
    assert cat.kl_max_position is not None and cat.kl_max_position >= pos and cat.delta_loss != 0
    assert cat.rose and cat.fell and all(s.delta > 0 for s in cat.rose) and all(s.delta < 0 for s in cat.fell)
    assert set(colours.kl_per_position) == {0.0} and colours.delta_loss == 0  # feature 0 never fires there


def test_unedited_splice_is_the_clean_model(lm, sae) -> None:
    from autoexplain.tools.probe import _spliced_logits

    tokens = lm.to_tokens(TEXTS)
    with torch.no_grad():
        clean = lm.model(tokens)
    spliced = _spliced_logits(lm, sae, tokens, None)
    assert torch.allclose(clean, spliced, atol=1e-5)
    assert not lm.model.acts_to_saes  # the splice is undone afterwards


# ----------------------------------------------------------------------------- steer_feature
def test_steering(planted, sae, ctx, reg) -> None:
    def steer(**kw):
        return reg.call(ctx, "steer_feature", {"sae_id": sae.sae_id, "texts": TEXTS, **kw}).items

    for e in steer(feature=0, scale=0.0) + steer(feature=planted.dead[0], scale=0.0, mode="clamp"):
        assert set(e.kl_per_position) == {0.0} and abs(e.delta_loss) <= 1e-6 and not e.rose and not e.fell
    pushed = steer(feature=1, scale=5.0)
    assert all(k > 0 for e in pushed for k in e.kl_per_position)  # added at every position, BOS included
    assert all(e.rose and e.fell and e.shifts_at == "mean over positions" for e in pushed)
    # clamping a feature to 0 is ablating it: same KL and loss, through a different tool
    clamped = steer(feature=0, scale=0.0, mode="clamp")
    ablated = reg.call(ctx, "ablate_feature", {"sae_id": sae.sae_id, "features": [0], "texts": TEXTS}).items
    assert [e.kl_per_position for e in clamped] == [e.kl_per_position for e in ablated]
    assert [e.delta_loss for e in clamped] == [e.delta_loss for e in ablated]
    assert steer(feature=1, scale=5.0) == pushed  # deterministic


# ----------------------------------------------------------------------------- validation and bounds
def test_bad_calls_are_actionable(sae, lm, ctx, reg) -> None:
    ok = {"sae_id": sae.sae_id, "features": [0], "texts": ["the cat"]}
    with pytest.raises(InputError, match=rf"unknown sae_id 'nope'.*loaded SAEs are {sae.sae_id}"):
        reg.call(ctx, "feature_activations", {**ok, "sae_id": "nope"})
    with pytest.raises(InputError, match="no SAE is loaded"):
        reg.call(ToolContext(model=lm), "ablate_feature", ok)
    with pytest.raises(InputError, match=r"feature 8 is out of range .*0\.\.7 \(d_sae 8\)"):
        reg.call(ctx, "ablate_feature", {**ok, "features": [0, 8]})
    with pytest.raises(InputError, match=r"feature 99 is out of range"):
        reg.call(ctx, "steer_feature", {"sae_id": sae.sae_id, "feature": 99, "scale": 1.0, "texts": ["a"]})
    with pytest.raises(InputError, match="texts.*at least 1"):
        reg.call(ctx, "feature_activations", {**ok, "texts": []})
    with pytest.raises(InputError, match=r"texts\.0.*at least 1 character"):
        reg.call(ctx, "ablate_feature", {**ok, "texts": [""]})
    with pytest.raises(InputError, match="features.*at most 64"):
        reg.call(ctx, "feature_activations", {**ok, "features": list(range(65))})
    with pytest.raises(InputError, match="duplicate feature indices"):
        reg.call(ctx, "feature_activations", {**ok, "features": [1, 1]})
    with pytest.raises(InputError, match="Extra inputs"):
        reg.call(ctx, "steer_feature", {"sae_id": sae.sae_id, "feature": 0, "scale": 1.0, "texts": ["a"],
                                        "layer": 3})
    with pytest.raises(InputError, match="mode"):
        reg.call(ctx, "steer_feature", {"sae_id": sae.sae_id, "feature": 0, "scale": 1.0, "texts": ["a"],
                                        "mode": "multiply"})


@pytest.fixture(scope="module")
def wide_ctx(tmp_path_factory: pytest.TempPathFactory, lm) -> ToolContext:
    """A randomly initialised 64-feature SAE at resid_pre.0, for the 64 x 64 summary bound."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from autoexplain.tools.saes import load_sae

    torch.manual_seed(0)
    wide = StandardSAE(StandardSAEConfig(d_in=lm.d_model, d_sae=64,
                                         metadata=SAEMetadata(hook_name="blocks.0.hook_resid_pre")))
    path = Path(tmp_path_factory.mktemp("wide-sae"))
    wide.save_model(str(path))
    loaded = load_sae(str(path), lm)
    return ToolContext(model=lm, saes={loaded.sae_id: loaded})


def test_summaries_are_bounded(wide_ctx, reg) -> None:
    (sae_id,) = wide_ctx.saes
    texts = [f"{t} {i}" for i in range(16) for t in TEXTS]
    feats = {"sae_id": sae_id, "features": list(range(64)), "texts": texts}
    outs = [reg.call(wide_ctx, "feature_activations", feats), reg.call(wide_ctx, "ablate_feature", feats),
            reg.call(wide_ctx, "steer_feature", {"sae_id": sae_id, "feature": 3, "scale": 4.0, "texts": texts})]
    for out in outs:
        text = out.summary_text()
        assert len(text) <= SUMMARY_MAX_CHARS and "more texts" in text and len(out.items) == 64
    assert any(a > 0 for it in outs[0].items for tr in it.features for a in tr.activations)


def test_texts_longer_than_the_context_are_refused_not_cut(planted) -> None:
    from autoexplain.tools.errors import InputError
    from autoexplain.tools.models import load_model
    from autoexplain.tools.registry import ToolContext, default_registry
    from autoexplain.tools.saes import load_sae

    lm = load_model(str(planted.model_dir), device="cpu")
    sae = load_sae(str(planted.sae_dir), lm)
    ctx = ToolContext(model=lm, saes={sae.sae_id: sae})
    with pytest.raises(InputError, match="context is 32"):
        default_registry().call(ctx, "feature_activations",
                                {"sae_id": sae.sae_id, "features": [0], "texts": ["the cat sat on the mat " * 10]})
