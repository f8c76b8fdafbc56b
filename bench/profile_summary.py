"""Summarise an ncu CSV (bench/profile_kernels.sh) per kernel family of the decode step.

    python3 bench/profile_summary.py ncu.csv [--step-end advance_chunk]

A step is every kernel after the last step's end up to one named --step-end (default `advance`,
the decode step's last kernel; `advance_chunk` is the T-token step's): the kernels of the other
step (a module with both runs each) and of a step that ncu's launch count cut off are left out.
"""

from __future__ import annotations

import argparse
import csv
import re
from collections import defaultdict


def family(kernel: str) -> str:
    """A kernel's name as the step calls it (type and shape kept: the V GEMV and the LM head
    are both gemv_q6_k); a function's later kernels (TVM's <name>_kernel_1, ...: the split-K
    GEMMs' sums) are <name>#1, ..., not averaged into its first kernel's time."""
    name = kernel.split("(")[0]
    found = re.fullmatch(r"(.*)_kernel(?:_(\d+))?", name)
    if found is None:
        return name
    return found.group(1) + (f"#{found.group(2)}" if found.group(2) else "")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--step-end", default="advance", help="name prefix of a step's last kernel")
    args = ap.parse_args()
    with open(args.csv, newline="") as f:
        rows = list(csv.DictReader(line for line in f if line.startswith('"')))  # the app prints too
    time_us: dict[str, list[float]] = defaultdict(list)
    dram: dict[str, list[float]] = defaultdict(list)
    by_id: dict[str, dict[str, float]] = defaultdict(dict)
    for r in rows:
        key = r["ID"]
        by_id[key]["name"] = r["Kernel Name"]  # type: ignore[assignment]
        value = float(r["Metric Value"].replace(",", ""))
        unit = r["Metric Unit"]
        if r["Metric Name"] == "gpu__time_duration.sum":
            by_id[key]["us"] = value * {"ns": 1e-3, "nsecond": 1e-3, "us": 1, "usecond": 1, "ms": 1e3, "msecond": 1e3}[unit]
        elif r["Metric Name"] == "dram__bytes_read.sum":
            scale = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9}[unit]
            by_id[key]["bytes"] = value * scale
    # Whole steps only: the kernels of each run of the step that ends in --step-end, not those of
    # another step (every step's last kernel is an `advance` one) nor a step cut off by ncu's count.
    kept: dict[str, dict[str, float]] = {}
    ends, segment = [], []
    for key in sorted(by_id, key=int):
        segment.append(key)
        end = family(str(by_id[key]["name"]))
        if end.startswith("advance"):
            if end == args.step_end:
                kept.update((k, by_id[k]) for k in segment)
                ends.append(key)
            segment = []
    if not ends:
        raise SystemExit(f"no `{args.step_end}` kernel among those profiled: profile at least one whole step")
    by_id = kept
    steps = len(ends)
    for rec in by_id.values():
        fam = family(str(rec["name"]))
        time_us[fam].append(float(rec.get("us", 0.0)))
        dram[fam].append(float(rec.get("bytes", 0.0)))
    total = 0.0
    print(f"{len(by_id)} kernels in {steps} whole steps")
    print(f"{'kernel':<56}{'launches/step':>14}{'us/launch':>11}{'us/step':>10}{'GB/s':>8}")
    table = []
    for fam, ts in time_us.items():
        per_step = len(ts) / steps
        mean = sum(ts) / len(ts)
        gbps = sum(dram[fam]) / (sum(ts) * 1e-6) / 1e9 if sum(ts) else 0.0
        table.append((mean * per_step, fam, per_step, mean, gbps))
        total += mean * per_step
    for us_step, fam, per_step, mean, gbps in sorted(table, reverse=True):
        print(f"{fam[:55]:<56}{per_step:>14.1f}{mean:>11.2f}{us_step:>10.1f}{gbps:>8.0f}")
    print(f"{'sum (kernels timed alone)':<56}{'':>14}{'':>11}{total:>10.1f}")


if __name__ == "__main__":
    main()
