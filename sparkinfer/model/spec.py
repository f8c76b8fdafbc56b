"""What the decode step looks like from outside, without TVM: page size, the roles and
record of its inputs. The manifest and the runtime use this module alone."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gguf import GGMLQuantizationType

from sparkinfer.errors import CompiledModuleError

PAGE_SIZE = 64  # tokens per KV page (docs/ARCHITECTURE.md)
N_PAGES = "n_pages"  # the symbolic dim of every KV cache, as the manifest writes it
KV_DTYPE = "float16"
ENTRY = "decode"  # the Relax function of the step
# The same step with the logits processed (kernels/logits.py: a grammar's token mask, presence /
# frequency / repetition penalties) before sampling; same parameters, same outputs. A request
# that asks for none of it runs ENTRY, which does none of it.
ENTRY_PROCESSED = "decode_processed"

ROLE_STATE, ROLE_KV, ROLE_WEIGHT = "state", "kv", "weight"
STATE_INPUTS = ("token", "pos", "page_table", "sample_params", "rng")
# State that only ENTRY_PROCESSED reads; a module without it cannot process logits.
PROCESSING_INPUTS = ("logits_params", "token_mask", "token_counts")
OUTPUTS = ("logits", "next")


def chunk_entry(n_tokens: int, all_logits: bool) -> str:
    """The Relax function of the T-token step: `prefill_T` (logits of the last valid row, and
    the next token sampled) or `score_T` (logits of every row)."""
    return f"{'score' if all_logits else 'prefill'}_{n_tokens}"


def chunk_inputs(n_tokens: int) -> list[StepInput]:
    """The parameters a T-token step takes before the decode step's: the chunk's token ids
    (padded past n_valid) and n_valid, the rows that are prompt tokens."""
    return [StepInput("tokens", ROLE_STATE, "int32", (n_tokens,)), StepInput("n_valid", ROLE_STATE, "int32", (1,))]


def ggml_type(value: Any) -> GGMLQuantizationType:
    """A ggml type from its enum member, its int value or its name."""
    if isinstance(value, str):
        return GGMLQuantizationType[value]
    return GGMLQuantizationType(int(value))


def max_pages(context_length: int, page_size: int = PAGE_SIZE) -> int:
    """MP: the page-table length, ceil(context_length / P)."""
    return -(-context_length // page_size)


@dataclass(frozen=True)
class StepInput:
    """One parameter of `decode`. `shape` holds ints and, for KV caches, the string
    "n_pages". Weights name their GGUF tensor and its ggml type; their shape is the word
    array's, which can differ from the GGUF shape by a leading unit dim (dense FFN)."""

    name: str
    role: str
    dtype: str
    shape: tuple[int | str, ...]
    tensor: str | None = None
    ggml_type: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "role": self.role, "dtype": self.dtype, "shape": list(self.shape)}
        if self.tensor is not None:
            out["tensor"] = self.tensor
            out["ggml_type"] = self.ggml_type
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> StepInput:
        return cls(obj["name"], obj["role"], obj["dtype"], tuple(obj["shape"]), obj.get("tensor"), obj.get("ggml_type"))

    def concrete_shape(self, n_pages: int | None = None) -> tuple[int, ...]:
        """The shape with "n_pages" bound; CompiledModuleError for a dim left symbolic."""
        out = []
        for d in self.shape:
            if isinstance(d, str):
                if d != N_PAGES or n_pages is None:
                    raise CompiledModuleError(f"input '{self.name}' has symbolic dim {d!r} with no value")
                out.append(int(n_pages))
            else:
                out.append(int(d))
        return tuple(out)


def bind_weight(data: Any, inp: StepInput) -> Any:
    """The array a weight input takes, from the GGUF tensor's data (`TensorInfo.data`: typed
    for F32/F16, raw row bytes otherwise): the same bytes viewed as `inp.dtype` in
    `inp.shape`. Zero-copy for a contiguous memory map."""
    import numpy as np

    raw = np.ascontiguousarray(data).view(np.uint8)
    words = raw.reshape(-1).view(np.dtype(inp.dtype))
    shape = tuple(int(d) for d in inp.shape)
    if words.size != int(np.prod(shape)):
        raise ValueError(f"tensor '{inp.tensor}' has {raw.nbytes} bytes, {inp.name} takes {inp.dtype}{list(shape)}")
    return words.reshape(shape)
