"""A decode step's `decode` function run on the CPU through the CUDA emulator
(tests/schedule/cuda_emulator.py): its kernels scheduled for sm_90, and its Relax bindings
(call_tir, call_tir_inplace, tuple items, aliases) followed in order, as the VM would, with
host arrays for tensors. For the step variants whose kernels only CUDA has (attention_merge
"last_block", router_merge "last_block"): the step's logits, beside the same step without the
variant, on a machine without a GPU. Tens of thousands of times slower than a GPU: the tiny
models only."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import relax

from sparkinfer.compiler.pipeline import schedule_step
from sparkinfer.gguf_file import GGUFModel
from sparkinfer.model.qwen3moe import DecodeStep
from sparkinfer.model.spec import ARRIVALS, ENTRY, ROUTER_ARRIVALS, bind_weight

sys.path.append(str(Path(__file__).resolve().parents[1] / "schedule"))
from cuda_emulator import EmulatedGpu, EmulatedTensor  # noqa: E402

Value = EmulatedTensor | tuple[EmulatedTensor, ...]


def emulated_kernels(*steps: DecodeStep) -> EmulatedGpu:
    """The emulator over the kernels of `steps`, scheduled for sm_90 (a kernel the steps share,
    by name, is built once)."""
    kernels: dict[str, tvm.tirx.PrimFunc] = {}
    for step in steps:
        schedule_step(step, "sm_90")
        for gvar, func in step.mod.functions.items():
            if isinstance(func, tvm.tirx.PrimFunc):
                kernels[gvar.name_hint] = func.with_attr("global_symbol", gvar.name_hint)
    return EmulatedGpu(tvm.IRModule(kernels))


def step_inputs(step: DecodeStep, model: GGUFModel, n_pages: int) -> dict[str, EmulatedTensor]:
    """`decode`'s inputs by name: greedy sampling from token 0 at position 0, zeroed caches and
    counts, pages in table order, the model's weights."""
    state = {"token": np.zeros(1, np.int32), "pos": np.zeros(1, np.int32),
             "page_table": np.arange(step.max_pages, dtype=np.int32) % n_pages,
             "sample_params": np.array([0.0, 1.0, 0.0], np.float32), "rng": np.zeros(2, np.uint32),
             "logits_params": np.array([0.0, 0.0, 1.0], np.float32),
             "token_mask": np.full(-(-step.config.vocab_size // 32), -1, np.int32),
             "token_counts": np.zeros(step.config.vocab_size, np.int32),
             ARRIVALS: np.zeros(step.config.n_kv_heads, np.int32), ROUTER_ARRIVALS: np.zeros(1, np.int32)}
    values = {}
    for inp in step.inputs:
        if inp.role == "state":
            values[inp.name] = state[inp.name]
        elif inp.role == "kv":
            values[inp.name] = np.zeros([n_pages if d == "n_pages" else d for d in inp.shape], inp.dtype)
        else:
            values[inp.name] = bind_weight(model.tensors[inp.tensor].data, inp)
    return {name: EmulatedTensor(value) for name, value in values.items()}


def run_decode(gpu: EmulatedGpu, step: DecodeStep, inputs: dict[str, EmulatedTensor]) -> tuple[np.ndarray, int]:
    """One `decode` call: (logits, next); `inputs` are updated in place as on a device."""
    func = step.mod[ENTRY]
    env: dict[relax.Var, Value] = {param: inputs[inp.name] for param, inp in zip(func.params, step.inputs, strict=True)}
    for block in func.body.blocks:
        for binding in block.bindings:
            env[binding.var] = _evaluate(gpu, binding.value, env)
    logits, nxt = (env[var] for var in func.body.body.fields)
    return logits.numpy(), int(nxt.numpy()[0])


def _evaluate(gpu: EmulatedGpu, value: relax.Expr, env: dict[relax.Var, Value]) -> Value:
    if isinstance(value, relax.Var):
        return env[value]
    if isinstance(value, relax.TupleGetItem):
        return env[value.tuple_value][value.index]  # type: ignore[index]
    if not isinstance(value, relax.Call) or value.op.name not in ("relax.call_tir", "relax.call_tir_inplace"):
        raise NotImplementedError(f"the emulated step follows kernel calls only, not {value}")
    kernel, args = value.args[0], [_argument(a, env) for a in value.args[1].fields]
    outs = value.ty_args[0]
    types = list(outs.fields) if isinstance(outs, relax.TupleType) else [outs]
    inplace = list(value.attrs.inplace_indices) if value.op.name == "relax.call_tir_inplace" else [-1] * len(types)
    results = [args[i] if i >= 0 else _allocate(t) for i, t in zip(inplace, types)]
    gpu(kernel.name_hint, *args, *(r for i, r in zip(inplace, results) if i < 0))
    return tuple(results) if isinstance(outs, relax.TupleType) else results[0]


def _argument(arg: relax.Expr, env: dict[relax.Var, Value]) -> EmulatedTensor:
    if isinstance(arg, tvm.ir.expr.Constant):  # relax.const: the dense FFN's expert ids and weights
        return EmulatedTensor(arg.value.numpy())
    return env[arg]  # type: ignore[return-value]


def _allocate(ty: Any) -> EmulatedTensor:
    """An output: NaN where floats, so an element no kernel writes shows."""
    dtype = np.dtype(str(ty.dtype))
    shape = tuple(int(d) for d in ty.shape.values)
    return EmulatedTensor(np.full(shape, np.nan if dtype.kind == "f" else 0, dtype))
