"""``autoexplain report``: the static site built from a database the real pipeline wrote, opened in headless
Chromium.

One database per module, written the way ``autoexplain run`` writes it: the session's harvested ``tiny`` toy world
(``test_agent_offline.harvested_template``) labelled by the offline agent (two live and one dead feature of
``res0``) plus one circuit item (``greater_than``). Hostile rows are then added the way a harvest or an LLM could
have written them: a context whose tokens are ``<script>`` and an ``<img onerror>``, and a draft label holding
markup. The report is built through the real command line, and every page is opened in Chromium (Debian's
``chromium``, driven by playwright with ``executable_path``; nothing is downloaded): no console errors, no request
other than ``file://``, the highlighted tokens of a feature page are exactly the stored ones, the circuit graph
draws exactly the circuit's edges, the hostile text shows as text and never runs, and a screenshot is written.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cli_support import CLI, assert_input_error, cli_env, run_cli

SPEC = "toy:tiny/res0"
HOSTILE_TOKENS = ["<script>window.__pwned=1</script>", " <img src=x onerror=\"window.__pwned=2\">", " &amp;",
                  "\n", " plain"]
HOSTILE_LABEL = "</td></table><script>window.__pwned=3</script> fires on <u class=\"pwn\">under</u> & 'quotes'"


def _offline_helpers() -> Any:
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


def find_chromium() -> str | None:
    """The system Chromium: ``$AUTOEXPLAIN_CHROMIUM``, else Debian's ``chromium`` (or another common name)."""
    env = os.environ.get("AUTOEXPLAIN_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    exe = find_chromium()
    if exe is None:
        pytest.skip("no Chromium found (apt-get install chromium, or set AUTOEXPLAIN_CHROMIUM): the report's pages "
                    "cannot be opened in a browser here")
    from playwright.sync_api import sync_playwright  # the test extra installs it; a missing one is a failure

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def world(tiny_zoo, tmp_path_factory: pytest.TempPathFactory, one_thread) -> dict[str, Any]:
    from autoexplain.agent.runner import Plan, prepare, run_plan
    from autoexplain.agent.store import Store, run_query

    helpers = _offline_helpers()
    src, picked = helpers.harvested_template()
    live, dead = picked[SPEC]["live"][:2], picked[SPEC]["dead"][:1]
    root = tmp_path_factory.mktemp("report")
    db = helpers.copy_db(src, root / "results.duckdb")
    plan = {"name": "report-test", "model": "toy:tiny", "items": [
        {"label": {"sae": SPEC, "features": ",".join(str(f) for f in live + dead)}},
        {"circuit": {"task": "greater_than"}}]}
    prep = prepare(Plan.model_validate(plan))
    res = run_plan(Store(db), prep)
    sae_id = prep.saes[SPEC].sae_id
    f = live[0]
    store = Store(db)
    (item_id,) = [r[0] for r in store.query("select item_id from work_items where target = ?", [f"{sae_id}#{f}"])[1]]
    # hostile rows, as a harvest of hostile text or an LLM's label would write them
    store.upsert("feature_examples", [{
        "sae_id": sae_id, "feature_index": f, "kind": "top", "example_id": 9999, "split": "explain",
        "tokens": HOSTILE_TOKENS, "acts": [0.0, 1.5, 0.0, 0.5, 0.0], "max_act": 1.5, "run_id": res.run_id}])
    store.upsert("explanations", [{
        "explanation_id": "expl-hostile", "run_id": res.run_id, "item_id": item_id, "target": f"{sae_id}#{f}",
        "text": HOSTILE_LABEL, "author": "test", "causal_level": "association", "is_final": False,
        "budget_limited": False, "created_at": dt.datetime.now()}])
    (cid, model_id), = store.query("select circuit_id, model_id from circuits")[1]
    has_feature_circuits = bool(store.query("select 1 from information_schema.tables where table_name = "
                                            "'feature_circuits'")[1])
    if has_feature_circuits:  # as `autoexplain feature-circuit` writes one: embed -> the labelled feature -> logits
        node = f"{sae_id}#{f}"
        store.upsert("feature_circuits", [{
            "feature_circuit_id": "fc-test", "run_id": res.run_id, "model_id": model_id, "task": "greater_than",
            "saes": [sae_id], "sites": ["resid_post.0"], "metric": "logit_diff", "ablation": "resample",
            "per_position": False, "n_nodes": 2, "n_nodes_total": 5, "n_edges": 2, "faithfulness": 0.8,
            "created_at": dt.datetime.now()}])
        store.upsert("feature_circuit_nodes", [
            {"feature_circuit_id": "fc-test", "node": "embed", "kind": "embed", "effect": 1.0, "in_circuit": True},
            {"feature_circuit_id": "fc-test", "node": node, "kind": "feature", "sae_id": sae_id,
             "feature_index": f, "site": "resid_post.0", "effect": 0.7, "in_circuit": True},
            {"feature_circuit_id": "fc-test", "node": f"{sae_id}#err", "kind": "error", "sae_id": sae_id,
             "effect": 0.01, "in_circuit": False}])
        store.upsert("feature_circuit_edges", [
            {"feature_circuit_id": "fc-test", "src": "embed", "dst": node, "weight": 0.9, "in_circuit": True},
            {"feature_circuit_id": "fc-test", "src": node, "dst": "logits", "weight": -0.6, "in_circuit": True},
            {"feature_circuit_id": "fc-test", "src": "embed", "dst": "logits", "weight": 0.01,
             "in_circuit": False}])
    del store

    def q(sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        return run_query(db, sql, params)[1]

    site = root / "site"
    env = {**cli_env(root), "AUTOEXPLAIN_CACHE": os.environ["AUTOEXPLAIN_CACHE"]}  # the session's toy world
    p = subprocess.run([*CLI, "report", "--db", str(db), "--out", str(site), "--run", res.run_id], cwd=root, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    return {"db": db, "root": root, "site": site, "run_id": res.run_id, "sae_id": sae_id, "live": live,
            "dead": dead, "circuit_id": cid, "q": q, "stdout": p.stdout, "env": env,
            "feature_circuits": has_feature_circuits}


def _shot_dir(tmp_path: Path) -> Path:
    """Where screenshots go: ``$AUTOEXPLAIN_REPORT_SHOTS`` (to look at them) or the test's temporary folder."""
    where = Path(os.environ.get("AUTOEXPLAIN_REPORT_SHOTS") or tmp_path)
    where.mkdir(parents=True, exist_ok=True)
    return where


def _open(browser: Any, path: Path) -> tuple[Any, list[str], list[str]]:
    """A new page at ``path``: (page, console errors and page errors, every requested URL)."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    requests: list[str] = []
    page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning")
            else None)
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    page.on("request", lambda r: requests.append(r.url))
    page.on("dialog", lambda d: (errors.append(f"dialog: {d.message}"), d.dismiss()))
    page.goto(path.resolve().as_uri())
    page.wait_for_load_state("load")
    return page, errors, requests


# ============================================================================= the site as a browser sees it
def test_the_command_prints_the_index_path(world: dict[str, Any]) -> None:
    index = world["site"] / "index.html"
    assert index.is_file()
    assert f"report:{index.resolve()}" in "".join(world["stdout"].split())  # rich may wrap a long path


def test_every_page_opens_offline_without_errors(world: dict[str, Any], browser: Any) -> None:
    site: Path = world["site"]
    pages = sorted(site.rglob("*.html"))
    targets = world["q"]("select distinct target from work_items where run_id = ? and kind = 'feature'",
                         [world["run_id"]])
    # index + one page per feature the run labelled + one per circuit it found
    assert len(targets) == 3 and len(pages) == 1 + len(targets) + 1, [p.relative_to(site) for p in pages]
    for path in pages:
        page, errors, requests = _open(browser, path)
        assert not errors, f"{path.relative_to(site)}: {errors}"
        assert requests and all(u.startswith("file://") for u in requests), f"{path}: network requests {requests}"
        # every relative link resolves to a file of the site
        for href in page.eval_on_selector_all("a[href]", "els => els.map(e => e.getAttribute('href'))"):
            assert not href.startswith(("http:", "https:", "//")), href
            assert (path.parent / href.split("#")[0]).resolve().is_file(), f"{path}: broken link {href}"
        page.close()


def test_feature_page_highlights_exactly_the_stored_tokens(world: dict[str, Any], browser: Any,
                                                          tmp_path: Path) -> None:
    sae_id = world["sae_id"]
    for f in world["live"]:
        rows = world["q"]("select tokens::varchar, acts::varchar, split from feature_examples where sae_id = ? "
                          "and feature_index = ? and kind in ('top', 'quantile')", [sae_id, f])
        tokens = [json.loads(r[0]) for r in rows]
        acts = [json.loads(r[1]) for r in rows]
        assert tokens, "the feature has stored contexts"
        page, errors, _ = _open(browser, world["site"] / "features" / sae_id / f"{f}.html")
        shown = page.locator(".examples .ctx i").count()
        hot = page.locator(".examples .ctx i.h").count()
        assert shown == sum(len(t) for t in tokens)
        assert hot == sum(1 for a in acts for x in a if x > 0) > 0
        # a highlighted token is coloured: its opacity variable is set and its background is not transparent
        bg = page.eval_on_selector(".examples .ctx i.h", "e => getComputedStyle(e).backgroundColor")
        assert bg not in ("rgba(0, 0, 0, 0)", "transparent"), bg
        # the explain/score split is marked on every context
        assert page.locator(".examples .ex").count() == len(rows)
        for split in ("explain", "score"):
            assert page.locator(f".examples .split.{split}").count() == sum(1 for r in rows if r[2] == split)
        assert sum(1 for r in rows if r[2] in ("explain", "score")) > 0
        assert "judged contexts" in page.inner_text("main") and "hypotheses tested" in page.inner_text("main")
        shot = _shot_dir(tmp_path) / f"feature-{f}.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert not errors
        page.close()


def test_hostile_text_shows_as_text_and_never_runs(world: dict[str, Any], browser: Any) -> None:
    f = world["live"][0]
    page, errors, _ = _open(browser, world["site"] / "features" / world["sae_id"] / f"{f}.html")
    assert page.evaluate("() => window.__pwned") is None
    assert page.locator("script").count() == 0 and page.locator("main img").count() == 0
    assert page.locator("main u, main .pwn").count() == 0  # the label's <u> is text, not markup
    text = page.inner_text("main")
    assert "<script>window.__pwned=1</script>" in text
    assert 'onerror="window.__pwned=2"' in text
    assert HOSTILE_LABEL in text
    # the hostile context's tokens are tokens too: 5 spans, 2 highlighted
    ex = page.locator('.ex[data-id="9999"]')
    assert ex.locator(".ctx i").count() == len(HOSTILE_TOKENS) and ex.locator(".ctx i.h").count() == 2
    assert not errors
    page.close()


def test_circuit_graph_draws_the_circuit_edges(world: dict[str, Any], browser: Any, tmp_path: Path) -> None:
    cid = world["circuit_id"]
    stored = {r[0] for r in world["q"]("select edge from circuit_edges where circuit_id = ? and in_circuit", [cid])}
    page, errors, _ = _open(browser, world["site"] / "circuits" / f"{cid}.html")
    drawn = set(page.eval_on_selector_all("svg.circuit path.edge.in", "els => els.map(e => e.dataset.edge)"))
    assert drawn == stored and len(drawn) > 0
    faint = set(page.eval_on_selector_all("svg.circuit path.edge.out", "els => els.map(e => e.dataset.edge)"))
    assert not faint & stored
    # nodes of the circuit are highlighted; every edge end has a node box
    nodes = set(page.eval_on_selector_all("svg.circuit g.node", "els => els.map(e => e.dataset.node)"))
    ends = {e.split("->")[1].removesuffix(".q").removesuffix(".k").removesuffix(".v") for e in stored}
    assert ends | {e.split("->")[0] for e in stored} <= nodes
    text = page.inner_text("main")
    assert "faithfulness curve" in text and "nodes: roles and mediation" in text
    # the toy world loads, so attention and the logit lens were computed with the model
    assert page.locator("svg.heat").count() >= 2, text[text.find("computed with the model"):][:400]
    if world["feature_circuits"]:  # the feature circuit: its kept edges, its feature node labelled and linked
        node = f"{world['sae_id']}#{world['live'][0]}"
        fc_edges = set(page.eval_on_selector_all("svg.fc path.edge", "els => els.map(e => e.dataset.edge)"))
        assert fc_edges == {f"embed->{node}", f"{node}->logits"}
        (label,) = world["q"]("select text from explanations where target = ? and is_final", [node])[0]
        link = page.locator(f'svg.fc a:has(g[data-node="{node}"])')
        assert link.get_attribute("href") == f"../features/{world['sae_id']}/{world['live'][0]}.html"
        assert label[:20] in (link.locator("title").text_content() or "")
    shot = _shot_dir(tmp_path) / "circuit.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert not errors
    page.close()


def test_index_lists_runs_and_filters_features(world: dict[str, Any], browser: Any, tmp_path: Path) -> None:
    page, errors, _ = _open(browser, world["site"] / "index.html")
    text = page.inner_text("main")
    assert world["run_id"] in text and "greater_than" in text and "score distributions" in text
    n = len(world["live"]) + len(world["dead"])
    assert page.locator("#features tbody tr").count() == n
    assert page.inner_text("#count") == f"{n} of {n} features"
    # search by label text: the hostile draft is not a final label, so searching its words finds nothing
    page.fill("#q", "__pwned")
    page.wait_for_function("() => document.getElementById('count').textContent.startsWith('0 of')")
    # search by a word of a final label
    (label,) = world["q"]("select text from explanations where target = ? and is_final",
                          [f"{world['sae_id']}#{world['live'][0]}"])[0]
    word = max(label.split(), key=len).strip("'\",")
    page.fill("#q", word)
    page.wait_for_function("() => !document.getElementById('count').textContent.startsWith('0 of')")
    assert word.lower() in page.inner_text("#features tbody").lower()
    # filter by score: above 1 nothing remains
    page.fill("#q", "")
    page.fill("#min", "1.01")
    page.wait_for_function("() => document.getElementById('count').textContent.startsWith('0 of')")
    assert page.evaluate("() => window.__pwned") is None
    shot = _shot_dir(tmp_path) / "index.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert not errors
    page.close()


def test_the_whole_database_gets_a_page_per_harvested_feature(world: dict[str, Any], tmp_path: Path) -> None:
    from autoexplain.agent.report import build_report
    from autoexplain.agent.store.queries import ReadOnlyStore

    res = build_report(ReadOnlyStore(world["db"]), tmp_path / "all", with_model=False)
    harvested = world["q"]("select count(*) from features")[0][0]
    assert res.features == harvested == len(list((tmp_path / "all" / "features").rglob("*.html")))
    assert res.circuits == 1 and (tmp_path / "all" / "data" / "features.js").read_text().startswith(
        "window.AE_FEATURES = ")
    page = (tmp_path / "all" / "circuits" / f"{world['circuit_id']}.html").read_text()
    assert "model views not computed" in page  # --no-model says so instead of drawing nothing


# ============================================================================= bad input
def test_bad_input_is_one_line_and_writes_nothing(world: dict[str, Any], tmp_path: Path) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    assert_input_error(run_cli(["report", "--db", str(world["db"]), "--out", "site", "--run", "run-nope"], cwd),
                       "unknown run 'run-nope'", world["run_id"])
    assert_input_error(run_cli(["report", "--db", str(cwd / "missing.duckdb"), "--out", "site"], cwd),
                       "no database")
    (cwd / "a-file").write_text("x")
    assert_input_error(run_cli(["report", "--db", str(world["db"]), "--out", "a-file"], cwd), "is a file")
    (cwd / "busy").mkdir()
    (cwd / "busy" / "notes.txt").write_text("mine")
    assert_input_error(run_cli(["report", "--db", str(world["db"]), "--out", "busy"], cwd), "holds no report")
