"""Identifiability of SAE feature directions: can independent component analysis recover them from activations?

The check (seed 001): intervene on ``k`` features with independent random amounts (the *intervention labels*),
record the activations downstream, run ICA with ``k`` components on them, and compare the recovered components
with the labels by the **mean correlation coefficient** (MCC, the standard score of identifiability studies, e.g.
Hyvärinen & Morioka 2016; Khemakhem et al. 2020): the absolute Pearson correlation of every (component, label)
pair, components matched to labels one-to-one by the assignment that maximises the total (Hungarian algorithm),
averaged over the matched pairs. 1 means every intervened direction is recovered, up to sign and scale; an
unrelated component scores near 0.

ICA identifies sources only up to permutation and scaling, and only when they are non-Gaussian: with Laplace
amounts the intervened directions are identifiable from the activations alone; with Gaussian amounts any rotation
of them fits as well, and the MCC falls — the known-answer contrast the tests use. Caveats: the activations also
vary with the text (that variation is a nuisance source the ``k`` components must not absorb: use an intervention
scale well above it, and compare with the Gaussian control); directions the model cancels or that are not
linearly independent where they are read cannot be recovered; the MCC is over the sampled tokens.

Requires scikit-learn (FastICA) and SciPy (the assignment), installed with the ``judges`` or ``test`` extra.
"""

from __future__ import annotations

import warnings
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from autoexplain.tools.errors import InputError
from autoexplain.tools.probe import _batches, _check_features, _no_duplicates, _tokenize
from autoexplain.tools.registry import Cost, ToolContext, ToolOutput, ToolSpec
from autoexplain.tools.vocab import CausalLevel


def mean_correlation_coefficient(components: np.ndarray, sources: np.ndarray
                                 ) -> tuple[float, list[int], list[float]]:
    """(MCC, the component matched to each source, each matched |correlation|) for ``[n, m]`` components and
    ``[n, k]`` sources (m ≥ k): one-to-one matching maximising the summed absolute Pearson correlation."""
    from scipy.optimize import linear_sum_assignment

    if components.shape[0] != sources.shape[0] or components.shape[0] < 3:
        raise ValueError("components and sources need the same number (>= 3) of samples")
    m = components.shape[1]
    corr = np.abs(np.corrcoef(components.T, sources.T)[:m, m:])  # [m, k]
    corr = np.nan_to_num(corr, nan=0.0)  # a constant column correlates with nothing
    rows, cols = linear_sum_assignment(-corr)
    matched = dict(zip(cols.tolist(), rows.tolist(), strict=True))
    per = [float(corr[matched[j], j]) for j in range(sources.shape[1])]
    return float(np.mean(per)), [matched[j] for j in range(sources.shape[1])], per


def ica_mcc(activations: np.ndarray, sources: np.ndarray, *, seed: int = 0) -> tuple[float, list[float], bool]:
    """FastICA with as many components as sources on ``[n, d]`` activations, scored against ``[n, k]`` sources:
    (MCC, per-source matched |correlation|, whether FastICA converged)."""
    from sklearn.decomposition import FastICA
    from sklearn.exceptions import ConvergenceWarning

    k = sources.shape[1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        comps = FastICA(n_components=k, whiten="unit-variance", random_state=seed, max_iter=2000,
                        tol=1e-5).fit_transform(activations)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    mcc, _, per = mean_correlation_coefficient(comps, sources)
    return mcc, per, converged


class IdentifiabilityIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sae_id: str = Field(description="id of a loaded SAE (see model_info)")
    features: Annotated[list[Annotated[int, Field(ge=0)]], AfterValidator(_no_duplicates)] = Field(
        min_length=1, max_length=16, description="the features to intervene on, each with its own random amounts")
    texts: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1, max_length=64,
                                                             description="texts whose tokens are the samples")
    site: str | None = Field(default=None, description="where to read the activations (a layer site downstream "
                                                       "of the SAE); default resid_post of the SAE's layer")
    distribution: Literal["laplace", "gaussian"] = Field(
        default="laplace", description="of the intervention amounts: laplace (identifiable) or gaussian (the "
                                       "control: rotations of the sources are not identifiable)")
    scale: float = Field(default=4.0, gt=0, le=1000, allow_inf_nan=False,
                         description="standard deviation of the amounts added to each feature's activation")
    seed: int = Field(default=0, description="seed of the amounts and of FastICA")
    prepend_bos: bool = Field(default=True, description="prepend the BOS token (never a sample)")


