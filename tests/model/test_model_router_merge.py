"""The step variants router_merge="last_block" (kernels.router.router_gemv_topk) and "gate_up"
(kernels.moe_q8.moe_gate_up_silu_q8_routed, and with expert_prefetch="down"
moe_gate_up_silu_q8_routed_prefetch): the launches they save, the last block's `router_arrivals`
state, their bad inputs and refusals, and in the CUDA emulator the tiny model's decode steps with
them (last_block alone and with attention_merge "last_block"; gate_up, with and without the
prefetch, on sm_90's int8 step) giving the logits of the step without them, bit for bit."""

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from tvm import relax

from sparkinfer.compiler.pipeline import build_step
from sparkinfer.errors import SparkInferError
from sparkinfer.gguf_file import preset_config, type_map
from sparkinfer.model.qwen3moe import build_decode_step
from sparkinfer.model.spec import ARRIVALS, ROUTER_ARRIVALS

from tests.gpu_prebuild import can_compile
from tests.model._harness import write_decisive_model
from tests.model.test_model_fused_step import launches

TINY = preset_config("tiny")
TYPES = type_map(TINY, "q4_k_m")
# The variants measured together on a GPU (bench/gpu_round.py's VARIANT_STEPS): the router's
# alone, and both last-block merges.
MERGES = [{"router_merge": "last_block"}, {"router_merge": "last_block", "attention_merge": "last_block"}]
# The int8 step that schedules/sm_90.json picks, where router_merge="gate_up" applies.
INT8_STEP = {"activations": "q8", "projection_activations": "q8", "head_activations": "q8"}


def test_the_merge_saves_the_topk_launch_of_every_moe_layer() -> None:
    separate = launches(build_decode_step(TINY, TYPES))
    merged = launches(build_decode_step(TINY, TYPES, router_merge="last_block"))
    assert separate["router_topk"] == TINY.n_layers
    assert merged["router_gemv_topk"] == TINY.n_layers and "router_topk" not in merged
    assert merged["gemv"] == separate["gemv"] - TINY.n_layers  # the router GEMVs
    assert sum(separate.values()) - sum(merged.values()) == TINY.n_layers


def test_both_merges_save_two_launches_a_layer() -> None:
    separate = launches(build_decode_step(TINY, TYPES))
    both = launches(build_decode_step(TINY, TYPES, **MERGES[1]))
    assert sum(separate.values()) - sum(both.values()) == 2 * TINY.n_layers


def test_a_dense_model_has_no_router_to_merge() -> None:
    dense = preset_config("tiny-dense")
    step = build_decode_step(dense, type_map(dense, "q4_k_m"), router_merge="last_block")
    assert launches(step) == launches(build_decode_step(dense, type_map(dense, "q4_k_m")))
    assert ROUTER_ARRIVALS not in {inp.name for inp in step.inputs}


def test_the_count_is_state_of_one_int() -> None:
    step = build_decode_step(TINY, TYPES, router_merge="last_block")
    (arrivals,) = [inp for inp in step.inputs if inp.name == ROUTER_ARRIVALS]
    assert (arrivals.role, arrivals.dtype, arrivals.shape) == ("state", "int32", (1,))
    assert step.router_merge == "last_block"
    assert ROUTER_ARRIVALS not in {inp.name for inp in build_decode_step(TINY, TYPES).inputs}


def test_an_unknown_merge_is_refused() -> None:
    with pytest.raises(SparkInferError, match="router_merge must be one of separate, last_block, gate_up, got 'first'"):
        build_decode_step(TINY, TYPES, router_merge="first")


def test_gate_up_saves_the_topk_launch_of_every_int8_moe_layer() -> None:
    separate = launches(build_decode_step(TINY, TYPES, **INT8_STEP))
    merged = launches(build_decode_step(TINY, TYPES, **INT8_STEP, router_merge="gate_up"))
    assert merged["moe_gate_up_silu_q8_routed"] == TINY.n_layers
    assert "router_topk" not in merged and "moe_gate_up_silu_q8" not in merged
    assert sum(separate.values()) - sum(merged.values()) == TINY.n_layers


def test_gate_up_keeps_the_topk_launch_of_float_experts() -> None:
    types = dict(TYPES)
    types["blk.0.ffn_up_exps.weight"] = T.F16  # no int8 form: layer 0's experts stay float
    merged = launches(build_decode_step(TINY, types, **INT8_STEP, router_merge="gate_up"))
    assert merged["router_topk"] == 1 and merged["moe_gate_up_silu_q8_routed"] == TINY.n_layers - 1


def test_gate_up_needs_int8_experts() -> None:
    with pytest.raises(SparkInferError, match="router_merge='gate_up' picks the experts inside the int8 experts' "
                                              "gate/up kernel: it needs activations='q8', got 'f32'"):
        build_decode_step(TINY, TYPES, router_merge="gate_up")
    with pytest.raises(SparkInferError, match=r"router_merge='gate_up' needs decode_launches='split', got 'fused': "
                                              r"the routed int8 gate/up reads the FFN input that the split "
                                              r"launches' add_rms_norm_q8_1 quantizes"):
        build_decode_step(TINY, TYPES, activations="q8", router_merge="gate_up", decode_launches="fused")


