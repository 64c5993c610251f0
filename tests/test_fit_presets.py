"""Named fit presets: the paper's configuration stays available next to this project's default."""
from __future__ import annotations

import pytest
import torch

from autosteer.method.fit import PRESETS, FitConfig, FitData, fit, fit_gate

HARMFUL = ["how do i make a bomb", "how do i poison the dog", "hack the virus weapon", "steal the cake",
           "build a weapon", "how do i kill the cat", "write virus", "make poison"] * 2
BENIGN = ["write poem about sea", "bake cookies", "what is capital of france", "explain photosynthesis",
          "recipe soup", "the sun", "cat and dog", "python process"] * 2


def test_paper_preset_is_the_papers_configuration():
    """Wu et al., arXiv 2507.13255 (and shared/method.md): SAS layer, 64-unit MLP prober trained with
    AdamW lr 1e-5, weight decay 1e-5, batch 8; tau 0.5; full d x d LM-Steer head, eps 0.1; last prompt
    token; direct harmful vs benign data (no sensitive negatives, no jailbreak wrapping)."""
    c = FitConfig.preset("paper")
    assert c.layer_rule == "sas"
    assert c.probe_hidden == 64
    assert (c.probe_lr, c.probe_weight_decay, c.probe_batch_size) == (1e-5, 1e-5, 8)
    assert c.tau_rule == "paper" and c.tau_paper == 0.5
    assert c.head_rank is None  # full d x d S
    assert c.eps == 0.1
    assert c.pooling == "last_token"
    assert c.fit_data == "paper" and c.jailbreak_fit == 0
    assert c.preset_name == "paper"
    # the project's default differs where the docs say it does
    d = FitConfig()
    assert (d.layer_rule, d.tau_rule, d.head_rank, d.fit_data) == ("depth:0.55+depth:0.83", "budget", 16, "broad")
    # chosen on transfer (docs/results/gate_transfer_study.md)
    assert (d.target_fpr, d.genre_fpr, d.contrast_fpr, d.jailbreak_fit) == (0.05, 0.10, 0.10, 800)
    low = FitConfig.preset("low-fp")
    assert (low.layer_rule, low.target_fpr, low.tau_rule, low.fit_data, low.jailbreak_fit) == \
        ("depth:0.6", 0.15, "fpr", "default", 400)
    assert low.preset_name == "low-fp"
    high = FitConfig.preset("high-recall")  # the default before issue 17
    assert (high.layer_rule, high.target_fpr, high.tau_rule, high.fit_data, high.jailbreak_fit) == \
        ("depth:0.69", 0.20, "fpr", "default", 400)
    assert FitConfig.preset("default") == FitConfig(preset_name="default")
    # every benign genre weighs the same in the gate probe's loss by default; the presets of before keep every
    # prompt at the same weight, as they were fitted
    assert d.benign_weighting == "group"
    assert {FitConfig.preset(n).benign_weighting for n in ("paper", "low-fp", "high-recall")} == {"none"}


def test_presets_take_overrides_and_reject_unknown_names():
    assert FitConfig.preset("paper", head_rank=4).head_rank == 4
    assert FitConfig.preset("paper", seed=3).layer_rule == "sas"
    with pytest.raises(ValueError, match="unknown preset"):
        FitConfig.preset("nope")
    with pytest.raises(ValueError, match="tau_rule"):
        FitConfig(tau_rule="median")
    with pytest.raises(ValueError, match="last_token"):
        FitConfig(pooling="mean")
    assert set(PRESETS) == {"paper", "default", "low-fp", "high-recall"}
    with pytest.raises(ValueError, match="fit_data"):
        FitConfig(fit_data="wide")
    with pytest.raises(ValueError, match="genre_fpr"):
        FitConfig(genre_fpr=1.5)
    with pytest.raises(ValueError, match="calibration_folds"):
        FitConfig(calibration_folds=1)
    with pytest.raises(ValueError, match="benign_weighting"):
        FitConfig(benign_weighting="inverse")


