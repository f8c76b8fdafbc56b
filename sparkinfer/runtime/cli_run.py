"""`sparkinfer run`: generate from a prompt, streaming text, or one JSON object with --json.

The argument parsing lives in `sparkinfer.cli` (`_add_run`); this is the handler, kept here so
the CLI module stays small and TVM is imported only when a model runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, nargs="?", help="a .gguf file (default: the small model shipped in the package)")
    p.add_argument("-p", "--prompt", default="Hello", help="the prompt text")
    p.add_argument("-n", "--max-tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 is greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0: all")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arch", help="sm_90, sm_120, sm_121 or cpu (default: the GPU found, else cpu)")
    p.add_argument("--ctx", type=int, help="KV cache size in tokens (default: the model's context_length, "
                   "or what fits in memory)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--no-stream", dest="stream", action="store_false",
                   help="bench mode: launch every step before reading tokens back (stop tokens ignored)")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                   help="call the VM per step instead of replaying a CUDA graph (debugging)")
    p.add_argument("--module", type=Path, help="a compiled module directory to use (default: search compiled/ "
                   "and the cache, compiling into the cache if missing)")


def run(args: argparse.Namespace) -> int:
    from sparkinfer.data import default_model_path
    from sparkinfer.runtime.engine import Engine
    from sparkinfer.sampling_params import (PATH_NAMES, PATH_ONE_BLOCK, SAMPLER_K_MAX, check_max_tokens,
                                            check_sampling, sampler_path)
    from sparkinfer.tokenizer import StreamDecoder

    check_sampling(temperature=args.temp, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    check_max_tokens(args.max_tokens)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    model_path = args.model or default_model_path()
    engine = Engine(model_path, arch=args.arch, context=args.ctx, module_dir=args.module, cuda_graph=args.cuda_graph,
                    progress=sys.stderr.isatty() and not args.json, log=log)
    try:
        tok = engine.tokenizer
        text_in = args.prompt
        if args.chat:
            text_in = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
        prompt_ids = tok.encode(text_in)
        path = sampler_path(args.temp, args.top_p, args.top_k, engine.config.vocab_size)
        if path == PATH_ONE_BLOCK:
            log(f"sampling: top-p without top-k, or top-k above {SAMPLER_K_MAX}, draws with the one-block sampler "
                f"(the slow path: bisections over the whole vocabulary; top-k <= {SAMPLER_K_MAX} takes the fast one)")
        gen = engine.generate(prompt_ids, args.max_tokens, temperature=args.temp, top_p=args.top_p, top_k=args.top_k,
                              seed=args.seed, stream=args.stream)
        decoder = StreamDecoder(tok)
        pieces: list[str] = []
        for token in gen:
            piece = decoder.push(token)
            pieces.append(piece)
            if not args.json and piece:
                print(piece, end="", flush=True)
        tail = decoder.flush()
        pieces.append(tail)
        stats = gen.stats
        if args.json:
            print(json.dumps(_report(engine, model_path, args, prompt_ids, stats, "".join(pieces), PATH_NAMES[path])))
        else:
            print(tail, flush=True)
            log(_summary(engine, stats))
    finally:
        engine.close()
    return 0


def _report(engine: Any, model_path: Path, args: argparse.Namespace, prompt_ids: list[int], stats: Any,
            text: str, sampler: str) -> dict[str, Any]:
    """`sampler`: the sampling kernels' path for these settings (kernels/sampling.py, PATH_NAMES)."""
    info = engine.describe()
    return {
        "model": str(model_path),
        "prompt": args.prompt,
        "prompt_ids": prompt_ids,
        "generated_ids": stats.tokens,
        "text": text,
        "stop_reason": stats.stop_reason,
        "arch": engine.arch,
        "device": info["device"],
        "cuda_graph": info["cuda_graph"],
        "context": info["context"],
        "sampling": {"temperature": args.temp, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed,
                     "sampler": sampler},
        "timings": {"load_s": engine.load_s, **stats.to_json()},
    }


def _summary(engine: Any, stats: Any) -> str:
    return (f"[{engine.arch} on {engine.device.describe()}{', CUDA graph' if engine.cuda_graph else ''}] "
            f"load {engine.load_s:.2f} s; prefill {stats.prompt_tokens - stats.reused_tokens} tokens in "
            f"{stats.prefill_s * 1e3:.1f} ms; decode {len(stats.tokens)} tokens, "
            f"{stats.decode_tokens_per_s:.1f} tok/s ({stats.stop_reason})")


__all__ = ["add_arguments", "run"]
