"""Hand-made GPU schedules for `sparkinfer.kernels.attention`.

paged_decode_attention, one thread block per (KV head, split) = (blockIdx.y, blockIdx.x), a warp
per stream (threadIdx.z); inside a warp the lanes go over the GQA group's heads and the head
dim, and the tile's tokens are serial:
  - lane (threadIdx.y, threadIdx.x) = (head group, dim lane): a head group is
    `heads_per_lane` heads of the G, served by NC = 32 * heads_per_lane / G lanes; dim lane c
    holds the 16-byte pieces c, c + NC, c + 2 NC, ... of a row (`k_vector` halves each), so a
    warp's load of one piece of a row is one contiguous NC * 16 bytes;
  - q (the lane's heads x its dims) and the accumulator (the same) stay in registers for the
    whole split; K and V rows of the tile's tokens are loaded into registers, all of a step's
    loads in flight before its math;
  - q . K: each lane sums its dims for its heads, then the NC lanes of a head group add their
    partial sums (a sub-warp shuffle reduction, log2 NC steps) and all of them hold the score;
  - the online softmax (tile max, rescale, p, tile sum) runs in every lane of the group on its
    heads, in registers: p never leaves the lane, and p . V is each lane's own dims;
  - nothing inside the tile loop is shared between warps: no barrier, so a warp whose tokens
    are past the context does its (clamped, masked) step and waits at the merge;
  - at the end each warp publishes its state to shared memory and the block merges the
    streams: a thread per head for the max and sum, a thread per (stream, head) for the streams' weights,
    all threads over (head, dim) for the output.
Why this shape (bench/NOTES.md, "Decode attention v2"): the step is a few tokens a warp, so
the work follows the context at short depth (the former token-per-lane step had 256 token
slots a block, 32 a warp, whatever the depth), and q lives in registers instead of being read
again from shared memory for every token.

paged_decode_attention_mma (decode_attention "mma") and paged_decode_attention_mma_merged (with
attention_merge "last_block"): come scheduled (their factory's docstrings).

attention_combine: one thread block per query head, a thread per head dim, the splits unrolled.

paged_decode_attention_merged: the attention as above, then thread 0 of each block counts it in
its KV head's `arrivals`, and the last block of the head merges the group's splits, a thread per
(head, dim) element computed as attention_combine's (bench/NOTES.md, "Decode: the last block merges").
"""

from dataclasses import dataclass
from typing import Any

from tvm import s_tir
from tvm.s_tir.schedule import LoopRV, SBlockRV

from sparkinfer.kernels.use import KernelUse, factory_args
from sparkinfer.schedule.arch import ArchFacts
from sparkinfer.schedule.gemv import WARP, powers_of_two
from sparkinfer.schedule.space import FixedRule, Knobs, ScheduleError, ScheduleRule


@dataclass(frozen=True)
class AttentionKnobs(Knobs):
    """heads_per_lane: query heads of the GQA group each lane serves (more: fewer half -> float
    converts per FMA, more shuffles per score); k_vector: halves per load of a K or V row
    piece (8: 16-byte loads)."""

    heads_per_lane: Any
    k_vector: Any


# Two heads a lane: measured on the SASS of the Qwen3-30B-A3B shape (G = 8; bench/NOTES.md,
# "Decode attention v2"): fewest instructions a token of 1, 2 and 4.
DEFAULT_HEADS_PER_LANE = 2


def _read_index(sch: s_tir.Schedule, block: SBlockRV, buffer: str) -> int:
    return next(i for i, r in enumerate(sch.get(block).reads) if r.source.name == buffer)


def _write_index(sch: s_tir.Schedule, block: SBlockRV, buffer: str) -> int:
    return next(i for i, r in enumerate(sch.get(block).writes) if r.source.name == buffer)


def _set_scope(sch: s_tir.Schedule, block: str, buffer: str, scope: str) -> None:
    b = sch.get_sblock(block)
    sch.set_scope(b, _write_index(sch, b, buffer), scope)


def _lanes_per_group(group: int, heads_per_lane: int) -> int:
    return WARP * heads_per_lane // group


