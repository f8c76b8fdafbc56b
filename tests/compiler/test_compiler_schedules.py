"""Which schedule each kernel gets: its registered rule with the schedules file's knobs, else the
rule's arch default; a kernel without a rule, or knobs outside the space, is an error naming
it. No build here."""

import json
import re
from pathlib import Path

import pytest
import tvm
from gguf import GGMLQuantizationType as T

from sparkinfer.compiler import pipeline
from sparkinfer.gguf_file import preset_config
from sparkinfer.kernels import gemv, norm
from sparkinfer.model.qwen3moe import DecodeStep
from sparkinfer.kernels.use import KernelUse
from sparkinfer.schedule.schedules import SchedulesFile, SchedulesFileError, schedules_for
from sparkinfer.schedule.space import ScheduleError

TINY = preset_config("tiny")
GEMV_KEY = "gemv.gemv('Q4_K', 512, 2048)"


def one_kernel_step(family: str, factory: str, func: tvm.tirx.PrimFunc, args: tuple) -> DecodeStep:
    name = "k0"
    return DecodeStep(
        mod=tvm.IRModule({name: func.without_attr("global_symbol")}),
        inputs=[],
        kernels=[KernelUse(name, family, factory, args)],
        config=TINY,
        page_size=64,
        max_pages=32,
        n_splits=1,
        originals={name: func},
    )


def gemv_step() -> DecodeStep:
    return one_kernel_step("gemv", "gemv", gemv.gemv(T.Q4_K, 512, 2048), ("Q4_K", 512, 2048))


def write_schedules(path: Path, knobs: dict, source: str = "tuned", arch: str = "sm_90") -> Path:
    entry = {"knobs": knobs, "source": source, "time_us": 1.0, "default_time_us": 2.0, "trials": 3, "seed": 0}
    path.write_text(json.dumps({"arch": arch, "made_by": {}, "kernels": {GEMV_KEY: entry}}))
    return path


def test_a_kernel_without_a_rule_is_an_error_naming_it() -> None:
    step = one_kernel_step("nofamily", "rms_norm", norm.rms_norm(256, 1e-6), (256, 1e-6))
    with pytest.raises(ScheduleError, match=r"kernel k0 \(nofamily.rms_norm\) has no schedule rule for sm_90"):
        pipeline.schedule_step(step, "sm_90")


def test_a_registered_rule_schedules_its_kernel_with_the_arch_default() -> None:
    step = gemv_step()
    records = pipeline.schedule_step(step, "sm_90")
    assert records == {"k0": {"rule": "sparkinfer.schedule.gemv.GemvCudaRule", "source": "default",
                              "knobs": {"lanes": 32, "rows": 4, "rows_per_thread": 1, "unroll": 256,
                                        "vector_header": 1}}}
    assert "threadIdx.x" in step.mod["k0"].script()


def test_the_schedules_file_knobs_win_over_the_default(tmp_path: Path) -> None:
    path = write_schedules(tmp_path / "sm_90.json", {"lanes": 8, "rows": 2, "rows_per_thread": 2, "unroll": 64,
                                                                 "vector_header": 0})
    schedules, _ = schedules_for("sm_90", path)
    step = gemv_step()
    records = pipeline.schedule_step(step, "sm_90", schedules)
    assert records["k0"]["source"] == "tuned" and records["k0"]["knobs"]["lanes"] == 8
    assert 'T.thread_binding(8, thread="threadIdx.x")' in step.mod["k0"].script()


def test_knobs_outside_the_space_name_the_kernel_and_the_knob(tmp_path: Path) -> None:
    path = write_schedules(tmp_path / "sm_90.json", {"lanes": 12, "rows": 2, "rows_per_thread": 2, "unroll": 64,
                                                                 "vector_header": 0})
    schedules, _ = schedules_for("sm_90", path)
    with pytest.raises(ScheduleError, match=re.escape(GEMV_KEY) + r".*knob lanes=12 is outside the space"):
        pipeline.schedule_step(gemv_step(), "sm_90", schedules)


def test_a_schedules_file_for_another_arch_or_damaged_is_refused(tmp_path: Path) -> None:
    path = write_schedules(tmp_path / "x.json", {}, arch="cpu")
    with pytest.raises(SchedulesFileError, match="is for cpu, not sm_90"):
        schedules_for("sm_90", path)
    with pytest.raises(SchedulesFileError, match="does not exist"):
        schedules_for("sm_90", tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"arch": "sm_90", "kernels": {"k": {"knobs": {}, "source": "guessed"}}}')
    with pytest.raises(SchedulesFileError, match="source 'guessed', not one of tuned, default, transferred"):
        schedules_for("sm_90", tmp_path / "bad.json")


def test_a_schedules_file_round_trips(tmp_path: Path) -> None:
    path = write_schedules(tmp_path / "sm_90.json", {"lanes": 8, "rows": 2, "rows_per_thread": 2, "unroll": 64,
                                                                 "vector_header": 0})
    found = SchedulesFile.read(path)
    again = SchedulesFile.read(found.write(tmp_path / "again.json"))
    assert again == found and again.kernels[GEMV_KEY].trials == 3
