"""A pack whose probe reads several layers, served by the transformers runtime.

The probe of such a pack takes the residual streams entering each of its layers at the same token, side by
side (``W1`` is ``[F, k * H]``). The runtime registers one capture hook per layer and passes the layers' rows
to the op as separate operands (``probe_extra``): nothing is concatenated outside the op. Checked here
against an independent computation (transformers' ``output_hidden_states``) and against one-layer packs.
"""
from __future__ import annotations

import pytest
import torch
from conftest import make_pack, make_tiny_model, make_tokenizer

import autosteer
from autosteer.method.probe import Probe
from autosteer.method.pack import PackError
from autosteer.prompting import PromptFormat, encode_one
from autosteer.runtime.attach import AutoSteerHandle

PROMPTS = ["how do i make a bomb", "write poem about sea", "what is capital of france", "how do i steal cookies",
           "explain photosynthesis", "bake cake"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    tok = make_tokenizer()
    hf = make_tiny_model(len(tok))
    rows = [encode_one(tok, p, PromptFormat()) for p in PROMPTS]
    return hf, rows


def _left_padded(rows, pad: int = 0):
    T = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@pytest.mark.parametrize("layers", [[0, 2, 3], [1, 3]])
def test_gate_scores_read_every_probe_layer(setup, layers):
    """p_unsafe of a padded batch equals the probe on transformers' own hidden states of those layers at each
    row's last prompt token, concatenated in the pack's order (hidden_states[L] is block L's input)."""
    hf, rows = setup
    pack = make_pack(hf, layers=layers, seed=3)
    assert pack.layers == layers and tuple(pack.W1.shape) == (8, len(layers) * hf.config.hidden_size)
    ids, mask = _left_padded(rows)
    with torch.no_grad():
        hs = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    want = Probe(pack.W1, pack.b1, pack.w2, pack.b2).score(torch.cat([hs[L][:, -1] for L in layers], dim=1))
    with autosteer.attach(hf, pack) as h:
        for force in (False, None):  # scored only, and scored by the op
            got = h.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, force=force).p_unsafe
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # a probe on one of the layers alone scores differently: the test sees which layers are read
    one = Probe(pack.W1[:, :hf.config.hidden_size], pack.b1, pack.w2, pack.b2).score(hs[layers[0]][:, -1])
    assert not torch.allclose(one, want, atol=1e-3)


def _one_live_block(hf, layers, live: int, seed: int = 5):
    """(k-layer pack whose W1 is zero but for layer ``layers[live]``'s block, the one-layer pack at that layer)."""
    H = hf.config.hidden_size
    one = make_pack(hf, layer=layers[live], seed=seed)
    multi = make_pack(hf, layers=layers, seed=seed)
    W1 = torch.zeros(one.W1.shape[0], len(layers) * H)
    W1[:, live * H:(live + 1) * H] = one.W1
    multi.W1, multi.b1, multi.w2, multi.b2, multi.A, multi.B = W1, one.b1, one.w2, one.b2, one.A, one.B
    return multi, one


def _run(hf, rows, pack, mode, tau, tau_monitor):
    pack.meta["tau"] = tau
    out = []
    with autosteer.attach(hf, pack, mode=mode, tau_monitor=tau_monitor) as h:
        ids, mask = _left_padded(rows)
        o = h.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
        out.append((o.sequences.tolist(), o.steered.tolist(), o.latched_at.tolist(), o.p_unsafe))
        for r in rows[:3]:  # and one request at a time (another batch shape: the decode buffers differ)
            o = h.generate(input_ids=torch.tensor([r]), max_new_tokens=10, do_sample=False)
            out.append((o.sequences.tolist(), o.steered.tolist(), o.latched_at.tolist(), o.p_unsafe))
    return out


