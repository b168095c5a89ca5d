"""Known answers for the linear probe and the ICA identifiability check (issue #14, item 5).

The planted model (the tests' tiny GPT-2, :func:`plant_features`): residual dimension 0 of ``resid_pre.0`` is
nonzero exactly on the animal words, dimension 2 exactly on ' Mary' / ' John'. A linear probe there must read
"animal" almost perfectly on held-out texts, well above the majority baseline. The MCC is checked on synthetic
data with a known mixing first, then on the model: Laplace interventions on identity-decoder features are
recovered (MCC near 1), Gaussian ones are not identifiable (lower MCC), as theory says.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from autoexplain.tools.errors import InputError

pytest.importorskip("sklearn")

WORDS = "the cat sat on mat and dog ran to park . Mary John went store , gave a drink red green blue fox owl".split()


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def ctx(planted):
    from autoexplain.tools.models import load_model
    from autoexplain.tools.registry import ToolContext
    from autoexplain.tools.saes import load_sae

    lm = load_model(str(planted.model_dir), device="cpu")
    sae = load_sae(str(planted.sae_dir), lm)
    return ToolContext(model=lm, saes={sae.sae_id: sae})


# ----------------------------------------------------------------------------- linear probe
def _probe(ctx, **kw):
    from autoexplain.tools.probe import LinearProbeIn, linear_probe

    return linear_probe(ctx, LinearProbeIn(texts=_texts(60), **kw))


def test_probe_reads_a_planted_concept_on_held_out_texts(ctx) -> None:
    out = _probe(ctx, site="resid_pre.0", tokens=["cat", "dog", "fox", "owl"], l2=0.05)
    assert out.n_train > 100 and out.n_test > 100 and out.n_positive_test > 5
    assert out.test_accuracy >= 0.98 and out.test_balanced_accuracy >= 0.95
    assert out.test_accuracy > out.majority_baseline
    assert "held" not in out.summary() and "accuracy" in out.summary()


def test_probe_refuses_one_sided_concepts_and_bad_input(ctx) -> None:
    with pytest.raises(InputError, match="positive"):
        _probe(ctx, site="resid_pre.0", tokens=["zebra"])
    with pytest.raises(InputError, match="exactly one"):
        _probe(ctx, site="resid_pre.0")
    with pytest.raises(InputError, match="one vector per token"):
        _probe(ctx, site="pattern.0", category="punctuation")


def test_probe_reads_a_token_class(ctx) -> None:
    out = _probe(ctx, site="resid_pre.0", category="punctuation")
    assert out.concept == "punctuation tokens" and out.n_positive_test > 0 and out.test_accuracy > 0.9


# ----------------------------------------------------------------------------- identifiability
def test_mcc_on_a_known_mixing() -> None:
    from autoexplain.tools.identifiability import ica_mcc, mean_correlation_coefficient

    rng = np.random.default_rng(0)
    s = rng.laplace(size=(4000, 3))
    mix = rng.normal(size=(3, 8))
    x = s @ mix + 0.01 * rng.normal(size=(4000, 8))
    mcc, per, converged = ica_mcc(x, s)
    assert converged and mcc > 0.98 and min(per) > 0.95
    # permutation and sign do not matter; unrelated components score near 0
    perfect, match, _ = mean_correlation_coefficient(-s[:, [2, 0, 1]], s)
    assert perfect == pytest.approx(1.0) and match == [1, 2, 0]
    unrelated, _, _ = mean_correlation_coefficient(rng.laplace(size=(4000, 3)), s)
    assert unrelated < 0.1


def _ica(ctx, distribution: str, seed: int = 0):
    from autoexplain.tools.identifiability import IdentifiabilityIn, identifiability

    sae_id = next(iter(ctx.saes))
    return identifiability(ctx, IdentifiabilityIn(sae_id=sae_id, features=[0, 1, 2, 4], texts=_texts(60),
                                                  distribution=distribution, scale=4.0, seed=seed))


def test_laplace_interventions_are_identifiable_gaussian_ones_are_not(ctx) -> None:
    lap = _ica(ctx, "laplace")
    assert lap.converged and lap.site == "resid_post.0" and lap.n_samples > 300
    assert lap.mcc > 0.95, lap.summary()
    gauss = [_ica(ctx, "gaussian", seed).mcc for seed in range(3)]
    assert max(gauss) < lap.mcc and np.mean(gauss) < lap.mcc - 0.05, (gauss, lap.mcc)


def test_identifiability_refuses_an_upstream_site(ctx) -> None:
    from autoexplain.tools.identifiability import IdentifiabilityIn, identifiability

    sae_id = next(iter(ctx.saes))
    with pytest.raises(InputError, match="downstream"):
        identifiability(ctx, IdentifiabilityIn(sae_id=sae_id, features=[0], texts=_texts(5), site="resid_pre.0"))


def test_tools_are_registered_with_their_levels() -> None:
    from autoexplain.tools.registry import default_registry
    from autoexplain.tools.vocab import CausalLevel

    levels = {s.name: s.level for s in default_registry()}
    assert levels["linear_probe"] is CausalLevel.ASSOCIATION
    assert levels["ica_identifiability"] is CausalLevel.INTERVENTION
    assert levels["output_effect"] is CausalLevel.INTERVENTION
