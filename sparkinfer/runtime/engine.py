"""The decode driver: a GGUF model, its compiled step for this device, weights, KV cache, and
`generate`.

One compiled Relax function `decode` is the whole model step (docs/ARCHITECTURE.md): it reads
`token` and `pos`, appends K/V, samples `next`, and itself writes `token := next`,
`pos := pos + 1` on the device. So:
  - prefill runs the module's T-token steps (`prefill_T`, manifest `prefill_chunks`): the
    prompt's new tokens cut into chunks, the last one partial (its valid length an input), the
    last chunk sampling the first new token and writing `token`/`pos` as `decode` does. A module
    without them (the CUDA archs today) prefills with the step in a loop, the driver writing
    each prompt token into `token` first (on a GPU: a device-to-device copy), and says so;
  - decoding is the step replayed with no host -> device write at all;
  - the host only reads `next` back (a 4-byte async copy) to stream text.
On a GPU the step is captured once as a CUDA graph (`cuda_graph.CapturedStep`) and each token
is one `cudaGraphLaunch`; the next step is launched before the previous token is read
(`lookahead`), so the host's read never starves the GPU. On the CPU the VM is called directly.
A request with penalties or a grammar (runtime/processing.py) runs the module's second step
function, `decode_processed`, from its first sampled token on (a second graph, captured on
first use); a grammar's mask, and logprobs, are handled per token with no lookahead.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from sparkinfer.compiler.manifest import MANIFEST_NAME, Manifest, compiled_dir, find_compiled, stale_reason
from sparkinfer.grammar import mask_words
from sparkinfer.model.spec import ENTRY_PROCESSED, PROCESSING_INPUTS
from sparkinfer.errors import CompiledModuleError, ContextLengthError, InvalidParameterError, SparkInferError
from sparkinfer.runtime import device as device_mod
from sparkinfer.runtime.device import Device, MemoryInfo, format_bytes
from sparkinfer.runtime.kv_cache import KVCache
from sparkinfer.runtime.cudart import HOST_TO_DEVICE
from sparkinfer.runtime.weights import DEFAULT_RESERVE_BYTES, upload_weights
from sparkinfer.runtime.processing import LogitsProcessing, TokenLogprob, token_logprob
from sparkinfer.sampling_params import check_max_tokens, check_prompt_tokens, check_sampling

Log = Callable[[str], None]


# -----------------------------------------------------------------------------------------
# Where compiled modules live
# -----------------------------------------------------------------------------------------


def repo_compiled_dir() -> Path:
    """`compiled/` at the project root (ahead-of-time modules the lead builds and ships)."""
    return Path(__file__).resolve().parents[2] / "compiled"


def cache_dir() -> Path:
    """Where modules compiled on demand go: $SPARKINFER_CACHE, else ~/.cache/sparkinfer."""
    env = os.environ.get("SPARKINFER_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sparkinfer" / "compiled"


def default_search_roots() -> list[Path]:
    roots = []
    if os.environ.get("SPARKINFER_COMPILED"):
        roots.append(Path(os.environ["SPARKINFER_COMPILED"]))
    roots += [Path("compiled").resolve(), repo_compiled_dir(), cache_dir()]
    unique: list[Path] = []
    for r in roots:
        if r not in unique:
            unique.append(r)
    return unique


def type_map_of(model: Any) -> dict[str, Any]:
    return {name: info.ggml_type for name, info in model.tensors.items()}


def find_module(roots: Sequence[Path], arch: str, config: Any, type_map: dict[str, Any]) -> Manifest | None:
    """The first up-to-date compiled module for this model and arch under `roots` (layout
    `<root>/<arch>/<key>/manifest.json`): the compiler's own lookup, `find_compiled`, which
    needs no TVM."""
    for root in roots:
        found = find_compiled(config, type_map, arch, root)
        if found is not None:
            return Manifest.load(Path(found.directory))
    return None


def stale_modules(roots: Sequence[Path], arch: str, config: Any, type_map: dict[str, Any]) -> list[str]:
    """'<dir>: <why>' for each module of this model under `roots` that cannot be used."""
    out = []
    for root in roots:
        directory = compiled_dir(config, type_map, arch, root)
        if (directory / MANIFEST_NAME).is_file():
            try:
                why = stale_reason(Manifest.read(directory), config, type_map, arch)
            except (SparkInferError, KeyError, TypeError, ValueError) as e:
                why = f"unreadable manifest ({e})"
            if why:
                out.append(f"{directory}: {why}")
    return out


def compile_module(config: Any, type_map: dict[str, Any], arch: str, out_root: Path, note: str = "") -> Manifest:
    """Build the step with `sparkinfer.compiler` into `out_root`; CompiledModuleError when the
    compiler (full TVM) is not there (`note` says what was found instead)."""
    try:
        if device_mod.tvm_runtime_only():
            raise ImportError("TVM is runtime-only here")
        from sparkinfer.compiler import compile_model
    except ImportError as e:
        raise CompiledModuleError(
            f"no compiled module for {arch} at {out_root / arch}{note} and no TVM compiler to build one ({e}): "
            f"run `sparkinfer compile ...` on a machine with full TVM"
        ) from None
    return compile_model(config, type_map, arch, out_root).manifest


def find_or_compile(model: Any, arch: str, *, module_dir: str | Path | None = None,
                    search_roots: Sequence[str | Path] | None = None, cache: str | Path | None = None,
                    compile: bool = True, log: Log | None = None) -> Manifest:
    """The compiled module for `model` (an open GGUFModel) on `arch`: `module_dir` when given
    (CompiledModuleError unless it fits), else the first up-to-date one under `search_roots`
    (None: `default_search_roots`) or `cache`, else compiled into `cache` when `compile`."""
    log = log or (lambda message: None)
    config, type_map = model.config, type_map_of(model)
    if module_dir is not None:
        manifest = Manifest.load(Path(module_dir))
        why = stale_reason(manifest, config, type_map, arch, check_sources=False)
        if why is not None:
            raise CompiledModuleError(f"the module at {module_dir} does not fit {model.path}: {why}")
        return manifest
    cache_root = Path(cache) if cache is not None else cache_dir()
    roots = [Path(r) for r in search_roots] if search_roots is not None else default_search_roots()
    if cache_root not in roots:
        roots.append(cache_root)
    found = find_module(roots, arch, config, type_map)
    if found is not None:
        return found
    where = cache_root / arch
    stale = stale_modules(roots, arch, config, type_map)
    note = f" (found only stale ones: {'; '.join(stale)})" if stale else ""
    if not compile:
        raise CompiledModuleError(
            f"no compiled module for {arch} at {where}{note} and no TVM compiler to build one (compilation "
            f"disabled): run `sparkinfer compile ...` on a machine with full TVM"
        )
    if device_mod.tvm_runtime_only():
        return compile_module(config, type_map, arch, cache_root, note)  # raises
    log(f"compiling the {arch} module for {model.path.name} into {cache_root} (first run only)")
    t0 = time.perf_counter()
    manifest = compile_module(config, type_map, arch, cache_root, note)
    log(f"compiled in {time.perf_counter() - t0:.1f} s")
    return manifest


# -----------------------------------------------------------------------------------------
# Generation results
# -----------------------------------------------------------------------------------------


@dataclass
class GenerationStats:
    """Timings of one `generate` call (seconds). Prefill ends when the first new token is on
    the host; decode covers the tokens after it."""

    prompt_tokens: int = 0
    reused_tokens: int = 0
    prefill_s: float = 0.0
    decode_times: list[float] = field(default_factory=list)  # per token after the first (streaming)
    decode_s: float = 0.0
    decode_steps: int = 0
    tokens: list[int] = field(default_factory=list)
    stop_reason: str = ""  # "stop" (a stop token, not yielded), "length", or "" while running
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per yielded token, when asked
    mask_s: float = 0.0  # host time computing and writing grammar masks
    timed_on_device: bool = False  # bench mode on a GPU: CUDA event times, not host clocks
    prefill_chunked: bool = False  # the prompt ran through the T-token steps (else the token loop)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        n = self.prompt_tokens - self.reused_tokens
        return n / self.prefill_s if self.prefill_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "reused_tokens": self.reused_tokens,
            "generated_tokens": len(self.tokens),
            "prefill_ms": self.prefill_s * 1e3,
            "prefill_tok_s": self.prefill_tokens_per_s,
            "decode_ms": self.decode_s * 1e3,
            "decode_steps": self.decode_steps,
            "decode_tok_s": self.decode_tokens_per_s,
            "stop_reason": self.stop_reason,
            "timed_on_device": self.timed_on_device,
            "prefill_chunked": self.prefill_chunked,
        }


class Generation:
    """An iterator of generated token ids; `stats` fills in as it runs."""

    def __init__(self, run: Callable[[GenerationStats], Iterator[int]]) -> None:
        self.stats = GenerationStats()
        self._it = run(self.stats)

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> int:
        return next(self._it)

    def close(self) -> None:
        self._it.close()

    def all(self) -> list[int]:
        return list(self)


# -----------------------------------------------------------------------------------------
# Step backends
# -----------------------------------------------------------------------------------------


class _VMBackend:
    """Plain VM calls (the CPU; a GPU with cuda_graph=False). Synchronous reads."""

    def __init__(self, fn: Any, args: list[Any], kv: KVCache, fn_processed: Any = None) -> None:
        self.fn, self.args, self.kv = fn, args, kv
        self.fn_processed = fn_processed
        self.processed = False  # step() runs fn_processed (ENTRY_PROCESSED) instead of fn
        self.outs: list[Any] = []
        self.out_host: list[int] = []
        self._prompt: list[int] = []
        self._marks: dict[str, float] = {}

    def load_prompt(self, tokens: Sequence[int]) -> None:
        self._prompt = list(tokens)

    def feed(self, i: int) -> None:
        self.kv.writer.write(self.kv.arrays["token"], np.array([self._prompt[i]], np.int32))

    def prepare_processed(self) -> None:
        """Get ENTRY_PROCESSED ready to run (before a request's state is written)."""

    def use(self, processed: bool) -> None:
        """Run the step with (ENTRY_PROCESSED) or without (ENTRY) logits processing from now on."""
        self.processed = processed

    def step(self) -> None:
        outs = (self.fn_processed if self.processed else self.fn)(*self.args)
        self.outs = [outs[0], outs[1]]

    def run(self, fn: Any, args: list[Any]) -> Any:
        """Call another function of the module (a T-token step) on the step's device; its
        outputs become what `emit` and `logits` read until the next `step`."""
        outs = fn(*args)
        self.outs = [outs[0], outs[1]]
        return outs

    def emit(self, o: int, notify: bool = True) -> None:
        value = int(self.outs[1].numpy().reshape(-1)[0])
        if o == len(self.out_host):
            self.out_host.append(value)
        else:
            self.out_host[o] = value

    def wait(self, o: int) -> int:
        return self.out_host[o]

    def result(self, o: int) -> int:
        return self.out_host[o]

    def logits(self) -> np.ndarray:
        return self.outs[0].numpy()

    def start(self, n_out: int) -> None:
        self.out_host = []

    def synchronize(self) -> None:
        pass

    def mark(self, name: str) -> None:
        self._marks[name] = time.perf_counter()

    def step_times(self) -> tuple[float, float]:
        """(prefill, decode) seconds between the marks "start", "prefill" and "end"."""
        m = self._marks
        return m["prefill"] - m["start"], m["end"] - m["prefill"]

    def close(self) -> None:
        pass


class _CudaBackend(_VMBackend):
    """Graph replay (or VM calls) on the runtime's stream; prompt tokens copied on the device,
    `next` copied to pinned host memory with an event per token."""

    def __init__(self, fn: Any, args: list[Any], kv: KVCache, stream: Any, capture: bool, lookahead: int,
                 fn_processed: Any = None) -> None:
        super().__init__(fn, args, kv, fn_processed)
        import tvm

        from sparkinfer.runtime.cuda_graph import CapturedStep

        self.stream = stream
        self.capture = capture
        self.graph = CapturedStep(stream, fn, args) if capture else None
        self.plain_graph = self.graph
        self.processed_graph: Any = None  # captured on first use: most servers never need it
        if self.graph is not None:
            self.outs = self.graph.outputs
        capacity = kv.capacity
        self.prompt_dev = tvm.runtime.empty((capacity,), "int32", kv.arrays["token"].device)
        self.out_pinned = stream.pinned(capacity, np.int32)
        self.n_events = max(2, lookahead + 2)
        self.events = [stream.event() for _ in range(self.n_events)]
        self.timing = {name: stream.event(timing=True) for name in ("start", "prefill", "end")}
        kv.reset()  # the warm-up step moved pos
        stream.synchronize()

    def load_prompt(self, tokens: Sequence[int]) -> None:
        arr = np.asarray(tokens, np.int32)
        if arr.size:
            self.stream.rt.memcpy_async(self.prompt_dev.data_ptr(), arr.ctypes.data, arr.nbytes,
                                        HOST_TO_DEVICE, self.stream.handle)

    def feed(self, i: int) -> None:
        self.stream.copy_device(self.kv.arrays["token"].data_ptr(), self.prompt_dev.data_ptr() + 4 * i, 4)

    def prepare_processed(self) -> None:
        if not self.capture or self.processed_graph is not None:
            return
        from sparkinfer.runtime.cuda_graph import CapturedStep

        # Capturing runs the step once (its warm-up): put pos back. The request's state
        # (token, rng, counts) is written after this.
        self.stream.synchronize()
        pos = self.kv.arrays["pos"].numpy()
        self.processed_graph = CapturedStep(self.stream, self.fn_processed, self.args)
        self.stream.synchronize()
        self.kv.writer.write(self.kv.arrays["pos"], pos)

    def use(self, processed: bool) -> None:
        super().use(processed)
        if self.capture:
            self.graph = self.processed_graph if processed else self.plain_graph
            self.outs = self.graph.outputs

    def step(self) -> None:
        if self.graph is not None:
            self.outs = self.graph.outputs
            self.graph.replay()
        else:
            self.stream.activate()
            super().step()

    def run(self, fn: Any, args: list[Any]) -> Any:
        self.stream.activate()
        return super().run(fn, args)

    def emit(self, o: int, notify: bool = True) -> None:
        """Copy output `o` to pinned memory; with `notify`, record the event `wait` blocks on."""
        self.stream.copy_to_host(self.out_pinned.ctypes.data + 4 * o, self.outs[1].data_ptr(), 4)
        if notify:
            self.stream.record(self.events[o % self.n_events])

    def wait(self, o: int) -> int:
        self.stream.rt.event_synchronize(self.events[o % self.n_events])
        return int(self.out_pinned[o])

    def result(self, o: int) -> int:
        return int(self.out_pinned[o])

    def logits(self) -> np.ndarray:
        self.stream.synchronize()
        return self.outs[0].numpy()

    def start(self, n_out: int) -> None:
        pass

    def synchronize(self) -> None:
        self.stream.synchronize()

    def mark(self, name: str) -> None:
        self.stream.record(self.timing[name])

    def step_times(self) -> tuple[float, float]:
        rt = self.stream.rt
        return (rt.event_elapsed_ms(self.timing["start"], self.timing["prefill"]) / 1e3,
                rt.event_elapsed_ms(self.timing["prefill"], self.timing["end"]) / 1e3)

    def close(self) -> None:
        self.stream.synchronize()
        for graph in (self.plain_graph, self.processed_graph):
            if graph is not None:
                graph.close()
        for ev in self.events + list(self.timing.values()):
            self.stream.rt.event_destroy(ev)
        self.events = []
        self.timing = {}


# New prompt tokens below which `generate` prefills token by token even where the module has
# T-token steps: a chunk step costs about as much as a few decode steps. Measured on the 2-core
# CPU with the shipped model (bench/short_prompt_prefill.py): a 128-chunk 4.4 ms for 4 new
# tokens against the loop's 2.9, 4.7 against 5.8 for 8, 4.7 against 8.1 for 12.
# (An H200 with Qwen3-30B-A3B: ~70 ms a 128-chunk against 4.1 ms a token by its per-kernel
# times, a crossover near 17; not measured end to end yet, bench/NOTES.md.)
MIN_CHUNKED_TOKENS = 8


# The most rows of padding a chunk may carry: a T-token step's dense GEMMs and attention run all
# T rows, its expert GEMMs only the valid ones. On an H100 a 1024-token prompt took 105 ms as one
# 2048-token chunk and 90 ms as two 512s, while 4096 tokens took 0.373 s as two 2048s and 0.415 s
# as eight 512s (bench/NOTES.md, "Session 11").
MAX_PADDING_ROWS = 512


def plan_chunks(sizes: Sequence[int], n: int) -> list[tuple[int, int]]:
    """(T, valid rows) per chunk for n tokens and the step sizes `sizes` (ascending): the
    largest T while more than it is left; then the smallest T that holds the rest with at most
    MAX_PADDING_ROWS of padding, else the largest T below the rest (the smallest T when none
    is)."""
    out = []
    while n > 0:
        holding = [t for t in sizes if t >= n]
        below = [t for t in sizes if t < n]
        t = holding[0] if holding and (holding[0] - n <= MAX_PADDING_ROWS or not below) else below[-1]
        out.append((t, min(t, n)))
        n -= out[-1][1]
    return out


def chunk_sizes(module_sizes: Sequence[int], only: int | None) -> tuple[int, ...]:
    """The T-token steps an engine uses (ascending): the module's, or only the step of `only`
    tokens (llama.cpp's --ubatch-size: e.g. to run a short text through a long chunk's kernels)."""
    sizes = tuple(sorted(module_sizes))
    if only is None:
        return sizes
    if only not in sizes:
        have = ", ".join(map(str, sizes)) or "none: it prefills token by token"
        raise InvalidParameterError("prefill_chunk",
                                    f"prefill chunk {only} is not one of the module's T-token steps ({have})")
    return (only,)


class _ChunkSteps:
    """The T-token steps (`prefill_T`, `score_T`) of `sizes`, T in the manifest's
    `prefill_chunks`, with their device inputs: each T's token buffer, and n_valid."""

    def __init__(self, vm: Any, sizes: tuple[int, ...], kv: KVCache, args: list[Any], tvm: Any,
                 device: Any) -> None:
        from sparkinfer.model.spec import chunk_entry

        self.sizes = sizes
        self.kv = kv
        self.fns = {(t, all_logits): vm[chunk_entry(t, all_logits)] for t in self.sizes for all_logits in (False, True)}
        self.tokens = {t: tvm.runtime.empty((t,), "int32", device) for t in self.sizes}
        self.n_valid = tvm.runtime.empty((1,), "int32", device)
        self.args = args

    def run(self, b: _VMBackend, tokens: Sequence[int], *, all_logits: bool, seed: int,
            first_pos: int) -> np.ndarray:
        """Run `tokens` (at positions first_pos ..) through the steps. all_logits: returns the
        logits of every token (float32[n, V]); else the last chunk samples `next` (the
        backend's output, read by `emit`) with draw counter first_pos + n - 1 and writes
        token/pos, and its logits row is returned."""
        write = self.kv.writer.write
        rows, start = [], 0
        plan = plan_chunks(self.sizes, len(tokens))
        for i, (t, n) in enumerate(plan):
            chunk = np.zeros(t, np.int32)
            chunk[:n] = tokens[start:start + n]
            write(self.tokens[t], chunk)
            write(self.n_valid, np.array([n], np.int32))
            if not all_logits and i == len(plan) - 1:
                write(self.kv.arrays["rng"], np.array([seed & 0xFFFFFFFF, first_pos + len(tokens) - 1], np.uint32))
            outs = b.run(self.fns[(t, all_logits)], [self.tokens[t], self.n_valid] + self.args)
            if all_logits:
                b.synchronize()
                rows.append(outs[0].numpy()[:n])
            start += n
        return np.concatenate(rows) if all_logits else b.logits()


# -----------------------------------------------------------------------------------------
# The engine
# -----------------------------------------------------------------------------------------


class Engine:
    """A model loaded for decoding on one device.

    model: a GGUF path (or an open GGUFModel). arch: "sm_90" / "sm_120" / "sm_121" / "cpu"
    (None: the GPU's arch, else cpu). context: tokens of KV cache (None: the model's
    context_length, shrunk to what fits in memory). module_dir: a compiled module's directory
    (else searched under `search_roots`, then compiled into `cache` when `compile` and the
    compiler is importable). memory_info: (free, total) bytes of the device, injectable.
    reserve: bytes kept free beside the weights and the KV cache, on top of what the module's
    functions allocate when they run (its manifest's workspace_bytes: ~2.2 GiB for the
    full-size model's T-token steps, mostly a 2048-token score's logits). prefill_chunk: run
    every chunked prompt and score through the module's T-token step of this many tokens only
    (`chunk_sizes`); None: `plan_chunks` over all of them.
    """

    def __init__(
        self,
        model: Any,
        *,
        arch: str | None = None,
        context: int | None = None,
        module_dir: str | Path | None = None,
        search_roots: Sequence[str | Path] | None = None,
        cache: str | Path | None = None,
        compile: bool = True,
        cuda_graph: bool = True,
        lookahead: int = 1,
        memory_info: MemoryInfo | None = None,
        reserve: int = DEFAULT_RESERVE_BYTES,
        progress: bool = False,
        log: Log | None = None,
        prefill_chunk: int | None = None,
    ) -> None:
        from sparkinfer.gguf_file import GGUFModel

        t0 = time.perf_counter()
        self.log: Log = log or (lambda message: None)
        self.model = model if isinstance(model, GGUFModel) else GGUFModel.open(model)
        self.config = self.model.config
        tvm = device_mod.import_tvm()
        if arch is not None:
            device_mod.check_arch(arch)
        self.device: Device = device_mod.open_device(arch)
        self.arch = self.device.arch
        where = "GPU" if self.device.is_cuda else "host"
        mem = memory_info or self.device.memory_info
        self.manifest = find_or_compile(self.model, self.arch, module_dir=module_dir, search_roots=search_roots,
                                        cache=cache, compile=compile, log=self.log)
        sizes = chunk_sizes(self.manifest.prefill_chunks, prefill_chunk)
        self.lookahead = max(0, int(lookahead))
        reserve += self.manifest.workspace_bytes

        lib = tvm.runtime.load_module(str(self.manifest.library))
        self.vm = tvm.runtime.vm.VirtualMachine(lib, self.device.tvm_device)
        self._fn = self.vm[self.manifest.entry]

        self.weights = upload_weights(self.model, self.manifest.inputs, self.device.tvm_device,
                                      memory_info=mem, reserve=reserve, where=where, progress=progress)
        self.stream = None
        writer = None
        if self.device.is_cuda:
            from sparkinfer.runtime.cuda_graph import CudaStream

            self.stream = CudaStream(self.device.tvm_device, self.device.index)
            writer = self.stream
        self.kv = KVCache(self.manifest, self.device.tvm_device, context=context,
                          model_context=self.config.context_length, memory_info=mem, reserve=reserve,
                          writer=writer, where=where)
        if self.kv.shrunk_from is not None:
            self.log(f"KV cache: {self.kv.capacity} tokens ({format_bytes(self.kv.kv_bytes)}), "
                     f"not {self.kv.shrunk_from}: that is what fits in free memory")
        self.args = self._arguments()
        # Modules compiled before logits processing existed lack its inputs and function.
        self.can_process = all(name in self.kv.arrays for name in PROCESSING_INPUTS)
        fn_processed = self.vm[ENTRY_PROCESSED] if self.can_process else None
        if self.device.is_cuda:
            self._backend: _VMBackend = _CudaBackend(self._fn, self.args, self.kv, self.stream, cuda_graph,
                                                     self.lookahead, fn_processed)
        else:
            self._backend = _VMBackend(self._fn, self.args, self.kv, fn_processed)
        self.cuda_graph = bool(cuda_graph and self.device.is_cuda)
        self._chunks = _ChunkSteps(self.vm, sizes, self.kv, self.args, tvm, self.device.tvm_device)
        if not self._chunks.sizes:
            self.log(f"the {self.arch} module has no T-token step: prompts are prefilled token by token "
                     f"(the decode step in a loop)")
        self.load_s = time.perf_counter() - t0
        self._tokenizer = None

    # -- setup ------------------------------------------------------------------------------

    def _arguments(self) -> list[Any]:
        weights = iter(self.weights)
        args = []
        for inp in self.manifest.inputs:
            args.append(next(weights) if inp.role == "weight" else self.kv.arrays[inp.name])
        return args

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from sparkinfer.tokenizer import Tokenizer

            self._tokenizer = Tokenizer.from_vocab(self.model.vocab)
        return self._tokenizer

    def default_stop_tokens(self) -> list[int]:
        stops = []
        for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
            value = self.model.metadata.get(key)
            if isinstance(value, int) and value not in stops:
                stops.append(value)
        return stops

    @property
    def capacity(self) -> int:
        return self.kv.capacity

    def describe(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "device": self.device.describe(),
            "cuda_graph": self.cuda_graph,
            "context": self.kv.capacity,
            "kv_cache_bytes": self.kv.kv_bytes,
            "weights_bytes": sum(int(np.prod(w.shape)) * np.dtype(str(w.dtype)).itemsize for w in self.weights),
            "module": str(self.manifest.directory),
            "runtime_only_tvm": device_mod.tvm_runtime_only(),
        }

    # -- running ----------------------------------------------------------------------------

    def generate(
        self,
        prompt_tokens: Sequence[int],
        max_tokens: int = 128,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        stop_tokens: Sequence[int] | None = None,
        stream: bool = True,
        reuse_prefix: bool = False,
        processing: LogitsProcessing | None = None,
    ) -> Generation:
        """Generate up to `max_tokens` ids after `prompt_tokens` (iterate the result).

        temperature <= 0 is greedy; top_k 0 means no top-k cut. A stop token ends generation
        and is not yielded (stop_tokens None: the model's EOS/EOT ids; () for none).
        stream=False (bench mode): every step is launched before any token is read, stop
        tokens are ignored, and on a GPU the times come from CUDA events.
        reuse_prefix: keep the cached K/V of the longest common prefix with the last
        sequence and run only the rest of the prompt.
        processing: penalties, a token constraint, log-probabilities (runtime/processing.py);
        None or nothing asked: the plain step, at no cost.
        """
        prompt = [int(t) for t in prompt_tokens]
        check_prompt_tokens(prompt, self.config.vocab_size)
        check_max_tokens(max_tokens)
        check_sampling(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        self.kv.check_fits(len(prompt), max_tokens)
        stops = set(self.default_stop_tokens() if stop_tokens is None else stop_tokens)
        if not stream:
            stops = set()
        params = (float(temperature), float(top_p), int(top_k), int(seed))
        processing = processing or LogitsProcessing()
        if processing.on_device and not self.can_process:
            raise CompiledModuleError(
                f"the compiled module at {self.manifest.directory} has no logits processing ({ENTRY_PROCESSED}: "
                f"penalties, grammars): recompile it with `sparkinfer compile`")
        if not stream and (processing.constraint is not None or processing.logprobs is not None):
            raise SparkInferError("a token constraint or logprobs need stream=True: each token is read as it comes")

        def run(stats: GenerationStats) -> Iterator[int]:
            return self._run(prompt, max_tokens, params, stops, stream, reuse_prefix, stats, processing)

        return Generation(run)

    def _run(self, prompt: list[int], max_tokens: int, params: tuple[float, float, int, int], stops: set[int],
             stream: bool, reuse_prefix: bool, stats: GenerationStats,
             processing: LogitsProcessing) -> Iterator[int]:
        b, kv = self._backend, self.kv
        t0 = time.perf_counter()
        if processing.on_device:
            b.prepare_processed()
        b.use(False)  # prefill steps sample nothing that is kept: never processed
        constraint = processing.constraint
        mask = np.full(mask_words(self.config.vocab_size), -1, np.int32)
        if processing.on_device:
            kv.writer.write(kv.arrays["logits_params"], processing.params)
            kv.writer.zero(kv.arrays["token_counts"])
            kv.writer.write(kv.arrays["token_mask"], mask)
        reused = kv.common_prefix(prompt) if reuse_prefix else 0
        kv.set_position(reused)
        kv.set_sampling(*params)
        if reused:
            # Every step bumps the draw counter rng[1]: start it at the position, so a seeded
            # sample is the same whatever prefix was cached.
            kv.writer.write(kv.arrays["rng"], np.array([params[3] & 0xFFFFFFFF, reused], np.uint32))
        new = prompt[reused:]
        stats.prompt_tokens, stats.reused_tokens = len(prompt), reused
        if max_tokens == 0:
            stats.stop_reason = "length"
            return
        total_steps = len(new) + max_tokens - 1
        first_out = len(new) - 1  # step index that yields output 0
        b.load_prompt(new)
        b.start(max_tokens)
        lookahead = self.lookahead if stream else total_steps
        if constraint is not None or processing.logprobs is not None:
            lookahead = 0  # the next step's mask, or the logits read, wait for this token
        launched = 0
        n_read = 0
        fed: list[int] = []
        logged: list[TokenLogprob] = []  # per output, when logprobs are asked
        stats.prefill_chunked = bool(self._chunks.sizes) and len(new) >= MIN_CHUNKED_TOKENS
        if stats.prefill_chunked:
            # The prompt in T-token steps; the last one samples output 0 with the draw counter
            # the token loop would have reached there (one draw per position). A request that
            # processes its logits (penalties, a constraint) or reads them (logprobs) takes
            # output 0 from the decode step instead: the chunks run all but the last prompt
            # token, which leaves token, pos and the draw counter where that step expects them.
            per_token = processing.on_device or processing.logprobs is not None
            chunked = new[:-1] if per_token else new
            b.mark("start")
            if chunked:
                self._chunks.run(b, chunked, all_logits=False, seed=params[3], first_pos=reused)
            if not per_token:
                b.emit(0, notify=stream)
                b.mark("prefill")
            launched = len(chunked)

        def launch() -> None:
            nonlocal launched
            j = launched
            if j < len(new):
                b.feed(j)
            if j == 0:
                b.mark("start")
            if j == first_out and processing.on_device:
                b.use(True)
            if j >= first_out and constraint is not None:
                t = time.perf_counter()
                constraint.fill_mask(mask)
                kv.writer.write(kv.arrays["token_mask"], mask)
                stats.mask_s += time.perf_counter() - t
            b.step()
            if j >= first_out:
                b.emit(j - first_out, notify=stream)
                if processing.logprobs is not None:
                    o = j - first_out
                    logged.append(token_logprob(b.logits(), b.wait(o), processing.logprobs))
            if j == first_out:
                b.mark("prefill")
            launched += 1

        last = t0
        try:
            while n_read < max_tokens:
                # Keep up to `lookahead` steps in flight beyond the one whose token is read next.
                while launched < total_steps and launched <= first_out + n_read + lookahead:
                    launch()
                if not stream and launched == total_steps and n_read == 0:
                    b.mark("end")
                    b.synchronize()
                token = b.wait(n_read) if stream else b.result(n_read)
                now = time.perf_counter()
                if n_read == 0:
                    stats.prefill_s = now - t0
                else:
                    stats.decode_times.append(now - last)
                last = now
                n_read += 1
                if constraint is not None:
                    constraint.accept(token)
                if token in stops:
                    stats.stop_reason = "stop"
                    break
                stats.tokens.append(token)
                if logged:
                    stats.logprobs.append(logged[n_read - 1])
                yield token
            else:
                stats.stop_reason = "length"
        finally:
            b.synchronize()
            b.use(False)
            # What the device cached: every token fed to a launched step.
            n_new_out = max(0, launched - len(new))
            fed = new[: min(launched, len(new))] + [b.result(o) for o in range(n_new_out)]
            kv.tokens.extend(fed)
            stats.decode_steps = max(0, n_read - 1)
            stats.decode_s = sum(stats.decode_times)
            if not stream and launched == total_steps:
                # Bench mode: step times between marks (CUDA events on a GPU).
                stats.prefill_s, stats.decode_s = b.step_times()
                stats.decode_steps = max_tokens - 1
                stats.timed_on_device = isinstance(b, _CudaBackend)

    def forward(self, tokens: Sequence[int], *, reset: bool = True, token_loop: bool = False) -> np.ndarray:
        """Logits float32[T, V] of every one of `tokens` (from position 0 if reset, else after
        what is cached): the module's `score_T` steps, or with `token_loop` (or a module
        without them) the decode step fed one token at a time, reading the logits after
        every step. Teacher forcing (`score`, the accuracy gate) and tests; greedy sampling."""
        if reset:
            self.kv.reset()
        self.kv.check_fits(self.kv.n_tokens + len(tokens), 0)
        self.kv.set_sampling(0.0, 1.0, 0, 0)
        b = self._backend
        tokens = [int(t) for t in tokens]
        if self._chunks.sizes and not token_loop and tokens:
            out = self._chunks.run(b, tokens, all_logits=True, seed=0, first_pos=self.kv.n_tokens)
            self.kv.tokens.extend(tokens)
            return out
        b.load_prompt(tokens)
        rows = []
        for j in range(len(tokens)):
            b.feed(j)
            b.step()
            rows.append(b.logits())
        self.kv.tokens.extend(tokens)
        return np.stack(rows) if rows else np.zeros((0, self.config.vocab_size), np.float32)

    def close(self) -> None:
        if getattr(self, "_backend", None) is not None:
            self._backend.close()
            self._backend = None  # type: ignore[assignment]
        if self.stream is not None:
            self.stream.close()
            self.stream = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["ContextLengthError", "Engine", "Generation", "GenerationStats", "cache_dir", "find_module"]
