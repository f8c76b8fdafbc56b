"""CUDA builds of the T-token step's kernels (schedule/prefill_cuda.py), no GPU needed: every
chunk kernel at the full-size Qwen3-30B-A3B shapes takes its registered rule, and one module of
them all compiles with nvcc for each arch. (Numbers on a GPU: not measured yet.)"""

import pytest
import tvm
from gguf import GGMLQuantizationType as T

from sparkinfer.compiler import targets
from sparkinfer.kernels.use import factory_args, kernel_factory
from sparkinfer.schedule.arch import arch_facts
from sparkinfer.schedule.space import kernel_use, rule_for, schedule_kernel

from cuda_testutil import CUDA_ARCHS, assert_nvcc_compiles, needs_nvcc

NT = 128  # a chunk
# Qwen3-30B-A3B: hidden 2048, 32/4 heads of 128, 128 experts top-8 of 768, vocab 151936
H, NH, NKV, D, E, KU, I, P, MP = 2048, 32, 4, 128, 128, 8, 768, 64, 640
CASES = [
    ("gemm", "gemm", (T.Q4_K, NT, NH * D, H)),
    ("gemm", "gemm", (T.Q6_K, NT, NKV * D, H)),
    ("gemm", "gemm", (T.F32, NT, E, H)),
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
    ("moe_chunk", "moe_combine_residual", (NT, KU, NT * KU, H)),
    ("chunk", "take_row", (NT, H)),
    ("chunk", "advance_chunk", ()),
    ("chunk", "advance_pos", ()),
]


def chunk_module(arch: str) -> tvm.IRModule:
    funcs = {}
    for i, (family, factory, args) in enumerate(CASES):
        use = kernel_use(family, factory, *args)
        assert rule_for(use, arch_facts(arch)).name.startswith("sparkinfer.schedule.prefill_cuda.")
        func = schedule_kernel(kernel_factory(family, factory)(*factory_args(use)), use, arch_facts(arch))
        funcs[f"k{i}_{factory}"] = func.with_attr("global_symbol", f"k{i}_{factory}")
    return tvm.IRModule(funcs)


@pytest.mark.parametrize("arch", CUDA_ARCHS)
def test_every_chunk_kernel_has_a_cuda_rule_and_compiles(arch: str) -> None:
    source = targets.cuda_source(chunk_module(arch), arch)
    for i, (_, factory, _) in enumerate(CASES):
        assert f"k{i}_{factory}_kernel(" in source


@needs_nvcc
@pytest.mark.slow
@pytest.mark.parametrize("arch", CUDA_ARCHS)
def test_chunk_kernels_compile_with_nvcc(arch: str) -> None:
    assert_nvcc_compiles(arch, targets.cuda_source(chunk_module(arch), arch))
