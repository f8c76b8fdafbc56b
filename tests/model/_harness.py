"""A minimal decode loop over a compiled step (what the runtime does, without CUDA graphs),
and the decisive tiny models the end-to-end tests compare against the numpy reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tvm
import tvm.runtime.vm  # not imported by `import tvm` with runtime-only TVM

from sparkinfer.compiler.manifest import Manifest
from sparkinfer.gguf_file import GGUFModel, ModelConfig, write_model
from sparkinfer.grammar import mask_words
from sparkinfer.model.spec import ARRIVALS, bind_weight
from sparkinfer.tokenizer import synthetic_vocab
from reference._tiny import random_weights  # tests/ is on sys.path (pytest, rootdir-relative packages)


def write_decisive_model(path: Path, config: ModelConfig, types: str, seed: int = 0) -> GGUFModel:
    """A GGUF of `config` with _tiny's large-gain weights: decisive top-1 tokens and experts."""
    write_model(path, config, random_weights(config, seed=seed), synthetic_vocab(config.vocab_size), types)
    return GGUFModel.open(path)


class StepRunner:
    """Binds a compiled step's inputs in manifest order and calls `decode` once per token."""

    def __init__(self, manifest: Manifest, model: GGUFModel, n_pages: int, *, seed: int = 0,
                 permute_pages: bool = True, device: tvm.runtime.Device | None = None) -> None:
        self.manifest = manifest
        self.dev = device if device is not None else tvm.cpu()
        self.vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(manifest.library)), self.dev)
        self.fn = self.vm[manifest.entry]
        page_table = np.zeros(manifest.max_pages, np.int32)
        # Logical page i lives in physical page n_pages-1-i: the step must follow the table.
        order = np.arange(n_pages)[::-1] if permute_pages else np.arange(n_pages)
        page_table[: min(n_pages, manifest.max_pages)] = order[: manifest.max_pages]
        state = {
            "token": np.zeros(1, np.int32),
            "pos": np.zeros(1, np.int32),
            "page_table": page_table,
            "sample_params": np.array([0.0, 1.0, 0.0], np.float32),  # greedy
            "rng": np.array([seed, 0], np.uint32),
            # decode_processed's (decode does not read them): no penalty, every token allowed.
            "logits_params": np.array([0.0, 0.0, 1.0], np.float32),
            "token_mask": np.full(mask_words(manifest.config.vocab_size), -1, np.int32),
            "token_counts": np.zeros(manifest.config.vocab_size, np.int32),
            # the last-block merge's counts (attention_merge="last_block"): zero at allocation
            ARRIVALS: np.zeros(manifest.config.n_kv_heads, np.int32),
        }
        self.args: list[tvm.runtime.Tensor] = []
        self.named: dict[str, tvm.runtime.Tensor] = {}
        for inp in manifest.inputs:
            if inp.role == "state":
                value = state[inp.name]
            elif inp.role == "kv":
                value = np.zeros(inp.concrete_shape(n_pages), inp.dtype)
            else:
                value = bind_weight(model.tensors[inp.tensor].data, inp)
            tensor = tvm.runtime.tensor(value, self.dev)
            self.args.append(tensor)
            self.named[inp.name] = tensor

    def step(self, token: int | None = None) -> tuple[np.ndarray, int]:
        """One decode step; `token` overrides the fed token (prompt), else the last `next`."""
        if token is not None:
            self.named["token"].copyfrom(np.array([token], np.int32))
        logits, nxt = self.fn(*self.args)
        return logits.numpy(), int(nxt.numpy()[0])

    @property
    def pos(self) -> int:
        return int(self.named["pos"].numpy()[0])

    @property
    def token(self) -> int:
        return int(self.named["token"].numpy()[0])


class F16CacheReference:
    """Mixin for ReferenceModel: K and V rounded to float16 as they enter the cache, as the
    compiled step stores them; what remains between the two is float32 rounding."""

    def _append_kv(self, layer, k, v):  # noqa: ANN001, ANN202
        k16 = k.astype(np.float16).astype(np.float32)
        v16 = v.astype(np.float16).astype(np.float32)
        return super()._append_kv(layer, k16, v16)  # type: ignore[misc]
