"""The unscheduled GEMV compute, built for LLVM, against the numpy oracle on random blocks."""

import numpy as np
import pytest
import tvm
from gguf import GGMLQuantizationType as T

from sparkinfer.compiler.targets import target_for
from sparkinfer.errors import TensorShapeError, UnsupportedQuantTypeError
from sparkinfer.kernels import gemv as G
from sparkinfer.kernels import norm as N
from sparkinfer.kernels.testing import assert_gemv_close, random_weights

ALL_TYPES = [T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0, T.F16, T.BF16, T.F32]
# Every weight format the GEMV takes: the ggml types and the upload's planar Q6_K.
ALL_FORMATS = [*ALL_TYPES, G.Q6_K_PLANAR]


def format_id(t: int) -> str:
    return G.gemv_format(t).name
EPS = 1e-6


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261127)


def run_cpu(func: tvm.tirx.PrimFunc, *arrays: np.ndarray) -> np.ndarray:
    """Build for this CPU and run; the last array is the output, poisoned with NaN first so
    that an element the kernel never writes fails the comparison."""
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target_for("cpu"))
    dev = tvm.cpu()
    out = np.full_like(arrays[-1], np.nan)
    tensors = [tvm.runtime.tensor(a, dev) for a in (*arrays[:-1], out)]
    lib["main"](*tensors)
    return tensors[-1].numpy()


def magnitude(t: int, data: np.ndarray, x: np.ndarray) -> np.ndarray:
    """|W| . |x| per output, the scale of the rounding error of an fp32 dot product."""
    return np.abs(G.dequantize_rows(t, data, x.shape[-1])).astype(np.float64) @ np.abs(x)


@pytest.mark.parametrize("t", ALL_FORMATS, ids=format_id)
def test_gemv_matches_numpy(rng: np.random.Generator, t: T) -> None:
    # Two K-quant super-blocks per row, and a row count no schedule tile divides.
    n, k = 37, 512
    data = random_weights(t, (n, k), rng)
    x = rng.standard_normal(k, dtype=np.float32)
    y = run_cpu(G.gemv(t, n, k), G.weight_view(t, data), x, np.empty(n, np.float32))
    assert_gemv_close(y, G.gemv_reference(t, data, x), magnitude(t, data, x))


def run_cpu_outputs(func: tvm.tirx.PrimFunc, inputs: list[np.ndarray], outputs: list[np.ndarray]) -> list[np.ndarray]:
    """run_cpu for several outputs, each poisoned: NaN, or for integers their most negative value."""
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target_for("cpu"))
    dev = tvm.cpu()
    outs = [tvm.runtime.tensor(np.full_like(o, np.nan if np.issubdtype(o.dtype, np.floating) else np.iinfo(o.dtype).min),
                               dev) for o in outputs]
    lib["main"](*[tvm.runtime.tensor(a, dev) for a in inputs], *outs)
    return [o.numpy() for o in outs]


@pytest.mark.parametrize("n_v", [24, 0], ids=["qkv", "qk"])
@pytest.mark.parametrize("t", [T.Q4_K, T.Q6_K, G.Q6_K_PLANAR, T.Q8_0, T.F16], ids=format_id)
def test_gemv_qkv_matches_numpy(rng: np.random.Generator, t: T, n_v: int) -> None:
    # Row counts no schedule tile divides, so tiles straddle the Q/K and K/V boundaries.
    k, ns = 512, [37, 19, n_v]
    datas = [random_weights(t, (n, k), rng) for n in ns if n]
    x = rng.standard_normal(k, dtype=np.float32)
    func = G.gemv_qkv(t, *ns, k)
    got = run_cpu_outputs(func, [G.weight_view(t, d) for d in datas] + [x],
                          [np.empty(d.shape[0], np.float32) for d in datas])
    want = G.gemv_qkv_reference(t, datas[0], datas[1], datas[2] if n_v else None, x)
    assert len(got) == len(want) == len(datas)
    for y, ref, data in zip(got, want, datas):
        assert_gemv_close(y, ref, magnitude(t, data, x))


