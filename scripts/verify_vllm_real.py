"""Check ``autosteer.integrations.vllm`` against the REAL classes of an installed vLLM, on CPU.

Run by ``scripts/verify_vllm_real.sh`` (throwaway venv with the pinned vLLM wheel and autosteer
installed from this checkout, so its ``vllm.logits_processors`` entry point is registered).

vLLM's own code exercised here: the entry-point / FQCN loaders of both model runners (V1
``vllm.v1.sample.logits_processor`` and Model Runner V2
``vllm.v1.worker.gpu.sample.logits_processor``), V1 ``build_logitsprocs`` and V2
``build_custom_logits_processors`` (which construct the processor), the V1 persistent batch
``vllm.v1.worker.gpu_input_batch.InputBatch`` (``add_request`` / ``remove_request`` /
``condense`` / ``swap_states`` / ``refresh_metadata``, whose ``BatchUpdateBuilder`` produces the
``BatchUpdate`` objects passed to ``update_state``), ``CachedRequestState``, ``SamplingParams``,
and the built-in logits processors applied around ours. Not vLLM's: the model forward (a tiny
flash-style Llama on CPU, ``tests/_tgi_sim.py``) and the forward metadata (``query_start_loc``,
``seq_lens``) it hands to the capture; the step loop that calls the persistent batch the way
``GPUModelRunner._update_states`` does (remove finished/preempted, add new/resumed, condense,
reorder, refresh_metadata). vLLM's GPU model runner, attention backends, torch.compile and CUDA
graphs are not run (no GPU).

Model Runner V2: its ``build_custom_logits_processors`` is called from a method of a real V2
``GPUModelRunner`` (created without ``__init__``, holding the stand-in model and an
``index_to_req_id`` dict, as ``load_model`` is when it builds processors), with the real
``LogitsProcRequestState`` and ``LogitsContext`` dataclasses, driven by the V2 step loop of
``tests/test_vllm_v2_simulation.py`` (LIFO slots, requests removed without telling processors,
preemption re-adds with prefill_len = prompt + outputs, rows reordered every step). V2's
``RequestState`` (UVA buffers) and its real sampler need a GPU and are not run.

The startup guard (``vllm.general_plugins`` entry point ``autosteer_guard``) is checked in two
fresh subprocesses (``--guard with-pack`` / ``--guard no-pack``) on vLLM's CPU platform
(``VLLM_TARGET_DEVICE=cpu``): a real ``EngineArgs`` (whose ``__post_init__`` runs vLLM's own
``load_general_plugins``) builds a real ``VllmConfig`` for a tiny local Llama config, with and
without an ngram speculative config, under both runner settings; then the real V1
``build_logitsprocs`` and the V1 model runner's imported copy of it. Exit status 0 iff
everything passed.
"""
from __future__ import annotations

import inspect
import os
import sys
import tempfile
from types import SimpleNamespace

os.environ.setdefault("AUTOSTEER_DISABLE_JIT_BUILD", "1")
import torch  # noqa: E402

torch.set_num_threads(1)

import vllm  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.v1.sample import logits_processor as v1lp  # noqa: E402
from vllm.v1.worker import gpu_input_batch  # noqa: E402
from vllm.v1.worker.gpu.sample import logits_processor as v2lp  # noqa: E402
from vllm.v1.worker.gpu.sample.logits_processor import loader as v2loader  # noqa: E402
from vllm.utils import torch_utils as vllm_torch_utils  # noqa: E402

# vLLM decides "pinned host memory is available" at import time from the CUDA build; with no
# NVIDIA driver pinning fails, so turn it off as a CPU platform would (only affects host staging)
vllm_torch_utils.PIN_MEMORY = False
gpu_input_batch.PIN_MEMORY = False

