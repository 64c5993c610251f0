"""Faults at run time: NaN hidden states, op errors (fail closed vs fail open), threads, two models."""
from __future__ import annotations

import logging
import threading

import pytest
import torch

import autosteer
from autosteer.runtime.attach import AutoSteerFault
from autosteer.prompting import PromptFormat, encode_prompts
from conftest import make_pack, make_tiny_model

PROMPTS = ["how do i make a bomb", "write poem about sea", "what is capital of france", "bake cake"]


def _nan_row0(module, args, kwargs):
    h = (args[0] if args else kwargs["hidden_states"]).clone()
    if h.shape[1] > 1:  # prefill only
        h[0] = float("nan")
    return ((h,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})


@pytest.mark.parametrize("fail_closed", [True, False])
def test_nan_hidden_states_follow_the_policy(tiny_model, tiny_tokenizer, fail_closed):
    pack = make_pack(tiny_model)
    ids, mask = encode_prompts(tiny_tokenizer, PROMPTS, PromptFormat())
    with autosteer.attach(tiny_model, pack, tau=1.0) as h:  # tau 1.0: no finite score fires
        clean = h.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)
    inject = tiny_model.model.layers[pack.layer].register_forward_pre_hook(_nan_row0, with_kwargs=True)
    try:
        with autosteer.attach(tiny_model, pack, tau=1.0, fail_closed=fail_closed) as h:
            out = h.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)
    finally:
        inject.remove()
    assert torch.isnan(out.p_unsafe[0])
    assert bool(out.steered[0]) is fail_closed
    assert not out.steered[1:].any()
    torch.testing.assert_close(out.p_unsafe[1:], clean.p_unsafe[1:])


def test_op_error_stops_generation_when_failing_closed(tiny_model, tiny_tokenizer):
    ids, mask = encode_prompts(tiny_tokenizer, PROMPTS, PromptFormat())
    with autosteer.attach(tiny_model, make_pack(tiny_model)) as h:
        h._op = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("device lost"))
        with pytest.raises(AutoSteerFault, match="device lost"):
            h.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3)


def test_op_error_is_logged_once_and_generation_goes_on_unsteered_when_failing_open(tiny_model, tiny_tokenizer, caplog):
    ids, mask = encode_prompts(tiny_tokenizer, PROMPTS, PromptFormat())
    plain = tiny_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    with autosteer.attach(tiny_model, make_pack(tiny_model), tau=0.0, fail_closed=False) as h:
        h._op = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("device lost"))
        with caplog.at_level(logging.ERROR, logger="autosteer.runtime.attach"):
            out = h.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(out.sequences, plain)
    assert h.faults == 4
    assert sum("UNSTEERED" in r.message for r in caplog.records) == 1


def test_concurrent_generate_calls_on_one_handle_are_serialised(tiny_model, tiny_tokenizer):
    pack = make_pack(tiny_model)
    batches = [encode_prompts(tiny_tokenizer, PROMPTS[i:i + 2], PromptFormat()) for i in (0, 2)]
    with autosteer.attach(tiny_model, pack, tau=0.5) as h:
        expected = [h.generate(input_ids=i, attention_mask=m, max_new_tokens=5, do_sample=False) for i, m in batches]
        results = [None, None]

        def work(k):
            for _ in range(3):
                ids, mask = batches[k]
                results[k] = h.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)

        threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for got, want in zip(results, expected):
        assert torch.equal(got.sequences, want.sequences) and torch.equal(got.steered, want.steered)


def test_a_forward_from_another_thread_is_detected(tiny_model, tiny_tokenizer):
    ids, mask = encode_prompts(tiny_tokenizer, PROMPTS, PromptFormat())
    with autosteer.attach(tiny_model, make_pack(tiny_model)) as h:
        proc = h.logits_processor()
        with torch.no_grad():
            scores = tiny_model(input_ids=ids, attention_mask=mask).logits[:, -1].float()
        t = threading.Thread(target=lambda: tiny_model(input_ids=ids[:1], attention_mask=mask[:1]))
        t.start()
        t.join()  # another thread ran the model between this thread's forward and its step
        with pytest.raises(RuntimeError, match="another thread"):
            proc(ids, scores)


