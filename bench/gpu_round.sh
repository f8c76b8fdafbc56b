#!/usr/bin/env bash
# The GPU round on an H200 (device tool `run`, kind nvidia-h200, with the carry list that
# bench/prepare_gpu_round.sh prints), after bench/prepare_gpu_round.sh here. Two calls, each
# inside the tool's 600 s a call, the second right after the first (the machine stays warm
# ~30 s after a call: /tmp keeps the synthetic model and the round's results; on a fresh machine
# the second call writes the model again and its table lacks the first call's rows):
#
#   bash bench/gpu_round.sh 1      # setup, synth, pytest, chunked, variants, profile_chunked
#   bash bench/gpu_round.sh 2      # setup, synth (if gone), decode, sync, profile, run, apps
#   bash bench/gpu_round.sh STAGE...   # any stages, in the order given (tune: in neither round)
#
# Stages (each with a time limit, cut further so that the call ends by ROUND_SECONDS, default 565):
#   setup    runtime-only TVM (.device/setup.sh), .device/extras' wheels the image lacks, compiled/
#   tune     time the tuning round that prepare_gpu_round.sh emitted (.device/tune.tar.xz: the
#            full-size model's kernels, `sparkinfer tune --preset qwen3-30b-a3b --arch sm_90 --emit`)
#            with `python -m sparkinfer.tune.runner`; returns tune-results.json for `--ingest` here
#   synth    the full 48-layer Qwen3-30B-A3B Q4_K_M stand-in, /tmp/q30.gguf (~17.3 GiB), if absent
#   pytest   every GPU test (files with pytest.mark.gpu or the `gpu` fixture), the full-size accuracy gate among them
#            (SPARKINFER_FULL_MODEL), on the libraries prebuilt in compiled/gpu-tests/<arch>/
#            (ROUND_PYTEST_FILES: only these test files)
#   decode   `sparkinfer bench` tg128 at depths 128, 512, 4096, 16384 (and pp512), 3 reps, device loop
#   sync     the same with --sync-every-token (the host sees every token, llama-bench's way)
#   chunked  the full module's T-token step (compiler/pipeline.py DEFAULT_PREFILL_CHUNKS): the
#            full-size accuracy gate through it (its 128 teacher-forced tokens are one chunk; then
#            again through its largest step only, `accuracy --prefill-chunk`), then
#            the prefill at 512, 4096 and 16384 tokens (and decode at depth 128)
#   chunked_gate  only the chunked stage's accuracy gates (the engine's chunk choice; the largest step)
#   variants the variants of the default step (bench/gpu_round.py VARIANT_STEPS; and "before",
#            an earlier tree's full module, when compiled/<arch>/before/ has one): each one's
#            full-size gate, then decode at depth 128 (and VARIANT_DEPTHS'), host sync (and 1024-, 4096- and
#            16384-token prefills where it has T-token steps), beside the full module's (base,
#            before and after them) in the same call
#   run      `sparkinfer run -n 128 --json` with a 128-token prompt
#   apps     the shipped model on this GPU: accuracy gate, chat prefix reuse, the HTTP server
#   profile  ncu per-kernel times of the full-size step (bench/profile_kernels.sh)
#   profile_chunked  the same for the T-token step, per chunk of a prompt of two 512-token chunks
#   profile_detail   ncu's detailed sections for the decode step's MoE, attention and GEMV kernels
#            (bench/profile_detail.sh): what each is bound by
#   profile_detail_chunked  the same for the T-token step's expert GEMMs, attention, dense and router GEMMs
#   grouped  the 512-token chunk's float16 grouped expert GEMMs alone at a grid of their knobs
#            (bench/time_grouped_f16.py run; the call carries compiled/grouped-f16, made here by
#            `python3 bench/time_grouped_f16.py prepare ARCH`)
# Results accumulate in ROUND_DIR (default /tmp/gpu-round-results) across calls; each call copies
# what its stages wrote, and summary.txt, to $OUT (at most 8 files, what the tool returns; more go
# into $OUT/round.tar.gz beside summary.txt), then
# prints apps and profile, and the short table last.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-round}
round=${ROUND_DIR:-/tmp/gpu-round-results}
mkdir -p "$out" "$round"
export PYTHONUNBUFFERED=1
model=${ROUND_MODEL:-/tmp/q30.gguf}
extras_dir=${ROUND_EXTRAS_DIR:-/tmp/site-extras}
deadline=$((SECONDS + ${ROUND_SECONDS:-565}))
log="$round/setup.log"
note() { echo "$*" | tee -a "$log"; }
# The least each stage needs to be of use (seconds on an H100 in session 12, model load
# included): a stage keeps this much for each stage after it in the call, so that a short call
# cuts the running stage, not the ones after it (with fixed reserves, `setup synth variants` once
# gave synth 15 s, and decode got 15 s after sync).
declare -A STAGE_FLOOR=([setup]=15 [tune]=60 [synth]=40 [pytest]=120 [decode]=45 [sync]=30 [chunked]=60
  [chunked_gate]=45 [variants]=90 [run]=20 [apps]=25 [profile]=60 [profile_chunked]=60 [profile_detail]=60
  [grouped]=40 [profile_detail_chunked]=60)
