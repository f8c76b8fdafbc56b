"""Every schedule rule, registered explicitly: `space.rule_for` finds a kernel's rule here.

A kernel factory needs a rule per target kind (cuda, cpu) listed below; a kernel without one
fails to compile with an error naming it.
"""

from sparkinfer.schedule.attention import AttentionCombineCudaRule, PagedDecodeAttentionCudaRule
from sparkinfer.schedule.embedding import EmbeddingCudaRule
from sparkinfer.schedule.gemv import GemvCudaRule, GemvExpertsCudaRule, GemvQkvCudaRule
from sparkinfer.schedule.gemv_q8 import (
    GemvQ8CudaRule,
    MoeDownResidualQ8CudaRule,
    MoeGateUpSiluQ8CudaRule,
    QuantizeQ8CudaRule,
)
from sparkinfer.schedule.moe import MoeDownResidualCudaRule, MoeGateUpSiluCudaRule
from sparkinfer.schedule.norm import AddRmsNormCudaRule, RmsNormCudaRule
from sparkinfer.schedule.rope import QkNormRopeKvAppendCudaRule
from sparkinfer.schedule.router import RouterTopkCudaRule
from sparkinfer.schedule.sampling import AdvanceCudaRule, SampleTokenCudaRule
from sparkinfer.schedule.space import register

for _rule in (
    GemvCudaRule(),
    GemvExpertsCudaRule(),
    GemvQkvCudaRule(),
    MoeGateUpSiluCudaRule(),
    MoeDownResidualCudaRule(),
    PagedDecodeAttentionCudaRule(),
    AttentionCombineCudaRule(),
    QkNormRopeKvAppendCudaRule(),
    RmsNormCudaRule(),
    AddRmsNormCudaRule(),
    RouterTopkCudaRule(),
    SampleTokenCudaRule(),
    AdvanceCudaRule(),
    EmbeddingCudaRule(),
    GemvQ8CudaRule(),
    MoeGateUpSiluQ8CudaRule(),
    MoeDownResidualQ8CudaRule(),
    QuantizeQ8CudaRule(),
):
    register(_rule)
