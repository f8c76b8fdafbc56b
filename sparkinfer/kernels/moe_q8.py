"""The fused MoE expert FFN of `kernels.moe` on int8 activations (`kernels.gemv_q8`).

  moe_gate_up_silu_q8:  act[s, i] = silu(Wg[ids[s], i] . x̂) * (Wu[ids[s], i] . x̂), written as
                        â = its int8 blocks of 32 (`gemv_q8.quantize_q8_1` as the epilogue)
  moe_down_residual_q8: h_out[n]  = h[n] + sum_s weights[s] * (Wd[ids[s], n] . â[s])

`moe_gate_up_silu_q8_routed` (router_merge="gate_up") is the gate/up kernel taking the router's
logits instead of ids: every thread block runs `router.topk` first (as `moe.moe_gate_up_silu_routed`
does) and writes the ids and weights `moe_down_residual_q8` reads, so no router_topk launch sits
between the router GEMV and the experts. `moe_gate_up_silu_q8_routed_prefetch` (expert_prefetch="down")
is that kernel taking the down experts' words too, which no stage reads: PREFETCH_EXPERTS_ATTR
names them, and on a GPU the compiler has each thread block ask the L2 for its share of the chosen
experts' down rows once the ids are stored (compiler/l2_prefetch.py), so that the down kernel after
it finds them there.

x̂ is the FFN input quantized once (`gemv_q8.add_rms_norm_q8_1`, or `quantize_q8_1(H)`; gate and
up share it), â the activations quantized per slot inside the gate/up kernel, so that no launch
sits between the two kernels (bench/NOTES.md, "Session 15": as a launch of its own the quantizer
cost what the int8 GEMVs saved). Block names and loop order follow `kernels.moe` (gate_dot/gate,
up_dot/up, act; down_dot/down, h_out), the dot blocks holding int32 sums of dp4a products and no
x-sum blocks (the quantizer made the block sums), so the MoE schedule's layout carries over. The
`_lanes` factories are the gate/up, routed gate/up and down kernels with their sums in
`gemv_q8.q8_lane_sum`'s lane form (blocks gate_lanes / gate_mins / gate, ...; the step variant
int8_dots "lanes", the cpu's). The oracles are `kernels.moe`'s on x̂ and â, the gate/up's
quantized by `quantize_q8_1_reference`, for both forms.
"""

import numpy as np
import numpy.typing as npt
from tvm import te, tirx

from sparkinfer.kernels.gemv import GemvFormat
from sparkinfer.kernels.gemv_q8 import (
    Row,
    RowOf,
    dequantize_q8_1,
    q8_1_stages,
    q8_format,
    q8_inputs,
    q8_lane_sum,
    q8_terms,
    quantize_q8_1_reference,
)
from sparkinfer.kernels.moe import (
    _silu,
    _weights,
    moe_down_residual_reference,
    moe_gate_up_silu_reference,
)
from sparkinfer.kernels.router import router_topk_reference, topk

Expr = tirx.Expr
# A kernel's attribute naming what its thread blocks prefetch into the L2 once its expert ids are
# stored (compiler/l2_prefetch.py): {"weights": a stack of expert weights [E, ...], "ids": the
# int32[KU] ids picking KU of them, "expert_bytes": the bytes of one expert of the stack, "after":
# the stage after which the ids are read (`router.topk`'s last, "weights")}.
PREFETCH_EXPERTS_ATTR = "sparkinfer.l2_prefetch_experts"
# cp.async.bulk's unit: a prefetch's address and size are multiples of 16 bytes (PTX ISA
# 9.7.10.28.4.3), so each expert of such a stack starts at one.
PREFETCH_ALIGN = 16


def _expert_row(w: te.Tensor, ids: te.Tensor) -> RowOf:
    """Row r of expert ids[slot] of all experts' words w [E, rows, row_words]."""
    n_experts = int(w.shape[0])

    def row_of(e: tuple[Expr, ...], r: Expr) -> Row:
        # Clamped so that TVM can bound the access (see gemv.gemv_tensors).
        expert = tirx.max(tirx.min(ids[e[0]], n_experts - 1), 0)
        return lambda i: w[expert, r, i]

    return row_of


