"""The int8-activation variant of the decode step: which kernels it uses, and its bad input."""

from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from sparkinfer.compiler.pipeline import compile_model

from sparkinfer.errors import SparkInferError
from sparkinfer.gguf_file import preset_config, type_map
from sparkinfer.kernels import gemv_q8
from sparkinfer.reference import ReferenceModel
from sparkinfer.reference import qwen3moe as ref
from sparkinfer.model.qwen3moe import build_decode_step
from sparkinfer.schedule.schedules import SchedulesFile
from tests.model._harness import F16CacheReference
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


def test_q8_projections_run_q_k_v_and_o_on_int8_activations() -> None:
    step = build_decode_step(TINY, type_map(TINY, "q4_k_m"), activations="q8", projection_activations="q8")
    factories = _factories(step)
    assert {("gemv_q8", "rms_norm_q8_1"), ("gemv_q8", "gemv_qkv_q8"), ("gemv_q8", "attention_combine_q8_1"),
            ("gemv_q8", "gemv_q8")} <= set(factories)
    assert ("gemv", "gemv_qkv") not in factories and ("attention", "attention_combine") not in factories
    # the float GEMVs left are the router's and the LM head's
    assert sorted(k.args[1] for k in step.kernels if (k.family, k.factory) == ("gemv", "gemv")) == \
        [TINY.n_experts, TINY.vocab_size]
    assert ("gemv_q8", "quantize_q8_1") not in factories  # both quantizers run in other launches
    experts_only = build_decode_step(TINY, type_map(TINY, "q4_k_m"), activations="q8")
    assert sum(launches(step).values()) == sum(launches(experts_only).values())


def test_q8_projections_with_the_last_block_merge_quantize_the_merged_output() -> None:
    """The merged attention kernel writes float: its output takes a quantize_q8_1 launch (the one
    combination of the variants that adds a launch a layer)."""
    types = type_map(TINY, "q4_k_m")
    step = build_decode_step(TINY, types, attention_merge="last_block", projection_activations="q8")
    assert ("gemv_q8", "quantize_q8_1") in _factories(step)
    merged = build_decode_step(TINY, types, attention_merge="last_block")
    assert sum(launches(step).values()) == sum(launches(merged).values()) + TINY.n_layers


def test_q8_projections_keep_a_layer_float_where_a_type_has_no_int8_form() -> None:
    types = type_map(TINY, "q4_k_m")
    types["blk.1.attn_output.weight"] = T.F16
    factories = _factories(build_decode_step(TINY, types, projection_activations="q8"))
    assert ("attention", "attention_combine") in factories and ("gemv_q8", "attention_combine_q8_1") in factories
    assert ("norm", "rms_norm") in factories and ("gemv_q8", "rms_norm_q8_1") in factories


def test_bad_projection_variants_are_named() -> None:
    types = type_map(TINY, "q4_k_m")
    with pytest.raises(SparkInferError, match="projection_activations must be one of f32, q8, got 'q4'"):
        build_decode_step(TINY, types, projection_activations="q4")
    with pytest.raises(SparkInferError, match="projection_activations='q8' needs decode_launches='split', got 'fused'"):
        build_decode_step(TINY, types, projection_activations="q8", decode_launches="fused")


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


_RMS_NORM, _ATTENTION = ref.rms_norm, ref.causal_gqa_attention


