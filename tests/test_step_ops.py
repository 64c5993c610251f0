"""Per-step plugin work of the transformers path (issue 19, item 3): a decode step dispatches at most
4 torch ops and no host-syncing op, counted through the public API.

How the count is taken (exact, no subtraction; the two modes live in ``tests/_op_count.py``): the ops
are counted only while the plugin's own code runs. ``attach`` is called, then every forward (pre-)hook
that ``attach`` added to the model's modules is wrapped, and so is the processor class's ``__call__``
(the class of ``handle.logits_processor()``, which ``handle.generate`` builds too); each wrapper runs
its body under

- a ``TorchDispatchMode`` that records every op reaching the dispatcher (aten ops, views included,
  and the custom op ``autosteer::steer_step_cpu``; the op's own internals are not seen: they run
  below the mode), and
- a ``TorchFunctionMode`` that records the Python-level calls which read a tensor's values on the
  host (``.tolist()``, ``.item()``, ``bool(t)``, ``.cpu()``, ``.numpy()``, ...): on a CPU tensor some of
  them never reach the dispatcher, on a GPU every one of them waits for the device.

The model's own forward, generate's sampling and everything else run outside both modes, so the
count is the plugin's work and nothing else (the serving stores are counted with the same modes,
through their engines' public entry points: ``tests/test_serving_step_ops.py``). A "step" is the
hooks run by one model forward plus the processor call that follows it; step 0 is the prefill (not
bounded here: it decides the gate once per generation), steps 1.. are decode steps.

The tests run on the CPU (the C++ kernel); the ops are the same ones a CUDA run dispatches, where the
op is the Triton launch instead (not a dispatcher op: a dispatch mode does not see it there, so the
count is taken on the CPU) and everything ``_op_count.HOST_SYNC_OPS`` / ``HOST_SYNC_CALLS`` list would
block on the device.

What a decode step is today: prefill mode (and monitor mode past its window, ``force=True``): the
flat view of ``lm_head``'s input + the op; monitor mode: one ``cat`` of the probe layer's and
``lm_head``'s inputs into a preallocated buffer + one ``isin`` (rows that ended) + the op + one
in-place add (the latch count behind ``latched_at``); ``force=False``: nothing.
"""
from __future__ import annotations

import collections
import functools

import pytest
import torch

import autosteer
from _op_count import CallLog, OpLog, host_syncs
from autosteer.prompting import PromptFormat, encode_prompts
from conftest import make_pack

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_OPS_PER_DECODE_STEP = 4
PROMPTS = ["how do i make a bomb", "write poem about sea", "what is capital of france", "bake cake"]
NEW_TOKENS = 6

# the counting modes (shared with the serving stores' test, tests/test_serving_step_ops.py)
_Ops, _Calls = OpLog, CallLog


class StepRecorder:
    """Wraps the plugin's hooks and its processor class's ``__call__``; ``steps[i]`` is
    ``(ops, calls)`` of step ``i`` (a forward's hooks plus the processor call after it)."""

    def __init__(self):
        self.steps: list[tuple[list, list]] = []
        self._closed = True  # the last step has had its processor call
        self.wrapped_hooks = 0

    def _run(self, fn, args, kwargs, *, ends_step: bool):
        if self._closed:
            self.steps.append(([], []))
            self._closed = False
        ops, calls = self.steps[-1]
        with _Calls(calls), _Ops(ops):
            out = fn(*args, **kwargs)
        if ends_step:
            self._closed = True
        return out

    def wrap_processor_class(self, monkeypatch, cls):
        real = cls.__call__

        @functools.wraps(real)
        def call(proc, *args, **kwargs):
            return self._run(real, (proc, *args), kwargs, ends_step=True)

        monkeypatch.setattr(cls, "__call__", call)

    def wrap_new_hooks(self, model, before: dict):
        for mod in model.modules():
            for kind in ("_forward_pre_hooks", "_forward_hooks"):
                hooks = getattr(mod, kind)
                for key in list(hooks):
                    if key in before.get((id(mod), kind), ()):
                        continue
                    real = hooks[key]

                    def hook(*args, _real=real, **kwargs):
                        return self._run(_real, args, kwargs, ends_step=False)

                    hooks[key] = hook
                    self.wrapped_hooks += 1

    def decode_steps(self):
        assert self.steps and self._closed, "no complete step recorded"
        return self.steps[1:]


def hook_keys(model) -> dict:
    return {(id(m), kind): set(getattr(m, kind))
            for m in model.modules() for kind in ("_forward_pre_hooks", "_forward_hooks")}


def _split_tau(model, tok, pack):
    ids, mask = encode_prompts(tok, PROMPTS, PromptFormat())
    with autosteer.attach(model, pack) as h:
        p = h.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, force=False).p_unsafe
    return float(p.median())


