"""Programmatic dependent launch (sm_90+): every CUDA kernel of a build may start while the
kernel before it in the stream (or CUDA graph) drains.

What TVM 0.27 provides (read in the wheel: src/runtime/metadata.h, src/runtime/thread_storage_scope.h,
backend/cuda/ptx/table.py; bench/NOTES.md, "Programmatic dependent launch (session 7)"):
  - a device kernel whose `tirx.kernel_launch_params` hold the tag LAUNCH_TAG (TVM's spelling,
    "programtic") is launched by the CUDA runtime with cuLaunchKernelEx and the attribute
    CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION; the tag is a flag, it adds no launch
    argument. Nothing in TVM's lowering sets it: a PrimFunc's own `tirx.kernel_launch_params`
    are carried over to its kernel by SplitHostDevice, or a pass after it edits the kernel's;
  - `griddepcontrol.wait` / `griddepcontrol.launch_dependents` as the TIR calls
    `T.ptx.griddepcontrol.wait()` / `.launch_dependents()`, emitted as inline PTX.

The launch attribute alone is a race: the next kernel may start before this one's writes are
visible, unless it executes `griddepcontrol.wait` (returns once every kernel it depends on has
completed and flushed its memory) before touching them. So `MarkProgrammaticLaunch`, run after
TVM's whole lowering (TIR_PIPELINE), gives each CUDA kernel both halves at its entry:
  griddepcontrol.wait;                 before any global read or write: correct whatever the
                                       kernel reads, and transitive (the kernel before it waited
                                       on its own predecessor before doing anything)
  griddepcontrol.launch_dependents;    the next kernel may be scheduled as soon as every block
                                       of this one has started: its launch and block ramp-up
                                       overlap this kernel's tail instead of following it
Under CUDA stream capture (the driver's one graph per step, runtime/cuda_graph.py) such a
launch becomes a programmatic edge of the graph (CUDA >= 12.3 driver and toolkit).

With the step variant programmatic_launch "prefetch" (PREFETCH_PIPELINE) a kernel's blocks do
one thing before the wait: ask the L2 for the kernel's weights, which no kernel writes, so that
while the kernel before runs (its blocks have all started, or this one would not be running)
those bytes come from memory instead of after it. `mark_weight_prefetch` finds them in the
Relax step before lowering: the kernel's arguments to which every call passes one of the step's
weights (not its state, caches or sampling parameters), of at most a quarter of the arch's L2 (the norms,
the dense projections, the router; not the expert stacks, the LM head or the embedding, which a
step reads in part); each block, by its thread 0, issues one `cp.async.bulk.prefetch.L2` of its
share of each (the TMA unit fetches it in the background; nothing waits for it). Then it waits
and lets its own dependents launch, as above: one kernel ahead, never more. Only the decode
step's kernels are marked so; a kernel only the T-token steps call keeps its plain launch (with
every kernel marked, the prefill's time to first token grew ~7 % on an H100: bench/NOTES.md,
"Session 22").

With "weights" (WEIGHTS_PIPELINE) only the kernels with weights of WEIGHT_BYTES or more to
prefetch are launched programmatically (the dense projections and the router on the full-size
model), as "prefetch" launches them; every other kernel keeps its plain launch and no wait, and
only lets its dependents launch at its entry (a no-op where the next launch is a plain one).
A programmatic edge costs a little in itself (bench/NOTES.md, "Session 22": "on" -2.5 % on an
H100, ~0.1 µs an edge), which a kernel with nothing to prefetch gets nothing back for.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import tvm
from tvm import tirx

from sparkinfer.compiler.l2_prefetch import PREFETCH_ALIGN, Axes, block_index, buffer_bytes, bulk_prefetch, by_thread_zero

LAUNCH_TAG = "tirx.use_programtic_dependent_launch"
# TVM's CUDA runtime requires this tag, when present, to be the last of a kernel's launch params.
_DYNAMIC_SHARED_TAG = "tirx.use_dyn_shared_memory"
_LAUNCH_PARAMS = "tirx.kernel_launch_params"
# The TIR pipeline `tvm.compile(..., tir_pipeline=TIR_PIPELINE)` builds with: TVM's default
# lowering, then MarkProgrammaticLaunch; PREFETCH_PIPELINE's and WEIGHTS_PIPELINE's marks also
# prefetch weights.
TIR_PIPELINE = "sparkinfer_programmatic_launch"
PREFETCH_PIPELINE = "sparkinfer_programmatic_launch_prefetch"
WEIGHTS_PIPELINE = "sparkinfer_programmatic_launch_weights"
# The least weight bytes for which WEIGHTS_PIPELINE launches a kernel programmatically: ~0.08 µs
# of an H100's 3.35 TB/s, about what a programmatic edge was measured to cost.
WEIGHT_BYTES = 256 << 10
# A kernel's (PrimFunc's) attribute set by `mark_weight_prefetch`: the names of its buffers to
# prefetch, which its lowered CUDA kernel declares under the same names.
PREFETCH_ATTR = "sparkinfer.l2_prefetch"


def _is_cuda_kernel(func: tvm.ir.BaseFunc) -> bool:
    if not isinstance(func, tirx.PrimFunc) or func.attrs is None or _LAUNCH_PARAMS not in func.attrs:
        return False
    target = func.attrs.get("target")
    return target is not None and target.kind.name == "cuda"


def mark_kernel(kernel: tirx.PrimFunc, prefetch: Sequence[str] = ()) -> tirx.PrimFunc:
    """One lowered CUDA kernel launched programmatically: LAUNCH_TAG among its launch params,
    `griddepcontrol.wait` then `griddepcontrol.launch_dependents` at its entry; with `prefetch`
    (names of buffers it declares) the bulk L2 prefetch of those first, once its thread and
    block indices are bound (`_with_entry`)."""
    from tvm.script import tirx as T  # the compiler's: runtime-only TVM has no TVMScript

    params = [str(p) for p in kernel.attrs[_LAUNCH_PARAMS]]
    if LAUNCH_TAG in params:
        return kernel
    last = [p for p in params if p == _DYNAMIC_SHARED_TAG]
    params = [p for p in params if p != _DYNAMIC_SHARED_TAG] + [LAUNCH_TAG] + last
    entry = [tirx.Evaluate(T.ptx.griddepcontrol.wait()), tirx.Evaluate(T.ptx.griddepcontrol.launch_dependents())]
    if not prefetch:
        return kernel.with_body(tirx.SeqStmt([*entry, kernel.body])).with_attr(_LAUNCH_PARAMS, params)
    buffers = {b.name: b for b in _declared_buffers(kernel.body) if b.name in prefetch}
    body = _with_entry(kernel.body, lambda axes: [*_prefetch_shares(list(buffers.values()), axes), *entry], {})
    return kernel.with_body(body).with_attr(_LAUNCH_PARAMS, params)


def _declared_buffers(stmt: tirx.Stmt) -> list[tirx.Buffer]:
    """The global buffers a lowered kernel declares ahead of its first thread binding."""
    stmts = list(stmt.seq) if isinstance(stmt, tirx.SeqStmt) else [stmt]
    return [s.buffer for s in stmts if isinstance(s, tirx.DeclBuffer)]


def _with_entry(stmt: tirx.Stmt, entry: Callable[[Axes], list[tirx.Stmt]], axes: Axes) -> tirx.Stmt:
    """`stmt` with entry(axes) put in front of its first statement that is neither a buffer
    declaration or allocation nor a thread binding, below the thread bindings ahead of it
    (axes: "blockIdx.x" etc. -> (var, extent), what the entry may index by). Nothing ahead of
    that point touches global memory, so a wait there is still before every global access."""
    if isinstance(stmt, tirx.SeqStmt):
        seq = list(stmt.seq)
        lead = 0
        while lead < len(seq) and isinstance(seq[lead], (tirx.DeclBuffer, tirx.AllocBuffer)):
            lead += 1
        if lead == len(seq):  # nothing but declarations: the entry still goes in
            return tirx.SeqStmt([*seq, *entry(axes)])
        return tirx.SeqStmt([*seq[:lead], _with_entry(seq[lead], entry, axes), *seq[lead + 1:]])
    if isinstance(stmt, tirx.AttrStmt) and stmt.attr_key == "thread_extent" and isinstance(stmt.value, tirx.IntImm):
        bound = {**axes, str(stmt.node.thread_tag): (stmt.node.var, int(stmt.value))}
        return tirx.AttrStmt(stmt.node, stmt.attr_key, stmt.value, _with_entry(stmt.body, entry, bound))
    return tirx.SeqStmt([*entry(axes), stmt])


def _prefetch_shares(buffers: list[tirx.Buffer], axes: Axes) -> list[tirx.Stmt]:
    """Block b's share of each buffer (the b-th of the grid's equal 16-byte-aligned slices), by
    its thread 0 (of the thread indices bound so far), as one bulk L2 prefetch each (TVM's
    device allocations, every step parameter's among them, are aligned far beyond 16 bytes)."""
    block, n_blocks = block_index(axes)
    stmts = []
    for buf in buffers:
        total = buffer_bytes(buf) // PREFETCH_ALIGN * PREFETCH_ALIGN
        share = -(-total // n_blocks // PREFETCH_ALIGN) * PREFETCH_ALIGN if total else 0
        if share == 0:
            continue
        offset = block * share
        size = tirx.min(tirx.const(share, "int64"), tirx.const(total, "int64") - offset)
        stmts.append(tirx.IfThenElse(offset < total, bulk_prefetch(buf, offset, size), None))
    return by_thread_zero(stmts, axes)


def trigger_dependents(kernel: tirx.PrimFunc) -> tirx.PrimFunc:
    """A plain-launched kernel that lets a programmatic launch after it start at its entry."""
    from tvm.script import tirx as T

    return kernel.with_body(tirx.SeqStmt([tirx.Evaluate(T.ptx.griddepcontrol.launch_dependents()), kernel.body]))


def _prefetch_names(mod: tvm.IRModule) -> Callable[[tvm.ir.GlobalVar], list[str] | None]:
    """A kernel's prefetch: the PREFETCH_ATTR of the host function whose kernel it is
    (SplitHostDevice names a kernel after it, "<name>_kernel...", and keeps the attribute on the
    host side only); None for a kernel without it (one the decode step does not call)."""
    wanted = {gvar.name_hint: [str(n) for n in f.attrs[PREFETCH_ATTR]] for gvar, f in mod.functions.items()
              if isinstance(f, tirx.PrimFunc) and f.attrs is not None and PREFETCH_ATTR in f.attrs}
    return lambda kernel: next((n for host, n in wanted.items() if kernel.name_hint.startswith(f"{host}_kernel")),
                               None)


# How one value marks a lowered CUDA kernel, given its prefetch (`_prefetch_names`).
_KernelMark = Callable[[list[str] | None, tirx.PrimFunc], tirx.PrimFunc]


def _mark_every_kernel(_prefetch: list[str] | None, kernel: tirx.PrimFunc) -> tirx.PrimFunc:
    return mark_kernel(kernel)


def _mark_decode_kernels(prefetch: list[str] | None, kernel: tirx.PrimFunc) -> tirx.PrimFunc:
    """`mark_kernel` with its prefetch, on the decode step's kernels."""
    return kernel if prefetch is None else mark_kernel(kernel, prefetch)


def _mark_decode_kernels_with_weights(prefetch: list[str] | None, kernel: tirx.PrimFunc) -> tirx.PrimFunc:
    """Of the decode step's kernels, `mark_kernel` on those with a prefetch, `trigger_dependents`
    on the rest."""
    if prefetch is None:
        return kernel
    return mark_kernel(kernel, prefetch) if prefetch else trigger_dependents(kernel)


@dataclass(frozen=True)
class _Marking:
    """What a programmatic_launch value other than "off" does."""

    pipeline: str  # its TIR pipeline's name
    mark: _KernelMark
    # the least bytes of a weight `mark_weight_prefetch` marks for the prefetch (None: none)
    least_weight_bytes: int | None


_MARKINGS = {"on": _Marking(TIR_PIPELINE, _mark_every_kernel, None),
             "prefetch": _Marking(PREFETCH_PIPELINE, _mark_decode_kernels, 0),
             "weights": _Marking(WEIGHTS_PIPELINE, _mark_decode_kernels_with_weights, WEIGHT_BYTES)}


def tir_pipeline_name(programmatic_launch: str) -> str:
    """The TIR pipeline of a programmatic_launch value other than "off"."""
    return _MARKINGS[programmatic_launch].pipeline


def mark_programmatic_launch(programmatic_launch: str = "on") -> tvm.transform.Pass:
    """The pass MarkProgrammaticLaunch on a module lowered past SplitHostDevice: `mark_kernel` on
    every CUDA kernel ("on"; "prefetch": on the decode step's, with the prefetch its PREFETCH_ATTR
    names; "weights": on those with a prefetch only, the decode step's others
    `trigger_dependents`)."""
    mark = _MARKINGS[programmatic_launch].mark

    def marked(mod: tvm.IRModule, _ctx: object) -> tvm.IRModule:
        names = _prefetch_names(mod)
        functions = {gvar: mark(names(gvar), func) if _is_cuda_kernel(func) else func
                     for gvar, func in mod.functions.items()}
        return tvm.IRModule(functions, attrs=mod.attrs, global_infos=mod.global_infos)

    return tvm.transform.module_pass(marked, opt_level=0, name="MarkProgrammaticLaunch")


def mark_step_weights(mod: tvm.IRModule, programmatic_launch: str, entries: Collection[str], l2_bytes: int) -> None:
    """Before lowering, `mark_weight_prefetch` as `programmatic_launch` asks ("prefetch",
    "weights"; nothing for "on"): weights of up to a quarter of the L2, so that a kernel's whole
    share stays there until it reads it."""
    least = _MARKINGS[programmatic_launch].least_weight_bytes
    if least is not None:
        mark_weight_prefetch(mod, entries, l2_bytes // 4, least)


def mark_weight_prefetch(mod: tvm.IRModule, entries: Collection[str], max_bytes: int, min_bytes: int = 0) -> None:
    """Set PREFETCH_ATTR on each kernel that the Relax functions `entries` of `mod` (the decode
    step's) call (in place, before lowering) to the names of its buffers to which every such
    call passes one of the step's weights, of `min_bytes` to `max_bytes`: the weights that the
    kernel reads whole (the module docstring); the list may be empty."""
    for gvar, positions in _parameter_reads(mod, entries).items():
        func = mod[gvar]
        names = []
        for index in sorted(positions):
            param = func.params[index]  # a buffer, of a weight's static shape
            if min_bytes <= buffer_bytes(param) <= max_bytes:
                names.append(param.name)
        mod.update_func(gvar, func.with_attr(PREFETCH_ATTR, names))


def _parameter_reads(mod: tvm.IRModule, entries: Collection[str]) -> dict[tvm.ir.GlobalVar, set[int]]:
    """Per kernel the functions `entries` call, the argument positions at which each of their
    call_tir / call_tir_inplace calls of it passes a weight: a parameter of the calling function
    at or after its `num_input` (the step puts its weights last and checks only the parameters
    before them: model/qwen3moe.py `_checked_inputs`), which no kernel writes."""
    from tvm import relax  # the compiler's: runtime-only TVM (the GPU tests' import of this module) has no Relax

    call_tir, inplace = tvm.ir.Op.get("relax.call_tir"), tvm.ir.Op.get("relax.call_tir_inplace")
    found: dict[tvm.ir.GlobalVar, set[int]] = {}
    for gvar, func in mod.functions.items():
        if not isinstance(func, relax.Function) or gvar.name_hint not in entries:
            continue
        weights = set(func.params[int(func.attrs["num_input"]):])
        for block in func.body.blocks:
            for binding in block.bindings:
                call = binding.value
                if not isinstance(call, relax.Call) or call.op not in (call_tir, inplace):
                    continue
                read = {j for j, arg in enumerate(call.args[1].fields) if arg in weights}
                kernel = call.args[0]
                found[kernel] = found[kernel] & read if kernel in found else read
    return found


def _pipeline(programmatic_launch: str
              ) -> tuple[tvm.transform.Pass, Callable[[], tvm.transform.Pass], Callable[[], tvm.transform.Pass]]:
    """TVM's default TIR pipeline (lowering, host and device finalizers), MarkProgrammaticLaunch
    after its lowering."""
    lower, finalize_host, finalize_device = tvm.tirx.get_tir_pipeline("default")
    return (tvm.transform.Sequential([lower, mark_programmatic_launch(programmatic_launch)],
                                     name=tir_pipeline_name(programmatic_launch)), finalize_host, finalize_device)


# tvm.tirx.build takes a pipeline by name only. Runtime-only TVM (the GPU machines) lowers
# nothing and has no pipelines; there this module gives only the names above.
if hasattr(tvm.tirx, "register_tir_pipeline"):
    for _value, _marking in _MARKINGS.items():
        tvm.tirx.register_tir_pipeline(_marking.pipeline, lambda value=_value: _pipeline(value))
