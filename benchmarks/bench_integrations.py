"""Per-step cost of the serving integrations' driver (``SteerStateStore``) next to the bare op.

For a decode step of ``B`` requests (``P`` positions with speculation) it times:

- ``op``: ``autosteer.runtime.op.steer_step`` alone on prepared index tensors (the floor);
- ``store``: ``begin_step`` + ``P`` x ``apply`` + ``end_step`` of the state store (what an
  integration adds per step: one small host-to-device copy, slot gathers/scatters, the op);
- ``buffer``: ``HiddenBuffer.write_sum`` of one layer's two halves (the capture hook's work).

Rows are latched or not as ``--frac`` says (latched rows pay the V x r blend). CPU timings use
``torch.utils.benchmark`` (median of blocked autorange); on CUDA the same code runs with events
through ``torch.utils.benchmark`` too (it synchronises around each measurement, not inside).

    python benchmarks/bench_integrations.py                      # SmolLM2-135M shape, CPU
    python benchmarks/bench_integrations.py --device cuda --hidden 3584 --vocab 152064 --rank 64
"""
from __future__ import annotations

import argparse
import os

import torch
from torch.utils.benchmark import Timer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--probe", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--positions", type=int, default=1)
    ap.add_argument("--frac", type=float, nargs="+", default=[0.0, 1.0])
    ap.add_argument("--mode", default="monitor")
    ap.add_argument("--u-layouts", nargs="+", default=["r-major"], choices=["r-major", "row-major"],
                    help="memory layout of U = E A ([V, r] fp32): r-major ([r, V] memory, what SteerWeights.from_pack "
                         "builds) and/or row-major (what the integrations built before)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from autosteer.integrations.common import HiddenBuffer, SteerStateStore, SteerWeights
    from autosteer.runtime.op import steer_step

    dev = torch.device(args.device)
    H, V, r, F, P = args.hidden, args.vocab, args.rank, args.probe, args.positions
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    print(f"device={dev} H={H} V={V} r={r} F={F} P={P} mode={args.mode} threads={torch.get_num_threads()} "
          f"load={os.getloadavg()[0]:.2f}")
    print(f"{'U':>9} {'B':>4} {'latched':>8} {'op us':>10} {'store us':>10} {'overhead us':>12} {'buffer us':>10}")
    cases = [(lay, B, frac) for B in args.batches for frac in args.frac for lay in args.u_layouts]  # layouts side by side
    for layout, B, frac in cases:
        g = torch.Generator().manual_seed(0)
        U = torch.randn(r, V, generator=g).to(dev).t() if layout == "r-major" else torch.randn(V, r, generator=g).to(dev)
        w = SteerWeights(W1=torch.randn(F, H, generator=g).to(dev), b1=torch.randn(F, generator=g).to(dev),
                         w2=torch.randn(F, generator=g).to(dev), b2=torch.randn(1, generator=g).to(dev),
                         U=U, Bt=torch.randn(r, H, generator=g).to(dev),
                         tau=2.0, eps=0.1, fail_closed=False, layers=[0])  # tau > 1: nothing new latches
        n_lat = round(frac * B)
        store = SteerStateStore(w, mode=args.mode, max_batch=B, max_positions=P)
        ids = list(range(B))
        store.begin_step(ids, cu_seqlens=list(range(B + 1)))  # register the requests
        store.apply(torch.zeros(B, V, device=dev, dtype=dtype), probe_hidden=torch.zeros(B, H, device=dev, dtype=dtype),
                    head_hidden=torch.zeros(B, H, device=dev, dtype=dtype))
        store.end_step()
        store._slot_latched[:n_lat] = True
        ph = torch.randn(B * P, H, device=dev, dtype=dtype)
        hh = torch.randn(B * P, H, device=dev, dtype=dtype)
        logits = torch.randn(B * P, V, device=dev, dtype=dtype)
        view = logits.view(B, P, V)

        def step():
            store.begin_step(ids, positions=P)
            for j in range(P):
                store.apply(view[:, j], probe_hidden=ph, head_hidden=hh)
            store.end_step()

        rows = torch.arange(B, device=dev) * P
        mask = torch.full((B,), args.mode == "monitor", dtype=torch.bool, device=dev)
        lat = torch.zeros(B, dtype=torch.bool, device=dev)
        lat[:n_lat] = True
        pout = torch.zeros(B, dtype=torch.float32, device=dev)

        def op():
            for j in range(P):
                steer_step(ph, rows + j, mask, hh, rows + j, view[:, j], lat, pout, w.W1, w.b1, w.w2, w.b2,
                           w.U, w.Bt, w.tau, w.eps)

        buf = HiddenBuffer(max(B * P, 1), H, dtype, dev)
        a, b = torch.randn(B * P, H, device=dev, dtype=dtype), torch.randn(B * P, H, device=dev, dtype=dtype)

        def med(fn):
            return Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.3).median * 1e6

        t_op, t_store, t_buf = med(op), med(step), med(lambda: buf.write_sum(a, b))
        print(f"{layout:>9} {B:>4} {n_lat:>8} {t_op:>10.1f} {t_store:>10.1f} {t_store - t_op:>12.1f} {t_buf:>10.1f}")


if __name__ == "__main__":
    main()
