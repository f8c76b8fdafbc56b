"""CUDA schedules of the int8-activation kernels (`kernels.gemv_q8`, `kernels.moe_q8`).

The GEMVs take the float GEMV's layout unchanged (`schedule.gemv`, `schedule.moe`): lanes along
K, rows per block, per-chunk quant words and activations in registers, warp allreduce. What
differs is read off `int8_view`: the dot block reads int32 words of 4 activations (xq: a Q4_K
chunk's 32 QS bytes and its 16 activation words are two 16-byte loads each), and there is no
x-sum block (the quantizer wrote the block sums).

The quantizer (`quantize_q8_1`) is a thread per block of 32: it finds the block's max, writes
its 8 words, then (a second loop nest under the same thread binding) its scale and sum.
"""

import dataclasses
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

from tvm import s_tir
from tvm.s_tir.schedule import LoopRV, SBlockRV

from sparkinfer.kernels.gemv import GemvFormat
from sparkinfer.kernels.gemv_q8 import Q8_BLOCK, WORD, q8_format
from sparkinfer.model.qwen3moe import KernelUse, factory_args
from sparkinfer.schedule.arch import ArchFacts
from sparkinfer.schedule.gemv import (
    UNROLL_STEPS,
    GemvKnobs,
    _GemvCudaRule,
    _schedule_rows,
    cache_chunk_in_registers,
    lanes_rows_space,
    loops_below,
    powers_of_two,
)
from sparkinfer.schedule.moe import MoeSchedule, _lane_reduction, default_schedule
from sparkinfer.schedule.space import Knobs, ScheduleRule


def int8_view(ggml_type: int) -> GemvFormat:
    """The float GEMV's format of `ggml_type` as the int8 kernels' blocks look to a schedule:
    no x-sum block (min=None)."""
    return dataclasses.replace(q8_format(ggml_type), min=None)


class GemvQ8CudaRule(_GemvCudaRule):
    """`gemv_q8`: the float GEMV's rule (same knobs, space and defaults) on the int8 blocks."""

    family = "gemv_q8"
    factory = "gemv_q8"

    def shape(self, use: KernelUse) -> tuple[int, int, int, int]:
        ggml_type, n, k = factory_args(use)
        return ggml_type, n, k, 1

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        assert isinstance(knobs, GemvKnobs)
        fmt = int8_view(self.shape(use)[0])

        def cache(dot: SBlockRV, xsum: SBlockRV | None, it: LoopRV, part: LoopRV) -> None:
            cache_chunk_in_registers(sch, fmt, dot, xsum, it, "W", "xq", part)

        _schedule_rows(sch, fmt, knobs, cache)


@dataclass(frozen=True)
class MoeQ8Knobs(Knobs):
    """lanes: threads per row (threadIdx.x); rows: rows per block (threadIdx.y); unroll: the
    explicit-unroll budget of a lane's chunk loop (`schedule.moe.MoeSchedule`)."""

    lanes: Any
    rows: Any
    unroll: Any


