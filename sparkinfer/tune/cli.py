"""`sparkinfer tune`: one-phase tuning on this machine, or one step of two-phase tuning.

    sparkinfer tune [MODEL.gguf | --preset P [--type T]] --arch A [--trials N] [--seed S] [--kernels PATTERN]
        tune here: per kernel, rounds of propose -> build -> time -> record until it has N
        records; writes tuning_logs/<arch>/ and the schedules file (sparkinfer/data/schedules/<arch>.json)
    sparkinfer tune [MODEL.gguf] --arch A --emit DIR     build the next round of every kernel into DIR
    sparkinfer tune --run DIR                            time DIR's candidates on this machine
                                                         (= python -m sparkinfer.tune.runner DIR)
    sparkinfer tune [MODEL.gguf] --ingest DIR            record DIR's times, update the schedules file
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from sparkinfer.errors import SparkInferError
from sparkinfer.schedule.schedules import TUNED, SchedulesFile

if TYPE_CHECKING:
    from sparkinfer.tune.task import TuneTask

# The shipped model's tunable kernels x 32 trials finish inside 30 minutes on this 2-core
# machine (bench/NOTES.md, "Tuning the CPU schedules").
DEFAULT_TRIALS = 32


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, nargs="?", help="a .gguf file (default: the small model shipped in the package)")
    p.add_argument("--preset", help="tune a `sparkinfer synth` preset's kernels without its file (instead of MODEL)")
    p.add_argument("--type", dest="file_type", default="q4_k_m",
                   help="the preset's file type, as `sparkinfer synth --type` (default q4_k_m)")
    p.add_argument("--arch", choices=["sm_90", "sm_120", "sm_121", "cpu"],
                   help="the arch to tune for (needed except with --run and --ingest)")
    p.add_argument("--trials", type=int, default=DEFAULT_TRIALS,
                   help=f"measured candidates per kernel, the arch default included (default {DEFAULT_TRIALS})")
    p.add_argument("--seed", type=int, default=0, help="seed of the search (default 0)")
    p.add_argument("--kernels", metavar="PATTERN", help="only kernels whose name or key matches (fnmatch)")
    p.add_argument("--logs", type=Path, default=Path("tuning_logs"),
                   help="root of the tuning logs: <logs>/<arch>/ (default tuning_logs/)")
    p.add_argument("--schedules", type=Path,
                   help="the schedules file to update (default: the package's, sparkinfer/data/schedules/<arch>.json)")
    phase = p.add_mutually_exclusive_group()
    phase.add_argument("--emit", type=Path, metavar="DIR", help="build the next round into a bundle DIR and stop")
    phase.add_argument("--run", type=Path, metavar="DIR", help="time a bundle's candidates on this machine")
    phase.add_argument("--ingest", type=Path, metavar="DIR", help="record a timed bundle in the tuning log")


def _tasks(args: argparse.Namespace, arch: str, shipped: SchedulesFile | None, pattern: str | None = None,
           log: Callable[[str], None] | None = None) -> list[TuneTask]:
    """The tuning tasks of MODEL, of --preset, or of the shipped model: the kernels of the
    step the arch compiles, with the model-level variants of the schedules file `shipped`
    tuned into (compiler.pipeline.step_variants)."""
    from sparkinfer.compiler.pipeline import step_variants
    from sparkinfer.gguf_file import FILE_TYPES, PRESETS
    from sparkinfer.tune.tasks import model_tasks, preset_tasks

    variants = step_variants(arch, shipped)
    if args.preset is None:
        from sparkinfer.data import default_model_path

        return model_tasks(args.model or default_model_path(), arch, pattern, log, variants)
    if args.model is not None:
        raise SparkInferError(f"give a model file or --preset, not both ({args.model} and --preset {args.preset})")
    if args.preset not in PRESETS:
        raise SparkInferError(f"unknown --preset {args.preset!r} (known: {', '.join(PRESETS)})")
    if args.file_type not in FILE_TYPES:
        raise SparkInferError(f"unknown --type {args.file_type!r} (known: {', '.join(FILE_TYPES)})")
    return preset_tasks(args.preset, args.file_type, arch, pattern, log, variants)


def _need_arch(args: argparse.Namespace, what: str) -> str:
    if args.arch is None:
        raise SparkInferError(f"{what} needs --arch (sm_90, sm_120, sm_121 or cpu)")
    return args.arch


def run(args: argparse.Namespace) -> int:
    if args.trials < 1:
        raise SparkInferError(f"--trials must be at least 1, got {args.trials}")
    if args.run is not None:
        return _run(args.run)
    if args.ingest is not None:
        return _ingest(args)
    arch = _need_arch(args, "tuning" if args.emit is None else "--emit")
    _need_xgboost()
    from sparkinfer.schedule.arch import arch_facts

    shipped = _read_schedules(args, arch)
    tasks = _tasks(args, arch, shipped, args.kernels, log=print)
    if not tasks:
        raise SparkInferError(f"no kernel of the model has a schedule rule for {arch}: nothing to tune")
    work_dir = args.logs / arch
    rotate_bytes = arch_facts(arch).l2_bytes
    if args.emit is not None:
        return _emit(args, arch, tasks, work_dir, rotate_bytes, shipped)
    from sparkinfer.runtime.device import detect_arch

    if arch != "cpu" and detect_arch() != arch:
        raise SparkInferError(f"tuning for {arch} needs that GPU on this machine (found: {detect_arch()}); "
                              "tune in two phases instead: --emit DIR here, --run DIR there, --ingest DIR here")
    from sparkinfer.tune.tuning import tune

    schedules = _schedules_path(args, arch)
    print(f"tuning {len(tasks)} kernels for {arch}, {args.trials} trials each, seed {args.seed}")
    out = tune(tasks, arch, work_dir, schedules, trials=args.trials, seed=args.seed, rotate_bytes=rotate_bytes)
    _summary(out, [t.key for t in tasks])
    print(f"wrote {work_dir}/ and {schedules}")
    return 0


def _need_xgboost() -> None:
    """The search's cost model is XGBoost, an optional extra (running and compiling never use it)."""
    try:
        import xgboost  # noqa: F401
    except ImportError:
        raise SparkInferError("tuning needs xgboost, the [tune] extra: pip install 'sparkinfer[tune]'") from None


