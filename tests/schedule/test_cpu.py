"""The CPU rules (sparkinfer/schedule/cpu.py): each scheduled kernel against its numpy reference
on fresh random inputs, at the default knobs and at other points of its space (serial and
parallel, scalar and vector lanes, row tasks that do not divide the rows)."""

import numpy as np
import pytest
import tvm
from gguf import GGMLQuantizationType as T

from sparkinfer import quant
from sparkinfer.compiler.pipeline import CPU_ATTENTION_TILES
from sparkinfer.compiler.targets import target_for
from sparkinfer.kernels import attention as A
from sparkinfer.kernels import embedding as E
from sparkinfer.kernels import gemv as G
from sparkinfer.kernels import moe as M
from sparkinfer.kernels import norm as N
from sparkinfer.kernels import rope as R
from sparkinfer.kernels.testing import assert_gemv_close, assert_qk_norm_rope_kv_append_close, random_weights
from sparkinfer.schedule.arch import arch_facts
from sparkinfer.schedule.cpu import CpuDotKnobs, CpuVectorKnobs
from sparkinfer.schedule.space import Knobs, kernel_use, rule_for, schedule_kernel

CPU = arch_facts("cpu")
# (parallel, rows_per_task, vector, unroll) besides the default: serial scalar lanes, parallel
# two-lane tasks of 8 rows (96 rows: a last task of 0 rows is never run; 100: a partial one).
DOT_KNOBS = [None, CpuDotKnobs(0, 64, 1, 16), CpuDotKnobs(1, 8, 2, 1024)]


def run(family: str, factory, args: tuple, knobs: Knobs | None, inputs: list, outputs: list) -> list:  # noqa: ANN001
    """`factory(*args)` scheduled by its CPU rule with `knobs`, run on `inputs`; the outputs
    are poisoned with NaN first (integer ones keep the caller's poison), so an element never
    written fails."""
    use = kernel_use(family, factory.__name__, *args)
    func = schedule_kernel(factory(*args), use, CPU, knobs)
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target_for("cpu"))
    tensors = [tvm.runtime.tensor(a) for a in inputs]
    outs = [tvm.runtime.tensor(np.full_like(o, np.nan) if o.dtype.kind == "f" else o) for o in outputs]
    lib["main"](*tensors, *outs)
    return [o.numpy() for o in outs]


def magnitude(t: T, data: np.ndarray, x: np.ndarray) -> np.ndarray:
    """|W| . |x|: the scale of an fp32 dot product's rounding error."""
    w = quant.dequantize(t, data, (data.shape[0], x.shape[-1]))
    return np.abs(w).astype(np.float64) @ np.abs(x).astype(np.float64)


@pytest.mark.parametrize("knobs", DOT_KNOBS, ids=["default", "serial", "parallel"])
@pytest.mark.parametrize("t, n", [(T.Q4_K, 96), (T.Q6_K, 100), (T.Q8_0, 96), (T.F32, 100)], ids=lambda v: str(v))
def test_gemv(t: T, n: int, knobs: CpuDotKnobs | None) -> None:
    rng = np.random.default_rng(1)
    k = 512
    data = random_weights(t, (n, k), rng)
    x = rng.standard_normal(k, dtype=np.float32)
    if knobs is not None:
        space = rule_for(kernel_use("gemv", "gemv", t, n, k), CPU).space(kernel_use("gemv", "gemv", t, n, k), CPU)
        knobs = CpuDotKnobs(knobs.parallel, knobs.rows_per_task, min(knobs.vector, space["vector"][-1]), knobs.unroll)
    (y,) = run("gemv", G.gemv, (t, n, k), knobs, [G.weight_view(t, data), x], [np.empty(n, np.float32)])
    assert_gemv_close(y, G.gemv_reference(t, data, x), magnitude(t, data, x))


@pytest.mark.parametrize("knobs", DOT_KNOBS, ids=["default", "serial", "parallel"])
def test_gemv_qkv(knobs: CpuDotKnobs | None) -> None:
    rng = np.random.default_rng(2)
    t, k = T.Q4_K, 256
    datas = [random_weights(t, (n, k), rng) for n in (64, 32, 32)]
    x = rng.standard_normal(k, dtype=np.float32)
    outs = run("gemv", G.gemv_qkv, (t, 64, 32, 32, k), knobs, [*(G.weight_view(t, d) for d in datas), x],
               [np.empty(n, np.float32) for n in (64, 32, 32)])
    for y, y_ref, d in zip(outs, G.gemv_qkv_reference(t, *datas, x), datas, strict=True):
        assert_gemv_close(y, y_ref, magnitude(t, d, x))


