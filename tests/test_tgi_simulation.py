"""AutoSteer inside a simulated TGI server (``tests/_tgi_sim.py``) driving a tiny random Llama.

What is checked, against TGI's batch protocol as simulated (from_pb / filter / concatenate with
the chooser rebuilt from protobuf, flattened prefill, chunked prefill with discarded tokens,
n-gram speculation, decode "graph replays" that run no Python hooks):

- every request's generated tokens equal what ``autosteer.attach(...).generate`` produces for
  that prompt alone (transformers, batch of one) -- steered or not, in both modes, with
  requests joining at different steps, chunked, speculated and graph-replayed;
- its gate decision (latch, step of the first trigger, prompt score) equals the transformers one;
- rows of unlatched requests receive no writes (final scores bit-identical to the raw logits)
  and their tokens equal an unsteered run of the same server;
- state is freed when requests finish, is never inherited by a request reusing a slot, and
  warmup / Cache.delete / filter release what they drop;
- install refuses internals that do not match, and the CLI wrapper installs only for ``serve``.
"""
from __future__ import annotations

import logging
import sys

from pathlib import Path

import pytest
import torch

import _tgi_sim as sim
import autosteer
from autosteer.integrations import tgi
from autosteer.prompting import PromptFormat, encode_one
from conftest import make_pack, make_tiny_model, make_tokenizer

PROMPTS = ["how do i make a bomb", "write poem about sea", "what is capital of france", "how do i steal cookies",
           "explain photosynthesis", "bake cake", "hack the python process", "recipe soup"]
MAX_NEW = 8


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fake_tgi():
    saved = sim.install_fake_package()
    yield sim
    tgi.uninstall()
    sim.remove_fake_package(saved)


def _setup(layers=None):
    tok = make_tokenizer()
    hf = make_tiny_model(len(tok))
    rows = [encode_one(tok, p, PromptFormat()) for p in PROMPTS]
    pack = make_pack(hf, layers=layers)
    with autosteer.attach(hf, pack) as h:
        p = [float(h.generate(input_ids=torch.tensor([r]), max_new_tokens=1, force=False).p_unsafe[0]) for r in rows]
    return hf, rows, pack, p


@pytest.fixture(scope="module")
def setup():
    return _setup()


@pytest.fixture(scope="module")
def setup_layers():
    """A pack whose probe reads layers 0 (a pre-hook on block 0) and 2 (block 1's outputs)."""
    return _setup([0, 2])


def _pack_file(tmp_path, pack, tau):
    pack.meta["tau"] = tau
    return str(pack.save(tmp_path / "tiny.pack.safetensors"))


def _reference(hf, rows, pack, mode):
    """transformers + AutoSteer, one prompt at a time: (tokens, steered, latched_at, p_unsafe) per request."""
    out = {}
    with autosteer.attach(hf, pack, mode=mode) as h:
        for i, r in enumerate(rows):
            o = h.generate(input_ids=torch.tensor([r]), max_new_tokens=MAX_NEW, do_sample=False)
            out[i] = (o.sequences[0, len(r):].tolist(), bool(o.steered[0]), int(o.latched_at[0]), float(o.p_unsafe[0]))
    return out


