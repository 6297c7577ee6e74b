#!/usr/bin/env bash
# The one GPU check: build the extension with CUDA, run the GPU tests, time the kernels and
# meta_step against torch eager and torch.compile, and print a table last. Meant for a GPU slot
# of a few minutes (torch 2.11 + CUDA, triton and nvcc present, no network):
#   bash bench/gpu/check.sh            (results also go to $OUT, or /tmp/datarater-gpu)
#   ONLY=scoring bash bench/gpu/check.sh   (a subset of ce,linear,meta,scoring)
# Rows print as they finish and the JSON is rewritten after each group, so a slot that runs
# out keeps what was measured.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/datarater-gpu}
mkdir -p "$out"
start=$(date +%s)
echo "== build"
MAX_JOBS=${MAX_JOBS:-16} python3 -m pip install --no-build-isolation --no-deps -q -e . 2>&1 | tail -5
python3 -c "import datarater._C as c, torch; print('extension with CUDA:', c.with_cuda, '| torch', torch.__version__, '|', torch.cuda.get_device_name())" || exit 1
echo "== build took $(( $(date +%s) - start )) s"
echo "== GPU tests"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_forward_over_reverse.py 2>&1 | tee "$out/tests.log" | tail -15
echo "== benchmarks"
python3 bench/gpu/bench_gpu.py --out "$out/gpu_results.json" ${ONLY:+--only "$ONLY"} 2>&1 | tee "$out/bench.log" | tail -40
echo "== total $(( $(date +%s) - start )) s"
