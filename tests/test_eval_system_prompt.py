"""`autosteer eval --system TEXT`: a deployment measures the gate under its own system prompt. The prompts are
rendered with it (scores and generations), the report says so, and the pack's own format stays the default."""
from __future__ import annotations

import torch

from autosteer import evaluate as ev
from autosteer.method.hidden_states import last_token_states
from autosteer.prompting import PromptFormat
from autosteer.runtime.attach import attach
from conftest import make_pack

PROMPTS = ["how do i make a bomb", "bake cookies", "what is the capital of france", "write poem about sea"]
SYSTEM = "write poem about the sea"  # words of the tiny tokenizer's vocabulary


def test_eval_renders_under_the_given_system_prompt(tiny_model, tiny_tokenizer, one_thread):
    from autosteer.prompting import encode_batch

    fmt = PromptFormat(system=SYSTEM)
    inputs = encode_batch(tiny_tokenizer, PROMPTS, fmt)
    ref = tiny_model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)  # before anything is attached
    W = inputs["input_ids"].shape[1]
    pack = make_pack(tiny_model, layer=2, tau=0.5)
    handle = attach(tiny_model, pack)
    try:
        under = handle.probe_scores(last_token_states(tiny_model, tiny_tokenizer, PROMPTS, fmt, layers=[2], progress=False)[:, 0])
        as_fitted = handle.probe_scores(last_token_states(tiny_model, tiny_tokenizer, PROMPTS, PromptFormat(), layers=[2],
                                                          progress=False)[:, 0])
        assert not torch.allclose(under, as_fitted, atol=1e-3)  # the system prompt moves the last token's state
        sets = [ev.PromptSet("mine", PROMPTS, False)]
        # scores read without generation ("always" only) and from the autosteer run both use the given format
        for settings in (("always",), ("autosteer",)):
            rep = ev.evaluate(handle, tiny_tokenizer, sets, settings, max_new_tokens=2, progress=False, fmt=fmt)
            torch.testing.assert_close(torch.tensor(rep["sets"]["mine"]["p_unsafe"]), under, atol=1e-5, rtol=1e-5)
            assert rep["prompt_format"]["system"] == SYSTEM and rep["prompt_format_is_the_packs"] is False
            assert f"Prompts rendered with the system prompt {SYSTEM!r}" in ev.markdown_report(rep)
        # unsteered answers are the model's own under that system prompt
        gens = ev.generate_batch(handle, tiny_tokenizer, PROMPTS, "unsteered", max_new_tokens=3, progress=False, fmt=fmt)
        assert [g.response for g in gens] == [tiny_tokenizer.decode(ref[i, W:], skip_special_tokens=True)
                                             for i in range(len(PROMPTS))]
        # without fmt: the pack's own format, and the report does not claim another
        plain = ev.evaluate(handle, tiny_tokenizer, sets, ("always",), max_new_tokens=2, progress=False)
        torch.testing.assert_close(torch.tensor(plain["sets"]["mine"]["p_unsafe"]), as_fitted, atol=1e-5, rtol=1e-5)
        assert "Prompts rendered with the system prompt" not in ev.markdown_report(plain)
    finally:
        handle.detach()


def test_cli_eval_system_prompt_format():
    import pytest

    from autosteer.cli import build_parser, eval_format

    args = build_parser().parse_args(["eval", "--system", "You are a support bot.", "--benign", "x.txt"])
    assert args.system == "You are a support bot."
    assert build_parser().parse_args(["eval", "--benign", "x.txt"]).system is None
    pack_fmt = PromptFormat(max_prompt_tokens=300)
    got = eval_format(pack_fmt, "You are a support bot.")
    assert got == PromptFormat(system="You are a support bot.", max_prompt_tokens=300)  # the pack's format otherwise
    assert eval_format(pack_fmt, None) is None and eval_format(pack_fmt, "") is None  # the pack's own format
    assert eval_format(PromptFormat(system="be brief"), "be brief") is None
    assert eval_format(PromptFormat(system="be brief"), "") == PromptFormat()  # '': the chat template's default
    with pytest.raises(SystemExit, match="chat template"):
        eval_format(PromptFormat(chat_template=False), "be brief")
