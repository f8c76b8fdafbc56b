"""The decode step of Qwen3-MoE (and dense Qwen3) as a Relax IRModule.

`build_decode_step(config, type_map)` returns a `DecodeStep`: an IRModule holding one Relax
function `decode` plus the unscheduled TIR kernels it calls, the ordered list of its inputs
(what the manifest records and the runtime binds), and the list of distinct kernels with the
factory call that made each (what the compiler schedules per family). Only hyper-parameters
and the per-tensor ggml types go in; no weight value is ever read, so one module serves every
file of the same shapes and types.

`decode` parameters, in this order (docs/ARCHITECTURE.md, "The decode step"):

  state   token int32[1], pos int32[1], page_table int32[MP], sample_params float32[3],
          rng uint32[2], logits_params float32[3], token_mask int32[ceil(V / 32)],
          token_counts int32[V] (the last three read only by `decode_processed`), and with
          attention_merge="last_block" arrivals int32[NKV] (the attention's per-KV-head count of
          finished splits: 0 between launches, zero at allocation), and with router_merge="last_block"
          in a MoE model router_arrivals int32[1] (the router GEMV's count of finished rows, likewise)
  kv      k_cache_0, v_cache_0, k_cache_1, v_cache_1, ...: float16[n_pages, P, NKV, D],
          n_pages a symbolic dim shared by all caches
  weight  every tensor of the file in `gguf_file.tensor_specs` order (token_embd, then per
          layer blk.{i}.* in layout order, output_norm, output), as the word arrays
          `kernels.gemv.weight_view` gives: [*rows, row_words] of the type's word dtype;
          F32 tensors float32[shape]. Dense (qwen3) FFN weights take a leading unit
          expert dim ([1, N, row_words]): they run through the MoE kernels with one expert.

and it returns `(logits float32[V], next int32[1])`. In place: `k_cache_l`/`v_cache_l`
(the new token's K/V appended at `pos`), `rng[1]` (bumped by sampling), `token := next`
and `pos := pos + 1` (advance). So the same call, replayed, decodes token after token;
prefill is that step in a loop.

Body: embedding -> per layer (rms_norm (layer 0) or the previous layer's residual ->
Q/K/V gemv_qkv (one launch; Q+K and a V gemv where V's type differs) -> qk_norm_rope_kv_append -> paged_decode_attention -> attention_combine ->
o gemv -> add_rms_norm -> router gemv -> router_topk -> moe_gate_up_silu ->
moe_down_residual) -> rms_norm -> lm head gemv -> sample_candidates -> sample_token -> advance.
With attention_merge="last_block" paged_decode_attention_merged replaces paged_decode_attention ->
attention_combine: the attention kernel's last block of each KV head merges its splits. With
router_merge="last_block" router_gemv_topk replaces router gemv -> router_topk: the GEMV kernel's
last block picks the experts; with router_merge="gate_up" (int8 experts) moe_gate_up_silu_q8_routed
replaces router_topk -> moe_gate_up_silu_q8: every thread block of the gate/up kernel picks them.
With decode_attention="mma" paged_decode_attention_mma replaces paged_decode_attention
(paged_decode_attention_mma_merged the merged one): the same splits, on tensor cores.
With projection_activations="q8" the attention norms are rms_norm_q8_1 (int8 blocks only), Q/K/V
gemv_qkv_q8 (and gemv_q8), the combine attention_combine_q8_1 and O gemv_q8: the same launches;
with attention_norm="prologue" too, no attention norm launch: gemv_qkv_q8_normed (and
gemv_q8_normed) normalize and quantize h in each thread block.
With chunk_activations="q8" (chunk_operands "f32") the T-token step's GEMMs read their inputs
rounded by round_q8_1_rows where the decode step's kernels read int8 blocks (and its last row's
LM head is the decode step's quantize_q8_1 -> gemv_q8): float GEMMs of what the int8 GEMVs see.
With decode_launches="fused" a layer is gemv_qkv_normed (Q/K/V of rms_norm(h), computed in
the kernel) -> rope -> attention -> combine -> gemv_residual (o + h) -> gemv_normed (router)
-> moe_gate_up_silu_routed (top-k and norm inside) -> moe_down_residual: no norm launches but
output_norm's.

`decode_processed` (ENTRY_PROCESSED) is the same step with, after the lm head,
process_logits (grammar mask, penalties; kernels/logits.py) feeding sample_token, and
count_token (token_counts[next] += 1) before advance. It returns the raw logits too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType
from tvm import IRModule, relax, tirx

from sparkinfer.errors import MissingTensorError, SparkInferError, TensorShapeError
from sparkinfer.gguf_file.config import ModelConfig
from sparkinfer.grammar import mask_words
from sparkinfer.gguf_file.layout import TensorSpec, tensor_specs
from sparkinfer.kernels.gemv import DECODE_LAUNCHES, Q6_K_LAYOUTS, gemv_format, weight_format
from sparkinfer.kernels.gemm import GEMM_OPERANDS
from sparkinfer.kernels.gemv_q8 import ACTIVATIONS, INT8_DOTS, Q8_TYPES, q8_activations_misfit, q8_projections_misfit
from sparkinfer.kernels.sampling import K_MAX as SAMPLING_K_MAX, SLICE as SAMPLING_SLICE, slices as sampling_slices
from sparkinfer.kernels.use import KernelUse, kernel_args, kernel_factory
from sparkinfer.model import spec as _spec
from sparkinfer.quant.layouts import RelaidType
from sparkinfer.reference import Int8Inputs
from sparkinfer.model.spec import (
    ARRIVALS,
    ROUTER_ARRIVALS,
    ENTRY,
    ENTRY_PROCESSED,
    KV_DTYPE,
    N_PAGES,
    PAGE_SIZE,
    ROLE_KV,
    ROLE_STATE,
    ROLE_WEIGHT,
    LAYOUT_Q6_K_PLANAR,
    StepInput,
)
from sparkinfer.schedule.schedules import (
    ATTENTION_FORMS,
    ATTENTION_MERGES,
    ATTENTION_NORMS,
    DECODE_ATTENTIONS,
    EXPERT_PREFETCHES,
    PROGRAMMATIC_LAUNCH,
    ROUTER_MERGES,
)


_T = GGMLQuantizationType
_DENSE_FFN = ("ffn_gate", "ffn_up", "ffn_down")


def max_pages(config: ModelConfig, page_size: int = PAGE_SIZE) -> int:
    """MP: the page-table length, ceil(context_length / P)."""
    return _spec.max_pages(config.context_length, page_size)


def default_n_splits(config: ModelConfig, page_size: int = PAGE_SIZE) -> int:
    """S, the flash-decode splits: 32 (NKV x 32 (KV head, split) blocks: 128 for 4 KV heads, one
    wave on an H100's 132 SMs, where 16 left half of them idle at long context; bench/NOTES.md,
    "Decode attention v2"), never more splits than pages. The attention kernel cuts the live
    context (pos + 1) into S chunks, so short contexts do not pay for empty splits."""
    return max(1, min(32, max_pages(config, page_size)))


# ---------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------


def normalize_type_map(type_map: Mapping[str, Any]) -> dict[str, GGMLQuantizationType]:
    """name -> GGMLQuantizationType from enum members, ints or type names."""
    return {name: _spec.ggml_type(t) for name, t in type_map.items()}


def _weight_type(spec: TensorSpec, weight_fmt: GGMLQuantizationType | RelaidType) -> tuple[str, tuple[int, ...]]:
    """dtype and shape of the word array `weight_view` makes of this tensor's data, in the
    weight format the kernels read it in (its ggml type, or Q6_K_PLANAR)."""
    fmt = gemv_format(weight_fmt)
    ggml_type = fmt.ggml_type
    if spec.is_norm:
        if ggml_type != _T.F32:
            raise TensorShapeError(f"tensor '{spec.name}' is {ggml_type.name}: SparkInfer needs norm weights in F32")
        return "float32", spec.shape
    shape = (*spec.shape[:-1], fmt.row_words(spec.row_len))
    if spec.kind in _DENSE_FFN:
        shape = (1, *shape)  # one expert: the dense FFN runs through the MoE kernels
    return fmt.word_dtype, shape


def _weight_specs(config: ModelConfig, types: Mapping[str, GGMLQuantizationType]) -> list[TensorSpec]:
    specs = []
    for spec in tensor_specs(config):
        if spec.name not in types:
            if spec.name == "output.weight":  # tied embeddings: the LM head reads token_embd
                continue
            raise MissingTensorError(f"the type map gives no type for tensor '{spec.name}'")
        specs.append(spec)
    return specs


# The tensors whose readers all take planar Q6_K: the GEMVs and GEMMs on float or int8
# activations (kernels.gemv, kernels.gemv_q8, kernels.gemm) and the down projections of the MoE
# kernels (kernels.moe, kernels.moe_q8, kernels.moe_chunk; the dense FFN runs through them too).
_PLANAR_READERS = ("output", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_down_exps", "ffn_down")


def planar_tensors(config: ModelConfig, types: Mapping[str, GGMLQuantizationType], q6_k_layout: str
                   ) -> frozenset[str]:
    """The weights the step reads as planar Q6_K (the step variant q6_k_layout="planar"): the
    Q6_K tensors of _PLANAR_READERS: the LM head, the attention projections, the FFN down
    projections, on float or int8 activations alike. Not token_embd (the embedding kernels read
    it, and a tied LM head with them), nor the gate/up weights (no planar gate/up kernel yet:
    Q4_K_M has none in Q6_K)."""
    if q6_k_layout not in Q6_K_LAYOUTS:
        raise SparkInferError(f"q6_k_layout must be one of {', '.join(Q6_K_LAYOUTS)}, got {q6_k_layout!r}")
    if q6_k_layout != "planar":
        return frozenset()
    return frozenset(spec.name for spec in _weight_specs(config, types)
                     if types[spec.name] == _T.Q6_K and spec.kind in _PLANAR_READERS)


ATTENTION_PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output")


def int8_projections(types: Mapping[str, GGMLQuantizationType], layer: int) -> bool:
    """Whether the attention projections of `layer` all have an int8 form (Q8_TYPES): with
    projection_activations="q8" that layer's then take int8 activations; a layer with another
    type among them stays float."""
    return all(types[f"blk.{layer}.{kind}.weight"] in Q8_TYPES for kind in ATTENTION_PROJECTIONS)


def int8_inputs(config: ModelConfig, type_map: Mapping[str, Any], activations: str = "f32",
                projection_activations: str = "f32", head_activations: str = "f32") -> Int8Inputs:
    """Where a step with these variants reads int8 activations: the attention projections of the
    layers whose four types have an int8 form (projection_activations "q8", `int8_projections`),
    the FFN (experts or dense) of those whose gate, up and down types all do (activations "q8"),
    the LM head if its type does (head_activations "q8"). The numpy reference's `int8_inputs`."""
    types = normalize_type_map(type_map)
    moe = "_exps" if config.is_moe else ""
    layers = range(config.n_layers)
    head = "output.weight" if "output.weight" in types else "token_embd.weight"
    return Int8Inputs(
        projections=frozenset(i for i in layers if projection_activations == "q8" and int8_projections(types, i)),
        experts=frozenset(i for i in layers if activations == "q8" and all(
            types[f"blk.{i}.ffn_{kind}{moe}.weight"] in Q8_TYPES for kind in ("gate", "up", "down"))),
        head=head_activations == "q8" and types[head] in Q8_TYPES,
    )


