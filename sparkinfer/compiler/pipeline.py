"""Build pipeline: decode-step IRModule -> scheduled kernels -> VM executable -> compiled/<arch>/<key>/.

`compile_model(config, type_map, arch, out_dir)`:
  1. `model.qwen3moe.build_decode_step` makes the Relax step and its unscheduled kernels;
  2. each kernel gets its schedule: the rule registered for its factory and the arch's kind
     (sparkinfer/schedule/registry.py; a kernel without one is an error naming it), applied
     with the knobs of the schedules file (sparkinfer/schedule/schedules.py: the package's
     schedules/<arch>.json, or `--schedules PATH`), else the rule's arch-table default;
     for `cpu` as for CUDA (sparkinfer/schedule/cpu.py, prefill_cpu.py);
  3. the Relax side is lowered by `RELAX_PASSES` (no operator fusion, no dlight pass and
     no RewriteCUDAGraph: the kernels are already final and the runtime captures the whole
     step itself), the kernels by TVM's default TIR pipeline (with the step variant
     programmatic_launch "on": `dependent_launch.TIR_PIPELINE`, every CUDA kernel marked for
     programmatic dependent launch), and `tvm.compile` builds it, for CUDA inside
     `targets.aot_fatbin`, so the library embeds an nvcc fatbin for the arch and no CUDA
     source (it loads with runtime-only TVM: no NVRTC, no nvcc);
  4. the executable is exported as `model.so` (`model.tar` for sm_121: aarch64 host code,
     linked by TVM on the Spark when loaded) next to `manifest.json` (see manifest.py).

Compilation is deterministic: the same hyper-parameters, types and schedules give the same
kernels in the same order under the same names, and the same library bytes.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tvm
from tvm import relax

from sparkinfer.compiler import dependent_launch, targets
from sparkinfer.compiler.l2_prefetch import prefetch_experts
from sparkinfer.compiler.manifest import (
    DEFAULT_ROOT,
    Manifest,
    Output,
    compiled_dir,
    model_record,
    module_key,
    sources_hash,
    tvm_version,
)
from sparkinfer.errors import SparkInferError
from sparkinfer.gguf_file.config import ModelConfig
from sparkinfer.model.qwen3moe import DecodeStep, build_decode_step, misfit_variants
from sparkinfer.kernels.moe_q8 import PREFETCH_EXPERTS_ATTR
from sparkinfer.kernels.use import KernelUse
from sparkinfer.model.spec import ENTRY, ENTRY_PROCESSED, PAGE_SIZE
from sparkinfer.schedule.arch import ArchFacts, arch_facts
from sparkinfer.schedule.schedules import (
    DEFAULT,
    TRANSFERRED,
    STEP_VARIANTS,
    TUNED,
    SchedulesFile,
    arch_refusal,
    schedules_for,
)
from sparkinfer.schedule.space import Knobs, ScheduleError, check_knobs, kernel_key, rule_for, schedule_kernel

# Relax lowering after the kernels are final (TVM's CUDA default minus LegalizeOps/FuseOps/
# FuseTIR/dlight, which would fuse or reschedule hand-scheduled kernels, and minus
# RewriteCUDAGraph). The decode step has only call_tir / call_tir_inplace bindings.
RELAX_PASSES: tuple[Callable[[], tvm.transform.Pass], ...] = (
    relax.transform.RewriteDataflowReshape,
    relax.transform.ToNonDataflow,
    relax.transform.RemovePurityChecking,
    relax.transform.CallTIRRewrite,
    relax.transform.StaticPlanBlockMemory,
    relax.transform.LowerAllocTensor,
    relax.transform.KillAfterLastUse,
    relax.transform.LowerRuntimeBuiltin,
    relax.transform.ComputePrimValue,
    relax.transform.VMShapeLower,
    relax.transform.AttachGlobalSymbol,
)


# The CPU's flash-decode splits. The attention kernel runs at least one step of every split's
# streams x tile token slots whatever the depth (32 splits x 8 streams x 4: 1024 slots for a
# 129-token context), which a GPU spreads over its SMs and a CPU computes one by one: at depth
# 128 of the default model one split took 0.16 ms a call, 16 took 5.1 ms (bench/NOTES.md,
# bench/cpu_kernels.py; measured with 32-token tiles).
CPU_SPLITS = 1
# The CPU's (streams, tile) of that one split (model.qwen3moe.build_decode_step's attention_tiles):
# the attention factory's 8 x 4 gives a GPU's warps their lanes, while a core runs the streams one
# by one and gains from longer tiles (fewer rescales of the running state, longer vector loops over
# the tile's K and V rows): 25.8 -> 17.3 us a call at depth 128 on the 2-core EPYC dev VM
# (bench/NOTES.md, "Session 26").
CPU_ATTENTION_TILES = (2, 16)

# The T-token steps built beside the decode step when the caller names none: the chunk sizes
# a prompt is cut into (docs/ARCHITECTURE.md, "The T-token step"). One size on the CPU keeps
# its build small (128 amortises each weight's dequantization over 128 tokens). The GPUs cut
# long prompts into 2048s (engine.plan_chunks): an expert then multiplies ~128 tokens a chunk,
# not ~32, and on an H100 4096 tokens took 0.373 s as two 2048s where eight 512s took 0.415 s
# (bench/NOTES.md, "Session 11").
DEFAULT_PREFILL_CHUNKS: dict[str, tuple[int, ...]] = {
    "cpu": (128,), **{arch: (128, 512, 2048) for arch in targets.ARCHS if arch != "cpu"}}


def default_prefill_chunks(arch: str) -> tuple[int, ...]:
    return DEFAULT_PREFILL_CHUNKS.get(arch, ())


# Model-level variants (schedule.schedules.STEP_VARIANTS) an arch gets unless its schedules
# file picks them: the GPUs multiply the T-token step's dense GEMMs, grouped expert GEMMs and
# its attention's two products on tensor cores, whose operands are float16 (kernels/gemm.py,
# the f16 factories of kernels/moe_chunk.py, causal_prefill_attention_half in
# kernels/prefill_attention.py).
DEFAULT_STEP_VARIANTS: dict[str, dict[str, str]] = {
    arch: {"chunk_operands": "f16"} for arch in targets.ARCHS if arch != "cpu"}


def step_variants(arch: str, chosen: SchedulesFile | None) -> dict[str, str]:
    """The arch's default variants, overridden by those its schedules file picks."""
    return {**DEFAULT_STEP_VARIANTS.get(arch, {}), **({} if chosen is None else chosen.step)}


