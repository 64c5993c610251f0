"""Per-step plugin work of the serving state stores (issue 19, item 3): a decode step dispatches at most
4 torch ops and no host-syncing op, counted through the public API, in the vLLM V1 runner, vLLM's Model
Runner V2 and TGI.

How the count is taken (``tests/_op_count.py``, the counting of ``tests/test_step_ops.py``): the simulated
servers of ``tests/test_vllm_simulation.py``, ``tests/test_vllm_v2_simulation.py`` and ``tests/_tgi_sim.py``
run a stream of requests with the plugin attached as each engine attaches it (the V1 processor's
``update_state`` / ``apply(logits)``, V2's ``add_request`` / ``apply_staged_writes`` / ``apply(logits, ctx)``,
TGI's patched ``generate_token`` / chooser / batch methods, and the capture hooks in the forward). A
``TorchDispatchMode`` and a ``TorchFunctionMode`` stay pushed for the whole run and log an op (or a
host-reading call) only when the Python code that issued it is AutoSteer's: the nearest frame outside
torch and the standard library is a file of the ``autosteer`` package. The engine's forward, sampling and
bookkeeping are never counted, and nothing is subtracted. A step is everything AutoSteer dispatched from
the end of the previous step's logits processing to the end of this one's (batch-update bookkeeping,
capture hooks, the processor).

Steps are classified from the simulation's own records, not from the plugin's:

- **continuing decode step**: every row runs a generated token and the rows are the previous step's, in
  the same order.
- **decode step after a batch change**: every row runs a generated token, but a request left or rows
  moved since the previous step (vLLM V1 condenses and swaps rows; V2 may reorder them; TGI filters).

The bound is about both: at most 4 ops, none of them syncing. Both are the store's *slot steps*: the op reads
and writes each request's state in the slot tables through a row -> slot map (``state_rows``); a step after a
batch change only stages the new map (numpy into the staging buffer on the CPU, no torch op; on CUDA one
pinned ``copy_`` more), so it dispatches exactly the ops of a continuing step, asserted per engine and case.
(Before the slot steps, a decode step after a batch change wrote the previous rows' state back and took the
general path: 42-46 ops in vLLM prefill mode, 62 monitor, 76 with a monitor probe and a window; TGI eager 47 /
63 / 77, replays 2 fewer.)
- **prefill step**: some row runs prompt tokens (a request joined or is mid-prompt): not bounded here,
  never syncing.

The simulated engines keep their rows in order here (``Engine(swaps=False)``, ``V2Engine(reorder=False)``:
what a real engine does while nothing joins or leaves); their own tests reorder rows at random.

What a continuing decode step is (measured on the CPU, where the op is the C++ kernel; on CUDA the same
Python dispatches the same ops, with the Triton launch instead of ``autosteer::steer_step_cpu``):

- vLLM (V1 and V2), prefill mode: the residual-stream sum at the probe layer (one ``add``, in the layer
  hook) and the op: 2 ops. The ``compute_logits`` input is kept by reference (vLLM runs the sampler right
  after ``compute_logits`` and captures no CUDA graph with the plugin on), the latch lives in a row-ordered
  tensor the op updates in place, and each row's phase is known on the host (V1: the request's output list
  has grown since it was added; V2: the scheduler's exact sequence lengths).
- vLLM, monitor mode: the same plus one in-place ``add`` counting each row's latched steps (what
  ``latched_at`` is derived from when the state is written back): 3 ops.
- TGI, prefill and monitor mode: the probe layer's hook writes the residual-stream sum into a preallocated
  buffer (one ``add``; the CUDA-graph contract), lm_head's input is copied into its buffer only while TGI warms
  up and captures its graphs and is kept by reference in a later eager forward (no op), then the op, plus the
  latch count in monitor mode: 2 and 3 ops in an eager forward, as in vLLM; in a CUDA-graph replay the hooks
  do not run (their kernels are inside the graph): 1 and 2.
- A probe reading two layers (the default pack's) adds the second layer's sum: 3 and 4 ops, in every engine
  (:func:`test_a_two_layer_probe_adds_one_capture_op`).

With a monitor window the mask of rows still inside it is one of a list made when the rows were set up
(no op), or one ``le`` per step for a window longer than :data:`autosteer.integrations.common.WINDOW_MASKS`
(64 steps): then a one-layer pack's step is 4 ops in vLLM and in a TGI eager forward
(:func:`test_a_window_longer_than_the_precomputed_masks`), a two-layer pack's 5, the one configuration over
the budget (a window over 63 tokens, where the pack's default is 16). A step past every row's window probes nothing and
counts no latch: one op fewer. TGI with speculation runs the op once per position: in prefill mode a
continuing step is a slot step of 5 ops (:data:`SPECULATIVE_PREFILL_STEP`), in monitor mode the general path
commits the latch on the device, at most 107 ops. Every continuing step's ops are
asserted exactly, so adding one fails its test; the results are checked against transformers + AutoSteer.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import random

import pytest
import torch

import _tgi_sim as sim
from _op_count import PluginSteps, host_syncs
import autosteer
from autosteer.integrations import common, tgi
from autosteer.integrations import vllm as avllm
from test_vllm_simulation import MAX_NEW, Engine, _config, _setup, setup  # noqa: F401  (setup: the module fixture)
from test_vllm_simulation import _reference as vllm_reference
from test_vllm_v2_simulation import V2Engine

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_OPS_PER_DECODE_STEP = 4

ARRIVALS = {0: [0, 1, 2], 2: [3], 5: [4]}


# ------------------------------------------------------------------------------------------------
# classification and report


def _classify(records) -> list[str]:
    """Per simulation record ``(request ids by row, raw, final, rows still mid-prompt)``: its kind."""
    kinds, kept = [], set()
    for k, (ids, _raw, _final, still) in enumerate(records):
        if not all(r in kept for r in ids):
            kinds.append("prefill")
        elif k and list(records[k - 1][0]) == list(ids):
            kinds.append("decode")
        else:
            kinds.append("decode after a batch change")
        kept.update(r for r, s in zip(ids, still) if not s)
    return kinds


def _report(records, steps) -> dict:
    """kind -> [(n ops, ops by name, host syncs)], one entry per engine step."""
    kinds = _classify(records)
    out = collections.defaultdict(list)
    for ops, calls, tag in steps:
        assert tag is not None and 0 <= tag < len(records), tag
        out[kinds[tag]].append((len(ops), dict(collections.Counter(ops)), host_syncs(ops, calls)))
    return out


def _check(report, want: dict, *, n_decode: int = 3, n_changed: int = 1, window: bool = False,
           budget: int = MAX_OPS_PER_DECODE_STEP):
    """Every decode step -- continuing or after a batch change -- dispatches exactly the ops ``want`` lists (at
    most ``budget``, 4, the op once) and no host sync; no step syncs. ``window``: monitor mode with a window, where
    a step past every row's window probes nothing and so counts no latch (``want`` without its ``add_``)."""
    assert sum(want.values()) <= budget and want.get(OP) == 1
    ok = [want] + ([{k: v for k, v in want.items() if k != "aten.add_"}] if window else [])
    for kind, least in (("decode", n_decode), ("decode after a batch change", n_changed)):
        steps = report[kind]
        assert len(steps) >= least, f"the scenario ran {len(steps)} steps of kind {kind!r}: {dict(report)}"
        bad = [r for r in steps if r[1] not in ok or r[2]]
        assert not bad, f"{kind} steps other than {want} or syncing (n ops, ops, host syncs):\n" + \
            "\n".join(map(str, bad))
        assert any(r[1] == want for r in steps), f"no {kind} step dispatched {want}: {steps}"
    bad = [r for r in report["prefill"] if r[2]]
    assert not bad, "prefill steps syncing:\n" + "\n".join(map(str, bad))


