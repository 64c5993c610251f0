"""End-to-end decode time on the default model: plain ``generate`` vs AutoSteer attached, side by side.

Providers, timed in interleaved rounds in one process (these machines are noisy, so only the
ratios measured here mean anything):
- ``plain``: ``model.generate`` with no hooks;
- ``autosteer``: attached, prefill gate, benign prompts (rows not latched: the common case);
- ``autosteer-steered``: attached with every row latched (the op blends every step);
- ``monitor``: attached in monitor mode (the probe runs for every row at every step).

Every run generates exactly ``--new-tokens`` tokens (``min_new_tokens`` = ``max_new_tokens``).
The order of the providers rotates every round (no provider always runs first). Because the
wall-time ratios of whole generations are dominated by this machine's noise (several percent
between rounds), the script also measures the plugin's own share directly: the time spent
inside AutoSteer's logits processor (the only per-step work the plugin adds; its hooks only
keep references), summed over a generation, divided by that generation's wall time.

    python benchmarks/bench_decode.py --batch-sizes 1 16 --new-tokens 32 --rounds 5 \
        --out benchmarks/results/decode_cpu.md
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LogitsProcessor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import autosteer  # noqa: E402
from autosteer.data import default_splits  # noqa: E402
from autosteer.method.fit import FitConfig, FitData, default_fit_data, fit  # noqa: E402
from autosteer.models import load_model  # noqa: E402
from autosteer.prompting import PromptFormat, encode_prompts  # noqa: E402


class _Timed(LogitsProcessor):
    """Runs a processor and adds the seconds it took to ``spent[0]``."""

    def __init__(self, proc, spent):
        self.proc, self.spent = proc, spent

    def __call__(self, input_ids, scores):
        t0 = time.perf_counter()
        out = self.proc(input_ids, scores)
        self.spent[0] += time.perf_counter() - t0
        return out


def _pack(model, tok, path: Path):
    if path.exists():
        return autosteer.load_pack(path)
    full = default_fit_data(0)
    data = FitData(full.harmful[:96], [b for b in full.benign if len(b) < 400][:96], full.pairs[:32], {"counts": {}})
    pack = fit(model, tok, FitConfig(probe_epochs=150, head_prompts=96, progress=False), data)
    pack.save(path)
    return pack


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", default=None, help="pack to use (default: the shipped pack; 'quick': a small fit, cached "
                                                 "in runs/bench)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="markdown results file")
    ap.add_argument("--monitor-window", type=int, default=None,
                    help="generated tokens monitor mode probes (default: the pack's; 0: every token, the upper bound)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model()
    pack_path = Path(args.pack) if args.pack and args.pack != "quick" else autosteer.default_pack_path()
    if args.pack == "quick":
        pack_path = Path("runs/bench/quick.pack.safetensors")
        pack_path.parent.mkdir(parents=True, exist_ok=True)
    pack = _pack(model, tok, pack_path)
    prompts = [p.text for p in default_splits(0)["dev_benign"]]
    handle = autosteer.attach(model, pack, monitor_window=args.monitor_window)
    providers = ["plain", "autosteer", "autosteer-steered", "monitor"]
    rows = []
    from autosteer.runtime.op import available_backends

    for bs in args.batch_sizes:
        ids, mask = encode_prompts(tok, prompts[:bs], PromptFormat())
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                  do_sample=False, pad_token_id=tok.pad_token_id)

        inside = {name: [] for name in providers}

        def run(name):
            spent = [0.0]
            if name != "plain":
                proc = handle.logits_processor(force=True if name == "autosteer-steered" else None,
                                               mode="monitor" if name == "monitor" else "prefill")
                timed = _Timed(proc, spent)
            t = time.perf_counter()
            with torch.no_grad():
                if name == "plain":
                    model.generate(**kw)
                else:
                    model.generate(**kw, logits_processor=[timed])
            wall = time.perf_counter() - t
            inside[name].append(spent[0] / wall)
            return wall

        for name in providers:  # warm-up
            run(name)
        times = {name: [] for name in providers}
        for name in providers:
            inside[name].clear()
        for k in range(args.rounds):
            for name in providers[k % len(providers):] + providers[:k % len(providers)]:  # rotated
                times[name].append(run(name))
        base = statistics.median(times["plain"])
        for name in providers:
            med = statistics.median(times[name])
            ratios = [t / b for t, b in zip(times[name], times["plain"])]
            share = statistics.median(inside[name]) if name != "plain" else 0.0
            rows.append((bs, name, med, med / base, statistics.median(ratios), share))
            print(f"batch {bs:3d} {name:18s} median {med * 1000:8.1f} ms  ratio {med / base:.4f} "
                  f"(median of per-round ratios {statistics.median(ratios):.4f}); in the plugin {100 * share:.3f}%",
                  flush=True)
    handle.detach()
    lines = ["# End-to-end decode time, steered vs unsteered (default model, CPU)", "",
             "Command: `python benchmarks/bench_decode.py " + " ".join(sys.argv[1:]) + "`", "",
             f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
             f"torch {torch.__version__}; op backends available: {available_backends()}.",
             f"Pack `{Path(pack_path).name}`: layers {'+'.join(map(str, pack.layers))}, tau {float(handle.tau):.4g}.",
             f"Greedy, exactly {args.new_tokens} new tokens per row, {args.rounds} interleaved rounds; benign FreshQA "
             "prompts (the gate stays off unless the provider forces it).",
             f"Monitor mode: generated tokens scored by {'the pack monitor probe' if handle.monitor_probe is not None else 'the prefill probe'}"
             f", {'every generated token' if handle.monitor_window is None else f'the first {handle.monitor_window} generated tokens'}"
             " probed.", "",
             "| batch | provider | median wall time (ms) | ratio to plain | median per-round ratio | time inside the plugin |",
             "|---|---|---|---|---|---|"]
    for bs, name, med, ratio, rr, share in rows:
        lines.append(f"| {bs} | {name} | {med * 1000:.1f} | {ratio:.4f} | {rr:.4f} | "
                     f"{'-' if name == 'plain' else f'{100 * share:.3f}%'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