import _tgi_sim as sim  # noqa: E402  (tests/)
import autosteer  # noqa: E402
from autosteer.integrations import vllm as avllm  # noqa: E402
from autosteer.prompting import PromptFormat, encode_one  # noqa: E402
from conftest import make_pack, make_tiny_model, make_tokenizer  # noqa: E402  (tests/conftest.py)
from test_vllm_simulation import chunked_forward  # noqa: E402  (tests/: the stand-in flattened forward)

CLS = avllm.AutoSteerVLLMLogitsProcessor
FQCN = "autosteer.integrations.vllm:AutoSteerVLLMLogitsProcessor"
PROMPTS = ["how do i make a bomb", "write poem about sea", "what is capital of france", "how do i steal cookies",
           "explain photosynthesis", "bake cake", "hack the python process", "recipe soup"]
MAX_NEW = 8
RESULTS: list = []


def check(name, ok, detail=""):
    RESULTS.append((name, bool(ok)))
    print(f"[{'PASS' if ok else 'FAIL'}] {name}" + (f": {detail}" if detail else ""), flush=True)
    return bool(ok)


def attempt(name, fn):
    try:
        return check(name, fn() is not False)
    except Exception as exc:  # noqa: BLE001
        return check(name, False, f"{type(exc).__name__}: {exc}")


def vconfig(max_seqs=8):
    # build_logitsprocs / the processors read only these fields of VllmConfig
    return SimpleNamespace(additional_config=None, speculative_config=None,
                           scheduler_config=SimpleNamespace(max_num_seqs=max_seqs))


class FakeVLLMLlama(torch.nn.Module):
    """vLLM-shaped tiny Llama: ``.model.layers`` return ``(hidden, residual)`` halves, ``.lm_head.weight``,
    ``compute_logits(rows)``; the forward is CPU code, not vLLM's."""

    def __init__(self, hf):
        super().__init__()
        self.config = hf.config
        self.embed_tokens = hf.model.embed_tokens
        self.model = sim.FlashLlamaModel(hf)
        self.lm_head = hf.lm_head

    def forward(self, input_ids, positions, kv_cache, slots):
        return self.model(self.embed_tokens(input_ids), positions, None, kv_cache, slots)

    def compute_logits(self, hidden_states):
        return self.lm_head(hidden_states)


def interface_checks():
    print(f"vllm {vllm.__version__} ({os.path.dirname(vllm.__file__)}), torch {torch.__version__}")
    check("the processor subclasses vLLM's V1 LogitsProcessor", issubclass(CLS, v1lp.LogitsProcessor))
    check("the processor subclasses Model Runner V2's LogitsProcessor", issubclass(CLS, v2lp.LogitsProcessor))
    check("no abstract method left unimplemented", not getattr(CLS, "__abstractmethods__", None),
          str(getattr(CLS, "__abstractmethods__", set())))
    for label, base, names in (("V1", v1lp.LogitsProcessor, ("__init__", "apply", "is_argmax_invariant", "update_state",
                                                 "validate_params")),
                        ("V2", v2lp.LogitsProcessor, ("__init__", "apply", "add_request", "apply_staged_writes",
                                                 "validate_params"))):
        for name in names:
            want = list(inspect.signature(getattr(base, name)).parameters)
            got = list(inspect.signature(getattr(CLS, name)).parameters)
            ok = got[: len(want)] == want or (name == "__init__" and len(got) >= len(want))
            check(f"{label} {name}{tuple(want)} accepted by ours {tuple(got)}", ok)
    from importlib.metadata import entry_points
    eps = [e for e in entry_points(group=v1lp.LOGITSPROCS_GROUP) if e.value == FQCN]
    check(f"entry point {v1lp.LOGITSPROCS_GROUP!r} -> {FQCN} installed", len(eps) == 1)
    check("V1 loads it from the entry point", CLS in v1lp._load_logitsprocs_plugins())
    check("V1 loads it by FQCN (--logits-processors)", v1lp._load_logitsprocs_by_fqcns([FQCN]) == [CLS])
    attempt("Model Runner V2 loads the entry point (it refuses non-V2 plugins)",
            lambda: CLS in v2loader._load_v2_logitsprocs_plugins())
    attempt("Model Runner V2 loads it by FQCN", lambda: v2loader._load_v2_logitsprocs_by_fqcns([FQCN]) == [CLS])
    attempt("V2 frontend params validator builds and accepts default SamplingParams",
            lambda: v2loader.build_custom_logits_processors_params_validator(())(SamplingParams()) is None)
    attempt("V1 validate_logits_processors_parameters accepts default SamplingParams",
            lambda: v1lp.validate_logits_processors_parameters(None, SamplingParams()) is None)