class Q8ProjectionsReference(F16CacheReference, ReferenceModel):
    """The reference with what int8 projections round: each block's attention input (the
    attn_norm's output, the block's first `rms_norm`) and the attention's output (the O
    projection's input) through `quantize_q8_1` and back, in numpy."""

    def _block(self, i, x, cos, sin, cap):  # noqa: ANN001, ANN202
        norms = {"n": 0}

        def rms_norm(v: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
            y = _RMS_NORM(v, w, eps)
            norms["n"] += 1
            return _rounded(y) if norms["n"] == 1 else y

        def attention(*args, **kwargs) -> np.ndarray:  # noqa: ANN002, ANN003
            return _rounded(_ATTENTION(*args, **kwargs))

        with mock.patch.object(ref, "rms_norm", rms_norm), \
                mock.patch.object(ref, "causal_gqa_attention", attention):
            return super()._block(i, x, cos, sin, cap)


def _rounded(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float32)
    xq, xd, _ = gemv_q8.quantize_q8_1_reference(v.reshape(-1, v.shape[-1]))
    return gemv_q8.dequantize_q8_1(xq, xd).reshape(v.shape)


@pytest.mark.slow
def test_q8_projections_step_follows_the_reference_with_its_roundings(tmp_path: Path) -> None:
    """The tiny decisive model with int8 attention projections on LLVM. The roundings alone move
    its logits by ~17 % of the largest (these weights' large gains through the attention's
    softmax: the step against the plain reference, seen 0.173); against the reference that
    makes the same roundings the step is as close as the float step is to its reference's f16
    cache (seen 2.8e-3), and its greedy tokens are the reference's."""
    from tests.model.test_model_cpu_e2e import _rel_err

    from ._harness import StepRunner, write_decisive_model

    model = write_decisive_model(tmp_path / "model.gguf", TINY, "q4_k_m", seed=3)
    types = {name: info.ggml_type for name, info in model.tensors.items()}
    schedules = SchedulesFile("cpu", {}, step={"projection_activations": "q8"}).write(tmp_path / "cpu.json")
    result = compile_model(TINY, types, "cpu", tmp_path / "compiled", schedules=schedules)
    assert "attention_combine_q8_1" in {k["factory"] for k in result.manifest.kernels}
    runner, oracle = StepRunner(result.manifest, model, n_pages=4), Q8ProjectionsReference(model.config, model)
    prompt, err, got, want = [1, 100, 7, 512, 33, 901, 2, 64], 0.0, [], []
    for i in range(len(prompt) + 15):
        logits, nxt = runner.step(prompt[i] if i < len(prompt) else None)
        expected = oracle.decode(prompt[i] if i < len(prompt) else got[-1])
        err = max(err, _rel_err(logits, expected))
        if i >= len(prompt) - 1:
            got.append(nxt)
            want.append(int(np.argmax(expected)))
    assert err < 1e-2, err
    assert sum(g == w for g, w in zip(got, want)) >= 15, (got, want)


def test_q8_head_runs_the_lm_head_on_int8_activations() -> None:
    """head_activations="q8": the output norm quantizes its result in its launch and the LM head
    is a `gemv_q8`; the launches stay as many, and the only float GEMV left is the router's."""
    types = type_map(TINY, "q4_k_m")
    base = dict(activations="q8", projection_activations="q8")
    step = build_decode_step(TINY, types, **base, head_activations="q8")
    heads = [k for k in step.kernels if k.family.startswith("gemv") and k.args[1:] == (TINY.vocab_size, TINY.hidden)]
    assert [(k.family, k.factory, k.args[0]) for k in heads] == [("gemv_q8", "gemv_q8", types["output.weight"].name)]
    assert [k.args[1] for k in step.kernels if (k.family, k.factory) == ("gemv", "gemv")] == [TINY.n_experts]
    assert ("norm", "rms_norm") not in _factories(step)  # the output norm is rms_norm_q8_1 too
    float_head = build_decode_step(TINY, types, **base)
    assert sum(launches(step).values()) == sum(launches(float_head).values())
    assert ("norm", "rms_norm") in _factories(float_head)


def test_q8_head_stays_float_where_its_type_has_no_int8_form() -> None:
    types = type_map(TINY, "q4_k_m")
    types["output.weight"] = T.F16
    step = build_decode_step(TINY, types, head_activations="q8")
    assert ("norm", "rms_norm") in _factories(step)
    assert not any(k.family == "gemv_q8" for k in step.kernels)


def test_an_unknown_head_activations_variant_is_named() -> None:
    with pytest.raises(SparkInferError, match="head_activations must be one of f32, q8, got 'q4'"):
        build_decode_step(TINY, type_map(TINY, "q4_k_m"), head_activations="q4")


@pytest.mark.slow
def test_q8_head_logits_follow_the_float_heads(tmp_path: Path) -> None:
    """The tiny decisive model on LLVM with the LM head on int8 activations and without, fed the
    same tokens (teacher-forced): the head's input rounded to int8 blocks of 32 moves each logit
    by at most half a step of each block times the row's |weights| (seen: 5.4e-3 of the largest
    logit), and the top-1 tokens agree."""
    from ._harness import StepRunner, write_decisive_model

    model = write_decisive_model(tmp_path / "model.gguf", TINY, "q4_k_m", seed=3)
    types = {name: info.ggml_type for name, info in model.tensors.items()}
    runners = []
    for head in ("f32", "q8"):
        schedules = SchedulesFile("cpu", {}, step={"head_activations": head}).write(tmp_path / f"{head}.json")
        result = compile_model(TINY, types, "cpu", tmp_path / head, schedules=schedules)
        runners.append(StepRunner(result.manifest, model, n_pages=4))
    assert "gemv_q8" in {k["factory"] for k in result.manifest.kernels}
    prompt = [1, 100, 7, 512, 33, 901, 2, 64, 5, 77, 3, 250]
    logits = np.array([[runner.step(t)[0] for t in prompt] for runner in runners], np.float64)
    rel = np.abs(logits[1] - logits[0]).max() / np.abs(logits[0]).max()
    print(f"q8 head: max |q8 - f32| / max |logit| = {rel:.3g}")
    assert rel < 2e-2
    assert (logits[1].argmax(-1) == logits[0].argmax(-1)).mean() >= 0.9
