"""Prebuild the runtime tests' models and modules for GPU machines (which carry runtime-only
TVM and cannot compile). `python -m tests.gpu_prebuild --arch sm_90` calls `build` with every
other GPU test's library; alone:

    python -m tests.runtime.prebuild --arch sm_90 [--out DIR]   # on a machine with full TVM + nvcc
    # then on the GPU machine, with compiled/ carried along:
    SPARKINFER_TEST_MODULES=$PWD/compiled/gpu-tests/sm_90/runtime python3 -m pytest -m gpu tests/runtime

Writes into --out (default: $SPARKINFER_TEST_MODULES, else compiled/gpu-tests/<arch>/runtime/, as
tests.gpu_prebuild does): toy.gguf, real.gguf, toy/<arch>/ (the toy step) and <arch>/<key>/ (the
real step of the tiny decisive model).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from tests.gpu_prebuild import gpu_tests_dir
from tests.runtime import toy_step
from tests.runtime.conftest import TOY_CONFIG, build_real_module, write_real_model, write_toy_model


def build(arch: str, out: Path) -> list[str]:
    """The two models and both steps for `arch` under `out`; returns what it wrote."""
    out.mkdir(parents=True, exist_ok=True)
    written = [str(write_toy_model(out / "toy.gguf")), str(write_real_model(out / "real.gguf"))]
    written.append(str(toy_step.build(TOY_CONFIG, arch, out / "toy" / arch)))
    try:
        directory = build_real_module(out / "real.gguf", arch, out)
    except Exception as e:  # the model's GPU build may not be ready: the toy still serves
        print(f"{arch}: the real step did not build ({type(e).__name__}: {str(e).strip().splitlines()[-1]}); "
              f"its GPU tests will skip")
    else:
        written.append(str(directory))
    return written


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", action="append", required=True, help="sm_90, sm_120, sm_121 or cpu; repeatable")
    parser.add_argument("--out", type=Path, help="default: $SPARKINFER_TEST_MODULES, else compiled/gpu-tests/<arch>/runtime")
    args = parser.parse_args()
    env = os.environ.get("SPARKINFER_TEST_MODULES")
    for arch in args.arch:
        t0 = time.perf_counter()
        out = args.out or (Path(env) if env else gpu_tests_dir(arch) / "runtime")
        for path in build(arch, out):
            print(f"{arch}: {path}")
        print(f"{arch}: {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
