"""The int8-activation kernels scheduled for CUDA: codegen uses __dp4a and 16-byte loads of the
Q4_K words and activation words, nvcc compiles them for every arch, the rules' spaces and
defaults hold together, and on a GPU the Qwen3-30B-A3B shapes match the numpy oracles (the
library prebuilt by `python -m tests.gpu_prebuild`; the CPU checks the compute:
tests/kernels/test_gemv_q8.py, test_moe_q8.py)."""

import re

import numpy as np
import pytest
import tvm
from tvm import s_tir, te
from gguf import GGMLQuantizationType as T

from sparkinfer import quant
from sparkinfer.kernels import gemv_q8, moe_q8
from sparkinfer.kernels.attention import attention_combine_reference
from sparkinfer.kernels.gemv import Q6_K_PLANAR, dequantize_rows, gemv_experts_reference, weight_view
from sparkinfer.kernels.norm import rms_norm_reference
from sparkinfer.kernels.router import router_topk_reference
from sparkinfer.kernels.testing import assert_gemv_close, assert_q8_1_close, random_weights
from sparkinfer.reference.qwen3moe import silu
from sparkinfer.schedule.arch import arch_facts
from sparkinfer.schedule.space import check_knobs, kernel_use, rule_for

from cuda_emulator import EmulatedGpu
from cuda_testutil import (
    CUDA_ARCHS,
    Gpu,
    assert_nvcc_compiles,
    can_compile,
    cuda_source,
    default_knobs_with,
    gpu_fixture,
    kernel_body,
    main,
    module,
    needs_nvcc,
    scheduled,
)

# The full-size Qwen3-30B-A3B shapes (bench/NOTES.md): attention out 2048x4096, experts 768x2048.
CASES = [
    (gemv_q8.gemv_q8, "gemv_q8", (T.Q4_K, 2048, 4096)),
    (gemv_q8.gemv_q8, "gemv_q8", (T.Q6_K, 512, 2048)),
    (gemv_q8.gemv_q8, "gemv_q8", (Q6_K_PLANAR, 512, 2048)),  # q6_k_layout="planar"
    (gemv_q8.gemv_q8, "gemv_q8", (T.Q5_K, 512, 2048)),
    (gemv_q8.gemv_q8, "gemv_q8", (T.Q8_0, 512, 2048)),
    (gemv_q8.quantize_q8_1, "gemv_q8", (2048, 0)),
    (gemv_q8.quantize_q8_1, "gemv_q8", (768, 8)),
    (gemv_q8.add_rms_norm_q8_1, "gemv_q8", (2048, 1e-6)),
    (gemv_q8.rms_norm_q8_1, "gemv_q8", (2048, 1e-6)),
    (gemv_q8.attention_combine_q8_1, "gemv_q8", (32, 16, 128)),
    (gemv_q8.gemv_qkv_q8, "gemv_q8", (T.Q4_K, 4096, 512, 512, 2048)),
    (gemv_q8.gemv_qkv_q8, "gemv_q8", (T.Q4_K, 4096, 512, 0, 2048)),
    # attention_norm="prologue": the norm and quantizer in each thread block, on fewer rows (the
    # prologue is the same at any row count: x of the full-size hidden size, 2048)
    (gemv_q8.gemv_qkv_q8_normed, "gemv_q8", (T.Q4_K, 256, 32, 32, 2048, 1e-6)),
    (gemv_q8.gemv_qkv_q8_normed, "gemv_q8", (T.Q4_K, 256, 32, 0, 2048, 1e-6)),
    (gemv_q8.gemv_q8_normed, "gemv_q8", (Q6_K_PLANAR, 64, 2048, 1e-6)),
    (moe_q8.moe_gate_up_silu_q8, "moe_q8", (T.Q4_K, T.Q4_K, 128, 8, 768, 2048)),
    (moe_q8.moe_gate_up_silu_q8_routed, "moe_q8", (T.Q4_K, T.Q4_K, 128, 8, 768, 2048)),  # router_merge="gate_up"
    # and expert_prefetch="down"
    (moe_q8.moe_gate_up_silu_q8_routed_prefetch, "moe_q8", (T.Q4_K, T.Q4_K, 128, 8, 768, 2048, Q6_K_PLANAR)),
    (moe_q8.moe_down_residual_q8, "moe_q8", (T.Q6_K, 128, 8, 2048, 768)),
    (moe_q8.moe_down_residual_q8, "moe_q8", (Q6_K_PLANAR, 128, 8, 2048, 768)),
    (moe_q8.moe_down_residual_q8, "moe_q8", (T.Q4_K, 128, 8, 2048, 768)),
]
IDS = [f"{f.__name__}{args}" for f, _, args in CASES]


@pytest.mark.parametrize("factory, family, args", CASES, ids=IDS)
def test_default_knobs_lie_in_the_space(factory, family, args) -> None:
    for arch in CUDA_ARCHS:
        facts = arch_facts(arch)
        use = kernel_use(family, factory.__name__, *args)
        rule = rule_for(use, facts)
        check_knobs(rule, use, rule.default(use, facts), facts)


