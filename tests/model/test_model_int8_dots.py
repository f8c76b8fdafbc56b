"""The step variant int8_dots="lanes" (the cpu build's): which kernels the decode step launches
in the lane form, the CPU step's attention tiles, and the bad inputs and refusals of both. The
lane form's values: tests/kernels/test_gemv_q8.py and test_moe_q8.py (unscheduled, against numpy),
tests/schedule/test_gemv_q8_cpu.py (scheduled), tests/model/test_model_cpu_e2e.py (the step)."""

from pathlib import Path

import pytest

from sparkinfer.compiler.pipeline import CPU_ATTENTION_TILES, build_step
from sparkinfer.errors import SparkInferError
from sparkinfer.gguf_file import preset_config, type_map
from sparkinfer.model.qwen3moe import build_decode_step
from sparkinfer.model.spec import ENTRY
from tests.model.test_model_chunk_activations import INT8_STEP, assert_schedules_files_keep_it_for_the_cpu
from tests.model.test_model_fused_step import launches

TINY = preset_config("tiny")
TYPES = type_map(TINY, "q4_k_m")
INT8_GEMVS = ("gemv_q8", "gemv_qkv_q8", "moe_gate_up_silu_q8", "moe_down_residual_q8")


def test_the_lane_form_replaces_every_int8_gemv_and_nothing_else() -> None:
    sub_block = launches(build_decode_step(TINY, TYPES, **INT8_STEP), ENTRY)
    lanes = launches(build_decode_step(TINY, TYPES, int8_dots="lanes", **INT8_STEP), ENTRY)
    assert all(sub_block[f] > 0 and f not in lanes and lanes[f"{f}_lanes"] == sub_block[f] for f in INT8_GEMVS)
    assert {f: n for f, n in lanes.items() if not f.endswith("_lanes")} == \
        {f: n for f, n in sub_block.items() if f not in INT8_GEMVS}
    routed = launches(build_decode_step(TINY, TYPES, int8_dots="lanes", router_merge="gate_up", **INT8_STEP), ENTRY)
    assert routed["moe_gate_up_silu_q8_routed_lanes"] == TINY.n_layers and "router_topk" not in routed


def test_attention_tiles_shape_the_float32_attention_only() -> None:
    step = build_decode_step(TINY, TYPES, n_splits=1, attention_tiles=CPU_ATTENTION_TILES)
    (use,) = [u for u in step.kernels if u.factory == "paged_decode_attention"]
    assert use.args[-2:] == CPU_ATTENTION_TILES
    with pytest.raises(SparkInferError, match=r"attention_tiles=\(2, 16\) shapes the float32 attention with a "
                                              r"combine launch \(decode_attention='simt', attention_merge="
                                              r"'separate'\), got decode_attention='mma', attention_merge='separate'"):
        build_decode_step(TINY, TYPES, attention_tiles=(2, 16), decode_attention="mma")


def test_bad_values_and_the_cuda_archs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SparkInferError, match="int8_dots must be one of sub_block, lanes, got 'rows'"):
        build_decode_step(TINY, TYPES, int8_dots="rows", **INT8_STEP)
    step = build_decode_step(TINY, TYPES, int8_dots="lanes", **INT8_STEP)
    with pytest.raises(SparkInferError, match=r"int8_dots='lanes' is for the cpu build only \(a lane per word of a "
                                              r"block of 32 in a SIMD register across the row"):
        build_step(step, "sm_121")
    assert_schedules_files_keep_it_for_the_cpu(tmp_path, "sm_90", "int8_dots", "lanes", r"the lane form has no CUDA schedule")
