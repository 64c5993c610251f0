"""autosteer-kernels: AutoSteer (arXiv 2507.13255) as an inference-time safety plugin.

Three places hold the code:
- ``autosteer.method``: the offline fit (hidden states, SAS, probe, Refusal Head, steer pack).
- ``autosteer.runtime``: serving (capture hooks, the per-step op, the LogitsProcessor, ``attach``).
- ``autosteer.kernels``: the fused Triton kernels (the top-level ``kernels/`` folder of the
  source tree, installed as ``autosteer.kernels``).
"""
from __future__ import annotations

import importlib.util as _ilu
import sys as _sys
from pathlib import Path as _Path

__version__ = "0.1.0"


def _map_source_tree_kernels() -> None:
    """In a source checkout, expose ``<repo>/kernels`` as ``autosteer.kernels`` (the wheel maps it)."""
    here = _Path(__file__).resolve().parent
    if (here / "kernels").is_dir() or "autosteer.kernels" in _sys.modules:
        return
    init = here.parent / "kernels" / "__init__.py"
    if not init.is_file():
        return
    spec = _ilu.spec_from_file_location("autosteer.kernels", init, submodule_search_locations=[str(init.parent)])
    module = _ilu.module_from_spec(spec)
    _sys.modules["autosteer.kernels"] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module


_map_source_tree_kernels()


def __getattr__(name):  # lazy: importing autosteer must not import torch/transformers
    if name in ("attach", "AutoSteerHandle", "AutoSteerFault"):
        from .runtime import attach as _attach

        return getattr(_attach, name)
    if name in ("SteerPack", "load_pack", "PackError"):
        from .method import pack as _pack

        return getattr(_pack, name)
    raise AttributeError(name)
