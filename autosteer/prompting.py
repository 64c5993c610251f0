"""Prompt formatting shared by fit and serving.

The probe reads the hidden state of the *last prompt token*, so the prompt must be formatted
exactly the same way when fitting and when generating: the tokenizer's chat template with the
generation prompt appended. Both sides call :func:`encode_batch` (text-only models:
:func:`encode_prompts`).

A prompt is a ``str`` or an :class:`ImagePrompt` (text plus an optional image). Multimodal
models take a *processor* wherever a ``tokenizer`` is asked for; the processor expands each
image into image tokens, so the probed "last prompt token" is the last token after expansion.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch

DEFAULT_MAX_PROMPT_TOKENS = 512


@dataclass(frozen=True)
class PromptFormat:
    """How prompts are turned into tokens; stored in the pack (with a hash of the chat template,
    which ``AutoSteerHandle.check_tokenizer`` compares with the serving tokenizer's)."""

    chat_template: bool = True
    system: str | None = None
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS
    # prompts rendered without a chat template get the tokenizer's special tokens (BOS), as
    # ``tokenizer(text)`` adds them; packs written before this field existed did not (False)
    bare_special_tokens: bool = True

    def to_dict(self) -> dict:
        return {"chat_template": self.chat_template, "system": self.system, "max_prompt_tokens": self.max_prompt_tokens,
                "bare_special_tokens": self.bare_special_tokens}

    @classmethod
    def from_dict(cls, d: dict) -> "PromptFormat":
        return cls(bool(d.get("chat_template", True)), d.get("system"), int(d.get("max_prompt_tokens", DEFAULT_MAX_PROMPT_TOKENS)),
                   bool(d.get("bare_special_tokens", False)))


class ImageLoadError(ValueError):
    """An image of a prompt could not be read; the message names the file."""


class PromptInputError(ValueError):
    """A prompt cannot go to this model (an image for a text-only model); the message says which."""


@dataclass(frozen=True, eq=False)
class ImagePrompt:
    """A user prompt with an optional image: a file path or an in-memory ``PIL.Image``, and optionally a
    system prompt of its own (``system``: rendered with it instead of the format's; fit rows copied under
    other system prompts, ``FitConfig.system_copies``).

    Two prompts are equal when their texts and system prompts are and their images are the same path (or
    the same image object), so prompt lists can be de-duplicated like strings.
    """

    text: str
    image: object = None  # str | os.PathLike | PIL.Image.Image | None
    source: str | None = None  # generated prompts: the request they were made from (not compared)
    system: str | None = None  # this prompt's own system prompt (None: the format's)

    def _key(self):
        img = self.image
        return (self.text, None if img is None else (str(img) if isinstance(img, (str, os.PathLike)) else id(img)),
                self.system)

    def __eq__(self, other):
        return isinstance(other, ImagePrompt) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __str__(self):
        return self.text if self.image is None else f"[image: {self.describe_image()}] {self.text}"

    def describe_image(self) -> str:
        img = self.image
        if img is None:
            return ""
        if isinstance(img, (str, os.PathLike)):
            return str(img)
        return getattr(img, "autosteer_name", None) or f"<{type(img).__name__} {getattr(img, 'size', '')}>"


PromptLike = Union[str, ImagePrompt]


def prompt_text(p: PromptLike) -> str:
    return p.text if isinstance(p, ImagePrompt) else p


def prompt_image(p: PromptLike):
    return p.image if isinstance(p, ImagePrompt) else None


def format_for(p: PromptLike, fmt: PromptFormat) -> PromptFormat:
    """The format ``p`` is rendered in: ``fmt``, with ``p``'s own system prompt where it has one."""
    system = p.system if isinstance(p, ImagePrompt) else None
    if system is None or system == fmt.system:
        return fmt
    from dataclasses import replace

    return replace(fmt, system=system)


def batching_key(p: PromptLike) -> tuple[bool, int]:
    """Sort key that batches prompts with images apart from text-only ones (an image expands to
    hundreds or thousands of tokens), then by text length: less padding."""
    return prompt_image(p) is not None, len(prompt_text(p))


def load_image(image):
    """An RGB ``PIL.Image`` from a path or an image object; :class:`ImageLoadError` names a bad file."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    path = Path(image)
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise ImageLoadError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageLoadError(f"cannot read image {path}: {exc}") from None


def text_tokenizer(tokenizer):
    """The text tokenizer of a tokenizer or of a multimodal processor (which wraps one)."""
    return getattr(tokenizer, "tokenizer", tokenizer)


def is_processor(tokenizer) -> bool:
    return hasattr(tokenizer, "tokenizer") and hasattr(tokenizer, "image_processor")


def template_hash(tokenizer) -> str:
    tpl = getattr(tokenizer, "chat_template", None) or getattr(text_tokenizer(tokenizer), "chat_template", None) or ""
    if not isinstance(tpl, str):  # some processors keep several named templates
        tpl = repr(sorted(tpl.items())) if isinstance(tpl, dict) else repr(tpl)
    return hashlib.sha256(tpl.encode()).hexdigest()[:16]


def _render(tokenizer, content: str, fmt: PromptFormat) -> str:
    if fmt.chat_template and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": fmt.system}] if fmt.system else []) + [
            {"role": "user", "content": content}
        ]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if fmt.system:
        raise ValueError("a system prompt needs a chat template to go in: this tokenizer has none "
                         "(or the format disables it), so the system prompt would be dropped")
    return content


def render_chat(tokenizer, messages: list[dict], fmt: PromptFormat) -> str:
    """A multi-turn chat (list of ``{"role", "content"}``) with the generation prompt appended."""
    if fmt.system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": fmt.system}] + list(messages)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_one(tokenizer, content: PromptLike, fmt: PromptFormat) -> list[int]:
    """Token ids of one formatted prompt (a text, or a prompt without an image that may carry its own
    system prompt). Over-long user text is cut in the middle (keeping its start and its end, so the chat
    template's suffix and the request's last words survive)."""
    if isinstance(content, ImagePrompt):
        if content.image is not None:
            raise PromptInputError("encode_one takes text prompts: a prompt with an image needs encode_batch and a "
                                   "multimodal processor")
        content, fmt = content.text, format_for(content, fmt)
    tokenizer = text_tokenizer(tokenizer)
    # a chat template writes its own special tokens (BOS included); bare text gets the
    # tokenizer's, exactly as ``tokenizer(text)`` would add them
    specials = fmt.bare_special_tokens and not (fmt.chat_template and getattr(tokenizer, "chat_template", None))
    text = _render(tokenizer, content, fmt)
    ids = tokenizer(text, add_special_tokens=specials)["input_ids"]
    if len(ids) <= fmt.max_prompt_tokens:
        return ids
    cut = tokenizer(_render(tokenizer, _cut_user_text(tokenizer, content, fmt, len(ids)), fmt),
                    add_special_tokens=specials)["input_ids"]
    if len(cut) > fmt.max_prompt_tokens:
        head = 1 if specials and cut[:1] == ids[:1] and ids[0] == tokenizer.bos_token_id else 0
        cut = cut[:head] + cut[len(cut) - (fmt.max_prompt_tokens - head):]
    return cut


def _cut_user_text(tokenizer, content: str, fmt: PromptFormat, rendered_len: int) -> str:
    """``content`` cut in the middle so that its rendered prompt fits ``fmt.max_prompt_tokens``."""
    user_ids = tokenizer(content, add_special_tokens=False)["input_ids"]
    overhead = rendered_len - len(user_ids)
    keep = fmt.max_prompt_tokens - overhead
    if keep < 8:
        raise ValueError(f"max_prompt_tokens={fmt.max_prompt_tokens} leaves no room for the user text")
    head = keep // 2
    cut = tokenizer.decode(user_ids[:head]) + " ... " + tokenizer.decode(user_ids[len(user_ids) - (keep - head) + 2:])
    warnings.warn(f"prompts longer than max_prompt_tokens={fmt.max_prompt_tokens} are truncated (middle cut of the user text)",
                  stacklevel=3)
    return cut


def common_prefix_len(a, b) -> int:
    """How many leading tokens two token-id sequences share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


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


def encode_prompts(tokenizer, prompts: list[PromptLike], fmt: PromptFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Format, tokenize and left-pad a batch of text prompts."""
    tokenizer = text_tokenizer(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pad_left([encode_one(tokenizer, p, fmt) for p in prompts], pad_id)


def placeholder_tokens(processor) -> list[str]:
    """The processor's placeholder tokens (image, video, image start/end): text that the processor
    would expand or the model would read as image positions."""
    names = ("image_token", "video_token", "audio_token", "image_start_token", "image_end_token", "boi_token", "eoi_token")
    found = {getattr(processor, n, None) for n in names}
    return sorted(t for t in found if isinstance(t, str) and len(t) > 1)


def render_multimodal(processor, prompt: PromptLike, fmt: PromptFormat) -> tuple[str, bool]:
    """The text a multimodal processor gets for one prompt (an image placeholder where the prompt
    has an image), and whether a chat template was applied (it then carries the special tokens).

    The processor's own chat template is used when it has one (structured content, as the
    family's model card shows); else the tokenizer's template with the placeholder before the
    text; else the bare text. Placeholder tokens typed in the user text (``<image>``, ...) are
    broken up (``< image>``), so only real images become image tokens.
    """
    tok = text_tokenizer(processor)
    text, has_image = prompt_text(prompt), prompt_image(prompt) is not None
    fmt = format_for(prompt, fmt)
    for token in placeholder_tokens(processor):  # user text must not smuggle in image/video placeholders
        text = text.replace(token, token[0] + " " + token[1:])
    # the text part alone, at an unlimited length (the system prompt is left out of this estimate)
    rendered_len = len(encode_one(tok, text, PromptFormat(fmt.chat_template, None, 1 << 30, fmt.bare_special_tokens)))
    if rendered_len > fmt.max_prompt_tokens:  # the text part alone is cut as for text models
        text = _cut_user_text(tok, text, fmt, rendered_len)
    image_token = getattr(processor, "image_token", None) or "<image>"
    if fmt.chat_template and getattr(processor, "chat_template", None):
        content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": text}]
        messages = ([{"role": "system", "content": [{"type": "text", "text": fmt.system}]}] if fmt.system else []) + [
            {"role": "user", "content": content}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), True
    content = f"{image_token}\n{text}" if has_image else text
    if fmt.chat_template and getattr(tok, "chat_template", None):
        return _render(tok, content, fmt), True
    return content, False


def encode_batch(tokenizer, prompts: list[PromptLike], fmt: PromptFormat) -> dict[str, torch.Tensor]:
    """Model inputs for a batch of prompts, left padded: ``input_ids`` and ``attention_mask``, plus
    the image tensors the family's processor makes (``pixel_values``, ...) when ``tokenizer`` is a
    multimodal processor. Text-only tokenizers refuse prompts with images."""
    if not is_processor(tokenizer):
        if any(prompt_image(p) is not None for p in prompts):
            bad = next(i for i, p in enumerate(prompts) if prompt_image(p) is not None)
            raise PromptInputError(f"prompt {bad} of the batch ({prompt_text(prompts[bad])[:60]!r}) has an image, but "
                                   "this model takes text only (its tokenizer is not a multimodal processor)")
        ids, mask = encode_prompts(tokenizer, prompts, fmt)
        return {"input_ids": ids, "attention_mask": mask}
    rendered = [render_multimodal(tokenizer, p, fmt) for p in prompts]
    images = [load_image(prompt_image(p)) for p in prompts if prompt_image(p) is not None]
    templated = {t for _, t in rendered}
    kwargs = {"add_special_tokens": False} if templated == {True} else {}
    tok = text_tokenizer(tokenizer)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    out = tokenizer(text=[r for r, _ in rendered], images=images or None, padding=True, return_tensors="pt", **kwargs)
    return dict(out)


def append_response_prefix(inputs: dict, tokenizer, fmt: PromptFormat, prefix: str) -> dict:
    """Left-padded model inputs with the assistant turn begun by ``prefix`` in every row: the
    tokens of ``prefix`` appended after the prompt (after the chat template's generation prompt;
    without a chat template, on a new line after the prompt). An empty prefix returns ``inputs``.

    This is how a *prefilling attack* is served -- the caller writes the start of the answer -- and
    how a fit shows the model complying (``FitConfig.monitor_prefix``). The prefix tokens are prompt:
    the gate reads the last of them. Rows end together (left padding), so appending keeps them
    aligned. Other per-token integer tensors a processor makes (token type ids and the like) are
    extended with zeros, as the appended tokens are text; image tensors are left as they are."""
    if not isinstance(prefix, str):
        raise TypeError(f"response prefix must be a string, got {type(prefix).__name__}")
    if not prefix:
        return inputs
    tok = text_tokenizer(tokenizer)
    templated = fmt.chat_template and getattr(tok, "chat_template", None)
    ids = tok(prefix if templated else "\n" + prefix, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if len(ids) == 0:
        raise ValueError(f"response prefix {prefix!r} encodes to no tokens")
    rows, width = inputs["input_ids"].shape
    out = dict(inputs)
    for key, value in inputs.items():
        if (not isinstance(value, torch.Tensor) or value.dim() != 2 or value.is_floating_point()
                or tuple(value.shape) != (rows, width)):
            continue
        if key == "input_ids":
            tail = ids.to(value.dtype).expand(rows, -1)
        elif key == "attention_mask":
            tail = value.new_ones(rows, len(ids))
        else:
            tail = value.new_zeros(rows, len(ids))
        out[key] = torch.cat([value, tail], dim=1)
    return out


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions as ``generate`` computes them for left-padded rows."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp_min(0)


def to_model(inputs: dict, model) -> dict:
    """``inputs`` on the model's device; floating image tensors in the model's dtype."""
    param = next(model.parameters())
    return {k: (v.to(param.device, param.dtype) if v.is_floating_point() else v.to(param.device))
            if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
