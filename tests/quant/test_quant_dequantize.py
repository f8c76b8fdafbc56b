"""Our numpy dequantizers against gguf's, bit for bit, on random valid blocks."""

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from sparkinfer.quant import dequantize, layouts, quant_format

# f16 fields per block type; every other byte of a K/Q8_0 block is valid whatever its value.
F16_FIELDS = {
    T.Q8_0: [layouts.Q8_0_D],
    T.Q4_K: [layouts.Q4_K_D, layouts.Q4_K_DMIN],
    T.Q5_K: [layouts.Q5_K_D, layouts.Q5_K_DMIN],
    T.Q6_K: [layouts.Q6_K_D],
}


def random_finite_f16(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Any f16 bit pattern (subnormals, negatives, large) except inf and NaN."""
    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    all_ones_exponent = (bits & 0x7C00) == 0x7C00
    return np.where(all_ones_exponent, bits & ~np.uint16(0x4000), bits).view(np.float16)


def random_blocks(rng: np.random.Generator, t: T, rows: int, cols: int) -> np.ndarray:
    fmt = quant_format(t)
    n_blocks = rows * cols // fmt.block_size
    blocks = rng.integers(0, 256, size=(n_blocks, fmt.type_size), dtype=np.uint8)
    for span in F16_FIELDS.get(t, []):
        blocks[:, span.start : span.stop] = random_finite_f16(rng, (n_blocks, 1)).view(np.uint8)
    return blocks.reshape(rows, fmt.row_bytes(cols))


@pytest.mark.parametrize(
    "t", [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K], ids=lambda t: t.name
)
def test_dequantize_matches_gguf_bit_for_bit(rng: np.random.Generator, t: T) -> None:
    # An odd row count, and enough weights (~900k) to span several chunks of our loop.
    rows, cols = 7, 4096 * 32
    data = random_blocks(rng, t, rows, cols)
    ref = gguf.quants.dequantize(data.view(np.float32) if t == T.F32 else data, t)
    ours = dequantize(t, data, (rows, cols))
    assert ours.dtype == np.float32 and ours.shape == (rows, cols)
    if t in F16_FIELDS:
        assert np.isfinite(ref).all()  # else the f16 fields above were not where gguf reads
    np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))


def test_dequantize_accepts_typed_reader_arrays(rng: np.random.Generator) -> None:
    # gguf.GGUFReader exposes F32/F16 tensors with their own dtype, not as bytes.
    x = rng.standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_array_equal(dequantize(T.F32, x, x.shape), x)
    half = x.astype(np.float16)
    np.testing.assert_array_equal(dequantize(T.F16, half, x.shape), half.astype(np.float32))


def test_dequantize_accepts_any_byte_shape_and_returns_a_fresh_array(
    rng: np.random.Generator,
) -> None:
    data = random_blocks(rng, T.Q4_K, 4, 512)
    expected = dequantize(T.Q4_K, data, (4, 512))
    flat = dequantize(T.Q4_K, data.reshape(-1), (2, 2, 512))
    np.testing.assert_array_equal(flat, expected.reshape(2, 2, 512))
    x = rng.standard_normal(64).astype(np.float32)
    out = dequantize(T.F32, x, (64,))
    out[:] = 0
    assert np.abs(x).sum() > 0
