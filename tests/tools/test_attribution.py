"""Attribution to SAE features, neurons and tokens: known answers on planted models (a linear path, where the
estimate must equal the ablation effect; a softmax path, where grad x act is wrong and IG's completeness holds),
the verification by ablation, and the registered tool."""

from __future__ import annotations

import pytest
import torch

from autoexplain.evals.truth.planted_circuits import induction
from autoexplain.evals.truth.planted_feature_circuits import A, B, V, build
from autoexplain.tools.attribution import AttributionIn, AttributionOut, attribute, attribution_output
from autoexplain.tools.errors import InputError
from autoexplain.tools.registry import SUMMARY_MAX_CHARS, default_registry
from autoexplain.tools.vocab import CausalLevel, Site


@pytest.fixture(scope="module")
def planted():
    return build(n_prompts=8)


@pytest.mark.parametrize("method", ["ig", "grad_x_act"])
def test_linear_path_attribution_equals_ablation(planted, method: str) -> None:
    res = attribute(planted.lm, planted.task, Site.parse("resid_post.0"), sae=planted.saes[0], method=method,
                    verify_top_k=4)
    assert res.m_clean == pytest.approx(3.0) and res.m_base == pytest.approx(0.0, abs=1e-6)
    assert res.names[A] == f"{planted.saes[0].sae_id}#{A}" and res.names[-1] == "error@resid_post.0"
    assert res.top(1) == [A] and float(res.values[A]) == pytest.approx(3.0, abs=1e-5)
    assert res.ablation is not None and set(res.ablation) == set(res.top(4))
    for unit, effect in res.ablation.items():  # on a linear path the estimate is the ablation effect
        assert float(res.values[unit]) == pytest.approx(effect, abs=1e-5)
    # B changes between clean and corrupt (it is the corrupt token) but nothing reads it: no attribution
    assert float(res.values[B]) == pytest.approx(0.0, abs=1e-6)
    # per position: all of it at position 1, where A sits
    pp = res.per_position()
    assert float(pp[1, A]) == pytest.approx(3.0, abs=1e-5) and float(pp[:, A].abs().sum()) == pytest.approx(3.0)
    out = attribution_output(res, top_n=3)
    assert out.level is CausalLevel.INTERVENTION and out.units[0].top_position == 1
    assert out.units[0].ablation_effect == pytest.approx(3.0, abs=1e-5)


def test_layer1_feature_and_tokens(planted) -> None:
    res = attribute(planted.lm, planted.task, Site.parse("resid_post.1"), sae=planted.saes[1])
    assert res.top(1) == [V] and float(res.values[V]) == pytest.approx(3.0, abs=1e-5)  # the OUT feature
    assert float(res.values[V + 1]) == pytest.approx(0.0, abs=1e-6)  # JUNK fires on corrupt, nothing reads it
    tok = attribute(planted.lm, planted.task, Site.parse("resid_pre.0"), verify_top_k=2)
    assert tok.names[:2] == ["pos 0", "pos 1"]
    assert torch.allclose(tok.values, torch.tensor([0.0, 3.0, 0.0, 0.0, 0.0]), atol=1e-5)
    assert tok.ablation is not None and tok.ablation[1] == pytest.approx(3.0, abs=1e-5)
    out = attribution_output(tok, top_n=2)
    assert out.basis.value == "token" and out.units[0].unit == "pos 1"


def test_saturating_path_grad_x_act_errs_and_ig_is_complete() -> None:
    """The planted induction model's answer runs through a sharp softmax (attention): the gradient at the clean run
    underestimates the token effect, IG's attributions add up to m(clean) - m(corrupt), and both stay apart from
    the ablation of a single unit where units interact."""
    pc = induction(n_prompts=8)
    site = Site.parse("resid_pre.0")
    ig = attribute(pc.lm, pc.task, site, method="ig", steps=48)
    gxa = attribute(pc.lm, pc.task, site, method="grad_x_act")
    span = ig.m_clean - ig.m_base
    assert abs(span) > 1
    assert abs(ig.ig_gap) < 0.03 * abs(span), (ig.ig_gap, span)  # completeness
    assert abs(gxa.ig_gap) > 0.1 * abs(span), (gxa.ig_gap, span)  # first order misses the saturation
    neurons = attribute(pc.lm, pc.task, Site.parse("mlp_post.1"), method="ig", steps=48, verify_top_k=2)
    assert neurons.basis.value == "neuron" and neurons.names[0] == "mlp_post.1[0]"
    assert abs(neurons.ig_gap) < 0.03 * max(1.0, abs(neurons.m_clean - neurons.m_base))


def test_bad_inputs_are_refused(planted) -> None:
    with pytest.raises(InputError, match="without an SAE"):
        attribute(planted.lm, planted.task, Site.parse("resid_post.0"))
    with pytest.raises(InputError, match="reads resid_post.0, not resid_post.1"):
        attribute(planted.lm, planted.task, Site.parse("resid_post.1"), sae=planted.saes[0])
    with pytest.raises(InputError, match="steps"):
        attribute(planted.lm, planted.task, Site.parse("resid_post.0"), sae=planted.saes[0], steps=0)


def test_registered_with_levels() -> None:
    reg = default_registry()
    spec = reg.get("attribution")
    assert spec.level is CausalLevel.ASSOCIATION and spec.input_model is AttributionIn
    assert spec.output_model is AttributionOut
    assert reg.get("feature_circuit").level is CausalLevel.INTERVENTION
    with pytest.raises(InputError, match="bad arguments for attribution"):
        reg.parse_args("attribution", {"site": "resid_post.0", "task_file": "x.json", "steps": 0})


def test_tool_on_the_tiny_toy_world(tiny_zoo) -> None:
    from autoexplain.tools.loading import load_model, load_sae
    from autoexplain.tools.registry import ToolContext

    lm = load_model("toy:tiny", device="cpu")
    sae = load_sae("toy:tiny/res0", lm)
    ctx = ToolContext(model=lm, saes={sae.sae_id: sae})
    out = default_registry().call(ctx, "attribution", {"site": "resid_post.0", "sae_id": sae.sae_id,
                                                       "task_file": str(tiny_zoo.task_file("ioi")), "steps": 4,
                                                       "verify_top_k": 2, "top_n": 5})
    assert isinstance(out, AttributionOut) and out.n_units == sae.d_sae + 1 and len(out.units) == 5
    assert out.level is CausalLevel.INTERVENTION and out.units[0].ablation_effect is not None
    assert len(out.summary()) <= SUMMARY_MAX_CHARS and "attribution" in out.summary()
