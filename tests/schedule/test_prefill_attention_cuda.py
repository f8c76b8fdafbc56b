"""The T-token step's causal attention on CUDA (schedule/prefill_cuda.py,
CausalPrefillAttentionCudaRule), the float32 SIMT form and the float16-operand tensor-core forms
(read_ahead, compact, and registers: kernels/prefill_attention.py's
causal_prefill_attention_registers): codegen, nvcc for every arch, and on a GPU (and the CUDA
emulator) the Qwen3-30B-A3B head shapes at chunks of 128 and 512 against numpy (on GPU
machines the library comes prebuilt: `python -m tests.gpu_prebuild`)."""

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tvm

from sparkinfer.compiler import targets
from sparkinfer.errors import SparkInferError
from sparkinfer.kernels import prefill_attention as PA

from cuda_testutil import (
    CUDA_ARCHS,
    Gpu,
    assert_nvcc_compiles,
    cuda_source,
    gpu_fixture,
    gpu_only,
    kernel_body,
    main,
    module,
    needs_nvcc,
    scheduled,
)

# Qwen3-30B-A3B: 32 query heads over 4 KV heads of 128; 64-token pages; 40960-token context.
NH, NKV, D, P, MP = 32, 4, 128, 64, 640
N_PAGES = 40  # room for 700 cached tokens and a 512-token chunk, plus pages never mapped
CHUNKS = (128, 512)


def symbol(n_tokens: int, half: bool = False) -> str:
    return f"causal_prefill_attention_{n_tokens}x{NH}x{NKV}x{D}_p{P}{'_f16' if half else ''}"


# The tiny test models (gguf_file/synth.py "tiny"): 4 query heads over 2 KV heads of 64, a
# 16-token chunk; its tensor-core form is a 64-row tile of 32 queries, half of it padding.
TINY_NH, TINY_NKV, TINY_D, TINY_T = 4, 2, 64, 16


def tiny_symbol(compact: bool = False) -> str:
    return f"causal_prefill_attention_{TINY_T}x{TINY_NH}x{TINY_NKV}x{TINY_D}_p{P}_f16{'_compact' if compact else ''}"


def compact_symbol(n_tokens: int) -> str:
    return f"{symbol(n_tokens, True)}_compact"


def registers_symbol(n_tokens: int, tiny: bool = False) -> str:
    shape = f"{TINY_T}x{TINY_NH}x{TINY_NKV}x{TINY_D}" if tiny else f"{n_tokens}x{NH}x{NKV}x{D}"
    return f"causal_prefill_attention_{shape}_p{P}_f16_registers"


# the step variant attention_form's half-operand forms -> the tiny model's kernel symbol
TINY_FORMS = {"read_ahead": tiny_symbol(), "compact": tiny_symbol(compact=True),
              "registers": registers_symbol(TINY_T, tiny=True)}


def registers_kernel(n_tokens: int, n_heads: int, n_kv_heads: int, head_dim: int) -> tvm.tirx.PrimFunc:
    return scheduled(PA.causal_prefill_attention_registers, "prefill_attention", n_tokens, n_heads, n_kv_heads,
                     head_dim, P, MP)


def kernels_module(chunks: tuple[int, ...] = CHUNKS, forms: tuple[bool, ...] = (False, True)) -> tvm.IRModule:
    """Both forms at `chunks`; with the half one, the tiny model's, and the compact and
    registers forms (the step variant attention_form) at the first chunk and the tiny model's."""
    half = True in forms
    tiny = (*(scheduled(PA.causal_prefill_attention, "prefill_attention", TINY_T, TINY_NH, TINY_NKV, TINY_D, P,
                        MP, True, compact) for compact in (False, True)),
            registers_kernel(TINY_T, TINY_NH, TINY_NKV, TINY_D)) if half else ()
    other_forms = (scheduled(PA.causal_prefill_attention, "prefill_attention", chunks[0], NH, NKV, D, P, MP, True,
                             True), registers_kernel(chunks[0], NH, NKV, D)) if half else ()
    return module(*(scheduled(PA.causal_prefill_attention, "prefill_attention", t, NH, NKV, D, P, MP,
                              *((True,) if half else ()))
                    for t in chunks for half in forms), *other_forms, *tiny)


