"""`sparkinfer serve`: load a model and serve the OpenAI-compatible API (arguments registered by
`sparkinfer.cli._add_serve`)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model and device options `serve` and `chat` share with `run`."""
    p.add_argument("model", type=Path, nargs="?", help="a .gguf file (default: the small model shipped in the package)")
    p.add_argument("--arch", help="sm_90, sm_120, sm_121 or cpu (default: the GPU found, else cpu)")
    p.add_argument("--ctx", type=int, help="KV cache size in tokens (default: the model's context_length, "
                   "or what fits in memory)")
    p.add_argument("--module", type=Path, help="a compiled module directory to use (default: search compiled/ "
                   "and the cache, compiling into the cache if missing)")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                   help="call the VM per step instead of replaying a CUDA graph (debugging)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    p.add_argument("--model-name", help="the id in /v1/models and responses (default: the GGUF's general.name)")
    p.add_argument("--queue-size", type=int, default=16,
                   help="requests that may wait behind the one running; more get 503 (default: 16)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def load_model(args: argparse.Namespace):  # noqa: ANN201
    import sparkinfer

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    return sparkinfer.load(args.model, arch=args.arch, context=args.ctx, module_dir=args.module,
                           cuda_graph=args.cuda_graph, progress=sys.stderr.isatty(), log=log)


def run(args: argparse.Namespace) -> int:
    from sparkinfer.errors import SparkInferError
    from sparkinfer.server import serve

    if args.queue_size < 0:
        raise SparkInferError(f"--queue-size must be >= 0, got {args.queue_size}")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    llm = load_model(args)
    try:
        print(f"serving {args.model_name or llm.name} ({llm.engine.arch}, context {llm.context} tokens) on "
              f"http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
        serve(llm, args.host, args.port, model_name=args.model_name, queue_size=args.queue_size,
              log_level=args.log_level)
    finally:
        llm.close()
    return 0


__all__ = ["add_arguments", "add_model_arguments", "load_model", "run"]
