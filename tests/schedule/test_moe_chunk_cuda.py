"""The T-token step's grouped expert GEMM on CUDA, float32 operands (schedule/prefill_cuda.py
GroupedGemmCudaRule) and float16 operands on tensor cores (GroupedGemmF16CudaRule,
GroupedGateUpSiluF16CudaRule): codegen (the weights decoded into shared-memory tiles, the
multiply-adds reading shared memory only, or WMMA fragments loaded from it), nvcc for every
arch, and on a GPU the Qwen3-30B-A3B shapes (128 experts, top 8, H 2048, I 768) for chunks of
128 and 512 tokens against the numpy references (on GPU machines the library comes prebuilt:
`python -m tests.gpu_prebuild`)."""

import functools
import re
from dataclasses import dataclass

import numpy as np
import pytest
import tvm
from gguf import GGMLQuantizationType as T

from sparkinfer.kernels import gemv, moe_chunk
from sparkinfer.kernels.testing import assert_gemv_close, random_weights
from sparkinfer.schedule.arch import arch_facts
from sparkinfer.schedule.prefill_cuda import (
    GroupedF16Knobs,
    GroupedGemmCudaRule,
    GroupedGemmF16CudaRule,
    _GroupedGemmF16CudaRule,
)
from sparkinfer.schedule.space import kernel_use, rule_for, schedule_kernel

from cuda_testutil import (
    CUDA_ARCHS,
    Gpu,
    assert_nvcc_compiles,
    cuda_source,
    default_knobs_with,
    gpu_fixture,
    gpu_only,
    kernel_body,
    main,
    module,
    needs_nvcc,
    scheduled,
)

E, KU, H, I = 128, 8, 2048, 768
CHUNKS = (128, 512)  # tokens a chunk: 1024 and 4096 sorted rows
SHARED_BYTES = 48 * 1024  # static shared memory a block may declare


@dataclass(frozen=True)
class Case:
    ggml_type: T
    gather: bool  # gate / up (x rows gathered by token) or down (x in sorted-row order)
    n_tokens: int

    @property
    def rows(self) -> int:
        return self.n_tokens * KU

    @property
    def n(self) -> int:
        return I if self.gather else H

    @property
    def k(self) -> int:
        return H if self.gather else I

    @property
    def x_rows(self) -> int:
        return self.n_tokens if self.gather else self.rows

    @property
    def args(self) -> tuple:
        return (self.ggml_type, E, self.rows, self.n, self.k, self.x_rows, self.gather)

    @property
    def symbol(self) -> str:
        return moe_chunk.grouped_gemm_symbol(self.ggml_type, E, self.rows, self.n, self.k, self.gather)

    def func(self) -> tvm.tirx.PrimFunc:
        return scheduled(moe_chunk.grouped_gemm, "moe_chunk", *self.args)


# Q4_K_M's own (Q4_K gate/up, Q6_K or Q4_K down) and Q8_0 (K tiles of 32-weight blocks).
CASES = [Case(t, gather, nt) for nt in CHUNKS
         for t, gather in ((T.Q4_K, True), (T.Q8_0, True), (T.Q6_K, False), (T.Q4_K, False), (T.Q8_0, False))]
# The planar Q6_K down (q6_k_layout="planar") at the size the emulator runs.
CASES.append(Case(gemv.Q6_K_PLANAR, False, CHUNKS[0]))


