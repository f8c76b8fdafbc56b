"""GPU schedules for `sparkinfer.kernels.sampling`: one thread block does the whole draw.

`sample_token` is a sequence of block-wide reductions over the vocabulary (the top logit,
the bisection counts and masses, the Gumbel argmax) with scalar steps between them that
every thread runs alike on its own copy of the state. Each reduction is split across the
block's threads, thread t taking elements t, t + threads, ... (coalesced), then a
shuffle-and-shared-memory allreduce whose result every thread reads; those allreduces are
also the barriers that order the steps. One block keeps it a single launch with no global
scratch, at the price of running on one SM. Measured on an H200 (V = 151936): greedy 16 us
(one pass), temperature only 84 us (+ the Gumbel pass, compute-bound: two hashes and two
logs per token), top-k 409 us, top-p 1.0 ms, both 0.74 ms (up to 32 bisection passes each,
~10 us a pass). Only greedy and plain temperature are cheap enough for decoding; the
filtered paths need the vocabulary spread over many SMs (several kernels and a scratch
buffer between them), which is the next step.

`advance` is a single thread.
"""

from tvm import s_tir, tirx

# The most threads a block can have: the passes are bound by one SM's memory parallelism.
SAMPLE_THREADS = 1024
_REDUCTIONS = ("top", "topk_count", "topp_total", "topp_mass", "sample")
_VECTOR = 4  # float4 loads of the logits
# Float4 loads a thread has in flight: one at a time would leave a lone SM latency-bound,
# far below its share of bandwidth.
_UNROLL = 4


def schedule_sample_token(func: tirx.PrimFunc, threads: int = SAMPLE_THREADS) -> tirx.PrimFunc:
    """Schedule a `sample_token` PrimFunc for a CUDA target."""
    sch = s_tir.Schedule(func)
    for name in _REDUCTIONS:
        block = sch.get_sblock(name)
        loop = sch.get_loops(block)[-1]
        serial, unrolled, lane, vec = sch.split(loop, [None, _UNROLL, threads, _VECTOR])
        sch.reorder(lane, serial, unrolled, vec)
        sch.bind(lane, "threadIdx.x")
        logits = sch.cache_read(block, 0, "local", consumer_blocks=[block])
        sch.compute_at(logits, unrolled)
        sch.vectorize(sch.get_loops(logits)[-1])
        sch.unroll(unrolled)
        sch.unroll(vec)
    sch.bind(sch.get_loops(sch.get_sblock("top"))[0], "blockIdx.x")
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def schedule_advance(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Schedule `advance` for a CUDA target: one thread of one block."""
    sch = s_tir.Schedule(func)
    sch.bind(sch.get_loops(sch.get_sblock("advance"))[0], "blockIdx.x")
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)
