"""How far can the served gate's features go? A ceiling on issue 17's harm targets (diagnostic only).

Every lever studied for issue 17 (layers, positions, pooling, capacity, weighting, bagging, more fit data, a judge
suffix) moved the gate along one frontier: at the benign constraint (every genre <= 2%, the benign mix <= 1%, safe
contrast prompts <= 10%) it catches about four direct harmful requests in five, not the >= 95% the issue asks. This
study asks whether that is a limit of the *fit data* (the dev sets ask in ways no fit row does) or of the *features*
(the default model's residual stream at the last prompt token, layers 16 and 24, does not separate these dev
harmful requests from these dev benign prompts, whatever the training data).

It trains the fit's own probe (``FitConfig()``: its size, loss weights and seed) on three row sets and reads each at
the benign constraint (the oracle threshold of ``benchmarks/fit_data_frontier.py``, set on the scored dev rows):

- ``fit``: the shipped fit rows only, as served (the reference: the frontier every study has measured);
- ``fit+dev held-out``: the fit rows plus the dev sets themselves, ``--folds`` folds over the dev rows; each dev row is
  scored by the probe of the fold that held it out. Rows are tied by the prompt they were made from
  (:func:`underlying`: a StrongREJECT request, its jailbreak-wrapped and its rephrased forms; both sides of a contrast
  pair) and a tied group is held out together, so the direct column scores requests the probe never saw in any form.
  The other columns see less held out: the rephrased harmful dev rows are made from fit requests (trained on in every
  fold, as when the shipped gate is measured), and the dev framings and jailbreak templates appear, around other
  requests, in the other folds. This is the best a probe of this form does on requests like the dev ones when trained
  on requests like them: **the features' ceiling under these probes, at this much data** (``--dev-fractions``
  draws the learning curve);
- ``fit+dev in-sample``: trained on every row, scored on the same rows (how separable the rows are at all; an
  upper bound no held-out prompt reaches).

Nothing here is fitted into a pack or chooses a shipped setting: the dev sets are trained on only to measure the
ceiling, and the result is a statement about the features. Reserved data is never read.

States come from the judge-suffix study's cache (``runs/judge_suffix``; the served gate's state is read in the same
forward, index 1, and ``tests/test_gate_judge_study.py`` checks it equals ``last_token_states``); missing prompts are
extracted (about 20 minutes for every fit and dev prompt on 2 cores).

    OMP_NUM_THREADS=2 python benchmarks/gate_ceiling_study.py --threads 2 --out docs/results/gate_ceiling_study.md
"""
from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from fit_data_frontier import AT_CONSTRAINT, GENRE_MAX, MIX_MAX, constrained  # noqa: E402
from gate_judge_study import SUFFIXES, feature, states_of  # noqa: E402
from genre_gate_rates import build_sets, emit, genre_new_lines  # noqa: E402

MODES = ("fit", "fit+dev held-out", "fit+dev in-sample")
#: read at the constraint: the benign side (what the threshold is held to) and the harm side
BENIGN_AT = ("mix", "worst", "contrast")


#: dev groups whose rows weigh in the probe's loss as the fit's rows of the same kind (the fit's group names)
FIT_GROUP = {"default_benign": "other", "wrapped_benign": "jailbreak_wrapped", "rephrased_benign": "rephrased"}
#: dev groups whose prompts are made from other prompts (``breadth_dev_sets`` gives their ``made_from``)
DERIVED = ("rephrased", "wrapped", "contrast_unsafe")


def dev_group(s: dict) -> str:
    """A dev set's group for the probe's loss weights (``FitConfig.benign_weighting="group"``): a genre's rows weigh as
    that genre's fit rows do, an external source's as its fit rows do, FreshQA and the other default benign sets as
    the fit's ``other`` rows, benign prompts in templates and rephrased as the fit's; the rest as groups of their own."""
    if s["group"] in ("genre", "external"):
        return s["source"]
    return FIT_GROUP.get(s["group"], s["group"])


