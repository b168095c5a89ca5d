"""Logit lens and direct logit attribution: parity with TransformerLens, exact sums, a planted dominant head."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from autoexplain.tools.errors import InputError
from autoexplain.tools.lens import DLAIn, LogitLensIn, direct_logit_attribution, logit_lens
from autoexplain.tools.models import hook_name
from autoexplain.tools.registry import SUMMARY_MAX_CHARS, ToolContext, default_registry
from autoexplain.tools.vocab import Site, SiteKind

TEXTS = ["John gave a drink to", "the cat sat on the mat and the dog ran to the", "Mary"]


def _copy(lm):
    """The same LoadedModel with an independent deep copy of the weights (the session fixture stays untouched)."""
    return dataclasses.replace(lm, model=copy.deepcopy(lm.model))


def _tl_lens_probs(lm, text: str) -> torch.Tensor:
    """Reference: TransformerLens' own logit lens on one unpadded text, probabilities [n_layers + 1, pos, vocab]."""
    with torch.no_grad():
        _, cache = lm.model.run_with_cache(lm.to_tokens(text))
        acc = cache.accumulated_resid(layer=None, apply_ln=True, incl_mid=False)  # [layers+1, 1, pos, d]
        return torch.softmax(lm.model.unembed(acc[:, 0]), dim=-1)


def _real_logits(lm, text: str) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(lm.to_tokens(text))[0]  # [pos, vocab]


def _tok(lm, s: str) -> int:
    (i,) = lm.tokenizer(s, add_special_tokens=False)["input_ids"]
    return i


# ----------------------------------------------------------------------------- logit lens
def test_logit_lens_matches_transformer_lens(tiny_model) -> None:
    out = logit_lens(ToolContext(model=tiny_model), LogitLensIn(texts=TEXTS, targets=[" Mary", " John"],
                                                                positions=[-1, 1, 0], top_k=7))
    assert out.sites == ["resid_pre.0", "resid_pre.1", "resid_post.1"]
    assert len(out.readings) == 3 * len(TEXTS)
    for r in out.readings:
        ref = _tl_lens_probs(tiny_model, TEXTS[r.text_index])
        ids = tiny_model.to_tokens(TEXTS[r.text_index])[0]
        assert r.token == tiny_model.tokenizer.decode([int(ids[r.position])])
        assert len(r.layers) == ref.shape[0]
        for li, layer in enumerate(r.layers):
            p = ref[li, r.position]
            top_ids = [t.id for t in layer.top]
            got = torch.tensor([t.prob for t in layer.top])
            assert (got - p[top_ids]).abs().max() <= 1e-4
            # the listed tokens are the top 7: nothing outside them beats the 7th
            rest = p.clone()
            rest[top_ids] = -1
            assert rest.max() <= got.min() + 1e-4
            assert got.tolist() == sorted(got.tolist(), reverse=True)
            for t in layer.targets:
                assert abs(t.prob - float(p[t.id])) <= 1e-4
                assert t.rank == int((p > p[t.id]).sum())
            assert [t.token for t in layer.targets] == [" Mary", " John"]


def test_last_lens_layer_is_the_model_prediction(tiny_model) -> None:
    out = logit_lens(ToolContext(model=tiny_model), LogitLensIn(texts=TEXTS, targets=[" Mary"]))
    for r in out.readings:
        assert r.position == len(tiny_model.to_tokens(TEXTS[r.text_index])[0]) - 1  # default: last real token
        real = torch.softmax(_real_logits(tiny_model, TEXTS[r.text_index])[r.position], dim=-1)
        last = r.layers[-1]
        assert [t.id for t in last.top] == [t.id for t in r.prediction]
        for lens_t, pred_t in zip(last.top, r.prediction, strict=True):
            assert abs(lens_t.prob - pred_t.prob) <= 1e-5
            assert abs(pred_t.prob - float(real[pred_t.id])) <= 1e-5
        assert last.targets[0].rank == r.prediction_targets[0].rank


def test_logit_lens_without_bos(tiny_model) -> None:
    out = logit_lens(ToolContext(model=tiny_model),
                     LogitLensIn(texts=["Mary and John"], positions=[0], prepend_bos=False, top_k=1))
    assert out.readings[0].token == "Mary" and out.readings[0].position == 0


