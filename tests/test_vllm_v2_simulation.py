"""The AutoSteer vLLM processor under Model Runner V2 (vLLM 0.33's default runner on CUDA), on a simulated engine.

Mirrors V2's processor interface as read in vLLM 0.33.0's ``vllm/v1/worker/gpu/`` (checked against the real
classes by ``scripts/verify_vllm_real.sh``): the runner builds processors inside ``GPUModelRunner.load_model``
as ``ctor(vllm_config, LogitsProcRequestState)``; a request gets a slot from a LIFO free list
(``RequestState.add_request``: ``index_to_req_id[slot]``, host ``prompt_len.np`` / ``prefill_len.np``) and
then ``add_request(slot, SamplingParams)``; finished and preempted requests are removed without telling the
processors (the slot is freed); a preempted request is re-added later, to some slot, with ``prefill_len`` =
prompt + outputs; ``apply_staged_writes()`` runs every step before the forward; rows are reordered every step
and ``apply(logits, LogitsContext)`` maps row ``b`` to slot ``ctx.idx_mapping_np[b]`` with sequence length
``ctx.seq_lens_upper_bound_np[b]``. The forward and capture are the V1 simulation's (``tests/_tgi_sim.py``'s
flash-style Llama over flattened tokens, chunked prefill, query_start_loc / seq_lens metadata).
"""
from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from autosteer.integrations import vllm as avllm
from test_vllm_simulation import (MAX_NEW, FakeVLLMLlama, SamplingParams, _config, _reference,  # noqa: F401
                                  chunked_forward, setup)

pytestmark = pytest.mark.usefixtures("one_thread")