def _decisions(store, rec) -> dict:
    """Each request's summary, read (outside the count) just before the store releases it."""
    out = {}
    real = store.release_many

    def release_many(ids, **kw):
        ids = list(ids)
        with rec.paused():
            out.update((rid, store.summary(rid)) for rid in ids if rid in store)
        return real(ids, **kw)

    store.release_many = release_many
    return out


# ------------------------------------------------------------------------------------------------
# packs and references


def _pack(setup, *, tau=None, monitor_probe=False, window=None):
    """The module's pack (about half the prompts gate), optionally with another tau, a monitor probe (and its
    tau_monitor) and a monitor window (with window 3 two requests latch, at generated tokens 2 and 3; with 6,
    two more, at 5)."""
    _hf, _rows, pack = setup
    meta = dict(pack.meta)
    if tau is not None:
        meta["tau"] = tau
    mon = None
    if monitor_probe:  # the prefill probe with another bias: with tau 1, requests latch at generated tokens 2 to 5
        mon = {"W1": pack.W1.clone(), "b1": pack.b1.clone(), "w2": pack.w2.clone(), "b2": pack.b2 + 0.5}
        meta["tau_monitor"] = 0.9
        if window is not None:
            meta["monitor"] = {"tokens": window}
    return dataclasses.replace(pack, meta=meta, monitor=mon)


