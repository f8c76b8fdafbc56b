"""The step variant chunk_activations="q8" (the cpu build's): where the T-token step rounds its
GEMM inputs to the int8 blocks' values (kernels.gemv_q8.round_q8_1_rows), and its bad inputs and
refusals. Its numbers against the token loop and the rounding reference:
tests/runtime/test_runtime_prefill.py, `test_the_int8_step_prefills_as_its_reference`."""

from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as T

from sparkinfer.compiler.pipeline import build_step
from sparkinfer.errors import SparkInferError
from sparkinfer.gguf_file import preset_config, type_map
from sparkinfer.model.qwen3moe import build_decode_step
from sparkinfer.model.spec import chunk_entry
from sparkinfer.schedule.schedules import SchedulesFile, SchedulesFileError

from tests.model.test_model_fused_step import launches

TINY = preset_config("tiny")
TYPES = type_map(TINY, "q4_k_m")
# cpu.json's step
INT8_STEP = {"activations": "q8", "projection_activations": "q8", "head_activations": "q8"}
CHUNK = 8


def test_each_input_the_decode_step_reads_as_int8_is_rounded_in_the_chunks() -> None:
    """Per layer the attention input, the attention output, the experts' input and their SiLU
    activations; once the LM head's input (score_T) or its last row through the decode step's
    own int8 head (prefill_T). Without the variant, none."""
    step = build_decode_step(TINY, TYPES, prefill_chunks=(CHUNK,), chunk_activations="q8", **INT8_STEP)
    score, prefill = (launches(step, chunk_entry(CHUNK, all_logits)) for all_logits in (True, False))
    assert score["round_q8_1_rows"] == 4 * TINY.n_layers + 1
    assert prefill["round_q8_1_rows"] == 4 * TINY.n_layers
    assert prefill["quantize_q8_1"] == prefill["gemv_q8"] == 1 and "gemv" not in prefill
    plain = build_decode_step(TINY, TYPES, prefill_chunks=(CHUNK,), **INT8_STEP)
    assert "round_q8_1_rows" not in launches(plain, chunk_entry(CHUNK, True))
    assert launches(plain, chunk_entry(CHUNK, False))["gemv"] == 1


def test_only_the_inputs_of_int8_kernels_are_rounded() -> None:
    """A layer whose V is F16 keeps float projections in the decode step: its attention input and
    output stay as they are in the chunks too; with float experts only the projections round."""
    types = dict(TYPES) | {"blk.0.attn_v.weight": T.F16}
    step = build_decode_step(TINY, types, prefill_chunks=(CHUNK,), chunk_activations="q8", **INT8_STEP)
    assert launches(step, chunk_entry(CHUNK, True))["round_q8_1_rows"] == 4 * TINY.n_layers + 1 - 2
    projections = build_decode_step(TINY, TYPES, prefill_chunks=(CHUNK,), chunk_activations="q8",
                                    projection_activations="q8")
    assert launches(projections, chunk_entry(CHUNK, True))["round_q8_1_rows"] == 2 * TINY.n_layers


def test_bad_values_half_operands_and_the_cuda_archs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SparkInferError, match="chunk_activations must be one of f32, q8, got 'int4'"):
        build_decode_step(TINY, TYPES, chunk_activations="int4", **INT8_STEP)
    with pytest.raises(SparkInferError, match="chunk_activations='q8' rounds the T-token step's GEMM inputs to the "
                                              "int8 blocks' values for float32 products: it needs "
                                              "chunk_operands='f32', got 'f16'"):
        build_decode_step(TINY, TYPES, chunk_activations="q8", chunk_operands="f16", **INT8_STEP)
    step = build_decode_step(TINY, TYPES, chunk_activations="q8", **INT8_STEP)
    with pytest.raises(SparkInferError, match=r"chunk_activations='q8' is for the cpu build only \(the T-token "
                                              r"step's GEMM inputs rounded"):
        build_step(step, "sm_90")
    assert_schedules_files_keep_it_for_the_cpu(tmp_path, "sm_120", "chunk_activations", "q8",
                                               r"the rounding kernel has no CUDA schedule")


def assert_schedules_files_keep_it_for_the_cpu(tmp_path: Path, arch: str, name: str, value: str, why: str) -> None:
    """A schedules file of CUDA `arch` picking the cpu-only step variant name=value is refused,
    its message ending in `why` (a regex); the cpu's file takes it."""
    path = SchedulesFile(arch, {}, step={name: value}).write(tmp_path / f"{arch}.json")
    with pytest.raises(SchedulesFileError, match=rf"step variant {name}='{value}' is for the cpu build only "
                                                 rf"\(.*{why}\)"):
        SchedulesFile.read(path)
    cpu = SchedulesFile("cpu", {}, step={name: value}).write(tmp_path / "cpu.json")
    assert SchedulesFile.read(cpu).step == {name: value}
