"""`sparkinfer bench`: decode speed measured like llama-bench's tg<gen> at depth d, and prefill.

Decode at depth d (llama-bench `-p 0 -n <gen> -d <d>`): the context is filled with d random
prompt tokens by prefill, then `gen` decode steps are timed, at positions d .. d+gen-1.
  - default, the Engine's bench mode (`generate(stream=False)`): every step is launched before
    any token is read (CUDA graph replays, no host synchronisation per token), timed by CUDA
    events around the steps (host clocks on the CPU);
  - --sync-every-token: the host reads each token before it launches the next step (lookahead
    0), as llama-bench synchronises after every llama_decode; timed by host clocks.
Per depth, the fill is the warm-up rep (its prefill time is reported as `fill`), then each of
`reps` timed reps keeps the cached prefix, runs the prompt's last token again and times the
same `gen` steps. Prefill (pp<prompt_tokens>): the prompt from an empty cache, one warm-up
rep, then `reps` timed. Numbers are the median over reps, with min and max.

Prefill is the decode step in a loop (docs/ARCHITECTURE.md), so pp and fill times are that
loop's, not a batched prefill's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from sparkinfer.errors import SparkInferError

Log = Callable[[str], None]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, nargs="?", help="a .gguf file (default: the small model shipped in the package)")
    p.add_argument("--arch", help="sm_90, sm_120, sm_121 or cpu (default: the GPU found, else cpu)")
    p.add_argument("--prompt-tokens", type=int, default=128,
                   help="prefill test size (pp), and the depth when --depths is not given (default 128)")
    p.add_argument("--gen", type=int, default=128, help="decode steps timed per rep (tg; default 128)")
    p.add_argument("--depths", type=_depths, help="comma-separated context depths for the decode test, "
                   "e.g. 128,512,4096,16384 (default: --prompt-tokens)")
    p.add_argument("--reps", type=int, default=5, help="timed reps per test, after one warm-up rep (default 5)")
    p.add_argument("--sync-every-token", action="store_true",
                   help="the host reads each token before the next step is launched (llama-bench's way)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt tokens")
    p.add_argument("--module", type=Path, help="a compiled module directory (default: search compiled/ and the cache)")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                   help="call the VM per step instead of replaying a CUDA graph")
    p.add_argument("--json", action="store_true", help="print one JSON object with every number instead of a table")


def _depths(text: str) -> list[int]:
    try:
        depths = [int(d) for d in text.split(",") if d.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"depths must be comma-separated integers, got {text!r}") from None
    if not depths:
        raise argparse.ArgumentTypeError("give at least one depth")
    return depths


def _summary(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _finish(gen: Any) -> Any:
    for _ in gen:
        pass
    return gen.stats


def bench(engine: Any, *, prompt_tokens: int = 128, gen: int = 128, depths: Sequence[int] | None = None,
          reps: int = 5, sync_every_token: bool = False, seed: int = 0, log: Log | None = None) -> dict[str, Any]:
    """Run the prefill and decode tests on a loaded `Engine`; returns every number (see the
    module docstring). The engine's context must hold max(depths, prompt_tokens) + gen + 1."""
    import numpy as np

    log = log or (lambda message: None)
    depths = list(depths) if depths else [prompt_tokens]
    if prompt_tokens < 1 or gen < 1 or reps < 1 or min(depths) < 1:
        raise SparkInferError("--prompt-tokens, --gen, --reps and every depth must be >= 1")
    need = max(max(depths), prompt_tokens) + gen + 1
    if need > engine.capacity:
        raise SparkInferError(f"depth {max(max(depths), prompt_tokens)} + {gen + 1} tokens need a context of {need}: "
                              f"the KV cache holds {engine.capacity}")
    stream = bool(sync_every_token)
    saved_lookahead = engine.lookahead
    if sync_every_token:
        engine.lookahead = 0
    vocab = engine.config.vocab_size
    tokens = [int(t) for t in np.random.default_rng(seed).integers(0, vocab, max(max(depths), prompt_tokens))]
    timed_on_device = False
    try:
        # Prefill: pp<prompt_tokens> from an empty cache.
        pp_s = []
        for rep in range(reps + 1):
            stats = _finish(engine.generate(tokens[:prompt_tokens], 1, stop_tokens=(), stream=stream))
            if rep:
                pp_s.append(stats.prefill_s)
        pp_tok_s = [prompt_tokens / s for s in pp_s]
        log(f"pp{prompt_tokens}: {statistics.median(pp_tok_s):.1f} tok/s")
        decode = []
        for depth in sorted(depths):
            prompt = tokens[:depth]
            fill = _finish(engine.generate(prompt, gen + 1, stop_tokens=(), stream=stream))
            timed_on_device = timed_on_device or fill.timed_on_device
            runs = [_finish(engine.generate(prompt, gen + 1, stop_tokens=(), stream=stream, reuse_prefix=True))
                    for _ in range(reps)]
            tok_s = [s.decode_steps / s.decode_s for s in runs]
            summary = _summary(tok_s)
            decode.append({
                "depth": depth,
                "gen": gen,
                "fill_ms": fill.prefill_s * 1e3,
                "fill_tok_s": depth / fill.prefill_s if fill.prefill_s > 0 else 0.0,
                "warmup_tok_s": fill.decode_steps / fill.decode_s if fill.decode_s > 0 else 0.0,
                "tok_s": tok_s,
                "tok_s_median": summary["median"],
                "tok_s_min": summary["min"],
                "tok_s_max": summary["max"],
                "ms_per_token_median": 1e3 / summary["median"],
                "reused_tokens": [s.reused_tokens for s in runs],
            })
            log(f"tg{gen} @ d{depth}: {summary['median']:.1f} tok/s (fill {fill.prefill_s:.2f} s)")
    finally:
        engine.lookahead = saved_lookahead
    pp = _summary(pp_tok_s)
    return {
        "mode": "sync-every-token" if sync_every_token else "device-loop",
        "timer": "cuda-events" if timed_on_device else "host-clock",
        "gen": gen,
        "prompt_tokens": prompt_tokens,
        "depths": sorted(depths),
        "reps": reps,
        "warmup_reps": 1,
        "seed": seed,
        "prefill": {
            "tokens": prompt_tokens,
            "ms": [s * 1e3 for s in pp_s],
            "tok_s": pp_tok_s,
            "tok_s_median": pp["median"],
            "tok_s_min": pp["min"],
            "tok_s_max": pp["max"],
            "ms_median": prompt_tokens / pp["median"] * 1e3,
        },
        "decode": decode,
    }


