"""Shared by the CUDA kernel tests (test_*_cuda.py and the GEMV GPU test): CUDA source and
libraries through `sparkinfer.compiler.targets` (codegen only, or nvcc fatbins per arch: never
TVM's NVRTC JIT), and the GPU run on a prebuilt library.

The GPU machines have runtime-only TVM: every GPU test's library is built on a CPU machine by
    python -m tests.gpu_prebuild --arch sm_90
into compiled/gpu-tests/<arch>/<stem>_<arch>.so (tests/gpu_prebuild.py: $SPARKINFER_GPU_TESTS
overrides compiled/gpu-tests), which the tests load from there. One test file's library alone:
    python tests/schedule/test_attention_cuda.py --arch sm_90 [--out DIR]
(sm_121 gives a .tar of aarch64 objects, which tvm.runtime.load_module links on the Spark.)
The same tests run on the CPU too, through the CUDA emulator (cuda_emulator.py): `gpu_fixture`
gives each test a "cuda" and an "emulated" run.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tvm

from sparkinfer.compiler import targets
from sparkinfer.runtime.device import detect_arch, import_tvm
from sparkinfer.schedule.arch import arch_facts
from sparkinfer.schedule.space import Knobs, kernel_use, rule_for

_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:  # `tests.` imports when run as a script or by a bare `pytest`
    sys.path.append(str(_REPO))

from tests.gpu_prebuild import can_compile, gpu_tests_dir, missing_reason, stale_note  # noqa: E402

from cuda_emulator import EmulatedGpu, kernel_definition  # noqa: E402

# At import, i.e. before conftest asks tvm.cuda() whether there is a GPU: with runtime-only TVM
# this loads the CUDA runtime that its backend autoload skips.
import_tvm()

needs_nvcc = pytest.mark.skipif(
    targets.find_nvcc() is None, reason="nvcc not found (CUDA_HOME, /usr/local/cuda or PATH)"
)
CUDA_ARCHS = [a for a in targets.ARCHS if a != "cpu"]


def scheduled(factory: Callable[..., tvm.tirx.PrimFunc], family: str, *args: object,
              knobs: Knobs | None = None, arch: str = "sm_90") -> tvm.tirx.PrimFunc:
    """`factory(*args)` as a step builds it for `arch` (`compiler.pipeline.step_kernel`): scheduled
    by its registered rule (knobs None: the default)."""
    from sparkinfer.compiler.pipeline import step_kernel  # the compiler's: runtime-only TVM has no Relax

    use = kernel_use(family, factory.__name__, *args)
    return step_kernel(factory(*args), use, arch_facts(arch), knobs)


def default_knobs_with(factory: Callable[..., tvm.tirx.PrimFunc], family: str, *args: object,
                       arch: str = "sm_90", **changes: object) -> Knobs:
    """The default knobs of `factory(*args)`'s rule for `arch`, with the knobs `changes`."""
    use = kernel_use(family, factory.__name__, *args)
    facts = arch_facts(arch)
    return dataclasses.replace(rule_for(use, facts).default(use, facts), **changes)  # type: ignore[type-var]


def module(*funcs: tvm.tirx.PrimFunc) -> tvm.IRModule:
    return tvm.IRModule({f.attrs["global_symbol"]: f for f in funcs})


def cuda_source(mod: tvm.IRModule, arch: str = "sm_90", tir_pipeline: str = "default") -> str:
    """Codegen only: `targets.cuda_source` compiles nothing, even on a GPU machine."""
    return targets.cuda_source(mod, arch, tir_pipeline)


def kernel_body(source: str, name: str) -> str:
    """The definition of `name`'s kernel (the last mention; the first is a declaration)."""
    return kernel_definition(source, f"{name}_kernel")


def assert_nvcc_compiles(arch: str, code: tvm.IRModule | str) -> None:
    """nvcc makes one cubin for `arch` of `code` (a module, or its CUDA source)."""
    source = code if isinstance(code, str) else cuda_source(code)
    entries = targets.fatbin_entries(targets.nvcc_fatbin(source, arch))
    assert entries == [targets.FatbinEntry("cubin", targets.cuda_arch(arch))]


