"""The router top-k compute, built for LLVM, against its numpy reference and the model oracle."""

import numpy as np
import pytest
import tvm

from sparkinfer.compiler.targets import target_for
from sparkinfer.kernels.router import router_topk, router_topk_reference
from sparkinfer.reference.qwen3moe import route_topk

SHAPES = [(8, 2), (16, 4)]


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: f"E{s[0]}_top{s[1]}")
def built(request: pytest.FixtureRequest) -> tuple[int, int, tvm.runtime.Module]:
    n_experts, n_used = request.param
    lib = tvm.compile(tvm.IRModule({"main": router_topk(n_experts, n_used)}), target_for("cpu"))
    return n_experts, n_used, lib


def run(lib: tvm.runtime.Module, logits: np.ndarray, n_used: int) -> tuple[np.ndarray, np.ndarray]:
    """Outputs poisoned first (ids -1, weights NaN): an element never written fails."""
    dev = tvm.cpu()
    ids = tvm.runtime.tensor(np.full(n_used, -1, np.int32), dev)
    weights = tvm.runtime.tensor(np.full(n_used, np.nan, np.float32), dev)
    lib["main"](tvm.runtime.tensor(logits, dev), ids, weights)
    return ids.numpy(), weights.numpy()


def test_router_matches_numpy(built: tuple[int, int, tvm.runtime.Module]) -> None:
    n_experts, n_used, lib = built
    rng = np.random.default_rng(20261127)
    for _ in range(20):
        logits = (rng.standard_normal(n_experts) * 3).astype(np.float32)
        ids, weights = run(lib, logits, n_used)
        ref_ids, ref_weights = router_topk_reference(logits, n_used)
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_allclose(weights, ref_weights, rtol=1e-6, atol=0)


def test_ties_go_to_the_lower_index(built: tuple[int, int, tvm.runtime.Module]) -> None:
    n_experts, n_used, lib = built
    # Two tied pairs straddling the cut, and -0.0 == +0.0.
    logits = np.full(n_experts, -5.0, np.float32)
    logits[[n_experts - 1, 3]] = 2.0
    logits[[5, 1]] = 0.0
    logits[6] = -0.0
    ids, weights = run(lib, logits, n_used)
    expected = np.array([3, n_experts - 1, 1, 5], np.int32)[:n_used]
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_array_equal(router_topk_reference(logits, n_used)[0], expected)
    assert weights[0] == weights[1]
    np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-6)


def test_reference_agrees_with_the_model_oracle() -> None:
    rng = np.random.default_rng(7)
    logits = (rng.standard_normal((200, 128)) * 2).astype(np.float32)
    oracle_ids, oracle_weights = route_topk(logits, 8)
    for row, o_ids, o_weights in zip(logits, oracle_ids, oracle_weights):
        ids, weights = router_topk_reference(row, 8)
        np.testing.assert_array_equal(ids, o_ids)
        np.testing.assert_allclose(weights, o_weights, rtol=2e-6, atol=0)


def test_rejects_more_experts_used_than_exist() -> None:
    with pytest.raises(ValueError, match="9 of 8"):
        router_topk(8, 9)
