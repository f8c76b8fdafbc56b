"""Flash-decode attention and split combine, built for LLVM, against numpy and the oracle."""

import numpy as np
import pytest
import tvm

from sparkinfer.compiler.targets import target_for
from sparkinfer.kernels import attention as A

NH, NKV, D, P, S = 8, 2, 64, 16, 4
PAGE_TABLE = np.array([3, 7, 0, 5, 1, 8], np.int32)  # MP = 6 logical pages, out of order
N_PAGES = 9
# (streams, tile): the default shape (the GPU's) and a small one that runs
# several tiles per stream and several streams per split.
SHAPES = [(8, 4), (3, 2)]


def build(func: tvm.tirx.PrimFunc) -> tvm.runtime.Executable:
    return tvm.compile(tvm.IRModule({"main": func}), target=target_for("cpu"))


@pytest.fixture(scope="module")
def combine() -> tvm.runtime.Executable:
    return build(A.attention_combine(NH, S, D))


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: f"streams{s[0]}_tile{s[1]}")
def attention(request: pytest.FixtureRequest) -> tvm.runtime.Executable:
    streams, tile = request.param
    return build(A.paged_decode_attention(NH, NKV, D, P, len(PAGE_TABLE), S, streams, tile))


def paged_cache(rng: np.random.Generator, pos: int) -> tuple[np.ndarray, np.ndarray]:
    """Random fp16 K and V for positions 0..pos; NaN everywhere else (later slots, unmapped
    pages), so that reading anything outside the context poisons the result."""
    k = np.full((N_PAGES, P, NKV, D), np.nan, np.float16)
    v = np.full((N_PAGES, P, NKV, D), np.nan, np.float16)
    t = np.arange(pos + 1)
    k[PAGE_TABLE[t // P], t % P] = rng.standard_normal((pos + 1, NKV, D)) * 2
    v[PAGE_TABLE[t // P], t % P] = rng.standard_normal((pos + 1, NKV, D))
    return k, v


# 0: one token, splits 1..3 empty; 2 and 5: C = 1 and 2, the last split empty; 15/16/17:
# around a page boundary; 95: every slot of every page.
@pytest.mark.parametrize("pos", [0, 2, 5, 15, 16, 17, 50, 95])
def test_paged_decode_attention_matches_numpy_and_oracle(
    attention: tvm.runtime.Executable, combine: tvm.runtime.Executable, pos: int
) -> None:
    rng = np.random.default_rng(2000 + pos)
    q = rng.standard_normal((NH, D), dtype=np.float32)
    k_cache, v_cache = paged_cache(rng, pos)
    o_part = tvm.runtime.tensor(np.full((NH, S, D), np.nan, np.float32))
    lse = tvm.runtime.tensor(np.full((NH, S), np.nan, np.float32))
    inputs = [q, k_cache, v_cache, PAGE_TABLE, np.array([pos], np.int32)]
    attention["main"](*[tvm.runtime.tensor(a) for a in inputs], o_part, lse)

    o_ref, lse_ref = A.paged_decode_attention_reference(q, k_cache, v_cache, PAGE_TABLE, pos, S)
    empty = np.isneginf(lse_ref)
    chunk = -(-(pos + 1) // S)
    np.testing.assert_array_equal(empty, np.broadcast_to(np.arange(S) * chunk > pos, (NH, S)))
    np.testing.assert_array_equal(np.isneginf(lse.numpy()), empty)
    np.testing.assert_allclose(lse.numpy()[~empty], lse_ref[~empty], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(o_part.numpy(), o_ref, rtol=1e-5, atol=1e-5)

    out = tvm.runtime.tensor(np.full(NH * D, np.nan, np.float32))
    combine["main"](o_part, lse, out)
    oracle = A.decode_attention_reference(q, k_cache, v_cache, PAGE_TABLE, pos)
    np.testing.assert_allclose(out.numpy(), oracle, rtol=1e-5, atol=1e-5)
    combined_ref = A.attention_combine_reference(o_ref, lse_ref)
    np.testing.assert_allclose(combined_ref, oracle, rtol=1e-5, atol=1e-5)


def test_gqa_group_reads_its_own_kv_head() -> None:
    """With V constant per KV head, every query head's output is its group's constant."""
    pos, streams, tile = 40, 3, 2
    rng = np.random.default_rng(3)
    k_cache, v_cache = paged_cache(rng, pos)
    t = np.arange(pos + 1)
    for j in range(NKV):
        v_cache[PAGE_TABLE[t // P], t % P, j] = j + 1
    func = A.paged_decode_attention(NH, NKV, D, P, len(PAGE_TABLE), 1, streams, tile)
    o_part = tvm.runtime.tensor(np.full((NH, 1, D), np.nan, np.float32))
    lse = tvm.runtime.tensor(np.full((NH, 1), np.nan, np.float32))
    q = rng.standard_normal((NH, D), dtype=np.float32)
    inputs = [q, k_cache, v_cache, PAGE_TABLE, np.array([pos], np.int32)]
    build(func)["main"](*[tvm.runtime.tensor(a) for a in inputs], o_part, lse)
    group = NH // NKV
    expected = (np.arange(NH) // group + 1).astype(np.float32)[:, None, None]
    np.testing.assert_allclose(o_part.numpy(), np.broadcast_to(expected, (NH, 1, D)), rtol=1e-6)
