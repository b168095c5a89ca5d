"""The README's layout section is the tree: every module of agent/, tools/ and evals/ is listed, and every listed
path exists (so a newcomer reading it finds the room for the next capability, and it cannot go stale)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("agent", "tools", "evals", "benchmarks")


def _layout_paths() -> set[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    blocks = section.split("```")[1::2]  # the fenced blocks; the tree is the one that starts at tools/
    block = next(b for b in blocks if b.lstrip().startswith("tools/"))
    paths: set[str] = set()
    stack: list[tuple[int, str]] = []  # (indent, folder path)
    for line in block.splitlines():
        m = re.match(r"^( *)([\w.]+/?)(\s|$)", line)
        if not m or line.strip().startswith(("│", "↓", "→", "─")):
            continue
        indent, name = len(m.group(1)), m.group(2)
        if not (name.endswith("/") or name.endswith(".py")):
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = (stack[-1][1] if stack else "") + name
        paths.add(path.rstrip("/"))
        if name.endswith("/"):
            stack.append((indent, path))
    return paths


def _tree() -> set[str]:
    out: set[str] = set()
    for top in PACKAGES:
        for p in (ROOT / top).rglob("*"):
            rel = p.relative_to(ROOT)
            if "__pycache__" in rel.parts or "results" in rel.parts or "prompts" in rel.parts[1:2] and p.is_file():
                continue
            if p.is_dir() or (p.suffix == ".py" and p.name not in ("__init__.py", "__main__.py")):
                out.add(str(rel))
    return out


def test_readme_layout_lists_every_module_and_nothing_else() -> None:
    listed, tree = _layout_paths(), _tree()
    assert tree - listed == set(), f"modules missing from README's layout: {sorted(tree - listed)}"
    extra = listed - tree - {*PACKAGES, "tests"}
    assert extra == set(), f"README lists what is not there: {sorted(extra)}"


def test_only_the_store_reads_the_database() -> None:
    """SQL reads live in agent/store (queries.py): no other module calls ``Store.query`` or opens DuckDB itself."""
    offenders = []
    for top in ("agent", "tools", "evals"):
        for p in (ROOT / top).rglob("*.py"):
            rel = p.relative_to(ROOT)
            if rel.parts[:2] == ("agent", "store"):
                continue
            text = p.read_text()
            if re.search(r"\.query\(|duckdb\.connect|import duckdb", text):
                offenders.append(str(rel))
    assert offenders == [], f"modules reading the database outside agent/store: {offenders}"
