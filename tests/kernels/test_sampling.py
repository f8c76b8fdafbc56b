"""Sampling kernels built for LLVM: token for token equal to the numpy reference, the
reference's filtering against a sort-based definition, and the draws' frequencies."""

import numpy as np
import pytest
import tvm

from sparkinfer.compiler.targets import target_for
from sparkinfer.kernels import sampling as S
from sparkinfer.reference.qwen3moe import softmax

VOCAB = 1000
# (temperature, top_p, top_k): greedy; plain; top-k; top-p; both (Qwen3's defaults);
# k >= V and p = 1 (no filter); p = 0 (only the top token); a fractional k (truncated).
PARAMS = [
    (0.0, 1.0, 0.0),
    (1.0, 1.0, 0.0),
    (1.0, 1.0, 50.0),
    (1.3, 0.9, 0.0),
    (0.7, 0.8, 20.0),
    (1.0, 1.0, float(VOCAB)),
    (1.0, 0.0, 0.0),
    (0.5, 0.95, 3.7),
]


def build(func: tvm.tirx.PrimFunc) -> tvm.runtime.Module:
    return tvm.compile(tvm.IRModule({"main": func}), target=target_for("cpu"))


@pytest.fixture(scope="module")
def sampler() -> tvm.runtime.Module:
    return build(S.sample_token(VOCAB))


def draw(
    lib: tvm.runtime.Module, logits: np.ndarray, params: tuple, rng: tvm.runtime.Tensor
) -> int:
    """One call; `next` poisoned with -1 first, `rng` updated in place."""
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.full(1, -1, np.int32), dev)
    sample_params = tvm.runtime.tensor(np.array(params, np.float32), dev)
    lib["main"](tvm.runtime.tensor(logits, dev), sample_params, rng, out)
    return int(out.numpy()[0])


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: "T{}_p{}_k{}".format(*p))
def test_tokens_equal_the_reference_for_every_seed(
    sampler: tvm.runtime.Module, params: tuple
) -> None:
    logits = (np.random.default_rng(11).standard_normal(VOCAB) * 2.5).astype(np.float32)
    for seed in range(40):
        counter = seed * 7919 % 1000
        rng = tvm.runtime.tensor(np.array([seed, counter], np.uint32), tvm.cpu())
        token = draw(sampler, logits, params, rng)
        expected = S.sample_token_reference(logits, np.array(params, np.float32), seed, counter)
        assert token == expected, (seed, token, expected)
        np.testing.assert_array_equal(rng.numpy(), [seed, counter + 1])


def test_greedy_takes_the_lowest_index_among_ties(sampler: tvm.runtime.Module) -> None:
    logits = np.zeros(VOCAB, np.float32)
    logits[[700, 300, 999]] = 4.0
    rng = tvm.runtime.tensor(np.array([1, 2], np.uint32), tvm.cpu())
    assert draw(sampler, logits, (0.0, 1.0, 0.0), rng) == 300
    assert S.sample_token_reference(logits, np.array([0, 1, 0], np.float32), 1, 2) == 300


def test_counter_wraps_around(sampler: tvm.runtime.Module) -> None:
    rng = tvm.runtime.tensor(np.array([5, 0xFFFFFFFF], np.uint32), tvm.cpu())
    draw(sampler, np.zeros(VOCAB, np.float32), (1.0, 1.0, 0.0), rng)
    np.testing.assert_array_equal(rng.numpy(), [5, 0])


def kept_by_sorting(logits: np.ndarray, temperature: float, top_p: float, top_k: int) -> np.ndarray:
    """The textbook definition: keep the k highest (ties at the k-th kept), then the
    smallest prefix of the survivors, by descending probability, whose mass reaches top_p."""
    kept = np.ones(len(logits), bool)
    if 0 < top_k < len(logits):
        kept &= logits >= np.sort(logits)[::-1][top_k - 1]
    if top_p < 1:
        p = np.where(kept, softmax(logits.astype(np.float64) / temperature), 0.0)
        p /= p.sum()
        above = np.array([p[logits > v].sum() for v in logits])  # mass strictly above each
        kept &= above < top_p
    return kept


@pytest.mark.parametrize("params", [(1.0, 0.9, 0), (0.7, 0.8, 20), (1.0, 1.0, 7), (2.0, 0.5, 400)])
def test_filtering_matches_the_sorting_definition(params: tuple) -> None:
    rng = np.random.default_rng(5)
    for _ in range(10):
        logits = (rng.standard_normal(VOCAB) * 2).astype(np.float32)
        got = S.kept_tokens_reference(logits, *params)
        np.testing.assert_array_equal(got, kept_by_sorting(logits, *params))


def test_draws_follow_the_filtered_distribution() -> None:
    vocab, n_draws = 8, 6000
    lib = build(S.sample_token(vocab))
    logits = np.array([2.0, 1.5, 1.5, 0.2, -0.5, 1.0, -3.0, 0.9], np.float32)
    params = (0.8, 0.9, 6.0)
    kept = kept_by_sorting(logits, *params[:2], int(params[2]))
    expected = np.where(kept, softmax(logits.astype(np.float64) / params[0]), 0.0)
    expected /= expected.sum()
    rng = tvm.runtime.tensor(np.array([2026, 0], np.uint32), tvm.cpu())
    counts = np.bincount([draw(lib, logits, params, rng) for _ in range(n_draws)], minlength=vocab)
    assert rng.numpy()[1] == n_draws
    assert counts[~kept].sum() == 0
    freq = counts / n_draws
    sigma = np.sqrt(expected * (1 - expected) / n_draws)
    assert np.all(np.abs(freq - expected) <= 4.5 * sigma + 1e-12), (freq, expected)


def test_advance_moves_the_token_and_position() -> None:
    lib = build(S.advance())
    dev = tvm.cpu()
    token = tvm.runtime.tensor(np.array([11], np.int32), dev)
    pos = tvm.runtime.tensor(np.array([41], np.int32), dev)
    lib["main"](tvm.runtime.tensor(np.array([7], np.int32), dev), token, pos)
    assert token.numpy()[0] == 7 and pos.numpy()[0] == 42
