"""Byte layouts of the ggml blocks SparkInfer reads (ggml-common.h), in one place.

The numpy (de)quantizers in this package and the TIR kernels both address block
fields through these spans, so a layout mistake shows up in the CPU tests against
gguf's dequantizer rather than only as wrong numbers on the GPU.

All multi-byte fields are little-endian; f16 is IEEE binary16.
"""

from enum import IntEnum
from typing import NamedTuple


class Span(NamedTuple):
    """Byte range [start, stop) of one field inside a block."""

    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


QK_K = 256  # weights per K-quant super-block
QK8_0 = 32  # weights per Q8_0 block

# Q8_0, 34 B / 32 weights: y[i] = d * qs[i].
Q8_0_TYPE_SIZE = 34
Q8_0_D = Span(0, 2)  # f16
Q8_0_QS = Span(2, 34)  # int8[32]

# Q4_K, 144 B / 256 weights, 8 sub-blocks of 32, each with a 6-bit scale sc[j] and a
# 6-bit min m[j] packed into SCALES (see kquants.unpack_scale_min):
#   y = d * sc[j] * q - dmin * m[j].
# QS byte 32*c + l holds weight 64*c + l (sub-block 2c) in its low nibble and weight
# 64*c + 32 + l (sub-block 2c+1) in its high nibble, c in 0..3.
Q4_K_SUB_BLOCK = 32
Q4_K_TYPE_SIZE = 144
Q4_K_D = Span(0, 2)  # f16, super-block scale of the scales
Q4_K_DMIN = Span(2, 4)  # f16, super-block scale of the mins
Q4_K_SCALES = Span(4, 16)  # u8[12], 8 scales + 8 mins at 6 bits
Q4_K_QS = Span(16, 144)  # u8[128], 4-bit quants

# Q5_K, 176 B / 256 weights: Q4_K's fields plus QH; bit j of QH byte l is the fifth bit
# (worth 16) of weight 32*j + l, i.e. of position l in sub-block j.
Q5_K_SUB_BLOCK = 32
Q5_K_TYPE_SIZE = 176
Q5_K_D = Span(0, 2)
Q5_K_DMIN = Span(2, 4)
Q5_K_SCALES = Span(4, 16)
Q5_K_QH = Span(16, 48)  # u8[32], high bits
Q5_K_QS = Span(48, 176)  # u8[128], low 4 bits, arranged as Q4_K_QS

# Q6_K, 210 B / 256 weights, 16 sub-blocks of 16 with int8 scales: y = d * sc[j] * (q - 32).
# The block is two halves of 128 weights; in half h, weight 128*h + 32*k + l (k in 0..3,
# l in 0..31) has its low 4 bits in QL byte 64*h + 32*(k % 2) + l (low nibble for k < 2,
# high nibble for k >= 2) and its top 2 bits at bit 2*k of QH byte 32*h + l.
Q6_K_SUB_BLOCK = 16
Q6_K_TYPE_SIZE = 210
Q6_K_QL = Span(0, 128)  # u8[128], low 4 bits
Q6_K_QH = Span(128, 192)  # u8[64], high 2 bits
Q6_K_SCALES = Span(192, 208)  # int8[16]
Q6_K_D = Span(208, 210)  # f16

# Q6_K planar: a lossless re-layout SparkInfer makes of Q6_K rows at upload (kquants.q6_k_to_planar;
# the file's bytes stay the source of truth). A GGUF Q6_K row is 210-byte blocks that start at
# even offsets only, so kernels read it 16 bits at a time. A planar row of nb blocks is three planes:
#   quants  [0, 192 nb)       per half-block c = 2b + h (128 weights): its 64 QL bytes
#                             (QL 64h.. of block b) then its 32 QH bytes (QH 32h..): one
#                             96-byte run at 96 c, 16-byte aligned (what a GEMV lane loads at once)
#   scales  [192 nb, 208 nb)  the 16 int8 scales of block b at 192 nb + 16 b
#   d       [208 nb, 210 nb)  the f16 d of block b at 208 nb + 2 b
# (each plane starts at nb * the field's offset in a block), then zeros up to a multiple of 16
# bytes: none where nb is a multiple of 8 (k = 2048), 10 bytes of 630 at k = 768.
class RelaidType(IntEnum):
    """Weight formats SparkInfer re-lays out at upload, standing where kernels take a ggml type
    (factory arguments, which record them by name like ggml types; schedule rules; tuning
    keys): numbers outside ggml's type numbers (one byte), over the ggml type they come from."""

    Q6_K_PLANAR = 0x100 | 14  # GGMLQuantizationType.Q6_K


Q6_K_PLANAR = RelaidType.Q6_K_PLANAR
PLANAR_Q6_K_HALF_QL = Span(0, 64)  # within a half-block's run
PLANAR_Q6_K_HALF_QH = Span(64, 96)
PLANAR_Q6_K_RUN = 96
PLANAR_Q6_K_ALIGN = 16


def q6_k_planar_row_bytes(n_blocks: int) -> int:
    """Bytes of a planar Q6_K row of `n_blocks` blocks (padded to 16 bytes)."""
    return -(-n_blocks * Q6_K_TYPE_SIZE // PLANAR_Q6_K_ALIGN) * PLANAR_Q6_K_ALIGN
