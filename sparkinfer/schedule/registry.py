"""Every schedule rule, registered explicitly: `space.rule_for` finds a kernel's rule here.

A kernel factory needs a rule per target kind (cuda, cpu) listed below; a kernel without one
fails to compile with an error naming it.
"""

from sparkinfer.schedule.attention import (
    AttentionCombineCudaRule,
    PagedDecodeAttentionCudaRule,
    PagedDecodeAttentionMergedCudaRule,
    PagedDecodeAttentionMmaCudaRule,
    PagedDecodeAttentionMmaMergedCudaRule,
)
from sparkinfer.schedule.cpu import (
    AddRmsNormCpuRule,
    AsWrittenCpuRule,
    EmbeddingCpuRule,
    GemvCpuRule,
    GemvNormedCpuRule,
    GemvQkvCpuRule,
    GemvQkvNormedCpuRule,
    GemvResidualCpuRule,
    MoeDownResidualCpuRule,
    MoeGateUpSiluCpuRule,
    MoeGateUpSiluRoutedCpuRule,
    PagedDecodeAttentionCpuRule,
    QkNormRopeKvAppendCpuRule,
    RmsNormCpuRule,
    SampleCandidatesCpuRule,
)
from sparkinfer.schedule.embedding import EmbeddingCudaRule
from sparkinfer.schedule.gemv import (
    GemvCudaRule,
    GemvNormedCudaRule,
    GemvQkvCudaRule,
    GemvQkvNormedCudaRule,
    GemvResidualCudaRule,
)
from sparkinfer.schedule.gemv_q8 import (
    AddRmsNormQ8CudaRule,
    AttentionCombineQ8CudaRule,
    GemvQ8CpuRule,
    GemvQ8CudaRule,
    GemvQ8LanesCpuRule,
    GemvQ8NormedCudaRule,
    GemvQkvQ8CpuRule,
    GemvQkvQ8CudaRule,
    GemvQkvQ8LanesCpuRule,
    GemvQkvQ8NormedCudaRule,
    QuantizeQ8CudaRule,
    RmsNormQ8CudaRule,
)
from sparkinfer.schedule.moe_q8 import (
    MoeDownResidualQ8CpuRule,
    MoeDownResidualQ8CudaRule,
    MoeDownResidualQ8LanesCpuRule,
    MoeGateUpSiluQ8CpuRule,
    MoeGateUpSiluQ8CudaRule,
    MoeGateUpSiluQ8LanesCpuRule,
    MoeGateUpSiluQ8RoutedCpuRule,
    MoeGateUpSiluQ8RoutedCudaRule,
    MoeGateUpSiluQ8RoutedLanesCpuRule,
    MoeGateUpSiluQ8RoutedPrefetchCudaRule,
)
from sparkinfer.schedule.moe import (
    MoeDownResidualCudaRule,
    MoeGateUpSiluCudaRule,
    MoeGateUpSiluRoutedCudaRule,
)
from sparkinfer.schedule.norm import AddRmsNormCudaRule, AddRmsNormRowsCudaRule, RmsNormCudaRule, RmsNormRowsCudaRule
from sparkinfer.schedule.rope import QkNormRopeKvAppendCudaRule
from sparkinfer.schedule.router import RouterGemvTopkCudaRule, RouterTopkCudaRule, RouterTopkRowsCudaRule
from sparkinfer.schedule.sampling import AdvanceCudaRule, SampleCandidatesCudaRule, SampleTokenCudaRule
from sparkinfer.schedule.logits import RULES as LOGITS_RULES
from sparkinfer.schedule.prefill_cpu import CPU_RULES as PREFILL_CPU_RULES
from sparkinfer.schedule.prefill_cuda import CUDA_RULES as PREFILL_CUDA_RULES
from sparkinfer.schedule.space import register

for _rule in (
    GemvCudaRule(),
    GemvQkvCudaRule(),
    GemvNormedCudaRule(),
    GemvQkvNormedCudaRule(),
    GemvResidualCudaRule(),
    MoeGateUpSiluCudaRule(),
    MoeDownResidualCudaRule(),
    MoeGateUpSiluRoutedCudaRule(),
    PagedDecodeAttentionCudaRule(),
    PagedDecodeAttentionMergedCudaRule(),
    PagedDecodeAttentionMmaCudaRule(),
    PagedDecodeAttentionMmaMergedCudaRule(),
    AttentionCombineCudaRule(),
    QkNormRopeKvAppendCudaRule(),
    RmsNormCudaRule(),
    AddRmsNormCudaRule(),
    RmsNormRowsCudaRule(),
    AddRmsNormRowsCudaRule(),
    RouterTopkCudaRule(),
    RouterTopkRowsCudaRule(),
    RouterGemvTopkCudaRule(),
    SampleCandidatesCudaRule(),
    SampleTokenCudaRule(),
    AdvanceCudaRule(),
    EmbeddingCudaRule(),
    GemvQ8CudaRule(),
    MoeGateUpSiluQ8CudaRule(),
    MoeGateUpSiluQ8RoutedCudaRule(),
    MoeGateUpSiluQ8RoutedPrefetchCudaRule(),
    MoeDownResidualQ8CudaRule(),
    QuantizeQ8CudaRule(),
    AddRmsNormQ8CudaRule(),
    RmsNormQ8CudaRule(),
    GemvQkvQ8CudaRule(),
    GemvQ8NormedCudaRule(),
    GemvQkvQ8NormedCudaRule(),
    AttentionCombineQ8CudaRule(),
    GemvCpuRule(),
    GemvQkvCpuRule(),
    GemvNormedCpuRule(),
    GemvQkvNormedCpuRule(),
    GemvResidualCpuRule(),
    MoeGateUpSiluCpuRule(),
    MoeGateUpSiluRoutedCpuRule(),
    MoeDownResidualCpuRule(),
    PagedDecodeAttentionCpuRule(),
    AsWrittenCpuRule("attention", "attention_combine"),
    QkNormRopeKvAppendCpuRule(),
    RmsNormCpuRule(),
    AddRmsNormCpuRule(),
    AsWrittenCpuRule("router", "router_topk"),
    SampleCandidatesCpuRule(),
    AsWrittenCpuRule("sampling", "sample_token"),
    AsWrittenCpuRule("sampling", "advance"),
    EmbeddingCpuRule(),
    GemvQ8CpuRule(),
    MoeGateUpSiluQ8CpuRule(),
    MoeGateUpSiluQ8RoutedCpuRule(),
    MoeDownResidualQ8CpuRule(),
    AsWrittenCpuRule("gemv_q8", "quantize_q8_1"),
    AsWrittenCpuRule("gemv_q8", "add_rms_norm_q8_1"),
    AsWrittenCpuRule("gemv_q8", "rms_norm_q8_1"),
    AsWrittenCpuRule("gemv_q8", "attention_combine_q8_1"),
    GemvQkvQ8CpuRule(),
    GemvQ8LanesCpuRule(),
    GemvQkvQ8LanesCpuRule(),
    MoeGateUpSiluQ8LanesCpuRule(),
    MoeGateUpSiluQ8RoutedLanesCpuRule(),
    MoeDownResidualQ8LanesCpuRule(),
    *LOGITS_RULES,
    *PREFILL_CPU_RULES,
    *PREFILL_CUDA_RULES,
):
    register(_rule)
