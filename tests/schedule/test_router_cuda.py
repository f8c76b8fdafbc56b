"""The router schedule: CUDA codegen, nvcc for every arch, and on a GPU the Qwen3-30B-A3B shape
(128 experts, top 8) against the numpy reference (on GPU machines the library comes prebuilt:
`python -m tests.gpu_prebuild`). The router's last-block top-k (`router_gemv_topk`, the step
variant router_merge="last_block"): its count after the release, nvcc for every arch, and
emulated or on a GPU the logits, ids and weights of the separate `gemv` and `router_topk` bit for
bit, at the model's shape and the tiny model's."""

import numpy as np
import pytest
import tvm
from gguf import GGMLQuantizationType

from sparkinfer.kernels.gemv import gemv, gemv_symbol
from sparkinfer.kernels.router import (
    router_gemv_topk,
    router_gemv_topk_symbol,
    router_topk,
    router_topk_reference,
    router_topk_symbol,
)

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
F32 = GGMLQuantizationType.F32
# (experts, hidden, used) of the last-block top-k: Qwen3-30B-A3B's router, the tiny model's
ROUTERS = [(QWEN3_EXPERTS, 2048, QWEN3_USED), (8, 256, 2)]


def merged_module() -> tvm.IRModule:
    return module(*(scheduled(router_gemv_topk, "router", F32, e, h, k) for e, h, k in ROUTERS))


def kernels_module() -> tvm.IRModule:
    shapes = ((QWEN3_EXPERTS, QWEN3_USED), (16, 4), *((e, k) for e, _, k in ROUTERS[1:]))
    separate = [scheduled(gemv, "gemv", F32, e, h) for e, h, _ in ROUTERS]
    return module(*(scheduled(router_topk, "router", e, k) for e, k in shapes), *separate,
                  *merged_module().functions.values())


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


@needs_nvcc
@pytest.mark.parametrize("arch", CUDA_ARCHS)
def test_nvcc_compiles_the_last_block_topk_for(arch: str) -> None:
    assert_nvcc_compiles(arch, merged_module())


def test_one_thread_counts_after_every_logit_is_published() -> None:
    e, h, k = ROUTERS[0]
    source = cuda_source(merged_module())
    body = kernel_body(source, router_gemv_topk_symbol(F32, e, h, k))
    assert f"__launch_bounds__(32) {router_gemv_topk_symbol(F32, e, h, k)}_kernel" in source
    release = body.index("tvm_builtin_cuda_thread_fence();\n  tvm_builtin_cuda_cta_sync();")
    count = body.index("tvm_builtin_cuda_atomic_add((&(arrivals_ptr[0])), 1)")
    guard = body.rindex("if (((int)threadIdx.x) < 1)", 0, count)
    # the row's logit is stored before the release; the count, thread 0's, after it
    assert body.rindex("gemv_ptr[((int)blockIdx.x)] =", 0, release) < release < guard
    assert body.count("tvm_builtin_cuda_atomic_add(") == 1
    # the answer reaches the other threads through shared memory, after a barrier; the count
    # goes back to 0 in the last block
    topk = body.index("for (int", count)
    assert "__syncthreads();" in body[count:topk] and "last_shared_ptr[0]" in body[count:topk]
    assert "arrivals_ptr[0] = 0;" in body[count:topk]


gpu = gpu_fixture("router", kernels_module)


def router_inputs(rng: np.random.Generator, e: int, h: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A router weight and input whose logits tie and nearly tie across the top-k cut: rows
    copied (the same logit exactly) and rows copied with one weight nudged by an ulp."""
    w = rng.standard_normal((e, h), dtype=np.float32) * np.float32(0.05)
    x = rng.standard_normal(h, dtype=np.float32)
    first = int(np.argsort(-(w.astype(np.float64) @ x))[k - 1])  # the last chosen row
    copies = rng.choice([r for r in range(e) if r != first], 2, replace=False)
    w[copies[0]] = w[first]
    w[copies[1]] = w[first]
    w[copies[1], int(rng.integers(h))] = np.nextafter(w[copies[1], 0], np.float32(np.inf))
    return w, x


@pytest.mark.parametrize(("e", "h", "k"), ROUTERS)
def test_last_block_topk_matches_the_separate_kernels(gpu: Gpu, e: int, h: int, k: int) -> None:
    """The merged kernel's logits, ids and weights are `gemv`'s and `router_topk`'s bit for bit,
    ties and near-ties across the cut included, and it leaves the count at 0: on fresh inputs
    for each of two launches, so that the emulator runs its blocks in both orders (the last
    block to arrive is another one) and the second starts from the first's reset."""
    rng = np.random.default_rng(20261206 + e)
    arrivals = gpu.tensor(np.zeros(1, np.int32))
    for _ in range(2):
        w_np, x_np = router_inputs(rng, e, h, k)
        w, x = gpu.tensor(w_np), gpu.tensor(x_np)
        logits, ids, weights = gpu.poisoned((e,)), gpu.tensor(np.full(k, -1, np.int32)), gpu.poisoned((k,))
        gpu(gemv_symbol(F32, e, h), w, x, logits)
        gpu(router_topk_symbol(e, k), logits, ids, weights)
        merged = gpu.poisoned((e,)), gpu.tensor(np.full(k, -1, np.int32)), gpu.poisoned((k,))
        gpu(router_gemv_topk_symbol(F32, e, h, k), w, x, arrivals, *merged)
        for got, want in zip(merged, (logits, ids, weights)):
            np.testing.assert_array_equal(got.numpy(), want.numpy())
        np.testing.assert_array_equal(arrivals.numpy(), np.zeros(1, np.int32))
        # and numpy's: the logits to float32 rounding, the experts and weights from them
        np.testing.assert_allclose(logits.numpy(), w_np.astype(np.float64) @ x_np, rtol=1e-5, atol=1e-5)
        ref_ids, ref_weights = router_topk_reference(logits.numpy(), k)
        np.testing.assert_array_equal(ids.numpy(), ref_ids)
        np.testing.assert_allclose(weights.numpy(), ref_weights, rtol=2e-6, atol=0)


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
