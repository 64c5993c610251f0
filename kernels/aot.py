"""Ahead-of-time compiles of the ``steer_step`` kernels (probe, latch + t, blend: the three
launches of one call) for real GPU targets, on a machine without a GPU.

What serving can launch is enumerated from sizes and dtypes alone, then each distinct compiled
variant is built once for ``GPUTarget("cuda", 80 | 90, 32)`` and its resources are read back:

1. :func:`serving_configs`: the calls serving can make -- hidden sizes H in {576, 3584, 4096,
   8192} with their models' vocabularies (V up to 256k), rank r in {16, 64, full (r = H)}, both U
   layouts (``r-major``, what ``refusal_basis`` / ``SteerWeights.from_pack`` build, and
   ``row-major``), (hidden, logits) dtypes {bf16, fp16, fp32} x {fp32, same}, every flag
   (``nan_latches``, ``row_tau``, stacked probes with ``row_probe``, and ``state_rows``: the per-request
   tensors as slot tables, what the serving stores' decode steps pass). Plus one vocabulary that is
   not a multiple of 16 (less alignment, another variant), for r-major U; and probes reading several
   layers (``probe_extra``: 3 tensors with ``probe_sum=1``, 6 with ``probe_sum=2`` -- three layers'
   (hidden, residual) pairs) at H in {576, 3584}, r = 16, r-major U (the probe launch is the only one they
   change: ``N_PARTS`` / ``PROBE_SUM`` are its constexprs).
2. :func:`specs_for`: the call's arguments as ``meta`` tensors (real shapes, strides, dtypes and
   allocator alignment, no memory) go through the launcher's own ``launch_configs`` (and so
   ``plan_launch``), each of its launches through Triton's own binder for that target: the signature, constexprs
   and alignment attributes are exactly what ``kernel[grid](...)`` would compile on that GPU.
3. :func:`unique_variants` dedupes them (compiled code depends on dtypes, constexprs and the
   alignment/``== 1`` specialisation of integer and pointer arguments, not on sizes), and
   :func:`compile_variants` compiles each once (a process pool), reading registers, stack and
   local memory from Triton's cubin (``cuobjdump``), spill bytes from ``ptxas -v`` on the PTX (the
   ptxas and flags Triton used) wherever there is a stack or local memory, and shared memory from
   Triton's metadata (what a launch requests).

:func:`bytes_per_call` is the cost model of one call (see its docstring).
``python -m autosteer.kernels.aot --json out.json [--check]`` runs 1-3 (tests/test_aot.py does,
in a process without TRITON_INTERPRET); ``benchmarks/aot_resources.py`` writes the tables.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch

from . import steer_step as ks

ARCHS = (80, 90)
# per-block shared memory a kernel may use (cudaDevAttrMaxSharedMemoryPerBlockOptin)
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# the SM count of the GPU the launcher is planned for (A100 SXM, H100 SXM) and its HBM bandwidth
SM_COUNT = {80: 108, 90: 132}
HBM_GBPS = {80: 2039.0, 90: 3350.0}
GPU_NAME = {80: "A100-SXM4-80GB", 90: "H100-SXM5-80GB"}
REG_FILE = 65536  # 32-bit registers per SM, sm_80 and sm_90
MAX_WARPS_PER_SM = 64


def programs_per_sm(regs: int, num_warps: int = ks.NUM_WARPS, shared: int = 0, arch: int = 90) -> int:
    """Programs (CTAs) of ``num_warps`` warps one SM holds at ``regs`` registers per thread:
    registers are allocated per warp in units of 256, at most 64 warps and 32 CTAs per SM, and
    the shared memory per SM (the per-block limit plus the driver's 1 KB per block)."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = (REG_FILE // per_warp) // num_warps
    by_warps = MAX_WARPS_PER_SM // num_warps
    by_smem = (SMEM_LIMIT[arch] + 1024) // (shared + 1024)
    return min(by_regs, by_warps, 32, by_smem)

# (name, H, V): the hidden sizes serving must handle, with their models' vocabularies
SHAPES = (
    ("smollm2-135m", 576, 49152),
    ("qwen2-7b", 3584, 152064),
    ("llama3-8b", 4096, 128256),
    ("llama3-70b", 8192, 128256),
    ("v256k", 4096, 256000),  # a Gemma-size vocabulary
)
ODD_V_SHAPE = ("v50257", 4096, 50257)  # a vocabulary that is not a multiple of 16 (GPT-2's)
F_PROBE = 64  # the probe's hidden width (autosteer.method.fit default)
RANKS = (16, 64, "full")
MULTI_PARTS = ((3, 1), (6, 2))  # (probe input tensors, probe_sum): 3 layers, and 3 layers' (hidden, residual) pairs
LAYOUTS = ("r-major", "row-major")
# (hidden dtype, logits dtype): a model in bf16/fp16/fp32 with logits in fp32 (vLLM samples from
# fp32 logits, transformers' generate upcasts) or in the model's dtype
DTYPE_PAIRS = (("bf16", "fp32"), ("fp16", "fp32"), ("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"))
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NBYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclasses.dataclass(frozen=True)
class Config:
    """One call serving can make (sizes, dtypes, layout, flags)."""

    shape: str
    H: int
    V: int
    r: int | str  # 16, 64 or "full" (r = H, Bt = I)
    layout: str  # U: "r-major" ([r, V] memory viewed as [V, r]) or "row-major" ([V, r] contiguous)
    hidden: str  # probe_hidden / head_hidden dtype
    logits: str
    nan_latches: bool = False
    row_tau: bool = False
    row_probe: bool = False  # stacked probes W1 [2, F, H] with an int32 probe index per row
    state_rows: bool = False  # per-request tensors as slot tables [S = 4 B] addressed through state_rows (slot steps)
    B: int = 8
    F: int = F_PROBE
    rows: str = "int64"  # probe_rows / head_rows dtype (the integrations pass int64)
    parts: int = 1  # probe input tensors (probe_hidden + probe_extra)
    probe_sum: int = 1  # parts summed per layer (2: a layer's (hidden, residual) pair)

    @property
    def R(self) -> int:
        return self.H if self.r == "full" else int(self.r)

    @property
    def layers(self) -> int:
        return self.parts // self.probe_sum

    def label(self) -> str:
        flags = "".join(c for c, on in (("n", self.nan_latches), ("t", self.row_tau), ("p", self.row_probe),
                                        ("s", self.state_rows)) if on)
        rows = "" if self.rows == "int64" else f" rows={self.rows}"
        parts = "" if self.parts == 1 else f" parts={self.parts}/sum{self.probe_sum}"
        return f"{self.shape} r={self.r} {self.layout} {self.hidden}->{self.logits}{rows}{parts} flags={flags or '-'}"


def serving_configs(B: int = 8) -> list[Config]:
    """Every call configuration the integrations can make (see the module docstring)."""
    out = []
    flags = [(n, t, p, s) for n in (False, True) for t in (False, True) for p in (False, True) for s in (False, True)]
    for shape, H, V in SHAPES + (ODD_V_SHAPE,):
        layouts = ("r-major",) if shape == ODD_V_SHAPE[0] else LAYOUTS
        for r in RANKS:
            for layout in layouts:
                for hidden, logits in DTYPE_PAIRS:
                    for n, t, p, s in flags:
                        out.append(Config(shape, H, V, r, layout, hidden, logits, n, t, p, s, B=B))
    for shape, H, V in SHAPES[:2]:  # probes reading several layers (the probe launch's N_PARTS / PROBE_SUM)
        for parts, probe_sum in MULTI_PARTS:
            for hidden, logits in DTYPE_PAIRS:
                for n, t, p, s in flags:
                    out.append(Config(shape, H, V, 16, "r-major", hidden, logits, n, t, p, s, B=B, parts=parts,
                                      probe_sum=probe_sum))
    return out


def interpreter_size_configs() -> list[Config]:
    """Not serving calls: the interpreter tests' odd sizes (H=96, V=1000, r in {8, 16, 64, full},
    int32 rows), compiled too, to catch typing and lowering errors the interpreter does not see."""
    return [Config("test-size", 96, 1000, 16, "row-major", "fp16", "fp16"),
            Config("test-size", 96, 1000, 64, "row-major", "bf16", "bf16", True, True, rows="int32"),
            Config("test-size", 96, 1000, "full", "row-major", "fp32", "fp32"),
            Config("test-size", 96, 1000, 8, "r-major", "fp16", "fp16", False, True, True, rows="int32")]


def meta_args(c: Config, device: str = "meta") -> tuple:
    """The call's positional arguments (as ``steer_step``) on ``device``: the layouts serving
    builds (contiguous hidden rows and logits, [B] state vectors, fp32 weights, U fp32)."""
    f32, hd = torch.float32, DTYPES[c.hidden]
    B, H, V, F, R = c.B, c.H, c.V, c.F, c.R
    e = lambda *s, dt=f32: torch.empty(*s, dtype=dt, device=device)  # noqa: E731
    rows = e(B, dt={"int64": torch.int64, "int32": torch.int32}[c.rows])
    P = (2,) if c.row_probe else ()
    U = e(R, V).t() if c.layout == "r-major" else e(V, R)
    S = 4 * B if c.state_rows else B  # per-request tensors: one per row, or slot tables (a store's 4 B default)
    args = (e(2 * B, H, dt=hd), rows, e(S, dt=torch.bool), e(2 * B, H, dt=hd), rows, e(B, V, dt=DTYPES[c.logits]),
            e(S, dt=torch.bool), e(S), e(*P, F, c.layers * H), e(*P, F), e(*P, F), e(P[0] if P else 1), U, e(R, H),
            0.5, 0.1, c.nan_latches)
    tail = ()
    multi = c.parts > 1
    if c.row_tau or c.row_probe or c.state_rows or multi:
        tail = (e(S) if c.row_tau else None,)
    if c.row_probe or c.state_rows or multi:
        tail += (e(S, dt=torch.int32) if c.row_probe else None,)
    if c.state_rows or multi:
        tail += (e(B, dt=torch.int64) if c.state_rows else None,)
    if multi:  # the other parts: each [2 B, H] in the hidden dtype (as probe_hidden)
        tail += ([e(2 * B, H, dt=hd) for _ in range(c.parts - 1)], c.probe_sum)
    return args + tail


@dataclasses.dataclass
class Spec:
    """What Triton compiles for one call on one target."""

    arch: int
    kernel: str  # "probe", "latch" or "blend" (steer_step.KERNELS)
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    plan: ks.LaunchPlan

    def key(self) -> str:
        """Identity of the compiled variant (sizes and grid excluded)."""
        return json.dumps([self.arch, self.kernel, sorted(self.signature.items()), sorted((str(k), repr(v)) for k, v in
                                                                              self.constexprs.items()),
                           sorted((str(k), repr(v)) for k, v in self.attrs.items()),
                           sorted((k, repr(v)) for k, v in self.options.items())])


def _target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


_BINDERS: dict = {}


def _binder(arch: int, kernel: str):
    """Triton's own argument binder and backend for ``kernel`` on ``arch`` (what ``kernel.run`` uses)."""
    if (arch, kernel) not in _BINDERS:
        from triton.compiler.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        k = _jit_kernel(kernel)
        backend = make_backend(_target(arch))
        _BINDERS[arch, kernel] = (backend, create_function_from_signature(k.signature, k.params, backend))
    return _BINDERS[arch, kernel]


def _jit_kernel(kernel: str = "blend"):
    if ks.interpreting():
        raise RuntimeError("autosteer.kernels.aot compiles for GPU targets: run it without TRITON_INTERPRET=1 "
                           "(triton was imported in interpreter mode)")
    return ks.KERNELS[kernel]


def _run_kwargs(k, meta: dict) -> dict:
    """The keyword arguments ``JITFunction.run`` adds before binding (they only shape options)."""
    from triton import knobs

    kw = dict(meta)
    kw["debug"] = kw.get("debug", k.debug) or knobs.runtime.debug
    for name, src in (("instrumentation_mode", "compilation"), ("fpsan_homomorphic_casts", "compilation")):
        if hasattr(getattr(knobs, src), name):
            kw[name] = getattr(getattr(knobs, src), name)
    return kw


def plan_for(c: Config, arch: int) -> ks.LaunchPlan:
    """The launcher's plan for call ``c`` on ``arch`` (``SM_COUNT[arch]`` SMs)."""
    return ks.plan_launch(c.B, c.V, c.H, c.F, c.R, sm_count=SM_COUNT[arch])


def specs_for(c: Config, arch: int, args: tuple | None = None) -> list[Spec]:
    """The launcher's launches for call ``c`` (planned for ``SM_COUNT[arch]`` SMs), each
    specialised by Triton's binder for the ``arch`` target. ``args``: other call arguments (real
    tensors, say) instead of ``meta_args(c)``; the plan then follows their sizes."""
    args = meta_args(c) if args is None else args
    (B, V), H, F, R = args[5].shape, args[0].shape[1], args[8].shape[-2], args[12].shape[1]
    plan = ks.plan_launch(B, V, H, F, R, sm_count=SM_COUNT[arch])
    out = []
    for ln in ks.launch_configs(*args, sm_count=SM_COUNT[arch]):
        k = _jit_kernel(ln.name)
        backend, binder = _binder(arch, ln.name)
        kwargs = _run_kwargs(k, ln.meta)
        bound, specialization, options = binder(*ln.args, **kwargs)
        options, signature, constexprs, attrs = k._pack_args(backend, kwargs, bound, specialization, options)
        out.append(Spec(arch, ln.name, signature, constexprs, attrs, dict(options.__dict__), plan))
    return out


def spec_for(c: Config, arch: int, kernel: str = "blend", args: tuple | None = None) -> Spec:
    """The spec of one of call ``c``'s launches (``kernel``: "probe", "latch" or "blend")."""
    return next(s for s in specs_for(c, arch, args) if s.kernel == kernel)


def unique_variants(configs: list[Config], archs=ARCHS) -> dict[str, tuple[Spec, list[Config]]]:
    """{variant key: (spec, the configs that launch it)}, in first-seen order (kernel by kernel)."""
    out: dict[str, tuple[Spec, list[Config]]] = {}
    for arch in archs:
        for c in configs:
            for s in specs_for(c, arch):
                out.setdefault(s.key(), (s, []))[1].append(c)
    return out


# ----------------------------------------------------------------------------- compile
_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def ptxas_resources(ptx: str, arch: int) -> dict:
    """Registers, stack frame and spills of ``ptx`` from ``ptxas -v`` (Triton's ptxas for ``arch``,
    with the flags Triton's ``make_cubin`` passes)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.path.join(d, "k.cubin")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    out = {}
    for name, rx in _PTXAS_RE.items():
        m = rx.search(log)
        if m is None:
            raise RuntimeError(f"ptxas -v printed no {name!r}:\n{log}")
        out[name] = int(m.group(1))
    return out


def cubin_resources(cubin: bytes) -> dict | None:
    """REG, STACK and LOCAL of the kernel in Triton's own cubin (``cuobjdump --dump-resource-usage``),
    or None when cuobjdump is unavailable."""
    try:
        from triton import knobs

        tool = knobs.nvidia.cuobjdump.path
    except Exception:  # noqa: BLE001 - optional: ptxas -v is the fallback
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    return dict(regs=int(m.group(1)), stack=int(m.group(2)), local=int(m.group(3))) if m else None


def compile_spec(spec: Spec, verify: bool = False) -> dict:
    """Compile one variant for its target; its resources (and the compile time).

    Registers, stack and local memory come from Triton's cubin; spills need a stack frame or local
    memory, so where both are 0 there are none, and only otherwise (or with ``verify``, or without
    cuobjdump) ``ptxas -v`` is run on the PTX for the spill bytes (``ptxas_regs``: its count)."""
    import triton
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    src = ASTSource(_jit_kernel(spec.kernel), spec.signature, spec.constexprs, spec.attrs)
    ck = triton.compile(src, target=_target(spec.arch), options=spec.options)
    seconds = time.perf_counter() - t0
    res = cubin_resources(ck.asm["cubin"])
    out = dict(regs=None, stack=None, local=None, spill_stores=0, spill_loads=0, ptxas_regs=None)
    if res is not None:
        out.update(res)
    if res is None or verify or res["stack"] or res["local"]:
        px = ptxas_resources(ck.asm["ptx"], spec.arch)
        out.update(spill_stores=px["spill_stores"], spill_loads=px["spill_loads"], ptxas_regs=px["regs"])
        if res is None:
            out.update(regs=px["regs"], stack=px["stack"], local=0)
    return dict(out, shared=int(ck.metadata.shared), num_warps=int(ck.metadata.num_warps),
                compile_s=round(seconds, 3), ptx_stores=ck.asm["ptx"].count("st.global"))


def _compile_job(job: tuple) -> dict:
    return compile_spec(*job)


def compile_variants(specs: list[Spec], jobs: int | None = None) -> list[dict]:
    """Compile each spec (a process pool of ``jobs`` workers, default the CPU count); the first
    variant of each target is also checked with ``ptxas -v`` (``ptxas_regs``)."""
    first = {}
    for i, s in enumerate(specs):
        first.setdefault(s.arch, i)
    work = [(s, i in first.values()) for i, s in enumerate(specs)]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(specs)))
    if jobs == 1:
        return [_compile_job(w) for w in work]
    with ProcessPoolExecutor(jobs, mp_context=get_context("fork")) as pool:
        return list(pool.map(_compile_job, work))


# ----------------------------------------------------------------------------- cost model
# Not measured: assumptions of the time estimate, to be replaced by what a GPU measures.
L2_GBPS = {80: 4000.0, 90: 7000.0}  # L2 -> SM bandwidth the scratch and weight re-reads are served at
TF32_TFLOPS = {80: 156.0, 90: 494.0}  # dense tf32 tensor-core peak (A100 SXM, H100 SXM)
LAUNCH_US = 1.0  # one dependent launch on a stream (inside a CUDA graph): drain + start


def _old_design_requested(c: Config, arch: int, probed: int, latched: int) -> int:
    """Bytes the previous single-launch design (grid ``B x S``: every vocabulary split re-ran the
    probe and ``t = Bt g``, each latched row streamed U itself) requested, with its own plan rule
    (~4 waves, >= 8 U tiles of 4096 elements per program). Kept to compare the designs."""
    H, V, F, R, B = c.H, c.V, c.F, c.R, c.B
    hb, lb = NBYTES[c.hidden], NBYTES[c.logits]
    in_regs = R <= 64
    block_r = max(16, 1 << (R - 1).bit_length()) if in_regs else 64
    block_v = 256 if block_r <= 16 else (128 if block_r <= 32 else (32 if in_regs else 64))
    n_blocks = -(-V // block_v)
    min_blocks = 8 * max(1, 4096 // (block_v * block_r))
    S = max(1, min(max(1, n_blocks // min_blocks), max(1, -(-4 * SM_COUNT[arch] // max(B, 1)))))
    bps = -(-n_blocks // S)
    extra = 4 * (c.row_tau + c.row_probe)
    probe_prog = 8 + c.parts * H * hb + F * c.layers * H * 4 + 2 * F * 4 + 4 + extra
    head_prog = 8 + H * hb + R * H * 4 + (0 if in_regs else R * 4 + bps * R * 4)
    return 2 * B * S + probed * (S * probe_prog + 5) + latched * (S * head_prog + V * R * 4 + 2 * V * lb)


def bytes_per_call(c: Config, plan: ks.LaunchPlan, *, probed: int, latched: int, arch: int = 90) -> dict:
    """Bytes one call moves, for ``probed`` rows probed and ``latched`` rows latched (after the
    probe) out of ``c.B``, with the launcher's ``plan``; the probed and the latched rows are each
    taken to fill row blocks of 16 from the first (serving's batches are dense).

    - ``floor``: each distinct byte once -- the flags, ``x`` (its ``c.parts`` tensors' rows: k x H, or
      2 k x H for (hidden, residual) pairs) / ``g`` of each row, one W1 (``F x k H``)/b1/w2/b2 per
      probe in use (two with stacked probes), Bt and U once if any row is latched, the latched
      rows' logits read and written. ``floor`` over the HBM bandwidth is the time bound.
    - ``dram``: what this design reads from and writes to memory once (its first touch of each
      byte): the floor plus its fp32 scratch (the probe's partial sums, ``t``) written and read
      once, and -- only for the chunked path (r > 64, or 16 < r <= 64 over a vocabulary that is not
      a multiple of 16) -- U once per row block holding a latched row.
    - ``rereads``: what its programs load again from L2 (a few MB at most, all of it written or
      read earlier in the same call): W1 per row block of probed rows, the partial sums, ``b1`` /
      ``w2`` and ``g`` per rank slice of launch 2, Bt per row block of latched rows, ``t`` and the
      flags per vocabulary tile.
    - ``requested = dram + rereads``; ``old``: what the previous single-launch design requested.
    - ``est_us``: ``dram`` at the HBM bandwidth + ``rereads`` at ``L2_GBPS`` + the blend's tf32x3
      tensor-core time where it is larger than its memory time + ``LAUNCH_US`` per launch (3);
      ``floor_us``: the floor at the HBM bandwidth. Assumptions, not measurements.

    Index entries are 8 B (int64); 32-byte sector granularity is ignored (the large reads are
    contiguous runs).
    """
    H, V, F, R, B = c.H, c.V, c.F, c.R, c.B
    hb, lb, idx = NBYTES[c.hidden], NBYTES[c.logits], 8
    extra = 4 * (c.row_tau + c.row_probe)
    n_probes = (2 if c.row_probe else 1) if probed else 0
    w_probe = F * c.layers * H * 4 + 2 * F * 4 + 4
    floor = (2 * B + probed * (idx + c.parts * H * hb + extra + 5) + n_probes * w_probe
             + latched * (idx + H * hb + 2 * V * lb) + (R * H * 4 + V * R * 4 if latched else 0))
    rb = plan.row_blocks
    rb_p, rb_l = -(-probed // ks.BLOCK_B), -(-latched // ks.BLOCK_B)
    S, RS = plan.h_splits, plan.r_splits
    part = probed * S * F * 4
    t_bytes = latched * R * 4
    dram = floor + 2 * part + 2 * t_bytes
    if not plan.u_in_regs and rb_l > 1:
        dram += (rb_l - 1) * V * R * 4
    rereads = (rb * S * 16  # launch 1: the probe flags
               + max(0, rb_p * n_probes - n_probes) * F * c.layers * H * 4  # W1 once per row block
               + rb * RS * 2 * 16  # launch 2: flags
               + (RS - 1) * (part + probed * (idx + 2 * F * 4 + 4 + extra))  # each rank slice re-finalises
               + (RS - 1) * latched * (idx + H * hb)  # ... and reads g for its slice
               + max(0, rb_l - 1) * R * H * 4)  # Bt once per row block
    if latched:
        tiles = plan.n_tiles
        rereads += plan.blend_programs * B + tiles * rb_l * 16 * (1 + idx)  # the any-check; per tile: flags
        rereads += tiles * t_bytes  # t per tile
    else:
        rereads += plan.blend_programs * B  # the any-check, then every blend program returns
    hbm = HBM_GBPS[arch] * 1e3  # bytes per us
    blend_mem_us = (latched * 2 * V * lb + (V * R * 4 if latched else 0)) / hbm
    blend_tc_us = (2 * 3 * ks.BLOCK_B * rb_l * V * R) / (TF32_TFLOPS[arch] * 1e6) if latched else 0.0
    est = dram / hbm + rereads / (L2_GBPS[arch] * 1e3) + max(0.0, blend_tc_us - blend_mem_us) + 3 * LAUNCH_US
    return dict(requested=dram + rereads, dram=dram, rereads=rereads, floor=floor,
                old=_old_design_requested(c, arch, probed, latched), est_us=est, floor_us=floor / hbm,
                blend_tc_us=blend_tc_us, blend_mem_us=blend_mem_us)


# ----------------------------------------------------------------------------- command line
def meta_matches_real(configs: list[Config], arch: int = 90) -> list[tuple[str, bool]]:
    """For each call: do ``meta`` tensors give the variant real CPU allocations give (CPU blocks
    are 64-byte aligned, CUDA's 512-byte: both 16-byte aligned)?"""
    return [(c.label(), [s.key() for s in specs_for(c, arch)]
             == [s.key() for s in specs_for(c, arch, args=meta_args(c, device="cpu"))]) for c in configs]


CHECK_CONFIGS = (Config("small", 576, 4096, 16, "r-major", "bf16", "fp32", True, True, True),
                 Config("small", 576, 4097, 64, "row-major", "fp16", "fp16"),
                 Config("small", 96, 1000, "full", "r-major", "fp32", "bf16", False, True, False, rows="int32"))


def run(archs=ARCHS, jobs: int | None = None, configs: list[Config] | None = None,
        extra: list[Config] = (), check: bool = False) -> dict:
    """Enumerate, dedupe, compile: a JSON-able report. ``configs``: the serving calls (default
    :func:`serving_configs`); ``extra``: more calls, compiled as well but marked ``serving: false``
    unless they share a serving variant; ``check``: also report :func:`meta_matches_real`."""
    t0 = time.perf_counter()
    configs = serving_configs() if configs is None else list(configs)
    serving = set(configs)
    uniq = unique_variants(configs + list(extra), archs)
    checks = dict(meta_matches_real=meta_matches_real(list(CHECK_CONFIGS))) if check else {}
    t_enum = time.perf_counter() - t0
    specs = [s for s, _ in uniq.values()]
    results = compile_variants(specs, jobs)
    variants = []
    for (key, (spec, cs)), res in zip(uniq.items(), results):
        variants.append(dict(
            arch=spec.arch, kernel=spec.kernel, key=key, serving=any(c in serving for c in cs), configs=[c.label() for c in cs],
            n_configs=len(cs), hidden=sorted({c.hidden for c in cs}), logits=sorted({c.logits for c in cs}),
            ranks=sorted({str(c.r) for c in cs}), layouts=sorted({c.layout for c in cs}),
            shapes=sorted({c.shape for c in cs}), row_probe=sorted({c.row_probe for c in cs}),
            state_rows=sorted({c.state_rows for c in cs}), parts=sorted({(c.parts, c.probe_sum) for c in cs}),
            constexprs={spec_name(k, spec.kernel): v for k, v in spec.constexprs.items()},
            pointers={k: v for k, v in spec.signature.items() if v.startswith("*")},
            aligned=sorted(spec_name(k, spec.kernel) for k, v in spec.attrs.items() if v), **res))
    return dict(triton=_triton_version(), n_configs=len(configs) * len(archs), enumerate_s=round(t_enum, 2),
                compile_s=round(time.perf_counter() - t0 - t_enum, 2), variants=variants, **checks)


def spec_name(path, kernel: str = "blend") -> str:
    """The argument name of ``kernel`` for a Triton argument path such as ``(12,)``."""
    names = ks.KERNELS[kernel].arg_names
    return names[path[0]] if isinstance(path, tuple) and len(path) == 1 else str(path)


def _triton_version() -> str:
    import triton

    return triton.__version__


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="AOT-compile every steer_step variant serving can launch; JSON report")
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPU count)")
    p.add_argument("--json", default="-", help="output file (default stdout)")
    p.add_argument("--check", action="store_true",
                   help="also compile the interpreter tests' odd sizes and check meta tensors against real ones")
    a = p.parse_args(argv)
    report = run(tuple(a.arch), a.jobs, extra=interpreter_size_configs() if a.check else (), check=a.check)
    text = json.dumps(report, indent=1, default=str)
    if a.json == "-":
        print(text)
    else:
        with open(a.json, "w") as f:
            f.write(text)
        print(f"{len(report['variants'])} variants from {report['n_configs']} configurations: enumerate "
              f"{report['enumerate_s']} s, compile {report['compile_s']} s -> {a.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