def fitting_variants(config: ModelConfig, arch: str, chosen: SchedulesFile | None,
                     log: Callable[[str], None]) -> dict[str, str]:
    """`step_variants`, each one whose kernels cannot serve this model's shapes put back to
    its default form (the first of STEP_VARIANTS'), slower, which `log` says."""
    variants = step_variants(arch, chosen)
    for name, why in misfit_variants(config, variants).items():
        fallback = STEP_VARIANTS[name][0]
        log(f"{arch}: step variant {name}={variants[name]!r} does not fit this model ({why}): "
            f"the step uses the slower {name}={fallback!r}")
        variants[name] = fallback
    return variants


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def relax_pipeline() -> tvm.transform.Pass:
    return tvm.transform.Sequential([p() for p in RELAX_PASSES], name="sparkinfer_relax_lowering")


def library_name(arch: str) -> str:
    return "model.tar" if arch == "sm_121" else "model.so"


# ---------------------------------------------------------------------------------------
# Scheduling
# ---------------------------------------------------------------------------------------


def kernel_knobs(use: KernelUse, facts: ArchFacts, schedules: SchedulesFile | None) -> tuple[Knobs, str]:
    """The knobs `use` gets on `facts`' arch and their source: the schedules file's entry
    (tuned / transferred / default), else the rule's default."""
    rule = rule_for(use, facts)
    entry = None if schedules is None else schedules.kernels.get(kernel_key(use))
    if entry is None:
        return rule.default(use, facts), DEFAULT
    try:
        knobs = rule.knobs_type.from_json(entry.knobs)
        check_knobs(rule, use, knobs, facts)
    except ScheduleError as e:
        raise ScheduleError(f"schedules file for {facts.name}, kernel {kernel_key(use)}: {e}") from None
    return knobs, entry.source


def step_kernel(func: tvm.tirx.PrimFunc, use: KernelUse, facts: ArchFacts, knobs: Knobs | None = None
                ) -> tvm.tirx.PrimFunc:
    """A kernel as a step builds it: `schedule_kernel`, then the L2 prefetch of the experts its
    factory asks for (`l2_prefetch.prefetch_experts`)."""
    func = schedule_kernel(func, use, facts, knobs)
    return prefetch_experts(func) if PREFETCH_EXPERTS_ATTR in func.attrs else func


def schedule_step(step: DecodeStep, arch: str, schedules: SchedulesFile | None = None) -> dict[str, dict[str, Any]]:
    """Replace every kernel of `step.mod` by its `step_kernel` form; returns name -> the schedule
    record the manifest keeps ({rule, source, knobs})."""
    facts = arch_facts(arch)
    records: dict[str, dict[str, Any]] = {}
    mod = step.mod
    for use in step.kernels:
        gvar = mod.get_global_var(use.name)
        knobs, source = kernel_knobs(use, facts, schedules)
        mod.update_func(gvar, step_kernel(mod[gvar], use, facts, knobs))
        records[use.name] = {"rule": rule_for(use, facts).name, "source": source, "knobs": knobs.to_json()}
    return records


