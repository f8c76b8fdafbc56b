"""The tuner's side of the schedules file (sparkinfer/schedule/schedules.py): a "tuned" entry
per tuned kernel, written from the database, so the file always says what the tuning log
holds: the best record's knobs and median time, the arch default's time (its measurement
line), the kernel's number of records (trials) and the seed. Entries of kernels not tuned in
this run are kept as they were; `made_by` names the versions and the device that measured.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tvm.s_tir import meta_schedule as ms

from sparkinfer.schedule.schedules import TUNED, ScheduleEntry, SchedulesFile
from sparkinfer.tune.database import measurements
from sparkinfer.tune.runner import versions
from sparkinfer.tune.search import records
from sparkinfer.tune.task import TuneTask, traces_knobs


def _median_us(run_secs: Any) -> float:
    return statistics.median(float(s) for s in run_secs) * 1e6


def kernel_entry(task: TuneTask, database: ms.database.Database, lines: list[dict[str, Any]],
                 seed: int) -> ScheduleEntry | None:
    """The kernel's entry, or None where nothing of it was measured successfully. Records of
    an older form of the kernel's schedule rule (their knobs unreadable now) do not count, nor
    does a measurement of a default other than the rule's current one."""
    recorded = records(task, database)
    measured = [r for r in recorded if r.run_secs]
    timed = [(r, knobs) for r, knobs in zip(measured, traces_knobs(task, [r.trace for r in measured]))
             if knobs is not None]
    if not timed:
        return None
    best, knobs = min(timed, key=lambda pair: _median_us(pair[0].run_secs))
    defaults = [line["median_us"] for line in lines
                if line["kernel"] == task.key and line["knobs"] == task.default_knobs and line["median_us"] is not None]
    return ScheduleEntry(knobs=knobs, source=TUNED, time_us=round(_median_us(best.run_secs), 4),
                         default_time_us=round(defaults[-1], 4) if defaults else None, trials=len(recorded),
                         seed=seed)


def write_schedules(path: str | Path, arch: str, tasks: Sequence[TuneTask], database: ms.database.Database,
                    work_dir: str | Path, seed: int) -> SchedulesFile:
    path = Path(path)
    found = SchedulesFile.read(path) if path.is_file() else SchedulesFile(arch, {})
    lines = measurements(work_dir)
    written = set()
    for task in tasks:
        entry = kernel_entry(task, database, lines, seed)
        if entry is not None:
            found.kernels[task.key] = entry
            written.add(task.key)
    # the card of the newest measurement among the entries written (not the last kernel's own
    # newest line: a kernel this run did not time keeps an older round's card)
    device = next((line["device"] for line in reversed(lines) if line["kernel"] in written),
                  found.made_by.get("device"))
    found.made_by = {**versions(), "device": device, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    found.write(path)
    return found
