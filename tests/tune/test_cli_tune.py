"""`sparkinfer tune` on the shipped model: its argument errors, and a small tune end to end."""

import json

import pytest

from sparkinfer.cli import main


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 1
    return capsys.readouterr().err


def test_argument_errors(capsys, tmp_path):
    assert "needs --arch" in _error(capsys, ["tune", "--logs", str(tmp_path)])
    assert "needs --arch" in _error(capsys, ["tune", "--emit", str(tmp_path / "b")])
    assert "--trials must be at least 1" in _error(capsys, ["tune", "--arch", "cpu", "--trials", "0"])
    assert "is not a tuning bundle" in _error(capsys, ["tune", "--run", str(tmp_path)])
    assert "is not a tuning bundle" in _error(capsys, ["tune", "--ingest", str(tmp_path)])
    message = _error(capsys, ["tune", "--arch", "cpu", "--kernels", "no_such_kernel*", "--logs", str(tmp_path)])
    assert "matches none of the model's kernels" in message and "gemv_q4_k_256x512" in message
    assert "needs that GPU" in _error(capsys, ["tune", "--arch", "sm_90", "--kernels", "gemv_q4_k_256x512",
                                               "--logs", str(tmp_path)])
