"""Framework-neutral pieces for running AutoSteer inside a serving engine (TGI, vLLM, ...).

A serving engine differs from ``model.generate`` in three ways that matter here:

- **the batch changes every step**: requests join (prefill), leave (finished, cancelled) and
  move between rows; batches are filtered and concatenated. A request's gate decision (its
  *latch*) must follow the request, not the row. :class:`SteerStateStore` keeps it keyed by
  request id, in a device-side slot table, so reading or updating it never syncs the host.
- **hidden states are flattened**: prefill runs ``[total_tokens, H]`` with each sequence's
  newest token at ``cu_seqlens[1:] - 1``; decode runs ``[B, H]``, or ``[B * P, H]`` with
  speculation (``P = S + 1`` positions per sequence, row ``b * P + j``). Chunked prefill runs
  the sampler on rows whose prompt is not finished and throws their tokens away: those rows
  must neither latch nor be steered.
- **CUDA graphs**: a decode step replayed from a CUDA graph runs no Python at all (see the
  contract below), so the captured hidden states must land in preallocated buffers *in place*.

Per step an integration does::

    store.begin_step(request_ids, cu_seqlens=..., prefilling=..., still_prefilling=..., positions=P)
    for j in range(P):                       # once per speculative position (P = 1 without)
        store.apply(logits_j, probe_hidden=probe_buf.view(), head_hidden=head_buf.view())
    store.end_step(accepted=accepted_ids)    # commits each request's latch; None = all P
    ...
    store.release(request_id)                # finished / cancelled request: its slot is freed

``apply`` is one call of the fused ``steer_step`` op (C++ on CPU, Triton on CUDA) on the
rows of this step; everything else is a handful of small device ops on preallocated buffers
plus **one** host-to-device copy of a small int64 vector per step (slots, row flags and, when
given as host lists, the prefill offsets / head rows; the vLLM processor adds one more small copy,
of prompt lengths, on steps after its batch changed; from pageable memory, which CUDA may stage
with a stream synchronisation -- unmeasured). Nothing reads a device value back:
no ``.item()``, ``.tolist()``, ``bool(tensor)`` or blocking copy in the step path. The only
syncing calls are the reporting ones (:meth:`SteerStateStore.summary`, ``on_release`` with
``report=True``).

CUDA-graph contract (for :class:`HiddenBuffer` and the hooks below)
------------------------------------------------------------------
A CUDA graph records the *device work* issued while it was captured and replays exactly that
work, on exactly the same memory, on every replay. Python code -- including ``nn.Module``
hooks -- runs only during capture. Therefore:

1. Register the hooks **before** the engine captures its graphs (before warmup). A hook
   registered later is never part of a graph: replayed steps would leave the buffers stale.
2. A hook must express what it captures as device work **into memory that outlives the
   graph**: :meth:`HiddenBuffer.write` / :meth:`HiddenBuffer.write_sum` do
   ``torch.add(a, b, out=buf[:n])`` / ``buf[:n].copy_(x)`` on a buffer allocated once, at a
   fixed address. Keeping a *reference* to the hook's input (what eager code can do) is wrong
   under graphs: the reference points at the graph's private pool, which is reused.
3. Nothing the step driver needs may come from Python state set by the hook. In particular
   the number of valid rows comes from the engine's batch metadata, not from the hook. The
   buffer's Python fields (``overflow``, ``writes``) are advisory: they are only updated when
   the hook actually runs (eager forward or capture).
4. A graph captured for a padded batch of ``n_graph`` rows writes ``buf[:n_graph]`` on every
   replay; rows past the real batch hold padding garbage and are never read.
5. An eager forward with more rows than the buffer holds (a long prefill) cannot be a graph
   replay; the hook then keeps the freshly computed tensor as ``overflow`` for this forward.
   Call :meth:`HiddenBuffer.begin_forward` before every forward so that a stale ``overflow``
   from an earlier eager forward is never read after a replayed step.
6. Capacity must be at least the largest graph's row count (TGI: ``max(CUDA_GRAPHS)`` token
   rows, i.e. ``B * (S + 1)`` with speculation); writes inside a capture that do not fit raise.

The buffers are read on the same stream after the forward, so stream order makes the data
visible without any synchronisation.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from ..method.probe import Probe
from ..runtime.reference_op import refusal_basis

log = logging.getLogger(__name__)

MODES = ("prefill", "monitor")
ENV_MONITOR_WINDOW = "AUTOSTEER_MONITOR_WINDOW"


def _unset(value) -> bool:
    """An environment / server-config value that was not given (None, empty or blank)."""
    return value is None or (isinstance(value, str) and not value.strip())


def parse_monitor_window(value, source: str = ENV_MONITOR_WINDOW) -> int | None:
    """A monitor-window setting from the environment or a server config: unset/empty -> None (the
    pack's window), else an int >= 0 (0: probe every generated token). Bad values raise ValueError
    naming ``source``."""
    if _unset(value):
        return None
    try:
        n = int(str(value).strip())
    except ValueError:
        raise ValueError(f"{source}={value!r} is not an integer (generated tokens monitor mode probes; 0: all)") from None
    if n < 0:
        raise ValueError(f"{source}={value!r} must be >= 0 (0: probe every generated token)")
    return n

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_flag(value, source: str, default: bool) -> bool:
    """An on/off setting from the environment or a server config: unset/empty -> ``default``;
    ``1/true/yes/on`` or ``0/false/no/off`` (any case; Python bools too). Anything else raises
    ValueError naming ``source`` -- a typo must not flip a safety setting silently."""
    if _unset(value):
        return default
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"{source}={value!r} is not a boolean (use 1/true/yes/on or 0/false/no/off)")


def parse_threshold(value, source: str) -> float | None:
    """A probability threshold from the environment or a server config: unset/empty -> None (the
    pack's), else a float in ``[0, 1]``; anything else raises ValueError naming ``source``."""
    if _unset(value):
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        t = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ValueError(f"{source}={value!r} is not a number (a probability threshold in [0, 1])") from None
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"{source}={value!r} is not a probability threshold in [0, 1] (above 1 the gate never fires, "
                         "below 0 it steers every request)")
    return t


# per-row phases for begin_step(phase=...): decided on the device (vLLM knows them only there)
PHASE_DECODE = 0  # the row's newest token is a generated one
PHASE_PREFILL_LAST = 1  # this forward ran the prompt's last token
PHASE_PREFILL_MID = 2  # this forward ran prompt tokens but not the last one: the sampled token is discarded

# row flags (host -> device, one int64 per row)
_ACTIVE = 1  # the row's token is kept (not a discarded mid-prefill chunk): it may latch and be steered
_PROBE = 2  # probe this row at position 0 of this step
_FINAL_PREFILL = 4  # the row's prompt finished in this forward (its prompt score is recorded)
_NEW = 8  # the request's slot was (re)allocated this step: reset its device state first


# ---------------------------------------------------------------------------------------------
# weights


@dataclass
class SteerWeights:
    """The pack's tensors on the serving device, in the form ``steer_step`` reads them.

    ``U = E A`` (``[V, r]``) is computed once from the engine's output embedding ``E``
    (``[V, H]``, the weight of the layer producing the logits), ``Bt = B^T`` (``[r, H]``).
    """

    W1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    U: torch.Tensor
    Bt: torch.Tensor
    tau: float
    eps: float
    fail_closed: bool
    layer: int
    # threshold for generated tokens in monitor mode; None: a prefill-only pack (tau is used, with a warning)
    tau_monitor: float | None = None
    # (W1 [2, F, H], b1 [2, F], w2 [2, F], b2 [2]): prefill probe and monitor probe stacked, for
    # monitor mode's one-launch step (row_probe picks per row); None: the pack has no monitor probe
    stacked: tuple | None = None
    # monitor mode probes a request's first monitor_window generated tokens (None: all of them)
    monitor_window: int | None = None

    @property
    def monitor_tau(self) -> float:
        return self.tau if self.tau_monitor is None else self.tau_monitor

    @classmethod
    def from_pack(cls, pack, E: torch.Tensor, *, tau: float | None = None, fail_closed: bool = True,
                  device: torch.device | str | None = None, tau_monitor: float | None = None,
                  monitor_window: int | None = None) -> "SteerWeights":
        from ..method.pack import PackError, monitor_threshold, prompt_threshold
        from ..method.pack import monitor_window as _window

        if E.dim() != 2 or not E.is_floating_point():
            raise PackError(f"the output embedding must be a float [V, H] matrix, got {E.dtype} {tuple(E.shape)}")
        if E.shape[1] != pack.hidden_size:
            raise PackError(f"pack hidden size {pack.hidden_size} does not match the model's {E.shape[1]}")
        device = torch.device(device) if device is not None else E.device
        tau = prompt_threshold(pack, tau)
        tau_monitor, fallback = monitor_threshold(pack, tau, tau_monitor)
        tau_monitor = None if fallback else tau_monitor
        U = refusal_basis(E, pack.A, device=device)  # in vocabulary blocks: no fp32 copy of the whole E
        return cls(
            W1=pack.W1.to(device).contiguous(), b1=pack.b1.to(device).contiguous(),
            w2=pack.w2.to(device).contiguous(), b2=pack.b2.to(device).contiguous(),
            U=U, Bt=pack.B.t().contiguous().to(device), tau=tau, eps=float(pack.eps),
            tau_monitor=tau_monitor, fail_closed=bool(fail_closed), layer=pack.layer,
            stacked=tuple(t.to(device).contiguous() for t in pack.stacked_probes()) if pack.has_monitor_probe else None,
            monitor_window=_window(pack, monitor_window),
        )

    @property
    def device(self) -> torch.device:
        return self.U.device

    def probe_scores(self, h: torch.Tensor) -> torch.Tensor:
        """The probe alone on rows ``h`` ([n, H]); for reports and tests (the step uses the op)."""
        return Probe(self.W1, self.b1, self.w2, self.b2).score(h)

    def monitor_probe_scores(self, h: torch.Tensor) -> torch.Tensor:
        """What monitor mode scores generated-token rows ``h`` with: the monitor probe, or the
        prefill probe for a pack without one."""
        if self.stacked is None:
            return self.probe_scores(h)
        return Probe(*(t[1] for t in self.stacked)).score(h)


class _FingerprintView(torch.nn.Module):
    """Just enough of a transformers model for ``model_fingerprint``: an engine's own model class
    (TGI's ``FlashLlamaForCausalLM``, vLLM's ``LlamaForCausalLM``) is not a transformers model."""

    def __init__(self, E: torch.Tensor, num_layers: int, model_type: str):
        super().__init__()
        self.config = SimpleNamespace(model_type=model_type)
        head = torch.nn.Linear(1, 1, bias=False)
        head.weight = torch.nn.Parameter(E.detach(), requires_grad=False)  # no copy
        self._head = head
        self.model = SimpleNamespace(layers=torch.nn.ModuleList(torch.nn.Identity() for _ in range(num_layers)))

    def get_output_embeddings(self):
        return self._head


def check_pack_matches(pack, E: torch.Tensor, *, num_layers: int, model_type: str) -> None:
    """:func:`autosteer.method.pack.check_fingerprint` for an engine's model, given its output
    embedding ``E`` ([V, H], unsharded), layer count and ``config.model_type``. Raises PackError."""
    from ..method.pack import PackError, check_fingerprint

    check_fingerprint(pack.meta["fingerprint"], _FingerprintView(E, num_layers, model_type))
    if pack.layer >= num_layers:
        raise PackError(f"pack layer {pack.layer} does not exist in a model with {num_layers} layers")


# ---------------------------------------------------------------------------------------------
# hidden-state capture into preallocated buffers


class HiddenBuffer:
    """A preallocated ``[capacity, H]`` buffer that capture hooks write in place.

    See the CUDA-graph contract in the module docstring. :meth:`view` is what the step driver
    reads: the buffer itself, or the ``overflow`` tensor of an eager forward that did not fit.
    """

    def __init__(self, capacity: int, hidden: int, dtype: torch.dtype, device: torch.device | str, name: str = "hidden"):
        if capacity < 1:
            raise ValueError("HiddenBuffer capacity must be >= 1")
        self.name = name
        self.buf = torch.zeros(capacity, hidden, dtype=dtype, device=device)
        self.overflow: torch.Tensor | None = None
        self.writes = 0  # Python-side count of hook calls (advisory: graph replays do not count)

    @property
    def capacity(self) -> int:
        return self.buf.shape[0]

    def begin_forward(self) -> None:
        """Call before each forward: forget an eager forward's overflow tensor."""
        self.overflow = None

    @staticmethod
    def _capturing(t: torch.Tensor) -> bool:
        return t.is_cuda and torch.cuda.is_current_stream_capturing()

    def _check_fits(self, n: int, t: torch.Tensor) -> bool:
        if n <= self.capacity:
            return True
        if self._capturing(t):
            raise RuntimeError(
                f"autosteer: a CUDA graph is being captured with {n} rows but the {self.name} buffer holds "
                f"{self.capacity}: size it for the largest graph (see the CUDA-graph contract)")
        return False

    def write(self, x: torch.Tensor) -> None:
        """Store ``x`` ([n, H], or anything that flattens to rows of H) for this forward."""
        x = x.reshape(-1, x.shape[-1])
        n = x.shape[0]
        self.writes += 1
        if self._check_fits(n, x):
            self.buf[:n].copy_(x)
        else:
            self.overflow = x

    def write_sum(self, a: torch.Tensor, b: torch.Tensor | None) -> None:
        """Store ``a + b`` (the residual stream from a fused add-norm layer's two outputs) in one kernel."""
        if b is None:
            self.write(a)
            return
        a = a.reshape(-1, a.shape[-1])
        b = b.reshape(-1, b.shape[-1])
        n = a.shape[0]
        self.writes += 1
        if self._check_fits(n, a):
            torch.add(a, b, out=self.buf[:n])
        else:
            self.overflow = a + b

    def view(self) -> torch.Tensor:
        return self.overflow if self.overflow is not None else self.buf


def hook_output_sum(module: torch.nn.Module, buffer: HiddenBuffer, check: Callable[[object], None] | None = None):
    """Forward hook storing ``out[0] + out[1]`` of ``module`` (a decoder layer returning the two
    halves of the residual stream, e.g. TGI's ``(mlp_out, attn_res)``, vLLM's ``(hidden, residual)``).
    The sum is computed inside the hook: the next layer may overwrite either half in place."""

    def _hook(_mod, _args, out):
        if check is not None:
            check(out)
        buffer.write_sum(out[0], out[1])

    return module.register_forward_hook(_hook)


def hook_input(module: torch.nn.Module, buffer: HiddenBuffer, index: int = 0, add_index: int | None = None,
               check: Callable[[tuple], None] | None = None):
    """Forward pre-hook storing positional input ``index`` of ``module`` (plus input ``add_index``
    when given and not None: a layer called as ``layer(hidden, residual, ...)``)."""

    def _hook(_mod, args):
        if check is not None:
            check(args)
        extra = args[add_index] if add_index is not None and len(args) > add_index else None
        buffer.write_sum(args[index], extra)

    return module.register_forward_pre_hook(_hook)


# ---------------------------------------------------------------------------------------------
# per-request state and the step driver


@dataclass
class RequestSteerState:
    """Host-side record of one request. The latch, scores and token counts live on the device
    (slot ``slot`` of the store's tables): read them with :meth:`SteerStateStore.summary`."""

    request_id: Hashable
    slot: int
    prefill_done: bool = False  # the request's last prompt chunk has been through a step
    steps: int = 0  # steps in which this request produced a kept token
    extra: dict = field(default_factory=dict)  # integration-specific data


@dataclass
class SteerSummary:
    request_id: Hashable
    latched: bool
    p_unsafe: float  # probe score of the last prompt token (NaN: never probed)
    p_last: float  # latest probe score (monitor mode)
    latched_at: int  # index of the first steered generated token, -1 if never
    tokens: int  # tokens generated (kept) so far
    prefill_done: bool
    steps: int


class SteerStateStore:
    """Per-request AutoSteer state plus the per-step driver around ``steer_step``.

    ``mode``: ``"prefill"`` (the gate is decided once, at the request's last prompt token) or
    ``"monitor"`` (every generated token is probed again; the first trigger latches).
    ``max_batch`` / ``max_positions`` size the per-step buffers (rows of ``logits`` per step,
    speculative positions per row); ``max_requests`` sizes the slot table. All grow on demand
    (outside the step's device work: growing allocates, which a CUDA graph never sees because
    the driver runs eagerly around the graph).

    ``on_release(request_id, summary_or_None)``: called by :meth:`release`; with
    ``report_on_release=True`` it receives a :class:`SteerSummary` (a host sync per request).
    """

    def __init__(self, weights: SteerWeights, *, mode: str = "prefill", max_batch: int = 64, max_positions: int = 1,
                 max_requests: int | None = None, on_release: Callable | None = None,
                 report_on_release: bool = False):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        from ..runtime.op import steer_step

        self._op = steer_step
        self.w = weights
        self.mode = mode
        self.device = weights.device
        self.on_release = on_release
        self.report_on_release = report_on_release
        self._requests: dict[Hashable, RequestSteerState] = {}
        self._free: list[int] = []
        self._alloc_slots(max(int(max_requests or 4 * max_batch), 1))
        self._alloc_step(max(int(max_batch), 1), max(int(max_positions), 1))
        self._step: SimpleNamespace | None = None
        self._warned_missed_prefill = False
        if mode == "monitor" and weights.tau_monitor is None:
            from ..method.pack import warn_monitor_fallback

            warn_monitor_fallback()

    # -- buffers ------------------------------------------------------------------------------
    def _alloc_slots(self, n: int) -> None:
        dev = self.device
        old = getattr(self, "_slot_latched", None)
        new = {
            "_slot_latched": torch.zeros(n, dtype=torch.bool, device=dev),
            "_slot_p_unsafe": torch.full((n,), math.nan, dtype=torch.float32, device=dev),
            "_slot_p_last": torch.full((n,), math.nan, dtype=torch.float32, device=dev),
            "_slot_tokens": torch.zeros(n, dtype=torch.int32, device=dev),
            "_slot_latched_at": torch.full((n,), -1, dtype=torch.int32, device=dev),
        }
        start = 0
        if old is not None:
            start = old.shape[0]
            for name, t in new.items():
                t[:start].copy_(getattr(self, name))
            log.info("autosteer: slot table grown from %d to %d requests", start, n)
        for name, t in new.items():
            setattr(self, name, t)
        self._free.extend(range(n - 1, start - 1, -1))  # pop() hands out the lowest slot first

    def _alloc_step(self, rows: int, positions: int) -> None:
        dev = self.device
        self._max_rows, self._max_pos = rows, positions
        self._meta = torch.zeros(4 * rows + 1, dtype=torch.int64, device=dev)  # slots|flags|cu(B+1)|head rows
        # [position, row]: position j of the step is a contiguous [B] vector
        self._lat = torch.zeros(positions, rows, dtype=torch.bool, device=dev)
        self._pout = torch.full((positions, rows), math.nan, dtype=torch.float32, device=dev)
        self._probe = torch.zeros(rows, dtype=torch.bool, device=dev)
        self._pmask = torch.zeros(positions, rows, dtype=torch.bool, device=dev)  # probe mask per position
        self._no_probe = torch.zeros(rows, dtype=torch.bool, device=dev)
        self._rows = torch.zeros(rows, dtype=torch.int64, device=dev)  # prefill probe rows
        self._grid = torch.arange(rows * positions, dtype=torch.int64, device=dev)  # b * P + j
        # monitor mode: per-row thresholds (a row's last prompt token: tau; a generated token: tau_monitor)
        self._tau_pre = torch.full((rows,), self.w.tau, dtype=torch.float32, device=dev)
        self._tau_mon = torch.full((rows,), self.w.monitor_tau, dtype=torch.float32, device=dev)
        self._row_tau = torch.empty(rows, dtype=torch.float32, device=dev)
        # ... and per-row probes when the pack has a monitor probe (0: prefill probe, 1: monitor probe)
        self._row_probe = torch.empty(rows, dtype=torch.int32, device=dev)
        self._probe_mon = torch.ones(rows, dtype=torch.int32, device=dev)

    # -- request bookkeeping ------------------------------------------------------------------
    def __contains__(self, request_id) -> bool:
        return request_id in self._requests

    def __len__(self) -> int:
        return len(self._requests)

    @property
    def request_ids(self) -> list:
        return list(self._requests)

    def state(self, request_id) -> RequestSteerState:
        return self._requests[request_id]

    def _get_or_add(self, request_id) -> tuple[RequestSteerState, bool]:
        st = self._requests.get(request_id)
        if st is not None:
            return st, False
        if not self._free:
            self._alloc_slots(2 * self._slot_latched.shape[0])
        st = RequestSteerState(request_id, self._free.pop())
        self._requests[request_id] = st
        return st, True

    def release(self, request_id, *, report: bool = True) -> bool:
        """Free a finished request's state. Unknown ids are ignored (returns False). ``report=False``: no
        summary for ``on_release`` (no device read), whatever ``report_on_release`` says."""
        st = self._requests.get(request_id)
        if st is None:
            return False
        if self._step is not None and request_id in self._step.index:
            raise RuntimeError(f"autosteer: request {request_id!r} released in the middle of a step")
        summary = (self.summary(request_id) if (report and self.on_release is not None and self.report_on_release)
                   else None)
        del self._requests[request_id]
        self._free.append(st.slot)
        if self.on_release is not None:
            self.on_release(request_id, summary)
        return True

    def release_all(self, *, report: bool = True) -> None:
        self.abort_step()
        for rid in list(self._requests):
            self.release(rid, report=report)

    def force_latch(self, request_id) -> None:
        """Latch a request outside a step (fail closed when an integration cannot tell whose state is whose):
        its later rows are steered; ``latched_at`` is set to its tokens so far if it had not latched."""
        if self._step is not None and request_id in self._step.index:
            raise RuntimeError(f"autosteer: request {request_id!r} latched by hand in the middle of a step")
        s = self._requests[request_id].slot
        self._slot_latched_at[s] = torch.where(self._slot_latched[s], self._slot_latched_at[s], self._slot_tokens[s])
        self._slot_latched[s] = True

    def summary(self, request_id) -> SteerSummary:
        """The request's gate decision and scores (reads the device: a host sync)."""
        st = self._requests[request_id]
        s = st.slot
        vals = torch.stack([self._slot_latched[s].float(), self._slot_p_unsafe[s], self._slot_p_last[s],
                            self._slot_latched_at[s].float(), self._slot_tokens[s].float()]).tolist()
        return SteerSummary(request_id, bool(vals[0]), vals[1], vals[2], int(vals[3]), int(vals[4]),
                            st.prefill_done, st.steps)

    # -- the step -----------------------------------------------------------------------------
    @property
    def in_step(self) -> bool:
        return self._step is not None

    def abort_step(self) -> None:
        """Drop an open step without committing anything (the engine raised mid-step)."""
        self._step = None

    def begin_step(self, request_ids: Sequence[Hashable], *, positions: int = 1,
                   cu_seqlens: torch.Tensor | Sequence[int] | None = None,
                   prefilling: Sequence[bool] | None = None, still_prefilling: Sequence[bool] | None = None,
                   head_rows: torch.Tensor | Sequence[int] | None = None, phase: torch.Tensor | None = None) -> None:
        """Map this step's logits rows to requests and stage the step's indices on the device.

        ``request_ids[b]``: the request in logits row ``b`` (new ids get a fresh slot).
        ``positions``: logits positions per sequence (``S + 1`` with ``S`` speculative tokens);
        :meth:`apply` is then called ``positions`` times, position ``j`` reading hidden row
        ``b * positions + j``.
        ``cu_seqlens``: for a flattened (prefill) forward, ``[B + 1]`` offsets of each sequence's
        tokens in the probe hidden rows (host list or device tensor); the probe reads row
        ``cu_seqlens[b + 1] - 1``. ``positions`` must then be 1.
        ``prefilling[b]``: the row ran prompt tokens in this forward (default: all rows when
        ``cu_seqlens`` is given, else none). ``still_prefilling[b]``: its prompt is *not* finished
        after this chunk -- its sampled token is discarded, so it neither latches nor is steered.
        ``head_rows``: row of the head hidden state per sequence (default ``b * positions + j``,
        i.e. ``b`` for a prefill whose lm_head ran on the last token of each sequence only).
        ``phase``: a device tensor ``[B]`` of ``PHASE_*`` values replacing ``prefilling`` /
        ``still_prefilling`` when only the device knows them (vLLM: from sequence and prompt
        lengths); the host-side ``prefill_done`` / ``steps`` are then not maintained.
        """
        if self._step is not None:
            raise RuntimeError("autosteer: begin_step called twice without end_step (or abort_step)")
        B = len(request_ids)
        P = int(positions)
        if P < 1:
            raise ValueError(f"positions must be >= 1, got {positions}")
        if len(set(request_ids)) != B:
            raise ValueError("autosteer: a request id appears twice in one step")
        if cu_seqlens is not None and P != 1:
            raise ValueError("a flattened prefill step (cu_seqlens) has one position per sequence")
        if phase is not None and (prefilling is not None or still_prefilling is not None):
            raise ValueError("pass either phase (device) or prefilling/still_prefilling (host), not both")
        prefilling = [cu_seqlens is not None] * B if prefilling is None else [bool(x) for x in prefilling]
        still = [False] * B if still_prefilling is None else [bool(x) for x in still_prefilling]
        if len(prefilling) != B or len(still) != B:
            raise ValueError("prefilling / still_prefilling must have one entry per row")
        if B > self._max_rows or P > self._max_pos:
            self._alloc_step(max(B, 2 * self._max_rows if B > self._max_rows else self._max_rows),
                             max(P, self._max_pos))
        bad = [b for b in range(B) if still[b] and not prefilling[b]]
        if bad:
            raise ValueError(f"rows {bad}: still_prefilling without prefilling")
        # every check before any request is registered: a refused step must leave no new request
        # behind (it would skip its slot reset on the next step and inherit the slot's old state)
        for name, value, need in (("cu_seqlens", cu_seqlens, B + 1), ("head_rows", head_rows, B), ("phase", phase, B)):
            if value is None:
                continue
            n = value.numel() if isinstance(value, torch.Tensor) else len(value)
            if n < need or (name == "head_rows" and not isinstance(value, torch.Tensor) and n != need):
                raise ValueError(f"{name} has {n} entries, need {'B + 1' if name == 'cu_seqlens' else 'B'} = {need}")
        host = []
        flags = []
        any_new = False
        for b, rid in enumerate(request_ids):
            st, new = self._get_or_add(rid)
            any_new |= new
            f = _NEW if new else 0
            if phase is not None:
                pass  # decided on the device below
            elif not still[b]:
                f |= _ACTIVE
                if prefilling[b]:
                    f |= _PROBE | _FINAL_PREFILL
                elif not st.prefill_done:
                    # never saw this request's prompt (joined by a path the integration missed):
                    # score its newest token once rather than leave it ungated.
                    if not self._warned_missed_prefill:
                        log.warning("autosteer: request %r reached a decode step without a recorded prefill; "
                                    "probing its newest token instead of its last prompt token", rid)
                        self._warned_missed_prefill = True
                    f |= _PROBE
                elif self.mode == "monitor":
                    f |= _PROBE
            host.append(st.slot)
            flags.append(f)
        host.extend(flags)
        n_cu = n_head = 0
        cu_dev = head_dev = None
        if cu_seqlens is not None:
            if isinstance(cu_seqlens, torch.Tensor):
                cu_dev = cu_seqlens
            else:
                cu = list(cu_seqlens)
                host.extend(int(x) for x in cu[: B + 1])
                n_cu = B + 1
        if head_rows is not None:
            if isinstance(head_rows, torch.Tensor):
                head_dev = head_rows[:B]
            else:
                hr = list(head_rows)
                host.extend(int(x) for x in hr)
                n_head = B
        # the step's only host->device transfer. Its source is pageable: CUDA stages it through pinned
        # memory and documents that it *may* synchronise with the stream there (not measured: no GPU
        # run yet; a pinned ring buffer would rule it out)
        meta = self._meta[: len(host)]
        if B:
            meta.copy_(torch.tensor(host, dtype=torch.int64), non_blocking=True)
        slots = meta[:B]
        fl = meta[B: 2 * B]
        off = 2 * B
        if n_cu:
            cu_dev = meta[off: off + n_cu]
            off += n_cu
        if n_head:
            head_dev = meta[off: off + n_head]
        if phase is not None:
            ph = phase.reshape(-1)[:B].to(device=self.device, dtype=torch.int64)
            decode_bits = _ACTIVE | (_PROBE if self.mode == "monitor" else 0)
            bits = torch.where(ph == PHASE_DECODE, decode_bits,
                               torch.where(ph == PHASE_PREFILL_LAST, _ACTIVE | _PROBE | _FINAL_PREFILL, 0))
            fl = (fl & _NEW) | bits
        active = (fl & _ACTIVE) != 0
        if any_new:  # fresh slots start clean (a freed slot may hold an old request's values)
            new = (fl & _NEW) != 0
            for name, init in (("_slot_latched", False), ("_slot_p_unsafe", math.nan), ("_slot_p_last", math.nan),
                               ("_slot_tokens", 0), ("_slot_latched_at", -1)):
                table = getattr(self, name)
                table.index_copy_(0, slots, torch.where(new, torch.full_like(table[:1], init), table.index_select(0, slots)))
        probe = self._probe[:B]
        torch.ne(fl & _PROBE, 0, out=probe)
        tok0 = None  # tokens generated before this step (monitor window only)
        if self.mode == "monitor":
            final_prefill = (fl & _FINAL_PREFILL) != 0
            torch.where(final_prefill, self._tau_pre[:B], self._tau_mon[:B], out=self._row_tau[:B])
            if self.w.stacked is not None:
                self._row_probe[:B].copy_((~final_prefill).to(torch.int32))
            if self.w.monitor_window is not None:  # generated tokens past the window are not probed
                # a row's k-th generated token (0-based) is probed when k + 1 tokens are counted; position
                # j of a speculative step holds generated token (tokens before the step) - 1 + j
                tok0 = self._slot_tokens.index_select(0, slots)
                probe &= final_prefill | (tok0 <= self.w.monitor_window)
        lat0 = self._lat[0, :B]
        torch.index_select(self._slot_latched, 0, slots, out=lat0)
        lat0 &= active
        if cu_dev is not None:
            probe_rows = self._rows[:B]
            torch.sub(cu_dev[1: B + 1], 1, out=probe_rows)
        else:
            probe_rows = None
        self._step = SimpleNamespace(
            B=B, P=P, j=0, request_ids=list(request_ids), index={r: b for b, r in enumerate(request_ids)},
            slots=slots, flags=fl, active=active, probe=probe, probe_rows=probe_rows, head_rows=head_dev,
            host_flags=flags, tok0=tok0,
        )

    def apply(self, logits: torch.Tensor, *, probe_hidden: torch.Tensor, head_hidden: torch.Tensor) -> torch.Tensor:
        """Steer one position of this step's logits (``[B, V]``, any row stride) in place; returns it.

        Call ``positions`` times per step, in position order. Unlatched rows get no writes.
        """
        s = self._step
        if s is None:
            raise RuntimeError("autosteer: apply called outside begin_step/end_step")
        if logits.dim() != 2 or logits.shape[0] != s.B:
            raise ValueError(f"autosteer: this step has {s.B} rows, got logits of shape {tuple(logits.shape)}")
        j = s.j
        if j >= s.P:
            raise RuntimeError(f"autosteer: apply called {j + 1} times in a step with {s.P} position(s)")
        B, P = s.B, s.P
        lat_j = self._lat[j, :B]
        if j > 0:
            lat_j.copy_(self._lat[j - 1, :B])
        grid = self._grid[: B * P].view(B, P)[:, j]
        probe_rows = s.probe_rows if s.probe_rows is not None else grid
        head_rows = s.head_rows if s.head_rows is not None else grid
        mask = s.probe if (j == 0 or self.mode == "monitor") else self._no_probe[:B]
        if j > 0 and s.tok0 is not None:  # speculative position j: generated token tok0 - 1 + j, inside the window?
            mask = mask & (s.tok0 + j <= self.w.monitor_window)
        self._pmask[j, :B].copy_(mask)
        # monitor mode: position 0 holds a row's last prompt token (tau) or a generated one (tau_monitor),
        # later (speculative) positions are generated tokens
        row_tau = None if self.mode != "monitor" else (self._row_tau[:B] if j == 0 else self._tau_mon[:B])
        w = self.w
        W1, b1, w2, b2, row_probe = w.W1, w.b1, w.w2, w.b2, None
        if self.mode == "monitor" and w.stacked is not None:  # ... and the prompt / monitor probe likewise
            W1, b1, w2, b2 = w.stacked
            row_probe = self._row_probe[:B] if j == 0 else self._probe_mon[:B]
        if B:
            self._op(probe_hidden, probe_rows, mask, head_hidden, head_rows, logits, lat_j, self._pout[j, :B],
                     W1, b1, w2, b2, w.U, w.Bt, w.tau, w.eps, w.fail_closed, row_tau=row_tau, row_probe=row_probe)
        s.j = j + 1
        return logits

    def end_step(self, accepted: torch.Tensor | None = None) -> None:
        """Commit the step: each active row's latch (at its last accepted position), its scores
        and token count go back to its request's slot. ``accepted[b]`` (device, >= 1): positions
        kept for row ``b`` (speculative decoding); None: all ``positions``."""
        s = self._step
        if s is None:
            raise RuntimeError("autosteer: end_step without begin_step")
        try:
            if s.j != s.P:
                raise RuntimeError(
                    f"autosteer: the steering processor ran {s.j} of {s.P} position(s) this step: the engine "
                    "skipped it (were the logits processors rebuilt without it?); refusing to continue unsteered")
            B, P = s.B, s.P
            if B == 0:
                return
            slots, active = s.slots, s.active
            if accepted is None or P == 1:
                pos = torch.full((B, 1), P - 1, dtype=torch.int64, device=self.device)
                n_tok = active.to(torch.int32)
            else:
                acc = accepted.to(device=self.device, dtype=torch.int64).reshape(B)
                pos = (acc - 1).clamp(0, P - 1).unsqueeze(1)
                n_tok = torch.where(active, acc, 0).to(torch.int32)
            lat_all = self._lat[:P, :B].t()  # [B, P]
            lat = lat_all.gather(1, pos).squeeze(1)
            old_lat = self._slot_latched.index_select(0, slots)
            new_lat = torch.where(active, lat, old_lat)
            tokens = self._slot_tokens.index_select(0, slots)
            # first steered token: the first position whose latch is set, counted from this step's first token
            first_pos = (~lat_all).to(torch.int32).sum(1)  # latches are cumulative over positions
            fired = new_lat & ~old_lat
            latched_at = torch.where(fired, tokens + first_pos.to(torch.int32),
                                     self._slot_latched_at.index_select(0, slots))
            pout = self._pout[:P, :B].t()
            if self.mode == "monitor":  # the score at the last accepted position, if that position was probed
                p_last_new = pout.gather(1, pos).squeeze(1)
                probed_any = self._pmask[:P, :B].t().gather(1, pos).squeeze(1)
            else:
                p_last_new = pout[:, 0]
                probed_any = s.probe
            p_last = torch.where(probed_any & active, p_last_new, self._slot_p_last.index_select(0, slots))
            final_prefill = (s.flags & _FINAL_PREFILL) != 0
            p_unsafe = torch.where(final_prefill, pout[:, 0], self._slot_p_unsafe.index_select(0, slots))
            self._slot_latched.index_copy_(0, slots, new_lat)
            self._slot_latched_at.index_copy_(0, slots, latched_at)
            self._slot_p_last.index_copy_(0, slots, p_last)
            self._slot_p_unsafe.index_copy_(0, slots, p_unsafe)
            self._slot_tokens.index_copy_(0, slots, tokens + n_tok)
            for rid, f in zip(s.request_ids, s.host_flags):
                st = self._requests[rid]
                if f & _ACTIVE:
                    st.prefill_done = True
                    st.steps += 1
        finally:
            self._step = None
