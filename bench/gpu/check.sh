#!/usr/bin/env bash
# The one GPU check: build the extension with CUDA, time the kernels, the scoring path and
# meta_step against torch eager and torch.compile, run the GPU tests, and print a table last.
# Meant for a GPU slot of a few minutes (torch 2.11 + CUDA, triton and nvcc present, no
# network):
#   bash bench/gpu/check.sh                  (results also go to $OUT, or /tmp/datarater-gpu)
#   FIRST=ce THEN=meta bash bench/gpu/check.sh   (benchmark groups before and after the tests,
#   in order, from ce, ce32k, sweep (CUDA fused), tsweep (Triton fused), linear, meta, scoring;
#   default FIRST=ce,scoring THEN=meta,linear,sweep,ce32k)
# Every stage has its own time limit (BUILD_S, FIRST_S, NEW_TESTS_S, TESTS_S, THEN_S), cut to
# what is left of TOTAL_S (560 s) so that the script ends inside one device call; rows print as
# they finish (in bench_*.log; the table at the end) and the JSON is rewritten after each group,
# so a slot that runs out keeps what was measured.
# A failed CUDA build is reported and the rest runs on the Triton and torch backends.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
out=${OUT:-/tmp/datarater-gpu}
mkdir -p "$out"
start=$(date +%s)
total=${TOTAL_S:-560}  # the whole script ends by then (a device call may last 600 s)
stamp() { echo "== $1 at $(( $(date +%s) - start )) s"; }
# limit N: N seconds, or what is left of the total if less (at least 1: timeout 0 never ends)
limit() {
    local left=$(( total - ($(date +%s) - start) ))
    (( left < 1 )) && left=1
    echo $(( left < $1 ? left : $1 ))
}
stamp "build"
MAX_JOBS=${MAX_JOBS:-16} timeout "$(limit "${BUILD_S:-240}")" python3 -m pip install --no-build-isolation \
    --no-deps -e . >"$out/build.log" 2>&1
grep -iE "error|warning: datarater" "$out/build.log" | head -20
python3 -c "import datarater._C as c, torch; print('extension with CUDA:', c.with_cuda, '| torch', torch.__version__, '|', torch.cuda.get_device_name())" \
    || echo "!! the extension did not build or load: see build.log; going on without it"
stamp "benchmarks (first)"
timeout -k 10 "$(limit "${FIRST_S:-300}")" python3 bench/gpu/bench_gpu.py \
    --out "$out/gpu_first.json" --only "${FIRST:-ce,scoring}" 2>&1 \
    | tee "$out/bench_first.log" | grep -v "^row:"
stamp "GPU tests"
# the kernels written since the last GPU run first, in their own process: a sticky CUDA error
# there must not fail every later test
timeout -k 10 "$(limit "${NEW_TESTS_S:-90}")" python3 -m pytest -v --tb=short -p no:cacheprovider \
    tests/test_gpu.py::test_gpu_fused_kernel_in_registers_matches_float64 \
    tests/test_attention_triton.py \
    tests/test_tangent_ops_triton.py 2>&1 | tee "$out/tests_new.log" | tail -8
timeout -k 10 "$(limit "${TESTS_S:-180}")" python3 -m pytest -v --tb=short -p no:cacheprovider \
    tests/test_gpu.py -k "not in_registers" tests/test_gpu_fast_scoring.py \
    tests/test_forward_over_reverse.py 2>&1 | tee "$out/tests.log" | tail -8
stamp "benchmarks (then)"
timeout -k 10 "$(limit "${THEN_S:-240}")" python3 bench/gpu/bench_gpu.py \
    --out "$out/gpu_then.json" --only "${THEN:-meta,linear,sweep,ce32k}" 2>&1 \
    | tee "$out/bench_then.log" | grep -v "^row:"
stamp "total"
