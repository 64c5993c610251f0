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


def test_monitor_training_says_what_the_monitor_probe_learned_from():
    assert monitor_training({"tau": 0.1}) is None  # prefill-only pack
    assert "after 'Sure, here is'" in monitor_training({"tau_monitor": 0.99, "monitor": {"responses": "forced",
                                                                                        "prefix": "Sure, here is"}})
    own = monitor_training({"tau_monitor": 0.99, "monitor": {"tokens": 16}})  # packs from before the choice existed
    assert own == "trained on the model's own responses to fit prompts, labelled by prompt"
