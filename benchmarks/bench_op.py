"""Latency of the per-decode-step AutoSteer op, per provider, measured side by side in one run.

Providers (all on the same inputs; the latched rows are fixed by the initial ``latched`` and a
threshold no score can pass, so every call does the same work):

- ``reference``: ``steer_step_reference`` in eager PyTorch;
- ``compiled``: ``torch.compile(steer_step_reference)`` (mode default; skipped with a note if it fails);
- ``cpp``: the C++ kernel ``torch.ops.autosteer.steer_step_cpu`` (CPU);
- ``op``: the public wrapper ``autosteer.runtime.op.steer_step`` (validation + torch op dispatch);
- ``triton``: the fused Triton kernel (CUDA only);
- ``paper``: the AutoSteer reference code's formula, rebuilding ``W = E + eps * E @ S`` (V x d x d)
  every step and then ``logits = h @ W^T``. Timed at a reduced vocabulary ``--paper-v`` and scaled
  linearly to the full V (both products are linear in V); the table says so.

Timing: ``triton.testing.do_bench`` with quantiles [0.5, 0.2, 0.8] on CUDA,
``torch.utils.benchmark.Timer.blocked_autorange`` on CPU (median, and the 20th/80th percentiles
of its blocks). Results: a table on stdout, CSV + markdown in ``--out-dir`` (default
``$OUT`` or ``runs/bench``, so a trial run never replaces the recorded tables in
``benchmarks/results``), the markdown headed by the exact command.

Examples::

    python benchmarks/bench_op.py --quick                       # CPU: SmolLM2 shape, a few batches
    python benchmarks/bench_op.py --quick --out-dir benchmarks/results  # ... recorded in the repo
    python benchmarks/bench_op.py --shapes qwen2-7b --batches 16 --fracs 0 1
    python benchmarks/bench_op.py --device cuda --out-dir "$OUT"  # GPU, all shapes
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from autosteer.runtime.reference_op import steer_step_reference  # noqa: E402

SHAPES = {  # name: (H = d, V)
    "smollm2": (576, 49152),
    "qwen2-7b": (3584, 152064),
    "llama3-8b": (4096, 128256),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ALL_PROVIDERS = ("reference", "compiled", "cpp", "op", "triton", "paper")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 16, 64, 256])
    p.add_argument("--fracs", nargs="+", type=float, default=[0.0, 0.1, 1.0], help="fraction of latched rows")
    p.add_argument("--providers", nargs="+", default=list(ALL_PROVIDERS), choices=ALL_PROVIDERS)
    p.add_argument("--rank", type=int, default=16, help="rank r of the Refusal Head (U: V x r)")
    p.add_argument("--probe-hidden", type=int, default=64, help="probe width F")
    p.add_argument("--probe", choices=("all", "none", "stacked"), default="all",
                   help="probe_mask: score every row each step (monitor mode, the upper bound), none "
                        "(plain decode steps after prefill), or stacked (every row, monitor mode in a serving "
                        "step: prefill and monitor probes stacked, row_probe alternating, per-row thresholds)")
    p.add_argument("--logits-dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--hidden-dtype", choices=list(DTYPES), default=None, help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--u-dtype", choices=list(DTYPES), default="fp32", help="dtype of U and Bt (the runtime uses fp32)")
    p.add_argument("--u-layout", choices=("vr", "rv"), default="vr",
                   help="U stored [V, r] contiguous (vr, what the runtime builds) or [r, V] and passed transposed (rv)")
    p.add_argument("--paper-v", type=int, default=None,
                   help="vocabulary rows used to time the paper formula (scaled to V); default 1024 on CPU, full V on CUDA")
    p.add_argument("--min-run-time", type=float, default=0.3, help="seconds per CPU measurement")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--quick", action="store_true",
                   help="CPU-sized run: smollm2 at B in {1, 16, 64} plus qwen2-7b at B=16 (unless --shapes/--batches given)")
    p.add_argument("--out-dir", default=os.environ.get("OUT") or str(REPO / "runs" / "bench"),
                   help="where the CSV and markdown go (default $OUT or runs/bench; the recorded tables are in "
                        "benchmarks/results)")
    p.add_argument("--tag", default=None, help="file name suffix (default: device)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv if argv is None else ["benchmarks/bench_op.py"] + list(argv))
    return args


# ----------------------------------------------------------------------------- inputs
def make_inputs(H, V, B, frac, *, device, rank, F, logits_dtype, hidden_dtype, u_dtype, probe, u_layout="vr", seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, dtype=torch.float32):
        return (scale * torch.randn(*shape, generator=g)).to(dtype).to(device)

    n_lat = int(round(frac * B))
    U = rnd(V, rank, scale=1 / math.sqrt(rank), dtype=u_dtype)
    if u_layout == "rv":
        U = U.t().contiguous().t()
    latched = torch.zeros(B, dtype=torch.bool)
    latched[:n_lat] = True
    P = (2,) if probe == "stacked" else ()  # two stacked probes (prefill, monitor)
    return dict(
        probe_hidden=rnd(B, H, dtype=hidden_dtype),
        probe_rows=torch.arange(B, device=device),
        probe_mask=torch.full((B,), probe != "none", dtype=torch.bool, device=device),
        head_hidden=rnd(B, H, dtype=hidden_dtype),
        head_rows=torch.arange(B, device=device),
        logits=rnd(B, V, scale=3.0, dtype=logits_dtype),
        latched=latched.to(device),
        p_out=torch.zeros(B, device=device),
        W1=rnd(*P, F, H, scale=1 / math.sqrt(H)),
        b1=rnd(*P, F, scale=0.1),
        w2=rnd(*P, F, scale=1 / math.sqrt(F)),
        b2=rnd(P[0] if P else 1),
        U=U,
        Bt=rnd(rank, H, scale=1 / math.sqrt(H), dtype=u_dtype),
        **({"row_tau": torch.full((B,), TAU, device=device),
            "row_probe": (torch.arange(B, device=device) % 2).to(torch.int32)} if P else {}),
    ), n_lat


ORDER = ("probe_hidden", "probe_rows", "probe_mask", "head_hidden", "head_rows", "logits", "latched", "p_out",
         "W1", "b1", "w2", "b2", "U", "Bt")
TAU = 2.0  # no score exceeds it: the latched rows stay exactly the initial ones
EPS = 0.1


def own_copy(inp):
    out = dict(inp)
    for n in ("logits", "latched", "p_out"):
        out[n] = inp[n].clone()
    return out


# ----------------------------------------------------------------------------- timing
def time_fn(fn, device, min_run_time):
    """(median, p20, p80) in microseconds."""
    if device == "cuda":
        import triton.testing

        q = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return q[0] * 1e3, q[1] * 1e3, q[2] * 1e3
    from torch.utils import benchmark

    fn()  # warm up
    m = benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    times = sorted(m.times)
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))] * 1e6  # noqa: E731
    return m.median * 1e6, pick(0.2), pick(0.8)


def paper_step_fn(H, V_used, B, device, dtype, seed=0):
    """The reference code's per-step work at vocabulary V_used: W = E + eps * E @ S; logits = h W^T."""
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(V_used, H, generator=g).to(dtype).to(device)
    S = (torch.eye(H) + 0.01 * torch.randn(H, H, generator=g)).to(dtype).to(device)
    h = torch.randn(B, H, generator=g).to(dtype).to(device)

    def step():
        W = E + EPS * (E @ S)
        return h @ W.t()

    return step


