"""Helpers of the GPU round (bench/prepare_gpu_round.sh here, bench/gpu_round.sh there).

    python3 bench/gpu_round.py prepare ARCH       # here: compiled/gpu-tests/gpu-round.json (modules, prompt, sources)
    python3 bench/gpu_round.py get KEY            # a field of compiled/gpu-tests/gpu-round.json
    python3 bench/gpu_round.py check              # there: are compiled/'s modules this tree's code?
    python3 bench/gpu_round.py report DIR         # there: the short table from the round's results in DIR
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ROUND = REPO / "compiled" / "gpu-tests" / "gpu-round.json"
FULL_PRESET, FULL_TYPES = "qwen3-30b-a3b", "q4_k_m"
RUN_PROMPT_TOKENS = 128
# Variants of the arch's default step that stage variants gates and times beside the full
# module's decode in one call (each module's schedules file: the arch's, with its "step" and some
# kernels' knobs overridden), decode only unless in VARIANT_CHUNKED (that keeps the call's carry
# under 64 MiB). None pending: the last, attention_norm "prologue" unrolled, lost 19 % on an H100
# (bench/NOTES.md, "Session 26"). The next round on an H200 times the base (the H200 round's
# knobs, untimed in a step there) against `before` (session 24's knobs, compiled/<arch>/before/).
VARIANT_STEPS: dict[str, dict[str, str]] = {}
VARIANT_KNOBS: dict[str, dict[str, dict]] = {}
VARIANT_CHUNKED: set[str] = set()
# The decode depths stage variants times a variant at: depth 128 (DEFAULT_VARIANT_DEPTHS) unless
# named here, for a variant of the attention, whose share of a token grows with the depth. The
# base is timed at every depth a variant is.
DEFAULT_VARIANT_DEPTHS = (128,)
VARIANT_DEPTHS: dict[str, tuple[int, ...]] = {}
# The full module of an earlier tree (compiled there, copied into compiled/<arch>/before/): when
# present, stage variants gates and times it as one more variant, so that the changes since
# that tree are measured against it in one call on one card.
BEFORE = "before"
# bench/NOTES.md, "Reference measurements": llama.cpp's best configuration (FA on, GGML_CUDA_GRAPH_OPT=1), tg128 by depth
# and pp by prompt size, on each card.
LLAMA_CPP_TG = {"H100": {128: 325.8, 512: 301.0, 4096: 275.5, 16384: 236.3},
                "H200": {128: 333.6, 512: 310.8, 4096: 286.3, 16384: 249.4}}
LLAMA_CPP_PP = {"H100": {512: 8873.0, 4096: 10138.0, 16384: 8567.0},
                "H200": {4096: 10577.0, 16384: 8821.0}}
# bench/NOTES.md's floor: bytes read per decoded token of the full-size model (`sparkinfer info`),
# and the H200's nominal HBM3e bandwidth (the GPU round issue).
BYTES_PER_TOKEN = 1_919_597_696
H200_BYTES_PER_S = 4.8e12

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
    """Compile the full 48-layer model's step (the arch's defaults, T-token steps included; unless
    up to date) into compiled/<arch>/<key>/, each of VARIANT_STEPS' steps (decode only unless in
    VARIANT_CHUNKED) into
    compiled/<arch>/<name>/, and write compiled/gpu-tests/gpu-round.json."""
    from sparkinfer.compiler.manifest import sources_hash
    from sparkinfer.compiler.pipeline import compile_model
    from sparkinfer.gguf_file import preset_config, type_map

    from tests.gpu_prebuild import cut_module_dir

    config = preset_config(FULL_PRESET)
    t0 = time.perf_counter()
    result = compile_model(config, type_map(config, FULL_TYPES), arch, REPO / "compiled")
    seconds = time.perf_counter() - t0
    library = result.directory / result.manifest.library
    variants = {name: compile_model(config, type_map(config, FULL_TYPES), arch, REPO / "compiled" / arch / name,
                                    prefill_chunks=None if name in VARIANT_CHUNKED else (),
                                    schedules=variant_schedules(arch, step, VARIANT_KNOBS.get(name, {})))
                for name, step in VARIANT_STEPS.items()}
    before = next((m.parent for m in sorted((REPO / "compiled" / arch / BEFORE).rglob("manifest.json"))), None)
    if before is not None:
        variants[BEFORE] = before
    record = {
        "arch": arch,
        "full_module": str(result.directory.relative_to(REPO)),
        "full_library_bytes": library.stat().st_size,
        "full_compile_s": round(seconds, 1),
        "full_cached": result.cached,
        "prefill_chunks": list(result.manifest.prefill_chunks),
        "largest_chunk": max(result.manifest.prefill_chunks),
        "variants": " ".join(variants),
        "variants_chunked": " ".join(name for name in variants if name in VARIANT_CHUNKED or name == BEFORE),
        **{f"{name}_module": str(_directory(result).relative_to(REPO)) for name, result in variants.items()},
        **{f"{name}_depths": _depths(VARIANT_DEPTHS.get(name, DEFAULT_VARIANT_DEPTHS)) for name in variants},
        "base_depths": _depths(sorted({d for name in variants for d in VARIANT_DEPTHS.get(name, DEFAULT_VARIANT_DEPTHS)}
                                      | set(DEFAULT_VARIANT_DEPTHS))),
        "cut_module": str(cut_module_dir(arch).relative_to(REPO)) if cut_module_dir(arch).is_relative_to(REPO)
        else str(cut_module_dir(arch)),
        "sources_hash": sources_hash(arch),
        "run_prompt": prompt_text(RUN_PROMPT_TOKENS, config.vocab_size),
        "run_prompt_tokens": RUN_PROMPT_TOKENS,
        # bench/profile_kernels.sh's chunked profile: two of the largest chunks
        "chunk_prompt": prompt_text(2 * max(result.manifest.prefill_chunks), config.vocab_size),
        "prepared_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    ROUND.write_text(json.dumps(record, indent=1) + "\n")
    return record


def _depths(depths: Any) -> str:
    """`sparkinfer bench --depths`'s form of a list of depths."""
    return ",".join(str(d) for d in depths)


