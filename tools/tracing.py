"""Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", ROME).

The technique
-------------
Take a prompt whose answer depends on a subject ("The red owl lives in the" -> " hive"). Three runs:

1. **clean**: the prompt as it is; cache every state we may restore.
2. **corrupted**: the same prompt with Gaussian noise added to the input embeddings of the subject's tokens, so
   the model can no longer tell which subject it is; the answer's probability drops.
3. **restored**: the corrupted run again, but one state at one (layer, position) is set back to its clean value;
   everything else (downstream of it included) is recomputed from the corrupted run.

The **indirect effect** of a state is ``p_restored(answer) - p_corrupted(answer)``: how much of the answer's
probability that one clean state brings back. It is averaged over noise samples and prompts. The normalised
effect divides the mean effect by ``mean(p_clean - p_corrupted)`` (1 = the state alone restores the clean
probability; a ratio of means, not a mean of per-prompt ratios, so prompts where the noise barely hurts do not
blow it up). Three kinds of state are traced, each a ``[layers x positions]`` grid:

* ``resid``: the residual stream leaving block L (``resid_post.L``, ROME's "hidden state" at layer L);
* ``attn``: the attention output of block L (``attn_out.L``);
* ``mlp``: the MLP output of block L (``mlp_out.L``).

ROME restores a *window* of layers for attention and MLP states (10 for GPT-2-XL): the cell at layer L restores
layers ``L - w//2 .. L + w - w//2 - 1`` (clipped), because one layer's MLP output is often a small part of a
distributed write. ``window`` applies to ``attn`` and ``mlp`` only; a residual state already carries everything
below it, so residual cells always restore one layer (as in ROME).

The noise follows ROME: i.i.d. Gaussian with standard deviation ``noise x std(token embeddings)`` (``noise``
defaults to 3; the standard deviation is over all entries of the model's token-embedding matrix ``W_E``, where
ROME uses the embeddings of its subject tokens), added to the subject positions of ``resid_pre.0`` (token
embedding + position embedding; additive noise there equals noise on the token embedding alone). The same
``n_samples`` noise draws are used for every cell of a prompt (seeded per prompt), so each effect is a paired
difference against the same corrupted runs. The noise samples of one cell chunk run in one batched forward pass.

Prompts the model does not know
-------------------------------
Tracing a fact the model does not know measures nothing useful: by default (``only_known=True``) a prompt whose
clean top-1 token is not the answer is kept in the output, flagged (``known=False``) and left out of the average;
if no prompt is left the call is refused (:class:`InputError`). With ``only_known=False`` such prompts are
averaged in and still flagged.

Aligning prompts
----------------
With prompts of one length and one subject span the grid's columns are token positions (``align="position"``).
Otherwise columns are ROME's position roles (``align="role"``): ``before subject``, ``first subject``, ``middle
subject``, ``last subject``, ``first after subject``, ``further tokens``, ``last token`` (a one-token subject is its
own last token); a prompt's value for a role is the mean over its positions with that role, a column no prompt has
is ``None``. ``align="auto"`` (default) picks ``position`` when it can.

Caveats
-------
* Intervention-level evidence (:attr:`CausalLevel.INTERVENTION`): it shows where clean information is *sufficient*
  to restore the answer given a corrupted subject, not what the state computes, and not that it is necessary
  (a state can restore the answer although ablating it would change nothing: redundancy).
* Noise scale matters: too little noise leaves the subject recognisable (small ``p_clean - p_corrupted``; the
  normalised effect is then ``None`` below :data:`MIN_DROP`), too much pushes activations far off-distribution.
  Models without LayerNorm react to noise only linearly along the directions they read.
* Restoring a state at a subject position puts back its clean value but leaves the noise in every other state at
  that position, so restoring one MLP output is usually partial; windows compensate for distributed writes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from autoexplain.tools.errors import InputError
from autoexplain.tools.registry import Cost, ToolContext, ToolOutput, ToolSpec, round_sig, short_repr
from autoexplain.tools.vocab import CausalLevel, Site, SiteKind

if TYPE_CHECKING:
    from autoexplain.tools.models import LoadedModel

StateKind = Literal["resid", "attn", "mlp"]
STATE_KINDS: tuple[StateKind, ...] = ("resid", "attn", "mlp")
#: The site kind each traced state restores.
STATE_SITES: dict[StateKind, SiteKind] = {"resid": SiteKind.RESID_POST, "attn": SiteKind.ATTN_OUT,
                                          "mlp": SiteKind.MLP_OUT}
#: ROME's position roles (columns of a role-aligned grid), in order.
ROLES: tuple[str, ...] = ("before subject", "first subject", "middle subject", "last subject",
                          "first after subject", "further tokens", "last token")
#: Below this mean drop ``p_clean - p_corrupted`` the normalised effect is not computed (None, with a reason).
MIN_DROP = 1e-3
_DIGITS = 5


# ============================================================================= results
class TraceCell(BaseModel):
    """One cell of a grid: a state kind at a layer and a column (a position or a role)."""

    model_config = ConfigDict(frozen=True)

    state: StateKind
    layer: int
    column: int
    label: str  # the column's label: "3 ' owl'" (position) or "last subject" (role)
    site: str  # the vocab site restored (the window's centre layer for attn/mlp windows)
    effect: float  # mean indirect effect p_restored - p_corrupted
    normalized: float | None  # effect / mean(p_clean - p_corrupted)


class StateGrid(BaseModel):
    """The grid of one state kind: ``effect[layer][column]`` (``None`` where no prompt has that column)."""

    state: StateKind
    sites: list[str]  # the site of each row, e.g. resid_post.0
    window: int  # layers restored together per cell (1 for resid)
    effect: list[list[float | None]]
    normalized: list[list[float | None]] | None  # None when the mean drop is below MIN_DROP
    peak: TraceCell | None  # the cell with the largest effect (None if the grid is empty)


class PromptTrace(BaseModel):
    """One prompt: its tokens, subject span, the three probabilities and whether it entered the average."""

    prompt: str | None  # None for prompts given as token ids
    tokens: list[str]
    token_ids: list[int]
    subject: tuple[int, int]  # token positions [start, end), BOS counted
    answer: str
    answer_id: int
    p_clean: float
    p_corrupted: float
    p_corrupted_std: float  # over noise samples
    clean_top: str  # the model's top-1 token on the clean prompt
    known: bool  # clean top-1 == answer
    used: bool  # entered the average
    effect: dict[str, list[list[float]]]  # per state kind, [layer][position] for this prompt alone


class TraceGrid(ToolOutput):
    """Causal-tracing result: one grid per state kind, per-prompt detail, and where the effect peaks."""

    alignment: Literal["position", "role"]
    columns: list[str]
    grids: dict[str, StateGrid]
    p_clean: float  # means over the prompts used
    p_corrupted: float
    noise: float  # the multiplier
    noise_scale: float  # the Gaussian's standard deviation actually used (noise x embedding std)
    embed_std: float
    n_samples: int
    window: int
    seed: int
    n_used: int
    prompts: list[PromptTrace]
    peak: TraceCell | None  # the largest effect over all grids
    notes: list[str] = Field(default_factory=list)
    top_n: int = 3

    def subject_positions(self) -> list[list[int]]:
        return [list(range(*p.subject)) for p in self.prompts]

    def summary_text(self) -> str:
        lines = [f"causal tracing on {self.n_used}/{len(self.prompts)} prompts ({self.alignment}-aligned), "
                 f"noise {self.noise} x embed std {round_sig(self.embed_std, 3)} = {round_sig(self.noise_scale, 3)}, "
                 f"{self.n_samples} samples, window {self.window}: p_clean {round_sig(self.p_clean, 3)}, "
                 f"p_corrupted {round_sig(self.p_corrupted, 3)}"]
        if self.peak is not None:
            p = self.peak
            lines.append(f"peak: {p.state} at layer {p.layer}, {p.label} (effect {round_sig(p.effect, 3)}"
                         + (f", {round_sig(p.normalized, 3)} of the drop" if p.normalized is not None else "")
                         + ")")
        for kind, grid in self.grids.items():
            cells = _cells(grid, self.columns)
            cells.sort(key=lambda c: -c.effect)
            top = ", ".join(f"L{c.layer} {c.label}: {round_sig(c.effect, 3)}" for c in cells[: self.top_n])
            lines.append(f"{kind} (window {grid.window}) top: {top}")
        unknown = [i for i, p in enumerate(self.prompts) if not p.known]
        if unknown:
            lines.append(f"{len(unknown)} prompt(s) not known by the model (clean top-1 is not the answer): "
                         f"{unknown[:8]}{' …' if len(unknown) > 8 else ''}"
                         + ("; left out of the average" if any(not self.prompts[i].used for i in unknown) else ""))
        lines.extend(self.notes)
        return "\n".join(lines)


def _cells(grid: StateGrid, columns: list[str]) -> list[TraceCell]:
    out = []
    for layer, row in enumerate(grid.effect):
        for col, value in enumerate(row):
            if value is None:
                continue
            norm = grid.normalized[layer][col] if grid.normalized is not None else None
            out.append(TraceCell(state=grid.state, layer=layer, column=col, label=columns[col],
                                 site=grid.sites[layer], effect=value, normalized=norm))
    return out


# ============================================================================= inputs
@dataclass(frozen=True)
class _Prompt:
    text: str | None
    ids: list[int]
    span: tuple[int, int]
    answer: str
    answer_id: int


def _token_ids(lm: LoadedModel, prompt: str | Sequence[int], index: int) -> list[int]:
    if isinstance(prompt, str):
        if lm.tokenizer is None:
            raise InputError(f"prompt {index} is text but this model has no tokenizer: pass token ids")
        if not prompt:
            raise InputError(f"prompt {index} is empty: pass a non-empty prompt")
        ids = [int(i) for i in lm.to_tokens(prompt, truncate=False)[0].tolist()]
    else:
        ids = [int(i) for i in prompt]
        if not ids:
            raise InputError(f"prompt {index} has no tokens")
        bad = [i for i in ids if not 0 <= i < lm.model.cfg.d_vocab]
        if bad:
            raise InputError(f"prompt {index} has token id {bad[0]} outside the vocabulary "
                             f"0..{lm.model.cfg.d_vocab - 1}")
    if len(ids) > lm.n_ctx:
        raise InputError(f"prompt {index} has {len(ids)} tokens, more than the model's context of {lm.n_ctx}")
    return ids


def locate_subject(lm: LoadedModel, ids: list[int], subject: str, *, index: int = 0) -> tuple[int, int]:
    """The token span ``[start, end)`` of the first occurrence of ``subject`` in the decoded prompt ``ids``: every
    token whose characters overlap it (ROME's rule). :class:`InputError` if the subject is not in the prompt."""
    if not subject.strip():
        raise InputError(f"subject of prompt {index} is empty: name the subject as it appears in the prompt")
    pieces = [lm.token_str(i) for i in ids]
    start_char = [0]
    for p in pieces:
        start_char.append(start_char[-1] + len(p))
    text = "".join(pieces)
    at = text.find(subject)
    if at < 0:
        at = text.find(subject.strip())
        subject = subject.strip()
    if at < 0:
        raise InputError(f"subject {subject!r} is not in prompt {index} ({short_repr(text, 60)}): give the subject "
                         "exactly as it is written there (case matters), or a token span")
    end = at + len(subject)
    toks = [i for i in range(len(ids)) if start_char[i] < end and start_char[i + 1] > at]
    return toks[0], toks[-1] + 1


def _answer_id(lm: LoadedModel, answer: str | int, index: int) -> tuple[str, int]:
    if isinstance(answer, int):
        if not 0 <= answer < lm.model.cfg.d_vocab:
            raise InputError(f"answer {answer} of prompt {index} is outside the vocabulary "
                             f"0..{lm.model.cfg.d_vocab - 1}")
        return (lm.token_str(answer) if lm.tokenizer is not None else f"<{answer}>"), answer
    if lm.tokenizer is None:
        raise InputError(f"answer {answer!r} of prompt {index} is text but this model has no tokenizer: pass a "
                         "token id")
    ids = lm.tokenizer(answer, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = [lm.tokenizer.decode([i]) for i in ids]
        raise InputError(f"answer {answer!r} of prompt {index} tokenises to {len(ids)} tokens {pieces}: causal "
                         "tracing measures one next token (leading spaces matter: ' barn' and 'barn' differ)")
    if ids[0] >= lm.model.cfg.d_vocab:
        raise InputError(f"answer {answer!r} has id {ids[0]}, outside the model's vocabulary")
    return answer, int(ids[0])


def _prompts(lm: LoadedModel, prompts: Sequence[str | Sequence[int]],
             subject: str | tuple[int, int] | Sequence[str | tuple[int, int]],
             answers: Sequence[str | int]) -> list[_Prompt]:
    if isinstance(prompts, str) or not prompts:
        raise InputError("prompts must be a non-empty list of prompts (texts or token-id lists)")
    n = len(prompts)
    subjects: list[str | tuple[int, int]]
    if isinstance(subject, str) or (isinstance(subject, tuple) and len(subject) == 2
                                    and all(isinstance(x, int) for x in subject)):
        subjects = [subject] * n  # type: ignore[list-item]
    else:
        subjects = list(subject)  # type: ignore[arg-type]
    if isinstance(answers, (str, int)):
        raise InputError("answers must be a list with one answer per prompt")
    if len(subjects) != n or len(answers) != n:
        raise InputError(f"got {n} prompts, {len(subjects)} subjects and {len(answers)} answers: give one subject "
                         "(or one for all) and one answer per prompt")
    out = []
    for i, (prompt, subj, ans) in enumerate(zip(prompts, subjects, answers, strict=True)):
        ids = _token_ids(lm, prompt, i)
        if isinstance(subj, str):
            if lm.tokenizer is None:
                raise InputError(f"subject {subj!r} of prompt {i} is text but this model has no tokenizer: pass a "
                                 "token span (start, end)")
            span = locate_subject(lm, ids, subj, index=i)
        else:
            try:
                span = (int(subj[0]), int(subj[1]))
            except (TypeError, ValueError, IndexError):
                raise InputError(f"subject of prompt {i} must be a string or a token span (start, end)") from None
            if not 0 <= span[0] < span[1] <= len(ids):
                raise InputError(f"subject span {span} of prompt {i} is not inside its {len(ids)} tokens: use "
                                 "0 <= start < end <= length (BOS counted)")
        text, answer_id = _answer_id(lm, ans, i)
        out.append(_Prompt(prompt if isinstance(prompt, str) else None, ids, span, text, answer_id))
    return out


def embedding_std(lm: LoadedModel) -> float:
    """The standard deviation of all entries of the token-embedding matrix (the unit of the noise)."""
    return float(lm.model.W_E.detach().float().std())


# ============================================================================= the trace
@dataclass(frozen=True)
class _Cell:
    state: StateKind
    layer: int
    pos: int


def _window(layer: int, window: int, n_layers: int) -> range:
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def _trace_one(lm: LoadedModel, p: _Prompt, kinds: Sequence[StateKind], noise_scale: float, n_samples: int,
               window: int, seed: int, batch_size: int) -> tuple[float, torch.Tensor, int, dict[str, torch.Tensor]]:
    """(p_clean, p_corrupted per sample, clean top-1 id, per kind [layers, positions] mean indirect effects)."""
    model = lm.model
    n_layers, length = lm.n_layers, len(p.ids)
    names = {(k, L): lm.validate_site(Site(kind=STATE_SITES[k], layer=L)) for k in kinds for L in range(n_layers)}
    embed_hook = lm.validate_site(Site(kind=SiteKind.RESID_PRE, layer=0))
    tokens = torch.tensor(p.ids, dtype=torch.long, device=lm.device)[None]
    wanted = set(names.values())
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in wanted)
    probs = logits[0, -1].float().softmax(-1)
    p_clean, clean_top = float(probs[p.answer_id]), int(probs.argmax())
    clean = {n: cache[n][0] for n in wanted}  # [pos, d]

    gen = torch.Generator().manual_seed(seed)
    s0, s1 = p.span
    noise = (torch.randn(n_samples, s1 - s0, lm.d_model, generator=gen) * noise_scale).to(
        device=lm.device, dtype=clean[next(iter(wanted))].dtype)

    cells = [_Cell(k, L, pos) for k in kinds for L in range(n_layers) for pos in range(length)]
    per_chunk = max(1, batch_size // n_samples)
    # the first chunk entry is the corrupted baseline (no restoration), then the cells
    jobs: list[_Cell | None] = [None, *cells]
    restored = torch.empty(len(jobs), n_samples)
    for c0 in range(0, len(jobs), per_chunk):
        chunk = jobs[c0 : c0 + per_chunk]
        rows = len(chunk) * n_samples
        targets: dict[str, tuple[list[int], list[int]]] = {}
        for j, cell in enumerate(chunk):
            if cell is None:
                continue
            layers = range(cell.layer, cell.layer + 1) if cell.state == "resid" else _window(cell.layer, window,
                                                                                             n_layers)
            for L in layers:
                r, q = targets.setdefault(names[(cell.state, L)], ([], []))
                r.extend(range(j * n_samples, (j + 1) * n_samples))
                q.extend([cell.pos] * n_samples)
        chunk_noise = noise.repeat(len(chunk), 1, 1)  # row j * n + s gets noise sample s

        def add_noise(act: torch.Tensor, hook: Any, _noise: torch.Tensor = chunk_noise) -> torch.Tensor:
            act = act.clone()
            act[:, s0:s1] += _noise
            return act

        def restore(act: torch.Tensor, hook: Any,
                    _targets: dict[str, tuple[list[int], list[int]]] = targets) -> torch.Tensor:
            r, q = _targets[hook.name]
            ri = torch.tensor(r, device=act.device)
            qi = torch.tensor(q, device=act.device)
            act = act.clone()
            act[ri, qi] = clean[hook.name][qi].to(act.dtype)
            return act

        hooks = [(embed_hook, add_noise)] + [(n, restore) for n in targets]
        with torch.no_grad():
            out = model.run_with_hooks(tokens.expand(rows, -1), fwd_hooks=hooks)
        pa = out[:, -1].float().softmax(-1)[:, p.answer_id].cpu()
        restored[c0 : c0 + len(chunk)] = pa.view(len(chunk), n_samples)
    p_corr = restored[0]
    effects = (restored[1:].mean(1) - p_corr.mean()).view(len(kinds), n_layers, length)
    return p_clean, p_corr, clean_top, {k: effects[i] for i, k in enumerate(kinds)}


def _role(pos: int, span: tuple[int, int], length: int) -> str:
    s0, s1 = span
    if pos == s1 - 1:
        return "last subject"
    if pos == s0:
        return "first subject"
    if s0 < pos < s1:
        return "middle subject"
    if pos < s0:
        return "before subject"
    if pos == length - 1:
        return "last token"
    return "first after subject" if pos == s1 else "further tokens"


def causal_trace(lm: LoadedModel, prompts: Sequence[str] | Sequence[Sequence[int]], *,
                 subject: str | tuple[int, int] | Sequence[str | tuple[int, int]],
                 answers: Sequence[str | int], states: Sequence[StateKind] = STATE_KINDS, noise: float = 3.0,
                 n_samples: int = 10, window: int = 1, seed: int = 0, only_known: bool = True,
                 align: Literal["auto", "position", "role"] = "auto", batch_size: int = 512,
                 top_n: int = 3) -> TraceGrid:
    """ROME-style causal tracing of ``answers`` over ``prompts`` with the ``subject`` tokens noised.

    ``prompts``: texts (tokenised with BOS, like the model's ``to_tokens``) or token-id lists (BOS included if the
    model expects it). ``subject``: per prompt (or one for all) a string located in the prompt, or a token span
    ``(start, end)`` over those tokens (BOS at 0). ``answers``: one single-token answer per prompt (text or id).
    ``states``: which of ``resid``, ``attn``, ``mlp`` to trace. ``noise``: multiple of the token-embedding std.
    ``window``: layers restored together for attn/mlp cells. Deterministic for a given ``seed``; prompt ``i``'s
    noise comes from seed ``seed + i``. See the module docstring for the technique and its caveats.
    """
    kinds = list(dict.fromkeys(states))
    if not kinds or any(k not in STATE_KINDS for k in kinds):
        raise InputError(f"states must be a non-empty subset of {list(STATE_KINDS)}, got {list(states)}")
    if lm.attn_only and "mlp" in kinds:
        raise InputError("this model is attention-only (no MLPs): trace states ['resid', 'attn']")
    if not (math.isfinite(noise) and noise > 0):
        raise InputError(f"noise must be a positive multiple of the embedding std (ROME uses 3), got {noise}")
    if n_samples < 1 or window < 1 or batch_size < 1:
        raise InputError("n_samples, window and batch_size must be >= 1")
    if window > lm.n_layers:
        raise InputError(f"window {window} is wider than the model's {lm.n_layers} layers")
    items = _prompts(lm, prompts, subject, answers)
    embed_std = embedding_std(lm)
    scale = noise * embed_std
    traces = [_trace_one(lm, p, kinds, scale, n_samples, window, seed + i, batch_size) for i, p in enumerate(items)]

    name = lm.token_str if lm.tokenizer is not None else (lambda i: f"<{i}>")
    known = [top == p.answer_id for p, (_, _, top, _) in zip(items, traces, strict=True)]
    used = [k or not only_known for k in known]
    if not any(used):
        raise InputError(f"the model gets none of the {len(items)} prompts right on the clean run (top-1 is not the "
                         "answer), so there is no known fact to trace; check the answers, or pass only_known=False "
                         "to trace them anyway")
    use = [i for i, u in enumerate(used) if u]
    same_shape = len({(len(items[i].ids), items[i].span) for i in use}) == 1
    if align == "position" and not same_shape:
        raise InputError("align='position' needs prompts of one length with one subject span; use align='role'")
    alignment: Literal["position", "role"] = "position" if align == "position" or (align == "auto" and same_shape) \
        else "role"

    n_layers = lm.n_layers
    if alignment == "position":
        first = items[use[0]]
        columns = []
        for pos in range(len(first.ids)):
            toks = {items[i].ids[pos] for i in use}
            label = repr(name(first.ids[pos])) if len(toks) == 1 else _role(pos, first.span, len(first.ids))
            columns.append(f"{pos} {label}")
        stacks = {k: torch.stack([traces[i][3][k] for i in use]).mean(0) for k in kinds}
        grids_raw: dict[str, list[list[float | None]]] = {
            k: [[round(float(v), _DIGITS) for v in row] for row in stacks[k]] for k in kinds}
    else:
        columns = list(ROLES)
        grids_raw = {}
        for k in kinds:
            sums = torch.zeros(n_layers, len(ROLES))
            counts = torch.zeros(len(ROLES))
            for i in use:
                length = len(items[i].ids)
                per_pos = traces[i][3][k]
                for r, role in enumerate(ROLES):
                    cols = [pos for pos in range(length) if _role(pos, items[i].span, length) == role]
                    if cols:
                        sums[:, r] += per_pos[:, cols].mean(1)
                        counts[r] += 1
            grids_raw[k] = [[round(float(sums[L, r] / counts[r]), _DIGITS) if counts[r] else None
                             for r in range(len(ROLES))] for L in range(n_layers)]

    p_clean = sum(traces[i][0] for i in use) / len(use)
    p_corr = sum(float(traces[i][1].mean()) for i in use) / len(use)
    drop = p_clean - p_corr
    notes = []
    if drop < MIN_DROP:
        notes.append(f"the noise barely lowers the answer's probability (mean drop {round_sig(drop, 3)} < {MIN_DROP}):"
                     " normalised effects are not computed; try a larger noise multiple")
    grids: dict[str, StateGrid] = {}
    for k in kinds:
        rows = grids_raw[k]
        norm = None if drop < MIN_DROP else [[None if v is None else round(v / drop, _DIGITS) for v in row]
                                             for row in rows]
        sites = [str(Site(kind=STATE_SITES[k], layer=L)) for L in range(n_layers)]
        grid = StateGrid(state=k, sites=sites, window=1 if k == "resid" else window, effect=rows, normalized=norm,
                         peak=None)
        cells = _cells(grid, columns)
        grids[k] = grid.model_copy(update={"peak": max(cells, key=lambda c: c.effect) if cells else None})
    peaks = [g.peak for g in grids.values() if g.peak is not None]
    records = []
    for i, (p, (pc, pcs, top, per_kind)) in enumerate(zip(items, traces, strict=True)):
        records.append(PromptTrace(
            prompt=p.text, tokens=[name(t) for t in p.ids], token_ids=p.ids, subject=p.span, answer=p.answer,
            answer_id=p.answer_id, p_clean=round(pc, _DIGITS), p_corrupted=round(float(pcs.mean()), _DIGITS),
            p_corrupted_std=round(float(pcs.std(unbiased=False)), _DIGITS), clean_top=name(top), known=known[i],
            used=used[i], effect={k: [[round(float(v), _DIGITS) for v in row] for row in per_kind[k]]
                                    for k in kinds}))
    return TraceGrid(alignment=alignment, columns=columns, grids=grids, p_clean=round(p_clean, _DIGITS),
                     p_corrupted=round(p_corr, _DIGITS), noise=noise, noise_scale=scale, embed_std=embed_std,
                     n_samples=n_samples, window=window, seed=seed, n_used=len(use), prompts=records,
                     peak=max(peaks, key=lambda c: c.effect) if peaks else None, notes=notes, top_n=top_n)


def prompts_from_task_file(path: str | os.PathLike[str], *, limit: int | None = None
                           ) -> tuple[list[str], list[str], list[str]]:
    """(prompts, subjects, answers) from a task file whose prompts carry a ``subject`` key (the toy world's
    ``facts`` task): the clean prompt, its subject string and its first answer."""
    from autoexplain.tools.data import load_task_file

    task = load_task_file(path)  # validates the layout
    raw = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))["prompts"]
    missing = [i for i, r in enumerate(raw) if not isinstance(r.get("subject"), str) or not r["subject"]]
    if missing:
        raise InputError(f"task file {str(path)!r}: prompts {missing[:5]} have no \"subject\" string; causal "
                         "tracing needs the subject to corrupt (the toy world's facts task has one)")
    n = len(raw) if limit is None else min(limit, len(raw))
    return ([p.clean for p in task.prompts[:n]], [r["subject"] for r in raw[:n]],
            [p.answers[0] for p in task.prompts[:n]])


