"""CUDA schedules of the int8-activation GEMV and quantizers (`kernels.gemv_q8`; the MoE forms:
`schedule.moe_q8`).

The GEMVs take the float GEMV's layout unchanged (`schedule.gemv`, `schedule.moe`): lanes along
K, rows per block, per-chunk quant words and activations in registers, warp allreduce. What
differs is read off `int8_view`: the dot block reads int32 words of 4 activations (xq: a Q4_K
chunk's 32 QS bytes and its 16 activation words are two 16-byte loads each), and there is no
x-sum block (the quantizer wrote the block sums).

The quantizer's stages (`gemv_q8.q8_1_stages`) run in six places: the kernel
`quantize_q8_1` (8 lanes a block of 32, one word each), the norm kernels `add_rms_norm_q8_1` and
`rms_norm_q8_1` (the same, in the norm's thread block), the split combine
`attention_combine_q8_1` (the same, in a head's thread block), the gate/up kernel's epilogue
(its 32 lanes over the 32 rows its thread block holds) and the normed Q/K/V kernels' prologue
(`quantize_normed_in_shared`: a thread a block of 32, each thread block all of its input). A
block's max and its sum of q are cross-thread reductions (shuffles), 127 / max a register of
every lane, the words a lane each: no division or branch per value
(bench/NOTES.md, "Session 15": the first form, a thread walking a block three times with a
division and two branches a value, took 10-12 µs a launch).

On the CPU the int8 kernels take `schedule.cpu`'s dot layout (row tasks across the cores, each
sub-block's word reduction split into vector lanes); the quantizer runs as written (~1 µs).
"""

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from tvm import s_tir
from tvm.s_tir.schedule import LoopRV, SBlockRV

from sparkinfer.kernels.gemv import GemvFormat
from sparkinfer.kernels.gemv_q8 import Q8_BLOCK, WORD, q8_format
from sparkinfer.kernels.use import KernelUse, factory_args
from sparkinfer.schedule.arch import ArchFacts
from sparkinfer.schedule.gemv import (
    GemvKnobs,
    GemvNormedCudaRule,
    GemvQkvCudaRule,
    GemvQkvNormedCudaRule,
    _GemvCudaRule,
    _schedule_rows,
    cache_chunk_in_registers,
    loops_below,
    normalize_in_shared,
    powers_of_two,
    schedule_gemv_qkv,
    stage_names,
)
from sparkinfer.schedule.cpu import CpuLaneKnobs, GemvCpuRule, GemvQkvCpuRule, LaneFormCpu, lane_sums, row_tasks
from sparkinfer.schedule.attention import merge_in_registers
from sparkinfer.schedule.norm import schedule_rms_norm
from sparkinfer.schedule.space import FixedRule, Knobs, ScheduleRule


