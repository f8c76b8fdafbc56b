"""schedules/<arch>.json: per kernel the knobs the tuner chose (the contract in
sparkinfer/schedule/space.py's callers: `sparkinfer compile` applies them).

Written from the database, so it always says what the tuning log holds: per kernel the best
record's knobs and median time, the arch default's time (its measurement line), the number of
records (trials) and the seed. Entries of kernels not tuned in this run are kept as they were.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tvm.s_tir import meta_schedule as ms

from sparkinfer.tune.database import measurements
from sparkinfer.tune.runner import versions
from sparkinfer.tune.search import records
from sparkinfer.tune.task import TuneTask, trace_knobs

TUNED = "tuned"


def kernel_entry(task: TuneTask, database: ms.database.Database, lines: list[dict[str, Any]],
                 seed: int) -> dict[str, Any] | None:
    """The kernel's entry, or None where nothing of it was measured successfully."""
    recorded = [r for r in records(task, database) if r.run_secs]
    if not recorded:
        return None
    best = min(recorded, key=lambda r: statistics.median(float(s) for s in r.run_secs))
    mine = [line for line in lines if line["kernel"] == task.key]
    defaults = [line["median_us"] for line in mine if line["default"] and line["median_us"] is not None]
    device = mine[-1]["device"] if mine else None
    return {
        "knobs": trace_knobs(task, best.trace),
        "source": TUNED,
        "time_us": round(statistics.median(float(s) for s in best.run_secs) * 1e6, 4),
        "default_time_us": round(defaults[-1], 4) if defaults else None,
        "trials": len(records(task, database)),
        "seed": seed,
        "device": device,
        "tvm": mine[-1]["measured_by"]["tvm"] if mine else None,
    }


def write_schedules(path: str | Path, arch: str, tasks: Sequence[TuneTask], database: ms.database.Database,
                    work_dir: str | Path, seed: int) -> dict[str, Any]:
    path = Path(path)
    existing = json.loads(path.read_text()) if path.is_file() else {}
    kernels = dict(existing.get("kernels", {}))
    lines = measurements(work_dir)
    device = None
    for task in tasks:
        entry = kernel_entry(task, database, lines, seed)
        if entry is not None:
            kernels[task.key] = entry
            device = entry["device"]
    made_by = {**versions(), "device": device or existing.get("made_by", {}).get("device"),
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = {"arch": arch, "made_by": made_by, "kernels": dict(sorted(kernels.items()))}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    return out
