"""The search: default trace, the categorical mutator, knobs of simplified traces, and that a
seed with the same measured times proposes the same candidates (deterministic fake runner)."""

import json
from pathlib import Path

import pytest

from tvm.s_tir.meta_schedule import _ffi_api as ms_api

from sparkinfer.errors import SparkInferError
from sparkinfer.tune.database import measurements
from sparkinfer.tune.mutator import MutateCategorical
from sparkinfer.tune.search import replay
from sparkinfer.tune.task import categorical_insts, default_trace, trace_knobs
from sparkinfer.tune.tuning import tune
from tests.tune.toy import DEFAULT, LANES, ROWS, toy_task


def test_default_trace_has_the_default_knobs():
    task = toy_task()
    assert trace_knobs(task, default_trace(task)) == DEFAULT


def test_default_outside_the_space_is_an_error():
    task = toy_task()
    task.default_knobs = {**DEFAULT, "lanes": 3}
    with pytest.raises(SparkInferError, match="not in its design space"):
        default_trace(task)


def test_mutator_redraws_exactly_one_knob():
    task = toy_task()
    trace = default_trace(task)
    mutator = MutateCategorical()
    seen = set()
    for state in range(40):
        mutated = ms_api.MutatorApply(mutator, trace, state)  # as the search calls it
        before, after = trace_knobs(task, trace), trace_knobs(task, mutated)
        changed = [k for k in before if before[k] != after[k]]
        assert len(changed) == 1 and changed[0] in ("rows", "lanes")
        seen.add((changed[0], after[changed[0]]))
    # every other value of both knobs is reachable
    assert seen == {("rows", r) for r in ROWS if r != DEFAULT["rows"]} | {
        ("lanes", v) for v in LANES if v != DEFAULT["lanes"]}


def test_mutator_gives_up_without_categorical_draws():
    task = toy_task()
    trace = default_trace(task)
    bare = trace
    for inst in categorical_insts(trace):
        bare = bare.with_decision(inst, None, True)
    assert ms_api.MutatorApply(MutateCategorical(), bare, 1) is None


def test_knobs_of_a_simplified_trace():
    task = toy_task()
    trace = replay(task, default_trace(task)).trace.simplified(True)
    assert trace_knobs(task, trace) == DEFAULT


def fake_time(knobs: dict) -> float:
    """A fixed function of the knobs: more rows and lanes are faster, unroll helps."""
    return 100.0 / knobs["rows"] + 50.0 / knobs["lanes"] + (0.0 if knobs["unroll"] else 7.0)


def fake_runner(bundle: Path, device: str = "fake", slower: float = 1.0) -> None:
    """Times each candidate at fake_time x `slower`, as the card `device`."""
    index = json.loads((bundle / "index.json").read_text())
    results = {}
    for c in index["candidates"]:
        t = fake_time(c["knobs"]) * slower
        results[c["id"]] = {"times_us": [t, t, t], "error": None}
    (bundle / "results.json").write_text(json.dumps({
        "device": device, "timer": "fake", "samples": 3, "date": "2026-01-01T00:00:00Z",
        "made_by": {"tvm": "fake", "sparkinfer": "fake"}, "results": results}))


def _proposals(tmp: Path, seed: int) -> list[dict]:
    tune([toy_task()], "cpu", tmp / "logs", tmp / "cpu.json", trials=9, seed=seed, rotate_bytes=1 << 16,
         per_round=3, runner=fake_runner, progress=False)
    return [line["knobs"] for line in measurements(tmp / "logs")]


def test_same_seed_same_times_same_candidates(tmp_path):
    first = _proposals(tmp_path / "a", seed=7)
    again = _proposals(tmp_path / "b", seed=7)
    other = _proposals(tmp_path / "c", seed=8)
    assert len(first) == 9 and first[0] == DEFAULT
    assert len({json.dumps(k, sort_keys=True) for k in first}) == 9  # never a candidate twice
    assert first == again
    assert first != other
    schedules = json.loads((tmp_path / "a" / "cpu.json").read_text())
    assert schedules["arch"] == "cpu" and schedules["made_by"]["device"] == "fake"
    entry = schedules["kernels"]["toy.gemv(256, 512)"]
    best = min(first, key=fake_time)
    assert entry["knobs"] == best and entry["trials"] == 9 and entry["seed"] == 7
    assert entry["default_time_us"] == pytest.approx(100.0 / 4 + 50.0 / 8 + 7.0)


