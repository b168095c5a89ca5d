"""Tools the agent adds to the registry: reads of harvested results from the store.

``feature_examples`` shows a feature's statistics and its **explain-split** examples only: the held-out
``score`` side never reaches a policy (or an LLM), so the scores measure generalisation, not recall of what the
explainer saw. It lives in ``agent/`` because tools know nothing of DuckDB; it is still an ordinary
:class:`ToolSpec` (pydantic in/out, bounded summary), so the LLM calls it like any other tool.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel, ConfigDict, Field

from autoexplain.agent.store import queries
from autoexplain.evals.mechanism import MediationResult, NodeClaim, mediation, node_claims
from autoexplain.tools.errors import InputError
from autoexplain.tools.patching import PatchSetup, TaskArgs, default_metric_for, load_task_for
from autoexplain.tools.registry import Cost, Registry, ToolContext, ToolOutput, ToolSpec, default_registry, round_sig
from autoexplain.tools.vocab import Ablation, CausalLevel, Edge, PatchMetric

if TYPE_CHECKING:
    from autoexplain.agent.store import Store


class FeatureExamplesIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sae_id: str = Field(description="id of a loaded SAE (see model_info)")
    feature_index: int = Field(ge=0, description="the feature")
    n: int = Field(default=20, ge=1, le=100, description="examples to show (strongest first)")


class ShownExample(BaseModel):
    kind: str = Field(description="top | quantile | random (random: a non-activating context)")
    quantile: int | None = None
    max_act: float
    tokens: list[str]
    acts: list[float]

    @property
    def peak(self) -> str | None:
        if self.max_act <= 0:
            return None
        return self.tokens[self.acts.index(max(self.acts))]

    def marked(self) -> str:
        """The context with firing tokens wrapped in [[ ]] and their activation."""
        return "".join(f"[[{t}]]({a:.2g})" if a > 0 else t for t, a in zip(self.tokens, self.acts, strict=True))


class FeatureExamplesOut(ToolOutput):
    sae_id: str
    feature_index: int
    density: float | None
    max_act: float | None
    n_tokens: int | None
    is_dead: bool
    top_logits: list[tuple[str, float]] = Field(default_factory=list)
    examples: list[ShownExample]
    n_hidden: int = Field(description="held-out (score-side) examples not shown")

    def summary_text(self) -> str:
        if self.is_dead:
            return (f"feature {self.feature_index} of {self.sae_id} never fired in {self.n_tokens} harvested tokens "
                    "(dead).")
        head = (f"feature {self.feature_index} of {self.sae_id}: density {round_sig(self.density or 0, 3)}, max act "
                f"{round_sig(self.max_act or 0, 3)} over {self.n_tokens} tokens; promotes "
                + ", ".join(repr(t) for t, _ in self.top_logits[:6])
                + f". Explain-split examples ({len(self.examples)} shown, {self.n_hidden} held out for scoring; "
                  "firing tokens in [[ ]] with activation; association only):")
        lines = [f"- {e.kind}{'' if e.quantile is None else f' q{e.quantile}'}: {e.marked()}"
                 for e in self.examples]
        return "\n".join([head, *lines])


def feature_examples_spec(store: Store) -> ToolSpec:
    """The ``feature_examples`` tool bound to ``store``."""

    def fn(ctx: ToolContext, args: FeatureExamplesIn) -> FeatureExamplesOut:
        sae = ctx.sae(args.sae_id)
        if args.feature_index >= sae.d_sae:
            raise InputError(f"feature_index {args.feature_index} is out of range: {args.sae_id} has {sae.d_sae} "
                             "features")
        feat = queries.feature_summary(store, args.sae_id, args.feature_index)
        if feat is None:
            raise InputError(f"feature {args.feature_index} of {args.sae_id} has not been harvested: run harvest "
                             "on a dataset first")
        density, max_act, n_tokens, is_dead, top_logits = feat
        rows = queries.shown_examples(store, args.sae_id, args.feature_index)
        if rows and any(r[5] is None for r in rows):
            raise InputError(f"the examples of feature {args.feature_index} have no held-out split yet: the agent "
                             "splits them before explaining (this is a bug if you see it)")
        shown = [ShownExample(kind=k, quantile=q, max_act=m, tokens=json.loads(t), acts=json.loads(a))
                 for k, q, m, t, a, split in rows if split == "explain"]
        hidden = sum(1 for r in rows if r[5] != "explain")
        activating = [e for e in shown if e.max_act > 0][: args.n]
        quiet = [e for e in shown if e.max_act <= 0][: max(2, args.n // 5)]
        return FeatureExamplesOut(sae_id=args.sae_id, feature_index=args.feature_index, density=density,
                                  max_act=max_act, n_tokens=n_tokens, is_dead=bool(is_dead),
                                  top_logits=[tuple(x) for x in json.loads(top_logits)] if top_logits else [],
                                  examples=activating + quiet, n_hidden=hidden)

    return ToolSpec(name="feature_examples", level=CausalLevel.ASSOCIATION,
                    input_model=FeatureExamplesIn, output_model=FeatureExamplesOut, fn=fn,
                    cost=Cost.CHEAP,
                    description="A harvested feature's statistics (density, max activation, tokens its decoder "
                                "promotes) and its explain-split contexts, strongest first, firing tokens marked "
                                "[[token]](activation), plus a few non-activating contexts. Held-out examples are "
                                "never shown. Association-level evidence.")


class MediationIn(TaskArgs):
    nodes: list[str] | None = Field(default=None, max_length=64, description="heads aL.H and MLPs mL to analyse "
                                                                             "(default: every head and MLP)")
    ablation: Ablation = Field(default=Ablation.RESAMPLE, description="resample (default), mean or zero")
    metric: PatchMetric | None = Field(default=None, description="logit_diff (default; answer_prob when a prompt "
                                                                 "has no wrong answers), answer_prob or kl")
    edges: list[Edge] | None = Field(default=None, max_length=256, description="edges to noise one at a time in "
                                                                              "the clean model (e.g. a0.0->a1.1.k)")


class MediationOut(ToolOutput):
    result: MediationResult
    claims: list[NodeClaim] = Field(description="per node, the share of prompts on which noising it moves the "
                                                "metric toward the corrupt run")
    edge_effects: dict[str, float] = Field(default_factory=dict, description="edge -> (m(M) - m(that edge alone "
                                                                             "noised)) / (m(M) - m(∅))")

    def summary_text(self) -> str:
        shares = {c.node: c.holds_share for c in self.claims}
        text = self.result.summary_text()
        held = ", ".join(f"{n} {s:.0%}" for n, s in shares.items() if s is not None)
        ranked = sorted(self.edge_effects.items(), key=lambda kv: -abs(kv[1]))[:20]
        edges = ", ".join(f"{e} {v:+.0%}" for e, v in ranked)
        return (text + (f"\nshare of prompts on which noising the node hurts: {held}" if held else "")
                + (f"\nedges noised alone (share of the effect lost): {edges}" if edges else ""))


def mediation_tool(ctx: ToolContext, args: MediationIn) -> MediationOut:
    """Causal mediation of each node: total, direct (node->logits only) and indirect effect, per-prompt support."""
    task = load_task_for(ctx.model, args)
    metric = args.metric or default_metric_for(task)
    setup = PatchSetup(ctx.model, task, ablation=args.ablation, metric=metric, position=args.position)
    result = mediation(setup, args.nodes)
    effects: dict[str, float] = {}
    if args.edges:
        g = setup.graph
        unknown = [str(e) for e in args.edges if str(e) not in g.index]
        if unknown:
            raise InputError(f"edges not in this model's graph: {', '.join(unknown[:5])} (edges look like "
                             "a0.0->a1.1.k, m0->a1.2.v, a1.1->logits)")
        values = setup.evaluate_many(torch.stack([g.mask([g.index[str(e)]]) for e in args.edges]))
        effects = {str(e): (setup.m_clean - v) / setup.effect for e, v in zip(args.edges, values, strict=True)}
    return MediationOut(result=result, claims=node_claims(setup, [n.node for n in result.nodes]),
                        edge_effects=effects)


MEDIATION = ToolSpec(name="mediation", level=CausalLevel.INTERVENTION, input_model=MediationIn,
                     output_model=MediationOut, fn=mediation_tool, cost=Cost.FORWARD,
                     description="Causal mediation per node on a task (clean/corrupt prompt pairs): for each head "
                                 "or MLP, the total effect of noising its output, the direct effect (only its edge "
                                 "to the logits noised), the indirect effect (only its edges to later components "
                                 "noised), their ratio, and the share of prompts on which noising it hurts. "
                                 "Intervention-level evidence for this task, ablation and metric.")


def agent_registry(store: Store) -> Registry:
    """The built-in tools, the agent's store readers and the tools built on evals (mediation)."""
    reg = default_registry()
    reg.register(feature_examples_spec(store))
    reg.register(MEDIATION)
    return reg
