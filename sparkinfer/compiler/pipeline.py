"""Build pipeline: decode-step IRModule -> scheduled kernels -> VM executable -> compiled/<arch>/<key>/.

`compile_model(config, type_map, arch, out_dir)`:
  1. `model.qwen3moe.build_decode_step` makes the Relax step and its unscheduled kernels;
  2. for a CUDA arch each kernel gets its GPU schedule, in this order of preference:
       - a MetaSchedule record for it in `tuning_logs/<arch>/` (JSONDatabase layout),
       - the family's hand schedule `sparkinfer.schedule.<family>.schedule_<factory>`, called
         with the PrimFunc and, by parameter name, any of the factory's arguments (`ggml_type`,
         `n`, ...) and `arch`; a `None` return means "no hand schedule for this instance",
       - dlight's default GPU rules, with a printed warning that names the kernel;
     for `cpu` the kernels with a registered CPU rule (the T-token step's GEMMs and
     attention) get it and the others stay unscheduled (LLVM builds them as they are);
  3. the Relax side is lowered by `RELAX_PASSES` (no operator fusion, no dlight pass and
     no RewriteCUDAGraph: the kernels are already final and the runtime captures the whole
     step itself), and `tvm.compile` builds it, for CUDA inside `targets.aot_fatbin`, so the
     library embeds an nvcc fatbin for the arch and no CUDA source (it loads with
     runtime-only TVM: no NVRTC, no nvcc);
  4. the executable is exported as `model.so` (`model.tar` for sm_121: aarch64 host code,
     linked by TVM on the Spark when loaded) next to `manifest.json` (see manifest.py).

Compilation is deterministic: the same hyper-parameters and types give the same kernels in
the same order under the same names, and the same library bytes.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tvm
from tvm import relax, tirx

from sparkinfer.compiler import targets
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
from sparkinfer.model.qwen3moe import DecodeStep, KernelUse, build_decode_step, factory_args, kernel_factory
from sparkinfer.model.spec import PAGE_SIZE
from sparkinfer.schedule.arch import arch_facts
from sparkinfer.schedule.space import ScheduleError, rule_for, schedule_kernel

_REPO = Path(__file__).resolve().parents[2]
TUNING_LOGS = _REPO / "tuning_logs"

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

HAND, TUNED, DLIGHT, UNSCHEDULED = "hand", "tuned", "dlight-fallback", "unscheduled"

# The T-token steps built beside the decode step when the caller names none: the chunk sizes
# a prompt is cut into (docs/ARCHITECTURE.md, "The T-token step"). One size on the CPU keeps
# its build small (128 amortises each weight's dequantization over 128 tokens). None on the
# CUDA archs yet: the chunk kernels have CPU schedules only, so a GPU prefills token by token.
DEFAULT_PREFILL_CHUNKS: dict[str, tuple[int, ...]] = {"cpu": (128,)}


def default_prefill_chunks(arch: str) -> tuple[int, ...]:
    return DEFAULT_PREFILL_CHUNKS.get(arch, ())


def relax_pipeline() -> tvm.transform.Pass:
    return tvm.transform.Sequential([p() for p in RELAX_PASSES], name="sparkinfer_relax_lowering")


def library_name(arch: str) -> str:
    return "model.tar" if arch == "sm_121" else "model.so"


# ---------------------------------------------------------------------------------------
# Scheduling
# ---------------------------------------------------------------------------------------


def _schedule_function(use: KernelUse) -> Callable[..., Any] | None:
    try:
        module = importlib.import_module(f"sparkinfer.schedule.{use.family}")
    except ModuleNotFoundError as e:
        if e.name != f"sparkinfer.schedule.{use.family}":
            raise
        return None
    return getattr(module, f"schedule_{use.factory}", None)


def _factory_params(use: KernelUse) -> dict[str, Any]:
    """The factory's arguments by parameter name (`ggml_type`, `n`, `k`, ...)."""
    try:
        factory = kernel_factory(use.family, use.factory)
        names = list(inspect.signature(factory).parameters)
    except (SparkInferError, TypeError, ValueError):
        return {}
    return dict(zip(names, factory_args(use)))


def hand_schedule(use: KernelUse, func: tirx.PrimFunc, arch: str) -> tuple[tirx.PrimFunc, str] | None:
    """The family's hand schedule of this kernel, or None where there is none."""
    facts = arch_facts(arch)
    try:
        rule = rule_for(use, facts)
    except ScheduleError:
        rule = None
    if rule is not None:
        return schedule_kernel(func, use, facts), f"{HAND}:{rule.name}"
    schedule = _schedule_function(use)
    if schedule is None:
        return None
    params = inspect.signature(schedule).parameters
    available = {**_factory_params(use), "arch": arch}
    kwargs = {name: available[name] for name in list(params)[1:] if name in available}
    scheduled = schedule(func, **kwargs)
    if scheduled is None:
        return None
    if not isinstance(scheduled, tirx.PrimFunc):
        raise TypeError(f"{schedule.__module__}.{schedule.__name__} returned {type(scheduled).__name__}, not a PrimFunc")
    return scheduled.with_attr("tirx.is_scheduled", True), f"{HAND}:{schedule.__module__}.{schedule.__name__}"


def tuned_schedule(original: tirx.PrimFunc, target: tvm.target.Target, arch: str,
                   logs: Path = TUNING_LOGS) -> tuple[tirx.PrimFunc, str] | None:
    """A MetaSchedule record for this kernel in `logs/<arch>/`, applied; None without one."""
    work_dir = logs / arch
    if not (work_dir / "database_workload.json").is_file():
        return None
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    database = _tuning_database(str(work_dir))
    mod = _normalize_mod(original)
    if not database.has_workload(mod):
        return None
    sch = database.query_schedule(mod, target, workload_name="main")
    if sch is None:
        return None
    del ms
    rel = os.path.relpath(work_dir, _REPO)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True), f"{TUNED}:{rel}"