@dataclass(frozen=True)
class F16Case:
    """The float16-operand forms: gate, up and SiLU in one kernel (two types), or the down, at
    the full size or at a small one (experts, hidden, FFN width, top-k) the emulator runs; with
    the factory's row tile and the rule's default knobs, or an explicit row tile and knobs
    (`GroupedF16Knobs` fields; the kernel's symbol then tagged with them, so that variants of
    one kernel share a module)."""

    ggml_types: tuple[T, ...]
    n_tokens: int
    shape: tuple[int, int, int, int] = (E, H, I, KU)
    row_tile: int | None = None
    knobs: tuple[tuple[str, int], ...] = ()

    @property
    def gate_up(self) -> bool:
        return len(self.ggml_types) == 2

    @property
    def experts(self) -> int:
        return self.shape[0]

    @property
    def rows(self) -> int:
        return self.n_tokens * self.shape[3]

    @property
    def n(self) -> int:
        return self.shape[2] if self.gate_up else self.shape[1]

    @property
    def k(self) -> int:
        return self.shape[1] if self.gate_up else self.shape[2]

    @property
    def symbol(self) -> str:
        tag = "".join(f"_{name}{value}" for name, value in self.knobs)
        return moe_chunk.grouped_gemm_f16_symbol(self.ggml_types, self.experts, self.rows, self.n, self.k) + tag

    @property
    def factory_args(self) -> tuple:
        factory = moe_chunk.grouped_gate_up_silu_f16 if self.gate_up else moe_chunk.grouped_gemm_f16
        tail = (self.n_tokens,) if self.gate_up else ()
        tile = () if self.row_tile is None else (self.row_tile,)
        return factory, (*self.ggml_types, self.experts, self.rows, self.n, self.k, *tail, *tile)

    @property
    def tile(self) -> int:
        return moe_chunk.f16_row_tile(self.rows, self.experts) if self.row_tile is None else self.row_tile

    def rule_knobs(self) -> GroupedF16Knobs:
        factory, args = self.factory_args
        return default_knobs_with(factory, "moe_chunk", *args, **dict(self.knobs))

    def func(self) -> tvm.tirx.PrimFunc:
        factory, args = self.factory_args
        return scheduled(factory, "moe_chunk", *args, knobs=self.rule_knobs()).with_attr("global_symbol", self.symbol)


# Q4_K_M's: Q4_K gate and up, Q6_K or Q4_K down; and the same kernels at a size the emulator
# runs in seconds (12 experts, top 2, 256 wide: 4 output tiles, a crowded expert's 2 row tiles).
HALF_KINDS = ((T.Q4_K, T.Q4_K), (T.Q6_K,), (T.Q4_K,))
SMALL = (12, 256, 256, 2)
F16_CASES = [F16Case(types, nt) for nt in CHUNKS for types in HALF_KINDS] + [
    F16Case(types, 48, SMALL) for types in ((T.Q4_K, T.Q6_K), (T.Q6_K,), (T.Q4_K,), (gemv.Q6_K_PLANAR,))]
# Other knob values and the 64-row tile, small: 80 tokens (the crowded expert's 72 rows two
# 64-row tiles), each row tile dealt over one to eight blocks, one to four warps along it,
# K tiles of 64 to 256, the weights decoded by word runs (the default) or by runs of 8. (Gate/up
# at 64 rows with K tiles of 64, 36 KiB static + 27 KiB dynamic, cannot launch: outside the space.)
F16_CASES += [
    F16Case((T.Q4_K, T.Q6_K), 80, SMALL, 64, (("row_splits", 8), ("warps_m", 4), ("k_tile", 128))),
    F16Case((T.Q4_K, T.Q4_K), 48, SMALL, 32, (("row_splits", 1), ("warps_m", 1), ("k_tile", 64), ("word_runs", 0))),
    F16Case((T.Q6_K,), 80, SMALL, 64, (("row_splits", 4), ("warps_m", 1), ("k_tile", 256))),
    F16Case((T.Q4_K,), 48, SMALL, 32, (("row_splits", 8), ("warps_m", 2), ("k_tile", 128), ("word_runs", 0))),
    # sm_90.json's knobs of the 2048-token step's downs (bench/NOTES.md, session 13)
    F16Case((gemv.Q6_K_PLANAR,), 80, SMALL, 64, (("row_splits", 2), ("warps_m", 4), ("k_tile", 256))),
    F16Case((T.Q4_K,), 80, SMALL, 64, (("row_splits", 2), ("warps_m", 2), ("k_tile", 64))),
]


def kernels_module() -> tvm.IRModule:
    return module(*(case.func() for case in CASES), *(case.func() for case in F16_CASES))


