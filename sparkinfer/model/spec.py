"""What the decode step looks like from outside, without TVM: page size, the roles and
record of its inputs. The manifest and the runtime use this module alone."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gguf import GGMLQuantizationType

from sparkinfer.errors import CompiledModuleError
from sparkinfer.quant.layouts import Q6_K_TYPE_SIZE

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
# The decode attention's count of finished splits a KV head (the step variant
# attention_merge="last_block", kernels.attention.paged_decode_attention_merged): state the
# runtime zeroes once at allocation; every launch leaves it at 0 again.
ARRIVALS = "arrivals"
# The router GEMV's count of finished rows (the step variant router_merge="last_block",
# kernels.router.router_gemv_topk): int32[1], zeroed and left at 0 as ARRIVALS.
ROUTER_ARRIVALS = "router_arrivals"
OUTPUTS = ("logits", "next")
# A weight input's `layout` when the step reads it re-laid out: Q6_K rows as planar Q6_K
# (quant/layouts.py, the step variant q6_k_layout="planar"), made from the file's bytes when
# the weight is bound or uploaded.
LAYOUT_Q6_K_PLANAR = "q6_k_planar"


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
    layout: str | None = None  # None: the file's bytes; LAYOUT_Q6_K_PLANAR: re-laid out at binding

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "role": self.role, "dtype": self.dtype, "shape": list(self.shape)}
        if self.tensor is not None:
            out["tensor"] = self.tensor
            out["ggml_type"] = self.ggml_type
        if self.layout is not None:
            out["layout"] = self.layout
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> StepInput:
        return cls(obj["name"], obj["role"], obj["dtype"], tuple(obj["shape"]), obj.get("tensor"), obj.get("ggml_type"),
                   obj.get("layout"))

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


def file_bytes(inp: StepInput) -> int:
    """Bytes of a weight input's tensor in the file: the input's own, or for a Q6_K input
    re-laid out (LAYOUT_Q6_K_PLANAR) its rows' whole 210-byte blocks before the padding."""
    import numpy as np

    shape = tuple(int(d) for d in inp.shape)
    row_bytes = shape[-1] * np.dtype(inp.dtype).itemsize
    if inp.layout == LAYOUT_Q6_K_PLANAR:
        row_bytes = row_bytes // Q6_K_TYPE_SIZE * Q6_K_TYPE_SIZE  # the padding is < 16 bytes
    return int(np.prod(shape[:-1], dtype=np.int64)) * row_bytes


def from_file(raw: Any, inp: StepInput) -> Any:
    """The array a weight input takes, from its tensor's bytes in the file (uint8, as many as
    `file_bytes(inp)`): those bytes viewed as `inp.dtype` in `inp.shape` (zero-copy where they
    are contiguous), or re-laid out first as `inp.layout` says (a copy)."""
    import numpy as np

    if inp.layout not in (None, LAYOUT_Q6_K_PLANAR):
        raise CompiledModuleError(f"input '{inp.name}' has layout {inp.layout!r}, which this runtime does not know: "
                                  f"recompile the model")
    shape = tuple(int(d) for d in inp.shape)
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if inp.layout == LAYOUT_Q6_K_PLANAR:
        from sparkinfer.quant.kquants import q6_k_to_planar

        raw = q6_k_to_planar(raw.reshape(int(np.prod(shape[:-1], dtype=np.int64)), -1)).reshape(-1)
    return raw.view(np.dtype(inp.dtype)).reshape(shape)


def bind_weight(data: Any, inp: StepInput) -> Any:
    """The array a weight input takes, from the GGUF tensor's data (`TensorInfo.data`: typed
    for F32/F16, raw row bytes otherwise): `from_file` of its bytes."""
    import numpy as np

    raw = np.ascontiguousarray(data).view(np.uint8)
    if raw.nbytes != file_bytes(inp):
        raise ValueError(f"tensor '{inp.tensor}' has {raw.nbytes} bytes, {inp.name} takes {inp.dtype}{list(inp.shape)}"
                         f"{' re-laid out from ' + str(file_bytes(inp)) if inp.layout else ''}")
    return from_file(raw, inp)
