"""Valid, non-zero inputs for timing one kernel, in its parameter order.

The runner only copies and rotates arrays (it knows no kernel), so what makes an input valid
lives here, on the compiler side, per factory (explicit registration, like the kernels): token
and expert ids in range, a page table that is a permutation, the context position the
benchmark decodes at (`TIMING_DEPTH`), quantized weights as random valid blocks
(`kernels.testing.random_weights`), and finite floats everywhere else. Outputs are filled
too: their values are never read, but nothing the runner hands a kernel is zeros.

The shapes are concrete: the paged KV cache's symbolic page count becomes the page-table
length, and `concrete_kernel` binds every parameter of the PrimFunc to these arrays' shapes,
which is the form the tuner schedules, builds and records (MetaSchedule's argument info
needs static shapes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from tvm import tirx

from sparkinfer.errors import SparkInferError
from sparkinfer.grammar import mask_words
from sparkinfer.kernels import gemv_q8, sampling
from sparkinfer.kernels.gemv import weight_view
from sparkinfer.kernels.testing import random_weights
from sparkinfer.kernels.use import weight_format_named

# The context position attention and RoPE are timed at: `sparkinfer bench`'s default depth.
TIMING_DEPTH = 128

Arrays = list[np.ndarray]
InputMaker = Callable[..., Arrays]


def _f32(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32)


def _words(ggml_type: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random valid blocks of a weight with `shape` = (*rows, cols), as the kernel's words."""
    t = weight_format_named(ggml_type)
    return weight_view(t, random_weights(t, shape, rng))


def _ids(rng: np.random.Generator, n_experts: int, n_used: int) -> np.ndarray:
    return rng.permutation(n_experts)[:n_used].astype(np.int32)


def _paged(rng: np.random.Generator, n_kv: int, head_dim: int, page_size: int, max_pages: int) -> Arrays:
    """pos, page_table, k_cache, v_cache for a context of TIMING_DEPTH + 1 tokens (or as many
    as the pages hold)."""
    pos = np.array([min(TIMING_DEPTH, page_size * max_pages - 1)], np.int32)
    page_table = rng.permutation(max_pages).astype(np.int32)
    cache = (max_pages, page_size, n_kv, head_dim)
    return [pos, page_table, _f32(rng, *cache).astype(np.float16), _f32(rng, *cache).astype(np.float16)]


def _embedding(rng: np.random.Generator, ggml_type: str, vocab: int, hidden: int) -> Arrays:
    return [_words(ggml_type, (vocab, hidden), rng), rng.integers(0, vocab, 1, dtype=np.int32), _f32(rng, hidden)]


def _rms_norm(rng: np.random.Generator, hidden: int, eps: float) -> Arrays:
    return [_f32(rng, hidden) for _ in range(3)]


def _add_rms_norm(rng: np.random.Generator, hidden: int, eps: float) -> Arrays:
    return [_f32(rng, hidden) for _ in range(5)]


def _gemv(rng: np.random.Generator, ggml_type: str, n: int, k: int) -> Arrays:
    return [_words(ggml_type, (n, k), rng), _f32(rng, k), _f32(rng, n)]


def _gemv_qkv(rng: np.random.Generator, ggml_type: str, n_q: int, n_k: int, n_v: int, k: int) -> Arrays:
    rows = [n for n in (n_q, n_k, n_v) if n]
    return [*(_words(ggml_type, (n, k), rng) for n in rows), _f32(rng, k), *(_f32(rng, n) for n in rows)]


def _gemv_normed(rng: np.random.Generator, ggml_type: str, n: int, k: int, eps: float) -> Arrays:
    return [_words(ggml_type, (n, k), rng), _f32(rng, k), _f32(rng, k), _f32(rng, n)]


def _gemv_residual(rng: np.random.Generator, ggml_type: str, n: int, k: int) -> Arrays:
    return [_words(ggml_type, (n, k), rng), _f32(rng, k), _f32(rng, n), _f32(rng, n)]