@pytest.fixture(scope="module")
def source() -> str:
    return cuda_source(kernels_module())


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.symbol)
def test_weights_decode_once_into_shared_memory(source: str, case: Case) -> None:
    body = kernel_body(source, case.symbol)
    shared = dict(re.findall(r"__shared__ alignas\(\d+\) float (\w+)_shared_ptr\[(\d+)\]", body))
    # (TVM's storage rewrite may place the x tile in the mins' buffer of a format without mins)
    assert {"sc", "wt"} <= set(shared) <= {"sc", "mn", "wt", "xs"}
    assert 4 * sum(map(int, shared.values())) <= SHARED_BYTES
    # The multiply-add reads the x tile and the weight tile from shared memory and nothing
    # else: no weight decoded (no w_ptr) and no x row gathered in the FMA loop.
    fmas = re.findall(r"acc_ptr\[\d+\] = \(acc_ptr\[\d+\] \+[^;]*;", body)
    assert len(fmas) == GroupedGemmCudaRule.THREAD_ROWS * GroupedGemmCudaRule.X_RUN
    for fma in fmas:
        assert "wt_shared_ptr[" in fma and fma.count("_shared_ptr[") == 2
        assert "w_ptr" not in fma and "x_ptr" not in fma
    # The weight tile [output, k] and the x tile [row, k], rows padded by a 16-byte run.
    padded = moe_chunk.K_TILE + GroupedGemmCudaRule.X_RUN
    assert int(shared["wt"]) == moe_chunk.TILE_N * padded
    assert int(shared.get("xs", moe_chunk.ROW_BLOCK * padded)) == moe_chunk.ROW_BLOCK * padded
    # A thread's accumulators are its own registers: indexed by constants, not by a thread.
    assert f"float acc_ptr[{GroupedGemmCudaRule.THREAD_ROWS}];" in body
    assert not re.search(r"acc_ptr\[[^\]]*threadIdx", body)
    # y per accumulator: one read (the earlier K tiles' partial sums), one guarded write.
    assert body.count("y_ptr[") == 2 * GroupedGemmCudaRule.THREAD_ROWS
    assert "__syncthreads()" in body
    assert "= *(float4*)(x_ptr + " in body  # the x rows staged 16 bytes a thread at once


@needs_nvcc
@pytest.mark.parametrize("arch", CUDA_ARCHS)
def test_nvcc_compiles_for(source: str, arch: str) -> None:
    assert_nvcc_compiles(arch, source)


# K tiles under K_TILE (k = 96: 32-weight tiles, whose x rows the threads copy 16 bytes at a
# time; k = 16: one float per thread) and row counts off every block size.
@needs_nvcc
@pytest.mark.parametrize("args", [(T.Q8_0, 3, 20, 48, 96, 20, False), (T.F32, 2, 12, 32, 16, 4, True)],
                         ids=["q8_0_k96", "f32_k16"])
def test_short_k_tiles_compile(args: tuple) -> None:
    source = cuda_source(module(scheduled(moe_chunk.grouped_gemm, "moe_chunk", *args)))
    assert ("float4" in source) == (args[4] == 96)
    assert_nvcc_compiles("sm_90", source)


