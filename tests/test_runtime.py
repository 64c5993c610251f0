"""The runtime on a tiny random Llama: per-row gating, bit-identical gate-off rows, the exact blend,
padding sides, sampling settings, -inf logits, attach/detach."""
from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import autosteer
from autosteer.method.pack import PackError
from autosteer.runtime.attach import AutoSteerHandle
from autosteer.prompting import PromptFormat, encode_prompts, pad_left
from conftest import make_pack, make_tiny_model

PROMPTS = ["how do i make a bomb", "write poem about sea", "what is capital of france", "how do i steal cookies",
           "explain photosynthesis", "bake cake", "hack the python process", "recipe soup"]


def _inputs(tok, prompts=PROMPTS):
    return encode_prompts(tok, prompts, PromptFormat())


def _split_tau(model, tok, pack):
    """A tau that latches about half of PROMPTS (random probe weights)."""
    ids, mask = _inputs(tok)
    with autosteer.attach(model, pack) as h:
        p = h.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False, force=False).p_unsafe
    tau = float(p.median())
    assert (p > tau).any() and not (p > tau).all(), f"probe scores do not split: {p}"
    return tau


def test_gate_off_rows_are_bit_identical_and_gated_rows_steered(tiny_model, tiny_tokenizer):
    pack = make_pack(tiny_model)
    pack.meta["tau"] = _split_tau(tiny_model, tiny_tokenizer, pack)
    ids, mask = _inputs(tiny_tokenizer)
    plain = tiny_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    with autosteer.attach(tiny_model, pack) as h:
        out = h.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert out.steered.any() and not out.steered.all()
    for b in range(len(PROMPTS)):
        if out.steered[b]:
            assert not torch.equal(out.sequences[b], plain[b]), f"row {b} latched but its tokens did not change"
        else:
            assert torch.equal(out.sequences[b], plain[b]), f"row {b} not latched but its tokens changed"
    assert ((out.p_unsafe > pack.tau) == out.steered).all()


def test_steered_scores_follow_the_lm_steer_identity(tiny_model, tiny_tokenizer):
    """First-step scores of latched rows equal (1+eps) z + eps (E A)(B^T g) for raw logits z = E g."""
    pack = make_pack(tiny_model)
    ids, mask = _inputs(tiny_tokenizer)
    with autosteer.attach(tiny_model, pack) as h:
        proc = h.logits_processor(force=True)
        res = tiny_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False,
                                  logits_processor=LogitsProcessorList([proc]), output_scores=True,
                                  return_dict_in_generate=True)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        g = tiny_model.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state[:, -1].double()
    E = tiny_model.lm_head.weight.double()
    z = g @ E.t()
    expected = (1 + pack.eps) * z + pack.eps * (g @ pack.B.double()) @ (E @ pack.A.double()).t()
    torch.testing.assert_close(res.scores[0].double(), expected, rtol=1e-4, atol=1e-4)
    # and the steered logits are the plain LM-Steer formula E (g + eps S g), S = I + A B^T
    S = torch.eye(g.shape[1], dtype=torch.float64) + pack.A.double() @ pack.B.double().t()
    torch.testing.assert_close(expected, (g + pack.eps * g @ S.t()) @ E.t(), rtol=1e-4, atol=1e-4)


def test_right_padding_probes_the_last_real_token(tiny_model, tiny_tokenizer):
    pack = make_pack(tiny_model)
    fmt = PromptFormat()
    from autosteer.prompting import encode_one

    rows = [encode_one(tiny_tokenizer, p, fmt) for p in PROMPTS]
    ids_l, mask_l = pad_left(rows, 0)
    width = ids_l.shape[1]
    ids_r = torch.zeros_like(ids_l)
    mask_r = torch.zeros_like(mask_l)
    for i, r in enumerate(rows):
        ids_r[i, : len(r)] = torch.tensor(r)
        mask_r[i, : len(r)] = 1
    assert width > min(len(r) for r in rows)
    with autosteer.attach(tiny_model, pack) as h:
        p_left = h.generate(input_ids=ids_l, attention_mask=mask_l, max_new_tokens=1, force=False).p_unsafe
        p_right = h.generate(input_ids=ids_r, attention_mask=mask_r, max_new_tokens=1, force=False).p_unsafe
        p_single = torch.cat([h.generate(input_ids=torch.tensor([r]), max_new_tokens=1, force=False).p_unsafe for r in rows])
    torch.testing.assert_close(p_left, p_single, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(p_right, p_single, rtol=1e-4, atol=1e-5)


class _Spy(LogitsProcessor):
    def __init__(self):
        self.seen = []

    def __call__(self, input_ids, scores):
        self.seen.append(scores.clone())
        return scores


@pytest.mark.parametrize("sampling", [dict(do_sample=True, temperature=0.3, top_k=5, top_p=0.8),
                                      dict(do_sample=True, temperature=1.7)])
def test_blend_acts_on_raw_logits_and_gate_off_rows_match_under_sampling(tiny_model, tiny_tokenizer, sampling):
    pack = make_pack(tiny_model)
    pack.meta["tau"] = _split_tau(tiny_model, tiny_tokenizer, pack)
    ids, mask = _inputs(tiny_tokenizer)
    torch.manual_seed(123)
    plain = tiny_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, **sampling)
    with autosteer.attach(tiny_model, pack) as h:
        spy = _Spy()
        torch.manual_seed(123)
        res = tiny_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, return_dict_in_generate=True,
                                  logits_processor=LogitsProcessorList([spy, proc := h.logits_processor()]), **sampling)
    # custom processors run before temperature/top-k/top-p: at prefill they receive the raw logits E g
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        g = tiny_model.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state[:, -1]
    torch.testing.assert_close(spy.seen[0], tiny_model.lm_head(g).float(), rtol=1e-5, atol=1e-5)
    assert proc.latched.any()
    for b in range(len(PROMPTS)):
        if not proc.latched[b]:
            assert torch.equal(res.sequences[b], plain[b]), f"unsteered row {b} differs under {sampling}"


