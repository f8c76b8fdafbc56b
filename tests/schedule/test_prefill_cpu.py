"""The CPU rules of the T-token step (schedule/prefill_cpu.py): each scheduled kernel, built for
LLVM, against its numpy reference on fresh random inputs, and the rules' spaces."""

import numpy as np
import pytest
import tvm
from gguf import GGMLQuantizationType as T

from sparkinfer.compiler.targets import target_for
from sparkinfer.errors import TensorShapeError
from sparkinfer.kernels import gemm, gemv, gemv_q8, moe_chunk, prefill_attention
from sparkinfer.kernels.testing import assert_gemv_close, random_weights
from sparkinfer.kernels.use import factory_args, kernel_factory
from sparkinfer.schedule.arch import arch_facts
from sparkinfer.schedule.prefill_cpu import GemmCpuKnobs, GemmCpuRule
from sparkinfer.schedule.space import ScheduleError, kernel_use, schedule_kernel

CPU = arch_facts("cpu")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261205)


def run_scheduled(family: str, factory: str, args: tuple, *arrays: np.ndarray, n_out: int = 1,
                  knobs: object = None) -> list[np.ndarray]:
    use = kernel_use(family, factory, *args)
    func = schedule_kernel(kernel_factory(family, factory)(*factory_args(use)), use, CPU, knobs)
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target_for("cpu"))
    tensors = [tvm.runtime.tensor(a, tvm.cpu()) for a in arrays]
    lib["main"](*tensors)
    return [t.numpy() for t in tensors[len(arrays) - n_out:]]


@pytest.mark.parametrize("t, n, rows, knobs", [(T.Q4_K, 48, 5, None), (T.Q4_K, 48, 16, None),
                                               (T.Q6_K, 32, 6, GemmCpuKnobs(32, 2)), (T.Q8_0, 37, 8, None),
                                               (gemv.Q6_K_PLANAR, 32, 6, GemmCpuKnobs(32, 2)),
                                               (T.F32, 16, 12, GemmCpuKnobs(4, 4))],
                         ids=lambda v: getattr(v, "name", str(v)))
def test_scheduled_gemm_matches_numpy(rng: np.random.Generator, t: T, n: int, rows: int,
                                      knobs: GemmCpuKnobs | None) -> None:
    k = 256
    data = random_weights(t, (n, k), rng)
    x = rng.standard_normal((rows, k), dtype=np.float32)
    (y,) = run_scheduled("gemm", "gemm", (t, rows, n, k), gemv.weight_view(t, data), x,
                         np.full((rows, n), np.nan, np.float32), knobs=knobs)
    magnitude = np.abs(x).astype(np.float64) @ np.abs(gemv.dequantize_rows(t, data, k)).T
    assert_gemv_close(y, gemm.gemm_reference(t, data, x), magnitude)


def test_gemm_tiles_divide_the_outputs_and_rows() -> None:
    use = kernel_use("gemm", "gemm", T.Q4_K, 12, 37, 256)
    assert GemmCpuRule().space(use, CPU) == {"tile_n": (1,), "rows": (1, 2, 4)}
    assert GemmCpuRule().default(use, CPU) == GemmCpuKnobs(1, 4)
    with pytest.raises(ScheduleError, match="tile_n=16 is outside the space"):
        schedule_kernel(gemm.gemm(T.Q4_K, 12, 37, 256), use, CPU, GemmCpuKnobs(16, 4))
    with pytest.raises(ScheduleError, match="rows=8 is outside the space"):
        schedule_kernel(gemm.gemm(T.Q4_K, 12, 37, 256), use, CPU, GemmCpuKnobs(1, 8))
    assert GemmCpuRule().default(kernel_use("gemm", "gemm", T.Q4_K, 128, 512, 256), CPU) == GemmCpuKnobs(16, 8)


