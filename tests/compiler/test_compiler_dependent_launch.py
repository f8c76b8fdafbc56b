"""The step variant programmatic_launch (compiler/dependent_launch.py): a tiny model's decode
step built with it "on" has every CUDA kernel tagged for programmatic dependent launch and
waiting at its entry (codegen only, every arch; with nvcc for sm_90 through compile_model and a
schedules file), and a cpu step refuses it with a message; with "prefetch" the kernels that read
weights prefetch them before the wait, and on the full-size model those are the dense ones only.
The kernel-level checks (nvcc for every arch, the emulated and GPU runs) are
tests/schedule/test_dependent_launch_cuda.py's."""

import re
from pathlib import Path

import pytest

from sparkinfer.compiler import targets
from sparkinfer.compiler.dependent_launch import LAUNCH_TAG, PREFETCH_ATTR, WEIGHT_BYTES, mark_weight_prefetch
from sparkinfer.compiler.pipeline import build_step, compile_model, library_name
from sparkinfer.errors import SparkInferError
from sparkinfer.gguf_file import preset_config, type_map
from sparkinfer.model.qwen3moe import build_decode_step
from sparkinfer.model.spec import ENTRY, ENTRY_PROCESSED
from sparkinfer.schedule.arch import arch_facts
from sparkinfer.schedule.schedules import SchedulesFile
from tests.compiler.test_compiler_cuda import library_bytes
from tests.schedule.cuda_emulator import kernel_definition

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


# What may come ahead of a kernel's wait: its declarations, and its thread 0's prefetch of weights.
_BEFORE_WAIT = re.compile(r"\s*((__shared__ )?alignas\(\d+\) \w+ \w+\[\d+\];|if \(.*\) \{|\}|"
                          r"tvm_builtin_ptx_cp_async_bulk_prefetch\w*\(\(&\(\w+_ptr\[.*\]\)\), .*\);)\s*")


@pytest.mark.parametrize("arch", ["sm_90", "sm_120", "sm_121"])
def test_with_prefetch_the_kernels_that_read_weights_prefetch_them_before_the_wait(arch: str) -> None:
    step = build_decode_step(CONFIG, TYPES, programmatic_launch="prefetch")
    with targets.source_only():
        executable, _ = build_step(step, arch)
    source = _cuda_source(executable.mod)
    kernels = {m.group(1): kernel_definition(source, m.group(1)) for m in _KERNEL.finditer(source)}
    assert len(kernels) >= len(step.kernels)
    before_wait = {name: body[body.index("{") + 1:body.index("tvm_builtin_ptx_griddepcontrol_wait();")]
                   for name, body in kernels.items()}
    for name, before in before_wait.items():
        assert all(_BEFORE_WAIT.fullmatch(line) for line in before.splitlines() if line.strip()), (name, before)
    marked = _marks(step.mod)
    assert marked["gemv_q4_k_256x256"] == ["W"] and marked["rms_norm_256"] == ["w"]
    prefetching = {name for name, before in before_wait.items() if "cp_async_bulk_prefetch" in before}
    assert "gemv_q4_k_256x256_kernel" in prefetching
    assert all(any(name.startswith(f"{host}_kernel") for host in marked) for name in prefetching)


