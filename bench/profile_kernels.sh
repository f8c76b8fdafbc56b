#!/usr/bin/env bash
# Per-kernel GPU times of the full-size decode step, by Nsight Compute (ncu, on the GPU image),
# on the GPU machine after bench/prepare_gpu_round.sh here (same carry list):
#
#   bash bench/profile_kernels.sh [N_LAUNCHES]
#   PROFILE_CHUNKED=1 bash bench/profile_kernels.sh [N_LAUNCHES]   # the T-token step instead
#
# PROFILE_MODULE names another module of gpu-round.json (a key such as expert_prefetch_module; default
# full_module). PROFILE_CACHE=none keeps the caches between the kernels (ncu's --cache-control; its
# default, all, flushes them before each), so that a kernel finds in the L2 what the one before it
# left or prefetched there (step variant expert_prefetch "down", bench/NOTES.md "Session 23").
#
# With PROFILE_CHUNKED=1 it profiles the T-token step prefilling a prompt of two of its largest
# chunks (gpu-round.json's chunk_prompt), so the table is per chunk, the second chunk's attention
# over the first's keys included.
#
# Profiles the first N_LAUNCHES (default 3000: the decode step's warm-up, the T-token step of the
# one-token prompt and two decode steps, ~600 kernels a decode step) kernel launches of
# `sparkinfer run -n 3` on the synthetic Qwen3-30B-A3B (/tmp/q30.gguf, written if absent), each
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
full=$(python3 bench/gpu_round.py get "${PROFILE_MODULE:-full_module}")
prompt="Hello" steps=3 step_end=advance
if [ -n "${PROFILE_CHUNKED:-}" ]; then
  prompt=$(python3 bench/gpu_round.py get chunk_prompt) steps=1 step_end=advance_chunk  # the first token comes from the chunks
fi
arch=$(python3 bench/gpu_round.py get arch)
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
echo "ncu: $ncu"
"$ncu" --clock-control none --cache-control "${PROFILE_CACHE:-all}" --csv --metrics gpu__time_duration.sum,dram__bytes_read.sum -c "${1:-3000}" \
  python3 -m sparkinfer.cli run "$model" --arch "$arch" --module "$full" -n "$steps" -p "$prompt" \
  > "$out/ncu.csv" 2> "$out/ncu.log"
echo "ncu rc $?"
tail -n 3 "$out/ncu.log"
python3 bench/profile_summary.py "$out/ncu.csv" --step-end "$step_end" | tee "$out/profile.txt"
