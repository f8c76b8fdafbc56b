"""One VM `decode` call captured as a CUDA graph on the runtime's own stream, and replayed.

Recipe (seen working on an H100 and an H200 with runtime-only TVM: tests/runtime/test_runtime_gpu.py):
  s = dev.create_raw_stream(); dev.set_raw_stream(s)    # TVM launches its kernels on s
  warm-up call (loads the kernels, fills the VM's memory pool)
  cudaStreamBeginCapture(s, relaxed); call; cudaStreamEndCapture(s) -> graph
  cudaGraphInstantiate -> exec; per token cudaGraphLaunch(exec, s)
A replay reads the very buffers the captured call was given and writes the tensors it
returned: keep both alive (this class holds them) and feed new values by writing into those
buffers, on the same stream, so writes and replays stay in order without host syncs.
"""

from __future__ import annotations

import ctypes
import math
from typing import Any, Callable, Sequence

import numpy as np

from sparkinfer.runtime import cudart as cu


class CudaStream:
    """The runtime's stream on one device: async writes, device copies, reads, events."""

    def __init__(self, tvm_device: Any, index: int = 0, rt: cu.CudaRuntime | None = None) -> None:
        self.dev = tvm_device
        self.rt = rt or cu.cudart()
        self.rt.set_device(index)
        self.handle = int(tvm_device.create_raw_stream() or 0)
        if not self.handle:
            raise cu.CudaError("could not create a CUDA stream through TVM")
        self.activate()
        self._host: list[tuple[int, int]] = []

    def activate(self) -> None:
        """Make this the stream TVM launches kernels on (a per-device global in TVM: another
        engine in the process may have set its own)."""
        self.dev.set_raw_stream(self.handle)

    # DeviceWriter ------------------------------------------------------------------------

    def write(self, array: Any, values: np.ndarray) -> None:
        """Host -> device on the stream. `values` is pageable: the call returns once it is
        staged, so the caller may reuse it at once."""
        src = np.ascontiguousarray(values, dtype=np.dtype(str(array.dtype)))
        nbytes = math.prod(array.shape) * src.dtype.itemsize
        if src.nbytes != nbytes:
            raise ValueError(f"writing {src.nbytes} bytes into a device array of {nbytes}")
        self.rt.memcpy_async(array.data_ptr(), src.ctypes.data, nbytes, cu.HOST_TO_DEVICE, self.handle)

    def zero(self, array: Any) -> None:
        nbytes = math.prod(array.shape) * np.dtype(str(array.dtype)).itemsize
        self.rt.memset_async(array.data_ptr(), 0, nbytes, self.handle)

    # copies ------------------------------------------------------------------------------

    def copy_device(self, dst: int, src: int, nbytes: int) -> None:
        self.rt.memcpy_async(dst, src, nbytes, cu.DEVICE_TO_DEVICE, self.handle)

    def copy_to_host(self, dst_host: int, src: int, nbytes: int) -> None:
        self.rt.memcpy_async(dst_host, src, nbytes, cu.DEVICE_TO_HOST, self.handle)

    def pinned(self, n: int, dtype: Any) -> np.ndarray:
        """A page-locked host array (lives as long as this stream object)."""
        dtype = np.dtype(dtype)
        nbytes = max(1, n) * dtype.itemsize
        ptr = self.rt.malloc_host(nbytes)
        self._host.append((ptr, nbytes))
        buf = (ctypes.c_char * nbytes).from_address(ptr)
        return np.frombuffer(buf, dtype=dtype, count=max(1, n))

    def event(self, timing: bool = False) -> int:
        return self.rt.event_create(cu.EVENT_DEFAULT if timing else cu.EVENT_DISABLE_TIMING)

    def record(self, event: int) -> None:
        self.rt.event_record(event, self.handle)

    def synchronize(self) -> None:
        self.rt.stream_synchronize(self.handle)

    def close(self) -> None:
        if not self.handle:
            return
        self.synchronize()
        for ptr, _ in self._host:
            self.rt.free_host(ptr)
        self._host.clear()
        self.dev.set_raw_stream(0)  # TVM must not launch on a freed stream
        self.dev.free_raw_stream(self.handle)
        self.handle = 0


class CapturedStep:
    """`fn(*args)` (a VM function) captured once on `stream`; `replay()` runs it again.

    `outputs` are the tensors the captured call returned: each replay rewrites them."""

    def __init__(self, stream: CudaStream, fn: Callable[..., Any], args: Sequence[Any], warmup: int = 1) -> None:
        self.stream = stream
        self.rt = stream.rt
        self.args = list(args)  # the graph reads these buffers: keep them alive
        self.graph = 0
        self.exec = 0
        stream.activate()
        for _ in range(warmup):
            fn(*self.args)
        stream.synchronize()
        self.rt.stream_begin_capture(stream.handle, cu.CAPTURE_MODE_RELAXED)
        try:
            outputs = fn(*self.args)
        except BaseException:
            try:
                self.graph = self.rt.stream_end_capture(stream.handle)
            except cu.CudaError:
                pass
            self.close()
            raise
        self.graph = self.rt.stream_end_capture(stream.handle)
        self.outputs = _as_list(outputs)
        self.exec = self.rt.graph_instantiate(self.graph)
        self.rt.graph_upload(self.exec, stream.handle)
        stream.synchronize()

    def replay(self) -> None:
        self.rt.graph_launch(self.exec, self.stream.handle)

    def close(self) -> None:
        if self.exec:
            self.rt.graph_exec_destroy(self.exec)
            self.exec = 0
        if self.graph:
            self.rt.graph_destroy(self.graph)
            self.graph = 0


def _as_list(outputs: Any) -> list[Any]:
    if hasattr(outputs, "shape"):
        return [outputs]
    return list(outputs)
