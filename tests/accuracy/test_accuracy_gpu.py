"""The accuracy gate on the GPU for the shipped model: the Q4_K_M step against its F16 original
(the default thresholds), and against the numpy forward of the same file (tight limits); and
for the full-size synthetic Qwen3-30B-A3B (when SPARKINFER_FULL_MODEL names it, as
bench/gpu_round.sh does) against the numpy forward of that file saved once in
bench/refs/ (its 48 layers take ~10 minutes in numpy: too slow for every run).

GPU machines carry runtime-only TVM: the step and the F16 reference come prebuilt by
`prebuild(arch, out_dir)` below, which `python -m tests.gpu_prebuild` calls with
out_dir = compiled/gpu-tests/<arch>/accuracy/ (`accuracy_dir`). The step is also found where
`sparkinfer run` looks (compiled/<arch>/, the prebuild's "default" part).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from sparkinfer.accuracy import Thresholds, evaluate

pytestmark = pytest.mark.gpu

REF_FILE = "default-f16.ref.npz"  # the default gate's reference: default text, 512 tokens, greedy 64 after 32
# `sparkinfer accuracy Q30.gguf --tokens 128 --prompt-tokens 32 --greedy 32 --ref-only --save-ref FULL_REF`
# with Q30.gguf from `sparkinfer synth --preset qwen3-30b-a3b` (bench/NOTES.md: how long, what it holds)
FULL_REF = Path(__file__).resolve().parents[2] / "bench" / "refs" / "qwen3-30b-a3b-synth.npz"
FULL_GATE = {"n_tokens": 128, "prompt_tokens": 32, "greedy_tokens": 32}
# The synthetic model against its own numpy forward. Its distributions are nearly flat (logit std
# ~0.9 over 151936 tokens), so the top-2 gap is often small and a 48-layer float32 accumulation
# may flip a few argmaxes: top-1 and greedy match are judged at 95 % / 90 %, KL and perplexity
# tightly; a kernel that drifts moves all four.
FULL_THRESHOLDS = Thresholds(max_mean_kl=1e-3, min_top1=0.95, max_ppl_ratio=1.005, min_greedy_match=0.9)


def accuracy_dir(arch: str) -> Path:
    from tests.gpu_prebuild import gpu_tests_dir

    return gpu_tests_dir(arch) / "accuracy"


def _default_model():  # noqa: ANN202
    from sparkinfer.data import default_model_path
    from sparkinfer.gguf_file import GGUFModel

    return GGUFModel.open(default_model_path())


def prebuild(arch: str, out_dir: Path) -> list[str]:
    """Build what these tests need on a machine with full TVM (and nvcc for a CUDA arch): the
    shipped model's step for `arch` in `out_dir/<arch>/<key>/` (the compiler's layout with root
    `out_dir`) and the default gate's F16 reference in `out_dir/default-f16.ref.npz`. Returns
    the paths written."""
    from sparkinfer.compiler.pipeline import compile_model
    from sparkinfer.data import default_model_path, default_reference_path

    out_dir = Path(out_dir)
    model = _default_model()
    types = {name: info.ggml_type for name, info in model.tensors.items()}
    module = Path(compile_model(model.config, types, arch, out_dir).directory)
    ref = out_dir / REF_FILE
    evaluate(default_model_path(), ref_model=default_reference_path(), save_ref=ref, reference_only=True)
    return [str(module), str(ref)]


def find_step(arch: str, roots: list[Path]) -> Path | None:
    from sparkinfer.runtime.engine import find_module, type_map_of

    model = _default_model()
    found = find_module(roots, arch, model.config, type_map_of(model))
    return None if found is None else Path(found.directory)


@pytest.fixture(scope="module")
def arch() -> str:
    from sparkinfer.runtime.device import detect_arch

    return detect_arch()


@pytest.fixture(scope="module")
def step(arch: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sparkinfer.runtime.engine import default_search_roots
    from tests.gpu_prebuild import can_compile, missing_reason

    found = find_step(arch, [accuracy_dir(arch), *default_search_roots()])
    if found is not None:
        return found
    if not can_compile():
        pytest.skip(missing_reason("step of the shipped model", accuracy_dir(arch), arch))
    return Path(prebuild(arch, tmp_path_factory.mktemp("accuracy-gpu"))[0])


def test_shipped_model_passes_the_gate_on_the_gpu(arch: str, step: Path) -> None:
    from sparkinfer.data import default_model_path, default_reference_path

    saved = accuracy_dir(arch) / REF_FILE
    if saved.is_file():  # made on another machine: also checks that a saved reference travels
        report = evaluate(default_model_path(), ref=saved, arch=arch, module_dir=step)
    else:
        report = evaluate(default_model_path(), ref_model=default_reference_path(), arch=arch, module_dir=step)
    assert report.ok, report.table()
    assert report.engine["arch"] == arch
    # Measured on the CPU runtime (sparkinfer/data/README.md): 0.0089, 94.5 %, 1.0046, 89 %.
    m = report.metrics
    assert m["mean_kl"] < 0.015 and m["top1_agreement"] > 0.92 and m["ppl_ratio"] < 1.02


def test_shipped_model_matches_its_own_numpy_forward_on_the_gpu(arch: str, step: Path) -> None:
    from sparkinfer.data import default_model_path

    tight = Thresholds(max_mean_kl=1e-3, min_top1=0.99, max_ppl_ratio=1.005, min_greedy_match=0.98)
    report = evaluate(default_model_path(), arch=arch, module_dir=step, thresholds=tight)
    assert report.ok, report.table()


def test_full_size_synthetic_model_passes_the_gate(arch: str) -> None:
    model = os.environ.get("SPARKINFER_FULL_MODEL")
    if not model or not Path(model).is_file():
        pytest.skip("SPARKINFER_FULL_MODEL names no file: point it at `sparkinfer synth --preset qwen3-30b-a3b` "
                    "output (bench/gpu_round.sh does)")
    report = evaluate(model, ref=FULL_REF, arch=arch, thresholds=FULL_THRESHOLDS, **FULL_GATE)
    out = Path(tempfile.gettempdir()) / "sparkinfer-gpu-tests" / "full_size_gate.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report.table() + "\n")
    assert report.ok, report.table()
