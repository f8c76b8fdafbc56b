"""The CUDA emulator's builtins against what CUDA specifies for them (shuffles, barriers, WMMA),
on hand-written kernels; the inline PTX it rewrites (ldmatrix, mma.sync m16n8k16) against the
PTX ISA's fragment layouts, on kernels TVM generates from T.ptx_legacy calls; and its failure
modes: a barrier no thread can complete is reported, not waited on; a kernel parameter with no
argument is named; an ldmatrix row address off 16 bytes is reported."""

from pathlib import Path

import numpy as np
import pytest

from cuda_emulator import EmulationError, Launch, _compile, _signature

_PREAMBLE = '#include <cuda.h>\n#include <cuda_fp16.h>\n#include <mma.h>\n'


def _run(tmp_path: Path, source: str, kernel: str, grid: int, threads: int, *arrays: np.ndarray) -> None:
    """Compiles `source` (one kernel taking `arrays` as pointers) and runs it on them in place."""
    import ctypes

    code = _PREAMBLE + source
    launch = Launch(kernel, _signature(code, kernel), {})
    library = _compile(code, [launch], tmp_path, kernel)
    entry = getattr(library, f"emulate_{kernel}")
    entry.restype = ctypes.c_char_p
    words = (ctypes.c_uint64 * len(arrays))(*(a.ctypes.data for a in arrays))
    error = entry(words, (ctypes.c_uint32 * 6)(grid, 1, 1, threads, 1, 1))
    if error:
        raise EmulationError(error.decode())


SHUFFLES = r'''
extern "C" __global__ void __launch_bounds__(64) shuffles_kernel(float* __restrict__ x_ptr, float* __restrict__ out_ptr) {
  float v = x_ptr[blockIdx.x * 64 + threadIdx.x];
  float down = __shfl_down_sync(__activemask(), v, 3, 32);
  float up = __shfl_up_sync(__activemask(), v, 2, 8);
  float xor_ = __shfl_xor_sync(__activemask(), v, 5, 32);
  float bcast = __shfl_sync(__activemask(), v, 7, 16);
  __shared__ float total[1];
  if (threadIdx.x == 0) total[0] = 0.0f;
  __syncthreads();
  for (int t = 0; t < 64; ++t) { if (threadIdx.x == t) total[0] += v; __syncthreads(); }
  float* o = out_ptr + (blockIdx.x * 64 + threadIdx.x) * 5;
  o[0] = down; o[1] = up; o[2] = xor_; o[3] = bcast; o[4] = total[0];
}
'''


