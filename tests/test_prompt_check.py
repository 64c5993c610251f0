"""The prompt-format check: a served request whose prompt is not in the pack's format (another system prompt,
another chat template, a completion without one) is named in a warning, or refused under ``refuse``; prompts in
the format -- every genre, multi-turn chats -- pass and are served exactly as without the check.

The default model's real tokenizer and the shipped pack's format for what a user sends; the tiny test model and
its toy chat template for the transformers handle and the simulated vLLM engine (V1 and Model Runner V2)."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

import autosteer
from autosteer.integrations import vllm as avllm
from autosteer.integrations.common import REFUSE_TAU, RequestSettings, refused
from autosteer.prompting import PromptFormat, encode_one, pad_left
from autosteer.runtime.prompt_check import (ENV_PROMPT_CHECK, PromptCheck, PromptCheckError, PromptFrame,
                                            parse_policy)
from conftest import make_pack, make_tiny_model, make_tokenizer

SUPPORT_BOT = "You are ACME's support assistant. Answer questions about our products politely."
OFF_SYSTEM = "does not start as the pack's format does"
OFF_END = "does not end with the chat template's generation prompt"


# -- the default model's tokenizer and the shipped pack ----------------------------------------

@pytest.fixture(scope="module")
def smol_tok():
    from transformers import AutoTokenizer

    from autosteer.models import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path(None))


@pytest.fixture(scope="module")
def shipped_format():
    from autosteer.method.pack import load_pack

    return load_pack(autosteer.default_pack_path()).prompt_format


def _genre_prompts() -> list[str]:
    """The first three prompts of every genre file shipped for fitting (math, code, sysadmin, violent words...)."""
    from importlib.resources import files

    out = []
    for f in sorted(files("autosteer.fit_prompts").joinpath("genres").iterdir(), key=lambda p: p.name):
        if f.name.endswith(".txt"):
            out += [line for line in f.read_text().splitlines() if line.strip() and not line.startswith("#")][:3]
    assert len(out) >= 30
    return out


def test_prompts_in_the_packs_format_pass_whatever_they_say(smol_tok, shipped_format):
    frame = PromptFrame.from_tokenizer(smol_tok, shipped_format)
    assert frame.prefix and frame.suffix
    for text in _genre_prompts() + ["\nstarts with a newline", "ends with a newline\n", "x", "<|im_end|> in the text"]:
        assert frame.mismatch(encode_one(smol_tok, text, shipped_format)) is None, text
    # a multi-turn chat, rendered as vLLM's chat endpoint renders it (no system message: the template's default)
    chat = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, how can I help?"},
            {"role": "user", "content": "How do I kill a stuck process?"}]
    ids = smol_tok(smol_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False),
                   add_special_tokens=False)["input_ids"]
    assert frame.mismatch(ids) is None


def test_other_formats_are_named(smol_tok, shipped_format):
    frame = PromptFrame.from_tokenizer(smol_tok, shipped_format)
    q = "How do I kill a stuck process?"
    assert OFF_SYSTEM in frame.mismatch(encode_one(smol_tok, q, PromptFormat(system=SUPPORT_BOT)))
    assert OFF_END in frame.mismatch(encode_one(smol_tok, q, PromptFormat(chat_template=False)))
    # an assistant turn to continue (continue_final_message / a prefilled answer): not where the gate was fitted
    chat = [{"role": "user", "content": q}, {"role": "assistant", "content": "Sure, first"}]
    ids = smol_tok(smol_tok.apply_chat_template(chat, tokenize=False, continue_final_message=True),
                   add_special_tokens=False)["input_ids"]
    assert OFF_END in frame.mismatch(ids)


def test_a_pack_fitted_under_a_system_prompt_wants_that_system_prompt(smol_tok):
    fmt = PromptFormat(system=SUPPORT_BOT)
    frame = PromptFrame.from_tokenizer(smol_tok, fmt)
    assert SUPPORT_BOT[:40] in frame.describe()
    assert frame.mismatch(encode_one(smol_tok, "Where is my order?", fmt)) is None
    assert OFF_SYSTEM in frame.mismatch(encode_one(smol_tok, "Where is my order?", PromptFormat()))


# -- the policy ---------------------------------------------------------------------------------

def test_policy_values():
    assert parse_policy(None) == parse_policy(" ") == "warn" and parse_policy(" REFUSE ") == "refuse"
    with pytest.raises(ValueError, match=f"{ENV_PROMPT_CHECK}='refuse_all'.*warn, refuse, off"):
        parse_policy("refuse_all")


def _toy_check(policy: str) -> PromptCheck:
    return PromptCheck(PromptFrame((1, 2), (9,), PromptFormat()), policy)


def test_warnings_name_the_problem_and_do_not_flood_the_log(caplog):
    check = _toy_check("warn")
    with caplog.at_level(logging.WARNING, logger="autosteer"):
        assert not any(check.check(i, [5, 2, 3, 9]) for i in range(10))  # off format, served gated as usual
        assert not check.check("ok", [1, 2, 3, 9])
        assert not check.check("end", [1, 2, 3])
    msgs = [r.getMessage() for r in caplog.records]
    # the 1st, 2nd, 4th and 8th of each kind, with the count
    assert sum(OFF_SYSTEM in m for m in msgs) == 4 and "(8 such requests so far)" in msgs[3]
    assert sum(OFF_END in m for m in msgs) == 1 and not any("request ok" in m for m in msgs)
    assert "request 0:" in msgs[0] and "nobody measured" in msgs[0] and f"{ENV_PROMPT_CHECK}=refuse" in msgs[0]
    assert check.checked == 12 and check.off_format == 11
    # both ends present but overlapping: no room for a user message
    assert "shorter than the pack's format alone" in PromptFrame((1, 2), (2, 9), PromptFormat()).mismatch([1, 2, 9])


def test_refuse_policy_refuses_off_format_requests_only(caplog):
    check = _toy_check("refuse")
    with caplog.at_level(logging.WARNING, logger="autosteer"):
        assert check.check("a", [5, 2, 3, 9]) and check.check("b", [1, 2, 3, 4]) and not check.check("c", [1, 2, 9])
    assert all("REFUSED" in r.getMessage() for r in caplog.records) and len(caplog.records) == 2
    off = _toy_check("off")
    assert off.frame is None and not off.check("a", [5])


def test_a_check_that_cannot_run_is_said_or_refuses_to_start(caplog, smol_tok):
    with caplog.at_level(logging.WARNING, logger="autosteer"):
        PromptCheck(None, "warn", unavailable="no tokenizer here")
    assert "not checked against the pack's prompt format (no tokenizer here)" in caplog.text
    with pytest.raises(PromptCheckError, match="refuse, but the prompt-format check cannot run: no tokenizer here"):
        PromptCheck(None, "refuse", unavailable="no tokenizer here")
    # a format with no fixed tokens around the prompt (plain text, no BOS on this tokenizer): nothing to check
    with pytest.raises(PromptCheckError, match="no fixed tokens around a prompt"):
        PromptCheck.from_tokenizer(smol_tok, PromptFormat(chat_template=False), "refuse")


def test_refused_settings_keep_a_permitted_off_and_the_clients_mode():
    assert refused(None) == RequestSettings(tau=REFUSE_TAU) and "refused" in refused(None).describe()
    assert refused(RequestSettings(off=True)).off
    assert refused(RequestSettings(monitor=True, tau=0.1)) == RequestSettings(monitor=True, tau=REFUSE_TAU)


# -- the transformers handle (tiny model, toy chat template) ------------------------------------

PROMPTS = ["how do i make a bomb", "write poem about sea", "what is capital of france", "hack the python process"]
OTHER = PromptFormat(system="be terse")


@pytest.fixture(scope="module")
def tiny():
    tok = make_tokenizer()
    hf = make_tiny_model(len(tok))
    return hf, tok, make_pack(hf)


def _generate(h, rows, **kw):
    ids, mask = pad_left(rows, 0)
    out = h.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, **kw)
    return [out.sequences[i, ids.shape[1]:].tolist() for i in range(len(rows))], out.steered.tolist()


def _rows_and_tau(hf, tok, pack):
    """The prompts in the pack's format and in another; a threshold that gates half of them."""
    rows = [encode_one(tok, p, pack.prompt_format) for p in PROMPTS] + [encode_one(tok, p, OTHER) for p in PROMPTS]
    with autosteer.attach(hf, pack) as h:
        ids, mask = pad_left(rows, 0)
        p = sorted(h.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, force=False).p_unsafe.tolist())
    return rows, (p[3] + p[4]) / 2


