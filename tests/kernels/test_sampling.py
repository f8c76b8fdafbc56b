"""Sampling kernels built for LLVM: token for token equal to the numpy reference, the
reference's filtering against a sort-based definition, and the draws' frequencies."""

import numpy as np
import pytest
import tvm

from sparkinfer.compiler.targets import target_for
from sparkinfer.kernels import sampling as S
from sparkinfer.reference.qwen3moe import softmax
from sparkinfer.schedule.arch import arch_facts
from sparkinfer.schedule.space import kernel_use, schedule_kernel

VOCAB = 1000
# (slice, k_max) of the candidate blocks: 4 blocks of 16 candidates (the fast path's limits
# within reach of a small vocabulary), and the defaults (one block here).
BLOCKINGS = [(256, 16), (S.SLICE, S.K_MAX)]
# (temperature, top_p, top_k): greedy; plain; top-k; top-p only; both (Qwen3's defaults);
# k >= V and p = 1 (no filter); p = 0 (only the top token); a fractional k (truncated);
# k above 16 (more than the small blocking's candidates); top-k with p = 1.
PARAMS = [
    (0.0, 1.0, 0.0),
    (1.0, 1.0, 0.0),
    (1.0, 1.0, 12.0),
    (1.3, 0.9, 0.0),
    (0.6, 0.95, 16.0),
    (0.7, 0.8, 20.0),
    (1.0, 1.0, float(VOCAB)),
    (1.0, 0.0, 0.0),
    (0.5, 0.95, 3.7),
    (1.0, 0.9, 50.0),
    (2.0, 0.5, 1.0),
]


def build(*funcs: tvm.tirx.PrimFunc) -> tvm.runtime.Module:
    return tvm.compile(tvm.IRModule({f.attrs["global_symbol"]: f for f in funcs}), target=target_for("cpu"))


class Sampler:
    """sample_candidates then sample_token, built for LLVM, as the decode step calls them."""

    def __init__(self, vocab: int, slice_: int, k_max: int, cpu_schedule: bool = False) -> None:
        self.vocab, self.slice, self.k_max = vocab, slice_, k_max
        self.blocks = S.slices(vocab, slice_)
        funcs = [S.sample_candidates(vocab, slice_, k_max), S.sample_token(vocab, slice_, k_max)]
        if cpu_schedule:  # the CPU rules' schedules (the candidate blocks in parallel)
            uses = [kernel_use("sampling", f, vocab, slice_, k_max) for f in ("sample_candidates", "sample_token")]
            funcs = [schedule_kernel(f, use, arch_facts("cpu"), None) for f, use in zip(funcs, uses)]
        self.lib = build(*funcs)

    def __call__(self, logits: np.ndarray, params: tuple, rng: tvm.runtime.Tensor) -> tuple[int, int]:
        """(token, path) of one draw; outputs poisoned first, `rng` updated in place."""
        dev = tvm.cpu()
        logits_dev = tvm.runtime.tensor(logits, dev)
        sample_params = tvm.runtime.tensor(np.array(params, np.float32), dev)
        best = tvm.runtime.tensor(np.full(self.blocks, 7, np.uint64), dev)
        cand = tvm.runtime.tensor(np.full((self.blocks, self.k_max), 7, np.uint64), dev)
        out, path = (tvm.runtime.tensor(np.full(1, -1, np.int32), dev) for _ in range(2))
        self.lib[S.sample_candidates_symbol(self.vocab)](logits_dev, sample_params, rng, best, cand)
        self.lib[S.sample_token_symbol(self.vocab)](logits_dev, sample_params, rng, best, cand, out, path)
        return int(out.numpy()[0]), int(path.numpy()[0])


@pytest.fixture(scope="module", params=BLOCKINGS, ids=lambda b: "slice{}_k{}".format(*b))
def sampler(request: pytest.FixtureRequest) -> Sampler:
    return Sampler(VOCAB, *request.param)


def draw(sampler: Sampler, logits: np.ndarray, params: tuple, rng: tvm.runtime.Tensor) -> int:
    return sampler(logits, params, rng)[0]