_DATABASES: dict[str, Any] = {}


def _tuning_database(work_dir: str) -> Any:
    if work_dir not in _DATABASES:
        from tvm.s_tir import meta_schedule as ms

        _DATABASES[work_dir] = ms.database.JSONDatabase(work_dir=work_dir, allow_missing=False)
    return _DATABASES[work_dir]


def dlight_schedule(name: str, func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc:
    from tvm.s_tir import dlight as dl

    try:
        with target:
            mod = dl.ApplyDefaultSchedule(
                dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()
            )(tvm.IRModule({name: func}))
    except Exception as e:  # dlight raises ScheduleError, AssertionError, ...
        last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise SparkInferError(
            f"kernel {name}: no hand schedule, and dlight's default rules fail on it ({last})"
        ) from e
    scheduled = mod[name]
    if not (scheduled.attrs is not None and scheduled.attrs.get("tirx.is_scheduled", False)):
        raise SparkInferError(f"kernel {name}: no hand schedule, and dlight's default rules cannot schedule it")
    return scheduled


def schedule_step(step: DecodeStep, arch: str, *, logs: Path = TUNING_LOGS,
                  warn: Callable[[str], None] | None = None) -> dict[str, str]:
    """Replace every kernel of `step.mod` by its GPU schedule; returns name -> provenance."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    target = targets.target_for(arch)
    provenance: dict[str, str] = {}
    mod = step.mod
    for use in step.kernels:
        gvar = mod.get_global_var(use.name)
        func = mod[gvar]
        found = tuned_schedule(step.originals[use.name], target, arch, logs)
        if found is None:
            found = hand_schedule(use, func, arch)
        if found is None:
            warn(
                f"warning: kernel {use.name} ({use.family}.{use.factory}) has no GPU schedule "
                f"(sparkinfer.schedule.{use.family}.schedule_{use.factory}): using dlight's default rules"
            )
            found = dlight_schedule(use.name, func, target), DLIGHT
        scheduled, provenance[use.name] = found
        # A tuned record may carry the symbol it was tuned under; the module's name rules.
        if scheduled.attrs is not None and "global_symbol" in scheduled.attrs:
            scheduled = scheduled.without_attr("global_symbol")
        mod.update_func(gvar, scheduled)
    return provenance


def schedule_cpu_step(step: DecodeStep) -> dict[str, str]:
    """The kernels with a CPU rule (the T-token step's GEMMs and attention) get it; the others
    stay unscheduled (LLVM builds them as they are). Returns name -> provenance."""
    facts = arch_facts("cpu")
    provenance: dict[str, str] = {}
    for use in step.kernels:
        try:
            rule = rule_for(use, facts)
        except ScheduleError:
            provenance[use.name] = UNSCHEDULED
            continue
        gvar = step.mod.get_global_var(use.name)
        step.mod.update_func(gvar, schedule_kernel(step.mod[gvar], use, facts))
        provenance[use.name] = f"{HAND}:{rule.name}"
    return provenance


# ---------------------------------------------------------------------------------------
# Build and export
# ---------------------------------------------------------------------------------------


@dataclass
class CompileResult:
    manifest: Manifest
    directory: Path
    seconds: float  # wall time of schedule + build + export (0 when found in the cache)
    cached: bool


def build_step(step: DecodeStep, arch: str, *,
               logs: Path = TUNING_LOGS) -> tuple[tvm.runtime.Executable, dict[str, str]]:
    """Schedule (CUDA) and build a decode step; returns the executable and the provenance."""
    target = targets.target_for(arch)
    if arch == "cpu":
        provenance = schedule_cpu_step(step)
        return tvm.compile(step.mod, target=target, relax_pipeline=relax_pipeline()), provenance
    provenance = schedule_step(step, arch, logs=logs)
    with targets.aot_fatbin(arch):
        ex = tvm.compile(step.mod, target=target, relax_pipeline=relax_pipeline())
    return ex, provenance


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
    logs: Path = TUNING_LOGS,
) -> CompileResult:
    """Compile the decode step of (config, type_map) for `arch` into `out_dir/<arch>/<key>/`,
    with a T-token step for each T of `prefill_chunks` (None: `default_prefill_chunks(arch)`).

    A module already there for the same model, TVM, sources and chunks is reused unless `force`.
    """
    from sparkinfer.compiler.manifest import find_compiled

    targets.target_for(arch)  # rejects an unknown arch before any work
    chunks = default_prefill_chunks(arch) if prefill_chunks is None else tuple(sorted(set(prefill_chunks)))
    if not force:
        found = find_compiled(config, type_map, arch, out_dir, page_size=page_size, n_splits=n_splits,
                              prefill_chunks=chunks)
        if found is not None:
            return CompileResult(found, compiled_dir(config, type_map, arch, out_dir, page_size), 0.0, True)
    start = time.perf_counter()
    step = build_decode_step(config, type_map, page_size=page_size, n_splits=n_splits, prefill_chunks=chunks)
    ex, provenance = build_step(step, arch, logs=logs)

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
        sources_hash=sources_hash(arch),
        inputs=step.inputs,
        outputs=[Output("logits", "float32", (config.vocab_size,)), Output("next", "int32", (1,))],
        kernels=[{**use.to_json(), "schedule": provenance[use.name]} for use in step.kernels],
        fatbins=fatbins,
    )
    manifest.write()
    seconds = time.perf_counter() - start
    return CompileResult(manifest, directory, seconds, False)


def remove_compiled(directory: str | Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
