"""The framework-neutral state store / step driver and capture buffers (autosteer.integrations.common)."""
from __future__ import annotations

import random

import pytest
import torch

from autosteer.integrations.common import HiddenBuffer, SteerStateStore, SteerWeights, hook_input, hook_output_sum
from conftest import make_pack, make_tiny_model

H, V = 32, 40


@pytest.fixture(scope="module")
def weights():
    model = make_tiny_model(V, hidden=H)
    return SteerWeights.from_pack(make_pack(model), model.lm_head.weight)


def _tau_for(w, frac=0.35, seed=0):
    x = torch.randn(512, H, generator=torch.Generator().manual_seed(seed))
    return float(torch.quantile(w.probe_scores(x), 1 - frac))


def _blend(w, z, g):
    return ((1 + w.eps) * z.float() + w.eps * (g.float() @ w.Bt.t()) @ w.U.t()).to(z.dtype)


def _with_monitor_probe(w, seed=5):
    """``w`` plus a random monitor probe (stacked after the prefill probe, as ``from_pack`` does)."""
    g = torch.Generator().manual_seed(seed)
    F = w.W1.shape[0]
    mon = (torch.randn(F, H, generator=g), torch.randn(F, generator=g), torch.randn(F, generator=g),
           torch.randn(1, generator=g))
    stacked = (torch.stack([w.W1, mon[0]]), torch.stack([w.b1, mon[1]]), torch.stack([w.w2, mon[2]]),
               torch.cat([w.b2.reshape(1), mon[3]]))
    return SteerWeights(**{**w.__dict__, "stacked": stacked})


@pytest.mark.parametrize("mode", ["prefill", "monitor", "monitor-probe"])
def test_store_matches_a_per_request_reference_under_churn(weights, mode):
    """Random joins, leaves, reorders, chunked prefill: every step's logits and every request's
    latch equal a plain per-request model of the semantics."""
    # monitor mode: generated tokens have their own, higher threshold; mixed prefill/decode steps use both;
    # "monitor-probe": generated tokens are also scored by their own probe (one launch, row_probe per row)
    base = _with_monitor_probe(weights) if mode == "monitor-probe" else weights
    tau_mon = None
    if mode != "prefill":
        x = torch.randn(512, H, generator=torch.Generator().manual_seed(1))
        tau_mon = float(torch.quantile(base.monitor_probe_scores(x), 1 - 0.15))
    w = SteerWeights(**{**base.__dict__, "tau": _tau_for(weights), "tau_monitor": tau_mon})
    mode = "monitor" if mode == "monitor-probe" else mode
    store = SteerStateStore(w, mode=mode, max_batch=2, max_requests=2)  # forces growth of both tables
    between = False  # a decode score above tau but not above tau_monitor (the two thresholds differ in effect)
    probe_decisive = False  # a decode row the prefill probe would decide differently (the probes differ in effect)
    rng = random.Random(0)
    g = torch.Generator().manual_seed(1)
    latched, prompt_left, done, seen = {}, {}, set(), set()
    next_id = 0
    fired_at_decode = False
    for step in range(40):
        live = [r for r in prompt_left if r not in done]
        for _ in range(rng.randint(0, 2)):  # joins
            prompt_left[next_id] = rng.randint(1, 3)  # prompt chunks
            latched[next_id] = False
            live.append(next_id)
            next_id += 1
        rng.shuffle(live)
        rows = live[: rng.randint(1, 6)] if live else []
        if not rows:
            continue
        seen.update(rows)
        prefill = any(prompt_left[r] > 0 for r in rows)
        B = len(rows)
        if prefill:
            lens = [rng.randint(1, 4) if prompt_left[r] > 0 else 1 for r in rows]
            cu = [0]
            for n in lens:
                cu.append(cu[-1] + n)
            prefilling = [prompt_left[r] > 0 for r in rows]
            still = [prompt_left[r] > 1 for r in rows]
            probe_hidden = torch.randn(cu[-1], H, generator=g)
            probe_rows = [cu[b + 1] - 1 for b in range(B)]
            store.begin_step(rows, cu_seqlens=cu if step % 2 else torch.tensor(cu, dtype=torch.int32),
                             prefilling=prefilling, still_prefilling=still)
        else:
            prefilling, still = [False] * B, [False] * B
            probe_hidden = torch.randn(B, H, generator=g)
            probe_rows = list(range(B))
            store.begin_step(rows)
        head_hidden = torch.randn(B, H, generator=g)
        logits = torch.randn(B, V, generator=g)
        expect = logits.clone()
        store.apply(logits, probe_hidden=probe_hidden, head_hidden=head_hidden)
        store.end_step()
        for b, r in enumerate(rows):
            if still[b]:
                prompt_left[r] -= 1
                continue  # discarded row: no latch, no writes
            probe = prefilling[b] or mode == "monitor"
            if probe:
                score = w.probe_scores if prefilling[b] else w.monitor_probe_scores
                p = float(score(probe_hidden[probe_rows[b]: probe_rows[b] + 1])[0])
                t = w.tau if prefilling[b] else w.monitor_tau
                if not prefilling[b] and not latched[r]:
                    p_pre = float(w.probe_scores(probe_hidden[probe_rows[b]: probe_rows[b] + 1])[0])
                    probe_decisive |= (p_pre > t) != (p > t)
                if p > t and not latched[r] and not prefilling[b]:
                    fired_at_decode = True
                between |= not prefilling[b] and not latched[r] and w.tau < p <= t
                latched[r] |= p > t
            if prefilling[b]:
                prompt_left[r] = 0
            if latched[r]:
                expect[b] = _blend(w, expect[b: b + 1], head_hidden[b: b + 1])[0]
        torch.testing.assert_close(logits, expect, rtol=1e-5, atol=1e-5)
        for b, r in enumerate(rows):
            if not latched[r]:
                assert torch.equal(logits[b], expect[b])
        for r in rows:
            assert store.summary(r).latched == latched[r], f"step {step} request {r}"
        for r in rows:  # some finish
            if prompt_left[r] == 0 and rng.random() < 0.2:
                done.add(r)
                assert store.release(r)
    assert any(latched.values()) and not all(latched.values())
    if mode == "monitor":
        assert fired_at_decode and between
        assert probe_decisive == (w.stacked is not None)
    assert sorted(store.request_ids) == sorted(seen - done)