# ----------------------------------------------------------------------------- DLA
def _perturbed(lm):
    """A copy whose final-LN weight/bias, attention output biases and unembedding bias are all non-trivial, so
    every bias entry of the decomposition is exercised."""
    lm = _copy(lm)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        m = lm.model
        m.ln_final.w.copy_(1 + 0.5 * torch.randn(m.ln_final.w.shape, generator=g))
        m.ln_final.b.copy_(0.3 * torch.randn(m.ln_final.b.shape, generator=g))
        m.unembed.b_U.copy_(0.5 * torch.randn(m.unembed.b_U.shape, generator=g))
        for block in m.blocks:
            block.attn.b_O.copy_(0.5 * torch.randn(block.attn.b_O.shape, generator=g))
    return lm


@pytest.mark.parametrize("baseline", [None, " John"])
def test_dla_entries_sum_to_the_real_logit(tiny_model, baseline) -> None:
    lm = _perturbed(tiny_model)
    ctx = ToolContext(model=lm)
    t = _tok(lm, " Mary")
    b = _tok(lm, " John") if baseline else None
    real = []
    for text in TEXTS:
        logits = _real_logits(lm, text)[-1]
        want = float(logits[t] - (logits[b] if b is not None else 0.0))
        real.append(want)
        out = direct_logit_attribution(ctx, DLAIn(texts=[text], target=" Mary", baseline=baseline))
        assert abs(sum(out.contributions.values()) - want) <= 1e-3
        assert abs(out.total - want) <= 1e-4 and out.residual_error <= 1e-3
        heads = [f"a{L}.{H}" for L in range(2) for H in range(4)]
        biases = ["a0.bias", "a1.bias", "ln_final.bias", "unembed.bias"]
        assert set(out.contributions) == {"embed", "m0", "m1", *heads, *biases}
        assert all(abs(out.contributions[k]) > 1e-4 for k in biases)  # the perturbed biases really count
    # batched: texts of different lengths, right-padded in one forward pass, give the same per-text totals
    out = direct_logit_attribution(ctx, DLAIn(texts=TEXTS, target=" Mary", baseline=baseline))
    assert [abs(it.total - r) <= 1e-4 for it, r in zip(out.items, real, strict=True)] == [True] * len(TEXTS)
    assert abs(out.total - sum(real) / len(real)) <= 1e-4
    assert abs(sum(out.contributions.values()) - out.total) <= 1e-3
    assert all(it.residual_error <= 1e-3 for it in out.items)


def test_dla_heads_match_transformer_lens(tiny_model) -> None:
    """Per-head entries equal TL's stack_head_results with its cached final-LN scale (LN weight 1, bias 0 here)."""
    assert torch.allclose(tiny_model.model.ln_final.w, torch.ones(1)) and not tiny_model.model.ln_final.b.any()
    text = TEXTS[1]
    out = direct_logit_attribution(ToolContext(model=tiny_model), DLAIn(texts=[text], target=" park"))
    with torch.no_grad():
        _, cache = tiny_model.model.run_with_cache(tiny_model.to_tokens(text))
        stack = cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True)  # [heads, 1, d_model]
        ref = (stack[:, 0] @ tiny_model.model.W_U[:, _tok(tiny_model, " park")]).tolist()
    got = [out.contributions[f"a{L}.{H}"] for L in range(2) for H in range(4)]
    assert max(abs(a - b) for a, b in zip(got, ref, strict=True)) <= 1e-4


def _plant_head(lm, layer: int, head: int, token: int, strength: float) -> None:
    """Make head ``layer.head`` write ``strength`` times the unit unembedding direction of ``token`` at every
    position, whatever it attends to: its values are the constant one-hot e_0 (W_V = 0, b_V = e_0, and attention
    weights sum to 1), and W_O maps e_0 to that direction."""
    attn = lm.model.blocks[layer].attn
    direction = lm.model.W_U[:, token] / lm.model.W_U[:, token].norm()
    with torch.no_grad():
        attn.W_V[head].zero_()
        attn.b_V[head].zero_()
        attn.b_V[head, 0] = 1.0
        attn.W_O[head].zero_()
        attn.W_O[head, 0] = strength * direction


