"""Tiny randomly initialised LLaVA-OneVision and Chameleon models, built offline from transformers'
config classes, with the tests' word-level tokenizer plus each family's image tokens."""
from __future__ import annotations

import torch

from conftest import make_tokenizer

FAMILIES = ("llava_onevision", "chameleon")
CHAMELEON_CODES = 16  # VQ codebook size of the tiny Chameleon
CHAMELEON_IMAGE_TOKENS = 16  # 32x32 image, VQ downsampling 8 -> 4x4 codes


def _chameleon_code_token(i: int) -> str:
    # Chameleon names image-code tokens IMGIMG<digits as letters A-J>Z
    return "IMGIMG" + "".join(chr(ord("A") + int(c)) for c in str(i)) + "Z"


# like the real LLaVA-OneVision template: string content, or a list of image/text parts
MM_CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} {% if m['content'] is string %}{{ m['content'] }}"
                    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}"
                    "{% endif %}{% endfor %}{% endif %} </s> {% endfor %}{% if add_generation_prompt %}<s> assistant{% endif %}")


def make_processor(family: str, processor_template: bool = True):
    """The family's processor; ``processor_template=False`` leaves the chat template to the
    tokenizer (autosteer then puts the image placeholder before the text itself)."""
    from transformers import ChameleonProcessor, LlavaOnevisionProcessor
    from transformers.models.chameleon.image_processing_pil_chameleon import ChameleonImageProcessorPil
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    from autosteer.models import processor_compat

    tok = make_tokenizer()
    tok.chat_template = MM_CHAT_TEMPLATE
    template = {"chat_template": MM_CHAT_TEMPLATE} if processor_template else {}
    if family == "llava_onevision":
        tok.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
        ip = LlavaOnevisionImageProcessorPil(size={"height": 16, "width": 16}, image_grid_pinpoints=[[16, 16]], crop_size=None)
        with processor_compat():
            return LlavaOnevisionProcessor(image_processor=ip, tokenizer=tok, num_image_tokens=4,
                                           vision_feature_select_strategy="full", **template)
    if family == "chameleon":
        tok.add_special_tokens({"additional_special_tokens": ["<image>", "<racm3:break>", "<eoss>", "<reserved08706>"]})
        tok.add_tokens([_chameleon_code_token(i) for i in range(CHAMELEON_CODES)])
        tok.sep_token = "<reserved08706>"
        ip = ChameleonImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        with processor_compat():
            proc = ChameleonProcessor(image_processor=ip, tokenizer=tok, image_seq_length=CHAMELEON_IMAGE_TOKENS)
        if processor_template:  # ChameleonProcessor takes no chat_template argument
            proc.chat_template = MM_CHAT_TEMPLATE
        return proc
    raise ValueError(family)


def make_model(family: str, processor, seed: int = 0, layers: int = 4, hidden: int = 32):
    from transformers import (ChameleonConfig, ChameleonForConditionalGeneration, LlavaOnevisionConfig,
                              LlavaOnevisionForConditionalGeneration)

    tok = processor.tokenizer
    torch.manual_seed(seed)
    text = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, pad_token_id=0,
                bos_token_id=2, eos_token_id=3)
    if family == "llava_onevision":
        cfg = LlavaOnevisionConfig(
            vision_config=dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, image_size=16, patch_size=8),
            text_config=dict(model_type="qwen2", **text), image_token_index=tok.convert_tokens_to_ids("<image>"),
            vision_feature_select_strategy="full", vision_feature_layer=-1, image_grid_pinpoints=[[16, 16]],
            tie_word_embeddings=False)
        model = LlavaOnevisionForConditionalGeneration(cfg)
    else:
        cfg = ChameleonConfig(**text, vocabulary_map=tok.get_vocab(), image_token_id=tok.convert_tokens_to_ids("<image>"),
                              vq_config=dict(embed_dim=32, num_embeddings=CHAMELEON_CODES, latent_channels=32, base_channels=32,
                                             channel_multiplier=[1, 1, 1, 1], resolution=32, num_res_blocks=1,
                                             attn_resolutions=[]))
        model = ChameleonForConditionalGeneration(cfg)
    model.eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 3
    return model


def solid_image(rgb=(200, 20, 20), size=(40, 30)):
    from PIL import Image

    return Image.new("RGB", size, rgb)


def save_tiny(family: str, path, processor_template: bool = True):
    """Save a tiny model and its processor's parts as a model directory ``load_model`` reads
    (transformers cannot ``save_pretrained`` a processor without its video processor)."""
    import json

    proc = make_processor(family, processor_template)
    model = make_model(family, proc)
    model.save_pretrained(path)
    proc.tokenizer.save_pretrained(path)
    proc.image_processor.save_pretrained(path)
    cfg = {k: v for k, v in proc.to_dict().items() if not isinstance(v, dict) and k != "video_processor"}
    cfg["processor_class"] = type(proc).__name__
    (path / "processor_config.json").write_text(json.dumps(cfg))
    return model, proc
