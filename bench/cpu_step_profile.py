"""One CPU decode step of the default model at depth 128, per VM instruction: each kernel's and
each VM builtin's time per step (a `vm.set_instrument` hook around every call, which adds a
Python callback's few microseconds to each), next to the plain step time.

    PYTHONPATH=. SPARKINFER_CACHE=/tmp/cache python3 bench/cpu_step_profile.py [MODULE_DIR]

MODULE_DIR: a compiled module (e.g. `sparkinfer compile ... --schedules FILE --out DIR`'s) to
profile instead of the one the engine finds for the default model.

bench/NOTES.md has the numbers.
"""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path
from typing import Any

import numpy as np
import tvm

from sparkinfer.data import default_model_path
from sparkinfer.runtime.engine import Engine

REPS = 10


def decode_step_at(module: Path | None, depth: int) -> tuple[Engine, Any, Any]:
    """(engine, its module's VM, the VM's decode step) of the default model's cpu module in
    `module` (None: the engine's), the cache holding `depth` tokens; call the step with
    `engine.args` (each call appends a token: `pos` advances)."""
    engine = Engine(default_model_path(), arch="cpu", module_dir=module)
    engine.forward([1 + i % 1000 for i in range(depth)])
    vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(engine.manifest.library)), tvm.cpu())
    return engine, vm, vm[engine.manifest.entry]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("module", type=Path, nargs="?", help="a compiled module directory (default: the engine's)")
    engine, vm, step = decode_step_at(parser.parse_args().module, 128)
    for _ in range(3):
        step(*engine.args)
    plain = []
    for _ in range(30):
        start = time.perf_counter()
        step(*engine.args)
        plain.append(time.perf_counter() - start)
    spent: dict[str, list[float]] = collections.defaultdict(list)
    started = [0.0]

    def instrument(func: Any, name: str, before: bool, ret: Any, *args: Any) -> int:
        if before:
            started[0] = time.perf_counter()
        else:
            spent[name].append(time.perf_counter() - started[0])
        return 0

    vm.set_instrument(instrument)
    for _ in range(REPS):
        step(*engine.args)
    print(f"plain step: median {np.median(plain) * 1e3:.3f} ms ({1 / np.median(plain):.0f} tok/s)")
    rows = sorted(((sum(v) / REPS, len(v) // REPS, k) for k, v in spent.items()), reverse=True)
    for seconds, calls, name in rows:
        print(f"{seconds * 1e6:9.1f} us  {calls:3d} calls  {name}")
    print(f"sum: {sum(r[0] for r in rows) * 1e3:.3f} ms; instructions per step: {sum(r[1] for r in rows)}")


if __name__ == "__main__":
    main()
