"""Bulk L2 prefetches written into CUDA kernels: `cp.async.bulk.prefetch.L2.global` (sm_90 and
later) asks the TMA unit to bring a range of global memory into the L2 in the background; nothing
waits for it, and nothing is wrong if it comes late or is evicted (a hint, not a copy).

Two users:
  - `dependent_launch.mark_kernel`, after TVM's lowering: a kernel's own weights, before its
    `griddepcontrol.wait`;
  - `prefetch_experts` here, on a scheduled kernel before lowering: a kernel whose factory set
    `kernels.moe_q8.PREFETCH_EXPERTS_ATTR` (the routed int8 gate/up of expert_prefetch "down")
    asks the L2 for the chosen experts' rows of a stack of weights that the kernel after it reads
    (the down projection's), as soon as it has stored their ids: the down kernel, which cannot
    start before gate/up ends, then finds its 7-10 MB in the L2 instead of memory (on an H100 it
    did, and was still not faster by what the gate/up lost: bench/NOTES.md, "Session 23"). Before
    lowering, because a kernel's parameters are what its body uses when
    TVM splits it from the host code: a weight only a later pass used would not be passed. An
    s_tir.Schedule has no primitive that adds a statement without a computation, so this is a
    function of the scheduled kernel rather than a step of its rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import tvm
from tvm import s_tir, tirx

from sparkinfer.kernels.moe_q8 import PREFETCH_ALIGN, PREFETCH_EXPERTS_ATTR

# A thread binding: "blockIdx.x" etc. -> (its var, its extent).
Axes = dict[str, tuple[tirx.Var, int]]


def element_bytes(buf: tirx.Buffer | tirx.Var) -> int:
    return tvm.runtime.DataType(str(buf.dtype)).bits // 8


def buffer_bytes(buf: tirx.Buffer | tirx.Var) -> int:
    """The bytes of a buffer of static shape (a kernel's buffer parameter, or its declaration)."""
    return math.prod(int(d) for d in buf.shape) * element_bytes(buf)


def block_index(axes: Axes) -> tuple[tirx.Expr, int]:
    """The block's linear index (blockIdx.x fastest) among the bound block axes, int64, and the
    grid's block count."""
    blocks = [axes[tag] for tag in ("blockIdx.x", "blockIdx.y", "blockIdx.z") if tag in axes]
    index: tirx.Expr = tirx.const(0, "int64")
    for var, extent in reversed(blocks):
        index = index * extent + var.astype("int64")
    return index, math.prod(extent for _, extent in blocks)


def bulk_prefetch(buf: tirx.Buffer, byte_offset: tirx.Expr, size: tirx.Expr) -> tirx.Stmt:
    """One bulk L2 prefetch of `size` bytes of the dense buffer `buf` (of any rank) from
    `byte_offset` (both multiples of PREFETCH_ALIGN, which is a multiple of every element size)."""
    from tvm.script import tirx as T  # the compiler's: runtime-only TVM has no TVMScript

    prefetch = T.ptx.cp
    for part in ("async", "bulk", "prefetch", "L2", "global"):  # (keywords of Python among them)
        prefetch = getattr(prefetch, part)
    flat, indices = byte_offset // element_bytes(buf), []
    for extent in reversed([int(d) for d in buf.shape[1:]]):  # the element's index, last axis first
        indices.insert(0, flat % extent)
        flat = flat // extent
    start = T.address_of(tirx.BufferLoad(buf, [flat, *indices]))
    return tirx.Evaluate(prefetch(start, size.astype("uint32")))


def by_thread_zero(stmts: list[tirx.Stmt], axes: Axes) -> list[tirx.Stmt]:
    """`stmts` run by the block's thread 0 (of the thread indices bound so far) only."""
    threads = [var for tag, (var, _) in axes.items() if tag.startswith("threadIdx")]
    if not stmts or not threads:
        return stmts
    first = tirx.all(*[var == 0 for var in threads]) if len(threads) > 1 else threads[0] == 0
    return [tirx.IfThenElse(first, _seq(stmts), None)]


def prefetch_experts(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """The scheduled kernel `func` (of a factory that set PREFETCH_EXPERTS_ATTR) with, right
    after the loop nest of its stage "after" and over the same threads, a prefetch by each thread
    block's thread 0 of its share of the experts "ids" of the stack "weights".

    The grid's blocks are dealt out to the KU slots of ids, blocks // KU to a slot (a remainder
    prefetches nothing), and the blocks of a slot split its expert into equal 16-byte-aligned
    shares. The kernel's own reads of ids come right after that stage too, past the barrier
    that orders them after the stores (tests/schedule/test_gemv_q8_cuda.py checks that the
    prefetch is past one as well)."""
    spec = func.attrs[PREFETCH_EXPERTS_ATTR]
    params = {p.name: p for p in func.params}
    stack, ids, after = params[str(spec["weights"])], params[str(spec["ids"])], str(spec["after"])
    expert_bytes = int(spec["expert_bytes"])
    root = func.body
    body = _after_stage(root.block.body, after, lambda axes: _expert_shares(stack, ids, expert_bytes, axes), {})
    if body is None:
        raise ValueError(f"{func.attrs['global_symbol']}: no stage {after!r} under its thread blocks' loops")
    block = root.block
    block = s_tir.SBlock(block.iter_vars, block.reads, block.writes, block.name_hint, body, block.init,
                         block.alloc_buffers, block.match_buffers, block.annotations)
    return func.with_body(s_tir.SBlockRealize(root.iter_values, root.predicate, block))


def _after_stage(stmt: tirx.Stmt, stage: str, insert: Callable[[Axes], list[tirx.Stmt]],
                 axes: Axes) -> tirx.Stmt | None:
    """`stmt` with insert(block axes) bound to the thread loops of the element of the sequence
    under its block loops that holds the block `stage`, put right after that element."""
    if isinstance(stmt, tirx.For) and _thread_tag(stmt).startswith("blockIdx"):
        inner = _after_stage(stmt.body, stage, insert, {**axes, _thread_tag(stmt): (stmt.loop_var, int(stmt.extent))})
        return None if inner is None else _with_body(stmt, inner)
    if not isinstance(stmt, tirx.SeqStmt):
        return None
    seq = list(stmt.seq)
    at = next((i for i, s in enumerate(seq) if _holds_block(s, stage)), None)
    if at is None:
        return None
    threads = _thread_loops(seq[at])
    bound = {**axes, **{tag: (tirx.Var(tag.replace(".", "_"), "int32"), extent) for tag, extent in threads}}
    prefetch = s_tir.SBlockRealize([], True, s_tir.SBlock([], [], [], "prefetch_experts",
                                                          _seq(insert(bound))))
    for tag, extent in reversed(threads):
        var = bound[tag][0]
        prefetch = tirx.For(var, 0, extent, tirx.ForKind.THREAD_BINDING, prefetch,
                            tirx.IterVar(tvm.ir.Range(0, extent), var, tirx.IterVar.ThreadIndex, tag))
    return tirx.SeqStmt([*seq[:at + 1], prefetch, *seq[at + 1:]])


def _thread_tag(loop: tirx.For) -> str:
    return str(loop.thread_binding.thread_tag) if loop.thread_binding is not None else ""


def _with_body(loop: tirx.For, body: tirx.Stmt) -> tirx.For:
    return tirx.For(loop.loop_var, loop.min, loop.extent, loop.kind, body, loop.thread_binding, loop.annotations)


def _seq(stmts: list[tirx.Stmt]) -> tirx.Stmt:
    return stmts[0] if len(stmts) == 1 else tirx.SeqStmt(stmts)


def _holds_block(stmt: tirx.Stmt, name: str) -> bool:
    if isinstance(stmt, s_tir.SBlockRealize):
        return stmt.block.name_hint == name or _holds_block(stmt.block.body, name)
    if isinstance(stmt, tirx.SeqStmt):
        return any(_holds_block(s, name) for s in stmt.seq)
    return isinstance(stmt, (tirx.For, tirx.IfThenElse)) and _holds_block(
        stmt.body if isinstance(stmt, tirx.For) else stmt.then_case, name)


def _thread_loops(stmt: tirx.Stmt) -> list[tuple[str, int]]:
    """The thread-index loops (tag, extent) of a loop nest, outermost first."""
    loops = []
    while isinstance(stmt, tirx.For):
        if _thread_tag(stmt).startswith("threadIdx"):
            loops.append((_thread_tag(stmt), int(stmt.extent)))
        stmt = stmt.body
    return loops


def _expert_shares(stack: tirx.Buffer, ids: tirx.Buffer, expert_bytes: int, axes: Axes) -> list[tirx.Stmt]:
    block, n_blocks = block_index(axes)
    n_used = math.prod(int(d) for d in ids.shape)
    per_slot = n_blocks // n_used
    if per_slot == 0:
        raise ValueError(f"{n_blocks} thread blocks cannot share the prefetch of {n_used} experts")
    share = -(-expert_bytes // per_slot // PREFETCH_ALIGN) * PREFETCH_ALIGN
    n_experts = int(stack.shape[0])
    slot, offset = block // per_slot, block % per_slot * share
    # clamped as the kernel's own reads of the stack are (kernels.moe_q8._expert_row)
    expert = tirx.max(tirx.min(tirx.BufferLoad(ids, [slot.astype("int32")]), n_experts - 1), 0).astype("int64")
    size = tirx.min(tirx.const(share, "int64"), tirx.const(expert_bytes, "int64") - offset)
    prefetch = bulk_prefetch(stack, expert * expert_bytes + offset, size)
    return by_thread_zero([tirx.IfThenElse(tirx.all(slot < n_used, offset < expert_bytes), prefetch, None)], axes)
