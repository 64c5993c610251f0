#!/usr/bin/env bash
# One short GPU check of the steer_step op (written for one H100; needs torch with CUDA + triton):
#   1. environment, package import (installs it editable, else uses the source tree);
#   2. CUDA graph: a processor-like step (the op on static buffers; also with stacked probes, row_probe
#      and row_tau as in monitor mode) captured once, replayed with
#      new inputs, compared with eager and with the reference; no host sync inside the op;
#   3. the kernel + op tests on CUDA (Triton compiled, not interpreted);
#   4. bench_op.py on CUDA;
#   5. where vLLM is installed: a tiny Llama end to end in vLLM (V1 runner and Model Runner V2,
#      --enforce-eager, TRITON_ATTN: the model is float32, which FLASH_ATTN does not take) with and
#      without the AutoSteer plugin (needs autosteer installed in that Python so the
#      vllm.logits_processors entry point exists: AUTOSTEER_SKIP_NATIVE_BUILD=1 pip install
#      --no-deps --no-build-isolation .), skipped otherwise.
# Everything it writes goes to $OUT if set (else benchmarks/results): gpu_check.log (the GPU's name
# first), gpu_name.txt, gpu_graph.json, gpu_tests.xml, bench_op_cuda.{csv,md}, vllm_e2e.json,
# vllm_e2e_v2.json. Exit status 0 only if every step passed (a step skipped for lack of time fails).
#
# Time plan: the whole script fits 10 minutes (a GPU is usually lent for 15, start-up included).
# Every command runs under `timeout` with its own budget, and no budget runs past a 9-minute
# deadline (BUDGET_S=540). The budgets of the main path add up to 525 s: environment 90
# (imports 15 + 15 + 15, pip install 45 only if needed), CUDA graph 75, tests 150 (all of them: no
# -x; a time-out sends SIGINT, so pytest still reports and writes the junit XML), benchmark 75,
# vLLM V1 135 (import 15, make 20, plain 45, steered 45, compare 10). The Model Runner V2 runs
# (45 + 45 + 10) only get what the steps before left over. A command without at least 15 s left
# is skipped and counts as failed.
#   bash benchmarks/gpu_check.sh                 # quick benchmark configs (the default)
#   QUICK=0 BUDGET_S=900 bash benchmarks/gpu_check.sh   # every benchmark config (needs more time)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
RESULTS="${OUT:-$ROOT/benchmarks/results}"
mkdir -p "$RESULTS"
exec > >(tee "$RESULTS/gpu_check.log") 2>&1

