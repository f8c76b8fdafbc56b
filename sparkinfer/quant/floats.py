"""F32, F16 and BF16 as one-weight blocks, so the registry treats them like quant types."""

import numpy as np

from ._arrays import F32, U8


def dequantize_f32(blocks: U8) -> F32:
    return blocks.view(np.float32)


def quantize_f32(x: F32) -> U8:
    return x.view(np.uint8)


def dequantize_f16(blocks: U8) -> F32:
    return blocks.view(np.float16).astype(np.float32)


def quantize_f16(x: F32) -> U8:
    return x.astype(np.float16).view(np.uint8)


def dequantize_bf16(blocks: U8) -> F32:
    # bf16 is the top half of an f32, so widening is a shift.
    return (blocks.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def quantize_bf16(x: F32) -> U8:
    bits = x.view(np.uint32)
    # Round to nearest even like ggml; the carry into the exponent rounds up to inf as it
    # should. NaNs are kept quiet so truncation cannot turn them into infinities.
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
    quiet_nan = (bits >> 16) | np.uint32(0x40)
    is_nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(is_nan, quiet_nan, rounded).astype(np.uint16).view(np.uint8)
