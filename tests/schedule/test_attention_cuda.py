"""Flash-decode attention schedules: codegen, nvcc for every arch, and on a GPU the
Qwen3-30B-A3B shapes against numpy (on GPU machines the library comes prebuilt:
`python -m tests.gpu_prebuild`)."""

import re

import numpy as np
import pytest
import tvm

from sparkinfer.kernels import attention as A
from sparkinfer.schedule.attention import AttentionKnobs
from sparkinfer.schedule.space import ScheduleError

from cuda_testutil import (
    scheduled,
    CUDA_ARCHS,
    Gpu,
    assert_nvcc_compiles,
    cuda_source,
    gpu_fixture,
    kernel_body,
    main,
    module,
    needs_nvcc,
)

# Qwen3-30B-A3B: 32 query heads over 4 KV heads of 128; 64-token pages; 40960-token context.
NH, NKV, D, P, MP = 32, 4, 128, 64, 640
N_PAGES = 80  # room for a 4096-token context plus unmapped pages
SPLITS = (16, 32)


# The rule's other layouts, (heads_per_lane, k_vector), beside the default (2, 8): a head a lane
# (4 lanes a head), four (16 lanes), the whole group (lanes over dims only, 8-byte pieces).
KNOBS = [(1, 8), (4, 8), (8, 4)]
# The demo model's GQA: 8 query heads over 2 KV heads of 64 (a group of 4).
SMALL = (8, 2, 64)


def attention_symbol(splits: int, nh: int = NH, nkv: int = NKV, d: int = D) -> str:
    return f"paged_decode_attention_{nh}x{nkv}x{d}_p{P}_s{splits}"


def knobs_symbol(heads_per_lane: int, k_vector: int) -> str:
    return f"{attention_symbol(16)}_h{heads_per_lane}_v{k_vector}"


def combine_symbol(splits: int, nh: int = NH, d: int = D) -> str:
    return f"attention_combine_{nh}x{splits}x{d}"


def merged_symbol(splits: int, nh: int = NH, nkv: int = NKV, d: int = D) -> str:
    return f"paged_decode_attention_merged_{nh}x{nkv}x{d}_p{P}_s{splits}"


# The last-block merge (merge="last_block"): the model's shape at its 32 splits, and the demo
# model's group of 4 at 16.
MERGED = [(32, NH, NKV, D), (16, *SMALL)]


def merged_module() -> tvm.IRModule:
    return module(*(scheduled(A.paged_decode_attention_merged, "attention", nh, nkv, d, P, MP, s)
                    for s, nh, nkv, d in MERGED))


def kernels_module(splits: tuple[int, ...] = SPLITS, variants: bool = True) -> tvm.IRModule:
    funcs = []
    for s in splits:
        funcs.append(scheduled(A.paged_decode_attention, "attention", NH, NKV, D, P, MP, s))
        funcs.append(scheduled(A.attention_combine, "attention", NH, s, D))
    if variants:
        for h, v in KNOBS:
            f = scheduled(A.paged_decode_attention, "attention", NH, NKV, D, P, MP, 16,
                          knobs=AttentionKnobs(heads_per_lane=h, k_vector=v))
            funcs.append(f.with_attr("global_symbol", knobs_symbol(h, v)))
        nh, nkv, d = SMALL
        funcs.append(scheduled(A.paged_decode_attention, "attention", nh, nkv, d, P, MP, 16))
        funcs.append(scheduled(A.attention_combine, "attention", nh, 16, d))
        funcs.extend(merged_module().functions.values())
    return module(*funcs)


def tile_loop(body: str) -> str:
    """The text of the kernel's tile loop (`for (int it ...) { ... }`)."""
    start = body.index("for (int it = 0;")
    depth, i = 0, body.index("{", start)
    while True:
        depth += {"{": 1, "}": -1}.get(body[i], 0)
        if depth == 0:
            return body[start : i + 1]
        i += 1


