"""CUDA and CPU schedules of the int8-activation MoE kernels (`kernels.moe_q8`).

They take `schedule.moe`'s layouts unchanged (lanes along K, rows per block, per-chunk quant words
and activations in registers, warp allreduce) on the int8 blocks (`schedule.gemv_q8.int8_view`).
The gate/up kernel's thread block holds one block of 32 rows exactly, so that its epilogue
quantizes its SiLU activations (`schedule.gemv_q8.schedule_quantizer_epilogue`) for the down
kernel, with no launch between them. The routed gate/up (`moe_gate_up_silu_q8_routed`) first ranks
the router logits in every thread block, as `schedule.moe`'s routed float form does
(`schedule.router.topk_in_block`). On the CPU they take `schedule.cpu`'s dot layout.
"""

import dataclasses
from typing import Any

from tvm import s_tir

from sparkinfer.kernels.gemv import GemvFormat
from sparkinfer.kernels.gemv_q8 import Q8_BLOCK
from sparkinfer.kernels.use import KernelUse, factory_args
from sparkinfer.schedule.arch import ArchFacts
from sparkinfer.schedule.cpu import (
    CpuLaneKnobs,
    LaneFormCpu,
    MoeDownResidualCpuRule,
    MoeGateUpSiluCpuRule,
    lane_sums,
    row_tasks,
)
from sparkinfer.schedule.gemv_q8 import Int8WeightsCpu, has_mins, int8_view, schedule_quantizer_epilogue
from sparkinfer.schedule.moe import (
    MoeDownResidualCudaRule,
    MoeGateUpSiluCudaRule,
    MoeKnobs,
    schedule_down_residual,
    schedule_gate_up_silu,
)
from sparkinfer.schedule.router import ids_in_registers, topk_in_block
from sparkinfer.schedule.space import Knobs, ScheduleError

# The thread rows (threadIdx.y) and rows a thread of `moe_gate_up_silu_q8` that its space holds:
# every pair whose product is a block of 32, the first the default. In the decode step on an H100
# (bench/NOTES.md, "Session 24"), 16 x 2 ran level with 8 x 4 and 32 x 1 8 % slower.
EPILOGUE_ROW_SPLITS = ((8, 4), (16, 2), (32, 1))


class MoeGateUpSiluQ8CudaRule(MoeGateUpSiluCudaRule):
    """`schedule.moe`'s gate/up/SiLU rule (its chunks and weight types: the int8 form takes the
    float form's arguments) on the int8 blocks, with a thread block of one block of 32 rows
    exactly (rows threadIdx.y x rows_per_thread, EPILOGUE_ROW_SPLITS: by default 8 x 4), act in
    shared memory, and `quantize_q8_1` of those 32 values after it
    (`schedule_quantizer_epilogue`). Both row knobs are structural, so that the design spaces
    are the pairs that make 32: fewer rows a thread, fewer weight loads a thread at more threads
    a block (256, 512, 1,024)."""

    family = "moe_q8"
    factory = "moe_gate_up_silu_q8"

    def vector_header(self, use: KernelUse) -> bool:
        return False  # as GemvQ8CudaRule

    def space(self, use: KernelUse, facts: ArchFacts) -> dict[str, tuple[Any, ...]]:
        rows, per_thread = zip(*EPILOGUE_ROW_SPLITS)
        return {**super().space(use, facts), "rows": rows, "rows_per_thread": tuple(sorted(per_thread))}

    def structural(self) -> tuple[str, ...]:
        return ("rows", *super().structural())

    def default(self, use: KernelUse, facts: ArchFacts) -> MoeKnobs:
        rows, per_thread = EPILOGUE_ROW_SPLITS[0]
        return dataclasses.replace(super().default(use, facts), rows=rows, rows_per_thread=per_thread)

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        assert isinstance(knobs, MoeKnobs)
        if knobs.rows * knobs.rows_per_thread != Q8_BLOCK:
            raise ScheduleError(f"kernel {use.name}: a thread block of the int8 gate/up holds one block of "
                                f"{Q8_BLOCK} rows, but rows {knobs.rows} x rows_per_thread {knobs.rows_per_thread} "
                                f"is {knobs.rows * knobs.rows_per_thread}")
        type_gate, type_up, *_ = factory_args(use)
        schedule_gate_up_silu(sch, int8_view(type_gate), int8_view(type_up), knobs, "xq")
        act = sch.get_sblock("act")
        sch.set_scope(act, 0, "shared")
        _, bx, *_ = sch.get_loops(act)
        schedule_quantizer_epilogue(sch, bx, knobs.lanes)


