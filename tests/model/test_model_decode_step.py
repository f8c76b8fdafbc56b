"""The decode step's Relax module: parameter order and types, kernels, determinism."""

import re

import pytest
import tvm
from gguf import GGMLQuantizationType as T

from sparkinfer.errors import MissingTensorError, SparkInferError, TensorShapeError
from sparkinfer.gguf_file import preset_config, tensor_specs, type_map
from sparkinfer.kernels.gemv import gemv_format
from sparkinfer.model import spec
from sparkinfer.model.qwen3moe import build_decode_step, decode_inputs
from sparkinfer.kernels.use import kernel_factory

TINY = preset_config("tiny")


def test_inputs_are_state_then_caches_then_weights_in_layout_order() -> None:
    types = type_map(TINY, "q4_k_m")
    inputs = decode_inputs(TINY, types)
    names = [i.name for i in inputs]
    assert names[:8] == ["token", "pos", "page_table", "sample_params", "rng", "logits_params", "token_mask",
                         "token_counts"]
    assert names[8:12] == ["k_cache_0", "v_cache_0", "k_cache_1", "v_cache_1"]
    weights = [i for i in inputs if i.role == "weight"]
    assert [w.tensor for w in weights] == [s.name for s in tensor_specs(TINY)]
    assert [i.role for i in inputs] == ["state"] * 8 + ["kv"] * 4 + ["weight"] * len(weights)
    state = {i.name: (i.dtype, i.shape) for i in inputs[:8]}
    assert state == {
        "token": ("int32", (1,)),
        "pos": ("int32", (1,)),
        "page_table": ("int32", (32,)),  # ceil(2048 / 64)
        "sample_params": ("float32", (3,)),
        "rng": ("uint32", (2,)),
        "logits_params": ("float32", (3,)),
        "token_mask": ("int32", (TINY.vocab_size // 32,)),
        "token_counts": ("int32", (TINY.vocab_size,)),
    }
    assert inputs[8].dtype == "float16" and inputs[8].shape == ("n_pages", 64, 2, 64)


def test_weight_inputs_are_the_gemv_word_views() -> None:
    types = type_map(TINY, "q4_k_m")
    by_tensor = {i.tensor: i for i in decode_inputs(TINY, types) if i.role == "weight"}
    q = by_tensor["blk.0.attn_q.weight"]
    assert (q.dtype, q.shape, q.ggml_type) == ("uint32", (256, 256 // 256 * 36), "Q4_K")
    out = by_tensor["output.weight"]
    assert (out.dtype, out.shape, out.ggml_type) == ("uint16", (1024, 105), "Q6_K")
    experts = by_tensor["blk.1.ffn_down_exps.weight"]
    fmt = gemv_format(types["blk.1.ffn_down_exps.weight"])
    assert experts.shape == (8, 256, fmt.row_words(256)) and experts.dtype == fmt.word_dtype
    assert (by_tensor["blk.0.attn_norm.weight"].dtype, by_tensor["blk.0.attn_norm.weight"].shape) == ("float32", (256,))
    assert by_tensor["blk.0.ffn_gate_inp.weight"].shape == (8, 256)  # F32 router


@pytest.mark.parametrize("entry", [spec.ENTRY, spec.ENTRY_PROCESSED])
def test_relax_function_takes_the_inputs_in_order(entry: str) -> None:
    step = build_decode_step(TINY, type_map(TINY, "q4_k_m"))
    func = step.mod[entry]
    assert len(func.params) == len(step.inputs)
    for param, inp in zip(func.params, step.inputs):
        assert param.name == inp.name
        assert param.ty.dtype == inp.dtype
        dims = [str(d) if not isinstance(d, tvm.tirx.IntImm) else int(d) for d in param.ty.shape]
        assert dims == list(inp.shape)
    ret = func.ret_ty
    assert [f.dtype for f in ret.fields] == ["float32", "int32"]
    assert [int(d) for d in ret.fields[0].shape] == [TINY.vocab_size]


def test_the_vm_checks_every_input_but_the_weights() -> None:
    """Relax's num_input: the state, caches and chunk inputs are checked on every call, the
    weights (bound once, shape-checked by runtime/weights.py) are not."""
    step = build_decode_step(TINY, type_map(TINY, "q4_k_m"), prefill_chunks=(16,))
    n_weights = sum(inp.role == "weight" for inp in step.inputs)
    for name in (spec.ENTRY, spec.ENTRY_PROCESSED, spec.chunk_entry(16, False), spec.chunk_entry(16, True)):
        func = step.mod[name]
        assert int(func.attrs["num_input"]) == len(func.params) - n_weights
        assert all(p.name not in {i.name for i in step.inputs if i.role == "weight"}
                   for p in func.params[: int(func.attrs["num_input"])])


def test_each_distinct_kernel_is_in_the_module_once() -> None:
    step = build_decode_step(TINY, type_map(TINY, "q4_k_m"))
    names = [k.name for k in step.kernels]
    assert len(names) == len(set(names))
    prim_funcs = {gv.name_hint for gv, f in step.mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert prim_funcs == set(names)
    factories = {(k.family, k.factory) for k in step.kernels}
    assert {("embedding", "embedding"), ("norm", "rms_norm"), ("norm", "add_rms_norm"), ("gemv", "gemv"),
            ("gemv", "gemv_qkv"), ("rope", "qk_norm_rope_kv_append"), ("attention", "paged_decode_attention"),
            ("attention", "attention_combine"), ("router", "router_topk"), ("moe", "moe_gate_up_silu"),
            ("moe", "moe_down_residual"), ("sampling", "sample_candidates"), ("sampling", "sample_token"),
            ("sampling", "advance"),
            ("logits", "process_logits"), ("logits", "count_token")} == factories


def test_only_the_processed_step_processes_the_logits() -> None:
    """The plain step is untouched (a request that asks for no processing pays nothing); the
    processed one samples from process_logits' output and counts the token before advance."""
    step = build_decode_step(TINY, type_map(TINY, "q4_k_m"))
    plain, processed = step.mod[spec.ENTRY].script(), step.mod[spec.ENTRY_PROCESSED].script()
    assert "process_logits" not in plain and "count_token" not in plain
    order = [processed.index(name)
             for name in ("process_logits", "sample_candidates", "sample_token", "count_token", "advance")]
    assert order == sorted(order)
    # Q6_K and Q4_K down projections (llama.cpp's layer mix) are two kernels.
    downs = [k for k in step.kernels if k.factory == "moe_down_residual"]
    assert sorted(k.args[0] for k in downs) == ["Q4_K", "Q6_K"]


@pytest.mark.parametrize(
    ("q", "k", "v", "launches"),
    [
        (T.Q4_K, T.Q4_K, T.Q4_K, ["qkv0"]),
        (T.Q4_K, T.Q4_K, T.Q6_K, ["qk0", "v0"]),  # Q4_K_M's Q6_K attn_v layers
        (T.Q4_K, T.Q8_0, T.Q8_0, ["q0", "kv0"]),  # the tiny preset's Q4_K_M mix
        (T.Q4_K, T.Q8_0, T.Q6_K, ["q0", "k0", "v0"]),
    ],
    ids=["qkv", "qk+v", "q+kv", "q+k+v"],
)
def test_q_k_and_v_share_launches_where_their_types_allow(q: T, k: T, v: T, launches: list[str]) -> None:
    types = type_map(TINY, "q4_k_m")
    for kind, t in zip("qkv", (q, k, v)):
        types[f"blk.0.attn_{kind}.weight"] = t
    step = build_decode_step(TINY, types)
    text = step.mod[spec.ENTRY].script()
    calls = set(re.findall(r"\b(qkv0|qk0|kv0|q0|k0|v0) = R\.call_tir", text))
    assert calls == set(launches)
    nq, nk, h = TINY.n_heads * TINY.head_dim, TINY.n_kv_heads * TINY.head_dim, TINY.hidden
    fused = {k.args for k in step.kernels if k.factory == "gemv_qkv"}
    want = {"qkv0": (q.name, nq, nk, nk, h), "qk0": (q.name, nq, nk, 0, h), "kv0": (k.name, nk, nk, 0, h)}
    assert {want[name] for name in launches if name in want} <= fused


def test_module_is_deterministic() -> None:
    types = type_map(TINY, "q4_k_m")
    a = build_decode_step(TINY, types)
    b = build_decode_step(TINY, dict(reversed(list(types.items()))))
    assert a.mod.script() == b.mod.script()
    tvm.ir.assert_structural_equal(a.mod, b.mod)
    assert a.kernels == b.kernels and a.inputs == b.inputs


def test_kv_caches_are_updated_in_place_and_the_step_advances() -> None:
    text = build_decode_step(TINY, type_map(TINY, "q4_k_m")).mod[spec.ENTRY].script()
    assert text.count("R.call_tir_inplace") == TINY.n_layers + 2  # rope per layer, sample, advance
    assert "inplace_indices=[-1, 7, 8]" in text  # q_rot fresh, k/v caches in place
    assert "inplace_indices=[0, 1, 2]" in text  # advance: next, token, pos


def test_dense_qwen3_runs_its_ffn_as_one_expert() -> None:
    cfg = preset_config("tiny-dense")
    step = build_decode_step(cfg, type_map(cfg, "f16"))
    gate = next(i for i in step.inputs if i.tensor == "blk.0.ffn_gate.weight")
    assert (gate.dtype, gate.shape) == ("float16", (1, 512, 256))
    moe = [k for k in step.kernels if k.family == "moe"]
    assert {k.args for k in moe} == {("F16", "F16", 1, 1, 512, 256), ("F16", 1, 1, 256, 512)}
    assert not any(k.family == "router" for k in step.kernels)


def test_tied_embeddings_use_token_embd_as_lm_head() -> None:
    types = type_map(TINY, "q4_k_m")
    del types["output.weight"]
    step = build_decode_step(TINY, types)
    assert "output.weight" not in {i.tensor for i in step.inputs}
    assert any(k.factory == "gemv" and k.args == ("Q4_K", 1024, 256) for k in step.kernels)


def test_norm_weights_must_be_f32() -> None:
    types = type_map(TINY, "q4_k_m")
    types["blk.1.ffn_norm.weight"] = T.F16
    with pytest.raises(TensorShapeError, match="blk.1.ffn_norm.weight.*F16"):
        decode_inputs(TINY, types)


def test_a_tensor_missing_from_the_type_map_is_named() -> None:
    types = type_map(TINY, "q4_k_m")
    del types["blk.1.attn_k.weight"]
    with pytest.raises(MissingTensorError, match="blk.1.attn_k.weight"):
        decode_inputs(TINY, types)


def test_a_missing_kernel_factory_is_named() -> None:
    with pytest.raises(SparkInferError, match=r"sparkinfer.kernels.nosuchfamily.thing is not registered \(sparkinfer/kernels/registry.py\)"):
        kernel_factory("nosuchfamily", "thing")


def test_splits_must_fit_the_page_table() -> None:
    with pytest.raises(ValueError, match="n_splits"):
        build_decode_step(TINY, type_map(TINY, "q4_k_m"), n_splits=33)


def test_half_chunk_operands_reach_every_quantized_gemm_but_the_float_router_and_the_attention() -> None:
    types = type_map(TINY, "q4_k_m")
    half = build_decode_step(TINY, types, prefill_chunks=(16,), chunk_operands="f16").kernels
    gemms = [u for u in half if u.factory == "gemm"]
    assert gemms and all((len(u.args) == 5) == (u.args[0] != "F32") for u in gemms)
    attention = [u for u in half if u.factory == "causal_prefill_attention"]
    assert attention and all(len(u.args) == 7 and u.args[6] for u in attention)
    plain = build_decode_step(TINY, types, prefill_chunks=(16,)).kernels
    assert all(len(u.args) == 4 for u in plain if u.factory == "gemm")
    assert all(len(u.args) == 6 for u in plain if u.factory == "causal_prefill_attention")
    # the experts too: gate, up and SiLU in one float16-operand kernel, then the down one
    experts = {"grouped_gemm", "silu_mul", "grouped_gate_up_silu_f16", "grouped_gemm_f16"}
    assert {u.factory for u in half} & experts == {"grouped_gate_up_silu_f16", "grouped_gemm_f16"}
    assert {u.factory for u in plain} & experts == {"grouped_gemm", "silu_mul"}
    with pytest.raises(SparkInferError, match="chunk_operands must be one of f32, f16"):
        build_decode_step(TINY, types, chunk_operands="bf16")


def test_the_compact_attention_form_reaches_the_t_token_attention_only() -> None:
    types = type_map(TINY, "q4_k_m")
    compact = build_decode_step(TINY, types, prefill_chunks=(16,), chunk_operands="f16",
                                attention_form="compact").kernels
    attention = [u for u in compact if u.factory == "causal_prefill_attention"]
    assert attention and all(u.args[6:] == (True, True) and u.name.endswith("_compact") for u in attention)
    half = build_decode_step(TINY, types, prefill_chunks=(16,), chunk_operands="f16").kernels
    assert {u.name for u in compact} - {u.name for u in attention} == \
        {u.name for u in half if u.factory != "causal_prefill_attention"}
    with pytest.raises(SparkInferError, match="attention_form must be one of read_ahead, compact, registers"):
        build_decode_step(TINY, types, attention_form="wide")
    with pytest.raises(SparkInferError, match="needs chunk_operands='f16'"):
        build_decode_step(TINY, types, attention_form="compact")


def test_the_registers_attention_form_calls_its_own_factory_for_the_t_token_attention_only() -> None:
    types = type_map(TINY, "q4_k_m")
    registers = build_decode_step(TINY, types, prefill_chunks=(16,), chunk_operands="f16",
                                  attention_form="registers").kernels
    attention = [u for u in registers if u.factory == "causal_prefill_attention_registers"]
    assert attention and all(u.args[:4] == (16, TINY.n_heads, TINY.n_kv_heads, TINY.head_dim) and len(u.args) == 6
                             and u.name.endswith("_registers") for u in attention)
    half = build_decode_step(TINY, types, prefill_chunks=(16,), chunk_operands="f16").kernels
    assert {u.name for u in registers} - {u.name for u in attention} == \
        {u.name for u in half if u.factory != "causal_prefill_attention"}
    with pytest.raises(SparkInferError, match="attention_form='registers' is a form of the tensor-core attention"):
        build_decode_step(TINY, types, attention_form="registers")