def _schedules_path(args: argparse.Namespace, arch: str) -> Path:
    from sparkinfer.schedule.schedules import packaged_schedules_path

    return args.schedules or packaged_schedules_path(arch)


def _read_schedules(args: argparse.Namespace, arch: str) -> SchedulesFile | None:
    """The schedules file the arch compiles with (`_schedules_path`), None where there is none."""
    schedules = _schedules_path(args, arch)
    return SchedulesFile.read(schedules) if schedules.is_file() else None


def _summary(out: SchedulesFile, keys: list[str]) -> None:
    for key in keys:
        entry = out.kernels.get(key)
        if entry is None or entry.time_us is None:
            print(f"  {key}: nothing measured")
            continue
        default = entry.default_time_us
        gain = f", default {default:.2f} us ({default / entry.time_us:.2f}x)" if default else ""
        print(f"  {key}: {entry.time_us:.2f} us{gain}, {entry.trials} trials, knobs {entry.knobs}")


def _emit(args: argparse.Namespace, arch: str, tasks: list, work_dir: Path, rotate_bytes: int,
          shipped: SchedulesFile | None) -> int:
    from sparkinfer.tune.bundle import emit, trials_done
    from sparkinfer.tune.database import open_database
    from sparkinfer.tune.tuning import PER_ROUND

    database = open_database(work_dir)
    open_tasks = [t for t in tasks if trials_done(t, database) < args.trials]
    if not open_tasks:
        print(f"every kernel has {args.trials} trials in {work_dir}: nothing to emit (raise --trials to go on)")
        return 0
    # The round is timed elsewhere, maybe on another card than the records were: it times the
    # knobs each kernel ships with (its tuned entry) and the default again (bundle.round_candidates).
    entries = shipped.kernels if shipped is not None else {}
    retime = {key: entry.knobs for key, entry in entries.items() if entry.source == TUNED}
    index = emit(open_tasks, arch, database, args.emit, seed=args.seed, per_round=PER_ROUND, trials=args.trials,
                 rotate_bytes=rotate_bytes, log=print, retime=retime)
    print(f"wrote {len(index['candidates'])} candidates of {len(open_tasks)} kernels to {args.emit}; time them "
          f"where the device is (python -m sparkinfer.tune.runner {args.emit}), then sparkinfer tune --ingest "
          f"{args.emit}")
    return 0


def _run(directory: Path) -> int:
    from sparkinfer.tune.runner import main

    return main([str(directory)])


def _ingest(args: argparse.Namespace) -> int:
    from sparkinfer.tune.database import ingest, open_database
    from sparkinfer.tune.runner import read_index
    from sparkinfer.tune.schedules import write_schedules

    index = read_index(args.ingest)
    arch = index["arch"]
    if args.arch is not None and args.arch != arch:
        raise SparkInferError(f"{args.ingest} was emitted for {arch}, not --arch {args.arch}")
    keys = {k["key"] for k in index["kernels"]}
    tasks = [t for t in _tasks(args, arch, _read_schedules(args, arch)) if t.key in keys]
    work_dir = args.logs / arch
    database = open_database(work_dir)
    lines = ingest(args.ingest, {t.key: t for t in tasks}, database, work_dir)
    schedules = _schedules_path(args, arch)
    out = write_schedules(schedules, arch, tasks, database, work_dir, index["seed"])
    failed = sum(line["error"] is not None for line in lines)
    print(f"recorded {len(lines)} candidates ({failed} failed) in {work_dir}/")
    _summary(out, [t.key for t in tasks])
    print(f"wrote {schedules}")
    return 0