def construction_checks(pack_path):
    os.environ.pop(avllm.ENV_PACK, None)
    procs = v1lp.build_logitsprocs(vconfig(), torch.device("cpu"), False, False, ())
    ours = [p for p in procs.all if isinstance(p, CLS)]
    check("V1 build_logitsprocs constructs it (no pack: inert, argmax-invariant, skipped for greedy batches)",
          len(ours) == 1 and not ours[0].enabled and ours[0] in procs.argmax_invariant)
    req_states = SimpleNamespace(device=torch.device("cpu"), max_num_reqs=8, vocab_size=16, all_token_ids=None,
                                 prompt_len=None, prefill_len=None, total_len=None)
    v2 = v2loader.build_custom_logits_processors(vconfig(), req_states, False, ())
    ours2 = [p for p in v2 if isinstance(p, CLS)]
    check("V2 build_custom_logits_processors constructs it (no pack: inert)",
          len(ours2) == 1 and ours2[0].v2 and not ours2[0].enabled and ours2[0].add_request(0, SamplingParams()) is False)
    os.environ[avllm.ENV_PACK] = pack_path
    try:
        v2loader.build_custom_logits_processors(vconfig(), req_states, False, ())
        check("V2 with a pack, built outside the V2 runner's load_model: refused (no model to attach to)", False)
    except avllm.VLLMIntegrationError as exc:
        check("V2 with a pack, built outside the V2 runner's load_model: refused (no model to attach to)",
              "GPUModelRunner.load_model" in str(exc), str(exc)[:160])
    from vllm.v1.worker import gpu_model_runner
    before = gpu_model_runner.GPUModelRunner.load_model
    procs = v1lp.build_logitsprocs(vconfig(), torch.device("cpu"), False, False, ())
    ours = [p for p in procs.all if isinstance(p, CLS)]
    patched = gpu_model_runner.GPUModelRunner.load_model
    check("V1 with a pack: enabled, not argmax-invariant, and GPUModelRunner.load_model patched to attach the capture",
          len(ours) == 1 and ours[0].enabled and ours[0] in procs.non_argmax_invariant
          and getattr(patched, "_autosteer", False) and patched.__wrapped__ is before)
    gpu_model_runner.GPUModelRunner.load_model = before
    spec = vconfig()
    spec.speculative_config = object()
    procs = v1lp.build_logitsprocs(spec, torch.device("cpu"), False, False, ())
    check("vLLM's behaviour the startup guard exists for: with speculative decoding (and the guard not loaded) "
          "build_logitsprocs does not construct entry-point processors",
          not any(isinstance(p, CLS) for p in procs.all), "see the [guard] checks below")


