"""Attention over a chunk of T tokens: QK-norm + RoPE + KV append for T positions, and causal
attention of the chunk's queries over the paged cache. Unscheduled TIR + numpy references.

The chunk holds the tokens at positions pos[0] + t, t < n_valid[0] (both read on the device,
so one compiled step serves every position and every last, partial chunk); rows t >= n_valid
are padding: nothing of theirs enters the cache, and their attention output is 0.

`qk_norm_rope_kv_append_rows` is `rope.qk_norm_rope_kv_append` (same formulas: per-head RMS
norm, NEOX RoPE with float32 angles, fp16 K/V) for each row t at position pos + t.
`causal_prefill_attention` runs after the append, so the chunk's own K/V are already in the
cache: query t (position p = pos + t) attends to the cached positions 0 .. p, read through the
page table, with an online softmax (running max, sum and output; one pass over K and V): a key
that raises the max rescales the state by exp(old max - score) and weighs 1, any other weighs
exp(score - max), so a key costs one exp. The G query heads of a KV head go together, so each
K and V row is read (and widened from fp16) once for the group.
Query head h reads KV head h // (NH / NKV), scale 1 / sqrt(D), float32 math on the fp16 cache,
as `attention.paged_decode_attention` does for one token.
"""

import math

import numpy as np
import numpy.typing as npt
from tvm import tirx

from sparkinfer.kernels.rope import qk_norm_rope_kv_append_reference
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

    def rotated(q, k, qw, kw, sumsq, pos, t, h, d):  # noqa: ANN001, ANN202
        inv_freq = tirx.pow(tirx.const(theta, f32), (d % half).astype(f32) * tirx.const(-2.0 / D, f32))
        angle = (pos[0] + t).astype(f32) * inv_freq
        partner = normed(q, k, qw, kw, sumsq, t, h, (d + half) % D)
        return normed(q, k, qw, kw, sumsq, t, h, d) * tirx.cos(angle) + tirx.Select(
            d < half, -partner, partner) * tirx.sin(angle)

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
                    q_rot[vt, vh, vd] = rotated(q, k, q_norm_w, k_norm_w, sumsq, pos, vt, vh, vd)
                elif vt < n_valid[0]:
                    k_cache[page(page_table, pos, vt), (pos[0] + vt) % P, vh - NH, vd] = T.Cast(
                        "float16", rotated(q, k, q_norm_w, k_norm_w, sumsq, pos, vt, vh, vd))
                    v_cache[page(page_table, pos, vt), (pos[0] + vt) % P, vh - NH, vd] = T.Cast(
                        "float16", v[vt, T.max(vh - NH, 0) * D + vd])

    return func.with_attr("global_symbol", f"qk_norm_rope_kv_append_rows_{NT}x{NH}x{NKV}x{D}_p{P}")


