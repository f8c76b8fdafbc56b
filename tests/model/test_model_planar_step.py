"""The planar Q6_K variant of the decode step (`q6_k_layout="planar"`): which weights it re-lays
out and which kernels read them, its bad input, binding, and on the CPU the whole step's logits
against the GGUF-layout step's, teacher-forced on the same tokens."""

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from sparkinfer.compiler.pipeline import compile_model
from sparkinfer.errors import CompiledModuleError, SparkInferError
from sparkinfer.gguf_file import preset_config, type_map
from sparkinfer.model.qwen3moe import build_decode_step
from sparkinfer.model.spec import LAYOUT_Q6_K_PLANAR, StepInput, bind_weight, file_bytes, from_file
from sparkinfer.quant import kquants
from sparkinfer.schedule.schedules import SchedulesFile

TINY_DENSE = preset_config("tiny-dense")


def planar_uses(step) -> dict[str, set[str]]:  # noqa: ANN001
    """factory -> names of the kernels of that factory taking planar Q6_K."""
    out: dict[str, set[str]] = {}
    for use in step.kernels:
        if use.args and use.args[0] == "Q6_K_PLANAR":
            out.setdefault(use.factory, set()).add(use.name)
    return out


@pytest.mark.parametrize("decode_launches", ["split", "fused"])
def test_planar_step_reads_every_q6_k_projection_planar(decode_launches: str) -> None:
    types = type_map(TINY_DENSE, "q4_k_m")  # Q6_K: output, blk.1.attn_v, blk.1.ffn_down
    step = build_decode_step(TINY_DENSE, types, prefill_chunks=(8,), decode_launches=decode_launches,
                             q6_k_layout="planar")
    relaid = {i.tensor: i for i in step.inputs if i.layout is not None}
    assert set(relaid) == {"output.weight", "blk.1.attn_v.weight", "blk.1.ffn_down.weight"}
    head = relaid["output.weight"]
    assert (head.layout, head.dtype, head.ggml_type) == (LAYOUT_Q6_K_PLANAR, "uint32", "Q6_K")
    assert head.shape == (TINY_DENSE.vocab_size, 224 // 4)  # one 210-byte block a row, padded to 16 bytes
    uses = planar_uses(step)
    v_factory = "gemv_normed" if decode_launches == "fused" else "gemv"  # V alone: Q and K are Q4_K
    assert uses.keys() == {"gemv", v_factory, "gemm", "moe_down_residual", "grouped_gemm"}
    assert any("gemv_q6_k_planar" in name for name in uses["gemv"])  # the LM head
    gguf = build_decode_step(TINY_DENSE, types, prefill_chunks=(8,), decode_launches=decode_launches)
    assert not planar_uses(gguf) and all(i.layout is None for i in gguf.inputs)
    assert len(step.kernels) == len(gguf.kernels)


def test_int8_kernels_read_q6_k_planar_too() -> None:
    """Int8 experts and int8 projections read the same planar rows as the float kernels: the
    re-laid-out weights do not depend on the activations (bench/NOTES.md, "Session 19")."""
    tiny = preset_config("tiny")  # Q6_K: output, blk.1.ffn_down_exps
    types = type_map(tiny, "q4_k_m")
    types["blk.0.attn_v.weight"] = T.Q6_K  # as in half of Qwen3-30B-A3B Q4_K_M's layers
    relaid = {"output.weight", "blk.0.attn_v.weight", "blk.1.ffn_down_exps.weight"}
    float_step = build_decode_step(tiny, types, q6_k_layout="planar")
    assert {i.tensor for i in float_step.inputs if i.layout} == relaid
    assert planar_uses(float_step).keys() == {"gemv", "moe_down_residual"}
    int8 = build_decode_step(tiny, types, q6_k_layout="planar", activations="q8", projection_activations="q8")
    assert {i.tensor for i in int8.inputs if i.layout} == relaid
    uses = planar_uses(int8)
    assert uses.keys() == {"gemv", "gemv_q8", "moe_down_residual_q8"}
    assert uses["gemv"] == {f"gemv_q6_k_planar_{tiny.vocab_size}x{tiny.hidden}"}  # the LM head alone
    assert all("q6_k_planar" in name for names in uses.values() for name in names)


def test_an_unknown_q6_k_layout_is_named() -> None:
    with pytest.raises(SparkInferError, match="q6_k_layout must be one of gguf, planar, got 'rows'"):
        build_decode_step(TINY_DENSE, type_map(TINY_DENSE, "q4_k_m"), q6_k_layout="rows")


def test_a_schedules_file_picks_the_layout(tmp_path: Path) -> None:
    path = SchedulesFile("cpu", {}, step={"q6_k_layout": "planar"}).write(tmp_path / "cpu.json")
    assert SchedulesFile.read(path).step == {"q6_k_layout": "planar"}


def test_binding_re_lays_out_the_file_bytes(rng: np.random.Generator) -> None:
    rows = rng.integers(0, 256, (4, 3 * 210), dtype=np.uint8)
    inp = StepInput("output", "weight", "uint32", (4, 160), "output.weight", "Q6_K", LAYOUT_Q6_K_PLANAR)
    assert file_bytes(inp) == rows.nbytes
    words = bind_weight(rows, inp)
    np.testing.assert_array_equal(words.view(np.uint8), kquants.q6_k_to_planar(rows))
    assert StepInput.from_json(inp.to_json()) == inp
    with pytest.raises(ValueError, match="has 2100 bytes, output takes uint32\\[4, 160\\] re-laid out from 2520"):
        bind_weight(rows[:, :525], inp)
    with pytest.raises(CompiledModuleError, match="layout 'tiles', which this runtime does not know"):
        from_file(rows, StepInput("output", "weight", "uint32", (4, 160), "output.weight", "Q6_K", "tiles"))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261205)


