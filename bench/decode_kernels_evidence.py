"""Evidence for the decode kernels before a GPU is at hand (bench/NOTES.md, "Int8 activations"):

  1. launches per token of the full-size Qwen3-30B-A3B Q4_K_M step, per variant (activations
     f32 / q8, decode_launches split / fused, q6_k_layout gguf / planar: the step variants of
     schedule/schedules.py);
  2. per kernel, for sm_90a: registers and spills (`ptxas -v`) and global loads by width in the
     SASS (`cuobjdump -sass`: LDG.E.128 / .64 / 32-bit / 16-bit / 8-bit);
  3. per kernel, the bytes it must read per token and the time those take at the H200's
     ~4.3 TB/s (a floor: small kernels are latency-bound well above it), to be checked against
     ncu in the GPU round (bench/profile_kernels.sh).

Needs full TVM, nvcc (CUDA 13) and cuobjdump + nvdisasm (the CUDA toolkit's, or `pip install
nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm`). No weights are read:

    PYTHONPATH=. python3 bench/decode_kernels_evidence.py [--arch sm_90] [--json OUT]
        [--activations f32,q8] [--decode-launches split,fused] [--q6-k-layout gguf,planar]
        [--schedules FILE] [--packaged-step]

--schedules takes a schedules file in place of the arch's packaged one (a variant's knobs, such
as the MoE kernels' rows_per_thread: bench/NOTES.md, "MoE kernels: x shared across rows").
--packaged-step reports the one step the schedules file's "step" picks, every variant of it (as
`sparkinfer compile` builds it: router_merge, the int8 projections and LM head, ...), in place
of the activations x decode_launches x q6_k_layout grid.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from collections.abc import Callable
from typing import Any

import tvm
from tvm import relax

from sparkinfer.compiler import targets
from sparkinfer.compiler.pipeline import schedule_step, step_variants
from sparkinfer.gguf_file import preset_config, type_map
from sparkinfer.kernels.gemv_q8 import Q8_BLOCK, WORD
from sparkinfer.model.qwen3moe import DecodeStep, build_decode_step
from sparkinfer.schedule.schedules import SchedulesFile, packaged_schedules_path
from sparkinfer.kernels.use import KernelUse, factory_args
from sparkinfer.kernels.gemv import DECODE_LAUNCHES, Q6_K_LAYOUTS, gemv_format
from sparkinfer.kernels.gemv_q8 import ACTIVATIONS

H200_BYTES_PER_S = 4.3e12
DEPTH = 128  # context for the attention bytes


def launches(step: DecodeStep) -> Counter[str]:
    """Kernel launches of one replay of the step, by kernel name."""
    counts: Counter[str] = Counter()
    for block in step.mod["decode"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call) and value.op.name in ("relax.call_tir", "relax.call_tir_inplace"):
                counts[value.args[0].name_hint] += 1
    return counts


def _rows_bytes(weight_format: Any, rows: int, k: int) -> int:
    """Bytes of `rows` rows of k weights as the kernels read them (a ggml type, or planar Q6_K)."""
    fmt = gemv_format(weight_format)
    return rows * fmt.row_words(k) * fmt.word_bytes


def bytes_read(use: KernelUse, step: DecodeStep) -> int:
    """Bytes a launch must read from memory (weights it touches, activations, KV at DEPTH)."""
    a = factory_args(use)
    c = step.config
    f = use.factory
    if f == "gemv":
        return _rows_bytes(a[0], a[1], a[2]) + 4 * a[2]
    if f == "gemv_normed":  # h and the norm weight (every block reads them again, from L2)
        return _rows_bytes(a[0], a[1], a[2]) + 8 * a[2]
    if f == "gemv_residual":
        return _rows_bytes(a[0], a[1], a[2]) + 4 * a[2] + 4 * a[1]
    if f == "gemv_qkv":
        return sum(_rows_bytes(a[0], n, a[4]) for n in a[1:4] if n) + 4 * a[4]
    if f == "gemv_qkv_normed":
        return sum(_rows_bytes(a[0], n, a[4]) for n in a[1:4] if n) + 8 * a[4]
    if f == "gemv_q8":
        return _rows_bytes(a[0], a[1], a[2]) + a[2] + 8 * a[2] // Q8_BLOCK
    if f == "gemv_qkv_q8":
        return sum(_rows_bytes(a[0], n, a[4]) for n in a[1:4] if n) + a[4] + 8 * a[4] // Q8_BLOCK
    if f == "moe_gate_up_silu":
        return a[3] * (_rows_bytes(a[0], a[4], a[5]) + _rows_bytes(a[1], a[4], a[5])) + 4 * a[5]
    if f == "moe_gate_up_silu_routed":  # + the norm weight and the E logits
        return a[3] * (_rows_bytes(a[0], a[4], a[5]) + _rows_bytes(a[1], a[4], a[5])) + 8 * a[5] + 4 * a[2]
    if f in ("moe_gate_up_silu_q8", "moe_gate_up_silu_q8_routed"):  # (the routed: + the E logits)
        logits = 4 * a[2] if f.endswith("routed") else 0
        return a[3] * (_rows_bytes(a[0], a[4], a[5]) + _rows_bytes(a[1], a[4], a[5])) + a[5] + 8 * a[5] // Q8_BLOCK \
            + logits
    if f == "moe_down_residual":
        return a[2] * _rows_bytes(a[0], a[3], a[4]) + 4 * a[2] * a[4] + 4 * a[3]
    if f == "moe_down_residual_q8":
        return a[2] * _rows_bytes(a[0], a[3], a[4]) + a[2] * (a[4] + 8 * a[4] // Q8_BLOCK) + 4 * a[3]
    if f == "quantize_q8_1":
        return 4 * a[0] * max(1, a[1])
    if f == "embedding":
        return _rows_bytes(a[0], 1, a[2])
    if f in ("rms_norm", "rms_norm_q8_1", "add_rms_norm", "add_rms_norm_q8_1"):
        return 4 * a[0] * (2 if f.startswith("rms_norm") else 3)
    if f in ("paged_decode_attention", "paged_decode_attention_mma"):
        return 2 * DEPTH * c.n_kv_heads * c.head_dim * 2 + 4 * c.n_heads * c.head_dim
    if f in ("attention_combine", "attention_combine_q8_1"):  # o_part f32[NH, S, D] and lse
        return 4 * a[0] * a[1] * (a[2] + 1)
    if f == "sample_candidates":
        return 4 * a[0]
    return 4 * c.hidden  # small kernels: a vector's worth


def _nvcc_cubin(source: str, arch: str, out: Path) -> str:
    """Compile to a cubin with `ptxas -v`; returns ptxas's report."""
    sm = targets.cuda_arch(arch)
    src = out.with_suffix(".cu")
    src.write_text(source)
    cmd = [targets.find_nvcc() or "nvcc", "-cubin", "-O3", f"-arch={sm}", "-Xptxas", "-v",
           "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
           "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
           "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
           "--expt-relaxed-constexpr", "-diag-suppress=177", "-o", str(out), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return proc.stdout + proc.stderr


def ptxas_report(report: str) -> dict[str, dict[str, int]]:
    """kernel -> {registers, spill_stores, spill_loads} from `ptxas -v`."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in report.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            current = m.group(1).removesuffix("_kernel")
            out[current] = {}
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current:
            out[current].update(spill_stores=int(m.group(1)), spill_loads=int(m.group(2)))
        m = re.search(r"Used (\d+) registers", line)
        if m and current:
            out[current]["registers"] = int(m.group(1))
    return out


def _cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import nvidia

        for root in nvidia.__path__:
            for path in Path(root).glob("*/bin/cuobjdump"):
                return str(path)
    except ImportError:
        pass
    raise SystemExit("cuobjdump not found: install the CUDA toolkit's, or "
                     "`pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm`")


LOAD_WIDTHS = ("128", "64", "32", "U16", "S16", "U8", "S8")


def sass_loads(cubin: Path) -> dict[str, Counter[str]]:
    """kernel -> global loads by width: LDG.E.128 -> '128', LDG.E (plain) -> '32', ..."""
    tool = _cuobjdump()
    # cuobjdump runs nvdisasm, which the pip wheels keep beside it.
    env = {**os.environ, "PATH": f"{Path(tool).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    text = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, check=True,
                          env=env).stdout
    out: dict[str, Counter[str]] = {}
    current = None
    for line in text.splitlines():
        m = re.search(r"Function : (\w+)", line)
        if m:
            current = m.group(1).removesuffix("_kernel")
            out[current] = Counter()
            continue
        m = re.search(r"\bLDG\.E((?:\.\w+)*)", line)
        if m and current:
            mods = [x for x in m.group(1).split(".") if x]
            width = next((x for x in mods if x in LOAD_WIDTHS), "32")
            out[current][width] += 1
    return out


def grid(activations_values: list[str], launches_values: list[str],
         layouts: tuple[str, ...] | list[str] = ("gguf",)) -> list[dict[str, str]]:
    """The step variants of each point of the activations x decode_launches x q6_k_layout grid."""
    return [{"activations": a, "decode_launches": d, "q6_k_layout": q}
            for a, d, q in itertools.product(activations_values, launches_values, layouts)]


def evidence(arch: str, variants_list: list[dict[str, str]], schedules: SchedulesFile | None = None) -> dict[str, Any]:
    """Each step of `variants_list` (step variants, build_decode_step's keywords) on `arch`."""
    config = preset_config("qwen3-30b-a3b")
    types = type_map(config, "q4_k_m")
    result: dict[str, Any] = {"arch": arch, "model": "qwen3-30b-a3b q4_k_m", "depth": DEPTH,
                              "bandwidth_bytes_per_s": H200_BYTES_PER_S, "variants": {}}
    for variants in variants_list:
        step = build_decode_step(config, types, **variants)
        counts = launches(step)
        schedule_step(step, arch, schedules)
        mod = tvm.IRModule({use.name: step.mod[use.name].with_attr("global_symbol", use.name)
                            for use in step.kernels})
        source = targets.cuda_source(mod, arch)
        with tempfile.TemporaryDirectory(prefix="sparkinfer-evidence-") as tmp:
            cubin = Path(tmp) / "kernels.cubin"
            regs = ptxas_report(_nvcc_cubin(source, arch, cubin))
            loads = sass_loads(cubin)
        kernels = []
        for use in step.kernels:
            n = counts[use.name]
            b = bytes_read(use, step)
            kernels.append({
                "kernel": use.name, "factory": f"{use.family}.{use.factory}", "launches": n,
                **regs.get(use.name, {}), "loads": dict(loads.get(use.name, {})),
                "bytes_per_launch": b, "floor_us_per_launch": b / H200_BYTES_PER_S * 1e6,
            })
        total_bytes = sum(k["bytes_per_launch"] * k["launches"] for k in kernels)
        result["variants"][" ".join(f"{k}={v}" for k, v in sorted(variants.items()))] = {
            "launches_per_token": sum(counts.values()),
            "launches_per_layer": (sum(counts.values()) - _outside_layers(step, counts)) / config.n_layers,
            "bytes_per_token": total_bytes, "floor_ms": total_bytes / H200_BYTES_PER_S * 1e3,
            "kernels": kernels,
        }
    return result


def _outside_layers(step: DecodeStep, counts: Counter[str]) -> int:
    """Launches once per token (embedding, first norm, LM head, sampling, advance)."""
    once = {"embedding", "sample_candidates", "sample_token", "advance"}
    n = sum(counts[u.name] for u in step.kernels if u.factory in once)
    head = [u for u in step.kernels if u.factory == "gemv" and factory_args(u)[1] == step.config.vocab_size]
    return n + sum(counts[u.name] for u in head) + 1  # + the first rms_norm


def print_table(result: dict[str, Any]) -> None:
    for name, v in result["variants"].items():
        print(f"\n## {name}: {v['launches_per_token']} launches/token "
              f"({v['launches_per_layer']:.1f} per layer), {v['bytes_per_token'] / 1e9:.3f} GB/token, "
              f"floor {v['floor_ms']:.3f} ms at {H200_BYTES_PER_S / 1e12:.1f} TB/s")
        print("| kernel | launches | regs | spill st/ld B | LDG 128/64/32/16/8 | MB/launch | floor us |")
        print("|---|---|---|---|---|---|---|")
        for k in v["kernels"]:
            ld = k["loads"]
            widths = "/".join(str(ld.get(w, 0)) for w in ("128", "64", "32"))
            narrow16 = ld.get("U16", 0) + ld.get("S16", 0)
            narrow8 = ld.get("U8", 0) + ld.get("S8", 0)
            print(f"| {k['kernel']} | {k['launches']} | {k.get('registers', '?')} | "
                  f"{k.get('spill_stores', 0)}/{k.get('spill_loads', 0)} | {widths}/{narrow16}/{narrow8} | "
                  f"{k['bytes_per_launch'] / 1e6:.3f} | {k['floor_us_per_launch']:.2f} |")


def _choices(legal: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [v for v in text.split(",") if v]
        bad = [v for v in values if v not in legal]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"{text!r}: each of {', '.join(legal)}")
        return values

    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90", choices=[a for a in targets.ARCHS if a != "cpu"])
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--activations", type=_choices(ACTIVATIONS), default=list(ACTIVATIONS),
                        help=f"comma-separated, of {', '.join(ACTIVATIONS)} (default: all)")
    parser.add_argument("--decode-launches", type=_choices(DECODE_LAUNCHES), default=list(DECODE_LAUNCHES),
                        help=f"comma-separated, of {', '.join(DECODE_LAUNCHES)} (default: all)")
    parser.add_argument("--q6-k-layout", type=_choices(Q6_K_LAYOUTS), default=["gguf"],
                        help=f"comma-separated, of {', '.join(Q6_K_LAYOUTS)} (default: gguf)")
    parser.add_argument("--schedules", type=Path, help="a schedules file (default: the arch's packaged one)")
    parser.add_argument("--packaged-step", action="store_true",
                        help="the step the schedules file picks, all its variants, instead of the grid")
    args = parser.parse_args()
    schedules = SchedulesFile.read(args.schedules) if args.schedules else None
    if args.packaged_step:
        chosen = schedules or SchedulesFile.read(packaged_schedules_path(args.arch))
        variants_list = [step_variants(args.arch, chosen)]
    else:
        variants_list = grid(args.activations, args.decode_launches, args.q6_k_layout)
    result = evidence(args.arch, variants_list, schedules)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
