"""A small, CPU-only stand-in for TGI's Python server (``text_generation_server``).

Written for ``tests/test_tgi_simulation.py`` from the behaviour of TGI's server at commit
db931fcf (2026-01-08), not from its code. It reproduces what ``autosteer.integrations.tgi``
depends on, under the same module / class / method names:

- ``utils.tokens.HeterogeneousNextTokenChooser``: ``from_pb`` (parameters only, no request ids),
  ``filter(indices)`` (filters every processor/warper, drops those returning None),
  ``__call__(input_ids, scores, speculate, speculated_ids, speculative_scores)`` reshaping the
  scores to ``[B, S+1, V]``, running processors then ``warpers`` as ``proc(input_ids, scores_j)``
  per position, choosing greedily, validating speculated ids (accepted prefix) and proposing
  n-gram speculation; returns ``(next_ids, logprobs, alllogprobs, accepted_ids, speculative_ids)``.
- ``models.flash_causal_lm.FlashCausalLMBatch``: ``from_pb``, ``filter(request_ids)`` (calls the
  chooser's ``filter``), ``concatenate(batches)`` (rebuilds the chooser from the requests'
  protobuf parameters, dropping any processor that was added to it), ``prepare_for_prefill``
  (flattened tokens, ``cu_seqlen_prefill``, ``prefill_head_indices`` /
  ``prefill_next_token_indices``), chunked prefill (``prompt_lengths``/``cache_lengths``/
  ``input_lengths``, ``prefilling``/``prefilling_mask``, a token budget per step, mid-prompt
  rows' tokens discarded; decoding rows ride along in prefill steps with one token).
- ``models.flash_causal_lm.FlashCausalLM``: a flash-style Llama built from a transformers
  ``LlamaForCausalLM``'s weights -- decoder layers called as ``layer(hidden, residual, ...)`` and
  returning ``(mlp_out, attn_res)``, an ``lm_head`` module whose ``.head.linear.weight`` is ``E``,
  ``lm_head_indices`` at prefill, a KV cache -- ``warmup`` (runs a dummy batch, then "captures"
  decode graphs), ``generate_token``, and **graph replay**: each graph is a ``make_fx`` trace of the
  decode forward taken during warmup; replaying it runs only the recorded tensor ops (writes into
  tensors that outlive the trace, like a CUDA graph writes into fixed memory) and **no Python
  hooks**. Decode batches are padded to the next graph size, like TGI.
- ``cache.Cache`` (``pop``/``set``/``delete``/``clear``) and ``cli.app``.

``Router`` drives it like TGI's router: new requests are prefilled (concatenated with the
running batch first when chunking is on), finished requests are filtered out, batches are
concatenated for decode.
"""
from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field

import torch

ROOT = "text_generation_server"
MODULES = (ROOT, f"{ROOT}.utils", f"{ROOT}.utils.tokens", f"{ROOT}.models", f"{ROOT}.models.model", f"{ROOT}.models.flash_causal_lm",
           f"{ROOT}.cache", f"{ROOT}.cli", f"{ROOT}.pb")


# ----------------------------------------------------------------------------- "protobuf"
@dataclass
class NextTokenChooserParameters:
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    do_sample: bool = False
    seed: int = 0


@dataclass
class Request:
    id: int
    input_ids: list
    max_new_tokens: int
    parameters: NextTokenChooserParameters = field(default_factory=NextTokenChooserParameters)
    prefill_logprobs: bool = False
    chunk_len: int | None = None  # first chunk (set by the router when chunking)


@dataclass
class PbBatch:
    id: int
    requests: list


# ----------------------------------------------------------------------------- utils.tokens
# simulation instrumentation: when RECORDER is a list, each chooser call appends
# (request ids, raw scores, final scores, rows whose prompt is still unfinished after this step)
RECORDER: list | None = None
CURRENT_IDS: list = []
CURRENT_STILL: list = []


