"""Schedule rules for `sparkinfer.kernels.logits` (the processed decode step's logits work).

`process_logits` is elementwise over the vocabulary. On CUDA: `threads` a block, one token a
thread (151936 tokens at 256: 594 blocks, ~1.8 MB read and 0.6 MB written, a few
microseconds). On the CPU: LLVM builds the factory's loop as written (a masked select and a
few multiplies per token, once per token of a request that asked for processing).
`count_token` is one increment: a single thread on CUDA, as written on the CPU.
"""

from typing import Any

from tvm import s_tir

from sparkinfer.kernels.use import KernelUse
from sparkinfer.schedule.arch import ArchFacts
from sparkinfer.schedule.norm import BlockThreadsKnobs, block_threads_space
from sparkinfer.schedule.space import FixedRule, Knobs, ScheduleRule

PROCESS_THREADS = 256


class ProcessLogitsCudaRule(ScheduleRule):
    target_kind = "cuda"
    family, factory = "logits", "process_logits"
    knobs_type = BlockThreadsKnobs

    def space(self, use: KernelUse, facts: ArchFacts) -> dict[str, tuple[Any, ...]]:
        return block_threads_space(facts)

    def default(self, use: KernelUse, facts: ArchFacts) -> BlockThreadsKnobs:
        return BlockThreadsKnobs(threads=PROCESS_THREADS)

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        assert isinstance(knobs, BlockThreadsKnobs)
        block, lane = sch.split(sch.get_loops(sch.get_sblock("process"))[0], [None, knobs.threads])
        sch.bind(block, "blockIdx.x")
        sch.bind(lane, "threadIdx.x")


class CountTokenCudaRule(FixedRule):
    target_kind = "cuda"
    family, factory = "logits", "count_token"

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        sch.bind(sch.get_loops(sch.get_sblock("count"))[0], "blockIdx.x")


class _AsWrittenCpuRule(FixedRule):
    target_kind = "cpu"

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        del sch, use, knobs, facts


class ProcessLogitsCpuRule(_AsWrittenCpuRule):
    family, factory = "logits", "process_logits"


class CountTokenCpuRule(_AsWrittenCpuRule):
    family, factory = "logits", "count_token"


RULES: tuple[ScheduleRule, ...] = (ProcessLogitsCudaRule(), CountTokenCudaRule(), ProcessLogitsCpuRule(),
                                   CountTokenCpuRule())