@pytest.mark.parametrize("case", F16_CASES, ids=lambda c: c.symbol)
def test_f16_forms_multiply_on_tensor_cores_from_shared_tiles(source: str, case: F16Case) -> None:
    body = kernel_body(source, case.symbol)
    knobs = case.rule_knobs()
    weights = len(case.ggml_types)
    # the accumulators: WMMA fragments, a warp's share of the gate and up tiles
    warps = knobs.warps_m * GroupedGemmF16CudaRule.WARPS_N
    per_warp = weights * case.tile * moe_chunk.F16_TILE_N // (16 * 16 * warps)
    assert f"fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc_wmma_accumulator_ptr[{per_warp}]" in body
    assert f"__launch_bounds__({32 * warps})" in source.split(f"{case.symbol}_kernel(")[-2].rsplit("\n", 1)[-1]
    assert body.count("nvcuda::wmma::fill_fragment(") == 1
    assert body.count("nvcuda::wmma::mma_sync(") == 1  # in loops over the warp's fragments
    # fragments loaded from the K tiles in dynamic shared memory only (x rows as float16, the
    # decoded weights), their rows padded by 8 halves: a fragment's 16 rows on other banks
    loads = re.findall(r"nvcuda::wmma::load_matrix_sync\([^;]*;", body)
    assert loads and all("buf_dyn_shmem_ptr)[" in load and load.endswith(f", {knobs.k_tile + 8});")
                         for load in loads)
    assert "= *(float4*)(x_ptr + " in body  # the x rows staged 16 bytes a thread at once
    # the scales, mins and sums static (TVM may lay the sums over the mins), under 48 KiB
    static = dict(re.findall(r"__shared__ alignas\(\d+\) float (\w+)_shared_ptr\[(\d+)\]", body))
    assert "sc" in static and set(static) <= {"acc", "sc", "mn"}
    assert 4 * sum(map(int, static.values())) <= SHARED_BYTES
    assert 4 * max(map(int, static.values())) >= 4 * weights * case.tile * moe_chunk.F16_TILE_N
    # a crowded expert's row tiles dealt over row_splits blocks (blockIdx.y), or one block's loop
    assert ("blockIdx.y" in body) == (knobs.row_splits > 1)
    # after the sums reach shared memory, one output store, behind a test of the expert's row count
    out = "act_ptr[" if case.gate_up else "y_ptr["
    epilogue = body[body.rindex("store_matrix_sync("):]
    assert body.count(out) == 1 and "< (offsets_ptr[" in epilogue.split(out)[0]


