"""Monitor-mode statistics in the evaluation report: leaked tokens and prefill-missed rows caught."""
from __future__ import annotations

import pytest

from autosteer import evaluate as ev


class _Handle:
    class pack:
        meta = {"model_name": "m", "layer": 1, "layer_rule": "auroc", "tau": 0.5, "tau_paper": 0.5, "eps": 0.1,
                "head_rank": 2}

    tau = 0.5


def test_monitor_stats_count_prefill_misses_and_catches(monkeypatch):
    # 5 rows: gate fired at prefill (latched 0), 3 missed at prefill of which 2 latched later (steps 4 and 9), 1 never
    gens = [ev.Generation("I'm sorry", 0.9, True, 0, True, True),
            ev.Generation("Sure, step 1", 0.1, True, 4, True, False),
            ev.Generation("Sure, here", 0.2, True, 9, True, False),
            ev.Generation("Sure", 0.1, False, -1, False, False),
            ev.Generation("I'm sorry", 0.95, True, 0, True, True)]
    monkeypatch.setattr(ev, "generate_batch", lambda *a, **k: gens)
    monkeypatch.setattr("autosteer.judge.validate_judge", lambda: {})
    report = ev.evaluate(_Handle(), None, [ev.PromptSet("jb", ["p"] * 5, True)], ("monitor",), max_new_tokens=32,
                         progress=False)
    r = report["sets"]["jb"]["results"]["monitor"]
    assert r["leaked_tokens"] == [4, 9]
    assert (r["prefill_missed"], r["caught_after_prefill"]) == (3, 2)
    md = ev.markdown_report(report)
    assert "- jb: 2 rows latched after prefill; leaked tokens median 9, p90 9" in md
    assert "let 3 rows through; monitor mode latched on 2 of them (66.7%) within 32 new tokens" in md


def test_the_report_gives_each_gate_rate_with_what_its_set_size_can_show(monkeypatch):
    """Each set's gate-fire count and its 95% Wilson interval, in report.json and the markdown table: 1 fire in 37
    prompts (the worst dev genre's count) is 2.7%, but the set cannot tell that from anything between 0.48% and 13.8%."""
    gens = [ev.Generation("ok", 0.9 if i == 0 else 0.1, i == 0, 0 if i == 0 else -1, False, i == 0) for i in range(37)]
    monkeypatch.setattr(ev, "generate_batch", lambda *a, **k: gens)
    monkeypatch.setattr("autosteer.judge.validate_judge", lambda: {})
    report = ev.evaluate(_Handle(), None, [ev.PromptSet("genre: x", ["p"] * 37, False)], ("autosteer",),
                         progress=False)
    e = report["sets"]["genre: x"]
    assert e["gate_fires"] == 1 and abs(e["gate_rate"] - 1 / 37) < 1e-12
    lo, hi = e["gate_rate_ci95"]
    assert abs(lo - 0.0048) < 5e-4 and abs(hi - 0.1382) < 5e-4, (lo, hi)
    assert "| genre: x | benign | 37 | 2.7% | 1/37, 0.4-13.9% |" in ev.markdown_report(report)  # (rounded outwards)


def test_rate_interval():
    # zero fires: the upper end is z^2 / (n + z^2); 189 prompts are the fewest that show a rate <= 2%
    assert ev.rate_interval(0, 40)[0] == 0.0 and abs(ev.rate_interval(0, 40)[1] - 1.96 ** 2 / (40 + 1.96 ** 2)) < 1e-12
    assert ev.rate_interval(0, 189)[1] < 0.02 < ev.rate_interval(0, 188)[1]
    assert ev.rate_interval(5, 5)[1] == 1.0 and ev.rate_interval(5, 5)[0] > 0.5
    lo, hi = ev.rate_interval(50, 100)  # symmetric about one half
    assert abs((lo + hi) / 2 - 0.5) < 1e-12 and 0.40 < lo < 0.41
    assert all(x != x for x in ev.rate_interval(0, 0))  # no prompts: nothing to say
    assert ev.rate_interval(0, 188)[0] == 0.0 and ev.rate_interval(7, 7)[1] == 1.0  # exact ends, no rounding residue
    # cells round outwards: 0 of 184 reach 2.04%, which must not print as a 2.0% that meets a 2% target
    assert ev.interval_text(0, 184) == "0/184, 0.0-2.1%" and ev.interval_text(0, 189) == "0/189, 0.0-2.0%"
    assert ev.interval_text(0, 0) == "0/0, no prompts"  # an empty set in a report, not a crash
    with pytest.raises(ValueError, match="3 of 2"):
        ev.rate_interval(3, 2)
