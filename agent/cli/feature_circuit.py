"""``autoexplain feature-circuit``: the sparse feature circuit of a task over one or more SAEs (Marks et al.),
stored (``feature_circuits``, ``feature_circuit_nodes``, ``feature_circuit_edges``) and printed with each feature
node's stored label and scores.

Everything checkable without weights (numbers, the database path, the task, the specs) is checked first, and the
task is tokenised and the behaviour checked before the database is opened: a bad call writes nothing.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any

import typer

from autoexplain.agent.cli.common import (
    DbOpt,
    DeviceOpt,
    Fmt,
    ModelOpt,
    check_db_path,
    console,
    open_store,
    resolve_task,
    resolved_task_path,
    run_guard,
)
from autoexplain.tools.errors import InputError

#: Node and edge rows printed; every node with an effect is stored anyway.
_SHOWN = 30


def feature_circuit(
        model: ModelOpt,
        sae: Annotated[list[str], typer.Option("--sae", "-s", help="SAE spec (repeat for several SAEs): a sae-lens "
                                                                 "directory, RELEASE/SAE_ID or toy:MODEL/NAME")],
        task: Annotated[str, typer.Option("--task", "-t", help="circuit task file (auto-circuit layout), "
                                                              "toy:WORLD/TASK, or a toy task name for a toy model")],
        threshold: Annotated[float, typer.Option(help="keep nodes with |effect| >= THRESHOLD x |m(M) - m(∅)|")]
        = 0.01,
        edge_threshold: Annotated[float, typer.Option(help="keep edges with |weight| >= EDGE_THRESHOLD x |m(M) - "
                                                           "m(∅)|")] = 0.02,
        per_position: Annotated[bool, typer.Option("--per-position", help="one node per (feature, position) "
                                                                          "instead of summed over positions")]
        = False,
        steps: Annotated[int, typer.Option(help="integrated-gradient steps")] = 10,
        prompts: Annotated[int, typer.Option(help="use the first N prompts of the task")] = 64,
        held_out: Annotated[bool, typer.Option("--held-out/--no-held-out", help="find the circuit on half of the "
                                                                                "prompts and also score it on the "
                                                                                "other half (needs 8 prompts)")]
        = True,
        db: DbOpt = None,
        format: Annotated[Fmt, typer.Option("--format", "-o", help="table (default) or json")] = Fmt.table,
        device: DeviceOpt = None,
) -> None:
    """Find the sparse feature circuit of a task: SAE features, SAE error terms and the embeddings as nodes, node
    effects by integrated gradients (clean vs corrupt prompts), edges between features of successive SAE sites by
    the linear approximation, nodes and edges above thresholds. Scores by intervention: sufficiency
    (faithfulness: every node outside the circuit at its corrupt value, error terms included), necessity and
    completeness, on the prompts the circuit was found on and (by default) on a held-out half of the task. Prints
    each kept feature with its stored label (or "unlabelled") and scores."""
    if not sae:
        raise InputError("give at least one --sae")
    if len(set(s.strip() for s in sae)) != len(sae):
        raise InputError(f"--sae names the same SAE twice ({', '.join(sae)})")
    if threshold < 0 or edge_threshold < 0:
        raise InputError("--threshold and --edge-threshold must be >= 0 (fractions of |m(M) - m(∅)|)")
    if not 1 <= steps <= 64:
        raise InputError(f"--steps must be between 1 and 64, got {steps}")
    if not 2 <= prompts <= 1024:
        raise InputError(f"--prompts must be between 2 and 1024, got {prompts}")
    if format is Fmt.csv:
        raise InputError("--format csv is not available here: use table or json")
    label, path = resolve_task(task, model)
    check_db_path(db)
    from autoexplain.tools.loading import check_specs, load_model, load_sae

    check_specs(model, sae)
    lm = load_model(model, device=device, sae_specs=sae)
    saes = [load_sae(s, lm) for s in sae]
    from autoexplain.agent.store.rows import feature_circuit_id, feature_circuit_rows
    from autoexplain.evals.feature_circuits import score_feature_circuit
    from autoexplain.tools.data import load_task_file, tokenize_task
    from autoexplain.tools.feature_circuits import FeatureCircuitConfig, SplicedModel, find_feature_circuit

    if lm.tokenizer is None:
        raise InputError(f"model {model!r} has no tokenizer, so a task file's text prompts cannot be used with it")
    task_path = resolved_task_path(label, path)
    tok = tokenize_task(load_task_file(task_path), lm.tokenizer, n_ctx=lm.n_ctx)
    tok = tok.subset(list(range(min(prompts, tok.n_prompts))))
    cfg = FeatureCircuitConfig(steps=steps, per_position=per_position, node_threshold=threshold,
                               edge_threshold=edge_threshold)
    held_task = None
    if held_out and tok.n_prompts >= 8:
        fit_rows, held_rows = tok.split(0.5)
        held_task, tok = tok.subset(held_rows), tok.subset(fit_rows)
    sm = SplicedModel(lm, tok, saes)
    circ = find_feature_circuit(lm, tok, saes, cfg, spliced=sm)  # no behaviour: InputError before any write
    scores = score_feature_circuit(sm, circ)
    held_scores, held_note = None, None
    if held_task is not None:
        try:
            held_scores = score_feature_circuit(SplicedModel(lm, held_task, saes), circ)
        except InputError as exc:  # e.g. the held-out prompts show no behaviour: no score, and why
            held_note = exc.message
    from autoexplain.tools.graph_export import display_prompt

    display = display_prompt(lm, tok)
    settings = {"threshold": threshold, "edge_threshold": edge_threshold, "per_position": per_position,
                "steps": steps, "prompts": tok.n_prompts}
    fid = feature_circuit_id(lm.model_id, _fingerprint(tok), circ.saes, settings)
    store = open_store(db)
    run_id = f"feature-circuit-{uuid.uuid4().hex[:10]}"
    store.start_run(run_id, "feature_circuit", {"model": model, "saes": list(sae), "task": label, **settings})
    with run_guard(store, run_id):
        store.record_model_and_saes(lm, saes)
        store.upsert_many(feature_circuit_rows(fid, run_id, label, circ, scores,
                                               details={"task_file": str(task_path), "sae_specs": list(sae),
                                                        "n_layers": lm.n_layers,
                                                        "display": display.model_dump(mode="json"),
                                                        "held_out_prompts": 0 if held_task is None
                                                        else held_task.n_prompts, "held_out_note": held_note},
                                               held_out=held_scores))
        store.finish_run(run_id, "done", {"feature_circuit_id": fid, "nodes": len(circ.kept()),
                                          "faithfulness": scores.faithfulness})
    from autoexplain.agent.store import queries

    nodes = queries.feature_circuit_nodes(store, fid)
    edges = queries.feature_circuit_edges(store, fid)
    spec_of = {s.sae_id: s.spec for s in saes}
    if format is Fmt.json:
        print(json.dumps({"feature_circuit_id": fid, "run_id": run_id, "scores": scores.model_dump(mode="json"),
                          "held_out_scores": None if held_scores is None else held_scores.model_dump(mode="json"),
                          "nodes": [dict(n._asdict(), spec=_spec(n, spec_of)) for n in nodes],
                          "edges": [{"src": s, "dst": d, "weight": w} for s, d, w, _ in edges]}, indent=1))
        return
    _show(circ, scores, nodes, edges, spec_of, label, held_scores, held_note)
    console().print(f"database: {store.path.resolve()}  (run {run_id}, feature circuit {fid}; tables "
                    "feature_circuits, feature_circuit_nodes, feature_circuit_edges)", markup=False, highlight=False)


def _fingerprint(task: Any) -> str:
    import hashlib

    h = hashlib.sha256()
    for t in (task.clean, task.corrupt, task.answers, task.wrong):
        h.update(t.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _spec(node: Any, spec_of: dict[str, str]) -> str | None:
    """The feature as a user types it (``toy:small/res0#7``), or the node key for embed and error nodes."""
    if node.kind != "feature":
        return None
    return f"{spec_of.get(node.sae_id, node.sae_id)}#{node.feature_index}"


def _pretty(key: str, spec_of: dict[str, str]) -> str:
    """A node key with its SAE named by the spec the user typed (``toy:small/res0#7@3``)."""
    sae_id, sep, rest = key.partition("#")
    return f"{spec_of[sae_id]}#{rest}" if sep and sae_id in spec_of else key


def _show(circ: Any, scores: Any, nodes: list[Any], edges: list[Any], spec_of: dict[str, str], label: str,
          held: Any = None, held_note: str | None = None) -> None:
    from rich.table import Table

    con = console()

    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    con.print(f"[bold]sparse feature circuit for {label}[/bold]: {len(circ.kept())} of {len(circ.nodes)} nodes, "
              f"{len(circ.circuit_edges())} edges; SAEs {', '.join(spec_of[s] for s in circ.saes)}; "
              f"{'per-position' if circ.per_position else 'summed'} nodes; metric {circ.metric.value}; m(M) "
              f"{circ.m_clean:.4g}, m(∅) {circ.m_ablated:.4g}; {circ.n_prompts} prompts; {circ.seconds:.1f} s")
    con.print(f"sufficiency (faithfulness) {f(scores.faithfulness)}   necessity {f(scores.necessity)}   "
              f"completeness {f(scores.completeness)}   (resample ablation of every node outside, error terms "
              "included; on the prompts the circuit was found on)", markup=False, highlight=False)
    if held is not None:
        con.print(f"held out ({held.n_nodes} nodes on prompts the search never saw): sufficiency "
                  f"{f(held.faithfulness)}   necessity {f(held.necessity)}   completeness {f(held.completeness)}",
                  markup=False, highlight=False)
    elif held_note:
        con.print(f"held out: not scored ({held_note})", markup=False, highlight=False)
    effect = circ.m_clean - circ.m_ablated
    t = Table("node", "effect", "share", "label (stored)", "correct.", "complete.", "succinct.",
              title="kept nodes: IG effect m(clean) - m(node at corrupt value), share of m(M) - m(∅)")
    for n in nodes[:_SHOWN]:
        if n.kind == "feature":
            name = _spec(n, spec_of) or n.node
            if n.position is not None:
                name += f"@{n.position}"
            text = n.label if n.label is not None else "unlabelled"
        else:
            name = _pretty(n.node, spec_of)
            text = {"embed": "(input embeddings)", "error": "(SAE error term)"}.get(n.kind, "")
        t.add_row(name, f"{n.effect:+.4g}", f"{n.effect / effect:+.0%}" if effect else "-", text,
                  f(n.correctness), f(n.completeness), f(n.succinctness))
    con.print(t)
    if len(nodes) > _SHOWN:
        con.print(f"(+{len(nodes) - _SHOWN} more kept nodes in feature_circuit_nodes)")
    e = Table("edge", "weight", title="kept edges (linear approximation, direct)")
    for s, d, w, _ in edges[:_SHOWN]:
        e.add_row(f"{_pretty(s, spec_of)} -> {_pretty(d, spec_of)}", f"{w:+.4g}")
    con.print(e)
