"""The T-token step's kernels (gemm, moe_chunk, prefill_attention, chunk, and the row forms of
embedding, norm and router), built for LLVM unscheduled, against their numpy references on
fresh random inputs. Chunks are short and rows odd-sized so padding and partial tiles show."""

import numpy as np
import pytest
import tvm
from gguf import GGMLQuantizationType as T

from sparkinfer.compiler.targets import target_for
from sparkinfer.kernels import chunk, embedding, gemm, gemv, moe_chunk, norm, prefill_attention, router
from sparkinfer.kernels.testing import assert_gemv_close, random_weights

ALL_TYPES = [T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0, T.F16, T.BF16, T.F32]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261204)


def run_cpu(func: tvm.tirx.PrimFunc, *arrays: np.ndarray, n_out: int = 1) -> list[np.ndarray]:
    """Build for this CPU and run; the last n_out arrays are outputs (or in-place buffers),
    outputs given as NaN-filled arrays so that an element never written fails."""
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target_for("cpu"))
    dev = tvm.cpu()
    tensors = [tvm.runtime.tensor(a, dev) for a in arrays]
    lib["main"](*tensors)
    return [t.numpy() for t in tensors[len(arrays) - n_out:]]


def nan(*shape: int) -> np.ndarray:
    return np.full(shape, np.nan, np.float32)


@pytest.mark.parametrize("t", [*ALL_TYPES, gemv.Q6_K_PLANAR], ids=lambda t: gemv.gemv_format(t).name)
def test_gemm_matches_numpy(rng: np.random.Generator, t: T) -> None:
    n, k, rows = 37, 512, 5
    data = random_weights(t, (n, k), rng)
    x = rng.standard_normal((rows, k), dtype=np.float32)
    (y,) = run_cpu(gemm.gemm(t, rows, n, k), gemv.weight_view(t, data), x, nan(rows, n))
    magnitude = np.abs(x).astype(np.float64) @ np.abs(gemv.dequantize_rows(t, data, k)).T
    assert_gemv_close(y, gemm.gemm_reference(t, data, x), magnitude)


@pytest.mark.parametrize("t", [T.Q4_K, T.Q6_K, gemv.Q6_K_PLANAR, T.F16], ids=lambda t: gemv.gemv_format(t).name)
def test_gemm_with_half_operands_matches_numpy_on_half_operands(rng: np.random.Generator, t: T) -> None:
    n, k, rows = 48, 512, 5
    data = random_weights(t, (n, k), rng)
    x = rng.standard_normal((rows, k), dtype=np.float32)
    (y,) = run_cpu(gemm.gemm(t, rows, n, k, True), gemv.weight_view(t, data), x, nan(rows, n))
    magnitude = np.abs(x).astype(np.float64) @ np.abs(gemv.dequantize_rows(t, data, k)).T
    assert_gemv_close(y, gemm.gemm_reference(t, data, x, half_operands=True), magnitude)
    # and the rounding shows: float32 operands give another answer
    assert not np.allclose(y, gemm.gemm_reference(t, data, x), rtol=1e-6, atol=0)


def test_row_kernels_match_their_one_token_forms(rng: np.random.Generator) -> None:
    rows, h, vocab, eps = 5, 256, 40, 1e-6
    data = random_weights(T.Q4_K, (vocab, h), rng)
    tokens = np.array([3, 39, 0, 17, 3], np.int32)
    (x,) = run_cpu(embedding.embedding_rows(T.Q4_K, vocab, h, rows), gemv.weight_view(T.Q4_K, data), tokens,
                   nan(rows, h))
    for i, tok in enumerate(tokens):
        np.testing.assert_array_equal(x[i], embedding.embedding_reference(T.Q4_K, data, int(tok)))
    w = rng.standard_normal(h, dtype=np.float32)
    r = rng.standard_normal((rows, h), dtype=np.float32)
    (y,) = run_cpu(norm.rms_norm_rows(rows, h, eps), x, w, nan(rows, h))
    np.testing.assert_allclose(y, norm.rms_norm_reference(x, w, eps), rtol=1e-5, atol=1e-6)
    total, y = run_cpu(norm.add_rms_norm_rows(rows, h, eps), x, r, w, nan(rows, h), nan(rows, h), n_out=2)
    want_total, want_y = norm.add_rms_norm_reference(x, r, w, eps)
    np.testing.assert_array_equal(total, want_total)
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-6)
    (last,) = run_cpu(chunk.take_row(rows, h), x, np.array([3], np.int32), nan(h))
    np.testing.assert_array_equal(last, chunk.take_row_reference(x, 3))


