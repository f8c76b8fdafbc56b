"""`sparkinfer bench`: decode speed measured like llama-bench's tg<gen> at depth d, prefill like
its pp<N> with the time to first token, and (--compare llama.cpp) the same tests through
llama.cpp on the same file, side by side (sparkinfer/runtime/llama_cpp_compare.py).

Decode at depth d (llama-bench `-p 0 -n <gen> -d <d>`): the context is filled with d random
prompt tokens by prefill, then `gen` decode steps are timed, at positions d .. d+gen-1.
  - default, the Engine's bench mode (`generate(stream=False)`): every step is launched before
    any token is read (CUDA graph replays, no host synchronisation per token), timed by CUDA
    events around the steps (host clocks on the CPU);
  - --sync-every-token: the host reads each token before it launches the next step (lookahead
    0), as llama-bench synchronises after every llama_decode; timed by host clocks.
Per depth, the fill is the warm-up rep (its time to first token is reported as `fill`), then
each of `reps` timed reps keeps the cached prefix, runs the prompt's last token again and times
the same `gen` steps.

Prefill (pp<N> for each N of --prompts, llama-bench `-p N -n 0`): N random tokens from an empty
cache until the first generated token is on the host (host clock, both modes: the time to first
token a caller waits), one warm-up rep, then `reps` timed. This times whatever the Engine's
prompt path does (the decode step in a token loop, or a batched prefill step where the module
has one), so a faster prefill shows here without changes to this file.
Numbers are the median over reps, with min and max.
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

# llama-bench's pp sizes of the prefill issue; tg at a short context.
DEFAULT_PROMPTS = (512,)
DEFAULT_DEPTHS = (128,)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, nargs="?", help="a .gguf file (default: the small model shipped in the package)")
    p.add_argument("--arch", help="sm_90, sm_120, sm_121 or cpu (default: the GPU found, else cpu)")
    p.add_argument("--prompts", type=_sizes, help="comma-separated prompt sizes for the prefill test (pp), e.g. "
                   f"512,4096,16384 (default: {','.join(map(str, DEFAULT_PROMPTS))}, those of them the model's "
                   "context holds)")
    p.add_argument("--gen", type=int, default=128, help="decode steps timed per rep (tg; default 128)")
    p.add_argument("--depths", type=_sizes, help="comma-separated context depths for the decode test (tg), e.g. "
                   f"128,512,4096,16384 (default: {','.join(map(str, DEFAULT_DEPTHS))})")
    p.add_argument("--reps", type=int, default=5, help="timed reps per test, after one warm-up rep (default 5)")
    p.add_argument("--sync-every-token", action="store_true",
                   help="the host reads each token before the next step is launched (llama-bench's way)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt tokens")
    p.add_argument("--module", type=Path, help="a compiled module directory (default: search compiled/ and the cache)")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                   help="call the VM per step instead of replaying a CUDA graph")
    p.add_argument("--compare", choices=["llama.cpp"],
                   help="run the same tests through llama.cpp on the same file and print both side by side with "
                   "the ratio (llama-cpp-python's binding, or the llama-bench of --llama-bench)")
    p.add_argument("--llama-bench", type=Path, metavar="PATH",
                   help="with --compare llama.cpp: a llama-bench binary (run here with -o json), or a .json file of "
                   "its -o json output recorded earlier")
    p.add_argument("--json", action="store_true", help="print one JSON object with every number instead of a table")


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(d) for d in text.split(",") if d.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not sizes:
        raise argparse.ArgumentTypeError("give at least one size")
    return sizes


def _summary(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _finish(gen: Any) -> Any:
    for _ in gen:
        pass
    return gen.stats


def bench(engine: Any, *, prompts: Sequence[int] = DEFAULT_PROMPTS, gen: int = 128,
          depths: Sequence[int] = DEFAULT_DEPTHS, reps: int = 5, sync_every_token: bool = False, seed: int = 0,
          log: Log | None = None) -> dict[str, Any]:
    """Run the prefill and decode tests on a loaded `Engine`; returns every number (see the
    module docstring). The engine's context must hold `needed_context(prompts, depths, gen)`."""
    import numpy as np

    log = log or (lambda message: None)
    prompts, depths = sorted(prompts), sorted(depths)
    _check_sizes(prompts, depths, gen, reps)
    need = needed_context(prompts, depths, gen)
    if need > engine.capacity:
        raise SparkInferError(f"the tests need a context of {need} tokens: the KV cache holds {engine.capacity}")
    stream = bool(sync_every_token)
    saved_lookahead = engine.lookahead
    if sync_every_token:
        engine.lookahead = 0
    vocab = engine.config.vocab_size
    tokens = [int(t) for t in np.random.default_rng(seed).integers(0, vocab, max(prompts + depths))]
    timed_on_device = False
    try:
        prefill = [_prefill(engine, tokens[:n], reps, log) for n in prompts]
        decode = []
        for depth in depths:
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
    return {
        "mode": "sync-every-token" if sync_every_token else "device-loop",
        "timer": "cuda-events" if timed_on_device else "host-clock",
        "gen": gen,
        "prompts": prompts,
        "depths": depths,
        "reps": reps,
        "warmup_reps": 1,
        "seed": seed,
        "prefill": prefill,
        "decode": decode,
    }


