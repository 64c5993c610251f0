"""Per-request AutoSteer settings through the OpenAI API's ``vllm_xargs`` (``SamplingParams.extra_args``):
``autosteer`` (on/off, off only where the server allows it), ``autosteer_mode`` (monitor on a prefill server),
``autosteer_tau`` (a stricter prompt threshold). Checked at admission (``validate_params``: a ValueError is an
HTTP 400) and honoured in the engine, on the simulated V1 and V2 engines of ``test_vllm_simulation`` /
``test_vllm_v2_simulation``: each request's tokens equal transformers + AutoSteer run with that request's
settings (steering off: plain transformers), also across preemption and under async scheduling."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import autosteer
from autosteer.integrations import common
from autosteer.integrations import vllm as avllm
from test_vllm_simulation import MAX_NEW, Engine, SamplingParams, _config, setup  # noqa: F401
from test_vllm_v2_simulation import V2Engine

pytestmark = pytest.mark.usefixtures("one_thread")

SERVER = dict(server_tau=0.5, server_mode="prefill", monitor_calibrated=True, allow_off=False)


# -- the parser (what admission and the engine both run) -----------------------------------------

def test_requests_without_settings_or_restating_the_defaults_change_nothing():
    parse = common.parse_request_settings
    assert parse(None, **SERVER) is None
    assert parse({}, **SERVER) is None
    assert parse({"kv_transfer_params": {"x": 1}, "other": 2}, **SERVER) is None  # not ours
    assert parse({"autosteer": "on", "autosteer_mode": "prefill", "autosteer_tau": 0.5}, **SERVER) is None
    assert parse({"autosteer_mode": "monitor"}, **{**SERVER, "server_mode": "monitor"}) is None
    assert parse({"autosteer_tau": "0.25"}, **SERVER) == common.RequestSettings(tau=0.25)
    assert parse({"autosteer_mode": "MONITOR", "autosteer_tau": 0.1}, **SERVER) == common.RequestSettings(
        monitor=True, tau=0.1)
    assert parse({"autosteer": "off"}, **{**SERVER, "allow_off": True}) == common.RequestSettings(off=True)
    assert parse({"autosteer": False, "autosteer_tau": 0.1}, **{**SERVER, "allow_off": True}).off
    # an operating point of the pack by name, held to the same rule (never looser than the server)
    points = {"strict": 0.2, "balanced": 0.5, "permissive": 0.9}
    assert parse({"autosteer_tau": "Strict"}, **SERVER, operating_points=points) == common.RequestSettings(tau=0.2)
    assert parse({"autosteer_tau": "balanced"}, **SERVER, operating_points=points) is None  # the server's own


@pytest.mark.parametrize("args,server,named", [
    ({"autosteer": "off"}, {}, "autosteer=\"off\""),  # off by default
    ({"autosteer": "of"}, {"allow_off": True}, "autosteer='of'"),
    ({"autosteer": 1}, {}, "autosteer=1"),
    ({"autosteer_tau": 0.6}, {}, "autosteer_tau=0.6 is above this server's threshold 0.5"),
    ({"autosteer_tau": "1.5"}, {}, "autosteer_tau='1.5'"),
    ({"autosteer_tau": 0}, {}, "autosteer_tau=0"),
    ({"autosteer_tau": "nan"}, {}, "autosteer_tau='nan'"),
    ({"autosteer_tau": "low"}, {}, "autosteer_tau='low': not a number"),
    ({"autosteer_tau": True}, {}, "autosteer_tau=True"),
    ({"autosteer_mode": "monitor"}, {"monitor_calibrated": False}, "no monitor calibration"),
    ({"autosteer_mode": "prefill"}, {"server_mode": "monitor"}, "may not loosen"),
    ({"autosteer_mode": "both"}, {}, "autosteer_mode='both'"),
    ({"autosteer_threshold": 0.1}, {}, "'autosteer_threshold': unknown AutoSteer setting"),
    ({"AutoSteer_Tau": 0.1}, {}, "'AutoSteer_Tau': unknown"),
])
def test_refusals_name_the_key(args, server, named):
    with pytest.raises(ValueError) as e:
        common.parse_request_settings(args, source="vllm_xargs", **{**SERVER, **server})
    assert named in str(e.value) and str(e.value).startswith("vllm_xargs ")


@pytest.mark.parametrize("value,points,named", [
    ("permissive", {"strict": 0.2, "balanced": 0.5, "permissive": 0.9}, "autosteer_tau='permissive' is above this server"),
    ("strict", {"balanced": 0.5}, "autosteer_tau='strict': this server's pack has no such operating point (it has: balanced)"),
    ("strict", None, "no such operating point (it has: none)"),
])
def test_named_points_per_request_never_loosen_and_must_exist(value, points, named):
    with pytest.raises(ValueError) as e:
        common.parse_request_settings({"autosteer_tau": value}, source="vllm_xargs", **SERVER, operating_points=points)
    assert named in str(e.value) and str(e.value).startswith("vllm_xargs ")


def test_admission_reads_the_environment_once(setup, tmp_path, monkeypatch):
    """validate_params runs in the API server's process (no processor there): its server settings come from the
    AUTOSTEER_* environment, read once; a ValueError there is vLLM's HTTP 400."""
    _hf, _rows, pack = setup
    validate = avllm.AutoSteerVLLMLogitsProcessor.validate_params
    for k in (avllm.ENV_PACK, avllm.ENV_TAU, avllm.ENV_MODE, common.ENV_ALLOW_CLIENT_OFF):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(avllm, "_FRONT_END", None)  # no start-up check in this process: the environment's settings
    avllm._admission_settings.cache_clear()
    validate(SamplingParams())  # no keys: nothing to check, pack or not
    validate(SamplingParams({"other": 1}))
    with pytest.raises(ValueError, match="'autosteer_tau': AutoSteer is not active on this server"):
        validate(SamplingParams({"autosteer_tau": 0.1}))
    monkeypatch.setenv(avllm.ENV_PACK, str(pack.save(tmp_path / "p.safetensors")))
    monkeypatch.setenv(avllm.ENV_TAU, "0.3")
    avllm._admission_settings.cache_clear()
    try:
        validate(SamplingParams({"autosteer_tau": 0.3}))
        validate(SamplingParams({"autosteer_tau": "0.01", "autosteer": "on"}))
        with pytest.raises(ValueError, match="autosteer_tau=0.31 is above this server's threshold 0.3"):
            validate(SamplingParams({"autosteer_tau": 0.31}))
        with pytest.raises(ValueError, match="autosteer=\"off\": this server does not let clients turn AutoSteer off"):
            validate(SamplingParams({"autosteer": "off"}))
        with pytest.raises(ValueError, match="autosteer_mode=\"monitor\": this server's pack has no monitor"):
            validate(SamplingParams({"autosteer_mode": "monitor"}))  # the module's pack: prefill only
        monkeypatch.setenv(common.ENV_ALLOW_CLIENT_OFF, "1")
        validate(SamplingParams({"autosteer": "on"}))
        with pytest.raises(ValueError):  # read once, at the first request: a later change is not seen
            validate(SamplingParams({"autosteer": "off"}))
        avllm._admission_settings.cache_clear()
        validate(SamplingParams({"autosteer": "off"}))  # (a restarted server)
        monkeypatch.setenv(common.ENV_ALLOW_CLIENT_OFF, "maybe")
        avllm._admission_settings.cache_clear()
        with pytest.raises(ValueError, match="AUTOSTEER_ALLOW_CLIENT_OFF='maybe' is not a boolean"):
            validate(SamplingParams({"autosteer": "off"}))
    finally:
        avllm._admission_settings.cache_clear()