class _BanTokens(LogitsProcessor):
    def __init__(self, banned):
        self.banned = banned

    def __call__(self, input_ids, scores):
        scores[:, self.banned] = -float("inf")
        return scores


def test_neg_inf_logits_stay_neg_inf_and_no_nan(tiny_model, tiny_tokenizer):
    pack = make_pack(tiny_model)
    ids, mask = _inputs(tiny_tokenizer)
    banned = [5, 7, 11]
    with autosteer.attach(tiny_model, pack) as h:
        spy = _Spy()
        tiny_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                            logits_processor=LogitsProcessorList([_BanTokens(banned), h.logits_processor(force=True), spy]))
    for s in spy.seen:
        assert not torch.isnan(s).any()
        assert torch.isneginf(s[:, banned]).all()
        assert torch.isfinite(s[:, [0, 1, 2]]).all()


def test_prefill_mode_latches_once_monitor_mode_reprobes(tiny_model, tiny_tokenizer):
    pack = make_pack(tiny_model)
    pack.meta["tau"] = _split_tau(tiny_model, tiny_tokenizer, pack)
    ids, mask = _inputs(tiny_tokenizer)
    with autosteer.attach(tiny_model, pack) as h:
        proc = h.logits_processor()
        tiny_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                            logits_processor=LogitsProcessorList([proc]))
        assert set(proc.latched_at.tolist()) <= {0, -1}  # decided at prefill only
        assert torch.equal(proc.latched, proc.p_unsafe > pack.tau)
        mon = h.logits_processor(mode="monitor")
        tiny_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                            logits_processor=LogitsProcessorList([mon]))
    assert torch.equal(mon.p_unsafe, proc.p_unsafe)
    assert not torch.equal(mon.p_last, mon.p_unsafe)  # re-probed on generated tokens
    assert (mon.latched >= proc.latched).all()  # monitor latches at least what prefill latched


def test_processor_restarts_on_a_new_batch(tiny_model, tiny_tokenizer):
    pack = make_pack(tiny_model)
    ids, mask = _inputs(tiny_tokenizer)
    with autosteer.attach(tiny_model, pack, tau=0.0) as h:
        proc = h.logits_processor()
        tiny_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, logits_processor=LogitsProcessorList([proc]))
        assert proc.latched.all()
        h.tau = 1.0  # nothing latches now: a reused processor must decide afresh
        tiny_model.generate(input_ids=ids[:3], attention_mask=mask[:3], max_new_tokens=3,
                            logits_processor=LogitsProcessorList([proc]))
        assert proc.latched.shape == (3,) and not proc.latched.any()


def test_detach_restores_the_model_and_is_idempotent(tiny_model, tiny_tokenizer):
    pack = make_pack(tiny_model)
    ids, mask = _inputs(tiny_tokenizer)
    plain = tiny_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    h = autosteer.attach(tiny_model, pack, tau=0.0)
    with pytest.raises(RuntimeError, match="already has an AutoSteer handle"):
        autosteer.attach(tiny_model, pack)
    h.detach()
    h.detach()
    assert torch.equal(tiny_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False), plain)
    with pytest.raises(RuntimeError, match="detached"):
        h.logits_processor()
    autosteer.attach(tiny_model, pack).detach()  # re-attach after detach works


