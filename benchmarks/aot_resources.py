"""Resources of every ``steer_step`` kernel variant serving can launch, compiled for sm_80 and sm_90
without a GPU, and the bytes one call moves by the cost model.

For each target, ``benchmarks/results/aot_sm{80,90}.md`` (headed by the command that wrote it):

1. **Variants**: every distinct compiled variant (``autosteer.kernels.aot``: the launcher's own
   plan and Triton's own specialisation of the calls serving makes, deduplicated) with its
   registers per thread, spills and stack (``ptxas -v``), shared memory (what a launch requests),
   programs per SM the register file allows at 4 warps, and the compile time.
2. **Bytes per call**: ``autosteer.kernels.aot.bytes_per_call`` for each model shape, rank and
   batch, in two steps -- a monitor step (every row probed, none latched) and a steering step
   (every row latched, none probed) -- with bf16 hidden states, fp32 logits and r-major U, the
   grid the launcher picks for the target's SM count (A100 108, H100 132), the bytes requested by
   the programs, the floor (each distinct byte once), their ratio, and the floor's time at the
   HBM bandwidth (A100 2039 GB/s, H100 3350 GB/s): what a measured kernel time is compared with.

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


def variant_rows(report: dict, arch: int) -> tuple[list[str], dict[str, int]]:
    vs = [v for v in report["variants"] if v["arch"] == arch]
    ids = {}
    lines = ["| id | hidden -> logits | r (BLOCK_R, t) | BLOCK_V | U layout | V % 16 | stacked probes | configs | "
             "registers | spills st/ld | stack/local | shared B | programs/SM | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, v in enumerate(vs):
        ids[v["key"]] = i
        c = v["constexprs"]
        odd = "v50257" in v["shapes"]
        path = f"{'/'.join(v['ranks'])} ({c['BLOCK_R']}, {'regs' if c['T_IN_REGS'] else 'scratch'})"
        programs = aot.programs_per_sm(v["regs"], v["num_warps"], v["shared"], arch)
        lines.append(
            f"| {i} | {'/'.join(v['hidden'])} -> {'/'.join(v['logits'])} | {path} | {c['BLOCK_V']} | "
            f"{'/'.join(v['layouts'])} | {'no' if odd else '0'} | {'yes' if v['row_probe'] == [True] else 'no'} | "
            f"{v['n_configs']} | {v['regs']} | {v['spill_stores']}/{v['spill_loads']} | {v['stack']}/{v['local']} | "
            f"{v['shared']} | {programs} | {v['compile_s']:.2f} |")
    return lines, ids


def bytes_rows(arch: int, ids: dict[str, int]) -> list[str]:
    lines = ["| shape (H, V) | r | B | splits S | BLOCK_V | variant | step | requested MB | floor MB | "
             "requested / floor | floor us |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, H, V in aot.SHAPES:
        for r in aot.RANKS:
            for B in BATCHES:
                c = aot.Config(name, H, V, r, "r-major", "bf16", "fp32", B=B)
                spec = aot.spec_for(c, arch)
                plan = spec.plan
                vid = ids.get(spec.key(), "?")
                for step, probed, latched in (("monitor, none latched", B, 0), ("steering, all latched", 0, B)):
                    b = aot.bytes_per_call(c, plan, probed=probed, latched=latched)
                    us = b["floor"] / (aot.HBM_GBPS[arch] * 1e3)
                    lines.append(f"| {name} ({H}, {V}) | {r} | {B} | {plan.num_splits} | {plan.block_v} | {vid} | "
                                 f"{step} | {_mb(b['requested'])} | {_mb(b['floor'])} | "
                                 f"{b['requested'] / b['floor']:.1f} | {us:.1f} |")
    return lines


def write(report: dict, arch: int, out_dir: Path, command: str) -> Path:
    vlines, ids = variant_rows(report, arch)
    vs = [v for v in report["variants"] if v["arch"] == arch]
    regs = [v["regs"] for v in vs]
    smem = [v["shared"] for v in vs]
    aligned = [v["regs"] for v in vs if "v50257" not in v["shapes"]]
    spills = sum(v["spill_stores"] + v["spill_loads"] + v["stack"] + v["local"] for v in vs)
    doc = [
        f"# steer_step kernel: AOT compile for sm_{arch} ({aot.GPU_NAME[arch]} planning), no GPU",
        "",
        f"Command: `{command}`",
        "",
        f"Written {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} with triton {report['triton']}; "
        f"{report['n_configs'] // len({v['arch'] for v in report['variants']})} call configurations per target "
        f"-> {len(vs)} compiled variants (`autosteer.kernels.aot`). Registers, stack frame and local memory: "
        "Triton's cubin (`cuobjdump --dump-resource-usage`); spill bytes: `ptxas -v` on the PTX with Triton's "
        "ptxas and flags wherever there is a stack or local memory (spills need one of them); shared "
        "memory: Triton's metadata (what the launch requests; the driver reserves 1 KB more per block). "
        f"4 warps per program. Compile times: cold Triton cache, {report['jobs']} processes, load average "
        f"{report['loadavg']:.1f} on {os.cpu_count()} CPUs at the start (other jobs slow them down).",
        "",
        f"**Summary:** registers {min(regs)}-{max(regs)} (vocabularies that are multiples of 16: "
        f"{min(aligned)}-{max(aligned)}), spill/stack/local bytes {spills}, shared memory {min(smem)}-{max(smem)} B "
        f"(limit {aot.SMEM_LIMIT[arch] // 1024} KB per block).",
        "",
        "## Variants",
        "",
        "`programs/SM`: how many 4-warp programs an SM holds (`autosteer.kernels.aot.programs_per_sm`: "
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
        "`autosteer.kernels.aot.bytes_per_call`: bf16 hidden states, fp32 logits, r-major fp32 U, F = 64, one "
        "probe, int64 rows; the launcher's grid for this target's SM count. `requested`: global-memory bytes "
        "the programs load and store (each of a row's S programs re-reads the probe weights W1 and, when "
        "latched, x/g and Bt; U and the logits are read once per latched row). `floor`: each distinct byte "
        f"once. `floor us`: floor / {aot.HBM_GBPS[arch]:.0f} GB/s.",
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
