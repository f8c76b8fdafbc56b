import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparkinfer.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "tiny.gguf"
    assert main(["synth", str(path), "--preset", "tiny"]) == 0
    return path


def test_synth_reports_what_it_wrote(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tiny.with_name("one-layer.gguf")
    assert main(["synth", str(out), "--preset", "tiny", "--layers", "1", "--type", "q8_0", "--seed", "3"]) == 0
    assert f"wrote {out}: 15 tensors" in capsys.readouterr().out


def test_info(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(tiny)]) == 0
    out = capsys.readouterr().out
    for expected in (
        "architecture         qwen3moe",
        "file type            MOSTLY_Q4_K_M",
        "layers               2",
        "attention            4 heads, 2 kv heads, head_dim 64",
        "feed-forward         8 experts, top-2, expert ffn 256",
        "vocabulary           1024",
        "parameters           4.07 M (4,068,864)",
        "tensors              27: 11 F32, 8 Q4_K, 4 Q8_0, 2 Q5_K, 2 Q6_K",
        "bytes per token      993.14 KiB (1,016,976 bytes)",
    ):
        assert expected in out, expected


def test_info_dense(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "dense.gguf"
    assert main(["synth", str(path), "--preset", "tiny-dense", "--type", "f16"]) == 0
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "architecture         qwen3\n" in out and "dense, ffn 512" in out and "MOSTLY_F16" in out


def test_errors_print_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_text("hello")
    assert main(["info", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {bad} is not a GGUF file (magic b'hell', expected b'GGUF')\n"
    assert main(["synth", str(tmp_path / "x.gguf"), "--layers", "0"]) == 1
    assert capsys.readouterr().err == "error: invalid model configuration: n_layers must be positive, got 0\n"


def test_console_entry_exits_1_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "sparkinfer.cli", "info", str(bad)], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: {bad} is truncated: the file ends inside its header")
    assert "Traceback" not in result.stderr


def test_info_defaults_to_the_shipped_model(capsys: pytest.CaptureFixture[str]) -> None:
    from sparkinfer.data import default_model_path

    assert main(["info"]) == 0
    assert f"file                 {default_model_path()}," in capsys.readouterr().out


@pytest.mark.parametrize("command", [["run"], ["chat"], ["serve"], ["bench"], ["accuracy"], ["compile", "x.gguf"]])
def test_an_unknown_arch_is_the_same_error_everywhere(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*command, "--arch", "sm_80"]) == 1
    assert capsys.readouterr().err == "error: unknown arch 'sm_80': SparkInfer targets sm_90, sm_120, sm_121, cpu\n"
