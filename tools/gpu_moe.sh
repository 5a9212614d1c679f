#!/usr/bin/env bash
# Redundant experts in vLLM 0.26 CUDA (issue 24) on the GPU machine: the op check, the GPU tests,
# the real MoE graph fixture, then the benchmark on DeepSeek-V2-Lite (dummy weights). Every step
# runs under `timeout`, so one failing step does not stop the next (tools/gpu_steps.sh). About
# 20 minutes on an H100 (op check 2, tests 9-10: eight engine starts, fixture check under 1,
# benchmark 8-9). One lent-machine command may run 10 minutes, so split it there, e.g.
#
#   source tools/gpu_env.sh && SKIP_OPCHECK=1 SKIP_BENCH=1 TEST_ARGS="--deselect tests/gpu/vllm/test_slot_moe_cuda.py::test_float32_redundant_slots_and_rebalancing_give_the_tokens_of_passes_off" OUT=$OUT/a bash tools/gpu_moe.sh
#   source tools/gpu_env.sh && SKIP_OPCHECK=1 SKIP_BENCH=1 TEST_ARGS="-k float32" OUT=$OUT/b bash tools/gpu_moe.sh
#   source tools/gpu_env.sh && SKIP_OPCHECK=1 SKIP_TESTS=1 OUT=$OUT/c bash tools/gpu_moe.sh
#
# (2026-12-07 on the H100: the whole test file did not finish in 470 s.)
#
# Needs the vLLM bundle in /tmp/vsite (tools/gpu_env.sh sets PYTHONPATH and $PY, and makes the
# omni_passes vLLM plugin visible: a warm start from vLLM's compile cache needs it). Writes under
# $OUT (default ./gpu_moe_out):
#   SUMMARY.txt        one line per step (ok / FAILED / TIMED OUT, seconds, log file), then each
#                      step's figures: read this first
#   env.txt            GPU, driver, torch / triton / vLLM versions, vLLM general plugins seen
#   opcheck.log, opcheck/   one engine with vLLM's own MoE (tiny DeepSeek-V3, sm_90 dims): op_check.json
#                      (one MoE layer, vLLM's op vs the omni op, bit for bit, 0 and 2 redundant
#                      rows), dispatch_check.json (the Triton dispatch-and-count kernel vs the
#                      PyTorch path, and microseconds per layer call of each, eager and in a CUDA
#                      graph), facts.json (schemas, layer-name type), summary_none.json
#   tests.log, tests.xml    pytest -v tests/gpu/vllm/test_slot_moe_cuda.py (a line per test as it ends)
#   graphs/<engine>/piece_NNN.json   every graph vLLM gave the omni host (OMNI_PASSES_GRAPH_DUMP)
#   vllm026_cuda_moe_piece.json      the first of them holding vllm::moe_forward_shared: the real
#                      fixture; fixture.log: tests/unit/test_moe_forward_slots_pass.py run on it
#   bench.log, vllm_moe_cuda.json (.partial.json after every engine), vllm_moe_cuda.png
# Knobs (environment): OPCHECK_TIMEOUT (s, 300), TEST_TIMEOUT (s, 660), TEST_ARGS (extra pytest
# options, e.g. "-k 'not fdo'"), BENCH_BUDGET (s of engines, 480), BENCH_TIMEOUT (s, BENCH_BUDGET +
# 120), BENCH_ARGS (extra `bench vllm` options), SKIP_OPCHECK=1, SKIP_TESTS=1, SKIP_BENCH=1.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_moe_out}
OPCHECK_TIMEOUT=${OPCHECK_TIMEOUT:-300}
TEST_TIMEOUT=${TEST_TIMEOUT:-660}
BENCH_BUDGET=${BENCH_BUDGET:-480}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-$((BENCH_BUDGET + 120))}
# shellcheck source=tools/gpu_steps.sh
source tools/gpu_steps.sh
steps_begin "redundant experts on vLLM CUDA"
step_env "$PY -c 'from importlib.metadata import entry_points; print(\"vllm.general_plugins:\", [e.value for e in entry_points(group=\"vllm.general_plugins\")])'"