@pytest.mark.parametrize("knobs", DOT_KNOBS, ids=["default", "serial", "parallel"])
def test_gemv_normed_and_residual(knobs: CpuDotKnobs | None) -> None:
    """The fused launches' GEMVs: the norm as a prologue (Q/K/V and one GEMV), the residual
    add as an epilogue."""
    rng = np.random.default_rng(5)
    t, k, eps = T.Q4_K, 256, 1e-6
    datas = [random_weights(t, (n, k), rng) for n in (64, 32, 32)]
    h = (rng.standard_normal(k) * 3).astype(np.float32)
    norm_w = (1 + 0.2 * rng.standard_normal(k)).astype(np.float32)
    x = N.rms_norm_reference(h, norm_w, eps)
    views = [G.weight_view(t, d) for d in datas]
    outs = run("gemv", G.gemv_qkv_normed, (t, 64, 32, 32, k, eps), knobs, [*views, h, norm_w],
               [np.empty(n, np.float32) for n in (64, 32, 32)])
    (y,) = run("gemv", G.gemv_normed, (t, 64, k, eps), knobs, [views[0], h, norm_w], [np.empty(64, np.float32)])
    for got, d in zip([*outs, y], [*datas, datas[0]], strict=True):
        assert_gemv_close(got, G.gemv_normed_reference(t, d, h, norm_w, eps), magnitude(t, d, x))
    r = rng.standard_normal(64, dtype=np.float32)
    (y,) = run("gemv", G.gemv_residual, (t, 64, k), knobs, [views[0], x, r], [np.empty(64, np.float32)])
    assert_gemv_close(y, G.gemv_residual_reference(t, datas[0], x, r), magnitude(t, datas[0], x) + np.abs(r))


@pytest.mark.parametrize("knobs", DOT_KNOBS, ids=["default", "serial", "parallel"])
def test_moe_gate_up_silu_and_down_residual(knobs: CpuDotKnobs | None) -> None:
    rng = np.random.default_rng(3)
    n_experts, hidden, inter = 6, 256, 256
    ids = np.array([4, 1], np.int32)
    gate, up = random_weights(T.Q4_K, (n_experts, inter, hidden), rng), random_weights(T.Q6_K, (n_experts, inter, hidden), rng)
    x = (rng.standard_normal(hidden) * 10).astype(np.float32)
    (act,) = run("moe", M.moe_gate_up_silu, (T.Q4_K, T.Q6_K, n_experts, 2, inter, hidden), knobs,
                 [G.weight_view(T.Q4_K, gate), G.weight_view(T.Q6_K, up), ids, x], [np.empty((2, inter), np.float32)])
    ref = M.moe_gate_up_silu_reference(T.Q4_K, gate, T.Q6_K, up, ids, x)
    np.testing.assert_allclose(act, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())

    down = random_weights(T.Q6_K, (n_experts, hidden, inter), rng)
    act = rng.standard_normal((2, inter)).astype(np.float32)
    weights = np.array([0.7, 0.3], np.float32)
    h = rng.standard_normal(hidden).astype(np.float32)
    (h_out,) = run("moe", M.moe_down_residual, (T.Q6_K, n_experts, 2, hidden, inter), knobs,
                   [G.weight_view(T.Q6_K, down), ids, weights, act, h], [np.empty(hidden, np.float32)])
    ref = M.moe_down_residual_reference(T.Q6_K, down, ids, weights, act, h)
    bound = np.abs(h) + sum(w * magnitude(T.Q6_K, down[e], a) for w, e, a in zip(weights, ids, act))
    assert_gemv_close(h_out, ref, bound)


@pytest.mark.parametrize("vector", [None, 1, 32])
def test_norms_and_embedding(vector: int | None) -> None:
    rng = np.random.default_rng(4)
    h, eps = 256, 1e-6
    knobs = None if vector is None else CpuVectorKnobs(vector)
    x, r, w = (rng.standard_normal(h, dtype=np.float32) for _ in range(3))
    (y,) = run("norm", N.rms_norm, (h, eps), knobs, [x, w], [np.empty(h, np.float32)])
    np.testing.assert_allclose(y, N.rms_norm_reference(x, w, eps), rtol=1e-5, atol=1e-6)
    residual, y = run("norm", N.add_rms_norm, (h, eps), knobs, [x, r, w], [np.empty(h, np.float32)] * 2)
    ref_residual, ref_y = N.add_rms_norm_reference(x, r, w, eps)
    np.testing.assert_allclose(residual, ref_residual, rtol=1e-6)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-6)
    data = random_weights(T.Q4_K, (64, h), rng)
    (row,) = run("embedding", E.embedding, (T.Q4_K, 64, h), knobs,
                 [G.weight_view(T.Q4_K, data), np.array([37], np.int32)], [np.empty(h, np.float32)])
    np.testing.assert_array_equal(row, E.embedding_reference(T.Q4_K, data, 37))


