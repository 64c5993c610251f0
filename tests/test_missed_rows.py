"""responses.jsonl from `autosteer eval`, and benchmarks/missed_rows.py reading it: the harmful rows
the gate let through, with what monitor mode did on them."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import missed_rows  # noqa: E402
from autosteer.evaluate import monitor_training, response_records  # noqa: E402


def _row(response, gate, steered, latched_at=-1, refused=False):
    return {"response": response, "refused": refused, "steered": steered, "gate": gate, "latched_at": latched_at}


def _report():
    attack = {"n": 4, "harmful": True, "p_unsafe": [0.9, 0.01, 0.02, 0.8], "results": {
        "autosteer": {"rows": [_row("I cannot", True, True, 0, True), _row("Sure | step 1", False, False),
                               _row("I'm sorry", False, False, refused=True), _row("no", True, True, 0, True)]},
        "monitor": {"rows": [_row("I cannot", True, True, 0, True), _row("Sure | I cannot", False, True, 5, True),
                             _row("I'm sorry", False, False, refused=True), _row("no", True, True, 0, True)]}}}
    benign = {"n": 1, "harmful": False, "p_unsafe": [0.001], "results": {
        "autosteer": {"rows": [_row("Paris", False, False)]}, "monitor": {"rows": [_row("Paris", False, False)]}}}
    return {"tau_used": 0.03, "sets": {"attacks": attack, "questions": benign}}


def test_response_records_one_per_prompt_and_setting():
    report = _report()
    recs = response_records(report, {"attacks": ["a0", "a1", "a2", "a3"], "questions": ["q0"]})
    assert len(recs) == 2 * 4 + 2 * 1
    r = next(r for r in recs if r["set"] == "attacks" and r["setting"] == "monitor" and r["index"] == 1)
    assert r == {"set": "attacks", "index": 1, "setting": "monitor", "p_unsafe": 0.01, "prompt": "a1",
                 **_row("Sure | I cannot", False, True, 5, True)}
    assert "prompt" not in response_records(report)[0]  # prompts only when given


def test_missed_rows_lists_the_rows_the_gate_let_through(tmp_path, capsys):
    report = _report()
    out = tmp_path / "eval"
    out.mkdir()
    (out / "report.json").write_text(json.dumps(report))
    (out / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in response_records(report)))
    table = tmp_path / "missed.md"
    assert missed_rows.main([str(out), "--out", str(table)]) == 0
    text = table.read_text()
    assert "attacks: the gate let 2 of 4 through" in text and "questions" not in text  # harmful sets only
    lines = [line for line in text.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert lines == ["| 1 | 0.0100 | no | 5 | Sure \\| step 1 |", "| 2 | 0.0200 | yes | -- | I'm sorry |"]
    assert "monitor mode latched on 1 of these 2" in text
    assert missed_rows.main([str(out), "--set", "nope"]) == 2
    assert "no set 'nope'" in capsys.readouterr().err
    # a run with the monitor setting only, and a NaN score (stored as null)
    report["sets"]["attacks"]["results"].pop("autosteer")
    report["sets"]["attacks"]["p_unsafe"][2] = None
    text = missed_rows.missed_table(report, response_records(report), "attacks")
    assert "the `monitor` setting's (unsteered until monitor mode latched)" in text
    assert "| 1 | 0.0100 | yes | 5 | Sure \\| I cannot |" in text and "| 2 | NaN | yes | -- | I'm sorry |" in text


def test_monitor_training_says_what_the_monitor_probe_learned_from():
    assert monitor_training({"tau": 0.1}) is None  # prefill-only pack
    assert "after 'Sure, here is'" in monitor_training({"tau_monitor": 0.99, "monitor": {"responses": "forced",
                                                                                        "prefix": "Sure, here is"}})
    own = monitor_training({"tau_monitor": 0.99, "monitor": {"tokens": 16}})  # packs from before the choice existed
    assert own == "trained on the model's own responses to fit prompts, labelled by prompt"


def test_report_says_which_probe_scored_generated_tokens():
    from autosteer.evaluate import markdown_report

    base = {"pack": {"model_name": "m", "layer": 2, "tau_paper": 0.5}, "tau_used": 0.03, "max_new_tokens": 8,
            "settings": ["monitor"], "seconds": 1.0, "monitor_window": 16, "tau_monitor_used": 0.99,
            "sets": {"s": {"n": 1, "harmful": True, "gate_rate": 0.0, "gate_rate_tau_paper": 0.0,
                           "results": {"monitor": {"refusal_rate": 0.0, "leaked_tokens": []}}}}}
    trained = monitor_training({"tau_monitor": 0.99, "monitor": {"responses": "forced", "prefix": "Sure"}})
    md = markdown_report({**base, "monitor_probe": True, "tau_monitor_fallback": False, "monitor_training": trained})
    assert "scored by the pack's monitor probe against tau_monitor 0.99 (trained on the model's responses to fit prompts after 'Sure'" in md
    md = markdown_report({**base, "monitor_probe": False, "tau_monitor_fallback": False, "monitor_training": None})
    assert "scored by the prefill probe against tau_monitor 0.99 (the pack has no monitor probe: its prefill probe scores them)" in md
    md = markdown_report({**base, "monitor_probe": False, "tau_monitor_fallback": True, "monitor_training": None})
    assert "(a prefill-only pack: the prompt threshold, the probe never saw responses)" in md


def test_response_lengths_count_cut_short_answers():
    """benchmarks/response_lengths.py: per set and setting, how many answers are short (the judge counts
    an answer that just ends its sentence as answered; its length shows it was cut)."""
    import response_lengths

    report = {"settings": ["autosteer", "monitor"], "sets": {"attacks": {}, "questions": {}}}
    rows = [{"set": "attacks", "setting": "autosteer", "response": "a b c", "steered": True, "refused": False},
            {"set": "attacks", "setting": "autosteer", "response": "a b c d e f g h", "steered": False, "refused": False},
            {"set": "attacks", "setting": "monitor", "response": "a", "steered": True, "refused": True},
            {"set": "questions", "setting": "autosteer", "response": "a b c d e f", "steered": False, "refused": False}]
    table = response_lengths.length_table(report, rows, lambda s: len(s.split()), short=4).splitlines()
    assert table[2] == "| attacks | autosteer | 2 | 1 | 0 | 5.5 | 1 | 3 | 1 |"
    assert table[3] == "| attacks | monitor | 1 | 1 | 1 | 1 | 1 | 1 | 1 |"
    assert table[4] == "| questions | autosteer | 1 | 0 | 0 | 6 | 0 | -- | -- |"
    assert len(table) == 5  # no row for a setting a set lacks
