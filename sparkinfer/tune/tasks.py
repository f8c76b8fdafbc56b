"""The tuning tasks of a model: one per distinct kernel of its decode step that has a schedule
rule for the arch (sparkinfer/schedule/space.py)."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from pathlib import Path

from sparkinfer.errors import SparkInferError
from sparkinfer.gguf_file import GGUFModel, ModelConfig, preset_config, type_map
from sparkinfer.model.qwen3moe import build_decode_step
from sparkinfer.kernels.use import KernelUse
from sparkinfer.schedule.arch import ArchFacts, arch_facts
from sparkinfer.schedule.space import ScheduleError, design_spaces, kernel_key, knobs_from_trace, rule_for
from sparkinfer.tune.inputs import concrete_kernel, kernel_inputs, read_bytes
from sparkinfer.tune.task import TuneTask

Log = Callable[[str], None]


def use_task(use: KernelUse, func, facts: ArchFacts, seed: int = 0) -> TuneTask:  # noqa: ANN001 (PrimFunc)
    rule = rule_for(use, facts)
    inputs = kernel_inputs(use.family, use.factory, use.args, seed)
    return TuneTask(
        key=kernel_key(use), name=use.name, func=concrete_kernel(func, inputs), inputs=inputs,
        design_spaces=lambda f: design_spaces(f, use, facts),
        knobs_of=lambda trace: knobs_from_trace(trace, use, facts).to_json(),
        default_knobs=rule.default(use, facts).to_json(),
        enable_check=rule.enable_check,
        read_bytes=read_bytes(use.family, use.factory, inputs),
    )


def model_tasks(model: str | Path, arch: str, pattern: str | None = None, log: Log | None = None,
                variants: Mapping[str, str] | None = None) -> list[TuneTask]:
    """The tasks of a GGUF file's decode step (see `step_tasks`)."""
    gguf = GGUFModel.open(model)
    types = {name: t.ggml_type for name, t in gguf.tensors.items()}
    return step_tasks(gguf.config, types, arch, pattern, log, variants)


def preset_tasks(preset: str, file_type: str, arch: str, pattern: str | None = None,
                 log: Log | None = None, variants: Mapping[str, str] | None = None) -> list[TuneTask]:
    """The tasks of a `sparkinfer synth` preset's decode step, without its file (the full-size
    Qwen3-30B-A3B's kernels are tuned on a machine that need not hold its 17 GB)."""
    config = preset_config(preset)
    return step_tasks(config, type_map(config, file_type), arch, pattern, log, variants)


def step_tasks(config: ModelConfig, types: Mapping[str, int], arch: str, pattern: str | None = None,
               log: Log | None = None, variants: Mapping[str, str] | None = None) -> list[TuneTask]:
    """The decode step's kernels matching `pattern` (fnmatch on the kernel name or key), one
    task each, the step built with the model-level `variants` (schedule.schedules.STEP_VARIANTS:
    those the arch compiles with, so that a schedules file picking "decode_launches": "fused"
    gets the fused kernels tuned). A kernel without a rule for the arch is skipped with a note,
    unless `pattern` named it; so is one whose rule has nothing to choose (every knob has one
    value: it keeps the default). A pattern that matches nothing is an error."""
    log = log or (lambda message: None)
    step = build_decode_step(config, dict(types), **dict(variants or {}))
    facts = arch_facts(arch)
    tasks, matched = [], 0
    for use in step.kernels:
        key = kernel_key(use)
        if pattern and not (fnmatch.fnmatch(use.name, pattern) or fnmatch.fnmatch(key, pattern)):
            continue
        matched += 1
        try:
            rule = rule_for(use, facts)
        except ScheduleError as e:
            if pattern:
                raise
            log(f"skipped {use.name}: {e}")
            continue
        if not rule.enable_check:
            # MetaSchedule's JSON database replays every record on load with TVM's schedule
            # checks on, which such a kernel fails (its blocks are not plain block iters), so
            # the log would not load again: it keeps its arch default.
            log(f"skipped {use.name}: {rule.name} schedules with TVM's checks off, which the tuning log cannot hold")
            continue
        if not any(len(values) > 1 for values in rule.space(use, facts).values()):
            log(f"skipped {use.name}: {rule.name} has nothing to choose")
            continue
        tasks.append(use_task(use, step.originals[use.name], facts))
    if pattern and not matched:
        names = ", ".join(u.name for u in step.kernels)
        raise SparkInferError(f"--kernels {pattern!r} matches none of the model's kernels ({names})")
    return tasks
