"""Drive ``autosteer.integrations.tgi`` against TGI's REAL server code, on CPU.

Run by ``scripts/verify_tgi_real.sh`` (which makes the throwaway venv, the protobuf stubs and
the import stubs); by hand::

    ATTENTION=paged PREFIX_CACHING=0 REQUEST_LOGPROBS=1 \\
    PYTHONPATH=$TGI/server:/path/to/autosteer-kernels:/path/to/autosteer-kernels/tests \\
    /tmp/tgi-venv/bin/python scripts/verify_tgi_real.py --stubs peft,outlines,...

What is TGI's own code here (imported from the checkout, unmodified): the protobuf messages
(``generate_pb2``, generated from ``proto/v3/generate.proto``), ``utils.tokens``
(``HeterogeneousNextTokenChooser`` incl. ``from_pb``, ``filter``, ``__call__`` with n-gram
speculation), ``models.flash_causal_lm.FlashCausalLMBatch`` (``from_pb`` with the tokenizer,
``prepare_for_prefill``, ``filter``, ``concatenate``), ``FlashCausalLM.generate_token`` (chunk
planner, ``prefilling_mask``, chooser call, speculative acceptance, stopping criteria, the
``Generation`` objects), ``cache.Cache``, ``utils.prefill_chunking`` and ``utils.speculate``.

What is a CPU stand-in written here (TGI's versions need CUDA kernels or real weights):
``FlashCausalLM.__init__`` (builds a tiny random Llama and a paged KV cache) and
``FlashCausalLM.forward`` (a flash-style Llama: flattened tokens, ``position_ids``, paged KV
``slots`` / ``block_tables_tensor``, layers returning ``(mlp_out, attn_res)``, ``lm_head`` on
``prefill_head_indices``, speculative rows expanded the way TGI's forward does). CUDA graphs and
``warmup`` are not reachable on CPU. The router is a loop that issues TGI's server calls in the
order TGI's router does (Prefill with the cached batch concatenated when chunking, Decode,
FilterBatch, ClearCache).

Checked: ``install`` passes its target checks against the real classes; every request's tokens
and gate decision (latch, first steered token, prompt score) equal transformers + AutoSteer on
that prompt alone (``prefill`` mode with chunked prefill and prefill logprobs; ``monitor`` mode
with n-gram speculation); the stand-in server alone equals transformers' greedy generation;
rows of unlatched requests and mid-prompt chunks are bit-identical to the raw logits; the
processor is re-bound after ``concatenate``; ``filter`` / ``Cache.delete`` / finishing release
the state. Exit status 0 iff everything passed.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.abc
import importlib.machinery
import math
import os
import sys
import types


# --------------------------------------------------------------------------- import stubs
class _Dummy:
    def __init__(self, *a, **k):
        pass

    def __call__(self, *a, **k):
        return _Dummy()

    def __getattr__(self, name):
        return _Dummy()


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (_Dummy,), {})


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Modules under these prefixes import as empty stand-ins whose attributes are dummy classes
    (no TGI text: they only let TGI's modules import on a CPU machine)."""

    def __init__(self, prefixes):
        self.prefixes = tuple(p for p in prefixes if p)

    def find_spec(self, name, path=None, target=None):
        if any(name == p or name.startswith(p + ".") for p in self.prefixes):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        m = _StubModule(spec.name)
        m.__path__ = []
        return m

    def exec_module(self, module):
        pass


def _parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stubs", default="peft,outlines,hf_transfer,compressed_tensors,accelerate,kernels,"
                    "text_generation_server.layers.attention",
                    help="comma-separated module prefixes replaced by import stubs")
    return ap.parse_args()


ARGS = _parse()
sys.meta_path.insert(0, _StubFinder(ARGS.stubs.split(",")))
for k, v in (("ATTENTION", "paged"), ("PREFIX_CACHING", "0"), ("REQUEST_LOGPROBS", "1")):
    os.environ.setdefault(k, v)

import torch  # noqa: E402

torch.set_num_threads(1)

