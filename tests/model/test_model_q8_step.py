"""The int8-activation variant of the decode step: which kernels it uses, and its bad input."""

from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as T

from sparkinfer.compiler.pipeline import compile_model

from sparkinfer.errors import SparkInferError
from sparkinfer.gguf_file import preset_config, type_map
from sparkinfer.model.qwen3moe import build_decode_step
from sparkinfer.schedule.schedules import SchedulesFile
from tests.model.test_model_fused_step import launches

TINY = preset_config("tiny")


def _factories(step) -> list[tuple[str, str]]:  # noqa: ANN001
    return [(k.family, k.factory) for k in step.kernels]


def test_q8_runs_the_experts_on_int8_activations() -> None:
    step = build_decode_step(TINY, type_map(TINY, "q4_k_m"), activations="q8")
    factories = _factories(step)
    assert ("moe", "moe_gate_up_silu") not in factories and ("moe", "moe_down_residual") not in factories
    assert {("moe_q8", "moe_gate_up_silu_q8"), ("moe_q8", "moe_down_residual_q8")} <= set(factories)
    # the FFN input is quantized in its norm's launch, the SiLU activations in gate/up's epilogue
    assert ("gemv_q8", "add_rms_norm_q8_1") in factories and ("norm", "add_rms_norm") not in factories
    assert ("gemv_q8", "quantize_q8_1") not in factories
    f32_launches = sum(launches(build_decode_step(TINY, type_map(TINY, "q4_k_m"))).values())
    assert sum(launches(step).values()) == f32_launches
    # the float path is the default and has none of them
    default = _factories(build_decode_step(TINY, type_map(TINY, "q4_k_m")))
    assert not any(family in ("moe_q8", "gemv_q8") for family, _ in default)


def test_q8_keeps_float_experts_whose_type_has_no_int8_form() -> None:
    types = type_map(TINY, "q4_k_m")
    for name in types:
        if name.endswith("ffn_up_exps.weight"):
            types[name] = T.F16
    factories = _factories(build_decode_step(TINY, types, activations="q8"))
    assert ("moe", "moe_gate_up_silu") in factories and ("moe_q8", "moe_gate_up_silu_q8") not in factories
    assert ("norm", "add_rms_norm") in factories and ("gemv_q8", "add_rms_norm_q8_1") not in factories


def test_an_unknown_activations_variant_is_named() -> None:
    with pytest.raises(SparkInferError, match="activations must be one of f32, q8, got 'int4'"):
        build_decode_step(TINY, type_map(TINY, "q4_k_m"), activations="int4")


@pytest.mark.slow
def test_q8_step_follows_the_reference(tmp_path: Path) -> None:
    """The tiny decisive Q4_K_M model with int8 expert activations, compiled for LLVM through a
    schedules file that picks the variant. Int8 activations cost accuracy the f32 step does
    not (seen: 2.6e-2 of the largest |logit| on these large-gain weights, 15 of 16 greedy
    tokens), so the bounds are looser than tests/model/test_model_cpu_e2e.py's."""
    from tests.model.test_model_cpu_e2e import run_and_compare

    from ._harness import write_decisive_model

    model = write_decisive_model(tmp_path / "model.gguf", TINY, "q4_k_m", seed=3)
    types = {name: info.ggml_type for name, info in model.tensors.items()}
    schedules = SchedulesFile("cpu", {}, step={"activations": "q8"}).write(tmp_path / "cpu.json")
    result = compile_model(TINY, types, "cpu", tmp_path / "compiled", schedules=schedules)
    assert "moe_down_residual_q8" in {k["factory"] for k in result.manifest.kernels}
    got, want, err32, err16 = run_and_compare(model, result.manifest, [1, 100, 7, 512, 33, 901, 2, 64], 16, 4)
    assert sum(g == w for g, w in zip(got, want)) >= 14, (got, want)
    assert err16 < 5e-2, err16