NORMED = (gemv_q8.gemv_q8_normed, gemv_q8.gemv_qkv_q8_normed)
GEMVS = [i for i, (f, _, _) in enumerate(CASES)
         if f in (gemv_q8.gemv_q8, gemv_q8.gemv_qkv_q8, *NORMED) or f.__module__ == moe_q8.__name__]


@pytest.mark.parametrize("factory, family, args", [CASES[i] for i in GEMVS], ids=[IDS[i] for i in GEMVS])
def test_int8_gemvs_use_dp4a(factory, family, args) -> None:
    func = scheduled(factory, family, *args)
    body = kernel_body(cuda_source(module(func)), str(func.attrs["global_symbol"]))
    assert "__dp4a(" in body
    if T.Q4_K in args or Q6_K_PLANAR in args:
        # the chunk's quant words and its activation words in 16-byte loads
        assert body.count("*(int4*)(xq") + body.count("*(int4*)(aq") + body.count("*(int4*)(words_shared") >= 1
        assert "*(uint4*)(W" in body
    elif T.Q6_K in args:  # GGUF blocks of 210 bytes: 16-bit words
        assert "*(uint4*)(W" not in body


@needs_nvcc
@pytest.mark.parametrize("arch", CUDA_ARCHS)
def test_int8_kernels_compile_with_nvcc(arch: str) -> None:
    assert_nvcc_compiles(arch, kernels_module(arch))


# The down kernel at lanes past a warp (`schedule.moe.wide_lanes`), on 8 slots of 768-wide experts
# (planar Q6_K: 48 chunks a row, Q4_K: 96) of a 64-row hidden size: (type, lanes, rows).
# (type, lanes, rows, rows_per_thread); the last two, unroll 16, are sm_90.json's from the H200's
# round of session 25.
WIDE_DOWN = [(Q6_K_PLANAR, 24, 2, 1), (Q6_K_PLANAR, 48, 2, 1), (T.Q4_K, 48, 4, 1), (T.Q4_K, 96, 1, 1),
             (Q6_K_PLANAR, 48, 2, 2), (T.Q4_K, 96, 2, 2)]
WIDE_DOWN_SHAPE = (16, 8, 64, 768)  # E, KU, H, I


def wide_down_symbol(ggml_type: int, lanes: int, rows: int, per_thread: int) -> str:
    return moe_q8.moe_down_residual_q8_symbol(ggml_type, *WIDE_DOWN_SHAPE) + f"_lanes{lanes}x{rows}x{per_thread}"


def wide_down(ggml_type: int, lanes: int, rows: int, per_thread: int, arch: str = "sm_90") -> tvm.tirx.PrimFunc:
    args = (ggml_type, *WIDE_DOWN_SHAPE)
    knobs = default_knobs_with(moe_q8.moe_down_residual_q8, "moe_q8", *args, arch=arch, lanes=lanes, rows=rows,
                               rows_per_thread=per_thread, unroll=16)
    func = scheduled(moe_q8.moe_down_residual_q8, "moe_q8", *args, knobs=knobs, arch=arch)
    return func.with_attr("global_symbol", wide_down_symbol(ggml_type, lanes, rows, per_thread))


# The planar Q6_K GEMVs at sm_90.json's knobs from the H200's round of session 25 (the LM head on
# fewer rows): (n, k, lanes, rows, rows_per_thread, unroll).
TUNED_PLANAR = [(512, 2048, 8, 2, 2, 16), (1024, 2048, 16, 8, 4, 256)]


def tuned_planar_symbol(n: int, k: int, lanes: int, rows: int, per_thread: int, unroll: int) -> str:
    return gemv_q8.gemv_q8_symbol(Q6_K_PLANAR, n, k) + f"_lanes{lanes}x{rows}x{per_thread}_u{unroll}"


def tuned_planar(n: int, k: int, lanes: int, rows: int, per_thread: int, unroll: int,
                 arch: str = "sm_90") -> tvm.tirx.PrimFunc:
    knobs = default_knobs_with(gemv_q8.gemv_q8, "gemv_q8", Q6_K_PLANAR, n, k, arch=arch, lanes=lanes, rows=rows,
                               rows_per_thread=per_thread, unroll=unroll)
    func = scheduled(gemv_q8.gemv_q8, "gemv_q8", Q6_K_PLANAR, n, k, knobs=knobs, arch=arch)
    return func.with_attr("global_symbol", tuned_planar_symbol(n, k, lanes, rows, per_thread, unroll))


# The routed int8 gate/up at its other row splits of a block of 32 (schedule/moe_q8.py
# EPILOGUE_ROW_SPLITS; the default, 8 x 4, is CASES'), on a small model: (rows, rows_per_thread).
GATE_UP_SPLITS = [(16, 2), (32, 1)]
SPLIT_GATE_UP_ARGS = (T.Q4_K, T.Q4_K, 16, 4, 256, 512)  # E 16, top 4, I 256, H 512