def _gemv_qkv_normed(rng: np.random.Generator, ggml_type: str, n_q: int, n_k: int, n_v: int, k: int,
                     eps: float) -> Arrays:
    rows = [n for n in (n_q, n_k, n_v) if n]
    return [*(_words(ggml_type, (n, k), rng) for n in rows), _f32(rng, k), _f32(rng, k), *(_f32(rng, n) for n in rows)]


def _rope(rng: np.random.Generator, n_heads: int, n_kv: int, head_dim: int, page_size: int, max_pages: int,
          eps: float, theta: float) -> Arrays:
    q, k, v = _f32(rng, n_heads * head_dim), _f32(rng, n_kv * head_dim), _f32(rng, n_kv * head_dim)
    return [q, k, v, _f32(rng, head_dim), _f32(rng, head_dim), *_paged(rng, n_kv, head_dim, page_size, max_pages),
            _f32(rng, n_heads, head_dim)]


def _attention(rng: np.random.Generator, n_heads: int, n_kv: int, head_dim: int, page_size: int, max_pages: int,
               splits: int) -> Arrays:
    pos, page_table, k_cache, v_cache = _paged(rng, n_kv, head_dim, page_size, max_pages)
    return [_f32(rng, n_heads, head_dim), k_cache, v_cache, page_table, pos, _f32(rng, n_heads, splits, head_dim),
            _f32(rng, n_heads, splits)]


def _attention_combine(rng: np.random.Generator, n_heads: int, splits: int, head_dim: int) -> Arrays:
    return [_f32(rng, n_heads, splits, head_dim), _f32(rng, n_heads, splits), _f32(rng, n_heads * head_dim)]


def _router_topk(rng: np.random.Generator, n_experts: int, n_used: int) -> Arrays:
    return [_f32(rng, n_experts), _ids(rng, n_experts, n_used), _f32(rng, n_used)]


def _moe_gate_up_silu(rng: np.random.Generator, type_gate: str, type_up: str, n_experts: int, n_used: int,
                      n_ffn: int, hidden: int) -> Arrays:
    return [_words(type_gate, (n_experts, n_ffn, hidden), rng), _words(type_up, (n_experts, n_ffn, hidden), rng),
            _ids(rng, n_experts, n_used), _f32(rng, hidden), _f32(rng, n_used, n_ffn)]


def _moe_gate_up_silu_routed(rng: np.random.Generator, type_gate: str, type_up: str, n_experts: int, n_used: int,
                             n_ffn: int, hidden: int, eps: float) -> Arrays:
    return [_words(type_gate, (n_experts, n_ffn, hidden), rng), _words(type_up, (n_experts, n_ffn, hidden), rng),
            _f32(rng, n_experts), _f32(rng, hidden), _f32(rng, hidden), _f32(rng, n_used, n_ffn),
            _ids(rng, n_experts, n_used), _f32(rng, n_used)]


def _moe_down_residual(rng: np.random.Generator, ggml_type: str, n_experts: int, n_used: int, hidden: int,
                       n_ffn: int) -> Arrays:
    weights = rng.dirichlet(np.ones(n_used)).astype(np.float32)
    return [_words(ggml_type, (n_experts, hidden, n_ffn), rng), _ids(rng, n_experts, n_used), weights,
            _f32(rng, n_used, n_ffn), _f32(rng, hidden), _f32(rng, hidden)]


def _q8(rng: np.random.Generator, *shape: int) -> Arrays:
    """Int8 blocks of 32 (`kernels.gemv_q8.quantize_q8_1`'s outputs) of shape[..., k]."""
    *lead, k = shape
    return gemv_q8.quantize_q8_1_reference(_f32(rng, *lead, k))


