"""The tiny decisive model of the runtime tests (tests/runtime/conftest.py, REAL_CONFIG: vocab
512 with the ChatML template, context 256) and its CPU module, built once per process and
shared by the API, chat and server tests; and the shipped model's (the agent API tests)."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.runtime.conftest import build_real_module, can_compile, prebuilt_root, write_real_model


@functools.lru_cache(maxsize=None)
def _paths() -> tuple[Path, Path]:
    root = Path(tempfile.mkdtemp(prefix="sparkinfer-tiny-"))
    atexit.register(shutil.rmtree, root, True)
    prebuilt = prebuilt_root() / "real.gguf"
    model = prebuilt if prebuilt.is_file() else write_real_model(root / "real.gguf")
    return model, build_real_module(model, "cpu", root / "compiled")


def tiny_paths() -> tuple[Path, Path]:
    """(model.gguf, its CPU module directory)."""
    if not can_compile():
        pytest.skip("runtime-only TVM: cannot build the CPU module here")
    return _paths()


def load_tiny(**options: Any) -> Any:
    import sparkinfer

    model, module = tiny_paths()
    return sparkinfer.load(model, arch="cpu", module_dir=module, **options)


@functools.lru_cache(maxsize=None)
def _shipped_module() -> Path:
    from sparkinfer.compiler.pipeline import compile_model
    from sparkinfer.data import default_model_path
    from sparkinfer.gguf_file import GGUFModel

    model = GGUFModel.open(default_model_path())
    types = {n: i.ggml_type for n, i in model.tensors.items()}
    root = Path(tempfile.mkdtemp(prefix="sparkinfer-shipped-"))
    atexit.register(shutil.rmtree, root, True)
    return Path(compile_model(model.config, types, "cpu", root).directory)


def load_shipped(**options: Any) -> Any:
    """The model shipped in the package (sparkinfer/data/default.gguf) on the CPU, its module
    built once per process."""
    import sparkinfer

    if not can_compile():
        pytest.skip("runtime-only TVM: cannot build the CPU module here")
    return sparkinfer.load(arch="cpu", module_dir=_shipped_module(), **options)
