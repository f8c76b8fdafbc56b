"""Hand-made GPU schedules for `sparkinfer.kernels.attention`.

paged_decode_attention, one thread block per (KV head, split) = (blockIdx.y, blockIdx.x):
  - stream w is warp w (threadIdx.y); its state (m, l and a D/32-wide slice of acc per lane
    for each of the G heads) lives in registers for the whole split;
  - a tile step first issues all its loads: lane t loads token t's K row (D halves, by 16
    bytes), lane i its slice of every V row of the tile (8 bytes at D = 128), into registers;
  - q . K: lane t forms its token's G dot products in-thread; q is staged in shared memory
    once per block and read as warp-wide 16-byte broadcasts;
  - tile max and tile sum: warp-shuffle allreduces over the tile's lanes;
  - p goes through shared memory (a slice per warp) to p . V, where lane i owns head dims
    [i*D/32, (i+1)*D/32), so a warp reads each V row once, coalesced;
  - at the end each warp publishes its state to shared memory and the block merges the
    streams: one thread per head for the max and sum, all threads over (head, dim) for the
    output.
The tile loop runs the same number of times in every warp (its count depends on the split
only), so the barriers TVM places around the shared p are reached by all threads.

Ideas not done yet: q . K by lanes over D with a transpose-reduce instead of q broadcasts
(fewer shared loads); prefetching the next tile's rows (long contexts run several steps);
fp16 p . V with half2 math; splits chosen from the context length.

attention_combine: one thread block per query head, a thread per head dim, splits serial.
"""

from dataclasses import dataclass
from typing import Any

from tvm import s_tir
from tvm.s_tir.schedule import LoopRV, SBlockRV

from sparkinfer.model.qwen3moe import KernelUse
from sparkinfer.schedule.arch import ArchFacts
from sparkinfer.schedule.gemv import WARP, powers_of_two
from sparkinfer.schedule.space import FixedRule, Knobs, ScheduleRule


@dataclass(frozen=True)
class AttentionKnobs(Knobs):
    """k_vector: halves per load of a K row (8: 16-byte loads); q_vector: floats per load of
    q from shared memory (4: 16-byte broadcasts)."""

    k_vector: Any
    q_vector: Any


def _read_index(sch: s_tir.Schedule, block: SBlockRV, buffer: str) -> int:
    return next(i for i, r in enumerate(sch.get(block).reads) if r.source.name == buffer)


def _write_index(sch: s_tir.Schedule, block: SBlockRV, buffer: str) -> int:
    return next(i for i, r in enumerate(sch.get(block).writes) if r.source.name == buffer)


def _set_scope(sch: s_tir.Schedule, block: str, buffer: str, scope: str) -> None:
    b = sch.get_sblock(block)
    sch.set_scope(b, _write_index(sch, b, buffer), scope)