def test_state_stays_in_registers_and_loads_are_vectorized() -> None:
    source = cuda_source(kernels_module((16,), variants=False))
    body = source[source.rindex(f" {attention_symbol(16)}_kernel(") :]
    assert "*(uint4*)(k_tile_local_ptr" in body  # K pieces by 16 bytes
    assert "*(uint4*)(v_tile_local_ptr" in body  # V pieces by 16 bytes
    assert "*(float4*)(q_rot_local_ptr" in body  # q into registers by 16 bytes, once
    assert "q_rot_shared" not in body
    # The running state, q, p and the tile's rows are registers: indexed by constants and
    # unrolled loop counters, never by a thread index or the tile loop's counter.
    arrays = ("acc_local_ptr", "m_local_ptr", "l_local_ptr", "p_local_ptr", "q_rot_local_ptr",
              "k_tile_local_ptr", "v_tile_local_ptr")
    for array in arrays:
        indices = re.findall(rf"\b{array}\[([^\]]*)\]", body)
        assert indices and all(re.fullmatch(r"[\w\s()*+]+", i) and not re.search(r"Idx|\bit\b|_ptr", i)
                               for i in indices), (array, indices)
    # Warps exchange nothing inside the tile loop: no block barrier there.
    assert "__syncthreads" not in tile_loop(body)


def test_a_group_that_does_not_divide_a_warp_is_refused() -> None:
    with pytest.raises(ScheduleError, match="no warp layout for a GQA group of 3 heads"):
        scheduled(A.paged_decode_attention, "attention", 12, 4, 128, P, MP, 16)


@needs_nvcc
@pytest.mark.parametrize("arch", CUDA_ARCHS)
def test_nvcc_compiles_for(arch: str) -> None:
    assert_nvcc_compiles(arch, kernels_module((16,), variants=False))


@needs_nvcc
@pytest.mark.parametrize("arch", CUDA_ARCHS)
def test_nvcc_compiles_the_last_block_merge_for(arch: str) -> None:
    assert_nvcc_compiles(arch, merged_module())


def test_one_thread_counts_after_every_thread_published() -> None:
    body = kernel_body(cuda_source(merged_module()), merged_symbol(32))
    release = body.index("tvm_builtin_cuda_thread_fence();\n  tvm_builtin_cuda_cta_sync();")
    count = body.index("tvm_builtin_cuda_atomic_add((&(arrivals_ptr[((int)blockIdx.y)])), 1)")
    guard = body.rindex("if (((((int)threadIdx.x) < 1) && (((int)threadIdx.y) < 1)) && (((int)threadIdx.z) < 1))",
                        0, count)
    # every o_part and lse store is before the release; the count, thread 0's, after it
    assert max(body.rindex("o_part_ptr[", 0, release), body.rindex("lse_ptr[", 0, release)) < release < guard
    assert body.count("tvm_builtin_cuda_atomic_add(") == 1
    # the answer reaches the other threads through shared memory, after a barrier
    merge = body.index("for (int", count)
    assert "__syncthreads();" in body[count:merge] and "last_shared_ptr[0]" in body[count:merge]
    assert "arrivals_ptr[((int)blockIdx.y)] = 0;" in body[count:merge]


gpu = gpu_fixture("attention", kernels_module)


