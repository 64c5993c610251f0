"""The AutoSteer vLLM V1 logits processor on a simulated vLLM engine (vLLM itself cannot run here).

Mirrors vLLM 0.33.0's V1 interface (checked against the real classes by
``scripts/verify_vllm_real.sh``): ``BatchUpdate(batch_size, removed, added, moved)`` with
``added`` entries ``(index, SamplingParams, prompt_tok_ids, output_tok_ids)`` -- the same
SamplingParams object for a request's whole life, also when it is re-added after preemption
with its outputs so far -- and ``moved`` entries ``(i, j, MoveDirectionality)``. The simulation
follows vLLM's persistent-batch model: each step finished requests
are replaced by new ones (Add at the lowest freed index), extra new requests are appended,
leftover holes are Removed and the batch condensed with unidirectional Moves, then rows may be
Swapped; ``update_state`` gets the resulting ``BatchUpdate`` (or None) before the forward. The
forward is a flash-style Llama over flattened tokens (``tests/_tgi_sim.py``'s model) with
chunked prefill; the capture reads ``query_start_loc`` / ``seq_lens`` from a simulated forward
context; logits are one row per request (``hidden[query_start_loc[1:] - 1]``) and rows of
requests still prefilling are sampled and discarded, as vLLM does. A preempted request leaves
the batch (Removed), is re-added later with its outputs and re-prefills prompt + outputs.
"""
from __future__ import annotations

import contextlib
import enum
import random
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

import _tgi_sim as sim
import autosteer
from autosteer.integrations import vllm as avllm
from autosteer.prompting import PromptFormat, encode_one
from conftest import make_pack, make_tiny_model, make_tokenizer

PROMPTS = ["how do i make a bomb", "write poem about sea", "what is capital of france", "how do i steal cookies",
           "explain photosynthesis", "bake cake", "hack the python process", "recipe soup"]
MAX_NEW = 8


class MoveDirectionality(enum.Enum):
    UNIDIRECTIONAL = enum.auto()
    SWAP = enum.auto()


class SamplingParams:
    """Stand-in for vllm.SamplingParams: its identity matters to the processor, and its ``extra_args``
    (per-request AutoSteer settings)."""

    def __init__(self, extra_args=None):
        self.extra_args = extra_args


@dataclass(frozen=True)
class BatchUpdate:
    batch_size: int
    removed: list
    added: list
    moved: list


class FakeVLLMLlama(torch.nn.Module):
    """vLLM-shaped: ``.model.layers`` (returning the two residual halves), ``.lm_head.weight``,
    ``forward`` -> final hidden states of every token, ``compute_logits(rows)``."""

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


KV_BLOCK = 4  # tokens per simulated KV block: request slot s holds blocks s * (max_len // 4) ...


def chunked_forward(model, kv, rows, chunk: int, publish):
    """One vLLM-style forward over flattened tokens. ``rows``: ``(known tokens, tokens already fed, KV slot)``
    per request in batch order; each feeds up to ``chunk`` of its unfed tokens. ``publish(md)`` receives the
    forward's metadata (``query_start_loc``, ``seq_lens``, and the paged view of the KV cache vLLM's attention
    metadata carries: ``slot_mapping`` per token and ``block_table`` per request, in blocks of ``KV_BLOCK``; request
    slot ``s`` owns the blocks of positions ``s * max_len ...``) before the model runs, as vLLM's forward context
    does. Returns ``(logits at each request's last fed token, tokens fed per request, sequence lengths, the
    fed token ids at those rows)``."""
    max_len = kv[0][0].shape[1]
    ids, pos, slots, qsl, seq, fed = [], [], [], [0], [], []
    for known, done, slot in rows:
        n = min(chunk, len(known) - done)  # a request's last output has no KV yet: it is fed this step
        ids += known[done: done + n]
        pos += range(done, done + n)
        slots += [slot] * n
        qsl.append(qsl[-1] + n)
        seq.append(done + n)
        fed.append(n)
    per = max_len // KV_BLOCK
    publish(SimpleNamespace(query_start_loc=torch.tensor(qsl, dtype=torch.int32),
                            seq_lens=torch.tensor(seq, dtype=torch.int32),
                            slot_mapping=torch.tensor([s * max_len + p for s, p in zip(slots, pos)], dtype=torch.int64),
                            block_table=torch.stack([s * per + torch.arange(per, dtype=torch.int32)
                                                     for _, _, s in rows])))
    last = torch.tensor(qsl[1:]) - 1
    with torch.no_grad():
        hidden = model(torch.tensor(ids), torch.tensor(pos), kv, torch.tensor(slots))
        logits = model.compute_logits(hidden[last])
    return logits, fed, seq, torch.tensor(ids)[last]