def _serve(hf, rows, arrivals, *, speculate=0, chunking=True, budget=24, graphs=True, pack_path=None, mode="prefill",
           logprobs=(4,), tokenizer=None, prompt_check="warn"):
    """One simulated server lifetime; returns (outputs, recorder, summaries, runtime, model)."""
    sim.SETTINGS.update(speculate=speculate, max_prefill_tokens=budget)
    summaries = {}
    rt = None
    if pack_path is not None:
        rt = tgi.install(pack_path, mode, prompt_check=prompt_check)
    try:
        # TGI builds the model after the server starts
        model = sim.FlashCausalLM(hf, cuda_graphs=graphs, tokenizer=tokenizer)
        if rt is not None:
            rt.store.report_on_release = True
            rt.store.on_release = lambda rid, s: summaries.__setitem__(rid, s)
        # TGI's router warms up with one request per max_input_tokens of max_batch_prefill_tokens, all with
        # id 0 (backends/v3 grpc_client.rs warmup): several rows sharing one request id (found by review)
        warm = sim.FlashCausalLMBatch.from_pb(sim.PbBatch(10_000, [sim.Request(0, rows[0], 2), sim.Request(0, rows[1], 2)]),
                                             None, model.dtype, model.device)
        model.warmup(warm)
        if rt is not None:
            assert len(rt.store) == 0, "warmup's dummy request leaked into the store"
            assert summaries and all(v is None for v in summaries.values()), \
                "warmup's dummy requests were reported as decisions (a device read)"
            summaries.clear()
            assert not rt.warming and rt.probe_buf.overflow is None and rt.head_buf.overflow is None
        sim.RECORDER = []
        reqs = {step: [sim.Request(i, rows[i], MAX_NEW, chunk_len=c if chunking else None, prefill_logprobs=i in logprobs)
                       for i, c in items]
                for step, items in arrivals.items()}  # prefill_logprobs: lm_head over the whole prompt
        outputs = sim.Router(model, chunking=chunking).run(reqs)
        recorder = sim.RECORDER
        if rt is not None:
            assert len(rt.store) == 0, f"finished requests left state behind: {rt.store.request_ids}"
        return outputs, recorder, summaries, rt, model
    finally:
        sim.RECORDER = None
        tgi.uninstall()


def _check_no_writes_to_unlatched(recorder, summaries):
    """Every chooser call: rows of requests that were never latched are bit-identical to the raw logits."""
    checked = steered = 0
    for ids, raw, final, _still in recorder:
        for b, rid in enumerate(ids):
            if not summaries[rid].latched:
                assert torch.equal(raw[b], final[b]), f"unlatched request {rid} got logits writes"
                checked += 1
            elif not torch.equal(raw[b], final[b]):
                steered += 1
    assert checked and steered
    return checked, steered


ARRIVALS = {0: [(0, 10), (1, 4), (2, None)], 2: [(3, 6), (4, None), (5, 3)], 5: [(6, None), (7, 5)]}


def test_simulation_matches_transformers_without_autosteer(fake_tgi, setup):
    """The simulated server (chunked prefill, joins, graph replays) generates what transformers does."""
    hf, rows, _, _ = setup
    outputs, _, _, _, model = _serve(hf, rows, ARRIVALS)
    for i, r in enumerate(rows):
        ref = hf.generate(input_ids=torch.tensor([r]), max_new_tokens=MAX_NEW, do_sample=False)[0, len(r):].tolist()
        assert outputs[i] == ref, f"request {i}"
    assert model.replays > 0 and model.eager_forwards > 0


@pytest.mark.parametrize("layers", [1, 2])
def test_prefill_mode_chunked_stream_with_graph_replays(fake_tgi, request, tmp_path, layers):
    """... also for a pack whose probe reads two layers (a capture buffer each, written inside the graphs)."""
    hf, rows, pack, p = request.getfixturevalue("setup" if layers == 1 else "setup_layers")
    assert len(pack.layers) == layers
    s = sorted(p)
    pack_path = _pack_file(tmp_path, pack, (s[3] + s[4]) / 2)  # about half the prompts gate
    ref = _reference(hf, rows, pack, "prefill")
    assert 0 < sum(v[1] for v in ref.values()) < len(rows)
    outputs, recorder, summaries, rt, model = _serve(hf, rows, ARRIVALS, pack_path=pack_path)
    plain, *_ = _serve(hf, rows, ARRIVALS)
    for i in range(len(rows)):
        tokens, steered, latched_at, p_unsafe = ref[i]
        assert outputs[i] == tokens, f"request {i}: tokens differ from transformers+AutoSteer"
        got = summaries[i]
        assert got.latched == steered and got.latched_at == latched_at, f"request {i}: {got} vs {ref[i]}"
        assert got.p_unsafe == pytest.approx(p_unsafe, abs=1e-5)
        assert got.tokens == len(outputs[i]) and got.prefill_done
        if not steered:
            assert outputs[i] == plain[i], f"unlatched request {i} differs from the unsteered server"
    assert any(outputs[i] != plain[i] for i in range(len(rows)) if ref[i][1]), "steering changed nothing"
    _check_no_writes_to_unlatched(recorder, summaries)
    # graph replays ran no Python hook: the capture hooks ran once per eager forward and per graph capture
    assert model.replays > 0
    assert len(rt.probe_bufs) == layers
    assert all(b.writes == model.eager_forwards + len(model.cuda_graphs) for b in rt.probe_bufs)


