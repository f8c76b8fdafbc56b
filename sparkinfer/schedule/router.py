"""GPU schedule for `sparkinfer.kernels.router.router_topk`: one thread block of E threads.

  - the logits go to shared memory once; thread e counts the experts that beat expert e
    (E compares from shared memory, in a register) and stores rank[e] in shared memory;
  - thread s < KU scans the E ranks for the expert of slot s and writes ids[s];
  - the max logit is a block-wide allreduce; thread s < KU computes exp(l[ids[s]] - max),
    the KU of them meet in a second allreduce, and thread s writes weights[s].
At E = 128 this is a few microseconds of one SM, all of it latency.

`router_topk_rows` (the T-token step's) takes the same schedule with a thread block per token
(dlight's rules made five kernels of it).

`router_gemv_topk` (the step variant router_merge="last_block"): the router GEMV laid out as
schedule/gemv.py lays out `gemv('F32', 128, 2048)` in every packaged schedules file (a warp a
row, one row a thread block: E blocks of 32 threads), then in each block the release (every
thread), the count (thread 0) and, in the last block, the top-k over its 32 threads
(`spread_topk`, as the fused gate/up runs it: E/32 experts a thread for the rank).
"""

from typing import Any

from tvm import s_tir
from tvm.s_tir.schedule import LoopRV, SBlockRV

from sparkinfer.kernels.gemv import gemv_format
from sparkinfer.kernels.use import KernelUse, factory_args
from sparkinfer.schedule.arch import ArchFacts
from sparkinfer.schedule.gemv import DEFAULT_UNROLL, GemvKnobs, even_lanes, loops_below, schedule_gemv
from sparkinfer.schedule.space import FixedRule, Knobs


def _bind_threads(sch: s_tir.Schedule, block: SBlockRV, threads: int) -> LoopRV:
    """Bind the block's loop below the kernel's blockIdx loop to threadIdx.x, padded (with a
    predicate) to the kernel's thread count: every loop bound to threadIdx.x in one kernel
    must have the same extent."""
    loop = sch.get_loops(block)[1]
    _, tx = sch.split(loop, [None, threads])
    sch.bind(tx, "threadIdx.x")
    return tx


def accumulate_in_registers(sch: s_tir.Schedule, block: SBlockRV, thread_loop: LoopRV) -> None:
    """Accumulate a per-thread serial reduction in a register, stored once at the end: a
    read-modify-write of shared or global memory per step would put a memory round trip
    on every iteration."""
    sch.cache_write(block, 0, "local")
    store = sch.get_consumers(block)[0]
    sch.reverse_compute_at(store, thread_loop)


class RouterTopkCudaRule(FixedRule):
    """One thread block of E threads (the module docstring)."""

    target_kind = "cuda"
    family = "router"
    factory = "router_topk"

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        _schedule_router_topk(sch)


class RouterTopkRowsCudaRule(RouterTopkCudaRule):
    """A thread block of E threads per token."""

    factory = "router_topk_rows"


