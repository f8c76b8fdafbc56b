"""The sampler's two kernels (sample_candidates, then sample_token) on the CPU, scheduled by
their CPU rules, per sampling setting: time_evaluator medians on random logits, V = 151936
(Qwen3's vocabulary), and the path each setting takes.

    TVM_NUM_THREADS=2 PYTHONPATH=. python3 bench/sampler_cpu.py

bench/NOTES.md ("Multi-block sampler v2") has the numbers.
"""

from __future__ import annotations

import numpy as np
import tvm

from sparkinfer.compiler.targets import target_for
from sparkinfer.kernels import sampling as S
from sparkinfer.schedule.arch import arch_facts
from sparkinfer.schedule.space import kernel_use, schedule_kernel

VOCAB = 151936
# (temperature, top_p, top_k): greedy; temperature only; chat defaults; top-k only; top-p only.
SETTINGS = [(0.0, 1.0, 0.0), (1.0, 1.0, 0.0), (0.6, 0.95, 20.0), (1.0, 1.0, 40.0), (1.0, 0.9, 0.0)]


def main() -> None:
    facts, dev = arch_facts("cpu"), tvm.cpu()
    funcs = {name: schedule_kernel(getattr(S, name)(VOCAB), kernel_use("sampling", name, VOCAB), facts)
             for name in ("sample_candidates", "sample_token")}
    libs = {name: tvm.compile(tvm.IRModule({"main": f}), target=target_for("cpu")) for name, f in funcs.items()}
    blocks = S.slices(VOCAB, S.SLICE)
    logits = tvm.runtime.tensor((np.random.default_rng(1).standard_normal(VOCAB) * 2).astype(np.float32), dev)
    rng = tvm.runtime.tensor(np.array([1, 2], np.uint32), dev)
    best = tvm.runtime.tensor(np.zeros(blocks, np.uint64), dev)
    cand = tvm.runtime.tensor(np.zeros((blocks, S.K_MAX), np.uint64), dev)
    out, path = (tvm.runtime.tensor(np.zeros(1, np.int32), dev) for _ in range(2))
    for setting in SETTINGS:
        params = tvm.runtime.tensor(np.array(setting, np.float32), dev)
        args = {"sample_candidates": (logits, params, rng, best, cand),
                "sample_token": (logits, params, rng, best, cand, out, path)}
        times = {name: np.median(lib.mod.time_evaluator("main", dev, number=10, repeat=5)(*args[name]).results)
                 for name, lib in libs.items()}
        print(f"T {setting[0]} top_p {setting[1]} top_k {setting[2]:4.0f}: path {int(path.numpy()[0])}  "
              + "  ".join(f"{name} {t * 1e3:7.3f} ms" for name, t in times.items()), flush=True)


if __name__ == "__main__":
    main()