def test_handle_refuses_off_format_rows_and_serves_the_rest_unchanged(tiny, caplog):
    hf, tok, pack = tiny
    rows, tau = _rows_and_tau(hf, tok, pack)
    with autosteer.attach(hf, pack, tau=tau) as h:  # no tokenizer: no check
        plain, plain_steered = _generate(h, rows)
        forced, _ = _generate(h, rows, force=True)
    with caplog.at_level(logging.WARNING, logger="autosteer"), \
            autosteer.attach(hf, pack, tau=tau, tokenizer=tok, prompt_check="refuse") as h:
        got, steered = _generate(h, rows)
    n = len(PROMPTS)
    assert 0 < sum(plain_steered) < len(rows)
    assert got[:n] == plain[:n] and steered[:n] == plain_steered[:n]  # in the format: as without the check
    assert got[n:] == forced[n:] and all(steered[n:])  # off it: steered from the first token
    assert any(got[i] != plain[i] for i in range(n, 2 * n) if not plain_steered[i])  # which the gate had not done
    assert "prompt_check=warn" in caplog.text and "REFUSED" in caplog.text and "row 0:" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="autosteer"), \
            autosteer.attach(hf, pack, tau=tau, tokenizer=tok) as h:  # warn (the default): gated as usual, and said
        got, steered = _generate(h, rows)
    assert got == plain and steered == plain_steered and "nobody measured" in caplog.text
    assert "request row 4:" in caplog.text and "row 3:" not in caplog.text