def test_dla_finds_a_planted_head(tiny_model) -> None:
    lm = _copy(tiny_model)
    _plant_head(lm, 1, 2, _tok(lm, " park"), strength=20.0)
    ctx = ToolContext(model=lm)
    for baseline in (None, " store"):
        out = direct_logit_attribution(ctx, DLAIn(texts=TEXTS, target=" park", baseline=baseline))
        ranked = sorted(out.contributions, key=lambda k: -abs(out.contributions[k]))
        assert ranked[0] == "a1.2" and out.contributions["a1.2"] > 0, ranked[:3]
        assert abs(out.contributions["a1.2"]) > 5 * abs(out.contributions[ranked[1]])
        assert out.residual_error <= 1e-3
        assert out.summary_text().split("\n")[1].startswith("top 10 by |direct contribution|: a1.2 +")


# ----------------------------------------------------------------------------- validation and summaries
def test_bad_inputs_are_refused(tiny_model) -> None:
    reg = default_registry()
    ctx = ToolContext(model=tiny_model)
    with pytest.raises(InputError, match=r"target ' elephant' tokenises to \d+ tokens"):
        reg.call(ctx, "logit_lens", {"texts": ["the cat"], "targets": [" Mary", " elephant"]})
    with pytest.raises(InputError, match=r"baseline ' elephant' tokenises to \d+ tokens"):
        reg.call(ctx, "direct_logit_attribution", {"texts": ["the cat"], "target": " Mary", "baseline": " elephant"})
    with pytest.raises(InputError, match=r"position 5 is out of range for text 1 .*3 tokens.*-3\.\.2"):
        reg.call(ctx, "logit_lens", {"texts": ["the cat sat on the mat", "the cat"], "positions": [5]})
    with pytest.raises(InputError, match="position -9 is out of range"):
        reg.call(ctx, "direct_logit_attribution", {"texts": ["the cat"], "target": " Mary", "position": -9})
    with pytest.raises(InputError, match="texts.*at least 1"):
        reg.call(ctx, "logit_lens", {"texts": []})
    with pytest.raises(InputError, match="texts.*at least 1"):
        reg.call(ctx, "direct_logit_attribution", {"texts": [], "target": " Mary"})
    with pytest.raises(InputError, match="is the target itself"):
        reg.call(ctx, "direct_logit_attribution", {"texts": ["a"], "target": " Mary", "baseline": " Mary"})
    with pytest.raises(InputError, match="top_k"):
        reg.call(ctx, "logit_lens", {"texts": ["a"], "top_k": 0})
    with pytest.raises(InputError, match="Extra inputs"):
        reg.call(ctx, "direct_logit_attribution", {"texts": ["a"], "target": " Mary", "layer": 1})


def test_dla_restores_attn_result_flag(tiny_model, monkeypatch: pytest.MonkeyPatch) -> None:
    assert tiny_model.model.cfg.use_attn_result is False
    direct_logit_attribution(ToolContext(model=tiny_model), DLAIn(texts=["the cat"], target=" sat"))
    assert tiny_model.model.cfg.use_attn_result is False
    # the flag is restored when the forward pass itself fails (the flag is on at that moment)
    seen = []

    def broken(*args, **kwargs):
        seen.append(tiny_model.model.cfg.use_attn_result)
        raise RuntimeError("forward failed")

    monkeypatch.setattr(tiny_model.model, "run_with_hooks", broken)
    with pytest.raises(RuntimeError, match="forward failed"):
        direct_logit_attribution(ToolContext(model=tiny_model), DLAIn(texts=["the cat"], target=" sat"))
    assert seen == [True] and tiny_model.model.cfg.use_attn_result is False


