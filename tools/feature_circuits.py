"""Sparse feature circuits (Marks et al. 2024): SAE features, SAE error terms and the embeddings as the nodes of a
circuit, found from clean/corrupt prompt pairs.

The graph
---------
SAEs are spliced in at their sites, in forward order (``x = decode(f) + err``: the error term is kept, so the model
computes exactly what it computes without them). Nodes:

* ``embed``: the input embeddings (``resid_pre.0``, token + position);
* ``SAE_ID#i``: feature i of an SAE (a :class:`~autoexplain.tools.vocab.FeatureRef`);
* ``SAE_ID#err``: the SAE's error term (everything its reconstruction misses; a node like any other, so a circuit
  cannot hide what the SAE fails to explain);
* ``logits``: the metric (read at the answer position).

With ``per_position`` each node exists once per (padded) position (``SAE_ID#i@3``); otherwise a node is summed over
positions (Marks et al.'s choice for prompts that do not share a template).

Transcoders
~~~~~~~~~~~
A transcoder (:class:`~autoexplain.tools.saes.LoadedTranscoder`, e.g. MLP input -> MLP output) is spliced at its
*output* site: its features are encoded from the activation at its input site in the same forward pass, and its
error node is true output - transcoder(input) (a skip transcoder's skip term included), so the output, and the
model, are unchanged when it is spliced. Its nodes are ``SAE_ID#i`` / ``SAE_ID#err`` like an SAE's (their
``site`` is the input site); it sits in the forward order at its output site, so its features take edges from
nodes before its input and give edges to nodes after its output: the computation it replaces (the MLP) is then
explained by its features instead of being cut. Another SAE spliced strictly between its input and output is
refused (its features would feed the error node only).

Node effects
~~~~~~~~~~~~
A node's effect is ``m(clean) - m(clean with the node at its value on the corrupt prompt)`` (positive: it supports
the clean behaviour), estimated by integrated gradients at one site at a time (every unit of the site interpolated
together; :func:`autoexplain.tools.attribution.integrated_grads`), ``grad . (clean - corrupt)``, summed over
positions for summed nodes and averaged over prompts. One forward+backward pass per site and IG step, for all
nodes of the site together: the speed-up over ablating nodes one at a time grows with the SAE width.

Edges
~~~~~
The edge ``u -> d`` between a node u at an earlier site and a node d at a later one is the linear approximation of
Marks et al.: ``sum over prompts, positions of (d m / d d) . (d d / d u) . (u_clean - u_corrupt)``, i.e. the part of
d's effect that flows from u *directly*. Directly: every site is spliced with its features and error term as
leaves, so d is differentiated as a function of the upstream leaves and every path through an intermediate
spliced site is cut (with residual-stream SAEs at successive layers, the only edges are between successive sites;
an attention- or MLP-output SAE leaves the residual path around it, so an earlier site keeps direct edges to later
ones). ``d m / d d`` is d's IG gradient from the node-effect pass. The Jacobian is integrated too (``edge_steps``
points, every site's leaves at ``corrupt + alpha (clean - corrupt)`` together), not taken at the clean run only:
on a saturated behaviour (IOI's logit difference) the clean-run gradient underestimates every edge several-fold.
Edges into ``logits`` are each node's direct effect on the metric (paths through later sites cut); with every
site's leaves interpolated together, those from every node (``all_edges``) add up to m(M) - m(∅) (IG's
completeness). One backward pass per target
node (the nodes kept, and ``logits``) and edge step, all sources at once: the expensive part.

Selection
~~~~~~~~~
Nodes with ``|effect| >= node_threshold x |m(M) - m(∅)|`` (``m(∅)``: every node at its corrupt value, which is the
corrupt run), edges between kept nodes with ``|weight| >= edge_threshold x |m(M) - m(∅)|``.

Evaluation (:meth:`SplicedModel.evaluate`; scores in :mod:`autoexplain.evals.feature_circuits`) is by intervention:
every node outside a set is set to its corrupt value (error terms included) while the nodes in it are computed
from their (possibly changed) inputs; the metric of that run is ``m(set)``.

Caveats: node effects and edges are first-order estimates (association-level until evaluated); IG's path moves
all units of a site together, so a node's effect is its share of the site's joint change. Per-position nodes
assume the prompts share a template (positions are padded indices). Memory: the per-prompt gradients of every
SAE are kept for the edge pass (``prompts x positions x d_sae`` floats per SAE).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from autoexplain.tools.attribution import (
    Chunk,
    SiteUnits,
    answer_logits,
    capture,
    ig_alphas,
    integrated_grads,
    rows_per_pass,
    task_chunks,
)
from autoexplain.tools.errors import InputError
from autoexplain.tools.models import LoadedModel, hook_name
from autoexplain.tools.patching import TaskArgs, default_metric_for, load_task_for, summary_fit
from autoexplain.tools.registry import Cost, ToolContext, ToolOutput, ToolSpec, round_sig
from autoexplain.tools.vocab import CausalLevel, PatchMetric, Site, SiteKind

if TYPE_CHECKING:
    from autoexplain.tools.data import TokenizedTask
    from autoexplain.tools.saes import LoadedSAE

EMBED_SITE = Site(kind=SiteKind.RESID_PRE, layer=0)
#: Order of site kinds inside one block (forward order).
_KIND_ORDER = {SiteKind.RESID_PRE: 0, SiteKind.ATTN_OUT: 1, SiteKind.RESID_MID: 2, SiteKind.MLP_IN: 3,
               SiteKind.MLP_POST: 4, SiteKind.MLP_OUT: 5, SiteKind.RESID_POST: 6}


class NodeKind(StrEnum):
    EMBED = "embed"
    FEATURE = "feature"
    ERROR = "error"
    LOGITS = "logits"


class FCNode(BaseModel):
    """A node of a feature circuit. ``key`` is its string form: ``embed``, ``SAE_ID#12``, ``SAE_ID#err``,
    ``logits``, with ``@POS`` appended for per-position nodes."""

    model_config = ConfigDict(frozen=True)

    kind: NodeKind
    site: Site | None = Field(default=None, description="resid_pre.0 for embed, the SAE's site, None for logits")
    sae_id: str | None = None
    index: int | None = Field(default=None, description="feature index (features only)")
    position: int | None = Field(default=None, description="padded position; None: summed over positions")

    @property
    def key(self) -> str:
        base = {NodeKind.EMBED: "embed", NodeKind.LOGITS: "logits",
                NodeKind.FEATURE: f"{self.sae_id}#{self.index}", NodeKind.ERROR: f"{self.sae_id}#err"}[self.kind]
        return base if self.position is None else f"{base}@{self.position}"


class NodeResult(BaseModel):
    node: FCNode
    key: str
    effect: float = Field(description="estimated m(clean) - m(node at its corrupt value), metric units")
    activation: float | None = Field(default=None, description="clean activation (features): summed over the "
                                                               "node's positions, mean over prompts")
    in_circuit: bool


class EdgeResult(BaseModel):
    src: str
    dst: str
    weight: float = Field(description="linear-approximation effect of src on the metric through dst, directly")
    in_circuit: bool


class FeatureCircuit(BaseModel):
    """A found feature circuit: every node scored (kept or not), the edges computed between kept nodes (and into
    ``logits``), and what it was found with."""

    model_id: str
    saes: list[str] = Field(description="sae_ids in forward order")
    sites: list[Site]
    metric: PatchMetric
    ablation: str = "resample"
    per_position: bool
    steps: int
    node_threshold: float
    edge_threshold: float
    n_prompts: int
    m_clean: float
    m_ablated: float
    nodes: list[NodeResult]
    edges: list[EdgeResult]
    seconds: float
    faithfulness: float | None = Field(default=None, description="F(C) = (m(C) - m(∅)) / (m(M) - m(∅)), by "
                                                                 "ablating every node outside (error terms "
                                                                 "included); None: not evaluated")
    n_positions: int
    transcoders: dict[str, Site] = Field(default_factory=dict, description="the transcoders among saes: sae_id -> "
                                                                           "the output site it writes (its features "
                                                                           "are read at its site in sites)")

    @property
    def effect(self) -> float:
        return self.m_clean - self.m_ablated

    def kept(self) -> list[NodeResult]:
        return [n for n in self.nodes if n.in_circuit]

    def kept_keys(self) -> set[str]:
        return {n.key for n in self.nodes if n.in_circuit}

    def circuit_edges(self) -> list[EdgeResult]:
        return [e for e in self.edges if e.in_circuit]


@dataclass(frozen=True)
class FeatureCircuitConfig:
    """How a feature circuit is found: IG steps (node effects; ``edge_steps`` for the edge pass), per-position
    nodes, thresholds (fractions of |m(M) - m(∅)|), metric (None: logit_diff when prompts have wrong answers), the
    metric position, prompts per batch, and ``all_edges`` (compute edges from every node, kept or not: what
    ground-truth ROC curves need)."""

    steps: int = 10
    per_position: bool = False
    node_threshold: float = 0.01
    edge_threshold: float = 0.02
    metric: PatchMetric | None = None
    position: int | None = None
    batch_size: int = 64
    all_edges: bool = False
    #: IG steps of the edge pass (one backward pass per kept node and step: the expensive part)
    edge_steps: int = 4


# ============================================================================= the spliced model
class SplicedModel:
    """A model with SAEs spliced in at their sites, and the embedding site, in forward order; the task's clean and
    corrupt states of every site, per chunk of prompts."""

    def __init__(self, lm: LoadedModel, task: TokenizedTask, saes: Sequence[LoadedSAE], *,
                 metric: PatchMetric | None = None, position: int | None = None, batch_size: int = 64) -> None:
        if not saes:
            raise InputError("a feature circuit needs at least one SAE")
        ids = [s.sae_id for s in saes]
        if len(set(ids)) != len(ids):
            raise InputError(f"the same SAE was given twice ({', '.join(ids)})")
        sites = [s.out_site for s in saes]  # where each is spliced (a transcoder: its output site)
        if len(set(map(str, sites))) != len(sites):
            raise InputError(f"two SAEs read the same site ({', '.join(map(str, sites))}): give one SAE per site")
        for s in saes:
            if s.out_site == EMBED_SITE:
                raise InputError(f"SAE {s.spec!r} reads resid_pre.0, which is the embed node of a feature circuit: "
                                 "use SAEs at later sites")
            for site in (s.site, s.out_site):
                if site.kind not in _KIND_ORDER:
                    raise InputError(f"SAE {s.spec!r} reads {site}: feature circuits support residual, attention-"
                                     "output and MLP sites")
        for t in saes:
            if not t.is_transcoder:
                continue
            for s in saes:
                if _order(t.site) < _order(s.out_site) < _order(t.out_site):
                    raise InputError(f"SAE {s.spec!r} is spliced at {s.out_site}, inside the computation transcoder "
                                     f"{t.spec!r} replaces ({t.site} -> {t.out_site}): drop one of them")
        self.lm = lm
        self.task = task
        self.saes = sorted(saes, key=lambda s: _order(s.out_site))
        self.metric = PatchMetric(metric) if metric is not None else default_metric_for(task)
        self.units = [SiteUnits(lm, EMBED_SITE)] + [SiteUnits(lm, s.site, s) for s in self.saes]
        self.hooks = [u.hook for u in self.units]
        #: every site the units touch (transcoder inputs included), for ``sites_enabled``
        self.all_sites = [site for u in self.units for site in u.sites]
        self.chunks = task_chunks(lm, task, self.metric, position=position, batch_size=batch_size)
        layers = sorted({u.layer for u in self.units if u.layer > 0})
        self.clean: list[list[tuple[torch.Tensor, ...]]] = []  # per chunk, per site
        self.base: list[list[tuple[torch.Tensor, ...]]] = []
        self.resid_pre: list[dict[int, torch.Tensor]] = []
        reads = list(dict.fromkeys(h for u in self.units for h in u.read_hooks))
        with torch.no_grad(), lm.sites_enabled(self.all_sites):
            for c in self.chunks:
                got = capture(lm, c.clean, c.attn, reads, resid_pre_layers=layers)
                bad = capture(lm, c.corrupt, c.attn, reads)
                self.clean.append([u.state_from(got) for u in self.units])
                self.base.append([u.state_from(bad) for u in self.units])
                self.resid_pre.append({L: got[hook_name(Site(kind=SiteKind.RESID_PRE, layer=L))] for L in layers})
        self.n_positions = int(task.clean.shape[1])

    @property
    def n_prompts(self) -> int:
        return self.task.n_prompts

    def stash_hooks(self, store: dict[int, torch.Tensor]) -> list[tuple[str, Any]]:
        """Hooks that keep each transcoder's input activation of the current forward pass in ``store`` (by unit
        index), for its state at its output hook. Register them after the splicing hooks, so that an input hook
        shared with another unit's splice sees the spliced value."""
        hooks: list[tuple[str, Any]] = []
        for i, u in enumerate(self.units):
            if u.in_hook is not None:
                def keep(act: torch.Tensor, hook: Any, i: int = i) -> None:
                    store[i] = act

                hooks.append((u.in_hook, keep))
        return hooks

    def unit_count(self, i: int) -> int:
        """Nodes per position at site i: 1 for embed, d_sae + 1 (features, error) for an SAE."""
        u = self.units[i]
        return 1 if u.sae is None else u.sae.d_sae + 1

    def node(self, i: int, unit: int, position: int | None) -> FCNode:
        u = self.units[i]
        if u.sae is None:
            return FCNode(kind=NodeKind.EMBED, site=EMBED_SITE, position=position)
        if unit == u.sae.d_sae:
            return FCNode(kind=NodeKind.ERROR, site=u.site, sae_id=u.sae.sae_id, position=position)
        return FCNode(kind=NodeKind.FEATURE, site=u.site, sae_id=u.sae.sae_id, index=unit, position=position)

    def site_of(self, key: str) -> tuple[int, int, int | None]:
        """(site index, unit, position) of a node key; :class:`InputError` for an unknown key."""
        base, _, pos = key.partition("@")
        position = int(pos) if pos else None
        if base == "embed":
            return 0, 0, position
        sae_id, _, idx = base.rpartition("#")
        for i, u in enumerate(self.units):
            if u.sae is not None and u.sae.sae_id == sae_id:
                unit = u.sae.d_sae if idx == "err" else int(idx) if idx.isdigit() else -1
                if 0 <= unit <= u.sae.d_sae:
                    return i, unit, position
        raise InputError(f"unknown feature-circuit node {key!r}")

    # -- evaluation by intervention ---------------------------------------------------------------------
    def keep_masks(self, node_sets: Sequence[Iterable[str]]) -> list[torch.Tensor]:
        """Per site, a boolean keep mask ``[K, n_pos, n_units]`` (True: the node runs; False: at its corrupt value)."""
        masks = [torch.zeros(len(node_sets), self.n_positions, self.unit_count(i), dtype=torch.bool)
                 for i in range(len(self.units))]
        for k, keys in enumerate(node_sets):
            for key in keys:
                if key == "logits":
                    continue
                i, unit, pos = self.site_of(key)
                if pos is None:
                    masks[i][k, :, unit] = True
                elif pos < self.n_positions:
                    masks[i][k, pos, unit] = True
        return masks

    def evaluate(self, node_sets: Sequence[Iterable[str]], *, invert: Sequence[bool] | None = None) -> list[float]:
        """The mean metric with every node outside each set at its corrupt value (error nodes included), the nodes
        in it computed from their inputs. ``invert[k]``: set k names the nodes to *ablate* instead (everything else
        runs), so ``evaluate([[]], invert=[True])`` is the clean run and ``evaluate([[]])`` the corrupt one."""
        sets = [list(s) for s in node_sets]
        masks = self.keep_masks(sets)
        if invert is not None:
            flip = torch.tensor([bool(x) for x in invert], dtype=torch.bool)
            masks = [torch.where(flip[:, None, None], ~m, m) for m in masks]
        dev = torch.device(self.lm.device)
        totals = torch.zeros(len(sets), dtype=torch.float64)
        with torch.no_grad(), self.lm.sites_enabled(self.all_sites):
            for ci, chunk in enumerate(self.chunks):
                per = max(1, rows_per_pass(dev) // chunk.size)
                for k0 in range(0, len(sets), per):
                    block = [m[k0:k0 + per].to(dev) for m in masks]
                    reps = int(block[0].shape[0])
                    vals = self._masked_run(ci, chunk, block, reps)
                    totals[k0:k0 + reps] += vals.view(reps, chunk.size).double().sum(1).cpu()
        return (totals / self.n_prompts).tolist()

    def _masked_run(self, ci: int, chunk: Chunk, masks: list[torch.Tensor], reps: int) -> torch.Tensor:
        b = chunk.size
        hooks = []
        inputs: dict[int, torch.Tensor] = {}
        for i, u in enumerate(self.units):
            base = [_rep(t, reps) for t in self.base[ci][i]]
            width = int(chunk.clean.shape[1])
            keep = masks[i][:, :width].repeat_interleave(b, 0)  # [reps * b, p, units]

            def fn(act: torch.Tensor, hook: Any, i: int = i, u: SiteUnits = u, base: list[torch.Tensor] = base,
                   keep: torch.Tensor = keep) -> torch.Tensor:
                if u.sae is None:
                    return torch.where(keep[..., :1], act, base[0].to(act.dtype))
                f, err = u.state(act, inputs.get(i))
                d = u.sae.d_sae
                f = torch.where(keep[..., :d], f, base[0].to(f.dtype))
                err = torch.where(keep[..., d:], err, base[1].to(err.dtype))
                return u.compose([f, err]).to(act.dtype)

            hooks.append((u.hook, fn))
        hooks += self.stash_hooks(inputs)
        attn = chunk.attn.repeat(reps, 1)
        resid = self.lm.model.run_with_hooks(chunk.clean.repeat(reps, 1), fwd_hooks=hooks, attention_mask=attn,
                                             stop_at_layer=self.lm.n_layers)
        return chunk.metric(answer_logits(self.lm, chunk, resid, reps), self.metric, reps)


def _order(site: Site) -> tuple[int, int]:
    """A layer-level site's place in the forward pass."""
    return site.layer, _KIND_ORDER[site.kind]


def _rep(t: torch.Tensor, reps: int) -> torch.Tensor:
    """Copies of a ``[b, ...]`` tensor stacked as ``[reps * b, ...]`` (copy k in rows k*b...)."""
    return t if reps == 1 else t.repeat(reps, *([1] * (t.dim() - 1)))


# ============================================================================= finding the circuit
def find_feature_circuit(lm: LoadedModel, task: TokenizedTask, saes: Sequence[LoadedSAE],
                         config: FeatureCircuitConfig | None = None, *,
                         spliced: SplicedModel | None = None) -> FeatureCircuit:
    """Node effects by IG, the nodes above threshold, the edges between them (see the module doc), and the
    circuit's faithfulness by ablating everything outside it."""
    cfg = config or FeatureCircuitConfig()
    if cfg.node_threshold < 0 or cfg.edge_threshold < 0:
        raise InputError("thresholds are fractions of |m(M) - m(∅)| and must be >= 0")
    t0 = time.perf_counter()
    sm = spliced or SplicedModel(lm, task, saes, metric=cfg.metric, position=cfg.position,
                                 batch_size=cfg.batch_size)
    m_clean, m_ablated = sm.evaluate([[], []], invert=[True, False])
    effect = m_clean - m_ablated
    if abs(effect) < 1e-6 * max(1.0, abs(m_clean)):
        raise InputError(f"the corrupt prompts do not change the metric (m(M) {m_clean:.4g}, m(∅) {m_ablated:.4g}): "
                         "there is no behaviour to find a circuit for")
    alphas = ig_alphas("ig", cfg.steps)
    n_sites = len(sm.units)
    effects, acts, grads = node_effects(sm, alphas)

    scale = abs(effect)
    nodes: list[NodeResult] = []
    for i in range(n_sites):
        e = effects[i] if cfg.per_position else effects[i].sum(0, keepdim=True)
        a = acts[i] if cfg.per_position else acts[i].sum(0, keepdim=True)
        for p in range(e.shape[0]):
            for unit in range(e.shape[1]):
                val = float(e[p, unit])
                node = sm.node(i, unit, p if cfg.per_position else None)
                is_feat = node.kind is NodeKind.FEATURE
                nodes.append(NodeResult(node=node, key=node.key, effect=val,
                                        activation=float(a[p, unit]) if is_feat else None,
                                        in_circuit=abs(val) >= cfg.node_threshold * scale and val != 0.0))
    kept = {n.key for n in nodes if n.in_circuit}
    sources = {n.key for n in nodes} if cfg.all_edges else kept
    targets = [n.node for n in nodes if n.key in sources and n.node.kind is not NodeKind.EMBED]
    weights = edge_weights(sm, grads, targets, sources, cfg.per_position, ig_alphas("ig", cfg.edge_steps))
    edges = [EdgeResult(src=s, dst=d, weight=w,
                        in_circuit=s in kept and (d in kept or d == "logits") and abs(w) >= cfg.edge_threshold * scale
                        and w != 0.0)
             for (s, d), w in weights.items()]
    faith = None
    if kept:
        m_c = sm.evaluate([sorted(kept)])[0]
        faith = (m_c - m_ablated) / effect
    return FeatureCircuit(model_id=lm.model_id, saes=[s.sae_id for s in sm.saes], sites=[s.site for s in sm.saes],
                          metric=sm.metric, per_position=cfg.per_position, steps=cfg.steps,
                          node_threshold=cfg.node_threshold, edge_threshold=cfg.edge_threshold, n_prompts=sm.n_prompts,
                          m_clean=m_clean, m_ablated=m_ablated, nodes=nodes, edges=edges,
                          seconds=time.perf_counter() - t0, faithfulness=faith, n_positions=sm.n_positions,
                          transcoders={s.sae_id: s.out_site for s in sm.saes if s.is_transcoder})


def node_effects(sm: SplicedModel, alphas: Sequence[float]) -> tuple[list[torch.Tensor], list[torch.Tensor],
                                                                   list[list[tuple[torch.Tensor, ...]]]]:
    """Per site: IG node effects ``[n_pos, units]`` (mean over prompts), clean feature activations ``[n_pos, units]``
    (mean over prompts) and, per chunk, the IG gradients (kept for the edge pass). One IG run per site: every unit
    of the site interpolated together, the other sites clean."""
    lm = sm.lm
    n_sites = len(sm.units)
    effects = [torch.zeros(sm.n_positions, sm.unit_count(i), dtype=torch.float64) for i in range(n_sites)]
    acts = [torch.zeros(sm.n_positions, sm.unit_count(i), dtype=torch.float64) for i in range(n_sites)]
    grads: list[list[tuple[torch.Tensor, ...]]] = []
    with lm.sites_enabled(sm.all_sites):
        for ci, chunk in enumerate(sm.chunks):
            per_site = []
            for i, u in enumerate(sm.units):
                clean, base = sm.clean[ci][i], sm.base[ci][i]
                g = integrated_grads(lm, chunk, u, clean, base, alphas, sm.metric, sm.resid_pre[ci].get(u.layer))
                contrib = u.unit_values([gg * (c - b) for gg, c, b in zip(g, clean, base, strict=True)])
                width = contrib.shape[1]
                effects[i][:width] += contrib.sum(0).double().cpu()
                if u.sae is not None:
                    acts[i][:width, :-1] += clean[0].sum(0).double().cpu()
                per_site.append(g)
            grads.append(per_site)
    n = sm.n_prompts
    return [e / n for e in effects], [a / n for a in acts], grads


def edge_weights(sm: SplicedModel, grads: list[list[tuple[torch.Tensor, ...]]], targets: list[FCNode],
           sources: set[str], per_position: bool, alphas: Sequence[float]) -> dict[tuple[str, str], float]:
    """Edge weights ``(src key, dst key) -> weight`` into every target node and ``logits`` (see the module doc),
    integrated over ``alphas``: every site's leaves at ``corrupt + alpha (clean - corrupt)`` together."""
    lm = sm.lm
    out: dict[tuple[str, str], float] = {}
    site_index = {u.sae.sae_id: i for i, u in enumerate(sm.units) if u.sae is not None}
    dev = torch.device(lm.device)
    with torch.enable_grad(), lm.sites_enabled(sm.all_sites):
        for ci, chunk in enumerate(sm.chunks):
            deltas = [[c - b for c, b in zip(sm.clean[ci][i], sm.base[ci][i], strict=True)]
                      for i in range(len(sm.units))]
            per_pass = max(1, rows_per_pass(dev) // chunk.size)
            for a0 in range(0, len(alphas), per_pass):
                a = torch.tensor(list(alphas[a0:a0 + per_pass]), device=dev)
                reps = int(a.shape[0])
                leaves = [tuple(_interpolate(c, b, a).requires_grad_(True)
                                for c, b in zip(sm.clean[ci][i], sm.base[ci][i], strict=True))
                          for i in range(len(sm.units))]
                _edge_pass(sm, chunk, ci, grads, leaves, deltas, reps, targets, site_index, sources, per_position,
                           out)
    return {k: v / (sm.n_prompts * len(alphas)) for k, v in out.items()}


def _interpolate(clean: torch.Tensor, base: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """``[reps * b, ...]``: copy k is ``base + alphas[k] (clean - base)``."""
    aa = alphas.view(-1, *([1] * clean.dim())).to(clean.dtype)
    x = base[None] + aa * (clean - base)[None]
    return x.reshape(-1, *clean.shape[1:]).detach()


def _edge_pass(sm: SplicedModel, chunk: Chunk, ci: int, grads: list[list[tuple[torch.Tensor, ...]]],
               leaves: list[tuple[torch.Tensor, ...]], deltas: list[list[torch.Tensor]], reps: int,
               targets: list[FCNode], site_index: dict[str, int], sources: set[str], per_position: bool,
               out: dict[tuple[str, str], float]) -> None:
    """One forward pass with every site spliced as leaves (``reps`` interpolation copies), then one backward pass
    per target; adds ``sum over rows of grad . delta`` per (source, target) into ``out``."""
    lm = sm.lm
    pre: dict[int, tuple[torch.Tensor, ...]] = {}
    inputs: dict[int, torch.Tensor] = {}
    hooks = []
    for i, u in enumerate(sm.units):
        def fn(act: torch.Tensor, hook: Any, i: int = i, u: SiteUnits = u) -> torch.Tensor:
            if u.sae is not None:
                pre[i] = u.state(act, inputs.get(i))
            return u.compose(leaves[i]).to(act.dtype)

        hooks.append((u.hook, fn))
    hooks += sm.stash_hooks(inputs)
    resid = lm.model.run_with_hooks(chunk.clean.repeat(reps, 1), fwd_hooks=hooks,
                                    attention_mask=chunk.attn.repeat(reps, 1), stop_at_layer=lm.n_layers)
    metric = chunk.metric(answer_logits(lm, chunk, resid, reps), sm.metric, reps).sum()
    jobs: list[tuple[str, torch.Tensor, int]] = [("logits", metric, len(sm.units))]
    for t in targets:
        assert t.sae_id is not None
        i = site_index[t.sae_id]
        g = [_rep(x, reps) for x in grads[ci][i]]
        if t.kind is NodeKind.FEATURE:
            assert t.index is not None
            prod = g[0][..., t.index] * pre[i][0][..., t.index]  # [reps * b, p]
        else:
            prod = (g[1] * pre[i][1]).sum(-1)
        if t.position is not None:
            prod = prod[:, t.position] if t.position < prod.shape[1] else prod[:, :0]
        jobs.append((t.key, prod.sum(), i))
    for key, scalar, i_dst in jobs:
        earlier = list(range(i_dst))
        flat = [leaf for j in earlier for leaf in leaves[j]]
        if not scalar.requires_grad or not flat:
            continue
        got = torch.autograd.grad(scalar, flat, retain_graph=True, allow_unused=True)
        pos = 0
        for j in earlier:
            gs = got[pos:pos + len(leaves[j])]
            pos += len(leaves[j])
            if all(x is None for x in gs):
                continue
            prods = [torch.zeros_like(_rep(d, reps)) if x is None else x * _rep(d, reps)
                     for x, d in zip(gs, deltas[j], strict=True)]
            per = sm.units[j].unit_values(prods).detach().double().sum(0).cpu()  # [p, units]
            if not per_position:
                per = per.sum(0, keepdim=True)
            for p, unit in per.nonzero().tolist():
                src = sm.node(j, unit, p if per_position else None).key
                if src in sources:
                    out[(src, key)] = out.get((src, key), 0.0) + float(per[p, unit])


# ============================================================================= tool
class FeatureCircuitIn(TaskArgs):
    sae_ids: list[str] | None = Field(default=None, min_length=1, description="the SAEs whose features are nodes "
                                                                              "(default: every loaded SAE)")
    per_position: bool = Field(default=False, description="one node per (feature, position) instead of summed "
                                                          "over positions")
    node_threshold: float = Field(default=0.01, ge=0, description="keep nodes with |effect| >= this x |m(M) - "
                                                                   "m(∅)|")
    edge_threshold: float = Field(default=0.02, ge=0, description="keep edges with |weight| >= this x |m(M) - "
                                                                   "m(∅)|")
    steps: int = Field(default=10, ge=1, le=64, description="integrated-gradient steps")
    metric: PatchMetric | None = Field(default=None, description="logit_diff (default), answer_prob or kl")
    top_n: int = Field(default=15, ge=1, le=100, description="nodes listed in the summary")


class FeatureCircuitOut(ToolOutput):
    circuit: FeatureCircuit
    top_n: int = 15

    def summary_text(self) -> str:
        c = self.circuit
        kept = sorted(c.kept(), key=lambda n: -abs(n.effect))
        faith = "not evaluated" if c.faithfulness is None else f"{c.faithfulness:.3f}"
        head = (f"sparse feature circuit over {', '.join(c.saes)} (metric {c.metric.value}, resample ablation, "
                f"{'per-position' if c.per_position else 'summed'} nodes): {len(kept)} of {len(c.nodes)} nodes, "
                f"{len(c.circuit_edges())} edges; m(M) {c.m_clean:.4g}, m(∅) {c.m_ablated:.4g}; faithfulness "
                f"(everything outside ablated, error terms included) {faith}. Node effects are IG estimates; "
                "faithfulness is intervention-level.")
        lines = [f"{n.key}: effect {round_sig(n.effect)}" for n in kept[:self.top_n]]
        top_edges = sorted(c.circuit_edges(), key=lambda e: -abs(e.weight))[:self.top_n]
        lines += [f"edge {e.src} -> {e.dst}: {round_sig(e.weight)}" for e in top_edges]
        return summary_fit(head, lines)


def feature_circuit_tool(ctx: ToolContext, args: FeatureCircuitIn) -> FeatureCircuitOut:
    """Find the sparse feature circuit of a task over the loaded SAEs."""
    ids = args.sae_ids or sorted(ctx.saes)
    saes = [ctx.sae(i) for i in ids]
    if not saes:
        raise InputError("no SAE is loaded in this session: start it with an SAE (--sae) to find feature circuits")
    task = load_task_for(ctx.model, args)
    cfg = FeatureCircuitConfig(steps=args.steps, per_position=args.per_position, node_threshold=args.node_threshold,
                               edge_threshold=args.edge_threshold, metric=args.metric, position=args.position)
    return FeatureCircuitOut(circuit=find_feature_circuit(ctx.model, task, saes, cfg), top_n=args.top_n)


TOOLS = (
    ToolSpec(name="feature_circuit", level=CausalLevel.INTERVENTION, input_model=FeatureCircuitIn,
             output_model=FeatureCircuitOut, fn=feature_circuit_tool, cost=Cost.FORWARD,
             description="Sparse feature circuit (Marks et al.) of a task of clean/corrupt prompt pairs: SAE "
                         "features, SAE error terms and the embeddings as nodes, node effects by integrated "
                         "gradients, edges between features of successive SAE sites by the linear approximation, "
                         "nodes and edges above thresholds; faithfulness measured by ablating every node outside "
                         "the circuit (error terms included). Lists each kept node (SAE_ID#INDEX) with its effect: "
                         "label them with the feature tools."),
)
