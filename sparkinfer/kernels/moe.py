"""Fused MoE expert FFN: unscheduled compute + numpy reference.

Two kernels per MoE layer, after `router.router_topk` has chosen ids[KU] and weights[KU]:
  moe_gate_up_silu:  act[s, i]  = silu(Wg[ids[s], i] . x) * (Wu[ids[s], i] . x)
  moe_down_residual: h_out[n]   = h[n] + sum_s weights[s] * (Wd[ids[s], n] . act[s])
Weights stay GGUF blocks, viewed as words by `gemv.weight_view`, and are decoded by the GEMV's
per-type `GemvFormat` (code/scale/min per sub-block), in the same three-block shape as
`gemv.gemv_tensors`: per-sub-block dot products of quant codes with x, per-sub-block sums of x
(types with a min), and a reduction that applies scales and mins once per sub-block. So the
GEMV schedule's layout (lanes along K, warp allreduce) carries over.

Gate and up may have different types (the fusion is in the epilogue, not the decode). Down
folds the weighted sum over the KU slots into its reduction, so h_out is one pass with no
[KU, H] intermediate and no atomics: each output row reduces over (slot, chunk, part).
An id outside [0, E) is clamped into it, never read past the weights.

`moe_gate_up_silu_routed` (the decode step's fused launches) takes the router logits and h
instead of ids and x: it runs `router.topk` (the same rank rule, ties to the lower id) and the
FFN norm (`norm.normalize`) itself, and writes ids and weights out for `moe_down_residual`, so
the step launches no router_topk and no norm before the experts. On a GPU every thread block
ranks the E logits (E^2 compares from shared memory) and writes the same ids and weights.
"""

from collections.abc import Callable

import numpy as np
import numpy.typing as npt
from tvm import te, tirx

from sparkinfer.kernels.gemv import GemvFormat, Row, gemv_experts_reference, gemv_format
from sparkinfer.kernels.norm import normalize, rms_norm_reference
from sparkinfer.kernels.router import router_topk_reference, topk
from sparkinfer.reference.qwen3moe import silu

Expr = tirx.Expr
# A sub-block term: (slot, row, chunk, part) -> scale * dot + min * xsum, float32.
Term = Callable[[Expr, Expr, Expr, Expr], Expr]


def _expert_gemv_terms(
    fmt: GemvFormat,
    w: te.Tensor,
    ids: te.Tensor,
    x_at: Callable[[Expr, Expr], Expr],
    n_used: int,
    n: int,
    k: int,
    name: str,
    x_per_slot: bool,
) -> Term:
    """The `name`_dot / `name`_xsum blocks of W[ids[s]] . x, and the term that combines them.

    `x_at(slot, k_index)` reads x; with `x_per_slot` False it ignores the slot, and the x
    sums are computed once for all slots.
    """
    n_experts = int(w.shape[0])
    chunks = k // fmt.chunk

    def row(slot: Expr, r: Expr) -> Row:
        # Clamped so that TVM can bound the access (see gemv.gemv_tensors).
        expert = tirx.max(tirx.min(ids[slot], n_experts - 1), 0)
        return fmt.row_view(lambda i: w[expert, r, i], k)

    def x_sub(slot: Expr, c: Expr, p: Expr, l: Expr) -> Expr:
        return x_at(slot, c * fmt.chunk + p * fmt.sub + l)

    l_dot = te.reduce_axis((0, fmt.sub), name="l")

    def dot_term(s: Expr, r: Expr, c: Expr, p: Expr) -> Expr:
        return fmt.code(row(s, r), c, p, l_dot) * x_sub(s, c, p, l_dot)

    dot = te.compute(
        (n_used, n, chunks, fmt.parts),
        lambda s, r, c, p: te.sum(dot_term(s, r, c, p), axis=l_dot),
        name=f"{name}_dot",
    )
    xsum: te.Tensor | None = None
    if fmt.min is not None:
        l_sum = te.reduce_axis((0, fmt.sub), name="l")
        if x_per_slot:
            xsum = te.compute(
                (n_used, chunks, fmt.parts),
                lambda s, c, p: te.sum(x_sub(s, c, p, l_sum), axis=l_sum),
                name=f"{name}_xsum",
            )
        else:
            xsum = te.compute(
                (chunks, fmt.parts),
                lambda c, p: te.sum(x_sub(0, c, p, l_sum), axis=l_sum),
                name=f"{name}_xsum",
            )

    def term(s: Expr, r: Expr, c: Expr, p: Expr) -> Expr:
        value = dot[s, r, c, p]
        if fmt.scale is not None:
            value = fmt.scale(row(s, r), c, p) * value
        if fmt.min is not None and xsum is not None:
            x_total = xsum[s, c, p] if x_per_slot else xsum[c, p]
            value = value + fmt.min(row(s, r), c, p) * x_total
        return value

    return term


