"""A pooled-gate pack for the tiny test model whose scenario the serving tests rely on (tests/test_vllm_pooled_gate.py,
tests/test_tgi_simulation.py): of the prompts the last-token probe lets through, exactly two are fired by the token
probe alone."""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch

import autosteer
from autosteer.integrations.common import TokenPool
from autosteer.prompting import common_prefix_len
from conftest import make_pack


def prompt_states(hf, row: list[int], layers: list[int]) -> list[torch.Tensor]:
    """The residual stream entering each of ``layers`` at every token of ``row`` ([T, H] each), from transformers."""
    with torch.no_grad():
        hs = hf(input_ids=torch.tensor([row]), output_hidden_states=True).hidden_states
    return [hs[L][0] for L in layers]


def pooled_pack(hf, rows, layers):
    """A random pack with a pooled gate whose tau and token-probe bias are set so that, of the prompts the last-token
    probe lets through, exactly two are fired by the token probe (each margin clear of float noise)."""
    pack = make_pack(hf, layers=layers)
    with autosteer.attach(hf, pack) as h:
        p_last = [float(h.generate(input_ids=torch.tensor([r]), max_new_tokens=1, force=False).p_unsafe[0]) for r in rows]
    srt = sorted(p_last)
    tau = (srt[3] + srt[4]) / 2  # the last-token probe fires on half of the prompts
    skip = min(common_prefix_len(rows[0], r) for r in rows[1:])
    g = torch.Generator().manual_seed(7)
    H, k = hf.config.hidden_size, len(pack.layers)
    probe = SimpleNamespace(W1=2 * torch.randn(8, k * H, generator=g), b1=torch.randn(8, generator=g),
                            w2=torch.randn(8, generator=g), b2=torch.zeros(1))
    tp = TokenPool(probe, k, "cpu")
    m = [float(tp.score(prompt_states(hf, r, pack.layers))[skip:].max()) for r in rows]
    quiet = sorted((m[i] for i in range(len(rows)) if p_last[i] < tau), reverse=True)
    cut = (quiet[1] + quiet[2]) / 2
    assert quiet[1] - quiet[2] > 0.05, quiet
    probe.b2 = torch.tensor([math.log(tau / (1 - tau)) - cut])
    pack.pool = {k_: getattr(probe, k_).clone().float() for k_ in ("W1", "b1", "w2", "b2")}
    pack.meta.update(pooling="last_token|max", pool_skip=skip, tau=tau)
    pack.validate()
    p_pool = [1 / (1 + math.exp(-(x + float(probe.b2)))) for x in m]
    return pack, p_last, p_pool
