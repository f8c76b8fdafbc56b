"""The tensor-core decode attention (kernels.attention.paged_decode_attention_mma, the step
variant decode_attention="mma", and paged_decode_attention_mma_merged, with attention_merge
"last_block"): codegen, ptxas, nvcc for every arch, and on a GPU (and the CUDA emulator) against
its own numpy reference (f16 Q and P) and, within fp16 rounding, the float32 one; the merged
kernel against the separate kernels."""

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tvm

from sparkinfer.compiler import targets
from sparkinfer.kernels import attention as A

from cuda_testutil import (
    CUDA_ARCHS,
    Gpu,
    assert_nvcc_compiles,
    cuda_source,
    gpu_fixture,
    kernel_body,
    main,
    module,
    needs_nvcc,
    scheduled,
)

# Qwen3-30B-A3B: 32 query heads over 4 KV heads of 128, 64-token pages, 32 splits; and a tiny
# group of 2 at head dim 64 (rows past the group are the mma's padding).
P, MP, N_PAGES = 64, 320, 40
DEEP_PAGES = 264  # the case at depth 16384: 257 pages and a few unmapped
FULL = (32, 4, 128, 32)
TINY = (4, 2, 64, 4)


def symbol(nh: int, nkv: int, d: int, splits: int) -> str:
    return f"paged_decode_attention_{nh}x{nkv}x{d}_p{P}_s{splits}_mma"


def merged_symbol(nh: int, nkv: int, d: int, splits: int) -> str:
    return f"paged_decode_attention_merged_{nh}x{nkv}x{d}_p{P}_s{splits}_mma"


def combine_symbol(nh: int, nkv: int, d: int, splits: int) -> str:
    return f"attention_combine_{nh}x{splits}x{d}"


def kernels_module() -> tvm.IRModule:
    """Both shapes' attention, last-block merged attention and combine."""
    return module(*(f for nh, nkv, d, s in (FULL, TINY) for f in (
        scheduled(A.paged_decode_attention_mma, "attention", nh, nkv, d, P, MP, s),
        scheduled(A.paged_decode_attention_mma_merged, "attention", nh, nkv, d, P, MP, s),
        scheduled(A.attention_combine, "attention", nh, s, d))))


def test_q_k_and_p_v_are_mma_sync_on_registers() -> None:
    body = kernel_body(cuda_source(kernels_module()), symbol(*FULL))
    loop = body[body.index("for (int it = 0;"):body.index("__syncthreads();")]
    # per 16-key tile: D / 16 ldmatrix + mma for q . K, one ldmatrix.x2.trans for P, D / 16 for p . V
    assert loop.count("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32") == 16
    assert loop.count("ldmatrix.sync.aligned.m8n8.x4.shared.b16") == 8
    assert loop.count("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16") == 8
    assert loop.count("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16") == 1
    # this tile's 16-byte pieces from registers into shared memory, the next tile's read ahead into them
    assert loop.count("= k_next_ptr[") == 8 and loop.count("= v_next_ptr[") == 8
    assert len(re.findall(r"k_next_ptr\[\d\] = \*\(uint4\*\)\(k_cache_ptr", loop)) == 8
    assert len(re.findall(r"v_next_ptr\[\d\] = \*\(uint4\*\)\(v_cache_ptr", loop)) == 8
    assert "__syncthreads" not in loop  # a warp's tiles are its own: __syncwarp only
    for array in ("o_ptr", "q_frag_ptr", "s_ptr", "row_max_ptr", "row_sum_ptr", "k_next_ptr", "v_next_ptr"):  # registers: constant indices
        indices = re.findall(rf"\b{array}\[([^\]]*)\]", body)
        assert indices and all(re.fullmatch(r"\d+", i) for i in indices), (array, indices)


@needs_nvcc
def test_ptxas_keeps_it_within_168_registers_without_spills(tmp_path: Path) -> None:
    """3 blocks of 128 threads an SM at most 168 registers a thread (the model's 32 splits are one
    block an SM anyway; bench/NOTES.md "Decode attention v3"), and a spill would put O or the
    read-ahead tile in local memory."""
    source = tmp_path / "mma.cu"
    source.write_text(cuda_source(kernels_module()))
    ptxas = subprocess.run([str(targets.find_nvcc()), "-arch=sm_90a", "-cubin", "-Xptxas", "-v",
                            "-o", str(tmp_path / "mma.cubin"), str(source)], capture_output=True, text=True,
                           check=True).stderr
    full = ptxas[ptxas.index(symbol(*FULL)):]
    assert int(re.search(r"Used (\d+) registers", full).group(1)) <= 168
    assert "0 bytes spill stores, 0 bytes spill loads" in full


@needs_nvcc
@pytest.mark.parametrize("arch", CUDA_ARCHS)
def test_nvcc_compiles_for(arch: str) -> None:
    assert_nvcc_compiles(arch, kernels_module())


def test_a_group_past_the_mma_n_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="at most 8 query heads per KV head"):
        A.paged_decode_attention_mma(32, 2, 128, P, MP, 32)


gpu = gpu_fixture("decode_attention_mma", kernels_module)


