"""CPU schedules (LLVM) for every kernel family: the CPU is a target of its own, not the
unscheduled build.

Dequantizing dot products (gemv, gemv_qkv and the fused MoE kernels) share one
layout:
  - rows are cut into tasks of `rows_per_task` rows, run in parallel across the cores (TVM's
    thread pool; the MoE/expert slot is fused into the task loop), unless the kernel is too
    small to pay for a fork and join (`parallel` = 0);
  - a row's sub-block dot products are computed per chunk, right where the row's sum uses
    them (no [n, chunks, parts] intermediate in memory);
  - each sub-block's reduction over its weights is split into `vector` lanes (rfactor), the
    lane loop vectorized, a lane per word of the weight view: `vector` consecutive words are
    one vector load and each byte position in them one vector shift and mask, against x
    copied once a call into the matching order (`vectorized_dots`);
  - the chunk loop is unrolled up to `unroll` statements.
The x sums of the K-quants (a few hundred adds) stay outside, computed once.
The int8 kernels' lane form (`kernels.gemv_q8.q8_lane_sum`) keeps the row tasks and the unroll,
and has no lanes to choose: its LANES float sums are one vector loop inside the row's chunk
loop, each block's int32 products one vector of it (`lane_sums`).

Attention parallelizes its (KV head, split) streams and vectorizes over the head dim; the
norms and the embedding vectorize their element loops; RoPE rotates a head dim of every head
at once; the router, the split combine and sampling are a few microseconds each and keep the
loop nests their factories wrote.

Tunable knobs only feed split factors and annotations (space.py); `parallel` is structural.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from tvm import s_tir
from tvm.s_tir.schedule import LoopRV, SBlockRV

from sparkinfer.kernels.gemv import GemvFormat, gemv_format
from sparkinfer.kernels.use import KernelUse, factory_args
from sparkinfer.schedule.arch import ArchFacts, floor_pow2
from sparkinfer.schedule.gemv import DEFAULT_UNROLL, UNROLL_STEPS, loops_below, powers_of_two, x_buffer
from sparkinfer.schedule.space import FixedRule, Knobs, ScheduleRule

# Multiply-adds below which a kernel runs on one core: a parallel region's fork and join
# costs a few microseconds, about what 64 K dequantizing multiply-adds take on one core.
PARALLEL_MIN_MACS = 1 << 16
# Row tasks per core the default aims at: enough to even out cores that run at different
# speeds, few enough that a task's rows amortize its dispatch.
TASKS_PER_CORE = 4
ROWS_PER_TASK = powers_of_two(64)
# Lanes (words) of a sub-block reduction: 8 measured best for Q4_K and Q6_K on the AVX-512 dev
# machine (bench/NOTES.md, "Word lanes"); 8 is also every K-quant's words per sub-block.
DEFAULT_DOT_LANES = 8


@dataclass(frozen=True)
class CpuDotKnobs(Knobs):
    """parallel: 1 runs the row tasks across the cores, 0 on one (structural); rows_per_task:
    rows a parallel task computes; vector: lanes of a sub-block's reduction (vectorized);
    unroll: explicit-unroll budget (statements) of a row's chunk loop."""

    parallel: int
    rows_per_task: Any
    vector: Any
    unroll: Any


@dataclass(frozen=True)
class CpuLaneKnobs(Knobs):
    """The int8 lane form's (`lane_sums`): parallel, rows_per_task and unroll as CpuDotKnobs';
    its lanes are fixed, a word of each block of 32 (kernels.gemv_q8.LANES)."""

    parallel: int
    rows_per_task: Any
    unroll: Any