def describe(engine: Any, model_path: Path) -> dict[str, Any]:
    """Where the numbers come from: model, card, arch, module, TVM."""
    from sparkinfer.runtime import device as device_mod

    info = engine.describe()
    manifest = engine.manifest
    return {
        "model": str(model_path),
        "model_name": engine.model.metadata.get("general.name"),
        "card": info["device"],
        "arch": engine.arch,
        "module": str(manifest.directory),
        "module_key": getattr(manifest, "key", None) or Path(manifest.directory).name,
        "tvm_version": str(device_mod.import_tvm().__version__),
        "runtime_only_tvm": info["runtime_only_tvm"],
        "cuda_graph": info["cuda_graph"],
        "context": info["context"],
        "load_s": engine.load_s,
    }


def table(report: dict[str, Any]) -> str:
    """The human-readable result: a header line, then one row per test."""
    head = (f"{report['model_name'] or Path(report['model']).name} | {report['card']} | {report['arch']} | "
            f"module {report['module_key']} | TVM {report['tvm_version']} | {report['mode']}, {report['timer']}"
            f"{', CUDA graph' if report['cuda_graph'] else ''} | median of {report['reps']} reps after 1 warm-up")
    rows = [("test", "depth", "tok/s", "ms/token", "min tok/s", "max tok/s", "fill ms")]
    pp = report["prefill"]
    rows.append((f"pp{pp['tokens']}", "0", f"{pp['tok_s_median']:.1f}", f"{1e3 / pp['tok_s_median']:.3f}",
                 f"{pp['tok_s_min']:.1f}", f"{pp['tok_s_max']:.1f}", f"{pp['ms_median']:.1f}"))
    for d in report["decode"]:
        rows.append((f"tg{d['gen']}", str(d["depth"]), f"{d['tok_s_median']:.1f}", f"{d['ms_per_token_median']:.3f}",
                     f"{d['tok_s_min']:.1f}", f"{d['tok_s_max']:.1f}", f"{d['fill_ms']:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join([head, *lines])


def run(args: argparse.Namespace) -> int:
    """The `sparkinfer bench` handler."""
    from sparkinfer.data import default_model_path
    from sparkinfer.runtime.engine import Engine

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    model_path = args.model or default_model_path()
    depths = args.depths or [args.prompt_tokens]
    if min(args.prompt_tokens, args.gen, args.reps, *depths) < 1:
        raise SparkInferError("--prompt-tokens, --gen, --reps and every depth must be >= 1")
    context = max(max(depths), args.prompt_tokens) + args.gen + 1
    t0 = time.perf_counter()
    engine = Engine(model_path, arch=args.arch, context=context, module_dir=args.module, cuda_graph=args.cuda_graph,
                    progress=sys.stderr.isatty() and not args.json, log=log)
    try:
        if engine.capacity < context:
            raise SparkInferError(f"depth {context - args.gen - 1} + {args.gen + 1} tokens need a context of {context}: "
                                  f"this model and device hold {engine.capacity}")
        log(f"loaded in {time.perf_counter() - t0:.1f} s: {engine.device.describe()}, module {engine.manifest.directory}")
        report = {**describe(engine, model_path),
                  **bench(engine, prompt_tokens=args.prompt_tokens, gen=args.gen, depths=depths, reps=args.reps,
                          sync_every_token=args.sync_every_token, seed=args.seed, log=log)}
    finally:
        engine.close()
    print(json.dumps(report) if args.json else table(report), flush=True)
    return 0


__all__ = ["add_arguments", "bench", "describe", "run", "table"]
