"""Gate decisions of two steer packs on the dev sets, side by side (issue 21: does the fast fit gate as
the previous fp32 full-depth fit does?).

For every dev prompt the state at each pack's layer is read once, in fp32 as the runtime reads it
(``autosteer.method.hidden_states.last_token_states``), and each pack's gate decides ``p > tau``. The
table gives, per dev set, both fire rates and the share of prompts on which the two decisions agree.
Dev sets: those of ``autosteer eval --dev --jailbreak-dev 64`` and the genre / contrast / rephrasing
sets of ``benchmarks/genre_gate_rates.py`` (dev halves and dev families only; reserved data is never
read, and nothing here was used to fit or to choose anything).

    python benchmarks/fit_agreement.py --reference autosteer/packs/smollm2-135m-instruct.pack.safetensors \\
        --candidate runs/new.pack.safetensors --out docs/results/fit_agreement.md
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def dev_sets(n: int = 150) -> list[tuple[str, bool, list[str]]]:
    """``[(name, harmful, texts)]``: eval's dev sets, its dev-template jailbreak sets, and the genre-gate sets."""
    from autosteer.cli import _dev_sets, _jailbreak_dev_sets
    from autosteer.data import breadth_dev_sets

    out = [(s.name, bool(s.harmful), list(s.prompts)) for s in _dev_sets(None) + _jailbreak_dev_sets(64)]
    out += [(s["name"], bool(s["harmful"]), s["texts"]) for s in breadth_dev_sets(n)]  # genre dev halves, as reported
    return out


def agreement(ref_fire: torch.Tensor, new_fire: torch.Tensor) -> float:
    return float((ref_fire == new_fire).float().mean()) if len(ref_fire) else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", required=True, help="pack of the previous method (fp32, every layer)")
    ap.add_argument("--candidate", required=True, nargs="+", help="pack(s) of the new fit")
    ap.add_argument("--out", required=True, help="markdown report")
    ap.add_argument("--n", type=int, default=150, help="prompts per rephrasing family (genre_gate_rates --n)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "benchmarks"))

    from autosteer.method.hidden_states import last_token_states
    from autosteer.method.pack import load_pack
    from autosteer.method.probe import Probe
    from autosteer.models import load_model

    t0 = time.time()
    ref = load_pack(args.reference)
    cands = [load_pack(p) for p in args.candidate]
    model, tok = load_model(None)
    layers = sorted({*ref.layers, *(L for c in cands for L in c.layers)})
    sets = dev_sets(args.n)
    texts = list(dict.fromkeys(t for _, _, ts in sets for t in ts))
    at = {t: i for i, t in enumerate(texts)}
    X = last_token_states(model, tok, texts, ref.prompt_format, layers=layers, desc="dev states")  # fp32, as served

    def fires(pack, idx):
        x = torch.cat([X[idx, layers.index(L)] for L in pack.layers], dim=-1)  # the pack's layers side by side
        return Probe(pack.W1, pack.b1, pack.w2, pack.b2).score(x) > pack.tau

    lines = ["# Gate agreement with the previous fit on the dev sets\n",
             f"Made with `python benchmarks/fit_agreement.py --reference {args.reference} --candidate "
             f"{' '.join(args.candidate)} --out {args.out}` ({time.time() - t0:.0f} s of set-up;"
             f" {len(texts)} dev prompts, states in fp32 as served).\n",
             f"- reference: `{args.reference}`: layer {'+'.join(map(str, ref.layers))}, tau {ref.tau:.4f}, "
             f"fit compute {ref.meta['metrics'].get('compute_dtype', 'float32')}, states kept at every layer "
             f"for {ref.meta['metrics'].get('states_kept', {}).get('full_depth', 'all')} prompts"]
    for path, c in zip(args.candidate, cands):
        m = c.meta["metrics"]
        lines.append(f"- candidate `{path}`: layer {'+'.join(map(str, c.layers))}, tau {c.tau:.4f}, fit compute {m.get('compute_dtype', 'float32')}, "
                     f"full depth: {m.get('states_kept', {}).get('full_depth', 'all')}, fit {m['seconds']['total']:.0f} s")
    head = "| dev set | harmful | n | reference fires | " + " | ".join(
        f"candidate {k + 1} fires | agreement {k + 1}" for k in range(len(cands))) + " |"
    lines += ["", head, "|" + "---|" * (4 + 2 * len(cands))]
    all_idx, agree_all = [], [[] for _ in cands]
    for name, harmful, ts in sets:
        idx = torch.tensor([at[t] for t in ts])
        r = fires(ref, idx)
        row = f"| {name} | {'yes' if harmful else 'no'} | {len(ts)} | {r.float().mean():.1%} |"
        for k, c in enumerate(cands):
            f = fires(c, idx)
            agree_all[k].append((r == f))
            row += f" {f.float().mean():.1%} | {agreement(r, f):.1%} |"
        lines.append(row)
        all_idx.append(idx)
    row = f"| **all prompts (each set counted once per row above)** | | {sum(len(i) for i in all_idx)} | |"
    for k in range(len(cands)):
        row += f" | {torch.cat(agree_all[k]).float().mean():.2%} |"
    lines.append(row)
    uniq = torch.arange(len(texts))
    lines.append("")
    for k, (path, c) in enumerate(zip(args.candidate, cands)):
        r, f = fires(ref, uniq), fires(c, uniq)
        flips = int((r != f).sum())
        lines.append(f"Candidate {k + 1}: the two gates decide alike on {agreement(r, f):.2%} of the {len(texts)} distinct dev "
                     f"prompts ({flips} differ: {int((f & ~r).sum())} fire only with the candidate, {int((r & ~f).sum())} "
                     f"only with the reference).")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
