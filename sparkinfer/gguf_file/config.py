"""Typed hyper-parameters of the model families SparkInfer runs, read from and written to GGUF metadata."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from sparkinfer.errors import MetadataError, UnsupportedArchitectureError

SUPPORTED_ARCHS: tuple[str, ...] = ("qwen3moe", "qwen3")

# llama.cpp's default when a file carries no rope.freq_base.
_DEFAULT_ROPE_THETA = 10000.0


def _float32_exact(value: float) -> float:
    """The float a GGUF FLOAT32 field holds for `value`, as its shortest decimal.

    Configs built in code (1e-6) and configs read back from a file (float32 9.99999997e-07)
    must compare and hash equal, so every float field keeps this canonical form.
    """
    return float(str(np.float32(value)))


def check_arch(arch: str) -> None:
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {arch!r}: SparkInfer runs {', '.join(SUPPORTED_ARCHS)}"
        )


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a Qwen3 (dense) or Qwen3-MoE model.

    MoE models have n_experts > 0 and use expert_ffn; dense models have n_experts == 0 and
    use ffn. A MoE file may also carry `ffn` (feed_forward_length, unused by its tensors).
    """

    arch: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    rms_eps: float = 1e-6
    rope_theta: float = 1e6
    n_experts: int = 0
    n_experts_used: int = 0
    expert_ffn: int = 0
    ffn: int = 0

    def __post_init__(self) -> None:
        check_arch(self.arch)
        object.__setattr__(self, "rms_eps", _float32_exact(self.rms_eps))
        object.__setattr__(self, "rope_theta", _float32_exact(self.rope_theta))
        for name in ("n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "context_length"):
            _require(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        _require(
            self.n_heads % self.n_kv_heads == 0,
            f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})",
        )
        _require(self.rms_eps > 0, f"rms_eps must be positive, got {self.rms_eps}")
        if self.is_moe:
            _require(self.n_experts > 0, f"{self.arch} needs n_experts > 0, got {self.n_experts}")
            _require(
                0 < self.n_experts_used <= self.n_experts,
                f"n_experts_used must be in 1..{self.n_experts}, got {self.n_experts_used}",
            )
            _require(self.expert_ffn > 0, f"expert_ffn must be positive, got {self.expert_ffn}")
        else:
            _require(self.ffn > 0, f"ffn must be positive, got {self.ffn}")
            _require(
                self.n_experts == self.n_experts_used == self.expert_ffn == 0,
                f"dense {self.arch} takes no experts (n_experts={self.n_experts})",
            )

    @property
    def is_moe(self) -> bool:
        return self.arch == "qwen3moe"

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def n_params(self) -> int:
        """Total parameter count of all tensors the layout expects."""
        from sparkinfer.gguf_file.layout import tensor_specs  # layout builds on this module

        return sum(spec.n_elements for spec in tensor_specs(self))

    @property
    def n_active_params(self) -> int:
        """Parameters one decoded token multiplies with: n_experts_used of the experts."""
        from sparkinfer.gguf_file.layout import tensor_specs

        total = 0
        for spec in tensor_specs(self):
            total += spec.n_elements * self.n_experts_used // self.n_experts if spec.is_expert else spec.n_elements
        return total

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def hparams_hash(self) -> str:
        """Stable 16-hex-digit digest of every hyper-parameter (a cache key component)."""
        canonical = json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> ModelConfig:
        arch = _get(metadata, "general.architecture", str)
        check_arch(arch)
        reader = _ArchKeys(metadata, arch)
        n_heads = reader.get_int("attention.head_count")
        hidden = reader.get_int("embedding_length")
        _require(n_heads > 0, f"{arch}.attention.head_count must be positive, got {n_heads}")
        head_dim = reader.get_int("attention.key_length", default=hidden // n_heads)
        value_dim = reader.get_int("attention.value_length", default=head_dim)
        if value_dim != head_dim:
            raise MetadataError(
                f"{arch}.attention.value_length ({value_dim}) differs from attention.key_length ({head_dim}); "
                f"{arch} needs them equal"
            )
        is_moe = arch == "qwen3moe"
        return cls(
            arch=arch,
            n_layers=reader.get_int("block_count"),
            hidden=hidden,
            n_heads=n_heads,
            n_kv_heads=reader.get_int("attention.head_count_kv", default=n_heads),
            head_dim=head_dim,
            vocab_size=_vocab_size(metadata, arch),
            context_length=reader.get_int("context_length"),
            rms_eps=reader.get_float("attention.layer_norm_rms_epsilon"),
            rope_theta=reader.get_float("rope.freq_base", default=_DEFAULT_ROPE_THETA),
            n_experts=reader.get_int("expert_count") if is_moe else 0,
            n_experts_used=reader.get_int("expert_used_count") if is_moe else 0,
            expert_ffn=reader.get_int("expert_feed_forward_length") if is_moe else 0,
            ffn=reader.get_int("feed_forward_length", default=0 if is_moe else None),
        )

    def to_metadata(self) -> dict[str, Any]:
        """The architecture keys llama.cpp and transformers read; ints go to UINT32, floats to FLOAT32."""
        a = self.arch
        metadata: dict[str, Any] = {
            "general.architecture": a,
            f"{a}.block_count": self.n_layers,
            f"{a}.context_length": self.context_length,
            f"{a}.embedding_length": self.hidden,
            f"{a}.attention.head_count": self.n_heads,
            f"{a}.attention.head_count_kv": self.n_kv_heads,
            f"{a}.attention.key_length": self.head_dim,
            f"{a}.attention.value_length": self.head_dim,
            f"{a}.attention.layer_norm_rms_epsilon": self.rms_eps,
            f"{a}.rope.freq_base": self.rope_theta,
        }
        if self.ffn:
            metadata[f"{a}.feed_forward_length"] = self.ffn
        if self.is_moe:
            metadata[f"{a}.expert_count"] = self.n_experts
            metadata[f"{a}.expert_used_count"] = self.n_experts_used
            metadata[f"{a}.expert_feed_forward_length"] = self.expert_ffn
        return metadata


def transformers_overrides(config: ModelConfig) -> dict[str, int]:
    """Config values transformers' GGUF loader does not take from the file (5.24): it keeps its
    defaults for qwen3moe.expert_feed_forward_length (768) and qwen3.attention.key_length (128).
    Pass these to `AutoModelForCausalLM.from_pretrained(..., gguf_file=...)`."""
    if config.is_moe:
        return {"moe_intermediate_size": config.expert_ffn}
    return {"head_dim": config.head_dim}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise MetadataError(f"invalid model configuration: {message}")


def _get(metadata: Mapping[str, Any], key: str, kind: type, default: Any = None) -> Any:
    """metadata[key] checked against `kind`; a key without a default is required."""
    if key not in metadata:
        if default is None:
            raise MetadataError(f"metadata key {key!r} is missing")
        return default
    value = metadata[key]
    # bool is an int subclass, but a BOOL field where a count belongs is a broken file.
    accepted = (int, float) if kind is float else (kind,)
    if isinstance(value, bool) or not isinstance(value, accepted):
        raise MetadataError(f"metadata key {key!r} should be {kind.__name__}, found {type(value).__name__} {value!r:.60}")
    return kind(value)


class _ArchKeys:
    """Reads `{arch}.<key>` fields with their expected python type."""

    def __init__(self, metadata: Mapping[str, Any], arch: str) -> None:
        self._metadata = metadata
        self._arch = arch

    def get_int(self, key: str, default: int | None = None) -> int:
        return _get(self._metadata, f"{self._arch}.{key}", int, default)

    def get_float(self, key: str, default: float | None = None) -> float:
        return _get(self._metadata, f"{self._arch}.{key}", float, default)


def _vocab_size(metadata: Mapping[str, Any], arch: str) -> int:
    # llama.cpp takes the vocabulary size from the token list; {arch}.vocab_size is rarely written.
    if f"{arch}.vocab_size" in metadata:
        return _get(metadata, f"{arch}.vocab_size", int)
    return len(_get(metadata, "tokenizer.ggml.tokens", list))