class V2Engine:
    def __init__(self, hf, *, chunk: int, seed: int = 0, max_reqs: int = 8, max_len: int = 96,
                 lp_states_cls=SimpleNamespace, ctx_cls=SimpleNamespace, params_copies: bool = False,
                 reorder: bool = True):
        """``lp_states_cls`` / ``ctx_cls``: vLLM's LogitsProcRequestState / LogitsContext dataclasses when
        vLLM is importable (scripts/verify_vllm_real.py), stand-ins with the same fields otherwise.
        ``params_copies``: each add gets a fresh SamplingParams copy that nobody keeps, as with a
        multiprocess executor (the scheduler output is pickled to the worker every step). ``reorder``: shuffle
        the rows every step (False: requests keep their order, as V2's stable sort of the scheduler's order
        keeps running decode requests)."""
        cfg = hf.config
        self.reorder = reorder
        self.params_copies = params_copies
        self.xargs = {}  # request id -> its SamplingParams.extra_args (the OpenAI API's vllm_xargs)
        self.ctx_cls = ctx_cls
        self.model = FakeVLLMLlama(hf).eval()
        self.chunk = chunk
        self.rng = random.Random(seed)
        kvh, hd = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
        # KV rows per slot, plus one for dummy forwards
        self.kv = [(torch.zeros(max_reqs + 1, max_len, kvh, hd), torch.zeros(max_reqs + 1, max_len, kvh, hd))
                   for _ in range(cfg.num_hidden_layers)]
        self.eos = cfg.eos_token_id
        self.free = list(range(max_reqs))  # RequestState.free_indices: pop() from the end
        self.index_to_req_id: dict = {}
        prompt_len = SimpleNamespace(np=np.zeros(max_reqs, dtype=np.int32))
        prefill_len = SimpleNamespace(np=np.zeros(max_reqs, dtype=np.int32))
        # what V2 hands processors (LogitsProcRequestState) and what the runner holds (RequestState)
        self.lp_states = lp_states_cls(device=torch.device("cpu"), max_num_reqs=max_reqs, vocab_size=cfg.vocab_size,
                                       prompt_len=prompt_len, prefill_len=prefill_len, total_len=None,
                                       all_token_ids=None)
        self.runner = SimpleNamespace(model=self.model, get_model=lambda: self.model,
                                      req_states=SimpleNamespace(index_to_req_id=self.index_to_req_id),
                                      _dummy_sampler_run=self._dummy_sampler_run,
                                      finish_requests=self._finish_requests)
        self.lp = None
        self.md = None
        self.req: dict = {}
        self.records = []  # (request ids by row, raw logits, final logits, row still prefilling)

    def metadata(self):
        return self.md

    def _dummy_sampler_run(self, hidden_states):
        """V2's start-up sampler warm-up: add_request(slot, warm-up params) for slots the runner never
        assigned, then the sampler (and so apply) on logits of made-up rows."""
        n = hidden_states.shape[0]
        for slot in range(n):
            self.lp.add_request(slot, SamplingParams())
        self.lp.apply_staged_writes()
        logits = self.model.compute_logits(hidden_states)
        ctx = self._ctx(np.arange(n), np.zeros(n, dtype=np.int32), torch.zeros(n, dtype=torch.long))
        return self.lp.apply(logits, ctx)

    def profile_run(self, num_tokens: int = 6):
        """V2's _dummy_run (a forward without attention metadata when profiling) + _dummy_sampler_run."""
        self.md = None
        with torch.no_grad():
            ids = torch.arange(num_tokens) % self.model.config.vocab_size
            hidden = self.model(ids, torch.arange(num_tokens), self.kv, torch.full((num_tokens,), len(self.free)))
            raw = self.model.compute_logits(hidden[-3:])
            out = self.runner._dummy_sampler_run(hidden[-3:])
        return raw, out

    def _ctx(self, slots, seq, input_ids):
        idx = torch.from_numpy(np.asarray(slots, dtype=np.int64))
        return self.ctx_cls(expanded_idx_mapping=idx, idx_mapping=idx, idx_mapping_np=slots,
                            expanded_local_pos=torch.zeros(len(slots), dtype=torch.int32), input_ids=input_ids,
                            pos=torch.from_numpy(np.asarray(seq, dtype=np.int64)) - 1, seq_lens_upper_bound_np=seq)

    def _add(self, rid):
        r = self.req[rid]
        slot = self.free.pop()
        r["slot"] = slot
        self.index_to_req_id[slot] = rid
        self.lp_states.prompt_len.np[slot] = len(r["prompt"])
        self.lp_states.prefill_len.np[slot] = len(r["prompt"]) + len(r["out"])
        self.lp.add_request(slot, SamplingParams(self.xargs.get(rid)) if self.params_copies else r["sp"])

    def _finish_requests(self, scheduler_output):
        """V2's finish_requests: finished and preempted requests leave their slots (processors are not told)."""
        for rid in sorted(scheduler_output.finished_req_ids | scheduler_output.preempted_req_ids):
            slot = self.req[rid]["slot"]
            del self.index_to_req_id[slot]
            self.free.append(slot)

    def _finish(self, finished, preempted):
        self.runner.finish_requests(SimpleNamespace(finished_req_ids=set(finished), preempted_req_ids=set(preempted)))

    def run(self, arrivals: dict, rows: list, preempt: dict | None = None) -> dict:
        """``preempt[request id] = (outputs, steps out)``: once the request has that many outputs it is
        removed (V2's finish_requests treats it as finished), and re-added that many steps later."""
        preempt = dict(preempt or {})
        active, outputs, resume, finished = [], {}, {}, []
        self.preempted = 0
        for step in range(200):
            preempted = [rid for rid, (n_out, _) in preempt.items()
                         if rid in active and rid not in finished and len(self.req[rid]["out"]) >= n_out]
            self._finish(finished, preempted)
            for rid in finished:
                active.remove(rid)
                self.req[rid]["sp"] = None  # the scheduler drops the request and its SamplingParams
            for rid in preempted:
                active.remove(rid)
                self.req[rid]["done"] = 0  # KV freed: re-prefills prompt + outputs
                resume.setdefault(step + preempt.pop(rid)[1], []).append(rid)
                self.preempted += 1
            finished = []
            for rid in arrivals.get(step, []):
                self.req[rid] = {"prompt": list(rows[rid]), "out": [], "done": 0,
                                 "sp": SamplingParams(self.xargs.get(rid))}
                self._add(rid)
                active.append(rid)
            for rid in resume.pop(step, []):
                self._add(rid)
                active.append(rid)
            self.lp.apply_staged_writes()
            if not active:
                if step > max(arrivals) and not resume:
                    break
                continue
            order = list(active)
            if self.reorder:
                self.rng.shuffle(order)  # "rows are reordered every step"
            logits, sched, seq, fed_ids = chunked_forward(
                self.model, self.kv, [(self.req[r]["prompt"] + self.req[r]["out"], self.req[r]["done"], self.req[r]["slot"])
                                      for r in order], self.chunk, lambda md: setattr(self, "md", md))
            logits = logits.float()  # V2 hands processors an fp32 copy
            slots = np.array([self.req[rid]["slot"] for rid in order])
            ctx = self._ctx(slots, np.array(seq, dtype=np.int32), fed_ids)
            raw = logits.clone()
            logits = self.lp.apply(logits, ctx)
            nxt = logits.argmax(-1).tolist()
            still = []
            for b, rid in enumerate(order):
                r = self.req[rid]
                r["done"] += sched[b]
                if r["done"] < len(r["prompt"]) + len(r["out"]):
                    still.append(True)
                    continue
                still.append(False)
                r["out"].append(nxt[b])
                if nxt[b] == self.eos or len(r["out"]) >= MAX_NEW:
                    finished.append(rid)
                    outputs[rid] = list(r["out"])
            self.records.append((order, raw, logits.clone(), still))
        self._finish(finished, [])
        for rid in finished:
            self.req[rid]["sp"] = None
        self.lp.apply_staged_writes()  # the next step's reap
        assert len(outputs) == sum(len(v) for v in arrivals.values()), "simulation did not finish"
        return outputs


