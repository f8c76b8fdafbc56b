"""Schedules files for arches nobody has tuned on: the step variants measured on sm_90, and
every kernel of the given models' step built with them at its rule's arch-table default, all
marked "transferred" (untuned; no time measured).

    python -m sparkinfer.tune.transfer --arch sm_120 [--out PATH]

writes the package's sparkinfer/data/schedules/<arch>.json (or PATH) for the embedded default
model and the full-size Qwen3-30B-A3B (Q4_K_M): only hyper-parameters and tensor types are
used, no weights. tests/tune/test_transfer.py checks that the committed files are what this
writes.

Why sm_90's step: each of its variants was adopted there by a measurement (bench/NOTES.md), and
each is built from instructions every CUDA arch we target has (dp4a for the int8 activations,
mma.sync m16n8k16 and ldmatrix for the tensor-core attentions, a load-time re-layout for the
planar Q6_K), so the fast paths are what an untuned Blackwell card compiles too; without it
sm_120 / sm_121 would take the float32 first forms, which no card has measured faster.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from pathlib import Path

from sparkinfer import __version__
from sparkinfer.compiler.manifest import tvm_version
from sparkinfer.schedule.arch import ARCHS
from sparkinfer.gguf_file import preset_config, type_map
from sparkinfer.gguf_file.reader import GGUFModel
from sparkinfer.model.qwen3moe import build_decode_step
from sparkinfer.kernels.use import KernelUse
from sparkinfer.schedule.arch import arch_facts
from sparkinfer.schedule.schedules import (TRANSFERRED, ScheduleEntry, SchedulesFile, packaged_schedules_path,
                                           schedules_for)
from sparkinfer.schedule.space import kernel_key, rule_for


# The arch whose measured step variants the untuned CUDA arches take (see the docstring).
MEASURED_ARCH = "sm_90"


def measured_schedules() -> SchedulesFile:
    """MEASURED_ARCH's committed schedules file (its step variants are what the others take)."""
    chosen, _ = schedules_for(MEASURED_ARCH)
    return chosen


def reference_model_kernels(arch: str, measured: SchedulesFile) -> list[KernelUse]:
    """The kernels of the embedded default model's step and of Qwen3-30B-A3B's (Q4_K_M) on
    `arch` with `measured`'s step variants, as a compile for `arch` picking them would build
    each model (compiler.pipeline.fitting_variants: over the arch's defaults, a variant the
    model's shapes do not fit in its first form)."""
    from sparkinfer.compiler.pipeline import fitting_variants
    from sparkinfer.data import default_model_path

    default = GGUFModel.open(default_model_path())
    full = preset_config("qwen3-30b-a3b")
    models = [(default.config, {n: i.ggml_type for n, i in default.tensors.items()}),
              (full, type_map(full, "q4_k_m"))]
    return [use for config, types in models
            for use in build_decode_step(config, types,
                                         **fitting_variants(config, arch, measured, log=lambda message: None)).kernels]


def transferred_schedules(arch: str, kernels: Iterable[KernelUse], step: Mapping[str, str]) -> SchedulesFile:
    """Each kernel's rule default on `arch`, as "transferred" entries, with `step`'s variants."""
    facts = arch_facts(arch)
    entries = {}
    for use in kernels:
        entries[kernel_key(use)] = ScheduleEntry(rule_for(use, facts).default(use, facts).to_json(), TRANSFERRED)
    made_by = {"tvm": tvm_version(), "sparkinfer": __version__, "device": None, "date": None,
               "how": f"the arch table's defaults for {arch} (sparkinfer/schedule/arch.py), untuned, and the step "
                      f"variants measured on {MEASURED_ARCH} (sparkinfer/data/schedules/{MEASURED_ARCH}.json), "
                      f"unmeasured on {arch}: python -m sparkinfer.tune.transfer"}
    return SchedulesFile(arch=arch, made_by=made_by, kernels=entries, step=dict(step))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparkinfer.tune.transfer", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", required=True, choices=[a for a in ARCHS if a != "cpu"])
    p.add_argument("--out", type=Path, help="where to write (default: the package's schedules file for the arch)")
    args = p.parse_args(argv)
    out = args.out or packaged_schedules_path(args.arch)
    measured = measured_schedules()
    schedules = transferred_schedules(args.arch, reference_model_kernels(args.arch, measured), measured.step)
    schedules.write(out)
    print(f"wrote {out}: {len(schedules.kernels)} kernels, transferred (untuned)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
