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

`router_gemv_topk` (CUDA only, the step variant router_merge="last_block") is the router's
`gemv` and `router_topk` in one launch: the last of the GEMV's thread blocks to finish ranks.
"""

import numpy as np
import numpy.typing as npt
from tvm import s_tir, te, tirx

from sparkinfer.kernels.gemv import gemv_format, gemv_tensors


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


def router_gemv_topk_symbol(ggml_type: int, n_experts: int, hidden: int, n_used: int) -> str:
    return f"router_gemv_topk_{gemv_format(ggml_type).name.lower()}_{n_experts}x{hidden}_top{n_used}"


def router_gemv_topk(ggml_type: int, n_experts: int, hidden: int, n_used: int) -> tirx.PrimFunc:
    """The router's `gemv` and `router_topk` in one kernel, for CUDA (the step variant
    router_merge="last_block"). Params (W words [E, row words], x f32[H], arrivals int32[1]
    (in place: 0 before and after), logits f32[E] (the GEMV's stage, named gemv in the kernel),
    ids int32[KU], weights f32[KU]).

    Row n of the GEMV is thread block n (schedule/router.py's layout), which computes
    logits[n] as `gemv` does, publishes it (a memory fence in every thread, a barrier) and
    counts itself in arrivals[0] with an atomic add; the block whose add returns E - 1, the
    last to finish, puts the count back to 0 for the next launch and runs `router_topk`'s
    stages on the E logits, so ids and weights are router_topk's bit for bit.

    Both computations are the te stages of `gemv` and `router_topk` (`gemv_tensors`, `topk`),
    made into one PrimFunc, not copies; the count (`_count_arrivals`, TVMScript: te has no
    atomics or fences) goes between them and the top-k's stages into its loop of 0 or 1
    iterations (`_with_innermost_body`). CUDA intrinsics (atomicAdd, __threadfence,
    __syncthreads): no LLVM build."""
    if not 0 < n_used <= n_experts:
        raise ValueError(f"need 0 < experts used <= experts, got {n_used} of {n_experts}")
    w, (x,), logits = gemv_tensors(gemv_format(ggml_type), n_experts, hidden)
    ids, weights = topk(logits, (), n_experts, n_used)
    arrivals = te.placeholder((1,), "int32", name="arrivals")
    stages = te.create_prim_func([w, x, arrivals, logits, ids, weights])
    _, _, arrivals_buf, logits_buf, ids_buf, weights_buf = stages.params
    count = _count_arrivals(n_experts, n_used, arrivals_buf, logits_buf, ids_buf, weights_buf).body.block
    stage_root = stages.body.block
    first_topk = next(i for i, loop in enumerate(stage_root.body) if _block_name(loop) == "rank")
    *counting, pick = count.body
    body = tirx.SeqStmt([*stage_root.body[:first_topk], *counting,
                         _with_innermost_body(pick, tirx.SeqStmt(list(stage_root.body[first_topk:])))])
    root = s_tir.SBlock([], [], [], "root", body, alloc_buffers=[*stage_root.alloc_buffers, *count.alloc_buffers])
    func = stages.with_body(s_tir.SBlockRealize([], True, root))
    return func.with_attr("global_symbol", router_gemv_topk_symbol(ggml_type, n_experts, hidden, n_used))


def _block_name(stmt: tirx.Stmt) -> str:
    """The name of the block inside the loop nest `stmt`."""
    while isinstance(stmt, tirx.For):
        stmt = stmt.body
    return stmt.block.name_hint


def _count_arrivals(E: int, KU: int, arrivals: tirx.Var, logits: tirx.Var, ids: tirx.Var,
                    weights: tirx.Var) -> tirx.PrimFunc:
    """Per GEMV row n (a thread block), after logits[n]: the release, the atomic add, is_last[n]
    (1 in the last block to arrive), and the block "pick", whose loop of is_last[n] iterations
    `_with_innermost_body` fills. A function only to hold these statements: they name
    `router_gemv_topk`'s buffers (the te PrimFunc's parameters, closure variables here)."""
    from tvm.script import tirx as T

    @T.prim_func(private=True, s_tir=True, check_well_formed=False)
    def func():
        # the counting thread's answer, and every thread's copy of it (the top-k loop's extent)
        last = T.sblock_alloc_buffer((E,), "int32")
        is_last = T.sblock_alloc_buffer((E,), "int32")
        for n in range(E):
            with T.sblock("release"):
                # Every thread's logits store visible to the whole GPU before the block counts
                # itself. Declared: its row's logit, a region the schedule can place after it.
                vn = T.axis.spatial(E, n)
                T.reads(logits[vn])
                T.writes()
                T.cuda.thread_fence()
                T.cuda.cta_sync()
        for n in range(E):
            with T.sblock("arrive"):
                vn = T.axis.spatial(E, n)
                # arrivals[0] is read by the atomic add, through its address: declared as
                # written only (kernels/attention.py's arrive: a block that reads and writes a
                # buffer cannot be moved)
                T.reads(logits[vn])
                T.writes(arrivals[0], last[vn])
                before: T.int32 = T.cuda.atomic_add(T.address_of(arrivals[0]), 1)
                if before == E - 1:
                    arrivals[0] = 0
                # The other blocks' logits, published before their adds, are visible after
                # this fence (the top-k reads them after the barrier that follows `last`).
                T.cuda.thread_fence()
                last[vn] = T.Cast("int32", before == E - 1)
        for n in range(E):
            with T.sblock("is_last"):
                vn = T.axis.spatial(E, n)
                is_last[vn] = last[vn]
        for n in range(E):
            with T.sblock("pick"):
                vn = T.axis.spatial(E, n)
                # It reads every logit, written by other thread blocks and ordered by the
                # count, not by dataflow: none is declared (is_last[n] places it after the row's
                # count); a declared logits[n] would be the region of its shared copy of the logits.
                T.reads(is_last[vn])
                T.writes(ids[0:KU], weights[0:KU])
                # Once in the last block, never in the others: a loop, not an `if`, so that
                # the schedule can still place router_topk's stages, which become this loop's
                # body (`_with_innermost_body`).
                for _ in range(is_last[vn]):
                    T.evaluate(0)

    return func


def _with_innermost_body(pick: tirx.For, ranking: tirx.Stmt) -> tirx.For:
    """The loop nest `pick` (row loop, block "pick", its loop of is_last[n] iterations) with
    `ranking` as the innermost loop's body."""
    realize = pick.body
    block = realize.block
    once = block.body
    once = tirx.For(once.loop_var, once.min, once.extent, once.kind, ranking)
    block = s_tir.SBlock(block.iter_vars, block.reads, block.writes, block.name_hint, once)
    realize = s_tir.SBlockRealize(realize.iter_values, realize.predicate, block)
    return tirx.For(pick.loop_var, pick.min, pick.extent, pick.kind, realize)
