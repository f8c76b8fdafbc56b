"""The tuner's side of the schedules file (sparkinfer/schedule/schedules.py): a "tuned" entry
per tuned kernel, written from the database, so the file always says what the tuning log
holds: the best record's knobs and median time, the arch default's time (its measurement
line), both on the card of the kernel's newest measurement, the kernel's number of records
(trials) and the seed. Entries of kernels not tuned in this run are kept as they were; `made_by`
names the versions and the device that measured.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tvm.s_tir import meta_schedule as ms

from sparkinfer.schedule.schedules import TUNED, ScheduleEntry, SchedulesFile
from sparkinfer.tune.bundle import current_knobs, distinct, records_and_knobs
from sparkinfer.tune.database import measurements
from sparkinfer.tune.runner import versions
from sparkinfer.tune.task import TuneTask


def _median_us(run_secs: Any) -> float:
    return statistics.median(float(s) for s in run_secs) * 1e6


def kernel_entry(task: TuneTask, database: ms.database.Database, lines: list[dict[str, Any]],
                 seed: int) -> ScheduleEntry | None:
    """The kernel's entry, or None where nothing of it was measured successfully. Records of
    an older form of the kernel's schedule rule (their knobs unreadable now) do not count, nor
    does a measurement of a default other than the rule's current one, nor one on another card
    than the kernel's newest measurement (`card_lines`)."""
    # trials: distinct knobs (those timed again, bundle.round_candidates' retime, count once) and the
    # records of older forms of the rule, whose knobs no longer read
    recorded, recorded_knobs = records_and_knobs(task, database)
    known = current_knobs(recorded_knobs)
    on_card = card_lines(task, lines)
    timed = [(r, knobs) for r, knobs in zip(recorded, recorded_knobs)
             if r.run_secs and knobs is not None and _measured_on(r, knobs, on_card)]
    if not timed:
        return None
    best, knobs = min(timed, key=lambda pair: _median_us(pair[0].run_secs))
    # the default's fastest time too, as the knobs' is: a round of a slower machine start (2-9 %,
    # up to 50 % for the router GEMV in session 22's) would otherwise be compared with the
    # best of a faster one (bench/NOTES.md, "Session 22")
    defaults = [line["median_us"] for line in on_card if line["knobs"] == task.default_knobs]
    return ScheduleEntry(knobs=knobs, source=TUNED, time_us=round(_median_us(best.run_secs), 4),
                         default_time_us=round(min(defaults), 4) if defaults else None,
                         trials=len(distinct(known)) + len(recorded) - len(known), seed=seed)


def card_lines(task: TuneTask, lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The kernel's successful measurement lines on the card of its newest one. An arch's log
    may hold several cards' (tuning_logs/sm_90: H200 and H100 rounds); an entry compares times
    of one card, so that its knobs win on their merit and its time and the default's are that
    card's."""
    timed = [line for line in lines if line["kernel"] == task.key and line["median_us"] is not None]
    if not timed:
        return []
    card = timed[-1]["device"]
    return [line for line in timed if line["device"] == card]


def _measured_on(record: ms.database.TuningRecord, knobs: dict[str, Any], on_card: list[dict[str, Any]]) -> bool:
    """Whether a record is one of these lines (the same knobs and times: the database keeps a
    record's times, not its card, as float32 seconds, so they agree with the line's to ~1e-7).
    With no lines for the kernel (a database without its measurement log) every record counts."""
    if not on_card:
        return True
    median = _median_us(record.run_secs)
    # (a line written before the rule gained a knob names fewer knobs than its record reads as)
    return any(all(knobs.get(name) == value for name, value in line["knobs"].items())
               and math.isclose(line["median_us"], median, rel_tol=1e-5) for line in on_card)


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
