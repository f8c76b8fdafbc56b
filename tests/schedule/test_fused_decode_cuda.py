"""The fused-launch kernels of the decode step (`decode_launches="fused"`): CUDA codegen, nvcc
for every arch, and on a GPU and in the CUDA emulator (the `gpu` fixture) the Qwen3-30B-A3B
shapes against the numpy reference (on GPU machines the library comes prebuilt:
`python -m tests.gpu_prebuild`)."""

import re
from dataclasses import dataclass

import numpy as np
import pytest
import tvm
from gguf import GGMLQuantizationType as T

from sparkinfer import quant
from sparkinfer.kernels import gemv as G
from sparkinfer.kernels import moe as M
from sparkinfer.kernels import norm as N
from sparkinfer.kernels.testing import assert_gemv_close, random_weights
from sparkinfer.schedule.gemv import GemvKnobs
from sparkinfer.schedule.moe import MoeKnobs

from cuda_testutil import (
    CUDA_ARCHS,
    Gpu,
    assert_nvcc_compiles,
    cuda_source,
    default_knobs_with,
    gpu_fixture,
    kernel_body,
    main,
    module,
    needs_nvcc,
    scheduled,
)

H, EPS = 2048, 1e-6
E, KU, I = 128, 8, 768


@dataclass(frozen=True)
class Normed:
    """gemv_normed (rows only) or gemv_qkv_normed (Q, K and V rows) at the model's H."""

    ggml_type: T
    rows: tuple[int, ...]

    @property
    def symbol(self) -> str:
        if len(self.rows) == 1:
            return G.gemv_normed_symbol(self.ggml_type, self.rows[0], H)
        return G.gemv_qkv_normed_symbol(self.ggml_type, *self.qkv_args)

    @property
    def qkv_args(self) -> tuple[int, int, int, int]:
        n_q, n_k, *n_v = self.rows
        return n_q, n_k, n_v[0] if n_v else 0, H

    def func(self) -> tvm.tirx.PrimFunc:
        if len(self.rows) == 1:
            return scheduled(G.gemv_normed, "gemv", self.ggml_type, self.rows[0], H, EPS)
        return scheduled(G.gemv_qkv_normed, "gemv", self.ggml_type, *self.qkv_args, EPS)


@dataclass(frozen=True)
class Residual:
    """gemv_residual: the attention output projection, 32 heads x 128 -> H."""

    ggml_type: T
    k: int = 4096

    @property
    def symbol(self) -> str:
        return G.gemv_residual_symbol(self.ggml_type, H, self.k)

    def func(self) -> tvm.tirx.PrimFunc:
        return scheduled(G.gemv_residual, "gemv", self.ggml_type, H, self.k)


@dataclass(frozen=True)
class Routed:
    """moe_gate_up_silu_routed at the model's 128 experts, top 8, I 768."""

    type_gate: T
    type_up: T
    rows_per_thread: int | None = None  # None: the default knobs
    vector_header: int = 0

    @property
    def symbol(self) -> str:
        symbol = M.moe_gate_up_silu_routed_symbol(self.type_gate, self.type_up, E, KU, I, H)
        if self.rows_per_thread is None:
            return symbol
        return f"{symbol}_rows{self.rows_per_thread}" + ("_header" if self.vector_header else "")

    def func(self) -> tvm.tirx.PrimFunc:
        args = (self.type_gate, self.type_up, E, KU, I, H, EPS)
        knobs = (None if self.rows_per_thread is None else
                 default_knobs_with(M.moe_gate_up_silu_routed, "moe", *args, rows_per_thread=self.rows_per_thread,
                                    vector_header=self.vector_header))
        return scheduled(M.moe_gate_up_silu_routed, "moe", *args, knobs=knobs).with_attr("global_symbol", self.symbol)


# Q4_K_M's Q+K (beside a Q6_K V) and Q+K+V, its Q6_K V, the F32 router; the Q4_K output; a Q4_K V
# (its block headers in 16-byte loads, vector_header).
NORMED = [Normed(T.Q4_K, (4096, 512)), Normed(T.Q4_K, (4096, 512, 512)), Normed(T.Q6_K, (512,)),
          Normed(T.F32, (128,)), Normed(T.Q4_K, (512,))]