# (streams, tile): the default (the GPU's) shape, the CPU step's (compiler.pipeline.CPU_ATTENTION_TILES)
# and one stream of small tiles (several tiles, the last partial); knobs: the default and the
# space's extremes of q . K lanes.
@pytest.mark.parametrize("streams, tile", [(8, 4), CPU_ATTENTION_TILES, (1, 8)])
@pytest.mark.parametrize("vector", [None, 1, 16], ids=["default", "scalar", "lanes16"])
def test_attention_streams_in_parallel(streams: int, tile: int, vector: int | None) -> None:
    rng = np.random.default_rng(5)
    nh, nkv, d, page, pages, splits, pos = 8, 2, 64, 16, 8, 2, 50
    args = (nh, nkv, d, page, pages, splits, streams, tile)
    knobs = None
    if vector is not None:
        use = kernel_use("attention", "paged_decode_attention", *args)
        knobs = CpuVectorKnobs(min(vector, rule_for(use, CPU).space(use, CPU)["vector"][-1]))
    table = rng.permutation(pages).astype(np.int32)
    q = rng.standard_normal((nh, d), dtype=np.float32)
    k, v = (rng.standard_normal((pages, page, nkv, d)).astype(np.float16) for _ in range(2))
    o_part, lse = run("attention", A.paged_decode_attention, args, knobs,
                      [q, k, v, table, np.array([pos], np.int32)],
                      [np.empty((nh, splits, d), np.float32), np.empty((nh, splits), np.float32)])
    o_ref, lse_ref = A.paged_decode_attention_reference(q, k, v, table, pos, splits)
    np.testing.assert_allclose(o_part, o_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, lse_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pos", [0, 37, 200])
def test_rope_by_dim_with_the_heads_unrolled(pos: int) -> None:
    """qk_norm_rope_kv_append's CPU rule (the head dims outside, the heads unrolled inside, so a
    dim's cos and sin are computed once for all heads) against the oracle, the K and V rows landing
    in the page the table maps."""
    rng = np.random.default_rng(pos)
    nh, nkv, d, page, pages, eps, theta = 8, 2, 64, 64, 4, 1e-6, 1e6
    use = kernel_use("rope", "qk_norm_rope_kv_append", nh, nkv, d, page, pages, eps, theta)
    func = schedule_kernel(R.qk_norm_rope_kv_append(nh, nkv, d, page, pages, eps, theta), use, CPU, None)
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target_for("cpu"))
    q, k, v = (4 * rng.standard_normal(n * d, dtype=np.float32) for n in (nh, nkv, nkv))
    q_norm_w, k_norm_w = (rng.uniform(0.5, 1.5, d).astype(np.float32) for _ in range(2))
    table = rng.permutation(pages).astype(np.int32)
    k_cache, v_cache = (rng.standard_normal((pages, page, nkv, d)).astype(np.float16) for _ in range(2))
    args = [q, k, v, q_norm_w, k_norm_w, np.array([pos], np.int32), table, k_cache, v_cache]
    tensors = [tvm.runtime.tensor(a) for a in args]
    q_rot = tvm.runtime.tensor(np.full((nh, d), np.nan, np.float32))
    lib["main"](*tensors, q_rot)
    assert_qk_norm_rope_kv_append_close(q_rot.numpy(), tensors[7].numpy(), tensors[8].numpy(),
                                        (q, k, v, q_norm_w, k_norm_w, table, k_cache, v_cache), pos, eps, theta,
                                        q_rtol=1e-6)


@pytest.mark.parametrize("knobs", DOT_KNOBS, ids=["default", "serial", "parallel"])
def test_moe_gate_up_silu_routed(knobs: CpuDotKnobs | None) -> None:
    """The fused launches' gate/up: router_topk and the FFN norm in its prologue; ids and
    weights exactly router_topk's (experts 2 and 5 tie for the first slot: 2 gets it)."""
    rng = np.random.default_rng(6)
    n_experts, n_used, hidden, inter, eps = 8, 3, 256, 256, 1e-6
    gate, up = random_weights(T.Q4_K, (n_experts, inter, hidden), rng), random_weights(T.Q6_K, (n_experts, inter, hidden), rng)
    logits = rng.standard_normal(n_experts).astype(np.float32)
    logits[2] = logits[5] = logits.max() + 1
    h = (rng.standard_normal(hidden) * 10).astype(np.float32)
    norm_w = (1 + 0.2 * rng.standard_normal(hidden)).astype(np.float32)
    act, ids, weights = run(
        "moe", M.moe_gate_up_silu_routed, (T.Q4_K, T.Q6_K, n_experts, n_used, inter, hidden, eps), knobs,
        [G.weight_view(T.Q4_K, gate), G.weight_view(T.Q6_K, up), logits, h, norm_w],
        [np.empty((n_used, inter), np.float32), np.full(n_used, -1, np.int32), np.empty(n_used, np.float32)])
    act_ref, ids_ref, weights_ref = M.moe_gate_up_silu_routed_reference(
        T.Q4_K, gate, T.Q6_K, up, logits, h, norm_w, n_used, eps)
    assert ids.tolist() == ids_ref.tolist() and ids[:2].tolist() == [2, 5]
    np.testing.assert_allclose(weights, weights_ref, rtol=1e-6)
    np.testing.assert_allclose(act, act_ref, rtol=1e-4, atol=1e-4 * np.abs(act_ref).max())
