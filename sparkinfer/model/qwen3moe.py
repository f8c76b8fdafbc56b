"""The decode step of Qwen3-MoE (and dense Qwen3) as a Relax IRModule.

`build_decode_step(config, type_map)` returns a `DecodeStep`: an IRModule holding one Relax
function `decode` plus the unscheduled TIR kernels it calls, the ordered list of its inputs
(what the manifest records and the runtime binds), and the list of distinct kernels with the
factory call that made each (what the compiler schedules per family). Only hyper-parameters
and the per-tensor ggml types go in; no weight value is ever read, so one module serves every
file of the same shapes and types.

`decode` parameters, in this order (docs/ARCHITECTURE.md, "The decode step"):

  state   token int32[1], pos int32[1], page_table int32[MP], sample_params float32[3],
          rng uint32[2]
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
moe_down_residual) -> rms_norm -> lm head gemv -> sample_token -> advance.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType
from tvm import IRModule, relax, tirx

from sparkinfer.errors import MissingTensorError, SparkInferError, TensorShapeError
from sparkinfer.gguf_file.config import ModelConfig
from sparkinfer.gguf_file.layout import TensorSpec, tensor_specs
from sparkinfer.kernels.gemv import gemv_format
from sparkinfer.kernels.gemv_q8 import Q8_TYPES
from sparkinfer.model import spec as _spec
from sparkinfer.model.spec import (
    ACTIVATIONS,
    ENTRY,
    KV_DTYPE,
    N_PAGES,
    PAGE_SIZE,
    ROLE_KV,
    ROLE_STATE,
    ROLE_WEIGHT,
    StepInput,
)


_T = GGMLQuantizationType
_DENSE_FFN = ("ffn_gate", "ffn_up", "ffn_down")


def max_pages(config: ModelConfig, page_size: int = PAGE_SIZE) -> int:
    """MP: the page-table length, ceil(context_length / P)."""
    return _spec.max_pages(config.context_length, page_size)


def default_n_splits(config: ModelConfig, page_size: int = PAGE_SIZE) -> int:
    """S, the flash-decode splits: 16 (NKV x 16 work groups fill a GPU at long context), never
    more splits than pages. The attention kernel cuts the live context (pos + 1) into S
    chunks, so short contexts do not pay for empty splits."""
    return max(1, min(16, max_pages(config, page_size)))


# ---------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------


def normalize_type_map(type_map: Mapping[str, Any]) -> dict[str, GGMLQuantizationType]:
    """name -> GGMLQuantizationType from enum members, ints or type names."""
    return {name: _spec.ggml_type(t) for name, t in type_map.items()}


def _weight_type(spec: TensorSpec, ggml_type: GGMLQuantizationType) -> tuple[str, tuple[int, ...]]:
    """dtype and shape of the word array `weight_view` makes of this tensor's data."""
    fmt = gemv_format(ggml_type)
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


def decode_inputs(
    config: ModelConfig, type_map: Mapping[str, Any], page_size: int = PAGE_SIZE
) -> list[StepInput]:
    """The ordered parameters of `decode` (see the module docstring)."""
    types = normalize_type_map(type_map)
    mp = max_pages(config, page_size)
    inputs = [
        StepInput("token", ROLE_STATE, "int32", (1,)),
        StepInput("pos", ROLE_STATE, "int32", (1,)),
        StepInput("page_table", ROLE_STATE, "int32", (mp,)),
        StepInput("sample_params", ROLE_STATE, "float32", (3,)),
        StepInput("rng", ROLE_STATE, "uint32", (2,)),
    ]
    kv_shape = (N_PAGES, page_size, config.n_kv_heads, config.head_dim)
    for i in range(config.n_layers):
        inputs.append(StepInput(f"k_cache_{i}", ROLE_KV, KV_DTYPE, kv_shape))
        inputs.append(StepInput(f"v_cache_{i}", ROLE_KV, KV_DTYPE, kv_shape))
    for spec in _weight_specs(config, types):
        dtype, shape = _weight_type(spec, types[spec.name])
        inputs.append(StepInput(_param_name(spec.name), ROLE_WEIGHT, dtype, shape, spec.name, types[spec.name].name))
    return inputs


