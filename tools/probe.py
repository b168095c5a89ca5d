"""Probe SAE features on texts the agent writes: read them, ablate them, steer with them, test their output side;
and probe a site linearly for a concept.

Tools and their causal levels
-----------------------------
* ``feature_activations`` reads what chosen features do on chosen texts. That is **association**: a feature that
  fires on " cat" and " dog" is correlated with animal words on these texts; it says nothing about what the model
  does with the feature.
* ``ablate_feature`` and ``steer_feature`` change a feature's activation inside the running model and measure how
  the next-token distribution moves. That is **intervention**: the change is caused by the edit, because nothing
  else differs between the two runs.
* ``output_effect`` (intervention) tests a label's output side ("promotes 'T'"): steering and zero-ablation,
  the named tokens compared with random ones (see :func:`output_effect`).
* ``linear_probe`` (association) trains a logistic regression for a concept (token set or token class) on one
  split of the texts and reports accuracy on the other (see :func:`linear_probe`).

Splicing
--------
Interventions splice the SAE in with sae-lens' own machinery (``HookedSAETransformer.saes(...,
use_error_term=True)``) and edit the latent with a forward hook on the SAE's ``hook_sae_acts_post``. With the error
term the spliced model outputs ``decode(edited latent) + (x - decode(clean latent))``, so an unedited run is the
clean model up to float rounding, and the baseline every comparison uses is that same spliced run without the
edit: the only difference between the two runs is the intervention (an edit that changes no value changes
nothing, bit for bit). Edits apply at every position, BOS included; right-padding sits after each text's real
tokens, so under causal attention it cannot affect them, and padded positions are never reported.

Memory: logits are ``[batch, pos, vocab]``; texts are run in consecutive chunks sized so that one such tensor stays
near ``_ELEMENT_BUDGET`` elements, and every chunk is reduced to per-text numbers before the next one runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Annotated, Literal

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from autoexplain.tools.errors import InputError
from autoexplain.tools.registry import Cost, ToolContext, ToolOutput, ToolSpec, round_sig, short_repr
from autoexplain.tools.saes import LoadedSAE
from autoexplain.tools.saes import feature_activations as _encode_at_site
from autoexplain.tools.vocab import CausalLevel

if TYPE_CHECKING:
    from autoexplain.tools.models import LoadedModel

#: Largest ``batch * pos * width`` tensor (logits or SAE latents) one chunk may create (float32: 256 MiB).
_ELEMENT_BUDGET = 1 << 26
#: Summaries stop adding texts past this many characters (the registry hard cap is 2000).
_SUMMARY_BUDGET = 1500

Edit = Callable[[torch.Tensor], torch.Tensor]
Text = Annotated[str, Field(min_length=1)]
Feature = Annotated[int, Field(ge=0)]


# ============================================================================= shared helpers
def _check_features(sae: LoadedSAE, features: Sequence[int]) -> None:
    bad = [f for f in features if f >= sae.d_sae]
    if bad:
        raise InputError(f"feature {bad[0]} is out of range for SAE {sae.sae_id}: its features are "
                         f"0..{sae.d_sae - 1} (d_sae {sae.d_sae})")


def _no_duplicates(features: list[int]) -> list[int]:
    dup = sorted({f for f in features if features.count(f) > 1})
    if dup:
        raise ValueError(f"duplicate feature indices {dup}: list each feature once")
    return features


Features = Annotated[list[Feature], AfterValidator(_no_duplicates)]


def _tokenize(lm: LoadedModel, texts: Sequence[str], prepend_bos: bool) -> list[torch.Tensor]:
    """One 1-D token tensor per text, at its real length; a text longer than the model's context is refused (the
    model's ``to_tokens`` would cut it silently)."""
    seqs = [lm.to_tokens(t, prepend_bos=prepend_bos, truncate=False)[0] for t in texts]
    for text, seq in zip(texts, seqs):
        if seq.numel() == 0:
            raise InputError(f"text {short_repr(text)} tokenises to no tokens: write a longer text or set prepend_bos")
        if seq.numel() > lm.n_ctx:
            raise InputError(f"text {short_repr(text)} is {seq.numel()} tokens but the model's context is "
                             f"{lm.n_ctx}: shorten it")
    return seqs


