"""Resources of every ``steer_step`` kernel variant (probe, latch + t, blend) serving can launch, compiled for sm_80 and sm_90
without a GPU, and the bytes one call moves by the cost model.

For each target, ``benchmarks/results/aot_sm{80,90}.md`` (headed by the command that wrote it):

1. **Variants**: every distinct compiled variant (``autosteer.kernels.aot``: the launcher's own
   plan and Triton's own specialisation of the calls serving makes, deduplicated) with its
   registers per thread, spills and stack (``ptxas -v``), shared memory (what a launch requests),
   programs per SM the register file allows at 4 warps, and the compile time.
2. **Bytes per call**: ``autosteer.kernels.aot.bytes_per_call`` for each model shape, rank and
   batch, in two steps -- a monitor step (every row probed, none latched) and a steering step
   (every row latched, none probed) -- with bf16 hidden states, fp32 logits and r-major U, the
   plan the launcher picks for the target's SM count (A100 108, H100 132): the previous design's
   bytes, this design's requested and DRAM bytes, the floor (each distinct byte once), and a time
   estimate against the floor's time at the HBM bandwidth (A100 2039 GB/s, H100 3350 GB/s): what a
   measured time is compared with.

Runs without a GPU (TRITON_INTERPRET must be unset), in a fresh Triton cache so that the compile
times are what a first call pays (``--warm-cache``: Triton's usual cache); about a minute on 2
idle cores::

    python benchmarks/aot_resources.py                        # writes benchmarks/results/aot_sm*.md
    python benchmarks/aot_resources.py --arch 90 --out-dir /tmp/aot
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("aot_resources.py compiles for GPU targets: unset TRITON_INTERPRET")
if "--warm-cache" not in sys.argv:  # compile times of a cold cache, as serving's first call pays them
    import atexit
    import shutil
    import tempfile

    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="aot_triton_cache_")
    atexit.register(shutil.rmtree, os.environ["TRITON_CACHE_DIR"], ignore_errors=True)

from autosteer.kernels import aot  # noqa: E402
from autosteer.kernels import steer_step as ks  # noqa: E402

BATCHES = (1, 8, 64, 256)


def _mb(n: float) -> str:
    return f"{n / 1e6:.3f}" if n < 1e7 else f"{n / 1e6:.0f}"


def _path(v: dict) -> str:
    c = v["constexprs"]
    if v["kernel"] == "probe":
        n, ps = int(c.get("N_PARTS", 1)), int(c.get("PROBE_SUM", 1))  # operands: one tensor, or several layers
        parts = "" if n == 1 else f", {n // ps} layers" + (" as (hidden, residual) pairs" if ps == 2 else "")
        return f"BLOCK_H {c['BLOCK_H']}, BLOCK_F {c['BLOCK_F']}{parts}"
    if v["kernel"] == "latch":
        return f"rank slice {c['BLOCK_R']}"
    held = "U tile held" if c["U_IN_REGS"] else "U chunked"
    return f"r {'/'.join(v['ranks'])}: BLOCK_R {c['BLOCK_R']}, BLOCK_V {c['BLOCK_V']}, {held}"


def variant_rows(report: dict, arch: int) -> tuple[list[str], dict[str, int]]:
    vs = [v for v in report["variants"] if v["arch"] == arch]
    ids = {}
    lines = ["| id | launch | hidden -> logits | tiles | U layout | V % 16 | stacked probes | state_rows | configs | "
             "warps | registers | spills st/ld | stack/local | shared B | programs/SM | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, v in enumerate(vs):
        ids[v["key"]] = i
        odd = "v50257" in v["shapes"] and len(v["shapes"]) == 1
        programs = aot.programs_per_sm(v["regs"], v["num_warps"], v["shared"], arch)
        layout = "/".join(v["layouts"]) if v["kernel"] == "blend" else "any"
        logits = "/".join(v["logits"]) if v["kernel"] == "blend" else "any"
        hidden = "/".join(v["hidden"]) if v["kernel"] != "blend" else "any"
        probes = {(True,): "yes", (False,): "no"}.get(tuple(v["row_probe"]), "either")
        state = {(True,): "yes", (False,): "no"}.get(tuple(v.get("state_rows", ())), "either")
        lines.append(
            f"| {i} | {v['kernel']} | {hidden} -> {logits} | {_path(v)} | {layout} | "
            f"{'no' if odd else ('0' if v['kernel'] == 'blend' else 'any')} | {probes} | {state} | {v['n_configs']} | "
            f"{v['num_warps']} | {v['regs']} | {v['spill_stores']}/{v['spill_loads']} | {v['stack']}/{v['local']} | "
            f"{v['shared']} | {programs} | {v['compile_s']:.2f} |")
    return lines, ids


def bytes_rows(arch: int, ids: dict[str, int]) -> list[str]:
    lines = ["| shape (H, V) | r | B | step | probe grid | blend programs | old design MB | requested MB | "
             "DRAM MB | floor MB | old / floor | DRAM / floor | est us | floor us |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, H, V in aot.SHAPES:
        for r in aot.RANKS:
            for B in BATCHES:
                c = aot.Config(name, H, V, r, "r-major", "bf16", "fp32", B=B)
                plan = aot.plan_for(c, arch)
                for step, probed, latched in (("monitor, none latched", B, 0), ("steering, all latched", 0, B)):
                    b = aot.bytes_per_call(c, plan, probed=probed, latched=latched, arch=arch)
                    lines.append(f"| {name} ({H}, {V}) | {r} | {B} | {step} | {plan.row_blocks} x {plan.h_splits} | "
                                 f"{plan.blend_programs} | {_mb(b['old'])} | {_mb(b['requested'])} | "
                                 f"{_mb(b['dram'])} | {_mb(b['floor'])} | {b['old'] / b['floor']:.1f} | "
                                 f"{b['dram'] / b['floor']:.2f} | {b['est_us']:.1f} | {b['floor_us']:.1f} |")
    return lines


def write(report: dict, arch: int, out_dir: Path, command: str) -> Path:
    vlines, ids = variant_rows(report, arch)
    vs = [v for v in report["variants"] if v["arch"] == arch]
    regs = [v["regs"] for v in vs]
    smem = [v["shared"] for v in vs]
    aligned = [v["regs"] for v in vs if v["shapes"] != ["v50257"]]
    spills = sum(v["spill_stores"] + v["spill_loads"] + v["stack"] + v["local"] for v in vs)
    doc = [
        f"# steer_step kernels: AOT compile for sm_{arch} ({aot.GPU_NAME[arch]} planning), no GPU",
        "",
        f"Command: `{command}`",
        "",
        f"Written {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} with triton {report['triton']}; "
        f"{report['n_configs'] // len({v['arch'] for v in report['variants']})} call configurations per target "
        f"-> {len(vs)} compiled variants (`autosteer.kernels.aot`). Registers, stack frame and local memory: "
        "Triton's cubin (`cuobjdump --dump-resource-usage`); spill bytes: `ptxas -v` on the PTX with Triton's "
        "ptxas and flags wherever there is a stack or local memory (spills need one of them); shared "
        "memory: Triton's metadata (what the launch requests; the driver reserves 1 KB more per block). "
        f"4 or 8 warps per program (column `warps`). Compile times: cold Triton cache, {report['jobs']} processes, load average "
        f"{report['loadavg']:.1f} on {os.cpu_count()} CPUs at the start (other jobs slow them down).",
        "",
        f"**Summary:** registers {min(regs)}-{max(regs)} (vocabularies that are multiples of 16: "
        f"{min(aligned)}-{max(aligned)}; " + ", ".join(
            f"{k} {min(v['regs'] for v in vs if v['kernel'] == k)}-{max(v['regs'] for v in vs if v['kernel'] == k)}"
            for k in ("probe", "latch", "blend")) + f"), spill/stack/local bytes {spills}, shared memory "
        f"{min(smem)}-{max(smem)} B (limit {aot.SMEM_LIMIT[arch] // 1024} KB per block).",
        "",
        "## Variants",
        "",
        "`programs/SM`: how many programs (of the variant's warps) an SM holds (`autosteer.kernels.aot.programs_per_sm`: "
        "the 64k-register file allocated per warp in units of 256, at most 64 warps, shared memory). "
        "`V % 16`: `no` for the vocabulary that is not a multiple of 16 "
        "(logit rows and r-major U columns are not 16-byte aligned: scalar loads). "
        "`configs`: how many of the enumerated calls launch it (`nan_latches` and `row_tau` are run-time "
        "flags, so both values share every variant).",
        "",
        *vlines,
        "",
        "## Bytes per call (cost model)",
        "",
        "`autosteer.kernels.aot.bytes_per_call` (its docstring defines every column): bf16 hidden states, "
        "fp32 logits, r-major fp32 U, F = 64, one probe, int64 rows; the launcher's plan for this target's "
        "SM count (`probe grid`: row blocks x hidden splits). `old design`: what the previous single launch "
        "(B x S programs, each re-running the probe and t, U streamed per latched row) requested. "
        "`requested`: what the three launches' programs load and store (DRAM plus L2 re-reads); `DRAM`: "
        "their first touch of each byte (the floor plus the fp32 scratch); `floor`: each distinct byte once. "
        f"`est us`: DRAM at {aot.HBM_GBPS[arch]:.0f} GB/s + re-reads at {aot.L2_GBPS[arch]:.0f} GB/s (L2, "
        f"assumed) + tensor-core time beyond the blend's memory time ({aot.TF32_TFLOPS[arch]:.0f} TFLOPS tf32, "
        f"x3) + {aot.LAUNCH_US:.0f} us per launch (assumed); `floor us`: floor / {aot.HBM_GBPS[arch]:.0f} "
        "GB/s. Not measured: a GPU run replaces the assumptions.",
        "",
        *bytes_rows(arch, ids),
        "",
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"aot_sm{arch}.md"
    path.write_text("\n".join(doc))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=list(aot.ARCHS), choices=aot.ARCHS)
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPU count)")
    p.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--warm-cache", action="store_true",
                   help="use Triton's usual cache (default: a fresh one, so the compile times are cold)")
    a = p.parse_args(argv)
    command = "python " + " ".join(shlex.quote(x) for x in [os.path.relpath(__file__, REPO)] + sys.argv[1:])
    loadavg = os.getloadavg()[0]
    report = aot.run(tuple(a.arch), a.jobs)
    report.update(jobs=a.jobs or os.cpu_count(), loadavg=loadavg)
    for arch in a.arch:
        path = write(report, arch, Path(a.out_dir), command)
        vs = [v for v in report["variants"] if v["arch"] == arch]
        print(f"sm_{arch}: {len(vs)} variants, registers {min(v['regs'] for v in vs)}-{max(v['regs'] for v in vs)}, "
              f"spills {max(v['spill_stores'] + v['spill_loads'] for v in vs)}, shared "
              f"{min(v['shared'] for v in vs)}-{max(v['shared'] for v in vs)} B -> {path}")
    print(f"enumerate {report['enumerate_s']} s, compile {report['compile_s']} s (triton {report['triton']}, "
          f"kernel {ks.__name__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
