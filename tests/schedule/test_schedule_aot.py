"""Targets per arch, and built CUDA modules that carry an nvcc fatbin instead of source."""

import tarfile
from pathlib import Path

import pytest
import tvm
import tvm_ffi
from gguf import GGMLQuantizationType as T

from sparkinfer.compiler import targets
from sparkinfer.kernels import gemv as G

from cuda_testutil import scheduled

CUDA_ARCHS = ["sm_90", "sm_120", "sm_121"]
needs_nvcc = pytest.mark.skipif(
    targets.find_nvcc() is None, reason="nvcc not found (CUDA_HOME, /usr/local/cuda or PATH)"
)


@pytest.mark.parametrize("arch", CUDA_ARCHS)
def test_cuda_targets_use_the_arch_specific_variant(arch: str) -> None:
    target = targets.target_for(arch)
    assert target.kind.name == "cuda"
    assert str(target.attrs["arch"]) == arch + "a"
    assert int(target.attrs["thread_warp_size"]) == 32


def test_spark_host_code_is_aarch64() -> None:
    assert "aarch64" in str(targets.target_for("sm_121").host.attrs["mtriple"])


def test_cpu_target_is_llvm_for_this_machine() -> None:
    target = targets.target_for("cpu")
    assert target.kind.name == "llvm"
    assert str(target.attrs["mcpu"]) == tvm.target.codegen.llvm_get_system_cpu()


def test_unknown_arch_is_named_in_the_error() -> None:
    with pytest.raises(ValueError, match="sm_89.*sm_90, sm_120, sm_121, cpu"):
        targets.target_for("sm_89")


def library_bytes(path: Path) -> bytes:
    """The bytes of a shared object, or of every object inside a (compressed) .tar."""
    if path.suffix != ".tar":
        return path.read_bytes()
    with tarfile.open(path, "r:*") as tar:
        files = [tar.extractfile(m) for m in tar.getmembers() if m.isfile()]
        return b"".join(f.read() for f in files if f is not None)


def module() -> tvm.IRModule:
    """A plain Q4_K GEMV and a MoE Q6_K one: one kernel with vector loads, one without."""
    funcs = [
        scheduled(G.gemv, "gemv", T.Q4_K, 512, 2048),
        scheduled(G.gemv_experts, "gemv", T.Q6_K, 16, 8, 512, 768, True),
    ]
    return tvm.IRModule({f.attrs["global_symbol"]: f for f in funcs})


@needs_nvcc
@pytest.mark.parametrize("arch", CUDA_ARCHS)
def test_exported_library_carries_a_fatbin_for_the_arch(arch: str, tmp_path: Path) -> None:
    lib = targets.build(module(), arch)
    # The Spark's host code is aarch64: export objects (.tar), which need no cross linker.
    path = tmp_path / ("kernels.tar" if arch == "sm_121" else "kernels.so")
    lib.export_library(str(path))
    fatbins = targets.embedded_fatbins(path)
    assert len(fatbins) == 1
    assert targets.fatbin_entries(fatbins[0]) == [targets.FatbinEntry("cubin", arch + "a")]
    # Only the binary travels; the generated CUDA source is not in the library.
    assert b'extern "C" __global__' not in library_bytes(path)


@needs_nvcc
def test_build_leaves_tvms_globals_as_they_were() -> None:
    names = ["tvm_callback_cuda_compile", "ffi.Module.create.cuda"]
    before = [tvm_ffi.get_global_func(n, allow_missing=True) for n in names]
    targets.build(module(), "sm_90")
    after = [tvm_ffi.get_global_func(n, allow_missing=True) for n in names]
    for b, a in zip(before, after):
        assert (b is None and a is None) or b.same_as(a)


@needs_nvcc
def test_cuda_source_compiles_nothing_even_after_a_build() -> None:
    # Where TVM's CUDA module factory is registered (a GPU machine), a plain tvm.compile
    # JIT-compiles through NVRTC; codegen-only must not, whatever build() did before.
    targets.build(module(), "sm_90")
    assert 'extern "C" __global__' in targets.cuda_source(module(), "sm_90")


def test_fatbin_entries_rejects_other_data() -> None:
    with pytest.raises(ValueError, match="not a fatbin"):
        targets.fatbin_entries(b"\x7fELF" + bytes(60))
