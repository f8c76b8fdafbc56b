"""The fused MoE compute, built for LLVM, against the numpy reference on random blocks."""

import numpy as np
import pytest
import tvm
from gguf import GGMLQuantizationType as T

from sparkinfer import quant
from sparkinfer.compiler.targets import target_for
from sparkinfer.errors import TensorShapeError
from sparkinfer.kernels import moe as M
from sparkinfer.kernels.gemv import Q6_K_PLANAR, dequantize_rows, gemv_experts_reference, weight_view
from sparkinfer.kernels.testing import assert_gemv_close, random_weights
from sparkinfer.reference.qwen3moe import silu

N_EXPERTS, HIDDEN, N_FFN = 12, 256, 256
# Out of order, skipping experts, and one id out of range, which must read the last expert.
IDS = np.array([9, 0, 13, 4], np.int32)
IDS_CLAMPED = np.minimum(IDS, N_EXPERTS - 1)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261127)


def run_cpu(func: tvm.tirx.PrimFunc, *arrays: np.ndarray) -> np.ndarray:
    """Build for this CPU and run; the last array is the output, poisoned with NaN first."""
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target_for("cpu"))
    dev = tvm.cpu()
    out = np.full_like(arrays[-1], np.nan)
    tensors = [tvm.runtime.tensor(a, dev) for a in (*arrays[:-1], out)]
    lib["main"](*tensors)
    return tensors[-1].numpy()


def abs_gemv(t: T, data: np.ndarray, ids: np.ndarray, x: np.ndarray) -> np.ndarray:
    """|W[ids[s]]| . |x(s)|: the scale of an fp32 dot product's rounding error."""
    rows, k = data.shape[1], x.shape[-1]
    xs = x if x.ndim == 2 else np.broadcast_to(x, (len(ids), k))
    w = [np.abs(dequantize_rows(t, data[e], k)).astype(np.float64) for e in ids]
    return np.stack([we @ np.abs(xi) for we, xi in zip(w, xs)])


@pytest.mark.parametrize(
    "type_gate, type_up",
    [(T.Q4_K, T.Q4_K), (T.Q5_K, T.Q8_0), (T.Q6_K, T.BF16)],
    ids=lambda t: t.name,
)
def test_gate_up_silu_matches_numpy(rng: np.random.Generator, type_gate: T, type_up: T) -> None:
    gate_data = random_weights(type_gate, (N_EXPERTS, N_FFN, HIDDEN), rng)
    up_data = random_weights(type_up, (N_EXPERTS, N_FFN, HIDDEN), rng)
    # Scaled so that gate spans SiLU's curved range (|gate| of a few units), not just ~0.
    x = (rng.standard_normal(HIDDEN) * 10).astype(np.float32)
    func = M.moe_gate_up_silu(type_gate, type_up, N_EXPERTS, len(IDS), N_FFN, HIDDEN)
    act = run_cpu(
        func, weight_view(type_gate, gate_data), weight_view(type_up, up_data), IDS, x,
        np.empty((len(IDS), N_FFN), np.float32),
    )
    ref = M.moe_gate_up_silu_reference(type_gate, gate_data, type_up, up_data, IDS_CLAMPED, x)
    gate = gemv_experts_reference(type_gate, gate_data, IDS_CLAMPED, x)
    up = gemv_experts_reference(type_up, up_data, IDS_CLAMPED, x)
    assert np.abs(gate).max() > 2, "the test should reach SiLU's nonlinear range"
    # d(silu(g) u) = silu'(g) u dg + silu(g) du with |silu'| < 1.1; plus exp's own rounding.
    with np.errstate(over="ignore"):  # silu(g << 0) = -0 through exp overflow
        magnitude = (
            1.1 * np.abs(up) * abs_gemv(type_gate, gate_data, IDS_CLAMPED, x)
            + np.abs(silu(gate)) * abs_gemv(type_up, up_data, IDS_CLAMPED, x)
            + np.abs(ref)
        )
    assert_gemv_close(act, ref, magnitude)