class PagedDecodeAttentionCudaRule(ScheduleRule):
    """tile = 32, head_dim a multiple of 32 (the module docstring)."""

    target_kind = "cuda"
    family = "attention"
    factory = "paged_decode_attention"
    knobs_type = AttentionKnobs
    # The per-stream state is read and written by every tile step (an opaque recurrence), which
    # the schedule's dataflow checks reject although every transformation here keeps it.
    enable_check = False

    def space(self, use: KernelUse, facts: ArchFacts) -> dict[str, tuple[Any, ...]]:
        return {"k_vector": powers_of_two(facts.vector_bytes // 2),
                "q_vector": powers_of_two(facts.vector_bytes // 4)}

    def default(self, use: KernelUse, facts: ArchFacts) -> AttentionKnobs:
        return AttentionKnobs(k_vector=facts.vector_bytes // 2, q_vector=facts.vector_bytes // 4)

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        assert isinstance(knobs, AttentionKnobs)
        _schedule_paged_decode_attention(sch, knobs)


def _schedule_paged_decode_attention(sch: s_tir.Schedule, knobs: AttentionKnobs) -> None:
    blk = sch.get_sblock
    kv, s, w, _ = sch.get_loops(blk("state_init"))
    n_streams = int(sch.get(w).extent)
    tile = int(sch.get(sch.get_loops(blk("score"))[-3]).extent)
    head_dim = int(sch.get(sch.get_loops(blk("score"))[-1]).extent)
    if tile != WARP or head_dim % WARP:
        raise ValueError(
            f"needs tile = {WARP} and head_dim a multiple of it, got {tile}, {head_dim}"
        )

    for block, buffer, scope in (
        ("state_init", "m", "local"),
        ("state_init", "l", "local"),
        ("acc_init", "acc", "local"),
        ("score", "score", "local"),
        ("tile_max", "tile_max", "local"),
        ("rescale", "alpha", "local"),
        ("p", "p", "shared"),
        ("tile_sum", "tile_sum", "local"),
        ("pv", "pv", "local"),
        ("publish_state", "m_out", "shared"),
        ("publish_state", "l_out", "shared"),
        ("publish_acc", "acc_out", "shared"),
        ("merge_max", "m_all", "shared"),
        ("merge_sum", "l_all", "shared"),
        ("merge_out", "o_all", "local"),
    ):
        _set_scope(sch, block, buffer, scope)

    for block in ("merge_max", "merge_sum", "merge_out", "o_part", "lse"):
        sch.reverse_compute_at(blk(block), s)
    sch.bind(kv, "blockIdx.y")
    sch.bind(s, "blockIdx.x")
    sch.bind(w, "threadIdx.y")

    def lanes_over_dims(loop: LoopRV) -> LoopRV:
        """Lane i takes dims [i*D/32, (i+1)*D/32); returns the per-lane loop."""
        lane, inner = sch.split(loop, [WARP, None])
        sch.bind(lane, "threadIdx.x")
        return inner

    def spread(loop: LoopRV) -> None:
        """Over all threads of the block, consecutive iterations on consecutive lanes."""
        _, ty, tx = sch.split(loop, [None, n_streams, WARP])
        sch.bind(ty, "threadIdx.y")
        sch.bind(tx, "threadIdx.x")

    # q, once per block, in shared memory.
    step = blk("step")
    q_shared = sch.cache_read(step, _read_index(sch, step, "q_rot"), "shared")
    sch.compute_at(q_shared, s)
    spread(sch.fuse(*sch.get_loops(q_shared)[-2:]))

    # The tile's rows, all loads issued before any math: K by token (lane t, its whole row,
    # 16-byte loads), V by head dim (lane i, its slice of every row).
    sch.set_scope(blk("gather_k"), 0, "local")
    sch.set_scope(blk("gather_v"), 0, "local")
    t, d = sch.get_loops(blk("gather_k"))[-2:]
    sch.bind(t, "threadIdx.x")
    loads, vec = sch.split(d, [None, knobs.k_vector])
    sch.unroll(loads)
    sch.vectorize(vec)
    t, d = sch.get_loops(blk("gather_v"))[-2:]
    lane, d_in = sch.split(d, [WARP, None])
    sch.reorder(lane, t, d_in)
    sch.bind(lane, "threadIdx.x")
    sch.unroll(t)
    sch.vectorize(d_in)

    # q . K: a token per lane, q from shared memory by 16-byte broadcasts.
    score = blk("score")
    t, g, d = sch.get_loops(score)[-3:]
    sch.bind(t, "threadIdx.x")
    d_out, d_in = sch.split(d, [None, knobs.q_vector])
    sch.reorder(d_out, g, d_in)
    q_local = sch.cache_read(score, _read_index(sch, score, "q_rot_shared"), "local")
    sch.compute_at(q_local, d_out)
    sch.vectorize(sch.get_loops(q_local)[-1])
    for loop in (d_out, g, d_in):
        sch.unroll(loop)

    for block in ("tile_max", "tile_sum"):
        sch.bind(sch.get_loops(blk(block))[-1], "threadIdx.x")
    sch.bind(sch.get_loops(blk("p"))[-2], "threadIdx.x")
    # Per-head loops index register arrays: unrolled, or the arrays go to local memory.
    for block in ("state_init", "rescale", "p", "update_sum"):
        sch.unroll(sch.get_loops(blk(block))[-1])
    # Around a cross-thread reduction TIR must not expand the loop itself (LowerThreadAllreduce
    # then sees the reduction buffer allocated twice): leave nvcc a `#pragma unroll`.
    for block in ("tile_max", "tile_sum"):
        g = sch.get_loops(blk(block))[-2]
        sch.unroll(g)
        sch.annotate(g, "pragma_unroll_explicit", 0)

    # p . V: head dims over lanes, as gathered.
    g, d, t = sch.get_loops(blk("pv"))[-3:]
    lane, d_in = sch.split(d, [WARP, None])
    sch.reorder(lane, t, g, d_in)
    sch.bind(lane, "threadIdx.x")
    for loop in (t, g, d_in):
        sch.unroll(loop)

    for block in ("acc_init", "update_acc", "publish_acc"):
        g = sch.get_loops(blk(block))[-2]
        inner = lanes_over_dims(sch.get_loops(blk(block))[-1])
        sch.unroll(g)
        sch.unroll(inner)
    # Every lane holds the same m and l and stores them (same values, same addresses): a lane
    # per head would index the register arrays by threadIdx, moving them to local memory.
    sch.unroll(sch.get_loops(blk("publish_state"))[-1])

    # The merge of the streams.
    for block in ("merge_max", "merge_sum", "lse"):
        spread(sch.get_loops(blk(block))[2])
    for block in ("merge_max", "merge_sum"):
        # Accumulate in a register, store once: an accumulator in shared memory under the
        # thread predicate would need a barrier inside the condition.
        cache = sch.cache_write(blk(block), 0, "local")
        sch.reverse_compute_at(cache, sch.get_loops(blk(block))[-2])
    o_part = blk("o_part")
    spread(sch.fuse(*sch.get_loops(o_part)[-2:]))
    sch.compute_at(blk("merge_out"), sch.get_loops(o_part)[-1])


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
    sch.compute_at(blk("merged"), dim)
    sch.set_scope(blk("merged"), 0, "local")
    for block in ("weight_sum", "lse_max"):
        # Every thread of the head computes the (S-term) max and sum itself: cheaper than a
        # shared-memory round trip and a barrier.
        sch.compute_at(blk(block), dim)
        sch.set_scope(blk(block), 0, "local")