def _serve(setup, tmp_path, monkeypatch, mode, *, chunk, arrivals, preempt=None, seed=0, params_copies=False):
    hf, rows, pack = setup
    monkeypatch.setenv(avllm.ENV_PACK, str(pack.save(tmp_path / "p.safetensors")))
    monkeypatch.setenv(avllm.ENV_MODE, mode)
    engine = V2Engine(hf, chunk=chunk, seed=seed, params_copies=params_copies)
    summaries = {}
    cap = avllm.attach_capture(engine.model, pack, max_reqs=8, metadata_fn=engine.metadata)
    try:
        # built inside the runner's load_model (the model exists): the capture is attached there
        engine.lp = avllm.AutoSteerVLLMLogitsProcessor(_config(), engine.lp_states, capture=cap, v2_runner=engine.runner)
        assert engine.lp.v2 and engine.lp.enabled and not engine.lp.is_argmax_invariant()
        raw, out = engine.profile_run()
        assert torch.equal(raw, out), "the start-up sampler warm-up was steered"
        store = engine.lp.store
        store.report_on_release = True
        store.on_release = lambda rid, s: summaries.__setitem__(rid, s)
        outputs = engine.run(arrivals, rows, preempt=preempt)
    finally:
        avllm.detach_capture()
    return engine, outputs, summaries


ARRIVALS = {0: [0, 1, 2], 1: [3], 3: [4, 5], 4: [6], 6: [7]}


@pytest.mark.parametrize("mode,chunk", [("prefill", 4), ("monitor", 3), ("prefill", 64)])
def test_v2_stream_matches_transformers(setup, tmp_path, monkeypatch, mode, chunk):
    hf, rows, pack = setup
    ref = _reference(hf, rows, pack, mode)
    engine, outputs, summaries = _serve(setup, tmp_path, monkeypatch, mode, chunk=chunk, arrivals=ARRIVALS)
    assert len(engine.lp.store) == 0, "finished requests left state behind"
    for i in range(len(rows)):
        tokens, steered, latched_at = ref[i]
        assert outputs[i] == tokens, f"request {i}: tokens differ from transformers+AutoSteer ({mode})"
        assert summaries[i].latched == steered and summaries[i].latched_at == latched_at, f"request {i}"
    assert any(s.latched for s in summaries.values())
    assert mode == "monitor" or not all(s.latched for s in summaries.values())  # the tiny pack's monitor latches all
    for order, raw, final, still in engine.records:
        for b, rid in enumerate(order):
            if still[b] or not summaries[rid].latched:
                assert torch.equal(raw[b], final[b]), f"request {rid}: row written while unlatched / mid-prefill"


