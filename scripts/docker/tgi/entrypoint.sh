#!/bin/bash
# Entrypoint of the AutoSteer TGI image (scripts/docker/tgi/Dockerfile). It does what TGI's own
# /tgi-entrypoint.sh does (ldconfig, activate /usr/src/.venv, exec the launcher) after checking
# that the server the launcher will start is AutoSteer's shim and that the configuration is one
# AutoSteer serves. Every failed check stops the container with a message: it never serves
# unsteered without saying so.
set -euo pipefail

die() {
  echo "autosteer-entrypoint: ERROR: $*" >&2
  echo "autosteer-entrypoint: refusing to start: this image would serve without AutoSteer." >&2
  exit 78  # EX_CONFIG
}

ldconfig 2>/dev/null || echo "autosteer-entrypoint: ldconfig failed (as in TGI's entrypoint, not fatal)" >&2

# the image's venv (AUTOSTEER_TGI_VENV only moves it for tests/test_docker_recipes.py)
VENV=${AUTOSTEER_TGI_VENV:-/usr/src/.venv}
# shellcheck disable=SC1091  # not in this repository
source "$VENV/bin/activate"

# 1. the pack
[ -n "${AUTOSTEER_PACK:-}" ] || die "AUTOSTEER_PACK is not set (mount a pack and pass -e AUTOSTEER_PACK=/packs/NAME.pack.safetensors)"
[ -r "$AUTOSTEER_PACK" ] || die "AUTOSTEER_PACK=$AUTOSTEER_PACK is not a readable file in the container (is the volume mounted?)"

# 2. the server the launcher will start: it runs `text-generation-server` from this PATH with this
#    environment (launcher/src/main.rs: env::vars_os(), Command::new("text-generation-server"))
server=$(command -v text-generation-server || true)
[ -n "$server" ] || die "no text-generation-server on PATH ($PATH)"
grep -q AUTOSTEER_TGI_SHIM "$server" 2>/dev/null \
  || die "the text-generation-server first on PATH is $server, not AutoSteer's shim (PATH=$PATH)"

# 3. one shard: AutoSteer does not support TGI's vocabulary-sharded lm_head. Without --num-shard the
#    launcher shards over every visible GPU; the image sets NUM_SHARD=1 and this refuses more.
shards=${NUM_SHARD:-1}
sharded=${SHARDED:-false}
prev=""
for arg in "$@"; do
  case "$prev" in
    --num-shard) shards=$arg ;;
    --sharded) sharded=$arg ;;
  esac
  case "$arg" in
    --num-shard=*) shards=${arg#*=} ;;
    --sharded=*) sharded=${arg#*=} ;;
  esac
  prev=$arg
done
[ "$shards" = 1 ] || die "--num-shard/NUM_SHARD is '$shards': AutoSteer's TGI integration serves one shard only (tensor parallelism shards lm_head over the vocabulary); use --num-shard 1, or vLLM for tensor parallelism"
[ "$sharded" = false ] || die "--sharded/SHARDED is '$sharded': AutoSteer's TGI integration serves one shard only; use --num-shard 1"

# 4. the shim's Python imports AutoSteer and reads the pack now (TGI itself is checked by the shard,
#    which patches it before loading weights, and stops the launcher if its internals do not match)
AUTOSTEER_SHIM="$server" python - <<'PY' || die "AutoSteer cannot load in the image's venv (see the error above)"
import os
from autosteer.integrations import tgi  # noqa: F401 - import errors surface here
from autosteer.method.pack import load_pack

pack = load_pack(os.environ["AUTOSTEER_PACK"])
print(f"autosteer-entrypoint: the launcher will start {os.environ['AUTOSTEER_SHIM']} (AutoSteer's shim), "
      f"pack {os.environ['AUTOSTEER_PACK']} (layer {pack.layer}), mode {os.environ.get('AUTOSTEER_MODE') or 'prefill'}, "
      f"tau {os.environ.get('AUTOSTEER_TAU') or 'the pack default'}", flush=True)
PY

exec text-generation-launcher "$@"
