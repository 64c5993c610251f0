"""Forward hooks that capture what the per-step op reads.

- the residual stream entering each of the pack's probe layers ``L`` (the probe's input: one layer, or
  several whose states the op concatenates itself), and
- the input of ``lm_head`` (the final normed hidden state, the Refusal Head's input),
- from the model's own call: the attention mask (to find each row's last real prompt token), the
  token ids the forward ran on and its KV cache object (host facts the processor uses to tell a
  continued decode step from a new or reordered batch without reading any token on the device).

Hooks only keep references to what they are given: no op, no copy, no sync (a decode step counts
its ops, see ``tests/test_step_ops.py``). The flat ``[tokens, H]`` views the op reads are made on
demand (:attr:`HiddenCapture.probe_parts`, :attr:`HiddenCapture.head_hidden`), by the processor,
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

    def __init__(self, model, layers: int | list[int]):
        blocks = decoder_layers(model)
        layers = [int(layers)] if isinstance(layers, int) else [int(x) for x in layers]
        if not layers or len(set(layers)) != len(layers):
            raise ValueError(f"probe layers must be distinct and at least one, got {layers}")
        for layer in layers:
            if not 0 <= layer < len(blocks):
                raise ValueError(f"layer {layer} is outside 0..{len(blocks) - 1} for this model")
        self.layers = layers
        # as each probe block got its input: [B, T, H] (or [T, H]), in the order of ``layers``
        self.probe_raws: list[torch.Tensor | None] = [None] * len(layers)
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
        self._flat_probe: list[torch.Tensor] | None = None
        self._flat_head: torch.Tensor | None = None
        self._handles = [blocks[layer].register_forward_pre_hook(self._block_hook(i), with_kwargs=True)
                         for i, layer in enumerate(layers)]
        self._handles += [
            output_head(model).register_forward_pre_hook(self._on_head, with_kwargs=True),
            model.register_forward_pre_hook(self._on_model, with_kwargs=True),
        ]

    def _on_model(self, _mod, args, kwargs):
        self.probe_raws = [None] * len(self.layers)  # this forward's, or None: never a mix of two forwards'
        self._flat_probe = None
        self.attention_mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.input_ids = ids if isinstance(ids, torch.Tensor) else None
        cache = kwargs.get("cache")
        self.cache = kwargs.get("past_key_values") if cache is None else cache
        self.thread = threading.get_ident()
        self.forwards += 1

    def _block_hook(self, i: int):
        def on_block(_mod, args, kwargs):
            h = _first_arg(args, kwargs, "hidden_states")
            if i == 0:
                self.probe_tokens = h.shape[-2] if h.dim() == 3 else 1
            self.probe_raws[i] = h
            self._flat_probe = None
        return on_block

    def _on_head(self, _mod, args, kwargs):
        h = _first_arg(args, kwargs, "input")
        self.head_tokens = h.shape[-2] if h.dim() == 3 else 1
        self.head_raw = h
        self._flat_head = None

    @property
    def probe_parts(self) -> list[torch.Tensor] | None:
        """Each probe layer's input as ``[B*T, H]`` (views, in the order of ``layers``; made once per forward,
        on first use): the op's ``probe_hidden`` and ``probe_extra``."""
        if self._flat_probe is None:
            if any(h is None for h in self.probe_raws):
                return None
            self._flat_probe = [_flat(h) for h in self.probe_raws]
        return self._flat_probe

    @property
    def probe_hidden(self) -> torch.Tensor | None:
        """The first probe layer's input as ``[B*T, H]`` (a view; see :attr:`probe_parts`)."""
        parts = self.probe_parts
        return None if parts is None else parts[0]

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
        self.probe_raws = [None] * len(self.layers)
        self.head_raw = self.attention_mask = self.input_ids = self.cache = None
        self._flat_probe = self._flat_head = None

    @property
    def attached(self) -> bool:
        return bool(self._handles)