def expected_path(logits: np.ndarray, params: tuple, slice_: int, k_max: int) -> int:
    """Which way the kernels must draw (kernels/sampling.py's steps), from sorted keys."""
    temperature, top_p, top_k = (np.float32(v) for v in params)
    vocab = len(logits)
    k = int(np.float32(max(min(top_k, np.float32(vocab)), np.float32(0.0))))
    if not temperature > 0:
        return S.PATH_WINNERS
    if not 0 < k < vocab:
        return S.PATH_ONE_BLOCK if top_p < 1 else S.PATH_WINNERS
    if k > k_max:
        return S.PATH_ONE_BLOCK
    keys = S._order_key_np(logits).astype(np.int64)
    cut = np.sort(keys)[::-1][k - 1]
    # proven: every block keeps fewer than k_max keys >= the cut, and so does the whole list
    per_block = [np.count_nonzero(keys[b:b + slice_] >= cut) for b in range(0, vocab, slice_)]
    proven = max(per_block) < k_max and np.count_nonzero(keys >= cut) <= k_max
    return S.PATH_CANDIDATES if proven else S.PATH_ONE_BLOCK


def check_draws(sampler: Sampler, logits: np.ndarray, params: tuple, seeds: range) -> set[int]:
    """Every seed's token equals the reference's, and the path the expected one; the paths."""
    path_expected = expected_path(logits, params, sampler.slice, sampler.k_max)
    for seed in seeds:
        counter = seed * 7919 % 1000
        rng = tvm.runtime.tensor(np.array([seed, counter], np.uint32), tvm.cpu())
        token, path = sampler(logits, params, rng)
        expected = S.sample_token_reference(logits, np.array(params, np.float32), seed, counter)
        assert token == expected, (seed, token, expected)
        assert path == path_expected, (seed, path, path_expected)
        np.testing.assert_array_equal(rng.numpy(), [seed, counter + 1])
    return {path_expected}


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: "T{}_p{}_k{}".format(*p))
def test_tokens_equal_the_reference_for_every_seed(sampler: Sampler, params: tuple) -> None:
    logits = (np.random.default_rng(11).standard_normal(VOCAB) * 2.5).astype(np.float32)
    check_draws(sampler, logits, params, range(30))


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: "T{}_p{}_k{}".format(*p))
@pytest.mark.parametrize("blocking", BLOCKINGS, ids=lambda b: "slice{}_k{}".format(*b))
def test_the_path_the_runtime_reports_is_the_kernels(params: tuple, blocking: tuple) -> None:
    """sampler_path (what `sparkinfer run` reports) on logits without ties at the edge."""
    logits = (np.random.default_rng(11).standard_normal(VOCAB) * 2.5).astype(np.float32)
    assert S.sampler_path(*params, VOCAB, blocking[1]) == expected_path(logits, params, *blocking)


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: "T{}_p{}_k{}".format(*p))
def test_tokens_equal_the_reference_with_near_ties(sampler: Sampler, params: tuple) -> None:
    """Logits on a coarse grid (many exact ties, some at the top-k edge) and a few that
    differ in the last bit: the kept sets' edges and the proof of the candidates."""
    rng = np.random.default_rng(3)
    for trial in range(4):
        logits = (np.round(rng.standard_normal(VOCAB) * 4) / 2).astype(np.float32)
        close = rng.choice(VOCAB, 20, replace=False)
        logits[close] = np.nextafter(logits[close], np.float32(np.inf))
        check_draws(sampler, logits, params, range(trial * 5, trial * 5 + 5))


def test_the_candidate_path_and_the_fallback_are_both_taken() -> None:
    """With 4 blocks of 16 candidates: top-k 12 over spread logits is proven by the
    candidates; 16 tokens of one block tied at the top-k edge, or top-p alone, are not."""
    sampler = Sampler(VOCAB, 256, 16)
    logits = (np.random.default_rng(11).standard_normal(VOCAB) * 2.5).astype(np.float32)
    assert check_draws(sampler, logits, (0.7, 0.9, 12.0), range(5)) == {S.PATH_CANDIDATES}
    assert check_draws(sampler, logits, (0.7, 0.9, 0.0), range(5)) == {S.PATH_ONE_BLOCK}
    assert check_draws(sampler, logits, (0.7, 1.0, 17.0), range(5)) == {S.PATH_ONE_BLOCK}
    tied = logits.copy()
    tied[300:316] = 20.0  # block 1 holds 16 tokens >= the cut: it may hold more
    assert check_draws(sampler, tied, (0.7, 0.9, 12.0), range(5)) == {S.PATH_ONE_BLOCK}
    tied = logits.copy()
    tied[[10, 20, 30, 300, 310, 320, 600, 610, 620, 900, 910, 920]] = 20.0
    tied[[11, 21, 301, 311, 601, 611]] = 20.0  # 18 kept tokens over the blocks, 16 candidates
    assert check_draws(sampler, tied, (0.7, 0.9, 12.0), range(5)) == {S.PATH_ONE_BLOCK}
    assert check_draws(sampler, logits, (0.0, 0.9, 12.0), range(2)) == {S.PATH_WINNERS}


