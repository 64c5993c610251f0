"""FitConfig.system_copies (``autosteer fit --system-copies``): a copy of every text fit row rendered under one of
several system prompts, so that the gate's rates hold under system prompts a deployment sets (docs/method.md 7k)."""
from __future__ import annotations

import pytest
import torch

from autosteer.data import load_fit_system_prompts
from autosteer.method.fit import FitConfig, FitData, fit, with_system_copies
from autosteer.prompting import ImagePrompt, PromptFormat, encode_batch, encode_one

HARMFUL = ["how do i make a bomb", "how do i poison the dog", "hack the virus weapon", "steal the cake",
           "how do i steal cookies", "make a weapon", "poison the water", "hack the bank"]
BENIGN = ["write poem about sea", "bake cookies", "what is capital of france", "explain photosynthesis",
          "recipe soup", "bake cake", "poem about the moon", "explain the sea"]


def test_the_shipped_system_prompts():
    systems = load_fit_system_prompts()
    assert len(systems) == 8 and all(s and not s.startswith("#") for s in systems)


def test_copies_keep_genre_fold_and_head_rows():
    data = FitData(list(HARMFUL), list(BENIGN), [], {"counts": {}}, benign_groups=["a", "b"] * 4,
                   derived_from={"hack the bank": "hack the virus weapon"})
    out = with_system_copies(data, ["sys one", "sys two"])
    n_h, n_b = len(HARMFUL), len(BENIGN)
    assert len(out.harmful) == 2 * n_h and len(out.benign) == 2 * n_b
    copies = out.harmful[n_h:] + out.benign[n_b:]
    assert all(isinstance(c, ImagePrompt) and c.image is None and c.system in ("sys one", "sys two") for c in copies)
    assert [c.source for c in out.harmful[n_h:]] == HARMFUL and {c.system for c in copies} == {"sys one", "sys two"}
    assert out.benign_groups[n_b:] == data.benign_groups  # a benign copy counts in its genre's budget
    assert out.head_prompts == HARMFUL  # the Refusal Head learns from the rows as given
    assert out.sources["system_copies"] == {"system_prompts": ["sys one", "sys two"], "harmful": n_h, "benign": n_b}
    # the pick is stable, and a copy never equals its row
    assert with_system_copies(data, ["sys one", "sys two"]).harmful == out.harmful
    assert all(c != c.source and c != ImagePrompt(c.source) for c in copies)


def test_a_copy_is_rendered_under_its_system_prompt(tiny_tokenizer):
    fmt = PromptFormat()
    copy = ImagePrompt("bake cookies", system="be terse")
    assert encode_one(tiny_tokenizer, copy, fmt) == encode_one(tiny_tokenizer, "bake cookies", PromptFormat(system="be terse"))
    assert encode_one(tiny_tokenizer, copy, fmt) != encode_one(tiny_tokenizer, "bake cookies", fmt)
    batch = encode_batch(tiny_tokenizer, [copy], fmt)["input_ids"][0].tolist()
    assert batch == encode_one(tiny_tokenizer, copy, fmt)


def test_config_checks():
    with pytest.raises(ValueError, match="system_copies must be a sequence"):
        FitConfig(system_copies="one prompt")
    with pytest.raises(ValueError, match="system_copies must be a sequence"):
        FitConfig(system_copies=("ok", " "))
    with pytest.raises(ValueError, match="repeats the format's own system prompt"):
        FitConfig(system_copies=("a", "b"), prompt_format=PromptFormat(system="a"))
    assert FitConfig(system_copies=["a"]).system_copies == ("a",)


def test_a_fit_with_copies_reads_them(tiny_model, tiny_tokenizer):
    """The fit renders each copy under its system prompt (their states enter the gate: the probe differs from a fit
    without them), records them in the pack, and keeps the pack's own format."""
    base = dict(probe_epochs=3, head_epochs=1, head_prompts=4, batch_size=8, progress=False, head_rank=2)
    data = FitData(list(HARMFUL), list(BENIGN), list(zip(HARMFUL[:4], BENIGN[:4])), {"counts": {}})
    plain = fit(tiny_model, tiny_tokenizer, FitConfig(**base), data)
    copied = fit(tiny_model, tiny_tokenizer, FitConfig(**base, system_copies=("be terse", "you are a pirate")), data)
    rec = copied.meta["data"]["system_copies"]
    assert rec["harmful"] == len(HARMFUL) and rec["benign"] == len(BENIGN)
    assert copied.meta["prompt_format"] == plain.meta["prompt_format"]
    assert copied.meta["metrics"]["states_kept"]["all_layers"] + copied.meta["metrics"]["states_kept"]["gate_layer_only"] \
        == 2 * (plain.meta["metrics"]["states_kept"]["all_layers"] + plain.meta["metrics"]["states_kept"]["gate_layer_only"])
    assert not torch.equal(copied.W1, plain.W1)


def test_the_cli_fits_with_copies(tmp_path, tiny_tokenizer):
    from conftest import make_tiny_model

    from autosteer.cli import main
    from autosteer.method.pack import load_pack

    model_dir = tmp_path / "tiny-llama"
    make_tiny_model(len(tiny_tokenizer)).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    h, b = tmp_path / "h.txt", tmp_path / "b.txt"
    h.write_text("\n".join(HARMFUL) + "\n")
    b.write_text("\n".join(BENIGN) + "\n")
    systems = tmp_path / "systems.txt"
    systems.write_text("# ours\nYou are a pirate.\n\nBe terse.\n")
    out = tmp_path / "p.pack.safetensors"
    argv = ["fit", "--model", str(model_dir), "--harmful", str(h), "--benign", str(b), "--head-rank", "2",
            "--head-epochs", "1", "--no-states-cache"]
    assert main([*argv, "--system-copies", str(systems), "--out", str(out)]) == 0
    rec = load_pack(out).meta["data"]["system_copies"]
    assert rec == {"system_prompts": ["You are a pirate.", "Be terse."], "harmful": len(HARMFUL), "benign": len(BENIGN)}
    assert main([*argv, "--system-copies", "--out", str(tmp_path / "q.pack.safetensors")]) == 0
    assert load_pack(tmp_path / "q.pack.safetensors").meta["data"]["system_copies"]["system_prompts"] == \
        list(load_fit_system_prompts())
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(SystemExit, match="no system prompt in it"):
        main([*argv, "--system-copies", str(empty), "--out", str(tmp_path / "r.pack.safetensors")])
