"""CUDA builds of the T-token step's kernels (schedule/prefill_cuda.py), no GPU needed: every
chunk kernel at the full-size Qwen3-30B-A3B shapes takes its registered CUDA rule, and one module
of them all compiles with nvcc for each arch; the row kernels given the decode kernels' schedules
make one kernel each. (Numbers on a GPU: bench/NOTES.md.)"""

import numpy as np
import pytest
import tvm
from gguf import GGMLQuantizationType as T

from sparkinfer.compiler import targets
from sparkinfer.kernels import gemm, moe_chunk, norm, prefill_attention, router
from sparkinfer.kernels.gemv import Q6_K_PLANAR, dequantize_rows, weight_view
from sparkinfer.kernels.testing import assert_gemv_close, random_weights, rope_angle_error_bound
from sparkinfer.reference.qwen3moe import rms_norm
from sparkinfer.kernels.use import kernel_factory
from sparkinfer.schedule.arch import arch_facts
from sparkinfer.schedule.prefill_cuda import GemmCudaRule, GemmKnobs
from sparkinfer.schedule.space import kernel_use, rule_for

from cuda_testutil import (
    CUDA_ARCHS,
    Gpu,
    assert_nvcc_compiles,
    cuda_source,
    gpu_fixture,
    kernel_body,
    kernel_definition,
    main,
    module,
    needs_nvcc,
    scheduled,
)

NT = 128  # a chunk
# Qwen3-30B-A3B: hidden 2048, 32/4 heads of 128, 128 experts top-8 of 768, vocab 151936
H, NH, NKV, D, E, KU, I, P, MP = 2048, 32, 4, 128, 128, 8, 768, 64, 640
CASES = [
    ("gemm", "gemm", (T.Q4_K, NT, NH * D, H)),
    ("gemm", "gemm", (T.Q6_K, NT, NKV * D, H)),
    ("gemm", "gemm", (T.F32, NT, E, H)),
    ("gemm", "gemm", (T.Q4_K, NT, NH * D, H, True)),
    ("gemm", "gemm", (T.Q6_K, NT, NKV * D, H, True)),
    ("embedding", "embedding_rows", (T.Q4_K, 151936, H, NT)),
    ("norm", "rms_norm_rows", (NT, H, 1e-6)),
    ("norm", "add_rms_norm_rows", (NT, H, 1e-6)),
    ("router", "router_topk_rows", (NT, E, KU)),
    ("prefill_attention", "qk_norm_rope_kv_append_rows", (NT, NH, NKV, D, P, MP, 1e-6, 1e6)),
    ("prefill_attention", "causal_prefill_attention", (NT, NH, NKV, D, P, MP)),
    ("moe_chunk", "moe_sort", (NT, E, KU)),
    ("moe_chunk", "grouped_gemm", (T.Q4_K, E, NT * KU, I, H, NT, True)),
    ("moe_chunk", "grouped_gemm", (T.Q6_K, E, NT * KU, H, I, NT * KU, False)),
    ("moe_chunk", "silu_mul", (NT * KU, I)),
    ("moe_chunk", "grouped_gate_up_silu_f16", (T.Q4_K, T.Q4_K, E, NT * KU, I, H, NT)),
    ("moe_chunk", "grouped_gemm_f16", (T.Q6_K, E, NT * KU, H, I)),
    ("moe_chunk", "moe_combine_residual", (NT, KU, NT * KU, H)),
    ("chunk", "take_row", (NT, H)),
    ("chunk", "advance_chunk", ()),
    ("chunk", "advance_pos", ()),
]


def chunk_module(arch: str) -> tvm.IRModule:
    funcs = {}
    for i, (family, factory, args) in enumerate(CASES):
        assert rule_for(kernel_use(family, factory, *args), arch_facts(arch)).target_kind == "cuda"
        func = scheduled(kernel_factory(family, factory), family, *args, arch=arch)
        funcs[f"k{i}_{factory}"] = func.with_attr("global_symbol", f"k{i}_{factory}")
    return tvm.IRModule(funcs)


@pytest.mark.parametrize("arch", CUDA_ARCHS)
def test_every_chunk_kernel_has_a_cuda_rule_and_compiles(arch: str) -> None:
    source = targets.cuda_source(chunk_module(arch), arch)
    for i, (_, factory, _) in enumerate(CASES):
        assert f"k{i}_{factory}_kernel(" in source


