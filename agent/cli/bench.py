"""``autoexplain bench truth``: the ground-truth suite, run and stored like any other run.

Planted circuits: every search method on every hand-planted model, scored against the true edges. Planted
features: the ``tiny`` toy model gets a planted-feature SAE (:mod:`autoexplain.evals.truth.planted_features`),
the agent's offline policy labels every feature, and :func:`~autoexplain.evals.truth.suite.judge_label`
checks each final label against the truth. One table is printed; everything lands in the database (the feature
labels as a normal ``bench`` run with work items, explanations, scores and judgements; each planted circuit as a
``circuits`` row with its edges and an explanation carrying its scores), so quality over time is a SQL query:
``select r.started_at, s.metric, avg(s.value) from runs r join explanations e using (run_id) join scores s using
(explanation_id) where r.kind = 'bench' group by all``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from autoexplain.agent.cli.common import build_zoo, console, open_store

if TYPE_CHECKING:
    from autoexplain.agent.store import Store
    from autoexplain.tools.zoo import BuiltZoo

bench_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Benchmarks with known answers.")


@bench_app.command("truth")
def truth(db: Annotated[Path | None, typer.Option("--db", help="DuckDB file (default: $AUTOEXPLAIN_DB or "
                                                               "./autoexplain.duckdb)")] = None,
          methods: Annotated[str, typer.Option(help="circuit methods, comma-separated")] = "eap,eap-ig,acdc") -> None:
    """Planted circuits (every method) and planted features (offline agent): one table of how well each is found."""
    from autoexplain.tools.errors import InputError
    from autoexplain.tools.vocab import Method

    wanted = [m.strip() for m in methods.split(",") if m.strip()]
    bad = [m for m in wanted if m not in {x.value for x in Method}]
    if bad or not wanted:
        raise InputError(f"--methods: unknown method(s) {', '.join(bad) or '(none given)'}; choose from "
                         f"{', '.join(m.value for m in Method)}")
    store = open_store(db)
    built = build_zoo("tiny")
    con = console()
    con.print("planted circuits …", style="dim")
    circuits = _circuits(store, wanted)
    con.print("planted features …", style="dim")
    features, run_id = _features(store, built)
    _print(circuits, features)
    con.print(f"database: {store.path.resolve()}  (runs {circuits[1]}, {run_id})")


def _circuits(store: Store, methods: list[str]) -> tuple[list[Any], str]:
    import uuid

    from autoexplain.agent.state import now, stable_id
    from autoexplain.agent.store.rows import circuit_id, circuit_rows, circuit_score_rows
    from autoexplain.evals.truth.suite import circuit_cases

    run_id = f"bench-{uuid.uuid4().hex[:10]}"
    store.start_run(run_id, "bench", {"suite": "planted circuits", "methods": methods})
    rows = circuit_cases(methods)
    for case, setup, circ, sc in rows:
        model_id = f"planted:{case.case}"
        cid = circuit_id(model_id, setup.fingerprint(), case.method, None, circ.threshold)
        store.upsert_many(circuit_rows(cid, run_id, model_id, f"planted:{case.case}", "(built in)", circ))
        eid = stable_id("expl", run_id, cid)
        store.upsert("explanations", [{
            "explanation_id": eid, "run_id": run_id, "item_id": cid, "target": f"planted:{case.case}",
            "text": f"{case.method} circuit of {case.n_edges} edges (planted: {case.n_true})", "author": "bench",
            "causal_level": "intervention", "evidence": {"circuit_id": cid}, "is_final": True,
            "created_at": now()}])
        store.upsert("scores", circuit_score_rows(sc, eid))
    store.finish_run(run_id, "done", {"cases": [c.model_dump() for c, *_ in rows]})
    return [c for c, *_ in rows], run_id


def _features(store: Store, built: BuiltZoo) -> tuple[list[Any], str]:
    from autoexplain.agent.runner import Plan, prepare, run_plan
    from autoexplain.evals.truth.planted_features import (
        PLANTED_DEAD,
        PLANTED_FEATURES,
        default_texts,
        load_planted,
        plant_features,
        write_corpus,
    )
    from autoexplain.evals.truth.suite import FeatureCase, judge_label
    from autoexplain.tools.cache import cache_root

    out = cache_root() / "bench" / f"planted-features-{built.fingerprint}"
    if not (out / "planted.json").exists():
        plant_features(built.root / "model", out, dict(PLANTED_FEATURES), PLANTED_DEAD)
    planted = load_planted(out)
    corpus = out / "corpus.txt"
    if not corpus.exists():
        write_corpus(corpus, default_texts(0, 600))
    plan = Plan.model_validate({"name": "bench-features", "model": str(planted.model_dir),
                                "items": [{"label": {"sae": str(planted.sae_dir), "dataset": str(corpus),
                                                     "features": "all", "tokens": 8000}}]})
    res = run_plan(store, prepare(plan), kind="bench")
    cases = []
    for o in res.outcomes:
        f = int(o.target.split("#")[1])
        dead = f in planted.dead
        label = o.text
        cases.append(FeatureCase(
            feature=f, truth="dead" if dead else ", ".join(w.strip() for w in planted.features[f]), label=label,
            correct=judge_label(f, label, planted.features, planted.dead), dead=dead,
            flagged_dead=bool(label and label.startswith("dead feature")), **{k: o.scores.get(k) for k in (
                "correctness", "completeness", "succinctness")}))
    return cases, res.run_id


def _print(circuits: tuple[list[Any], str], features: list[Any]) -> None:
    from rich.table import Table


    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    t = Table("planted circuit", "method", "edges kept / total", "true edges", "edge ROC AUC", "recall",
              "precision", "faithfulness", "completeness", "succinctness", "s")
    for c in circuits[0]:
        t.add_row(c.case, c.method, f"{c.n_edges}/{c.n_edges_total}", str(c.n_true), f(c.edge_roc_auc), f(c.recall),
                  f(c.precision), f(c.faithfulness), f(c.completeness), f(c.succinctness), f"{c.seconds:.1f}")
    con = console()
    con.print(t)
    t = Table("planted feature", "truth", "final label", "right?", "correct.", "complete.", "succinct.",
              "dead → flagged")
    for c in features:
        t.add_row(str(c.feature), c.truth, (c.label or "-")[:70], "yes" if c.correct else "NO", f(c.correctness),
                  f(c.completeness), f(c.succinctness), ("yes" if c.flagged_dead else "NO") if c.dead else "-")
    con.print(t)
    n = len(features)
    con.print(f"features labelled right: {sum(c.correct for c in features)}/{n}; circuits with recall 1: "
              f"{sum(1 for c in circuits[0] if c.recall == 1.0)}/{len(circuits[0])}")
