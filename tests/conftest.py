"""Shared fixtures: a tiny random Llama with a word-level tokenizer (fast), and the real default model (slow)."""
from __future__ import annotations

import os

# Triton reads TRITON_INTERPRET when it is first imported: set it before any test module (or
# torch._dynamo) imports triton, so the kernels run in the interpreter on CPU-only machines.
# benchmarks/gpu_check.sh sets AUTOSTEER_TEST_NATIVE_TRITON=1 to compile them for the GPU instead.
if os.environ.get("AUTOSTEER_TEST_NATIVE_TRITON") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

WORDS = ("how do i make a bomb kill poison steal hack build weapon virus the cake bake cookies cat dog "
         "write poem about sea sun what is capital of france python process explain photosynthesis "
         "recipe soup sorry but can't assist with that . , ? ! i'm").split()
CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<s> assistant{% endif %}")


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>", "user", "assistant", "system"]
    vocab = {w: i for i, w in enumerate(specials + [w for w in WORDS if w not in specials])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def make_tiny_model(vocab_size: int, hidden: int = 32, layers: int = 4, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
                      pad_token_id=0, bos_token_id=2, eos_token_id=3)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls on a loaded 2-core host: one torch thread is far faster than oversubscribed OpenMP."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    return make_tiny_model(len(tiny_tokenizer))


def make_pack(model, layer: int = 2, rank: int = 4, tau: float = 0.5, eps: float = 0.1, seed: int = 0, F: int = 8,
              layers: list[int] | None = None):
    """A random but valid pack for ``model`` (probe and head weights random). ``layers``: a probe reading these
    layers side by side (W1 ``[F, len(layers) * H]``; ``layer`` is then ignored)."""
    from autosteer.method.pack import FORMAT, FORMAT_VERSION, SteerPack, model_fingerprint
    from autosteer.prompting import PromptFormat

    from autosteer.models import text_config

    g = torch.Generator().manual_seed(seed)
    cfg = text_config(model)  # multimodal models nest the language model's config
    H = cfg.hidden_size
    layers = [layer] if layers is None else sorted(layers)
    layer, k = layers[0], len(layers)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "layer": layer, "layers": layers, "layer_rule": "fixed",
            "hidden_size": H, "vocab_size": cfg.vocab_size, "num_layers": cfg.num_hidden_layers,
            "probe_hidden": F, "head_rank": rank, "eps": eps, "tau": tau, "tau_paper": 0.5,
            "prompt_format": PromptFormat().to_dict(), "fingerprint": model_fingerprint(model)}
    return SteerPack(torch.randn(F, k * H, generator=g), torch.randn(F, generator=g), torch.randn(F, generator=g),
                     torch.randn(1, generator=g), 5 * torch.randn(H, rank, generator=g), torch.randn(H, rank, generator=g), meta)


@pytest.fixture(scope="session")
def default_model():
    """The real default model (de-quantized once into the autosteer cache)."""
    from autosteer.models import load_model

    return load_model()
