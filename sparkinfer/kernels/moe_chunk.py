"""MoE over a chunk of T tokens, grouped by expert on the device: unscheduled TIR + numpy
references.

After `router.router_topk_rows` has chosen ids[T, KU] and weights[T, KU] for every token:
  moe_sort:          a counting sort of the chunk's (token, slot) pairs by expert, on the device
                     (no host sync): offsets[E + 1] (expert e owns sorted rows
                     offsets[e] .. offsets[e + 1]), row_token[T * KU] (the token of each sorted
                     row) and row_of[T, KU] (the sorted row of each pair). Tokens at or past
                     n_valid (the chunk's padding) are left out; pairs keep token order within
                     an expert, so the result is deterministic.
  grouped_gemm:      y[r, n] = W[e(r), n] . x[row_token[r]] (gathered: gate and up) or
                     W[e(r), n] . x[r] (not gathered: down), for the rows r of each expert e.
  silu_mul:          act = silu(gate) * up (`vecmath.sigmoid_f32`: a loop that vectorizes).
  moe_combine_residual: h_out[t] = h[t] + sum_j weights[t, j] * y[row_of[t, j]] (a gather,
                     so no atomics); padding tokens keep h.

`grouped_gemm` dequantizes each expert's rows once per chunk, `TILE_N` rows and `K_TILE`
weights at a time into a float32 tile [K_TILE, TILE_N] (`gemm.dequant_tile_value`, the GEMV's
decoders), and multiplies the tile by every row that chose the expert, ROW_BLOCK rows at a
time (their x K-tile staged beside it): weights are read and decoded once per chunk, not once
per token. The partial sums of the K tiles pass through y (each tile adds to what the earlier
ones stored), so the tiles stay small (L1 on the CPU, shared memory on the GPU) whatever the
number of rows. The loop over an expert's rows has a trip count read from `offsets` on the
device; an expert no row chose skips its dequantization too.
"""

import math

import numpy as np
import numpy.typing as npt
from tvm import tirx

from sparkinfer import quant
from sparkinfer.kernels.gemm import dequant_tile_value
from sparkinfer.kernels.gemv import gemv_format
from sparkinfer.kernels.vecmath import sigmoid_f32
from sparkinfer.reference.qwen3moe import silu

Expr = tirx.Expr
# Rows of an expert's weight dequantized together: one AVX-512 float32 vector on the CPU.
TILE_N = 16
# Sorted rows multiplied by a tile at once: ROW_BLOCK independent accumulator rows, each x
# value broadcast against one tile row (register blocking; a lone accumulator would chain
# every multiply-add on the previous one). 8 covers the CPU's FMA latency (4 measured ~20 %
# slower on the chunk's expert GEMMs).
ROW_BLOCK = 8
# Weights of a K tile: one K-quant super-block (a whole number of every format's chunks). A
# tile's dequantized weights [K_TILE, TILE_N] and staged x rows [ROW_BLOCK, K_TILE] are 16 and
# 8 KiB: L1 on the CPU, shared memory well under 48 KiB on the GPU.
K_TILE = 256