def split_gate_up_symbol(rows: int, per_thread: int) -> str:
    return moe_q8.moe_gate_up_silu_q8_routed_symbol(*SPLIT_GATE_UP_ARGS) + f"_rows{rows}x{per_thread}"


def split_gate_up(rows: int, per_thread: int, arch: str = "sm_90") -> tvm.tirx.PrimFunc:
    factory = moe_q8.moe_gate_up_silu_q8_routed
    knobs = default_knobs_with(factory, "moe_q8", *SPLIT_GATE_UP_ARGS, arch=arch, rows=rows,
                               rows_per_thread=per_thread)
    func = scheduled(factory, "moe_q8", *SPLIT_GATE_UP_ARGS, knobs=knobs, arch=arch)
    return func.with_attr("global_symbol", split_gate_up_symbol(rows, per_thread))


# The normed Q+K kernel at thread counts below, at and above the 64 blocks of 32 its prologue
# quantizes (a thread a block: fewer threads loop, more leave some idle): (lanes, rows).
NORMED_THREADS = [(16, 2), (32, 2), (16, 16)]
NORMED_QK_ARGS = (T.Q4_K, 256, 32, 0, 2048, 1e-6)


def normed_qk_symbol(lanes: int, rows: int) -> str:
    return gemv_q8.gemv_qkv_q8_normed_symbol(*NORMED_QK_ARGS[:-1]) + f"_lanes{lanes}x{rows}"


def normed_qk(lanes: int, rows: int, arch: str = "sm_90") -> tvm.tirx.PrimFunc:
    factory = gemv_q8.gemv_qkv_q8_normed
    knobs = default_knobs_with(factory, "gemv_q8", *NORMED_QK_ARGS, arch=arch, lanes=lanes, rows=rows,
                               rows_per_thread=1)
    func = scheduled(factory, "gemv_q8", *NORMED_QK_ARGS, knobs=knobs, arch=arch)
    return func.with_attr("global_symbol", normed_qk_symbol(lanes, rows))


def kernels_module(arch: str = "sm_90") -> tvm.IRModule:
    """Every case, scheduled for `arch`, the wide-lane down kernels, the gate/up's other row
    splits, the normed Q+K at other thread counts and the planar GEMVs at sm_90's tuned knobs: the
    GPU tests' library."""
    return module(*(scheduled(f, family, *args, arch=arch) for f, family, args in CASES),
                  *(wide_down(*case, arch=arch) for case in WIDE_DOWN),
                  *(split_gate_up(*split, arch=arch) for split in GATE_UP_SPLITS),
                  *(normed_qk(*threads, arch=arch) for threads in NORMED_THREADS),
                  *(tuned_planar(*case, arch=arch) for case in TUNED_PLANAR))


gpu = gpu_fixture("gemv_q8", kernels_module)


# Each factory's symbol from its arguments without building the kernel: the GPU machine has
# runtime-only TVM, where building TIR fails (no te.placeholder).
SYMBOLS = {gemv_q8.quantize_q8_1: gemv_q8.quantize_q8_1_symbol, gemv_q8.gemv_q8: gemv_q8.gemv_q8_symbol,
           moe_q8.moe_gate_up_silu_q8: moe_q8.moe_gate_up_silu_q8_symbol,
           moe_q8.moe_gate_up_silu_q8_routed: moe_q8.moe_gate_up_silu_q8_routed_symbol,
           moe_q8.moe_gate_up_silu_q8_routed_prefetch: moe_q8.moe_gate_up_silu_q8_routed_prefetch_symbol,
           moe_q8.moe_down_residual_q8: moe_q8.moe_down_residual_q8_symbol,
           gemv_q8.add_rms_norm_q8_1: lambda h, eps: gemv_q8.add_rms_norm_q8_1_symbol(h),
           gemv_q8.rms_norm_q8_1: lambda h, eps: gemv_q8.rms_norm_q8_1_symbol(h),
           gemv_q8.attention_combine_q8_1: gemv_q8.attention_combine_q8_1_symbol,
           gemv_q8.gemv_qkv_q8: gemv_q8.gemv_qkv_q8_symbol,
           gemv_q8.gemv_q8_normed: lambda t, n, k, eps: gemv_q8.gemv_q8_normed_symbol(t, n, k),
           gemv_q8.gemv_qkv_q8_normed: lambda t, nq, nk, nv, k, eps: gemv_q8.gemv_qkv_q8_normed_symbol(t, nq, nk, nv, k)}


def _symbol(factory, args) -> str:  # noqa: ANN001
    return SYMBOLS[factory](*args)


def test_attention_combine_q8_1_merges_a_value_a_thread() -> None:
    """Each thread's S loads of o_part out at once, not a loop of them a value: as the float
    combine, a thread of the 128 a head per value (four values a thread, one after another, were
    four memory round trips: bench/NOTES.md "Session 17")."""
    func = scheduled(gemv_q8.attention_combine_q8_1, "gemv_q8", 32, 32, 128)
    body = kernel_body(cuda_source(module(func)), str(func.attrs["global_symbol"]))
    merge = body[:body.index("__syncthreads")]
    assert "__launch_bounds__(128)" in body
    assert "for (" not in merge and merge.count("o_part_ptr[") == 32