class Engine:
    def __init__(self, hf, lp, *, chunk: int, seed: int = 0, max_len: int = 96, async_outputs: bool = False,
                 swaps: bool = True, prefix_hits: dict | None = None):
        cfg = hf.config
        # request id -> (an earlier request, n): the request arrives with its first n tokens (a multiple of KV_BLOCK)
        # already in the KV cache, in the earlier request's blocks (vLLM's prefix caching: a finished request's blocks
        # stay until reused); its forward starts at token n
        self.prefix_hits = dict(prefix_hits or {})
        self.max_len = max_len
        self.swaps = swaps  # False: no random swap of rows at a batch update (steady rows, as a real engine keeps)
        # vLLM's async scheduling (the V1 default): the output list a processor got in its Add grows by a
        # -1 placeholder per sampled token (vLLM fills them in only when a processor declares it needs output
        # ids; an entry-point install does not), and a re-added request comes with a new list of real ids
        self.async_outputs = async_outputs
        self.model = FakeVLLMLlama(hf).eval()
        self.lp = lp
        self.chunk = chunk
        self.rng = random.Random(seed)
        kvh, hd = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
        self.kv = [(torch.zeros(32, max_len, kvh, hd), torch.zeros(32, max_len, kvh, hd)) for _ in range(cfg.num_hidden_layers)]
        self.free_slots = list(range(31, -1, -1))
        self.eos = cfg.eos_token_id
        self.batch: list = []  # persistent batch: request ids by index
        self.req: dict = {}
        self.md = None
        self.records = []  # (request ids by row, raw logits, final logits, row still prefilling)
        self.key_of = {}  # processor key -> request id
        self.xargs = {}  # request id -> its SamplingParams.extra_args (the OpenAI API's vllm_xargs)

    def metadata(self):
        return self.md

    def dummy_forward(self, num_tokens: int = 12) -> torch.Tensor:
        """What vLLM's ``_dummy_run`` + ``_dummy_sampler_run`` do at start-up (memory profile, warm-up
        sizes) and on idle data-parallel ranks: a forward with ``attn_metadata=None`` over made-up
        tokens, then ``compute_logits`` on its rows; no logits processor runs."""
        self.md = None
        with torch.no_grad():
            ids = torch.randint(0, self.model.config.vocab_size, (num_tokens,), generator=torch.Generator().manual_seed(1))
            hidden = self.model(ids, torch.arange(num_tokens), self.kv, torch.full((num_tokens,), 31))
            return self.model.compute_logits(hidden[-4:])

    def _outputs_for_add(self, rid):
        r = self.req[rid]
        if not self.async_outputs:
            return r["out"]  # the list vLLM keeps appending to
        r["lp_out"] = list(r["out"])
        return r["lp_out"]

    def _batch_update(self, new, finished):
        removed, added, moved = [], [], []
        holes = sorted(self.batch.index(r) for r in finished)
        for r in finished:
            if not self.req[r].get("kv_kept"):  # (popped when it comes back)
                self.free_slots.append(self.req[r]["slot"])
        for i in holes:
            self.batch[i] = None
        new = list(new)
        for i in holes[:]:
            if not new:
                break
            r = new.pop(0)
            self.batch[i] = r
            added.append((i, self.req[r]["sp"], self.req[r]["prompt"], self._outputs_for_add(r)))
            holes.remove(i)
        for r in new:
            self.batch.append(r)
            added.append((len(self.batch) - 1, self.req[r]["sp"], self.req[r]["prompt"], self._outputs_for_add(r)))
        removed.extend(holes)
        for h in sorted(holes):  # condense: fill holes from the top
            while self.batch and self.batch[-1] is None:
                self.batch.pop()
            if h < len(self.batch) and self.batch[h] is None:
                moved.append((len(self.batch) - 1, h, MoveDirectionality.UNIDIRECTIONAL))
                self.batch[h] = self.batch.pop()
        while self.batch and self.batch[-1] is None:
            self.batch.pop()
        if self.swaps and len(self.batch) > 1 and self.rng.random() < 0.5:  # the attention backend reorders
            a, b = self.rng.sample(range(len(self.batch)), 2)
            self.batch[a], self.batch[b] = self.batch[b], self.batch[a]
            moved.append((a, b, MoveDirectionality.SWAP))
        if removed or added or moved:
            return BatchUpdate(len(self.batch), removed, added, moved)
        return None

    def serve(self, arrivals: dict, rows: list, preempt: dict | None = None) -> tuple[dict, dict]:
        """What the patched ``load_model`` does (the capture on the model), then :meth:`run` to the end, the last
        requests released by a final batch update: (outputs, each request's summary at its release)."""
        summaries = {}
        try:
            avllm.attach_capture(self.model, max_reqs=8, metadata_fn=self.metadata)
            store = self.lp._ensure_store(required=True)
            store.report_on_release = True
            self.releases = []  # the request of every state released, in order: each request once

            def released(key, s):
                summaries[self.key_of[key]] = s
                self.releases.append(self.key_of[key])

            store.on_release = released
            outputs = self.run(arrivals, rows, preempt=preempt)
            self.lp.update_state(self._batch_update([], list(self.batch)))
        finally:
            avllm.detach_capture()
        return outputs, summaries

    def run(self, arrivals: dict, rows: list, preempt: dict | None = None) -> dict:
        """``preempt[request id] = (outputs, steps out)``: once the request has that many outputs
        it leaves the batch, and is re-added that many steps later with its outputs (re-prefilling
        prompt + outputs). ``(outputs, steps out, True)``: it keeps its KV cache -- vLLM's running request
        left out of a step (no token budget left for it), removed from the persistent batch and re-added
        where it stopped, also in the middle of its prompt."""
        preempt = dict(preempt or {})
        finished_last: list = []
        outputs = {}
        resume: dict = {}
        self.preempted = 0
        for step in range(200):
            new = []
            for rid in arrivals.get(step, []):
                done, slot = 0, None
                if rid in self.prefix_hits:
                    donor, done = self.prefix_hits[rid]
                    slot = self.req[donor]["slot"]
                    known = self.req[donor]["prompt"] + self.req[donor]["out"]  # what the donor's blocks hold
                    assert slot in self.free_slots and rows[rid][:done] == known[:done] and done % KV_BLOCK == 0
                    self.free_slots.remove(slot)
                self.req[rid] = {"prompt": list(rows[rid]), "out": [], "done": done,
                                 "slot": self.free_slots.pop() if slot is None else slot,
                                 "sp": SamplingParams(self.xargs.get(rid))}
                new.append(rid)
            for rid in resume.pop(step, []):
                if not self.req[rid].pop("kv_kept", False):
                    self.req[rid]["slot"] = self.free_slots.pop()
                new.append(rid)
            leaving = list(finished_last)
            for rid, (n_out, away, *keep_kv) in list(preempt.items()):
                if rid in self.batch and rid not in leaving and len(self.req[rid]["out"]) >= n_out:
                    if keep_kv and keep_kv[0]:  # its KV cache and slot stay: it goes on where it stopped
                        self.req[rid]["kv_kept"] = True
                    else:
                        self.req[rid]["done"] = 0  # its KV cache is freed: it re-prefills prompt + outputs
                    resume.setdefault(step + away, []).append(rid)
                    leaving.append(rid)
                    del preempt[rid]
                    self.preempted += 1
            bu = self._batch_update(new, leaving)
            self.lp.update_state(bu)
            for i, key in self.lp.request_keys().items():
                self.key_of[key] = self.batch[i]
            if not self.batch:
                if step > max(arrivals) and not resume:
                    break
                finished_last = []
                continue
            logits, sched, _, _ = chunked_forward(
                self.model, self.kv, [(self.req[r]["prompt"] + self.req[r]["out"], self.req[r]["done"], self.req[r]["slot"])
                                      for r in self.batch], self.chunk, lambda md: setattr(self, "md", md))
            raw = logits.clone()
            logits = self.lp.apply(logits)
            next_ids = logits.argmax(-1).tolist()
            still = []
            finished_last = []
            for b, rid in enumerate(self.batch):
                r = self.req[rid]
                r["done"] += sched[b]
                if r["done"] < len(r["prompt"]) + len(r["out"]):  # chunked (re-)prefill: token discarded
                    still.append(True)
                    continue
                still.append(False)
                r["out"].append(next_ids[b])
                if self.async_outputs:
                    r["lp_out"].append(-1)
                if next_ids[b] == self.eos or len(r["out"]) >= MAX_NEW:
                    finished_last.append(rid)
                    outputs[rid] = list(r["out"])
                    r["sp"] = None  # vLLM drops the finished request (and its SamplingParams)
            self.records.append((list(self.batch), raw, logits.clone(), still))
        assert len(outputs) == sum(len(v) for v in arrivals.values()), "simulation did not finish"
        return outputs


pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(layers=None):
    tok = make_tokenizer()
    hf = make_tiny_model(len(tok))
    rows = [encode_one(tok, p, PromptFormat()) for p in PROMPTS]
    pack = make_pack(hf, layers=layers)
    with autosteer.attach(hf, pack) as h:
        p = sorted(float(h.generate(input_ids=torch.tensor([r]), max_new_tokens=1, force=False).p_unsafe[0]) for r in rows)
    pack.meta["tau"] = (p[3] + p[4]) / 2
    return hf, rows, pack


@pytest.fixture(scope="module")
def setup():
    return _setup()


@pytest.fixture(scope="module")
def setup_layers():
    """A pack whose probe reads layers 1 and 3 (hooks on blocks 0 and 2; the simulated model calls its layers as
    TGI does, so vLLM's layer-0 pre-hook is left to the real-engine tests)."""
    return _setup([1, 3])