def moe_sort(n_tokens: int, n_experts: int, n_used: int) -> tirx.PrimFunc:
    """Params (ids int32[T, KU], n_valid int32[1], offsets int32[E + 1], row_token int32[T*KU],
    row_of int32[T, KU]). Ids are clamped into [0, E); sorted rows past offsets[E] hold token 0
    and padding pairs map to row 0 (both are never used).

    Expert by expert, so the experts can go in parallel (a GPU thread each): expert e counts
    its pairs, its start is the sum of the counts before it, then it scans the pairs in token
    order again and places its own. Every expert reads all T * KU ids twice (E times the work of
    one serial pass, all of it independent: a serial pass on a GPU thread is a chain of
    dependent loads, 358 us at T = 512 on an H200)."""
    from tvm.script import tirx as T

    NT, E, KU = n_tokens, n_experts, n_used

    def expert(ids: tirx.Buffer, t: Expr, j: Expr) -> Expr:
        return tirx.max(tirx.min(ids[t, j], E - 1), 0)

    @T.prim_func(private=True, s_tir=True)
    def func(ids: T.Buffer((NT, KU), "int32"), n_valid: T.Buffer((1,), "int32"),
             offsets: T.Buffer((E + 1,), "int32"), row_token: T.Buffer((NT * KU,), "int32"),
             row_of: T.Buffer((NT, KU), "int32")):
        T.func_attr({"tirx.noalias": True})
        count = T.sblock_alloc_buffer((E,), "int32")
        start = T.sblock_alloc_buffer((E + 1,), "int32")
        for _ in range(1):  # the stages in one scope: one thread block on a GPU
            for e in range(E):
                with T.sblock("count"):
                    ve = T.axis.spatial(E, e)
                    T.reads(ids[0:NT, 0:KU], n_valid[0])
                    T.writes(count[ve])
                    # stages sum in a register and store once (a GPU stage's buffers are shared)
                    n = T.sblock_alloc_buffer((1,), "int32", scope="local")
                    # (each pair's expert into a register before the test: a GPU's ids are in
                    # shared memory, which TVM cannot read inside a condition)
                    pair_expert = T.sblock_alloc_buffer((1,), "int32", scope="local")
                    n[0] = 0
                    for t, j in T.grid(NT, KU):
                        pair_expert[0] = expert(ids, t, j)
                        if t < n_valid[0] and pair_expert[0] == ve:
                            n[0] = n[0] + 1
                    count[ve] = n[0]
            for e in range(E + 1):
                with T.sblock("start"):
                    ve = T.axis.spatial(E + 1, e)
                    T.reads(count[0:E])
                    T.writes(start[ve], offsets[ve])
                    n = T.sblock_alloc_buffer((1,), "int32", scope="local")
                    n[0] = 0
                    for before in range(ve):
                        n[0] = n[0] + count[before]
                    start[ve] = n[0]
                    offsets[ve] = n[0]
            for e in range(E):
                with T.sblock("place"):
                    ve = T.axis.spatial(E, e)
                    T.reads(ids[0:NT, 0:KU], n_valid[0], start[ve])
                    T.writes(row_token[0:NT * KU], row_of[0:NT, 0:KU])
                    fill = T.sblock_alloc_buffer((1,), "int32", scope="local")
                    pair_expert = T.sblock_alloc_buffer((1,), "int32", scope="local")
                    fill[0] = start[ve]
                    for t, j in T.grid(NT, KU):
                        pair_expert[0] = expert(ids, t, j)
                        if t < n_valid[0] and pair_expert[0] == ve:
                            row_token[fill[0]] = t
                            row_of[t, j] = fill[0]
                            fill[0] = fill[0] + 1
            for r in range(NT * KU):
                with T.sblock("clear_rows"):
                    vr = T.axis.spatial(NT * KU, r)
                    T.reads(offsets[E])
                    T.writes(row_token[vr])
                    if vr >= offsets[E]:  # (the output, not the stage: a GPU keeps the stage in shared memory)
                        row_token[vr] = 0
            for t, j in T.grid(NT, KU):
                with T.sblock("clear_pairs"):
                    vt, vj = T.axis.remap("SS", [t, j])
                    T.reads(n_valid[0])
                    T.writes(row_of[vt, vj])
                    if vt >= n_valid[0]:
                        row_of[vt, vj] = 0

    return func.with_attr("global_symbol", f"moe_sort_{NT}x{E}_top{KU}")


def grouped_gemm_symbol(ggml_type: int, n_experts: int, rows: int, n: int, k: int, gather: bool) -> str:
    name = gemv_format(ggml_type).name.lower()
    return f"grouped_gemm_{name}_{n_experts}x{n}x{k}_r{rows}{'_gather' if gather else ''}"


def k_tile(k: int) -> int:
    """Weights of grouped_gemm's K tile at row length k: K_TILE, or the most of it k allows
    (a whole number of every format's chunks, which divide both)."""
    return math.gcd(k, K_TILE)


