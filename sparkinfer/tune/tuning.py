"""One-phase tuning: rounds of emit (sparkinfer/tune/bundle.py) -> time (runner.py) -> ingest
(database.py) per kernel on this machine, the same code paths as two-phase tuning, until each
kernel has `trials` distinct knobs or its search finds nothing new; then the schedules file."""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tvm.s_tir import meta_schedule as ms

from sparkinfer.errors import SparkInferError
from sparkinfer.schedule.schedules import SchedulesFile
from sparkinfer.tune.bundle import emit, trials_done
from sparkinfer.tune.database import ingest
from sparkinfer.tune.runner import run_bundle
from sparkinfer.tune.schedules import write_schedules
from sparkinfer.tune.search import SearchConfig, records
from sparkinfer.tune.task import TuneTask

# One round's candidates per kernel: enough for the cost model to learn from after the first.
PER_ROUND = 8
Runner = Callable[[Path], Any]


def best_us(task: TuneTask, database: ms.database.Database) -> float | None:
    times = [statistics.median(float(s) for s in r.run_secs) for r in records(task, database) if r.run_secs]
    return min(times) * 1e6 if times else None


def _warnings(bar: Any) -> Callable[[str], None]:
    def log(message: str) -> None:
        if message.startswith("warning"):
            bar.write(message)

    return log


def tune_one(task: TuneTask, arch: str, database: ms.database.Database, work_dir: Path, *, trials: int, seed: int,
             rotate_bytes: int, per_round: int = PER_ROUND, config: SearchConfig = SearchConfig(),
             runner: Runner = run_bundle, progress: bool = True) -> int:
    """Tune one kernel up to `trials` distinct knobs of its rule's current form
    (`bundle.trials_done`: an older form's records do not count, as in a round); returns the
    trials it has."""
    from tqdm import tqdm

    done = trials_done(task, database)
    with tqdm(total=trials, initial=min(done, trials), desc=task.name, unit="trial", disable=not progress,
              leave=True, dynamic_ncols=True) as bar:
        while done < trials:
            with tempfile.TemporaryDirectory(prefix="sparkinfer-tune-") as tmp:
                bundle = Path(tmp) / "bundle"
                index = emit([task], arch, database, bundle, seed=seed, per_round=per_round, trials=trials,
                             rotate_bytes=rotate_bytes, config=config, log=_warnings(bar))
                if not index["candidates"]:
                    bar.set_postfix_str("space exhausted")
                    break
                runner(bundle)
                ingest(bundle, {task.key: task}, database, work_dir)
            now = trials_done(task, database)
            if now <= done:
                raise SparkInferError(f"kernel {task.name}: a round was recorded but the database does not find its "
                                      f"records (its workload does not match itself)")
            bar.update(now - done)
            done = now
            best = best_us(task, database)
            if best is not None:
                bar.set_postfix_str(f"best {best:.2f} us")
    return done


def tune(tasks: Sequence[TuneTask], arch: str, work_dir: str | Path, schedules: str | Path, *, trials: int,
         seed: int, rotate_bytes: int, per_round: int = PER_ROUND, config: SearchConfig = SearchConfig(),
         runner: Runner = run_bundle, progress: bool = True) -> SchedulesFile:
    from sparkinfer.tune.database import open_database

    work_dir = Path(work_dir)
    database = open_database(work_dir)
    for task in tasks:
        tune_one(task, arch, database, work_dir, trials=trials, seed=seed, rotate_bytes=rotate_bytes,
                 per_round=per_round, config=config, runner=runner, progress=progress)
    return write_schedules(schedules, arch, tasks, database, work_dir, seed)
