"""Helpers of the GPU round (bench/prepare_gpu_round.sh here, bench/gpu_round.sh there).

    python3 bench/gpu_round.py prepare ARCH       # here: compiled/gpu-tests/gpu-round.json (modules, prompt, sources)
    python3 bench/gpu_round.py get KEY            # a field of compiled/gpu-tests/gpu-round.json
    python3 bench/gpu_round.py check              # there: are compiled/'s modules this tree's code?
    python3 bench/gpu_round.py report OUT         # there: the short table from OUT's logs
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROUND = REPO / "compiled" / "gpu-tests" / "gpu-round.json"
FULL_PRESET, FULL_TYPES = "qwen3-30b-a3b", "q4_k_m"
RUN_PROMPT_TOKENS = 128
# llama.cpp's best configuration (FA on, GGML_CUDA_GRAPH_OPT=1), tg128: bench/NOTES.md, "Reference measurements".
LLAMA_CPP_H100 = {128: 325.8, 512: 301.0, 4096: 275.5, 16384: 236.3}
LLAMA_CPP_H200 = {128: 333.6, 512: 310.8, 4096: 286.3, 16384: 249.4}

sys.path.insert(0, str(REPO))


def prompt_text(n_tokens: int, vocab_size: int) -> str:
    """English text that the synthetic vocabulary of `vocab_size` (what `sparkinfer synth` writes)
    encodes to exactly `n_tokens` tokens."""
    from sparkinfer.tokenizer import Tokenizer, synthetic_vocab

    tok = Tokenizer.from_vocab(synthetic_vocab(vocab_size))
    base = ("The quick brown fox jumps over the lazy dog while the engineers measure how fast a mixture of "
            "experts decodes one token at a time on a single GPU. ")
    ids = tok.encode(base * (1 + 4 * n_tokens // len(base.split())))
    for extra in range(0, 8):
        text = tok.decode(ids[: n_tokens + extra])
        if len(tok.encode(text)) == n_tokens:
            return text
    raise SystemExit(f"no text of exactly {n_tokens} tokens found")


def prepare(arch: str) -> dict:
    """Compile the full 48-layer model's step (unless up to date) into compiled/<arch>/<key>/ and
    write compiled/gpu-tests/gpu-round.json."""
    from sparkinfer.compiler.manifest import sources_hash
    from sparkinfer.compiler.pipeline import compile_model
    from sparkinfer.gguf_file import preset_config, type_map

    from tests.gpu_prebuild import cut_module_dir

    config = preset_config(FULL_PRESET)
    t0 = time.perf_counter()
    result = compile_model(config, type_map(config, FULL_TYPES), arch, REPO / "compiled")
    seconds = time.perf_counter() - t0
    library = result.directory / result.manifest.library
    record = {
        "arch": arch,
        "full_module": str(result.directory.relative_to(REPO)),
        "full_library_bytes": library.stat().st_size,
        "full_compile_s": round(seconds, 1),
        "full_cached": result.cached,
        "cut_module": str(cut_module_dir(arch).relative_to(REPO)) if cut_module_dir(arch).is_relative_to(REPO)
        else str(cut_module_dir(arch)),
        "sources_hash": sources_hash(arch),
        "run_prompt": prompt_text(RUN_PROMPT_TOKENS, config.vocab_size),
        "run_prompt_tokens": RUN_PROMPT_TOKENS,
        "prepared_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    ROUND.write_text(json.dumps(record, indent=1) + "\n")
    return record


def check() -> str:
    """One line: whether compiled/gpu-tests/gpu-round.json was prepared from this tree's sources."""
    from sparkinfer.compiler.manifest import sources_hash

    record = json.loads(ROUND.read_text())
    now = sources_hash(record["arch"])
    if now == record["sources_hash"]:
        return f"sources {now}: the modules in compiled/ are this tree's code (prepared {record['prepared_at']})"
    return (f"WARNING: sources {now} here, {record['sources_hash']} when compiled/ was prepared "
            f"({record['prepared_at']}): the modules are not this tree's code; re-run bench/prepare_gpu_round.sh")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _json(path: Path) -> dict | None:
    text = _read(path).strip()
    if not text:
        return None
    try:
        return json.loads(text.splitlines()[-1])
    except ValueError:
        return None