def _moe_space(chunk_counts: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    return {**lanes_rows_space(*chunk_counts), "unroll": UNROLL_STEPS}


def _moe_default(chunk_counts: tuple[int, ...]) -> MoeQ8Knobs:
    d = default_schedule(chunk_counts)
    return MoeQ8Knobs(lanes=d.lanes, rows=d.rows, unroll=d.unroll)


class _MoeQ8CudaRule(ScheduleRule):
    family = "moe_q8"
    knobs_type = MoeQ8Knobs

    def is_target_available(self, facts: ArchFacts) -> bool:
        return facts.kind == "cuda"

    @abstractmethod
    def chunk_counts(self, use: KernelUse) -> tuple[int, ...]:
        """Chunks of each lane-parallel reduction: the lanes must split them all evenly."""

    def space(self, use: KernelUse, facts: ArchFacts) -> dict[str, tuple[Any, ...]]:
        return _moe_space(self.chunk_counts(use))

    def structural(self) -> tuple[str, ...]:
        return ()

    def default(self, use: KernelUse, facts: ArchFacts) -> MoeQ8Knobs:
        return _moe_default(self.chunk_counts(use))


class MoeGateUpSiluQ8CudaRule(_MoeQ8CudaRule):
    """`schedule.moe.schedule_moe_gate_up_silu`'s layout: the slot is blockIdx.y, gate and up
    two lane reductions in the same threads, SiLU(gate) * up written once."""

    factory = "moe_gate_up_silu_q8"

    def chunk_counts(self, use: KernelUse) -> tuple[int, ...]:
        type_gate, type_up, _, _, _, hidden = factory_args(use)
        return tuple(hidden // q8_format(t).chunk for t in (type_gate, type_up))

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        assert isinstance(knobs, MoeQ8Knobs)
        type_gate, type_up = factory_args(use)[:2]
        config = MoeSchedule(lanes=knobs.lanes, rows=knobs.rows, unroll=knobs.unroll)
        slot, n = sch.get_loops(sch.get_sblock("act"))
        bx, ty = sch.split(n, [None, knobs.rows])
        sch.bind(slot, "blockIdx.y")
        sch.bind(bx, "blockIdx.x")
        sch.bind(ty, "threadIdx.y")
        for name, weight, ggml_type in (("gate", "Wg", type_gate), ("up", "Wu", type_up)):
            block = sch.get_sblock(name)
            sch.compute_at(block, ty)
            sch.set_scope(block, 0, "local")
            chunk_loop = loops_below(sch, block, ty)[0]
            _lane_reduction(sch, int8_view(ggml_type), name, chunk_loop, config, weight, "xq")


class MoeDownResidualQ8CudaRule(_MoeQ8CudaRule):
    """`schedule.moe.schedule_moe_down_residual`'s layout: a row of h_out reduces over
    (slot, chunk) across the lanes; weights and residual in the epilogue."""

    factory = "moe_down_residual_q8"

    def chunk_counts(self, use: KernelUse) -> tuple[int, ...]:
        ggml_type, _, n_used, _, n_ffn = factory_args(use)
        return (n_used * (n_ffn // q8_format(ggml_type).chunk),)

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        assert isinstance(knobs, MoeQ8Knobs)
        ggml_type, _, n_used, _, _ = factory_args(use)
        config = MoeSchedule(lanes=knobs.lanes, rows=knobs.rows, unroll=knobs.unroll)
        (n,) = sch.get_loops(sch.get_sblock("h_out"))
        down = sch.get_sblock("down")
        bx, ty = sch.split(n, [None, knobs.rows])
        sch.bind(bx, "blockIdx.x")
        sch.bind(ty, "threadIdx.y")
        sch.compute_at(down, ty)
        sch.set_scope(down, 0, "local")
        below = loops_below(sch, down, ty)
        chunk_loop = sch.fuse(*below[:2]) if n_used > 1 else below[0]
        _lane_reduction(sch, int8_view(ggml_type), "down", chunk_loop, config, "Wd", "aq")


@dataclass(frozen=True)
class QuantizeKnobs(Knobs):
    """threads: threads per block, one per block of 32 activations."""

    threads: Any


class QuantizeQ8CudaRule(ScheduleRule):
    family = "gemv_q8"
    factory = "quantize_q8_1"
    knobs_type = QuantizeKnobs

    def is_target_available(self, facts: ArchFacts) -> bool:
        return facts.kind == "cuda"

    def _blocks(self, use: KernelUse) -> int:
        k, rows = factory_args(use)
        return max(1, rows) * (k // Q8_BLOCK)

    def space(self, use: KernelUse, facts: ArchFacts) -> dict[str, tuple[Any, ...]]:
        return {"threads": tuple(t for t in powers_of_two(facts.max_threads_per_block) if t >= 32)}

    def structural(self) -> tuple[str, ...]:
        return ()

    def default(self, use: KernelUse, facts: ArchFacts) -> QuantizeKnobs:
        # 2048 activations are 64 blocks of 32: one warp-multiple block of threads covers them.
        blocks = self._blocks(use)
        threads = 32
        while threads < blocks and threads < 256:
            threads *= 2
        return QuantizeKnobs(threads=threads)

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        assert isinstance(knobs, QuantizeKnobs)
        words = Q8_BLOCK // WORD

        def thread_per_block(block: SBlockRV, split_words: bool) -> LoopRV:
            loops = sch.get_loops(block)
            if split_words:
                *lead, w = loops
                blk, inner = sch.split(w, [None, words])
                sch.unroll(inner)
                loops = [*lead, blk]
            fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
            bx, tx = sch.split(fused, [None, knobs.threads])
            sch.bind(bx, "blockIdx.x")
            sch.bind(tx, "threadIdx.x")
            return tx

        tx = thread_per_block(sch.get_sblock("xq"), True)
        amax_q = sch.get_sblock("amax_q")
        sch.compute_at(amax_q, tx)
        sch.set_scope(amax_q, 0, "local")
        tx = thread_per_block(sch.get_sblock("scales_v0"), False)
        for name in ("qsum", "amax"):
            block = sch.get_sblock(name)
            sch.compute_at(block, tx)
            sch.set_scope(block, 0, "local")
