#!/usr/bin/env bash
# Run HERE (full TVM + nvcc) right before the GPU round, on the tree that will travel: builds
# into compiled/ everything bench/gpu_round.sh needs on the GPU machine (an H200: sm_90, as the
# H100 was), then prints the carry list, what travels (the tree + carried paths; the device
# tool's limit is 64 MiB a call) and the two device calls of the round.
#   0. .device/setup.sh, tvm_runtime.tar.xz and wheels: the kit of bench/device/pack.sh (run it first)
#   1. .device/extras/: wheels the GPU machine may lack (bench/pack_device_extras.sh)
#   2. compiled/gpu-tests/<arch>/: every GPU test's library, the runtime tests' steps, the 4-layer
#      full-width cut's step, and the shipped model's step in compiled/<arch>/ (tests.gpu_prebuild)
#   3. compiled/<arch>/<key>/: the full 48-layer Qwen3-30B-A3B Q4_K_M step (the arch's defaults,
#      its T-token steps included), the decode-only variants of bench/gpu_round.py VARIANT_STEPS
#      (compiled/<arch>/<name>/), and compiled/gpu-tests/gpu-round.json (module paths, a
#      128-token prompt, the sources hash)
#   4. .device/compiled.tar.xz: those two folders of compiled/, which the calls carry
#   5. .device/tune-<arch>/: the next tuning round of the full-size model's kernels (`sparkinfer
#      tune --preset qwen3-30b-a3b --trials 64 --emit`, continuing from tuning_logs/<arch>/), carried
#      as .device/tune.tar.xz; after the round: cp the returned tune-results.json to
#      .device/tune-<arch>/results.json and `sparkinfer tune --preset qwen3-30b-a3b --ingest
#      .device/tune-<arch>`
#
#   bench/prepare_gpu_round.sh [ARCH]       # default sm_90
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
arch=${1:-sm_90}
t0=$SECONDS
[ -f .device/setup.sh ] || { echo "no .device/setup.sh: run bench/device/pack.sh first" >&2; exit 1; }
# The tuning round below continues from tuning_logs/<arch>/: without it (moved out for a call,
# as the size check at the end suggests) it would start over and write a fresh log there.
[ -d "tuning_logs/$arch" ] || { echo "no tuning_logs/$arch (moved out for a device call?): put it back first" >&2; exit 1; }

bench/pack_device_extras.sh > /dev/null
echo "extras: $(du -sh .device/extras | cut -f1) in .device/extras ($((SECONDS - t0)) s)"

t1=$SECONDS
python3 -m tests.gpu_prebuild --arch "$arch"
echo "gpu tests prebuilt in $((SECONDS - t1)) s"

t2=$SECONDS
python3 bench/gpu_round.py prepare "$arch" | grep -v '"run_prompt"\|"chunk_prompt"'
echo "full model step in $((SECONDS - t2)) s"

t3=$SECONDS
# (no round, and no tune.tar.xz, where the emit fails: the rest of the round needs none)
rm -f .device/tune.tar.xz
# --trials 64, not the command's 32: a round on the GPU takes seconds, and each round times the
# shipped knobs and the default again (sparkinfer/tune/bundle.py round_candidates), so that at 32
# the projections' kernels had no room left for a round on the H200 (bench/NOTES.md, "Session 18").
if python3 -m sparkinfer.cli tune --preset qwen3-30b-a3b --type q4_k_m --arch "$arch" --trials 64 --emit ".device/tune-$arch" \
  | grep -v '^skipped'; then
  tar cf - -C ".device/tune-$arch" . | xz -T2 -6 > .device/tune.tar.xz
  echo "tuning round emitted in $((SECONDS - t3)) s"
else
  echo "WARNING: no tuning round emitted (stage tune will say so)" >&2
fi

full=$(python3 bench/gpu_round.py get full_module)
lib_bytes=$(python3 bench/gpu_round.py get full_library_bytes)
# Of compiled/, what the round uses (not compiled/runtime-tests, the runtime tests' older
# location), as one xz archive: the libraries halve (10 -> 5 MiB), and the tree already takes
# 42 of the 64 MiB a call may carry. gpu_round.sh and profile_kernels.sh unpack it.
# (modules of earlier rounds' module sets: a stale copy would travel too)
rm -rf "compiled/$arch/chunked" "compiled/$arch/candidate" compiled/gpu-tests/candidate-*.json
compiled_bytes=$(du -scb compiled/gpu-tests "compiled/$arch" | tail -1 | cut -f1)
tar cf - compiled/gpu-tests "compiled/$arch" | xz -T2 -6 > .device/compiled.tar.xz
# What the device call carries: the tree (tracked + untracked, not ignored), the runtime kit of
# .device/ that setup.sh and the round use (not the other experiments kept in .device/), and
# that archive.
carry=(.device/setup.sh .device/tvm_runtime.tar.xz $(ls .device/*.whl) .device/extras .device/compiled.tar.xz
       $(ls .device/tune.tar.xz 2>/dev/null))
# (files moved out of the tree for the call, tuning_logs/<arch> below, are not there to stat)
tracked=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | { xargs -0 -r stat -c %s -- 2>/dev/null || :; } \
           | awk '{s += $1} END {print s + 0}')
carried=$(du -scb "${carry[@]}" | tail -1 | cut -f1)
total=$((tracked + carried))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo
echo "full 48-layer module: $full, library $(mib "$lib_bytes")"
archive_bytes=$(stat -c %s .device/compiled.tar.xz)
echo "carried sizes: compiled/gpu-tests + compiled/$arch $(mib "$compiled_bytes") as" \
     ".device/compiled.tar.xz $(mib "$archive_bytes"), .device kit $(mib $((carried - archive_bytes)))"
echo "travels: tree $(mib "$tracked") + carried $(mib "$carried") = $(mib "$total") (the tool's limit: 64 MiB)"
{ git ls-files -z; git ls-files -z --others --exclude-standard; } | { xargs -0 -r stat -c '%s %n' -- 2>/dev/null || :; } \
  | sort -n | tail -3 | awk '$1 > 1048576 {printf "  tree: %.1f MiB %s\n", $1 / 1048576, $2}'
if [ "$total" -gt $((64 * 1048576)) ]; then
  echo "ERROR: over the 64 MiB a call may carry" >&2
  # The tuning logs are the tree's one part no GPU stage reads (the schedules they produced are
  # in sparkinfer/data/schedules/): out of the tree for the call, back after it. A commit made
  # while they are out (git commit -a) records them deleted.
  echo "  for the call: mv tuning_logs/$arch /tmp/tuning_logs_$arch ($(du -sh "tuning_logs/$arch" | cut -f1));" \
       "after it: mv /tmp/tuning_logs_$arch tuning_logs/$arch, committing nothing in between" >&2
elif [ "$total" -gt $((50 * 1048576)) ]; then
  echo "WARNING: over ~50 MiB" >&2
fi
carry_json=$(printf '"%s", ' "${carry[@]}" | sed 's/, $//')
echo "carry: [$carry_json]"
echo "prepared in $((SECONDS - t0)) s. Then the round, two device calls (kind nvidia-h200), the second"
echo "right after the first, while the machine is warm (it keeps /tmp/q30.gguf and the first call's results):"
echo "  run(kind=\"nvidia-h200\", timeout_s=600, carry=[$carry_json], command=\"bash bench/gpu_round.sh 1\")"
echo "  run(timeout_s=600, carry=[$carry_json], command=\"bash bench/gpu_round.sh 2\")"