# ============================================================================= tool
class CausalTraceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompts: list[str] = Field(min_length=1, max_length=32, description="prompts ending just before the answer")
    subjects: list[str] = Field(min_length=1, max_length=32,
                                description="the subject of each prompt as written in it (one entry: the same "
                                            "subject for all), e.g. 'red owl'; its tokens are noised")
    answers: list[str] = Field(min_length=1, max_length=32,
                               description="the single-token answer of each prompt, e.g. ' hive' (leading space)")
    states: list[StateKind] = Field(default=list(STATE_KINDS), min_length=1,
                                    description="state kinds to restore: resid, attn, mlp")
    noise: float = Field(default=3.0, gt=0, le=100, description="noise std as a multiple of the embedding std")
    n_samples: int = Field(default=10, ge=1, le=64, description="noise samples per prompt")
    window: int = Field(default=1, ge=1, le=64, description="layers restored together for attn/mlp cells")
    seed: int = Field(default=0, ge=0)
    only_known: bool = Field(default=True, description="average only prompts the model answers right when clean")
    top_n: int = Field(default=3, ge=1, le=10, description="top cells per state kind in the summary")


def causal_trace_tool(ctx: ToolContext, args: CausalTraceIn) -> TraceGrid:
    subjects: list[str] = args.subjects * len(args.prompts) if len(args.subjects) == 1 else args.subjects
    return causal_trace(ctx.model, args.prompts, subject=subjects, answers=args.answers, states=args.states,
                        noise=args.noise, n_samples=args.n_samples, window=args.window, seed=args.seed,
                        only_known=args.only_known, top_n=args.top_n)


TOOLS = (
    ToolSpec(name="causal_trace", level=CausalLevel.INTERVENTION, input_model=CausalTraceIn, output_model=TraceGrid,
             fn=causal_trace_tool, cost=Cost.FORWARD,
             description="Causal tracing (ROME): add Gaussian noise to the subject tokens' embeddings, then restore "
                         "one clean state at a time (residual stream, attention output or MLP output at one layer "
                         "and position) and measure how much of the answer's probability comes back (indirect "
                         "effect, averaged over noise samples and prompts). Use it to find where a factual "
                         "association is recalled, e.g. 'MLP at layer 0, last subject token'. Intervention-level: "
                         "shows where clean information suffices to restore the answer, not that it is necessary. "
                         "Prompts the model gets wrong are flagged and left out of the average."),
)