def _batches(lm: LoadedModel, seqs: list[torch.Tensor], width: int) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Consecutive chunks ``(indices, right-padded tokens)`` with ``rows * max_len * width`` near the budget.

    The pad id is only filler: callers know each text's real length from ``seqs`` and never read past it.
    """
    start = 0
    while start < len(seqs):
        end, longest = start + 1, len(seqs[start])
        while end < len(seqs) and (end + 1 - start) * max(longest, len(seqs[end])) * width <= _ELEMENT_BUDGET:
            longest = max(longest, len(seqs[end]))
            end += 1
        tokens = torch.full((end - start, longest), lm.pad_id, dtype=torch.long, device=lm.device)
        for row, i in enumerate(range(start, end)):
            tokens[row, : len(seqs[i])] = seqs[i]
        yield list(range(start, end)), tokens
        start = end


def _fit(header: str, lines: list[str], unit: str = "texts") -> str:
    """``header`` plus as many ``lines`` as fit the summary budget, then ``(+N more texts)``."""
    out, used = [header], len(header)
    for n, line in enumerate(lines):
        if used + len(line) + 1 > _SUMMARY_BUDGET:
            out.append(f"(+{len(lines) - n} more {unit})")
            break
        out.append(line)
        used += len(line) + 1
    return "\n".join(out)


# ----------------------------------------------------------------------------- splicing with an edited latent
def _zero(features: Sequence[int]) -> Edit:
    idx = list(features)

    def edit(acts: torch.Tensor) -> torch.Tensor:
        acts = acts.clone()
        acts[..., idx] = 0.0
        return acts

    return edit


def _add(feature: int, scale: float) -> Edit:
    def edit(acts: torch.Tensor) -> torch.Tensor:
        acts = acts.clone()
        acts[..., feature] += scale
        return acts

    return edit


def _clamp(feature: int, value: float) -> Edit:
    def edit(acts: torch.Tensor) -> torch.Tensor:
        acts = acts.clone()
        acts[..., feature] = value
        return acts

    return edit


def _spliced_logits(lm: LoadedModel, sae: LoadedSAE, tokens: torch.Tensor, edit: Edit | None) -> torch.Tensor:
    """Logits of the model with ``sae`` spliced in with its error term, the latent passed through ``edit``.

    ``edit=None`` is the baseline: the clean model up to float rounding. The hook sits on the SAE's own
    ``hook_sae_acts_post`` (under the wrapper sae-lens puts at the output hook); sae-lens computes the error term
    with the SAE's hooks disabled, so the edit is not cancelled by it.
    """
    out_hook = getattr(sae.sae.cfg.metadata, "hook_name_out", None) or sae.hook_name
    point = f"{out_hook}.hook_sae_acts_post"
    hooks = [] if edit is None else [(point, lambda acts, hook: edit(acts))]
    # an SAE (or a transcoder's input) at an optional hook (mlp_in, attn_in, …) reads nothing unless the hook is
    # switched on: the splice would silently do nothing and every edit would measure 0
    with torch.no_grad(), lm.sites_enabled([sae.site, sae.out_site]), \
            lm.model.saes(saes=[sae.sae], use_error_term=True):
        if point not in lm.model.hook_dict:
            raise RuntimeError(f"sae-lens did not splice {sae.sae_id} at {out_hook}: no hook {point}")
        return lm.model.run_with_hooks(tokens, fwd_hooks=hooks, return_type="logits")


# ----------------------------------------------------------------------------- comparing distributions
class TokenShift(BaseModel):
    token: str
    token_id: int
    p_before: float
    p_after: float
    delta: float


class InterventionEffect(BaseModel):
    """How an intervention moved the next-token distribution on one text (real positions only)."""

    text: str
    tokens: list[str]
    kl_per_position: list[float] = Field(description="KL(clean || edited) of the next-token distribution, nats")
    kl_mean: float
    kl_max: float
    kl_max_position: int | None = Field(description="position of the largest KL; None when nothing changed")
    loss_clean: float | None = Field(description="mean next-token loss over the text; None for a 1-token text")
    loss_edited: float | None
    delta_loss: float | None = Field(description="loss_edited - loss_clean")
    shifts_at: str = Field(description="where rose/fell are measured")
    rose: list[TokenShift]
    fell: list[TokenShift]


def _shifts(lm: LoadedModel, before: torch.Tensor, after: torch.Tensor,
            top_k: int) -> tuple[list[TokenShift], list[TokenShift]]:
    """The ``top_k`` tokens whose probability rose most and fell most (strict changes only)."""
    delta = after - before
    k = min(top_k, delta.numel())

    def pick(values: torch.Tensor, ids: torch.Tensor, sign: float) -> list[TokenShift]:
        return [TokenShift(token=lm.token_str(int(i)), token_id=int(i), p_before=round_sig(before[i].item()),
                           p_after=round_sig(after[i].item()), delta=round_sig(sign * v.item()))
                for v, i in zip(values, ids) if v.item() > 0]

    up, down = delta.topk(k), (-delta).topk(k)
    return pick(up.values, up.indices, 1.0), pick(down.values, down.indices, -1.0)


def _mean_nll(logp: torch.Tensor, seq: torch.Tensor) -> float | None:
    """Mean next-token loss of one text from its ``[pos, vocab]`` log-probs; None when nothing is predicted."""
    n = len(seq)
    return None if n < 2 else -logp[: n - 1].gather(-1, seq[1:, None]).mean().item()


def _effects(lm: LoadedModel, texts: Sequence[str], seqs: Sequence[torch.Tensor], clean: torch.Tensor,
             edited: torch.Tensor, top_k: int, focus: Literal["max_kl", "mean"]) -> list[InterventionEffect]:
    """Per text: KL per position, next-token loss clean vs edited, and the most moved tokens.

    ``focus="max_kl"`` measures token shifts at the position of largest KL (where the edit bites hardest);
    ``focus="mean"`` averages each token's probability over the text's positions (what the edit does overall).
    """
    logp_c, logp_e = clean.float().log_softmax(-1), edited.float().log_softmax(-1)
    p_c, p_e = logp_c.exp(), logp_e.exp()
    kl = (p_c * (logp_c - logp_e)).sum(-1).clamp_min(0.0)  # [batch, pos]
    out = []
    for row, (text, seq) in enumerate(zip(texts, seqs)):
        n = len(seq)
        kl_row = kl[row, :n]
        loss_c, loss_e = (_mean_nll(lp[row], seq) for lp in (logp_c, logp_e))
        kl_max, pos = kl_row.max().item(), int(kl_row.argmax().item())
        tok_strs = lm.token_strs(seq.tolist())
        if focus == "mean":
            before, after, where = p_c[row, :n].mean(0), p_e[row, :n].mean(0), "mean over positions"
        else:
            before, after, where = p_c[row, pos], p_e[row, pos], f"position {pos} ({tok_strs[pos]!r})"
        rose, fell = _shifts(lm, before, after, top_k)
        out.append(InterventionEffect(
            text=text, tokens=tok_strs, kl_per_position=[round_sig(v) for v in kl_row.tolist()],
            kl_mean=round_sig(kl_row.mean().item()), kl_max=round_sig(kl_max),
            kl_max_position=pos if kl_max > 0 else None,
            loss_clean=None if loss_c is None else round_sig(loss_c, 6),
            loss_edited=None if loss_e is None else round_sig(loss_e, 6),
            delta_loss=None if loss_c is None or loss_e is None else round_sig(loss_e - loss_c),
            shifts_at=where, rose=rose, fell=fell))
    return out


def _intervene(ctx: ToolContext, sae: LoadedSAE, texts: Sequence[str], prepend_bos: bool, edit: Edit,
               top_k: int, focus: Literal["max_kl", "mean"]) -> list[InterventionEffect]:
    """Run every text clean and edited (both spliced, chunked) and compare the next-token distributions."""
    lm = ctx.model
    seqs = _tokenize(lm, texts, prepend_bos)
    out: list[InterventionEffect] = []
    for idx, tokens in _batches(lm, seqs, int(lm.model.cfg.d_vocab)):
        clean = _spliced_logits(lm, sae, tokens, None)
        edited = _spliced_logits(lm, sae, tokens, edit)
        out.extend(_effects(lm, [texts[i] for i in idx], [seqs[i] for i in idx], clean, edited, top_k, focus))
    return out


def _effect_line(e: InterventionEffect, shown: int = 3) -> str:
    if e.kl_max_position is None and not e.delta_loss:
        return f"{short_repr(e.text)}: no change"
    dl = "n/a" if e.delta_loss is None else f"{e.delta_loss:+.4g}"
    at = "" if e.kl_max_position is None else f" at {e.tokens[e.kl_max_position]!r}(pos {e.kl_max_position})"
    rose = " ".join(f"{s.token!r}({s.delta:+.3g})" for s in e.rose[:shown]) or "-"
    fell = " ".join(f"{s.token!r}({s.delta:+.3g})" for s in e.fell[:shown]) or "-"
    where = "mean" if e.shifts_at.startswith("mean") else "max-KL pos"
    return (f"{short_repr(e.text)}: Δloss {dl}, KL mean {e.kl_mean:.3g} max {e.kl_max:.3g}{at}; "
            f"[{where}] rose {rose}; fell {fell}")


# ============================================================================= tool 1: feature_activations
class FeatureActivationsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sae_id: str = Field(description="id of a loaded SAE (see model_info)")
    features: Features = Field(min_length=1, max_length=64, description="feature indices, 1-64, each once")
    texts: list[Text] = Field(min_length=1, max_length=64, description="non-empty texts to read them on (1-64)")
    prepend_bos: bool = Field(default=True, description="prepend the BOS token, as the model's tools do")


class FeatureTrace(BaseModel):
    feature: int
    activations: list[float] = Field(description="activation at each real token (4 decimals)")
    max: float
    argmax_position: int | None = Field(description="None when the feature never fires on the text")
    argmax_token: str | None


class TextActivations(BaseModel):
    text: str
    tokens: list[str]
    features: list[FeatureTrace]


class FeatureActivationsOut(ToolOutput):
    sae_id: str
    items: list[TextActivations]

    def summary_text(self) -> str:
        lines = [_activation_line(it) for it in self.items]
        return _fit(f"activations of {len(self.items[0].features)} features of {self.sae_id} "
                    "(association only; fires = activation > 0):", lines)


def _activation_line(item: TextActivations, shown_features: int = 6, shown_tokens: int = 4,
                     shown_silent: int = 12) -> str:
    parts, silent = [], []
    for tr in item.features:
        fired = [(item.tokens[p], a) for p, a in enumerate(tr.activations) if a > 0]
        if not fired:
            silent.append(f"f{tr.feature}")
            continue
        on = ", ".join(f"{t!r}({a:.2f})" for t, a in fired[:shown_tokens])
        more = f" (+{len(fired) - shown_tokens} more)" if len(fired) > shown_tokens else ""
        parts.append(f"f{tr.feature}: max {tr.max:.2f} at {tr.argmax_token!r}; fires on {on}{more}")
    line = " | ".join(parts[:shown_features])
    if len(parts) > shown_features:
        line += f" | (+{len(parts) - shown_features} more firing features)"
    if silent:
        extra = f" (+{len(silent) - shown_silent} more)" if len(silent) > shown_silent else ""
        line += (" | " if line else "") + "silent: " + " ".join(silent[:shown_silent]) + extra
    return f"{short_repr(item.text)} {line}"


def feature_activations(ctx: ToolContext, args: FeatureActivationsIn) -> FeatureActivationsOut:
    """Activations of chosen SAE features at every token of chosen texts (association-level evidence).

    Runs the model only up to the SAE's layer and encodes with sae-lens' ``encode``. Caveats: a feature firing on
    the probe texts shows correlation on those texts, not the feature's role, and single texts can mislead (use
    contrasting texts: with and without the hypothesised trigger).
    """
    lm = ctx.model
    sae = ctx.sae(args.sae_id)
    _check_features(sae, args.features)
    seqs = _tokenize(lm, args.texts, args.prepend_bos)
    items: list[TextActivations] = []
    for idx, tokens in _batches(lm, seqs, sae.d_sae):
        acts = _encode_at_site(lm, sae, tokens)[..., args.features].float().cpu()  # [rows, pos, n_features]
        for row, i in enumerate(idx):
            items.append(_text_activations(lm, args.texts[i], seqs[i], acts[row, : len(seqs[i])], args.features))
    return FeatureActivationsOut(sae_id=sae.sae_id, items=items)


def _text_activations(lm: LoadedModel, text: str, seq: torch.Tensor, acts: torch.Tensor,
                      features: Sequence[int]) -> TextActivations:
    tokens = lm.token_strs(seq.tolist())
    traces = []
    for j, f in enumerate(features):
        col = acts[:, j]
        top, pos = col.max().item(), int(col.argmax().item())
        fires = top > 0
        traces.append(FeatureTrace(feature=f, activations=[round(v, 4) for v in col.tolist()], max=round(top, 4),
                                   argmax_position=pos if fires else None,
                                   argmax_token=tokens[pos] if fires else None))
    return TextActivations(text=text, tokens=tokens, features=traces)


# ============================================================================= tool 2: ablate_feature
class AblateFeatureIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sae_id: str = Field(description="id of a loaded SAE (see model_info)")
    features: Features = Field(min_length=1, max_length=64, description="features to zero together (1-64)")
    texts: list[Text] = Field(min_length=1, max_length=64, description="non-empty texts to run (1-64)")
    prepend_bos: bool = Field(default=True, description="prepend the BOS token, as the model's tools do")
    top_k: int = Field(default=5, ge=1, le=50, description="how many most-moved tokens to report per direction")


class AblateFeatureOut(ToolOutput):
    sae_id: str
    features: list[int]
    items: list[InterventionEffect]

    def summary_text(self) -> str:
        fs = ",".join(f"f{f}" for f in self.features[:16]) + ("…" if len(self.features) > 16 else "")
        return _fit(f"zero-ablating {fs} of {self.sae_id} at every position (intervention; SAE spliced with its "
                    "error term; KL(clean||ablated) in nats):", [_effect_line(e) for e in self.items])


def ablate_feature(ctx: ToolContext, args: AblateFeatureIn) -> AblateFeatureOut:
    """Set chosen SAE features to 0 at every position and measure what the model's predictions lose.

    Technique: splice the SAE in with its error term, zero the features in the latent, and compare with the same
    spliced run unedited (see the module doc): per text, Δ mean next-token loss (ablated − clean), KL of the
    next-token distribution at each position (mean and max), and the tokens whose probability fell / rose most at
    the position of largest KL. Intervention-level evidence that the features matter for these predictions.

    Caveats: zero is not the feature's typical "off" value for every architecture, so the ablated state can be
    slightly off-distribution; a feature that does not fire on a text is a no-op there (by construction the
    effect is exactly 0); effects appear only at and after the positions where the feature fired (causal
    attention); several features ablated together may interact, so ablate singly to attribute an effect.
    """
    sae = ctx.sae(args.sae_id)
    _check_features(sae, args.features)
    items = _intervene(ctx, sae, args.texts, args.prepend_bos, _zero(args.features), args.top_k, "max_kl")
    return AblateFeatureOut(sae_id=sae.sae_id, features=list(args.features), items=items)


# ============================================================================= tool 3: steer_feature
class SteerFeatureIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sae_id: str = Field(description="id of a loaded SAE (see model_info)")
    feature: Feature = Field(description="the feature to steer with")
    scale: float = Field(ge=-1000, le=1000, allow_inf_nan=False,
                         description="add: added activation (vector = scale * W_dec[feature]); clamp: value the "
                                     "activation is set to. Compare with the feature's natural max activation")
    mode: Literal["add", "clamp"] = Field(default="add", description="add to the activation, or clamp it to scale")
    texts: list[Text] = Field(min_length=1, max_length=64, description="non-empty texts to run (1-64)")
    prepend_bos: bool = Field(default=True, description="prepend the BOS token, as the model's tools do")
    top_k: int = Field(default=5, ge=1, le=50, description="how many most-moved tokens to report per direction")


class SteerFeatureOut(ToolOutput):
    sae_id: str
    feature: int
    scale: float
    mode: str
    items: list[InterventionEffect]

    def summary_text(self) -> str:
        how = (f"adding {self.scale:g} x W_dec[{self.feature}]" if self.mode == "add"
               else f"clamping f{self.feature} to {self.scale:g}")
        return _fit(f"steering {self.sae_id}: {how} at every position (intervention; token shifts = mean "
                    "probability change over positions; KL(clean||steered) in nats):",
                    [_effect_line(e) for e in self.items])


def steer_feature(ctx: ToolContext, args: SteerFeatureIn) -> SteerFeatureOut:
    """Push one SAE feature up (or down, or to a fixed value) everywhere and see which predictions it promotes.

    Technique: splice the SAE in with its error term and edit the feature's latent at every position. In ``add``
    mode the activation gains ``scale``, which adds ``scale * W_dec[feature]`` to the reconstruction (through any
    output normalisation the SAE applies); in ``clamp`` mode the activation is set to ``scale``. Reported per text:
    KL(clean || steered) per position (mean and max), Δ mean next-token loss, and the tokens whose probability rose
    / fell most, **averaged over the text's positions** (robust to the choice of last token; a feature whose
    effect depends on context shows a weaker average than its strongest position, which ``kl_max`` locates).

    Intervention-level evidence, with a strong caveat: steering far off-distribution (scales well beyond the
    feature's natural activations, or clamping where it never fires) measures what the decoder direction does when
    written into the residual stream, not what the model does with the feature naturally. Prefer scales comparable
    to the feature's observed max activation (from feature_activations), and try both signs.
    """
    sae = ctx.sae(args.sae_id)
    _check_features(sae, [args.feature])
    edit = _add(args.feature, args.scale) if args.mode == "add" else _clamp(args.feature, args.scale)
    items = _intervene(ctx, sae, args.texts, args.prepend_bos, edit, args.top_k, "mean")
    return SteerFeatureOut(sae_id=sae.sae_id, feature=args.feature, scale=args.scale, mode=args.mode, items=items)


TOOLS: tuple[ToolSpec, ...] = (
    ToolSpec(name="feature_activations", level=CausalLevel.ASSOCIATION,
             input_model=FeatureActivationsIn, output_model=FeatureActivationsOut,
             fn=feature_activations, cost=Cost.FORWARD,
             description="Read SAE features on texts you write: per text and feature, the activation at every "
                         "token, the max and the token where it peaks. Use it to test a hypothesis such as "
                         "'feature 12 fires on animal words' with texts that contain and lack the trigger. "
                         "Association only: firing shows correlation on these texts, not what the feature does."),
    ToolSpec(name="ablate_feature", level=CausalLevel.INTERVENTION,
             input_model=AblateFeatureIn, output_model=AblateFeatureOut, fn=ablate_feature,
             cost=Cost.FORWARD,
             description="Zero SAE features at every position (SAE spliced with its error term, so nothing else "
                         "changes) and report per text the change in next-token loss, the KL of the next-token "
                         "distribution per position (mean, max) and the tokens whose probability fell/rose most "
                         "where KL peaks. Use it to test whether a feature matters for the model's predictions. "
                         "Intervention: supports causal claims about these texts."),
    ToolSpec(name="steer_feature", level=CausalLevel.INTERVENTION,
             input_model=SteerFeatureIn, output_model=SteerFeatureOut, fn=steer_feature,
             cost=Cost.FORWARD,
             description="Add scale x a feature's decoder direction at every position (mode add), or clamp its "
                         "activation to scale (mode clamp), and report per text KL, change in loss and the tokens "
                         "whose probability rose/fell most on average over positions. Use it to see what a feature "
                         "promotes. Intervention, but large scales are off-distribution: they show what the "
                         "direction does, not what the model does with the feature naturally."),
)


# ============================================================================= tool 4: output_effect
class OutputEffectIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sae_id: str = Field(description="id of a loaded SAE (see model_info)")
    feature: Feature = Field(description="the feature whose output side is tested")
    tokens: list[Annotated[str, Field(min_length=1)]] = Field(
        min_length=1, max_length=20, description="the tokens a label says the feature promotes (or suppresses); "
                                                 "each must be one token, as written or with a leading space")
    texts: list[Text] = Field(min_length=1, max_length=64, description="non-empty texts to run (1-64)")
    scale: float = Field(default=4.0, gt=0, le=1000, allow_inf_nan=False,
                         description="activation added to the feature at every position when steering")
    n_random: int = Field(default=64, ge=8, le=1000, description="random vocabulary tokens to compare with")
    seed: int = Field(default=0, description="seed of the random comparison tokens")
    prepend_bos: bool = Field(default=True, description="prepend the BOS token, as the model's tools do")


class OutputEffectOut(ToolOutput):
    sae_id: str
    feature: int
    scale: float
    tokens: list[str] = Field(description="the named tokens that are single tokens of the vocabulary (as used)")
    unresolved: list[str] = Field(description="named strings that are not one token: left out")
    steer_delta: dict[str, float] = Field(description="per named token: mean change of its log-probability over "
                                                      "every real position when the feature is steered up")
    random_steer_mean: float
    steer_auc: float = Field(description="P(a named token's change > a random token's change) when steering; "
                                         "1 = every named token rises more than every random one, 0.5 = chance")
    ablate_delta: dict[str, float] | None = Field(description="per named token: mean change of its log-probability "
                                                              "at the positions where the feature fires, when "
                                                              "it is zeroed; None when it fires nowhere here")
    ablate_auc: float | None = Field(description="P(a named token falls more than a random one) when the feature "
                                                 "is zeroed where it fires; None when it fires nowhere here")
    n_texts: int
    n_positions: int
    n_firing_positions: int
    n_random: int

    def summary_text(self) -> str:
        named = ", ".join(f"{t!r}({self.steer_delta[t]:+.3g})" for t in self.tokens[:8])
        abl = ("feature fires nowhere in these texts: no ablation evidence" if self.ablate_auc is None else
               f"zeroing it where it fires ({self.n_firing_positions} positions): AUC {self.ablate_auc:.2f} that "
               "the named tokens fall more than random ones")
        miss = f"; not single tokens (left out): {', '.join(map(repr, self.unresolved))}" if self.unresolved else ""
        return (f"output side of f{self.feature} of {self.sae_id} (intervention; SAE spliced with its error term) "
                f"on {self.n_texts} texts: steering +{self.scale:g} moves the named tokens' log-prob {named} vs "
                f"{self.random_steer_mean:+.3g} for {self.n_random} random tokens: AUC {self.steer_auc:.2f} "
                f"(0.5 = chance); {abl}{miss}")


def _token_id(lm: LoadedModel, text: str) -> int | None:
    """The vocabulary id of ``text`` as one token. Written with a leading space, that form first; a bare word
    (letters or digits, as labels quote tokens) is read as the word in running text, with its leading space,
    before the bare form; anything else (punctuation) as written first."""
    bare = text.strip()
    order = ((text, bare) if text.startswith(" ") else (" " + bare, bare) if bare.isalnum() else (bare, " " + bare))
    for cand in order:
        ids = lm.tokenizer(cand, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            return int(ids[0])
    return None


def _auc(pos: Sequence[float], neg: Sequence[float]) -> float:
    """P(x > y) for x from ``pos`` and y from ``neg``, ties counted half (Mann-Whitney)."""
    wins = sum((x > y) + 0.5 * (x == y) for x in pos for y in neg)
    return wins / (len(pos) * len(neg))


def output_effect(ctx: ToolContext, args: OutputEffectIn) -> OutputEffectOut:
    """Does the feature push the model's next-token predictions toward the tokens a label names?

    Technique (output-centric evaluation in the spirit of Gur-Arieh et al. 2025, "Enhancing automated
    interpretability with output-centric feature descriptions"): splice the SAE in with its error term and run
    every text three times — unedited, with ``scale`` added to the feature at every position (steering), and with
    the feature zeroed (ablation). Per vocabulary token the change of its next-token log-probability is averaged
    over the real positions (steering) or over the positions where the feature fires (ablation: effects of
    removing the feature appear where it was active). The named tokens are compared with ``n_random`` tokens drawn
    uniformly from the vocabulary (seeded): ``steer_auc`` is the probability that a named token rises more than a
    random one, ``ablate_auc`` that it falls more. Log-probabilities, not logits, so a shift shared by every
    token cancels.

    Caveats: steering at a large scale measures what the decoder direction does when written into the residual
    stream (compare the scale with the feature's natural maximum); ablation says something only on texts where the
    feature fires; a few named tokens give a coarse AUC (it is exact over the pairs, not a population estimate).
    """
    import random as _random

    lm = ctx.model
    sae = ctx.sae(args.sae_id)
    _check_features(sae, [args.feature])
    ids: dict[str, int] = {}
    unresolved = []
    for t in dict.fromkeys(args.tokens):
        tid = _token_id(lm, t)
        if tid is None:
            unresolved.append(t)
        elif tid not in ids.values():
            ids[lm.token_str(tid)] = tid
    if not ids:
        raise InputError(f"none of the named tokens is one token of this model's vocabulary: {args.tokens[:5]}")
    d_vocab = int(lm.model.cfg.d_vocab)
    pool = [i for i in range(d_vocab) if i not in set(ids.values())]
    rand = _random.Random(args.seed).sample(pool, min(args.n_random, len(pool)))
    watch = torch.tensor([*ids.values(), *rand], dtype=torch.long)
    seqs = _tokenize(lm, args.texts, args.prepend_bos)
    steer_sum = torch.zeros(len(watch), dtype=torch.float64)
    abl_sum = torch.zeros(len(watch), dtype=torch.float64)
    n_pos = n_fire = 0
    for idx, tokens in _batches(lm, seqs, d_vocab):
        lengths = torch.tensor([len(seqs[i]) for i in idx])
        real = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]  # [rows, pos]
        fires = _encode_at_site(lm, sae, tokens)[..., args.feature].float().cpu() > 0
        fires &= real
        clean = _spliced_logits(lm, sae, tokens, None).float().log_softmax(-1)[..., watch].cpu()
        up = _spliced_logits(lm, sae, tokens, _add(args.feature, args.scale)).float().log_softmax(-1)[..., watch]
        off = _spliced_logits(lm, sae, tokens, _zero([args.feature])).float().log_softmax(-1)[..., watch]
        steer_sum += (up.cpu() - clean)[real].double().sum(0)
        abl_sum += (off.cpu() - clean)[fires].double().sum(0)
        n_pos += int(real.sum())
        n_fire += int(fires.sum())
    k = len(ids)
    steer = (steer_sum / n_pos).tolist()
    abl = (abl_sum / n_fire).tolist() if n_fire else None
    names = list(ids)
    return OutputEffectOut(
        sae_id=sae.sae_id, feature=args.feature, scale=args.scale, tokens=names, unresolved=unresolved,
        steer_delta={n: round_sig(v) for n, v in zip(names, steer[:k])},
        random_steer_mean=round_sig(sum(steer[k:]) / len(rand)), steer_auc=round(_auc(steer[:k], steer[k:]), 4),
        ablate_delta=None if abl is None else {n: round_sig(v) for n, v in zip(names, abl[:k])},
        ablate_auc=None if abl is None else round(_auc([-v for v in abl[:k]], [-v for v in abl[k:]]), 4),
        n_texts=len(args.texts), n_positions=n_pos, n_firing_positions=n_fire, n_random=len(rand))


OUTPUT_EFFECT = ToolSpec(
    name="output_effect", level=CausalLevel.INTERVENTION, input_model=OutputEffectIn, output_model=OutputEffectOut,
    fn=output_effect, cost=Cost.FORWARD,
    description="Test a label's output side ('promotes tokens T'): steer the feature up at every position and zero "
                "it where it fires (SAE spliced with its error term), and compare the named tokens' change in "
                "next-token log-probability with random vocabulary tokens (AUC: 1 = every named token moves more "
                "than every random one, 0.5 = chance). Intervention-level evidence about what the feature does.")
TOOLS = (*TOOLS, OUTPUT_EFFECT)


# ============================================================================= tool 5: linear_probe
#: token classes a probe's concept can be (the same readings as the lexical judge's)
TOKEN_CLASSES: dict[str, str] = {"capitalised": r"[A-Z][A-Za-z'-]*", "number": r"\d+([.,]\d+)?",
                                 "punctuation": r"[.,;:!?'\"()-]+"}


class LinearProbeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    site: str = Field(description="where to read activations: a layer site such as resid_post.1, mlp_out.0 "
                                  "(per-head sites and attention patterns are not supported)")
    texts: list[Text] = Field(min_length=4, max_length=256, description="texts whose tokens are the examples")
    tokens: list[Annotated[str, Field(min_length=1)]] | None = Field(
        default=None, max_length=200, description="the concept as a token set: a token is positive when its text "
                                                  "(spaces stripped, case ignored) is one of these")
    category: Literal["capitalised", "number", "punctuation"] | None = Field(
        default=None, description="the concept as a token class instead of a token set")
    train_fraction: float = Field(default=0.5, gt=0, lt=1, description="share of the texts to train on")
    seed: int = Field(default=0, description="seed of the train/test split of the texts")
    l2: float = Field(default=1e-3, ge=0, le=10, description="L2 penalty of the logistic regression")
    prepend_bos: bool = Field(default=True, description="prepend the BOS token (never an example)")


class LinearProbeOut(ToolOutput):
    site: str
    concept: str
    n_train: int
    n_test: int
    n_positive_train: int
    n_positive_test: int
    train_accuracy: float
    test_accuracy: float
    test_balanced_accuracy: float
    majority_baseline: float = Field(description="test accuracy of always answering the training majority class")

    def summary_text(self) -> str:
        return (f"linear probe for {self.concept} at {self.site} (association): trained on {self.n_train} tokens "
                f"({self.n_positive_train} positive), tested on {self.n_test} tokens of other texts "
                f"({self.n_positive_test} positive): accuracy {self.test_accuracy:.3f} (train "
                f"{self.train_accuracy:.3f}), balanced {self.test_balanced_accuracy:.3f}, majority baseline "
                f"{self.majority_baseline:.3f}")


def site_activations(lm: LoadedModel, site_text: str, seqs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Activations ``[len, d]`` at a layer site for each token sequence (float32, CPU), run only as deep as
    needed. Per-head sites and attention patterns are refused (their shape is not one vector per token)."""
    from autoexplain.tools.models import hook_name
    from autoexplain.tools.vocab import HEAD_KINDS, Site, SiteKind

    site = Site.parse(site_text)
    if site.kind in HEAD_KINDS or site.kind in (SiteKind.PATTERN, SiteKind.Z):
        raise InputError(f"site {site_text!r} is not one vector per token: use resid_pre/mid/post, attn_out, "
                         "mlp_in/out or mlp_post")
    if site.layer >= lm.model.cfg.n_layers:
        raise InputError(f"site {site_text!r}: the model has layers 0..{lm.model.cfg.n_layers - 1}")
    name = hook_name(site)
    if name not in lm.model.hook_dict:
        raise InputError(f"site {site_text!r} does not exist in this model (no hook {name})")
    out: list[torch.Tensor] = [torch.zeros(0)] * len(seqs)
    for idx, tokens in _batches(lm, list(seqs), int(lm.model.cfg.d_model)):
        grabbed: list[torch.Tensor] = []

        def grab(act: torch.Tensor, hook: object, into: list[torch.Tensor] = grabbed) -> None:
            into.append(act)

        with torch.no_grad():
            lm.model.run_with_hooks(tokens, fwd_hooks=[(name, grab)], stop_at_layer=site.layer + 1)
        for row, i in enumerate(idx):
            out[i] = grabbed[0][row, : len(seqs[i])].float().cpu()
    return out


def _concept_labels(lm: LoadedModel, seq: torch.Tensor, tokens: set[str] | None, pattern: str | None,
                    skip_first: bool) -> list[bool | None]:
    """Per token: in the concept or not; None for the BOS (never an example)."""
    import re

    strs = lm.token_strs(seq.tolist())
    out: list[bool | None] = []
    for i, t in enumerate(strs):
        if i == 0 and skip_first:
            out.append(None)
        elif tokens is not None:
            out.append(t.strip().lower() in tokens)
        else:
            out.append(bool(re.fullmatch(pattern or "", t.strip())))
    return out


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and bias of an L2-penalised logistic regression (full-batch L-BFGS on standardised inputs)."""
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def linear_probe(ctx: ToolContext, args: LinearProbeIn) -> LinearProbeOut:
    """Is a concept linearly readable at a site? Train a logistic regression on one split of the texts, report
    accuracy on the other.

    Technique: every real token (BOS excluded) of every text is an example, labelled by the concept (a token set,
    or a token class: capitalised words, numbers, punctuation). The texts, not the tokens, are split (seeded), so
    no text contributes to both sides. Inputs are standardised with the training side's mean and deviation; the
    probe is an L2-penalised logistic regression (L-BFGS). Reported: train and test accuracy, test balanced
    accuracy, and the majority-class baseline on the test side (a probe that does not beat it has learnt nothing).

    Association only: a readable concept is encoded (correlated with the activations), not necessarily used by
    the model; with as many dimensions as examples a probe can fit anything on its training side — trust the test
    side, and compare with the baseline.
    """
    import random as _random

    if (args.tokens is None) == (args.category is None):
        raise InputError("give the concept as tokens (a token set) or as a category, exactly one of the two")
    lm = ctx.model
    seqs = _tokenize(lm, args.texts, args.prepend_bos)
    acts = site_activations(lm, args.site, seqs)
    wanted = {t.strip().lower() for t in args.tokens} if args.tokens is not None else None
    pattern = TOKEN_CLASSES[args.category] if args.category else None
    order = list(range(len(args.texts)))
    _random.Random(args.seed).shuffle(order)
    n_train = max(1, min(len(order) - 1, round(args.train_fraction * len(order))))
    sides: dict[str, tuple[list[torch.Tensor], list[bool]]] = {"train": ([], []), "test": ([], [])}
    for rank, i in enumerate(order):
        side = "train" if rank < n_train else "test"
        for pos, lab in enumerate(_concept_labels(lm, seqs[i], wanted, pattern, args.prepend_bos)):
            if lab is not None:
                sides[side][0].append(acts[i][pos])
                sides[side][1].append(lab)
    for side, (_, labels) in sides.items():
        if not labels or all(labels) or not any(labels):
            raise InputError(f"the {side} texts hold {'no' if not any(labels) else 'only'} positive tokens of the "
                             "concept: write texts with and without it (both sides need both)")
    x_tr, x_te = (torch.stack(sides[s][0]).double() for s in ("train", "test"))
    y_tr, y_te = (torch.tensor(sides[s][1], dtype=torch.float64) for s in ("train", "test"))
    mu, sd = x_tr.mean(0), x_tr.std(0).clamp_min(1e-6)
    w, b = _fit_logistic((x_tr - mu) / sd, y_tr, args.l2)
    pred_tr = ((x_tr - mu) / sd @ w + b) > 0
    pred_te = ((x_te - mu) / sd @ w + b) > 0
    truth = y_te > 0.5
    recall = (pred_te & truth).sum().item() / truth.sum().item()
    specificity = (~pred_te & ~truth).sum().item() / (~truth).sum().item()
    majority = bool(y_tr.mean().item() > 0.5)
    concept = (f"tokens {{{', '.join(sorted(wanted))[:200]}}}" if wanted is not None else f"{args.category} tokens")
    return LinearProbeOut(
        site=args.site, concept=concept, n_train=len(y_tr), n_test=len(y_te),
        n_positive_train=int(y_tr.sum().item()), n_positive_test=int(y_te.sum().item()),
        train_accuracy=round((pred_tr == (y_tr > 0.5)).double().mean().item(), 4),
        test_accuracy=round((pred_te == truth).double().mean().item(), 4),
        test_balanced_accuracy=round((recall + specificity) / 2, 4),
        majority_baseline=round((truth == majority).double().mean().item(), 4))


LINEAR_PROBE = ToolSpec(
    name="linear_probe", level=CausalLevel.ASSOCIATION, input_model=LinearProbeIn, output_model=LinearProbeOut,
    fn=linear_probe, cost=Cost.FORWARD,
    description="Train a linear probe (logistic regression) for a concept — a token set or a token class "
                "(capitalised, number, punctuation) — on the activations at a site, on one split of the texts, "
                "and report accuracy on the other split with the majority baseline. Association only: a readable "
                "concept is encoded there, not necessarily used.")
TOOLS = (*TOOLS, LINEAR_PROBE)
