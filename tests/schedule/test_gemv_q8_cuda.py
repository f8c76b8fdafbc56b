"""The int8-activation kernels scheduled for CUDA: codegen uses __dp4a and 16-byte loads of the
Q4_K words and activation words, nvcc compiles them for every arch, and the rules' spaces and
defaults hold together (the CPU checks the compute: tests/kernels/test_gemv_q8.py)."""

import pytest
from gguf import GGMLQuantizationType as T

from sparkinfer.kernels import gemv_q8, moe_q8
from sparkinfer.schedule.arch import arch_facts
from sparkinfer.schedule.space import check_knobs, kernel_use, rule_for
from tests.schedule.cuda_testutil import (
    CUDA_ARCHS,
    assert_nvcc_compiles,
    cuda_source,
    kernel_body,
    module,
    needs_nvcc,
    scheduled,
)

# The full-size Qwen3-30B-A3B shapes (bench/NOTES.md): attention out 2048x4096, experts 768x2048.
CASES = [
    (gemv_q8.gemv_q8, "gemv_q8", (T.Q4_K, 2048, 4096)),
    (gemv_q8.gemv_q8, "gemv_q8", (T.Q6_K, 512, 2048)),
    (gemv_q8.gemv_q8, "gemv_q8", (T.Q5_K, 512, 2048)),
    (gemv_q8.gemv_q8, "gemv_q8", (T.Q8_0, 512, 2048)),
    (gemv_q8.quantize_q8_1, "gemv_q8", (2048, 0)),
    (gemv_q8.quantize_q8_1, "gemv_q8", (768, 8)),
    (moe_q8.moe_gate_up_silu_q8, "moe_q8", (T.Q4_K, T.Q4_K, 128, 8, 768, 2048)),
    (moe_q8.moe_down_residual_q8, "moe_q8", (T.Q6_K, 128, 8, 2048, 768)),
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


@pytest.mark.parametrize("factory, family, args", CASES[:4] + CASES[6:], ids=IDS[:4] + IDS[6:])
def test_int8_gemvs_use_dp4a(factory, family, args) -> None:
    func = scheduled(factory, family, *args)
    body = kernel_body(cuda_source(module(func)), str(func.attrs["global_symbol"]))
    assert "__dp4a(" in body
    if T.Q4_K in args:
        # the chunk's QS words and its activation words in 16-byte loads
        assert body.count("*(int4*)(xq") + body.count("*(int4*)(aq") >= 1
        assert "*(uint4*)(W" in body


@needs_nvcc
@pytest.mark.parametrize("arch", CUDA_ARCHS)
def test_int8_kernels_compile_with_nvcc(arch: str) -> None:
    funcs = [scheduled(f, family, *args, arch=arch) for f, family, args in CASES]
    assert_nvcc_compiles(arch, module(*funcs))