class PagedDecodeAttentionCudaRule(ScheduleRule):
    """The module docstring. Needs the GQA group size G to divide 32."""

    target_kind = "cuda"
    family = "attention"
    factory = "paged_decode_attention"
    knobs_type = AttentionKnobs
    # The per-stream state is read and written by every tile step (an opaque recurrence), which
    # the schedule's dataflow checks reject although every transformation here keeps it.
    enable_check = False

    def space(self, use: KernelUse, facts: ArchFacts) -> dict[str, tuple[Any, ...]]:
        n_heads, n_kv_heads, head_dim = (int(a) for a in factory_args(use)[:3])
        group = n_heads // n_kv_heads
        heads = tuple(h for h in powers_of_two(group)
                      if group % h == 0 and WARP % (group // h) == 0
                      and head_dim % _lanes_per_group(group, h) == 0)
        lanes = min(_lanes_per_group(group, h) for h in heads) if heads else WARP
        return {"heads_per_lane": heads,
                "k_vector": tuple(v for v in powers_of_two(facts.vector_bytes // 2) if head_dim % (lanes * v) == 0)}

    def structural(self) -> tuple[str, ...]:
        return ("heads_per_lane", "k_vector")

    def default(self, use: KernelUse, facts: ArchFacts) -> AttentionKnobs:
        space = self.space(use, facts)
        n_heads, n_kv_heads, head_dim = (int(a) for a in factory_args(use)[:3])
        if not space["heads_per_lane"]:
            raise ScheduleError(f"kernel {use.name}: no warp layout for a GQA group of {n_heads // n_kv_heads} "
                                f"heads with head_dim {head_dim} (the group must divide 32 lanes, and the "
                                f"lanes a head group gets must divide head_dim)")
        heads = max(h for h in space["heads_per_lane"] if h <= DEFAULT_HEADS_PER_LANE)
        lanes = _lanes_per_group(n_heads // n_kv_heads, heads)
        return AttentionKnobs(heads_per_lane=heads,
                              k_vector=max(v for v in space["k_vector"] if head_dim % (lanes * v) == 0))

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        assert isinstance(knobs, AttentionKnobs)
        _schedule_paged_decode_attention(sch, knobs)


def _schedule_paged_decode_attention(sch: s_tir.Schedule, knobs: AttentionKnobs) -> None:
    blk = sch.get_sblock
    kv, s, w, g_loop = sch.get_loops(blk("state_init"))
    n_streams = int(sch.get(w).extent)
    group = int(sch.get(g_loop).extent)
    head_dim = int(sch.get(sch.get_loops(blk("score"))[-1]).extent)
    hpl, vector = int(knobs.heads_per_lane), int(knobs.k_vector)
    if group % hpl or WARP % (group // hpl):
        raise s_tir.ScheduleError(f"{hpl} heads a lane do not tile a group of {group} heads over a warp")
    n_groups, lanes = group // hpl, _lanes_per_group(group, hpl)
    if head_dim % (lanes * vector):
        raise s_tir.ScheduleError(f"head_dim {head_dim} does not split into {lanes} lanes of {vector}-half pieces")

    for block, buffer, scope in (
        ("state_init", "m", "local"),
        ("state_init", "l", "local"),
        ("acc_init", "acc", "local"),
        ("score", "score", "local"),
        ("tile_max", "tile_max", "local"),
        ("rescale", "alpha", "local"),
        ("p", "p", "local"),
        ("tile_sum", "tile_sum", "local"),
        ("pv", "pv", "local"),
        ("publish_state", "m_out", "shared"),
        ("publish_state", "l_out", "shared"),
        ("publish_acc", "acc_out", "shared"),
        ("merge_max", "m_all", "shared"),
        ("stream_weight", "stream_weight", "shared"),
        ("merge_sum", "l_all", "shared"),
        ("merge_out", "o_all", "local"),
    ):
        _set_scope(sch, block, buffer, scope)

    for block in ("merge_max", "stream_weight", "merge_sum", "merge_out", "o_part", "lse"):
        sch.reverse_compute_at(blk(block), s)
    sch.bind(kv, "blockIdx.y")
    sch.bind(s, "blockIdx.x")
    sch.bind(w, "threadIdx.z")

    def unroll(*loops: LoopRV) -> None:
        for loop in loops:
            sch.unroll(loop)

    def heads(loop: LoopRV) -> LoopRV:
        """g = (head group on threadIdx.y, head of the group); returns the latter. Per-head
        loops index register arrays: the caller unrolls it."""
        group_loop, head = sch.split(loop, [n_groups, hpl])
        sch.bind(group_loop, "threadIdx.y")
        return head

    def dims(loop: LoopRV) -> tuple[LoopRV, LoopRV]:
        """d = (piece, dim lane, element): dim lane c on threadIdx.x; returns (piece, element)."""
        piece, lane, element = sch.split(loop, [None, lanes, vector])
        sch.reorder(lane, piece, element)
        sch.bind(lane, "threadIdx.x")
        return piece, element

    # q, once a warp, into registers: the lane's heads x its dims, by 16-byte loads.
    step = blk("step")
    q_local = sch.cache_read(step, _read_index(sch, step, "q_rot"), "local")
    sch.compute_at(q_local, w)
    g, d = sch.get_loops(q_local)[-2:]
    head = heads(g)
    piece, element = dims(d)
    element, floats = sch.split(element, [None, 4])
    unroll(head, piece, element)
    sch.vectorize(floats)

    # The tile's rows: every token's pieces, all loads issued before any math.
    for name in ("gather_k", "gather_v"):
        sch.set_scope(blk(name), 0, "local")
        t, d = sch.get_loops(blk(name))[-2:]
        piece, element = dims(d)
        unroll(t, piece)
        sch.vectorize(element)

    # q . K: in-lane over the lane's dims, then across the group's dim lanes. Around a
    # cross-thread reduction TIR must not expand the loops itself (LowerThreadAllreduce then
    # sees the reduction buffer allocated twice): leave nvcc a `#pragma unroll`.
    score = blk("score")
    t, g, d = sch.get_loops(score)[-3:]
    group_loop, head = sch.split(g, [n_groups, hpl])
    sch.bind(group_loop, "threadIdx.y")
    piece, lane, element = sch.split(d, [None, lanes, vector])
    sch.reorder(group_loop, t, head, lane, piece, element)
    sch.bind(lane, "threadIdx.x")
    unroll(t, head, piece, element)
    for loop in (t, head):
        sch.annotate(loop, "pragma_unroll_explicit", 0)

    # The softmax, per head, in every lane of its group.
    for block in ("state_init", "rescale", "update_sum", "publish_state"):
        unroll(heads(sch.get_loops(blk(block))[-1]))
    for block in ("tile_max", "tile_sum"):
        g, t = sch.get_loops(blk(block))[-2:]
        unroll(heads(g), t)
    t, g = sch.get_loops(blk("p"))[-2:]
    sch.reorder(g, t)
    unroll(heads(g), t)

    # p . V: the lane's dims, tokens in-lane.
    g, d, t = sch.get_loops(blk("pv"))[-3:]
    head = heads(g)
    piece, element = dims(d)
    sch.reorder(t, head, piece, element)
    unroll(t, head, piece, element)
    for block in ("acc_init", "update_acc", "publish_acc"):
        g, d = sch.get_loops(blk(block))[-2:]
        head = heads(g)
        piece, element = dims(d)
        unroll(head, piece, element)

    # The merge of the streams.
    for block in ("merge_max", "merge_sum"):
        heads(sch.get_loops(blk(block))[2])
        # Accumulate in a register, store once: an accumulator in shared memory under the
        # thread predicate would need a barrier inside the condition.
        cache = sch.cache_write(blk(block), 0, "local")
        sch.reverse_compute_at(cache, sch.get_loops(blk(block))[-2])
    unroll(heads(sch.get_loops(blk("lse"))[2]))
    # Each stream's weight once a head, not once an output element; a thread each (TVM may
    # compute it in place of m_out, which redundant copies in other lanes would then reread).
    _, stream, group_loop, lane = sch.split(sch.fuse(*sch.get_loops(blk("stream_weight"))[-2:]),
                                            [None, n_streams, n_groups, lanes])
    sch.bind(stream, "threadIdx.z")
    sch.bind(group_loop, "threadIdx.y")
    sch.bind(lane, "threadIdx.x")
    o_part = blk("o_part")
    g, d = sch.get_loops(o_part)[-2:]
    group_loop, head = sch.split(g, [n_groups, hpl])
    sch.bind(group_loop, "threadIdx.y")
    _, stream, lane = sch.split(sch.fuse(head, d), [None, n_streams, lanes])
    sch.bind(stream, "threadIdx.z")
    sch.bind(lane, "threadIdx.x")
    sch.compute_at(blk("merge_out"), sch.get_loops(o_part)[-1])


class PagedDecodeAttentionMergedCudaRule(PagedDecodeAttentionCudaRule):
    """`paged_decode_attention_merged`: the attention as PagedDecodeAttentionCudaRule lays it
    out (same knobs), then in the same thread block the release (every thread), the arrival
    (thread 0) and, in the last block of a KV head, the combine of its head group: a thread per
    (head, dim) element, the splits unrolled, as AttentionCombineCudaRule computes each element."""

    factory = "paged_decode_attention_merged"

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        assert isinstance(knobs, AttentionKnobs)
        _schedule_paged_decode_attention(sch, knobs)
        _schedule_last_block_merge(sch, knobs)


def _schedule_last_block_merge(sch: s_tir.Schedule, knobs: AttentionKnobs) -> None:
    blk = sch.get_sblock
    # state_init's loops, as the attention's schedule left them: KV head, split, stream, head group, head
    _, split, stream, head_group = sch.get_loops(blk("state_init"))[:4]
    n_streams, n_groups = int(sch.get(stream).extent), int(sch.get(head_group).extent)
    hpl = int(knobs.heads_per_lane)
    for block in ("release", "arrive", "is_last", "merge"):
        sch.reverse_compute_at(blk(block), split)
    # The count is one thread's, (0, 0, 0): per thread axis a loop of one split by the axis's
    # extent, whose inner loop bound to the axis carries the guard threadIdx < 1 (a loop of one
    # bound as it is would be run by every thread).
    arrive = blk("arrive")
    lanes = _lanes_per_group(n_groups * hpl, hpl)
    for axis, extent in (("threadIdx.x", lanes), ("threadIdx.y", n_groups), ("threadIdx.z", n_streams)):
        _, thread = sch.split(sch.add_unit_loop(arrive), [None, extent])
        sch.bind(thread, axis)
    sch.set_scope(arrive, _write_index(sch, arrive, "last"), "shared")
    # Every thread's copy in a register, the merge loop's extent: TVM's barrier placement
    # (ThreadSync) fails on a shared load in a loop extent
    sch.set_scope(blk("is_last"), 0, "local")
    # The combine over the block's threads, (stream, head group, dim lane) as the attention has them.
    g, d = sch.get_loops(blk("combine"))[-2:]
    _, z, y, x = sch.split(sch.fuse(g, d), [None, n_streams, n_groups, lanes])
    for loop, axis in ((z, "threadIdx.z"), (y, "threadIdx.y"), (x, "threadIdx.x")):
        sch.bind(loop, axis)
    # As AttentionCombineCudaRule: each thread computes its element's max and sum itself, and
    # the split loops are unrolled so that their loads go out together.
    for block in ("merged", "weight_sum", "lse_max"):
        sch.compute_at(blk(block), x)
        sch.set_scope(blk(block), 0, "local")
        sch.unroll(sch.get_loops(blk(block))[-1])


class PagedDecodeAttentionMmaCudaRule(FixedRule):
    """`attention.paged_decode_attention_mma` (the step variant decode_attention "mma"): the factory
    writes the kernel already scheduled (threads, mma.sync and ldmatrix on registers, shuffles;
    its docstring says why), so the rule leaves it as it is."""

    target_kind = "cuda"
    family = "attention"
    factory = "paged_decode_attention_mma"

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        pass


class PagedDecodeAttentionMmaMergedCudaRule(PagedDecodeAttentionMmaCudaRule):
    """`attention.paged_decode_attention_mma_merged` (decode_attention "mma" with attention_merge
    "last_block"): comes scheduled too."""

    factory = "paged_decode_attention_mma_merged"


class AttentionCombineCudaRule(FixedRule):
    """A block per head, a thread per head dim, the splits serial."""

    target_kind = "cuda"
    family = "attention"
    factory = "attention_combine"

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        _schedule_attention_combine(sch)


def _schedule_attention_combine(sch: s_tir.Schedule) -> None:
    blk = sch.get_sblock
    out = blk("combine")
    (i,) = sch.get_loops(out)
    head_dim = int(sch.get(sch.get_loops(blk("merged"))[1]).extent)
    head, dim = sch.split(i, [None, head_dim])
    sch.bind(head, "blockIdx.x")
    sch.bind(dim, "threadIdx.x")
    merge_in_registers(sch, dim, dim)


def merge_in_registers(sch: s_tir.Schedule, value: LoopRV, thread: LoopRV) -> None:
    """The combine's stages (`attention.combine_splits`) under its output's loops: `merged` in
    registers at loop `value` (a thread's one value, or its loop over its values), the splits'
    weight max and sum at loop `thread`, once a thread. Every thread of the head computes that
    (S-term) max and sum itself: cheaper than a shared-memory round trip and a barrier. The split
    loops unrolled: a thread's S loads of each step are independent, so they go out together
    instead of one L2 round trip an iteration (3 x 32 dependent trips at 32 splits: the combine
    took 6.2 us a launch on an H100, bench/NOTES.md "Session 10")."""
    blk = sch.get_sblock
    sch.compute_at(blk("merged"), value)
    sch.set_scope(blk("merged"), 0, "local")
    for block in ("weight_sum", "lse_max"):
        sch.compute_at(blk(block), thread)
        sch.set_scope(blk(block), 0, "local")
    for block in ("lse_max", "weight_sum", "merged"):
        sch.unroll(sch.get_loops(blk(block))[-1])