def test_mid_prompt_chunks_never_latch_nor_get_steered(fake_tgi, setup, tmp_path):
    """tau = 0: every prompt gates, yet rows whose chunk is not the last are left untouched."""
    hf, rows, pack, _ = setup
    pack_path = _pack_file(tmp_path, pack, 0.0)
    arrivals = {0: [(0, 3), (1, 2)], 1: [(2, 4)]}  # short chunks and a tight budget: many mid-prompt rows
    outputs, recorder, summaries, rt, _ = _serve(hf, rows, arrivals, budget=6, pack_path=pack_path)
    mid_rows = kept_rows = 0
    for ids, raw, final, still in recorder:
        for b, rid in enumerate(ids):
            if still[b]:  # the server discards this row's token: no latch, no writes
                assert torch.equal(raw[b], final[b]), f"mid-prompt row of request {rid} was written"
                mid_rows += 1
            else:
                assert not torch.equal(raw[b], final[b]), f"kept row of request {rid} was not steered (tau=0)"
                kept_rows += 1
    assert mid_rows >= 4 and kept_rows > 0
    for rid in (0, 1, 2):
        assert summaries[rid].latched and summaries[rid].latched_at == 0
    # and the latch was decided on the last prompt token, not a chunk's end
    ref = _reference(hf, rows, pack, "prefill")
    for rid in (0, 1, 2):
        assert outputs[rid] == ref[rid][0]
        assert summaries[rid].p_unsafe == pytest.approx(ref[rid][3], abs=1e-5)


@pytest.mark.parametrize("layers", [1, 2])
def test_monitor_mode_with_speculation(fake_tgi, request, tmp_path, layers):
    """n-gram speculation (2 tokens): the latch is committed at each row's last accepted position,
    so outputs equal non-speculative monitor-mode generation (one-layer and two-layer probes)."""
    hf, rows, pack, p = request.getfixturevalue("setup" if layers == 1 else "setup_layers")
    s = sorted(p)
    pack_path = _pack_file(tmp_path, pack, (s[3] + s[4]) / 2)
    ref = _reference(hf, rows, pack, "monitor")
    assert any(v[2] > 0 for v in ref.values()), "no request latched after its prompt: weak scenario"
    arrivals = {0: [(0, None), (1, None), (2, None)], 2: [(3, None), (4, None)], 3: [(5, None), (6, None), (7, None)]}
    outputs, recorder, summaries, rt, model = _serve(hf, rows, arrivals, speculate=2, chunking=False,
                                                     pack_path=pack_path, mode="monitor")
    assert model.accepted_extra > 0, "no speculative token was ever accepted: weak scenario"
    for i in range(len(rows)):
        tokens, steered, latched_at, _ = ref[i]
        assert outputs[i] == tokens, f"request {i}: tokens differ from transformers+AutoSteer (monitor)"
        assert summaries[i].latched == steered and summaries[i].latched_at == latched_at, f"request {i}"