later=0  # the floors of the stages after the running one
# seconds for a step of a stage: at most $1, leaving $2 for the rest of the stage and `later`
# for the stages after it (at least 15)
limit() {
  local t=$((deadline - SECONDS - $2 - later))
  ((t > $1)) && t=$1; ((t < 15)) && t=15; echo "$t"
}
stage_done() {  # NAME RC START
  note "stage $1: rc $2, $((SECONDS - $3)) s"
}
returned=(summary.txt)  # files of $round that this call returns in $OUT
returns() { returned+=("$@"); }

stage_setup() {
  if [ -z "${ROUND_NO_SETUP:-}" ]; then
    source .device/setup.sh
  fi
  # compiled/gpu-tests and compiled/<arch>, packed by prepare_gpu_round.sh
  [ -f .device/compiled.tar.xz ] && tar xJf .device/compiled.tar.xz
  local missing
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
  local lacking
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
  returns setup.log
}

stage_tune() {
  if [ ! -f .device/tune.tar.xz ]; then
    note "== tune: no .device/tune.tar.xz (bench/prepare_gpu_round.sh emits it)"
    return 1
  fi
  local bundle=/tmp/tune-bundle
  rm -rf "$bundle" && mkdir -p "$bundle" && tar xJf .device/tune.tar.xz -C "$bundle"
  note "== tune: $(python3 -c 'import json, sys; i = json.load(open(sys.argv[1])); print(len(i["candidates"]), "candidates of", len(i["kernels"]), "kernels")' "$bundle/index.json")"
  timeout -k 10 "$(limit 150 0)" python3 -m sparkinfer.tune.runner "$bundle" > "$round/tune.log" 2>&1
  local rc=$?
  tail -n 1 "$round/tune.log" | tee -a "$log"
  cp "$bundle/results.json" "$round/tune-results.json" 2>/dev/null
  returns tune-results.json tune.log
  return $rc
}

stage_synth() {
  if [ -f "$model" ]; then
    note "== $model is there"
    return 0
  fi
  note "== synth $model"
  timeout -k 10 "$(limit 150 0)" python3 -m sparkinfer.cli synth --preset qwen3-30b-a3b "$model" 2>&1 \
    | tr '\r' '\n' | tail -n 3 >> "$log"
  return "${PIPESTATUS[0]}"
}

