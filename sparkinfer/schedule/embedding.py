"""GPU schedule for `sparkinfer.kernels.embedding`: one thread per hidden element.

A lookup moves one row (a few KiB): the kernel is launch-bound, so the plain mapping is the
whole schedule. Each thread decodes its weight's scale from the block header itself; the
header bytes are shared by the 32..256 threads of a block and served from L1.
"""

from tvm import s_tir

from sparkinfer.kernels.use import KernelUse
from sparkinfer.schedule.arch import ArchFacts
from sparkinfer.schedule.norm import BlockThreadsCudaRule, BlockThreadsKnobs
from sparkinfer.schedule.space import Knobs


class EmbeddingCudaRule(BlockThreadsCudaRule):
    family = "embedding"
    factory = "embedding"

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        assert isinstance(knobs, BlockThreadsKnobs)
        (h,) = sch.get_loops(sch.get_sblock("embedding"))
        block, lane = sch.split(h, [None, knobs.threads])
        sch.bind(block, "blockIdx.x")
        sch.bind(lane, "threadIdx.x")
