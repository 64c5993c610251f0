"""Last-prompt-token hidden states of a frozen model, at every layer.

``h_l(x)`` is the residual stream entering decoder block ``l`` at the last prompt token. We read
it with forward pre-hooks on the decoder blocks -- the very hooks the runtime uses -- so fit and
serving see the same tensor. Prompts are formatted with :mod:`autosteer.prompting`, left padded,
with the positions ``generate`` would use; a multimodal model gets its processor's image
tensors too, and "last prompt token" is the last token after the images are expanded.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..models import decoder_layers
from ..prompting import PromptFormat, PromptLike, batching_key, encode_batch, position_ids_from_mask, to_model


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
) -> torch.Tensor:
    """``[n_prompts, n_layers, H]`` fp32 states at the last prompt token (layers = all by default)."""
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
            inputs = to_model(encode_batch(tokenizer, [prompts[i] for i in idx], fmt), model)
            model(**inputs, position_ids=position_ids_from_mask(inputs["attention_mask"]), use_cache=False, logits_to_keep=1)
            out[idx] = torch.stack([store[l] for l in layers], dim=1)
    finally:
        for h in handles:
            h.remove()
    return out
