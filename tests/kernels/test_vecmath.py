"""kernels/vecmath.py: the arithmetic exp and sigmoid against numpy, built for LLVM with the
element loop vectorized (the form the CPU schedules use) and unscheduled."""

import numpy as np
import pytest
import tvm

from sparkinfer.compiler.targets import target_for
from sparkinfer.kernels import vecmath


def run_elementwise(fn, x: np.ndarray, vectorize: bool) -> np.ndarray:  # noqa: ANN001
    xs = tvm.te.placeholder(x.shape, "float32", "x")
    func = tvm.te.create_prim_func([xs, tvm.te.compute(x.shape, lambda i: fn(xs[i]), name="y")])
    if vectorize:
        sch = tvm.s_tir.Schedule(func)
        (i,) = sch.get_loops(sch.get_sblock("y"))
        sch.vectorize(sch.split(i, [None, 16])[1])
        func = sch.mod["main"]
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target_for("cpu"))
    y = tvm.runtime.tensor(np.full_like(x, np.nan), tvm.cpu())
    lib["main"](tvm.runtime.tensor(x, tvm.cpu()), y)
    return y.numpy()


@pytest.mark.parametrize("vectorize", [False, True])
def test_exp_matches_numpy(vectorize: bool) -> None:
    x = np.concatenate([np.linspace(-100.0, 0.0, 4000, dtype=np.float32),
                        np.array([-87.0, -86.99, -1e-7, 0.0], np.float32)])
    want = np.where(x < vecmath.EXP_FLOOR, 0.0, np.exp(x.astype(np.float64)))
    np.testing.assert_allclose(run_elementwise(vecmath.exp_f32, x, vectorize), want, rtol=5e-7, atol=0)


@pytest.mark.parametrize("vectorize", [False, True])
def test_sigmoid_matches_numpy(vectorize: bool) -> None:
    x = np.concatenate([np.linspace(-120.0, 120.0, 4000, dtype=np.float32), np.array([0.0, -0.0], np.float32)])
    want = 1.0 / (1.0 + np.exp(-x.astype(np.float64)))
    np.testing.assert_allclose(run_elementwise(vecmath.sigmoid_f32, x, vectorize), want, rtol=1e-6, atol=1e-37)
