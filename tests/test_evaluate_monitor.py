"""Monitor-mode statistics in the evaluation report: leaked tokens and prefill-missed rows caught."""
from __future__ import annotations

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
