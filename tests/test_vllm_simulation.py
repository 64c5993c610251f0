"""The AutoSteer vLLM V1 logits processor on a simulated vLLM engine (vLLM itself cannot run here).

The simulation follows vLLM's documented persistent-batch model: each step finished requests
are replaced by new ones (Add at the lowest freed index), extra new requests are appended,
leftover holes are Removed and the batch condensed with unidirectional Moves, then rows may be
Swapped; ``update_state`` gets the resulting ``BatchUpdate`` (or None) before the forward. The
forward is a flash-style Llama over flattened tokens (``tests/_tgi_sim.py``'s model) with
chunked prefill; the capture reads ``query_start_loc`` / ``seq_lens`` from a simulated forward
context; logits are one row per request (``hidden[query_start_loc[1:] - 1]``) and rows of
requests still prefilling are sampled and discarded, as vLLM does.
"""
from __future__ import annotations

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


class Engine:
    def __init__(self, hf, lp, *, chunk: int, seed: int = 0, max_len: int = 96):
        cfg = hf.config
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

    def metadata(self):
        return self.md

    def _batch_update(self, new, finished):
        removed, added, moved = [], [], []
        holes = sorted(self.batch.index(r) for r in finished)
        for r in finished:
            self.free_slots.append(self.req[r]["slot"])
        for i in holes:
            self.batch[i] = None
        new = list(new)
        for i in holes[:]:
            if not new:
                break
            r = new.pop(0)
            self.batch[i] = r
            added.append((i, None, self.req[r]["prompt"], self.req[r]["out"]))
            holes.remove(i)
        for r in new:
            self.batch.append(r)
            added.append((len(self.batch) - 1, None, self.req[r]["prompt"], self.req[r]["out"]))
        removed.extend(holes)
        for h in sorted(holes):  # condense: fill holes from the top
            while self.batch and self.batch[-1] is None:
                self.batch.pop()
            if h < len(self.batch) and self.batch[h] is None:
                moved.append((len(self.batch) - 1, h, MoveDirectionality.UNIDIRECTIONAL))
                self.batch[h] = self.batch.pop()
        while self.batch and self.batch[-1] is None:
            self.batch.pop()
        if len(self.batch) > 1 and self.rng.random() < 0.5:  # the attention backend reorders
            a, b = self.rng.sample(range(len(self.batch)), 2)
            self.batch[a], self.batch[b] = self.batch[b], self.batch[a]
            moved.append((a, b, MoveDirectionality.SWAP))
        if removed or added or moved:
            return BatchUpdate(len(self.batch), removed, added, moved)
        return None

    def run(self, arrivals: dict, rows: list) -> dict:
        finished_last: list = []
        outputs = {}
        for step in range(200):
            new = []
            for rid in arrivals.get(step, []):
                self.req[rid] = {"prompt": list(rows[rid]), "out": [], "done": 0, "slot": self.free_slots.pop()}
                new.append(rid)
            bu = self._batch_update(new, finished_last)
            self.lp.update_state(bu)
            for i, key in self.lp.request_keys().items():
                self.key_of[key] = self.batch[i]
            if not self.batch:
                if step > max(arrivals):
                    break
                finished_last = []
                continue
            ids, pos, slots, qsl, seq = [], [], [], [0], []
            sched = []
            for rid in self.batch:
                r = self.req[rid]
                n_prompt = len(r["prompt"])
                if r["done"] < n_prompt:
                    n = min(self.chunk, n_prompt - r["done"])
                    toks = r["prompt"][r["done"]: r["done"] + n]
                else:
                    n, toks = 1, [r["out"][-1]]
                ids += toks
                pos += range(r["done"], r["done"] + n)
                slots += [r["slot"]] * n
                qsl.append(qsl[-1] + n)
                seq.append(r["done"] + n)
                sched.append(n)
            self.md = SimpleNamespace(query_start_loc=torch.tensor(qsl, dtype=torch.int32),
                                      seq_lens=torch.tensor(seq, dtype=torch.int32))
            with torch.no_grad():
                hidden = self.model(torch.tensor(ids), torch.tensor(pos), self.kv, torch.tensor(slots))
                logits = self.model.compute_logits(hidden[torch.tensor(qsl[1:]) - 1])
            raw = logits.clone()
            logits = self.lp.apply(logits)
            next_ids = logits.argmax(-1).tolist()
            still = []
            finished_last = []
            for b, rid in enumerate(self.batch):
                r = self.req[rid]
                r["done"] += sched[b]
                if r["done"] < len(r["prompt"]):  # chunked prefill: the sampled token is discarded
                    still.append(True)
                    continue
                still.append(False)
                r["out"].append(next_ids[b])
                if next_ids[b] == self.eos or len(r["out"]) >= MAX_NEW:
                    finished_last.append(rid)
                    outputs[rid] = list(r["out"])
            self.records.append((list(self.batch), raw, logits.clone(), still))
        assert len(outputs) == sum(len(v) for v in arrivals.values()), "simulation did not finish"
        return outputs


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    tok = make_tokenizer()
    hf = make_tiny_model(len(tok))
    rows = [encode_one(tok, p, PromptFormat()) for p in PROMPTS]
    pack = make_pack(hf)
    with autosteer.attach(hf, pack) as h:
        p = sorted(float(h.generate(input_ids=torch.tensor([r]), max_new_tokens=1, force=False).p_unsafe[0]) for r in rows)
    pack.meta["tau"] = (p[3] + p[4]) / 2
    return hf, rows, pack


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


@pytest.mark.parametrize("mode,chunk", [("prefill", 4), ("monitor", 3), ("prefill", 64)])
def test_stream_matches_transformers(setup, tmp_path, monkeypatch, mode, chunk):
    hf, rows, pack = setup
    monkeypatch.setenv(avllm.ENV_PACK, str(pack.save(tmp_path / "p.safetensors")))
    monkeypatch.setenv(avllm.ENV_MODE, mode)
    ref = _reference(hf, rows, pack, mode)
    assert 0 < sum(v[1] for v in ref.values()) < len(rows) or mode == "monitor"
    lp = avllm.AutoSteerVLLMLogitsProcessor(_config(), "cpu", False, patch_runner=False)  # built before the model
    assert not lp.is_argmax_invariant()
    engine = Engine(hf, lp, chunk=chunk)
    summaries = {}
    try:
        avllm.attach_capture(engine.model, max_reqs=8, metadata_fn=engine.metadata)  # the patched load_model's job
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
