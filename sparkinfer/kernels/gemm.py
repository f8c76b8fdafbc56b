"""Dequantizing GEMM over a chunk of T tokens, y = x . W^T, straight from GGUF blocks:
unscheduled compute + numpy reference.

The T-token step's counterpart of `gemv`: the same word views and per-format decoders
(`gemv.gemv_format`), so there is one definition of every block layout. At T tokens a weight
is used T times, so the compute dequantizes it once into a float32 stage and multiplies that:
  scale[n, c, p] = scale(W, n, c, p)          decoded once per sub-block (where the type has one)
  minv[n, c, p]  = min(W, n, c, p)            likewise (K-quants with a min)
  wdq[k, n]      = code(W, n, c, p, l) * scale[n, c, p] + minv[n, c, p]   (k = c*chunk + p*sub + l)
  gemm[t, n]     = sum_k x[t, k] * wdq[k, n]
wdq is laid out [K, N] so that a schedule which tiles n and computes the stage per tile reads
the tile row by row with the n lanes contiguous (vector loads, x[t, k] broadcast).

With `half_operands` x and the dequantized weights are rounded to float16 and their products
summed in float32: the form tensor cores multiply (`schedule.prefill_cuda.GemmCudaRule`). The
model picks it per arch (the step variant `chunk_operands`, GEMM_OPERANDS, compiler/pipeline.py).

`dequant_tile_value` is that per-weight value, shared with the grouped expert GEMM
(`moe_chunk`).
"""

from collections.abc import Callable

import numpy as np
import numpy.typing as npt
from tvm import te, tirx

from sparkinfer.kernels.gemv import GemvFormat, Row, dequantize_rows, gemv_format

Expr = tirx.Expr
GEMM_OPERANDS = ("f32", "f16")  # the step variant's values: half_operands False / True


def split_k(fmt: GemvFormat, k: Expr) -> tuple[Expr, Expr, Expr]:
    """(chunk c, part p, index l) of weight k of a row."""
    return k // fmt.chunk, k % fmt.chunk // fmt.sub, k % fmt.sub


def dequant_tile_value(fmt: GemvFormat, row: Row, k: Expr,
                       scale: Callable[[Expr, Expr], Expr] | None,
                       minv: Callable[[Expr, Expr], Expr] | None) -> Expr:
    """Weight k of `row` as float32, from its code and its sub-block's decoded scale/min
    (`scale(c, p)`, `minv(c, p)`: reads of the stages that hold them)."""
    c, p, l = split_k(fmt, k)
    value = fmt.code(row, c, p, l)
    if scale is not None:
        value = value * scale(c, p)
    if minv is not None:
        value = value + minv(c, p)
    return value


def gemm_symbol(ggml_type: int, t: int, n: int, k: int, half_operands: bool = False) -> str:
    return f"gemm_{gemv_format(ggml_type).name.lower()}_{t}x{n}x{k}{'_f16' if half_operands else ''}"


def gemm(ggml_type: int, t: int, n: int, k: int, half_operands: bool = False) -> tirx.PrimFunc:
    """y[t, n] = sum_k x[t, k] W[n, k] for W in `ggml_type`; params (W words [n, row_words],
    x f32[t, k], y f32[t, n]), the products of float16-rounded operands if `half_operands`,
    summed in float32. Every row of the chunk is computed (padding rows included)."""
    fmt = gemv_format(ggml_type)
    n_chunks = k // fmt.chunk
    w = te.placeholder((n, fmt.row_words(k)), fmt.word_dtype, name="W")
    x = te.placeholder((t, k), "float32", name="x")

    def row(r: Expr) -> Row:
        return fmt.row_view(lambda i: w[r, i], k)

    sub_blocks = (n, n_chunks, fmt.parts)
    scale = None if fmt.scale is None else te.compute(
        sub_blocks, lambda r, c, p: fmt.scale(row(r), c, p), name="scale")
    minv = None if fmt.min is None else te.compute(
        sub_blocks, lambda r, c, p: fmt.min(row(r), c, p), name="minv")

    def weight(kk: Expr, r: Expr) -> Expr:
        return dequant_tile_value(
            fmt, row(r), kk,
            None if scale is None else (lambda c, p: scale[r, c, p]),
            None if minv is None else (lambda c, p: minv[r, c, p]),
        )

    kk = te.reduce_axis((0, k), name="k")
    if half_operands:
        wdq = te.compute((k, n), lambda kk_, r: weight(kk_, r).astype("float16"), name="wdq")
        xh = te.compute((t, k), lambda i, kk_: x[i, kk_].astype("float16"), name="x_half")
        y = te.compute((t, n), lambda i, j: te.sum(
            xh[i, kk].astype("float32") * wdq[kk, j].astype("float32"), axis=kk), name="gemm")
    else:
        wdq = te.compute((k, n), weight, name="wdq")
        y = te.compute((t, n), lambda i, j: te.sum(x[i, kk] * wdq[kk, j], axis=kk), name="gemm")
    return te.create_prim_func([w, x, y]).with_attr("global_symbol", gemm_symbol(ggml_type, t, n, k, half_operands))


def gemm_reference(ggml_type: int, data: npt.NDArray[np.uint8], x: npt.NDArray[np.float32],
                   half_operands: bool = False) -> np.ndarray:
    """numpy oracle: dequantize the rows uint8[n, row_bytes] (`gemv.dequantize_rows`), x f32[t, k] @ W^T in float64
    (x and W rounded to float16 first if `half_operands`)."""
    w = dequantize_rows(ggml_type, data, x.shape[-1])
    if half_operands:
        x, w = x.astype(np.float16), w.astype(np.float16)
    return (x.astype(np.float64) @ w.astype(np.float64).T).astype(np.float32)
