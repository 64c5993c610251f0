"""Counting the torch ops and host-syncing calls that AutoSteer's own code makes (issue 19, item 3).

Shared by ``tests/test_step_ops.py`` (the transformers path) and ``tests/test_serving_step_ops.py``
(the vLLM and TGI state stores). Two torch modes record what reaches torch:

- :class:`OpLog` (a ``TorchDispatchMode``) records every op reaching the dispatcher (aten ops, views
  included, and the custom op ``autosteer::steer_step_cpu``; the op's own internals are not seen: they
  run below the mode), plus a "host sync" entry for a boolean-mask index (it calls ``nonzero``) and for a
  device -> host copy;
- :class:`CallLog` (a ``TorchFunctionMode``) records the Python-level calls which read a tensor's values
  on the host (``.tolist()``, ``.item()``, ``bool(t)``, ``.cpu()``, ``.numpy()``, ...): on a CPU tensor
  some of them never reach the dispatcher, on a GPU every one of them waits for the device.

Both take an optional ``keep()`` predicate deciding, per op, whether it is logged. The transformers test
pushes the modes only while the plugin's own hooks and processor run (no predicate); the serving test
keeps them pushed for a whole simulated server run and logs an op only when :func:`called_by_autosteer`
says the Python code that issued it is AutoSteer's (the nearest frame outside torch and the standard
library is a file of the ``autosteer`` package): the engine's own forward, sampling and bookkeeping,
which run around and between the plugin's calls, are never counted, and nothing is subtracted.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import sysconfig

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import autosteer

#: dispatcher ops that read device values on the host (a device -> host copy and a wait on a GPU)
HOST_SYNC_OPS = {"aten.equal", "aten.item", "aten._local_scalar_dense", "aten.nonzero", "aten.nonzero_static",
                 "aten.is_nonzero", "aten.masked_select", "aten.allclose", "aten._unique", "aten._unique2",
                 "aten.unique_dim", "aten.unique_consecutive", "aten.bincount", "aten.repeat_interleave"}
#: Python-level tensor methods that read values on the host
HOST_SYNC_CALLS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "__complex__", "numpy", "cpu",
                   "equal", "allclose", "nonzero"}


def op_name(func) -> str:
    """``aten.view`` for ``aten.view.default``: the op, whatever its overload."""
    return str(getattr(func, "overloadpacket", func))


def host_syncs(ops: list, calls: list) -> list:
    """The host-syncing entries of one step's logs."""
    return [o for o in ops if o in HOST_SYNC_OPS or "host sync" in o] + list(calls)


class OpLog(TorchDispatchMode):
    def __init__(self, log, keep=None):
        super().__init__()
        self.log = log  # a list, or a callable returning the list to append to
        self.keep = keep

    def _target(self):
        return self.log() if callable(self.log) else self.log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.keep is None or self.keep():
            log = self._target()
            name = op_name(func)
            log.append(name)
            if name == "aten.index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                            for i in args[1] if i is not None):
                log.append("aten.index(bool mask): host sync")  # a boolean mask index calls nonzero
            if name in ("aten._to_copy", "aten.copy_"):
                src = args[1] if name == "aten.copy_" else args[0]
                dst_dev = args[0].device if name == "aten.copy_" else kwargs.get("device", src.device)
                if src.device.type != "cpu" and torch.device(dst_dev).type == "cpu":
                    log.append("device->host copy: host sync")
        return func(*args, **kwargs)


class CallLog(TorchFunctionMode):
    def __init__(self, log, keep=None):
        super().__init__()
        self.log = log
        self.keep = keep

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if (name in HOST_SYNC_CALLS or name == "to") and (self.keep is None or self.keep()):
            log = self.log() if callable(self.log) else self.log
            if name in HOST_SYNC_CALLS:
                log.append(f"{name}()")
            elif any(str(a).startswith("cpu") for a in (*args[1:], *(kwargs or {}).values())):
                log.append("to(cpu)")
        return func(*args, **(kwargs or {}))


# ------------------------------------------------------------------------------------------------
# attribution by call site

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_STDLIB_DIRS = tuple({os.path.realpath(sysconfig.get_paths()[k]) + os.sep for k in ("stdlib", "platstdlib")})
_PACKAGE_DIRS = tuple({os.path.realpath(sysconfig.get_paths()[k]) + os.sep for k in ("purelib", "platlib")})
_PLUGIN_DIRS = tuple({os.path.dirname(os.path.realpath(p)) + os.sep for p in (
    autosteer.__file__, importlib.util.find_spec("autosteer.kernels").origin)})
_THIS = os.path.realpath(__file__)
_cache: dict = {}


def _kind(filename: str) -> str:
    """'skip' (torch, the standard library, this module), 'plugin' (autosteer) or 'other' for a code file."""
    k = _cache.get(filename)
    if k is None:
        path = os.path.realpath(filename) if not filename.startswith("<") else filename
        if (path.startswith(_TORCH_DIR) or path == _THIS
                or (path.startswith(_STDLIB_DIRS) and not path.startswith(_PACKAGE_DIRS))):
            k = "skip"
        elif path.startswith(_PLUGIN_DIRS):
            k = "plugin"
        else:
            k = "other"
        _cache[filename] = k
    return k


def called_by_autosteer() -> bool:
    """Whether the op being dispatched was issued by AutoSteer's code: the nearest Python frame that is
    not torch's, the standard library's or this module's belongs to the ``autosteer`` package."""
    f = sys._getframe(1)
    while f is not None:
        k = _kind(f.f_code.co_filename)
        if k != "skip":
            return k == "plugin"
        f = f.f_back
    return False


class PluginSteps:
    """Records AutoSteer's ops and host-syncing calls over a whole simulated server run, cut into steps.

    Use as a context manager around the run; the driver calls :meth:`cut` once per engine step, right
    after the plugin's last call of that step (the logits processor's return): everything AutoSteer's
    code dispatched since the previous cut -- the batch-update bookkeeping before the step, the capture
    hooks in the forward, the processor -- becomes ``steps[i] = (ops, calls, tag)``."""

    def __init__(self):
        self.steps: list[tuple[list, list, object]] = []
        self._ops: list = []
        self._calls: list = []
        self._modes = None
        self._paused = 0

    def _keep(self) -> bool:
        return not self._paused and called_by_autosteer()

    @contextlib.contextmanager
    def paused(self):
        """Nothing is recorded inside (a test reading the plugin's state for its own checks)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def cut(self, tag=None) -> None:
        self.steps.append((self._ops, self._calls, tag))
        self._ops, self._calls = [], []

    def __enter__(self):
        self._modes = (CallLog(lambda: self._calls, self._keep), OpLog(lambda: self._ops, self._keep))
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)
        self._modes = None
        return False