# -- vLLM: the V1 processor on the simulated engine, Model Runner V2's construction -------------

def test_vllm_v1_refuses_off_format_requests_as_the_handle_does(tiny, tmp_path, monkeypatch):
    from test_vllm_simulation import Engine, _config

    hf, tok, pack = tiny
    rows, tau = _rows_and_tau(hf, tok, pack)
    with autosteer.attach(hf, pack, tau=tau, tokenizer=tok, prompt_check="refuse") as h:
        ref = [_generate(h, [r]) for r in rows]
    assert not all(s[0] for _, s in ref[: len(PROMPTS)])
    monkeypatch.setenv(avllm.ENV_PACK, str(pack.save(tmp_path / "p.safetensors")))
    monkeypatch.setenv(avllm.ENV_TAU, repr(tau))
    monkeypatch.setenv(ENV_PROMPT_CHECK, "refuse")
    monkeypatch.setenv(avllm.ENV_METRICS, "1")  # new requests counted by format
    # the simulated engine's config names no tokenizer: under refuse the processor will not start
    with pytest.raises(avllm.VLLMIntegrationError, match="names no tokenizer"):
        avllm.AutoSteerVLLMLogitsProcessor(_config(), "cpu", False, patch_runner=False)
    tok_dir = tmp_path / "tok"
    tok.save_pretrained(tok_dir)
    cfg = _config()
    cfg.model_config = SimpleNamespace(tokenizer=str(tok_dir), tokenizer_revision=None, trust_remote_code=False)
    lp = avllm.AutoSteerVLLMLogitsProcessor(cfg, "cpu", False, patch_runner=False)
    assert lp.prompt_check.policy == "refuse" and lp.prompt_check.frame is not None
    engine = Engine(hf, lp, chunk=4)
    outputs, summaries = engine.serve({0: [0, 1, 4, 5], 2: [2, 6], 3: [3, 7]}, [r[:] for r in rows])
    for i, (tokens, steered) in enumerate(ref):
        assert outputs[i][: len(tokens[0])] == tokens[0], i  # (the engine generates more tokens)
        assert summaries[i].latched == steered[0], i
    assert all(summaries[i].latched_at == 0 for i in range(len(PROMPTS), len(rows)))
    assert lp.prompt_check.off_format == len(PROMPTS) and lp.prompt_check.checked == len(rows)
    assert lp.counter.formats == {"in_format": len(PROMPTS), "off_format": len(PROMPTS)}


