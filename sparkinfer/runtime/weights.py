"""Weights to the device: GGUF tensors in the order the compiled step takes them.

Each weight goes straight from the file's memory map to its device array (one copy per
tensor, no host copy of the file): the GGUF row bytes are reinterpreted as the words the
manifest names (what `kernels.gemv.weight_view` makes of them, e.g. Q4_K rows as uint32), so
the only check needed is that the byte counts agree. A weight the step reads re-laid out
(`StepInput.layout`: planar Q6_K, the step variant q6_k_layout="planar") is re-laid out on the
host first (`model.spec.from_file`), one tensor at a time; the file stays the source of truth.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Sequence

import numpy as np

from sparkinfer.errors import CompiledModuleError, MissingTensorError, OutOfMemoryError
from sparkinfer.model.spec import StepInput, file_bytes, from_file
from sparkinfer.runtime.device import MemoryInfo, format_bytes

# Kept free for the step's own buffers (activations, logits, split-K partials), the CUDA graph
# and the context's growth. A decode step's intermediates are a few MiB; this is generous.
DEFAULT_RESERVE_BYTES = 256 << 20


def dtype_size(dtype: str) -> int:
    return np.dtype(str(dtype)).itemsize


def input_bytes(inp: StepInput, n_pages: int | None = None) -> int:
    return math.prod(inp.concrete_shape(n_pages)) * dtype_size(inp.dtype)


def weights_bytes(inputs: Sequence[StepInput]) -> int:
    return sum(input_bytes(i) for i in inputs if i.role == "weight")


def check_fits(needed: int, what: str, memory_info: MemoryInfo, reserve: int = DEFAULT_RESERVE_BYTES,
               where: str = "GPU") -> int:
    """Raise OutOfMemoryError unless `needed` + `reserve` bytes are free; returns the free bytes."""
    free, total = memory_info()
    if needed + reserve > free:
        raise OutOfMemoryError(
            f"not enough {where} memory for {what}: {format_bytes(needed)} needed "
            f"(+ {format_bytes(reserve)} kept for the step's buffers), but only {format_bytes(free)} "
            f"of {format_bytes(total)} is free"
        )
    return free


def host_view(info: Any, inp: StepInput) -> np.ndarray:
    """The tensor's file bytes as `inp.dtype[inp.shape]`: a view of the memory map, or where the
    step reads the weight re-laid out (`inp.layout`, e.g. planar Q6_K) that re-layout of them."""
    data = np.asarray(info.data).view(np.ndarray)
    if not data.flags["C_CONTIGUOUS"]:
        raise CompiledModuleError(f"tensor '{info.name}' is not contiguous in the file")
    raw = data.reshape(-1).view(np.uint8)
    shape = inp.concrete_shape()
    expected = file_bytes(inp)
    if raw.nbytes != expected:
        relayout = f" re-laid out as {inp.layout}" if inp.layout else ""
        raise CompiledModuleError(
            f"tensor '{info.name}' ({info.ggml_type.name} {list(info.shape)}) holds {raw.nbytes} bytes, but the "
            f"compiled module takes it as {inp.dtype}{list(shape)}{relayout} ({expected} bytes in the file): the "
            f"module was built for another model or quantization; recompile it"
        )
    return from_file(raw, inp)


def check_types(model: Any, inputs: Sequence[StepInput]) -> None:
    """Every weight exists in the file, with the ggml type the module was compiled for."""
    for inp in inputs:
        if inp.role != "weight":
            continue
        info = model.tensors.get(inp.tensor)
        if info is None:
            raise MissingTensorError(f"the compiled module needs tensor '{inp.tensor}', which the file lacks")
        if inp.ggml_type is not None and str(inp.ggml_type) != info.ggml_type.name:
            raise CompiledModuleError(
                f"tensor '{inp.tensor}' is {info.ggml_type.name} in the file but the compiled module expects "
                f"{inp.ggml_type}: recompile for this file"
            )


def upload_weights(
    model: Any,
    inputs: Sequence[StepInput],
    tvm_device: Any,
    *,
    memory_info: MemoryInfo | None = None,
    reserve: int = DEFAULT_RESERVE_BYTES,
    where: str = "GPU",
    progress: bool = True,
) -> list[Any]:
    """Device arrays of the weight inputs, in `inputs` order.

    `model` is a GGUFModel (anything with `.tensors` of name -> TensorInfo). With
    `memory_info`, first checks that all of them fit beside `reserve` bytes."""
    import tvm

    weights = [i for i in inputs if i.role == "weight"]
    check_types(model, weights)
    needed = weights_bytes(weights)
    if memory_info is not None:
        check_fits(needed, f"the weights of {getattr(model, 'path', 'the model')}", memory_info, reserve, where)
    out = []
    with _progress(needed, progress) as bar:
        for inp in weights:
            src = host_view(model.tensors[inp.tensor], inp)
            arr = tvm.runtime.empty(src.shape, inp.dtype, tvm_device)
            arr.copyfrom(src)
            out.append(arr)
            bar.update(src.nbytes)
    return out


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="weights",
                disable=not enabled, file=sys.stderr, leave=False)
