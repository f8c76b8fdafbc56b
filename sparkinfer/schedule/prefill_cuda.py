"""CUDA schedules of the T-token step's kernels: a first, plain version that compiles for
sm_90 / sm_120 / sm_121 and is correct, not yet a fast one (bench/NOTES.md, "Batched prefill",
says what a fast one needs: dequantized tiles on tensor cores or int8 MMA).

  - the block-structured kernels (gemm, the row forms of embedding / norms / router, RoPE +
    KV append, silu_mul, the combine, take_row) take dlight's GPU rules, replayed as a trace
    onto the rule's schedule: dlight's Matmul rule for the GEMM (a shared-memory tiled matmul
    with the dequantization as its prologue), its reduction / fallback rules for the others;
  - grouped_gemm: a block per (expert, 16-output tile); its 16 x ROW_BLOCK threads decode the
    tile's scales into shared memory, then each thread owns one (row, output) accumulator and
    decodes the weights it multiplies (again for each ROW_BLOCK rows: the plain version);
  - causal_prefill_attention: a block per (KV head, query tile), the tile's Q, K, V, S and
    softmax state in shared memory, S's sums and the output in registers (the rule's docstring);
  - moe_sort, advance_chunk, advance_pos: one thread (serial bookkeeping).
"""

from __future__ import annotations

from typing import ClassVar

import tvm
from tvm import s_tir
from tvm.s_tir.schedule import LoopRV

from sparkinfer.errors import SparkInferError
from sparkinfer.kernels.use import KernelUse
from sparkinfer.schedule.arch import ArchFacts, cuda_target_attrs
from sparkinfer.schedule.space import FixedRule, Knobs, ScheduleRule


class _CudaRule(FixedRule):
    target_kind = "cuda"


class DlightCudaRule(_CudaRule):
    """dlight's first GPU rule that takes the kernel, its trace replayed onto `sch`; one
    instance per factory it serves."""

    def __init__(self, family: str, factory: str) -> None:
        self.family, self.factory = family, factory

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        from tvm.s_tir import dlight as dl

        target = tvm.target.Target(cuda_target_attrs(facts))
        func = sch.mod["main"]
        for rule in (dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
                     dl.gpu.Fallback()):
            with target:
                found = rule.apply(func, target, False)
            if found is None:
                continue
            found = found[0] if isinstance(found, list) else found
            found.trace.apply_to_schedule(sch, remove_postproc=False)
            return
        raise SparkInferError(f"kernel {use.name}: no dlight GPU rule takes it")


DLIGHT_RULES: tuple[DlightCudaRule, ...] = tuple(
    DlightCudaRule(family, factory) for family, factory in (
        ("gemm", "gemm"),
        ("embedding", "embedding_rows"),
        ("norm", "rms_norm_rows"),
        ("norm", "add_rms_norm_rows"),
        ("router", "router_topk_rows"),
        ("prefill_attention", "qk_norm_rope_kv_append_rows"),
        ("moe_chunk", "silu_mul"),
        ("moe_chunk", "moe_combine_residual"),
        ("chunk", "take_row"),
    )
)


class _OneThreadRule(_CudaRule):
    """A serial kernel whose work is one block `block` under one unit loop: one thread."""

    block: ClassVar[str]
    enable_check = False  # the block holds plain loops, not block iters

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        sch.bind(sch.get_loops(sch.get_sblock(self.block))[0], "blockIdx.x")


class MoeSortCudaRule(_OneThreadRule):
    family, factory, block = "moe_chunk", "moe_sort", "sort"


class AdvanceChunkCudaRule(_OneThreadRule):
    family, factory, block = "chunk", "advance_chunk", "advance"


class AdvancePosCudaRule(_OneThreadRule):
    family, factory, block = "chunk", "advance_pos", "advance"


class GroupedGemmCudaRule(_CudaRule):
    family, factory = "moe_chunk", "grouped_gemm"
    enable_check = False  # the rows loop's trip count is read from `offsets`

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        tile = sch.get_sblock("tile")
        e, t = sch.get_loops(tile)
        sch.bind(sch.fuse(e, t), "blockIdx.x")
        scale = sch.get_sblock("scale")
        sch.set_scope(scale, 0, "shared")  # the tile's scales,
        sch.set_scope(scale, 1, "shared")  # its mins
        # The threadIdx.y rows decode the same scales (identical writes): cheap, 1/16 of a tile.
        sch.bind(sch.get_loops(scale)[-3], "threadIdx.x")
        # A [K, 16] float32 tile does not fit in shared memory at K = 2048 (128 KiB): each
        # thread decodes its weights where it multiplies them instead, once per ROW_BLOCK rows.
        sch.compute_inline(sch.get_sblock("dequant"))
        for name in ("init", "fma", "store"):
            ri, i = sch.get_loops(sch.get_sblock(name))[-2:]
            sch.bind(ri, "threadIdx.y")
            sch.bind(i, "threadIdx.x")  # TILE_N outputs


