"""The offline policy's circuit rules: find the circuit, then say *how* it works, claiming only what was checked.

Steps (each a policy step; the graph runs the tool calls between them):

1. ``circuit_search`` on the *fit* half of the task's prompts (a seeded split; every score is later computed on
   the other half, see :mod:`autoexplain.agent.scoring`) with the default method (EAP-IG plus noising checks):
   the circuit, its sufficiency (faithfulness) and necessity. Intervention level.
2. ``mediation`` of the circuit's heads and MLPs on the same prompts (total, direct and indirect effect, the share
   of prompts each holds on; intervention level) and ``head_roles`` of the model (attention detectors and OV
   eigenvalues on repeated random sequences; association level).
3. ``verify_head_role`` for every role a circuit head scores above the cut on (its best role, and copying or
   suppression for a head that writes to the logits): the intervention that checks the role (e.g. patching an
   induction head's key input from a shuffled run must break its induction attention).
4. One explanation naming the mechanism. Only roles whose check held are claimed ("a1.1 is an induction head
   (0.94, checked by intervention)"); a role the check refuted stays a refuted hypothesis and is not written.
   Composition is stated for the circuit's head-to-head edges ("its output feeds a1.1's key"), with the weight
   composition score when the role table has it above baseline. Each node's direct and indirect share of the
   effect comes from the mediation. The scorer re-checks every claim in the text by intervention; the share
   verified is part of the explanation's correctness.

Caveat: a trained model rarely has textbook heads; a circuit whose heads have no checked role is explained by its
edges and mediation only, which is the truthful answer.
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
from autoexplain.evals.claims import DEFAULT_MIN_EFFECT
from autoexplain.tools.circuits import DEFAULT_METHOD
from autoexplain.tools.vocab import CausalLevel

#: Role names as the text says them (the claims parser in evals/claims.py reads these phrasings back).
ROLE_TEXT = {"previous_token": "a previous-token head", "duplicate_token": "a duplicate-token head",
             "induction": "an induction head", "attends_bos": "a head that attends to BOS",
             "copying": "copies the token it attends to", "suppression": "suppresses the token it attends to"}
#: Roles the policy checks for heads that write to the logits, besides their best role.
OUTPUT_ROLES = ("copying", "suppression")
MAX_CHECKS = 8
#: The share of the effect an edge must carry, noised alone, for the text to claim it (the scorer's threshold).
MIN_EDGE_EFFECT = DEFAULT_MIN_EFFECT
PORT = {"q": "query", "k": "key", "v": "value"}


def _node(dst: str) -> str:
    """``a1.2.k`` -> ``a1.2``; ``m1`` -> ``m1``."""
    return ".".join(dst.split(".")[:2]) if dst.startswith("a") else dst


def task_args(item: WorkItem) -> dict[str, Any]:
    """The task arguments every circuit tool call of ``item`` shares: the task file, the ablation and, when the
    item asks for held-out scores and the task has at least 4 prompts, the fit part of the split."""
    p = item.params
    args: dict[str, Any] = {"task_file": p["task_file"], "ablation": p.get("ablation", "resample")}
    if p.get("held_out", True) and _n_prompts(p["task_file"]) >= 4:
        args["part"] = "fit"
    return args


def _n_prompts(path: str) -> int:
    try:
        prompts = json.loads(Path(path).read_text()).get("prompts")
    except (OSError, json.JSONDecodeError, AttributeError):
        return 0  # the search itself reports what is wrong with the file
    return len(prompts) if isinstance(prompts, list) else 0


def plan(state: ItemState, item: WorkItem) -> PolicyStep:
    notes = state.get("notes") or {}
    p = item.params
    task = task_args(item)
    if "circuit_call" not in notes:
        # no curve here: scoring measures the same curve (MIB's CPR/CMD) once
        args = {**task, "method": p.get("method", DEFAULT_METHOD.value), "top_n": 20, "curve": False}
        for k in ("top_k", "threshold"):
            if p.get(k) is not None:
                args[k] = p[k]
        return PolicyStep(requests=[ToolRequest(tool="circuit_search", args=args)])
    if "mediation" not in notes:
        nodes = notes.get("nodes") or []
        reqs = []
        if nodes:
            # the circuit's edges into heads: composition is claimed only where noising the edge alone matters
            into_heads = [e for e, _ in notes.get("edges") or [] if e.split("->")[1].count(".") == 2]
            reqs.append(ToolRequest(tool="mediation", args={**task, "nodes": nodes, "edges": into_heads[:64]}))
        if any(n.startswith("a") for n in nodes):
            reqs.append(ToolRequest(tool="head_roles", args={}))
        if reqs:
            return PolicyStep(requests=reqs)
        return PolicyStep(notes={"mediation": {}, "roles": {}, "checks": {}})
    if "checks" not in notes:
        todo = notes.get("to_check") or []
        if todo:
            return PolicyStep(requests=[ToolRequest(tool="verify_head_role", args={"node": n, "role": r},
                                                    hypothesis_id=stable_id("hyp", item.item_id, n, r))
                                        for n, r in todo])
        return PolicyStep(notes={"checks": {}})
    return PolicyStep()


def observe(state: ItemState, item: WorkItem, results: list[ToolResult]) -> PolicyStep:
    for r in results:
        if r.error:
            raise RuntimeError(f"offline policy: {r.request.tool} failed: {r.error}")
    tool = results[0].request.tool
    if tool == "circuit_search":
        return _observe_search(item, results[0])
    if tool in ("mediation", "head_roles"):
        return _observe_mechanism(state, item, results)
    return _observe_checks(state, item, results)


def _observe_search(item: WorkItem, r: ToolResult) -> PolicyStep:
    out = r.output
    f = out.faithfulness
    status = (HypothesisStatus.CONFIRMED if f >= 0.8 else HypothesisStatus.INCONCLUSIVE if f >= 0.5
              else HypothesisStatus.REFUTED)
    nec = getattr(out, "necessity", None)
    h = Hypothesis(hypothesis_id=stable_id("hyp", item.item_id, "circuit"),
                   text=f"{out.n_edges} edges ({out.method.value}) carry the behaviour: sufficiency (faithfulness) "
                        f"{f:.2f}" + (f", necessity {nec:.2f}" if nec is not None else ""),
                   status=status, causal_level=CausalLevel.INTERVENTION, evidence=[r.call_id])
    edges = [[str(e.edge), e.score] for e in out.edges]
    nodes: list[str] = []
    for name, _ in edges:
        src, dst = name.split("->")
        for n in (src, _node(dst)):
            if n not in ("embed", "logits") and n not in nodes:
                nodes.append(n)
    return PolicyStep(hypotheses=[h], notes={
        "circuit_call": r.call_id, "faithfulness": f, "necessity": nec, "n_edges": out.n_edges,
        "n_edges_total": out.n_edges_total, "edges": edges[:60], "nodes": nodes[:24],
        "ablation": out.ablation.value, "metric": out.metric.value, "method": out.method.value})


def _observe_mechanism(state: ItemState, item: WorkItem, results: list[ToolResult]) -> PolicyStep:
    notes = state.get("notes") or {}
    mediation: dict[str, dict[str, Any]] = {}
    edge_effects: dict[str, float] = {}
    roles: dict[str, dict[str, Any]] = {}
    composition: dict[str, float] = {}
    calls = []
    for r in results:
        calls.append(r.call_id)
        if r.request.tool == "mediation":
            edge_effects = dict(r.output.edge_effects)
            shares = {c.node: c.holds_share for c in r.output.claims}
            for n in r.output.result.nodes:
                mediation[n.node] = {"total": n.total_frac, "direct": n.direct_frac, "indirect": n.indirect_frac,
                                     "ratio": n.ratio, "prompt_share": shares.get(n.node)}
        else:
            table = r.output
            for h in table.heads:
                roles[str(h.node)] = {"best": h.best_role.value if h.best_role else None,
                                      "scores": {k: v for k, v in h.scores.items() if v is not None}}
            for c in table.composition:
                composition[f"{c.src}->{c.dst}.{c.kind}"] = c.score / c.baseline if c.baseline > 0 else 0.0
    circuit_nodes = notes.get("nodes") or []
    writers = {e.split("->")[0] for e, _ in notes.get("edges") or [] if e.endswith("->logits")}
    todo: list[list[str]] = []
    for n in circuit_nodes:
        info = roles.get(n)
        if info is None:
            continue
        wanted = [info["best"]] if info["best"] else []
        if n in writers:  # a head that writes the answer: does it copy or suppress what it attends to?
            cut = 0.5
            wanted += [r for r in OUTPUT_ROLES if r not in wanted and (info["scores"].get(r) or 0.0) >= cut]
        todo += [[n, r] for r in wanted]
    return PolicyStep(notes={"mediation": mediation, "roles": roles, "composition": composition,
                             "edge_effects": edge_effects,
                             "mechanism_calls": calls, "to_check": todo[:MAX_CHECKS]})


def _observe_checks(state: ItemState, item: WorkItem, results: list[ToolResult]) -> PolicyStep:
    notes = state.get("notes") or {}
    roles = notes.get("roles") or {}
    checks: dict[str, dict[str, Any]] = {}
    hyps = []
    for r in results:
        out = r.output.check
        node, role = str(out.node), out.role.value
        score = (roles.get(node) or {}).get("scores", {}).get(role)
        status = (HypothesisStatus.CONFIRMED if out.verified else HypothesisStatus.REFUTED if out.verified is False
                  else HypothesisStatus.INCONCLUSIVE)
        checks[f"{node}|{role}"] = {"verified": out.verified, "effect": out.effect, "score": score,
                                    "call": r.call_id}
        hyps.append(Hypothesis(hypothesis_id=stable_id("hyp", item.item_id, node, role),
                               text=f"{out.claim} (detector score {score if score is None else round(score, 2)}; "
                                    f"check: {out.method})",
                               status=status, causal_level=CausalLevel.INTERVENTION, evidence=[r.call_id]))
    return PolicyStep(hypotheses=hyps, notes={"checks": checks})


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def propose(state: ItemState, item: WorkItem) -> PolicyStep:
    notes = state.get("notes") or {}
    edges = notes.get("edges") or []
    mediation = notes.get("mediation") or {}
    checks = notes.get("checks") or {}
    composition = notes.get("composition") or {}
    edge_effects = notes.get("edge_effects") or {}
    nodes = notes.get("nodes") or []
    writers = list(dict.fromkeys(e.split("->")[0] for e, _ in edges if e.split("->")[1] == "logits"))
    nec = notes.get("necessity")
    head = (f"{item.target}: {notes.get('n_edges')} of {notes.get('n_edges_total')} edges carry the behaviour "
            f"({notes.get('method')}; sufficiency (faithfulness) {notes.get('faithfulness', 0):.2f}, necessity "
            f"{'n/a' if nec is None else f'{nec:.2f}'}; {notes.get('ablation')} ablation, metric "
            f"{notes.get('metric')}).")
    sentences = []
    feeds = [(e.split("->")[0], e.split("->")[1]) for e, _ in edges]
    order = sorted(nodes, key=lambda n: (int(n[1:].split(".")[0]), n))  # by layer: the mechanism in reading order
    for n in order:
        parts: list[str] = []
        verified = [(r, c) for key, c in checks.items() for r in [key.split("|")[1]]
                    if key.split("|")[0] == n and c.get("verified")]
        for role, c in verified:
            score = c.get("score")
            what = ROLE_TEXT[role]
            detail = f"{role.replace('_', '-')} {score:.2f}, " if score is not None else ""
            if role in OUTPUT_ROLES:
                parts.append(f"{n} {what} ({detail}checked by intervention)")
            else:
                parts.append(f"{n} is {what} ({detail}checked by intervention)")
        for src, dst in feeds:
            share = edge_effects.get(f"{src}->{dst}")
            # composition is claimed only for edges whose noising alone moves the metric (what the scorer checks)
            if src == n and dst.count(".") == 2 and share is not None and abs(share) >= MIN_EDGE_EFFECT:
                comp = composition.get(f"{n}->{dst}")
                port = PORT[dst.split(".")[2]]
                parts.append(f"{'its' if parts else n + chr(39) + 's'} output feeds {_node(dst)}'s {port}"
                             + (f" ({port[0].upper()}-composition {comp:.1f}x baseline)" if comp and comp >= 1.5
                                else ""))
        m = mediation.get(n)
        if m is not None:
            if n in writers:
                parts.append(f"{n} writes the answer directly (direct effect {_pct(m['direct'])} of the effect)"
                             + (f" and through later components (indirect {_pct(m['indirect'])})"
                                if abs(m["indirect"]) >= 0.01 else ""))
            else:
                parts.append(f"{n} acts only through later components (total effect {_pct(m['total'])})")
            if m.get("prompt_share") is not None:
                parts.append(f"noising {n} hurts on {_pct(m['prompt_share'])} of the prompts")
        if parts:
            sentences.append("; ".join(parts))
    text = " ".join([head, "Mechanism: " + ". ".join(sentences) + "." if sentences else "",
                     f"Writes the answer: {', '.join(writers) or 'none kept'}."]).replace("  ", " ")
    if len(text) > 2000:
        text = text[:1990].rsplit(". ", 1)[0] + "."
    evidence = [notes["circuit_call"], *notes.get("mechanism_calls", []),
                *(c["call"] for c in checks.values() if c.get("verified"))]
    return PolicyStep(drafts=[Draft(text=text, causal_level=CausalLevel.INTERVENTION, evidence=evidence,
                                    hypothesis_id=stable_id("hyp", item.item_id, "circuit"))])