def test_admission_checks_against_the_pack_and_settings_the_start_up_check_resolved(setup, tmp_path, monkeypatch):
    """In the API server's process the start-up check loads the pack the workers will serve (an absolute path and its
    SHA-256 in the engine config): admission reads its settings from that check, without reading the file again,
    with the engine config's settings winning over the environment as they do in the workers, and a file rewritten
    after start-up does not change them (the workers refuse such a file by its SHA-256)."""
    import types

    import autosteer.method.pack as P

    _hf, _rows, pack = setup
    reads = []
    real = P.load_pack
    monkeypatch.setattr(P, "load_pack", lambda path, *a, **k: reads.append(str(path)) or real(path, *a, **k))
    monkeypatch.setattr(avllm, "_PACK", None)  # no processor in this process (earlier tests may have built one)
    monkeypatch.setattr(avllm, "_FRONT_END", None)
    monkeypatch.chdir(tmp_path)
    pack.save(tmp_path / "p.safetensors")
    monkeypatch.setenv(avllm.ENV_PACK, "p.safetensors")  # relative, as a user may write it
    monkeypatch.setenv(avllm.ENV_TAU, "0.3")
    for k in (avllm.ENV_MODE, common.ENV_ALLOW_CLIENT_OFF):
        monkeypatch.delenv(k, raising=False)
    cfg = types.SimpleNamespace(additional_config={"autosteer": {"tau": "0.2"}})  # the config's tau wins
    avllm._admission_settings.cache_clear()
    try:
        avllm._carry_settings(cfg)
        avllm._check_pack_settings(cfg)
        assert reads == [str(tmp_path / "p.safetensors")]
        settings = avllm._admission_settings()
        assert reads == [str(tmp_path / "p.safetensors")]  # no second read
        assert settings["server_tau"] == pytest.approx(0.2) and settings["server_mode"] == "prefill"
        validate = avllm.AutoSteerVLLMLogitsProcessor.validate_params
        with pytest.raises(ValueError, match="autosteer_tau=0.25 is above this server's threshold 0.2"):
            validate(SamplingParams({"autosteer_tau": 0.25}))
        dataclasses.replace(pack, meta={**pack.meta, "tau": 0.9}).save(tmp_path / "p.safetensors")
        avllm._admission_settings.cache_clear()
        assert avllm._admission_settings()["server_tau"] == pytest.approx(0.2) and len(reads) == 1
        # without a start-up check in this process (another process built the engine config): the environment
        monkeypatch.setattr(avllm, "_FRONT_END", None)
        avllm._admission_settings.cache_clear()
        assert avllm._admission_settings()["server_tau"] == pytest.approx(0.3) and len(reads) == 2
    finally:
        avllm._admission_settings.cache_clear()