def moe_gate_up_silu_q8_symbol(type_gate: int, type_up: int, n_experts: int, n_used: int,
                               n_ffn: int, hidden: int) -> str:
    g, u = q8_format(type_gate).name.lower(), q8_format(type_up).name.lower()
    return f"moe_gate_up_silu_q8_{g}_{u}_{n_experts}x{n_ffn}x{hidden}_top{n_used}"


def moe_gate_up_silu_q8(type_gate: int, type_up: int, n_experts: int, n_used: int, n_ffn: int,
                        hidden: int) -> tirx.PrimFunc:
    """Params (Wg words [E, I, row_words], Wu words [E, I, row_words'], ids int32[KU],
    xq int32[H/4], xd f32[H/32], xs f32[H/32], aq int32[KU, I/4], ad f32[KU, I/32],
    as f32[KU, I/32]): act as the int8 blocks `moe_down_residual_q8` reads (on a GPU a thread
    block holds whole blocks of 32 rows, `schedule.moe_q8.MoeGateUpSiluQ8CudaRule`)."""
    symbol = moe_gate_up_silu_q8_symbol(type_gate, type_up, n_experts, n_used, n_ffn, hidden)
    return _gate_up_silu_q8_func(type_gate, type_up, n_experts, n_used, n_ffn, hidden, False, symbol)


def moe_gate_up_silu_q8_lanes(type_gate: int, type_up: int, n_experts: int, n_used: int, n_ffn: int,
                              hidden: int) -> tirx.PrimFunc:
    """`moe_gate_up_silu_q8` with gate and up in the lane form (`gemv_q8.q8_lane_sum`; the step
    variant int8_dots "lanes", the cpu's): the same parameters and oracle."""
    symbol = moe_gate_up_silu_q8_symbol(type_gate, type_up, n_experts, n_used, n_ffn, hidden).replace(
        "moe_gate_up_silu_q8_", "moe_gate_up_silu_q8_lanes_", 1)
    return _gate_up_silu_q8_func(type_gate, type_up, n_experts, n_used, n_ffn, hidden, True, symbol)


def _gate_up_silu_q8_func(type_gate: int, type_up: int, n_experts: int, n_used: int, n_ffn: int,
                          hidden: int, lanes: bool, symbol: str) -> tirx.PrimFunc:
    """`moe_gate_up_silu_q8`'s function, its dots in the lane form where `lanes`."""
    ids = te.placeholder((n_used,), "int32", name="ids")
    (w_gate, w_up, xq, xd, xs), act = _gate_up_silu_q8(type_gate, type_up, n_experts, n_ffn, hidden, ids, lanes)
    aq, ad, as_ = q8_1_stages((n_used,), n_ffn, lambda ax, i: act[ax[0], i])
    return te.create_prim_func([w_gate, w_up, ids, xq, xd, xs, aq, ad, as_]).with_attr("global_symbol", symbol)


def moe_gate_up_silu_q8_routed_symbol(type_gate: int, type_up: int, n_experts: int, n_used: int,
                                      n_ffn: int, hidden: int) -> str:
    return moe_gate_up_silu_q8_symbol(type_gate, type_up, n_experts, n_used, n_ffn, hidden).replace(
        "moe_gate_up_silu_q8_", "moe_gate_up_silu_q8_routed_", 1)


def moe_gate_up_silu_q8_routed(type_gate: int, type_up: int, n_experts: int, n_used: int, n_ffn: int,
                               hidden: int) -> tirx.PrimFunc:
    """`moe_gate_up_silu_q8` with `router_topk` as its prologue (module docstring): ids, weights =
    router_topk(logits), then act's int8 blocks from the experts ids.

    Params (Wg, Wu words as in `moe_gate_up_silu_q8`, logits f32[E], xq, xd, xs, aq, ad, as as
    there, ids int32[KU], weights f32[KU])."""
    w_gate, w_up, *rest = _routed_tensors(type_gate, type_up, n_experts, n_used, n_ffn, hidden)
    symbol = moe_gate_up_silu_q8_routed_symbol(type_gate, type_up, n_experts, n_used, n_ffn, hidden)
    return te.create_prim_func([w_gate, w_up, *rest]).with_attr("global_symbol", symbol)


