"""Prompt formatting shared by fit and serving."""
from __future__ import annotations

import pytest

from conftest import make_tokenizer

from autosteer.prompting import PromptFormat, encode_one


def test_bare_prompts_get_the_tokenizers_special_tokens():
    """Without a chat template, prompts are tokenized as ``tokenizer(text)`` does: with BOS where
    the tokenizer adds one (fit and serving then agree with a user's plain tokenization)."""
    from tokenizers import processors

    tok = make_tokenizer()
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    bare = PromptFormat(chat_template=False)
    ids = encode_one(tok, "bake a cake", bare)
    assert ids == tok("bake a cake")["input_ids"] and ids[0] == bos
    templated = encode_one(tok, "bake a cake", PromptFormat())
    assert templated.count(bos) == 2  # the template's own two <s>, none added on top
    assert templated == tok(tok.apply_chat_template([{"role": "user", "content": "bake a cake"}], add_generation_prompt=True,
                                                    tokenize=False), add_special_tokens=False)["input_ids"]
    long = " ".join(["bake a cake"] * 40)
    with pytest.warns(UserWarning, match="truncated"):
        cut = encode_one(tok, long, PromptFormat(chat_template=False, max_prompt_tokens=20))
    assert len(cut) <= 20 and cut[0] == bos
