"""GPU schedule for `sparkinfer.kernels.router.router_topk`: one thread block of E threads.

  - the logits go to shared memory once; thread e counts the experts that beat expert e
    (E compares from shared memory, in a register) and stores rank[e] in shared memory;
  - thread s < KU scans the E ranks for the expert of slot s and writes ids[s];
  - the max logit is a block-wide allreduce; thread s < KU computes exp(l[ids[s]] - max),
    the KU of them meet in a second allreduce, and thread s writes weights[s].
At E = 128 this is a few microseconds of one SM, all of it latency.

`router_topk_rows` (the T-token step's) takes the same schedule with a thread block per token
(dlight's rules made five kernels of it).
"""

from tvm import s_tir
from tvm.s_tir.schedule import LoopRV, SBlockRV

from sparkinfer.kernels.use import KernelUse
from sparkinfer.schedule.arch import ArchFacts
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
