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
"""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import tirx

LAUNCH_TAG = "tirx.use_programtic_dependent_launch"
# TVM's CUDA runtime requires this tag, when present, to be the last of a kernel's launch params.
_DYNAMIC_SHARED_TAG = "tirx.use_dyn_shared_memory"
_LAUNCH_PARAMS = "tirx.kernel_launch_params"
# The TIR pipeline `tvm.compile(..., tir_pipeline=TIR_PIPELINE)` builds with: TVM's default
# lowering, then MarkProgrammaticLaunch.
TIR_PIPELINE = "sparkinfer_programmatic_launch"


def _is_cuda_kernel(func: tvm.ir.BaseFunc) -> bool:
    if not isinstance(func, tirx.PrimFunc) or func.attrs is None or _LAUNCH_PARAMS not in func.attrs:
        return False
    target = func.attrs.get("target")
    return target is not None and target.kind.name == "cuda"


def mark_kernel(kernel: tirx.PrimFunc) -> tirx.PrimFunc:
    """One lowered CUDA kernel launched programmatically: LAUNCH_TAG among its launch params,
    `griddepcontrol.wait` then `griddepcontrol.launch_dependents` at its entry."""
    from tvm.script import tirx as T  # the compiler's: runtime-only TVM has no TVMScript

    params = [str(p) for p in kernel.attrs[_LAUNCH_PARAMS]]
    if LAUNCH_TAG in params:
        return kernel
    last = [p for p in params if p == _DYNAMIC_SHARED_TAG]
    params = [p for p in params if p != _DYNAMIC_SHARED_TAG] + [LAUNCH_TAG] + last
    entry = [tirx.Evaluate(T.ptx.griddepcontrol.wait()), tirx.Evaluate(T.ptx.griddepcontrol.launch_dependents())]
    return kernel.with_body(tirx.SeqStmt([*entry, kernel.body])).with_attr(_LAUNCH_PARAMS, params)


def _mark_module(mod: tvm.IRModule, _ctx: object) -> tvm.IRModule:
    functions = {gvar: mark_kernel(func) if _is_cuda_kernel(func) else func for gvar, func in mod.functions.items()}
    return tvm.IRModule(functions, attrs=mod.attrs, global_infos=mod.global_infos)


def mark_programmatic_launch() -> tvm.transform.Pass:
    """The pass MarkProgrammaticLaunch: `mark_kernel` on every CUDA kernel of a module lowered
    past SplitHostDevice."""
    return tvm.transform.module_pass(_mark_module, opt_level=0, name="MarkProgrammaticLaunch")


def _pipeline() -> tuple[tvm.transform.Pass, Callable[[], tvm.transform.Pass], Callable[[], tvm.transform.Pass]]:
    """TVM's default TIR pipeline (lowering, host and device finalizers), MarkProgrammaticLaunch
    after its lowering."""
    lower, finalize_host, finalize_device = tvm.tirx.get_tir_pipeline("default")
    return tvm.transform.Sequential([lower, mark_programmatic_launch()], name=TIR_PIPELINE), finalize_host, finalize_device


# tvm.tirx.build takes a pipeline by name only. Runtime-only TVM (the GPU machines) lowers
# nothing and has no pipelines; there this module gives only the names above.
if hasattr(tvm.tirx, "register_tir_pipeline"):
    tvm.tirx.register_tir_pipeline(TIR_PIPELINE, _pipeline)
