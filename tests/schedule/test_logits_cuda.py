"""The logits-processing schedules: CUDA codegen and nvcc for every arch (the Qwen3 vocabulary),
and on a GPU the kernels against the numpy reference (library prebuilt on GPU machines:
`python -m tests.gpu_prebuild`)."""

import numpy as np
import pytest
import tvm

from sparkinfer.kernels import logits as L
from sparkinfer.schedule.norm import DEFAULT_THREADS

from cuda_testutil import (
    CUDA_ARCHS,
    Gpu,
    assert_nvcc_compiles,
    cuda_source,
    gpu_fixture,
    kernel_body,
    main,
    module,
    needs_nvcc,
    scheduled,
)

VOCAB = 151936


def kernels_module() -> tvm.IRModule:
    return module(scheduled(L.process_logits, "logits", VOCAB), scheduled(L.count_token, "logits", VOCAB))


@pytest.fixture(scope="module")
def source() -> str:
    return cuda_source(kernels_module())


def test_process_logits_is_one_token_a_thread(source: str) -> None:
    body = kernel_body(source, L.process_logits_symbol(VOCAB))
    assert f"__launch_bounds__({DEFAULT_THREADS})" in source
    assert "blockIdx.x" in body and "threadIdx.x" in body
    assert "for (" not in body and "__syncthreads" not in body
    assert "-CUDART_INF_F" in body  # masked-out tokens


def test_count_token_is_one_thread(source: str) -> None:
    body = kernel_body(source, L.count_token_symbol(VOCAB))
    assert "threadIdx" not in body and "token_counts_ptr[next_token_ptr[0]]" in body


@needs_nvcc
@pytest.mark.parametrize("arch", CUDA_ARCHS)
def test_nvcc_compiles_for(source: str, arch: str) -> None:
    assert_nvcc_compiles(arch, source)


gpu = gpu_fixture("logits", kernels_module)


def test_logits_kernels_on_gpu_match_numpy(gpu: Gpu) -> None:
    rng = np.random.default_rng(20261204)
    logits = (rng.standard_normal(VOCAB) * 3).astype(np.float32)
    mask = L.mask_of(rng.random(VOCAB) < 0.3)
    counts = rng.integers(0, 3, VOCAB).astype(np.int32)
    params = np.array([0.4, 0.2, 1.2], np.float32)
    out = gpu.tensor(np.zeros(VOCAB, np.float32))
    gpu(L.process_logits_symbol(VOCAB), gpu.tensor(logits), gpu.tensor(params), gpu.tensor(mask),
        gpu.tensor(counts), out)
    np.testing.assert_allclose(out.numpy(), L.process_logits_reference(logits, params, mask, counts), rtol=1e-6)
    counts_dev = gpu.tensor(counts)
    gpu(L.count_token_symbol(VOCAB), gpu.tensor(np.array([5], np.int32)), counts_dev)
    assert counts_dev.numpy()[5] == counts[5] + 1


if __name__ == "__main__":
    main(__doc__, "logits", kernels_module)
