"""The fused MoE schedules: CUDA codegen, nvcc for every arch, and on a GPU the Qwen3-30B-A3B
shapes (128 experts, top 8, H 2048, I 768) against the numpy reference (on GPU machines the
library comes prebuilt: `python -m tests.gpu_prebuild`)."""

import dataclasses
import re
from dataclasses import dataclass

import numpy as np
import pytest
import tvm
from gguf import GGMLQuantizationType as T

from sparkinfer.kernels import moe as M
from sparkinfer.kernels.gemv import Q6_K_PLANAR, dequantize_rows, gemv_experts_reference, gemv_format, weight_view
from sparkinfer.kernels.testing import assert_gemv_close, random_weights
from sparkinfer.reference.qwen3moe import silu
from sparkinfer.schedule.arch import arch_facts
from sparkinfer.schedule.moe import MoeKnobs, chunk_bytes, default_knobs

from cuda_testutil import (
    scheduled,
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
)

E, KU, H, I = 128, 8, 2048, 768


SM_90 = arch_facts("sm_90")


def knobs_suffix(rows_per_thread: int | None, vector_header: int) -> str:
    """A case's symbol suffix: none at the default knobs."""
    if rows_per_thread is None:
        return ""
    return f"_rows{rows_per_thread}" + ("_header" if vector_header else "")


@dataclass(frozen=True)
class GateUp:
    type_gate: T
    type_up: T
    rows_per_thread: int | None = None  # None: the default knobs
    vector_header: int = 0

    @property
    def symbol(self) -> str:
        symbol = M.moe_gate_up_silu_symbol(self.type_gate, self.type_up, E, KU, I, H)
        return symbol + knobs_suffix(self.rows_per_thread, self.vector_header)

    def func(self) -> tvm.tirx.PrimFunc:
        args = (self.type_gate, self.type_up, E, KU, I, H)
        knobs = (None if self.rows_per_thread is None else
                 default_knobs_with(M.moe_gate_up_silu, "moe", *args, rows_per_thread=self.rows_per_thread,
                                    vector_header=self.vector_header))
        return scheduled(M.moe_gate_up_silu, "moe", *args, knobs=knobs).with_attr("global_symbol", self.symbol)


@dataclass(frozen=True)
class Down:
    ggml_type: T
    rows_per_thread: int | None = None  # None: the default knobs
    vector_header: int = 0

    @property
    def symbol(self) -> str:
        symbol = M.moe_down_residual_symbol(self.ggml_type, E, KU, H, I)
        return symbol + knobs_suffix(self.rows_per_thread, self.vector_header)

    def func(self) -> tvm.tirx.PrimFunc:
        args = (self.ggml_type, E, KU, H, I)
        knobs = (None if self.rows_per_thread is None else
                 default_knobs_with(M.moe_down_residual, "moe", *args, rows_per_thread=self.rows_per_thread,
                                    vector_header=self.vector_header))
        return scheduled(M.moe_down_residual, "moe", *args, knobs=knobs).with_attr("global_symbol", self.symbol)


ROWS_PER_THREAD = (1, 2, 4)
# Q4_K_M's own (Q4_K gate/up, Q6_K or Q4_K down) and other quantizers' mixes, at the default
# knobs and at every rows_per_thread (each thread's rows sharing the x it loaded).
# Block headers in 16-byte loads (vector_header) for Q4_K at every rows_per_thread and for a Q5_K
# gate beside a Q8_0 up (which has none).
GATE_UP = [GateUp(T.Q4_K, T.Q4_K), GateUp(T.Q5_K, T.Q8_0),
           *(GateUp(T.Q4_K, T.Q4_K, r) for r in ROWS_PER_THREAD), GateUp(T.Q5_K, T.Q8_0, 2),
           *(GateUp(T.Q4_K, T.Q4_K, r, 1) for r in ROWS_PER_THREAD), GateUp(T.Q5_K, T.Q8_0, 2, 1)]
DOWN = [Down(T.Q6_K), Down(T.Q4_K), Down(T.Q8_0), Down(Q6_K_PLANAR),  # planar: q6_k_layout="planar"
        *(Down(t, r) for t in (T.Q6_K, T.Q4_K) for r in ROWS_PER_THREAD), Down(Q6_K_PLANAR, 4),
        *(Down(T.Q4_K, r, 1) for r in ROWS_PER_THREAD)]


def kernels_module() -> tvm.IRModule:
    return module(*(case.func() for case in (*GATE_UP, *DOWN)))


@pytest.fixture(scope="module")
def source() -> str:
    return cuda_source(kernels_module())