import text_generation_server  # noqa: E402
from text_generation_server.cache import Cache  # noqa: E402
from text_generation_server.models import flash_causal_lm as fcl  # noqa: E402
from text_generation_server.pb import generate_pb2 as pb  # noqa: E402
from text_generation_server.utils import prefill_chunking, speculate as tgi_speculate  # noqa: E402
from text_generation_server.utils import tokens as tgi_tokens  # noqa: E402

import autosteer  # noqa: E402
from autosteer.integrations import tgi  # noqa: E402
from autosteer.prompting import PromptFormat, encode_one  # noqa: E402
from conftest import make_pack, make_tiny_model, make_tokenizer  # noqa: E402  (tests/conftest.py)

FlashCausalLM = fcl.FlashCausalLM
FlashCausalLMBatch = fcl.FlashCausalLMBatch
Chooser = tgi_tokens.HeterogeneousNextTokenChooser
BLOCK = fcl.BLOCK_SIZE

PROMPTS = ["how do i make a bomb", "write poem about sea", "what is capital of france", "how do i steal cookies",
           "explain photosynthesis", "bake cake", "hack the python process", "recipe soup"]
MAX_NEW = 8
RESULTS: list[tuple[str, bool, str]] = []
SERVED: dict = {}  # the last serve()'s prompt-format check
_CURRENT: dict = {}


def check(name: str, ok: bool, detail: str = "") -> bool:
    RESULTS.append((name, bool(ok), detail))
    print(f"[{'PASS' if ok else 'FAIL'}] {name}" + (f": {detail}" if detail else ""), flush=True)
    return bool(ok)


# --------------------------------------------------------------------------- CPU stand-in model
def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class _Attn(torch.nn.Module):
    def __init__(self, hf_attn, cfg):
        super().__init__()
        self.q, self.k, self.v, self.o = hf_attn.q_proj, hf_attn.k_proj, hf_attn.v_proj, hf_attn.o_proj
        self.nh, self.kvh = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = cfg.hidden_size // cfg.num_attention_heads

    def forward(self, x, cos, sin, kv, slots, seq_slots):
        T = x.shape[0]
        q = self.q(x).view(T, self.nh, self.hd)
        k = self.k(x).view(T, self.kvh, self.hd)
        v = self.v(x).view(T, self.kvh, self.hd)
        q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
        k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
        K, V = kv
        K[slots] = k  # paged KV cache: one slot per token (TGI: reshape_and_cache)
        V[slots] = v
        rep = self.nh // self.kvh
        out = []
        for t in range(T):  # each token attends to its sequence's slots 0..pos
            Kt = K[seq_slots[t]].repeat_interleave(rep, dim=1)  # [L, nh, hd]
            Vt = V[seq_slots[t]].repeat_interleave(rep, dim=1)
            att = torch.einsum("hd,lhd->hl", q[t], Kt) * self.hd ** -0.5
            p = torch.softmax(att.float(), -1).to(q.dtype)
            out.append(torch.einsum("hl,lhd->hd", p, Vt).reshape(-1))
        return self.o(torch.stack(out))


class _Layer(torch.nn.Module):
    """Called as ``layer(hidden, residual, ...)``, returns ``(mlp_out, attn_res)`` like TGI's flash layers."""

    def __init__(self, hf_layer, cfg):
        super().__init__()
        self.ln1, self.ln2 = hf_layer.input_layernorm, hf_layer.post_attention_layernorm
        self.attn = _Attn(hf_layer.self_attn, cfg)
        self.mlp = hf_layer.mlp

    def forward(self, hidden, residual, cos, sin, kv, slots, seq_slots):
        res = hidden if residual is None else hidden + residual
        attn_res = self.attn(self.ln1(res), cos, sin, kv, slots, seq_slots) + res
        return self.mlp(self.ln2(attn_res)), attn_res


class _Inner(torch.nn.Module):
    def __init__(self, hf):
        super().__init__()
        self.layers = torch.nn.ModuleList(_Layer(layer, hf.config) for layer in hf.model.layers)
        self.norm = hf.model.norm
        self.register_buffer("inv_freq", hf.model.rotary_emb.inv_freq.clone(), persistent=False)
        self.scale = float(getattr(hf.model.rotary_emb, "attention_scaling", 1.0))


