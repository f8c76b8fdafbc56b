#!/usr/bin/env bash
# The GPU round, one command on the GPU machine (device tool `run`, with the carry list that
# bench/prepare_gpu_round.sh prints: the .device runtime kit and .device/compiled.tar.xz),
# after bench/prepare_gpu_round.sh here:
#
#   bash bench/gpu_round.sh
#
#   1. setup: runtime-only TVM (.device/setup.sh), and the wheels of .device/extras/ whose
#      module the machine lacks (pytest, ...) into /tmp/site-extras
#   2. synth: the full 48-layer Qwen3-30B-A3B Q4_K_M stand-in, /tmp/q30.gguf (~17.3 GiB), once
#   3. pytest: every GPU test (the files that carry pytest.mark.gpu, tests/gpu first), on the
#      libraries and steps prebuilt in compiled/gpu-tests/<arch>/; with SPARKINFER_FULL_MODEL
#      set, so the accuracy gate also runs on the full-size model
#   4. bench: `sparkinfer bench` tg128 at depths 128, 512, 4096 (3 reps) and pp128, with the
#      prebuilt full-model step (compiled/gpu-tests/gpu-round.json names it)
#   5. run: `sparkinfer run -n 128 --json` with a 128-token prompt
#   6. apps: the accuracy gate, chat prefix reuse and the HTTP server with the shipped model
# Logs go to $OUT (else /tmp/gpu-round): setup.log, pytest.log, full_width_cut.txt, bench.json,
# bench.log, run.json, run.log, summary.txt (8 files, what the device tool returns). The table
# comes last. Each stage has a time limit inside a ~9.5-minute budget (ROUND_SECONDS), so the
# table prints before the tool's 10-minute limit; a failed stage does not stop the next.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-round}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
model=${ROUND_MODEL:-/tmp/q30.gguf}
extras_dir=${ROUND_EXTRAS_DIR:-/tmp/site-extras}
deadline=$((SECONDS + ${ROUND_SECONDS:-565}))
log="$out/setup.log"
: > "$log"
note() { echo "$*" | tee -a "$log"; }
# seconds for a stage: at most $1, leaving $2 for the stages after it
limit() { local t=$((deadline - SECONDS - $2)); ((t > $1)) && t=$1; ((t < 15)) && t=15; echo "$t"; }
stage() {  # stage NAME RC START
  note "stage $1: rc $2, $((SECONDS - $3)) s"
}

t=$SECONDS
if [ -z "${ROUND_NO_SETUP:-}" ]; then
  source .device/setup.sh
fi
# compiled/gpu-tests and compiled/<arch>, packed by prepare_gpu_round.sh
[ -f .device/compiled.tar.xz ] && tar xJf .device/compiled.tar.xz
missing=$(python3 - <<'PY'
import importlib.util
for line in open(".device/extras/MODULES"):
    module, wheel = line.split()
    if importlib.util.find_spec(module) is None:
        print(".device/extras/" + wheel)
PY
)
if [ -n "$missing" ]; then
  note "installing into $extras_dir:" $missing
  # shellcheck disable=SC2086
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$extras_dir" $missing >> "$log" 2>&1
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$extras_dir"  # after the image's own packages
lacking=$(python3 -c 'import importlib.util as u; print(*[m for m in ("numpy", "tokenizers", "jinja2", "tqdm", "yaml", "gguf", "tvm", "pytest") if u.find_spec(m) is None])')
[ -n "$lacking" ] && note "MISSING python modules: $lacking (pack wheels for them with bench/pack_device_extras.sh)"
# The test files import `tests.*` (a namespace package here): a regular `tests` package installed
# in the image would shadow it.
python3 -c 'import os, tests; assert os.path.abspath("tests") in [os.path.abspath(p) for p in tests.__path__]' 2>/dev/null \
  || note "WARNING: \`import tests\` does not find $PWD/tests: $(python3 -c 'import tests; print(list(tests.__path__))' 2>&1 | tail -1)"