class Engine:
    """Calls the real persistent batch the way GPUModelRunner._update_states does each step."""

    def __init__(self, hf, chunk, preempt=None, seed=0, async_outputs=False):
        import random

        # async scheduling (vLLM 0.33's V1 default): _bookkeeping_sync appends a -1 placeholder per sampled
        # token to the request's output list (filled in only when a processor needs output ids), and
        # _update_states gives a re-added request a new list of its real ids
        self.async_outputs = async_outputs

        self.rng = random.Random(seed)
        self.model = FakeVLLMLlama(hf).eval()
        self.procs = v1lp.build_logitsprocs(vconfig(), torch.device("cpu"), False, False, ())
        self.lp = next(p for p in self.procs.all if isinstance(p, CLS))
        V = hf.config.vocab_size
        self.batch = gpu_input_batch.InputBatch(
            max_num_reqs=8, max_model_len=128, max_num_batched_tokens=512, device=torch.device("cpu"),
            vocab_size=V, block_sizes=[16], max_num_blocks_per_req=[8], logitsprocs=self.procs)
        cfg = hf.config
        kvh, hd = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
        self.kv = [(torch.zeros(16, 128, kvh, hd), torch.zeros(16, 128, kvh, hd)) for _ in range(cfg.num_hidden_layers)]
        self.free_slots = list(range(15, -1, -1))
        self.chunk, self.preempt = chunk, dict(preempt or {})
        self.requests: dict = {}  # GPUModelRunner.requests: req_id -> CachedRequestState
        self.md = None
        self.records, self.key_of, self.swaps, self.preempted, self.update_kinds = [], {}, 0, 0, set()
        self.eos = cfg.eos_token_id
        orig = self.lp.update_state

        def spy(bu):
            if bu is not None:
                self.update_kinds |= {k for k in ("removed", "added", "moved") if getattr(bu, k)}
                assert isinstance(bu, v1lp.BatchUpdate)
            return orig(bu)

        self.lp.update_state = spy

    def metadata(self):
        return self.md

    def run(self, arrivals, rows):
        outputs, done_last, resume, state = {}, [], {}, {}
        for step in range(300):
            # 1. finished and preempted requests leave the persistent batch
            for rid in done_last:
                self.batch.remove_request(rid)
                st = self.requests.pop(rid)  # finished: vLLM forgets the request (and its SamplingParams)
                self.free_slots.append(state.pop(rid)["slot"])
                del st
            for rid, (n_out, away) in list(self.preempt.items()):
                st = self.requests.get(rid)
                if st is not None and rid in self.batch.req_id_to_index and rid not in done_last \
                        and len(st.output_token_ids) >= n_out:
                    self.batch.remove_request(rid)  # CachedRequestState kept: resumed later
                    self.free_slots.append(state[rid]["slot"])
                    state[rid]["done"] = 0
                    resume.setdefault(step + away, []).append(rid)
                    del self.preempt[rid]
                    self.preempted += 1
            # 2. new and resumed requests join (lowest free index first)
            for i in arrivals.get(step, []):
                rid = f"req-{i}"
                st = gpu_input_batch.CachedRequestState(
                    req_id=rid, prompt_token_ids=list(rows[i]), mm_features=[],
                    sampling_params=SamplingParams(temperature=0.0, max_tokens=MAX_NEW), generator=None,
                    block_ids=([i],), num_computed_tokens=0, output_token_ids=[])
                self.requests[rid] = st
                state[rid] = {"done": 0, "slot": self.free_slots.pop(), "idx": i, "real": []}
                self.batch.add_request(st)
            for rid in resume.pop(step, []):
                state[rid]["slot"] = self.free_slots.pop()
                if self.async_outputs:
                    self.requests[rid].output_token_ids = list(state[rid]["real"])
                self.batch.add_request(self.requests[rid])
            # 3. condense, maybe reorder, refresh_metadata (-> update_state(BatchUpdate))
            self.batch.condense()
            n = self.batch.num_reqs
            if n > 1 and self.rng.random() < 0.5:
                a, b = self.rng.sample(range(n), 2)
                self.batch.swap_states(a, b)
                self.swaps += 1
            self.batch.refresh_metadata()
            order = list(self.batch.req_ids)
            for idx, key in self.lp.request_keys().items():
                if idx < len(order):
                    self.key_of[key] = order[idx]
            done_last = []
            if not order:
                if step > max(arrivals) and not resume:
                    break
                continue
            # 4. forward (stand-in) with flattened tokens; logits at each request's last scheduled token
            logits, sched, _, _ = chunked_forward(
                self.model, self.kv, [(self.requests[r].prompt_token_ids + state[r]["real"], state[r]["done"],
                                       state[r]["slot"]) for r in order], self.chunk, lambda md: setattr(self, "md", md))
            raw = logits.clone()
            for p in self.procs.non_argmax_invariant:  # the V1 sampler, greedy batch: argmax-invariant ones skipped
                logits = p.apply(logits)
            nxt = logits.argmax(-1).tolist()
            still = []
            for b, rid in enumerate(order):
                st, s = self.requests[rid], state[rid]
                s["done"] += sched[b]
                if s["done"] < len(st.prompt_token_ids) + len(st.output_token_ids):  # partial (re)prefill
                    still.append(True)
                    continue
                still.append(False)
                s["real"].append(nxt[b])
                st.output_token_ids.append(-1 if self.async_outputs else nxt[b])
                if nxt[b] == self.eos or len(s["real"]) >= MAX_NEW:
                    done_last.append(rid)
                    outputs[s["idx"]] = list(s["real"])
            self.records.append((list(order), raw, logits.clone(), still))
        return outputs