@pytest.mark.parametrize("case", [*GATE_UP, *DOWN], ids=lambda c: c.symbol)
def test_lowers_to_warp_reductions_reading_ids_on_device(
    source: str, case: GateUp | Down
) -> None:
    body = kernel_body(source, case.symbol)
    assert "__shfl_down_sync" in body
    assert "ids_ptr[" in body
    # A register cache indexed by a runtime value would live in local memory (stack).
    assert not re.search(r"_local_ptr\[[^\]]*(threadIdx|blockIdx|ids_ptr)", body)
    # One write per output element, after the lanes' allreduce.
    out = "act_ptr" if isinstance(case, GateUp) else "h_out_ptr"
    assert body.count(f"{out}[") == 1


def test_q4_k_weights_load_16_bytes_at_a_time(source: str) -> None:
    body = kernel_body(source, GATE_UP[0].symbol)
    assert "*(uint4*)(Wg_ptr" in body and "*(uint4*)(Wu_ptr" in body
    assert "*(float4*)(x_ptr" in body


def test_planar_q6_k_down_loads_16_bytes_at_a_time(source: str) -> None:
    planar = kernel_body(source, Down(Q6_K_PLANAR).symbol)
    assert re.search(r"\*\(uint4\*\)\(Wd_local_ptr \+ \d+\) = \*\(uint4\*\)\(Wd_ptr", planar)
    assert "*(uint4*)(Wd_ptr" not in kernel_body(source, Down(T.Q6_K).symbol)  # GGUF Q6_K: 16-bit loads


# The dense Qwen3 FFN runs through the MoE kernels with one expert (E = KU = 1).
@pytest.mark.parametrize("ggml_type", [T.Q4_K, T.Q6_K, T.Q8_0, T.F16, T.BF16, T.F32], ids=lambda t: t.name)
def test_down_residual_schedules_one_expert(ggml_type: T) -> None:
    symbol = M.moe_down_residual_symbol(ggml_type, 1, 1, H, I)
    func = scheduled(M.moe_down_residual, "moe", ggml_type, 1, 1, H, I)
    body = kernel_body(cuda_source(module(func)), symbol)
    assert "__shfl_down_sync" in body
    assert body.count("h_out_ptr[") == 1


def test_default_lanes_split_every_reduction_without_idle_lanes() -> None:
    assert default_knobs(SM_90, (32, 32), KU * I, 36).lanes == 32  # Q4_K gate and up
    assert default_knobs(SM_90, (32, 64), KU * I, 44).lanes == 32  # Q5_K gate, Q8_0 up
    assert default_knobs(SM_90, (8 * 6,), H, 105) == MoeKnobs(lanes=16, rows=8, rows_per_thread=1, unroll=256,
                                                                 vector_header=0)  # Q6_K down
    assert default_knobs(SM_90, (12,), H, 36).rows == 32


def test_default_rows_per_thread_leave_two_blocks_an_sm_and_few_registers() -> None:
    """As many rows a thread (up to 4) as leave 256 blocks on the H200's 132 SMs and keep a
    thread's weight bytes a chunk within THREAD_CHUNK_BYTES."""
    assert [chunk_bytes(gemv_format(t)) for t in (T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0)] == [36, 44, 105, 34]
    # gate/up: 8 x 768 rows, 4 a block at rows_per_thread 1: 1536 blocks, 384 at 4.
    assert default_knobs(SM_90, (32, 32), KU * I, 36) == MoeKnobs(lanes=32, rows=4, rows_per_thread=4, unroll=256,
                                                                     vector_header=0)
    assert default_knobs(SM_90, (32, 64), KU * I, 44).rows_per_thread == 2  # 4 x 44 bytes: too many
    # Q4_K down: 2048 rows, 4 a block: 512 blocks, 256 at 2.
    assert default_knobs(SM_90, (8 * 12,), H, 36) == MoeKnobs(lanes=32, rows=4, rows_per_thread=2, unroll=256,
                                                                   vector_header=0)
    # Q6_K down: 256 blocks already, and 2 x 105 bytes a chunk would take ~130-170 registers.
    assert default_knobs(SM_90, (8 * 6,), H, 105).rows_per_thread == 1
    assert default_knobs(arch_facts("sm_121"), (8 * 6,), H, 105).rows_per_thread == 1


