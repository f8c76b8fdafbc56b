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

from gguf import GGMLQuantizationType
from tvm import s_tir, tirx
from tvm.s_tir.schedule import LoopRV, SBlockRV

from sparkinfer.kernels.gemv import GemvFormat, gemv_format

_T = GGMLQuantizationType
_WARP = 32

# As in schedule.gemv: formats whose chunk's quant bytes are one 16-byte aligned run of words
# that only the dot block reads, so a lane loads them with vector loads.
_VECTOR_CHUNKS = frozenset({_T.Q4_K, _T.F16, _T.BF16, _T.F32})
_VECTOR_BYTES = 16


@dataclass(frozen=True)
class MoeSchedule:
    """lanes: threads per row (a power of two <= 32, dividing every reduction's chunk
    count); rows: rows per thread block (threadIdx.y); unroll: explicit-unroll budget
    (statements) for a lane's loop over its chunks."""

    lanes: int
    rows: int
    unroll: int = 256

    def __post_init__(self) -> None:
        if self.lanes < 1 or self.lanes > _WARP or self.lanes & (self.lanes - 1):
            raise ValueError(f"lanes must be a power of two in 1..{_WARP}, got {self.lanes}")
        if self.rows < 1 or self.lanes * self.rows > 1024:
            raise ValueError(f"{self.lanes} lanes x {self.rows} rows is not a valid block")


def default_schedule(chunk_counts: tuple[int, ...]) -> MoeSchedule:
    """Lanes: the most (up to a warp) that split every reduction's chunks evenly, so no lane
    idles on a tail (threadIdx.x has one extent per kernel, so gate and up share it);
    rows: enough for 128 threads a block."""
    lanes = 1
    while lanes < _WARP and all(c % (lanes * 2) == 0 for c in chunk_counts):
        lanes *= 2
    return MoeSchedule(lanes=lanes, rows=max(1, 128 // lanes))


def _loops_below(sch: s_tir.Schedule, block: SBlockRV, loop: LoopRV) -> list[LoopRV]:
    loops = sch.get_loops(block)
    anchor = sch.get(loop)
    index = next(i for i, lp in enumerate(loops) if sch.get(lp).same_as(anchor))
    return loops[index + 1 :]


def _cache_in_registers(
    sch: s_tir.Schedule, consumers: list[SBlockRV], buffer: str, at: LoopRV, vector: int
) -> None:
    """Copy what `consumers` read of `buffer` under loop `at` into registers, `vector`
    elements per load, the copy unrolled so that every register index is a constant."""
    reads = sch.get(consumers[0]).reads
    index = next(i for i, region in enumerate(reads) if region.source.name == buffer)
    cache = sch.cache_read(consumers[0], index, "local", consumer_blocks=consumers)
    sch.compute_at(cache, at)
    *outer, inner = _loops_below(sch, cache, at)
    rest, vec = sch.split(inner, [None, vector])
    sch.vectorize(vec)
    for loop in (*outer, rest):
        sch.unroll(loop)


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
    parts = _loops_below(sch, block, tx)  # none where compute_at dropped a unit part loop
    sch.reorder(tx, it, *parts)
    sch.bind(tx, "threadIdx.x")

    dot = sch.get_sblock(f"{name}_dot")
    xsum = sch.get_sblock(f"{name}_xsum") if fmt.min is not None else None
    producers = [dot] if xsum is None else [dot, xsum]
    for producer in producers:
        sch.compute_at(producer, it)
        sch.set_scope(producer, 0, "local")

    if fmt.ggml_type in _VECTOR_CHUNKS:
        _cache_in_registers(sch, [dot], weight, it, _VECTOR_BYTES // fmt.word_bytes)
    # x is 4 bytes a weight: a whole chunk where xsum shares it (<= 64 floats), else one
    # sub-block at a time, to stay inside the register file.
    if xsum is None:
        part_loop = it if fmt.parts == 1 else _loops_below(sch, dot, it)[0]
        _cache_in_registers(sch, [dot], x, part_loop, 4)
    else:
        _cache_in_registers(sch, [dot, xsum], x, it, 4)

    for producer in producers:
        for loop in _loops_below(sch, producer, it):
            sch.unroll(loop)
    for loop in parts:
        sch.unroll(loop)
    sch.annotate(it, "pragma_auto_unroll_max_step", config.unroll)
    sch.annotate(it, "pragma_unroll_explicit", 1)


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
        chunk_loop = _loops_below(sch, block, ty)[0]
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
    if config is None:
        # The lanes sweep slot x chunk: size them by all the slots' chunks together.
        config = default_schedule((_extent(sch, "down", 1) * _extent(sch, "down", 2),))
    bx, ty = sch.split(n, [None, config.rows])
    sch.bind(bx, "blockIdx.x")
    sch.bind(ty, "threadIdx.y")
    sch.compute_at(down, ty)
    sch.set_scope(down, 0, "local")
    slot, chunk = _loops_below(sch, down, ty)[:2]
    _lane_reduction(sch, fmt, "down", sch.fuse(slot, chunk), config, "Wd", "act")
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)