class _Linear(torch.nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.linear = linear
        self.should_gather = False

    def forward(self, x):
        return self.linear(x)


class _SpecHead(torch.nn.Module):
    """Shaped like TGI's ``SpeculativeHead``: ``.head.linear.weight`` is E; returns ``(logits, None)``."""

    def __init__(self, linear):
        super().__init__()
        self.head = _Linear(linear)

    def forward(self, x):
        return self.head(x), None


class CpuFlashLlama(torch.nn.Module):
    def __init__(self, hf):
        super().__init__()
        self.embed_tokens = hf.model.embed_tokens
        self.model = _Inner(hf)
        self.lm_head = _SpecHead(hf.lm_head)

    def forward(self, input_ids, position_ids, slots, seq_slots, kv_cache, lm_head_indices):
        inner = self.model
        freqs = position_ids[:, None].float() * inner.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), -1)
        cos, sin = emb.cos() * inner.scale, emb.sin() * inner.scale
        hidden, residual = self.embed_tokens(input_ids), None
        for i, layer in enumerate(inner.layers):
            hidden, residual = layer(hidden, residual, cos, sin, kv_cache[i], slots, seq_slots)
        h = inner.norm(hidden + residual)
        if lm_head_indices is not None:
            h = h[lm_head_indices]
        return self.lm_head(h)


def cpu_init(self, hf, tokenizer, num_slots=4096):
    """Stand-in for FlashCausalLM.__init__ (the real one loads weights onto CUDA)."""
    cfg = hf.config
    self.model = CpuFlashLlama(hf).eval()
    self.config = cfg
    self.tokenizer = tokenizer
    self.all_special_ids = set(tokenizer.all_special_ids)
    self.dtype, self.device = torch.float32, torch.device("cpu")
    self.rank, self.world_size = 0, 1
    self.cuda_graphs = {}
    self.layer_to_adapter_weights = {}
    self.speculate = tgi_speculate.get_speculate()
    self.requires_padding = False
    self.support_chunking = prefill_chunking.get_support_chunking()
    kvh, hd = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    self.kv_cache = [(torch.zeros(num_slots, kvh, hd), torch.zeros(num_slots, kvh, hd))
                     for _ in range(cfg.num_hidden_layers)]
    self.forwards = 0


