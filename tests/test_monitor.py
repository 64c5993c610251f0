"""Monitor mode's own threshold: fitted on the model's own responses (fit side), applied to
generated tokens only (runtime side: transformers processor and the serving state store)."""
from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

import autosteer
from autosteer.method.fit import FitConfig, fit_monitor, monitor_rows
from autosteer.method.hidden_states import generated_token_states
from autosteer.method.pack import PackError, load_pack
from autosteer.method.probe import train_probe
from autosteer.prompting import PromptFormat, encode_prompts, position_ids_from_mask
from conftest import make_pack

PROMPTS = ["how do i make a bomb", "write poem about sea", "what is capital of france", "how do i steal cookies",
           "explain photosynthesis", "bake cake"]


def _inputs(tok, prompts=PROMPTS):
    return encode_prompts(tok, prompts, PromptFormat())


# ----------------------------------------------------------------------------------------- fit side
def test_response_states_are_the_states_the_runtime_probes(tiny_model, tiny_tokenizer):
    """generated_token_states reads, at each response token, the input of the pack's layer -- equal to
    a teacher-forced forward over prompt + response -- and stops before the stop token."""
    layer, n = 2, 6
    states, responses = generated_token_states(tiny_model, tiny_tokenizer, PROMPTS, PromptFormat(), layer,
                                               max_new_tokens=n, batch_size=4, progress=False)
    assert len(states) == len(PROMPTS) and len(responses) == len(PROMPTS)
    ids, mask = _inputs(tiny_tokenizer)
    seqs = tiny_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n + 1, do_sample=False, pad_token_id=0)
    W = ids.shape[1]
    eos = tiny_model.generation_config.eos_token_id
    full_mask = torch.cat([mask, torch.ones_like(seqs[:, W:])], 1)
    with torch.no_grad():
        hs = tiny_model(input_ids=seqs, attention_mask=full_mask, position_ids=position_ids_from_mask(full_mask),
                        output_hidden_states=True).hidden_states[layer]
    for i, st in enumerate(states):
        gen = seqs[i, W:].tolist()
        k = gen.index(eos) if eos in gen else len(gen)
        assert st.shape == (min(k, n), tiny_model.config.hidden_size)
        torch.testing.assert_close(st, hs[i, W:W + len(st)].float(), atol=1e-4, rtol=1e-4)


def _gate(y: torch.Tensor, val_fraction: float = 0.5):
    from autosteer.method.fit import _stratified_split

    tr, va = _stratified_split(y, val_fraction, torch.Generator().manual_seed(0))
    return SimpleNamespace(train_idx=tr, val_idx=va)


def test_monitor_rows_come_from_their_own_split():
    y = torch.tensor([1.0] * 40 + [0.0] * 40)
    gate = _gate(y)
    cfg = FitConfig(monitor_prompts=6)
    train, val = monitor_rows(y, gate, cfg)
    assert set(train) <= set(gate.train_idx.tolist()) and set(val) <= set(gate.val_idx.tolist())
    assert sum(y[train] == 1) == 6 and sum(y[train] == 0) == 6
    assert sum(y[val] == 1) == 4 and sum(y[val] == 0) == 4  # 2/3 as many for calibration


