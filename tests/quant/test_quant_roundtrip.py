"""Our quantizers: bytes gguf agrees with, error bounds, and better than naive rounding.

Errors are measured through gguf's own dequantizer, so a packing mistake that our
dequantizer mirrored would still show up here.
"""

from typing import Callable

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from sparkinfer.quant import dequantize, quantize

# Relative RMS error of quantize -> dequantize on gaussian weights (std 0.02, like the
# synthetic models), measured over five seeds: F16 0.021%, BF16 0.166%, Q8_0 0.536%,
# Q6_K 1.77-1.78%, Q5_K 3.61-3.62%, Q4_K 7.12-7.15%. Bounds leave ~4% headroom.
MAX_REL_RMS = {
    T.F16: 0.00022,
    T.BF16: 0.00173,
    T.Q8_0: 0.0056,
    T.Q6_K: 0.0185,
    T.Q5_K: 0.0375,
    T.Q4_K: 0.0740,
}


def type_name(t: T) -> str:
    return t.name


def rel_rms(approx: np.ndarray, x: np.ndarray) -> float:
    return float(np.sqrt(np.mean((approx - x) ** 2) / np.mean(x**2)))


def roundtrip_with_gguf(t: T, x: np.ndarray) -> np.ndarray:
    return gguf.quants.dequantize(quantize(t, x), t)


@pytest.fixture
def weights(rng: np.random.Generator) -> np.ndarray:
    return (0.02 * rng.standard_normal((64, 4096))).astype(np.float32)


@pytest.mark.parametrize("t", list(MAX_REL_RMS), ids=type_name)
def test_roundtrip_error_bound(weights: np.ndarray, t: T) -> None:
    approx = roundtrip_with_gguf(t, weights)
    np.testing.assert_array_equal(approx, dequantize(t, quantize(t, weights), weights.shape))
    assert rel_rms(approx, weights) < MAX_REL_RMS[t]


def naive_min_max(x: np.ndarray, nmax: int) -> np.ndarray:
    """Per 32-weight min/max rounding with exact float scales: no search, no scale storage."""
    sub = x.reshape(-1, 32)
    lo = np.minimum(sub.min(axis=1, keepdims=True), 0)
    step = (sub.max(axis=1, keepdims=True) - lo) / nmax
    return (np.clip(np.rint((sub - lo) / step), 0, nmax) * step + lo).reshape(x.shape)


def naive_max_abs(x: np.ndarray) -> np.ndarray:
    """Per 16-weight symmetric 6-bit rounding with an exact float scale."""
    sub = x.reshape(-1, 16)
    step = np.abs(sub).max(axis=1, keepdims=True) / 31
    return (np.clip(np.rint(sub / step), -32, 31) * step).reshape(x.shape)


# Measured ratios (ours / naive) on gaussian data: Q4_K 0.913, Q5_K 0.955, Q6_K 0.923 --
# despite storing scales at 6/8 bits where the naive baselines keep them exact.
@pytest.mark.parametrize(
    ("t", "naive", "max_ratio"),
    [
        (T.Q4_K, lambda x: naive_min_max(x, 15), 0.94),
        (T.Q5_K, lambda x: naive_min_max(x, 31), 0.975),
        (T.Q6_K, naive_max_abs, 0.95),
    ],
    ids=["Q4_K", "Q5_K", "Q6_K"],
)
def test_scale_search_beats_naive_rounding(
    weights: np.ndarray, t: T, naive: Callable[[np.ndarray], np.ndarray], max_ratio: float
) -> None:
    ours = rel_rms(roundtrip_with_gguf(t, weights), weights)
    assert ours < max_ratio * rel_rms(naive(weights), weights)


def test_q4_k_beats_naive_on_heavy_tails(rng: np.random.Generator) -> None:
    # Student-t, 3 dof: outliers are where min/max rounding wastes most levels (ratio ~0.92).
    x = rng.standard_t(3, size=(32, 4096)).astype(np.float32)
    assert rel_rms(roundtrip_with_gguf(T.Q4_K, x), x) < 0.95 * rel_rms(naive_min_max(x, 15), x)


@pytest.mark.parametrize("t", [T.F16, T.BF16, T.Q8_0], ids=type_name)
def test_bytes_match_ggml_reference_quantizer(rng: np.random.Generator, t: T) -> None:
    # gguf ports ggml's reference quantizers for these types bit-exactly.
    x = rng.standard_normal((16, 256)).astype(np.float32)
    # Q8_0 rounds ties away from zero: a block whose max is 127 has scale 1, so k + 0.5 are ties.
    x[0, :32] = np.arange(-15.5, 16.5, dtype=np.float32)
    x[0, 31] = 127
    expected = gguf.quants.quantize(x, t).view(np.uint8).reshape(16, -1)
    np.testing.assert_array_equal(quantize(t, x), expected)


def test_bf16_special_values_match_ggml() -> None:
    # NaN stays NaN, rounding carries into inf, largest finite, denormal, ties to even.
    x = np.array(
        [np.nan, np.inf, -np.inf, np.finfo(np.float32).max, 1e-40, 1.00390625, 1.01171875],
        np.float32,
    )
    expected = gguf.quants.quantize(x, T.BF16).view(np.uint8)
    np.testing.assert_array_equal(quantize(T.BF16, x), expected)


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("t", [T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K], ids=type_name)
def test_degenerate_rows(t: T) -> None:
    x = np.zeros((4, 512), np.float32)
    x[1] = 0.3  # constant positive: the min clamps to 0
    x[2] = -0.3  # constant negative: zero span
    x[3, 256:] = np.linspace(-1, 2, 256)  # one all-zero super-block next to a live one
    approx = roundtrip_with_gguf(t, x)
    assert np.all(approx[0] == 0) and np.all(approx[3, :256] == 0)
    np.testing.assert_allclose(approx[1:3], x[1:3], atol=1e-3)
    assert rel_rms(approx[3], x[3]) < 2 * MAX_REL_RMS[t]
