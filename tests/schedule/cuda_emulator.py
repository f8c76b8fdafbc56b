"""The CUDA TVM generates for a module, run on the CPU: the GPU tests' `gpu` fixture runs each
test twice, on the GPU ("cuda", marked gpu) and here ("emulated", everywhere TVM can compile),
so CI checks every CUDA schedule's indices, guards, shared-memory tiles, shuffles, WMMA
fragments and the inline PTX of ldmatrix and mma.sync (`_inline_ptx`) against numpy without a
GPU.

`EmulatedGpu(mod)` has `Gpu`'s interface (cuda_testutil: `tensor`, `poisoned`, calls by symbol).
It lowers `mod` for sm_90 as `targets.build` does, reads from the device functions each kernel's
launch extents and parameters and from the host function the order of its launches and the
workspaces it allocates for them (NaN-filled arrays here), and compiles a symbol's kernels with
g++ against cuda_emulator.h on its first call (one CUDA thread a fiber: see the header for what
this does and does not check). Tens of thousands of times
slower than a GPU: tests give it the shapes a GPU test uses only where those are small.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tvm

from sparkinfer.compiler import targets

_HEADER = Path(__file__).with_name("cuda_emulator.h")
_ARCH = "sm_90"
# Stand-ins for the CUDA headers the generated source includes, on the include path.
_SHIMS = ("cuda.h", "cuda_fp16.h", "mma.h", "math_constants.h")
_DIMS = ("x", "y", "z")


class EmulationError(RuntimeError):
    """A kernel the emulator could not build or run (a deadlock, a construct it lacks)."""


@dataclass(frozen=True)
class Launch:
    """One kernel launch of a PrimFunc: the kernel's name, its parameters as the CUDA
    signature has them (C type, name), and its grid and block extents (PrimExprs over the
    kernel's scalar parameters)."""

    kernel: str
    params: tuple[tuple[str, str], ...]
    extents: dict[str, Any]


class EmulatedTensor:
    """A host array standing in for a device tensor (`.numpy()` copies it out, as TVM's)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = np.array(array, order="C", copy=True)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    def numpy(self) -> np.ndarray:
        return self.array.copy()


class EmulatedGpu:
    """`Gpu` on the CPU: the kernels of `mod`, compiled here as C++ and run one fiber a thread.
    After a call, `l2_prefetches` holds the (address, bytes) of each bulk L2 prefetch its kernels
    issued, which a GPU gives no trace of."""

    def __init__(self, mod: tvm.IRModule, tir_pipeline: str = "default") -> None:
        host, device, source = _lower(mod, tir_pipeline)
        self._funcs = {str(gv.name_hint): f for gv, f in mod.functions.items()}
        kernels = {str(gv.name_hint): f for gv, f in device.functions.items()}
        self._source = source
        self._launches = {str(gv.name_hint): _launches(f, kernels, source) for gv, f in host.functions.items()}
        self._workspaces = {str(gv.name_hint): _workspaces(f) for gv, f in host.functions.items()}
        self._libraries: dict[str, ctypes.CDLL] = {}
        self.l2_prefetches: list[tuple[int, int]] = []
        self._build_dir = tempfile.TemporaryDirectory(prefix="cuda-emulator-")

    def tensor(self, array: np.ndarray) -> EmulatedTensor:
        return EmulatedTensor(array)

    def poisoned(self, shape: tuple[int, ...]) -> EmulatedTensor:
        """A float32 output filled with NaN, so an element the kernel never writes fails."""
        return EmulatedTensor(np.full(shape, np.nan, np.float32))

    def __call__(self, symbol: str, *args: EmulatedTensor | int) -> None:
        func = self._funcs[symbol]
        values = _bind_arguments(func, args)
        for name, (shape, dtype) in self._workspaces[symbol].items():  # NaN where floats: read before written fails
            values[name] = np.full(shape, np.nan if np.dtype(dtype).kind == "f" else 0, dtype)
        library = self._library(symbol)
        self._prefetch_log(library)  # what a call of it that raised left
        for launch in self._launches[symbol]:
            extents = [_evaluate(launch.extents.get(f"{kind}.{d}", 1), values)
                       for kind in ("blockIdx", "threadIdx") for d in _DIMS]
            words = (ctypes.c_uint64 * max(1, len(launch.params)))(
                *(_word(values, name, ctype) for ctype, name in launch.params))
            dims = (ctypes.c_uint32 * 6)(*extents)
            entry = getattr(library, f"emulate_{launch.kernel}")
            entry.restype = ctypes.c_char_p
            error = entry(words, dims)
            if error:
                raise EmulationError(f"{launch.kernel}: {error.decode()}")
        self.l2_prefetches = self._prefetch_log(library)

    @staticmethod
    def _prefetch_log(library: ctypes.CDLL) -> list[tuple[int, int]]:
        """The bulk L2 prefetches `library`'s kernels issued since it was last asked: (address,
        bytes) each, in the order issued."""
        count = library.emulated_l2_prefetch_count
        count.restype = ctypes.c_size_t
        n = int(count())
        words = (ctypes.c_uint64 * max(1, 2 * n))()
        library.emulated_l2_prefetches(words)
        return [(int(words[2 * i]), int(words[2 * i + 1])) for i in range(n)]

    def _library(self, symbol: str) -> ctypes.CDLL:
        if symbol not in self._libraries:
            self._libraries[symbol] = _compile(self._source, self._launches[symbol],
                                               Path(self._build_dir.name), symbol)
        return self._libraries[symbol]


def _lower(mod: tvm.IRModule, tir_pipeline: str) -> tuple[tvm.IRModule, tvm.IRModule, str]:
    """The host module, the device module and its CUDA source, as `targets.build` makes them
    with the TIR pipeline named `tir_pipeline`."""
    build = importlib.import_module("tvm.tirx.build")  # tvm.tirx.build is also a function
    target = targets.target_for(_ARCH)
    pipeline, _, finalize_device = tvm.tirx.get_tir_pipeline(tir_pipeline)
    host, devices = build.split_host_device_mods(pipeline(tvm.tirx.transform.BindTarget(target)(mod)))
    (device,) = devices.values()
    with targets.source_only():
        source = build.codegen_build(finalize_device()(device), target).inspect_source("cuda")
    return host, device, str(source)


def _statements(stmt: Any) -> Any:
    """Every statement under `stmt`, in program order."""
    yield stmt
    if isinstance(stmt, tvm.tirx.SeqStmt):
        for child in stmt.seq:
            yield from _statements(child)
    for field in ("body", "then_case", "else_case"):
        child = getattr(stmt, field, None)
        if isinstance(child, tvm.tirx.Stmt):
            yield from _statements(child)


def _launches(host_func: tvm.tirx.PrimFunc, kernels: dict[str, tvm.tirx.PrimFunc], source: str) -> list[Launch]:
    """The kernels `host_func` launches, in order."""
    launches = []
    for stmt in _statements(host_func.body):
        call = stmt.value if isinstance(stmt, tvm.tirx.Evaluate) else None
        if not isinstance(call, tvm.ir.Call) or not call.args:
            continue
        name = call.args[0]
        if isinstance(name, tvm.ir.StringImm) and name.value in kernels:
            kernel = kernels[name.value]
            extents = {s.node.thread_tag: s.value for s in _statements(kernel.body)
                       if isinstance(s, tvm.tirx.AttrStmt) and s.attr_key == "thread_extent"}
            launches.append(Launch(name.value, _signature(source, name.value), extents))
    return launches


def _workspaces(host_func: tvm.tirx.PrimFunc) -> dict[str, tuple[tuple[int, ...], str]]:
    """The global buffers `host_func` allocates for its kernels (TVM's workspaces, e.g. a
    split-K GEMM's partial sums), by the kernels' name for their data: (shape, dtype)."""
    return {_c_name(str(s.buffer.name)) + "_ptr": (tuple(int(d) for d in s.buffer.shape), str(s.buffer.dtype))
            for s in _statements(host_func.body)
            if isinstance(s, tvm.tirx.AllocBuffer) and s.buffer.scope() == "global"}


def _signature(source: str, kernel: str) -> tuple[tuple[str, str], ...]:
    """(C type, name) of each parameter of `kernel`'s definition in `source`."""
    match = re.search(rf"\b{kernel}\(([^)]*)\)\s*\{{", source)
    if match is None:
        raise EmulationError(f"no definition of {kernel} in the generated source")
    params = []
    for param in filter(None, (p.strip() for p in match.group(1).split(","))):
        ctype, name = param.replace("__restrict__", "").rsplit(maxsplit=1)
        params.append((" ".join(ctype.split()), name))
    return tuple(params)


def _bind_arguments(func: tvm.tirx.PrimFunc, args: tuple[EmulatedTensor | int, ...]) -> dict[str, Any]:
    """Kernel parameter name -> array (a buffer's data) or int (a shape variable or scalar)."""
    if len(args) != len(func.params):
        raise EmulationError(f"{len(args)} arguments for {len(func.params)} parameters")
    values: dict[str, Any] = {}
    for param, arg in zip(func.params, args):
        if not isinstance(param.ty, tvm.tirx.BufferType):  # a scalar
            values[param.name] = int(arg)  # type: ignore[arg-type]
            continue
        if not isinstance(arg, EmulatedTensor):
            raise EmulationError(f"parameter {param.name} takes a tensor, got {type(arg).__name__}")
        values[_c_name(param.name) + "_ptr"] = arg.array  # the kernels' name for a buffer's data
        for dim, size in zip(param.shape, arg.shape):
            if isinstance(dim, tvm.tirx.Var):
                values[dim.name] = size
    return values


def _c_name(name: str) -> str:
    """A TIR name as the CUDA source spells it."""
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def _evaluate(extent: Any, values: dict[str, Any]) -> int:
    if isinstance(extent, int):
        return extent
    import tvm.sym  # here, not at import: the GPU machines' runtime-only TVM collects this file

    analyzer = tvm.sym.Analyzer()
    for var in tvm.tirx.analysis.undefined_vars(extent):
        analyzer.bind(var, tvm.tirx.const(values[var.name], var.ty.dtype))
    value = analyzer.simplify(extent)
    if not isinstance(value, tvm.tirx.IntImm):
        raise EmulationError(f"launch extent {extent} does not evaluate to an integer")
    return int(value.value)


def _word(values: dict[str, Any], name: str, ctype: str) -> int:
    if name not in values:
        raise EmulationError(f"kernel parameter {name} matches no argument ({', '.join(values)})")
    value = values[name]
    if ctype.endswith("*"):
        return value.ctypes.data
    return int(value) & 0xFFFF_FFFF_FFFF_FFFF


def _compile(source: str, launches: list[Launch], build_dir: Path, symbol: str) -> ctypes.CDLL:
    """A shared library of the preamble, `launches`' kernels and an entry per kernel,
    `emulate_<kernel>(uint64 args[], uint32 dims[6]) -> error or NULL`."""
    build_dir.mkdir(parents=True, exist_ok=True)
    for shim in _SHIMS:
        (build_dir / shim).write_text(f'#include "{_HEADER}"\n')
    preamble = _without_grid_dependency_control(source[: source.index('extern "C"')])
    kernels = {launch.kernel: launch for launch in launches}  # a kernel launched twice is built once
    bodies = [_device_code(kernel_definition(source, name)) for name in kernels]
    code = "\n".join([preamble, *bodies, *map(_entry, kernels.values()), _PREFETCH_LOG])
    cpp, lib = build_dir / f"{symbol}.cpp", build_dir / f"{symbol}.so"
    cpp.write_text(code)
    command = ["g++", "-std=c++20", "-O2", "-fPIC", "-shared", "-fno-strict-aliasing", "-U_FORTIFY_SOURCE", "-w",
               f"-I{build_dir}", "-o", str(lib), str(cpp)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
    if result.returncode != 0:
        raise EmulationError(f"g++ could not build {symbol}'s kernels ({cpp}):\n{result.stderr[-4000:]}")
    return ctypes.CDLL(str(lib))


# The bulk L2 prefetches recorded since the last call (cuda_emulator.h, emu::l2_prefetch): how
# many, and all of them as (address, bytes) pairs into `out`, forgetting them.
_PREFETCH_LOG = """extern "C" size_t emulated_l2_prefetch_count() { return emu::l2_prefetches.size(); }
extern "C" void emulated_l2_prefetches(uint64_t* out) {
  for (size_t i = 0; i < emu::l2_prefetches.size(); ++i) {
    out[2 * i] = reinterpret_cast<uintptr_t>(emu::l2_prefetches[i].first);
    out[2 * i + 1] = emu::l2_prefetches[i].second;
  }
  emu::l2_prefetches.clear();
}
"""


def _without_grid_dependency_control(preamble: str) -> str:
    """The preamble with TVM's `griddepcontrol` helpers emptied (programmatic dependent launch,
    compiler/dependent_launch.py): the emulator runs launches one after another, so every
    kernel before this one has completed (what `wait` waits for) and none overlaps another
    (what `launch_dependents` would allow); and the bulk L2 prefetch's, a cache hint, recorded
    instead (`EmulatedGpu.l2_prefetches`)."""
    preamble = re.sub(r'asm volatile\("cp\.async\.bulk\.prefetch\.L2\.global [^"]*"[^;]*;',
                      "emu::l2_prefetch(__src_mem, __size);", preamble)
    return re.sub(r'asm volatile\("griddepcontrol\.\w+;"[^;]*;', "", preamble)


def kernel_definition(source: str, kernel: str) -> str:
    """The definition of the CUDA function `kernel` in `source`, from its `extern "C"` (the
    last mention: the first is a declaration)."""
    start = source.rindex(f" {kernel}(")
    start = source.rindex('extern "C"', 0, start)
    end = source.find('extern "C"', start + 1)
    return source[start : end if end >= 0 else None]


def _device_code(body: str) -> str:
    """Shared memory as function statics (one block runs at a time), the dynamic kind
    (`extern __shared__ T name[];`) as the emulator's one buffer; inline PTX as the emulator's
    calls (`_inline_ptx`)."""
    body = _inline_ptx(body)
    body = re.sub(r"extern __shared__ (?:__align__\(\d+\) )?(\w+) (\w+)\[\];",
                  r"\1* \2 = reinterpret_cast<\1*>(emu::dynamic_shared);", body)
    # C++ wants the alignment before `static`
    return re.sub(r"__shared__ ((?:alignas|__align__)\(\d+\)) ", r"\1 static ", body)


def _entry(launch: Launch) -> str:
    args = ", ".join(f"({ctype})(args[{i}])" if ctype.endswith("*") else f"({ctype})(int64_t)(args[{i}])"
                     for i, (ctype, _) in enumerate(launch.params))
    return (f'extern "C" const char* emulate_{launch.kernel}(const uint64_t* args, const unsigned* dims) {{\n'
            f"  static const uint64_t* a; a = args;\n"
            f"  return emu::run_grid(dim3{{dims[0], dims[1], dims[2]}}, dim3{{dims[3], dims[4], dims[5]}},\n"
            f"                       [] {{ const uint64_t* args = a; {launch.kernel}({args}); }});\n"
            f"}}\n")


def _inline_ptx(body: str) -> str:
    """`body` with each `__asm__ __volatile__(...)` statement that TVM prints for ldmatrix and
    mma.sync (tvm/backend/cuda codegen of T.ptx_legacy.ldmatrix / mma) replaced by the
    emulator's call (cuda_emulator.h, "inline PTX"), and the shared-memory addresses ldmatrix
    takes (`unsigned int addr = __cvta_generic_to_shared(p)`) kept as pointers. Any other
    inline PTX is an EmulationError naming it."""
    body = re.sub(r"unsigned int (\w+) = __cvta_generic_to_shared\(", r"const void* \1 = (const void*)(", body)
    out, start = [], 0
    for match in re.finditer(r"__asm__ __volatile__\(", body):
        if match.start() < start:
            continue
        end = _closing_paren(body, match.end() - 1)
        out.append(body[start : match.start()])
        out.append(_emulator_call(body[match.end() : end]))
        start = end + 1
    out.append(body[start:])
    return "".join(out)


def _closing_paren(text: str, open_at: int) -> int:
    """The index of the parenthesis closing the one at `open_at` (string literals skipped)."""
    depth, i = 0, open_at
    while i < len(text):
        char = text[i]
        if char == '"':
            i = text.index('"', i + 1)
            while text[i - 1] == "\\":
                i = text.index('"', i + 1)
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise EmulationError(f"unbalanced inline asm: {text[open_at : open_at + 200]}")


def _split_top(text: str, separator: str) -> list[str]:
    """`text` split at `separator` outside parentheses and string literals."""
    parts, depth, current, in_string = [], 0, [], False
    for char in text:
        if char == '"':
            in_string = not in_string
        elif not in_string and char in "([":
            depth += 1
        elif not in_string and char in ")]":
            depth -= 1
        if char == separator and depth == 0 and not in_string:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _operands(section: str) -> list[str]:
    """The C expressions of an asm operand list (`"=r"(x), "f"(y)` -> [x, y])."""
    operands = []
    for operand in filter(None, (o.strip() for o in _split_top(section, ","))):
        match = re.fullmatch(r'"[=+]?\w+"\s*\((.*)\)', operand, re.S)
        if match is None:
            raise EmulationError(f"an inline asm operand the emulator cannot read: {operand}")
        operands.append(match.group(1))
    return operands


def _emulator_call(statement: str) -> str:
    """The emulator's call for the inside of one `__asm__ __volatile__( ... )`."""
    template_part, *sections = _split_top(statement, ":")
    template = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', template_part))
    outputs, inputs = (_operands(sections[i]) if len(sections) > i else [] for i in (0, 1))
    ldmatrix = re.match(r"ldmatrix\.sync\.aligned\.m8n8\.x([124])(\.trans)?\.shared\.b16", template)
    if ldmatrix:
        count, transposed = int(ldmatrix.group(1)), ldmatrix.group(2) is not None
        regs = ", ".join(f"(uint32_t*)&({o})" for o in outputs)
        return (f"{{ uint32_t* const regs_[] = {{{regs}}}; "
                f"emu::ldmatrix({inputs[0]}, {str(transposed).lower()}, {count}, regs_); }}")
    if template.startswith("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"):
        a, b, c = inputs[:4], inputs[4:6], inputs[6:10]
        return ("{ "
                f"const uint32_t a_[] = {{{', '.join(a)}}}; const uint32_t b_[] = {{{', '.join(b)}}}; "
                f"const float c_[] = {{{', '.join(c)}}}; "
                f"float* const d_[] = {{{', '.join(f'&({o})' for o in outputs)}}}; "
                "emu::mma_m16n8k16_f32_f16(d_, a_, b_, c_); }")
    raise EmulationError(f"inline PTX the emulator does not have: {template or statement}")
