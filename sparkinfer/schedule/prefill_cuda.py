"""CUDA schedules of the T-token step's kernels: a first, plain version that compiles for
sm_90 / sm_120 / sm_121 and is correct, not yet a fast one (bench/NOTES.md, "Batched prefill",
says what a fast one needs: dequantized tiles on tensor cores or int8 MMA).

  - the block-structured kernels (gemm, the row forms of embedding / norms / router, RoPE +
    KV append, silu_mul, the combine, take_row) take dlight's GPU rules, replayed as a trace
    onto the rule's schedule: dlight's Matmul rule for the GEMM (a shared-memory tiled matmul
    with the dequantization as its prologue), its reduction / fallback rules for the others;
  - grouped_gemm: a block per (expert, 16-output tile) that decodes each K tile of its weights
    once into shared memory and multiplies it by the expert's rows staged there, a thread
    accumulating 2 rows x 1 output in registers (GroupedGemmCudaRule says why);
  - causal_prefill_attention: a thread per (KV head, query tile), its tile's flash-attention
    loop in registers and local memory (the CPU's order, not yet shared-memory tiles);
  - moe_sort, advance_chunk, advance_pos: one thread (serial bookkeeping).
"""

from __future__ import annotations

from typing import Any, ClassVar

import tvm
from tvm import s_tir

from sparkinfer.errors import SparkInferError
from sparkinfer.kernels.moe_chunk import ROW_BLOCK, TILE_N, k_tile
from sparkinfer.kernels.use import KernelUse, factory_args
from sparkinfer.schedule.arch import ArchFacts, cuda_target_attrs
from sparkinfer.schedule.space import FixedRule, Knobs, ScheduleRule


class _CudaRule(FixedRule):
    target_kind = "cuda"


def apply_dlight(sch: s_tir.Schedule, use: KernelUse, facts: ArchFacts, rules: tuple[Any, ...]) -> None:
    """The first of dlight's GPU `rules` that takes the kernel, its trace replayed onto `sch`."""
    target = tvm.target.Target(cuda_target_attrs(facts))
    func = sch.mod["main"]
    for rule in rules:
        with target:
            found = rule.apply(func, target, False)
        if found is None:
            continue
        found = found[0] if isinstance(found, list) else found
        found.trace.apply_to_schedule(sch, remove_postproc=False)
        return
    raise SparkInferError(f"kernel {use.name}: no dlight GPU rule takes it")


class DlightCudaRule(_CudaRule):
    """dlight's first GPU rule that takes the kernel; one instance per factory it serves."""

    def __init__(self, family: str, factory: str) -> None:
        self.family, self.factory = family, factory

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        from tvm.s_tir import dlight as dl

        apply_dlight(sch, use, facts, (dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                       dl.gpu.GeneralReduction(), dl.gpu.Fallback()))


class GemmCudaRule(_CudaRule):
    """The dense dequantizing GEMM: with float16 operands (`kernels.gemm`'s half_operands)
    dlight's tensor-core matmul (WMMA 16x16x16 fragments, float32 accumulators, the
    dequantization fused into the shared-memory tile loads, double-buffered); else its SIMT
    Matmul (~6.8 TFLOP/s on an H200 at 128 x 2048 x 4096, bench/NOTES.md). dlight's Matmul
    would pick the tensor cores itself, but it reads the arch number from the target and
    "sm_90a" is not a number to it."""

    family, factory = "gemm", "gemm"

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        from tvm.s_tir import dlight as dl

        half_operands = len(use.args) > 4 and bool(use.args[4])
        rules = (dl.gpu.matmul.MatmulTensorization(),) if half_operands else ()
        apply_dlight(sch, use, facts, (*rules, dl.gpu.Matmul()))


DLIGHT_RULES: tuple[DlightCudaRule, ...] = tuple(
    DlightCudaRule(family, factory) for family, factory in (
        ("embedding", "embedding_rows"),
        ("moe_chunk", "silu_mul"),
        ("chunk", "take_row"),
    )
)