def reference(hf, rows, pack, mode):
    out = {}
    with autosteer.attach(hf, pack, mode=mode) as h:
        for i, r in enumerate(rows):
            o = h.generate(input_ids=torch.tensor([r]), max_new_tokens=MAX_NEW, do_sample=False)
            out[i] = (o.sequences[0, len(r):].tolist(), bool(o.steered[0]), int(o.latched_at[0]))
    return out


def stream_check(hf, rows, pack, pack_path, mode, chunk, preempt, async_outputs=False):
    os.environ[avllm.ENV_PACK] = pack_path
    os.environ[avllm.ENV_MODE] = mode
    ref = reference(hf, rows, pack, mode)
    eng = Engine(hf, chunk, preempt=preempt, async_outputs=async_outputs)
    summaries = {}
    avllm.attach_capture(eng.model, max_reqs=8, metadata_fn=eng.metadata)  # the patched load_model's job
    try:
        store = eng.lp._ensure_store(required=True)
        store.report_on_release = True
        store.on_release = lambda key, s: summaries.__setitem__(eng.key_of[key], s)
        arrivals = {0: [0, 1, 2], 1: [3], 3: [4, 5], 4: [6], 6: [7]}
        outputs = eng.run(arrivals, rows)
        eng.batch.refresh_metadata()
        eng.lp.update_state(None)
    finally:
        avllm.detach_capture()
    tag = f"{mode}, chunk {chunk}, {eng.preempted} preempted{', async outputs (-1 placeholders)' if async_outputs else ''}"
    check(f"[{tag}] real BatchUpdates had removed, added and moved entries ({eng.swaps} swaps)",
          eng.update_kinds == {"removed", "added", "moved"}, str(sorted(eng.update_kinds)))
    check(f"[{tag}] tokens == transformers+AutoSteer per request",
          all(outputs.get(i) == ref[i][0] for i in range(len(rows))), f"{sum(v[1] for v in ref.values())} steered")
    check(f"[{tag}] gate decisions (latch, first steered token) == transformers",
          all(summaries.get(f"req-{i}") is not None and summaries[f"req-{i}"].latched == ref[i][1]
              and summaries[f"req-{i}"].latched_at == ref[i][2] for i in range(len(rows))))
    bad = mid = unl = 0
    for order, raw, final, still in eng.records:
        for b, rid in enumerate(order):
            if still[b] or not summaries[rid].latched:
                bad += not torch.equal(raw[b], final[b])
                mid += still[b]
                unl += not still[b]
    check(f"[{tag}] unlatched and mid-prefill rows bit-identical to the raw logits", bad == 0,
          f"{unl} unlatched rows, {mid} mid-prefill rows, {bad} written")
    check(f"[{tag}] state released when vLLM drops the requests", len(eng.lp.store) == 0 and not eng.lp.parked_keys(),
          f"store {eng.lp.store.request_ids}, parked {eng.lp.parked_keys()}")
    if preempt:
        check(f"[{tag}] the preemptions happened", eng.preempted == len(preempt))


