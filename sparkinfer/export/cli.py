"""`sparkinfer export`: the arguments and the handler (registered by `sparkinfer.cli._add_export`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", type=Path, metavar="DIR", help="the folder to write (new or empty)")
    p.add_argument("model", type=Path, nargs="?", help="a .gguf file (default: the small model shipped in the package)")
    p.add_argument("--arch", required=True, help="the target's arch: sm_90, sm_120, sm_121 or cpu")
    p.add_argument("--module", type=Path, help="a compiled module directory to use (default: search compiled/ "
                   "and the cache, compiling into the cache if missing)")
    p.add_argument("--no-model", dest="include_model", action="store_false",
                   help="leave the model out (run.py then takes its path: python DIR/run.py MODEL.gguf -p ...)")


def run(args: argparse.Namespace) -> int:
    from sparkinfer.data import default_model_path
    from sparkinfer.export.bundle import export_bundle

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    bundle = export_bundle(args.out, args.model or default_model_path(), args.arch, module_dir=args.module,
                           include_model=args.include_model, log=log)
    model = (f" + the model {bundle.model.name} ({bundle.model_bytes / 2**20:.1f} MiB)" if bundle.model is not None
             else " (no model: give its path to run.py)")
    print(f"{bundle.directory}: {bundle.arch} runtime {bundle.runtime_bytes / 2**20:.1f} MiB{model}; "
          f"run it with: python {bundle.directory / 'run.py'} -p \"...\"")
    return 0


__all__ = ["add_arguments", "run"]