class CausalPrefillAttentionCudaRule(_CudaRule):
    """A thread block per (KV head, query tile) (the kernel's tile, R = QUERY_TILE * G rows),
    THREADS threads; the tile's flash-attention steps each spread over the block:
      - Q^T (scaled), the K and V tiles (widened from fp16), S and the softmax state live in
        shared memory: Q once per block, K and V once per key tile (thread = head dim, so a
        warp reads 64 contiguous bytes of a row);
      - S = Q K^T: a thread per row and BK * R / THREADS consecutive keys (4 at full size),
        the dot products summed in registers, then stored to S once;
      - per-row bookkeeping (max, rescale factor, sum): a thread per row; P = exp(S - max): a
        thread per (key, row) entry, into the K tile's first R columns (the kernel's layout);
      - the output accumulator is registers: thread d owns column d of all R rows, so the
        rescale and O += P V need no exchange (each key's V[j, d] serves R rows, the P row is
        read as warp-wide 16-byte broadcasts).
    TVM places the barriers between the steps' shared-memory writes and reads (6 a key tile).
    The key loop's trip count depends on the tile (blockIdx) only, so every thread of a block
    reaches every barrier. At T = 128: NKV * T / QUERY_TILE = 128 blocks of 128 threads (the
    previous rule: a thread per tile, 128 threads in all, [R, D] in local memory). Per key
    tile a thread issues ~1024 FMAs and ~400 shared loads (nvcc makes the broadcasts 16-byte
    loads): shared-load bound near 60 % of the FP32 peak at best. Not done: key tiles larger
    than the CPU's 16 (fewer barriers a key), splitting a tile's keys over blocks (T = 128
    gives one block an SM), tensor cores."""

    family, factory = "prefill_attention", "causal_prefill_attention"
    enable_check = False  # the key loop's trip count is read from pos and n_valid
    THREADS: ClassVar[int] = 128  # = D at full size: one accumulator column a thread

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        blk = sch.get_sblock
        kv, it = sch.get_loops(blk("tile"))
        sch.bind(sch.fuse(kv, it), "blockIdx.x")
        for block, buffer in (("q_load", "q_tile"), ("k_load", "k_tile"), ("v_load", "v_tile"), ("qk", "s"),
                              ("state_init", "row_max"), ("state_init", "row_sum"), ("max_init", "new_max"),
                              ("rescale_state", "alpha")):
            b = blk(block)
            sch.set_scope(b, next(i for i, w in enumerate(sch.get(b).writes) if w.source.name == buffer), "shared")

        def spread(loops: list[LoopRV]) -> LoopRV:
            """The loops' iterations over the block's threads (consecutive ones on consecutive
            threads, a predicate where they do not divide); returns the per-thread loop."""
            outer, tx = sch.split(sch.fuse(*loops) if len(loops) > 1 else loops[0], [None, self.THREADS])
            sch.bind(tx, "threadIdx.x")
            return outer

        for name in ("q_load", "k_load", "v_load", "weight"):
            spread(sch.get_loops(blk(name))[-2:])
        for name in ("state_init", "max_init", "rescale_state"):
            spread(sch.get_loops(blk(name))[-1:])
        for name in ("max", "sum"):  # loops (key, row): a thread per row, its keys serial
            spread(sch.get_loops(blk(name))[-1:])  # (the key loop stays outside: "max" has an opaque iter)
        # S: thread t takes one row and BK * R / THREADS consecutive keys (the same keys across
        # a warp), their sums in registers; per 4 head dims: 4 Q loads (a warp's rows:
        # consecutive) and one 16-byte K load (a broadcast) per key
        qk = blk("qk")
        d, jj, r = sch.get_loops(qk)[-3:]
        rows = int(sch.get(r).extent)
        if rows > self.THREADS:  # a thread's entries must be one row's consecutive keys
            raise SparkInferError(f"kernel {use.name}: {rows} rows a query tile, more than {self.THREADS} threads")
        jj, keys = sch.split(jj, [max(1, self.THREADS // rows), None])  # (a warp's keys, its key)
        sch.reorder(jj, r, keys, d)
        spread([jj, r])
        tx = sch.get_loops(qk)[-3]
        d_outer, d_inner = sch.split(d, [None, 4])
        sch.reorder(tx, d_outer, d_inner, keys)
        s_local = sch.cache_write(qk, 0, "local")
        sch.reverse_compute_at(s_local, tx)
        sch.decompose_reduction(qk, d_outer)
        for loop in (d_inner, keys, *sch.get_loops(blk("qk_init"))[-1:], *sch.get_loops(s_local)[-1:]):
            sch.unroll(loop)
        # The accumulator's blocks: thread = head dim, the rows unrolled (registers)
        for name in ("acc_init", "rescale", "store"):
            r, d = sch.get_loops(blk(name))[-2:]
            sch.reorder(d, r)
            spread([d])
            sch.unroll(r)
        r, jj, d = sch.get_loops(blk("pv"))[-3:]
        sch.reorder(d, jj, r)
        spread([d])
        sch.unroll(jj)
        sch.unroll(r)


CUDA_RULES: tuple[ScheduleRule, ...] = (
    *DLIGHT_RULES,
    MoeSortCudaRule(),
    AdvanceChunkCudaRule(),
    AdvancePosCudaRule(),
    GroupedGemmCudaRule(),
    CausalPrefillAttentionCudaRule(),
)