class QkNormRopeKvAppendRowsCudaRule(_CudaRule):
    """`rope.QkNormRopeKvAppendCudaRule` a row at a time: a thread block per (row, head), a
    thread per head dim, the head's sum of squares a block-wide allreduce; the row's cos / sin
    table (half a head's dims) is computed by the block into shared memory (each head's block
    computes it again: 64 cos/sin pairs, less than a global round trip). dlight's fallback made
    three kernels of it, the sum of squares a serial loop per (row, head)."""

    family, factory = "prefill_attention", "qk_norm_rope_kv_append_rows"

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        rope = sch.get_sblock("rope")
        row, head, dim = sch.get_loops(rope)
        block = sch.fuse(row, head)
        sch.bind(block, "blockIdx.x")
        sch.bind(dim, "threadIdx.x")
        sumsq = sch.get_sblock("sumsq")
        sch.compute_at(sumsq, block)
        sch.set_scope(sumsq, 0, "local")
        sch.bind(sch.get_loops(sumsq)[-1], "threadIdx.x")
        angle = sch.get_sblock("angle")
        sch.compute_at(angle, block)
        sch.set_scope(angle, 0, "shared")  # cos
        sch.set_scope(angle, 1, "shared")  # sin
        # Half a head's dims over the head's threads: the split's predicate idles the other half
        # (a loop bound to threadIdx.x without it would run past the table).
        _, lane = sch.split(sch.get_loops(angle)[-1], [None, sch.get(dim).extent])
        sch.bind(lane, "threadIdx.x")


class MoeCombineResidualCudaRule(_CudaRule):
    """A thread block per token, its threads over the hidden dims; each output's sum over the
    token's KU expert rows in registers (dlight gave it 321 us a launch at 128 tokens, 2048 wide,
    top 8 on an H200)."""

    family, factory = "moe_chunk", "moe_combine_residual"
    THREADS: ClassVar[int] = 256

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        out = sch.get_sblock("h_out")
        token, dim = sch.get_loops(out)
        sch.bind(token, "blockIdx.x")
        _, lane = sch.split(dim, [None, self.THREADS])
        sch.bind(lane, "threadIdx.x")
        ffn = sch.get_sblock("ffn")
        sch.compute_at(ffn, lane)
        sch.set_scope(ffn, 0, "local")


class _OneThreadRule(_CudaRule):
    """A serial kernel whose work is one block `block` under one unit loop: one thread."""

    block: ClassVar[str]
    enable_check = False  # the block holds plain loops, not block iters

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        sch.bind(sch.get_loops(sch.get_sblock(self.block))[0], "blockIdx.x")


class MoeSortCudaRule(_CudaRule):
    """One thread block, a thread per expert (`moe_chunk.moe_sort`'s stages): the counts and
    starts in shared memory, so TVM puts a barrier between the stages; the clearing stages
    spread over the same threads."""

    family, factory = "moe_chunk", "moe_sort"
    enable_check = False  # the stages' plain loops and data-dependent stores

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        count, start = sch.get_sblock("count"), sch.get_sblock("start")
        block = sch.get_loops(count)[0]
        sch.bind(block, "blockIdx.x")
        threads = int(sch.get(sch.get_loops(count)[1]).extent)  # E
        sch.set_scope(count, 0, "shared")
        sch.set_scope(start, 0, "shared")
        for name in ("count", "start", "place", "clear_rows", "clear_pairs"):
            loops = sch.get_loops(sch.get_sblock(name))[1:]
            _, lane = sch.split(sch.fuse(*loops) if len(loops) > 1 else loops[0], [None, threads])
            sch.bind(lane, "threadIdx.x")


class AdvanceChunkCudaRule(_OneThreadRule):
    family, factory, block = "chunk", "advance_chunk", "advance"


class AdvancePosCudaRule(_OneThreadRule):
    family, factory, block = "chunk", "advance_pos", "advance"


