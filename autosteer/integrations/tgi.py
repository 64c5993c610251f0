"""AutoSteer inside Hugging Face text-generation-inference (TGI), by patching its Python server.

TGI has no plugin interface for logits processors or model hooks, so this module patches
``text_generation_server`` in the server process before it starts serving. Launch it with::

    AUTOSTEER_PACK=/packs/model.pack.safetensors AUTOSTEER_MODE=prefill \\
        PATH=/opt/autosteer-shim:$PATH text-generation-launcher --model-id ...

where ``/opt/autosteer-shim/text-generation-server`` runs ``autosteer-tgi-server "$@"`` (or
``python -m autosteer.integrations.tgi "$@"``): the launcher starts every shard as
``text-generation-server serve ...`` from ``PATH`` with its whole environment; the shim calls
:func:`install_from_env` for ``serve`` and then runs TGI's own CLI in the same process.
``docs/serving.md`` has the details. That ``PATH`` order does not hold in TGI's official Docker image
(its entrypoint activates ``/usr/src/.venv``, whose own ``text-generation-server`` then comes first):
there use ``scripts/docker/tgi/Dockerfile``, which replaces the venv's script with the shim.

What :func:`install` patches (all TGI-specific names live in :class:`_TGI`):

- ``FlashCausalLM.__init__``: once the model is built (before warmup, hence before CUDA-graph
  capture) the pack is checked against the model (fingerprint of ``lm_head``), ``U = E A`` is
  computed and the capture hooks are registered: the residual stream entering each of the pack's
  layers ``L`` (the sum of layer ``L-1``'s ``(mlp_out, attn_res)`` outputs, computed in the hook,
  written into a preallocated buffer: the CUDA-graph contract of
  :mod:`autosteer.integrations.common`) and the ``lm_head`` input (copied into its buffer during
  warm-up, when TGI captures its graphs, and under any capture; kept by reference in a later eager
  forward, where nothing writes it before the chooser reads it).
- ``FlashCausalLM.generate_token``: records the step's batch (rows -> request ids, which rows
  are prefilling and whether this chunk finishes their prompt) and resets the capture buffers.
- ``HeterogeneousNextTokenChooser.__call__``: stages the step (``begin_step``), makes sure an
  :class:`AutoSteerTGIProcessor` sits first in ``warpers`` (after TGI's penalties/grammar,
  before temperature/top-k/top-p, as with transformers), and commits each request's latch at
  its last *accepted* speculative position (``end_step(accepted_ids)``).
- ``HeterogeneousNextTokenChooser.from_pb``: every chooser built from protobuf -- including the
  one ``FlashCausalLMBatch.concatenate`` rebuilds, which would otherwise drop the processor --
  gets the processor; ``FlashCausalLMBatch.from_pb`` / ``concatenate`` / ``filter`` bind it to
  the batch's request ids; ``filter`` releases the requests it drops, as do ``Cache.delete`` /
  ``clear`` and a ``generate_token`` that returns no batch (all requests stopped); ``warmup``
  releases its dummy requests.

The per-request latch lives in :class:`~autosteer.integrations.common.SteerStateStore`,
keyed by TGI request id, so it survives every batch rebuild. Rows whose prefill chunk is not
the last one (chunked prefill: their token is discarded) neither latch nor are steered.

Not supported (install/attach raises :class:`TGIIntegrationError`): tensor-parallel sharding
of ``lm_head`` (``--num-shard > 1``), Medusa / MLP speculators (n-gram ``--speculate`` works),
models whose layers do not return ``(mlp_out, attn_res)``, TGI's transformers fallback
(``TransformersFlashCausalLM``). Tested against an in-repo simulation of TGI's batch protocol
(``tests/test_tgi_simulation.py``) and against TGI's real ``utils.tokens`` / ``FlashCausalLMBatch`` /
``FlashCausalLM.generate_token`` code on CPU with a stand-in model forward
(``scripts/verify_tgi_real.sh``); not on a running TGI server with a GPU.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import logging
import os
import sys
import threading
from dataclasses import dataclass

import torch

from ..method.pack import pack_sha256
from ..models import resolve_attr as _resolve
from ..runtime.prompt_check import ENV_PROMPT_CHECK, PromptCheck, PromptCheckError, check_for_pack, parse_policy
from .common import (ENV_MONITOR_FROM, ENV_MONITOR_WINDOW, MODES, HiddenBuffer, SteerStateStore, SteerWeights, TokenPool,
                     check_pack_matches, check_served_pooling, hook_input, hook_output_sum, parse_flag,
                     parse_monitor_window, parse_threshold, refused, token_rows)

log = logging.getLogger(__name__)

ENV_PACK = "AUTOSTEER_PACK"
ENV_MODE = "AUTOSTEER_MODE"
ENV_TAU = "AUTOSTEER_TAU"
ENV_FAIL_CLOSED = "AUTOSTEER_FAIL_CLOSED"
ENV_LOG_DECISIONS = "AUTOSTEER_LOG_DECISIONS"


class TGIIntegrationError(RuntimeError):
    """TGI's internals do not match what this integration was written against, or the model /
    configuration is one it does not support; the message says which."""


# ---------------------------------------------------------------------------------------------
# Everything this module knows about text_generation_server's internals: keep it here.


class _TGI:
    """Module, class, method and attribute names of ``text_generation_server`` (TGI server
    package), as of TGI commit db931fcf (2026-01-08)."""

    VERSION_NOTE = "TGI commit db931fcf (2026-01-08)"
    TOKENS = "text_generation_server.utils.tokens"
    FLASH = "text_generation_server.models.flash_causal_lm"
    BASE = "text_generation_server.models.model"  # Model: the base class of every TGI model class
    CACHE = "text_generation_server.cache"
    CLI = "text_generation_server.cli"
    CHOOSER = "HeterogeneousNextTokenChooser"
    BATCH = "FlashCausalLMBatch"
    MODEL = "FlashCausalLM"
    CACHE_CLS = "Cache"
    GLOBALS = "text_generation_server.models.globals"  # PREFIX_CACHING: read from the PREFIX_CACHING env at import
    # (module, class, attribute, kind, leading parameter names)
    TARGETS = (
        (TOKENS, CHOOSER, "__call__", "method", ("self", "input_ids", "scores", "speculate", "speculated_ids",
                                                 "speculative_scores")),
        (TOKENS, CHOOSER, "from_pb", "classmethod", ("cls", "pb")),
        (TOKENS, CHOOSER, "filter", "method", ("self", "indices")),
        (FLASH, BATCH, "from_pb", "classmethod", ("cls", "pb")),
        (FLASH, BATCH, "filter", "method", ("self", "request_ids")),
        (FLASH, BATCH, "concatenate", "classmethod", ("cls", "batches")),
        (BASE, "Model", "__init__", "method", ("self",)),
        (FLASH, MODEL, "__init__", "method", ("self",)),
        (FLASH, MODEL, "generate_token", "method", ("self", "batch")),
        (FLASH, MODEL, "warmup", "method", ("self", "batch")),
        (CACHE, CACHE_CLS, "delete", "method", ("self", "batch_id")),
    )
    # batch attributes read at each step
    BATCH_ATTRS = ("requests", "prefilling", "prefilling_mask", "prompt_lengths", "cache_lengths", "input_lengths",
                   "cu_seqlen_prefill", "prefill_next_token_indices", "next_token_chooser")
    # FlashCausalLM.model -> its decoder layers / lm_head (SpeculativeHead)
    LAYER_PATHS = ("model.model.layers", "model.model.language_model.layers", "model.text_model.layers")
    LM_HEAD_PATHS = ("model.lm_head", "model.text_model.lm_head")

    @staticmethod
    def request_ids(batch) -> list[int]:
        return [int(r.id) for r in batch.requests]

    @staticmethod
    def warpers(chooser) -> list:
        return chooser.warpers

    @staticmethod
    def max_graph_rows(flash_module) -> int:
        graphs = getattr(flash_module, "CUDA_GRAPHS", None)
        return max(graphs) if graphs else 0

    @staticmethod
    def still_prefilling(batch) -> list[bool]:
        """Rows whose prompt is not finished after this step's chunk (TGI discards their token):
        the rule of ``FlashCausalLM.generate_token``'s chunk planner."""
        return [p - c - i > 0 for p, c, i in zip(batch.prompt_lengths, batch.cache_lengths, batch.input_lengths)]

    @staticmethod
    def prefix_caching() -> bool:
        """Whether this TGI server reuses cached prompt prefixes (``models.globals.PREFIX_CACHING``, which TGI sets
        from the launcher's ``PREFIX_CACHING`` environment variable; the environment when the module is absent)."""
        g = sys.modules.get(_TGI.GLOBALS)
        if g is not None and hasattr(g, "PREFIX_CACHING"):
            return bool(g.PREFIX_CACHING)
        return os.environ.get("PREFIX_CACHING", "").strip().lower() in {"1", "true"}

    @staticmethod
    def output_embedding(lm_head) -> torch.Tensor:
        if not hasattr(lm_head, "head"):
            # e.g. TransformersFlashCausalLM (TGI's fallback for architectures without a flash
            # implementation): its lm_head is the transformers model's own nn.Linear
            raise TGIIntegrationError(
                f"lm_head is a {type(lm_head).__name__}, not TGI's SpeculativeHead: only TGI's own flash model "
                "classes are supported (not the transformers fallback, TransformersFlashCausalLM)")
        head = lm_head.head
        if head is None:
            raise TGIIntegrationError(
                "this model's lm_head is a Medusa/MLP speculator (SpeculativeHead.head is None): not supported; "
                "use n-gram speculation (--speculate N without a speculator model) or none")
        if getattr(head, "should_gather", False):
            raise TGIIntegrationError(
                "lm_head is sharded over the vocabulary (tensor parallelism, --num-shard > 1): not supported yet "
                "(the Refusal Head needs the full output embedding on each shard)")
        weight = getattr(getattr(head, "linear", None), "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            raise TGIIntegrationError("lm_head.head.linear.weight is not a float [V, H] matrix (quantized lm_head?)")
        return weight


def _params(fn) -> tuple[str, ...]:
    return tuple(inspect.signature(fn).parameters)


def _check_targets() -> dict:
    """Import TGI's modules and check every patch target; returns {(class, attr): (cls, raw attribute)}."""
    found = {}
    problems = []
    for mod_name, cls_name, attr, kind, lead in _TGI.TARGETS:
        try:
            mod = importlib.import_module(mod_name)
        except Exception as exc:  # noqa: BLE001 - any import failure: TGI is absent or broken
            raise TGIIntegrationError(f"cannot import {mod_name} ({type(exc).__name__}: {exc}); is TGI's server "
                                      "package (text_generation_server) installed in this Python?") from exc
        cls = getattr(mod, cls_name, None)
        if not isinstance(cls, type):
            problems.append(f"{mod_name}.{cls_name} is missing")
            continue
        raw = inspect.getattr_static(cls, attr, None)
        if raw is None:
            problems.append(f"{cls_name}.{attr} is missing")
            continue
        if kind == "classmethod" and not isinstance(raw, classmethod):
            problems.append(f"{cls_name}.{attr} is no longer a classmethod")
            continue
        fn = raw.__func__ if isinstance(raw, classmethod) else raw
        if kind == "method" and not callable(fn):
            problems.append(f"{cls_name}.{attr} is not callable")
            continue
        got = _params(fn)
        if got[: len(lead)] != lead:
            problems.append(f"{cls_name}.{attr} takes {got}, expected it to start with {lead}")
            continue
        found[(cls_name, attr)] = (cls, raw)
    if problems:
        raise TGIIntegrationError("text_generation_server does not match what autosteer was written against "
                                  f"({_TGI.VERSION_NOTE}): " + "; ".join(problems))
    return found


# ---------------------------------------------------------------------------------------------
# the processor and the per-process runtime


class AutoSteerTGIProcessor:
    """The AutoSteer entry of a ``HeterogeneousNextTokenChooser``'s ``warpers`` list.

    TGI calls it as ``proc(input_ids, scores)`` once per speculative position with that
    position's ``[B, V]`` scores, and ``proc.filter(indices)`` when the batch is filtered. It
    holds no latch state itself (that lives in the runtime's store, keyed by request id), only
    the request ids of its chooser's rows, which are checked against the step's batch.
    """

    def __init__(self, runtime: "_Runtime", request_ids: list[int] | None = None):
        self.runtime = runtime
        self.request_ids = None if request_ids is None else list(request_ids)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self.runtime.process(self, scores)

    def filter(self, indices):
        ids = None if self.request_ids is None else [self.request_ids[i] for i in indices]
        return AutoSteerTGIProcessor(self.runtime, ids)

    def __repr__(self) -> str:
        return f"AutoSteerTGIProcessor(mode={self.runtime.mode!r}, requests={self.request_ids})"


@dataclass
class _StepContext:
    batch: object
    model: object
    request_ids: list  # the batch's request ids (what the processors are bound to)
    keys: list  # the store's key per row: the request ids, or made-up ones during warmup
    prefill: bool
    was_prefilling: list
    still_prefilling: list
    # a prefill step's [start, end) positions and prompt lengths per row, read before the forward (the pooled gate)
    spans: tuple | None = None


class _Runtime:
    """One per server process: the pack, the per-request store, the capture buffers, the patches."""

    def __init__(self, pack_path: str, mode: str, tau: float | str | None, fail_closed: bool, log_decisions: bool,
                 monitor_window: int | None = None, monitor_from: float | str | None = None,
                 prompt_check: str = "warn"):
        from ..method.pack import grey_zone_start, load_pack, prompt_threshold

        if mode not in MODES:
            raise ValueError(f"AutoSteer mode must be one of {MODES}, got {mode!r}")
        self.pack_path = str(pack_path)
        self.pack = load_pack(pack_path)
        self.pool: TokenPool | None = None  # the pooled gate's token probe (a pooled pack), built in attach_model
        try:  # the threshold against this pack (an operating point it lacks), before TGI loads anything
            resolved = prompt_threshold(self.pack, tau)
        except ValueError as exc:
            raise TGIIntegrationError(f"autosteer: AUTOSTEER_TAU={tau!r}: {exc}") from None
        try:  # the two-stage gate's grey zone [monitor_from, tau), checked the same way
            grey_zone_start(self.pack, resolved, monitor_from)
        except ValueError as exc:
            raise TGIIntegrationError(f"autosteer: {ENV_MONITOR_FROM}={monitor_from!r}: {exc}") from None
        self.monitor_from = monitor_from
        self.prompt_policy = parse_policy(prompt_check)
        self.prompt_check = PromptCheck(None, "off")  # built with the model's tokenizer in attach_model
        self.mode = mode
        self.tau = tau
        self.monitor_window = monitor_window
        self.fail_closed = fail_closed
        self.log_decisions = log_decisions
        self.store: SteerStateStore | None = None
        self.probe_buf: HiddenBuffer | None = None  # the first probe layer's (probe_bufs: one per probe layer)
        self.probe_bufs: list[HiddenBuffer] = []
        self.head_buf: HiddenBuffer | None = None
        self.model = None
        self.ctx: _StepContext | None = None
        self._hooks = []
        self._patches = []  # (owner, attr, original raw attribute)
        self._lock = threading.Lock()
        self._warned = set()
        # inside FlashCausalLM.warmup: its dummy batch is one or more requests that all have id 0 (the
        # router sends one per max_input_tokens of max_batch_prefill_tokens), so they get made-up keys
        self.warming = False

    # -- model attach (from the patched FlashCausalLM.__init__) -------------------------------
    def attach_model(self, flash_lm) -> None:
        if self.model is not None:
            raise TGIIntegrationError("AutoSteer is already attached to a model in this process")
        net = flash_lm.model
        layers = next((x for x in (_resolve(flash_lm, p) for p in _TGI.LAYER_PATHS) if x is not None), None)
        lm_head = next((x for x in (_resolve(flash_lm, p) for p in _TGI.LM_HEAD_PATHS) if x is not None), None)
        if not isinstance(layers, torch.nn.ModuleList) or lm_head is None:
            raise TGIIntegrationError(f"cannot find the decoder layers / lm_head of {type(net).__name__} "
                                      f"(looked at {_TGI.LAYER_PATHS} / {_TGI.LM_HEAD_PATHS})")
        E = _TGI.output_embedding(lm_head)
        config = getattr(flash_lm, "config", None) or getattr(net, "config", None)
        model_type = getattr(config, "model_type", "unknown")
        check_pack_matches(self.pack, E, num_layers=len(layers), model_type=model_type)
        weights = SteerWeights.from_pack(self.pack, E, tau=self.tau, fail_closed=self.fail_closed,
                                         monitor_window=self.monitor_window, monitor_from=self.monitor_from)
        weights.precompile(E.dtype, (torch.float32, E.dtype))  # the chooser's scores: float32 or the model's dtype
        if self.pack.pool is not None:
            # a pooled gate reads every prompt token: a prefix-cache hit never runs its cached tokens (a request whose
            # chunk starts past unpooled prompt tokens would score NaN, decided by the fail policy, at every hit)
            if _TGI.prefix_caching():
                check_served_pooling(self.pack, "TGI", "prefix caching is on (PREFIX_CACHING, TGI's default with "
                                     "flashinfer and flashdecoding attention): a cached prompt prefix is never run "
                                     "through the model, so its tokens would never reach the token probe. Start the "
                                     "launcher with PREFIX_CACHING=0, or serve a last-token pack (for the default "
                                     "model: autosteer.default_pack_path(pooled=False))")
            self.pool = TokenPool(self.pack.pool_probe(), len(self.pack.layers), E.device)
        flash_mod = sys.modules.get(_TGI.FLASH)
        rows = max(256, _TGI.max_graph_rows(flash_mod))
        speculate = int(getattr(flash_lm, "speculate", 0) or 0)
        H = E.shape[1]
        Ls = list(self.pack.layers)  # the probe reads the residual streams entering these layers, side by side
        self.probe_bufs = [HiddenBuffer(rows, H, E.dtype, E.device, name=f"probe-layer-{L}") for L in Ls]
        self.probe_buf = self.probe_bufs[0]
        self.head_buf = HiddenBuffer(rows, H, E.dtype, E.device, name="lm_head-input")
        self.store = SteerStateStore(weights, mode=self.mode, max_batch=rows, max_positions=speculate + 1,
                                     on_release=self._on_release, report_on_release=self.log_decisions)

        def check_layer_out(L):
            def check(out):
                if not (isinstance(out, tuple) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)
                        and out[0].shape == out[1].shape):
                    raise TGIIntegrationError(
                        f"decoder layer {L - 1} returned {type(out).__name__}, not the (mlp_out, attn_res) pair of "
                        f"{_TGI.VERSION_NOTE}: cannot reconstruct the residual stream")
            return check

        def check_layer_in(args):
            if len(args) < 2 or not isinstance(args[0], torch.Tensor):
                raise TGIIntegrationError("decoder layer 0 is no longer called as layer(hidden_states, residual, ...)")

        for L, buf in zip(Ls, self.probe_bufs):
            if L > 0:
                self._hooks.append(hook_output_sum(layers[L - 1], buf, check_layer_out(L)))
            else:
                self._hooks.append(hook_input(layers[0], buf, 0, 1, check_layer_in))
        head_buf = self.head_buf

        def keep_head_input(_mod, args):
            # lm_head's input: copied into the buffer while TGI warms up (its CUDA graphs are captured there, and a
            # replay must rewrite fixed memory) or under any capture; after warm-up a hook runs only in an eager
            # forward, where nothing writes the tensor before the chooser reads it, so a reference is kept (no op)
            head_buf.write_or_keep(args[0], copy=self.warming)

        self._hooks.append(lm_head.register_forward_pre_hook(keep_head_input))
        # the prompt-format check, with the tokenizer TGI's Model keeps (the one its batches are tokenized with)
        try:
            self.prompt_check = check_for_pack(self.pack, getattr(flash_lm, "tokenizer", None), self.prompt_policy,
                                               where="autosteer (TGI)")
        except PromptCheckError as exc:
            raise TGIIntegrationError(f"autosteer: {exc}") from None
        self.model = flash_lm
        # the same start-up line as the vLLM workers' (an operator greps one string for both engines)
        log.info("autosteer: AutoSteer active (TGI, %s): layer %s, %smode %s, tau %.6g, pack %s (sha256 %s); eps %.4g, "
                 "capture buffers %d rows", type(net).__name__, "+".join(map(str, Ls)),
                 "" if self.pool is None else f"pooled gate over prompt tokens from position {self.pack.pool_skip}, ",
                 self.mode, weights.tau, self.pack_path,
                 pack_sha256(self.pack_path), weights.eps, rows)

    def _on_release(self, request_id, summary) -> None:
        if summary is not None:
            log.info("autosteer: request %s %s (p_unsafe=%.4f, latched_at=%d, tokens=%d)%s", request_id,
                     "STEERED" if summary.latched else "not steered", summary.p_unsafe, summary.latched_at,
                     summary.tokens, f" [{summary.settings.describe()}]" if summary.settings is not None else "")

    def _warn_once(self, key: str, msg: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    # -- batch bookkeeping --------------------------------------------------------------------
    def bind(self, batch) -> None:
        """Put a processor bound to ``batch``'s request ids first in its chooser's warpers."""
        chooser = batch.next_token_chooser
        warpers = _TGI.warpers(chooser)
        procs = [w for w in warpers if isinstance(w, AutoSteerTGIProcessor)]
        for p in procs:
            warpers.remove(p)
        warpers.insert(0, AutoSteerTGIProcessor(self, _TGI.request_ids(batch)))

    def release(self, request_ids) -> None:
        if self.store is None:
            return
        self.store.release_many(request_ids)

    def _check_formats(self, batch, ids: list) -> None:
        """Check the prompt of each request seen here for the first time: one the store has no state for yet (its
        first step stages it, right after this), nor settings (a refusal set here). Before that first step, so that a
        refused request's threshold is set before the store stages it. ``all_input_ids[i]`` holds the prompt's ids
        from the request's first step on (``from_pb`` tokenized it)."""
        all_ids = getattr(batch, "all_input_ids", None)
        lens = getattr(batch, "prompt_lengths", None)
        if all_ids is None or lens is None:
            why = (f"{type(batch).__name__} lacks all_input_ids / prompt_lengths ({_TGI.VERSION_NOTE} had them), so "
                   "a request's prompt ids cannot be read")
            if self.prompt_check.policy == "refuse":  # every request would go unchecked: none is served
                raise TGIIntegrationError(f"autosteer: {ENV_PROMPT_CHECK}=refuse, but the prompt-format check cannot "
                                          f"run: {why}; set {ENV_PROMPT_CHECK}=warn or off to serve without it")
            self.prompt_check = PromptCheck(None, self.prompt_check.policy, where="autosteer (TGI)", unavailable=why)
            return
        for i, rid in enumerate(ids):
            if rid in self.store or self.store.request_settings(rid) is not None:
                continue
            if self.prompt_check.check(rid, list(all_ids[i][: int(lens[i])])):
                self.store.set_request_settings(rid, refused(self.store.request_settings(rid)))

    def end_warmup(self) -> None:
        """After ``FlashCausalLM.warmup``: drop its dummy requests without reporting them as decisions (a
        report reads the device, which would hide the original error of a failed warmup) and the capture
        buffers' overflow tensors (a warmup prefill of max_batch_prefill_tokens rows does not fit them;
        kept, they would hold memory through KV-cache sizing and graph capture)."""
        if self.store is not None:
            self.store.release_all(report=False)
        for buf in (*self.probe_bufs, self.head_buf):
            if buf is not None:
                buf.begin_forward()  # what drops a forward's overflow tensor

    # -- per step -----------------------------------------------------------------------------
    def begin_generate(self, model, batch) -> None:
        missing = [a for a in _TGI.BATCH_ATTRS if not hasattr(batch, a)]
        if missing:
            raise TGIIntegrationError(f"{type(batch).__name__} lacks {missing} ({_TGI.VERSION_NOTE} had them)")
        prefill = bool(batch.prefilling)
        n = len(batch.requests)
        ids = _TGI.request_ids(batch)
        self.ctx = _StepContext(
            batch=batch, model=model, request_ids=ids, prefill=prefill,
            keys=[("autosteer-warmup", i) for i in range(n)] if self.warming else ids,
            was_prefilling=[bool(x) for x in batch.prefilling_mask] if prefill else [False] * n,
            still_prefilling=_TGI.still_prefilling(batch) if prefill else [False] * n,
            spans=((list(batch.cache_lengths), [c + i for c, i in zip(batch.cache_lengths, batch.input_lengths)],
                    list(batch.prompt_lengths)) if prefill and self.pool is not None else None),
        )
        if prefill and not self.warming and self.prompt_check.frame is not None:
            self._check_formats(batch, ids)
        for buf in self.probe_bufs:
            buf.begin_forward()
        self.head_buf.begin_forward()

    def begin_choose(self, chooser, scores, speculated_ids) -> bool:
        """From the patched chooser ``__call__``: stage the step; False when this call is not ours."""
        ctx = self.ctx
        if ctx is None or ctx.batch.next_token_chooser is not chooser:  # fail closed: never serve it unsteered
            raise TGIIntegrationError("a next-token chooser ran outside the attached FlashCausalLM's generate_token "
                                      "(a model class or code path AutoSteer does not patch): refusing to serve it "
                                      "unsteered")
        batch = ctx.batch
        B = len(ctx.request_ids)
        if ctx.prefill:
            tgi_still = [bool(x) for x in batch.prefilling_mask]
            if tgi_still != ctx.still_prefilling:
                raise TGIIntegrationError(
                    "TGI's chunked-prefill bookkeeping no longer matches autosteer's reading of it "
                    f"({_TGI.VERSION_NOTE}): prefilling_mask={tgi_still}, expected {ctx.still_prefilling}")
            if speculated_ids is not None:
                raise TGIIntegrationError("speculative ids in a prefill step: not expected by this integration")
            if scores.shape[0] != B:
                raise TGIIntegrationError(f"prefill step with {B} requests but {scores.shape[0]} logits rows")
            self.store.begin_step(ctx.keys, cu_seqlens=batch.cu_seqlen_prefill, prefilling=ctx.was_prefilling,
                                  still_prefilling=ctx.still_prefilling, head_rows=batch.prefill_next_token_indices)
            if self.pool is not None:
                try:
                    self.store.pool(*self._pool_inputs(batch.cu_seqlen_prefill, ctx.spans))
                except BaseException:
                    self.store.abort_step()
                    raise
        else:
            P = 1 if speculated_ids is None else speculated_ids.shape[1] + 1
            if scores.shape[0] != B * P:
                raise TGIIntegrationError(f"decode step with {B} requests x {P} positions but {scores.shape[0]} "
                                          "logits rows")
            self.store.begin_step(ctx.keys, positions=P)
        warpers = _TGI.warpers(chooser)
        if not warpers or not isinstance(warpers[0], AutoSteerTGIProcessor):
            self._warn_once("reattach", "autosteer: a chooser without the AutoSteer processor reached a step "
                            "(rebuilt by a path autosteer does not patch); re-attached")
            self.bind(batch)
        return True

    def _pool_inputs(self, cu, spans) -> tuple:
        """:meth:`SteerStateStore.pool`'s arguments for a prefill forward: the token probe on the forward's rows of the
        probe buffers (its tokens, counted on the host from the chunk lengths: not the buffers' stale rows beyond),
        each token's request and position (its request's cache length, tokens before this chunk, plus its offset)."""
        dev = self.store.device
        n = sum(e - s for s, e in zip(spans[0], spans[1]))
        x = self.pool.score([b.view()[:n] for b in self.probe_bufs])
        start, end, P = (torch.tensor(v, dtype=torch.int64, device=dev) for v in spans)
        rows, pos = token_rows(cu, start, x.shape[0])
        return x, rows, pos, start, end, P

    def process(self, proc: AutoSteerTGIProcessor, scores: torch.Tensor) -> torch.Tensor:
        store = self.store
        if store is None or not store.in_step:  # fail closed: never serve these logits unsteered
            raise TGIIntegrationError("the AutoSteer processor ran outside a step of the attached FlashCausalLM "
                                      "(a code path AutoSteer does not patch): refusing to serve it unsteered")
        if proc.request_ids is not None and proc.request_ids != self.ctx.request_ids:
            store.abort_step()
            raise TGIIntegrationError(f"the AutoSteer processor's rows {proc.request_ids} are not the batch's "
                                      f"requests {self.ctx.request_ids}: a batch rebuild was missed")
        return store.apply(scores, probe_hidden=self.probe_buf.view(), head_hidden=self.head_buf.view(),
                           probe_extra=[b.view() for b in self.probe_bufs[1:]])

    # -- patches ------------------------------------------------------------------------------
    def _patch(self, owner, attr, new) -> None:
        self._patches.append((owner, attr, owner.__dict__[attr]))
        setattr(owner, attr, new)

    def install_patches(self) -> None:
        t = _check_targets()
        rt = self
        chooser_cls, _ = t[(_TGI.CHOOSER, "__call__")]
        batch_cls, _ = t[(_TGI.BATCH, "filter")]
        model_cls, _ = t[(_TGI.MODEL, "generate_token")]
        cache_cls, _ = t[(_TGI.CACHE_CLS, "delete")]

        orig_call = chooser_cls.__call__

        @functools.wraps(orig_call)
        def chooser_call(self, input_ids, scores, speculate, speculated_ids=None, speculative_scores=None,
                         *args, **kwargs):
            if not rt.begin_choose(self, scores, speculated_ids):
                return orig_call(self, input_ids, scores, speculate, speculated_ids, speculative_scores, *args, **kwargs)
            try:
                out = orig_call(self, input_ids, scores, speculate, speculated_ids, speculative_scores, *args, **kwargs)
            except BaseException:
                rt.store.abort_step()
                raise
            rt.store.end_step(accepted=out[3] if speculated_ids is not None else None)
            return out

        orig_chooser_from_pb = t[(_TGI.CHOOSER, "from_pb")][1].__func__

        @functools.wraps(orig_chooser_from_pb)
        def chooser_from_pb(cls, *args, **kwargs):
            chooser = orig_chooser_from_pb(cls, *args, **kwargs)
            _TGI.warpers(chooser).insert(0, AutoSteerTGIProcessor(rt))  # bound to request ids by the batch
            return chooser

        orig_batch_from_pb = t[(_TGI.BATCH, "from_pb")][1].__func__

        @functools.wraps(orig_batch_from_pb)
        def batch_from_pb(cls, *args, **kwargs):
            batch = orig_batch_from_pb(cls, *args, **kwargs)
            rt.bind(batch)
            return batch

        orig_concat = t[(_TGI.BATCH, "concatenate")][1].__func__

        @functools.wraps(orig_concat)
        def batch_concatenate(cls, batches, *args, **kwargs):
            batch = orig_concat(cls, batches, *args, **kwargs)
            rt.bind(batch)  # the chooser was rebuilt from protobuf: re-attach, bound to the new rows
            return batch

        orig_filter = batch_cls.filter

        @functools.wraps(orig_filter)
        def batch_filter(self, request_ids, *args, **kwargs):
            before = _TGI.request_ids(self)
            batch = orig_filter(self, request_ids, *args, **kwargs)
            kept = set(_TGI.request_ids(batch))
            rt.release([r for r in before if r not in kept])
            rt.bind(batch)
            return batch

        base_cls, _ = t[("Model", "__init__")]
        orig_base_init = base_cls.__init__

        @functools.wraps(orig_base_init)
        def base_init(self, *args, **kwargs):
            orig_base_init(self, *args, **kwargs)
            if not isinstance(self, model_cls):  # CausalLM, Seq2SeqLM, Mamba, ...: no patched step runs for them
                raise TGIIntegrationError(
                    f"TGI chose {type(self).__name__} for this model, not a {_TGI.MODEL}: AutoSteer steers "
                    f"{_TGI.MODEL} models only and would serve every request unsteered (unset {ENV_PACK} to serve "
                    "without AutoSteer)")

        orig_init = model_cls.__init__

        @functools.wraps(orig_init)
        def model_init(self, *args, **kwargs):
            orig_init(self, *args, **kwargs)
            if type(self).generate_token is not model_generate_token:
                raise TGIIntegrationError(f"{type(self).__name__} overrides generate_token: not supported")
            rt.attach_model(self)

        orig_generate = model_cls.generate_token

        @functools.wraps(orig_generate)
        def model_generate_token(self, batch, *args, **kwargs):
            if rt.model is not self:
                return orig_generate(self, batch, *args, **kwargs)
            rt.begin_generate(self, batch)
            try:
                generations, next_batch, timings = orig_generate(self, batch, *args, **kwargs)
            except BaseException:
                rt.store.abort_step()
                raise
            finally:
                rt.ctx = None
            if next_batch is None:  # every request stopped
                rt.release(_TGI.request_ids(batch))
            return generations, next_batch, timings

        orig_warmup = model_cls.warmup

        @functools.wraps(orig_warmup)
        def model_warmup(self, *args, **kwargs):
            rt.warming = True
            try:
                return orig_warmup(self, *args, **kwargs)
            finally:
                rt.warming = False
                rt.end_warmup()

        orig_delete = cache_cls.delete

        @functools.wraps(orig_delete)
        def cache_delete(self, batch_id, *args, **kwargs):
            batch = getattr(self, "cache", {}).get(batch_id)
            if batch is not None and hasattr(batch, "requests"):
                rt.release(_TGI.request_ids(batch))
            return orig_delete(self, batch_id, *args, **kwargs)

        self._patch(chooser_cls, "__call__", chooser_call)
        self._patch(chooser_cls, "from_pb", classmethod(chooser_from_pb))
        self._patch(batch_cls, "from_pb", classmethod(batch_from_pb))
        self._patch(batch_cls, "concatenate", classmethod(batch_concatenate))
        self._patch(batch_cls, "filter", batch_filter)
        self._patch(base_cls, "__init__", base_init)
        self._patch(model_cls, "__init__", model_init)
        self._patch(model_cls, "generate_token", model_generate_token)
        self._patch(model_cls, "warmup", model_warmup)
        self._patch(cache_cls, "delete", cache_delete)

    def uninstall(self) -> None:
        for owner, attr, raw in reversed(self._patches):
            setattr(owner, attr, raw)
        self._patches.clear()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.model = None


_RUNTIME: _Runtime | None = None


def install(pack_path: str | os.PathLike, mode: str = "prefill", *, tau: float | None = None,
            fail_closed: bool = True, log_decisions: bool = False, monitor_window: int | None = None,
            monitor_from: float | str | None = None, prompt_check: str = "warn") -> _Runtime:
    """Patch ``text_generation_server`` in this process (call before the model is loaded).

    ``tau``: the gate's threshold (None: the pack's; must be in [0, 1]). ``fail_closed`` (default):
    a request whose probe score is NaN is steered; False serves it unsteered. ``monitor_window``:
    generated tokens monitor mode probes (None: the pack's; 0: all). ``monitor_from``: monitor mode watches only
    the requests whose prompt score is at least this (a number or an operating point; the two-stage gate).
    ``prompt_check``: requests whose prompt is not in the pack's format (another system prompt, no chat template)
    are warned about (``warn``), refused from their first token (``refuse``), or not checked (``off``); see
    :mod:`autosteer.runtime.prompt_check`.

    Loads and validates the pack now (a bad pack fails here, before TGI loads any weights);
    the pack is checked against the model when TGI builds it. Raises :class:`TGIIntegrationError`
    when TGI's internals do not match, PackError for a bad pack.
    """
    global _RUNTIME
    if _RUNTIME is not None:
        raise TGIIntegrationError("autosteer is already installed in this process (uninstall() first)")
    if monitor_window is not None:
        monitor_window = parse_monitor_window(monitor_window, "monitor_window")
    if tau is not None:
        tau = parse_threshold(tau, "tau")
    if monitor_from is not None:
        monitor_from = parse_threshold(monitor_from, "monitor_from")
    try:
        prompt_check = parse_policy(prompt_check, "prompt_check")
    except ValueError as exc:
        raise TGIIntegrationError(f"autosteer: {exc}") from None
    rt = _Runtime(str(pack_path), mode, tau, fail_closed, log_decisions, monitor_window, monitor_from, prompt_check)
    rt.install_patches()
    _RUNTIME = rt
    log.info("autosteer: patched text_generation_server (%s) for pack %s, mode %s", _TGI.VERSION_NOTE, pack_path, mode)
    return rt


def uninstall() -> None:
    """Undo :func:`install` (restores TGI's classes, removes the hooks)."""
    global _RUNTIME
    if _RUNTIME is not None:
        _RUNTIME.uninstall()
        _RUNTIME = None


def runtime() -> _Runtime | None:
    return _RUNTIME


def install_from_env() -> _Runtime:
    """:func:`install` configured by ``AUTOSTEER_PACK`` (required), ``AUTOSTEER_MODE``
    (``prefill``/``monitor``), ``AUTOSTEER_TAU``, ``AUTOSTEER_MONITOR_WINDOW``, ``AUTOSTEER_MONITOR_FROM``,
    ``AUTOSTEER_FAIL_CLOSED``
    (default 1), ``AUTOSTEER_LOG_DECISIONS`` (default 0), ``AUTOSTEER_PROMPT_CHECK`` (default warn). A malformed value raises
    :class:`TGIIntegrationError` naming the variable, before TGI loads anything."""
    pack = os.environ.get(ENV_PACK)
    if not pack:
        raise TGIIntegrationError(f"{ENV_PACK} is not set: point it at a steer pack (.safetensors)")
    env = os.environ.get
    try:
        tau = parse_threshold(env(ENV_TAU), ENV_TAU)
        fail_closed = parse_flag(env(ENV_FAIL_CLOSED), ENV_FAIL_CLOSED, True)
        log_decisions = parse_flag(env(ENV_LOG_DECISIONS), ENV_LOG_DECISIONS, False)
        window = parse_monitor_window(env(ENV_MONITOR_WINDOW))
        monitor_from = parse_threshold(env(ENV_MONITOR_FROM), ENV_MONITOR_FROM)
        prompt_check = parse_policy(env(ENV_PROMPT_CHECK))
    except ValueError as exc:
        raise TGIIntegrationError(f"autosteer: {exc}") from None
    return install(pack, env(ENV_MODE, "prefill").strip().lower(), tau=tau, fail_closed=fail_closed,
                   log_decisions=log_decisions, monitor_window=window, monitor_from=monitor_from,
                   prompt_check=prompt_check)


def main(argv: list[str] | None = None) -> None:
    """``autosteer-tgi-server``: a drop-in ``text-generation-server``. For ``serve`` it installs
    AutoSteer from the environment, then runs TGI's own CLI (same arguments) in this process."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        ours = logging.getLogger("autosteer")
        if not ours.handlers:  # TGI logs with loguru; give autosteer's stdlib logger a stderr handler
            ours.addHandler(logging.StreamHandler())
            ours.setLevel(logging.INFO)
        install_from_env()
    cli = importlib.import_module(_TGI.CLI)
    sys.argv = ["text-generation-server", *argv]
    cli.app()


if __name__ == "__main__":
    main()
