"""GPU schedules for `sparkinfer.kernels.sampling`: many blocks find the candidates, one
block draws the token (two launches a token).

`sample_candidates`: a thread block per slice of SLICE logits (75 for V = 151936). Its
winner is a block-wide reduction (a shuffle-and-shared-memory allreduce); when the draw uses
the candidates, its packed keys go to shared memory (16 KB) and a bitonic top-k runs there, a
compare-exchange pair a thread per step, two barriers a step (for 2048 keys and K_MAX 64: 21
steps sorting runs of 64, then 5 halvings of 7 steps, each on half the keys of the one
before), and the K_MAX highest go out to global memory. The block's threads are at most the
sort's lanes (SLICE / 2), so that every thread takes every step.

`sample_token` is one block: block-wide reductions over the B winners (greedy, unfiltered
draws), the k-way merge of the candidate lists (a max over the B list heads a round, the
heads and the merged list in shared memory), the top-p scan that every thread runs alike,
the Gumbel max over the kept candidates; and the one-block fallback, unchanged: a sequence
of block-wide reductions over the vocabulary (the top logit, the bisection counts and
masses, the Gumbel argmax), each split across the block's threads, thread t taking elements
t, t + threads, ... (coalesced), then an allreduce whose result every thread reads. The
scalar steps between them run in every thread alike on its own copy of the state; the
allreduces are also the barriers that order the steps. Measured before this change on an
H200 (V = 151936), the one-block kernel alone: greedy 16 us, temperature only 84 us, top-k
409 us, top-p 1.0 ms, both 0.74 ms: the fallback's costs (bench/NOTES.md, "Multi-block
sampler v2", has the predictions for the candidates' paths).

`advance` is a single thread.
"""

from dataclasses import dataclass
from typing import Any

from tvm import s_tir

from sparkinfer.kernels.sampling import SLICE, sort_lanes
from sparkinfer.kernels.use import KernelUse
from sparkinfer.schedule.arch import ArchFacts
from sparkinfer.schedule.gemv import WARP, powers_of_two
from sparkinfer.schedule.space import FixedRule, Knobs, ScheduleRule

_REDUCTIONS = ("top", "topk_count", "topp_total", "topp_mass", "sample")
# The candidate path's steps, over the blocks or the merged candidates: a lane a thread.
_CANDIDATE_STEPS = ("winner", "clear", "heads", "front", "advance_head", "unproven", "masses", "draw")
_SHARED = ("clear", "heads", "masses")  # the merged candidates, the lists' heads, the masses
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
    enable_check = False  # the merge's steps read and write the lists' heads in place

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
        for name in _CANDIDATE_STEPS:
            _bind_lanes(sch, name, knobs.threads)
        for name in _SHARED:
            sch.set_scope(sch.get_sblock(name), 0, "shared")
        sch.bind(sch.get_loops(sch.get_sblock("top"))[0], "blockIdx.x")


def _max_threads(use: KernelUse, facts: ArchFacts) -> int:
    """At most the sort's lanes: more threads would leave some out of a step by a condition
    around it, and TVM places no barrier under a condition."""
    slice_ = use.args[1] if len(use.args) > 1 else SLICE  # sample_candidates(vocab, slice_, k_max)
    return min(facts.max_threads_per_block, sort_lanes(slice_))


def _bind_lanes(sch: s_tir.Schedule, block: str, threads: int) -> None:
    """The block's innermost loop over `threads` threads, element t, t + threads, ..."""
    loop = sch.get_loops(sch.get_sblock(block))[-1]
    _, lane = sch.split(loop, [None, threads])
    sch.bind(lane, "threadIdx.x")


@dataclass(frozen=True)
class CandidatesKnobs(Knobs):
    """threads: each block's threads (the sort's steps are one barrier-separated pass each,
    so the default is the most a block can have)."""

    threads: Any


class SampleCandidatesCudaRule(ScheduleRule):
    """A thread block per slice: its winner (a block-wide reduction), its keys loaded into
    shared memory and sorted there (bitonic, lanes across the threads), the top K_MAX out."""

    target_kind = "cuda"
    family = "sampling"
    factory = "sample_candidates"
    knobs_type = CandidatesKnobs
    enable_check = False  # the sort's steps read and write the same shared keys in place

    def space(self, use: KernelUse, facts: ArchFacts) -> dict[str, tuple[Any, ...]]:
        return {"threads": tuple(t for t in powers_of_two(_max_threads(use, facts)) if t >= WARP)}

    def structural(self) -> tuple[str, ...]:
        return ("threads",)

    def default(self, use: KernelUse, facts: ArchFacts) -> CandidatesKnobs:
        return CandidatesKnobs(threads=_max_threads(use, facts))

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        assert isinstance(knobs, CandidatesKnobs)
        for name in ("top", "best", "load", "sort_runs", "halve", "merge_runs", "emit"):
            _bind_lanes(sch, name, knobs.threads)
        sch.set_scope(sch.get_sblock("load"), 0, "shared")
        sch.bind(sch.get_loops(sch.get_sblock("slice"))[0], "blockIdx.x")


class AdvanceCudaRule(FixedRule):
    """One thread of one block."""

    target_kind = "cuda"
    family = "sampling"
    factory = "advance"

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        sch.bind(sch.get_loops(sch.get_sblock("advance"))[0], "blockIdx.x")