def moe_gate_up_silu_q8_routed_lanes(type_gate: int, type_up: int, n_experts: int, n_used: int, n_ffn: int,
                                     hidden: int) -> tirx.PrimFunc:
    """`moe_gate_up_silu_q8_routed` with gate and up in the lane form (`gemv_q8.q8_lane_sum`; the
    step variant int8_dots "lanes", the cpu's): the same parameters and oracle."""
    w_gate, w_up, *rest = _routed_tensors(type_gate, type_up, n_experts, n_used, n_ffn, hidden, lanes=True)
    symbol = moe_gate_up_silu_q8_routed_symbol(type_gate, type_up, n_experts, n_used, n_ffn, hidden).replace(
        "moe_gate_up_silu_q8_routed_", "moe_gate_up_silu_q8_routed_lanes_", 1)
    return te.create_prim_func([w_gate, w_up, *rest]).with_attr("global_symbol", symbol)


def _routed_tensors(type_gate: int, type_up: int, n_experts: int, n_used: int, n_ffn: int,
                    hidden: int, lanes: bool = False) -> list[te.Tensor]:
    """`moe_gate_up_silu_q8_routed`'s parameters, in order (its dots in the lane form where `lanes`)."""
    if not 0 < n_used <= n_experts:
        raise ValueError(f"need 0 < experts used <= experts, got {n_used} of {n_experts}")
    logits = te.placeholder((n_experts,), "float32", name="logits")
    ids, weights = topk(logits, (), n_experts, n_used)
    (w_gate, w_up, xq, xd, xs), act = _gate_up_silu_q8(type_gate, type_up, n_experts, n_ffn, hidden, ids, lanes)
    aq, ad, as_ = q8_1_stages((n_used,), n_ffn, lambda ax, i: act[ax[0], i])
    return [w_gate, w_up, logits, xq, xd, xs, aq, ad, as_, ids, weights]


def moe_gate_up_silu_q8_routed_prefetch_symbol(type_gate: int, type_up: int, n_experts: int, n_used: int,
                                               n_ffn: int, hidden: int, type_down: int) -> str:
    g, u, d = (q8_format(t).name.lower() for t in (type_gate, type_up, type_down))
    return f"moe_gate_up_silu_q8_routed_prefetch_{g}_{u}_{d}_{n_experts}x{n_ffn}x{hidden}_top{n_used}"


def moe_gate_up_silu_q8_routed_prefetch(type_gate: int, type_up: int, n_experts: int, n_used: int, n_ffn: int,
                                        hidden: int, type_down: int) -> tirx.PrimFunc:
    """`moe_gate_up_silu_q8_routed` with the down experts' words Wd [E, H, row_words] (of
    `type_down`) as its third input, which no stage reads and PREFETCH_EXPERTS_ATTR names (module
    docstring); its outputs are exactly `moe_gate_up_silu_q8_routed`'s.

    Params (Wg, Wu, Wd words, logits f32[E], xq, xd, xs, aq, ad, as, ids int32[KU], weights f32[KU])."""
    fmt_d = q8_format(type_down)
    expert_bytes = hidden * fmt_d.row_words(n_ffn) * fmt_d.word_bytes
    if expert_bytes % PREFETCH_ALIGN:
        raise ValueError(f"an L2 prefetch starts at a multiple of {PREFETCH_ALIGN} bytes: one {fmt_d.name} "
                         f"down expert of {hidden}x{n_ffn} is {expert_bytes} bytes")
    w_gate, w_up, *rest = _routed_tensors(type_gate, type_up, n_experts, n_used, n_ffn, hidden)
    w_down = _weights(fmt_d, n_experts, hidden, n_ffn, "Wd")
    symbol = moe_gate_up_silu_q8_routed_prefetch_symbol(type_gate, type_up, n_experts, n_used, n_ffn, hidden,
                                                        type_down)
    func = te.create_prim_func([w_gate, w_up, w_down, *rest]).with_attr("global_symbol", symbol)
    prefetch = {"weights": "Wd", "ids": "ids", "expert_bytes": expert_bytes, "after": "weights"}
    return func.with_attr(PREFETCH_EXPERTS_ATTR, prefetch)