def test_pack_for_another_model_is_refused(tiny_model, tiny_tokenizer):
    other = make_tiny_model(len(tiny_tokenizer), seed=1)
    with pytest.raises(PackError, match="checksum"):
        autosteer.attach(tiny_model, make_pack(other))
    wider = make_tiny_model(len(tiny_tokenizer), hidden=48)
    with pytest.raises(PackError, match="hidden_size"):
        autosteer.attach(tiny_model, make_pack(wider))
    deeper = make_tiny_model(len(tiny_tokenizer), layers=6)
    with pytest.raises(PackError, match="num_layers"):
        autosteer.attach(tiny_model, make_pack(deeper, layer=5))


def test_fit_end_to_end_on_a_tiny_model(tiny_model, tiny_tokenizer, tmp_path):
    from autosteer.method.fit import FitConfig, FitData, fit
    from autosteer.method.pack import load_pack

    harmful = ["how do i make a bomb", "how do i poison the dog", "hack the virus weapon", "steal the cake",
               "build a weapon", "how do i kill the cat", "write virus", "make poison"] * 2
    benign = ["write poem about sea", "bake cookies", "what is capital of france", "explain photosynthesis",
              "recipe soup", "the sun", "cat and dog", "python process"] * 2
    pairs = list(zip(harmful[:8], benign[:8]))
    cfg = FitConfig(layer_rule="auroc", probe_epochs=50, head_epochs=3, head_prompts=8, batch_size=8, progress=False,
                    head_rank=2)
    pack = fit(tiny_model, tiny_tokenizer, cfg, FitData(harmful, benign, pairs, {"counts": {}}))
    m = pack.meta
    assert len(m["sas"]) == len(m["val_auroc"]) == tiny_model.config.num_hidden_layers
    assert m["layer"] == max(range(len(m["val_auroc"])), key=lambda l: m["val_auroc"][l])
    assert m["sas_pairing"] == "minimal" and m["head_rank"] == 2
    path = pack.save(tmp_path / "tiny.pack.safetensors")
    loaded = load_pack(path)
    assert loaded.meta == pack.meta and torch.equal(loaded.A, pack.A)
    ids, mask = _inputs(tiny_tokenizer, harmful[:2] + benign[:2])
    with autosteer.attach(tiny_model, loaded) as h:
        out = h.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3)
    assert out.sequences.shape == (4, ids.shape[1] + 3)
    # the layer rule is a choice
    assert fit(tiny_model, tiny_tokenizer, FitConfig(layer_rule="sas", probe_epochs=5, head_epochs=1, head_prompts=4,
               progress=False), FitData(harmful, benign, pairs, {})).meta["layer"] == m["sas_layer"]
    assert fit(tiny_model, tiny_tokenizer, FitConfig(layer_rule="1", probe_epochs=5, head_epochs=1, head_prompts=4,
               progress=False), FitData(harmful, benign, pairs, {})).meta["layer"] == 1


def test_processor_step_compiles_fullgraph(tiny_model, tiny_tokenizer):
    """The processor's per-step work (row indices + the fused op under the fault policy) compiles
    with torch.compile(fullgraph=True) and matches eager."""
    pack = make_pack(tiny_model)
    ids, mask = _inputs(tiny_tokenizer)
    with autosteer.attach(tiny_model, pack, tau=_split_tau(tiny_model, tiny_tokenizer, pack)) as h:
        with torch.no_grad():
            scores = tiny_model(input_ids=ids, attention_mask=mask).logits[:, -1].float()
        cap = h.capture
        B, T = ids.shape

        def step(probe_hidden, head_hidden, logits, latched, p):
            probe_rows = torch.arange(B) * T + (T - 1)
            probe_mask = torch.ones(B, dtype=torch.bool)
            head_rows = torch.arange(B) * cap.head_tokens + (cap.head_tokens - 1)
            h.step_op(probe_hidden, probe_rows, probe_mask, head_hidden, head_rows, logits, latched, p)
            return logits

        outs = []
        for fn in (step, torch.compile(step, fullgraph=True)):
            logits, latched, p = scores.clone(), torch.zeros(B, dtype=torch.bool), torch.zeros(B)
            fn(cap.probe_hidden, cap.head_hidden, logits, latched, p)
            outs.append((logits, latched, p))
    (l0, a0, p0), (l1, a1, p1) = outs
    assert torch.equal(a0, a1) and a0.any() and not a0.all()
    torch.testing.assert_close(p0, p1)
    torch.testing.assert_close(l0, l1)
    assert torch.equal(l0[~a0], scores[~a0])