def test_monitor_window_reaches_the_store(fake_tgi, setup, tmp_path):
    hf, rows, pack, p = setup
    pack_path = _pack_file(tmp_path, pack, 0.5)
    sim.SETTINGS.update(speculate=0, max_prefill_tokens=4096)
    for window, want in ((None, None), (3, 3), (0, None)):  # None: the pack's (it has none); 0: every token
        rt = tgi.install(pack_path, "monitor", monitor_window=window)
        try:
            sim.FlashCausalLM(hf, cuda_graphs=False)
            assert rt.store.w.monitor_window == want
        finally:
            tgi.uninstall()
    with pytest.raises(ValueError, match="monitor_window=-2 must be >= 0"):
        tgi.install(pack_path, "monitor", monitor_window=-2)
    assert tgi.runtime() is None


def test_state_is_per_request_and_freed(fake_tgi, setup, tmp_path):
    """A request reusing a freed slot starts clean; Cache.delete and filter release what they drop."""
    hf, rows, pack, p = setup
    s = sorted(p)
    pack_path = _pack_file(tmp_path, pack, (s[3] + s[4]) / 2)
    ref = _reference(hf, rows, pack, "prefill")
    gated = [i for i in range(len(rows)) if ref[i][1]]
    benign = [i for i in range(len(rows)) if not ref[i][1]]
    sim.SETTINGS.update(speculate=0, max_prefill_tokens=4096)
    rt = tgi.install(pack_path, "prefill")
    try:
        model = sim.FlashCausalLM(hf, cuda_graphs=False)
        cache = sim.Cache()
        # a gated request, then a benign one on the same slot (ids are unique in TGI; slots are reused)
        for k, i in enumerate([gated[0], benign[0]]):
            b = sim.FlashCausalLMBatch.from_pb(sim.PbBatch(k, [sim.Request(100 + k, rows[i], 2)]), None, model.dtype,
                                               model.device)
            _, nb, _ = model.generate_token(b)
            assert rt.store.state(100 + k).slot == 0
            assert rt.store.summary(100 + k).latched == ref[i][1]
            cache.set(nb)
            cache.delete(nb.batch_id)  # ClearCache
            assert 100 + k not in rt.store
        # filter drops finished requests' state, concatenate re-attaches a processor bound to the new rows
        b1 = sim.FlashCausalLMBatch.from_pb(sim.PbBatch(7, [sim.Request(200, rows[0], 4), sim.Request(201, rows[1], 4)]),
                                            None, model.dtype, model.device)
        b2 = sim.FlashCausalLMBatch.from_pb(sim.PbBatch(8, [sim.Request(202, rows[2], 4)]), None, model.dtype,
                                            model.device)
        _, b1, _ = model.generate_token(b1)
        _, b2, _ = model.generate_token(b2)
        both = sim.FlashCausalLMBatch.concatenate([b1, b2])
        w0 = both.next_token_chooser.warpers[0]
        assert isinstance(w0, tgi.AutoSteerTGIProcessor) and w0.request_ids == [200, 201, 202]
        kept = both.filter([202, 200])
        assert set(rt.store.request_ids) == {200, 202}
        assert kept.next_token_chooser.warpers[0].request_ids == [202, 200]
        _, kept, _ = model.generate_token(kept)  # reordered rows keep their own latches
        for rid, i in ((200, 0), (202, 2)):
            assert rt.store.summary(rid).latched == ref[i][1]
    finally:
        tgi.uninstall()


def test_a_dropped_processor_is_reattached(fake_tgi, setup, tmp_path, caplog):
    hf, rows, pack, _ = setup
    pack_path = _pack_file(tmp_path, pack, 0.0)
    sim.SETTINGS.update(speculate=0, max_prefill_tokens=4096)
    tgi.install(pack_path, "prefill")
    try:
        model = sim.FlashCausalLM(hf, cuda_graphs=False)
        b = sim.FlashCausalLMBatch.from_pb(sim.PbBatch(1, [sim.Request(1, rows[0], 3)]), None, model.dtype, model.device)
        b.next_token_chooser.warpers.clear()  # a rebuild path autosteer does not know about
        sim.RECORDER = []
        with caplog.at_level(logging.WARNING, logger="autosteer.integrations.tgi"):
            model.generate_token(b)
        assert "re-attached" in caplog.text
        _, raw, final, _ = sim.RECORDER[0]
        assert not torch.equal(raw, final)  # tau = 0: steered despite the missing processor
    finally:
        sim.RECORDER = None
        tgi.uninstall()


