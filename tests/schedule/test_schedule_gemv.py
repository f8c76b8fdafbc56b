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


@pytest.mark.parametrize("t", [T.Q4_K, T.F16, T.F32], ids=lambda t: t.name)
def test_aligned_formats_load_16_bytes_at_a_time(t: T) -> None:
    body = kernel_body(cuda_source(scheduled(G.gemv, "gemv", t, 256, 2048)))
    vector_copy = r"\*\((uint4|float4)\*\)\(W_local_ptr \+ \d+\) = \*\((uint4|float4)\*\)\(W_ptr"
    assert re.search(vector_copy, body)
    assert "= *(float4*)(x_ptr" in body


@pytest.mark.parametrize("x_per_expert", [False, True])
@pytest.mark.parametrize("t", [T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_experts_form_reads_ids_on_device(t: T, x_per_expert: bool) -> None:
    body = kernel_body(cuda_source(scheduled(G.gemv_experts, "gemv", t, 128, 8, 512, 768, x_per_expert)))
    assert "ids_ptr[((int)blockIdx.y)]" in body
    # The expert index must not turn the weight cache's copy into a guarded one, nor make
    # it span every expert: one 8-word chunk per row of the thread.
    assert "if ((0 <= ids_ptr" not in body
    sizes = [int(m) for m in re.findall(r"uint W_local_ptr\[(\d+)\]", body)]
    assert all(size <= 8 * 4 for size in sizes)


def test_default_schedule_splits_rows_without_idle_lanes() -> None:
    assert default_knobs(SM_90, T.Q4_K, 512, 2048).lanes == 32  # 32 chunks of 64
    assert default_knobs(SM_90, T.Q4_K, 512, 768).lanes == 4  # 12 chunks
    assert default_knobs(SM_90, T.Q6_K, 512, 2048).lanes == 16  # 16 halves of 128


def test_default_schedule_shares_x_across_rows_while_blocks_remain() -> None:
    assert default_knobs(SM_90, T.Q4_K, 4096, 2048) == GemvKnobs(32, 4, 4, 256)
    assert default_knobs(SM_90, T.Q4_K, 2048, 4096) == GemvKnobs(32, 4, 2, 256)
    assert default_knobs(SM_90, T.Q4_K, 512, 2048).rows_per_thread == 1
    # The MoE slots are blocks too.
    assert default_knobs(SM_90, T.Q4_K, 768, 2048, 8).rows_per_thread == 4


def test_short_gemvs_get_thinner_blocks_not_fewer() -> None:
    # the F32 router (128 x 2048): one warp a block, one block a row, not 32 blocks of 4 rows
    assert default_knobs(SM_90, T.F32, 128, 2048) == GemvKnobs(32, 1, 1, 256)
    assert default_knobs(SM_90, T.Q6_K, 512, 2048) == GemvKnobs(16, 4, 1, 256)  # a Q4_K_M V: 128 blocks, not 64
    assert default_knobs(SM_90, T.Q4_K, 2048, 768) == GemvKnobs(4, 16, 1, 256)  # 4 lanes: 128 blocks, not 64
    assert default_knobs(SM_90, T.Q4_K, 4096, 2048).rows == 4  # long enough: unchanged


@needs_nvcc
def test_nvcc_compiles_every_type_for_sm_90a() -> None:
    funcs = [scheduled(G.gemv, "gemv", t, 256, 2048) for t in ALL_TYPES]
    funcs += [
        scheduled(G.gemv_experts, "gemv", T.Q4_K, 16, 8, 768, 2048, False),
        scheduled(G.gemv_experts, "gemv", T.Q6_K, 16, 8, 2048, 768, True),
    ]
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