class IdentifiabilityOut(ToolOutput):
    sae_id: str
    site: str
    features: list[int]
    distribution: str
    scale: float
    n_samples: int
    mcc: float = Field(description="mean over the features of |corr(matched ICA component, intervention amounts)|")
    per_feature: dict[int, float]
    converged: bool

    def summary_text(self) -> str:
        per = ", ".join(f"f{f} {v:.2f}" for f, v in list(self.per_feature.items())[:16])
        return (f"ICA identifiability of {len(self.features)} features of {self.sae_id} read at {self.site} "
                f"({self.distribution} interventions, sd {self.scale:g}, {self.n_samples} tokens): MCC "
                f"{self.mcc:.3f} ({per}){'' if self.converged else '; FastICA did not converge'}")


def identifiability(ctx: ToolContext, args: IdentifiabilityIn) -> IdentifiabilityOut:
    """Intervene on features with independent random amounts, read the activations downstream, and ask whether
    ICA recovers the amounts (mean correlation coefficient; see the module docstring)."""
    from autoexplain.tools.models import hook_name
    from autoexplain.tools.vocab import Site

    lm = ctx.model
    sae = ctx.sae(args.sae_id)
    _check_features(sae, args.features)
    site = Site.parse(args.site) if args.site else Site.parse(f"resid_post.{sae.site.layer}")
    read = hook_name(site)
    if read == sae.hook_name or site.layer < sae.site.layer:
        raise InputError(f"read the activations downstream of the SAE ({sae.hook_name}), e.g. "
                         f"resid_post.{sae.site.layer}")
    if read not in lm.model.hook_dict:
        raise InputError(f"site {site} does not exist in this model (no hook {read})")
    seqs = _tokenize(lm, args.texts, args.prepend_bos)
    rng = np.random.default_rng(args.seed)
    k = len(args.features)
    draws = [(rng.laplace(0.0, args.scale / np.sqrt(2.0), (len(s), k)) if args.distribution == "laplace"
              else rng.normal(0.0, args.scale, (len(s), k))) for s in seqs]
    out_hook = getattr(sae.sae.cfg.metadata, "hook_name_out", None) or sae.hook_name
    point = f"{out_hook}.hook_sae_acts_post"
    xs: list[np.ndarray] = []
    us: list[np.ndarray] = []
    first = 1 if args.prepend_bos else 0
    for idx, tokens in _batches(lm, list(seqs), max(sae.d_sae, int(lm.model.cfg.d_model))):
        amounts = torch.zeros(tokens.shape[0], tokens.shape[1], k)
        for row, i in enumerate(idx):
            amounts[row, : len(seqs[i])] = torch.from_numpy(draws[i]).float()
        grabbed: list[torch.Tensor] = []

        def edit(acts: torch.Tensor, hook: object, amounts: torch.Tensor = amounts) -> torch.Tensor:
            acts = acts.clone()
            acts[..., args.features] += amounts.to(acts.device, acts.dtype)
            return acts

        def grab(act: torch.Tensor, hook: object, into: list[torch.Tensor] = grabbed) -> None:
            into.append(act)

        with torch.no_grad(), lm.model.saes(saes=[sae.sae], use_error_term=True):
            lm.model.run_with_hooks(tokens, fwd_hooks=[(point, edit), (read, grab)], stop_at_layer=site.layer + 1)
        for row, i in enumerate(idx):
            xs.append(grabbed[0][row, first: len(seqs[i])].float().cpu().numpy())
            us.append(draws[i][first:])
    x, u = np.concatenate(xs), np.concatenate(us)
    if len(x) < 10 * k:
        raise InputError(f"{len(x)} tokens are too few for {k} components: give more or longer texts "
                         f"(at least {10 * k} tokens)")
    mcc, per, converged = ica_mcc(x, u, seed=args.seed)
    return IdentifiabilityOut(sae_id=sae.sae_id, site=str(site), features=list(args.features),
                              distribution=args.distribution, scale=args.scale, n_samples=len(x),
                              mcc=round(mcc, 4), per_feature={f: round(v, 4) for f, v in zip(args.features, per)},
                              converged=converged)




TOOLS = (
    ToolSpec(name="ica_identifiability", level=CausalLevel.INTERVENTION, input_model=IdentifiabilityIn,
             output_model=IdentifiabilityOut, fn=identifiability, cost=Cost.FORWARD,
             description="Identifiability check: add independent random amounts (Laplace, or Gaussian as the "
                         "control) to chosen SAE features at every token (SAE spliced with its error term), read "
                         "the activations downstream, run ICA with one component per feature and report the mean "
                         "correlation coefficient between the matched components and the amounts (1 = every "
                         "direction recovered). Intervention: the amounts are set by the tool."),
)