def test_the_shard_logs_the_start_up_line_the_vllm_workers_log(fake_tgi, setup, tmp_path, caplog):
    """Once attached to the model, the shard logs "AutoSteer active ...: layer L, mode M, tau T, pack PATH (sha256 X)",
    the line the vLLM workers log (the Docker smoke test greps it for both engines), with the pack file's hash."""
    import hashlib

    hf, _, pack, _ = setup
    pack_path = _pack_file(tmp_path, pack, 0.5)
    sha = hashlib.sha256(Path(pack_path).read_bytes()).hexdigest()[:16]
    sim.SETTINGS.update(speculate=0, max_prefill_tokens=4096)
    tgi.install(pack_path, "prefill")
    try:
        with caplog.at_level(logging.INFO, logger="autosteer.integrations.tgi"):
            sim.FlashCausalLM(hf, cuda_graphs=False)
        assert (f"AutoSteer active (TGI, FlashLlamaForCausalLM): layer {pack.layer}, mode prefill, tau 0.5, "
                f"pack {pack_path} (sha256 {sha})") in caplog.text, caplog.text
    finally:
        tgi.uninstall()


def test_install_refuses_mismatched_internals(fake_tgi, setup, tmp_path, monkeypatch):
    hf, rows, pack, _ = setup
    pack_path = _pack_file(tmp_path, pack, 0.5)

    def other_call(self, input_ids, scores, speculate):  # a future TGI with another signature
        return None

    monkeypatch.setattr(sim.HeterogeneousNextTokenChooser, "__call__", other_call)
    with pytest.raises(tgi.TGIIntegrationError, match=r"HeterogeneousNextTokenChooser.__call__ takes"):
        tgi.install(pack_path)
    assert tgi.runtime() is None
    monkeypatch.undo()
    # a layer that no longer returns (mlp_out, attn_res): the first forward fails loudly
    monkeypatch.setattr(sim.FlashLlamaLayer, "forward", lambda self, h, r, *a: (h if r is None else h + r, None))
    tgi.install(pack_path)
    try:
        model = sim.FlashCausalLM(hf, cuda_graphs=False)
        b = sim.FlashCausalLMBatch.from_pb(sim.PbBatch(1, [sim.Request(1, rows[0], 3)]), None, model.dtype, model.device)
        with pytest.raises(tgi.TGIIntegrationError, match=r"\(mlp_out, attn_res\)"):
            model.generate_token(b)
    finally:
        tgi.uninstall()


def test_plain_linear_lm_head_is_refused_by_name():
    """TGI's transformers fallback has a plain nn.Linear lm_head (no SpeculativeHead): the error
    names that, instead of blaming a Medusa speculator (a SpeculativeHead whose head is None)."""
    with pytest.raises(tgi.TGIIntegrationError, match="not TGI's SpeculativeHead"):
        tgi._TGI.output_embedding(torch.nn.Linear(4, 8, bias=False))
    medusa = torch.nn.Module()
    medusa.head = None
    with pytest.raises(tgi.TGIIntegrationError, match="Medusa"):
        tgi._TGI.output_embedding(medusa)
    head = sim.SpeculativeHead(torch.nn.Linear(4, 8, bias=False))
    assert tgi._TGI.output_embedding(head) is head.head.linear.weight


def test_pack_must_match_the_served_model(fake_tgi, setup, tmp_path):
    hf, rows, _, _ = setup
    other = make_pack(make_tiny_model(hf.config.vocab_size, seed=1))
    path = str(other.save(tmp_path / "other.pack.safetensors"))
    tgi.install(path)
    try:
        with pytest.raises(autosteer.PackError, match="checksum"):
            sim.FlashCausalLM(hf, cuda_graphs=False)
    finally:
        tgi.uninstall()


