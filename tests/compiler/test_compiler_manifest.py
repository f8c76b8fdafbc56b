"""compile_model for the CPU: manifest contents and round trip, the module cache, determinism."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sparkinfer.compiler import manifest as M
from sparkinfer.compiler.pipeline import compile_model, step_variants, workspace_bytes
from sparkinfer.errors import CompiledModuleError
from sparkinfer.gguf_file import preset_config, tensor_specs, type_map
from sparkinfer.kernels.use import KernelUse
from sparkinfer.model.qwen3moe import build_decode_step
from sparkinfer.schedule.schedules import schedules_for
from sparkinfer.schedule.space import kernel_key

pytestmark = pytest.mark.slow

TINY = preset_config("tiny")
TYPES = type_map(TINY, "q4_k_m")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    return compile_model(TINY, TYPES, "cpu", tmp_path_factory.mktemp("compiled"))


def test_module_lands_in_arch_and_key_directory(compiled) -> None:  # noqa: ANN001
    assert compiled.directory.parent.name == "cpu"
    assert compiled.directory.name == M.module_key(TINY, TYPES) == compiled.manifest.key
    assert (compiled.directory / "model.so").is_file()
    assert (compiled.directory / "manifest.json").is_file()
    assert not compiled.cached


def test_manifest_records_what_the_runtime_needs(compiled) -> None:  # noqa: ANN001
    raw = json.loads((compiled.directory / "manifest.json").read_text())
    assert raw["format"] == M.MANIFEST_FORMAT and raw["arch"] == "cpu" and raw["entry"] == "decode"
    assert raw["tvm_version"] == M.tvm_version()
    assert raw["hparams_hash"] == TINY.hparams_hash() == raw["model"]["hparams_hash"]
    assert raw["type_map_hash"] == M.type_map_hash(TYPES)
    assert (raw["page_size"], raw["max_pages"]) == (64, 32)
    assert raw["n_splits"] >= 1 and raw["kv_dtype"] == "float16"
    assert raw["library"] == "model.so"
    assert raw["library_sha256"] == hashlib.sha256((compiled.directory / "model.so").read_bytes()).hexdigest()
    assert raw["target"]["kind"] == "llvm"
    assert [o["name"] for o in raw["outputs"]] == ["logits", "next"]
    inputs = raw["inputs"]
    assert [i["role"] for i in inputs[:12]] == ["state"] * 8 + ["kv"] * 4
    assert inputs[8] == {"name": "k_cache_0", "role": "kv", "dtype": "float16", "shape": ["n_pages", 64, 2, 64]}
    weights = [i for i in inputs if i["role"] == "weight"]
    assert [w["tensor"] for w in weights] == [s.name for s in tensor_specs(TINY)]
    assert all(w["ggml_type"] == TYPES[w["tensor"]].name for w in weights)
    # Every kernel says which rule scheduled it, with which knobs from where.
    # The package's cpu schedules file (tuned on the shipped model) covers kernels of the same shapes.
    found, _ = schedules_for("cpu")
    tuned = set(found.kernels) if found else set()
    for k in raw["kernels"]:
        key = kernel_key(KernelUse(k["name"], k["family"], k["factory"], tuple(k["args"])))
        assert k["schedule"]["source"] == ("tuned" if key in tuned else "default"), key
    assert raw["prefill_chunks"] == list(compiled.manifest.prefill_chunks) == [128]
    assert all({"name", "family", "factory", "args"} <= set(k) for k in raw["kernels"])
    # (the step as compile_model builds it: the cpu's flash-decode splits and step variants)
    step = build_decode_step(TINY, TYPES, n_splits=raw["n_splits"], prefill_chunks=(128,),
                             **step_variants("cpu", found))
    assert raw["workspace_bytes"] == workspace_bytes(step.mod) > 128 * TINY.vocab_size * 4


def test_workspace_counts_each_function_and_its_outputs() -> None:
    """A T-token step of T tokens adds its prefill and score functions: at least the score's
    logits [T, V] beside what the decode step alone allocates."""
    vocab, hidden = TINY.vocab_size, TINY.hidden

    def workspace(chunks: tuple[int, ...]) -> int:
        return workspace_bytes(build_decode_step(TINY, TYPES, prefill_chunks=chunks).mod)

    decode_only = workspace(())
    assert vocab * 4 <= decode_only < 4 * (vocab + 64 * hidden) * 4  # its logits, then a few vectors
    with_16 = workspace((16,))
    assert with_16 - decode_only >= 16 * vocab * 4 + 16 * hidden * 4  # score_16's logits and a row of h a token
    assert workspace((16, 64)) - with_16 >= 64 * vocab * 4


def test_manifest_round_trip(compiled) -> None:  # noqa: ANN001
    again = M.Manifest.read(compiled.directory)
    assert again.to_json() == compiled.manifest.to_json()
    assert again.inputs == compiled.manifest.inputs
    assert again.config == TINY
    assert again.library == compiled.directory / "model.so"
    assert [i.name for i in again.kv] == ["k_cache_0", "v_cache_0", "k_cache_1", "v_cache_1"]


def test_the_runtime_reads_the_manifest(compiled) -> None:  # noqa: ANN001
    runtime = pytest.importorskip("sparkinfer.runtime")
    m = runtime.Manifest.load(compiled.directory)
    assert m.arch == "cpu" and m.page_size == 64 and m.max_pages == 32
    assert m.hparams_hash == TINY.hparams_hash()
    assert m.library == compiled.directory / "model.so"
    assert [i.name for i in m.inputs] == [i.name for i in compiled.manifest.inputs]
    assert [i.tensor for i in m.weights] == [i.tensor for i in compiled.manifest.weights]


def test_find_compiled_finds_only_a_matching_module(compiled, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    root = compiled.directory.parents[1]
    found = M.find_compiled(TINY, TYPES, "cpu", root)
    assert found is not None and found.key == compiled.manifest.key and found.directory == compiled.directory
    assert M.find_compiled(TINY, TYPES, "cpu", root, n_splits=found.n_splits) is not None
    assert M.find_compiled(TINY, TYPES, "cpu", root, n_splits=found.n_splits + 1) is None
    assert M.find_compiled(TINY, TYPES, "sm_90", root) is None
    assert M.find_compiled(TINY, type_map(TINY, "f16"), "cpu", root) is None
    assert M.find_compiled(TINY.replace(rope_theta=1e4), TYPES, "cpu", root) is None
    monkeypatch.setattr(M, "sources_hash", lambda arch, schedules=None: "0" * 16)
    assert M.find_compiled(TINY, TYPES, "cpu", root) is None
    assert M.find_compiled(TINY, TYPES, "cpu", root, check_sources=False) is not None


def test_a_manifest_of_another_format_is_refused(compiled, tmp_path: Path) -> None:  # noqa: ANN001
    raw = compiled.manifest.to_json()
    raw["format"] = M.MANIFEST_FORMAT + 1
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    (tmp_path / "model.so").write_bytes(b"")
    with pytest.raises(CompiledModuleError, match=f"manifest format {M.MANIFEST_FORMAT + 1} is not {M.MANIFEST_FORMAT}: recompile the model"):
        M.Manifest.load(tmp_path)


def test_the_manifest_format_imports_no_tvm() -> None:
    # The runtime reads manifests with runtime-only TVM and no build pipeline.
    code = ("import sys, sparkinfer.runtime; print(sorted(m for m in sys.modules "
            "if m.split('.')[0] == 'tvm' or m.startswith('sparkinfer.compiler.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['sparkinfer.compiler.manifest']"


def test_compile_model_reuses_an_up_to_date_module(compiled) -> None:  # noqa: ANN001
    again = compile_model(TINY, TYPES, "cpu", compiled.directory.parents[1])
    if again.manifest.sources_hash != compiled.manifest.sources_hash:
        pytest.skip("the package's sources changed while the tests ran")
    assert again.cached and again.directory == compiled.directory


def test_key_depends_on_hyper_parameters_and_types_only() -> None:
    assert M.module_key(TINY, TYPES) == M.module_key(preset_config("tiny"), dict(reversed(list(TYPES.items()))))
    assert M.module_key(TINY, {k: int(v) for k, v in TYPES.items()}) == M.module_key(TINY, TYPES)
    assert M.module_key(TINY, TYPES) != M.module_key(TINY, type_map(TINY, "f16"))
    assert M.module_key(TINY, TYPES) != M.module_key(TINY.replace(context_length=4096), TYPES)


def test_compilation_is_deterministic(compiled, tmp_path: Path) -> None:  # noqa: ANN001
    again = compile_model(TINY, TYPES, "cpu", tmp_path, force=True)
    assert (again.directory / "model.so").read_bytes() == (compiled.directory / "model.so").read_bytes()
    first, second = compiled.manifest.to_json(), again.manifest.to_json()
    first.pop("sources_hash"), second.pop("sources_hash")  # other engineers' edits may land in between
    assert first == second


def test_unknown_arch_is_rejected_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sm_89"):
        compile_model(TINY, TYPES, "sm_89", tmp_path)
    assert not any(tmp_path.iterdir())


def test_a_schedules_file_is_applied_recorded_and_part_of_the_cache_key(compiled, tmp_path: Path) -> None:  # noqa: ANN001
    from sparkinfer.compiler.pipeline import schedules_summary
    from sparkinfer.schedule.schedules import ScheduleEntry, SchedulesFile

    from sparkinfer.schedule.space import kernel_key, kernel_use

    # a file of one tuned kernel and no step variants: a float step, whose norms are rms_norm
    key = kernel_key(kernel_use("norm", "rms_norm", TINY.hidden, TINY.rms_eps))
    path = SchedulesFile("cpu", {}, {key: ScheduleEntry({"vector": 1}, "tuned", 1.0, 2.0, 4, 0)}).write(tmp_path / "cpu.json")
    root = compiled.directory.parents[1]
    tuned = compile_model(TINY, TYPES, "cpu", root, schedules=path)
    assert not tuned.cached  # another schedule choice: recompiled, not the module built without it
    record = next(k["schedule"] for k in tuned.manifest.kernels if k["factory"] == "rms_norm")
    assert record == {"rule": "sparkinfer.schedule.cpu.RmsNormCpuRule", "source": "tuned", "knobs": {"vector": 1}}
    n = len(tuned.manifest.kernels)
    assert schedules_summary(tuned.manifest) == f"schedules: 1 tuned, {n - 1} default ({path})"
    assert compile_model(TINY, TYPES, "cpu", root, schedules=path).cached
