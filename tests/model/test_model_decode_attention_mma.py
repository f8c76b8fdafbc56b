"""The step variant decode_attention="mma" (kernels.attention.paged_decode_attention_mma, and
paged_decode_attention_mma_merged with attention_merge "last_block"): the kernels it swaps in, a
bad value, the cpu's refusal, the tiny model's step with it built for every CUDA arch, and in the
CUDA emulator that step's logits within fp16 rounding of the float32 step's (and the merged
step's the same, bit for bit). The kernel-level checks are tests/schedule/test_decode_attention_mma_cuda.py's."""

from pathlib import Path

import numpy as np
import pytest

from sparkinfer.compiler.pipeline import build_step
from sparkinfer.errors import SparkInferError
from sparkinfer.gguf_file import preset_config, type_map
from sparkinfer.model.qwen3moe import build_decode_step

from tests.gpu_prebuild import can_compile
from tests.model._harness import write_decisive_model
from tests.model.test_model_fused_step import launches

TINY = preset_config("tiny")
TYPES = type_map(TINY, "q4_k_m")


def test_the_mma_attention_replaces_the_float32_one_in_every_layer() -> None:
    step = build_decode_step(TINY, TYPES, decode_attention="mma")
    counts = launches(step)
    assert counts["paged_decode_attention_mma"] == counts["attention_combine"] == TINY.n_layers
    assert "paged_decode_attention" not in counts
    assert step.decode_attention == "mma"


def test_an_unknown_attention_is_refused() -> None:
    with pytest.raises(SparkInferError, match="decode_attention must be one of simt, mma, got 'wmma'"):
        build_decode_step(TINY, TYPES, decode_attention="wmma")


def test_with_the_last_block_merge_its_merged_kernel_replaces_both_launches() -> None:
    counts = launches(build_decode_step(TINY, TYPES, decode_attention="mma", attention_merge="last_block"))
    assert counts["paged_decode_attention_mma_merged"] == TINY.n_layers
    assert not {"paged_decode_attention", "paged_decode_attention_mma", "attention_combine",
                "paged_decode_attention_merged"} & set(counts)


def test_the_cpu_refuses_it() -> None:
    step = build_decode_step(TINY, TYPES, decode_attention="mma")
    with pytest.raises(SparkInferError, match=r"decode_attention='mma' is for the CUDA archs only \(tensor-core "
                                              r"products \(mma.sync\); the cpu build's attention multiplies float32"):
        build_step(step, "cpu")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm_90", "sm_120", "sm_121"])
@pytest.mark.parametrize("merge", ["separate", "last_block"])
def test_the_step_builds_for(arch: str, merge: str) -> None:
    from tests.compiler.test_compiler_attention_merge import kernel_sources

    with_mma = kernel_sources(arch, decode_attention="mma", attention_merge=merge)
    assert any(name.startswith("paged_decode_attention_") and name.endswith("_mma") for name in with_mma)
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in "".join(with_mma.values())


@pytest.mark.slow
@pytest.mark.skipif(not can_compile(), reason="the CUDA emulator builds with TVM's compiler")
def test_emulated_steps_give_the_float32_steps_logits_within_fp16_rounding(tmp_path: Path) -> None:
    """Three decode steps of the tiny model (token 0, then the sampled ones), with the float32 and
    the mma attention, in the emulator: logits within fp16 rounding of Q and P of each other, and
    the same tokens."""
    from tests.model.emulated_step import emulated_kernels, run_decode, step_inputs

    model = write_decisive_model(tmp_path / "tiny.gguf", TINY, "q4_k_m")
    simt = build_decode_step(TINY, TYPES)
    mma = build_decode_step(TINY, TYPES, decode_attention="mma")
    merged = build_decode_step(TINY, TYPES, decode_attention="mma", attention_merge="last_block")
    gpu = emulated_kernels(simt, mma, merged)
    runs = {}
    for step in (simt, mma, merged):
        inputs = step_inputs(step, model, n_pages=2)
        runs[step.decode_attention, step.attention_merge] = [run_decode(gpu, step, inputs) for _ in range(3)]
    for (want, want_next), (got, got_next) in zip(runs["mma", "separate"], runs["mma", "last_block"]):
        np.testing.assert_array_equal(got, want)
        assert got_next == want_next
    runs = {name: runs[name, "separate"] for name in ("simt", "mma")}
    for (want, want_next), (got, got_next) in zip(runs["simt"], runs["mma"]):
        assert np.isfinite(got).all()
        # measured: 0, 8e-5 and 6e-4 of the largest logit (depth 1 is V itself, either way)
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-3 * np.abs(want).max())
        assert got_next == want_next
    assert not np.array_equal(runs["mma"][-1][0], runs["simt"][-1][0])  # its f16 rounding shows: it ran
