import shutil
from pathlib import Path
from typing import Callable

import pytest
from gguf import GGUFReader

from sparkinfer.gguf_file import preset_config, synth_model


@pytest.fixture(scope="session")
def tiny_q4_k_m(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny-q4_k_m.gguf"
    synth_model(path, preset_config("tiny"), "q4_k_m", seed=0)
    return path


@pytest.fixture
def patched_copy(tiny_q4_k_m: Path, tmp_path: Path) -> Callable[[Callable[[GGUFReader], None]], Path]:
    """A copy of the tiny model edited in place through gguf's writable memmap, for broken-file tests."""

    def make(edit: Callable[[GGUFReader], None]) -> Path:
        path = tmp_path / "patched.gguf"
        shutil.copy(tiny_q4_k_m, path)
        reader = GGUFReader(path, "r+")
        edit(reader)
        reader.data.flush()
        del reader
        return path

    return make