def test_summaries_are_bounded(tiny_model) -> None:
    reg = default_registry()
    ctx = ToolContext(model=tiny_model)
    texts = [f"the cat sat on the mat and {w} ran to the" for w in ("the dog", "Mary", "John", "the fox")] * 8
    lens = reg.call(ctx, "logit_lens", {"texts": texts, "targets": [" park", " store", " Mary", " John"],
                                        "positions": [-1, -2, 3], "top_k": 20})
    text = lens.summary_text()
    assert len(text) <= SUMMARY_MAX_CHARS and "more text/position readings" in text
    assert "resid_post.1" in text and "association-level" in text
    dla = reg.call(ctx, "direct_logit_attribution", {"texts": texts, "target": " park", "baseline": " store",
                                                     "top_n": 50})
    text = dla.summary_text()
    assert len(text) <= SUMMARY_MAX_CHARS and "(+24 more)" in text and "Direct effects only" in text
    top = max(dla.contributions, key=lambda k: abs(dla.contributions[k]))
    assert top in text.split("\n")[1].split(",")[0]


def test_registered_with_forward_cost(tiny_model) -> None:
    reg = default_registry()
    for name in ("logit_lens", "direct_logit_attribution"):
        spec = reg.get(name)
        assert spec.cost == "forward" and "association" in spec.description
    assert hook_name(Site(kind=SiteKind.RESID_PRE, layer=0)) == "blocks.0.hook_resid_pre"  # the lens' first row


def test_logit_lens_sees_a_planted_head_write(tiny_model) -> None:
    """Known answer for the lens: a layer-1 head that writes ' park' makes ' park' the top token after layer 1,
    while the residual before it (resid_pre.1) is unchanged by the plant."""
    lm = _copy(tiny_model)
    park = _tok(lm, " park")
    before = logit_lens(ToolContext(model=lm), LogitLensIn(texts=TEXTS, targets=[" park"]))
    _plant_head(lm, 1, 2, park, strength=20.0)
    after = logit_lens(ToolContext(model=lm), LogitLensIn(texts=TEXTS, targets=[" park"]))
    for b, a in zip(before.readings, after.readings, strict=True):
        assert a.layers[1].targets[0].rank == b.layers[1].targets[0].rank  # resid_pre.1: before the head
        assert a.layers[2].targets[0].rank == 0 and a.layers[2].top[0].token == " park"
        assert a.prediction[0].id == park


def _attn_only_rms(tokenizer):
    """An attention-only model with RMSNorm (no centring, no LN bias) built straight in TransformerLens."""
    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformerConfig

    from autoexplain.tools.models import LoadedModel

    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_ctx=32, d_head=8, n_heads=4, attn_only=True,
                                  d_vocab=len(tokenizer), act_fn=None, normalization_type="RMS", seed=0)
    model = HookedSAETransformer(cfg, tokenizer=tokenizer)
    model.eval()
    return LoadedModel(spec="attn-only-rms", model_id="attn-only-rms", model=model, tokenizer=tokenizer,
                       device=torch.device("cpu"))


@pytest.mark.parametrize("arch", ["neox", "attn_only_rms"])
def test_dla_sums_on_other_architectures(arch, tiny_neox_dir, tiny_model) -> None:
    """Parallel attention + MLP with rotary positions (GPT-NeoX), and RMSNorm without MLPs: the sums still hold."""
    from autoexplain.tools.models import load_model

    lm = _copy(load_model(str(tiny_neox_dir), device="cpu")) if arch == "neox" else _attn_only_rms(
        tiny_model.tokenizer)
    if arch == "neox":
        with torch.no_grad():
            lm.model.ln_final.b.normal_(generator=torch.Generator().manual_seed(2))
    out = direct_logit_attribution(ToolContext(model=lm), DLAIn(texts=TEXTS, target=" Mary", baseline=" John"))
    t, b = _tok(lm, " Mary"), _tok(lm, " John")
    for item, text in zip(out.items, TEXTS, strict=True):
        logits = _real_logits(lm, text)[-1]
        assert abs(item.total - float(logits[t] - logits[b])) <= 1e-4 and item.residual_error <= 1e-3
    assert abs(sum(out.contributions.values()) - out.total) <= 1e-3
    assert ("m1" in out.contributions) == (arch == "neox")
    assert ("ln_final.bias" in out.contributions) == (arch == "neox")
