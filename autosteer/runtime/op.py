"""``torch.ops.autosteer.steer_step``: the per-decode-step AutoSteer work as one torch custom op.

Semantics: exactly ``autosteer.runtime.reference_op.steer_step_reference`` (gather + probe +
latch + refusal-logit blend, in place on ``logits`` / ``latched`` / ``p_out``; unlatched rows get
no writes; the probe may read several layers -- ``probe_extra`` / ``probe_sum``, summed and
concatenated by the op itself, no ``cat`` / ``add`` in the step). Backends, picked from the device of the tensors:

- CUDA: the Triton kernels of ``autosteer.kernels.steer_step`` (three launches in the one op:
  probe, latch + ``t``, blend; one fp32 scratch sized from shapes), registered with
  ``torch.library.triton_op`` + ``wrap_triton`` so ``torch.compile`` sees the kernels;
- CPU: the C++ kernel ``torch.ops.autosteer.steer_step_cpu`` (``csrc/``), from the installed
  ``autosteer._C`` or, failing that, a JIT build with ninja into a cache directory;
- anything else, or when the above are unavailable: ``torch.ops.autosteer.steer_step_ref``,
  an opaque custom op running the PyTorch reference (one warning when the C++ kernel is missing).

When triton is not importable the op is defined with ``torch.library.custom_op`` instead (same
name, same schema). Use the ``steer_step`` wrapper: it checks shapes, dtypes and devices up
front (never values, so it does not synchronise the device) and raises ``ValueError`` naming
the offending argument.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from .reference_op import steer_step_reference

__all__ = ["steer_step", "available_backends", "native_backend"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_INDEX = (torch.int32, torch.int64)
_MUTATES = ("logits", "latched", "p_out")
EAGER_FAST_PATH = True  # see steer_step(): skip the custom op's Python dispatch layer in eager mode
_PACKAGE = Path(__file__).resolve().parents[1]
#: where the C++ sources are: inside an installed wheel (package data), or the source checkout's csrc/
CSRC_DIRS = (_PACKAGE / "_csrc", _PACKAGE.parent / "csrc")


# ----------------------------------------------------------------------------- C++ extension
def _import_installed() -> None:
    import autosteer._C  # noqa: F401  (registers torch.ops.autosteer.steer_step_cpu)


def _jit_build() -> None:
    if os.environ.get("AUTOSTEER_DISABLE_JIT_BUILD", "0") == "1":
        raise RuntimeError("JIT build disabled by AUTOSTEER_DISABLE_JIT_BUILD=1")
    csrc = next((d for d in CSRC_DIRS if any(d.glob("*.cpp"))), None)
    if csrc is None:
        raise FileNotFoundError(f"no C++ sources in {' or '.join(map(str, CSRC_DIRS))} (reinstall autosteer-kernels)")
    sources = sorted(str(p) for p in csrc.glob("*.cpp"))
    cxx = os.environ.get("CXX", "c++")  # what torch's ninja build calls
    if shutil.which(cxx) is None:
        raise FileNotFoundError(f"no C++ compiler: {cxx!r} not found" + ("" if "CXX" in os.environ else " (set CXX)"))
    from torch.utils.cpp_extension import load

    cache = os.environ.get("AUTOSTEER_EXTENSION_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
        "autosteer",
        "torch_ext_" + torch.__version__.replace("+", "_"),
    )
    os.makedirs(cache, exist_ok=True)
    if not any(Path(cache).glob("*.so")):  # first use: say why the import takes a while
        print(f"autosteer: building the C++ CPU kernel from {csrc} into {cache} (first use only, ~30 s)",
              file=sys.stderr, flush=True)
    load(
        name="autosteer_native_jit",
        sources=sources,
        extra_cflags=["-O3", cxx_standard_flag(torch.__version__), "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=cache,
        is_python_module=False,
        verbose=False,
    )


def cxx_standard_flag(torch_version: str) -> str:
    """torch >= 2.14 headers need C++20; older ones build with C++17 (setup.py uses the same rule)."""
    major, minor = (int(x) for x in torch_version.split("+")[0].split(".")[:2])
    return "-std=c++20" if (major, minor) >= (2, 14) else "-std=c++17"


_LOADERS = (("installed autosteer._C", _import_installed), ("JIT build of csrc/", _jit_build))


def _native_registered() -> bool:
    try:
        torch.ops.autosteer.steer_step_cpu.default  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


def _native_schema_current() -> bool:
    """The registered C++ op takes every argument this Python side passes (a build from older
    sources would fail every call with an argument-count error)."""
    args = [a.name for a in torch.ops.autosteer.steer_step_cpu.default._schema.arguments]
    return args[-5:] == ["row_tau", "row_probe", "state_rows", "probe_extra", "probe_sum"]


_STALE = ("an older build of csrc/ is loaded (its op schema lacks state_rows or probe_extra / probe_sum): rebuild it with "
          "`pip install --no-build-isolation --use-pep517 -e .` or remove the stale autosteer/_C*.so")


def _load_native() -> str | None:
    """Make ``torch.ops.autosteer.steer_step_cpu`` available; return how, or None (one warning)."""
    errors = []
    if _native_registered():
        if _native_schema_current():
            return "already loaded"
        errors.append(_STALE)
    else:
        for name, loader in _LOADERS:
            try:
                loader()
            except Exception as exc:  # noqa: BLE001 - any failure means: try the next way
                errors.append(f"{name}: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
                continue
            if _native_registered():
                if _native_schema_current():
                    return name
                errors.append(f"{name}: {_STALE}")  # the op name is now taken: a JIT build cannot register it
                break
            errors.append(f"{name}: loaded but autosteer::steer_step_cpu is not registered")
    warnings.warn(
        "autosteer: the C++ CPU kernel is unavailable (" + "; ".join(errors) + "). CPU calls of "
        "torch.ops.autosteer.steer_step fall back to the PyTorch reference (same results, slower). "
        "To get it, install a C++ compiler (e.g. `apt-get install g++`) and ninja: autosteer then JIT-builds it on "
        "the next import (or build it at install time: `pip install --no-build-isolation autosteer-kernels`).",
        RuntimeWarning,
        stacklevel=2,
    )
    return None


_NATIVE: str | None = _load_native()


def native_backend() -> str | None:
    """How the C++ kernel was loaded ("installed autosteer._C", "JIT build of csrc/", ...) or None."""
    return _NATIVE


# ----------------------------------------------------------------------------- triton
def _triton_importable() -> bool:
    try:
        if importlib.util.find_spec("triton") is None:
            return False
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken triton install counts as absent
        return False
    return True


_HAS_TRITON = _triton_importable()
if _HAS_TRITON:
    from torch.library import wrap_triton

    from autosteer.kernels import steer_step as _ktriton
else:  # pragma: no cover - exercised on machines without triton
    _ktriton = None


def available_backends() -> dict[str, bool]:
    """Which implementations this process can use: ``{"triton": ..., "cpp": ..., "reference": True}``.

    ``triton``: triton is importable and a CUDA device is present (CUDA tensors use it);
    ``cpp``: the C++ CPU kernel is loaded (CPU tensors use it); ``reference``: always.
    """
    return {
        "triton": bool(_HAS_TRITON and torch.cuda.is_available()),
        "cpp": _NATIVE is not None,
        "reference": True,
    }


# ----------------------------------------------------------------------------- the ops
# Written out (not inferred from the Python signature): torch.library cannot infer a default for a
# tensor list. ``probe_extra`` is ``Tensor[]? = None`` (torch's schema parser takes no ``[]`` default for
# ``Tensor[]``): None and an empty list both mean "probe_hidden alone", so every older call stays valid.
_SCHEMA_HEAD = ("(Tensor probe_hidden, Tensor probe_rows, Tensor probe_mask, Tensor head_hidden, Tensor head_rows, "
                "Tensor(a5!) logits, Tensor(a6!) latched, Tensor(a7!) p_out, Tensor W1, Tensor b1, Tensor w2, "
                "Tensor b2, Tensor U, Tensor Bt, float tau, float eps, ")
_SCHEMA_TAIL = (", Tensor? row_tau=None, Tensor? row_probe=None, Tensor? state_rows=None, "
                "Tensor[]? probe_extra=None, int probe_sum=1) -> ()")
_SCHEMA = _SCHEMA_HEAD + "bool nan_latches=False" + _SCHEMA_TAIL
_SCHEMA_REF = _SCHEMA_HEAD + "bool nan_latches" + _SCHEMA_TAIL


# The reference as an opaque op: its data-dependent code (nonzero, bool()) must not be traced.
@torch.library.custom_op("autosteer::steer_step_ref", mutates_args=_MUTATES, schema=_SCHEMA_REF)
def _steer_step_ref(
    probe_hidden: Tensor, probe_rows: Tensor, probe_mask: Tensor, head_hidden: Tensor, head_rows: Tensor,
    logits: Tensor, latched: Tensor, p_out: Tensor, W1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
    U: Tensor, Bt: Tensor, tau: float, eps: float, nan_latches: bool, row_tau: Optional[Tensor] = None,
    row_probe: Optional[Tensor] = None, state_rows: Optional[Tensor] = None,
    probe_extra: Optional[Sequence[Tensor]] = None, probe_sum: int = 1,
) -> None:
    steer_step_reference(probe_hidden, probe_rows, probe_mask, head_hidden, head_rows, logits, latched, p_out,
                         W1, b1, w2, b2, U, Bt, tau, eps, nan_latches, row_tau, row_probe, state_rows,
                         probe_extra, probe_sum)


@_steer_step_ref.register_fake
def _steer_step_ref_fake(*args, **kwargs) -> None:
    return None


def _cpu_impl(probe_hidden, probe_rows, probe_mask, head_hidden, head_rows, logits, latched, p_out,
              W1, b1, w2, b2, U, Bt, tau, eps, nan_latches, row_tau=None, row_probe=None, state_rows=None,
              probe_extra=None, probe_sum=1) -> None:
    probe_extra = list(probe_extra) if probe_extra else None  # (None: probe_hidden alone)
    if _NATIVE is not None:
        torch.ops.autosteer.steer_step_cpu(probe_hidden, probe_rows, probe_mask, head_hidden, head_rows, logits,
                                           latched, p_out, W1, b1, w2, b2, U, Bt, tau, eps, nan_latches, row_tau,
                                           row_probe, state_rows, probe_extra, probe_sum)
    else:
        torch.ops.autosteer.steer_step_ref(probe_hidden, probe_rows, probe_mask, head_hidden, head_rows, logits,
                                           latched, p_out, W1, b1, w2, b2, U, Bt, tau, eps, nan_latches, row_tau,
                                           row_probe, state_rows, probe_extra, probe_sum)


def _steer_step_impl(
    probe_hidden: Tensor, probe_rows: Tensor, probe_mask: Tensor, head_hidden: Tensor, head_rows: Tensor,
    logits: Tensor, latched: Tensor, p_out: Tensor, W1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
    U: Tensor, Bt: Tensor, tau: float, eps: float, nan_latches: bool = False, row_tau: Optional[Tensor] = None,
    row_probe: Optional[Tensor] = None, state_rows: Optional[Tensor] = None,
    probe_extra: Optional[Sequence[Tensor]] = None, probe_sum: int = 1,
) -> None:
    if logits.shape[0] == 0:
        return
    if logits.device.type == "cuda" and _HAS_TRITON:
        # three launches (probe, latch + t, blend) and one fp32 scratch sized from shapes
        launches = _ktriton.launch_configs(probe_hidden, probe_rows, probe_mask, head_hidden, head_rows,
                                           logits, latched, p_out, W1, b1, w2, b2, U, Bt, tau, eps,
                                           nan_latches, row_tau, row_probe, state_rows, probe_extra, probe_sum)
        if torch.compiler.is_compiling():  # inductor's generated code guards the device itself
            _ktriton.run_launches(launches, wrap=wrap_triton)
        else:  # eager torch.ops call: launch on the tensors' device, not the current one
            with torch.cuda.device(logits.device):
                _ktriton.run_launches(launches, wrap=wrap_triton)
    elif logits.device.type == "cpu":
        _cpu_impl(probe_hidden, probe_rows, probe_mask, head_hidden, head_rows, logits, latched, p_out,
                  W1, b1, w2, b2, U, Bt, tau, eps, nan_latches, row_tau, row_probe, state_rows, probe_extra,
                  probe_sum)
    else:
        torch.ops.autosteer.steer_step_ref(probe_hidden, probe_rows, probe_mask, head_hidden, head_rows, logits,
                                           latched, p_out, W1, b1, w2, b2, U, Bt, tau, eps, nan_latches, row_tau,
                                           row_probe, state_rows, probe_extra, probe_sum)


def _triton_op_with_schema(name: str, fn, schema: str):
    """``torch.library.triton_op`` with a written-out schema. torch 2.13's ``triton_op`` accepts ``schema=`` but
    still infers the schema from ``fn``'s annotations, which cannot express ``Tensor[]? probe_extra=None``: its
    module-level ``infer_schema`` is then replaced by the written schema for the one call (nothing else of
    ``triton_op`` changes: the Triton kernels stay visible to ``torch.compile``)."""
    import torch._library.triton as _tlib

    inferred = getattr(_tlib, "infer_schema", None)
    if inferred is None:  # a torch whose triton_op no longer infers it that way: trust schema=
        return torch.library.triton_op(name, fn, mutates_args=_MUTATES, schema=schema)
    _tlib.infer_schema = lambda *a, **k: schema
    try:
        return torch.library.triton_op(name, fn, mutates_args=_MUTATES, schema=schema)
    finally:
        _tlib.infer_schema = inferred


if _HAS_TRITON:
    _steer_step_op = _triton_op_with_schema("autosteer::steer_step", _steer_step_impl, _SCHEMA)
else:  # pragma: no cover
    _steer_step_op = torch.library.custom_op("autosteer::steer_step", _steer_step_impl, mutates_args=_MUTATES,
                                             schema=_SCHEMA)


@_steer_step_op.register_kernel("cpu")
def _steer_step_cpu_kernel(probe_hidden, probe_rows, probe_mask, head_hidden, head_rows, logits, latched, p_out,
                           W1, b1, w2, b2, U, Bt, tau, eps, nan_latches=False, row_tau=None,
                           row_probe=None, state_rows=None, probe_extra=None, probe_sum=1) -> None:
    if logits.shape[0] == 0:
        return
    _cpu_impl(probe_hidden, probe_rows, probe_mask, head_hidden, head_rows, logits, latched, p_out,
              W1, b1, w2, b2, U, Bt, tau, eps, nan_latches, row_tau, row_probe, state_rows, probe_extra, probe_sum)


@_steer_step_op.register_fake
def _steer_step_fake(*args, **kwargs) -> None:  # in place on its out-params, returns nothing
    return None


# ----------------------------------------------------------------------------- public wrapper
def _fail(msg: str) -> None:
    raise ValueError(f"steer_step: {msg}")


def _index_vector(name: str, t, dev, n: int, per: str, what: str) -> None:
    """``t`` must be a 1-D int32/int64 tensor of length ``n`` on ``dev`` (``per`` says where ``n`` comes from)."""
    if not isinstance(t, Tensor):
        _fail(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.device != dev:
        _fail(f"{name} is on {t.device} but logits is on {dev}: all tensors must share one device")
    if t.dtype not in _INDEX:
        _fail(f"{name} ({what}) must be int32 or int64, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != n:
        _fail(f"{name} must be 1-D of length {per}, got shape {tuple(t.shape)}")


def _probe_layers(probe_hidden: Tensor, probe_extra, probe_sum) -> tuple[int, str]:
    """Check the probe's input tensors ``[probe_hidden, *probe_extra]`` and ``probe_sum``; return the number of
    layers ``k`` the probe reads and a phrase naming where it comes from (for messages)."""
    if isinstance(probe_extra, Tensor) or not isinstance(probe_extra, (list, tuple)):
        _fail(f"probe_extra must be a list or tuple of tensors (empty by default), got {type(probe_extra).__name__}")
    if isinstance(probe_sum, bool) or not isinstance(probe_sum, int):
        _fail(f"probe_sum must be a Python int (1 or 2), got {type(probe_sum).__name__}")
    N, H = probe_hidden.shape
    for i, t in enumerate(probe_extra):
        name = f"probe_extra[{i}]"
        if not isinstance(t, Tensor):
            _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != probe_hidden.device:
            _fail(f"{name} is on {t.device} but probe_hidden is on {probe_hidden.device}: all tensors must share one device")
        if t.dtype != probe_hidden.dtype:
            _fail(f"{name} must have probe_hidden's dtype {probe_hidden.dtype}, got {t.dtype}")
        if t.dim() != 2 or tuple(t.shape) != (N, H):
            _fail(f"{name} must be [N={N}, H={H}] like probe_hidden, got shape {tuple(t.shape)}")
    n = 1 + len(probe_extra)
    src = "probe_hidden alone" if n == 1 else f"probe_hidden + {n - 1} probe_extra tensor{'s' if n > 2 else ''}"
    src += f", probe_sum={probe_sum}"
    if probe_sum not in (1, 2):
        _fail(f"probe_sum must be 1 (one tensor per layer) or 2 (a layer's (hidden, residual) pair, summed), "
              f"got {probe_sum}")
    if n % probe_sum:
        _fail(f"probe_sum={probe_sum} must divide the number of probe input tensors, got {n} ({src})")
    k = n // probe_sum
    if k > 4:
        _fail(f"the probe reads at most 4 layers, got k={k} ({src})")
    return k, src


def _validate(probe_hidden, probe_rows, probe_mask, head_hidden, head_rows, logits, latched, p_out,
              W1, b1, w2, b2, U, Bt, tau, eps, nan_latches, row_tau=None, row_probe=None, state_rows=None,
              probe_extra=(), probe_sum=1) -> None:
    named = dict(probe_hidden=probe_hidden, probe_rows=probe_rows, probe_mask=probe_mask, head_hidden=head_hidden,
                 head_rows=head_rows, logits=logits, latched=latched, p_out=p_out, W1=W1, b1=b1, w2=w2, b2=b2,
                 U=U, Bt=Bt)
    for name, t in named.items():
        if not isinstance(t, Tensor):
            _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, x in (("tau", tau), ("eps", eps)):
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            _fail(f"{name} must be a Python float (a tensor would need a device sync), got {type(x).__name__}")
    if not isinstance(nan_latches, bool):
        _fail(f"nan_latches must be a bool, got {type(nan_latches).__name__}")
    dev = logits.device
    for name, t in named.items():
        if t.device != dev:
            _fail(f"{name} is on {t.device} but logits is on {dev}: all tensors must share one device")
    if logits.dim() != 2:
        _fail(f"logits must be 2-D [B, V], got shape {tuple(logits.shape)}")
    B, V = logits.shape
    # the per-request tensors have one entry per row, or (state_rows) tables of S entries
    S, per = B, f"B={B}"
    if state_rows is not None:
        _index_vector("state_rows", state_rows, dev, B, f"B={B} (rows of logits)", "entry of the per-request tensors per row")
        if latched.dim() != 1 or latched.shape[0] < 1:
            _fail(f"with state_rows, latched must be a 1-D table of S >= 1 entries, got shape {tuple(latched.shape)}")
        S, per = latched.shape[0], f"S={latched.shape[0]} (latched's length, as state_rows is given)"
    for name in ("probe_hidden", "head_hidden"):
        if named[name].dim() != 2:
            _fail(f"{name} must be 2-D [rows, H], got shape {tuple(named[name].shape)}")
    H = probe_hidden.shape[1]
    if head_hidden.shape[1] != H:
        _fail(f"hidden sizes differ: head_hidden has H={head_hidden.shape[1]}, probe_hidden has H={H}")
    k, src = _probe_layers(probe_hidden, probe_extra, probe_sum)
    D = k * H  # the probe's input width
    for name in ("probe_hidden", "head_hidden", "logits", "U", "Bt"):
        if named[name].dtype not in _FLOATS:
            _fail(f"{name} must be float32, float16 or bfloat16, got {named[name].dtype}")
    for name in ("W1", "b1", "w2", "b2"):
        if named[name].dtype != torch.float32:
            _fail(f"{name} (probe weight) must be float32, got {named[name].dtype}")
    def width():
        if W1.shape[-1] != D:
            _fail(f"W1 must be [{'P, ' if row_probe is not None else ''}F, {D}]: W1 takes {W1.shape[-1]} input "
                  f"features but the probe reads k={k} layer(s) x H={H} = {D} ({src})")

    if row_probe is None:
        if W1.dim() != 2:
            more = " (stacked [P, F, H] probe weights need row_probe)" if W1.dim() == 3 else ""
            _fail(f"W1 must be [F, H={H}], got shape {tuple(W1.shape)}{more}")
        width()
        F = W1.shape[0]
        if b1.dim() != 1 or b1.shape[0] != F:
            _fail(f"b1 must be [F={F}], got shape {tuple(b1.shape)}")
        if w2.dim() != 1 or w2.shape[0] != F:
            _fail(f"w2 must be [F={F}], got shape {tuple(w2.shape)}")
        if b2.numel() != 1:
            _fail(f"b2 must have exactly one element, got shape {tuple(b2.shape)}")
    else:
        if W1.dim() != 3 or W1.shape[0] < 1:
            _fail(f"with row_probe, W1 must be stacked [P, F, H={H}], got shape {tuple(W1.shape)}")
        width()
        P, F = W1.shape[0], W1.shape[1]
        for name, t in (("b1", b1), ("w2", w2)):
            if tuple(t.shape) != (P, F):
                _fail(f"with row_probe, {name} must be [P={P}, F={F}], got shape {tuple(t.shape)}")
        if b2.dim() != 1 or b2.shape[0] != P:
            _fail(f"with row_probe, b2 must be [P={P}], got shape {tuple(b2.shape)}")
        _index_vector("row_probe", row_probe, dev, S, per, "probe index per row")
    if U.dim() != 2 or U.shape[0] != V:
        _fail(f"U must be [V={V}, r] (V from logits), got shape {tuple(U.shape)}")
    r = U.shape[1]
    if Bt.dim() != 2 or tuple(Bt.shape) != (r, H):
        _fail(f"Bt must be [r={r}, H={H}] (r from U, H from probe_hidden), got shape {tuple(Bt.shape)}")
    for name in ("probe_rows", "head_rows"):
        t = named[name]
        if t.dtype not in _INDEX:
            _fail(f"{name} must be int32 or int64, got {t.dtype}")
        if t.dim() != 1 or t.shape[0] != B:
            _fail(f"{name} must be 1-D of length B={B} (rows of logits), got shape {tuple(t.shape)}")
    for name in ("probe_mask", "latched"):
        t = named[name]
        if t.dtype != torch.bool:
            _fail(f"{name} must be bool, got {t.dtype}")
        if t.dim() != 1 or t.shape[0] != S:
            _fail(f"{name} must be 1-D of length {per}, got shape {tuple(t.shape)}")
    if p_out.dtype != torch.float32:
        _fail(f"p_out must be float32, got {p_out.dtype}")
    if p_out.dim() != 1 or p_out.shape[0] != S:
        _fail(f"p_out must be 1-D of length {per}, got shape {tuple(p_out.shape)}")
    if row_tau is not None:
        if not isinstance(row_tau, Tensor):
            _fail(f"row_tau must be a torch.Tensor or None, got {type(row_tau).__name__}")
        if row_tau.device != dev:
            _fail(f"row_tau is on {row_tau.device} but logits is on {dev}: all tensors must share one device")
        if row_tau.dtype != torch.float32:
            _fail(f"row_tau (per-row threshold) must be float32, got {row_tau.dtype}")
        if row_tau.dim() != 1 or row_tau.shape[0] != S:
            _fail(f"row_tau must be 1-D of length {per}, got shape {tuple(row_tau.shape)}")
    for name in _MUTATES:
        t = named[name]
        if any(st == 0 and sz > 1 for st, sz in zip(t.stride(), t.shape)):
            _fail(f"{name} is written in place and must not be an expanded (stride-0) view")


def steer_step(
    probe_hidden: Tensor,
    probe_rows: Tensor,
    probe_mask: Tensor,
    head_hidden: Tensor,
    head_rows: Tensor,
    logits: Tensor,
    latched: Tensor,
    p_out: Tensor,
    W1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    U: Tensor,
    Bt: Tensor,
    tau: float,
    eps: float,
    nan_latches: bool = False,
    row_tau: Optional[Tensor] = None,
    row_probe: Optional[Tensor] = None, state_rows: Optional[Tensor] = None,
    probe_extra: Sequence[Tensor] = (),
    probe_sum: int = 1,
) -> None:
    """Validate (shapes/dtypes/devices only, no sync), then run ``torch.ops.autosteer.steer_step``.

    Same arguments and semantics as ``steer_step_reference``; ``logits``, ``latched`` and
    ``p_out`` are updated in place. ``row_tau`` (fp32 ``[B]`` on the logits' device, or None):
    row ``b`` latches when ``p_b > row_tau[b]`` and ``tau`` is ignored; None keeps the scalar
    ``tau`` for every row. ``row_probe`` (int32/int64 ``[B]``, or None) with stacked probe weights
    (``W1 [P, F, H]``, ``b1``/``w2 [P, F]``, ``b2 [P]``): row ``b`` is scored by probe
    ``row_probe[b]``. ``state_rows`` (int32/int64 ``[B]``, or None): the per-request tensors
    (``probe_mask``, ``latched``, ``p_out``, ``row_tau``, ``row_probe``) are tables of any length
    ``S`` read and written at entry ``state_rows[b]`` (a serving store's slot tables: a step after a
    batch change stages only the row -> slot map). ``probe_extra`` (a sequence of tensors, each
    ``[N, H]`` like ``probe_hidden``: its dtype and device, any strides) and ``probe_sum`` (1 or 2):
    the probe reads ``k = (1 + len(probe_extra)) / probe_sum`` layers (at most 4) -- layer ``l`` is
    the fp32 sum of ``parts[l * probe_sum : (l + 1) * probe_sum]`` of
    ``parts = [probe_hidden, *probe_extra]`` (a serving engine's (hidden, residual) pair with
    ``probe_sum=2``) -- concatenated into ``k * H`` features, so ``W1`` is ``[F, k * H]`` (stacked
    ``[P, F, k * H]``); the op reads the parts itself (no ``cat`` / ``add`` in the step). Row and probe indices are not range-checked here (that would need the
    values); the CPU kernel checks them. The CUDA kernel never forms an address outside the
    tensors: a probed row whose probe row or probe index is out of range scores NaN (the
    ``nan_latches`` policy then decides), and a latched row whose head row is out of range gets no
    logits writes and ``p_out[b] = NaN`` (see ``kernels/steer_step.py``).

    Under ``torch.compile`` this calls the op (so the graph holds it, and inductor sees the
    Triton kernel). In eager mode, with ``EAGER_FAST_PATH`` (default), it calls the op's
    kernel directly (the C++ op on CPU, the Triton launch on CUDA): the Python
    ADInplaceOrView layer of a custom op with 17 arguments cost ~85 us per call in torch 2.13
    (``torch._library.utils.fill_defaults``), 15x the C++ kernel at decode sizes.
    """
    if probe_extra is None:
        probe_extra = ()
    _validate(probe_hidden, probe_rows, probe_mask, head_hidden, head_rows, logits, latched, p_out,
              W1, b1, w2, b2, U, Bt, tau, eps, nan_latches, row_tau, row_probe, state_rows, probe_extra, probe_sum)
    args = (probe_hidden, probe_rows, probe_mask, head_hidden, head_rows, logits, latched, p_out,
            W1, b1, w2, b2, U, Bt, float(tau), float(eps), nan_latches, row_tau, row_probe, state_rows)
    if len(probe_extra) or probe_sum != 1:  # (else the call the op had before these two arguments, unchanged)
        args += (list(probe_extra), probe_sum)
    if EAGER_FAST_PATH and not torch.compiler.is_compiling():
        if logits.shape[0] == 0:
            return
        kind = logits.device.type
        if kind == "cpu" and _NATIVE is not None:
            torch.ops.autosteer.steer_step_cpu(*args)  # the kernel the op's CPU implementation calls
            return
        if kind == "cuda" and _HAS_TRITON:
            with torch.cuda.device(logits.device):
                _ktriton.run_launches(_ktriton.launch_configs(*args))
            for t in (logits, latched, p_out):  # what the op's ADInplaceOrView kernel would do
                torch.autograd.graph.increment_version(t)
            return
    torch.ops.autosteer.steer_step(*args)


def run_each_variant(op, probes, U: Tensor, Bt: Tensor, tau: float, eps: float, fail_closed: bool, *,
                     hidden_dtype: torch.dtype, layers: int, logits_dtypes=(torch.float32,),
                     state_rows: bool = False) -> int:
    """Call ``op`` (``steer_step`` or a handle's) once per kernel variant a caller will launch, on one dummy latched
    row each (so the blend launch runs too): every logits dtype, every probe of ``probes`` (``(W1, b1, w2, b2,
    row_probe or None)``), with ``layers`` probe operands of ``hidden_dtype``, int64 row indices, and -- with
    ``state_rows`` -- also through an int64 row -> state map. On CUDA this compiles the Triton kernels ahead of the
    first request (the precompile of a handle and of the serving stores). Returns the number of calls."""
    dev, V, H = U.device, U.shape[0], Bt.shape[1]
    h = torch.zeros(1, H, dtype=hidden_dtype, device=dev)
    extra = (h,) * (layers - 1)
    rows = torch.zeros(1, dtype=torch.int64, device=dev)
    calls = 0
    for dt in dict.fromkeys(logits_dtypes):
        logits = torch.zeros(1, V, dtype=dt, device=dev)
        for W1, b1, w2, b2, row_probe in probes:
            for slots in ((None, rows) if state_rows else (None,)):
                op(h, rows, torch.ones(1, dtype=torch.bool, device=dev), h, rows, logits,
                   torch.ones(1, dtype=torch.bool, device=dev), torch.zeros(1, device=dev), W1, b1, w2, b2, U, Bt,
                   tau, eps, fail_closed, row_probe=row_probe, state_rows=slots, probe_extra=extra)
                calls += 1
    return calls