# -- served on the simulated engines ------------------------------------------------------------

def _monitor_pack(pack):
    """The module's pack plus a monitor probe (the prefill probe, another bias) and its tau_monitor."""
    mon = {"W1": pack.W1.clone(), "b1": pack.b1.clone(), "w2": pack.w2.clone(), "b2": pack.b2 + 0.5}
    return dataclasses.replace(pack, meta={**pack.meta, "tau_monitor": 0.9}, monitor=mon)


def _scores(hf, rows, pack):
    with autosteer.attach(hf, pack) as h:
        return [float(h.generate(input_ids=torch.tensor([r]), max_new_tokens=1, force=False).p_unsafe[0]) for r in rows]


def _ref_one(hf, row, pack, *, mode="prefill", tau=None, off=False):
    """(tokens, steered, latched_at) of one request, greedy: transformers + AutoSteer with the request's settings,
    or plain transformers for a request with steering off."""
    ids = torch.tensor([row])
    if off:
        o = hf.generate(input_ids=ids, max_new_tokens=MAX_NEW, do_sample=False, return_dict_in_generate=True)
        return o.sequences[0, len(row):].tolist(), False, -1
    with autosteer.attach(hf, pack, mode=mode, tau=tau) as h:
        o = h.generate(input_ids=ids, max_new_tokens=MAX_NEW, do_sample=False)
    return o.sequences[0, len(row):].tolist(), bool(o.steered[0]), int(o.latched_at[0])