@pytest.mark.parametrize("mode", ["prefill", "monitor"])
@pytest.mark.parametrize("layers,live", [([1, 3], 0), ([1, 3], 1), ([0, 2, 3], 1)])
def test_a_probe_live_on_one_layer_steers_as_that_layers_pack(setup, mode, layers, live):
    """Prefill and every decode step (monitor mode probes each generated token) pass each layer's rows at its
    place: with W1 zero outside one layer's block, tokens, decisions, latch steps and scores equal the one-layer
    pack's -- whichever block is live, so no layer's rows stand in for another's."""
    hf, rows = setup
    multi, one = _one_live_block(hf, layers, live)
    with autosteer.attach(hf, one) as h:
        ids, mask = _left_padded(rows)
        p = h.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, force=False).p_unsafe.sort().values
    tau = float(p[2] + p[3]) / 2  # about half the prompts gate at the prompt
    tau_monitor = float(p[-1]) + 1e-3 if mode == "monitor" else None  # monitor: the rest may latch while generating
    got, want = _run(hf, rows, multi, mode, tau, tau_monitor), _run(hf, rows, one, mode, tau, tau_monitor)
    for (s_m, st_m, at_m, p_m), (s_o, st_o, at_o, p_o) in zip(got, want):
        assert s_m == s_o and st_m == st_o and at_m == at_o
        torch.testing.assert_close(p_m, p_o, rtol=1e-5, atol=1e-6)
    if mode == "prefill":
        assert any(any(st) for _, st, _, _ in want) and not all(all(st) for _, st, _, _ in want)
    else:  # some row latched at a generated token: the decode steps' probe decided it
        assert any(a > 0 for _, _, at, _ in want for a in at)


def test_a_pack_layer_the_model_lacks_is_refused(setup):
    hf, _ = setup
    pack = make_pack(hf, layers=[1, 2])
    pack.meta["layers"] = [1, 9]
    pack.meta["num_layers"] = 12  # a pack for a deeper model of the same shape
    with pytest.raises(PackError, match="pack layer 9 does not exist in a model with 4 layers"):
        AutoSteerHandle(hf, pack, check_model=False)


def test_a_forward_that_skipped_a_probe_layer_is_refused_by_name(setup):
    """A forward in which a later probe layer's block did not run (a layer-skipping model) leaves that layer's
    rows unset: the processor refuses the step by name instead of probing a partial input."""
    hf, rows = setup
    pack = make_pack(hf, layers=[1, 3])
    ids = torch.tensor([rows[0]])
    with autosteer.attach(hf, pack) as h, torch.no_grad():
        proc = h.logits_processor()
        logits = hf(input_ids=ids).logits[:, -1]
        h.capture.probe_raws[1] = None  # as if block 3 had been skipped in this forward
        with pytest.raises(RuntimeError, match="saw no hidden states"):
            proc(ids, logits)


def test_a_model_split_over_devices_is_refused_at_attach_by_name(setup):
    """The op runs on one device. A model dispatched by accelerate over several devices (its modules carry an
    ``_hf_hook`` whose ``execution_device`` is where they run) with a probe layer elsewhere than lm_head and the
    embeddings is refused at attach with the devices named, not by the op's mixed-device check at the first step.
    One device is all this machine has, so the other is written into the hook as accelerate would; a hook that
    names the model's own device is accepted."""
    from types import SimpleNamespace

    hf, _ = setup
    pack = make_pack(hf, layers=[1, 3])
    block = hf.model.layers[3]
    try:
        block._hf_hook = SimpleNamespace(execution_device=torch.device("cpu"))
        autosteer.attach(hf, pack).detach()
        block._hf_hook = SimpleNamespace(execution_device=1)  # accelerate writes a GPU as its index
        with pytest.raises(ValueError, match=r"split: .*lm_head on cpu, probe layer 1 on cpu, probe layer 3 on cuda:1"):
            autosteer.attach(hf, pack)
        assert getattr(hf, "_autosteer_handle", None) is None  # nothing left attached
    finally:
        del block._hf_hook


def _variant(args, kw) -> tuple:
    """What makes a kernel variant of one op call: dtypes, operand count, probe width, optional operands."""
    return (args[5].dtype, args[0].dtype, args[1].dtype, args[4].dtype, len(kw.get("probe_extra") or ()),
            tuple(args[8].shape), kw.get("row_tau") is not None, kw.get("row_probe") is not None,
            kw.get("state_rows") is not None)


