from collections import Counter

import pytest
from gguf import GGMLQuantizationType as T

from sparkinfer.errors import SparkInferError
from sparkinfer.gguf_file import PRESETS, expected_tensors, tensor_specs, type_map
from sparkinfer.gguf_file.layout import tensor_nbytes

Q30 = PRESETS["qwen3-30b-a3b"]


def test_qwen3_30b_a3b_q4_k_m_matches_llama_cpp() -> None:
    types = type_map(Q30, "q4_k_m")
    assert len(types) == 579
    assert Counter(types.values()) == {T.F32: 241, T.Q4_K: 289, T.Q6_K: 49}
    size = sum(tensor_nbytes(types[s.name], s.shape) for s in tensor_specs(Q30))
    assert round(size / 2**30, 2) == 17.28


def test_q4_k_m_bigger_layers() -> None:
    types = type_map(Q30, "q4_k_m")
    six_bit = [i for i in range(48) if types[f"blk.{i}.ffn_down_exps.weight"] == T.Q6_K]
    assert six_bit == [i for i in range(48) if types[f"blk.{i}.attn_v.weight"] == T.Q6_K]
    assert six_bit[:8] == [0, 1, 2, 3, 4, 5, 8, 11] and six_bit[-6:] == [42, 43, 44, 45, 46, 47]
    assert len(six_bit) == 24
    assert types["output.weight"] == T.Q6_K
    assert types["token_embd.weight"] == T.Q4_K
    assert types["blk.0.ffn_gate_inp.weight"] == T.F32


def test_eight_expert_models_get_llama_cpp_mixtral_tweaks() -> None:
    types = type_map(PRESETS["tiny"], "q4_k_m")
    assert types["blk.0.attn_k.weight"] == types["blk.0.attn_v.weight"] == T.Q8_0
    assert types["blk.0.attn_output.weight"] == T.Q5_K
    assert types["blk.0.ffn_down_exps.weight"] == T.Q4_K
    assert types["blk.1.ffn_down_exps.weight"] == T.Q6_K


def test_qwen3_30b_shapes_are_numpy_order() -> None:
    specs = expected_tensors(Q30)
    assert specs["token_embd.weight"].shape == (151936, 2048)
    assert specs["blk.0.attn_q.weight"].shape == (4096, 2048)
    assert specs["blk.0.attn_k.weight"].shape == (512, 2048)
    assert specs["blk.0.attn_output.weight"].shape == (2048, 4096)
    assert specs["blk.0.attn_q_norm.weight"].shape == (128,)
    assert specs["blk.0.ffn_gate_inp.weight"].shape == (128, 2048)
    assert specs["blk.0.ffn_gate_exps.weight"].shape == (128, 768, 2048)
    assert specs["blk.0.ffn_up_exps.weight"].shape == (128, 768, 2048)
    assert specs["blk.47.ffn_down_exps.weight"].shape == (128, 2048, 768)
    assert specs["output.weight"].shape == (151936, 2048)


def test_dense_layout() -> None:
    config = PRESETS["tiny-dense"]
    specs = expected_tensors(config)
    assert len(specs) == 3 + 11 * config.n_layers
    assert specs["blk.1.ffn_gate.weight"].shape == (512, 256)
    assert specs["blk.1.ffn_down.weight"].shape == (256, 512)
    assert not any("exps" in name or "gate_inp" in name for name in specs)


@pytest.mark.parametrize(
    ("expert_ffn", "down_type"),
    [(320, T.Q8_0), (300, T.F16)],  # 320 % 256 != 0 but % 32 == 0; 300 divides by neither
)
def test_rows_not_fitting_k_blocks_fall_back(expert_ffn: int, down_type: T) -> None:
    types = type_map(PRESETS["tiny"].replace(expert_ffn=expert_ffn), "q4_k_m")
    assert types["blk.0.ffn_down_exps.weight"] == down_type  # its rows are expert_ffn long
    assert types["blk.0.ffn_gate_exps.weight"] == T.Q4_K  # its rows are hidden (256) long


@pytest.mark.parametrize(("file_type", "weight_type"), [("f32", T.F32), ("f16", T.F16), ("q8_0", T.Q8_0)])
def test_plain_file_types_keep_norms_and_router_f32(file_type: str, weight_type: T) -> None:
    types = type_map(PRESETS["tiny"], file_type)
    assert types["blk.0.ffn_norm.weight"] == types["blk.0.ffn_gate_inp.weight"] == T.F32
    assert types["blk.0.ffn_up_exps.weight"] == types["output.weight"] == weight_type


def test_unknown_file_type() -> None:
    with pytest.raises(SparkInferError, match="unknown file type 'q3_k_s': choose one of f32, f16, q8_0, q4_k_m"):
        type_map(PRESETS["tiny"], "q3_k_s")