def _directory(result: Any) -> Path:
    """A compiled variant's module folder (the `before` variant is given as its folder)."""
    return result if isinstance(result, Path) else result.directory


def variant_schedules(arch: str, step: dict[str, str], knobs: dict[str, dict] | None = None) -> Path:
    """The arch's schedules file (knobs and step variants) with `step` over its "step" and
    `knobs` (kernel key -> knobs) over its kernels' entries, written to
    compiled/gpu-tests/variant-<arch>-<step's values and kernels' count>.json."""
    from sparkinfer.schedule.schedules import ScheduleEntry, SchedulesFile, schedules_for

    chosen, _ = schedules_for(arch)
    base = chosen or SchedulesFile(arch=arch, made_by={"by": "bench/gpu_round.py"})
    kernels = {**base.kernels, **{key: ScheduleEntry(knobs=value, source="transferred")
                                  for key, value in (knobs or {}).items()}}
    variant = SchedulesFile(arch=arch, made_by=base.made_by, kernels=kernels, step={**base.step, **step})
    name = "-".join([*step.values(), *([f"{len(knobs)}knobs"] if knobs else [])])
    return variant.write(ROUND.parent / f"variant-{arch}-{name}.json")


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


def _card_key(card: str) -> str:
    return "H200" if "H200" in card else "H100"