def paged_cache(
    rng: np.random.Generator, page_table: np.ndarray, pos: int, nkv: int = NKV, d: int = D
) -> tuple[np.ndarray, np.ndarray]:
    """fp16 K and V with random rows at positions 0..pos and NaN everywhere else."""
    k = np.full((N_PAGES, P, nkv, d), np.nan, np.float16)
    v = np.full((N_PAGES, P, nkv, d), np.nan, np.float16)
    t = np.arange(pos + 1)
    k[page_table[t // P], t % P] = rng.standard_normal((pos + 1, nkv, d)) * 2
    v[page_table[t // P], t % P] = rng.standard_normal((pos + 1, nkv, d))
    return k, v


def check_against_numpy(gpu: Gpu, symbol: str, splits: int, pos: int, nh: int = NH, nkv: int = NKV,
                        d: int = D, combine: str | None = None) -> None:
    """`symbol` on fresh random inputs at `pos` against the numpy reference, then (`combine`)
    the combine of its splits against the model's oracle."""
    rng = np.random.default_rng(pos * 100 + splits)
    # Physical pages in random order; the table's unused tail points at real pages too.
    page_table = rng.permutation(N_PAGES)[: N_PAGES - 8]
    page_table = np.concatenate([page_table, rng.integers(0, N_PAGES, MP - len(page_table))])
    page_table = page_table.astype(np.int32)
    q = rng.standard_normal((nh, d), dtype=np.float32)
    k_cache, v_cache = paged_cache(rng, page_table, pos, nkv, d)

    o_part, lse = gpu.poisoned((nh, splits, d)), gpu.poisoned((nh, splits))
    inputs = [q, k_cache, v_cache, page_table, np.array([pos], np.int32)]
    gpu(symbol, *map(gpu.tensor, inputs), o_part, lse)

    o_ref, lse_ref = A.paged_decode_attention_reference(
        q, k_cache, v_cache, page_table, pos, splits
    )
    empty = np.isneginf(lse_ref)
    np.testing.assert_array_equal(np.isneginf(lse.numpy()), empty)
    # float32 sums of up to 4096 terms in another order than numpy's float64.
    np.testing.assert_allclose(lse.numpy()[~empty], lse_ref[~empty], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(o_part.numpy(), o_ref, rtol=1e-4, atol=2e-5)
    if combine is not None:
        out = gpu.poisoned((nh * d,))
        gpu(combine, o_part, lse, out)
        oracle = A.decode_attention_reference(q, k_cache, v_cache, page_table, pos)
        np.testing.assert_allclose(out.numpy(), oracle, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize(
    ("splits", "pos"),
    # A 4096-token context, page boundaries, a single token, and short contexts whose
    # trailing splits are empty; at the model's 32 splits the bench depths 128 and 512.
    [(16, 4095), (16, 2047), (16, 63), (16, 64), (16, 0), (32, 0), (32, 5), (32, 127), (32, 511), (32, 4095)],
)
def test_matches_numpy_on_gpu(gpu: Gpu, splits: int, pos: int) -> None:
    check_against_numpy(gpu, attention_symbol(splits), splits, pos, combine=combine_symbol(splits))


@pytest.mark.parametrize("knobs", KNOBS, ids=lambda k: f"heads{k[0]}_vector{k[1]}")
@pytest.mark.parametrize("pos", [0, 64, 700])
def test_other_layouts_match_numpy(gpu: Gpu, knobs: tuple[int, int], pos: int) -> None:
    check_against_numpy(gpu, knobs_symbol(*knobs), 16, pos)


@pytest.mark.parametrize("pos", [0, 200])
def test_group_of_four_matches_numpy(gpu: Gpu, pos: int) -> None:
    nh, nkv, d = SMALL
    check_against_numpy(gpu, attention_symbol(16, nh, nkv, d), 16, pos, nh, nkv, d,
                        combine=combine_symbol(16, nh, d))


@pytest.mark.parametrize(("splits", "nh", "nkv", "d", "pos"),
                         [(*case, pos) for case, positions in zip(MERGED, [(5, 700), (0, 200)]) for pos in positions])
def test_last_block_merge_matches_the_separate_kernels(gpu: Gpu, splits: int, nh: int, nkv: int, d: int,
                                                       pos: int) -> None:
    """The merged kernel's o_part, lse and out are the separate kernels' bit for bit, and it
    leaves every count at 0: twice, so that the emulator runs its blocks in both orders (the
    last block to arrive is another one) and the second launch starts from the first's reset."""
    rng = np.random.default_rng(pos + splits)
    page_table = np.concatenate([rng.permutation(N_PAGES)[: N_PAGES - 8], rng.integers(0, N_PAGES, MP - N_PAGES + 8)])
    page_table = page_table.astype(np.int32)
    q = rng.standard_normal((nh, d), dtype=np.float32)
    inputs = [gpu.tensor(a) for a in (q, *paged_cache(rng, page_table, pos, nkv, d), page_table,
                                      np.array([pos], np.int32))]
    o_part, lse, out = gpu.poisoned((nh, splits, d)), gpu.poisoned((nh, splits)), gpu.poisoned((nh * d,))
    gpu(attention_symbol(splits, nh, nkv, d), *inputs, o_part, lse)
    gpu(combine_symbol(splits, nh, d), o_part, lse, out)
    arrivals = gpu.tensor(np.zeros(nkv, np.int32))
    for _ in range(2):
        merged = gpu.poisoned((nh, splits, d)), gpu.poisoned((nh, splits)), gpu.poisoned((nh * d,))
        gpu(merged_symbol(splits, nh, nkv, d), *inputs, arrivals, *merged)
        for got, want in zip(merged, (o_part, lse, out)):
            np.testing.assert_array_equal(got.numpy(), want.numpy())
        np.testing.assert_array_equal(arrivals.numpy(), np.zeros(nkv, np.int32))
    oracle = A.decode_attention_reference(q, *(a.numpy() for a in inputs[1:4]), pos)
    np.testing.assert_allclose(out.numpy(), oracle, rtol=1e-4, atol=2e-5)


if __name__ == "__main__":
    main(__doc__, "attention", kernels_module)