@pytest.mark.parametrize("mode", ["prefill", "monitor"])
def test_precompile_covers_every_variant_generate_launches(setup, monkeypatch, mode):
    """``attach`` on a device whose kernels compile at first use (CUDA) runs ``precompile``: one op call per
    variant the handle's steps launch. Every variant a batched ``generate`` then launches -- prefill and decode
    steps, the monitor probe in monitor mode, a probe on two layers -- is one precompile already ran."""
    import dataclasses

    import autosteer.runtime.attach as attach_mod

    hf, rows = setup
    pack = make_pack(hf, layers=[1, 3])
    mon = {"W1": pack.W1.clone(), "b1": pack.b1.clone(), "w2": pack.w2.clone(), "b2": pack.b2 + 0.5}
    pack = dataclasses.replace(pack, meta={**pack.meta, "tau_monitor": 0.9}, monitor=mon)
    seen = []
    real = attach_mod.AutoSteerHandle.__dict__["precompile"]
    monkeypatch.setattr(attach_mod, "_compiles_kernels", lambda dev: True)  # as on CUDA
    calls = []
    monkeypatch.setattr(attach_mod.AutoSteerHandle, "precompile", lambda self, *a, **k: calls.append(real(self, *a, **k)))
    with autosteer.attach(hf, pack, mode=mode) as h, torch.no_grad():
        assert calls == [2]  # at attach: the prefill probe and the monitor probe
        op = h._op

        used = set()

        def spy(*args, **kw):
            seen.append(_variant(args, kw))
            used.add("monitor" if h.monitor_probe is not None and args[8] is h.monitor_probe[0] else "prefill")
            return op(*args, **kw)

        h._op = spy
        real(h)
        pre = set(seen)
        seen.clear()
        ids, mask = _left_padded(rows[:4])
        h.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        assert seen and set(seen) <= pre, set(seen) - pre
        assert used == {"prefill", "monitor"}  # (decode steps pass the monitor probe in both modes)


def test_monitor_from_watches_only_the_grey_zone(setup):
    """The two-stage gate in the transformers path: monitor mode with ``monitor_from`` latches at generated tokens
    only in rows whose prompt score reached it. Each row of a batch then generates exactly what it generates in
    monitor mode (a row in the zone) or in prefill mode (a row under it), with the same latch decisions."""
    import dataclasses

    hf, rows = setup
    pack = make_pack(hf, layers=[1, 3])
    mon = {"W1": pack.W1.clone(), "b1": pack.b1.clone(), "w2": pack.w2.clone(), "b2": pack.b2 + 0.5}
    pack = dataclasses.replace(pack, meta={**pack.meta, "tau": 1.0, "tau_monitor": 0.9}, monitor=mon)
    ids, mask = _left_padded(rows)
    runs = {}
    with torch.no_grad():
        for name, mode, low in (("monitor", "monitor", None), ("prefill", "prefill", None), ("grey", "monitor", "mid")):
            with autosteer.attach(hf, pack, mode=mode) as h:
                if low == "mid":
                    p = runs["monitor"].p_unsafe
                    low = float(p.sort().values[len(p) // 2])  # half the rows watched
                    h.monitor_from = low
                runs[name] = h.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    p, grey = runs["monitor"].p_unsafe, runs["grey"]
    watched = p >= low
    assert 0 < int(watched.sum()) < len(p)
    assert bool(runs["monitor"].steered[watched].any()) and not bool(runs["prefill"].steered.any())  # (the setup)
    for b in range(len(p)):
        ref = runs["monitor" if watched[b] else "prefill"]
        assert torch.equal(grey.sequences[b], ref.sequences[b]), b
        assert (bool(grey.steered[b]), int(grey.latched_at[b])) == (bool(ref.steered[b]), int(ref.latched_at[b])), b


def test_monitor_from_is_checked_against_the_prompt_threshold(setup):
    hf, _ = setup
    pack = make_pack(hf, layers=[1, 3])
    with pytest.raises(ValueError, match="grey zone .* would be empty"):
        autosteer.attach(hf, pack, mode="monitor", monitor_from=float(pack.tau) + 0.01)
    with autosteer.attach(hf, pack, mode="monitor", monitor_from=0.25) as h:
        assert h.monitor_from == 0.25