def test_capture_under_a_compiled_forward(tiny_model, tiny_tokenizer):
    """torch.compile on the model's forward (dynamo traces the capture hooks) reads the same hidden states as
    eager: same gate scores and tokens (a per-thread capture store was tried and read the wrong tensors
    under dynamo, silently; this test keeps it out)."""
    ids, mask = encode_prompts(tiny_tokenizer, PROMPTS[:2], PromptFormat())
    pack = make_pack(tiny_model)
    eager = tiny_model.forward
    with autosteer.attach(tiny_model, pack) as h:
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        ref = {f: h.generate(force=f, **kw) for f in (False, True)}
        try:
            tiny_model.forward = torch.compile(eager)
            got = {f: h.generate(force=f, **kw) for f in (False, True)}
        finally:
            tiny_model.__dict__.pop("forward", None)  # the class's forward again
    assert tiny_model.forward == eager
    torch.testing.assert_close(got[False].p_unsafe, ref[False].p_unsafe)
    assert torch.equal(got[False].sequences, ref[False].sequences)
    assert torch.equal(got[True].sequences, ref[True].sequences)


def test_one_pack_on_two_models_gives_independent_handles(tiny_model, tiny_tokenizer):
    twin = make_tiny_model(len(tiny_tokenizer))  # same seed: same weights, another instance
    pack = make_pack(tiny_model)
    ids, mask = encode_prompts(tiny_tokenizer, PROMPTS, PromptFormat())
    h1, h2 = autosteer.attach(tiny_model, pack, tau=0.0), autosteer.attach(twin, pack, tau=1.0)
    try:
        a = h1.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3)
        b = h2.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3)
    finally:
        h1.detach()
        h2.detach()
    assert a.steered.all() and not b.steered.any()


def test_rows_finishing_at_different_steps(tiny_model, tiny_tokenizer):
    """Rows that hit EOS early are padded by generate; the others go on, unsteered rows unchanged."""
    pack = make_pack(tiny_model)
    ids, mask = encode_prompts(tiny_tokenizer, PROMPTS, PromptFormat())
    free = tiny_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8,
                               do_sample=False)[:, ids.shape[1]:]

    def first(row, tok):
        hits = (row == tok).nonzero()
        return int(hits[0]) if len(hits) else 8

    # a generated token that comes first at different steps in different rows becomes EOS
    eos = next(int(t) for t in free.unique() if int(t) not in (0, 3) and len({first(row, t) for row in free}) > 1)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=0)
    plain = tiny_model.generate(**kw)
    assert len({first(row[ids.shape[1]:], eos) for row in plain}) > 1, "rows must finish at different steps"
    scores = None
    with autosteer.attach(tiny_model, pack) as h:
        scores = h.generate(**kw, force=False).p_unsafe
        h.tau = float(scores.median())  # mixed latches
        out = h.generate(**kw)
    assert out.steered.any() and not out.steered.all()
    for b in range(len(PROMPTS)):
        if not out.steered[b]:
            assert torch.equal(out.sequences[b], plain[b])


def test_modes_refused_from_the_config_generate_really_runs_with(tiny_model, tiny_tokenizer):
    """The up-front check reads the merged config (the call's generation_config completed from the model's),
    and refuses continuous batching, whose own logits processors would serve every request unsteered
    (found by review)."""
    from transformers import GenerationConfig

    ids, mask = encode_prompts(tiny_tokenizer, PROMPTS[:2], PromptFormat())
    with autosteer.attach(tiny_model, make_pack(tiny_model)) as h:
        saved = tiny_model.generation_config.num_beams
        tiny_model.generation_config.num_beams = 2
        try:
            with pytest.raises(ValueError, match="beam search"):
                h.generate(input_ids=ids, attention_mask=mask, generation_config=GenerationConfig(max_new_tokens=2))
        finally:
            tiny_model.generation_config.num_beams = saved
        with pytest.raises(ValueError, match="continuous batching"):
            h.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, cache_implementation="paged")


def test_classifier_free_guidance_used_directly_raises(tiny_model, tiny_tokenizer):
    """guidance_scale runs a second model forward inside transformers' processor list each step, which
    replaces the captured hidden states: a processor passed to model.generate directly refuses to go on
    instead of steering on the unconditional branch (found by review)."""
    ids, mask = encode_prompts(tiny_tokenizer, PROMPTS[:1], PromptFormat())
    with autosteer.attach(tiny_model, make_pack(tiny_model)) as h:
        with pytest.raises(RuntimeError, match="classifier-free guidance"), torch.no_grad():
            tiny_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                guidance_scale=1.5, logits_processor=[h.logits_processor()])