def _prefill(engine: Any, prompt: list[int], reps: int, log: Log) -> dict[str, Any]:
    """pp<len(prompt)>: from an empty cache to the first token on the host, host clock."""
    seconds = []
    for rep in range(reps + 1):
        stats = _finish(engine.generate(prompt, 1, stop_tokens=(), stream=True))
        if rep:
            seconds.append(stats.prefill_s)
    n = len(prompt)
    tok_s = [n / s for s in seconds]
    summary = _summary(tok_s)
    log(f"pp{n}: {summary['median']:.1f} tok/s, first token after {n / summary['median']:.3f} s")
    return {
        "tokens": n,
        "ms": [s * 1e3 for s in seconds],
        "tok_s": tok_s,
        "tok_s_median": summary["median"],
        "tok_s_min": summary["min"],
        "tok_s_max": summary["max"],
        "ttft_ms_median": n / summary["median"] * 1e3,
    }


def needed_context(prompts: Sequence[int], depths: Sequence[int], gen: int) -> int:
    """KV cache tokens the tests need: the longest prompt or depth, then its generated tokens."""
    return max([n + 1 for n in prompts] + [d + gen + 1 for d in depths])


def _check_sizes(prompts: Sequence[int], depths: Sequence[int], gen: int, reps: int) -> None:
    if min(gen, reps, *prompts, *depths) < 1:
        raise SparkInferError("--prompts, --gen, --reps and every depth must be >= 1")