def _param_name(tensor: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", tensor.removesuffix(".weight"))


# ---------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------


KernelFactory = Callable[..., tirx.PrimFunc]


def kernel_factory(family: str, name: str) -> KernelFactory:
    """The factory `sparkinfer.kernels.<family>.<name>`; SparkInferError names a missing one."""
    try:
        module = importlib.import_module(f"sparkinfer.kernels.{family}")
    except ModuleNotFoundError as e:
        if e.name != f"sparkinfer.kernels.{family}":
            raise
        module = None
    found = getattr(module, name, None)
    if found is None:
        raise SparkInferError(
            f"kernel factory sparkinfer.kernels.{family}.{name} does not exist: the decode step needs it"
        )
    return found


@dataclass(frozen=True)
class KernelUse:
    """One distinct kernel of the module: the GlobalVar name and the factory call behind it.
    `args` holds ints, floats and ggml type names (strings)."""

    name: str
    family: str
    factory: str
    args: tuple[Any, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family, "factory": self.factory, "args": list(self.args)}


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


def _arg_json(value: Any) -> Any:
    if isinstance(value, GGMLQuantizationType):
        return value.name
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    raise TypeError(f"kernel factory argument {value!r} is not an int, float or ggml type")


def kernel_args(args: Iterable[Any]) -> tuple[Any, ...]:
    """Factory arguments as stored in a KernelUse: ggml types by name."""
    return tuple(_arg_json(a) for a in args)


def factory_args(use: KernelUse) -> tuple[Any, ...]:
    """A KernelUse's arguments as the factory takes them (ggml type names back to the enum)."""
    return tuple(_T[a] if isinstance(a, str) else a for a in use.args)


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


class _StepBuilder:
    def __init__(self, config: ModelConfig, types: dict[str, GGMLQuantizationType], page_size: int,
                 n_splits: int, activations: str = "f32") -> None:
        self.c = config
        self.activations = activations
        self.types = types
        self.P = page_size
        self.MP = max_pages(config, page_size)
        self.S = n_splits
        self.bb = relax.BlockBuilder()
        self.k = _Kernels(self.bb)
        self.n_pages = tirx.Var(N_PAGES, "int64")
        self.inputs = decode_inputs(config, types, page_size)
        self.params: dict[str, relax.Var] = {}
        for inp in self.inputs:
            shape = [self.n_pages if d == N_PAGES else d for d in inp.shape]
            self.params[inp.tensor or inp.name] = relax.Var(inp.name, _tensor(shape, inp.dtype))

    # helpers ---------------------------------------------------------------------------

    def t(self, name: str) -> GGMLQuantizationType:
        return self.types[name]

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

    def quantize_q8(self, x: relax.Expr, k: int, rows: int, label: str) -> list[relax.Var]:
        """x f32[(rows,) k] as int8 blocks of 32: [xq int32 words, xd scales, xs sums]."""
        lead = (rows,) if rows else ()
        gv = self.k("gemv_q8", "quantize_q8_1", k, rows)
        return self.call(gv, [x], [_tensor((*lead, k // 4), "int32"), self.f32(*lead, k // 32),
                                   self.f32(*lead, k // 32)], label)

    def gemv(self, name: str, x: relax.Expr, label: str) -> relax.Var:
        n, k = self.spec_shape(name)
        gv = self.k("gemv", "gemv", self.t(name), n, k)
        return self.call(gv, [self.params[name], x], [self.f32(n)], label)

    def qkv(self, w: str, x: relax.Expr, i: int) -> list[relax.Var]:
        """Q, K and V of layer i, in as few launches as their types allow: one `gemv_qkv`
        where all three share a type; where two do (Q4_K_M's Q4_K Q+K beside a Q6_K V, or
        a Q8_0 K+V beside a Q4_K Q), that pair in one `gemv_qkv` of n_v = 0 (the kernel is
        two or three GEMVs sharing x; its q/k names are positions) and the third in a `gemv`;
        else three `gemv` launches."""
        kinds = ("q", "k", "v")
        names = [w + f"attn_{kind}.weight" for kind in kinds]
        out: list[relax.Var | None] = [None, None, None]
        for t in dict.fromkeys(self.t(n) for n in names):  # distinct types, in q/k/v order
            group = [j for j, n in enumerate(names) if self.t(n) == t]
            if len(group) == 1:
                j = group[0]
                out[j] = self.gemv(names[j], x, f"{kinds[j]}{i}")
                continue
            rows = [self.spec_shape(names[j])[0] for j in group]
            h = self.spec_shape(names[group[0]])[1]
            gv = self.k("gemv", "gemv_qkv", t, rows[0], rows[1], rows[2] if len(group) == 3 else 0, h)
            results = self.call(gv, [self.params[names[j]] for j in group] + [x],
                                [self.f32(r) for r in rows], "".join(kinds[j] for j in group) + str(i))
            for j, var in zip(group, results):
                out[j] = var
        return out  # type: ignore[return-value]

    def spec_shape(self, name: str) -> tuple[int, ...]:
        return self._specs[name].shape

    # the step --------------------------------------------------------------------------

    def build(self) -> IRModule:
        c = self.c
        self._specs = {s.name: s for s in tensor_specs(c)}
        p = self.params
        state = [p["token"], p["pos"], p["page_table"], p["sample_params"], p["rng"]]
        caches = [p[f"{kv}_cache_{i}"] for i in range(c.n_layers) for kv in ("k", "v")]
        weights = [p[inp.tensor] for inp in self.inputs if inp.role == ROLE_WEIGHT]
        with self.bb.function(ENTRY, state + caches + weights):
            with self.bb.dataflow():
                logits, nxt = self._body()
                logits = self.bb.emit_output(logits)
                nxt = self.bb.emit_output(nxt)
            self.bb.emit_func_output(relax.Tuple([logits, nxt]))
        return self.bb.finalize()

    def _body(self) -> tuple[relax.Var, relax.Var]:
        c, p = self.c, self.params
        H, V = c.hidden, c.vocab_size
        embd = "token_embd.weight"
        gv = self.k("embedding", "embedding", self.t(embd), V, H)
        h = self.call(gv, [p[embd], p["token"]], [self.f32(H)], "embd")
        x = self.call(self.k("norm", "rms_norm", H, c.rms_eps), [h, p["blk.0.attn_norm.weight"]],
                      [self.f32(H)], "attn_in")
        for i in range(c.n_layers):
            h, x = self._layer(i, h, x)
        # x is rms_norm(h, output_norm) after the last layer
        head = "output.weight" if "output.weight" in self.types else embd
        logits = self.gemv(head, x, "logits")
        gv = self.k("sampling", "sample_token", V)
        nxt, _rng = self.call_inplace(gv, [logits, p["sample_params"], p["rng"]], [-1, 2],
                                      [_tensor((1,), "int32"), _tensor((2,), "uint32")], "sample")
        # advance writes token := next and pos := pos + 1. `next` is listed as an in-place
        # output too, so the returned `next` depends on this call and no pass can drop it.
        gv = self.k("sampling", "advance")
        nxt, _tok, _pos = self.call_inplace(gv, [nxt, p["token"], p["pos"]], [0, 1, 2],
                                            [_tensor((1,), "int32")] * 3, "advance")
        return logits, nxt

    def _layer(self, i: int, h: relax.Var, x: relax.Var) -> tuple[relax.Var, relax.Var]:
        """h: residual stream entering layer i; x: rms_norm(h, attn_norm). Returns the
        residual after the layer and its norm for the next consumer (next attn_norm or
        output_norm)."""
        c, p = self.c, self.params
        w = f"blk.{i}."
        H, NH, NKV, D = c.hidden, c.n_heads, c.n_kv_heads, c.head_dim
        q, k, v = self.qkv(w, x, i)
        kc, vc = p[f"k_cache_{i}"], p[f"v_cache_{i}"]
        cache_t = kc.ty
        gv = self.k("rope", "qk_norm_rope_kv_append", NH, NKV, D, self.P, self.MP, c.rms_eps, c.rope_theta)
        q_rot, kc, vc = self.call_inplace(
            gv, [q, k, v, p[w + "attn_q_norm.weight"], p[w + "attn_k_norm.weight"], p["pos"], p["page_table"], kc, vc],
            [-1, 7, 8], [self.f32(NH, D), cache_t, cache_t], f"rope{i}")
        gv = self.k("attention", "paged_decode_attention", NH, NKV, D, self.P, self.MP, self.S)
        o, lse = self.call(gv, [q_rot, kc, vc, p["page_table"], p["pos"]],
                           [self.f32(NH, self.S, D), self.f32(NH, self.S)], f"attn{i}")
        gv = self.k("attention", "attention_combine", NH, self.S, D)
        att = self.call(gv, [o, lse], [self.f32(NH * D)], f"att{i}")
        ao = self.gemv(w + "attn_output.weight", att, f"ao{i}")
        gv = self.k("norm", "add_rms_norm", H, c.rms_eps)
        h, f = self.call(gv, [ao, h, p[w + "ffn_norm.weight"]], [self.f32(H), self.f32(H)], f"ffn_in{i}")
        h = self._moe(i, h, f) if c.is_moe else self._dense_ffn(i, h, f)
        nxt = f"blk.{i + 1}.attn_norm.weight" if i + 1 < c.n_layers else "output_norm.weight"
        x = self.call(self.k("norm", "rms_norm", H, c.rms_eps), [h, p[nxt]], [self.f32(H)], f"norm{i + 1}")
        return h, x

    def _moe(self, i: int, h: relax.Var, f: relax.Var) -> relax.Var:
        c = self.c
        w = f"blk.{i}."
        E, KU, I, H = c.n_experts, c.n_experts_used, c.expert_ffn, c.hidden
        router = self.gemv(w + "ffn_gate_inp.weight", f, f"router{i}")
        gv = self.k("router", "router_topk", E, KU)
        ids, weights = self.call(gv, [router], [_tensor((KU,), "int32"), self.f32(KU)], f"topk{i}")
        return self._experts(w, "_exps", E, KU, I, H, ids, weights, h, f, i)

    def _dense_ffn(self, i: int, h: relax.Var, f: relax.Var) -> relax.Var:
        # One expert, always chosen with weight 1: the MoE kernels compute SwiGLU + residual.
        c = self.c
        ids = relax.const(np.zeros(1, np.int32))
        weights = relax.const(np.ones(1, np.float32))
        return self._experts(f"blk.{i}.", "", 1, 1, c.ffn, c.hidden, ids, weights, h, f, i)

    def _experts(self, w: str, suffix: str, E: int, KU: int, I: int, H: int, ids: relax.Expr,
                 weights: relax.Expr, h: relax.Var, f: relax.Var, i: int) -> relax.Var:
        p = self.params
        g, u, d = (f"{w}ffn_{kind}{suffix}.weight" for kind in ("gate", "up", "down"))
        if self.activations == "q8" and all(self.t(name) in Q8_TYPES for name in (g, u, d)):
            xq = self.quantize_q8(f, H, 0, f"ffn_q{i}")
            gv = self.k("moe_q8", "moe_gate_up_silu_q8", self.t(g), self.t(u), E, KU, I, H)
            act = self.call(gv, [p[g], p[u], ids, *xq], [self.f32(KU, I)], f"act{i}")
            aq = self.quantize_q8(act, I, KU, f"act_q{i}")
            gv = self.k("moe_q8", "moe_down_residual_q8", self.t(d), E, KU, H, I)
            return self.call(gv, [p[d], ids, weights, *aq, h], [self.f32(H)], f"h{i}")
        gv = self.k("moe", "moe_gate_up_silu", self.t(g), self.t(u), E, KU, I, H)
        act = self.call(gv, [p[g], p[u], ids, f], [self.f32(KU, I)], f"act{i}")
        gv = self.k("moe", "moe_down_residual", self.t(d), E, KU, H, I)
        return self.call(gv, [p[d], ids, weights, act, h], [self.f32(H)], f"h{i}")


def build_decode_step(
    config: ModelConfig,
    type_map: Mapping[str, Any],
    *,
    page_size: int = PAGE_SIZE,
    n_splits: int | None = None,
    activations: str = "f32",
) -> DecodeStep:
    """The Relax module of one decode step for `config` with these tensor types.

    `activations` is a model-level variant (ACTIVATIONS): "f32" feeds the expert GEMVs float
    activations; "q8" quantizes each expert FFN's input and its SiLU activations to int8 blocks
    of 32 (`kernels.gemv_q8`) and runs the experts on integer dot products (`kernels.moe_q8`),
    for experts whose three types all have an int8 form (Q8_TYPES; others stay float)."""
    if activations not in ACTIVATIONS:
        raise SparkInferError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}")
    types = normalize_type_map(type_map)
    if page_size <= 0 or page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two, got {page_size}")
    n_splits = default_n_splits(config, page_size) if n_splits is None else int(n_splits)
    mp = max_pages(config, page_size)
    if not 1 <= n_splits <= mp:
        raise ValueError(f"n_splits must be in 1..{mp} (pages), got {n_splits}")
    builder = _StepBuilder(config, types, page_size, n_splits, activations)
    mod = builder.build()
    return DecodeStep(
        mod=mod,
        inputs=builder.inputs,
        kernels=builder.k.uses,
        config=config,
        page_size=page_size,
        max_pages=mp,
        n_splits=n_splits,
        originals=builder.k.originals,
    )