def test_cli_wrapper_installs_for_serve_only(fake_tgi, setup, tmp_path, monkeypatch):
    _, _, pack, _ = setup
    pack_path = _pack_file(tmp_path, pack, 0.5)
    sim.CLI_CALLS.clear()
    monkeypatch.setattr(sys, "argv", ["pytest"])  # main() rewrites sys.argv for TGI's CLI
    monkeypatch.delenv(tgi.ENV_PACK, raising=False)
    tgi.main(["download-weights", "some/model"])
    assert tgi.runtime() is None and sim.CLI_CALLS[-1] == ["text-generation-server", "download-weights", "some/model"]
    with pytest.raises(tgi.TGIIntegrationError, match="AUTOSTEER_PACK"):
        tgi.main(["serve", "some/model"])
    monkeypatch.setenv(tgi.ENV_PACK, pack_path)
    monkeypatch.setenv(tgi.ENV_MODE, "monitor")
    monkeypatch.setenv("AUTOSTEER_MONITOR_WINDOW", "x")
    with pytest.raises(tgi.TGIIntegrationError, match="AUTOSTEER_MONITOR_WINDOW='x' is not an integer"):
        tgi.main(["serve", "some/model"])
    monkeypatch.setenv("AUTOSTEER_MONITOR_WINDOW", "7")
    # a malformed safety setting stops the start-up, naming the variable
    for var, value, msg in (("AUTOSTEER_TAU", "abc", "is not a number"), ("AUTOSTEER_TAU", "2", "is not a probability"),
                            ("AUTOSTEER_TAU", "nan", "is not a probability"), ("AUTOSTEER_FAIL_CLOSED", "maybe", "is not a boolean")):
        monkeypatch.setenv(var, value)
        with pytest.raises(tgi.TGIIntegrationError, match=f"{var}='{value}' {msg}"):
            tgi.main(["serve", "some/model"])
        monkeypatch.delenv(var)
    # an operating point the pack lacks stops the start-up too, before TGI loads anything
    monkeypatch.setenv("AUTOSTEER_TAU", "strict")
    with pytest.raises(tgi.TGIIntegrationError, match="AUTOSTEER_TAU='strict'.*not in this pack.*refit"):
        tgi.main(["serve", "some/model"])
    monkeypatch.delenv("AUTOSTEER_TAU")
    with pytest.raises(ValueError, match="not a probability threshold"):
        tgi.install(pack_path, tau=-1.0)
    assert tgi.runtime() is None
    try:
        tgi.main(["serve", "some/model", "--uds-path", "/tmp/x"])
        rt = tgi.runtime()
        assert rt is not None and rt.mode == "monitor" and rt.monitor_window == 7
        assert rt.fail_closed is True and rt.tau is None  # defaults: fail closed, the pack's threshold
        assert sim.CLI_CALLS[-1] == ["text-generation-server", "serve", "some/model", "--uds-path", "/tmp/x"]
    finally:
        tgi.uninstall()
    monkeypatch.setenv("AUTOSTEER_FAIL_CLOSED", "off")
    monkeypatch.setenv("AUTOSTEER_TAU", "0.25")
    try:
        tgi.main(["serve", "some/model"])
        assert tgi.runtime().fail_closed is False and tgi.runtime().tau == 0.25
    finally:
        tgi.uninstall()