def test_an_entry_compares_times_of_one_card(tmp_path):
    """A log with rounds on two cards (tuning_logs/sm_90: H200 and H100): the entry is the best of
    the newest card's records, with that card's default time, not a faster card's older best."""
    logs, out = tmp_path / "logs", tmp_path / "cpu.json"
    tune([toy_task()], "cpu", logs, out, trials=6, seed=5, rotate_bytes=1 << 16, per_round=3,
         runner=fake_runner, progress=False)
    tune([toy_task()], "cpu", logs, out, trials=9, seed=5, rotate_bytes=1 << 16, per_round=3,
         runner=lambda bundle: fake_runner(bundle, "slow card", 10.0), progress=False)
    lines = measurements(logs)
    assert [line["device"] for line in lines] == ["fake"] * 6 + ["slow card"] * 3
    schedules = json.loads(out.read_text())
    entry = schedules["kernels"]["toy.gemv(256, 512)"]
    best = min((line["knobs"] for line in lines[6:]), key=fake_time)
    assert entry["knobs"] == best and entry["time_us"] == pytest.approx(10.0 * fake_time(best))
    assert entry["time_us"] > min(line["median_us"] for line in lines[:6])  # the fake card's times lost
    assert entry["default_time_us"] is None  # the default was timed on the fake card only
    assert schedules["made_by"]["device"] == "slow card"


def test_tuning_goes_on_after_the_rule_changed(tmp_path, capsys):
    """Logs of a rule's older form (traces that match none of its spaces now) neither stop the
    next round nor give the schedules file knobs: the search's proposals grown from them are
    skipped, with a line saying so, and the entry comes from the new form's records."""
    logs, out = tmp_path / "logs", tmp_path / "cpu.json"
    tune([toy_task()], "cpu", logs, out, trials=6, seed=3, rotate_bytes=1 << 16, per_round=3,
         runner=fake_runner, progress=False)
    first = len(measurements(logs))
    capsys.readouterr()
    tune([toy_task(revised=True)], "cpu", logs, out, trials=12, seed=3, rotate_bytes=1 << 16, per_round=3,
         runner=fake_runner, progress=True)
    printed = capsys.readouterr()
    assert "proposals from records of an older form of its schedule rule skipped" in printed.out + printed.err
    revised = measurements(logs)[first:]
    assert revised, "the revised rule got no candidates"
    entry = json.loads(out.read_text())["kernels"]["toy.gemv(256, 512)"]
    times = {json.dumps(line["knobs"], sort_keys=True): line["median_us"] for line in revised}
    assert json.dumps(entry["knobs"], sort_keys=True) in times
    assert entry["time_us"] == pytest.approx(min(times.values()))
    # the default is measured again under the new form, so tuned and default compare alike
    again = [line for line in revised if line["default"]]
    assert [line["knobs"] for line in again] == [DEFAULT]
    assert entry["default_time_us"] == pytest.approx(again[0]["median_us"])
    assert entry["time_us"] <= entry["default_time_us"]


def test_a_trace_read_back_from_json_replays_onto_the_kernels_own_buffers():
    """The MoE GEMVs' block-header reads (schedule/gemv.py declare_header_reads) declare a region
    of the weights indexed by the kernel's `ids`: a trace read back from JSON holds its own copy
    of that buffer, so applied as it is, its kernel does not lower (session 9's tuning round: 10
    candidates "Buffer ids is used before its definition"); `replay` carries its decisions onto
    the design space's own trace, and the kernel lowers with its knobs."""
    from tvm import s_tir

    from sparkinfer.compiler.targets import shared_memory_bytes
    from sparkinfer.tune.bundle import trace_from_json, trace_json
    from sparkinfer.tune.tasks import preset_tasks

    task = preset_tasks("tiny", "q4_k_m", "sm_90", "*moe_down_residual*")[0]
    space = next(s for s in task.spaces() if task.knobs_of(s.trace)["vector_header"] == 1)
    read_back = trace_from_json(task, trace_json(space))
    as_is = s_tir.Schedule(task.mod, enable_check=task.enable_check)
    read_back.apply_to_schedule(as_is, remove_postproc=True)
    with pytest.raises(Exception, match="Buffer ids is used before its definition"):
        shared_memory_bytes(as_is.mod, "sm_90")
    replayed = replay(task, read_back)
    assert shared_memory_bytes(replayed.mod, "sm_90")
    assert trace_knobs(task, replayed.trace) == task.knobs_of(space.trace)


@pytest.mark.parametrize("variants", [{}, {"activations": "q8", "projection_activations": "q8",
                                           "q6_k_layout": "planar"}], ids=["float", "int8"])
def test_every_design_space_of_the_step_goes_into_a_round_as_json(variants):
    """A tuning round stores each candidate's trace as JSON (tune/bundle.py trace_json), which
    takes the sampled knobs only as split factors and the like: a rule that did arithmetic on one
    (add_rms_norm_q8_1's threads / 8 until session 16) made a trace JSON cannot hold, and
    `sparkinfer tune --arch sm_90 --emit` failed on sm_90's int8 step."""
    from sparkinfer.tune.bundle import trace_from_json, trace_json
    from sparkinfer.tune.tasks import preset_tasks

    tasks = preset_tasks("tiny", "q4_k_m", "sm_90", variants=variants)
    assert tasks
    for task in tasks:
        for space in task.spaces():
            read_back = trace_from_json(task, trace_json(space))
            assert trace_knobs(task, replay(task, read_back).trace) == task.knobs_of(space.trace), task.name
