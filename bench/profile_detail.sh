#!/usr/bin/env bash
# Nsight Compute's detailed sections (speed of light, memory workload, occupancy, launch stats,
# warp states, scheduler) for one launch of each kernel family named, in the full-size decode
# step, on the GPU machine after bench/prepare_gpu_round.sh here (same carry list):
#
#   bash bench/profile_detail.sh [REGEX [N]]   # default: the MoE, attention and dense GEMV kernels, 12 launches
#   PROFILE_PROMPT=chunk PROFILE_SKIP=S bash bench/profile_detail.sh REGEX N
#       # the T-token step's kernels: the prompt is gpu-round.json's chunk_prompt (two of the
#       # largest chunks), S launches of the matching kernels skipped first (default 60)
#
# Where bench/profile_kernels.sh says how long each kernel takes, this says why: which unit is
# busy, how many warps are resident and what they wait on. N launches of the kernels whose names
# match REGEX, after skipping the first 60 such launches (their code and data are those of every
# layer; 12 launches cover each family in two layers). Text report in $OUT/profile-detail.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/profile}
mkdir -p "$out"
source .device/setup.sh
[ -f .device/compiled.tar.xz ] && tar xJf .device/compiled.tar.xz
model=/tmp/q30.gguf
[ -f "$model" ] || python3 -m sparkinfer.cli synth --preset qwen3-30b-a3b "$model" 2>&1 | tr '\r' '\n' | tail -n 1
module=$(python3 bench/gpu_round.py get "${PROFILE_MODULE:-full_module}")
arch=$(python3 bench/gpu_round.py get arch)
regex=${1:-moe_gate_up|moe_down_residual|paged_decode_attention|gemv_qkv|gemv_q4_k_2048x4096}
prompt=Hello
[ "${PROFILE_PROMPT:-}" = chunk ] && prompt=$(python3 bench/gpu_round.py get chunk_prompt)
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
# ncu's report lines are indented; the app's own output is not.
"$ncu" --clock-control none -k "regex:$regex" --launch-skip "${PROFILE_SKIP:-60}" -c "${2:-12}" \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
  --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis --section InstructionStats \
  python3 -m sparkinfer.cli run "$model" --arch "$arch" --module "$module" -n 2 -p "$prompt" \
  2> "$out/ncu-detail.log" | grep '^  ' > "$out/profile-detail.txt"
echo "ncu rc ${PIPESTATUS[0]}: $(grep -c 'Section: GPU Speed Of Light' "$out/profile-detail.txt") kernels in $out/profile-detail.txt"
