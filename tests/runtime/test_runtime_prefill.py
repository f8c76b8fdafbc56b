"""The T-token step on the CPU: prompts prefilled in chunks of T = 8 (the last one partial)
against the numpy reference's prefill and against the decode step in a token loop, for prompt
lengths 1, T-1, T, T+1 and 3T+5, after a cached prefix, and through `generate` with prefix
reuse. The model is conftest's real tiny one (decisive top-1 tokens and experts), compiled on
float activations (conftest's `float_schedules`); the packaged cpu step, on int8 activations,
against the reference that rounds as it does: `test_the_int8_step_prefills_as_its_reference`.

Measured here (max over rows, at lengths 1 / 7 / 8 / 9 / 29): logits against the f16-cache
reference within 4e-6 - 5.2e-5 of the largest |logit|; KL(token loop || chunks) 3.6e-9 - 6.8e-8,
KL(reference || chunks) 1.1e-10 - 8.6e-9; top-1 agreement 1.0 with both at every length."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sparkinfer.runtime.engine import Engine, plan_chunks
from tests.runtime.conftest import (
    REAL_CONFIG,
    can_compile,
    f16_cache_reference,
    float_schedules,
    step_int8_inputs,
)

T = 8
LENGTHS = [1, T - 1, T, T + 1, 3 * T + 5]


@pytest.fixture(scope="module")
def engine(real_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    from sparkinfer.compiler.pipeline import compile_model
    from sparkinfer.gguf_file import GGUFModel

    if not can_compile():
        pytest.skip("runtime-only TVM: cannot build the CPU module here")
    model = GGUFModel.open(real_model)
    types = {n: i.ggml_type for n, i in model.tensors.items()}
    root = tmp_path_factory.mktemp("chunked")
    result = compile_model(model.config, types, "cpu", root, prefill_chunks=(T,), schedules=float_schedules(root))
    assert result.manifest.prefill_chunks == (T,)
    return Engine(real_model, arch="cpu", module_dir=result.directory)


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    return np.random.default_rng(7).integers(0, REAL_CONFIG.vocab_size, 3 * T + 5).tolist()


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """max over rows of KL(p || q)."""
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return float((np.exp(lp) * (lp - lq)).sum(-1).max())


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


def assert_agrees(got: np.ndarray, want: np.ndarray, loop: np.ndarray) -> None:
    assert got.shape == want.shape
    assert rel_err(got, want) < 1e-3
    assert kl(loop, got) < 1e-5
    assert (got.argmax(-1) == loop.argmax(-1)).all() and (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.parametrize("n", LENGTHS)
def test_chunked_logits_match_the_reference_and_the_token_loop(engine: Engine, real_model: Path,
                                                               prompt: list[int], n: int) -> None:
    from sparkinfer.gguf_file import GGUFModel

    tokens = prompt[:n]
    got = engine.forward(tokens)
    assert int(engine.kv.arrays["pos"].numpy()[0]) == engine.kv.n_tokens == n  # pos advanced by n_valid
    loop = engine.forward(tokens, token_loop=True)
    want = f16_cache_reference(REAL_CONFIG, GGUFModel.open(real_model)).prefill(tokens)
    assert_agrees(got, want, loop)


def test_the_int8_step_prefills_as_its_reference(real_model: Path, prompt: list[int], tmp_path: Path) -> None:
    """The packaged cpu step: int8 activations in the decode step, and its T-token step's GEMMs
    reading the values of those int8 blocks (chunk_activations "q8"). The token loop is the
    reference that rounds where the step does, to float32 rounding, and so are the chunks, but
    for a value that lands within float32 rounding of a rounding boundary: it may round to the next
    int8 value in one path and not the other (seen on this prompt at 29 tokens: row 28 of the
    chunks 7.6e-3 off, KL 1.9e-4, and of the token loop in the lane form 1.0e-3; the other rows
    within 1.3e-6). Without the rounding every row is ~4e-2 off."""
    from sparkinfer.compiler.pipeline import compile_model
    from sparkinfer.gguf_file import GGUFModel

    model = GGUFModel.open(real_model)
    types = {n: i.ggml_type for n, i in model.tensors.items()}
    result = compile_model(model.config, types, "cpu", tmp_path, prefill_chunks=(T,))
    assert {k["factory"] for k in result.manifest.kernels} >= {"round_q8_1_rows", "gemv_q8_lanes", "moe_gate_up_silu_q8_lanes"}
    int8 = Engine(real_model, arch="cpu", module_dir=result.directory)
    try:
        got, loop = int8.forward(prompt), int8.forward(prompt, token_loop=True)
    finally:
        int8.close()
    want = f16_cache_reference(REAL_CONFIG, model, step_int8_inputs(model)).prefill(prompt)
    for out in (loop, got):
        row_err = np.abs(out.astype(np.float64) - want).max(-1) / np.abs(want).max()
        assert np.mean(row_err < 1e-5) >= 0.9 and row_err.max() < 2e-2, row_err
    assert kl(loop, got) < 1e-3 and (got.argmax(-1) == want.argmax(-1)).all()


def test_chunks_after_a_cached_prefix(engine: Engine, real_model: Path, prompt: list[int]) -> None:
    from sparkinfer.gguf_file import GGUFModel

    split = T + 3
    engine.forward(prompt[:split])
    got = engine.forward(prompt[split:], reset=False)
    loop = engine.forward(prompt, token_loop=True)[split:]
    want = f16_cache_reference(REAL_CONFIG, GGUFModel.open(real_model)).prefill(prompt)[split:]
    assert_agrees(got, want, loop)


def test_generate_prefills_in_chunks_and_reuses_a_prefix(engine: Engine, real_model: Path,
                                                         prompt: list[int]) -> None:
    from sparkinfer.gguf_file import GGUFModel

    ref = f16_cache_reference(REAL_CONFIG, GGUFModel.open(real_model))
    first = engine.generate(prompt[: 2 * T], 5, stop_tokens=())
    assert first.all() == ref.greedy_generate(prompt[: 2 * T], 5)
    second = engine.generate(prompt, 5, stop_tokens=(), reuse_prefix=True)
    assert second.all() == ref.greedy_generate(prompt, 5)
    assert second.stats.reused_tokens == 2 * T
    assert int(engine.kv.arrays["pos"].numpy()[0]) == len(prompt) + 4


def test_a_seeded_sample_does_not_depend_on_the_cached_prefix(engine: Engine, prompt: list[int]) -> None:
    # The last chunk samples with the draw counter the token loop reaches there, so reusing a
    # prefix (fewer, other chunks) draws the same tokens.
    kwargs = dict(temperature=1.5, top_k=50, seed=11, stop_tokens=())
    fresh = engine.generate(prompt, 6, **kwargs).all()
    engine.generate(prompt[:T + 1], 1, **kwargs).all()
    reused = engine.generate(prompt, 6, reuse_prefix=True, **kwargs)
    assert reused.all() == fresh and reused.stats.reused_tokens == T + 1


def test_the_chunk_plan_fills_the_largest_step_then_the_smallest_that_holds_the_rest() -> None:
    assert plan_chunks((8, 32), 70) == [(32, 32), (32, 32), (8, 6)]
    assert plan_chunks((8, 32), 20) == [(32, 20)]
    assert plan_chunks((8,), 1) == [(8, 1)]
    assert plan_chunks((8,), 0) == []
    gpu_sizes = (128, 512, 2048)
    assert plan_chunks(gpu_sizes, 4096) == [(2048, 2048)] * 2
    assert plan_chunks(gpu_sizes, 200) == [(512, 200)]


def test_an_engine_may_keep_one_of_the_module_s_steps() -> None:
    from sparkinfer.errors import InvalidParameterError
    from sparkinfer.runtime.engine import chunk_sizes

    assert chunk_sizes((512, 128, 2048), None) == (128, 512, 2048)
    assert chunk_sizes((128, 512, 2048), 2048) == (2048,)
    with pytest.raises(InvalidParameterError, match=r"^prefill chunk 300 is not one of the module's T-token steps "
                                                    r"\(128, 512, 2048\)$"):
        chunk_sizes((128, 512, 2048), 300)
    with pytest.raises(InvalidParameterError, match="prefill chunk 8 is not one of the module's T-token steps "
                                                    "\\(none: it prefills token by token\\)"):
        chunk_sizes((), 8)


def test_an_engine_kept_to_its_module_s_step_scores_alike_and_refuses_others(engine: Engine, real_model: Path,
                                                                  prompt: list[int]) -> None:
    from sparkinfer.errors import InvalidParameterError

    kept = Engine(real_model, arch="cpu", module_dir=engine.manifest.directory, prefill_chunk=T)
    try:
        np.testing.assert_array_equal(kept.forward(prompt), engine.forward(prompt))
    finally:
        kept.close()
    with pytest.raises(InvalidParameterError, match=f"prefill chunk {2 * T} is not one of the module's T-token steps "
                                                    f"\\({T}\\)"):
        Engine(real_model, arch="cpu", module_dir=engine.manifest.directory, prefill_chunk=2 * T)


def test_the_chunk_plan_pads_a_chunk_by_at_most_max_padding_rows() -> None:
    from sparkinfer.runtime.engine import MAX_PADDING_ROWS

    gpu_sizes = (128, 512, 2048)
    assert plan_chunks(gpu_sizes, 2048 - MAX_PADDING_ROWS) == [(2048, 2048 - MAX_PADDING_ROWS)]
    assert plan_chunks(gpu_sizes, 1024) == [(512, 512)] * 2  # not one 2048-token chunk, half of it padding
    assert plan_chunks(gpu_sizes, 2048 + 600) == [(2048, 2048), (512, 512), (128, 88)]


def test_a_prompt_of_a_few_new_tokens_takes_the_token_loop(engine: Engine, prompt: list[int]) -> None:
    from sparkinfer.runtime.engine import MIN_CHUNKED_TOKENS

    short = engine.generate(prompt[: MIN_CHUNKED_TOKENS - 1], 3, stop_tokens=())
    assert len(short.all()) == 3 and not short.stats.prefill_chunked  # (stats fill in as it runs)
    long = engine.generate(prompt[: MIN_CHUNKED_TOKENS], 3, stop_tokens=())
    assert len(long.all()) == 3 and long.stats.prefill_chunked
    # a turn adding a few tokens to a cached prefix: the loop again
    turn = engine.generate(prompt[: MIN_CHUNKED_TOKENS + 2], 3, stop_tokens=(), reuse_prefix=True)
    turn.all()
    assert turn.stats.reused_tokens == MIN_CHUNKED_TOKENS and not turn.stats.prefill_chunked


@pytest.mark.slow
def test_the_planar_q6_k_step_prefills_as_the_gguf_one(engine: Engine, real_model: Path, prompt: list[int],
                                                       tmp_path: Path) -> None:
    """q6_k_layout="planar" (a schedules file picks it): the weights go up re-laid out
    (runtime/weights.py) and the chunks' GEMMs and the decode GEMVs read planar Q6_K; its logits,
    chunked and token by token, agree with the GGUF-layout engine's to float32 reassociation."""
    from sparkinfer.compiler.pipeline import compile_model
    from sparkinfer.gguf_file import GGUFModel
    from sparkinfer.schedule.schedules import SchedulesFile

    model = GGUFModel.open(real_model)
    types = {n: i.ggml_type for n, i in model.tensors.items()}
    schedules = SchedulesFile("cpu", {}, step={"q6_k_layout": "planar"}).write(tmp_path / "cpu.json")
    result = compile_model(model.config, types, "cpu", tmp_path, prefill_chunks=(T,), schedules=schedules)
    assert any(i.layout for i in result.manifest.inputs)
    planar = Engine(real_model, arch="cpu", module_dir=result.directory)
    for token_loop in (False, True):
        got = planar.forward(prompt, token_loop=token_loop)
        want = engine.forward(prompt, token_loop=token_loop)
        assert rel_err(got, want) < 1e-5 and (got.argmax(-1) == want.argmax(-1)).all()
