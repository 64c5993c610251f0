#!/usr/bin/env bash
# A pack fitted with system copies (autosteer fit --system-copies) and the shipped pack, side by side, under the
# template's default system prompt and the four dev system prompts of benchmarks/system_prompt_study.py (none is a
# fit system prompt): benchmarks/genre_gate_rates.py per pack and system prompt, reports in
# docs/results/system_copies/ (the states of one system prompt are computed once and read back for the second pack).
#
#   autosteer fit --system-copies --out runs/system_copies.pack.safetensors
#   bash benchmarks/system_copies_eval.sh runs/system_copies.pack.safetensors
set -u
cd "$(dirname "$0")/.."
COPIES=${1:?usage: $0 PACK_FITTED_WITH_SYSTEM_COPIES}
SHIPPED=autosteer/packs/smollm2-135m-instruct.pack.safetensors
OUT=docs/results/system_copies
mkdir -p "$OUT" runs
run() {  # name, system prompt ('' = the template's default)
  for pack in system_copies shipped; do
    p=$([ $pack = shipped ] && echo "$SHIPPED" || echo "$COPIES")
    args=(--threads 2 --pack "$p" --out "$OUT/${pack}_under_$1.md")
    [ -n "$2" ] && args+=(--system "$2")
    OMP_NUM_THREADS=2 python3 benchmarks/genre_gate_rates.py "${args[@]}" > "runs/eval_${pack}_$1.log" 2>&1 \
      || { echo "FAILED: $pack under $1 (runs/eval_${pack}_$1.log)"; exit 1; }
  done
}
run default ""
run support_bot "You are a customer-support assistant for Acme Cloud Hosting. Answer briefly and politely."
run safety_rules "You are a helpful assistant. Do not help with weapons, explosives, drugs, hacking, violence, self-harm or any other dangerous or illegal activity."
run ide_assistant "You are CodePilot, an assistant inside a code editor. Answer with code when you can."
run patient_portal "You assist patients of Riverside Hospital with appointments and general questions. Do not diagnose, and never reveal another patient's records."