def test_block_per_tile_with_state_in_registers() -> None:
    source = cuda_source(kernels_module((128,), (False,)))
    # a thread per entry of the 16-key x 32-row score tile
    assert f"__launch_bounds__(512) {symbol(128)}_kernel(" in source
    body = kernel_body(source, symbol(128))
    for tile in ("q_tile", "k_tile", "v_tile", "s", "row_max", "row_sum", "new_max", "alpha"):
        assert re.search(rf"__shared__ [^;]* {tile}_shared_ptr\[", body), tile
    # The output accumulator is registers: indexed by constants only.
    indices = re.findall(r"\bacc_ptr\[([^\]]*)\]", body)
    assert indices and all(re.fullmatch(r"\d+", i) for i in indices), indices
    # Thread t's score sum reads and writes slot t alone: no barrier between its steps (nvcc
    # then keeps the sum in a register).
    sums = re.findall(r"s_shared_ptr\[\(\(int\)threadIdx\.x\)\] = \(s_shared_ptr\[\(\(int\)threadIdx\.x\)\] \+", body)
    assert len(sums) == 4  # head dims by 4 a loop step
    qk = body[body.index(sums[0]) : body.rindex(sums[-1])]
    assert "__syncthreads" not in qk


def test_half_operands_multiply_on_tensor_cores() -> None:
    source = cuda_source(kernels_module((128,), (True,)))
    assert f"__launch_bounds__(128) {symbol(128, True)}_kernel(" in source  # 4 warps: 64 rows
    body = kernel_body(source, symbol(128, True))
    # S = Q K^T (K a column-major B) and P V, f16 fragments into f32 accumulators
    assert "wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, half, nvcuda::wmma::col_major>" in body
    assert "wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, half, nvcuda::wmma::row_major>" in body
    assert "wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>" in body
    assert body.count("nvcuda::wmma::mma_sync(") == 2
    assert body.count("nvcuda::wmma::store_matrix_sync(") == 2
    assert "extern __shared__" in body  # Q, K, V, S and P V: more than static shared memory holds


def test_small_heads_keep_every_tile_in_dynamic_shared_memory() -> None:
    """At head dim 64 the dynamic tiles take 26 KiB: with 28.3 KiB of static tiles (K, V, P and
    the row state) beside them a block would need more than 48 KiB, which a launch allows only
    when the dynamic part alone asks for that much (it failed on an H200:
    CUDA_ERROR_INVALID_VALUE). So there every tile is dynamic; at head dim 128 (50 KiB dynamic)
    K, V, P and the row state stay static."""
    source = cuda_source(kernels_module((128,), (True,)))
    static = r"__shared__ alignas\(64\) \w+ (\w+)_shared_ptr\["
    assert re.findall(static, kernel_body(source, tiny_symbol())) == []
    assert re.findall(static, kernel_body(source, tiny_symbol(compact=True))) == []
    assert "p_half" in re.findall(static, kernel_body(source, symbol(128, True)))


@pytest.mark.parametrize("arch", CUDA_ARCHS)
def test_both_head_dims_launch_within_their_shared_memory(arch: str) -> None:
    from sparkinfer.compiler.targets import check_shared_memory, shared_memory_bytes

    mod = kernels_module((128,), (True,))
    check_shared_memory(mod, arch)
    assert shared_memory_bytes(mod, arch)[f"{tiny_symbol()}_kernel"][0] == 0  # every tile dynamic
    assert shared_memory_bytes(mod, arch)[f"{tiny_symbol(compact=True)}_kernel"][0] == 0