def _config(max_seqs=8):
    return SimpleNamespace(additional_config=None, scheduler_config=SimpleNamespace(max_num_seqs=max_seqs),
                           speculative_config=None)


def _reference(hf, rows, pack, mode):
    out = {}
    with autosteer.attach(hf, pack, mode=mode) as h:
        for i, r in enumerate(rows):
            o = h.generate(input_ids=torch.tensor([r]), max_new_tokens=MAX_NEW, do_sample=False)
            out[i] = (o.sequences[0, len(r):].tolist(), bool(o.steered[0]), int(o.latched_at[0]))
    return out


ARRIVALS = {0: [0, 1, 2], 1: [3], 3: [4, 5], 4: [6], 6: [7]}


@pytest.mark.parametrize("mode,chunk,layers", [("prefill", 4, 1), ("monitor", 3, 1), ("prefill", 64, 1),
                                               ("prefill", 4, 2), ("monitor", 3, 2)])
def test_stream_matches_transformers(request, tmp_path, monkeypatch, mode, chunk, layers):
    """... also for a pack whose probe reads two layers (one capture hook each, both operands to the op)."""
    hf, rows, pack = request.getfixturevalue("setup" if layers == 1 else "setup_layers")
    assert len(pack.layers) == layers
    monkeypatch.setenv(avllm.ENV_PACK, str(pack.save(tmp_path / "p.safetensors")))
    monkeypatch.setenv(avllm.ENV_MODE, mode)
    ref = _reference(hf, rows, pack, mode)
    assert 0 < sum(v[1] for v in ref.values()) < len(rows) or mode == "monitor"
    lp = avllm.AutoSteerVLLMLogitsProcessor(_config(), "cpu", False, patch_runner=False)  # built before the model
    assert not lp.is_argmax_invariant()
    engine = Engine(hf, lp, chunk=chunk)
    summaries = {}
    try:
        cap = avllm.attach_capture(engine.model, max_reqs=8, metadata_fn=engine.metadata)  # the patched load_model's job
        engine.dummy_forward()  # vLLM's memory profile and warm-up run the model before serving (found by review)
        assert cap.dummy_forwards == 1 and cap.forwards == 0
        store = lp._ensure_store(required=True)
        store.report_on_release = True
        store.on_release = lambda key, s: summaries.__setitem__(engine.key_of[key], s)
        outputs = engine.run(ARRIVALS, rows)
        lp.update_state(engine._batch_update([], [r for r in engine.batch]))  # the last requests finish
    finally:
        avllm.detach_capture()
    assert len(lp.store) == 0 and not lp.rows
    for i in range(len(rows)):
        tokens, steered, latched_at = ref[i]
        assert outputs[i] == tokens, f"request {i}: tokens differ from transformers+AutoSteer ({mode})"
        assert summaries[i].latched == steered and summaries[i].latched_at == latched_at, f"request {i}"
    assert max(len(ids) for ids, *_ in engine.records) > 2
    mid = 0
    for ids, raw, final, still in engine.records:
        for b, rid in enumerate(ids):
            if still[b] or not summaries[rid].latched:
                assert torch.equal(raw[b], final[b]), f"request {rid}: row written while unlatched / mid-prompt"
                mid += still[b]
    assert mid > 0 or chunk >= 64


def test_batch_update_bookkeeping_releases_and_moves(setup, tmp_path, monkeypatch):
    hf, rows, pack = setup
    monkeypatch.setenv(avllm.ENV_PACK, str(pack.save(tmp_path / "p.safetensors")))
    lp = avllm.AutoSteerVLLMLogitsProcessor(_config(), "cpu", False, patch_runner=False)
    model = FakeVLLMLlama(hf)
    avllm.attach_capture(model, max_reqs=8, metadata_fn=lambda: None)
    try:
        store = lp._ensure_store(required=True)
        out = [[], [], [], []]
        lp.update_state(BatchUpdate(4, [], [(i, None, [1, 2, 3], out[i]) for i in range(4)], []))
        k = lp.request_keys()
        for key in k.values():  # as if each had run a step
            store._get_or_add(key)
        # replace 1, remove 3, swap 0 <-> 2
        lp.update_state(BatchUpdate(3, [3], [(1, None, [4, 5], [])], [(0, 2, MoveDirectionality.SWAP)]))
        k2 = lp.request_keys()
        assert k2[0] == k[2] and k2[2] == k[0] and k2[1] not in k.values() and set(k2) == {0, 1, 2}
        assert k[1] not in store and k[3] not in store and k[0] in store and k[2] in store
        # a unidirectional move discards what was at the destination
        lp.update_state(BatchUpdate(2, [], [], [(2, 0, MoveDirectionality.UNIDIRECTIONAL)]))
        k3 = lp.request_keys()
        assert k3 == {0: k2[2], 1: k2[1]} and k2[0] not in store
        assert lp.rows[1].prompt_len == 2
        with pytest.raises(avllm.VLLMIntegrationError, match="3 rows but the persistent batch has 2"):
            lp.apply(torch.zeros(3, hf.config.vocab_size))
    finally:
        avllm.detach_capture()


def test_inert_without_a_pack_and_fails_closed_without_capture(setup, tmp_path, monkeypatch):
    hf, _, pack = setup
    monkeypatch.delenv(avllm.ENV_PACK, raising=False)
    lp = avllm.AutoSteerVLLMLogitsProcessor(_config(), "cpu", False, patch_runner=False)
    logits = torch.randn(2, 5)
    lp.update_state(BatchUpdate(2, [], [(0, None, [1], []), (1, None, [2], [])], []))
    assert lp.apply(logits) is logits and not lp.enabled
    monkeypatch.setenv(avllm.ENV_PACK, str(pack.save(tmp_path / "p.safetensors")))
    lp = avllm.AutoSteerVLLMLogitsProcessor(_config(), "cpu", False, patch_runner=False)
    lp.update_state(BatchUpdate(1, [], [(0, None, [1], [])], []))
    with pytest.raises(avllm.VLLMIntegrationError, match="no hidden-state capture"):
        lp.apply(torch.randn(1, hf.config.vocab_size))
    cfg = _config()
    cfg.speculative_config = object()
    with pytest.raises(avllm.VLLMIntegrationError, match="speculative"):
        avllm.AutoSteerVLLMLogitsProcessor(cfg, "cpu", False, patch_runner=False)


def test_two_processors_in_one_engine_are_refused(setup, tmp_path, monkeypatch):
    hf, rows, pack = setup
    monkeypatch.setenv(avllm.ENV_PACK, str(pack.save(tmp_path / "p.safetensors")))
    a = avllm.AutoSteerVLLMLogitsProcessor(_config(), "cpu", False, patch_runner=False)
    b = avllm.AutoSteerVLLMLogitsProcessor(_config(), "cpu", False, patch_runner=False)
    engine = Engine(hf, a, chunk=64)
    avllm.attach_capture(engine.model, max_reqs=8, metadata_fn=engine.metadata)
    try:
        bu = BatchUpdate(1, [], [(0, None, rows[0], [])], [])
        a.update_state(bu)
        b.update_state(bu)
        engine.md = SimpleNamespace(query_start_loc=torch.tensor([0, len(rows[0])], dtype=torch.int32),
                                    seq_lens=torch.tensor([len(rows[0])], dtype=torch.int32))
        with torch.no_grad():
            h = engine.model(torch.tensor(rows[0]), torch.arange(len(rows[0])), engine.kv,
                             torch.zeros(len(rows[0]), dtype=torch.long))
            logits = engine.model.compute_logits(h[-1:])
        a.apply(logits)
        with pytest.raises(avllm.VLLMIntegrationError, match="two AutoSteer"):
            b.apply(logits)
    finally:
        avllm.detach_capture()