class RepetitionPenalty:
    def __init__(self, penalties, device):
        self.penalty = torch.tensor(penalties, dtype=torch.float32, device=device).unsqueeze(1)

    def __call__(self, input_ids, scores):
        input_ids = input_ids.clamp_min(0)
        score = torch.gather(scores, 1, input_ids)
        score = torch.where(score < 0, score * self.penalty, score / self.penalty)
        return scores.scatter(1, input_ids, score)

    def filter(self, indices):
        self.penalty = self.penalty[indices]
        return self if bool((self.penalty != 1.0).any()) else None


class TemperatureWarper:
    def __init__(self, temps, device):
        self.temperature = torch.tensor(temps, dtype=torch.float32, device=device).unsqueeze(1)

    def __call__(self, input_ids, scores):
        return scores.div_(self.temperature)

    def filter(self, indices):
        self.temperature = self.temperature[indices]
        return self if bool((self.temperature != 1.0).any()) else None


def n_gram_speculation(input_ids, next_ids, accepted, speculate):
    """Propose ``speculate`` tokens per row: what followed the previous occurrence of the row's
    newest token in its history (repeat the newest token when there is none)."""
    B = accepted.shape[0]
    cu = torch.cumsum(accepted, 0)
    out = []
    for b in range(B):
        last = int(next_ids[int(cu[b]) - 1])
        hist = [int(x) for x in input_ids[b].tolist() if int(x) >= 0] + next_ids[int(cu[b]) - int(accepted[b]): int(cu[b])].tolist()
        guess = [last] * speculate
        for k in range(len(hist) - 2, -1, -1):
            if hist[k] == last:
                cont = hist[k + 1: k + 1 + speculate]
                guess = (cont + [cont[-1] if cont else last] * speculate)[:speculate]
                break
        out.append(guess)
    return torch.tensor(out, dtype=torch.long, device=next_ids.device)


class HeterogeneousNextTokenChooser:
    def __init__(self, dtype, device, temperature, repetition_penalty, do_sample, seeds):
        self.watermark_processor = None
        self.repetition_processor = (RepetitionPenalty(repetition_penalty, device)
                                     if any(x != 1.0 for x in repetition_penalty) else None)
        self.warpers = []
        if any(x != 1.0 for x in temperature):
            self.warpers.append(TemperatureWarper(temperature, device))
        if any(do_sample):
            raise NotImplementedError("the simulation is greedy only")
        self.dtype, self.device = dtype, device
        self.seeds, self.do_sample = list(seeds), list(do_sample)

    def __call__(self, input_ids, scores, speculate, speculated_ids=None, speculative_scores=None, verbose=False):
        S = 1 if speculated_ids is None else speculated_ids.shape[1] + 1
        B = scores.shape[0] // S
        scores = scores.view(B, S, -1)
        raw = scores.clone() if RECORDER is not None else None
        next_ids = torch.zeros((B, S), device=scores.device, dtype=torch.long)
        for j in range(S):
            _scores = scores[:, j]
            if self.repetition_processor is not None:
                _scores = self.repetition_processor(input_ids, _scores)
            for warper in self.warpers:
                _scores = warper(input_ids, _scores)
            next_ids[:, j] = _scores.argmax(-1)
            scores[:, j] = _scores
        if RECORDER is not None:
            RECORDER.append((list(CURRENT_IDS), raw, scores.clone(), list(CURRENT_STILL)))
        next_ids = next_ids.view(B * S)
        alllogprobs = torch.log_softmax(scores.view(B * S, -1), -1)
        if speculated_ids is not None:
            indices, accepted_ids = [], []
            for i in range(B):
                cand = next_ids[i * S:(i + 1) * S]
                ok = (cand[:-1] == speculated_ids[i]).tolist()
                acc = 1
                for good in ok:
                    if not good:
                        break
                    acc += 1
                accepted_ids.append(acc)
                indices.extend(range(i * S, i * S + acc))
            accepted_ids = torch.tensor(accepted_ids, device=scores.device, dtype=torch.long)
            next_ids = next_ids[indices]
            logprobs = alllogprobs[indices]
        else:
            accepted_ids = torch.ones(B, dtype=torch.long, device=scores.device)
            logprobs = alllogprobs
        next_logprobs = torch.gather(logprobs, 1, next_ids.view(-1, 1)).view(-1)
        spec = n_gram_speculation(input_ids, next_ids, accepted_ids, speculate) if speculate > 0 else None
        return next_ids, next_logprobs, alllogprobs, accepted_ids, spec

    def filter(self, indices):
        if self.repetition_processor is not None:
            self.repetition_processor = self.repetition_processor.filter(indices)
        kept = []
        for w in self.warpers:
            fw = w.filter(indices)
            if fw is not None:
                kept.append(fw)
        self.warpers = kept
        self.seeds = [self.seeds[i] for i in indices]
        self.do_sample = [self.do_sample[i] for i in indices]
        return self

    @classmethod
    def from_pb(cls, pb, dtype, device, tokenizer=None):
        return HeterogeneousNextTokenChooser(dtype, device, [p.temperature for p in pb],
                                             [p.repetition_penalty for p in pb], [p.do_sample for p in pb],
                                             [p.seed for p in pb])


