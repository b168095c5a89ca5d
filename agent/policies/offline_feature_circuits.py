"""The offline policy's feature-circuit rules: find the sparse feature circuit, read its features' labels, and
write the behaviour's explanation through them, claiming only what the circuit measured.

Steps (each a policy step; the graph runs the tool calls between them):

1. ``feature_circuit`` on the *fit* half of the task's prompts (the seeded split every circuit item uses; the
   scorer computes every score on the other half, :class:`autoexplain.agent.scoring.FeatureCircuitScorer`). The
   run already made this call when it listed its items (to know which features to label), so it comes from the
   tool cache.
2. ``feature_labels`` of the kept feature nodes: the final labels the run's feature items just wrote (the run
   lists those items before this one), or labels stored before.
3. One explanation: the metric on the clean and the corrupt prompts (and the answer it reads), then each kept
   node by |effect| with its label, where it sits, and its share of the full effect m(M) - m(∅) (integrated-
   gradient estimates), the direct edges into the metric, the strongest feature-to-feature edges, and the share
   the SAE error terms carry. Nothing is claimed that the
   circuit did not measure: a feature without a label is called unlabelled, and the in-sample faithfulness is
   quoted as in-sample (the scorer measures it again on held-out prompts).

Caveat: a label says what a feature fires on (association); its effect here is a first-order estimate until the
circuit is evaluated by ablation (which the scorer does: sufficiency, necessity, completeness).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from autoexplain.agent.policies.base import PolicyStep
from autoexplain.agent.state import (
    Draft,
    Hypothesis,
    HypothesisStatus,
    ItemState,
    ToolRequest,
    ToolResult,
    WorkItem,
    stable_id,
)
from autoexplain.tools.vocab import CausalLevel

#: Nodes the explanation names (by |effect|); the rest are counted.
MAX_NAMED = 8
#: Feature-to-feature edges the explanation names.
MAX_EDGES = 4
#: Default fraction of |m(M) - m(∅)| a node's |effect| must reach to be kept (the CLI's default too).
DEFAULT_NODE_THRESHOLD = 0.01
DEFAULT_EDGE_THRESHOLD = 0.02


def tool_args(params: dict[str, Any]) -> dict[str, Any]:
    """The ``feature_circuit`` arguments of a feature-circuit item (its ``params``): the run computes the circuit
    with exactly these when it lists its items, so the item's own call is a cache hit."""
    args: dict[str, Any] = {"task_file": params["task_file"], "sae_ids": list(params["sae_ids"]),
                            "node_threshold": params.get("threshold", DEFAULT_NODE_THRESHOLD),
                            "edge_threshold": params.get("edge_threshold", DEFAULT_EDGE_THRESHOLD),
                            "steps": params.get("steps", 10), "top_n": 30}
    if params.get("held_out", True) and _n_prompts(params["task_file"]) >= 8:
        args["part"] = "fit"
    return args


def _task_prompts(path: str) -> list[Any]:
    try:
        prompts = json.loads(Path(path).read_text()).get("prompts")
    except (OSError, json.JSONDecodeError, AttributeError):
        return []  # the tool itself reports what is wrong with the file
    return prompts if isinstance(prompts, list) else []


def _n_prompts(path: str) -> int:
    return len(_task_prompts(path))


def plan(state: ItemState, item: WorkItem) -> PolicyStep:
    notes = state.get("notes") or {}
    if "fc_call" not in notes:
        return PolicyStep(requests=[ToolRequest(tool="feature_circuit", args=tool_args(item.params),
                                                hypothesis_id=stable_id("hyp", item.item_id, "feature_circuit"))])
    if "labels" not in notes:
        features = notes.get("features") or []
        if features:
            return PolicyStep(requests=[ToolRequest(tool="feature_labels", args={"features": features[:100]})])
        return PolicyStep(notes={"labels": {}})
    return PolicyStep()


def observe(state: ItemState, item: WorkItem, results: list[ToolResult]) -> PolicyStep:
    for r in results:
        if r.error:
            raise RuntimeError(f"offline policy: {r.request.tool} failed: {r.error}")
    r = results[0]
    if r.request.tool == "feature_circuit":
        return _observe_circuit(item, r)
    labels = {x.feature: [x.label, x.correctness] for x in r.output.labels}
    return PolicyStep(notes={"labels": labels, "labels_call": r.call_id})


