import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFWriter

from sparkinfer import quant
from sparkinfer.errors import (
    GGUFFormatError,
    MetadataError,
    MissingTensorError,
    TensorShapeError,
    UnsupportedArchitectureError,
    UnsupportedQuantTypeError,
)
from sparkinfer.gguf_file import GGUFModel, PRESETS, preset_config, random_weights, synth_model, write_model
from sparkinfer.tokenizer import synthetic_vocab

TINY = PRESETS["tiny"]

# RMS error of each type relative to the weights' std, on N(0, 0.02) weights (measured: Q4_K 0.072,
# Q5_K 0.036, Q6_K 0.018, Q8_0 0.0054, F16 0.0002).
REL_ERROR_BOUND = {T.F32: 0.0, T.F16: 1e-3, T.Q8_0: 0.01, T.Q6_K: 0.03, T.Q5_K: 0.05, T.Q4_K: 0.1}

Patch = Callable[[Callable[[GGUFReader], None]], Path]


def test_tiny_reads_back_valid(tiny_q4_k_m: Path) -> None:
    model = GGUFModel.open(tiny_q4_k_m)
    assert model.config == TINY
    assert len(model.tensors) == 27
    assert model.type_histogram() == {"F32": 11, "Q4_K": 8, "Q8_0": 4, "Q5_K": 2, "Q6_K": 2}
    assert model.metadata["general.file_type"] == 15  # MOSTLY_Q4_K_M
    assert model.metadata["tokenizer.chat_template"]
    assert len(model.vocab.tokens) == TINY.vocab_size
    embd = model.tensors["token_embd.weight"]
    assert embd.shape == (1024, 256) and embd.data.shape == (1024, 144) and embd.data.dtype == np.uint8


def test_quantized_tensors_match_the_float_weights(tiny_q4_k_m: Path) -> None:
    model = GGUFModel.open(tiny_q4_k_m)
    weights = random_weights(TINY, seed=0)
    for name, info in model.tensors.items():
        got = model.tensor_f32(name)
        # The file holds exactly the quantized float weights...
        expected = quant.dequantize(info.ggml_type, quant.quantize(info.ggml_type, weights[name]), info.shape)
        np.testing.assert_array_equal(got, expected, err_msg=name)
        # ...and those are close to the weights, within the type's usual error.
        rel = np.sqrt(np.mean((got - weights[name]) ** 2)) / np.std(weights[name])
        assert rel <= REL_ERROR_BOUND[info.ggml_type], (name, info.ggml_type.name, rel)


def test_f32_file_holds_the_weights_exactly(tmp_path: Path) -> None:
    config = PRESETS["tiny-dense"]
    weights = random_weights(config, seed=7)
    write_model(tmp_path / "d.gguf", config, weights, synthetic_vocab(config.vocab_size), "f32")
    model = GGUFModel.open(tmp_path / "d.gguf")
    assert model.config == config
    for name, w in weights.items():
        np.testing.assert_array_equal(model.tensor_f32(name), w)


def test_random_weights_look_trained() -> None:
    weights = random_weights(TINY, seed=0)
    assert np.std(weights["blk.0.attn_q.weight"]) == pytest.approx(0.02, rel=0.05)
    assert abs(np.mean(weights["blk.0.ffn_up_exps.weight"])) < 1e-3
    assert np.mean(weights["blk.0.attn_norm.weight"]) == pytest.approx(1.0, abs=0.01)
    # Seeded per tensor name: dropping a layer leaves the others' values unchanged.
    one_layer = random_weights(TINY.replace(n_layers=1), seed=0)
    np.testing.assert_array_equal(one_layer["blk.0.attn_q.weight"], weights["blk.0.attn_q.weight"])
    assert not np.array_equal(random_weights(TINY, seed=1)["blk.0.attn_q.weight"], weights["blk.0.attn_q.weight"])


def test_expert_slice_equals_the_full_tensor_slice(tiny_q4_k_m: Path) -> None:
    model = GGUFModel.open(tiny_q4_k_m)
    for name in ("blk.0.ffn_gate_exps.weight", "blk.1.ffn_down_exps.weight"):
        full = model.tensor_f32(name)
        for e in (0, 5, 7):
            np.testing.assert_array_equal(model.expert_f32(name, e), full[e])


