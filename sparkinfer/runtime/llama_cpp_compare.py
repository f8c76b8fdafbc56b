"""llama.cpp on the same GGUF, for `sparkinfer bench --compare llama.cpp`: the same tests, their
numbers side by side with SparkInfer's.

Two ways to run llama.cpp, both timed the way llama-bench times (llama.cpp's
tools/llama-bench/llama-bench.cpp):
  - `run_binding`: llama-cpp-python's low-level binding (`pip install llama-cpp-python`, which
    builds llama.cpp for this machine). One context per test with n_ctx = prompt + gen + depth,
    n_batch 2048, n_ubatch 512, f16 K/V, flash attention on llama.cpp's automatic choice,
    threads = this process's cores. ppN: one warm-up, then per rep an empty cache and the N
    random tokens decoded in n_batch chunks (llama.cpp splits each into n_ubatch), timed to
    the last chunk's synchronisation. tgN @ depth d: one warm-up token, then per rep the
    context holds d random tokens (filled once, untimed; later reps drop what the last rep
    generated) and N single-token decodes are timed, the host synchronising after each one and
    feeding a random next token, as llama-bench does. Each decode goes through ctypes, a few
    microseconds per token that llama-bench's C++ does not pay.
  - `run_llama_bench`: a llama-bench binary, run as `-o json` with the same tests, or the
    `-o json` output of an earlier run (`parse_llama_bench_json`).
Every figure is the median over reps (llama-bench prints the mean; its JSON keeps each rep).

On a CPU with AMX tiles llama.cpp's extra weight buffers (AMX, repacked) are turned off (the
binding's use_extra_bufts, llama-bench's --repack 0), and the output says so: with them, llama.cpp
0c1e570 segfaults in ggml's AMX matmul (ggml::cpu::amx::tensor_traits::compute_forward) on the
Intel Xeon development machines, through the binding and through llama-bench alike.

The binding is imported only here, only when --compare asks for it: llama-cpp-python stays an
optional dependency (the `compare` extra).
"""

from __future__ import annotations

import ctypes
import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from sparkinfer.errors import LlamaCppError

Log = Callable[[str], None]

N_BATCH, N_UBATCH = 2048, 512  # llama-bench's defaults
INSTALL_HINT = ("install llama-cpp-python (`pip install llama-cpp-python`, or the `compare` extra: it builds "
                "llama.cpp for this machine, ~15 minutes on 2 cores), or give a llama-bench binary or its recorded "
                "`-o json` output with --llama-bench PATH")


def llama_test_name(n_prompt: int, n_gen: int, n_depth: int) -> str:
    """llama-bench's name of a test: pp512, tg128 @ d4096."""
    name = f"pp{n_prompt}" if n_prompt else f"tg{n_gen}"
    return f"{name} @ d{n_depth}" if n_depth else name


def wanted_tests(prompts: Sequence[int], depths: Sequence[int], gen: int) -> list[tuple[int, int, int]]:
    """(n_prompt, n_gen, n_depth) of each test `sparkinfer bench` runs: ppN from an empty cache,
    tg<gen> at each depth."""
    return [(p, 0, 0) for p in prompts] + [(0, gen, d) for d in depths]


def _result(n_prompt: int, n_gen: int, n_depth: int, tok_s: Sequence[float]) -> dict[str, Any]:
    return {"test": llama_test_name(n_prompt, n_gen, n_depth), "n_prompt": n_prompt, "n_gen": n_gen, "n_depth": n_depth,
            "tok_s": list(tok_s), "tok_s_median": statistics.median(tok_s), "tok_s_min": min(tok_s),
            "tok_s_max": max(tok_s)}


def cores() -> int:
    """The cores this process may run on (llama.cpp's threads)."""
    return len(os.sched_getaffinity(0))


