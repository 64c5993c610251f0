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
continues the last one only if the batch size is the same, the sequences are one token longer,
their previous last tokens are unchanged, and no new multi-token prefill ran in between).

Beam search is not supported: transformers hands processors log-probabilities there and reorders
beams between steps, which the per-row latch does not follow (``handle.generate`` refuses it).
In monitor mode, rows that already ended (last token EOS or pad) are not probed again, and only the
first ``handle.monitor_window`` generated tokens are probed (the window ``tau_monitor`` was
calibrated on; at call ``s`` the newest generated token is token ``s - 1``).
"""
from __future__ import annotations

import threading

import torch
from transformers import LogitsProcessor

from ..method.pack import warn_monitor_fallback
from ..models import stop_token_ids

MODES = ("prefill", "monitor")


#: tokens of each row compared with the previous call's to tell a continued row from a reordered one
_CONTINUITY_WINDOW = 64

UNSUPPORTED_DECODING = (
    "AutoSteer's logits processor was {what}. It steers one new token per row per step, in the rows' own order, "
    "on raw logits: use greedy decoding or sampling (handle.generate refuses the other modes up front); for "
    "speculative decoding use the serving integrations")


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
        self.latched_at: torch.Tensor | None = None  # [B] int32, step of the first trigger (-1: never)
        self.gate: torch.Tensor | None = None  # [B] bool, the gate's prefill decision (force=False: what it would do)
        self.step = 0
        self._expect_len: int | None = None
        self._last_ids: torch.Tensor | None = None  # the previous call's last _CONTINUITY_WINDOW input ids
        self._forward: int | None = None  # capture.forwards at the previous call
        self._last_cached = False  # the previous call was a cached decode step (fewer new tokens than the sequence)
        # rows ending on one of these are not probed again (monitor mode): the call's eos / pad ids, else the model's
        self._stop_ids = torch.tensor(sorted(set(stop_ids)) if stop_ids is not None else stop_token_ids(handle.model),
                                      dtype=torch.long)
        # steer a copy: transformers' output_logits returns the very tensor processors receive, which the op
        # would otherwise blend in place
        self.copy_scores = bool(copy_scores)
        # the caller's [B, T] attention mask: finds each row's last prompt token when the model's forward got
        # another form of it (a static cache turns it into a 4D mask before the forward)
        self.prompt_mask = prompt_mask

    def _start(self, batch: int, device) -> None:
        self.latched = torch.full((batch,), bool(self.force), dtype=torch.bool, device=device)
        self.p_unsafe = torch.full((batch,), float("nan"), dtype=torch.float32, device=device)
        self.p_last = self.p_unsafe.clone()
        self.latched_at = torch.where(self.latched, 0, -1).to(torch.int32)
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

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        cap = self.handle.capture
        if cap.probe_hidden is None or cap.head_hidden is None:
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
        batch = scores.shape[0]
        device = scores.device
        T = cap.probe_tokens
        new = (self.latched is None or self.latched.shape[0] != batch or input_ids.shape[1] != self._expect_len
               or (T > 1 and self._last_cached))  # a multi-token prefill after cached decode steps
        if not new and not torch.equal(input_ids[:, -1 - self._last_ids.shape[1]:-1], self._last_ids):
            if T == 1:  # a cached decode step whose rows no longer continue the previous step's rows
                raise RuntimeError(UNSUPPORTED_DECODING.format(
                    what="given rows that do not continue the previous step's rows (beam search or another method that "
                         "reorders sequences)"))
            new = True  # another prompt batch of the length the previous call would have reached
        if not new and forwards_since != 1:
            raise RuntimeError(UNSUPPORTED_DECODING.format(
                what=f"called after {forwards_since} model forwards since its previous step (classifier-free guidance "
                     "or another processor that runs the model: the captured hidden states are not this step's)"))
        if new:
            if batch and scores.shape[-1] > 1 and bool(((torch.logsumexp(scores.float(), -1)).abs() < 1e-4).all()):
                raise RuntimeError(UNSUPPORTED_DECODING.format(
                    what="given log-probabilities instead of logits (beam search normalises before its processors)"))
            self._start(batch, device)
        self._expect_len = input_ids.shape[1] + 1
        self._last_ids = input_ids[:, -_CONTINUITY_WINDOW:].clone()  # bounded: O(B) work per step, any length
        self._last_cached = T < input_ids.shape[1]
        if self.copy_scores:
            scores = scores.clone()
        if new:
            probe_rows = self._last_prompt_rows(cap, batch)
        else:
            probe_rows = torch.arange(batch, device=device) * T + (T - 1)
        was = self.latched.clone()
        p = torch.full((batch,), float("nan"), dtype=torch.float32, device=device)
        probed = torch.full((batch,), bool(new), dtype=torch.bool, device=device)  # rows scored at this call
        if self.force is False:
            if new:  # score the prompt, never touch the logits
                p = self.handle.probe_scores(cap.probe_hidden.index_select(0, probe_rows))
        else:
            window = self.handle.monitor_window
            probe = (new or (self.mode == "monitor" and (window is None or self.step <= window))) and self.force is None
            probe_mask = torch.full((batch,), probe, dtype=torch.bool, device=device)
            if probe and not new and len(self._stop_ids):  # ended rows are not probed again
                probe_mask &= ~torch.isin(input_ids[:, -1], self._stop_ids.to(device))
            probed = probe_mask
            head_rows = torch.arange(batch, device=device) * cap.head_tokens + (cap.head_tokens - 1)
            # every row of a transformers step is in the same phase: the prompt's last token at the
            # first call, a generated token after it -- one probe and one threshold per call
            self.handle.step_op(cap.probe_hidden, probe_rows, probe_mask, cap.head_hidden, head_rows,
                                scores, self.latched, p, tau=self.handle.tau if new else self.handle.tau_monitor,
                                generated=not new and self.mode == "monitor")
        if new:
            self.p_unsafe = p.clone()
            self.gate = self.handle.gate_decision(p) if self.force is not True else torch.ones_like(self.latched)
        if new:
            self.p_last = p
        elif self.mode == "monitor":  # the latest score of each row (kept where this call did not probe it)
            self.p_last = torch.where(probed, p, self.p_last)
        self.latched_at = torch.where(self.latched & ~was, self.step, self.latched_at).to(torch.int32)
        self.step += 1
        return scores
