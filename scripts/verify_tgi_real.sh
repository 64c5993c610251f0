#!/usr/bin/env bash
# Verify autosteer's TGI integration against TGI's real server code, on CPU (no GPU, no TGI install).
#
#   scripts/verify_tgi_real.sh /path/to/text-generation-inference [venv dir, default /tmp/tgi-venv]
#
# The TGI checkout is not modified except for the protobuf modules generated into
# server/text_generation_server/pb (as TGI's own `make gen-server` does; git-ignored there).
# Nothing from TGI is copied into this repository. Steps:
#   1. a throwaway venv with CPU torch 2.13.0, transformers 4.51.3, grpcio-tools and the few
#      packages TGI's modules import at load time (this repo is put on PYTHONPATH, not installed);
#   2. TGI's protobuf stubs from proto/v3/generate.proto with grpc_tools (TGI's Makefile recipe);
#   3. scripts/verify_tgi_real.py, which stubs the modules that need CUDA or optional extras
#      (peft, outlines, hf_transfer, compressed_tensors, accelerate, kernels and
#      text_generation_server.layers.attention) with empty import stand-ins and runs the scenarios.
set -euo pipefail
TGI=${1:?usage: $0 /path/to/text-generation-inference [venv]}
VENV=${2:-/tmp/tgi-venv}
REPO=$(cd "$(dirname "$0")/.." && pwd)
TGI=$(cd "$TGI" && pwd)
[ -d "$TGI/server/text_generation_server" ] && [ -f "$TGI/proto/v3/generate.proto" ] || {
  echo "$TGI does not look like a text-generation-inference checkout (server/, proto/v3/)" >&2; exit 2; }
echo "TGI checkout: $TGI ($(git -C "$TGI" rev-parse --short HEAD 2>/dev/null || echo 'not a git work tree'))"

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# torch pinned exactly: a looser pin can pull a multi-GB CUDA build
"$VENV/bin/pip" install -q torch==2.13.0 transformers==4.51.3 triton==3.9.0 pytest \
  grpcio-tools protobuf grpcio grpcio-status grpcio-reflection grpc-interceptor loguru einops typer 'click<8.2.0' \
  safetensors sentencepiece numpy scipy pillow prometheus-client py-cpuinfo rich \
  opentelemetry-api opentelemetry-exporter-otlp opentelemetry-instrumentation-grpc

PB="$TGI/server/text_generation_server/pb"
mkdir -p "$PB"
"$VENV/bin/python" -m grpc_tools.protoc -I"$TGI/proto/v3" --python_out="$PB" --grpc_python_out="$PB" \
  "$TGI/proto/v3/generate.proto"
sed -i -e 's/^\(import.*pb2\)/from . \1/g' "$PB"/*.py
touch "$PB/__init__.py"

cd "$REPO"
ATTENTION=paged PREFIX_CACHING=0 REQUEST_LOGPROBS=1 \
PYTHONPATH="$TGI/server:$REPO:$REPO/tests" \
  "$VENV/bin/python" scripts/verify_tgi_real.py