@pytest.fixture(scope="module")
def scenario(setup):
    """Server: prefill mode, the module's tau, a pack with monitor calibration. Requests: a gated one with steering
    off, a benign one just above a stricter autosteer_tau (steered only because of it), a benign one in monitor
    mode that latches on a generated token, the others with no settings. Each with its reference."""
    hf, rows, pack = setup
    pack = _monitor_pack(pack)
    p = _scores(hf, rows, pack)
    tau = pack.tau
    gated = [i for i in range(len(rows)) if p[i] > tau]
    benign = sorted((i for i in range(len(rows)) if p[i] <= tau), key=lambda i: -p[i])
    off_req, tau_req = gated[0], benign[0]
    strict = (p[tau_req] + max(p[i] for i in benign[1:])) / 2  # between the two most suspicious benign prompts
    assert p[tau_req] > strict > 0
    mon_ref = {i: _ref_one(hf, rows[i], pack, mode="monitor") for i in benign[1:]}
    mon_req = next(i for i in benign[1:] if mon_ref[i][1])  # one that monitor mode steers (prefill mode does not)
    xargs = {off_req: {"autosteer": "off"}, tau_req: {"autosteer_tau": strict, "other_plugin_key": 1},
             mon_req: {"autosteer_mode": "monitor"}}
    ref = {i: _ref_one(hf, rows[i], pack) for i in range(len(rows))}
    ref[off_req] = _ref_one(hf, rows[off_req], pack, off=True)
    ref[tau_req] = _ref_one(hf, rows[tau_req], pack, tau=strict)
    ref[mon_req] = mon_ref[mon_req]
    assert ref[off_req][0] != _ref_one(hf, rows[off_req], pack)[0], "steering off must make a difference here"
    assert ref[tau_req][1] and not _ref_one(hf, rows[tau_req], pack)[1]
    return SimpleScenario(pack, xargs, ref, off_req, tau_req, mon_req)


@dataclasses.dataclass
class SimpleScenario:
    pack: object
    xargs: dict
    ref: dict
    off_req: int
    tau_req: int
    mon_req: int


def _check(sc, outputs, summaries, records):
    for i, (tokens, steered, latched_at) in sc.ref.items():
        assert outputs[i] == tokens, f"request {i} ({sc.xargs.get(i)}): tokens differ from its reference"
        assert summaries[i].latched == steered and summaries[i].latched_at == latched_at, f"request {i}"
        assert summaries[i].settings == (None if i not in sc.xargs else common.parse_request_settings(
            sc.xargs[i], **{**SERVER, "server_tau": sc.pack.tau, "allow_off": True}))
    off = summaries[sc.off_req]
    assert off.settings.off and not off.latched and math.isnan(off.p_unsafe), "a request with steering off was probed"
    for order, raw, final, still in records:
        for b, rid in enumerate(order):
            if still[b] or not summaries[rid].latched:
                assert torch.equal(raw[b], final[b]), f"request {rid}: row written while unlatched / off / mid-prefill"


ARRIVALS = {0: [0, 1, 2], 1: [3], 3: [4, 5], 4: [6], 6: [7]}


@pytest.mark.parametrize("preempt,async_outputs", [(False, False), (True, False), (True, True)])
def test_v1_per_request_settings(setup, scenario, tmp_path, monkeypatch, preempt, async_outputs):
    hf, rows, _ = setup
    sc = scenario
    monkeypatch.setenv(avllm.ENV_PACK, str(sc.pack.save(tmp_path / "p.safetensors")))
    monkeypatch.setenv(common.ENV_ALLOW_CLIENT_OFF, "1")
    lp = avllm.AutoSteerVLLMLogitsProcessor(_config(), "cpu", False, patch_runner=False)
    engine = Engine(hf, lp, chunk=4, async_outputs=async_outputs)
    engine.xargs = sc.xargs
    pre = {sc.off_req: (2, 2), sc.tau_req: (3, 1), sc.mon_req: (1, 2)} if preempt else None
    outputs, summaries = engine.serve(ARRIVALS, rows, preempt=pre)
    assert engine.preempted == (3 if preempt else 0)
    assert len(lp.store) == 0 and not lp.store._settings, "settings outlived their requests"
    assert lp.store.request_counts == {"off": 1, "monitor": 1, "tau": 1}  # once per request, resumes not counted
    _check(sc, outputs, summaries, engine.records)