@pytest.mark.parametrize("factory", ["rms_norm_rows", "add_rms_norm_rows", "router_topk_rows",
                                     "qk_norm_rope_kv_append_rows", "moe_combine_residual", "moe_sort"])
def test_row_kernels_and_the_sort_are_one_kernel_each(factory: str) -> None:
    source = cuda_source(module(row_kernel(factory)))
    assert source.count("__global__") == 2  # declaration + definition of the one kernel
    assert f"{factory}_kernel_1" not in source


def test_moe_sort_runs_a_thread_per_chunk_within_static_shared_memory() -> None:
    """A 512-token chunk's sort: its chunks' passes on 64 threads of one block, the staged
    experts and both [E, C] matrices in under 48 KiB of static shared memory (no opt-in)."""
    mod = module(row_kernel("moe_sort"))
    chunks = -(-4 * NT // moe_chunk.sort_chunk_tokens(4 * NT, E, KU))
    assert chunks == 64
    assert f"if (((int)threadIdx.x) < {chunks})" in cuda_source(mod)
    static, dynamic = targets.shared_memory_bytes(mod, "sm_90")["moe_sort_kernel"]
    assert dynamic == 0 and static <= 48 * 1024
    static, dynamic = targets.shared_memory_bytes(module(long_sort()), "sm_90")["moe_sort_long_kernel"]
    assert dynamic == 0 and 40 * 1024 < static <= 48 * 1024  # (the experts staged a byte each)


@pytest.mark.parametrize(("n_tokens", "n_experts", "n_used"),
                         [(2048, 4, 2), (2048, 128, 8), (512, 128, 8), (300, 60, 4)])
def test_moe_sort_shared_memory_is_what_its_chunking_counts(n_tokens: int, n_experts: int, n_used: int) -> None:
    """sort_chunk_tokens picks the chunks by sort_shared_bytes: it must be the built kernel's
    static shared memory, padding included (the shipped model's 2048-token sort, 4 experts,
    came to 65604 B when the chunking left the runs' padding out)."""
    chunk_tokens = moe_chunk.sort_chunk_tokens(n_tokens, n_experts, n_used)
    func = scheduled(moe_chunk.moe_sort, "moe_chunk", n_tokens, n_experts, n_used).with_attr("global_symbol", "sort")
    static, dynamic = targets.shared_memory_bytes(module(func), "sm_90")["sort_kernel"]
    assert (static, dynamic) == (moe_chunk.sort_shared_bytes(n_tokens, n_experts, n_used, chunk_tokens), 0)
    assert static <= moe_chunk.SORT_SHARED_BYTES


@pytest.mark.parametrize("ggml_type", [T.Q4_K, T.Q6_K, Q6_K_PLANAR], ids=lambda t: t.name)
def test_gemm_with_half_operands_runs_on_tensor_cores(ggml_type: T) -> None:
    source = cuda_source(module(scheduled(gemm.gemm, "gemm", ggml_type, NT, NH * D, H, True)))
    assert "wmma::mma_sync" in source and "W_ptr" in source  # the dequantization fused into the loads


@needs_nvcc
@pytest.mark.slow
@pytest.mark.parametrize("arch", CUDA_ARCHS)
def test_chunk_kernels_compile_with_nvcc(arch: str) -> None:
    assert_nvcc_compiles(arch, targets.cuda_source(chunk_module(arch), arch))


# ---- on a GPU: the row kernels that take the decode kernels' schedules, at the full-size shapes,
# against their numpy references (the grouped GEMM and the causal attention have their own files)

EPS, THETA = 1e-6, 1e6
ROW_KERNELS = {
    "rms_norm_rows": ("norm", (NT, H, EPS)),
    "add_rms_norm_rows": ("norm", (NT, H, EPS)),
    "router_topk_rows": ("router", (NT, E, KU)),
    "qk_norm_rope_kv_append_rows": ("prefill_attention", (NT, NH, NKV, D, P, MP, EPS, THETA)),
    "moe_combine_residual": ("moe_chunk", (NT, KU, NT * KU, H)),
    "moe_sort": ("moe_chunk", (4 * NT, E, KU)),  # a 512-token chunk
}


def row_kernel(factory: str) -> tvm.tirx.PrimFunc:
    family, args = ROW_KERNELS[factory]
    return scheduled(kernel_factory(family, factory), family, *args).with_attr("global_symbol", factory)


# A 2048-token chunk's sort: fewer, longer chunks, its staged experts and matrices still in static
# shared memory (moe_chunk.SORT_SHARED_BYTES)
LONG_SORT_TOKENS = 2048


def long_sort() -> tvm.tirx.PrimFunc:
    return scheduled(moe_chunk.moe_sort, "moe_chunk", LONG_SORT_TOKENS, E, KU).with_attr("global_symbol",
                                                                                        "moe_sort_long")


# Q, K (Q6_K) and O's shapes, by their symbols
HALF_GEMMS = {gemm.gemm_symbol(t, NT, n, k, True): (t, NT, n, k, True)
              for t, n, k in ((T.Q4_K, NH * D, H), (T.Q6_K, NKV * D, H), (Q6_K_PLANAR, NKV * D, H),
                              (T.Q4_K, H, NH * D))}


# split-K by knob (GemmKnobs), small enough for the emulator: one row tile padded (16 tokens) over
# 2 splits, and the unsplit form (the 512-token Q's default)
SPLIT_GEMMS = {f"{gemm.gemm_symbol(t, rows, n, k, True)}_split{splits}": ((t, rows, n, k, True), splits)
               for t, rows, n, k, splits in ((T.Q6_K, 16, 128, 512, 2), (T.Q4_K, 128, 256, 512, 1))}


def split_gemm(name: str) -> tvm.tirx.PrimFunc:
    args, splits = SPLIT_GEMMS[name]
    return scheduled(gemm.gemm, "gemm", *args, knobs=GemmKnobs(splits)).with_attr("global_symbol", name)


# float32 weights (the router's): its shape (whole 32 x 128 tiles, 32 splits by default), one
# with a partial tile (12 outputs: dlight's Matmul), and whole tiles unsplit by knob
FLOAT_GEMMS = {gemm.gemm_symbol(T.F32, t, n, k) + ("" if splits is None else f"_split{splits}"): ((T.F32, t, n, k), splits)
               for t, n, k, splits in ((NT, E, H, None), (16, 12, 256, None), (64, E, 256, 1))}


def half_gemm(name: str) -> tvm.tirx.PrimFunc:
    return scheduled(gemm.gemm, "gemm", *HALF_GEMMS[name]).with_attr("global_symbol", name)


def float_gemm(name: str) -> tvm.tirx.PrimFunc:
    args, splits = FLOAT_GEMMS[name]
    knobs = None if splits is None else GemmKnobs(splits)
    return scheduled(gemm.gemm, "gemm", *args, knobs=knobs).with_attr("global_symbol", name)


def kernels_module() -> tvm.IRModule:
    return tvm.IRModule({**{name: row_kernel(name) for name in ROW_KERNELS}, "moe_sort_long": long_sort(),
                         **{name: half_gemm(name) for name in HALF_GEMMS},
                         **{name: split_gemm(name) for name in SPLIT_GEMMS},
                         **{name: float_gemm(name) for name in FLOAT_GEMMS}})


gpu = gpu_fixture("prefill", kernels_module)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261205)


