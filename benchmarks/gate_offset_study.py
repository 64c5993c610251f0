"""One threshold per probe in the pooled gate (docs/method.md 7y; issue 17, item 4; studied, not adopted).

The shipped pooled pack fires when the higher of two probabilities passes one tau: the last prompt token's probe and
the token probe's highest token. The token probe's scores run higher on benign prompts (a max over ~50 tokens), so
that one tau sits in its benign tail, above where the last-token probe alone would put its own (0.977 against 0.714).
This study gives the token probe its own threshold: the gate fires when ``p_last > tau`` or ``p_token >
sigmoid(logit(tau) + offset)``, i.e. one tau on ``max(p_last, sigmoid(logit(p_token) - offset))`` (a server would
read it unchanged, the offset folded into the token probe's bias). For each offset:

- **budget**: tau by the fit's own rule (the false-positive budget at ``FitConfig.pool_budget_scale`` on the
  out-of-fold union of the fit rows), what a fit with that offset would ship;
- **same fit FPR**: tau raised until the out-of-fold benign fire rate is at most the offset-0 gate's (the offset
  compared at equal benign cost on the fit rows);
- **dev oracle**: the lowest tau that meets issue 17's benign constraint on the dev sets themselves (benign mix
  <= 1%, every genre <= 2%, safe contrast <= 10%): read off the dev sets, so a bound for comparing offsets on one
  frontier, never a threshold to ship.

The out-of-fold scores come from the default pooled fit (``autosteer fit --pooling 'last_token|max'``), run here
once with its token-probe step wrapped to keep them (``--oof``; about 11 minutes on 2 cores with the fit's states
cache); the fit's probes must equal the shipped pooled pack's (checked), whose dev scores are read from the states
cache of ``benchmarks/genre_gate_rates.py``. No generation.

    OMP_NUM_THREADS=2 python benchmarks/gate_offset_study.py --threads 2 --out docs/results/gate_offset_study.md
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from fit_data_frontier import AT_POINT, constrained, measures  # noqa: E402
from genre_gate_rates import build_sets, emit, genre_new_lines, score_rows, served_parts  # noqa: E402

OFFSETS = (-2.0, -1.0, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0)


def offset_union(last: torch.Tensor, tok: torch.Tensor, offset: float) -> torch.Tensor:
    """``max(last, sigmoid(logit(tok) - offset))``: passing tau is ``last > tau or tok > sigmoid(logit(tau) +
    offset)``; offset 0 is the shipped gate's plain max."""
    if offset == 0:
        return torch.maximum(last.float(), tok.float())
    t = tok.double().clamp(1e-12, 1 - 1e-12)
    return torch.maximum(last.float(), torch.sigmoid(torch.log(t) - torch.log1p(-t) - offset).float())


