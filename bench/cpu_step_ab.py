"""Compiled CPU decode steps of the default model, timed interleaved in one process: each round
times a few steps of every module in turn, so that this VM's drifts of +-30 % (bench/NOTES.md,
"Session 26") fall on all of them alike. Prints each module's median step and, per module after
the first, the median of its per-round ratio to the first.

    PYTHONPATH=. python3 bench/cpu_step_ab.py MODULE_DIR MODULE_DIR... [--depth 128] [--rounds 200]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from cpu_step_profile import decode_step_at

STEPS_PER_ROUND = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", type=Path, nargs="+", help="compiled module directories")
    parser.add_argument("--depth", type=int, default=128, help="tokens in the cache before the timed steps")
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    steps = []
    for module in args.modules:
        engine, _, step = decode_step_at(module, args.depth)
        step_args = engine.args
        for _ in range(10):
            step(*step_args)
        steps.append((step, step_args, engine.kv.arrays["pos"], engine.kv.arrays["pos"].numpy()))
    times = np.zeros((args.rounds, len(steps)))
    for r in range(args.rounds):
        for m, (step, step_args, pos, depth) in enumerate(steps):
            pos.copyfrom(depth)  # each step appends a token: every round decodes at the same depths
            start = time.perf_counter()
            for _ in range(STEPS_PER_ROUND):
                step(*step_args)
            times[r, m] = (time.perf_counter() - start) / STEPS_PER_ROUND
    for m, module in enumerate(args.modules):
        line = f"{module}: median {np.median(times[:, m]) * 1e6:.1f} us a step ({1 / np.median(times[:, m]):.0f} tok/s)"
        if m:
            ratio = times[:, m] / times[:, 0]
            line += f", {np.median(ratio):.3f}x the first's time (quartiles {np.quantile(ratio, 0.25):.3f}-{np.quantile(ratio, 0.75):.3f})"
        print(line)


if __name__ == "__main__":
    main()