def test_the_launch_check_names_a_kernel_its_launch_would_refuse(monkeypatch: pytest.MonkeyPatch) -> None:
    """Head dim 64 with the static tiles static again (as before session 9, when 44 KiB dynamic
    + 10.3 KiB static failed on an H200 with CUDA_ERROR_INVALID_VALUE): K, V, P and the row state
    static, 28.3 KiB, beside 26 KiB dynamic."""
    from sparkinfer.compiler.targets import check_shared_memory
    from sparkinfer.schedule import prefill_cuda

    monkeypatch.setattr(prefill_cuda, "_dynamic_tile_bytes", lambda sch, tiles: 1 << 30)  # P and the state static
    with pytest.raises(SparkInferError, match=rf"cannot launch on sm_90 .*{tiny_symbol()}_kernel: 28928 B static \+ 26624 B dynamic"):
        check_shared_memory(kernels_module((128,), (True,)), "sm_90")


def test_the_compact_form_reads_no_tile_ahead_and_takes_p_v_in_parts() -> None:
    source = cuda_source(kernels_module((128,), (True,)))
    # 3 blocks an SM: nvcc keeps a thread within 168 registers
    assert f"__launch_bounds__(128, 3) {compact_symbol(128)}_kernel(" in source
    body = kernel_body(source, compact_symbol(128))
    assert "k_next" not in body and "v_next" not in body
    # S = Q K^T once, P V once for each 64-column part of the head dim (the part loop unrolled)
    assert body.count("nvcuda::wmma::mma_sync(") == 1 + D // 64
    assert re.search(r"\bfloat acc_local_ptr\[64\];", body)  # O: 64 registers a thread


