"""``autoexplain show feature|circuit|run`` on a labelled ``tiny`` toy world, through the real command line.

One database per module: the session's harvested template (``test_agent_offline.harvested_template``) labelled by
the offline agent (two live and one dead feature of ``res0``) plus one circuit item (``greater_than``), the way
``autoexplain run`` writes it. Every case then reads it in a subprocess and checks what a user would look for;
each unknown name must be one line, exit code 2, listing what the file holds, and nothing written.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cli_support import CLI, Result, assert_input_error, cli_env, run_cli, snapshot

SPEC = "toy:tiny/res0"


def _offline_helpers() -> Any:
    """``tests/agent/test_agent_offline.py`` (its harvested template and helpers), imported by path."""
    name = "test_agent_offline"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parents[1] / "test_agent_offline.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def world(tiny_zoo, tmp_path_factory: pytest.TempPathFactory, one_thread) -> dict[str, Any]:
    """A labelled database: run, features (live and dead), judgements, a circuit; and the ids to ask for."""
    from autoexplain.agent.runner import Plan, prepare, run_plan
    from autoexplain.agent.store import Store, run_query

    helpers = _offline_helpers()
    src, picked = helpers.harvested_template()
    live, dead = picked[SPEC]["live"][:2], picked[SPEC]["dead"][:1]
    root = tmp_path_factory.mktemp("show")
    db = helpers.copy_db(src, root / "results.duckdb")
    plan = {"name": "show-test", "model": "toy:tiny", "items": [
        {"label": {"sae": SPEC, "features": ",".join(str(f) for f in live + dead)}},
        {"circuit": {"task": "greater_than"}}]}
    prep = prepare(Plan.model_validate(plan))
    res = run_plan(Store(db), prep)
    sae = prep.saes[SPEC]

    def q(sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        return run_query(db, sql, params)[1]

    (cid,), = q("select circuit_id from circuits")
    return {"db": db, "root": root, "run_id": res.run_id, "sae": sae, "lm": prep.lm, "live": live, "dead": dead,
            "circuit_id": cid, "q": q}


def show(world: dict[str, Any], *args: str, cwd: Path | None = None) -> Result:
    where = cwd or world["root"] / "cwd"
    where.mkdir(exist_ok=True)
    return run_cli(["show", *args, "--db", str(world["db"])], where)


def _ok(res: Result) -> str:
    assert res.returncode == 0, f"{res.args}: exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    assert res.after == res.before, "show wrote to its folder"
    return res.stdout


# ============================================================================= show feature
def test_feature_by_user_spec(world: dict[str, Any]) -> None:
    f = world["live"][0]
    def db_files() -> dict[str, str]:
        return {k: v for k, v in snapshot(world["db"].parent).items() if k.startswith("results.duckdb")}

    before = db_files()
    out = _ok(show(world, "feature", f"{SPEC}#{f}"))
    assert db_files() == before, "show changed the database file"
    sae_id = world["sae"].sae_id
    assert f"feature {SPEC}#{f}  = {sae_id}#{f}" in out
    labels = world["q"]("select text, is_final from explanations where target = ? order by is_final desc",
                        [f"{sae_id}#{f}"])
    final = next(t for t, is_final in labels if is_final)
    # the final label first, each label with its scores, their n and the causal level
    first = out.index("[final] ")
    assert out[first:].startswith(f"[final] {final}")
    assert all(out.index(f"] {t}") >= first for t, _ in labels)
    num = r"(\d\.\d{3}|-)"  # '-': a score the scorer could not compute (stored as null, with its n)
    assert re.search(rf"correctness {num} \(n \d+\); completeness {num} \(n \d+\); succinctness {num} \(n \d+\)", out)
    assert "causal level association" in out
    # statistics and the histogram
    density, n_tokens = world["q"]("select density, n_tokens from features where sae_id = ? and feature_index = ?",
                                   [sae_id, f])[0]
    assert f"density {density:.5f} over {n_tokens:,} tokens" in out
    assert "histogram of activations when firing" in out and re.search(r"\| #+ \d", out)
    # contexts: plain text (not a terminal) shows firing tokens as [tok 1.23], the split marked E / S
    assert re.search(r"\[\S+ \d+\.\d\d\]", out), out
    assert "top contexts" in out and "quantile contexts" in out
    assert re.search(r"^  [ES]  top max", out, re.M) and re.search(r"^  [ES] +q\d+ max", out, re.M)
    # judged contexts: the judge's prediction against the truth
    assert "judged contexts of the final label" in out
    assert re.search(r"(ok   |WRONG) predicted (yes|no|fail) +truth (yes|no)", out)


def test_feature_by_sae_id_reads_the_same(world: dict[str, Any]) -> None:
    f = world["live"][0]
    by_spec = _ok(show(world, "feature", f"{SPEC}#{f}"))
    by_id = _ok(show(world, "feature", f"{world['sae'].sae_id}#{f}"))
    body = lambda text: text.split("\n", 1)[1]  # noqa: E731 (the first line names the feature as typed)
    assert body(by_id) == body(by_spec)
    assert f"also named {SPEC}" in by_id


def test_dead_feature_and_plain_brackets_with_no_color(world: dict[str, Any]) -> None:
    out = _ok(show(world, "feature", f"{SPEC}#{world['dead'][0]}", "--no-color"))
    assert "DEAD (never fired)" in out and "dead feature" in out
    assert "\x1b[" not in out


def test_feature_by_folder_path_once_loaded_from_it(world: dict[str, Any], tiny_zoo,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """An SAE loaded from a folder (typed relative to where the user stood) is found by that folder's absolute
    path from anywhere, without loading anything; the toy spec keeps working."""
    from autoexplain.agent.store import Store
    from autoexplain.tools.saes import load_sae_dir

    folder = tiny_zoo.sae_dir("res0")
    db = world["db"].with_name("paths.duckdb")
    shutil.copyfile(world["db"], db)
    monkeypatch.chdir(folder.parent)
    sae = load_sae_dir(Path("res0"), world["lm"], spec="res0")
    assert sae.sae_id == world["sae"].sae_id  # a content hash: the same SAE wherever it lives
    Store(db).record_model_and_saes(world["lm"], [sae])
    f = world["live"][1]
    elsewhere = world["root"] / "elsewhere"
    elsewhere.mkdir()
    res = run_cli(["show", "feature", f"{folder}#{f}", "--db", str(db)], elsewhere)
    out = _ok(res)
    assert f"= {sae.sae_id}#{f}" in out and SPEC in out


def test_a_database_without_aliases_still_resolves_the_spec(world: dict[str, Any]) -> None:
    """A file from before ``sae_aliases`` (schema 6) resolves through ``saes.spec``; show never migrates it."""
    import duckdb

    old = world["db"].with_name("v6.duckdb")
    shutil.copyfile(world["db"], old)
    con = duckdb.connect(str(old))
    con.execute("drop table sae_aliases")
    con.execute("delete from schema_migrations where version >= 7")  # and what came after it
    con.close()
    f = world["live"][0]
    out = _ok(run_cli(["show", "feature", f"{SPEC}#{f}", "--db", str(old)], world["root"]))
    assert f"= {world['sae'].sae_id}#{f}" in out
    con = duckdb.connect(str(old), read_only=True)
    assert con.execute("select max(version) from schema_migrations").fetchone() == (6,)
    con.close()


def test_unknown_sae_feature_and_bad_syntax_are_one_line(world: dict[str, Any]) -> None:
    line = assert_input_error(show(world, "feature", "toy:tiny/nosuch#3"), "unknown SAE 'toy:tiny/nosuch'", SPEC,
                              world["sae"].sae_id)
    assert "features harvested" in line
    d_sae = world["sae"].d_sae
    assert_input_error(show(world, "feature", f"{SPEC}#{d_sae}"), f"0..{d_sae - 1}")
    for bad in (SPEC, f"{SPEC}#x", "#3", f"{SPEC}#-1"):
        assert_input_error(show(world, "feature", bad), "SPEC#INDEX")


def test_missing_database_is_refused_and_not_created(tmp_path: Path) -> None:
    res = run_cli(["show", "run", "r1", "--db", str(tmp_path / "none.duckdb")], tmp_path)
    assert_input_error(res, "no database", "none.duckdb")
    assert not (tmp_path / "none.duckdb").exists()


# ============================================================================= show circuit
def test_circuit_full_explanation_scores_sign_and_edges(world: dict[str, Any]) -> None:
    cid = world["circuit_id"]
    out = _ok(show(world, "circuit", cid))
    (text,), = world["q"]("select e.text from explanations e join circuits c using (item_id) "
                          "where c.circuit_id = ? and e.is_final", [cid])
    assert text in out  # the whole explanation, never cut
    assert re.search(r"scores: correctness (\d\.\d{3}|-) \(n \d+\); completeness", out)
    method, metric, n_edges = world["q"]("select method, metric, n_edges from circuits where circuit_id = ?",
                                         [cid])[0]
    assert f"edge score sign ({method}): score = " in out and "m(edge resample-ablated) - m(clean)" in out
    assert f"negative = ablating the edge lowers {metric}" in out and "kept by |score|" in out
    kept = world["q"]("select edge, rank from circuit_edges where circuit_id = ? and in_circuit order by rank",
                      [cid])
    assert len(kept) == n_edges and all(edge in out for edge, _ in kept)
    assert "nodes (edges in, out):" in out and "mechanism: causal mediation per node" in out
    everything = _ok(show(world, "circuit", cid, "--all-edges"))
    n_all = world["q"]("select count(*) from circuit_edges where circuit_id = ?", [cid])[0][0]
    assert sum(1 for line in everything.splitlines() if "->" in line and "│" in line) == n_all


def test_unknown_circuit_lists_the_stored_ones(world: dict[str, Any]) -> None:
    assert_input_error(show(world, "circuit", "circ-nosuch"), "unknown circuit 'circ-nosuch'", world["circuit_id"],
                       "greater_than")


def test_the_stated_sign_convention_is_what_patching_measures() -> None:
    """The line ``show circuit`` prints is true: on a planted circuit, each planted edge's EAP-IG score has the
    sign of m(that edge ablated) - m(clean), measured by patching the edge alone."""
    from autoexplain.agent.cli.show import sign_convention
    from autoexplain.evals.truth.planted_circuits import induction
    from autoexplain.tools.circuits import score_edges
    from autoexplain.tools.patching import PatchSetup

    p = induction()
    setup = PatchSetup(p.lm, p.task)
    scores = score_edges(setup, "eap-ig").as_dict()
    line = sign_convention("eap-ig", setup.metric.value, setup.ablation.value)
    assert f"negative = ablating the edge lowers {setup.metric.value}" in line
    g = setup.graph
    for edge in p.planted:
        measured = setup.evaluate(g.mask(g.edge_ids([edge]))) - setup.m_clean
        assert abs(measured) > 1e-3 and (scores[edge] < 0) == (measured < 0), (edge, scores[edge], measured)
    assert "never negative" in sign_convention("acdc", "kl", "resample")


# ============================================================================= show run
def test_run_status_items_budgets_summary(world: dict[str, Any]) -> None:
    out = _ok(show(world, "run", world["run_id"]))
    assert re.search(rf"run {world['run_id']}: \w+, status done, policy offline", out), out
    n_features = len(world["live"]) + len(world["dead"])
    # statuses as stored (the tiny model does not solve greater_than: its circuit item is not 'done')
    counts = world["q"]("select kind, status, count(*) from work_items where run_id = ? group by all order by all",
                        [world["run_id"]])
    assert sum(n for kind, _, n in counts if kind == "feature") == n_features
    assert "items by status: " + "; ".join(f"{k} {s} {n}" for k, s, n in counts) in out
    assert f"feature: {n_features} items, " in out and f"{len(world['dead'])} dead" in out
    steps = sum(json.loads(b)["steps"] for (b,) in world["q"]("select budget from work_items where run_id = ?",
                                                              [world["run_id"]]))
    assert re.search(rf"budgets used: {steps} graph steps \(most by one item \d+; limit per item \d+\)", out), out
    (summary,), = world["q"]("select summary from runs where run_id = ?", [world["run_id"]])
    assert "summary:" in out and f"by_status: {json.loads(summary)['by_status']}" in out
    assert "greater_than" in out  # the items with their final explanations


def test_unknown_run_lists_the_newest(world: dict[str, Any]) -> None:
    assert_input_error(show(world, "run", "run-nosuch"), "unknown run 'run-nosuch'", world["run_id"])


def test_show_answers_while_the_file_is_held_by_a_writer(world: dict[str, Any]) -> None:
    """Read-only: show waits for a writer holding the file to let go (as ``sql`` does) instead of failing."""
    from autoexplain.agent.store import Store

    store = Store(world["db"])
    with store.hold():
        store.upsert("runs", [{"run_id": world["run_id"], "status": "done"}])  # the writer now holds the file
        env = {**cli_env(world["root"]), "AUTOEXPLAIN_CACHE": os.environ["AUTOEXPLAIN_CACHE"]}
        p = subprocess.run([*CLI, "show", "run", world["run_id"], "--db", str(world["db"])], cwd=world["root"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "status done" in p.stdout