# ---------------------------------------------------------------------------------------
# Build and export
# ---------------------------------------------------------------------------------------


@dataclass
class CompileResult:
    manifest: Manifest
    directory: Path
    seconds: float  # wall time of schedule + build + export (0 when found in the cache)
    cached: bool


def tir_pipeline(step: DecodeStep, arch: str) -> str:
    """The TIR pipeline `step`'s kernels are lowered by: with programmatic_launch "on",
    dependent_launch.TIR_PIPELINE (TVM's default, then each CUDA kernel marked for programmatic
    dependent launch), with "prefetch" or "weights" its PREFETCH_PIPELINE or WEIGHTS_PIPELINE
    (each kernel's weights prefetched into the L2 first); a cpu step cannot have any."""
    if step.programmatic_launch == "off":
        return "default"
    why = arch_refusal(arch, "programmatic_launch", step.programmatic_launch)
    if why is not None:
        raise SparkInferError(f"programmatic_launch={step.programmatic_launch!r} {why}")
    return dependent_launch.tir_pipeline_name(step.programmatic_launch)


def build_step(step: DecodeStep, arch: str, schedules: SchedulesFile | None = None
               ) -> tuple[tvm.runtime.Executable, dict[str, dict[str, Any]]]:
    """Schedule and build a decode step; returns the executable and each kernel's schedule record."""
    target = targets.target_for(arch)
    lowering = tir_pipeline(step, arch)
    for name in ("attention_merge", "router_merge", "decode_attention", "expert_prefetch", "attention_norm",
                 "chunk_activations", "int8_dots"):
        value = getattr(step, name)
        why = arch_refusal(arch, name, value)
        if why is not None:
            raise SparkInferError(f"{name}={value!r} {why}")
    provenance = schedule_step(step, arch, schedules)
    if arch == "cpu":
        return tvm.compile(step.mod, target=target, relax_pipeline=relax_pipeline(), tir_pipeline=lowering), provenance
    if step.programmatic_launch != "off":
        dependent_launch.mark_step_weights(step.mod, step.programmatic_launch, (ENTRY, ENTRY_PROCESSED),
                                           arch_facts(arch).l2_bytes)
    # a kernel whose shared memory its launch would refuse fails here, not on the GPU
    targets.check_shared_memory(tvm.IRModule({gv: f for gv, f in step.mod.functions.items()
                                              if isinstance(f, tvm.tirx.PrimFunc)}), arch)
    with targets.aot_fatbin(arch):
        ex = tvm.compile(step.mod, target=target, relax_pipeline=relax_pipeline(), tir_pipeline=lowering)
    return ex, provenance


def workspace_bytes(mod: tvm.IRModule) -> int:
    """Memory the step's Relax functions allocate beyond their inputs (weights, KV cache,
    state): each function's planned storages (StaticPlanBlockMemory's pools of its
    intermediates) and its unplanned tensors (its outputs), summed over the functions, since the
    VM's pooled allocator keeps what a function allocated once it has run. For the full-size
    model's steps of 128, 512 and 2048 tokens this is ~2.2 GiB, 1.2 of it score_2048's logits."""
    planned = tvm.transform.Sequential(
        [p() for p in RELAX_PASSES[:RELAX_PASSES.index(relax.transform.StaticPlanBlockMemory) + 1]])(mod)
    alloc_storage = tvm.ir.Op.get("relax.memory.alloc_storage")
    alloc_tensor = tvm.ir.Op.get("relax.builtin.alloc_tensor")
    total = 0

    def count(expr: relax.Expr) -> None:
        nonlocal total
        if isinstance(expr, relax.Call) and expr.op == alloc_storage:
            total += int(expr.args[0].values[0])  # (shape [bytes], device index, scope, dtype)
        elif isinstance(expr, relax.Call) and expr.op == alloc_tensor:
            shape, dtype = expr.args[0], expr.args[1].value
            total += math.prod(int(v) for v in shape.values) * tvm.DataType(dtype).bits // 8

    for func in planned.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, count)
    return total