@pytest.mark.parametrize("mode,params_copies", [("prefill", False), ("monitor", False), ("prefill", True)])
def test_v2_preempted_requests_keep_their_state(setup, tmp_path, monkeypatch, mode, params_copies):
    """V2 removes a preempted request like a finished one and re-adds it later to another slot with
    prefill_len = prompt + outputs: keyed by request id, its latch survives and its re-prefill's end is
    not a new prompt decision -- also when every add gets a SamplingParams copy nobody keeps (a
    multiprocess executor; found by review: states were released as soon as the copy died)."""
    hf, rows, pack = setup
    ref = _reference(hf, rows, pack, mode)
    gated = [i for i in range(len(rows)) if ref[i][1]]
    benign = [i for i in range(len(rows)) if not ref[i][1]]
    victims = [gated[0], benign[0]] if benign else gated[:2]
    others = [i for i in range(len(rows)) if i not in victims][:2]
    arrivals = {0: [victims[0], others[0]], 1: [victims[1]], 2: [others[1]]}
    engine, outputs, summaries = _serve(setup, tmp_path, monkeypatch, mode, chunk=4, arrivals=arrivals,
                                        preempt={victims[0]: (2, 2), victims[1]: (3, 1)}, params_copies=params_copies)
    assert engine.preempted == 2
    assert len(engine.lp.store) == 0
    for i in outputs:
        tokens, steered, latched_at = ref[i]
        assert outputs[i] == tokens, f"request {i}: tokens differ after preemption ({mode})"
        assert summaries[i].latched == steered and summaries[i].latched_at == latched_at, f"request {i}"


def test_v2_refusals(setup, tmp_path, monkeypatch):
    """Rows for slots never added, several rows per request (speculative decoding) and a second AutoSteer
    processor in one engine raise instead of steering the wrong rows."""
    hf, rows, pack = setup
    monkeypatch.setenv(avllm.ENV_PACK, str(pack.save(tmp_path / "p.safetensors")))
    engine = V2Engine(hf, chunk=64)
    cap = avllm.attach_capture(engine.model, pack, max_reqs=8, metadata_fn=engine.metadata)
    try:
        lp = avllm.AutoSteerVLLMLogitsProcessor(_config(), engine.lp_states, capture=cap, v2_runner=engine.runner)
        engine.lp = lp
        V = hf.config.vocab_size
        with pytest.raises(avllm.VLLMIntegrationError, match="no request recorded for slot 3"):
            lp.apply(torch.zeros(1, V), SimpleNamespace(idx_mapping_np=np.array([3]),
                                                        seq_lens_upper_bound_np=np.array([4])))
        with pytest.raises(avllm.VLLMIntegrationError, match="one row per request"):
            lp.apply(torch.zeros(2, V), SimpleNamespace(idx_mapping_np=np.array([3]),
                                                        seq_lens_upper_bound_np=np.array([4])))
        engine.index_to_req_id[5] = "r"
        with pytest.raises(avllm.VLLMIntegrationError, match="slot 6 for a request it has no id"):
            lp.add_request(6, SamplingParams())
        other = avllm.AutoSteerVLLMLogitsProcessor(_config(), engine.lp_states, capture=cap, v2_runner=engine.runner)
        engine.lp_states.prompt_len.np[5] = engine.lp_states.prefill_len.np[5] = 3
        lp.add_request(5, SamplingParams())
        other.add_request(5, SamplingParams())
        cap.num_reqs, cap.forwards = 1, cap.forwards + 1
        ctx = SimpleNamespace(idx_mapping_np=np.array([5]), seq_lens_upper_bound_np=np.array([3]))
        lp.apply_staged_writes()
        lp.apply(torch.zeros(1, V), ctx)
        with pytest.raises(avllm.VLLMIntegrationError, match="two AutoSteer logits processors"):
            other.apply(torch.zeros(1, V), ctx)
    finally:
        avllm.detach_capture()