def int8_view(ggml_type: int) -> GemvFormat:
    """The float GEMV's format of `ggml_type` as the int8 kernels' blocks look to a schedule: a
    sub-block's dot reduces over its sub/4 words (`sub`, and so `chunk`, count words), and there
    is no x-sum block (min=None)."""
    fmt = q8_format(ggml_type)
    return dataclasses.replace(fmt, sub=fmt.sub // WORD, min=None)


class GemvQ8CudaRule(_GemvCudaRule):
    """`gemv_q8`: the float GEMV's rule (same knobs, space and defaults) on the int8 blocks, the
    block headers read where the decoders use them (vector_header 0)."""

    family = "gemv_q8"
    factory = "gemv_q8"
    normed = False  # the activations are parameters (quantize_q8_1's), not the prologue's stages

    def vector_header(self, use: KernelUse) -> bool:
        return False  # not tried on the int8 blocks' layout

    def shape(self, use: KernelUse) -> tuple[int, int, int, int]:
        ggml_type, n, k = factory_args(use)
        return ggml_type, n, k, 1

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        assert isinstance(knobs, GemvKnobs)
        fmt = int8_view(self.shape(use)[0])
        x = x_words(self.normed)

        def cache(dot: SBlockRV, xsum: SBlockRV | None, it: LoopRV, part: LoopRV) -> None:
            cache_chunk_in_registers(sch, fmt, dot, xsum, it, "W", x, part)

        _schedule_rows(sch, fmt, knobs, cache, quantize_normed_in_shared if self.normed else None)


class GemvQ8NormedCudaRule(GemvQ8CudaRule):
    """`gemv_q8_normed`: `gemv_q8`'s rule (same knobs, space and defaults), each thread block
    first normalizing and quantizing h (`quantize_normed_in_shared`)."""

    factory = "gemv_q8_normed"
    normed = True
    shape = GemvNormedCudaRule.shape  # the same arguments: gemv_q8's and the norm's eps


class GemvQkvQ8CudaRule(GemvQkvCudaRule):
    """`gemv_qkv_q8`: the float Q/K/V kernel's rule (same knobs, space and defaults) on the int8
    blocks, the dot products reading the activation words xq."""

    family = "gemv_q8"
    factory = "gemv_qkv_q8"

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        assert isinstance(knobs, GemvKnobs)
        schedule_gemv_qkv(sch, int8_view(self.shape(use)[0]), knobs, x_words(False))


class GemvQkvQ8NormedCudaRule(GemvQkvNormedCudaRule):
    """`gemv_qkv_q8_normed`: the float normed Q/K/V rule's arguments, `gemv_qkv_q8`'s knobs, space
    and defaults, each thread block first normalizing and quantizing h
    (`quantize_normed_in_shared`)."""

    family = "gemv_q8"
    factory = "gemv_qkv_q8_normed"

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        assert isinstance(knobs, GemvKnobs)
        schedule_gemv_qkv(sch, int8_view(self.shape(use)[0]), knobs, x_words(True), quantize_normed_in_shared)


def x_words(normed: bool) -> str:
    """The buffer an int8 GEMV's dots read the activation words from: the parameter xq, or in
    the normed forms the prologue's stage words (`gemv_q8.normed_q8_1_stages`)."""
    return "words" if normed else "xq"


def quantize_normed_in_shared(sch: s_tir.Schedule, at: LoopRV, threads: tuple[Any, Any]) -> None:
    """The int8 normed forms' prologue (`gemv_q8.normed_q8_1_stages`) once per thread block,
    under its blockIdx loop `at`, on the block's (threadIdx.y, threadIdx.x) `threads`: x =
    rmsnorm(h) * w into shared memory as `schedule.gemv.normalize_in_shared` puts it; then
    each block of 32's max and 127 / max, a thread a block, into shared memory; then the words
    (a thread a word) and the scales and sums (a thread a block) into shared memory, where the
    dots read them. Every loop unrolled; a thread walks its block of 32 from a rotated start
    (`gemv_q8.q8_1_stages(max_once=True)`), so that a warp's loads hit 32 banks, not one. A
    thread block holds the whole of x (K/32 blocks of 32: 64 on the full-size model, at most its
    threads), so the quantizer's cross-lane reductions would buy nothing over a thread's 32
    loads from shared memory, which it issues at once."""

    def over_threads(name: str) -> LoopRV:
        """Stage `name`, under `at`, a thread an element (its reduction, if any, the thread's
        own loop), its loops unrolled (a thread's shared loads all issued at once): returns its
        threadIdx.x loop."""
        loop, *reduction = loops_below(sch, sch.get_sblock(name), at)
        each, ty, tx = sch.split(loop, [None, *threads])
        sch.bind(ty, "threadIdx.y")
        sch.bind(tx, "threadIdx.x")
        for serial in (each, *reduction):
            sch.unroll(serial)
        return tx

    stages = stage_names(sch)
    # the dots' reads, under `at` already (no sums where the weights have no mins), then what
    # they read, consumers first
    reads = [name for name in ("words", "scales", "sums") if name in stages]
    for name in reads:
        sch.compute_at(sch.get_sblock(name), at)
        over_threads(name)
    for name in [name for name in ("qsum", "inv", "amax") if name in stages]:
        stage = sch.get_sblock(name)
        sch.compute_at(stage, at)
        tx = over_threads(name)
        sch.set_scope(stage, 0, "shared")
        if name != "inv":
            # a reduction accumulates in a register, then one store: a shared accumulator
            # under the predicate of fewer blocks than threads asks for barriers inside it
            sch.reverse_compute_at(sch.cache_write(stage, 0, "local"), tx)
    for name in reads:
        sch.set_scope(sch.get_sblock(name), 0, "shared")
    normalize_in_shared(sch, at, threads)


def schedule_quantizer_epilogue(sch: s_tir.Schedule, block: LoopRV, lanes: Any) -> None:
    """`gemv_q8.q8_1_stages`' blocks under another kernel's thread block `block`, which holds one
    block of 32 values: the max and the sum of q over its threadIdx.x lanes (a warp's shuffles),
    127 / max, the scale and the sum in every lane, a word a lane. Every threadIdx.y row of
    threads does the same and writes the same values."""
    for name in ("amax", "inv", "qsum", "scales_v0", "scales_v1", "amax_q", "inv_q", "words"):
        sch.reverse_compute_at(sch.get_sblock(name), block)
    for name in ("amax", "qsum", "amax_q"):
        stage = sch.get_sblock(name)
        tx, inner = sch.split(sch.get_loops(stage)[-1], [lanes, None])
        sch.bind(tx, "threadIdx.x")
        sch.unroll(inner)
        sch.set_scope(stage, 0, "local")
    for name in ("inv", "inv_q"):
        sch.set_scope(sch.get_sblock(name), 0, "local")
    _, tx = sch.split(sch.get_loops(sch.get_sblock("words"))[-1], [None, lanes])
    sch.bind(tx, "threadIdx.x")


@dataclass(frozen=True)
class QuantizeKnobs(Knobs):
    """groups: blocks of 32 activations a thread block (QUANTIZER_LANES threads each)."""

    groups: Any


class QuantizeQ8CudaRule(ScheduleRule):
    target_kind = "cuda"
    family = "gemv_q8"
    factory = "quantize_q8_1"
    knobs_type = QuantizeKnobs

    def space(self, use: KernelUse, facts: ArchFacts) -> dict[str, tuple[Any, ...]]:
        most = facts.max_threads_per_block // QUANTIZER_LANES
        return {"groups": tuple(g for g in powers_of_two(most) if g >= 4)}

    def default(self, use: KernelUse, facts: ArchFacts) -> QuantizeKnobs:
        # 32 groups: 256 threads; 2048 activations (64 blocks of 32) are 2 thread blocks, the
        # 8 x 768 SiLU activations 6, so that more than one SM shares the work.
        return QuantizeKnobs(groups=32)

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        assert isinstance(knobs, QuantizeKnobs)
        schedule_quantizer(sch, knobs.groups, None)


QUANTIZER_LANES = Q8_BLOCK // WORD  # threads a block of 32 activations: one word (4 of them) each


def schedule_quantizer(sch: s_tir.Schedule, groups: Any, block: LoopRV | None) -> LoopRV:
    """`gemv_q8.q8_1_stages`' blocks: QUANTIZER_LANES threads (threadIdx.x) a block of 32
    activations, `groups` such blocks (threadIdx.y) a thread block. The scale and sum block
    first: the block's max and its sum of q are cross-thread reductions (4 values a lane, then
    shuffles); then the words, a lane each, after the block's max again (the same reduction,
    kept in registers beside its consumer). In thread blocks of its own, or (`block` given)
    under that loop of another kernel, after what that kernel's threads do. Returns the thread
    block loop (blockIdx.x)."""

    def lanes(name: str, at: LoopRV) -> None:
        """Stage `name` (a reduction over a block of 32) at loop `at`, over the lanes."""
        stage = sch.get_sblock(name)
        sch.compute_at(stage, at)
        tx, inner = sch.split(sch.get_loops(stage)[-1], [QUANTIZER_LANES, None])
        sch.bind(tx, "threadIdx.x")
        sch.unroll(inner)
        sch.set_scope(stage, 0, "local")

    def in_registers(name: str, at: LoopRV) -> None:
        """Stage `name` (a value a block of 32) at loop `at`, in every lane."""
        stage = sch.get_sblock(name)
        sch.compute_at(stage, at)
        sch.set_scope(stage, 0, "local")

    scales = sch.get_sblock("scales_v0")  # with scales_v1 in its loop nest
    if block is not None:
        for name in ("amax", "inv", "qsum", "scales_v0", "scales_v1"):
            sch.reverse_compute_at(sch.get_sblock(name), block)
        # the two outputs' blocks moved one at a time: one loop nest again
        sch.merge(sch.get_loops(scales)[-1], sch.get_loops(sch.get_sblock("scales_v1"))[-1])
    loops = sch.get_loops(scales)[0 if block is None else 1:]
    outer, ty = sch.split(sch.fuse(*loops) if len(loops) > 1 else loops[0], [None, groups])
    if block is None:
        sch.bind(outer, "blockIdx.x")
        block = outer
    sch.bind(ty, "threadIdx.y")
    lanes("qsum", ty)
    in_registers("inv", ty)
    lanes("amax", ty)
    # the words: under the same thread block
    for name in ("amax_q", "inv_q", "words"):
        sch.reverse_compute_at(sch.get_sblock(name), block)
    _, ty, tx = sch.split(sch.get_loops(sch.get_sblock("words"))[-1], [None, groups, QUANTIZER_LANES])
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    in_registers("inv_q", ty)
    lanes("amax_q", ty)
    return block


class AddRmsNormQ8CudaRule(QuantizeQ8CudaRule):
    """`add_rms_norm_q8_1`: the norm's schedule (`schedule.norm`: one block, thread i owning
    elements i, i + threads, ...) on `groups` x QUANTIZER_LANES threads, then the quantizer's in
    the same block (the quantizer's knob and default: 256 threads)."""

    factory = "add_rms_norm_q8_1"

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        assert isinstance(knobs, QuantizeKnobs)
        block = schedule_rms_norm(sch, QUANTIZER_LANES, rows=knobs.groups)
        schedule_quantizer(sch, knobs.groups, block)


class RmsNormQ8CudaRule(QuantizeQ8CudaRule):
    """`rms_norm_q8_1`: one thread block, as `rms_norm`'s, of the quantizer's layout (`groups`
    blocks of 32 at a time): the sum of squares an allreduce over its threads, 1 / rms a shared
    scalar (as in `add_rms_norm_q8_1`), then the quantizer."""

    factory = "rms_norm_q8_1"

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        assert isinstance(knobs, QuantizeKnobs)
        groups = knobs.groups
        sumsq = sch.get_sblock("sumsq")
        block = sch.add_unit_loop(sch.get_loops(sumsq)[0])  # above its reduction loop
        sch.bind(block, "blockIdx.x")
        sch.set_scope(sumsq, 0, "local")  # the allreduce leaves the sum in every thread
        _, ty, tx = sch.split(sch.get_loops(sumsq)[-1], [None, groups, QUANTIZER_LANES])
        sch.bind(ty, "threadIdx.y")
        sch.bind(tx, "threadIdx.x")
        inv_rms = sch.get_sblock("inv_rms")
        sch.reverse_compute_at(inv_rms, block)
        sch.set_scope(inv_rms, 0, "shared")
        schedule_quantizer(sch, groups, block)


class AttentionCombineQ8CudaRule(FixedRule):
    """`attention_combine_q8_1`: a thread block a head, which merges the head's splits into
    shared memory as `attention_combine` does, a thread a value (its S loads unrolled, the
    weights' max and sum once a thread), then quantizes them: QUANTIZER_LANES threads
    (threadIdx.x) for each of the head_dim / 32 blocks of 32 (threadIdx.y), each threadIdx.z
    (head_dim / (groups x lanes) of them) doing the same and writing the same values. Four values
    a thread (the quantizer's threads), one after another, left a memory round trip a value: 8.1
    against the float combine's 5.0 us a launch on an H100 (bench/NOTES.md "Session 17")."""

    target_kind = "cuda"
    family = "gemv_q8"
    factory = "attention_combine_q8_1"

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        blk = sch.get_sblock
        head_dim = int(sch.get(sch.get_loops(blk("merged"))[1]).extent)
        groups = head_dim // Q8_BLOCK
        out = blk("combine")
        # value = the thread's linear index (z, y, x): coalesced loads of o_part
        head, tz, ty, tx = sch.split(sch.get_loops(out)[0], [None, head_dim // (groups * QUANTIZER_LANES),
                                                              groups, QUANTIZER_LANES])
        sch.bind(head, "blockIdx.x")
        sch.bind(tz, "threadIdx.z")
        sch.bind(ty, "threadIdx.y")
        sch.bind(tx, "threadIdx.x")
        sch.set_scope(out, 0, "shared")
        merge_in_registers(sch, tx, tx)
        schedule_quantizer(sch, groups, head)


class Int8WeightsCpu:
    """For a float kernel's CPU rule (`schedule.cpu`, ahead of it in the bases): its int8 form,
    one weight format (the factory's first argument) seen through `int8_view`, a lane per word
    of both the codes and the activations (word_lanes)."""

    word_lanes: ClassVar[bool] = False

    def formats(self, use: KernelUse) -> tuple[GemvFormat, ...]:
        return (int8_view(factory_args(use)[0]),)


class GemvQ8CpuRule(Int8WeightsCpu, GemvCpuRule):
    family = "gemv_q8"
    factory = "gemv_q8"


class GemvQkvQ8CpuRule(Int8WeightsCpu, GemvQkvCpuRule):
    family = "gemv_q8"
    factory = "gemv_qkv_q8"


class GemvQ8LanesCpuRule(LaneFormCpu, GemvQ8CpuRule):
    """`gemv_q8_lanes`: row tasks, each row's lanes summed under it (`lane_sums`)."""

    factory = "gemv_q8_lanes"

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        schedule_gemv_lanes(sch, use, knobs)


class GemvQkvQ8LanesCpuRule(LaneFormCpu, GemvQkvQ8CpuRule):
    """`gemv_qkv_q8_lanes`: `gemv_q8_lanes`' layout over the rows of Wq, Wk and Wv, each row's
    select among them inlined."""

    factory = "gemv_qkv_q8_lanes"

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        sch.compute_inline(sch.get_sblock("W"))
        schedule_gemv_lanes(sch, use, knobs)


def schedule_gemv_lanes(sch: s_tir.Schedule, use: KernelUse, knobs: Knobs) -> None:
    """Row tasks of the lane form's `gemv` block, each row's lanes summed under it (`lane_sums`)."""
    assert isinstance(knobs, CpuLaneKnobs)
    rows, _ = sch.get_loops(sch.get_sblock("gemv"))
    row = row_tasks(sch, None, rows, knobs)
    lane_sums(sch, "gemv", row, knobs.unroll, has_mins(factory_args(use)[0]))


def has_mins(ggml_type: int) -> bool:
    """Whether the int8 kernels' weight format has mins (the lane form's _mins blocks)."""
    return q8_format(ggml_type).min is not None
