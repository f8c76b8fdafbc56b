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

from typing import ClassVar

import tvm
from tvm import s_tir

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
    MoeSortCudaRule(),
    AdvanceChunkCudaRule(),
    AdvancePosCudaRule(),
    GroupedGemmCudaRule(),
    CausalPrefillAttentionCudaRule(),
)
