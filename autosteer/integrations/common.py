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
rows of this step. A decode step (every row running a generated token of a known request, as the
integration knows from host facts) -- continuing the previous one or right after a batch change --
is a *slot step*: the op reads and writes each request's latch and score in the slot tables through
a row -> slot map (its ``state_rows``), staged only when the rows changed, and adds nothing else but,
in monitor mode, one in-place count (issue 19; ``tests/test_serving_step_ops.py`` counts every op
through the engines' entry points, ``docs/kernels.md`` lists them). Any other step takes the general
path: a handful of small device ops on preallocated buffers plus **one** host-to-device copy of a small int64 vector
(slots, row flags and, when given as host lists, the prefill offsets / head rows, the slots to
reset; the vLLM processor adds one more, of prompt lengths, on steps after its batch changed), from
a preallocated host buffer (:class:`HostStaging`: pinned on CUDA, so the copy never synchronises;
on the CPU the buffer itself, no copy). Nothing reads a device value back: no ``.item()``,
``.tolist()``, ``bool(tensor)`` or blocking copy in the step path. The only syncing calls are the
reporting ones (:meth:`SteerStateStore.summary`, ``on_release`` with ``report=True``).

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

from ..method.pack import OPERATING_POINTS, PackError, grey_zone_taus
from ..method.probe import Probe
from ..runtime.reference_op import refusal_basis

log = logging.getLogger(__name__)

MODES = ("prefill", "monitor")
ENV_MONITOR_WINDOW = "AUTOSTEER_MONITOR_WINDOW"
#: monitor mode: watch only the requests whose prompt score is at least this (the two-stage gate)
ENV_MONITOR_FROM = "AUTOSTEER_MONITOR_FROM"


class PoolingNotServed(PackError):
    """A pack with a pooled gate given to a server that cannot read every prompt token: TGI with prefix caching on,
    vLLM's Model Runner V2."""


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


def parse_threshold(value, source: str) -> float | str | None:
    """A probability threshold from the environment or a server config: unset/empty -> None (the
    pack's); the name of an operating point (``strict``, ``balanced``, ``permissive``; resolved
    against the pack by :func:`~autosteer.method.pack.prompt_threshold`) -> that name; else a float
    in ``[0, 1]``; anything else raises ValueError naming ``source``."""
    if _unset(value):
        return None
    if isinstance(value, str) and value.strip().lower() in OPERATING_POINTS:
        return value.strip().lower()
    try:
        if isinstance(value, bool):
            raise TypeError
        t = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ValueError(f"{source}={value!r} is not a number (a probability threshold in [0, 1]) nor an operating "
                         f"point ({', '.join(OPERATING_POINTS)})") from None
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"{source}={value!r} is not a probability threshold in [0, 1] (above 1 the gate never fires, "
                         "below 0 it steers every request)")
    return t


# ---------------------------------------------------------------------------------------------
# per-request settings (a client's request may make the gate stricter, never looser)

REQUEST_KEYS = ("autosteer", "autosteer_mode", "autosteer_tau")
ENV_ALLOW_CLIENT_OFF = "AUTOSTEER_ALLOW_CLIENT_OFF"


@dataclass(frozen=True)
class RequestSettings:
    """What one request asked for, already checked against the server's settings (see
    :func:`parse_request_settings`). ``off``: served unsteered, exactly as by a plain server (only
    where the server allows it); ``monitor``: monitor mode for this request on a prefill-mode server;
    ``tau``: this request's prompt threshold (at or below the server's: the gate fires more easily)."""

    off: bool = False
    monitor: bool = False
    tau: float | None = None

    def describe(self) -> str:
        if self.off:
            return "steering off (client)"
        if self.tau is not None and self.tau < 0:
            return "refused: steered from its first token (prompt off the pack's format)"
        parts = (["mode monitor"] if self.monitor else []) + ([f"tau {self.tau:.6g}"] if self.tau is not None else [])
        return ", ".join(parts) or "server defaults"


#: the threshold of a request the server refuses outright (the prompt-format check's ``refuse`` policy): every probe
#: score is above it (the gate fires on ``p > tau``; a NaN score latches too under fail-closed)
REFUSE_TAU = -1.0


def refused(settings: RequestSettings | None) -> RequestSettings:
    """``settings`` (a client's, or None) for a request the server refuses: steered from its first token. A request
    the client turned off, where the server allows it, stays off (the operator let clients opt out)."""
    if settings is not None and settings.off:
        return settings
    return RequestSettings(monitor=settings.monitor if settings is not None else False, tau=REFUSE_TAU)


def parse_request_settings(args, *, server_tau: float, server_mode: str, monitor_calibrated: bool,
                           allow_off: bool, source: str = "",
                           operating_points: dict | None = None) -> RequestSettings | None:
    """A request's AutoSteer keys (``args``: vLLM's ``SamplingParams.extra_args``, i.e. the OpenAI API's
    ``vllm_xargs``; other keys are ignored) checked against the server's settings. Returns None when the
    request leaves everything at the server's defaults (also when it restates them), else the
    :class:`RequestSettings`. Raises ValueError naming the key for: an unknown ``autosteer*`` key, a bad
    value, ``autosteer_tau`` outside ``(0, server tau]``, ``autosteer_mode=prefill`` on a monitor-mode
    server (looser), ``autosteer_mode=monitor`` with a pack that has no monitor calibration, and
    ``autosteer=off`` unless the server allows it (``allow_off``: ``AUTOSTEER_ALLOW_CLIENT_OFF``).
    ``autosteer_tau`` may also name one of the pack's operating points (``operating_points``: name ->
    threshold), e.g. ``"strict"``; it is held to the same rule (at or below the server's threshold)."""
    if not args:
        return None
    keys = [k for k in args if isinstance(k, str) and k.lower().startswith("autosteer")]
    if not keys:
        return None
    where = f"{source} " if source else ""
    for k in keys:
        if k not in REQUEST_KEYS:
            raise ValueError(f"{where}{k!r}: unknown AutoSteer setting (known: {', '.join(REQUEST_KEYS)})")
    off = monitor = False
    tau = None
    if "autosteer" in args:
        v = args["autosteer"]
        v = ("on" if v else "off") if isinstance(v, bool) else (v.strip().lower() if isinstance(v, str) else v)
        if v not in ("on", "off"):
            raise ValueError(f"{where}autosteer={args['autosteer']!r}: must be \"on\" or \"off\"")
        if v == "off":
            if not allow_off:
                raise ValueError(f"{where}autosteer=\"off\": this server does not let clients turn AutoSteer off "
                                 f"(the operator enables it with {ENV_ALLOW_CLIENT_OFF}=1)")
            off = True
    if "autosteer_mode" in args:
        v = args["autosteer_mode"]
        m = v.strip().lower() if isinstance(v, str) else None
        if m not in MODES:
            raise ValueError(f"{where}autosteer_mode={v!r}: must be one of {', '.join(MODES)}")
        if m == "prefill" and server_mode == "monitor":
            raise ValueError(f"{where}autosteer_mode=\"prefill\": this server runs monitor mode, a request may not "
                             "loosen it to prefill mode")
        if m == "monitor" and server_mode != "monitor":
            if not monitor_calibrated:
                raise ValueError(f"{where}autosteer_mode=\"monitor\": this server's pack has no monitor calibration "
                                 "(no tau_monitor), so per-request monitor mode is not available")
            monitor = True
    if "autosteer_tau" in args:
        v = args["autosteer_tau"]
        named = v.strip().lower() if isinstance(v, str) and v.strip().lower() in OPERATING_POINTS else None
        if named is not None and named not in (operating_points or {}):
            have = ", ".join(sorted(operating_points or {})) or "none"
            raise ValueError(f"{where}autosteer_tau={v!r}: this server's pack has no such operating point (it has: "
                             f"{have})")
        try:
            if isinstance(v, bool):
                raise TypeError
            t = float(operating_points[named]) if named is not None else float(v.strip() if isinstance(v, str) else v)
        except (TypeError, ValueError):
            raise ValueError(f"{where}autosteer_tau={v!r}: not a number (a probability threshold in "
                             f"(0, {server_tau:.6g}]) nor an operating point of the pack") from None
        if not (0.0 < t <= 1.0):  # (NaN fails too)
            raise ValueError(f"{where}autosteer_tau={v!r}: not a probability threshold in (0, {server_tau:.6g}]")
        if t > server_tau:
            raise ValueError(f"{where}autosteer_tau={v!r} is above this server's threshold {server_tau:.6g}: a request "
                             f"may only make the gate stricter (a tau in (0, {server_tau:.6g}])")
        if t < server_tau:
            tau = t
    if off:  # nothing else matters for an unsteered request
        return RequestSettings(off=True)
    if not monitor and tau is None:
        return None
    return RequestSettings(monitor=monitor, tau=tau)


