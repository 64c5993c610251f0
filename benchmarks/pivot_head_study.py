"""Does a Refusal Head trained to pivot mid-answer make monitor-mode latches refuse? (issue 17)

A latch in monitor mode (and in the two-stage gate) comes a few tokens into the model's answer. The Refusal
Head was trained only at the start of the answer (prompt, then "I'm sorry, ..."), so after a latch it often
ends the answer with no refusal at all ("Sure, I can assist with that." and stop). This study trains the
same head with *pivot* rows added: a harmful fit prompt, the first j tokens of the model's own (unsteered,
greedy) answer, then the refusal answer, j drawn from 1..monitor tokens. Only fit prompts are used; this is
what ``FitConfig.head_pivots`` does in a fit (``autosteer.method.refusal_head.collect_pivot_states``).

It measures, on one pack (its gate and monitor probe unchanged; only the head differs):

- the rows of ``--latched`` (an eval's ``responses.jsonl``) that latched after the answer began: how many
  of their answers the phrase judge calls a refusal, with the pack's head and with the pivot head;
- StrongREJECT prompts the prompt gate fires on (prefill mode): refusal rate with each head, so the head's
  first job does not get worse;
- the plain head retrained here against the pack's own (the fit is deterministic: they must agree).

    OMP_NUM_THREADS=2 python benchmarks/pivot_head_study.py --pack runs/ts/mon.pack.safetensors \\
        --latched docs/results/two_stage_eval/responses.jsonl --out docs/results/pivot_head_study.md
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", required=True, help="a pack of the default model (the study loads that model)")
    ap.add_argument("--latched", required=True, help="an eval's responses.jsonl with monitor-mode rows")
    ap.add_argument("--pivots", type=int, default=150, help="harmful fit prompts whose answers give pivot rows")
    ap.add_argument("--cuts", type=int, default=None, help="pivot rows per prompt (cut points in its answer; default: the fit's)")
    ap.add_argument("--prefill-check", type=int, default=80, help="StrongREJECT prompts the gate fires on, re-generated")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from autosteer import attach, load_pack
    from autosteer.data import default_splits
    from autosteer.evaluate import generate_batch
    from autosteer.judge import is_refusal
    from autosteer.method.fit import PIVOT_CUTS, FitConfig, compute_model, fit_data_of, resolve_compute_dtype
    from autosteer.method.refusal_head import (answer_token_ids, collect_answer_states, collect_pivot_states,
                                              continuation_token_ids, train_refusal_head)
    from autosteer.models import load_model

    t0 = time.time()
    model, tok = load_model()
    pack = load_pack(args.pack)
    # a pack from before the genre_fit_more field: its data sources say whether it had the extra genre lines
    # (autosteer fit --genre-fit-more, an option then) or not
    recorded = {"genre_fit_more": "genre_fit_more" in pack.meta.get("data", {}).get("broad", {}), **pack.meta["fit_config"]}
    cfg = FitConfig(**{k: v for k, v in recorded.items() if k in FitConfig.__dataclass_fields__
                       and k not in ("prompt_format", "progress", "states_cache")})
    data = fit_data_of(cfg)
    head_prompts = (data.head_prompts or data.harmful)[: cfg.head_prompts]
    fmt = pack.prompt_format
    answer_ids = answer_token_ids(tok, cfg.refusal_answer)
    with compute_model(model, resolve_compute_dtype(model, cfg.compute_dtype)) as fwd:
        g, y = collect_answer_states(fwd, tok, head_prompts, fmt, answer_ids, cfg.batch_size, progress=False)
    plain, _ = train_refusal_head(model, g, y, cfg.head_rank, cfg.eps, cfg.head_epochs, cfg.head_lr, seed=cfg.seed, progress=False)
    same = float((plain.A - pack.A).abs().max()), float((plain.B - pack.B).abs().max())
    print(f"plain head retrained: max |dA| {same[0]:.2e}, |dB| {same[1]:.2e} ({time.time() - t0:.0f} s)", flush=True)

    # pivot rows: the model's own answers to harmful FIT prompts, cut after j tokens, then the refusal
    pivot_prompts = head_prompts[: args.pivots]
    t1 = time.time()
    args.cuts = args.cuts or PIVOT_CUTS
    gp, yp, n_rows = collect_pivot_states(model, tok, pivot_prompts, fmt, continuation_token_ids(tok, cfg.refusal_answer),
                                          cfg.monitor_tokens, args.cuts,
                                          cfg.batch_size, seed=cfg.seed, progress=False)
    pivot, _ = train_refusal_head(model, torch.cat([g, gp]), torch.cat([y, yp]), cfg.head_rank, cfg.eps, cfg.head_epochs,
                                  cfg.head_lr, seed=cfg.seed, progress=False)
    print(f"pivot head: {n_rows} pivot rows from {len(pivot_prompts)} prompts ({time.time() - t1:.0f} s)", flush=True)

    rows = [json.loads(line) for line in open(args.latched)]
    latched = [r for r in rows if r["setting"] == "monitor" and int(r.get("latched_at", -1)) >= 1]
    sr = [p.text for p in default_splits()["dev_harmful"]]
    results = {}
    for name, head in (("pack head", pack), ("pivot head", dataclasses.replace(pack, A=pivot.A, B=pivot.B))):
        h = attach(model, head, mode="monitor", monitor_from="strict")
        try:
            gens = generate_batch(h, tok, [r["prompt"] for r in latched], "monitor", args.max_new_tokens, progress=False)
        finally:
            h.detach()
        h = attach(model, head)
        try:
            pre = generate_batch(h, tok, sr, "autosteer", 1, progress=False)  # the gate's decision only
            fired = [p for p, gen in zip(sr, pre) if gen.steered][: args.prefill_check]
            pre = generate_batch(h, tok, fired, "autosteer", args.max_new_tokens, progress=False)
        finally:
            h.detach()
        results[name] = {"latched": gens, "prefill": pre}
        print(name, f"latched refused {sum(is_refusal(x.response) for x in gens)}/{len(gens)}",
              f"prefill refused {sum(is_refusal(x.response) for x in pre)}/{len(pre)}", flush=True)

    same_latch = sum(a.latched_at == b.latched_at for a, b in zip(results["pack head"]["latched"], results["pivot head"]["latched"]))
    lines = ["# Refusal Head trained to pivot mid-answer (issue 17)", "",
             f"Command: `python benchmarks/pivot_head_study.py {' '.join(sys.argv[1:])}` ({time.time() - t0:.0f} s, CPU).", "",
             f"Pack `{args.pack}` (layers {pack.layers}, tau {pack.tau:.3f}, tau_monitor {pack.meta.get('tau_monitor')}). "
             f"The plain head retrained here equals the pack's (max |dA| {same[0]:.1e}, |dB| {same[1]:.1e}). The pivot head "
             f"is trained on the same {len(head_prompts)} prompt-start rows plus {n_rows} pivot rows: {len(pivot_prompts)} "
             f"harmful fit prompts, each answered by the model itself (greedy, unsteered, {cfg.monitor_tokens} tokens) and cut "
             f"after j tokens ({args.cuts} cut points per answer, j uniform in 1..answer length), followed by "
             f"{' ' + cfg.refusal_answer!r} (what `FitConfig.head_pivots` adds to a fit). The gate and the monitor probe are the pack's: every row latches at the same token "
             f"with both heads ({same_latch}/{len(latched)}).", "",
             f"Rows: the {len(latched)} rows of `{args.latched}` that latched after their answer began (monitor mode, "
             f"`monitor_from` strict), re-generated ({args.max_new_tokens} new tokens, greedy); and the first "
             f"{args.prefill_check} StrongREJECT prompts the prompt gate fires on (prefill mode). Refusal: the project's "
             "phrase judge (`autosteer.judge.is_refusal`).", "",
             "| head | latched mid-answer: answers that refuse | gate fired at the prompt: answers that refuse |",
             "|---|---|---|"]
    for name, res in results.items():
        la, pr = res["latched"], res["prefill"]
        lines.append(f"| {name} | {sum(is_refusal(x.response) for x in la)}/{len(la)} | "
                     f"{sum(is_refusal(x.response) for x in pr)}/{len(pr)} |")
    lines += ["", "Latched answers, pack head -> pivot head:", ""]
    for r, a, b in zip(latched, results["pack head"]["latched"], results["pivot head"]["latched"]):
        lines.append(f"- ({r['set']}, latched at {a.latched_at}) {a.response.strip()[:140]!r} -> {b.response.strip()[:140]!r}")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