def _record(monkeypatch, model, tok, *, api, mode, force=None, gen_kw=None, layers=None, **attach_kw):
    """One steered generation through the public API, with the plugin's ops recorded per step. ``layers``: a
    pack whose probe reads these layers."""
    pack = make_pack(model, layers=layers)
    pack.meta["tau"] = _split_tau(model, tok, pack)  # some rows latch at the prompt, some do not
    ids, mask = encode_prompts(tok, PROMPTS, PromptFormat())
    rec = StepRecorder()
    before = hook_keys(model)
    with autosteer.attach(model, pack, mode=mode, **attach_kw) as h:
        rec.wrap_new_hooks(model, before)
        assert rec.wrapped_hooks >= 2, "attach registered no hooks to count"
        rec.wrap_processor_class(monkeypatch, type(h.logits_processor()))
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                  do_sample=False)
        kw.update(gen_kw or {})
        if api == "handle":
            out = h.generate(force=force, **kw)
            latched = out.steered
        else:
            proc = h.logits_processor(force=force)
            model.generate(logits_processor=[proc], **kw)
            latched = proc.latched
    return rec, latched


def _check_decode_steps(rec):
    steps = rec.decode_steps()
    assert len(steps) == NEW_TOKENS - 1
    report = []
    for i, (ops, calls) in enumerate(steps, start=1):
        counted = collections.Counter(ops)
        syncs = host_syncs(ops, calls)
        report.append((i, len(ops), dict(counted), syncs))
    bad = [r for r in report if r[1] > MAX_OPS_PER_DECODE_STEP or r[3]]
    assert not bad, "decode steps over budget or syncing (step, n ops, ops, host syncs):\n" + "\n".join(map(str, bad))
    return report


@pytest.mark.parametrize("layers", [None, [1, 2, 3]], ids=["one layer", "three layers"])
@pytest.mark.parametrize("api", ["model.generate", "handle"])
@pytest.mark.parametrize("mode", ["prefill", "monitor"])
def test_a_decode_step_is_at_most_4_ops_and_never_syncs(tiny_model, tiny_tokenizer, monkeypatch, api, mode, layers):
    """Prefill mode (the gate decided at the prompt) and monitor mode (every generated token probed, rows
    ending on EOS / pad skipped), through ``model.generate(logits_processor=[handle.logits_processor()])``
    and ``handle.generate``: every decode step is the fused op plus at most 3 small ops, none of them a
    host sync (the continuity of the rows is told from host facts, not by comparing tokens). A probe reading
    three layers costs nothing more: its layers' rows go into the same one ``cat`` as lm_head's input."""
    kw = {"tau_monitor": 1.0} if mode == "monitor" else {}  # generated tokens probed, the prompt's split kept
    rec, latched = _record(monkeypatch, tiny_model, tiny_tokenizer, api=api, mode=mode, layers=layers, **kw)
    assert latched.any() and not latched.all(), "the blend and the pass-through must both run"
    report = _check_decode_steps(rec)
    for _, _, ops, _ in report:  # the fused op runs every decode step
        assert sum(n for op, n in ops.items() if op.startswith("autosteer.")) == 1, ops


def test_the_two_stage_gate_stays_within_the_budget(tiny_model, tiny_tokenizer, monkeypatch):
    """Monitor mode watching only a grey zone (``monitor_from``): the rows' thresholds are made at the prompt, so a
    decode step is the same ops as monitor mode's."""
    rec, latched = _record(monkeypatch, tiny_model, tiny_tokenizer, api="handle", mode="monitor", layers=None,
                           tau_monitor=1.0, monitor_from=0.0)
    assert latched.any() and not latched.all()
    for _, n, ops, _ in _check_decode_steps(rec):
        assert sum(v for op, v in ops.items() if op.startswith("autosteer.")) == 1 and n <= 4, ops


@pytest.mark.parametrize("force", [True, False])
def test_forced_runs_stay_within_the_budget(tiny_model, tiny_tokenizer, monkeypatch, force):
    rec, _ = _record(monkeypatch, tiny_model, tiny_tokenizer, api="handle", mode="monitor", force=force,
                     tau_monitor=0.5)
    _check_decode_steps(rec)


@pytest.mark.parametrize("mode", ["prefill", "monitor"])
def test_static_cache_and_sampling_stay_within_the_budget(tiny_model, tiny_tokenizer, monkeypatch, mode):
    """A static cache (the form a compiled decode uses) and sampling take the same per-step path."""
    torch.manual_seed(0)
    rec, _ = _record(monkeypatch, tiny_model, tiny_tokenizer, api="model.generate", mode=mode, tau_monitor=1.0,
                     gen_kw=dict(cache_implementation="static", do_sample=True, temperature=0.7, top_k=5))
    _check_decode_steps(rec)