def test_speculative_latch_commits_at_the_last_accepted_position(weights):
    """Monitor mode, 3 positions: a trigger at a rejected speculative position does not stick."""
    w = weights
    # a hidden row that fires and one that does not, found from the probe itself
    cands = torch.randn(256, H, generator=torch.Generator().manual_seed(3))
    p = w.probe_scores(cands)
    tau = float(p.median())
    w = SteerWeights(**{**w.__dict__, "tau": tau})
    hot, cold = cands[p.argmax()], cands[p.argmin()]
    store = SteerStateStore(w, mode="monitor")
    store.begin_step(["a", "b"], cu_seqlens=[0, 1, 2])  # prefill: both cold
    store.apply(torch.randn(2, V), probe_hidden=torch.stack([cold, cold]), head_hidden=torch.randn(2, H))
    store.end_step()
    # decode with 2 speculative tokens; position 2 fires for both; a accepts 1 token, b all 3
    ph = torch.stack([cold, cold, hot, cold, cold, hot])  # row b * 3 + j
    logits = torch.randn(2 * 3, V)
    raw = logits.clone()
    store.begin_step(["a", "b"], positions=3)
    view = logits.view(2, 3, V)
    for j in range(3):
        store.apply(view[:, j], probe_hidden=ph, head_hidden=torch.randn(6, H))
    store.end_step(accepted=torch.tensor([1, 3]))
    assert torch.equal(logits.view(2, 3, V)[:, :2], raw.view(2, 3, V)[:, :2])  # positions 0, 1: unlatched
    assert not torch.equal(logits.view(2, 3, V)[:, 2], raw.view(2, 3, V)[:, 2])  # position 2 steered
    a, b = store.summary("a"), store.summary("b")
    assert not a.latched and a.latched_at == -1 and a.tokens == 2
    assert b.latched and b.latched_at == 1 + 2 and b.tokens == 4  # first steered token: index 3


