"""Hand-made GPU schedules for the fused MoE kernels of `sparkinfer.kernels.moe`.

Both follow `schedule.gemv`: a row of W is shared by `lanes` threads (threadIdx.x) sweeping
its chunks, `rows` thread rows per block (threadIdx.y), each thread working on
`rows_per_thread` rows at once so that the chunk of x it loaded serves them all, per-chunk
quant bytes and x in registers, sub-block scales decoded once, the lanes' partial sums
(rfactor) meeting in a warp-shuffle allreduce.
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
    chunk_bytes,
    declare_header_reads,
    has_vector_header,
    header_in_registers,
    even_lanes,
    lanes_rows_space,
    loops_below,
    most_rows_per_thread,
    normalize_in_shared,
    thread_rows_in_registers,
    x_buffer,
)
from sparkinfer.schedule.router import ids_in_registers, topk_in_block
from sparkinfer.schedule.space import Knobs, ScheduleRule


@dataclass(frozen=True)
class MoeKnobs(Knobs):
    """lanes: threads per row (threadIdx.x, splitting every reduction's chunk count evenly);
    rows: thread rows per block (threadIdx.y); rows_per_thread: rows each thread works on at
    once, sharing the x it loaded (a block covers rows * rows_per_thread rows of each
    reduction; structural, as `schedule.gemv`'s); unroll: explicit-unroll budget (statements)
    for a lane's loop over its chunks; vector_header: 1 to load each row-chunk's K-quant block
    header in one 16-byte load into registers, where the weight's format has one
    (`schedule.gemv.header_in_registers`; structural)."""

    lanes: Any
    rows: Any
    rows_per_thread: int
    unroll: Any
    vector_header: int


# A thread's weight bytes a chunk, over all its rows, that keep these kernels within 128
# registers (a block of 128 threads at 4 an SM): ptxas for sm_90 (bench/NOTES.md, "MoE kernels:
# x shared across rows") gives 120 for Q4_K's 36-byte chunks x 4 rows, 127-166 for Q6_K's
# 105-byte chunks x 2, 253 and spills x 4.
THREAD_CHUNK_BYTES = 160


def default_knobs(facts: ArchFacts, chunk_counts: tuple[int, ...], n_rows: int, row_chunk_bytes: int) -> MoeKnobs:
    """For reductions of `chunk_counts` chunks each over `n_rows` rows in all (every slot's),
    of at most `row_chunk_bytes` weight bytes a chunk.

    lanes: the most (up to a warp) that split every reduction's chunks evenly, so no lane
    idles on a tail (threadIdx.x has one extent per kernel, so gate and up share it);
    rows: enough for BLOCK_THREADS threads a block; rows_per_thread: `schedule.gemv`'s
    `most_rows_per_thread`, a thread's weight bytes a chunk within THREAD_CHUNK_BYTES. Every
    row re-reading its chunk of x (4 bytes a weight against Q4_K's 0.56) left these kernels
    waiting on L1/LSU with DRAM at 14-20 % (bench/NOTES.md)."""
    lanes = even_lanes(*chunk_counts)
    rows = max(1, BLOCK_THREADS // lanes)
    per_thread = most_rows_per_thread(facts, n_rows, rows,
                                      lambda per_thread: row_chunk_bytes * per_thread <= THREAD_CHUNK_BYTES)
    # vector_header 0 until a GPU times it: sm_90's shipped gate/up and Q4_K down take these
    # defaults (bench/NOTES.md, "Dense GEMVs: x shared across rows").
    return MoeKnobs(lanes=lanes, rows=rows, rows_per_thread=per_thread, unroll=DEFAULT_UNROLL, vector_header=0)


def _declare_headers(sch: s_tir.Schedule, config: MoeKnobs, reductions: tuple[tuple[str, str, GemvFormat], ...]) -> None:
    """Where the knobs say so, each (block, weight, format) reduction's read of its weight
    declared as its blocks' headers (`schedule.gemv.declare_header_reads`), before any split."""
    for name, weight, fmt in reductions:
        if config.vector_header and has_vector_header(fmt):
            declare_header_reads(sch, fmt, sch.get_sblock(name), weight)


def _headers_in_registers(sch: s_tir.Schedule, config: MoeKnobs,
                          partials: tuple[tuple[SBlockRV, str, GemvFormat], ...]) -> None:
    """The headers `_declare_headers` declared, in registers under each partial sums' row
    loop (their loops end in chunk, row, part)."""
    for partial, weight, fmt in partials:
        if config.vector_header and has_vector_header(fmt):
            header_in_registers(sch, partial, sch.get_loops(partial)[-2], weight)


def _lanes_partial(sch: s_tir.Schedule, reduction_loop: LoopRV, lanes: Any) -> SBlockRV:
    """Split `reduction_loop` (chunks, or slot x chunk) of a reduction block still at the root
    across `lanes` lanes and rfactor the lane loop: TIR's cross-thread reduction needs the
    thread-bound loop innermost, which a thread's own row loop would break (schedule.gemv).
    Returns the block of the lanes' partial sums."""
    it, tx = sch.split(reduction_loop, [None, lanes])
    sch.reorder(tx, it)
    return sch.rfactor(tx, factor_axis=0)


def _lane_reduction(
    sch: s_tir.Schedule,
    fmt: GemvFormat,
    name: str,
    partial: SBlockRV,
    ty: LoopRV,
    config: MoeKnobs,
    weight: str,
    x: str,
) -> None:
    """Reduction block `name` (its lanes' partial sums in `partial`) under its consumer's
    threadIdx.y loop `ty`: each thread's rows_per_thread rows in registers, their lanes meeting
    in a warp allreduce, the `name`_dot / `name`_xsum producers per chunk in registers from the
    `weight` and `x` buffers, a chunk's x loaded once for all the thread's rows."""
    final = sch.get_sblock(name)
    sch.compute_at(final, ty, preserve_unit_loops=True)
    sch.set_scope(final, 0, "local")
    # rfactor put the lane axis first, then the slot (gate/up), row: the lanes go innermost.
    lane, *_, row = loops_below(sch, final, ty)
    sch.reorder(row, lane)
    sch.bind(lane, "threadIdx.x")

    dot = sch.get_sblock(f"{name}_dot")
    xsum = sch.get_sblock(f"{name}_xsum") if fmt.min is not None else None

    def cache_weight(dot: SBlockRV, xsum: SBlockRV | None, it: LoopRV, part: LoopRV) -> None:
        cache_chunk_in_registers(sch, fmt, dot, xsum, it, weight, x, part)

    thread_rows_in_registers(sch, fmt, partial, ty, config.rows_per_thread, config.unroll,
                             (dot, xsum), cache_weight)


def _thread_rows(sch: s_tir.Schedule, consumer: SBlockRV, config: MoeKnobs) -> LoopRV:
    """Split the row loop of `consumer` (its last) into blockIdx.x, threadIdx.y and the
    thread's rows_per_thread rows; returns the threadIdx.y loop."""
    *_, n = sch.get_loops(consumer)
    bx, ty, _ = sch.split(n, [None, config.rows, config.rows_per_thread])
    sch.bind(bx, "blockIdx.x")
    sch.bind(ty, "threadIdx.y")
    return ty


def schedule_gate_up_silu(sch: s_tir.Schedule, fmt_gate: GemvFormat, fmt_up: GemvFormat,
                          config: MoeKnobs, x: str = "x") -> None:
    """The gate/up/SiLU layout on blocks act, gate/up and their _dot (_xsum) producers, which
    read `x` (also the int8 form, `schedule.gemv_q8`)."""
    projections = (("gate", "Wg", fmt_gate), ("up", "Wu", fmt_up))
    _declare_headers(sch, config, projections)
    partials = []
    for name, _, _ in projections:
        _, _, chunk_loop, _ = sch.get_loops(sch.get_sblock(name))
        partials.append(_lanes_partial(sch, chunk_loop, config.lanes))
    act = sch.get_sblock("act")
    sch.bind(sch.get_loops(act)[0], "blockIdx.y")
    ty = _thread_rows(sch, act, config)
    for (name, weight, fmt), partial in zip(projections, partials, strict=True):
        _lane_reduction(sch, fmt, name, partial, ty, config, weight, x)
    _headers_in_registers(sch, config, tuple((partial, weight, fmt) for (_, weight, fmt), partial
                                             in zip(projections, partials, strict=True)))


def schedule_down_residual(sch: s_tir.Schedule, fmt: GemvFormat, config: MoeKnobs,
                           x: str = "act") -> None:
    """The down/weights/residual layout on blocks h_out, down and its producers, which read
    `x` (also the int8 form, `schedule.gemv_q8`)."""
    _declare_headers(sch, config, (("down", "Wd", fmt),))
    _, slot, chunk, _ = sch.get_loops(sch.get_sblock("down"))
    # The lanes sweep the slots' chunks back to back: one reduction over slot x chunk.
    partial = _lanes_partial(sch, sch.fuse(slot, chunk), config.lanes)
    ty = _thread_rows(sch, sch.get_sblock("h_out"), config)
    _lane_reduction(sch, fmt, "down", partial, ty, config, "Wd", x)
    _headers_in_registers(sch, config, ((partial, "Wd", fmt),))


def gate_up_rows(use: KernelUse) -> int:
    """The rows of a gate/up kernel's gate (or up) reduction: I for each of the KU slots (the
    factories of gate/up take n_experts, n_used, n_ffn as their 3rd to 5th arguments)."""
    _, _, _, n_used, n_ffn, *_ = factory_args(use)
    return n_used * n_ffn


def gate_up_types(use: KernelUse) -> tuple[int, int]:
    """The quant types of a gate/up kernel's gate and up (its factories' first arguments)."""
    type_gate, type_up, *_ = factory_args(use)
    return type_gate, type_up


def down_rows(use: KernelUse) -> int:
    """The rows of a down kernel's reduction: H (its factories' 4th argument)."""
    return factory_args(use)[3]


class _MoeCudaRule(ScheduleRule):
    target_kind = "cuda"
    family = "moe"
    knobs_type = MoeKnobs

    @abstractmethod
    def chunk_counts(self, use: KernelUse) -> tuple[int, ...]:
        """The chunk count of every lane-parallel reduction of the kernel."""

    @abstractmethod
    def n_rows(self, use: KernelUse) -> int:
        """The rows of one of the kernel's reductions, over all the slots it covers."""

    @abstractmethod
    def weight_types(self, use: KernelUse) -> tuple[int, ...]:
        """The quant type of every weight the kernel reads."""

    def vector_header(self, use: KernelUse) -> bool:
        """Whether the kernel's layout can load a weight's block headers in 16 bytes (some
        weight of a `has_vector_header` format)."""
        return any(has_vector_header(gemv_format(t)) for t in self.weight_types(use))

    def wide_lane_counts(self, use: KernelUse) -> tuple[int, ...]:
        """Lane counts past a warp's even split that the space also holds (`lanes_rows_space`'s
        `wide`): none but the down kernel's (`wide_lanes`)."""
        return ()

    def space(self, use: KernelUse, facts: ArchFacts) -> dict[str, tuple[Any, ...]]:
        return {**lanes_rows_space(*self.chunk_counts(use), wide=self.wide_lane_counts(use)),
                "rows_per_thread": (1, 2, 4), "unroll": UNROLL_STEPS,
                "vector_header": (0, 1) if self.vector_header(use) else (0,)}

    def structural(self) -> tuple[str, ...]:
        return ("rows_per_thread", "vector_header")

    def default(self, use: KernelUse, facts: ArchFacts) -> MoeKnobs:
        row_chunk_bytes = max(chunk_bytes(gemv_format(t)) for t in self.weight_types(use))
        return default_knobs(facts, self.chunk_counts(use), self.n_rows(use), row_chunk_bytes)


class MoeGateUpSiluCudaRule(_MoeCudaRule):
    factory = "moe_gate_up_silu"

    def chunk_counts(self, use: KernelUse) -> tuple[int, ...]:
        type_gate, type_up, _, _, _, hidden = factory_args(use)
        return hidden // gemv_format(type_gate).chunk, hidden // gemv_format(type_up).chunk

    def n_rows(self, use: KernelUse) -> int:
        return gate_up_rows(use)

    def weight_types(self, use: KernelUse) -> tuple[int, ...]:
        return gate_up_types(use)

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        assert isinstance(knobs, MoeKnobs)
        type_gate, type_up, *_ = factory_args(use)
        schedule_gate_up_silu(sch, gemv_format(type_gate), gemv_format(type_up), knobs)


# The most threads a row of the down kernel takes (`wide_lanes`): 4 warps.
MAX_WIDE_LANES = 128


def wide_lanes(chunk_count: int) -> tuple[int, ...]:
    """Lane counts above a warp's even split that still give every lane the same number of a
    row's `chunk_count` chunks: its divisors between even_lanes and MAX_WIDE_LANES (planar
    Q6_K's 8 slots x 6 chunks: 24 and 48; Q4_K's 8 x 12: 48 and 96). The down kernel's rows
    are few (H = 2048) and short, so at a warp's lanes or fewer each of the ~250 threads an SM
    holds runs its ~300 bytes of weights as several memory round trips; more lanes a row put
    those bytes in flight in more threads. Measured on an H100 (bench/NOTES.md, "Session 24"):
    6-7 % faster alone than the knobs tuned before them, ~1 % of the decode step. A lane count
    that is not a multiple of the warp reduces in shared memory, not shuffles."""
    return tuple(d for d in range(even_lanes(chunk_count) + 1, MAX_WIDE_LANES + 1) if chunk_count % d == 0)


class MoeDownResidualCudaRule(_MoeCudaRule):
    """The down/weights/residual layout (`schedule_down_residual`); its lanes go past a warp
    (`wide_lanes`)."""

    factory = "moe_down_residual"

    def chunk_counts(self, use: KernelUse) -> tuple[int, ...]:
        # The lanes sweep slot x chunk: size them by all the slots' chunks together.
        ggml_type, _, n_used, _, inter = factory_args(use)
        return (n_used * (inter // gemv_format(ggml_type).chunk),)

    def wide_lane_counts(self, use: KernelUse) -> tuple[int, ...]:
        (chunks,) = self.chunk_counts(use)
        return wide_lanes(chunks)

    def n_rows(self, use: KernelUse) -> int:
        return down_rows(use)

    def weight_types(self, use: KernelUse) -> tuple[int, ...]:
        return (factory_args(use)[0],)

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        assert isinstance(knobs, MoeKnobs)
        schedule_down_residual(sch, gemv_format(factory_args(use)[0]), knobs)


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
        _, bx, *_ = sch.get_loops(sch.get_sblock("act"))
        topk_in_block(sch, bx, (knobs.rows, knobs.lanes), ids_store)
        normalize_in_shared(sch, bx, (knobs.rows, knobs.lanes))

