"""Sweep the thread-block shape of the two fused MoE kernels on the full-size model.

    python3 bench/sweep_moe.py prepare sm_90 [VARIANT ...]   # here: one full-model step per variant
    python3 bench/sweep_moe.py run             # on the GPU: `sparkinfer bench` tg128 @ 128 of each

A variant maps the arch default MoeKnobs (lanes per row, rows per block, rows per thread) of
gate/up/SiLU and down+residual alike to its own, written as a schedules file
(compiled/sweep/<variant>/<arch>.json, every other kernel left to its default) that the step
compiles with. Steps go to
compiled/sweep/<variant>/<arch>/<key>/ and compiled/sweep/variants.json lists them. What wins
becomes the default in sparkinfer/schedule/moe.py (or the arch's schedules file), and is then
checked by the GPU round's accuracy gate: this sweep measures speed only.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "compiled" / "sweep"
sys.path.insert(0, str(REPO))

from sparkinfer.schedule.moe import MoeKnobs  # noqa: E402

# the default schedule -> the variant's (bench/NOTES.md has the H100 numbers). The unroll budget
# is no knob here: 16 to 256 give byte-identical libraries (the chunk loops are unrolled anyway).
VARIANTS: dict[str, Callable[[MoeKnobs], MoeKnobs]] = {
    "default": lambda d: d,
    "rows1": lambda d: replace(d, rows=1),
    "rows2": lambda d: replace(d, rows=2),
    "rows8": lambda d: replace(d, rows=8),
    "rows16": lambda d: replace(d, rows=16),
    "half_lanes": lambda d: replace(d, lanes=max(1, d.lanes // 2), rows=d.rows * 2),
    "quarter_lanes": lambda d: replace(d, lanes=max(1, d.lanes // 4), rows=d.rows * 4),
    "half_lanes_same_rows": lambda d: replace(d, lanes=max(1, d.lanes // 2)),
    # x shared across a thread's rows (the default takes up to 4 where blocks and registers allow)
    "rows_per_thread1": lambda d: replace(d, rows_per_thread=1),
    "rows_per_thread2": lambda d: replace(d, rows_per_thread=2),
}


def prepare(arch: str, names: list[str]) -> None:
    from sparkinfer.compiler.pipeline import compile_model
    from sparkinfer.gguf_file import preset_config, type_map
    from sparkinfer.model.qwen3moe import build_decode_step
    from sparkinfer.schedule.arch import arch_facts
    from sparkinfer.schedule.schedules import TUNED, ScheduleEntry, SchedulesFile
    from sparkinfer.schedule.space import kernel_key, rule_for

    config = preset_config("qwen3-30b-a3b")
    types = type_map(config, "q4_k_m")
    facts = arch_facts(arch)
    moe_uses = [u for u in build_decode_step(config, types).kernels if u.family == "moe"]
    listing = {}
    for name in names or list(VARIANTS):
        shape = VARIANTS[name]
        # A hand sweep: each variant's knobs are measured by `run`.
        kernels = {kernel_key(u): ScheduleEntry(shape(rule_for(u, facts).default(u, facts)).to_json(), TUNED)
                   for u in moe_uses}
        schedules = SchedulesFile(arch, {"script": "bench/sweep_moe.py"}, kernels).write(SWEEP / name / f"{arch}.json")
        result = compile_model(config, types, arch, SWEEP / name, schedules=schedules)
        listing[name] = str(result.directory.relative_to(REPO))
        print(f"{name}: {listing[name]}", flush=True)
    (SWEEP / "variants.json").write_text(json.dumps({"arch": arch, "modules": listing}, indent=1) + "\n")


def run(model: str = "/tmp/q30.gguf") -> None:
    listing = json.loads((SWEEP / "variants.json").read_text())
    rows = []
    for name, module in listing["modules"].items():
        cmd = [sys.executable, "-m", "sparkinfer.cli", "bench", model, "--arch", listing["arch"], "--module",
               str(REPO / module), "--depths", "128", "--reps", "3", "--json"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            rows.append((name, None, done.stderr.strip().splitlines()[-1:]))
            continue
        decode = json.loads(done.stdout)["decode"][0]
        rows.append((name, decode["tok_s_median"], decode["ms_per_token_median"]))
        print(f"{name}: {decode['tok_s_median']:.1f} tok/s", flush=True)
    print(f"\n{'variant':<24}{'tok/s':>8}{'ms/token':>10}")
    for name, tok_s, ms in rows:
        print(f"{name:<24}{'failed':>8}  {ms}" if tok_s is None else f"{name:<24}{tok_s:>8.1f}{ms:>10.3f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["prepare"]:
        prepare(sys.argv[2], sys.argv[3:])
    elif sys.argv[1:2] == ["run"]:
        run(*sys.argv[2:3])
    else:
        raise SystemExit(__doc__)
