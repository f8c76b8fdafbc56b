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
    """A thread block per (KV head, query tile) (the kernel's tile: R = QUERY_TILE * G rows),
    a thread per entry of the [BK, R] score tile (512 at full size); the tile's
    flash-attention steps each spread over the block:
      - Q^T (scaled), the K and V tiles (widened from fp16), S (then P, in place) and the
        softmax state live in shared memory: Q once per block, K and V once per key tile
        (consecutive threads on consecutive head dims: coalesced);
      - S = Q K^T: thread t sums entry t over D. Its shared-memory slot is indexed by t alone,
        so TVM's barrier planner puts no barrier in the sum and nvcc keeps the partial sum in
        a register (the kernel writes P over S, so a cache_write cannot take S: two writers);
      - per-row bookkeeping (max, rescale factor, sum): a thread per row; P = exp(S - max):
        thread t, entry t;
      - the output accumulator is registers: thread (row group, d) owns column d of R * D /
        threads consecutive rows (8 at full size; 50 registers on sm_90a, no spills), so the
        rescale and O += P V need no exchange (each V[j, d] serves 8 rows, P rows are read
        as 16-byte broadcasts).
    TVM places the barriers between the steps (5 a key tile). The key loop's trip count
    depends on the tile (blockIdx) only, so every thread of a block reaches every barrier. At
    T = 128: NKV * T / QUERY_TILE = 128 blocks of 16 warps (the previous rule: a thread per
    tile, 128 threads in all, [R, D] in local memory). Per key tile a warp issues 256 FMAs
    and ~210 shared loads: shared-load bound, ~20 TFLOP/s at best on an H200. Not done: key
    tiles larger than the CPU's 16 (fewer barriers a key), register tiles of several S
    entries a thread (needs S apart from P in the kernel: the CPU measured slower so),
    splitting a tile's keys over blocks (T = 128 gives one block an SM), tensor cores."""

    family, factory = "prefill_attention", "causal_prefill_attention"
    enable_check = False  # the key loop's trip count is read from pos and n_valid

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        blk = sch.get_sblock
        kv, it = sch.get_loops(blk("tile"))
        sch.bind(sch.fuse(kv, it), "blockIdx.x")
        for block, buffer in (("q_load", "q_tile"), ("k_load", "k_tile"), ("v_load", "v_tile"), ("qk", "s"),
                              ("state_init", "row_max"), ("state_init", "row_sum"), ("max_init", "new_max"),
                              ("rescale_state", "alpha")):
            b = blk(block)
            sch.set_scope(b, next(i for i, w in enumerate(sch.get(b).writes) if w.source.name == buffer), "shared")
        d, jj, r = sch.get_loops(blk("qk"))[-3:]
        keys, rows, head_dim = (int(sch.get(loop).extent) for loop in (jj, r, d))
        threads = keys * rows
        if threads > facts.max_threads_per_block:
            raise SparkInferError(f"kernel {use.name}: a {keys} x {rows} score tile is more than a block's threads")

        def spread(loops: list[LoopRV]) -> LoopRV:
            """The loops' iterations over the block's threads (consecutive ones on consecutive
            threads, a predicate where they do not divide); returns the per-thread loop."""
            outer, tx = sch.split(sch.fuse(*loops) if len(loops) > 1 else loops[0], [None, threads])
            sch.bind(tx, "threadIdx.x")
            return outer

        for name in ("q_load", "k_load", "v_load", "weight"):
            spread(sch.get_loops(blk(name))[-2:])
        for name in ("state_init", "max_init", "rescale_state"):
            spread(sch.get_loops(blk(name))[-1:])
        for name in ("max", "sum"):  # loops (key, row): a thread per row, its keys serial
            spread(sch.get_loops(blk(name))[-1:])  # (the key loop stays outside: "max" has an opaque iter)
        # S: entry t's sum on thread t, the head dims serial (by 4: K's four are one 16-byte load)
        qk = blk("qk")
        sch.reorder(jj, r, d)
        spread([jj, r])
        sch.decompose_reduction(qk, d)
        sch.unroll(sch.split(d, [None, 4])[1])
        # The accumulator's blocks: thread = (row group, head dim), the group's rows unrolled
        # (registers)
        groups = max(1, threads // head_dim)

        def rows_by_thread(block: str) -> LoopRV:
            """Splits the block's row loop into (thread's group, row in the group) and binds
            (group, head dim); returns the row-in-group loop."""
            loops = sch.get_loops(blk(block))
            r, d = loops[-3] if block == "pv" else loops[-2], loops[-1]
            group, row = sch.split(r, [groups, None])
            if block == "pv":
                sch.reorder(group, d, loops[-2], row)
            else:
                sch.reorder(group, d, row)
            spread([group, d])
            sch.unroll(row)
            return row

        for name in ("acc_init", "rescale", "store", "pv"):
            rows_by_thread(name)
        sch.unroll(sch.get_loops(blk("pv"))[-2])  # the tile's keys


CUDA_RULES: tuple[ScheduleRule, ...] = (
    *DLIGHT_RULES,
    MoeSortCudaRule(),
    AdvanceChunkCudaRule(),
    AdvancePosCudaRule(),
    GroupedGemmCudaRule(),
    CausalPrefillAttentionCudaRule(),
)
