"""Hand-made GPU schedule for the RMSNorms of `sparkinfer.kernels.norm`.

dlight's GeneralReduction handles `rms_norm` but not `add_rms_norm` (it falls back to three
kernels, one of them a single-thread loop over H), so both get this one: a single thread
block; thread i owns elements i, i + threads, ... in every stage (residual sum, sum of squares,
output), so the residual a thread writes to global memory is only ever read back by itself
(no barrier needed), and the sum of squares is one block-wide allreduce. At H = 2048 the
kernel moves 24 KiB: its time is launch latency, which is why it is not split over blocks.

The T-token step's row forms (`rms_norm_rows`, `add_rms_norm_rows`) take the same schedule with
a thread block per row (dlight's rules gave `add_rms_norm_rows` three kernels there too, the sum
of squares a thread per row serially over H: 49 us a launch on an H200 at 128 x 2048).
"""

from dataclasses import dataclass
from typing import Any

from tvm import s_tir
from tvm.s_tir.schedule import LoopRV

from sparkinfer.kernels.use import KernelUse
from sparkinfer.schedule.arch import ArchFacts
from sparkinfer.schedule.gemv import WARP, powers_of_two, stage_names
from sparkinfer.schedule.space import Knobs, ScheduleRule

DEFAULT_THREADS = 256


@dataclass(frozen=True)
class BlockThreadsKnobs(Knobs):
    """threads: threads of the kernel's single thread block (or of each block)."""

    threads: Any


def block_threads_space(facts: ArchFacts) -> dict[str, tuple[Any, ...]]:
    """Whole warps, up to the block limit."""
    return {"threads": tuple(t for t in powers_of_two(facts.max_threads_per_block) if t >= WARP)}


def schedule_rms_norm(sch: s_tir.Schedule, threads: Any, rows: Any = None) -> LoopRV:
    """An `rms_norm` or `add_rms_norm` PrimFunc for a CUDA target; returns the block loop
    (blockIdx.x: one block, or one a row). With `rows`, the block's threads are laid out 2-D as
    (rows, threads) (threadIdx.y, threadIdx.x), thread i the same i: for a kernel that goes on
    with stages of that layout (`schedule.gemv_q8`'s quantizer). Both are split factors as given
    (a tuner's sampled knobs: no arithmetic on them, which a trace could not record)."""
    names = stage_names(sch)
    sumsq, norm = sch.get_sblock("sumsq"), sch.get_sblock("norm")
    sch.set_scope(sumsq, 0, "local")

    def over_threads(loop: s_tir.schedule.LoopRV) -> None:
        if rows is not None:
            _, row, lane = sch.split(loop, [None, rows, threads])
            sch.bind(row, "threadIdx.y")
        else:
            _, lane = sch.split(loop, [None, threads])
        sch.bind(lane, "threadIdx.x")

    # The block-level loop hangs off the first output: the residual where there is one (an
    # output, which compute_at may not move), else the norm. Its loops are (h) for one row,
    # (row, h) for the row forms: a block per row.
    # 1 / rms may be a stage of its own (`gemv_q8.add_rms_norm_q8_1`), computed once between the
    # sum of squares and the norm (by every thread: the same value into shared memory; in
    # "local" scope TVM 0.27 gives it the allreduce's result buffer, which every thread then
    # overwrites in place).
    inv_rms = [sch.get_sblock("inv_rms")] if "inv_rms" in names else []
    for stage in inv_rms:
        sch.set_scope(stage, 0, "shared")
    if "residual" in names:
        anchor, producers, consumers = sch.get_sblock("residual"), [], [sumsq, *inv_rms, norm]
    else:
        anchor, producers, consumers = norm, [sumsq, *inv_rms], []
    loops = sch.get_loops(anchor)
    block, loop = sch.split(loops[0], [1, None]) if len(loops) == 1 else loops
    sch.bind(block, "blockIdx.x")
    over_threads(loop)
    for producer in producers:
        sch.compute_at(producer, block)
    for consumer in consumers:
        sch.reverse_compute_at(consumer, block)
    for stage in (*producers, *consumers):
        if stage not in inv_rms:  # a scalar: every thread computes it
            over_threads(sch.get_loops(stage)[-1])
    return block


class BlockThreadsCudaRule(ScheduleRule):
    """A CUDA rule whose one knob is the threads of a block (whole warps, default 256)."""

    target_kind = "cuda"
    knobs_type = BlockThreadsKnobs

    def space(self, use: KernelUse, facts: ArchFacts) -> dict[str, tuple[Any, ...]]:
        return block_threads_space(facts)

    def default(self, use: KernelUse, facts: ArchFacts) -> BlockThreadsKnobs:
        return BlockThreadsKnobs(threads=DEFAULT_THREADS)


class _NormCudaRule(BlockThreadsCudaRule):
    family = "norm"

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        assert isinstance(knobs, BlockThreadsKnobs)
        schedule_rms_norm(sch, knobs.threads)


class RmsNormCudaRule(_NormCudaRule):
    factory = "rms_norm"


class AddRmsNormCudaRule(_NormCudaRule):
    factory = "add_rms_norm"


class RmsNormRowsCudaRule(_NormCudaRule):
    factory = "rms_norm_rows"


class AddRmsNormRowsCudaRule(_NormCudaRule):
    factory = "add_rms_norm_rows"
