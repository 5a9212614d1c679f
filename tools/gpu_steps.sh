# The step runner of the GPU machine's scripts (tools/gpu_kv.sh, tools/gpu_moe.sh), sourced by
# them from the repository root after they set OUT:
#
#   OUT=${OUT:-$PWD/gpu_x_out}; source tools/gpu_steps.sh; steps_begin "what this run is"
#   step NAME LIMIT_S LOG COMMAND...      run it under timeout, log to $OUT/LOG, one summary line
#   step_env [EXTRA_SHELL_COMMAND]       env.txt: GPU, driver, torch / triton / vLLM versions
#   say TEXT                             a line on stdout and in $OUT/SUMMARY.txt
#   tests_excerpt ERE N, bench_excerpt ERE N JSON WHAT    sections of the summary's second part
#
# Every step runs under `timeout` and `step` always returns 0, so one failing step does not stop
# the next; SUMMARY.txt gets one line per step: ok / FAILED (rc N) / TIMED OUT after LIMIT s /
# NO TEST RAN (a step named `tests` whose pytest collected nothing or skipped it all), seconds, log.
# Sets (keeping what the caller set) PY, PYTHONPATH and the vLLM environment of tools/gpu_env.sh.

PY=${PY:-/opt/torch/.venv/bin/python3}
export VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1
export PYTHONPATH=${PYTHONPATH:-/tmp/vsite:$PWD}
SUMMARY="$OUT/SUMMARY.txt"

say() { echo "$*" | tee -a "$SUMMARY"; }

# steps_begin TITLE: an empty $OUT/SUMMARY.txt whose first line is TITLE, the time and the commit.
steps_begin() {
    mkdir -p "$OUT"
    : > "$SUMMARY"
    say "$1, $(date -u +%FT%TZ), repo $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
}

# step NAME LIMIT_S LOG COMMAND...: run it under timeout, log to LOG, one summary line.
step() {
    local name=$1 limit=$2 log=$3
    shift 3
    local begin=$SECONDS
    echo "=== $name (limit ${limit}s): $*" | tee -a "$OUT/$log" >&2
    timeout -k 30 "$limit" "$@" >> "$OUT/$log" 2>&1
    local rc=$? took=$((SECONDS - begin))
    local what="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then what="TIMED OUT after ${limit}s (rc $rc)";
    elif [ "$rc" -eq 5 ] && [ "$name" = tests ]; then what="NO TEST RAN (pytest rc 5: all skipped, reason below)";
    elif [ "$rc" -ne 0 ]; then what="FAILED (rc $rc)"; fi
    say "$name: $what in ${took}s; log $log"
    return 0
}

# tests_excerpt ERE N: a section "--- GPU tests", the first N lines of tests.log matching ERE.
tests_excerpt() {
    echo
    echo "--- GPU tests (tests.log): outcome of each test"
    grep -E "$1" "$OUT/tests.log" 2>/dev/null | head -"$2"
}

# bench_excerpt ERE N JSON WHAT: a section "--- benchmark", the last N lines of bench.log matching
# ERE (traceback lines left out), and where $OUT/JSON is missing, the partial file (of WHAT) to read.
bench_excerpt() {
    echo
    echo "--- benchmark (bench.log): figures and goals"
    grep -E "$1" "$OUT/bench.log" 2>/dev/null | grep -v "^  File " | tail -"$2"
    [ -f "$OUT/$3" ] || echo "(no $3: see $3.partial.json for the $4 that finished)"
}

# step_env [EXTRA]: the `env` step (60 s): nvidia-smi, the versions, then EXTRA (a shell command line).
step_env() {
    step env 60 env.txt bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
  $PY -c 'import torch, triton, vllm; print(\"torch\", torch.__version__, \"triton\", triton.__version__, \"vllm\", vllm.__version__, \"cuda\", torch.cuda.is_available())'${1:+; $1}"
}
