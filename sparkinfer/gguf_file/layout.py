"""The tensors a config implies (names, numpy-order shapes) and the ggml type each gets per file type."""

from __future__ import annotations

import math
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from sparkinfer.errors import SparkInferError
from sparkinfer.gguf_file.config import ModelConfig

T = GGMLQuantizationType

# File types `synth` and `write_model` produce, with the general.file_type llama.cpp records for each.
FILE_TYPES: dict[str, LlamaFileType] = {
    "f32": LlamaFileType.ALL_F32,
    "f16": LlamaFileType.MOSTLY_F16,
    "q8_0": LlamaFileType.MOSTLY_Q8_0,
    "q4_k_m": LlamaFileType.MOSTLY_Q4_K_M,
}

_K_QUANTS = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor the config requires. `shape` is numpy order: rows are output features."""

    name: str
    shape: tuple[int, ...]
    kind: str  # the name without block prefix and ".weight": "attn_q", "ffn_down_exps", "output"
    layer: int | None = None

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def row_len(self) -> int:
        return self.shape[-1]

    @property
    def is_expert(self) -> bool:
        return self.kind.endswith("_exps")

    @property
    def is_norm(self) -> bool:
        return len(self.shape) == 1


def tensor_specs(config: ModelConfig) -> list[TensorSpec]:
    """Every tensor of the model, in the order the writer lays them out."""
    specs = [TensorSpec("token_embd.weight", (config.vocab_size, config.hidden), "token_embd")]
    for i in range(config.n_layers):
        specs += _block_specs(config, i)
    specs.append(TensorSpec("output_norm.weight", (config.hidden,), "output_norm"))
    specs.append(TensorSpec("output.weight", (config.vocab_size, config.hidden), "output"))
    return specs


def expected_tensors(config: ModelConfig) -> dict[str, TensorSpec]:
    return {spec.name: spec for spec in tensor_specs(config)}


def _block_specs(config: ModelConfig, i: int) -> list[TensorSpec]:
    h, q, kv = config.hidden, config.q_dim, config.kv_dim
    shapes: dict[str, tuple[int, ...]] = {
        "attn_norm": (h,),
        "attn_q": (q, h),
        "attn_k": (kv, h),
        "attn_v": (kv, h),
        "attn_output": (h, q),
        "attn_q_norm": (config.head_dim,),
        "attn_k_norm": (config.head_dim,),
        "ffn_norm": (h,),
    }
    if config.is_moe:
        e, f = config.n_experts, config.expert_ffn
        shapes |= {
            "ffn_gate_inp": (e, h),
            "ffn_gate_exps": (e, f, h),
            "ffn_up_exps": (e, f, h),
            "ffn_down_exps": (e, h, f),
        }
    else:
        f = config.ffn
        shapes |= {"ffn_gate": (f, h), "ffn_up": (f, h), "ffn_down": (h, f)}
    return [TensorSpec(f"blk.{i}.{kind}.weight", shape, kind, i) for kind, shape in shapes.items()]


def type_map(config: ModelConfig, file_type: str) -> dict[str, GGMLQuantizationType]:
    """The ggml type of every tensor in a `file_type` file, as llama.cpp's tools choose it.

    Norms and the router stay F32 in every file type (llama.cpp never quantizes them).
    """
    if file_type not in FILE_TYPES:
        raise SparkInferError(f"unknown file type {file_type!r}: choose one of {', '.join(FILE_TYPES)}")
    return {spec.name: _tensor_type(config, file_type, spec) for spec in tensor_specs(config)}


def _tensor_type(config: ModelConfig, file_type: str, spec: TensorSpec) -> GGMLQuantizationType:
    if file_type == "f32" or _stays_f32(spec):
        return T.F32
    if file_type == "f16":
        return T.F16
    if file_type == "q8_0":
        return _fit(T.Q8_0, spec)
    return _q4_k_m_type(config, spec)


def _stays_f32(spec: TensorSpec) -> bool:
    return spec.is_norm or spec.kind == "ffn_gate_inp"


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    # llama.cpp's choice of layers that get the bigger type in the _M mixes.
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _q4_k_m_type(config: ModelConfig, spec: TensorSpec) -> GGMLQuantizationType:
    """llama.cpp's llama_tensor_get_type for LLAMA_FTYPE_MOSTLY_Q4_K_M (src/llama-quant.cpp)."""
    # llama.cpp tunes a few tensors for 8-expert models (Mixtral); it applies to any n_expert == 8.
    eight_experts = config.n_experts == 8
    if spec.kind == "output":
        return T.Q6_K if spec.row_len % 256 == 0 else T.Q8_0
    if spec.kind == "attn_v":
        if eight_experts:
            return _fit(T.Q8_0, spec)
        return _fit(T.Q6_K if _use_more_bits(spec.layer, config.n_layers) else T.Q4_K, spec)
    if spec.kind == "attn_k" and eight_experts:
        return _fit(T.Q8_0, spec)
    if spec.kind == "attn_output" and eight_experts:
        return _fit(T.Q5_K, spec)
    if spec.kind in ("ffn_down", "ffn_down_exps") and _use_more_bits(spec.layer, config.n_layers):
        return _fit(T.Q6_K, spec)
    return _fit(T.Q4_K, spec)


def _fit(ggml_type: GGMLQuantizationType, spec: TensorSpec) -> GGMLQuantizationType:
    """Fall back when the row length is not a multiple of the type's block.

    llama.cpp falls back Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, then F16 where even 32
    does not divide. SparkInfer has no kernels for Q5_0/Q5_1, so every K type falls back
    to Q8_0 here (then F16), which is also more accurate.
    """
    if spec.row_len % block_size(ggml_type) == 0:
        return ggml_type
    if ggml_type in _K_QUANTS and spec.row_len % block_size(T.Q8_0) == 0:
        return T.Q8_0
    return T.F16


def block_size(ggml_type: GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[ggml_type][0]


def tensor_nbytes(ggml_type: GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    return math.prod(shape) // block * type_size