def extra_buffers_ok(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether llama.cpp may use its extra weight buffers here: not on a CPU with AMX tiles (see
    the module docstring)."""
    try:
        flags = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return True
    return "amx_tile" not in flags.split()


EXTRA_BUFFERS_OFF = "extra weight buffers off (this CPU has AMX tiles, where llama.cpp's AMX matmul segfaults)"


# -- llama-cpp-python's low-level binding ------------------------------------------------------

def check_binding() -> None:
    """LlamaCppError saying how to get llama-cpp-python when it is not installed (without
    loading llama.cpp's libraries)."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        raise LlamaCppError(f"--compare llama.cpp: llama-cpp-python is not installed: {INSTALL_HINT}")


def import_binding() -> Any:
    """The `llama_cpp` module, or LlamaCppError saying how to get it."""
    check_binding()
    try:
        import llama_cpp
    except (ImportError, OSError) as e:
        raise LlamaCppError(f"--compare llama.cpp: llama-cpp-python does not load ({e}): {INSTALL_HINT}") from None
    return llama_cpp


class _Binding:
    """One model loaded through the binding; `run` times one test in its own context."""

    def __init__(self, llama_cpp: Any, model_path: Path, threads: int, seed: int, extra_buffers: bool) -> None:
        import numpy as np

        self.ll = llama_cpp
        self.threads = threads
        self.rng = np.random.default_rng(seed)
        self.errors: list[str] = []

        def keep_errors(level: int, text: bytes, user_data: Any) -> None:
            if level == 3:  # GGML_LOG_LEVEL_ERROR; the rest (load chatter) is dropped
                self.errors.append(text.decode("utf-8", "replace").strip())

        # Kept on self: llama.cpp calls it for as long as the library lives.
        self._log = llama_cpp.llama_log_callback(keep_errors)
        llama_cpp.llama_log_set(self._log, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.use_extra_bufts = extra_buffers
        self.model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), params)
        if not self.model:
            raise LlamaCppError(f"llama.cpp could not load {model_path}: {self._why()}")
        vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self.bos = llama_cpp.llama_vocab_bos(vocab) if llama_cpp.llama_vocab_get_add_bos(vocab) else None

    def _why(self) -> str:
        return "; ".join(self.errors[-3:]) or "no message from llama.cpp"

    def _tokens(self, n: int, first: bool) -> Any:
        ids = [int(t) for t in self.rng.integers(0, self.n_vocab, n)]
        if first and self.bos is not None:
            ids[0] = self.bos
        return (self.ll.llama_token * n)(*ids)

    def _decode(self, ctx: Any, tokens: Any, n: int) -> None:
        rc = self.ll.llama_decode(ctx, self.ll.llama_batch_get_one(tokens, n))
        if rc != 0:
            raise LlamaCppError(f"llama_decode of {n} tokens returned {rc}: {self._why()}")

    def _prompt(self, ctx: Any, n_prompt: int) -> None:
        """llama-bench's test_prompt: n_prompt random tokens in n_batch chunks."""
        done = 0
        while done < n_prompt:
            n = min(n_prompt - done, N_BATCH)
            self._decode(ctx, self._tokens(n, first=done == 0), n)
            done += n
        self.ll.llama_synchronize(ctx)

    def _gen(self, ctx: Any, n_gen: int) -> None:
        """llama-bench's test_gen: n_gen single-token decodes, synchronised after each."""
        token = self._tokens(1, first=True)
        for _ in range(n_gen):
            self._decode(ctx, token, 1)
            self.ll.llama_synchronize(ctx)
            token = self._tokens(1, first=False)

    def run(self, n_prompt: int, n_gen: int, n_depth: int, reps: int) -> dict[str, Any]:
        ll = self.ll
        params = ll.llama_context_default_params()
        params.n_ctx = n_prompt + n_gen + n_depth
        params.n_batch, params.n_ubatch = N_BATCH, N_UBATCH
        params.n_threads = params.n_threads_batch = self.threads
        ctx = ll.llama_init_from_model(self.model, params)
        if not ctx:
            raise LlamaCppError(f"llama.cpp could not make a context of {params.n_ctx} tokens: {self._why()}")
        try:
            memory = ll.llama_get_memory(ctx)
            if n_prompt:  # warm-up, as llama-bench
                self._prompt(ctx, n_prompt)
            else:
                self._gen(ctx, 1)
            tok_s = []
            for rep in range(reps):
                if rep == 0 or not n_depth:
                    ll.llama_memory_clear(memory, False)
                    if n_depth:
                        self._prompt(ctx, n_depth)
                else:  # keep the depth's prefix, drop what the last rep generated
                    ll.llama_memory_seq_rm(memory, 0, n_depth, -1)
                t0 = time.perf_counter_ns()
                if n_prompt:
                    self._prompt(ctx, n_prompt)
                else:
                    self._gen(ctx, n_gen)
                tok_s.append((n_prompt + n_gen) / ((time.perf_counter_ns() - t0) * 1e-9))
        finally:
            ll.llama_free(ctx)
        return _result(n_prompt, n_gen, n_depth, tok_s)

    def close(self) -> None:
        self.ll.llama_model_free(self.model)


def run_binding(model_path: Path, tests: Sequence[tuple[int, int, int]], reps: int, *, seed: int = 0,
                threads: int | None = None, log: Log | None = None) -> dict[str, Any]:
    """Time `tests` ((n_prompt, n_gen, n_depth) each) through llama-cpp-python's binding."""
    log = log or (lambda message: None)
    llama_cpp = import_binding()
    threads = threads or cores()
    extra_buffers = extra_buffers_ok()
    if not extra_buffers:
        log(f"llama.cpp: {EXTRA_BUFFERS_OFF}")
    binding = _Binding(llama_cpp, model_path, threads, seed, extra_buffers)
    results = []
    try:
        for n_prompt, n_gen, n_depth in tests:
            result = binding.run(n_prompt, n_gen, n_depth, reps)
            log(f"llama.cpp {result['test']}: {result['tok_s_median']:.1f} tok/s")
            results.append(result)
    finally:
        binding.close()
    system = llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()
    return {
        "source": f"llama-cpp-python {llama_cpp.__version__} (its low-level binding of the llama.cpp it built)",
        "system_info": system,
        "threads": threads,
        "n_batch": N_BATCH,
        "n_ubatch": N_UBATCH,
        "flash_attn": "auto",
        "extra_buffers": extra_buffers,
        "reps": reps,
        "warmup_reps": 1,
        "tests": results,
    }


# -- llama-bench -------------------------------------------------------------------------------

def parse_llama_bench_json(text: str, origin: str) -> dict[str, Any]:
    """`llama-bench -o json` output (a list of test records) as `run_binding`'s dict; the median
    over each record's samples_ts."""
    try:
        records = json.loads(text)
    except ValueError as e:
        raise LlamaCppError(f"{origin} is not llama-bench `-o json` output: {e}") from None
    if not isinstance(records, list) or not records:
        raise LlamaCppError(f"{origin} is not llama-bench `-o json` output: expected a non-empty list of tests")
    need = ("n_prompt", "n_gen", "n_depth", "samples_ts")
    tests = []
    for i, record in enumerate(records):
        missing = [k for k in need if not isinstance(record, dict) or k not in record]
        if missing:
            raise LlamaCppError(f"{origin}: test {i} has no {', '.join(missing)} (not llama-bench `-o json` output?)")
        if not record["samples_ts"]:
            raise LlamaCppError(f"{origin}: test {i} ({llama_test_name(record['n_prompt'], record['n_gen'], record['n_depth'])})"
                                " has no samples")
        tests.append(_result(int(record["n_prompt"]), int(record["n_gen"]), int(record["n_depth"]),
                             [float(t) for t in record["samples_ts"]]))
    first = records[0]
    build = f"build {first.get('build_commit', '?')} ({first.get('build_number', '?')})"
    return {
        "source": f"llama-bench {build}, {origin}",
        "system_info": ", ".join(str(first[k]) for k in ("cpu_info", "gpu_info", "backends") if first.get(k)),
        "threads": first.get("n_threads"),
        "n_batch": first.get("n_batch"),
        "n_ubatch": first.get("n_ubatch"),
        "flash_attn": first.get("flash_attn"),
        "extra_buffers": first.get("repack"),
        "model_filename": first.get("model_filename"),
        "reps": len(records[0]["samples_ts"]),
        "warmup_reps": None,
        "tests": tests,
    }


def run_llama_bench(path: Path, model_path: Path, tests: Sequence[tuple[int, int, int]], reps: int, *,
                    threads: int | None = None, log: Log | None = None) -> dict[str, Any]:
    """Run the llama-bench binary at `path` on `model_path` (prefill tests and decode tests as two
    invocations, so that pp runs from an empty cache and tg at each depth), or, when `path` is a
    .json file, read the output of an earlier run."""
    log = log or (lambda message: None)
    if not path.is_file():
        raise LlamaCppError(f"--llama-bench {path}: no such file")
    if path.suffix == ".json":
        return parse_llama_bench_json(path.read_text(), str(path))
    if not os.access(path, os.X_OK):
        raise LlamaCppError(f"--llama-bench {path} is neither executable nor a .json file of its output")
    threads = threads or cores()
    prompts = sorted({p for p, _, _ in tests if p})
    gens = sorted({g for p, g, _ in tests if not p})
    depths = sorted({d for p, _, d in tests if not p})
    common = [str(path), "-m", str(model_path), "-r", str(reps), "-t", str(threads), "-o", "json"]
    if not extra_buffers_ok():
        log(f"llama-bench: {EXTRA_BUFFERS_OFF}")
        common += ["--repack", "0"]
    calls = []
    if prompts:
        calls.append(common + ["-p", ",".join(map(str, prompts)), "-n", "0"])
    if gens:
        calls.append(common + ["-p", "0", "-n", ",".join(map(str, gens)), "-d", ",".join(map(str, depths))])
    out: dict[str, Any] | None = None
    for cmd in calls:
        log(f"running {' '.join(cmd)}")
        try:
            done = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:
            raise LlamaCppError(f"--llama-bench {path} failed to run: {e}") from None
        if done.returncode != 0:
            tail = " | ".join(done.stderr.strip().splitlines()[-3:])
            raise LlamaCppError(f"{' '.join(cmd)} exited with {done.returncode}: {tail or 'no output'}")
        part = parse_llama_bench_json(done.stdout, str(path))
        if out is None:
            out = part
        else:
            out["tests"] += part["tests"]
    assert out is not None
    return out


# -- side by side ------------------------------------------------------------------------------

def side_by_side(report: dict[str, Any], llama: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per SparkInfer test: its tok/s, llama.cpp's for the same (n_prompt, n_gen,
    n_depth) test (None when llama.cpp's results lack it), and SparkInfer / llama.cpp."""
    theirs = {(t["n_prompt"], t["n_gen"], t["n_depth"]): t for t in llama["tests"]}
    rows = []
    for pp in report["prefill"]:
        rows.append(_row((pp["tokens"], 0, 0), pp["tok_s_median"], theirs))
    for d in report["decode"]:
        rows.append(_row((0, d["gen"], d["depth"]), d["tok_s_median"], theirs))
    return rows


def _row(key: tuple[int, int, int], ours: float, theirs: dict[tuple[int, int, int], dict[str, Any]]) -> dict[str, Any]:
    other = theirs.get(key)
    their_tok_s = other["tok_s_median"] if other else None
    n = key[0] or key[1]  # tokens a rep processes
    return {"test": llama_test_name(*key), "n_prompt": key[0], "n_gen": key[1], "n_depth": key[2],
            "sparkinfer_tok_s": ours, "llama_cpp_tok_s": their_tok_s,
            "sparkinfer_ms": n / ours * 1e3 if key[0] else 1e3 / ours,
            "llama_cpp_ms": (n / their_tok_s * 1e3 if key[0] else 1e3 / their_tok_s) if their_tok_s else None,
            "ratio": ours / their_tok_s if their_tok_s else None}


def compare_table(report: dict[str, Any], llama: dict[str, Any]) -> str:
    """The side-by-side table: a header naming llama.cpp's source and settings, then per test
    both tok/s, both times (a prompt's whole time for pp, ms per token for tg) and the ratio."""
    buffers = {True: "", False: f", {EXTRA_BUFFERS_OFF}", None: ""}[llama.get("extra_buffers")]
    threads = f"{llama['threads']} thread{'' if llama['threads'] == 1 else 's'}"
    head = (f"llama.cpp: {llama['source']} | {threads}, n_batch {llama['n_batch']}, "
            f"n_ubatch {llama['n_ubatch']}, flash attention {llama['flash_attn']}{buffers} | median of "
            f"{llama['reps']} reps")
    rows = [("test", "SparkInfer tok/s", "llama.cpp tok/s", "ratio", "SparkInfer ms", "llama.cpp ms")]
    for r in side_by_side(report, llama):
        missing = "-"
        rows.append((r["test"], f"{r['sparkinfer_tok_s']:.1f}",
                     f"{r['llama_cpp_tok_s']:.1f}" if r["llama_cpp_tok_s"] else missing,
                     f"{r['ratio']:.3f}" if r["ratio"] else missing, f"{r['sparkinfer_ms']:.3f}",
                     f"{r['llama_cpp_ms']:.3f}" if r["llama_cpp_ms"] else missing))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    note = "ratio = SparkInfer / llama.cpp tok/s; ms: the whole prompt for pp (time to first token), per token for tg"
    return "\n".join([head, *lines, note])


__all__ = ["check_binding", "compare_table", "cores", "extra_buffers_ok", "import_binding", "parse_llama_bench_json", "run_binding", "run_llama_bench",
           "side_by_side", "llama_test_name", "wanted_tests"]