def _observe_circuit(item: WorkItem, r: ToolResult) -> PolicyStep:
    c = r.output.circuit
    effect = c.m_clean - c.m_ablated
    kept = sorted(c.kept(), key=lambda n: (-abs(n.effect), n.key))
    nodes = [{"key": n.key, "kind": n.node.kind.value, "site": None if n.node.site is None else str(n.node.site),
              "position": n.node.position, "effect": n.effect,
              "feature": f"{n.node.sae_id}#{n.node.index}" if n.node.kind.value == "feature" else None}
             for n in kept]
    edges = sorted(c.circuit_edges(), key=lambda e: (-abs(e.weight), e.src, e.dst))
    features = list(dict.fromkeys(n["feature"] for n in nodes if n["feature"]))
    f = c.faithfulness
    status = (HypothesisStatus.INCONCLUSIVE if f is None else HypothesisStatus.CONFIRMED if f >= 0.8
              else HypothesisStatus.INCONCLUSIVE if f >= 0.5 else HypothesisStatus.REFUTED)
    h = Hypothesis(hypothesis_id=stable_id("hyp", item.item_id, "feature_circuit"),
                   text=f"{len(kept)} nodes ({len(features)} features) over {', '.join(c.saes)} carry the behaviour: "
                        f"sufficiency (faithfulness) {'n/a' if f is None else f'{f:.2f}'} in sample",
                   status=status, causal_level=CausalLevel.INTERVENTION, evidence=[r.call_id])
    return PolicyStep(hypotheses=[h], notes={
        "fc_call": r.call_id, "nodes": nodes, "features": features, "effect": effect, "m_clean": c.m_clean,
        "m_ablated": c.m_ablated, "metric": c.metric.value, "faithfulness": f, "n_prompts": c.n_prompts,
        "n_nodes_total": len(c.nodes), "per_position": c.per_position,
        "error_effect": sum(n.effect for n in c.nodes if n.node.kind.value == "error"),
        "edges": [[e.src, e.dst, e.weight] for e in edges[:40]]})


def _share(x: float, effect: float) -> str:
    return f"{x / effect:+.0%}" if effect else f"{x:+.3g}"


def _answer_text(path: str) -> str:
    """"the answer, e.g. ' Mary' over ' John'", from the task's first prompt."""
    prompts = _task_prompts(path)
    first = prompts[0] if prompts and isinstance(prompts[0], dict) else {}
    answers, wrong = first.get("answers") or [], first.get("wrong_answers") or []
    if not answers:
        return "the answer"
    return f"the answer, e.g. {answers[0]!r}" + (f" over {wrong[0]!r}" if wrong else "")


def propose(state: ItemState, item: WorkItem) -> PolicyStep:
    notes = state.get("notes") or {}
    nodes: list[dict[str, Any]] = notes.get("nodes") or []
    labels: dict[str, list[Any]] = notes.get("labels") or {}
    effect = float(notes.get("effect") or 0.0)
    faith = notes.get("faithfulness")
    head = (f"{item.target}: on {notes.get('n_prompts')} prompt pairs the metric ({notes.get('metric')}, "
            f"{_answer_text(item.params['task_file'])}) is {notes.get('m_clean', 0):.3g} on the clean prompts and "
            f"{notes.get('m_ablated', 0):.3g} on the corrupt ones; a sparse feature circuit of {len(nodes)} of "
            f"{notes.get('n_nodes_total')} nodes carries the difference (in-sample sufficiency (faithfulness) "
            f"{'n/a' if faith is None else f'{faith:.2f}'}).")
    named: list[str] = []
    for n in nodes[:MAX_NAMED]:
        where = f" at position {n['position']}" if n.get("position") is not None else ""
        share = _share(float(n["effect"]), effect)
        if n["kind"] == "feature":
            label = (labels.get(n["feature"]) or [None])[0]
            what = f"({label!r})" if label else "(unlabelled)"
            named.append(f"{n['key']} {what} at {n['site']}{where} ({share})")
        elif n["kind"] == "error":
            named.append(f"the error term of {n['key'].split('#')[0]} (what that SAE misses){where} ({share})")
        else:
            named.append(f"the input embeddings{where} ({share})")
    body = ("The difference comes through these nodes (effect: m(clean) - m(the node at its corrupt value), integrated-"
            "gradient estimate, as a share of m(M) - m(∅)): " + "; ".join(named) + "." if named
            else "No node reaches the threshold: the circuit names no feature.")
    if len(nodes) > MAX_NAMED:
        body += f" {len(nodes) - MAX_NAMED} smaller nodes are kept too."
    edges = notes.get("edges") or []
    direct = [f"{s} ({_share(float(w), effect)})" for s, d, w in edges if d == "logits"][:MAX_EDGES]
    inner = [f"{s} -> {d} ({_share(float(w), effect)})" for s, d, w in edges if d != "logits"][:MAX_EDGES]
    parts = [head, body]
    if inner:
        parts.append("Edges (linear approximation, direct): " + ", ".join(inner) + ".")
    if direct:
        parts.append("Driving the logits directly: " + ", ".join(direct) + ".")
    kept_err = [float(n["effect"]) for n in nodes if n["kind"] == "error"]
    total_err = float(notes.get("error_effect") or 0.0)
    parts.append(f"SAE error terms carry {_share(total_err, effect)} of the effect"
                 + (f" ({len(kept_err)} kept in the circuit)." if kept_err else " (none kept in the circuit)."))
    text = " ".join(parts)
    if len(text) > 2000:
        text = text[:1990].rsplit("; ", 1)[0] + "."
    evidence = [notes["fc_call"], *([notes["labels_call"]] if notes.get("labels_call") else [])]
    return PolicyStep(drafts=[Draft(text=text, causal_level=CausalLevel.INTERVENTION, evidence=evidence,
                                    hypothesis_id=stable_id("hyp", item.item_id, "feature_circuit"))])