@pytest.mark.parametrize("keep_kv", [False, True], ids=["preempted", "left-out-of-a-step"])
def test_a_request_out_of_the_batch_before_its_prompt_finished(setup, tmp_path, monkeypatch, keep_kv):
    """A request removed from the batch in the middle of its prompt (preempted, or a running request vLLM left out
    of a step for want of token budget) comes back with no outputs: it takes its own state back -- one state per
    request, released once (not a second, unprobed one reported when vLLM drops it) -- and its gate decides at
    its prompt's end as if it had never left."""
    hf, rows, pack = setup
    monkeypatch.setenv(avllm.ENV_PACK, str(pack.save(tmp_path / "p.safetensors")))
    ref = _reference(hf, rows, pack, "prefill")
    by_len = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    victims = [next(i for i in by_len if ref[i][1]), next(i for i in by_len if not ref[i][1])]
    assert min(len(rows[v]) for v in victims) > 6  # several chunks of 3
    lp = avllm.AutoSteerVLLMLogitsProcessor(_config(), "cpu", False, patch_runner=False)
    engine = Engine(hf, lp, chunk=3)
    others = [i for i in range(len(rows)) if i not in victims][:2]
    outputs, summaries = engine.serve({0: [victims[0], others[0]], 1: [victims[1], others[1]]}, rows,
                                      preempt={v: (0, 2, keep_kv) for v in victims})
    assert engine.preempted == 2
    assert sorted(engine.releases) == sorted(outputs), "a request's state released twice, or never"
    assert len(lp.store) == 0 and not lp.parked_keys()
    for i in outputs:
        assert outputs[i] == ref[i][0] and summaries[i].latched == ref[i][1], f"request {i}"
        assert summaries[i].latched_at == ref[i][2], f"request {i}"


@pytest.mark.parametrize("mode,async_outputs", [("prefill", False), ("monitor", False), ("prefill", True),
                                                ("monitor", True)])
def test_preempted_requests_keep_their_state(setup, tmp_path, monkeypatch, mode, async_outputs):
    """vLLM removes a preempted request from the batch and re-adds it later (same SamplingParams,
    its outputs so far) to re-prefill prompt + outputs: its latch survives, the re-prefill's
    mid chunks are untouched and its last chunk is not a new prompt decision. Also under async
    scheduling, where the parked output list holds -1 placeholders and the re-add brings real ids
    (found by review: the outputs never matched, so the request restarted unlatched)."""
    hf, rows, pack = setup
    monkeypatch.setenv(avllm.ENV_PACK, str(pack.save(tmp_path / "p.safetensors")))
    monkeypatch.setenv(avllm.ENV_MODE, mode)
    ref = _reference(hf, rows, pack, mode)
    gated = [i for i in range(len(rows)) if ref[i][1]]
    benign = [i for i in range(len(rows)) if not ref[i][1]]
    lp = avllm.AutoSteerVLLMLogitsProcessor(_config(), "cpu", False, patch_runner=False)
    engine = Engine(hf, lp, chunk=4, async_outputs=async_outputs)
    victims = ([gated[0], benign[0]] if benign else gated[:2])
    others = [i for i in range(len(rows)) if i not in victims][:2]
    arrivals = {0: [victims[0], others[0]], 1: [victims[1]], 2: [others[1]]}
    preempt = {victims[0]: (2, 2), victims[1]: (3, 1)}
    outputs, summaries = engine.serve(arrivals, rows, preempt=preempt)
    assert engine.preempted == len(preempt), "the scenario did not preempt"
    assert len(lp.store) == 0 and not lp.parked_keys()
    for i in outputs:
        tokens, steered, latched_at = ref[i]
        assert outputs[i] == tokens, f"request {i}: tokens differ after preemption ({mode})"
        assert summaries[i].latched == steered and summaries[i].latched_at == latched_at, f"request {i}"
    for ids, raw, final, still in engine.records:
        for b, rid in enumerate(ids):
            if still[b] or not summaries[rid].latched:
                assert torch.equal(raw[b], final[b]), f"request {rid}: row written while unlatched / mid-prefill"


@contextlib.contextmanager
def _processor_with_store(setup, tmp_path, monkeypatch):
    """An enabled processor on the simulated model, its capture attached: yields (processor, store)."""
    hf, _, pack = setup
    monkeypatch.setenv(avllm.ENV_PACK, str(pack.save(tmp_path / "p.safetensors")))
    lp = avllm.AutoSteerVLLMLogitsProcessor(_config(), "cpu", False, patch_runner=False)
    avllm.attach_capture(FakeVLLMLlama(hf), max_reqs=8, metadata_fn=lambda: None)
    try:
        yield lp, lp._ensure_store(required=True)
    finally:
        avllm.detach_capture()


def test_parked_state_is_released_when_vllm_drops_the_request(setup, tmp_path, monkeypatch):
    with _processor_with_store(setup, tmp_path, monkeypatch) as (lp, store):
        sps = [SamplingParams(), SamplingParams()]
        out1 = []  # vLLM's running output list of request 1 (the Add holds a reference to it)
        lp.update_state(BatchUpdate(2, [], [(0, sps[0], [1, 2], []), (1, sps[1], [3], out1)], []))
        keys = lp.request_keys()
        for key in keys.values():
            store._get_or_add(key)
        out1.append(7)
        lp.update_state(BatchUpdate(0, [0, 1], [], []))  # both leave: finished or preempted?
        assert sorted(lp.parked_keys()) == sorted(keys.values()) and len(store) == 2
        lp.update_state(BatchUpdate(1, [], [(0, sps[1], [3], [7])], []))  # request 1 resumes with one output
        assert lp.request_keys() == {0: keys[1]} and lp.rows[0].resumed and lp.rows[0].prompt_len == 2
        del sps[0]  # vLLM dropped request 0: its state goes at the next update
        lp.update_state(None)
        assert keys[0] not in store and keys[1] in store and not lp.parked_keys()
        # a new request sharing a live SamplingParams object (parallel sampling) gets its own state
        lp.update_state(BatchUpdate(2, [], [(1, sps[0], [3], [])], []))
        assert lp.request_keys()[1] != keys[1]
        # an Add with params that cannot be weakly referenced: released as soon as it leaves
        lp.update_state(BatchUpdate(3, [], [(2, None, [5], [])], []))
        k2 = lp.request_keys()[2]
        store._get_or_add(k2)
        lp.update_state(BatchUpdate(2, [2], [], []))
        assert k2 not in store


