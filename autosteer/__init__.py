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

#: the shipped steer pack of the default model (SmolLM2-135M-Instruct), package data
DEFAULT_PACK_NAME = "smollm2-135m-instruct.pack.safetensors"
#: the same gate with a monitor probe (``autosteer fit --monitor-prompts 150``), for monitor mode and the two-stage gate
DEFAULT_MONITOR_PACK_NAME = "smollm2-135m-instruct.monitor.pack.safetensors"
#: a pooled gate (``autosteer fit --pooling 'last_token|max'``): served by transformers, vLLM, and TGI with prefix
#: caching off
DEFAULT_POOLED_PACK_NAME = "smollm2-135m-instruct.pooled.pack.safetensors"

_LAZY = {
    "attach": "runtime.attach", "AutoSteerHandle": "runtime.attach", "AutoSteerFault": "runtime.attach",
    "SteerPack": "method.pack", "load_pack": "method.pack", "PackError": "method.pack",
}

__all__ = ["__version__", "DEFAULT_PACK_NAME", "DEFAULT_MONITOR_PACK_NAME", "default_pack_path", *_LAZY]
_SUBPACKAGES = ["method", "runtime", "integrations", "kernels"]


def default_pack_path(monitor: bool = False, pooled: bool = False) -> _Path:
    """Path of the steer pack shipped for the default model (SmolLM2-135M-Instruct).

    It is the pack ``autosteer fit`` writes with its defaults on that model (its metadata records
    the fit configuration); ``autosteer demo``, ``generate`` and ``eval`` use it when no ``--pack``
    is given for the default model. ``monitor=True``: the pack ``autosteer fit --monitor-prompts 150``
    writes -- the same gate (probe, tau and operating points), plus a monitor probe, ``tau_monitor`` and
    a Refusal Head that also refuses mid-answer -- which they use for monitor mode. ``pooled=True``: the pack
    ``autosteer fit --pooling 'last_token|max'`` writes, whose gate also reads every prompt token (docs/method.md
    7l; served by transformers, vLLM, and TGI without prefix caching, ``--pooled`` on the CLI). There is no pooled monitor pack.
    """
    if monitor and pooled:
        raise ValueError("no pooled monitor pack is shipped: pick monitor=True or pooled=True")
    name = DEFAULT_MONITOR_PACK_NAME if monitor else DEFAULT_POOLED_PACK_NAME if pooled else DEFAULT_PACK_NAME
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
