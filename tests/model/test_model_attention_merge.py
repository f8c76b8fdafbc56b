"""The step variant attention_merge="last_block" (kernels.attention.paged_decode_attention_merged):
the launches it saves, its `arrivals` state, its bad inputs, and in the CUDA emulator the tiny
model's decode steps with it giving the logits of the step without it, bit for bit."""

from pathlib import Path

import numpy as np
import pytest

from sparkinfer.errors import SparkInferError
from sparkinfer.gguf_file import preset_config, type_map
from sparkinfer.model.qwen3moe import build_decode_step
from sparkinfer.model.spec import ARRIVALS

from tests.gpu_prebuild import can_compile
from tests.model._harness import write_decisive_model
from tests.model.test_model_fused_step import launches

TINY = preset_config("tiny")
TYPES = type_map(TINY, "q4_k_m")


@pytest.mark.parametrize("preset", ["tiny", "tiny-dense"])
def test_the_merge_saves_the_combine_launch_of_every_layer(preset: str) -> None:
    config = preset_config(preset)
    separate = launches(build_decode_step(config, type_map(config, "q4_k_m")))
    merged = launches(build_decode_step(config, type_map(config, "q4_k_m"), attention_merge="last_block"))
    assert separate["paged_decode_attention"] == separate["attention_combine"] == config.n_layers
    assert merged["paged_decode_attention_merged"] == config.n_layers
    assert "paged_decode_attention" not in merged and "attention_combine" not in merged
    assert sum(separate.values()) - sum(merged.values()) == config.n_layers


def test_the_counts_are_state_of_one_int_a_kv_head() -> None:
    step = build_decode_step(TINY, TYPES, attention_merge="last_block")
    (arrivals,) = [inp for inp in step.inputs if inp.name == ARRIVALS]
    assert (arrivals.role, arrivals.dtype, arrivals.shape) == ("state", "int32", (TINY.n_kv_heads,))
    assert step.attention_merge == "last_block"
    assert ARRIVALS not in {inp.name for inp in build_decode_step(TINY, TYPES).inputs}


def test_an_unknown_merge_is_refused() -> None:
    with pytest.raises(SparkInferError, match="attention_merge must be one of separate, last_block, got 'first'"):
        build_decode_step(TINY, TYPES, attention_merge="first")


@pytest.mark.slow
@pytest.mark.skipif(not can_compile(), reason="the CUDA emulator builds with TVM's compiler")
def test_emulated_steps_give_the_logits_of_the_separate_kernels(tmp_path: Path) -> None:
    """Three decode steps of the tiny model (token 0, then the sampled ones), with and without
    the merge, in the emulator (which alternates its blocks' order launch by launch, so the
    last block to arrive changes): the same logits and tokens, and every count back at 0."""
    from tests.model.emulated_step import emulated_kernels, run_decode, step_inputs

    model = write_decisive_model(tmp_path / "tiny.gguf", TINY, "q4_k_m")
    separate = build_decode_step(TINY, TYPES)
    merged = build_decode_step(TINY, TYPES, attention_merge="last_block")
    gpu = emulated_kernels(separate, merged)
    runs = {}
    for step in (separate, merged):
        inputs = step_inputs(step, model, n_pages=2)
        runs[step.attention_merge] = [run_decode(gpu, step, inputs) for _ in range(3)]
        if ARRIVALS in inputs:
            np.testing.assert_array_equal(inputs[ARRIVALS].numpy(), np.zeros(TINY.n_kv_heads, np.int32))
    for (want, want_next), (got, got_next) in zip(runs["separate"], runs["last_block"]):
        assert np.isfinite(want).all()
        np.testing.assert_array_equal(got, want)
        assert got_next == want_next
