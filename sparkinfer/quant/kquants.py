"""Q4_K, Q5_K and Q6_K: numpy dequantizers and quantizers over whole arrays of blocks.

Field offsets and bit arrangements are documented in layouts.py. The quantizers follow
llama.cpp's reference (no importance matrix) recipe: search a scale (and min) per
sub-block, store those at 6 or 8 bits against an f16 super-block scale, then re-round
every weight against the scale that was actually stored.
"""

import numpy as np
import numpy.typing as npt

from sparkinfer.errors import TensorShapeError
from ._arrays import F16, F32, U8
from .layouts import (
    Q4_K_D, Q4_K_DMIN, Q4_K_QS, Q4_K_SCALES, Q4_K_SUB_BLOCK, Q4_K_TYPE_SIZE,
    Q5_K_D, Q5_K_DMIN, Q5_K_QH, Q5_K_QS, Q5_K_SCALES, Q5_K_TYPE_SIZE,
    Q6_K_D, Q6_K_QH, Q6_K_QL, Q6_K_SCALES, Q6_K_SUB_BLOCK, Q6_K_TYPE_SIZE,
    PLANAR_Q6_K_HALF_QH, PLANAR_Q6_K_HALF_QL, PLANAR_Q6_K_RUN, QK_K, Span, q6_k_planar_row_bytes,
)
from .scale_search import search_scale_min, search_symmetric_scale

_N_SUB = QK_K // Q4_K_SUB_BLOCK  # 8 sub-blocks of 32 in Q4_K and Q5_K alike
_N_SUB_Q6 = QK_K // Q6_K_SUB_BLOCK  # 16 sub-blocks in Q6_K
_SIX_BITS = 63


def _field(blocks: U8, span: Span) -> U8:
    return blocks[:, span.start : span.stop]


def _f16_field(blocks: U8, span: Span) -> F32:
    """An f16 field as float32 of shape [n_blocks, 1], ready to broadcast."""
    return _field(blocks, span).view(np.float16).astype(np.float32)


def unpack_scale_min(packed: U8) -> tuple[U8, U8]:
    """The 12 packed bytes of Q4_K/Q5_K -> (scales, mins), each uint8[n_blocks, 8] in 0..63.

    Bytes 0..3 hold scales 0..3 and bytes 4..7 mins 0..3 in their low 6 bits; bytes 8..11
    hold the low nibbles of scales 4..7 (low) and mins 4..7 (high), whose top 2 bits sit in
    the spare top bits of bytes 0..3 (scales) and 4..7 (mins).
    """
    lo_sc, lo_m, nibbles = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    sc = np.concatenate([lo_sc & 63, (nibbles & 0xF) | ((lo_sc >> 6) << 4)], axis=1)
    m = np.concatenate([lo_m & 63, (nibbles >> 4) | ((lo_m >> 6) << 4)], axis=1)
    return sc, m


def pack_scale_min(sc: U8, m: U8) -> U8:
    """Inverse of unpack_scale_min."""
    lo_sc = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    lo_m = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    nibbles = (sc[:, 4:8] & 0xF) | ((m[:, 4:8] & 0xF) << 4)
    return np.concatenate([lo_sc, lo_m, nibbles], axis=1)


def _nibbles_to_sub_blocks(qs: U8) -> U8:
    """Q4_K/Q5_K QS bytes [n, 128] -> low 4 bits of each weight [n, 8, 32]."""
    qs = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(-1, _N_SUB, Q4_K_SUB_BLOCK)


def _sub_blocks_to_nibbles(q: U8) -> U8:
    """Inverse of _nibbles_to_sub_blocks for q in 0..15, shape [n, 8, 32]."""
    pairs = q.reshape(-1, 4, 2, 32)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, QK_K // 2)


