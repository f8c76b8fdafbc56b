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
