"""`sparkinfer compile MODEL.gguf --arch ... [--out DIR]`."""

from pathlib import Path

import pytest

from sparkinfer.cli import main
from sparkinfer.compiler.manifest import Manifest, find_compiled
from sparkinfer.gguf_file import GGUFModel, preset_config, synth_model

pytestmark = pytest.mark.slow


def test_compile_writes_a_module_then_finds_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gguf = tmp_path / "tiny.gguf"
    synth_model(gguf, preset_config("tiny"), "q8_0")
    out = tmp_path / "compiled"
    assert main(["compile", str(gguf), "--arch", "cpu", "--out", str(out)]) == 0
    first = capsys.readouterr().out
    assert "compiled in" in first and "/cpu/qwen3moe-" in first
    model = GGUFModel.open(gguf)
    types = {name: info.ggml_type for name, info in model.tensors.items()}
    found = find_compiled(model.config, types, "cpu", out)
    assert found is not None and Manifest.read(found.directory).inputs == found.inputs
    assert main(["compile", str(gguf), "--arch", "cpu", "--out", str(out)]) == 0
    assert "up to date" in capsys.readouterr().out


def test_compile_names_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", str(tmp_path / "nope.gguf"), "--arch", "cpu"]) == 1
    assert "nope.gguf" in capsys.readouterr().err


def test_compile_builds_the_chunk_sizes_asked_for(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gguf = tmp_path / "tiny.gguf"
    synth_model(gguf, preset_config("tiny"), "q8_0")
    out = tmp_path / "compiled"
    assert main(["compile", str(gguf), "--arch", "cpu", "--out", str(out), "--prefill-chunks", "16,32"]) == 0
    assert "prefill chunks 16, 32" in capsys.readouterr().out
    assert main(["compile", str(gguf), "--arch", "cpu", "--out", str(out / "plain"), "--prefill-chunks", "none"]) == 0
    assert "prefill chunks none (token by token)" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["0", "12,x", ""])
def test_compile_refuses_bad_chunk_sizes(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["compile", "m.gguf", "--arch", "cpu", "--prefill-chunks", value])
    assert exit_info.value.code == 2
    assert "expected chunk sizes like 128,512 (each >= 1) or none" in capsys.readouterr().err