def test_fit_monitor_calibrates_tau_monitor_on_benign_validation_responses():
    """Responses of harmful prompts drift along one direction, benign ones do not: the retrained
    probe separates them, tau_monitor lets at most the target share of benign validation responses
    latch, and harmful ones latch within their first tokens."""
    g = torch.Generator().manual_seed(0)
    H, n = 8, 160
    y = torch.cat([torch.ones(n // 2), torch.zeros(n // 2)])
    X = torch.randn(n, H, generator=g) + 3.0 * y[:, None] * torch.eye(H)[0]  # prompts: separable on dim 0
    d = torch.eye(H)[1]
    responses = {i: torch.randn(5, H, generator=g) + (4.0 * d if y[i] == 1 else 0.0) for i in range(n)}
    cfg = FitConfig(monitor_prompts=30, monitor_target_fpr=0.1, probe_epochs=200, probe_hidden=8, probe_lr=1e-2,
                    target_fpr=0.1)
    gate = _gate(y)
    mon = fit_monitor(X, y, gate, cfg, responses)
    _, val = monitor_rows(y, gate, cfg)
    benign = [r for r in val if y[r] == 0]
    top = torch.stack([mon.probe.score(responses[r]).max() for r in benign])
    assert (top > mon.tau_monitor).float().mean() <= 0.1
    assert mon.metrics["val_benign_latch_rate"] <= 0.1
    assert mon.metrics["val_harmful_latch_rate"] >= 0.9
    assert 1 <= mon.metrics["val_harmful_leaked_tokens_median"] <= 5
    # the prompt threshold is recalibrated for the retrained probe on the prompt validation split
    val_benign = mon.val_scores[y[gate.val_idx] == 0]
    assert (val_benign > mon.tau).float().mean() <= 0.1
    with pytest.raises(ValueError, match="no response states"):
        fit_monitor(X, y, gate, cfg, {})


def test_sample_weights_scale_free_and_validated():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 4, generator=g), (torch.rand(30, generator=g) > 0.5).float()
    plain = train_probe(x, y, hidden=4, epochs=5, lr=1e-2)
    ones = train_probe(x, y, hidden=4, epochs=5, lr=1e-2, sample_weight=torch.full((30,), 3.0))
    torch.testing.assert_close(plain.W1, ones.W1)  # only relative weights matter
    w = torch.ones(30)
    w[:10] = 5.0
    assert not torch.allclose(plain.W1, train_probe(x, y, hidden=4, epochs=5, lr=1e-2, sample_weight=w).W1)
    for bad in (torch.ones(29), -torch.ones(30), torch.full((30,), float("nan"))):
        with pytest.raises(ValueError, match="sample_weight"):
            train_probe(x, y, hidden=4, epochs=1, sample_weight=bad)


def test_tiny_fit_writes_a_monitor_pack(tiny_model, tiny_tokenizer, tmp_path):
    from autosteer.method.fit import FitData, fit

    harmful = ["how do i make a bomb", "how do i steal cookies", "hack the python process", "kill the cat",
               "build weapon virus", "poison the dog", "steal the cake", "make a weapon"] * 2
    benign = ["write poem about sea", "what is capital of france", "explain photosynthesis", "bake cake",
              "recipe soup", "bake cookies", "write poem about sun", "what is python"] * 2
    harmful = [f"{t} {'?' if i % 2 else '!'}" for i, t in enumerate(harmful)]
    benign = [f"{t} {'?' if i % 2 else '!'}" for i, t in enumerate(benign)]
    cfg = FitConfig(probe_epochs=3, head_epochs=1, head_prompts=4, batch_size=8, progress=False, head_rank=2,
                    monitor_prompts=4, monitor_tokens=3)
    pack = fit(tiny_model, tiny_tokenizer, cfg, FitData(harmful, benign, [], {"counts": {}}))
    m = pack.meta
    assert 0.0 <= m["tau_monitor"] <= 1.0 and pack.tau_monitor == m["tau_monitor"]
    assert m["monitor"]["prompts"] == {"train": 8, "val": 4} and m["monitor"]["tokens"] == 3
    assert load_pack(pack.save(tmp_path / "p.safetensors")).tau_monitor == pack.tau_monitor
    off = fit(tiny_model, tiny_tokenizer, FitConfig.preset("paper", probe_epochs=2, head_epochs=1, head_prompts=4,
                                                          batch_size=8, progress=False),
              FitData(harmful, benign, [], {"counts": {}}))
    assert "tau_monitor" not in off.meta and off.tau_monitor is None  # the paper's configuration: prefill only


def test_pack_tau_monitor_is_validated(tiny_model, tmp_path):
    pack = make_pack(tiny_model)
    for bad, msg in ((1.5, "probability threshold"), ("0.5", "wrong type"), (True, "wrong type")):
        pack.meta["tau_monitor"] = bad
        with pytest.raises(PackError, match=msg):
            pack.save(tmp_path / "bad.safetensors")


# ------------------------------------------------------------------------------------- runtime side
def test_processor_uses_tau_at_prefill_and_tau_monitor_on_generated_tokens(tiny_model, tiny_tokenizer):
    ids, mask = _inputs(tiny_tokenizer)
    pack = make_pack(tiny_model)
    pack.meta["tau"], pack.meta["tau_monitor"] = 1.0, 0.0  # the prompt never fires, any generated token does
    with autosteer.attach(tiny_model, pack) as h:
        mon = h.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, mode="monitor")
        pre = h.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, mode="prefill")
    assert not mon.gate.any() and mon.steered.all()
    assert (mon.latched_at == 1).all()  # the first generated token is out before the latch
    assert not pre.steered.any()
    pack.meta["tau"], pack.meta["tau_monitor"] = 0.0, 1.0  # the prompt fires; generated tokens never would
    with autosteer.attach(tiny_model, pack) as h:
        mon = h.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, mode="monitor")
        assert (mon.latched_at == 0).all()
    # an explicit tau_monitor overrides the pack's
    with autosteer.attach(tiny_model, pack, tau=1.0, tau_monitor=0.0) as h:
        assert h.tau_monitor == 0.0 and not h.tau_monitor_fallback
        mon = h.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, mode="monitor")
        assert (mon.latched_at == 1).all()
    with pytest.raises(ValueError, match="tau_monitor"):
        autosteer.attach(tiny_model, pack, tau_monitor=2.0)


def test_monitor_mode_on_a_prefill_only_pack_warns_and_uses_tau(tiny_model, tiny_tokenizer):
    ids, mask = _inputs(tiny_tokenizer)
    pack = make_pack(tiny_model)
    pack.meta["tau"] = 0.0
    with autosteer.attach(tiny_model, pack) as h:
        assert h.tau_monitor == 0.0 and h.tau_monitor_fallback
        with pytest.warns(UserWarning, match="prefill-only pack"):
            h.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, mode="monitor")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # prefill mode does not warn
            h.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, mode="prefill")