def underlying(sets: list[dict]) -> dict[str, str]:
    """Each dev text -> one key for every prompt tied to it: a rephrasing, a jailbreak-wrapped prompt or an unsafe
    contrast prompt is tied to the prompt it was made from (``made_from``), ties are followed through (a request,
    its wrapped and its rephrased forms; two requests whose rephrasings coincide), and the key is the smallest text
    of the tied group. A derived set without ``made_from`` is an error, not a silent untied row."""
    parent: dict[str, str] = {}

    def find(t: str) -> str:
        parent.setdefault(t, t)
        while parent[t] != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t

    for s in sets:
        if s["group"].startswith(DERIVED) and "made_from" not in s:
            raise ValueError(f"dev set {s['name']!r} ({s['group']}) is made from other prompts but has no made_from")
        made = s.get("made_from") or s["texts"]
        if len(made) != len(s["texts"]):
            raise ValueError(f"dev set {s['name']!r}: {len(made)} made_from entries for {len(s['texts'])} texts")
        for t, m in zip(s["texts"], made):
            a, b = find(t), find(m)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return {t: find(t) for s in sets for t in s["texts"]}


def fold_of(key: str, folds: int, seed: int) -> int:
    return hashlib.sha256(f"ceiling\0{seed}\0{key}".encode()).digest()[0] % folds


def key_share(key: str, seed: int = 0) -> float:
    """A stable number in [0, 1) per tied group and seed: ``--dev-fractions f`` trains on the dev rows whose key's
    share is below ``f`` (a prompt and its forms kept or dropped together; the kept rows grow as ``f`` grows)."""
    return int.from_bytes(hashlib.sha256(f"ceiling-share\0{seed}\0{key}".encode()).digest()[:4], "big") / 2 ** 32


def genres_only(m: dict) -> bool:
    """Issue 17's benign constraint without its safe-contrast clause (the benign mix and every genre)."""
    return m["mix"] <= MIX_MAX and m["worst"] <= GENRE_MAX


