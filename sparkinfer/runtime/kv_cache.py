"""The paged KV cache and the step's other device state, owned by the runtime.

Device arrays (docs/ARCHITECTURE.md, "The decode step"):
  token int32[1], pos int32[1], page_table int32[MP], sample_params float32[3], rng uint32[2],
  logits_params float32[3], token_mask int32[ceil(V / 32)], token_counts int32[V] (the logits
  processing's, runtime/processing.py; absent in older modules), arrivals int32[NKV] (the
  attention's last-block merge, where compiled with it: zeroed here, left at 0 by every step),
  router_arrivals int32[1] (the router's last-block top-k, likewise),
  and per layer k_cache_l / v_cache_l float16[n_pages, P, NKV, D].
Pages are handed out in order (logical page i is physical page i); the page table exists so
that prefix sharing and eviction can come later without recompiling. `pos` lives on the
device and is advanced by the step itself; the host keeps a mirror (`n_tokens`) and the token
ids whose K/V are cached (`tokens`), the hook for prefix reuse.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, Sequence

import numpy as np

from sparkinfer.compiler.manifest import Manifest
from sparkinfer.errors import ContextLengthError, OutOfMemoryError
from sparkinfer.model.spec import ARRIVALS, ROUTER_ARRIVALS
from sparkinfer.runtime.device import MemoryInfo, format_bytes
from sparkinfer.runtime.weights import DEFAULT_RESERVE_BYTES, dtype_size


class DeviceWriter(Protocol):
    """How host data reaches device arrays: synchronously on the CPU, on the step's stream
    (cudaMemcpyAsync) on a GPU, so writes are ordered with the graph replays."""

    def write(self, array: Any, values: np.ndarray) -> None: ...
    def zero(self, array: Any) -> None: ...


class SyncWriter:
    """copyfrom / a zero fill: right for the CPU, and for a GPU before any stream is in use."""

    def write(self, array: Any, values: np.ndarray) -> None:
        array.copyfrom(np.ascontiguousarray(values, dtype=str(array.dtype)).reshape(array.shape))

    def zero(self, array: Any) -> None:
        if array.device.dlpack_device_type() == 1:  # kDLCPU: fill in place through DLPack
            np.from_dlpack(array)[...] = 0
            return
        # Chunks of at most 64 MiB of host zeros.
        flat = array._create_view((math.prod(array.shape),), array.dtype)
        step = max(1, (64 << 20) // dtype_size(array.dtype))
        zeros = np.zeros(min(step, flat.shape[0]), dtype=str(array.dtype))
        for start in range(0, flat.shape[0], step):
            n = min(step, flat.shape[0] - start)
            flat._create_view((n,), array.dtype, start * dtype_size(array.dtype)).copyfrom(zeros[:n])


class KVCache:
    """State and KV pages for one sequence, sized from the context asked for and free memory."""

    def __init__(
        self,
        manifest: Manifest,
        tvm_device: Any,
        *,
        context: int | None,
        model_context: int,
        memory_info: MemoryInfo | None = None,
        reserve: int = DEFAULT_RESERVE_BYTES,
        writer: DeviceWriter | None = None,
        where: str = "GPU",
    ) -> None:
        import tvm

        self.page_size = manifest.page_size
        self.max_pages = manifest.max_pages
        self.model_context = model_context
        self.writer: DeviceWriter = writer or SyncWriter()
        kv_inputs = manifest.kv
        self.bytes_per_page = sum(math.prod(i.concrete_shape(1)) * dtype_size(i.dtype) for i in kv_inputs)
        self.n_pages, self.shrunk_from = plan_pages(
            context, model_context, self.page_size, self.max_pages, self.bytes_per_page, memory_info, reserve, where)
        # Tokens the cache may hold: whole pages, but no more than asked for.
        self.capacity = min(self.n_pages * self.page_size, model_context if context is None else context)
        self.arrays: dict[str, Any] = {}
        for inp in manifest.inputs:
            if inp.role == "weight":
                continue
            self.arrays[inp.name] = tvm.runtime.empty(inp.concrete_shape(self.n_pages), inp.dtype, tvm_device)
        self.kv_names = [i.name for i in kv_inputs]
        for name in self.kv_names:
            self.writer.zero(self.arrays[name])
        table = np.zeros(self.max_pages, np.int32)
        table[: self.n_pages] = np.arange(self.n_pages, dtype=np.int32)
        self.writer.write(self.arrays["page_table"], table)
        self.writer.write(self.arrays["token"], np.zeros(1, np.int32))
        self.writer.write(self.arrays["sample_params"], np.zeros(3, np.float32))
        self.writer.write(self.arrays["rng"], np.zeros(2, np.uint32))
        if "token_counts" in self.arrays:  # logits processing (modules compiled since it exists)
            self.writer.write(self.arrays["logits_params"], np.array([0.0, 0.0, 1.0], np.float32))
            self.writer.write(self.arrays["token_mask"], np.full(self.arrays["token_mask"].shape, -1, np.int32))
            self.writer.zero(self.arrays["token_counts"])
        for name in (ARRIVALS, ROUTER_ARRIVALS):  # the last-block merges' counts: 0 between launches
            if name in self.arrays:
                self.writer.zero(self.arrays[name])
        self.tokens: list[int] = []
        self.reset()

    @property
    def n_tokens(self) -> int:
        """Tokens whose K/V are in the cache (= the device's `pos` between steps)."""
        return len(self.tokens)

    @property
    def kv_bytes(self) -> int:
        return self.n_pages * self.bytes_per_page

    def reset(self) -> None:
        """Forget every cached token (the pages are simply overwritten later)."""
        self.set_position(0)

    def set_position(self, n: int) -> None:
        """Keep the first `n` cached tokens and continue from there (prefix reuse)."""
        if not 0 <= n <= self.n_tokens:
            raise ValueError(f"position {n} is outside the {self.n_tokens} cached tokens")
        del self.tokens[n:]
        self.writer.write(self.arrays["pos"], np.array([n], np.int32))

    def common_prefix(self, prompt: Sequence[int]) -> int:
        """How many leading tokens of `prompt` are already cached; at least one prompt token
        is always left to run, since its logits are needed."""
        n = 0
        limit = min(len(prompt) - 1, self.n_tokens)
        while n < limit and self.tokens[n] == prompt[n]:
            n += 1
        return n

    def set_sampling(self, temperature: float, top_p: float, top_k: int, seed: int) -> None:
        self.writer.write(self.arrays["sample_params"], np.array([temperature, top_p, top_k], np.float32))
        self.writer.write(self.arrays["rng"], np.array([seed & 0xFFFFFFFF, 0], np.uint32))

    def check_fits(self, n_prompt: int, max_tokens: int) -> None:
        if n_prompt + max_tokens > self.capacity:
            raise ContextLengthError(
                f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) = {n_prompt + max_tokens} tokens "
                f"exceeds the context of {self.capacity} tokens"
                + (f" (the model's context_length is {self.model_context})" if self.capacity < self.model_context
                   else "")
            )