stage_pytest() {
  local files
  # GPU tests: marked with pytest.mark.gpu, or taking the `gpu` fixture of tests/schedule/cuda_testutil.py
  # (whose "cuda" parameter carries the mark)
  files=${ROUND_PYTEST_FILES:-$(grep -rlE "pytest.mark.gpu|gpu_fixture\(" tests --include='test_*.py' | sort)}
  note "== pytest -m gpu on:" $files
  # (reports a warm machine's last round left)
  rm -f /tmp/sparkinfer-gpu-tests/full_width_cut.txt /tmp/sparkinfer-gpu-tests/full_size_gate.txt
  export SPARKINFER_FULL_MODEL=$model  # the full-size accuracy gate (tests/accuracy/test_accuracy_gpu.py)
  # Not a bare `pytest -m gpu`: with runtime-only TVM the CPU-only modules that import the compiler
  # fail to collect, and the run stops there. --maxfail=30 rather than -x: one round, most answers
  # (session 9's 10 stopped the run inside one broken kernel family's cases).
  # shellcheck disable=SC2086
  timeout -k 10 "$(limit 300 0)" python3 -m pytest -m gpu --maxfail=30 -q -p no:cacheprovider --durations=8 $files \
    > "$round/pytest.log" 2>&1
  local rc=$?
  tail -n 3 "$round/pytest.log"
  cp /tmp/sparkinfer-gpu-tests/full_width_cut.txt /tmp/sparkinfer-gpu-tests/full_size_gate.txt "$round/" 2>/dev/null
  returns pytest.log full_width_cut.txt
  return $rc
}

bench_json() {  # OUT_NAME LIMIT RESERVE ARGS...: one `sparkinfer bench --json` on the full model
  local name=$1 max=$2 reserve=$3
  shift 3
  note "== bench $* -> $name"
  echo "== bench $*" >> "$round/bench.log"
  timeout -k 10 "$(limit "$max" "$reserve")" python3 -m sparkinfer.cli bench "$model" --arch "$arch" \
    --module "${module:-$full}" --json "$@" > "$round/$name" 2>> "$round/bench.log"
}

stage_decode() {
  # Fills depths 128..16384 (21,120 tokens of prefill) before its timed reps.
  bench_json bench-device.json 220 0 --depths 128,512,4096,16384 --prompts 512 --reps 3
  local rc=$?
  tail -n 4 "$round/bench.log"
  returns bench-device.json bench.log
  return $rc
}

stage_sync() {
  bench_json bench-sync.json 240 0 --depths 128,512,4096,16384 --prompts 512 --reps 3 --sync-every-token
  local rc=$?
  tail -n 4 "$round/bench.log"
  returns bench-sync.json bench.log
  return $rc
}

full_gate() {  # MODULE OUT_NAME RESERVE [ACCURACY FLAGS...]: the full-size accuracy gate through MODULE
  note "== gate: $1 ${*:4}"
  # The full-size gate's settings (tests/accuracy/test_accuracy_gpu.py FULL_GATE, FULL_THRESHOLDS)
  timeout -k 10 "$(limit 100 "$3")" python3 -m sparkinfer.cli accuracy "$model" --arch "$arch" --module "$1" \
    --ref bench/refs/qwen3-30b-a3b-synth.npz --tokens 128 --prompt-tokens 32 --greedy 32 --max-kl 1e-3 \
    --min-top1 0.95 --max-ppl-ratio 1.005 --min-greedy-match 0.9 "${@:4}" > "$round/$2" 2>&1
  local rc=$?
  tail -n 4 "$round/$2"
  returns "$2"
  return $rc
}

stage_chunked_gate() {
  # twice: the engine's own choice (its 128 teacher-forced tokens are one 128-token chunk), then
  # through the largest T-token step only (the 128 tokens one padded chunk of it), so that the
  # step that long prompts run is gated end to end too
  local largest rc
  largest=$(python3 bench/gpu_round.py get largest_chunk)
  full_gate "$full" chunked-gate.txt $((${1:-0} + STAGE_FLOOR[chunked_gate]))
  rc=$?
  full_gate "$full" chunked-gate-largest.txt "${1:-0}" --prefill-chunk "$largest" || rc=1
  return $rc
}

stage_chunked() {
  stage_chunked_gate 40  # the prefill's bench after it
  local rc=$?
  bench_json prefill-chunked.json 200 0 --prompts 512,4096,16384 --depths 128 --reps 2
  local rc2=$?
  returns prefill-chunked.json
  return $((rc || rc2))
}