def test_router_topk_rows_matches_numpy(rng: np.random.Generator) -> None:
    rows, experts, used = 6, 16, 4
    logits = rng.standard_normal((rows, experts), dtype=np.float32)
    logits[2, 5] = logits[2, 9]  # a tie: the lower id wins
    ids, weights = run_cpu(router.router_topk_rows(rows, experts, used), logits, np.zeros((rows, used), np.int32),
                           nan(rows, used), n_out=2)
    for t in range(rows):
        want_ids, want_w = router.router_topk_reference(logits[t], used)
        np.testing.assert_array_equal(ids[t], want_ids)
        np.testing.assert_allclose(weights[t], want_w, rtol=1e-6)


@pytest.mark.parametrize("rows, experts, used, n_valid, skew", [
    (9, 5, 2, 7, False),  # a token a chunk
    (130, 128, 8, 129, False),  # chunks of 3 tokens, the last one of 1; a padding token
    (512, 128, 8, 300, False),  # the GPUs' chunk, partly valid
    (512, 128, 8, 512, True),  # every pair on one expert
    (4096, 128, 8, 4001, False),  # 32768 pairs: int32 counts and starts
], ids=["token-chunks", "partial-chunk", "T512-partial", "T512-one-expert", "int32"])
def test_moe_sort_groups_valid_tokens_by_expert(rng: np.random.Generator, rows: int, experts: int, used: int,
                                                n_valid: int, skew: bool) -> None:
    ids = np.stack([rng.choice(experts, used, replace=False) for _ in range(rows)]).astype(np.int32)
    if skew:
        ids[:] = 77
    assert moe_chunk.sort_index_dtype(rows * used) == ("int32" if rows * used >= 2**15 else "int16")
    got = run_cpu(moe_chunk.moe_sort(rows, experts, used), ids, np.array([n_valid], np.int32),
                  np.full(experts + 1, -1, np.int32), np.full(rows * used, -1, np.int32),
                  np.full((rows, used), -1, np.int32), n_out=3)
    offsets, row_token, row_of = moe_chunk.moe_sort_reference(ids, n_valid, experts)
    for a, b in zip(got, (offsets, row_token, row_of)):
        np.testing.assert_array_equal(a, b)
    assert offsets[-1] == n_valid * used
    for t in range(n_valid):  # every valid pair's row lies in its expert's range, token t
        for j in range(used):
            r, e = row_of[t, j], ids[t, j]
            assert offsets[e] <= r < offsets[e + 1] and row_token[r] == t


@pytest.mark.parametrize("types", [(T.Q4_K, T.Q5_K, T.Q6_K), (T.Q8_0, T.F16, T.F32),
                                   (T.Q4_K, T.Q4_K, gemv.Q6_K_PLANAR)],
                         ids=lambda ts: "-".join(t.name for t in ts))
def test_moe_chunk_pipeline_matches_numpy(rng: np.random.Generator, types: tuple[T, T, T]) -> None:
    rows, experts, used, h, ffn, n_valid = 7, 5, 2, 256, 256, 6
    tg, tu, td = types
    g, u = random_weights(tg, (experts, ffn, h), rng), random_weights(tu, (experts, ffn, h), rng)
    d = random_weights(td, (experts, h, ffn), rng)
    ids = np.stack([rng.choice(experts, used, replace=False) for _ in range(rows)]).astype(np.int32)
    weights = rng.random((rows, used)).astype(np.float32)
    x = rng.standard_normal((rows, h), dtype=np.float32)
    res = rng.standard_normal((rows, h), dtype=np.float32)
    nv = np.array([n_valid], np.int32)
    offsets, row_token, row_of = moe_chunk.moe_sort_reference(ids, n_valid, experts)
    r = rows * used
    (gate,) = run_cpu(moe_chunk.grouped_gemm(tg, experts, r, ffn, h, rows, True), gemv.weight_view(tg, g),
                      offsets, row_token, x, nan(r, ffn))
    (up,) = run_cpu(moe_chunk.grouped_gemm(tu, experts, r, ffn, h, rows, True), gemv.weight_view(tu, u),
                    offsets, row_token, x, nan(r, ffn))
    (act,) = run_cpu(moe_chunk.silu_mul(r, ffn), gate, up, nan(r, ffn))
    (down,) = run_cpu(moe_chunk.grouped_gemm(td, experts, r, h, ffn, r, False), gemv.weight_view(td, d),
                      offsets, row_token, act, nan(r, h))
    assert not np.isnan(down[: n_valid * used]).any()
    (out,) = run_cpu(moe_chunk.moe_combine_residual(rows, used, r, h), down, row_of, weights, res, nv,
                     nan(rows, h))
    want = moe_chunk.moe_chunk_reference((tg, g), (tu, u), (td, d), ids, weights, x, res, n_valid)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    np.testing.assert_array_equal(out[n_valid:], res[n_valid:])


