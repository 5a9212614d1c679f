#!/usr/bin/env bash
# Sink+recent KV in vLLM 0.26 CUDA (issue 25, items 1, 2 and 4) on the GPU machine: the prefill
# kernel against dense FA3, the GPU tests, then the dense-vs-compressed benchmark on
# DeepSeek-V2-Lite (dummy weights). About 10 minutes on an H100; every step runs under `timeout`, so one failing step does not stop the next
# (tools/gpu_steps.sh).
#
#   source tools/gpu_env.sh && OUT=/path/to/out bash tools/gpu_kv.sh
#
# Needs the vLLM bundle in /tmp/vsite (tools/gpu_env.sh sets PYTHONPATH and $PY). Writes under
# $OUT (default ./gpu_kv_out):
#   SUMMARY.txt          one line per step (ok / FAILED / TIMED OUT, seconds, log file), then the
#                        test results and the benchmark's figures and goals: read this first
#   env.txt              GPU, driver, torch / triton / vLLM versions
#   prefill.log, attn_prefill.json  `bench attn-prefill`: the sink+recent prefill kernel vs dense FA3
#   tests.log, tests.xml pytest tests/gpu/vllm/test_sink_recent_kv_cuda.py (-rA: every test's outcome)
#   bench.log            the benchmark's progress and figures (vLLM's own log included)
#   vllm_kv_cuda.json    the benchmark's results (vllm_kv_cuda.json.partial.json: after every stage)
#   vllm_kv_cuda.png     capacity, TPOT vs HBM floor, requests running in the long workload
# Knobs (environment): TEST_TIMEOUT (s, 270), BENCH_BUDGET (s of benchmark stages, 360),
# BENCH_TIMEOUT (s, BENCH_BUDGET + 120), BENCH_ARGS (extra `bench vllm` options, e.g.
# "--kv-stages capacity,tpot --kv-contexts 32768"), SKIP_PREFILL=1, SKIP_TESTS=1, SKIP_BENCH=1.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_kv_out}
TEST_TIMEOUT=${TEST_TIMEOUT:-270}
BENCH_BUDGET=${BENCH_BUDGET:-360}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-$((BENCH_BUDGET + 120))}
# shellcheck source=tools/gpu_steps.sh
source tools/gpu_steps.sh
steps_begin "sink+recent KV on vLLM CUDA"
step_env

if [ "${SKIP_PREFILL:-0}" != 1 ]; then
    step prefill 180 prefill.log "$PY" -m omni_passes.cli bench attn-prefill --out "$OUT/attn_prefill.json" \
        --tune num_warps=8 block_n=32 block_n=128,num_warps=8 num_stages=3
fi

if [ "${SKIP_TESTS:-0}" != 1 ]; then
    step tests "$TEST_TIMEOUT" tests.log "$PY" -m pytest -q -rA -p no:cacheprovider \
        --junitxml="$OUT/tests.xml" tests/gpu/vllm/test_sink_recent_kv_cuda.py
fi

if [ "${SKIP_BENCH:-0}" != 1 ]; then
    # shellcheck disable=SC2086  (BENCH_ARGS is a list of options)
    step bench "$BENCH_TIMEOUT" bench.log "$PY" -m omni_passes.cli bench vllm --device cuda \
        --kv-budget-s "$BENCH_BUDGET" --kv-work-dir /tmp/omni_kv_bench \
        --out "$OUT/vllm_kv_cuda.json" --plot "$OUT" ${BENCH_ARGS:-}
fi

{
    [ -f "$OUT/prefill.log" ] && { echo "--- prefill kernel"; grep -E "^(#|H[0-9])" "$OUT/prefill.log" | tail -8; }
    tests_excerpt "^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) |[0-9]+ (passed|failed)|^E  " 60
    bench_excerpt "^(vLLM CUDA|  |starting engine|engine |gpu_memory_utilization|time budget)|GOAL|FAILED|Error|error:" \
        60 vllm_kv_cuda.json stages
} >> "$SUMMARY"
cat "$SUMMARY"
