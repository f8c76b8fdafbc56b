"""The int8 kernels' CPU rules (schedule/gemv_q8.py and moe_q8.py on schedule/cpu.py's layouts):
each scheduled kernel, in both forms of its sums (kernels.gemv_q8.INT8_DOTS), against its numpy
oracle at the default knobs and at other points of its space."""

import numpy as np
import pytest
import tvm
from gguf import GGMLQuantizationType as T

from sparkinfer.compiler.targets import target_for
from sparkinfer.kernels import gemv as G
from sparkinfer.kernels import gemv_q8 as Q
from sparkinfer.kernels import moe_q8 as M
from sparkinfer.kernels.router import router_topk_reference
from sparkinfer.kernels.testing import assert_gemv_close, random_weights
from sparkinfer.schedule.cpu import CpuDotKnobs, CpuLaneKnobs
from sparkinfer.schedule.space import Knobs
from sparkinfer.schedule.space import check_knobs, kernel_use, rule_for, schedule_kernel
from tests.schedule.test_cpu import CPU, run

# (parallel, rows_per_task, vector, unroll) besides the default; vector 2 divides every
# format's words per sub-block (Q6_K: 4, the others 8).
DOT_KNOBS = [None, CpuDotKnobs(0, 64, 1, 16), CpuDotKnobs(1, 8, 2, 1024)]
# (parallel, rows_per_task, unroll) of the lane form (the `_lanes` factories), the same points
LANE_KNOBS = [None, CpuLaneKnobs(0, 64, 16), CpuLaneKnobs(1, 8, 1024)]
IDS = ["default", "serial", "parallel"]
# (form, knobs): each form at its points
FORM_KNOBS = pytest.mark.parametrize(
    "form, knobs", [*(("sub_block", k) for k in DOT_KNOBS), *(("lanes", k) for k in LANE_KNOBS)],
    ids=[*(f"sub_block-{i}" for i in IDS), *(f"lanes-{i}" for i in IDS)])


def factory(module, name: str, form: str):  # noqa: ANN001, ANN201
    """Factory `name` of `module` in `form` (the lane form's is `name`_lanes)."""
    return getattr(module, f"{name}_lanes" if form == "lanes" else name)


