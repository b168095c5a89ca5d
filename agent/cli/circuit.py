"""``autoexplain circuit``: find the circuit behind a task and store it (one ``circuits`` row, every scored edge in
``circuit_edges``).

Registered on the main app in :mod:`autoexplain.agent.cli`. Heavy libraries are imported inside the command, so
``autoexplain --help`` stays fast. Every input is validated (selection, task file, model, tokenisation, that the
ablation changes the metric at all) before the database is opened: a bad call writes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from autoexplain.agent.cli.common import (
    LLMMaxTokensOpt,
    LLMTimeoutOpt,
    PolicyChoice,
    console,
    execute,
    llm_settings,
    node_table,
    plan_from,
    scored_effect,
)
from autoexplain.tools.errors import InputError
from autoexplain.tools.vocab import Ablation, Method

if TYPE_CHECKING:
    from autoexplain.agent.store import Store
    from autoexplain.tools.circuits import Circuit

#: Rows of the circuit table printed; every edge is stored in circuit_edges anyway.
_SHOWN = 40


def circuit(
        model: Annotated[str, typer.Option("--model", "-m", help="local HF dir, hub name or toy:NAME")],
        task: Annotated[Path, typer.Option("--task", "-t", help="circuit task file (JSON, auto-circuit layout)")],
        method: Annotated[Method, typer.Option(help="eap-ig+noising (default: EAP-IG, then noising checks that "
                                                    "find components needed only jointly), eap-ig, eap or acdc")]
        = Method.EAP_IG_NOISING,
        ablation: Annotated[Ablation, typer.Option(help="what patched edges carry: resample (the corrupt "
                                                              "prompt's values), mean or zero")]
        = Ablation.RESAMPLE,
        top_k: Annotated[int | None, typer.Option(help="keep this many edges (exclusive with --threshold)")] = None,
        threshold: Annotated[float | None, typer.Option(help="keep edges with |score| >= THRESHOLD x |m(M) - m(∅)| "
                                                             "(default 0.02; ACDC's tau)")] = None,
        db: Annotated[Path | None, typer.Option("--db", help="DuckDB file (default: $AUTOEXPLAIN_DB or "
                                                             "./autoexplain.duckdb)")] = None,
        device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N (default: cuda if present)")] = None,
        policy: Annotated[PolicyChoice, typer.Option("--policy", help="offline (default) or llm")]
        = PolicyChoice.offline,
        llm_model: Annotated[str | None, typer.Option("--llm-model", help="model at the OpenAI-compatible "
                                                                          "endpoint (policy llm)")] = None,
        llm_max_tokens: LLMMaxTokensOpt = None, llm_timeout: LLMTimeoutOpt = None,
) -> None:
    """Find the edges that carry a task's behaviour with the agent, explain and score the circuit, store it.

    Scores every edge of the model's graph (by default EAP-IG plus noising checks of single nodes and edges in the
    clean model, which find components that matter only jointly, such as an induction head's query and key),
    keeps the top-k or those above a threshold, and reports both sufficiency (faithfulness: (m(C) - m(∅)) /
    (m(M) - m(∅)) with everything outside the circuit ablated) and necessity (the share of the effect lost when
    only the circuit is ablated). The metric is
    the logit difference at the answer (KL divergence to the clean run for ACDC; answer probability when prompts
    lack wrong answers). An interrupted ACDC run resumes when the same command is run again.
    """
    if top_k is not None and threshold is not None:
        raise InputError("give --top-k or --threshold, not both: --top-k keeps a number of edges, --threshold keeps "
                         "edges scoring above a fraction of the full effect")
    if top_k is not None and top_k < 1:
        raise InputError(f"--top-k must be at least 1, got {top_k}")
    if threshold is not None and threshold < 0:
        raise InputError(f"--threshold must be >= 0 (a fraction of |m(M) - m(∅)|), got {threshold}")


    plan = plan_from({"name": "circuit", "model": model, "policy": policy.value, "llm_model": llm_model,
                      "device": device,
                  "llm": llm_settings(llm_max_tokens, llm_timeout),
                  "items": [{"circuit": {"task": str(task), "method": method.value, "ablation": ablation.value,
                                         "top_k": top_k, "threshold": threshold}}]})
    res, store, _ = execute(plan, db, kind="circuit")

    con = console()
    for o in res.outcomes:
        if o.status.value == "failed":  # the error names the step that failed (search, the LLM's explain call …)
            raise InputError(f"circuit item {o.target} failed: {o.error}")
        circ = _found_circuit(store, o.item_id)
        _show(circ, o.target)
        from rich.text import Text

        con.print(Text.assemble(("explanation", "bold"), f" ({o.status.value}): {o.text}"))  # the text, never markup
        if o.status.value == "no_behaviour":  # nothing to explain: the scores would measure noise
            con.print(f"NO BEHAVIOUR: {o.error}", markup=False)
        else:
            con.print("scores: " + ", ".join(f"{k} {v:.3f}" for k, v in o.scores.items() if v is not None))
        from autoexplain.agent.store import queries

        cid = queries.circuit_of_item(store, o.item_id)
        nodes = queries.circuit_nodes(store, cid) if cid else []
        record = queries.circuit_record(store, cid) if cid else None
        if nodes and record is not None:
            con.print(node_table(nodes, scored_effect(record.details)))
        con.print(f"database: {store.path.resolve()}  (run {res.run_id}, circuit {cid or '-'})")


def _found_circuit(store: Store, item_id: str) -> Circuit:
    """The Circuit an item's circuit_search call found (from the tool cache)."""
    from autoexplain.agent.store import queries
    from autoexplain.tools.circuits import CircuitSearchOut

    found = queries.circuit_search_output(store, item_id)
    if found is None:
        raise InputError(f"no circuit_search result stored for item {item_id}")
    return CircuitSearchOut.model_validate_json(found).circuit()


def _show(circ: Circuit, task_name: str) -> None:
    from rich.table import Table


    s = circ.scores
    con = console()
    sel = (f"top {circ.top_k} edges" if circ.top_k is not None
           else f"|score| >= {circ.threshold:g} x |m(M) - m(∅)|")
    con.print(f"[bold]{s.method.value} circuit for {task_name}[/bold]: {circ.n_edges} of {len(s.edges)} edges "
              f"({sel}); {s.ablation.value} ablation, edge patching, metric {s.metric.value}")
    nec = "not measured" if circ.necessity is None else f"{circ.necessity:.3f}"
    con.print(f"sufficiency (faithfulness) {circ.faithfulness:.3f}   necessity {nec}   m(M) {s.m_clean:.4g}   "
              f"m(∅) {s.m_ablated:.4g}   search {s.seconds:.2f} s")
    if circ.note:
        con.print(f"[yellow]{circ.note}[/yellow]")
    table = Table("rank", "edge", "score")
    ranks = circ.ranks()
    kept = circ.kept_by_rank()
    for i in kept[:_SHOWN]:
        table.add_row(str(ranks[i]), str(s.edges[i]), f"{s.scores[i]:+.4g}")
    con.print(table)
    if len(kept) > _SHOWN:
        con.print(f"(+{len(kept) - _SHOWN} more circuit edges; all {len(s.edges)} scored edges are in circuit_edges)")
    if circ.curve:
        con.print("faithfulness by % of edges kept: " + "  ".join(f"{p.percent:g}%: {p.faithfulness:.2f}"
                                                                 for p in circ.curve))
