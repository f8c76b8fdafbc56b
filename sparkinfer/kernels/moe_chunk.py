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

With float16 operands (the step variant `chunk_operands` "f16", tensor cores on the GPU) the
experts take `grouped_gate_up_silu_f16` (gate, up and SiLU in one kernel) and `grouped_gemm_f16`
(the down) instead: per (expert, F16_TILE_N outputs) and per row tile of the expert's rows,
the float16-rounded weights and x rows multiplied with float32 sums (`gemm.gemm`'s
half_operands), written as one sum over K; the CUDA rule computes their stages per K tile.
"""

import math

import numpy as np
import numpy.typing as npt
from tvm import DataType, tirx

from sparkinfer.kernels.gemm import dequant_tile_value, split_k
from sparkinfer.kernels.gemv import dequantize_rows, gemv_format
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


# Entries of each of moe_sort's two matrices [E, chunks] (the chunks' counts and starts, 2 bytes
# each up to 32767 pairs): on a GPU both sit in the block's shared memory beside the staged
# experts (a byte a pair), 16 + 16 + 4 KiB at T = 512, E = 128, KU = 8. The sort's time is its
# chunks' chains (moe_sort), so it takes the most chunks these hold: 64 at E = 128.
SORT_MATRIX_ENTRIES = 8192
# What moe_sort's shared memory (sort_shared_bytes) may take of a GPU block: the 48 KiB of static
# shared memory it holds without opting in. At T = 2048, E = 128 (16 KiB of staged experts) this,
# not SORT_MATRIX_ENTRIES, caps the chunks; at E = 4 the runs' padding does (2 bytes take 16).
SORT_SHARED_BYTES = 48 * 1024
# The GPU rule's padding of moe_sort's shared buffers (schedule/prefill_cuda.py MoeSortCudaRule):
# each matrix row an odd number of words apart (a thread per expert walking its row hits its own
# bank), each chunk's run of staged experts an odd number of 16 bytes apart (a quarter warp's
# 16-byte reads on all 32 banks). sort_shared_bytes counts them.
SORT_ROW_ALIGN_BYTES = 4
SORT_RUN_ALIGN_BYTES = 16


def sort_index_dtype(n_pairs: int) -> str:
    """moe_sort's counts and starts: int16 while they hold every pair's index."""
    return "int16" if n_pairs < 2**15 else "int32"


def sort_expert_dtype(n_experts: int) -> str:
    """moe_sort's staged experts: a byte each while every expert's index fits one."""
    return "uint8" if n_experts <= 256 else "int32"


def _odd_multiple(n_bytes: int, unit: int) -> int:
    """The least odd multiple of `unit` bytes holding n_bytes: the row strides of
    schedule/prefill_cuda.py MoeSortCudaRule's storage_align (rows an odd number of units apart,
    so that they start in different banks)."""
    units = -(-n_bytes // unit)
    return unit * (units + 1 - units % 2)


def sort_shared_bytes(n_tokens: int, n_experts: int, n_used: int, chunk_tokens: int) -> int:
    """moe_sort's shared memory on a GPU: the staged experts and the two [E, C] matrices with the
    rule's padding (SORT_RUN_ALIGN_BYTES, SORT_ROW_ALIGN_BYTES), and the experts' totals and
    starts."""
    chunks = -(-n_tokens // chunk_tokens)
    run_bytes = chunk_tokens * n_used * DataType(sort_expert_dtype(n_experts)).bits // 8
    row_bytes = chunks * DataType(sort_index_dtype(n_tokens * n_used)).bits // 8
    totals_and_starts = (2 * n_experts + 1) * 4
    return (chunks * _odd_multiple(run_bytes, SORT_RUN_ALIGN_BYTES)
            + 2 * n_experts * _odd_multiple(row_bytes, SORT_ROW_ALIGN_BYTES) + totals_and_starts)


def sort_chunk_tokens(n_tokens: int, n_experts: int, n_used: int) -> int:
    """Tokens of one of moe_sort's chunks: the fewest that keep its matrices within
    SORT_MATRIX_ENTRIES and its shared memory within SORT_SHARED_BYTES (all the tokens in one
    chunk at the most)."""
    for chunk_tokens in range(1, n_tokens):
        chunks = -(-n_tokens // chunk_tokens)
        if (n_experts * chunks <= SORT_MATRIX_ENTRIES
                and sort_shared_bytes(n_tokens, n_experts, n_used, chunk_tokens) <= SORT_SHARED_BYTES):
            return chunk_tokens
    return n_tokens


def moe_sort(n_tokens: int, n_experts: int, n_used: int) -> tirx.PrimFunc:
    """Params (ids int32[T, KU], n_valid int32[1], offsets int32[E + 1], row_token int32[T*KU],
    row_of int32[T, KU]). Ids are clamped into [0, E); sorted rows past offsets[E] hold token 0
    and padding pairs map to row 0 (both are never used).

    A counting sort over C chunks of `sort_chunk_tokens` consecutive tokens, the chunks in
    parallel (a GPU thread each): each chunk counts its pairs per expert into its column of
    `count` [E, C]; a pass per expert writes its row's exclusive prefix into `fill` [E, C] (where
    its pairs of each chunk start, counted from the expert's start) and its total; the experts'
    starts are the totals before them; then each chunk places its pairs again in token order,
    expert e's next one at start[e] + fill[e, c], counting fill[e, c] up. Pairs keep token order
    within an expert (chunk by chunk, in order within a chunk): deterministic, the same output as
    one serial pass, with work linear in T * KU. A chunk's two passes are chains of dependent
    read-modify-writes of its column (T * KU / C steps each), the sort's critical path on a GPU.

    (The passes read `count` and write `fill` rather than turning counts into starts in place:
    TVM's barrier planning takes a shared read and write of one element in a loop for a race
    unless both index it as an expression of the thread index, which its common-subexpression
    pass hoists out of an index like row * C + column. For the same reason a chunk's column is
    its thread's index plus a multiple of the expert read from memory.)"""
    from tvm.script import tirx as T

    NT, E, KU = n_tokens, n_experts, n_used
    TC = sort_chunk_tokens(NT, E, KU)
    C = -(-NT // TC)
    index = sort_index_dtype(NT * KU)
    expert = sort_expert_dtype(E)

    def valid(t: Expr, n_valid: tirx.Buffer) -> Expr:
        """Token t of a chunk is a valid one (the last chunk may run past T)."""
        below_n_valid = t < n_valid[0]
        return below_n_valid if NT % TC == 0 else tirx.all(below_n_valid, t < NT)

    @T.prim_func(private=True, s_tir=True)
    def func(ids: T.Buffer((NT, KU), "int32"), n_valid: T.Buffer((1,), "int32"),
             offsets: T.Buffer((E + 1,), "int32"), row_token: T.Buffer((NT * KU,), "int32"),
             row_of: T.Buffer((NT, KU), "int32")):
        T.func_attr({"tirx.noalias": True})
        expert_of = T.sblock_alloc_buffer((C, TC * KU), expert)  # every pair's expert, clamped, by chunk
        count = T.sblock_alloc_buffer((E, C), index)
        fill = T.sblock_alloc_buffer((E, C), index)
        total = T.sblock_alloc_buffer((E,), "int32")
        start = T.sblock_alloc_buffer((E + 1,), "int32")
        for _ in range(1):  # the stages in one scope: one thread block on a GPU
            for t, j in T.grid(NT, KU):
                with T.sblock("experts"):
                    vt, vj = T.axis.remap("SS", [t, j])
                    T.reads(ids[vt, vj])
                    T.writes(expert_of[vt // TC, vt % TC * KU + vj])
                    expert_of[vt // TC, vt % TC * KU + vj] = T.Cast(expert, T.max(T.min(ids[vt, vj], E - 1), 0))
            for e, c in T.grid(E, C):
                with T.sblock("zero_counts"):
                    ve, vc = T.axis.remap("SS", [e, c])
                    T.writes(count[ve, vc])
                    count[ve, vc] = T.Cast(index, 0)
            for c in range(C):
                with T.sblock("count"):
                    vc = T.axis.spatial(C, c)
                    T.reads(expert_of[vc, 0:TC * KU], n_valid[0], count[0:E, vc])
                    T.writes(count[0:E, vc])
                    for tt, j in T.grid(TC, KU):
                        if valid(vc * TC + tt, n_valid):
                            e = T.Cast("int32", expert_of[vc, tt * KU + j])
                            count[e, vc] = count[e, vc] + T.Cast(index, 1)
            for e in range(E):
                with T.sblock("chunk_starts"):
                    ve = T.axis.spatial(E, e)
                    T.reads(count[ve, 0:C])
                    T.writes(fill[ve, 0:C], total[ve])
                    n = T.sblock_alloc_buffer((1,), "int32", scope="local")
                    n[0] = 0
                    for c in range(C):
                        fill[ve, c] = T.Cast(index, n[0])
                        n[0] = n[0] + T.Cast("int32", count[ve, c])
                    total[ve] = n[0]
            for e in range(E + 1):
                with T.sblock("expert_starts"):
                    ve = T.axis.spatial(E + 1, e)
                    T.reads(total[0:E])
                    T.writes(start[ve], offsets[ve])
                    n = T.sblock_alloc_buffer((1,), "int32", scope="local")
                    n[0] = 0
                    for before in range(ve):
                        n[0] = n[0] + total[before]
                    start[ve] = n[0]
                    offsets[ve] = n[0]
            for c in range(C):
                with T.sblock("place"):
                    vc = T.axis.spatial(C, c)
                    T.reads(expert_of[vc, 0:TC * KU], n_valid[0], fill[0:E, vc], start[0:E])
                    T.writes(fill[0:E, vc], row_token[0:NT * KU], row_of[0:NT, 0:KU])
                    for tt, j in T.grid(TC, KU):
                        if valid(vc * TC + tt, n_valid):
                            e = T.Cast("int32", expert_of[vc, tt * KU + j])
                            row = start[e] + T.Cast("int32", fill[e, vc])
                            fill[e, vc] = fill[e, vc] + T.Cast(index, 1)
                            row_token[row] = vc * TC + tt
                            row_of[vc * TC + tt, j] = row
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
        return fmt.row_view(lambda i: w[e, r, i], k)

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


# The float16-operand (tensor-core) form's tiles: a block per (expert, F16_TILE_N outputs), the
# expert's sorted rows a row tile (`f16_row_tile`) at a time; each row tile dequantizes the
# expert's weights again.
F16_TILE_N = 64
F16_ROW_TILES = (32, 64)
# Shares an expert's row tiles are dealt into: the most thread blocks a schedule can spread one
# (expert, output tile) over (schedule.prefill_cuda.GroupedF16Knobs.row_splits).
F16_ROW_SHARES = 8


def f16_row_tile(rows: int, n_experts: int) -> int:
    """The row tile of the float16 grouped GEMMs: 64 rows where an expert averages 32 or more
    (chunks of 512 tokens of Qwen3-30B-A3B: 4096 rows over 128 experts; with routing as uneven as
    the synthetic model's, ~120 rows for each of ~34 experts), so a crowded expert decodes its
    weights once per 64 rows instead of 32 (bench/NOTES.md, "Grouped expert GEMM v3"); else 32
    (at 128 tokens an expert averages 8 rows: a 64-row tile would multiply 8 padding rows a real one)."""
    return F16_ROW_TILES[1] if rows >= F16_ROW_TILES[0] * n_experts else F16_ROW_TILES[0]


def grouped_gemm_f16_symbol(ggml_types: tuple[int, ...], n_experts: int, rows: int, n: int, k: int) -> str:
    names = "_".join(gemv_format(t).name.lower() for t in ggml_types)
    kind = "grouped_gate_up_silu" if len(ggml_types) == 2 else "grouped_gemm"
    return f"{kind}_{names}_{n_experts}x{n}x{k}_r{rows}_f16"


def grouped_gemm_f16(ggml_type: int, n_experts: int, rows: int, n: int, k: int,
                     row_tile: int | None = None) -> tirx.PrimFunc:
    """The down projection's grouped GEMM on float16 operands: y[r, :] = W[e] . x[r] for
    offsets[e] <= r < offsets[e+1], x already in sorted-row order, the dequantized weights and
    x rounded to float16 and their products summed in float32 (the form tensor cores multiply,
    as `gemm.gemm`'s half_operands). Params (W words [E, n, row_words], offsets int32[E + 1],
    x f32[rows, k], y f32[rows, n]); rows past offsets[E] are not written. `row_tile`: one of
    F16_ROW_TILES (None: `f16_row_tile`'s choice)."""
    return _grouped_f16((ggml_type,), n_experts, rows, n, k, rows, gather=False, row_tile=row_tile)


def grouped_gate_up_silu_f16(type_gate: int, type_up: int, n_experts: int, rows: int, n: int, k: int,
                             x_rows: int, row_tile: int | None = None) -> tirx.PrimFunc:
    """act[r, :] = silu(Wg[e] . x[t]) * (Wu[e] . x[t]), t = row_token[r], for the rows r of each
    expert e, on float16 operands with float32 sums (as `grouped_gemm_f16`); the gate and up
    tiles share the gathered x rows, SiLU and the product are taken on the float32 sums.
    Params (Wg words [E, n, ...], Wu words [E, n, ...], offsets int32[E + 1],
    row_token int32[rows], x f32[x_rows, k], act f32[rows, n]); rows past offsets[E] are not
    written. `row_tile` as `grouped_gemm_f16`'s."""
    return _grouped_f16((type_gate, type_up), n_experts, rows, n, k, x_rows, gather=True, row_tile=row_tile)


def _grouped_f16(ggml_types: tuple[int, ...], n_experts: int, rows: int, n: int, k: int, x_rows: int,
                 gather: bool, row_tile: int | None) -> tirx.PrimFunc:
    """Per (expert e, output tile), per row tile of e's rows (the last tile's tail clamped to
    e's last row, computed and not stored):
      sc[g, i, u], mn[g, i, u] = weight g's scale and min of the sub-block holding k = u * U
      wh[g, i, k]  = float16(dequantized weight)      xh[ri, k] = float16(x row)
      acc[g, ri, i] = sum_k float32(xh[ri, k]) * float32(wh[g, i, k])
      out[row, i]  = acc[0] (one weight) or silu(acc[0]) * acc[1] (gate, up)
    The stages span the whole of K here; a schedule computes them per K tile where it needs them
    (`schedule.prefill_cuda._GroupedGemmF16CudaRule`)."""
    from tvm.script import tirx as T

    fmts = tuple(gemv_format(t) for t in ggml_types)
    if n % F16_TILE_N or k % 16:
        raise ValueError(f"the float16 grouped GEMM needs n a multiple of {F16_TILE_N} and k of 16, got {n} x {k}")
    M = f16_row_tile(rows, n_experts) if row_tile is None else row_tile
    if M not in F16_ROW_TILES:
        raise ValueError(f"the float16 grouped GEMM's row tile must be one of {F16_ROW_TILES}, got {M}")
    G, E, R, N, K, XR, TN, S = len(fmts), n_experts, rows, n, k, x_rows, F16_TILE_N, F16_ROW_SHARES
    # The scale stage's unit: the finest sub-block of the weights (subs are powers of two, so
    # it divides the others; a coarser weight's scale is decoded once per unit it spans).
    U = min(f.sub for f in fmts)
    has_min = any(f.min is not None for f in fmts)

    def by_weight(g: Expr, values: list[Expr]) -> Expr:
        """values[g] (a lazy if-then-else over the weights: only weight g's words are read)."""
        out = values[-1]
        for index in range(len(values) - 2, -1, -1):
            out = tirx.if_then_else(g == index, values[index], out)
        return out

    def rows_of(ws: tuple, e: Expr, r: Expr) -> list:
        return [f.row_view(lambda i, w=w: w[e, r, i], k) for f, w in zip(fmts, ws)]

    def decoded(ws: tuple, part: str, g: Expr, e: Expr, r: Expr, u: Expr) -> Expr:
        """Weight g's scale (part "scale") or min ("min") of the sub-block holding unit u."""
        one = {"scale": 1.0, "min": 0.0}[part]
        values = []
        for f, row in zip(fmts, rows_of(ws, e, r)):
            decode = getattr(f, part)
            c, p, _ = split_k(f, u * U)
            values.append(decode(row, c, p) if decode is not None else tirx.const(one, "float32"))
        return by_weight(g, values)

    def weight(ws: tuple, sc: tirx.Buffer, mn: tirx.Buffer, g: Expr, e: Expr, r: Expr, i: Expr,
               kk: Expr) -> Expr:
        return by_weight(g, [
            dequant_tile_value(f, row, kk,
                               (lambda c, p: sc[g, i, kk // U]) if f.scale is not None else None,
                               (lambda c, p: mn[g, i, kk // U]) if f.min is not None else None)
            for f, row in zip(fmts, rows_of(ws, e, r))]).astype("float16")

    def count(offsets: tirx.Buffer, e: Expr) -> Expr:
        return offsets[e + 1] - offsets[e]

    def tiles(offsets: tirx.Buffer, e: Expr) -> Expr:
        return (count(offsets, e) + M - 1) // M

    def sorted_row(offsets: tirx.Buffer, e: Expr, tile: Expr, i: Expr) -> Expr:
        return offsets[e] + tirx.min(tile * M + i, count(offsets, e) - 1)

    def x_value(x: tirx.Buffer, row_token: tirx.Buffer | None, r: Expr, kk: Expr) -> Expr:
        xr = tirx.max(tirx.min(row_token[r], XR - 1), 0) if gather else r
        return x[xr, kk].astype("float16")

    def result(acc: tirx.Buffer, ri: Expr, i: Expr) -> Expr:
        if G == 1:
            return acc[0, ri, i]
        return acc[0, ri, i] * sigmoid_f32(acc[0, ri, i]) * acc[1, ri, i]

    @T.macro
    def body(ws, offsets, row_token, x, y):
        for e, tile in T.grid(E, N // TN):
            with T.sblock("tile"):
                ve, vt = T.axis.remap("SS", [e, tile])
                # The sums outside the row tiles' blocks: a GPU's shared float32 tile of them then
                # outlives the stages. (Inside, TVM's storage rewrite gave it the float16 weight
                # tile's memory, and its WMMA store's pointer failed TVM's type check.)
                acc = T.sblock_alloc_buffer((G, M, TN), "float32")
                # The row tiles dealt into F16_ROW_SHARES shares (share s: tiles s, s + S, ...),
                # which a schedule may spread over thread blocks.
                for share in range(S):
                    with T.sblock("share"):
                        vs = T.axis.spatial(S, share)
                        for rt in range((tiles(offsets, ve) - vs + S - 1) // S):
                            # A block per row tile, its stages its own: a schedule's stages
                            # computed per K tile then hold one row tile's data.
                            with T.sblock("rows"):
                                vr = T.axis.spatial((R + M - 1) // M, rt * S + vs)
                                sc = T.sblock_alloc_buffer((G, TN, K // U), "float32")
                                mn = T.sblock_alloc_buffer((G, TN, K // U), "float32")
                                wh = T.sblock_alloc_buffer((G, TN, K), "float16")
                                xh = T.sblock_alloc_buffer((M, K), "float16")
                                for g, i, u in T.grid(G, TN, K // U):
                                    with T.sblock("scale"):
                                        vg, vi, vu = T.axis.remap("SSS", [g, i, u])
                                        sc[vg, vi, vu] = decoded(ws, "scale", vg, ve, vt * TN + vi, vu)
                                        if has_min:
                                            mn[vg, vi, vu] = decoded(ws, "min", vg, ve, vt * TN + vi, vu)
                                for g, i, kk in T.grid(G, TN, K):
                                    with T.sblock("dequant"):
                                        vg, vi, vk = T.axis.remap("SSS", [g, i, kk])
                                        wh[vg, vi, vk] = weight(ws, sc, mn, vg, ve, vt * TN + vi, vi, vk)
                                for ri, kk in T.grid(M, K):
                                    with T.sblock("xload"):
                                        vri, vk = T.axis.remap("SS", [ri, kk])
                                        xh[vri, vk] = x_value(x, row_token, sorted_row(offsets, ve, vr, vri), vk)
                                for g, ri, i, kk in T.grid(G, M, TN, K):
                                    with T.sblock("gemm"):
                                        vg, vri, vi, vk = T.axis.remap("SSSR", [g, ri, i, kk])
                                        with T.init():
                                            acc[vg, vri, vi] = T.float32(0)
                                        acc[vg, vri, vi] = acc[vg, vri, vi] + T.Cast("float32", xh[vri, vk]) * T.Cast(
                                            "float32", wh[vg, vi, vk])
                                for ri, i in T.grid(M, TN):
                                    with T.sblock("store"):
                                        vri, vi = T.axis.remap("SS", [ri, i])
                                        if vr * M + vri < count(offsets, ve):
                                            y[sorted_row(offsets, ve, vr, vri), vt * TN + vi] = result(acc, vri, vi)

    symbol = grouped_gemm_f16_symbol(ggml_types, E, R, N, K)
    if G == 1:
        (fmt,) = fmts

        @T.prim_func(private=True, s_tir=True)
        def down(w: T.Buffer((E, N, fmt.row_words(K)), fmt.word_dtype), offsets: T.Buffer((E + 1,), "int32"),
                 x: T.Buffer((R, K), "float32"), y: T.Buffer((R, N), "float32")):
            T.func_attr({"tirx.noalias": True})
            body((w,), offsets, None, x, y)

        return down.with_attr("global_symbol", symbol)
    fg, fu = fmts

    @T.prim_func(private=True, s_tir=True)
    def gate_up(wg: T.Buffer((E, N, fg.row_words(K)), fg.word_dtype),
                wu: T.Buffer((E, N, fu.row_words(K)), fu.word_dtype), offsets: T.Buffer((E + 1,), "int32"),
                row_token: T.Buffer((R,), "int32"), x: T.Buffer((XR, K), "float32"),
                act: T.Buffer((R, N), "float32")):
        T.func_attr({"tirx.noalias": True})
        body((wg, wu), offsets, row_token, x, act)

    return gate_up.with_attr("global_symbol", symbol)


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
                           row_token: npt.NDArray[np.int32], x: npt.NDArray[np.float32], gather: bool,
                           half_operands: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(y, magnitude), float64 [offsets[E], n]: y as grouped_gemm writes its rows (GGUF bytes
    `data` [E, n, row_bytes]), and |W| . |x| per element (the scale of its float32 rounding,
    for `testing.assert_gemv_close`). With `half_operands` x and the dequantized weights are
    rounded to float16 first (`grouped_gemm_f16`, `grouped_gate_up_silu_f16`)."""
    n, k = data.shape[1], x.shape[1]
    xs = x[row_token[:offsets[-1]]] if gather else x[:offsets[-1]]
    if half_operands:
        xs = xs.astype(np.float16)
    xs = xs.astype(np.float64)
    y = np.zeros((offsets[-1], n))
    magnitude = np.zeros((offsets[-1], n))
    for e in range(data.shape[0]):
        lo, hi = offsets[e], offsets[e + 1]
        if hi > lo:
            w = dequantize_rows(ggml_type, data[e], k)
            w = (w.astype(np.float16) if half_operands else w).astype(np.float64)
            y[lo:hi] = xs[lo:hi] @ w.T
            magnitude[lo:hi] = np.abs(xs[lo:hi]) @ np.abs(w).T
    return y, magnitude


def grouped_gate_up_silu_reference(gate: tuple[int, npt.NDArray[np.uint8]], up: tuple[int, npt.NDArray[np.uint8]],
                                   offsets: npt.NDArray[np.int32], row_token: npt.NDArray[np.int32],
                                   x: npt.NDArray[np.float32]) -> tuple[np.ndarray, np.ndarray]:
    """(act, magnitude) [offsets[E], n] of `grouped_gate_up_silu_f16` ((ggml type, GGUF bytes
    [E, n, row_bytes]) per weight): float16 operands, sums and SiLU in float64. The magnitude
    bounds the float32 error: d(silu(g) u) = silu'(g) u dg + silu(g) du with |silu'| < 1.1, dg
    and du within their sums' |W| . |x|, plus the SiLU's own rounding (|act|)."""
    g, g_mag = grouped_gemm_reference(*gate, offsets, row_token, x, True, half_operands=True)
    u, u_mag = grouped_gemm_reference(*up, offsets, row_token, x, True, half_operands=True)
    with np.errstate(over="ignore"):  # exp(-g) = inf for g << 0 gives silu = -0: right
        act = silu(g) * u
        return act, 1.1 * np.abs(u) * g_mag + np.abs(silu(g)) * u_mag + np.abs(act)


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
        return dequantize_rows(t, data[e], cols).astype(np.float64)

    hidden, ffn = x.shape[1], gate[1].shape[1]
    out = h.astype(np.float64).copy()
    for t in range(n_valid):
        for j, e in enumerate(ids[t]):
            g = dense(gate[0], gate[1], e, hidden) @ x[t]
            u = dense(up[0], up[1], e, hidden) @ x[t]
            out[t] += weights[t, j] * (dense(down[0], down[1], e, ffn) @ (silu(g) * u))
    return out.astype(np.float32)
