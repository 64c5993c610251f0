"""The transformers ``LogitsProcessor`` that runs AutoSteer's fused per-step op.

Per generation it keeps, for every row of the batch, a latch (refuse or not) and the probe's
score. At the first call (prefill) each row's gate is decided from its last prompt token; in
``"prefill"`` mode (the paper's) the latch then holds for the whole generation, in
``"monitor"`` mode every generated token is probed again and the first trigger latches; generated
tokens are scored by the pack's monitor probe (when it has one) against its ``tau_monitor`` (both
fitted on the model's responses to fit prompts), the prompt's last token by the prefill probe against ``tau``.

Transformers runs custom processors after its own (repetition penalty and the like) and before
the sampling warpers (temperature, top-k, top-p), so the blend acts on the model's logits
whatever the sampling settings. Use one processor per ``generate`` call
(:meth:`AutoSteerHandle.logits_processor`); a processor that sees a new batch starts over (a call
continues the last one only if the batch size is the same, the sequences are one token longer, no
new multi-token prefill ran in between, and the rows continue the previous call's rows: see
"Continuity" below).

**Per decode step** (issue 19, ``tests/test_step_ops.py``) the processor dispatches the fused op
plus at most 3 small ops and never reads a device value on the host:

- prefill mode (and monitor mode past its window, and ``force=True``): the flat view of ``lm_head``'s
  input and the op (2 ops); ``force=False``: nothing;
- monitor mode: the probe layers' and ``lm_head``'s inputs copied into one ``[B, k + 1, H]`` buffer (1 op
  for any number ``k`` of probe layers, instead of a view each; the op reads each layer's strided rows), the ended-row mask (1 ``isin`` into a preallocated buffer), the op, and one
  in-place add that counts each row's latched steps (``latched_at`` is derived from it when read).

Everything else is prepared once per generation at the prefill call: row indices, constant masks,
the stop ids on the device. ``copy_scores=True`` adds one clone.

**Continuity, without reading tokens.** A decode step is taken for the continuation of the previous
one from host facts alone: same batch size, one token longer, exactly one model forward since the
previous call, that forward ran one token per row, and it got *the same KV cache object* as the
forward before it (what ``generate``'s loop does). Only when those facts cannot vouch for the step
(a hand-written loop whose forwards do not pass one cache object along, uncached decoding that
re-runs the whole sequence, a classifier-free-guidance forward in between) does the processor
compare the rows' previous tokens with the previous call's on the device (a host sync on a GPU),
and raise or start over as before. Not detected: a loop that reorders its rows *and* the cache
between steps and passes the same cache object on (beam search by hand): beam search in
``generate`` is refused (``handle.generate`` up front, the bare processor at its first call, which
sees log-probabilities).

Beam search is not supported: transformers hands processors log-probabilities there and reorders
beams between steps, which the per-row latch does not follow (``handle.generate`` refuses it).
In monitor mode, rows that already ended (last token EOS or pad) are not probed again, and only the
first ``handle.monitor_window`` generated tokens are probed (the window ``tau_monitor`` was
calibrated on; at call ``s`` the newest generated token is token ``s - 1``).
"""
from __future__ import annotations

import logging
import threading
import weakref

import torch
from transformers import LogitsProcessor

from ..method.pack import warn_monitor_fallback
from ..models import stop_token_ids

log = logging.getLogger(__name__)

MODES = ("prefill", "monitor")


#: tokens of each row compared with the previous call's when host facts cannot vouch for a continued step
_CONTINUITY_WINDOW = 64

UNSUPPORTED_DECODING = (
    "AutoSteer's logits processor was {what}. It steers one new token per row per step, in the rows' own order, "
    "on raw logits: use greedy decoding or sampling (handle.generate refuses the other modes up front); for "
    "speculative decoding use the serving integrations")


def _weak(obj):
    """A weak reference to ``obj`` (a KV cache: the processor must not keep it alive), or None."""
    if obj is None:
        return None
    try:
        return weakref.ref(obj)
    except TypeError:  # a legacy tuple cache: a new object every step anyway
        return None


