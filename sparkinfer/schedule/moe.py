"""Hand-made GPU schedules for the fused MoE kernels of `sparkinfer.kernels.moe`.

Both follow `schedule.gemv`: a row of W is shared by `lanes` threads (threadIdx.x) sweeping
its chunks, `rows` rows per thread block (threadIdx.y), per-chunk quant bytes and x in
registers, sub-block scales decoded once, lanes meeting in a warp-shuffle allreduce.
  - gate/up/SiLU: the expert slot is blockIdx.y; each row's gate and up dot products are
    two lane-parallel reductions in the same threads, then SiLU(gate) * up is written once.
  - down + residual: a row of h_out reduces over (slot, chunk) together, so the lanes
    sweep all KU experts' rows n back to back; the slot-weighted sum and the residual
    happen in the epilogue, with no [KU, H] intermediate and no atomics.
"""

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

from tvm import s_tir
from tvm.s_tir.schedule import LoopRV

from sparkinfer.kernels.gemv import GemvFormat, gemv_format
from sparkinfer.kernels.use import KernelUse, factory_args
from sparkinfer.schedule.arch import ArchFacts
from sparkinfer.schedule.gemv import (
    BLOCK_THREADS,
    DEFAULT_UNROLL,
    UNROLL_STEPS,
    cache_chunk_in_registers,
    even_lanes,
    lanes_rows_space,
    loops_below,
    unroll_chunk_loop,
)
from sparkinfer.schedule.space import Knobs, ScheduleRule


@dataclass(frozen=True)
class MoeKnobs(Knobs):
    """lanes: threads per row (threadIdx.x, splitting every reduction's chunk count evenly);
    rows: rows per thread block (threadIdx.y); unroll: explicit-unroll budget (statements)
    for a lane's loop over its chunks."""

    lanes: Any
    rows: Any
    unroll: Any


def default_knobs(chunk_counts: tuple[int, ...]) -> MoeKnobs:
    """Lanes: the most (up to a warp) that split every reduction's chunks evenly, so no lane
    idles on a tail (threadIdx.x has one extent per kernel, so gate and up share it);
    rows: enough for BLOCK_THREADS threads a block."""
    lanes = even_lanes(*chunk_counts)
    return MoeKnobs(lanes=lanes, rows=max(1, BLOCK_THREADS // lanes), unroll=DEFAULT_UNROLL)


def _lane_reduction(
    sch: s_tir.Schedule,
    fmt: GemvFormat,
    name: str,
    chunk_loop: LoopRV,
    config: MoeKnobs,
    weight: str,
    x: str,
) -> None:
    """Lanes along K for reduction block `name`, whose loop `chunk_loop` runs over chunks
    (or slot x chunk) with its part loop below: split it across threadIdx.x lanes, and
    compute the `name`_dot / `name`_xsum producers per chunk in registers, from the
    `weight` and `x` buffers."""
    block = sch.get_sblock(name)
    it, tx = sch.split(chunk_loop, [None, config.lanes])
    parts = loops_below(sch, block, tx)  # none where compute_at dropped a unit part loop
    sch.reorder(tx, it, *parts)
    sch.bind(tx, "threadIdx.x")

    dot = sch.get_sblock(f"{name}_dot")
    xsum = sch.get_sblock(f"{name}_xsum") if fmt.min is not None else None
    producers = [dot] if xsum is None else [dot, xsum]
    for producer in producers:
        sch.compute_at(producer, it)
        sch.set_scope(producer, 0, "local")

    part = it if fmt.parts == 1 else loops_below(sch, dot, it)[0]
    cache_chunk_in_registers(sch, fmt, dot, xsum, it, weight, x, part)
    unroll_chunk_loop(sch, it, [*producers, block], config.unroll)


def schedule_gate_up_silu(sch: s_tir.Schedule, fmt_gate: GemvFormat, fmt_up: GemvFormat,
                          config: MoeKnobs, x: str = "x") -> None:
    """The gate/up/SiLU layout on blocks act, gate/up and their _dot (_xsum) producers, which
    read `x` (also the int8 form, `schedule.gemv_q8`)."""
    act = sch.get_sblock("act")
    slot, n = sch.get_loops(act)
    projections = (("gate", "Wg", fmt_gate), ("up", "Wu", fmt_up))
    bx, ty = sch.split(n, [None, config.rows])
    sch.bind(slot, "blockIdx.y")
    sch.bind(bx, "blockIdx.x")
    sch.bind(ty, "threadIdx.y")
    for name, weight, fmt in projections:
        block = sch.get_sblock(name)
        sch.compute_at(block, ty)
        sch.set_scope(block, 0, "local")
        chunk_loop = loops_below(sch, block, ty)[0]
        _lane_reduction(sch, fmt, name, chunk_loop, config, weight, x)


def schedule_down_residual(sch: s_tir.Schedule, fmt: GemvFormat, n_used: int, config: MoeKnobs,
                           x: str = "act") -> None:
    """The down/weights/residual layout on blocks h_out, down and its producers, which read
    `x` (also the int8 form, `schedule.gemv_q8`)."""
    h_out = sch.get_sblock("h_out")
    (n,) = sch.get_loops(h_out)
    down = sch.get_sblock("down")
    bx, ty = sch.split(n, [None, config.rows])
    sch.bind(bx, "blockIdx.x")
    sch.bind(ty, "threadIdx.y")
    sch.compute_at(down, ty)
    sch.set_scope(down, 0, "local")
    below = loops_below(sch, down, ty)
    # compute_at drops a unit slot loop: with one expert (a dense FFN) the chunks alone.
    chunk_loop = sch.fuse(*below[:2]) if n_used > 1 else below[0]
    _lane_reduction(sch, fmt, "down", chunk_loop, config, "Wd", x)


class _MoeCudaRule(ScheduleRule):
    target_kind = "cuda"
    family = "moe"
    knobs_type = MoeKnobs


    @abstractmethod
    def chunk_counts(self, use: KernelUse) -> tuple[int, ...]:
        """The chunk count of every lane-parallel reduction of the kernel."""

    def space(self, use: KernelUse, facts: ArchFacts) -> dict[str, tuple[Any, ...]]:
        return {**lanes_rows_space(*self.chunk_counts(use)), "unroll": UNROLL_STEPS}

    def default(self, use: KernelUse, facts: ArchFacts) -> MoeKnobs:
        return default_knobs(self.chunk_counts(use))


class MoeGateUpSiluCudaRule(_MoeCudaRule):
    factory = "moe_gate_up_silu"

    def chunk_counts(self, use: KernelUse) -> tuple[int, ...]:
        type_gate, type_up, _, _, _, hidden = factory_args(use)
        return hidden // gemv_format(type_gate).chunk, hidden // gemv_format(type_up).chunk

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        assert isinstance(knobs, MoeKnobs)
        type_gate, type_up, *_ = factory_args(use)
        schedule_gate_up_silu(sch, gemv_format(type_gate), gemv_format(type_up), knobs)


class MoeDownResidualCudaRule(_MoeCudaRule):
    factory = "moe_down_residual"

    def chunk_counts(self, use: KernelUse) -> tuple[int, ...]:
        # The lanes sweep slot x chunk: size them by all the slots' chunks together.
        ggml_type, _, n_used, _, inter = factory_args(use)
        return (n_used * (inter // gemv_format(ggml_type).chunk),)

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        assert isinstance(knobs, MoeKnobs)
        ggml_type, _, n_used, _, _ = factory_args(use)
        schedule_down_residual(sch, gemv_format(ggml_type), n_used, knobs)
