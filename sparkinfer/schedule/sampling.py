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

from dataclasses import dataclass
from typing import Any

from tvm import s_tir

from sparkinfer.kernels.use import KernelUse
from sparkinfer.schedule.arch import ArchFacts
from sparkinfer.schedule.gemv import WARP, powers_of_two
from sparkinfer.schedule.space import FixedRule, Knobs, ScheduleRule

_REDUCTIONS = ("top", "topk_count", "topp_total", "topp_mass", "sample")
# Float4 loads a thread has in flight: one at a time would leave a lone SM latency-bound,
# far below its share of bandwidth.
DEFAULT_UNROLL = 4


@dataclass(frozen=True)
class SampleKnobs(Knobs):
    """threads: the block's threads (default: the most a block can have, as the passes are
    bound by one SM's memory parallelism); vector: floats per load of the logits; unroll:
    loads of a thread in flight per step."""

    threads: Any
    vector: Any
    unroll: Any


class SampleTokenCudaRule(ScheduleRule):
    target_kind = "cuda"
    family = "sampling"
    factory = "sample_token"
    knobs_type = SampleKnobs

    def space(self, use: KernelUse, facts: ArchFacts) -> dict[str, tuple[Any, ...]]:
        return {"threads": tuple(t for t in powers_of_two(facts.max_threads_per_block) if t >= WARP),
                "vector": powers_of_two(facts.vector_bytes // 4), "unroll": (1, 2, 4, 8)}

    def structural(self) -> tuple[str, ...]:
        # With sampled split factors the cached logits' loop has a symbolic extent, which
        # `vectorize` refuses: every combination is its own design space (72 at most), and a
        # combination that does not schedule for the vocabulary is left out of the space.
        return ("threads", "vector", "unroll")

    def default(self, use: KernelUse, facts: ArchFacts) -> SampleKnobs:
        return SampleKnobs(threads=facts.max_threads_per_block, vector=facts.vector_bytes // 4,
                           unroll=DEFAULT_UNROLL)

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        assert isinstance(knobs, SampleKnobs)
        for name in _REDUCTIONS:
            block = sch.get_sblock(name)
            loop = sch.get_loops(block)[-1]
            serial, unrolled, lane, vec = sch.split(loop, [None, knobs.unroll, knobs.threads, knobs.vector])
            sch.reorder(lane, serial, unrolled, vec)
            sch.bind(lane, "threadIdx.x")
            logits = sch.cache_read(block, 0, "local", consumer_blocks=[block])
            sch.compute_at(logits, unrolled)
            sch.vectorize(sch.get_loops(logits)[-1])
            sch.unroll(unrolled)
            sch.unroll(vec)
        sch.bind(sch.get_loops(sch.get_sblock("top"))[0], "blockIdx.x")


class AdvanceCudaRule(FixedRule):
    """One thread of one block."""

    target_kind = "cuda"
    family = "sampling"
    factory = "advance"

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        sch.bind(sch.get_loops(sch.get_sblock("advance"))[0], "blockIdx.x")