def test_routed_gate_up_reads_its_ids_after_a_barrier() -> None:
    """Each block's threads read the expert ids that its slot threads stored, in global memory,
    only after a barrier that follows those stores; the rank in shared memory."""
    args = (T.Q4_K, T.Q4_K, 128, 8, 768, 2048)
    func = scheduled(moe_q8.moe_gate_up_silu_q8_routed, "moe_q8", *args)
    body = kernel_body(cuda_source(module(func)), str(func.attrs["global_symbol"]))
    assert "__shared__ alignas(64) int rank_shared_ptr[128]" in body
    store = re.search(r"ids_ptr\[[^\]]*threadIdx[^\]]*\] = ", body)
    first_read = body.find("ids_ptr[((int)blockIdx.y)]")
    assert store and 0 < store.end() < first_read and "__syncthreads()" in body[store.end():first_read]
    assert body.count("weights_ptr[") == 1 and "*(uint4*)(Wg_ptr" in body
    assert "prefetch" not in body and "Wd_ptr" not in body


def test_routed_gate_up_prefetches_the_chosen_down_experts_past_that_barrier() -> None:
    """expert_prefetch="down": after the ids' barrier and before its own first weight load, each
    block's thread 0 issues one bulk L2 prefetch of its share of its slot's down expert: I / 32 =
    24 blocks a slot, a full-size planar Q6_K expert 2048 rows of 640 bytes, 1,310,720 bytes in
    shares of 54,624 (rounded up to 16), the last one shorter."""
    args = (T.Q4_K, T.Q4_K, 128, 8, 768, 2048, Q6_K_PLANAR)
    func = scheduled(moe_q8.moe_gate_up_silu_q8_routed_prefetch, "moe_q8", *args)
    body = kernel_body(cuda_source(module(func)), str(func.attrs["global_symbol"]))
    store = re.search(r"ids_ptr\[[^\]]*threadIdx[^\]]*\] = ", body)
    prefetch = body.index("_L2_global((&(Wd_ptr[")
    assert store and "__syncthreads()" in body[store.end():prefetch]
    assert body.count("_L2_global(") == 1 and prefetch < body.index("*(uint4*)(Wg_ptr")
    guard = body.rindex("if (", 0, prefetch)
    assert body[guard:prefetch].split("{")[0].strip() == "if ((((int)threadIdx.y) == 0) && (((int)threadIdx.x) == 0))"
    assert "ids_ptr[((int)blockIdx.y)]" in body[prefetch:].split(";")[0]
    assert body[prefetch:].split(";")[0].endswith("((uint)min(54624, (1310720 - (((int)blockIdx.x) * 54624)))))")


