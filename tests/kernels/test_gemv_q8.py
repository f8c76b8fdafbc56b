"""The int8-activation path on the CPU (LLVM, dp4a lowered to integer arithmetic) against numpy."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from sparkinfer.errors import TensorShapeError, UnsupportedQuantTypeError
from sparkinfer.kernels import attention as A
from sparkinfer.kernels import gemv as G
from sparkinfer.kernels import gemv_q8 as Q
from sparkinfer.kernels import norm as N
from sparkinfer.kernels.testing import assert_gemv_close, assert_q8_1_close, random_weights
from tests.kernels.test_kernels_gemv import magnitude, run_cpu, run_cpu_outputs

Q8_TYPES = [T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0]
# Every weight format the int8 GEMVs take: those types and the upload's planar Q6_K.
Q8_FORMATS = [*Q8_TYPES, G.Q6_K_PLANAR]
# The int8 GEMVs' two forms of their sums (kernels.gemv_q8.INT8_DOTS): the same oracle.
FORMS = ["sub_block", "lanes"]


def int8_factory(name: str, form: str):  # noqa: ANN201
    """Factory `name` of kernels.gemv_q8, or its lane form's."""
    return getattr(Q, f"{name}_lanes" if form == "lanes" else name)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261204)


def quantize_cpu(x: np.ndarray) -> list[np.ndarray]:
    k = x.shape[-1]
    rows = x.shape[0] if x.ndim == 2 else 0
    lead = x.shape[:-1]
    outs = [np.empty((*lead, k // 4), np.int32), np.empty((*lead, k // 32), np.float32),
            np.empty((*lead, k // 32), np.float32)]
    return run_cpu_outputs(Q.quantize_q8_1(k, rows), [x], outs)


@pytest.mark.parametrize("shape", [(256,), (3, 128)], ids=["vector", "rows"])
def test_quantize_q8_1_matches_numpy(rng: np.random.Generator, shape: tuple[int, ...]) -> None:
    x = rng.standard_normal(shape, dtype=np.float32)
    x[..., :32] = 0.0  # an all-zero block: d = 0, q = 0, no division by zero
    x[..., 32] = 127.0  # the next block's max: d = 1, so 2.5 and -0.5 are exact halves
    x[..., 33], x[..., 34] = 2.5, -0.5
    xq, xd, xs = quantize_cpu(x)
    ref_q, ref_d, ref_s = Q.quantize_q8_1_reference(x)
    np.testing.assert_array_equal(xq, ref_q)
    np.testing.assert_allclose(xd, ref_d, rtol=1e-7)
    np.testing.assert_allclose(xs, ref_s, rtol=1e-6, atol=1e-6)
    q = xq.view(np.int8).reshape(*shape)
    assert np.all(q[..., 33] == 3) and np.all(q[..., 34] == -1)
    # x̂ is within half a step of x everywhere
    step = np.repeat(xd, 32, axis=-1)
    assert np.all(np.abs(Q.dequantize_q8_1(xq, xd) - x) <= 0.5 * step + 1e-6)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("t", Q8_FORMATS, ids=lambda t: t.name)
def test_gemv_q8_matches_numpy(rng: np.random.Generator, t: T, form: str) -> None:
    n, k = 37, 512
    data = random_weights(t, (n, k), rng)
    xq, xd, xs = Q.quantize_q8_1_reference(rng.standard_normal(k, dtype=np.float32))
    y = run_cpu(int8_factory("gemv_q8", form)(t, n, k), G.weight_view(t, data), xq, xd, xs, np.empty(n, np.float32))
    x_hat = Q.dequantize_q8_1(xq, xd)
    assert_gemv_close(y, Q.gemv_q8_reference(t, data, xq, xd), magnitude(t, data, x_hat))


def test_gemv_q8_rejects_other_types_and_lengths() -> None:
    with pytest.raises(UnsupportedQuantTypeError, match="no int8-activation GEMV for quant type F16"):
        Q.gemv_q8(T.F16, 8, 256)
    with pytest.raises(TensorShapeError, match="multiple of 32, got 48"):
        Q.quantize_q8_1(48)


def test_add_rms_norm_q8_1_quantizes_its_own_output(rng: np.random.Generator) -> None:
    h, eps = 256, 1e-6
    x, r, w = (rng.standard_normal(h, dtype=np.float32) for _ in range(3))
    x[:32], r[:32] = 1.0, -1.0  # a block whose sum is all zero: d = 0, q = 0
    outs = [np.empty(h, np.float32), np.empty(h, np.float32), np.empty(h // 4, np.int32),
            np.empty(h // 32, np.float32), np.empty(h // 32, np.float32)]
    total, y, xq, xd, xs = run_cpu_outputs(Q.add_rms_norm_q8_1(h, eps), [x, r, w], outs)
    ref_total, ref_y, *_ = Q.add_rms_norm_q8_1_reference(x, r, w, eps)
    np.testing.assert_array_equal(total, ref_total)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-6)
    # the quantizer saw y bit for bit: its words, scales and sums are y's own
    own_q, own_d, own_s = Q.quantize_q8_1_reference(y)
    np.testing.assert_array_equal(xq, own_q)
    np.testing.assert_array_equal(xd, own_d)
    np.testing.assert_allclose(xs, own_s, rtol=1e-6, atol=1e-6)
    assert not xq[:8].any() and xd[0] == 0.0


def test_add_rms_norm_q8_1_rejects_a_partial_block() -> None:
    with pytest.raises(TensorShapeError, match="add_rms_norm_q8_1 needs a length that is a multiple of 32, got 48"):
        Q.add_rms_norm_q8_1(48, 1e-6)


def test_rms_norm_q8_1_quantizes_the_norm(rng: np.random.Generator) -> None:
    """The attention input's int8 blocks are those of `rms_norm`'s y (within half a step; y only
    as close to the oracle's as the float sums' order allows)."""
    h, eps = 256, 1e-6
    x, w = (rng.standard_normal(h, dtype=np.float32) for _ in range(2))
    x[64:96] = 0.0  # an all-zero block: d = 0, q = 0
    outs = [np.empty(h // 4, np.int32), np.empty(h // 32, np.float32), np.empty(h // 32, np.float32)]
    xq, xd, xs = run_cpu_outputs(Q.rms_norm_q8_1(h, eps), [x, w], outs)
    y = N.rms_norm_reference(x, w, eps)
    assert_q8_1_close(xq, xd, xs, y, np.abs(y))
    assert not xq[16:24].any() and xd[2] == 0.0


def test_attention_combine_q8_1_quantizes_the_combine(rng: np.random.Generator) -> None:
    nh, s, d = 4, 5, 64
    o_part = rng.standard_normal((nh, s, d), dtype=np.float32)
    lse = rng.standard_normal((nh, s), dtype=np.float32)
    lse[:, 3:] = -np.inf  # empty splits weigh nothing
    outs = [np.empty(nh * d // 4, np.int32), np.empty(nh * d // 32, np.float32), np.empty(nh * d // 32, np.float32)]
    xq, xd, xs = run_cpu_outputs(Q.attention_combine_q8_1(nh, s, d), [o_part, lse], outs)
    out = A.attention_combine_reference(o_part, lse)
    assert_q8_1_close(xq, xd, xs, out, np.abs(o_part).max(axis=1).reshape(-1))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("n_v", [48, 0], ids=["qkv", "qk"])
@pytest.mark.parametrize("t", [T.Q4_K, T.Q6_K, G.Q6_K_PLANAR], ids=lambda t: t.name)
def test_gemv_qkv_q8_matches_numpy(rng: np.random.Generator, t: T, n_v: int, form: str) -> None:
    ns, k = [64, 16, n_v], 512
    datas = [random_weights(t, (n, k), rng) for n in ns if n]
    xq, xd, xs = Q.quantize_q8_1_reference(rng.standard_normal(k, dtype=np.float32))
    outs = run_cpu_outputs(int8_factory("gemv_qkv_q8", form)(t, *ns, k), [*(G.weight_view(t, d) for d in datas), xq, xd, xs],
                           [np.empty(n, np.float32) for n in ns if n])
    x_hat = Q.dequantize_q8_1(xq, xd)
    for y, ref, data in zip(outs, Q.gemv_qkv_q8_reference(t, datas, xq, xd), datas, strict=True):
        assert_gemv_close(y, ref, magnitude(t, data, x_hat))


def test_int8_projection_kernels_reject_partial_blocks() -> None:
    with pytest.raises(TensorShapeError, match="rms_norm_q8_1 needs a length that is a multiple of 32, got 80"):
        Q.rms_norm_q8_1(80, 1e-6)
    with pytest.raises(TensorShapeError, match="needs a head dim that is a multiple of 32, got 48"):
        Q.attention_combine_q8_1(4, 2, 48)
    with pytest.raises(TensorShapeError, match="gemv_qkv_q8 needs a length that is a multiple of 32, got 48"):
        Q.gemv_qkv_q8(T.Q8_0, 8, 8, 8, 48)


def test_code_words_show_which_bytes_are_below_128() -> None:
    """The LLVM lowering of dp4a gives vpdpbusd a word whose bytes are all below 128 (Q4_K's and
    Q5_K's codes) as its unsigned operand directly; Q6_K's and Q8_0's signed codes are not such."""
    from tvm import te, tirx

    row = te.placeholder((64,), "uint32", name="row")
    c, p, g = (tirx.Var(name, "int32") for name in "cpg")
    bits = {t: Q._bits_that_may_be_set(Q._CODE_WORDS[t](lambda i: row[i], c, p, g)) for t in Q8_TYPES}
    assert bits[T.Q4_K] == 0x0F0F0F0F
    assert bits[T.Q5_K] == 0x1F1F1F1F
    assert bits[T.Q6_K] & 0x80808080 and bits[T.Q8_0] & 0x80808080