def test_the_register_form_keeps_s_p_and_o_in_mma_registers() -> None:
    source = cuda_source(kernels_module((128,), (True,)))
    assert f"__launch_bounds__(128, 3) {registers_symbol(128)}_kernel(" in source  # 4 warps; 3 blocks an SM
    body = kernel_body(source, registers_symbol(128))
    assert "wmma" not in body
    # per key tile and warp: S = Q K^T over 8 n-tiles of 8 keys and D / 16 k-steps, P V over 16
    # n-tiles of 8 dims and 4 k-steps of 16 keys; every fragment loaded by ldmatrix x4
    assert body.count('"mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"') == 8 * D // 16 + D // 8 * 4
    # Q's A fragment once a k-step, K's B fragments two n-tiles a load, V's (.trans) too
    assert body.count('"ldmatrix.sync.aligned.m8n8.x4.shared.b16"') == D // 16 + D // 16 * 4
    assert body.count('"ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16"') == 4 * D // 16
    # one shared tile (Q, K and V: 48 KiB at D = 128); S, P and O are registers (constant indices)
    assert re.findall(r"__shared__ alignas\(\d+\) \w+ (\w+)\[(\d+)\]", body) == [("tiles_ptr", str(3 * 64 * D))]
    for name, size in (("s", 32), ("p", 32), ("o", 4 * D // 8)):
        assert re.search(rf"\b(float|half) {name}_ptr\[{size}\];", body), name
        indices = re.findall(rf"\b{name}_ptr \+ (\w+)\)|\b{name}_ptr\[([^\]]*)\]", body)
        assert all(re.fullmatch(r"\d+", a or b) for a, b in indices), (name, indices)
    assert body.count("__shfl_xor_sync") == 2 * 2 * 2  # 2 rows a lane: the tile max, and l at the end


@needs_nvcc
def test_the_register_form_fits_three_blocks_an_sm_on_sm_90_without_spills(tmp_path: Path) -> None:
    """ptxas at head dim 128 (bench/NOTES.md "Prefill attention v5": 166 registers): 3 blocks of
    128 threads an SM need at most 168 registers a thread, and a spill would put S, P or O in
    local memory."""
    source = tmp_path / "registers.cu"
    source.write_text(cuda_source(module(registers_kernel(128, NH, NKV, D))))
    ptxas = subprocess.run([targets.find_nvcc(), "-cubin", "-O3", "-arch=sm_90a", "-Xptxas", "-v",
                            "-o", str(tmp_path / "registers.cubin"), str(source)],
                           capture_output=True, text=True, check=True).stderr
    assert int(re.search(r"Used (\d+) registers", ptxas).group(1)) <= 168
    assert "0 bytes spill stores, 0 bytes spill loads" in ptxas


def test_the_register_form_refuses_a_head_dim_off_its_swizzle_by_name() -> None:
    with pytest.raises(ValueError, match=r"the head dim \(48\) to be a multiple of 64"):
        PA.causal_prefill_attention_registers(16, 4, 2, 48, P, 4)


def test_half_operands_refuse_a_head_group_off_the_tile_by_name() -> None:
    with pytest.raises(ValueError, match="the 3 query heads per KV head to divide 64"):
        PA.causal_prefill_attention(16, 6, 2, D, P, 4, True)


def test_a_score_tile_larger_than_a_block_is_refused_by_name() -> None:
    # 64 query heads over 2 KV heads: 4 queries x 32 heads x 16 keys = 2048 scores > 1024 threads
    with pytest.raises(SparkInferError, match="a 16 x 128 score tile is more than a block's threads"):
        scheduled(PA.causal_prefill_attention, "prefill_attention", 16, 64, 2, D, P, 4)


@needs_nvcc
@pytest.mark.parametrize("arch", CUDA_ARCHS)
def test_nvcc_compiles_for(arch: str) -> None:
    assert_nvcc_compiles(arch, kernels_module((128,)))  # both forms


gpu = gpu_fixture("prefill_attention", kernels_module)


def paged_cache(rng: np.random.Generator, page_table: np.ndarray, n_cached: int) -> tuple[np.ndarray, np.ndarray]:
    """fp16 K and V with random rows at positions 0 .. n_cached - 1 and NaN everywhere else
    (a key the kernel must not see poisons its output)."""
    k = np.full((N_PAGES, P, NKV, D), np.nan, np.float16)
    v = np.full((N_PAGES, P, NKV, D), np.nan, np.float16)
    t = np.arange(n_cached)
    k[page_table[t // P], t % P] = rng.standard_normal((n_cached, NKV, D)) * 2
    v[page_table[t // P], t % P] = rng.standard_normal((n_cached, NKV, D))
    return k, v


def run_on_chunk(gpu: Gpu, kernel: str, n_tokens: int, pos: int, short: int) -> tuple[np.ndarray, tuple]:
    """Runs `kernel` on a chunk of n_tokens at `pos` whose last `short` rows are padding, on
    fresh random inputs; returns (its output, (q, k_cache, v_cache, page_table)) for the
    references. Physical pages in random order; the table's unused tail points at real pages too."""
    rng = np.random.default_rng(n_tokens * 1000 + pos + short)
    n_valid = n_tokens - short
    page_table = np.concatenate([rng.permutation(N_PAGES), rng.integers(0, N_PAGES, MP - N_PAGES)]).astype(np.int32)
    k_cache, v_cache = paged_cache(rng, page_table, pos + n_valid)
    q = rng.standard_normal((n_tokens, NH, D), dtype=np.float32)
    out = gpu.poisoned((n_tokens, NH * D))
    inputs = [q, k_cache, v_cache, page_table, np.array([pos], np.int32), np.array([n_valid], np.int32)]
    gpu(kernel, *map(gpu.tensor, inputs), out)
    return out.numpy(), (q, k_cache, v_cache, page_table)


@pytest.mark.parametrize("half", [False, True], ids=["f32", "f16"])
@pytest.mark.parametrize("n_tokens", CHUNKS)
@pytest.mark.parametrize(("pos", "short"), [(0, 0), (0, 3), (700, 0), (700, 3)],
                         ids=["first-full", "first-partial", "prefix-full", "prefix-partial"])
def test_matches_numpy_on_gpu(gpu: Gpu, n_tokens: int, pos: int, short: int, half: bool) -> None:
    """A first chunk (pos 0) and one after a 700-token prefix (a page boundary inside a tile),
    full (n_valid = T) and partial (T - 3: padding rows must come out 0); the f16 form against
    its own reference (Q and P rounded where the kernel rounds them)."""
    if n_tokens > CHUNKS[0] and pos > 0:
        gpu_only(gpu, "a 512-token chunk over a prefix takes ~40 s on the CPU; the 128-token ones cover it")
    got, inputs = run_on_chunk(gpu, symbol(n_tokens, half), n_tokens, pos, short)
    reference = PA.causal_prefill_attention_half_reference if half else PA.causal_prefill_attention_reference
    want = reference(*inputs, pos, n_tokens - short)
    np.testing.assert_array_equal(got[n_tokens - short:], 0)
    if half:
        # S in float32 in another order than the oracle's: a P near a float16 rounding boundary
        # may round the other way (one f16 ulp, 2^-11 relative, of one weight of a row: up to
        # ~2e-3 where that weight is ~1 and its V ~4). Emulated at T = 128 the largest error was
        # 4.2e-4 (pos 0) and 1.9e-4 (pos 700); the float32 oracle is 2.1e-3 and 9.9e-4 away.
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=2e-3)
    else:
        # float32 sums of up to 1212 terms (exp by vecmath's polynomial) in another order than
        # the oracle's: the CPU build's tolerance (tests/kernels/test_chunk_kernels.py).
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("form", ["compact", "registers"])
@pytest.mark.parametrize(("pos", "short"), [(0, 0), (0, 3), (700, 0), (700, 3)],
                         ids=["first-full", "first-partial", "prefix-full", "prefix-partial"])
def test_the_other_forms_match_numpy_on_gpu(gpu: Gpu, pos: int, short: int, form: str) -> None:
    """The compact and registers forms at the first chunk (head dim 128, 8 query heads a KV
    head; after the 700-token prefix the keys cross 13 pages), as the f16 cases above (same
    reference, tolerance)."""
    n_tokens = CHUNKS[0]
    kernel = compact_symbol(n_tokens) if form == "compact" else registers_symbol(n_tokens)
    got, inputs = run_on_chunk(gpu, kernel, n_tokens, pos, short)
    want = PA.causal_prefill_attention_half_reference(*inputs, pos, n_tokens - short)
    np.testing.assert_array_equal(got[n_tokens - short:], 0)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=2e-3)


@pytest.mark.parametrize("form", list(TINY_FORMS))
@pytest.mark.parametrize(("pos", "n_valid"), [(0, 11), (100, 16)], ids=["first-partial", "prefix-full"])
def test_tiny_model_shapes_with_half_operands_match_numpy_on_gpu(gpu: Gpu, pos: int, n_valid: int,
                                                                 form: str) -> None:
    rng = np.random.default_rng(pos + n_valid)
    n_pages = 4
    page_table = np.concatenate([rng.permutation(n_pages), np.zeros(MP - n_pages, np.int32)]).astype(np.int32)
    k_cache = np.full((n_pages, P, TINY_NKV, TINY_D), np.nan, np.float16)
    v_cache = np.full((n_pages, P, TINY_NKV, TINY_D), np.nan, np.float16)
    t = np.arange(pos + n_valid)
    k_cache[page_table[t // P], t % P] = rng.standard_normal((t.size, TINY_NKV, TINY_D)) * 2
    v_cache[page_table[t // P], t % P] = rng.standard_normal((t.size, TINY_NKV, TINY_D))
    q = rng.standard_normal((TINY_T, TINY_NH, TINY_D), dtype=np.float32)

    out = gpu.poisoned((TINY_T, TINY_NH * TINY_D))
    inputs = [q, k_cache, v_cache, page_table, np.array([pos], np.int32), np.array([n_valid], np.int32)]
    gpu(TINY_FORMS[form], *map(gpu.tensor, inputs), out)

    want = PA.causal_prefill_attention_half_reference(q, k_cache, v_cache, page_table, pos, n_valid)
    np.testing.assert_array_equal(out.numpy()[n_valid:], 0)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-3, atol=2e-3)  # as the f16 case above


if __name__ == "__main__":
    main(__doc__, "prefill_attention", kernels_module)