stage_variants() {
  local rc=0 name names chunked largest
  read -r -a names <<< "$(python3 bench/gpu_round.py get variants)"
  chunked=" $(python3 bench/gpu_round.py get variants_chunked) "
  largest=$(python3 bench/gpu_round.py get largest_chunk)
  for name in "${names[@]}"; do
    full_gate "$(python3 bench/gpu_round.py get ${name}_module)" $name-gate.txt 120 || rc=1  # the benches after
    # a variant with T-token steps: its largest step gated too (stage chunked_gate says why)
    [[ $chunked == *" $name "* ]] && { full_gate "$(python3 bench/gpu_round.py get ${name}_module)" \
      $name-gate-largest.txt 120 --prefill-chunk "$largest" || rc=1; }
  done
  # depth 128 (the variants change the kernels, not the attention's depth), and the depths of
  # gpu_round.py's VARIANT_DEPTHS for a variant of the attention (the base at all of them): the
  # decode-only modules fill their depth token by token, ~75 s for 16384 tokens, hence their longer
  # limit. The base twice, first and last: the spread of one call.
  # Modules with T-token steps (the base, VARIANT_CHUNKED) time the prefill of 4096- and
  # 16384-token prompts (where the causal attention's share grows) and of a 1024-token one
  # (between chunk sizes: engine.plan_chunks' choice) too.
  for name in base "${names[@]}" base-again; do
    local key=${name}_module json=decode-variant-$name.json prompt=128 seconds=60 depths
    depths=$(python3 bench/gpu_round.py get "${name%-again}_depths")
    [[ $depths != 128 ]] && seconds=180
    case $name in base*) key=full_module ;; esac
    case $name in base*) prompt=1024,4096,16384 ;; esac
    [[ $chunked == *" $name "* ]] && prompt=1024,4096,16384
    module=$(python3 bench/gpu_round.py get $key) bench_json $json $seconds 30 \
      --depths $depths --prompts $prompt --reps 5 --sync-every-token || rc=1
    returns $json
  done
  tail -n 3 "$round/bench.log"
  returns bench.log
  return $rc
}

stage_run() {
  note "== run -n 128"
  local prompt
  prompt=$(python3 bench/gpu_round.py get run_prompt)
  timeout -k 10 "$(limit 60 0)" python3 -m sparkinfer.cli run "$model" --arch "$arch" --module "$full" -n 128 \
    --json -p "$prompt" > "$round/run.json" 2>> "$round/bench.log"
  local rc=$?
  returns run.json
  return $rc
}

# The apps on this GPU with the shipped demo model (its step is prebuilt in compiled/<arch>/):
# the accuracy gate, chat prefix reuse, and the HTTP server.
stage_apps() {
  {
    echo "== full-size synthetic model: accuracy gate against bench/refs/qwen3-30b-a3b-synth.npz (in pytest)"
    cat "$round/full_size_gate.txt" 2>/dev/null || echo "(no report: see pytest.log)"
    echo "== sparkinfer accuracy --arch $arch (shipped Q4_K_M vs its F16 original, numpy reference)"
    timeout -k 10 "$(limit 90 40)" python3 -m sparkinfer.cli accuracy --arch "$arch" 2>&1 | tail -n 12
    echo "== bench/chat_prefix_reuse.py --arch $arch"
    timeout -k 10 "$(limit 60 20)" python3 bench/chat_prefix_reuse.py --arch "$arch" --repeats 2 2>&1 | tail -n 8
    echo "== bench/server_smoke.py --arch $arch"
    timeout -k 10 "$(limit 60 0)" python3 bench/server_smoke.py --arch "$arch" 2>&1 | grep -v "INFO" | tail -n 6
  } > "$round/apps.txt" 2>&1
  returns apps.txt
}

stage_profile() {
  OUT=$round timeout -k 10 "$(limit 150 0)" bash bench/profile_kernels.sh > "$round/profile.log" 2>&1
  local rc=$?
  [ -f "$round/profile.txt" ] || tail -n 5 "$round/profile.log" > "$round/profile.txt"
  returns profile.txt ncu.csv
  return $rc
}

stage_profile_chunked() {
  mkdir -p "$round/chunked"
  OUT=$round/chunked PROFILE_CHUNKED=1 timeout -k 10 "$(limit 150 0)" bash bench/profile_kernels.sh 3000 \
    > "$round/profile-chunked.log" 2>&1
  local rc=$?
  if [ -f "$round/chunked/profile.txt" ]; then cp "$round/chunked/profile.txt" "$round/profile-chunked.txt"
  else tail -n 5 "$round/profile-chunked.log" > "$round/profile-chunked.txt"; fi
  returns profile-chunked.txt
  return $rc
}

