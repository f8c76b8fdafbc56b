"""TVM loading, the device to run on, its arch and its memory.

Runtime-only TVM (`TVM_USE_RUNTIME_LIB=1`, or a package without libtvm_compiler.so: what the
GPU machines carry) imports in seconds but skips the backend autoload, so
`tvm/lib/libtvm_runtime_cuda.so` must be loaded by hand before `tvm.cuda()` means anything.
`import_tvm()` does that in both modes; import TVM through it.

Arch names are the compiler's (`sparkinfer.compiler.targets.ARCHS`): "sm_90", "sm_120",
"sm_121" from the GPU's compute capability, or "cpu".
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from sparkinfer.errors import UnsupportedDeviceError

# Compute capability -> the arch a module is compiled for. sm_100 (B200) etc. are not targets yet.
_ARCH_OF_CAPABILITY = {(9, 0): "sm_90", (12, 0): "sm_120", (12, 1): "sm_121"}
CUDA_ARCHS: tuple[str, ...] = tuple(_ARCH_OF_CAPABILITY.values())
ARCHS: tuple[str, ...] = (*CUDA_ARCHS, "cpu")

# (free_bytes, total_bytes) of the device memory; injectable so tests can pretend.
MemoryInfo = Callable[[], tuple[int, int]]


@functools.cache
def import_tvm() -> ModuleType:
    """`import tvm`, plus its CUDA runtime where the package is runtime-only.

    Also works with the full wheel (there the autoload has loaded the CUDA runtime already
    when a driver is present; without one nothing is loaded and no CUDA device exists)."""
    import tvm
    import tvm.runtime.vm  # not imported by `import tvm` in runtime-only mode

    if getattr(tvm.base, "_RUNTIME_ONLY", False):
        _load_cuda_runtime(tvm)
    return tvm


def _load_cuda_runtime(tvm: ModuleType) -> None:
    import tvm_ffi

    if tvm_ffi.get_global_func("device_api.cuda", allow_missing=True) is not None:
        return
    lib = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
    if not lib.is_file():
        return
    try:
        # It links libcuda.so.1: on a machine without a driver this fails, and no GPU exists.
        ctypes.CDLL(str(lib), mode=os.RTLD_GLOBAL)
    except OSError:
        return


def tvm_runtime_only() -> bool:
    return bool(getattr(import_tvm().base, "_RUNTIME_ONLY", False))


def cuda_available(index: int = 0) -> bool:
    tvm = import_tvm()
    try:
        return bool(tvm.cuda(index).exist)
    except Exception:  # no CUDA runtime library at all
        return False


def arch_of_capability(major: int, minor: int) -> str:
    arch = _ARCH_OF_CAPABILITY.get((major, minor))
    if arch is None:
        raise UnsupportedDeviceError(
            f"GPU of compute capability {major}.{minor} (sm_{major}{minor}) has no SparkInfer target: "
            f"supported are {', '.join(CUDA_ARCHS)} (or --arch cpu)"
        )
    return arch


def detect_arch(index: int = 0) -> str:
    """The arch of CUDA device `index`, else "cpu" where there is no CUDA device."""
    if not cuda_available(index):
        return "cpu"
    major, minor = (int(v) for v in str(import_tvm().cuda(index).compute_version).split("."))
    return arch_of_capability(major, minor)


def check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise UnsupportedDeviceError(f"unknown arch {arch!r}: SparkInfer targets {', '.join(ARCHS)}")


@dataclass
class Device:
    """Where the step runs: the TVM device, its arch and a description for reports."""

    arch: str
    tvm_device: Any
    name: str
    index: int = 0

    @property
    def is_cuda(self) -> bool:
        return self.arch != "cpu"

    def memory_info(self) -> tuple[int, int]:
        """(free, total) bytes: cudaMemGetInfo on a GPU; MemAvailable/MemTotal on the CPU."""
        if self.is_cuda:
            return cuda_memory_info(self.index)
        return host_memory_info()

    def describe(self) -> str:
        return self.name


def physical_cores() -> int:
    """Cores (not hardware threads) among the CPUs this process may run on, from Linux's CPU
    topology; elsewhere, the CPUs it may run on."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:
            return len(cpus)
    return max(1, len(cores))


def use_every_core() -> None:
    """TVM's CPU thread pool takes half the logical CPUs when TVM_NUM_THREADS is unset (it
    assumes two hardware threads a core) and pins the main thread to one: on a 2-core machine
    without SMT every parallel kernel ran on one core. Unless the user set TVM_NUM_THREADS, it
    gets one thread per physical core. Read when the pool starts (its first parallel launch),
    so this runs before any CPU kernel."""
    if "TVM_NUM_THREADS" not in os.environ:
        os.environ["TVM_NUM_THREADS"] = str(physical_cores())


def open_device(arch: str | None = None, index: int = 0) -> Device:
    """The device for `arch` (None: the detected GPU's arch, else "cpu").

    A CUDA arch that differs from the GPU's raises: a module built for sm_120 does not load
    on an sm_90 card (arch-specific "a" fatbins)."""
    tvm = import_tvm()
    detected = detect_arch(index)
    arch = arch or detected
    check_arch(arch)
    if arch == "cpu":
        use_every_core()
        return Device("cpu", tvm.cpu(0), _cpu_name(), 0)
    if detected == "cpu":
        raise UnsupportedDeviceError(f"--arch {arch} needs an NVIDIA GPU, and none was found (try --arch cpu)")
    if arch != detected:
        raise UnsupportedDeviceError(f"--arch {arch} does not match the GPU found ({detected}): "
                                     f"modules are compiled per arch")
    dev = tvm.cuda(index)
    return Device(arch, dev, f"{dev.device_name} ({arch})", index)


def cuda_memory_info(index: int = 0) -> tuple[int, int]:
    """(free, total) bytes of CUDA device `index`, by cudaMemGetInfo; total alone from TVM
    (free = total) if no CUDA runtime library can be called."""
    from sparkinfer.runtime.cudart import CudaError, cudart

    try:
        rt = cudart()
        rt.set_device(index)
        return rt.mem_get_info()
    except CudaError:
        total = int(import_tvm().cuda(index).total_global_memory or 0)
        return total, total


def host_memory_info() -> tuple[int, int]:
    """(available, total) bytes of host memory from /proc/meminfo (sysconf elsewhere)."""
    try:
        fields = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                fields[key] = int(value.split()[0]) * 1024
        return fields.get("MemAvailable", fields["MemFree"]), fields["MemTotal"]
    except (OSError, KeyError, ValueError):
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return pages * size, pages * size


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"CPU: {line.split(':', 1)[1].strip()} ({os.cpu_count()} threads)"
    except OSError:
        pass
    return f"CPU ({os.cpu_count()} threads)"


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