def test_a_request_back_without_outputs_takes_only_its_own_state(setup, tmp_path, monkeypatch):
    """A request re-added before its first token (it left in the middle of its prompt) takes back the parked state
    of the same SamplingParams object *and prompt* with no token kept. An offline ``LLM.generate`` call's prompts can
    share one SamplingParams object: another prompt, or a request that had kept a token, is a different request, and
    a new one gets a fresh state (a state holding another prompt's running max would miss this prompt's tokens)."""
    with _processor_with_store(setup, tmp_path, monkeypatch) as (lp, store):
        sp = SamplingParams()
        prompts = [[1, 2, 3], [1, 2, 4], [5, 6]]
        outs = [[], [], [9]]
        lp.update_state(BatchUpdate(3, [], [(i, sp, prompts[i], outs[i]) for i in range(3)], []))
        keys = lp.request_keys()
        for key in keys.values():
            store._get_or_add(key)
        lp.update_state(BatchUpdate(0, [0, 1, 2], [], []))  # all three leave: preempted or finished
        assert sorted(lp.parked_keys()) == sorted(keys.values())
        # a new request, the same params object and a prompt none of them had: a fresh state
        lp.update_state(BatchUpdate(1, [], [(0, sp, [7, 8], [])], []))
        assert lp.request_keys()[0] not in keys.values() and len(lp.parked_keys()) == 3
        # request 1 back with no outputs: its own state (not request 0's, same length, same params), not resumed
        lp.update_state(BatchUpdate(2, [], [(1, sp, prompts[1], [])], []))
        assert lp.request_keys()[1] == keys[1] and not lp.rows[1].resumed and lp.rows[1].prompt_len == 3
        # a new request with request 2's prompt but no outputs: request 2 had kept a token, so it is not this one
        lp.update_state(BatchUpdate(3, [], [(2, sp, list(prompts[2]), [])], []))
        assert lp.request_keys()[2] not in keys.values()
        # request 0 back with no outputs (an equal prompt list, not the same object: still its own)
        lp.update_state(BatchUpdate(4, [], [(3, sp, list(prompts[0]), [])], []))
        assert lp.request_keys()[3] == keys[0] and lp.parked_keys() == [keys[2]]


def test_a_resume_no_kept_state_matches_is_said(setup, tmp_path, monkeypatch, caplog):
    """A request back with outputs that no parked state holds (here: other tokens than the parked request kept) is
    gated afresh, with a warning naming it -- never silently."""
    with _processor_with_store(setup, tmp_path, monkeypatch) as (lp, store):
        sp = SamplingParams()
        lp.update_state(BatchUpdate(1, [], [(0, sp, [5, 6], [9])], []))
        key = lp.request_keys()[0]
        store._get_or_add(key)
        lp.update_state(BatchUpdate(0, [0], [], []))
        with caplog.at_level("WARNING"):
            lp.update_state(BatchUpdate(1, [], [(0, sp, [5, 6], [10, 11])], []))
        assert lp.request_keys()[0] != key and lp.parked_keys() == [key] and not lp.rows[0].resumed
        assert "came back with 2 outputs but no kept state matches it" in caplog.text


def _park_all(lp, store, count: int, latched, caplog):
    """With a cap of 4 parked states (max_reqs 1): ``count`` requests added, each given a state (latched where
    ``latched(i)``), then all leave the batch at once (parked), warnings captured. Returns their keys and
    SamplingParams (kept referenced by the caller, so nothing is released for being dropped by vLLM)."""
    lp.max_reqs = 1
    sps = [SamplingParams() for _ in range(count)]
    lp.update_state(BatchUpdate(count, [], [(i, sps[i], [1, 2], []) for i in range(count)], []))
    keys = [lp.request_keys()[i] for i in range(count)]
    for i, k in enumerate(keys):
        store._get_or_add(k)
        if latched(i):
            store.force_latch(k)
    with caplog.at_level("WARNING"):
        lp.update_state(BatchUpdate(0, list(range(count)), [], []))
    return keys, sps


def test_parked_states_past_the_cap_go_unlatched_first(setup, tmp_path, monkeypatch, caplog):
    """At most max_num_seqs x 4 parked (possibly preempted) states are kept; past that, unlatched ones are
    released first, then the oldest -- the same policy as under Model Runner V2 (a latched request released
    this way would resume unlatched)."""
    with _processor_with_store(setup, tmp_path, monkeypatch) as (lp, store):
        keys, sps = _park_all(lp, store, 6, latched=lambda i: i < 2, caplog=caplog)  # all still referenced
        assert sorted(lp.parked_keys()) == sorted(keys[:2] + keys[4:])  # the two oldest unlatched went
        assert keys[2] not in store and keys[3] not in store and keys[0] in store
        assert "2 preempted requests' states released (cap 4; unlatched ones only)" in caplog.text


def test_latched_parked_states_are_never_released_past_the_cap(setup, tmp_path, monkeypatch, caplog):
    """Issue 18: latched states are never evicted. Six latched parked states over a cap of four: all kept,
    all still latched, and the warning says how many are kept past the cap."""
    with _processor_with_store(setup, tmp_path, monkeypatch) as (lp, store):
        keys, sps = _park_all(lp, store, 7, latched=lambda i: i < 6, caplog=caplog)
        assert sorted(lp.parked_keys()) == sorted(keys[:6])  # only the unlatched one went
        assert all(store.summary(k).latched for k in keys[:6]) and keys[6] not in store
        assert "1 preempted requests' states released" in caplog.text
        assert "2 latched states kept past the cap of 4" in caplog.text


def test_model_runner_v2_construction(setup, tmp_path, monkeypatch):
    """vLLM 0.33's Model Runner V2 builds every entry-point plugin as ctor(vllm_config, req_states):
    inert without a pack (it must not break vLLM deployments that merely have autosteer installed); with
    one, built anywhere but inside V2's GPUModelRunner.load_model, it cannot find the model and says so
    (the V2 runs: tests/test_vllm_v2_simulation.py)."""
    _, _, pack = setup
    req_states = SimpleNamespace(device=torch.device("cpu"), max_num_reqs=8, vocab_size=5,
                                 prompt_len=None, prefill_len=None, total_len=None, all_token_ids=None)
    monkeypatch.delenv(avllm.ENV_PACK, raising=False)
    lp = avllm.AutoSteerVLLMLogitsProcessor(_config(), req_states)
    logits = torch.randn(3, 5)
    assert lp.v2 and not lp.enabled and lp.add_request(0, SamplingParams()) is False
    assert lp.apply(logits, SimpleNamespace()) is logits and lp.is_argmax_invariant()
    monkeypatch.setenv(avllm.ENV_PACK, str(pack.save(tmp_path / "p.safetensors")))
    with pytest.raises(avllm.VLLMIntegrationError, match="outside .*GPUModelRunner.load_model"):
        avllm.AutoSteerVLLMLogitsProcessor(_config(), req_states)


