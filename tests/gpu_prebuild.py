"""Build every GPU test's CUDA library on this machine, for the GPU machines, which carry
runtime-only TVM and cannot compile:

    python -m tests.gpu_prebuild --arch sm_90      # here: full TVM and nvcc; ~2 min on 2 cores
    # on the GPU machine, with compiled/ carried along (bench/gpu_round.sh does this):
    python3 -m pytest -m gpu $(grep -rlE 'pytest.mark.gpu|gpu_fixture[(]' tests --include='test_*.py')
(The GPU test files by name: with runtime-only TVM, the CPU-only test modules that import the
compiler at module level fail to collect, and a bare `pytest -m gpu` stops there.)

Everything lands in compiled/gpu-tests/<arch>/ ($SPARKINFER_GPU_TESTS replaces
compiled/gpu-tests, the one override), and every GPU test looks there first:
  <stem>_<arch>.so   the kernel tests' libraries: gemv_cases (tests/schedule/schedule_gemv_cases.py)
                     and attention, decode_attention_mma, dependent_launch, embedding, fused_decode, gemv_q8,
                     logits, moe, moe_chunk, norm, prefill, prefill_attention, rope, router, sampling
                     (tests/schedule/test_<stem>_cuda.py, each `kernels_module()`)
  runtime/           the runtime tests' models and steps (tests/runtime/prebuild.py; where
                     tests/runtime/conftest.py looks unless $SPARKINFER_TEST_MODULES says otherwise)
  <key>/             decode steps of model cuts (compiled/gpu-tests/<arch>/<key>/, the compiler's
                     `<root>/<arch>/<key>` layout with root compiled/gpu-tests): the 4-layer
                     full-width Qwen3-30B-A3B cut of tests/gpu/test_full_width_cut.py
  <part>/            what another GPU test file's `prebuild(arch, out_dir)` hook builds
                     (PREBUILD_HOOKS: accuracy/ for tests/accuracy/test_accuracy_gpu.py)
  BUILD.json         per part: what was built, from which sources (`sources_hash`), when, how long
The shipped default model's step (tests/runtime's `sparkinfer run` test) goes where
`sparkinfer run` looks for it: compiled/<arch>/<key>/.

A test whose library is missing builds it itself where TVM can compile, and otherwise skips,
naming this command.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GPU_TESTS_ENV = "SPARKINFER_GPU_TESTS"
SCHEDULE_TESTS = REPO / "tests" / "schedule"
# tests/schedule/test_<stem>_cuda.py, each with kernels_module() -> IRModule.
KERNEL_TESTS = ("attention", "decode_attention_mma", "dependent_launch", "embedding", "fused_decode", "gemv_q8",
                "logits", "moe", "moe_chunk", "norm", "prefill", "prefill_attention", "rope", "router", "sampling")
# Other GPU test files with a `prebuild(arch, out_dir) -> list[str]` hook: part name -> module;
# out_dir is compiled/gpu-tests/<arch>/<part>/.
PREBUILD_HOOKS = {"accuracy": "tests.accuracy.test_accuracy_gpu"}
# The full-width cut of tests/gpu/test_full_width_cut.py.
CUT_PRESET, CUT_LAYERS, CUT_TYPES = "qwen3-30b-a3b", 4, "q4_k_m"


def gpu_tests_root() -> Path:
    """compiled/gpu-tests, or $SPARKINFER_GPU_TESTS."""
    env = os.environ.get(GPU_TESTS_ENV)
    return Path(env) if env else REPO / "compiled" / "gpu-tests"


def gpu_tests_dir(arch: str) -> Path:
    return gpu_tests_root() / arch


def prebuild_command(arch: str) -> str:
    return f"python -m tests.gpu_prebuild --arch {arch}"


def missing_reason(what: str, where: Path, arch: str) -> str:
    """The skip reason of a GPU test whose prebuilt library is not there."""
    return (f"no prebuilt {what} at {where} and this TVM cannot compile: run `{prebuild_command(arch)}` "
            f"on a machine with full TVM and nvcc, and carry compiled/")


def build_record(arch: str) -> dict | None:
    """BUILD.json of compiled/gpu-tests/<arch>/, if there is one."""
    import json

    try:
        return json.loads((gpu_tests_dir(arch) / "BUILD.json").read_text())
    except (OSError, ValueError):
        return None


def stale_note(arch: str, part: str = "kernels") -> str | None:
    """Why the prebuilt `part` of `arch` may not be this tree's code (None: it is, or nothing
    says otherwise): BUILD.json's sources hash for it differs from this checkout's."""
    from sparkinfer.compiler.manifest import sources_hash

    built = ((build_record(arch) or {}).get("parts") or {}).get(part) or {}
    if built.get("sources_hash") in (None, sources_hash(arch)):
        return None
    return (f"prebuilt from other sources (kernels, schedules, model, compiler or quant changed since "
            f"`{prebuild_command(arch)}` at {built.get('at')})")


def can_compile() -> bool:
    """Full TVM (not the runtime-only package the GPU machines carry) and nvcc."""
    from sparkinfer.runtime.device import tvm_runtime_only

    if tvm_runtime_only():
        return False
    from sparkinfer.compiler.targets import find_nvcc

    return find_nvcc() is not None


def cut_config():  # noqa: ANN201 - a ModelConfig
    from sparkinfer.gguf_file import preset_config

    return preset_config(CUT_PRESET, n_layers=CUT_LAYERS)


def cut_type_map() -> dict:
    from sparkinfer.gguf_file import type_map

    return type_map(cut_config(), CUT_TYPES)


def cut_module_dir(arch: str) -> Path:
    """Where the prebuilt step of the 4-layer cut is (or goes)."""
    from sparkinfer.compiler.manifest import compiled_dir

    return compiled_dir(cut_config(), cut_type_map(), arch, gpu_tests_root())


# ---------------------------------------------------------------------------------------
# Building (full TVM + nvcc)
# ---------------------------------------------------------------------------------------


def _schedule_test_module(stem: str):  # noqa: ANN202
    import importlib
    import sys

    if str(SCHEDULE_TESTS) not in sys.path:  # the CUDA tests import cuda_testutil top-level
        sys.path.insert(0, str(SCHEDULE_TESTS))
    return importlib.import_module(stem)


def build_kernel_libraries(arch: str, out: Path) -> list[Path]:
    cuda_testutil = _schedule_test_module("cuda_testutil")
    cases = _schedule_test_module("schedule_gemv_cases")
    built = [cases.build_library(arch, out)]
    for stem in KERNEL_TESTS:
        test = _schedule_test_module(f"test_{stem}_cuda")
        # GPU_PIPELINE: the TIR pipeline of a test whose kernels TVM's default one does not lower as it needs
        pipeline = getattr(test, "GPU_PIPELINE", "default")
        built.append(cuda_testutil.export(test.kernels_module(), stem, arch, out, pipeline))
    return built


def build_runtime_tests(arch: str, out: Path) -> list[str]:
    from tests.runtime import prebuild

    return prebuild.build(arch, out)


def build_cut(arch: str) -> Path:
    from sparkinfer.compiler.pipeline import compile_model

    result = compile_model(cut_config(), cut_type_map(), arch, gpu_tests_root())
    return Path(result.directory)


def build_hook(part: str, arch: str) -> list[str]:
    import importlib

    try:
        hook = importlib.import_module(PREBUILD_HOOKS[part]).prebuild
    except (ImportError, AttributeError) as e:
        print(f"{arch} {part}: no prebuild hook ({type(e).__name__}: {e}); skipped")
        return []
    return hook(arch, gpu_tests_dir(arch) / part)


def build_default_model(arch: str) -> Path:
    """The shipped model's step, into compiled/<arch>/<key>/ (where `sparkinfer run` looks)."""
    from sparkinfer.compiler.pipeline import compile_model
    from sparkinfer.data import default_model_path
    from sparkinfer.gguf_file import GGUFModel

    model = GGUFModel.open(default_model_path())
    types = {name: info.ggml_type for name, info in model.tensors.items()}
    return Path(compile_model(model.config, types, arch, REPO / "compiled").directory)


