"""The fused MoE compute on int8 activations, built for LLVM, against the numpy oracle."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from sparkinfer.errors import UnsupportedQuantTypeError
from sparkinfer.kernels import moe_q8 as M
from sparkinfer.kernels.gemv import Q6_K_PLANAR, gemv_experts_reference, weight_view
from sparkinfer.kernels.gemv_q8 import dequantize_q8_1, quantize_q8_1_reference
from sparkinfer.kernels import gemv_q8 as Q
from sparkinfer.kernels.moe import moe_gate_up_silu_reference
from sparkinfer.kernels.testing import assert_gemv_close, assert_q8_1_close, random_weights
from sparkinfer.reference.qwen3moe import silu
from tests.kernels.test_gemv_q8 import FORMS
from tests.kernels.test_kernels_gemv import run_cpu_outputs
from tests.kernels.test_moe import HIDDEN, IDS, IDS_CLAMPED, N_EXPERTS, N_FFN, abs_gemv, run_cpu


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261204)


def moe_factory(name: str, form: str):  # noqa: ANN201
    """Factory `name` of kernels.moe_q8, or its lane form's."""
    return getattr(M, f"{name}_lanes" if form == "lanes" else name)


def _act_and_bound(type_gate: T, gate_data: np.ndarray, type_up: T, up_data: np.ndarray, ids: np.ndarray,
                   xq: np.ndarray, xd: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(act, the bound of its rounding, gate) of the experts ids on x̂ = dequantize(xq, xd):
    d(silu(g) u) = silu'(g) u dg + silu(g) du, |silu'| < 1.1 (tests/kernels/test_moe.py)."""
    x = dequantize_q8_1(xq, xd)
    ref = moe_gate_up_silu_reference(type_gate, gate_data, type_up, up_data, ids, x)
    gate = gemv_experts_reference(type_gate, gate_data, ids, x)
    up = gemv_experts_reference(type_up, up_data, ids, x)
    with np.errstate(over="ignore"):
        magnitude = (1.1 * np.abs(up) * abs_gemv(type_gate, gate_data, ids, x)
                     + np.abs(silu(gate)) * abs_gemv(type_up, up_data, ids, x) + np.abs(ref))
    return ref, magnitude, gate


@pytest.mark.parametrize("type_gate, type_up", [(T.Q4_K, T.Q4_K), (T.Q5_K, T.Q8_0), (T.Q6_K, T.Q4_K)],
                         ids=lambda t: t.name)
@pytest.mark.parametrize("form", FORMS)
def test_gate_up_silu_q8_matches_numpy(rng: np.random.Generator, type_gate: T, type_up: T, form: str) -> None:
    gate_data = random_weights(type_gate, (N_EXPERTS, N_FFN, HIDDEN), rng)
    up_data = random_weights(type_up, (N_EXPERTS, N_FFN, HIDDEN), rng)
    xq, xd, xs = quantize_q8_1_reference((rng.standard_normal(HIDDEN) * 10).astype(np.float32))
    func = moe_factory("moe_gate_up_silu_q8", form)(type_gate, type_up, N_EXPERTS, len(IDS), N_FFN, HIDDEN)
    aq, ad, as_ = run_cpu_outputs(func, [weight_view(type_gate, gate_data), weight_view(type_up, up_data), IDS,
                                         xq, xd, xs], [np.empty((len(IDS), N_FFN // 4), np.int32),
                                                       np.empty((len(IDS), N_FFN // 32), np.float32),
                                                       np.empty((len(IDS), N_FFN // 32), np.float32)])
    ref, magnitude, gate = _act_and_bound(type_gate, gate_data, type_up, up_data, IDS_CLAMPED, xq, xd)
    assert np.abs(gate).max() > 2, "the test should reach SiLU's nonlinear range"
    assert_q8_1_close(aq, ad, as_, ref, magnitude)
    # and its reference is the same quantizer on the same oracle
    ref_q, ref_d, _ = M.moe_gate_up_silu_q8_reference(type_gate, gate_data, type_up, up_data, IDS_CLAMPED, xq, xd)
    assert_q8_1_close(ref_q, ref_d, Q.quantize_q8_1_reference(ref.astype(np.float32))[2], ref, magnitude)


@pytest.mark.parametrize("form", FORMS)
def test_routed_gate_up_silu_q8_picks_router_topks_experts(rng: np.random.Generator, form: str) -> None:
    """The top-k prologue's ids and weights are router_topk's, tied and one-ulp-apart logits at
    the cut included; act's blocks those of the experts it picked."""
    n_used = 3
    gate_data = random_weights(T.Q4_K, (N_EXPERTS, N_FFN, HIDDEN), rng)
    up_data = random_weights(T.Q6_K, (N_EXPERTS, N_FFN, HIDDEN), rng)
    xq, xd, xs = quantize_q8_1_reference((rng.standard_normal(HIDDEN) * 10).astype(np.float32))
    logits = rng.standard_normal(N_EXPERTS).astype(np.float32)
    order = np.argsort(-logits)
    logits[order[3]] = logits[order[2]]  # a tie at the cut: the lower id wins
    logits[order[1]] = np.nextafter(logits[order[0]], np.float32(-np.inf))
    func = moe_factory("moe_gate_up_silu_q8_routed", form)(T.Q4_K, T.Q6_K, N_EXPERTS, n_used, N_FFN, HIDDEN)
    aq, ad, as_, ids, weights = run_cpu_outputs(
        func, [weight_view(T.Q4_K, gate_data), weight_view(T.Q6_K, up_data), logits, xq, xd, xs],
        [np.empty((n_used, N_FFN // 4), np.int32), np.empty((n_used, N_FFN // 32), np.float32),
         np.empty((n_used, N_FFN // 32), np.float32), np.empty(n_used, np.int32), np.empty(n_used, np.float32)])
    ref_q, ref_d, ref_s, ref_ids, ref_weights = M.moe_gate_up_silu_q8_routed_reference(
        T.Q4_K, gate_data, T.Q6_K, up_data, logits, xq, xd, n_used)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(weights, ref_weights, rtol=1e-6)
    # the same int8 blocks as the plain kernel given those ids
    plain = run_cpu_outputs(moe_factory("moe_gate_up_silu_q8", form)(T.Q4_K, T.Q6_K, N_EXPERTS, n_used, N_FFN, HIDDEN),
                            [weight_view(T.Q4_K, gate_data), weight_view(T.Q6_K, up_data), ref_ids, xq, xd, xs],
                            [np.empty_like(aq), np.empty_like(ad), np.empty_like(as_)])
    for got, want in zip((aq, ad, as_), plain, strict=True):
        np.testing.assert_array_equal(got, want)
    ref, magnitude, _ = _act_and_bound(T.Q4_K, gate_data, T.Q6_K, up_data, ref_ids, xq, xd)
    assert_q8_1_close(aq, ad, as_, ref, magnitude)
    assert_q8_1_close(ref_q, ref_d, ref_s, ref, magnitude)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("t", [T.Q6_K, Q6_K_PLANAR, T.Q4_K, T.Q5_K, T.Q8_0], ids=lambda t: t.name)
def test_down_residual_q8_matches_numpy(rng: np.random.Generator, t: T, form: str) -> None:
    data = random_weights(t, (N_EXPERTS, HIDDEN, N_FFN), rng)
    aq, ad, as_ = quantize_q8_1_reference((rng.standard_normal((len(IDS), N_FFN)) * 3).astype(np.float32))
    weights = rng.dirichlet(np.ones(len(IDS))).astype(np.float32)
    h = rng.standard_normal(HIDDEN).astype(np.float32)
    func = moe_factory("moe_down_residual_q8", form)(t, N_EXPERTS, len(IDS), HIDDEN, N_FFN)
    h_out = run_cpu(func, weight_view(t, data), IDS, weights, aq, ad, as_, h,
                    np.empty(HIDDEN, np.float32))
    ref = M.moe_down_residual_q8_reference(t, data, IDS_CLAMPED, weights, aq, ad, h)
    act = dequantize_q8_1(aq, ad)
    magnitude = np.abs(h) + weights.astype(np.float64) @ abs_gemv(t, data, IDS_CLAMPED, act)
    assert_gemv_close(h_out, ref, magnitude)


def test_routed_gate_up_silu_q8_rejects_more_experts_used_than_there_are() -> None:
    with pytest.raises(ValueError, match=f"need 0 < experts used <= experts, got {N_EXPERTS + 1} of {N_EXPERTS}"):
        M.moe_gate_up_silu_q8_routed(T.Q4_K, T.Q4_K, N_EXPERTS, N_EXPERTS + 1, N_FFN, HIDDEN)


def test_prefetching_gate_up_takes_the_down_experts_and_names_them() -> None:
    """Its parameters are the routed kernel's with the down stack third, and its attribute names
    that stack, the ids and one expert's bytes (a 256 x 256 Q4_K expert: 256 rows of 144 bytes)."""
    routed = M.moe_gate_up_silu_q8_routed(T.Q4_K, T.Q4_K, N_EXPERTS, 2, N_FFN, HIDDEN)
    prefetching = M.moe_gate_up_silu_q8_routed_prefetch(T.Q4_K, T.Q4_K, N_EXPERTS, 2, N_FFN, HIDDEN, T.Q4_K)
    names = [p.name for p in prefetching.params]
    assert names == [*(p.name for p in routed.params[:2]), "Wd", *(p.name for p in routed.params[2:])]
    assert [int(d) for d in prefetching.params[2].shape] == [N_EXPERTS, HIDDEN, N_FFN // 256 * 144 // 4]
    spec = prefetching.attrs[M.PREFETCH_EXPERTS_ATTR]
    assert (str(spec["weights"]), str(spec["ids"]), str(spec["after"])) == ("Wd", "ids", "weights")
    assert int(spec["expert_bytes"]) == HIDDEN * N_FFN // 256 * 144


def test_prefetching_gate_up_refuses_experts_an_l2_prefetch_cannot_start_at() -> None:
    """A Q8_0 down expert of 1 row of 32 weights is 34 bytes: the second one starts off the
    16-byte grid that cp.async.bulk needs."""
    with pytest.raises(ValueError, match="an L2 prefetch starts at a multiple of 16 bytes: one Q8_0 down expert "
                                         "of 1x32 is 34 bytes"):
        M.moe_gate_up_silu_q8_routed_prefetch(T.Q8_0, T.Q8_0, 4, 2, 32, 1, T.Q8_0)


def test_moe_q8_rejects_float_types() -> None:
    with pytest.raises(UnsupportedQuantTypeError, match="no int8-activation GEMV for quant type BF16"):
        M.moe_gate_up_silu_q8(T.Q4_K, T.BF16, N_EXPERTS, 2, N_FFN, HIDDEN)
