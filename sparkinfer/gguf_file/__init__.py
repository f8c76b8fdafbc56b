"""GGUF on disk: typed model config, expected tensor layout, validated memory-mapped reader,
streaming writer and synthetic presets. See docs/ARCHITECTURE.md for the contract."""

from sparkinfer.gguf_file.config import SUPPORTED_ARCHS, ModelConfig, transformers_overrides
from sparkinfer.gguf_file.layout import FILE_TYPES, TensorSpec, expected_tensors, tensor_specs, type_map
from sparkinfer.gguf_file.reader import GGUFModel, TensorInfo
from sparkinfer.gguf_file.synth import PRESETS, preset_config, random_weights, synth_model
from sparkinfer.gguf_file.writer import write_gguf, write_model

__all__ = [
    "FILE_TYPES",
    "GGUFModel",
    "ModelConfig",
    "PRESETS",
    "SUPPORTED_ARCHS",
    "TensorInfo",
    "TensorSpec",
    "expected_tensors",
    "preset_config",
    "random_weights",
    "synth_model",
    "tensor_specs",
    "transformers_overrides",
    "type_map",
    "write_gguf",
    "write_model",
]