def test_v2_preempted_before_its_prompt_finished(setup, tmp_path, monkeypatch):
    """A request preempted in the middle of its prompt comes back with prefill_len == prompt_len: its gate
    decides at the prompt's end as if it had never left."""
    hf, rows, pack = setup
    ref = _reference(hf, rows, pack, "prefill")
    victim = max(range(len(rows)), key=lambda i: len(rows[i]))  # the longest prompt: several chunks of 3
    assert len(rows[victim]) > 3
    engine, outputs, summaries = _serve(setup, tmp_path, monkeypatch, "prefill", chunk=3,
                                        arrivals={0: [victim], 1: [0 if victim else 1]}, preempt={victim: (0, 2)})
    assert engine.preempted == 1
    for i in outputs:
        assert outputs[i] == ref[i][0] and summaries[i].latched == ref[i][1], f"request {i}"


def _v2_processor(setup, tmp_path, monkeypatch, **runner):
    hf, _, pack = setup
    monkeypatch.setenv(avllm.ENV_PACK, str(pack.save(tmp_path / "p.safetensors")))
    engine = V2Engine(hf, chunk=64)
    for k, v in runner.items():
        setattr(engine.runner, k, v)
    cap = avllm.attach_capture(engine.model, pack, max_reqs=8, metadata_fn=engine.metadata)
    lp = avllm.AutoSteerVLLMLogitsProcessor(_config(), engine.lp_states, capture=cap, v2_runner=engine.runner)
    engine.lp = lp
    return engine, lp, cap


def _add(engine, slot, rid, prompt_len, prefill_len=None):
    engine.index_to_req_id[slot] = rid
    engine.lp_states.prompt_len.np[slot] = prompt_len
    engine.lp_states.prefill_len.np[slot] = prompt_len if prefill_len is None else prefill_len
    engine.lp.add_request(slot, SamplingParams())


def _step(engine, cap, slots, seqs):
    V = engine.model.config.vocab_size
    cap.num_reqs, cap.forwards = len(slots), cap.forwards + 1  # as the layer hook leaves them
    engine.lp.apply_staged_writes()
    ctx = SimpleNamespace(idx_mapping_np=np.array(slots), seq_lens_upper_bound_np=np.array(seqs))
    return engine.lp.apply(torch.zeros(len(slots), V), ctx)


def test_v2_streaming_input_re_add_keeps_the_latch(setup, tmp_path, monkeypatch):
    """vLLM's streaming input re-adds a request under the same id with a longer prompt (removed without
    finish_requests): the gate decides again at the new prompt end, and a latch it had stays."""
    engine, lp, cap = _v2_processor(setup, tmp_path, monkeypatch)
    try:
        _add(engine, 5, "r", 3)
        _step(engine, cap, [5], [3])  # the first prompt's end
        lp.store.force_latch("r")
        del engine.index_to_req_id[5]  # _remove_request, then add_requests with the updated prompt
        _add(engine, 6, "r", 6)
        assert not lp._v2.resumed[6] and lp._v2.refill[6] == 6
        _step(engine, cap, [6], [6])
        assert lp.store.summary("r").latched and lp.store.state("r").prefill_done
    finally:
        avllm.detach_capture()


