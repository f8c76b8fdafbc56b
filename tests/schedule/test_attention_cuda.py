"""Flash-decode attention schedules: codegen, nvcc for every arch, and on a GPU the
Qwen3-30B-A3B shapes against numpy (on GPU machines the library comes prebuilt:
`python -m tests.gpu_prebuild`)."""

import re

import numpy as np
import pytest
import tvm

from sparkinfer.kernels import attention as A

from cuda_testutil import (
    scheduled,
    CUDA_ARCHS,
    Gpu,
    assert_nvcc_compiles,
    cuda_source,
    gpu_fixture,
    main,
    module,
    needs_nvcc,
)

# Qwen3-30B-A3B: 32 query heads over 4 KV heads of 128; 64-token pages; 40960-token context.
NH, NKV, D, P, MP = 32, 4, 128, 64, 640
N_PAGES = 80  # room for a 4096-token context plus unmapped pages
SPLITS = (16, 32)


def attention_symbol(splits: int) -> str:
    return f"paged_decode_attention_{NH}x{NKV}x{D}_p{P}_s{splits}"


def combine_symbol(splits: int) -> str:
    return f"attention_combine_{NH}x{splits}x{D}"


def kernels_module(splits: tuple[int, ...] = SPLITS) -> tvm.IRModule:
    funcs = []
    for s in splits:
        funcs.append(scheduled(A.paged_decode_attention, "attention", NH, NKV, D, P, MP, s))
        funcs.append(scheduled(A.attention_combine, "attention", NH, s, D))
    return module(*funcs)


def test_state_stays_in_registers_and_loads_are_vectorized() -> None:
    source = cuda_source(kernels_module((16,)))
    body = source[source.rindex(f" {attention_symbol(16)}_kernel(") :]
    assert "*(uint4*)(k_tile_local_ptr" in body  # K rows by 16 bytes
    assert "*(half4*)(v_tile_local_ptr" in body  # V slices by 8 bytes
    assert "*(float4*)(q_rot_shared_ptr" in body  # q broadcasts by 16 bytes
    # The running state and the tile's rows are registers: indexed by constants only.
    for array in ("acc_local_ptr", "m_local_ptr", "l_local_ptr", "k_tile_local_ptr", "v_tile_local_ptr"):
        indices = re.findall(rf"\b{array}\[([^\]]*)\]", body)
        assert indices and all(re.fullmatch(r"[\d\s()*+]+", i) for i in indices), (array, indices)


@needs_nvcc
@pytest.mark.parametrize("arch", CUDA_ARCHS)
def test_nvcc_compiles_for(arch: str) -> None:
    assert_nvcc_compiles(arch, kernels_module((16,)))


gpu = gpu_fixture("attention", kernels_module)


def paged_cache(
    rng: np.random.Generator, page_table: np.ndarray, pos: int
) -> tuple[np.ndarray, np.ndarray]:
    """fp16 K and V with random rows at positions 0..pos and NaN everywhere else."""
    k = np.full((N_PAGES, P, NKV, D), np.nan, np.float16)
    v = np.full((N_PAGES, P, NKV, D), np.nan, np.float16)
    t = np.arange(pos + 1)
    k[page_table[t // P], t % P] = rng.standard_normal((pos + 1, NKV, D)) * 2
    v[page_table[t // P], t % P] = rng.standard_normal((pos + 1, NKV, D))
    return k, v


@pytest.mark.parametrize(
    ("splits", "pos"),
    # A 4096-token context, page boundaries, a single token, and short contexts whose
    # trailing splits are empty.
    [(16, 4095), (16, 2047), (16, 63), (16, 64), (16, 0), (32, 5), (32, 300), (32, 4095)],
)
def test_matches_numpy_on_gpu(gpu: Gpu, splits: int, pos: int) -> None:
    rng = np.random.default_rng(pos * 100 + splits)
    # Physical pages in random order; the table's unused tail points at real pages too.
    page_table = rng.permutation(N_PAGES)[: N_PAGES - 8]
    page_table = np.concatenate([page_table, rng.integers(0, N_PAGES, MP - len(page_table))])
    page_table = page_table.astype(np.int32)
    q = rng.standard_normal((NH, D), dtype=np.float32)
    k_cache, v_cache = paged_cache(rng, page_table, pos)

    o_part, lse = gpu.poisoned((NH, splits, D)), gpu.poisoned((NH, splits))
    out = gpu.poisoned((NH * D,))
    inputs = [q, k_cache, v_cache, page_table, np.array([pos], np.int32)]
    gpu(attention_symbol(splits), *map(gpu.tensor, inputs), o_part, lse)
    gpu(combine_symbol(splits), o_part, lse, out)

    o_ref, lse_ref = A.paged_decode_attention_reference(
        q, k_cache, v_cache, page_table, pos, splits
    )
    empty = np.isneginf(lse_ref)
    np.testing.assert_array_equal(np.isneginf(lse.numpy()), empty)
    # float32 sums of up to 4096 terms in another order than numpy's float64.
    np.testing.assert_allclose(lse.numpy()[~empty], lse_ref[~empty], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(o_part.numpy(), o_ref, rtol=1e-4, atol=2e-5)
    oracle = A.decode_attention_reference(q, k_cache, v_cache, page_table, pos)
    np.testing.assert_allclose(out.numpy(), oracle, rtol=1e-4, atol=2e-5)


if __name__ == "__main__":
    main(__doc__, "attention", kernels_module)