def test_slots_are_reset_when_reused_and_state_is_released(weights):
    w = SteerWeights(**{**weights.__dict__, "tau": 0.0})  # everything latches
    store = SteerStateStore(w, max_requests=1)
    store.begin_step([7], cu_seqlens=[0, 2])
    store.apply(torch.randn(1, V), probe_hidden=torch.randn(2, H), head_hidden=torch.randn(1, H))
    store.end_step()
    assert store.summary(7).latched
    released = []
    store.on_release = lambda rid, s: released.append((rid, s))
    store.report_on_release = True
    store.release(7)
    assert released[0][0] == 7 and released[0][1].latched and 7 not in store
    w2 = SteerWeights(**{**weights.__dict__, "tau": 1.0})  # nothing latches
    store.w = w2
    store.begin_step([8], cu_seqlens=[0, 2])
    logits = torch.randn(1, V)
    raw = logits.clone()
    store.apply(logits, probe_hidden=torch.randn(2, H), head_hidden=torch.randn(1, H))
    store.end_step()
    assert store.state(8).slot == 0  # the freed slot
    assert not store.summary(8).latched and torch.equal(logits, raw)
    assert not store.release(12345)


def test_step_protocol_errors(weights):
    store = SteerStateStore(weights)
    with pytest.raises(ValueError, match="twice"):
        store.begin_step([1, 1])
    with pytest.raises(ValueError, match="still_prefilling without prefilling"):
        store.begin_step([1, 2], cu_seqlens=[0, 1, 2], prefilling=[True, False], still_prefilling=[False, True])
    store.begin_step([1, 2], positions=2)
    with pytest.raises(RuntimeError, match="begin_step called twice"):
        store.begin_step([3])
    with pytest.raises(ValueError, match="2 rows"):
        store.apply(torch.randn(3, V), probe_hidden=torch.randn(4, H), head_hidden=torch.randn(4, H))
    with pytest.raises(RuntimeError, match="middle of a step"):
        store.release(1)
    store.apply(torch.randn(2, V), probe_hidden=torch.randn(4, H), head_hidden=torch.randn(4, H))
    with pytest.raises(RuntimeError, match="ran 1 of 2"):
        store.end_step()
    assert not store.in_step  # the failed step was dropped


def test_missed_prefill_is_probed_at_decode(weights, caplog):
    w = SteerWeights(**{**weights.__dict__, "tau": 0.0})
    store = SteerStateStore(w)
    store.begin_step(["late"])  # a decode row for a request whose prefill was never seen
    logits = torch.randn(1, V)
    raw = logits.clone()
    store.apply(logits, probe_hidden=torch.randn(1, H), head_hidden=torch.randn(1, H))
    store.end_step()
    assert "without a recorded prefill" in caplog.text
    assert store.summary("late").latched and not torch.equal(logits, raw)


def test_hidden_buffer_writes_in_place_and_overflows(weights):
    buf = HiddenBuffer(4, H, torch.float32, "cpu")
    addr = buf.buf.data_ptr()
    lin = torch.nn.Linear(H, H)
    hooks = [hook_input(lin, buf)]
    x = torch.randn(3, H)
    lin(x)
    assert buf.overflow is None and torch.equal(buf.view()[:3], x) and buf.buf.data_ptr() == addr
    big = torch.randn(9, H)
    buf.begin_forward()
    lin(big)
    assert buf.view() is buf.overflow and torch.equal(buf.view(), big)
    buf.begin_forward()
    assert buf.view() is buf.buf  # a graph replay after an eager overflow reads the buffer, not the stale tensor
    hooks[0].remove()

    class Pair(torch.nn.Module):
        def forward(self, a, b):
            return a * 2, b + 1

    pair = Pair()
    hook_output_sum(pair, buf)
    a, b = torch.randn(2, H), torch.randn(2, H)
    pair(a, b)
    torch.testing.assert_close(buf.view()[:2], a * 2 + b + 1)
    assert buf.writes == 3


def test_hidden_buffer_keeps_a_reference_unless_told_to_copy():
    """write_or_keep: an eager forward's tensor is kept by reference (no copy, no op); while the engine may be
    capturing a graph (``copy=True``: TGI's warm-up) it is copied into the buffer's fixed memory, which a
    later step after a begin_forward reads."""
    buf = HiddenBuffer(4, H, torch.float32, "cpu")
    x = torch.randn(3, H)
    buf.write_or_keep(x)
    assert buf.view() is x and not torch.equal(buf.buf[:3], x)
    buf.begin_forward()
    buf.write_or_keep(x, copy=True)
    assert buf.overflow is None and buf.view() is buf.buf and torch.equal(buf.buf[:3], x)
    assert buf.writes == 2