def test_norm_rows_on_gpu_match_numpy(gpu: Gpu, rng: np.random.Generator) -> None:
    x = rng.standard_normal((NT, H), dtype=np.float32)
    r = rng.standard_normal((NT, H), dtype=np.float32)
    w = rng.standard_normal(H, dtype=np.float32)
    y = gpu.poisoned((NT, H))
    gpu("rms_norm_rows", gpu.tensor(x), gpu.tensor(w), y)
    np.testing.assert_allclose(y.numpy(), norm.rms_norm_reference(x, w, EPS), rtol=1e-5, atol=1e-5)
    total, y = gpu.poisoned((NT, H)), gpu.poisoned((NT, H))
    gpu("add_rms_norm_rows", gpu.tensor(x), gpu.tensor(r), gpu.tensor(w), total, y)
    want_total, want_y = norm.add_rms_norm_reference(x, r, w, EPS)
    np.testing.assert_array_equal(total.numpy(), want_total)
    np.testing.assert_allclose(y.numpy(), want_y, rtol=1e-5, atol=1e-5)


def test_router_topk_rows_on_gpu_matches_numpy(gpu: Gpu, rng: np.random.Generator) -> None:
    logits = rng.standard_normal((NT, E), dtype=np.float32)
    logits[7, 5] = logits[7, 90]  # a tie: the lower id wins
    ids, weights = gpu.tensor(np.full((NT, KU), -1, np.int32)), gpu.poisoned((NT, KU))
    gpu("router_topk_rows", gpu.tensor(logits), ids, weights)
    for t in range(NT):
        want_ids, want_w = router.router_topk_reference(logits[t], KU)
        np.testing.assert_array_equal(ids.numpy()[t], want_ids)
        np.testing.assert_allclose(weights.numpy()[t], want_w, rtol=1e-5)


