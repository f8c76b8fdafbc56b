"""Two-phase tuning on the CPU: emit a round, time it with the runner under runtime-only TVM in
another process, ingest it, and the next emit proposes new candidates from the database."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparkinfer.errors import SparkInferError
from sparkinfer.tune.bundle import emit, trials_done
from sparkinfer.tune.database import ingest, measurements, open_database
from sparkinfer.tune.runner import read_index
from sparkinfer.tune.search import records
from tests.tune.toy import DEFAULT, toy_task

REPO = Path(__file__).resolve().parents[2]


def _run_runtime_only(bundle: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1", "PYTHONPATH": str(REPO)}
    # Runtime-only TVM (no compiler library); besides, none of the compiler side's Python may load
    # (`import tvm` itself loads tvm.te and tvm.script's Python even then).
    code = ("import sys, runpy; sys.argv = ['runner', sys.argv[1]]; "
            "rc = 0\ntry:\n    runpy.run_module('sparkinfer.tune.runner', run_name='__main__')\n"
            "except SystemExit as e:\n    rc = e.code\n"
            "bad = [m for m in sys.modules if m.startswith(('tvm.s_tir', 'tvm.relax', 'sparkinfer.compiler.pipeline', "
            "'sparkinfer.kernels', 'sparkinfer.schedule', 'sparkinfer.tune.bundle', 'sparkinfer.tune.search', "
            "'xgboost'))]\n"
            "assert not bad, bad\nsys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, str(bundle)], env=env, capture_output=True, text=True,
                          timeout=300)


def test_round_trip(tmp_path):
    tasks = [toy_task(), toy_task(128, 256)]
    work_dir = tmp_path / "logs"
    database = open_database(work_dir)
    bundle = tmp_path / "round0"
    index = emit(tasks, "cpu", database, bundle, seed=3, per_round=4, trials=10, rotate_bytes=1 << 20)
    assert [c["default"] for c in index["candidates"]] == [True, False, False, False] * 2
    assert index["candidates"][0]["knobs"] == DEFAULT
    assert index["made_by"]["tvm"] and index["made_by"]["sparkinfer"]
    for c in index["candidates"]:
        assert (bundle / c["library"]).is_file() and c["build_error"] is None

    with pytest.raises(SparkInferError, match="time it first"):
        ingest(bundle, {t.key: t for t in tasks}, database, work_dir)
    done = _run_runtime_only(bundle)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((bundle / "results.json").read_text())
    assert results["timer"] == "host-clock" and results["device"].startswith("CPU")
    assert all(r["error"] is None and len(r["times_us"]) >= 3 and min(r["times_us"]) > 0
               for r in results["results"].values())

    lines = ingest(bundle, {t.key: t for t in tasks}, database, work_dir)
    assert len(lines) == 8 and measurements(work_dir) == lines
    assert all(line["device"] == results["device"] and line["measured_by"]["tvm"] for line in lines)
    with pytest.raises(SparkInferError, match="ingested already"):
        ingest(bundle, {t.key: t for t in tasks}, database, work_dir)
    # A fresh process (a new database object over the same files) continues from the records.
    database = open_database(work_dir)
    for task in tasks:
        assert len(records(task, database)) == 4
    measured = {json.dumps(c["knobs"], sort_keys=True) for c in index["candidates"]}
    again = emit(tasks, "cpu", database, tmp_path / "round1", seed=3, per_round=4, trials=10, rotate_bytes=1 << 20)
    assert len(again["candidates"]) == 8 and not any(c["default"] for c in again["candidates"])
    fresh = {(c["kernel"], json.dumps(c["knobs"], sort_keys=True)) for c in again["candidates"]}
    old = {(c["kernel"], json.dumps(c["knobs"], sort_keys=True)) for c in index["candidates"]}
    assert not fresh & old and measured


def test_bad_bundles(tmp_path):
    with pytest.raises(SparkInferError, match="not a tuning bundle"):
        read_index(tmp_path)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "junk").write_text("")
    with pytest.raises(SparkInferError, match="not a tuning bundle"):
        emit([toy_task()], "cpu", open_database(tmp_path / "logs"), tmp_path / "x", seed=0, per_round=2, trials=2,
             rotate_bytes=1024)


def test_big_inputs_travel_as_their_leading_rows():
    """An array over SAMPLE_BYTES is stored as whole leading rows and tiled back to its shape:
    every row of the expanded array is one of the stored rows, small arrays pass unchanged."""
    import numpy as np

    from sparkinfer.tune.runner import SAMPLE_BYTES, expand_inputs, sample_inputs

    rng = np.random.default_rng(7)
    big = rng.integers(0, 2**32, (9, SAMPLE_BYTES // 4 // 3 + 5), dtype=np.uint32)  # 3 rows > SAMPLE_BYTES
    ids, small = np.arange(SAMPLE_BYTES, dtype=np.int32), rng.standard_normal((4, 4), dtype=np.float32)
    logits = rng.standard_normal(SAMPLE_BYTES // 2, dtype=np.float32)
    stored, tiled = sample_inputs([big, ids, small, logits])
    assert tiled == {"arg0": [9, big.shape[1]], "arg3": [SAMPLE_BYTES // 2]}
    assert stored[0].nbytes <= SAMPLE_BYTES and stored[0].shape[0] == 2
    assert stored[1] is ids and stored[2] is small and stored[3].nbytes == SAMPLE_BYTES
    out = expand_inputs(stored, tiled)
    assert out[0].shape == big.shape
    for r in range(9):
        np.testing.assert_array_equal(out[0][r], big[r % 2])
    assert out[1] is ids and out[2] is small
    np.testing.assert_array_equal(out[3], np.resize(logits[: SAMPLE_BYTES // 4], SAMPLE_BYTES // 2))


def _time_as(bundle: Path, device: str, times_us: dict[str, float]) -> None:
    """Write the runner's results.json for a bundle as if `device` had timed it (the runner's
    own timing is test_round_trip's): each candidate's id -> its time."""
    results = {cid: {"times_us": [t] * 3, "error": None} for cid, t in times_us.items()}
    (bundle / "results.json").write_text(json.dumps({
        "device": device, "timer": "cuda-events", "samples": 3, "made_by": {"tvm": "test", "sparkinfer": "test"},
        "date": "2026-12-06T00:00:00Z", "results": results}))


def test_an_entry_compares_the_fastest_times_of_its_knobs_and_of_the_default(tmp_path):
    """Two rounds on one card, the second on a slower machine start (everything 1.5x): the entry
    takes each knob set's fastest time over both, the default's included, so that its ratio is
    not the first round's best against the second round's default."""
    from sparkinfer.tune.schedules import write_schedules

    task = toy_task()
    work_dir = tmp_path / "logs"
    database = open_database(work_dir)
    first = emit([task], "cpu", database, tmp_path / "round0", seed=3, per_round=4, trials=10, rotate_bytes=1 << 20)
    cands = first["candidates"]
    _time_as(tmp_path / "round0", "card A", {c["id"]: 2.0 if i == 2 else 4.0 for i, c in enumerate(cands)})
    ingest(tmp_path / "round0", {task.key: task}, database, work_dir)
    again = emit([task], "cpu", database, tmp_path / "round1", seed=3, per_round=4, trials=10, rotate_bytes=1 << 20,
                 retime={task.key: cands[2]["knobs"]})
    assert again["candidates"][0]["default"]
    _time_as(tmp_path / "round1", "card A", {c["id"]: 6.0 if c["default"] else 3.0 for c in again["candidates"]})
    ingest(tmp_path / "round1", {task.key: task}, database, work_dir)
    entry = write_schedules(tmp_path / "s.json", "cpu", [task], database, work_dir, seed=3).kernels[task.key]
    assert entry.knobs == cands[2]["knobs"] and entry.time_us == 2.0
    assert entry.default_time_us == 4.0  # round 0's, not round 1's 6.0


def test_a_round_for_another_card_times_the_shipped_knobs_and_the_default_again(tmp_path):
    """A round emitted with `retime` (what `sparkinfer tune --emit` passes: each kernel's tuned
    entry) times that entry's knobs and the default again beside its new proposals, so that an
    entry made from a round on another card compares that card's times of all three, and has its
    default time there; a kernel without room for new trials gets no round."""
    from sparkinfer.tune.schedules import write_schedules

    task = toy_task()
    work_dir = tmp_path / "logs"
    database = open_database(work_dir)
    first = emit([task], "cpu", database, tmp_path / "round0", seed=3, per_round=4, trials=10, rotate_bytes=1 << 20)
    ids = [c["id"] for c in first["candidates"]]
    fastest = first["candidates"][2]
    _time_as(tmp_path / "round0", "card A", {cid: (1.0 if cid == fastest["id"] else 5.0) for cid in ids})
    ingest(tmp_path / "round0", {task.key: task}, database, work_dir)

    again = emit([task], "cpu", database, tmp_path / "round1", seed=3, per_round=4, trials=10, rotate_bytes=1 << 20,
                 retime={task.key: fastest["knobs"]})
    cands = again["candidates"]
    assert [c["default"] for c in cands[:2]] == [True, False]
    assert cands[0]["knobs"] == DEFAULT and cands[1]["knobs"] == fastest["knobs"]
    old = {json.dumps(c["knobs"], sort_keys=True) for c in first["candidates"]}
    new = [c for c in cands[2:] if json.dumps(c["knobs"], sort_keys=True) not in old]
    assert len(cands) == 6 and len(new) == 4
    # card B: the shipped knobs are slower there than a new proposal, the default slowest
    times = {c["id"]: 3.0 for c in cands}
    times.update({cands[0]["id"]: 9.0, cands[1]["id"]: 4.0, new[1]["id"]: 2.0})
    _time_as(tmp_path / "round1", "card B", times)
    ingest(tmp_path / "round1", {task.key: task}, database, work_dir)
    entry = write_schedules(tmp_path / "s.json", "cpu", [task], database, work_dir, seed=3).kernels[task.key]
    assert entry.knobs == new[1]["knobs"] and entry.time_us == 2.0 and entry.default_time_us == 9.0

    # 8 distinct knobs of 10 (the default and the shipped knobs timed twice count once): room for 2
    assert trials_done(task, database) == 8
    last = emit([task], "cpu", database, tmp_path / "round2", seed=3, per_round=4, trials=8, rotate_bytes=1 << 20,
                retime={task.key: new[1]["knobs"]})
    assert last["candidates"] == []


def test_a_round_times_the_shipped_knobs_again_after_their_rule_changed(tmp_path):
    """The shipped knobs' only record is of the rule's older form (the toy's revised rule has one
    instruction more, so the record's knobs no longer read): the round still times them again,
    from the current design space, right after the default. Shipped knobs that the space no
    longer holds are not timed, with a warning that names them."""
    task = toy_task()
    work_dir = tmp_path / "logs"
    database = open_database(work_dir)
    first = emit([task], "cpu", database, tmp_path / "round0", seed=3, per_round=4, trials=10, rotate_bytes=1 << 20)
    shipped = next(c["knobs"] for c in first["candidates"] if not c["default"])
    _time_as(tmp_path / "round0", "card A", {c["id"]: 3.0 for c in first["candidates"]})
    ingest(tmp_path / "round0", {task.key: task}, database, work_dir)

    revised = toy_task(revised=True)
    again = emit([revised], "cpu", database, tmp_path / "round1", seed=3, per_round=4, trials=10,
                 rotate_bytes=1 << 20, retime={revised.key: shipped})
    cands = again["candidates"]
    assert cands[0]["default"] and cands[1]["knobs"] == shipped and not cands[1]["default"]

    logs: list[str] = []
    outside = {**shipped, "lanes": 3}
    last = emit([revised], "cpu", database, tmp_path / "round2", seed=3, per_round=4, trials=10,
                rotate_bytes=1 << 20, retime={revised.key: outside}, log=logs.append)
    assert all(c["knobs"] != outside for c in last["candidates"])
    assert any(f"its shipped knobs {outside} are not in its design space: they are not timed again" in line
               for line in logs)
