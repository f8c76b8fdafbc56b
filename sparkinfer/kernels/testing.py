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
    ggml_type: GGMLQuantizationType, shape: tuple[int, ...], rng: np.random.Generator
) -> npt.NDArray[np.uint8]:
    """Random valid GGUF data for a weight of `shape` (numpy order): uint8[..., row_bytes]."""
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