@pytest.mark.parametrize("pos, n_valid", [(0, NT), (700, NT - 3)])
def test_qk_norm_rope_kv_append_rows_on_gpu_matches_numpy(gpu: Gpu, rng: np.random.Generator, pos: int,
                                                          n_valid: int) -> None:
    q = rng.standard_normal((NT, NH * D), dtype=np.float32)
    k = rng.standard_normal((NT, NKV * D), dtype=np.float32)
    v = rng.standard_normal((NT, NKV * D), dtype=np.float32)
    qw, kw = rng.standard_normal(D, dtype=np.float32), rng.standard_normal(D, dtype=np.float32)
    n_pages = 24
    page_table = np.zeros(MP, np.int32)
    page_table[:n_pages] = rng.permutation(n_pages)
    k_cache = rng.standard_normal((n_pages, P, NKV, D)).astype(np.float16)
    v_cache = rng.standard_normal((n_pages, P, NKV, D)).astype(np.float16)
    kc, vc, q_rot = gpu.tensor(k_cache), gpu.tensor(v_cache), gpu.poisoned((NT, NH, D))
    gpu("qk_norm_rope_kv_append_rows", gpu.tensor(q), gpu.tensor(k), gpu.tensor(v), gpu.tensor(qw), gpu.tensor(kw),
        gpu.tensor(np.array([pos], np.int32)), gpu.tensor(np.array([n_valid], np.int32)), gpu.tensor(page_table),
        kc, vc, q_rot)
    want_q, want_k, want_v = prefill_attention.qk_norm_rope_kv_append_rows_reference(
        q, k, v, qw, kw, pos, n_valid, page_table, k_cache, v_cache, EPS, THETA)
    # float32 angles against the oracle's float64 ones: the bound grows with the position
    # (testing.rope_angle_error_bound), per row at its own position
    rows = np.arange(NT)[:, None, None]
    q_bound = rope_angle_error_bound(rms_norm(q.reshape(NT, NH, D), qw, EPS), pos + rows)
    assert (np.abs(q_rot.numpy() - want_q) <= q_bound + 1e-5 * np.abs(want_q) + 1e-6).all()
    k_bound = np.zeros(k_cache.shape)  # untouched slots: bit for bit
    k_normed = rms_norm(k.reshape(NT, NKV, D), kw, EPS)
    for t in range(n_valid):
        page, slot = page_table[(pos + t) // P], (pos + t) % P
        k_bound[page, slot] = (rope_angle_error_bound(k_normed[t], pos + t)
                               + 2.0**-10 * np.abs(want_k[page, slot].astype(np.float64)) + 2.0**-24)
    assert (np.abs(kc.numpy().astype(np.float64) - want_k.astype(np.float64)) <= k_bound).all()
    np.testing.assert_array_equal(vc.numpy(), want_v)


def test_moe_combine_residual_on_gpu_matches_numpy(gpu: Gpu, rng: np.random.Generator) -> None:
    rows, n_valid = NT * KU, NT - 5
    y = rng.standard_normal((rows, H), dtype=np.float32)
    row_of = rng.permutation(rows).astype(np.int32).reshape(NT, KU)
    weights = rng.random((NT, KU)).astype(np.float32)
    h = rng.standard_normal((NT, H), dtype=np.float32)
    out = gpu.poisoned((NT, H))
    gpu("moe_combine_residual", gpu.tensor(y), gpu.tensor(row_of), gpu.tensor(weights), gpu.tensor(h),
        gpu.tensor(np.array([n_valid], np.int32)), out)
    want = h.astype(np.float64).copy()
    want[:n_valid] += np.einsum("tj,tjh->th", weights[:n_valid].astype(np.float64), y[row_of[:n_valid]].astype(np.float64))
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out.numpy()[n_valid:], h[n_valid:])


