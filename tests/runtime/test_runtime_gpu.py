"""The CUDA path: graph-captured steps against plain VM calls, the references, bench mode,
and loading with runtime-only TVM. Modules come prebuilt (`python -m tests.runtime.prebuild`)
where this machine cannot compile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.runtime import toy_step
from tests.runtime.conftest import REAL_CONFIG, REPO, TOY_CONFIG, build_real_module, can_compile, prebuilt_root

pytestmark = pytest.mark.gpu

PROMPT = [5, 17, 99, 3, 250, 42]


@pytest.fixture(scope="module")
def arch() -> str:
    from sparkinfer.runtime.device import detect_arch

    return detect_arch()


def _need_build(what: str) -> None:
    if not can_compile():
        pytest.skip(f"no prebuilt {what} under {prebuilt_root()} and runtime-only TVM here: run "
                    f"`python -m tests.runtime.prebuild --arch <arch>` on a machine with full TVM and carry compiled/")


@pytest.fixture(scope="module")
def toy_module(arch: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    prebuilt = prebuilt_root() / "toy" / arch
    if (prebuilt / "manifest.json").is_file():
        return prebuilt
    _need_build(f"toy module for {arch}")
    return toy_step.build(TOY_CONFIG, arch, tmp_path_factory.mktemp("toy-gpu"))


@pytest.fixture(scope="module")
def real_module(arch: str, real_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sparkinfer.compiler.manifest import compiled_dir
    from sparkinfer.gguf_file import GGUFModel

    model = GGUFModel.open(real_model)
    types = {n: i.ggml_type for n, i in model.tensors.items()}
    prebuilt = compiled_dir(REAL_CONFIG, types, arch, prebuilt_root())
    if (prebuilt / "manifest.json").is_file():
        return prebuilt
    _need_build(f"real module for {arch}")
    return build_real_module(real_model, arch, tmp_path_factory.mktemp("real-gpu"))


def engines(model: Path, arch: str, module: Path):  # noqa: ANN201
    from sparkinfer.runtime.engine import Engine

    return (Engine(model, arch=arch, module_dir=module, cuda_graph=True),
            Engine(model, arch=arch, module_dir=module, cuda_graph=False))


def test_gpu_memory_and_arch(arch: str) -> None:
    from sparkinfer.runtime.device import cuda_memory_info, open_device

    free, total = cuda_memory_info()
    assert 0 < free <= total and total > (1 << 30)
    dev = open_device()
    assert dev.arch == arch != "cpu" and dev.is_cuda and arch in dev.describe()


def test_toy_graph_replay_equals_vm_calls_and_the_reference(arch: str, toy_model: Path, toy_module: Path) -> None:
    from sparkinfer.gguf_file import GGUFModel

    m = GGUFModel.open(toy_model)
    ref = toy_step.ToyReference(TOY_CONFIG, {n: m.tensor_f32(n) for n in ("token_embd.weight", "output.weight")})
    graph, vm = engines(toy_model, arch, toy_module)
    try:
        assert graph.cuda_graph and not vm.cuda_graph
        want = ref.greedy(PROMPT, 40)
        for engine in (graph, vm):
            assert list(engine.generate(PROMPT, 40, stop_tokens=())) == want
            assert int(engine.kv.arrays["pos"].numpy()[0]) == engine.kv.n_tokens == len(PROMPT) + 39
            gen = engine.generate(PROMPT, 40, stream=False)
            assert list(gen) == want and gen.stats.timed_on_device and gen.stats.decode_s > 0
        # Same kernels on the same inputs: the captured step is bit for bit the VM call.
        np.testing.assert_array_equal(graph.forward(PROMPT + want), vm.forward(PROMPT + want))
        ref.reset()
        np.testing.assert_allclose(graph.forward(PROMPT), np.stack([ref.step(t) for t in PROMPT]),
                                   rtol=1e-5, atol=1e-5)
        # Stop tokens and prefix reuse on the graph path (lookahead steps accounted for).
        stop = want[7]
        assert list(graph.generate(PROMPT, 40, stop_tokens=[stop])) == want[: want.index(stop)]
        assert int(graph.kv.arrays["pos"].numpy()[0]) == graph.kv.n_tokens
        longer = PROMPT + want[:5] + [1, 2]
        gen = graph.generate(longer, 8, stop_tokens=(), reuse_prefix=True)
        assert list(gen) == ref.greedy(longer, 8) and gen.stats.reused_tokens == len(PROMPT) + 5
    finally:
        graph.close()
        vm.close()


def test_real_graph_replay_equals_vm_calls(arch: str, real_model: Path, real_module: Path) -> None:
    from sparkinfer.gguf_file import GGUFModel
    from tests.runtime.conftest import f16_cache_reference

    model = GGUFModel.open(real_model)
    prompt = [11, 200, 37, 5, 480]
    want = f16_cache_reference(model.config, model).greedy_generate(prompt, 24)
    graph, vm = engines(real_model, arch, real_module)
    try:
        tokens_graph = list(graph.generate(prompt, 24, stop_tokens=()))
        tokens_vm = list(vm.generate(prompt, 24, stop_tokens=()))
        assert tokens_graph == tokens_vm == want
        logits_graph = graph.forward(prompt + want)
        logits_vm = vm.forward(prompt + want)
        np.testing.assert_allclose(logits_graph, logits_vm, rtol=1e-6, atol=1e-6)
        assert list(graph.generate(prompt, 24, stream=False)) == want
    finally:
        graph.close()
        vm.close()


def test_the_module_loads_with_runtime_only_tvm(arch: str, toy_model: Path, toy_module: Path) -> None:
    code = (
        "import json, sys\n"
        "from sparkinfer.runtime.engine import Engine\n"
        f"e = Engine({str(toy_model)!r}, arch={arch!r}, module_dir={str(toy_module)!r})\n"
        f"tokens = list(e.generate({PROMPT!r}, 12, stop_tokens=()))\n"
        "print(json.dumps({**e.describe(), 'tokens': tokens}))\n"
    )
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["runtime_only_tvm"] is True and report["cuda_graph"] is True and report["arch"] == arch
    from sparkinfer.gguf_file import GGUFModel

    m = GGUFModel.open(toy_model)
    ref = toy_step.ToyReference(TOY_CONFIG, {n: m.tensor_f32(n) for n in ("token_embd.weight", "output.weight")})
    assert report["tokens"] == ref.greedy(PROMPT, 12)


def test_run_default_model_on_the_gpu(arch: str, tmp_path: Path) -> None:
    """`sparkinfer run --json` with the shipped model, if its module for this arch is compiled
    (`sparkinfer compile sparkinfer/data/default.gguf --arch <arch>` on a machine with full TVM)."""
    from sparkinfer.data import default_model_path
    from sparkinfer.gguf_file import GGUFModel
    from sparkinfer.runtime.engine import default_search_roots, find_module, type_map_of

    model = GGUFModel.open(default_model_path())
    if find_module(default_search_roots(), arch, model.config, type_map_of(model)) is None and not can_compile():
        pytest.skip(f"no compiled {arch} module for the default model under compiled/")
    env = {**os.environ, "SPARKINFER_CACHE": str(tmp_path), "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-m", "sparkinfer.cli", "run", "-p", "hello", "-n", "32", "--json"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["arch"] == arch and report["cuda_graph"] is True
    assert len(report["generated_ids"]) <= 32 and report["timings"]["prefill_ms"] > 0
