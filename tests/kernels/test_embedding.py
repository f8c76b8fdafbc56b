"""Embedding lookup, built for LLVM, against numpy dequantization of the same GGUF row."""

import numpy as np
import pytest
import tvm
from gguf import GGMLQuantizationType as T

from sparkinfer.compiler.targets import target_for
from sparkinfer.kernels import embedding as E
from sparkinfer.kernels.gemv import weight_view
from sparkinfer.kernels.testing import random_weights

ALL_TYPES = [T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0, T.F16, T.BF16, T.F32]
VOCAB, HIDDEN = 7, 512  # two K-quant super-blocks per row


@pytest.mark.parametrize("t", ALL_TYPES, ids=lambda t: t.name)
def test_embedding_dequantizes_the_token_row(t: T) -> None:
    rng = np.random.default_rng(20261127)
    data = random_weights(t, (VOCAB, HIDDEN), rng)
    func = E.embedding(t, VOCAB, HIDDEN)
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target_for("cpu"))
    w = tvm.runtime.tensor(weight_view(t, data))
    # First, middle, last row; then ids outside the table, which are clamped to its ends.
    for token, row in [(0, 0), (3, 3), (VOCAB - 1, VOCAB - 1), (VOCAB + 5, VOCAB - 1), (-2, 0)]:
        out = tvm.runtime.tensor(np.full(HIDDEN, np.nan, np.float32))
        lib["main"](w, tvm.runtime.tensor(np.array([token], np.int32)), out)
        expected = E.embedding_reference(t, data, row)
        # Same float32 products as the numpy dequantizer, up to a fused multiply-add.
        np.testing.assert_allclose(
            out.numpy(), expected, rtol=1e-6, atol=1e-7 * float(np.abs(expected).max()),
            err_msg=f"token {token}",
        )
