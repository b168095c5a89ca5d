"""Read the residual stream in the vocabulary basis: the logit lens and direct logit attribution (DLA).

Both tools describe a single forward pass; neither changes anything the model computes, so both support only
**association-level** claims (:attr:`CausalLevel.ASSOCIATION`). They say what the residual stream "points at"
(logit lens) and which components write along the answer's unembedding direction (DLA). Whether a component
*matters* for the output is an interventional question: answer it with patching or ablation.

Logit lens
----------
At every layer's residual stream (``resid_pre.0`` … ``resid_pre.{n-1}``, then ``resid_post.{n-1}``) apply the
model's own final normalisation (``ln_final``) and unembedding, and read the softmax as what the model "would
predict" if it stopped there. Caveats:

* the final LayerNorm was trained on the *last* residual stream; applying it to an intermediate one (with the
  mean and scale computed on that residual) is an approximation, and the further from the end, the worse;
* early layers often do not live in the unembedding's basis at all (the lens then shows noise or the input
  token), which says nothing about what those layers compute; a tuned lens would correct for basis drift;
* the last row, ``resid_post.{n-1}``, is exactly the model's own prediction.

Direct logit attribution
------------------------
The final residual stream is a sum of the components that wrote to it::

    resid_post.{n-1} = embed + sum_L ( sum_H head_out.L.H + b_O[L] ) + sum_L mlp_out.L

``embed`` is ``resid_pre.0`` (token plus, where the model has them, absolute position embeddings). With the final
normalisation's scale ``s`` *frozen at its value on the real residual*, the final LayerNorm is affine in its
input, so the logit of token ``t`` splits exactly into::

    logit[t] = sum_c  (center(c) / s) . (w * W_U[:, t])      one entry per component c (heads, a{L}.bias, m{L}, embed)
               + b_ln . W_U[:, t]                             entry "ln_final.bias" (LayerNorm models only)
               + b_U[t]                                       entry "unembed.bias"

where ``center`` subtracts the mean over ``d_model`` (LayerNorm; RMSNorm does not centre), ``w``/``b_ln`` are the
final norm's weight and bias (absent when the norm is folded or missing). With a baseline token ``b`` every
``W_U[:, t]`` becomes ``W_U[:, t] - W_U[:, b]`` and ``b_U[t]`` becomes ``b_U[t] - b_U[b]``, so the entries sum to
the logit *difference*. Hence the sum of *all* entries (components and the three kinds of bias) equals the real
logit (difference) up to float error; ``residual_error`` reports the gap and is a check, not a quantity of
interest. Models with a logit soft-cap (Gemma 2) are decomposed before the cap; the tool then says so.

Caveats: DLA measures **direct** effects only (what a component writes straight into the final residual), not
effects routed through later layers; the frozen LN scale ignores that removing a component would change the
scale; a large contribution is evidence of association with the answer ("what writes the answer"), not proof that
the model needs that component.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from autoexplain.tools.errors import InputError
from autoexplain.tools.registry import Cost, ToolContext, ToolOutput, ToolSpec, round_sig, short_repr
from autoexplain.tools.vocab import CausalLevel, Site, SiteKind

if TYPE_CHECKING:
    from autoexplain.tools.models import LoadedModel

#: Rows (layer x position pairs) decoded through the unembedding at once: bounds memory at rows x d_vocab floats.
_DECODE_CHUNK = 256
_PROB_DIGITS = 6
_LOGIT_DIGITS = 6


# ============================================================================= shared helpers
@dataclass(frozen=True)
class _Batch:
    """Texts tokenised like the other tools (BOS, then the text without special tokens), right-padded."""

    tokens: torch.Tensor  # LongTensor [batch, seq] on the model's device
    mask: torch.Tensor  # LongTensor [batch, seq]: 1 on real tokens, 0 on right padding
    ids: list[list[int]]  # real token ids per text, BOS included

    @property
    def lengths(self) -> list[int]:
        return [len(i) for i in self.ids]


def _encode(lm: LoadedModel, texts: list[str], prepend_bos: bool) -> _Batch:
    """Tokenise and right-pad ``texts``. Right padding never changes a causal model's outputs at real positions,
    and the explicit attention mask keeps TransformerLens from guessing padding from the token values."""
    tok = lm.tokenizer
    encoded = tok(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if prepend_bos and bos is None:
        raise InputError("this tokenizer has no BOS or EOS token to prepend: call again with prepend_bos false")
    ids = [([bos] if prepend_bos else []) + list(e) for e in encoded]
    for i, row in enumerate(ids):
        if not row:
            raise InputError(f"text {i} ({short_repr(texts[i])}) tokenises to no tokens: give it some text or set "
                             "prepend_bos true")
        if len(row) > lm.n_ctx:
            raise InputError(f"text {i} ({short_repr(texts[i])}) is {len(row)} tokens but the model's context is "
                             f"{lm.n_ctx}: shorten it")
    pad = lm.pad_id
    width = max(len(r) for r in ids)
    tokens = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return _Batch(tokens=tokens.to(lm.device), mask=mask.to(lm.device), ids=ids)


def _single_token(lm: LoadedModel, text: str, role: str) -> int:
    """The id of ``text`` if it is exactly one token; else an :class:`InputError` showing how it tokenises."""
    tok = lm.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = [tok.decode([i]) for i in ids]
        raise InputError(f"{role} {text!r} tokenises to {len(ids)} tokens {pieces}; use a single token (leading "
                         "spaces matter: ' Mary' and 'Mary' differ; the tokenize tool shows the pieces)")
    if ids[0] >= lm.model.cfg.d_vocab:
        raise InputError(f"{role} {text!r} has id {ids[0]}, outside the model's vocabulary of "
                         f"{lm.model.cfg.d_vocab}: choose another token")
    return int(ids[0])


def _resolve_position(position: int, length: int, index: int, text: str, prepend_bos: bool) -> int:
    """``position`` (negative counts from the text's own end) as an index into that text's real tokens."""
    resolved = position + length if position < 0 else position
    if not 0 <= resolved < length:
        raise InputError(f"position {position} is out of range for text {index} ({short_repr(text)}), which has "
                         f"{length} tokens{' including BOS' if prepend_bos else ''}: use {-length}..{length - 1}")
    return resolved


def _soft_cap(lm: LoadedModel) -> float:
    return float(getattr(lm.model.cfg, "output_logits_soft_cap", 0.0) or 0.0)


def _unembed_normalised(lm: LoadedModel, resid: torch.Tensor) -> torch.Tensor:
    """Logits the model would emit from residual ``resid`` [..., d_model]: ``ln_final`` (statistics of ``resid``
    itself), unembedding, and the logit soft-cap where the model has one. Returned as float32."""
    model = lm.model
    x = model.ln_final(resid) if hasattr(model, "ln_final") else resid
    logits = model.unembed(x.to(model.W_U.dtype)).float()
    cap = _soft_cap(lm)
    return cap * torch.tanh(logits / cap) if cap > 0 else logits


# ============================================================================= logit lens
class LogitLensIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[str] = Field(min_length=1, max_length=32, description="texts to run (1-32)")
    targets: list[str] = Field(default_factory=list, max_length=16,
                               description="single tokens whose rank and probability to report at every layer, "
                                           "e.g. [' Mary', ' John'] (leading spaces matter)")
    positions: list[int] | None = Field(default=None, min_length=1, max_length=32,
                                        description="token positions to read in every text; negative counts from "
                                                    "the text's end; default: the last token of each text")
    top_k: int = Field(default=5, ge=1, le=20, description="top tokens to list per layer (1-20)")
    prepend_bos: bool = Field(default=True, description="prepend the BOS token (position 0 is then BOS)")


class TokenProb(BaseModel):
    token: str
    id: int
    prob: float


class TargetRank(BaseModel):
    token: str
    id: int
    rank: int = Field(description="0 = the top token")
    prob: float


class LensLayer(BaseModel):
    site: Site = Field(description="residual site decoded: resid_pre.L, or resid_post of the last layer")
    top: list[TokenProb]
    targets: list[TargetRank]


class LensReading(BaseModel):
    text_index: int
    text: str
    position: int = Field(description="resolved (non-negative) position, BOS counted")
    token: str = Field(description="the input token at this position")
    layers: list[LensLayer]
    prediction: list[TokenProb] = Field(description="the model's real next-token prediction here")
    prediction_targets: list[TargetRank]


class LogitLensOut(ToolOutput):
    sites: list[Site]
    targets: list[str]
    readings: list[LensReading]

    def summary_text(self) -> str:
        budget, lines = 1500, ["logit lens (final LN + unembed at each residual; descriptive, association-level). "
                               "Per layer: top-3 (prob) | target #rank (0 = top)."]
        shown = 0
        for r in self.readings:
            block = [f"[{r.text_index}] {short_repr(r.text, 36)} @{r.position} {_tok_repr(r.token)}; model predicts "
                     + ", ".join(f"{_tok_repr(p.token)} {p.prob:.2g}" for p in r.prediction[:3])]
            block += [f"  {layer.site}: {_lens_line(layer)}" for layer in _sample_layers(r.layers, 10)]
            if shown and len("\n".join(lines + block)) > budget:
                break
            lines += block
            shown += 1
        if shown < len(self.readings):
            lines.append(f"(+{len(self.readings) - shown} more text/position readings in the full output)")
        return "\n".join(lines)


def _lens_line(layer: LensLayer) -> str:
    top = " ".join(f"{_tok_repr(p.token)} {p.prob:.2g}" for p in layer.top[:3])
    targets = " ".join(f"{_tok_repr(t.token)}#{t.rank}" for t in layer.targets[:3])
    return top + (f" | {targets}" if targets else "")


def _tok_repr(token: str, width: int = 12) -> str:
    """A token quoted (so leading spaces show), cut to ``width`` characters: keeps summary lines short."""
    return repr(token if len(token) <= width else token[: width - 1] + "…")


def _sample_layers(layers: list[LensLayer], at_most: int) -> list[LensLayer]:
    """At most ``at_most`` layers, evenly spread, always keeping the first and the last."""
    if len(layers) <= at_most:
        return layers
    step = (len(layers) - 1) / (at_most - 1)
    return [layers[round(i * step)] for i in range(at_most)]


def _lens_sites(lm: LoadedModel) -> list[Site]:
    """``resid_pre.L`` for every layer, then ``resid_post`` of the last layer: n_layers + 1 residual streams."""
    last = lm.n_layers - 1
    return [Site(kind=SiteKind.RESID_PRE, layer=L) for L in range(lm.n_layers)] + [
        Site(kind=SiteKind.RESID_POST, layer=last)]


@dataclass(frozen=True)
class _Stats:
    top_ids: list[list[int]]
    top_probs: list[list[float]]
    target_ranks: list[list[int]]
    target_probs: list[list[float]]


def _stats(logits: torch.Tensor, targets: list[int], k: int) -> _Stats:
    """Top-k tokens and the targets' ranks (tokens with a strictly larger logit) for logits [rows, vocab]."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    top_p, top_i = probs.topk(k, dim=-1)
    if targets:
        ranks = torch.stack([(logits > logits[:, t : t + 1]).sum(-1) for t in targets], dim=1)  # [rows, T]
        t_prob = probs[:, torch.tensor(targets, device=logits.device)]
    else:
        ranks = t_prob = torch.zeros((logits.shape[0], 0), device=logits.device)
    return _Stats(top_ids=top_i.tolist(), top_probs=top_p.tolist(), target_ranks=ranks.long().tolist(),
                  target_probs=t_prob.tolist())


def _decoded_stats(lm: LoadedModel, resid: torch.Tensor, targets: list[int], k: int) -> _Stats:
    """:func:`_stats` of the lens logits of ``resid`` [rows, d_model], decoded in chunks of rows."""
    parts = [_stats(_unembed_normalised(lm, resid[i : i + _DECODE_CHUNK]), targets, k)
             for i in range(0, resid.shape[0], _DECODE_CHUNK)]
    return _Stats(top_ids=[r for p in parts for r in p.top_ids], top_probs=[r for p in parts for r in p.top_probs],
                  target_ranks=[r for p in parts for r in p.target_ranks],
                  target_probs=[r for p in parts for r in p.target_probs])


def logit_lens(ctx: ToolContext, args: LogitLensIn) -> LogitLensOut:
    """Decode each layer's residual stream with the final LayerNorm and unembedding (one cached forward pass)."""
    lm = ctx.model
    batch = _encode(lm, args.texts, args.prepend_bos)
    targets = [_single_token(lm, t, "target") for t in args.targets]
    wanted = args.positions if args.positions is not None else [-1]
    rows = [(i, _resolve_position(p, n, i, args.texts[i], args.prepend_bos))
            for i, n in enumerate(batch.lengths) for p in dict.fromkeys(wanted)]
    sites = _lens_sites(lm)
    names = [lm.validate_site(s) for s in sites]
    bi = torch.tensor([r[0] for r in rows], device=lm.device)
    pi = torch.tensor([r[1] for r in rows], device=lm.device)
    with torch.no_grad():
        logits, cache = lm.model.run_with_cache(batch.tokens, attention_mask=batch.mask, names_filter=names)
        resid = torch.stack([cache[n][bi, pi] for n in names])  # [layers, rows, d_model]
        del cache
        lens = _decoded_stats(lm, resid.reshape(-1, resid.shape[-1]), targets, args.top_k)
        final = _stats(logits[bi, pi], targets, args.top_k)
    name = lm.token_str
    n_rows = len(rows)
    readings = []
    for r, (i, p) in enumerate(rows):
        layers = [_lens_layer(site, lens, li * n_rows + r, targets, name) for li, site in enumerate(sites)]
        readings.append(LensReading(text_index=i, text=args.texts[i], position=p, token=name(batch.ids[i][p]),
                                    layers=layers, prediction=_top(final, r, name),
                                    prediction_targets=_target_ranks(final, r, targets, name)))
    return LogitLensOut(sites=list(sites), targets=list(args.targets), readings=readings)


def _top(stats: _Stats, row: int, name: Callable[[int], str]) -> list[TokenProb]:
    return [TokenProb(token=name(t), id=t, prob=round(p, _PROB_DIGITS))
            for t, p in zip(stats.top_ids[row], stats.top_probs[row], strict=True)]


def _target_ranks(stats: _Stats, row: int, targets: list[int], name: Callable[[int], str]) -> list[TargetRank]:
    return [TargetRank(token=name(t), id=t, rank=k, prob=round(p, _PROB_DIGITS))
            for t, k, p in zip(targets, stats.target_ranks[row], stats.target_probs[row], strict=True)]


def _lens_layer(site: Site, stats: _Stats, row: int, targets: list[int], name: Callable[[int], str]) -> LensLayer:
    return LensLayer(site=site, top=_top(stats, row, name), targets=_target_ranks(stats, row, targets, name))


# ============================================================================= direct logit attribution
class DLAIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[str] = Field(min_length=1, max_length=32, description="texts to attribute (1-32); results are "
                                                                       "averaged over them")
    target: str = Field(description="the single token whose logit to attribute, e.g. ' Mary'")
    baseline: str | None = Field(default=None, description="optional single token: attribute the logit "
                                                           "difference target - baseline, e.g. ' John'")
    position: int = Field(default=-1, description="position whose prediction to attribute; negative counts from "
                                                  "each text's end (default -1: the last token)")
    prepend_bos: bool = Field(default=True, description="prepend the BOS token (position 0 is then BOS)")
    top_n: int = Field(default=10, ge=1, le=50, description="components to list in the summary (1-50)")


class DLAItem(BaseModel):
    text: str
    position: int = Field(description="resolved (non-negative) position, BOS counted")
    token: str = Field(description="the input token at this position")
    total: float = Field(description="the real logit (difference) of this text")
    residual_error: float = Field(description="|sum of this text's entries - total|")


class DLAOut(ToolOutput):
    target: str
    baseline: str | None
    contributions: dict[str, float] = Field(
        description="mean direct contribution per entry: embed, aL.H (heads), aL.bias (attention output bias), "
                    "mL (MLPs), ln_final.bias, unembed.bias; all entries sum to total")
    total: float = Field(description="mean real logit, or logit difference target - baseline")
    residual_error: float = Field(description="|sum(contributions) - total|: float error; large means a bug")
    items: list[DLAItem]
    top_n: int = 10
    note: str = ""

    def summary_text(self) -> str:
        what = f"logit({self.target!r})" + (f" - logit({self.baseline!r})" if self.baseline is not None else "")
        ranked = sorted(self.contributions.items(), key=lambda kv: (-abs(kv[1]), kv[0]))
        top, rest = ranked[: self.top_n], ranked[self.top_n :]
        lines = [f"direct logit attribution of {what}, mean over {len(self.items)} text(s): total "
                 f"{self.total:+.3f} (sum check error {self.residual_error:.1e}).",
                 f"top {len(top)} by |direct contribution|: " + ", ".join(f"{k} {v:+.3f}" for k, v in top)]
        if rest:
            lines.append(f"the other {len(rest)} entries sum to {sum(v for _, v in rest):+.3f}.")
        per_text = ", ".join(f"{it.total:+.2f}" for it in self.items[:8])
        more = f" (+{len(self.items) - 8} more)" if len(self.items) > 8 else ""
        lines.append(f"per-text totals: {per_text}{more}.")
        lines.append("Direct effects only (not via later layers), final LN scale frozen: association-level "
                     "evidence of what writes the answer; confirm with patching/ablation." + (
                         f" {self.note}" if self.note else ""))
        return "\n".join(lines)


@dataclass(frozen=True)
class _Decomposition:
    """The components of the final residual at one position per text, and the final norm's real scale."""

    names: list[str]  # entry names, one per component
    stack: torch.Tensor  # float64 [batch, components, d_model]
    scale: torch.Tensor  # float64 [batch, 1]: the final norm's scale on the real residual (1 without a norm)
    logits: torch.Tensor  # float32 [batch, d_vocab]: the model's real logits at those positions
    final_resid: torch.Tensor  # float64 [batch, d_model]: the real final residual stream (what the stack sums to)


def _dla_sites(lm: LoadedModel) -> tuple[Site, list[Site], list[Site], Site]:
    """embed site, per-layer head sites (head 0 stands for its layer's hook), MLP sites, final residual site."""
    heads = [Site(kind=SiteKind.HEAD_OUT, layer=L, head=0) for L in range(lm.n_layers)]
    mlps = [] if lm.attn_only else [Site(kind=SiteKind.MLP_OUT, layer=L) for L in range(lm.n_layers)]
    return (Site(kind=SiteKind.RESID_PRE, layer=0), heads, mlps,
            Site(kind=SiteKind.RESID_POST, layer=lm.n_layers - 1))


def _decompose(lm: LoadedModel, batch: _Batch, positions: list[int]) -> _Decomposition:
    """One forward pass with hooks that keep only each text's chosen position (no full-sequence cache)."""
    model = lm.model
    embed, heads, mlps, final = _dla_sites(lm)
    bi = torch.arange(len(positions), device=lm.device)
    pi = torch.tensor(positions, device=lm.device)
    grabbed: dict[str, torch.Tensor] = {}

    def grab(act: torch.Tensor, hook: Any) -> None:
        grabbed[hook.name] = act[bi, pi].detach().to(torch.float64)

    hook = {s: lm.validate_site(s) for s in (embed, *heads, *mlps, final)}  # validated names via hook_name
    names = list(hook.values())
    scale_hook = model.ln_final.hook_scale.name if hasattr(model, "ln_final") else None
    hooks = [(n, grab) for n in dict.fromkeys(names + ([scale_hook] if scale_hook else []))]
    with lm.sites_enabled(heads), torch.no_grad():
        logits = model.run_with_hooks(batch.tokens, attention_mask=batch.mask, fwd_hooks=hooks)
    parts: list[torch.Tensor] = [grabbed[hook[embed]][:, None, :]]
    labels = ["embed"]
    for L in range(lm.n_layers):
        parts.append(grabbed[hook[heads[L]]])  # [batch, head, d_model]
        labels += [f"a{L}.{h}" for h in range(lm.n_heads)]
        b_o = model.blocks[L].attn.b_O.detach().to(torch.float64)
        parts.append(b_o.expand(len(positions), 1, -1))
        labels.append(f"a{L}.bias")
        if mlps:
            parts.append(grabbed[hook[mlps[L]]][:, None, :])
            labels.append(f"m{L}")
    batch_size = len(positions)
    scale = grabbed[scale_hook].reshape(batch_size, 1) if scale_hook else torch.ones(
        (batch_size, 1), dtype=torch.float64, device=lm.device)
    return _Decomposition(names=labels, stack=torch.cat(parts, dim=1), scale=scale,
                          logits=logits[bi, pi].float(), final_resid=grabbed[hook[final]])


def _norm_parts(lm: LoadedModel) -> tuple[bool, torch.Tensor | None, torch.Tensor | None]:
    """(centres?, weight, bias) of the final normalisation: LayerNorm centres, RMSNorm does not; folded or
    missing norms have no weight/bias."""
    from transformer_lens.components import LayerNorm, LayerNormPre

    ln = getattr(lm.model, "ln_final", None)
    if ln is None:
        return False, None, None
    w, b = getattr(ln, "w", None), getattr(ln, "b", None)
    return isinstance(ln, (LayerNorm, LayerNormPre)), _f64(w), _f64(b)


def _f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(torch.float64)


def _attribute(lm: LoadedModel, dec: _Decomposition, target: int,
               baseline: int | None) -> tuple[torch.Tensor, list[str]]:
    """Per-text entries [batch, entries] (components, then ln_final.bias, unembed.bias) and their names."""
    model = lm.model
    cols = [target] if baseline is None else [target, baseline]
    w_u = model.W_U.detach()[:, cols].to(torch.float64)  # only the columns needed, never the whole W_U
    b_u = model.b_U.detach()[cols].to(torch.float64)
    direction = w_u[:, 0] - (w_u[:, 1] if baseline is not None else 0.0)
    bias_u = b_u[0] - (b_u[1] if baseline is not None else 0.0)
    centres, w, b = _norm_parts(lm)
    stack = dec.stack - dec.stack.mean(-1, keepdim=True) if centres else dec.stack
    read = direction * w if w is not None else direction
    entries = (stack / dec.scale[:, :, None]) @ read  # [batch, components]
    extra = [bias_u.expand(entries.shape[0])]
    names = list(dec.names)
    if b is not None:
        extra.insert(0, (b @ direction).expand(entries.shape[0]))
        names.append("ln_final.bias")
    names.append("unembed.bias")
    return torch.cat([entries, torch.stack(extra, dim=1)], dim=1), names


def _real_totals(lm: LoadedModel, dec: _Decomposition, target: int, baseline: int | None) -> torch.Tensor:
    """The real logit (difference) per text, float64. With a soft-cap, the pre-cap logit the entries add up to
    (recomputed from the real final residual: TransformerLens exposes no hook between unembedding and cap)."""
    if _soft_cap(lm) > 0:
        model = lm.model
        resid = dec.final_resid.to(model.W_U.dtype)[:, None, :]
        with torch.no_grad():
            x = model.ln_final(resid) if hasattr(model, "ln_final") else resid
            logits = model.unembed(x).squeeze(1).to(torch.float64)
    else:
        logits = dec.logits.to(torch.float64)
    return logits[:, target] - (logits[:, baseline] if baseline is not None else 0.0)


def direct_logit_attribution(ctx: ToolContext, args: DLAIn) -> DLAOut:
    """Split the target's logit (or target - baseline) into each component's direct write, LN scale frozen."""
    lm = ctx.model
    batch = _encode(lm, args.texts, args.prepend_bos)
    target = _single_token(lm, args.target, "target")
    baseline = _single_token(lm, args.baseline, "baseline") if args.baseline is not None else None
    if baseline == target:
        raise InputError(f"baseline {args.baseline!r} is the target itself, so the difference is always 0: "
                         "choose a different baseline token or drop it")
    positions = [_resolve_position(args.position, n, i, args.texts[i], args.prepend_bos)
                 for i, n in enumerate(batch.lengths)]
    dec = _decompose(lm, batch, positions)
    entries, names = _attribute(lm, dec, target, baseline)
    totals = _real_totals(lm, dec, target, baseline)
    per_text_err = (entries.sum(1) - totals).abs()
    mean = entries.mean(0)
    name = lm.token_str
    items = [DLAItem(text=t, position=p, token=name(batch.ids[i][p]), total=round(float(totals[i]), _LOGIT_DIGITS),
                     residual_error=round_sig(float(per_text_err[i]), 3))
             for i, (t, p) in enumerate(zip(args.texts, positions, strict=True))]
    note = "The model soft-caps its logits: entries decompose the logit before the cap." if _soft_cap(lm) > 0 else ""
    return DLAOut(target=args.target, baseline=args.baseline,
                  contributions={n: round(float(v), _LOGIT_DIGITS) for n, v in zip(names, mean.tolist(), strict=True)},
                  total=round(float(totals.mean()), _LOGIT_DIGITS),
                  residual_error=round_sig(abs(float(mean.sum() - totals.mean())), 3), items=items, top_n=args.top_n,
                  note=note)


# ============================================================================= catalogue
TOOLS = (
    ToolSpec(name="logit_lens", level=CausalLevel.ASSOCIATION,
             input_model=LogitLensIn, output_model=LogitLensOut, fn=logit_lens, cost=Cost.FORWARD,
             description="Logit lens: decode the residual stream before every layer (and after the last) with the "
                         "model's final LayerNorm and unembedding, listing the top tokens and the rank/probability "
                         "of target tokens per layer. Use it to see at which layer an answer becomes readable. "
                         "Caveats: the final LN is an approximation on intermediate residuals and early layers are "
                         "often not in the vocabulary basis. Descriptive of one forward pass: association-level "
                         "evidence only, no intervention."),
    ToolSpec(name="direct_logit_attribution", level=CausalLevel.ASSOCIATION,
             input_model=DLAIn, output_model=DLAOut, fn=direct_logit_attribution,
             cost=Cost.FORWARD,
             description="Direct logit attribution: split a target token's logit (or target minus baseline logit) "
                         "at one position into the direct contribution of every component: embed, each attention "
                         "head aL.H, attention biases aL.bias, MLPs mL, and the final LN / unembedding biases "
                         "(entries sum to the real logit), averaged over texts. Use it to find candidate heads and "
                         "MLPs that write the answer. Direct effects only, final LN scale frozen: association-level, "
                         "not causal; confirm candidates with patching or ablation."),
)