# ----------------------------------------------------------------------------- main
def machine_info(device):
    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), platform.processor())
    except OSError:
        info["cpu"] = platform.processor()
    info["cores"] = os.cpu_count()
    try:
        info["loadavg_1min_at_end"] = round(os.getloadavg()[0], 2)  # other processes compete on a shared host
    except OSError:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            pass
    return info


def main(argv=None):
    args = parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    explicit = argv if argv is not None else sys.argv[1:]
    configs = []  # (shape, B)
    if args.quick:
        shapes = args.shapes if "--shapes" in explicit else ["smollm2", "qwen2-7b"]
        for s in shapes:
            bs = args.batches if "--batches" in explicit else ([1, 16, 64] if s == "smollm2" else [16])
            configs += [(s, b) for b in bs]
    else:
        configs = [(s, b) for s in args.shapes for b in args.batches]
    hidden_dtype = DTYPES[args.hidden_dtype or ("bf16" if device == "cuda" else "fp32")]
    logits_dtype, u_dtype = DTYPES[args.logits_dtype], DTYPES[args.u_dtype]
    providers = [p for p in args.providers if not (p == "triton" and device != "cuda") and not (p == "cpp" and device != "cpu")]
    notes = []

    op_mod = None
    if "cpp" in providers or "op" in providers or "triton" in providers:
        from autosteer.runtime import op as op_mod
    if "cpp" in providers and (op_mod is None or op_mod.native_backend() is None):
        providers.remove("cpp")
        notes.append("cpp: the C++ extension is unavailable, skipped")
    if "triton" in providers:
        from autosteer.kernels.steer_step import steer_step_triton
    compiled_ref = None
    if "compiled" in providers:
        # mode default; dynamic shapes so the batch/shape sweep does not recompile per config
        compiled_ref = torch.compile(steer_step_reference, dynamic=True)

    rows = []
    print(f"# device={device} hidden={hidden_dtype} logits={logits_dtype} U={u_dtype} r={args.rank} "
          f"F={args.probe_hidden} probe={args.probe} threads={torch.get_num_threads()}", flush=True)
    for shape, B in configs:
        H, V = SHAPES[shape]
        paper = None
        if "paper" in providers:
            v_used = min(V, args.paper_v or (V if device == "cuda" else 1024))
            try:
                fn = paper_step_fn(H, v_used, B, device, torch.float32 if device == "cpu" else hidden_dtype)
                med, p20, p80 = time_fn(fn, device, args.min_run_time)
                scale = V / v_used
                paper = (med * scale, p20 * scale, p80 * scale,
                         "" if v_used == V else f"timed at V={v_used}, scaled x{scale:.1f}")
                del fn
            except (RuntimeError, MemoryError) as exc:  # e.g. out of memory
                paper = None
                notes.append(f"paper {shape} B={B}: failed ({type(exc).__name__}: {exc})")
        for frac in args.fracs:
            inp, n_lat = make_inputs(H, V, B, frac, device=device, rank=args.rank, F=args.probe_hidden,
                                     logits_dtype=logits_dtype, hidden_dtype=hidden_dtype, u_dtype=u_dtype,
                                     probe=args.probe, u_layout=args.u_layout)
            results = {}
            for prov in providers:
                if prov == "paper":
                    if paper is not None:
                        results[prov] = paper
                    continue
                a = own_copy(inp)
                call = tuple(a[n] for n in ORDER) + (TAU, EPS, False)
                if "row_probe" in a:
                    call += (a["row_tau"], a["row_probe"])
                if prov == "reference":
                    fn = lambda: steer_step_reference(*call)  # noqa: E731
                elif prov == "compiled":
                    fn = lambda: compiled_ref(*call)  # noqa: E731
                elif prov == "cpp":
                    fn = lambda: torch.ops.autosteer.steer_step_cpu(*call)  # noqa: E731
                elif prov == "op":
                    fn = lambda: op_mod.steer_step(*call)  # noqa: E731
                else:
                    fn = lambda: steer_step_triton(*call)  # noqa: E731
                try:
                    t0 = time.time()
                    results[prov] = time_fn(fn, device, args.min_run_time) + ("",)
                    if prov == "compiled" and not any("compiled" in n for n in notes):
                        notes.append(f"compiled: first measurement (incl. warm-up compile) took {time.time() - t0:.1f}s")
                except Exception as exc:  # noqa: BLE001 - report and go on
                    msg = f"{prov} {shape} B={B} frac={frac}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
                    print("  note:", msg, flush=True)
                    notes.append(msg)
                    if prov == "compiled":
                        providers = [p for p in providers if p != "compiled"]
                        notes.append("compiled: skipped from here on (torch.compile of the reference failed)")
            ref = results.get("reference", (float("nan"),))[0]
            for prov, (med, p20, p80, note) in results.items():
                rows.append(dict(shape=shape, H=H, V=V, B=B, latched_frac=frac, latched_rows=n_lat, provider=prov,
                                 median_us=round(med, 2), p20_us=round(p20, 2), p80_us=round(p80, 2),
                                 speedup_vs_reference=round(ref / med, 3) if med > 0 else float("nan"), note=note))
            line = " ".join(f"{p}={results[p][0]:.1f}us(x{ref / results[p][0]:.2f})" for p in results)
            fused = next((p for p in ("triton", "cpp") if p in results), None)
            if "paper" in results and fused:
                line += f" paper/{fused}=x{results['paper'][0] / results[fused][0]:.0f}"
            print(f"{shape:9s} B={B:<4d} latched={n_lat:<4d} {line}", flush=True)

    write_results(args, rows, notes, device, providers)


