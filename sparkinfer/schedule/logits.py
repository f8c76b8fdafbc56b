"""Schedule rules for `sparkinfer.kernels.logits` (the processed decode step's logits work).

`process_logits` is elementwise over the vocabulary. On CUDA: `threads` a block, one token a
thread (151936 tokens at the default 256: 594 blocks, ~1.8 MB read and 0.6 MB written, a few
microseconds). On the CPU: LLVM builds the factory's loop as written (a masked select and a
few multiplies per token, once per token of a request that asked for processing).
`count_token` is one increment: a single thread on CUDA, as written on the CPU.
"""

from tvm import s_tir

from sparkinfer.kernels.use import KernelUse
from sparkinfer.schedule.arch import ArchFacts
from sparkinfer.schedule.cpu import AsWrittenCpuRule
from sparkinfer.schedule.norm import BlockThreadsCudaRule, BlockThreadsKnobs
from sparkinfer.schedule.space import FixedRule, Knobs, ScheduleRule


class ProcessLogitsCudaRule(BlockThreadsCudaRule):
    family, factory = "logits", "process_logits"

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


RULES: tuple[ScheduleRule, ...] = (ProcessLogitsCudaRule(), CountTokenCudaRule(),
                                   AsWrittenCpuRule("logits", "process_logits"), AsWrittenCpuRule("logits", "count_token"))
