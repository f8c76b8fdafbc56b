"""Flash-decode attention over the paged KV cache: unscheduled TIR + numpy references.

One query token (at position pos[0], already appended to the cache) attends to the L = pos + 1
cached tokens. Query head h reads KV head h // G (G = NH / NKV), scale 1 / sqrt(D), float32
math on the float16 cache. Token t lives at page page_table[t // P], slot t % P.

`paged_decode_attention` cuts the context into S splits of C = ceil(L / S) tokens (split s:
tokens [s*C, min((s+1)*C, L)); trailing splits may be empty) and returns, per query head and
split, the split's softmax-normalised output and its log-sum-exp:
  o_part[h, s] = sum_t softmax_s(score)[t] * V[t]          lse[h, s] = log sum_t exp(score[t])
An empty split gives o_part = 0 and lse = -inf. `attention_combine` merges the splits:
  out[h] = sum_s exp(lse[h, s] - M) * o_part[h, s] / sum_s exp(lse[h, s] - M),  M = max_s lse
(split 0 is never empty, so M is finite). `paged_decode_attention_merged` (CUDA only) is both
in one launch: the last thread block of a KV head to finish, by an atomic count, merges its splits.

Inside a split the work is `streams` token streams, each an online softmax over tiles of `tile`
consecutive tokens: step i of stream w takes tokens s*C + (i*streams + w)*tile + [0, tile).
Per tile, the scores of all its tokens, then the tile's max, then one rescale of the running
state (max m, sum l, output acc) by exp(m_old - m_new), then the tile's p = exp(score - m_new)
and p . V. The streams' states are merged at the end of the split. Per (KV head, split, stream)
the G query heads of the group are handled together, so every K and V row is read once for the
whole GQA group. The default shape is the GPU's (sparkinfer/schedule/attention.py: a stream per
warp, a tile of a few tokens a step, the lanes over heads and head dims), but nothing here is
bound to threads: built as is for LLVM it runs serially.

The trip count of a stream's tile loop, ceil(C / (streams * tile)), is computed from pos on
the device, so the work follows the actual context, not the cache capacity.
"""

import math
from typing import Any

import numpy as np
import numpy.typing as npt
from tvm import te, tirx

from sparkinfer.reference import qwen3moe as ref

Expr = tirx.Expr
_NEG_INF = float("-inf")


