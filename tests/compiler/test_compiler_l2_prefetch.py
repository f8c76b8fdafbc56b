"""compiler/l2_prefetch.py's `prefetch_experts` on a scheduled kernel: where it puts the prefetch
and how it refuses a kernel it cannot place one in. What the prefetch covers, run in the CUDA
emulator, and the full-size kernel's CUDA are tests/schedule/test_gemv_q8_cuda.py's."""

import pytest
from gguf import GGMLQuantizationType as T
from tvm import s_tir, tirx

from sparkinfer.compiler.l2_prefetch import prefetch_experts
from sparkinfer.kernels import moe_q8
from sparkinfer.schedule.arch import arch_facts
from sparkinfer.schedule.space import kernel_use, schedule_kernel

ARGS = (T.Q4_K, T.Q4_K, 16, 4, 256, 256, T.Q4_K)


def _scheduled(**spec: object) -> tirx.PrimFunc:
    """The small prefetching gate/up scheduled for sm_90 (not yet prefetching), its attribute's
    entries replaced by `spec`'s."""
    func = moe_q8.moe_gate_up_silu_q8_routed_prefetch(*ARGS)
    use = kernel_use("moe_q8", "moe_gate_up_silu_q8_routed_prefetch", *ARGS)
    func = schedule_kernel(func, use, arch_facts("sm_90"))
    wanted = {**dict(func.attrs[moe_q8.PREFETCH_EXPERTS_ATTR]), **spec}
    return func.with_attr(moe_q8.PREFETCH_EXPERTS_ATTR, wanted)


def _block_names(stmt: tirx.Stmt) -> list[str]:
    """The blocks under `stmt`, in program order."""
    if isinstance(stmt, s_tir.SBlockRealize):
        return [stmt.block.name_hint, *_block_names(stmt.block.body)]
    if isinstance(stmt, tirx.SeqStmt):
        return [name for s in stmt.seq for name in _block_names(s)]
    children = [getattr(stmt, f, None) for f in ("body", "then_case", "else_case")]
    return [name for child in children if isinstance(child, tirx.Stmt) for name in _block_names(child)]


def test_the_prefetch_goes_right_after_the_stage_it_names() -> None:
    names = _block_names(prefetch_experts(_scheduled()).body)
    assert names.count("prefetch_experts") == 1
    at = names.index("prefetch_experts")
    assert names[at - 1] == "weights" and "ids_local" in names[:at] and "Wg_local" in names[at:]


def test_a_kernel_without_the_stage_is_refused_by_name() -> None:
    func = _scheduled(after="top_k")
    with pytest.raises(ValueError, match=r"moe_gate_up_silu_q8_routed_prefetch_q4_k_q4_k_q4_k_16x256x256_top4: "
                                         r"no stage 'top_k' under its thread blocks' loops"):
        prefetch_experts(func)


def test_a_grid_with_fewer_blocks_than_experts_is_refused_by_count() -> None:
    """Each expert needs a thread block at least: xq's 64 words taken as the ids of 64 experts
    leave the small kernel's 32 blocks (8 row blocks x 4 slots) fewer than one an expert."""
    with pytest.raises(ValueError, match="32 thread blocks cannot share the prefetch of 64 experts"):
        prefetch_experts(_scheduled(ids="xq"))
