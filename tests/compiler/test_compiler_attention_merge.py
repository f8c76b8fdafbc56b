"""The step variant attention_merge="last_block" through the compiler: the tiny model's step
with it builds for every CUDA arch (codegen) with every kernel but the attention's as the step
without it has them, a schedules file picks it for an nvcc build, and a cpu step refuses it.
The kernel-level checks (nvcc for every arch, the emulated and GPU runs) are
tests/schedule/test_attention_cuda.py's; the emulated steps tests/model/test_model_attention_merge.py's."""

import re
from pathlib import Path

import pytest

from sparkinfer.compiler import targets
from sparkinfer.compiler.pipeline import build_step, compile_model
from sparkinfer.errors import SparkInferError
from sparkinfer.gguf_file import preset_config, type_map
from sparkinfer.model.qwen3moe import build_decode_step
from sparkinfer.model.spec import ARRIVALS
from sparkinfer.schedule.schedules import SchedulesFile
from tests.compiler.test_compiler_dependent_launch import _cuda_source

CONFIG = preset_config("tiny")
TYPES = type_map(CONFIG, "q4_k_m")
_KERNEL = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)_kernel\(')


def kernel_sources(arch: str, **variants: str) -> dict[str, str]:
    """Each CUDA kernel of the tiny step's build for `arch` with the step `variants`, by name:
    its definition's text."""
    with targets.source_only():
        executable, _ = build_step(build_decode_step(CONFIG, TYPES, **variants), arch)
    source = _cuda_source(executable.mod)
    starts = [(m.group(1), m.start()) for m in _KERNEL.finditer(source)]
    return {name: source[start:end] for (name, start), (_, end) in zip(starts, [*starts[1:], ("", len(source))])}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm_90", "sm_120", "sm_121"])
def test_only_the_attention_kernels_change(arch: str) -> None:
    separate, merged = kernel_sources(arch), kernel_sources(arch, attention_merge="last_block")
    attention = {name for name in separate if name.startswith(("paged_decode_attention", "attention_combine"))}
    assert len(attention) == 2
    (new,) = set(merged) - set(separate)
    assert new.startswith("paged_decode_attention_merged") and set(separate) - set(merged) == attention
    assert {name: merged[name] for name in merged if name != new} == \
        {name: separate[name] for name in separate if name not in attention}
    assert "tvm_builtin_cuda_atomic_add(" in merged[new]


def test_the_cpu_refuses_the_merge() -> None:
    step = build_decode_step(CONFIG, TYPES, attention_merge="last_block")
    with pytest.raises(SparkInferError, match=r"attention_merge='last_block' is for the CUDA archs only \(.*one "
                                              r"kernel merges nothing"):
        build_step(step, "cpu")


@pytest.mark.slow
@pytest.mark.skipif(targets.find_nvcc() is None, reason="nvcc not found (CUDA_HOME, /usr/local/cuda or PATH)")
def test_a_schedules_file_picks_it_for_a_whole_build(tmp_path: Path) -> None:
    schedules = SchedulesFile("sm_90", {}, step={"attention_merge": "last_block"}).write(tmp_path / "sm_90.json")
    result = compile_model(CONFIG, TYPES, "sm_90", tmp_path / "out", prefill_chunks=(), schedules=schedules)
    assert ARRIVALS in {inp.name for inp in result.manifest.inputs if inp.role == "state"}
    assert any(k["factory"] == "paged_decode_attention_merged" for k in result.manifest.kernels)
    assert not any(k["factory"] == "attention_combine" for k in result.manifest.kernels)
