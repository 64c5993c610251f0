"""Forward hooks that capture what the per-step op reads.

- the residual stream entering decoder block ``L`` (the probe's input), and
- the input of ``lm_head`` (the final normed hidden state, the Refusal Head's input),
- the attention mask passed to the model (to find each row's last real prompt token).

Hooks only keep references to the tensors (as flat ``[tokens, H]`` views): no copy, no sync.
"""
from __future__ import annotations

import threading

import torch

from ..models import decoder_layers, output_head


def _first_arg(args, kwargs, name):
    return args[0] if args else kwargs[name]


class HiddenCapture:
    """Captures the probe layer's input, ``lm_head``'s input and the attention mask of the latest forward."""

    def __init__(self, model, layer: int):
        blocks = decoder_layers(model)
        if not 0 <= layer < len(blocks):
            raise ValueError(f"layer {layer} is outside 0..{len(blocks) - 1} for this model")
        self.layer = layer
        self.probe_hidden: torch.Tensor | None = None  # [B*T, H]
        self.probe_tokens: int = 0  # T of the latest forward
        self.head_hidden: torch.Tensor | None = None  # [B*t, H]
        self.head_tokens: int = 0
        self.attention_mask: torch.Tensor | None = None
        self.thread: int | None = None  # thread that ran the latest forward
        self.forwards = 0  # model forwards seen (a processor must run once per forward)
        self._handles = [
            blocks[layer].register_forward_pre_hook(self._on_block, with_kwargs=True),
            output_head(model).register_forward_pre_hook(self._on_head, with_kwargs=True),
            model.register_forward_pre_hook(self._on_model, with_kwargs=True),
        ]

    def _on_model(self, _mod, args, kwargs):
        self.attention_mask = kwargs.get("attention_mask")
        self.thread = threading.get_ident()
        self.forwards += 1

    def _on_block(self, _mod, args, kwargs):
        h = _first_arg(args, kwargs, "hidden_states")
        self.probe_tokens = h.shape[-2] if h.dim() == 3 else 1
        self.probe_hidden = h.reshape(-1, h.shape[-1])

    def _on_head(self, _mod, args, kwargs):
        h = _first_arg(args, kwargs, "input")
        self.head_tokens = h.shape[-2] if h.dim() == 3 else 1
        self.head_hidden = h.reshape(-1, h.shape[-1])

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.probe_hidden = self.head_hidden = self.attention_mask = None

    @property
    def attached(self) -> bool:
        return bool(self._handles)
