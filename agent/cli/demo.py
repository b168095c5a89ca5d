"""``autoexplain demo``: the main job on the toy world, offline."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from autoexplain.agent.store import Store
    from autoexplain.tools.models import LoadedModel

from autoexplain.agent.cli.common import (
    DbOpt,
    build_zoo,
    check_db_path,
    console,
    execute,
    plan_from,
    show_summary,
    show_zoo,
)

#: Tokens the demo harvests per SAE: enough for every live feature to show top contexts, fast on 2 cores.
DEMO_TOKENS = 60_000
#: Features the demo labels per toy SAE: the first 12 live ones (a dead feature's label is just "dead").
DEMO_FEATURES = "live:12"


def demo(db: DbOpt = None,
         world: Annotated[str, typer.Option("--world", help="which toy world: small (the demo) or tiny (a smaller "
                                                            "model that does none of the tasks: a quick look)")]
         = "small") -> None:
    """The main job on the toy world, offline: build it, then let the agent label live features of both toy SAEs
    and find and explain the circuit of every toy task, scoring everything on held-out data, all into the
    database."""
    from autoexplain.agent.report import check_out_dir
    from autoexplain.tools.zoo import get_spec

    get_spec(world)  # an unknown world: one line, before anything is built or written
    check_db_path(db)  # before the toy world builds or loads
    report_dir = demo_report_dir(db)
    check_out_dir(report_dir)
    built = build_zoo(world)
    plan = plan_from({"name": "demo", "model": f"toy:{world}",
                      "items": [*({"label": {"sae": f"toy:{world}/{s['name']}", "features": DEMO_FEATURES,
                                             "tokens": DEMO_TOKENS}} for s in built.manifest["saes"]),
                                *({"circuit": {"task": t}} for t in built.manifest["task_accuracy"])]})
    res, store, prep = execute(plan, db, kind="demo")
    # the toy SAEs' training quality (FVU, L0, k) with each SAE, as `zoo build` records it
    quality = {f"toy:{world}/{q['name']}": {"l0": q["l0"], "fvu": q["fvu"], "k": q["k"]}
               for q in built.manifest["saes"]}
    store.record_model_and_saes(prep.lm, list(prep.saes.values()), extra=quality)
    show_zoo(built)
    _show_labels(store, res.run_id, {s.sae_id: spec for spec, s in prep.saes.items()})
    show_summary(res, store)
    con = console()
    path = store.path.resolve()
    flag = f" --db {path}" if db else ""
    con.print(f"\n[bold]results[/bold]: {path}  (run {res.run_id})")
    con.print(f"[bold]report[/bold]: {_write_report(store, report_dir, prep.lm)}  (open it in a browser; offline)")
    con.print("try:")
    for q in ("select target, text, round(correctness, 2) as correctness, round(completeness, 2) as completeness, "
              "round(succinctness, 2) as succinctness from best_explanations order by correctness desc nulls last "
              "limit 10",
              "select w.target, t.tool, t.summary from tool_calls t join work_items w using (item_id) "
              "where w.kind = 'circuit' order by t.created_at limit 6",
              "select c.task, e.rank, e.edge, round(e.score, 3) as score from circuits c join circuit_edges e "
              "using (circuit_id) where e.in_circuit order by c.task, e.rank"):
        con.print(f'  autoexplain sql "{q}"{flag}')


def demo_report_dir(db: Path | None) -> Path:
    """Where the demo writes its HTML report: next to the database, named after it (``autoexplain-report/``
    beside ``autoexplain.duckdb``)."""
    from autoexplain.agent.store import default_db_path

    path = db or default_db_path()
    return path.with_name(f"{path.stem}-report")


def _write_report(store: Store, out: Path, lm: LoadedModel) -> Path:
    """The report of the whole database (this run and any earlier ones), its index page's path returned (the
    circuits' attention patterns and logit lens computed with the demo's model, already loaded)."""
    from autoexplain.agent.report import build_report

    err = console(stderr=True)
    res = build_report(store, out, loaded={lm.spec: lm}, progress=lambda msg: err.print(f"[dim]report: {msg}[/dim]"))
    return res.index.resolve()


def _show_labels(store: Store, run_id: str, specs: dict[str, str]) -> None:
    """Every final explanation in full (wrapped, never cut), features named by the spec the user knows
    (``toy:small/res0#7``, which ``autoexplain show feature`` takes), with the item's status."""
    from rich.table import Table
    from rich.text import Text

    from autoexplain.agent.store import queries

    t = Table("target", "status", "explanation", "correct.", "complete.", "succinct.", "level")
    for target, text, c, m, s, level, status in queries.final_labels(store, run_id):
        sae_id, _, index = target.rpartition("#")
        shown = f"{specs[sae_id]}#{index}" if sae_id in specs else target
        t.add_row(shown, status, Text(text), *("-" if v is None else f"{v:.2f}" for v in (c, m, s)), level)
    console().print(t)


