"""Ahead-of-time compiles of the Triton kernels for real GPU targets (sm_80, sm_90), without a GPU.

Every variant of the three launches of a call (probe, latch + t, blend) serving can launch (``autosteer.kernels.aot``: sizes H in {576, 3584, 4096,
8192} with V up to 256k, r in {16, 64, full}, both U layouts, (hidden, logits) dtypes, every
flag, and probes reading three layers -- three tensors, or three (hidden, residual) pairs), derived through the launcher's own ``launch_configs`` / ``plan_launch`` and Triton's own
argument binder, deduplicated and compiled once per target. The checks:

- no spills, no stack frame, no local memory (Triton's cubin; ``ptxas -v`` wherever there is any);
- registers <= 255 (the hardware limit) and tighter bounds. ``REG_BOUND`` = 128 for every serving
  variant (its tf32x3 dots split each operand in two): at least 4 programs of 4 warps, or 2 of 8,
  per SM. ``REG_BOUND_BLEND_R16`` = 72 for the blend with r <= 16 over a vocabulary that is a
  multiple of 16 (the common serving case, and the launch with thousands of programs, where
  occupancy hides latency): 7 programs of 4 warps per SM. ``REG_BOUND_UNALIGNED`` = 160 where V is
  not a multiple of 16 (blend only: logit rows and r-major U columns are then not 16-byte aligned,
  every element is a scalar load with its own 64-bit address);
- shared memory within the per-block limit (163 KB sm_80, 227 KB sm_90) and <= 16 KB, so shared
  memory never limits occupancy below 8 programs per SM (8 x 17 KB < 164 KB);
- the run-time flags really do not multiply compiled variants, and ``meta`` tensors specialise
  like real allocations.

Compiles run in a subprocess without TRITON_INTERPRET (tests/conftest.py sets it for this
process), once per module (fixture), on all CPU cores. Marker: ``aot``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

pytestmark = pytest.mark.aot

REPO = Path(__file__).resolve().parents[1]
REG_BOUND = 128
REG_BOUND_BLEND_R16 = 72
REG_BOUND_UNALIGNED = 160
ODD_V = "v50257"  # autosteer.kernels.aot.ODD_V_SHAPE
SMEM_BOUND = 16 * 1024
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _run(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia")
    return subprocess.run([sys.executable, *args], env=_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The JSON report of ``python -m autosteer.kernels.aot`` (every serving variant, sm_80 + sm_90)."""
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    proc = _run(["-m", "autosteer.kernels.aot", "--check", "--json", str(out)], timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rep = json.loads(out.read_text())
    print(proc.stderr.strip().splitlines()[-1])
    return rep


def _bad(variants, pred) -> list[str]:
    return [f"sm_{v['arch']} {v['configs'][0]} (+{v['n_configs'] - 1}): regs {v['regs']} spills "
            f"{v['spill_stores']}/{v['spill_loads']} stack {v['stack']} local {v['local']} smem {v['shared']}"
            for v in variants if pred(v)]


def _serving(report) -> list[dict]:
    return [v for v in report["variants"] if v["serving"]]


def test_every_serving_variant_compiles_for_sm80_and_sm90(report):
    variants = _serving(report)
    by_arch = defaultdict(list)
    for v in variants:
        by_arch[v["arch"]].append(v)
    assert sorted(by_arch) == [80, 90]
    # the same variants per arch. probe: 3 hidden dtypes x 2 probe modes x 3 probe inputs (probe_hidden alone; 3
    # layers; 3 layers' (hidden, residual) pairs: N_PARTS / PROBE_SUM); latch + t: 3 hidden dtypes x 2 probe modes x 2 rank
    # slice widths (16 for r <= 16, else 32); blend: 3 logits dtypes x 3 rank paths (r=16 and r=64 with
    # the U tile held, the chunked full rank) x 2 U layouts, plus, for the vocabulary that is not a
    # multiple of 16 (r-major only), 3 logits dtypes x 2 paths (r=16 held; r=64 and full chunked)
    count = lambda vs, k: sum(v["kernel"] == k for v in vs)  # noqa: E731
    for arch, vs in by_arch.items():
        # ... each twice: with and without state_rows (HAS_STATE_ROWS, serving's slot steps)
        assert (count(vs, "probe"), count(vs, "latch"), count(vs, "blend")) == (2 * 18, 24, 2 * (18 + 6)), arch
        assert sum(v["constexprs"]["HAS_STATE_ROWS"] for v in vs) == len(vs) // 2, arch
        for kernel in ("probe", "latch"):
            seen = {(tuple(v["hidden"]), tuple(v["row_probe"])) for v in vs if v["kernel"] == kernel}
            assert seen == {((h,), (p,)) for h in ("bf16", "fp16", "fp32") for p in (False, True)}, (arch, kernel)
        parts = lambda v: (v["constexprs"].get("N_PARTS", 1), v["constexprs"].get("PROBE_SUM", 1))  # noqa: E731
        probes = [v for v in vs if v["kernel"] == "probe"]
        for mode in ((1, 1), (3, 1), (6, 2)):  # each probe input selects its own probe variants ...
            assert sum(parts(v) == mode for v in probes) == 12, (arch, mode)
        assert all(v["parts"] == [list(parts(v))] for v in probes), arch
        for v in vs:  # ... and no latch or blend variant (those launches never read the probe's input)
            if v["kernel"] != "probe":
                assert "N_PARTS" not in v["constexprs"] and [1, 1] in v["parts"], (arch, v["kernel"], v["parts"])
        seen = {(tuple(v["logits"]), v["constexprs"]["BLOCK_R"], v["constexprs"]["U_IN_REGS"], tuple(v["layouts"]))
                for v in vs if v["kernel"] == "blend"}
        for logits in ("fp32", "bf16", "fp16"):
            for block_r, in_regs in ((16, True), (64, True), (64, False)):
                for layout in ("r-major", "row-major"):
                    assert ((logits,), block_r, in_regs, (layout,)) in seen, (arch, logits, block_r, in_regs, layout)
    assert all(v["ptx_stores"] > 0 for v in variants), "a variant compiled to PTX without global stores"
    for kernel in ("probe", "latch", "blend"):
        n_configs = sum(sum(not c.startswith("test-size") for c in v["configs"]) for v in variants
                        if v["kernel"] == kernel)  # (a test size may share a serving variant)
        assert n_configs == report["n_configs"], f"every enumerated configuration maps to exactly one {kernel} variant"
    assert all(not v["serving"] for v in report["variants"] if v["shapes"] == ["test-size"])


def test_no_spills_no_stack(report):
    bad = _bad(report["variants"], lambda v: v["spill_stores"] or v["spill_loads"] or v["stack"] or v["local"])
    assert not bad, "variants with spills, a stack frame or local memory:\n" + "\n".join(bad)


def test_ptxas_agrees_with_tritons_cubin(report):
    """``ptxas -v`` on the PTX (Triton's ptxas and flags) counts the registers Triton's cubin has:
    the spill numbers it gives are of the same binary (checked on one variant per target)."""
    checked = [v for v in report["variants"] if v["ptxas_regs"] is not None]
    assert {v["arch"] for v in checked} == {80, 90}
    bad = [(v["arch"], v["configs"][0], v["regs"], v["ptxas_regs"]) for v in checked if v["regs"] != v["ptxas_regs"]]
    assert not bad, bad


def test_register_bound(report):
    assert max(v["regs"] for v in report["variants"]) <= 255  # test sizes included
    serving = _serving(report)
    regs = [v["regs"] for v in serving]
    unaligned = lambda v: ODD_V in v["shapes"]  # noqa: E731
    blend = [v for v in serving if v["kernel"] == "blend"]
    assert all(unaligned(v) == (v["shapes"] == [ODD_V]) for v in blend), "V % 16 selects the blend variant"
    bad = _bad(serving, lambda v: v["regs"] > REG_BOUND and not unaligned(v))
    assert not bad, f"over {REG_BOUND} registers:\n" + "\n".join(bad)
    bad = _bad(blend, lambda v: v["regs"] > REG_BOUND_BLEND_R16 and v["constexprs"]["BLOCK_R"] == 16
               and not unaligned(v))
    assert not bad, f"blend r <= 16 over {REG_BOUND_BLEND_R16} registers:\n" + "\n".join(bad)
    bad = _bad(serving, lambda v: v["regs"] > REG_BOUND_UNALIGNED)
    assert not bad, f"over {REG_BOUND_UNALIGNED} registers:\n" + "\n".join(bad)
    for k in ("probe", "latch", "blend"):
        r = [v["regs"] for v in serving if v["kernel"] == k]
        print(f"{k}: registers {min(r)}-{max(r)}")
    print(f"registers {min(regs)}-{max(regs)}")


def test_shared_memory_within_sm_limit(report):
    bad = _bad(report["variants"], lambda v: v["shared"] > SMEM_LIMIT[v["arch"]])
    assert not bad, "over the per-block shared memory limit:\n" + "\n".join(bad)
    bad = _bad(report["variants"], lambda v: v["shared"] > SMEM_BOUND)
    assert not bad, f"over {SMEM_BOUND} B of shared memory:\n" + "\n".join(bad)


def test_runtime_flags_do_not_multiply_variants(report):
    """nan_latches and row_tau are run-time scalars: every variant serves both values of each."""
    for v in _serving(report):
        labels = v["configs"]
        for flag in ("n", "t"):
            with_flag = [c for c in labels if flag in c.split("flags=")[1]]
            assert with_flag and len(with_flag) < len(labels), (v["arch"], v["kernel"], flag, labels[:4])
        if v["kernel"] == "blend":  # the blend never reads the probe weights or indices
            assert v["row_probe"] == [False, True], (v["arch"], labels[:4])
        else:
            assert len(v["row_probe"]) == 1, "stacked probes select their own variant (row_probe's pointer type)"


def test_meta_tensors_specialise_like_real_allocations(report):
    """The enumeration's ``meta`` tensors give the signature, constexprs and alignment real
    (CPU-allocated) tensors give, for aligned and unaligned vocabularies and int32 rows."""
    checks = report["meta_matches_real"]
    assert len(checks) == 3 and all(ok for _, ok in checks), checks


def test_interpreter_test_sizes_compile(report):
    """The interpreter tests' odd sizes (r=8, H=96, int32 rows, full rank) compile for both
    targets without spills: typing and lowering errors the interpreter does not see."""
    extra = [v for v in report["variants"] if not v["serving"]]
    assert {v["arch"] for v in extra} == {80, 90} and len(extra) >= 6, len(extra)
    bad = _bad(extra, lambda v: v["spill_stores"] or v["spill_loads"] or v["stack"] or v["local"] or v["regs"] > 255
               or not v["ptx_stores"])
    assert not bad, bad