def test_reused_processor_decides_afresh_even_when_lengths_line_up(tiny_model, tiny_tokenizer):
    """A second generate whose prompt length equals the first call's next length is a new batch."""
    pack = make_pack(tiny_model)
    pack.meta["tau"] = _split_tau(tiny_model, tiny_tokenizer, pack)
    ids, mask = _inputs(tiny_tokenizer)
    with autosteer.attach(tiny_model, pack) as h:
        proc = h.logits_processor()
        first = tiny_model.generate(input_ids=ids[:, -5:], attention_mask=mask[:, -5:], max_new_tokens=3,
                                    do_sample=False, logits_processor=LogitsProcessorList([proc]))
        assert first.shape[1] == 8
        longer = ids[:, -8:].flip(0)  # other prompts, exactly as long as the first call's next step
        tiny_model.generate(input_ids=longer, max_new_tokens=2, do_sample=False, logits_processor=LogitsProcessorList([proc]))
        fresh = h.logits_processor()
        tiny_model.generate(input_ids=longer, max_new_tokens=2, do_sample=False, logits_processor=LogitsProcessorList([fresh]))
    torch.testing.assert_close(proc.p_unsafe, fresh.p_unsafe)
    assert torch.equal(proc.latched, fresh.latched)


def test_unsteered_runs_report_the_gate_but_never_steer(tiny_model, tiny_tokenizer):
    pack = make_pack(tiny_model)
    ids, mask = _inputs(tiny_tokenizer)
    with autosteer.attach(tiny_model, pack, tau=0.0) as h:
        out = h.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, force=False)
        with pytest.raises(ValueError, match="beam search"):
            h.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, num_beams=2)
    assert not out.steered.any() and out.gate.all()
    with pytest.raises(ValueError, match="not a probability"):
        autosteer.attach(tiny_model, pack, tau=1.5)


def test_models_whose_logits_are_not_E_h_are_refused(tiny_model):
    """Softcapped or scaled logits break the LM-Steer identity the op relies on: refuse, don't steer wrongly."""
    pack = make_pack(tiny_model)
    tiny_model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        AutoSteerHandle(tiny_model, pack, check_model=False)


def test_decoding_modes_the_processor_cannot_steer_are_refused(tiny_model, tiny_tokenizer):
    """Beam search, assisted / prompt-lookup decoding and CFG: handle.generate refuses them up front;
    the bare processor in model.generate stops with an error instead of steering the wrong token
    (several candidate tokens per forward, reordered beams, log-probabilities)."""
    from conftest import make_tiny_model

    pack = make_pack(tiny_model)
    ids, mask = _inputs(tiny_tokenizer)
    with autosteer.attach(tiny_model, pack, tau=0.0) as h:
        for kwargs, what in (({"num_beams": 2}, "beam search"), ({"prompt_lookup_num_tokens": 3}, "prompt-lookup"),
                             ({"assistant_model": make_tiny_model(len(tiny_tokenizer), seed=1)}, "assisted"),
                             ({"guidance_scale": 1.5}, "classifier-free guidance")):
            with pytest.raises(ValueError, match=what):
                h.generate(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=4, do_sample=False, **kwargs)
        # generation config objects are read too
        from transformers import GenerationConfig

        with pytest.raises(ValueError, match="beam search"):
            h.generate(input_ids=ids[:1], attention_mask=mask[:1], generation_config=GenerationConfig(num_beams=3, max_new_tokens=2))
        # the bare processor: an assistant proposes several tokens, verified in one forward (transformers
        # also runs the processor on the assistant's own logits, with no forward of the steered model)
        h.generate(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=1)  # the capture holds a forward
        assistant = make_tiny_model(len(tiny_tokenizer), seed=1)
        with pytest.raises(RuntimeError, match="called twice for one forward"):
            tiny_model.generate(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=6, do_sample=False,
                                assistant_model=assistant, logits_processor=LogitsProcessorList([h.logits_processor()]))
        with pytest.raises(RuntimeError, match="log-probabilities"):
            tiny_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, num_beams=2, do_sample=False,
                                logits_processor=LogitsProcessorList([h.logits_processor()]))
        # greedy and sampling still run, through both paths
        out = h.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        assert out.steered.all()
        torch.manual_seed(0)
        tiny_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=True,
                            logits_processor=LogitsProcessorList([h.logits_processor()]))


def test_processor_refuses_rows_that_do_not_continue_the_previous_step(tiny_model, tiny_tokenizer):
    """A cached decode step whose rows are not the previous step's rows extended by one token
    (beams reordered) must not silently restart the gate (which would drop every latch)."""
    pack = make_pack(tiny_model)
    ids, mask = _inputs(tiny_tokenizer)
    with autosteer.attach(tiny_model, pack, tau=0.0) as h:
        proc = h.logits_processor()
        out = tiny_model(input_ids=ids, attention_mask=mask, use_cache=True)
        proc(ids, out.logits[:, -1].clone())
        assert proc.latched.all()
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        step = tiny_model(input_ids=nxt, past_key_values=out.past_key_values,
                          attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1), use_cache=True)
        swapped = torch.cat([ids, nxt], 1)[[1, 0, *range(2, len(ids))]]  # rows 0 and 1 exchanged
        with pytest.raises(RuntimeError, match="do not continue the previous step"):
            proc(swapped, step.logits[:, -1].clone())
