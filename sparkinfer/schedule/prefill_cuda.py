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
  - causal_prefill_attention: a thread per (KV head, query tile), its tile's flash-attention
    loop in registers and local memory (the CPU's order, not yet shared-memory tiles);
  - moe_sort, advance_chunk, advance_pos: one thread (serial bookkeeping).
"""

from __future__ import annotations

from typing import Any, ClassVar

import tvm
from tvm import s_tir

from sparkinfer.errors import SparkInferError
from sparkinfer.kernels.use import KernelUse
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
