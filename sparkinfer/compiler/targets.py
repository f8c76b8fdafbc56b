"""Targets per arch, and ahead-of-time CUDA fatbins embedded in built modules.

How TVM 0.27 turns CUDA source into a binary (src/target/cuda/codegen_cuda.cc, BuildCUDA, and
src/runtime/cuda/cuda_module.cc):
  1. codegen writes CUDA C++ and hands it to `CUDAModuleCreateWithFallback(src, fmt="cuda")`;
  2. if the global `ffi.Module.create.cuda` exists (registered when libtvm_runtime_cuda.so is
     loaded), it calls the global `tvm_callback_cuda_compile(src) -> bytes` *at build time*
     and keeps the returned bytes as the module's code, format "ptx" if they start with '/'
     else "cubin" (cuModuleLoadData takes a fatbin under that name just as well);
  3. otherwise (no libcuda.so.1, so TVM's autoload skipped libtvm_runtime_cuda.so: every CPU
     machine) a fallback module keeps the *source* with format "cuda", and the same callback
     compiles it when the library is loaded on the GPU - JIT, and in runtime-only TVM the
     default callback does not even work.
`build` takes path 2 on every machine: it makes sure `ffi.Module.create.cuda` is registered
(loading libtvm_runtime_cuda.so, against a stub libcuda.so.1 where the machine has no driver)
and, for the duration of the build only, replaces `tvm_callback_cuda_compile` by nvcc for the
requested arch. The exported library then carries the fatbin and no CUDA source.
TVM_COMPILE_FORCE_FALLBACK=1 forces path 3 (`cuda_source` uses it for codegen only).
"""

import contextlib
import ctypes
import functools
import os
import shutil
import struct
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import tvm
import tvm_ffi

from sparkinfer.schedule.arch import ARCHS, arch_facts, cuda_target_attrs

# DGX Spark (GB10, sm_121) has Arm cores: its host code must be aarch64. Export such a
# module as .tar (objects; no cross linker needed here) and link it on the Spark.
_HOSTS = {
    "sm_90": {"kind": "llvm", "mtriple": "x86_64-linux-gnu"},
    "sm_120": {"kind": "llvm", "mtriple": "x86_64-linux-gnu"},
    "sm_121": {"kind": "llvm", "mtriple": "aarch64-linux-gnu"},
}


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; SparkInfer targets {', '.join(ARCHS)}")


def cuda_arch(arch: str) -> str:
    """The arch-specific variant, "sm_90" -> "sm_90a" (schedule/arch.py's table)."""
    _check_arch(arch)
    if arch == "cpu":
        raise ValueError("arch 'cpu' has no CUDA arch")
    return arch_facts(arch).cuda_arch


def target_for(arch: str) -> tvm.target.Target:
    """The TVM target for one of ARCHS ("cpu": LLVM tuned for this machine's CPU)."""
    _check_arch(arch)
    if arch == "cpu":
        return tvm.target.Target(
            {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()}
        )
    return tvm.target.Target(cuda_target_attrs(arch_facts(arch)), host=_HOSTS[arch])