# per-row phases for begin_step(phase=...): decided on the device (vLLM knows them only there)
PHASE_DECODE = 0  # the row's newest token is a generated one
PHASE_PREFILL_LAST = 1  # this forward ran the prompt's last token
PHASE_PREFILL_MID = 2  # this forward ran prompt tokens but not the last one: the sampled token is discarded

# row flags (host -> device, one int64 per row)
_ACTIVE = 1  # the row's token is kept (not a discarded mid-prefill chunk): it may latch and be steered
_PROBE = 2  # probe this row at position 0 of this step
_FINAL_PREFILL = 4  # the row's prompt finished in this forward (its prompt score is recorded)
# per-request settings (staged with the flags; only on steps with such a request, see RequestSettings)
_REQ_MONITOR = 8  # the request asked for monitor mode: its generated tokens are probed
_REQ_OFF = 16  # the request turned steering off: never probed, never latched, never steered


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
    # the layers whose residual streams the probe reads, side by side (W1 is [F, len(layers) * H])
    layers: list[int]
    # threshold for generated tokens in monitor mode; None: a prefill-only pack (tau is used, with a warning)
    tau_monitor: float | None = None
    # (W1 [2, F, H], b1 [2, F], w2 [2, F], b2 [2]): prefill probe and monitor probe stacked, for
    # monitor mode's one-launch step (row_probe picks per row); None: the pack has no monitor probe
    stacked: tuple | None = None
    # monitor mode probes a request's first monitor_window generated tokens (None: all of them)
    monitor_window: int | None = None
    # ... of the requests whose prompt score is at least monitor_from (the two-stage gate; None: every request)
    monitor_from: float | None = None
    # the pooled gate (a pack with pooling "last_token|max"): the prompt position its token probe starts at; None:
    # the pack has no pooled gate. The token probe itself runs in the capture (TokenPool); the store keeps each
    # request's running max over its prompt's tokens and latches on it (SteerStateStore.pool)
    pool_skip: int | None = None

    @property
    def monitor_tau(self) -> float:
        return self.tau if self.tau_monitor is None else self.tau_monitor

    @classmethod
    def from_pack(cls, pack, E: torch.Tensor, *, tau: float | None = None, fail_closed: bool = True,
                  device: torch.device | str | None = None, tau_monitor: float | None = None,
                  monitor_window: int | None = None, monitor_from: float | str | None = None) -> "SteerWeights":
        from ..method.pack import PackError, grey_zone_start, monitor_threshold, prompt_threshold
        from ..method.pack import monitor_window as _window

        if E.dim() != 2 or not E.is_floating_point():
            raise PackError(f"the output embedding must be a float [V, H] matrix, got {E.dtype} {tuple(E.shape)}")
        if E.shape[1] != pack.hidden_size:
            raise PackError(f"pack hidden size {pack.hidden_size} does not match the model's {E.shape[1]}")
        device = torch.device(device) if device is not None else E.device
        tau = prompt_threshold(pack, tau)
        tau_monitor, fallback = monitor_threshold(pack, tau, tau_monitor)
        tau_monitor = None if fallback else tau_monitor
        try:
            low = grey_zone_start(pack, tau, monitor_from)
        except ValueError as exc:
            raise PackError(str(exc)) from None
        U = refusal_basis(E, pack.A, device=device)  # in vocabulary blocks: no fp32 copy of the whole E
        return cls(
            W1=pack.W1.to(device).contiguous(), b1=pack.b1.to(device).contiguous(),
            w2=pack.w2.to(device).contiguous(), b2=pack.b2.to(device).contiguous(),
            U=U, Bt=pack.B.t().contiguous().to(device), tau=tau, eps=float(pack.eps),
            tau_monitor=tau_monitor, fail_closed=bool(fail_closed), layers=list(pack.layers),
            stacked=tuple(t.to(device).contiguous() for t in pack.stacked_probes()) if pack.has_monitor_probe else None,
            monitor_window=_window(pack, monitor_window), monitor_from=low,
            pool_skip=pack.pool_skip if pack.pool is not None else None,
        )

    @property
    def device(self) -> torch.device:
        return self.U.device

    def precompile(self, hidden_dtype: torch.dtype, logits_dtypes=(torch.float32,)) -> int:
        """Run the op once per kernel variant a serving store launches with these weights, on one dummy row each:
        every logits dtype given, the prefill probe and (with a monitor probe) the stacked probes, with and without
        ``state_rows``, the store's index dtypes (rows and slots int64, probe index int32), the row latched so
        that the blend launch runs too. On CUDA this compiles the Triton kernels at start-up, so that the first
        request does not pay the JIT and no variant compiles mid-serving; a variant missed here (another dtype)
        still compiles at first use. On the CPU it runs the C++ op (nothing to compile). The weights are only
        read. Returns the number of op calls."""
        from ..runtime.op import run_each_variant, steer_step

        probes = [(self.W1, self.b1, self.w2, self.b2, None)]
        if self.stacked is not None:
            probes.append((*self.stacked, torch.zeros(1, dtype=torch.int32, device=self.device)))
        return run_each_variant(steer_step, probes, self.U, self.Bt, self.tau, self.eps, self.fail_closed,
                                hidden_dtype=hidden_dtype, layers=len(self.layers), logits_dtypes=logits_dtypes,
                                state_rows=True)

    def probe_scores(self, h: torch.Tensor) -> torch.Tensor:
        """The probe alone on rows ``h`` ([n, k*H]: the probe layers' states side by side); for reports and
        tests (the step uses the op)."""
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


def check_served_pooling(pack, server: str, why: str) -> None:
    """A pack whose gate pools over the prompt's tokens (``pooling="last_token|max"``, docs/method.md 7l) is refused
    here, by name, at start-up, by a server configured so that it cannot read every prompt token: ``why`` says how
    (prefix caching on, ...) and what to change. Serving such a pack through part of its reading would gate requests
    by half of its gate, at a threshold set for the whole. Raises :class:`PoolingNotServed` (a
    :class:`~autosteer.method.pack.PackError`); a pack without a pooled gate passes."""
    if pack.pooling == "last_token":
        return
    raise PoolingNotServed(f"AutoSteer: this pack's gate pools over every prompt token (pooling={pack.pooling!r}), "
                           f"which this {server} server cannot serve: {why}.")