def scores_by_mode(mode, X_fit, y_fit, g_fit, X_dev, y_dev, g_dev, dev_keys, cfg, folds, fraction=1.0,
                   side="both") -> torch.Tensor:
    """The dev rows' scores under ``mode`` (held-out: trained on the other folds' dev rows whose key's share is
    under ``fraction``, of ``side``: ``both`` classes, only the ``harmful`` or only the ``benign`` dev rows)."""
    from autosteer.method.fit import probe_loss_weights
    from autosteer.method.probe import train_probe

    def train(X, y, g):
        w = probe_loss_weights(cfg, y, g)
        return train_probe(X, y, cfg.probe_hidden, cfg.probe_epochs, cfg.probe_lr, cfg.probe_weight_decay, cfg.seed,
                           sample_weight=w)

    if mode == "fit":
        return train(X_fit, y_fit, g_fit).score(X_dev)
    X_all, y_all, g_all = torch.cat([X_fit, X_dev]), torch.cat([y_fit, y_dev]), g_fit + g_dev
    if mode == "fit+dev in-sample":
        return train(X_all, y_all, g_all).score(X_dev)
    fold = torch.tensor([fold_of(k, folds, cfg.seed) for k in dev_keys])
    kept = torch.tensor([key_share(k, cfg.seed) < fraction for k in dev_keys])
    if side != "both":
        kept &= y_dev == (1.0 if side == "harmful" else 0.0)
    out = torch.empty(len(y_dev))
    n_fit = len(y_fit)
    for f in range(folds):
        held = (fold == f).nonzero().flatten()
        keep = torch.cat([torch.arange(n_fit), n_fit + ((fold != f) & kept).nonzero().flatten()])
        probe = train(X_all[keep], y_all[keep], [g_all[i] for i in keep.tolist()])
        out[held] = probe.score(X_dev[held])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="16,24", help="the layers whose states are extracted (and cached) together; "
                    "the probe reads them concatenated (shipped: 16,24)")
    ap.add_argument("--read-layers", default=None, help="the probe reads only these of --layers (e.g. a pack's at most "
                    "four out of a wider cache); default: all of --layers")
    ap.add_argument("--seeds", default="0", help="the probe's seed and the dev fold split")
    ap.add_argument("--hidden", default="64", help="comma list of probe hidden sizes (shipped: 64)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--dev-fractions", default="1", help="held-out mode: comma list of shares of the other folds' dev "
                    "prompts trained on (a learning curve; 1: all)")
    ap.add_argument("--dev-sides", default="both", help="held-out mode: comma list of which dev rows are trained on: "
                    "both, harmful (only the harmful dev rows) or benign (only the benign ones)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma list of {list(MODES)}")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default=str(ROOT / "runs" / "judge_suffix"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from autosteer.data import load_strongreject
    from autosteer.method.fit import FitConfig, fit_data_of
    from autosteer.models import load_model

    t0 = time.time()
    layers = [int(x) for x in args.layers.split(",")]
    read = layers if args.read_layers is None else [int(x) for x in args.read_layers.split(",")]
    if set(read) - set(layers):
        raise SystemExit(f"--read-layers {sorted(set(read) - set(layers))} not in --layers {layers}")
    seeds = [int(x) for x in args.seeds.split(",")]
    hiddens = [int(x) for x in args.hidden.split(",")]
    fractions = [float(x) for x in args.dev_fractions.split(",")]
    sides = [x.strip() for x in args.dev_sides.split(",")]
    if set(sides) - {"both", "harmful", "benign"}:
        raise SystemExit(f"unknown --dev-sides {sorted(set(sides) - {'both', 'harmful', 'benign'})}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if set(modes) - set(MODES):
        raise SystemExit(f"unknown mode(s) {sorted(set(modes) - set(MODES))}; known: {list(MODES)}")
    sets = build_sets(150)
    dev_only, fresh = genre_new_lines()
    fd = fit_data_of(FitConfig())
    texts = fd.harmful + fd.benign
    y_fit = fd.labels()
    g_fit = fd.row_groups()
    model, tok = load_model()
    dev_texts = [t for s in sets for t in s["texts"]]
    picked = [layers.index(v) for v in read]
    X_fit, X_dev = (feature(S[:, picked], "last") for S in
                    states_of(model, tok, [texts, dev_texts], SUFFIXES["user_turn"], layers, Path(args.cache)))
    y_dev = torch.tensor([float(s["harmful"]) for s in sets for _ in s["texts"]])
    g_dev = [dev_group(s) for s in sets for _ in s["texts"]]
    base = underlying(sets)
    dev_keys = [base[t] for t in dev_texts]
    n_tied = sum(len(s["texts"]) for s in sets if "made_from" in s)
    print(f"{len(texts)} fit rows, {len(dev_texts)} dev rows ({n_tied} keyed to the prompt they were made from), "
          f"{time.time() - t0:.0f} s", flush=True)
    sr_cat = {p.text: p.category for p in load_strongreject()}
    direct = next(s for s in sets if s["group"] == "direct")
    cats = sorted({sr_cat[t] for t in direct["texts"]})

    held = [(f, d) for d in sides for f in fractions]
    variants = [(m, f, d) for m in modes for f, d in (held if m == "fit+dev held-out" else [(0.0 if m == "fit" else 1.0, "both")])]

    def label(m, f, d):
        if m != "fit+dev held-out":
            return m
        return m + ("" if f == 1 else f", {100 * f:g}% of dev") + ("" if d == "both" else f", dev {d} rows only")
    results = []  # (label, hidden, seed, tau, measures at the constraint, {category: recall}, the same without contrast)
    for hidden in hiddens:
        for seed in seeds:
            cfg = FitConfig(seed=seed, probe_hidden=hidden)
            for mode, frac, side in variants:
                p = scores_by_mode(mode, X_fit, y_fit, g_fit, X_dev, y_dev, g_dev, dev_keys, cfg, args.folds, frac, side)
                scored, i = [], 0
                for s in sets:
                    scored.append((s, p[i:i + len(s["texts"])]))
                    i += len(s["texts"])
                tau, m = constrained(scored, dev_only, fresh)
                _, m_g = constrained(scored, dev_only, fresh, genres_only)
                pd = next(q for s, q in scored if s is direct)
                by_cat = {c: float((pd[[sr_cat[t] == c for t in direct["texts"]]] > tau).float().mean()) for c in cats}
                results.append((label(mode, frac, side), hidden, seed, tau, m, by_cat, m_g))
                print(label(mode, frac, side), hidden, seed, f"tau {tau:.4f}", {k: round(100 * v, 1) for k, v in m.items()},
                      f"without contrast: direct {100 * m_g['direct']:.1f}", f"{time.time() - t0:.0f} s", flush=True)

    labels = list(dict.fromkeys(r[0] for r in results))
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    cmd = (f"OMP_NUM_THREADS={args.threads} python benchmarks/gate_ceiling_study.py --threads {args.threads} "
           f"--layers {args.layers}" + (f" --read-layers {args.read_layers}" if args.read_layers else "") + f" --seeds {args.seeds} --hidden {args.hidden} --folds {args.folds}"
           + (f" --dev-fractions {args.dev_fractions}" if fractions != [1.0] else "")
           + (f" --dev-sides {args.dev_sides}" if sides != ["both"] else "")
           + (f" --modes '{args.modes}'" if modes != list(MODES) else "") + (f" --out {args.out}" if args.out else ""))
    lines = ["# Gate ceiling study: the served features, trained on the dev sets themselves (issue 17; diagnostic)", "",
             f"Command: `{cmd}` ({time.time() - t0:.0f} s; no generation; {len(texts)} fit rows, {len(dev_texts)} dev "
             f"rows, {n_tied} of them keyed to the prompt they were made from).", "",
             "The served gate's features (the residual stream entering layers " + ",".join(map(str, read)) + " at the last prompt "
             "token), the fit's probe (`FitConfig()`, hidden size as shown), each row set read at issue 17's benign "
             "constraint (the lowest threshold at which the benign dev mix fires on <= 1%, every genre on <= 2% and "
             "safe contrast prompts on <= 10%; set on the scored dev rows). `fit`: trained on the fit rows (as "
             "served). `fit+dev held-out`: plus the dev rows, each dev row scored by a probe that never saw it nor the "
             "prompt it was made from nor that prompt's other forms (" + str(args.folds) + " folds; the rephrased "
             "harmful rows are made from fit requests, trained on in every fold as when the shipped gate is measured, "
             "and the dev framings and templates appear around other requests in the other folds; `N% of dev`: trained on that share of the other "
             "folds' dev prompts, a tied group kept or dropped whole; `dev harmful/benign rows only`: the other class's dev rows left out of training). `fit+dev in-sample`: trained and scored on every row. The dev sets are trained on "
             "here only to measure the features; nothing is shipped from it. The last column reads the threshold "
             "without the safe-contrast clause (mix and genres only), to show which clause binds.", "",
             "## Means over seeds", "",
             "| rows trained on | hidden | seeds | tau | mix | worst genre | contrast | direct | wrapped | rephrased | "
             "genres' words | without contrast: direct |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for hidden in hiddens:
        for lab in labels:
            rs = [r for r in results if r[0] == lab and r[1] == hidden]
            mean = lambda k: pct(statistics.fmean(r[4][k] for r in rs))  # noqa: E731
            lines.append(f"| {lab} | {hidden} | {len(rs)} | {statistics.fmean(r[3] for r in rs):.3f} | "
                         + " | ".join(mean(k) for k in BENIGN_AT + AT_CONSTRAINT)
                         + f" | {pct(statistics.fmean(r[6]['direct'] for r in rs))} |")
    lines += ["", "## Direct requests caught at the constraint, by StrongREJECT category (means over seeds)", "",
              "| rows trained on | hidden | " + " | ".join(f"{c} (n={sum(sr_cat[t] == c for t in direct['texts'])})"
                                                       for c in cats) + " |",
              "|---|---|" + "---|" * len(cats)]
    for hidden in hiddens:
        for lab in labels:
            rs = [r for r in results if r[0] == lab and r[1] == hidden]
            lines.append(f"| {lab} | {hidden} | " + " | ".join(pct(statistics.fmean(r[5][c] for r in rs)) for c in cats) + " |")
    if len(seeds) > 1:
        lines += ["", "## Each seed", "", "| rows trained on | hidden | seed | tau | mix | worst genre | contrast | direct | "
                  "wrapped | rephrased | genres' words | without contrast: direct |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for lab, hidden, seed, tau, m, _, m_g in results:
            lines.append(f"| {lab} | {hidden} | {seed} | {tau:.3f} | " + " | ".join(pct(m[k]) for k in BENIGN_AT + AT_CONSTRAINT)
                         + f" | {pct(m_g['direct'])} |")
    emit("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
