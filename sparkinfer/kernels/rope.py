"""Per-head QK RMSNorm + NEOX RoPE + KV append, one kernel: unscheduled TIR + numpy reference.

For the token at position p = pos[0] (read on the device, so one compiled step serves every
position):
  q_rot[h]                       = rope(rmsnorm(q[h]) * q_norm_w, p)      h < NH
  k_cache[page, slot, j]         = fp16(rope(rmsnorm(k[j]) * k_norm_w, p)) j < NKV
  v_cache[page, slot, j]         = fp16(v[j])
with page = page_table[p // P], slot = p % P. rope is NEOX (rotate halves) over all D dims:
  out[d] = x[d] * cos(p * f[d % (D/2)]) + (d < D/2 ? -x[d + D/2] : x[d - D/2]) * sin(...)
  f[i]   = theta ** (-2i / D)
with the angles in float32, as llama.cpp computes them (the oracle's float64 angles differ by
about p * 2^-23 rad: ~5e-4 at p = 4096; the tests bound that).

In-place convention: k_cache and v_cache are parameters the function writes into (one slot
each; every other element is left as it was), not outputs it allocates. Relax calls it as
  R.call_tir_inplace(gvar, (q, k, v, q_norm_w, k_norm_w, pos, page_table, k_cache, v_cache),
                     inplace_indices=[7, 8, -1], out_ty=[<k_cache>, <v_cache>, <q_rot>])
whose results alias args 7 and 8 and add one fresh tensor: the PrimFunc's parameters are the
nine inputs followed by q_rot.
The number of pages NP is a symbolic dim (`n_pages`), so the cache's size is the runtime's
choice. The caller guarantees pos < MP * P and physical page ids < NP.

The NH query heads and the NKV key heads go through one loop over NH + NKV heads, so a GPU
schedule makes one launch of NH + NKV thread blocks (head h >= NH is key head h - NH and also
copies value head h - NH). Loads whose buffer a head does not use are clamped into range
rather than branched around, so every index stays provably in bounds for the schedule.
"""

import numpy as np
import numpy.typing as npt
from tvm import tirx

from sparkinfer.reference import qwen3moe as ref

Expr = tirx.Expr
Buffer = tirx.Buffer


