"""The scripts under bench/ run where no test imports them (the GPU round, the profiles): each
must at least parse, and each shell script must pass `bash -n`, so a round does not die on a typo
after the device machine has started."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.parametrize("script", sorted(BENCH.rglob("*.py")), ids=lambda p: str(p.relative_to(BENCH)))
def test_python_script_parses(script: Path) -> None:
    ast.parse(script.read_text(), filename=str(script))


@pytest.mark.parametrize("script", sorted(BENCH.rglob("*.sh")), ids=lambda p: str(p.relative_to(BENCH)))
def test_shell_script_parses(script: Path) -> None:
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
