"""Every schedule rule, registered explicitly: `space.rule_for` finds a kernel's rule here.

A new kernel factory needs a rule per target kind (cuda, cpu) listed below; a kernel without
one fails to compile with an error naming it.
"""

from sparkinfer.schedule.gemv import GemvCudaRule, GemvExpertsCudaRule, GemvQkvCudaRule
from sparkinfer.schedule.gemv_q8 import (
    GemvQ8CudaRule,
    MoeDownResidualQ8CudaRule,
    MoeGateUpSiluQ8CudaRule,
    QuantizeQ8CudaRule,
)
from sparkinfer.schedule.space import register

for _rule in (
    GemvCudaRule(),
    GemvExpertsCudaRule(),
    GemvQkvCudaRule(),
    GemvQ8CudaRule(),
    MoeGateUpSiluQ8CudaRule(),
    MoeDownResidualQ8CudaRule(),
    QuantizeQ8CudaRule(),
):
    register(_rule)
