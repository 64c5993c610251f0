"""``autosteer.attach(model, pack)``: AutoSteer on a live transformers model.

>>> handle = autosteer.attach(model, "smollm2.pack.safetensors")
>>> out = model.generate(**inputs, logits_processor=[handle.logits_processor()])
>>> handle.detach()

or ``handle.generate(**inputs)``, which also returns each row's gate decision.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList

from ..method.pack import (PackError, SteerPack, check_fingerprint, grey_zone_start, load_pack, monitor_threshold,
                           prompt_threshold)
from ..method.pack import monitor_window as resolve_monitor_window
from ..method.probe import Probe
from ..models import num_layers, output_head, stop_token_ids
from .capture import HiddenCapture
from .processor import MODES, AutoSteerLogitsProcessor
from .prompt_check import PromptCheck, check_for_pack, parse_policy
from .reference_op import refusal_basis

log = logging.getLogger(__name__)


def _execution_device(module: torch.nn.Module) -> torch.device | None:
    """Where ``module`` runs: accelerate's hook's execution device for a dispatched model (its weights may sit
    on "meta" or be offloaded), else its first parameter's device; None for a module without parameters."""
    dev = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if dev is not None:
        return torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}")
    p = next(module.parameters(), None)
    return None if p is None else p.device


def _compiles_kernels(device: torch.device) -> bool:
    """The op's kernels are compiled at first use on this device (Triton on CUDA; the CPU's C++ op is built)."""
    return device.type == "cuda"


def check_single_device(model, layers) -> None:
    """The op runs on one device, with the logits, the probe layers' states and lm_head's input on it. A model
    split over devices (``device_map`` over several GPUs) that runs a probe layer, lm_head or the input
    embeddings (where ``generate`` puts the logits) on different devices is refused here, by name, instead of
    by the op's mixed-device check at the first step."""
    from ..models import decoder_layers

    blocks = decoder_layers(model)
    where = {"input embeddings (the logits' device)": _execution_device(model.get_input_embeddings()),
             "lm_head": _execution_device(output_head(model))}
    where.update({f"probe layer {L}": _execution_device(blocks[L]) for L in layers})
    devices = {d for d in where.values() if d is not None}
    if len(devices) > 1:
        listed = ", ".join(f"{k} on {v}" for k, v in where.items() if v is not None)
        raise ValueError(f"AutoSteer runs its per-step op on one device, but this model is split: {listed}. Load it "
                         "on one device, or use a device_map that keeps the embeddings, these decoder layers and "
                         "lm_head together (serving: vLLM or TGI tensor parallelism is supported)")


class AutoSteerFault(RuntimeError):
    """The per-step op failed and the handle fails closed: the generation is stopped."""


@dataclass
class SteeredOutput:
    sequences: torch.Tensor  # what generate returned (prompt + new tokens)
    steered: torch.Tensor  # [B] bool: the refusal blend was applied to this row (never with force=False)
    p_unsafe: torch.Tensor  # [B] float32: the gate's prompt score (NaN where not probed): the last prompt token's, or
    # with a pooled gate (pack pooling "last_token|max") the higher of it and the highest prompt token's
    latched_at: torch.Tensor  # [B] int32: decode step of the first trigger, -1 if never
    gate: torch.Tensor  # [B] bool: the gate's prefill decision (with force=False: what it would have done)
    # generate's own return value: the same sequences, plus scores / logits / hidden states when the
    # call asked for them (return_dict_in_generate=True, output_scores=True, ...)
    generate_output: object = None


