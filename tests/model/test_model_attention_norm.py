"""The step variant attention_norm="prologue" (kernels.gemv_q8.gemv_qkv_q8_normed, gemv_q8_normed):
the rms_norm_q8_1 launch it saves in each layer with int8 projections, its bad inputs and
refusals, and in the CUDA emulator the tiny model's decode steps with it against those without
(the same tokens; the logits within what a value quantized the other way moves)."""

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from sparkinfer.compiler.pipeline import build_step
from sparkinfer.errors import SparkInferError
from sparkinfer.gguf_file import preset_config, type_map
from sparkinfer.model.qwen3moe import build_decode_step

from tests.gpu_prebuild import can_compile
from tests.model._harness import write_decisive_model
from tests.model.test_model_fused_step import launches

TINY = preset_config("tiny")
TYPES = type_map(TINY, "q4_k_m")
# schedules/sm_90.json's int8 step, where the variant applies
INT8_STEP = {"activations": "q8", "projection_activations": "q8", "head_activations": "q8",
             "router_merge": "gate_up", "q6_k_layout": "planar"}


def test_the_prologue_saves_the_attention_norm_launch_of_every_layer() -> None:
    separate = launches(build_decode_step(TINY, TYPES, **INT8_STEP))
    prologue = launches(build_decode_step(TINY, TYPES, **INT8_STEP, attention_norm="prologue"))
    assert separate["rms_norm_q8_1"] == TINY.n_layers + 1
    assert prologue["rms_norm_q8_1"] == 1  # the output norm, the LM head's input
    # Q4_K_M: Q and K (and V where it is Q4_K too) in one launch, a Q6_K V in its own
    assert prologue["gemv_qkv_q8_normed"] == separate["gemv_qkv_q8"] == TINY.n_layers
    assert "gemv_qkv_q8" not in prologue
    assert prologue["gemv_q8_normed"] == separate["gemv_q8"] - prologue["gemv_q8"] > 0
    assert sum(separate.values()) - sum(prologue.values()) == TINY.n_layers


def test_layers_with_float_projections_keep_their_norm_launch() -> None:
    """An F16 V has no int8 form: that layer's projections stay float, normalized by rms_norm."""
    types = dict(TYPES) | {"blk.0.attn_v.weight": T.F16}
    counts = launches(build_decode_step(TINY, types, **INT8_STEP, attention_norm="prologue"))
    assert counts["rms_norm"] == 1 and counts["gemv_qkv_q8_normed"] == TINY.n_layers - 1


def test_bad_values_and_steps_without_int8_projections_are_refused() -> None:
    with pytest.raises(SparkInferError, match="attention_norm must be one of separate, prologue, got 'inside'"):
        build_decode_step(TINY, TYPES, **INT8_STEP, attention_norm="inside")
    with pytest.raises(SparkInferError, match="attention_norm='prologue' normalizes the int8 attention input inside "
                                              "the Q/K/V kernels: it needs projection_activations='q8', got 'f32'"):
        build_decode_step(TINY, TYPES, activations="q8", attention_norm="prologue")
    step = build_decode_step(TINY, TYPES, **INT8_STEP, attention_norm="prologue")
    with pytest.raises(SparkInferError, match=r"attention_norm='prologue' is for the CUDA archs only \(the norm "
                                              r"redone by every CUDA thread block"):
        build_step(step, "cpu")


@pytest.mark.slow
@pytest.mark.skipif(not can_compile(), reason="the CUDA emulator builds with TVM's compiler")
def test_emulated_steps_follow_the_separate_norms(tmp_path: Path) -> None:
    """Three decode steps of the tiny model on sm_90's int8 step, with the norm in the Q/K/V
    kernels and in its own launch: the same tokens, and logits within 1e-3 of the largest (the
    blocks sum their squares in another order than rms_norm_q8_1, so a value may round to the
    other int8; measured on the emulator: the same logits, bit for bit)."""
    from tests.model.emulated_step import emulated_kernels, run_decode, step_inputs

    model = write_decisive_model(tmp_path / "tiny.gguf", TINY, "q4_k_m")
    separate = build_decode_step(TINY, TYPES, **INT8_STEP)
    prologue = build_decode_step(TINY, TYPES, **INT8_STEP, attention_norm="prologue")
    gpu = emulated_kernels(separate, prologue)
    runs = []
    for step in (separate, prologue):
        inputs = step_inputs(step, model, n_pages=2)
        runs.append([run_decode(gpu, step, inputs) for _ in range(3)])
    for (want, want_next), (got, got_next) in zip(*runs):
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * np.abs(want).max())
        assert got_next == want_next