def _q8_out(*shape: int) -> Arrays:
    """Room for int8 blocks of 32 of shape[..., k] (outputs: any finite fill)."""
    *lead, k = shape
    return [np.ones((*lead, k // 4), np.int32), np.ones((*lead, k // 32), np.float32),
            np.ones((*lead, k // 32), np.float32)]


def _quantize_q8_1(rng: np.random.Generator, k: int, rows: int) -> Arrays:
    lead = (rows,) if rows else ()
    return [_f32(rng, *lead, k), *_q8_out(*lead, k)]


def _add_rms_norm_q8_1(rng: np.random.Generator, hidden: int, eps: float) -> Arrays:
    return [*_add_rms_norm(rng, hidden, eps), *_q8_out(hidden)]


def _gemv_q8(rng: np.random.Generator, ggml_type: str, n: int, k: int) -> Arrays:
    return [_words(ggml_type, (n, k), rng), *_q8(rng, k), _f32(rng, n)]


def _rms_norm_q8_1(rng: np.random.Generator, hidden: int, eps: float) -> Arrays:
    return [_f32(rng, hidden), _f32(rng, hidden), *_q8_out(hidden)]


def _gemv_qkv_q8(rng: np.random.Generator, ggml_type: str, n_q: int, n_k: int, n_v: int, k: int) -> Arrays:
    rows = [n for n in (n_q, n_k, n_v) if n]
    return [*(_words(ggml_type, (n, k), rng) for n in rows), *_q8(rng, k), *(_f32(rng, n) for n in rows)]


def _attention_combine_q8_1(rng: np.random.Generator, n_heads: int, splits: int, head_dim: int) -> Arrays:
    return [_f32(rng, n_heads, splits, head_dim), _f32(rng, n_heads, splits), *_q8_out(n_heads * head_dim)]


def _moe_gate_up_silu_q8(rng: np.random.Generator, type_gate: str, type_up: str, n_experts: int, n_used: int,
                         n_ffn: int, hidden: int) -> Arrays:
    return [_words(type_gate, (n_experts, n_ffn, hidden), rng), _words(type_up, (n_experts, n_ffn, hidden), rng),
            _ids(rng, n_experts, n_used), *_q8(rng, hidden), *_q8_out(n_used, n_ffn)]


def _moe_gate_up_silu_q8_routed(rng: np.random.Generator, type_gate: str, type_up: str, n_experts: int,
                                n_used: int, n_ffn: int, hidden: int) -> Arrays:
    return [_words(type_gate, (n_experts, n_ffn, hidden), rng), _words(type_up, (n_experts, n_ffn, hidden), rng),
            _f32(rng, n_experts), *_q8(rng, hidden), *_q8_out(n_used, n_ffn), _ids(rng, n_experts, n_used),
            _f32(rng, n_used)]


def _moe_gate_up_silu_q8_routed_prefetch(rng: np.random.Generator, type_gate: str, type_up: str, n_experts: int,
                                         n_used: int, n_ffn: int, hidden: int, type_down: str) -> Arrays:
    w_gate, w_up, *rest = _moe_gate_up_silu_q8_routed(rng, type_gate, type_up, n_experts, n_used, n_ffn, hidden)
    return [w_gate, w_up, _words(type_down, (n_experts, hidden, n_ffn), rng), *rest]


def _moe_down_residual_q8(rng: np.random.Generator, ggml_type: str, n_experts: int, n_used: int, hidden: int,
                          n_ffn: int) -> Arrays:
    weights = rng.dirichlet(np.ones(n_used)).astype(np.float32)
    return [_words(ggml_type, (n_experts, hidden, n_ffn), rng), _ids(rng, n_experts, n_used), weights,
            *_q8(rng, n_used, n_ffn), _f32(rng, hidden), _f32(rng, hidden)]


# Sampling with temperature, top-p and top-k (Qwen3's chat defaults): the candidates' path.
_SAMPLE_PARAMS = np.array([0.6, 0.95, 20.0], np.float32)


def _sample_candidates(rng: np.random.Generator, vocab: int) -> Arrays:
    blocks = sampling.slices(vocab, sampling.SLICE)
    return [_f32(rng, vocab), _SAMPLE_PARAMS, rng.integers(1, 2**32, 2, dtype=np.uint32),
            np.zeros(blocks, np.uint64), np.zeros((blocks, sampling.K_MAX), np.uint64)]


def _sample_token(rng: np.random.Generator, vocab: int) -> Arrays:
    # best and cand as sample_candidates leaves them for the same logits.
    logits, seed = _f32(rng, vocab), rng.integers(1, 2**32, 2, dtype=np.uint32)
    best, cand = sampling.sample_candidates_reference(logits, _SAMPLE_PARAMS, int(seed[0]), int(seed[1]))
    return [logits, _SAMPLE_PARAMS, seed, best, cand, rng.integers(0, vocab, 1, dtype=np.int32),
            np.zeros(1, np.int32)]


def _process_logits(rng: np.random.Generator, vocab: int) -> Arrays:
    # Penalties on and a mask that allows most tokens: every branch of the kernel is taken.
    params = np.array([0.5, 0.25, 1.1], np.float32)
    mask = rng.integers(-(2**31), 2**31, mask_words(vocab), dtype=np.int64).astype(np.int32) | np.int32(0x0FFFFFFF)
    counts = rng.integers(0, 3, vocab, dtype=np.int32)
    return [_f32(rng, vocab), params, mask, counts, _f32(rng, vocab)]


def _advance(rng: np.random.Generator) -> Arrays:
    return [rng.integers(1, 1000, 1, dtype=np.int32) for _ in range(3)]


INPUT_MAKERS: dict[tuple[str, str], InputMaker] = {
    ("embedding", "embedding"): _embedding,
    ("norm", "rms_norm"): _rms_norm,
    ("norm", "add_rms_norm"): _add_rms_norm,
    ("gemv", "gemv"): _gemv,
    ("gemv", "gemv_qkv"): _gemv_qkv,
    ("gemv", "gemv_normed"): _gemv_normed,
    ("gemv", "gemv_residual"): _gemv_residual,
    ("gemv", "gemv_qkv_normed"): _gemv_qkv_normed,
    ("rope", "qk_norm_rope_kv_append"): _rope,
    ("attention", "paged_decode_attention"): _attention,
    ("attention", "attention_combine"): _attention_combine,
    ("router", "router_topk"): _router_topk,
    ("moe", "moe_gate_up_silu"): _moe_gate_up_silu,
    ("moe", "moe_gate_up_silu_routed"): _moe_gate_up_silu_routed,
    ("moe", "moe_down_residual"): _moe_down_residual,
    ("gemv_q8", "quantize_q8_1"): _quantize_q8_1,
    ("gemv_q8", "add_rms_norm_q8_1"): _add_rms_norm_q8_1,
    ("gemv_q8", "gemv_q8"): _gemv_q8,
    ("gemv_q8", "rms_norm_q8_1"): _rms_norm_q8_1,
    ("gemv_q8", "gemv_qkv_q8"): _gemv_qkv_q8,
    ("gemv_q8", "attention_combine_q8_1"): _attention_combine_q8_1,
    ("moe_q8", "moe_gate_up_silu_q8"): _moe_gate_up_silu_q8,
    ("moe_q8", "moe_gate_up_silu_q8_routed"): _moe_gate_up_silu_q8_routed,
    ("moe_q8", "moe_gate_up_silu_q8_routed_prefetch"): _moe_gate_up_silu_q8_routed_prefetch,
    ("moe_q8", "moe_down_residual_q8"): _moe_down_residual_q8,
    # the lane forms (int8_dots="lanes"): the same parameters
    ("gemv_q8", "gemv_q8_lanes"): _gemv_q8,
    ("gemv_q8", "gemv_qkv_q8_lanes"): _gemv_qkv_q8,
    ("moe_q8", "moe_gate_up_silu_q8_lanes"): _moe_gate_up_silu_q8,
    ("moe_q8", "moe_gate_up_silu_q8_routed_lanes"): _moe_gate_up_silu_q8_routed,
    ("moe_q8", "moe_down_residual_q8_lanes"): _moe_down_residual_q8,
    ("sampling", "sample_candidates"): _sample_candidates,
    ("sampling", "sample_token"): _sample_token,
    ("sampling", "advance"): _advance,
    ("logits", "process_logits"): _process_logits,
}


# The MoE kernels' stacked expert weights: (their parameter indices, the expert ids' index). A
# call reads only the experts its ids name (8 of 128: ~3.5 MB of the full-size gate and up's
# 57 MB), and the runner must rotate copies by those bytes, or the same experts stay in the L2
# call after call (session 9: the tuner then picked MoE knobs 1.6x faster alone and 4.5 % slower
# in the step, bench/NOTES.md).
EXPERT_STACKS: dict[tuple[str, str], tuple[tuple[int, ...], int]] = {
    ("moe", "moe_gate_up_silu"): ((0, 1), 2),
    ("moe", "moe_gate_up_silu_routed"): ((0, 1), 6),
    ("moe", "moe_down_residual"): ((0,), 1),
    ("moe_q8", "moe_gate_up_silu_q8"): ((0, 1), 2),
    ("moe_q8", "moe_gate_up_silu_q8_routed"): ((0, 1), 9),
    ("moe_q8", "moe_gate_up_silu_q8_routed_prefetch"): ((0, 1, 2), 10),
    ("moe_q8", "moe_down_residual_q8"): ((0,), 1),
    ("moe_q8", "moe_gate_up_silu_q8_lanes"): ((0, 1), 2),
    ("moe_q8", "moe_gate_up_silu_q8_routed_lanes"): ((0, 1), 9),
    ("moe_q8", "moe_down_residual_q8_lanes"): ((0,), 1),
}


def read_bytes(family: str, factory: str, inputs: Arrays) -> int:
    """The bytes one call of `family.factory` reads of `inputs` (its input set): all of them,
    but only the named experts of a stack of expert weights (EXPERT_STACKS)."""
    stacks, ids = EXPERT_STACKS.get((family, factory), ((), 0))
    return sum(a.nbytes * inputs[ids].size // a.shape[0] if j in stacks else a.nbytes for j, a in enumerate(inputs))


def kernel_inputs(family: str, factory: str, args: tuple[Any, ...], seed: int) -> Arrays:
    """One input set for `family.factory(*args)` (ggml types by name), in parameter order."""
    maker = INPUT_MAKERS.get((family, factory))
    if maker is None:
        raise SparkInferError(f"the tuner has no input maker for kernel {family}.{factory}: add one to "
                              "sparkinfer/tune/inputs.py")
    return maker(np.random.default_rng(seed), *args)


def concrete_kernel(func: tirx.PrimFunc, inputs: Arrays) -> tirx.PrimFunc:
    """`func` with each parameter of a symbolic shape bound to its input's shape (the paged KV
    cache's page count becomes the page table's length)."""
    if len(func.params) != len(inputs):
        raise SparkInferError(f"kernel takes {len(func.params)} parameters, the input maker gave {len(inputs)}")
    bindings = {}
    for param, array in zip(func.params, inputs):
        if len(param.shape) != array.ndim:
            raise SparkInferError(f"parameter {param.name} has {len(param.shape)} dims, its input {array.ndim}")
        if not any(isinstance(d, tirx.Var) for d in param.shape):
            continue
        # Static dims stay the very IntImm objects (specialize compares them, dtype included).
        shape = [tirx.IntImm(d.ty.dtype, n) if isinstance(d, tirx.Var) else d for d, n in zip(param.shape, array.shape)]
        bindings[param] = tirx.decl_buffer(shape, param.dtype, name=param.name, elem_offset=param.elem_offset)
    return func.specialize(bindings) if bindings else func


