"""The tuning log, tuning_logs/<arch>/: MetaSchedule's JSONDatabase plus who measured what.

    database_workload.json        MetaSchedule's JSON lines: one workload per kernel (the
    database_tuning_record.json   concrete unscheduled PrimFunc) and one record per measured
                                  candidate (trace, run seconds, target, argument info)
    measurements.jsonl            one JSON line per measured candidate, beside its record:
                                  kernel key, knobs, default?, per-sample times (us), error,
                                  seed, the device and timer that measured, the TVM and
                                  SparkInfer versions of both sides, the bundle's date

MetaSchedule's files have no room for provenance, so the JSON lines next to them carry it; a
record and its line are written together by `ingest`, the only writer.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tvm.s_tir import meta_schedule as ms

from sparkinfer.compiler import targets
from sparkinfer.errors import SparkInferError
from sparkinfer.tune.bundle import trace_from_json
from sparkinfer.tune.runner import RESULTS, read_index
from sparkinfer.tune.task import TuneTask

MEASUREMENTS = "measurements.jsonl"
INGESTED = "ingested.json"


def open_database(work_dir: str | Path) -> ms.database.JSONDatabase:
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=str(work_dir))


def measurements(work_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(work_dir) / MEASUREMENTS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def ingest(directory: str | Path, tasks: Mapping[str, TuneTask], database: ms.database.Database,
           work_dir: str | Path) -> list[dict[str, Any]]:
    """Commit a timed bundle's results: a TuningRecord per candidate (failed ones without run
    seconds, so the search never proposes them again and never picks them) and its line in
    measurements.jsonl. Returns the lines. A bundle is ingested once."""
    directory = Path(directory)
    index = read_index(directory)
    results_path = directory / RESULTS
    if not results_path.is_file():
        raise SparkInferError(f"{directory} has no {RESULTS}: time it first (python -m sparkinfer.tune.runner "
                              f"{directory}, or sparkinfer tune --run {directory})")
    if (directory / INGESTED).is_file():
        raise SparkInferError(f"{directory} was ingested already ({INGESTED}); emit a new round")
    results = json.loads(results_path.read_text())
    target = targets.target_for(index["arch"])
    lines = []
    for candidate in index["candidates"]:
        task = tasks.get(candidate["kernel"])
        if task is None:
            raise SparkInferError(f"bundle kernel {candidate['kernel']} is not a kernel of this model "
                                  f"(emitted for another model or --kernels)")
        result = results["results"].get(candidate["id"])
        if result is None:
            raise SparkInferError(f"{RESULTS} has no result for candidate {candidate['id']}")
        times = result["times_us"]
        run_secs = [t * 1e-6 for t in times] if times else None
        workload = database.commit_workload(task.mod)
        trace = trace_from_json(task, candidate["trace"])
        args_info = ms.arg_info.ArgInfo.from_prim_func(task.mod["main"])
        database.commit_tuning_record(ms.database.TuningRecord(trace, workload, run_secs, target, args_info))
        lines.append({
            "kernel": candidate["kernel"], "knobs": candidate["knobs"], "default": candidate["default"],
            "median_us": statistics.median(times) if times else None, "times_us": times, "error": result["error"],
            "seed": index["seed"], "device": results["device"], "timer": results["timer"],
            "measured_by": results["made_by"], "built_by": index["made_by"], "date": results["date"],
        })
    with open(Path(work_dir) / MEASUREMENTS, "a") as f:
        for line in lines:
            f.write(json.dumps(line, sort_keys=True) + "\n")
    (directory / INGESTED).write_text(json.dumps({"work_dir": str(work_dir), "records": len(lines)}) + "\n")
    return lines