_REFS: dict = {}


def _reference(setup, pack, mode, key):
    """transformers + AutoSteer, one prompt at a time: (tokens, steered, latched_at) per request."""
    if key not in _REFS:
        hf, rows, _ = setup
        _REFS[key] = vllm_reference(hf, rows, pack, mode)
    return _REFS[key]


def _check_against_reference(ref, outputs, decisions):
    """Each request's tokens, latch and first steered token equal transformers + AutoSteer's."""
    assert set(outputs) <= set(ref)
    for i, tokens in outputs.items():
        want_tokens, steered, latched_at = ref[i]
        assert tokens == want_tokens, f"request {i}: tokens differ from transformers + AutoSteer"
        got = decisions[i]
        assert (got.latched, got.latched_at) == (steered, latched_at), f"request {i}: {got} vs {ref[i]}"


# ------------------------------------------------------------------------------------------------
# the three engines, driven as in their simulation tests, recorded


def run_v1(setup, tmp_path, monkeypatch, pack, mode, *, window=None, swaps=False, arrivals=ARRIVALS, chunk=4,
           async_outputs=False):
    hf, rows, _ = setup
    monkeypatch.setenv(avllm.ENV_PACK, str(pack.save(tmp_path / "p.safetensors")))
    monkeypatch.setenv(avllm.ENV_MODE, mode)
    if window is not None:
        monkeypatch.setenv(avllm.ENV_MONITOR_WINDOW, str(window))
    lp = avllm.AutoSteerVLLMLogitsProcessor(_config(), "cpu", False, patch_runner=False)
    engine = Engine(hf, lp, chunk=chunk, swaps=swaps, async_outputs=async_outputs)
    try:
        avllm.attach_capture(engine.model, max_reqs=8, metadata_fn=engine.metadata)
        store = lp._ensure_store(required=True)  # (the patched load_model builds it at start-up)
        real = lp.apply
        with PluginSteps() as rec:
            decisions = _decisions(store, rec)

            def apply(logits):
                out = real(logits)
                rec.cut(len(engine.records))  # the engine records this step after the processor returns
                return out

            lp.apply = apply
            outputs = engine.run(arrivals, rows)
            lp.update_state(engine._batch_update([], list(engine.batch)))  # the last requests leave
            lp.update_state(None)  # ... and vLLM drops them: their states are released
    finally:
        avllm.detach_capture()
    assert not len(store)
    return _report(engine.records, rec.steps), outputs, {engine.key_of[k]: v for k, v in decisions.items()}


def run_v2(setup, tmp_path, monkeypatch, pack, mode, *, window=None, reorder=False, arrivals=ARRIVALS, chunk=4):
    hf, rows, _ = setup
    monkeypatch.setenv(avllm.ENV_PACK, str(pack.save(tmp_path / "p.safetensors")))
    monkeypatch.setenv(avllm.ENV_MODE, mode)
    if window is not None:
        monkeypatch.setenv(avllm.ENV_MONITOR_WINDOW, str(window))
    engine = V2Engine(hf, chunk=chunk, reorder=reorder)
    cap = avllm.attach_capture(engine.model, pack, max_reqs=8, metadata_fn=engine.metadata)
    try:
        engine.lp = lp = avllm.AutoSteerVLLMLogitsProcessor(_config(), engine.lp_states, capture=cap,
                                                            v2_runner=engine.runner)
        engine.profile_run()
        real = lp.apply
        with PluginSteps() as rec:
            decisions = _decisions(lp.store, rec)

            def apply(logits, ctx):
                out = real(logits, ctx)
                rec.cut(len(engine.records))
                return out

            lp.apply = apply
            outputs = engine.run(arrivals, rows)
    finally:
        avllm.detach_capture()
    assert not len(lp.store)
    return _report(engine.records, rec.steps), outputs, decisions