def report(out: Path) -> str:
    lines = []
    stages = _read(out / "setup.log")
    gpu = re.search(r"^GPU: (.*)$", stages, re.M)
    lines.append(f"GPU round: {gpu.group(1) if gpu else 'GPU unknown'}")
    check_line = re.search(r"^(sources .*|WARNING: sources .*)$", stages, re.M)
    if check_line:
        lines.append(check_line.group(1))
    pytest_log = _read(out / "pytest.log").strip().splitlines()
    summary = next((ln for ln in reversed(pytest_log) if re.search(r"\b(passed|failed|error|skipped)\b", ln)),
                   "no pytest summary (see pytest.log)")
    lines.append(f"pytest -m gpu: {summary.strip('= ')}")
    fails = [ln for ln in pytest_log if ln.startswith(("FAILED", "ERROR"))]
    lines += [f"  {ln}" for ln in fails[:5]]
    cut = _read(out / "full_width_cut.txt").strip().splitlines()
    lines.append(cut[0] if cut else "full-width cut: no result (see pytest.log)")

    bench = _json(out / "bench.json")
    if bench:
        ref = LLAMA_CPP_H200 if "H200" in bench["card"] else LLAMA_CPP_H100
        lines.append(f"sparkinfer bench ({bench['card']}, module {bench['module_key']}, TVM {bench['tvm_version']}, "
                     f"{bench['mode']}, {bench['timer']}, median of {bench['reps']}):")
        lines.append(f"  {'test':<14}{'tok/s':>9}{'ms/tok':>9}{'min':>9}{'max':>9}{'fill ms':>10}"
                     f"{'llama.cpp':>11}{'ratio':>7}")
        pp = bench["prefill"]
        lines.append(f"  {'pp' + str(pp['tokens']):<14}{pp['tok_s_median']:>9.1f}{1e3 / pp['tok_s_median']:>9.3f}"
                     f"{pp['tok_s_min']:>9.1f}{pp['tok_s_max']:>9.1f}{pp['ms_median']:>10.1f}")
        for d in bench["decode"]:
            base = ref.get(d["depth"])
            ratio = f"{d['tok_s_median'] / base:>7.2f}" if base else ""
            lines.append(f"  {'tg%d @ %d' % (d['gen'], d['depth']):<14}{d['tok_s_median']:>9.1f}"
                         f"{d['ms_per_token_median']:>9.3f}{d['tok_s_min']:>9.1f}{d['tok_s_max']:>9.1f}"
                         f"{d['fill_ms']:>10.1f}{base if base else '':>11}{ratio}")
    else:
        log = _read(out / "bench.log")
        partial = re.findall(r"^(pp\d+: .*|tg\d+ @ d\d+: .*)$", log, re.M)
        tail = log.strip().splitlines()[-1:] or ["no output"]
        lines.append(f"sparkinfer bench: no JSON ({tail[0]})" + ("; what bench.log has:" if partial else ""))
        lines += [f"  {ln}" for ln in partial]

    run = _json(out / "run.json")
    if run:
        t = run["timings"]
        lines.append(f"sparkinfer run -n 128 ({len(run['prompt_ids'])}-token prompt, streaming): load {t['load_s']:.1f} s, "
                     f"prefill {t['prefill_ms']:.1f} ms ({t['prefill_tok_s']:.0f} tok/s), decode "
                     f"{t['generated_tokens']} tokens at {t['decode_tok_s']:.1f} tok/s ({t['stop_reason']}), "
                     f"cuda_graph {run['cuda_graph']}")
    else:
        tail = _read(out / "run.log").strip().splitlines()[-1:] or ["no output"]
        lines.append(f"sparkinfer run: no result ({tail[0]})")
    times = re.findall(r"^stage (\S+): rc (\S+), (\d+) s$", stages, re.M)
    if times:
        lines.append("stages: " + ", ".join(f"{name} {s} s (rc {rc})" for name, rc, s in times))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "prepare":
        print(json.dumps(prepare(argv[1]), indent=1))
    elif len(argv) == 2 and argv[0] == "get":
        print(json.loads(ROUND.read_text())[argv[1]])
    elif argv == ["check"]:
        print(check())
    elif len(argv) == 2 and argv[0] == "report":
        print(report(Path(argv[1])))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
