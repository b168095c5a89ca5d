"""The output side of a feature, by intervention (issue #14, item 3): ``output_effect`` on a planted output
feature.

Planted on the tests' tiny GPT-2 (:func:`plant_features` with ``outputs``): feature 1 fires on ' Mary' and
promotes ' sat' and ' park' (its own dimension of the untied unembedding); feature 0 fires on animal words and
promotes nothing directly. Steering feature 1 must raise ' sat' and ' park' above random tokens, zeroing it where
it fires must lower them, and the wrong tokens (or the wrong feature) must not look like that.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from autoexplain.tools.errors import InputError

OUTPUTS = {1: (" sat", " park")}
TEXTS = ["the cat sat on Mary", "Mary went to the park and Mary ran", "John gave Mary a drink", "Mary . Mary"]


@pytest.fixture(scope="module")
def output_world(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from autoexplain.evals.truth.planted_features import plant_features
    from autoexplain.tools.models import load_model
    from autoexplain.tools.registry import ToolContext
    from autoexplain.tools.saes import load_sae

    planted = plant_features(tiny_gpt2_dir, tmp_path_factory.mktemp("outputs"),
                             {0: (" cat", " dog", " fox", " owl"), 1: (" Mary",)}, (2, 3), outputs=OUTPUTS)
    lm = load_model(str(planted.model_dir), device="cpu")
    sae = load_sae(str(planted.sae_dir), lm)
    return planted, ToolContext(model=lm, saes={sae.sae_id: sae})


def _effect(ctx, feature: int, tokens: list[str], texts: list[str] = TEXTS, scale: float = 1.0):
    from autoexplain.tools.probe import OutputEffectIn, output_effect

    sae_id = next(iter(ctx.saes))
    return output_effect(ctx, OutputEffectIn(sae_id=sae_id, feature=feature, tokens=tokens, texts=texts,
                                             scale=scale))


def test_the_planted_output_feature_promotes_its_tokens(output_world) -> None:
    planted, ctx = output_world
    assert planted.outputs == {1: (" sat", " park")}
    out = _effect(ctx, 1, ["sat", "park"])
    assert out.steer_auc == 1.0 and all(v > 0 for v in out.steer_delta.values())
    assert out.n_firing_positions >= 4 and out.ablate_auc is not None and out.ablate_auc >= 0.95
    assert "AUC 1.00" in out.summary()


def test_wrong_tokens_and_the_wrong_feature_score_low(output_world) -> None:
    _, ctx = output_world
    wrong = _effect(ctx, 1, ["dog", "red"])
    assert wrong.steer_auc < 0.9
    other = _effect(ctx, 0, ["sat", "park"])  # the animal feature does not promote them
    assert other.steer_auc < 0.9


def test_no_firing_means_no_ablation_evidence_and_bad_tokens_are_refused(output_world) -> None:
    _, ctx = output_world
    quiet = _effect(ctx, 1, ["sat"], texts=["the cat sat on the mat"])
    assert quiet.ablate_auc is None and quiet.ablate_delta is None and quiet.n_firing_positions == 0
    with pytest.raises(InputError, match="one token"):
        _effect(ctx, 1, ["zzqqxxyy unknownword"])


def test_harvest_logit_effects_name_the_promoted_tokens(output_world) -> None:
    """The harvest's logit effects (W_dec @ W_U) are where the policy's output hypothesis starts."""
    _, ctx = output_world
    lm = ctx.model
    sae = next(iter(ctx.saes.values()))
    eff = sae.sae.W_dec[1].to(lm.model.W_U.dtype) @ lm.model.W_U
    top = {lm.token_str(int(i)) for i in eff.topk(2).indices}
    assert top == {" sat", " park"}
