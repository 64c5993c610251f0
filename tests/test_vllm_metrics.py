"""The vLLM processor's request counter (``AUTOSTEER_METRICS=1``): every finished request counted once, by the gate's
outcome, on the simulated V1 engine of ``tests/test_vllm_simulation.py``; off by default (no per-request host read).
The Prometheus side (``autosteer_requests_total`` on the server's ``/metrics``) runs in the real engine
(``tests/test_vllm_real_engine.py``)."""
from __future__ import annotations

import pytest

from autosteer.integrations import vllm as avllm
from test_vllm_simulation import ARRIVALS, Engine, _config, _reference, setup  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def _serve(setup, tmp_path, monkeypatch, **env):
    hf, rows, pack = setup
    monkeypatch.setenv(avllm.ENV_PACK, str(pack.save(tmp_path / "p.safetensors")))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    lp = avllm.AutoSteerVLLMLogitsProcessor(_config(), "cpu", False, patch_runner=False)
    engine = Engine(hf, lp, chunk=4)
    try:
        avllm.attach_capture(engine.model, max_reqs=8, metadata_fn=engine.metadata)
        store = lp._ensure_store(required=True)
        engine.run(ARRIVALS, rows)
        lp.update_state(engine._batch_update([], [r for r in engine.batch]))  # the last requests finish
    finally:
        avllm.detach_capture()
    return lp, store


def test_the_counter_counts_each_finished_request_by_outcome(setup, tmp_path, monkeypatch):
    hf, rows, pack = setup
    ref = _reference(hf, rows, pack, "prefill")
    steered = sum(v[1] for v in ref.values())
    assert 0 < steered < len(rows)
    lp, store = _serve(setup, tmp_path, monkeypatch, AUTOSTEER_METRICS="1")
    assert store.report_on_release
    assert lp.counter.counts == {"steered": steered, "not_steered": len(rows) - steered, "off": 0}


def test_the_counter_is_off_by_default_and_reads_nothing_per_request(setup, tmp_path, monkeypatch):
    monkeypatch.delenv(avllm.ENV_METRICS, raising=False)
    monkeypatch.delenv(avllm.ENV_LOG_DECISIONS, raising=False)
    lp, store = _serve(setup, tmp_path, monkeypatch)
    assert lp.counter is None and not store.report_on_release


def test_a_bad_metrics_setting_is_refused_by_name(setup, tmp_path, monkeypatch):
    _, _, pack = setup
    monkeypatch.setenv(avllm.ENV_PACK, str(pack.save(tmp_path / "p.safetensors")))
    monkeypatch.setenv(avllm.ENV_METRICS, "yes please")
    with pytest.raises(avllm.VLLMIntegrationError, match="AUTOSTEER_METRICS"):
        avllm.AutoSteerVLLMLogitsProcessor(_config(), "cpu", False, patch_runner=False)