def find_nvcc() -> str | None:
    """nvcc from $CUDA_HOME/bin, /usr/local/cuda/bin or PATH, or None."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for root in filter(None, roots):
        candidate = Path(root) / "bin" / "nvcc"
        if candidate.is_file():
            return str(candidate)
    return shutil.which("nvcc")


def nvcc_fatbin(cuda_source: str, arch: str, nvcc: str | None = None) -> bytes:
    """Compile TVM-generated CUDA source to a fatbin holding SASS for `arch` only.

    No PTX rides along: "a" archs are not forward compatible anyway, and a PTX fallback
    would only turn a missing build into a silent JIT at load time.
    """
    sm = cuda_arch(arch)
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    compute = sm.replace("sm_", "compute_")
    with tempfile.TemporaryDirectory(prefix="sparkinfer-nvcc-") as tmp:
        src, out = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
        src.write_text(cuda_source)
        cmd = [
            nvcc, "-fatbin", "-O3", f"-gencode=arch={compute},code={sm}",
            # TVM's generated code uses half/bf16 operators that cuda_fp16.h hides by default.
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
            "--expt-relaxed-constexpr",
            # TVM's helper header defines functions and variables most kernels never use.
            "-diag-suppress=177",
            "-o", str(out), str(src),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed for {sm}:\n{proc.stdout}{proc.stderr}")
        return out.read_bytes()


# The driver API functions libtvm_runtime_cuda.so (TVM 0.27) links against. On a machine
# without a driver the stub returns CUDA_ERROR_STUB_LIBRARY from each, so a stray launch
# fails with a CUDA error instead of killing the process with an unresolved symbol.
_DRIVER_SYMBOLS = (
    "cuDeviceGetName", "cuFuncSetAttribute", "cuGetErrorName", "cuGetErrorString",
    "cuLaunchKernelEx", "cuModuleGetFunction", "cuModuleLoadData", "cuModuleUnload",
    "cuTensorMapEncodeTiled",
)
_CUDA_ERROR_STUB_LIBRARY = 34


def _load_stub_libcuda() -> None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler to build the libcuda stub (needed without a driver)")
    # The loaded library stays mapped after its file is gone.
    with tempfile.TemporaryDirectory(prefix="sparkinfer-libcuda-stub-") as tmp:
        src, lib = Path(tmp) / "stub.c", Path(tmp) / "libcuda.so.1"
        src.write_text("".join(f"int {s}(void) {{ return {_CUDA_ERROR_STUB_LIBRARY}; }}\n"
                               for s in _DRIVER_SYMBOLS))
        subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(lib),
                        str(src)], check=True, capture_output=True)
        ctypes.CDLL(str(lib), mode=os.RTLD_GLOBAL)


_FACTORY = "ffi.Module.create.cuda"
_COMPILE_CALLBACK = "tvm_callback_cuda_compile"


@functools.cache
def _cuda_module_factory() -> tvm_ffi.Function:
    """TVM's CUDA module factory, loading libtvm_runtime_cuda.so where autoload did not.

    A factory that this function had to load is unregistered again at once: registered, it
    makes every later CUDA tvm.compile in the process JIT-compile through TVM's default
    callback (NVRTC) instead of keeping the source. `aot_fatbin` lends it out per build.
    """
    factory = tvm_ffi.get_global_func(_FACTORY, allow_missing=True)
    if factory is not None:
        return factory
    try:
        ctypes.CDLL("libcuda.so.1", mode=os.RTLD_GLOBAL)
    except OSError:
        _load_stub_libcuda()
    runtime_cuda = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
    ctypes.CDLL(str(runtime_cuda), mode=os.RTLD_GLOBAL)
    factory = tvm_ffi.get_global_func(_FACTORY, allow_missing=True)
    if factory is None:
        raise RuntimeError(f"{runtime_cuda} did not register {_FACTORY}")
    tvm_ffi.remove_global_func(_FACTORY)
    return factory


@contextlib.contextmanager
def _global_funcs(funcs: dict[str, Callable[..., object]]) -> Iterator[None]:
    """Register `funcs` as TVM globals for the block, then put back what was there."""
    previous = {name: tvm_ffi.get_global_func(name, allow_missing=True) for name in funcs}
    for name, func in funcs.items():
        tvm_ffi.register_global_func(name, func, override=True)
    try:
        yield
    finally:
        for name, func in previous.items():
            if func is None:
                tvm_ffi.remove_global_func(name)
            else:
                tvm_ffi.register_global_func(name, func, override=True)


@contextlib.contextmanager
def aot_fatbin(arch: str, nvcc: str | None = None) -> Iterator[None]:
    """Within this block, CUDA builds embed an nvcc fatbin for `arch` instead of source.

    Not thread-safe: both globals are process-wide.
    """
    cuda_arch(arch)

    def compile_fatbin(source: str) -> bytes:
        return nvcc_fatbin(source, arch, nvcc)

    with _global_funcs({_FACTORY: _cuda_module_factory(), _COMPILE_CALLBACK: compile_fatbin}):
        yield


def build(mod: tvm.IRModule, arch: str, tir_pipeline: str = "default") -> tvm.runtime.Executable:
    """tvm.compile for one of ARCHS; CUDA kernels come out as an embedded sm_XXa fatbin.
    `tir_pipeline`: a registered TIR pipeline's name (dependent_launch.TIR_PIPELINE)."""
    target = target_for(arch)
    if arch == "cpu":
        return tvm.compile(mod, target=target, tir_pipeline=tir_pipeline)
    with aot_fatbin(arch):
        return tvm.compile(mod, target=target, tir_pipeline=tir_pipeline)


@contextlib.contextmanager
def source_only() -> Iterator[None]:
    """Within this block CUDA builds keep their CUDA source and compile nothing, on any
    machine: TVM_COMPILE_FORCE_FALLBACK (on a GPU machine, where TVM's autoload registered the
    CUDA module factory, a plain build would JIT-compile through TVM's default callback, NVRTC,
    which needs cuda-bindings). Not thread-safe: the variable is process-wide."""
    key, previous = "TVM_COMPILE_FORCE_FALLBACK", os.environ.get("TVM_COMPILE_FORCE_FALLBACK")
    os.environ[key] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[key]
        else:
            os.environ[key] = previous


def cuda_source(mod: tvm.IRModule, arch: str, tir_pipeline: str = "default") -> str:
    """The CUDA C++ TVM generates for `mod`, compiling nothing (`source_only`)."""
    with source_only():
        lib = tvm.compile(mod, target=target_for(arch), tir_pipeline=tir_pipeline)
    return str(lib.mod.imports[0].inspect_source("cuda"))


