"""CUDA builds of the whole decode step (no GPU needed): the tiny model and a full-width
one-layer Qwen3-30B-A3B cut, for every arch, each exported with an embedded nvcc fatbin for
exactly that arch and no CUDA source (so it loads with runtime-only TVM, no NVRTC or nvcc).
About 6-8 s a build on 2 cores."""

import json
from pathlib import Path

import pytest

from sparkinfer.compiler import targets
from sparkinfer.compiler.pipeline import compile_model
from sparkinfer.gguf_file import preset_config, type_map

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(targets.find_nvcc() is None, reason="nvcc not found (CUDA_HOME, /usr/local/cuda or PATH)"),
]

CUDA_ARCHS = ["sm_90", "sm_120", "sm_121"]
MODELS = {
    "tiny": preset_config("tiny"),
    "30b-a3b-1layer": preset_config("qwen3-30b-a3b", n_layers=1),
}


def library_bytes(path: Path) -> bytes:
    import tarfile

    if path.suffix != ".tar":
        return path.read_bytes()
    with tarfile.open(path, "r:*") as tar:
        return b"".join(f.read() for m in tar.getmembers() if m.isfile() and (f := tar.extractfile(m)))


@pytest.mark.parametrize("arch", CUDA_ARCHS)
@pytest.mark.parametrize("model", list(MODELS))
def test_whole_step_builds_with_a_fatbin_for_the_arch(model: str, arch: str, tmp_path: Path) -> None:
    config = MODELS[model]
    types = type_map(config, "q4_k_m")
    # the decode step alone (test_compiler_prefill_cuda.py builds one with a T-token step)
    result = compile_model(config, types, arch, tmp_path, prefill_chunks=())
    manifest = result.manifest
    lib = result.directory / manifest.library
    assert lib.name == ("model.tar" if arch == "sm_121" else "model.so")
    fatbins = targets.embedded_fatbins(lib)
    assert len(fatbins) == 1
    assert targets.fatbin_entries(fatbins[0]) == [targets.FatbinEntry("cubin", arch + "a")]
    assert manifest.fatbins == [{"kind": "cubin", "arch": arch + "a"}]
    assert b'extern "C" __global__' not in library_bytes(lib)
    # Every kernel was scheduled, and the manifest says how.
    for kernel in manifest.kernels:
        assert kernel["schedule"]["source"] in ("tuned", "transferred", "default"), kernel
        assert kernel["schedule"]["rule"].startswith(f"sparkinfer.schedule.{kernel['family']}."), kernel
    gemvs = [k for k in manifest.kernels if k["family"] == "gemv"]
    assert gemvs and all(k["schedule"]["knobs"]["lanes"] >= 1 for k in gemvs)
    # Q/K/V in one launch, on float or (sm_90.json's projection_activations) int8 activations
    assert any(k["factory"] in ("gemv_qkv", "gemv_qkv_q8") for k in manifest.kernels)
    if model == "30b-a3b-1layer":
        # every arch's packaged step (sm_90's measured variants, tune/transfer.py): int8 activations,
        # the experts picked inside the int8 gate/up, and the tensor-core decode attention
        factories = {k["factory"] for k in manifest.kernels}
        assert {"moe_gate_up_silu_q8_routed", "gemv_qkv_q8", "paged_decode_attention_mma"} <= factories, factories
        assert "router_topk" not in factories
    raw = json.loads((result.directory / "manifest.json").read_text())
    assert raw["target"]["kind"] == "cuda" and raw["target"]["arch"] == arch + "a"
    assert raw["max_pages"] == -(-config.context_length // 64)


def test_compiling_twice_with_the_same_schedules_gives_the_same_library(tmp_path: Path) -> None:
    config = MODELS["tiny"]
    types = type_map(config, "q4_k_m")
    first = compile_model(config, types, "sm_90", tmp_path / "a", prefill_chunks=())
    second = compile_model(config, types, "sm_90", tmp_path / "b", prefill_chunks=())
    assert not second.cached
    assert library_bytes(first.directory / first.manifest.library) == \
        library_bytes(second.directory / second.manifest.library)


def test_fused_launches_step_builds(tmp_path: Path) -> None:
    """The decode_launches="fused" variant, picked by a schedules file, on the full-width cut
    (for sm_90: tests/schedule/test_fused_decode_cuda.py has nvcc build its kernels for every
    arch)."""
    from sparkinfer.schedule.schedules import SchedulesFile

    arch = "sm_90"
    config = MODELS["30b-a3b-1layer"]
    schedules = SchedulesFile(arch, {}, step={"decode_launches": "fused"}).write(tmp_path / f"{arch}.json")
    result = compile_model(config, type_map(config, "q4_k_m"), arch, tmp_path / "out", prefill_chunks=(),
                           schedules=schedules)
    factories = {k["factory"] for k in result.manifest.kernels}
    assert {"gemv_qkv_normed", "gemv_residual", "gemv_normed", "moe_gate_up_silu_routed"} <= factories
    assert not factories & {"add_rms_norm", "router_topk"}
    fatbins = targets.embedded_fatbins(result.directory / result.manifest.library)
    assert targets.fatbin_entries(fatbins[0]) == [targets.FatbinEntry("cubin", arch + "a")]
