"""The hand-made GEMV schedule: CUDA codegen for every type, and nvcc for every arch."""

import re

import pytest
import tvm
from gguf import GGMLQuantizationType as T

from sparkinfer.compiler import targets
from sparkinfer.kernels import gemv as G
from sparkinfer.schedule.arch import arch_facts
from sparkinfer.schedule.gemv import GemvKnobs, default_knobs

from cuda_testutil import scheduled

SM_90 = arch_facts("sm_90")
ALL_TYPES = [T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0, T.F16, T.BF16, T.F32]
needs_nvcc = pytest.mark.skipif(
    targets.find_nvcc() is None, reason="nvcc not found (CUDA_HOME, /usr/local/cuda or PATH)"
)


def cuda_source(func: tvm.tirx.PrimFunc) -> str:
    return targets.cuda_source(tvm.IRModule({"main": func}), "sm_90")


def kernel_body(source: str) -> str:
    return source[source.index('extern "C" __global__') :]


@pytest.mark.parametrize("t", ALL_TYPES, ids=lambda t: t.name)
def test_every_type_lowers_to_a_warp_reduction(t: T) -> None:
    body = kernel_body(cuda_source(scheduled(G.gemv, "gemv", t, 256, 2048)))
    assert "__shfl_down_sync" in body
    # A register cache indexed by a runtime value would live in local memory (stack).
    assert not re.search(r"_local_ptr\[[^\]]*(threadIdx|blockIdx|ids_ptr)", body)


@pytest.mark.parametrize("t", [T.Q4_K, T.F16, T.F32, G.Q6_K_PLANAR], ids=lambda t: G.gemv_format(t).name)
def test_aligned_formats_load_16_bytes_at_a_time(t: int) -> None:
    body = kernel_body(cuda_source(scheduled(G.gemv, "gemv", t, 256, 2048)))
    vector_copy = r"\*\((uint4|float4)\*\)\(W_local_ptr \+ \d+\) = \*\((uint4|float4)\*\)\(W_ptr"
    assert re.search(vector_copy, body)
    assert "= *(float4*)(x_ptr" in body


@pytest.mark.parametrize("factory, args", [(G.gemv, (151936, 2048)), (G.gemv_normed, (512, 2048, 1e-6)),
                                           (G.gemv_residual, (2048, 2048))], ids=["lm_head", "normed", "residual"])
def test_planar_q6_k_loads_its_quants_16_bytes_at_a_time(factory, args) -> None:  # noqa: ANN001
    """A lane's 96-byte run is 6 uint4 loads per row it holds (GGUF Q6_K: none at all)."""
    n, k = args[:2]
    wide = r"\*\(uint4\*\)\(W_local_ptr \+ \d+\) = \*\(uint4\*\)\(W_ptr"
    body = kernel_body(cuda_source(scheduled(factory, "gemv", G.Q6_K_PLANAR, *args)))
    assert len(re.findall(wide, body)) == 6 * default_knobs(SM_90, G.Q6_K_PLANAR, n, k).rows_per_thread
    gguf = kernel_body(cuda_source(scheduled(factory, "gemv", T.Q6_K, *args)))
    assert not re.search(r"\(uint4\*\)\(W_ptr", gguf)


@needs_nvcc
def test_nvcc_compiles_every_type_for_sm_90a() -> None:
    funcs = [scheduled(G.gemv, "gemv", t, 256, 2048) for t in [*ALL_TYPES, G.Q6_K_PLANAR]]
    mod = tvm.IRModule({f.attrs["global_symbol"]: f for f in funcs})
    fatbin = targets.nvcc_fatbin(targets.cuda_source(mod, "sm_90"), "sm_90")
    assert targets.fatbin_entries(fatbin) == [targets.FatbinEntry("cubin", "sm_90a")]


QKV_TYPES = [T.Q4_K, T.Q6_K, T.Q8_0, T.F16]


@pytest.mark.parametrize("n_v", [512, 0], ids=["qkv", "qk"])
@pytest.mark.parametrize("t", QKV_TYPES, ids=lambda t: t.name)
def test_qkv_is_one_kernel_writing_each_output(t: T, n_v: int) -> None:
    source = cuda_source(scheduled(G.gemv_qkv, "gemv", t, 4096, 512, n_v, 2048))
    assert source.count('extern "C" __global__ void') == 2  # declaration + definition: one kernel
    body = kernel_body(source)
    assert "__shfl_down_sync" in body
    assert not re.search(r"_local_ptr\[[^\]]*(threadIdx|blockIdx)", body)
    outputs = ["q", "k", "v"] if n_v else ["q", "k"]
    for name in outputs:
        assert re.search(rf"\b{name}_ptr\[[^\]]*\] = red_buf0_ptr\[0\]", body), name
    assert ("Wv_ptr" in body) == bool(n_v)


@pytest.mark.parametrize("t", [T.Q4_K, T.F16], ids=lambda t: t.name)
def test_qkv_aligned_formats_load_16_bytes_at_a_time(t: T) -> None:
    body = kernel_body(cuda_source(scheduled(G.gemv_qkv, "gemv", t, 4096, 512, 512, 2048)))
    for w in ("Wq", "Wk", "Wv"):
        assert re.search(rf"\*\((uint4|float4)\*\)\({w}_ptr", body), w
    assert "= *(float4*)(x_ptr" in body


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_90", "sm_120", "sm_121"])
def test_nvcc_compiles_qkv_for_every_arch(arch: str) -> None:
    funcs = [scheduled(G.gemv_qkv, "gemv", t, 4096, 512, 512, 2048) for t in QKV_TYPES]
    funcs.append(scheduled(G.gemv_qkv, "gemv", T.Q4_K, 4096, 512, 0, 2048))
    mod = tvm.IRModule({f.attrs["global_symbol"]: f for f in funcs})
    fatbin = targets.nvcc_fatbin(targets.cuda_source(mod, arch), arch)
    assert targets.fatbin_entries(fatbin) == [targets.FatbinEntry("cubin", arch + "a")]


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_90", "sm_120", "sm_121"])
def test_nvcc_compiles_planar_q6_k_for_every_arch(arch: str) -> None:
    funcs = [scheduled(G.gemv, "gemv", G.Q6_K_PLANAR, 151936, 2048),
             scheduled(G.gemv_residual, "gemv", G.Q6_K_PLANAR, 2048, 4096)]
    mod = tvm.IRModule({f.attrs["global_symbol"]: f for f in funcs})
    fatbin = targets.nvcc_fatbin(targets.cuda_source(mod, arch), arch)
    assert targets.fatbin_entries(fatbin) == [targets.FatbinEntry("cubin", arch + "a")]
