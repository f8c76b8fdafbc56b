"""RMSNorm kernels, built for LLVM, against the numpy oracle."""

import numpy as np
import pytest
import tvm

from sparkinfer.compiler.targets import target_for
from sparkinfer.kernels import norm as N
from sparkinfer.reference import qwen3moe as ref

EPS = 1e-6


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261127)


def run_cpu(
    func: tvm.tirx.PrimFunc, inputs: list[np.ndarray], outputs: list[np.ndarray]
) -> list[np.ndarray]:
    """Build for this CPU and run; outputs are poisoned with NaN first, so an element the
    kernel never writes fails the comparison."""
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target_for("cpu"))
    args = [tvm.runtime.tensor(a) for a in inputs]
    outs = [tvm.runtime.tensor(np.full_like(o, np.nan)) for o in outputs]
    lib["main"](*args, *outs)
    return [o.numpy() for o in outs]


@pytest.mark.parametrize("h", [2048, 96])
def test_rms_norm_matches_oracle(rng: np.random.Generator, h: int) -> None:
    x = rng.standard_normal(h, dtype=np.float32) * 3
    w = rng.standard_normal(h, dtype=np.float32)
    (y,) = run_cpu(N.rms_norm(h, EPS), [x, w], [np.empty(h, np.float32)])
    np.testing.assert_allclose(y, N.rms_norm_reference(x, w, EPS), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y, ref.rms_norm(x, w, EPS), rtol=1e-5, atol=1e-6)


def test_add_rms_norm_writes_the_sum_and_its_norm(rng: np.random.Generator) -> None:
    h = 2048
    x, r, w = (rng.standard_normal(h, dtype=np.float32) for _ in range(3))
    total, y = run_cpu(
        N.add_rms_norm(h, EPS), [x, r, w], [np.empty(h, np.float32), np.empty(h, np.float32)]
    )
    total_ref, y_ref = N.add_rms_norm_reference(x, r, w, EPS)
    np.testing.assert_array_equal(total, x + r)
    np.testing.assert_array_equal(total, total_ref)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
