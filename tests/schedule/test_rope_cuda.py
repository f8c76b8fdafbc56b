"""QK-norm + RoPE + KV-append schedule: codegen, nvcc for every arch, and on a GPU the model's
shapes against numpy (on GPU machines the library comes prebuilt:
`python -m tests.gpu_prebuild`)."""

import numpy as np
import pytest
import tvm

from sparkinfer.kernels import rope as R
from sparkinfer.kernels.testing import assert_qk_norm_rope_kv_append_close

from cuda_testutil import (
    scheduled,
    CUDA_ARCHS,
    Gpu,
    assert_nvcc_compiles,
    cuda_source,
    gpu_fixture,
    main,
    module,
    needs_nvcc,
)

NH, NKV, D, P, MP = 32, 4, 128, 64, 640
EPS, THETA = 1e-6, 1e6
N_PAGES = 80
SYMBOL = f"qk_norm_rope_kv_append_{NH}x{NKV}x{D}_p{P}"


def kernels_module() -> tvm.IRModule:
    return module(scheduled(R.qk_norm_rope_kv_append, "rope", NH, NKV, D, P, MP, EPS, THETA))


def test_one_block_per_head() -> None:
    source = cuda_source(kernels_module())
    assert source.count('extern "C" __global__') == 2
    assert "__launch_bounds__(128)" in source


@needs_nvcc
@pytest.mark.parametrize("arch", CUDA_ARCHS)
def test_nvcc_compiles_for(arch: str) -> None:
    assert_nvcc_compiles(arch, kernels_module())


gpu = gpu_fixture("rope", kernels_module)


@pytest.mark.parametrize("pos", [0, 63, 64, 4095, 40959])
def test_matches_numpy_on_gpu(gpu: Gpu, pos: int) -> None:
    rng = np.random.default_rng(pos)
    q = rng.standard_normal(NH * D, dtype=np.float32) * 4
    k = rng.standard_normal(NKV * D, dtype=np.float32) * 4
    v = rng.standard_normal(NKV * D, dtype=np.float32)
    q_norm_w = rng.uniform(0.5, 1.5, D).astype(np.float32)
    k_norm_w = rng.uniform(0.5, 1.5, D).astype(np.float32)
    page_table = rng.integers(0, N_PAGES, MP).astype(np.int32)
    k_cache = rng.standard_normal((N_PAGES, P, NKV, D)).astype(np.float16)
    v_cache = rng.standard_normal((N_PAGES, P, NKV, D)).astype(np.float16)

    args = [q, k, v, q_norm_w, k_norm_w, np.array([pos], np.int32), page_table, k_cache, v_cache]
    tensors = [gpu.tensor(a) for a in args]
    q_rot = gpu.poisoned((NH, D))
    gpu(SYMBOL, *tensors, q_rot)
    got_k, got_v = tensors[7].numpy(), tensors[8].numpy()

    assert_qk_norm_rope_kv_append_close(
        q_rot.numpy(), got_k, got_v, (q, k, v, q_norm_w, k_norm_w, page_table, k_cache, v_cache), pos, EPS, THETA,
        q_rtol=1e-5, q_atol=1e-6,
    )


if __name__ == "__main__":
    main(__doc__, "rope", kernels_module)