def _relative(path: str | Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import time

    from sparkinfer.compiler.manifest import sources_hash, tvm_version
    from sparkinfer.compiler.targets import ARCHS, find_nvcc

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", required=True, choices=[a for a in ARCHS if a != "cpu"],
                        help="repeatable")
    parser.add_argument("--skip", action="append", default=[],
                        choices=["kernels", "runtime", "cut", "default", *PREBUILD_HOOKS],
                        help="leave a part out (repeatable)")
    args = parser.parse_args(argv)
    if find_nvcc() is None:
        parser.error("nvcc not found (CUDA_HOME, /usr/local/cuda or PATH): it builds the fatbins")
    for arch in args.arch:
        out = gpu_tests_dir(arch)
        out.mkdir(parents=True, exist_ok=True)
        record = build_record(arch) or {}
        record = {"arch": arch, "parts": record.get("parts", {})}
        parts = {
            "kernels": lambda: build_kernel_libraries(arch, out),
            "runtime": lambda: build_runtime_tests(arch, out / "runtime"),
            "cut": lambda: [build_cut(arch)],
            "default": lambda: [build_default_model(arch)],
            **{part: (lambda part=part: build_hook(part, arch)) for part in PREBUILD_HOOKS},
        }
        for name, build in parts.items():
            if name in args.skip:
                continue
            t0 = time.perf_counter()
            built = [_relative(p) for p in build()]
            seconds = round(time.perf_counter() - t0, 1)
            record["parts"][name] = {"built": built, "seconds": seconds, "sources_hash": sources_hash(arch),
                                     "tvm_version": tvm_version(), "at": time.strftime("%Y-%m-%d %H:%M:%S")}
            print(f"{arch} {name}: {seconds} s", *built, sep="\n  ", flush=True)
        (out / "BUILD.json").write_text(json.dumps(record, indent=1) + "\n")
        print(f"{arch}: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
