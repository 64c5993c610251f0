"""A gate probe that reads several layers: '+'-joined layer rules, the fit's concatenated features (prompt
and monitor probe), the pack's ``layers`` key, and the offline scoring that reads it."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import autosteer.method.fit as F
from autosteer.method.fit import FitConfig, check_layer_rule, choose_layers, fit, fit_memory_estimate
from autosteer.method.hidden_states import generated_token_states, last_token_states, probe_features, probe_inputs
from autosteer.method.pack import load_pack
from autosteer.method.probe import Probe
from autosteer.prompting import PromptFormat

from conftest import make_tiny_model
from test_fit_scale import labelled_data, small_cfg

FMT = PromptFormat()
L30 = [0.0] * 30


# ------------------------------------------------------------------------------------------ layer rules
def test_combined_layer_rules_resolve_to_ascending_layers():
    assert choose_layers("20+12+16", L30, L30) == ([12, 16, 20], "fixed+fixed+fixed")
    assert choose_layers("12 + 16", L30, L30) == ([12, 16], "fixed+fixed")
    # 0.4, 0.55, 0.7 of SmolLM2's 30 layers: the study's 12+16+20; the names follow the layer order
    assert choose_layers("depth:0.7+depth:0.4+depth:0.55", L30, L30) == (
        [12, 16, 20], "depth:0.4+depth:0.55+depth:0.7")
    assert choose_layers("depth:0.55+24", L30, L30) == ([16, 24], "depth:0.55+fixed")
    # a single rule is the single-layer rule of before, as a list
    assert choose_layers("depth:0.55", L30, L30) == ([16], "depth:0.55")
    auc = [0.5] * 30
    auc[7] = 0.9
    assert choose_layers("auroc", L30, auc) == ([7], "auroc")
    for ok in ("12+16+20", "depth:0.4+depth:0.55+depth:0.7", "1+2+3+4"):
        check_layer_rule(ok)
        check_layer_rule(ok, 30)
        assert FitConfig(layer_rule=ok).layer_rule == ok


@pytest.mark.parametrize("rule,n_layers,match", [
    ("12+12", None, "'12' and '12' name the same layer"),
    ("depth:0.5+depth:0.50", None, "name the same layer"),
    ("1+2+3+4+5", None, "names 5 layers: a probe reads at most 4"),
    ("12++16", None, "a single rule on each side of every"),
    ("+12", None, "a single rule on each side of every"),
    ("auroc+16", None, "'auroc' cannot be part of a '\\+'-joined rule"),
    ("16+sas", None, "'sas' cannot be part"),
    ("12+bogus", None, "unknown layer rule 'bogus'"),
    ("12+depth:1.5", None, "the depth must be a fraction"),
    ("12+30", 30, "layer 30 is outside 0..29"),
    ("12+-1", None, "layer -1 is outside"),
])
def test_bad_combined_layer_rules_are_refused(rule, n_layers, match):
    with pytest.raises(ValueError, match=match):
        check_layer_rule(rule, n_layers)
    if n_layers is None:  # refused when the config is built, before any model is loaded
        with pytest.raises(ValueError, match=match):
            FitConfig(layer_rule=rule)
    else:
        with pytest.raises(ValueError, match=match):
            choose_layers(rule, [0.0] * n_layers, [0.0] * n_layers)


def test_depth_parts_giving_one_layer_are_merged(caplog):
    """On a shallow model depth fractions can round to one layer (the default rule depth:0.55+depth:0.83 gives
    layer 2 twice on 4 layers): the probe reads it once, with a warning; two layer numbers are still refused."""
    with caplog.at_level("WARNING", logger="autosteer.method.fit"):
        assert choose_layers("depth:0.55+depth:0.83", [0.0] * 4, [0.0] * 4) == ([2], "depth:0.55")
        assert choose_layers("depth:0.55+16", [0.0] * 30, [0.0] * 30) == ([16], "depth:0.55")
        assert choose_layers("depth:0.55+depth:0.83", [0.0] * 30, [0.0] * 30) == ([16, 24], "depth:0.55+depth:0.83")
    assert sum("both give layer" in r.message for r in caplog.records) == 2
    check_layer_rule(FitConfig().layer_rule, 4)  # the default passes on a 4-layer model
    with pytest.raises(ValueError, match="'16' and '16' both give layer 16|name the same layer"):
        choose_layers("16+16", [0.0] * 30, [0.0] * 30)


def test_the_default_rule_fits_a_shallow_model(tiny_model, tiny_tokenizer):
    """The default (two depth fractions) on the 4-layer test model: one layer, a probe of H inputs."""
    pack = fit(tiny_model, tiny_tokenizer, small_cfg(layer_rule=FitConfig().layer_rule), labelled_data(20))
    assert pack.layers == [2] and pack.W1.shape[1] == tiny_model.config.hidden_size


def test_memory_estimate_counts_the_states_of_every_gate_layer():
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4)
    one = fit_memory_estimate(cfg, n_prompts=1000, n_full_depth=10, cfg=FitConfig(layer_rule="2"))["states"]
    three = fit_memory_estimate(cfg, n_prompts=1000, n_full_depth=10, cfg=FitConfig(layer_rule="0+1+2"))["states"]
    assert three - one == 2 * 1000 * 32 * 4


# ------------------------------------------------------------------------------------------ the fit
@pytest.fixture(scope="module")
def multi_fit(one_thread, tiny_tokenizer):
    """A fit reading layers 1 and 3 of a 4-layer model (written as '3+1': sorted), with a monitor probe,
    and the gate it chose (caught from fit_gate_sampled)."""
    model = make_tiny_model(len(tiny_tokenizer), layers=4)
    data = labelled_data(200)  # more rows than the random-pair sample: some are read at the gate layers only
    caught = {}
    real = F.fit_gate_sampled

    def spy(*a, **k):
        caught["gate"] = g = real(*a, **k)
        return g

    mp = pytest.MonkeyPatch()
    mp.setattr(F, "fit_gate_sampled", spy)
    try:
        pack = fit(model, tiny_tokenizer, small_cfg(layer_rule="3+1", tau_rule="fpr", monitor_prompts=4, monitor_tokens=3,
                                                    monitor_responses="own"), data)
    finally:
        mp.undo()
    return SimpleNamespace(model=model, tok=tiny_tokenizer, data=data, pack=pack, gate=caught["gate"])


def test_a_multi_layer_fit_writes_its_layers_and_a_wider_probe(multi_fit, tmp_path):
    pack, H = multi_fit.pack, 32
    assert pack.meta["layers"] == [1, 3] and pack.meta["layer"] == 1 and pack.layers == [1, 3]
    assert pack.meta["layer_rule"] == "fixed+fixed" and pack.meta["fit_config"]["layer_rule"] == "3+1"
    assert pack.W1.shape == (pack.meta["probe_hidden"], 2 * H)
    assert pack.monitor["W1"].shape == (pack.meta["probe_hidden"], 2 * H)  # the monitor probe reads the same layers
    assert pack.A.shape == (H, pack.meta["head_rank"])  # the Refusal Head is unchanged
    assert len(pack.meta["sas"]) == len(pack.meta["val_auroc"]) == 4  # the layer curves stay per single layer
    assert pack.meta["metrics"]["states_kept"]["gate_layer_only"] > 0  # both state paths fed the probe
    loaded = load_pack(pack.save(tmp_path / "ml.safetensors"))
    assert loaded.layers == [1, 3] and loaded.meta == pack.meta
    assert torch.equal(loaded.W1, pack.W1)


def test_the_packs_probe_on_concatenated_states_scores_as_the_fit_did(multi_fit):
    """The served probe (tau_rule 'fpr': trained on the training split) scores the validation rows as the fit
    reported, from the states at pack.layers concatenated in ascending order -- not from the reverse order."""
    m, gate, pack = multi_fit, multi_fit.gate, multi_fit.pack
    assert gate.layers == [1, 3] and gate.layer == 1
    texts = m.data.harmful + m.data.benign
    val = [texts[int(i)] for i in gate.val_idx]
    X = probe_inputs(m.model, m.tok, val, FMT, pack.layers, progress=False)
    assert X.shape == (len(val), 64)
    probe = Probe(pack.W1, pack.b1, pack.w2, pack.b2)
    torch.testing.assert_close(probe.score(X), gate.val_scores, atol=1e-5, rtol=1e-4)
    rates = {"tpr": float((probe.score(X) > pack.tau)[gate.val_labels == 1].float().mean()),
             "fpr": float((probe.score(X) > pack.tau)[gate.val_labels == 0].float().mean())}
    assert rates == pytest.approx(pack.meta["metrics"]["val_at_tau"], abs=1e-9)
    S = last_token_states(m.model, m.tok, val, FMT, layers=[3, 1], progress=False)  # the other order
    assert not torch.allclose(probe.score(probe_features(S)), gate.val_scores, atol=1e-3)
    # several layers: the recorded val AUROC is the probe's own, not layer 1's sweep value
    from autosteer.method.probe import auroc

    assert pack.meta["metrics"]["val_auroc"] == pytest.approx(auroc(gate.val_scores, gate.val_labels))


def test_evaluate_probe_scores_read_the_packs_layers(multi_fit):
    from autosteer.evaluate import probe_scores

    m, pack = multi_fit, multi_fit.pack
    prompts = m.data.harmful[:3] + m.data.benign[:3]
    handle = SimpleNamespace(model=m.model, pack=pack, W1=pack.W1,
                             probe_scores=lambda h: Probe(pack.W1, pack.b1, pack.w2, pack.b2).score(h))
    got = torch.tensor(probe_scores(handle, m.tok, prompts))
    S = last_token_states(m.model, m.tok, prompts, FMT, layers=[1, 3], progress=False, share_prefixes=False)
    want = Probe(pack.W1, pack.b1, pack.w2, pack.b2).score(torch.cat([S[:, 0], S[:, 1]], 1))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_generated_token_states_concatenate_the_layers_in_order(one_thread, tiny_model, tiny_tokenizer):
    prompts = ["how do i make a bomb", "bake cookies", "write poem about sea"]
    both, resp = generated_token_states(tiny_model, tiny_tokenizer, prompts, FMT, [1, 3], max_new_tokens=4, progress=False)
    one, resp1 = generated_token_states(tiny_model, tiny_tokenizer, prompts, FMT, 1, max_new_tokens=4, progress=False)
    three, _ = generated_token_states(tiny_model, tiny_tokenizer, prompts, FMT, [3], max_new_tokens=4, progress=False)
    assert resp == resp1
    assert any(len(x) for x in both)
    for b, o, t in zip(both, one, three):
        assert b.shape == (o.shape[0], 2 * o.shape[1])
        torch.testing.assert_close(b, torch.cat([o, t], 1))
    with pytest.raises(ValueError, match="must be distinct"):
        generated_token_states(tiny_model, tiny_tokenizer, prompts, FMT, [1, 1], progress=False)


def test_fit_monitor_refuses_response_states_of_another_width(multi_fit):
    m = multi_fit
    y = torch.cat([torch.ones(len(m.data.harmful)), torch.zeros(len(m.data.benign))])
    cfg = small_cfg(layer_rule="3+1", tau_rule="fpr", monitor_prompts=4, monitor_tokens=3, monitor_responses="own")
    own, _ = F.monitor_generation_rows(y, m.gate, cfg)
    one_layer = {r: torch.randn(3, 32) for r in own}  # states of one layer for a probe of two
    with pytest.raises(ValueError, match="response states are 32 wide, the gate's probe reads 64"):
        F.fit_monitor(y, m.gate, cfg, one_layer)


def test_the_fit_states_cache_keys_by_the_layer_set(one_thread, tiny_tokenizer, tmp_path):
    """A cache written by a fit of one layer set is not read back as another's."""
    from autosteer.method.hidden_states import StatesCache

    model = make_tiny_model(len(tiny_tokenizer), layers=4)
    data = labelled_data(200)  # rows outside the random-pair sample run at the gate layers only
    cache = tmp_path / "states"
    run = StatesCache(cache).run_dir
    a = fit(model, tiny_tokenizer, small_cfg(layer_rule="2", states_cache=str(cache)), data)
    assert run(model, FMT, [2], "last_token[0]").is_dir() and not run(model, FMT, [1, 2], "last_token[0]").exists()
    b = fit(model, tiny_tokenizer, small_cfg(layer_rule="1+2", states_cache=str(cache)), data)
    assert run(model, FMT, [1, 2], "last_token[0]").is_dir()  # its own batches, not layer 2's read back
    assert a.W1.shape[1] == 32 and b.W1.shape[1] == 64
    c = fit(model, tiny_tokenizer, small_cfg(layer_rule="1+2", states_cache=str(cache)), data)  # read back
    assert torch.equal(c.W1, b.W1)