arch=$(python3 bench/gpu_round.py get arch)
full=$(python3 bench/gpu_round.py get full_module)
note "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 | head -1)"
note "python: $(python3 -c 'import sys, numpy, tvm; print(sys.version.split()[0], "numpy", numpy.__version__, "tvm", tvm.__version__)' 2>&1 | tail -1)"
python3 bench/gpu_round.py check 2>&1 | tee -a "$log"
stage setup 0 "$t"

t=$SECONDS
if [ -f "$model" ]; then
  note "== $model is there"
  rc=0
else
  note "== synth $model"
  timeout -k 10 "$(limit 150 400)" python3 -m sparkinfer.cli synth --preset qwen3-30b-a3b "$model" 2>&1 \
    | tr '\r' '\n' | tail -n 3 >> "$log"
  rc=${PIPESTATUS[0]}
fi
stage synth "$rc" "$t"

t=$SECONDS
files=$( (ls tests/gpu/test_*.py; grep -rl "pytest.mark.gpu" tests --include='test_*.py' | sort) | awk '!seen[$0]++')
note "== pytest -m gpu on:" $files
# (reports a warm machine's last round left)
rm -f /tmp/sparkinfer-gpu-tests/full_width_cut.txt /tmp/sparkinfer-gpu-tests/full_size_gate.txt
export SPARKINFER_FULL_MODEL=$model  # the full-size accuracy gate (tests/accuracy/test_accuracy_gpu.py)
# Not a bare `pytest -m gpu`: with runtime-only TVM the CPU-only modules that import the compiler
# fail to collect, and the run stops there. --maxfail=3 rather than -x: one round, most answers.
# shellcheck disable=SC2086
timeout -k 10 "$(limit 330 130)" python3 -m pytest -m gpu --maxfail=3 -q -p no:cacheprovider --durations=8 $files \
  > "$out/pytest.log" 2>&1
rc=$?
tail -n 3 "$out/pytest.log"
cp /tmp/sparkinfer-gpu-tests/full_width_cut.txt "$out/" 2>/dev/null
stage pytest "$rc" "$t"

t=$SECONDS
note "== bench with $full"
timeout -k 10 "$(limit 240 50)" python3 -m sparkinfer.cli bench "$model" --arch "$arch" --module "$full" \
  --depths 128,512,4096 --reps 3 --json > "$out/bench.json" 2> "$out/bench.log"
rc=$?
tail -n 5 "$out/bench.log"
stage bench "$rc" "$t"

t=$SECONDS
note "== run -n 128"
prompt=$(python3 bench/gpu_round.py get run_prompt)
timeout -k 10 "$(limit 120 5)" python3 -m sparkinfer.cli run "$model" --arch "$arch" --module "$full" -n 128 --json \
  -p "$prompt" > "$out/run.json" 2> "$out/run.log"
rc=$?
tail -n 3 "$out/run.log"
stage run "$rc" "$t"

# The apps on this GPU with the shipped demo model (its step is prebuilt in compiled/<arch>/):
# the accuracy gate, chat prefix reuse, and the HTTP server.
t=$SECONDS
apps=/tmp/gpu-round-apps.txt  # printed last, not in $OUT: the tool returns 8 files
{
  echo "== full-size synthetic model: accuracy gate against bench/refs/qwen3-30b-a3b-synth.npz (in pytest)"
  cat /tmp/sparkinfer-gpu-tests/full_size_gate.txt 2>/dev/null || echo "(no report: see pytest.log)"
  echo "== sparkinfer accuracy --arch $arch (shipped Q4_K_M vs its F16 original, numpy reference)"
  timeout -k 10 "$(limit 90 40)" python3 -m sparkinfer.cli accuracy --arch "$arch" 2>&1 | tail -n 12
  echo "== bench/chat_prefix_reuse.py --arch $arch"
  timeout -k 10 "$(limit 60 25)" python3 bench/chat_prefix_reuse.py --arch "$arch" --repeats 2 2>&1 | tail -n 8
  echo "== bench/server_smoke.py --arch $arch"
  timeout -k 10 "$(limit 60 5)" python3 bench/server_smoke.py --arch "$arch" 2>&1 | grep -v "INFO" | tail -n 6
} > "$apps" 2>&1
stage apps 0 "$t"

echo
python3 bench/gpu_round.py report "$out" | tee "$out/summary.txt"
echo
cat "$apps"
