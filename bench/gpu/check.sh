#!/usr/bin/env bash
# The one GPU check: build the extension with CUDA, time the kernels, the scoring path and
# meta_step against torch eager, torch.compile and (where carried) Liger Kernel and Cut
# Cross-Entropy, run the GPU tests, and print last a table of the open goals against the best
# row for each (bench/gpu/summary.py, also saved as $OUT/summary.md).
# Meant for a GPU slot of a few minutes (torch 2.11 + CUDA, triton and nvcc present, no
# network):
#   bash bench/gpu/check.sh                  (results also go to $OUT, or /tmp/datarater-gpu)
#   FIRST=ce THEN=meta bash bench/gpu/check.sh   (benchmark groups before and after the tests,
#   in order, from ce, ce32k, sweep (CUDA fused), tsweep (Triton fused), linear, meta, scoring,
#   derivs (derivative modes, ours and the rivals'), attention (every pass against SDPA's flash
#   attention and jvp-flash-attention), scale (meta_step in fp32 and bf16 up to the 435M preset);
#   default FIRST=ce,scoring,meta THEN=attention,scale,linear,derivs,sweep,ce32k: what decides open goals
#   first; one slot with a fresh build rarely reaches the last groups)
# Every stage has its own time limit (BUILD_S; NEW_TESTS_S per new-kernel test file; CE_S,
# SCORING_S or GROUP_S per benchmark group; TESTS_S), cut to what is left of TOTAL_S so that
# the script ends in time: by default 470 s, inside the 8 minutes the kernel issue allows a
# run including the build (a 600 s device call can take TOTAL_S=560). Rows are saved as they
# finish ($OUT/gpu_<group>.json, and bench_<group>.log with a table at its end), so a slot
# that runs out keeps what was measured, and the summary reads whatever was saved.
# A failed CUDA build is reported and the rest runs on the Triton and torch backends.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
out=${OUT:-/tmp/datarater-gpu}
mkdir -p "$out"
start=$(date +%s)
total=${TOTAL_S:-470}  # the whole script ends by then
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
# the rival libraries (Liger Kernel, Cut Cross-Entropy, jvp-flash-attention), where their wheels
# were carried here
# (bench/gpu/fetch_rivals.sh); without them their rows say how to get them
if compgen -G "bench/gpu/wheels/*.whl" >/dev/null; then
    python3 -m pip install --no-deps --no-index bench/gpu/wheels/*.whl >>"$out/build.log" 2>&1 \
        && echo "rivals: $(cd bench/gpu/wheels && ls -- *.whl | tr '\n' ' ')" \
        || echo "!! the rival wheels did not install: see build.log"
fi
# one process per benchmark group, each with its own limit: a hang or a sticky CUDA error in
# one group (a kernel run for the first time) costs that group only
# (limits: CE_S 120, SCORING_S 240, SCALE_S 240, any other <GROUP>_S, else GROUP_S 150)
CE_S=${CE_S:-120}
SCORING_S=${SCORING_S:-240}
SCALE_S=${SCALE_S:-240}
groups() {
    local stage=$1 list=$2 g var
    for g in ${list//,/ }; do
        var="${g^^}_S"
        stamp "benchmarks ($stage): $g"
        timeout -k 10 "$(limit "${!var:-${GROUP_S:-150}}")" python3 bench/gpu/bench_gpu.py \
            --out "$out/gpu_$g.json" --only "$g" 2>&1 | tee "$out/bench_$g.log" | grep -v "^row:"
    done
}
# the tests of what no GPU has run yet, each file in its own process
newtest() {
    local name=$1; shift
    timeout -k 10 "$(limit "${NEW_TESTS_S:-75}")" python3 -m pytest -v --tb=short \
        -p no:cacheprovider "$@" 2>&1 | tee "$out/tests_$name.log" | tail -4
}
groups first "${FIRST:-ce,scoring,meta}"
stamp "new-kernel tests"
newtest registers tests/test_gpu.py::test_gpu_fused_kernel_in_registers_matches_float64
newtest attention tests/test_attention_triton.py
newtest attention_training tests/test_attention.py -k gpu
newtest tangent tests/test_tangent_ops_triton.py
stamp "GPU tests"
timeout -k 10 "$(limit "${TESTS_S:-180}")" python3 -m pytest -v --tb=short -p no:cacheprovider \
    tests/test_gpu.py -k "not in_registers" tests/test_gpu_fast_scoring.py \
    tests/test_forward_over_reverse.py 2>&1 | tee "$out/tests.log" | tail -8
groups then "${THEN:-attention,scale,linear,derivs,sweep,ce32k}"
stamp "total"
python3 bench/gpu/summary.py "$out" | tee "$out/summary.md"
