"""Patching: replace activations of one run with those of another, and measure what the output loses.

This module is the one patching core. Node patching (``activation_patching``), edge patching and path patching
(``edge_patching``) and the circuit searches of :mod:`autoexplain.tools.circuits` all run on it, so a number from
any of them means the same thing.

The technique
-------------
Run the model on a **clean** prompt ("When Mary and John went to the store, John gave a drink to") and on a
**corrupt** one that differs only in what the behaviour depends on ("... Mary gave a drink to"). Then re-run the
clean prompt with some internal activations replaced by other values and measure a metric at the answer
position. What changes is caused by the replacement, since nothing else differs between the two runs: patching is
**intervention-level** evidence (:attr:`CausalLevel.INTERVENTION`). It shows that a component matters for this
metric on this distribution of prompts, under this kind of replacement; not what the component computes in
general, and not that it is the only way the model could solve the task.

Noising and denoising
~~~~~~~~~~~~~~~~~~~~~
*Noising* runs the clean prompt and patches in "broken" values: a component is **necessary** if that moves the
metric toward the corrupt run. *Denoising* runs the corrupt prompt and patches in clean values: a component is
**sufficient** (given everything else corrupt) if that restores the clean metric. The two answer different
questions and disagree whenever components act redundantly (backup heads: noising one of two redundant heads
changes nothing, denoising either restores everything) or jointly (an AND of two heads: noising either one breaks
the output, denoising one alone restores nothing). Circuit searches here are noising-based: everything outside the
circuit is patched, the circuit runs clean.

What "broken" means: the ablation
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
* ``resample``: the value the component had on the paired corrupt prompt. It removes only the information that
  differs between clean and corrupt, and keeps the component's typical magnitude. This is the default, and the
  only ablation for which "patch everything" reproduces the corrupt run.
* ``mean``: the component's mean over the corrupt prompts, per position (padding excluded). Removes
  prompt-specific information while staying near the activation distribution.
* ``zero``: zero. Simple but off-distribution: a head that writes a large *constant* vector (a bias the rest of
  the model relies on) looks crucial under zero ablation although it carries no information about the task.
  Resample ablation does not blame such a head (see the planted models in the tests).

Faithfulness numbers swing with the ablation, the patch type and the metric (Miller et al.), so every result here
records all three.

Nodes, edges and paths
~~~~~~~~~~~~~~~~~~~~~~
The residual stream is a sum: the input of every component is ``embed + sum of the outputs of all earlier heads
and MLPs (+ constant biases)``. The computational graph (DESIGN §3) follows from that: sources ``embed``,
``a{L}.{H}``, ``m{L}``; destinations every head's query, key and value input (from sources in earlier layers),
every MLP (from earlier sources and the heads of its own layer, since attention runs before the MLP in a
sequential block; in parallel-attention blocks, GPT-J and GPT-NeoX, only from earlier layers) and ``logits``
(the final residual stream, before the final norm).

* **Node (activation) patching** replaces one activation (a residual stream at a layer and position, an attention
  or MLP output, a head's output, a head's q/k/v input) everywhere downstream sees it.
* **Edge patching** replaces one *connection*: destination ``d`` sees the patched value of source ``s`` while
  every other destination still sees ``s``'s value from the running pass. Because the residual is a sum, this is
  exact and cheap: in ONE forward pass, each destination's input becomes its input in that pass plus
  ``sum over patched edges (s, d) of (patched_s - s_now)``, where ``s_now`` is the source's output computed in
  this same pass (so the effect of patched edges upstream propagates). A float mask per edge generalises the sum
  (``mask * (patched_s - s_now)``), which is what gradient-based attribution differentiates.
* **Path patching** (treeified) replaces a *path* ``s -> n1 -> ... -> logits``: only that path carries the
  patched signal. In edge patching, a changed node's output reaches everything downstream of it; in path
  patching, the change in ``n1`` reaches only ``n2`` (and so on), every node off the path sees clean values, and
  several paths are independent copies whose changes add at the logits input. What is implemented, precisely:
  the clean batch is run once more per path in the same forward pass (a "copy" of the graph). In a copy every
  destination input is overwritten with the clean run's input, except the destinations on the path, which get
  ``clean input + (value of the path's previous node in this copy - its clean value)`` (for the first edge, the
  patched source value minus the clean one). The logits input is ``clean + sum over paths of (copy's final
  residual - clean final residual)``. A one-edge path ``s -> logits`` is therefore the same as edge-patching
  ``s -> logits``; a longer path excludes every route that leaves it (e.g. ``a0.0 -> a1.1.k -> logits`` leaves
  out ``a1.1 -> m1 -> logits``).

Metrics
~~~~~~~
At the answer position of each prompt (configurable): ``logit_diff`` (mean logit of the answers minus mean
logit of the wrong answers), ``answer_prob`` (total probability of the answers) and ``kl`` (KL divergence from
the clean run's next-token distribution to the patched one; 0 on the clean run). Values are means over prompts.
Caveat: at the clean run the KL is at its minimum, so its gradient vanishes; attribution by plain gradients
(EAP) is blind under ``kl``.

Implementation notes
~~~~~~~~~~~~~~~~~~~~
Hooks (TransformerLens): per-head outputs (read at ``z`` and multiplied by ``W_O`` here, cheaper than TL's
``hook_result``), MLP outputs ``mlp_out`` and ``resid_pre.0`` (the embedding) are read; ``q_in/k_in/v_in``,
``mlp_in`` and ``resid_post`` of the last layer (the logits input) are written, and only the optional hooks a pass
writes are switched on (split q/k/v inputs roughly double a pass). All prompts of a chunk run in one batch; metrics
are computed at the answer positions only (the unembedding never runs elsewhere). A pass whose patched destinations
all lie in layers >= L starts at layer L from the cached clean residual; one that patches only the logits input
runs no layer at all. Models whose per-head outputs are not additive in the residual stream (post-norm blocks, a
norm after attention) and grouped-query attention are refused.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from autoexplain.tools.errors import InputError
from autoexplain.tools.models import LoadedModel, hook_name
from autoexplain.tools.registry import Cost, ToolContext, ToolOutput, ToolSpec
from autoexplain.tools.vocab import (
    HEAD_KINDS,
    Ablation,
    CausalLevel,
    Direction,
    Edge,
    Node,
    PatchMetric,
    PatchType,
    Site,
    SiteKind,
)

if TYPE_CHECKING:
    from autoexplain.tools.data import TokenizedTask

#: Rows (prompts x copies) one forward pass may hold on CUDA; bigger work is split. On CPU a batch twice as large
#: costs more than twice as much once it leaves the caches (measured 1.5-4x per row), so CPU passes hold fewer.
ROW_BUDGET = 512
CPU_ROW_BUDGET = 128


def row_budget(device: torch.device) -> int:
    return ROW_BUDGET if device.type == "cuda" else CPU_ROW_BUDGET


# ============================================================================= the graph
@dataclass(frozen=True)
class Group:
    """A block of sources or destinations that one hook reads or writes: the embedding, the heads of a layer, an
    MLP, the q (k, v) inputs of a layer's heads, an MLP input, or the logits input."""

    kind: str  # sources: embed | heads | mlp; destinations: q | k | v | mlp | logits
    layer: int  # -1 for embed, n_layers for logits
    start: int  # first index in the source (destination) list
    size: int
    site: Site  # the hook site read or written

    @property
    def stop(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class Graph:
    """The computational graph of a model in DESIGN §3 terms, with index arrays for masks.

    Sources are numbered in forward order (``embed``, the heads of layer 0, ``m0``, the heads of layer 1, …);
    destinations too (per layer the q, k and v inputs of every head, then the MLP; ``logits`` last). A mask is a
    ``[n_sources, n_destinations]`` tensor whose entries at :attr:`edges` positions say how much of each edge is
    patched.
    """

    n_layers: int
    n_heads: int
    has_mlp: bool
    parallel: bool
    sources: tuple[str, ...]
    dests: tuple[str, ...]  # destination inputs: a1.2.q, m0, logits
    src_groups: tuple[Group, ...]
    dst_groups: tuple[Group, ...]
    feeds: tuple[tuple[int, ...], ...]  # per destination group: the source groups that feed it
    edges: tuple[Edge, ...]
    names: tuple[str, ...]  # str(edge), same order
    edge_src: tuple[int, ...]
    edge_dst: tuple[int, ...]
    index: dict[str, int] = field(repr=False)

    @property
    def n_edges(self) -> int:
        return len(self.edges)

    def edge_ids(self, names: Iterable[str | Edge]) -> list[int]:
        """Indices of edges given by name; malformed or unknown names raise :class:`InputError` (never ignored)."""
        out = []
        for name in names:
            key = str(name) if isinstance(name, Edge) else str(Edge.parse(name))
            if key not in self.index:
                raise InputError(f"edge {key!r} is not in this model's graph ({self.n_layers} layers x "
                                 f"{self.n_heads} heads{'' if self.has_mlp else ', attention-only'}): sources must "
                                 "come before destinations, heads are read by later layers only; the circuit_search "
                                 "tool lists valid edges")
            out.append(self.index[key])
        return out

    def mask(self, edge_ids: Iterable[int] | None = None, *, value: float = 1.0) -> torch.Tensor:
        """A CPU float mask with ``value`` on the given edges (all edges when None)."""
        m = torch.zeros(len(self.sources), len(self.dests))
        ids = range(self.n_edges) if edge_ids is None else list(edge_ids)
        if ids:
            idx = torch.tensor(list(ids), dtype=torch.long)
            m[torch.tensor(self.edge_src)[idx], torch.tensor(self.edge_dst)[idx]] = value
        return m

    def node_of_dest(self, d: int) -> str:
        name = self.dests[d]
        return name[:-2] if name[-2:] in (".q", ".k", ".v") else name


def build_graph(lm: LoadedModel) -> Graph:
    """The graph of ``lm`` (a :class:`~autoexplain.tools.models.LoadedModel`); refuses models where per-head
    outputs do not add up to the residual stream."""
    cfg = lm.model.cfg
    _check_supported(cfg)
    return _graph(int(cfg.n_layers), int(cfg.n_heads), not bool(cfg.attn_only), bool(cfg.parallel_attn_mlp))


def graph_edges(lm: LoadedModel) -> list[Edge]:
    """Every edge of ``lm``'s graph, destinations in forward order, then sources in forward order."""
    return list(build_graph(lm).edges)


def _check_supported(cfg: Any) -> None:
    arch = str(getattr(cfg, "original_architecture", "") or "")
    post_norm: Collection[str] = ()
    try:
        from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

        post_norm = POST_NORM_ARCHITECTURES
    except ImportError:  # pragma: no cover - older TransformerLens
        pass
    if arch in post_norm or getattr(cfg, "use_normalization_before_and_after", False):
        raise InputError(f"edge and path patching need per-head outputs that add up to the residual stream; "
                         f"{arch or 'this model'} normalises attention output before the residual add: use node "
                         "patching (activation_patching) on this model")
    kv = getattr(cfg, "n_key_value_heads", None)
    if kv is not None and int(kv) != int(cfg.n_heads) and not getattr(cfg, "ungroup_grouped_query_attention", False):
        raise InputError(f"grouped-query attention ({kv} key/value heads for {cfg.n_heads} query heads) is not "
                         "supported by edge patching yet: use node patching (activation_patching)")


@lru_cache(maxsize=16)
def _graph(n_layers: int, n_heads: int, has_mlp: bool, parallel: bool) -> Graph:
    sources: list[str] = ["embed"]
    src_groups: list[Group] = [Group("embed", -1, 0, 1, Site(kind=SiteKind.RESID_PRE, layer=0))]
    dests: list[str] = []
    dst_groups: list[Group] = []
    for L in range(n_layers):
        for qkv, kind in (("q", SiteKind.Q_IN), ("k", SiteKind.K_IN), ("v", SiteKind.V_IN)):
            dst_groups.append(Group(qkv, L, len(dests), n_heads, Site(kind=kind, layer=L, head=0)))
            dests += [f"a{L}.{h}.{qkv}" for h in range(n_heads)]
        src_groups.append(Group("heads", L, len(sources), n_heads, Site(kind=SiteKind.Z, layer=L)))
        sources += [f"a{L}.{h}" for h in range(n_heads)]
        if has_mlp:
            dst_groups.append(Group("mlp", L, len(dests), 1, Site(kind=SiteKind.MLP_IN, layer=L)))
            dests.append(f"m{L}")
            src_groups.append(Group("mlp", L, len(sources), 1, Site(kind=SiteKind.MLP_OUT, layer=L)))
            sources.append(f"m{L}")
    dst_groups.append(Group("logits", n_layers, len(dests), 1, Site(kind=SiteKind.RESID_POST, layer=n_layers - 1)))
    dests.append("logits")

    def feeds_of(g: Group) -> tuple[int, ...]:
        out = []
        for i, s in enumerate(src_groups):
            if s.layer < g.layer or (g.kind == "mlp" and s.layer == g.layer and s.kind == "heads" and not parallel):
                out.append(i)
        return tuple(out)

    feeds = tuple(feeds_of(g) for g in dst_groups)
    edges: list[Edge] = []
    e_src: list[int] = []
    e_dst: list[int] = []
    nodes = {name: Node(name=name) for name in sources + ["logits"]}
    for gi, g in enumerate(dst_groups):
        for d in range(g.start, g.stop):
            dst = dests[d]
            head_input = dst[-1] if g.kind in ("q", "k", "v") else None
            dst_node = nodes.setdefault(dst[:-2] if head_input else dst, Node(name=dst[:-2] if head_input else dst))
            for si in feeds[gi]:
                sg = src_groups[si]
                for s in range(sg.start, sg.stop):
                    edges.append(Edge(src=nodes[sources[s]], dst=dst_node, qkv=head_input))
                    e_src.append(s)
                    e_dst.append(d)
    names = tuple(str(e) for e in edges)
    return Graph(n_layers=n_layers, n_heads=n_heads, has_mlp=has_mlp, parallel=parallel, sources=tuple(sources),
                 dests=tuple(dests), src_groups=tuple(src_groups), dst_groups=tuple(dst_groups), feeds=feeds,
                 edges=tuple(edges), names=names, edge_src=tuple(e_src), edge_dst=tuple(e_dst),
                 index={n: i for i, n in enumerate(names)})


# ============================================================================= metrics
def metric_values(logits: torch.Tensor, metric: PatchMetric, answers: torch.Tensor, wrong: torch.Tensor,
                  clean_logp: torch.Tensor | None = None) -> torch.Tensor:
    """Per-prompt metric from answer-position logits ``[n, vocab]``; ``answers``/``wrong`` are -1 padded ids.

    ``logit_diff``: mean answer logit - mean wrong-answer logit. ``answer_prob``: total probability of the
    answers. ``kl``: KL(clean || this run) in nats; needs ``clean_logp`` (the clean run's log-probabilities).
    """
    logits = logits.float()
    if metric is PatchMetric.KL:
        assert clean_logp is not None
        logp = logits.log_softmax(-1)
        return (clean_logp.exp() * (clean_logp - logp)).sum(-1)
    a_ok = answers >= 0
    if metric is PatchMetric.ANSWER_PROB:
        probs = logits.softmax(-1).gather(-1, answers.clamp_min(0))
        return (probs * a_ok).sum(-1)
    w_ok = wrong >= 0
    good = (logits.gather(-1, answers.clamp_min(0)) * a_ok).sum(-1) / a_ok.sum(-1).clamp_min(1)
    if wrong.shape[-1] == 0:
        return good
    bad = (logits.gather(-1, wrong.clamp_min(0)) * w_ok).sum(-1) / w_ok.sum(-1).clamp_min(1)
    return good - bad


# ============================================================================= the patch setup
@dataclass
class _Chunk:
    """Prompts run together, with what every patching pass over them reuses."""

    rows: slice
    clean: torch.Tensor  # [b, p] tokens
    corrupt: torch.Tensor
    attn: torch.Tensor  # [b, p] attention mask (1 on real tokens)
    pos: torch.Tensor  # [b] metric position
    answers: torch.Tensor
    wrong: torch.Tensor
    patched_src: list[torch.Tensor]  # per source group [b, p, n, d], the ablation's values
    delta_src: list[torch.Tensor]  # per source group [b, p, n, d], patched - clean output
    resid_pre: list[torch.Tensor]  # per layer [b, p, d], clean
    clean_final: torch.Tensor  # [b, d] clean final residual at the metric position
    clean_logits: torch.Tensor  # [b, vocab]
    clean_logp: torch.Tensor  # [b, vocab]

    @property
    def size(self) -> int:
        return int(self.clean.shape[0])


class PatchSetup:
    """A model, a tokenised task, an ablation and a metric, prepared once for any number of patching passes.

    Preparing runs the clean prompts (and, for resample and mean ablation, the corrupt ones) once, keeping every
    source's output. ``m_clean`` is the metric of the unpatched model, m(M); ``m_ablated`` the metric with every
    edge patched, m(∅) (for resample ablation: the corrupt run).
    """

    def __init__(self, lm: LoadedModel, task: TokenizedTask, *, ablation: Ablation | str = Ablation.RESAMPLE,
                 metric: PatchMetric | str = PatchMetric.LOGIT_DIFF, position: int | None = None,
                 batch_size: int = 64) -> None:
        self.lm = lm
        self.model = lm.model
        self.task = task
        self.ablation = Ablation(ablation)
        self.metric = PatchMetric(metric)
        self.position = position
        self.graph = build_graph(lm)
        self.device = torch.device(lm.device)
        self.dtype = next(self.model.parameters()).dtype
        self.n_prompts = int(task.clean.shape[0])
        if self.metric is PatchMetric.LOGIT_DIFF:
            no_wrong = ((task.wrong < 0).all(-1) if task.wrong.shape[-1]
                        else torch.ones(self.n_prompts, dtype=torch.bool))
            if bool(no_wrong.any()):
                i = int(no_wrong.nonzero()[0])
                raise InputError(f"prompt {i} has no wrong_answers, so logit_diff is undefined: add wrong_answers "
                                 "to every prompt or use metric answer_prob or kl")
        positions = _metric_positions(task, position)
        self._w_o = [blk.attn.W_O for blk in self.model.blocks]
        self.chunks: list[_Chunk] = []
        bs = max(1, min(batch_size, ROW_BUDGET))
        with torch.no_grad():
            corrupt_runs = [] if self.ablation is Ablation.ZERO else [
                self._capture(task.corrupt[i:i + bs], _attention_mask(task, slice(i, i + bs)))
                for i in range(0, self.n_prompts, bs)]
            mean = self._mean(corrupt_runs, task) if self.ablation is Ablation.MEAN else None
            for ci, start in enumerate(range(0, self.n_prompts, bs)):
                rows = slice(start, min(start + bs, self.n_prompts))
                attn = _attention_mask(task, rows)
                clean_src, resid, final = self._capture(task.clean[rows], attn, keep_resid=True)
                b = rows.stop - rows.start
                if self.ablation is Ablation.RESAMPLE:
                    patched = corrupt_runs[ci][0]
                elif self.ablation is Ablation.MEAN:
                    assert mean is not None
                    patched = [m.expand(b, *m.shape[1:]) for m in mean]
                else:
                    patched = [torch.zeros_like(c) for c in clean_src]
                pos = positions[rows].to(self.device)
                ar = torch.arange(b, device=self.device)
                final_at = final[ar, pos]
                logits = self._unembed(final_at)
                self.chunks.append(_Chunk(
                    rows=rows, clean=task.clean[rows].to(self.device), corrupt=task.corrupt[rows].to(self.device),
                    attn=attn.to(self.device), pos=pos,
                    answers=task.answers[rows].to(self.device), wrong=task.wrong[rows].to(self.device),
                    patched_src=patched, delta_src=[p - c for p, c in zip(patched, clean_src, strict=True)],
                    resid_pre=resid, clean_final=final_at,
                    clean_logits=logits, clean_logp=logits.log_softmax(-1)))
        self.m_clean = self.evaluate(None)
        self._m_ablated: float | None = None

    # -- preparation ----------------------------------------------------------------------------------
    def _capture(self, tokens: torch.Tensor, attn: torch.Tensor,
                 keep_resid: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """One plain forward: every source group's output [b, p, n, d], optionally each layer's resid_pre, and
        the final residual [b, p, d]."""
        g = self.graph
        got: dict[str, torch.Tensor] = {}

        def keep(act: torch.Tensor, hook: Any) -> None:
            got[hook.name] = act

        names = {hook_name(s.site) for s in g.src_groups}
        if keep_resid:
            names |= {hook_name(Site(kind=SiteKind.RESID_PRE, layer=L)) for L in range(g.n_layers)}
        final = self.model.run_with_hooks(tokens.to(self.device), fwd_hooks=[(n, keep) for n in names],
                                          attention_mask=attn.to(self.device),
                                          stop_at_layer=g.n_layers)
        srcs = [self._src_out(got[hook_name(s.site)], s) for s in g.src_groups]
        resid = ([got[hook_name(Site(kind=SiteKind.RESID_PRE, layer=L))] for L in range(g.n_layers)]
                 if keep_resid else [])
        return srcs, resid, final

    def _mean(self, runs: list[tuple[list[torch.Tensor], Any, Any]], task: TokenizedTask) -> list[torch.Tensor]:
        """Per source group the mean over corrupt prompts at each position, padding excluded: [1, p, n, d]."""
        valid = (torch.arange(task.corrupt.shape[1])[None, :] < task.seq_lens[:, None]).float().to(self.device)
        count = valid.sum(0).clamp_min(1)[None, :, None, None]
        out = []
        for gi in range(len(self.graph.src_groups)):
            total, start = None, 0
            for srcs, _, _ in runs:
                v = valid[start:start + srcs[gi].shape[0], :, None, None]
                start += srcs[gi].shape[0]
                part = (srcs[gi] * v).sum(0, keepdim=True)
                total = part if total is None else total + part
            assert total is not None
            out.append(total / count)
        return out

    def _unembed(self, resid: torch.Tensor) -> torch.Tensor:
        """Logits from final residuals [..., d] (final norm, unembedding, soft-cap), float32."""
        model = self.model
        x = model.ln_final(resid) if model.cfg.normalization_type is not None else resid
        logits = model.unembed(x).float()
        cap = float(getattr(model.cfg, "output_logits_soft_cap", 0.0) or 0.0)
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def _src_out(self, act: torch.Tensor, sg: Group) -> torch.Tensor:
        """A source hook's activation as the group's outputs [b, p, n, d]. Heads are read at ``z`` and multiplied
        by their ``W_O`` here (TransformerLens' own per-head ``hook_result`` costs a [b, p, head, d_head,
        d_model] product per layer); embed and MLP outputs get n = 1."""
        if sg.kind == "heads":
            return torch.einsum("bphe,hem->bphm", act, self._w_o[sg.layer])
        return act[:, :, None]

    # -- baselines ------------------------------------------------------------------------------------
    @property
    def m_ablated(self) -> float:
        """m(∅): the metric with every edge patched."""
        if self._m_ablated is None:
            self._m_ablated = self.evaluate(self.graph.mask())
        return self._m_ablated

    @property
    def effect(self) -> float:
        """m(M) - m(∅): how much the ablation moves the metric (the denominator of faithfulness)."""
        return self.m_clean - self.m_ablated

    def fingerprint(self) -> str:
        """A digest of everything a patching result depends on (model, graph, task tensors, ablation, metric)."""
        h = hashlib.sha256()
        h.update(repr((getattr(self.lm, "model_id", ""), self.graph.n_edges, self.ablation.value, self.metric.value,
                       self.position)).encode())
        for t in (self.task.clean, self.task.corrupt, self.task.answers, self.task.wrong, self.task.answer_pos):
            h.update(t.cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    # -- metric of a patched run ----------------------------------------------------------------------
    def _aggregate(self, values: Iterator[torch.Tensor]) -> float:
        return float(sum(float(v.sum()) for v in values) / self.n_prompts)

    def chunk_metric(self, chunk: _Chunk, logits: torch.Tensor, reps: int = 1) -> torch.Tensor:
        def rep(t: torch.Tensor) -> torch.Tensor:
            return t if reps == 1 else t.repeat(reps, *([1] * (t.dim() - 1)))

        return metric_values(logits, self.metric, rep(chunk.answers), rep(chunk.wrong),
                             rep(chunk.clean_logp) if self.metric is PatchMetric.KL else None)

    def evaluate(self, mask: torch.Tensor | None, *, start_layer: int = 0) -> float:
        """The metric with edges patched by ``mask`` (CPU ``[n_sources, n_dests]``, 1 = patched; None = none).

        ``start_layer`` > 0 skips recomputing layers whose inputs are all unpatched (the caller guarantees it; it
        is checked): what makes ACDC's many passes cheap.
        """
        return self.evaluate_many(None if mask is None else mask[None], start_layer=start_layer)[0]

    def evaluate_many(self, masks: torch.Tensor | None, *, start_layer: int = 0) -> list[float]:
        """The metric for each of K masks ``[K, n_sources, n_dests]`` (CPU), several masks per forward pass (the
        batch holds K copies of the prompts, up to :func:`row_budget` rows): what ACDC's speculative passes use."""
        return self.evaluate_prompts(masks, start_layer=start_layer).mean(1).tolist()

    def evaluate_prompts(self, masks: torch.Tensor | None, *, start_layer: int = 0) -> torch.Tensor:
        """Per-prompt metric values ``[K, n_prompts]`` (float64, CPU) for K masks ``[K, n_sources, n_dests]`` (None:
        the unpatched model, K = 1). :meth:`evaluate_many` is their mean over prompts; the spread and the share of
        prompts on which an effect holds come from here."""
        if masks is None:
            masks = torch.zeros(1, len(self.graph.sources), len(self.graph.dests))
        out = torch.zeros(masks.shape[0], self.n_prompts, dtype=torch.float64)
        with torch.no_grad():
            for c in self.chunks:
                per = max(1, row_budget(self.device) // c.size)
                for k0 in range(0, masks.shape[0], per):
                    block = masks[k0:k0 + per]
                    logits = self.patched_logits(c, block, start_layer=start_layer)
                    vals = self.chunk_metric(c, logits, block.shape[0]).reshape(block.shape[0], c.size)
                    out[k0:k0 + block.shape[0], c.rows] = vals.double().cpu()
        return out

    def patched_logits(self, chunk: _Chunk, mask: torch.Tensor | None, *, start_layer: int = 0) -> torch.Tensor:
        """Answer-position logits of one chunk with edges patched by ``mask``: ``[n_sources, n_dests]`` gives
        ``[b, vocab]``; K masks ``[K, n_sources, n_dests]`` give ``[K * b, vocab]`` (copy k in rows k*b…). One
        forward pass, or none when only the logits input is patched and ``start_layer`` says so."""
        with torch.no_grad():
            return self._patched_logits(chunk, mask, start_layer)

    def _patched_logits(self, chunk: _Chunk, mask: torch.Tensor | None, start_layer: int) -> torch.Tensor:
        g = self.graph
        if mask is None:
            return chunk.clean_logits
        masks = mask if mask.dim() == 3 else mask[None]
        k, b = masks.shape[0], chunk.size
        if not bool(masks.any()):
            return chunk.clean_logits.repeat(k, 1)
        active = _active_blocks(g, masks.amax(0))
        first_patched = min(g.dst_groups[G].layer for G, _ in active)
        if start_layer > first_patched:
            raise ValueError(f"start_layer {start_layer} skips patched destinations in layer {first_patched}")
        dev = masks.to(self.device, self.dtype)
        if start_layer >= g.n_layers:  # only the logits input is patched: no forward pass at all
            final = chunk.clean_final.repeat(k, 1).view(k, b, -1)
            ar = torch.arange(b, device=self.device)
            G = len(g.dst_groups) - 1
            for gi in g.feeds[G]:
                if (G, gi) in active:
                    sg = g.src_groups[gi]
                    delta = chunk.delta_src[gi][ar, chunk.pos]  # [b, n, d]
                    final = final + torch.einsum("bsd,ks->kbd", delta, dev[:, sg.start:sg.stop, -1])
            return self._unembed(final.reshape(k * b, -1))
        resid = self._run(chunk, dev if k > 1 else dev[0], active, live=True, start_layer=start_layer)
        rows = torch.arange(k * b, device=self.device)
        return self._unembed(resid[rows, chunk.pos.repeat(k)])

    def _run(self, chunk: _Chunk, mask: torch.Tensor, active: set[tuple[int, int]] | None, *, live: bool,
             start_layer: int = 0, alpha: torch.Tensor | None = None,
             grads: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """One forward pass of the chunk's clean prompts with edges patched by ``mask``; returns the final residual.

        ``live``: deltas are ``patched - output in this pass`` (edge patching); otherwise ``patched - clean``
        (fixed; what attribution differentiates). ``alpha`` [k]: run k copies of the batch whose embeddings are
        interpolated ``patched + alpha * (clean - patched)`` (integrated gradients over inputs). ``grads``: when
        given, each destination group's input tensor is kept in it (keyed by group) for autograd.
        """
        g = self.graph
        blocks = int(mask.shape[0]) if mask.dim() == 3 else 1
        assert alpha is None or blocks == 1
        reps = blocks if alpha is None else int(alpha.shape[0])
        b = chunk.size

        def rep(t: torch.Tensor) -> torch.Tensor:
            return t if reps == 1 else t.repeat(reps, *([1] * (t.dim() - 1)))

        deltas: dict[int, torch.Tensor] = {}
        for gi, sg in enumerate(g.src_groups):
            if sg.kind == "embed" or sg.layer < start_layer or not live:
                deltas[gi] = rep(chunk.delta_src[gi])
        hooks: list[tuple[str, Callable[..., Any]]] = []

        def src_hook(gi: int, sg: Group) -> Callable[..., Any]:
            patched = rep(chunk.patched_src[gi])

            def fn(act: torch.Tensor, hook: Any) -> torch.Tensor | None:
                if sg.kind == "embed":  # integrated gradients: interpolate the input embeddings
                    assert alpha is not None
                    p = patched[:, :, 0]
                    a = alpha.repeat_interleave(chunk.size)[:, None, None].to(act.dtype)
                    out = torch.where(a == 1, act, p + a * (act - p)).detach()
                    return out.requires_grad_(True) if grads is not None else out
                deltas[gi] = patched - self._src_out(act, sg)
                return None

            return fn

        def dst_hook(G: int, dg: Group) -> Callable[..., Any]:
            def fn(act: torch.Tensor, hook: Any) -> torch.Tensor | None:
                add = None
                for gi in g.feeds[G]:
                    if active is not None and (G, gi) not in active:
                        continue
                    sg = g.src_groups[gi]
                    if blocks == 1:
                        block = mask[sg.start:sg.stop, dg.start:dg.stop]
                        part = torch.einsum("bpsd,sn->bpnd", deltas[gi], block)
                    else:  # one mask per copy of the batch
                        block = mask[:, sg.start:sg.stop, dg.start:dg.stop]
                        dl = deltas[gi]
                        part = torch.einsum("kbpsd,ksn->kbpnd", dl.view(blocks, b, *dl.shape[1:]), block)
                        part = part.reshape(blocks * b, *part.shape[2:])
                    add = part if add is None else add + part
                out = act
                if add is not None:
                    out = act + (add if dg.kind in ("q", "k", "v") else add[:, :, 0])
                if grads is not None:
                    grads[G] = out
                return out if out is not act else None

            return fn

        needed = {gi for _, gi in active} if active is not None else set(range(len(g.src_groups)))
        for gi, sg in enumerate(g.src_groups):
            if sg.kind == "embed":
                if alpha is not None:
                    hooks.append((hook_name(sg.site), src_hook(gi, sg)))
            elif live and sg.layer >= start_layer and gi in needed:
                hooks.append((hook_name(sg.site), src_hook(gi, sg)))
        written = []
        for G, dg in enumerate(g.dst_groups):
            if dg.layer >= start_layer and (grads is not None or active is None or
                                             any(a[0] == G for a in active)):
                hooks.append((hook_name(dg.site), dst_hook(G, dg)))
                written.append(dg.site)
        attn = rep(chunk.attn)
        # only the optional hooks this pass writes are switched on (split q/k/v inputs cost a pass ~2x)
        with self.lm.sites_enabled(written):
            if start_layer == 0:
                return self.model.run_with_hooks(rep(chunk.clean), fwd_hooks=hooks, attention_mask=attn,
                                                 stop_at_layer=g.n_layers)
            return self.model.run_with_hooks(rep(chunk.resid_pre[start_layer]), fwd_hooks=hooks,
                                             attention_mask=attn, start_at_layer=start_layer,
                                             stop_at_layer=g.n_layers)

    # -- attribution ----------------------------------------------------------------------------------
    def edge_attribution(self, alphas: Sequence[float], *, max_rows: int | None = None) -> torch.Tensor:
        """Per edge: ``(patched_src - clean_src) . mean over alphas of d metric / d (destination input)``, summed
        over positions and averaged over prompts, with the embeddings at ``patched + alpha (clean - patched)``.

        ``alphas == [1.0]`` is EAP (the gradient at the clean run); ``k/steps`` for k = 1..steps is EAP-IG over
        inputs. One forward and one backward pass per chunk of (prompts x alphas), at most ``max_rows`` rows
        (default :func:`row_budget`: fewer on CPU, where bigger batches cost more per row). The gradient is
        taken with respect to the destination inputs only (``torch.autograd.grad``): model parameters get no
        ``.grad``. Gradients are summed over alphas first; then one product per destination group, with the
        concatenated source deltas (every group's sources are a prefix of the forward-ordered source list).
        """
        g = self.graph
        rows_per_pass = max_rows or row_budget(self.device)
        scores = torch.zeros(len(g.sources), len(g.dests), dtype=torch.float64, device=self.device)
        alpha_all = torch.tensor(list(alphas), dtype=torch.float32, device=self.device)
        n_total = self.n_prompts * len(alphas)
        zero_mask = torch.zeros(len(g.sources), len(g.dests), device=self.device, dtype=self.dtype)
        with torch.enable_grad():
            for chunk in self.chunks:
                per = max(1, rows_per_pass // max(1, chunk.size))
                summed: dict[int, torch.Tensor] = {}
                for a0 in range(0, len(alphas), per):
                    alpha = alpha_all[a0:a0 + per]
                    grads: dict[int, torch.Tensor] = {}
                    resid = self._run(chunk, zero_mask, set(), live=False, alpha=alpha, grads=grads)
                    reps = int(alpha.shape[0])
                    rows = torch.arange(reps * chunk.size, device=self.device)
                    logits = self._unembed(resid[rows, chunk.pos.repeat(reps)])
                    loss = self.chunk_metric(chunk, logits, reps).sum() / n_total
                    keys = sorted(grads)
                    got = torch.autograd.grad(loss, [grads[k] for k in keys], allow_unused=True)
                    for G, gr in zip(keys, got, strict=True):
                        if gr is not None:
                            gr = gr.detach().reshape(reps, chunk.size, *gr.shape[1:]).sum(0)
                            summed[G] = gr if G not in summed else summed[G] + gr
                deltas = torch.cat(chunk.delta_src, dim=2)  # [b, p, n_sources, d]
                for G, gr in summed.items():
                    dg = g.dst_groups[G]
                    stop = g.src_groups[max(g.feeds[G])].stop
                    assert [g.src_groups[i].start for i in g.feeds[G]][0] == 0
                    if dg.kind not in ("q", "k", "v"):
                        gr = gr[:, :, None]
                    scores[:stop, dg.start:dg.stop] += torch.einsum("bpsd,bpnd->sn", deltas[:, :, :stop], gr).double()
        return scores[torch.tensor(g.edge_src), torch.tensor(g.edge_dst)].float().cpu()

    # -- path patching --------------------------------------------------------------------------------
    def evaluate_paths(self, paths: Sequence[Sequence[int]]) -> float:
        """The metric with each path (a chain of edge indices ending at ``logits``) patched alone in its own copy of
        the graph, the copies' changes added at the logits input (treeified path patching; see the module doc)."""
        for p in paths:
            _check_path(self.graph, p)
        if not paths:
            return self.m_clean
        with torch.no_grad(), self.lm.sites_enabled([dg.site for dg in self.graph.dst_groups]):
            values = []
            for chunk in self.chunks:
                per = max(1, row_budget(self.device) // chunk.size - 1)
                final = chunk.clean_final.clone()
                for p0 in range(0, len(paths), per):
                    final = final + self._path_deltas(chunk, paths[p0:p0 + per])
                values.append(self.chunk_metric(chunk, self._unembed(final)))
        return self._aggregate(iter(values))

    def _path_deltas(self, chunk: _Chunk, paths: Sequence[Sequence[int]]) -> torch.Tensor:
        """Sum over ``paths`` of (copy's final residual - clean final residual) at the metric positions [b, d]."""
        g = self.graph
        b = chunk.size
        n_copies = len(paths)
        src_group = {s: gi for gi, sg in enumerate(g.src_groups) for s in range(sg.start, sg.stop)}
        dst_group = {d: G for G, dg in enumerate(g.dst_groups) for d in range(dg.start, dg.stop)}
        # per destination group: (copy, local destination index, source index, first edge of its path?)
        plan: dict[int, list[tuple[int, int, int, bool]]] = {}
        for c, path in enumerate(paths):
            for k, e in enumerate(path):
                d, s = g.edge_dst[e], g.edge_src[e]
                G = dst_group[d]
                plan.setdefault(G, []).append((c, d - g.dst_groups[G].start, s, k == 0))
        outs: dict[int, torch.Tensor] = {}

        def src_hook(gi: int, sg: Group) -> Callable[..., Any]:
            def fn(act: torch.Tensor, hook: Any) -> None:
                outs[gi] = self._src_out(act, sg)

            return fn

        def dst_hook(G: int, dg: Group) -> Callable[..., Any]:
            def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
                clean = act[:b]
                new = clean.repeat(1 + n_copies, *([1] * (act.dim() - 1)))
                for c, j, s, first in plan.get(G, ()):
                    gi = src_group[s]
                    local = s - g.src_groups[gi].start
                    clean_s = outs[gi][:b, :, local]
                    value = chunk.patched_src[gi][:, :, local] if first else outs[gi][(c + 1) * b:(c + 2) * b, :, local]
                    rows = slice((c + 1) * b, (c + 2) * b)
                    if dg.kind in ("q", "k", "v"):
                        new[rows, :, j] += value - clean_s
                    else:
                        new[rows] += value - clean_s
                return new

            return fn

        hooks = [(hook_name(sg.site), src_hook(gi, sg)) for gi, sg in enumerate(g.src_groups)]
        hooks += [(hook_name(dg.site), dst_hook(G, dg)) for G, dg in enumerate(g.dst_groups)]
        tokens = chunk.clean.repeat(1 + n_copies, 1)
        resid = self.model.run_with_hooks(tokens, fwd_hooks=hooks, attention_mask=chunk.attn.repeat(1 + n_copies, 1),
                                          stop_at_layer=g.n_layers)
        ar = torch.arange(b, device=self.device)
        at = resid[:, :, :].reshape(1 + n_copies, b, *resid.shape[1:])[:, ar, chunk.pos]  # [1 + copies, b, d]
        return (at[1:] - at[0]).sum(0)




def _active_blocks(g: Graph, mask: torch.Tensor) -> set[tuple[int, int]]:
    """(destination group, source group) pairs with any patched edge in ``mask``."""
    active = set()
    for G, dg in enumerate(g.dst_groups):
        cols = mask[:, dg.start:dg.stop]
        for gi in g.feeds[G]:
            sg = g.src_groups[gi]
            if bool(cols[sg.start:sg.stop].any()):
                active.add((G, gi))
    return active


def _check_path(g: Graph, path: Sequence[int]) -> None:
    if not path:
        raise InputError("a path needs at least one edge, e.g. ['a1.2->logits']")
    for a, b in zip(path, path[1:]):
        if g.node_of_dest(g.edge_dst[a]) != g.sources[g.edge_src[b]]:
            raise InputError(f"path is not a chain: {g.names[a]} ends at {g.node_of_dest(g.edge_dst[a])} but the next "
                             f"edge {g.names[b]} starts at {g.sources[g.edge_src[b]]}")
    if g.dests[g.edge_dst[path[-1]]] != "logits":
        raise InputError(f"a path must end at logits, but {g.names[path[-1]]} does not: append e.g. "
                         f"{g.node_of_dest(g.edge_dst[path[-1]])}->logits")


def _metric_positions(task: TokenizedTask, position: int | None) -> torch.Tensor:
    """Where the metric is read, per prompt: the answer position, or ``position`` (negative counts from each
    prompt's end)."""
    if position is None:
        return task.answer_pos.clone()
    lens = task.seq_lens
    pos = lens + position if position < 0 else torch.full_like(lens, position)
    bad = ((pos < 0) | (pos >= lens)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise InputError(f"position {position} is outside prompt {i}, which has {int(lens[i])} tokens: use "
                         f"{-int(lens[i])}..{int(lens[i]) - 1}")
    return pos


def _attention_mask(task: TokenizedTask, rows: slice) -> torch.Tensor:
    lens = task.seq_lens[rows]
    return (torch.arange(task.clean.shape[1])[None, :] < lens[:, None]).long()


def default_metric_for(task: TokenizedTask) -> PatchMetric:
    """``logit_diff`` when every prompt has wrong answers, else ``answer_prob``."""
    has_wrong = task.wrong.shape[-1] > 0 and bool((task.wrong >= 0).any(-1).all())
    return PatchMetric.LOGIT_DIFF if has_wrong else PatchMetric.ANSWER_PROB


# ============================================================================= node (activation) patching
#: Site kinds node patching can patch; per-head kinds patch one head at a time.
NODE_KINDS: tuple[SiteKind, ...] = (SiteKind.RESID_PRE, SiteKind.RESID_MID, SiteKind.RESID_POST, SiteKind.ATTN_OUT,
                                    SiteKind.MLP_IN, SiteKind.MLP_OUT, SiteKind.HEAD_OUT, SiteKind.Q_IN,
                                    SiteKind.K_IN, SiteKind.V_IN)


class NodeEffect(BaseModel):
    site: Site = Field(description="the patched site, e.g. head_out.1.2 or resid_pre.1")
    position: int | None = Field(description="the patched position (padded index); None = every position")
    value: float = Field(description="the metric with this site patched")
    effect: float = Field(description="(value - base) / (other - base): 1 = this patch alone moves the metric all "
                                      "the way (noising: to the ablated run; denoising: back to the clean run)")


@dataclass(frozen=True)
class NodePatching:
    """Node patching results: one :class:`NodeEffect` per (site, position), and the two reference values."""

    kind: SiteKind
    direction: Direction
    ablation: Ablation
    metric: PatchMetric
    effects: list[NodeEffect]
    base: float  # the metric of the run patched into (clean for noising, corrupt for denoising)
    other: float  # the metric the patches move toward (everything ablated for noising, clean for denoising)


def patch_nodes(setup: PatchSetup, kind: SiteKind | str, *, direction: Direction | str = Direction.NOISING,
                per_position: bool | None = None, layers: Sequence[int] | None = None) -> NodePatching:
    """Patch every site of ``kind`` (each head separately for per-head kinds; each position separately when
    ``per_position``, the default for residual kinds) one at a time, and measure the metric.

    Noising runs the clean prompts with the site set to the ablation's value (resample: the corrupt prompt's
    activation; mean: the mean over corrupt prompts at that position; zero). Denoising runs the corrupt prompts with
    the site set to the clean activation (resample ablation only). Experiments are batched: many (site, position)
    patches share one forward pass, one block of rows each.
    """
    kind, direction = SiteKind(kind), Direction(direction)
    lm = setup.lm
    if kind not in NODE_KINDS:
        raise InputError(f"node patching cannot patch {kind.value} sites: use one of "
                         f"{', '.join(k.value for k in NODE_KINDS)}")
    if direction is Direction.DENOISING and setup.ablation is not Ablation.RESAMPLE:
        raise InputError("denoising patches clean activations into the corrupt run, so it needs resample ablation; "
                         f"for {setup.ablation.value} ablation use noising")
    all_layers = list(range(lm.n_layers)) if layers is None else list(dict.fromkeys(layers))
    heads = list(range(lm.n_heads)) if kind in HEAD_KINDS else [None]
    sites = [Site(kind=kind, layer=L, head=h) for L in all_layers for h in heads]
    for s in sites:
        lm.validate_site(s)
    if per_position is None:
        per_position = kind in (SiteKind.RESID_PRE, SiteKind.RESID_MID, SiteKind.RESID_POST)
    width = int(setup.task.clean.shape[1])
    exps = [(s, p) for s in sites for p in (range(width) if per_position else [None])]
    names = sorted({hook_name(s) for s in sites})
    totals = torch.zeros(len(exps), dtype=torch.float64)
    base_total = 0.0
    with torch.no_grad(), lm.sites_enabled(sites):
        mean = _node_means(setup, names) if setup.ablation is Ablation.MEAN else None
        for chunk in setup.chunks:
            base_tokens = chunk.clean if direction is Direction.NOISING else chunk.corrupt
            source = {Direction.NOISING: chunk.corrupt, Direction.DENOISING: chunk.clean}[direction]
            values = _capture_sites(setup, source, chunk.attn, names)
            if setup.ablation is Ablation.ZERO:
                values = {n: torch.zeros_like(v) for n, v in values.items()}
            elif mean is not None:
                values = {n: mean[n].expand_as(values[n]) for n in values}
            base_logits = _forward_at(setup, chunk, base_tokens, [])
            base_total += float(setup.chunk_metric(chunk, base_logits).sum())
            per = max(1, row_budget(setup.device) // chunk.size)
            for e0 in range(0, len(exps), per):
                block = exps[e0:e0 + per]
                logits = _forward_at(setup, chunk, base_tokens, _node_hooks(block, values, chunk.size), reps=len(block))
                vals = setup.chunk_metric(chunk, logits, len(block)).reshape(len(block), chunk.size).sum(1)
                totals[e0:e0 + len(block)] += vals.double().cpu()
    base = base_total / setup.n_prompts
    other = setup.m_ablated if direction is Direction.NOISING else setup.m_clean
    span = other - base
    if abs(span) <= 1e-12:
        check_effect(setup)  # raises: effects would be 0/0, not 0
    effects = [NodeEffect(site=s, position=p, value=float(v) / setup.n_prompts,
                          effect=(float(v) / setup.n_prompts - base) / span)
               for (s, p), v in zip(exps, totals.tolist(), strict=True)]
    return NodePatching(kind=kind, direction=direction, ablation=setup.ablation, metric=setup.metric,
                        effects=effects, base=base, other=other)


def check_effect(setup: PatchSetup) -> None:
    """Refuse a setup where ablating everything does not move the metric: every ratio would be 0/0."""
    if not math.isfinite(setup.effect) or abs(setup.effect) < 1e-9:
        raise InputError(f"patching every edge does not change the metric ({setup.metric.value}: clean "
                         f"{setup.m_clean:.4g}, all {setup.ablation.value}-ablated {setup.m_ablated:.4g}): there is "
                         "nothing to explain; use corrupt prompts that change the answer, or another metric")


def _capture_sites(setup: PatchSetup, tokens: torch.Tensor, attn: torch.Tensor,
                   names: list[str]) -> dict[str, torch.Tensor]:
    got: dict[str, torch.Tensor] = {}

    def keep(act: torch.Tensor, hook: Any) -> None:
        got[hook.name] = act.clone()

    setup.model.run_with_hooks(tokens, fwd_hooks=[(n, keep) for n in names], attention_mask=attn,
                               stop_at_layer=setup.graph.n_layers)
    return got


def _node_means(setup: PatchSetup, names: list[str]) -> dict[str, torch.Tensor]:
    """Per hook: the mean over all corrupt prompts at each position (padding excluded), [1, p, ...]."""
    sums: dict[str, torch.Tensor] = {}
    count = torch.zeros(setup.task.clean.shape[1], device=setup.device)
    for chunk in setup.chunks:
        got = _capture_sites(setup, chunk.corrupt, chunk.attn, names)
        valid = chunk.attn.float()
        count += valid.sum(0)
        for n, v in got.items():
            w = valid.reshape(*valid.shape, *([1] * (v.dim() - 2)))
            part = (v * w).sum(0, keepdim=True)
            sums[n] = part if n not in sums else sums[n] + part
    return {n: s / count.clamp_min(1).reshape(1, -1, *([1] * (s.dim() - 2))) for n, s in sums.items()}


def _node_hooks(block: list[tuple[Site, int | None]], values: dict[str, torch.Tensor],
                b: int) -> list[tuple[str, Callable[..., Any]]]:
    by_hook: dict[str, list[tuple[int, Site, int | None]]] = {}
    for e, (site, pos) in enumerate(block):
        by_hook.setdefault(hook_name(site), []).append((e, site, pos))
    n = len(block)

    def make(name: str) -> Callable[..., Any]:
        todo = by_hook[name]
        val = values[name]

        def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
            act = act.clone()
            view = act.view(n, b, *act.shape[1:])
            for e, site, pos in todo:
                p = slice(None) if pos is None else pos
                if site.head is None:
                    view[e, :, p] = val[:, p]
                else:
                    view[e, :, p, site.head] = val[:, p, site.head]
            return act

        return fn

    return [(name, make(name)) for name in by_hook]


def _forward_at(setup: PatchSetup, chunk: _Chunk, tokens: torch.Tensor, hooks: list[tuple[str, Callable[..., Any]]],
                reps: int = 1) -> torch.Tensor:
    """Answer-position logits of ``tokens`` (repeated ``reps`` times) run with ``hooks``."""
    toks = tokens.repeat(reps, 1) if reps > 1 else tokens
    resid = setup.model.run_with_hooks(toks, fwd_hooks=hooks, attention_mask=chunk.attn.repeat(reps, 1),
                                       stop_at_layer=setup.graph.n_layers)
    rows = torch.arange(reps * chunk.size, device=setup.device)
    return setup._unembed(resid[rows, chunk.pos.repeat(reps)])


# ============================================================================= tool inputs shared with circuits
class TaskArgs(BaseModel):
    """Where a patching tool gets its prompt pairs: a task file or inline prompts (exactly one)."""

    model_config = ConfigDict(extra="forbid")

    task_file: str | None = Field(default=None, description="path of a circuit task file (auto-circuit layout: "
                                                            "{\"prompts\": [{clean, corrupt, answers, "
                                                            "wrong_answers}]})")
    prompts: list[dict[str, Any]] | None = Field(default=None, min_length=1, max_length=512,
                                                 description="inline prompt pairs: [{\"clean\": ..., \"corrupt\": "
                                                             "..., \"answers\": [\" Mary\"], \"wrong_answers\": "
                                                             "[\" John\"]}] (clean and corrupt of equal token "
                                                             "length, single-token answers)")
    position: int | None = Field(default=None, description="where the metric is read: default each prompt's last "
                                                           "token (the answer position); negative counts from each "
                                                           "prompt's end")

    part: Literal["fit", "held_out"] | None = Field(default=None, description="use only one part of a seeded split "
                                                                         "of the prompts (TokenizedTask.split): "
                                                                         "'fit' to find a circuit, 'held_out' to "
                                                                         "score it; default all prompts")
    split_fraction: float = Field(default=0.5, gt=0, lt=1, description="share of prompts on the fit side")
    split_seed: int = Field(default=0, description="seed of the split")

    @model_validator(mode="after")
    def _one_source(self) -> TaskArgs:
        if (self.task_file is None) == (self.prompts is None):
            raise ValueError("give exactly one of task_file or prompts")
        return self


def load_task_for(lm: LoadedModel, args: TaskArgs) -> TokenizedTask:
    """The :class:`~autoexplain.tools.data.TokenizedTask` of a tool call's task file or inline prompts."""
    from pydantic import ValidationError

    from autoexplain.tools.data import TaskFile, load_task_file, tokenize_task

    if lm.tokenizer is None:
        raise InputError("this model has no tokenizer, so text prompts cannot be used with it")
    if args.task_file is not None:
        tf = load_task_file(args.task_file)
    else:
        try:
            tf = TaskFile.model_validate({"prompts": args.prompts})
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise InputError(f"prompts: {where} is invalid ({err['msg']}); each prompt needs clean, corrupt, "
                             "answers and optional wrong_answers") from None
    task = tokenize_task(tf, lm.tokenizer, n_ctx=lm.n_ctx)
    if args.part is None:
        return task
    fit, held = task.split(args.split_fraction, args.split_seed)
    return task.subset(fit if args.part == "fit" else held)


def summary_fit(header: str, lines: Sequence[str], tail: str = "", budget: int = 1500) -> str:
    """``header``, as many ``lines`` as fit ``budget`` characters, then ``tail``."""
    out, used = [header], len(header) + len(tail)
    for n, line in enumerate(lines):
        if used + len(line) + 1 > budget:
            out.append(f"(+{len(lines) - n} more lines in the full output)")
            break
        out.append(line)
        used += len(line) + 1
    if tail:
        out.append(tail)
    return "\n".join(out)


# ============================================================================= tool: activation_patching
class ActivationPatchingIn(TaskArgs):
    kind: SiteKind = Field(default=SiteKind.HEAD_OUT, description="what to patch: resid_pre, resid_mid, resid_post, "
                                                                   "attn_out, mlp_in, mlp_out, head_out (each head), "
                                                                   "q_in, k_in, v_in (each head's input)")
    direction: Direction = Field(default=Direction.NOISING, description="noising (ablated values into the clean "
                                                                        "run: necessity) or denoising (clean values "
                                                                        "into the corrupt run: sufficiency)")
    ablation: Ablation = Field(default=Ablation.RESAMPLE, description="resample (default), mean or zero")
    metric: PatchMetric | None = Field(default=None, description="logit_diff (default), answer_prob or kl")
    per_position: bool | None = Field(default=None, description="patch each position separately (default: yes "
                                                                "for residual kinds, no otherwise)")
    layers: list[int] | None = Field(default=None, description="only these layers (default all)")
    top_n: int = Field(default=12, ge=1, le=100, description="sites to list in the summary, by |effect|")


class ActivationPatchingOut(ToolOutput):
    kind: SiteKind
    direction: Direction
    ablation: Ablation
    metric: PatchMetric
    patch_type: PatchType = PatchType.NODE
    base: float = Field(description="metric of the unpatched run (clean for noising, corrupt for denoising)")
    other: float = Field(description="what the patches move toward (all ablated for noising, clean for denoising)")
    effects: list[NodeEffect]
    top_n: int = 12

    def summary_text(self) -> str:
        ranked = sorted(self.effects, key=lambda e: -abs(e.effect))
        head = (f"activation patching ({self.direction.value}, {self.ablation.value} ablation, node patching, "
                f"metric {self.metric.value}) of {len(self.effects)} {self.kind.value} patches: base "
                f"{self.base:.4g}, target {self.other:.4g}; effect 1 = one patch moves the metric all the way. "
                "Intervention-level evidence.")
        lines = [f"{e.site}{'' if e.position is None else f' @pos {e.position}'}: effect {e.effect:+.3f} "
                 f"(metric {e.value:.4g})" for e in ranked[:self.top_n]]
        return summary_fit(head, lines)


def activation_patching(ctx: ToolContext, args: ActivationPatchingIn) -> ActivationPatchingOut:
    """Patch each site of a kind one at a time (node patching) and report how much each moves the metric."""
    task = load_task_for(ctx.model, args)
    setup = PatchSetup(ctx.model, task, ablation=args.ablation, metric=args.metric or default_metric_for(task),
                       position=args.position)
    res = patch_nodes(setup, args.kind, direction=args.direction, per_position=args.per_position, layers=args.layers)
    return ActivationPatchingOut(kind=res.kind, direction=res.direction, ablation=res.ablation, metric=res.metric,
                                 base=res.base, other=res.other, effects=res.effects, top_n=args.top_n)


# ============================================================================= tool: edge_patching
class EdgePatchingIn(TaskArgs):
    edges: list[Edge] | None = Field(default=None, min_length=1, max_length=100_000,
                                    description="edges to patch together (edge patching), e.g. ['a0.3->a1.2.k', "
                                                "'a1.2->logits']")
    paths: list[list[Edge]] | None = Field(default=None, min_length=1, max_length=64,
                                          description="paths to patch (treeified path patching): each a chain of "
                                                      "edges ending at logits, e.g. [['a0.0->a1.1.k', "
                                                      "'a1.1->logits']]")
    ablation: Ablation = Field(default=Ablation.RESAMPLE, description="resample (default), mean or zero")
    metric: PatchMetric | None = Field(default=None, description="logit_diff (default), answer_prob or kl")

    @model_validator(mode="after")
    def _edges_or_paths(self) -> EdgePatchingIn:
        if (self.edges is None) == (self.paths is None):
            raise ValueError("give exactly one of edges (edge patching) or paths (path patching)")
        return self


class EdgePatchingOut(ToolOutput):
    patch_type: PatchType
    ablation: Ablation
    metric: PatchMetric
    n_patched: int = Field(description="edges (or paths) patched")
    value: float = Field(description="the metric with them patched")
    m_clean: float = Field(description="m(M): nothing patched")
    m_ablated: float = Field(description="m(∅): every edge patched")
    fraction: float = Field(description="(value - m(M)) / (m(∅) - m(M)): the share of the full ablation effect "
                                        "these edges carry (1 = patching them is as bad as ablating everything)")

    def summary_text(self) -> str:
        what = "edges" if self.patch_type is PatchType.EDGE else "paths"
        return (f"{self.patch_type.value} patching of {self.n_patched} {what} ({self.ablation.value} ablation, metric "
                f"{self.metric.value}): {self.value:.4g} vs clean {self.m_clean:.4g} and all-ablated "
                f"{self.m_ablated:.4g}: {self.fraction:+.3f} of the full effect. Intervention-level evidence.")


def edge_patching(ctx: ToolContext, args: EdgePatchingIn) -> EdgePatchingOut:
    """Patch a set of edges (or treeified paths) in one forward pass and report the metric."""
    lm = ctx.model
    g = build_graph(lm)
    edge_ids = g.edge_ids(args.edges) if args.edges is not None else None  # unknown names fail before any work
    paths = [g.edge_ids(p) for p in args.paths] if args.paths is not None else None
    for p in paths or []:
        _check_path(g, p)
    task = load_task_for(lm, args)
    setup = PatchSetup(lm, task, ablation=args.ablation, metric=args.metric or default_metric_for(task),
                       position=args.position)
    check_effect(setup)  # a fraction of a zero effect is undefined, not 0
    if edge_ids is not None:
        value, kind, n = setup.evaluate(g.mask(edge_ids)), PatchType.EDGE, len(set(edge_ids))
    else:
        assert paths is not None
        value, kind, n = setup.evaluate_paths(paths), PatchType.PATH, len(paths)
    span = setup.m_ablated - setup.m_clean
    return EdgePatchingOut(patch_type=kind, ablation=setup.ablation, metric=setup.metric, n_patched=n, value=value,
                           m_clean=setup.m_clean, m_ablated=setup.m_ablated,
                           fraction=(value - setup.m_clean) / span)


TOOLS = (
    ToolSpec(name="activation_patching", level=CausalLevel.INTERVENTION,
             input_model=ActivationPatchingIn, output_model=ActivationPatchingOut,
             fn=activation_patching, cost=Cost.FORWARD,
             description="Activation (node) patching on a task of clean/corrupt prompt pairs: patch one site at a "
                         "time (each head's output, each head's q/k/v input, attention or MLP outputs, or the "
                         "residual stream per layer and position) and report how far each moves the metric "
                         "(logit difference, answer probability or KL) at the answer. Noising (ablated values into "
                         "the clean run) tests necessity; denoising (clean into corrupt) tests sufficiency. "
                         "Intervention-level evidence; redundant components hide from noising."),
    ToolSpec(name="edge_patching", level=CausalLevel.INTERVENTION,
             input_model=EdgePatchingIn, output_model=EdgePatchingOut, fn=edge_patching,
             cost=Cost.FORWARD,
             description="Edge or path patching: ablate a set of edges of the model graph (e.g. a0.3->a1.2.k, "
                         "a1.2->logits) together in one forward pass, or treeified paths (a chain of edges ending at "
                         "logits, only that route carries the ablated signal), and report the metric against the "
                         "clean and fully ablated model. Use it to test whether specific connections carry a "
                         "behaviour. Intervention-level evidence; unknown edge names are refused."),
)