def test_bytes_per_token_counts_one_embedding_row_and_used_experts(tiny_q4_k_m: Path) -> None:
    model = GGUFModel.open(tiny_q4_k_m)
    t = model.tensors
    experts = sum(i.nbytes for i in t.values() if len(i.shape) == 3)
    dense = sum(i.nbytes for i in t.values() if len(i.shape) < 3) - t["token_embd.weight"].nbytes
    assert model.bytes_per_token() == dense + t["token_embd.weight"].nbytes // 1024 + experts * 2 // 8


def test_pool_path_writes_valid_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Force the full-size path (block pools) on a small config.
    monkeypatch.setattr("sparkinfer.gguf_file.synth.FLOAT_PATH_MAX_PARAMS", 0)
    synth_model(tmp_path / "p.gguf", TINY, "q4_k_m", seed=3)
    model = GGUFModel.open(tmp_path / "p.gguf")
    w = model.tensor_f32("blk.0.ffn_up_exps.weight")
    assert np.all(np.isfinite(w)) and np.std(w) == pytest.approx(0.02, rel=0.1)
    assert np.mean(model.tensor_f32("blk.0.ffn_norm.weight")) == pytest.approx(1.0, abs=0.01)
    synth_model(tmp_path / "p2.gguf", TINY, "q4_k_m", seed=3)
    assert (tmp_path / "p.gguf").read_bytes() == (tmp_path / "p2.gguf").read_bytes()


@pytest.mark.parametrize("file_type", ["f32", "f16", "q8_0"])
def test_other_file_types_round_trip(tmp_path: Path, file_type: str) -> None:
    config = TINY.replace(n_layers=1)
    synth_model(tmp_path / "m.gguf", config, file_type)
    model = GGUFModel.open(tmp_path / "m.gguf")
    assert model.config == config
    assert model.tensor_f32("blk.0.attn_q.weight").shape == (256, 256)


def test_write_model_checks_weights(tmp_path: Path) -> None:
    weights = random_weights(TINY)
    vocab = synthetic_vocab(TINY.vocab_size)
    del weights["blk.1.attn_k_norm.weight"]
    with pytest.raises(MissingTensorError, match="no weights given for tensor 'blk.1.attn_k_norm.weight'"):
        write_model(tmp_path / "m.gguf", TINY, weights, vocab)
    weights["blk.1.attn_k_norm.weight"] = np.ones(32, np.float32)
    with pytest.raises(TensorShapeError, match=r"'blk.1.attn_k_norm.weight' have shape \(32,\), expected \(64,\)"):
        write_model(tmp_path / "m.gguf", TINY, weights, vocab)
    assert not list(tmp_path.iterdir())


# --- bad files -------------------------------------------------------------------------------