def _fake_vllm_modules(monkeypatch, *, runner_imported: bool, version=(0, 33)):
    """The two vLLM 0.33.0 modules the startup guard patches, as stand-ins with vLLM's behaviour:
    ``build_logitsprocs`` skips entry-point processors when speculative decoding is on (returns only
    the built-in min-tokens processor), and the V1 model runner imports that function by name.
    ``version``: what the guard reads as the installed vLLM's (major, minor)."""
    monkeypatch.setattr(avllm._VLLM, "version", staticmethod(lambda: version))
    import sys
    import types

    def build_logitsprocs(vllm_config, device, is_pin_memory, is_pooling_model, custom_logitsprocs=()):
        if vllm_config.speculative_config:
            return ["MinTokensLogitsProcessor"]  # entry-point plugins silently skipped
        return ["MinTokensLogitsProcessor", "AutoSteerVLLMLogitsProcessor"]

    class EngineArgs:
        def __init__(self, speculative_config=None, v2=False):
            self.speculative_config, self.v2 = speculative_config, v2

        def create_engine_config(self, usage_context=None, headless=False):
            return SimpleNamespace(speculative_config=self.speculative_config, use_v2_model_runner=self.v2)

    lp = types.ModuleType("vllm.v1.sample.logits_processor")
    lp.build_logitsprocs = build_logitsprocs
    au = types.ModuleType("vllm.engine.arg_utils")
    au.EngineArgs = EngineArgs
    monkeypatch.setitem(sys.modules, "vllm.v1.sample.logits_processor", lp)
    monkeypatch.setitem(sys.modules, "vllm.engine.arg_utils", au)
    runner = None
    if runner_imported:
        runner = types.ModuleType(avllm._VLLM.RUNNER_MODULE)
        runner.build_logitsprocs = build_logitsprocs  # `from ... import build_logitsprocs`
        monkeypatch.setitem(sys.modules, avllm._VLLM.RUNNER_MODULE, runner)
    else:
        monkeypatch.delitem(sys.modules, avllm._VLLM.RUNNER_MODULE, raising=False)
    return lp, au, runner, build_logitsprocs


@pytest.mark.parametrize("runner_imported", [False, True])
def test_startup_guard_refuses_speculative_decoding_with_a_pack(setup, tmp_path, monkeypatch, runner_imported):
    lp, au, runner, orig = _fake_vllm_modules(monkeypatch, runner_imported=runner_imported)
    pack_path = str(setup[2].save(tmp_path / "p.safetensors"))
    spec = SimpleNamespace(method="ngram", num_speculative_tokens=2)
    # no pack: the plugin does nothing at all (nothing patched, vLLM's own behaviour)
    monkeypatch.delenv(avllm.ENV_PACK, raising=False)
    assert avllm.install_startup_guard() is False
    assert lp.build_logitsprocs is orig and not getattr(au.EngineArgs.create_engine_config, "_autosteer_guard", False)
    assert au.EngineArgs(spec).create_engine_config().speculative_config is spec
    # with a pack: speculative decoding refuses to start, at both patch points; Model Runner V2 is served
    monkeypatch.setenv(avllm.ENV_PACK, pack_path)
    assert avllm.install_startup_guard() is True
    assert avllm.install_startup_guard() is True  # vLLM may load plugins more than once: idempotent
    assert lp.build_logitsprocs.__wrapped__ is orig  # wrapped once
    with pytest.raises(avllm.VLLMIntegrationError, match="speculative decoding"):
        au.EngineArgs(spec).create_engine_config()
    assert au.EngineArgs(None, v2=True).create_engine_config().use_v2_model_runner
    cfg = au.EngineArgs(None).create_engine_config()  # V1, no speculation: accepted
    assert cfg.speculative_config is None
    builders = [lp.build_logitsprocs] + ([runner.build_logitsprocs] if runner is not None else [])
    for build in builders:
        with pytest.raises(avllm.VLLMIntegrationError, match="silently absent"):
            build(SimpleNamespace(speculative_config=spec), "cpu", False, False)
        assert "AutoSteerVLLMLogitsProcessor" in build(SimpleNamespace(speculative_config=None), "cpu", False, False)
    # the V1 runner imported after the plugin ran takes the patched function by name
    assert lp.build_logitsprocs._autosteer_guard
    # pack unset later in the same process: the installed guard is inert again
    monkeypatch.delenv(avllm.ENV_PACK)
    assert au.EngineArgs(spec).create_engine_config().speculative_config is spec
    assert builders[-1](SimpleNamespace(speculative_config=spec), "cpu", False, False) == ["MinTokensLogitsProcessor"]


def test_the_front_end_checks_the_pack_and_its_threshold_before_any_worker_starts(setup, tmp_path, monkeypatch):
    """``EngineArgs.create_engine_config`` (the front end, before workers load the model) stops the start-up with a
    named error where the pack cannot be read or ``AUTOSTEER_TAU`` / ``AUTOSTEER_MONITOR_FROM`` names an operating point
    the pack lacks or an empty grey zone; a setting in the engine config's ``additional_config`` is named as such.
    Valid settings start, with the settings carried for the workers."""
    _, au, _, _ = _fake_vllm_modules(monkeypatch, runner_imported=False)
    pack = setup[2]
    assert "operating_points" not in pack.meta  # the simulation's pack has none
    path = str(pack.save(tmp_path / "p.safetensors"))
    monkeypatch.setenv(avllm.ENV_PACK, path)
    assert avllm.install_startup_guard() is True
    monkeypatch.setenv(avllm.ENV_TAU, "strict")
    with pytest.raises(avllm.VLLMIntegrationError,
                       match=r"AUTOSTEER_TAU='strict': operating point 'strict' is not in this pack.*refit"):
        au.EngineArgs().create_engine_config()
    monkeypatch.setenv(avllm.ENV_TAU, "0.2")
    monkeypatch.setenv(avllm.ENV_MONITOR_FROM, "0.5")  # above tau: no grey zone
    with pytest.raises(avllm.VLLMIntegrationError, match=r"AUTOSTEER_MONITOR_FROM=0.5: "):
        au.EngineArgs().create_engine_config()
    monkeypatch.delenv(avllm.ENV_MONITOR_FROM)
    cfg = au.EngineArgs().create_engine_config()
    assert cfg.additional_config["autosteer"]["tau"] == "0.2" and cfg.additional_config["autosteer"]["pack"] == path
    # the user's own additional_config is checked the same way, and named
    wrapped = avllm._guard_create_engine_config(
        lambda self: SimpleNamespace(speculative_config=None, use_v2_model_runner=False,
                                     additional_config={"autosteer": {"tau": "permissive"}}))
    with pytest.raises(avllm.VLLMIntegrationError, match=r"additional_config autosteer.tau='permissive': operating"):
        wrapped(None)
    for bad, why in ((str(tmp_path / "missing.safetensors"), "pack file not found"),
                     (__file__, "is not a readable safetensors pack")):
        monkeypatch.setenv(avllm.ENV_PACK, bad)
        with pytest.raises(avllm.VLLMIntegrationError, match=f"AutoSteer: .*{why}"):
            au.EngineArgs().create_engine_config()


def test_startup_guard_fails_closed_when_vllm_lacks_the_patch_point(monkeypatch):
    lp, au, _runner, _orig = _fake_vllm_modules(monkeypatch, runner_imported=False)
    del lp.build_logitsprocs
    monkeypatch.setenv(avllm.ENV_PACK, "/some/pack.safetensors")
    with pytest.raises(avllm.VLLMIntegrationError, match="build_logitsprocs not found"):
        avllm.install_startup_guard()