class AutoSteerHandle:
    """Hooks on one model plus the pack's weights, ready for the per-step op.

    ``mode``: ``"prefill"`` (decide once per generation, the paper) or ``"monitor"``
    (re-probe every generated token, latch on the first trigger). ``tau`` overrides the pack's
    threshold: a number (``pack.meta["tau_paper"]`` is the paper's 0.5) or one of the pack's operating
    points, ``"strict"``, ``"balanced"``, ``"permissive"``; ``tau_monitor`` the pack's threshold
    for generated tokens in monitor mode (a prefill-only pack falls back to ``tau``, with a warning);
    ``monitor_window`` how many generated tokens monitor mode probes (default: the number the pack's
    ``tau_monitor`` was calibrated on, so its false-latch rate holds for any response length; 0: all).
    ``monitor_from`` (monitor mode): watch only the requests whose prompt score is at least this -- the
    two-stage gate: a grey zone ``[monitor_from, tau)`` under the prompt threshold whose first generated
    tokens are probed (a number, or an operating point's name, e.g. ``"strict"``); None (default): every
    request is watched.

    ``fail_closed`` (default ``True``) is the policy when the plugin cannot decide: a NaN probe
    score (non-finite hidden states) steers the row, and an error inside the per-step op stops
    the generation (:class:`AutoSteerFault`) rather than letting it go on unguarded. With
    ``fail_closed=False`` a NaN score leaves the row unsteered and an op error is logged once
    and the step's logits are left as the model produced them (fail open: availability first).
    """

    def __init__(self, model, pack: SteerPack, mode: str = "prefill", tau: float | str | None = None,
                 fail_closed: bool = True, check_model: bool = True, tau_monitor: float | None = None,
                 monitor_window: int | None = None, monitor_from: float | str | None = None, tokenizer=None,
                 prompt_check: str = "warn"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if getattr(model, "_autosteer_handle", None) is not None:
            raise RuntimeError("this model already has an AutoSteer handle attached: detach() it first")
        if check_model:
            check_fingerprint(pack.meta["fingerprint"], model)
        E = output_head(model).weight
        if E.shape[1] != pack.hidden_size:
            raise PackError(f"pack hidden size {pack.hidden_size} does not match the model's {E.shape[1]}")
        for layer in pack.layers:
            if layer >= num_layers(model):
                raise PackError(f"pack layer {layer} does not exist in a model with {num_layers(model)} layers")
        check_single_device(model, pack.layers)
        tau = prompt_threshold(pack, tau)
        self.model = model
        self.pack = pack
        self.mode = mode
        self.tau = tau
        # monitor mode probes generated tokens against their own threshold (the pack's tau_monitor)
        self.tau_monitor, self.tau_monitor_fallback = monitor_threshold(pack, tau, tau_monitor)
        # ... for its first monitor_window generated tokens (None: all of them)
        self.monitor_window = resolve_monitor_window(pack, monitor_window)
        # ... for the requests whose prompt score is at least monitor_from (None: all of them)
        self.monitor_from = grey_zone_start(pack, tau, monitor_from)
        self.eps = pack.eps
        self.fail_closed = bool(fail_closed)
        self.faults = 0  # op errors swallowed in fail-open mode
        device = E.device
        self.W1 = pack.W1.to(device)
        self.b1 = pack.b1.to(device)
        self.w2 = pack.w2.to(device)
        self.b2 = pack.b2.to(device)
        # the monitor probe (generated tokens in monitor mode), or None: the prefill probe scores them too
        self.monitor_probe = None
        if pack.has_monitor_probe:
            self.monitor_probe = tuple(pack.monitor[k].to(device) for k in ("W1", "b1", "w2", "b2"))
        # the pooled gate's token probe (pack pooling "last_token|max"), or None: read at each prompt's prefill
        self.pool_probe = pack.pool_probe()
        if self.pool_probe is not None:
            self.pool_probe = type(self.pool_probe)(*(t.to(device) for t in (self.pool_probe.W1, self.pool_probe.b1,
                                                                              self.pool_probe.w2, self.pool_probe.b2)))
        self.pool_skip = pack.pool_skip
        self.U = refusal_basis(E, pack.A, device=device)  # E A, once: the op never rebuilds E S per step
        self.Bt = pack.B.t().contiguous().to(device)
        from .op import steer_step

        self._op = steer_step
        # requests in another prompt format than the pack's (see runtime.prompt_check): needs the tokenizer
        self.prompt_check = PromptCheck(None, "off", setting="prompt_check")
        self._prompt_policy = parse_policy(prompt_check, "prompt_check")
        if tokenizer is not None:
            self.check_tokenizer(tokenizer)
        elif self._prompt_policy == "refuse":  # asked for, and impossible: a named error, not a silent no-op
            raise ValueError("prompt_check='refuse' needs the tokenizer the prompts are encoded with: "
                             "attach(model, pack, tokenizer=tok, prompt_check='refuse')")
        self.capture = HiddenCapture(model, pack.layers)
        self._lock = threading.Lock()
        if _compiles_kernels(E.device):  # the Triton kernels JIT at first use: compile them here, not in a request
            self.precompile()
        model._autosteer_handle = self

    def precompile(self, logits_dtypes=(torch.float32,)) -> int:
        """Run the op once per kernel variant this handle's steps launch, on one dummy row each: every logits
        dtype given (``generate`` hands processors float32 scores), the prefill probe and the monitor probe if
        the pack has one, with the model's hidden dtype, one operand per probe layer and the processor's int64
        row indices, the row latched so that the blend launch runs too. On CUDA this compiles the Triton kernels
        at ``attach`` (called there), so the first request does not pay the JIT; on the CPU it runs the C++ op.
        The weights are only read. Returns the number of op calls."""
        from .op import run_each_variant

        probes = [(self.W1, self.b1, self.w2, self.b2)] + ([self.monitor_probe] if self.monitor_probe else [])
        return run_each_variant(self._op, [(*p, None) for p in probes], self.U, self.Bt, self.tau, self.eps,
                                self.fail_closed, hidden_dtype=output_head(self.model).weight.dtype,
                                layers=len(self.pack.layers), logits_dtypes=logits_dtypes)

    # -- per step -------------------------------------------------------------------------
    def step_op(self, probe_hidden, probe_rows, probe_mask, head_hidden, head_rows, logits, latched, p_out,
                tau: float | None = None, generated: bool = False, probe_extra=(), row_tau=None):
        """One fused op call, under the fault policy (see the class docstring). ``tau``: this call's
        threshold (default the prefill threshold; the processor passes ``tau_monitor`` for
        generated tokens). ``generated``: every probed row is a generated token, scored by the
        pack's monitor probe when it has one. ``probe_extra``: the further probe layers' inputs (rows
        as ``probe_hidden``'s), for a pack whose probe reads several layers. ``row_tau``: a threshold per row
        instead of ``tau`` (``monitor_from``: rows outside the grey zone get one no score passes)."""
        W1, b1, w2, b2 = self.W1, self.b1, self.w2, self.b2
        if generated and self.monitor_probe is not None:
            W1, b1, w2, b2 = self.monitor_probe
        try:
            self._op(probe_hidden, probe_rows, probe_mask, head_hidden, head_rows, logits, latched, p_out,
                     W1, b1, w2, b2, self.U, self.Bt, self.tau if tau is None else tau, self.eps, self.fail_closed,
                     probe_extra=probe_extra, row_tau=row_tau)
        except Exception as exc:  # noqa: BLE001 - the policy decides, for any failure of the op
            if self.fail_closed:
                raise AutoSteerFault(f"AutoSteer's per-step op failed, generation stopped (fail closed): {exc}") from exc
            if self.faults == 0:
                log.error("AutoSteer's per-step op failed; continuing UNSTEERED (fail_closed=False): %s", exc)
            self.faults += 1

    def probe_scores(self, h: torch.Tensor) -> torch.Tensor:
        """Prefill-probe scores of ``h`` ``[n, k*H]``: the probe layers' states side by side, in the pack's order."""
        return Probe(self.W1, self.b1, self.w2, self.b2).score(h)

    def pooled_scores(self, parts: list[torch.Tensor], keep: torch.Tensor) -> torch.Tensor | None:
        """The pooled gate's ``[B]`` max-token probabilities over the prompt tokens ``keep [B, T]`` marks, from the
        probe layers' prefill inputs ``parts`` (each ``[B, T, H]``); None for a pack without a pooled gate."""
        if self.pool_probe is None:
            return None
        from ..method.token_probe import pooled_scores

        return pooled_scores(self.pool_probe, parts, keep)

    def gate_decision(self, p: torch.Tensor) -> torch.Tensor:
        """What the gate decides for probe scores ``p`` (NaN fires only when failing closed)."""
        fire = p > self.tau
        return fire | torch.isnan(p) if self.fail_closed else fire

    def check_tokenizer(self, tokenizer, prompt_check: str | None = None) -> None:
        """Warn when ``tokenizer``'s chat template is not the one the pack was fitted with (the probe
        reads the last prompt token, so prompts must be formatted exactly as at fit time), and check every
        prompt this handle steers from now on against the pack's prompt format, rendered by ``tokenizer``
        (``prompt_check``: ``warn``, ``refuse`` -- off-format rows are steered from their first token -- or
        ``off``; default: what ``attach`` was given)."""
        from ..prompting import template_hash

        policy = self._prompt_policy if prompt_check is None else parse_policy(prompt_check, "prompt_check")
        want = self.pack.meta.get("chat_template_sha256_16")
        if want and template_hash(tokenizer) != want:
            log.warning("the tokenizer's chat template differs from the one this pack was fitted with: "
                        "the probe may read a different token than at fit time")
        self.prompt_check = check_for_pack(self.pack, tokenizer, policy, setting="prompt_check")
        from ..prompting import text_tokenizer

        self._pad_id = getattr(text_tokenizer(tokenizer), "pad_token_id", None)  # left padding, without a mask

    def refused_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     pad_id: int | None = None) -> torch.Tensor | None:
        """[B] bool on ``input_ids``' device: the rows the prompt-format check refuses (every row is checked, and
        warned about, by policy); None when none is refused or there is no check. Padding is left out by
        ``attention_mask``, else as a leading run of the tokenizer's (or the model's) pad id (left padding)."""
        check = self.prompt_check
        if check.frame is None or input_ids is None or input_ids.dim() != 2:
            return None
        if input_ids.shape[1] == 0:  # generation from inputs_embeds: no prompt ids to compare
            if not getattr(self, "_warned_no_ids", False):
                self._warned_no_ids = True
                log.warning("autosteer: a generation from inputs_embeds has no prompt token ids: its prompt format is "
                            "not checked (prompt_check=%s)", check.policy)
            return None
        ids = input_ids.detach().cpu()
        mask = attention_mask.detach().cpu().bool() if attention_mask is not None and attention_mask.dim() == 2 \
            and attention_mask.shape == ids.shape else None
        pad = pad_id if pad_id is not None else getattr(self, "_pad_id", None)
        if pad is None:
            pad = getattr(getattr(self.model, "generation_config", None), "pad_token_id", None)
        out = []
        for b in range(ids.shape[0]):
            row = ids[b][mask[b]] if mask is not None else ids[b]
            if mask is None and isinstance(pad, int):
                keep = (row != pad).nonzero()
                row = row[int(keep[0]):] if len(keep) else row[:0]
            out.append(check.check(f"row {b}", row.tolist()))
        return torch.tensor(out, device=input_ids.device) if any(out) else None

    # -- user API -------------------------------------------------------------------------
    def logits_processor(self, force: bool | None = None, mode: str | None = None, *,
                         copy_scores: bool = False, prompt_mask: torch.Tensor | None = None) -> AutoSteerLogitsProcessor:
        """A fresh processor for one ``generate`` call. ``force=True`` always steers,
        ``force=False`` never steers (but still scores the prompt). ``copy_scores=True`` steers a copy
        of the scores: needed with ``output_logits=True``, which returns the very tensor processors
        receive (the op blends it in place). ``prompt_mask``: the call's ``[B, T]`` attention mask, to find
        each row's last prompt token when the forward gets another form of it (a static cache with
        right padding). Refused up front only by :meth:`generate`: beam search,
        assisted decoding, classifier-free guidance (a second forward per step: the processor raises
        at its second step), continuous batching (the processor would never run)."""
        self._check_attached()
        return AutoSteerLogitsProcessor(self, mode or self.mode, force, copy_scores=copy_scores, prompt_mask=prompt_mask)

    def generate(self, force: bool | None = None, mode: str | None = None, **generate_kwargs) -> SteeredOutput:
        """``model.generate`` with AutoSteer; returns the sequences and each row's gate decision.
        Tensor inputs are moved to the model's device (floating ones, e.g. ``pixel_values``, to its
        dtype). Calls on one handle are serialised (the hooks hold one forward's tensors at a time)."""
        gc = _check_generation_mode(self.model, generate_kwargs)
        from ..prompting import to_model

        self._check_attached()
        # rows end on the call's eos / pad ids (monitor mode stops probing them)
        # output_logits must stay the model's raw logits: steer a copy then (the scores are the steered ones)
        raw_logits = bool(getattr(gc, "output_logits", None) if gc is not None else generate_kwargs.get("output_logits"))
        proc = AutoSteerLogitsProcessor(self, mode or self.mode, force, stop_ids=stop_token_ids(self.model, gc),
                                        prompt_mask=generate_kwargs.get("attention_mask"), copy_scores=raw_logits)
        proc.pad_id = getattr(gc, "pad_token_id", None)  # the call's padding, for the prompt-format check
        extra = generate_kwargs.pop("logits_processor", None) or []
        generate_kwargs = to_model(generate_kwargs, self.model)  # inputs (and image tensors) on the model's device/dtype
        with self._lock, torch.no_grad():
            seqs = self.model.generate(logits_processor=LogitsProcessorList([proc, *extra]), **generate_kwargs)
        if isinstance(seqs, torch.Tensor):
            sequences = seqs
        else:
            sequences = seqs.sequences
        if proc.latched is None:  # generate produced no token
            b = sequences.shape[0]
            no = torch.zeros(b, dtype=torch.bool)
            return SteeredOutput(sequences, no, torch.full((b,), float("nan")), torch.full((b,), -1, dtype=torch.int32), no,
                                 seqs)
        return SteeredOutput(sequences, proc.latched.cpu(), proc.p_unsafe.cpu(), proc.latched_at.cpu(), proc.gate.cpu(), seqs)

    def detach(self) -> None:
        """Remove the hooks; the model is exactly as before. Safe to call twice."""
        if self.capture.attached:
            self.capture.remove()
        if getattr(self.model, "_autosteer_handle", None) is self:
            self.model._autosteer_handle = None

    def _check_attached(self) -> None:
        if not self.capture.attached:
            raise RuntimeError("this AutoSteer handle was detached")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()


