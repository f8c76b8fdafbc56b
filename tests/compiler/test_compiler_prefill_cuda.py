"""CUDA build of the whole module with a T-token step beside the decode step (no GPU needed):
the tiny model with prefill_chunks=(16,) for sm_90, one nvcc fatbin, every chunk kernel
scheduled by its rule in schedule/prefill_cuda.py (tests/schedule/test_prefill_cuda.py builds
the chunk kernels with nvcc for every arch). The CUDA archs build T-token steps of 128, 512 and
2048 by default (pipeline.DEFAULT_PREFILL_CHUNKS); one small size keeps this build short."""

from pathlib import Path

import pytest

from sparkinfer.compiler import targets
from sparkinfer.compiler.pipeline import compile_model, default_prefill_chunks
from sparkinfer.gguf_file import preset_config, type_map

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(targets.find_nvcc() is None, reason="nvcc not found (CUDA_HOME, /usr/local/cuda or PATH)"),
]

CHUNK_FAMILIES = {"gemm", "moe_chunk", "prefill_attention", "chunk"}


@pytest.mark.parametrize("arch", ["sm_90"])
def test_step_with_a_chunk_step_builds_for_the_arch(arch: str, tmp_path: Path) -> None:
    config = preset_config("tiny")
    result = compile_model(config, type_map(config, "q4_k_m"), arch, tmp_path, prefill_chunks=(16,))
    manifest = result.manifest
    assert manifest.prefill_chunks == (16,) and default_prefill_chunks(arch) == (128, 512, 2048)
    assert manifest.fatbins == [{"kind": "cubin", "arch": arch + "a"}]
    chunk_kernels = [k for k in manifest.kernels if k["family"] in CHUNK_FAMILIES]
    # the attention in the form sm_90.json picks (bench/NOTES.md "Session 14", call 2)
    assert {k["factory"] for k in chunk_kernels} >= {"gemm", "grouped_gate_up_silu_f16", "grouped_gemm_f16", "moe_sort",
                                                     "causal_prefill_attention_registers"}
    for kernel in chunk_kernels:
        assert kernel["schedule"]["rule"].startswith("sparkinfer.schedule."), kernel


@pytest.mark.parametrize("arch", ["sm_90", "sm_120", "sm_121"])
def test_the_registers_attention_form_builds_for_the_arch(arch: str, tmp_path: Path) -> None:
    """A schedules file's step variant attention_form "registers": the T-token step's attention
    is kernels/prefill_attention.py's causal_prefill_attention_registers, taken as it is by its
    rule, and nvcc builds the step for the arch (tests/schedule/test_prefill_attention_cuda.py
    checks the kernel against numpy)."""
    from sparkinfer.schedule.schedules import SchedulesFile

    config = preset_config("tiny")
    schedules = SchedulesFile(arch, {}, step={"attention_form": "registers"}).write(tmp_path / f"{arch}.json")
    result = compile_model(config, type_map(config, "q4_k_m"), arch, tmp_path / "out", prefill_chunks=(16,),
                           schedules=schedules)
    assert result.manifest.fatbins == [{"kind": "cubin", "arch": arch + "a"}]
    attention = [k for k in result.manifest.kernels if k["factory"].startswith("causal_prefill_attention")]
    assert attention and all(k["factory"] == "causal_prefill_attention_registers" for k in attention)
    assert all(k["schedule"]["rule"].endswith("CausalPrefillAttentionRegistersCudaRule") for k in attention)


def test_a_kernel_its_launch_would_refuse_stops_the_build_by_name(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """The tiny model's tensor-core attention (its read_ahead form, which sm_90.json no longer
    picks) with its static tiles back (44 KiB dynamic + 10.3 KiB static:
    CUDA_ERROR_INVALID_VALUE on a GPU) fails the build before nvcc runs."""
    from sparkinfer.errors import SparkInferError
    from sparkinfer.schedule import prefill_cuda
    from sparkinfer.schedule.schedules import SchedulesFile

    monkeypatch.setattr(prefill_cuda, "_dynamic_tile_bytes", lambda sch, tiles: 1 << 30)  # P and the state static
    config = preset_config("tiny")
    read_ahead = SchedulesFile("sm_90", {}, step={"attention_form": "read_ahead"}).write(tmp_path / "sm_90.json")
    with pytest.raises(SparkInferError, match=r"cannot launch on sm_90 .*causal_prefill_attention_16x\d+x\d+x64_p\d+_f16"):
        compile_model(config, type_map(config, "q4_k_m"), "sm_90", tmp_path / "out", prefill_chunks=(16,),
                      schedules=read_ahead)
    assert not any(tmp_path.rglob("manifest.json"))  # nothing half-written