def test_setup_registers_the_startup_guard_entry_point():
    """Both vLLM entry points are declared by the package metadata (pyproject.toml's [project.entry-points])."""
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    meta = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    eps = meta["project"]["entry-points"]
    assert eps["vllm.general_plugins"] == {"autosteer_guard": "autosteer.integrations.vllm:install_startup_guard"}
    assert eps["vllm.logits_processors"] == {"autosteer": "autosteer.integrations.vllm:AutoSteerVLLMLogitsProcessor"}
    assert callable(avllm.install_startup_guard)


def test_monitor_window_from_env_or_config(setup, tmp_path, monkeypatch):
    """AUTOSTEER_MONITOR_WINDOW (or additional_config's monitor_window) overrides the pack's window;
    bad values fail at start-up naming the setting."""
    hf, _, pack = setup
    monkeypatch.setenv(avllm.ENV_PACK, str(pack.save(tmp_path / "p.safetensors")))
    monkeypatch.setenv(avllm.ENV_MODE, "monitor")
    lp = avllm.AutoSteerVLLMLogitsProcessor(_config(), "cpu", False, patch_runner=False)
    assert lp.monitor_window is None  # unset: the pack's
    monkeypatch.setenv(avllm.ENV_MONITOR_WINDOW, "12")
    assert avllm.AutoSteerVLLMLogitsProcessor(_config(), "cpu", False, patch_runner=False).monitor_window == 12
    cfg = _config()
    cfg.additional_config = {"autosteer": {"monitor_window": 0}}  # the config wins over the environment
    assert avllm.AutoSteerVLLMLogitsProcessor(cfg, "cpu", False, patch_runner=False).monitor_window == 0
    cfg.additional_config = {"autosteer": {"monitor_window": "many"}}
    with pytest.raises(avllm.VLLMIntegrationError, match="monitor_window='many' is not an integer"):
        avllm.AutoSteerVLLMLogitsProcessor(cfg, "cpu", False, patch_runner=False)
    monkeypatch.setenv(avllm.ENV_MONITOR_WINDOW, "-1")
    with pytest.raises(avllm.VLLMIntegrationError, match="AUTOSTEER_MONITOR_WINDOW='-1' must be >= 0"):
        avllm.AutoSteerVLLMLogitsProcessor(_config(), "cpu", False, patch_runner=False)


def test_threshold_and_fault_policy_from_env_or_config(setup, tmp_path, monkeypatch):
    """AUTOSTEER_TAU / AUTOSTEER_FAIL_CLOSED (or additional_config): fail closed by default, values
    checked at start-up (a typo or a threshold outside [0, 1] must not leave requests unguarded)."""
    hf, _, pack = setup
    monkeypatch.setenv(avllm.ENV_PACK, str(pack.save(tmp_path / "p.safetensors")))
    make = lambda cfg=None: avllm.AutoSteerVLLMLogitsProcessor(cfg or _config(), "cpu", False, patch_runner=False)
    lp = make()
    assert lp.fail_closed is True and lp.tau is None
    monkeypatch.setenv(avllm.ENV_FAIL_CLOSED, "no")
    monkeypatch.setenv(avllm.ENV_TAU, "0.3")
    lp = make()
    assert lp.fail_closed is False and lp.tau == 0.3
    cfg = _config()
    cfg.additional_config = {"autosteer": {"fail_closed": True, "tau": 0.9}}  # the config wins
    lp = make(cfg)
    assert lp.fail_closed is True and lp.tau == 0.9
    for key, env, value, msg in (("tau", avllm.ENV_TAU, "abc", "is not a number"), ("tau", avllm.ENV_TAU, "-1", "is not a probability"),
                                 ("fail_closed", avllm.ENV_FAIL_CLOSED, "on-ish", "is not a boolean")):
        monkeypatch.setenv(env, value)
        with pytest.raises(avllm.VLLMIntegrationError, match=f"{env}='{value}' {msg}"):
            make()
        monkeypatch.delenv(env)
        cfg.additional_config = {"autosteer": {key: value}}
        with pytest.raises(avllm.VLLMIntegrationError, match=f"additional_config autosteer.{key}='{value}' {msg}"):
            make(cfg)
    # a named operating point: served when the pack has it, a named start-up error when it does not
    cfg.additional_config = {}
    monkeypatch.setenv(avllm.ENV_TAU, "strict")
    with pytest.raises(avllm.VLLMIntegrationError, match="AUTOSTEER_TAU='strict'.*not in this pack.*refit"):
        make()
    import copy

    named = copy.deepcopy(pack)  # the fixture's pack stays as other tests expect it
    named.meta["operating_points"] = {"strict": {"tau": 0.125, "val_fpr": 0.1, "val_tpr": 0.9}}
    monkeypatch.setenv(avllm.ENV_PACK, str(named.save(tmp_path / "q.safetensors")))
    assert make().tau == "strict"


def test_a_resumed_request_gets_its_own_state_not_a_siblings(setup, tmp_path, monkeypatch):
    """Parallel-sampling children can share one SamplingParams object (in-process engine). A
    preempted child re-added with its outputs must get its own state back -- here its latch -- not
    that of a sibling parked beside it (found by review: the first parked sibling was taken)."""
    with _processor_with_store(setup, tmp_path, monkeypatch) as (lp, store):
        sp = SamplingParams()
        out_a, out_b = [], []  # vLLM appends each request's outputs to its list in place
        lp.update_state(BatchUpdate(2, [], [(0, sp, [1, 2, 3], out_a), (1, sp, [1, 2, 3], out_b)], []))
        key_a, key_b = lp.request_keys()[0], lp.request_keys()[1]
        for k in (key_a, key_b):
            store._get_or_add(k)
        store._slot_latched[store.state(key_b).slot] = True  # B latched, A did not
        out_a += [5, 6, 9]
        out_b += [7, 8]
        # A finishes, B moves to index 0, then B is preempted: both parked under the same params
        lp.update_state(BatchUpdate(1, [0], [], [(1, 0, MoveDirectionality.UNIDIRECTIONAL)]))
        lp.update_state(BatchUpdate(0, [0], [], []))
        assert sorted(lp.parked_keys()) == sorted([key_a, key_b])
        lp.update_state(BatchUpdate(1, [], [(0, sp, [1, 2, 3], list(out_b))], []))  # B resumes
        assert lp.request_keys()[0] == key_b and store.summary(key_b).latched
        assert lp.parked_keys() == [key_a]
        # siblings that cannot be told apart (same outputs): the latched state wins (fail closed)
        out_c, out_d = [], []
        lp.update_state(BatchUpdate(3, [], [(1, sp, [1, 2, 3], out_c), (2, sp, [1, 2, 3], out_d)], []))
        key_c, key_d = lp.request_keys()[1], lp.request_keys()[2]
        for k in (key_c, key_d):
            store._get_or_add(k)
        store._slot_latched[store.state(key_d).slot] = True
        out_c += [4]
        out_d += [4]
        lp.update_state(BatchUpdate(1, [1, 2], [], []))
        lp.update_state(BatchUpdate(2, [], [(1, sp, [1, 2, 3], [4])], []))
        assert lp.request_keys()[1] == key_d
        # ... and the sibling left parked is latched too: if it was the latched one, resuming later with
        # the unlatched state would serve it unsteered (found by review; async scheduling's -1 placeholders
        # make every sibling's parked outputs identical)
        assert store.summary(key_c).latched and store.summary(key_c).latched_at == 0
        lp.update_state(BatchUpdate(3, [], [(2, sp, [1, 2, 3], [4])], []))
        assert lp.request_keys()[2] == key_c and store.summary(key_c).latched