NGRAM = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


def guard_main(mode: str) -> int:
    """One fresh process: vLLM's own plugin loading, then real EngineArgs / VllmConfig / build_logitsprocs."""
    from importlib.metadata import entry_points

    from transformers import LlamaConfig
    from vllm import plugins as vplugins
    from vllm.engine.arg_utils import EngineArgs

    with_pack = mode == "with-pack"
    tag = f"[guard, {'AUTOSTEER_PACK set' if with_pack else 'AUTOSTEER_PACK unset'}]"
    eps = [e for e in entry_points(group=vplugins.DEFAULT_PLUGINS_GROUP)
           if e.value == "autosteer.integrations.vllm:install_startup_guard"]
    check(f"{tag} entry point {vplugins.DEFAULT_PLUGINS_GROUP!r} -> install_startup_guard installed", len(eps) == 1)
    model_dir = tempfile.mkdtemp(prefix="autosteer-vllm-cfg-")
    LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128).save_pretrained(model_dir)
    orig_create = EngineArgs.create_engine_config
    check(f"{tag} nothing patched before vLLM loads its plugins", not getattr(orig_create, "_autosteer_guard", False))

    def args(spec):
        # EngineArgs.__post_init__ calls vllm.plugins.load_general_plugins() (once per process)
        return EngineArgs(model=model_dir, skip_tokenizer_init=True, speculative_config=spec, max_model_len=128,
                          enforce_eager=True)

    def outcome(spec, v2):
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1" if v2 else "0"
        try:
            cfg = args(spec).create_engine_config()
            return "accepted", cfg
        except avllm.VLLMIntegrationError as exc:
            return str(exc), None
        finally:
            os.environ.pop("VLLM_USE_V2_MODEL_RUNNER", None)

    args(None)
    patched = getattr(EngineArgs.create_engine_config, "_autosteer_guard", False)
    check(f"{tag} vLLM's load_general_plugins ran the guard; EngineArgs.create_engine_config "
          f"{'patched' if with_pack else 'untouched'}", vplugins.plugins_loaded and patched == with_pack)
    res, cfg = outcome(NGRAM, v2=False)
    if with_pack:
        check(f"{tag} real EngineArgs + ngram speculative config (V1 runner): refused at create_engine_config",
              "speculative decoding" in res, res[:160])
        res2, cfg2 = outcome(None, v2=True)
        check(f"{tag} real EngineArgs, VLLM_USE_V2_MODEL_RUNNER=1, no speculation: accepted (Model Runner V2 is "
              "served)", res2 == "accepted", res2[:160])
        res3, cfg3 = outcome(None, v2=False)
        check(f"{tag} real EngineArgs, V1 runner, no speculation: accepted",
              res3 == "accepted" and cfg3.speculative_config is None and not cfg3.use_v2_model_runner, res3[:160])
        # a real VllmConfig with speculation built without the front-end check: the worker-side check
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        spec_cfg = orig_create(args(NGRAM))  # vLLM's own create_engine_config, captured before the patch
        os.environ.pop("VLLM_USE_V2_MODEL_RUNNER", None)
        check(f"{tag} a real VllmConfig with speculation exists ({type(spec_cfg.speculative_config).__name__})",
              bool(spec_cfg.speculative_config))
        from vllm.v1.worker import gpu_model_runner  # imported after the plugin: takes the patched name
        for label, build in (("vllm.v1.sample.logits_processor.build_logitsprocs", v1lp.build_logitsprocs),
                             ("gpu_model_runner.build_logitsprocs (the V1 runner's copy)",
                              gpu_model_runner.build_logitsprocs)):
            try:
                build(spec_cfg, torch.device("cpu"), False, False, ())
                check(f"{tag} real {label} with speculation: refused", False, "accepted")
            except avllm.VLLMIntegrationError as exc:
                check(f"{tag} real {label} with speculation: refused", "silently absent" in str(exc), str(exc)[:120])
        procs = v1lp.build_logitsprocs(outcome(None, v2=False)[1], torch.device("cpu"), False, False, ())
        check(f"{tag} real build_logitsprocs without speculation: AutoSteer constructed and enabled",
              any(isinstance(p, CLS) and p.enabled for p in procs.all))
        os.environ.pop(avllm.ENV_PACK)
        procs = v1lp.build_logitsprocs(spec_cfg, torch.device("cpu"), False, False, ())
        check(f"{tag} pack unset later in the process: the installed guard is inert (vLLM's own behaviour)",
              not any(isinstance(p, CLS) for p in procs.all))
    else:
        check(f"{tag} real EngineArgs + ngram speculative config: accepted (no pack: AutoSteer not requested)",
              res == "accepted" and bool(cfg.speculative_config), res[:160])
        check(f"{tag} build_logitsprocs untouched", not getattr(v1lp.build_logitsprocs, "_autosteer_guard", False))
    failed = [n for n, ok in RESULTS if not ok]
    print(f"{tag} {len(RESULTS) - len(failed)} passed, {len(failed)} failed", flush=True)
    return 1 if failed else 0


