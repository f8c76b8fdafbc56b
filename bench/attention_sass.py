"""The decode attention kernel's SASS, per layout, before a GPU is at hand (bench/NOTES.md,
"Decode attention v2"): registers and spills (`ptxas -v`) and the instruction mix of the tile
loop (the kernel's one backward branch at depth: a step of `streams` x `tile` tokens a block),
per token, for the full-size Qwen3-30B-A3B shape (32 query heads, 4 KV heads of 128, 64-token
pages) and each (heads_per_lane, k_vector) of the CUDA rule's space; then the same for the
tensor-core kernel (`paged_decode_attention_mma`, decode_attention="mma": a step of 16 tokens a
warp; bench/NOTES.md, "Decode attention v3").

Needs full TVM, nvcc (CUDA 13), cuobjdump + nvdisasm (bench/decode_kernels_evidence.py finds them):

    PYTHONPATH=. python3 bench/attention_sass.py [--arch sm_90] [--splits 32]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import tvm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_kernels_evidence import _cuobjdump, _nvcc_cubin  # noqa: E402

from sparkinfer.compiler import targets  # noqa: E402
from sparkinfer.kernels import attention as A  # noqa: E402
from sparkinfer.schedule.arch import arch_facts  # noqa: E402
from sparkinfer.schedule.attention import AttentionKnobs  # noqa: E402
from sparkinfer.schedule.space import kernel_use, rule_for, schedule_kernel  # noqa: E402

NH, NKV, D, P, MP = 32, 4, 128, 64, 640
OPS = ("FFMA", "HADD2", "FADD", "FMUL", "SHFL", "MUFU", "LDG", "LDS", "BAR", "HMMA", "LDSM", "STS")


def tile_loop_mix(sass: str) -> tuple[int, Counter[str]]:
    """(instructions, opcode counts) between the first backward branch's target and the branch."""
    lines = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4})\*/\s+([^;]*);", sass)]
    for addr, text in lines:
        target = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr:
            body = [t for a, t in lines if int(target.group(1), 16) <= a <= addr]
            ops = Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in body)
            return len(body), ops
    raise SystemExit("no tile loop (backward branch) in the kernel's SASS")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="sm_90", choices=[a for a in targets.ARCHS if a != "cpu"])
    p.add_argument("--splits", type=int, default=32)
    args = p.parse_args()
    facts = arch_facts(args.arch)
    shape = (NH, NKV, D, P, MP, args.splits)
    use = kernel_use("attention", "paged_decode_attention", *shape)
    rule = rule_for(use, facts)
    space = rule.space(use, facts)
    default = rule.default(use, facts)
    streams, tile = 8, 4  # the factory's defaults
    print(f"{args.arch}, {use.name}: a block {streams} warps x {tile} tokens a step; default {default}")
    print(f"{'heads_per_lane':>14} {'k_vector':>8} {'regs':>5} {'spill B':>7} {'loop':>5} {'/token':>6}  "
          + " ".join(f"{o:>5}" for o in OPS))
    cuobjdump = _cuobjdump()
    with tempfile.TemporaryDirectory() as tmp:
        for heads in space["heads_per_lane"]:
            for vector in space["k_vector"]:
                knobs = AttentionKnobs(heads_per_lane=heads, k_vector=vector)
                try:
                    func = schedule_kernel(A.paged_decode_attention(*shape), use, facts, knobs)
                except tvm.s_tir.ScheduleError:
                    continue  # a vector the layout's lanes do not divide
                source = targets.cuda_source(tvm.IRModule({use.name: func}), args.arch)
                cubin = Path(tmp) / f"h{heads}v{vector}.cubin"
                report = _nvcc_cubin(source, args.arch, cubin)
                regs = re.search(r"Used (\d+) registers", report)
                spill = re.search(r"(\d+) bytes spill stores", report)
                env_path = f"{Path(cuobjdump).parent}:{Path(targets.find_nvcc() or 'nvcc').parent}"
                sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True,
                                      env={"PATH": env_path}).stdout
                n, ops = tile_loop_mix(sass)
                mark = " (default)" if knobs == default else ""
                print(f"{heads:>14} {vector:>8} {regs.group(1) if regs else '?':>5} {spill.group(1) if spill else '?':>7} "
                      f"{n:>5} {n / tile:>6.0f}  " + " ".join(f"{ops[o]:>5}" for o in OPS) + mark)
        mma_use = kernel_use("attention", "paged_decode_attention_mma", *shape)
        func = schedule_kernel(A.paged_decode_attention_mma(*shape), mma_use, facts, None)
        source = targets.cuda_source(tvm.IRModule({mma_use.name: func}), args.arch)
        report = _nvcc_cubin(source, args.arch, Path(tmp) / "mma.cubin")
        regs = re.search(r"Used (\d+) registers", report)
        spill = re.search(r"(\d+) bytes spill stores", report)
        env_path = f"{Path(cuobjdump).parent}:{Path(targets.find_nvcc() or 'nvcc').parent}"
        sass = subprocess.run([cuobjdump, "-sass", str(Path(tmp) / "mma.cubin")], capture_output=True, text=True,
                              check=True, env={"PATH": env_path}).stdout
        n, ops = tile_loop_mix(sass)
        keys = 16  # a warp's step: one m16 tile of keys
        print(f"{'mma':>14} {'-':>8} {regs.group(1) if regs else '?':>5} {spill.group(1) if spill else '?':>7} "
              f"{n:>5} {n / keys:>6.0f}  " + " ".join(f"{ops[o]:>5}" for o in OPS) + "  (decode_attention=mma)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
