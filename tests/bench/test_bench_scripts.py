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


def test_gpu_round_refuses_more_stages_than_its_seconds(tmp_path: Path) -> None:
    """A call whose stages' floors exceed ROUND_SECONDS stops before setup, naming why, instead
    of cutting its first stages to 15 s on the device."""
    env = {"PATH": "/usr/bin:/bin", "ROUND_SECONDS": "100", "OUT": str(tmp_path / "out"),
           "ROUND_DIR": str(tmp_path / "round")}
    proc = subprocess.run(["bash", str(BENCH / "gpu_round.sh"), "synth", "pytest"], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 2
    assert "the stages' floors add up to 160 s, more than this call's 100 s (ROUND_SECONDS)" in proc.stderr


def _gpu_round():  # noqa: ANN202
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_round", BENCH / "gpu_round.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The round's variants, or (a round without any) one step variant as the script would write it
EXAMPLE_VARIANT = {"example": {"decode_launches": "fused"}}


@pytest.mark.parametrize("name", sorted(_gpu_round().VARIANT_STEPS or EXAMPLE_VARIANT))
def test_the_round_variant_modules_keep_the_arch_knobs_and_add_their_step(tmp_path: Path, monkeypatch,  # noqa: ANN001
                                                                          name: str) -> None:
    from sparkinfer.schedule.schedules import SchedulesFile, schedules_for

    gpu_round = _gpu_round()
    monkeypatch.setattr(gpu_round, "ROUND", tmp_path / "gpu-round.json")
    step, knobs = (gpu_round.VARIANT_STEPS or EXAMPLE_VARIANT)[name], gpu_round.VARIANT_KNOBS.get(name, {})
    written = SchedulesFile.read(gpu_round.variant_schedules("sm_90", step, knobs))
    packaged, _ = schedules_for("sm_90")
    assert written.step == {**packaged.step, **step}
    assert {key: entry.knobs for key, entry in written.kernels.items()} == \
        {**{key: entry.knobs for key, entry in packaged.kernels.items()}, **knobs}
    if knobs:  # the keys name kernels of the variant's step
        from sparkinfer.gguf_file import preset_config, type_map
        from sparkinfer.model.qwen3moe import build_decode_step
        from sparkinfer.schedule.space import kernel_key

        config = preset_config(gpu_round.FULL_PRESET)
        from sparkinfer.compiler.pipeline import default_prefill_chunks, step_variants

        # (the step as the variant's module is compiled: the arch's step variants, then its file's;
        # its T-token steps where it has them)
        chunks = default_prefill_chunks("sm_90") if name in gpu_round.VARIANT_CHUNKED else ()
        step_kernels = build_decode_step(config, type_map(config, gpu_round.FULL_TYPES), prefill_chunks=chunks,
                                         **step_variants("sm_90", written)).kernels
        assert set(knobs) <= {kernel_key(use) for use in step_kernels}


def _decode_result(depth: int, rate: float) -> str:
    import json

    return json.dumps({"card": "NVIDIA H200", "module_key": "k", "reps": 5,
                       "decode": [{"depth": depth, "tok_s_median": rate, "fill_ms": 1.0}]}) + "\n"


def test_the_round_report_shows_stage_variants_between_the_two_base_runs(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    gpu_round = _gpu_round()
    monkeypatch.setattr(gpu_round, "VARIANT_STEPS", {"pdl": {"programmatic_launch": "on"},
                                                     "planar": {"q6_k_layout": "planar"}, "q8": {"activations": "q8"}})
    monkeypatch.setattr(gpu_round, "VARIANT_KNOBS", {})
    for name, rate in (("base", 250.0), ("pdl", 270.0), ("planar", 260.0), ("q8", 280.0), ("base-again", 251.0)):
        (tmp_path / f"decode-variant-{name}.json").write_text(_decode_result(128, rate))
    (tmp_path / "planar-gate.txt").write_text("PASS mean KL 4.0e-06\n")
    report = gpu_round.report(tmp_path)
    heads = [report.index(f"stage variants, {name} {label}, host sees every token:") for name, label in
             (("base", "(the full module)"), ("pdl", "{'programmatic_launch': 'on'}"),
              ("planar", "{'q6_k_layout': 'planar'}"), ("q8", "{'activations': 'q8'}"))]
    again = report.index("stage variants, base (the full module)", heads[0] + 1)
    rates = [report.index(r) for r in ("250.0", "251.0", "270.0", "260.0", "280.0")]
    assert heads[0] < rates[0] < again < rates[1] < heads[1] < rates[2] < heads[2] < rates[3] < heads[3] < rates[4]
    assert "0.75" in report  # 250 / 333.6
    assert "the planar module ({'q6_k_layout': 'planar'}): full-size gate:\n  PASS mean KL 4.0e-06" in report


def test_the_round_report_shows_the_gate_and_prefill_through_the_t_token_step(tmp_path: Path) -> None:
    import json

    gpu_round = _gpu_round()
    (tmp_path / "chunked-gate.txt").write_text("PASS mean KL 3.0e-05\n")
    (tmp_path / "chunked-gate-largest.txt").write_text("PASS mean KL 3.1e-05\n")
    prefill = {"card": "NVIDIA H200", "mode": "device-loop", "reps": 2,
               "prefill": [{"tokens": 4096, "tok_s_median": 5000.0, "ttft_ms_median": 819.2}]}
    (tmp_path / "prefill-chunked.json").write_text(json.dumps(prefill) + "\n")
    report = gpu_round.report(tmp_path)
    assert "full-size gate, teacher-forced through its T-token step:\n  PASS mean KL 3.0e-05" in report
    assert "pp4096" in report and "5000.0" in report and "0.47" in report  # 5000 / 10577
    assert "through the full module's largest T-token step only (--prefill-chunk):\n  PASS mean KL 3.1e-05" in report


def test_profile_summary_keeps_whole_steps_of_the_named_step_only(tmp_path: Path) -> None:
    """A module with a T-token step runs both steps: the decode table leaves the chunk's kernels
    out, and the step that ncu's launch count cut off."""
    import sys

    launches = ["gemv_kernel", "advance_kernel",  # the decode step's warm-up
                "gemm_kernel", "gemm_kernel_1", "advance_chunk_kernel",  # the prompt's chunk (a split-K GEMM)
                "gemv_kernel", "advance_kernel",  # a decode step
                "gemv_kernel"]  # cut off
    rows = ['"ID","Kernel Name","Metric Name","Metric Unit","Metric Value"']
    for i, name in enumerate(launches):
        rows.append(f'"{i}","{name}(float*)","gpu__time_duration.sum","us","{10 + i}"')
        rows.append(f'"{i}","{name}(float*)","dram__bytes_read.sum","byte","1000"')
    csv = tmp_path / "ncu.csv"
    csv.write_text("==PROF== app output\n" + "\n".join(rows) + "\n")

    def summary(*args: str) -> str:
        proc = subprocess.run([sys.executable, str(BENCH / "profile_summary.py"), str(csv), *args],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    decode = summary()
    assert "4 kernels in 2 whole steps" in decode and "gemm" not in decode
    assert "gemv" in decode and "12.50" in decode  # launches 0 and 5: (10 + 15) / 2 us
    assert decode.splitlines()[-1].split()[-1] == "26.0"  # gemv 12.5 + advance (11 + 16) / 2
    chunk = summary("--step-end", "advance_chunk")
    assert "3 kernels in 1 whole steps" in chunk and "gemv" not in chunk
    # the GEMM's two kernels on their own lines: 12 us, then its sum 13 us (not one 12.5 us mean)
    assert [line.split()[:3] for line in chunk.splitlines() if line.startswith("gemm")] == [
        ["gemm#1", "1.0", "13.00"], ["gemm", "1.0", "12.00"]]


def test_the_round_report_shows_a_chunked_variants_prefill_beside_its_decode(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    import json

    gpu_round = _gpu_round()
    monkeypatch.setattr(gpu_round, "VARIANT_STEPS", {"tiles": {}})
    monkeypatch.setattr(gpu_round, "VARIANT_KNOBS", {"tiles": {"moe_chunk.grouped_gemm_f16(...)": {"rows": 64}}})
    for name, rate, pp in (("base", 250.0, 3300.0), ("tiles", 251.0, 6600.0)):
        result = json.loads(_decode_result(128, rate))
        result["prefill"] = [{"tokens": 4096, "tok_s_median": pp, "ttft_ms_median": 4096 / pp * 1e3}]
        result["mode"] = "host-sync"
        (tmp_path / f"decode-variant-{name}.json").write_text(json.dumps(result) + "\n")
    (tmp_path / "tiles-gate.txt").write_text("PASS mean KL 4.0e-06\n")
    (tmp_path / "tiles-gate-largest.txt").write_text("PASS mean KL 4.1e-06\n")
    report = gpu_round.report(tmp_path)
    tiles = report.index("stage variants, tiles")
    assert report.index("3300.0") < tiles < report.index("6600.0")
    assert "0.62" in report[tiles:]  # 6600 / 10577 (llama.cpp's pp4096 on an H200)
    gate = report.index("the tiles module (moe_chunk.grouped_gemm_f16 {'rows': 64}): full-size gate:\n  PASS mean KL 4.0e")
    assert report.index("full-size gate, through its largest T-token step only:\n  PASS mean KL 4.1e-06") > gate


def test_the_round_report_shows_an_earlier_trees_module_as_variant_before(tmp_path: Path) -> None:
    gpu_round = _gpu_round()
    for name, rate in (("base", 290.0), ("before", 270.0)):
        (tmp_path / f"decode-variant-{name}.json").write_text(_decode_result(128, rate))
    (tmp_path / "before-gate.txt").write_text("PASS mean KL 5.0e-06\n")
    report = gpu_round.report(tmp_path)
    head = report.index("stage variants, before (an earlier tree's full module")
    assert report.index("290.0") < head < report.index("270.0")
    assert "the before module ((an earlier tree's full module, compiled/<arch>/before/)): full-size gate:" in report
