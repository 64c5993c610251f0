#!/usr/bin/env bash
# Check autosteer's vLLM logits processor against the real classes of a pinned vLLM wheel, on CPU.
#
#   scripts/verify_vllm_real.sh [venv dir, default /tmp/vllm-venv]
#
# Never run this in the project's own environment: vLLM pulls a CUDA torch (several GB).
# Steps: a throwaway venv; the pinned vLLM wheel (imports on a CPU-only machine); autosteer
# installed from a copy of this checkout (so its `vllm.logits_processors` entry point is
# registered), without the C++ CPU kernel (AUTOSTEER_SKIP_NATIVE_BUILD=1: a quicker install; the
# CPU op then falls back to the PyTorch reference, and on a GPU the Triton kernels are used.
# csrc/ builds with -std=c++20 under torch >= 2.14, e.g. the torch 2.14 vLLM 0.33.0 pins);
# then scripts/verify_vllm_real.py.
set -euo pipefail
VLLM_VERSION=0.33.0
VENV=${1:-/tmp/vllm-venv}
REPO=$(cd "$(dirname "$0")/.." && pwd)
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q "vllm==$VLLM_VERSION" pytest
SRC=$(mktemp -d)
trap 'rm -rf "$SRC"' EXIT
(cd "$REPO" && cp -r autosteer csrc kernels setup.py pyproject.toml README.md "$SRC"/)
rm -f "$SRC"/autosteer/_C*.so
AUTOSTEER_SKIP_NATIVE_BUILD=1 "$VENV/bin/pip" install -q --no-deps --no-build-isolation --force-reinstall "$SRC"
cd "$REPO/tests"  # tests/ for the tiny model helpers; the installed autosteer is the one imported
AUTOSTEER_DISABLE_JIT_BUILD=1 PYTHONPATH="$REPO/tests" "$VENV/bin/python" "$REPO/scripts/verify_vllm_real.py"
