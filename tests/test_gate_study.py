"""benchmarks/gate_study.py --split-seeds: the seed-spread table from cached states (synthetic here)."""
from __future__ import annotations

import csv
import sys
from argparse import Namespace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gate_study  # noqa: E402
from autosteer.method.fit import FitData  # noqa: E402


def test_seed_study_reports_the_spread_over_split_seeds(tmp_path, monkeypatch):
    L, H = 30, 12  # the default layer rule (depth:0.69) picks layer 20 of 30
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(H, generator=g)

    def states(n, harmful, shift=0.0):
        x = torch.randn(n, L, H, generator=g)
        x[:, 20] += (4.0 if harmful else -4.0) * direction + shift
        return x

    harmful = [f"h{i}" for i in range(60)]
    benign = [f"b{i}" for i in range(60)]
    dev = {k: [f"{k}{i}" for i in range(20)] for k, _, _ in gate_study.DEV_COLUMNS}
    bank = gate_study.StateBank()
    bank.add(harmful, {"last": states(60, True)})
    bank.add(benign, {"last": states(60, False)})
    for k, _, is_harmful in gate_study.DEV_COLUMNS:
        bank.add(dev[k], {"last": states(20, is_harmful)})
    monkeypatch.setattr(gate_study, "default_fit_data",
                        lambda seed, n, jb, style: FitData(harmful, benign, [], {"counts": {}}))
    monkeypatch.setattr(gate_study, "SEED_VARIANTS", (("default (64 units)", {"probe_epochs": 40}),
                                                      ("16 units", {"probe_hidden": 16, "probe_epochs": 40})))
    out = tmp_path / "seeds"
    args = Namespace(threads=1, seed=0, jailbreak_fit=0, jailbreak_dev=20, split_seeds=3, out=str(out))
    gate_study.run_seed_study(args, bank, {"dev": dev}, 0.0)
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    assert [(r["probe"], r["seed"]) for r in rows] == [(p, str(s)) for p in ("default (64 units)", "16 units") for s in range(3)]
    assert {r["layer"] for r in rows} == {"20"}
    taus = {r["tau"] for r in rows if r["probe"] == "16 units"}
    assert len(taus) > 1  # the seed moves the split, hence the threshold
    for r in rows:  # separable synthetic data: harmful dev sets fire, benign ones (20% validation FPR) far less
        assert float(r["dev_harmful"]) > 0.9 and float(r["dev_harmful"]) - float(r["dev_benign"]) > 0.4
    md = out.with_suffix(".md").read_text()
    assert "| default (64 units) |" in md and "| 16 units |" in md and "(of 3)" in md
