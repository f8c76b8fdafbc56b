"""Q8_0: one f16 scale and 32 int8 quants per block (layout in layouts.py)."""

import numpy as np

from ._arrays import F32, U8
from .layouts import Q8_0_D, Q8_0_QS, Q8_0_TYPE_SIZE


def dequantize_q8_0(blocks: U8) -> F32:
    d = blocks[:, Q8_0_D.start : Q8_0_D.stop].view(np.float16).astype(np.float32)
    qs = blocks[:, Q8_0_QS.start : Q8_0_QS.stop].view(np.int8).astype(np.float32)
    return qs * d


def quantize_q8_0(x: F32) -> U8:
    # Max-abs scaling as in ggml's reference quantizer; the quants are rounded against the
    # f32 scale (not its f16 rounding) so that the bytes match llama.cpp's exactly.
    d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
    inv_d = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    out = np.empty((x.shape[0], Q8_0_TYPE_SIZE), dtype=np.uint8)
    out[:, Q8_0_D.start : Q8_0_D.stop] = d.astype(np.float16).view(np.uint8)
    qs = _round_half_away(x * inv_d).astype(np.int8)
    out[:, Q8_0_QS.start : Q8_0_QS.stop] = qs.view(np.uint8)
    return out


def _round_half_away(v: F32) -> F32:
    """C's roundf: ties go away from zero (np.rint sends them to even)."""
    truncated = np.trunc(v)
    is_tie = np.abs(v - truncated) == np.float32(0.5)
    return np.where(is_tie, truncated + np.sign(v), np.rint(v))