def test_not_a_gguf(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(GGUFFormatError, match=r"model.gguf is not a GGUF file \(magic b'PK\\x03\\x04', expected b'GGUF'\)"):
        GGUFModel.open(path)
    path.write_bytes(b"")
    with pytest.raises(GGUFFormatError, match="is not a GGUF file \\(magic b''"):
        GGUFModel.open(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(GGUFFormatError, match="cannot read .*nope.gguf: No such file"):
        GGUFModel.open(tmp_path / "nope.gguf")


def test_truncated_tensor_data(tiny_q4_k_m: Path, tmp_path: Path) -> None:
    path = tmp_path / "cut.gguf"
    data = tiny_q4_k_m.read_bytes()
    path.write_bytes(data[:-1000])
    with pytest.raises(
        GGUFFormatError,
        match=f"cut.gguf is truncated: tensor data extends 1000 bytes past the end of the file "
        f"\\({len(data) - 1000} bytes, {len(data)} needed\\); 1 tensors are cut, first 'output.weight'",
    ):
        GGUFModel.open(path)


def test_truncated_header(tiny_q4_k_m: Path, tmp_path: Path) -> None:
    path = tmp_path / "cut.gguf"
    path.write_bytes(tiny_q4_k_m.read_bytes()[:5000])
    with pytest.raises(GGUFFormatError, match="cut.gguf is truncated: the file ends inside its header, at byte 5000"):
        GGUFModel.open(path)


def _set_string(field_part: np.ndarray, value: str) -> None:
    encoded = np.frombuffer(value.encode(), dtype=np.uint8)
    assert encoded.size == field_part.size, "in-place edits keep the length"
    field_part[:] = encoded


def _tensor(reader: GGUFReader, name: str):  # noqa: ANN202 - gguf's ReaderTensor
    return next(t for t in reader.tensors if t.name == name)


def test_unsupported_architecture(patched_copy: Patch) -> None:
    path = patched_copy(lambda r: _set_string(r.fields["general.architecture"].parts[-1], "qwen2moe"))
    with pytest.raises(UnsupportedArchitectureError, match="unsupported architecture 'qwen2moe': SparkInfer runs qwen3moe, qwen3"):
        GGUFModel.open(path)


def test_missing_metadata_key(patched_copy: Patch) -> None:
    path = patched_copy(lambda r: _set_string(r.fields["qwen3moe.expert_used_count"].parts[1], "qwen3moe.expert_used_cnt__"))
    with pytest.raises(MetadataError, match="metadata key 'qwen3moe.expert_used_count' is missing"):
        GGUFModel.open(path)


def _break_utf8(field_part: np.ndarray) -> None:
    field_part[0] = 0xFF  # never valid in UTF-8


def test_metadata_string_not_utf8_names_the_key(patched_copy: Patch) -> None:
    path = patched_copy(lambda r: _break_utf8(r.fields["tokenizer.ggml.tokens"].parts[r.fields["tokenizer.ggml.tokens"].data[7]]))
    with pytest.raises(GGUFFormatError, match=r"metadata key 'tokenizer.ggml.tokens' holds a string that is not valid UTF-8 \(invalid start byte at byte 0\)"):
        GGUFModel.open(path)


def test_free_text_metadata_not_utf8_is_shown_with_replacement_characters(patched_copy: Patch) -> None:
    path = patched_copy(lambda r: _break_utf8(r.fields["general.name"].parts[-1]))
    model = GGUFModel.open(path)
    assert model.metadata["general.name"].startswith("\ufffd")


def test_unsupported_quant_type(patched_copy: Patch) -> None:
    def to_iq2_xs(reader: GGUFReader) -> None:
        _tensor(reader, "blk.0.ffn_up_exps.weight").field.parts[4][0] = T.IQ2_XS  # smaller blocks: still fits

    with pytest.raises(UnsupportedQuantTypeError, match="tensor 'blk.0.ffn_up_exps.weight' has quant type IQ2_XS"):
        GGUFModel.open(patched_copy(to_iq2_xs))


def test_missing_tensor(patched_copy: Patch) -> None:
    path = patched_copy(lambda r: _set_string(_tensor(r, "blk.1.ffn_norm.weight").field.parts[1], "blk.1.ffn_nrom.weight"))
    with pytest.raises(MissingTensorError, match="tensor 'blk.1.ffn_norm.weight' is missing from the file"):
        GGUFModel.open(path)


def test_wrong_shape(patched_copy: Patch) -> None:
    def swap_dims(reader: GGUFReader) -> None:
        dims = _tensor(reader, "blk.0.attn_k.weight").field.parts[3]  # ggml order: (256, 128)
        dims[:] = dims[::-1].copy()

    with pytest.raises(TensorShapeError, match=r"tensor 'blk.0.attn_k.weight' has shape \[256, 128\], expected \[128, 256\]"):
        GGUFModel.open(patched_copy(swap_dims))


def test_other_architecture_file(tmp_path: Path) -> None:
    # A file another tool wrote for an architecture we do not run.
    writer = GGUFWriter(tmp_path / "llama.gguf", "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedArchitectureError, match="unsupported architecture 'llama'"):
        GGUFModel.open(tmp_path / "llama.gguf")


# --- full size -------------------------------------------------------------------------------


@pytest.mark.slow
def test_one_layer_cut_of_qwen3_30b(tmp_path: Path) -> None:
    config = preset_config("qwen3-30b-a3b", n_layers=1)
    start = time.perf_counter()
    synth_model(tmp_path / "cut.gguf", config, "q4_k_m")
    model = GGUFModel.open(tmp_path / "cut.gguf")
    elapsed = time.perf_counter() - start
    assert len(model.tensors) == 15
    assert model.type_histogram() == {"F32": 6, "Q4_K": 6, "Q6_K": 3}
    w = model.expert_f32("blk.0.ffn_down_exps.weight", 127)
    assert w.shape == (2048, 768) and np.std(w) == pytest.approx(0.02, rel=0.1)
    assert os.path.getsize(tmp_path / "cut.gguf") > 700e6
    print(f"1-layer Qwen3-30B-A3B cut: written and reopened in {elapsed:.1f} s")
