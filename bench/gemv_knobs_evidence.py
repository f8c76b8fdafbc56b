"""Registers, spills and global loads by width of the full-size decode step's dense GEMVs at
given knobs (bench/NOTES.md, "Dense GEMVs: x shared across rows"): each point scheduled alone by
its rule, all compiled in one nvcc call with `decode_kernels_evidence`'s ptxas and SASS readers.

    PYTHONPATH=. python3 bench/gemv_knobs_evidence.py [--arch sm_90] o:32,2,4,256,1 qkv:32,2,2,16,0 ...

Kernels: o (Q4_K 2048x4096), qkv (Q4_K 4096+512+512 x 2048), qk (Q4_K 4096+512 x 2048), v (Q6_K
512x2048), head (Q6_K 151936x2048), v_planar, head_planar; knobs: lanes,rows,rows_per_thread,unroll,
vector_header.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import tvm
from gguf import GGMLQuantizationType as T

from sparkinfer.compiler import targets
from sparkinfer.kernels import gemv as G
from sparkinfer.schedule.arch import arch_facts
from sparkinfer.schedule.gemv import GemvKnobs
from sparkinfer.schedule.space import kernel_use, schedule_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_kernels_evidence import _nvcc_cubin, ptxas_report, sass_loads  # noqa: E402

KERNELS = {
    "o": (G.gemv, (T.Q4_K, 2048, 4096)),
    "qkv": (G.gemv_qkv, (T.Q4_K, 4096, 512, 512, 2048)),
    "qk": (G.gemv_qkv, (T.Q4_K, 4096, 512, 0, 2048)),
    "v": (G.gemv, (T.Q6_K, 512, 2048)),
    "head": (G.gemv, (T.Q6_K, 151936, 2048)),
    "v_planar": (G.gemv, (G.Q6_K_PLANAR, 512, 2048)),
    "head_planar": (G.gemv, (G.Q6_K_PLANAR, 151936, 2048)),
}


def point(text: str) -> tuple[str, GemvKnobs]:
    name, _, knobs = text.partition(":")
    values = knobs.split(",")
    if name not in KERNELS or len(values) != 5 or not all(v.isdigit() for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: KERNEL:lanes,rows,rows_per_thread,unroll,vector_header with KERNEL one of "
                                         f"{', '.join(KERNELS)}")
    return name, GemvKnobs(*(int(v) for v in values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90", choices=[a for a in targets.ARCHS if a != "cpu"])
    parser.add_argument("points", nargs="+", type=point)
    args = parser.parse_args()
    facts = arch_facts(args.arch)
    funcs = {}
    for name, knobs in args.points:
        factory, factory_args = KERNELS[name]
        symbol = f"{name}_{knobs.lanes}_{knobs.rows}_{knobs.rows_per_thread}_{knobs.unroll}_{knobs.vector_header}"
        func = schedule_kernel(factory(*factory_args), kernel_use("gemv", factory.__name__, *factory_args), facts, knobs)
        funcs[symbol] = func.with_attr("global_symbol", symbol)
    with tempfile.TemporaryDirectory(prefix="sparkinfer-gemv-knobs-") as tmp:
        cubin = Path(tmp) / "kernels.cubin"
        regs = ptxas_report(_nvcc_cubin(targets.cuda_source(tvm.IRModule(funcs), args.arch), args.arch, cubin))
        loads = sass_loads(cubin)
    print("| kernel, knobs (lanes, rows, rows_per_thread, unroll, vector_header) | regs | spill st/ld B | LDG 128/32/16 |")
    print("|---|---|---|---|")
    for symbol in funcs:
        r, ld = regs.get(symbol, {}), loads.get(symbol, {})
        name, *knobs = symbol.rsplit("_", 5)
        print(f"| {name} ({', '.join(knobs)}) | {r.get('registers', '?')} | {r.get('spill_stores', 0)}/"
              f"{r.get('spill_loads', 0)} | {ld.get('128', 0)}/{ld.get('32', 0)}/{ld.get('U16', 0) + ld.get('S16', 0)} |")


if __name__ == "__main__":
    main()
