"""CPU schedules (LLVM) of the T-token step's heavy kernels: the dense GEMM, the grouped expert
GEMM and the causal prefill attention; the chunk's row-wise bookkeeping as its factories wrote it.

  gemm.gemm:            n cut into tiles of `tile_n` outputs (one SIMD vector of float32 at
                        the default); per tile, the weights' scales, mins and float32 values
                        are computed once (compute_at the tile, the dequantization vectorised
                        over the tile's weight rows) and multiplied by every row of the chunk,
                        `rows` rows at a time (that many independent accumulators, unrolled),
                        the tile's n lanes vectorised (x[t, k] broadcast); tiles in parallel
                        over the cores.
  moe_chunk.grouped_gemm: the (expert, tile) pairs in parallel; the K tile's dequantization,
                        the x rows' staging and the multiply-add over its TILE_N lanes
                        vectorised.
  moe_chunk.silu_mul:   rows in parallel, the elements of a row vectorised (the sigmoid is
                        plain arithmetic: `vecmath.sigmoid_f32`).
  gemv_q8.round_q8_1_rows: rows in parallel; a block of 32's max and inverse computed before its
                        values, which are vectorised (chunk_activations "q8").
  prefill_attention.causal_prefill_attention: (KV head, query tile) pairs in parallel; every
                        stage's last loop vectorised: the tile's rows (the softmax state, the
                        scores S^T) or the head dims (the output). Its half_operands form
                        (the GPUs' tensor-core numerics; a cpu schedules file may not pick
                        chunk_operands "f16", so only tests build it here, to check it against
                        its reference): the tiles in parallel, as written.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir

from sparkinfer.kernels.gemv import GemvFormat, gemv_format
from sparkinfer.kernels.gemv_q8 import Q8_BLOCK
from sparkinfer.kernels.use import KernelUse, factory_args
from sparkinfer.schedule.arch import ArchFacts
from sparkinfer.schedule.cpu import AsWrittenCpuRule
from sparkinfer.schedule.space import FixedRule, Knobs, ScheduleRule


class _CpuRule(ScheduleRule):
    def is_target_available(self, facts: ArchFacts) -> bool:
        return facts.kind == "cpu"


@dataclass(frozen=True)
class GemmCpuKnobs(Knobs):
    tile_n: int  # outputs per tile: the vector lanes
    rows: int  # chunk rows a register block: independent accumulators sharing each tile row load


ROW_BLOCKS = (1, 2, 4, 8, 16)
# 8 accumulator vectors: enough independent multiply-adds to cover the FMA latency, with
# registers to spare for the tile row and the broadcasts (4x the one-row schedule measured).
DEFAULT_ROWS = 8


def _tiles(n: int, facts: ArchFacts) -> tuple[int, ...]:
    """Tile widths that divide n, from one float32 lane to two SIMD vectors."""
    widest = 2 * max(1, facts.vector_bytes // 4)
    return tuple(t for t in (1, 2, 4, 8, 16, 32, 64) if t <= widest and n % t == 0)


class GemmCpuRule(_CpuRule):
    family, factory, knobs_type = "gemm", "gemm", GemmCpuKnobs

    def space(self, use: KernelUse, facts: ArchFacts) -> dict[str, tuple[int, ...]]:
        _, t, n, _ = factory_args(use)
        return {"tile_n": _tiles(n, facts), "rows": tuple(r for r in ROW_BLOCKS if t % r == 0)}

    def structural(self) -> tuple[str, ...]:
        return ("tile_n", "rows")  # widths that must divide n and t: not free split factors

    def default(self, use: KernelUse, facts: ArchFacts) -> GemmCpuKnobs:
        space = self.space(use, facts)
        lanes = max(1, facts.vector_bytes // 4)
        return GemmCpuKnobs(max(t for t in space["tile_n"] if t <= lanes),
                            max(r for r in space["rows"] if r <= DEFAULT_ROWS))

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        assert isinstance(knobs, GemmCpuKnobs)
        block = sch.get_sblock("gemm")
        i, j, k = sch.get_loops(block)
        jo, ji = sch.split(j, [None, knobs.tile_n])
        io, ii = sch.split(i, [None, knobs.rows])
        sch.reorder(jo, io, k, ii, ji)
        fmt = gemv_format(factory_args(use)[0])
        stages = ["wdq"] + (["minv"] if fmt.min is not None else []) + (["scale"] if fmt.scale is not None else [])
        for stage in stages:  # consumers first: each goes under the tile its consumer is in
            sch.compute_at(sch.get_sblock(stage), jo)
        if knobs.tile_n > 1:  # (a tile of one output has no lanes loop)
            vectorize_dequant(sch, fmt, "wdq", tuple((stage, 0) for stage in stages[1:]))
        sch.unroll(ii)
        sch.vectorize(ji)
        sch.parallel(jo)
        # last: the schedule's checks refuse to vectorize or parallelize over a split-off init
        sch.decompose_reduction(block, k)


WORD_RUN = 4  # consecutive weights of a sub-block decoded together: one 32-bit word of bytes


def vectorize_dequant(sch: s_tir.Schedule, fmt: GemvFormat, dequant: str,
                      decoded: tuple[tuple[str, int], ...]) -> None:
    """A dequantized tile [k, lanes] (block `dequant`), its lanes (weight rows, gathered)
    vectorised. Its k loop is ordered (chunk, run of WORD_RUN, part, weight in the run), the
    parts and the run unrolled: the parts of a chunk and the weights of a run share their
    quant words, which LLVM then gathers once for all of them (K-quants: 8 uses of a Q4_K
    word). The sub-blocks' decoded scales and mins (`decoded`: (block, its write index), each
    [lane, chunk, part]) are laid out [chunk, part, lane] instead, so a lane vector of them is
    one contiguous load."""
    for block, index in decoded:
        sch.transform_layout(sch.get_sblock(block), ("write", index), lambda r, c, p: (c, p, r))
    kk, lanes = sch.get_loops(sch.get_sblock(dequant))[-2:]
    if fmt.sub % WORD_RUN == 0:
        c, p, run, l = sch.split(kk, [None, fmt.parts, fmt.sub // WORD_RUN, WORD_RUN])
        sch.reorder(c, run, p, l, lanes)
        sch.unroll(p)
        sch.unroll(l)
    sch.vectorize(lanes)


class _FixedCpuRule(FixedRule):
    target_kind = "cpu"


class GroupedGemmCpuRule(_FixedCpuRule):
    family, factory = "moe_chunk", "grouped_gemm"
    enable_check = False  # the rows loop's trip count is read from `offsets`

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        e, tile = sch.get_loops(sch.get_sblock("tile"))
        vectorize_dequant(sch, gemv_format(factory_args(use)[0]), "dequant", (("scale", 0), ("scale", 1)))
        for name in ("init", "fma", "store"):
            loops = sch.get_loops(sch.get_sblock(name))
            sch.vectorize(loops[-1])
            sch.unroll(loops[-2])  # the ROW_BLOCK accumulator rows
        sch.vectorize(sch.get_loops(sch.get_sblock("xload"))[-1])  # a K tile of an x row
        sch.parallel(sch.fuse(e, tile))


class SiluMulCpuRule(_FixedCpuRule):
    family, factory = "moe_chunk", "silu_mul"

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        r, i = sch.get_loops(sch.get_sblock("act"))
        lanes = max(1, facts.vector_bytes // 4)
        _, n = factory_args(use)
        if n % lanes == 0:
            sch.vectorize(sch.split(i, [None, lanes])[1])
        sch.parallel(r)


class RoundQ8RowsCpuRule(_FixedCpuRule):
    family, factory = "gemv_q8", "round_q8_1_rows"

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        r, i = sch.get_loops(sch.get_sblock("rounded"))
        block, value = sch.split(i, [None, Q8_BLOCK])
        for name in ("inv", "amax"):
            sch.compute_at(sch.get_sblock(name), block)
        sch.vectorize(value)
        sch.parallel(r)


PV_ROWS = 2  # rows a P V register block: 2 x D/16 accumulators (8 at D = 64); 4 measured slower


class CausalPrefillAttentionCpuRule(_FixedCpuRule):
    family, factory = "prefill_attention", "causal_prefill_attention"
    enable_check = False  # the key loop's trip count is read from pos and n_valid

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        kv, it = sch.get_loops(sch.get_sblock("tile"))
        if len(use.args) > 6 and bool(use.args[6]):  # half_operands: the GPUs' form, tiles in parallel only
            sch.parallel(sch.fuse(kv, it))
            return
        qk = sch.get_sblock("qk")
        sch.decompose_reduction(qk, sch.get_loops(qk)[-3])  # S = 0 ("qk_init"), then the D-long sums
        for name in ("q_load", "acc_init", "state_init", "k_load", "v_load", "qk_init", "qk_update", "max_init", "max",
                     "weight", "rescale_state", "sum", "rescale", "store"):
            sch.vectorize(sch.get_loops(sch.get_sblock(name))[-1])
        # P V: PV_ROWS rows x the head dims in vectors as register accumulators across the
        # tile's keys (each V vector load serves PV_ROWS rows; measured -16 % CPU time)
        r, jj, d = sch.get_loops(sch.get_sblock("pv"))[-3:]
        lanes = max(1, facts.vector_bytes // 4)
        head_dim = factory_args(use)[3]
        if head_dim % lanes == 0:
            ro, ri = sch.split(r, [None, PV_ROWS])
            do, di = sch.split(d, [None, lanes])
            sch.reorder(ro, jj, ri, do, di)
            sch.unroll(ri)
            sch.unroll(do)
            d = di
        sch.vectorize(d)
        sch.parallel(sch.fuse(kv, it))


CPU_RULES: tuple[ScheduleRule, ...] = (
    GemmCpuRule(),
    GroupedGemmCpuRule(),
    SiluMulCpuRule(),
    RoundQ8RowsCpuRule(),
    CausalPrefillAttentionCpuRule(),
    *(AsWrittenCpuRule(family, factory) for family, factory in (
        ("embedding", "embedding_rows"),
        ("norm", "rms_norm_rows"),
        ("norm", "add_rms_norm_rows"),
        ("router", "router_topk_rows"),
        ("prefill_attention", "qk_norm_rope_kv_append_rows"),
        ("moe_chunk", "moe_combine_residual"),
        ("moe_chunk", "moe_sort"),
        ("chunk", "take_row"),
        ("chunk", "advance_chunk"),
        ("chunk", "advance_pos"),
    )),
)
