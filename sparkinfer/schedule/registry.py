"""Every schedule rule, registered explicitly: `space.rule_for` finds a kernel's rule here.

A new kernel factory needs a rule per target kind (cuda, cpu) listed below; a kernel without
one fails to compile with an error naming it.
"""

from sparkinfer.schedule.gemv import GemvCudaRule, GemvExpertsCudaRule, GemvQkvCudaRule
from sparkinfer.schedule.prefill_cuda import CUDA_RULES as PREFILL_CUDA_RULES
from sparkinfer.schedule.prefill_cpu import CausalPrefillAttentionCpuRule, GemmCpuRule, GroupedGemmCpuRule
from sparkinfer.schedule.space import register

for _rule in (
    GemvCudaRule(),
    GemvExpertsCudaRule(),
    GemvQkvCudaRule(),
    GemmCpuRule(),
    GroupedGemmCpuRule(),
    CausalPrefillAttentionCpuRule(),
    *PREFILL_CUDA_RULES,
):
    register(_rule)