@pytest.fixture(scope="module")
def fake_tgi():
    saved = sim.install_fake_package()
    yield sim
    tgi.uninstall()
    sim.remove_fake_package(saved)


def run_tgi(setup, tmp_path, pack, mode, *, window=None, graphs=False, speculate=0, arrivals=ARRIVALS,
            monitor_from=None):
    hf, rows, _ = setup
    path = str(pack.save(tmp_path / "tgi.pack.safetensors"))
    sim.SETTINGS.update(speculate=speculate, max_prefill_tokens=24)
    rt = tgi.install(path, mode, monitor_window=window, monitor_from=monitor_from)
    try:
        model = sim.FlashCausalLM(hf, cuda_graphs=graphs)
        warm = sim.FlashCausalLMBatch.from_pb(sim.PbBatch(10_000, [sim.Request(0, rows[0], 2)]), None, model.dtype,
                                             model.device)
        model.warmup(warm)
        sim.RECORDER = []
        chunk = 4 if not speculate else None  # (TGI does not chunk prompts with speculation)
        reqs = {step: [sim.Request(i, rows[i], MAX_NEW, chunk_len=chunk) for i in items]
                for step, items in arrivals.items()}
        real = model.generate_token
        with PluginSteps() as rec:
            decisions = _decisions(rt.store, rec)

            def generate_token(batch):
                out = real(batch)
                rec.cut(len(sim.RECORDER) - 1)  # the chooser recorded this step
                return out

            model.generate_token = generate_token
            outputs = sim.Router(model, chunking=not speculate).run(reqs)
        records = sim.RECORDER
        assert not len(rt.store)
    finally:
        sim.RECORDER = None
        tgi.uninstall()
    if graphs:
        assert model.replays > 0
    return _report(records, rec.steps), outputs, decisions


# ------------------------------------------------------------------------------------------------
# the bounds

OP = "autosteer.steer_step_cpu"
#: a continuing decode step's ops, exactly (see the module docstring)
VLLM_STEP = {"prefill": {"aten.add": 1, OP: 1}, "monitor": {"aten.add": 1, OP: 1, "aten.add_": 1}}
TGI_STEP = {"eager": {"prefill": {"aten.add": 1, OP: 1},
                      "monitor": {"aten.add": 1, OP: 1, "aten.add_": 1}},
            "graph replays": {"prefill": {OP: 1}, "monitor": {OP: 1, "aten.add_": 1}}}
