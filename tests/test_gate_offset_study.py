"""benchmarks/gate_offset_study.py (docs/method.md 7y): the offset gives each probe of the pooled gate its own
threshold, and the study refuses out-of-fold scores that do not belong to the shipped pack."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gate_offset_study as S  # noqa: E402


def test_offset_union_is_one_threshold_per_probe():
    """With the token probe's logit lowered by ``offset``, the union passes tau exactly when the last token's
    probability passes tau or the token probe's passes sigmoid(logit(tau) + offset); offset 0 is the plain max."""
    g = torch.Generator().manual_seed(0)
    last, tok = torch.rand(4000, generator=g), torch.rand(4000, generator=g)
    assert torch.equal(S.offset_union(last, tok, 0.0), torch.maximum(last, tok))
    for off in (-2.0, 1.5, 4.0):
        u = S.offset_union(last, tok, off)
        for tau in (0.3, 0.7, 0.95):
            t2 = 1 / (1 + math.exp(-(math.log(tau / (1 - tau)) + off)))
            want = (last > tau) | (tok > t2)
            near = ((tok - t2).abs() < 1e-5) | ((last - tau).abs() < 1e-6)  # float ties at the cut
            assert torch.equal((u > tau)[~near], want[~near]), (off, tau)
            assert near.float().mean() < 0.01


def test_study_refuses_scores_of_another_fit(tmp_path, monkeypatch):
    """Out-of-fold scores kept from a fit whose probes differ from the shipped pooled pack's are refused by name:
    they would be read against dev scores of another probe."""
    import autosteer
    from autosteer.method.pack import load_pack

    shipped = load_pack(autosteer.default_pack_path(pooled=True))
    n = 8
    kept = {"last": torch.rand(n), "tok": torch.rand(n), "y": torch.tensor([1, 0] * 4), "groups": ["g"] * n,
            "pool": {k: v.clone() for k, v in shipped.pool.items()},
            "probe": {k: getattr(shipped, k).clone() for k in ("W1", "b1", "w2", "b2")}}
    kept["pool"]["b2"] = kept["pool"]["b2"] + 1.0
    path = tmp_path / "oof.pt"
    torch.save(kept, path)
    monkeypatch.setattr(sys, "argv", ["gate_offset_study.py", "--oof", str(path)])
    with pytest.raises(SystemExit, match="did not reproduce the shipped pooled pack's probes"):
        S.main()