def _weights(fmt: GemvFormat, n_experts: int, rows: int, cols: int, name: str) -> te.Tensor:
    """All experts' GGUF rows as words: [E, rows, row_words]."""
    return te.placeholder((n_experts, rows, fmt.row_words(cols)), fmt.word_dtype, name=name)


def _silu(v: Expr) -> Expr:
    # The oracle's formula, x / (1 + exp(-x)): -inf-safe (exp overflow gives -0, not NaN).
    return v / (tirx.const(1.0, "float32") + te.exp(-v))


def moe_gate_up_silu_symbol(
    type_gate: int, type_up: int, n_experts: int, n_used: int, n_ffn: int, hidden: int
) -> str:
    """The kernel name of `moe_gate_up_silu(...)`; needs no compiler (runtime-only TVM)."""
    g, u = gemv_format(type_gate).name.lower(), gemv_format(type_up).name.lower()
    return f"moe_gate_up_silu_{g}_{u}_{n_experts}x{n_ffn}x{hidden}_top{n_used}"


def moe_down_residual_symbol(
    ggml_type: int, n_experts: int, n_used: int, hidden: int, n_ffn: int
) -> str:
    """The kernel name of `moe_down_residual(...)`; needs no compiler (runtime-only TVM)."""
    name = gemv_format(ggml_type).name.lower()
    return f"moe_down_residual_{name}_{n_experts}x{hidden}x{n_ffn}_top{n_used}"


def moe_gate_up_silu(
    type_gate: int, type_up: int, n_experts: int, n_used: int, n_ffn: int, hidden: int
) -> tirx.PrimFunc:
    """act[s] = silu(Wg[ids[s]] . x) * (Wu[ids[s]] . x).

    Params (Wg words [E, I, row_words], Wu words [E, I, row_words'], ids int32[KU],
    x f32[H], act f32[KU, I]).
    """
    fmt_g, fmt_u = gemv_format(type_gate), gemv_format(type_up)
    w_gate = _weights(fmt_g, n_experts, n_ffn, hidden, "Wg")
    w_up = _weights(fmt_u, n_experts, n_ffn, hidden, "Wu")
    ids = te.placeholder((n_used,), "int32", name="ids")
    x = te.placeholder((hidden,), "float32", name="x")
    act = _gate_up_silu(fmt_g, fmt_u, w_gate, w_up, ids, x, n_used, n_ffn, hidden)
    symbol = moe_gate_up_silu_symbol(type_gate, type_up, n_experts, n_used, n_ffn, hidden)
    return te.create_prim_func([w_gate, w_up, ids, x, act]).with_attr("global_symbol", symbol)


def moe_gate_up_silu_routed_symbol(
    type_gate: int, type_up: int, n_experts: int, n_used: int, n_ffn: int, hidden: int
) -> str:
    return moe_gate_up_silu_symbol(type_gate, type_up, n_experts, n_used, n_ffn, hidden).replace(
        "moe_gate_up_silu_", "moe_gate_up_silu_routed_", 1)


def moe_gate_up_silu_routed(
    type_gate: int, type_up: int, n_experts: int, n_used: int, n_ffn: int, hidden: int, eps: float
) -> tirx.PrimFunc:
    """`moe_gate_up_silu` with `router_topk` and the FFN norm as its prologue (module
    docstring): ids, weights = router_topk(logits), act[s] = silu(Wg[ids[s]] . x) *
    (Wu[ids[s]] . x) for x = rmsnorm(h) * norm_w.

    Params (Wg, Wu words as in `moe_gate_up_silu`, logits f32[E], h f32[H], norm_w f32[H],
    act f32[KU, I], ids int32[KU], weights f32[KU]).
    """
    if not 0 < n_used <= n_experts:
        raise ValueError(f"need 0 < experts used <= experts, got {n_used} of {n_experts}")
    fmt_g, fmt_u = gemv_format(type_gate), gemv_format(type_up)
    w_gate = _weights(fmt_g, n_experts, n_ffn, hidden, "Wg")
    w_up = _weights(fmt_u, n_experts, n_ffn, hidden, "Wu")
    logits = te.placeholder((n_experts,), "float32", name="logits")
    h = te.placeholder((hidden,), "float32", name="h")
    norm_w = te.placeholder((hidden,), "float32", name="norm_w")
    ids, weights = topk(logits, (), n_experts, n_used)
    x = normalize(hidden, eps, h, norm_w)
    act = _gate_up_silu(fmt_g, fmt_u, w_gate, w_up, ids, x, n_used, n_ffn, hidden)
    symbol = moe_gate_up_silu_routed_symbol(type_gate, type_up, n_experts, n_used, n_ffn, hidden)
    func = te.create_prim_func([w_gate, w_up, logits, h, norm_w, act, ids, weights])
    return func.with_attr("global_symbol", symbol)