def paged_inputs(rng: np.random.Generator, nh: int, nkv: int, d: int, pos: int,
                 n_pages: int = N_PAGES) -> list[np.ndarray]:
    """q, K and V (random rows at positions 0..pos, NaN everywhere else: a read past the context
    fails), a page table of pages in random order, pos."""
    table = np.concatenate([rng.permutation(n_pages), rng.integers(0, n_pages, MP - n_pages)]).astype(np.int32)
    k = np.full((n_pages, P, nkv, d), np.nan, np.float16)
    v = np.full((n_pages, P, nkv, d), np.nan, np.float16)
    t = np.arange(pos + 1)
    k[table[t // P], t % P] = rng.standard_normal((pos + 1, nkv, d)) * 2
    v[table[t // P], t % P] = rng.standard_normal((pos + 1, nkv, d))
    q = rng.standard_normal((nh, d), dtype=np.float32)
    return [q, k, v, table, np.array([pos], np.int32)]


# Depth 1 and 2 (pos 0, 1: most splits empty), a partial page, 700 (a full tile and a partial one
# a split at 32 splits), 2100 (two tiles a warp 0: the read-ahead), and at the tiny shape several
# tiles a warp.
@pytest.mark.parametrize(("shape", "pos"), [(FULL, 0), (FULL, 1), (FULL, 100), (FULL, 700), (FULL, 2100), (TINY, 0),
                                            (TINY, 37), (TINY, 700)],
                         ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else f"pos{x}")
def test_matches_numpy(gpu: Gpu, shape: tuple[int, int, int, int], pos: int) -> None:
    check_against_numpy(gpu, shape, pos)


def test_matches_numpy_at_depth_16384(gpu: Gpu) -> None:
    """The issue's depth: 9 tiles a warp, the read-ahead in steady state (~7 s emulated)."""
    check_against_numpy(gpu, FULL, 16383, DEEP_PAGES)


def check_against_numpy(gpu: Gpu, shape: tuple[int, int, int, int], pos: int, n_pages: int = N_PAGES) -> None:
    nh, nkv, d, splits = shape
    inputs = paged_inputs(np.random.default_rng(pos + nh), nh, nkv, d, pos, n_pages)
    o_part, lse = gpu.poisoned((nh, splits, d)), gpu.poisoned((nh, splits))
    gpu(symbol(*shape), *map(gpu.tensor, inputs), o_part, lse)
    o_half, lse_half = A.paged_decode_attention_mma_reference(*inputs[:4], pos, splits)
    empty = np.isneginf(lse_half)
    np.testing.assert_array_equal(np.isneginf(lse.numpy()), empty)
    # exp2 for exp and the mma's sum order: a P may round to the neighbouring f16 (2^-11
    # relative), which a split of a few keys sees in its sum, and its lse, at ~2^-11 / keys
    np.testing.assert_allclose(lse.numpy()[~empty], lse_half[~empty], rtol=1e-5, atol=5e-4)
    np.testing.assert_allclose(o_part.numpy(), o_half, rtol=1e-3, atol=1e-3)
    o_f32, lse_f32 = A.paged_decode_attention_reference(*inputs[:4], pos, splits)
    np.testing.assert_allclose(lse.numpy()[~empty], lse_f32[~empty], rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(o_part.numpy(), o_f32, rtol=1e-2, atol=4e-3)


@pytest.mark.parametrize(("shape", "pos"), [(FULL, 700), (TINY, 37)],
                         ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else f"pos{x}")
def test_last_block_merge_matches_the_separate_kernels(gpu: Gpu, shape: tuple[int, int, int, int], pos: int) -> None:
    """The merged kernel's o_part, lse and out are the separate kernels' bit for bit (the combine's
    sums in its order), and it leaves every count at 0: twice, so that the emulator runs its blocks
    in both orders and the second launch starts from the first's reset."""
    nh, nkv, d, splits = shape
    inputs = [gpu.tensor(a) for a in paged_inputs(np.random.default_rng(pos), nh, nkv, d, pos)]
    o_part, lse, out = gpu.poisoned((nh, splits, d)), gpu.poisoned((nh, splits)), gpu.poisoned((nh * d,))
    gpu(symbol(*shape), *inputs, o_part, lse)
    gpu(combine_symbol(*shape), o_part, lse, out)
    arrivals = gpu.tensor(np.zeros(nkv, np.int32))
    for _ in range(2):
        merged = gpu.poisoned((nh, splits, d)), gpu.poisoned((nh, splits)), gpu.poisoned((nh * d,))
        gpu(merged_symbol(*shape), *inputs, arrivals, *merged)
        for got, want in zip(merged, (o_part, lse, out)):
            np.testing.assert_array_equal(got.numpy(), want.numpy())
        np.testing.assert_array_equal(arrivals.numpy(), np.zeros(nkv, np.int32))
    oracle = A.decode_attention_reference(*(a.numpy() for a in inputs[:4]), pos)
    np.testing.assert_allclose(out.numpy(), oracle, rtol=1e-2, atol=4e-3)


if __name__ == "__main__":
    main(__doc__, "decode_attention_mma", kernels_module)
