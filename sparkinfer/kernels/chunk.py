"""The T-token step's bookkeeping kernels: the last valid row of a chunk, and the state update
after a chunk (docs/ARCHITECTURE.md, "The T-token step"). Unscheduled TIR + numpy references.

  take_row:      row[h] = x[n_valid - 1, h]           the last prompt token's hidden state,
                                                      the only one generation needs logits for
  advance_chunk: token := next, pos := pos + n_valid  after a chunk that samples (`prefill_T`)
  advance_pos:   pos := pos + n_valid                 after a chunk that does not (`score_T`)
"""

import numpy as np
import numpy.typing as npt
from tvm import te, tirx


def take_row(n_tokens: int, hidden: int) -> tirx.PrimFunc:
    """Params (x f32[T, H], n_valid int32[1], row f32[H]); n_valid is clamped into [1, T]."""
    x = te.placeholder((n_tokens, hidden), "float32", name="x")
    n_valid = te.placeholder((1,), "int32", name="n_valid")
    last = tirx.max(tirx.min(n_valid[0], n_tokens), 1) - 1
    row = te.compute((hidden,), lambda h: x[last, h], name="row")
    return te.create_prim_func([x, n_valid, row]).with_attr("global_symbol", f"take_row_{n_tokens}x{hidden}")


def advance_chunk() -> tirx.PrimFunc:
    """Params (next int32[1], n_valid int32[1], token int32[1] (in place), pos int32[1]
    (in place))."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def advance_chunk_(next_token: T.Buffer((1,), "int32"), n_valid: T.Buffer((1,), "int32"),
                       token: T.Buffer((1,), "int32"), pos: T.Buffer((1,), "int32")):
        T.func_attr({"global_symbol": "advance_chunk"})
        # pos read into a register first, as in sampling.advance (a schedulable block).
        old = T.sblock_alloc_buffer((1,), "int32", scope="local")
        for _ in range(1):
            old[0] = pos[0]
            with T.sblock("advance"):
                token[0] = next_token[0]
                pos[0] = old[0] + n_valid[0]

    return advance_chunk_


def advance_pos() -> tirx.PrimFunc:
    """Params (n_valid int32[1], pos int32[1] (in place))."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def advance_pos_(n_valid: T.Buffer((1,), "int32"), pos: T.Buffer((1,), "int32")):
        T.func_attr({"global_symbol": "advance_pos"})
        old = T.sblock_alloc_buffer((1,), "int32", scope="local")
        for _ in range(1):
            old[0] = pos[0]
            with T.sblock("advance"):
                pos[0] = old[0] + n_valid[0]

    return advance_pos_


def take_row_reference(x: npt.NDArray[np.float32], n_valid: int) -> np.ndarray:
    return x[min(max(n_valid, 1), x.shape[0]) - 1].copy()
