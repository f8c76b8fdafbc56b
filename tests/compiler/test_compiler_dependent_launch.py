"""The step variant programmatic_launch (compiler/dependent_launch.py): a tiny model's decode
step built with it "on" has every CUDA kernel tagged for programmatic dependent launch and
waiting at its entry (codegen only, every arch; with nvcc for sm_90 through compile_model and a
schedules file), and a cpu step refuses it with a message. The kernel-level checks (nvcc for
every arch, the emulated and GPU runs) are tests/schedule/test_dependent_launch_cuda.py's."""

import re
from pathlib import Path

import pytest

from sparkinfer.compiler import targets
from sparkinfer.compiler.dependent_launch import LAUNCH_TAG
from sparkinfer.compiler.pipeline import build_step, compile_model, library_name
from sparkinfer.errors import SparkInferError
from sparkinfer.gguf_file import preset_config, type_map
from sparkinfer.model.qwen3moe import build_decode_step
from sparkinfer.schedule.schedules import SchedulesFile
from tests.compiler.test_compiler_cuda import library_bytes

CONFIG = preset_config("tiny")
TYPES = type_map(CONFIG, "q4_k_m")
_KERNEL = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\([^)]*\) \{')


def _cuda_source(module: object) -> str:
    pending = [module]
    while pending:
        mod = pending.pop()
        if mod.kind == "cuda":
            return str(mod.inspect_source("cuda"))
        pending.extend(mod.imports)
    raise AssertionError("no CUDA module in the build")


@pytest.mark.parametrize("arch", ["sm_90", "sm_120", "sm_121"])
def test_every_kernel_of_the_step_waits_at_its_entry_and_carries_the_tag(arch: str, tmp_path: Path) -> None:
    step = build_decode_step(CONFIG, TYPES, programmatic_launch="on")
    with targets.source_only():  # codegen only
        executable, _ = build_step(step, arch)
    source = _cuda_source(executable.mod)
    bodies = [source[m.end():] for m in _KERNEL.finditer(source)]
    assert len(bodies) >= len(step.kernels)
    assert all(body.lstrip().startswith("tvm_builtin_ptx_griddepcontrol_wait();") for body in bodies)
    library = tmp_path / library_name(arch)
    executable.export_library(str(library))
    assert library_bytes(library).count(LAUNCH_TAG.encode()) == len(bodies)


def test_the_step_is_built_as_before_with_the_variant_off() -> None:
    step = build_decode_step(CONFIG, TYPES)
    assert step.programmatic_launch == "off"
    with targets.source_only():
        executable, _ = build_step(step, "sm_90")
    assert "griddepcontrol" not in _cuda_source(executable.mod)


def test_the_cpu_refuses_programmatic_launch() -> None:
    step = build_decode_step(CONFIG, TYPES, programmatic_launch="on")
    with pytest.raises(SparkInferError, match=r"programmatic_launch='on' is for the CUDA archs only \(.*launches no kernels"):
        build_step(step, "cpu")


def test_an_unknown_value_is_refused() -> None:
    with pytest.raises(SparkInferError, match=r"programmatic_launch must be one of off, on, got 'yes'"):
        build_decode_step(CONFIG, TYPES, programmatic_launch="yes")


@pytest.mark.slow
@pytest.mark.skipif(targets.find_nvcc() is None, reason="nvcc not found (CUDA_HOME, /usr/local/cuda or PATH)")
def test_a_schedules_file_turns_it_on_for_a_whole_build(tmp_path: Path) -> None:
    schedules = SchedulesFile("sm_90", {}, step={"programmatic_launch": "on"}).write(tmp_path / "sm_90.json")
    result = compile_model(CONFIG, TYPES, "sm_90", tmp_path / "out", prefill_chunks=(), schedules=schedules)
    library = library_bytes(result.directory / result.manifest.library)
    # each of the tiny step's kernels lowers to one CUDA kernel
    assert library.count(LAUNCH_TAG.encode()) == len(result.manifest.kernels)
    fatbins = targets.embedded_fatbins(result.directory / result.manifest.library)
    assert targets.fatbin_entries(fatbins[0]) == [targets.FatbinEntry("cubin", "sm_90a")]