def _decode_rows(device: dict | None, sync: dict | None) -> list[str]:
    """tg128 by depth in both modes, beside llama.cpp's best on the same card kind."""
    first = device or sync
    if first is None:
        return []
    ref = LLAMA_CPP_TG[_card_key(first["card"])]
    by_mode = [{d["depth"]: d for d in b["decode"]} if b else {} for b in (device, sync)]
    lines = [f"decode ({first['card']}, module {first['module_key']}, median of {first['reps']}; llama.cpp: "
             f"its best configuration on an {_card_key(first['card'])}, bench/NOTES.md, Reference measurements):",
             f"  {'test':<14}{'device loop':>12}{'ratio':>7}{'host sync':>11}{'ratio':>7}{'llama.cpp':>11}{'fill ms':>10}"]
    for depth in sorted(set(by_mode[0]) | set(by_mode[1])):
        base = ref.get(depth)
        cells = []
        for mode, width in zip(by_mode, (12, 11)):
            d = mode.get(depth)
            cells.append(f"{d['tok_s_median']:>{width}.1f}" if d else f"{'-':>{width}}")
            cells.append(f"{d['tok_s_median'] / base:>7.2f}" if d and base else f"{'':>7}")
        fill = (by_mode[0].get(depth) or by_mode[1].get(depth))["fill_ms"]
        lines.append(f"  {'tg128 @ %d' % depth:<14}{''.join(cells)}{base if base else '-':>11}{fill:>10.1f}")
    d128 = by_mode[0].get(128) or by_mode[1].get(128)
    if d128 and _card_key(first["card"]) == "H200":
        share = BYTES_PER_TOKEN * d128["tok_s_median"] / H200_BYTES_PER_S
        lines.append(f"  depth 128 moves {BYTES_PER_TOKEN * d128['tok_s_median'] / 1e12:.2f} TB/s: {share:.0%} of the "
                     f"H200's 4.8 TB/s (the floor: {BYTES_PER_TOKEN / 1e9:.2f} GB a token; the goal 60 %)")
    return lines


def _prefill_rows(prefill: dict | None, log: str) -> list[str]:
    """pp by prompt size: tok/s and time to first token, beside llama.cpp's on the same card kind;
    from bench.log's lines when the JSON is missing (the stage ran out of time)."""
    if prefill is None:
        partial = re.findall(r"^(pp\d+: .*)$", log, re.M)
        return ["prefill: no JSON" + ("; what bench.log has:" if partial else " (see bench.log)")] + \
            [f"  {ln}" for ln in partial]
    ref = LLAMA_CPP_PP[_card_key(prefill["card"])]
    lines = [f"prefill ({prefill['mode']}, median of {prefill['reps']}):",
             f"  {'test':<10}{'tok/s':>9}{'TTFT ms':>10}{'llama.cpp':>11}{'its TTFT':>10}{'ratio':>7}"]
    for pp in prefill["prefill"]:
        base = ref.get(pp["tokens"])
        theirs = f"{base:>11.0f}{pp['tokens'] / base * 1e3:>10.1f}{pp['tok_s_median'] / base:>7.2f}" if base else ""
        lines.append(f"  {'pp' + str(pp['tokens']):<10}{pp['tok_s_median']:>9.1f}{pp['ttft_ms_median']:>10.1f}{theirs}")
    return lines


def variant_label(name: str) -> str:
    """What variant `name` changes: its step variants and its kernels' knobs."""
    if name == BEFORE:
        return "(an earlier tree's full module, compiled/<arch>/before/)"
    knobs = [f"{key.split('(')[0]} {value}" for key, value in VARIANT_KNOBS.get(name, {}).items()]
    return ", ".join([*([str(VARIANT_STEPS[name])] if VARIANT_STEPS[name] else []), *knobs])