def _target_json(target: tvm.target.Target) -> dict[str, Any]:
    """The target as a plain dict (its attributes as JSON values), for the manifest."""

    def plain(value: Any) -> Any:
        if isinstance(value, (bool, int, float, str)) or value is None:
            return value
        if isinstance(value, tvm.target.Target):
            return _target_json(value)
        if hasattr(value, "items"):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)) or type(value).__name__ == "Array":
            return [plain(v) for v in value]
        return str(value)

    out: dict[str, Any] = {"kind": target.kind.name}
    out.update({str(k): plain(v) for k, v in sorted(target.attrs.items(), key=lambda kv: str(kv[0]))})
    if target.host is not None and target.host.kind.name != target.kind.name:
        out["host"] = _target_json(target.host)
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compile_model(
    config: ModelConfig,
    type_map: Mapping[str, Any],
    arch: str,
    out_dir: str | Path = DEFAULT_ROOT,
    *,
    page_size: int = PAGE_SIZE,
    n_splits: int | None = None,
    prefill_chunks: tuple[int, ...] | None = None,
    force: bool = False,
    schedules: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> CompileResult:
    """Compile the decode step of (config, type_map) for `arch` into `out_dir/<arch>/<key>/`,
    with the knobs of `schedules` (a schedules file; None: the package's for `arch`, if any).

    with a T-token step for each T of `prefill_chunks` (None: `default_prefill_chunks(arch)`).

    A module already there for the same model, TVM, sources, schedules and chunks is reused unless `force`.
    log: where a step variant put back for this model is reported (`fitting_variants`; None: stderr).
    """
    from sparkinfer.compiler.manifest import find_compiled

    targets.target_for(arch)  # rejects an unknown arch before any work
    if n_splits is None and arch == "cpu":
        n_splits = CPU_SPLITS
    chunks = default_prefill_chunks(arch) if prefill_chunks is None else tuple(sorted(set(prefill_chunks)))
    chosen, schedules_path = schedules_for(arch, schedules)
    if not force:
        found = find_compiled(config, type_map, arch, out_dir, page_size=page_size, n_splits=n_splits,
                              prefill_chunks=chunks, schedules=schedules_path)
        if found is not None:
            return CompileResult(found, compiled_dir(config, type_map, arch, out_dir, page_size), 0.0, True)
    start = time.perf_counter()
    step = build_decode_step(config, type_map, page_size=page_size, n_splits=n_splits, prefill_chunks=chunks,
                             attention_tiles=CPU_ATTENTION_TILES if arch == "cpu" else None,
                             **fitting_variants(config, arch, chosen, log or _to_stderr))
    ex, provenance = build_step(step, arch, chosen)

    directory = compiled_dir(config, type_map, arch, out_dir, page_size)
    directory.mkdir(parents=True, exist_ok=True)
    lib_name = library_name(arch)
    # Export beside the target and rename, so a reader never sees half a library.
    with tempfile.TemporaryDirectory(dir=directory, prefix=".export-") as tmp:
        tmp_lib = Path(tmp) / lib_name
        ex.export_library(str(tmp_lib))
        os.replace(tmp_lib, directory / lib_name)
    lib_path = directory / lib_name
    fatbins: list[dict[str, str]] = []
    if arch != "cpu":
        found_fatbins = targets.embedded_fatbins(lib_path)
        if not found_fatbins:
            raise RuntimeError(f"{lib_path} carries no CUDA fatbin: the AOT build did not take effect")
        fatbins = [{"kind": e.kind, "arch": e.arch} for fb in found_fatbins for e in targets.fatbin_entries(fb)]

    manifest = Manifest(
        key=module_key(config, type_map, page_size),
        arch=arch,
        target=_target_json(targets.target_for(arch)),
        tvm_version=tvm_version(),
        library=lib_path,
        library_sha256=_sha256(lib_path),
        model=model_record(config, type_map),
        page_size=step.page_size,
        max_pages=step.max_pages,
        n_splits=step.n_splits,
        prefill_chunks=step.prefill_chunks,
        sources_hash=sources_hash(arch, schedules_path),
        schedules=None if schedules_path is None else str(schedules_path),
        inputs=step.inputs,
        outputs=[Output("logits", "float32", (config.vocab_size,)), Output("next", "int32", (1,))],
        kernels=[{**use.to_json(), "schedule": provenance[use.name]} for use in step.kernels],
        fatbins=fatbins,
        workspace_bytes=workspace_bytes(step.mod),
    )
    manifest.write()
    seconds = time.perf_counter() - start
    return CompileResult(manifest, directory, seconds, False)


def schedules_summary(manifest: Manifest) -> str:
    """One line: how many kernels got which kind of schedule, and from which file."""
    counts: dict[str, int] = {}
    for kernel in manifest.kernels:
        source = kernel["schedule"]["source"]
        counts[source] = counts.get(source, 0) + 1
    parts = ", ".join(f"{counts[s]} {s}" for s in (TUNED, TRANSFERRED, DEFAULT) if s in counts)
    return f"schedules: {parts} ({manifest.schedules or 'no schedules file: arch defaults'})"