class MoeGateUpSiluQ8RoutedCudaRule(MoeGateUpSiluQ8CudaRule):
    """`moe_gate_up_silu_q8_routed`: the int8 gate/up layout, each thread block first running
    router_topk on its threads. The dot products read ids back from global memory after the
    barriers of the top-k's block allreduces, which follow the ids stores
    (tests/schedule/test_gemv_q8_cuda.py asserts one lies between those stores and reads)."""

    factory = "moe_gate_up_silu_q8_routed"

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        assert isinstance(knobs, MoeKnobs)
        ids_store = ids_in_registers(sch)
        super().apply(sch, use, knobs, facts)
        _, bx, *_ = sch.get_loops(sch.get_sblock("act"))
        topk_in_block(sch, bx, (knobs.rows, knobs.lanes), ids_store)


class MoeGateUpSiluQ8RoutedPrefetchCudaRule(MoeGateUpSiluQ8RoutedCudaRule):
    """`moe_gate_up_silu_q8_routed_prefetch`: the routed layout; its down weights, which no
    block reads, are the compiler's to prefetch (compiler/l2_prefetch.py)."""

    factory = "moe_gate_up_silu_q8_routed_prefetch"

    def chunk_counts(self, use: KernelUse) -> tuple[int, ...]:
        # the routed kernel's, whose arguments are these but the last (type_down)
        return super().chunk_counts(dataclasses.replace(use, args=use.args[:-1]))


class MoeDownResidualQ8CudaRule(MoeDownResidualCudaRule):
    """`schedule.moe`'s down/weights/residual rule (same knobs, chunks and rows) on the int8 blocks."""

    family = "moe_q8"
    factory = "moe_down_residual_q8"

    def vector_header(self, use: KernelUse) -> bool:
        return False  # as GemvQ8CudaRule

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        assert isinstance(knobs, MoeKnobs)
        schedule_down_residual(sch, int8_view(factory_args(use)[0]), knobs, "aq")


class MoeGateUpSiluQ8CpuRule(MoeGateUpSiluCpuRule):
    """The int8 gate/up tasks; the quantizer of act after them, as its factory wrote it."""

    family = "moe_q8"
    factory = "moe_gate_up_silu_q8"
    word_lanes = False

    def formats(self, use: KernelUse) -> tuple[GemvFormat, ...]:
        type_gate, type_up, *_ = factory_args(use)
        return int8_view(type_gate), int8_view(type_up)


class MoeDownResidualQ8CpuRule(Int8WeightsCpu, MoeDownResidualCpuRule):
    family = "moe_q8"
    factory = "moe_down_residual_q8"


class MoeGateUpSiluQ8RoutedCpuRule(MoeGateUpSiluQ8CpuRule):
    """The int8 gate/up tasks after the top-k, which stays ahead of them as its factory wrote it."""

    factory = "moe_gate_up_silu_q8_routed"


class MoeGateUpSiluQ8LanesCpuRule(LaneFormCpu, MoeGateUpSiluQ8CpuRule):
    """Tasks over (slot, rows of act); a row's gate and up lanes summed where act uses them
    (`lane_sums`); the quantizer of act after them, as its factory wrote it."""

    factory = "moe_gate_up_silu_q8_lanes"

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        assert isinstance(knobs, CpuLaneKnobs)
        slot, rows = sch.get_loops(sch.get_sblock("act"))
        row = row_tasks(sch, slot, rows, knobs)
        for name, ggml_type in zip(("gate", "up"), factory_args(use)[:2]):
            sch.compute_at(sch.get_sblock(name), row, preserve_unit_loops=True)
            lane_sums(sch, name, row, knobs.unroll, has_mins(ggml_type))


class MoeGateUpSiluQ8RoutedLanesCpuRule(MoeGateUpSiluQ8LanesCpuRule):
    """The lane form's gate/up tasks after the top-k, which stays ahead of them as its factory wrote it."""

    factory = "moe_gate_up_silu_q8_routed_lanes"


class MoeDownResidualQ8LanesCpuRule(LaneFormCpu, MoeDownResidualQ8CpuRule):
    """Tasks over rows of h_out; a row's lanes, summed over (slot, chunk, block), where h_out uses them."""

    factory = "moe_down_residual_q8_lanes"

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        assert isinstance(knobs, CpuLaneKnobs)
        (rows,) = sch.get_loops(sch.get_sblock("h_out"))
        row = row_tasks(sch, None, rows, knobs)
        sch.compute_at(sch.get_sblock("down"), row, preserve_unit_loops=True)
        lane_sums(sch, "down", row, knobs.unroll, has_mins(factory_args(use)[0]))

