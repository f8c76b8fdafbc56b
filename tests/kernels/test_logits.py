"""Logits processing kernels built for LLVM, against the numpy reference on fresh random inputs;
the reference against the definitions (OpenAI's presence/frequency penalties, CTRL's
repetition penalty, the mask's bit layout as llguidance writes it)."""

import numpy as np
import pytest
import tvm

from sparkinfer.compiler.targets import target_for
from sparkinfer.kernels import logits as L

VOCAB = 1000  # not a multiple of 32: the mask's last word is partly used


def build(func: tvm.tirx.PrimFunc) -> tvm.runtime.Module:
    return tvm.compile(tvm.IRModule({"main": func}), target=target_for("cpu"))


@pytest.fixture(scope="module")
def process() -> tvm.runtime.Module:
    return build(L.process_logits(VOCAB))


def tensor(a: np.ndarray) -> tvm.runtime.Tensor:
    return tvm.runtime.tensor(a, tvm.cpu())


@pytest.mark.parametrize("params", [(0.0, 0.0, 1.0), (0.5, 0.3, 1.3), (-2.0, 2.0, 0.5), (2.0, -1.0, 10.0)])
def test_process_logits_equals_the_reference(process: tvm.runtime.Module, params: tuple) -> None:
    rng = np.random.default_rng(abs(hash(params)) % 2**32)
    for _ in range(3):
        logits = (rng.standard_normal(VOCAB) * 4).astype(np.float32)
        allowed = rng.random(VOCAB) < 0.4
        counts = rng.integers(0, 4, VOCAB).astype(np.int32)
        p = np.array(params, np.float32)
        out = tensor(np.full(VOCAB, np.nan, np.float32))
        process["main"](tensor(logits), tensor(p), tensor(L.mask_of(allowed)), tensor(counts), out)
        np.testing.assert_array_equal(out.numpy(), L.process_logits_reference(logits, p, L.mask_of(allowed), counts))


def test_reference_follows_the_definitions() -> None:
    logits = np.array([2.0, -2.0, 1.0, 3.0, 0.5], np.float32)
    counts = np.array([2, 1, 0, 0, 3], np.int32)
    allowed = np.array([True, True, True, False, True])
    out = L.process_logits_reference(logits, np.array([0.5, 0.25, 2.0], np.float32), L.mask_of(allowed), counts)
    # seen: CTRL's r (divide a positive logit, multiply a negative one), minus presence, minus
    # count x frequency; unseen: as it was; masked out: -inf.
    np.testing.assert_allclose(out, [2.0 / 2 - 0.5 - 2 * 0.25, -2.0 * 2 - 0.5 - 0.25, 1.0, -np.inf,
                                     0.5 / 2 - 0.5 - 3 * 0.25])


def test_mask_layout_is_llguidances() -> None:
    """Bit i % 32 of int32 word i // 32, as llguidance's `allocate_token_bitmask` fills it."""
    allowed = np.zeros(70, bool)
    allowed[[0, 31, 32, 69]] = True
    words = L.mask_of(allowed)
    assert words.dtype == np.int32 and len(words) == L.mask_words(70) == 3
    assert words.view(np.uint32).tolist() == [1 | 1 << 31, 1, 1 << 5]
    np.testing.assert_array_equal(L.mask_bits_np(words, 70), allowed)


def test_count_token_counts_the_sampled_token() -> None:
    lib = build(L.count_token(VOCAB))
    counts = tensor(np.zeros(VOCAB, np.int32))
    for token in (7, 7, 999, 0):
        nxt = tensor(np.array([token], np.int32))
        lib["main"](nxt, counts)
        assert nxt.numpy()[0] == token
    expected = np.zeros(VOCAB, np.int32)
    expected[[7, 999, 0]] = [2, 1, 1]
    np.testing.assert_array_equal(counts.numpy(), expected)
