"""QK-norm + RoPE + KV append, built for LLVM, against the model oracle's building blocks."""

import numpy as np
import pytest
import tvm
from tvm import relax

from sparkinfer.compiler.targets import target_for
from sparkinfer.kernels import rope as R
from sparkinfer.kernels.testing import assert_qk_norm_rope_kv_append_close

NH, NKV, D, P = 8, 2, 64, 16
EPS, THETA = 1e-6, 1e6
PAGE_TABLE = np.array([3, 7, 0, 5, 1, 8], np.int32)  # MP = 6 logical pages, out of order
N_PAGES = 9  # physical pages; 2, 4 and 6 are never mapped


@pytest.fixture(scope="module")
def lib() -> tvm.runtime.Executable:
    func = R.qk_norm_rope_kv_append(NH, NKV, D, P, len(PAGE_TABLE), EPS, THETA)
    return tvm.compile(tvm.IRModule({"main": func}), target=target_for("cpu"))


@pytest.mark.parametrize("pos", [0, 1, 15, 16, 47, 95])
def test_qk_norm_rope_kv_append_matches_oracle(lib: tvm.runtime.Executable, pos: int) -> None:
    rng = np.random.default_rng(1000 + pos)
    q = rng.standard_normal(NH * D, dtype=np.float32) * 4
    k = rng.standard_normal(NKV * D, dtype=np.float32) * 4
    v = rng.standard_normal(NKV * D, dtype=np.float32)
    q_norm_w = rng.uniform(0.5, 1.5, D).astype(np.float32)
    k_norm_w = rng.uniform(0.5, 1.5, D).astype(np.float32)
    k_cache = rng.standard_normal((N_PAGES, P, NKV, D)).astype(np.float16)
    v_cache = rng.standard_normal((N_PAGES, P, NKV, D)).astype(np.float16)

    args = [q, k, v, q_norm_w, k_norm_w, np.array([pos], np.int32), PAGE_TABLE, k_cache, v_cache]
    tensors = [tvm.runtime.tensor(a) for a in args]
    q_rot = tvm.runtime.tensor(np.full((NH, D), np.nan, np.float32))
    lib["main"](*tensors, q_rot)
    got_k, got_v = tensors[7].numpy(), tensors[8].numpy()

    assert_qk_norm_rope_kv_append_close(
        q_rot.numpy(), got_k, got_v, (q, k, v, q_norm_w, k_norm_w, PAGE_TABLE, k_cache, v_cache), pos, EPS, THETA,
        q_rtol=1e-6,
    )


def test_relax_calls_it_in_place() -> None:
    """The documented call: R.call_tir_inplace writes the caches the caller passed in."""
    func = R.qk_norm_rope_kv_append(NH, NKV, D, P, len(PAGE_TABLE), EPS, THETA)
    n_pages = tvm.tirx.Var("n_pages", "int64")
    cache_ty = relax.TensorType((n_pages, P, NKV, D), "float16")
    shapes = [(NH * D,), (NKV * D,), (NKV * D,), (D,), (D,)]
    params = [relax.Var(f"x{i}", relax.TensorType(s, "float32")) for i, s in enumerate(shapes)]
    params += [relax.Var("pos", relax.TensorType((1,), "int32")),
               relax.Var("page_table", relax.TensorType((len(PAGE_TABLE),), "int32")),
               relax.Var("k_cache", cache_ty), relax.Var("v_cache", cache_ty)]
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        gvar = bb.add_func(func, "qk_norm_rope_kv_append")
        with bb.dataflow():
            out_ty = [cache_ty, cache_ty, relax.TensorType((NH, D), "float32")]
            out = bb.emit(relax.call_tir_inplace(gvar, params, [7, 8, -1], out_ty))
            q_rot = bb.emit_output(relax.TupleGetItem(out, 2))
        bb.emit_func_output(q_rot)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target=target_for("cpu")), tvm.cpu())

    rng = np.random.default_rng(9)
    pos = 21
    inputs = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    k_cache = np.zeros((N_PAGES, P, NKV, D), np.float16)
    v_cache = np.zeros((N_PAGES, P, NKV, D), np.float16)
    caches = [tvm.runtime.tensor(k_cache), tvm.runtime.tensor(v_cache)]
    args = [tvm.runtime.tensor(a) for a in (*inputs, np.array([pos], np.int32), PAGE_TABLE)]
    q_rot = vm["main"](*args, *caches).numpy()

    q_ref, k_ref, v_ref = R.qk_norm_rope_kv_append_reference(
        *inputs, pos, PAGE_TABLE, k_cache, v_cache, EPS, THETA
    )
    np.testing.assert_allclose(q_rot, q_ref, atol=1e-4)
    k_new = caches[0].numpy().astype(np.float32)
    np.testing.assert_allclose(k_new, k_ref.astype(np.float32), atol=2e-3)
    np.testing.assert_array_equal(caches[1].numpy(), v_ref)