def test_shuffles_and_barriers_follow_cuda(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(3 * 64).astype(np.float32)
    out = np.full((3 * 64, 5), np.nan, np.float32)
    _run(tmp_path, SHUFFLES, "shuffles_kernel", 3, 64, x, out)
    t = np.arange(3 * 64)
    lane = t % 32
    warp_base = t - lane
    # down: lane + 3 within the warp, else the lane's own value; up: lane - 2 within groups
    # of 8, else its own; xor: lane ^ 5; shfl: lane 7 of each group of 16
    want_down = np.where(lane + 3 < 32, x[np.minimum(t + 3, len(x) - 1)], x)
    want_up = np.where(lane % 8 >= 2, x[t - 2], x)
    want_xor = x[warp_base + (lane ^ 5)]
    want_bcast = x[warp_base + (lane // 16) * 16 + 7]
    want_total = np.repeat(x.reshape(3, 64).sum(axis=1, dtype=np.float32), 64)
    np.testing.assert_array_equal(out[:, 0], want_down)
    np.testing.assert_array_equal(out[:, 1], want_up)
    np.testing.assert_array_equal(out[:, 2], want_xor)
    np.testing.assert_array_equal(out[:, 3], want_bcast)
    np.testing.assert_allclose(out[:, 4], want_total, rtol=1e-6)


WMMA = r'''
extern "C" __global__ void __launch_bounds__(64) wmma_kernel(half* __restrict__ a_ptr, half* __restrict__ b_ptr, float* __restrict__ c_ptr) {
  // warp w: C[w] = A (16x32, row-major) times B (32x16, stored column-major), two K steps
  int w = threadIdx.x / 32;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc;
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, half, nvcuda::wmma::row_major> a;
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, half, nvcuda::wmma::col_major> b;
  nvcuda::wmma::fill_fragment(acc, 0.5f);
  for (int k = 0; k < 2; ++k) {
    nvcuda::wmma::load_matrix_sync(a, a_ptr + w * 512 + k * 16, 32);
    nvcuda::wmma::load_matrix_sync(b, b_ptr + w * 512 + k * 16, 32);
    nvcuda::wmma::mma_sync(acc, a, b, acc);
  }
  nvcuda::wmma::store_matrix_sync(c_ptr + w * 256, acc, 16, nvcuda::wmma::mem_row_major);
}
'''


def test_wmma_is_a_matrix_product(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((2, 16, 32)).astype(np.float16)
    b_t = rng.standard_normal((2, 16, 32)).astype(np.float16)  # B column-major: B^T row-major
    c = np.full((2, 16, 16), np.nan, np.float32)
    _run(tmp_path, WMMA, "wmma_kernel", 1, 64, a, b_t, c)
    want = a.astype(np.float32) @ b_t.astype(np.float32).transpose(0, 2, 1) + 0.5
    np.testing.assert_allclose(c, want, rtol=1e-5, atol=1e-5)


NEIGHBOUR = r'''
extern "C" __global__ void __launch_bounds__(64) neighbour_kernel(float* __restrict__ x_ptr, float* __restrict__ out_ptr) {
  __shared__ float tile[64];
  tile[threadIdx.x] = x_ptr[blockIdx.x * 64 + threadIdx.x];
  BARRIER
  out_ptr[blockIdx.x * 64 + threadIdx.x] = tile[(threadIdx.x + 1) % 64] + tile[(threadIdx.x + 63) % 64];
}
'''


def test_a_missing_barrier_gives_wrong_results(tmp_path: Path) -> None:
    """Each thread reads its neighbours' shared-memory writes: right with the barrier; without
    it, wrong in the blocks whose threads run in the order that reads before the write."""
    x = np.random.default_rng(2).standard_normal(2 * 64).astype(np.float32)
    tiles = x.reshape(2, 64)
    want = (np.roll(tiles, -1, axis=1) + np.roll(tiles, 1, axis=1)).reshape(-1)
    for barrier, correct in (("__syncthreads();", True), ("", False)):
        out = np.full(2 * 64, np.nan, np.float32)
        _run(tmp_path / f"b{int(correct)}", NEIGHBOUR.replace("BARRIER", barrier), "neighbour_kernel", 2, 64, x, out)
        assert np.array_equal(out, want) == correct


STUCK = r'''
extern "C" __global__ void __launch_bounds__(32) stuck_kernel(float* __restrict__ out_ptr) {
  // lanes 16..31 never come to a shuffle whose mask names them
  if (threadIdx.x < 16) out_ptr[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.0f, 1, 32);
}
'''


def test_a_barrier_no_thread_can_complete_is_reported(tmp_path: Path) -> None:
    out = np.zeros(32, np.float32)
    with pytest.raises(EmulationError, match="deadlock: every live thread waits at a barrier"):
        _run(tmp_path, STUCK, "stuck_kernel", 1, 32, out)


def _ptx_kernel(shift: int = 0):  # noqa: ANN202
    """One warp on TVM's codegen of T.ptx_legacy.ldmatrix and mma (the register attention's,
    kernels/prefill_attention.py): m (16 x 16 f16) into shared memory; lane l's ldmatrix x4 and
    x4 .trans of it (row l % 16 from column 8 (l / 16) + `shift`) into plain[l] and trans[l];
    then d = m b + c (b 16 x 8 row-major [k, n], by ldmatrix x2 .trans; c and d in the
    accumulator layout) into d."""
    from tvm.script import tirx as T

    @T.prim_func
    def ptx(m: T.Buffer((16, 16), "float16"), b: T.Buffer((16, 8), "float16"), c: T.Buffer((16, 8), "float32"),
            plain: T.Buffer((32, 8), "float16"), trans: T.Buffer((32, 8), "float16"),
            d: T.Buffer((16, 8), "float32")):
        T.func_attr({"global_symbol": "ptx", "tirx.noalias": True})
        for lane in T.thread_binding(32, thread="threadIdx.x"):
            tile = T.alloc_buffer((16 * 16 + 16 * 8,), "float16", scope="shared")
            frag = T.alloc_buffer((8,), "float16", scope="local")
            frag_t = T.alloc_buffer((8,), "float16", scope="local")
            frag_b = T.alloc_buffer((4,), "float16", scope="local")
            acc = T.alloc_buffer((4,), "float32", scope="local")
            for i in T.unroll(8):
                tile[lane * 8 + i] = m[lane // 2, lane % 2 * 8 + i]
            for i in T.unroll(4):
                tile[256 + lane * 4 + i] = b[lane // 2, lane % 2 * 4 + i]
                acc[i] = c[lane // 4 + i // 2 * 8, lane % 4 * 2 + i % 2]
            T.tvm_storage_sync("shared")
            start = lane % 16 * 16 + lane // 16 * 8 + shift
            T.evaluate(T.ptx_legacy.ldmatrix(False, 4, ".b16", frag.data, 0, tile.data, start, dtype="float16"))
            T.evaluate(T.ptx_legacy.ldmatrix(True, 4, ".b16", frag_t.data, 0, tile.data, start, dtype="float16"))
            T.evaluate(T.ptx_legacy.ldmatrix(True, 2, ".b16", frag_b.data, 0, tile.data, 256 + lane % 16 * 8,
                                             dtype="float16"))
            T.evaluate(T.ptx_legacy.mma("m16n8k16", "row", "col", "fp16", "fp16", "fp32", frag.data, 0, frag_b.data,
                                        0, acc.data, 0, False, dtype="float32"))
            for i in T.unroll(8):
                plain[lane, i] = frag[i]
                trans[lane, i] = frag_t[i]
            for i in T.unroll(4):
                d[lane // 4 + i // 2 * 8, lane % 4 * 2 + i % 2] = acc[i]

    import tvm

    from cuda_emulator import EmulatedGpu

    return EmulatedGpu(tvm.IRModule({"ptx": ptx}))


def test_ldmatrix_and_mma_follow_the_ptx_fragment_layouts() -> None:
    rng = np.random.default_rng(3)
    m = np.arange(256, dtype=np.float16).reshape(16, 16)  # every entry its own, exact in f16
    b = rng.standard_normal((16, 8)).astype(np.float16)
    c = rng.standard_normal((16, 8)).astype(np.float32)
    gpu = _ptx_kernel()
    plain, trans = (gpu.tensor(np.full((32, 8), np.nan, np.float16)) for _ in range(2))
    d = gpu.poisoned((16, 8))
    gpu("ptx", gpu.tensor(m), gpu.tensor(b), gpu.tensor(c), plain, trans, d)
    # matrix i (lanes 8i .. 8i + 7's rows) is m's 8 x 8 block (i % 2, i / 2); register i of
    # lane l holds its row l / 4, columns 2 (l % 4) and + 1, or .trans its column l / 4, rows so
    lane, i, h = np.meshgrid(np.arange(32), np.arange(4), np.arange(2), indexing="ij")
    rows, cols = 8 * (i % 2), 8 * (i // 2)
    want_plain = m[rows + lane // 4, cols + 2 * (lane % 4) + h].reshape(32, 8)
    want_trans = m[rows + 2 * (lane % 4) + h, cols + lane // 4].reshape(32, 8)
    np.testing.assert_array_equal(plain.numpy(), want_plain)
    np.testing.assert_array_equal(trans.numpy(), want_trans)
    want_d = m.astype(np.float64) @ b.astype(np.float64) + c
    np.testing.assert_allclose(d.numpy(), want_d, rtol=1e-6, atol=1e-3)  # m's entries reach 255


def test_an_ldmatrix_row_off_16_bytes_is_reported() -> None:
    from cuda_emulator import EmulationError

    gpu = _ptx_kernel(shift=4)  # 8 bytes past each row's chunk
    out = [gpu.tensor(np.zeros(shape, dtype)) for shape, dtype in
           (((32, 8), np.float16), ((32, 8), np.float16), ((16, 8), np.float32))]
    with pytest.raises(EmulationError, match="ldmatrix: a row address is not 16-byte aligned"):
        gpu("ptx", gpu.tensor(np.zeros((16, 16), np.float16)), gpu.tensor(np.zeros((16, 8), np.float16)),
            gpu.tensor(np.zeros((16, 8), np.float32)), *out)


def test_inline_ptx_the_emulator_lacks_is_named() -> None:
    from cuda_emulator import EmulationError, _inline_ptx

    with pytest.raises(EmulationError, match="inline PTX the emulator does not have: cp.async.cg.shared.global"):
        _inline_ptx('__asm__ __volatile__("cp.async.cg.shared.global [%0], [%1], 16;\\n" :: "r"(a), "l"(b));')
