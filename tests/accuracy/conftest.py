"""A tiny decisive model (tests/runtime's "real" model: 2 layers, hidden 256, 4 experts top-2,
vocabulary 512, context 256, Q4_K_M), its CPU module, and one Engine shared by the tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.runtime.conftest import REAL_CONFIG, build_real_module, can_compile, float_schedules, write_real_model

# Small runs: 64 tokens scored, greedy 16 after a 16-token prompt.
SMALL = {"n_tokens": 64, "prompt_tokens": 16, "greedy_tokens": 16}
SMALL_FLAGS = ["--tokens", "64", "--prompt-tokens", "16", "--greedy", "16"]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_real_model(tmp_path_factory.mktemp("acc-model") / "tiny.gguf")


@pytest.fixture(scope="session")
def tiny_module(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """On float activations (`float_schedules`): the gate's tests hold the engine to the numpy
    forward exactly (top-1 100 %, greedy 16 of 16). The packaged int8 step meets the gate on the
    shipped model: test_shipped_model_passes_the_default_gate_on_the_cpu."""
    if not can_compile():
        pytest.skip("runtime-only TVM: cannot build the CPU module here")
    root = tmp_path_factory.mktemp("acc-compiled")
    return build_real_module(tiny_model, "cpu", root, schedules=float_schedules(root))


@pytest.fixture(scope="session")
def tiny_engine(tiny_model: Path, tiny_module: Path):  # noqa: ANN201
    from sparkinfer.runtime.engine import Engine

    engine = Engine(tiny_model, arch="cpu", module_dir=tiny_module)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def other_shape_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's vocabulary and weights with another context length: another hparams hash."""
    import dataclasses

    from sparkinfer.gguf_file import write_model
    from sparkinfer.tokenizer import synthetic_vocab
    from tests.reference._tiny import random_weights

    config = dataclasses.replace(REAL_CONFIG, context_length=128)
    path = tmp_path_factory.mktemp("acc-other") / "other.gguf"
    write_model(path, config, random_weights(config, seed=0), synthetic_vocab(config.vocab_size), "f16")
    return path