class GroupedGemmCudaRule(_CudaRule):
    """A block per (expert, TILE_N-output tile) of TILE_N x ROW_BLOCK / THREAD_ROWS threads
    (64): threadIdx.x an output, threadIdx.y THREAD_ROWS rows of the row block.

    Per K tile the block decodes the tile's weights once, cooperatively, into a shared float32
    tile [TILE_N, K_TILE] (16 KiB; consecutive threads decode consecutive k of one weight row,
    so a warp's quant-word reads coalesce; the scales and mins, decoded once per block, are
    shared too); then for each ROW_BLOCK rows of the expert it stages their x K-tile in shared
    memory (8 KiB, coalesced likewise) and each thread accumulates its THREAD_ROWS x 1 outputs
    in registers from shared memory only. The partial sums cross K tiles through y (the
    kernel's structure, shared with the CPU rule). Under 33 KiB of static shared memory a
    block: no dynamic shared memory, 6 blocks an SM on an H200.

    Why: the first version decoded every weight in every thread that multiplied it, once per
    ROW_BLOCK rows, straight from global memory (11.8 ms a gate/up launch at T = 128 on an
    H200). Now a weight is decoded once per block, and the multiply-add loop is bound by
    shared-memory wavefronts: per X_RUN k steps a thread loads a 16-byte run of each of its
    rows' x (a warp's lanes share them: 1 wavefront each) and of its output's weights (16
    lanes, 2 wavefronts; nvcc merges the unrolled reads, the tiles' rows being K_TILE + X_RUN
    floats apart: runs 16-byte aligned, a warp's rows on other banks), each weight serving
    THREAD_ROWS rows: 0.5 wavefronts per warp multiply-add (2 with one row per thread and
    scalar reads). TILE_N and ROW_BLOCK are the kernel's (the CPU's vector width and register
    block), which caps the register tile."""

    family, factory = "moe_chunk", "grouped_gemm"
    enable_check = False  # the K-tile and rows loops' trip counts are read from `offsets`

    THREAD_ROWS: ClassVar[int] = 2  # rows of the row block a thread accumulates
    X_RUN: ClassVar[int] = 4  # k steps unrolled: nvcc loads an x row's 4 floats at once

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        threads_y = ROW_BLOCK // self.THREAD_ROWS
        e, t = sch.get_loops(sch.get_sblock("tile"))
        sch.bind(sch.fuse(e, t), "blockIdx.x")
        scale = sch.get_sblock("scale")
        sch.set_scope(scale, 0, "shared")  # the tile's scales,
        sch.set_scope(scale, 1, "shared")  # its mins
        for index in (0, 1):  # [chunk, part, output]: the 16 outputs' threads write 16 banks
            sch.transform_layout(scale, ("write", index), lambda i, c, p: (c, p, i))
        # Bound at the block's top level, threadIdx.y is one thread variable for every stage
        # below, so the accumulators compact to the thread's own (registers, not local memory).
        i, c, p = sch.get_loops(scale)[-3:]
        sch.bind(i, "threadIdx.x")
        sch.bind(sch.split(sch.fuse(c, p), [None, threads_y])[1], "threadIdx.y")
        dequant, xload = sch.get_sblock("dequant"), sch.get_sblock("xload")
        sch.set_scope(dequant, 0, "shared")
        sch.set_scope(xload, 0, "shared")
        # The weight tile [output, k], decoded along k: a warp reads consecutive quant words of
        # one weight row (coalesced) and writes consecutive floats.
        sch.transform_layout(dequant, ("write", 0), lambda k, i: (i, k))
        sch.reorder(*reversed(sch.get_loops(dequant)[-2:]))
        # Rows K_TILE + X_RUN floats apart: X_RUN-float runs 16-byte aligned, and the rows of
        # one 16-byte load on the other banks.
        for block in (dequant, xload):
            sch.storage_align(block, 0, axis=0, factor=32, offset=self.X_RUN)
        # Every thread a share of each tile, k fastest; the x rows' copy X_RUN floats (16
        # bytes) a thread at once where the threads' runs tile a row.
        x_run = self.X_RUN if ROW_BLOCK * k_tile(factory_args(use)[4]) % (threads_y * TILE_N * self.X_RUN) == 0 else 1
        for block, run in ((dequant, 1), (xload, x_run)):
            _, ty, tx, vec = sch.split(sch.fuse(*sch.get_loops(block)[-2:]), [None, threads_y, TILE_N, run])
            sch.bind(ty, "threadIdx.y")
            sch.bind(tx, "threadIdx.x")
            if run > 1:
                sch.vectorize(vec)
        for name in ("init", "store"):
            ri, i = sch.get_loops(sch.get_sblock(name))[-2:]
            ty, j = sch.split(ri, [threads_y, self.THREAD_ROWS])  # (no reorder: opaque iters)
            sch.bind(ty, "threadIdx.y")
            sch.bind(i, "threadIdx.x")  # TILE_N outputs
            sch.unroll(j)
        kk, ri, i = sch.get_loops(sch.get_sblock("fma"))[-3:]
        ty, j = sch.split(ri, [threads_y, self.THREAD_ROWS])
        ko, ki = sch.split(kk, [None, self.X_RUN])
        sch.reorder(ty, i, ko, ki, j)  # threads outermost, each thread's K tile loop inside
        sch.bind(ty, "threadIdx.y")
        sch.bind(i, "threadIdx.x")
        sch.unroll(ki)
        sch.unroll(j)  # each weight read serves the thread's rows


class CausalPrefillAttentionCudaRule(_CudaRule):
    family, factory = "prefill_attention", "causal_prefill_attention"
    enable_check = False  # the key loop's trip count is read from pos and n_valid
    THREADS: ClassVar[int] = 64

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        kv, it = sch.get_loops(sch.get_sblock("tile"))
        bx, tx = sch.split(sch.fuse(kv, it), [None, self.THREADS])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")


CUDA_RULES: tuple[ScheduleRule, ...] = (
    *DLIGHT_RULES,
    GemmCudaRule(),
    QkNormRopeKvAppendRowsCudaRule(),
    MoeCombineResidualCudaRule(),
    MoeSortCudaRule(),
    AdvanceChunkCudaRule(),
    AdvancePosCudaRule(),
    GroupedGemmCudaRule(),
    CausalPrefillAttentionCudaRule(),
)