def max_dot_lanes(formats: tuple[GemvFormat, ...], facts: ArchFacts, per_word: bool) -> int:
    """Lanes dividing every sub-block's words (its weights where not `per_word`), up to the
    SIMD register's floats."""
    return min([facts.vector_bytes // 4, *(f.sub // (word_weights(f) if per_word else 1) for f in formats)])


def dot_space(formats: tuple[GemvFormat, ...], facts: ArchFacts, per_word: bool) -> dict[str, tuple[Any, ...]]:
    """Lanes: powers of two up to max_dot_lanes."""
    lanes = max_dot_lanes(formats, facts, per_word)
    return {"parallel": (0, 1), "rows_per_task": ROWS_PER_TASK, "vector": powers_of_two(lanes),
            "unroll": UNROLL_STEPS}


def default_dot_knobs(formats: tuple[GemvFormat, ...], rows: int, macs: int, facts: ArchFacts,
                      per_word: bool) -> CpuDotKnobs:
    """Parallel when the kernel has PARALLEL_MIN_MACS to share; tasks: TASKS_PER_CORE per core."""
    parallel = int(facts.cores > 1 and macs >= PARALLEL_MIN_MACS)
    per_task = floor_pow2(max(1, rows // (facts.cores * TASKS_PER_CORE)))
    lanes = min(DEFAULT_DOT_LANES, max_dot_lanes(formats, facts, per_word))
    return CpuDotKnobs(parallel=parallel, rows_per_task=min(per_task, ROWS_PER_TASK[-1]),
                       vector=lanes, unroll=DEFAULT_UNROLL)


def word_weights(fmt: GemvFormat) -> int:
    """Weights one word of the format's weight view holds: a quant byte each (Q4_K/Q5_K's two
    nibble sub-blocks are separate dots), one weight a word for the float types."""
    return fmt.word_bytes if fmt.block_size > 1 else 1


def vectorized_dots(sch: s_tir.Schedule, dot: SBlockRV, chunk_loop: LoopRV, vector: Any,
                    per_word: int = 1, x_name: str | None = None) -> None:
    """Compute `dot` (a sub-block dot product block) under `chunk_loop`, its reduction over the
    sub-block's weights split into `vector` lanes (rfactor), the lane loop vectorized.

    Lane i takes the `per_word` weights of word i of each `vector`-word stretch: the lanes'
    words are one contiguous vector load and each byte of them one vector shift and mask
    (lanes over consecutive bytes would load their words lane by lane). Where `per_word` > 1,
    x (the buffer `x_name`) is read through a copy made once a call with the bytes' positions
    outermost, x[.., w * per_word + b] at x_lanes[.., b, w], so the lanes' x are contiguous too."""
    *_, weights = sch.get_loops(dot)
    _, lanes, _ = sch.split(weights, [None, vector, per_word])
    lanes_block = sch.rfactor(lanes, factor_axis=0)
    # Unit loops stay, so the loop structure is the same for every lane count.
    sch.compute_at(dot, chunk_loop, preserve_unit_loops=True)
    sch.compute_at(lanes_block, chunk_loop, preserve_unit_loops=True)
    lane, *rest = loops_below(sch, lanes_block, chunk_loop)
    sch.reorder(*rest, lane)
    sch.vectorize(lane)
    if per_word > 1 and x_name is not None:
        read = next(i for i, r in enumerate(sch.get(lanes_block).reads) if r.source.name == x_name)
        x_lanes = sch.cache_read(lanes_block, read, "global", consumer_blocks=[lanes_block])
        sch.transform_layout(x_lanes, ("write", 0), lambda *i: (*i[:-1], i[-1] % per_word, i[-1] // per_word))


def lane_sums(sch: s_tir.Schedule, name: str, row: LoopRV, unroll: Any, mins: bool) -> None:
    """Compute the lane form's {name}_lanes and, where the format has `mins`, {name}_mins
    (`kernels.gemv_q8.q8_lane_sum`) under `row`, the loop over a task's rows (`name` already
    there, or the root block): the lanes' loop inside their reduction over (slot,) chunk and
    block, vectorized, so that each block's LANES dp4a are one vector op and the float sums stay
    in one vector register across the row; the chunk loops unrolled up to `unroll` statements."""
    lanes = sch.get_sblock(f"{name}_lanes")
    sch.compute_at(lanes, row, preserve_unit_loops=True)
    reductions = sum(1 for v in sch.get(lanes).iter_vars if v.iter_type == v.CommReduce)
    loops = loops_below(sch, lanes, row)
    lane, reduction = loops[-reductions - 1], loops[-reductions:]
    sch.reorder(*reduction, lane)
    sch.vectorize(lane)
    unroll_loop(sch, reduction[-2], unroll)
    if mins:
        block = sch.get_sblock(f"{name}_mins")
        sch.compute_at(block, row, preserve_unit_loops=True)
        unroll_loop(sch, sch.get_loops(block)[-2], unroll)


def unroll_loop(sch: s_tir.Schedule, loop: LoopRV, unroll: Any) -> None:
    sch.annotate(loop, "pragma_auto_unroll_max_step", unroll)
    sch.annotate(loop, "pragma_unroll_explicit", 1)


def row_tasks(sch: s_tir.Schedule, slot: LoopRV | None, rows: LoopRV, knobs: CpuDotKnobs | CpuLaneKnobs) -> LoopRV:
    """Cut `rows` into tasks (fused with the expert `slot` loop where there is one), run in
    parallel if knobs.parallel; returns the loop over a task's rows."""
    task, row = sch.split(rows, [None, knobs.rows_per_task])
    outer = task if slot is None else sch.fuse(slot, task)
    if knobs.parallel:
        sch.parallel(outer)
    return row


def reduction_chunk_loop(sch: s_tir.Schedule, block: SBlockRV) -> LoopRV:
    """The chunk loop of a dequantizing reduction block (its loops end in chunk, part)."""
    return sch.get_loops(block)[-2]


class _CpuDotRule(ScheduleRule):
    target_kind = "cpu"
    knobs_type = CpuDotKnobs
    # Lanes over the weight view's words (vectorized_dots' per_word); the int8 kernels, whose
    # dots read words of four codes against words of four int8 x, keep a lane per word of both.
    word_lanes: ClassVar[bool] = True

    @abstractmethod
    def formats(self, use: KernelUse) -> tuple[GemvFormat, ...]: ...

    @abstractmethod
    def size(self, use: KernelUse) -> tuple[int, int]:
        """(rows the tasks split, multiply-adds of the kernel)."""

    def space(self, use: KernelUse, facts: ArchFacts) -> dict[str, tuple[Any, ...]]:
        return dot_space(self.formats(use), facts, self.word_lanes)

    def structural(self) -> tuple[str, ...]:
        return ("parallel",)

    def default(self, use: KernelUse, facts: ArchFacts) -> CpuDotKnobs:
        return default_dot_knobs(self.formats(use), *self.size(use), facts, self.word_lanes)

    def dots(self, sch: s_tir.Schedule, dot: SBlockRV, chunk_loop: LoopRV, knobs: CpuDotKnobs,
             fmt: GemvFormat, x_name: str) -> None:
        """vectorized_dots of `dot`, lanes over words where the rule has word_lanes."""
        per_word = word_weights(fmt) if self.word_lanes else 1
        vectorized_dots(sch, dot, chunk_loop, knobs.vector, per_word, x_name)


class LaneFormCpu:
    """For an int8 kernel's CPU rule (ahead of it in the bases): the space and default of its
    lane form (`kernels.gemv_q8.q8_lane_sum`, scheduled by `lane_sums`), which has no lanes knob."""

    knobs_type = CpuLaneKnobs

    def space(self, use: KernelUse, facts: ArchFacts) -> dict[str, tuple[Any, ...]]:
        return {"parallel": (0, 1), "rows_per_task": ROWS_PER_TASK, "unroll": UNROLL_STEPS}

    def default(self, use: KernelUse, facts: ArchFacts) -> CpuLaneKnobs:
        assert isinstance(self, _CpuDotRule)
        dot = default_dot_knobs(self.formats(use), *self.size(use), facts, self.word_lanes)
        return CpuLaneKnobs(parallel=dot.parallel, rows_per_task=dot.rows_per_task, unroll=dot.unroll)


class _GemvCpuRule(_CpuDotRule):
    """The normed forms' prologue (sum of squares and x) stays ahead of the row tasks, once a
    call; the residual form's add is a loop after them."""

    family = "gemv"
    normed: ClassVar[bool] = False

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        assert isinstance(knobs, CpuDotKnobs)
        gemv = sch.get_sblock("gemv")
        *lead, rows, chunk, _ = sch.get_loops(gemv)
        row_tasks(sch, lead[0] if lead else None, rows, knobs)
        self.dots(sch, sch.get_sblock("dot"), chunk, knobs, self.formats(use)[0], x_buffer(self.normed))
        unroll_loop(sch, chunk, knobs.unroll)

    def formats(self, use: KernelUse) -> tuple[GemvFormat, ...]:
        return (gemv_format(factory_args(use)[0]),)


class GemvCpuRule(_GemvCpuRule):
    factory = "gemv"

    def size(self, use: KernelUse) -> tuple[int, int]:
        _, n, k = factory_args(use)
        return n, n * k


class GemvQkvCpuRule(_GemvCpuRule):
    factory = "gemv_qkv"

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        sch.compute_inline(sch.get_sblock("W"))  # a row's select among Wq, Wk and Wv
        super().apply(sch, use, knobs, facts)

    def size(self, use: KernelUse) -> tuple[int, int]:
        _, n_q, n_k, n_v, k = factory_args(use)
        return n_q + n_k + n_v, (n_q + n_k + n_v) * k


class GemvNormedCpuRule(GemvCpuRule):
    factory = "gemv_normed"
    normed = True

    def size(self, use: KernelUse) -> tuple[int, int]:
        _, n, k, _ = factory_args(use)
        return n, n * k


class GemvResidualCpuRule(GemvCpuRule):
    factory = "gemv_residual"


class GemvQkvNormedCpuRule(GemvQkvCpuRule):
    factory = "gemv_qkv_normed"
    normed = True

    def size(self, use: KernelUse) -> tuple[int, int]:
        _, n_q, n_k, n_v, k, _ = factory_args(use)
        return n_q + n_k + n_v, (n_q + n_k + n_v) * k


class MoeGateUpSiluCpuRule(_CpuDotRule):
    """Tasks over (slot, rows of act); a row's gate and up sums computed where act uses them.
    The routed form's prologue (top-k, norm) stays ahead of the tasks, as its factory wrote it."""

    family = "moe"
    factory = "moe_gate_up_silu"
    normed: ClassVar[bool] = False

    def formats(self, use: KernelUse) -> tuple[GemvFormat, ...]:
        type_gate, type_up, *_ = factory_args(use)
        return gemv_format(type_gate), gemv_format(type_up)

    def size(self, use: KernelUse) -> tuple[int, int]:
        _, _, _, n_used, inter, hidden, *_ = factory_args(use)
        return inter, 2 * n_used * inter * hidden

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        assert isinstance(knobs, CpuDotKnobs)
        slot, rows = sch.get_loops(sch.get_sblock("act"))
        row = row_tasks(sch, slot, rows, knobs)
        for name, fmt in zip(("gate", "up"), self.formats(use)):
            block = sch.get_sblock(name)
            sch.compute_at(block, row, preserve_unit_loops=True)
            chunk = reduction_chunk_loop(sch, block)
            self.dots(sch, sch.get_sblock(f"{name}_dot"), chunk, knobs, fmt, x_buffer(self.normed))
            unroll_loop(sch, chunk, knobs.unroll)


class MoeGateUpSiluRoutedCpuRule(MoeGateUpSiluCpuRule):
    factory = "moe_gate_up_silu_routed"
    normed = True


class MoeDownResidualCpuRule(_CpuDotRule):
    """Tasks over rows of h_out; a row's sum over (slot, chunk) computed where h_out uses it."""

    family = "moe"
    factory = "moe_down_residual"

    def formats(self, use: KernelUse) -> tuple[GemvFormat, ...]:
        return (gemv_format(factory_args(use)[0]),)

    def size(self, use: KernelUse) -> tuple[int, int]:
        _, _, n_used, hidden, inter = factory_args(use)
        return hidden, n_used * hidden * inter

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        assert isinstance(knobs, CpuDotKnobs)
        (rows,) = sch.get_loops(sch.get_sblock("h_out"))
        row = row_tasks(sch, None, rows, knobs)
        down = sch.get_sblock("down")
        sch.compute_at(down, row, preserve_unit_loops=True)
        chunk = reduction_chunk_loop(sch, down)
        self.dots(sch, sch.get_sblock("down_dot"), chunk, knobs, self.formats(use)[0], "act")
        unroll_loop(sch, chunk, knobs.unroll)


@dataclass(frozen=True)
class CpuVectorKnobs(Knobs):
    """vector: lanes of the vectorized element loop."""

    vector: Any


class _ElementwiseCpuRule(ScheduleRule):
    """Vectorizes the innermost loop of the given blocks (each over the hidden size)."""

    target_kind = "cpu"
    knobs_type = CpuVectorKnobs
    blocks: tuple[str, ...] = ()

    @abstractmethod
    def length(self, use: KernelUse) -> int:
        """The extent of the loops vectorized."""

    def space(self, use: KernelUse, facts: ArchFacts) -> dict[str, tuple[Any, ...]]:
        return {"vector": tuple(v for v in powers_of_two(2 * facts.vector_bytes // 4) if self.length(use) % v == 0)}

    def default(self, use: KernelUse, facts: ArchFacts) -> CpuVectorKnobs:
        return CpuVectorKnobs(vector=max(v for v in self.space(use, facts)["vector"] if v <= facts.vector_bytes // 4))

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        assert isinstance(knobs, CpuVectorKnobs)
        for name in self.blocks:
            loop = sch.get_loops(sch.get_sblock(name))[-1]
            _, lanes = sch.split(loop, [None, knobs.vector])
            sch.vectorize(lanes)


class RmsNormCpuRule(_ElementwiseCpuRule):
    family = "norm"
    factory = "rms_norm"
    blocks = ("norm",)

    def length(self, use: KernelUse) -> int:
        return int(factory_args(use)[0])


class AddRmsNormCpuRule(_ElementwiseCpuRule):
    family = "norm"
    factory = "add_rms_norm"
    blocks = ("residual", "norm")

    def length(self, use: KernelUse) -> int:
        return int(factory_args(use)[0])


class EmbeddingCpuRule(_ElementwiseCpuRule):
    family = "embedding"
    factory = "embedding"
    blocks = ("embedding",)

    def length(self, use: KernelUse) -> int:
        return int(factory_args(use)[2])


# Lanes of attention's q . K reduction over the head dim: 8 measured best on the AVX-512 dev
# machine (16 lanes: 27 us a call at depth 128, 8: 19 us; bench/NOTES.md, "CPU attention").
ATTENTION_DOT_LANES = 8


class PagedDecodeAttentionCpuRule(ScheduleRule):
    """The (KV head, split) streams in parallel, each owning its state, p and accumulator
    slices; inside a tile step every loop over the head dim is a vector loop: the K and V rows'
    gathers (one f16 -> f32 vector convert), the p . V sum (over tokens, outside the vector of
    head dims it accumulates) and the accumulator's rescale; q . K splits its reduction over
    the head dim into `vector` lanes (rfactor), summed across lanes once a score."""

    target_kind = "cpu"
    family = "attention"
    factory = "paged_decode_attention"
    knobs_type = CpuVectorKnobs
    enable_check = False  # the per-stream recurrences, as in the CUDA rule

    def space(self, use: KernelUse, facts: ArchFacts) -> dict[str, tuple[Any, ...]]:
        head_dim = int(factory_args(use)[2])
        return {"vector": tuple(v for v in powers_of_two(facts.vector_bytes // 4) if head_dim % v == 0)}

    def default(self, use: KernelUse, facts: ArchFacts) -> CpuVectorKnobs:
        return CpuVectorKnobs(vector=max(v for v in self.space(use, facts)["vector"] if v <= ATTENTION_DOT_LANES))

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        assert isinstance(knobs, CpuVectorKnobs)
        blk = sch.get_sblock
        kv, split, *_ = sch.get_loops(blk("state_init"))
        sch.parallel(sch.fuse(kv, split))
        for name in ("gather_k", "gather_v", "update_acc"):
            sch.vectorize(sch.get_loops(blk(name))[-1])
        *_, head_dim = sch.get_loops(blk("score"))
        _, lanes = sch.split(head_dim, [None, knobs.vector])
        lanes_block = sch.rfactor(lanes, factor_axis=0)
        *_, dims, lane = sch.get_loops(lanes_block)
        sch.reorder(dims, lane)
        sch.vectorize(lane)
        pv = blk("pv")
        head, dim, token = sch.get_loops(pv)[-3:]
        sch.decompose_reduction(pv, head)
        sch.reorder(token, dim)
        sch.vectorize(dim)


class QkNormRopeKvAppendCpuRule(FixedRule):
    """rope.qk_norm_rope_kv_append: each head dim's angle, cos and sin are the same for every
    head, so the rotation loops over the head dims outside and the heads unrolled inside, where
    LLVM computes them once a dim instead of once a (head, dim) (pow, cos and sin are libm calls):
    11.5 -> 2.1 us a call at 8 + 2 heads of 64 on a 2-core EPYC (bench/NOTES.md, "Session 26")."""

    target_kind = "cpu"
    family = "rope"
    factory = "qk_norm_rope_kv_append"

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        head, dim = sch.get_loops(sch.get_sblock("rope"))
        sch.reorder(dim, head)
        sch.unroll(head)


class SampleCandidatesCpuRule(FixedRule):
    """sampling.sample_candidates: its slices' blocks in parallel across the cores (each a
    block-wide top-k of ~30 K compare-exchanges when the draw uses the candidates)."""

    target_kind = "cpu"
    family = "sampling"
    factory = "sample_candidates"
    enable_check = False  # the top-k's steps read and write the same keys in place

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        sch.parallel(sch.get_loops(sch.get_sblock("slice"))[0])


class AsWrittenCpuRule(FixedRule):
    """A kernel LLVM builds as its factory wrote it: a few microseconds, or a small part of its
    step's time. One instance per factory it serves (the registry lists them)."""

    target_kind = "cpu"

    def __init__(self, family: str, factory: str) -> None:
        self.family, self.factory = family, factory

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        del sch, use, knobs, facts
