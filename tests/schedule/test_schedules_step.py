"""A schedules file's model-level variants ("step"): round trip, defaults, bad values."""

import json
from pathlib import Path

import pytest

from sparkinfer.schedule.schedules import STEP_VARIANTS, SchedulesFile, SchedulesFileError


def test_step_variants_round_trip_and_default_to_none(tmp_path: Path) -> None:
    path = SchedulesFile("sm_90", {}, step={"activations": "q8"}).write(tmp_path / "a.json")
    assert SchedulesFile.read(path).step == {"activations": "q8"}
    plain = SchedulesFile("sm_90", {}).write(tmp_path / "b.json")
    assert "step" not in json.loads(plain.read_text())
    assert SchedulesFile.read(plain).step == {}
    assert STEP_VARIANTS["activations"][0] == "f32"  # the default comes first


@pytest.mark.parametrize("step, message", [
    ({"activations": "int4"}, "step variant activations='int4' is not one of"),
    ({"weights": "q8"}, "step variant weights='q8' is not one of"),
    ("q8", "step variant None='q8' is not one of"),
])
def test_an_unknown_step_variant_is_refused(tmp_path: Path, step: object, message: str) -> None:
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps({"arch": "cpu", "kernels": {}, "step": step}))
    with pytest.raises(SchedulesFileError, match=message):
        SchedulesFile.read(path)


def test_the_gpus_default_to_half_chunk_operands_unless_their_file_says_otherwise() -> None:
    from sparkinfer.compiler.pipeline import step_variants

    assert STEP_VARIANTS["chunk_operands"] == ("f32", "f16")
    assert step_variants("cpu", None) == {}
    for arch in ("sm_90", "sm_120", "sm_121"):
        assert step_variants(arch, None) == {"chunk_operands": "f16"}
        chosen = SchedulesFile(arch, {}, step={"chunk_operands": "f32", "activations": "q8"})
        assert step_variants(arch, chosen) == {"chunk_operands": "f32", "activations": "q8"}


@pytest.mark.parametrize("name, value, why", [
    ("chunk_operands", "f16", "tensor-core operands"),
    ("programmatic_launch", "on", "the cpu build launches no kernels"),
    ("attention_form", "compact", "the cpu build's attention multiplies float32"),
    ("attention_merge", "last_block", "one kernel merges nothing"),
    ("attention_form", "registers", r"\(mma.sync\); the cpu build's attention multiplies float32"),
    ("router_merge", "last_block", "no thread blocks to count"),
])
def test_the_cpu_refuses_the_cuda_only_variants(tmp_path: Path, name: str, value: str, why: str) -> None:
    path = SchedulesFile("cpu", {}, step={name: value}).write(tmp_path / "cpu.json")
    with pytest.raises(SchedulesFileError, match=rf"step variant {name}='{value}' is for the CUDA archs only \(.*{why}"):
        SchedulesFile.read(path)
    gpu = SchedulesFile("sm_90", {}, step={name: value}).write(tmp_path / "sm_90.json")
    assert SchedulesFile.read(gpu).step == {name: value}


def test_programmatic_launch_is_off_unless_a_file_says_otherwise() -> None:
    from sparkinfer.compiler.pipeline import step_variants

    assert STEP_VARIANTS["programmatic_launch"] == ("off", "on", "prefetch", "weights")
    assert all("programmatic_launch" not in step_variants(arch, None) for arch in ("cpu", "sm_90", "sm_120", "sm_121"))


def test_the_attention_form_is_read_ahead_unless_a_file_says_another() -> None:
    from sparkinfer.compiler.pipeline import step_variants

    assert STEP_VARIANTS["attention_form"] == ("read_ahead", "compact", "registers")
    assert all("attention_form" not in step_variants(arch, None) for arch in ("cpu", "sm_90", "sm_120", "sm_121"))


def test_the_attention_merges_separately_unless_a_file_says_last_block() -> None:
    from sparkinfer.compiler.pipeline import step_variants

    assert STEP_VARIANTS["attention_merge"] == ("separate", "last_block")
    assert all("attention_merge" not in step_variants(arch, None) for arch in ("cpu", "sm_90", "sm_120", "sm_121"))


def test_the_router_picks_separately_unless_a_file_says_otherwise() -> None:
    from sparkinfer.compiler.pipeline import step_variants

    assert STEP_VARIANTS["router_merge"] == ("separate", "last_block", "gate_up")
    assert all("router_merge" not in step_variants(arch, None) for arch in ("cpu", "sm_90", "sm_120", "sm_121"))
