"""The sampling schedules: CUDA codegen, nvcc for every arch, and on a GPU the Qwen3 vocabulary
(151936) against the numpy reference, draw for draw (on GPU machines the library comes prebuilt:
`python -m tests.gpu_prebuild`)."""

import re

import numpy as np
import pytest
import tvm

from sparkinfer.kernels import sampling as S

from cuda_testutil import (
    scheduled,
    CUDA_ARCHS,
    Gpu,
    assert_nvcc_compiles,
    cuda_source,
    gpu_fixture,
    gpu_only,
    kernel_body,
    main,
    module,
    needs_nvcc,
)

VOCAB = 151936
# A small vocabulary the emulator runs: 3 blocks of 1024, 32 candidates each.
SMALL = (3000, 1024, 32)
# (temperature, top_p, top_k): greedy; plain; Qwen3's two recommended settings; top-k only;
# top-p only (the one-block fallback).
PARAMS = [(0.0, 1.0, 0.0), (1.0, 1.0, 0.0), (0.6, 0.95, 20.0), (0.7, 0.8, 20.0), (1.0, 1.0, 40.0),
          (1.0, 0.9, 0.0)]


def kernels_module() -> tvm.IRModule:
    return module(scheduled(S.sample_candidates, "sampling", VOCAB), scheduled(S.sample_token, "sampling", VOCAB),
                  scheduled(S.sample_candidates, "sampling", *SMALL), scheduled(S.sample_token, "sampling", *SMALL),
                  scheduled(S.advance, "sampling"))


@pytest.fixture(scope="module")
def source() -> str:
    return cuda_source(kernels_module())


def allreduces(body: str) -> int:
    """Block-wide reductions lowered to warp shuffles (each stages warp results in shared
    memory): a reduction that is not would leave every thread racing on its output."""
    return len(re.findall(r"__shared__ alignas\(64\) \w+ red_buf_staging", body))


def test_candidates_are_a_block_a_slice_sorted_in_shared_memory(source: str) -> None:
    body = kernel_body(source, S.sample_candidates_symbol(VOCAB))
    assert f"__launch_bounds__(1024) {S.sample_candidates_symbol(VOCAB)}_kernel" in source
    assert "blockIdx.x" in body
    assert f"__shared__ alignas(64) uint64_t keys_shared_ptr[{S.SLICE}];" in body
    # the winner's allreduce (greedy's or the Gumbel one), then a sort step's two barriers
    # (reads, then writes)
    assert allreduces(body) == 2
    assert body.count("__syncthreads()") >= 4


def test_the_draw_is_one_block_merging_the_candidates(source: str) -> None:
    symbol = S.sample_token_symbol(VOCAB)
    assert f"__launch_bounds__(1024) {symbol}_kernel" in source
    body = kernel_body(source, symbol)
    assert "blockIdx" not in body
    assert f"__shared__ alignas(64) uint64_t merged_shared_ptr[{S.K_MAX + 1}];" in body
    # The one-block fallback's five reductions over the vocabulary and the candidate path's
    # four (winner, merge front, unproven lists, draw), each a warp-shuffle allreduce.
    assert allreduces(body) == 9
    assert body.count("__syncthreads()") >= 18
    # The counter is read once, before the first barrier, and written back incremented.
    assert body.index("= rng_ptr[1];") < body.index("__syncthreads()")


@needs_nvcc
@pytest.mark.parametrize("arch", CUDA_ARCHS)
def test_nvcc_compiles_for(source: str, arch: str) -> None:
    assert_nvcc_compiles(arch, source)


gpu = gpu_fixture("sampling", kernels_module)


def assert_same_draw(
    token: int, logits: np.ndarray, params: tuple, seed: int, counter: int
) -> None:
    """The reference's token, or, where CUDA's expf/logf/log1pf and numpy's differ in the
    last bit, a kept token whose Gumbel score ties the winner's to within float rounding."""
    expected = S.sample_token_reference(logits, np.array(params, np.float32), seed, counter)
    if token == expected:
        return
    temperature = np.float32(params[0])
    assert temperature > 0, f"greedy must be exact: {token} != {expected}"
    kept = S.kept_tokens_reference(logits, *params)
    scores = logits / temperature + S.gumbel_reference(seed, counter, len(logits))
    assert kept[token], f"token {token} (reference {expected}) is filtered out"
    assert scores[expected] - scores[token] <= 1e-5 * max(1.0, abs(float(scores[expected])))


def expected_path(params: tuple, k_max: int) -> int:
    """The path on these spread logits (no ties): candidates for top-k within k_max, the
    one-block fallback for top-p alone or a larger k, the blocks' winners otherwise."""
    temperature, top_p, top_k = params
    if temperature <= 0 or (top_k == 0 and top_p >= 1):
        return S.PATH_WINNERS
    return S.PATH_CANDIDATES if 0 < top_k <= k_max else S.PATH_ONE_BLOCK


def run_draws(gpu: Gpu, vocab: int, slice_: int, k_max: int, params: tuple, seeds: range) -> None:
    # An LLM-like spread: a few strong candidates over a long tail.
    rng = np.random.default_rng(20261127)
    logits = (rng.standard_normal(vocab) * 2.0).astype(np.float32)
    logits[rng.choice(vocab, 50, replace=False)] += rng.uniform(5, 12, 50).astype(np.float32)
    logits_dev, params_dev = gpu.tensor(logits), gpu.tensor(np.array(params, np.float32))
    blocks = S.slices(vocab, slice_)
    for seed in seeds:
        counter = 1000 + seed
        rng_state = gpu.tensor(np.array([seed, counter], np.uint32))
        best, cand = gpu.tensor(np.zeros(blocks, np.uint64)), gpu.tensor(np.zeros((blocks, k_max), np.uint64))
        out, path = gpu.tensor(np.full(1, -1, np.int32)), gpu.tensor(np.full(1, -1, np.int32))
        gpu(S.sample_candidates_symbol(vocab), logits_dev, params_dev, rng_state, best, cand)
        gpu(S.sample_token_symbol(vocab), logits_dev, params_dev, rng_state, best, cand, out, path)
        assert_same_draw(int(out.numpy()[0]), logits, params, seed, counter)
        assert int(path.numpy()[0]) == expected_path(params, k_max)
        np.testing.assert_array_equal(rng_state.numpy(), [seed, counter + 1])


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: "T{}_p{}_k{}".format(*p))
def test_sample_token_on_gpu_matches_numpy(gpu: Gpu, params: tuple) -> None:
    gpu_only(gpu, "the full vocabulary; the small one below is emulated")
    run_draws(gpu, VOCAB, S.SLICE, S.K_MAX, params, range(12))


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: "T{}_p{}_k{}".format(*p))
def test_small_vocabulary_matches_numpy(gpu: Gpu, params: tuple) -> None:
    run_draws(gpu, *SMALL, params, range(3))


def test_advance_on_gpu(gpu: Gpu) -> None:
    token, pos = gpu.tensor(np.array([3], np.int32)), gpu.tensor(np.array([99], np.int32))
    gpu("advance", gpu.tensor(np.array([151643], np.int32)), token, pos)
    assert token.numpy()[0] == 151643 and pos.numpy()[0] == 100


if __name__ == "__main__":
    main(__doc__, "sampling", kernels_module)