def qk_norm_rope_kv_append(
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    page_size: int,
    max_pages: int,
    eps: float,
    theta: float,
) -> tirx.PrimFunc:
    """Params (q f32[NH*D], k f32[NKV*D], v f32[NKV*D], q_norm_w f32[D], k_norm_w f32[D],
    pos int32[1], page_table int32[MP], k_cache f16[NP, P, NKV, D], v_cache (same),
    q_rot f32[NH, D]); k_cache and v_cache are written in place (see the module docstring)."""
    # Imported here: TVMScript needs TVM's compiler half, and the GPU machines' runtime-only
    # TVM must still import this module for its numpy reference.
    from tvm.script import tirx as T

    NH, NKV, D, P, MP = n_heads, n_kv_heads, head_dim, page_size, max_pages
    if D % 2:
        raise ValueError(f"NEOX RoPE needs an even head_dim, got {D}")
    half = D // 2
    heads = NH + NKV
    f32 = "float32"

    # TVMScript turns a local assignment into a one-element buffer, so the per-element
    # expressions are built here, in Python, and the script below only stores them.
    def head_x(q: Buffer, k: Buffer, h: Expr, d: Expr) -> Expr:
        """Element d of head h, of q for h < NH and of k after that."""
        return tirx.Select(
            h < NH, q[tirx.min(h, NH - 1) * D + d], k[tirx.max(h - NH, 0) * D + d]
        )

    def normed(
        q: Buffer, k: Buffer, q_norm_w: Buffer, k_norm_w: Buffer, sumsq: Buffer, h: Expr, d: Expr
    ) -> Expr:
        inv_rms = tirx.const(1.0, f32) / tirx.sqrt(
            sumsq[h] * tirx.const(1.0 / D, f32) + tirx.const(eps, f32)
        )
        return head_x(q, k, h, d) * inv_rms * tirx.Select(h < NH, q_norm_w[d], k_norm_w[d])

    def rotated(
        q: Buffer,
        k: Buffer,
        q_norm_w: Buffer,
        k_norm_w: Buffer,
        sumsq: Buffer,
        pos: Buffer,
        h: Expr,
        d: Expr,
    ) -> Expr:
        # -2i/D is exact in float32 for a power-of-two D (and within an ulp otherwise).
        inv_freq = tirx.pow(
            tirx.const(theta, f32), (d % half).astype(f32) * tirx.const(-2.0 / D, f32)
        )
        angle = pos[0].astype(f32) * inv_freq
        partner = normed(q, k, q_norm_w, k_norm_w, sumsq, h, (d + half) % D)
        return normed(q, k, q_norm_w, k_norm_w, sumsq, h, d) * tirx.cos(angle) + tirx.Select(
            d < half, -partner, partner
        ) * tirx.sin(angle)

    @T.prim_func(private=True, s_tir=True)
    def func(
        q: T.Buffer((NH * D,), "float32"),
        k: T.Buffer((NKV * D,), "float32"),
        v: T.Buffer((NKV * D,), "float32"),
        q_norm_w: T.Buffer((D,), "float32"),
        k_norm_w: T.Buffer((D,), "float32"),
        pos: T.Buffer((1,), "int32"),
        page_table: T.Buffer((MP,), "int32"),
        var_k_cache: T.handle,
        var_v_cache: T.handle,
        q_rot: T.Buffer((NH, D), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        n_pages = T.int64()
        k_cache = T.match_buffer(var_k_cache, (n_pages, P, NKV, D), "float16")
        v_cache = T.match_buffer(var_v_cache, (n_pages, P, NKV, D), "float16")
        sumsq = T.sblock_alloc_buffer((heads,), "float32")
        for head, d in T.grid(heads, D):
            with T.sblock("sumsq"):
                vh, vd = T.axis.remap("SR", [head, d])
                with T.init():
                    sumsq[vh] = T.float32(0)
                sumsq[vh] = sumsq[vh] + head_x(q, k, vh, vd) * head_x(q, k, vh, vd)
        for head, d in T.grid(heads, D):
            with T.sblock("rope"):
                vh, vd = T.axis.remap("SS", [head, d])
                if vh < NH:
                    q_rot[vh, vd] = rotated(q, k, q_norm_w, k_norm_w, sumsq, pos, vh, vd)
                else:
                    k_cache[page_table[pos[0] // P], pos[0] % P, vh - NH, vd] = T.Cast(
                        "float16", rotated(q, k, q_norm_w, k_norm_w, sumsq, pos, vh, vd)
                    )
                    v_cache[page_table[pos[0] // P], pos[0] % P, vh - NH, vd] = T.Cast(
                        "float16", v[T.max(vh - NH, 0) * D + vd]
                    )

    return func.with_attr(
        "global_symbol", f"qk_norm_rope_kv_append_{NH}x{NKV}x{D}_p{P}"
    )


def qk_norm_rope_kv_append_reference(
    q: npt.NDArray[np.float32],
    k: npt.NDArray[np.float32],
    v: npt.NDArray[np.float32],
    q_norm_w: npt.NDArray[np.float32],
    k_norm_w: npt.NDArray[np.float32],
    pos: int,
    page_table: npt.NDArray[np.int32],
    k_cache: npt.NDArray[np.float16],
    v_cache: npt.NDArray[np.float16],
    eps: float,
    theta: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy oracle, built from the model oracle's blocks: (q_rot f32[NH, D], new k_cache,
    new v_cache); the caches passed in are not modified."""
    n_pages, page_size, n_kv, d = k_cache.shape
    cos, sin = ref.rope_cos_sin(np.array([pos]), d, theta)
    qh = ref.rms_norm(q.reshape(1, -1, d), q_norm_w, eps)
    kh = ref.rms_norm(k.reshape(1, n_kv, d), k_norm_w, eps)
    q_rot = ref.rope_neox(qh, cos, sin)[0].astype(np.float32)
    k_rot = ref.rope_neox(kh, cos, sin)[0]
    k_new, v_new = k_cache.copy(), v_cache.copy()
    page, slot = page_table[pos // page_size], pos % page_size
    k_new[page, slot] = k_rot.astype(np.float16)
    v_new[page, slot] = v.reshape(n_kv, d).astype(np.float16)
    return q_rot, k_new, v_new