@pytest.mark.parametrize("preempt,params_copies", [(False, False), (True, False), (True, True)])
def test_v2_per_request_settings(setup, scenario, tmp_path, monkeypatch, preempt, params_copies):
    hf, rows, _ = setup
    sc = scenario
    monkeypatch.setenv(avllm.ENV_PACK, str(sc.pack.save(tmp_path / "p.safetensors")))
    monkeypatch.setenv(common.ENV_ALLOW_CLIENT_OFF, "1")
    engine = V2Engine(hf, chunk=4, params_copies=params_copies)
    engine.xargs = sc.xargs
    summaries = {}
    cap = avllm.attach_capture(engine.model, sc.pack, max_reqs=8, metadata_fn=engine.metadata)
    pre = {sc.off_req: (2, 2), sc.tau_req: (3, 1), sc.mon_req: (1, 2)} if preempt else None
    try:
        engine.lp = avllm.AutoSteerVLLMLogitsProcessor(_config(), engine.lp_states, capture=cap, v2_runner=engine.runner)
        engine.profile_run()
        store = engine.lp.store
        store.report_on_release = True
        store.on_release = lambda rid, s: summaries.__setitem__(rid, s)
        outputs = engine.run(ARRIVALS, rows, preempt=pre)
    finally:
        avllm.detach_capture()
    assert engine.preempted == (3 if preempt else 0)
    assert len(engine.lp.store) == 0 and not engine.lp.store._settings
    assert engine.lp.store.request_counts == {"off": 1, "monitor": 1, "tau": 1}
    _check(sc, outputs, summaries, engine.records)


@pytest.mark.parametrize("server_mode,window", [("prefill", None), ("prefill", 2), ("monitor", None), ("monitor", 2)])
def test_v1_settings_with_a_monitor_window_or_on_a_monitor_server(setup, scenario, tmp_path, monkeypatch,
                                                                  server_mode, window):
    """Per-request monitor mode honours the pack's monitor window; on a monitor-mode server a stricter tau and
    steering off per request (the rows monitored by the server's mode). Each request equals its reference."""
    hf, rows, _ = setup
    sc = scenario
    pack = sc.pack if window is None else dataclasses.replace(
        sc.pack, meta={**sc.pack.meta, "monitor": {"tokens": window}})
    strict = sc.xargs[sc.tau_req]["autosteer_tau"]
    if server_mode == "prefill":  # every request but one in monitor mode
        xargs = {i: {"autosteer_mode": "monitor"} for i in range(len(rows)) if i != sc.off_req}
        ref = {i: _ref_one(hf, rows[i], pack, mode="monitor") for i in xargs}
        ref[sc.off_req] = _ref_one(hf, rows[sc.off_req], pack)
    else:
        xargs = {sc.off_req: {"autosteer": "off"}, sc.tau_req: {"autosteer_tau": strict}}
        ref = {i: _ref_one(hf, rows[i], pack, mode="monitor") for i in range(len(rows))}
        ref[sc.off_req] = _ref_one(hf, rows[sc.off_req], pack, off=True)
        ref[sc.tau_req] = _ref_one(hf, rows[sc.tau_req], pack, mode="monitor", tau=strict)
    monkeypatch.setenv(avllm.ENV_PACK, str(pack.save(tmp_path / "p.safetensors")))
    monkeypatch.setenv(avllm.ENV_MODE, server_mode)
    monkeypatch.setenv(common.ENV_ALLOW_CLIENT_OFF, "1")
    lp = avllm.AutoSteerVLLMLogitsProcessor(_config(), "cpu", False, patch_runner=False)
    engine = Engine(hf, lp, chunk=4)
    engine.xargs = xargs
    outputs, summaries = engine.serve(ARRIVALS, rows, preempt={sc.tau_req: (2, 1), sc.mon_req: (1, 2)})
    assert lp.store.w.monitor_window == window
    for i, (tokens, steered, latched_at) in ref.items():
        assert outputs[i] == tokens, f"request {i} ({xargs.get(i)}): tokens differ from its reference"
        assert summaries[i].latched == steered and summaries[i].latched_at == latched_at, f"request {i}"
    assert any(v[1] for v in ref.values())
    assert server_mode == "prefill" or (summaries[sc.off_req].settings.off and not summaries[sc.off_req].latched)
    if window is not None:  # the window matters here: some request latches later than it would without one
        assert any(ref[i] != _ref_one(hf, rows[i], sc.pack, mode="monitor", tau=xargs.get(i, {}).get("autosteer_tau"))
                   for i in ref if i != sc.off_req)