def write_results(args, rows, notes, device, providers):
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = args.tag or device
    csv_path = out_dir / f"bench_op_{tag}.csv"
    md_path = out_dir / f"bench_op_{tag}.md"
    fields = ["shape", "H", "V", "B", "latched_frac", "latched_rows", "provider", "median_us", "p20_us", "p80_us",
              "speedup_vs_reference", "note"]
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    cmd = " ".join(shlex.quote(a) for a in args.argv)
    info = machine_info(device)
    provs = [p for p in ALL_PROVIDERS if any(r["provider"] == p for r in rows)]
    lines = [
        f"# steer_step latency ({device})",
        "",
        f"Command: `python {cmd}`" if not cmd.startswith("python") else f"Command: `{cmd}`",
        "",
        f"Date: {_dt.datetime.now().isoformat(timespec='seconds')}; machine: "
        + ", ".join(f"{k}={v}" for k, v in info.items()),
        "",
        f"Settings: rank r={args.rank}, probe width F={args.probe_hidden}, probe_mask={args.probe}, "
        f"logits {args.logits_dtype}, U/Bt {args.u_dtype} (U layout {args.u_layout}), hidden {args.hidden_dtype or ('bf16' if device == 'cuda' else 'fp32')}. "
        "Median latency per call in microseconds (20th-80th percentile in brackets) and speed-up over the eager "
        "reference, all measured side by side in this run.",
        "",
    ]
    fused = next((p for p in ("triton", "cpp") if p in provs), None)
    ratio_col = "paper" in provs and fused is not None
    header = "| shape | B | latched | " + " | ".join(provs) + (f" | paper / {fused} |" if ratio_col else " |")
    lines += [header, "|" + "---|" * (3 + len(provs) + int(ratio_col))]
    keys = []
    for r in rows:
        k = (r["shape"], r["B"], r["latched_frac"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        cells = []
        for p in provs:
            r = next((r for r in rows if (r["shape"], r["B"], r["latched_frac"]) == k and r["provider"] == p), None)
            if r is None:
                cells.append("-")
            else:
                star = "*" if r["note"] else ""
                cells.append(f"{r['median_us']:.1f}{star} [{r['p20_us']:.1f}-{r['p80_us']:.1f}] (x{r['speedup_vs_reference']:.2f})")
        n_lat = next(r["latched_rows"] for r in rows if (r["shape"], r["B"], r["latched_frac"]) == k)
        if ratio_col:
            med = {r["provider"]: r["median_us"] for r in rows if (r["shape"], r["B"], r["latched_frac"]) == k}
            cells.append(f"x{med['paper'] / med[fused]:,.0f}" if "paper" in med and fused in med else "-")
        lines.append(f"| {k[0]} | {k[1]} | {n_lat} ({k[2]:g}) | " + " | ".join(cells) + " |")
    star_notes = sorted({r["note"] for r in rows if r["note"]})
    if star_notes or notes:
        lines += ["", "Notes:"]
        lines += [f"- `*` paper: {n}" for n in star_notes]
        lines += [f"- {n}" for n in notes]
    md_path.write_text("\n".join(lines) + "\n")
    print(f"\nwrote {csv_path} and {md_path}")


if __name__ == "__main__":
    main()