@pytest.mark.slow
@pytest.mark.parametrize("preset, variants", [
    ("tiny", {"decode_launches": "fused"}),
    ("tiny-dense", {"decode_launches": "split"}),
    ("tiny", {"activations": "q8", "projection_activations": "q8"}),  # sm_90's int8 step
], ids=["tiny-fused", "tiny-dense-split", "tiny-int8"])
def test_planar_step_logits_equal_the_gguf_steps(tmp_path: Path, preset: str, variants: dict[str, str]) -> None:
    """Tiny decisive Q4_K_M models compiled for LLVM with q6_k_layout gguf and planar (through a
    schedules file, with the same other step variants), fed the same tokens: the logits agree to
    float32 reassociation (the planar kernels decode the same codes and scales; the sums' order
    differs) and every top-1 token is the same."""
    from ._harness import StepRunner, write_decisive_model

    config = preset_config(preset)
    model = write_decisive_model(tmp_path / "model.gguf", config, "q4_k_m", seed=5)
    types = {name: info.ggml_type for name, info in model.tensors.items()}
    manifests = []
    for layout in ("gguf", "planar"):
        schedules = SchedulesFile("cpu", {}, step={**variants, "q6_k_layout": layout})
        manifests.append(compile_model(config, types, "cpu", tmp_path / layout, n_splits=16,
                                       schedules=schedules.write(tmp_path / f"{layout}.json")).manifest)
    assert any(i.layout == LAYOUT_Q6_K_PLANAR for i in manifests[1].inputs)
    planar_factories = {k["factory"] for k in manifests[1].kernels if k["args"] and k["args"][0] == "Q6_K_PLANAR"}
    assert "gemv" in planar_factories  # the LM head
    if variants.get("activations") == "q8":
        assert "moe_down_residual_q8" in planar_factories
    prompt = [1, 100, 7, 512, 33, 901, 2, 64, 5, 77]
    runners = [StepRunner(manifest, model, n_pages=4) for manifest in manifests]
    logits = np.array([[runner.step(t)[0] for t in prompt] for runner in runners])
    diff = np.abs(logits[1].astype(np.float64) - logits[0]).max()
    print(f"{preset} {variants}: max |planar - gguf| = {diff:.3g}, max |logit| = {np.abs(logits).max():.3g}")
    # Float reassociation only: the CPU rule vectorizes a dot over its words (uint32 planar,
    # uint16 GGUF), so the partial sums meet in another order (seen: 1.4e-6 of logits ~5).
    assert diff <= 1e-5 * np.abs(logits).max()
    assert (logits[1].argmax(-1) == logits[0].argmax(-1)).all()