def test_server_settings_parse_strictly():
    """Environment / server-config values: a typo must stop the start-up, never flip a safety setting."""
    from autosteer.integrations.common import parse_flag, parse_threshold

    for v in ("1", "true", "YES", " on ", True):
        assert parse_flag(v, "X", False) is True
    for v in ("0", "false", "No", "off", False):
        assert parse_flag(v, "X", True) is False
    assert parse_flag(None, "X", True) is True and parse_flag("", "X", False) is False
    for v in ("maybe", "2", "closed"):
        with pytest.raises(ValueError, match=f"X={v!r} is not a boolean"):
            parse_flag(v, "X", True)
    assert parse_threshold(None, "T") is None and parse_threshold(" ", "T") is None
    assert parse_threshold("0.25", "T") == 0.25 and parse_threshold(1, "T") == 1.0 and parse_threshold("0", "T") == 0.0
    with pytest.raises(ValueError, match="T='abc' is not a number"):
        parse_threshold("abc", "T")
    with pytest.raises(ValueError, match="T=True is not a number"):
        parse_threshold(True, "T")
    for v in ("2", "-1", "nan", 1.5, float("inf")):
        with pytest.raises(ValueError, match="is not a probability threshold in"):
            parse_threshold(v, "T")


def test_weights_refuse_a_threshold_outside_0_1_and_fail_closed_by_default():
    model = make_tiny_model(V, hidden=H)
    pack = make_pack(model)
    for tau in (2.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="not a probability threshold"):
            SteerWeights.from_pack(pack, model.lm_head.weight, tau=tau)
    w = SteerWeights.from_pack(pack, model.lm_head.weight, tau=1.0)
    assert w.fail_closed is True
    # a NaN hidden state steers the request by default (fail closed) and leaves it alone when asked to
    h = torch.randn(2, H)
    h[1] = float("nan")
    for fail_closed, want in ((True, [False, True]), (False, [False, False])):
        store = SteerStateStore(SteerWeights(**{**w.__dict__, "fail_closed": fail_closed}))
        store.begin_step(["ok", "nan"], cu_seqlens=[0, 1, 2])  # a one-token prefill per request
        logits = torch.randn(2, V)
        raw = logits.clone()
        store.apply(logits, probe_hidden=h, head_hidden=torch.randn(2, H))
        store.end_step()
        assert [store.summary(r).latched for r in ("ok", "nan")] == want, fail_closed
        assert torch.equal(logits[0], raw[0]) and torch.equal(logits[1], raw[1]) is not want[1]


def test_a_refused_step_registers_no_request(weights):
    """begin_step checks everything before registering new ids: a request whose first step was
    refused starts clean on its next step instead of inheriting the slot's previous occupant's latch
    (found by review)."""
    w = SteerWeights(**{**weights.__dict__, "tau": 0.0})  # every probed row latches
    store = SteerStateStore(w)
    store.begin_step(["a"], cu_seqlens=[0, 1])
    store.apply(torch.randn(1, V), probe_hidden=torch.randn(1, H), head_hidden=torch.randn(1, H))
    store.end_step()
    assert store.summary("a").latched
    store.release("a")
    for bad in ({"cu_seqlens": [0]}, {"cu_seqlens": [0, 1], "head_rows": [0, 1]}, {"phase": torch.zeros(0)}):
        with pytest.raises(ValueError, match="entries, need"):
            store.begin_step(["b"], **bad)
        assert "b" not in store.request_ids and not store.in_step
    store.w = SteerWeights(**{**weights.__dict__, "tau": 1.0})  # now nothing latches
    store.begin_step(["b"], cu_seqlens=[0, 1])  # takes a's old slot, which must be reset
    store.apply(torch.randn(1, V), probe_hidden=torch.randn(1, H), head_hidden=torch.randn(1, H))
    store.end_step()
    assert store.state("b").slot == 0 and not store.summary("b").latched


