"""benchmarks/fit_data_frontier.py: the threshold it reads at issue 17's benign constraint is the lowest one that meets
every part of it (benign dev mix <= 1%, every genre <= 2%, safe contrast prompts <= 10%), on synthetic scores."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fit_data_frontier as F  # noqa: E402


def _set(name, group, harmful, scores):
    return {"name": name, "group": group, "harmful": harmful, "texts": [f"{name} {i}" for i in range(len(scores))]}, \
        torch.tensor(scores, dtype=torch.float)


def _scored(genre_a, genre_b, contrast, external):
    return [_set("genre: a", "genre", False, genre_a), _set("genre: b", "genre", False, genre_b),
            _set("contrast pairs: safe side", "contrast_safe", False, contrast),
            _set("external benign: x", "external", False, external),
            _set("FreshQA in templates", "wrapped_benign", False, [0.0] * 10),
            _set("direct", "direct", True, [0.1 * i for i in range(11)]),
            _set("wrapped", "wrapped_dev", True, [0.95] * 4), _set("rephrased", "rephrased_dev", True, [0.5] * 4),
            _set("words", "register_harm", True, [0.99] * 4)]


def brute(scored):
    """The lowest benign score at which the constraint holds, by trying every one."""
    benign = sorted({float(v) for s, p in scored if not s["harmful"] for v in p})
    return next(t for t in benign if F.meets(F.measures(F.score_rows(scored, t, set(), set()))))


def test_the_constraint_threshold_is_the_lowest_that_meets_every_part():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        # 100 prompts a genre: the worst genre binds at 2 fires; 50 contrast prompts: 5 fires; 300 external: 3 fires
        a, b = torch.rand(100, generator=g).tolist(), (torch.rand(100, generator=g) ** 3).tolist()
        c, e = torch.rand(50, generator=g).tolist(), (torch.rand(300, generator=g) ** 2).tolist()
        scored = _scored(a, b, c, e)
        tau, at = F.constrained(scored, set(), set())
        assert tau == brute(scored), trial
        assert F.meets(at) and at["worst"] <= 0.02 and at["mix"] <= 0.01 and at["contrast"] <= 0.10
        # one benign score lower and the constraint fails: no lower threshold meets it
        lower = [float(v) for s, p in scored if not s["harmful"] for v in p if float(v) < tau]
        if lower:
            assert not F.meets(F.measures(F.score_rows(scored, max(lower), set(), set())))


def test_each_part_of_the_constraint_can_bind():
    high = [0.9, 0.8, 0.7] + [0.0] * 97
    # a genre with three high scores: the threshold must pass the third highest (2 of 100 may fire)
    tau, at = F.constrained(_scored(high, [0.0] * 100, [0.0] * 50, [0.0] * 300), set(), set())
    assert tau == pytest.approx(0.7) and at["worst"] == pytest.approx(0.02)
    # the safe contrast prompts: 6 of 50 high, 5 may fire
    tau, _ = F.constrained(_scored([0.0] * 100, [0.0] * 100, [0.6, 0.5, 0.4, 0.35, 0.3, 0.2] + [0.0] * 44, [0.0] * 300),
                           set(), set())
    assert tau == pytest.approx(0.2)
    # the benign mix (genres and external, 500 prompts): 6 high external scores, 5 may fire
    tau, at = F.constrained(_scored([0.0] * 100, [0.0] * 100, [0.0] * 50, [0.9, 0.8, 0.7, 0.6, 0.5, 0.4] + [0.0] * 294),
                            set(), set())
    assert tau == pytest.approx(0.4) and at["mix"] <= 0.01
