"""Monitor mode's own threshold: fitted on the model's own responses (fit side), applied to
generated tokens only (runtime side: transformers processor and the serving state store)."""
from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

import autosteer
from autosteer.method.fit import FitConfig, fit_monitor, monitor_generation_rows, monitor_rows
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
@pytest.mark.parametrize("prefix,chat", [("", True), ("sure here is", True), ("sure here is", False)])
def test_response_states_are_the_states_the_runtime_probes(tiny_model, tiny_tokenizer, prefix, chat):
    """generated_token_states reads, at each response token, the input of the pack's layer -- equal to
    a teacher-forced forward over prompt (+ response prefix) + response -- and stops before the stop
    token; a response prefix is part of the prompt (after the chat template's assistant header, or on
    a new line without a template): neither its states nor its text are returned."""
    layer, n = 2, 6
    fmt = PromptFormat(chat_template=chat)
    states, responses = generated_token_states(tiny_model, tiny_tokenizer, PROMPTS, fmt, layer,
                                               max_new_tokens=n, batch_size=4, progress=False, response_prefix=prefix)
    assert len(states) == len(PROMPTS) and len(responses) == len(PROMPTS)
    ids, mask = encode_prompts(tiny_tokenizer, PROMPTS, fmt)
    if prefix:
        pre = tiny_tokenizer(prefix if chat else "\n" + prefix, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        assert len(pre) >= 2
        ids = torch.cat([ids, pre.expand(len(ids), -1)], 1)
        mask = torch.cat([mask, torch.ones(len(ids), len(pre), dtype=mask.dtype)], 1)
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
        assert responses[i] == tiny_tokenizer.decode(gen[:k], skip_special_tokens=True)
    if prefix:  # the prefix changes what the model writes (else the test above proves nothing about it)
        plain, _ = generated_token_states(tiny_model, tiny_tokenizer, PROMPTS, fmt, layer, max_new_tokens=n,
                                          batch_size=4, progress=False)
        assert any(a.shape != b.shape or not torch.allclose(a, b) for a, b in zip(plain, states))


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


def test_fit_monitor_fits_its_own_probe_and_calibrates_tau_monitor():
    """monitor_responses="own". Responses of harmful prompts drift along one direction, benign ones do not: the monitor probe
    separates them, tau_monitor lets at most the target share of benign validation responses latch,
    and harmful ones latch within their first tokens."""
    g = torch.Generator().manual_seed(0)
    H, n = 8, 160
    y = torch.cat([torch.ones(n // 2), torch.zeros(n // 2)])
    d = torch.eye(H)[1]
    responses = {i: torch.randn(5, H, generator=g) + (4.0 * d if y[i] == 1 else 0.0) for i in range(n)}
    cfg = FitConfig(monitor_prompts=30, monitor_target_fpr=0.1, probe_epochs=200, probe_hidden=8, probe_lr=1e-2,
                    target_fpr=0.1, monitor_responses="own")
    gate = _gate(y)
    mon = fit_monitor(y, gate, cfg, responses)
    train, val = monitor_rows(y, gate, cfg)
    assert mon.metrics["response_states"]["train"] == 5 * len(train)  # trained on the training rows' responses only
    benign = [r for r in val if y[r] == 0]
    top = torch.stack([mon.probe.score(responses[r]).max() for r in benign])
    assert (top > mon.tau_monitor).float().mean() <= 0.1
    assert mon.metrics["val_benign_latch_rate"] <= 0.1
    assert mon.metrics["val_harmful_latch_rate"] >= 0.9
    assert 1 <= mon.metrics["val_harmful_leaked_tokens_median"] <= 5
    assert mon.probe.W1.shape == (8, H)  # the gate's size: the two probes stack in one op call
    with pytest.raises(ValueError, match="no response states"):
        fit_monitor(y, gate, cfg, {})
    empty_benign = {r: (v if y[r] == 1 else torch.zeros(0, H)) for r, v in responses.items()}
    with pytest.raises(ValueError, match="all of one class"):
        fit_monitor(y, gate, cfg, empty_benign)


def test_fit_monitor_forced_learns_compliance_not_the_prompt_label():
    """monitor_responses="forced": the probe learns from the responses written after the compliance
    prefix (harmful ones drift along d) and the benign prompts' own responses; the harmful prompts' own
    responses -- here refusals, like benign text -- are not training data. A refusal is then not
    mistaken for compliance on validation, while complying harmful responses latch. "own" labels
    every harmful prompt's own response harmful and needs no forced states."""
    g = torch.Generator().manual_seed(0)
    H, n = 8, 160
    y = torch.cat([torch.ones(n // 2), torch.zeros(n // 2)])
    d = torch.eye(H)[1]
    # own responses: half the harmful prompts comply (drift along d), half refuse (benign-looking)
    own = {i: torch.randn(5, H, generator=g) + (4.0 * d if (y[i] == 1 and i % 2 == 0) else 0.0) for i in range(n)}
    forced = {i: torch.randn(5, H, generator=g) + (4.0 * d if y[i] == 1 else 0.0) for i in range(n)}
    cfg = FitConfig(monitor_prompts=30, monitor_target_fpr=0.1, probe_epochs=200, probe_hidden=8, probe_lr=1e-2,
                    target_fpr=0.1)
    assert cfg.monitor_responses == "forced" and cfg.monitor_prefix  # the default
    gate = _gate(y)
    train, val = monitor_rows(y, gate, cfg)
    own_rows, forced_rows = monitor_generation_rows(y, gate, cfg)
    assert forced_rows == train and set(own_rows) == {r for r in train if y[r] == 0} | set(val)
    only_needed = {r: own[r] for r in own_rows}  # own responses of harmful training rows are never generated
    mon = fit_monitor(y, gate, cfg, only_needed, {r: forced[r] for r in forced_rows})
    assert mon.metrics["responses"] == "forced" and mon.metrics["prefix"] == cfg.monitor_prefix
    assert mon.metrics["response_states"]["train"] == 5 * (len(train) + sum(int(y[r] == 0) for r in train))
    assert mon.metrics["val_benign_latch_rate"] <= 0.1
    harmful_val = [r for r in val if y[r] == 1]
    latched = {r for r in harmful_val if bool((mon.probe.score(own[r]) > mon.tau_monitor).any())}
    complying = {r for r in harmful_val if r % 2 == 0}
    assert len(latched & complying) >= 0.9 * len(complying)
    refusing = [r for r in harmful_val if r % 2]
    assert len(latched - complying) <= 0.25 * len(refusing)  # refusals latch about as rarely as benign responses
    with pytest.raises(ValueError, match="no forced-response states"):
        fit_monitor(y, gate, cfg, only_needed, None)
    with pytest.raises(ValueError, match="no response states"):
        fit_monitor(y, gate, cfg, {}, {r: forced[r] for r in forced_rows})
    own_cfg = FitConfig(**{**cfg.__dict__, "monitor_responses": "own"})
    assert monitor_generation_rows(y, gate, own_cfg) == (train + val, [])
    with pytest.raises(ValueError, match="monitor_responses is 'own'"):
        fit_monitor(y, gate, own_cfg, own, forced)
    assert fit_monitor(y, gate, own_cfg, own).metrics["responses"] == "own"


def test_monitor_responses_config_is_validated():
    with pytest.raises(ValueError, match="monitor_responses must be one of"):
        FitConfig(monitor_responses="mine")
    with pytest.raises(ValueError, match="non-empty monitor_prefix"):
        FitConfig(monitor_prompts=8, monitor_prefix="  ")
    with pytest.raises(ValueError, match="monitor_prefix must be a string"):
        FitConfig(monitor_prefix=None)
    FitConfig(monitor_prompts=8, monitor_responses="own", monitor_prefix="")  # no prefix needed
    FitConfig(monitor_prefix="")  # no monitor probe fitted: nothing to begin


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
    data = FitData(harmful, benign, [], {"counts": {}})
    pack = fit(tiny_model, tiny_tokenizer, cfg, data)
    m = pack.meta
    assert 0.0 <= m["tau_monitor"] <= 1.0 and pack.tau_monitor == m["tau_monitor"]
    assert m["monitor"]["prompts"] == {"train": 8, "val": 4} and m["monitor"]["tokens"] == 3
    assert m["monitor"]["responses"] == "forced" and m["monitor"]["prefix"] == "Sure, here is"
    assert "Sure, here is" in m["monitor"]["probe"] and m["fit_config"]["monitor_responses"] == "forced"
    own = fit(tiny_model, tiny_tokenizer, FitConfig(**{**cfg.__dict__, "monitor_responses": "own"}), data)
    assert own.meta["monitor"]["responses"] == "own" and "prefix" not in own.meta["monitor"]
    assert not torch.equal(own.monitor["W1"], pack.monitor["W1"])  # trained on other responses
    assert pack.has_monitor_probe and pack.monitor["W1"].shape == pack.W1.shape
    back = load_pack(pack.save(tmp_path / "p.safetensors"))
    assert back.tau_monitor == pack.tau_monitor and back.has_monitor_probe
    for k in ("W1", "b1", "w2", "b2"):
        assert torch.equal(back.monitor[k], pack.monitor[k])
    # the prefill gate is the one a prefill-only fit gives: the monitor probe does not touch it
    plain = fit(tiny_model, tiny_tokenizer, FitConfig(**{**cfg.__dict__, "monitor_prompts": 0}), data)
    assert not plain.has_monitor_probe and plain.tau_monitor is None
    assert all(torch.equal(getattr(plain, k), getattr(pack, k)) for k in ("W1", "b1", "w2", "b2")) and plain.tau == pack.tau
    off = fit(tiny_model, tiny_tokenizer, FitConfig.preset("paper", probe_epochs=2, head_epochs=1, head_prompts=4,
                                                          batch_size=8, progress=False), data)
    assert "tau_monitor" not in off.meta and off.tau_monitor is None  # the paper's configuration: prefill only


def _monitor_probe(pack, b2: float, seed: int = 7) -> dict:
    g = torch.Generator().manual_seed(seed)
    F, H = pack.W1.shape
    return {"W1": torch.randn(F, H, generator=g), "b1": torch.randn(F, generator=g), "w2": torch.randn(F, generator=g),
            "b2": torch.tensor([b2])}


def test_pack_monitor_probe_is_validated(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    pack = make_pack(tiny_model)
    pack.meta["tau_monitor"] = 0.9
    pack.monitor = _monitor_probe(pack, 0.0)
    path = pack.save(tmp_path / "ok.safetensors")
    assert load_pack(path).has_monitor_probe
    W1s, b1s, w2s, b2s = pack.stacked_probes()
    assert W1s.shape == (2, *pack.W1.shape) and torch.equal(W1s[1], pack.monitor["W1"]) and b2s.shape == (2,)
    # bad monitor probes: NaN, wrong shape, missing tau_monitor
    for mutate, msg in ((lambda m: m["W1"].__setitem__((0, 0), float("nan")), "monitor.W1 contains NaN"),
                        (lambda m: m.__setitem__("w2", torch.zeros(3)), "monitor.w2 has shape")):
        pack.monitor = _monitor_probe(pack, 0.0)
        mutate(pack.monitor)
        with pytest.raises(PackError, match=msg):
            pack.save(tmp_path / "bad.safetensors")
    pack.monitor = _monitor_probe(pack, 0.0)
    del pack.meta["tau_monitor"]
    with pytest.raises(PackError, match="monitor probe but no 'tau_monitor'"):
        pack.save(tmp_path / "bad.safetensors")
    # a file with only part of a monitor probe
    t = load_file(str(path))
    del t["monitor.b2"]
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_file(t, str(tmp_path / "part.safetensors"), metadata=meta)
    with pytest.raises(PackError, match="incomplete monitor probe"):
        load_pack(tmp_path / "part.safetensors")


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


def test_generated_tokens_are_scored_by_the_monitor_probe(tiny_model, tiny_tokenizer):
    """With a monitor probe, generated tokens are scored by it, the prompt by the prefill probe."""
    ids, mask = _inputs(tiny_tokenizer)
    pack = make_pack(tiny_model)
    pack.meta["tau"], pack.meta["tau_monitor"] = 0.5, 0.5
    pack.b2 = torch.tensor([100.0])  # the prefill probe fires on everything ...
    pack.monitor = _monitor_probe(pack, -100.0)  # ... the monitor probe on nothing
    with autosteer.attach(tiny_model, pack) as h:
        mon = h.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, mode="monitor")
    assert (mon.latched_at == 0).all()  # prompt: prefill probe
    pack.meta["tau"] = 1.0  # the prompt can no longer fire: only a generated token could latch
    with autosteer.attach(tiny_model, pack) as h:
        mon = h.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, mode="monitor")
    assert not mon.steered.any()  # the prefill probe (p = 1) would have latched every generated token
    pack.b2 = torch.tensor([-100.0])
    pack.monitor = _monitor_probe(pack, 100.0)
    pack.meta["tau"] = 0.5
    with autosteer.attach(tiny_model, pack) as h:
        mon = h.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, mode="monitor")
        pre = h.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, mode="prefill")
    assert not mon.gate.any() and (mon.latched_at == 1).all()  # the first generated token latches
    assert not pre.steered.any()  # prefill mode never runs the monitor probe


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


def test_monitor_window_stops_probing_after_the_calibrated_tokens(tiny_model, tiny_tokenizer):
    """Monitor mode probes the first monitor.tokens generated tokens (the window tau_monitor was
    calibrated on), then stops; monitor_window overrides it (0: every token)."""
    ids, mask = _inputs(tiny_tokenizer)
    pack = make_pack(tiny_model)
    pack.meta["tau"], pack.meta["tau_monitor"] = 1.0, 0.5
    pack.meta["monitor"] = {"tokens": 2}
    pack.monitor = _monitor_probe(pack, -100.0)  # never fires: every call runs to the end
    calls = []

    def run(**kw):
        calls.clear()
        with autosteer.attach(tiny_model, pack, **kw) as h:
            real = h._op

            def spy(*a, **k):
                calls.append(bool(a[2].any()))  # probe_mask
                return real(*a, **k)

            h._op = spy
            h.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                       mode="monitor")
            return h.monitor_window

    assert run() == 2
    assert calls == [True, True, True, False, False, False]  # prompt, generated tokens 0 and 1, then none
    with autosteer.attach(tiny_model, pack, mode="monitor") as h:  # p_last: the last score, not the unprobed calls' NaN
        proc = h.logits_processor()
        tiny_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                            logits_processor=[proc], pad_token_id=0)
    assert torch.isfinite(proc.p_last).all() and (proc.p_last < 1e-6).all()  # the monitor probe's (b2 = -100)
    assert run(monitor_window=0) is None and calls == [True] * 6
    assert run(monitor_window=4) == 4 and calls == [True] * 5 + [False]
    with pytest.raises(ValueError, match="monitor_window"):
        autosteer.attach(tiny_model, pack, monitor_window=-1)
    old = make_pack(tiny_model)  # a pack of the first monitor mode: tau_monitor and a window, no monitor probe
    old.meta["tau"], old.meta["tau_monitor"], old.meta["monitor"] = 1.0, 1.0, {"tokens": 2}
    with autosteer.attach(tiny_model, old) as h:
        assert h.monitor_window == 2 and h.monitor_probe is None and not h.tau_monitor_fallback
        weights = []
        real = h._op
        h._op = lambda *a, **k: (weights.append((bool(a[2].any()), a[8] is h.W1)), real(*a, **k))[1]
        h.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                   mode="monitor")
    assert weights == [(True, True)] * 3 + [(False, True)]  # the prefill probe, within the recorded window
    pack.meta["monitor"] = {"tokens": 0}
    with pytest.raises(PackError, match="monitor.tokens"):
        pack.validate()


def test_store_monitor_window(tiny_model):
    """The serving store probes a request's prompt and its first monitor_window generated tokens."""
    from autosteer.integrations.common import SteerStateStore, SteerWeights

    pack = make_pack(tiny_model)
    pack.meta["tau"], pack.meta["tau_monitor"] = 1.0, 0.5  # nothing latches: every step runs the probe mask
    pack.meta["monitor"] = {"tokens": 2}
    pack.monitor = _monitor_probe(pack, -100.0)
    w = SteerWeights.from_pack(pack, tiny_model.lm_head.weight)
    assert w.monitor_window == 2 and w.stacked is not None
    store = SteerStateStore(w, mode="monitor")
    masks = []
    real = store._op

    def spy(*a, **k):
        sr = k.get("state_rows")  # a slot step passes the mask per slot: the rows' entries
        masks.append((a[2] if sr is None else a[2][sr]).tolist())
        return real(*a, **k)

    store._op = spy
    H = w.W1.shape[1]
    V = w.U.shape[0]
    store.begin_step(["a"], cu_seqlens=[0, 3])  # prefill
    store.apply(torch.randn(1, V), probe_hidden=torch.randn(3, H), head_hidden=torch.randn(1, H))
    store.end_step()
    for step in range(4):
        if step == 1:  # "b" joins mid-way: its prompt is probed whatever a's count is
            store.begin_step(["a", "b"], cu_seqlens=[0, 1, 3], prefilling=[False, True])
            store.apply(torch.randn(2, V), probe_hidden=torch.randn(3, H), head_hidden=torch.randn(2, H))
        else:
            ids = ["a", "b"] if step > 1 else ["a"]
            store.begin_step(ids)
            store.apply(torch.randn(len(ids), V), probe_hidden=torch.randn(len(ids), H), head_hidden=torch.randn(len(ids), H))
        store.end_step()
    # a: prompt, generated tokens 0 and 1 (steps 0, 1), then not; b: prompt (step 1), tokens 0, 1 (steps 2, 3)
    assert masks == [[True], [True], [True, True], [False, True], [False, True]]
    assert store.summary("a").tokens == 5 and store.summary("b").tokens == 3
    assert store.summary("b").p_last == store.summary("b").p_last  # b's last step probed it: a score, not NaN

    # speculative decoding, 3 positions: position j holds generated token (tokens so far) - 1 + j
    masks.clear()
    store.begin_step(["c"], cu_seqlens=[0, 2])
    store.apply(torch.randn(1, V), probe_hidden=torch.randn(2, H), head_hidden=torch.randn(1, H))
    store.end_step()  # c has 1 token: the next step's positions hold tokens 0, 1, 2
    for _ in range(2):
        store.begin_step(["c"], positions=3)
        for j in range(3):
            store.apply(torch.randn(1, V), probe_hidden=torch.randn(3, H), head_hidden=torch.randn(3, H))
        store.end_step(accepted=torch.tensor([2]))  # 2 tokens kept per step
    # step 1: tokens 0, 1 probed, token 2 (past the window) not; step 2 (3 tokens so far): none
    assert masks == [[True], [True], [True], [False], [False], [False], [False]]
    sc = store.summary("c")
    assert sc.tokens == 5 and not sc.latched
    assert sc.p_last < 1e-6  # the last probed token's score (step 1, position 1), not a stale or unprobed one


def test_pivot_states_are_the_head_inputs_after_a_cut_answer(tiny_model, tiny_tokenizer, one_thread):
    """collect_pivot_states: for each prompt, the model's own greedy answer cut after j tokens (every j in
    1..answer length when cuts allow), then the refusal tokens; g is lm_head's input at the positions that
    predict each refusal token, as an unpadded forward of that one sequence gives it."""
    from autosteer.method.refusal_head import collect_pivot_states
    from autosteer.prompting import PromptFormat, encode_batch

    model, tok = tiny_model, tiny_tokenizer
    fmt = PromptFormat(chat_template=False)
    prompts = ["how do I do the thing", "a much longer prompt about several other things entirely"]
    answer = [5, 6, 7]
    g, y, rows = collect_pivot_states(model, tok, prompts, fmt, answer, max_answer_tokens=4, cuts=10, batch_size=2,
                                      progress=False)
    expected, seen = [], {}
    hook = model.lm_head.register_forward_pre_hook(lambda _m, a: seen.__setitem__("g", a[0]))
    try:
        for p in prompts:
            ids = encode_batch(tok, [p], fmt)["input_ids"]
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                 pad_token_id=0)[0, ids.shape[1]:].tolist()
            n = next((i for i, t in enumerate(gen) if t in (0, 3)), len(gen))
            for j in range(1, n + 1):  # cuts=10 >= n: every cut point
                seq = torch.tensor([ids[0].tolist() + gen[:j] + answer])
                model(input_ids=seq)
                expected.append(seen.pop("g")[0, -len(answer) - 1:-1])
    finally:
        hook.remove()
    assert rows == len(expected) > 0 and y.tolist() == answer * rows
    torch.testing.assert_close(g, torch.cat(expected).float(), atol=1e-5, rtol=1e-4)
    few, _, n_few = collect_pivot_states(model, tok, prompts, fmt, answer, 4, cuts=1, progress=False)
    assert n_few == 2 and few.shape == (2 * len(answer), g.shape[1])  # one cut point per answer
    with pytest.raises(TypeError, match="text prompts only"):
        collect_pivot_states(model, tok, [{"text": "x", "images": []}], fmt, answer, progress=False)


