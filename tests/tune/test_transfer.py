"""The committed schedules files of the untuned CUDA arches are what
`python -m sparkinfer.tune.transfer` writes: sm_90's measured step variants and the arch table's
defaults for the kernels of the step built with them, marked transferred."""

from pathlib import Path

import pytest

from sparkinfer.schedule.schedules import TRANSFERRED, SchedulesFile, packaged_schedules_path, schedules_for
from sparkinfer.tune.transfer import MEASURED_ARCH, main, measured_schedules, reference_model_kernels, transferred_schedules


@pytest.mark.parametrize("arch", ["sm_120", "sm_121"])
def test_committed_file_is_the_arch_default_transferred(arch: str) -> None:
    measured = measured_schedules()
    kernels = reference_model_kernels(arch, measured)
    committed, path = schedules_for(arch)
    assert path == packaged_schedules_path(arch)
    assert committed == transferred_schedules(arch, kernels, measured.step), \
        f"{path} is stale: run python -m sparkinfer.tune.transfer --arch {arch}"
    assert {e.source for e in committed.kernels.values()} == {TRANSFERRED}
    # the step measured on sm_90, and the int8 kernels it compiles (not the float32 ones it replaces)
    assert committed.step == measured.step and committed.step["activations"] == "q8"
    # (the int8 gate/up ranking the router logits itself: router_merge "gate_up")
    assert "moe_q8.moe_gate_up_silu_q8_routed('Q4_K', 'Q4_K', 128, 8, 768, 2048)" in committed.kernels
    assert "moe.moe_gate_up_silu('Q4_K', 'Q4_K', 128, 8, 768, 2048)" not in committed.kernels
    assert "router.router_topk(128, 8)" not in committed.kernels
    assert MEASURED_ARCH in committed.made_by["how"]


def test_the_command_writes_where_it_is_told(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--arch", "sm_121", "--out", str(tmp_path / "sm_121.json")]) == 0
    assert "transferred (untuned)" in capsys.readouterr().out
    assert SchedulesFile.read(tmp_path / "sm_121.json").arch == "sm_121"
