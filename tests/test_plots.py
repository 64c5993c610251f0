"""eval's plots use matplotlib's object API: a caller's backend (a notebook's) is left as it was."""
from __future__ import annotations

import pytest

from autosteer.evaluate import add_roc_auc, save_plots

matplotlib = pytest.importorskip("matplotlib")


def _report():
    sets = {"harm": {"harmful": True, "p_unsafe": [0.9, 0.8, None], "results": {"autosteer": {"refusal_rate": 0.5}}},
            "benign": {"harmful": False, "p_unsafe": [0.1, 0.85], "results": {"autosteer": {"refusal_rate": 0.0}}}}
    return {"sets": sets, "settings": ["autosteer"], "tau_used": 0.5}


def test_save_plots_keeps_the_callers_backend(tmp_path):
    matplotlib.use("svg")  # stands for a notebook's inline backend: anything but Agg
    before = matplotlib.get_backend()
    report = _report()
    paths = save_plots(report, {"sas": [0.1, 0.2], "val_auroc": [0.7, 0.9], "layer": 1, "layer_rule": "auroc"}, tmp_path)
    assert matplotlib.get_backend() == before
    assert sorted(p.name for p in paths) == ["layers.png", "probe_scores.png", "refusal_rates.png", "roc.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    assert report["roc_auc"] == pytest.approx(0.75)  # 3 of the 4 harmful/benign pairs ordered right


def test_roc_auc_without_plots():
    report = _report()
    add_roc_auc(report)
    assert report["roc_auc"] == pytest.approx(0.75)
