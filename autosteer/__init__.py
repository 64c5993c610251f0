"""autosteer-kernels: AutoSteer (arXiv 2507.13255) as an inference-time safety plugin.

Three places hold the code:
- ``autosteer.method``: the offline fit (hidden states, SAS, probe, Refusal Head, steer pack).
- ``autosteer.runtime``: serving (capture hooks, the per-step op, the LogitsProcessor, ``attach``).
- ``autosteer.kernels``: the fused Triton kernels (the top-level ``kernels/`` folder of the
  source tree, installed as ``autosteer.kernels``).

Importing ``autosteer`` is cheap: the public names below load torch/transformers on first use.
"""
from __future__ import annotations

from pathlib import Path as _Path

from ._version import __version__

#: the shipped default steer pack of the default model (SmolLM2-135M-Instruct), package data: a pooled gate
#: (``autosteer fit --pooling 'last_token|max'``), whose probe reads every prompt token as well as the last one; served by
#: transformers, vLLM (prefix caching included), and TGI with prefix caching off
DEFAULT_PACK_NAME = "smollm2-135m-instruct.pooled.pack.safetensors"
#: the same name, kept for code written when the pooled pack was opt-in
DEFAULT_POOLED_PACK_NAME = DEFAULT_PACK_NAME
#: the last-token gate (``autosteer fit`` with its defaults): served by every engine configuration, TGI's prefix
#: caching included; the default pack until 2026-12-07
LAST_TOKEN_PACK_NAME = "smollm2-135m-instruct.pack.safetensors"
#: the last-token gate with a monitor probe (``autosteer fit --monitor-prompts 150``), for monitor mode and the
#: two-stage gate
DEFAULT_MONITOR_PACK_NAME = "smollm2-135m-instruct.monitor.pack.safetensors"

_LAZY = {
    "attach": "runtime.attach", "AutoSteerHandle": "runtime.attach", "AutoSteerFault": "runtime.attach",
    "SteerPack": "method.pack", "load_pack": "method.pack", "PackError": "method.pack",
}

__all__ = ["__version__", "DEFAULT_PACK_NAME", "LAST_TOKEN_PACK_NAME", "DEFAULT_MONITOR_PACK_NAME", "default_pack_path",
           *_LAZY]
_SUBPACKAGES = ["method", "runtime", "integrations", "kernels"]


def default_pack_path(monitor: bool = False, pooled: bool | None = None) -> _Path:
    """Path of a steer pack shipped for the default model (SmolLM2-135M-Instruct).

    Without arguments: the default pack, a pooled gate (``autosteer fit --pooling 'last_token|max'``, every other
    setting the fit's default; docs/method.md 7l, 7x): its probe reads the last prompt token and, through a token
    probe, every prompt token, and the gate fires on the higher of the two. ``autosteer demo``, ``generate`` and
    ``eval`` use it when no ``--pack`` is given. It is served by transformers, by vLLM (prefix caching included) and
    by TGI with ``PREFIX_CACHING=0``; TGI with prefix caching on refuses it at start-up by name.

    ``pooled=False``: the last-token pack, what ``autosteer fit`` writes with its defaults (the default pack until
    2026-12-07), which every engine configuration serves. ``monitor=True``: the last-token pack with a monitor probe
    (``autosteer fit --monitor-prompts 150``: the same gate, plus a monitor probe, ``tau_monitor`` and a Refusal Head
    that also refuses mid-answer), for monitor mode and the two-stage gate. There is no pooled monitor pack.
    """
    if monitor and pooled:
        raise ValueError("no pooled monitor pack is shipped: pick monitor=True or pooled=True")
    name = DEFAULT_MONITOR_PACK_NAME if monitor else LAST_TOKEN_PACK_NAME if pooled is False else DEFAULT_PACK_NAME
    path = _Path(__file__).resolve().parent / "packs" / name
    if not path.is_file():  # a broken install; never fall back to an unsteered run
        raise FileNotFoundError(f"the shipped default pack is missing: {path} (reinstall autosteer-kernels)")
    return path


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'autosteer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*__all__, *_SUBPACKAGES])
