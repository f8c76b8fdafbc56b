"""Synthetic models: presets, reproducible random weights, and fast full-size files.

Weights are what a trained model roughly looks like to a kernel: zero-mean, std 0.02,
norm weights near 1, an F32 router. Small models are written through the float-weights
path, so `random_weights(config, seed)` is exactly what the file holds before quantization
(the numpy reference and transformers can load the same model). Full-size models instead
fill quantized tensors with blocks drawn from a pool quantized once per type: valid blocks
with the real memory traffic, written in about a minute instead of hours of quantizing.
"""

from __future__ import annotations

import os
import zlib

import numpy as np
from gguf import GGMLQuantizationType

from sparkinfer import quant
from sparkinfer.errors import SparkInferError
from sparkinfer.gguf_file.config import ModelConfig
from sparkinfer.gguf_file.layout import TensorSpec, tensor_specs
from sparkinfer.gguf_file.writer import TypeChoice, write_gguf, write_model
from sparkinfer.tokenizer import VocabSpec, synthetic_vocab

WEIGHT_STD = 0.02

PRESETS: dict[str, ModelConfig] = {
    # CI-sized: every row a multiple of 256 so the K types apply without fallback.
    "tiny": ModelConfig(
        arch="qwen3moe", n_layers=2, hidden=256, n_heads=4, n_kv_heads=2, head_dim=64,
        vocab_size=1024, context_length=2048, n_experts=8, n_experts_used=2, expert_ffn=256,
    ),
    "tiny-dense": ModelConfig(
        arch="qwen3", n_layers=2, hidden=256, n_heads=4, n_kv_heads=2, head_dim=64,
        vocab_size=1024, context_length=2048, ffn=512,
    ),
    # The shapes of the real Qwen3-30B-A3B (its config.json on the Hugging Face Hub, Qwen/Qwen3-30B-A3B).
    "qwen3-30b-a3b": ModelConfig(
        arch="qwen3moe", n_layers=48, hidden=2048, n_heads=32, n_kv_heads=4, head_dim=128,
        vocab_size=151936, context_length=40960, n_experts=128, n_experts_used=8, expert_ffn=768, ffn=6144,
    ),
}

# Models up to this size get exact float weights (quantizing ~3e7 floats takes seconds);
# larger ones get pool blocks.
FLOAT_PATH_MAX_PARAMS = 1 << 25

# Distinct quantized blocks per type in the pool: enough that neighbouring rows differ.
_POOL_BLOCKS = 1 << 14


def preset_config(preset: str, **overrides: int) -> ModelConfig:
    """A preset's config with some fields replaced (e.g. n_layers=1 for a one-layer cut)."""
    if preset not in PRESETS:
        raise SparkInferError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[preset].replace(**overrides)


def _rng(seed: int, *key: str) -> np.random.Generator:
    # Seeded per tensor name, so a tensor's values do not depend on which others the model has.
    return np.random.default_rng([seed, *(zlib.crc32(k.encode()) for k in key)])


def random_tensor(spec: TensorSpec, seed: int) -> np.ndarray:
    """float32 values for one tensor: norms 1 + N(0, 0.02), everything else N(0, 0.02)."""
    values = _rng(seed, spec.name).standard_normal(spec.shape, dtype=np.float32) * np.float32(WEIGHT_STD)
    return values + np.float32(1.0) if spec.is_norm else values


def random_weights(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Float weights for every tensor of `config` (GGUF names, numpy order), reproducible from `seed`."""
    return {spec.name: random_tensor(spec, seed) for spec in tensor_specs(config)}


def synth_model(
    path: str | os.PathLike[str],
    config: ModelConfig,
    types: TypeChoice = "q4_k_m",
    *,
    seed: int = 0,
    vocab: VocabSpec | None = None,
    name: str = "sparkinfer-synthetic",
    progress: bool = False,
) -> None:
    """Write a random model: exact float weights when small, pool blocks when large."""
    vocab = vocab if vocab is not None else synthetic_vocab(config.vocab_size)
    if config.n_params <= FLOAT_PATH_MAX_PARAMS:
        write_model(path, config, random_weights(config, seed), vocab, types, name=name, progress=progress)
        return
    pools = _BlockPools(seed)
    write_gguf(path, config, vocab, types, pools.encode, name=name, progress=progress)


class _BlockPools:
    """Per quant type, _POOL_BLOCKS blocks of N(0, 0.02) quantized once; tensors are random draws."""

    def __init__(self, seed: int) -> None:
        self._seed = seed
        self._pools: dict[GGMLQuantizationType, np.ndarray] = {}

    def encode(self, spec: TensorSpec, ggml_type: GGMLQuantizationType) -> np.ndarray:
        fmt = quant.quant_format(ggml_type, spec.name)
        # Float types and F32-kept tensors (norms, router) are cheap to generate exactly.
        if fmt.block_size == 1:
            return fmt.quantize(random_tensor(spec, self._seed))
        pool = self._pool(ggml_type, fmt.block_size)
        n_blocks = spec.n_elements // fmt.block_size
        picks = _rng(self._seed, spec.name).integers(0, len(pool), n_blocks, dtype=np.int32)
        return pool[picks].reshape(*spec.shape[:-1], fmt.row_bytes(spec.row_len))

    def _pool(self, ggml_type: GGMLQuantizationType, block_size: int) -> np.ndarray:
        if ggml_type not in self._pools:
            rng = _rng(self._seed, "pool", ggml_type.name)
            floats = rng.standard_normal((_POOL_BLOCKS, block_size), dtype=np.float32) * np.float32(WEIGHT_STD)
            self._pools[ggml_type] = quant.quantize(ggml_type, floats)
        return self._pools[ggml_type]