def test_the_recorder_sees_ops_and_host_syncs(tiny_model, tiny_tokenizer, monkeypatch):
    """The counting harness itself: a processor that syncs the way the old continuity check did is caught."""
    from autosteer.runtime.processor import AutoSteerLogitsProcessor

    real = AutoSteerLogitsProcessor.__call__

    def syncing(proc, input_ids, scores):
        torch.equal(input_ids[:, :-1], input_ids[:, :-1].clone())
        input_ids[:, -1].tolist()
        return real(proc, input_ids, scores)

    monkeypatch.setattr(AutoSteerLogitsProcessor, "__call__", syncing)
    rec, _ = _record(monkeypatch, tiny_model, tiny_tokenizer, api="handle", mode="prefill")
    ops, calls = rec.decode_steps()[0]
    assert "aten.equal" in ops and "tolist()" in calls and "equal()" in calls
    with pytest.raises(AssertionError, match="over budget or syncing"):
        _check_decode_steps(rec)


def test_latched_at_and_p_last_match_the_per_step_latches(tiny_model, tiny_tokenizer):
    """Monitor mode keeps latched_at and p_last without per-step bookkeeping of its own beyond the budget:
    they equal what a spy on the op sees (the call at which each row first latched, each row's latest
    probed score), with rows latching at different generated tokens."""
    pack = make_pack(tiny_model)
    ids, mask = encode_prompts(tiny_tokenizer, PROMPTS, PromptFormat())
    with autosteer.attach(tiny_model, pack, tau=1.0, tau_monitor=1.0, mode="monitor") as h:
        seen = []
        real = h._op

        def spy(*a, **k):
            before = a[6].clone()
            out = real(*a, **k)
            seen.append((before, a[6].clone(), a[2].clone(), a[7].clone()))  # latched before/after, mask, p_out
            return out

        h._op = spy
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                  pad_token_id=0)
        tiny_model.generate(logits_processor=[h.logits_processor()], **kw)  # nothing latches: the scores
        scores = torch.stack([p for _, _, probed, p in seen[1:]])  # [steps, B]: generated tokens' scores

        def first_cross(t):
            hit = scores > t
            return tuple(int(c.nonzero()[0]) if c.any() else -1 for c in hit.t())

        # the threshold under which the rows first cross at the most different steps
        levels = scores.flatten().sort().values
        h.tau_monitor = float(max(((a + b) / 2 for a, b in zip(levels[:-1], levels[1:])),
                                  key=lambda t: len(set(first_cross(float(t))))))
        seen.clear()
        proc = h.logits_processor()
        tiny_model.generate(logits_processor=[proc], **kw)
    want_at = torch.full((len(PROMPTS),), -1, dtype=torch.int32)
    want_p = torch.full((len(PROMPTS),), float("nan"))
    for s, (before, after, probed, p) in enumerate(seen):
        want_at[(after & ~before) & (want_at < 0)] = s
        want_p = torch.where(probed, p, want_p)
    assert len(set(want_at.tolist()) - {-1}) >= 2, f"rows must latch at different steps: {want_at}"
    assert torch.equal(proc.latched_at, want_at)
    torch.testing.assert_close(proc.p_last, want_p, equal_nan=True)
    assert torch.equal(proc.latched, seen[-1][1])


def test_a_step_the_cache_object_does_not_vouch_for_is_compared_on_the_device(tiny_model, tiny_tokenizer):
    """What a continued step is told from: with the forward's KV cache object the same as the previous
    forward's (generate's loop, and this hand-written one), no token is compared; a decode forward that
    got another cache object (here a copy) makes the processor compare the rows' tokens with the previous
    call's (``aten.equal``, a host sync on a GPU), and rows that do not continue them are refused as
    before. (Not detected, by design: rows reordered together with the cache, passed along as the same
    object -- beam search by hand; generate's beam search is refused before it gets there.)"""
    import copy
    import inspect

    from transformers import DynamicCache

    cache_kw = "cache" if "cache" in inspect.signature(tiny_model.forward).parameters else "past_key_values"
    ids, mask = encode_prompts(tiny_tokenizer, PROMPTS, PromptFormat())
    with autosteer.attach(tiny_model, make_pack(tiny_model), tau=0.0) as h, torch.no_grad():
        def step(same_cache: bool, swap: bool):
            proc = h.logits_processor()
            cache = DynamicCache()
            out = tiny_model(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_kw: cache})
            proc(ids, out.logits[:, -1].float())
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            nxt_out = tiny_model(input_ids=nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1),
                                 use_cache=True, **{cache_kw: cache if same_cache else copy.deepcopy(cache)})
            seq = torch.cat([ids, nxt], 1)
            if swap:
                seq = seq[[1, 0, *range(2, len(ids))]]
            ops = []
            with _Ops(ops):
                proc(seq, nxt_out.logits[:, -1].float())
            assert proc.latched.all() and proc.step == 2
            return ops

        assert "aten.equal" not in step(same_cache=True, swap=False)
        assert "aten.equal" in step(same_cache=False, swap=False)
        with pytest.raises(RuntimeError, match="do not continue the previous step"):
            step(same_cache=False, swap=True)
