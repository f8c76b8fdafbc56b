import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from sparkinfer.errors import SparkInferError, TensorShapeError, UnsupportedQuantTypeError
from sparkinfer.quant import SUPPORTED_TYPES, dequantize, layouts, quant_format, quantize

EXPECTED = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]
SUPPORTED_TEXT = "(supported: F32, F16, BF16, Q8_0, Q4_K, Q5_K, Q6_K)"


def test_registry_covers_the_model_types_with_ggml_geometry() -> None:
    assert list(SUPPORTED_TYPES) == EXPECTED
    for t in EXPECTED:
        fmt = quant_format(t)
        assert (fmt.ggml_type, fmt.name) == (t, t.name)
        assert (fmt.block_size, fmt.type_size) == gguf.GGML_QUANT_SIZES[t]
        assert fmt.row_bytes(2048) == 2048 // fmt.block_size * fmt.type_size


def test_quant_format_accepts_integer_ids() -> None:
    assert quant_format(int(T.Q4_K)) is quant_format(T.Q4_K)


@pytest.mark.parametrize("name", ["Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_layout_spans_tile_the_block(name: str) -> None:
    spans = sorted(
        (value for key, value in vars(layouts).items()
         if key.startswith(f"{name}_") and isinstance(value, layouts.Span)),
        key=lambda s: s.start,
    )
    type_size = getattr(layouts, f"{name}_TYPE_SIZE")
    assert type_size == gguf.GGML_QUANT_SIZES[T[name]][1]
    assert spans[0].start == 0 and spans[-1].stop == type_size
    assert all(a.stop == b.start for a, b in zip(spans, spans[1:]))


def test_unsupported_type_names_tensor_and_type() -> None:
    with pytest.raises(UnsupportedQuantTypeError) as info:
        quant_format(T.IQ2_XS, "blk.0.attn_q.weight")
    assert str(info.value) == (
        "tensor 'blk.0.attn_q.weight' has quant type IQ2_XS, which SparkInfer does not "
        f"support {SUPPORTED_TEXT}"
    )
    assert isinstance(info.value, SparkInferError)


def test_unsupported_type_without_tensor_name_and_unknown_id() -> None:
    with pytest.raises(UnsupportedQuantTypeError, match=r"^quant type Q4_0, which SparkInfer"):
        quant_format(T.Q4_0)
    with pytest.raises(UnsupportedQuantTypeError, match=r"quant type unknown \(999\), which"):
        quant_format(999, "x")
    with pytest.raises(UnsupportedQuantTypeError, match="Q2_K"):
        dequantize(T.Q2_K, np.zeros(84, np.uint8), (256,))


def test_bad_column_count_is_a_clear_error() -> None:
    expected = "a Q4_K row must hold a multiple of 256 weights, got 100"
    with pytest.raises(TensorShapeError) as info:
        quantize(T.Q4_K, np.zeros((2, 100), np.float32))
    assert str(info.value) == expected
    with pytest.raises(TensorShapeError, match=expected):
        quant_format(T.Q4_K).row_bytes(100)
    q8_message = "a Q8_0 row must hold a multiple of 32 weights, got 48$"
    with pytest.raises(TensorShapeError, match=q8_message):
        dequantize(T.Q8_0, np.zeros(51, np.uint8), (48,))


def test_byte_count_mismatch_is_a_clear_error() -> None:
    with pytest.raises(TensorShapeError) as info:
        dequantize(T.Q6_K, np.zeros((2, 210), np.uint8), (3, 256))
    assert str(info.value) == "Q6_K data of shape (3, 256) needs 630 bytes, got 420"


def test_quantize_keeps_leading_dims() -> None:
    x = np.zeros((2, 3, 512), np.float32)
    for t in EXPECTED:
        data = quantize(t, x)
        assert data.dtype == np.uint8
        assert data.shape == (2, 3, quant_format(t).row_bytes(512))
        back = dequantize(t, data, x.shape)
        assert back.dtype == np.float32 and back.shape == x.shape
