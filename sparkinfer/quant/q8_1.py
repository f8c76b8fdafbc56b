"""The activations' int8 blocks (llama.cpp's q8_1), in numpy: the one definition of how the int8
kernels (`sparkinfer.kernels.gemv_q8`, `moe_q8`) see a float activation vector, which those
kernels' tests and the numpy reference forward (`sparkinfer.reference`, its `int8_inputs`) use.

x f32[..., k] in blocks of 32 becomes
  xq int32[..., k/4]  the int8 values q = round(x * 127 / max|x|), halves away from zero (C's
                      roundf), four to a little-endian word
  xd f32[..., k/32]   d = max|x| / 127 of each block
  xs f32[..., k/32]   d * sum(q) of each block
so that x is approximated by x̂ = d * q (`round_q8_1_reference`).
"""

import numpy as np
import numpy.typing as npt

from sparkinfer.errors import TensorShapeError

Q8_BLOCK = 32  # llama.cpp's QK8_1
Q8_MAX = 127.0


def check_k(k: int, what: str) -> None:
    if k <= 0 or k % Q8_BLOCK != 0:
        raise TensorShapeError(f"{what} needs a length that is a multiple of {Q8_BLOCK}, got {k}")


def quantize_q8_1_reference(
    x: npt.NDArray[np.float32],
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """(xq, xd, xs) of x f32[..., k], in the kernels' float32 operation order."""
    x = np.asarray(x, dtype=np.float32)
    check_k(x.shape[-1], "quantize_q8_1")
    blocks = x.reshape(*x.shape[:-1], -1, Q8_BLOCK)
    amax = np.abs(blocks).max(axis=-1)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(Q8_MAX) / amax, np.float32(0)).astype(np.float32)
    v = blocks * inv[..., None]
    q = (np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))).astype(np.int8)  # halves away from 0
    xq = q.reshape(*x.shape[:-1], -1).view(np.int32)
    xd = (amax / np.float32(Q8_MAX)).astype(np.float32)
    xs = (xd * q.astype(np.int32).sum(axis=-1).astype(np.float32)).astype(np.float32)
    return xq, xd, xs


def dequantize_q8_1(xq: npt.NDArray[np.int32], xd: npt.NDArray[np.float32]) -> np.ndarray:
    """x̂ = d * q, f32[..., k]."""
    q = np.ascontiguousarray(xq).view(np.int8).astype(np.float32)
    q = q.reshape(*xd.shape, Q8_BLOCK)
    return (q * xd[..., None]).reshape(*xd.shape[:-1], -1)


def round_q8_1_reference(x: npt.NDArray[np.float32]) -> np.ndarray:
    """x̂ = d * q of x f32[..., k]: `quantize_q8_1_reference`'s blocks, dequantized."""
    xq, xd, _ = quantize_q8_1_reference(x)
    return dequantize_q8_1(xq, xd)