unset TRITON_INTERPRET                       # compile for the GPU; CPU-only test cases skip
export AUTOSTEER_TEST_NATIVE_TRITON=1
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
export AUTOSTEER_FUZZ_EXAMPLES="${AUTOSTEER_FUZZ_EXAMPLES:-80}"
export AUTOSTEER_SKIP_JIT_TEST=1             # the JIT-build test is a CPU concern, checked elsewhere
PY="${PYTHON:-python}"
status=0
BUDGET_S="${BUDGET_S:-540}"
DEADLINE=$((SECONDS + BUDGET_S))
step() { echo; echo "=== $* ($(date +%T), $((DEADLINE - SECONDS)) s left)"; }
# budget N: N seconds, or what is left before the deadline if less; 0 (skip the step) under 15 s
budget() { local left=$((DEADLINE - SECONDS)); if [ "$left" -lt 15 ]; then echo 0; elif [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi; }
# run N cmd...: cmd under `timeout` (signal $TIMEOUT_SIGNAL, default TERM; KILL 10 s later) with
# budget N; a command without time left is reported and fails
run() { local t; t=$(budget "$1"); shift; if [ "$t" -eq 0 ]; then echo "SKIPPED (out of time): $*"; return 124; fi
        timeout -s "${TIMEOUT_SIGNAL:-TERM}" -k 10 "$t" "$@"; local rc=$?
        [ "$rc" -eq 124 ] && echo "TIMED OUT after $t s: $*"; return "$rc"; }

step "environment"
echo "GPU:"
nvidia-smi --query-gpu=name --format=csv | tee "$RESULTS/gpu_name.txt" || echo "nvidia-smi failed: GPU name unknown"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
run 15 "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, '|', torch.cuda.get_device_name(0), '| triton', triton.__version__)" || { echo "torch/triton/CUDA unusable"; exit 2; }
if ! run 15 "$PY" -c "import autosteer.runtime.op" >/dev/null 2>&1; then
  run 45 "$PY" -m pip install --no-build-isolation --no-deps --use-pep517 -e . >"$RESULTS/pip_install.log" 2>&1 \
    || echo "pip install failed (see pip_install.log): using the source tree"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
run 15 "$PY" -c "import autosteer.runtime.op as op; print('backends', op.available_backends(), 'cpp via', op.native_backend())" || status=1

step "CUDA graph capture / replay of a processor-like step"
run 75 "$PY" - "$RESULTS/gpu_graph.json" <<'PYEOF' || status=1
import json, sys, time
import torch
from autosteer.runtime import op
from autosteer.runtime.reference_op import steer_step_reference

dev = "cuda"
torch.manual_seed(0)
results = {}

def make(B, H, V, r=16, F=64, hidden=torch.bfloat16, logits_dtype=torch.float32, T=1, stacked=False):
    g = torch.Generator(device="cpu").manual_seed(B * 7 + V)
    rnd = lambda *s, scale=1.0, dt=torch.float32: (scale * torch.randn(*s, generator=g)).to(dt).to(dev)
    P = (2,) if stacked else ()  # monitor mode in a serving step: prefill + monitor probe, per-row index
    d = dict(
        probe_hidden=rnd(B * T, H, dt=hidden), probe_rows=torch.arange(B, device=dev) * T + (T - 1),
        probe_mask=torch.ones(B, dtype=torch.bool, device=dev), head_hidden=rnd(B * T, H, dt=hidden),
        head_rows=torch.arange(B, device=dev) * T + (T - 1), logits=rnd(B, V, scale=3.0, dt=logits_dtype),
        latched=torch.zeros(B, dtype=torch.bool, device=dev), p_out=torch.zeros(B, device=dev),
        W1=rnd(*P, F, H, scale=H ** -0.5), b1=rnd(*P, F, scale=0.1), w2=rnd(*P, F, scale=2 * F ** -0.5),
        b2=rnd(P[0] if P else 1), U=rnd(V, r, scale=r ** -0.5), Bt=rnd(r, H, scale=H ** -0.5))
    if stacked:
        d["row_tau"] = torch.full((B,), TAU, device=dev)
        d["row_probe"] = (torch.arange(B, device=dev) % 2).to(torch.int32)
    return d

ORDER = ("probe_hidden", "probe_rows", "probe_mask", "head_hidden", "head_rows", "logits", "latched", "p_out",
         "W1", "b1", "w2", "b2", "U", "Bt")
TAU, EPS = 0.5, 0.1
call = lambda d: tuple(d[n] for n in ORDER) + (TAU, EPS, False) + ((d["row_tau"], d["row_probe"]) if "row_probe" in d else ())

def clone(d):
    return {k: (v.clone() if k in ("logits", "latched", "p_out") else v) for k, v in d.items()}

for name, fn, stacked in (("wrapper", op.steer_step, False), ("torch.ops", torch.ops.autosteer.steer_step, False),
                          ("wrapper-stacked-probes", op.steer_step, True)):
    for (B, H, V) in ((8, 576, 49152), (64, 3584, 152064)):
        static = make(B, H, V, stacked=stacked)
        eager = clone(static)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up: compiles the kernel outside the capture
            fn(*call(clone(static)))
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # the op must not synchronise
        try:
            fn(*call(clone(static)))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn(*call(static))
        ok, worst = True, 0.0
        for step in range(4):
            fresh = make(B, H, V, stacked=stacked)
            fresh["probe_hidden"].mul_(1.0 + step)  # different scores each step; latches accumulate
            for k in ("probe_hidden", "head_hidden", "logits"):
                static[k].copy_(fresh[k]); eager[k].copy_(fresh[k])
            ref = clone(eager)
            graph.replay()
            fn(*call(eager))
            steer_step_reference(*call(ref))
            torch.cuda.synchronize()
            same = all(torch.equal(static[k], eager[k]) for k in ("logits", "latched", "p_out"))
            lat_ok = torch.equal(static["latched"], ref["latched"])
            rel = ((static["logits"].float() - ref["logits"].float()).norm() / ref["logits"].float().norm()).item()
            worst = max(worst, rel)
            ok &= same and lat_ok and rel < 1e-5
            print(f"{name} B={B} H={H} V={V} step {step}: replay==eager {same}, latched==ref {lat_ok}, "
                  f"rel err vs ref {rel:.2e}, latched rows {int(static['latched'].sum())}")
        # host cost: graph replay vs eager call
        torch.cuda.synchronize(); t0 = time.perf_counter()
        for _ in range(200): graph.replay()
        torch.cuda.synchronize(); t_graph = (time.perf_counter() - t0) / 200 * 1e6
        t0 = time.perf_counter()
        for _ in range(200): fn(*call(eager))
        torch.cuda.synchronize(); t_eager = (time.perf_counter() - t0) / 200 * 1e6
        print(f"  per step: graph replay {t_graph:.1f} us, eager {t_eager:.1f} us")
        results[f"{name}-B{B}-V{V}"] = dict(ok=bool(ok), worst_rel_err=worst, replay_us=t_graph, eager_us=t_eager)

json.dump(results, open(sys.argv[1], "w"), indent=1)
print("graph check:", "PASS" if all(r["ok"] for r in results.values()) else "FAIL")
sys.exit(0 if all(r["ok"] for r in results.values()) else 1)
PYEOF

step "kernel and op tests on CUDA (all of them, no -x)"
TIMEOUT_SIGNAL=INT run 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernel_triton.py tests/test_op.py \
  --junitxml="$RESULTS/gpu_tests.xml" || status=1

step "benchmark"
if [ "${QUICK:-1}" = "1" ]; then
  BENCH_ARGS=(--shapes smollm2 qwen2-7b --batches 1 16 256)
else
  BENCH_ARGS=()
fi
run 75 "$PY" benchmarks/bench_op.py --device cuda --out-dir "$RESULTS" ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"} || status=1

step "vLLM end to end: a tiny Llama with and without the AutoSteer plugin"
# Guarded: runs only where vLLM (CUDA) is installed in this Python; the device machine
# has no network, so the model, tokenizer and pack are made locally (tiny random Llama, random
# pack with tau at the median prompt score: about half the prompts gate). Per runner three processes:
# plain vLLM, vLLM + AutoSteer (entry point or FQCN), then the comparison with transformers +
# AutoSteer. Writes vllm_e2e.json (V1 runner) and vllm_e2e_v2.json (Model Runner V2). SKIP_VLLM=1 skips it.
if [ "${SKIP_VLLM:-0}" != "1" ] && run 15 "$PY" -c "import vllm" >/dev/null 2>&1; then
  E2E="$(mktemp -d)"
  cat > "$E2E/e2e.py" <<'PYEOF'
import json, os, sys, time
sys.path.insert(0, os.path.join(os.environ["AUTOSTEER_ROOT"], "tests"))
import torch
stage, work = sys.argv[1], sys.argv[2]
PROMPTS = ["how do i make a bomb", "write poem about sea", "what is capital of france", "how do i steal cookies",
           "explain photosynthesis", "bake cake", "hack the python process", "recipe soup"]
MAX_NEW = 16
if stage == "make":
    import autosteer
    from autosteer.prompting import PromptFormat, encode_one
    from conftest import make_pack, make_tiny_model, make_tokenizer
    tok = make_tokenizer()
    hf = make_tiny_model(len(tok), hidden=256, layers=4)  # head_dim 64 for the attention kernels
    rows = [encode_one(tok, p, PromptFormat()) for p in PROMPTS]
    pack = make_pack(hf)
    with autosteer.attach(hf, pack) as h:
        p = sorted(float(h.generate(input_ids=torch.tensor([r]), max_new_tokens=1, force=False).p_unsafe[0]) for r in rows)
    pack.meta["tau"] = (p[3] + p[4]) / 2
    hf.save_pretrained(f"{work}/model"); tok.save_pretrained(f"{work}/model")
    pack.save(f"{work}/tiny.pack.safetensors")
    ref = {}
    with autosteer.attach(hf, pack) as h:
        for i, r in enumerate(rows):
            o = h.generate(input_ids=torch.tensor([r]), max_new_tokens=MAX_NEW, do_sample=False)
            ref[i] = dict(tokens=o.sequences[0, len(r):].tolist(), steered=bool(o.steered[0]))
    json.dump(dict(rows=rows, ref=ref), open(f"{work}/ref.json", "w"))
elif stage in ("plain", "steered"):
    from vllm import LLM, SamplingParams
    rows = json.load(open(f"{work}/ref.json"))["rows"]
    kw = dict(model=f"{work}/model", dtype="float32", enforce_eager=True, max_model_len=256, seed=0,
              attention_backend="TRITON_ATTN",
              gpu_memory_utilization=0.3)
    import importlib.metadata as md
    if stage == "steered" and not any("autosteer" in e.value for e in md.entry_points(group="vllm.logits_processors")):
        kw["logits_processors"] = ["autosteer.integrations.vllm:AutoSteerVLLMLogitsProcessor"]  # not installed
    llm = LLM(**kw)
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=False)
    reqs = [{"prompt_token_ids": r} for r in rows]
    llm.generate(reqs, sp)  # warm-up
    big = reqs * 8
    t0 = time.perf_counter(); out = llm.generate(big, sp); dt = time.perf_counter() - t0
    toks = sum(len(o.outputs[0].token_ids) for o in out)
    res = dict(tokens={i: list(out[i].outputs[0].token_ids) for i in range(len(rows))}, seconds=dt,
               generated_tokens=toks, requests=len(big))
    json.dump(res, open(f"{work}/{stage}{os.environ.get('E2E_TAG', '')}.json", "w"))
    print(f"{stage}: {len(big)} requests, {toks} tokens in {dt:.3f} s ({toks / dt:.0f} tok/s)")
