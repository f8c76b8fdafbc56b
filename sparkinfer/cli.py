"""The `sparkinfer` command. Each subcommand is a small `_add_<name>` function that registers its
arguments and handler; add new ones to COMMANDS. Heavy dependencies (TVM) belong in handlers,
imported there, so `--help` and `info` stay fast."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

from gguf import LlamaFileType

from sparkinfer.errors import SparkInferError
from sparkinfer.gguf_file import FILE_TYPES, PRESETS, GGUFModel, ModelConfig, preset_config, synth_model

Handler = Callable[[argparse.Namespace], int]


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe a GGUF model: hyper-parameters, tensor types, sizes")
    p.add_argument("model", type=Path, nargs="?", help="a .gguf file (default: the small model shipped in the package)")
    p.set_defaults(handler=_info)


def _info(args: argparse.Namespace) -> int:
    from sparkinfer.data import default_model_path

    model = GGUFModel.open(args.model or default_model_path())
    c = model.config
    file_type = model.metadata.get("general.file_type")
    rows = [
        ("file", f"{model.path}, {_bytes(model.file_size)}"),
        ("name", str(model.metadata.get("general.name", "-"))),
        ("architecture", c.arch),
        ("file type", _file_type_name(file_type) if isinstance(file_type, int) else "-"),
        ("layers", str(c.n_layers)),
        ("hidden", str(c.hidden)),
        ("attention", f"{c.n_heads} heads, {c.n_kv_heads} kv heads, head_dim {c.head_dim}"),
        ("feed-forward", _ffn_text(c)),
        ("vocabulary", str(c.vocab_size)),
        ("context", str(c.context_length)),
        ("rms_eps, rope_theta", f"{c.rms_eps:g}, {c.rope_theta:g}"),
        ("parameters", f"{_count(c.n_params)} ({c.n_params:,}), {_count(c.n_active_params)} active per token"),
        ("tensors", f"{len(model.tensors)}: " + ", ".join(f"{n} {t}" for t, n in model.type_histogram().items())),
        ("bytes per token", f"{_bytes(model.bytes_per_token())} of weights read per decoded token"),
        ("hparams hash", c.hparams_hash()),
    ]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    return 0


def _ffn_text(c: ModelConfig) -> str:
    if c.is_moe:
        return f"{c.n_experts} experts, top-{c.n_experts_used}, expert ffn {c.expert_ffn}"
    return f"dense, ffn {c.ffn}"


def _file_type_name(value: int) -> str:
    try:
        return LlamaFileType(value).name
    except ValueError:
        return f"unknown ({value})"


def _count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit} ({n:,} bytes)"
    return f"{n} bytes"


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write a random-weight model of a preset's shapes")
    p.add_argument("out", type=Path, help="the .gguf file to write")
    p.add_argument("--preset", choices=list(PRESETS), default="tiny")
    p.add_argument("--type", dest="file_type", choices=list(FILE_TYPES), default="q4_k_m")
    p.add_argument("--layers", type=int, help="override the preset's layer count")
    p.add_argument("--experts", type=int, help="override the expert count (MoE presets)")
    p.add_argument("--experts-used", type=int, help="override the experts used per token (MoE presets)")
    p.add_argument("--context", type=int, help="override the context length")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_synth)


def _synth(args: argparse.Namespace) -> int:
    overrides = {
        field: value
        for field, value in (
            ("n_layers", args.layers),
            ("n_experts", args.experts),
            ("n_experts_used", args.experts_used),
            ("context_length", args.context),
        )
        if value is not None
    }
    config = preset_config(args.preset, **overrides)
    start = time.perf_counter()
    synth_model(args.out, config, args.file_type, seed=args.seed, name=f"sparkinfer-{args.preset}", progress=True)
    elapsed = time.perf_counter() - start
    model = GGUFModel.open(args.out)
    print(f"wrote {args.out}: {len(model.tensors)} tensors, {_bytes(model.file_size)}, in {elapsed:.1f} s")
    return 0


def _chunk_sizes(text: str) -> tuple[int, ...]:
    """`--prefill-chunks`: comma-separated chunk sizes >= 1, or `none`."""
    if text.strip().lower() == "none":
        return ()
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or any(t < 1 for t in sizes):
        raise argparse.ArgumentTypeError(f"expected chunk sizes like 128,512 (each >= 1) or none, got {text!r}")
    return sizes


def _add_compile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compile", help="compile a model's decode step for a GPU arch (or cpu) into compiled/<arch>/<key>/")
    p.add_argument("model", type=Path, help="path to a .gguf file (only its hyper-parameters and tensor types are used)")
    p.add_argument("--arch", required=True, help="sm_90, sm_120, sm_121 or cpu")
    p.add_argument("--out", type=Path, default=Path("compiled"), help="root of compiled modules (default: compiled/)")
    p.add_argument("--force", action="store_true", help="rebuild even if an up-to-date module is there")
    p.add_argument("--schedules", type=Path, default=None,
                   help="schedules file (JSON) with the knobs per kernel (default: the package's for the arch)")
    p.add_argument("--prefill-chunks", type=_chunk_sizes, default=None, metavar="T[,T...]|none",
                   help="the T-token steps to build beside the decode step (default: the arch's, "
                        "cpu 128, the GPUs 128,512; run the result with --module DIR)")

    def run(args: argparse.Namespace) -> int:
        from sparkinfer.compiler.pipeline import compile_model, schedules_summary

        model = GGUFModel.open(args.model)
        types = {name: info.ggml_type for name, info in model.tensors.items()}
        result = compile_model(model.config, types, args.arch, args.out, force=args.force,
                               schedules=args.schedules, prefill_chunks=args.prefill_chunks)
        m = result.manifest
        how = "up to date" if result.cached else f"compiled in {result.seconds:.1f} s"
        print(f"{result.directory}: {how}; {len(m.kernels)} kernels, "
              f"{len(m.inputs)} inputs, page size {m.page_size}, {m.max_pages} pages max, {m.n_splits} splits, "
              f"prefill chunks {', '.join(map(str, m.prefill_chunks)) or 'none (token by token)'}")
        print(schedules_summary(m))
        return 0

    p.set_defaults(handler=run)


def _add_run(sub: argparse._SubParsersAction) -> None:
    from sparkinfer.runtime.cli_run import add_arguments

    p = sub.add_parser("run", help="generate text from a prompt (default model: the one shipped in the package)")
    add_arguments(p)
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from sparkinfer.runtime.cli_run import run

    return run(args)


def _add_chat(sub: argparse._SubParsersAction) -> None:
    from sparkinfer.chat import add_arguments

    p = sub.add_parser("chat", help="chat in the terminal with the model's chat template (/reset, /exit)")
    add_arguments(p)

    def run(args: argparse.Namespace) -> int:
        from sparkinfer.chat import run as chat

        return chat(args)

    p.set_defaults(handler=run)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from sparkinfer.server.cli import add_arguments

    p = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions)")
    add_arguments(p)

    def run(args: argparse.Namespace) -> int:
        from sparkinfer.server.cli import run as serve

        return serve(args)

    p.set_defaults(handler=run)


def _add_accuracy(sub: argparse._SubParsersAction) -> None:
    from sparkinfer.accuracy.cli import add_arguments, run

    p = sub.add_parser("accuracy", help="accuracy gate: the compiled engine against the numpy reference (KL, top-1, "
                       "perplexity, greedy match); exit 3 when over a threshold")
    add_arguments(p)
    p.set_defaults(handler=run)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from sparkinfer.runtime.bench import add_arguments, run

    p = sub.add_parser("bench", help="decode speed like llama-bench's tg128 at context depths, prefill speed and time to "
                       "first token like its pp512; --compare llama.cpp runs the same tests through llama.cpp")
    add_arguments(p)
    p.set_defaults(handler=run)


def _add_export(sub: argparse._SubParsersAction) -> None:
    from sparkinfer.export.cli import add_arguments, run

    p = sub.add_parser("export", help="a self-contained folder that runs the model on a machine without the "
                       "TVM compiler (runtime-only TVM, the compiled module, a launcher run.py)")
    add_arguments(p)
    p.set_defaults(handler=run)


def _add_tune(sub: argparse._SubParsersAction) -> None:
    from sparkinfer.tune.cli import add_arguments

    p = sub.add_parser("tune", help="auto-tune the model's kernel schedules for an arch (MetaSchedule + XGBoost); "
                       "writes tuning_logs/<arch>/ and the package's schedules/<arch>.json")
    add_arguments(p)

    def run(args: argparse.Namespace) -> int:
        from sparkinfer.tune.cli import run as tune

        return tune(args)

    p.set_defaults(handler=run)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_info, _add_synth, _add_compile, _add_run, _add_chat, _add_serve, _add_accuracy, _add_bench, _add_export,
    _add_tune]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparkinfer", description="Batch-1 Qwen3-MoE inference from GGUF files.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        _check_arch(args)
        return handler(args)
    except SparkInferError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _check_arch(args: argparse.Namespace) -> None:
    """Every command that takes --arch refuses an unknown one alike, before it opens a model."""
    if getattr(args, "arch", None) is not None:
        from sparkinfer.runtime.device import check_arch

        check_arch(args.arch)


if __name__ == "__main__":
    sys.exit(main())