def test_f16_defaults_split_crowded_experts_and_launch() -> None:
    """The defaults: 64-row tiles at 512 tokens, dealt over 4 blocks for gate/up (12 output
    tiles) and 2 for the downs (32), 32-row tiles over 2 at 128; a warp per 16 rows; the largest
    K tile up to 128 whose shared memory a launch allows: within 48 KiB, or 48 KiB or more of it
    dynamic (session 9: gate/up at 128 tokens with 128-wide K tiles, 18 KiB static + 42.5 KiB
    dynamic, and the downs at 512, failed to launch on an H100). Every K tile of the space
    launches, by the rule's estimate and by the lowered kernel's sizes (check_shared_memory)."""
    from sparkinfer.compiler.targets import check_shared_memory

    for arch in ("sm_90", "sm_120"):
        facts = arch_facts(arch)
        for case in (c for c in F16_CASES if c.shape != SMALL):
            factory, args = case.factory_args
            use = kernel_use("moe_chunk", factory.__name__, *args)
            rule = rule_for(use, facts)
            assert isinstance(rule, _GroupedGemmF16CudaRule)
            knobs = rule.default(use, facts)
            splits = 4 if case.n_tokens == 512 and case.gate_up else 2
            assert (case.tile, knobs.row_splits) == ((64 if case.n_tokens == 512 else 32), splits)
            assert (knobs.warps_m, knobs.word_runs) == (case.tile // 16, 1)
            space = rule.space(use, facts)
            assert knobs.k_tile == max(t for t in space["k_tile"] if t <= 128)
            assert all(rule.launches(use, GroupedF16Knobs(1, 1, t, 1), facts) for t in space["k_tile"])
            check_shared_memory(tvm.IRModule({"k": schedule_kernel(factory(*args), use, facts, knobs)}), arch)


@needs_nvcc
def test_f16_k_under_the_k_tiles_compiles() -> None:
    """k = 96: no K tile of the space divides it, so the K tiles are 32 weights (one Q8_0
    block a row)."""
    args = (T.Q8_0, 2, 12, 64, 96)
    use = kernel_use("moe_chunk", "grouped_gemm_f16", *args)
    assert rule_for(use, arch_facts("sm_90")).space(use, arch_facts("sm_90"))["k_tile"] == (32,)
    assert_nvcc_compiles("sm_90", cuda_source(module(scheduled(moe_chunk.grouped_gemm_f16, "moe_chunk", *args))))


gpu = gpu_fixture("moe_chunk", kernels_module)


@functools.cache
def expert_weights(ggml_type: T, n: int, k: int, experts: int = E) -> np.ndarray:
    return random_weights(ggml_type, (experts, n, k), np.random.default_rng(20261205 + n))


def chunk_assignment(n_tokens: int, rng: np.random.Generator, experts: int = E, used: int = KU,
                     n_many: int = 72) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, row_token) of a chunk whose last 3 tokens are padding (so 3 * used rows past
    offsets[E]), in which experts 0-3 have no row, expert 4 has n_many (72 > 64: several row
    blocks of a tile) and the rest draw uniformly."""
    ids = np.empty((n_tokens, used), np.int32)
    for t in range(n_tokens):
        forced = [4] if t < n_many else []
        ids[t] = forced + list(rng.choice(np.arange(5, experts), used - len(forced), replace=False))
    offsets, row_token, _ = moe_chunk.moe_sort_reference(ids, n_tokens - 3, experts)
    counts = np.diff(offsets)
    assert (counts[:4] == 0).all() and counts[4] == n_many
    return offsets, row_token


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.symbol)
def test_grouped_gemm_on_gpu_matches_numpy(gpu: Gpu, case: Case) -> None:
    if case.n_tokens > CHUNKS[0]:
        gpu_only(gpu, "4096 rows take ~20 s each on the CPU; the 1024-row cases run the same kernels")
    rng = np.random.default_rng(20261206 + case.rows)
    data = expert_weights(case.ggml_type, case.n, case.k)
    offsets, row_token = chunk_assignment(case.n_tokens, rng)
    x = rng.standard_normal((case.x_rows, case.k), dtype=np.float32)
    y = gpu.poisoned((case.rows, case.n))
    gpu(case.symbol, gpu.tensor(gemv.weight_view(case.ggml_type, data)), gpu.tensor(offsets),
        gpu.tensor(row_token), gpu.tensor(x), y)
    got = y.numpy()
    want, magnitude = moe_chunk.grouped_gemm_reference(case.ggml_type, data, offsets, row_token, x, case.gather)
    assert_gemv_close(got[:offsets[-1]], want, magnitude)
    assert np.isnan(got[offsets[-1]:]).all(), "a row past offsets[E] was written"


@pytest.mark.parametrize("case", F16_CASES, ids=lambda c: c.symbol)
def test_f16_forms_on_gpu_match_numpy_on_half_operands(gpu: Gpu, case: F16Case) -> None:
    if case.shape != SMALL:
        gpu_only(gpu, "the full-size experts take minutes on the CPU; the small cases run the same schedule")
    rng = np.random.default_rng(20261207 + case.rows)
    datas = [expert_weights(t, case.n, case.k, case.experts) for t in case.ggml_types]
    # the crowded expert: 72 rows (3 32-row tiles or 2 64-row ones, the last partial), or 40 of
    # a small chunk of 48 tokens (2)
    offsets, row_token = chunk_assignment(case.n_tokens, rng, case.experts, case.shape[3],
                                          min(72, case.n_tokens - 8))
    x_rows = case.n_tokens if case.gate_up else case.rows
    x = rng.standard_normal((x_rows, case.k), dtype=np.float32)
    out = gpu.poisoned((case.rows, case.n))
    weights = [gpu.tensor(gemv.weight_view(t, data)) for t, data in zip(case.ggml_types, datas)]
    if case.gate_up:
        gpu(case.symbol, *weights, gpu.tensor(offsets), gpu.tensor(row_token), gpu.tensor(x), out)
        want, magnitude = moe_chunk.grouped_gate_up_silu_reference(
            *zip(case.ggml_types, datas), offsets, row_token, x)
    else:
        gpu(case.symbol, *weights, gpu.tensor(offsets), gpu.tensor(x), out)
        want, magnitude = moe_chunk.grouped_gemm_reference(case.ggml_types[0], datas[0], offsets, row_token, x,
                                                           False, half_operands=True)
    got = out.numpy()
    assert_gemv_close(got[:offsets[-1]], want, magnitude)
    assert np.isnan(got[offsets[-1]:]).all(), "a row past offsets[E] was written"


if __name__ == "__main__":
    main(__doc__, "moe_chunk", kernels_module)