RESIDUAL = [Residual(T.Q4_K), Residual(T.Q6_K)]
# The routed gate/up also at every rows_per_thread (the default takes 4).
ROUTED = [Routed(T.Q4_K, T.Q4_K), Routed(T.Q5_K, T.Q8_0), *(Routed(T.Q4_K, T.Q4_K, r) for r in (1, 2, 4)),
          Routed(T.Q4_K, T.Q4_K, 4, 1)]


def kernels_module() -> tvm.IRModule:
    return module(*(case.func() for case in (*NORMED, *RESIDUAL, *ROUTED)))


@pytest.fixture(scope="module")
def source() -> str:
    return cuda_source(kernels_module())


@pytest.mark.parametrize("case", NORMED, ids=lambda c: c.symbol)
def test_normed_forms_normalize_once_per_block_into_shared_memory(source: str, case: Normed) -> None:
    body = kernel_body(source, case.symbol)
    assert "__shared__ alignas(64) float norm_shared_ptr[2048]" in body
    # the norm's one pass over h, unrolled: one 1 / rms per value a thread normalizes
    assert body.count("sqrtf(") == len(re.findall(r"norm_shared_ptr\[[^\]]*\] = ", body)) > 1
    assert "for (" not in body[:body.index("norm_shared_ptr[")]  # the sum of squares' loads all in flight
    assert "__syncthreads()" in body
    assert "x_ptr" not in body  # no x parameter: h and norm_w instead
    assert "h_ptr[" in body and "norm_w_ptr[" in body


@pytest.mark.parametrize("case", RESIDUAL, ids=lambda c: c.symbol)
def test_residual_form_adds_in_the_epilogue(source: str, case: Residual) -> None:
    body = kernel_body(source, case.symbol)
    assert "__shfl_down_sync" in body
    assert body.count("residual_ptr[") == 1  # one write per row, after the warp reduction
    assert "r_ptr[" in body


@pytest.mark.parametrize("case", ROUTED, ids=lambda c: c.symbol)
def test_routed_gate_up_ranks_in_shared_memory_and_keeps_16_byte_weight_loads(source: str, case: Routed) -> None:
    body = kernel_body(source, case.symbol)
    assert "__shared__ alignas(64) int rank_shared_ptr[128]" in body
    assert "__launch_bounds__(128)" in body
    assert body.count("sqrtf(") == 2048 // 128  # one 1 / rms per value a thread normalizes, unrolled
    # ids and weights written once per thread (a slot each), read back for the expert rows
    assert body.count("ids_ptr[((((int)threadIdx.y)") >= 1 and "weights_ptr[" in body
    # every block's expert rows are read after a barrier that follows its own ids stores
    store = re.search(r"ids_ptr\[[^\]]*threadIdx[^\]]*\] = ", body)
    first_read = body.find("ids_ptr[((int)blockIdx.y)]")
    assert store and 0 < store.end() < first_read and "__syncthreads()" in body[store.end():first_read]
    # the weights' register copy indexed by the block's expert only: no spill to local memory
    assert not re.search(r"_local_ptr\[[^\]]*(threadIdx|blockIdx|ids_ptr)", body)
    if case.type_gate == T.Q4_K:
        assert "*(uint4*)(Wg_ptr" in body and "*(uint4*)(Wu_ptr" in body


@needs_nvcc
@pytest.mark.parametrize("arch", CUDA_ARCHS)
def test_nvcc_compiles_for(source: str, arch: str) -> None:
    assert_nvcc_compiles(arch, source)


@needs_nvcc
def test_other_knobs_lower_and_compile() -> None:
    """Points of the tuner's space away from the defaults: fewer threads than experts (the
    top-k stages loop), a block of 1024 threads, several rows a thread."""
    funcs = [scheduled(M.moe_gate_up_silu_routed, "moe", T.Q4_K, T.Q4_K, E, KU, I, H, EPS,
                       knobs=MoeKnobs(lanes=lanes, rows=rows, rows_per_thread=per_thread, unroll=64,
                                      vector_header=header)
                       ).with_attr("global_symbol", f"routed_{lanes}x{rows}x{per_thread}x{header}")
             for lanes, rows, per_thread, header in ((8, 4, 1, 0), (32, 32, 1, 1), (16, 2, 4, 1), (32, 4, 2, 0))]
    funcs.append(scheduled(G.gemv_normed, "gemv", T.Q6_K, 512, H, EPS,
                           knobs=GemvKnobs(lanes=4, rows=2, rows_per_thread=2, unroll=16, vector_header=0)
                           ).with_attr("global_symbol", "normed"))
    funcs.append(scheduled(G.gemv_residual, "gemv", T.Q4_K, H, 4096,
                           knobs=GemvKnobs(lanes=8, rows=8, rows_per_thread=4, unroll=16, vector_header=1)
                           ).with_attr("global_symbol", "residual"))
    assert_nvcc_compiles("sm_90", module(*funcs))