def test_grouped_gemm_rejects_a_row_count_off_the_tile() -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        moe_chunk.grouped_gemm(T.F32, 2, 4, 24, 64, 4, True)


@pytest.mark.parametrize("pos, n_valid", [(0, 5), (6, 3), (61, 5)])
def test_rope_append_and_causal_attention_match_numpy(rng: np.random.Generator, pos: int, n_valid: int) -> None:
    rows, nh, nkv, d, p, mp, n_pages = 5, 4, 2, 64, 4, 17, 20
    eps, theta = 1e-6, 1e6
    q = rng.standard_normal((rows, nh * d), dtype=np.float32)
    k = rng.standard_normal((rows, nkv * d), dtype=np.float32)
    v = rng.standard_normal((rows, nkv * d), dtype=np.float32)
    qw, kw = rng.standard_normal(d, dtype=np.float32), rng.standard_normal(d, dtype=np.float32)
    table = rng.permutation(n_pages)[:mp].astype(np.int32)
    kc = rng.standard_normal((n_pages, p, nkv, d)).astype(np.float16)
    vc = rng.standard_normal((n_pages, p, nkv, d)).astype(np.float16)
    state = (np.array([pos], np.int32), np.array([n_valid], np.int32), table)
    kc_out, vc_out, q_rot = run_cpu(
        prefill_attention.qk_norm_rope_kv_append_rows(rows, nh, nkv, d, p, mp, eps, theta),
        q, k, v, qw, kw, *state, kc, vc, nan(rows, nh, d), n_out=3)
    want_q, want_k, want_v = prefill_attention.qk_norm_rope_kv_append_rows_reference(
        q, k, v, qw, kw, pos, n_valid, table, kc, vc, eps, theta)
    np.testing.assert_allclose(q_rot, want_q, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(kc_out.astype(np.float32), want_k.astype(np.float32), rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(vc_out, want_v)  # padding rows left the cache as it was
    (out,) = run_cpu(prefill_attention.causal_prefill_attention(rows, nh, nkv, d, p, mp),
                     want_q, want_k, want_v, table, state[0], state[1], nan(rows, nh * d))
    want = prefill_attention.causal_prefill_attention_reference(want_q, want_k, want_v, table, pos, n_valid)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)


def expert_rows(rng: np.random.Generator, n_tokens: int, experts: int, used: int, n_valid: int,
                crowded: int, row_tile: int = moe_chunk.F16_ROW_TILES[0]) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, row_token) of a chunk whose expert 0 has no row and expert 1 has `crowded`
    (more than one float16 `row_tile`: a full tile, then a partial one)."""
    ids = np.empty((n_tokens, used), np.int32)
    for t in range(n_tokens):
        forced = [1] if t < crowded else []
        ids[t] = forced + list(rng.choice(np.arange(2, experts), used - len(forced), replace=False))
    offsets, row_token, _ = moe_chunk.moe_sort_reference(ids, n_valid, experts)
    assert offsets[1] == 0 and offsets[2] - offsets[1] == crowded > row_tile
    return offsets, row_token


# Each row tile (F16_ROW_TILES) with a crowded expert of a full tile and 3 rows more.
@pytest.mark.parametrize("types, row_tile", [((T.Q4_K, T.Q4_K), 32), ((T.Q4_K, T.Q6_K), 32), ((T.Q8_0, T.F16), 32),
                                             ((T.Q4_K, T.Q4_K), 64)],
                         ids=lambda v: "-".join(t.name for t in v) if isinstance(v, tuple) else f"rows{v}")
def test_grouped_gate_up_silu_f16_matches_numpy_on_half_operands(rng: np.random.Generator,
                                                                 types: tuple[T, T], row_tile: int) -> None:
    n_tokens, experts, used, h, ffn = row_tile + 8, 5, 2, 256, 128
    n_valid = n_tokens - 2
    offsets, row_token = expert_rows(rng, n_tokens, experts, used, n_valid, row_tile + 3, row_tile)
    gate, up = (random_weights(t, (experts, ffn, h), rng) for t in types)
    x = 2 * rng.standard_normal((n_tokens, h), dtype=np.float32)  # gate sums into SiLU's curved range
    r = n_tokens * used
    func = moe_chunk.grouped_gate_up_silu_f16(*types, experts, r, ffn, h, n_tokens, row_tile)
    (act,) = run_cpu(func, gemv.weight_view(types[0], gate), gemv.weight_view(types[1], up), offsets, row_token,
                     x, nan(r, ffn))
    want, magnitude = moe_chunk.grouped_gate_up_silu_reference((types[0], gate), (types[1], up), offsets,
                                                               row_token, x)
    assert_gemv_close(act[:offsets[-1]], want, magnitude)
    assert np.isnan(act[offsets[-1]:]).all(), "a row past offsets[E] was written"


@pytest.mark.parametrize("t, row_tile", [(T.Q6_K, 32), (T.Q4_K, 32), (gemv.Q6_K_PLANAR, 32), (T.Q6_K, 64)],
                         ids=lambda v: getattr(v, "name", f"rows{v}"))
def test_grouped_gemm_f16_matches_numpy_on_half_operands(rng: np.random.Generator, t: T, row_tile: int) -> None:
    n_tokens, experts, used, h, ffn = row_tile + 8, 5, 2, 128, 256
    n_valid = n_tokens - 3
    offsets, _ = expert_rows(rng, n_tokens, experts, used, n_valid, row_tile + 3, row_tile)
    data = random_weights(t, (experts, h, ffn), rng)
    r = n_tokens * used
    x = rng.standard_normal((r, ffn), dtype=np.float32)
    (y,) = run_cpu(moe_chunk.grouped_gemm_f16(t, experts, r, h, ffn, row_tile), gemv.weight_view(t, data),
                   offsets, x, nan(r, h))
    want, magnitude = moe_chunk.grouped_gemm_reference(t, data, offsets, np.zeros(r, np.int32), x, False,
                                                       half_operands=True)
    assert_gemv_close(y[:offsets[-1]], want, magnitude)
    assert np.isnan(y[offsets[-1]:]).all(), "a row past offsets[E] was written"
    # and the rounding shows: float32 operands give another answer
    plain, _ = moe_chunk.grouped_gemm_reference(t, data, offsets, np.zeros(r, np.int32), x, False)
    assert not np.allclose(y[:offsets[-1]], plain, rtol=1e-6, atol=0)


def test_the_f16_grouped_gemm_rejects_a_shape_off_its_tiles() -> None:
    with pytest.raises(ValueError, match="n a multiple of 64 and k of 16"):
        moe_chunk.grouped_gemm_f16(T.Q8_0, 2, 4, 96, 64)
    with pytest.raises(ValueError, match=r"row tile must be one of \(32, 64\), got 48"):
        moe_chunk.grouped_gemm_f16(T.Q8_0, 2, 4, 64, 64, 48)


def test_the_f16_row_tile_follows_the_rows_an_expert_averages() -> None:
    assert moe_chunk.f16_row_tile(4096, 128) == 64  # chunks of 512 tokens, top 8 of 128
    assert moe_chunk.f16_row_tile(1024, 128) == 32  # chunks of 128


@pytest.mark.parametrize("compact, d", [(False, 64), (True, 64), (True, 128)],
                         ids=["read_ahead", "compact", "compact-d128"])
@pytest.mark.parametrize("rows, pos, n_valid", [(5, 0, 5), (5, 61, 3), (40, 70, 37)])
def test_causal_attention_with_half_operands_matches_numpy_on_half_operands(
        rng: np.random.Generator, rows: int, pos: int, n_valid: int, compact: bool, d: int) -> None:
    """The tensor-core form: 2 query heads a KV head, so a 64-row tile is 32 queries (the
    40-row chunk has two tiles); 16-slot pages, so each 64-key tile spans four pages; pos 70
    gives the last rows two key tiles (the second's max rescales the first's sums). Both forms
    (the step variant attention_form); the compact one also at head dim 128, where P V goes in two parts."""
    nh, nkv, p, mp, n_pages = 4, 2, 16, 9, 12
    table = rng.permutation(n_pages)[:mp].astype(np.int32)
    kc = (rng.standard_normal((n_pages, p, nkv, d)) * 2).astype(np.float16)
    vc = rng.standard_normal((n_pages, p, nkv, d)).astype(np.float16)
    q = rng.standard_normal((rows, nh, d), dtype=np.float32)
    state = (table, np.array([pos], np.int32), np.array([n_valid], np.int32))
    (out,) = run_cpu(prefill_attention.causal_prefill_attention(rows, nh, nkv, d, p, mp, True, compact),
                     q, kc, vc, *state, nan(rows, nh * d))
    want = prefill_attention.causal_prefill_attention_half_reference(q, kc, vc, table, pos, n_valid)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(out[n_valid:], 0)
    # and it is attention: the float32 oracle within float16's rounding of Q and P
    exact = prefill_attention.causal_prefill_attention_reference(q, kc, vc, table, pos, n_valid)
    np.testing.assert_allclose(out, exact, rtol=1e-2, atol=5e-3)
