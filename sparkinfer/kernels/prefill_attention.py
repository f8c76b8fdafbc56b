"""Attention over a chunk of T tokens: QK-norm + RoPE + KV append for T positions, and causal
attention of the chunk's queries over the paged cache. Unscheduled TIR + numpy references.

The chunk holds the tokens at positions pos[0] + t, t < n_valid[0] (both read on the device,
so one compiled step serves every position and every last, partial chunk); rows t >= n_valid
are padding: nothing of theirs enters the cache, and their attention output is 0.

`qk_norm_rope_kv_append_rows` is `rope.qk_norm_rope_kv_append` (same formulas: per-head RMS
norm, NEOX RoPE with float32 angles, fp16 K/V) for each row t at position pos + t.
`causal_prefill_attention` runs after the append, so the chunk's own K/V are already in the
cache: query t (position p = pos + t) attends to the cached positions 0 .. p, read through the
page table, flash-attention style (one pass over K and V, online softmax a tile of keys at a
time; the factory's docstring has the order). The G query heads of a KV head and QUERY_TILE
consecutive queries go together, so each K and V row is read (and widened from fp16) once for
all of them, and the scores are small matrix products.
Query head h reads KV head h // (NH / NKV), scale 1 / sqrt(D), float32 math on the fp16 cache,
as `attention.paged_decode_attention` does for one token. Its `half_operands` form
(`causal_prefill_attention_half`, the GPUs' tensor-core numerics) rounds Q and the softmax
weights P to fp16 before the two products, with its own numpy reference.
"""

import math

import numpy as np
import numpy.typing as npt
from tvm import tirx

from sparkinfer.kernels.rope import qk_norm_rope_kv_append_reference
from sparkinfer.kernels.vecmath import LOG2E, exp_f32
from sparkinfer.reference import qwen3moe as ref

Expr = tirx.Expr