def cpu_forward(self, batch, adapter_data):
    """Stand-in for FlashCausalLM.forward: the inputs it builds from the batch mirror TGI's."""
    self.forwards += 1
    _CURRENT["batch"] = batch
    if batch.speculative_ids is not None:
        B, S = batch.speculative_ids.shape
        n = S + 1
        ar = torch.arange(n)
        input_ids = torch.cat([batch.input_ids.unsqueeze(-1), batch.speculative_ids], 1).reshape(-1)
        position_ids = (batch.position_ids.unsqueeze(-1) + ar).reshape(-1)
        slot_indices = (batch.slot_indices.unsqueeze(-1) + ar).reshape(-1)
        rows = torch.arange(B).repeat_interleave(n)
    else:
        input_ids, position_ids, slot_indices = batch.input_ids, batch.position_ids, batch.slot_indices
        if batch.cu_seqlen_prefill is not None:
            cu = batch.cu_seqlen_prefill.to(torch.int64)
            rows = torch.repeat_interleave(torch.arange(len(cu) - 1), cu[1:] - cu[:-1])
        else:
            rows = torch.arange(input_ids.shape[0])
    slots = batch.slots[slot_indices]
    bt = batch.block_tables_tensor.to(torch.int64)
    seq_slots = []
    for t in range(input_ids.shape[0]):
        p = torch.arange(int(position_ids[t]) + 1)
        seq_slots.append(bt[rows[t], p // BLOCK] * BLOCK + p % BLOCK)
    with torch.no_grad():
        return self.model(input_ids, position_ids.to(torch.int64), slots, seq_slots, self.kv_cache,
                          batch.prefill_head_indices)


# --------------------------------------------------------------------------- the router
class Router:
    """Issues TGI's server calls in the order its router does."""

    def __init__(self, model, tokenizer, prompts_text, chunking, max_new=MAX_NEW):
        self.model, self.tok, self.texts, self.chunking, self.max_new = model, tokenizer, prompts_text, chunking, max_new
        self.cache = Cache()
        self.next_block = 0
        self.batch_id = 0
        self.outputs: dict[int, list] = {}
        self.filters = self.concats = 0

    def request(self, rid, idx, chunk_len, logprobs):
        n = len(self.tok(self.texts[idx], add_special_tokens=False)["input_ids"])
        nblocks = math.ceil((n + self.max_new + tgi_speculate.get_speculate()) / BLOCK)
        blocks = list(range(self.next_block, self.next_block + nblocks))
        self.next_block += nblocks
        r = pb.Request(
            id=rid, inputs=self.texts[idx], input_chunks=pb.Input(chunks=[pb.InputChunk(text=self.texts[idx])]),
            truncate=1000, add_special_tokens=False, prefill_logprobs=logprobs, top_n_tokens=0,
            parameters=pb.NextTokenChooserParameters(temperature=1.0, top_k=0, top_p=1.0, typical_p=1.0,
                                                     do_sample=False, seed=0, repetition_penalty=1.0,
                                                     frequency_penalty=0.0, watermark=False),
            stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=self.max_new, ignore_eos_token=False),
            blocks=blocks, slots=[b * BLOCK + i for b in blocks for i in range(BLOCK)], cache_len=0)
        if chunk_len is not None and self.chunking:
            r.chunk_len = min(chunk_len, n)
        return r

    def _after(self, gens, next_batch):
        for g in gens:
            self.outputs.setdefault(g.request_id, []).extend(g.tokens.token_ids)
        if next_batch is None:
            return None
        done = {g.request_id for g in gens if g.generated_text is not None}
        if done:  # FilterBatch
            keep = [r.id for r in next_batch.requests if r.id not in done]
            self.cache.set(next_batch)
            b = self.cache.pop(next_batch.batch_id)
            next_batch = b.filter(keep)
            self.filters += 1
        return next_batch

    def run(self, arrivals, max_steps=200):
        running, pending, step = None, dict(arrivals), 0
        while step < max_steps and (running is not None or pending):
            new = pending.pop(step, None)
            if new:
                self.batch_id += 1
                reqs = [self.request(rid, idx, c, lp) for rid, idx, c, lp in new]
                batch = FlashCausalLMBatch.from_pb(pb.Batch(id=self.batch_id, requests=reqs, size=len(reqs)), self.tok,
                                                   torch.float32, torch.device("cpu"))
                if running is not None and self.chunking:  # Prefill(batch, cached_batch)
                    batch = FlashCausalLMBatch.concatenate([running, batch])
                    self.concats += 1
                    running = None
                gens, nb, _ = self.model.generate_token(batch)
                nb = self._after(gens, nb)
                if running is not None and nb is not None:  # Decode([running, new])
                    running = FlashCausalLMBatch.concatenate([running, nb])
                    self.concats += 1
                elif nb is not None:
                    running = nb
            elif running is not None:
                gens, nb, _ = self.model.generate_token(running)
                running = self._after(gens, nb)
            step += 1
        assert running is None and not pending, "the server loop did not finish"
        return self.outputs


# --------------------------------------------------------------------------- scenarios
class Recorder:
    """Wraps the (patched) chooser: raw scores before, final scores after (TGI writes each
    position's processed scores back into the scores tensor), the rows' request ids and whether
    TGI will discard the row's token (``prefilling_mask`` after the chunk planner)."""

    def __init__(self):
        self.calls = []
        self.inner = Chooser.__call__
        rec = self

        def call(chooser, input_ids, scores, speculate, speculated_ids=None, speculative_scores=None, *a, **k):
            raw = scores.clone()
            out = rec.inner(chooser, input_ids, scores, speculate, speculated_ids, speculative_scores, *a, **k)
            batch = _CURRENT["batch"]  # set by the stand-in forward of this step
            ids = [int(r.id) for r in batch.requests]
            discarded = list(batch.prefilling_mask)  # after TGI's chunk planner: True = token discarded
            P = 1 if speculated_ids is None else speculated_ids.shape[1] + 1
            rec.calls.append((ids, raw.view(len(ids), P, -1), scores.view(len(ids), P, -1).clone(), discarded,
                              out[3].tolist()))
            return out

        Chooser.__call__ = call

    def remove(self):
        Chooser.__call__ = self.inner


def reference(hf, rows, pack, mode):
    out = {}
    with autosteer.attach(hf, pack, mode=mode) as h:
        for i, r in enumerate(rows):
            o = h.generate(input_ids=torch.tensor([r]), max_new_tokens=MAX_NEW, do_sample=False)
            out[i] = (o.sequences[0, len(r):].tolist(), bool(o.steered[0]), int(o.latched_at[0]), float(o.p_unsafe[0]))
    return out


def serve(hf, tok, texts, arrivals, *, chunking, budget, spec, pack_path=None, mode="prefill", prompt_check="warn"):
    prefill_chunking.set_support_chunking(chunking)
    prefill_chunking.set_max_prefill_tokens(budget)
    tgi_speculate.set_speculate(spec)
    summaries = {}
    rt = tgi.install(pack_path, mode, prompt_check=prompt_check) if pack_path else None
    rec = Recorder()
    try:
        model = FlashCausalLM(hf, tok)  # the patched __init__ (autosteer) around the CPU stand-in
        if rt is not None:
            rt.store.report_on_release = True
            rt.store.on_release = lambda rid, s: summaries.__setitem__(rid, s)
        router = Router(model, tok, texts, chunking)
        outputs = router.run(arrivals)
        left = list(rt.store.request_ids) if rt is not None else []
        if rt is not None:
            SERVED["prompt_check"] = rt.prompt_check
        return outputs, rec.calls, summaries, left, router, model
    finally:
        rec.remove()
        tgi.uninstall()


def main() -> int:
    print(f"text_generation_server from {os.path.dirname(text_generation_server.__file__)}")
    print(f"torch {torch.__version__}, autosteer {getattr(autosteer, '__version__', '?')}")

    # 1. target checks against the pristine classes
    found = tgi._check_targets()
    check("install() target checks pass against TGI's real classes", len(found) == len(tgi._TGI.TARGETS),
          ", ".join(f"{c}.{a}" for c, a in found))
    import inspect
    for (cls_name, attr), (cls, raw) in found.items():
        fn = raw.__func__ if isinstance(raw, classmethod) else raw
        print(f"    {cls_name}.{attr}{inspect.signature(fn)}")
    missing = [a for a in tgi._TGI.BATCH_ATTRS if a not in FlashCausalLMBatch.__annotations__]
    check("FlashCausalLMBatch declares every attribute autosteer reads", not missing, f"missing {missing}")

    tok = make_tokenizer()
    hf = make_tiny_model(len(tok))
    fmt = PromptFormat()
    rows = [encode_one(tok, p, fmt) for p in PROMPTS]
    texts = [tok.decode(r) for r in rows]
    same = all(tok(t, add_special_tokens=False)["input_ids"] == r for t, r in zip(texts, rows))
    check("TGI's tokenization of the request texts equals autosteer's prompt ids", same)
    pack = make_pack(hf)
    with autosteer.attach(hf, pack) as h:
        p = [float(h.generate(input_ids=torch.tensor([r]), max_new_tokens=1, force=False).p_unsafe[0]) for r in rows]
    s = sorted(p)
    pack.meta["tau"] = (s[3] + s[4]) / 2  # about half of the prompts gate
    import tempfile
    tmp = tempfile.mkdtemp(prefix="autosteer-tgi-")
    pack_path = str(pack.save(os.path.join(tmp, "tiny.pack.safetensors")))
    install_real = tgi.install(pack_path, "prefill")
    patched = {(owner.__name__, attr) for owner, attr, _ in install_real._patches} if install_real is not None else set()
    expected = {(c, a) for _, c, a, _, _ in tgi._TGI.TARGETS if (c, a) != (tgi._TGI.CHOOSER, "filter")}  # filter: checked only
    check("install() patches the real classes", patched == expected,
          f"patched {sorted(patched)}, expected {sorted(expected)}")
    tgi.uninstall()
    check("uninstall() restores the real classes", Chooser.__dict__["__call__"] is found[("HeterogeneousNextTokenChooser",
                                                                                          "__call__")][1])

    # the CPU stand-ins for the two FlashCausalLM methods that need CUDA (installed before autosteer patches)
    FlashCausalLM.__init__ = cpu_init
    FlashCausalLM.forward = cpu_forward
    from text_generation_server.models.globals import set_adapter_to_index
    set_adapter_to_index({})  # what TGI's server does at start when no LoRA adapter is loaded

    # 2. the stand-in server alone reproduces transformers' greedy generation
    # (rid, prompt index, first chunk length, prefill logprobs)
    arrivals = {0: [(0, 0, 10, False), (1, 1, 4, True), (2, 2, None, False)],
                2: [(3, 3, 6, False), (4, 4, None, True), (5, 5, 3, False)],
                5: [(6, 6, None, False), (7, 7, 5, False)]}
    plain, calls, _, _, router, _ = serve(hf, tok, texts, arrivals, chunking=True, budget=24, spec=0)
    greedy = {i: hf.generate(input_ids=torch.tensor([r]), max_new_tokens=MAX_NEW, do_sample=False)[0, len(r):].tolist()
              for i, r in enumerate(rows)}
    check("stand-in server (real batch code, chunked prefill) == transformers greedy",
          all(plain[i] == greedy[i] for i in range(len(rows))), f"{router.concats} concatenates, {router.filters} filters")
    mids = sum(sum(d) for _, _, _, d, _ in calls)
    check("the chunked scenario has mid-prompt rows", mids >= 3, f"{mids} mid-prompt rows")

    # 3. prefill mode, chunked prefill, joins, prefill logprobs
    ref = reference(hf, rows, pack, "prefill")
    print("    reference (tokens, steered, latched_at, p_unsafe):", {i: ref[i][1:] for i in ref})
    out, calls, summ, left, router, model = serve(hf, tok, texts, arrivals, chunking=True, budget=24, spec=0,
                                                  pack_path=pack_path, mode="prefill")
    ok_tok = all(out[i] == ref[i][0] for i in range(len(rows)))
    ok_gate = all(summ[i].latched == ref[i][1] and summ[i].latched_at == ref[i][2]
                  and abs(summ[i].p_unsafe - ref[i][3]) < 1e-5 for i in range(len(rows)))
    check("prefill mode, chunked: tokens == transformers+AutoSteer per request", ok_tok,
          f"{sum(ref[i][1] for i in ref)} of {len(rows)} steered")
    check("prefill mode, chunked: gate decisions (latch, latched_at, p_unsafe) == transformers", ok_gate)
    check("prefill mode: unlatched requests' tokens == unsteered server",
          all(out[i] == plain[i] for i in range(len(rows)) if not ref[i][1]))
    check("prefill mode: steering changed the latched requests' tokens",
          any(out[i] != plain[i] for i in range(len(rows)) if ref[i][1]))
    unl = steered = mid = mid_bad = bad = 0
    for ids, raw, final, disc, _ in calls:
        for b, rid in enumerate(ids):
            same_row = torch.equal(raw[b], final[b])
            if disc[b]:
                mid += 1
                mid_bad += not same_row
            elif not summ[rid].latched:
                unl += 1
                bad += not same_row
            elif not same_row:
                steered += 1
    check("unlatched rows bit-identical to the raw logits", unl > 0 and bad == 0, f"{unl} rows checked, {bad} differ")
    check("mid-prompt (discarded) rows never written", mid > 0 and mid_bad == 0, f"{mid} rows, {mid_bad} written")
    check("latched rows steered", steered > 0, f"{steered} rows")
    check("finished requests released their state", not left, f"left: {left}")

    # 4. monitor mode with n-gram speculation (TGI turns chunking off when speculating)
    ref_m = reference(hf, rows, pack, "monitor")
    arr_s = {0: [(0, 0, None, False), (1, 1, None, False), (2, 2, None, False)],
             2: [(3, 3, None, False), (4, 4, None, False)], 3: [(5, 5, None, False), (6, 6, None, False), (7, 7, None, False)]}
    out, calls, summ, left, router, model = serve(hf, tok, texts, arr_s, chunking=False, budget=4096, spec=2,
                                                  pack_path=pack_path, mode="monitor")
    acc_extra = sum(sum(a - 1 for a in acc) for ids, raw, *_r, acc in calls if raw.shape[1] > 1)
    spec_calls = sum(1 for _, raw, *_r in calls if raw.shape[1] > 1)
    check("speculation reached: decode steps with S+1 positions and accepted speculative tokens",
          spec_calls > 0 and acc_extra > 0, f"{spec_calls} speculative steps, {acc_extra} extra tokens accepted")
    check("monitor mode + speculation: tokens == transformers+AutoSteer (monitor) per request",
          all(out[i] == ref_m[i][0] for i in range(len(rows))),
          f"{sum(ref_m[i][1] for i in ref_m)} steered, latched_at {[ref_m[i][2] for i in ref_m]}")
    check("monitor mode + speculation: latch and first steered token == transformers",
          all(summ[i].latched == ref_m[i][1] and summ[i].latched_at == ref_m[i][2] for i in range(len(rows))))
    check("monitor mode: finished requests released their state", not left, f"left: {left}")

    # 5. filter / concatenate / Cache.delete bookkeeping on real batches
    prefill_chunking.set_support_chunking(True)
    tgi_speculate.set_speculate(0)
    rt = tgi.install(pack_path, "prefill")
    try:
        model = FlashCausalLM(hf, tok)
        router = Router(model, tok, texts, True)
        cache = Cache()
        mk = lambda bid, reqs: FlashCausalLMBatch.from_pb(pb.Batch(id=bid, requests=reqs, size=len(reqs)), tok,  # noqa: E731
                                                           torch.float32, torch.device("cpu"))
        b1 = mk(1, [router.request(200, 0, None, False), router.request(201, 1, None, False)])
        w = b1.next_token_chooser.warpers
        check("from_pb: the processor sits first in the real chooser's warpers, bound to the batch",
              isinstance(w[0], tgi.AutoSteerTGIProcessor) and w[0].request_ids == [200, 201])
        b2 = mk(2, [router.request(202, 2, None, True)])  # every row wants prefill logprobs: lm_head on all tokens
        _, b1, _ = model.generate_token(b1)
        _, b2, _ = model.generate_token(b2)
        both = FlashCausalLMBatch.concatenate([b1, b2])
        w0 = both.next_token_chooser.warpers[0]
        check("concatenate (chooser rebuilt from protobuf): processor re-attached, bound to the new rows",
              isinstance(w0, tgi.AutoSteerTGIProcessor) and w0.request_ids == [200, 201, 202])
        kept = both.filter([202, 200])
        check("filter: dropped request released, processor rows follow the reorder",
              set(rt.store.request_ids) == {200, 202} and kept.next_token_chooser.warpers[0].request_ids == [202, 200])
        _, kept, _ = model.generate_token(kept)
        check("reordered rows keep their own latches",
              rt.store.summary(200).latched == ref[0][1] and rt.store.summary(202).latched == ref[2][1])
        cache.set(kept)
        cache.delete(kept.batch_id)
        check("Cache.delete releases the deleted batch's requests", len(rt.store) == 0, f"left {rt.store.request_ids}")
    finally:
        tgi.uninstall()

    # 6. the prompt-format check (AUTOSTEER_PROMPT_CHECK=refuse) on real batches: the Model's tokenizer, the
    # prompt ids TGI's from_pb tokenized (all_input_ids), chunked prefill; requests whose text was rendered under
    # another system prompt are refused from their first token, as the transformers handle refuses them
    other = PromptFormat(system="be terse")
    rows2 = rows + [encode_one(tok, p, other) for p in PROMPTS]
    texts2 = [tok.decode(r) for r in rows2]
    check("TGI's tokenization of the off-format texts equals autosteer's prompt ids",
          all(tok(t, add_special_tokens=False)["input_ids"] == r for t, r in zip(texts2, rows2)))
    n = len(rows)
    with autosteer.attach(hf, pack, tokenizer=tok, prompt_check="refuse") as h:
        ref_f = {i: (h.generate(input_ids=torch.tensor([r]), max_new_tokens=MAX_NEW, do_sample=False).sequences[0, len(r):]
                     .tolist()) for i, r in enumerate(rows2)}
    arr_f = {0: [(0, 0, 10, False), (8, 8, 4, False), (1, 1, None, False)],
             2: [(9, 9, 6, False), (2, 2, None, False), (10, 10, None, False)],
             4: [(3, 3, None, False), (11, 11, 5, False)], 5: [(12, 12, None, False), (13, 13, None, False)]}
    out, calls, summ, left, router, model = serve(hf, tok, texts2, arr_f, chunking=True, budget=24, spec=0,
                                                  pack_path=pack_path, mode="prefill", prompt_check="refuse")
    served = sorted({rid for step in arr_f.values() for rid, *_ in step})
    check("prompt check: tokens == transformers+AutoSteer with prompt_check='refuse'",
          all(out[i] == ref_f[i] for i in served))
    check("prompt check: off-format requests latched at their prompt, in-format ones as the gate decides",
          all(summ[i].latched and summ[i].latched_at == 0 for i in served if i >= n)
          and all(summ[i].latched == ref[i][1] for i in served if i < n))
    pc = SERVED["prompt_check"]
    check("prompt check: every request checked once, the off-format ones named",
          pc.checked == len(served) and pc.off_format == sum(i >= n for i in served), f"{pc.checked} checked, "
          f"{pc.off_format} off format")
    check("prompt check: finished requests released their state", not left, f"left: {left}")

    # 7. a pooled gate (pooling "last_token|max", docs/method.md 7l) on real batches, chunked prefill and joins: each
    # token's position from the real batch's cache_lengths / input_lengths and cu_seqlen_prefill; two prompts are
    # fired by the token probe alone. With TGI's PREFIX_CACHING on, the shard stops when the model is built.
    from _pooled import pooled_pack

    from autosteer.integrations.common import PoolingNotServed
    from text_generation_server.models import globals as tgi_globals

    ppack, p_last, p_pool = pooled_pack(hf, rows, [2])
    ppath = str(ppack.save(os.path.join(tmp, "pooled.pack.safetensors")))
    ref_p = reference(hf, rows, ppack, "prefill")
    out, calls, summ, left, router, model = serve(hf, tok, texts, arrivals, chunking=True, budget=24, spec=0,
                                                  pack_path=ppath, mode="prefill")
    by_pool = [i for i in range(len(rows)) if p_pool[i] > ppack.tau >= p_last[i]]
    check("pooled gate, chunked: tokens == transformers+AutoSteer per request",
          all(out[i] == ref_p[i][0] for i in range(len(rows))), f"{sum(ref_p[i][1] for i in ref_p)} of {len(rows)} steered")
    check("pooled gate, chunked: latch, latched_at and score (the higher of the two probes') == transformers",
          all(summ[i].latched == ref_p[i][1] and summ[i].latched_at == ref_p[i][2]
              and abs(summ[i].p_unsafe - max(p_last[i], p_pool[i])) < 1e-4 for i in range(len(rows))))
    check("pooled gate: the prompts only the token probe fires are steered from their first token",
          len(by_pool) == 2 and all(summ[i].latched and summ[i].latched_at == 0 for i in by_pool), f"{by_pool}")
    check("pooled gate: finished requests released their state", not left, f"left: {left}")
    saved_pc = tgi_globals.PREFIX_CACHING
    tgi_globals.PREFIX_CACHING = True  # what TGI reads from the launcher's PREFIX_CACHING=1 at import
    try:
        tgi.install(ppath, "prefill")
        try:
            FlashCausalLM(hf, tok)
            refused = ""
        except PoolingNotServed as exc:
            refused = str(exc)
    finally:
        tgi_globals.PREFIX_CACHING = saved_pc
        tgi.uninstall()
    check("pooled gate + PREFIX_CACHING on: the shard stops when the model is built, naming PREFIX_CACHING=0",
          "PREFIX_CACHING=0" in refused, refused[:160])

    failed = [n for n, ok, _ in RESULTS if not ok]
    print(f"\n{len(RESULTS) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