def test_force_latch_outside_a_step(weights):
    """force_latch (an integration failing closed when it cannot tell whose parked state is whose) latches
    a request: latched_at becomes its token count if it had not latched, and stays if it had."""
    store = SteerStateStore(weights, mode="prefill", max_batch=4)
    store._get_or_add("a")
    store._get_or_add("b")
    sa, sb = store.state("a").slot, store.state("b").slot
    store._slot_tokens[sa] = 7
    store._slot_latched[sb], store._slot_latched_at[sb], store._slot_tokens[sb] = True, 2, 9
    store.force_latch("a")
    store.force_latch("b")
    assert store.summary("a").latched and store.summary("a").latched_at == 7
    assert store.summary("b").latched and store.summary("b").latched_at == 2
    with pytest.raises(KeyError):
        store.force_latch("nobody")


def test_precompile_runs_every_variant_a_store_launches_and_only_reads_the_weights(monkeypatch):
    """SteerWeights.precompile (called by the vLLM and TGI stores when they are built): one op call per logits
    dtype x probe set x with/without state_rows, each with the row latched (so the blend launch runs), with the
    store's index dtypes; the weights are left as they were."""
    import autosteer.runtime.op as op_mod

    torch.manual_seed(0)
    V, H, F, r = 64, 8, 4, 2
    w = SteerWeights(W1=torch.randn(F, H), b1=torch.randn(F), w2=torch.randn(F), b2=torch.randn(1),
                            U=torch.randn(V, r), Bt=torch.randn(r, H), tau=0.5, eps=0.3, fail_closed=True, layers=[1])
    before = [t.clone() for t in (w.W1, w.b1, w.w2, w.b2, w.U, w.Bt)]
    seen = []
    real = op_mod.steer_step

    def spy(*args, row_probe=None, state_rows=None, **kw):
        seen.append((args[5].dtype, args[0].dtype, row_probe is not None, state_rows is not None,
                     args[1].dtype, None if state_rows is None else state_rows.dtype, bool(args[6].all())))
        return real(*args, row_probe=row_probe, state_rows=state_rows, **kw)

    monkeypatch.setattr(op_mod, "steer_step", spy)
    assert w.precompile(torch.bfloat16, (torch.float32, torch.bfloat16, torch.float32)) == 4
    assert sorted(seen, key=str) == sorted([(dt, torch.bfloat16, False, s, torch.int64, torch.int64 if s else None, True)
                                            for dt in (torch.float32, torch.bfloat16) for s in (False, True)], key=str)
    stacked = tuple(torch.stack([t, t + 1]) for t in (w.W1, w.b1, w.w2)) + (torch.cat([w.b2, w.b2]),)
    w2 = SteerWeights(**{**vars(w), "stacked": stacked})
    seen.clear()
    assert w2.precompile(torch.float32) == 4  # float32 logits x (prefill probe, stacked probes) x state_rows
    assert sum(1 for s in seen if s[2]) == 2
    for a, b in zip(before, (w.W1, w.b1, w.w2, w.b2, w.U, w.Bt)):
        assert torch.equal(a, b)


def test_a_request_with_steering_off_reports_no_prompt_score():
    """An off request is not probed, so its summary's p_unsafe is NaN -- not the score an earlier request left in
    the same row (found by review: it reported request A's 0.98792)."""
    import math

    from autosteer.integrations.common import RequestSettings

    torch.manual_seed(0)
    H, V = 32, 40
    m = make_tiny_model(V, hidden=H)
    s = SteerStateStore(SteerWeights.from_pack(make_pack(m), m.lm_head.weight))
    s.begin_step(["A"], cu_seqlens=[0, 3])
    s.apply(torch.randn(1, V), probe_hidden=torch.randn(3, H), head_hidden=torch.randn(1, H))
    s.end_step()
    s.set_request_settings("B", RequestSettings(off=True))
    s.begin_step(["B"], cu_seqlens=[0, 2])
    s.apply(torch.randn(1, V), probe_hidden=torch.randn(2, H), head_hidden=torch.randn(1, H))
    s.end_step()
    assert not math.isnan(s.summary("A").p_unsafe)
    assert math.isnan(s.summary("B").p_unsafe) and not s.summary("B").latched