def library_path(stem: str, arch: str, out_dir: Path | None = None) -> Path:
    """`stem`_`arch`.so, or for the Spark (aarch64 host) a .tar of objects."""
    out_dir = gpu_tests_dir(arch) if out_dir is None else out_dir
    return out_dir / f"{stem}_{arch}.{'tar' if arch == 'sm_121' else 'so'}"


def export(mod: tvm.IRModule, stem: str, arch: str, out_dir: Path, tir_pipeline: str = "default") -> Path:
    """Build `mod` for `arch` (an embedded nvcc fatbin, no CUDA source) into `library_path`,
    lowered by the TIR pipeline named `tir_pipeline`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = library_path(stem, arch, out_dir)
    targets.build(mod, arch, tir_pipeline).export_library(str(path))
    return path


def load_library(stem: str, mod: Callable[[], tvm.IRModule], tir_pipeline: str = "default"
                 ) -> Iterator[tvm.runtime.Module]:
    """For a module-scoped fixture: `stem`'s library for this machine's GPU from
    compiled/gpu-tests/<arch>/, else (or if it was built from other sources) one built here
    where TVM can compile, else a skip that names the prebuild command."""
    arch = detect_arch()
    path = library_path(stem, arch)
    stale = stale_note(arch) if path.is_file() else None
    if path.is_file() and not (stale and can_compile()):
        if stale:
            warnings.warn(f"{path}: {stale}", stacklevel=2)
        yield tvm.runtime.load_module(str(path))
        return
    if not can_compile():
        pytest.skip(missing_reason(f"{stem} library", path, arch))
    with tempfile.TemporaryDirectory() as tmp:
        yield tvm.runtime.load_module(str(export(mod(), stem, arch, Path(tmp), tir_pipeline)))


def gpu_fixture(stem: str, mod: Callable[[], tvm.IRModule], tir_pipeline: str = "default"
                ) -> Callable[..., Iterator[Gpu | EmulatedGpu]]:
    """A test file's module-scoped `gpu` fixture, two ways: "cuda" (marked gpu), `Gpu` on
    `stem`'s library (`load_library`); "emulated", the same kernels on the CPU
    (cuda_emulator.py), wherever TVM can compile. A test taking `gpu` runs on both. Both lower
    `mod` with the TIR pipeline named `tir_pipeline`."""

    @pytest.fixture(scope="module", name="gpu", params=[pytest.param("cuda", marks=pytest.mark.gpu), "emulated"])
    def gpu(request: pytest.FixtureRequest) -> Iterator[Gpu | EmulatedGpu]:
        if request.param == "emulated":
            if not can_compile():
                pytest.skip("the CUDA emulator builds with TVM's compiler; this TVM is runtime-only")
            yield EmulatedGpu(mod(), tir_pipeline)
            return
        for library in load_library(stem, mod, tir_pipeline):
            yield Gpu(library)

    return gpu


def gpu_only(gpu: Gpu | EmulatedGpu, why: str) -> None:
    """Skips the emulated run of a test case the CPU would take too long over (`why`)."""
    if isinstance(gpu, EmulatedGpu):
        pytest.skip(f"not emulated: {why}")


def main(doc: str, stem: str, mod: Callable[[], tvm.IRModule], tir_pipeline: str = "default") -> None:
    """A test file's prebuild hook: `python tests/schedule/<file>.py --arch sm_90 [--out DIR]`."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--arch", required=True, choices=CUDA_ARCHS)
    parser.add_argument("--out", type=Path, help="default: compiled/gpu-tests/<arch>/, where the tests look")
    args = parser.parse_args()
    print(export(mod(), stem, args.arch, args.out or gpu_tests_dir(args.arch), tir_pipeline))


class Gpu:
    """Host arrays to device tensors, and synchronous calls into a loaded library."""

    def __init__(self, library: tvm.runtime.Module) -> None:
        self.library, self.dev = library, tvm.cuda(0)

    def tensor(self, array: np.ndarray) -> tvm.runtime.Tensor:
        return tvm.runtime.tensor(array, self.dev)

    def poisoned(self, shape: tuple[int, ...]) -> tvm.runtime.Tensor:
        """A float32 output filled with NaN, so an element the kernel never writes fails."""
        return self.tensor(np.full(shape, np.nan, np.float32))

    def __call__(self, symbol: str, *args: tvm.runtime.Tensor) -> None:
        self.library[symbol](*args)
        self.dev.sync()