def v2_stream_check(hf, rows, pack, pack_path, mode, chunk, preempt, params_copies=False):
    """Model Runner V2: the processor built by V2's real build_custom_logits_processors, called from a method
    of a real (uninitialised) V2 GPUModelRunner holding the model, as load_model does; the real
    LogitsProcRequestState and LogitsContext dataclasses; the step loop of tests/test_vllm_v2_simulation.py."""
    from test_vllm_v2_simulation import V2Engine
    from vllm.v1.worker.gpu import model_runner as v2runner

    class Runner(v2runner.GPUModelRunner):
        def build_processors(self, vllm_config, req_states):  # what load_model does once self.model exists
            return v2loader.build_custom_logits_processors(vllm_config, req_states, False, ())

    os.environ[avllm.ENV_PACK] = pack_path
    os.environ[avllm.ENV_MODE] = mode
    ref = reference(hf, rows, pack, mode)
    eng = V2Engine(hf, chunk=chunk, lp_states_cls=v2lp.LogitsProcRequestState, ctx_cls=v2lp.LogitsContext,
                   params_copies=params_copies)
    runner = object.__new__(Runner)
    runner.model = eng.model
    runner.req_states = SimpleNamespace(index_to_req_id=eng.index_to_req_id)
    runner._dummy_sampler_run = eng._dummy_sampler_run  # the stand-in warm-up (the real one needs a GPU)
    runner.finish_requests = eng._finish_requests  # the stand-in slot release (the real one needs its states)
    eng.runner = runner
    tag = f"V2, {mode}, chunk {chunk}{', a SamplingParams copy per add (multiprocess executor)' if params_copies else ''}"
    try:
        procs = runner.build_processors(vconfig(), eng.lp_states)
        ours = [p for p in procs if isinstance(p, CLS)]
        check(f"[{tag}] V2 build_custom_logits_processors inside the runner: enabled, capture on the runner's model",
              len(ours) == 1 and ours[0].enabled and ours[0].v2 and avllm._CAPTURE is not None
              and avllm._CAPTURE.model is eng.model)
        eng.lp = ours[0]
        avllm.attach_capture(eng.model, max_reqs=8, metadata_fn=eng.metadata)  # the stand-in forward's metadata
        raw, out = eng.profile_run()
        check(f"[{tag}] the runner's sampler warm-up (made-up slots) is not steered", torch.equal(raw, out))
        summaries = {}
        eng.lp.store.report_on_release = True
        eng.lp.store.on_release = lambda rid, s: summaries.__setitem__(rid, s)
        outputs = eng.run({0: [0, 1, 2], 1: [3], 3: [4, 5], 4: [6], 6: [7]}, rows, preempt=preempt)
    finally:
        avllm.detach_capture()
    check(f"[{tag}] tokens == transformers+AutoSteer per request",
          all(outputs.get(i) == ref[i][0] for i in range(len(rows))), f"{sum(v[1] for v in ref.values())} steered")
    check(f"[{tag}] gate decisions (latch, first steered token) == transformers",
          all(summaries.get(i) is not None and summaries[i].latched == ref[i][1]
              and summaries[i].latched_at == ref[i][2] for i in range(len(rows))))
    bad = sum(not torch.equal(raw[b], final[b]) for order, raw, final, still in eng.records
              for b, rid in enumerate(order) if still[b] or not summaries[rid].latched)
    check(f"[{tag}] unlatched and mid-prefill rows bit-identical to the raw logits", bad == 0, f"{bad} written")
    check(f"[{tag}] state released once vLLM drops the requests", len(eng.lp.store) == 0)
    if preempt:
        check(f"[{tag}] the preemptions happened", eng.preempted == len(preempt))