def fit_oof(path: Path) -> dict:
    """The default pooled fit's out-of-fold scores (last-token and max-token probabilities per fit row, labels,
    groups) and its pack, from a run of the fit with its token-probe step wrapped; cached at ``path``."""
    if path.exists():
        return torch.load(path)
    import autosteer.method.fit as F
    from autosteer.method.fit import FitConfig, fit
    from autosteer.models import cache_dir, load_model

    kept = {}
    inner = F.fit_pooled

    def keep(states, tokens, starts, y, groups, fold_keys, last_scores, cfg):
        out = inner(states, tokens, starts, y, groups, fold_keys, last_scores, cfg)
        kept.update(last=last_scores.float().clone(), tok=out.oof_max.float().clone(), y=y.clone(), groups=list(groups))
        return out

    F.fit_pooled = keep
    try:
        model, tok = load_model()
        # the fit `autosteer fit --pooling 'last_token|max'` runs (its states cache and compute dtype)
        pack = fit(model, tok, FitConfig(pooling="last_token|max", states_cache=str(cache_dir() / "fit_states"),
                                         compute_dtype="auto"))
    finally:
        F.fit_pooled = inner
    kept["pool"] = {k: v.clone() for k, v in pack.pool.items()}
    kept["probe"] = {k: getattr(pack, k).clone() for k in ("W1", "b1", "w2", "b2")}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(kept, path)
    return kept


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default=str(ROOT / "runs" / "genre_gate"))
    ap.add_argument("--oof", default=str(ROOT / "runs" / "gate_offset" / "oof.pt"),
                    help="where the default pooled fit's out-of-fold scores are kept (made when missing)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import autosteer
    from autosteer.method.fit import FitConfig, operating_points
    from autosteer.method.pack import load_pack
    from autosteer.method.probe import calibrate_threshold
    from autosteer.models import load_model

    t0 = time.time()
    oof = fit_oof(Path(args.oof))
    shipped = load_pack(autosteer.default_pack_path(pooled=True))
    same = all(torch.equal(oof["pool"][k], shipped.pool[k]) for k in shipped.pool) and \
        all(torch.equal(oof["probe"][k], getattr(shipped, k)) for k in oof["probe"])
    if not same:
        raise SystemExit(f"the fit in {args.oof} did not reproduce the shipped pooled pack's probes: its out-of-fold "
                         "scores do not belong to the dev scores read here (delete it to refit)")
    L, T, y, groups = oof["last"], oof["tok"], oof["y"], oof["groups"]
    cfg = FitConfig(pooling="last_token|max")
    benign = (y == 0).nonzero().flatten()

    def fit_point(off: float) -> tuple[float, torch.Tensor]:
        u = offset_union(L, T, off)
        return operating_points(u, y, groups, cfg, scale=cfg.pool_budget_scale)["balanced"]["tau"], u

    tau0, u0 = fit_point(0.0)
    fpr0 = float((u0[benign] > tau0).float().mean())

    model, tok = load_model()
    handle = autosteer.attach(model, shipped)
    cache = Path(args.cache)
    sets = build_sets(150)
    dev_only, fresh = genre_new_lines()
    parts = [(s, *served_parts(model, tok, handle, s["texts"], cache, s["group"])) for s in sets]
    handle.detach()

    rows = []
    for off in OFFSETS:
        tau_b, u = fit_point(off)
        tau_f = max(tau_b, calibrate_threshold(u[benign], fpr0))
        scored = [(s, offset_union(pl, pt, off)) for s, pl, pt in parts]
        tau_o, m_o = constrained(scored, dev_only, fresh)
        for rule, tau in (("budget", tau_b), ("same fit FPR", tau_f), ("dev oracle", tau_o)):
            m = m_o if rule == "dev oracle" else measures(score_rows(scored, tau, dev_only, fresh))
            fit_fpr = float((u[benign] > tau).float().mean())
            fit_tpr = float((u[y == 1] > tau).float().mean())
            rows.append((off, rule, tau, fit_fpr, fit_tpr, m))

    lines = ["# One threshold per probe in the pooled gate (a logit offset for the token probe)", "",
             f"Command: `OMP_NUM_THREADS={args.threads} python benchmarks/gate_offset_study.py --threads {args.threads}"
             + (f" --out {args.out}" if args.out else "") + f"` ({time.time() - t0:.0f} s, {args.threads} CPU "
             "thread(s); the fit's out-of-fold scores from " + f"`{Path(args.oof).relative_to(ROOT) if Path(args.oof).is_relative_to(ROOT) else args.oof}`"
             + "; no generation).", "",
             "The gate fires when `p_last > tau` or `p_token > sigmoid(logit(tau) + offset)`; offset 0 is the shipped "
             f"pooled pack (tau {shipped.tau:.4f}). Its out-of-fold scores come from the default pooled fit, whose "
             "probes equal the shipped pack's (checked). Rules: **budget**: the fit's false-positive budget "
             f"(x{cfg.pool_budget_scale:g}) on the out-of-fold union, what a fit with that offset would ship; "
             f"**same fit FPR**: tau raised until the fit rows' out-of-fold benign fire rate is at most offset 0's "
             f"({100 * fpr0:.2f}%); **dev oracle**: the lowest tau meeting issue 17's benign constraint on these dev "
             "sets (benign mix <= 1%, every genre <= 2%, safe contrast <= 10%), read off dev: a bound, never a "
             "shipped threshold. Dev columns: gate fires %, as `benchmarks/fit_data_frontier.py` reads them.", "",
             "| offset | rule | tau | fit FPR (oof) | fit TPR (oof) | " + " | ".join(AT_POINT) + " |",
             "|---|---|---|---|---|" + "---|" * len(AT_POINT)]
    for off, rule, tau, ff, ft, m in rows:
        lines.append(f"| {off:+g} | {rule} | {tau:.4f} | {100 * ff:.2f} | {100 * ft:.2f} | "
                     + " | ".join(f"{100 * m[k]:.2f}" if k == "mix" else f"{100 * m[k]:.1f}" for k in AT_POINT) + " |")
    best_fit = max((r for r in rows if r[1] == "same fit FPR"), key=lambda r: (r[4], -abs(r[0])))
    best_budget = max((r for r in rows if r[1] == "budget"), key=lambda r: (r[4], -abs(r[0])))
    lines += ["", f"At the same out-of-fold benign fire rate the fit rows favour offset {best_fit[0]:+g} "
              f"(out-of-fold TPR {100 * best_fit[4]:.2f}% against {100 * next(r[4] for r in rows if r[0] == 0 and r[1] == 'same fit FPR'):.2f}% "
              "at offset 0): the fit data cannot choose an offset. Under the budget rule a larger offset spends more "
              "of the budget (the per-group caps bind the plain max first), so recall and benign fires rise together "
              f"along one frontier: the offset that catches the most fit rows there is {best_budget[0]:+g}, the "
              f"grid's last (out-of-fold benign fires {100 * best_budget[3]:.2f}%; on dev {100 * best_budget[5]['mix']:.2f}% "
              f"of the benign mix, {100 * best_budget[5]['contrast']:.1f}% of safe contrast prompts). The dev oracle "
              "column is that frontier at issue 17's constraint."]
    emit("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