def causal_prefill_attention(n_tokens: int, n_heads: int, n_kv_heads: int, head_dim: int, page_size: int,
                             max_pages: int) -> tirx.PrimFunc:
    """Params (q_rot f32[T, NH, D], k_cache f16[NP, P, NKV, D], v_cache, page_table int32[MP],
    pos int32[1], n_valid int32[1], out f32[T, NH*D])."""
    from tvm.script import tirx as T

    NT, NH, NKV, D, P, MP = n_tokens, n_heads, n_kv_heads, head_dim, page_size, max_pages
    if NH % NKV:
        raise ValueError(f"{NH} query heads do not divide into {NKV} KV heads")
    G = NH // NKV
    LANES = 16  # q . k in 16 partial sums (one AVX-512 float32 vector), then folded
    if D % LANES:
        raise ValueError(f"causal_prefill_attention needs head_dim a multiple of {LANES}, got {D}")
    scale = T.float32(1.0 / math.sqrt(D))

    def cached(cache: tirx.Buffer, page_table: tirx.Buffer, j: Expr, kv: Expr, d: Expr) -> Expr:
        page = page_table[tirx.min(j // P, MP - 1)]
        page = tirx.max(tirx.min(page, (cache.shape[0] - 1).astype("int32")), 0)
        return cache[page, j % P, kv, d].astype("float32")

    @T.prim_func(private=True, s_tir=True)
    def func(q_rot: T.Buffer((NT, NH, D), "float32"), var_k_cache: T.handle, var_v_cache: T.handle,
             page_table: T.Buffer((MP,), "int32"), pos: T.Buffer((1,), "int32"), n_valid: T.Buffer((1,), "int32"),
             out: T.Buffer((NT, NH * D), "float32")):
        T.func_attr({"tirx.noalias": True})
        n_pages = T.int64()
        k_cache = T.match_buffer(var_k_cache, (n_pages, P, NKV, D), "float16")
        v_cache = T.match_buffer(var_v_cache, (n_pages, P, NKV, D), "float16")
        for t, kv in T.grid(NT, NKV):
            with T.sblock("query"):
                vt, vkv = T.axis.remap("SS", [t, kv])
                acc = T.sblock_alloc_buffer((G, D), "float32", scope="local")
                part = T.sblock_alloc_buffer((G, LANES), "float32", scope="local")
                # per head: running max, running sum, this key's score, its weight exp(score - max)
                st = T.sblock_alloc_buffer((G, 4), "float32", scope="local")
                for g, d in T.grid(G, D):
                    with T.sblock("acc_init"):
                        vg, vd = T.axis.remap("SS", [g, d])
                        acc[vg, vd] = T.float32(0)
                for g in range(G):
                    st[g, 0] = T.min_value("float32")
                    st[g, 1] = T.float32(0)
                for j in range(T.if_then_else(vt < n_valid[0], pos[0] + vt + 1, 0)):
                    for g, lane in T.grid(G, LANES):
                        with T.sblock("dot_init"):
                            vj = T.axis.opaque(MP * P, j)
                            vg, vl = T.axis.remap("SS", [g, lane])
                            part[vg, vl] = T.float32(0)
                    for dd, g, lane in T.grid(D // LANES, G, LANES):
                        with T.sblock("dot"):
                            vj = T.axis.opaque(MP * P, j)
                            vdd, vg, vl = T.axis.remap("RSS", [dd, g, lane])
                            part[vg, vl] = part[vg, vl] + q_rot[vt, vkv * G + vg, vdd * LANES + vl] * cached(
                                k_cache, page_table, vj, vkv, vdd * LANES + vl)
                    # the LANES partial sums folded in halves (a short dependency chain)
                    for g, lane in T.grid(G, 8):
                        with T.sblock("fold8"):
                            vj = T.axis.opaque(MP * P, j)
                            vg, vl = T.axis.remap("SS", [g, lane])
                            part[vg, vl] = part[vg, vl] + part[vg, vl + 8]
                    for g, lane in T.grid(G, 4):
                        with T.sblock("fold4"):
                            vj = T.axis.opaque(MP * P, j)
                            vg, vl = T.axis.remap("SS", [g, lane])
                            part[vg, vl] = part[vg, vl] + part[vg, vl + 4]
                    for g in range(G):
                        st[g, 2] = (part[g, 0] + part[g, 2] + (part[g, 1] + part[g, 3])) * scale
                        if st[g, 2] > st[g, 0]:
                            # a new max: rescale the running state by exp(old - new); the key weighs 1
                            st[g, 3] = T.exp(st[g, 0] - st[g, 2])
                            for d in range(D):
                                with T.sblock("rescale"):
                                    vj = T.axis.opaque(MP * P, j)
                                    vg = T.axis.opaque(G, g)
                                    vd = T.axis.spatial(D, d)
                                    acc[vg, vd] = acc[vg, vd] * st[vg, 3]
                            st[g, 1] = st[g, 1] * st[g, 3]
                            st[g, 0] = st[g, 2]
                            st[g, 3] = T.float32(1)
                        else:
                            st[g, 3] = T.exp(st[g, 2] - st[g, 0])
                        st[g, 1] = st[g, 1] + st[g, 3]
                    for g, d in T.grid(G, D):
                        with T.sblock("pv"):
                            vj = T.axis.opaque(MP * P, j)
                            vg, vd = T.axis.remap("SS", [g, d])
                            acc[vg, vd] = acc[vg, vd] + st[vg, 3] * cached(v_cache, page_table, vj, vkv, vd)
                for g, d in T.grid(G, D):
                    with T.sblock("store"):
                        vg, vd = T.axis.remap("SS", [g, d])
                        out[vt, (vkv * G + vg) * D + vd] = T.if_then_else(
                            vt < n_valid[0], acc[vg, vd] / st[vg, 1], T.float32(0))

    return func.with_attr("global_symbol", f"causal_prefill_attention_{NT}x{NH}x{NKV}x{D}_p{P}")


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
