"""Token embedding lookup, one GGUF row dequantized: unscheduled compute + numpy reference.

The table stays in the GGUF block layout, viewed as words by `gemv.weight_view`, and each
weight is decoded with the same per-format decoders the GEMV uses (`gemv_format(t)`), so
there is one definition of every block layout on the kernel side. A weight is
  x[h] = scale(c, p) * code(c, p, l) + min(c, p)      (h = c * chunk + p * sub + l)
which is the GEMV's per-sub-block factoring of sum_h (scale * code + min) * x[h] read back
element by element; float types have neither scale nor min.
"""

import numpy as np
import numpy.typing as npt
from tvm import te, tirx

from sparkinfer import quant
from sparkinfer.kernels.gemv import GemvFormat, gemv_format


def embedding(ggml_type: int, vocab: int, hidden: int) -> tirx.PrimFunc:
    """x = dequantize(W[token[0]]); params (W words [vocab, row_words], token int32[1],
    x f32[hidden]). A token outside [0, vocab) is clamped into it, never read past W."""
    fmt = gemv_format(ggml_type)
    w = te.placeholder((vocab, fmt.row_words(hidden)), fmt.word_dtype, name="W")
    token = te.placeholder((1,), "int32", name="token")

    def weight(h: tirx.Var) -> tirx.Expr:
        # Clamped for the same reason as the expert ids in kernels/moe.py: a provable bound.
        return _row_weight(fmt, w, tirx.max(tirx.min(token[0], vocab - 1), 0), h)

    x = te.compute((hidden,), weight, name="embedding")
    return te.create_prim_func([w, token, x]).with_attr(
        "global_symbol", f"embedding_{fmt.name.lower()}_{vocab}x{hidden}"
    )


def _row_weight(fmt: GemvFormat, w: te.Tensor, t: tirx.Expr, h: tirx.Expr) -> tirx.Expr:
    """Weight h of row t of the table, dequantized (the formula of the module docstring)."""

    def row(i: tirx.Expr) -> tirx.Expr:
        return w[t, i]

    c, p, l = h // fmt.chunk, h % fmt.chunk // fmt.sub, h % fmt.sub
    value = fmt.code(row, c, p, l)
    if fmt.scale is not None:
        value = fmt.scale(row, c, p) * value
    if fmt.min is not None:
        value = value + fmt.min(row, c, p)
    return value


def embedding_rows(ggml_type: int, vocab: int, hidden: int, n_tokens: int) -> tirx.PrimFunc:
    """x[t] = dequantize(W[tokens[t]]) for a chunk of T tokens; params (W words
    [vocab, row_words], tokens int32[T], x f32[T, hidden]); ids clamped as in `embedding`."""
    fmt = gemv_format(ggml_type)
    w = te.placeholder((vocab, fmt.row_words(hidden)), fmt.word_dtype, name="W")
    tokens = te.placeholder((n_tokens,), "int32", name="tokens")
    x = te.compute((n_tokens, hidden),
                   lambda t, h: _row_weight(fmt, w, tirx.max(tirx.min(tokens[t], vocab - 1), 0), h),
                   name="embedding")
    return te.create_prim_func([w, tokens, x]).with_attr(
        "global_symbol", f"embedding_rows_{fmt.name.lower()}_{vocab}x{hidden}_t{n_tokens}"
    )


def embedding_reference(
    ggml_type: int, data: npt.NDArray[np.uint8], token: int
) -> npt.NDArray[np.float32]:
    """numpy oracle: row `token` of the GGUF rows uint8[vocab, row_bytes], dequantized."""
    row_bytes = data.shape[-1]
    fmt = quant.quant_format(ggml_type)
    hidden = row_bytes // fmt.type_size * fmt.block_size
    return quant.dequantize(ggml_type, data[token : token + 1], (1, hidden))[0]