def _gate_up_silu_q8(type_gate: int, type_up: int, n_experts: int, n_ffn: int, hidden: int,
                     ids: te.Tensor, lanes: bool = False) -> tuple[tuple[te.Tensor, ...], te.Tensor]:
    """The inputs (Wg, Wu, xq, xd, xs) and the stages gate, up (with their _dot producers, or in
    the lane form where `lanes` their _lanes and _mins) and act = silu(gate) * up of the experts
    `ids` (a parameter, or the top-k's stage)."""
    n_used = int(ids.shape[0])
    fmt_g, fmt_u = q8_format(type_gate), q8_format(type_up)
    w_gate = _weights(fmt_g, n_experts, n_ffn, hidden, "Wg")
    w_up = _weights(fmt_u, n_experts, n_ffn, hidden, "Wu")
    xq, xd, xs = q8_inputs(hidden)

    def projection(fmt: GemvFormat, w: te.Tensor, name: str) -> te.Tensor:
        if lanes:
            return q8_lane_sum(fmt, (n_used,), n_ffn, hidden, _expert_row(w, ids), lambda e, i: xq[i],
                               lambda e, b: xd[b], lambda e, b: xs[b], name)
        term = q8_terms(fmt, (n_used,), n_ffn, hidden, _expert_row(w, ids),
                        lambda e, i: xq[i], lambda e, b: xd[b], lambda e, b: xs[b], f"{name}_dot")
        c = te.reduce_axis((0, hidden // fmt.chunk), name="c")
        p = te.reduce_axis((0, fmt.parts), name="p")
        return te.compute((n_used, n_ffn), lambda s, r: te.sum(term((s,), r, c, p), axis=[c, p]),
                          name=name)

    gate, up = projection(fmt_g, w_gate, "gate"), projection(fmt_u, w_up, "up")
    act = te.compute((n_used, n_ffn), lambda s, r: _silu(gate[s, r]) * up[s, r], name="act")
    return (w_gate, w_up, xq, xd, xs), act


def moe_down_residual_q8_symbol(ggml_type: int, n_experts: int, n_used: int, hidden: int,
                                n_ffn: int) -> str:
    name = q8_format(ggml_type).name.lower()
    return f"moe_down_residual_q8_{name}_{n_experts}x{hidden}x{n_ffn}_top{n_used}"


def moe_down_residual_q8(ggml_type: int, n_experts: int, n_used: int, hidden: int,
                         n_ffn: int) -> tirx.PrimFunc:
    """Params (Wd words [E, H, row_words], ids int32[KU], weights f32[KU], aq int32[KU, I/4],
    ad f32[KU, I/32], as f32[KU, I/32], h f32[H], h_out f32[H])."""
    symbol = moe_down_residual_q8_symbol(ggml_type, n_experts, n_used, hidden, n_ffn)
    return _down_residual_q8_func(ggml_type, n_experts, n_used, hidden, n_ffn, False, symbol)


def moe_down_residual_q8_lanes(ggml_type: int, n_experts: int, n_used: int, hidden: int,
                               n_ffn: int) -> tirx.PrimFunc:
    """`moe_down_residual_q8` in the lane form (`gemv_q8.q8_lane_sum`, each slot's rows weighted in
    the lanes; the step variant int8_dots "lanes", the cpu's): the same parameters and oracle."""
    symbol = moe_down_residual_q8_symbol(ggml_type, n_experts, n_used, hidden, n_ffn).replace(
        "moe_down_residual_q8_", "moe_down_residual_q8_lanes_", 1)
    return _down_residual_q8_func(ggml_type, n_experts, n_used, hidden, n_ffn, True, symbol)


def _down_residual_q8_func(ggml_type: int, n_experts: int, n_used: int, hidden: int, n_ffn: int,
                           lanes: bool, symbol: str) -> tirx.PrimFunc:
    """`moe_down_residual_q8`'s function, its dots in the lane form where `lanes`."""
    fmt = q8_format(ggml_type)
    w_down = _weights(fmt, n_experts, hidden, n_ffn, "Wd")
    ids = te.placeholder((n_used,), "int32", name="ids")
    weights = te.placeholder((n_used,), "float32", name="weights")
    aq, ad, as_ = q8_inputs(n_ffn, (n_used,), "a")
    h = te.placeholder((hidden,), "float32", name="h")
    if lanes:
        down = q8_lane_sum(fmt, (n_used,), hidden, n_ffn, _expert_row(w_down, ids), lambda e, i: aq[e[0], i],
                           lambda e, b: ad[e[0], b], lambda e, b: as_[e[0], b], "down",
                           slot_weight=lambda s: weights[s])
    else:
        term = q8_terms(fmt, (n_used,), hidden, n_ffn, _expert_row(w_down, ids),
                        lambda e, i: aq[e[0], i], lambda e, b: ad[e[0], b],
                        lambda e, b: as_[e[0], b], "down_dot")
        s = te.reduce_axis((0, n_used), name="s")
        c = te.reduce_axis((0, n_ffn // fmt.chunk), name="c")
        p = te.reduce_axis((0, fmt.parts), name="p")
        down = te.compute((hidden,), lambda r: te.sum(weights[s] * term((s,), r, c, p),
                                                      axis=[s, c, p]), name="down")
    h_out = te.compute((hidden,), lambda r: h[r] + down[r], name="h_out")
    func = te.create_prim_func([w_down, ids, weights, aq, ad, as_, h, h_out])
    return func.with_attr("global_symbol", symbol)


def moe_gate_up_silu_q8_reference(type_gate: int, gate_data: npt.NDArray[np.uint8], type_up: int,
                                  up_data: npt.NDArray[np.uint8], ids: npt.NDArray[np.int32],
                                  xq: npt.NDArray[np.int32], xd: npt.NDArray[np.float32]
                                  ) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """(aq, ad, as): `kernels.moe`'s oracle on x̂, quantized by `quantize_q8_1`'s."""
    act = moe_gate_up_silu_reference(type_gate, gate_data, type_up, up_data, ids, dequantize_q8_1(xq, xd))
    return quantize_q8_1_reference(act.astype(np.float32))


def moe_gate_up_silu_q8_routed_reference(type_gate: int, gate_data: npt.NDArray[np.uint8], type_up: int,
                                         up_data: npt.NDArray[np.uint8], logits: npt.NDArray[np.float32],
                                         xq: npt.NDArray[np.int32], xd: npt.NDArray[np.float32], n_used: int
                                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(aq, ad, as, ids, weights): `router_topk`'s oracle, then `moe_gate_up_silu_q8`'s."""
    ids, weights = router_topk_reference(logits, n_used)
    return (*moe_gate_up_silu_q8_reference(type_gate, gate_data, type_up, up_data, ids, xq, xd), ids, weights)


def moe_down_residual_q8_reference(ggml_type: int, down_data: npt.NDArray[np.uint8],
                                   ids: npt.NDArray[np.int32], weights: npt.NDArray[np.float32],
                                   aq: npt.NDArray[np.int32], ad: npt.NDArray[np.float32],
                                   h: npt.NDArray[np.float32]) -> np.ndarray:
    """`kernels.moe`'s oracle on â."""
    return moe_down_residual_reference(ggml_type, down_data, ids, weights,
                                       dequantize_q8_1(aq, ad), h)