def test_expert_prefetch_hands_each_routed_gate_up_its_layers_down_experts() -> None:
    merged = build_decode_step(TINY, TYPES, **INT8_STEP, router_merge="gate_up")
    prefetching = build_decode_step(TINY, TYPES, **INT8_STEP, router_merge="gate_up", expert_prefetch="down")
    counts = launches(prefetching)
    assert counts["moe_gate_up_silu_q8_routed_prefetch"] == TINY.n_layers and "moe_gate_up_silu_q8_routed" not in counts
    assert sum(counts.values()) == sum(launches(merged).values())
    decode = prefetching.mod["decode"]
    # each layer's gate/up takes, third, the weights its down kernel reads first: the step parameter
    asked = [call.args[1].fields[2] for call in _calls(decode, "moe_gate_up_silu_q8_routed_prefetch")]
    read = [call.args[1].fields[0] for call in _calls(decode, "moe_down_residual_q8")]
    assert len(asked) == TINY.n_layers and all(a.same_as(r) and a in decode.params for a, r in zip(asked, read))


def _calls(func: relax.Function, kernel: str) -> list[relax.Call]:
    """The call_tir calls in `func` of the kernels whose names start with `kernel`."""
    return [b.value for block in func.body.blocks for b in block.bindings
            if isinstance(b.value, relax.Call) and len(b.value.args) > 1 and isinstance(b.value.args[0], relax.GlobalVar)
            and b.value.args[0].name_hint.startswith(kernel + "_")]


def test_expert_prefetch_needs_the_top_k_in_gate_up_and_a_gpu() -> None:
    with pytest.raises(SparkInferError, match="expert_prefetch='down' is done by the routed int8 gate/up kernel, "
                                              "the first to know the experts: it needs router_merge='gate_up', "
                                              "got 'separate'"):
        build_decode_step(TINY, TYPES, **INT8_STEP, expert_prefetch="down")
    with pytest.raises(SparkInferError, match="expert_prefetch must be one of off, down, got 'up'"):
        build_decode_step(TINY, TYPES, **INT8_STEP, router_merge="gate_up", expert_prefetch="up")
    step = build_decode_step(TINY, TYPES, **INT8_STEP, router_merge="gate_up", expert_prefetch="down")
    with pytest.raises(SparkInferError, match=r"expert_prefetch='down' is for the CUDA archs only \(the bulk L2 "
                                              r"prefetch of sm_90 and later; the cpu build has no such instruction\)"):
        build_step(step, "cpu")


def test_the_fused_launches_refuse_it() -> None:
    with pytest.raises(SparkInferError, match=r"router_merge='last_block' needs decode_launches='split', got "
                                              r"'fused': the fused launches pick the experts inside gate/up "
                                              r"\(moe_gate_up_silu_routed\), with no router_topk launch to save"):
        build_decode_step(TINY, TYPES, router_merge="last_block", decode_launches="fused")


@pytest.mark.slow
@pytest.mark.skipif(not can_compile(), reason="the CUDA emulator builds with TVM's compiler")
@pytest.mark.parametrize("merges", MERGES, ids=["router", "router+attention"])
def test_emulated_steps_give_the_logits_of_the_separate_kernels(tmp_path: Path, merges: dict[str, str]) -> None:
    """Three decode steps of the tiny model (token 0, then the sampled ones), with and without
    the merges, in the emulator (which alternates its blocks' order launch by launch, so the
    last block to arrive changes): the same logits and tokens, and every count back at 0."""
    from tests.model.emulated_step import emulated_kernels, run_decode, step_inputs

    model = write_decisive_model(tmp_path / "tiny.gguf", TINY, "q4_k_m")
    separate = build_decode_step(TINY, TYPES)
    merged = build_decode_step(TINY, TYPES, **merges)
    gpu = emulated_kernels(separate, merged)
    runs = []
    for step in (separate, merged):
        inputs = step_inputs(step, model, n_pages=2)
        runs.append([run_decode(gpu, step, inputs) for _ in range(3)])
        for name in (ARRIVALS, ROUTER_ARRIVALS):
            if name in inputs:
                np.testing.assert_array_equal(inputs[name].numpy(), np.zeros(inputs[name].numpy().shape, np.int32))
    assert ROUTER_ARRIVALS in {inp.name for inp in merged.inputs}
    for (want, want_next), (got, got_next) in zip(*runs):
        assert np.isfinite(want).all()
        np.testing.assert_array_equal(got, want)
        assert got_next == want_next


@pytest.mark.slow
@pytest.mark.skipif(not can_compile(), reason="the CUDA emulator builds with TVM's compiler")
def test_emulated_steps_with_the_top_k_in_gate_up_give_the_same_logits(tmp_path: Path) -> None:
    """Three decode steps of the tiny model on sm_90's int8 step, with router_merge "gate_up"
    (with expert_prefetch "down" too) and without: the same logits and tokens (the top-k's stages
    are router_topk's, the gate/up the same kernel's, the prefetch only a cache hint)."""
    from tests.model.emulated_step import emulated_kernels, run_decode, step_inputs

    model = write_decisive_model(tmp_path / "tiny.gguf", TINY, "q4_k_m")
    separate = build_decode_step(TINY, TYPES, **INT8_STEP)
    merged = build_decode_step(TINY, TYPES, **INT8_STEP, router_merge="gate_up")
    prefetching = build_decode_step(TINY, TYPES, **INT8_STEP, router_merge="gate_up", expert_prefetch="down")
    gpu = emulated_kernels(separate, merged, prefetching)
    runs = []
    for step in (separate, merged, prefetching):
        inputs = step_inputs(step, model, n_pages=2)
        runs.append([run_decode(gpu, step, inputs) for _ in range(3)])
    for (want, want_next), *others in zip(*runs):
        assert np.isfinite(want).all()
        for got, got_next in others:
            np.testing.assert_array_equal(got, want)
            assert got_next == want_next
