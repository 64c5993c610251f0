"""The pooled gate (``pooling="last_token|max"``, docs/method.md 7l) served by the vLLM integration: the capture runs
the token probe on every token of a forward that runs prompt tokens, the store keeps each request's running max over
its prompt tokens across prefill chunks and latches a request whose max passes tau before the op runs at its last
prompt token. On the simulated V1 engine (chunked prefill, preemption, prefix-cache hits) every request gets exactly
the tokens, latch and score the transformers runtime gives it. Under prefix caching each KV block keeps the highest
logit of its tokens, read by the requests that reuse the block; without it, a chunk that starts past prompt tokens
no step pooled gets a NaN score for the fail policy, never a max over part of the prompt. Model Runner V2 refuses
the pack at start-up by name. The real engine: tests/test_vllm_real_engine.py."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import autosteer
from autosteer.integrations import vllm as avllm
from autosteer.integrations.common import (PHASE_DECODE, PHASE_PREFILL_LAST, PHASE_PREFILL_MID, PoolingNotServed,
                                           SteerStateStore, SteerWeights, TokenPool)
from autosteer.prompting import PromptFormat, encode_one
from _pooled import pooled_pack
from conftest import make_pack, make_tiny_model, make_tokenizer
from test_vllm_simulation import KV_BLOCK, PROMPTS, Engine, _config, _reference

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=[[2], [1, 3]], ids=["one-layer", "two-layers"])
def pooled(request):
    tok = make_tokenizer()
    hf = make_tiny_model(len(tok))
    rows = [encode_one(tok, p, PromptFormat()) for p in PROMPTS]
    pack, p_last, p_pool = pooled_pack(hf, rows, request.param)
    return hf, rows, pack, p_last, p_pool


def test_the_scenario_has_prompts_only_the_token_probe_fires(pooled):
    _, rows, pack, p_last, p_pool = pooled
    tau = pack.tau
    by_pool = [i for i in range(len(rows)) if p_pool[i] > tau >= p_last[i]]
    assert len(by_pool) == 2 and sum(p > tau for p in p_last) == 4
    assert sum(max(a, b) > tau for a, b in zip(p_last, p_pool)) == 6


@pytest.mark.parametrize("mode,chunk", [("prefill", 1), ("prefill", 3), ("prefill", 64), ("monitor", 4)])
def test_the_engine_gates_as_transformers_does(pooled, tmp_path, monkeypatch, mode, chunk):
    """Requests arriving over time, prefilled in chunks of ``chunk`` tokens next to decoding rows (chunks of 1: every
    forward runs one token per request, the path decode steps take, scored by the processor): each request's
    tokens, latch, first steered token and score are the transformers runtime's (which pools the whole prompt in one
    forward), and rows that are not latched, or still prefilling, are never written."""
    hf, rows, pack, p_last, p_pool = pooled
    monkeypatch.setenv(avllm.ENV_PACK, str(pack.save(tmp_path / "p.safetensors")))
    monkeypatch.setenv(avllm.ENV_MODE, mode)
    ref = _reference(hf, rows, pack, mode)
    lp = avllm.AutoSteerVLLMLogitsProcessor(_config(), "cpu", False, patch_runner=False)
    engine = Engine(hf, lp, chunk=chunk)
    outputs, summaries = engine.serve({0: [0, 1, 2], 1: [3], 3: [4, 5], 4: [6], 6: [7]}, rows)
    for i in range(len(rows)):
        tokens, steered, latched_at = ref[i]
        assert outputs[i] == tokens, f"request {i}: tokens differ from transformers+AutoSteer"
        assert summaries[i].latched == steered and summaries[i].latched_at == latched_at, f"request {i}"
        assert summaries[i].p_unsafe == pytest.approx(max(p_last[i], p_pool[i]), abs=1e-4), i
    if mode == "prefill":  # the two prompts only the token probe fires are steered from their first token
        by_pool = [i for i in range(len(rows)) if p_pool[i] > pack.tau >= p_last[i]]
        assert all(summaries[i].latched and summaries[i].latched_at == 0 for i in by_pool)
    for ids, raw, final, still in engine.records:
        for b, rid in enumerate(ids):
            if still[b] or not summaries[rid].latched:
                assert torch.equal(raw[b], final[b]), f"request {rid}: row written while unlatched / mid-prompt"


def test_preempted_requests_keep_their_pooled_decision(pooled, tmp_path, monkeypatch):
    """A preempted request re-prefills prompt + outputs: its pooled max and latch are kept, its outputs not pooled."""
    hf, rows, pack, p_last, p_pool = pooled
    monkeypatch.setenv(avllm.ENV_PACK, str(pack.save(tmp_path / "p.safetensors")))
    ref = _reference(hf, rows, pack, "prefill")
    by_pool = [i for i in range(len(rows)) if p_pool[i] > pack.tau >= p_last[i]]
    quiet = [i for i in range(len(rows)) if not ref[i][1]]
    lp = avllm.AutoSteerVLLMLogitsProcessor(_config(), "cpu", False, patch_runner=False)
    engine = Engine(hf, lp, chunk=4)
    victims = [by_pool[0], quiet[0]]
    outputs, summaries = engine.serve({0: [victims[0], by_pool[1]], 1: [victims[1]]}, rows,
                                      preempt={victims[0]: (2, 2), victims[1]: (3, 1)})
    assert engine.preempted == 2
    for i in outputs:
        assert outputs[i] == ref[i][0] and summaries[i].latched == ref[i][1], i
        assert summaries[i].p_unsafe == pytest.approx(max(p_last[i], p_pool[i]), abs=1e-4), i


@pytest.mark.parametrize("keep_kv", [False, True], ids=["preempted", "left-out-of-a-step"])
def test_a_request_out_of_the_batch_mid_prompt_keeps_its_running_max(pooled, tmp_path, monkeypatch, keep_kv):
    """A request that leaves the batch in the middle of its prompt (preempted, or left out of a step with its KV
    cache kept, as vLLM does with a running request it has no token budget for) and comes back without outputs:
    its running max over the chunks before it left is kept -- not a fresh state with a gap, which the fail policy
    turns into a refusal of a benign prompt -- and it is released once."""
    hf, rows, pack, p_last, p_pool = pooled
    monkeypatch.setenv(avllm.ENV_PACK, str(pack.save(tmp_path / "p.safetensors")))
    ref = _reference(hf, rows, pack, "prefill")
    by_pool = [i for i in range(len(rows)) if p_pool[i] > pack.tau >= p_last[i]]
    quiet = [i for i in range(len(rows)) if not ref[i][1]]
    victims = [max(by_pool, key=lambda i: len(rows[i])), max(quiet, key=lambda i: len(rows[i]))]
    assert min(len(rows[v]) for v in victims) > 2 * 3 + pack.pool_skip  # pooled chunks before and after it leaves
    lp = avllm.AutoSteerVLLMLogitsProcessor(_config(), "cpu", False, patch_runner=False)
    engine = Engine(hf, lp, chunk=3)
    others = [i for i in range(len(rows)) if i not in victims][:2]
    outputs, summaries = engine.serve({0: [victims[0], others[0]], 1: [victims[1], others[1]]}, rows,
                                      preempt={v: (0, 2 + pack.pool_skip // 3, keep_kv) for v in victims})
    assert engine.preempted == 2
    for i in outputs:
        assert outputs[i] == ref[i][0] and summaries[i].latched == ref[i][1], i
        assert summaries[i].p_unsafe == pytest.approx(max(p_last[i], p_pool[i]), abs=1e-4), i
    assert sorted(engine.releases) == sorted(outputs), "a request's state released twice, or never"


def _store(pack, hf, *, fail_closed=True):
    """A store for ``pack`` whose last-token probe never fires (its bias far down): only the pooled gate decides."""
    import copy

    pack = copy.deepcopy(pack)
    pack.b2 = torch.tensor([-60.0])
    w = SteerWeights.from_pack(pack, hf.lm_head.weight.detach(), fail_closed=fail_closed)
    return SteerStateStore(w, max_batch=4)


def _step(store, pack, hf, keys, phase, pool_args):
    """One general step of hand-made rows (probe states zero: :func:`_store`'s last-token probe scores them near 0),
    ``pool_args`` as SteerStateStore.pool takes them."""
    B, H = len(keys), hf.config.hidden_size
    store.begin_step(keys, phase=torch.tensor(phase))
    store.pool(*pool_args)
    logits = torch.zeros(B, hf.config.vocab_size)
    zero = torch.zeros(B, H)
    store.apply(logits, probe_hidden=zero, head_hidden=torch.randn(B, H),
                probe_extra=[zero] * (len(pack.layers) - 1))
    store.end_step()
    return logits


def test_the_store_pools_prompt_tokens_across_chunks(pooled):
    """Two requests' prompts (10 and 6 tokens) in chunks, padding tokens after them: the running max covers every
    prompt token from pool_skip on and nothing else (not the shared prefix, not generated tokens, not padding)."""
    hf, _, pack, _, _ = pooled
    store = _store(pack, hf)
    skip = pack.pool_skip
    tau_logit = math.log(pack.tau / (1 - pack.tau))
    hi = tau_logit + 3.0
    z = lambda n: torch.full((n,), tau_logit - 5.0)  # noqa: E731
    P = torch.tensor([10, 6])
    # step 1: request a runs positions 0..4, b runs 0..5 (its whole prompt); 2 padding tokens score high
    x = torch.cat([z(5), z(6), torch.full((2,), hi + 9)])
    x[skip - 1] = hi + 5  # a's token before pool_skip: shared prefix, not pooled
    rows = torch.tensor([0] * 5 + [1] * 6 + [2, 2])
    pos = torch.tensor(list(range(5)) + list(range(6)) + [0, 0])
    _step(store, pack, hf, ["a", "b"], [PHASE_PREFILL_MID, PHASE_PREFILL_LAST],
          (x, rows, pos, torch.tensor([0, 0]), torch.tensor([5, 6]), P))
    assert not store.summary("a").latched and not store.summary("b").latched
    # step 2: a runs 5..9 (its last prompt token scores high), b its first generated token (high: not a prompt token)
    x = torch.cat([z(5), torch.full((1,), hi + 7)])
    x[4] = hi
    _step(store, pack, hf, ["a", "b"], [PHASE_PREFILL_LAST, PHASE_DECODE],
          (x, torch.tensor([0] * 5 + [1]), torch.tensor(list(range(5, 10)) + [6]), torch.tensor([5, 6]),
           torch.tensor([10, 7]), P))
    a, b = store.summary("a"), store.summary("b")
    assert a.latched and a.latched_at == 0 and a.p_unsafe == pytest.approx(1 / (1 + math.exp(-hi)), abs=1e-6)
    assert not b.latched and b.p_unsafe < pack.tau


@pytest.mark.parametrize("fail_closed", [True, False])
def test_a_chunk_past_unpooled_prompt_tokens_is_not_passed_off_as_the_whole(pooled, fail_closed):
    """A request whose first chunk starts past pool_skip (a prefix-cache hit: the cached tokens never ran) gets a NaN
    score, latched only when failing closed; so does a non-finite token logit."""
    hf, _, pack, _, _ = pooled
    store = _store(pack, hf, fail_closed=fail_closed)
    skip = pack.pool_skip
    low = torch.full((4,), -20.0)
    _step(store, pack, hf, ["cached"], [PHASE_PREFILL_LAST],
          (low, torch.zeros(4, dtype=torch.long), torch.arange(skip + 2, skip + 6), torch.tensor([skip + 2]),
           torch.tensor([skip + 6]), torch.tensor([skip + 6])))
    bad = low.clone()
    bad[2] = float("nan")
    _step(store, pack, hf, ["nan"], [PHASE_PREFILL_LAST],
          (bad, torch.zeros(4, dtype=torch.long), torch.arange(skip, skip + 4), torch.tensor([0]),
           torch.tensor([skip + 4]), torch.tensor([skip + 4])))
    for key in ("cached", "nan"):
        s = store.summary(key)
        assert math.isnan(s.p_unsafe) and s.latched == fail_closed, (key, s)
    # a cached start inside the shared prefix is no gap: nothing of what the pool reads was skipped
    _step(store, pack, hf, ["inside"], [PHASE_PREFILL_LAST],
          (low, torch.zeros(4, dtype=torch.long), torch.arange(skip - 1, skip + 3), torch.tensor([skip - 1]),
           torch.tensor([skip + 3]), torch.tensor([skip + 3])))
    s = store.summary("inside")
    assert not s.latched and not math.isnan(s.p_unsafe)


def test_pool_is_refused_outside_a_general_step(pooled):
    hf, _, pack, _, _ = pooled
    store = _store(pack, hf)
    args = (torch.zeros(1), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), torch.zeros(1),
            torch.ones(1), torch.ones(1))
    with pytest.raises(RuntimeError, match="between begin_step and apply"):
        store.pool(*args)
    plain = make_pack(hf, layers=pack.layers)
    s2 = SteerStateStore(SteerWeights.from_pack(plain, hf.lm_head.weight.detach()), max_batch=4)
    s2.begin_step(["a"], phase=torch.tensor([PHASE_PREFILL_LAST]))
    with pytest.raises(RuntimeError, match="no pooled gate"):
        s2.pool(*args)


def test_model_runner_v2_refuses_a_pooled_pack(pooled, tmp_path, monkeypatch):
    _, _, pack, _, _ = pooled
    monkeypatch.setenv(avllm.ENV_PACK, str(pack.save(tmp_path / "p.safetensors")))
    req_states = SimpleNamespace(device=torch.device("cpu"), max_num_reqs=8, vocab_size=5,
                                 prompt_len=None, prefill_len=None, total_len=None, all_token_ids=None)
    with pytest.raises(PoolingNotServed, match="Model Runner V2"):
        avllm.AutoSteerVLLMLogitsProcessor(_config(), req_states)


def _apc_lp(monkeypatch, tmp_path, pack):
    """A processor for an engine with prefix caching on (vLLM's default)."""
    monkeypatch.setenv(avllm.ENV_PACK, str(pack.save(tmp_path / "p.safetensors")))
    cfg = _config()
    cfg.cache_config = SimpleNamespace(enable_prefix_caching=True)
    lp = avllm.AutoSteerVLLMLogitsProcessor(cfg, "cpu", False, patch_runner=False)
    assert lp.kv_pool
    return lp


def _serve_sized(engine, lp, arrivals, rows):
    """Engine.serve, with what the patched initialize_kv_cache does in between: the token-logit table sized as the
    simulated KV cache (32 request slots of max_len tokens, blocks of KV_BLOCK)."""
    summaries = {}
    try:
        avllm.attach_capture(engine.model, max_reqs=8, metadata_fn=engine.metadata)
        store = lp._ensure_store(required=True)
        groups = [SimpleNamespace(kv_cache_spec=SimpleNamespace(block_size=KV_BLOCK))]
        lp._size_kv_pool(SimpleNamespace(_kernel_block_sizes=[KV_BLOCK]),
                         SimpleNamespace(num_blocks=32 * engine.max_len // KV_BLOCK, kv_cache_groups=groups))
        store.report_on_release = True
        store.on_release = lambda key, s: summaries.__setitem__(engine.key_of[key], s)
        outputs = engine.run(arrivals, rows)
        lp.update_state(engine._batch_update([], list(engine.batch)))
    finally:
        avllm.detach_capture()
    return outputs, summaries


def _cache_hits(hf, rows, pack, outputs):
    """Two prompts that reuse another request's KV blocks, each ``(donor, cached tokens c, prompt ids)``: (A) the donor's
    prompt and some of its answer, then the template's end, whose pooled gate fires on a cached token only (c past the
    donor's prompt: the cached blocks hold generated tokens, kept at decode steps); (B) the donor's prompt and the
    template's end again, whose highest token is cached (c within the donor's prompt)."""
    from _pooled import prompt_states

    skip, tau = pack.pool_skip, pack.tau
    tp = TokenPool(pack.pool_probe(), len(pack.layers), "cpu")
    lt = math.log(tau / (1 - tau))
    end = rows[0][-3:]  # the template's end: end of turn, the assistant header
    As, Bs = [], []
    for i, r in enumerate(rows):
        for k in range(0, 7):
            pre = r + outputs[i][:k]
            for c in range(KV_BLOCK, len(pre) + 1, KV_BLOCK):
                if c <= skip:
                    continue
                row = pre + end
                x = tp.score(prompt_states(hf, row, pack.layers))
                cached, rest = float(x[skip:c].max()), float(x[c:].max())
                if c > len(r) and cached > lt + 0.02 and rest < lt - 0.02:
                    As.append((i, c, row))
                if k == 0 and c <= len(r) and cached > rest + 0.02:
                    Bs.append((i, c, row))
    pairs = [(a, b) for a in As for b in Bs if a[0] != b[0]]  # two donors: each hit reuses its own donor's blocks
    assert pairs, (As, Bs)
    return pairs[0]


def test_prefix_cache_hits_pool_the_cached_tokens(pooled, tmp_path, monkeypatch):
    """Prefix caching on: a request whose first tokens come from the KV cache (another request's blocks, left after it
    finished, after yet another request used them) starts its forward past them, yet its pooled max covers them as
    they were computed then: (A) a prompt
    whose only firing token is in the cached prefix, which holds the earlier request's generated tokens too, is steered
    from its first token; (B) a prompt whose highest token is cached scores as in transformers. Every request's tokens,
    latch and score equal the transformers runtime's. (Cached tokens read from nowhere would score NaN, a gap: the score
    checks fail if the kept logits are not read, or read from the wrong slots.)"""
    hf, rows, pack, p_last, p_pool = pooled
    ref = _reference(hf, rows, pack, "prefill")
    A, B = _cache_hits(hf, rows, pack, {i: ref[i][0] for i in ref})
    all_rows = rows + [A[2], B[2]]
    n = len(rows)
    want = _reference(hf, all_rows, pack, "prefill")
    with autosteer.attach(hf, pack) as h:
        p_hit = [float(h.generate(input_ids=torch.tensor([r]), max_new_tokens=1, force=False).p_unsafe[0])
                 for r in all_rows[n:]]
    lp = _apc_lp(monkeypatch, tmp_path, pack)
    engine = Engine(hf, lp, chunk=4, swaps=False, prefix_hits={n: A[:2], n + 1: B[:2]})
    # the donors' blocks held another request's tokens first (the highest-scoring prompt left in the slots they get):
    # a block's kept max starts again with its new content
    X = max((i for i in range(n) if i not in (A[0], B[0])), key=lambda i: p_pool[i])
    Y = max((i for i in range(n) if i not in (A[0], B[0], X)), key=lambda i: p_pool[i])
    outputs, summaries = _serve_sized(engine, lp, {0: [X, Y], 13: [B[0], A[0]], 27: [n], 28: [n + 1]}, all_rows)
    assert engine.req[B[0]]["slot"] == engine.req[Y]["slot"] and engine.req[A[0]]["slot"] == engine.req[X]["slot"]
    for k in (A[0], B[0], n, n + 1):
        assert outputs[k] == want[k][0], k
        assert summaries[k].latched == want[k][1] and summaries[k].latched_at == want[k][2], k
    assert summaries[n].latched and summaries[n].latched_at == 0
    for k, p in zip((n, n + 1), p_hit):
        assert summaries[k].p_unsafe == pytest.approx(p, abs=1e-4), (k, summaries[k].p_unsafe, p)


def test_prefix_caching_engine_streams_as_transformers(pooled, tmp_path, monkeypatch):
    """With prefix caching on and no hits, the kept-logit path (decode steps write their token logits too) gates the
    usual stream exactly as transformers does."""
    hf, rows, pack, p_last, p_pool = pooled
    ref = _reference(hf, rows, pack, "prefill")
    lp = _apc_lp(monkeypatch, tmp_path, pack)
    engine = Engine(hf, lp, chunk=3)
    outputs, summaries = _serve_sized(engine, lp, {0: [0, 1, 2], 1: [3], 3: [4, 5], 4: [6], 6: [7]}, rows)
    for i in range(len(rows)):
        assert outputs[i] == ref[i][0] and summaries[i].latched == ref[i][1], i
        assert summaries[i].p_unsafe == pytest.approx(max(p_last[i], p_pool[i]), abs=1e-4), i


def test_prefix_caching_without_a_sized_table_is_refused(pooled, tmp_path, monkeypatch):
    """A runner whose initialize_kv_cache did not size the table (a path the wrapper missed): the first forward is
    refused by name, never served with cached tokens unread."""
    hf, rows, pack, _, _ = pooled
    lp = _apc_lp(monkeypatch, tmp_path, pack)
    engine = Engine(hf, lp, chunk=4)
    with pytest.raises(avllm.VLLMIntegrationError, match="token-logit table was never sized"):
        engine.serve({0: [0]}, rows)


def test_kept_block_maxima(pooled):
    """The capture's per-block table, by hand (blocks of 4): a block's max starts again when its first token is
    written (a block freed and reused holds the new content's max, not the old one's); a request reusing cached
    blocks reads the max of its whole blocks before its prompt's end; a block never written, a non-finite logit or a
    block table that does not give the forward's own slots makes the prior unusable (bad)."""
    hf, _, pack, _, _ = pooled
    from test_vllm_simulation import FakeVLLMLlama

    skip = pack.pool_skip
    assert skip < 4
    cap = avllm.attach_capture(FakeVLLMLlama(hf), pack, max_reqs=8, metadata_fn=lambda: None)
    try:
        cap.enable_kv_pool(32, 4)

        def forward(logits, start, slots, table):
            n = len(logits)
            cap.one_token, cap.pool_logits = False, torch.tensor(logits)
            md = SimpleNamespace(query_start_loc=torch.tensor([0, n]), seq_lens=torch.tensor([start + n]),
                                 slot_mapping=torch.tensor(slots), block_table=torch.tensor([table]))
            cap._keep_kv_logits(md, 1)

        forward([9.0] * 8, 0, list(range(8)), [0, 1, 2])  # a first request fills blocks 0 and 1 with high logits
        forward([-3.0, -2.0, -1.0, -2.5, -4.0, -0.5, -3.0, -3.5], 0, list(range(8)), [0, 1, 2])  # reused: new content
        forward([0.0, 0.0], 8, [8, 9], [0, 1, 2])  # a request reusing blocks 0 and 1 (8 cached tokens) runs 8 and 9
        m, bad, upto = cap.prior_max(torch.tensor([12]))
        want = max([-3.0, -2.0, -1.0, -2.5, -4.0, -0.5, -3.0, -3.5][skip:])
        assert float(m[0]) == want and not bool(bad[0]) and int(upto[0]) == 8
        m, bad, upto = cap.prior_max(torch.tensor([6]))  # a prompt ending inside block 1: block 0 only
        assert float(m[0]) == max([-3.0, -2.0, -1.0, -2.5][skip:]) and int(upto[0]) == 4
        forward([0.0, 0.0], 8, [8, 9], [0, 5, 2])  # block 5 was never written
        assert bool(cap.prior_max(torch.tensor([12]))[1][0])
        forward([1.0, 1.0, 1.0, float("nan")], 0, [24, 25, 26, 27], [6, 7])  # a NaN token logit in block 6
        forward([0.0], 4, [28], [6, 7])
        assert bool(cap.prior_max(torch.tensor([8]))[1][0])
        forward([0.0, 0.0], 8, [8, 9], [0, 1, 3])  # the block table does not give the forward's own slots
        assert bool(cap.prior_max(torch.tensor([12]))[1][0])
    finally:
        avllm.detach_capture()
