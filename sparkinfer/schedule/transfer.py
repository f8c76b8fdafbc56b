"""Schedules files for arches nobody has tuned on: every kernel of the given models gets its
rule's arch-table default, marked "transferred" (untuned; no time measured).

    python -m sparkinfer.schedule.transfer --arch sm_120 [--out PATH]

writes the package's sparkinfer/data/schedules/<arch>.json (or PATH) for the embedded default
model and the full-size Qwen3-30B-A3B (Q4_K_M): only hyper-parameters and tensor types are
used, no weights. tests/schedule/test_transfer.py checks that the committed files are what this
writes.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

from sparkinfer import __version__
from sparkinfer.compiler.manifest import tvm_version
from sparkinfer.compiler.targets import ARCHS
from sparkinfer.gguf_file import preset_config, type_map
from sparkinfer.gguf_file.reader import GGUFModel
from sparkinfer.model.qwen3moe import KernelUse, build_decode_step
from sparkinfer.schedule.arch import arch_facts
from sparkinfer.schedule.schedules import TRANSFERRED, ScheduleEntry, SchedulesFile, packaged_schedules_path
from sparkinfer.schedule.space import kernel_key, rule_for


def reference_model_kernels() -> list[KernelUse]:
    """The kernels of the embedded default model's step and of Qwen3-30B-A3B's (Q4_K_M)."""
    from sparkinfer.data import default_model_path

    default = GGUFModel.open(default_model_path())
    full = preset_config("qwen3-30b-a3b")
    steps = [build_decode_step(default.config, {n: i.ggml_type for n, i in default.tensors.items()}),
             build_decode_step(full, type_map(full, "q4_k_m"))]
    return [use for step in steps for use in step.kernels]


def transferred_schedules(arch: str, kernels: Iterable[KernelUse]) -> SchedulesFile:
    """Each kernel's rule default on `arch`, as "transferred" entries."""
    facts = arch_facts(arch)
    entries = {}
    for use in kernels:
        entries[kernel_key(use)] = ScheduleEntry(rule_for(use, facts).default(use, facts).to_json(), TRANSFERRED)
    made_by = {"tvm": tvm_version(), "sparkinfer": __version__, "device": None, "date": None,
               "how": f"the arch table's defaults for {arch} (sparkinfer/schedule/arch.py), untuned: "
                      "python -m sparkinfer.schedule.transfer"}
    return SchedulesFile(arch=arch, made_by=made_by, kernels=entries)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparkinfer.schedule.transfer", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", required=True, choices=[a for a in ARCHS if a != "cpu"])
    p.add_argument("--out", type=Path, help="where to write (default: the package's schedules file for the arch)")
    args = p.parse_args(argv)
    out = args.out or packaged_schedules_path(args.arch)
    schedules = transferred_schedules(args.arch, reference_model_kernels())
    schedules.write(out)
    print(f"wrote {out}: {len(schedules.kernels)} kernels, transferred (untuned)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