def plan_sizes(prompts: Sequence[int] | None, depths: Sequence[int] | None, gen: int, reps: int,
               model_context: int, log: Log) -> tuple[list[int], list[int]]:
    """The prompt sizes and depths to run: the defaults clipped to what the model's context
    holds (saying what was left out; no prefill test when no default prompt fits), sizes given
    explicitly refused when they do not fit."""
    chosen_prompts = sorted(prompts or DEFAULT_PROMPTS)
    chosen_depths = sorted(depths or DEFAULT_DEPTHS)
    _check_sizes(chosen_prompts, chosen_depths, gen, reps)
    too_long = [n for n in chosen_prompts if n + 1 > model_context]
    too_deep = [d for d in chosen_depths if d + gen + 1 > model_context]
    if prompts and too_long:
        raise SparkInferError(f"--prompts {','.join(map(str, too_long))}: each prompt + 1 generated token must fit in "
                              f"the model's context of {model_context} tokens")
    if depths and too_deep:
        raise SparkInferError(f"--depths {','.join(map(str, too_deep))}: each depth + {gen + 1} tokens must fit in the "
                              f"model's context of {model_context} tokens")
    left_out = [f"pp{n}" for n in too_long] + [f"tg{gen} @ d{d}" for d in too_deep]
    if left_out:
        log(f"left out of the default tests: {', '.join(left_out)} (the model's context holds {model_context} tokens)")
    chosen_prompts = [n for n in chosen_prompts if n not in too_long]
    chosen_depths = [d for d in chosen_depths if d not in too_deep]
    if not chosen_depths:
        raise SparkInferError(f"the model's context of {model_context} tokens holds none of the default depths: "
                              "give --depths (and --gen) that fit")
    return chosen_prompts, chosen_depths


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
    """The human-readable result: a header line, then one row per test. `first-token ms`: the
    median time to first token for pp, the fill's (the warm-up rep's) for tg."""
    head = (f"{report['model_name'] or Path(report['model']).name} | {report['card']} | {report['arch']} | "
            f"module {report['module_key']} | TVM {report['tvm_version']} | {report['mode']}, {report['timer']}"
            f"{', CUDA graph' if report['cuda_graph'] else ''} | median of {report['reps']} reps after 1 warm-up")
    rows = [("test", "depth", "tok/s", "ms/token", "min tok/s", "max tok/s", "first-token ms")]
    for pp in report["prefill"]:
        rows.append((f"pp{pp['tokens']}", "0", f"{pp['tok_s_median']:.1f}", f"{1e3 / pp['tok_s_median']:.3f}",
                     f"{pp['tok_s_min']:.1f}", f"{pp['tok_s_max']:.1f}", f"{pp['ttft_ms_median']:.1f}"))
    for d in report["decode"]:
        rows.append((f"tg{d['gen']}", str(d["depth"]), f"{d['tok_s_median']:.1f}", f"{d['ms_per_token_median']:.3f}",
                     f"{d['tok_s_min']:.1f}", f"{d['tok_s_max']:.1f}", f"{d['fill_ms']:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join([head, *lines])


def run(args: argparse.Namespace) -> int:
    """The `sparkinfer bench` handler."""
    from sparkinfer.data import default_model_path
    from sparkinfer.gguf_file import GGUFModel
    from sparkinfer.runtime import llama_cpp_compare as llama
    from sparkinfer.runtime.engine import Engine

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if args.llama_bench is not None and args.compare is None:
        raise SparkInferError("--llama-bench PATH is llama.cpp for --compare llama.cpp: give both")
    if args.compare and args.llama_bench is None:
        llama.check_binding()  # before the minutes of SparkInfer's tests, not after them
    model_path = args.model or default_model_path()
    model = GGUFModel.open(model_path)
    prompts, depths = plan_sizes(args.prompts, args.depths, args.gen, args.reps, model.config.context_length, log)
    context = needed_context(prompts, depths, args.gen)
    t0 = time.perf_counter()
    engine = Engine(model, arch=args.arch, context=context, module_dir=args.module, cuda_graph=args.cuda_graph,
                    progress=sys.stderr.isatty() and not args.json, log=log)
    try:
        if engine.capacity < context:
            raise SparkInferError(f"the tests need a context of {context} tokens: this model and device hold "
                                  f"{engine.capacity}")
        log(f"loaded in {time.perf_counter() - t0:.1f} s: {engine.device.describe()}, module {engine.manifest.directory}")
        report = {**describe(engine, model_path),
                  **bench(engine, prompts=prompts, gen=args.gen, depths=depths, reps=args.reps,
                          sync_every_token=args.sync_every_token, seed=args.seed, log=log)}
    finally:
        engine.close()
    if args.compare:
        tests = llama.wanted_tests(prompts, depths, args.gen)
        if args.llama_bench is not None:
            other = llama.run_llama_bench(args.llama_bench, Path(model_path), tests, args.reps, log=log)
        else:
            other = llama.run_binding(Path(model_path), tests, args.reps, seed=args.seed, log=log)
        report["llama_cpp"] = {**other, "side_by_side": llama.side_by_side(report, other)}
    if args.json:
        print(json.dumps(report), flush=True)
    else:
        print(table(report), flush=True)
        if args.compare:
            print("\n" + llama.compare_table(report, report["llama_cpp"]), flush=True)
    return 0


__all__ = ["add_arguments", "bench", "describe", "needed_context", "plan_sizes", "run", "table"]