def shared_memory_bytes(mod: tvm.IRModule, arch: str) -> dict[str, tuple[int, int]]:
    """Per CUDA kernel of `mod` (scheduled TIR): its static and dynamic shared-memory bytes as
    TVM's lowering lays them out (the dynamic tiles merged into one buffer), compiling nothing."""
    from tvm.s_tir.analysis import calculate_allocated_bytes

    target = target_for(arch)
    pipeline = tvm.tirx.get_default_tir_pipeline(target)[0]
    with target:
        lowered = pipeline(tvm.IRModule({gv: f.with_attr("target", target) for gv, f in mod.functions.items()}))
    sizes = {}
    for gv, func in lowered.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc) and func.attrs["target"].kind.name == "cuda":
            scopes = calculate_allocated_bytes(func)["main"]
            sizes[gv.name_hint] = (int(scopes.get("shared", 0)), int(scopes.get("shared.dyn", 0)))
    return sizes


def check_shared_memory(mod: tvm.IRModule, arch: str) -> None:
    """Raise a SparkInferError naming every kernel of `mod` that could not launch on `arch`:
    more than 48 KiB of shared memory in all while its dynamic part stays under 48 KiB (TVM's
    CUDA runtime opts a launch in only for a dynamic part of 48 KiB or more: the launch fails
    with CUDA_ERROR_INVALID_VALUE), or more than the arch's opt-in limit. The CUDA emulator does
    not model these limits; session 9 met both on a GPU (bench/NOTES.md)."""
    from sparkinfer.errors import SparkInferError

    facts = arch_facts(arch)
    plain, most = facts.shared_memory_per_block, facts.shared_memory_optin_per_block
    bad = [f"{name}: {static} B static + {dynamic} B dynamic"
           for name, (static, dynamic) in sorted(shared_memory_bytes(mod, arch).items())
           if (static + dynamic > plain and dynamic < plain) or static + dynamic > most]
    if bad:
        raise SparkInferError(f"kernels that cannot launch on {arch} (more than {plain} B of shared memory needs "
                              f"{plain} B or more of it dynamic, and at most {most} B in all): " + "; ".join(bad))


@dataclass(frozen=True)
class FatbinEntry:
    """One image in a fatbin: "cubin" (SASS) or "ptx", for `arch` such as "sm_90a"."""

    kind: str
    arch: str


_FATBIN_MAGIC = 0xBA55ED50
_ENTRY_KINDS = {1: "ptx", 2: "cubin"}
# Entry flag bits, as nvcc 13.0 writes them (compared across sm_90/90a/100a/100f/120/120a).
_ARCH_SPECIFIC = 1 << 20
_ARCH_FAMILY = 1 << 21


def fatbin_entries(fatbin: bytes) -> list[FatbinEntry]:
    """The images in a fatbin container (header: magic, version, header size, body size;
    each entry: kind, version, header size, payload size, ..., SM number at byte 28)."""
    magic, _, header_size, body_size = struct.unpack_from("<IHHQ", fatbin, 0)
    if magic != _FATBIN_MAGIC:
        raise ValueError("not a fatbin")
    entries, offset, end = [], header_size, header_size + body_size
    while offset < end:
        kind, _, entry_header, payload = struct.unpack_from("<HHIQ", fatbin, offset)
        sm, = struct.unpack_from("<I", fatbin, offset + 28)
        flags, = struct.unpack_from("<I", fatbin, offset + 40)
        suffix = "a" if flags & _ARCH_SPECIFIC else "f" if flags & _ARCH_FAMILY else ""
        entries.append(FatbinEntry(_ENTRY_KINDS.get(kind, f"kind{kind}"), f"sm_{sm}{suffix}"))
        offset += entry_header + payload
    return entries


def _scan_fatbins(data: bytes) -> list[bytes]:
    magic = struct.pack("<I", _FATBIN_MAGIC)
    found, start = [], data.find(magic)
    while start >= 0:
        _, _, header_size, body_size = struct.unpack_from("<IHHQ", data, start)
        found.append(data[start : start + header_size + body_size])
        start = data.find(magic, start + header_size + body_size)
    return found


def embedded_fatbins(library: str | Path) -> list[bytes]:
    """Every fatbin container inside an exported library: a shared object, or the .tar of
    objects (gzip-compressed by TVM despite the name) that `export_library("x.tar")` writes."""
    if tarfile.is_tarfile(library):
        with tarfile.open(library, "r:*") as tar:
            members = [tar.extractfile(m) for m in tar.getmembers() if m.isfile()]
            return [fb for f in members if f is not None for fb in _scan_fatbins(f.read())]
    return _scan_fatbins(Path(library).read_bytes())