def decode_inputs(
    config: ModelConfig, type_map: Mapping[str, Any], page_size: int = PAGE_SIZE, q6_k_layout: str = "gguf",
    attention_merge: str = "separate", router_merge: str = "separate",
) -> list[StepInput]:
    """The ordered parameters of `decode` (see the module docstring); the weights of
    `planar_tensors` as planar Q6_K words, with their layout (re-laid out at binding); the
    attention's `arrivals` counts where attention_merge is "last_block", the router's
    `router_arrivals` count where router_merge is and the model has experts."""
    types = normalize_type_map(type_map)
    planar = planar_tensors(config, types, q6_k_layout)
    mp = max_pages(config, page_size)
    inputs = [
        StepInput("token", ROLE_STATE, "int32", (1,)),
        StepInput("pos", ROLE_STATE, "int32", (1,)),
        StepInput("page_table", ROLE_STATE, "int32", (mp,)),
        StepInput("sample_params", ROLE_STATE, "float32", (3,)),
        StepInput("rng", ROLE_STATE, "uint32", (2,)),
        StepInput("logits_params", ROLE_STATE, "float32", (3,)),
        StepInput("token_mask", ROLE_STATE, "int32", (mask_words(config.vocab_size),)),
        StepInput("token_counts", ROLE_STATE, "int32", (config.vocab_size,)),
    ]
    if attention_merge == "last_block":
        inputs.append(StepInput(ARRIVALS, ROLE_STATE, "int32", (config.n_kv_heads,)))
    if router_merge == "last_block" and config.n_experts:
        inputs.append(StepInput(ROUTER_ARRIVALS, ROLE_STATE, "int32", (1,)))
    kv_shape = (N_PAGES, page_size, config.n_kv_heads, config.head_dim)
    for i in range(config.n_layers):
        inputs.append(StepInput(f"k_cache_{i}", ROLE_KV, KV_DTYPE, kv_shape))
        inputs.append(StepInput(f"v_cache_{i}", ROLE_KV, KV_DTYPE, kv_shape))
    for spec in _weight_specs(config, types):
        relaid = spec.name in planar
        dtype, shape = _weight_type(spec, weight_format(types[spec.name], q6_k_layout) if relaid else types[spec.name])
        inputs.append(StepInput(_param_name(spec.name), ROLE_WEIGHT, dtype, shape, spec.name, types[spec.name].name,
                                LAYOUT_Q6_K_PLANAR if relaid else None))
    return inputs


