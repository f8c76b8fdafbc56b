"""The step variant router_merge="last_block" through the compiler: the tiny model's step with it
builds for every CUDA arch (codegen) with every kernel but the router's as the step without it
has them, a schedules file picks it for an nvcc build, and a cpu step refuses it (a cpu schedules
file too: tests/schedule/test_schedules_step.py). The kernel-level checks (nvcc for
every arch, the emulated and GPU runs) are tests/schedule/test_router_cuda.py's; the emulated
steps tests/model/test_model_router_merge.py's."""

from pathlib import Path

import pytest

from sparkinfer.compiler import targets
from sparkinfer.compiler.pipeline import build_step, compile_model
from sparkinfer.errors import SparkInferError
from sparkinfer.model.qwen3moe import build_decode_step
from sparkinfer.model.spec import ROUTER_ARRIVALS
from sparkinfer.schedule.schedules import SchedulesFile
from tests.compiler.test_compiler_attention_merge import CONFIG, TYPES, kernel_sources


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm_90", "sm_120", "sm_121"])
def test_only_the_router_kernels_change(arch: str) -> None:
    separate = kernel_sources(arch)
    merged = kernel_sources(arch, router_merge="last_block")
    router = {name for name in separate if name.startswith(("router_topk", "gemv_f32_"))}
    assert len(router) == 2
    (new,) = set(merged) - set(separate)
    assert new.startswith("router_gemv_topk_f32_") and set(separate) - set(merged) == router
    assert {name: merged[name] for name in merged if name != new} == \
        {name: separate[name] for name in separate if name not in router}
    assert "tvm_builtin_cuda_atomic_add(" in merged[new]


def test_the_cpu_refuses_the_merge() -> None:
    step = build_decode_step(CONFIG, TYPES, router_merge="last_block")
    with pytest.raises(SparkInferError, match=r"router_merge='last_block' is for the CUDA archs only \(an atomic "
                                              r"count and memory fences between CUDA thread blocks; the cpu build "
                                              r"has no thread blocks to count\)"):
        build_step(step, "cpu")


@pytest.mark.slow
@pytest.mark.skipif(targets.find_nvcc() is None, reason="nvcc not found (CUDA_HOME, /usr/local/cuda or PATH)")
def test_a_schedules_file_picks_it_for_a_whole_build(tmp_path: Path) -> None:
    schedules = SchedulesFile("sm_90", {}, step={"router_merge": "last_block"}).write(tmp_path / "sm_90.json")
    result = compile_model(CONFIG, TYPES, "sm_90", tmp_path / "out", prefill_chunks=(), schedules=schedules)
    assert ROUTER_ARRIVALS in {inp.name for inp in result.manifest.inputs if inp.role == "state"}
    assert any(k["factory"] == "router_gemv_topk" for k in result.manifest.kernels)
    assert not any(k["factory"] == "router_topk" for k in result.manifest.kernels)
