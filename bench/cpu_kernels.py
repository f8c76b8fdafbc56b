"""Each kernel of the default model's CPU decode step alone: unscheduled vs its CPU rule's
default knobs (time_evaluator medians, zero inputs, the two builds interleaved three times).

    PYTHONPATH=. python3 bench/cpu_kernels.py [--splits S] [NAME_PART ...]

`--splits` is the step's flash-decode split count (default: the CPU's, pipeline.CPU_SPLITS).
Zero inputs keep every kernel's work data-independent except attention's, whose depth is 16
pages' worth here. bench/NOTES.md has the numbers.
"""

from __future__ import annotations

import argparse

import numpy as np
import tvm

from sparkinfer.compiler.pipeline import CPU_ATTENTION_TILES, CPU_SPLITS
from sparkinfer.compiler.targets import target_for
from sparkinfer.data import default_model_path
from sparkinfer.gguf_file.reader import GGUFModel
from sparkinfer.model.qwen3moe import build_decode_step
from sparkinfer.schedule.arch import arch_facts
from sparkinfer.schedule.space import schedule_kernel

SYMBOLIC_EXTENT = 16  # the KV caches' page count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--splits", type=int, default=CPU_SPLITS)
    p.add_argument("only", nargs="*", help="time only kernels whose name contains one of these")
    args = p.parse_args()
    model = GGUFModel.open(default_model_path())
    types = {n: i.ggml_type for n, i in model.tensors.items()}
    step = build_decode_step(model.config, types, n_splits=args.splits, attention_tiles=CPU_ATTENTION_TILES)
    facts, dev = arch_facts("cpu"), tvm.cpu()
    for use in step.kernels:
        if args.only and not any(o in use.name for o in args.only):
            continue
        func = step.originals[use.name]
        inputs = [tvm.runtime.tensor(np.zeros([int(d) if isinstance(d, (int, tvm.tirx.IntImm)) else SYMBOLIC_EXTENT
                                               for d in p.shape], p.dtype), dev) for p in func.params]
        builds = {name: tvm.compile(tvm.IRModule({"main": f}), target=target_for("cpu"))
                  for name, f in (("unscheduled", func), ("default", schedule_kernel(func, use, facts)))}
        times: dict[str, list[float]] = {name: [] for name in builds}
        for _ in range(3):
            for name, lib in builds.items():
                times[name] += lib.mod.time_evaluator("main", dev, number=20, repeat=3)(*inputs).results
        print(f"{use.name:48s} unscheduled {np.median(times['unscheduled']) * 1e6:8.1f} us  "
              f"default {np.median(times['default']) * 1e6:8.1f} us", flush=True)


if __name__ == "__main__":
    main()