def test_gemv_qkv_params_are_the_weights_then_x_then_the_outputs() -> None:
    func = G.gemv_qkv(T.Q4_K, 64, 32, 32, 256)
    assert (
        '(Wq: T.Buffer((64, 36), "uint32"), Wk: T.Buffer((32, 36), "uint32"), '
        'Wv: T.Buffer((32, 36), "uint32"), x: T.Buffer((256,), "float32"), '
        'q: T.Buffer((64,), "float32"), k: T.Buffer((32,), "float32"), v: T.Buffer((32,), "float32"))'
    ) in func.script()
    assert len(G.gemv_qkv(T.Q4_K, 64, 32, 0, 256).params) == 5


def normed_input(rng: np.random.Generator, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """h (a residual stream of some size), norm_w (near 1) and x = rmsnorm(h) * norm_w."""
    h = (rng.standard_normal(k) * 3).astype(np.float32)
    norm_w = (1 + 0.2 * rng.standard_normal(k)).astype(np.float32)
    return h, norm_w, N.rms_norm_reference(h, norm_w, EPS)


@pytest.mark.parametrize("t", [T.Q4_K, T.Q6_K, G.Q6_K_PLANAR, T.F32], ids=format_id)
def test_gemv_normed_matches_numpy(rng: np.random.Generator, t: T) -> None:
    n, k = 37, 512
    data = random_weights(t, (n, k), rng)
    h, norm_w, x = normed_input(rng, k)
    y = run_cpu(G.gemv_normed(t, n, k, EPS), G.weight_view(t, data), h, norm_w, np.empty(n, np.float32))
    assert_gemv_close(y, G.gemv_normed_reference(t, data, h, norm_w, EPS), magnitude(t, data, x))


@pytest.mark.parametrize("n_v", [24, 0], ids=["qkv", "qk"])
def test_gemv_qkv_normed_matches_numpy(rng: np.random.Generator, n_v: int) -> None:
    t, k, ns = T.Q4_K, 512, [37, 19, n_v]
    datas = [random_weights(t, (n, k), rng) for n in ns if n]
    h, norm_w, x = normed_input(rng, k)
    got = run_cpu_outputs(G.gemv_qkv_normed(t, *ns, k, EPS), [G.weight_view(t, d) for d in datas] + [h, norm_w],
                          [np.empty(d.shape[0], np.float32) for d in datas])
    for y, data in zip(got, datas, strict=True):
        assert_gemv_close(y, G.gemv_normed_reference(t, data, h, norm_w, EPS), magnitude(t, data, x))


@pytest.mark.parametrize("t", [T.Q4_K, T.Q8_0, G.Q6_K_PLANAR], ids=format_id)
def test_gemv_residual_matches_numpy(rng: np.random.Generator, t: T) -> None:
    n, k = 37, 512
    data = random_weights(t, (n, k), rng)
    x = rng.standard_normal(k, dtype=np.float32)
    r = rng.standard_normal(n, dtype=np.float32)
    y = run_cpu(G.gemv_residual(t, n, k), G.weight_view(t, data), x, r, np.empty(n, np.float32))
    assert_gemv_close(y, G.gemv_residual_reference(t, data, x, r), magnitude(t, data, x) + np.abs(r))


def test_fused_forms_take_their_extra_inputs_in_order() -> None:
    assert [p.name for p in G.gemv_normed(T.Q4_K, 64, 256, EPS).params] == ["W", "h", "norm_w", "gemv"]
    assert [p.name for p in G.gemv_residual(T.Q4_K, 64, 256).params] == ["W", "x", "r", "residual"]
    assert [p.name for p in G.gemv_qkv_normed(T.Q4_K, 64, 32, 0, 256, EPS).params] == ["Wq", "Wk", "h", "norm_w", "q", "k"]


@pytest.mark.parametrize("t", ALL_FORMATS, ids=format_id)
def test_weight_view_is_zero_copy(rng: np.random.Generator, t: T) -> None:
    data = random_weights(t, (4, 256), rng)
    view = G.weight_view(t, data)
    assert np.shares_memory(view, data)
    assert view.shape == (4, G.gemv_format(t).row_words(256))
    assert str(view.dtype) == G.gemv_format(t).word_dtype


def test_unsupported_type_names_it() -> None:
    with pytest.raises(UnsupportedQuantTypeError, match="Q4_0"):
        G.gemv(T.Q4_0, 16, 256)


def test_row_that_does_not_divide_into_blocks_is_rejected() -> None:
    with pytest.raises(TensorShapeError, match="Q4_K"):
        G.gemv(T.Q4_K, 16, 320)