def _gate_up_silu(fmt_g: GemvFormat, fmt_u: GemvFormat, w_gate: te.Tensor, w_up: te.Tensor, ids: te.Tensor,
                  x: te.Tensor, n_used: int, n_ffn: int, hidden: int) -> te.Tensor:
    """The stages gate, up (with their _dot / _xsum producers) and act = silu(gate) * up."""

    def projection(fmt: GemvFormat, w: te.Tensor, name: str) -> te.Tensor:
        term = _expert_gemv_terms(
            fmt, w, ids, lambda s, i: x[i], n_used, n_ffn, hidden, name, False
        )
        c = te.reduce_axis((0, hidden // fmt.chunk), name="c")
        p = te.reduce_axis((0, fmt.parts), name="p")
        return te.compute(
            (n_used, n_ffn), lambda s, r: te.sum(term(s, r, c, p), axis=[c, p]), name=name
        )

    gate, up = projection(fmt_g, w_gate, "gate"), projection(fmt_u, w_up, "up")
    return te.compute((n_used, n_ffn), lambda s, r: _silu(gate[s, r]) * up[s, r], name="act")


def moe_down_residual(
    ggml_type: int, n_experts: int, n_used: int, hidden: int, n_ffn: int
) -> tirx.PrimFunc:
    """h_out = h + sum_s weights[s] * (Wd[ids[s]] . act[s]).

    Params (Wd words [E, H, row_words], ids int32[KU], weights f32[KU], act f32[KU, I],
    h f32[H], h_out f32[H]).
    """
    fmt = gemv_format(ggml_type)
    w_down = _weights(fmt, n_experts, hidden, n_ffn, "Wd")
    ids = te.placeholder((n_used,), "int32", name="ids")
    weights = te.placeholder((n_used,), "float32", name="weights")
    act = te.placeholder((n_used, n_ffn), "float32", name="act")
    h = te.placeholder((hidden,), "float32", name="h")

    term = _expert_gemv_terms(
        fmt, w_down, ids, lambda s, i: act[s, i], n_used, hidden, n_ffn, "down", True
    )
    s = te.reduce_axis((0, n_used), name="s")
    c = te.reduce_axis((0, n_ffn // fmt.chunk), name="c")
    p = te.reduce_axis((0, fmt.parts), name="p")
    down = te.compute(
        (hidden,), lambda r: te.sum(weights[s] * term(s, r, c, p), axis=[s, c, p]), name="down"
    )
    h_out = te.compute((hidden,), lambda r: h[r] + down[r], name="h_out")
    symbol = moe_down_residual_symbol(ggml_type, n_experts, n_used, hidden, n_ffn)
    func = te.create_prim_func([w_down, ids, weights, act, h, h_out])
    return func.with_attr("global_symbol", symbol)


def moe_gate_up_silu_reference(
    type_gate: int,
    gate_data: npt.NDArray[np.uint8],
    type_up: int,
    up_data: npt.NDArray[np.uint8],
    ids: npt.NDArray[np.int32],
    x: npt.NDArray[np.float32],
) -> np.ndarray:
    """numpy oracle: expert data uint8[E, I, row_bytes]; GEMVs in float64, SiLU in float32."""
    gate = gemv_experts_reference(type_gate, gate_data, ids, x)
    up = gemv_experts_reference(type_up, up_data, ids, x)
    with np.errstate(over="ignore"):  # exp(-gate) = inf for gate << 0 gives silu = -0: right
        return (silu(gate) * up).astype(np.float32)


def moe_down_residual_reference(
    ggml_type: int,
    down_data: npt.NDArray[np.uint8],
    ids: npt.NDArray[np.int32],
    weights: npt.NDArray[np.float32],
    act: npt.NDArray[np.float32],
    h: npt.NDArray[np.float32],
) -> np.ndarray:
    """numpy oracle: expert data uint8[E, H, row_bytes]; weighted sum and residual in float64."""
    down = gemv_experts_reference(ggml_type, down_data, ids, act).astype(np.float64)
    mixed = (weights.astype(np.float64)[:, None] * down).sum(axis=0)
    return (h.astype(np.float64) + mixed).astype(np.float32)


def moe_gate_up_silu_routed_reference(
    type_gate: int,
    gate_data: npt.NDArray[np.uint8],
    type_up: int,
    up_data: npt.NDArray[np.uint8],
    logits: npt.NDArray[np.float32],
    h: npt.NDArray[np.float32],
    norm_w: npt.NDArray[np.float32],
    n_used: int,
    eps: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy oracle of moe_gate_up_silu_routed: (act, ids, weights)."""
    ids, weights = router_topk_reference(logits, n_used)
    x = rms_norm_reference(h, norm_w, eps)
    return moe_gate_up_silu_reference(type_gate, gate_data, type_up, up_data, ids, x), ids, weights