gpu = gpu_fixture("fused_decode", kernels_module)


def magnitude(t: T, data: np.ndarray, x: np.ndarray) -> np.ndarray:
    w = quant.dequantize(t, data, (data.shape[0], x.shape[-1]))
    return np.abs(w).astype(np.float64) @ np.abs(x).astype(np.float64)


@pytest.mark.parametrize("case", NORMED, ids=lambda c: c.symbol)
def test_normed_on_gpu_matches_numpy(gpu: Gpu, case: Normed) -> None:
    rng = np.random.default_rng(20261205)
    datas = [random_weights(case.ggml_type, (n, H), rng) for n in case.rows]
    h = (rng.standard_normal(H) * 3).astype(np.float32)
    norm_w = (1 + 0.2 * rng.standard_normal(H)).astype(np.float32)
    outs = [gpu.poisoned((n,)) for n in case.rows]
    args = [gpu.tensor(G.weight_view(case.ggml_type, d)) for d in datas] + [gpu.tensor(h), gpu.tensor(norm_w)]
    gpu(case.symbol, *args, *outs)
    x = N.rms_norm_reference(h, norm_w, EPS)
    for out, data in zip(outs, datas, strict=True):
        ref = G.gemv_normed_reference(case.ggml_type, data, h, norm_w, EPS)
        assert_gemv_close(out.numpy(), ref, magnitude(case.ggml_type, data, x))


@pytest.mark.parametrize("case", RESIDUAL, ids=lambda c: c.symbol)
def test_residual_on_gpu_matches_numpy(gpu: Gpu, case: Residual) -> None:
    rng = np.random.default_rng(20261206)
    data = random_weights(case.ggml_type, (H, case.k), rng)
    x = rng.standard_normal(case.k, dtype=np.float32)
    r = rng.standard_normal(H, dtype=np.float32)
    out = gpu.poisoned((H,))
    gpu(case.symbol, gpu.tensor(G.weight_view(case.ggml_type, data)), gpu.tensor(x), gpu.tensor(r), out)
    ref = G.gemv_residual_reference(case.ggml_type, data, x, r)
    assert_gemv_close(out.numpy(), ref, magnitude(case.ggml_type, data, x) + np.abs(r))


@pytest.mark.parametrize("case", ROUTED, ids=lambda c: c.symbol)
def test_routed_on_gpu_matches_numpy(gpu: Gpu, case: Routed) -> None:
    rng = np.random.default_rng(20261207)
    gate = random_weights(case.type_gate, (E, I, H), rng)
    up = random_weights(case.type_up, (E, I, H), rng)
    logits = rng.standard_normal(E).astype(np.float32)
    logits[3] = logits[70] = logits.max() + 0.5  # a tie for the first slot: expert 3 takes it
    h = (rng.standard_normal(H) * 3).astype(np.float32)
    norm_w = (1 + 0.2 * rng.standard_normal(H)).astype(np.float32)
    act, ids, weights = gpu.poisoned((KU, I)), gpu.tensor(np.full(KU, -1, np.int32)), gpu.poisoned((KU,))
    gpu(case.symbol, gpu.tensor(G.weight_view(case.type_gate, gate)), gpu.tensor(G.weight_view(case.type_up, up)),
        gpu.tensor(logits), gpu.tensor(h), gpu.tensor(norm_w), act, ids, weights)
    act_ref, ids_ref, weights_ref = M.moe_gate_up_silu_routed_reference(
        case.type_gate, gate, case.type_up, up, logits, h, norm_w, KU, EPS)
    assert ids.numpy().tolist() == ids_ref.tolist() and ids_ref[:2].tolist() == [3, 70]
    np.testing.assert_allclose(weights.numpy(), weights_ref, rtol=1e-6)
    np.testing.assert_allclose(act.numpy(), act_ref, rtol=1e-4, atol=1e-4 * np.abs(act_ref).max())


if __name__ == "__main__":
    main(__doc__, "fused_decode", kernels_module)
