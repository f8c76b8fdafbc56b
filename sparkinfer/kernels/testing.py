"""Inputs and checks for kernel tests and benchmarks (CPU here, GPU on the device machine).

Quantized weights are random *bytes* with finite f16 scale fields: every bit pattern of the
quant and packed-scale fields is a valid block, so this exercises all codes and all
scale/min combinations, and it costs nothing at full model size (quantizing 200M weights in
numpy would take minutes).
"""

import numpy as np
import numpy.typing as npt
from gguf import GGMLQuantizationType

from sparkinfer import quant
from sparkinfer.quant import kquants
from sparkinfer.quant import layouts as L

_T = GGMLQuantizationType

# Offsets of the f16 fields of each block type; random bytes there could be inf or NaN.
_F16_FIELDS: dict[GGMLQuantizationType, tuple[L.Span, ...]] = {
    _T.Q4_K: (L.Q4_K_D, L.Q4_K_DMIN),
    _T.Q5_K: (L.Q5_K_D, L.Q5_K_DMIN),
    _T.Q6_K: (L.Q6_K_D,),
    _T.Q8_0: (L.Q8_0_D,),
}
_FLOAT_TYPES = (_T.F32, _T.F16, _T.BF16)


def random_weights(
    ggml_type: int, shape: tuple[int, ...], rng: np.random.Generator
) -> npt.NDArray[np.uint8]:
    """Random valid GGUF data for a weight of `shape` (numpy order): uint8[..., row_bytes];
    for the weight format Q6_K_PLANAR (`kernels.gemv`), random Q6_K data re-laid out."""
    if int(ggml_type) == L.Q6_K_PLANAR:
        return kquants.q6_k_to_planar(random_weights(_T.Q6_K, shape, rng))
    fmt = quant.quant_format(ggml_type)
    if ggml_type in _FLOAT_TYPES:
        return fmt.quantize(rng.standard_normal(shape, dtype=np.float32) * 0.02)
    rows, cols = shape[:-1], shape[-1]
    n_blocks = int(np.prod(rows, dtype=np.int64)) * (cols // fmt.block_size)
    fmt.row_bytes(cols)  # raises on a row that does not divide into blocks
    blocks = rng.integers(0, 256, (n_blocks, fmt.type_size), dtype=np.uint8)
    for span in _F16_FIELDS[ggml_type]:
        # Magnitudes that make weights of order 1e-2, like a trained model's; signed, since
        # llama.cpp writes negative d for Q6_K and Q8_0.
        d = (rng.uniform(-1.0, 1.0, n_blocks) * 2e-4).astype(np.float16)
        blocks[:, span.start : span.stop] = d.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(*rows, fmt.row_bytes(cols))


def assert_gemv_close(
    y: np.ndarray, y_ref: np.ndarray, magnitude: np.ndarray, rtol: float = 2e-5
) -> None:
    """Every element within rtol of `magnitude` = |W| . |x| (the sum of absolute terms).

    Relative to the terms rather than to y, since y is a sum of cancelling terms; fp32
    accumulation of K terms stays far inside 2e-5 of that for K up to tens of thousands.
    NaN anywhere (an element the kernel never wrote) fails.
    """
    if y.shape != y_ref.shape:
        raise AssertionError(f"shape {y.shape} != reference {y_ref.shape}")
    err = np.abs(y.astype(np.float64) - y_ref.astype(np.float64))
    bound = rtol * magnitude + 1e-30
    bad = ~(err <= bound)
    if bad.any():
        idx = np.argwhere(bad)[:5].tolist()
        worst = float(np.nanmax(err / bound)) if not np.isnan(err).all() else float("nan")
        raise AssertionError(
            f"{int(bad.sum())} of {y.size} elements off (first at {idx}); "
            f"worst error/bound {worst:.3g}; NaNs in output: {int(np.isnan(y).sum())}"
        )


def assert_q8_1_close(aq: np.ndarray, ad: np.ndarray, as_: np.ndarray, y_ref: np.ndarray,
                      magnitude: np.ndarray, rtol: float = 2e-5) -> None:
    """A kernel's int8 blocks of 32 (aq words, ad scales, as sums) of a float result whose oracle
    is y_ref: the kernel's y is within `assert_gemv_close`'s bound of y_ref, and its quantization
    within half a step of y (so d̂ · q within half a step plus that bound of y_ref); each scale is
    max|y| / 127 of its block (within the bound's share); each sum is d · sum(q)."""
    q = np.ascontiguousarray(aq).view(np.int8).astype(np.float64).reshape(*ad.shape, 32)
    blocks = y_ref.astype(np.float64).reshape(*ad.shape, 32)
    bound = rtol * magnitude.astype(np.float64).reshape(*ad.shape, 32) + 1e-30
    d = ad.astype(np.float64)
    np.testing.assert_array_less(np.abs(d - np.abs(blocks).max(axis=-1) / 127.0),
                                 bound.max(axis=-1) / 127.0 + 1e-7 * d + 1e-30)
    err = np.abs(q * d[..., None] - blocks)
    bad = ~(err <= 0.5 * d[..., None] * (1 + 1e-6) + bound)
    if bad.any():
        raise AssertionError(f"{int(bad.sum())} of {bad.size} int8 values more than half a step off "
                             f"(first at {np.argwhere(bad)[:5].tolist()})")
    np.testing.assert_allclose(as_, (d * q.sum(axis=-1)).astype(np.float32), rtol=1e-5, atol=1e-6)


def rope_angle_error_bound(x_normed: np.ndarray, pos: int) -> np.ndarray:
    """The kernel's RoPE angles are float32 (pos * f, f = theta^(-2i/D) each rounded once), the
    oracle's float64: ~pos * 2^-23 rad apart, times the magnitude of the rotated pair."""
    half = x_normed.shape[-1] // 2
    pair = np.abs(x_normed) + np.abs(np.roll(x_normed, half, axis=-1))
    return pair * (pos * 2.0**-22 + 2.0**-20)


def assert_qk_norm_rope_kv_append_close(
    q_rot: np.ndarray, k_cache_out: np.ndarray, v_cache_out: np.ndarray, inputs: tuple[np.ndarray, ...],
    pos: int, eps: float, theta: float, *, q_rtol: float, q_atol: float = 0.0,
) -> None:
    """`qk_norm_rope_kv_append`'s outputs against its numpy oracle. `inputs` are the kernel's
    (q, k, v, q_norm_w, k_norm_w, page_table, k_cache, v_cache) as given to it. q and the new
    k slot within the angle bound (k plus an fp16 ulp), v's slot exactly its fp16 value, and
    every other cache entry unchanged, bit for bit."""
    from sparkinfer.kernels.rope import qk_norm_rope_kv_append_reference
    from sparkinfer.reference.qwen3moe import rms_norm

    q, k, v, q_norm_w, k_norm_w, page_table, k_cache, v_cache = inputs
    n_pages, page_size, n_kv, head_dim = k_cache.shape
    q_ref, k_ref, v_ref = qk_norm_rope_kv_append_reference(
        q, k, v, q_norm_w, k_norm_w, pos, page_table, k_cache, v_cache, eps, theta
    )
    q_normed = rms_norm(q.reshape(-1, head_dim), q_norm_w, eps)
    k_normed = rms_norm(k.reshape(n_kv, head_dim), k_norm_w, eps)
    q_err = np.abs(q_rot - q_ref)
    assert (q_err <= rope_angle_error_bound(q_normed, pos) + q_rtol * np.abs(q_ref) + q_atol).all(), q_err.max()

    page, slot = page_table[pos // page_size], pos % page_size
    k_slot, k_slot_ref = k_cache_out[page, slot].astype(np.float64), k_ref[page, slot].astype(np.float64)
    k_bound = rope_angle_error_bound(k_normed, pos) + 2.0**-10 * np.abs(k_slot_ref) + 2.0**-24
    assert (np.abs(k_slot - k_slot_ref) <= k_bound).all()
    np.testing.assert_array_equal(v_cache_out[page, slot], v_ref[page, slot])
    others = np.ones((n_pages, page_size), bool)
    others[page, slot] = False
    np.testing.assert_array_equal(k_cache_out[others].view(np.uint16), k_cache[others].view(np.uint16))
    np.testing.assert_array_equal(v_cache_out[others].view(np.uint16), v_cache[others].view(np.uint16))