def test_v2_slot_reassigned_behind_the_processors_back_and_empty_steps(setup, tmp_path, monkeypatch):
    engine, lp, cap = _v2_processor(setup, tmp_path, monkeypatch)
    try:
        V = engine.model.config.vocab_size
        empty = torch.zeros(0, V)
        lp.apply_staged_writes()  # each step, before the forward
        assert lp.apply(empty, SimpleNamespace(idx_mapping_np=np.array([], dtype=np.int64),
                                               seq_lens_upper_bound_np=np.array([]))) is empty
        _add(engine, 5, "r", 3)
        engine.index_to_req_id[5] = "someone-else"  # vLLM put another request there without add_request
        with pytest.raises(avllm.VLLMIntegrationError, match="'r', vLLM 'someone-else'"):
            _step(engine, cap, [5], [3])
    finally:
        avllm.detach_capture()


def _preempt_many(engine, lp, count: int, latched) -> None:
    """Requests ``r0 .. r<count-1>`` added in slot 0, each given a state (latched where ``latched(n)``), then
    preempted: out of every slot, state kept."""
    for n in range(count):
        _add(engine, 0, f"r{n}", 3)
        lp.store._get_or_add(f"r{n}")
        if latched(n):
            lp.store.force_latch(f"r{n}")
        del engine.index_to_req_id[0]


def test_v2_keeps_at_most_a_bounded_number_of_preempted_states(setup, tmp_path, monkeypatch, caplog):
    """Past max_num_reqs x 4 states of requests out of every slot, the oldest unlatched ones go first
    (a latched one released would resume unlatched), with a warning."""
    engine, lp, cap = _v2_processor(setup, tmp_path, monkeypatch)
    try:
        limit = avllm._MAX_KEPT_FACTOR * 8
        _preempt_many(engine, lp, limit + 3, latched=lambda n: n < 2)
        with caplog.at_level("WARNING"):
            lp.apply_staged_writes()
        kept = set(lp._v2.kept)
        assert len(kept) == limit and {"r0", "r1"} <= kept and "r2" not in kept and "r4" not in kept
        assert "3 preempted requests' states released" in caplog.text and "unlatched ones only" in caplog.text
        assert set(lp.store.request_ids) == kept
    finally:
        avllm.detach_capture()


def test_v2_never_releases_a_latched_preempted_state(setup, tmp_path, monkeypatch, caplog):
    engine, lp, cap = _v2_processor(setup, tmp_path, monkeypatch)
    try:
        limit = avllm._MAX_KEPT_FACTOR * 8
        _preempt_many(engine, lp, limit + 3, latched=lambda n: True)  # every one latched
        with caplog.at_level("WARNING"):
            lp.apply_staged_writes()
        assert set(lp._v2.kept) == {f"r{n}" for n in range(limit + 3)} == set(lp.store.request_ids)
        assert "3 latched states kept past the cap" in caplog.text
    finally:
        avllm.detach_capture()


def test_v2_runner_without_finish_requests_is_refused(setup, tmp_path, monkeypatch):
    with pytest.raises(avllm.VLLMIntegrationError, match="without finish_requests"):
        _v2_processor(setup, tmp_path, monkeypatch, finish_requests=None)
    avllm.detach_capture()


def test_tensor_parallelism_under_model_runner_v2_is_refused_by_name(setup, tmp_path, monkeypatch):
    """Tensor parallelism is served and tested under the V1 runner; under Model Runner V2 it has not been run, so
    the processor stops the start-up with a named error instead of serving it untested."""
    from types import SimpleNamespace

    hf, _, pack = setup
    monkeypatch.setenv(avllm.ENV_PACK, str(pack.save(tmp_path / "p.safetensors")))
    engine = V2Engine(hf, chunk=64)
    cfg = _config()
    cfg.parallel_config = SimpleNamespace(tensor_parallel_size=2, pipeline_parallel_size=1,
                                          distributed_executor_backend="mp")
    cap = avllm.attach_capture(engine.model, pack, max_reqs=8, metadata_fn=engine.metadata)
    try:
        with pytest.raises(avllm.VLLMIntegrationError, match="under Model Runner V2 has not been run"):
            avllm.AutoSteerVLLMLogitsProcessor(cfg, engine.lp_states, capture=cap, v2_runner=engine.runner)
    finally:
        avllm.detach_capture()
