"""The registry of supported ggml types and the array-level (de)quantize entry points."""

from dataclasses import dataclass, field
from math import prod
from typing import Callable

import numpy as np
import numpy.typing as npt
from gguf import GGMLQuantizationType

from sparkinfer.errors import TensorShapeError, UnsupportedQuantTypeError

from . import floats, kquants, q8_0
from ._arrays import F32, U8
from .layouts import Q4_K_TYPE_SIZE, Q5_K_TYPE_SIZE, Q6_K_TYPE_SIZE, Q8_0_TYPE_SIZE, QK8_0, QK_K

# Blocks are processed this many weights at a time: the codecs' temporaries are several
# times their input, which must stay bounded on multi-GB tensors (and fit in cache).
_CHUNK_WEIGHTS = 1 << 18


@dataclass(frozen=True)
class QuantFormat:
    """One ggml tensor type: its block geometry and numpy codecs.

    Float types are blocks of one weight, so every type shares one code path.
    """

    ggml_type: GGMLQuantizationType
    block_size: int
    type_size: int
    _dequantize_blocks: Callable[[U8], F32] = field(repr=False, compare=False)
    _quantize_blocks: Callable[[F32], U8] = field(repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.ggml_type.name

    def row_bytes(self, cols: int) -> int:
        if cols % self.block_size != 0:
            raise TensorShapeError(
                f"a {self.name} row must hold a multiple of {self.block_size} weights, "
                f"got {cols}"
            )
        return cols // self.block_size * self.type_size

    def dequantize(self, data: npt.ArrayLike, shape: tuple[int, ...]) -> F32:
        """Raw blocks (uint8 of any shape, or the typed F32/F16 arrays gguf's reader gives)
        -> float32 array of `shape` (numpy order, row length last)."""
        shape = tuple(int(n) for n in shape)
        if not shape:
            raise TensorShapeError(f"cannot dequantize {self.name} data to a 0-d shape")
        n_rows = prod(shape[:-1])
        expected = n_rows * self.row_bytes(shape[-1])
        raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        if raw.size != expected:
            raise TensorShapeError(
                f"{self.name} data of shape {shape} needs {expected} bytes, got {raw.size}"
            )
        blocks = raw.reshape(-1, self.type_size)
        out = _map_chunks(
            self._dequantize_blocks, blocks, self.block_size, np.float32, self.block_size
        )
        return out.reshape(shape)

    def quantize(self, x: npt.ArrayLike) -> U8:
        """float32[..., cols] -> uint8[..., row_bytes(cols)], the bytes a GGUF file stores."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim == 0:
            raise TensorShapeError(f"cannot quantize a 0-d array to {self.name}")
        row_bytes = self.row_bytes(x.shape[-1])
        blocks = x.reshape(-1, self.block_size)
        out = _map_chunks(self._quantize_blocks, blocks, self.type_size, np.uint8, self.block_size)
        return out.reshape(*x.shape[:-1], row_bytes)


def _map_chunks(
    codec: Callable[[np.ndarray], np.ndarray],
    blocks: np.ndarray,
    out_width: int,
    out_dtype: npt.DTypeLike,
    block_size: int,
) -> np.ndarray:
    out = np.empty((blocks.shape[0], out_width), dtype=out_dtype)
    step = max(1, _CHUNK_WEIGHTS // block_size)
    for start in range(0, blocks.shape[0], step):
        out[start : start + step] = codec(blocks[start : start + step])
    return out


_T = GGMLQuantizationType
# Keyed by plain int too (GGMLQuantizationType is an IntEnum): callers may pass raw ids.
_FORMATS: dict[int, QuantFormat] = {
    f.ggml_type: f
    for f in (
        QuantFormat(_T.F32, 1, 4, floats.dequantize_f32, floats.quantize_f32),
        QuantFormat(_T.F16, 1, 2, floats.dequantize_f16, floats.quantize_f16),
        QuantFormat(_T.BF16, 1, 2, floats.dequantize_bf16, floats.quantize_bf16),
        QuantFormat(_T.Q8_0, QK8_0, Q8_0_TYPE_SIZE, q8_0.dequantize_q8_0, q8_0.quantize_q8_0),
        QuantFormat(_T.Q4_K, QK_K, Q4_K_TYPE_SIZE, kquants.dequantize_q4_k, kquants.quantize_q4_k),
        QuantFormat(_T.Q5_K, QK_K, Q5_K_TYPE_SIZE, kquants.dequantize_q5_k, kquants.quantize_q5_k),
        QuantFormat(_T.Q6_K, QK_K, Q6_K_TYPE_SIZE, kquants.dequantize_q6_k, kquants.quantize_q6_k),
    )
}

SUPPORTED_TYPES: tuple[GGMLQuantizationType, ...] = tuple(f.ggml_type for f in _FORMATS.values())


def _type_name(ggml_type: int) -> str:
    try:
        return GGMLQuantizationType(int(ggml_type)).name
    except ValueError:
        return f"unknown ({int(ggml_type)})"


def quant_format(ggml_type: int, tensor_name: str | None = None) -> QuantFormat:
    """The format of `ggml_type` (a GGMLQuantizationType or its integer id).

    Raises UnsupportedQuantTypeError naming the tensor (if given) and the type.
    """
    fmt = _FORMATS.get(ggml_type)
    if fmt is not None:
        return fmt
    supported = ", ".join(t.name for t in SUPPORTED_TYPES)
    subject = f"tensor '{tensor_name}' has quant type" if tensor_name else "quant type"
    raise UnsupportedQuantTypeError(
        f"{subject} {_type_name(ggml_type)}, which SparkInfer does not support "
        f"(supported: {supported})"
    )


def dequantize(ggml_type: int, data: npt.ArrayLike, shape: tuple[int, ...]) -> F32:
    return quant_format(ggml_type).dequantize(data, shape)


def quantize(ggml_type: int, x: npt.ArrayLike) -> U8:
    return quant_format(ggml_type).quantize(x)