def token_rows(cu: torch.Tensor, start: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each of a flattened forward's ``n`` tokens belongs: ``(rows [n], positions [n])``. ``cu`` ([B + 1]) are
    the requests' offsets in the forward (``query_start_loc`` / ``cu_seqlen_prefill``), ``start`` ([B]) each
    request's position of its first token in it. Tokens past ``cu[B]`` (padding, stale rows) get row ``B``: none."""
    B = start.shape[0]
    t = torch.arange(n, device=start.device)
    if B == 0:
        return torch.zeros_like(t), torch.zeros_like(t)
    cu = cu[: B + 1].to(device=start.device, dtype=torch.int64)
    rows = torch.searchsorted(cu[1:], t, right=True)  # cu[b] <= t < cu[b + 1]
    rc = rows.clamp(max=B - 1)
    return rows, start.to(torch.int64).index_select(0, rc) + (t - cu.index_select(0, rc))


class TokenPool:
    """The pooled gate's token probe (``pack.pool``: an MLP on the gate layers' raw states side by side) on a
    server's flattened tokens. A capture feeds it each probe layer's ``[N, H]`` rows as the layer runs
    (:meth:`add`: one matmul into a ``[N, F]`` accumulator, so no layer's rows are kept for the next) and reads the
    ``[N]`` token logits at the last layer (:meth:`finish`); :meth:`score` does both for rows at hand. float32
    throughout, as the fit scored the tokens."""

    def __init__(self, probe: Probe, layers: int, device):
        F, KH = probe.W1.shape
        if KH % layers:
            raise PackError(f"pool.W1 has {KH} input columns, not a multiple of the pack's {layers} layer(s)")
        H = KH // layers
        W1 = probe.W1.to(device=device, dtype=torch.float32)
        self.W1t = [W1[:, i * H:(i + 1) * H].t().contiguous() for i in range(layers)]  # per layer [H, F]
        self.b1 = probe.b1.to(device=device, dtype=torch.float32)
        self.w2 = probe.w2.to(device=device, dtype=torch.float32)
        self.b2 = probe.b2.to(device=device, dtype=torch.float32)
        self._pre: torch.Tensor | None = None

    def add(self, i: int, h: torch.Tensor, r: torch.Tensor | None = None) -> None:
        """Layer ``i``'s rows ``h (+ r)`` of this forward (``i = 0`` starts a new forward)."""
        x = h.float() if r is None else h.float() + r.float()
        part = x @ self.W1t[i]
        self._pre = part if i == 0 else self._pre + part

    def finish(self) -> torch.Tensor:
        """``[N]`` token logits of the forward whose layers :meth:`add` was given."""
        pre, self._pre = self._pre, None
        return torch.relu(pre + self.b1) @ self.w2 + self.b2

    def score(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        for i, h in enumerate(parts):
            self.add(i, h)
        return self.finish()


def check_pack_matches(pack, E: torch.Tensor, *, num_layers: int, model_type: str) -> None:
    """:func:`autosteer.method.pack.check_fingerprint` for an engine's model, given its output
    embedding ``E`` ([V, H], unsharded), layer count and ``config.model_type``. Raises PackError."""
    from ..method.pack import PackError, check_fingerprint

    check_fingerprint(pack.meta["fingerprint"], _FingerprintView(E, num_layers, model_type))
    for layer in pack.layers:
        if layer >= num_layers:
            raise PackError(f"pack layer {layer} does not exist in a model with {num_layers} layers")


# ---------------------------------------------------------------------------------------------
# hidden-state capture into preallocated buffers


class HiddenBuffer:
    """A preallocated ``[capacity, H]`` buffer that capture hooks write in place.

    See the CUDA-graph contract in the module docstring. :meth:`view` is what the step driver
    reads: the buffer itself, or the ``overflow`` tensor of an eager forward that did not fit (or
    that :meth:`keep` kept by reference). A write is one op: the ``buf[:n]`` views are made once, at
    construction.
    """

    def __init__(self, capacity: int, hidden: int, dtype: torch.dtype, device: torch.device | str, name: str = "hidden"):
        if capacity < 1:
            raise ValueError("HiddenBuffer capacity must be >= 1")
        self.name = name
        self.buf = torch.zeros(capacity, hidden, dtype=dtype, device=device)
        self.overflow: torch.Tensor | None = None
        self.writes = 0  # Python-side count of hook calls (advisory: graph replays do not count)
        # buf[:n] for every n, made once (views: the buffer's fixed memory), so that a write is one op
        self._views = [self.buf[:n] for n in range(capacity + 1)]

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

    @staticmethod
    def _flat(x: torch.Tensor) -> torch.Tensor:
        return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])

    def write(self, x: torch.Tensor) -> None:
        """Store ``x`` ([n, H], or anything that flattens to rows of H) for this forward."""
        x = self._flat(x)
        n = x.shape[0]
        self.writes += 1
        if self._check_fits(n, x):
            self._views[n].copy_(x)
        else:
            self.overflow = x

    def write_sum(self, a: torch.Tensor, b: torch.Tensor | None) -> None:
        """Store ``a + b`` (the residual stream from a fused add-norm layer's two outputs) in one kernel."""
        if b is None:
            self.write(a)
            return
        a, b = self._flat(a), self._flat(b)
        n = a.shape[0]
        self.writes += 1
        if self._check_fits(n, a):
            torch.add(a, b, out=self._views[n])
        else:
            self.overflow = a + b

    def keep(self, x: torch.Tensor) -> None:
        """Keep a reference to ``x`` for this forward, no copy: only in a forward that is not being captured into a
        CUDA graph, for a tensor nothing writes before the step reads it (vLLM's ``compute_logits`` input: the
        sampler, and with it the logits processor, runs right after ``compute_logits``; TGI's ``lm_head`` input in
        an eager forward after warm-up, when no graph is captured)."""
        self.writes += 1
        self.overflow = self._flat(x)

    def write_or_keep(self, x: torch.Tensor, *, copy: bool = False) -> None:
        """:meth:`write` when ``copy`` (the engine may be capturing a graph in a way torch cannot see, e.g.
        TGI's warm-up) or a CUDA graph is being captured on ``x``'s stream; else :meth:`keep` (no op)."""
        if copy or self._capturing(x):
            self.write(x)
        else:
            self.keep(x)

    def view(self) -> torch.Tensor:
        return self.overflow if self.overflow is not None else self.buf


class HostStaging:
    """The small index vectors a step sends to the device, through preallocated host memory.

    :meth:`stage` writes a list of ints into a host buffer with numpy (no torch op) and returns a
    device tensor of ``capacity`` entries whose first ``len(values)`` hold them. On CUDA the host
    buffers are pinned and the copy is one ``copy_(non_blocking=True)`` of the whole (small) buffer,
    which from pinned memory never synchronises with the stream; a host buffer is rewritten only once
    the copy that last read it has completed (its CUDA event says so), and when the device lags so far
    that every buffer is still being read, one more is allocated rather than waiting. On other devices
    (the CPU: no pinned memory there, nothing asynchronous) the host buffer is itself the returned
    tensor: no copy at all.
    """

    def __init__(self, capacity: int, dtype: torch.dtype, device: torch.device | str):
        self.device = torch.device(device)
        self.capacity = int(capacity)
        self.dtype = dtype
        self._cuda = self.device.type == "cuda"
        self._host: list[torch.Tensor] = []
        self._np: list = []
        self._events: list = []
        self._next = 0
        self.dev = torch.zeros(self.capacity, dtype=dtype, device=self.device) if self._cuda else None
        self._add_buffer()
        # out[:n] for every n, made once: the tensor stage() returns is always the same one (dev, or host buffer 0)
        out = self.dev if self._cuda else self._host[0]
        self._views = [out[:n] for n in range(self.capacity + 1)]

    def _add_buffer(self) -> int:
        if self._cuda:
            h = torch.zeros(self.capacity, dtype=self.dtype, pin_memory=True)
        else:
            h = torch.zeros(self.capacity, dtype=self.dtype, device=self.device)
        self._host.append(h)
        self._np.append(h.numpy())
        self._events.append(None)
        return len(self._host) - 1

    @property
    def buffers(self) -> int:
        """Host buffers allocated so far (more than one only on CUDA, when the device lagged behind)."""
        return len(self._host)

    def stage(self, values: Sequence[int]) -> torch.Tensor:
        n = len(values)
        if n > self.capacity:
            raise ValueError(f"{n} values staged into a buffer of {self.capacity}")
        if not self._cuda:
            self._np[0][:n] = values
            return self._host[0]
        i = self._next
        ev = self._events[i]
        if ev is not None and not ev.query():  # its last copy is still queued: never wait for it
            i = self._add_buffer()
        self._np[i][:n] = values
        self.dev.copy_(self._host[i], non_blocking=True)
        if self._events[i] is None:
            self._events[i] = torch.cuda.Event()
        self._events[i].record()
        self._next = (i + 1) % len(self._host)
        return self.dev

    def stage_view(self, values: Sequence[int]) -> torch.Tensor:
        """:meth:`stage`, returning the ``len(values)`` staged entries (a view made at construction: no op)."""
        self.stage(values)
        return self._views[len(values)]


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
    # slot steps of the store's current epoch this request ran (see SteerStateStore), and the tokens they kept that
    # the host counted (not yet in the table; a speculative slot step's accepted tokens are counted on the device)
    epoch: int = -1
    epoch_steps: int = 0
    epoch_tokens: int = 0


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
    settings: RequestSettings | None = None  # what the request asked for (None: the server's defaults)


