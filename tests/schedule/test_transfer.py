"""The committed schedules files of the untuned CUDA arches are what
`python -m sparkinfer.schedule.transfer` writes: the arch table's defaults, marked transferred."""

from pathlib import Path

import pytest

from sparkinfer.schedule.schedules import TRANSFERRED, SchedulesFile, packaged_schedules_path, schedules_for
from sparkinfer.schedule.transfer import main, reference_model_kernels, transferred_schedules


@pytest.fixture(scope="module")
def kernels() -> list:
    return reference_model_kernels()


@pytest.mark.parametrize("arch", ["sm_120", "sm_121"])
def test_committed_file_is_the_arch_default_transferred(arch: str, kernels: list) -> None:
    committed, path = schedules_for(arch)
    assert path == packaged_schedules_path(arch)
    assert committed == transferred_schedules(arch, kernels), \
        f"{path} is stale: run python -m sparkinfer.schedule.transfer --arch {arch}"
    assert {e.source for e in committed.kernels.values()} == {TRANSFERRED}
    assert any(k.startswith("moe.moe_gate_up_silu('Q4_K', 'Q4_K', 128, 8, 768, 2048)") for k in committed.kernels)


def test_the_command_writes_where_it_is_told(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--arch", "sm_121", "--out", str(tmp_path / "sm_121.json")]) == 0
    assert "transferred (untuned)" in capsys.readouterr().out
    assert SchedulesFile.read(tmp_path / "sm_121.json").arch == "sm_121"
