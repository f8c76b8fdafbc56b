"""docs/ARCHITECTURE.md lists the package's layers top to bottom, each importing only the ones
above it: checked here against every `sparkinfer.*` import in the package (lazy ones too)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "sparkinfer"


def documented_layers() -> list[str]:
    """The layer names (`runtime`, `api`, ...) in the order of the document's table."""
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    return [m.group(1) for m in re.finditer(r"^\| `sparkinfer/(\w+)(?:\.py|/)`", text, re.MULTILINE)]


def layer_of(path: Path) -> str | None:
    """The layer a package file belongs to (None: the package's own __init__)."""
    first = path.relative_to(PACKAGE).parts[0]
    return None if first == "__init__.py" else first.removesuffix(".py")


def imported_layers(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "sparkinfer" else [f"sparkinfer.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        out |= {n.split(".")[1] for n in names if n.startswith("sparkinfer.")}
    return out


def test_every_layer_is_documented_once() -> None:
    layers = documented_layers()
    files = {layer_of(p) for p in PACKAGE.rglob("*.py")} - {None}
    assert len(layers) == len(set(layers))
    assert set(layers) == files


def test_each_layer_imports_only_the_layers_above_it() -> None:
    layers = documented_layers()
    rank = {name: i for i, name in enumerate(layers)}
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = layer_of(path)
        if me is None:
            continue
        for used in imported_layers(path) - {me, "__version__"}:
            if rank[used] > rank[me]:
                wrong.append(f"{path.relative_to(REPO)} ({me}) imports {used}, listed below it")
    assert not wrong, "\n".join(wrong)