def _check_generation_mode(model, generate_kwargs: dict):
    """Refuse the decoding modes the processor cannot steer, before anything runs: beam search
    (its processors see log-probabilities and beams are reordered between steps), assisted /
    prompt-lookup decoding (several candidate tokens per forward), contrastive search, DoLa,
    classifier-free guidance, continuous batching. Checks the config generate will run with (the
    call's, completed from the model's); returns it."""
    import copy

    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import GenerationMode

    gc = None
    if callable(getattr(model, "_prepare_generation_config", None)):
        try:  # the config generate will run with: the call's, its unset fields from the model's, then kwargs
            gc, _ = model._prepare_generation_config(
                generate_kwargs.get("generation_config"),
                **{k: v for k, v in generate_kwargs.items() if k != "generation_config"})
        except Exception:  # noqa: BLE001 - generate itself will report a malformed config
            gc = None
    if gc is None:
        gc = generate_kwargs.get("generation_config") or getattr(model, "generation_config", None) or GenerationConfig()
        gc = copy.deepcopy(gc)
        gc.update(**{k: v for k, v in generate_kwargs.items() if k != "generation_config" and hasattr(gc, k)})
    if getattr(gc, "cache_implementation", None) == "paged" or isinstance(generate_kwargs.get("custom_generate"), str):
        raise ValueError("AutoSteer does not support transformers' continuous batching (cache_implementation='paged', "
                         "generate_batch) or a custom_generate from the Hub: they build their own logits processors, so "
                         "requests would be served unsteered. Use the default cache, or the serving integrations")
    if getattr(gc, "guidance_scale", None) not in (None, 1, 1.0):
        raise ValueError("AutoSteer does not support classifier-free guidance (guidance_scale) in transformers' "
                         "generate: its extra forward would replace the hidden states the processor probes")
    mode = gc.get_generation_mode(generate_kwargs.get("assistant_model"))
    if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
        why = {GenerationMode.BEAM_SEARCH: "beam search", GenerationMode.BEAM_SAMPLE: "beam search",
               GenerationMode.GROUP_BEAM_SEARCH: "beam search", GenerationMode.CONSTRAINED_BEAM_SEARCH: "beam search",
               GenerationMode.ASSISTED_GENERATION: "assisted / prompt-lookup decoding"}.get(mode, mode.value)
        raise ValueError(f"AutoSteer does not support {why} ({mode.value}) in transformers' generate: its processor "
                         "steers one new token per row per step, on raw logits. Use greedy decoding or sampling "
                         "(speculative decoding: the serving integrations)")
    return gc


def attach(model, pack: SteerPack | str | os.PathLike, mode: str = "prefill", tau: float | str | None = None,
           fail_closed: bool = True, tau_monitor: float | None = None,
           monitor_window: int | None = None, monitor_from: float | str | None = None, tokenizer=None,
           prompt_check: str = "warn") -> AutoSteerHandle:
    """Attach AutoSteer to ``model``: validates the pack against the model, registers the hooks. With
    ``tokenizer``, every prompt steered is checked against the pack's prompt format (its system prompt, chat
    template and generation prompt): ``prompt_check="warn"`` logs the off-format ones (gated at rates nobody
    measured), ``"refuse"`` steers them from their first token, ``"off"`` does not check."""
    if not isinstance(pack, SteerPack):
        pack = load_pack(pack)
    return AutoSteerHandle(model, pack, mode=mode, tau=tau, fail_closed=fail_closed, tau_monitor=tau_monitor,
                           monitor_window=monitor_window, monitor_from=monitor_from, tokenizer=tokenizer,
                           prompt_check=prompt_check)
