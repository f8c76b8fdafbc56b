"""`sparkinfer tune` on the shipped model: its argument errors, and a small tune end to end."""

import json

from sparkinfer.cli import main


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 1
    return capsys.readouterr().err


def test_argument_errors(capsys, tmp_path):
    assert "needs --arch" in _error(capsys, ["tune", "--logs", str(tmp_path)])
    assert "needs --arch" in _error(capsys, ["tune", "--emit", str(tmp_path / "b")])
    assert "--trials must be at least 1" in _error(capsys, ["tune", "--arch", "cpu", "--trials", "0"])
    assert "is not a tuning bundle" in _error(capsys, ["tune", "--run", str(tmp_path)])
    assert "is not a tuning bundle" in _error(capsys, ["tune", "--ingest", str(tmp_path)])
    message = _error(capsys, ["tune", "--arch", "cpu", "--kernels", "no_such_kernel*", "--logs", str(tmp_path)])
    assert "matches none of the model's kernels" in message and "gemv_q8_lanes_q4_k_256x512" in message  # the O projection, int8 on the cpu
    assert "needs that GPU" in _error(capsys, ["tune", "--arch", "sm_90", "--kernels", "gemv_q8_q6_k_planar_4096x256",
                                               "--logs", str(tmp_path)])
    assert "unknown --preset 'qwen9'" in _error(capsys, ["tune", "--arch", "cpu", "--preset", "qwen9"])
    assert "unknown --type 'q3_k'" in _error(capsys, ["tune", "--arch", "cpu", "--preset", "tiny", "--type", "q3_k"])
    assert "not both" in _error(capsys, ["tune", str(tmp_path / "m.gguf"), "--arch", "cpu", "--preset", "tiny"])


def test_preset_tasks_without_the_file():
    """The full-size model's kernels come from its preset alone: its expert GEMVs among them."""
    from sparkinfer.tune.tasks import preset_tasks

    tasks = preset_tasks("qwen3-30b-a3b", "q4_k_m", "sm_90", "moe_gate_up_silu*")
    assert [t.name for t in tasks] == ["moe_gate_up_silu_q4_k_q4_k_128x768x2048_top8"]


def test_tasks_follow_the_step_variants_the_arch_compiles():
    """A schedules file picking the fused launches gets the fused kernels tuned: each task's
    inputs fit its kernel (concrete_kernel checks every parameter against its array)."""
    from sparkinfer.tune.tasks import preset_tasks

    fused = {"decode_launches": "fused"}
    names = [t.name for t in preset_tasks("tiny", "q4_k_m", "sm_90", "*", variants=fused)]
    for prefix in ("gemv_normed_", "gemv_residual_", "gemv_normed_qk_", "moe_gate_up_silu_routed_"):
        assert any(name.startswith(prefix) for name in names), (prefix, names)
    assert not any(name.startswith(("add_rms_norm", "router_topk")) for name in names)


def test_programmatic_launch_leaves_the_tasks_as_they_are():
    """A launch attribute, not a kernel: a schedules file turning it on tunes the same kernels."""
    from sparkinfer.tune.tasks import preset_tasks

    on = {"programmatic_launch": "on"}
    names = [t.name for t in preset_tasks("tiny", "q4_k_m", "sm_90", "*", variants=on)]
    assert names == [t.name for t in preset_tasks("tiny", "q4_k_m", "sm_90", "*")]


def test_small_tune_then_two_phase_round(capsys, tmp_path):
    """Two kernels, three trials each, then one more round by --emit / --run / --ingest."""
    logs, schedules, bundle = tmp_path / "logs", tmp_path / "cpu.json", tmp_path / "round"
    common = ["--arch", "cpu", "--kernels", "*rms_norm_256", "--logs", str(logs), "--schedules", str(schedules)]
    assert main(["tune", "--trials", "3", *common]) == 0
    out = json.loads(schedules.read_text())
    assert out["arch"] == "cpu" and out["made_by"]["tvm"] and out["made_by"]["device"].startswith("CPU")
    keys = ["norm.add_rms_norm(256, 1e-06)", "norm.rms_norm(256, 1e-06)"]
    assert sorted(out["kernels"]) == keys
    for entry in out["kernels"].values():
        assert entry["source"] == "tuned" and entry["trials"] == 3 and entry["seed"] == 0
        assert 0 < entry["time_us"] <= entry["default_time_us"]
    work = logs / "cpu"
    assert {p.name for p in work.iterdir()} >= {"database_workload.json", "database_tuning_record.json",
                                                "measurements.jsonl"}
    lines = [json.loads(line) for line in (work / "measurements.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and all(line["measured_by"]["tvm"] and line["device"] for line in lines)
    capsys.readouterr()

    assert main(["tune", "--trials", "5", *common, "--emit", str(bundle)]) == 0
    index = json.loads((bundle / "index.json").read_text())
    # per kernel two new knobs, after the default and the tuned entry's knobs timed again (the
    # round may run on another card than the records: bundle.round_candidates' retime)
    shipped = {k: e["knobs"] for k, e in out["kernels"].items()}
    for key in keys:
        cands = [c for c in index["candidates"] if c["kernel"] == key]
        again = [{"knobs": c["knobs"], "default": c["default"]} for c in cands[: len(cands) - 2]]
        assert again[0]["default"] and all(not c["default"] for c in cands[1:])
        assert {json.dumps(c["knobs"], sort_keys=True) for c in again} == \
            {json.dumps(k, sort_keys=True) for k in (again[0]["knobs"], shipped[key])}
        known = {json.dumps(line["knobs"], sort_keys=True) for line in lines if line["kernel"] == key}
        assert not any(json.dumps(c["knobs"], sort_keys=True) in known for c in cands[-2:])
    assert main(["tune", "--run", str(bundle)]) == 0
    assert main(["tune", "--ingest", str(bundle), "--logs", str(logs), "--schedules", str(schedules)]) == 0
    out = json.loads(schedules.read_text())
    assert [out["kernels"][k]["trials"] for k in keys] == [5, 5]
    assert len((work / "measurements.jsonl").read_text().splitlines()) == 6 + len(index["candidates"])