def grouped_gemm(ggml_type: int, n_experts: int, rows: int, n: int, k: int, x_rows: int,
                 gather: bool) -> tirx.PrimFunc:
    """y[r, :] = W[e] . x[row_token[r] if gather else r] for offsets[e] <= r < offsets[e+1].

    Params (W words [E, n, row_words], offsets int32[E + 1], row_token int32[rows],
    x f32[x_rows, k], y f32[rows, n]); rows past offsets[E] are not written. n must be a
    multiple of TILE_N."""
    from tvm.script import tirx as T

    fmt = gemv_format(ggml_type)
    if n % TILE_N:
        raise ValueError(f"grouped_gemm needs n a multiple of {TILE_N}, got {n}")
    E, R, N, K, XR, TN, RB, KT = n_experts, rows, n, k, x_rows, TILE_N, ROW_BLOCK, k_tile(k)
    RW = fmt.row_words(k)
    C, P = k // fmt.chunk, fmt.parts
    has_scale, has_min = fmt.scale is not None, fmt.min is not None

    def row(w: tirx.Buffer, e: Expr, r: Expr):  # noqa: ANN202
        return lambda i: w[e, r, i]

    def scale_of(w: tirx.Buffer, e: Expr, r: Expr, c: Expr, p: Expr) -> Expr:
        return fmt.scale(row(w, e, r), c, p) if has_scale else tirx.const(1.0, "float32")

    def min_of(w: tirx.Buffer, e: Expr, r: Expr, c: Expr, p: Expr) -> Expr:
        return fmt.min(row(w, e, r), c, p) if has_min else tirx.const(0.0, "float32")

    def weight(w: tirx.Buffer, sc: tirx.Buffer, mn: tirx.Buffer, e: Expr, r: Expr, i: Expr, kk: Expr) -> Expr:
        return dequant_tile_value(fmt, row(w, e, r), kk,
                                  (lambda c, p: sc[i, c, p]) if has_scale else None,
                                  (lambda c, p: mn[i, c, p]) if has_min else None)

    def sorted_row(offsets: tirx.Buffer, e: Expr, block: Expr, i: Expr) -> Expr:
        """Row i of group `block` of expert e's rows, clamped to its last row (a group's tail
        past the expert's rows computes a copy of that row and does not store it)."""
        return offsets[e] + tirx.min(block * RB + i, offsets[e + 1] - offsets[e] - 1)

    def x_row(row_token: tirx.Buffer, r: Expr) -> Expr:
        return tirx.max(tirx.min(row_token[r], XR - 1), 0) if gather else r

    @T.prim_func(private=True, s_tir=True)
    def func(w: T.Buffer((E, N, RW), fmt.word_dtype), offsets: T.Buffer((E + 1,), "int32"),
             row_token: T.Buffer((R,), "int32"), x: T.Buffer((XR, K), "float32"),
             y: T.Buffer((R, N), "float32")):
        T.func_attr({"tirx.noalias": True})
        for e, tile in T.grid(E, N // TN):
            with T.sblock("tile"):
                ve, vt = T.axis.remap("SS", [e, tile])
                sc = T.sblock_alloc_buffer((TN, C, P), "float32")
                mn = T.sblock_alloc_buffer((TN, C, P), "float32")
                wt = T.sblock_alloc_buffer((KT, TN), "float32")
                xs = T.sblock_alloc_buffer((RB, KT), "float32")
                acc = T.sblock_alloc_buffer((RB, TN), "float32", scope="local")
                # An expert no token chose costs nothing, not even its dequantization.
                for i, c, p in T.grid(TN, T.if_then_else(offsets[ve] < offsets[ve + 1], C, 0), P):
                    with T.sblock("scale"):
                        vi, vc, vp = T.axis.remap("SSS", [i, c, p])
                        sc[vi, vc, vp] = scale_of(w, ve, vt * TN + vi, vc, vp)
                        mn[vi, vc, vp] = min_of(w, ve, vt * TN + vi, vc, vp)
                for ko in range(T.if_then_else(offsets[ve] < offsets[ve + 1], K // KT, 0)):
                    for kk, i in T.grid(KT, TN):
                        with T.sblock("dequant"):
                            # spatial, not opaque: the CPU rule reorders this block's loops
                            vo = T.axis.spatial(K // KT, ko)
                            vk, vi = T.axis.remap("SS", [kk, i])
                            wt[vk, vi] = weight(w, sc, mn, ve, vt * TN + vi, vi, vo * KT + vk)
                    for rb in range((offsets[ve + 1] - offsets[ve] + RB - 1) // RB):
                        for ri, i in T.grid(RB, TN):
                            with T.sblock("init"):
                                vo = T.axis.opaque(K // KT, ko)
                                vb = T.axis.opaque(R, rb)
                                vri, vi = T.axis.remap("SS", [ri, i])
                                # the earlier K tiles' partial sums, stored in y
                                acc[vri, vi] = T.if_then_else(
                                    vo == 0, T.float32(0), y[sorted_row(offsets, ve, vb, vri), vt * TN + vi])
                        for ri, kk in T.grid(RB, KT):
                            with T.sblock("xload"):
                                vo = T.axis.opaque(K // KT, ko)
                                vb = T.axis.opaque(R, rb)
                                vri, vk = T.axis.remap("SS", [ri, kk])
                                xs[vri, vk] = x[x_row(row_token, sorted_row(offsets, ve, vb, vri)), vo * KT + vk]
                        for kk, ri, i in T.grid(KT, RB, TN):
                            with T.sblock("fma"):
                                vk, vri, vi = T.axis.remap("RSS", [kk, ri, i])
                                acc[vri, vi] = acc[vri, vi] + xs[vri, vk] * wt[vk, vi]
                        for ri, i in T.grid(RB, TN):
                            with T.sblock("store"):
                                vb = T.axis.opaque(R, rb)
                                vri, vi = T.axis.remap("SS", [ri, i])
                                if vb * RB + vri < offsets[ve + 1] - offsets[ve]:
                                    y[sorted_row(offsets, ve, vb, vri), vt * TN + vi] = acc[vri, vi]

    return func.with_attr("global_symbol", grouped_gemm_symbol(ggml_type, E, R, N, K, gather))


def silu_mul(rows: int, n: int) -> tirx.PrimFunc:
    """act = silu(gate) * up; params (gate f32[rows, n], up f32[rows, n], act f32[rows, n])."""
    from tvm import te

    gate = te.placeholder((rows, n), "float32", name="gate")
    up = te.placeholder((rows, n), "float32", name="up")
    act = te.compute((rows, n), lambda r, i: gate[r, i] * sigmoid_f32(gate[r, i]) * up[r, i], name="act")
    return te.create_prim_func([gate, up, act]).with_attr("global_symbol", f"silu_mul_{rows}x{n}")


def moe_combine_residual(n_tokens: int, n_used: int, rows: int, hidden: int) -> tirx.PrimFunc:
    """h_out[t] = h[t] + sum_j weights[t, j] * y[row_of[t, j]] for t < n_valid, h[t] after.

    Params (y f32[rows, H], row_of int32[T, KU], weights f32[T, KU], h f32[T, H],
    n_valid int32[1], h_out f32[T, H])."""
    from tvm import te

    y = te.placeholder((rows, hidden), "float32", name="y")
    row_of = te.placeholder((n_tokens, n_used), "int32", name="row_of")
    weights = te.placeholder((n_tokens, n_used), "float32", name="weights")
    h = te.placeholder((n_tokens, hidden), "float32", name="h")
    n_valid = te.placeholder((1,), "int32", name="n_valid")
    j = te.reduce_axis((0, n_used), name="j")

    def term(t: Expr, i: Expr) -> Expr:
        r = tirx.max(tirx.min(row_of[t, j], rows - 1), 0)
        return tirx.Select(t < n_valid[0], weights[t, j] * y[r, i], tirx.const(0.0, "float32"))

    ffn = te.compute((n_tokens, hidden), lambda t, i: te.sum(term(t, i), axis=j), name="ffn")
    h_out = te.compute((n_tokens, hidden), lambda t, i: h[t, i] + ffn[t, i], name="h_out")
    return te.create_prim_func([y, row_of, weights, h, n_valid, h_out]).with_attr(
        "global_symbol", f"moe_combine_residual_{n_tokens}x{hidden}_top{n_used}")


# ---- numpy references ------------------------------------------------------------------


def moe_sort_reference(ids: npt.NDArray[np.int32], n_valid: int, n_experts: int
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets, row_token, row_of) as moe_sort writes them."""
    n_tokens, n_used = ids.shape
    pairs = [(int(ids[t, j]), t, j) for t in range(n_valid) for j in range(n_used)]
    order = sorted(range(len(pairs)), key=lambda i: (pairs[i][0], i))
    counts = np.bincount([p[0] for p in pairs], minlength=n_experts)[:n_experts]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    row_token = np.zeros(n_tokens * n_used, np.int32)
    row_of = np.zeros((n_tokens, n_used), np.int32)
    for r, i in enumerate(order):
        _, t, j = pairs[i]
        row_token[r], row_of[t, j] = t, r
    return offsets, row_token, row_of


def grouped_gemm_reference(ggml_type: int, data: npt.NDArray[np.uint8], offsets: npt.NDArray[np.int32],
                           row_token: npt.NDArray[np.int32], x: npt.NDArray[np.float32], gather: bool
                           ) -> tuple[np.ndarray, np.ndarray]:
    """(y, magnitude), float64 [offsets[E], n]: y as grouped_gemm writes its rows (GGUF bytes
    `data` [E, n, row_bytes]), and |W| . |x| per element (the scale of its float32 rounding,
    for `testing.assert_gemv_close`)."""
    n, k = data.shape[1], x.shape[1]
    xs = x[row_token[:offsets[-1]]] if gather else x[:offsets[-1]]
    y = np.zeros((offsets[-1], n))
    magnitude = np.zeros((offsets[-1], n))
    for e in range(data.shape[0]):
        lo, hi = offsets[e], offsets[e + 1]
        if hi > lo:
            w = quant.dequantize(ggml_type, data[e], (n, k)).astype(np.float64)
            y[lo:hi] = xs[lo:hi] @ w.T
            magnitude[lo:hi] = np.abs(xs[lo:hi]) @ np.abs(w).T
    return y, magnitude


def moe_chunk_reference(
    gate: tuple[int, npt.NDArray[np.uint8]],
    up: tuple[int, npt.NDArray[np.uint8]],
    down: tuple[int, npt.NDArray[np.uint8]],
    ids: npt.NDArray[np.int32],
    weights: npt.NDArray[np.float32],
    x: npt.NDArray[np.float32],
    h: npt.NDArray[np.float32],
    n_valid: int,
) -> np.ndarray:
    """h_out f32[T, H] of the whole chunk pipeline: (ggml type, GGUF bytes [E, rows, row_bytes])
    per weight; token by token in float64, as `reference.qwen3moe` does it."""
    def dense(t: int, data: np.ndarray, e: int, cols: int) -> np.ndarray:
        return quant.dequantize(t, data[e], (data.shape[1], cols)).astype(np.float64)

    hidden, ffn = x.shape[1], gate[1].shape[1]
    out = h.astype(np.float64).copy()
    for t in range(n_valid):
        for j, e in enumerate(ids[t]):
            g = dense(gate[0], gate[1], e, hidden) @ x[t]
            u = dense(up[0], up[1], e, hidden) @ x[t]
            out[t] += weights[t, j] * (dense(down[0], down[1], e, ffn) @ (silu(g) * u))
    return out.astype(np.float32)
