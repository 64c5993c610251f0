"""benchmarks/genre_gate_study.py: what it adds to the fit data is fit-side only; its rates and target count."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import genre_gate_study as S  # noqa: E402
from autosteer import data as D  # noqa: E402
from autosteer import rephrasing as R  # noqa: E402


@pytest.mark.skipif(bool(D.missing_sources()), reason="data wheels not installed")
def test_fit_additions_hold_no_dev_prompt_and_no_dev_family():
    adds = S.fit_additions(0, 30)
    dev_keys = {D.normalize_text(p.text) for ps in D.genre_splits("dev").values() for p in ps}
    dev_keys |= {D.normalize_text(t.text) for pair in D.contrast_pair_splits("dev") for t in pair}
    splits = D.default_splits(0)
    dev_keys |= {D.normalize_text(p.text) for name in D.DEV_SPLITS for p in splits[name]}
    for h, b in adds.values():
        assert h and b
        assert not ({D.normalize_text(t) for t in h + b} & dev_keys)
    fit_prefixes = tuple(t.split("{core}")[0] for f in R.FIT_FAMILIES for t in R.FAMILIES[f])
    dev_prefixes = tuple(t.split("{core}")[0] for f in R.DEV_FAMILIES for t in R.FAMILIES[f])
    rh, rb = adds["rephrased"]
    assert len(rh) == 30 * len(R.FIT_FAMILIES) and len(rb) == 30 * len(R.FIT_FAMILIES)
    for t in rh + rb:
        assert t.startswith(fit_prefixes) and not t.startswith(dev_prefixes)


def test_pooled_rates_and_targets():
    sets = [{"name": "genre: a", "group": "genre"}, {"name": "genre: b", "group": "genre"},
            {"name": "safe", "group": "contrast_safe"}, {"name": "sr", "group": "direct"}, {"name": "re", "group": "rephrased_dev"}]
    scores = {"genre: a": torch.tensor([0.0, 0.0, 0.0, 0.9]), "genre: b": torch.zeros(4), "safe": torch.tensor([0.0, 0.9]),
              "sr": torch.ones(10), "re": torch.tensor([1.0, 1.0, 0.0, 1.0])}
    r = S.pooled_rates(scores, sets, 0.5)
    assert r["genre"] == 1 / 8 and r["genre_max"] == 0.25 and r["genre_worst"] == "a"
    assert r["contrast_safe"] == 0.5 and r["direct"] == 1.0 and r["rephrased_dev"] == 0.75
    assert S.targets_met(r) == 2  # StrongREJECT and rephrased met; a genre and the contrast set not