@pytest.mark.parametrize("name, tokens, n_valid, one_expert",
                         [("moe_sort", 4 * NT, 4 * NT, False), ("moe_sort", 4 * NT, 300, False),
                          ("moe_sort", 4 * NT, 4 * NT, True), ("moe_sort_long", LONG_SORT_TOKENS, 1500, False)])
def test_moe_sort_on_gpu_matches_numpy(gpu: Gpu, rng: np.random.Generator, name: str, tokens: int, n_valid: int,
                                       one_expert: bool) -> None:
    ids = np.stack([rng.choice(E, KU, replace=False) for _ in range(tokens)]).astype(np.int32)
    ids[:40, 0] = 3  # one expert with many rows, and (by chance) some with none
    if one_expert:  # the worst skew: every pair on one expert (its count column reaches T * KU)
        ids[:] = E - 1
    offsets = gpu.tensor(np.full(E + 1, -1, np.int32))
    row_token, row_of = gpu.tensor(np.full(tokens * KU, -1, np.int32)), gpu.tensor(np.full((tokens, KU), -1, np.int32))
    gpu(name, gpu.tensor(ids), gpu.tensor(np.array([n_valid], np.int32)), offsets, row_token, row_of)
    for got, want in zip((offsets, row_token, row_of), moe_chunk.moe_sort_reference(ids, n_valid, E)):
        np.testing.assert_array_equal(got.numpy(), want)


def check_half_gemm(gpu: Gpu, rng: np.random.Generator, name: str, ggml_type: int, rows: int, n: int,
                    k: int) -> None:
    """Kernel `name` (a float16-operand gemm of these sizes) on fresh random inputs against numpy."""
    data = random_weights(ggml_type, (n, k), rng)
    x = rng.standard_normal((rows, k), dtype=np.float32)
    y = gpu.poisoned((rows, n))
    gpu(name, gpu.tensor(weight_view(ggml_type, data)), gpu.tensor(x), y)
    magnitude = np.abs(x).astype(np.float64) @ np.abs(dequantize_rows(ggml_type, data, k)).T
    assert_gemv_close(y.numpy(), gemm.gemm_reference(ggml_type, data, x, half_operands=True), magnitude)


@pytest.mark.parametrize("name", list(HALF_GEMMS))
def test_gemm_with_half_operands_on_gpu_matches_numpy(gpu: Gpu, rng: np.random.Generator, name: str) -> None:
    ggml_type, rows, n, k, _ = HALF_GEMMS[name]
    check_half_gemm(gpu, rng, name, ggml_type, rows, n, k)


@pytest.mark.parametrize("name", list(SPLIT_GEMMS))
def test_gemm_split_k_on_gpu_matches_numpy(gpu: Gpu, rng: np.random.Generator, name: str) -> None:
    (ggml_type, rows, n, k, _), _ = SPLIT_GEMMS[name]
    check_half_gemm(gpu, rng, name, ggml_type, rows, n, k)


def test_gemm_splits_k_while_its_blocks_fit_one_wave() -> None:
    """One 128 x 128 tile a block, one block an SM: K and V (N = 512) of a 512-token chunk are 16
    tiles, O 64, Q 128; a split keeps at least two K tiles of 64."""
    rule = GemmCudaRule()

    def splits(t: int, n: int, k: int, arch: str = "sm_90", ggml_type: T = T.Q4_K) -> int:
        use = kernel_use("gemm", "gemm", ggml_type, t, n, k, True)
        knobs = rule.default(use, arch_facts(arch))
        assert isinstance(knobs, GemmKnobs) and knobs.k_splits in rule.space(use, arch_facts(arch))["k_splits"]
        return knobs.k_splits

    assert [splits(512, n, k) for n, k in ((NH * D, H), (NKV * D, H), (H, NH * D))] == [1, 8, 2]  # Q, K/V, O
    assert splits(512, NKV * D, H, ggml_type=T.Q6_K) == 8
    assert splits(128, NKV * D, H) == 16  # 4 tiles; 32 splits would leave one K tile each
    assert splits(512, NKV * D, H, "sm_121") == 2  # 48 SMs
    assert splits(NT, 151936, H) == 1  # the LM head of `score`
    assert rule.space(kernel_use("gemm", "gemm", T.Q4_K, 128, 512, 256, True), arch_facts("sm_90")) == {"k_splits": (1, 2)}


