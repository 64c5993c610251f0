"""Fused Triton kernel for the per-decode-step AutoSteer work (gather + probe + latch + blend).

The contract is ``autosteer.runtime.reference_op.steer_step_reference``; for every sequence
``b`` of the batch the kernel computes, in ONE launch:

1. ``x = probe_hidden[probe_rows[b]]``, and where ``probe_mask[b]``:
   ``p = sigmoid(w2 . relu(W1 x + b1) + b2)`` (fp32 accumulation), ``p_out[b] = p``,
   ``latched[b] |= (p > tau_b) or (nan_latches and isnan(p))``, ``tau_b = row_tau[b]`` when the
   optional fp32 ``[B]`` per-row thresholds are given, else the scalar ``tau``; with stacked
   probe weights (``W1 [P, F, H]``, ``b1``/``w2 [P, F]``, ``b2 [P]``) the probe of row ``b`` is
   ``row_probe[b]`` (one index load per probed row; a value outside ``[0, P)`` -- which the CPU
   paths reject -- gives ``p = NaN``, so the row follows the NaN policy instead of being scored
   by some other probe);
2. where ``latched[b]`` (after step 1), in place:
   ``logits[b] = (1 + eps) * logits[b] + eps * U (Bt g)``, ``g = head_hidden[head_rows[b]]``,
   in fp32, cast back to the logits' dtype. Rows that end up unlatched get no logits writes.

Work split. The grid is ``(B, n_splits)``: program ``(b, s)`` owns batch row ``b`` and the
contiguous run of ``blocks_per_split`` vocabulary blocks (``BLOCK_V`` entries each) starting at
block ``s * blocks_per_split``. Why:

- Rows are independent, so the row is the natural first axis; a single program per row would
  leave most SMs idle at small batch (decode with B=1..8 and V=150k), hence the vocab splits,
  chosen so that ``B * n_splits`` is a few waves of the GPU but each program still streams
  several blocks (the per-program fixed cost below is then amortised).
- The probe is tiny (F x H, F=64) next to the blend (V x r per latched row), so instead of a
  second launch or a grid-wide barrier every program of row ``b`` recomputes the probe when
  ``probe_mask[b]`` is set. The computation is deterministic (same code, data and reduction
  order), so all programs of a row agree on the latch decision. Only program ``s == 0`` stores
  ``p_out[b]`` and ``latched[b]``; the others may read ``latched[b]`` before or after that store,
  which is harmless because the update is a monotone OR of the same ``fire`` bit.
- An unlatched row's programs stop after the probe (or after reading two bytes when the row
  is not probed): zero logits traffic for the common benign case.
- A latched row's program computes ``t = Bt g`` (r x H, fp32) itself, then for each of its
  vocabulary blocks loads a ``[BLOCK_V, r]`` tile of U, forms ``U t`` and blends. For r <= 64
  ``t`` lives in registers; for larger r (the full-S case ``Bt = I``) it is written to a
  per-program fp32 scratch row and read back in chunks after a block barrier.

Costs (not measured on a GPU yet): a latched row moves V logits in and out and reads V x r of
U (shared between rows through L2); a probed row costs each of its ``n_splits`` programs an
F x H read of W1 (from L2), which is why each program streams at least 8 U tiles of 4096
elements (splits <= ``V BLOCK_R / 32768``). The bytes model
is ``autosteer.kernels.aot.bytes_per_call``. Tiles are 32 x 64 (probe) and 256 x 16, 128 x 32,
32 x 64 or (r > 64) 64 x 64 (U).
Resources, from ahead-of-time compiles of every variant serving can launch for sm_80 and sm_90
(``tests/test_aot.py``; tables in ``benchmarks/results/aot_sm{80,90}.md``; triton 3.9, 4 warps per
program): no spills, no stack, 64 B-2 KB of shared memory (reduction scratch), and 44-64 registers
per thread (sm_80 52-64, sm_90 44-60) wherever the vocabulary is a multiple of 16, so 8 or more
programs fit an SM's register file; up to 80 (sm_80) / 72 (sm_90) where it is not (logit rows and
r-major U columns are then not 16-byte aligned: scalar loads with a 64-bit address each). An
earlier note here said 128-211 registers: that was out of date.

Compiled variants. Only dtypes, the tile constexprs (``BLOCK_*``, ``T_IN_REGS``, ``OUT_BF16``),
``HAS_ROW_PROBE`` (it also changes ``row_probe``'s pointer type) and the alignment of the vector
operands select a variant; ``nan_latches`` and ``has_row_tau`` are run-time scalars, and the
per-row scalar operands (row indices, flags, ``p_out``, ``row_tau``, their strides) and the sizes
``N``, ``M``, ``P`` and the grid numbers are never specialised, so speculative positions (offset
``p_out[j]`` views, rows with stride P) and changing token counts reuse one compiled kernel.

Out-of-range row indices (the CPU paths raise instead; this kernel cannot): a probed row whose
``probe_rows[b]`` is outside ``[0, N)`` (``N = probe_hidden.shape[0]``) reads nothing (the load
index is clamped and masked) and scores ``p = NaN``, so the ``nan_latches`` policy decides its
latch (fail closed latches it); a latched row whose ``head_rows[b]`` is outside ``[0, M)`` gets no
logits writes (there is no hidden state to steer with) and ``p_out[b] = NaN`` marks it (its latch
is kept). Either way no address outside the tensors is formed, so a bad index cannot become a
sticky illegal-address error.

No host synchronisation, no data-dependent allocation: the launcher only reads shapes,
strides and dtypes, so it can be captured in a CUDA graph. ``B == 0`` launches nothing.
Inputs: probe_hidden/head_hidden/logits/U/Bt in fp32, fp16 or bf16 (independently), any
strides; probe_rows/head_rows int32 or int64; probe_mask/latched bool (Triton stores bools as bytes);
probe weights fp32; row_tau (optional) fp32, any stride; row_probe (optional) int32/int64, any
stride. On CPU tensors the kernel runs in Triton's interpreter, which must be enabled with
TRITON_INTERPRET=1 before triton is first imported (the tests do).
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_INDEX = (torch.int32, torch.int64)
MAX_R_IN_REGISTERS = 64
MIN_BLOCKS_PER_PROGRAM = 8  # vocabulary blocks of U_TILE elements (BLOCK_V x BLOCK_R) each program streams
U_TILE = 4096
NUM_WARPS = 4


# Arguments that must not multiply compiled variants: runtime sizes and flags (Triton would turn a
# value of 1 into a constant and give multiples of 16 an alignment hint, one variant each), and the
# strides / pointers of what is read as one scalar per row (no vector access to gain from hints;
# serving passes offset views such as the speculative positions' p_out[j] and rows with stride P).
_NO_SPECIALIZE = ["prow_s", "pmask_s", "hrow_s", "lat_s", "pout_s", "rtau_s", "rprobe_s", "b2_s",
                  "N", "M", "P", "blocks_per_split", "n_splits", "nan_latches", "has_row_tau"]
_NO_ALIGN = ["prow_ptr", "pmask_ptr", "hrow_ptr", "lat_ptr", "pout_ptr", "rtau_ptr", "rprobe_ptr", "b2_ptr"]


@triton.jit(do_not_specialize=_NO_SPECIALIZE, do_not_specialize_on_alignment=_NO_ALIGN)
def steer_step_kernel(
    ph_ptr, ph_s0, ph_s1,  # probe_hidden [N, H]
    prow_ptr, prow_s,  # probe_rows [B]
    pmask_ptr, pmask_s,  # probe_mask [B] bool
    hh_ptr, hh_s0, hh_s1,  # head_hidden [M, H]
    hrow_ptr, hrow_s,  # head_rows [B]
    lg_ptr, lg_s0, lg_s1,  # logits [B, V], in place
    lat_ptr, lat_s,  # latched [B] bool, in place
    pout_ptr, pout_s,  # p_out [B] fp32
    rtau_ptr, rtau_s,  # row_tau [B] fp32 (read only when has_row_tau; else any pointer, never dereferenced)
    rprobe_ptr, rprobe_s,  # row_probe [B] int (read only when HAS_ROW_PROBE)
    w1_ptr, w1_sp, w1_s0, w1_s1,  # W1 [P, F, H] fp32 (P = 1, w1_sp = 0 for a 2-D W1)
    b1_ptr, b1_sp, b1_s, w2_ptr, w2_sp, w2_s, b2_ptr, b2_s,  # b1 [P, F], w2 [P, F], b2 [P] fp32
    u_ptr, u_s0, u_s1,  # U [V, R]
    bt_ptr, bt_s0, bt_s1,  # Bt [R, H]
    t_ptr,  # fp32 scratch [B, n_splits, R] (read/written only when not T_IN_REGS)
    H, F, V, R, P, N, M, blocks_per_split, n_splits,
    tau, one_plus_eps, eps,
    nan_latches, has_row_tau,  # 0/1 at run time (scalar branches: one compiled variant for both)
    HAS_ROW_PROBE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_R: tl.constexpr,
    T_IN_REGS: tl.constexpr,
    OUT_BF16: tl.constexpr,
):
    """One program = (batch row ``b``, vocabulary split ``s``).

    probe (if probe_mask[b]):  p = sigmoid(sum_f w2[f] * relu(sum_h W1[f,h] x[h] + b1[f]) + b2)
    latch:                     latched[b] |= p > tau  (| isnan(p) when nan_latches;
                               tau = row_tau[b] when has_row_tau, one scalar load per probed row)
    blend (if latched[b]):     t[k] = sum_h Bt[k,h] g[h];  for v in this split's blocks:
                               z[v] <- (1+eps) z[v] + eps * sum_k U[v,k] t[k]
    All sums in fp32; relu keeps NaN (like torch.relu) so a NaN hidden state gives p = NaN.
    Row indices outside [0, N) / [0, M): see "Out-of-range row indices" in the module docstring.
    """
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    offs_h = tl.arange(0, BLOCK_H)

    latch = tl.load(lat_ptr + b * lat_s) != 0
    do_probe = tl.load(pmask_ptr + b * pmask_s) != 0
    if do_probe:
        prow = tl.load(prow_ptr + b * prow_s).to(tl.int64)
        prow_ok = (prow >= 0) & (prow < N)
        prow = tl.minimum(tl.maximum(prow, 0), tl.maximum(N - 1, 0))  # addresses stay in bounds
        h_x = tl.where(prow_ok, H, 0)  # ... and an out-of-range row loads nothing
        x_base = ph_ptr + prow * ph_s0
        w1_base = w1_ptr
        b1_base = b1_ptr
        w2_base = w2_ptr
        b2_base = b2_ptr
        # NaN when this row's probe index or probe row is out of range (added to the logit below)
        k_nan = tl.where(prow_ok, 0.0, float("nan"))
        if HAS_ROW_PROBE:  # stacked probes: this row's probe
            k = tl.load(rprobe_ptr + b * rprobe_s).to(tl.int64)
            k_nan = tl.where((k >= 0) & (k < P), k_nan, float("nan"))
            k = tl.minimum(tl.maximum(k, 0), P - 1)  # addresses stay in bounds
            w1_base = w1_ptr + k * w1_sp
            b1_base = b1_ptr + k * b1_sp
            w2_base = w2_ptr + k * w2_sp
            b2_base = b2_ptr + k * b2_s
        offs_f = tl.arange(0, BLOCK_F)
        s_vec = tl.zeros([BLOCK_F], dtype=tl.float32)
        for f0 in range(0, F, BLOCK_F):
            f = f0 + offs_f
            fm = f < F
            acc = tl.zeros([BLOCK_F], dtype=tl.float32)
            for h0 in range(0, H, BLOCK_H):
                h = h0 + offs_h
                hm = h < H
                x = tl.load(x_base + h * ph_s1, mask=h < h_x, other=0.0).to(tl.float32)
                m2 = fm[:, None] & hm[None, :]
                w = tl.load(w1_base + f[:, None] * w1_s0 + h[None, :] * w1_s1, mask=m2, other=0.0)
                acc += tl.sum(tl.where(m2, w * x[None, :], 0.0), axis=1)
            hid = acc + tl.load(b1_base + f * b1_s, mask=fm, other=0.0)
            hid = tl.where(hid < 0.0, 0.0, hid)  # relu; NaN stays NaN
            w2 = tl.load(w2_base + f * w2_s, mask=fm, other=0.0)
            s_vec += tl.where(fm, hid * w2, 0.0)
        s = tl.sum(s_vec, axis=0) + tl.load(b2_base) + k_nan
        p = 1.0 / (1.0 + tl.exp(-s))
        thr = tau
        if has_row_tau != 0:
            thr = tl.load(rtau_ptr + b * rtau_s)
        fire = p > thr
        if nan_latches != 0:
            fire = fire | (p != p)
        latch = latch | fire
        if split == 0:
            tl.store(pout_ptr + b * pout_s, p)
            tl.store(lat_ptr + b * lat_s, latch)

    hrow = b * 0
    if latch:
        hrow = tl.load(hrow_ptr + b * hrow_s).to(tl.int64)
    bad_head = latch & ((hrow < 0) | (hrow >= M))  # nothing to steer with: no logits writes, p_out = NaN
    if bad_head & (split == 0):
        tl.store(pout_ptr + b * pout_s, float("nan"))
    latch = latch & ~bad_head
    if latch:
        g_base = hh_ptr + hrow * hh_s0
        offs_r = tl.arange(0, BLOCK_R)
        offs_v = tl.arange(0, BLOCK_V)
        out_ty = lg_ptr.dtype.element_ty
        lg_row = lg_ptr + b * lg_s0
        v_first = split * blocks_per_split * BLOCK_V
        if T_IN_REGS:
            rm = offs_r < R
            t = tl.zeros([BLOCK_R], dtype=tl.float32)
            for h0 in range(0, H, BLOCK_H):
                h = h0 + offs_h
                hm = h < H
                g = tl.load(g_base + h * hh_s1, mask=hm, other=0.0).to(tl.float32)
                m2 = rm[:, None] & hm[None, :]
                bt = tl.load(bt_ptr + offs_r[:, None] * bt_s0 + h[None, :] * bt_s1, mask=m2, other=0.0)
                t += tl.sum(tl.where(m2, bt.to(tl.float32) * g[None, :], 0.0), axis=1)
            for i in range(0, blocks_per_split):
                v = v_first + i * BLOCK_V + offs_v
                vm = v < V
                m2 = vm[:, None] & rm[None, :]
                u = tl.load(u_ptr + v[:, None] * u_s0 + offs_r[None, :] * u_s1, mask=m2, other=0.0)
                delta = tl.sum(tl.where(m2, u.to(tl.float32) * t[None, :], 0.0), axis=1)
                z = tl.load(lg_row + v * lg_s1, mask=vm, other=0.0).to(tl.float32)
                out = one_plus_eps * z + eps * delta
                if OUT_BF16:  # explicit round-to-nearest-even, as torch does (the interpreter truncates)
                    ub = out.to(tl.uint32, bitcast=True)
                    ub = (ub + 0x7FFF + ((ub >> 16) & 1)) >> 16
                    ub = tl.where(out != out, 0x7FC0, ub)
                    tl.store(lg_row + v * lg_s1, ub.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=vm)
                else:
                    tl.store(lg_row + v * lg_s1, out.to(out_ty), mask=vm)
        else:
            t_row = t_ptr + (b * n_splits + split) * R
            for r0 in range(0, R, BLOCK_R):
                rr = r0 + offs_r
                rm = rr < R
                t = tl.zeros([BLOCK_R], dtype=tl.float32)
                for h0 in range(0, H, BLOCK_H):
                    h = h0 + offs_h
                    hm = h < H
                    g = tl.load(g_base + h * hh_s1, mask=hm, other=0.0).to(tl.float32)
                    m2 = rm[:, None] & hm[None, :]
                    bt = tl.load(bt_ptr + rr[:, None] * bt_s0 + h[None, :] * bt_s1, mask=m2, other=0.0)
                    t += tl.sum(tl.where(m2, bt.to(tl.float32) * g[None, :], 0.0), axis=1)
                tl.store(t_row + rr, t, mask=rm)
            tl.debug_barrier()  # the whole program reads back what it wrote
            for i in range(0, blocks_per_split):
                v = v_first + i * BLOCK_V + offs_v
                vm = v < V
                delta = tl.zeros([BLOCK_V], dtype=tl.float32)
                for r0 in range(0, R, BLOCK_R):
                    rr = r0 + offs_r
                    rm = rr < R
                    t = tl.load(t_row + rr, mask=rm, other=0.0)
                    m2 = vm[:, None] & rm[None, :]
                    u = tl.load(u_ptr + v[:, None] * u_s0 + rr[None, :] * u_s1, mask=m2, other=0.0)
                    delta += tl.sum(tl.where(m2, u.to(tl.float32) * t[None, :], 0.0), axis=1)
                z = tl.load(lg_row + v * lg_s1, mask=vm, other=0.0).to(tl.float32)
                out = one_plus_eps * z + eps * delta
                if OUT_BF16:  # explicit round-to-nearest-even, as torch does (the interpreter truncates)
                    ub = out.to(tl.uint32, bitcast=True)
                    ub = (ub + 0x7FFF + ((ub >> 16) & 1)) >> 16
                    ub = tl.where(out != out, 0x7FC0, ub)
                    tl.store(lg_row + v * lg_s1, ub.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=vm)
                else:
                    tl.store(lg_row + v * lg_s1, out.to(out_ty), mask=vm)


# ----------------------------------------------------------------------------- launcher
def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise AssertionError(f"steer_step_triton: {msg}")


def _check_inputs(probe_hidden, probe_rows, probe_mask, head_hidden, head_rows, logits, latched, p_out,
                  W1, b1, w2, b2, U, Bt, row_tau=None, row_probe=None) -> None:
    """Every shape/dtype/device precondition, up front (shapes and dtypes only: no device sync)."""
    _check(logits.dim() == 2, f"logits must be [B, V], got {tuple(logits.shape)}")
    B, V = logits.shape
    _check(probe_hidden.dim() == 2 and head_hidden.dim() == 2, "probe_hidden and head_hidden must be 2-D [rows, H]")
    H = probe_hidden.shape[1]
    _check(head_hidden.shape[1] == H, f"head_hidden has H={head_hidden.shape[1]}, probe_hidden H={H}")
    if row_probe is None:
        _check(W1.dim() == 2 and W1.shape[1] == H, f"W1 must be [F, H={H}], got {tuple(W1.shape)}")
        F = W1.shape[0]
        _check(b1.dim() == 1 and b1.shape[0] == F and w2.dim() == 1 and w2.shape[0] == F, f"b1 and w2 must be [F={F}]")
        _check(b2.numel() == 1, "b2 must have one element")
    else:
        _check(W1.dim() == 3 and W1.shape[2] == H and W1.shape[0] >= 1,
               f"with row_probe, W1 must be stacked [P, F, H={H}], got {tuple(W1.shape)}")
        P, F = W1.shape[0], W1.shape[1]
        _check(tuple(b1.shape) == (P, F) and tuple(w2.shape) == (P, F) and b2.dim() == 1 and b2.shape[0] == P,
               f"stacked probes need b1 and w2 [P={P}, F={F}] and b2 [P={P}]")
        _check(row_probe.dim() == 1 and row_probe.shape[0] == B and row_probe.dtype in _INDEX,
               f"row_probe must be int32/int64 [B={B}], got {row_probe.dtype} {tuple(row_probe.shape)}")
        _check(row_probe.device == logits.device, f"row_probe must be on {logits.device}, got {row_probe.device}")
    _check(U.dim() == 2 and U.shape[0] == V, f"U must be [V={V}, r], got {tuple(U.shape)}")
    r = U.shape[1]
    _check(Bt.dim() == 2 and tuple(Bt.shape) == (r, H), f"Bt must be [r={r}, H={H}], got {tuple(Bt.shape)}")
    for name, t in (("probe_rows", probe_rows), ("head_rows", head_rows)):
        _check(t.dim() == 1 and t.shape[0] == B, f"{name} must be [B={B}]")
        _check(t.dtype in _INDEX, f"{name} must be int32 or int64, got {t.dtype}")
    for name, t in (("probe_mask", probe_mask), ("latched", latched)):
        _check(t.dim() == 1 and t.shape[0] == B and t.dtype == torch.bool, f"{name} must be bool [B={B}]")
    _check(p_out.dim() == 1 and p_out.shape[0] == B and p_out.dtype == torch.float32, f"p_out must be float32 [B={B}]")
    for name, t in (("probe_hidden", probe_hidden), ("head_hidden", head_hidden), ("logits", logits), ("U", U),
                    ("Bt", Bt)):
        _check(t.dtype in _FLOATS, f"{name} must be float32/float16/bfloat16, got {t.dtype}")
    for name, t in (("W1", W1), ("b1", b1), ("w2", w2), ("b2", b2)):
        _check(t.dtype == torch.float32, f"{name} must be float32, got {t.dtype}")
    dev = logits.device
    for t in (probe_hidden, probe_rows, probe_mask, head_hidden, head_rows, latched, p_out, W1, b1, w2, b2, U, Bt):
        _check(t.device == dev, f"all tensors must be on {dev}, found one on {t.device}")
    if row_tau is not None:
        _check(row_tau.dim() == 1 and row_tau.shape[0] == B and row_tau.dtype == torch.float32,
               f"row_tau must be float32 [B={B}], got {row_tau.dtype} {tuple(row_tau.shape)}")
        _check(row_tau.device == dev, f"row_tau must be on {dev}, got {row_tau.device}")


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """What the launcher picks for one call: tile sizes (constexprs), the path for ``t``, the grid."""

    block_h: int
    block_f: int
    block_v: int
    block_r: int
    t_in_regs: bool
    num_splits: int
    blocks_per_split: int


def plan_launch(B: int, V: int, H: int, F: int, R: int, *, sm_count: int | None = None,
                block_v: int | None = None, num_splits: int | None = None) -> LaunchPlan:
    """The launcher's tiling and grid for sizes alone (pure: no tensors, no device queries).

    ``sm_count``: the GPU's SM count (the CUDA rule below); None: the interpreter's rule (at most
    two programs per row, so the multi-split path stays exercised). ``block_v`` / ``num_splits``
    override the choice (tests, tuning). ``launch_config`` calls this; the AOT compile tests and
    ``benchmarks/aot_resources.py`` call it too, so they compile what the launcher launches.
    """
    t_in_regs = R <= MAX_R_IN_REGISTERS
    block_r = max(16, triton.next_power_of_2(R)) if t_in_regs else MAX_R_IN_REGISTERS
    # 32 x 64 probe tiles; U tiles of 256 x 16, 128 x 32, 32 x 64 (r in (32, 64]: 64 x 64 took 72
    # registers on sm_80, and 128-168 where U's columns are not 16-byte aligned) and 64 x 64 chunks
    # for r > 64 (32 x 64 made ptxas spill there on sm_80); tests/test_aot.py checks every variant
    block_h = max(16, min(64, triton.next_power_of_2(max(H, 1))))
    block_f = max(16, min(32, triton.next_power_of_2(max(F, 1))))
    if block_v is None:
        block_v = 256 if block_r <= 16 else (128 if block_r <= 32 else (32 if t_in_regs else 64))
    n_blocks = triton.cdiv(V, block_v) if V > 0 else 0
    if num_splits is None:
        if sm_count is not None:
            # ~4 waves of programs, but each streams >= MIN_BLOCKS_PER_PROGRAM tiles of U_TILE
            # elements (smaller tiles: more of them): a probed row's probe is recomputed by each of
            # its programs, so more splits cost more L2 traffic.
            target = 4 * sm_count
            min_blocks = MIN_BLOCKS_PER_PROGRAM * max(1, U_TILE // (block_v * block_r))
            num_splits = min(max(1, n_blocks // min_blocks), max(1, triton.cdiv(target, max(B, 1))))
        else:
            num_splits = min(2, max(1, n_blocks))
    num_splits = max(1, int(num_splits))
    blocks_per_split = triton.cdiv(n_blocks, num_splits) if n_blocks else 0
    return LaunchPlan(block_h, block_f, block_v, block_r, t_in_regs, num_splits, blocks_per_split)


def launch_config(probe_hidden, probe_rows, probe_mask, head_hidden, head_rows, logits, latched, p_out,
                  W1, b1, w2, b2, U, Bt, tau, eps, nan_latches=False, row_tau=None, row_probe=None, *,
                  block_v=None, num_splits=None, sm_count=None):
    """(grid, positional args, constexpr kwargs) for ``steer_step_kernel``; no launch, no sync.

    ``sm_count``: plan for a GPU with that many SMs instead of asking the device (ahead-of-time
    compiles and cost models use it with ``meta`` tensors); by default CUDA tensors ask their
    device and other tensors get the interpreter's plan.
    """
    B, V = logits.shape
    H = probe_hidden.shape[1]
    F = W1.shape[-2]
    P = W1.shape[0] if W1.dim() == 3 else 1
    R = U.shape[1]
    if sm_count is None and logits.device.type == "cuda":
        index = logits.device.index if logits.device.index is not None else torch.cuda.current_device()
        sm_count = _sm_count(index)
    plan = plan_launch(B, V, H, F, R, sm_count=sm_count, block_v=block_v, num_splits=num_splits)
    if plan.t_in_regs:
        scratch = p_out  # never dereferenced when T_IN_REGS
    else:
        scratch = torch.empty((B, plan.num_splits, R), device=logits.device, dtype=torch.float32)
    has_row_tau = row_tau is not None
    rtau = row_tau if has_row_tau else p_out  # never dereferenced without has_row_tau
    has_row_probe = row_probe is not None
    rprobe = row_probe if has_row_probe else probe_rows  # never dereferenced without HAS_ROW_PROBE
    stacked = W1.dim() == 3
    w1_sp, b1_sp, w2_sp = (W1.stride(0), b1.stride(0), w2.stride(0)) if stacked else (0, 0, 0)
    b2_s = b2.stride(0) if stacked else 0
    grid = (B, plan.num_splits)
    args = (
        probe_hidden, probe_hidden.stride(0), probe_hidden.stride(1),
        probe_rows, probe_rows.stride(0),
        probe_mask, probe_mask.stride(0),
        head_hidden, head_hidden.stride(0), head_hidden.stride(1),
        head_rows, head_rows.stride(0),
        logits, logits.stride(0), logits.stride(1),
        latched, latched.stride(0),
        p_out, p_out.stride(0),
        rtau, rtau.stride(0),
        rprobe, rprobe.stride(0),
        W1, w1_sp, W1.stride(-2), W1.stride(-1),
        b1, b1_sp, b1.stride(-1), w2, w2_sp, w2.stride(-1), b2, b2_s,
        U, U.stride(0), U.stride(1),
        Bt, Bt.stride(0), Bt.stride(1),
        scratch,
        H, F, V, R, P, probe_hidden.shape[0], head_hidden.shape[0], plan.blocks_per_split, plan.num_splits,
        float(tau), float(1.0 + float(eps)), float(eps),
        int(bool(nan_latches)), int(has_row_tau),
    )
    meta = dict(
        HAS_ROW_PROBE=has_row_probe,
        BLOCK_H=plan.block_h,
        BLOCK_F=plan.block_f,
        BLOCK_V=plan.block_v,
        BLOCK_R=plan.block_r,
        T_IN_REGS=plan.t_in_regs,
        OUT_BF16=logits.dtype == torch.bfloat16,
        num_warps=NUM_WARPS,
    )
    return grid, args, meta


def interpreting() -> bool:
    """True when Triton was imported in interpreter mode (TRITON_INTERPRET=1 before ``import triton``).

    Triton reads the variable when ``triton.language`` is imported (its builtins are jit
    functions decorated at import), not at launch: setting it later has no effect.
    """
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(steer_step_kernel, InterpretedFunction)


def kernel_for(device: torch.device):
    if device.type == "cpu" and not interpreting():
        raise RuntimeError(
            "steer_step_triton: CPU tensors need Triton's interpreter; set TRITON_INTERPRET=1 before "
            "triton is first imported (or use the C++ op / reference on CPU)"
        )
    return steer_step_kernel


def steer_step_triton(
    probe_hidden: torch.Tensor,
    probe_rows: torch.Tensor,
    probe_mask: torch.Tensor,
    head_hidden: torch.Tensor,
    head_rows: torch.Tensor,
    logits: torch.Tensor,
    latched: torch.Tensor,
    p_out: torch.Tensor,
    W1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    U: torch.Tensor,
    Bt: torch.Tensor,
    tau: float,
    eps: float,
    nan_latches: bool = False,
    row_tau: torch.Tensor | None = None,
    row_probe: torch.Tensor | None = None,
    *,
    block_v: int | None = None,
    num_splits: int | None = None,
) -> None:
    """Launch ``steer_step_kernel`` once (same arguments and semantics as ``steer_step_reference``,
    ``row_tau`` and ``row_probe`` included).

    ``block_v`` / ``num_splits`` override the vocabulary tiling (tests, tuning).
    """
    _check_inputs(probe_hidden, probe_rows, probe_mask, head_hidden, head_rows, logits, latched, p_out,
                  W1, b1, w2, b2, U, Bt, row_tau, row_probe)
    if logits.shape[0] == 0:
        return
    grid, args, meta = launch_config(probe_hidden, probe_rows, probe_mask, head_hidden, head_rows, logits, latched,
                                     p_out, W1, b1, w2, b2, U, Bt, tau, eps, nan_latches, row_tau,
                                     row_probe, block_v=block_v, num_splits=num_splits)
    kernel = kernel_for(logits.device)
    if logits.device.type == "cuda":
        with torch.cuda.device(logits.device):
            kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)