def _affine_dequantize(blocks: U8, d: Span, dmin: Span, scales: Span, q: U8) -> F32:
    sc, m = unpack_scale_min(_field(blocks, scales))
    # Same operation order as ggml (d*sc first, then *q, then - dmin*m) for bit equality.
    sub_scale = (_f16_field(blocks, d) * sc.astype(np.float32))[:, :, None]
    sub_min = (_f16_field(blocks, dmin) * m.astype(np.float32))[:, :, None]
    return (sub_scale * q.astype(np.float32) - sub_min).reshape(-1, QK_K)


def dequantize_q4_k(blocks: U8) -> F32:
    q = _nibbles_to_sub_blocks(_field(blocks, Q4_K_QS))
    return _affine_dequantize(blocks, Q4_K_D, Q4_K_DMIN, Q4_K_SCALES, q)


# Bit j of a Q5_K QH byte belongs to sub-block j.
_Q5_HIGH_SHIFTS = np.arange(_N_SUB, dtype=np.uint8)[None, :, None]


def _high_bits_q5_k(qh: U8) -> U8:
    """Q5_K QH [n, 32] -> fifth bit of each weight, [n, 8, 32]."""
    return (qh[:, None, :] >> _Q5_HIGH_SHIFTS) & 1


def dequantize_q5_k(blocks: U8) -> F32:
    high = _high_bits_q5_k(_field(blocks, Q5_K_QH))
    q = _nibbles_to_sub_blocks(_field(blocks, Q5_K_QS)) | (high << 4)
    return _affine_dequantize(blocks, Q5_K_D, Q5_K_DMIN, Q5_K_SCALES, q)


# Quarter k of a Q6_K half keeps its top 2 bits at bit 2k of the QH bytes.
_Q6_HIGH_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]


def dequantize_q6_k(blocks: U8) -> F32:
    ql = _field(blocks, Q6_K_QL).reshape(-1, 2, 2, 32)  # [block, half, k % 2, l]
    low = np.concatenate([ql & 0xF, ql >> 4], axis=2)  # [block, half, k, l]
    qh = _field(blocks, Q6_K_QH).reshape(-1, 2, 1, 32)
    high = (qh >> _Q6_HIGH_SHIFTS) & 3
    q = (low | (high << 4)).astype(np.float32) - np.float32(32)
    sc = _field(blocks, Q6_K_SCALES).view(np.int8).astype(np.float32)
    sub_scale = (_f16_field(blocks, Q6_K_D) * sc)[:, :, None]
    return (sub_scale * q.reshape(-1, _N_SUB_Q6, Q6_K_SUB_BLOCK)).reshape(-1, QK_K)


def _to_levels(values: F32, n_levels: int) -> tuple[U8, F16]:
    """Non-negative values [n, j] -> (integer levels in 0..n_levels, f16 step [n, 1])."""
    vmax = values.max(axis=1, keepdims=True)
    inv_step = np.divide(np.float32(n_levels), vmax, out=np.zeros_like(vmax), where=vmax > 0)
    levels = np.minimum(np.rint(values * inv_step), n_levels).astype(np.uint8)
    return levels, (vmax / np.float32(n_levels)).astype(np.float16)


