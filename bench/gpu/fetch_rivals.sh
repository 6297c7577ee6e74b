#!/usr/bin/env bash
# Fetches the rival libraries the GPU benchmark compares with (Liger Kernel, Cut Cross-Entropy
# and jvp-flash-attention: pure-Python wheels with Triton kernels) into bench/gpu/wheels, for a GPU
# machine without a network: carry that folder there, and check.sh installs what it finds.
# The versions are the `rivals` extra's in pyproject.toml (with a network: pip install
# -e ".[rivals]").
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip download --no-deps --dest wheels "liger-kernel==0.8.5" "cut-cross-entropy==25.1.1" \
    "jvp-flash-attention==0.14.0"