stage_profile_detail() {
  OUT=$round timeout -k 10 "$(limit 120 0)" bash bench/profile_detail.sh > "$round/profile-detail.log" 2>&1
  local rc=$?
  tail -n 1 "$round/profile-detail.log"
  returns profile-detail.txt
  return $rc
}

stage_grouped() {
  if [ ! -d compiled/grouped-f16 ]; then
    note "== grouped: no compiled/grouped-f16 (bench/time_grouped_f16.py prepare makes it; carry it)"
    return 1
  fi
  note "== grouped: bench/time_grouped_f16.py run"
  timeout -k 10 "$(limit 120 0)" python3 bench/time_grouped_f16.py run > "$round/grouped.txt" 2>&1
  local rc=$?
  cp compiled/grouped-f16/*/times.json "$round/grouped-times.json" 2>/dev/null
  tail -n 4 "$round/grouped.txt"
  returns grouped.txt grouped-times.json
  return $rc
}

stage_profile_detail_chunked() {
  # the T-token step's expert GEMMs, attention and dense GEMMs (3 launches each kind), past layer 0
  mkdir -p "$round/chunked-detail"
  OUT=$round/chunked-detail PROFILE_PROMPT=chunk PROFILE_SKIP=8 timeout -k 10 "$(limit 150 0)" \
    bash bench/profile_detail.sh 'grouped_|causal_prefill|gemm_q4_k_512x2048x4096|gemm_f32_512' 10 \
    > "$round/profile-detail-chunked.log" 2>&1
  local rc=$?
  tail -n 1 "$round/profile-detail-chunked.log"
  cp "$round/chunked-detail/profile-detail.txt" "$round/profile-detail-chunked.txt" 2>/dev/null
  returns profile-detail-chunked.txt
  return $rc
}

case "${1:-}" in
  1) stages=(setup synth pytest chunked variants profile_chunked) ;;
  2) stages=(setup synth decode sync profile run apps) ;;
  "") echo "usage: bash bench/gpu_round.sh 1|2|STAGE... (see the comment at the top)" >&2; exit 2 ;;
  *) stages=("$@") ;;
esac
# Each stage keeps its later stages' floors: where they add up to more than the call has, the
# first stages get 15 s (session 17's call 5: synth cut off, nothing measured but a profile).
floors=0
for name in "${stages[@]}"; do floors=$((floors + ${STAGE_FLOOR[$name]:-0})); done
if ((floors > deadline - SECONDS)); then
  echo "the stages' floors add up to $floors s, more than this call's $((deadline - SECONDS)) s" \
    "(ROUND_SECONDS): give fewer stages or more seconds" >&2
  exit 2
fi
[ "${stages[0]}" = setup ] || stage_setup > /dev/null  # every stage needs the environment
for i in "${!stages[@]}"; do
  name=${stages[$i]}
  later=0
  for next in "${stages[@]:i+1}"; do later=$((later + ${STAGE_FLOOR[$next]:-0})); done
  if ! declare -F "stage_$name" > /dev/null; then
    note "no stage $name"
    continue
  fi
  t=$SECONDS
  "stage_$name"
  stage_done "$name" $? "$t"
done

python3 bench/gpu_round.py report "$round" > "$round/summary.txt"
files=()
for f in $(printf '%s\n' "${returned[@]}" | awk '!seen[$0]++'); do
  [ -f "$round/$f" ] && files+=("$f")
done
if [ "${#files[@]}" -le 8 ]; then
  for f in "${files[@]}"; do cp "$round/$f" "$out/"; done
else  # the tool returns at most 8 files: the summary, and the rest in one archive
  cp "$round/summary.txt" "$out/"
  tar czf "$out/round.tar.gz" -C "$round" "${files[@]}"
fi
echo
for f in apps.txt profile.txt profile-chunked.txt; do
  [ -f "$round/$f" ] && { echo "== $f"; cat "$round/$f"; echo; }
done
cat "$round/summary.txt"
