"""Hand-made GPU schedules for the fused MoE kernels of `sparkinfer.kernels.moe`.

Both follow `schedule.gemv`: a row of W is shared by `lanes` threads (threadIdx.x) sweeping
its chunks, `rows` rows per thread block (threadIdx.y), per-chunk quant bytes and x in
registers, sub-block scales decoded once, lanes meeting in a warp-shuffle allreduce.
  - gate/up/SiLU: the expert slot is blockIdx.y; each row's gate and up dot products are
    two lane-parallel reductions in the same threads, then SiLU(gate) * up is written once.
  - down + residual: a row of h_out reduces over (slot, chunk) together, so the lanes
    sweep all KU experts' rows n back to back; the slot-weighted sum and the residual
    happen in the epilogue, with no [KU, H] intermediate and no atomics.
  - gate/up routed (the decode step's fused launches): the same, each thread block first
    running router_topk (`topk_in_block`: schedule/router.py's layout on the block's threads,
    every block writing the same ids and weights) and normalizing h into shared memory
    (`schedule.gemv.normalize_in_shared`). At E = 128 the rank is E compares a thread from
    shared memory, unrolled.
"""

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

from tvm import s_tir
from tvm.s_tir.schedule import LoopRV, SBlockRV

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
    normalize_in_shared,
    unroll_chunk_loop,
    x_buffer,
)
from sparkinfer.schedule.router import accumulate_in_registers
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


def _over_block_threads(sch: s_tir.Schedule, block: SBlockRV, at: LoopRV, threads: tuple[Any, Any]) -> LoopRV:
    """Spread the first loop of `block` below `at` over the block's (threadIdx.y, threadIdx.x)
    threads, predicated where it is shorter; returns the threadIdx.x loop."""
    first = loops_below(sch, block, at)[0]
    _, ty, tx = sch.split(first, [None, *threads])
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    return tx


def ids_in_registers(sch: s_tir.Schedule) -> SBlockRV:
    """The ids stage accumulating in a register, stored to ids once (schedule/router.py's
    `accumulate_in_registers`), before any other schedule step names ids: a later cache_write
    would also rewrite the expert index of the weights' register copies (which read ids) to
    the register. Returns the store block, for `topk_in_block`."""
    ids = sch.get_sblock("ids")
    sch.cache_write(ids, 0, "local")
    return sch.get_consumers(ids)[0]


def topk_in_block(sch: s_tir.Schedule, at: LoopRV, threads: tuple[Any, Any], ids_store: SBlockRV) -> None:
    """`router.topk`'s stages (rank, ids and its store, lmax, ex, total, weights) once per
    thread block under its blockIdx loop `at`, ahead of everything else there, each spread
    over the block's threads (extents `threads`) as schedule/router.py spreads them over its
    one block.

    ids and weights are outputs, which only reverse_compute_at may move: so every stage goes
    under `at` that way, in dataflow order. The dot products read ids back from global memory
    (as `moe_gate_up_silu` reads its ids parameter); the barrier that orders those reads after
    the writes is the one before the first read of the normalized x in shared memory, which
    `normalize_in_shared` computes after the top-k."""
    rank, ids, lmax, ex, total, weights = (sch.get_sblock(name) for name in ("rank", "ids", "lmax", "ex", "total", "weights"))
    for index, block in enumerate((rank, ids, ids_store, lmax, ex, total, weights)):
        sch.reverse_compute_at(block, at, index=index)
    logits = sch.cache_read(rank, 0, "shared", consumer_blocks=[rank, lmax])
    sch.compute_at(logits, at)
    _over_block_threads(sch, logits, at, threads)
    sch.set_scope(rank, 0, "shared")
    accumulate_in_registers(sch, rank, _over_block_threads(sch, rank, at, threads))
    sch.reverse_compute_at(ids_store, _over_block_threads(sch, ids, at, threads))
    for block in (rank, ids):
        # Unrolled, the E shared-memory reads are in flight together (schedule/router.py).
        sch.unroll(sch.get_loops(block)[-1])
    # lmax and total are allreduces, which leave the result in every thread; slot s is thread
    # s in ids and ex, so ex reads back only that thread's own ids[s] (schedule/router.py).
    for block, scope in ((lmax, "local"), (ex, "shared"), (total, "local"), (weights, None)):
        if scope is not None:
            sch.set_scope(block, 0, scope)
        _over_block_threads(sch, block, at, threads)


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


class MoeGateUpSiluRoutedCudaRule(MoeGateUpSiluCudaRule):
    """`moe_gate_up_silu_routed`: the gate/up layout, each thread block first ranking the
    router logits and normalizing h (module docstring)."""

    factory = "moe_gate_up_silu_routed"

    def chunk_counts(self, use: KernelUse) -> tuple[int, ...]:
        type_gate, type_up, _, _, _, hidden, _ = factory_args(use)
        return hidden // gemv_format(type_gate).chunk, hidden // gemv_format(type_up).chunk

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        assert isinstance(knobs, MoeKnobs)
        type_gate, type_up, *_ = factory_args(use)
        ids_store = ids_in_registers(sch)
        schedule_gate_up_silu(sch, gemv_format(type_gate), gemv_format(type_up), knobs, x=x_buffer(True))
        _, bx, _ = sch.get_loops(sch.get_sblock("act"))
        topk_in_block(sch, bx, (knobs.rows, knobs.lanes), ids_store)
        normalize_in_shared(sch, bx, (knobs.rows, knobs.lanes))