def report(round_dir: Path) -> str:
    lines = []
    stages = _read(round_dir / "setup.log")
    gpu = re.search(r"^GPU: (.*)$", stages, re.M)
    lines.append(f"GPU round: {gpu.group(1) if gpu else 'GPU unknown'}")
    check_line = re.search(r"^(sources .*|WARNING: sources .*)$", stages, re.M)
    if check_line:
        lines.append(check_line.group(1))
    pytest_log = _read(round_dir / "pytest.log").strip().splitlines()
    summary = next((ln for ln in reversed(pytest_log) if re.search(r"\b(passed|failed|error|skipped)\b", ln)),
                   "no pytest summary (see pytest.log)")
    lines.append(f"pytest -m gpu: {summary.strip('= ')}")
    fails = [ln for ln in pytest_log if ln.startswith(("FAILED", "ERROR"))]
    lines += [f"  {ln}" for ln in fails[:5]]
    cut = _read(round_dir / "full_width_cut.txt").strip().splitlines()
    lines.append(cut[0] if cut else "full-width cut: no result (see pytest.log)")
    gate = _read(round_dir / "full_size_gate.txt").strip().splitlines()
    lines.append(gate[0] if gate else "full-size accuracy gate: no result (see pytest.log)")

    log = _read(round_dir / "bench.log")
    device, sync = _json(round_dir / "bench-device.json"), _json(round_dir / "bench-sync.json")
    lines += _decode_rows(device, sync)
    if device is None or sync is None:
        partial = re.findall(r"^(== bench .*|tg\d+ @ d\d+: .*)$", log, re.M)
        missing = " and ".join(m for m, b in (("device loop", device), ("host sync", sync)) if b is None)
        lines.append(f"decode: no JSON for the {missing} mode" + ("; what bench.log has:" if partial else ""))
        lines += [f"  {ln}" for ln in partial]
    chunked_gate = _read(round_dir / "chunked-gate.txt").strip().splitlines()
    if chunked_gate:
        lines.append("the full module's full-size gate, teacher-forced through its T-token step:")
        lines += [f"  {ln}" for ln in chunked_gate[:6]]
        lines += [f"  T-token step: {ln}" for ln in _prefill_rows(_json(round_dir / "prefill-chunked.json"), "")]
    largest_gate = _read(round_dir / "chunked-gate-largest.txt").strip().splitlines()
    if largest_gate:
        lines.append("the same gate through the full module's largest T-token step only (--prefill-chunk):")
        lines += [f"  {ln}" for ln in largest_gate[:6]]
    for name in (*VARIANT_STEPS, BEFORE):
        for suffix, through in (("", ""), ("-largest", ", through its largest T-token step only")):
            gate = _read(round_dir / f"{name}-gate{suffix}.txt").strip().splitlines()
            if gate:
                lines.append(f"the {name} module ({variant_label(name)}): full-size gate{through}:")
                lines += [f"  {ln}" for ln in gate[:6]]
    for name in ("base", *VARIANT_STEPS, BEFORE):
        decodes = [d for d in (_json(round_dir / f"decode-variant-{name}{turn}.json") for turn in ("", "-again")) if d]
        for decode in decodes:
            label = variant_label(name) if name != "base" else "(the full module)"
            lines.append(f"stage variants, {name} {label}, host sees every token:")
            lines += [f"  {ln}" for ln in _decode_rows(None, decode)[1:]]
            if any(pp["tokens"] > RUN_PROMPT_TOKENS for pp in decode.get("prefill", [])):  # a T-token step's
                lines += [f"  {ln}" for ln in _prefill_rows(decode, "")]

    run = _json(round_dir / "run.json")
    if run:
        t = run["timings"]
        lines.append(f"sparkinfer run -n 128 ({len(run['prompt_ids'])}-token prompt, streaming): load {t['load_s']:.1f} s, "
                     f"prefill {t['prefill_ms']:.1f} ms ({t['prefill_tok_s']:.0f} tok/s), decode "
                     f"{t['generated_tokens']} tokens at {t['decode_tok_s']:.1f} tok/s ({t['stop_reason']}), "
                     f"cuda_graph {run['cuda_graph']}")
    else:
        lines.append("sparkinfer run: no result (see bench.log)")
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