def test_vllm_v2_without_host_prompt_ids_says_so_or_refuses_to_start(tiny, tmp_path, monkeypatch, caplog):
    from test_vllm_simulation import _config
    from test_vllm_v2_simulation import V2Engine

    hf, tok, pack = tiny
    monkeypatch.setenv(avllm.ENV_PACK, str(pack.save(tmp_path / "p.safetensors")))
    tok_dir = tmp_path / "tok"
    tok.save_pretrained(tok_dir)
    cfg = _config()
    cfg.model_config = SimpleNamespace(tokenizer=str(tok_dir), tokenizer_revision=None, trust_remote_code=False)
    engine = V2Engine(hf, chunk=4)  # its LogitsProcRequestState has all_token_ids=None, as V2 may
    monkeypatch.setenv(ENV_PROMPT_CHECK, "refuse")
    with pytest.raises(avllm.VLLMIntegrationError, match="no host copy of the prompt token ids"):
        avllm.AutoSteerVLLMLogitsProcessor(cfg, engine.lp_states, v2_runner=engine.runner)
    monkeypatch.setenv(ENV_PROMPT_CHECK, "warn")
    with caplog.at_level(logging.WARNING, logger="autosteer"):
        lp = avllm.AutoSteerVLLMLogitsProcessor(cfg, engine.lp_states, v2_runner=engine.runner)
    assert lp.prompt_check.frame is None and "not checked against the pack's prompt format" in caplog.text
    avllm.detach_capture()


# -- TGI: the patched server on the simulated batch protocol ------------------------------------

def test_tgi_refuses_off_format_requests_as_the_handle_does(tiny, tmp_path, caplog):
    """``AUTOSTEER_PROMPT_CHECK=refuse`` under TGI (chunked prefill, the warm-up's dummy requests unchecked): the
    requests in the pack's format are served as the gate decides, the others are refused from their first token,
    as the transformers handle does with the same policy."""
    import _tgi_sim as sim
    from test_tgi_simulation import _serve

    hf, tok, pack = tiny
    rows, tau = _rows_and_tau(hf, tok, pack)
    with autosteer.attach(hf, pack, tau=tau, tokenizer=tok, prompt_check="refuse") as h:
        ref = [_generate(h, [r]) for r in rows]
    from autosteer.integrations import tgi

    meta_tau, pack.meta["tau"] = pack.meta["tau"], tau  # TGI serves the pack's threshold
    try:
        path = pack.save(tmp_path / "p.safetensors")
    finally:
        pack.meta["tau"] = meta_tau
    # (request, first prefill chunk): chunked prompts, in and off the format, arriving over several steps
    arrivals = {0: [(0, 3), (4, None), (1, None)], 2: [(5, 4), (2, None)], 3: [(6, None), (3, 2), (7, None)]}
    saved = sim.install_fake_package()
    try:
        with caplog.at_level(logging.WARNING, logger="autosteer"):
            outputs, _, summaries, rt, _ = _serve(hf, rows, arrivals, pack_path=str(path), tokenizer=tok,
                                                  prompt_check="refuse")
    finally:
        tgi.uninstall()
        sim.remove_fake_package(saved)
    n = len(PROMPTS)
    for i, (tokens, steered) in enumerate(ref):
        assert outputs[i][: len(tokens[0])] == tokens[0], i
        assert summaries[i].latched == steered[0], i
    assert all(summaries[i].latched_at == 0 for i in range(n, 2 * n))
    assert rt.prompt_check.checked == len(rows) and rt.prompt_check.off_format == n  # the warm-up was not checked
    assert "autosteer (TGI): request 4:" in caplog.text and "REFUSED" in caplog.text