if [ "${SKIP_OPCHECK:-0}" != 1 ]; then
    step opcheck "$OPCHECK_TIMEOUT" opcheck.log "$PY" -m omni_passes.testing.vllm_cuda_dump --out "$OUT/opcheck" \
        --rewrite none --hang-dump "$((OPCHECK_TIMEOUT - 20))"
fi

if [ "${SKIP_TESTS:-0}" != 1 ]; then
    # shellcheck disable=SC2086  (TEST_ARGS is a list of options)
    OMNI_PASSES_GRAPH_DUMP="$OUT/graphs" step tests "$TEST_TIMEOUT" tests.log "$PY" -m pytest -v -rA -p no:cacheprovider \
        --junitxml="$OUT/tests.xml" tests/gpu/vllm/test_slot_moe_cuda.py ${TEST_ARGS:-}
fi

# The real fixture: the first graph holding vLLM's MoE op that the omni host was given (the
# identity engine of the tests), else the op check's dump; then the CPU unit test run on it here.
FIXTURE=""
for candidate in $(ls "$OUT"/graphs/identity/piece_*.json 2>/dev/null) "$OUT/opcheck/vllm026_cuda_moe_piece.json"; do
    if [ -f "$candidate" ] && grep -q "moe_forward_shared" "$candidate"; then FIXTURE=$candidate; break; fi
done
if [ -n "$FIXTURE" ]; then
    cp "$FIXTURE" "$OUT/vllm026_cuda_moe_piece.json"
    cp tests/fixtures/vllm026_cuda_moe_piece.json "$OUT/fixture_before.json"
    cp "$FIXTURE" tests/fixtures/vllm026_cuda_moe_piece.json
    step fixture 120 fixture.log "$PY" -m pytest -q -rA -p no:cacheprovider tests/unit/test_moe_forward_slots_pass.py
    cp "$OUT/fixture_before.json" tests/fixtures/vllm026_cuda_moe_piece.json
    say "fixture: $FIXTURE -> $OUT/vllm026_cuda_moe_piece.json (copy it over tests/fixtures/vllm026_cuda_moe_piece.json)"
else
    say "fixture: no dumped graph holds vllm::moe_forward_shared (see tests.log / opcheck.log)"
fi

if [ "${SKIP_BENCH:-0}" != 1 ]; then
    rm -rf /tmp/omni_moe_bench  # a fresh compile cache: the first starts are cold
    # shellcheck disable=SC2086  (BENCH_ARGS is a list of options)
    step bench "$BENCH_TIMEOUT" bench.log "$PY" -m omni_passes.cli bench vllm --device cuda \
        --moe-budget-s "$BENCH_BUDGET" --moe-work-dir /tmp/omni_moe_bench \
        --out "$OUT/vllm_moe_cuda.json" --plot "$OUT" ${BENCH_ARGS:-}
fi

{
    echo
    echo "--- op check (opcheck/summary_none.json): omni op vs vLLM's op, dispatch kernel vs PyTorch, us per layer call"
    cat "$OUT/opcheck/summary_none.json" 2>/dev/null || echo "(no summary: see opcheck.log)"
    tests_excerpt "::.* (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)|^(FAILED|ERROR) |[0-9]+ (passed|failed)|^E  " 90
    echo
    echo "--- fixture check (fixture.log)"
    grep -E "[0-9]+ (passed|failed)|^FAILED|^E  " "$OUT/fixture.log" 2>/dev/null | head -20
    bench_excerpt "^(vLLM CUDA|  |starting engine|engine |skipping|work dir)|GOAL|FAILED|Error|error:" 70 \
        vllm_moe_cuda.json engines
} >> "$SUMMARY"
cat "$SUMMARY"