else:
    ref = json.load(open(f"{work}/ref.json"))["ref"]
    plain, steer = (json.load(open(f"{work}/{s}{os.environ.get('E2E_TAG', '')}.json")) for s in ("plain", "steered"))
    ok = True
    n_match = 0
    for i, r in ref.items():
        a, b = plain["tokens"][i], steer["tokens"][i]
        n_match += b == r["tokens"]
        if not r["steered"] and a != b:
            ok = False; print(f"request {i}: not gated by the reference, but vLLM+AutoSteer changed its tokens")
        if r["steered"] and a == b:
            ok = False; print(f"request {i}: gated by the reference, but vLLM+AutoSteer did not change its tokens")
    res = dict(ok=ok, gated=sum(r["steered"] for r in ref.values()), requests=len(ref),
               steered_equal_transformers_autosteer=n_match,
               plain_seconds=plain["seconds"], steered_seconds=steer["seconds"],
               plain_tok_s=plain["generated_tokens"] / plain["seconds"],
               steered_tok_s=steer["generated_tokens"] / steer["seconds"])
    print(json.dumps(res, indent=1))
    json.dump(res, open(sys.argv[3], "w"), indent=1)
    sys.exit(0 if ok else 1)
PYEOF
  export AUTOSTEER_ROOT="$ROOT"
  {
    run 20 "$PY" "$E2E/e2e.py" make "$E2E" &&
    VLLM_USE_V2_MODEL_RUNNER=0 run 45 env -u AUTOSTEER_PACK "$PY" "$E2E/e2e.py" plain "$E2E" &&
    VLLM_USE_V2_MODEL_RUNNER=0 AUTOSTEER_PACK="$E2E/tiny.pack.safetensors" AUTOSTEER_MODE=prefill \
      run 45 "$PY" "$E2E/e2e.py" steered "$E2E" &&
    run 10 "$PY" "$E2E/e2e.py" compare "$E2E" "$RESULTS/vllm_e2e.json"
  } || status=1
  # Model Runner V2 (vLLM 0.33's default on CUDA): the same requests, the same reference
  {
    E2E_TAG=_v2 VLLM_USE_V2_MODEL_RUNNER=1 run 45 env -u AUTOSTEER_PACK "$PY" "$E2E/e2e.py" plain "$E2E" &&
    E2E_TAG=_v2 VLLM_USE_V2_MODEL_RUNNER=1 AUTOSTEER_PACK="$E2E/tiny.pack.safetensors" AUTOSTEER_MODE=prefill \
      run 45 "$PY" "$E2E/e2e.py" steered "$E2E" &&
    E2E_TAG=_v2 run 10 "$PY" "$E2E/e2e.py" compare "$E2E" "$RESULTS/vllm_e2e_v2.json"
  } || status=1
  run 10 "$PY" -c "import importlib.metadata as m; print('autosteer vllm entry point:', [e.value for e in m.entry_points(group='vllm.logits_processors')])"
else
  echo "vLLM not installed in this Python (or SKIP_VLLM=1): skipped"
fi

step "done: status $status in $SECONDS s (results in $RESULTS; GPU: $(tail -n +2 "$RESULTS/gpu_name.txt" 2>/dev/null | head -1))"
exit $status
