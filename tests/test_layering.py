"""The dependency direction of DEVELOPERS.md, checked on every import statement in tether/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "tether"

#: component -> the tether components it may import (itself always allowed).
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "partitioner": {"core"},
    "codecs": {"core"},
    "policies": {"core"},
    "edge": {"core", "partitioner", "codecs", "policies"},
    "cloud": {"core", "partitioner", "codecs", "policies"},
    "testbed": {"core", "partitioner", "codecs", "policies", "edge", "cloud"},
}
# Entry points (cli.py, commands/) may import anything but nothing may import them back.
ENTRY = {"cli", "commands", "__main__", "api"}


def _component(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.suffix else rel.stem


def _imported_components(path: Path) -> set[tuple[str, int]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "tether":
                names = [f"tether.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "tether" and len(parts) > 1:
                found.add((parts[1], node.lineno))
    return found


def _violations() -> list[str]:
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        comp = _component(path)
        for target, line in _imported_components(path):
            if target == comp or comp == "__init__" or target not in ALLOWED.keys() | ENTRY:
                continue  # same component, or a top-level attribute such as tether.__version__
            if comp in ENTRY:
                continue
            if target in ENTRY or target == "testbed":
                bad.append(f"{path.relative_to(PKG.parent)}:{line} imports tether.{target}")
            elif comp in ALLOWED and target not in ALLOWED[comp]:
                bad.append(f"{path.relative_to(PKG.parent)}:{line} ({comp}) imports tether.{target}")
    return bad


def test_dependency_direction_holds():
    assert _violations() == []


def test_checker_catches_a_violation(tmp_path, monkeypatch):
    fake = tmp_path / "tether"
    (fake / "policies").mkdir(parents=True)
    (fake / "policies" / "bad.py").write_text("from tether.edge import agent\n")
    monkeypatch.setattr(__import__(__name__), "PKG", fake)
    assert any("imports tether.edge" in v for v in _violations())


@pytest.mark.parametrize("component", sorted(ALLOWED))
def test_component_is_known_package_or_absent(component):
    path = PKG / component
    assert not path.exists() or (path / "__init__.py").is_file()
