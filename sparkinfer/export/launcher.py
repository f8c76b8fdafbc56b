"""Run the model of this folder, made by `sparkinfer export`:

    python run.py -p "def fibonacci(n):" -n 64          (options: python run.py --help)

Needs Python, numpy, tokenizers and jinja2. TVM's runtime (no compiler), the SparkInfer
runtime and the GGUF reader are in site/ beside this file; the compiled module in module/.
(In the SparkInfer package this is sparkinfer/export/launcher.py, copied here as run.py.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def platform_problem(info: dict) -> str | None:
    """Why this Python cannot run the folder (its TVM holds compiled extensions), or None."""
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    if info["python"] != python or info["machine"] != platform.machine():
        return (f"this folder was exported for Python {info['python']} on {info['machine']}, this is Python {python} "
                f"on {platform.machine()}: export it again on a machine like the target")
    return None


def main(argv: list[str] | None = None) -> int:
    info = json.loads((HERE / "bundle.json").read_text())
    problem = platform_problem(info)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    # site/ first: its runtime-only tvm and its sparkinfer, whatever else is installed.
    sys.path.insert(0, str(HERE / info["site"]))
    os.environ["TVM_USE_RUNTIME_LIB"] = "1"
    from sparkinfer.errors import SparkInferError
    from sparkinfer.runtime.cli_run import add_arguments, run

    parser = argparse.ArgumentParser(prog="run.py", description=f"Generate with the exported {info['arch']} module.")
    add_arguments(parser)
    parser.set_defaults(arch=info["arch"], module=HERE / info["module"],
                        model=HERE / info["model"] if info["model"] else None)
    args = parser.parse_args(argv)
    try:
        if args.model is None:
            raise SparkInferError("this folder was exported without its model: give the .gguf file, "
                                  "python run.py MODEL.gguf -p ...")
        return run(args)
    except SparkInferError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