def _abs_gemv(t: T, data: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.abs(G.dequantize_rows(t, data, x.shape[-1])).astype(np.float64) @ np.abs(x)


@FORM_KNOBS
@pytest.mark.parametrize("t", [T.Q4_K, T.Q5_K, T.Q6_K, G.Q6_K_PLANAR, T.Q8_0], ids=lambda t: t.name)
def test_gemv_q8(t: T, form: str, knobs: Knobs | None) -> None:
    rng = np.random.default_rng(1)
    n, k = 100, 512
    data = random_weights(t, (n, k), rng)
    xq, xd, xs = Q.quantize_q8_1_reference(rng.standard_normal(k, dtype=np.float32))
    gemv = factory(Q, "gemv_q8", form)
    if knobs is not None:
        use = kernel_use("gemv_q8", gemv.__name__, t, n, k)
        check_knobs(rule_for(use, CPU), use, knobs, CPU)
    (y,) = run("gemv_q8", gemv, (t, n, k), knobs, [G.weight_view(t, data), xq, xd, xs],
               [np.empty(n, np.float32)])
    assert_gemv_close(y, Q.gemv_q8_reference(t, data, xq, xd), _abs_gemv(t, data, Q.dequantize_q8_1(xq, xd)))


@FORM_KNOBS
def test_moe_q8_and_quantize(form: str, knobs: Knobs | None) -> None:
    rng = np.random.default_rng(2)
    n_experts, n_used, hidden, inter = 6, 2, 256, 256
    x = rng.standard_normal(hidden, dtype=np.float32)
    xq, xd, xs = run("gemv_q8", Q.quantize_q8_1, (hidden, 0), None, [x],
                     [np.empty(hidden // 4, np.int32), np.empty(hidden // 32, np.float32),
                      np.empty(hidden // 32, np.float32)])
    np.testing.assert_array_equal(xq, Q.quantize_q8_1_reference(x)[0])
    gate, up = random_weights(T.Q4_K, (n_experts, inter, hidden), rng), random_weights(T.Q6_K, (n_experts, inter, hidden), rng)
    ids = np.array([4, 1], np.int32)
    aq, ad, as_ = run("moe_q8", factory(M, "moe_gate_up_silu_q8", form), (T.Q4_K, T.Q6_K, n_experts, n_used, inter, hidden), knobs,
                      [G.weight_view(T.Q4_K, gate), G.weight_view(T.Q6_K, up), ids, xq, xd, xs],
                      [np.empty((n_used, inter // 4), np.int32), np.empty((n_used, inter // 32), np.float32),
                       np.empty((n_used, inter // 32), np.float32)])
    ref_q, ref_d, _ = M.moe_gate_up_silu_q8_reference(T.Q4_K, gate, T.Q6_K, up, ids, xq, xd)
    # the kernel's act and the oracle's differ by float rounding: a value may round the other way
    dq = np.abs(aq.view(np.int8).astype(np.int32) - ref_q.view(np.int8).astype(np.int32))
    assert dq.max() <= 1 and np.count_nonzero(dq) <= max(1, dq.size // 100)
    np.testing.assert_allclose(ad, ref_d, rtol=1e-4)
    down = random_weights(T.Q6_K, (n_experts, hidden, inter), rng)
    weights = np.array([0.7, 0.3], np.float32)
    h = rng.standard_normal(hidden, dtype=np.float32)
    (h_out,) = run("moe_q8", factory(M, "moe_down_residual_q8", form), (T.Q6_K, n_experts, n_used, hidden, inter), knobs,
                   [G.weight_view(T.Q6_K, down), ids, weights, aq, ad, as_, h], [np.empty(hidden, np.float32)])
    a_hat = Q.dequantize_q8_1(aq, ad)
    mag = np.abs(h) + weights.astype(np.float64) @ np.stack([_abs_gemv(T.Q6_K, down[e], a) for e, a in zip(ids, a_hat)])
    assert_gemv_close(h_out, M.moe_down_residual_q8_reference(T.Q6_K, down, ids, weights, aq, ad, h), mag)


@FORM_KNOBS
def test_routed_moe_q8_gate_up(form: str, knobs: Knobs | None) -> None:
    """The gate/up kernel with the top-k inside (router_merge="gate_up"): the plain kernel's
    blocks for router_topk's experts, which it writes out with their weights."""
    rng = np.random.default_rng(4)
    n_experts, n_used, hidden, inter = 6, 2, 256, 256
    xq, xd, xs = Q.quantize_q8_1_reference(rng.standard_normal(hidden, dtype=np.float32))
    gate, up = random_weights(T.Q4_K, (n_experts, inter, hidden), rng), random_weights(T.Q6_K, (n_experts, inter, hidden), rng)
    logits = rng.standard_normal(n_experts, dtype=np.float32)
    args = (T.Q4_K, T.Q6_K, n_experts, n_used, inter, hidden)
    if knobs is not None:
        use = kernel_use("moe_q8", factory(M, "moe_gate_up_silu_q8_routed", form).__name__, *args)
        check_knobs(rule_for(use, CPU), use, knobs, CPU)
    blocks = [np.empty((n_used, inter // 4), np.int32), np.empty((n_used, inter // 32), np.float32),
              np.empty((n_used, inter // 32), np.float32)]
    *act, ids, weights = run("moe_q8", factory(M, "moe_gate_up_silu_q8_routed", form), args, knobs,
                             [G.weight_view(T.Q4_K, gate), G.weight_view(T.Q6_K, up), logits, xq, xd, xs],
                             [*blocks, np.empty(n_used, np.int32), np.empty(n_used, np.float32)])
    want_ids, want_weights = router_topk_reference(logits, n_used)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(weights, want_weights, rtol=1e-6)
    plain = run("moe_q8", factory(M, "moe_gate_up_silu_q8", form), args, knobs,
                [G.weight_view(T.Q4_K, gate), G.weight_view(T.Q6_K, up), want_ids, xq, xd, xs], blocks)
    for got, want in zip(act, plain, strict=True):
        np.testing.assert_array_equal(got, want)


@FORM_KNOBS
@pytest.mark.parametrize("t", [T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_gemv_qkv_q8(t: T, form: str, knobs: Knobs | None) -> None:
    """The int8 Q/K/V kernel (the attention input as rms_norm_q8_1 writes it, as the step runs)."""
    rng = np.random.default_rng(3)
    ns, k, eps = (64, 16, 16), 256, 1e-6
    x, w = (rng.standard_normal(k, dtype=np.float32) for _ in range(2))
    xq, xd, xs = run("gemv_q8", Q.rms_norm_q8_1, (k, eps), None, [x, w],
                     [np.empty(k // 4, np.int32), np.empty(k // 32, np.float32), np.empty(k // 32, np.float32)])
    datas = [random_weights(t, (n, k), rng) for n in ns]
    if knobs is not None:
        use = kernel_use("gemv_q8", factory(Q, "gemv_qkv_q8", form).__name__, t, *ns, k)
        check_knobs(rule_for(use, CPU), use, knobs, CPU)
    outs = run("gemv_q8", factory(Q, "gemv_qkv_q8", form), (t, *ns, k), knobs, [*(G.weight_view(t, d) for d in datas), xq, xd, xs],
               [np.empty(n, np.float32) for n in ns])
    x_hat = Q.dequantize_q8_1(xq, xd)
    for y, ref, data in zip(outs, Q.gemv_qkv_q8_reference(t, datas, xq, xd), datas, strict=True):
        assert_gemv_close(y, ref, _abs_gemv(t, data, x_hat))


def _cpu_assembly(t: T, knobs: CpuDotKnobs | None) -> str:
    use = kernel_use("gemv_q8", "gemv_q8", t, 64, 256)
    func = schedule_kernel(Q.gemv_q8(t, 64, 256), use, CPU, knobs)
    return tvm.compile(tvm.IRModule({"main": func}), target=target_for("cpu")).mod.inspect_source("asm")


@pytest.mark.skipif(Q._vnni_intrinsic(8) is None, reason="this CPU has no AVX512-VNNI / AVX-VNNI")
def test_vector_dots_use_vnni() -> None:
    """The word lanes' dp4a (8 lanes: Q4_K's default) become vpdpbusd where the CPU has it;
    test_gemv_q8 checks the values."""
    assert "vpdpbusd" in _cpu_assembly(T.Q4_K, CpuDotKnobs(1, 8, 8, 256))


@pytest.mark.parametrize("t", [T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_vector_dots_without_vnni(monkeypatch: pytest.MonkeyPatch, t: T) -> None:
    """A CPU without VNNI: the vectorized dp4a lowers to byte arithmetic on the vector, the same values."""
    monkeypatch.setattr(Q, "_vnni_intrinsic", lambda lanes: None)
    knobs = CpuDotKnobs(1, 8, 4, 256)  # 4 lanes: Q6_K's widest
    assert "vpdpbusd" not in _cpu_assembly(t, knobs)
    rng = np.random.default_rng(4)
    n, k = 64, 256
    data = random_weights(t, (n, k), rng)
    xq, xd, xs = Q.quantize_q8_1_reference(rng.standard_normal(k, dtype=np.float32))
    (y,) = run("gemv_q8", Q.gemv_q8, (t, n, k), knobs, [G.weight_view(t, data), xq, xd, xs], [np.empty(n, np.float32)])
    assert_gemv_close(y, Q.gemv_q8_reference(t, data, xq, xd), _abs_gemv(t, data, Q.dequantize_q8_1(xq, xd)))


@pytest.mark.skipif(Q._vnni_intrinsic(8) is None, reason="this CPU has no AVX512-VNNI / AVX-VNNI")
@pytest.mark.parametrize("t, per_block", [(T.Q4_K, 1), (T.Q6_K, 2)], ids=["Q4_K", "Q6_K"])
def test_lane_form_takes_a_vpdpbusd_a_block(t: T, per_block: int) -> None:
    """The lane form, its chunk loop unrolled: a row of 256 weights is 8 blocks of 32, each one
    vpdpbusd of 8 lanes, two where the codes are signed (Q6_K: the 0x80 offset and its
    correction), none summing lanes between blocks (test_gemv_q8 checks the values)."""
    use = kernel_use("gemv_q8", "gemv_q8_lanes", t, 64, 256)
    func = schedule_kernel(Q.gemv_q8_lanes(t, 64, 256), use, CPU, CpuLaneKnobs(0, 64, 1024))
    asm = tvm.compile(tvm.IRModule({"main": func}), target=target_for("cpu")).mod.inspect_source("asm")
    assert asm.count("vpdpbusd") == 8 * per_block

