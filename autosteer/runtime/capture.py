"""Forward hooks that capture what the per-step op reads.

- the residual stream entering decoder block ``L`` (the probe's input), and
- the input of ``lm_head`` (the final normed hidden state, the Refusal Head's input),
- the attention mask passed to the model (to find each row's last real prompt token).

Hooks only keep references to the tensors (as flat ``[tokens, H]`` views): no copy, no sync. They
are kept per thread, so concurrent ``generate`` calls on one model each read their own forward.
"""
from __future__ import annotations

import threading

import torch

from ..models import decoder_layers, output_head


def _first_arg(args, kwargs, name):
    return args[0] if args else kwargs[name]


class _Latest(threading.local):
    """What the latest forward *of the current thread* left: a thread's generate reads its own forward even
    when another thread runs the same model meanwhile (each thread sees these defaults until it runs one)."""

    probe_hidden: torch.Tensor | None = None  # [B*T, H]
    probe_tokens: int = 0  # T of the latest forward
    head_hidden: torch.Tensor | None = None  # [B*t, H]
    head_tokens: int = 0
    attention_mask: torch.Tensor | None = None
    thread: int | None = None  # the thread that ran it (this one, or None before its first forward)
    forwards: int = 0  # model forwards this thread ran (a processor must run once per forward)


def _latest(name: str) -> property:
    return property(lambda self: getattr(self._latest, name), lambda self, v: setattr(self._latest, name, v))


class HiddenCapture:
    """Captures the probe layer's input, ``lm_head``'s input and the attention mask of the latest forward
    (per thread: the hooks run in the thread that calls the model, and store there)."""

    probe_hidden = _latest("probe_hidden")
    probe_tokens = _latest("probe_tokens")
    head_hidden = _latest("head_hidden")
    head_tokens = _latest("head_tokens")
    attention_mask = _latest("attention_mask")
    thread = _latest("thread")
    forwards = _latest("forwards")

    def __init__(self, model, layer: int):
        blocks = decoder_layers(model)
        if not 0 <= layer < len(blocks):
            raise ValueError(f"layer {layer} is outside 0..{len(blocks) - 1} for this model")
        self.layer = layer
        self._latest = _Latest()
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
        self._latest = _Latest()  # every thread's references dropped

    @property
    def attached(self) -> bool:
        return bool(self._handles)