@pytest.mark.parametrize("t", [T.Q6_K, Q6_K_PLANAR, T.Q4_K, T.Q5_K, T.Q8_0], ids=lambda t: t.name)
def test_down_residual_matches_numpy(rng: np.random.Generator, t: T) -> None:
    data = random_weights(t, (N_EXPERTS, HIDDEN, N_FFN), rng)
    act = (rng.standard_normal((len(IDS), N_FFN)) * 3).astype(np.float32)
    weights = rng.dirichlet(np.ones(len(IDS))).astype(np.float32)
    h = rng.standard_normal(HIDDEN).astype(np.float32)
    func = M.moe_down_residual(t, N_EXPERTS, len(IDS), HIDDEN, N_FFN)
    h_out = run_cpu(func, weight_view(t, data), IDS, weights, act, h, np.empty(HIDDEN, np.float32))
    ref = M.moe_down_residual_reference(t, data, IDS_CLAMPED, weights, act, h)
    magnitude = np.abs(h) + weights.astype(np.float64) @ abs_gemv(t, data, IDS_CLAMPED, act)
    assert_gemv_close(h_out, ref, magnitude)


def test_gate_up_silu_routed_matches_numpy(rng: np.random.Generator) -> None:
    """router_topk and the FFN norm inside the kernel: the experts, in order, and weights of
    router_topk (experts 2 and 5 tie for the first slot: 2 gets it), act of the normed h."""
    n_used, eps = 3, 1e-6
    gate_data = random_weights(T.Q4_K, (N_EXPERTS, N_FFN, HIDDEN), rng)
    up_data = random_weights(T.Q8_0, (N_EXPERTS, N_FFN, HIDDEN), rng)
    logits = rng.standard_normal(N_EXPERTS).astype(np.float32)
    logits[2] = logits[5] = logits.max() + 1
    h = (rng.standard_normal(HIDDEN) * 10).astype(np.float32)
    norm_w = (1 + 0.2 * rng.standard_normal(HIDDEN)).astype(np.float32)
    func = M.moe_gate_up_silu_routed(T.Q4_K, T.Q8_0, N_EXPERTS, n_used, N_FFN, HIDDEN, eps)
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target_for("cpu"))
    outs = [tvm.runtime.tensor(a) for a in (np.full((n_used, N_FFN), np.nan, np.float32),
                                             np.full(n_used, -1, np.int32), np.full(n_used, np.nan, np.float32))]
    inputs = [weight_view(T.Q4_K, gate_data), weight_view(T.Q8_0, up_data), logits, h, norm_w]
    lib["main"](*(tvm.runtime.tensor(a) for a in inputs), *outs)
    act, ids, weights = (o.numpy() for o in outs)
    act_ref, ids_ref, weights_ref = M.moe_gate_up_silu_routed_reference(
        T.Q4_K, gate_data, T.Q8_0, up_data, logits, h, norm_w, n_used, eps)
    assert ids.tolist() == ids_ref.tolist() and ids[:2].tolist() == [2, 5]
    np.testing.assert_allclose(weights, weights_ref, rtol=1e-6)
    np.testing.assert_allclose(act, act_ref, rtol=1e-4, atol=1e-4 * np.abs(act_ref).max())


def test_down_reference_is_the_oracle_mix() -> None:
    """h + sum_j w_j down_j, the oracle's MoE block, from dequantized experts."""
    rng = np.random.default_rng(3)
    data = random_weights(T.Q8_0, (4, 64, 64), rng)
    ids = np.array([2, 0], np.int32)
    weights = np.array([0.75, 0.25], np.float32)
    act = rng.standard_normal((2, 64)).astype(np.float32)
    h = rng.standard_normal(64).astype(np.float32)
    w = quant.dequantize(T.Q8_0, data, (4, 64, 64))
    expected = h + 0.75 * (w[2] @ act[0]) + 0.25 * (w[0] @ act[1])
    got = M.moe_down_residual_reference(T.Q8_0, data, ids, weights, act, h)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_rows_that_do_not_divide_into_blocks_are_rejected() -> None:
    with pytest.raises(TensorShapeError, match="Q4_K"):
        M.moe_gate_up_silu(T.Q4_K, T.Q4_K, N_EXPERTS, 2, N_FFN, 320)
    with pytest.raises(TensorShapeError, match="Q6_K"):
        M.moe_down_residual(T.Q6_K, N_EXPERTS, 2, HIDDEN, 192)
