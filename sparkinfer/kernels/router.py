"""MoE router top-k: unscheduled compute + numpy reference.

`router_topk(E, KU)` takes the router logits f32[E] (from an F32 `gemv`) and writes the KU
chosen experts `ids` int32[KU] and their weights f32[KU]: softmax over all E experts, the KU
most probable, renormalised to sum 1 (Qwen3-MoE; `reference.qwen3moe.route_topk`).

Selection is a rank computation, parallel across experts and without a sort:
  rank[e]  = #{j : l[j] > l[e]  or  (l[j] == l[e] and j < e)}   a permutation of 0..E-1
  ids[s]   = the e with rank[e] == s                            slots in descending order
Expert e is chosen iff rank[e] < KU. The order is by logit, ties to the lower index: since
softmax is monotone this is the oracle's order (descending probability, ties to the lower
id) except where two different logits round to the same float32 probability, where ranking
the exact logits is the deterministic choice.

The weights skip the full softmax: p[e] / sum_top p = exp(l[e] - m) / sum_top exp(l - m) for
any m, since the softmax denominator cancels; m = max(l) keeps every exp <= 1.
"""

import numpy as np
import numpy.typing as npt
from tvm import te, tirx


def router_topk_symbol(n_experts: int, n_used: int) -> str:
    """The kernel name of `router_topk(n_experts, n_used)`; needs no compiler (runtime-only
    TVM)."""
    return f"router_topk_{n_experts}_top{n_used}"


def router_topk(n_experts: int, n_used: int) -> tirx.PrimFunc:
    """Params (logits f32[E], ids int32[KU], weights f32[KU]); ids in descending order."""
    if not 0 < n_used <= n_experts:
        raise ValueError(f"need 0 < experts used <= experts, got {n_used} of {n_experts}")
    logits = te.placeholder((n_experts,), "float32", name="logits")
    ids, weights = topk(logits, (), n_experts, n_used)
    return te.create_prim_func([logits, ids, weights]).with_attr(
        "global_symbol", router_topk_symbol(n_experts, n_used)
    )


def router_topk_rows(n_tokens: int, n_experts: int, n_used: int) -> tirx.PrimFunc:
    """`router_topk` for each of a chunk's T tokens: params (logits f32[T, E],
    ids int32[T, KU], weights f32[T, KU])."""
    if not 0 < n_used <= n_experts:
        raise ValueError(f"need 0 < experts used <= experts, got {n_used} of {n_experts}")
    logits = te.placeholder((n_tokens, n_experts), "float32", name="logits")
    ids, weights = topk(logits, (n_tokens,), n_experts, n_used)
    return te.create_prim_func([logits, ids, weights]).with_attr(
        "global_symbol", f"router_topk_rows_{n_tokens}x{n_experts}_top{n_used}"
    )


def topk(logits: te.Tensor, lead: tuple[int, ...], n_experts: int, n_used: int) -> tuple[te.Tensor, te.Tensor]:
    """The rank selection and weights of the module docstring, per leading index (`lead`:
    () for one token, (T,) for a chunk)."""
    j = te.reduce_axis((0, n_experts), name="j")

    def beats(t: tuple[tirx.Expr, ...], j: tirx.Expr, e: tirx.Expr) -> tirx.Expr:
        return tirx.any(logits[t + (j,)] > logits[t + (e,)],
                        tirx.all(logits[t + (j,)] == logits[t + (e,)], j < e))

    rank = te.compute(
        lead + (n_experts,), lambda *ax: te.sum(tirx.Select(beats(ax[:-1], j, ax[-1]), 1, 0), axis=j),
        name="rank",
    )
    # Ranks are a permutation, so exactly one expert matches each slot; max (not sum) keeps
    # the id inside [0, E) even for NaN logits, which break the permutation.
    e = te.reduce_axis((0, n_experts), name="e")
    ids = te.compute(
        lead + (n_used,), lambda *ax: te.max(tirx.Select(rank[ax[:-1] + (e,)] == ax[-1], e, 0), axis=e),
        name="ids",
    )
    m = te.reduce_axis((0, n_experts), name="m")
    lmax = te.compute(lead + (1,), lambda *ax: te.max(logits[ax[:-1] + (m,)], axis=m), name="lmax")
    # Reads ids[s] only, never another slot's id: on the GPU each slot's thread reads back
    # its own write to the output, which needs no barrier.
    ex = te.compute(lead + (n_used,),
                    lambda *ax: te.exp(logits[ax[:-1] + (ids[ax],)] - lmax[ax[:-1] + (0,)]), name="ex")
    t = te.reduce_axis((0, n_used), name="t")
    total = te.compute(lead + (1,), lambda *ax: te.sum(ex[ax[:-1] + (t,)], axis=t), name="total")
    weights = te.compute(lead + (n_used,), lambda *ax: ex[ax] / total[ax[:-1] + (0,)], name="weights")
    return ids, weights


def router_topk_reference(
    logits: npt.NDArray[np.float32], n_used: int
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """numpy oracle of router_topk, the same rule: by logit, ties to the lower index."""
    logits = np.asarray(logits, np.float32)
    ids = np.argsort(-logits, kind="stable")[:n_used].astype(np.int32)
    ex = np.exp(logits[ids] - logits.max())
    return ids, (ex / ex.sum(dtype=np.float32)).astype(np.float32)
