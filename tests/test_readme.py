"""The README's example queries return values after the demo (#20), and the queries the demo itself suggests do too.

The demo runs on the ``tiny`` toy world here (``autoexplain demo --world tiny``: the same job on a smaller model, so
the check fits the suite's time); the queries are read from the README as written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.agent.test_agent_offline import run_agent_cli

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_queries() -> list[str]:
    """The SQL of every ``autoexplain sql "..."`` line of the README's "Example queries" block."""
    text = README.read_text(encoding="utf-8")
    block = re.search(r"Example queries:\s*```bash\n(.*?)```", text, re.S)
    assert block, "the README lost its example queries"
    queries = re.findall(r'^autoexplain sql "(.*)"', block.group(1), re.M)
    assert len(queries) >= 4
    return [q.replace("\\$", "$") for q in queries]


@pytest.fixture(scope="module")
def demo_db(tiny_zoo, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("readme-demo")
    res = run_agent_cli(["demo", "--world", "tiny", "--db", "demo.duckdb"], root, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    return root, res.stdout


def _query(root: Path, sql: str) -> list[dict[str, Any]]:
    res = run_agent_cli(["sql", sql, "--db", "demo.duckdb", "-o", "json"], root, timeout=120)
    assert res.returncode == 0, (sql, res.stderr[-1000:])
    return json.loads(res.stdout)


@pytest.mark.parametrize("index", range(4))
def test_every_readme_example_query_returns_values_after_the_demo(demo_db: tuple[Path, str], index: int) -> None:
    root, _ = demo_db
    sql = readme_queries()[index]
    got = _query(root, sql)
    assert got, f"no rows: {sql}"
    nulls = [(i, k) for i, row in enumerate(got) for k, v in row.items() if v is None]
    assert not nulls, f"NULL in {nulls[:5]} of: {sql}"


def test_the_queries_the_demo_suggests_return_rows(demo_db: tuple[Path, str]) -> None:
    root, stdout = demo_db
    suggested = re.findall(r'autoexplain sql "(.*?)"', " ".join(stdout.split()))
    assert len(suggested) >= 3, stdout[-2000:]
    for sql in suggested:
        assert _query(root, sql), f"no rows: {sql}"


def test_the_demo_labels_live_features_and_shows_them_in_full(demo_db: tuple[Path, str]) -> None:
    root, stdout = demo_db
    labels = _query(root, "select w.target, e.text from work_items w join explanations e using (item_id) "
                          "where w.kind = 'feature' and e.is_final")
    assert len(labels) == 24 and not any(r["text"].startswith("dead feature") for r in labels)
    flat = " ".join(stdout.split())
    assert "toy:tiny/res0#" in flat and "toy:tiny/mlp1#" in flat  # features named by the spec the user knows
    assert "…" not in flat  # no explanation cut short


def test_the_demo_writes_its_report_and_prints_where(demo_db: tuple[Path, str]) -> None:
    """The demo ends with the report's path; the site is there, with a page for every labelled feature and every
    circuit (the browser checks of its pages are in tests/agent/report)."""
    root, stdout = demo_db
    found = re.findall(r"report:\s*(\S+index\.html)", " ".join(stdout.split()))
    assert found, stdout[-2000:]
    index = Path(found[-1]) if Path(found[-1]).is_absolute() else root / found[-1]
    assert index.is_file()
    site = index.parent
    n_features = len(_query(root, "select distinct w.target from work_items w where w.kind = 'feature'"))
    n_circuits = len(_query(root, "select circuit_id from circuits"))
    assert len(list((site / "features").rglob("*.html"))) >= n_features > 0
    assert len(list((site / "circuits").rglob("*.html"))) >= n_circuits > 0