def test_a_model_tgi_does_not_serve_through_flashcausallm_is_refused(fake_tgi, setup, tmp_path):
    """TGI may choose CausalLM / Seq2SeqLM / Mamba for a model: none runs the patched step, so every
    request would be served unsteered. With a pack installed the model's construction fails instead,
    and a chooser or processor running outside the attached model's step raises (found by review:
    both only warned)."""
    hf, _, pack, _ = setup
    tgi.install(_pack_file(tmp_path, pack, 0.0), "prefill")  # tau 0: every request must be steered
    try:
        with pytest.raises(tgi.TGIIntegrationError, match="TGI chose CausalLM for this model, not a FlashCausalLM"):
            sim.CausalLM(hf)
        chooser = sim.HeterogeneousNextTokenChooser.from_pb([sim.NextTokenChooserParameters()], torch.float32, "cpu")
        with pytest.raises(tgi.TGIIntegrationError, match="outside the attached FlashCausalLM"):
            chooser(torch.zeros(1, 3, dtype=torch.long), torch.randn(1, hf.config.vocab_size), 0)
        proc = chooser.warpers[0]
        assert isinstance(proc, tgi.AutoSteerTGIProcessor)
        with pytest.raises(tgi.TGIIntegrationError, match="outside a step"):
            proc(torch.zeros(1, 3, dtype=torch.long), torch.randn(1, hf.config.vocab_size))
    finally:
        tgi.uninstall()
    sim.CausalLM(hf)  # without AutoSteer TGI's own behaviour is untouched


@pytest.mark.parametrize("layers, speculate", [([2], 0), ([0, 2], 2)], ids=["one-layer", "two-layers-speculating"])
def test_a_pooled_gate_gates_as_transformers_does(fake_tgi, setup, tmp_path, layers, speculate):
    """A pack with a pooled gate (docs/method.md 7l), prompts prefilled in chunks next to joining requests (or, with
    speculated decode steps, whole: TGI does not chunk under speculation): every request's tokens, latch, first steered token and score are the transformers
    runtime's, the two prompts only the token probe fires are steered from their first token, unlatched rows get no
    writes. (Layer 0: the probe's pre-hook path.)"""
    from _pooled import pooled_pack

    hf, rows, _, _ = setup
    pack, p_last, p_pool = pooled_pack(hf, rows, layers)
    ref = _reference(hf, rows, pack, "prefill")
    outputs, recorder, summaries, rt, _ = _serve(hf, rows, ARRIVALS, speculate=speculate, chunking=not speculate,
                                                 pack_path=str(pack.save(tmp_path / "pooled.pack.safetensors")))
    assert rt.pool is not None
    for i in range(len(rows)):
        tokens, steered, latched_at, _ = ref[i]
        assert outputs[i] == tokens, f"request {i}: tokens differ from transformers+AutoSteer"
        got = summaries[i]
        assert got.latched == steered and got.latched_at == latched_at, f"request {i}: {got} vs {ref[i]}"
        assert got.p_unsafe == pytest.approx(max(p_last[i], p_pool[i]), abs=1e-4), i
    by_pool = [i for i in range(len(rows)) if p_pool[i] > pack.tau >= p_last[i]]
    assert len(by_pool) == 2 and all(summaries[i].latched and summaries[i].latched_at == 0 for i in by_pool)
    _check_no_writes_to_unlatched(recorder, summaries)


def test_a_pooled_gate_needs_prefix_caching_off(fake_tgi, setup, tmp_path, monkeypatch):
    """TGI with prefix caching on (PREFIX_CACHING, its default with flashinfer) would never run a cached prefix's tokens:
    the shard stops when the model is built, naming the setting; a last-token pack is served as before."""
    from _pooled import pooled_pack

    from autosteer.integrations.common import PoolingNotServed

    hf, rows, plain_pack, _ = setup
    pack, _, _ = pooled_pack(hf, rows, [2])
    monkeypatch.setenv("PREFIX_CACHING", "1")
    tgi.install(str(pack.save(tmp_path / "pooled.pack.safetensors")), "prefill")
    try:
        with pytest.raises(PoolingNotServed, match="PREFIX_CACHING=0.*default_pack_path\\(pooled=False\\)"):
            sim.FlashCausalLM(hf)
    finally:
        tgi.uninstall()
    rt = tgi.install(str(plain_pack.save(tmp_path / "plain.pack.safetensors")), "prefill")
    try:
        sim.FlashCausalLM(hf)
        assert rt.store is not None and rt.pool is None
    finally:
        tgi.uninstall()