def test_outputs_agree_under_async_placeholders():
    """Parked output lists under async scheduling hold -1 placeholders; a re-add brings real ids, possibly
    without an in-flight token the scheduler dropped: -1 matches anything, one token shorter or longer is
    accepted, a known different token is not."""
    agree = avllm._outputs_agree
    assert agree((-1, -1, -1), (5, 6, 7)) and agree((5, -1), (5, 9)) and agree((5, 6), (5, 6))
    assert agree((-1, -1, -1), (5, 6)) and agree((5, 6), (5, 6, 7)) and agree((), ())
    assert not agree((5, 6), (5, 7)) and not agree((-1, -1, -1, -1), (5, 6)) and not agree((5,), (5, 6, 7))


def test_engines_the_capture_cannot_follow_are_refused(setup, tmp_path, monkeypatch):
    """CUDA graphs (no --enforce-eager) and prompt embeddings would leave requests ungated: refused at
    start-up (the guard's check and the processor's constructor), and a prompt-embeddings request
    that reaches the processor anyway raises instead of being served ungated (found by review)."""
    hf, _, pack = setup
    monkeypatch.setenv(avllm.ENV_PACK, str(pack.save(tmp_path / "p.safetensors")))
    for mc, msg in ((SimpleNamespace(enforce_eager=False), "--enforce-eager"),
                    (SimpleNamespace(enforce_eager=True, enable_prompt_embeds=True), "prompt embeddings")):
        cfg = _config()
        cfg.model_config = mc
        assert msg in avllm._engine_refusal(cfg)
        with pytest.raises(avllm.VLLMIntegrationError, match=msg):
            avllm.AutoSteerVLLMLogitsProcessor(cfg, "cpu", False, patch_runner=False)
    cfg = _config()
    cfg.model_config = SimpleNamespace(enforce_eager=True, enable_prompt_embeds=False)
    assert avllm._engine_refusal(cfg) is None
    lp = avllm.AutoSteerVLLMLogitsProcessor(cfg, "cpu", False, patch_runner=False)
    with pytest.raises(avllm.VLLMIntegrationError, match="prompt embeddings"):
        lp.update_state(BatchUpdate(1, [], [(0, SamplingParams(), None, [])], []))


def test_a_step_without_a_captured_forward_raises(setup, tmp_path, monkeypatch):
    """apply() twice on one captured forward (hooks skipped, e.g. a CUDA-graph replay) must not steer
    with the previous forward's hidden states."""
    hf, _, pack = setup
    monkeypatch.setenv(avllm.ENV_PACK, str(pack.save(tmp_path / "p.safetensors")))
    lp = avllm.AutoSteerVLLMLogitsProcessor(_config(), "cpu", False, patch_runner=False)
    model = FakeVLLMLlama(hf)
    cap = avllm.attach_capture(model, max_reqs=8, metadata_fn=lambda: None)
    try:
        lp.update_state(BatchUpdate(1, [], [(0, SamplingParams(), [1, 2, 3], [])], []))
        cap.num_reqs, cap.forwards = 1, 1  # as the layer hook leaves them after a one-request forward
        lp.apply(torch.zeros(1, hf.config.vocab_size))
        lp.update_state(None)
        with pytest.raises(avllm.VLLMIntegrationError, match="no forward since the previous step"):
            lp.apply(torch.zeros(1, hf.config.vocab_size))
    finally:
        avllm.detach_capture()


def test_forward_metadata_of_a_dummy_forward_is_none(monkeypatch):
    """vLLM's dummy forwards (memory profile, warm-up, idle data-parallel ranks) carry attn_metadata=None
    (or per-layer dicts without entries): the capture must skip them, not crash the engine's start-up;
    metadata without the fields the capture reads still raises."""
    import sys
    import types

    ctx = SimpleNamespace(attn_metadata=None)
    fake = types.ModuleType("vllm.forward_context")
    fake.get_forward_context = lambda: ctx
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setitem(sys.modules, "vllm.forward_context", fake)
    for md in (None, {}, {"model.layers.0.self_attn": None}):
        ctx.attn_metadata = md
        assert avllm._VLLM.forward_metadata() is None
    real = SimpleNamespace(query_start_loc=torch.tensor([0, 3]), seq_lens=torch.tensor([3]))
    ctx.attn_metadata = {"model.layers.0.self_attn": real}
    assert avllm._VLLM.forward_metadata() is real
    ctx.attn_metadata = {"model.layers.0.self_attn": SimpleNamespace(seq_lens=torch.tensor([3]))}
    with pytest.raises(avllm.VLLMIntegrationError, match="query_start_loc.*--attention-backend FLASH_ATTN"):
        avllm._VLLM.forward_metadata()


def test_attention_backends_without_the_fields_the_capture_reads_are_refused(setup, tmp_path, monkeypatch):
    """FlashInfer's attention metadata (vLLM's default on Blackwell) has no query_start_loc / seq_lens: a config
    that names it is refused at start-up with the remedy, and metadata without the fields names it too."""
    hf, _, pack = setup
    monkeypatch.setenv(avllm.ENV_PACK, str(pack.save(tmp_path / "p.safetensors")))
    for backend, refused in ((None, False), (SimpleNamespace(name="FLASH_ATTN"), False), ("TRITON_ATTN", False),
                             (SimpleNamespace(name="FLASHINFER"), True)):
        cfg = _config()
        cfg.attention_config = SimpleNamespace(backend=backend)
        why = avllm._engine_refusal(cfg)
        assert (why is not None) == refused, backend
        if refused:
            assert "--attention-backend FLASH_ATTN" in why
            with pytest.raises(avllm.VLLMIntegrationError, match="FLASHINFER"):
                avllm.AutoSteerVLLMLogitsProcessor(cfg, "cpu", False, patch_runner=False)


def test_detach_removes_the_compute_logits_wrapper(setup, tmp_path, monkeypatch):
    """Re-attaching (a second load_model) or detaching must not leave the old wrapper chained on the model
    (found by review: the identity test on a bound method never matched)."""
    hf, _, pack = setup
    model = FakeVLLMLlama(hf)
    avllm.attach_capture(model, pack, max_reqs=4, metadata_fn=lambda: None)
    cap2 = avllm.attach_capture(model, pack, max_reqs=4, metadata_fn=lambda: None)
    assert model.__dict__["compute_logits"] == cap2._compute_logits  # the first wrapper was removed
    avllm.detach_capture()
    assert "compute_logits" not in model.__dict__
    assert not model.model.layers[pack.layer - 1]._forward_hooks
