"""The harmful prompts the prefill gate let through, from an ``autosteer eval`` output folder.

For every harmful set (or the ones named with ``--set``): each row whose gate did not fire, with its
probe score, what the model answered (on such a row the ``autosteer`` response is the unsteered
one: nothing was blended), the refusal judge's verdict, and -- when the run had the ``monitor``
setting -- whether monitor mode latched and after how many generated tokens. Prints a markdown
table; ``--out`` also writes it to a file.

    python benchmarks/missed_rows.py docs/results/monitor_eval_forced --width 90 \\
        --out docs/results/monitor_eval_forced/missed.md
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(out_dir: Path) -> tuple[dict, list[dict]]:
    report_path, rows_path = out_dir / "report.json", out_dir / "responses.jsonl"
    for p in (report_path, rows_path):
        if not p.is_file():
            raise SystemExit(f"error: {p} not found (an `autosteer eval --out {out_dir}` folder has report.json and "
                             "responses.jsonl)")
    report = json.loads(report_path.read_text())
    rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()]
    return report, rows


def _cell(text: str, width: int) -> str:
    text = " ".join(text.split())
    text = text if len(text) <= width else text[: width - 1] + "…"
    return text.replace("|", "\\|")


def missed_table(report: dict, rows: list[dict], set_name: str, width: int = 100) -> str:
    entry = report["sets"][set_name]
    by = {(r["setting"], r["index"]): r for r in rows if r["set"] == set_name}
    # the response shown: unsteered on a gate-missed row in these settings; in monitor mode only up to the latch
    base = next((s for s in ("autosteer", "unsteered", "monitor") if s in entry["results"]), None)
    if base is None:
        raise SystemExit(f"error: set {set_name!r} was run without the autosteer, unsteered or monitor setting")
    missed = [i for i in range(entry["n"]) if not by[(base, i)]["gate"]]
    has_monitor = "monitor" in entry["results"]
    head = "| row | p_unsafe | judge: refused | " + ("monitor latched after (tokens) | " if has_monitor else "") + "response |"
    lines = [f"### {set_name}: the gate let {len(missed)} of {entry['n']} through", "",
             f"tau {report['tau_used']:.4g}; response: the `{base}` setting's ("
             + ("unsteered until monitor mode latched" if base == "monitor" else "unsteered on these rows")
             + f"), first {width} characters", "", head, "|" + "---|" * (head.count("|") - 1)]
    caught = 0
    for i in missed:
        r = by[(base, i)]
        score = "NaN" if r["p_unsafe"] is None else f"{r['p_unsafe']:.4f}"  # NaN scores are stored as null
        cells = [str(i), score, "yes" if r["refused"] else "no"]
        if has_monitor:
            m = by[("monitor", i)]
            caught += m["steered"]
            cells.append(str(m["latched_at"]) if m["steered"] else "--")
        cells.append(_cell(r["response"], width))
        lines.append("| " + " | ".join(cells) + " |")
    if has_monitor:
        lines += ["", f"monitor mode latched on {caught} of these {len(missed)}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=Path, help="an `autosteer eval --out` folder")
    ap.add_argument("--set", action="append", default=None, help="a set name (default: every harmful set)")
    ap.add_argument("--width", type=int, default=100, help="characters of each response to show")
    ap.add_argument("--out", type=Path, default=None, help="also write the tables here")
    args = ap.parse_args(argv)
    report, rows = load(args.out_dir)
    names = args.set or [n for n, e in report["sets"].items() if e["harmful"]]
    unknown = [n for n in names if n not in report["sets"]]
    if unknown:
        print(f"error: no set {unknown[0]!r} in {args.out_dir}; sets: {list(report['sets'])}", file=sys.stderr)
        return 2
    text = "\n".join(missed_table(report, rows, n, args.width) for n in names)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