def plan_pages(
    context: int | None,
    model_context: int,
    page_size: int,
    max_pages: int,
    bytes_per_page: int,
    memory_info: MemoryInfo | None,
    reserve: int,
    where: str = "GPU",
) -> tuple[int, int | None]:
    """(pages, the context it was shrunk from or None).

    An explicit `context` must fit in memory, or OutOfMemoryError says the numbers; the
    default (the model's context_length) is shrunk to what fits, whole pages, at least one."""
    if context is not None:
        if context <= 0:
            raise ContextLengthError(f"context must be positive, got {context}")
        if context > model_context:
            raise ContextLengthError(
                f"context {context} exceeds the model's context_length of {model_context} tokens")
    wanted = model_context if context is None else context
    pages = min(max_pages, -(-wanted // page_size))
    if memory_info is None:
        return pages, None
    free, total = memory_info()
    fit = max(0, (free - reserve) // bytes_per_page) if bytes_per_page else pages
    if pages <= fit:
        return pages, None
    if context is None and fit >= 1:
        return int(fit), wanted
    raise OutOfMemoryError(
        f"not enough {where} memory for a KV cache of {wanted} tokens: {format_bytes(pages * bytes_per_page)} needed "
        f"({pages} pages of {page_size} tokens, {format_bytes(bytes_per_page)} each, + {format_bytes(reserve)} "
        f"kept for the step's buffers), but only {format_bytes(free)} of {format_bytes(total)} is free after the "
        f"weights; at most {int(fit) * page_size} tokens fit"
    )
