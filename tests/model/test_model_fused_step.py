"""The fused-launch variant of the decode step (`decode_launches="fused"`): which kernels it
launches, its bad input, and on the CPU the whole step against the numpy reference and against
the split step, teacher-forced on the same tokens."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from tvm import relax

from sparkinfer.compiler.pipeline import compile_model
from sparkinfer.errors import SparkInferError
from sparkinfer.gguf_file import preset_config, type_map
from sparkinfer.model.qwen3moe import DecodeStep, build_decode_step
from sparkinfer.schedule.schedules import SchedulesFile

TINY = preset_config("tiny")


def launches(step: DecodeStep, entry: str = "decode") -> Counter[str]:
    """Launches of one call of the step's function `entry` (default `decode`) by factory."""
    factory = {use.name: use.factory for use in step.kernels}
    counts: Counter[str] = Counter()
    for block in step.mod[entry].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call) and value.op.name in ("relax.call_tir", "relax.call_tir_inplace"):
                counts[factory[value.args[0].name_hint]] += 1
    return counts


@pytest.mark.parametrize("preset", ["tiny", "tiny-dense"])
def test_fused_step_folds_norms_residual_adds_and_top_k_into_their_neighbours(preset: str) -> None:
    config = preset_config(preset)
    split = launches(build_decode_step(config, type_map(config, "q4_k_m")))
    fused = launches(build_decode_step(config, type_map(config, "q4_k_m"), decode_launches="fused"))
    layers = config.n_layers
    assert split["add_rms_norm"] == layers and "add_rms_norm" not in fused
    assert fused["gemv_residual"] == layers  # the attention output projection
    assert fused["gemv_qkv_normed"] == layers  # Q4_K_M: Q and K in one launch ...
    # ... V (Q6_K on some layers, Q4_K on others) and the router (MoE) in their own
    assert fused["gemv_normed"] + fused["gemv_qkv_normed"] == split["gemv_qkv"] + split["gemv"] - 1 - layers
    assert split["rms_norm"] == layers + 1
    if config.is_moe:
        # gate/up runs the top-k and the FFN norm: output_norm is the only norm launch left
        assert fused["moe_gate_up_silu_routed"] == layers and "router_topk" not in fused
        assert fused["rms_norm"] == 1
        assert sum(split.values()) - sum(fused.values()) == 3 * layers
    else:
        # no router to fold the FFN norm into: it keeps its launch
        assert fused["rms_norm"] == layers + 1
        assert sum(split.values()) - sum(fused.values()) == layers


def test_int8_experts_keep_their_norm_and_top_k_launches() -> None:
    fused = launches(build_decode_step(TINY, type_map(TINY, "q4_k_m"), activations="q8", decode_launches="fused"))
    assert fused["router_topk"] == fused["rms_norm"] - 1 == TINY.n_layers
    assert "moe_gate_up_silu_routed" not in fused and fused["moe_gate_up_silu_q8"] == TINY.n_layers
    assert fused["gemv_residual"] == TINY.n_layers and "add_rms_norm" not in fused


def test_an_unknown_decode_launches_variant_is_named() -> None:
    with pytest.raises(SparkInferError, match="decode_launches must be one of split, fused, got 'one'"):
        build_decode_step(TINY, type_map(TINY, "q4_k_m"), decode_launches="one")


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny", "tiny-dense"])
def test_fused_step_follows_the_reference_and_the_split_step(tmp_path: Path, preset: str) -> None:
    """The tiny decisive Q4_K_M models compiled for LLVM both ways (the fused one through a
    schedules file that picks the variant): the fused step's greedy tokens and logits against
    the references (tests/model/test_model_cpu_e2e.py's bounds; the dense model, like there,
    against the f16-cache one only), then both steps fed the same tokens: KL(split || fused)
    and top-1 agreement at every position (seen: KL 0 on both, the logits bit for bit equal:
    on LLVM the fused kernels sum in the split ones' order)."""
    from tests.model.test_model_cpu_e2e import assert_matches_reference

    from ._harness import StepRunner, write_decisive_model

    config = preset_config(preset)
    model = write_decisive_model(tmp_path / "model.gguf", config, "q4_k_m", seed=3)
    types = {name: info.ggml_type for name, info in model.tensors.items()}
    schedules = SchedulesFile("cpu", {}, step={"decode_launches": "fused"}).write(tmp_path / "cpu.json")
    fused = compile_model(config, types, "cpu", tmp_path / "fused", schedules=schedules, n_splits=16).manifest
    assert "add_rms_norm" not in {k["factory"] for k in fused.kernels}
    # the split step on float activations too (the packaged cpu step's are int8)
    float_split = SchedulesFile("cpu", {}).write(tmp_path / "cpu-split.json")
    split = compile_model(config, types, "cpu", tmp_path / "split", schedules=float_split, n_splits=16).manifest
    assert "gemv_residual" not in {k["factory"] for k in split.kernels}

    prompt = [1, 100, 7, 512, 33, 901, 2, 64]
    tokens = assert_matches_reference(model, fused, prompt, 16, 4, check_f32=config.is_moe)
    runners = [StepRunner(manifest, model, n_pages=4) for manifest in (split, fused)]
    logits = np.array([[runner.step(t)[0] for t in prompt + tokens] for runner in runners])
    lp_split, lp_fused = log_softmax(logits[0]), log_softmax(logits[1])
    kl = (np.exp(lp_split) * (lp_split - lp_fused)).sum(-1)
    assert kl.max() < 1e-6, kl.max()
    assert (logits[0].argmax(-1) == logits[1].argmax(-1)).all()
