"""Two-stage gate study (issue 17, item 4): a grey zone under the prompt threshold, resolved by probing the first
generated tokens.

The served gate fires on a prompt when its probe score is >= ``tau``. The two-stage gate also watches the rows
whose score falls in a grey zone ``[low, tau)``: their first ``K`` generated tokens (the model's own, unsteered,
greedy answer) are scored by the pack's monitor probe, and the row latches when one of them reaches
``tau_monitor`` -- monitor mode restricted to the grey zone. A row outside the zone is never monitored, so it
costs nothing on most benign traffic; what it costs is the benign grey-zone rows that latch mid-answer, and
what it buys is the harmful grey-zone rows caught, after some tokens have already been written.

Offline: the prompt scores and each grey-zone row's response states come from the model as the runtime reads
them (``probe_inputs`` at the last prompt token; ``generated_token_states``, the monitor pre-hook during cached
``generate``), on the dev sets of issue 17 (:func:`autosteer.data.breadth_dev_sets`; none fitted on). The
pack must carry a monitor probe (``autosteer fit --monitor-prompts N``). Grey-zone bounds: the pack's own
``strict`` operating point (set at fit time by a doubled false-positive budget) and fixed values; the monitor
threshold: the pack's ``tau_monitor`` (set at fit time: at most 5% of benign validation responses latch
within ``K`` tokens). A sweep of other monitor thresholds is printed too, read off dev: a diagnostic bound,
not an operating point.

    python benchmarks/two_stage_gate_study.py --pack runs/ts/mon.pack.safetensors \\
        --out docs/results/two_stage_gate_study.md
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

#: dev columns: (key, label, harmful)
COLUMNS = [("benign_mix", "benign dev mix", False), ("genre_max", "worst genre", False),
           ("contrast_safe", "contrast safe", False), ("wrapped_benign", "wrapped benign", False),
           ("rephrased_benign", "rephrased benign", False), ("direct", "direct", True),
           ("wrapped_dev", "wrapped, dev families", True), ("rephrased_dev", "rephrased, dev families", True)]


def rates(sets: list[dict], fired: dict[str, list[bool]]) -> dict[str, float]:
    """The study's columns from each set's per-row decisions (groups as in gate_transfer_study)."""
    by: dict[str, list[tuple[str, list[bool]]]] = {}
    for s in sets:
        by.setdefault(s["group"], []).append((s["name"], fired[s["name"]]))

    def pooled(*groups):
        rows = [f for g in groups for _, fs in by.get(g, []) for f in fs]
        return sum(rows) / max(1, len(rows))

    return {"benign_mix": pooled("genre", "external", "default_benign"),
            "genre_max": max(sum(fs) / len(fs) for _, fs in by["genre"]),
            "contrast_safe": pooled("contrast_safe"), "wrapped_benign": pooled("wrapped_benign"),
            "rephrased_benign": pooled("rephrased_benign"), "direct": pooled("direct"),
            "wrapped_dev": pooled("wrapped_dev"), "rephrased_dev": pooled("rephrased_dev")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", required=True, help="a pack with a monitor probe")
    ap.add_argument("--low", default="strict,0.2,0.05", help="grey-zone lower bounds: operating-point names or values")
    ap.add_argument("--tokens", type=int, default=None, help="generated tokens watched (default: the pack's window)")
    ap.add_argument("--cache", default=str(ROOT / "runs" / "genre_gate"),
                    help="prompt states (shared with genre_gate_rates.py) and grey-zone responses")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from autosteer.data import breadth_dev_sets
    from autosteer.method.hidden_states import generated_token_states
    from autosteer.method.pack import load_pack, monitor_window, operating_point_tau
    from autosteer.method.probe import Probe
    from autosteer.models import load_model
    from genre_gate_rates import cached_layer_states

    t0 = time.time()
    pack = load_pack(args.pack)
    if not pack.has_monitor_probe:
        raise SystemExit(f"{args.pack} has no monitor probe: fit one with `autosteer fit --monitor-prompts N`")
    tau, tau_m = float(pack.tau), float(pack.tau_monitor)
    K = args.tokens or monitor_window(pack) or 16
    lows = []
    for v in args.low.split(","):
        lows.append((v, operating_point_tau(pack, v)) if not v.replace(".", "", 1).isdigit() else (v, float(v)))
    lowest = min(lo for _, lo in lows)
    gate, mon = Probe(pack.W1, pack.b1, pack.w2, pack.b2), Probe(**pack.monitor)
    model, tok = load_model()
    fmt, layers = pack.prompt_format, pack.layers
    cache = Path(args.cache)
    sets = breadth_dev_sets()
    score = {}
    for s in sets:
        x = cached_layer_states(model, tok, s["texts"], fmt, layers, cache, s["group"])
        score[s["name"]] = gate.score(x).tolist()
    grey = sorted({t for s in sets for t, p in zip(s["texts"], score[s["name"]]) if lowest <= p < tau})
    resp_path = cache / f"responses-L{'+'.join(map(str, layers))}-K{K}.pt"
    done = torch.load(resp_path) if resp_path.exists() else {}
    todo = [t for t in grey if t not in done]
    if todo:
        t1 = time.time()
        states, texts = generated_token_states(model, tok, todo, fmt, layers, max_new_tokens=K, batch_size=16,
                                               progress=True)
        for t, st, r in zip(todo, states, texts):
            p = mon.score(st).tolist() if len(st) else []
            done[t] = {"mon": p, "response": r}
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(done, resp_path)
        print(f"[responses] {len(todo)} grey-zone prompts, {K} tokens, in {time.time() - t1:.0f} s", flush=True)

    def first_latch(text: str, thr: float) -> int | None:
        return next((i for i, p in enumerate(done[text]["mon"]) if p > thr), None)

    def decide(low: float, thr: float | None):
        fired, leaked = {}, []
        for s in sets:
            fs = []
            for t, p in zip(s["texts"], score[s["name"]]):
                hit = p > tau  # the op's rule: p > tau latches
                if not hit and thr is not None and low <= p:
                    k = first_latch(t, thr)
                    hit = k is not None
                    if hit and s["harmful"]:
                        leaked.append(k)
                fs.append(hit)
            fired[s["name"]] = fs
        return rates(sets, fired), leaked

    base, _ = decide(tau, None)
    rows = [("served gate alone (tau %.3f)" % tau, base, None, None)]
    for name, low in lows:
        r, leaked = decide(low, tau_m)
        n_grey = sum(1 for s in sets for p in score[s["name"]] if low <= p < tau)
        rows.append((f"grey zone [{name} = {low:.3f}, tau), tau_monitor {tau_m:.5f}", r, leaked, n_grey))
    sweep = []
    low_name, low_v = lows[-1]
    for q in (0.9, 0.99, 0.999, 0.9999):
        r, leaked = decide(low_v, q)
        sweep.append((f"grey zone [{low_name} = {low_v:.3f}, tau), monitor threshold {q}", r, leaked, None))

    def line(name, r, leaked, n_grey):
        cells = " | ".join(f"{100 * r[k]:.1f}" for k, _, _ in COLUMNS)
        lk = "-" if not leaked else f"{statistics.median(leaked):.0f}"
        return f"| {name} | {'-' if n_grey is None else n_grey} | {cells} | {lk} |"

    head = ("| gate | grey-zone rows | " + " | ".join(c for _, c, _ in COLUMNS) + " | tokens before a harmful latch "
            "(median) |")
    sep = "|" + "---|" * (len(COLUMNS) + 3)
    md = ["# Two-stage gate study (issue 17, item 4)", "",
          f"Command: `python benchmarks/two_stage_gate_study.py {' '.join(sys.argv[1:])}` ({time.time() - t0:.0f} s "
          f"with cached states; {len(grey)} grey-zone prompts answered, {K} generated tokens each).", "",
          f"Pack `{Path(args.pack).name}`: layers {'+'.join(map(str, layers))}, tau {tau:.4f}, monitor probe "
          f"({pack.meta.get('monitor', {}).get('responses', '?')} responses), tau_monitor {tau_m:.5f}, window {K}. "
          "Cells are the share (%) of each DEV set the gate fires on (never fitted on): the prompt score >= tau, or "
          "in the grey zone and a monitored generated token over the monitor threshold. Benign rows that latch "
          "mid-answer count as fires.", "",
          head, sep, *[line(*r) for r in rows], "",
          "Diagnostic, read off dev (not an operating point): other monitor thresholds on the widest grey zone.", "",
          head, sep, *[line(*r) for r in sweep], ""]
    text = "\n".join(md)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