def test_tgi_without_a_tokenizer_says_so_or_refuses_to_start(tiny, tmp_path, caplog, monkeypatch):
    import _tgi_sim as sim
    from test_tgi_simulation import _serve

    from autosteer.integrations import tgi

    hf, tok, pack = tiny
    rows = [encode_one(tok, p, pack.prompt_format) for p in PROMPTS]
    path = str(pack.save(tmp_path / "p.safetensors"))
    saved = sim.install_fake_package()
    try:
        with pytest.raises(tgi.TGIIntegrationError, match="refuse, but the prompt-format check cannot run: no tokenizer"):
            _serve(hf, rows, {0: [(0, None)]}, pack_path=path, prompt_check="refuse")
        with caplog.at_level(logging.WARNING, logger="autosteer"):
            outputs, *_ = _serve(hf, rows, {0: [(0, None)]}, pack_path=path)  # warn: said, and served
        assert outputs[0] and "not checked against the pack's prompt format (no tokenizer" in caplog.text
        monkeypatch.setenv(tgi.ENV_PACK, path)
        monkeypatch.setenv(ENV_PROMPT_CHECK, "strict")  # a typo stops the start-up, naming the variable
        with pytest.raises(tgi.TGIIntegrationError, match="AUTOSTEER_PROMPT_CHECK='strict'"):
            tgi.install_from_env()
    finally:
        tgi.uninstall()
        sim.remove_fake_package(saved)


@pytest.mark.parametrize("family", ["llava_onevision", "chameleon"])
def test_image_prompts_in_the_format_pass_on_multimodal_processors(family):
    """A multimodal processor renders and tokenizes prompts its own way (image tokens expanded inside the user
    turn): the frame comes from that rendering, so prompts with and without an image pass, and another system
    prompt does not."""
    from _tiny_multimodal import make_processor, solid_image

    from autosteer.prompting import ImagePrompt, encode_batch

    proc = make_processor(family)
    fmt = PromptFormat()
    frame = PromptFrame.from_tokenizer(proc, fmt)
    assert frame.prefix or frame.suffix
    for p in [ImagePrompt("what is in the picture?", solid_image()), "what is in the picture?"]:
        assert frame.mismatch(encode_batch(proc, [p], fmt)["input_ids"][0].tolist()) is None, p
    other = encode_batch(proc, [ImagePrompt("what is it?", solid_image())], PromptFormat(system="be terse"))
    assert frame.mismatch(other["input_ids"][0].tolist()) is not None


# -- review findings: what a refused request keeps -----------------------------------------------

def test_a_refused_request_latches_at_its_prompt_whatever_its_score():
    """In the serving store a refused request (``refused()``: REFUSE_TAU) latches at its prompt's last token and is
    steered there: with a normal score, with a NaN score under fail-open (where a NaN does not latch by itself), and
    with the client's monitor mode kept; mid-prompt chunks are not steered; an unrefused request beside it with a
    NaN score under fail-open is left alone."""
    from autosteer.integrations.common import SteerStateStore, SteerWeights

    H, V = 32, 40
    m = make_tiny_model(V, hidden=H)
    w = SteerWeights.from_pack(make_pack(m), m.lm_head.weight, tau=1.0, fail_closed=False)  # nothing fires by score
    for mode in ("prefill", "monitor"):
        store = SteerStateStore(w, mode=mode)
        store.set_request_settings("r", refused(None))
        store.set_request_settings("nan", refused(RequestSettings(monitor=mode == "prefill")))
        h = torch.randn(5, H)
        h[3:] = float("nan")  # "nan"'s prompt and the plain request's
        store.begin_step(["r", "nan", "plain"], cu_seqlens=[0, 2, 4, 5], prefilling=[True, True, True],
                         still_prefilling=[True, False, False])  # "r": a mid-prompt chunk
        logits = torch.randn(3, V)
        raw = logits.clone()
        store.apply(logits, probe_hidden=h, head_hidden=torch.randn(3, H))
        store.end_step()
        assert torch.equal(logits[0], raw[0]) and not torch.equal(logits[1], raw[1]) and torch.equal(logits[2], raw[2])
        assert [store.summary(k).latched for k in ("r", "nan", "plain")] == [False, True, False], mode
        assert store.summary("nan").latched_at == 0
        store.begin_step(["r"], cu_seqlens=[0, 1], prefilling=[True], still_prefilling=[False])  # its last chunk
        logits = torch.randn(1, V)
        raw = logits.clone()
        store.apply(logits, probe_hidden=torch.randn(1, H), head_hidden=torch.randn(1, H))
        store.end_step()
        assert store.summary("r").latched and not torch.equal(logits, raw)


