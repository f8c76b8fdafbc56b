"""Which GPU schedule each kernel gets: a tuning record, else the family's hand schedule,
else dlight's default rules with a warning that names the kernel. No build here."""

from pathlib import Path

import pytest
import tvm
from tvm import s_tir

from sparkinfer.compiler import pipeline
from sparkinfer.compiler.targets import target_for
from sparkinfer.kernels import norm
from sparkinfer.model.qwen3moe import DecodeStep, KernelUse
from sparkinfer.gguf_file import preset_config

TINY = preset_config("tiny")


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


def test_a_kernel_without_schedule_falls_back_to_dlight_with_a_warning(tmp_path: Path) -> None:
    step = one_kernel_step("nofamily", "rms_norm", norm.rms_norm(256, 1e-6), (256, 1e-6))
    warnings: list[str] = []
    provenance = pipeline.schedule_step(step, "sm_90", logs=tmp_path, warn=warnings.append)
    assert provenance == {"k0": pipeline.DLIGHT}
    assert len(warnings) == 1 and "k0" in warnings[0] and "dlight" in warnings[0]
    assert step.mod["k0"].attrs["tirx.is_scheduled"]


def test_a_registered_rule_schedules_its_kernel(tmp_path: Path) -> None:
    from gguf import GGMLQuantizationType as T

    from sparkinfer.kernels import gemv

    step = one_kernel_step("gemv", "gemv", gemv.gemv(T.Q4_K, 512, 2048), ("Q4_K", 512, 2048))
    provenance = pipeline.schedule_step(step, "sm_90", logs=tmp_path, warn=pytest.fail)
    assert provenance == {"k0": "hand:sparkinfer.schedule.gemv.GemvCudaRule"}
    assert "threadIdx.x" in step.mod["k0"].script()


def test_a_tuning_record_wins_over_dlight(tmp_path: Path) -> None:
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    func = norm.rms_norm(256, 1e-6)
    target = target_for("sm_90")
    workload_mod = _normalize_mod(func)
    sch = s_tir.Schedule(workload_mod)
    block = sch.get_sblock("norm", func_name="main")
    (loop,) = sch.get_loops(block)
    bx, tx = sch.split(loop, [None, 64])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    logs = tmp_path / "logs"
    (logs / "sm_90").mkdir(parents=True)
    db = ms.database.JSONDatabase(work_dir=str(logs / "sm_90"), allow_missing=True)
    workload = db.commit_workload(workload_mod)
    db.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, [1e-6], target))

    step = one_kernel_step("nofamily", "rms_norm", func, (256, 1e-6))
    provenance = pipeline.schedule_step(step, "sm_90", logs=logs, warn=pytest.fail)
    assert provenance["k0"].startswith(pipeline.TUNED + ":") and provenance["k0"].endswith("sm_90")
    assert "T.thread_binding(64, thread=\"threadIdx.x\")" in step.mod["k0"].script()

