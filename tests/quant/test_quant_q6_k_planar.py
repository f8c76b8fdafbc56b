"""The planar Q6_K re-layout (layouts.py, "Q6_K planar"): lossless, and dequantizes as GGUF's."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize

from sparkinfer.errors import TensorShapeError
from sparkinfer.quant import kquants
from sparkinfer.quant.layouts import PLANAR_Q6_K_ALIGN, PLANAR_Q6_K_RUN, Q6_K_TYPE_SIZE, QK_K


@pytest.mark.parametrize("lead, n_blocks", [((5,), 8), ((3,), 3), ((2, 4), 1)])
def test_round_trip_on_random_bytes(rng: np.random.Generator, lead: tuple[int, ...], n_blocks: int) -> None:
    rows = rng.integers(0, 256, (*lead, n_blocks * Q6_K_TYPE_SIZE), dtype=np.uint8)
    planar = kquants.q6_k_to_planar(rows)
    assert planar.shape[-1] % PLANAR_Q6_K_ALIGN == 0
    assert planar.shape[-1] - rows.shape[-1] < PLANAR_Q6_K_ALIGN
    assert not planar[..., n_blocks * Q6_K_TYPE_SIZE:].any()  # the padding is zeros
    np.testing.assert_array_equal(kquants.q6_k_from_planar(planar, n_blocks), rows)


def test_half_block_runs_hold_its_ql_then_qh(rng: np.random.Generator) -> None:
    rows = rng.integers(0, 256, (2, 3 * Q6_K_TYPE_SIZE), dtype=np.uint8)
    planar = kquants.q6_k_to_planar(rows)
    block, h = 2, 1
    run = planar[1, (2 * block + h) * PLANAR_Q6_K_RUN:][:PLANAR_Q6_K_RUN]
    gguf_block = rows[1, block * Q6_K_TYPE_SIZE:][:Q6_K_TYPE_SIZE]
    np.testing.assert_array_equal(run[:64], gguf_block[64 * h: 64 * (h + 1)])
    np.testing.assert_array_equal(run[64:], gguf_block[128 + 32 * h: 128 + 32 * (h + 1)])


def test_planar_dequantizer_equals_gguf(rng: np.random.Generator) -> None:
    x = rng.standard_normal((6, 3 * QK_K)).astype(np.float32)
    rows = kquants.quantize_q6_k(x.reshape(-1, QK_K)).reshape(6, -1)
    expected = gguf_dequantize(rows, T.Q6_K)
    got = kquants.dequantize_q6_k_planar(kquants.q6_k_to_planar(rows), 3 * QK_K)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got, kquants.dequantize_q6_k(rows.reshape(-1, Q6_K_TYPE_SIZE)).reshape(6, -1))


def test_bad_row_lengths_are_refused() -> None:
    with pytest.raises(TensorShapeError, match="whole number of 210-byte blocks"):
        kquants.q6_k_to_planar(np.zeros((2, 211), np.uint8))
    with pytest.raises(TensorShapeError, match="planar Q6_K row of 3 blocks holds 640 bytes, got 630"):
        kquants.q6_k_from_planar(np.zeros((2, 630), np.uint8), 3)


def test_the_planar_format_id_is_no_ggml_type() -> None:
    from sparkinfer.quant.layouts import Q6_K_PLANAR

    assert Q6_K_PLANAR & 0xFF == T.Q6_K and Q6_K_PLANAR not in {int(t) for t in T}
