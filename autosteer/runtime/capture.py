"""Forward hooks that capture what the per-step op reads.

- the residual stream entering decoder block ``L`` (the probe's input), and
- the input of ``lm_head`` (the final normed hidden state, the Refusal Head's input),
- from the model's own call: the attention mask (to find each row's last real prompt token), the
  token ids the forward ran on and its KV cache object (host facts the processor uses to tell a
  continued decode step from a new or reordered batch without reading any token on the device).

Hooks only keep references to what they are given: no op, no copy, no sync (a decode step counts
its ops, see ``tests/test_step_ops.py``). The flat ``[tokens, H]`` views the op reads are made on
demand (:attr:`HiddenCapture.probe_hidden`, :attr:`HiddenCapture.head_hidden`), by the processor,
only when a step needs them.
"""
from __future__ import annotations

import threading

import torch

from ..models import decoder_layers, output_head


def _first_arg(args, kwargs, name):
    return args[0] if args else kwargs[name]


def _flat(h: torch.Tensor | None) -> torch.Tensor | None:
    return None if h is None else h.reshape(-1, h.shape[-1])


class HiddenCapture:
    """Captures the probe layer's input, ``lm_head``'s input and the model call's inputs of the latest forward."""

    def __init__(self, model, layer: int):
        blocks = decoder_layers(model)
        if not 0 <= layer < len(blocks):
            raise ValueError(f"layer {layer} is outside 0..{len(blocks) - 1} for this model")
        self.layer = layer
        self.probe_raw: torch.Tensor | None = None  # as the block got it: [B, T, H] (or [T, H])
        self.probe_tokens: int = 0  # T of the latest forward
        self.head_raw: torch.Tensor | None = None  # as lm_head got it: [B, t, H]
        self.head_tokens: int = 0
        self.attention_mask: torch.Tensor | None = None
        self.input_ids: torch.Tensor | None = None  # the token ids the latest forward ran on (None: embeddings)
        # the KV cache object the latest forward got (None: none passed). A strong reference until the
        # processor takes it (take_cache): it holds no tensor of its own beyond the caller's cache.
        self.cache = None
        self.thread: int | None = None  # thread that ran the latest forward
        self.forwards = 0  # model forwards seen (a processor must run once per forward)
        self._flat_probe: torch.Tensor | None = None
        self._flat_head: torch.Tensor | None = None
        self._handles = [
            blocks[layer].register_forward_pre_hook(self._on_block, with_kwargs=True),
            output_head(model).register_forward_pre_hook(self._on_head, with_kwargs=True),
            model.register_forward_pre_hook(self._on_model, with_kwargs=True),
        ]

    def _on_model(self, _mod, args, kwargs):
        self.attention_mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.input_ids = ids if isinstance(ids, torch.Tensor) else None
        cache = kwargs.get("cache")
        self.cache = kwargs.get("past_key_values") if cache is None else cache
        self.thread = threading.get_ident()
        self.forwards += 1

    def _on_block(self, _mod, args, kwargs):
        h = _first_arg(args, kwargs, "hidden_states")
        self.probe_tokens = h.shape[-2] if h.dim() == 3 else 1
        self.probe_raw = h
        self._flat_probe = None

    def _on_head(self, _mod, args, kwargs):
        h = _first_arg(args, kwargs, "input")
        self.head_tokens = h.shape[-2] if h.dim() == 3 else 1
        self.head_raw = h
        self._flat_head = None

    @property
    def probe_hidden(self) -> torch.Tensor | None:
        """The probe layer's input as ``[B*T, H]`` (a view; made once per forward, on first use)."""
        if self._flat_probe is None:
            self._flat_probe = _flat(self.probe_raw)
        return self._flat_probe

    @property
    def head_hidden(self) -> torch.Tensor | None:
        """``lm_head``'s input as ``[B*t, H]`` (a view; made once per forward, on first use)."""
        if self._flat_head is None:
            self._flat_head = _flat(self.head_raw)
        return self._flat_head

    def take_cache(self):
        """The latest forward's cache object, and forget it here (the caller keeps a weak reference)."""
        cache, self.cache = self.cache, None
        return cache

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.probe_raw = self.head_raw = self.attention_mask = self.input_ids = self.cache = None
        self._flat_probe = self._flat_head = None

    @property
    def attached(self) -> bool:
        return bool(self._handles)