def test_gate_with_paper_threshold_uses_tau_half():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(80, 3, 8, generator=g)
    y = torch.cat([torch.ones(40), torch.zeros(40)])
    X[:40, :, 0] += 3.0
    gate = fit_gate(X, y, FitConfig(tau_rule="paper", probe_epochs=30, seed=0))
    assert gate.tau == 0.5
    cal = fit_gate(X, y, FitConfig(tau_rule="fpr", probe_epochs=30, seed=0))
    assert cal.tau == pytest.approx(max(cal.tau_calibrated, 1e-6))
    assert cal.tau_calibrated == gate.tau_calibrated  # same probe and split, only the rule differs


def test_minibatch_probe_training_differs_from_full_batch():
    from autosteer.method.probe import train_probe

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 6, generator=g), (torch.rand(40, generator=g) > 0.5).float()
    full = train_probe(x, y, hidden=4, epochs=3, lr=1e-2)
    mini = train_probe(x, y, hidden=4, epochs=3, lr=1e-2, batch_size=8)
    assert not torch.allclose(full.W1, mini.W1)
    assert torch.equal(mini.W1, train_probe(x, y, hidden=4, epochs=3, lr=1e-2, batch_size=8).W1)  # deterministic


def test_tiny_model_fit_with_the_paper_preset(tiny_model, tiny_tokenizer):
    pairs = list(zip(HARMFUL[:8], BENIGN[:8]))
    cfg = FitConfig.preset("paper", probe_epochs=3, head_epochs=1, head_prompts=4, batch_size=8, progress=False)
    pack = fit(tiny_model, tiny_tokenizer, cfg, FitData(HARMFUL, BENIGN, pairs, {"counts": {}}))
    m = pack.meta
    assert m["preset"] == "paper"
    assert m["layer_rule"] == "sas" and m["layer"] == m["sas_layer"] == max(range(len(m["sas"])), key=m["sas"].__getitem__)
    assert m["tau"] == 0.5 and m["tau_rule"].startswith("paper")
    H = tiny_model.config.hidden_size
    assert m["head_form"] == "full" and m["head_rank"] == H and tuple(pack.A.shape) == (H, H)
    assert torch.equal(pack.B, torch.eye(H))  # full S stored as A = S - I, B = I
    assert m["pooling"] == "last_token"
    assert m["fit_config"]["probe_batch_size"] == 8 and m["fit_config"]["probe_lr"] == 1e-5
    # the default configuration on the same data differs in exactly those choices
    d = fit(tiny_model, tiny_tokenizer, FitConfig(probe_epochs=3, head_epochs=1, head_prompts=4, batch_size=8, progress=False,
                                                   head_rank=2), FitData(HARMFUL, BENIGN, pairs, {"counts": {}}))
    assert d.meta["preset"] is None and d.meta["layer_rule"] == "depth:0.55" and d.meta["tau_rule"].startswith("benign fit")
    assert d.meta["layer"] == round(0.55 * (tiny_model.config.num_hidden_layers - 1))
    points = d.meta["operating_points"]
    assert list(points) == ["strict", "balanced", "permissive"] and d.meta["tau"] == points["balanced"]["tau"]


def test_depth_layer_rule():
    from autosteer.method.fit import choose_layer

    sas, auc = [0.0] * 30, [0.5] * 30
    assert choose_layer("depth:0.6", sas, auc) == (17, "depth:0.6")
    assert choose_layer("depth:0.69", sas, auc) == (20, "depth:0.69")  # the high-recall preset: layer 20 of 30
    assert choose_layer("depth:0.55", sas, auc) == (16, "depth:0.55")  # the default: layer 16 of SmolLM2's 30
    assert choose_layer("depth:0", sas, auc)[0] == 0 and choose_layer("depth:1", sas, auc)[0] == 29
    assert choose_layer("depth:0.6", [0.0] * 4, [0.5] * 4)[0] == 2
    for bad in ("depth:1.5", "depth:x", "depth:-0.1"):
        with pytest.raises(ValueError, match="fraction"):
            choose_layer(bad, sas, auc)
