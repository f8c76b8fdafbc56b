"""Prebuild the runtime tests' models and modules for GPU machines (which carry runtime-only
TVM and cannot compile):

    python -m tests.runtime.prebuild --arch sm_90            # on a machine with full TVM + nvcc
    # then on the GPU machine, with compiled/ carried along:
    SPARKINFER_TEST_MODULES=compiled/runtime-tests python3 -m pytest -m gpu tests/runtime

Writes into --out (default compiled/runtime-tests/): toy.gguf, real.gguf, toy/<arch>/ (the toy
step) and <arch>/<key>/ (the real step of the tiny decisive model).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tests.runtime import toy_step
from tests.runtime.conftest import TOY_CONFIG, build_real_module, prebuilt_root, write_real_model, write_toy_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", action="append", required=True, help="sm_90, sm_120, sm_121 or cpu; repeatable")
    parser.add_argument("--out", type=Path, default=prebuilt_root())
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    toy, real = write_toy_model(out / "toy.gguf"), write_real_model(out / "real.gguf")
    for arch in args.arch:
        t0 = time.perf_counter()
        toy_step.build(TOY_CONFIG, arch, out / "toy" / arch)
        print(f"{arch}: toy step in {out / 'toy' / arch}")
        try:
            directory = build_real_module(real, arch, out)
        except Exception as e:  # the model's GPU build may not be ready: the toy still serves
            print(f"{arch}: the real step did not build ({type(e).__name__}: {str(e).strip().splitlines()[-1]}); "
                  f"its GPU tests will skip")
        else:
            print(f"{arch}: real step in {directory}")
        print(f"{arch}: {time.perf_counter() - t0:.1f} s")
    print(f"models: {toy}, {real}")


if __name__ == "__main__":
    main()
