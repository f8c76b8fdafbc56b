"""Embedding schedule: nvcc for every arch, and on a GPU the model's vocabulary and width against
numpy (on GPU machines the library comes prebuilt: `python -m tests.gpu_prebuild`)."""

import numpy as np
import pytest
import tvm
from gguf import GGMLQuantizationType as T

from sparkinfer.kernels import embedding as E
from sparkinfer.kernels.gemv import weight_view
from sparkinfer.kernels.testing import random_weights

from cuda_testutil import (
    scheduled,
    CUDA_ARCHS,
    Gpu,
    assert_nvcc_compiles,
    gpu_fixture,
    main,
    module,
    needs_nvcc,
)

ALL_TYPES = [T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0, T.F16, T.BF16, T.F32]
H = 2048


def vocab_of(t: T) -> int:
    """The real vocabulary for Q4_K (token_embd's type in Q4_K_M files), so that the last
    rows' offsets are exercised; a smaller table for the other types."""
    return 151936 if t == T.Q4_K else 1024


def kernels_module() -> tvm.IRModule:
    return module(*(scheduled(E.embedding, "embedding", t, vocab_of(t), H) for t in ALL_TYPES))


@needs_nvcc
@pytest.mark.parametrize("arch", CUDA_ARCHS)
def test_nvcc_compiles_every_type_for(arch: str) -> None:
    assert_nvcc_compiles(arch, kernels_module())


gpu = gpu_fixture("embedding", kernels_module)


@pytest.mark.parametrize("t", ALL_TYPES, ids=lambda t: t.name)
def test_matches_numpy_on_gpu(gpu: Gpu, t: T) -> None:
    vocab = vocab_of(t)
    data = random_weights(t, (vocab, H), np.random.default_rng(5))
    w = gpu.tensor(weight_view(t, data))
    for token in (0, 1, vocab // 2, vocab - 1):
        out = gpu.poisoned((H,))
        token_ids = gpu.tensor(np.array([token], np.int32))
        gpu(f"embedding_{t.name.lower()}_{vocab}x{H}", w, token_ids, out)
        expected = E.embedding_reference(t, data, token)
        # nvcc may fuse scale * code + min into one FMA: a rounding apart from numpy.
        np.testing.assert_allclose(
            out.numpy(), expected, rtol=1e-6, atol=1e-7 * float(np.abs(expected).max()),
            err_msg=f"token {token}",
        )


if __name__ == "__main__":
    main(__doc__, "embedding", kernels_module)
