"""Build one round of candidates into a bundle that runtime-only TVM can time.

    DIR/index.json           what was built: arch, seed, the compile side's versions and host,
                             `rotate_bytes`, the kernels (key, name, inputs .npz) and the
                             candidates (id, kernel, library, knobs, trace as JSON, default?,
                             build error)
    DIR/inputs/k<i>.npz      one valid input set per kernel (arg0, arg1, ... in parameter order;
                             the big arrays as their leading rows, the kernel's `tiled` names
                             their full shapes: sparkinfer/tune/runner.py's `sample_inputs`)
    DIR/lib/k<i>-c<j>.so     one library per candidate, exporting "main" (.tar for sm_121: its
                             host code is aarch64, linked where it is loaded)

`sparkinfer.tune.runner` adds results.json; `sparkinfer.tune.database.ingest` reads both back.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import s_tir
from tvm.s_tir import meta_schedule as ms

from sparkinfer.compiler import targets
from sparkinfer.errors import SparkInferError
from sparkinfer.tune.runner import FORMAT, INDEX, sample_inputs, versions
from sparkinfer.tune.search import SearchConfig, propose, records, replay
from sparkinfer.tune.task import StaleTraceError, TuneTask, default_trace, knobs_trace, trace_knobs, traces_knobs

Log = Callable[[str], None]


def plain(value: Any) -> Any:
    """A TVM FFI container (a trace's JSON form) as plain JSON values."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if hasattr(value, "items"):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "Array":
        return [plain(v) for v in value]
    if hasattr(value, "value"):  # IntImm, FloatImm, String
        return plain(value.value)
    return str(value)


def trace_json(sch: s_tir.Schedule) -> Any:
    return plain(sch.trace.as_json(remove_postproc=True))


def trace_from_json(task: TuneTask, data: Any) -> s_tir.Trace:
    sch = s_tir.Schedule(task.mod, enable_check=task.enable_check)
    s_tir.Trace.apply_json_to_schedule(data, sch)
    return sch.trace


def round_candidates(task: TuneTask, target: tvm.target.Target, database: ms.database.Database, *, seed: int,
                     n: int, trials: int, config: SearchConfig, log: Log,
                     retime: dict[str, Any] | None = None) -> list[tuple[s_tir.Schedule, bool, dict[str, Any]]]:
    """The next round of a kernel, each pick with whether it is the default and its knobs: the
    arch default first while the database holds no record of it in the rule's current form
    (so every tune measures it, with the same runner as its rivals, also after the rule's
    knobs changed), then the search's proposals.
    With `retime` (the knobs the kernel ships with now, or {} for none), the round timed on
    another machine: the arch default and those knobs (`_shipped_trace`: also after their rule's
    space changed) are timed again ahead of the proposals whenever the round has any, since the
    card that times the round may not be the one that timed the records, and an entry compares
    the times of one card (tune/schedules.py `card_lines`): without them a round on a new card
    would pick among its proposals alone.
    The round index is the number of records: a pure function of the database. A round never
    takes the kernel past `trials` distinct knobs of the rule's current form (records of an
    older form, whose knobs no longer read, do not count; knobs timed again count once)."""
    recorded, recorded_knobs = records_and_knobs(task, database)
    known = current_knobs(recorded_knobs)
    room = min(n, trials - len(distinct(known)))
    if room <= 0:
        return []
    picks: list[tuple[s_tir.Schedule, bool, dict[str, Any]]] = []
    if task.default_knobs not in known or retime is not None:
        try:
            default = replay(task, default_trace(task))
        except Exception as e:  # TVM raises its own errors: the trace does not replay with these decisions
            log(f"warning: {task.name}: the default knobs {task.default_knobs} do not replay in the design space "
                f"({_last_line(e)}): the default is not measured")
        else:
            picks.append((default, True, trace_knobs(task, default.trace)))
    if retime and retime != task.default_knobs:
        shipped = _shipped_trace(task, recorded, recorded_knobs, retime, log)
        if shipped is not None:
            picks.append((replay(task, shipped), False, dict(retime)))
    timed_again = len(picks) if retime is not None else 0
    try:
        proposals = propose(task, target, database, seed=seed, round_index=len(recorded), n=n, config=config)
    except Exception as e:  # the rule's design space fails to build (TVM's ScheduleError): report, go on
        log(f"warning: {task.name}: its design space does not schedule ({_last_line(e)}): no candidates proposed")
        proposals = []
    seen = {_hash(s) for s, _, _ in picks}
    stale = 0
    for sch in proposals:
        if len(picks) >= timed_again + room:
            break
        if _hash(sch) in seen:
            continue
        seen.add(_hash(sch))
        try:
            knobs = trace_knobs(task, sch.trace)
        except StaleTraceError:
            stale += 1  # the search grew it from a record of the rule's older form
            continue
        picks.append((sch, False, knobs))
    if stale:
        log(f"warning: {task.name}: {stale} proposals from records of an older form of its schedule rule skipped")
    # knobs timed again only ride along with new ones: a round of nothing new adds no trial
    return picks if len(picks) > timed_again else []


def _shipped_trace(task: TuneTask, recorded: Sequence[ms.database.TuningRecord],
                   recorded_knobs: Sequence[dict[str, Any] | None], shipped: dict[str, Any], log: Log
                   ) -> s_tir.Trace | None:
    """The trace of the knobs a kernel ships with: its record's, or where no record of the rule's
    current form holds them (the rule's space changed since they were tuned: session 24's down
    kernels) the design space's, so that they are timed again beside what the new space
    proposes; None, with a warning, where the current space does not hold them."""
    found = next((r.trace for r, knobs in zip(recorded, recorded_knobs) if knobs == shipped), None)
    if found is not None:
        return found
    try:
        return knobs_trace(task, shipped, "shipped")
    except SparkInferError as e:
        log(f"warning: {e}: they are not timed again")  # (e names the kernel)
        return None


def records_and_knobs(task: TuneTask, database: ms.database.Database
                      ) -> tuple[list[ms.database.TuningRecord], list[dict[str, Any] | None]]:
    """The kernel's records and each one's knobs (`traces_knobs`: None for a record of an older
    form of its rule)."""
    recorded = records(task, database)
    return recorded, traces_knobs(task, [r.trace for r in recorded])


def current_knobs(recorded_knobs: Sequence[dict[str, Any] | None]) -> list[dict[str, Any]]:
    """Of the records' knobs (`traces_knobs`), those of records made under the rule's current
    form (None: a record of an older form, whose knobs no longer read)."""
    return [knobs for knobs in recorded_knobs if knobs is not None]


def distinct(knobs: Sequence[dict[str, Any]]) -> set[str]:
    """The different knobs among `knobs` (a kernel's trials: knobs timed again count once)."""
    return {json.dumps(k, sort_keys=True) for k in knobs}


def trials_done(task: TuneTask, database: ms.database.Database) -> int:
    """The kernel's trials so far: the distinct knobs of its records of the rule's current form."""
    return len(distinct(current_knobs(records_and_knobs(task, database)[1])))


def _last_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[-1] if text else ""


def _hash(sch: s_tir.Schedule) -> int:
    from tvm_ffi import structural_hash

    return int(structural_hash(sch.mod))


def library_suffix(arch: str) -> str:
    return ".tar" if arch == "sm_121" else ".so"


def build(sch: s_tir.Schedule, arch: str, path: Path) -> None:
    """Compile one scheduled kernel for `arch` and export it (CUDA: an nvcc fatbin inside)."""
    target = targets.target_for(arch)
    if arch == "cpu":
        lib = tvm.compile(sch.mod, target=target)
    else:
        with targets.aot_fatbin(arch):
            lib = tvm.compile(sch.mod, target=target)
    lib.export_library(str(path))


def host_record() -> dict[str, str]:
    return {**versions(), "host": platform.node() or "unknown",
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _build_round(tasks: Sequence[TuneTask], arch: str, database: ms.database.Database, directory: Path, *,
                 seed: int, per_round: int, trials: int, config: SearchConfig, log: Log,
                 retime: Mapping[str, dict[str, Any]] | None) -> tuple[list, list]:
    target = targets.target_for(arch)
    kernels, candidates = [], []
    for i, task in enumerate(tasks):
        picks = round_candidates(task, target, database, seed=seed, n=per_round, trials=trials, config=config,
                                 log=log, retime=None if retime is None else retime.get(task.key, {}))
        inputs = f"inputs/k{i}.npz"
        stored, tiled = sample_inputs(task.inputs)
        np.savez(directory / inputs, **{f"arg{j}": a for j, a in enumerate(stored)})
        kernels.append({"key": task.key, "name": task.name, "inputs": inputs, "tiled": tiled,
                        "read_bytes": task.read_bytes})
        for j, (sch, is_default, knobs) in enumerate(picks):
            cid = f"k{i}-c{j}"
            library = f"lib/{cid}{library_suffix(arch)}"
            error = None
            try:
                build(sch, arch, directory / library)
            except Exception as e:  # a candidate that does not build is recorded as failed
                error = f"{type(e).__name__}: {_last_line(e)}"
            candidates.append({"id": cid, "kernel": task.key, "library": library, "knobs": knobs,
                               "default": is_default, "trace": trace_json(sch), "build_error": error})
        log(f"{task.name}: {len(picks)} candidates")
    return kernels, candidates


def emit(tasks: Sequence[TuneTask], arch: str, database: ms.database.Database, directory: str | Path, *,
         seed: int, per_round: int, trials: int, rotate_bytes: int, config: SearchConfig = SearchConfig(),
         log: Log | None = None, retime: Mapping[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Propose and build one round of every task into `directory` (emptied first); returns
    the index. A kernel with `trials` distinct knobs, or whose search found nothing new, gets
    no candidates. `retime` (kernel key -> the knobs it ships with now): a round for another
    machine, which times those and the arch default again beside the new ones
    (`round_candidates`)."""
    log = log or (lambda message: None)
    directory = Path(directory)
    if directory.exists():
        if not (directory / INDEX).is_file() and any(directory.iterdir()):
            raise SparkInferError(f"{directory} exists and is not a tuning bundle: give a new or empty directory")
        shutil.rmtree(directory)
    (directory / "lib").mkdir(parents=True)
    (directory / "inputs").mkdir()
    try:
        kernels, candidates = _build_round(tasks, arch, database, directory, seed=seed, per_round=per_round,
                                           trials=trials, config=config, log=log, retime=retime)
    except BaseException:
        shutil.rmtree(directory)  # no half bundle: an index only exists for a complete round
        raise
    index = {"format": FORMAT, "arch": arch, "seed": seed, "rotate_bytes": int(rotate_bytes),
             "made_by": host_record(), "kernels": kernels, "candidates": candidates}
    (directory / INDEX).write_text(json.dumps(index, indent=1) + "\n")
    return index
