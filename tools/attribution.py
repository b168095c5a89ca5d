"""Attribution: how much each unit of a site (an SAE feature, an MLP neuron, an input token) contributes to a task
metric, estimated from gradients.

The technique
-------------
Write a site's activation as a function of *units* ``u``: an SAE spliced in at the site (``x = decode(f) + err``,
the reconstruction error ``err`` kept, so the model's output is unchanged), the MLP's hidden neurons (``mlp_post``:
``x = u``), or the input embeddings at ``resid_pre.0`` (one unit per position: the token there). The metric ``m``
is one of patching's (:func:`autoexplain.tools.patching.metric_values`: logit difference, answer probability, KL)
read at each prompt's answer position, on the **clean** prompts.

A unit's *contribution* is ``m(clean) - m(clean with that unit set to its baseline)``, the baseline being the
unit's value on the paired **corrupt** prompt (``baseline="corrupt"``, the resample ablation of patching) or
``0`` (``baseline="zero"``). Positive: the unit supports the clean behaviour. Measuring it exactly costs one
forward pass per unit; the estimates here cost one forward and one backward pass for all units at once:

* **gradient x activation** (``grad_x_act``, attribution patching; Nanda 2023, Syed et al. 2023):
  ``(u_clean - u_base) . dm/du`` at the clean run: the first-order Taylor estimate. Exact when ``m`` is linear in
  the unit between the two values; wrong where it saturates (a softmax that is already sure, a ReLU crossing
  zero). A known failure: under ``kl`` the gradient at the clean run is zero.
* **integrated gradients** (``ig``, Sundararajan et al. 2017; the node effects of Marks et al. 2024):
  ``(u_clean - u_base) . mean over alpha of dm/du`` at ``u_base + alpha (u_clean - u_base)``, for ``steps``
  midpoints alpha in (0, 1). The path interpolates **every unit of the site together**, so the attributions of
  all units (the error term included) sum to ``m(clean) - m(whole site at baseline)`` up to the Riemann error
  (the completeness axiom; reported as ``ig_gap``). A single unit's attribution is its share of that joint
  change, which differs from its effect when ablated alone if units interact.

Per position and summed: attributions are computed per prompt and position; ``per_position`` reports their mean
over prompts at each (padded) position — meaningful when the prompts share a template, as the toy tasks do — and
the unit's attribution is the sum over positions, averaged over prompts.

Causal level: an attribution is computed from gradients of the clean run, not from an intervention, so it is
**association**-level evidence. With ``verify_top_k`` the top units are also ablated one at a time (set to their
baseline at every position, everything else clean), which is **intervention**-level evidence for those units;
the output reports both numbers side by side, and the gap between them is the attribution's error.

Caveats: the SAE's features are what the attribution is about, not the model's own basis; the error term is a
unit like any other and can carry a large share (report it, never drop it). Zero baseline at ``resid_pre.0``
removes the position embedding too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, Field

from autoexplain.tools.errors import InputError
from autoexplain.tools.models import LoadedModel, hook_name
from autoexplain.tools.patching import (
    TaskArgs,
    _attention_mask,
    _metric_positions,
    default_metric_for,
    load_task_for,
    metric_values,
    summary_fit,
)
from autoexplain.tools.registry import Cost, ToolContext, ToolOutput, ToolSpec, round_sig
from autoexplain.tools.vocab import CausalLevel, PatchMetric, Site, SiteKind

if TYPE_CHECKING:
    from autoexplain.tools.data import TokenizedTask
    from autoexplain.tools.saes import LoadedSAE


class AttrMethod(StrEnum):
    GRAD_X_ACT = "grad_x_act"
    IG = "ig"


class Baseline(StrEnum):
    CORRUPT = "corrupt"
    ZERO = "zero"


class Basis(StrEnum):
    """What the units of a site are."""

    SAE = "sae"
    NEURON = "neuron"
    TOKEN = "token"


#: Rows (prompts x interpolation steps) per forward pass on CPU / CUDA.
CPU_ROWS = 128
CUDA_ROWS = 512


def rows_per_pass(device: torch.device) -> int:
    return CUDA_ROWS if device.type == "cuda" else CPU_ROWS


def ig_alphas(method: AttrMethod | str, steps: int) -> list[float]:
    """Interpolation points: ``[1.0]`` (the clean run) for grad x act; ``steps`` midpoints of (0, 1) for IG."""
    if AttrMethod(method) is AttrMethod.GRAD_X_ACT:
        return [1.0]
    if steps < 1:
        raise InputError(f"steps must be >= 1 for integrated gradients, got {steps}")
    return [(k + 0.5) / steps for k in range(steps)]


# ============================================================================= prompts
@dataclass
class Chunk:
    """Prompts run together: tokens, attention mask, metric positions and answers (on the model's device)."""

    rows: slice
    clean: torch.Tensor
    corrupt: torch.Tensor
    attn: torch.Tensor
    pos: torch.Tensor
    answers: torch.Tensor
    wrong: torch.Tensor
    clean_logp: torch.Tensor | None = None  # [b, vocab], for the KL metric

    @property
    def size(self) -> int:
        return int(self.clean.shape[0])

    def metric(self, logits: torch.Tensor, metric: PatchMetric, reps: int = 1) -> torch.Tensor:
        """Per-row metric of answer-position logits ``[reps * b, vocab]`` (copy k in rows k*b...)."""
        def rep(t: torch.Tensor) -> torch.Tensor:
            return t if reps == 1 else t.repeat(reps, *([1] * (t.dim() - 1)))

        logp = rep(self.clean_logp) if self.clean_logp is not None else None
        return metric_values(logits, metric, rep(self.answers), rep(self.wrong), logp)


def task_chunks(lm: LoadedModel, task: TokenizedTask, metric: PatchMetric, *, position: int | None = None,
                batch_size: int = 64) -> list[Chunk]:
    """The task's prompts in chunks of ``batch_size``; refuses ``logit_diff`` on prompts without wrong answers."""
    if metric is PatchMetric.LOGIT_DIFF:
        has_wrong = task.wrong.shape[-1] > 0 and bool((task.wrong >= 0).any(-1).all())
        if not has_wrong:
            raise InputError("some prompts have no wrong_answers, so logit_diff is undefined: add wrong_answers "
                             "to every prompt or use metric answer_prob or kl")
    positions = _metric_positions(task, position)
    dev = torch.device(lm.device)
    out = []
    for start in range(0, task.n_prompts, max(1, batch_size)):
        rows = slice(start, min(start + batch_size, task.n_prompts))
        c = Chunk(rows=rows, clean=task.clean[rows].to(dev), corrupt=task.corrupt[rows].to(dev),
                  attn=_attention_mask(task, rows).to(dev), pos=positions[rows].to(dev),
                  answers=task.answers[rows].to(dev), wrong=task.wrong[rows].to(dev))
        if metric is PatchMetric.KL:
            with torch.no_grad():
                c.clean_logp = answer_logits(lm, c, _plain(lm, c.clean, c.attn)).log_softmax(-1)
        out.append(c)
    return out


def _plain(lm: LoadedModel, tokens: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    return lm.model(tokens, attention_mask=attn, stop_at_layer=lm.n_layers)


def unembed(lm: LoadedModel, resid: torch.Tensor) -> torch.Tensor:
    """Logits (float32) from final residuals ``[..., d_model]``: final norm, unembedding, soft-cap."""
    model = lm.model
    x = model.ln_final(resid) if model.cfg.normalization_type is not None else resid
    logits = model.unembed(x).float()
    cap = float(getattr(model.cfg, "output_logits_soft_cap", 0.0) or 0.0)
    return cap * torch.tanh(logits / cap) if cap > 0 else logits


def answer_logits(lm: LoadedModel, chunk: Chunk, resid: torch.Tensor, reps: int = 1) -> torch.Tensor:
    """Answer-position logits ``[reps * b, vocab]`` from final residuals ``[reps * b, p, d]``."""
    rows = torch.arange(reps * chunk.size, device=resid.device)
    return unembed(lm, resid[rows, chunk.pos.repeat(reps)])


# ============================================================================= sites as units
class SiteUnits:
    """A site seen as units: how to read them from the site's activation and how to write the activation back.

    ``state(act)`` gives the units' values as a tuple of tensors (an SAE: features ``[b, p, d_sae]`` and the error
    ``[b, p, d_in]``; neurons and tokens: the activation itself); ``compose(state)`` rebuilds the activation, so
    ``compose(state(act)) == act`` (for an SAE exactly, since the error term is what the reconstruction misses).

    A transcoder (:class:`~autoexplain.tools.saes.LoadedTranscoder`) reads ``site`` (its input, ``in_hook``) but is
    spliced at its output hook (``hook``): ``state(act, act_in)`` is ``(encode(act_in), act - decode(f))`` with
    ``act`` the output activation and ``act_in`` the input activation of the same forward pass, so the error term
    is true output - transcoder(input) and ``compose(state) == act`` again. ``read_hooks`` lists the hooks a state
    needs; :meth:`state_from` builds one from captured activations.
    """

    def __init__(self, lm: LoadedModel, site: Site, sae: LoadedSAE | None = None) -> None:
        self.lm = lm
        self.site = site
        self.sae = sae
        self.hook = lm.validate_site(site)
        #: a transcoder's input hook (``hook`` is then its output hook); None otherwise
        self.in_hook: str | None = None
        if sae is not None and sae.site != site:
            raise InputError(f"SAE {sae.spec!r} reads {sae.site}, not {site}")
        if sae is not None and sae.is_transcoder:
            self.in_hook, self.hook = self.hook, lm.validate_site(sae.out_site)
        if sae is not None and getattr(sae.sae.cfg, "reshape_activations", "none") == "hook_z":
            raise InputError(f"SAE {sae.spec!r} reads hook_z (per-head values): attribution supports SAEs on "
                             "residual, attention-output and MLP sites only")

    @property
    def basis(self) -> Basis:
        if self.sae is not None:
            return Basis.SAE
        return Basis.TOKEN if self.site == Site(kind=SiteKind.RESID_PRE, layer=0) else Basis.NEURON

    @property
    def layer(self) -> int:
        """The layer a re-run must start from: the site's (a transcoder's input layer)."""
        return self.site.layer

    @property
    def sites(self) -> list[Site]:
        """Every site the units touch (a transcoder: input and output), for ``sites_enabled``."""
        return [self.site] if self.sae is None or not self.sae.is_transcoder else [self.site, self.sae.out_site]

    @property
    def read_hooks(self) -> list[str]:
        """The hooks whose activations a state is computed from (``hook`` last)."""
        return [self.hook] if self.in_hook is None else [self.in_hook, self.hook]

    def state(self, act: torch.Tensor, act_in: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """The units' values from the activation at ``hook`` (a transcoder also needs ``act_in``, the activation at
        its input hook in the same forward pass)."""
        if self.sae is None:
            return (act,)
        if self.in_hook is not None and act_in is None:
            raise RuntimeError(f"transcoder {self.sae.spec!r}: its state needs the input activation at {self.in_hook}")
        f = self.sae.sae.encode(act if act_in is None else act_in)
        return (f, act - self.sae.sae.decode(f))

    def state_from(self, got: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The units' values from captured activations keyed by hook name (see :meth:`read_hooks`)."""
        return self.state(got[self.hook], None if self.in_hook is None else got[self.in_hook])

    def compose(self, state: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.sae is None:
            return state[0]
        return self.sae.sae.decode(state[0]) + state[1]

    def unit_values(self, state: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-unit products summed to unit level: ``[b, p, n_units]`` from a state-shaped tensor tuple (e.g.
        ``grad * delta``). SAE: the features then one error unit; neurons: each neuron; tokens: one unit per
        position (summed over the embedding)."""
        if self.sae is not None:
            return torch.cat([state[0], state[1].sum(-1, keepdim=True)], dim=-1)
        if self.basis is Basis.TOKEN:
            return state[0].sum(-1, keepdim=True)
        return state[0]

    def unit_names(self, n: int) -> list[str]:
        if self.sae is not None:
            return [f"{self.sae.sae_id}#{i}" for i in range(n - 1)] + [f"error@{self.site}"]
        if self.basis is Basis.TOKEN:
            return ["token"]
        return [f"{self.site}[{i}]" for i in range(n)]


def capture(lm: LoadedModel, tokens: torch.Tensor, attn: torch.Tensor, hooks: Sequence[str],
            *, resid_pre_layers: Sequence[int] = ()) -> dict[str, torch.Tensor]:
    """One no-grad forward pass keeping the activation at each hook (and ``blocks.L.hook_resid_pre`` for the given
    layers), stopping after the last layer any of them needs."""
    names = set(hooks) | {hook_name(Site(kind=SiteKind.RESID_PRE, layer=L)) for L in resid_pre_layers}
    got: dict[str, torch.Tensor] = {}

    def keep(act: torch.Tensor, hook: Any) -> None:
        got[hook.name] = act.detach()

    last = max(int(n.split(".")[1]) for n in names if n.startswith("blocks.")) + 1 if any(
        n.startswith("blocks.") for n in names) else lm.n_layers
    with torch.no_grad():
        lm.model.run_with_hooks(tokens, fwd_hooks=[(n, keep) for n in names], attention_mask=attn,
                                stop_at_layer=min(last, lm.n_layers))
    missing = names - set(got)
    if missing:
        raise InputError(f"hooks {sorted(missing)} never fired: this runtime cannot read these sites")
    return got


def run_from(lm: LoadedModel, chunk: Chunk, layer: int, resid_pre: torch.Tensor | None, reps: int,
             hooks: list[tuple[str, Callable[..., Any]]]) -> torch.Tensor:
    """Final residuals ``[reps * b, p, d]`` of the clean prompts (``reps`` copies), starting at ``layer`` from the
    cached clean ``resid_pre`` of that layer (layers before it are unaffected by the hooks)."""
    attn = chunk.attn.repeat(reps, 1)
    if layer == 0 or resid_pre is None:
        return lm.model.run_with_hooks(chunk.clean.repeat(reps, 1), fwd_hooks=hooks, attention_mask=attn,
                                       stop_at_layer=lm.n_layers)
    return lm.model.run_with_hooks(resid_pre.repeat(reps, 1, 1), fwd_hooks=hooks, attention_mask=attn,
                                   start_at_layer=layer, stop_at_layer=lm.n_layers)


def _rep(t: torch.Tensor, reps: int) -> torch.Tensor:
    return t if reps == 1 else t.repeat(reps, *([1] * (t.dim() - 1)))


def integrated_grads(lm: LoadedModel, chunk: Chunk, units: SiteUnits, clean: Sequence[torch.Tensor],
                     base: Sequence[torch.Tensor], alphas: Sequence[float], metric: PatchMetric,
                     resid_pre: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Mean over ``alphas`` of ``d m / d state`` (per prompt: the metric is summed over prompts, not averaged) with
    the site's state at ``base + alpha (clean - base)`` and everything else clean."""
    dev = chunk.clean.device
    per = max(1, rows_per_pass(dev) // max(1, chunk.size))
    total: list[torch.Tensor] | None = None
    with torch.enable_grad():
        for a0 in range(0, len(alphas), per):
            a = torch.tensor(list(alphas[a0:a0 + per]), device=dev)
            reps = int(a.shape[0])
            leaves = []
            for c, b in zip(clean, base, strict=True):
                aa = a.view(reps, *([1] * c.dim())).to(c.dtype)
                x = (b[None] + aa * (c - b)[None]).reshape(reps * c.shape[0], *c.shape[1:])
                leaves.append(x.detach().requires_grad_(True))

            def splice(act: torch.Tensor, hook: Any, leaves: list[torch.Tensor] = leaves) -> torch.Tensor:
                return units.compose(leaves).to(act.dtype)

            resid = run_from(lm, chunk, units.layer, resid_pre, reps, [(units.hook, splice)])
            logits = answer_logits(lm, chunk, resid, reps)
            loss = chunk.metric(logits, metric, reps).sum()
            grads = torch.autograd.grad(loss, leaves)
            summed = [g.detach().reshape(reps, chunk.size, *g.shape[1:]).sum(0) for g in grads]
            total = summed if total is None else [t + s for t, s in zip(total, summed, strict=True)]
    assert total is not None
    return tuple(t / len(alphas) for t in total)


def site_metric(lm: LoadedModel, chunk: Chunk, units: SiteUnits, states: Sequence[Sequence[torch.Tensor]],
                metric: PatchMetric, resid_pre: torch.Tensor | None) -> torch.Tensor:
    """Per-prompt metric ``[K, b]`` for K site states (each a tuple of ``[b, ...]`` tensors), all in one batch
    (split to fit the row budget)."""
    out = []
    per = max(1, rows_per_pass(chunk.clean.device) // max(1, chunk.size))
    with torch.no_grad():
        for k0 in range(0, len(states), per):
            block = states[k0:k0 + per]
            reps = len(block)
            stacked = [torch.cat([s[i] for s in block], 0) for i in range(len(block[0]))]

            def splice(act: torch.Tensor, hook: Any, stacked: list[torch.Tensor] = stacked) -> torch.Tensor:
                return units.compose(stacked).to(act.dtype)

            resid = run_from(lm, chunk, units.layer, resid_pre, reps, [(units.hook, splice)])
            logits = answer_logits(lm, chunk, resid, reps)
            out.append(chunk.metric(logits, metric, reps).view(reps, chunk.size))
    return torch.cat(out, 0)


# ============================================================================= the attribution
@dataclass
class Attribution:
    """Attributions of every unit of one site (tensors on the CPU).

    ``per_prompt_pos``: ``[n_prompts, n_pos, n_units]``; ``values``: ``[n_units]`` (sum over positions, mean over
    prompts). For an SAE the last unit is the error term. ``m_clean``, ``m_base``: the metric with nothing, and
    with the whole site, at baseline; ``ig_gap``: ``values.sum() - (m_clean - m_base)`` (the completeness error).
    """

    site: Site
    basis: Basis
    method: AttrMethod
    baseline: Baseline
    metric: PatchMetric
    steps: int
    names: list[str]
    per_prompt_pos: torch.Tensor
    values: torch.Tensor
    m_clean: float
    m_base: float
    seq_lens: torch.Tensor
    ablation: dict[int, float] | None = None  # unit -> m_clean - m(unit at baseline), for verified units

    @property
    def ig_gap(self) -> float:
        return float(self.values.sum()) - (self.m_clean - self.m_base)

    def per_position(self) -> torch.Tensor:
        """``[n_pos, n_units]``: mean over prompts at each padded position (positions past a prompt's end count 0)."""
        return self.per_prompt_pos.mean(0)

    def top(self, n: int) -> list[int]:
        return [int(i) for i in self.values.abs().argsort(descending=True)[:n]]


def attribute(lm: LoadedModel, task: TokenizedTask, site: Site, *, sae: LoadedSAE | None = None,
              method: AttrMethod | str = AttrMethod.IG, baseline: Baseline | str = Baseline.CORRUPT,
              metric: PatchMetric | str | None = None, steps: int = 16, position: int | None = None,
              verify_top_k: int = 0, batch_size: int = 64) -> Attribution:
    """Attribute the task metric to the units of ``site`` (see the module doc). ``sae``: the SAE spliced in at
    ``site`` (its features are the units); without one, ``mlp_post.L`` gives neurons and ``resid_pre.0`` tokens."""
    method, baseline = AttrMethod(method), Baseline(baseline)
    metric = PatchMetric(metric) if metric is not None else default_metric_for(task)
    if sae is None and site.kind not in (SiteKind.MLP_POST, SiteKind.RESID_PRE):
        raise InputError(f"site {site}: without an SAE, attribute to neurons (mlp_post.L) or tokens (resid_pre.0); "
                         "pass an SAE for features at other sites")
    if sae is None and site.kind is SiteKind.RESID_PRE and site.layer != 0:
        raise InputError(f"site {site}: token attribution reads resid_pre.0 (the embeddings)")
    units = SiteUnits(lm, site, sae)
    alphas = ig_alphas(method, steps)
    chunks = task_chunks(lm, task, metric, position=position, batch_size=batch_size)
    per_pp: list[torch.Tensor] = []
    m_clean: list[torch.Tensor] = []
    m_base: list[torch.Tensor] = []
    kept: list[tuple[Chunk, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], torch.Tensor | None]] = []
    with lm.sites_enabled(units.sites):
        for chunk in chunks:
            layers = [site.layer] if site.layer > 0 else []
            got = capture(lm, chunk.clean, chunk.attn, units.read_hooks, resid_pre_layers=layers)
            with torch.no_grad():
                clean = units.state_from(got)
                if baseline is Baseline.CORRUPT:
                    base = units.state_from(capture(lm, chunk.corrupt, chunk.attn, units.read_hooks))
                else:
                    base = tuple(torch.zeros_like(t) for t in clean)
            resid = got.get(hook_name(Site(kind=SiteKind.RESID_PRE, layer=site.layer))) if layers else None
            grads = integrated_grads(lm, chunk, units, clean, base, alphas, metric, resid)
            contrib = units.unit_values([g * (c - b) for g, c, b in zip(grads, clean, base, strict=True)])
            per_pp.append(contrib.detach().float().cpu())
            ends = site_metric(lm, chunk, units, [clean, base], metric, resid)
            m_clean.append(ends[0].cpu())
            m_base.append(ends[1].cpu())
            kept.append((chunk, clean, base, resid))
    width = max(t.shape[1] for t in per_pp)
    pp = torch.cat([torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[1])) for t in per_pp], 0)
    values = pp.sum(1).mean(0)
    names = units.unit_names(int(values.shape[0]))
    if units.basis is Basis.TOKEN:  # one unit per position: the token there
        values = pp[..., 0].mean(0)
        names = [f"pos {p}" for p in range(width)]
    res = Attribution(site=site, basis=units.basis, method=method, baseline=baseline, metric=metric,
                      steps=len(alphas), names=names, per_prompt_pos=pp, values=values,
                      m_clean=float(torch.cat(m_clean).double().mean()),
                      m_base=float(torch.cat(m_base).double().mean()),
                      seq_lens=task.seq_lens.clone())
    if verify_top_k > 0:
        res.ablation = _verify(lm, units, kept, res, verify_top_k, metric, task.n_prompts)
    return res


def _ablated_state(units: SiteUnits, clean: tuple[torch.Tensor, ...], base: tuple[torch.Tensor, ...],
                   unit: int) -> list[torch.Tensor]:
    """The clean state with one unit at its baseline (every position)."""
    out = [c.clone() for c in clean]
    if units.basis is Basis.TOKEN:
        if unit < out[0].shape[1]:
            out[0][:, unit] = base[0][:, unit]
        return out
    if units.sae is not None and unit == clean[0].shape[-1]:  # the error unit
        out[1] = base[1].clone()
        return out
    out[0][..., unit] = base[0][..., unit]
    return out


def _verify(lm: LoadedModel, units: SiteUnits, kept: list[Any], res: Attribution, k: int, metric: PatchMetric,
            n_prompts: int) -> dict[int, float]:
    """``m_clean - m(unit at baseline)`` for the top-k units by |attribution|, one ablation per unit."""
    top = res.top(k)
    sums = torch.zeros(len(top), dtype=torch.float64)
    with lm.sites_enabled(units.sites):
        for chunk, clean, base, resid in kept:
            states = [clean] + [_ablated_state(units, clean, base, u) for u in top]
            vals = site_metric(lm, chunk, units, states, metric, resid).double().cpu()
            sums += (vals[0:1] - vals[1:]).sum(1)
    return {u: float(s / n_prompts) for u, s in zip(top, sums, strict=True)}


# ============================================================================= tool
class AttributionIn(TaskArgs):
    site: Site = Field(description="where the units are: an SAE's site (with sae_id), mlp_post.L (neurons) or "
                                   "resid_pre.0 (tokens)")
    sae_id: str | None = Field(default=None, description="the SAE spliced in at the site (its features are the "
                                                         "units; the error term is kept); none: neurons or tokens")
    method: AttrMethod = Field(default=AttrMethod.IG, description="ig (integrated gradients) or grad_x_act")
    baseline: Baseline = Field(default=Baseline.CORRUPT, description="corrupt (the paired corrupt prompt's values, "
                                                                     "resample ablation) or zero")
    metric: PatchMetric | None = Field(default=None, description="logit_diff (default), answer_prob or kl")
    steps: int = Field(default=16, ge=1, le=128, description="integrated-gradient steps")
    verify_top_k: int = Field(default=0, ge=0, le=64, description="also ablate the top-k units one at a time "
                                                                 "(intervention-level check)")
    top_n: int = Field(default=12, ge=1, le=100, description="units listed in the output")


class UnitAttribution(BaseModel):
    unit: str = Field(description="'sae_id#12', 'error@resid_post.0', 'mlp_post.1[37]' or 'pos 3'")
    index: int = Field(description="unit index (features, then the error term; neurons; positions)")
    attribution: float = Field(description="contribution to m(clean) - m(baseline): summed over positions, mean "
                                           "over prompts")
    top_position: int | None = Field(description="the position with the largest |mean attribution|")
    ablation_effect: float | None = Field(default=None, description="m(clean) - m(this unit alone at baseline); "
                                                                    "null: not verified")


class AttributionOut(ToolOutput):
    site: Site
    basis: Basis
    method: AttrMethod
    baseline: Baseline
    metric: PatchMetric
    m_clean: float
    m_base: float = Field(description="the metric with the whole site at baseline")
    total: float = Field(description="sum of all units' attributions (IG: ~ m_clean - m_base)")
    n_units: int
    units: list[UnitAttribution]
    level: CausalLevel

    def summary_text(self) -> str:
        head = (f"{self.method.value} attribution to {self.basis.value} units at {self.site} ({self.baseline.value} "
                f"baseline, metric {self.metric.value}): m(clean) {self.m_clean:.4g}, m(site at baseline) "
                f"{self.m_base:.4g}, sum of {self.n_units} attributions {self.total:.4g}. "
                f"{self.level.value.capitalize()}-level evidence.")
        lines = []
        for u in self.units:
            abl = "" if u.ablation_effect is None else f", ablated alone {round_sig(u.ablation_effect)}"
            pos = "" if u.top_position is None else f" (mostly at pos {u.top_position})"
            lines.append(f"{u.unit}: {round_sig(u.attribution)}{pos}{abl}")
        return summary_fit(head, lines)


def attribution_output(res: Attribution, top_n: int) -> AttributionOut:
    pp = res.per_position()
    units = []
    for i in res.top(top_n):
        col = pp[:, i] if res.basis is not Basis.TOKEN else None
        units.append(UnitAttribution(
            unit=res.names[i], index=i, attribution=float(res.values[i]),
            top_position=int(col.abs().argmax()) if col is not None else i,
            ablation_effect=None if res.ablation is None else res.ablation.get(i)))
    level = CausalLevel.INTERVENTION if res.ablation else CausalLevel.ASSOCIATION
    return AttributionOut(site=res.site, basis=res.basis, method=res.method, baseline=res.baseline,
                          metric=res.metric, m_clean=res.m_clean, m_base=res.m_base, total=float(res.values.sum()),
                          n_units=len(res.names), units=units, level=level)


def attribution_tool(ctx: ToolContext, args: AttributionIn) -> AttributionOut:
    """Attribute a task metric to SAE features, neurons or tokens."""
    sae = ctx.sae(args.sae_id) if args.sae_id is not None else None
    site = args.site
    if sae is not None and sae.site != site:
        raise InputError(f"SAE {args.sae_id} reads {sae.site}, not {site}: pass site {sae.site}")
    task = load_task_for(ctx.model, args)
    res = attribute(ctx.model, task, site, sae=sae, method=args.method, baseline=args.baseline, metric=args.metric,
                    steps=args.steps, position=args.position, verify_top_k=args.verify_top_k)
    return attribution_output(res, args.top_n)


TOOLS = (
    ToolSpec(name="attribution", level=CausalLevel.ASSOCIATION, input_model=AttributionIn,
             output_model=AttributionOut, fn=attribution_tool, cost=Cost.FORWARD,
             description="Gradient-based attribution of a task metric (logit difference, answer probability or KL "
                         "at the answer, clean vs corrupt prompts) to the units of one site: SAE features (the SAE "
                         "spliced in, its error term kept and reported as a unit), MLP neurons (mlp_post.L) or input "
                         "tokens (resid_pre.0). Integrated gradients (default) or gradient x activation, summed over "
                         "positions. Association-level evidence from gradients; verify_top_k ablates the top units "
                         "one at a time and reports the measured effect next to each estimate "
                         "(intervention-level)."),
)
