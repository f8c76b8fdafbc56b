#!/usr/bin/env bash
# Per-kernel GPU times of the full-size decode step, by Nsight Compute (ncu, on the GPU image),
# on the GPU machine after bench/prepare_gpu_round.sh here (same carry list):
#
#   bash bench/profile_kernels.sh [N_LAUNCHES]
#
# Profiles the first N_LAUNCHES (default 1300: two steps of ~600 kernels) kernel launches of
# `sparkinfer run -n 2` on the synthetic Qwen3-30B-A3B (/tmp/q30.gguf, written if absent), each
# kernel serialised and timed alone at the card's own clocks (--clock-control none), and prints
# bench/profile_summary.py's table: per kernel family (whole steps only), launches per token, µs per launch,
# µs per token, achieved DRAM bandwidth. Raw CSV in $OUT/ncu.csv. Kernels timed alone lose the
# overlap of a graph replay: the per-token sum is an upper bound of the step's time.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/profile}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
source .device/setup.sh
[ -f .device/compiled.tar.xz ] && tar xJf .device/compiled.tar.xz  # prepare_gpu_round.sh packs it
model=/tmp/q30.gguf
[ -f "$model" ] || python3 -m sparkinfer.cli synth --preset qwen3-30b-a3b "$model" 2>&1 | tr '\r' '\n' | tail -n 1
full=$(python3 bench/gpu_round.py get full_module)
arch=$(python3 bench/gpu_round.py get arch)
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
echo "ncu: $ncu"
"$ncu" --clock-control none --csv --metrics gpu__time_duration.sum,dram__bytes_read.sum -c "${1:-1300}" \
  python3 -m sparkinfer.cli run "$model" --arch "$arch" --module "$full" -n 2 -p "Hello" \
  > "$out/ncu.csv" 2> "$out/ncu.log"
echo "ncu rc $?"
tail -n 3 "$out/ncu.log"
python3 bench/profile_summary.py "$out/ncu.csv" | tee "$out/profile.txt"
