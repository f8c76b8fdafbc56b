"""Time a chunk's float16 grouped expert GEMMs at several knob points, alone.

    python3 bench/time_grouped_f16.py prepare sm_90 [TOKENS]  # here (full TVM, nvcc): one library of
                                                              # every point, for a chunk of TOKENS (512)
    python3 bench/time_grouped_f16.py run              # on the GPU: µs a launch of each point and routing

(the device call carries compiled/grouped-f16, an ignored path; run writes times.json beside
the library and prints a line a kernel and routing).

The kernels are Qwen3-30B-A3B's (128 experts, top 8, H 2048, I 768) at TOKENS x 8 sorted rows:
gate/up/SiLU Q4_K and the Q6_K and Q4_K downs (`moe_chunk.grouped_gate_up_silu_f16`,
`grouped_gemm_f16`), scheduled by `prefill_cuda._GroupedGemmF16CudaRule` with its default knobs and those of a
grid of its space (`GroupedF16Knobs`: ROW_SPLITS x WARPS_M x the launchable K tiles, word
runs; named s<row_splits>w<warps_m>k<k_tile>). prepare writes
compiled/grouped-f16/<arch>/kernels.so (each point's kernel under its own symbol) and
points.json (the points and the chunk's tokens). run times each kernel with `time_evaluator`
(median of 5 repeats of 20 launches) on three routings of the chunk's tokens (`moe_chunk.moe_sort_reference`): "uniform" (8 distinct experts
a token at random), "zipf" (experts drawn with weights 1 / rank: a few take most tokens) and
"repeated" (27 distinct tokens' routings repeated, as `bench/gpu_round.py`'s repeated
sentence). Weights are random bytes (speed only: their values are not checked; the tests in
tests/schedule/test_moe_chunk_cuda.py check the kernels).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "compiled" / "grouped-f16"
sys.path.insert(0, str(REPO))

E, KU, H, I = 128, 8, 2048, 768
TOKENS = 512  # the chunk prepare builds for unless told
# The knob points timed besides each kernel's rule default: the rule's space (launchable K tiles
# only: `_GroupedGemmF16CudaRule.space`) at these row splits and warps, with word runs.
ROW_SPLITS, WARPS_M = (1, 2, 4, 8), (2, 4)
KERNELS = ("gate_up_q4_k", "down_q6_k", "down_q4_k")


def _factory(kernel: str, T: int) -> tuple:
    from gguf import GGMLQuantizationType as Q

    from sparkinfer.kernels import moe_chunk
    from sparkinfer.quant.layouts import Q6_K_PLANAR

    if kernel == "gate_up_q4_k":
        return moe_chunk.grouped_gate_up_silu_f16, (Q.Q4_K, Q.Q4_K, E, T * KU, I, H, T)
    # (the Q6_K down in the layout sm_90 reads, schedules/sm_90.json's "q6_k_layout": planar)
    return moe_chunk.grouped_gemm_f16, ((Q6_K_PLANAR if kernel == "down_q6_k" else Q.Q4_K), E, T * KU, H, I)


def prepare(arch: str, T: int) -> None:
    import tvm

    from sparkinfer.compiler import targets
    from sparkinfer.schedule.arch import arch_facts
    from sparkinfer.schedule.prefill_cuda import GroupedF16Knobs
    from sparkinfer.schedule.space import kernel_key, kernel_use, rule_for, schedule_kernel

    facts = arch_facts(arch)
    funcs, listing = {}, {}
    for kernel in KERNELS:
        factory, args = _factory(kernel, T)
        use = kernel_use("moe_chunk", factory.__name__, *args)
        rule = rule_for(use, facts)
        space = rule.space(use, facts)
        default = rule.default(use, facts)
        grid = [GroupedF16Knobs(splits, warps, k_tile, 1) for splits in ROW_SPLITS for warps in WARPS_M
                for k_tile in space["k_tile"] if warps in space["warps_m"] and splits in space["row_splits"]]
        for knobs in [default, *(g for g in grid if g != default)]:
            name = "default" if knobs == default else f"s{knobs.row_splits}w{knobs.warps_m}k{knobs.k_tile}"
            symbol = f"{kernel}_{name}"
            funcs[symbol] = schedule_kernel(factory(*args), use, facts, knobs).with_attr("global_symbol", symbol)
            listing[symbol] = {"kernel_key": kernel_key(use), "knobs": knobs.to_json()}
            print(symbol, listing[symbol]["knobs"], flush=True)
    targets.check_shared_memory(tvm.IRModule(funcs), arch)
    out = OUT / arch
    out.mkdir(parents=True, exist_ok=True)
    targets.build(tvm.IRModule(funcs), arch).export_library(str(out / "kernels.so"))
    (out / "points.json").write_text(json.dumps({"tokens": T, "points": listing}, indent=1) + "\n")
    print(out / "kernels.so")


def routings(rng: np.random.Generator, T: int) -> dict[str, np.ndarray]:
    """ids int32[T, KU] of each routing."""
    def zipf_pick(weights: np.ndarray) -> np.ndarray:
        return rng.choice(E, KU, replace=False, p=weights / weights.sum())

    zipf = 1.0 / np.arange(1, E + 1)
    patterns = np.stack([zipf_pick(zipf) for _ in range(27)])
    return {
        "uniform": np.stack([rng.choice(E, KU, replace=False) for _ in range(T)]).astype(np.int32),
        "zipf": np.stack([zipf_pick(zipf) for _ in range(T)]).astype(np.int32),
        "repeated": patterns[np.arange(T) % len(patterns)].astype(np.int32),
    }


def run() -> None:
    from gguf import GGMLQuantizationType as Q

    from sparkinfer.kernels import gemv, moe_chunk
    from sparkinfer.quant.layouts import Q6_K_PLANAR
    from sparkinfer.runtime.device import import_tvm

    tvm = import_tvm()  # with runtime-only TVM (the GPU machines), its CUDA runtime too
    arch = next(p.name for p in sorted(OUT.iterdir()) if (p / "kernels.so").is_file())
    lib = tvm.runtime.load_module(str(OUT / arch / "kernels.so"))
    prepared = json.loads((OUT / arch / "points.json").read_text())
    T, listing = prepared["tokens"], prepared["points"]
    dev = tvm.cuda(0)
    rng = np.random.default_rng(0)

    def weights(ggml_type: int, n: int, k: int) -> tvm.runtime.Tensor:
        fmt = gemv.gemv_format(ggml_type)
        words = rng.integers(0, 1 << 16, (E, n, fmt.row_words(k)), dtype=np.uint32).astype(fmt.word_dtype)
        return tvm.runtime.tensor(words, dev)

    wq4_up, wq4_gate = weights(Q.Q4_K, I, H), weights(Q.Q4_K, I, H)
    downs = {"down_q6_k": weights(Q6_K_PLANAR, H, I), "down_q4_k": weights(Q.Q4_K, H, I)}
    x_tokens = tvm.runtime.tensor(rng.standard_normal((T, H), dtype=np.float32), dev)
    x_rows = tvm.runtime.tensor(rng.standard_normal((T * KU, I), dtype=np.float32), dev)
    act = tvm.runtime.tensor(np.zeros((T * KU, I), np.float32), dev)
    y = tvm.runtime.tensor(np.zeros((T * KU, H), np.float32), dev)
    results = {}
    for routing, ids in routings(rng, T).items():
        offsets, row_token, _ = moe_chunk.moe_sort_reference(ids, T, E)
        counts = np.diff(offsets)
        print(f"{routing}: {np.count_nonzero(counts)} experts with rows, the most {counts.max()}", flush=True)
        off, tok = tvm.runtime.tensor(offsets, dev), tvm.runtime.tensor(row_token, dev)
        for symbol in listing:
            timer = lib.time_evaluator(symbol, dev, number=20, repeat=5)
            if symbol.startswith("gate_up"):
                times = timer(wq4_gate, wq4_up, off, tok, x_tokens, act).results
            else:
                times = timer(downs[symbol.rsplit("_", 1)[0]], off, x_rows, y).results
            results[f"{routing} {symbol}"] = 1e6 * float(np.median(times))
            print(f"  {symbol:28s} {results[f'{routing} {symbol}']:9.1f} us  {listing[symbol]['knobs']}", flush=True)
    (OUT / arch / "times.json").write_text(json.dumps({"device": str(dev), "tokens": T, "us": results}, indent=1)
                                           + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["prepare"] and len(sys.argv) in (3, 4):
        prepare(sys.argv[2], int(sys.argv[3]) if len(sys.argv) == 4 else TOKENS)
    elif sys.argv[1:] == ["run"]:
        run()
    else:
        raise SystemExit(__doc__)
