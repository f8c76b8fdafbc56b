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

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.s_tir.schedule import LoopRV

from sparkinfer.kernels.gemv import GemvFormat, gemv_format
from sparkinfer.schedule.gemv import (
    WARP,
    cache_chunk_in_registers,
    even_lanes,
    loops_below,
    unroll_chunk_loop,
)


def check_block(lanes: int, rows: int) -> None:
    if lanes < 1 or lanes > WARP or lanes & (lanes - 1):
        raise ValueError(f"lanes must be a power of two in 1..{WARP}, got {lanes}")
    if rows < 1 or lanes * rows > 1024:
        raise ValueError(f"{lanes} lanes x {rows} rows is not a valid block")


@dataclass(frozen=True)
class MoeSchedule:
    """lanes: threads per row (a power of two <= 32, dividing every reduction's chunk
    count); rows: rows per thread block (threadIdx.y); unroll: explicit-unroll budget
    (statements) for a lane's loop over its chunks."""

    lanes: int
    rows: int
    unroll: int = 256

    def __post_init__(self) -> None:
        check_block(self.lanes, self.rows)


def default_schedule(chunk_counts: tuple[int, ...]) -> MoeSchedule:
    """Lanes: the most (up to a warp) that split every reduction's chunks evenly, so no lane
    idles on a tail (threadIdx.x has one extent per kernel, so gate and up share it);
    rows: enough for 128 threads a block."""
    lanes = even_lanes(*chunk_counts)
    return MoeSchedule(lanes=lanes, rows=max(1, 128 // lanes))


def _lane_reduction(
    sch: s_tir.Schedule,
    fmt: GemvFormat,
    name: str,
    chunk_loop: LoopRV,
    config: MoeSchedule,
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


def _extent(sch: s_tir.Schedule, block: str, loop: int) -> int:
    return int(sch.get(sch.get_loops(sch.get_sblock(block))[loop]).extent)


def schedule_moe_gate_up_silu(
    func: tirx.PrimFunc, type_gate: int, type_up: int, config: MoeSchedule | None = None
) -> tirx.PrimFunc:
    """Schedule a `moe_gate_up_silu` PrimFunc for a CUDA target."""
    sch = s_tir.Schedule(func)
    act = sch.get_sblock("act")
    slot, n = sch.get_loops(act)
    projections = (("gate", "Wg", gemv_format(type_gate)), ("up", "Wu", gemv_format(type_up)))
    if config is None:
        chunk_counts = (_extent(sch, "gate", 2), _extent(sch, "up", 2))
        config = default_schedule(chunk_counts)
    bx, ty = sch.split(n, [None, config.rows])
    sch.bind(slot, "blockIdx.y")
    sch.bind(bx, "blockIdx.x")
    sch.bind(ty, "threadIdx.y")
    for name, weight, fmt in projections:
        block = sch.get_sblock(name)
        sch.compute_at(block, ty)
        sch.set_scope(block, 0, "local")
        chunk_loop = loops_below(sch, block, ty)[0]
        _lane_reduction(sch, fmt, name, chunk_loop, config, weight, "x")
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def schedule_moe_down_residual(
    func: tirx.PrimFunc, ggml_type: int, config: MoeSchedule | None = None
) -> tirx.PrimFunc:
    """Schedule a `moe_down_residual` PrimFunc for a CUDA target."""
    sch = s_tir.Schedule(func)
    fmt = gemv_format(ggml_type)
    h_out = sch.get_sblock("h_out")
    (n,) = sch.get_loops(h_out)
    down = sch.get_sblock("down")
    n_used = _extent(sch, "down", 1)
    if config is None:
        # The lanes sweep slot x chunk: size them by all the slots' chunks together.
        config = default_schedule((n_used * _extent(sch, "down", 2),))
    bx, ty = sch.split(n, [None, config.rows])
    sch.bind(bx, "blockIdx.x")
    sch.bind(ty, "threadIdx.y")
    sch.compute_at(down, ty)
    sch.set_scope(down, 0, "local")
    below = loops_below(sch, down, ty)
    # compute_at drops a unit slot loop: with one expert (a dense FFN) the chunks alone.
    chunk_loop = sch.fuse(*below[:2]) if n_used > 1 else below[0]
    _lane_reduction(sch, fmt, "down", chunk_loop, config, "Wd", "act")
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)
