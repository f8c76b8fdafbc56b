"""The router schedule: CUDA codegen, nvcc for every arch, and on a GPU the Qwen3-30B-A3B shape
(128 experts, top 8) against the numpy reference (on GPU machines the library comes prebuilt:
`python -m tests.gpu_prebuild`)."""

import numpy as np
import pytest
import tvm

from sparkinfer.kernels.router import router_topk, router_topk_reference, router_topk_symbol

from cuda_testutil import (
    scheduled,
    CUDA_ARCHS,
    Gpu,
    assert_nvcc_compiles,
    cuda_source,
    gpu_fixture,
    kernel_body,
    main,
    module,
    needs_nvcc,
)

QWEN3_EXPERTS, QWEN3_USED = 128, 8


def kernels_module() -> tvm.IRModule:
    shapes = ((QWEN3_EXPERTS, QWEN3_USED), (16, 4))
    return module(*(scheduled(router_topk, "router", e, k) for e, k in shapes))


@pytest.fixture(scope="module")
def source() -> str:
    return cuda_source(kernels_module())


def test_one_block_of_one_thread_per_expert(source: str) -> None:
    symbol = router_topk_symbol(QWEN3_EXPERTS, QWEN3_USED)
    body = kernel_body(source, symbol)
    assert f"__launch_bounds__({QWEN3_EXPERTS}) {symbol}_kernel" in source
    assert "blockIdx" not in body
    # Ranks and slot ids accumulate in registers, not in shared or global memory.
    assert "rank_shared_local_ptr[0] = (rank_shared_local_ptr[0] +" in body
    assert "ids_local_ptr[0] = max(ids_local_ptr[0]," in body


@needs_nvcc
@pytest.mark.parametrize("arch", CUDA_ARCHS)
def test_nvcc_compiles_for(source: str, arch: str) -> None:
    assert_nvcc_compiles(arch, source)


gpu = gpu_fixture("router", kernels_module)


def test_router_on_gpu_matches_numpy(gpu: Gpu) -> None:
    rng = np.random.default_rng(20261127)
    for trial in range(50):
        logits = (rng.standard_normal(QWEN3_EXPERTS) * 2).astype(np.float32)
        if trial % 10 == 0:  # ties across the cut
            logits[rng.choice(QWEN3_EXPERTS, 12, replace=False)] = logits.max()
        ids = gpu.tensor(np.full(QWEN3_USED, -1, np.int32))
        weights = gpu.poisoned((QWEN3_USED,))
        gpu(router_topk_symbol(QWEN3_EXPERTS, QWEN3_USED), gpu.tensor(logits), ids, weights)
        ref_ids, ref_weights = router_topk_reference(logits, QWEN3_USED)
        np.testing.assert_array_equal(ids.numpy(), ref_ids)
        np.testing.assert_allclose(weights.numpy(), ref_weights, rtol=2e-6, atol=0)


if __name__ == "__main__":
    main(__doc__, "router", kernels_module)
