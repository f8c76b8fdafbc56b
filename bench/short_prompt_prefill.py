"""Short prompts: time to first token through the T-token step against the decode step's token
loop, for a few new-token counts (where `engine.MIN_CHUNKED_TOKENS` should sit).

    PYTHONPATH=. python3 bench/short_prompt_prefill.py [--arch cpu] [--model PATH] [--reps 9]

Each count: `reps` random prompts each way (`engine.generate(prompt, 1)`'s prefill time, the
first two dropped as warm-up), median printed. The module needs T-token steps (the CPU's default
has 128; on a GPU compile one with `sparkinfer compile --prefill-chunks` and pass --module).
bench/NOTES.md has the numbers.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

from sparkinfer.data import default_model_path
from sparkinfer.runtime import engine as engine_mod
from sparkinfer.runtime.engine import Engine

COUNTS = (4, 8, 12, 16, 24, 32)
WARMUP = 2


def prefill_ms(engine: Engine, n: int, reps: int, rng: np.random.Generator) -> float:
    times = []
    for _ in range(reps):
        prompt = rng.integers(0, engine.config.vocab_size, n).tolist()
        gen = engine.generate(prompt, 1, stop_tokens=())
        gen.all()
        times.append(gen.stats.prefill_s * 1e3)
    return statistics.median(times[WARMUP:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="cpu")
    ap.add_argument("--model", default=str(default_model_path()))
    ap.add_argument("--module", default=None, help="a compiled module's directory (default: the engine's search)")
    ap.add_argument("--reps", type=int, default=9)
    args = ap.parse_args()
    engine = Engine(args.model, arch=args.arch, module_dir=args.module)
    if not engine.manifest.prefill_chunks:
        raise SystemExit(f"{engine.manifest.library.parent}: no T-token step to compare (compile with --prefill-chunks)")
    rng = np.random.default_rng(0)
    chosen = engine_mod.MIN_CHUNKED_TOKENS
    try:
        for n in COUNTS:
            row = {}
            for label, threshold in (("chunk", 0), ("token loop", n + 1)):
                engine_mod.MIN_CHUNKED_TOKENS = threshold  # 0: always chunks; n + 1: never for n tokens
                row[label] = prefill_ms(engine, n, args.reps, rng)
            print(f"{n:3d} new tokens: a {min(engine.manifest.prefill_chunks)}-chunk {row['chunk']:.2f} ms, "
                  f"token loop {row['token loop']:.2f} ms")
    finally:
        engine_mod.MIN_CHUNKED_TOKENS = chosen
    print(f"MIN_CHUNKED_TOKENS is {chosen}")


if __name__ == "__main__":
    main()
