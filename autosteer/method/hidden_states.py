"""Hidden states of a frozen model: at the last prompt token (every layer), and at the tokens of
its own responses (one layer, for monitor mode).

``h_l(x)`` is the residual stream entering decoder block ``l`` at the last prompt token. We read
it with forward pre-hooks on the decoder blocks -- the very hooks the runtime uses -- so fit and
serving see the same tensor. Prompts are formatted with :mod:`autosteer.prompting`, left padded,
with the positions ``generate`` would use; a multimodal model gets its processor's image
tensors too, and "last prompt token" is the last token after the images are expanded.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..models import decoder_layers, stop_token_ids
from ..prompting import (PromptFormat, PromptLike, append_response_prefix, batching_key, encode_batch,
                         position_ids_from_mask, to_model)


def _hidden_arg(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def last_token_states(
    model,
    tokenizer,
    prompts: list[PromptLike],
    fmt: PromptFormat,
    batch_size: int = 16,
    layers: list[int] | None = None,
    desc: str = "hidden states",
    progress: bool = True,
    response_prefix: str = "",
) -> torch.Tensor:
    """``[n_prompts, n_layers, H]`` fp32 states at the last prompt token (layers = all by default;
    with a ``response_prefix``, the assistant turn begun with it: the state at its last token)."""
    blocks = decoder_layers(model)
    layers = list(range(len(blocks))) if layers is None else list(layers)
    store: dict[int, torch.Tensor] = {}
    handles = []
    for l in layers:
        def hook(_mod, args, kwargs, l=l):
            store[l] = _hidden_arg(args, kwargs)[:, -1, :].float().cpu()
        handles.append(blocks[l].register_forward_pre_hook(hook, with_kwargs=True))
    # sort by length so batches pad little; restore order at the end
    order = sorted(range(len(prompts)), key=lambda i: batching_key(prompts[i]))
    out = torch.empty(len(prompts), len(layers), model.config.get_text_config().hidden_size
                      if hasattr(model.config, "get_text_config") else model.config.hidden_size)
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
            idx = order[start:start + batch_size]
            inputs = to_model(append_response_prefix(encode_batch(tokenizer, [prompts[i] for i in idx], fmt),
                                                     tokenizer, fmt, response_prefix), model)
            model(**inputs, position_ids=position_ids_from_mask(inputs["attention_mask"]), use_cache=False, logits_to_keep=1)
            out[idx] = torch.stack([store[l] for l in layers], dim=1)
    finally:
        for h in handles:
            h.remove()
    return out


@torch.no_grad()
def generated_token_states(
    model,
    tokenizer,
    prompts: list[PromptLike],
    fmt: PromptFormat,
    layer: int,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    desc: str = "response states",
    progress: bool = True,
    response_prefix: str = "",
) -> tuple[list[torch.Tensor], list[str]]:
    """The states monitor mode probes, on the model's own greedy responses.

    For every prompt: ``[k, H]`` fp32 states entering block ``layer`` at generated tokens
    ``0 .. k-1`` (``k <= max_new_tokens``; fewer when the response ends: the stop token and what
    follows are not probed at run time, so they are left out), read by the same pre-hook during
    ``generate`` -- cached decode, exactly the tensor the runtime sees -- and the decoded
    responses. The model runs unsteered (nothing is attached during a fit).

    ``response_prefix``: text put at the start of the assistant turn before generating (for
    example ``"Sure, here is"``: the model's responses when it has begun to comply); with no chat
    template (``fmt.chat_template`` False, or a tokenizer without one) it starts a new line after
    the prompt. Its tokens are part of the prompt: neither their states nor their text are returned.
    """
    block = decoder_layers(model)[layer]
    steps: list[torch.Tensor] = []

    def hook(_mod, args, kwargs):
        steps.append(_hidden_arg(args, kwargs)[:, -1, :].float().cpu())

    from ..prompting import text_tokenizer

    tok = text_tokenizer(tokenizer)
    stop = stop_token_ids(model)  # where the runtime stops probing a row
    pad = tok.pad_token_id if tok.pad_token_id is not None else (stop[0] if stop else 0)
    stop_ids = torch.tensor(stop, dtype=torch.long)
    order = sorted(range(len(prompts)), key=lambda i: batching_key(prompts[i]))
    states: list[torch.Tensor | None] = [None] * len(prompts)
    responses: list[str] = [""] * len(prompts)
    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
            idx = order[start:start + batch_size]
            inputs = to_model(append_response_prefix(encode_batch(tokenizer, [prompts[i] for i in idx], fmt),
                                                     tokenizer, fmt, response_prefix), model)
            width = inputs["input_ids"].shape[1]
            steps.clear()
            # one more step than tokens kept: the state of generated token j is read when it is fed back
            seqs = model.generate(**inputs, max_new_tokens=max_new_tokens + 1, do_sample=False, pad_token_id=pad)
            seqs = seqs if isinstance(seqs, torch.Tensor) else seqs.sequences
            gen = seqs[:, width:].cpu()
            if len(steps) != gen.shape[1]:  # one forward for the prompt, one per generated token fed back
                raise RuntimeError(f"generated_token_states: {len(steps)} forwards for {gen.shape[1]} generated tokens "
                                   "(a chunked prefill?): the states would not line up with the tokens")
            fed = torch.stack(steps[1:], dim=1) if len(steps) > 1 else steps[0].new_zeros(len(idx), 0, steps[0].shape[-1])
            for j, i in enumerate(idx):
                ended = torch.isin(gen[j], stop_ids).nonzero()
                n = int(ended[0]) if len(ended) else gen.shape[1]
                k = min(n, fed.shape[1], max_new_tokens)
                states[i] = fed[j, :k].clone()
                responses[i] = tok.decode(gen[j, :n], skip_special_tokens=True)
    finally:
        handle.remove()
    return states, responses  # type: ignore[return-value]