# ----------------------------------------------------------------------------- the model
def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class FlashLlamaAttention(torch.nn.Module):
    def __init__(self, hf_attn, cfg):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = hf_attn.q_proj, hf_attn.k_proj, hf_attn.v_proj, hf_attn.o_proj
        self.nh = cfg.num_attention_heads
        self.kvh = cfg.num_key_value_heads
        self.hd = cfg.hidden_size // cfg.num_attention_heads
        self.scaling = self.hd ** -0.5

    def forward(self, x, cos, sin, kv, seq_slots, positions):
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.nh, self.hd)
        k = self.k_proj(x).view(T, self.kvh, self.hd)
        v = self.v_proj(x).view(T, self.kvh, self.hd)
        q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
        k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
        kc, vc = kv
        kc.index_put_((seq_slots, positions), k)  # into the (static) KV cache, like paged attention's slots
        vc.index_put_((seq_slots, positions), v)
        rep = self.nh // self.kvh
        K = kc[seq_slots].repeat_interleave(rep, dim=2)  # [T, Lmax, nh, hd]
        Vv = vc[seq_slots].repeat_interleave(rep, dim=2)
        att = torch.einsum("thd,tlhd->thl", q, K) * self.scaling
        future = torch.arange(kc.shape[1], device=x.device)[None, :] > positions[:, None]
        att = att.masked_fill(future[:, None, :], float("-inf"))
        p = torch.softmax(att.float(), dim=-1).to(q.dtype)
        o = torch.einsum("thl,tlhd->thd", p, Vv).reshape(T, self.nh * self.hd)
        return self.o_proj(o)


class FlashLlamaLayer(torch.nn.Module):
    def __init__(self, hf_layer, cfg):
        super().__init__()
        self.input_layernorm = hf_layer.input_layernorm
        self.post_attention_layernorm = hf_layer.post_attention_layernorm
        self.self_attn = FlashLlamaAttention(hf_layer.self_attn, cfg)
        self.mlp = hf_layer.mlp

    def forward(self, hidden_states, residual, cos, sin, cu_seqlen_prefill, kv_cache, seq_slots, positions):
        res = hidden_states if residual is None else hidden_states + residual  # fused add + norm
        attn = self.self_attn(self.input_layernorm(res), cos, sin, kv_cache, seq_slots, positions)
        attn_res = attn + res
        mlp_out = self.mlp(self.post_attention_layernorm(attn_res))
        return mlp_out, attn_res


