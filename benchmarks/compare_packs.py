"""Do two steer packs for the same model make the same gate decisions on the dev sets?

Compares the tensors (relative difference per probe tensor, Refusal Head equality) and the gate
decision (score > the pack's tau) of both packs on every dev prompt, scored on the gate study's
cached last-token states (``benchmarks/gate_study.py`` extracts them; the cache must hold the dev
sets of ``--jailbreak-dev``). Used to check that ``autosteer fit`` run end to end gives the pack
written from cached states::

    python benchmarks/compare_packs.py runs/demo/smollm2-135m-instruct.pack.safetensors runs/e2e/default20.pack.safetensors
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from autosteer.method.pack import load_pack  # noqa: E402
from autosteer.method.probe import Probe  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pack_a")
    ap.add_argument("pack_b")
    ap.add_argument("--cache", default=str(ROOT / "runs" / "gate_study"))
    ap.add_argument("--jailbreak-dev", type=int, default=200)
    args = ap.parse_args(argv)
    a, b = load_pack(args.pack_a), load_pack(args.pack_b)
    if a.layers != b.layers:
        print(f"the packs probe different layers ({a.layers} and {b.layers})")
        return 1
    print(f"layers {'+'.join(map(str, a.layers))}; tau {a.tau:.4f} / {b.tau:.4f}")
    for name in ("W1", "b1", "w2", "b2"):
        x, y = getattr(a, name), getattr(b, name)
        print(f"probe.{name}: relative difference {float((x - y).norm() / x.norm()):.4f}")
    print(f"Refusal Head identical: {torch.equal(a.A, b.A) and torch.equal(a.B, b.B)}")
    import gate_study

    bank, sets = gate_study.extract_all(argparse.Namespace(cache=args.cache, seed=0, jailbreak_fit=400,
                                                           jailbreak_dev=args.jailbreak_dev, threads=2))
    pa, pb = (Probe(p.W1, p.b1, p.w2, p.b2) for p in (a, b))
    differ = 0
    for key, texts in sets["dev"].items():
        S = bank.get(texts, "last")
        X = torch.cat([S[:, L] for L in a.layers], dim=-1)  # the probe layers side by side
        fa, fb = pa.score(X) > a.tau, pb.score(X) > b.tau
        n = int((fa != fb).sum())
        differ += n
        print(f"{key:22s} n={len(texts):4d}  gate fires {100 * fa.float().mean():5.1f}% / {100 * fb.float().mean():5.1f}%  "
              f"prompts decided differently: {n}")
    print(f"prompts decided differently in all: {differ}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