def _affine_quantize(
    x: F32, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[F16, F16, U8, U8]:
    """Shared Q4_K/Q5_K recipe -> (d f16[n,1], dmin f16[n,1], packed scales [n,12], q [n,8,32])."""
    # Column s is sub-block s (the layout scale_search wants; the re-rounding below is the
    # same kind of per-sub-block broadcast).
    cols = np.ascontiguousarray(x.reshape(-1, Q4_K_SUB_BLOCK).T)
    # llama.cpp's weighting: large weights matter more, but never let small ones drop out.
    rms = np.sqrt(np.mean(cols * cols, axis=0))
    scale, offset = search_scale_min(cols, rms + np.abs(cols), nmax, rmin, rdelta, nstep)
    sc, d = _to_levels(scale.reshape(-1, _N_SUB), _SIX_BITS)
    m, dmin = _to_levels(offset.reshape(-1, _N_SUB), _SIX_BITS)
    sub_scale = (d.astype(np.float32) * sc).reshape(-1)
    sub_min = (dmin.astype(np.float32) * m).reshape(-1)
    stored = sub_scale != 0
    q = np.rint((cols + sub_min) / np.where(stored, sub_scale, np.float32(1)))
    # A zero stored scale reproduces -sub_min whatever q is; 0 keeps the bytes canonical.
    q = np.where(stored, np.clip(q, 0, nmax), 0).astype(np.uint8)
    return d, dmin, pack_scale_min(sc, m), q.T.reshape(-1, _N_SUB, Q4_K_SUB_BLOCK)


def _put(out: U8, span: Span, value: np.ndarray) -> None:
    out[:, span.start : span.stop] = value.view(np.uint8).reshape(out.shape[0], span.size)


# The (rmin, rdelta, nstep) search grids are llama.cpp's reference ones for each type.
def quantize_q4_k(x: F32) -> U8:
    d, dmin, scales, q = _affine_quantize(x, nmax=15, rmin=-1.0, rdelta=0.1, nstep=20)
    out = np.empty((x.shape[0], Q4_K_TYPE_SIZE), dtype=np.uint8)
    _put(out, Q4_K_D, d)
    _put(out, Q4_K_DMIN, dmin)
    _put(out, Q4_K_SCALES, scales)
    _put(out, Q4_K_QS, _sub_blocks_to_nibbles(q))
    return out


def quantize_q5_k(x: F32) -> U8:
    d, dmin, scales, q = _affine_quantize(x, nmax=31, rmin=-0.5, rdelta=0.1, nstep=15)
    out = np.empty((x.shape[0], Q5_K_TYPE_SIZE), dtype=np.uint8)
    _put(out, Q5_K_D, d)
    _put(out, Q5_K_DMIN, dmin)
    _put(out, Q5_K_SCALES, scales)
    _put(out, Q5_K_QH, np.bitwise_or.reduce((q >> 4) << _Q5_HIGH_SHIFTS, axis=1))
    _put(out, Q5_K_QS, _sub_blocks_to_nibbles(q & 0xF))
    return out


def _symmetric_quantize(x: F32) -> tuple[F16, npt.NDArray[np.int8], U8]:
    """Q6_K recipe -> (d f16[n,1], int8 scales [n,16], q + 32 in 0..63 [n,256])."""
    cols = np.ascontiguousarray(x.reshape(-1, Q6_K_SUB_BLOCK).T)  # as in _affine_quantize
    scale = search_symmetric_scale(cols, nmax=32, n_tweaks=9).reshape(-1, _N_SUB_Q6)
    extreme = scale[np.arange(scale.shape[0]), np.abs(scale).argmax(axis=1)][:, None]
    # The largest-magnitude scale maps to -128 so its sign fills the int8 range's extra level.
    inv_step = np.divide(np.float32(-128), extreme, out=np.zeros_like(extreme), where=extreme != 0)
    step = np.divide(np.float32(1), inv_step, out=np.zeros_like(inv_step), where=inv_step != 0)
    d = step.astype(np.float16)
    sc = np.minimum(np.rint(inv_step * scale), 127).astype(np.int8)
    sub_scale = (d.astype(np.float32) * sc).reshape(-1)
    stored = sub_scale != 0
    q = np.rint(cols / np.where(stored, sub_scale, np.float32(1)))
    q = np.where(stored, np.clip(q, -32, 31), 0) + 32
    return d, sc, q.astype(np.uint8).T.reshape(-1, QK_K)


def quantize_q6_k(x: F32) -> U8:
    d, sc, q = _symmetric_quantize(x)
    quarters = q.reshape(-1, 2, 4, 32)  # [block, half, k, l]
    low = quarters & 0xF
    out = np.empty((x.shape[0], Q6_K_TYPE_SIZE), dtype=np.uint8)
    _put(out, Q6_K_QL, low[:, :, 0:2] | (low[:, :, 2:4] << 4))
    _put(out, Q6_K_QH, np.bitwise_or.reduce((quarters >> 4) << _Q6_HIGH_SHIFTS, axis=2))
    _put(out, Q6_K_SCALES, sc)
    _put(out, Q6_K_D, d)
    return out


def _q6_k_blocks_per_row(row_bytes: int) -> int:
    if row_bytes % Q6_K_TYPE_SIZE:
        raise TensorShapeError(f"a Q6_K row is a whole number of {Q6_K_TYPE_SIZE}-byte blocks, got {row_bytes} bytes")
    return row_bytes // Q6_K_TYPE_SIZE


def _q6_k_half_runs(h: int) -> list[tuple[slice, slice]]:
    """(bytes of a GGUF block, bytes of a planar half-block run) of half h's QL and QH."""
    ql, qh = Q6_K_QL.size // 2, Q6_K_QH.size // 2
    return [(slice(Q6_K_QL.start + ql * h, Q6_K_QL.start + ql * (h + 1)),
             slice(PLANAR_Q6_K_HALF_QL.start, PLANAR_Q6_K_HALF_QL.stop)),
            (slice(Q6_K_QH.start + qh * h, Q6_K_QH.start + qh * (h + 1)),
             slice(PLANAR_Q6_K_HALF_QH.start, PLANAR_Q6_K_HALF_QH.stop))]


def q6_k_to_planar(rows: U8) -> U8:
    """GGUF Q6_K rows uint8[..., nb * 210] -> planar rows uint8[..., q6_k_planar_row_bytes(nb)]
    (layouts.py, "Q6_K planar")."""
    rows = np.ascontiguousarray(rows, dtype=np.uint8)
    lead, n_blocks = rows.shape[:-1], _q6_k_blocks_per_row(rows.shape[-1])
    blocks = rows.reshape(*lead, n_blocks, Q6_K_TYPE_SIZE)
    out = np.zeros((*lead, q6_k_planar_row_bytes(n_blocks)), dtype=np.uint8)
    quants = out[..., : 2 * n_blocks * PLANAR_Q6_K_RUN].reshape(*lead, n_blocks, 2, PLANAR_Q6_K_RUN)
    for h in range(2):
        for block_bytes, run_bytes in _q6_k_half_runs(h):
            quants[..., h, run_bytes] = blocks[..., block_bytes]
    for span in (Q6_K_SCALES, Q6_K_D):
        out[..., n_blocks * span.start : n_blocks * span.stop] = blocks[..., span.start : span.stop].reshape(*lead, -1)
    return out


def q6_k_from_planar(planar: U8, n_blocks: int) -> U8:
    """Inverse of q6_k_to_planar: planar rows of `n_blocks` blocks -> GGUF Q6_K rows."""
    planar = np.asarray(planar, dtype=np.uint8)
    if planar.shape[-1] != q6_k_planar_row_bytes(n_blocks):
        raise TensorShapeError(f"a planar Q6_K row of {n_blocks} blocks holds {q6_k_planar_row_bytes(n_blocks)} "
                               f"bytes, got {planar.shape[-1]}")
    lead = planar.shape[:-1]
    blocks = np.empty((*lead, n_blocks, Q6_K_TYPE_SIZE), dtype=np.uint8)
    quants = planar[..., : 2 * n_blocks * PLANAR_Q6_K_RUN].reshape(*lead, n_blocks, 2, PLANAR_Q6_K_RUN)
    for h in range(2):
        for block_bytes, run_bytes in _q6_k_half_runs(h):
            blocks[..., block_bytes] = quants[..., h, run_bytes]
    for span in (Q6_K_SCALES, Q6_K_D):
        plane = planar[..., n_blocks * span.start : n_blocks * span.stop]
        blocks[..., span.start : span.stop] = plane.reshape(*lead, n_blocks, span.size)
    return blocks.reshape(*lead, n_blocks * Q6_K_TYPE_SIZE)


def dequantize_q6_k_planar(planar: U8, k: int) -> F32:
    """Planar Q6_K rows uint8[..., planar row bytes] of k weights each -> float32[..., k]."""
    rows = q6_k_from_planar(planar, k // QK_K)
    return dequantize_q6_k(rows.reshape(-1, Q6_K_TYPE_SIZE)).reshape(*planar.shape[:-1], k)
