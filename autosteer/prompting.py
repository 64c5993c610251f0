"""Prompt formatting shared by fit and serving.

The probe reads the hidden state of the *last prompt token*, so the prompt must be formatted
exactly the same way when fitting and when generating: the tokenizer's chat template with the
generation prompt appended. Both sides call :func:`encode_prompts`.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass

import torch

DEFAULT_MAX_PROMPT_TOKENS = 512


@dataclass(frozen=True)
class PromptFormat:
    """How prompts are turned into tokens; stored in the pack (with a hash of the chat template,
    which ``AutoSteerHandle.check_tokenizer`` compares with the serving tokenizer's)."""

    chat_template: bool = True
    system: str | None = None
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS

    def to_dict(self) -> dict:
        return {"chat_template": self.chat_template, "system": self.system, "max_prompt_tokens": self.max_prompt_tokens}

    @classmethod
    def from_dict(cls, d: dict) -> "PromptFormat":
        return cls(bool(d.get("chat_template", True)), d.get("system"), int(d.get("max_prompt_tokens", DEFAULT_MAX_PROMPT_TOKENS)))


def template_hash(tokenizer) -> str:
    tpl = getattr(tokenizer, "chat_template", None) or ""
    return hashlib.sha256(tpl.encode()).hexdigest()[:16]


def _render(tokenizer, content: str, fmt: PromptFormat) -> str:
    if fmt.chat_template and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": fmt.system}] if fmt.system else []) + [
            {"role": "user", "content": content}
        ]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return content


def render_chat(tokenizer, messages: list[dict], fmt: PromptFormat) -> str:
    """A multi-turn chat (list of ``{"role", "content"}``) with the generation prompt appended."""
    if fmt.system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": fmt.system}] + list(messages)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_one(tokenizer, content: str, fmt: PromptFormat) -> list[int]:
    """Token ids of one formatted prompt. Over-long user text is cut in the middle (keeping its
    start and its end, so the chat template's suffix and the request's last words survive)."""
    text = _render(tokenizer, content, fmt)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= fmt.max_prompt_tokens:
        return ids
    user_ids = tokenizer(content, add_special_tokens=False)["input_ids"]
    overhead = len(ids) - len(user_ids)
    keep = fmt.max_prompt_tokens - overhead
    if keep < 8:
        raise ValueError(f"max_prompt_tokens={fmt.max_prompt_tokens} leaves no room for the user text")
    head = keep // 2
    cut = tokenizer.decode(user_ids[:head]) + " ... " + tokenizer.decode(user_ids[len(user_ids) - (keep - head) + 2:])
    warnings.warn(f"prompts longer than max_prompt_tokens={fmt.max_prompt_tokens} are truncated (middle cut of the user text)",
                  stacklevel=2)
    ids = tokenizer(_render(tokenizer, cut, fmt), add_special_tokens=False)["input_ids"]
    return ids[-fmt.max_prompt_tokens:]


def pad_left(batch_ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``(input_ids, attention_mask)``."""
    width = max((len(x) for x in batch_ids), default=0)
    ids = torch.full((len(batch_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch_ids), width), dtype=torch.long)
    for i, row in enumerate(batch_ids):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids, mask


def encode_prompts(tokenizer, prompts: list[str], fmt: PromptFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Format, tokenize and left-pad a batch of user prompts."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pad_left([encode_one(tokenizer, p, fmt) for p in prompts], pad_id)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions as ``generate`` computes them for left-padded rows."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp_min(0)