def paged_decode_attention(
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    page_size: int,
    max_pages: int,
    splits: int,
    streams: int = 8,
    tile: int = 4,
) -> tirx.PrimFunc:
    """Params (q_rot f32[NH, D], k_cache f16[NP, P, NKV, D], v_cache (same), page_table
    int32[MP], pos int32[1], o_part f32[NH, S, D], lse f32[NH, S]); NP is symbolic.

    `streams` and `tile` shape the work inside a split (module docstring); they change the
    order of float32 sums only, never which tokens are read."""
    # Imported here: TVMScript needs TVM's compiler half, and the GPU machines' runtime-only
    # TVM must still import this module for its numpy reference.
    from tvm.script import tirx as T

    NH, NKV, D, P, MP, S = n_heads, n_kv_heads, head_dim, page_size, max_pages, splits
    attend_splits = _attend_splits(NH, NKV, D, P, MP, S, streams, tile)

    @T.prim_func(private=True, s_tir=True)
    def func(
        q_rot: T.Buffer((NH, D), "float32"),
        var_k_cache: T.handle,
        var_v_cache: T.handle,
        page_table: T.Buffer((MP,), "int32"),
        pos: T.Buffer((1,), "int32"),
        o_part: T.Buffer((NH, S, D), "float32"),
        lse: T.Buffer((NH, S), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        n_pages = T.int64()
        k_cache = T.match_buffer(var_k_cache, (n_pages, P, NKV, D), "float16")
        v_cache = T.match_buffer(var_v_cache, (n_pages, P, NKV, D), "float16")
        attend_splits(q_rot, k_cache, v_cache, page_table, pos, o_part, lse)

    return func.with_attr("global_symbol", f"paged_decode_attention_{NH}x{NKV}x{D}_p{P}_s{S}")


def _attend_splits(NH: int, NKV: int, D: int, P: int, MP: int, S: int, W: int, TT: int) -> Any:
    """The TVMScript macro of `paged_decode_attention`'s body, (q_rot, k_cache, v_cache,
    page_table, pos, o_part, lse) -> o_part and lse written: shared with
    `paged_decode_attention_merged`, which adds the merge after it."""
    from tvm.script import tirx as T

    if NH % NKV:
        raise ValueError(f"{NH} query heads do not divide into {NKV} KV heads")
    G = NH // NKV
    f32 = "float32"
    neg_inf = T.float32(_NEG_INF)
    # "No token yet" for a running max: the float32 minimum rather than -inf, so that
    # exp(m_old - m_new) of two empty states is exp(0), which multiplies l = 0 and acc = 0,
    # instead of NaN; and it is the identity TVM's max reducer matches (needed to turn a
    # max into a cross-thread reduction).
    lowest = T.min_value(f32)
    scale = T.float32(1.0 / math.sqrt(D))

    # The split geometry, as expressions of the device position (see the module docstring).
    def chunk(pos: tirx.Buffer) -> Expr:
        return (pos[0] + S) // S  # ceil((pos + 1) / S)

    def steps(pos: tirx.Buffer) -> Expr:
        return (chunk(pos) + W * TT - 1) // (W * TT)

    def token(pos: tirx.Buffer, s: Expr, w: Expr, it: Expr, t: Expr) -> Expr:
        return s * chunk(pos) + (it * W + w) * TT + t

    def valid(pos: tirx.Buffer, s: Expr, w: Expr, it: Expr, t: Expr) -> Expr:
        end = tirx.min((s + 1) * chunk(pos), pos[0] + 1)
        return token(pos, s, w, it, t) < end

    def row(
        cache: tirx.Buffer, page_table: tirx.Buffer, pos: tirx.Buffer, t: Expr, kv: Expr, d: Expr
    ) -> Expr:
        # Clamped to a cached token: a tile's rows are all loaded, used or not, so that a
        # schedule issues them together without a bounds test per token. The page lookups
        # are clamped into range too (a no-op for a valid table) so that TVM can bound the
        # access: an unprovable index makes cache_read guard its copy and keep the cache in
        # addressable local memory instead of registers.
        t = tirx.min(t, pos[0])
        page = page_table[tirx.min(t // P, MP - 1)]
        page = tirx.max(tirx.min(page, (cache.shape[0] - 1).astype("int32")), 0)
        return cache[page, t % P, kv, d]

    @T.macro
    def attend_splits(q_rot, k_cache, v_cache, page_table, pos, o_part, lse):
        # Per stream: running max, running sum, running output (private to the stream) ...
        m = T.sblock_alloc_buffer((NKV, S, W, G), "float32")
        l = T.sblock_alloc_buffer((NKV, S, W, G), "float32")
        acc = T.sblock_alloc_buffer((NKV, S, W, G, D), "float32")
        # ... and their final values, published for the merge.
        m_out = T.sblock_alloc_buffer((NKV, S, W, G), "float32")
        l_out = T.sblock_alloc_buffer((NKV, S, W, G), "float32")
        acc_out = T.sblock_alloc_buffer((NKV, S, W, G, D), "float32")
        # A tile's probabilities, per stream.
        p = T.sblock_alloc_buffer((NKV, S, W, TT, G), "float32")
        # Per split: max over streams, each stream's weight exp(m_stream - max), merged sum,
        # merged unnormalised output.
        m_all = T.sblock_alloc_buffer((NKV, S, G), "float32")
        stream_weight = T.sblock_alloc_buffer((NKV, S, W, G), "float32")
        l_all = T.sblock_alloc_buffer((NKV, S, G), "float32")
        o_all = T.sblock_alloc_buffer((NKV, S, G, D), "float32")
        for kv, s, w in T.grid(NKV, S, W):
            for g in range(G):
                with T.sblock("state_init"):
                    vkv, vs, vw, vg = T.axis.remap("SSSS", [kv, s, w, g])
                    m[vkv, vs, vw, vg] = lowest
                    l[vkv, vs, vw, vg] = T.float32(0)
            for g, d in T.grid(G, D):
                with T.sblock("acc_init"):
                    vkv, vs, vw, vg, vd = T.axis.remap("SSSSS", [kv, s, w, g, d])
                    acc[vkv, vs, vw, vg, vd] = T.float32(0)
            for it in range(steps(pos)):
                # One tile of the stream; the step's buffers are per tile. A tile past the
                # split's end is skipped: its p would be all 0 and its rescale exp(0) = 1.
                with T.sblock("step"):
                    vkv, vs, vw = T.axis.remap("SSS", [kv, s, w])
                    vit = T.axis.opaque(steps(pos), it)
                    T.where(valid(pos, s, w, it, 0))
                    score = T.sblock_alloc_buffer((TT, G), "float32")
                    tile_max = T.sblock_alloc_buffer((G,), "float32")
                    alpha = T.sblock_alloc_buffer((G,), "float32")
                    tile_sum = T.sblock_alloc_buffer((G,), "float32")
                    pv = T.sblock_alloc_buffer((G, D), "float32")
                    # The tile's K and V rows, gathered from their pages first, so that a
                    # schedule can have every load of the tile in flight before any math.
                    k_tile = T.sblock_alloc_buffer((TT, D), "float16")
                    v_tile = T.sblock_alloc_buffer((TT, D), "float16")
                    for t, d in T.grid(TT, D):
                        with T.sblock("gather_k"):
                            vt, vd = T.axis.remap("SS", [t, d])
                            k_tile[vt, vd] = row(
                                k_cache, page_table, pos, token(pos, vs, vw, vit, vt), vkv, vd
                            )
                    for t, d in T.grid(TT, D):
                        with T.sblock("gather_v"):
                            vt, vd = T.axis.remap("SS", [t, d])
                            v_tile[vt, vd] = row(
                                v_cache, page_table, pos, token(pos, vs, vw, vit, vt), vkv, vd
                            )
                    for t, g, d in T.grid(TT, G, D):
                        with T.sblock("score"):
                            vt, vg, vd = T.axis.remap("SSR", [t, g, d])
                            with T.init():
                                score[vt, vg] = T.float32(0)
                            score[vt, vg] = score[vt, vg] + q_rot[vkv * G + vg, vd] * k_tile[
                                vt, vd
                            ].astype(f32)
                    for g, t in T.grid(G, TT):
                        with T.sblock("tile_max"):
                            vg, vt = T.axis.remap("SR", [g, t])
                            with T.init():
                                tile_max[vg] = lowest
                            tile_max[vg] = T.max(
                                tile_max[vg],
                                T.Select(
                                    valid(pos, vs, vw, vit, vt), score[vt, vg] * scale, lowest
                                ),
                            )
                    for g in range(G):
                        with T.sblock("rescale"):
                            vg = T.axis.remap("S", [g])
                            alpha[vg] = T.exp(
                                m[vkv, vs, vw, vg] - T.max(m[vkv, vs, vw, vg], tile_max[vg])
                            )
                            m[vkv, vs, vw, vg] = T.max(m[vkv, vs, vw, vg], tile_max[vg])
                    for t, g in T.grid(TT, G):
                        with T.sblock("p"):
                            vt, vg = T.axis.remap("SS", [t, g])
                            p[vkv, vs, vw, vt, vg] = T.Select(
                                valid(pos, vs, vw, vit, vt),
                                T.exp(score[vt, vg] * scale - m[vkv, vs, vw, vg]),
                                T.float32(0),
                            )
                    for g, t in T.grid(G, TT):
                        with T.sblock("tile_sum"):
                            vg, vt = T.axis.remap("SR", [g, t])
                            with T.init():
                                tile_sum[vg] = T.float32(0)
                            tile_sum[vg] = tile_sum[vg] + p[vkv, vs, vw, vt, vg]
                    for g in range(G):
                        with T.sblock("update_sum"):
                            vg = T.axis.remap("S", [g])
                            l[vkv, vs, vw, vg] = l[vkv, vs, vw, vg] * alpha[vg] + tile_sum[vg]
                    for g, d, t in T.grid(G, D, TT):
                        with T.sblock("pv"):
                            vg, vd, vt = T.axis.remap("SSR", [g, d, t])
                            with T.init():
                                pv[vg, vd] = T.float32(0)
                            pv[vg, vd] = pv[vg, vd] + p[vkv, vs, vw, vt, vg] * v_tile[
                                vt, vd
                            ].astype(f32)
                    for g, d in T.grid(G, D):
                        with T.sblock("update_acc"):
                            vg, vd = T.axis.remap("SS", [g, d])
                            acc[vkv, vs, vw, vg, vd] = (
                                acc[vkv, vs, vw, vg, vd] * alpha[vg] + pv[vg, vd]
                            )
            for g in range(G):
                with T.sblock("publish_state"):
                    vkv, vs, vw, vg = T.axis.remap("SSSS", [kv, s, w, g])
                    m_out[vkv, vs, vw, vg] = m[vkv, vs, vw, vg]
                    l_out[vkv, vs, vw, vg] = l[vkv, vs, vw, vg]
            for g, d in T.grid(G, D):
                with T.sblock("publish_acc"):
                    vkv, vs, vw, vg, vd = T.axis.remap("SSSSS", [kv, s, w, g, d])
                    acc_out[vkv, vs, vw, vg, vd] = acc[vkv, vs, vw, vg, vd]
        for kv, s, g, w in T.grid(NKV, S, G, W):
            with T.sblock("merge_max"):
                vkv, vs, vg, vw = T.axis.remap("SSSR", [kv, s, g, w])
                with T.init():
                    m_all[vkv, vs, vg] = lowest
                m_all[vkv, vs, vg] = T.max(m_all[vkv, vs, vg], m_out[vkv, vs, vw, vg])
        for kv, s, w, g in T.grid(NKV, S, W, G):
            with T.sblock("stream_weight"):
                vkv, vs, vw, vg = T.axis.remap("SSSS", [kv, s, w, g])
                stream_weight[vkv, vs, vw, vg] = T.exp(m_out[vkv, vs, vw, vg] - m_all[vkv, vs, vg])
        for kv, s, g, w in T.grid(NKV, S, G, W):
            with T.sblock("merge_sum"):
                vkv, vs, vg, vw = T.axis.remap("SSSR", [kv, s, g, w])
                with T.init():
                    l_all[vkv, vs, vg] = T.float32(0)
                l_all[vkv, vs, vg] = (
                    l_all[vkv, vs, vg] + l_out[vkv, vs, vw, vg] * stream_weight[vkv, vs, vw, vg]
                )
        for kv, s, g, d, w in T.grid(NKV, S, G, D, W):
            with T.sblock("merge_out"):
                vkv, vs, vg, vd, vw = T.axis.remap("SSSSR", [kv, s, g, d, w])
                with T.init():
                    o_all[vkv, vs, vg, vd] = T.float32(0)
                o_all[vkv, vs, vg, vd] = (
                    o_all[vkv, vs, vg, vd]
                    + acc_out[vkv, vs, vw, vg, vd] * stream_weight[vkv, vs, vw, vg]
                )
        for kv, s, g, d in T.grid(NKV, S, G, D):
            with T.sblock("o_part"):
                vkv, vs, vg, vd = T.axis.remap("SSSS", [kv, s, g, d])
                o_part[vkv * G + vg, vs, vd] = T.Select(
                    l_all[vkv, vs, vg] > T.float32(0),
                    o_all[vkv, vs, vg, vd] / l_all[vkv, vs, vg],
                    T.float32(0),
                )
        for kv, s, g in T.grid(NKV, S, G):
            with T.sblock("lse"):
                vkv, vs, vg = T.axis.remap("SSS", [kv, s, g])
                lse[vkv * G + vg, vs] = T.Select(
                    l_all[vkv, vs, vg] > T.float32(0),
                    m_all[vkv, vs, vg] + T.log(l_all[vkv, vs, vg]),
                    neg_inf,
                )

    return attend_splits


def split_weight(lse: Expr, lse_max: Expr) -> Expr:
    """A split's weight in the combine, exp(lse - max_s lse): empty splits have lse = -inf and
    weigh exp(-inf) = 0; the max is finite (split 0 is never empty)."""
    return tirx.exp(lse - lse_max)


def paged_decode_attention_merged(
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    page_size: int,
    max_pages: int,
    splits: int,
    streams: int = 8,
    tile: int = 4,
) -> tirx.PrimFunc:
    """`paged_decode_attention` and `attention_combine` in one kernel, for CUDA (the step
    variant attention_merge="last_block"). Params (q_rot, k_cache, v_cache, page_table, pos as
    paged_decode_attention's, arrivals int32[NKV] (in place: 0 before and after), o_part
    f32[NH, S, D], lse f32[NH, S], out f32[NH*D]).

    Each (KV head, split) computes its split as `paged_decode_attention` does, then publishes
    o_part and lse (a memory fence in every thread, a barrier) and counts itself in
    arrivals[kv] with an atomic add; the one whose add returns S - 1, the last of its KV head's
    splits to finish, merges the head group's S splits as `attention_combine` does (the same
    sums in the same order, so the same out) and puts arrivals[kv] back to 0 for the next
    launch. A split is one CUDA thread block, so the count and the fences are between blocks;
    CUDA-only intrinsics (atomicAdd, __threadfence, __syncthreads): no LLVM build."""
    from tvm.script import tirx as T

    NH, NKV, D, P, MP, S = n_heads, n_kv_heads, head_dim, page_size, max_pages, splits
    G = NH // NKV
    f32 = "float32"
    attend_splits = _attend_splits(NH, NKV, D, P, MP, S, streams, tile)

    @T.prim_func(private=True, s_tir=True)
    def func(
        q_rot: T.Buffer((NH, D), "float32"),
        var_k_cache: T.handle,
        var_v_cache: T.handle,
        page_table: T.Buffer((MP,), "int32"),
        pos: T.Buffer((1,), "int32"),
        arrivals: T.Buffer((NKV,), "int32"),
        o_part: T.Buffer((NH, S, D), "float32"),
        lse: T.Buffer((NH, S), "float32"),
        out: T.Buffer((NH * D,), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        n_pages = T.int64()
        k_cache = T.match_buffer(var_k_cache, (n_pages, P, NKV, D), "float16")
        v_cache = T.match_buffer(var_v_cache, (n_pages, P, NKV, D), "float16")
        attend_splits(q_rot, k_cache, v_cache, page_table, pos, o_part, lse)
        # 1 where (kv, s) is the last of kv's splits to arrive: the counting thread's answer,
        # and every thread's copy of it (the merge loop's extent)
        last = T.sblock_alloc_buffer((NKV, S), "int32")
        is_last = T.sblock_alloc_buffer((NKV, S), "int32")
        for kv, s in T.grid(NKV, S):
            with T.sblock("release"):
                # Every thread's o_part and lse stores visible to the whole GPU before the
                # block counts itself (the arrive below follows the barrier). Declared: its
                # split's lse only, a region the schedule can place after the split's stores.
                vkv, vs = T.axis.remap("SS", [kv, s])
                T.reads(lse[vkv * G : vkv * G + G, vs])
                T.writes()
                T.cuda.thread_fence()
                T.cuda.cta_sync()
        for kv, s in T.grid(NKV, S):
            with T.sblock("arrive"):
                vkv, vs = T.axis.remap("SS", [kv, s])
                # arrivals[kv] is read by the atomic add, through its address: declared as
                # written only (a block that reads and writes a buffer cannot be moved)
                T.reads(lse[vkv * G : vkv * G + G, vs])
                T.writes(arrivals[vkv], last[vkv, vs])
                before: T.int32 = T.cuda.atomic_add(T.address_of(arrivals[vkv]), 1)
                if before == S - 1:
                    arrivals[vkv] = 0
                # The other splits' stores, published before their adds, are visible after
                # this fence (the merge reads them after the barrier that follows `last`).
                T.cuda.thread_fence()
                last[vkv, vs] = T.Cast("int32", before == S - 1)
        for kv, s in T.grid(NKV, S):
            with T.sblock("is_last"):
                vkv, vs = T.axis.remap("SS", [kv, s])
                is_last[vkv, vs] = last[vkv, vs]
        for kv, s in T.grid(NKV, S):
            with T.sblock("merge"):
                vkv, vs = T.axis.remap("SS", [kv, s])
                # It reads every split's o_part and lse, written by other thread blocks and ordered by
                # the count, not by dataflow: its own split's lse alone is declared, which places
                # it after that split's stores (a region over all splits cannot be placed there).
                T.reads(is_last[vkv, vs], lse[vkv * G : vkv * G + G, vs])
                T.writes(out[vkv * G * D : vkv * G * D + G * D])
                # per head of the group, the combine's max, weight sum and weighted outputs
                lse_max = T.sblock_alloc_buffer((G,), "float32")
                weight_sum = T.sblock_alloc_buffer((G,), "float32")
                merged = T.sblock_alloc_buffer((G, D), "float32")
                # Once in the last block, never in the others: a loop, not an `if`, so that the
                # schedule can still place the merge's blocks (an IfThenElse hides them from the
                # schedule's tree of loops and blocks).
                for _ in range(is_last[vkv, vs]):
                    for g, s2 in T.grid(G, S):
                        with T.sblock("lse_max"):
                            vg, vs2 = T.axis.remap("SR", [g, s2])
                            with T.init():
                                lse_max[vg] = T.min_value(f32)
                            lse_max[vg] = T.max(lse_max[vg], lse[vkv * G + vg, vs2])
                    for g, s2 in T.grid(G, S):
                        with T.sblock("weight_sum"):
                            vg, vs2 = T.axis.remap("SR", [g, s2])
                            with T.init():
                                weight_sum[vg] = T.float32(0)
                            weight_sum[vg] = weight_sum[vg] + split_weight(
                                lse[vkv * G + vg, vs2], lse_max[vg]
                            )
                    for g, d, s2 in T.grid(G, D, S):
                        with T.sblock("merged"):
                            vg, vd, vs2 = T.axis.remap("SSR", [g, d, s2])
                            with T.init():
                                merged[vg, vd] = T.float32(0)
                            merged[vg, vd] = merged[vg, vd] + split_weight(
                                lse[vkv * G + vg, vs2], lse_max[vg]
                            ) * o_part[vkv * G + vg, vs2, vd]
                    for g, d in T.grid(G, D):
                        with T.sblock("combine"):
                            vg, vd = T.axis.remap("SS", [g, d])
                            out[(vkv * G + vg) * D + vd] = merged[vg, vd] / weight_sum[vg]

    return func.with_attr("global_symbol", f"paged_decode_attention_merged_{NH}x{NKV}x{D}_p{P}_s{S}")


def combine_splits(o_part: te.Tensor, lse: te.Tensor) -> te.Tensor:
    """The stage `combine` f32[NH*D]: the splits o_part f32[NH, S, D] merged by their weights
    exp(lse - max lse) (stages lse_max, weight_sum, merged); `attention_combine`'s output, and
    the input of `gemv_q8.attention_combine_q8_1`'s quantizer."""
    NH, S, D = (int(n) for n in o_part.shape)
    s_max = te.reduce_axis((0, S), name="s")
    lse_max = te.compute((NH,), lambda h: te.max(lse[h, s_max], axis=s_max), name="lse_max")

    def weight(h: Expr, s: Expr) -> Expr:
        return split_weight(lse[h, s], lse_max[h])

    s_sum = te.reduce_axis((0, S), name="s")
    total = te.compute((NH,), lambda h: te.sum(weight(h, s_sum), axis=s_sum), name="weight_sum")
    s_out = te.reduce_axis((0, S), name="s")
    merged = te.compute(
        (NH, D),
        lambda h, d: te.sum(weight(h, s_out) * o_part[h, s_out, d], axis=s_out),
        name="merged",
    )
    return te.compute((NH * D,), lambda i: merged[i // D, i % D] / total[i // D], name="combine")


def combine_inputs(n_heads: int, splits: int, head_dim: int) -> tuple[te.Tensor, te.Tensor]:
    """The placeholders o_part f32[NH, S, D] and lse f32[NH, S] of the combine kernels."""
    return (te.placeholder((n_heads, splits, head_dim), "float32", name="o_part"),
            te.placeholder((n_heads, splits), "float32", name="lse"))


def attention_combine(n_heads: int, splits: int, head_dim: int) -> tirx.PrimFunc:
    """Params (o_part f32[NH, S, D], lse f32[NH, S], out f32[NH*D])."""
    o_part, lse = combine_inputs(n_heads, splits, head_dim)
    out = combine_splits(o_part, lse)
    return te.create_prim_func([o_part, lse, out]).with_attr(
        "global_symbol", f"attention_combine_{n_heads}x{splits}x{head_dim}"
    )


def gather_context(
    cache: npt.NDArray[np.float16], page_table: npt.NDArray[np.int32], length: int
) -> np.ndarray:
    """The first `length` tokens of a paged cache f16[NP, P, NKV, D] -> f32[length, NKV, D]."""
    page_size = cache.shape[1]
    t = np.arange(length)
    return cache[page_table[t // page_size], t % page_size].astype(np.float32)


def paged_decode_attention_reference(
    q_rot: npt.NDArray[np.float32],
    k_cache: npt.NDArray[np.float16],
    v_cache: npt.NDArray[np.float16],
    page_table: npt.NDArray[np.int32],
    pos: int,
    splits: int,
) -> tuple[np.ndarray, np.ndarray]:
    """numpy oracle in float64: (o_part f32[NH, S, D], lse f32[NH, S]) for context pos + 1."""
    n_heads, d = q_rot.shape
    length = pos + 1
    k = gather_context(k_cache, page_table, length).astype(np.float64)
    v = gather_context(v_cache, page_table, length).astype(np.float64)
    group = n_heads // k.shape[1]
    kv_of = np.arange(n_heads) // group
    scores = np.einsum("hd,thd->ht", q_rot.astype(np.float64), k[:, kv_of]) / np.sqrt(d)
    chunk = -(-length // splits)
    o_part = np.zeros((n_heads, splits, d))
    lse = np.full((n_heads, splits), -np.inf)
    for s in range(splits):
        lo, hi = s * chunk, min((s + 1) * chunk, length)
        if lo >= hi:
            continue
        sc = scores[:, lo:hi]
        m = sc.max(axis=1, keepdims=True)
        e = np.exp(sc - m)
        total = e.sum(axis=1, keepdims=True)
        o_part[:, s] = np.einsum("ht,thd->hd", e / total, v[lo:hi, kv_of])
        lse[:, s] = (m + np.log(total))[:, 0]
    return o_part.astype(np.float32), lse.astype(np.float32)


def attention_combine_reference(
    o_part: npt.NDArray[np.float32], lse: npt.NDArray[np.float32]
) -> np.ndarray:
    """numpy oracle: out f32[NH*D]."""
    lse64 = lse.astype(np.float64)
    w = np.exp(lse64 - lse64.max(axis=1, keepdims=True))
    out = np.einsum("hs,hsd->hd", w, o_part.astype(np.float64)) / w.sum(axis=1)[:, None]
    return out.reshape(-1).astype(np.float32)


def decode_attention_reference(
    q_rot: npt.NDArray[np.float32],
    k_cache: npt.NDArray[np.float16],
    v_cache: npt.NDArray[np.float16],
    page_table: npt.NDArray[np.int32],
    pos: int,
) -> np.ndarray:
    """The model oracle's attention for the last query over the paged cache: f32[NH*D]."""
    length = pos + 1
    k = gather_context(k_cache, page_table, length)
    v = gather_context(v_cache, page_table, length)
    return ref.causal_gqa_attention(q_rot[None], k, v, q_start=pos)[0]


MMA_WARPS = 4  # warps (key streams) a block of `paged_decode_attention_mma`: a power of two (its merge tree)


def paged_decode_attention_mma(
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    page_size: int,
    max_pages: int,
    splits: int,
) -> tirx.PrimFunc:
    """`paged_decode_attention` (same params, splits, o_part and lse) on tensor cores: the step
    variant decode_attention="mma", CUDA only, already scheduled
    (`schedule.attention.PagedDecodeAttentionMmaCudaRule` takes it as it is). Numerics of the
    prefill's tensor-core form (`prefill_attention.causal_prefill_attention_half`): Q * scale and
    P rounded to f16 before the products, f32 sums; `paged_decode_attention_mma_reference`.

    Why: the float32 kernel issues ~194 instructions a token and is issue-bound at depth
    16384 (bench/NOTES.md "Decode attention v2"); mma.sync m16n8k16 does a 16-key tile's q . K
    for the whole GQA group in D / 16 instructions. The layout (PTX ISA, "Matrix Fragments for
    mma.m16n8k16"): the scores go transposed, S^T[16 keys x 8 heads] = K[16 x D] Q^T, so the
    group (G <= 8 heads, rows past G zero) is the n8 and no row of the product is wasted; K is
    the A operand, as the cache stores it; Q^T the B operand ("col": Q's own rows), loaded once
    into registers. Then O^T[D x 8] += V^T[D x 16 keys] P^T, D / 16 m-tiles: V^T is the A
    operand (ldmatrix.trans of the cache's rows), P^T the B operand. A lane (g = lane / 4,
    t = lane % 4) holds S^T's keys g, g + 8 and O^T's dims 16j + g, 16j + g + 8 of the same two
    heads 2t, 2t + 1, so the online softmax's rescale of O needs no exchange between lanes;
    the max over a tile's keys is 3 xor-shuffles (lanes g ^ 1, 2, 4). P^T goes from S^T's
    accumulator layout to the B fragment through 256 bytes of the warp's shared memory (four
    2-byte stores, one ldmatrix.x2.trans): the transpose that `movmatrix` would do in registers.

    A block per (KV head, split) of MMA_WARPS warps, as the float32 kernel's; warp w takes the
    split's 16-key tiles w, w + MMA_WARPS, ... (keys s*C + (i*MMA_WARPS + w)*16 + [0, 16), C =
    ceil(L / S)), each through its own shared K and V tile (16-byte loads through the page
    table, rows clamped to the context as `paged_decode_attention` clamps them, their 16-byte
    chunks permuted as the prefill's register form permutes them, so that ldmatrix has no bank
    conflicts), with __syncwarp only inside the loop. The next tile's K and V are loaded into
    registers while a tile computes (read ahead: at the model's 32 splits the grid is one wave of
    one block an SM, so only a warp's own loads in flight hide the latency). At the end the block
    merges its warps' states through shared memory (the max, then a tree adding the warps' O
    scaled by exp(m_w - max)), and warp 0 writes o_part and lse as the float32 kernel does (an
    empty split: 0 and -inf)."""
    return _mma_attention(n_heads, n_kv_heads, head_dim, page_size, max_pages, splits, merged=False)


def paged_decode_attention_mma_merged(
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    page_size: int,
    max_pages: int,
    splits: int,
) -> tirx.PrimFunc:
    """`paged_decode_attention_mma` and `attention_combine` in one kernel (decode_attention "mma"
    with attention_merge "last_block"), params as `paged_decode_attention_merged`'s: after the
    splits, a fence and a barrier, thread 0 counts the block in arrivals[kv] (the last of the
    head's S resets it), and the last block merges the group's splits as `attention_combine`
    does (the same sums in the same order), a thread per (head, dim) element."""
    return _mma_attention(n_heads, n_kv_heads, head_dim, page_size, max_pages, splits, merged=True)


def mma_attention_misfit(n_heads: int, n_kv_heads: int, head_dim: int) -> str | None:
    """Why `paged_decode_attention_mma` cannot serve these heads (None: it can): the GQA group is
    mma.sync's n8, and a row's 16-byte chunks are swizzled over 8 of them."""
    from sparkinfer.kernels.prefill_attention import MMA_N, SWIZZLE

    if n_heads % n_kv_heads:
        return f"{n_heads} query heads do not divide into {n_kv_heads} KV heads"
    group = n_heads // n_kv_heads
    if group > MMA_N or head_dim % (SWIZZLE * 8):
        return (f"the tensor-core decode attention needs at most {MMA_N} query heads per KV head (got {group}) "
                f"and a head dim that is a multiple of {SWIZZLE * 8} (got {head_dim})")
    return None


def _mma_attention(NH: int, NKV: int, D: int, P: int, MP: int, S: int, merged: bool) -> tirx.PrimFunc:
    """`paged_decode_attention_mma`'s kernel, with the last-block merge after it if `merged`."""
    from tvm.script import tirx as T

    from sparkinfer.kernels.prefill_attention import MMA_K, MMA_M, MMA_N, SWIZZLE, WARP, _cached, exp_by_exp2

    W = MMA_WARPS
    misfit = mma_attention_misfit(NH, NKV, D)
    if misfit is not None:
        raise ValueError(misfit)
    G = NH // NKV
    VECTOR = 8  # halves a 16-byte chunk: a load, an ldmatrix row
    KT, KS, DT = MMA_M, D // MMA_K, D // MMA_M  # keys a tile, q . K's k-steps, O^T's m-tiles
    CHUNKS = D // VECTOR  # 16-byte chunks a row
    LOADS = KT * CHUNKS // WARP  # a lane's 16-byte loads of a K (or V) tile
    THREADS = W * WARP
    WARP_ROUNDS = W.bit_length() - 1  # rounds of the warps' merge tree (W a power of two)
    OUTS = -(-G * D // THREADS)  # a thread's elements of the last block's merge
    scale = T.float32(1.0 / math.sqrt(D))
    lowest = T.min_value("float32")
    f16, f32 = "float16", "float32"
    full = tirx.const(0xFFFFFFFF, "uint32")

    def lane_xor(x: Expr, lane_mask: int) -> Expr:
        return T.tvm_warp_shuffle_xor(full, x, lane_mask, WARP, WARP)

    def at(warp: Expr, matrix: int, row: Expr, chunk: Expr) -> Expr:
        """The offset of row `row`'s 16-byte chunk `chunk` in warp `warp`'s shared tile `matrix`
        (0: K, 1: V), stored as chunk ^ row % 8: the 8 rows an ldmatrix reads fall on 8 bank groups."""
        return ((warp * 2 + matrix) * KT + row) * D + tirx.bitwise_xor(chunk, row % SWIZZLE) * VECTOR

    def mma(a: tirx.Buffer, b: tirx.Buffer, b_at: Expr, c: tirx.Buffer, c_at: Expr) -> Expr:
        return T.ptx_legacy.mma("m16n8k16", "row", "col", "fp16", "fp16", "fp32", a.data, 0, b.data, b_at,
                                c.data, c_at, False, dtype=f32)

    def ldmatrix(transposed: bool, count: int, frag: tirx.Buffer, tiles: tirx.Buffer, tile_at: Expr) -> Expr:
        return T.ptx_legacy.ldmatrix(transposed, count, ".b16", frag.data, 0, tiles.data, tile_at, dtype=f16)

    def merged_at(lane: Expr, i: int) -> Expr:
        """Where a lane's O^T accumulator entry i (m-tile i / 4: dim 16(i / 4) + g + 8(i % 4 / 2), head
        2t + i % 2) goes in a warp's slot of `merged`: dim * 8 + head."""
        return (i // 4 * MMA_M + lane // 4 + i % 4 // 2 * 8) * MMA_N + lane % 4 * 2 + i % 2

    def key(split: Expr, chunk: Expr, it: Expr, warp: Expr, row: Expr) -> Expr:
        """The key at row `row` of warp `warp`'s tile `it` of split `split` (C = chunk keys a split)."""
        return split * chunk + (it * W + warp) * KT + row

    def piece(cache: tirx.Buffer, page_table: tirx.Buffer, pos: tirx.Buffer, kv: Expr, split: Expr, chunk: Expr,
              it: Expr, warp: Expr, lane: Expr, i: int, e: Expr) -> Expr:
        """Half e of a lane's 16-byte piece i of a K or V tile (row (32i + lane) / (D / 8), chunk
        (32i + lane) % (D / 8)), clamped to the last cached key (as `paged_decode_attention`'s `row`:
        a key past the split is loaded, its P is 0)."""
        row = (i * WARP + lane) // CHUNKS
        return _cached(cache, page_table, T.min(key(split, chunk, it, warp, row), pos[0]), kv,
                       (i * WARP + lane) % CHUNKS * VECTOR + e)

    def sync_warp() -> Expr:
        # the warp's shared stores visible to its ldmatrix, and its ldmatrix done before the next stores
        return T.call_extern("void", "__syncwarp")

    def q_value(q_rot: tirx.Buffer, kv: Expr, lane: Expr, c: int, e: int) -> Expr:
        """B fragment entry e of k-step c: Q[head lane / 4, dim 16c + 8(e / 2) + 2(lane % 4) + e % 2]
        * scale in f16; 0 for the rows past the group."""
        head = lane // 4
        dim = c * MMA_K + e // 2 * 8 + lane % 4 * 2 + e % 2
        return T.Cast(f16, T.Select(head < G, q_rot[kv * G + T.min(head, G - 1), dim] * scale, T.float32(0)))

    @T.macro
    def attend(q_rot, k_cache, v_cache, page_table, pos, o_part, lse, block, tx):
        tiles = T.alloc_buffer((W * 2 * KT * D,), f16, scope="shared")  # per warp: K, V
        p_tiles = T.alloc_buffer((W * KT * MMA_N,), f16, scope="shared")  # per warp: P^T [key, head]
        states = T.alloc_buffer((2 * W * MMA_N,), f32, scope="shared")  # per warp: max, then sum
        merged = T.alloc_buffer((max(W // 2, 1) * D * MMA_N,), f32, scope="shared")  # warps' O^T, weighted
        q_frag = T.alloc_buffer((KS * 4,), f16, scope="local")  # k-step c's B fragment at 4c
        k_next = T.alloc_buffer((LOADS * VECTOR,), f16, scope="local")  # a lane's pieces of the next tile
        v_next = T.alloc_buffer((LOADS * VECTOR,), f16, scope="local")
        a_frag = T.alloc_buffer((8,), f16, scope="local")  # K's, then V^T's A fragment
        p = T.alloc_buffer((2,), f16, scope="local")  # P of keys g, g + 8 of one head
        p_frag = T.alloc_buffer((4,), f16, scope="local")
        s = T.alloc_buffer((4,), f32, scope="local")  # S^T: keys g, g + 8 of heads 2t, 2t + 1
        o = T.alloc_buffer((DT * 4,), f32, scope="local")  # m-tile j's accumulator at 4j
        row_max = T.alloc_buffer((2,), f32, scope="local")  # heads 2t, 2t + 1
        row_sum = T.alloc_buffer((2,), f32, scope="local")  # this lane's share (keys g, g + 8)
        tile_max = T.alloc_buffer((2,), f32, scope="local")
        alpha = T.alloc_buffer((2,), f32, scope="local")
        kv = block // S
        split = block % S
        warp = tx // WARP
        lane = tx % WARP
        chunk = (pos[0] + S) // S  # ceil((pos + 1) / S)
        end = T.min((split + 1) * chunk, pos[0] + 1)
        steps = (chunk + W * KT - 1) // (W * KT)  # a warp's tiles
        for c in T.unroll(KS):
            for e in T.unroll(4):
                q_frag[c * 4 + e] = q_value(q_rot, kv, lane, c, e)
        for i in T.unroll(DT * 4):
            o[i] = T.float32(0)
        for e in T.unroll(2):
            row_max[e] = lowest
            row_sum[e] = T.float32(0)
        for i in T.unroll(LOADS):  # tile 0's K and V
            for e in T.vectorized(VECTOR):
                k_next[i * VECTOR + e] = piece(k_cache, page_table, pos, kv, split, chunk, 0, warp, lane, i, e)
                v_next[i * VECTOR + e] = piece(v_cache, page_table, pos, kv, split, chunk, 0, warp, lane, i, e)
        for it in range(steps):
            T.evaluate(sync_warp())  # the last tile's ldmatrix are done
            for i in T.unroll(LOADS):  # piece i of the tile: row (32i + lane) / (D / 8), chunk % (D / 8)
                for e in T.vectorized(VECTOR):
                    tiles[at(warp, 0, (i * WARP + lane) // CHUNKS, (i * WARP + lane) % CHUNKS) + e] = k_next[
                        i * VECTOR + e]
                    tiles[at(warp, 1, (i * WARP + lane) // CHUNKS, (i * WARP + lane) % CHUNKS) + e] = v_next[
                        i * VECTOR + e]
            T.evaluate(sync_warp())
            if it + 1 < steps:  # the next tile's K and V in flight while this one computes
                for i in T.unroll(LOADS):
                    for e in T.vectorized(VECTOR):
                        k_next[i * VECTOR + e] = piece(k_cache, page_table, pos, kv, split, chunk, it + 1,
                                                       warp, lane, i, e)
                        v_next[i * VECTOR + e] = piece(v_cache, page_table, pos, kv, split, chunk, it + 1,
                                                       warp, lane, i, e)
            for i in T.unroll(4):
                s[i] = T.float32(0)
            for c in T.unroll(KS):  # x4: K's keys 0-7 and 8-15 of dims 16c .. 16c + 7, then of + 8 ..
                T.evaluate(ldmatrix(False, 4, a_frag, tiles, at(warp, 0, lane % 16, c * 2 + lane // 16)))
                T.evaluate(mma(a_frag, q_frag, c * 4, s, 0))
            for e in T.unroll(2):
                tile_max[e] = row_max[e]
                for half in T.unroll(2):
                    tile_max[e] = T.max(tile_max[e], T.Select(
                        key(split, chunk, it, warp, lane // 4 + half * 8) < end, s[half * 2 + e], lowest))
                for lane_mask in T.unroll(3):  # lanes g ^ 1, g ^ 2, g ^ 4: the head's 8 lanes
                    tile_max[e] = T.max(tile_max[e], lane_xor(tile_max[e], 4 << lane_mask))
                alpha[e] = exp_by_exp2(row_max[e] - tile_max[e])
                row_max[e] = tile_max[e]
                row_sum[e] = row_sum[e] * alpha[e]
                for half in T.unroll(2):
                    p[half] = T.Cast(f16, T.Select(key(split, chunk, it, warp, lane // 4 + half * 8) < end,
                                                   exp_by_exp2(s[half * 2 + e] - tile_max[e]), T.float32(0)))
                    p_tiles[(warp * KT + lane // 4 + half * 8) * MMA_N + lane % 4 * 2 + e] = p[half]
                    row_sum[e] = row_sum[e] + T.Cast(f32, p[half])
                for j in T.unroll(DT):
                    for half in T.unroll(2):
                        o[j * 4 + half * 2 + e] = o[j * 4 + half * 2 + e] * alpha[e]
            T.evaluate(sync_warp())
            # x2 .trans: P^T's keys 0-7, then 8-15, as the B fragment (head g, keys 2t, 2t + 1)
            T.evaluate(ldmatrix(True, 2, p_frag, p_tiles, (warp * KT + lane % 16) * MMA_N))
            for j in T.unroll(DT):  # x4 .trans: V^T's dims 16j .. of keys 0-7, dims + 8 .., then keys 8-15
                T.evaluate(ldmatrix(True, 4, a_frag, tiles, at(warp, 1, lane // 16 * 8 + lane % 8,
                                                                j * 2 + lane // 8 % 2)))
                T.evaluate(mma(a_frag, p_frag, 0, o, j * 4))
        # Every warp past its last ldmatrix of P^T before any writes `states`: TVM's storage
        # planner lays `states` in `p_tiles`' room (their lifetimes do not overlap in one thread's
        # order, but a warp may finish its loop before another).
        T.tvm_storage_sync("shared")
        for e in T.unroll(2):
            for lane_mask in T.unroll(3):
                row_sum[e] = row_sum[e] + lane_xor(row_sum[e], 4 << lane_mask)
            if lane < 4:
                states[warp * MMA_N + lane * 2 + e] = row_max[e]
                states[(W + warp) * MMA_N + lane * 2 + e] = row_sum[e]
        T.tvm_storage_sync("shared")
        # tile_max: the split's max over the warps; alpha: this warp's weight in the merge;
        # row_sum: the split's sum (every warp's, weighted)
        for e in T.unroll(2):
            tile_max[e] = lowest
            for w in T.unroll(W):
                tile_max[e] = T.max(tile_max[e], states[w * MMA_N + lane % 4 * 2 + e])
            alpha[e] = exp_by_exp2(row_max[e] - tile_max[e])
            row_sum[e] = T.float32(0)
            for w in T.unroll(W):
                row_sum[e] = row_sum[e] + states[(W + w) * MMA_N + lane % 4 * 2 + e] * exp_by_exp2(
                    states[w * MMA_N + lane % 4 * 2 + e] - tile_max[e])
        # A tree over the warps: in round r the upper half of the warps left hands its
        # weighted O to the lower half through shared memory; pure stores, a barrier, pure
        # loads (a read-modify-write of shared memory in a loop under a warp test would need
        # barriers TVM cannot place inside the test).
        for r in T.unroll(WARP_ROUNDS):
            if warp >= W >> (r + 1) and warp < W >> r:
                for i in T.unroll(DT * 4):
                    merged[(warp - (W >> (r + 1))) * D * MMA_N + merged_at(lane, i)] = o[i] * alpha[i % 2]
            T.tvm_storage_sync("shared")
            if warp < W >> (r + 1):
                for i in T.unroll(DT * 4):
                    o[i] = o[i] * alpha[i % 2] + merged[warp * D * MMA_N + merged_at(lane, i)]
                for e in T.unroll(2):
                    alpha[e] = T.float32(1)  # O is weighted now
            T.tvm_storage_sync("shared")
        if warp == 0:
            for i in T.unroll(DT * 4):
                if lane % 4 * 2 + i % 2 < G:
                    o_part[kv * G + lane % 4 * 2 + i % 2, split, merged_at(lane, i) // MMA_N] = T.Select(
                        row_sum[i % 2] > T.float32(0), o[i] * alpha[i % 2] / row_sum[i % 2], T.float32(0))
            for e in T.unroll(2):
                if lane < 4 and lane * 2 + e < G:
                    lse[kv * G + lane * 2 + e, split] = T.Select(
                        row_sum[e] > T.float32(0), tile_max[e] + T.log(row_sum[e]), T.float32(_NEG_INF))


    if not merged:
        @T.prim_func(private=True)
        def func(q_rot: T.Buffer((NH, D), "float32"), var_k_cache: T.handle, var_v_cache: T.handle,
                 page_table: T.Buffer((MP,), "int32"), pos: T.Buffer((1,), "int32"),
                 o_part: T.Buffer((NH, S, D), "float32"), lse: T.Buffer((NH, S), "float32")):
            T.func_attr({"tirx.noalias": True})
            n_pages = T.int64()
            k_cache = T.match_buffer(var_k_cache, (n_pages, P, NKV, D), "float16")
            v_cache = T.match_buffer(var_v_cache, (n_pages, P, NKV, D), "float16")
            for block in T.thread_binding(NKV * S, thread="blockIdx.x"):
                for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                    attend(q_rot, k_cache, v_cache, page_table, pos, o_part, lse, block, tx)

        return func.with_attr("global_symbol", f"paged_decode_attention_{NH}x{NKV}x{D}_p{P}_s{S}_mma")

    @T.prim_func(private=True)
    def merged_func(q_rot: T.Buffer((NH, D), "float32"), var_k_cache: T.handle, var_v_cache: T.handle,
                    page_table: T.Buffer((MP,), "int32"), pos: T.Buffer((1,), "int32"),
                    arrivals: T.Buffer((NKV,), "int32"), o_part: T.Buffer((NH, S, D), "float32"),
                    lse: T.Buffer((NH, S), "float32"), out: T.Buffer((NH * D,), "float32")):
        T.func_attr({"tirx.noalias": True})
        n_pages = T.int64()
        k_cache = T.match_buffer(var_k_cache, (n_pages, P, NKV, D), "float16")
        v_cache = T.match_buffer(var_v_cache, (n_pages, P, NKV, D), "float16")
        for block in T.thread_binding(NKV * S, thread="blockIdx.x"):
            for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                attend(q_rot, k_cache, v_cache, page_table, pos, o_part, lse, block, tx)
                last = T.alloc_buffer((1,), "int32", scope="shared")  # this block is its KV head's last split
                is_last = T.alloc_buffer((1,), "int32", scope="local")
                combined = T.alloc_buffer((3,), f32, scope="local")  # lse max, weight sum, weighted output
                # As paged_decode_attention_merged: warp 0's o_part and lse stores visible to the
                # GPU before thread 0 counts the block; the last block's count reads the others'.
                T.cuda.thread_fence()
                T.tvm_storage_sync("shared")
                if tx == 0:
                    before: T.int32 = T.cuda.atomic_add(T.address_of(arrivals[block // S]), 1)
                    if before == S - 1:
                        arrivals[block // S] = 0
                    T.cuda.thread_fence()
                    last[0] = T.Cast("int32", before == S - 1)
                T.tvm_storage_sync("shared")
                is_last[0] = last[0]  # a local copy: TVM reads no shared memory in a condition
                if is_last[0] == 1:
                    for i in T.unroll(OUTS):  # element (head, dim) of the group's outputs by thread i * THREADS + tx
                        if i * THREADS + tx < G * D:
                            combined[0] = lowest
                            for s2 in range(S):
                                combined[0] = T.max(combined[0], lse[block // S * G + (i * THREADS + tx) // D, s2])
                            combined[1] = T.float32(0)
                            combined[2] = T.float32(0)
                            for s2 in range(S):  # attention_combine's sums, in its order
                                combined[1] = combined[1] + split_weight(
                                    lse[block // S * G + (i * THREADS + tx) // D, s2], combined[0])
                                combined[2] = combined[2] + split_weight(
                                    lse[block // S * G + (i * THREADS + tx) // D, s2], combined[0]) * o_part[
                                    block // S * G + (i * THREADS + tx) // D, s2, (i * THREADS + tx) % D]
                            out[block // S * G * D + i * THREADS + tx] = combined[2] / combined[1]

    return merged_func.with_attr("global_symbol", f"paged_decode_attention_merged_{NH}x{NKV}x{D}_p{P}_s{S}_mma")



def paged_decode_attention_mma_reference(
    q_rot: npt.NDArray[np.float32],
    k_cache: npt.NDArray[np.float16],
    v_cache: npt.NDArray[np.float16],
    page_table: npt.NDArray[np.int32],
    pos: int,
    splits: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(o_part f32[NH, S, D], lse f32[NH, S]) as `paged_decode_attention_mma` computes them: Q *
    scale rounded to f16, the scores rounded to f32, and each 16-key tile's P rounded to f16
    against its warp's running max (so the walk is the kernel's: warp w of a split takes its
    tiles w, w + MMA_WARPS, ...), then the warps merged; products and sums in float64. The rounding
    convention is `prefill_attention.causal_prefill_attention_half_reference`'s."""
    n_heads, d = q_rot.shape
    length = pos + 1
    k = gather_context(k_cache, page_table, length).astype(np.float64)
    v = gather_context(v_cache, page_table, length).astype(np.float64)
    kv_of = np.arange(n_heads) // (n_heads // k.shape[1])
    k, v = k[:, kv_of], v[:, kv_of]  # [keys, NH, D]
    q = (q_rot * np.float32(1.0 / math.sqrt(d))).astype(np.float16).astype(np.float64)
    scores = np.einsum("hd,thd->ht", q, k).astype(np.float32).astype(np.float64)
    chunk = -(-length // splits)
    tile = 16  # keys a tile: the mma's m16
    o_part = np.zeros((n_heads, splits, d))
    lse = np.full((n_heads, splits), -np.inf)
    for s in range(splits):
        lo, hi = s * chunk, min((s + 1) * chunk, length)
        if lo >= hi:
            continue
        states = []  # per warp: running max, sum, unnormalised output
        for w in range(MMA_WARPS):
            row_max, row_sum, acc = np.full(n_heads, -np.inf), np.zeros(n_heads), np.zeros((n_heads, d))
            for start in range(lo + w * tile, hi, MMA_WARPS * tile):
                keys = np.arange(start, min(start + tile, hi))
                new_max = np.maximum(row_max, scores[:, keys].max(axis=1))
                p = np.exp(scores[:, keys] - new_max[:, None]).astype(np.float16).astype(np.float64)
                alpha = np.exp(row_max - new_max)
                row_sum = row_sum * alpha + p.sum(axis=1)
                acc = acc * alpha[:, None] + np.einsum("ht,thd->hd", p, v[keys])
                row_max = new_max
            states.append((row_max, row_sum, acc))
        split_max = np.max([m for m, _, _ in states], axis=0)  # finite: warp 0 has a tile
        weights = [np.exp(m - split_max) for m, _, _ in states]
        total = sum(wt * l for wt, (_, l, _) in zip(weights, states))
        o_part[:, s] = sum(wt[:, None] * a for wt, (_, _, a) in zip(weights, states)) / total[:, None]
        lse[:, s] = split_max + np.log(total)
    return o_part.astype(np.float32), lse.astype(np.float32)
