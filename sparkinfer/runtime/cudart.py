"""The few CUDA runtime calls the driver needs beyond TVM: graph capture, async copies, events,
pinned memory, free memory.

Two backends with one interface, every call's error code checked (a failure raises CudaError
naming the call and the CUDA error):
  - `cuda.bindings.runtime` (the `cuda-bindings` package) when it imports;
  - else ctypes on `libcudart.so.*` (the one libtvm_runtime_cuda.so links, so it is on any
    machine that runs TVM CUDA modules).
Streams, graphs and events are driver objects, so handles from TVM (`dev.create_raw_stream()`)
work with either backend, whichever cudart instance each one uses. Handles are plain ints.
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import Any

# cudaMemcpyKind
HOST_TO_DEVICE = 1
DEVICE_TO_HOST = 2
DEVICE_TO_DEVICE = 3
# cudaStreamCaptureMode
CAPTURE_MODE_RELAXED = 2
# cudaEvent flags
EVENT_DEFAULT = 0
EVENT_DISABLE_TIMING = 2


class CudaError(RuntimeError):
    """A CUDA runtime call failed."""


class CudaRuntime:
    """Interface; see `_Bindings` and `_Ctypes`."""

    backend = "none"

    def set_device(self, index: int) -> None: ...
    def mem_get_info(self) -> tuple[int, int]: ...
    def stream_synchronize(self, stream: int) -> None: ...
    def stream_begin_capture(self, stream: int, mode: int = CAPTURE_MODE_RELAXED) -> None: ...
    def stream_end_capture(self, stream: int) -> int: ...
    def graph_instantiate(self, graph: int) -> int: ...
    def graph_upload(self, graph_exec: int, stream: int) -> None: ...
    def graph_launch(self, graph_exec: int, stream: int) -> None: ...
    def graph_destroy(self, graph: int) -> None: ...
    def graph_exec_destroy(self, graph_exec: int) -> None: ...
    def memcpy_async(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None: ...
    def memset_async(self, ptr: int, value: int, nbytes: int, stream: int) -> None: ...
    def malloc_host(self, nbytes: int) -> int: ...
    def free_host(self, ptr: int) -> None: ...
    def event_create(self, flags: int = EVENT_DISABLE_TIMING) -> int: ...
    def event_record(self, event: int, stream: int) -> None: ...
    def event_synchronize(self, event: int) -> None: ...
    def event_elapsed_ms(self, start: int, end: int) -> float: ...
    def event_destroy(self, event: int) -> None: ...


class _Bindings(CudaRuntime):
    backend = "cuda.bindings"

    def __init__(self) -> None:
        from cuda.bindings import runtime as rt

        self.rt = rt

    def _check(self, name: str, result: Any) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            _, text = self.rt.cudaGetErrorString(err)
            text = text.decode() if isinstance(text, bytes) else str(text)
            raise CudaError(f"{name} failed: {getattr(err, 'name', err)} ({int(err)}): {text}")
        if not rest:
            return None
        return rest[0] if len(rest) == 1 else tuple(rest)

    def _stream(self, stream: int) -> Any:
        return self.rt.cudaStream_t(int(stream))

    def set_device(self, index: int) -> None:
        self._check("cudaSetDevice", self.rt.cudaSetDevice(index))

    def mem_get_info(self) -> tuple[int, int]:
        free, total = self._check("cudaMemGetInfo", self.rt.cudaMemGetInfo())
        return int(free), int(total)

    def stream_synchronize(self, stream: int) -> None:
        self._check("cudaStreamSynchronize", self.rt.cudaStreamSynchronize(self._stream(stream)))

    def stream_begin_capture(self, stream: int, mode: int = CAPTURE_MODE_RELAXED) -> None:
        self._check("cudaStreamBeginCapture",
                    self.rt.cudaStreamBeginCapture(self._stream(stream), self.rt.cudaStreamCaptureMode(mode)))

    def stream_end_capture(self, stream: int) -> int:
        graph = self._check("cudaStreamEndCapture", self.rt.cudaStreamEndCapture(self._stream(stream)))
        return int(graph)

    def graph_instantiate(self, graph: int) -> int:
        return int(self._check("cudaGraphInstantiate", self.rt.cudaGraphInstantiate(self.rt.cudaGraph_t(graph), 0)))

    def graph_upload(self, graph_exec: int, stream: int) -> None:
        self._check("cudaGraphUpload",
                    self.rt.cudaGraphUpload(self.rt.cudaGraphExec_t(graph_exec), self._stream(stream)))

    def graph_launch(self, graph_exec: int, stream: int) -> None:
        self._check("cudaGraphLaunch",
                    self.rt.cudaGraphLaunch(self.rt.cudaGraphExec_t(graph_exec), self._stream(stream)))

    def graph_destroy(self, graph: int) -> None:
        self._check("cudaGraphDestroy", self.rt.cudaGraphDestroy(self.rt.cudaGraph_t(graph)))

    def graph_exec_destroy(self, graph_exec: int) -> None:
        self._check("cudaGraphExecDestroy", self.rt.cudaGraphExecDestroy(self.rt.cudaGraphExec_t(graph_exec)))

    def memcpy_async(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        self._check("cudaMemcpyAsync", self.rt.cudaMemcpyAsync(
            int(dst), int(src), int(nbytes), self.rt.cudaMemcpyKind(kind), self._stream(stream)))

    def memset_async(self, ptr: int, value: int, nbytes: int, stream: int) -> None:
        self._check("cudaMemsetAsync",
                    self.rt.cudaMemsetAsync(int(ptr), int(value), int(nbytes), self._stream(stream)))

    def malloc_host(self, nbytes: int) -> int:
        return int(self._check("cudaMallocHost", self.rt.cudaMallocHost(int(nbytes))))

    def free_host(self, ptr: int) -> None:
        self._check("cudaFreeHost", self.rt.cudaFreeHost(int(ptr)))

    def event_create(self, flags: int = EVENT_DISABLE_TIMING) -> int:
        return int(self._check("cudaEventCreateWithFlags", self.rt.cudaEventCreateWithFlags(flags)))

    def event_record(self, event: int, stream: int) -> None:
        self._check("cudaEventRecord", self.rt.cudaEventRecord(self.rt.cudaEvent_t(event), self._stream(stream)))

    def event_synchronize(self, event: int) -> None:
        self._check("cudaEventSynchronize", self.rt.cudaEventSynchronize(self.rt.cudaEvent_t(event)))

    def event_elapsed_ms(self, start: int, end: int) -> float:
        return float(self._check("cudaEventElapsedTime", self.rt.cudaEventElapsedTime(
            self.rt.cudaEvent_t(start), self.rt.cudaEvent_t(end))))

    def event_destroy(self, event: int) -> None:
        self._check("cudaEventDestroy", self.rt.cudaEventDestroy(self.rt.cudaEvent_t(event)))


_P = ctypes.c_void_p
_SIZE = ctypes.c_size_t


class _Ctypes(CudaRuntime):
    backend = "ctypes"

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        lib.cudaGetErrorName.restype = ctypes.c_char_p
        for name, args in {
            "cudaSetDevice": [ctypes.c_int],
            "cudaMemGetInfo": [ctypes.POINTER(_SIZE), ctypes.POINTER(_SIZE)],
            "cudaStreamSynchronize": [_P],
            "cudaStreamBeginCapture": [_P, ctypes.c_int],
            "cudaStreamEndCapture": [_P, ctypes.POINTER(_P)],
            "cudaGraphInstantiate": [ctypes.POINTER(_P), _P, ctypes.c_ulonglong],
            "cudaGraphUpload": [_P, _P],
            "cudaGraphLaunch": [_P, _P],
            "cudaGraphDestroy": [_P],
            "cudaGraphExecDestroy": [_P],
            "cudaMemcpyAsync": [_P, _P, _SIZE, ctypes.c_int, _P],
            "cudaMemsetAsync": [_P, ctypes.c_int, _SIZE, _P],
            "cudaMallocHost": [ctypes.POINTER(_P), _SIZE],
            "cudaFreeHost": [_P],
            "cudaEventCreateWithFlags": [ctypes.POINTER(_P), ctypes.c_uint],
            "cudaEventRecord": [_P, _P],
            "cudaEventSynchronize": [_P],
            "cudaEventElapsedTime": [ctypes.POINTER(ctypes.c_float), _P, _P],
            "cudaEventDestroy": [_P],
        }.items():
            fn = getattr(lib, name)
            fn.argtypes = args
            fn.restype = ctypes.c_int

    def _call(self, name: str, *args: Any) -> None:
        err = getattr(self.lib, name)(*args)
        if err != 0:
            raise CudaError(f"{name} failed: {self.lib.cudaGetErrorName(err).decode()} ({err}): "
                            f"{self.lib.cudaGetErrorString(err).decode()}")

    def set_device(self, index: int) -> None:
        self._call("cudaSetDevice", index)

    def mem_get_info(self) -> tuple[int, int]:
        free, total = _SIZE(), _SIZE()
        self._call("cudaMemGetInfo", ctypes.byref(free), ctypes.byref(total))
        return int(free.value), int(total.value)

    def stream_synchronize(self, stream: int) -> None:
        self._call("cudaStreamSynchronize", _P(stream))

    def stream_begin_capture(self, stream: int, mode: int = CAPTURE_MODE_RELAXED) -> None:
        self._call("cudaStreamBeginCapture", _P(stream), mode)

    def stream_end_capture(self, stream: int) -> int:
        graph = _P()
        self._call("cudaStreamEndCapture", _P(stream), ctypes.byref(graph))
        return int(graph.value or 0)

    def graph_instantiate(self, graph: int) -> int:
        graph_exec = _P()
        self._call("cudaGraphInstantiate", ctypes.byref(graph_exec), _P(graph), 0)
        return int(graph_exec.value or 0)

    def graph_upload(self, graph_exec: int, stream: int) -> None:
        self._call("cudaGraphUpload", _P(graph_exec), _P(stream))

    def graph_launch(self, graph_exec: int, stream: int) -> None:
        self._call("cudaGraphLaunch", _P(graph_exec), _P(stream))

    def graph_destroy(self, graph: int) -> None:
        self._call("cudaGraphDestroy", _P(graph))

    def graph_exec_destroy(self, graph_exec: int) -> None:
        self._call("cudaGraphExecDestroy", _P(graph_exec))

    def memcpy_async(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        self._call("cudaMemcpyAsync", _P(dst), _P(src), nbytes, kind, _P(stream))

    def memset_async(self, ptr: int, value: int, nbytes: int, stream: int) -> None:
        self._call("cudaMemsetAsync", _P(ptr), value, nbytes, _P(stream))

    def malloc_host(self, nbytes: int) -> int:
        ptr = _P()
        self._call("cudaMallocHost", ctypes.byref(ptr), nbytes)
        return int(ptr.value or 0)

    def free_host(self, ptr: int) -> None:
        self._call("cudaFreeHost", _P(ptr))

    def event_create(self, flags: int = EVENT_DISABLE_TIMING) -> int:
        event = _P()
        self._call("cudaEventCreateWithFlags", ctypes.byref(event), flags)
        return int(event.value or 0)

    def event_record(self, event: int, stream: int) -> None:
        self._call("cudaEventRecord", _P(event), _P(stream))

    def event_synchronize(self, event: int) -> None:
        self._call("cudaEventSynchronize", _P(event))

    def event_elapsed_ms(self, start: int, end: int) -> float:
        ms = ctypes.c_float()
        self._call("cudaEventElapsedTime", ctypes.byref(ms), _P(start), _P(end))
        return float(ms.value)

    def event_destroy(self, event: int) -> None:
        self._call("cudaEventDestroy", _P(event))


_CUDART_NAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so")


def _load_libcudart() -> ctypes.CDLL:
    errors = []
    for name in _CUDART_NAMES:
        try:
            return ctypes.CDLL(name, mode=os.RTLD_GLOBAL)
        except OSError as e:
            errors.append(str(e))
    raise CudaError("no CUDA runtime library: neither cuda-bindings nor libcudart could be loaded ("
                    + "; ".join(errors) + ")")


@functools.cache
def cudart(prefer: str | None = None) -> CudaRuntime:
    """The CUDA runtime wrapper, once per process. `prefer` ("cuda.bindings" or "ctypes", or
    $SPARKINFER_CUDART) picks a backend; by default cuda.bindings when it imports."""
    prefer = prefer or os.environ.get("SPARKINFER_CUDART") or None
    if prefer in (None, "cuda.bindings"):
        try:
            return _Bindings()
        except ImportError:
            if prefer == "cuda.bindings":
                raise
    return _Ctypes(_load_libcudart())