def qk_norm_rope_kv_append_rows(n_tokens: int, n_heads: int, n_kv_heads: int, head_dim: int, page_size: int,
                                max_pages: int, eps: float, theta: float) -> tirx.PrimFunc:
    """Params (q f32[T, NH*D], k f32[T, NKV*D], v f32[T, NKV*D], q_norm_w f32[D], k_norm_w f32[D],
    pos int32[1], n_valid int32[1], page_table int32[MP], k_cache f16[NP, P, NKV, D], v_cache,
    q_rot f32[T, NH, D]); k_cache and v_cache are written in place at positions pos + t,
    t < n_valid."""
    from tvm.script import tirx as T

    NT, NH, NKV, D, P, MP = n_tokens, n_heads, n_kv_heads, head_dim, page_size, max_pages
    if D % 2:
        raise ValueError(f"NEOX RoPE needs an even head_dim, got {D}")
    half, heads, f32 = D // 2, n_heads + n_kv_heads, "float32"

    def head_x(q: tirx.Buffer, k: tirx.Buffer, t: Expr, h: Expr, d: Expr) -> Expr:
        return tirx.Select(h < NH, q[t, tirx.min(h, NH - 1) * D + d], k[t, tirx.max(h - NH, 0) * D + d])

    def normed(q, k, qw, kw, sumsq, t, h, d):  # noqa: ANN001, ANN202
        inv_rms = tirx.const(1.0, f32) / tirx.sqrt(sumsq[t, h] * tirx.const(1.0 / D, f32) + tirx.const(eps, f32))
        return head_x(q, k, t, h, d) * inv_rms * tirx.Select(h < NH, qw[d], kw[d])

    def angle(pos: tirx.Buffer, t: Expr, i: Expr) -> Expr:
        inv_freq = tirx.pow(tirx.const(theta, f32), i.astype(f32) * tirx.const(-2.0 / D, f32))
        return (pos[0] + t).astype(f32) * inv_freq

    def rotated(q, k, qw, kw, sumsq, cos, sin, t, h, d):  # noqa: ANN001, ANN202
        partner = normed(q, k, qw, kw, sumsq, t, h, (d + half) % D)
        return normed(q, k, qw, kw, sumsq, t, h, d) * cos[t, d % half] + tirx.Select(
            d < half, -partner, partner) * sin[t, d % half]

    def page(page_table: tirx.Buffer, pos: tirx.Buffer, t: Expr) -> Expr:
        return page_table[tirx.min((pos[0] + t) // P, MP - 1)]

    @T.prim_func(private=True, s_tir=True)
    def func(q: T.Buffer((NT, NH * D), "float32"), k: T.Buffer((NT, NKV * D), "float32"),
             v: T.Buffer((NT, NKV * D), "float32"), q_norm_w: T.Buffer((D,), "float32"),
             k_norm_w: T.Buffer((D,), "float32"), pos: T.Buffer((1,), "int32"), n_valid: T.Buffer((1,), "int32"),
             page_table: T.Buffer((MP,), "int32"), var_k_cache: T.handle, var_v_cache: T.handle,
             q_rot: T.Buffer((NT, NH, D), "float32")):
        T.func_attr({"tirx.noalias": True})
        n_pages = T.int64()
        k_cache = T.match_buffer(var_k_cache, (n_pages, P, NKV, D), "float16")
        v_cache = T.match_buffer(var_v_cache, (n_pages, P, NKV, D), "float16")
        sumsq = T.sblock_alloc_buffer((NT, heads), "float32")
        # a position's rotation, once for all its heads (pow, cos and sin are libm calls)
        cos = T.sblock_alloc_buffer((NT, half), "float32")
        sin = T.sblock_alloc_buffer((NT, half), "float32")
        for t, i in T.grid(NT, half):
            with T.sblock("angle"):
                vt, vi = T.axis.remap("SS", [t, i])
                cos[vt, vi] = T.cos(angle(pos, vt, vi))
                sin[vt, vi] = T.sin(angle(pos, vt, vi))
        for t, head, d in T.grid(NT, heads, D):
            with T.sblock("sumsq"):
                vt, vh, vd = T.axis.remap("SSR", [t, head, d])
                with T.init():
                    sumsq[vt, vh] = T.float32(0)
                sumsq[vt, vh] = sumsq[vt, vh] + head_x(q, k, vt, vh, vd) * head_x(q, k, vt, vh, vd)
        for t, head, d in T.grid(NT, heads, D):
            with T.sblock("rope"):
                vt, vh, vd = T.axis.remap("SSS", [t, head, d])
                if vh < NH:
                    q_rot[vt, vh, vd] = rotated(q, k, q_norm_w, k_norm_w, sumsq, cos, sin, vt, vh, vd)
                elif vt < n_valid[0]:
                    k_cache[page(page_table, pos, vt), (pos[0] + vt) % P, vh - NH, vd] = T.Cast(
                        "float16", rotated(q, k, q_norm_w, k_norm_w, sumsq, cos, sin, vt, vh, vd))
                    v_cache[page(page_table, pos, vt), (pos[0] + vt) % P, vh - NH, vd] = T.Cast(
                        "float16", v[vt, T.max(vh - NH, 0) * D + vd])

    return func.with_attr("global_symbol", f"qk_norm_rope_kv_append_rows_{NT}x{NH}x{NKV}x{D}_p{P}")


QUERY_TILE = 4  # queries a tile: their G heads share each K/V tile load (4 * G rows of scores)
KEY_TILE = 16  # keys a tile (at most the page size): one max and one rescale a tile; one AVX-512 vector
HALF_ROWS = 64  # rows (query, head) a tile of the half-operand form: 64 // G queries, the WMMA M
HALF_KEY_TILE = 64  # keys a tile of the half-operand form: one page of 64, S a 64 x 64 tile


def _first_query(it: Expr, n_tiles: int, tile: int) -> Expr:
    """Tiles in the order 0, n_tiles-1, 1, n_tiles-2, ...: a run of consecutive iterations (one
    core's share of the parallel loop) mixes short and long causal rows."""
    return tirx.Select(it % 2 == 0, it // 2, n_tiles - 1 - it // 2) * tile


def _n_keys(it: Expr, pos: tirx.Buffer, n_valid: tirx.Buffer, n_tiles: int, tile: int) -> Expr:
    """Keys 0 .. n - 1: the prefix and the chunk up to the tile's last valid query."""
    t0 = _first_query(it, n_tiles, tile)
    return tirx.Select(t0 < n_valid[0], pos[0] + tirx.min(t0 + tile, n_valid[0]), 0)


def _cached(cache: tirx.Buffer, page_table: tirx.Buffer, j: Expr, kv: Expr, d: Expr) -> Expr:
    """Key j's fp16 K or V value, through the page table (clamped to the table and the cache)."""
    page_size, max_pages = cache.shape[1], page_table.shape[0]
    page = page_table[tirx.min(j // page_size, max_pages - 1)]
    page = tirx.max(tirx.min(page, (cache.shape[0] - 1).astype("int32")), 0)
    return cache[page, j % page_size, kv, d]


def causal_prefill_attention(n_tokens: int, n_heads: int, n_kv_heads: int, head_dim: int, page_size: int,
                             max_pages: int, half_operands: bool = False, compact: bool = False) -> tirx.PrimFunc:
    """Params (q_rot f32[T, NH, D], k_cache f16[NP, P, NKV, D], v_cache, page_table int32[MP],
    pos int32[1], n_valid int32[1], out f32[T, NH*D]).

    Flash-attention order: a tile is (KV head, QUERY_TILE queries); its rows r are the
    (query t0 + r // G, head kv * G + r % G) pairs. It walks the keys its last valid query
    sees in tiles of KEY_TILE (one page's slots, widened from fp16 once for all rows): scores
    S = Q K^T, a causal mask (key j <= pos + t), the tile's row max, P = exp(S - max), the
    running sum and output rescaled by exp(old max - new max), output += P V.

    `half_operands`: the tensor-core form (`causal_prefill_attention_half`), `compact` its
    compact shape."""
    from tvm.script import tirx as T

    if half_operands:
        return causal_prefill_attention_half(n_tokens, n_heads, n_kv_heads, head_dim, page_size, max_pages, compact)
    if compact:
        raise ValueError("the compact form is one of the half-operand attention; the float32 one has no other")
    NT, NH, NKV, D, P, MP = n_tokens, n_heads, n_kv_heads, head_dim, page_size, max_pages
    if NH % NKV:
        raise ValueError(f"{NH} query heads do not divide into {NKV} KV heads")
    G, BQ, BK = NH // NKV, QUERY_TILE, min(KEY_TILE, P)
    R, NQT = BQ * G, -(-NT // BQ)
    scale = T.float32(1.0 / math.sqrt(D))
    lowest = T.min_value("float32")

    def first_query(it: Expr) -> Expr:
        return _first_query(it, NQT, BQ)

    def n_keys(it: Expr, pos: tirx.Buffer, n_valid: tirx.Buffer) -> Expr:
        return _n_keys(it, pos, n_valid, NQT, BQ)

    def tile_row(cache: tirx.Buffer, page_table: tirx.Buffer, pos: tirx.Buffer, n_valid: tirx.Buffer, it: Expr,
                 j: Expr, kv: Expr, d: Expr) -> Expr:
        """Key j's K or V value of a tile, 0 past the keys the tile sees."""
        return tirx.if_then_else(j < n_keys(it, pos, n_valid),
                                 _cached(cache, page_table, j, kv, d).astype("float32"), tirx.const(0, "float32"))

    @T.prim_func(private=True, s_tir=True)
    def func(q_rot: T.Buffer((NT, NH, D), "float32"), var_k_cache: T.handle, var_v_cache: T.handle,
             page_table: T.Buffer((MP,), "int32"), pos: T.Buffer((1,), "int32"), n_valid: T.Buffer((1,), "int32"),
             out: T.Buffer((NT, NH * D), "float32")):
        T.func_attr({"tirx.noalias": True})
        n_pages = T.int64()
        k_cache = T.match_buffer(var_k_cache, (n_pages, P, NKV, D), "float16")
        v_cache = T.match_buffer(var_v_cache, (n_pages, P, NKV, D), "float16")
        for kv, it in T.grid(NKV, NQT):
            with T.sblock("tile"):
                vkv, vit = T.axis.remap("SS", [kv, it])
                # Rows in the last axis (vector lanes): softmax's per-row max, sum and rescale
                # are then lane-wise, with no reduction across lanes.
                q_tile = T.sblock_alloc_buffer((D, R), "float32", scope="local")  # Q^T * scale
                k_tile = T.sblock_alloc_buffer((BK, D), "float32", scope="local")
                v_tile = T.sblock_alloc_buffer((BK, D), "float32", scope="local")
                s = T.sblock_alloc_buffer((BK, R), "float32", scope="local")  # S^T, then P^T
                acc = T.sblock_alloc_buffer((R, D), "float32", scope="local")
                # per row: running max, running sum, the max after this tile, the rescale
                # exp(old - new max); four buffers, so a GPU schedule's thread per row indexes
                # each by its row alone (TVM's barrier planner then sees no cross-thread access)
                row_max = T.sblock_alloc_buffer((R,), "float32", scope="local")
                row_sum = T.sblock_alloc_buffer((R,), "float32", scope="local")
                new_max = T.sblock_alloc_buffer((R,), "float32", scope="local")
                alpha = T.sblock_alloc_buffer((R,), "float32", scope="local")
                for d, r in T.grid(D, R):
                    with T.sblock("q_load"):
                        vd, vr = T.axis.remap("SS", [d, r])
                        q_tile[vd, vr] = q_rot[T.min(first_query(vit) + vr // G, NT - 1), vkv * G + vr % G, vd] * scale
                for r, d in T.grid(R, D):
                    with T.sblock("acc_init"):
                        vr, vd = T.axis.remap("SS", [r, d])
                        acc[vr, vd] = T.float32(0)
                for r in range(R):
                    with T.sblock("state_init"):
                        vr = T.axis.spatial(R, r)
                        row_max[vr] = lowest
                        row_sum[vr] = T.float32(0)
                for kb in range((n_keys(vit, pos, n_valid) + BK - 1) // BK):
                    for jj, d in T.grid(BK, D):
                        with T.sblock("k_load"):
                            vkb = T.axis.opaque(MP * P // BK, kb)
                            vj, vd = T.axis.remap("SS", [jj, d])
                            k_tile[vj, vd] = tile_row(k_cache, page_table, pos, n_valid, vit, vkb * BK + vj, vkv, vd)
                    for jj, d in T.grid(BK, D):
                        with T.sblock("v_load"):
                            vkb = T.axis.opaque(MP * P // BK, kb)
                            vj, vd = T.axis.remap("SS", [jj, d])
                            v_tile[vj, vd] = tile_row(v_cache, page_table, pos, n_valid, vit, vkb * BK + vj, vkv, vd)
                    for d, jj, r in T.grid(D, BK, R):
                        with T.sblock("qk"):  # a reduction with its init: schedules place the init
                            vd, vj, vr = T.axis.remap("RSS", [d, jj, r])
                            with T.init():
                                s[vj, vr] = T.float32(0)
                            s[vj, vr] = s[vj, vr] + k_tile[vj, vd] * q_tile[vd, vr]
                    for r in range(R):
                        with T.sblock("max_init"):
                            vr = T.axis.spatial(R, r)
                            new_max[vr] = row_max[vr]
                    for jj, r in T.grid(BK, R):
                        with T.sblock("max"):
                            vkb = T.axis.opaque(MP * P // BK, kb)
                            vj, vr = T.axis.remap("RS", [jj, r])
                            new_max[vr] = T.max(new_max[vr], T.Select(
                                vkb * BK + vj <= pos[0] + first_query(vit) + vr // G, s[vj, vr], lowest))
                    for jj, r in T.grid(BK, R):
                        with T.sblock("weight"):
                            vkb = T.axis.opaque(MP * P // BK, kb)
                            vj, vr = T.axis.remap("SS", [jj, r])
                            s[vj, vr] = T.Select(vkb * BK + vj <= pos[0] + first_query(vit) + vr // G,
                                                 exp_f32(s[vj, vr] - new_max[vr]), T.float32(0))
                    for r in range(R):
                        with T.sblock("rescale_state"):
                            vr = T.axis.spatial(R, r)
                            alpha[vr] = exp_f32(row_max[vr] - new_max[vr])
                            row_sum[vr] = row_sum[vr] * alpha[vr]
                            row_max[vr] = new_max[vr]
                    for jj, r in T.grid(BK, R):
                        with T.sblock("sum"):
                            vj, vr = T.axis.remap("RS", [jj, r])
                            row_sum[vr] = row_sum[vr] + s[vj, vr]
                    for r, d in T.grid(R, D):
                        with T.sblock("rescale"):
                            vr, vd = T.axis.remap("SS", [r, d])
                            acc[vr, vd] = acc[vr, vd] * alpha[vr]
                    for r, jj, d in T.grid(R, BK, D):
                        with T.sblock("pv"):
                            vr, vj, vd = T.axis.remap("SRS", [r, jj, d])
                            acc[vr, vd] = acc[vr, vd] + s[vj, vr] * v_tile[vj, vd]
                for r, d in T.grid(R, D):
                    with T.sblock("store"):
                        vr, vd = T.axis.remap("SS", [r, d])
                        if first_query(vit) + vr // G < NT:
                            out[first_query(vit) + vr // G, (vkv * G + vr % G) * D + vd] = T.if_then_else(
                                first_query(vit) + vr // G < n_valid[0], acc[vr, vd] / row_sum[vr], T.float32(0))

    return func.with_attr("global_symbol", f"causal_prefill_attention_{NT}x{NH}x{NKV}x{D}_p{P}")


def exp_by_exp2(x: Expr) -> Expr:
    """exp(x) as 2^(x log2 e): on a GPU exp2f is the SFU's ex2 and two multiplies (expf
    adds a range reduction; vecmath's polynomial ~20 instructions), for the tensor-core form,
    whose P is rounded to float16 after it (the error, ~1e-6 relative at |x| = 20, is far
    below that rounding). -inf and the lowest float give 0."""
    return tirx.exp2(x * tirx.const(LOG2E, "float32"))


def causal_prefill_attention_half(n_tokens: int, n_heads: int, n_kv_heads: int, head_dim: int, page_size: int,
                                  max_pages: int, compact: bool = False) -> tirx.PrimFunc:
    """`causal_prefill_attention` with float16 operands, the form tensor cores multiply
    (`schedule.prefill_cuda.schedule_tensor_core_attention`): same params and result.

    A tile is (KV head, HALF_ROWS // G queries): HALF_ROWS rows r = (query t0 + r // G, head
    kv * G + r % G). Q is rounded to f16 once, after the 1 / sqrt(D) scale; the keys go in tiles
    of HALF_KEY_TILE (the cache's fp16 as it is, 0 past the tile's last key):
      S = Q K^T (f16 products summed in f32), the causal mask, m' = max(m, the tile's row max)
      (the `tile_max` reduction starts from m, so the steps after it read one value a row),
      P = f16(exp(S - m')) (0 where masked), alpha = exp(m - m') (both by `exp_by_exp2`),
      l = l alpha + the sum of P,
      O = O alpha + P V (P V's f16 products summed in f32, from 0 each tile); at the end O / l.
    A row's key tiles past its own causal limit are all masked (P = 0, alpha = 1): no change.
    K and V are read one key tile ahead (k_next, v_next: tile 0 before the loop, tile kb + 1 in
    iteration kb once tile kb is copied out; past the last key they read as 0), so that a GPU's
    global loads of the next tile overlap this tile's work.

    `compact` (the step variant attention_form "compact", schedule.schedules.ATTENTION_FORMS): no
    read-ahead; V is loaded once S = Q K^T has read K, and P V goes a part of the head dim at a
    time (PC = gcd(D, HALF_KEY_TILE) columns: its f32 tile no larger than S's, so a GPU schedule
    lays it in S's room), O kept as [part, row, column] so that a thread's share of it is one
    box of registers; for 3 blocks an SM on sm_90 at head dim 128, where the read-ahead form
    fits 2 (bench/NOTES.md "Prefill attention v4")."""
    from tvm.script import tirx as T

    NT, NH, NKV, D, P, MP = n_tokens, n_heads, n_kv_heads, head_dim, page_size, max_pages
    if NH % NKV:
        raise ValueError(f"{NH} query heads do not divide into {NKV} KV heads")
    G, R, BK = NH // NKV, HALF_ROWS, HALF_KEY_TILE
    if R % G or D % 16:
        raise ValueError(f"the half-operand attention needs the {G} query heads per KV head to divide {R} and the "
                         f"head dim ({D}) to be a multiple of 16")
    read_ahead = not compact
    BQ, NQT, N_KB = R // G, -(-NT // (R // G)), -(-MP * P // BK)
    PC = math.gcd(D, BK)  # the compact form's P V columns a part
    NC = D // PC
    scale = T.float32(1.0 / math.sqrt(D))
    lowest = T.min_value("float32")
    f16, f32 = "float16", "float32"

    def first_query(it: Expr) -> Expr:
        return _first_query(it, NQT, BQ)

    def n_keys(it: Expr, pos: tirx.Buffer, n_valid: tirx.Buffer) -> Expr:
        return _n_keys(it, pos, n_valid, NQT, BQ)

    def tile_row(cache: tirx.Buffer, page_table: tirx.Buffer, pos: tirx.Buffer, n_valid: tirx.Buffer, it: Expr,
                 j: Expr, kv: Expr, d: Expr) -> Expr:
        return tirx.if_then_else(j < n_keys(it, pos, n_valid), _cached(cache, page_table, j, kv, d),
                                 tirx.const(0, f16))

    def visible(pos: tirx.Buffer, it: Expr, kb: Expr, j: Expr, r: Expr) -> Expr:
        return kb * BK + j <= pos[0] + first_query(it) + r // G

    @T.prim_func(private=True, s_tir=True)
    def func(q_rot: T.Buffer((NT, NH, D), "float32"), var_k_cache: T.handle, var_v_cache: T.handle,
             page_table: T.Buffer((MP,), "int32"), pos: T.Buffer((1,), "int32"), n_valid: T.Buffer((1,), "int32"),
             out: T.Buffer((NT, NH * D), "float32")):
        T.func_attr({"tirx.noalias": True})
        n_pages = T.int64()
        k_cache = T.match_buffer(var_k_cache, (n_pages, P, NKV, D), "float16")
        v_cache = T.match_buffer(var_v_cache, (n_pages, P, NKV, D), "float16")
        for kv, it in T.grid(NKV, NQT):
            with T.sblock("tile"):
                vkv, vit = T.axis.remap("SS", [kv, it])
                q_half = T.sblock_alloc_buffer((R, D), f16)  # Q * scale
                k_half = T.sblock_alloc_buffer((BK, D), f16)
                if read_ahead:
                    k_next = T.sblock_alloc_buffer((BK, D), f16)  # the next key tile's K and V, read ahead
                    v_next = T.sblock_alloc_buffer((BK, D), f16)
                v_half = T.sblock_alloc_buffer((BK, D), f16)
                s = T.sblock_alloc_buffer((R, BK), f32)
                p_half = T.sblock_alloc_buffer((R, BK), f16)
                if read_ahead:
                    acc = T.sblock_alloc_buffer((R, D), f32)
                    pv = T.sblock_alloc_buffer((R, D), f32)
                else:
                    acc = T.sblock_alloc_buffer((NC, R, PC), f32)  # O's column c * PC + d at [c, r, d]
                    pv = T.sblock_alloc_buffer((R, PC), f32)
                row_max = T.sblock_alloc_buffer((R,), f32)
                row_sum = T.sblock_alloc_buffer((R,), f32)
                tile_max = T.sblock_alloc_buffer((R,), f32)  # m': the running max after this tile
                tile_sum = T.sblock_alloc_buffer((R,), f32)
                alpha = T.sblock_alloc_buffer((R,), f32)
                for r, d in T.grid(R, D):
                    with T.sblock("q_load"):
                        vr, vd = T.axis.remap("SS", [r, d])
                        q_half[vr, vd] = T.Cast(f16, q_rot[T.min(first_query(vit) + vr // G, NT - 1),
                                                           vkv * G + vr % G, vd] * scale)
                if read_ahead:
                    for r, d in T.grid(R, D):
                        with T.sblock("acc_init"):
                            vr, vd = T.axis.remap("SS", [r, d])
                            acc[vr, vd] = T.float32(0)
                else:
                    for c, r, d in T.grid(NC, R, PC):
                        with T.sblock("acc_init"):
                            vc, vr, vd = T.axis.remap("SSS", [c, r, d])
                            acc[vc, vr, vd] = T.float32(0)
                for r in range(R):
                    with T.sblock("state_init"):
                        vr = T.axis.spatial(R, r)
                        row_max[vr] = lowest
                        row_sum[vr] = T.float32(0)
                if read_ahead:
                    for jj, d in T.grid(BK, D):
                        with T.sblock("k_first"):
                            vj, vd = T.axis.remap("SS", [jj, d])
                            k_next[vj, vd] = tile_row(k_cache, page_table, pos, n_valid, vit, vj, vkv, vd)
                    for jj, d in T.grid(BK, D):
                        with T.sblock("v_first"):
                            vj, vd = T.axis.remap("SS", [jj, d])
                            v_next[vj, vd] = tile_row(v_cache, page_table, pos, n_valid, vit, vj, vkv, vd)
                for kb in range((n_keys(vit, pos, n_valid) + BK - 1) // BK):
                    if read_ahead:
                        for jj, d in T.grid(BK, D):
                            with T.sblock("k_load"):
                                vj, vd = T.axis.remap("SS", [jj, d])
                                k_half[vj, vd] = k_next[vj, vd]
                        for jj, d in T.grid(BK, D):
                            with T.sblock("v_load"):
                                vj, vd = T.axis.remap("SS", [jj, d])
                                v_half[vj, vd] = v_next[vj, vd]
                        for jj, d in T.grid(BK, D):
                            with T.sblock("k_ahead"):
                                vkb = T.axis.opaque(N_KB, kb)
                                vj, vd = T.axis.remap("SS", [jj, d])
                                k_next[vj, vd] = tile_row(k_cache, page_table, pos, n_valid, vit, (vkb + 1) * BK + vj,
                                                           vkv, vd)
                        for jj, d in T.grid(BK, D):
                            with T.sblock("v_ahead"):
                                vkb = T.axis.opaque(N_KB, kb)
                                vj, vd = T.axis.remap("SS", [jj, d])
                                v_next[vj, vd] = tile_row(v_cache, page_table, pos, n_valid, vit, (vkb + 1) * BK + vj,
                                                           vkv, vd)
                    else:
                        # kb spatial, not opaque: TVM then allocates the K and V tiles inside the key
                        # loop, where its storage planner can give V the room K leaves
                        for jj, d in T.grid(BK, D):
                            with T.sblock("k_load"):
                                vkb = T.axis.spatial(N_KB, kb)
                                vj, vd = T.axis.remap("SS", [jj, d])
                                k_half[vj, vd] = tile_row(k_cache, page_table, pos, n_valid, vit, vkb * BK + vj, vkv,
                                                          vd)
                    for r, jj, d in T.grid(R, BK, D):
                        with T.sblock("qk"):
                            vr, vj, vd = T.axis.remap("SSR", [r, jj, d])
                            with T.init():
                                s[vr, vj] = T.float32(0)
                            s[vr, vj] = s[vr, vj] + T.Cast(f32, q_half[vr, vd]) * T.Cast(f32, k_half[vj, vd])
                    if not read_ahead:  # V over K: S = Q K^T has read it
                        for jj, d in T.grid(BK, D):
                            with T.sblock("v_load"):
                                vkb = T.axis.spatial(N_KB, kb)
                                vj, vd = T.axis.remap("SS", [jj, d])
                                v_half[vj, vd] = tile_row(v_cache, page_table, pos, n_valid, vit, vkb * BK + vj, vkv,
                                                          vd)
                    for r, jj in T.grid(R, BK):
                        with T.sblock("tile_max"):
                            vkb = T.axis.opaque(N_KB, kb)
                            vr, vj = T.axis.remap("SR", [r, jj])
                            with T.init():
                                tile_max[vr] = row_max[vr]
                            tile_max[vr] = T.max(tile_max[vr], T.Select(visible(pos, vit, vkb, vj, vr), s[vr, vj],
                                                                        lowest))
                    for r, jj in T.grid(R, BK):
                        with T.sblock("weight"):
                            vkb = T.axis.opaque(N_KB, kb)
                            vr, vj = T.axis.remap("SS", [r, jj])
                            p_half[vr, vj] = T.Cast(f16, T.Select(
                                visible(pos, vit, vkb, vj, vr),
                                exp_by_exp2(s[vr, vj] - tile_max[vr]), T.float32(0)))
                    for r, jj in T.grid(R, BK):
                        with T.sblock("tile_sum"):
                            vr, vj = T.axis.remap("SR", [r, jj])
                            with T.init():
                                tile_sum[vr] = T.float32(0)
                            tile_sum[vr] = tile_sum[vr] + T.Cast(f32, p_half[vr, vj])
                    # one buffer a block: a GPU schedule's thread per row then writes nothing that
                    # a later statement of the same guarded row step reads (TVM cannot put a barrier there)
                    for r in range(R):
                        with T.sblock("alpha"):
                            vr = T.axis.spatial(R, r)
                            alpha[vr] = exp_by_exp2(row_max[vr] - tile_max[vr])
                    for r in range(R):
                        with T.sblock("sum_update"):
                            vr = T.axis.spatial(R, r)
                            row_sum[vr] = row_sum[vr] * alpha[vr] + tile_sum[vr]
                    for r in range(R):
                        with T.sblock("max_update"):
                            vr = T.axis.spatial(R, r)
                            row_max[vr] = tile_max[vr]
                    if read_ahead:
                        for r, d, jj in T.grid(R, D, BK):
                            with T.sblock("pv"):  # this tile's P V apart (a GPU's accumulators start at 0)
                                vr, vd, vj = T.axis.remap("SSR", [r, d, jj])
                                with T.init():
                                    pv[vr, vd] = T.float32(0)
                                pv[vr, vd] = pv[vr, vd] + T.Cast(f32, p_half[vr, vj]) * T.Cast(f32, v_half[vj, vd])
                        for r, d in T.grid(R, D):
                            with T.sblock("accumulate"):
                                vr, vd = T.axis.remap("SS", [r, d])
                                acc[vr, vd] = acc[vr, vd] * alpha[vr] + pv[vr, vd]
                    else:
                        for c in range(NC):
                            for r, d, jj in T.grid(R, PC, BK):
                                with T.sblock("pv"):  # columns c * PC .. of this tile's P V
                                    vc, vr, vd, vj = T.axis.remap("SSSR", [c, r, d, jj])
                                    with T.init():
                                        pv[vr, vd] = T.float32(0)
                                    pv[vr, vd] = pv[vr, vd] + T.Cast(f32, p_half[vr, vj]) * T.Cast(
                                        f32, v_half[vj, vc * PC + vd])
                            for r, d in T.grid(R, PC):
                                with T.sblock("accumulate"):
                                    vc, vr, vd = T.axis.remap("SSS", [c, r, d])
                                    acc[vc, vr, vd] = acc[vc, vr, vd] * alpha[vr] + pv[vr, vd]
                if read_ahead:
                    for r, d in T.grid(R, D):
                        with T.sblock("store"):
                            vr, vd = T.axis.remap("SS", [r, d])
                            if first_query(vit) + vr // G < NT:
                                out[first_query(vit) + vr // G, (vkv * G + vr % G) * D + vd] = T.if_then_else(
                                    first_query(vit) + vr // G < n_valid[0], acc[vr, vd] / row_sum[vr], T.float32(0))
                else:
                    # 3 blocks an SM: TVM's CUDA codegen writes __launch_bounds__(threads, 3), so nvcc
                    # keeps a thread within 168 registers (201 unbounded on sm_90a; 164 so, no spills).
                    # An s_tir schedule cannot add the attribute; the CPU build ignores it.
                    with T.attr(0, "tirx.launch_bounds_min_blocks_per_sm", 3):
                        for c, r, d in T.grid(NC, R, PC):
                            with T.sblock("store"):
                                vc, vr, vd = T.axis.remap("SSS", [c, r, d])
                                if first_query(vit) + vr // G < NT:
                                    out[first_query(vit) + vr // G, (vkv * G + vr % G) * D + vc * PC + vd] = (
                                        T.if_then_else(first_query(vit) + vr // G < n_valid[0],
                                                       acc[vc, vr, vd] / row_sum[vr], T.float32(0)))

    suffix = "_compact" if compact else ""
    return func.with_attr("global_symbol", f"causal_prefill_attention_{NT}x{NH}x{NKV}x{D}_p{P}_f16{suffix}")


WARP, MMA_M, MMA_N, MMA_K = 32, 16, 8, 16  # mma.sync m16n8k16: a warp's 16 x 8 product of a 16 x 16 by 16 x 8
REGISTER_THREADS = HALF_ROWS // MMA_M * WARP  # the register form's block: warp w owns rows 16w .. 16w + 15
MIN_BLOCKS_PER_SM = 3  # the register form's blocks an SM on sm_90: a thread within 168 registers, 48 KiB each
SWIZZLE = 8  # 16-byte chunks of a shared row that its row index permutes (chunk ^ row % 8)


def register_attention_misfit(n_heads: int, n_kv_heads: int, head_dim: int) -> str | None:
    """Why `causal_prefill_attention_registers` cannot serve these heads (None: it can): a tile's
    HALF_ROWS rows hold whole GQA groups, and a row's 16-byte chunks are swizzled over 8 of them."""
    if n_heads % n_kv_heads:
        return f"{n_heads} query heads do not divide into {n_kv_heads} KV heads"
    group = n_heads // n_kv_heads
    if HALF_ROWS % group or head_dim % (SWIZZLE * 8):
        return (f"the register attention needs the {group} query heads per KV head to divide {HALF_ROWS} and the "
                f"head dim ({head_dim}) to be a multiple of {SWIZZLE * 8}")
    return None


def causal_prefill_attention_registers(n_tokens: int, n_heads: int, n_kv_heads: int, head_dim: int,
                                       page_size: int, max_pages: int) -> tirx.PrimFunc:
    """`causal_prefill_attention_half` (same params, tiles, numerics and result) with S, P and O
    in registers: the step variant attention_form "registers" (schedule.schedules.ATTENTION_FORMS),
    CUDA only. Already scheduled: `schedule.prefill_cuda.CausalPrefillAttentionRegistersCudaRule`
    takes it as it is.

    Why hand-scheduled: the other two forms tensorize the factory's blocks with TVM's WMMA
    intrinsics, whose accumulators have no documented element layout, so S goes to shared
    memory for the softmax, P comes back from it as a fragment and P V goes out again for O's
    update: ncu on an H100 has the compact form at 82 % of the L1/TEX pipe, shared-memory bound
    (bench/NOTES.md "Prefill attention v4"). TVM's mma.sync intrinsics
    (s_tir/tensor_intrin/cuda.py) do fix a layout, but they take their operands only through
    ldmatrix from shared memory, and a tensorized block holds neither the softmax's row
    reductions (quad shuffles) nor S's accumulators handed on as P's A operand; so this kernel
    writes the flash-attention-2 structure out with T.ptx_legacy.mma / ldmatrix on "local"
    arrays indexed by constants (registers), the lane arithmetic explicit.

    A block of REGISTER_THREADS (4 warps) per (KV head, HALF_ROWS // G queries), the blocks and
    rows those of the half form; warp w owns rows 16w .. 16w + 15, a lane (g = lane / 4, t =
    lane % 4) rows 16w + g and 16w + g + 8, where mma.sync's fragments put them (PTX ISA,
    "Matrix Fragments for mma.m16n8k16"):
      - Q * scale rounded to f16 once into shared memory; per key tile:
      - K and V into shared memory (16 bytes a thread a load, 0 past the tile's keys), a
        barrier before and after; Q, K and V rows are stored with their 16-byte chunks permuted
        (`at`), so every ldmatrix is free of bank conflicts with no padding: 48 KiB at D = 128,
        static shared memory's limit;
      - S = Q K^T into 8 m16n8 accumulators (32 f32 a thread), Q's A and K's B fragments by
        ldmatrix; the causal mask; m' = max(m, the row's max over the quad's 4 lanes: 2
        xor-shuffles); P = f16(exp(S - m')) in the accumulators' layout, which is the A
        fragment layout of P V (two adjacent n-tiles are one k-step); alpha = exp(m - m');
        l = l alpha + the lane's P sum (a lane keeps its share of l; the quad adds them once, at
        the end); O = O alpha, then O += P V in O's accumulators (D / 8 n-tiles of 4 f32), V's B
        fragments by ldmatrix.trans;
      - at the end O / l to `out` (rows past n_valid 0), as the half form stores it.
    Q's fragments are read again for each key tile (4 KiB a warp beside K's and V's 32 KiB)
    rather than held: held, they take 32 more registers and sm_90a's 3 blocks an SM then spill
    (178 registers unbounded; 166 so, no spills, bench/NOTES.md "Prefill attention v5").
    O takes P V into its accumulators where the half form sums a tile's P V from 0 and adds
    it: f32 sums in another order, within the half form's tolerance."""
    from tvm.script import tirx as T

    NT, NH, NKV, D, P, MP = n_tokens, n_heads, n_kv_heads, head_dim, page_size, max_pages
    misfit = register_attention_misfit(NH, NKV, D)
    if misfit is not None:
        raise ValueError(misfit)
    G, R, BK, THREADS = NH // NKV, HALF_ROWS, HALF_KEY_TILE, REGISTER_THREADS
    VECTOR = 8  # halves a 16-byte chunk: a load, an ldmatrix row
    BQ, NQT = R // G, -(-NT // (R // G))
    KS, ST, OT = D // MMA_K, BK // MMA_N, D // MMA_N  # Q's k-steps, S's n-tiles, O's n-tiles
    LOADS = BK * D // VECTOR // THREADS  # 16-byte loads a thread a K (or V) tile
    scale = T.float32(1.0 / math.sqrt(D))
    lowest = T.min_value("float32")
    f16, f32 = "float16", "float32"
    full = tirx.const(0xFFFFFFFF, "uint32")

    def partner(x: Expr, lane_mask: int) -> Expr:
        """x of the lane whose index differs in `lane_mask`: masks 1 and 2 span a quad."""
        return T.tvm_warp_shuffle_xor(full, x, lane_mask, WARP, WARP)

    def at(matrix: int, row: Expr, chunk: Expr) -> Expr:
        """The offset of row `row`'s 16-byte chunk `chunk` (dims 8 chunk ..) in the shared tile
        `matrix` (0: Q, 1: K, 2: V), stored as chunk ^ row % 8: the 8 rows an ldmatrix reads
        (one chunk each) then fall on 8 different 16-byte bank groups."""
        return (matrix * BK + row) * D + tirx.bitwise_xor(chunk, row % SWIZZLE) * VECTOR

    def element_at(matrix: int, flat: Expr) -> Expr:
        """The offset of element `flat` (row flat // D, dim flat % D) of the shared tile `matrix`."""
        return at(matrix, flat // D, flat % D // VECTOR) + flat % VECTOR

    def mma(a: tirx.Buffer, a_at: Expr, b: tirx.Buffer, b_at: Expr, c: tirx.Buffer, c_at: Expr) -> Expr:
        return T.ptx_legacy.mma("m16n8k16", "row", "col", "fp16", "fp16", "fp32", a.data, a_at, b.data, b_at,
                                c.data, c_at, False, dtype=f32)

    def ldmatrix(transposed: bool, frag: tirx.Buffer, frag_at: Expr, tiles: tirx.Buffer, tile_at: Expr) -> Expr:
        return T.ptx_legacy.ldmatrix(transposed, 4, ".b16", frag.data, frag_at, tiles.data, tile_at, dtype=f16)

    def row(warp: Expr, lane: Expr, half: Expr) -> Expr:
        """The tile row of a lane's accumulator entries 2 * half, 2 * half + 1 (of every n-tile)."""
        return warp * MMA_M + lane // 4 + half * 8

    def column(n_tile: Expr, lane: Expr, e: Expr) -> Expr:
        """The column of a lane's accumulator entry 2 * half + e of n-tile `n_tile`."""
        return n_tile * MMA_N + lane % 4 * 2 + e

    def visible(kb: Expr, n_tile: Expr, e: Expr, limit: Expr, warp: Expr, lane: Expr, half: Expr) -> Expr:
        """Whether the lane's S entry (n_tile, 2 * half + e) of key tile kb passes the causal mask."""
        return kb * BK + column(n_tile, lane, e) <= limit + row(warp, lane, half) // G

    def cached_vector(cache: tirx.Buffer, page_table: tirx.Buffer, n_keys: Expr, kb: Expr, kv: Expr, chunk: Expr,
                      e: Expr) -> Expr:
        """Half e of the tile's 16-byte piece `chunk` (key chunk // (D / 8), dims 8 at a time), 0
        past the tile's keys."""
        j = kb * BK + chunk // (D // VECTOR)
        return tirx.if_then_else(j < n_keys, _cached(cache, page_table, j, kv, chunk % (D // VECTOR) * VECTOR + e),
                                 tirx.const(0, f16))

    @T.prim_func(private=True)
    def func(q_rot: T.Buffer((NT, NH, D), "float32"), var_k_cache: T.handle, var_v_cache: T.handle,
             page_table: T.Buffer((MP,), "int32"), pos: T.Buffer((1,), "int32"), n_valid: T.Buffer((1,), "int32"),
             out: T.Buffer((NT, NH * D), "float32")):
        T.func_attr({"tirx.noalias": True})
        n_pages = T.int64()
        k_cache = T.match_buffer(var_k_cache, (n_pages, P, NKV, D), "float16")
        v_cache = T.match_buffer(var_v_cache, (n_pages, P, NKV, D), "float16")
        for tile in T.thread_binding(NKV * NQT, thread="blockIdx.x"):
            for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                tiles = T.alloc_buffer((3 * BK * D,), f16, scope="shared")  # Q, K, V (R = BK rows each)
                q_frag = T.alloc_buffer((8,), f16, scope="local")  # one k-step's A fragment
                kv_frag = T.alloc_buffer((8,), f16, scope="local")  # two n-tiles' B fragments
                s = T.alloc_buffer((ST * 4,), f32, scope="local")  # n-tile j's accumulator at 4j
                p = T.alloc_buffer((ST * 4,), f16, scope="local")  # as s: k-step c's A fragment at 8c
                o = T.alloc_buffer((OT * 4,), f32, scope="local")
                row_max = T.alloc_buffer((2,), f32, scope="local")  # rows g and g + 8
                row_sum = T.alloc_buffer((2,), f32, scope="local")  # this lane's share
                tile_max = T.alloc_buffer((2,), f32, scope="local")
                alpha = T.alloc_buffer((2,), f32, scope="local")
                kv = tile // NQT
                t0 = _first_query(tile % NQT, NQT, BQ)
                n_keys = _n_keys(tile % NQT, pos, n_valid, NQT, BQ)
                limit = pos[0] + t0  # + r // G: row r's last visible key
                warp = tx // WARP
                lane = tx % WARP
                for i in T.unroll(R * D // THREADS):  # Q * scale in f16, element (r, d) by thread (r D + d) % 128
                    tiles[element_at(0, i * THREADS + tx)] = T.Cast(f16, q_rot[
                        T.min(t0 + (i * THREADS + tx) // D // G, NT - 1), kv * G + (i * THREADS + tx) // D % G,
                        (i * THREADS + tx) % D] * scale)
                for i in T.unroll(OT * 4):
                    o[i] = T.float32(0)
                for half in T.unroll(2):
                    row_max[half] = lowest
                    row_sum[half] = T.float32(0)
                for kb in range((n_keys + BK - 1) // BK):
                    T.tvm_storage_sync("shared")  # the last tile's ldmatrix are done (and Q is stored)
                    for i in T.unroll(LOADS):  # chunk (i * 128 + tx) of the tile: key / (D / 8), dims 8 ..
                        for e in T.vectorized(VECTOR):
                            tiles[element_at(1, (i * THREADS + tx) * VECTOR) + e] = cached_vector(
                                k_cache, page_table, n_keys, kb, kv, i * THREADS + tx, e)
                    for i in T.unroll(LOADS):
                        for e in T.vectorized(VECTOR):
                            tiles[element_at(2, (i * THREADS + tx) * VECTOR) + e] = cached_vector(
                                v_cache, page_table, n_keys, kb, kv, i * THREADS + tx, e)
                    T.tvm_storage_sync("shared")
                    for i in T.unroll(ST * 4):
                        s[i] = T.float32(0)
                    for c in T.unroll(KS):  # x4: Q's rows 0-7 and 8-15 of the k-step's dims 0-7, then of 8-15
                        T.evaluate(ldmatrix(False, q_frag, 0, tiles,
                                            at(0, warp * MMA_M + lane % 16, c * 2 + lane // 16)))
                        for jp in T.unroll(ST // 2):  # x4: K's B fragments of n-tiles 2jp, 2jp + 1 (keys 16jp ..)
                            T.evaluate(ldmatrix(False, kv_frag, 0, tiles, at(
                                1, jp * 2 * MMA_N + lane // 16 * MMA_N + lane % 8, c * 2 + lane // 8 % 2)))
                            T.evaluate(mma(q_frag, 0, kv_frag, 0, s, jp * 8))
                            T.evaluate(mma(q_frag, 0, kv_frag, 4, s, jp * 8 + 4))
                    for half in T.unroll(2):
                        tile_max[half] = row_max[half]
                        for j in T.unroll(ST):
                            for e in T.unroll(2):
                                tile_max[half] = T.max(tile_max[half], T.Select(
                                    visible(kb, j, e, limit, warp, lane, half), s[j * 4 + half * 2 + e], lowest))
                        for lane_mask in T.unroll(1, 3):  # lanes ^ 1, then ^ 2: the quad's four
                            tile_max[half] = T.max(tile_max[half], partner(tile_max[half], lane_mask))
                        alpha[half] = exp_by_exp2(row_max[half] - tile_max[half])
                        row_sum[half] = row_sum[half] * alpha[half]
                        row_max[half] = tile_max[half]
                        for j in T.unroll(ST):
                            for e in T.unroll(2):
                                p[j * 4 + half * 2 + e] = T.Cast(f16, T.Select(
                                    visible(kb, j, e, limit, warp, lane, half),
                                    exp_by_exp2(s[j * 4 + half * 2 + e] - tile_max[half]), T.float32(0)))
                                row_sum[half] = row_sum[half] + T.Cast(f32, p[j * 4 + half * 2 + e])
                        for n in T.unroll(OT):
                            for e in T.unroll(2):
                                o[n * 4 + half * 2 + e] = o[n * 4 + half * 2 + e] * alpha[half]
                    for c in T.unroll(BK // MMA_K):
                        for n2 in T.unroll(OT // 2):  # x4 .trans: V's B fragments of n-tiles 2n2, 2n2 + 1
                            T.evaluate(ldmatrix(True, kv_frag, 0, tiles, at(
                                2, c * MMA_K + lane % 16, n2 * 2 + lane // 16)))
                            T.evaluate(mma(p, c * 8, kv_frag, 0, o, n2 * 8))
                            T.evaluate(mma(p, c * 8, kv_frag, 4, o, n2 * 8 + 4))
                # MIN_BLOCKS_PER_SM blocks an SM: TVM writes __launch_bounds__(threads, MIN_BLOCKS_PER_SM)
                with T.attr(0, "tirx.launch_bounds_min_blocks_per_sm", MIN_BLOCKS_PER_SM):
                    for half in T.unroll(2):
                        for lane_mask in T.unroll(1, 3):
                            row_sum[half] = row_sum[half] + partner(row_sum[half], lane_mask)
                        if t0 + row(warp, lane, half) // G < NT:
                            for n in T.unroll(OT):
                                for e in T.unroll(2):
                                    out[t0 + row(warp, lane, half) // G,
                                        (kv * G + row(warp, lane, half) % G) * D + column(n, lane, e)] = T.if_then_else(
                                        t0 + row(warp, lane, half) // G < n_valid[0],
                                        o[n * 4 + half * 2 + e] / row_sum[half], T.float32(0))

    return func.with_attr("global_symbol", f"causal_prefill_attention_{NT}x{NH}x{NKV}x{D}_p{P}_f16_registers")


# ---- numpy references ------------------------------------------------------------------


def qk_norm_rope_kv_append_rows_reference(q, k, v, q_norm_w, k_norm_w, pos: int, n_valid: int,  # noqa: ANN001
                                          page_table, k_cache, v_cache, eps: float, theta: float
                                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q_rot f32[T, NH, D], new k_cache, new v_cache): the one-token oracle row by row; the
    padding rows' q_rot is rotated too (at their would-be position) but never cached."""
    q_rots = []
    for t in range(q.shape[0]):
        q_rot, k_new, v_new = qk_norm_rope_kv_append_reference(
            q[t], k[t], v[t], q_norm_w, k_norm_w, pos + t, page_table, k_cache, v_cache, eps, theta)
        q_rots.append(q_rot)
        if t < n_valid:
            k_cache, v_cache = k_new, v_new
    return np.stack(q_rots), k_cache, v_cache


def causal_prefill_attention_reference(q_rot: npt.NDArray[np.float32], k_cache: npt.NDArray[np.float16],
                                       v_cache: npt.NDArray[np.float16], page_table: npt.NDArray[np.int32],
                                       pos: int, n_valid: int) -> np.ndarray:
    """out f32[T, NH*D] via the model oracle's causal GQA attention over the cached positions."""
    n_tokens, n_heads, d = q_rot.shape
    page_size = k_cache.shape[1]
    positions = np.arange(pos + n_valid)
    pages = page_table[positions // page_size]
    k = k_cache[pages, positions % page_size].astype(np.float32)
    v = v_cache[pages, positions % page_size].astype(np.float32)
    out = np.zeros((n_tokens, n_heads * d), np.float32)
    if n_valid:
        out[:n_valid] = ref.causal_gqa_attention(q_rot[:n_valid], k, v, pos)
    return out


def causal_prefill_attention_half_reference(q_rot: npt.NDArray[np.float32], k_cache: npt.NDArray[np.float16],
                                            v_cache: npt.NDArray[np.float16], page_table: npt.NDArray[np.int32],
                                            pos: int, n_valid: int) -> np.ndarray:
    """out f32[T, NH*D] as `causal_prefill_attention_half` computes it: Q * scale and each key
    tile's P rounded to float16 where the kernel rounds them (P against the running max, so the
    walk over HALF_KEY_TILE-key tiles is the kernel's), products and sums in float64."""
    n_tokens, n_heads, d = q_rot.shape
    page_size, n_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv_heads
    n_keys = pos + n_valid
    positions = np.arange(n_keys)
    pages = page_table[positions // page_size]
    k = k_cache[pages, positions % page_size].astype(np.float64)  # [keys, NKV, D]
    v = v_cache[pages, positions % page_size].astype(np.float64)
    q = (q_rot[:n_valid] * np.float32(1.0 / math.sqrt(d))).astype(np.float16).astype(np.float64)
    heads = np.arange(n_heads)
    k, v = k[:, heads // group], v[:, heads // group]  # [keys, NH, D]
    query_pos = pos + np.arange(n_valid)
    row_max = np.full((n_valid, n_heads), -np.inf)
    row_sum = np.zeros((n_valid, n_heads))
    acc = np.zeros((n_valid, n_heads, d))
    for start in range(0, n_keys, HALF_KEY_TILE):
        keys = np.arange(start, min(start + HALF_KEY_TILE, n_keys))
        s = np.einsum("thd,jhd->thj", q, k[keys]).astype(np.float32).astype(np.float64)
        visible = (keys[None, :] <= query_pos[:, None])[:, None, :]
        new_max = np.maximum(row_max, np.where(visible, s, -np.inf).max(axis=-1))
        p = np.where(visible, np.exp(s - new_max[..., None]), 0).astype(np.float16).astype(np.float64)
        alpha = np.exp(row_max - new_max)
        row_sum = row_sum * alpha + p.sum(axis=-1)
        acc = acc * alpha[..., None] + np.einsum("thj,jhd->thd", p, v[keys])
        row_max = new_max
    out = np.zeros((n_tokens, n_heads * d), np.float32)
    out[:n_valid] = (acc / row_sum[..., None]).reshape(n_valid, n_heads * d)
    return out
