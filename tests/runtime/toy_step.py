"""A toy decode step with the real step's contract, to test the runtime apart from the model.

Same inputs, in-place updates and outputs as `sparkinfer.model`'s `decode`
(docs/ARCHITECTURE.md): state (token, pos, page_table, sample_params, rng), per-layer paged
K/V caches float16[n_pages, P, NKV, D] (n_pages symbolic), weights read from the GGUF file;
returns (logits, next) and writes token := next, pos := pos + 1, rng[1] += 1, and layer 0's
K cache at pos, in place. Its arithmetic is small but history-dependent, so every piece of
device state the runtime manages shows in the tokens:

  x      = E[token]                                  (token_embd, F32 [V, H])
  K0[pos] = f16(x[:NKV*D])                            (through the page table)
  ctx    = sum_{t <= pos} K0[t]                       (float32)
  y[h]   = x[h] - 0.25 * ctx[h % (NKV*D)]    (a token repeated pushes itself away)
  logits = O . y                                      (output, F32 [V, H])
  next   = argmax(logits) (smallest index among ties)

`build(config, arch, out_dir)` compiles it (LLVM, or CUDA with dlight's fallback schedule and
an nvcc fatbin) and writes manifest.json + decode.so the way the compiler lays modules out.
`ToyReference` is its numpy twin.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

PAGE_SIZE = 16
CTX_GAIN = -0.25


def _dims(config: Any) -> tuple[int, int, int, int, int, int]:
    mp = -(-config.context_length // PAGE_SIZE)
    return config.vocab_size, config.hidden, config.n_kv_heads, config.head_dim, PAGE_SIZE, mp


def inputs(config: Any) -> list[dict[str, Any]]:
    V, H, NKV, D, P, MP = _dims(config)
    out = [
        {"name": "token", "role": "state", "dtype": "int32", "shape": [1]},
        {"name": "pos", "role": "state", "dtype": "int32", "shape": [1]},
        {"name": "page_table", "role": "state", "dtype": "int32", "shape": [MP]},
        {"name": "sample_params", "role": "state", "dtype": "float32", "shape": [3]},
        {"name": "rng", "role": "state", "dtype": "uint32", "shape": [2]},
    ]
    for i in range(config.n_layers):
        for kv in ("k", "v"):
            out.append({"name": f"{kv}_cache_{i}", "role": "kv", "dtype": "float16", "shape": ["n_pages", P, NKV, D]})
    for name in ("token_embd", "output"):
        out.append({"name": name, "role": "weight", "dtype": "float32", "shape": [V, H],
                    "tensor": f"{name}.weight", "ggml_type": "F32"})
    return out


def module(config: Any, gpu: bool = False) -> Any:
    from tvm import relax, tirx
    from tvm.script import tirx as T

    V, H, NKV, D, P, MP = _dims(config)
    KD = NKV * D
    T_MAX = MP * P

    @T.prim_func(private=True, s_tir=True)
    def embed(E: T.Buffer((V, H), "float32"), token: T.Buffer((1,), "int32"), x: T.Buffer((H,), "float32")):
        for h in range(H):
            with T.sblock("embed"):
                vh = T.axis.spatial(H, h)
                x[vh] = E[T.max(T.min(token[0], V - 1), 0), vh]

    @T.prim_func(private=True, s_tir=True)
    def append(x: T.Buffer((H,), "float32"), pos: T.Buffer((1,), "int32"), pt: T.Buffer((MP,), "int32"),
               var_kc: T.handle):
        n_pages = T.int64()
        kc = T.match_buffer(var_kc, (n_pages, P, NKV, D), "float16")
        for i in range(KD):
            with T.sblock("append"):
                vi = T.axis.spatial(KD, i)
                kc[T.Cast("int64", pt[pos[0] // P]), pos[0] % P, vi // D, vi % D] = T.Cast("float16", x[vi])

    @T.prim_func(private=True, s_tir=True)
    def attend(var_kc: T.handle, pos: T.Buffer((1,), "int32"), pt: T.Buffer((MP,), "int32"),
               ctx: T.Buffer((KD,), "float32")):
        n_pages = T.int64()
        kc = T.match_buffer(var_kc, (n_pages, P, NKV, D), "float16")
        for i, t in T.grid(KD, T_MAX):
            with T.sblock("attend"):
                vi, vt = T.axis.remap("SR", [i, t])
                with T.init():
                    ctx[vi] = T.float32(0)
                ctx[vi] = ctx[vi] + T.if_then_else(
                    vt <= pos[0], T.Cast("float32", kc[T.Cast("int64", pt[vt // P]), vt % P, vi // D, vi % D]),
                    T.float32(0))

    @T.prim_func(private=True, s_tir=True)
    def head(O: T.Buffer((V, H), "float32"), x: T.Buffer((H,), "float32"), ctx: T.Buffer((KD,), "float32"),
             logits: T.Buffer((V,), "float32")):
        for v, h in T.grid(V, H):
            with T.sblock("head"):
                vv, vh = T.axis.remap("SR", [v, h])
                with T.init():
                    logits[vv] = T.float32(0)
                logits[vv] = logits[vv] + O[vv, vh] * (x[vh] + T.float32(CTX_GAIN) * ctx[vh % KD])

    @T.prim_func(private=True, s_tir=True)
    def top(logits: T.Buffer((V,), "float32"), best: T.Buffer((1,), "float32")):
        for z, v in T.grid(1, V):
            with T.sblock("max"):
                vz, vv = T.axis.remap("SR", [z, v])
                with T.init():
                    best[vz] = T.float32(-3.4e38)
                best[vz] = T.max(best[vz], logits[vv])

    @T.prim_func(private=True, s_tir=True)
    def pick(logits: T.Buffer((V,), "float32"), best: T.Buffer((1,), "float32"), nxt: T.Buffer((1,), "int32")):
        for z, v in T.grid(1, V):
            with T.sblock("argmax"):
                vz, vv = T.axis.remap("SR", [z, v])
                with T.init():
                    nxt[vz] = V
                nxt[vz] = T.min(nxt[vz], T.if_then_else(logits[vv] == best[vz], vv, V))

    @T.prim_func(private=True, s_tir=True)
    def advance(nxt: T.Buffer((1,), "int32"), token: T.Buffer((1,), "int32"), pos: T.Buffer((1,), "int32"),
                rng: T.Buffer((2,), "uint32")):
        for z in range(1):
            with T.sblock("advance"):
                vz = T.axis.spatial(1, z)
                token[vz] = nxt[vz]
                pos[vz] = pos[vz] + 1
                rng[vz + 1] = rng[vz + 1] + T.uint32(1)

    # Reads and writes the same buffers, which no dlight rule schedules: bound by hand.
    @T.prim_func(private=True, s_tir=True)
    def advance_gpu(nxt: T.Buffer((1,), "int32"), token: T.Buffer((1,), "int32"), pos: T.Buffer((1,), "int32"),
                    rng: T.Buffer((2,), "uint32")):
        T.func_attr({"tirx.is_scheduled": True})
        for z in T.thread_binding(1, thread="threadIdx.x"):
            with T.sblock("advance"):
                vz = T.axis.spatial(1, z)
                token[vz] = nxt[vz]
                pos[vz] = pos[vz] + 1
                rng[vz + 1] = rng[vz + 1] + T.uint32(1)

    if gpu:
        advance = advance_gpu

    bb = relax.BlockBuilder()
    n_pages = tirx.Var("n_pages", "int64")
    params = {}
    for inp in inputs(config):
        shape = [n_pages if d == "n_pages" else d for d in inp["shape"]]
        params[inp["name"]] = relax.Var(inp["name"], relax.TensorType(shape, inp["dtype"]))
    g = {n: bb.add_func(f, n) for n, f in [
        ("embed", embed), ("append", append), ("attend", attend), ("head", head), ("top", top),
        ("pick", pick), ("advance", advance)]}
    p = params
    f32 = lambda *s: relax.TensorType(list(s), "float32")  # noqa: E731
    i32 = relax.TensorType([1], "int32")
    with bb.function("decode", list(params.values())):
        with bb.dataflow():
            x = bb.emit(relax.call_tir(g["embed"], [p["token_embd"], p["token"]], f32(H)))
            kc = bb.emit(relax.call_tir_inplace(g["append"], [x, p["pos"], p["page_table"], p["k_cache_0"]], [3],
                                                p["k_cache_0"].ty))
            ctx = bb.emit(relax.call_tir(g["attend"], [kc, p["pos"], p["page_table"]], f32(KD)))
            logits = bb.emit(relax.call_tir(g["head"], [p["output"], x, ctx], f32(V)))
            best = bb.emit(relax.call_tir(g["top"], [logits], f32(1)))
            nxt = bb.emit(relax.call_tir(g["pick"], [logits, best], i32))
            adv = bb.emit(relax.call_tir_inplace(
                g["advance"], [nxt, p["token"], p["pos"], p["rng"]], [0, 1, 2, 3],
                [i32, i32, i32, relax.TensorType([2], "uint32")]))
            nxt = bb.emit(relax.TupleGetItem(adv, 0))
            out = bb.emit_output(relax.Tuple([logits, nxt]))
        bb.emit_func_output(out)
    return bb.finalize()


def build(config: Any, arch: str, out_dir: Path) -> Path:
    """Compile the toy step for `arch` into out_dir (manifest.json + decode.so); returns out_dir."""
    import tvm

    from sparkinfer.compiler import targets

    mod = module(config, gpu=arch != "cpu")
    if arch != "cpu":
        from tvm.s_tir import dlight as dl

        with targets.target_for(arch):
            mod = dl.ApplyDefaultSchedule(dl.gpu.Fallback())(mod)
    lib = targets.build(mod, arch)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lib.export_library(str(out_dir / "decode.so"))
    V, H, NKV, D, P, MP = _dims(config)
    manifest = {
        "arch": arch,
        "tvm_version": tvm.__version__,
        "hparams_hash": config.hparams_hash(),
        "page_size": P,
        "max_pages": MP,
        "n_splits": 1,
        "library": "decode.so",
        "inputs": inputs(config),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out_dir


class ToyReference:
    """numpy twin of the toy step."""

    def __init__(self, config: Any, weights: dict[str, np.ndarray]) -> None:
        self.c = config
        self.E = np.asarray(weights["token_embd.weight"], np.float32)
        self.O = np.asarray(weights["output.weight"], np.float32)
        self.kd = config.n_kv_heads * config.head_dim
        self.reset()

    def reset(self) -> None:
        self.k: list[np.ndarray] = []

    def step(self, token: int) -> np.ndarray:
        x = self.E[token]
        self.k.append(x[: self.kd].astype(np.float16))
        ctx = np.sum(np.stack(self.k).astype(np.float32), axis=0, dtype=np.float32)
        y = x + np.float32(CTX_GAIN) * np.resize(ctx, x.shape[0])
        return (self.O.astype(np.float64) @ y.astype(np.float64)).astype(np.float32)

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        self.reset()
        for t in prompt[:-1]:
            self.step(t)
        out, tok = [], prompt[-1]
        for _ in range(n):
            tok = int(np.argmax(self.step(tok)))
            out.append(tok)
        return out
