"""Numpy float32 reference forward of the models: the oracle every kernel is checked against."""

from sparkinfer.reference.qwen3moe import (
    Int8Inputs,
    ReferenceModel,
    causal_gqa_attention,
    rms_norm,
    rope_cos_sin,
    rope_neox,
    route_topk,
    silu,
    softmax,
    swiglu,
)

__all__ = [
    "Int8Inputs",
    "ReferenceModel",
    "causal_gqa_attention",
    "rms_norm",
    "rope_cos_sin",
    "rope_neox",
    "route_topk",
    "silu",
    "softmax",
    "swiglu",
]
