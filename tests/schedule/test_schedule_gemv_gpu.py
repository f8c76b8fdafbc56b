"""The scheduled GEMV kernels on a GPU (and emulated on the CPU: cuda_testutil's `gpu`
fixture), at Qwen3-30B-A3B shapes, against the numpy oracle (on GPU machines the library comes
prebuilt: `python -m tests.gpu_prebuild`)."""

import numpy as np
import pytest

from sparkinfer.kernels import gemv as G
from sparkinfer.kernels.testing import assert_gemv_close

from cuda_testutil import Gpu, gpu_fixture
from schedule_gemv_cases import CASES, QKV_CASES, STEM, GemvCase, GemvQkvCase, cases_module

gpu = gpu_fixture(STEM, cases_module)


def magnitude(case: GemvCase, data: np.ndarray, x: np.ndarray) -> np.ndarray:
    w = G.dequantize_rows(case.ggml_type, data, case.k)
    return np.abs(w).astype(np.float64) @ np.abs(x).astype(np.float64)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_gemv_on_gpu_matches_numpy(gpu: Gpu, case: GemvCase) -> None:
    rng = np.random.default_rng(20261127)
    inputs = case.inputs(rng)
    data, x = inputs["data"], inputs["x"]
    y = gpu.poisoned((case.n,))
    gpu(case.symbol, gpu.tensor(G.weight_view(case.ggml_type, data)), gpu.tensor(x), y)
    assert_gemv_close(y.numpy(), G.gemv_reference(case.ggml_type, data, x), magnitude(case, data, x))


@pytest.mark.parametrize("case", QKV_CASES, ids=lambda c: c.name)
def test_gemv_qkv_on_gpu_matches_numpy(gpu: Gpu, case: GemvQkvCase) -> None:
    rng = np.random.default_rng(20261127)
    inputs = case.inputs(rng)
    datas, x = inputs["datas"], inputs["x"]
    ys = [gpu.poisoned((n,)) for n in case.rows]
    args = [G.weight_view(case.ggml_type, d) for d in datas] + [x]
    gpu(case.symbol, *(gpu.tensor(a) for a in args), *ys)
    refs = G.gemv_qkv_reference(case.ggml_type, datas[0], datas[1], datas[2] if case.n_v else None, x)
    for y, ref, data in zip(ys, refs, datas):
        w = G.dequantize_rows(case.ggml_type, data, case.k)
        mag = np.abs(w).astype(np.float64) @ np.abs(x).astype(np.float64)
        assert_gemv_close(y.numpy(), ref, mag)