@pytest.mark.parametrize("params", PARAMS[:3] + PARAMS[4:5], ids=lambda p: "T{}_p{}_k{}".format(*p))
def test_candidates_equal_the_reference(params: tuple) -> None:
    """Each block's winner, and its top keys where the draw uses them, with near-ties."""
    vocab, slice_, k_max = VOCAB, 256, 16
    lib = build(S.sample_candidates(vocab, slice_, k_max))
    rng = np.random.default_rng(8)
    logits = (np.round(rng.standard_normal(vocab) * 8) / 4).astype(np.float32)
    blocks, dev = S.slices(vocab, slice_), tvm.cpu()
    best = tvm.runtime.tensor(np.zeros(blocks, np.uint64), dev)
    cand = tvm.runtime.tensor(np.zeros((blocks, k_max), np.uint64), dev)
    lib[S.sample_candidates_symbol(vocab)](tvm.runtime.tensor(logits, dev), tvm.runtime.tensor(
        np.array(params, np.float32), dev), tvm.runtime.tensor(np.array([9, 4], np.uint32), dev), best, cand)
    best_ref, cand_ref = S.sample_candidates_reference(logits, np.array(params, np.float32), 9, 4, slice_, k_max)
    np.testing.assert_array_equal(best.numpy(), best_ref)
    if 0 < params[2] <= k_max and params[0] > 0:
        np.testing.assert_array_equal(cand.numpy(), cand_ref)
    else:
        assert not cand.numpy().any(), "cand is written only when the draw uses it"


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: "T{}_p{}_k{}".format(*p))
def test_the_cpu_schedule_draws_the_same_tokens(params: tuple) -> None:
    sampler = Sampler(VOCAB, 256, 16, cpu_schedule=True)
    logits = (np.random.default_rng(12).standard_normal(VOCAB) * 2.5).astype(np.float32)
    check_draws(sampler, logits, params, range(5))


def test_greedy_takes_the_lowest_index_among_ties(sampler: Sampler) -> None:
    logits = np.zeros(VOCAB, np.float32)
    logits[[700, 300, 999]] = 4.0
    rng = tvm.runtime.tensor(np.array([1, 2], np.uint32), tvm.cpu())
    assert draw(sampler, logits, (0.0, 1.0, 0.0), rng) == 300
    assert S.sample_token_reference(logits, np.array([0, 1, 0], np.float32), 1, 2) == 300


def test_counter_wraps_around(sampler: Sampler) -> None:
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


@pytest.mark.parametrize("params, path", [((0.8, 0.9, 6.0), S.PATH_CANDIDATES), ((0.8, 0.9, 0.0), S.PATH_ONE_BLOCK)],
                         ids=["candidates", "one_block"])
def test_draws_follow_the_filtered_distribution(params: tuple, path: int) -> None:
    vocab, n_draws = 8, 6000
    sampler = Sampler(vocab, S.SLICE, S.K_MAX)
    logits = np.array([2.0, 1.5, 1.5, 0.2, -0.5, 1.0, -3.0, 0.9], np.float32)
    kept = kept_by_sorting(logits, *params[:2], int(params[2]))
    expected = np.where(kept, softmax(logits.astype(np.float64) / params[0]), 0.0)
    expected /= expected.sum()
    rng = tvm.runtime.tensor(np.array([2026, 0], np.uint32), tvm.cpu())
    draws = [sampler(logits, params, rng) for _ in range(n_draws)]
    assert {p for _, p in draws} == {path}
    counts = np.bincount([token for token, _ in draws], minlength=vocab)
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
    lib["advance"](tvm.runtime.tensor(np.array([7], np.int32), dev), token, pos)
    assert token.numpy()[0] == 7 and pos.numpy()[0] == 42