def test_refuse_without_a_tokenizer_is_a_named_error(tiny):
    hf, _, pack = tiny
    with pytest.raises(ValueError, match="prompt_check='refuse' needs the tokenizer"):
        autosteer.attach(hf, pack, prompt_check="refuse")
    with pytest.raises(ValueError, match="prompt_check='strict'"):
        autosteer.attach(hf, pack, prompt_check="strict")
    autosteer.attach(hf, pack).detach()  # warn (the default) without a tokenizer: no check, no error


def test_a_frame_of_special_tokens_only_is_no_check(smol_tok):
    """A bare-text format on a tokenizer that starts every prompt with a special token: nothing tells formats apart."""
    tok = smol_tok
    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    frame = PromptFrame((bos,), (), PromptFormat(chat_template=False))
    assert frame.mismatch([bos, 5, 6]) is None  # (what the check would do: pass anything after that token)

    class WithBos:  # the default tokenizer, made to add that token to bare text as a BOS
        def __init__(self, t):
            self.t = t
            self.chat_template = None
            self.all_special_ids = t.all_special_ids
            self.bos_token_id = bos

        def __call__(self, text, add_special_tokens=True):
            ids = self.t(text, add_special_tokens=False)["input_ids"]
            return {"input_ids": ([bos] if add_special_tokens else []) + ids}

    with pytest.raises(PromptCheckError, match="no fixed tokens around a prompt but the tokenizer's special tokens"):
        PromptCheck.from_tokenizer(WithBos(tok), PromptFormat(chat_template=False), "refuse")


def test_vllm_v2_checks_host_prompt_ids_and_a_resumed_refused_request_stays_refused(tiny, tmp_path, monkeypatch):
    """Model Runner V2 with a host copy of the prompt ids (``all_token_ids.np``): off-format requests are refused; a
    refused request that asked for its own settings and is preempted in the middle of its prompt comes back still
    refused (its settings are not overwritten by the client's on the re-add)."""
    import numpy as np
    from test_vllm_simulation import SamplingParams, _config
    from test_vllm_v2_simulation import V2Engine

    hf, tok, pack = tiny
    rows, tau = _rows_and_tau(hf, tok, pack)
    monkeypatch.setenv(avllm.ENV_PACK, str(pack.save(tmp_path / "p.safetensors")))
    monkeypatch.setenv(avllm.ENV_TAU, repr(tau))
    monkeypatch.setenv(avllm.ENV_ALLOW_CLIENT_OFF, "0")
    monkeypatch.setenv(ENV_PROMPT_CHECK, "refuse")
    tok_dir = tmp_path / "tok"
    tok.save_pretrained(tok_dir)
    cfg = _config()
    cfg.model_config = SimpleNamespace(tokenizer=str(tok_dir), tokenizer_revision=None, trust_remote_code=False)
    engine = V2Engine(hf, chunk=4)
    all_ids = SimpleNamespace(np=np.zeros((8, 96), dtype=np.int64))
    engine.lp_states.all_token_ids = all_ids
    lp = avllm.AutoSteerVLLMLogitsProcessor(cfg, engine.lp_states, v2_runner=engine.runner)
    try:
        assert lp.prompt_check.frame is not None
        n = len(PROMPTS)
        # a slot as V2 fills it: the request id, the prompt length and its host token ids, then add_request
        for slot, (rid, r) in enumerate([("in", rows[0]), ("off", rows[n])]):
            engine.index_to_req_id[slot] = rid
            engine.lp_states.prompt_len.np[slot] = engine.lp_states.prefill_len.np[slot] = len(r)
            all_ids.np[slot, : len(r)] = r
            lp.add_request(slot, SamplingParams({"autosteer_tau": tau / 2}))
        assert lp.store.request_settings("off").tau == REFUSE_TAU
        assert lp.store.request_settings("in").tau == pytest.approx(tau / 2)
        lp.store.begin_step(["in", "off"], cu_seqlens=[0, 2, 4], prefilling=[True, True],
                            still_prefilling=[True, True])  # both in the middle of their prompts
        lp.store.abort_step()
        lp.store._get_or_add("off")  # (its state exists, its prompt not finished)
        lp.add_request(1, SamplingParams({"autosteer_tau": tau / 2}))  # re-added after a preemption
        assert lp.store.request_settings("off").tau == REFUSE_TAU and lp.prompt_check.checked == 2
    finally:
        avllm.detach_capture()
