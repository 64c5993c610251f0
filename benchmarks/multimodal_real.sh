#!/usr/bin/env bash
# AutoSteer on a real multimodal model, where a machine has its weights on disk (none are reachable
# from the development machines: nothing here has been run on real multimodal weights yet).
#   bash benchmarks/multimodal_real.sh /models/llava-onevision-qwen2-0.5b-ov-hf   # or a Chameleon directory
# Steps: fit a pack (text fit data + generated cross-modal prompts), then eval on the text dev sets
# (LIMIT prompts each) and the generated cross-modal dev sets (PER_KIND per kind and class),
# unsteered vs AutoSteer. Writes to $OUT if set (else runs/multimodal_real): fit.log, the pack,
# eval/report.{md,json} and plots. Exit 2 when no weights are found (nothing was run).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${1:-${AUTOSTEER_MM_MODEL:-}}"
DEVICE="${DEVICE:-cuda}"
DTYPE="${DTYPE:-bfloat16}"
LIMIT="${LIMIT:-100}"
PER_KIND="${PER_KIND:-50}"
RESULTS="${OUT:-runs/multimodal_real}"
if [ -z "$MODEL" ] || [ ! -f "$MODEL/config.json" ]; then
  echo "no multimodal weights found (pass a model directory or set AUTOSTEER_MM_MODEL): nothing run"
  exit 2
fi
mkdir -p "$RESULTS"
PY="${PYTHON:-python}"
"$PY" -c "import autosteer" 2>/dev/null || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import json,sys; c=json.load(open(sys.argv[1])); print('model_type', c.get('model_type'))" "$MODEL/config.json"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
PACK="$RESULTS/$(basename "$MODEL").pack.safetensors"
echo "=== fit ($(date +%T))"
"$PY" -m autosteer fit --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" --out "$PACK" \
  2>&1 | tee "$RESULTS/fit.log"
echo "=== eval ($(date +%T))"
"$PY" -m autosteer eval --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" --pack "$PACK" --dev --limit "$LIMIT" \
  --cross-modal-dev "$PER_KIND" --settings unsteered,autosteer --out "$RESULTS/eval" 2>&1 | tee "$RESULTS/eval.log"
echo "=== done ($(date +%T)): $RESULTS/eval/report.md"