def _full_size_marks(least: int) -> dict[str, list[str]]:
    """sm_90's step on Qwen3-30B-A3B, marked: kernel -> the buffers it prefetches."""
    config = preset_config("qwen3-30b-a3b")
    step = build_decode_step(config, type_map(config, "q4_k_m"), activations="q8", projection_activations="q8",
                             head_activations="q8", q6_k_layout="planar", router_merge="gate_up",
                             programmatic_launch="prefetch")
    mark_weight_prefetch(step.mod, (ENTRY, ENTRY_PROCESSED), arch_facts("sm_90").l2_bytes // 4, least)
    return _marks(step.mod)


def _marks(mod: object) -> dict[str, list[str]]:
    """Kernel -> the buffers it prefetches, for the kernels `mark_weight_prefetch` marked."""
    return {gv.name_hint: list(f.attrs[PREFETCH_ATTR]) for gv, f in mod.functions.items()
            if getattr(f, "attrs", None) is not None and PREFETCH_ATTR in f.attrs}


_NEVER = ("moe_gate_up_silu_q8_routed_q4_k_q4_k_128x768x2048_top8", "moe_down_residual_q8_q4_k_128x2048x768_top8",
          "gemv_q8_q6_k_planar_151936x2048")


def test_on_the_full_size_model_only_the_weights_a_kernel_reads_whole_are_prefetched() -> None:
    """The dense projections, norms and router (up to a quarter of the L2 each), not the expert
    stacks (read by id), the LM head or the embedding table; and only weights, not the step's
    state (the token id, the position, the page table) or its sampling parameters."""
    marked = _full_size_marks(0)
    assert marked["gemv_qkv_q8_q4_k_4096x512x512x2048"] == ["Wq", "Wk", "Wv"]
    assert marked["gemv_q8_q4_k_2048x4096"] == ["W"] and marked["gemv_f32_128x2048"] == ["W"]
    assert marked["add_rms_norm_q8_1_2048"] == ["w"]
    assert marked["embedding_q4_k_151936x2048"] == []  # its token id is state, its table over the quarter
    assert all(marked[name] == [] for name in _NEVER)
    assert marked["qk_norm_rope_kv_append_32x4x128_p64"] == ["q_norm_w", "k_norm_w"]  # not pos, the page table
    assert all(marked[name] == [] for name in ("process_logits_151936", "sample_candidates_151936", "advance"))


def test_with_weights_only_the_projections_and_the_router_are_marked() -> None:
    """programmatic_launch "weights": only weights of WEIGHT_BYTES or more (the norms' 8 KiB and
    the token id are not)."""
    marked = _full_size_marks(WEIGHT_BYTES)
    assert {name: buffers for name, buffers in marked.items() if buffers} == {
        "gemv_qk_q8_q4_k_4096x512x2048": ["Wq", "Wk"], "gemv_q8_q6_k_planar_512x2048": ["W"],
        "gemv_q8_q4_k_2048x4096": ["W"], "gemv_f32_128x2048": ["W"],
        "gemv_qkv_q8_q4_k_4096x512x512x2048": ["Wq", "Wk", "Wv"]}


@pytest.mark.parametrize("value", ["prefetch", "weights"])
def test_the_t_token_steps_kernels_keep_their_plain_launch(value: str) -> None:
    """With every kernel launched programmatically the prefill's time to first token grew ~7 %
    on an H100 (bench/NOTES.md, "Session 22"): the prefetch pipelines mark the decode step's
    kernels only, and a kernel only the T-token steps call is built as with the variant off."""
    step = build_decode_step(CONFIG, TYPES, prefill_chunks=(16,), programmatic_launch=value)
    with targets.source_only():
        executable, _ = build_step(step, "sm_90")
    source = _cuda_source(executable.mod)
    kernels = [m.group(1) for m in _KERNEL.finditer(source)]
    decode = set(_marks(step.mod))
    chunk_only = [name for name in kernels if not any(name.startswith(f"{host}_kernel") for host in decode)]
    assert chunk_only and len(chunk_only) < len(kernels)
    for name in chunk_only:
        body = kernel_definition(source, name)
        assert "griddepcontrol" not in body and "prefetch" not in body, name


@pytest.mark.parametrize("value", ["on", "prefetch", "weights"])
def test_the_cpu_refuses_programmatic_launch(value: str) -> None:
    step = build_decode_step(CONFIG, TYPES, programmatic_launch=value)
    with pytest.raises(SparkInferError, match=rf"programmatic_launch='{value}' is for the CUDA archs only \(.*launches no kernels"):
        build_step(step, "cpu")


def test_an_unknown_value_is_refused() -> None:
    with pytest.raises(SparkInferError, match=r"programmatic_launch must be one of off, on, prefetch, weights, got 'yes'"):
        build_decode_step(CONFIG, TYPES, programmatic_launch="yes")


@pytest.mark.slow
@pytest.mark.skipif(targets.find_nvcc() is None, reason="nvcc not found (CUDA_HOME, /usr/local/cuda or PATH)")
@pytest.mark.parametrize("value", ["on", "prefetch", "weights"])
def test_a_schedules_file_turns_it_on_for_a_whole_build(value: str, tmp_path: Path) -> None:
    schedules = SchedulesFile("sm_90", {}, step={"programmatic_launch": value}).write(tmp_path / "sm_90.json")
    result = compile_model(CONFIG, TYPES, "sm_90", tmp_path / "out", prefill_chunks=(), schedules=schedules)
    library = library_bytes(result.directory / result.manifest.library)
    # each of the tiny step's kernels lowers to one CUDA kernel; with "weights" only those with
    # weights of WEIGHT_BYTES or more are tagged (few of the tiny model's)
    tagged = library.count(LAUNCH_TAG.encode())
    if value == "weights":
        assert 0 < tagged < len(result.manifest.kernels)
    else:
        assert tagged == len(result.manifest.kernels)
    fatbins = targets.embedded_fatbins(result.directory / result.manifest.library)
    assert targets.fatbin_entries(fatbins[0]) == [targets.FatbinEntry("cubin", "sm_90a")]