def test_the_prefetching_gate_up_asks_for_each_chosen_expert_once() -> None:
    """On the emulator (which records the bulk L2 prefetches a GPU only acts on): a small routed
    gate/up with expert_prefetch "down" writes what the routed one does, and its blocks' prefetches
    cover the chosen experts' down rows exactly, each byte once, in 16-byte-aligned pieces."""
    if not can_compile():
        pytest.skip("the CUDA emulator builds with TVM's compiler; this TVM is runtime-only")
    tg, tu, e, ku, i, h, td = args = (T.Q4_K, T.Q4_K, 16, 4, 256, 256, T.Q6_K)
    rng = np.random.default_rng(5)
    gate, up, down = (random_weights(t, (e, *shape), rng) for t, shape in ((tg, (i, h)), (tu, (i, h)), (td, (h, i))))
    logits = rng.standard_normal(e).astype(np.float32)
    xq, xd, xs = _activations(rng, (h,))
    emulated = EmulatedGpu(module(scheduled(moe_q8.moe_gate_up_silu_q8_routed_prefetch, "moe_q8", *args)))
    wd = emulated.tensor(weight_view(td, down))
    outs = [emulated.tensor(np.zeros(shape, dtype)) for shape, dtype in
            (((ku, i // 4), np.int32), ((ku, i // 32), np.float32), ((ku, i // 32), np.float32), (ku, np.int32),
             (ku, np.float32))]
    emulated(_symbol(moe_q8.moe_gate_up_silu_q8_routed_prefetch, args), emulated.tensor(weight_view(tg, gate)),
             emulated.tensor(weight_view(tu, up)), wd, *(emulated.tensor(a) for a in (logits, xq, xd, xs)), *outs)
    aq, ad, as_, ids, _ = (o.numpy() for o in outs)
    ref_ids, _ = router_topk_reference(logits, ku)
    np.testing.assert_array_equal(ids, ref_ids)
    _assert_gate_up_blocks(tg, gate, tu, up, ref_ids, xq, xd, (aq, ad, as_))
    expert_bytes = wd.array.nbytes // e
    start = wd.array.ctypes.data
    covered = sorted(b for address, size in emulated.l2_prefetches for b in range(address - start, address - start + size))
    assert all(address % 16 == 0 and size % 16 == 0 for address, size in emulated.l2_prefetches)
    assert covered == sorted(b for j in ref_ids for b in range(j * expert_bytes, (j + 1) * expert_bytes))


def test_symbols_are_the_kernels_own() -> None:
    for factory, _, args in CASES:
        assert _symbol(factory, args) == str(factory(*args).attrs["global_symbol"])


def _run(gpu: Gpu, symbol: str, inputs: list[np.ndarray], outputs: list[np.ndarray]) -> list[np.ndarray]:
    """Run into outputs poisoned with NaN (float) or a pattern (int), and read them back."""
    outs = [gpu.tensor(np.full_like(o, np.nan) if o.dtype.kind == "f" else np.full_like(o, -0x55555556))
            for o in outputs]
    gpu(symbol, *(gpu.tensor(a) for a in inputs), *outs)
    return [o.numpy() for o in outs]


@pytest.mark.parametrize("args", [a for f, _, a in CASES if f is gemv_q8.quantize_q8_1], ids=str)
def test_quantize_on_gpu_matches_numpy(gpu: Gpu, args: tuple[int, int]) -> None:
    k, rows = args
    x = np.random.default_rng(1).standard_normal((rows, k) if rows else (k,), dtype=np.float32)
    lead = x.shape[:-1]
    xq, xd, xs = _run(gpu, _symbol(gemv_q8.quantize_q8_1, args), [x],
                      [np.empty((*lead, k // 4), np.int32), np.empty((*lead, k // 32), np.float32),
                       np.empty((*lead, k // 32), np.float32)])
    assert_quantizes(xq, xd, xs, x)


def assert_quantizes(xq: np.ndarray, xd: np.ndarray, xs: np.ndarray, x: np.ndarray) -> None:
    """xq, xd, xs are x's int8 blocks as `quantize_q8_1_reference` makes them, but that nvcc may
    contract x * (127 / amax) + 0.5 differently: a value may round the other way."""
    ref_q, ref_d, _ = gemv_q8.quantize_q8_1_reference(x)
    dq = np.abs(xq.view(np.int8).astype(np.int32) - ref_q.view(np.int8).astype(np.int32))
    assert dq.max() <= 1 and np.count_nonzero(dq) <= max(1, dq.size // 1000)
    np.testing.assert_allclose(xd, ref_d, rtol=1e-6)
    q = xq.view(np.int8).astype(np.float32).reshape(*xd.shape, 32)
    np.testing.assert_allclose(xs, xd * q.sum(axis=-1), rtol=1e-5, atol=1e-6)


def test_add_rms_norm_q8_1_on_gpu_matches_numpy(gpu: Gpu) -> None:
    """The norm's outputs as `add_rms_norm`'s GPU test has them, and its int8 blocks those of
    the y it wrote (the quantizer computes each y again, with the norm's operations)."""
    h, eps = 2048, 1e-6
    rng = np.random.default_rng(12)
    x, r, w = (rng.standard_normal(h, dtype=np.float32) for _ in range(3))
    x[:32], r[:32] = 1.0, -1.0  # an all-zero block: d = 0, no division by zero
    total, y, xq, xd, xs = _run(gpu, _symbol(gemv_q8.add_rms_norm_q8_1, (h, eps)), [x, r, w],
                                [np.empty(h, np.float32), np.empty(h, np.float32), np.empty(h // 4, np.int32),
                                 np.empty(h // 32, np.float32), np.empty(h // 32, np.float32)])
    ref_total, ref_y, *_ = gemv_q8.add_rms_norm_q8_1_reference(x, r, w, eps)
    np.testing.assert_array_equal(total, ref_total)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-6)
    assert_quantizes(xq, xd, xs, y)
    assert not xq[:8].any() and xd[0] == 0.0


def test_rms_norm_q8_1_on_gpu_matches_numpy(gpu: Gpu) -> None:
    """The attention input's int8 blocks: those of `rms_norm`'s y."""
    h, eps = 2048, 1e-6
    rng = np.random.default_rng(13)
    x, w = (rng.standard_normal(h, dtype=np.float32) for _ in range(2))
    x[32:64] = 0.0  # an all-zero block: d = 0, no division by zero
    xq, xd, xs = _run(gpu, _symbol(gemv_q8.rms_norm_q8_1, (h, eps)), [x, w],
                      [np.empty(h // 4, np.int32), np.empty(h // 32, np.float32), np.empty(h // 32, np.float32)])
    assert_quantizes(xq, xd, xs, rms_norm_reference(x, w, eps))
    assert not xq[8:16].any() and xd[1] == 0.0


def test_attention_combine_q8_1_on_gpu_matches_numpy(gpu: Gpu) -> None:
    """The O projection's int8 blocks: those of `attention_combine`'s output, with empty splits
    (lse -inf) among them, as a short context leaves."""
    args = next(a for f, _, a in CASES if f is gemv_q8.attention_combine_q8_1)
    nh, s, d = args
    rng = np.random.default_rng(14)
    o_part = rng.standard_normal((nh, s, d), dtype=np.float32)
    lse = rng.standard_normal((nh, s), dtype=np.float32) * 3
    lse[:, s // 2:] = -np.inf
    xq, xd, xs = _run(gpu, _symbol(gemv_q8.attention_combine_q8_1, args), [o_part, lse],
                      [np.empty(nh * d // 4, np.int32), np.empty(nh * d // 32, np.float32),
                       np.empty(nh * d // 32, np.float32)])
    assert_quantizes(xq, xd, xs, attention_combine_reference(o_part, lse))


@pytest.mark.parametrize("args", [a for f, _, a in CASES if f is gemv_q8.gemv_qkv_q8], ids=str)
def test_gemv_qkv_q8_on_gpu_matches_numpy(gpu: Gpu, args: tuple) -> None:  # noqa: ANN001
    t, *ns, k = args
    rng = np.random.default_rng(15)
    datas = [random_weights(t, (n, k), rng) for n in ns if n]
    xq, xd, xs = _activations(rng, (k,))
    outs = _run(gpu, _symbol(gemv_q8.gemv_qkv_q8, args), [*(weight_view(t, d) for d in datas), xq, xd, xs],
                [np.empty(n, np.float32) for n in ns if n])
    x_hat = gemv_q8.dequantize_q8_1(xq, xd)
    for y, ref, data in zip(outs, gemv_q8.gemv_qkv_q8_reference(t, datas, xq, xd), datas, strict=True):
        magnitude = np.abs(quant.dequantize(t, data, (len(ref), k))).astype(np.float64) @ np.abs(x_hat)
        assert_gemv_close(y, ref, magnitude)


NORMED_RUNS = [(f, a, _symbol(f, a)) for f, _, a in CASES if f in NORMED] + \
    [(gemv_q8.gemv_qkv_q8_normed, NORMED_QK_ARGS, normed_qk_symbol(*threads)) for threads in NORMED_THREADS]


@pytest.mark.parametrize("factory, args, symbol", NORMED_RUNS, ids=[r[2] for r in NORMED_RUNS])
def test_normed_int8_gemvs_on_gpu_match_numpy(gpu: Gpu, factory, args: tuple, symbol: str) -> None:  # noqa: ANN001
    """attention_norm="prologue": each thread block normalizes and quantizes h itself; the outputs
    are the GEMVs' of `rms_norm_q8_1`'s blocks (an all-zero block of 32 among them: d = 0), but
    that a value the kernel rounds the other way (`assert_quantizes`) moves a row's sum by at
    most its weight times d."""
    t, *ns, k, eps = args
    rng = np.random.default_rng(16)
    h = rng.standard_normal(k, dtype=np.float32)
    h[64:96] = 0.0
    norm_w = rng.uniform(0.5, 1.5, k).astype(np.float32)
    datas = [random_weights(t, (n, k), rng) for n in ns if n]
    outs = _run(gpu, symbol, [*(weight_view(t, d) for d in datas), h, norm_w], [np.empty(n, np.float32) for n in ns if n])
    refs = (gemv_q8.gemv_qkv_q8_normed_reference(t, datas, h, norm_w, eps) if factory is gemv_q8.gemv_qkv_q8_normed
            else (gemv_q8.gemv_q8_normed_reference(t, datas[0], h, norm_w, eps),))
    xq, xd, _ = gemv_q8.rms_norm_q8_1_reference(h, norm_w, eps)
    x_hat = gemv_q8.dequantize_q8_1(xq, xd)
    one_step = np.repeat(xd, 32).astype(np.float64)  # a value rounded the other way moves x̂ by d
    rtol = 2e-5
    for y, ref, data in zip(outs, refs, datas, strict=True):
        w_abs = np.abs(dequantize_rows(t, data, k)).astype(np.float64)
        two_flips = 2 * (w_abs * one_step).max(axis=1)
        assert_gemv_close(y, ref, w_abs @ np.abs(x_hat) + two_flips / rtol, rtol)


def _activations(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    return gemv_q8.quantize_q8_1_reference(rng.standard_normal(shape, dtype=np.float32))


@pytest.mark.parametrize("args", [a for f, _, a in CASES if f is gemv_q8.gemv_q8], ids=str)
def test_gemv_q8_on_gpu_matches_numpy(gpu: Gpu, args: tuple) -> None:  # noqa: ANN001
    t, n, k = args
    rng = np.random.default_rng(2)
    data = random_weights(t, (n, k), rng)
    xq, xd, xs = _activations(rng, (k,))
    (y,) = _run(gpu, _symbol(gemv_q8.gemv_q8, args), [weight_view(t, data), xq, xd, xs],
                [np.empty(n, np.float32)])
    x_hat = gemv_q8.dequantize_q8_1(xq, xd)
    magnitude = np.abs(dequantize_rows(t, data, k)).astype(np.float64) @ np.abs(x_hat)
    assert_gemv_close(y, gemv_q8.gemv_q8_reference(t, data, xq, xd), magnitude)


def test_moe_q8_on_gpu_matches_numpy(gpu: Gpu) -> None:
    rng = np.random.default_rng(3)
    for factory, _, args in CASES:
        if factory is moe_q8.moe_gate_up_silu_q8:
            tg, tu, e, ku, i, h = args
            gate, up = random_weights(tg, (e, i, h), rng), random_weights(tu, (e, i, h), rng)
            ids = rng.choice(e, ku, replace=False).astype(np.int32)
            xq, xd, xs = _activations(rng, (h,))
            aq, ad, as_ = _run(gpu, _symbol(factory, args), [weight_view(tg, gate), weight_view(tu, up), ids,
                                                             xq, xd, xs],
                               [np.empty((ku, i // 4), np.int32), np.empty((ku, i // 32), np.float32),
                                np.empty((ku, i // 32), np.float32)])
            _assert_gate_up_blocks(tg, gate, tu, up, ids, xq, xd, (aq, ad, as_))
        elif factory in (moe_q8.moe_gate_up_silu_q8_routed, moe_q8.moe_gate_up_silu_q8_routed_prefetch):
            tg, tu, e, ku, i, h, *td = args
            gate, up = random_weights(tg, (e, i, h), rng), random_weights(tu, (e, i, h), rng)
            # expert_prefetch="down": the down experts, which it only asks the L2 for
            down = [weight_view(t, random_weights(t, (e, h, i), rng)) for t in td]
            logits = rng.standard_normal(e).astype(np.float32)
            order = np.argsort(-logits)
            logits[order[ku]] = logits[order[ku - 1]]  # a tie at the cut: the lower id wins
            xq, xd, xs = _activations(rng, (h,))
            aq, ad, as_, ids, weights = _run(
                gpu, _symbol(factory, args), [weight_view(tg, gate), weight_view(tu, up), *down, logits, xq, xd, xs],
                [np.empty((ku, i // 4), np.int32), np.empty((ku, i // 32), np.float32),
                 np.empty((ku, i // 32), np.float32), np.empty(ku, np.int32), np.empty(ku, np.float32)])
            ref_ids, ref_weights = router_topk_reference(logits, ku)
            np.testing.assert_array_equal(ids, ref_ids)
            np.testing.assert_allclose(weights, ref_weights, rtol=1e-6)
            _assert_gate_up_blocks(tg, gate, tu, up, ref_ids, xq, xd, (aq, ad, as_))
        elif factory is moe_q8.moe_down_residual_q8:
            t, e, ku, h, i = args
            down = random_weights(t, (e, h, i), rng)
            ids = rng.choice(e, ku, replace=False).astype(np.int32)
            weights = rng.dirichlet(np.ones(ku)).astype(np.float32)
            aq, ad, as_ = _activations(rng, (ku, i))
            hv = rng.standard_normal(h, dtype=np.float32)
            (h_out,) = _run(gpu, _symbol(factory, args), [weight_view(t, down), ids, weights, aq, ad, as_, hv],
                            [np.empty(h, np.float32)])
            ref = moe_q8.moe_down_residual_q8_reference(t, down, ids, weights, aq, ad, hv)
            a_hat = gemv_q8.dequantize_q8_1(aq, ad)
            mag = np.stack([np.abs(dequantize_rows(t, down[j], i)) @ np.abs(a) for j, a in zip(ids, a_hat)])
            assert_gemv_close(h_out, ref, np.abs(hv) + weights.astype(np.float64) @ mag)


def test_wide_lanes_reduce_a_row_across_warps() -> None:
    """48 lanes a row (not a multiple of the warp): the partial sums meet in shared memory, with
    a barrier between steps; 96 (3 warps): warp shuffles, then the warps' sums in shared memory."""
    body48 = kernel_body(cuda_source(module(wide_down(Q6_K_PLANAR, 48, 2, 1))), wide_down_symbol(Q6_K_PLANAR, 48, 2, 1))
    assert "__launch_bounds__(96)" in body48 and "__shfl" not in body48 and body48.count("__syncthreads()") >= 6
    body96 = kernel_body(cuda_source(module(wide_down(T.Q4_K, 96, 1, 1))), wide_down_symbol(T.Q4_K, 96, 1, 1))
    assert "__launch_bounds__(96)" in body96 and "__shfl_down_sync" in body96 and "__syncthreads()" in body96


@pytest.mark.parametrize("case", WIDE_DOWN, ids=lambda c: wide_down_symbol(*c))
def test_wide_lane_down_on_gpu_matches_numpy(gpu: Gpu, case: tuple[int, int, int, int]) -> None:
    t = case[0]
    e, ku, h, i = WIDE_DOWN_SHAPE
    rng = np.random.default_rng(16)
    down = random_weights(t, (e, h, i), rng)
    ids = rng.choice(e, ku, replace=False).astype(np.int32)
    weights = rng.dirichlet(np.ones(ku)).astype(np.float32)
    aq, ad, as_ = _activations(rng, (ku, i))
    hv = rng.standard_normal(h, dtype=np.float32)
    (h_out,) = _run(gpu, wide_down_symbol(*case), [weight_view(t, down), ids, weights, aq, ad, as_, hv],
                    [np.empty(h, np.float32)])
    ref = moe_q8.moe_down_residual_q8_reference(t, down, ids, weights, aq, ad, hv)
    a_hat = gemv_q8.dequantize_q8_1(aq, ad)
    mag = np.stack([np.abs(dequantize_rows(t, down[j], i)) @ np.abs(a) for j, a in zip(ids, a_hat)])
    assert_gemv_close(h_out, ref, np.abs(hv) + weights.astype(np.float64) @ mag)


@pytest.mark.parametrize("case", TUNED_PLANAR, ids=lambda c: tuned_planar_symbol(*c))
def test_planar_gemv_at_tuned_knobs_on_gpu_matches_numpy(gpu: Gpu, case: tuple[int, ...]) -> None:
    n, k = case[:2]
    rng = np.random.default_rng(17)
    data = random_weights(Q6_K_PLANAR, (n, k), rng)
    xq, xd, xs = _activations(rng, (k,))
    (y,) = _run(gpu, tuned_planar_symbol(*case), [weight_view(Q6_K_PLANAR, data), xq, xd, xs],
                [np.empty(n, np.float32)])
    x_hat = gemv_q8.dequantize_q8_1(xq, xd)
    magnitude = np.abs(dequantize_rows(Q6_K_PLANAR, data, k)).astype(np.float64) @ np.abs(x_hat)
    assert_gemv_close(y, gemv_q8.gemv_q8_reference(Q6_K_PLANAR, data, xq, xd), magnitude)


@pytest.mark.parametrize("split", GATE_UP_SPLITS, ids=lambda c: split_gate_up_symbol(*c))
def test_routed_gate_up_at_other_row_splits_on_gpu_matches_numpy(gpu: Gpu, split: tuple[int, int]) -> None:
    """16 thread rows of 2 rows each, or 32 of one (512 or 1,024 threads a block): the same
    ids, weights and int8 blocks of act as the oracles'."""
    tg, tu, e, ku, i, h = SPLIT_GATE_UP_ARGS
    rng = np.random.default_rng(17)
    gate, up = random_weights(tg, (e, i, h), rng), random_weights(tu, (e, i, h), rng)
    logits = rng.standard_normal(e).astype(np.float32)
    xq, xd, xs = _activations(rng, (h,))
    aq, ad, as_, ids, weights = _run(
        gpu, split_gate_up_symbol(*split), [weight_view(tg, gate), weight_view(tu, up), logits, xq, xd, xs],
        [np.empty((ku, i // 4), np.int32), np.empty((ku, i // 32), np.float32), np.empty((ku, i // 32), np.float32),
         np.empty(ku, np.int32), np.empty(ku, np.float32)])
    ref_ids, ref_weights = router_topk_reference(logits, ku)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(weights, ref_weights, rtol=1e-6)
    _assert_gate_up_blocks(tg, gate, tu, up, ref_ids, xq, xd, (aq, ad, as_))


def _assert_gate_up_blocks(tg: T, gate: np.ndarray, tu: T, up: np.ndarray, ids: np.ndarray, xq: np.ndarray,
                           xd: np.ndarray, blocks: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    """The gate/up kernel's int8 blocks of act against silu(g) * u of the experts ids, within
    the bound of their rounding."""
    i, h = gate.shape[1], xq.size * 4
    x_hat = gemv_q8.dequantize_q8_1(xq, xd)
    g = gemv_experts_reference(tg, gate, ids, x_hat)
    u = gemv_experts_reference(tu, up, ids, x_hat)
    ref = silu(g) * u
    # d(silu(g) u) = silu'(g) u dg + silu(g) du, |silu'| < 1.1 (tests/kernels/test_moe.py)
    mag_g = np.stack([np.abs(quant.dequantize(tg, gate[j], (i, h))) @ np.abs(x_hat) for j in ids])
    mag_u = np.stack([np.abs(quant.dequantize(tu, up[j], (i, h))) @ np.abs(x_hat) for j in ids])
    with np.errstate(over="ignore"):
        magnitude = 1.1 * np.abs(u) * mag_g + np.abs(silu(g)) * mag_u + np.abs(ref)
    assert_q8_1_close(*blocks, ref, magnitude)


def test_cuda_refuses_a_vectorized_dp4a() -> None:
    """dp4a is vectorizable for the CPU rules; on CUDA (one __dp4a a word) a vectorized loop of
    it is a schedule error, named as such, not code that nvcc would reject."""
    a, b = (te.placeholder((256,), "int32", name=n) for n in "ab")
    dot = te.compute((256,), lambda i: gemv_q8.dp4a(a[i], b[i]), name="dot")
    sch = s_tir.Schedule(te.create_prim_func([a, b, dot]))
    block, lane = sch.split(sch.get_loops(sch.get_sblock("dot"))[0], [None, 4])
    sch.bind(block, "threadIdx.x")
    sch.vectorize(lane)
    with pytest.raises(Exception, match="a CUDA schedule must not vectorize a loop of dp4a"):
        cuda_source(sch.mod)


if __name__ == "__main__":
    main(__doc__, "gemv_q8", kernels_module)
