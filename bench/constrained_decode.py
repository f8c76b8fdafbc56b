"""Decode speed with and without logits processing: plain, penalties, and a JSON schema
(llguidance's token mask computed on the host each token, written to the step's `token_mask`).

Each run decodes --tokens tokens after a chat prompt (temperature 1, seed 1, no stop token),
the schema long enough never to end first (an array of 30 objects); reported per mode: the
median over --reps runs, after one warm-up, of decode tok/s (`GenerationStats`, the tokens
after the first) and of the host time per token spent computing and writing the mask
(`GenerationStats.mask_s`). The modes run interleaved (plain first and last) so a drift of
the machine's load shows.

    python bench/constrained_decode.py                  # shipped model, GPU if any else CPU
    python bench/constrained_decode.py model.gguf --arch sm_90 --tokens 128 --reps 9
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCHEMA = {"type": "object", "required": ["items"], "properties": {"items": {
    "type": "array", "minItems": 30, "maxItems": 30, "items": {
        "type": "object", "required": ["sku", "qty"],
        "properties": {"sku": {"type": "string", "maxLength": 400}, "qty": {"type": "integer"}}}}}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--arch")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()

    import sparkinfer
    from sparkinfer.runtime.processing import LogitsProcessing

    llm = sparkinfer.load(args.model, arch=args.arch)
    prompt = llm.prompt_tokens([{"role": "user", "content": "Reply in JSON."}])

    def run(processing: LogitsProcessing | None) -> tuple[float, float]:
        gen = llm.engine.generate(prompt, args.tokens, temperature=1.0, seed=1, stop_tokens=(), processing=processing)
        n = len(gen.all())
        return gen.stats.decode_tokens_per_s, gen.stats.mask_s / n

    modes: list[tuple[str, Callable[[], Any]]] = [
        ("plain", lambda: None),
        ("penalties", lambda: LogitsProcessing(presence=0.5, frequency=0.5)),
        ("json_schema", lambda: LogitsProcessing(constraint=llm.grammars.json_schema(SCHEMA).constraint())),
        ("plain", lambda: None),
    ]
    print(f"{llm.name} on {llm.engine.arch}, {args.tokens} tokens, median of {args.reps}")
    for name, make in modes:
        run(make())
        results = [run(make()) for _ in range(args.reps)]
        tok_s = statistics.median(r[0] for r in results)
        mask_us = statistics.median(r[1] for r in results) * 1e6
        print(f"  {name:12s} {tok_s:8.1f} tok/s   mask {mask_us:7.1f} us/token")


if __name__ == "__main__":
    main()