class FlashLlamaModel(torch.nn.Module):
    def __init__(self, hf):
        super().__init__()
        cfg = hf.config
        self.layers = torch.nn.ModuleList(FlashLlamaLayer(layer, cfg) for layer in hf.model.layers)
        self.norm = hf.model.norm
        self.register_buffer("inv_freq", hf.model.rotary_emb.inv_freq.clone(), persistent=False)
        self.attention_scaling = float(getattr(hf.model.rotary_emb, "attention_scaling", 1.0))

    def forward(self, x, positions, cu_seqlen_prefill, kv_cache, seq_slots):
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(x.dtype)
        sin = (emb.sin() * self.attention_scaling).to(x.dtype)
        hidden, residual = x, None
        for i, layer in enumerate(self.layers):
            hidden, residual = layer(hidden, residual, cos, sin, cu_seqlen_prefill, kv_cache[i], seq_slots, positions)
        return self.norm(hidden + residual)


class TensorParallelHead(torch.nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.linear = linear
        self.should_gather = False

    def forward(self, x):
        return self.linear(x)


class SpeculativeHead(torch.nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.head = TensorParallelHead(linear)
        self.speculator = None

    def forward(self, x):
        return self.head(x), None


class FlashLlamaForCausalLM(torch.nn.Module):
    def __init__(self, hf):
        super().__init__()
        self.embed_tokens = hf.model.embed_tokens
        self.model = FlashLlamaModel(hf)
        self.lm_head = SpeculativeHead(hf.lm_head)

    def forward(self, input_ids, positions, cu_seqlen_prefill, kv_cache, seq_slots, lm_head_indices=None):
        h = self.model(self.embed_tokens(input_ids), positions, cu_seqlen_prefill, kv_cache, seq_slots)
        if lm_head_indices is not None:
            h = h[lm_head_indices]
        return self.lm_head(h)


# ----------------------------------------------------------------------------- flash_causal_lm
CUDA_GRAPHS = [1, 2, 4, 8]
SETTINGS = {"speculate": 0, "max_prefill_tokens": 4096, "chunking": True}


def get_speculate():
    return SETTINGS["speculate"]


class FlashCausalLMBatch:
    def __init__(self, **kw):
        self.__dict__.update(kw)

    def __len__(self):
        return len(self.requests)

    @classmethod
    def from_pb(cls, pb, tokenizer, dtype, device):
        return cls.from_tokenized(pb, tokenizer, [list(r.input_ids) for r in pb.requests], dtype, device)

    @classmethod
    def from_tokenized(cls, pb, tokenizer, tokenized, dtype, device):
        prompt_lengths, input_lengths, chunks = [], [], []
        for r, ids in zip(pb.requests, tokenized):
            n = len(ids)
            il = n if r.chunk_len is None else min(r.chunk_len, n)
            if il < n:
                assert get_speculate() == 0, "speculation is not supported with chunked prefill"
            prompt_lengths.append(n)
            input_lengths.append(il)
            chunks.append(ids[:il])
        return cls(
            batch_id=pb.id, requests=list(pb.requests), dtype=dtype, device=device,
            all_input_ids=[list(x) for x in tokenized], prompt_lengths=prompt_lengths,
            cache_lengths=[0] * len(pb.requests), input_lengths=input_lengths, input_ids=chunks,
            prefilling=True, prefilling_mask=[True] * len(pb.requests),
            next_token_chooser=HeterogeneousNextTokenChooser.from_pb([r.parameters for r in pb.requests], dtype, device),
            speculative_ids=None, cu_seqlen_prefill=None, prefill_head_indices=None, prefill_next_token_indices=None,
            kv_slots=[None] * len(pb.requests), generated=[0] * len(pb.requests),
            max_new_tokens=[r.max_new_tokens for r in pb.requests],
        )

    def filter(self, request_ids):
        if len(request_ids) == 0:
            raise ValueError("Batch must have at least one request")
        if len(request_ids) == len(self):
            return self
        pos = {r.id: i for i, r in enumerate(self.requests)}
        indices = [pos[i] for i in request_ids]
        pick = lambda xs: [xs[i] for i in indices]  # noqa: E731
        for i, r in enumerate(self.requests):
            if r.id not in request_ids and self.kv_slots[i] is not None:
                self.kv_pool.append(self.kv_slots[i])
        out = FlashCausalLMBatch(**self.__dict__)
        for name in ("requests", "all_input_ids", "prompt_lengths", "cache_lengths", "input_lengths", "prefilling_mask",
                     "kv_slots", "generated", "max_new_tokens"):
            setattr(out, name, pick(getattr(self, name)))
        out.input_ids = pick(self.input_ids) if isinstance(self.input_ids, list) else self.input_ids[indices]
        out.speculative_ids = None if self.speculative_ids is None else self.speculative_ids[indices]
        out.next_token_chooser = self.next_token_chooser.filter(indices)
        out.cu_seqlen_prefill = None
        return out

    @classmethod
    def concatenate(cls, batches):
        prefilling = any(b.prefilling for b in batches)
        out = FlashCausalLMBatch(**batches[0].__dict__)
        out.batch_id = batches[0].batch_id
        for name in ("requests", "all_input_ids", "prompt_lengths", "cache_lengths", "input_lengths", "prefilling_mask",
                     "kv_slots", "generated", "max_new_tokens"):
            setattr(out, name, [x for b in batches for x in getattr(b, name)])
        if prefilling:  # every row back to a list of pending input tokens
            ids = []
            for b in batches:
                ids.extend(b.input_ids if isinstance(b.input_ids, list) else [[int(t)] for t in b.input_ids.tolist()])
            out.input_ids = ids
        else:
            out.input_ids = torch.cat([b.input_ids for b in batches])
        out.prefilling = prefilling
        specs = [b.speculative_ids for b in batches]
        out.speculative_ids = torch.cat(specs) if all(s is not None for s in specs) and not prefilling else None
        # the chooser is rebuilt from the requests' protobuf parameters (processors added later are lost)
        out.next_token_chooser = HeterogeneousNextTokenChooser.from_pb(
            [r.parameters for r in out.requests], batches[0].next_token_chooser.dtype, batches[0].next_token_chooser.device)
        out.cu_seqlen_prefill = None
        return out

    def prepare_for_prefill(self):
        assert self.speculative_ids is None
        dev = self.device
        flat, pos, slots, head, nxt = [], [], [], [], []
        cu = [0]
        any_logprobs = any(r.prefill_logprobs for r in self.requests)
        for i, (ids, c) in enumerate(zip(self.input_ids, self.cache_lengths)):
            if self.kv_slots[i] is None:
                self.kv_slots[i] = self.kv_pool.pop()
            flat.extend(ids)
            pos.extend(range(c, c + len(ids)))
            slots.extend([self.kv_slots[i]] * len(ids))
            start = cu[-1]
            cu.append(start + len(ids))
            if self.requests[i].prefill_logprobs and self.prefilling_mask[i]:
                head.extend(range(start, cu[-1]))
            else:
                head.append(cu[-1] - 1)
            nxt.append(len(head) - 1)
        self.flat_input_ids = torch.tensor(flat, dtype=torch.long, device=dev)
        self.flat_positions = torch.tensor(pos, dtype=torch.long, device=dev)
        self.flat_slots = torch.tensor(slots, dtype=torch.long, device=dev)
        self.cu_seqlen_prefill = torch.tensor(cu, dtype=torch.int32, device=dev)
        self.prefill_head_indices = torch.tensor(head, dtype=torch.long, device=dev)
        self.prefill_next_token_indices = torch.tensor(nxt, dtype=torch.long, device=dev) if any_logprobs else None


@dataclass
class Generation:
    request_id: int
    tokens: list
    stopped: bool


class Model:
    """TGI's base class of every model class (models/model.py)."""

    def __init__(self, model, device=None, tokenizer=None):
        self.model = model
        self.device = device or torch.device("cpu")
        self.tokenizer = tokenizer  # TGI's Model keeps the tokenizer its batches are tokenized with


class CausalLM(Model):
    """A non-flash model class TGI may choose (CausalLM.fallback): its own per-request choosers."""

    def __init__(self, hf_model):
        super().__init__(hf_model)


class FlashCausalLM(Model):
    def __init__(self, hf_model, max_requests=32, max_len=96, cuda_graphs=True, tokenizer=None):
        cfg = hf_model.config
        self.config = cfg
        super().__init__(FlashLlamaForCausalLM(hf_model).eval(), tokenizer=tokenizer)
        self.speculate = get_speculate()
        self.device = torch.device("cpu")
        self.dtype = hf_model.lm_head.weight.dtype
        kvh, hd = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
        self.pad_slot = max_requests
        self.kv_cache = [(torch.zeros(max_requests + 1, max_len, kvh, hd), torch.zeros(max_requests + 1, max_len, kvh, hd))
                         for _ in range(cfg.num_hidden_layers)]
        self.kv_pool = list(range(max_requests - 1, -1, -1))
        self.use_graphs = cuda_graphs
        self.cuda_graphs = {}
        self.replays = 0
        self.eager_forwards = 0
        self.eos_token_id = cfg.eos_token_id
        self.accepted_extra = 0  # speculative tokens accepted (beyond one per row and step)

    @property
    def batch_type(self):
        return FlashCausalLMBatch

    def warmup(self, batch, max_input_tokens=None, max_total_tokens=None):
        batch.kv_pool = self.kv_pool
        _, b, _ = self.generate_token(batch)
        if b is not None:  # give the dummy requests' KV slots back
            self.kv_pool.extend(s for s in b.kv_slots if s is not None)
        if self.use_graphs:
            from torch.fx.experimental.proxy_tensor import make_fx

            for bs in sorted(CUDA_GRAPHS, reverse=True):
                if self.speculate + 1 > bs:
                    continue
                args = (torch.zeros(bs, dtype=torch.long), torch.zeros(bs, dtype=torch.long),
                        torch.full((bs,), self.pad_slot, dtype=torch.long))
                def decode(input_ids, positions, slots):
                    return self._decode_forward(input_ids, positions, slots)

                with torch.no_grad():
                    self.cuda_graphs[bs] = make_fx(decode)(*args)
        return 0, 0, 0

    def _decode_forward(self, input_ids, positions, slots):
        logits, _ = self.model(input_ids, positions, None, self.kv_cache, slots, None)
        return logits

    def forward(self, batch):
        if batch.prefilling:
            self.eager_forwards += 1
            return self.model(batch.flat_input_ids, batch.flat_positions, batch.cu_seqlen_prefill, self.kv_cache,
                              batch.flat_slots, batch.prefill_head_indices)
        base = torch.tensor(batch.cache_lengths, dtype=torch.long)
        slots = torch.tensor(batch.kv_slots, dtype=torch.long)
        if batch.speculative_ids is not None:
            S = batch.speculative_ids.shape[1] + 1
            ids = torch.cat([batch.input_ids.unsqueeze(1), batch.speculative_ids], 1).reshape(-1)
            pos = (base[:, None] + torch.arange(S)[None, :]).reshape(-1)
            slots = slots.repeat_interleave(S)
        else:
            ids, pos = batch.input_ids, base
        rows = ids.shape[0]
        sizes = sorted(k for k in self.cuda_graphs if k >= rows)
        if not sizes:
            self.eager_forwards += 1
            return self.model(ids, pos, None, self.kv_cache, slots, None)
        bs = sizes[0]
        pad = bs - rows
        ids = torch.cat([ids, ids.new_zeros(pad)])
        pos = torch.cat([pos, pos.new_zeros(pad)])
        slots = torch.cat([slots, slots.new_full((pad,), self.pad_slot)])
        self.replays += 1
        return self.cuda_graphs[bs](ids, pos, slots)[:rows], None  # replay: recorded tensor ops only, no hooks

    def generate_token(self, batch):
        batch.kv_pool = self.kv_pool
        prefill = batch.prefilling
        if prefill:
            batch.prepare_for_prefill()
        with torch.no_grad():
            out, _ = self.forward(batch)
        if prefill and batch.prefill_next_token_indices is not None:
            next_token_logits = out[batch.prefill_next_token_indices]
        else:
            next_token_logits = out
        was_prefilling = list(batch.prefilling_mask)
        next_chunks = [1] * len(batch)
        if prefill:
            budget = SETTINGS["max_prefill_tokens"] - (len(batch) - 1)
            still = []
            for i in reversed(range(len(batch))):
                remaining = max(batch.prompt_lengths[i] - batch.cache_lengths[i] - batch.input_lengths[i], 0)
                if remaining > 0:
                    n = max(min(remaining, budget), 1)
                    budget -= n
                    next_chunks[i] = n
                    still.append(True)
                else:
                    still.append(False)
            still.reverse()
            batch.prefilling = any(still)
            batch.prefilling_mask = still
        W = max(len(x) for x in batch.all_input_ids)
        hist = torch.full((len(batch), W), -1, dtype=torch.long)
        for i, x in enumerate(batch.all_input_ids):
            hist[i, : len(x)] = torch.tensor(x)
        speculate = 0 if batch.prefilling else get_speculate()
        CURRENT_IDS[:] = [r.id for r in batch.requests]
        CURRENT_STILL[:] = list(batch.prefilling_mask) if prefill else [False] * len(batch)
        next_ids, _, _, accepted, spec = batch.next_token_chooser(hist, next_token_logits, speculate,
                                                                  batch.speculative_ids, None)
        next_ids, accepted = next_ids.tolist(), accepted.tolist()  # the host sync TGI does here too
        self.accepted_extra += sum(a - 1 for a in accepted)
        gens, stopped_all, cum = [], True, 0
        new_inputs = []
        for i, r in enumerate(batch.requests):
            acc = accepted[i]
            toks = next_ids[cum: cum + acc]
            cum += acc
            if was_prefilling[i] and batch.prefilling_mask[i]:  # mid-prompt chunk: token discarded
                batch.cache_lengths[i] += batch.input_lengths[i]
                batch.input_lengths[i] = next_chunks[i]
                c = batch.cache_lengths[i]
                new_inputs.append(batch.all_input_ids[i][c: c + next_chunks[i]])
                stopped_all = False
                continue
            toks = toks[: batch.max_new_tokens[i] - batch.generated[i]]
            eos = self.eos_token_id in toks  # like TGI's StoppingCriteria: EOS ends the request
            if eos:
                toks = toks[: toks.index(self.eos_token_id) + 1]
            batch.generated[i] += len(toks)
            batch.all_input_ids[i].extend(toks)
            batch.cache_lengths[i] += batch.input_lengths[i] + acc - 1
            batch.input_lengths[i] = 1
            new_inputs.append([toks[-1]])
            stopped = eos or batch.generated[i] >= batch.max_new_tokens[i]
            stopped_all &= stopped
            gens.append(Generation(r.id, toks, stopped))
        if batch.prefilling:
            batch.input_ids = new_inputs
        else:
            batch.input_ids = torch.tensor([x[0] for x in new_inputs], dtype=torch.long)
            batch.speculative_ids = spec if get_speculate() > 0 else None
        batch.cu_seqlen_prefill = None
        if stopped_all:
            self.kv_pool.extend(s for s in batch.kv_slots if s is not None)
            return gens, None, (0, 0)
        return gens, batch, (0, 0)


# ----------------------------------------------------------------------------- cache, cli
class Cache:
    def __init__(self):
        self.cache = {}

    def pop(self, batch_id):
        return self.cache.pop(batch_id, None)

    def set(self, entry):
        if entry is not None:
            self.cache[entry.batch_id] = entry

    def delete(self, batch_id):
        batch = self.pop(batch_id)
        if batch is not None:
            batch.kv_pool.extend(s for s in batch.kv_slots if s is not None)

    def clear(self):
        for k in list(self.cache):
            self.delete(k)


CLI_CALLS: list = []


def app():
    CLI_CALLS.append(list(sys.argv))


# ----------------------------------------------------------------------------- package
def install_fake_package() -> dict:
    """Put the fake ``text_generation_server`` modules into sys.modules; returns the old entries."""
    saved = {name: sys.modules.get(name) for name in MODULES}
    mods = {name: types.ModuleType(name) for name in MODULES}
    for name, mod in mods.items():
        if name != ROOT:
            mod.__package__ = name.rsplit(".", 1)[0]
        mod.__path__ = []  # a package, so submodule imports resolve through sys.modules
    tok = mods[f"{ROOT}.utils.tokens"]
    tok.HeterogeneousNextTokenChooser = HeterogeneousNextTokenChooser
    mods[f"{ROOT}.models.model"].Model = Model
    fl = mods[f"{ROOT}.models.flash_causal_lm"]
    fl.FlashCausalLMBatch, fl.FlashCausalLM, fl.CUDA_GRAPHS = FlashCausalLMBatch, FlashCausalLM, CUDA_GRAPHS
    mods[f"{ROOT}.cache"].Cache = Cache
    mods[f"{ROOT}.cli"].app = app
    sys.modules.update(mods)
    return saved


def remove_fake_package(saved: dict) -> None:
    for name, old in saved.items():
        if old is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = old


# ----------------------------------------------------------------------------- router
class Router:
    """Drives the server like TGI's router: ``arrivals[step]`` requests join at that step."""

    def __init__(self, model: FlashCausalLM, chunking: bool = True):
        self.model = model
        self.cache = Cache()
        self.chunking = chunking
        self.batch_ids = 0
        self.outputs: dict[int, list] = {}
        self.steps = 0

    def _new_batch(self, requests):
        self.batch_ids += 1
        return FlashCausalLMBatch.from_pb(PbBatch(self.batch_ids, requests), None, self.model.dtype, self.model.device)

    def _after(self, gens, next_batch):
        for g in gens:
            self.outputs.setdefault(g.request_id, []).extend(g.tokens)
        if next_batch is None:
            return None
        done = {g.request_id for g in gens if g.stopped}
        if done:
            keep = [r.id for r in next_batch.requests if r.id not in done]
            self.cache.set(next_batch)
            b = self.cache.pop(next_batch.batch_id)
            next_batch = b.filter(keep)
        return next_batch

    def run(self, arrivals: dict[int, list], max_steps: int = 200) -> dict[int, list]:
        running = None
        step = 0
        pending = dict(arrivals)
        while step < max_steps and (running is not None or pending):
            new = pending.pop(step, None)
            if new:
                batch = self._new_batch(new)
                if running is not None and self.chunking:
                    batch = FlashCausalLMBatch.concatenate([running, batch])  # Prefill(batch, cached_batch)
                    running = None
                gens, nb = self.model.generate_token(batch)[:2]
                nb = self._after(gens, nb)
                if running is not None and nb is not None:
                    running = FlashCausalLMBatch.concatenate([running, nb])  # Decode([running, new])
                elif nb is not None:
                    running = nb
            elif running is not None:
                gens, nb = self.model.generate_token(running)[:2]
                running = self._after(gens, nb)
            step += 1
            self.steps = step
        assert running is None and not pending, "the simulation did not finish"
        return self.outputs
