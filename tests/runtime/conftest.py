"""Models and compiled modules for the runtime tests.

Two kinds of step:
  - the toy step (toy_step.py): the real step's contract with trivial arithmetic, built in a
    few seconds; tests the driver (state, pages, prefill, graph capture) apart from the model;
  - the real step (`sparkinfer.compiler.compile_model`) of a tiny decisive model; tests
    tokens against the numpy reference.
GPU machines carry runtime-only TVM and cannot compile: there the modules come prebuilt from
$SPARKINFER_TEST_MODULES (default `compiled/gpu-tests/<arch>/runtime/`), written on a machine
with full TVM by `python -m tests.gpu_prebuild` (see its docstring).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sparkinfer.gguf_file import ModelConfig

REPO = Path(__file__).resolve().parents[2]

TOY_CONFIG = ModelConfig(
    arch="qwen3moe", n_layers=2, hidden=64, n_heads=2, n_kv_heads=1, head_dim=32,
    vocab_size=300, context_length=128, n_experts=2, n_experts_used=1, expert_ffn=64,
)
# Every K-quant row a multiple of 256; small enough to compile in seconds on 2 cores.
REAL_CONFIG = ModelConfig(
    arch="qwen3moe", n_layers=2, hidden=256, n_heads=4, n_kv_heads=2, head_dim=64,
    vocab_size=512, context_length=256, n_experts=4, n_experts_used=2, expert_ffn=256,
)
REAL_TYPES = "q4_k_m"


def prebuilt_root() -> Path:
    """Where `python -m tests.gpu_prebuild` put this machine's runtime-test modules."""
    env = os.environ.get("SPARKINFER_TEST_MODULES")
    if env:
        return Path(env)
    from sparkinfer.runtime.device import detect_arch
    from tests.gpu_prebuild import gpu_tests_dir

    return gpu_tests_dir(detect_arch()) / "runtime"


def can_compile() -> bool:
    from sparkinfer.runtime.device import tvm_runtime_only

    return not tvm_runtime_only()


def write_toy_model(path: Path) -> Path:
    from sparkinfer.gguf_file import write_model
    from sparkinfer.tokenizer import synthetic_vocab
    from tests.reference._tiny import random_weights

    write_model(path, TOY_CONFIG, random_weights(TOY_CONFIG, seed=1), synthetic_vocab(TOY_CONFIG.vocab_size), "f32")
    return path


def write_real_model(path: Path) -> Path:
    """_tiny's large-gain weights: decisive top-1 tokens and experts, so tokens can be compared."""
    from sparkinfer.gguf_file import write_model
    from sparkinfer.tokenizer import synthetic_vocab
    from tests.reference._tiny import random_weights

    write_model(path, REAL_CONFIG, random_weights(REAL_CONFIG, seed=0), synthetic_vocab(REAL_CONFIG.vocab_size),
                REAL_TYPES)
    return path


def float_schedules(directory: Path) -> Path:
    """The packaged cpu schedules file's knobs without its step variants: a cpu module on float
    activations throughout, whose T-token step and token loop compute the same function up to
    float32 reassociation (the int8 default's rounding to blocks of 32 can flip apart there:
    tests/runtime/test_runtime_prefill.py, `test_the_int8_step_prefills_as_its_reference`)."""
    from sparkinfer.schedule.schedules import SchedulesFile, packaged_schedules_path

    packaged = SchedulesFile.read(packaged_schedules_path("cpu"))
    return SchedulesFile("cpu", packaged.made_by, packaged.kernels).write(directory / "cpu-float.json")


def step_int8_inputs(model: object) -> object:
    """Where the packaged cpu step of `model` (a GGUFModel) reads int8 activations: the numpy
    reference's `int8_inputs` for it."""
    from sparkinfer.compiler.pipeline import fitting_variants
    from sparkinfer.model.qwen3moe import int8_inputs
    from sparkinfer.schedule.schedules import schedules_for

    config = model.config  # type: ignore[attr-defined]
    variants = fitting_variants(config, "cpu", schedules_for("cpu")[0], lambda _: None)
    types = {n: i.ggml_type for n, i in model.tensors.items()}  # type: ignore[attr-defined]
    return int8_inputs(config, types, *(variants.get(name, "f32") for name in
                                        ("activations", "projection_activations", "head_activations")))


def f16_cache_reference(config: ModelConfig, weights: object, int8_inputs: object = None) -> object:
    """ReferenceModel whose K and V are rounded to float16 as they enter the cache, as the
    compiled step stores them (and with `int8_inputs`, `step_int8_inputs`'s, its matmul inputs
    rounded where the step reads int8 blocks)."""
    import numpy as np

    from sparkinfer.reference import ReferenceModel

    class Reference(ReferenceModel):
        def _append_kv(self, layer, k, v):  # noqa: ANN001, ANN202
            return super()._append_kv(layer, k.astype(np.float16).astype(np.float32),
                                      v.astype(np.float16).astype(np.float32))

    return Reference(config, weights, int8_inputs=int8_inputs)


def build_real_module(model_path: Path, arch: str, root: Path, schedules: Path | None = None) -> Path:
    """compile_model of the real tiny model (with `schedules`, None: the packaged file); returns
    the module dir."""
    from sparkinfer.compiler.pipeline import compile_model
    from sparkinfer.gguf_file import GGUFModel

    model = GGUFModel.open(model_path)
    types = {n: i.ggml_type for n, i in model.tensors.items()}
    return Path(compile_model(model.config, types, arch, root, schedules=schedules).directory)


@pytest.fixture(scope="session")
def toy_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    prebuilt = prebuilt_root() / "toy.gguf"
    if prebuilt.is_file():
        return prebuilt
    return write_toy_model(tmp_path_factory.mktemp("toy") / "toy.gguf")


@pytest.fixture(scope="session")
def toy_cpu_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.runtime import toy_step

    if not can_compile():
        pytest.skip("runtime-only TVM: cannot build the CPU module here")
    return toy_step.build(TOY_CONFIG, "cpu", tmp_path_factory.mktemp("toy-cpu"))


@pytest.fixture(scope="session")
def real_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    prebuilt = prebuilt_root() / "real.gguf"
    if prebuilt.is_file():
        return prebuilt
    return write_real_model(tmp_path_factory.mktemp("real") / "real.gguf")


@pytest.fixture(scope="session")
def real_cpu_module(real_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """On float activations (`float_schedules`), so that its tokens can be held to the numpy
    reference's greedy ones; the packaged int8 step: test_runtime_prefill.py's
    `test_the_int8_step_prefills_as_its_reference`."""
    if not can_compile():
        pytest.skip("runtime-only TVM: cannot build the CPU module here")
    root = tmp_path_factory.mktemp("real-compiled")
    return build_real_module(real_model, "cpu", root, schedules=float_schedules(root))