def _param_name(tensor: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", tensor.removesuffix(".weight"))


# ---------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------


@dataclass
class DecodeStep:
    """What `build_decode_step` returns."""

    mod: IRModule
    inputs: list[StepInput]
    kernels: list[KernelUse]
    config: ModelConfig
    page_size: int
    max_pages: int
    n_splits: int
    # name -> the PrimFunc exactly as its factory made it (the form a tuning log records)
    originals: dict[str, tirx.PrimFunc] = field(default_factory=dict)
    # T of each T-token step in the module (`prefill_T` and `score_T`), ascending
    prefill_chunks: tuple[int, ...] = ()
    # how its CUDA kernels are launched (PROGRAMMATIC_LAUNCH; compiler.pipeline.build_step)
    programmatic_launch: str = "off"
    # where the decode attention's splits are merged (ATTENTION_MERGES; "last_block" is CUDA's)
    attention_merge: str = "separate"
    # where a MoE layer's experts are picked (ROUTER_MERGES; "last_block" is CUDA's)
    router_merge: str = "separate"
    # how the decode attention multiplies (DECODE_ATTENTIONS; "mma" is CUDA's)
    decode_attention: str = "simt"
    # whether the routed gate/up prefetches the down experts into the L2 (EXPERT_PREFETCHES; CUDA's)
    expert_prefetch: str = "off"
    # where the int8 attention input is normalized (ATTENTION_NORMS; "prologue" is CUDA's)
    attention_norm: str = "separate"
    # whether the T-token step's GEMM inputs are rounded as the int8 GEMVs see them (ACTIVATIONS;
    # "q8" is the cpu build's)
    chunk_activations: str = "f32"
    # the form of the int8 GEMVs' sums (INT8_DOTS; "lanes" is the cpu build's)
    int8_dots: str = "sub_block"


class _Kernels:
    """Adds each distinct factory call to the module once, under a deterministic name."""

    def __init__(self, bb: relax.BlockBuilder) -> None:
        self._bb = bb
        self._gvars: dict[tuple[str, str, tuple[Any, ...]], relax.GlobalVar] = {}
        self._names: set[str] = set()
        self.uses: list[KernelUse] = []
        self.originals: dict[str, tirx.PrimFunc] = {}  # name -> the factory's PrimFunc, as made

    def __call__(self, family: str, factory: str, *args: Any) -> relax.GlobalVar:
        key = (family, factory, kernel_args(args))
        if key in self._gvars:
            return self._gvars[key]
        func = kernel_factory(family, factory)(*args)
        if not isinstance(func, tirx.PrimFunc):
            raise TypeError(f"sparkinfer.kernels.{family}.{factory}{args} returned {type(func).__name__}, not a PrimFunc")
        base = _symbol(func, factory)
        name, n = base, 1
        while name in self._names:
            name, n = f"{base}_{n}", n + 1
        self._names.add(name)
        self.originals[name] = func
        # The GlobalVar name becomes the symbol (AttachGlobalSymbol); a stale attr would clash.
        if func.attrs is not None and "global_symbol" in func.attrs:
            func = func.without_attr("global_symbol")
        gvar = self._bb.add_func(func, name)
        self._gvars[key] = gvar
        if gvar.name_hint != name:
            # BlockBuilder found a structurally equal kernel already in the module (another
            # factory call made the same function): the call shares it.
            self._names.discard(name)
            del self.originals[name]
            return gvar
        self.uses.append(KernelUse(gvar.name_hint, family, factory, key[2]))
        return gvar


def _symbol(func: tirx.PrimFunc, factory: str) -> str:
    if func.attrs is not None and "global_symbol" in func.attrs:
        symbol = str(func.attrs["global_symbol"])
        if symbol != "main":  # te.create_prim_func's default says nothing
            return re.sub(r"[^A-Za-z0-9_]", "_", symbol)
    return factory


# ---------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------


def _tensor(shape: Iterable[Any], dtype: str) -> relax.TensorType:
    return relax.TensorType(list(shape), dtype)


@dataclass(frozen=True)
class Normed:
    """A GEMV input left to its kernel to normalize: rmsnorm(h) * w (the fused launches), and
    with `int8` to quantize too (`gemv_q8.gemv_qkv_q8_normed`, attention_norm "prologue")."""

    h: relax.Var
    w: relax.Var
    int8: bool = False


class _StepBuilder:
    def __init__(self, config: ModelConfig, types: dict[str, GGMLQuantizationType], page_size: int,
                 n_splits: int, activations: str = "f32", chunk_operands: str = "f32",
                 decode_launches: str = "split", q6_k_layout: str = "gguf", attention_form: str = "read_ahead",
                 attention_merge: str = "separate", router_merge: str = "separate",
                 decode_attention: str = "simt", projection_activations: str = "f32",
                 head_activations: str = "f32", expert_prefetch: str = "off",
                 attention_norm: str = "separate", chunk_activations: str = "f32",
                 int8_dots: str = "sub_block", attention_tiles: tuple[int, int] | None = None) -> None:
        self.c = config
        self.attention_tiles = attention_tiles
        self.lane_form = int8_dots == "lanes"
        self.round_chunk_inputs = chunk_activations == "q8"
        self.norm_in_projections = attention_norm == "prologue"
        self.prefetch_down = expert_prefetch == "down"
        self.decode_attention = decode_attention
        self.fused = decode_launches == "fused"
        self.chunk_operands = chunk_operands
        self.attention_form = attention_form
        self.merge_in_last_block = attention_merge == "last_block"
        self.route_in_last_block = router_merge == "last_block"
        self.route_in_gate_up = router_merge == "gate_up"
        self.types = types
        self.int8 = int8_inputs(config, types, activations, projection_activations, head_activations)
        self.P = page_size
        self.MP = max_pages(config, page_size)
        self.S = n_splits
        self.bb = relax.BlockBuilder()
        self.k = _Kernels(self.bb)
        self.inputs = decode_inputs(config, types, page_size, q6_k_layout, attention_merge, router_merge)
        # the weights decode_inputs lays out as planar Q6_K (planar_tensors), read from its inputs
        self.planar = frozenset(inp.tensor for inp in self.inputs if inp.layout == LAYOUT_Q6_K_PLANAR)
        self.params: dict[str, relax.Var] = {}

    def _fresh_params(self, extra: list[StepInput]) -> list[relax.Var]:
        """New parameter Vars (a Var belongs to one function) for `extra` + the step inputs, in
        call order; `self.params` maps names (GGUF tensor names for weights) to them."""
        n_pages = tirx.Var(N_PAGES, "int64")
        self.params = {}
        for inp in extra + self.inputs:
            shape = [n_pages if d == N_PAGES else d for d in inp.shape]
            self.params[inp.tensor or inp.name] = relax.Var(inp.name, _tensor(shape, inp.dtype))
        return list(self.params.values())

    def _checked_inputs(self, extra: list[StepInput]) -> dict[str, Any]:
        """Relax's `num_input`: the parameters before the weights. The VM checks their dtype,
        rank and shape on every call; of the weights it checks only symbolic dims, of which
        they have none. Weights are bound once, as the manifest's dtype and shape after their
        byte count is checked (runtime/weights.py); skipping their checks drops two VM
        instructions per weight from every step (bench/NOTES.md, "CPU decode")."""
        inputs = extra + self.inputs
        checked = sum(inp.role != ROLE_WEIGHT for inp in inputs)
        if any(inp.role != ROLE_WEIGHT for inp in inputs[checked:]):
            raise AssertionError("the step's weights must be its last parameters")
        return {"num_input": checked}

    # helpers ---------------------------------------------------------------------------

    def t(self, name: str) -> GGMLQuantizationType:
        return self.types[name]

    def w_fmt(self, name: str) -> GGMLQuantizationType | RelaidType:
        """The weight format the kernels read tensor `name` in: its ggml type, or Q6_K_PLANAR."""
        return weight_format(self.t(name), "planar") if name in self.planar else self.t(name)

    def call(self, gvar: relax.GlobalVar, args: list[relax.Expr], outs: list[relax.TensorType], name: str) -> Any:
        expr = relax.call_tir(gvar, args, outs if len(outs) > 1 else outs[0])
        return self._emit(expr, len(outs), name)

    def call_inplace(self, gvar: relax.GlobalVar, args: list[relax.Expr], inplace: list[int],
                     outs: list[relax.TensorType], name: str) -> Any:
        expr = relax.call_tir_inplace(gvar, args, inplace, outs if len(outs) > 1 else outs[0])
        return self._emit(expr, len(outs), name)

    def _emit(self, expr: relax.Expr, n_out: int, name: str) -> Any:
        var = self.bb.emit(expr, name_hint=name)
        if n_out == 1:
            return var
        return [self.bb.emit(relax.TupleGetItem(var, i), name_hint=f"{name}_{i}") for i in range(n_out)]

    def f32(self, *shape: int) -> relax.TensorType:
        return _tensor(shape, "float32")

    def dots(self, factory: str) -> str:
        """The int8 GEMV factory `factory`, or its lane form's (int8_dots "lanes")."""
        return f"{factory}_lanes" if self.lane_form else factory

    def quantize_q8(self, x: relax.Expr, k: int, rows: int, label: str) -> list[relax.Var]:
        """x f32[(rows,) k] as int8 blocks of 32: [xq int32 words, xd scales, xs sums]."""
        gv = self.k("gemv_q8", "quantize_q8_1", k, rows)
        return self.call(gv, [x], self._q8_types(k, rows), label)

    def _q8_types(self, k: int, rows: int) -> list[relax.TensorType]:
        """The types of `quantize_q8_1(k, rows)`'s outputs: xq int32 words, xd scales, xs sums."""
        lead = (rows,) if rows else ()
        return [_tensor((*lead, k // 4), "int32"), self.f32(*lead, k // 32), self.f32(*lead, k // 32)]

    def gemv(self, name: str, x: "relax.Expr | Normed | list[relax.Var]", label: str) -> relax.Var:
        """W . x for x float, normed in the kernel (Normed), or int8 blocks ([xq, xd, xs])."""
        n, k = self.spec_shape(name)
        if isinstance(x, list):
            gv = self.k("gemv_q8", self.dots("gemv_q8"), self.w_fmt(name), n, k)
            return self.call(gv, [self.params[name], *x], [self.f32(n)], label)
        if isinstance(x, Normed):
            family, factory = ("gemv_q8", "gemv_q8_normed") if x.int8 else ("gemv", "gemv_normed")
            gv = self.k(family, factory, self.w_fmt(name), n, k, self.c.rms_eps)
            return self.call(gv, [self.params[name], x.h, x.w], [self.f32(n)], label)
        gv = self.k("gemv", "gemv", self.w_fmt(name), n, k)
        return self.call(gv, [self.params[name], x], [self.f32(n)], label)

    def normed(self, h: relax.Var, weight: str) -> Normed:
        return Normed(h, self.params[weight])

    def qkv(self, w: str, x: "relax.Expr | Normed | list[relax.Var]", i: int) -> list[relax.Var]:
        """Q, K and V of layer i, in as few launches as their types allow: one `gemv_qkv`
        where all three share a type; where two do (Q4_K_M's Q4_K Q+K beside a Q6_K V, or
        a Q8_0 K+V beside a Q4_K Q), that pair in one `gemv_qkv` of n_v = 0 (the kernel is
        two or three GEMVs sharing x; its q/k names are positions) and the third in a `gemv`;
        else three `gemv` launches. On int8 blocks x ([xq, xd, xs]) the same with
        `gemv_qkv_q8` and `gemv_q8`."""
        kinds = ("q", "k", "v")
        names = [w + f"attn_{kind}.weight" for kind in kinds]
        out: list[relax.Var | None] = [None, None, None]
        for t in dict.fromkeys(self.w_fmt(n) for n in names):  # distinct formats, in q/k/v order
            group = [j for j, n in enumerate(names) if self.w_fmt(n) == t]
            if len(group) == 1:
                j = group[0]
                out[j] = self.gemv(names[j], x, f"{kinds[j]}{i}")
                continue
            rows = [self.spec_shape(names[j])[0] for j in group]
            h = self.spec_shape(names[group[0]])[1]
            n_rows = (t, rows[0], rows[1], rows[2] if len(group) == 3 else 0, h)
            if isinstance(x, Normed):
                family, factory = ("gemv_q8", "gemv_qkv_q8_normed") if x.int8 else ("gemv", "gemv_qkv_normed")
                gv, x_args = self.k(family, factory, *n_rows, self.c.rms_eps), [x.h, x.w]
            elif isinstance(x, list):
                gv, x_args = self.k("gemv_q8", self.dots("gemv_qkv_q8"), *n_rows), x
            else:
                gv, x_args = self.k("gemv", "gemv_qkv", *n_rows), [x]
            results = self.call(gv, [self.params[names[j]] for j in group] + x_args,
                                [self.f32(r) for r in rows], "".join(kinds[j] for j in group) + str(i))
            for j, var in zip(group, results):
                out[j] = var
        return out  # type: ignore[return-value]

    def spec_shape(self, name: str) -> tuple[int, ...]:
        return self._specs[name].shape

    # the step --------------------------------------------------------------------------

    def build(self, chunks: tuple[int, ...]) -> IRModule:
        self._specs = {s.name: s for s in tensor_specs(self.c)}
        for entry, processed in ((ENTRY, False), (ENTRY_PROCESSED, True)):
            with self.bb.function(entry, self._fresh_params([]), attrs=self._checked_inputs([])):
                with self.bb.dataflow():
                    logits, nxt = self._body(processed)
                    logits = self.bb.emit_output(logits)
                    nxt = self.bb.emit_output(nxt)
                self.bb.emit_func_output(relax.Tuple([logits, nxt]))
        for n_tokens in chunks:
            for all_logits in (False, True):
                name = _spec.chunk_entry(n_tokens, all_logits)
                extra = _spec.chunk_inputs(n_tokens)
                with self.bb.function(name, self._fresh_params(extra), attrs=self._checked_inputs(extra)):
                    with self.bb.dataflow():
                        outs = [self.bb.emit_output(o) for o in self._chunk_body(n_tokens, all_logits)]
                    self.bb.emit_func_output(relax.Tuple(outs))
        return self.bb.finalize()

    def _body(self, processed: bool) -> tuple[relax.Var, relax.Var]:
        c, p = self.c, self.params
        H, V = c.hidden, c.vocab_size
        embd = "token_embd.weight"
        gv = self.k("embedding", "embedding", self.t(embd), V, H)
        h = self.call(gv, [p[embd], p["token"]], [self.f32(H)], "embd")
        x = None if self.fused else self.attention_norm(h, 0, "attn_in")
        for i in range(c.n_layers):
            h, x = self._layer(i, h, x)
        if x is None:
            x = self.output_norm(h, "out_norm")
        # x is rms_norm(h, output_norm) after the last layer (its int8 blocks for an int8 head)
        logits = self.gemv(self.head_name(), x, "logits")
        sampled = logits
        if processed:
            gv = self.k("logits", "process_logits", V)
            sampled = self.call(gv, [logits, p["logits_params"], p["token_mask"], p["token_counts"]],
                                [self.f32(V)], "processed")
        nxt = self.sample(sampled)
        if processed:
            gv = self.k("logits", "count_token", V)
            nxt, _counts = self.call_inplace(gv, [nxt, p["token_counts"]], [0, 1],
                                             [_tensor((1,), "int32"), _tensor((V,), "int32")], "count")
        # advance writes token := next and pos := pos + 1. `next` is listed as an in-place
        # output too, so the returned `next` depends on this call and no pass can drop it.
        gv = self.k("sampling", "advance")
        nxt, _tok, _pos = self.call_inplace(gv, [nxt, p["token"], p["pos"]], [0, 1, 2],
                                            [_tensor((1,), "int32")] * 3, "advance")
        return logits, nxt

    def sample(self, logits: relax.Var) -> relax.Var:
        """next int32[1] drawn from logits f32[V] (rng[1] bumped in place): the blocks'
        candidates, then the draw over them (kernels/sampling.py)."""
        p, V = self.params, self.c.vocab_size
        nb = sampling_slices(V, SAMPLING_SLICE)
        gv = self.k("sampling", "sample_candidates", V)
        best, cand = self.call(gv, [logits, p["sample_params"], p["rng"]],
                               [_tensor((nb,), "uint64"), _tensor((nb, SAMPLING_K_MAX), "uint64")], "candidates")
        gv = self.k("sampling", "sample_token", V)
        nxt, _rng, _path = self.call_inplace(gv, [logits, p["sample_params"], p["rng"], best, cand], [-1, 2, -1],
                                             [_tensor((1,), "int32"), _tensor((2,), "uint32"),
                                              _tensor((1,), "int32")], "sample")
        return nxt

    def rms_norm(self, h: relax.Var, weight: str, label: str) -> relax.Var:
        gv = self.k("norm", "rms_norm", self.c.hidden, self.c.rms_eps)
        return self.call(gv, [h, self.params[weight]], [self.f32(self.c.hidden)], label)

    def _int8_projections(self, i: int) -> bool:
        """Whether layer i's Q, K, V and O take int8 activations (projection_activations="q8")."""
        return i in self.int8.projections

    def norm_for(self, h: relax.Var, weight: str, int8: bool, label: str) -> "relax.Var | list[relax.Var]":
        """rms_norm(h, weight) as its consumer reads it: float, or (`int8`) only its int8 blocks,
        quantized in the norm's launch (`gemv_q8.rms_norm_q8_1`)."""
        if not int8:
            return self.rms_norm(h, weight, label)
        gv = self.k("gemv_q8", "rms_norm_q8_1", self.c.hidden, self.c.rms_eps)
        return self.call(gv, [h, self.params[weight]], self._q8_types(self.c.hidden, 0), label)

    def attention_norm(self, h: relax.Var, i: int, label: str) -> "relax.Var | list[relax.Var] | Normed":
        """rms_norm(h, blk.i.attn_norm), layer i's Q/K/V input: its int8 blocks where those take
        int8 activations (`norm_for`), or with attention_norm "prologue" there no launch: h
        and the weight, which those kernels normalize and quantize themselves."""
        weight = f"blk.{i}.attn_norm.weight"
        if self.norm_in_projections and self._int8_projections(i):
            return Normed(h, self.params[weight], int8=True)
        return self.norm_for(h, weight, self._int8_projections(i), label)

    def head_name(self) -> str:
        """The LM head's weight: output.weight, or token_embd.weight where the file ties them."""
        return "output.weight" if "output.weight" in self.types else "token_embd.weight"

    def _int8_head(self) -> bool:
        """Whether the LM head takes int8 activations (head_activations="q8" and a type of Q8_TYPES)."""
        return self.int8.head

    def output_norm(self, h: relax.Var, label: str) -> "relax.Var | list[relax.Var]":
        """rms_norm(h, output_norm), the LM head's input: its int8 blocks where the head takes
        int8 activations (`_int8_head`; `norm_for`)."""
        return self.norm_for(h, "output_norm.weight", self._int8_head(), label)

    def _layer(self, i: int, h: relax.Var, x: "relax.Var | list[relax.Var] | Normed | None"
               ) -> "tuple[relax.Var, relax.Var | list[relax.Var] | Normed | None]":
        """h: residual stream entering layer i; x: rms_norm(h, attn_norm) (its int8 blocks where
        the layer's projections take them, or h to normalize and quantize there: `attention_norm`),
        or None in the fused launches (the Q/K/V GEMVs normalize h themselves). Returns the
        residual after the layer and its norm for the next consumer (next attn_norm or
        output_norm; None in the fused launches)."""
        c, p = self.c, self.params
        w = f"blk.{i}."
        H, NH, NKV, D = c.hidden, c.n_heads, c.n_kv_heads, c.head_dim
        q, k, v = self.qkv(w, self.normed(h, w + "attn_norm.weight") if x is None else x, i)
        kc, vc = p[f"k_cache_{i}"], p[f"v_cache_{i}"]
        cache_t = kc.ty
        gv = self.k("rope", "qk_norm_rope_kv_append", NH, NKV, D, self.P, self.MP, c.rms_eps, c.rope_theta)
        q_rot, kc, vc = self.call_inplace(
            gv, [q, k, v, p[w + "attn_q_norm.weight"], p[w + "attn_k_norm.weight"], p["pos"], p["page_table"], kc, vc],
            [-1, 7, 8], [self.f32(NH, D), cache_t, cache_t], f"rope{i}")
        att = self.attention(q_rot, kc, vc, i, self._int8_projections(i))
        if self.fused:
            # the residual add in the output projection's epilogue; the norm in its consumers
            name = w + "attn_output.weight"
            n, k = self.spec_shape(name)
            gv = self.k("gemv", "gemv_residual", self.w_fmt(name), n, k)
            h = self.call(gv, [p[name], att, h], [self.f32(H)], f"ao{i}")
            f: relax.Var | Normed = self.normed(h, w + "ffn_norm.weight")
            f_q8 = None
        else:
            ao = self.gemv(w + "attn_output.weight", att, f"ao{i}")
            h, f, f_q8 = self._ffn_norm(i, ao, h)
        h = self._moe(i, h, f, f_q8) if c.is_moe else self._dense_ffn(i, h, f, f_q8)
        if self.fused:
            return h, None
        if i + 1 < c.n_layers:
            return h, self.attention_norm(h, i + 1, f"norm{i + 1}")
        return h, self.output_norm(h, f"norm{i + 1}")

    def attention(self, q_rot: relax.Var, kc: relax.Var, vc: relax.Var, i: int, int8: bool
                  ) -> "relax.Var | list[relax.Var]":
        """Layer i's attention output f32[NH * D] (`int8`: its int8 blocks, for an int8 O): its
        splits, then their combine (`gemv_q8.attention_combine_q8_1` quantizes), in two launches,
        or (merge_in_last_block) in one, which counts in `arrivals` and leaves it at 0 (and then
        a `quantize_q8_1` launch where `int8`)."""
        c, p = self.c, self.params
        NH, NKV, D = c.n_heads, c.n_kv_heads, c.head_dim
        parts = [self.f32(NH, self.S, D), self.f32(NH, self.S)]
        if self.merge_in_last_block:
            factory = "paged_decode_attention_mma_merged" if self.decode_attention == "mma" else \
                "paged_decode_attention_merged"
            gv = self.k("attention", factory, NH, NKV, D, self.P, self.MP, self.S)
            arrivals = p[ARRIVALS]
            _arrivals, _o, _lse, att = self.call_inplace(
                gv, [q_rot, kc, vc, p["page_table"], p["pos"], arrivals], [5, -1, -1, -1],
                [_tensor((NKV,), "int32"), *parts, self.f32(NH * D)], f"att{i}")
            return self.quantize_q8(att, NH * D, 0, f"att_q{i}") if int8 else att
        factory = "paged_decode_attention_mma" if self.decode_attention == "mma" else "paged_decode_attention"
        tiles = self.attention_tiles or ()  # (streams, tile) where the caller picks them
        gv = self.k("attention", factory, NH, NKV, D, self.P, self.MP, self.S, *tiles)
        o, lse = self.call(gv, [q_rot, kc, vc, p["page_table"], p["pos"]], parts, f"attn{i}")
        if int8:
            gv = self.k("gemv_q8", "attention_combine_q8_1", NH, self.S, D)
            return self.call(gv, [o, lse], self._q8_types(NH * D, 0), f"att{i}")
        gv = self.k("attention", "attention_combine", NH, self.S, D)
        return self.call(gv, [o, lse], [self.f32(NH * D)], f"att{i}")

    def _ffn_norm(self, i: int, ao: relax.Var, h: relax.Var) -> tuple[relax.Var, relax.Var, list[relax.Var] | None]:
        """The residual after the attention, its norm (the FFN input) and, where the experts take
        int8 activations, that input's int8 blocks too, quantized in the norm's launch
        (`gemv_q8.add_rms_norm_q8_1`) instead of a launch of their own."""
        c = self.c
        H = c.hidden
        args = [ao, h, self.params[f"blk.{i}.ffn_norm.weight"]]
        if not self._int8_experts(i):
            gv = self.k("norm", "add_rms_norm", H, c.rms_eps)
            h, f = self.call(gv, args, [self.f32(H), self.f32(H)], f"ffn_in{i}")
            return h, f, None
        gv = self.k("gemv_q8", "add_rms_norm_q8_1", H, c.rms_eps)
        h, f, *f_q8 = self.call(gv, args, [self.f32(H), self.f32(H), *self._q8_types(H, 0)], f"ffn_in{i}")
        return h, f, f_q8

    def _ffn_weights(self, i: int) -> tuple[str, str, str]:
        """Layer i's gate, up and down weights: its experts' or its dense FFN's."""
        g, u, d = (f"blk.{i}.ffn_{kind}{'_exps' if self.c.is_moe else ''}.weight" for kind in ("gate", "up", "down"))
        return g, u, d

    def _ffn_input(self, f: relax.Var | Normed, i: int) -> relax.Var:
        """The expert kernels' x: f itself, or in the fused launches where gate/up does not
        normalize h itself (a dense FFN, int8 experts) rms_norm(h, ffn_norm)."""
        if isinstance(f, Normed):
            return self.call(self.k("norm", "rms_norm", self.c.hidden, self.c.rms_eps), [f.h, f.w],
                             [self.f32(self.c.hidden)], f"ffn_in{i}")
        return f

    def _moe(self, i: int, h: relax.Var, f: relax.Var | Normed, f_q8: list[relax.Var] | None) -> relax.Var:
        """f_q8: f's int8 blocks where `_ffn_norm` quantized it (None: the experts do if int8)."""
        c = self.c
        w = f"blk.{i}."
        E, KU, I, H = c.n_experts, c.n_experts_used, c.expert_ffn, c.hidden
        g, u, d = self._ffn_weights(i)
        if self.route_in_last_block:
            # build_decode_step allows it with decode_launches "split" only, where f is x itself
            assert not isinstance(f, Normed)
            ids, weights = self.route(w + "ffn_gate_inp.weight", f, i)
            return self._experts(w, "_exps", E, KU, I, H, ids, weights, h, f, i, f_q8)
        router = self.gemv(w + "ffn_gate_inp.weight", f, f"router{i}")
        if self.route_in_gate_up and self._int8_experts(i):
            return self._routed_int8_experts(w, router, h, f, i, f_q8)
        if isinstance(f, Normed) and not self._int8_experts(i):
            # router_topk and the FFN norm run inside gate/up, which writes ids and weights
            gv = self.k("moe", "moe_gate_up_silu_routed", self.t(g), self.t(u), E, KU, I, H, c.rms_eps)
            act, ids, weights = self.call(gv, [self.params[g], self.params[u], router, f.h, f.w],
                                          [self.f32(KU, I), _tensor((KU,), "int32"), self.f32(KU)], f"act{i}")
            return self._down(d, E, KU, H, I, ids, weights, act, h, i)
        gv = self.k("router", "router_topk", E, KU)
        ids, weights = self.call(gv, [router], [_tensor((KU,), "int32"), self.f32(KU)], f"topk{i}")
        return self._experts(w, "_exps", E, KU, I, H, ids, weights, h, self._ffn_input(f, i), i, f_q8)

    def _routed_int8_experts(self, w: str, router: relax.Var, h: relax.Var, f: relax.Var, i: int,
                             f_q8: list[relax.Var] | None) -> relax.Var:
        """Layer i's int8 experts with router_topk inside the gate/up kernel (router_merge
        "gate_up"), which writes the ids and weights that the down kernel reads."""
        c, p = self.c, self.params
        E, KU, I, H = c.n_experts, c.n_experts_used, c.expert_ffn, c.hidden
        g, u, d = self._ffn_weights(i)
        xq = f_q8 if f_q8 is not None else self.quantize_q8(f, H, 0, f"ffn_q{i}")
        if self.prefetch_down:  # gate/up also takes the down experts, to ask the L2 for the chosen ones
            gv = self.k("moe_q8", "moe_gate_up_silu_q8_routed_prefetch", self.t(g), self.t(u), E, KU, I, H,
                        self.w_fmt(d))
            stacks = [p[g], p[u], p[d]]
        else:
            gv = self.k("moe_q8", self.dots("moe_gate_up_silu_q8_routed"), self.t(g), self.t(u), E, KU, I, H)
            stacks = [p[g], p[u]]
        *aq, ids, weights = self.call(gv, [*stacks, router, *xq],
                                      [*self._q8_types(I, KU), _tensor((KU,), "int32"), self.f32(KU)], f"act_q{i}")
        return self._down_q8(d, E, KU, H, I, ids, weights, aq, h, i)

    def route(self, name: str, x: relax.Var, i: int) -> tuple[relax.Var, relax.Var]:
        """Layer i's experts (ids, weights) from the router weight `name` and x in one launch,
        `router_gemv_topk`, which counts in `router_arrivals` and leaves it at 0."""
        c = self.c
        E, KU = c.n_experts, c.n_experts_used
        n, k = self.spec_shape(name)
        gv = self.k("router", "router_gemv_topk", self.w_fmt(name), n, k, KU)
        _arrivals, _logits, ids, weights = self.call_inplace(
            gv, [self.params[name], x, self.params[ROUTER_ARRIVALS]], [2, -1, -1, -1],
            [_tensor((1,), "int32"), self.f32(E), _tensor((KU,), "int32"), self.f32(KU)], f"route{i}")
        return ids, weights

    def _dense_ffn(self, i: int, h: relax.Var, f: relax.Var | Normed, f_q8: list[relax.Var] | None) -> relax.Var:
        # One expert, always chosen with weight 1: the MoE kernels compute SwiGLU + residual.
        c = self.c
        ids = relax.const(np.zeros(1, np.int32))
        weights = relax.const(np.ones(1, np.float32))
        return self._experts(f"blk.{i}.", "", 1, 1, c.ffn, c.hidden, ids, weights, h, self._ffn_input(f, i), i, f_q8)

    def _experts(self, w: str, suffix: str, E: int, KU: int, I: int, H: int, ids: relax.Expr,
                 weights: relax.Expr, h: relax.Var, f: relax.Var, i: int, f_q8: list[relax.Var] | None) -> relax.Var:
        p = self.params
        g, u, d = (f"{w}ffn_{kind}{suffix}.weight" for kind in ("gate", "up", "down"))
        if self._int8_experts(i):
            xq = f_q8 if f_q8 is not None else self.quantize_q8(f, H, 0, f"ffn_q{i}")
            # the SiLU activations leave the gate/up kernel as int8 blocks (its epilogue)
            gv = self.k("moe_q8", self.dots("moe_gate_up_silu_q8"), self.t(g), self.t(u), E, KU, I, H)
            aq = self.call(gv, [p[g], p[u], ids, *xq], self._q8_types(I, KU), f"act_q{i}")
            return self._down_q8(d, E, KU, H, I, ids, weights, aq, h, i)
        gv = self.k("moe", "moe_gate_up_silu", self.t(g), self.t(u), E, KU, I, H)
        act = self.call(gv, [p[g], p[u], ids, f], [self.f32(KU, I)], f"act{i}")
        return self._down(d, E, KU, H, I, ids, weights, act, h, i)

    def _int8_experts(self, i: int) -> bool:
        """Whether layer i's experts (or dense FFN) run on int8 activations (activations="q8")."""
        return i in self.int8.experts

    def _down_q8(self, d: str, E: int, KU: int, H: int, I: int, ids: relax.Expr, weights: relax.Expr,
                 aq: Iterable[relax.Var], h: relax.Var, i: int) -> relax.Var:
        """The down projection, weighted sum and residual on the gate/up kernel's int8 blocks."""
        gv = self.k("moe_q8", self.dots("moe_down_residual_q8"), self.w_fmt(d), E, KU, H, I)
        return self.call(gv, [self.params[d], ids, weights, *aq, h], [self.f32(H)], f"h{i}")

    def _down(self, d: str, E: int, KU: int, H: int, I: int, ids: relax.Expr, weights: relax.Expr,
              act: relax.Var, h: relax.Var, i: int) -> relax.Var:
        gv = self.k("moe", "moe_down_residual", self.w_fmt(d), E, KU, H, I)
        return self.call(gv, [self.params[d], ids, weights, act, h], [self.f32(H)], f"h{i}")


    # the T-token step ----------------------------------------------------------------------

    def gemm(self, name: str, x: relax.Expr, n_tokens: int, label: str) -> relax.Var:
        n, k = self.spec_shape(name)
        # float32 weights (the router) keep float32 products: routing has near-ties.
        half = self.chunk_operands == "f16" and self.t(name) != GGMLQuantizationType.F32
        gv = self.k("gemm", "gemm", self.w_fmt(name), n_tokens, n, k, *((True,) if half else ()))
        return self.call(gv, [self.params[name], x], [self.f32(n_tokens, n)], label)

    def _chunk_body(self, n_tokens: int, all_logits: bool) -> list[relax.Var]:
        """`prefill_T` (all_logits False): logits of the last valid row, sampled into `next`,
        token := next, pos += n_valid. `score_T`: logits of every row, pos += n_valid."""
        c, p, NT = self.c, self.params, n_tokens
        H, V = c.hidden, c.vocab_size
        embd = "token_embd.weight"
        gv = self.k("embedding", "embedding_rows", self.t(embd), V, H, NT)
        h = self.call(gv, [p[embd], p["tokens"]], [self.f32(NT, H)], "embd")
        x = self.call(self.k("norm", "rms_norm_rows", NT, H, c.rms_eps), [h, p["blk.0.attn_norm.weight"]],
                      [self.f32(NT, H)], "attn_in")
        for i in range(c.n_layers):
            h, x = self._chunk_layer(i, NT, h, x)
        head = self.head_name()
        if all_logits:
            logits = self.gemm(head, self.chunk_input(x, NT, H, self._int8_head(), "x_head"), NT, "logits")
            gv = self.k("chunk", "advance_pos")
            pos = self.call_inplace(gv, [p["n_valid"], p["pos"]], [1], [_tensor((1,), "int32")], "advance")
            # The returned pos depends on the advance, so no pass can drop it.
            return [logits, pos]
        gv = self.k("chunk", "take_row", NT, H)
        last = self.call(gv, [x, p["n_valid"]], [self.f32(H)], "last")
        if self.round_chunk_inputs and self._int8_head():  # the decode step's own head kernels
            logits = self.gemv(head, self.quantize_q8(last, H, 0, "last_q"), "logits")
        else:
            logits = self.gemv(head, last, "logits")
        nxt = self.sample(logits)
        gv = self.k("chunk", "advance_chunk")
        nxt, _n, _tok, _pos = self.call_inplace(gv, [nxt, p["n_valid"], p["token"], p["pos"]], [0, 1, 2, 3],
                                                [_tensor((1,), "int32")] * 4, "advance")
        return [logits, nxt]

    def _chunk_layer(self, i: int, NT: int, h: relax.Var, x: relax.Var) -> tuple[relax.Var, relax.Var]:
        """`_layer` over T rows: h [T, H] the residual stream, x its attn_norm."""
        c, p = self.c, self.params
        w = f"blk.{i}."
        H, NH, NKV, D = c.hidden, c.n_heads, c.n_kv_heads, c.head_dim
        x = self.chunk_input(x, NT, H, self._int8_projections(i), f"x_q{i}")
        q, k, v = (self.gemm(w + f"attn_{kind}.weight", x, NT, f"{kind}{i}") for kind in ("q", "k", "v"))
        kc, vc = p[f"k_cache_{i}"], p[f"v_cache_{i}"]
        cache_t = kc.ty
        gv = self.k("prefill_attention", "qk_norm_rope_kv_append_rows", NT, NH, NKV, D, self.P, self.MP,
                    c.rms_eps, c.rope_theta)
        q_rot, kc, vc = self.call_inplace(
            gv, [q, k, v, p[w + "attn_q_norm.weight"], p[w + "attn_k_norm.weight"], p["pos"], p["n_valid"],
                 p["page_table"], kc, vc],
            [-1, 8, 9], [self.f32(NT, NH, D), cache_t, cache_t], f"rope{i}")
        # "f16": the attention's Q and P as tensor-core operands too (its half_operands form), in
        # the step's attention_form (the factory's compact argument; the default's call as before;
        # "registers" its own factory, which writes the kernel already scheduled)
        if self.attention_form == "registers":
            gv = self.k("prefill_attention", "causal_prefill_attention_registers", NT, NH, NKV, D, self.P, self.MP)
        else:
            compact = (True,) if self.attention_form == "compact" else ()
            half = (True, *compact) if self.chunk_operands == "f16" else ()
            gv = self.k("prefill_attention", "causal_prefill_attention", NT, NH, NKV, D, self.P, self.MP, *half)
        att = self.call(gv, [q_rot, kc, vc, p["page_table"], p["pos"], p["n_valid"]], [self.f32(NT, NH * D)],
                        f"att{i}")
        att = self.chunk_input(att, NT, NH * D, self._int8_projections(i), f"att_q{i}")
        ao = self.gemm(w + "attn_output.weight", att, NT, f"ao{i}")
        gv = self.k("norm", "add_rms_norm_rows", NT, H, c.rms_eps)
        h, f = self.call(gv, [ao, h, p[w + "ffn_norm.weight"]], [self.f32(NT, H), self.f32(NT, H)], f"ffn_in{i}")
        if c.is_moe:
            E, KU = c.n_experts, c.n_experts_used
            router = self.gemm(w + "ffn_gate_inp.weight", f, NT, f"router{i}")
            gv = self.k("router", "router_topk_rows", NT, E, KU)
            ids, weights = self.call(gv, [router], [_tensor((NT, KU), "int32"), self.f32(NT, KU)], f"topk{i}")
            h = self._chunk_experts(w, "_exps", E, KU, c.expert_ffn, NT, ids, weights, h, f, i)
        else:
            ids = relax.const(np.zeros((NT, 1), np.int32))
            weights = relax.const(np.ones((NT, 1), np.float32))
            h = self._chunk_experts(w, "", 1, 1, c.ffn, NT, ids, weights, h, f, i)
        nxt = f"blk.{i + 1}.attn_norm.weight" if i + 1 < c.n_layers else "output_norm.weight"
        x = self.call(self.k("norm", "rms_norm_rows", NT, H, c.rms_eps), [h, p[nxt]], [self.f32(NT, H)],
                      f"norm{i + 1}")
        return h, x

    def chunk_input(self, x: relax.Var, rows: int, k: int, int8: bool, label: str) -> relax.Var:
        """x f32[rows, k], a T-token step GEMM's input where the decode step's kernel reads it as
        int8 blocks if `int8`: with chunk_activations "q8" there rounded so
        (`gemv_q8.round_q8_1_rows`), else x."""
        if not (self.round_chunk_inputs and int8):
            return x
        return self.call(self.k("gemv_q8", "round_q8_1_rows", rows, k), [x], [self.f32(rows, k)], label)

    def _chunk_experts(self, w: str, suffix: str, E: int, KU: int, I: int, NT: int, ids: relax.Expr,
                       weights: relax.Expr, h: relax.Var, f: relax.Var, i: int) -> relax.Var:
        """Sort the chunk's (token, slot) pairs by expert, grouped GEMMs, weighted gather-add."""
        p, H, R = self.params, self.c.hidden, NT * KU
        g, u, d = (f"{w}ffn_{kind}{suffix}.weight" for kind in ("gate", "up", "down"))
        gv = self.k("moe_chunk", "moe_sort", NT, E, KU)
        offsets, row_token, row_of = self.call(
            gv, [ids, p["n_valid"]],
            [_tensor((E + 1,), "int32"), _tensor((R,), "int32"), _tensor((NT, KU), "int32")], f"sort{i}")
        # float16 operands (tensor cores) as the dense GEMMs have them (`gemm`), float32 weights aside
        if self.chunk_operands == "f16" and GGMLQuantizationType.F32 not in (self.t(g), self.t(u), self.t(d)):
            gv = self.k("moe_chunk", "grouped_gate_up_silu_f16", self.t(g), self.t(u), E, R, I, H, NT)
            act = self.call(gv, [p[g], p[u], offsets, row_token, f], [self.f32(R, I)], f"act{i}")
            gv = self.k("moe_chunk", "grouped_gemm_f16", self.w_fmt(d), E, R, H, I)
            down = self.call(gv, [p[d], offsets, act], [self.f32(R, H)], f"down{i}")
        else:
            int8 = self._int8_experts(i)
            f = self.chunk_input(f, NT, H, int8, f"ffn_q{i}")
            gate, up = (self.call(self.k("moe_chunk", "grouped_gemm", self.t(name), E, R, I, H, NT, True),
                                  [p[name], offsets, row_token, f], [self.f32(R, I)], f"{kind}{i}")
                        for name, kind in ((g, "gate"), (u, "up")))
            act = self.call(self.k("moe_chunk", "silu_mul", R, I), [gate, up], [self.f32(R, I)], f"act{i}")
            act = self.chunk_input(act, R, I, int8, f"act_q{i}")
            down = self.call(self.k("moe_chunk", "grouped_gemm", self.w_fmt(d), E, R, H, I, R, False),
                             [p[d], offsets, row_token, act], [self.f32(R, H)], f"down{i}")
        gv = self.k("moe_chunk", "moe_combine_residual", NT, KU, R, H)
        return self.call(gv, [down, row_of, weights, h, p["n_valid"]], [self.f32(NT, H)], f"h{i}")


def misfit_variants(config: ModelConfig, variants: Mapping[str, str]) -> dict[str, str]:
    """Of `variants` (step variant -> value), those whose kernels cannot serve `config`'s shapes
    (its attention heads, its widths), with why (each kernel family's own check): an arch's
    schedules file picks a form for the models it was measured on, and another model may not fit it."""
    from sparkinfer.kernels.attention import mma_attention_misfit
    from sparkinfer.kernels.prefill_attention import register_attention_misfit

    c = config
    checks: dict[tuple[str, str], Callable[[], str | None]] = {
        ("decode_attention", "mma"): lambda: mma_attention_misfit(c.n_heads, c.n_kv_heads, c.head_dim),
        ("attention_form", "registers"): lambda: register_attention_misfit(c.n_heads, c.n_kv_heads, c.head_dim),
        ("activations", "q8"): lambda: q8_activations_misfit(c.hidden, c.expert_ffn if c.is_moe else c.ffn),
        ("projection_activations", "q8"): lambda: q8_projections_misfit(c.hidden, c.head_dim),
    }
    out = {}
    for name, value in variants.items():
        check = checks.get((name, value))
        why = None if check is None else check()
        if why is not None:
            out[name] = why
    return out


def build_decode_step(
    config: ModelConfig,
    type_map: Mapping[str, Any],
    *,
    page_size: int = PAGE_SIZE,
    n_splits: int | None = None,
    prefill_chunks: Iterable[int] = (),
    activations: str = "f32",
    chunk_operands: str = "f32",
    decode_launches: str = "split",
    programmatic_launch: str = "off",
    q6_k_layout: str = "gguf",
    attention_form: str = "read_ahead",
    attention_merge: str = "separate",
    router_merge: str = "separate",
    decode_attention: str = "simt",
    projection_activations: str = "f32",
    head_activations: str = "f32",
    expert_prefetch: str = "off",
    attention_norm: str = "separate",
    chunk_activations: str = "f32",
    int8_dots: str = "sub_block",
    attention_tiles: tuple[int, int] | None = None,
) -> DecodeStep:
    """The Relax module of one decode step for `config` with these tensor types, and a
    T-token step (`prefill_T`, `score_T`) beside it for each T in `prefill_chunks`.

    `activations` is a model-level variant (ACTIVATIONS): "f32" feeds the expert GEMVs float
    activations; "q8" quantizes each expert FFN's input and its SiLU activations to int8 blocks
    of 32 (`kernels.gemv_q8`) and runs the experts on integer dot products (`kernels.moe_q8`),
    for experts whose three types all have an int8 form (Q8_TYPES; others stay float).
    `projection_activations` (ACTIVATIONS) is the same for the attention projections: "q8"
    quantizes each layer's attention input in its norm's launch (`gemv_q8.rms_norm_q8_1`) and the
    attention's output in the combine's (`attention_combine_q8_1`), and runs Q, K, V and O on
    integer dot products (`gemv_qkv_q8`, `gemv_q8`), in layers whose four projection types all
    have an int8 form; it needs decode_launches "split" (the fused launches normalize inside the
    Q/K/V kernel). `head_activations` (ACTIVATIONS) is the same for the LM head: "q8" quantizes
    the output norm's result in its launch and runs the head on integer dot products
    (`gemv_q8`), where the head's type has an int8 form. The T-token step multiplies float
    either way; `chunk_activations` (ACTIVATIONS) is whether its GEMMs read their inputs as
    they are ("f32") or, where the decode step's kernels read int8 blocks, rounded to the values
    those blocks hold ("q8": `kernels.gemv_q8.round_q8_1_rows`; its last row's LM head is the
    decode step's `quantize_q8_1` -> `gemv_q8`), so that a prompt's logits and those of the same
    tokens decoded agree to float32 rounding; it needs chunk_operands "f32" (float16 operands
    would round the values again) and is the cpu build's (no CUDA schedule of the rounding).
    `chunk_operands` (GEMM_OPERANDS) is the precision of the T-token step's dense and grouped
    expert GEMM products for quantized and half weights and of its attention's Q K^T and P V
    ("f16": tensor-core operands, `kernels.gemm`, `kernels.moe_chunk.grouped_gate_up_silu_f16` /
    `grouped_gemm_f16`, `prefill_attention.causal_prefill_attention_half`).
    `decode_launches` (DECODE_LAUNCHES) is how the decode step's norms and residual adds run:
    "split" as launches of their own, "fused" folded into the kernels around them
    (`kernels.gemv.gemv_normed`, `gemv_qkv_normed`, `gemv_residual`, and
    `kernels.moe.moe_gate_up_silu_routed`, which also runs router_topk): fewer launches a layer.
    Int8 experts and a dense FFN keep an rms_norm launch for their input (and int8 experts
    their router_topk).
    The T-token step is the same either way.
    `programmatic_launch` (PROGRAMMATIC_LAUNCH) leaves the module as it is: the step records it,
    and the compiler marks every CUDA kernel of it for programmatic dependent launch when "on"
    or "prefetch" (which also prefetches each kernel's weights into the L2 before it waits), or
    with "weights" only the kernels with weights enough to prefetch (compiler/dependent_launch.py).
    `q6_k_layout` (Q6_K_LAYOUTS) is how the Q6_K weights of `planar_tensors` sit in device
    memory: "gguf" as in the file, "planar" re-laid out at binding (quant/layouts.py) so that
    their GEMVs load 16 bytes at a time; the kernels reading them take the format Q6_K_PLANAR
    (any decode_launches, and the T-token step's GEMMs).
    `attention_form` (ATTENTION_FORMS) is the shape of the T-token step's tensor-core attention
    (chunk_operands "f16"): "read_ahead" or "compact" (`causal_prefill_attention_half`), or
    "registers" (`causal_prefill_attention_registers`).
    `attention_merge` (ATTENTION_MERGES) is where the decode attention's splits are merged:
    "separate" in an attention_combine launch, "last_block" in the attention kernel
    (`kernels.attention.paged_decode_attention_merged`, CUDA only), with the `arrivals` state.
    `router_merge` (ROUTER_MERGES) is where a MoE layer's experts are picked from the router's
    logits: "separate" in a router_topk launch, "last_block" in the router GEMV kernel
    (`kernels.router.router_gemv_topk`, CUDA only), with the `router_arrivals` state, or
    "gate_up" in every thread block of the int8 experts' gate/up kernel
    (`kernels.moe_q8.moe_gate_up_silu_q8_routed`), which needs activations "q8" (experts whose
    types have no int8 form keep their router_topk launch); both need decode_launches "split"
    (the fused gate/up picks the experts itself).
    `decode_attention` (DECODE_ATTENTIONS) is how the decode attention multiplies: "simt" in float32
    (`kernels.attention.paged_decode_attention`), "mma" with f16 Q and P on tensor cores
    (`kernels.attention.paged_decode_attention_mma`, CUDA only; with attention_merge
    "last_block" `paged_decode_attention_mma_merged`).
    `expert_prefetch` (EXPERT_PREFETCHES) is whether the routed int8 gate/up (router_merge
    "gate_up") also takes the layer's down experts and asks the L2 for the chosen ones' rows once
    it has picked them, so that the down kernel after it reads them from there
    (`kernels.moe_q8.moe_gate_up_silu_q8_routed_prefetch`, CUDA only): "off" or "down".
    `attention_norm` (ATTENTION_NORMS) is where an int8 attention input is normalized
    (projection_activations "q8"): "separate" in its rms_norm_q8_1 launch, "prologue" in each
    thread block of the Q/K/V kernels (`kernels.gemv_q8.gemv_qkv_q8_normed`, `gemv_q8_normed`,
    CUDA only), a launch a layer less.
    `int8_dots` (INT8_DOTS) is the form of the int8 GEMVs' sums (any of the activations "q8"):
    "sub_block", each sub-block's dot product summed to one int32 before its scale
    (`kernels.gemv_q8.q8_terms`), or "lanes", a lane per word of a block of 32 kept across the
    whole row (`q8_lane_sum`: the `_lanes` factories, cpu only).
    `attention_tiles` is (streams, tile) of the float32 decode attention inside a split
    (`kernels.attention.paged_decode_attention`; None: its defaults, shaped for a GPU's warps), as
    `n_splits` an arch's choice (compiler.pipeline.CPU_ATTENTION_TILES), not a variant."""
    if activations not in ACTIVATIONS:
        raise SparkInferError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}")
    if projection_activations not in ACTIVATIONS:
        raise SparkInferError(f"projection_activations must be one of {', '.join(ACTIVATIONS)}, "
                              f"got {projection_activations!r}")
    if head_activations not in ACTIVATIONS:
        raise SparkInferError(f"head_activations must be one of {', '.join(ACTIVATIONS)}, got {head_activations!r}")
    if projection_activations != ACTIVATIONS[0] and decode_launches != "split":
        raise SparkInferError(f"projection_activations={projection_activations!r} needs decode_launches='split', "
                              f"got {decode_launches!r}: the fused launches normalize the attention input inside "
                              f"the Q/K/V kernel, where no norm's launch quantizes it")
    if chunk_operands not in GEMM_OPERANDS:
        raise SparkInferError(f"chunk_operands must be one of {', '.join(GEMM_OPERANDS)}, got {chunk_operands!r}")
    if decode_launches not in DECODE_LAUNCHES:
        raise SparkInferError(f"decode_launches must be one of {', '.join(DECODE_LAUNCHES)}, got {decode_launches!r}")
    if attention_form not in ATTENTION_FORMS:
        raise SparkInferError(f"attention_form must be one of {', '.join(ATTENTION_FORMS)}, got {attention_form!r}")
    if attention_form != ATTENTION_FORMS[0] and chunk_operands != "f16":
        raise SparkInferError(f"attention_form={attention_form!r} is a form of the tensor-core attention: it needs "
                              f"chunk_operands='f16', got {chunk_operands!r}")
    if attention_merge not in ATTENTION_MERGES:
        raise SparkInferError(f"attention_merge must be one of {', '.join(ATTENTION_MERGES)}, got {attention_merge!r}")
    if router_merge not in ROUTER_MERGES:
        raise SparkInferError(f"router_merge must be one of {', '.join(ROUTER_MERGES)}, got {router_merge!r}")
    if router_merge != ROUTER_MERGES[0] and decode_launches != "split":
        why = {"last_block": "the fused launches pick the experts inside gate/up (moe_gate_up_silu_routed), "
                             "with no router_topk launch to save",
               "gate_up": "the routed int8 gate/up reads the FFN input that the split launches' "
                          "add_rms_norm_q8_1 quantizes"}[router_merge]
        raise SparkInferError(f"router_merge={router_merge!r} needs decode_launches='split', got {decode_launches!r}: "
                              f"{why}")
    if router_merge == "gate_up" and activations != "q8":
        raise SparkInferError(f"router_merge='gate_up' picks the experts inside the int8 experts' gate/up kernel: "
                              f"it needs activations='q8', got {activations!r}")
    if expert_prefetch not in EXPERT_PREFETCHES:
        raise SparkInferError(f"expert_prefetch must be one of {', '.join(EXPERT_PREFETCHES)}, got {expert_prefetch!r}")
    if expert_prefetch == "down" and router_merge != "gate_up":
        raise SparkInferError(f"expert_prefetch='down' is done by the routed int8 gate/up kernel, the first to know "
                              f"the experts: it needs router_merge='gate_up', got {router_merge!r}")
    if attention_norm not in ATTENTION_NORMS:
        raise SparkInferError(f"attention_norm must be one of {', '.join(ATTENTION_NORMS)}, got {attention_norm!r}")
    if attention_norm == "prologue" and projection_activations != "q8":
        raise SparkInferError(f"attention_norm='prologue' normalizes the int8 attention input inside the Q/K/V "
                              f"kernels: it needs projection_activations='q8', got {projection_activations!r}")
    if chunk_activations not in ACTIVATIONS:
        raise SparkInferError(f"chunk_activations must be one of {', '.join(ACTIVATIONS)}, got {chunk_activations!r}")
    if chunk_activations == "q8" and chunk_operands != "f32":
        raise SparkInferError(f"chunk_activations='q8' rounds the T-token step's GEMM inputs to the int8 blocks' "
                              f"values for float32 products: it needs chunk_operands='f32', got {chunk_operands!r}")
    if attention_tiles is not None and (decode_attention != "simt" or attention_merge != "separate"):
        raise SparkInferError(f"attention_tiles={attention_tiles} shapes the float32 attention with a combine "
                              f"launch (decode_attention='simt', attention_merge='separate'), got "
                              f"decode_attention={decode_attention!r}, attention_merge={attention_merge!r}")
    if int8_dots not in INT8_DOTS:
        raise SparkInferError(f"int8_dots must be one of {', '.join(INT8_DOTS)}, got {int8_dots!r}")
    if decode_attention not in DECODE_ATTENTIONS:
        raise SparkInferError(f"decode_attention must be one of {', '.join(DECODE_ATTENTIONS)}, "
                              f"got {decode_attention!r}")
    if programmatic_launch not in PROGRAMMATIC_LAUNCH:
        raise SparkInferError(f"programmatic_launch must be one of {', '.join(PROGRAMMATIC_LAUNCH)}, "
                              f"got {programmatic_launch!r}")
    chunks = tuple(sorted(set(int(t) for t in prefill_chunks)))
    if any(t < 1 for t in chunks):
        raise ValueError(f"prefill chunk sizes must be >= 1, got {chunks}")
    types = normalize_type_map(type_map)
    if page_size <= 0 or page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two, got {page_size}")
    n_splits = default_n_splits(config, page_size) if n_splits is None else int(n_splits)
    mp = max_pages(config, page_size)
    if not 1 <= n_splits <= mp:
        raise ValueError(f"n_splits must be in 1..{mp} (pages), got {n_splits}")
    builder = _StepBuilder(config, types, page_size, n_splits, activations, chunk_operands, decode_launches,
                           q6_k_layout, attention_form, attention_merge, router_merge, decode_attention,
                           projection_activations, head_activations, expert_prefetch, attention_norm,
                           chunk_activations, int8_dots, attention_tiles)
    mod = builder.build(chunks)
    return DecodeStep(
        mod=mod,
        inputs=builder.inputs,
        kernels=builder.k.uses,
        config=config,
        page_size=page_size,
        max_pages=mp,
        n_splits=n_splits,
        originals=builder.k.originals,
        prefill_chunks=chunks,
        programmatic_launch=programmatic_launch,
        attention_merge=attention_merge,
        router_merge=router_merge,
        decode_attention=decode_attention,
        expert_prefetch=expert_prefetch,
        attention_norm=attention_norm,
        chunk_activations=chunk_activations,
        int8_dots=int8_dots,
    )