def test_scheduled_grouped_gemm_matches_numpy(rng: np.random.Generator) -> None:
    experts, rows, n, k, tokens = 4, 14, 32, 256, 7
    data = random_weights(T.Q4_K, (experts, n, k), rng)
    # expert 2 chose no row; expert 3 has a row count off the ROW_BLOCK
    offsets = np.array([0, 5, 8, 8, 14], np.int32)
    row_token = rng.integers(0, tokens, rows).astype(np.int32)
    x = rng.standard_normal((tokens, k), dtype=np.float32)
    (y,) = run_scheduled("moe_chunk", "grouped_gemm", (T.Q4_K, experts, rows, n, k, tokens, True),
                         gemv.weight_view(T.Q4_K, data), offsets, row_token, x, np.full((rows, n), np.nan, np.float32))
    for e in range(experts):
        for r in range(offsets[e], offsets[e + 1]):
            want = gemv.gemv_reference(T.Q4_K, data[e], x[row_token[r]])
            np.testing.assert_allclose(y[r], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert moe_chunk.ROW_BLOCK > 1 and (offsets[4] - offsets[3]) % moe_chunk.ROW_BLOCK


def test_scheduled_silu_mul_matches_numpy(rng: np.random.Generator) -> None:
    rows, n = 6, 48
    gate = 8 * rng.standard_normal((rows, n), dtype=np.float32)  # far into both tails of the sigmoid
    up = rng.standard_normal((rows, n), dtype=np.float32)
    (act,) = run_scheduled("moe_chunk", "silu_mul", (rows, n), gate, up, np.full((rows, n), np.nan, np.float32))
    g = gate.astype(np.float64)
    np.testing.assert_allclose(act, g / (1 + np.exp(-g)) * up, rtol=2e-6, atol=1e-30)


def test_scheduled_round_q8_1_rows_is_the_int8_blocks_values(rng: np.random.Generator) -> None:
    rows, k = 5, 96
    x = rng.standard_normal((rows, k), dtype=np.float32)
    x[1, 32:64] = 0.0  # an all-zero block stays 0 (no division by zero)
    x[2, :32] = np.float32(0.5) * np.arange(32, dtype=np.float32)  # max 15.5: q = 127 x / 15.5, halves on 0.25 steps
    x[3, 64] = 1e30  # one huge value: its block's others round to 0
    (got,) = run_scheduled("gemv_q8", "round_q8_1_rows", (rows, k), x, np.full((rows, k), np.nan, np.float32))
    # bit for bit what quantize_q8_1's blocks hold, as the int8 GEMVs read them
    np.testing.assert_array_equal(got, gemv_q8.round_q8_1_reference(x))
    xq, xd, _ = gemv_q8.quantize_q8_1_reference(x)
    np.testing.assert_array_equal(got, gemv_q8.dequantize_q8_1(xq, xd))
    assert np.all(got[1, 32:64] == 0) and np.count_nonzero(got[3, 64:]) == 1
    assert np.all(np.abs(got - x) <= 0.5 * np.repeat(xd, 32, axis=-1) * (1 + 1e-6))


def test_round_q8_1_rows_refuses_a_width_off_the_blocks() -> None:
    with pytest.raises(TensorShapeError, match="round_q8_1_rows needs a length that is a multiple of 32, got 48"):
        gemv_q8.round_q8_1_rows(4, 48)


# sharpness scales the queries: at 8 the scores spread over ~+-60, so a later key tile's max
# rescales the running state by factors far from 1 (and some weights fall under exp's floor)
@pytest.mark.parametrize("pos, n_valid, sharpness", [(0, 6, 1.0), (70, 4, 1.0), (101, 6, 8.0)])
def test_scheduled_causal_attention_matches_numpy(rng: np.random.Generator, pos: int, n_valid: int,
                                                  sharpness: float) -> None:
    rows, nh, nkv, d, p, mp, n_pages = 6, 4, 2, 64, 16, 8, 9
    q = sharpness * rng.standard_normal((rows, nh, d), dtype=np.float32)
    table = rng.permutation(n_pages)[:mp].astype(np.int32)
    kc = rng.standard_normal((n_pages, p, nkv, d)).astype(np.float16)
    vc = rng.standard_normal((n_pages, p, nkv, d)).astype(np.float16)
    (out,) = run_scheduled("prefill_attention", "causal_prefill_attention", (rows, nh, nkv, d, p, mp),
                           q, kc, vc, table, np.array([pos], np.int32), np.array([n_valid], np.int32),
                           np.full((rows, nh * d), np.nan, np.float32))
    want = prefill_attention.causal_prefill_attention_reference(q, kc, vc, table, pos, n_valid)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)


def test_scheduled_causal_attention_with_half_operands_matches_numpy(rng: np.random.Generator) -> None:
    """The GPUs' form scheduled for the CPU; sharp scores over two 64-key tiles (the second
    tile's max rescales the first's sums)."""
    rows, nh, nkv, d, p, mp, n_pages, pos, n_valid = 6, 4, 2, 64, 16, 8, 9, 101, 6
    q = 8 * rng.standard_normal((rows, nh, d), dtype=np.float32)
    table = rng.permutation(n_pages)[:mp].astype(np.int32)
    kc = rng.standard_normal((n_pages, p, nkv, d)).astype(np.float16)
    vc = rng.standard_normal((n_pages, p, nkv, d)).astype(np.float16)
    (out,) = run_scheduled("prefill_attention", "causal_prefill_attention", (rows, nh, nkv, d, p, mp, True),
                           q, kc, vc, table, np.array([pos], np.int32), np.array([n_valid], np.int32),
                           np.full((rows, nh * d), np.nan, np.float32))
    want = prefill_attention.causal_prefill_attention_half_reference(q, kc, vc, table, pos, n_valid)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
