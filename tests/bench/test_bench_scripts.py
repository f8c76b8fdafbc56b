"""The scripts under bench/ run where no test imports them (the GPU round, the profiles): each
must at least parse, and each shell script must pass `bash -n`, so a round does not die on a typo
after the device machine has started."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.parametrize("script", sorted(BENCH.rglob("*.py")), ids=lambda p: str(p.relative_to(BENCH)))
def test_python_script_parses(script: Path) -> None:
    ast.parse(script.read_text(), filename=str(script))


@pytest.mark.parametrize("script", sorted(BENCH.rglob("*.sh")), ids=lambda p: str(p.relative_to(BENCH)))
def test_shell_script_parses(script: Path) -> None:
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _gpu_round():  # noqa: ANN202
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_round", BENCH / "gpu_round.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("step_name", ["CANDIDATE_STEP", "Q8_STEP", "pdl", "planar"])
def test_the_round_candidate_modules_keep_the_arch_knobs_and_add_their_step(tmp_path: Path, monkeypatch,  # noqa: ANN001
                                                                              step_name: str) -> None:
    from sparkinfer.schedule.schedules import SchedulesFile, schedules_for

    gpu_round = _gpu_round()
    monkeypatch.setattr(gpu_round, "ROUND", tmp_path / "gpu-round.json")
    step = gpu_round.VARIANT_STEPS.get(step_name) or getattr(gpu_round, step_name)
    written = SchedulesFile.read(gpu_round.candidate_schedules("sm_90", step))
    packaged, _ = schedules_for("sm_90")
    assert written.step == {**packaged.step, **step}
    assert written.kernels == packaged.kernels


def test_the_round_report_shows_the_candidate_decode(tmp_path: Path) -> None:
    import json

    gpu_round = _gpu_round()
    result = {"card": "NVIDIA H200", "module_key": "k", "reps": 3,
              "decode": [{"depth": 128, "tok_s_median": 266.0, "fill_ms": 1.0}]}
    (tmp_path / "decode-candidate.json").write_text(json.dumps(result) + "\n")
    report = gpu_round.report(tmp_path)
    assert f"the candidate module's decode ({gpu_round.CANDIDATE_STEP}), host sees every token:" in report
    assert "tg128 @ 128" in report and "266.0" in report and "0.80" in report  # 266 / 333.6


def test_the_round_report_shows_the_q8_gate_and_decode(tmp_path: Path) -> None:
    import json

    gpu_round = _gpu_round()
    result = {"card": "NVIDIA H200", "module_key": "k", "reps": 3,
              "decode": [{"depth": 4096, "tok_s_median": 300.0, "fill_ms": 1.0}]}
    (tmp_path / "decode-q8.json").write_text(json.dumps(result) + "\n")
    (tmp_path / "q8-gate.txt").write_text("PASS mean KL 2.0e-05\n")
    report = gpu_round.report(tmp_path)
    assert f"the int8-activation module ({gpu_round.Q8_STEP}): full-size gate:\n  PASS mean KL 2.0e-05" in report
    assert "tg128 @ 4096" in report and "300.0" in report and "1.05" in report  # 300 / 286.3


def test_the_round_report_shows_stage_variants_beside_the_base(tmp_path: Path) -> None:
    import json

    gpu_round = _gpu_round()
    for name, rate in (("base", 250.0), ("pdl", 270.0), ("planar", 260.0)):
        result = {"card": "NVIDIA H200", "module_key": "k", "reps": 3,
                  "decode": [{"depth": 128, "tok_s_median": rate, "fill_ms": 1.0}]}
        (tmp_path / f"decode-variant-{name}.json").write_text(json.dumps(result) + "\n")
    (tmp_path / "planar-gate.txt").write_text("PASS mean KL 4.0e-06\n")
    report = gpu_round.report(tmp_path)
    base = report.index(f"stage variants, base {gpu_round.CANDIDATE_STEP}, host sees every token:")
    pdl = report.index(f"stage variants, pdl {gpu_round.VARIANT_STEPS['pdl']}, host sees every token:")
    planar = report.index(f"stage variants, planar {gpu_round.VARIANT_STEPS['planar']}, host sees every token:")
    assert base < report.index("250.0") < pdl < report.index("270.0") < planar < report.index("260.0")
    assert f"the planar module ({gpu_round.VARIANT_STEPS['planar']}): full-size gate:\n  PASS mean KL 4.0e-06" in report