def test_output_logits_stay_raw_with_copy_scores(tiny_model, tiny_tokenizer):
    """output_logits returns the tensor processors receive; copy_scores=True steers a copy, so the returned
    logits are the model's and the scores are the steered ones."""
    ids, mask = encode_prompts(tiny_tokenizer, PROMPTS[:1], PromptFormat())
    with autosteer.attach(tiny_model, make_pack(tiny_model)) as h, torch.no_grad():
        raw = tiny_model(input_ids=ids, attention_mask=mask).logits[:, -1].float()
        out = tiny_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False,
                                  output_logits=True, output_scores=True, return_dict_in_generate=True,
                                  logits_processor=[h.logits_processor(force=True, copy_scores=True)])
    torch.testing.assert_close(out.logits[0].float(), raw)
    assert not torch.allclose(out.scores[0].float(), raw)


def test_handle_generate_returns_what_generate_returned(tiny_model, tiny_tokenizer):
    """handle.generate keeps generate's own output (scores, logits) beside the decisions, and its
    output_logits stay the model's raw logits while the scores are the steered ones."""
    ids, mask = encode_prompts(tiny_tokenizer, PROMPTS[:2], PromptFormat())
    with torch.no_grad():
        raw = tiny_model(input_ids=ids, attention_mask=mask).logits[:, -1].float()
    with autosteer.attach(tiny_model, make_pack(tiny_model)) as h:
        out = h.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, force=True,
                         output_logits=True, output_scores=True, return_dict_in_generate=True)
        plain = h.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    g = out.generate_output
    assert torch.equal(g.sequences, out.sequences) and len(g.scores) == len(g.logits) == 2
    torch.testing.assert_close(g.logits[0].float(), raw)
    assert not torch.allclose(g.scores[0].float(), raw)
    assert isinstance(plain.generate_output, torch.Tensor) and torch.equal(plain.generate_output, plain.sequences)


def test_uncached_generation_from_a_one_token_prompt_is_one_generation(tiny_model, tiny_tokenizer):
    """use_cache=False re-runs the whole sequence each step; from a one-token prompt the second step was
    taken for a new prefill and the gate decided again on a generated token (found by review)."""
    bos = torch.tensor([[tiny_tokenizer.bos_token_id or 1]])
    with autosteer.attach(tiny_model, make_pack(tiny_model), mode="monitor", tau_monitor=1.0) as h:
        cached = h.generate(input_ids=bos, max_new_tokens=4, do_sample=False)
        uncached = h.generate(input_ids=bos, max_new_tokens=4, do_sample=False, use_cache=False)
        proc = h.logits_processor()
        with torch.no_grad():
            tiny_model.generate(input_ids=bos, max_new_tokens=4, do_sample=False, use_cache=False, logits_processor=[proc])
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(uncached.p_unsafe, cached.p_unsafe, equal_nan=True)
    assert proc.step == 4


def test_right_padding_under_a_static_cache(tiny_model, tiny_tokenizer):
    """A static cache hands the model a 4D mask, so the captured mask no longer says where each row's prompt
    ends; handle.generate falls back to the caller's 2D mask (found by review: right-padded rows were probed
    on a pad token)."""
    ids, mask = encode_prompts(tiny_tokenizer, ["how do i make a bomb", "bake cake please now"], PromptFormat())
    B, T = ids.shape
    right, rmask = torch.full_like(ids, tiny_tokenizer.pad_token_id), torch.zeros_like(mask)
    for b in range(B):  # the same prompts, right-padded
        n = int(mask[b].sum())
        right[b, :n], rmask[b, :n] = ids[b, T - n:], 1
    assert not rmask[:, -1].all()
    with autosteer.attach(tiny_model, make_pack(tiny_model)) as h:
        kw = dict(max_new_tokens=2, do_sample=False, force=False)
        want = h.generate(input_ids=ids, attention_mask=mask, **kw).p_unsafe
        got = h.generate(input_ids=right, attention_mask=rmask, cache_implementation="static", **kw).p_unsafe
    torch.testing.assert_close(got, want)