def test_vector_header_loads_each_block_header_in_16_bytes(source: str) -> None:
    """With vector_header, a Q4_K row-chunk's scale decoders read registers filled by one
    16-byte load (Wg_local / Wd_local copies of 4 words), not the weights' words one by one."""
    for case in (GateUp(T.Q4_K, T.Q4_K, 2, 1), Down(T.Q4_K, 2, 1)):
        body = kernel_body(source, case.symbol)
        weight = "Wg" if isinstance(case, GateUp) else "Wd"
        plain = kernel_body(source, dataclasses.replace(case, vector_header=0).symbol)
        assert not re.search(rf"\b{weight}_ptr\[", body) and re.search(rf"\b{weight}_ptr\[", plain)
        assert body.count(f"*(uint4*)({weight}_ptr") > plain.count(f"*(uint4*)({weight}_ptr")


def test_rows_per_thread_share_each_chunk_of_x(source: str) -> None:
    """A thread's rows read the chunk of x it loaded once: the x loads do not grow with the
    rows, the weight loads do."""
    bodies = {r: kernel_body(source, GateUp(T.Q4_K, T.Q4_K, r).symbol) for r in ROWS_PER_THREAD}
    for r, body in bodies.items():
        assert body.count("*(float4*)(x_ptr") == bodies[1].count("*(float4*)(x_ptr") > 0
        assert body.count("*(uint4*)(Wg_ptr") == r * bodies[1].count("*(uint4*)(Wg_ptr") > 0


@needs_nvcc
@pytest.mark.parametrize("arch", CUDA_ARCHS)
def test_nvcc_compiles_for(source: str, arch: str) -> None:
    assert_nvcc_compiles(arch, source)


gpu = gpu_fixture("moe", kernels_module)


def abs_gemv(t: T, data: np.ndarray, ids: np.ndarray, x: np.ndarray) -> np.ndarray:
    """|W[ids[s]]| . |x(s)|: the scale of an fp32 dot product's rounding error."""
    xs = x if x.ndim == 2 else np.broadcast_to(x, (len(ids), x.shape[-1]))
    rows, k = data.shape[1], x.shape[-1]
    w = [np.abs(dequantize_rows(t, data[e], k)).astype(np.float64) for e in ids]
    return np.stack([we @ np.abs(xi) for we, xi in zip(w, xs)])


def run_gpu(gpu: Gpu, symbol: str, out_shape: tuple[int, ...], *arrays: np.ndarray) -> np.ndarray:
    """Run on the inputs `arrays` into a NaN-poisoned float32 output."""
    out = gpu.poisoned(out_shape)
    gpu(symbol, *(gpu.tensor(a) for a in arrays), out)
    return out.numpy()


@pytest.mark.parametrize("case", GATE_UP, ids=lambda c: c.symbol)
def test_gate_up_silu_on_gpu_matches_numpy(gpu: Gpu, case: GateUp) -> None:
    rng = np.random.default_rng(20261127)
    gate = random_weights(case.type_gate, (E, I, H), rng)
    up = random_weights(case.type_up, (E, I, H), rng)
    ids = rng.choice(E, KU, replace=False).astype(np.int32)
    x = rng.standard_normal(H, dtype=np.float32)
    weights = weight_view(case.type_gate, gate), weight_view(case.type_up, up)
    act = run_gpu(gpu, case.symbol, (KU, I), *weights, ids, x)
    ref = M.moe_gate_up_silu_reference(case.type_gate, gate, case.type_up, up, ids, x)
    g = gemv_experts_reference(case.type_gate, gate, ids, x)
    u = gemv_experts_reference(case.type_up, up, ids, x)
    with np.errstate(over="ignore"):
        magnitude = (
            1.1 * np.abs(u) * abs_gemv(case.type_gate, gate, ids, x)
            + np.abs(silu(g)) * abs_gemv(case.type_up, up, ids, x)
            + np.abs(ref)
        )
    assert_gemv_close(act, ref, magnitude)


@pytest.mark.parametrize("case", DOWN, ids=lambda c: c.symbol)
def test_down_residual_on_gpu_matches_numpy(gpu: Gpu, case: Down) -> None:
    rng = np.random.default_rng(20261128)
    down = random_weights(case.ggml_type, (E, H, I), rng)
    ids = rng.choice(E, KU, replace=False).astype(np.int32)
    weights = rng.dirichlet(np.ones(KU)).astype(np.float32)
    act = rng.standard_normal((KU, I), dtype=np.float32)
    h = rng.standard_normal(H, dtype=np.float32)
    w_down = weight_view(case.ggml_type, down)
    h_out = run_gpu(gpu, case.symbol, (H,), w_down, ids, weights, act, h)
    ref = M.moe_down_residual_reference(case.ggml_type, down, ids, weights, act, h)
    magnitude = np.abs(h) + weights.astype(np.float64) @ abs_gemv(case.ggml_type, down, ids, act)
    assert_gemv_close(h_out, ref, magnitude)


if __name__ == "__main__":
    main(__doc__, "moe", kernels_module)