CASES = {  # name: (pack options, mode)
    "prefill": (dict(), "prefill"),
    "monitor": (dict(), "monitor"),
    "no latched rows": (dict(tau=1.0), "prefill"),
    "monitor probe, window": (dict(tau=1.0, monitor_probe=True, window=3), "monitor"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_vllm_v1_decode_step_ops(setup, tmp_path, monkeypatch, case):
    opts, mode = CASES[case]
    pack = _pack(setup, **opts)
    report, outputs, decisions = run_v1(setup, tmp_path, monkeypatch, pack, mode)
    _check(report, VLLM_STEP[mode], window="window" in case)
    _check_against_reference(_reference(setup, pack, mode, case), outputs, decisions)
    if case == "no latched rows":
        assert not any(d.latched for d in decisions.values())
    elif case == "prefill":
        assert 0 < sum(d.latched for d in decisions.values()) < len(decisions)


def test_vllm_v1_decode_steps_under_async_scheduling(setup, tmp_path, monkeypatch):
    """vLLM's async scheduling appends a -1 placeholder per kept token to the output list the processor holds:
    the list still grows, so a continuing decode step is still told apart on the host."""
    pack = _pack(setup)
    report, outputs, decisions = run_v1(setup, tmp_path, monkeypatch, pack, "prefill", async_outputs=True)
    _check(report, VLLM_STEP["prefill"])
    _check_against_reference(_reference(setup, pack, "prefill", "prefill"), outputs, decisions)


@pytest.mark.parametrize("case", list(CASES))
def test_vllm_v2_decode_step_ops(setup, tmp_path, monkeypatch, case):
    opts, mode = CASES[case]
    pack = _pack(setup, **opts)
    report, outputs, decisions = run_v2(setup, tmp_path, monkeypatch, pack, mode)
    _check(report, VLLM_STEP[mode], window="window" in case)
    _check_against_reference(_reference(setup, pack, mode, case), outputs, decisions)


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph replays"])
@pytest.mark.parametrize("case", list(CASES))
def test_tgi_decode_step_ops(fake_tgi, setup, tmp_path, case, graphs):
    """TGI's hooks write into preallocated buffers (one op each in an eager forward, none in a replayed one)."""
    opts, mode = CASES[case]
    pack = _pack(setup, **opts)
    report, outputs, decisions = run_tgi(setup, tmp_path, pack, mode, graphs=graphs)
    forward = "graph replays" if graphs else "eager"
    _check(report, TGI_STEP[forward][mode], window="window" in case)
    _check_against_reference(_reference(setup, pack, mode, case), outputs, decisions)


@pytest.fixture(scope="module")
def setup_layers():
    """The module's model with a pack whose probe reads two layers (1 and 3; about half the prompts gate)."""
    return _setup([1, 3])


#: a continuing decode step's ops with a probe reading two layers: one capture op more (the second layer's
#: residual-stream sum, in its own hook): 3, and 4 in monitor mode
TWO_LAYER_STEP = {"vllm v1": {"prefill": {"aten.add": 2, OP: 1}, "monitor": {"aten.add": 2, OP: 1, "aten.add_": 1}},
                  "tgi eager": {"prefill": {"aten.add": 2, OP: 1}, "monitor": {"aten.add": 2, OP: 1, "aten.add_": 1}},
                  "tgi graph replays": TGI_STEP["graph replays"]}
TWO_LAYER_STEP["vllm v2"] = TWO_LAYER_STEP["vllm v1"]


@pytest.mark.parametrize("case", ["prefill", "monitor", "monitor probe, window"])
@pytest.mark.parametrize("engine", list(TWO_LAYER_STEP))
def test_a_two_layer_probe_adds_one_capture_op(fake_tgi, setup_layers, tmp_path, monkeypatch, engine, case):
    """A pack whose probe reads two layers: the op reads both layers' rows itself (nothing concatenated), so a
    decode step adds only the second layer's capture (one op in eager forwards, none in a replayed graph);
    the results still equal transformers + AutoSteer's (with the monitor probe, also two layers wide, stacked)."""
    opts, mode = CASES[case]
    pack = _pack(setup_layers, **opts)
    assert pack.layers == [1, 3]
    if engine == "vllm v1":
        report, outputs, decisions = run_v1(setup_layers, tmp_path, monkeypatch, pack, mode)
    elif engine == "vllm v2":
        report, outputs, decisions = run_v2(setup_layers, tmp_path, monkeypatch, pack, mode)
    else:
        report, outputs, decisions = run_tgi(setup_layers, tmp_path, pack, mode, graphs=engine == "tgi graph replays")
    want = TWO_LAYER_STEP[engine][mode]
    _check(report, want, window="window" in case)
    _check_against_reference(_reference(setup_layers, pack, mode, f"two layers, {case}"), outputs, decisions)
    if case == "monitor probe, window":
        assert any(d.latched_at > 0 for d in decisions.values())  # latched at a generated token
    if case == "prefill":
        assert 0 < sum(d.latched for d in decisions.values()) < len(decisions)


@pytest.mark.parametrize("engine", ["vllm v1", "vllm v2", "tgi eager", "tgi graph replays"])
def test_the_two_stage_gate_in_the_servers(fake_tgi, setup, tmp_path, monkeypatch, engine):
    """Monitor mode watching only a grey zone (``AUTOSTEER_MONITOR_FROM`` / ``install(monitor_from=)``): each
    request's generated-token threshold is set in the slot table at its prompt (the monitor threshold, or one no
    score passes under the zone), so a decode step is monitor mode's ops; tokens and latches equal transformers +
    AutoSteer with ``attach(monitor_from=)``, and only requests in the zone latch at a generated token."""
    hf, rows, _ = setup
    pack = _pack(setup, tau=1.0, monitor_probe=True, window=6)
    with autosteer.attach(hf, pack) as h:
        p = sorted(float(h.generate(input_ids=torch.tensor([r]), max_new_tokens=1, force=False).p_unsafe[0])
                   for r in rows)
    low = (p[len(p) // 2 - 1] + p[len(p) // 2]) / 2  # half the requests watched
    ref = {}
    with autosteer.attach(hf, pack, mode="monitor", monitor_from=low) as h:
        for i, r in enumerate(rows):
            o = h.generate(input_ids=torch.tensor([r]), max_new_tokens=MAX_NEW, do_sample=False)
            ref[i] = (o.sequences[0, len(r):].tolist(), bool(o.steered[0]), int(o.latched_at[0]), float(o.p_unsafe[0]))
    watched_latch = [i for i, v in ref.items() if v[1] and v[3] >= low]
    assert watched_latch and all(v[3] >= low for v in ref.values() if v[1])  # (the setup: only the zone latches)
    monkeypatch.setenv(avllm.ENV_MONITOR_FROM, repr(low))
    if engine == "vllm v1":
        report, outputs, decisions = run_v1(setup, tmp_path, monkeypatch, pack, "monitor")
        want = VLLM_STEP["monitor"]
    elif engine == "vllm v2":
        report, outputs, decisions = run_v2(setup, tmp_path, monkeypatch, pack, "monitor")
        want = VLLM_STEP["monitor"]
    else:
        graphs = engine == "tgi graph replays"
        report, outputs, decisions = run_tgi(setup, tmp_path, pack, "monitor", graphs=graphs, monitor_from=low)
        want = TGI_STEP["graph replays" if graphs else "eager"]["monitor"]
    _check(report, want, window=True)
    _check_against_reference({i: v[:3] for i, v in ref.items()}, outputs, decisions)


#: with a window longer than WINDOW_MASKS, continuing steps past the first WINDOW_MASKS add one ``le``
LONG_WINDOW_STEP = {"vllm": {**VLLM_STEP["monitor"], "aten.le": 1},
                    "tgi eager": {**TGI_STEP["eager"]["monitor"], "aten.le": 1}}


@pytest.mark.parametrize("engine", ["vllm", "tgi eager"])
def test_a_window_longer_than_the_precomputed_masks(fake_tgi, setup, tmp_path, monkeypatch, engine):
    """Monitor mode with a window longer than WINDOW_MASKS (here 2, window 6): past the precomputed masks each
    continuing step computes the rows still inside the window (one ``le``): 4 ops in vLLM and in a TGI eager
    forward, still within the budget (with the real WINDOW_MASKS only a window over 63 tokens gets here);
    results unchanged."""
    monkeypatch.setattr(common, "WINDOW_MASKS", 2)
    case = "monitor probe, window 6"
    pack = _pack(setup, tau=1.0, monitor_probe=True, window=6)
    arrivals = {0: [0, 1, 2]}  # decoding together for several steps
    if engine == "vllm":
        report, outputs, decisions = run_v1(setup, tmp_path, monkeypatch, pack, "monitor", arrivals=arrivals)
    else:
        report, outputs, decisions = run_tgi(setup, tmp_path, pack, "monitor", arrivals=arrivals)
    decode = report["decode"]
    first = [ops for _, ops, _ in decode if "aten.le" not in ops]
    later = [ops for _, ops, _ in decode if "aten.le" in ops]
    assert later, "no continuing step ran past the precomputed masks"
    want = LONG_WINDOW_STEP[engine]
    assert all(ops == want for ops in later), later
    monitor = VLLM_STEP["monitor"] if engine == "vllm" else TGI_STEP["eager"]["monitor"]
    assert all(ops in (monitor, {k: v for k, v in monitor.items() if k != "aten.add_"}) for ops in first), first
    assert not any(syncs for *_, syncs in decode)
    _check_against_reference(_reference(setup, pack, "monitor", case), outputs, decisions)


#: TGI with n-gram speculation (2 tokens: 3 positions per step). Prefill mode: a continuing decode step is a slot
#: step -- nothing is probed at generated tokens, so a row's latch cannot change between positions -- with the op
#: once per position (the chooser steers one position at a time, after TGI's repetition penalty) and one
#: ``index_add_`` of the engine's accepted counts into the token table: 5 ops. Monitor mode probes every position
#: and commits each row's latch at its last accepted one: the general path, at most 107 ops.
SPECULATIVE_PREFILL_STEP = {"aten.add": 1, OP: 3, "aten.index_add_": 1}
SPECULATIVE_MONITOR_MAX = 107


def _summaries(decisions) -> dict:
    return {i: (d.latched, d.latched_at, d.tokens, d.steps, round(d.p_unsafe, 6) if d.p_unsafe == d.p_unsafe else None)
            for i, d in decisions.items()}


@pytest.mark.parametrize("mode", ["prefill", "monitor"])
def test_tgi_speculative_decode_steps(fake_tgi, setup, tmp_path, monkeypatch, mode):
    """A speculative step (3 positions): prefill mode takes the slot step (5 ops: the op per position, the capture,
    the accepted tokens counted on the device); monitor mode the general path, which runs the op once per position
    and commits each row's latch at its last accepted position on the device. Never syncing; outputs and decisions
    equal transformers + AutoSteer's, and every request's summary (latch, first steered token, tokens counted,
    steps, prompt score) equals what the general path alone gives."""
    pack = _pack(setup)
    report, outputs, decisions = run_tgi(setup, tmp_path, pack, mode, speculate=2)
    steps = report["decode"] + report["decode after a batch change"]
    assert len(steps) >= 3
    if mode == "prefill":
        assert all(ops == SPECULATIVE_PREFILL_STEP for _, ops, _ in steps), [ops for _, ops, _ in steps]
    else:
        assert max(n for n, _, _ in steps) <= SPECULATIVE_MONITOR_MAX, [n for n, _, _ in steps]
        assert all(ops[OP] == 3 for _, ops, _ in steps)
    assert not any(syncs for *_, syncs in steps + report["prefill"])
    _check_against_reference(_reference(setup, pack, mode, mode), outputs, decisions)
    assert sum(d.latched for d in decisions.values()) and any(d.tokens > d.steps for d in decisions.values())  # (accepted > 1)
    monkeypatch.setattr(common.SteerStateStore, "_slot_step", lambda self, *a, **k: False)  # the general path only
    _, general_outputs, general = run_tgi(setup, tmp_path, pack, mode, speculate=2)
    assert general_outputs == outputs and _summaries(general) == _summaries(decisions)


# ------------------------------------------------------------------------------------------------
# the harness itself


def test_the_count_is_autosteers_code_only():
    """Ops issued by the caller are not counted, ops of AutoSteer's code are, and a host read inside it is
    a host sync."""
    buf = common.HiddenBuffer(4, 3, torch.float32, "cpu")
    x = torch.ones(2, 3)
    with PluginSteps() as rec:
        y = x * 2  # the engine's own work
        buf.write(y)  # the plugin's: one copy_
        rec.cut("write")
        store_like = common.HostStaging(4, torch.int64, "cpu")
        rec.cut("made")
        t = store_like.stage([1, 2])
        assert (t[:2] == torch.tensor([1, 2])).all()  # (the test reading it: not counted)
        rec.cut("stage")
    (w_ops, w_calls, _), (_m, m_calls, _), (s_ops, s_calls, _) = rec.steps
    assert w_ops == ["aten.copy_"] and not w_calls
    assert "numpy()" in m_calls  # making a staging buffer takes its numpy view: done once, at start-up
    assert s_ops == [] and s_calls == []  # staging on the CPU: numpy writes into the buffer, no torch op


def test_a_host_sync_in_a_step_is_caught(setup, tmp_path, monkeypatch):
    """A store that read a request's state on the host during a step (``summary``: ``tolist``) fails the check."""
    real = common.SteerStateStore.end_step

    def end_step(self, *a, **k):
        if self._step is not None and self._step.request_ids:
            self.summary(self._step.request_ids[0])
        return real(self, *a, **k)

    monkeypatch.setattr(common.SteerStateStore, "end_step", end_step)
    report, _, _ = run_v1(setup, tmp_path, monkeypatch, _pack(setup), "prefill")
    assert all("tolist()" in syncs for _, _, syncs in report["decode"])
    with pytest.raises(AssertionError, match="syncing"):
        _check(report, VLLM_STEP["prefill"])


# ------------------------------------------------------------------------------------------------
# the continuing path computes what the general path computes


def _same_summary(a, b) -> bool:
    return all((x == y) or (isinstance(x, float) and math.isnan(x) and math.isnan(y))
               for x, y in zip(dataclasses.astuple(a), dataclasses.astuple(b)))


@pytest.mark.parametrize("mode,window,masks,host_phase", [
    ("prefill", None, 64, False), ("prefill", None, 64, True), ("monitor", None, 64, False),
    ("monitor", 5, 64, False), ("monitor", 7, 3, True)])
def test_continuing_steps_equal_the_general_path(monkeypatch, mode, window, masks, host_phase):
    """One random stream through two stores, one of them never continuing: requests join (prefill steps mixing
    prompt chunks and decoding rows), decode together for a while, leave, get reordered or force-latched,
    and are read mid-stream. Every step's logits, and every request's summary, are identical -- monitor
    mode with a monitor probe, its window inside and past the precomputed masks, latches at decode steps;
    decode steps staged as host flags or as ``phase=PHASE_DECODE``."""
    from test_integrations_common import H, V, _tau_for, _with_monitor_probe

    from autosteer.integrations.common import PHASE_DECODE, SteerStateStore, SteerWeights
    from conftest import make_pack, make_tiny_model

    monkeypatch.setattr(common, "WINDOW_MASKS", masks)
    model = make_tiny_model(V, hidden=H)
    w = SteerWeights.from_pack(make_pack(model), model.lm_head.weight)
    tau_mon = None
    if mode == "monitor":
        w = _with_monitor_probe(w)
        x = torch.randn(512, H, generator=torch.Generator().manual_seed(1))
        tau_mon = float(torch.quantile(w.monitor_probe_scores(x), 0.93))  # fires on about 7% of tokens
    w = SteerWeights(**{**w.__dict__, "tau": _tau_for(w, 0.25), "tau_monitor": tau_mon, "monitor_window": window})
    fast = SteerStateStore(w, mode=mode, max_batch=8, max_requests=4)  # (the slot table grows mid-stream)
    slow = SteerStateStore(w, mode=mode, max_batch=8, max_requests=4)
    slow._slot_step = lambda *a, **k: False
    continued = []
    real = fast._apply_slots
    fast._apply_slots = lambda *a: (continued.append(1), real(*a))
    rng, g = random.Random(0), torch.Generator().manual_seed(0)
    live, next_id, latched_decode = [], 0, 0
    for step in range(140):
        u = rng.random()
        if live and u < 0.06:  # a request leaves (finished): released between steps
            gone = live.pop(rng.randrange(len(live)))
            assert _same_summary(fast.summary(gone), slow.summary(gone))
            fast.release(gone), slow.release(gone)
            continue
        if live and u < 0.08:
            rid = rng.choice(live)
            fast.force_latch(rid), slow.force_latch(rid)
            continue
        if not live or u < 0.2 and len(live) < 6:  # joins: a prefill step
            new = list(range(next_id, next_id + rng.randint(1, 2)))
            next_id += len(new)
            lens = [1] * len(live) + [rng.randint(1, 3) for _ in new]
            cu = [0]
            for n in lens:
                cu.append(cu[-1] + n)
            kw = dict(cu_seqlens=cu, prefilling=[False] * len(live) + [True] * len(new))
            live = live + new
            n_rows = cu[-1]
        else:
            if u < 0.26:
                rng.shuffle(live)
            kw = dict(phase=PHASE_DECODE) if host_phase else {}
            n_rows = len(live)
        rows = live
        if 0.26 <= u < 0.3 and len(live) > 1:  # a live request sits this step out (and comes back later)
            out_of_step = rng.choice(live)
            rows = [r for r in live if r != out_of_step]
            n_rows -= 1
        B = len(rows)
        ph, hh = torch.randn(n_rows, H, generator=g), torch.randn(B, H, generator=g)
        logits = torch.randn(B, V, generator=g)
        out = []
        for store in (fast, slow):
            lg = logits.clone()
            store.begin_step(rows, **kw)
            store.apply(lg, probe_hidden=ph, head_hidden=hh)
            store.end_step()
            out.append(lg)
        assert torch.equal(out[0], out[1]), f"step {step}"
        if u > 0.9:  # read mid-stream: the continuing store answers from its rows, changing nothing
            for rid in live:
                a, b = fast.summary(rid), slow.summary(rid)
                assert _same_summary(a, b), (step, a, b)
                latched_decode += a.latched and a.latched_at > 0
    for rid in live:
        assert _same_summary(fast.summary(rid), slow.summary(rid))
    assert len(continued) > 40, "the stream hardly continued"
    if mode == "monitor":
        assert latched_decode, "no request latched at a generated token"
