"""Fused Triton kernels of autosteer-kernels (``autosteer.kernels``).

Their sources live in the repository's top-level ``kernels/`` folder, which deliberately has no
``__init__.py``: a source checkout on ``sys.path`` (tests run from the repo root) must not shadow
Hugging Face's ``kernels`` package. A wheel copies the sources next to this file (setup.py's
``build_py``); in a source checkout or an editable install this package's path is extended to the
top-level folder instead. Modules here import triton lazily: importing this package costs nothing.
"""
from pathlib import Path as _Path

_SOURCE_TREE = _Path(__file__).resolve().parents[2] / "kernels"
if not (_Path(__file__).with_name("steer_step.py")).is_file() and (_SOURCE_TREE / "steer_step.py").is_file():
    __path__.append(str(_SOURCE_TREE))  # noqa: F821 - a package's __path__
