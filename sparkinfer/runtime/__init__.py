"""Thin decode driver: device and arch, weights upload, paged KV cache, CUDA graph capture and
replay, and `Engine.generate`. See docs/ARCHITECTURE.md ("The decode step") for the contract
with the compiled module; TVM is imported only when a model is loaded (`device.import_tvm`)."""

from sparkinfer.compiler.manifest import Manifest
from sparkinfer.runtime.device import Device, detect_arch, import_tvm, open_device
from sparkinfer.runtime.engine import Engine, Generation, GenerationStats
from sparkinfer.runtime.kv_cache import KVCache

__all__ = [
    "Device",
    "Engine",
    "Generation",
    "GenerationStats",
    "KVCache",
    "Manifest",
    "detect_arch",
    "import_tvm",
    "open_device",
]