def guard_checks(pack_path):
    import subprocess

    for mode in ("with-pack", "no-pack"):
        env = dict(os.environ, VLLM_TARGET_DEVICE="cpu")
        env.pop(avllm.ENV_PACK, None)
        env.pop("VLLM_PLUGINS", None)
        if mode == "with-pack":
            env[avllm.ENV_PACK] = pack_path
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--guard", mode], env=env,
                           capture_output=True, text=True, timeout=600)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("[PASS]", "[FAIL]"))]
        print("\n".join(lines), flush=True)
        check(f"startup guard subprocess ({mode}) passed all its checks", r.returncode == 0 and lines,
              "" if r.returncode == 0 else r.stderr[-3000:])


def main():
    interface_checks()
    tok = make_tokenizer()
    hf = make_tiny_model(len(tok))
    rows = [encode_one(tok, p, PromptFormat()) for p in PROMPTS]
    pack = make_pack(hf)
    with autosteer.attach(hf, pack) as h:
        p = sorted(float(h.generate(input_ids=torch.tensor([r]), max_new_tokens=1, force=False).p_unsafe[0])
                   for r in rows)
    pack.meta["tau"] = (p[3] + p[4]) / 2
    pack_path = str(pack.save(os.path.join(tempfile.mkdtemp(prefix="autosteer-vllm-"), "tiny.pack.safetensors")))
    construction_checks(pack_path)
    stream_check(hf, rows, pack, pack_path, "prefill", 4, {"req-0": (2, 2), "req-1": (3, 1)})
    stream_check(hf, rows, pack, pack_path, "monitor", 3, {"req-3": (1, 2)})
    stream_check(hf, rows, pack, pack_path, "prefill", 64, None)
    stream_check(hf, rows, pack, pack_path, "prefill", 4, {"req-0": (2, 2), "req-1": (3, 1)}, async_outputs=True)
    stream_check(hf, rows, pack, pack_path, "monitor", 3, {"req-3": (1, 2)}, async_outputs=True)
    v2_stream_check(hf, rows, pack, pack_path, "prefill", 4, {0: (2, 2), 1: (3, 1)})
    v2_stream_check(hf, rows, pack, pack_path, "monitor", 3, {3: (1, 2)})
    v2_stream_check(hf, rows, pack, pack_path, "prefill", 4, {0: (2, 2), 1: (3, 1)}, params_copies=True)
    guard_checks(pack_path)
    failed = [n for n, ok in RESULTS if not ok]
    print(f"\n{len(RESULTS) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--guard":
        sys.exit(guard_main(sys.argv[2]))
    sys.exit(main())