#: monitor mode with a window: the probe masks of the first min(window + 1, WINDOW_MASKS) decode steps after the
#: rows were set up are made then, at once (views of one ``[K, slots]`` bool table); a window longer than that
#: costs one ``le`` per step past them. Each view costs host time when the epoch opens (about 1 us: 68 us for 65
#: at 1024 slots, 1.2 ms for 1001), at every general step, so the list stops at 64 (the pack's window is 16)
WINDOW_MASKS = 64


def _slot_table(name: str):
    """``store._slot_latched`` & co. read from outside the store (tests, benchmarks): the slot table, after the
    rows of the previous step are written back (:meth:`SteerStateStore.settle`)."""

    def get(self):
        self.settle()
        return getattr(self, "_sl" + name)

    return property(get, doc=f"slot table {name[1:]} (settled)")


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

    **Two paths per step.** Each request's state lives in a device slot table, keyed on the host by
    request id. A step whose rows each run a generated token of a known request with the server's
    settings (one position, known on the host: ``prefilling`` / ``still_prefilling`` all False and every
    request's prompt seen, or ``phase=PHASE_DECODE``) is a *slot step*, whether its rows are the previous
    step's or the batch changed: the op addresses the slot tables through the row -> slot map
    (``state_rows``: latch, score, probe mask, threshold, probe index), which is staged only when the rows
    changed (:class:`HostStaging`: no op on the CPU, one pinned copy on CUDA); monitor mode adds one
    in-place latched-step count (0 to 2 ops of the store's own, see ``docs/kernels.md``). Slot steps form
    an *epoch*, opened by each general step: the tokens they generate are counted on the host, and a
    request's ``latched_at`` is derived from the per-slot count (a slot that latched in the epoch's e-th
    counted step latched at generated token ``tokens + e``); :meth:`settle` folds them into the tables
    (the next general step, :meth:`force_latch` and the table properties do), :meth:`summary` adds them
    on the host. A request must run every slot step of its epoch (one that sat a step out and comes
    back takes the general path), so that its e-th slot step is its e-th token of the epoch. In prefill mode
    a speculative step (``P`` positions) is a slot step too: nothing is probed at generated tokens, so a row's
    latch cannot change between positions; the op runs once per position and the engine's accepted counts
    are added to a per-slot token table on the device (one ``index_add_``), folded in with the epoch. Every
    other step (rows joining, prompt chunks, speculation in monitor mode, a device-side ``phase``, requests
    with their own settings) takes the general path: it folds the epoch, stages its indices, gathers, runs the op and
    scatters the results back.
    """

    _slot_latched = _slot_table("_latched")
    _slot_p_unsafe = _slot_table("_p_unsafe")
    _slot_p_last = _slot_table("_p_last")
    _slot_tokens = _slot_table("_tokens")
    _slot_latched_at = _slot_table("_latched_at")

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
        self._ep: SimpleNamespace | None = None  # the current epoch of slot steps (see the class doc)
        self._ep_ids = 0
        self._alloc_slots(max(int(max_requests or 4 * max_batch), 1))
        self._alloc_step(max(int(max_batch), 1), max(int(max_positions), 1))
        self._step: SimpleNamespace | None = None
        self._warned_missed_prefill = False
        # request id -> RequestSettings of requests that asked for something other than the defaults; a step with
        # one of them takes the general path (steps of default requests only are untouched)
        self._settings: dict[Hashable, RequestSettings] = {}
        # requests registered with settings, by kind (counted once per request, in set_request_settings)
        self.request_counts = {"off": 0, "monitor": 0, "tau": 0}
        if mode == "monitor" and weights.tau_monitor is None:
            from ..method.pack import warn_monitor_fallback

            warn_monitor_fallback()

    # -- buffers ------------------------------------------------------------------------------
    _TABLES = (("_sl_latched", torch.bool, False), ("_sl_p_unsafe", torch.float32, math.nan),
               ("_sl_p_last", torch.float32, math.nan), ("_sl_tokens", torch.int32, 0),
               ("_sl_latched_at", torch.int32, -1))

    def _alloc_slots(self, n: int) -> None:
        dev = self.device
        old = getattr(self, "_sl_latched", None)
        new = {name: torch.full((n,), init, dtype=dt, device=dev) for name, dt, init in self._TABLES}
        start = 0
        if old is not None:
            start = old.shape[0]
            for name, t in new.items():
                t[:start].copy_(getattr(self, name))
            log.info("autosteer: slot table grown from %d to %d requests", start, n)
        # per-request prompt thresholds (only read on steps with a request that has settings; a slot is reset
        # to the server's tau when such a request leaves it)
        tau = torch.full((n,), self.w.tau, dtype=torch.float32, device=dev)
        if old is not None:
            tau[:start].copy_(self._sl_tau)
        self._sl_tau = tau
        if self.w.pool_skip is not None:  # the pooled gate: running max logit over the prompt tokens pooled so far,
            # and the position up to which the request's tokens have been through a step (gaps are never pooled)
            pool = torch.full((n,), -math.inf, dtype=torch.float32, device=dev)
            pool_end = torch.zeros(n, dtype=torch.int64, device=dev)
            if old is not None:
                pool[:start].copy_(self._sl_pool)
                pool_end[:start].copy_(self._sl_pool_end)
            self._sl_pool, self._sl_pool_end = pool, pool_end
        for name, t in new.items():
            setattr(self, name, t)  # slot indices are kept
        # what a slot step passes the op for every slot (see the class doc): probe masks, monitor threshold and
        # probe, and the latched-step count monitor mode derives latched_at from; grown only outside an epoch
        self._sl_no_probe = torch.zeros(n, dtype=torch.bool, device=dev)
        self._sl_all_probe = torch.ones(n, dtype=torch.bool, device=dev)
        self._sl_mask_buf = torch.zeros(n, dtype=torch.bool, device=dev)
        tau_mon = torch.full((n,), self.w.monitor_tau, dtype=torch.float32, device=dev)
        if old is not None:  # per request with monitor_from (set at its prompt): kept
            tau_mon[:start].copy_(self._sl_tau_mon)
        self._sl_tau_mon = tau_mon
        self._sl_probe_mon = torch.ones(n, dtype=torch.int32, device=dev)
        self._sl_count = torch.zeros(n, dtype=torch.int32, device=dev)
        # tokens kept by speculative slot steps, counted on the device (the engine's accepted counts), per slot
        self._sl_spec_tokens = torch.zeros(n, dtype=torch.int64, device=dev)
        self._fold_stage = HostStaging(2 * n, torch.int64, dev)  # (slot, tokens) pairs folded into the table
        self._free.extend(range(n - 1, start - 1, -1))  # pop() hands out the lowest slot first

    def _alloc_step(self, rows: int, positions: int) -> None:
        dev = self.device
        self._max_rows, self._max_pos = rows, positions
        # slots | flags | cu (B+1) | head rows | slots new this step: the step's one host -> device transfer
        self._stage = HostStaging(5 * rows + 1, torch.int64, dev)
        # [position, row]: position j of the step is a contiguous [B] vector
        self._lat = torch.zeros(positions, rows, dtype=torch.bool, device=dev)
        self._pout = torch.full((positions, rows), math.nan, dtype=torch.float32, device=dev)
        self._probe = torch.zeros(rows, dtype=torch.bool, device=dev)
        self._pmask = torch.zeros(positions, rows, dtype=torch.bool, device=dev)  # probe mask per position
        self._no_probe = torch.zeros(rows, dtype=torch.bool, device=dev)
        self._all_probe = torch.ones(rows, dtype=torch.bool, device=dev)
        self._mask_buf = torch.zeros(rows, dtype=torch.bool, device=dev)  # monitor window past WINDOW_MASKS
        self._win_steps = torch.arange(WINDOW_MASKS, dtype=torch.int32, device=dev)
        self._rows = torch.zeros(rows, dtype=torch.int64, device=dev)  # prefill probe rows
        self._grid = torch.arange(rows * positions, dtype=torch.int64, device=dev)  # b * P + j
        self._grid_views = [self._grid[:n] for n in range(rows + 1)]  # a slot step's rows, made once
        # (B, P, j) -> rows b * P + j of a speculative slot step (prefill mode), made here for every B (P the
        # store's positions), so that a step after a batch change makes none; another P: at first use
        self._spec_rows = {}
        if positions > 1 and self.mode == "prefill":
            by_row = self._grid.view(rows, positions)
            self._spec_rows = {(n, positions, j): by_row[:n, j] for n in range(1, rows + 1) for j in range(positions)}
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

    def set_request_settings(self, request_id, settings: RequestSettings | None) -> None:
        """What request ``request_id`` asked for (from :func:`parse_request_settings`; None: the server's
        defaults). Call before its first step (again on a resume: the same settings are kept, not counted
        twice); dropped with the request's state on :meth:`release`. A step containing such a request takes
        the general path."""
        if self._step is not None and request_id in self._step.index:
            raise RuntimeError(f"autosteer: settings of request {request_id!r} changed in the middle of a step")
        old = self._settings.get(request_id)
        if settings == old:
            return
        if settings is None:
            del self._settings[request_id]
        else:
            self._settings[request_id] = settings
            if old is None:
                for kind, on in (("off", settings.off), ("monitor", settings.monitor),
                                 ("tau", settings.tau is not None)):
                    self.request_counts[kind] += on
        st = self._requests.get(request_id)
        if st is not None:  # already has a slot: its threshold now (else when the slot is taken)
            self._sl_tau[st.slot] = self.w.tau if settings is None or settings.tau is None else settings.tau

    def request_settings(self, request_id) -> RequestSettings | None:
        return self._settings.get(request_id)

    def _get_or_add(self, request_id) -> tuple[RequestSteerState, bool]:
        st = self._requests.get(request_id)
        if st is not None:
            return st, False
        if not self._free:
            self._alloc_slots(2 * self._sl_latched.shape[0])
        st = RequestSteerState(request_id, self._free.pop())
        self._requests[request_id] = st
        return st, True

    def release(self, request_id, *, report: bool = True) -> bool:
        """Free a finished request's state. Unknown ids are ignored (returns False). ``report=False``: no
        summary for ``on_release`` (no device read), whatever ``report_on_release`` says."""
        return bool(self.release_many([request_id], report=report))

    def release_many(self, request_ids, *, report: bool = True) -> int:
        """:meth:`release` each of ``request_ids``; returns how many were known. No device work (a freed slot is
        reset when a new request takes it, in a general step)."""
        ids = [rid for rid in request_ids if rid in self._requests]
        if self._step is not None:
            inside = [rid for rid in ids if rid in self._step.index]
            if inside:
                raise RuntimeError(f"autosteer: request {inside[0]!r} released in the middle of a step")
        for rid in ids:
            st = self._requests[rid]
            summary = (self.summary(rid) if (report and self.on_release is not None and self.report_on_release)
                       else None)
            del self._requests[rid]
            cfg = self._settings.pop(rid, None)
            if cfg is not None and cfg.tau is not None:  # the slot goes back to the server's threshold
                self._sl_tau[st.slot] = self.w.tau
            self._free.append(st.slot)
            if self.on_release is not None:
                self.on_release(rid, summary)
        return len(ids)

    def release_all(self, *, report: bool = True) -> None:
        self.abort_step()
        self.release_many(list(self._requests), report=report)

    def force_latch(self, request_id) -> None:
        """Latch a request outside a step (fail closed when an integration cannot tell whose state is whose):
        its later rows are steered; ``latched_at`` is set to its tokens so far if it had not latched."""
        if self._step is not None and request_id in self._step.index:
            raise RuntimeError(f"autosteer: request {request_id!r} latched by hand in the middle of a step")
        s = self._requests[request_id].slot
        self.settle()  # its tokens and latched_at into the table first
        lat, at, tok = self._sl_latched, self._sl_latched_at, self._sl_tokens
        at[s] = torch.where(lat[s], at[s], tok[s])
        lat[s] = True

    def summary(self, request_id) -> SteerSummary:
        """The request's gate decision and scores (reads the device: a host sync; changes nothing)."""
        st = self._requests[request_id]
        s = st.slot
        vals = torch.stack([self._sl_latched[s].float(), self._sl_p_unsafe[s], self._sl_p_last[s],
                            self._sl_latched_at[s].float(), self._sl_tokens[s].float(),
                            self._sl_count[s].float(), self._sl_spec_tokens[s].float()]).tolist()
        latched, tokens, latched_at = bool(vals[0]), int(vals[4]), int(vals[3])
        ep = self._ep
        if ep is not None and st.epoch == ep.id:  # the current epoch's slot steps are not in the table yet
            if latched and latched_at < 0 and ep.counted:
                latched_at = tokens + ep.counted - int(vals[5])
            tokens += st.epoch_tokens + int(vals[6])
        return SteerSummary(request_id, latched, vals[1], vals[2], latched_at, tokens,
                            st.prefill_done, st.steps, self._settings.get(request_id))

    # -- epochs of slot steps -----------------------------------------------------------------
    def settle(self) -> None:
        """Fold the current epoch's slot steps into the slot tables (tokens, latched_at) and start a new epoch.
        A few device ops, no host sync; outside a step."""
        self._fold()
        self._open_epoch()

    def _fold(self) -> None:
        """Close the epoch: each request's slot steps become tokens in the table; a slot that latched in the
        epoch's e-th counted step (counted steps are a prefix of the epoch: probing stops past the window) has
        ``counted - e`` latched steps counted and latched at generated token ``tokens + e``."""
        ep, self._ep = self._ep, None
        if ep is None or ep.k == 0:
            return
        if ep.counted:
            tok, at = self._sl_tokens, self._sl_latched_at
            torch.where(self._sl_latched & (at < 0), tok + (ep.counted - self._sl_count), at, out=at)
        pend = [(st.slot, st.epoch_tokens) for st in self._requests.values() if st.epoch == ep.id and st.epoch_tokens]
        if pend:
            n = len(pend)
            meta = self._fold_stage.stage([p[0] for p in pend] + [p[1] for p in pend])
            self._sl_tokens.index_add_(0, meta[:n], meta[n: 2 * n].to(torch.int32))
        if ep.spec_tokens:  # speculative slot steps' accepted tokens (released requests' slots too: reset on reuse)
            self._sl_tokens += self._sl_spec_tokens.to(torch.int32)
            self._sl_spec_tokens.zero_()

    def _open_epoch(self) -> None:
        """A new epoch of slot steps, on the tables as they are now (after a general step or a fold)."""
        self._ep_ids += 1
        ep = SimpleNamespace(id=self._ep_ids, k=0, counted=0, keys=None, slots=None, masks=(), spec_tokens=False)
        if self.mode == "monitor":
            self._sl_count.zero_()
            W = self.w.monitor_window
            if W is not None:  # slot step e probes the slots whose token tokens + e is inside the window
                K = min(W + 1, WINDOW_MASKS)
                ep.masks = torch.le(self._sl_tokens.unsqueeze(0) + self._win_steps[:K].unsqueeze(1), W).unbind(0)
        self._ep = ep

    def _slot_step(self, keys, P, cu_seqlens, head_rows, prefilling, still, phase) -> bool:
        """Host facts only: this step is a slot step (every row a generated token of a known request with the server's
        settings, each row in every slot step of the epoch so far; one position, or in prefill mode several: a
        speculative step, whose rows nothing probes, so their latch cannot change between positions)."""
        ep = self._ep
        B = len(keys)
        if ep is None or not B or B > self._max_rows or cu_seqlens is not None or head_rows is not None:
            return False
        if P != 1 and (self.mode != "prefill" or P > self._max_pos):
            return False
        if phase is not None:  # the host value PHASE_DECODE (a device phase tensor: the general path)
            if isinstance(phase, torch.Tensor) or phase != PHASE_DECODE:
                return False
        elif (prefilling is not None and (len(prefilling) != B or any(prefilling))) or \
                (still is not None and (len(still) != B or any(still))):
            return False
        if self._settings and not self._settings.keys().isdisjoint(keys):  # a request with its own settings
            return False
        if keys != ep.keys and len(set(keys)) != B:
            return False
        req = self._requests
        for rid in keys:
            st = req.get(rid)
            if st is None or (phase is None and not st.prefill_done):
                return False
            if (st.epoch_steps if st.epoch == ep.id else 0) != ep.k:  # joined the epoch late, or left and came back
                return False
        return True

    # -- the step -----------------------------------------------------------------------------
    @property
    def in_step(self) -> bool:
        return self._step is not None

    def abort_step(self) -> None:
        """Drop an open step without committing anything (the engine raised mid-step). (A slot step whose op
        already ran has updated its rows' latch and score in place: that is kept, and the epoch is folded.)"""
        s, self._step = self._step, None
        if s is not None and s.fast and s.j:
            self.settle()

    def begin_step(self, request_ids: Sequence[Hashable], *, positions: int = 1,
                   cu_seqlens: torch.Tensor | Sequence[int] | None = None,
                   prefilling: Sequence[bool] | None = None, still_prefilling: Sequence[bool] | None = None,
                   head_rows: torch.Tensor | Sequence[int] | None = None,
                   phase: torch.Tensor | int | None = None) -> None:
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
        lengths), or the host value ``PHASE_DECODE`` when the integration knows that every row runs a
        generated token; the host-side ``prefill_done`` / ``steps`` are then not maintained.

        A step that continues the previous one (see the class doc) stages nothing and gathers nothing.
        """
        if self._step is not None:
            raise RuntimeError("autosteer: begin_step called twice without end_step (or abort_step)")
        keys = list(request_ids)
        B = len(keys)
        P = int(positions)
        if P < 1:
            raise ValueError(f"positions must be >= 1, got {positions}")
        host_decode = phase is not None and not isinstance(phase, torch.Tensor)
        if host_decode and (isinstance(phase, bool) or phase != PHASE_DECODE):
            raise ValueError(f"phase given as a host value must be PHASE_DECODE ({PHASE_DECODE}: every row runs a "
                             f"generated token), got {phase!r}")
        if self._slot_step(keys, P, cu_seqlens, head_rows, prefilling, still_prefilling, phase):
            ep = self._ep
            if keys != ep.keys:  # the batch changed: stage the new row -> slot map (no copy on the CPU)
                ep.slots = self._stage.stage_view([self._requests[rid].slot for rid in keys])
                ep.keys = keys
            self._step = SimpleNamespace(fast=True, B=B, P=P, j=0, request_ids=keys, index=dict.fromkeys(keys),
                                         host=phase is None)
            return
        self._fold()
        if len(set(keys)) != B:
            raise ValueError("autosteer: a request id appears twice in one step")
        if cu_seqlens is not None and P != 1:
            raise ValueError("a flattened prefill step (cu_seqlens) has one position per sequence")
        if phase is not None and (prefilling is not None or still_prefilling is not None):
            raise ValueError("pass either phase (device or PHASE_DECODE) or prefilling/still_prefilling (host), "
                             "not both")
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
        for name, value, need in (("cu_seqlens", cu_seqlens, B + 1), ("head_rows", head_rows, B),
                                  ("phase", None if host_decode else phase, B)):
            if value is None:
                continue
            n = value.numel() if isinstance(value, torch.Tensor) else len(value)
            if n < need or (name == "head_rows" and not isinstance(value, torch.Tensor) and n != need):
                raise ValueError(f"{name} has {n} entries, need {'B + 1' if name == 'cu_seqlens' else 'B'} = {need}")
        device_phase = phase is not None and not host_decode
        host = []
        flags = []
        new_slots = []
        custom = custom_monitor = False  # a request with its own settings in this step / one asking for monitor mode
        for b, rid in enumerate(keys):
            st, new = self._get_or_add(rid)
            if new:
                new_slots.append(st.slot)
            f = 0
            cfg = self._settings.get(rid) if self._settings else None
            if cfg is not None:
                custom = True
                custom_monitor |= cfg.monitor
                f = (_REQ_OFF if cfg.off else 0) | (_REQ_MONITOR if cfg.monitor else 0)
                if new and cfg.tau is not None:
                    self._sl_tau[st.slot] = cfg.tau
            if device_phase:
                pass  # decided on the device below (the request bits above are kept)
            elif host_decode:
                f |= _ACTIVE | (_PROBE if self.mode == "monitor" else 0)  # (|=: keeps the request bits)
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
        n_new = len(new_slots)
        host.extend(new_slots)
        # the step's only host -> device transfer (pinned and preallocated on CUDA; none on the CPU)
        meta = self._stage.stage(host) if B else None
        slots = meta[:B] if B else self._rows[:0]
        fl = meta[B: 2 * B] if B else slots
        off = 2 * B
        if n_cu:
            cu_dev = meta[off: off + n_cu]
            off += n_cu
        if n_head:
            head_dev = meta[off: off + n_head]
            off += n_head
        if n_new:  # fresh slots start clean (a freed slot may hold an old request's values)
            fresh = meta[off: off + n_new]
            for name, _dt, init in self._TABLES:
                getattr(self, name).index_fill_(0, fresh, init)
            if self.w.pool_skip is not None:
                self._sl_pool.index_fill_(0, fresh, -math.inf)
                self._sl_pool_end.index_fill_(0, fresh, 0)
            if self.w.monitor_from is not None:
                self._sl_tau_mon.index_fill_(0, fresh, self.w.monitor_tau)
        req = fl  # the host flags, with the request bits (custom steps)
        if device_phase:
            ph = phase.reshape(-1)[:B]
            decode_bits = _ACTIVE | (_PROBE if self.mode == "monitor" else 0)
            fl = torch.where(ph == PHASE_DECODE, decode_bits,
                             torch.where(ph == PHASE_PREFILL_LAST, _ACTIVE | _PROBE | _FINAL_PREFILL, 0))
        active = (fl & _ACTIVE) != 0
        probe = self._probe[:B]
        torch.ne(fl & _PROBE, 0, out=probe)
        tok0 = None  # tokens generated before this step (monitor window only)
        cust = None
        # generated tokens' thresholds: the server's, or each request's (monitor_from: set at its prompt)
        tau_mon = self._tau_mon[:B] if self.w.monitor_from is None else self._sl_tau_mon.index_select(0, slots)
        if custom:  # requests with their own settings: per-row probing, thresholds and probes (general path only)
            cust = self._custom_rows(B, slots, fl, req, active, probe, custom_monitor, tau_mon)
            tok0 = cust.tok0
        elif self.mode == "monitor":
            final_prefill = (fl & _FINAL_PREFILL) != 0
            torch.where(final_prefill, self._tau_pre[:B], tau_mon, out=self._row_tau[:B])
            if self.w.stacked is not None:
                self._row_probe[:B].copy_(~final_prefill)
            if self.w.monitor_window is not None:  # generated tokens past the window are not probed
                # a row's k-th generated token (0-based) is probed when k + 1 tokens are counted; position
                # j of a speculative step holds generated token (tokens before the step) - 1 + j
                tok0 = self._sl_tokens.index_select(0, slots)
                probe &= final_prefill | (tok0 <= self.w.monitor_window)
        lat0 = self._lat[0, :B]
        torch.index_select(self._sl_latched, 0, slots, out=lat0)
        lat0 &= active
        if cust is not None:
            # a request refused by the server (REFUSE_TAU) is latched at its prompt whatever its score (a NaN score
            # under fail-open included); one with steering off never latches (not even a forced latch)
            lat0 |= active & cust.refused_row
            lat0 &= ~cust.off_row
        if cu_dev is not None:
            probe_rows = self._rows[:B]
            torch.sub(cu_dev[1: B + 1], 1, out=probe_rows)
        else:
            probe_rows = None
        self._step = SimpleNamespace(
            fast=False, B=B, P=P, j=0, request_ids=keys, index={r: b for b, r in enumerate(keys)},
            slots=slots, flags=fl, active=active, probe=probe, probe_rows=probe_rows, head_rows=head_dev,
            host_flags=flags, tok0=tok0, lat0=lat0, host=phase is None, custom=cust, tau_mon=tau_mon,
            pool_p=None,
        )

    def _custom_rows(self, B, slots, fl, req, active, probe, custom_monitor, tau_mon) -> SimpleNamespace:
        """A general step with requests that have their own settings (:class:`RequestSettings`): which rows are
        monitored (the server's mode, or the request's), probed (never a row with steering off), at which
        threshold (the request's prompt threshold from the slot table; generated tokens: the server's
        tau_monitor) and by which probe. Updates ``probe`` in place."""
        final_prefill = (fl & _FINAL_PREFILL) != 0
        off_row = (req & _REQ_OFF) != 0
        monitor_server = self.mode == "monitor"
        mon_row = self._all_probe[:B] if monitor_server else (req & _REQ_MONITOR) != 0
        gen = active & ~final_prefill & mon_row  # rows running a generated token that monitor mode probes
        torch.logical_or(probe, gen, out=probe)
        tok0 = None
        if (monitor_server or custom_monitor) and self.w.monitor_window is not None:
            tok0 = self._sl_tokens.index_select(0, slots)
            probe &= ~gen | (tok0 <= self.w.monitor_window)
        probe &= ~off_row
        row_tau = self._row_tau[:B]
        sl_tau = self._sl_tau.index_select(0, slots)
        torch.where(final_prefill | ~mon_row, sl_tau, tau_mon, out=row_tau)
        stacked = self.w.stacked is not None and (monitor_server or custom_monitor)
        if stacked:
            self._row_probe[:B].copy_(mon_row & ~final_prefill)
        return SimpleNamespace(off_row=off_row, mon_row=mon_row, row_tau=row_tau, stacked=stacked, tok0=tok0,
                               refused_row=sl_tau < 0)

    def pool(self, token_logits: torch.Tensor, token_rows: torch.Tensor, token_pos: torch.Tensor,
             start: torch.Tensor, end: torch.Tensor, prompt_lens: torch.Tensor,
             prior: tuple | None = None) -> None:
        """The pooled gate's part of a general step (weights with ``pool_skip``: a pack with ``pooling=
        "last_token|max"``), called between :meth:`begin_step` and :meth:`apply`, device tensors only (no sync).

        ``token_logits [N]``: the token probe's logits (:class:`TokenPool`) of this forward's tokens;
        ``token_rows [N]``: each token's logits row (``>= B``: no request's, e.g. padding); ``token_pos [N]``: its
        position in its request's sequence; ``start [B]`` / ``end [B]``: the positions each row ran in this forward
        (``[start, end)``); ``prompt_lens [B]``.

        Each request's running max over its prompt tokens from ``pool_skip`` on is kept in its slot across prefill
        chunks. A row whose prompt finishes in this step (probed at its last prompt token) is latched here when that
        max passes its prompt threshold -- before the op, which blends it at this step -- and its reported score
        becomes the higher of the two probes' at :meth:`end_step`. A non-finite token logit, or a chunk that starts
        past prompt tokens no step has pooled (a prefix-cache hit, a path the integration missed), makes the max NaN,
        which the fail policy decides: never a max over part of the prompt passed off as the whole.

        ``prior = (max [B], bad [B], upto [B])`` (prefix caching): each row's highest token logit over its prompt's
        positions ``[0, upto)``, as the forwards that computed them kept it beside the KV cache, and whether one of
        them was unusable (NaN for the fail policy): pooled too, so a chunk that starts at ``upto`` (a prefix-cache
        hit) is no gap."""
        s = self._step
        if s is None or s.fast:
            raise RuntimeError("autosteer: pool() belongs to a general step, between begin_step and apply")
        skip = self.w.pool_skip
        if skip is None:
            raise RuntimeError("autosteer: pool() called, but the pack has no pooled gate")
        if s.j:
            raise RuntimeError("autosteer: pool() called after apply() in this step: the op has latched already")
        B = s.B
        if B == 0:
            return
        dev = self.device
        slots = s.slots
        P = prompt_lens[:B].to(device=dev, dtype=torch.int64)
        rows = token_rows.to(device=dev, dtype=torch.int64)
        x = token_logits.to(device=dev, dtype=torch.float32)
        if x.shape != rows.shape or rows.shape != token_pos.shape:
            raise ValueError(f"token_logits, token_rows and token_pos must have one entry per token, got "
                             f"{tuple(x.shape)}, {tuple(rows.shape)}, {tuple(token_pos.shape)}")
        inside = (rows >= 0) & (rows < B)
        rc = rows.clamp(0, B - 1)
        pos = token_pos.to(device=dev, dtype=torch.int64)
        keep = inside & (pos >= skip) & (pos < P.index_select(0, rc))
        row_max = torch.full((B,), -math.inf, dtype=torch.float32, device=dev)
        row_max.scatter_reduce_(0, rc, x.masked_fill(~keep, -math.inf), "amax")
        bad = torch.zeros(B, dtype=torch.int32, device=dev)
        bad.index_add_(0, rc, (keep & ~torch.isfinite(x)).to(torch.int32))
        st = start[:B].to(device=dev, dtype=torch.int64)
        seen = self._sl_pool_end.index_select(0, slots)
        upto = seen.clamp(min=skip)
        gap = (st > upto) & (upto < P)  # prompt tokens in [upto, start) never went through a step
        if prior is not None:  # ... unless the rows' earlier tokens come with it (prefix caching): pooled here
            pmax, pbad, pupto = (t[:B].to(dev) for t in prior)
            row_max = torch.maximum(row_max, pmax.float())
            bad += pbad.to(torch.int32)
            gap &= pupto < torch.minimum(st, P)
        cur = torch.maximum(self._sl_pool.index_select(0, slots), row_max)  # (NaN stays NaN)
        cur = cur.masked_fill((bad > 0) | gap, math.nan)
        self._sl_pool.index_copy_(0, slots, cur)
        self._sl_pool_end.index_copy_(0, slots, torch.maximum(seen, end[:B].to(device=dev, dtype=torch.int64)))
        final = ((s.flags & _FINAL_PREFILL) != 0) & s.probe  # (a request with steering off is never probed)
        p_pool = torch.sigmoid(cur)  # (nothing pooled: -inf -> 0)
        fire = p_pool > self._sl_tau.index_select(0, slots)
        if self.w.fail_closed:
            fire |= torch.isnan(p_pool)
        s.lat0 |= final & fire
        s.pool_p = p_pool

    def apply(self, logits: torch.Tensor, *, probe_hidden: torch.Tensor, head_hidden: torch.Tensor,
              probe_extra: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """Steer one position of this step's logits (``[B, V]``, any row stride) in place; returns it.

        Call ``positions`` times per step, in position order. Unlatched rows get no writes.
        ``probe_extra``: the further probe layers' rows (a pack whose probe reads several layers: the op
        reads them side by side with ``probe_hidden``'s, nothing is concatenated).
        """
        s = self._step
        if s is None:
            raise RuntimeError("autosteer: apply called outside begin_step/end_step")
        if logits.dim() != 2 or logits.shape[0] != s.B:
            raise ValueError(f"autosteer: this step has {s.B} rows, got logits of shape {tuple(logits.shape)}")
        j = s.j
        if j >= s.P:
            raise RuntimeError(f"autosteer: apply called {j + 1} times in a step with {s.P} position(s)")
        if s.fast:
            self._apply_slots(logits, probe_hidden, head_hidden, probe_extra, j, s.P)
            s.j = j + 1
            return logits
        B, P = s.B, s.P
        lat_j = self._lat[j, :B]
        if j > 0:
            lat_j.copy_(self._lat[j - 1, :B])
        grid = self._grid[: B * P].view(B, P)[:, j] if P > 1 else self._grid[:B]
        probe_rows = s.probe_rows if s.probe_rows is not None else grid
        head_rows = s.head_rows if s.head_rows is not None else grid
        c = s.custom
        if c is not None:  # (speculative positions: the monitored rows only)
            mask = s.probe if j == 0 else s.probe & c.mon_row
        else:
            mask = s.probe if (j == 0 or self.mode == "monitor") else self._no_probe[:B]
        if j > 0 and s.tok0 is not None:  # speculative position j: generated token tok0 - 1 + j, inside the window?
            mask = mask & (s.tok0 + j <= self.w.monitor_window)
        if P > 1:
            self._pmask[j, :B].copy_(mask)
        # monitor mode: position 0 holds a row's last prompt token (tau) or a generated one (tau_monitor),
        # later (speculative) positions are generated tokens
        row_tau = None if self.mode != "monitor" else (self._row_tau[:B] if j == 0 else s.tau_mon)
        if c is not None:
            row_tau = c.row_tau if j == 0 else s.tau_mon
        w = self.w
        W1, b1, w2, b2, row_probe = w.W1, w.b1, w.w2, w.b2, None
        if (self.mode == "monitor" if c is None else c.stacked) and w.stacked is not None:  # ... and the probe likewise
            W1, b1, w2, b2 = w.stacked
            row_probe = self._row_probe[:B] if j == 0 else self._probe_mon[:B]
        if B:
            self._op(probe_hidden, probe_rows, mask, head_hidden, head_rows, logits, lat_j, self._pout[j, :B],
                     W1, b1, w2, b2, w.U, w.Bt, w.tau, w.eps, w.fail_closed, row_tau=row_tau, row_probe=row_probe,
                     probe_extra=probe_extra)
        s.j = j + 1
        return logits

    def _apply_slots(self, logits, probe_hidden, head_hidden, probe_extra=(), j: int = 0, P: int = 1) -> None:
        """A slot step: the op on the slot tables through the row -> slot map; monitor mode adds the latched-step
        count (1 op) and, past WINDOW_MASKS, the window mask (1 op). Position ``j`` of ``P`` (a speculative step,
        prefill mode): the op blends the latched rows at hidden rows ``b * P + j``; nothing is probed."""
        ep, w = self._ep, self.w
        e = ep.k  # this is the epoch's e-th slot step (0-based)
        B = self._step.B
        if P == 1:
            rows = self._grid_views[B]
        else:  # b * P + j: a view of the grid made at its first use (per B, P and j) and kept
            rows = self._spec_rows.get((B, P, j))
            if rows is None:
                rows = self._spec_rows[(B, P, j)] = self._grid[: B * P].view(B, P)[:, j]
        mask = self._sl_no_probe
        W1, b1, w2, b2, row_tau, row_probe = w.W1, w.b1, w.w2, w.b2, None, None
        if self.mode == "monitor":
            row_tau = self._sl_tau_mon  # every row's token is a generated one
            if w.stacked is not None:
                W1, b1, w2, b2 = w.stacked
                row_probe = self._sl_probe_mon
            W = w.monitor_window
            if W is None:
                mask = self._sl_all_probe
            elif e < len(ep.masks):
                mask = ep.masks[e]
            elif e <= W:  # (slots with tokens + e <= W; none past W + 1 slot steps)
                mask = torch.le(self._sl_tokens, W - e, out=self._sl_mask_buf)
        self._op(probe_hidden, rows, mask, head_hidden, rows, logits, self._sl_latched, self._sl_p_last,
                 W1, b1, w2, b2, w.U, w.Bt, w.tau, w.eps, w.fail_closed, row_tau=row_tau, row_probe=row_probe,
                 state_rows=ep.slots, probe_extra=probe_extra)
        if mask is not self._sl_no_probe:  # a probed step: count the latched slots (see _fold)
            self._sl_count.add_(self._sl_latched)
            ep.counted += 1

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
            if s.fast:  # the op committed the rows' latch and score in place; their tokens are counted here
                ep = self._ep
                kept = 1
                if s.P > 1:  # speculative: all positions kept, or the engine's accepted counts, added on the device
                    kept = s.P
                    if accepted is not None:
                        acc = accepted if accepted.dim() == 1 else accepted.reshape(-1)
                        if acc.shape[0] != s.B:
                            raise ValueError(f"autosteer: accepted has {acc.shape[0]} entries for {s.B} rows")
                        if acc.device != self.device or acc.dtype != torch.int64:
                            acc = acc.to(self.device, torch.int64)
                        self._sl_spec_tokens.index_add_(0, ep.slots, acc)
                        ep.spec_tokens, kept = True, 0
                for rid in s.request_ids:
                    st = self._requests[rid]
                    if st.epoch != ep.id:
                        st.epoch, st.epoch_steps, st.epoch_tokens = ep.id, 0, 0
                    st.epoch_steps += 1
                    st.epoch_tokens += kept
                    if s.host:
                        st.steps += 1
                ep.k += 1
                return
            B, P = s.B, s.P
            if B == 0:
                self._open_epoch()
                return
            slots, active = s.slots, s.active
            old_lat = self._sl_latched.index_select(0, slots)
            tokens = self._sl_tokens.index_select(0, slots)
            if P == 1:
                new_lat = torch.where(active, s.lat0, old_lat)
                fired = new_lat & ~old_lat
                latched_at = torch.where(fired, tokens, self._sl_latched_at.index_select(0, slots))
                p0 = self._pout[0, :B]
                p_last_new, probed_any = p0, s.probe  # (monitor mode too: position 0's mask is s.probe)
                new_tokens = tokens + active
            else:
                if accepted is None:
                    pos = torch.full((B, 1), P - 1, dtype=torch.int64, device=self.device)
                    n_tok = active.to(torch.int32)
                else:
                    acc = accepted.reshape(B)
                    if acc.device != self.device:
                        acc = acc.to(self.device)
                    pos = (acc.long() - 1).clamp(0, P - 1).unsqueeze(1)
                    n_tok = torch.where(active, acc, 0).to(torch.int32)
                lat_all = self._lat[:P, :B].t()  # [B, P]
                lat = lat_all.gather(1, pos).squeeze(1)
                new_lat = torch.where(active, lat, old_lat)
                # first steered token: the first position whose latch is set, counted from this step's first token
                first_pos = (~lat_all).to(torch.int32).sum(1)  # latches are cumulative over positions
                fired = new_lat & ~old_lat
                latched_at = torch.where(fired, tokens + first_pos.to(torch.int32),
                                         self._sl_latched_at.index_select(0, slots))
                pout = self._pout[:P, :B].t()
                p0 = pout[:, 0]
                if self.mode == "monitor" or s.custom is not None:  # the score at the last accepted position, if probed
                    p_last_new = pout.gather(1, pos).squeeze(1)
                    probed_any = self._pmask[:P, :B].t().gather(1, pos).squeeze(1)
                else:
                    p_last_new = p0
                    probed_any = s.probe
                new_tokens = tokens + n_tok
            final_prefill = (s.flags & _FINAL_PREFILL) != 0
            if s.pool_p is not None:  # the pooled gate's score: the higher of the two probes' (NaN stays NaN)
                p0 = torch.maximum(p0, s.pool_p)
                p_last_new = torch.where(final_prefill, torch.maximum(p_last_new, s.pool_p), p_last_new)
            p_last = torch.where(probed_any & active, p_last_new, self._sl_p_last.index_select(0, slots))
            # the prompt's score where the op scored it (a request with steering off is not probed: its entry of
            # _pout is another request's, so its p_unsafe stays NaN)
            p_unsafe = torch.where(final_prefill & s.probe, p0, self._sl_p_unsafe.index_select(0, slots))
            if self.w.monitor_from is not None:  # the two-stage gate: a request is watched if its prompt reached it
                watch = grey_zone_taus(p0, self.w.monitor_from, self.w.monitor_tau)
                self._sl_tau_mon.index_copy_(0, slots, torch.where(final_prefill & s.probe, watch, s.tau_mon))
            self._sl_latched.index_copy_(0, slots, new_lat)
            self._sl_latched_at.index_copy_(0, slots, latched_at)
            self._sl_p_last.index_copy_(0, slots, p_last)
            self._sl_p_unsafe.index_copy_(0, slots, p_unsafe)
            self._sl_tokens.index_copy_(0, slots, new_tokens)
            if s.host:
                for rid, f in zip(s.request_ids, s.host_flags):
                    st = self._requests[rid]
                    if f & _ACTIVE:
                        st.prefill_done = True
                        st.steps += 1
            self._open_epoch()
        finally:
            self._step = None