def test_head_pivots_config():
    assert FitConfig().head_pivots is None  # as many as monitor_prompts: none for a prefill-only pack
    FitConfig(head_pivots=0)
    with pytest.raises(ValueError, match="head_pivots must be >= 0"):
        FitConfig(head_pivots=-1)
    with pytest.raises(ValueError, match="head_pivots must be >= 0"):
        FitConfig(head_pivots=True)
    with pytest.raises(ValueError, match="head_pivots must be >= 0"):
        FitConfig(head_pivots=2.5)


def test_refusal_continuation_tokens_follow_a_word(tiny_tokenizer):
    """The pivot rows' refusal continues written text: the tokens of "x " + answer after those of "x" (for SmolLM2's
    BPE the same as " " + answer; a SentencePiece tokenizer would add a second word-start marker to a bare space)."""
    from autosteer.method.refusal_head import continuation_token_ids

    tok = tiny_tokenizer
    ids = continuation_token_ids(tok, "no thanks")
    full = tok("x no thanks", add_special_tokens=False)["input_ids"]
    assert ids[:-1] == full[len(tok("x", add_special_tokens=False)["input_ids"]):] and ids[-1] == tok.eos_token_id


def test_harmful_registers_need_the_broad_fit_data():
    from autosteer.method.fit import default_fit_data

    with pytest.raises(ValueError, match="broad fit data only"):
        default_fit_data(0, 10, 0, "default", harmful_registers=True)