class AutoSteerLogitsProcessor(LogitsProcessor):
    """``force=None``: AutoSteer (gate decides); ``True``: always steer; ``False``: never steer
    (the probe still scores the prompt, so reports can show what the gate would have done)."""

    def __init__(self, handle, mode: str = "prefill", force: bool | None = None, *, copy_scores: bool = False,
                 stop_ids=None, prompt_mask: torch.Tensor | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "monitor" and force is None and getattr(handle, "tau_monitor_fallback", False):
            warn_monitor_fallback()
        self.handle = handle
        self.mode = mode
        self.force = force
        self.latched: torch.Tensor | None = None  # [B] bool
        self.p_unsafe: torch.Tensor | None = None  # [B] float32, score of the last prompt token
        self.p_last: torch.Tensor | None = None  # [B] float32, latest score (monitor mode; NaN: never scored)
        self.gate: torch.Tensor | None = None  # [B] bool, the gate's prefill decision (force=False: what it would do)
        self.step = 0
        # latched_at (a property) = _counted - _count where _count > 0: _count[b] is the number of calls, among
        # the first _counted (the calls that may latch: the prefill call, then monitor mode's probed calls),
        # after which row b was latched; latches are sticky, so a row first latched at call s counts _counted - s
        self._count: torch.Tensor | None = None  # [B] int32
        self._counted = 0
        self._expect_len: int | None = None
        self._last_ids: torch.Tensor | None = None  # the previous call's input ids (a reference, see _continues)
        self._forward: int | None = None  # capture.forwards at the previous call
        self._cache_ref = None  # weak reference to the KV cache object of the previous call's forward
        self._last_cached = False  # the previous call was a cached decode step (fewer new tokens than the sequence)
        self._dev: dict = {}  # per-generation device constants (_prepare_decode)
        self._row_tau: torch.Tensor | None = None  # monitor mode with monitor_from: each row's generated-token tau
        # rows ending on one of these are not probed again (monitor mode): the call's eos / pad ids, else the model's
        self._stop_ids = torch.tensor(sorted(set(stop_ids)) if stop_ids is not None else stop_token_ids(handle.model),
                                      dtype=torch.long)
        # steer a copy: transformers' output_logits returns the very tensor processors receive, which the op
        # would otherwise blend in place
        self.copy_scores = bool(copy_scores)
        # the caller's [B, T] attention mask: finds each row's last prompt token when the model's forward got
        # another form of it (a static cache turns it into a 4D mask before the forward)
        self.prompt_mask = prompt_mask

    @property
    def latched_at(self) -> torch.Tensor | None:
        """[B] int32: the call at which each row first latched (0: the prompt), -1 if never."""
        if self._count is None:
            return None
        return torch.where(self._count > 0, self._counted - self._count, -1).to(torch.int32)

    def _start(self, batch: int, device) -> None:
        self.latched = torch.full((batch,), bool(self.force), dtype=torch.bool, device=device)
        self.p_unsafe = torch.full((batch,), float("nan"), dtype=torch.float32, device=device)
        self.p_last = self.p_unsafe.clone()
        self._count = None
        self._counted = 0
        self._dev = {}
        self.step = 0

    def _last_prompt_rows(self, cap, batch: int) -> torch.Tensor:
        T = cap.probe_tokens
        device = cap.probe_hidden.device
        base = torch.arange(batch, device=device) * T

        def usable(m):
            return isinstance(m, torch.Tensor) and m.dim() == 2 and tuple(m.shape) == (batch, T)

        mask = cap.attention_mask if usable(cap.attention_mask) else self.prompt_mask
        if usable(mask):
            # last position whose mask is 1: right for left and right padding alike
            last = T - 1 - torch.flip(mask.to(device).long(), dims=[1]).argmax(dim=1)
        else:
            last = torch.full((batch,), T - 1, device=device)
        return base + last

    # -- continuity -------------------------------------------------------------------------
    def _continues(self, cache, forwards_since: int, T: int) -> bool:
        """Host facts that vouch for a cached decode step of the same generation: one forward since the
        previous call, one token per row, and the same KV cache object as the previous call's forward
        (generate passes its cache along; a new generation or a hand-written loop that does not gets
        the device comparison instead)."""
        return (forwards_since == 1 and T == 1 and cache is not None and self._cache_ref is not None
                and self._cache_ref() is cache)

    def _tokens_continue(self, input_ids) -> bool:
        """Each row's previous tokens equal the previous call's (a device comparison: a host sync on a
        GPU; only when :meth:`_continues` cannot tell). ``_last_ids`` is a reference, not a copy (a copy
        would cost every step ops): ``generate`` builds a new tensor every step and never writes into an
        old one; a hand-written loop that rewrites its previous ids tensor in place is compared with itself."""
        prev = self._last_ids
        n = prev.shape[1]  # == input_ids.shape[1] - 1 here
        w = min(_CONTINUITY_WINDOW, n)
        return torch.equal(input_ids[:, n - w:n], prev[:, n - w:])

    # -- the call ---------------------------------------------------------------------------
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        cap = self.handle.capture
        if any(h is None for h in cap.probe_raws) or cap.head_raw is None:  # (every probe layer's, this forward's)
            raise RuntimeError("AutoSteer saw no hidden states: the handle is detached or the model was not run")
        if cap.thread is not None and cap.thread != threading.get_ident():
            raise RuntimeError("AutoSteer: another thread ran the model since this step's forward (concurrent generate "
                               "calls on one model): use handle.generate, which serialises them, or one model per thread")
        if cap.forwards == self._forward:
            raise RuntimeError(UNSUPPORTED_DECODING.format(
                what="called twice for one forward (assisted, prompt-lookup or speculative decoding: several candidate "
                     "tokens per step)"))
        forwards_since = None if self._forward is None else cap.forwards - self._forward
        self._forward = cap.forwards
        cache = cap.take_cache()
        batch = scores.shape[0]
        T = cap.probe_tokens
        new = (self.latched is None or self.latched.shape[0] != batch or input_ids.shape[1] != self._expect_len
               or (T > 1 and self._last_cached))  # a multi-token prefill after cached decode steps
        if not new and not self._continues(cache, forwards_since, T) and not self._tokens_continue(input_ids):
            if T == 1:  # a cached decode step whose rows no longer continue the previous step's rows
                raise RuntimeError(UNSUPPORTED_DECODING.format(
                    what="given rows that do not continue the previous step's rows (beam search or another method that "
                         "reorders sequences)"))
            new = True  # another prompt batch of the length the previous call would have reached
        if not new and forwards_since != 1:
            raise RuntimeError(UNSUPPORTED_DECODING.format(
                what=f"called after {forwards_since} model forwards since its previous step (classifier-free guidance "
                     "or another processor that runs the model: the captured hidden states are not this step's)"))
        self._cache_ref = _weak(cache)
        self._expect_len = input_ids.shape[1] + 1
        self._last_ids = input_ids
        self._last_cached = T < input_ids.shape[1]
        if self.copy_scores:
            scores = scores.clone()
        if new:
            self._prefill_call(cap, input_ids, scores)
        else:
            self._decode_call(cap, input_ids, scores)
        self.step += 1
        return scores

    def _prefill_call(self, cap, input_ids, scores) -> None:
        """The first call of a generation: the gate on each row's last prompt token (any number of ops:
        once per generation), then the constants every decode step uses."""
        batch, device = scores.shape[0], scores.device
        if batch and scores.shape[-1] > 1 and bool(((torch.logsumexp(scores.float(), -1)).abs() < 1e-4).all()):
            raise RuntimeError(UNSUPPORTED_DECODING.format(
                what="given log-probabilities instead of logits (beam search normalises before its processors)"))
        self._start(batch, device)
        # rows whose prompt is off the pack's format, refused by the handle's prompt check: latched from the start
        refused = self.handle.refused_rows(input_ids, self.prompt_mask, getattr(self, "pad_id", None)) \
            if self.force is None and hasattr(self.handle, "refused_rows") else None
        if refused is not None:
            self.latched |= refused
        # the pooled gate (a pack with pooling "last_token|max"): a row whose highest prompt-token score passes tau
        # is latched here, before the op, so the op blends it at this step as it blends a row the last token fires
        p_pool = self._pooled_scores(cap, input_ids, batch) if self.force is not True else None
        if p_pool is not None and self.force is None:
            self.latched |= self.handle.gate_decision(p_pool)
        probe_rows = self._last_prompt_rows(cap, batch)
        p = torch.full((batch,), float("nan"), dtype=torch.float32, device=device)
        parts = cap.probe_parts
        if self.force is False:  # score the prompt, never touch the logits
            p = self.handle.probe_scores(torch.cat([h.index_select(0, probe_rows) for h in parts], dim=1))
        else:
            probe_mask = torch.full((batch,), self.force is None, dtype=torch.bool, device=device)
            head_rows = torch.arange(batch, device=device) * cap.head_tokens + (cap.head_tokens - 1)
            self.handle.step_op(parts[0], probe_rows, probe_mask, cap.head_hidden, head_rows,
                                scores, self.latched, p, tau=self.handle.tau, generated=False, probe_extra=parts[1:])
        if p_pool is not None:  # the gate's score: the higher of the two probes' (NaN stays NaN)
            p = torch.maximum(p, p_pool.to(p.device))
        self.p_unsafe = p.clone()
        low = self.handle.monitor_from
        # two-stage gate: generated tokens latch only in rows whose prompt score reached monitor_from
        self._row_tau = None
        if low is not None and self.mode == "monitor":
            from ..method.pack import grey_zone_taus

            self._row_tau = grey_zone_taus(p, low, self.handle.tau_monitor)
        self.gate = self.handle.gate_decision(p) if self.force is not True else torch.ones_like(self.latched)
        if refused is not None:
            self.gate |= refused
        self.p_last = p
        self._count = self.latched.to(torch.int32)
        self._counted = 1
        self._prepare_decode(cap, input_ids, batch, device)

    def _pooled_scores(self, cap, input_ids, batch: int) -> torch.Tensor | None:
        """``[B]`` the pooled gate's scores over each row's prompt tokens from the pack's ``pool_skip`` on (padding
        left out by the call's mask), or None for a pack without a pooled gate. A forward that ran only the end of
        the prompt (a KV cache holding its start) pools the tokens it ran, and says so once."""
        handle = self.handle
        if getattr(handle, "pool_probe", None) is None:
            return None
        T = cap.probe_tokens
        raws = [h if h.dim() == 3 else h.unsqueeze(0) for h in cap.probe_raws]
        if any(tuple(h.shape[:2]) != (batch, T) for h in raws):
            raise RuntimeError(f"AutoSteer's pooled gate: the prefill states are {tuple(raws[0].shape)}, expected "
                               f"[{batch}, {T}, H]")
        device = raws[0].device
        M = input_ids.shape[1] if input_ids is not None and input_ids.dim() == 2 else T

        def usable(m):
            return isinstance(m, torch.Tensor) and m.dim() == 2 and m.shape[0] == batch and m.shape[1] in (M, T)

        mask = cap.attention_mask if usable(cap.attention_mask) else self.prompt_mask if usable(self.prompt_mask) else None
        if mask is None:
            mask = torch.ones((batch, max(M, T)), dtype=torch.long, device=device)
        mask = mask.to(device).long()
        pos = mask.cumsum(1) - 1  # each real token's position in its prompt (left or right padding)
        keep = (mask.bool() & (pos >= handle.pool_skip))[:, -T:]
        if T < mask.shape[1] and not getattr(handle, "_warned_pool_cached", False):
            handle._warned_pool_cached = True
            log.warning("autosteer: the pooled gate read %d of the prompt's %d tokens (the forward ran on a KV cache "
                        "holding the rest): tokens before them are not pooled", T, mask.shape[1])
        return handle.pooled_scores(raws, keep)

    def _prepare_decode(self, cap, input_ids, batch: int, device) -> None:
        rows = torch.arange(batch, device=device)
        d = {"rows": rows, "no_probe": torch.zeros(batch, dtype=torch.bool, device=device)}
        if self.mode == "monitor" and self.force is None:
            mask2d = torch.ones((batch, 1), dtype=torch.bool, device=device)
            d["mask2d"], d["mask"] = mask2d, mask2d.view(batch)  # isin writes the [B, 1] form, the op reads [B]
            if len(self._stop_ids):
                d["stop"] = self._stop_ids.to(device=device, dtype=input_ids.dtype)  # once, not per step
            h, k = cap.head_raw, len(cap.layers)
            # the probe layers' and lm_head's decode-step inputs, side by side: one copy per step instead of a flat
            # view each; [:, l] is probe layer l's row, [:, k] lm_head's (strided [B, H] views, made once here)
            stacked = torch.empty((batch, k + 1, h.shape[-1]), dtype=h.dtype, device=device)
            d["stacked"], d["parts"], d["head"] = stacked, [stacked[:, i] for i in range(k)], stacked[:, k]
        self._dev = d

    def _decode_call(self, cap, input_ids, scores) -> None:
        """A decode step: the op plus at most 3 small ops (see the module docstring), no host sync."""
        if self.force is False:
            return
        d, batch = self._dev, scores.shape[0]
        window = self.handle.monitor_window
        probe = self.mode == "monitor" and self.force is None and (window is None or self.step <= window)
        if not probe:  # nothing is probed: the op blends the latched rows (lm_head's input doubles as probe input)
            head = cap.head_hidden
            rows = d["rows"] if head.shape[0] == batch else (
                torch.arange(batch, device=scores.device) * cap.head_tokens + (cap.head_tokens - 1))
            self.handle.step_op(head, rows, d["no_probe"], head, rows, scores, self.latched, self.p_last,
                                tau=self.handle.tau_monitor, generated=self.mode == "monitor",
                                probe_extra=(head,) * (len(cap.layers) - 1))
            return
        probe_mask = self._probe_mask(cap, input_ids, d, batch)
        parts, probe_rows, head_hidden, head_rows = self._hidden(cap, d, batch, scores.device)
        # p_out is p_last itself: the op writes the probed rows' scores and leaves the others' as they were
        self.handle.step_op(parts[0], probe_rows, probe_mask, head_hidden, head_rows, scores, self.latched,
                            self.p_last, tau=self.handle.tau_monitor, generated=True, probe_extra=parts[1:],
                            row_tau=self._row_tau)
        self._count.add_(self.latched)
        self._counted += 1

    def _probe_mask(self, cap, input_ids, d, batch: int) -> torch.Tensor:
        """Rows whose newest token is not a stop id (ended rows are not probed again): one ``isin`` into the
        preallocated mask, on the token ids the forward ran on (``[B, 1]``: the token the probe reads)."""
        if "stop" not in d:
            return d["mask"]  # all True, filled once
        ids = cap.input_ids
        if isinstance(ids, torch.Tensor) and tuple(ids.shape) == (batch, 1) and ids.device == d["mask2d"].device:
            torch.isin(ids, d["stop"], invert=True, out=d["mask2d"])
            return d["mask"]
        return torch.isin(input_ids[:, -1], d["stop"], invert=True)  # embeddings-only forward, uncached decoding

    def _hidden(self, cap, d, batch: int, device):
        """(probe_parts, probe_rows, head_hidden, head_rows) of a decode step: one ``cat`` into the
        preallocated ``[B, k + 1, H]`` buffer when every input is ``[B, 1, H]`` as at prefill time, else the
        flat views and their row indices."""
        raws, h, buf = cap.probe_raws, cap.head_raw, d["stacked"]
        one = (batch, 1, buf.shape[-1])
        if all(tuple(x.shape) == one and x.dtype == buf.dtype and x.device == buf.device for x in (*raws, h)):
            torch.cat((*raws, h), dim=1, out=buf)
            return d["parts"], d["rows"], d["head"], d["rows"]
        T, t = cap.probe_tokens, cap.head_tokens  # uncached decoding re-runs the whole sequence
        probe_rows = torch.arange(batch, device=device) * T + (T - 1)
        head_rows = torch.arange(batch, device=device) * t + (t - 1)
        return cap.probe_parts, probe_rows, cap.head_hidden, head_rows
