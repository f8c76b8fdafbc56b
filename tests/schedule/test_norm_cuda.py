"""RMSNorm schedules: codegen, nvcc for every arch, and on a GPU the model's hidden size against
numpy (on GPU machines the library comes prebuilt: `python -m tests.gpu_prebuild`)."""

import numpy as np
import pytest
import tvm

from sparkinfer.kernels import norm as N

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

H, EPS = 2048, 1e-6


def kernels_module() -> tvm.IRModule:
    return module(scheduled(N.rms_norm, "norm", H, EPS), scheduled(N.add_rms_norm, "norm", H, EPS))


def test_one_launch_per_norm() -> None:
    source = cuda_source(kernels_module())
    assert source.count('extern "C" __global__') == 2 * 2  # a declaration and a definition each


@needs_nvcc
@pytest.mark.parametrize("arch", CUDA_ARCHS)
def test_nvcc_compiles_for(arch: str) -> None:
    assert_nvcc_compiles(arch, kernels_module())


gpu = gpu_fixture("norm", kernels_module)


def test_matches_numpy_on_gpu(gpu: Gpu) -> None:
    rng = np.random.default_rng(11)
    x, r, w = (rng.standard_normal(H, dtype=np.float32) for _ in range(3))
    y, total, y2 = (gpu.poisoned((H,)) for _ in range(3))
    gpu(f"rms_norm_{H}", gpu.tensor(x), gpu.tensor(w), y)
    gpu(f"add_rms_norm_{H}", gpu.tensor(x), gpu.tensor(r), gpu.tensor(w), total, y2)
    np.testing.assert_allclose(y.numpy(), N.rms_norm_reference(x, w, EPS), rtol=1e-5, atol=1e-6)
    total_ref, y2_ref = N.add_rms_norm_reference(x, r, w, EPS)
    np.testing.assert_array_equal(total.numpy(), total_ref)
    np.testing.assert_allclose(y2.numpy(), y2_ref, rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    main(__doc__, "norm", kernels_module)