class RouterGemvTopkCudaRule(FixedRule):
    """`router_gemv_topk`: the GEMV a warp a row and a row a block (the lanes of `gemv`'s
    default, so each logit is summed in `gemv`'s order), the count on thread 0, and the top-k
    on the last block's threads (the module docstring). Fixed: the kernel's count is one
    arrival a row, so a block must be a row; the tuned router GEMVs of sm_90.json, sm_120.json
    and sm_121.json are that layout already (lanes 32, rows 1, rows_per_thread 1)."""

    target_kind = "cuda"
    family = "router"
    factory = "router_gemv_topk"

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        ggml_type, _, hidden, _ = factory_args(use)
        fmt = gemv_format(ggml_type)
        lanes = even_lanes(hidden // fmt.chunk)
        ids_store = ids_in_registers(sch)
        schedule_gemv(sch, fmt, GemvKnobs(lanes=lanes, rows=1, rows_per_thread=1, unroll=DEFAULT_UNROLL,
                                          vector_header=0))
        row = sch.get_loops(sch.get_sblock("gemv"))[0]  # blockIdx.x: one row
        _count_after_the_row(sch, row, lanes)
        _topk_in_the_last_block(sch, lanes, ids_store)


def _count_after_the_row(sch: s_tir.Schedule, row: LoopRV, lanes: int) -> None:
    """`router_gemv_topk`'s release, arrive, is_last and pick blocks in each row's thread block."""
    for block in ("release", "arrive", "is_last", "pick"):
        sch.reverse_compute_at(sch.get_sblock(block), row)
    # The release is every thread's: a loop of one bound to threadIdx.x as it is (unbound,
    # lowering puts it under the guard of the logit's store, threadIdx.x == 0, where its
    # barrier would wait for the other 31 threads forever).
    sch.bind(sch.add_unit_loop(sch.get_sblock("release")), "threadIdx.x")
    # The count is thread 0's: a loop of one split by the block's lanes, whose inner loop
    # bound to threadIdx.x carries the guard threadIdx.x < 1 (schedule/attention.py's arrive).
    arrive = sch.get_sblock("arrive")
    _, thread = sch.split(sch.add_unit_loop(arrive), [None, lanes])
    sch.bind(thread, "threadIdx.x")
    sch.set_scope(arrive, 1, "shared")  # last: the counting thread's answer, for the block
    # Every thread's copy in a register, the top-k loop's extent: TVM's barrier placement
    # fails on a shared load in a loop extent (schedule/attention.py).
    sch.set_scope(sch.get_sblock("is_last"), 0, "local")


def _topk_in_the_last_block(sch: s_tir.Schedule, lanes: int, ids_store: SBlockRV) -> None:
    """router_topk's stages, inside block "pick"'s loop of is_last[n] iterations, over the
    block's `lanes` threads."""
    once = sch.get_loops(sch.get_sblock("rank"))[0]  # inside "pick", the stages' loops start there
    # lmax and total as router_topk has them: their unit loop gone (reverse_compute_at drops it
    # there), so that the reduction loop goes over the threads, an allreduce in the same order
    for name in ("lmax", "total"):
        sch.fuse(*loops_below(sch, sch.get_sblock(name), once))
    spread_topk(sch, once, (1, lanes), ids_store)


def _schedule_router_topk(sch: s_tir.Schedule) -> None:
    rank = sch.get_sblock("rank")
    blocks = {name: sch.get_sblock(name) for name in ("ids", "lmax", "ex", "total", "weights")}
    loops = sch.get_loops(rank)  # (e, j) for one token, (t, e, j) for a chunk's rows
    if len(loops) == 2:
        bx, tx = sch.split(loops[0], [1, None])
        # Everything else consumes rank or reads only the logits: hang it under the same
        # blockIdx loop, in dataflow order, so that it is one kernel of one thread block.
        for block in blocks.values():
            sch.reverse_compute_at(block, bx)
    else:
        # The same, a block per token: every block's token loop merged into one (with
        # reverse_compute_at each token's block would compute every token's rows).
        bx = sch.merge(*(sch.get_loops(b)[0] for b in (rank, *blocks.values())))
        tx = sch.get_loops(rank)[1]
        for name in ("lmax", "total"):  # their (1, n) loops as one, as for one token
            sch.fuse(*sch.get_loops(blocks[name])[1:])
    n_experts = int(sch.get(tx).extent)
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    for block in (rank, blocks["lmax"], blocks["ex"], blocks["total"]):
        sch.set_scope(block, 0, "shared")
    logits_shared = sch.cache_read(rank, 0, "shared", consumer_blocks=[rank, blocks["lmax"]])
    sch.compute_at(logits_shared, bx)
    _bind_threads(sch, logits_shared, n_experts)
    accumulate_in_registers(sch, rank, tx)
    # Slot s is thread s, here and in ex: that thread reads back only its own ids[s].
    accumulate_in_registers(sch, blocks["ids"], _bind_threads(sch, blocks["ids"], n_experts))
    for name in ("lmax", "ex", "total", "weights"):
        _bind_threads(sch, blocks[name], n_experts)
    # Unrolled, the E shared-memory reads of the rank and id scans are independent loads in
    # flight together; as loops, each waits for the last (~30 cycles), E times over: ~4 µs of
    # the kernel's ~8 (ncu on the H100, bench/NOTES.md).
    for block in (rank, blocks["ids"]):
        sch.unroll(sch.get_loops(block)[-1])


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
    stages = _topk_stages(sch)
    for index, block in enumerate((stages[0], stages[1], ids_store, *stages[2:])):
        sch.reverse_compute_at(block, at, index=index)
    spread_topk(sch, at, threads, ids_store)


def _topk_stages(sch: s_tir.Schedule) -> tuple[SBlockRV, ...]:
    return tuple(sch.get_sblock(name) for name in ("rank", "ids", "lmax", "ex", "total", "weights"))


def spread_topk(sch: s_tir.Schedule, at: LoopRV, threads: tuple[Any, Any], ids_store: SBlockRV) -> None:
    """`router.topk`'s stages, already under the loop `at` in dataflow order (`topk_in_block`
    puts them there; `router_gemv_topk` has them there), spread over the block's threads."""
    rank, ids, lmax, ex, total, weights = _topk_stages(sch)
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