def test_float_gemm_splits_k_to_about_two_blocks_an_sm() -> None:
    """The router's float32 GEMM: 32-token x 128-output tiles, K split so that the blocks come
    nearest to two an SM; a split keeps at least two K steps of 32; partial tiles: dlight's, unsplit."""
    rule = GemmCudaRule()

    def splits(t: int, arch: str = "sm_90") -> int:
        use = kernel_use("gemm", "gemm", T.F32, t, E, H)
        knobs = rule.default(use, arch_facts(arch))
        assert isinstance(knobs, GemmKnobs) and knobs.k_splits in rule.space(use, arch_facts(arch))["k_splits"]
        return knobs.k_splits

    assert [splits(t) for t in (128, 512, 2048)] == [32, 16, 4]  # 128, 256 and 256 blocks on 132 SMs
    assert [splits(t, "sm_121") for t in (128, 512, 2048)] == [32, 8, 2]  # 48 SMs
    assert rule.space(kernel_use("gemm", "gemm", T.F32, NT, E, 256), arch_facts("sm_90")) == {"k_splits": (1, 2, 4)}
    assert rule.space(kernel_use("gemm", "gemm", T.F32, 16, 12, 256), arch_facts("sm_90")) == {"k_splits": (1,)}


def test_split_k_gemm_sums_the_splits_in_a_second_kernel() -> None:
    """The split tensor-core kernel writes its partial tiles to a workspace (gemm_rf) that a
    second kernel sums into y; unsplit, one kernel writes y."""
    split, whole = (cuda_source(module(scheduled(gemm.gemm, "gemm", T.Q4_K, 512, NKV * D, H, True,
                                                 knobs=GemmKnobs(s)).with_attr("global_symbol", "g")))
                    for s in (8, 1))
    tiles, partials = kernel_body(split, "g"), kernel_definition(split, "g_kernel_1")
    assert "wmma::mma_sync" in tiles and "gemm_rf_ptr" in tiles and "gemm_ptr" not in tiles
    assert "gemm_rf_ptr" in partials and "gemm_ptr[" in partials and "wmma" not in partials
    assert "g_kernel_1" not in whole and "gemm_rf" not in whole


@pytest.mark.parametrize("name", list(FLOAT_GEMMS))
def test_float_gemm_on_gpu_matches_numpy(gpu: Gpu, rng: np.random.Generator, name: str) -> None:
    (ggml_type, rows, n, k), _ = FLOAT_GEMMS[name]
    data = random_weights(ggml_type, (n, k), rng)
    x = rng.standard_normal((rows, k), dtype=np.float32)
    y = gpu.poisoned((rows, n))
    gpu(name, gpu.tensor(weight_view(ggml_type, data)), gpu.tensor(x), y)
    magnitude = np.abs(x).astype(np.float64) @ np.abs(dequantize_rows(ggml_type, data, k)).T
    assert_gemv_close(y.numpy(), gemm.gemm_reference(ggml_type, data, x), magnitude)


def test_float_gemm_tiles_outputs_over_many_blocks() -> None:
    """The router's 128 x 128 x 2048 at a 128-token chunk: 4 tiles of 32 x 128 outputs x 32 K
    splits, 16 outputs a thread in registers, then the kernel summing the splits."""
    name = gemm.gemm_symbol(T.F32, NT, E, H)
    source = cuda_source(module(float_gemm(name)))
    tiles, partials = kernel_body(source, name), kernel_definition(source, f"{name}_kernel_1")
    assert "__launch_bounds__(256)" in source
    assert "__shared__" in tiles and "gemm_rf_local_ptr[16]" in tiles and "gemm_ptr" not in tiles
    assert "gemm_rf_ptr" in partials and "gemm_ptr[" in partials


if __name__ == "__main__":
    main(__doc__, "prefill", kernels_module)