def test_the_engine_never_loosens_on_settings_admission_did_not_check(setup, scenario, tmp_path, monkeypatch, caplog):
    """Admission reads the environment; a server configured through additional_config may differ. The engine
    checks again and serves a request whose keys do not pass with the server's defaults (a warning), never
    looser: here "off" without the server's switch, and a tau above the server's."""
    hf, rows, _ = setup
    sc = scenario
    monkeypatch.setenv(avllm.ENV_PACK, str(sc.pack.save(tmp_path / "p.safetensors")))
    monkeypatch.delenv(common.ENV_ALLOW_CLIENT_OFF, raising=False)
    lp = avllm.AutoSteerVLLMLogitsProcessor(_config(), "cpu", False, patch_runner=False)
    engine = Engine(hf, lp, chunk=4)
    loose = next(i for i in range(len(rows)) if i not in sc.xargs and sc.ref[i][1])
    engine.xargs = {sc.off_req: {"autosteer": "off"}, loose: {"autosteer_tau": 0.99}}
    with caplog.at_level("WARNING", logger="autosteer"):
        outputs, summaries = engine.serve({0: [sc.off_req, loose]}, rows)
    default = {i: _ref_one(hf, rows[i], sc.pack) for i in (sc.off_req, loose)}
    for i in (sc.off_req, loose):
        assert outputs[i] == default[i][0] and summaries[i].latched and summaries[i].settings is None
    msgs = " ".join(r.getMessage() for r in caplog.records)
    assert "served with the server's settings" in msgs and "autosteer=\"off\"" in msgs and "autosteer_tau=0.99" in msgs


def test_steps_of_default_requests_keep_the_continuing_path(setup):
    """A request with settings elsewhere in the store does not touch the steps of requests without: they still
    continue (no general step); a step with it takes the general path."""
    hf, _, pack = setup
    w = common.SteerWeights.from_pack(pack, hf.lm_head.weight)
    store = common.SteerStateStore(w, max_batch=4)
    store.set_request_settings("x", common.RequestSettings(tau=0.01))
    H, V = w.Bt.shape[1], w.U.shape[0]
    h = torch.randn(2, H)

    def step(keys, **kw):
        store.begin_step(keys, **kw)
        fast = store._step.fast
        store.apply(torch.zeros(len(keys), V), probe_hidden=h, head_hidden=h)
        store.end_step()
        return fast

    assert not step(["a", "b"], prefilling=[True, True])
    assert step(["a", "b"], prefilling=[False, False])  # continuing, as before
    assert not step(["a", "x"], prefilling=[False, True])
    assert not step(["a", "x"], prefilling=[False, False])  # x has settings: general path every step
    store.release("x")
    assert not store._settings and float(store._sl_tau[store.state("a").slot]) == pytest.approx(w.tau)
    assert float(store._sl_tau.min()) == pytest.approx(w.tau), "a released request's threshold stayed in its slot"


def test_a_request_with_steering_off_is_never_steered_even_force_latched(setup):
    """Not probed, and a latch set by hand (the V1 processor's fail-closed rule for siblings it cannot tell apart)
    does not steer it either: its logits are never written."""
    hf, _, pack = setup
    w = common.SteerWeights.from_pack(pack, hf.lm_head.weight, tau=1e-6)  # every probed row would latch
    store = common.SteerStateStore(w, mode="monitor", max_batch=4)
    store.set_request_settings("o", common.RequestSettings(off=True))
    H, V = w.Bt.shape[1], w.U.shape[0]
    h = torch.randn(2, H)
    for k, kw in enumerate(({"prefilling": [True, True]}, {"prefilling": [False, False]}, {"phase": 0})):
        if k == 2:
            store.force_latch("o")
        logits = torch.randn(2, V)
        raw = logits.clone()
        store.begin_step(["o", "d"], **kw)
        store.apply(logits, probe_hidden=h, head_hidden=h)
        store.end_step()
        assert torch.equal(logits[0], raw[0]) and not torch.equal(logits[1], raw[1]), k
    s = store.summary("o")
    assert not s.latched and s.settings.off and math.isnan(s.p_unsafe) and s.tokens == 3
    assert store.summary("d").latched
