"""GPU schedule for `sparkinfer.kernels.rope.qk_norm_rope_kv_append`.

One thread block per head (the NH query heads, then the NKV key heads), one thread per head
dim: the head's sum of squares is a block-wide allreduce, then each thread writes its rotated
element (to q_rot, or to the cache slot with the matching value element). One launch for the
whole step; the cache slot is written by the NKV key-head blocks only.
"""

from tvm import s_tir
from tvm.s_tir.schedule import LoopRV

from sparkinfer.kernels.use import KernelUse
from sparkinfer.schedule.arch import ArchFacts
from sparkinfer.schedule.space import FixedRule, Knobs


class QkNormRopeKvAppendCudaRule(FixedRule):
    target_kind = "cuda"
    family = "rope"
    factory = "qk_norm_rope_kv_append"

    def apply(self, sch: s_tir.Schedule, use: KernelUse, knobs: Knobs, facts: ArchFacts) -> None:
        head, dim = sch.get_loops(sch.get_sblock("rope"))
        schedule_head_blocks(sch, head, dim)


def schedule_head_blocks(sch: s_tir.Schedule, head: LoopRV, dim: LoopRV) -> None:
    """The `rope` block's loops: `head` (a head, or a (row, head) pair) over thread blocks, `dim`
    over threads; the head's sum of squares a block-wide allreduce in a register."""
    sch.bind(head, "blockIdx.x")
    sch.bind(dim, "threadIdx.x")
    sumsq = sch.get_sblock("sumsq")
    sch.compute_at(sumsq, head)
    sch.set_scope(sumsq, 0, "local")
    sch.bind(sch.get_loops(sumsq)[-1], "threadIdx.x")
