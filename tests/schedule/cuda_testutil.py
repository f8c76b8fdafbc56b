"""Shared by the attention, norm, RoPE and embedding CUDA tests: codegen + nvcc per arch, and
the GPU run, on a library built here or prebuilt.

The GPU machines have runtime-only TVM: build a test file's library on a CPU machine and point
the GPU test at it, e.g. for the attention tests
    python tests/schedule/test_attention_cuda.py --arch sm_90 --out DIR
    SPARKINFER_ATTENTION_LIBRARY=DIR/attention_sm_90.so \
        pytest -m gpu tests/schedule/test_attention_cuda.py
(sm_121 gives a .tar of aarch64 objects, which tvm.runtime.load_module links on the Spark.)
"""

import argparse
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tvm

from sparkinfer.compiler import targets

from schedule_gemv_cases import load_cuda_runtime

# At import, i.e. before conftest asks tvm.cuda() whether there is a GPU.
load_cuda_runtime()

needs_nvcc = pytest.mark.skipif(
    targets.find_nvcc() is None, reason="nvcc not found (CUDA_HOME, /usr/local/cuda or PATH)"
)
CUDA_ARCHS = [a for a in targets.ARCHS if a != "cpu"]


def module(*funcs: tvm.tirx.PrimFunc) -> tvm.IRModule:
    return tvm.IRModule({f.attrs["global_symbol"]: f for f in funcs})


def cuda_source(mod: tvm.IRModule) -> str:
    """Codegen only: outside `targets.build` TVM keeps the source and compiles nothing."""
    lib = tvm.compile(mod, target=targets.target_for("sm_90"))
    return lib.mod.imports[0].inspect_source("cuda")


def assert_nvcc_compiles(arch: str, mod: tvm.IRModule) -> None:
    entries = targets.fatbin_entries(targets.nvcc_fatbin(cuda_source(mod), arch))
    assert entries == [targets.FatbinEntry("cubin", targets.cuda_arch(arch))]


def export(mod: tvm.IRModule, stem: str, arch: str, out_dir: Path) -> Path:
    """`stem`_`arch`.so, or for the Spark (aarch64 host) a .tar of objects."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}_{arch}.{'tar' if arch == 'sm_121' else 'so'}"
    targets.build(mod, arch).export_library(str(path))
    return path


def load_library(
    env: str, stem: str, mod: Callable[[], tvm.IRModule]
) -> Iterator[tvm.runtime.Module]:
    """For a module-scoped fixture: the library named by $`env`, else one built here for
    this machine's GPU."""
    prebuilt = os.environ.get(env)
    if prebuilt:
        yield tvm.runtime.load_module(prebuilt)
        return
    arch = "sm_" + tvm.cuda(0).compute_version.replace(".", "")
    with tempfile.TemporaryDirectory() as tmp:
        yield tvm.runtime.load_module(str(export(mod(), stem, arch, Path(tmp))))


def main(doc: str, stem: str, mod: Callable[[], tvm.IRModule]) -> None:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--arch", required=True, choices=CUDA_ARCHS)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    print(export(mod(), stem, args.arch, args.out))


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
