"""Triton kernels for the per-decode-step AutoSteer work (gather + probe + latch + blend).

The contract is ``autosteer.runtime.reference_op.steer_step_reference``; for every sequence
``b`` of the batch one call computes:

1. ``x = probe_hidden[probe_rows[b]]`` -- or, with ``probe_extra`` / ``probe_sum``, the
   concatenation over ``k = (1 + len(probe_extra)) / probe_sum`` layers of each layer's state at that row,
   the fp32 sum of its ``probe_sum`` tensors (``parts = [probe_hidden, *probe_extra]``, at most 8, each
   ``[N, H]``; ``W1`` is then ``[F, k H]``) -- and where ``probe_mask[b]``:
   ``p = sigmoid(w2 . relu(W1 x + b1) + b2)`` (fp32 accumulation), ``p_out[b] = p``,
   ``latched[b] |= (p > tau_b) or (nan_latches and isnan(p))``, ``tau_b = row_tau[b]`` when the
   optional fp32 ``[B]`` per-row thresholds are given, else the scalar ``tau``; with stacked
   probe weights (``W1 [P, F, H]``, ``b1``/``w2 [P, F]``, ``b2 [P]``) the probe of row ``b`` is
   ``row_probe[b]`` (a value outside ``[0, P)`` -- which the CPU paths reject -- gives ``p = NaN``,
   so the row follows the NaN policy instead of being scored by some other probe);
2. where ``latched[b]`` (after step 1), in place:
   ``logits[b] = (1 + eps) * logits[b] + eps * U (Bt g)``, ``g = head_hidden[head_rows[b]]``,
   in fp32, cast back to the logits' dtype. Rows that end up unlatched get no logits writes.

Design: three launches in the one op (issue 19, item 2), rows in blocks of ``BLOCK_B = 16``.

1. **probe** (``probe_kernel``), grid ``(row blocks, hidden splits)``: each program takes the
   probed rows of its block and ``h_per_split`` (>= 512 on a GPU) hidden entries, and forms
   ``X W1^T`` with ``tl.dot`` over ``[16, 32] x [32, F]`` tiles -- W1 is read once per row block,
   not once per row and vocabulary split -- writing fp32 partial sums into a scratch. Stacked probes:
   one pass per probe some row of the block uses. A block without a probed row returns at once.
   Several layers: the parts come in 8 pointer slots (Triton takes no tensor list; a slot past the
   parts repeats ``probe_hidden`` and is never read) with the constexprs ``N_PARTS`` / ``PROBE_SUM``; a
   program's hidden split covers the same columns of every layer, looping over the layers at compile time
   (``static_range``) and adding layer ``l``'s block of W1 columns (``l H + Hj``) into the same
   accumulator, the layer's tensors summed in fp32 before the dot -- W1 is still read once per row
   block. The call with ``probe_hidden`` alone passes neither constexpr and runs the operations it ran
   before (bit-identical results; its compiled probe moved by a few registers: 104-119 on sm_80, was
   102-119). A probe row out of range reads none of the parts (NaN score, as before).
2. **latch + t** (``latch_kernel``), grid ``(row blocks, rank slices of 16 or 32)``: each program
   sums the partials of its block's rows (all slices of a block in the same order, so they agree),
   applies ``b1``, relu, ``w2``, ``b2``, the sigmoid and the threshold; slice 0 stores ``p_out`` and
   the latch (a monotone OR). Then, for the rows to steer only, ``t = Bt g`` for its rank slice by
   ``tl.dot`` over ``[16, 32] x [32, slice]`` tiles into the scratch: ``t`` is computed once per row.
3. **blend** (``blend_kernel``), grid ``(vocabulary tiles,)`` (one tile of ``BLOCK_V`` entries per
   program on a GPU until the grid passes 32 waves): a program first counts the latched rows (one
   load per 256 rows) and returns if there are none; else it loads its U tile ``[r, BLOCK_V]``
   once and, for every row block holding a row to steer, forms ``T U^T`` with one ``tl.dot`` and
   blends -- latched rows share U tiles, and rows not latched cost no logits traffic (their loads and
   stores are masked off). ``B == 0`` launches nothing; ``V == 0`` skips the blend.

Why three launches, not two: the latch of a row needs the whole probe (a reduction over H), and
``t`` needs the latch. With two launches (probe + latch + t per row block, then the blend) a
probe program would read all of W1 (F x H fp32: 0.9-2.1 MB at H = 3584-8192) on one SM, several
microseconds alone; splitting H over programs needs a reduction step before the latch, which is
launch 2. Computing ``t`` speculatively in launch 1 for every probed row would read ``g`` and Bt
for rows that stay unlatched. The cost is one more dependent launch (~1 us assumed, to be measured).

The full-rank head (``rank=None``: ``Bt = I``, r = H): kept on the GPU, with a cost not multiplied
by any split count: ``t`` in 32-rank slices (Bt read once per row block), the blend over 64-rank
chunks of U, re-read per row block holding a latched row (from L2; exactly once for B <= 16). It
still moves V x H x 4 bytes of U per latched step (2.2 GB at Qwen2-7B's shape: ~0.7 ms on an
H100): the pack format, not the kernel, is the cost; a low-rank pack (``autosteer fit --rank``) is
what serving should use. Vocabularies that are not a multiple of 16 with 16 < r <= 64 take the
same chunked path (holding the tile spilled on sm_90).

Numerics: the dots run in ``tf32x3`` (three tf32 tensor-core products: about fp32 accuracy; fp32
accumulation); Triton's interpreter computes them in exact fp32, so the interpreter tests do not see
the tf32x3 rounding: ``benchmarks/gpu_check.sh`` checks the delta on a GPU. relu keeps NaN (like
``torch.relu``), so a NaN hidden state gives ``p = NaN``; a NaN row of a block does not reach the
other rows (each output row of a dot depends on its own input row only).

Costs (``autosteer.kernels.aot.bytes_per_call``; tables in ``benchmarks/results/aot_sm{80,90}.md``;
a model, not measured; a probe reading several layers adds ``(n_parts - 1) x H`` hidden reads per probed
row -- k H, or 2 k H for (hidden, residual) pairs, in all -- and makes W1 ``k`` times wider): for r in {16, 64}, DRAM traffic is the floor plus the fp32 scratch (1.00-1.03
x the floor, up to 1.6 x in monitor steps at B = 256 from the partial sums); the old single-launch
design requested up to 500 x the floor (e.g. Qwen2-7B, r = 16, B = 8, monitor step: 489 MB vs a
0.98 MB floor, now 1.0 MB). The full-rank head re-reads U per row block (up to 14 x the floor at
B = 256). L2 re-reads (W1 per row block, ``t`` per vocabulary tile) make the requested bytes up to 2 x
the floor at B = 256, r = 64. Estimated (H100, assumed 7 TB/s L2 and 1 us per launch): an unlatched
monitor step at B = 256 takes 3.6 us (H = 576), 6.2 us (H = 3584), 10 us (H = 8192), mostly the
three launches and W1 re-read per row block; an all-latched blend reaches 91 % (r = 16) and 67 %
(r = 64, ``t`` re-read per tile) of the floor's time at B = 256.

Resources, from ahead-of-time compiles of every variant serving can launch for sm_80 and sm_90
(``tests/test_aot.py``, triton 3.9; 108 variants per target: probe 36 -- 12 each for ``probe_hidden``
alone, three layers (``N_PARTS`` 3) and three layers' (hidden, residual) pairs (``N_PARTS`` 6,
``PROBE_SUM`` 2) -- latch 24, blend 48, each with and without ``HAS_STATE_ROWS``; ``python benchmarks/aot_resources.py``, tables in
``benchmarks/results/aot_sm{80,90}.md``): no spills, no stack, 2-12 KB of shared memory; registers per
thread on sm_80: probe 104-127 (8 warps; ``probe_hidden`` alone 104-119, three layers 118-124, three
(hidden, residual) pairs 118-127), latch 80-96 (4 warps), blend 64-144 (the top: the chunked
full-rank path, whose rank offsets are int64 because R x V can pass 2^31); on sm_90: probe 101-125 (alone
101-108, three layers 113-122, pairs 117-125), latch 70-102, blend 56-136. sm_80 64-144 overall, sm_90
56-136. (The multi-part probe reloads the row indices per layer: with them computed once, the row
addresses of all six parts stayed live and ptxas spilled 4 bytes at 128 registers on sm_90, fp32 pairs
with stacked probes.)
(With ``state_rows``, a run-time ``nan_latches`` branch in the latch and blend launches made ptxas spill
8 bytes on sm_90: those two are written branch-free.)
The first cut (64 x 64 probe tiles, 128 x 16 U tiles, Triton's default 3 pipeline stages) took
150-255 registers and spilled; ``NUM_STAGES = 1`` and the tiles above are what fits.

Compiled variants. Only dtypes, the tile constexprs, ``HAS_ROW_PROBE`` (it also changes
``row_probe``'s pointer type) and the alignment of the vector operands select a variant;
``nan_latches`` and ``has_row_tau`` are run-time scalars, and the per-row scalar operands (row
indices, flags, ``p_out``, ``row_tau``, their strides), ``B``, ``N``, ``M``, ``P`` and the grid
numbers are never specialised, so speculative positions (offset ``p_out[j]`` views, rows with
stride P) and changing batch sizes reuse one compiled kernel.

Per-request state by index (``state_rows``, optional int32/int64 ``[B]``, a serving store's row -> slot
map): ``probe_mask``, ``latched``, ``p_out``, ``row_tau`` and ``row_probe`` are then tables of any length
``S`` read and written at entry ``state_rows[b]`` (every launch maps its rows first: one scalar load per
row); ``probe_rows``, ``head_rows`` and ``logits`` stay per row. It is a run-time flag
(the constexpr ``HAS_STATE_ROWS``: the call without it compiles to the code it had before; with it, one
more variant per launch) and the table length ``S`` is not specialised. A row whose
entry is outside ``[0, S)`` reads and writes no state (every load and store of it is masked) and is
steered exactly when ``nan_latches`` -- its latch is unknown, so the fail-closed policy decides.

Out-of-range row indices (the CPU paths raise instead; these kernels cannot): a probed row whose
``probe_rows[b]`` is outside ``[0, N)`` (``N = probe_hidden.shape[0]``) reads nothing (its loads are
masked) and scores ``p = NaN``, so the ``nan_latches`` policy decides its latch (fail closed
latches it); a latched row whose ``head_rows[b]`` is outside ``[0, M)`` gets no logits writes
(there is no hidden state to steer with) and ``p_out[b] = NaN`` marks it (its latch is kept).
Either way no address outside the tensors is formed, so a bad index cannot become a sticky
illegal-address error.

No host synchronisation, no data-dependent allocation: the launcher reads only shapes, strides
and dtypes and allocates one fp32 scratch ``[B, R + h_splits * F]`` (``torch.empty``, sized from
shapes), so a call can be captured in a CUDA graph.
Inputs: probe_hidden/head_hidden/logits/U/Bt in fp32, fp16 or bf16 (independently), any
strides; probe_rows/head_rows int32 or int64; probe_mask/latched bool (Triton stores bools as bytes);
probe weights fp32; row_tau (optional) fp32, any stride; row_probe (optional) int32/int64, any
stride. On CPU tensors the kernels run in Triton's interpreter, which must be enabled with
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
BLOCK_B = 16  # rows per row block: tl.dot's smallest M
BLOCK_H = 32  # hidden-size chunk of the probe and t dots (64 took 211-240 registers with tf32x3 on sm_90)
MIN_H_PER_SPLIT = 512  # a probe program reads at least F x 512 of W1 (its fixed cost is then amortised)
PROBE_WAVES = 2  # probe programs aimed at: PROBE_WAVES x the SM count
MAX_R_IN_REGISTERS = 64  # r up to this: one U tile [BLOCK_R, BLOCK_V] per vocabulary tile, kept in registers
BLEND_WAVES = 32  # a blend program streams more than one tile only past BLEND_WAVES x SM-count tiles
BLOCK_ANY = 256  # latch flags read per load in the blend's "is any row latched" check
DOT_PRECISION = "tf32x3"  # fp32 dots on tensor cores at about fp32 accuracy (3 tf32 products)
NUM_WARPS = 4  # per program of every launch but these two:
PROBE_WARPS = 8  # (4 warps: 152-168 registers, and spills on sm_90)
BLEND_WARPS_WIDE = 8  # blend holding a U tile of 16 < r <= 64 (4 warps: 122-164 registers)
NUM_STAGES = 1  # no software pipelining: 2 took 238-255 registers (and spilled) on sm_90 for little gain here

# Runtime sizes and per-row scalar operands must not multiply compiled variants: Triton would turn a
# value of 1 into a constant and give multiples of 16 an alignment hint (one variant each); B and the
# grid numbers change every step, and serving passes offset views (the speculative positions'
# p_out[j], rows with stride P) for what is read one scalar per row.
_ROW_SCALARS = ["prow", "pmask", "hrow", "lat", "pout", "rtau", "rprobe", "b2", "srow"]
_NO_ALIGN = [n + "_ptr" for n in _ROW_SCALARS]
_NO_SPECIALIZE = [n + "_s" for n in _ROW_SCALARS] + ["B", "N", "M", "P", "S", "h_per_split", "n_h_splits",
                                                      "tiles_per_program", "nan_latches", "has_row_tau"]


def _present(names):
    return lambda fn: triton.jit(do_not_specialize=[n for n in _NO_SPECIALIZE if n in names],
                                 do_not_specialize_on_alignment=[n for n in _NO_ALIGN if n in names])(fn)


def _jit(fn):
    names = fn.__code__.co_varnames[:fn.__code__.co_argcount]
    return _present(set(names))(fn)


@triton.jit
def _state_of(srow_ptr, srow_s, rows, rm, S, HAS_STATE_ROWS: tl.constexpr):
    """Entry of each row in the per-request tensors (``state_rows[b]``, or ``b`` itself) and whether it
    is in ``[0, S)``; an entry out of range is replaced by 0 and must be masked off by the caller."""
    st = rows
    ok = rm
    if HAS_STATE_ROWS:  # (a constexpr: the call without state_rows compiles to what it was before)
        st = tl.load(srow_ptr + rows * srow_s, mask=rm, other=0).to(tl.int64)
        ok = rm & (st >= 0) & (st < S)
        st = tl.where(ok, st, 0)
    return st, ok


@_jit
def probe_kernel(
    ph_ptr, ph_s0, ph_s1,  # probe_hidden [N, H]: part 0 of the probe's input
    x1_ptr, x1_s0, x1_s1, x2_ptr, x2_s0, x2_s1, x3_ptr, x3_s0, x3_s1,  # probe_extra: parts 1 .. N_PARTS - 1,
    x4_ptr, x4_s0, x4_s1, x5_ptr, x5_s0, x5_s1, x6_ptr, x6_s0, x6_s1,  # each [N, H] of probe_hidden's dtype
    x7_ptr, x7_s0, x7_s1,  # (a slot past N_PARTS gets probe_hidden again and is never read)
    prow_ptr, prow_s,  # probe_rows [B]
    pmask_ptr, pmask_s,  # probe_mask [S] bool
    rprobe_ptr, rprobe_s,  # row_probe [S] int (read only when HAS_ROW_PROBE)
    srow_ptr, srow_s,  # state_rows [B] int (read only when HAS_STATE_ROWS; else S = B and entry b is row b)
    w1_ptr, w1_sp, w1_s0, w1_s1,  # W1 [P, F, H] fp32 (P = 1, w1_sp = 0 for a 2-D W1)
    part_ptr, part_s0,  # fp32 scratch [B, n_h_splits * F]: this program's partial W1 x
    B, H, F, P, N, S, h_per_split,
    HAS_ROW_PROBE: tl.constexpr,
    HAS_STATE_ROWS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_F: tl.constexpr,
    DOT_PREC: tl.constexpr,
    N_PARTS: tl.constexpr = 1,  # probe input tensors (probe_hidden + probe_extra), at most 8
    PROBE_SUM: tl.constexpr = 1,  # consecutive parts summed (fp32) per layer: 1, or 2 for (hidden, residual)
):
    """Launch 1, program (row block i, hidden split j): for the probed rows of the block,
    ``part[b, j, :] = sum_l W1[k_b][:, l H + Hj] x_{l,b}[Hj]`` over the ``N_PARTS / PROBE_SUM`` layers
    ``l`` (``x_l`` the fp32 sum of the layer's parts; one ``tl.dot`` of the block's rows against each
    W1 tile, per probe in use in the block: W1 is still read once per row block). A block without a
    probed row returns at once."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    split = tl.program_id(1)
    rm = rows < B
    st, sok = _state_of(srow_ptr, srow_s, rows, rm, S, HAS_STATE_ROWS)
    probed = (tl.load(pmask_ptr + st * pmask_s, mask=sok, other=0) != 0) & sok
    if tl.max(probed.to(tl.int32), axis=0) > 0:
        prow = tl.load(prow_ptr + rows * prow_s, mask=probed, other=0).to(tl.int64)
        ok = probed & (prow >= 0) & (prow < N)
        prow = tl.where(ok, prow, 0)  # a row out of range loads nothing (the latch launch scores it NaN)
        k = tl.zeros([BLOCK_B], dtype=tl.int64)
        if HAS_ROW_PROBE:
            k = tl.load(rprobe_ptr + st * rprobe_s, mask=ok, other=0).to(tl.int64)
        h_lo = split * h_per_split
        h_hi = tl.minimum(h_lo + h_per_split, H)
        offs_h = tl.arange(0, BLOCK_H)
        offs_f = tl.arange(0, BLOCK_F)
        # the parts as tuples, indexed by compile-time constants below (N_PARTS == 1: probe_hidden only)
        x_ptrs = (ph_ptr, x1_ptr, x2_ptr, x3_ptr, x4_ptr, x5_ptr, x6_ptr, x7_ptr)
        x_s0 = (ph_s0, x1_s0, x2_s0, x3_s0, x4_s0, x5_s0, x6_s0, x7_s0)
        x_s1 = (ph_s1, x1_s1, x2_s1, x3_s1, x4_s1, x5_s1, x6_s1, x7_s1)
        out_row = part_ptr + rows * part_s0 + split * F
        for kp in range(0, P):  # stacked probes: one pass per probe that some row of the block uses
            sel = ok & (k == kp)  # an index outside [0, P) selects no pass: the latch launch scores it NaN
            if tl.max(sel.to(tl.int32), axis=0) > 0:
                w1_k = w1_ptr + kp * w1_sp
                for f0 in range(0, F, BLOCK_F):
                    f = f0 + offs_f
                    fm = f < F
                    acc = tl.zeros([BLOCK_B, BLOCK_F], dtype=tl.float32)
                    for layer in tl.static_range(N_PARTS // PROBE_SUM):  # layer l: W1 columns l H ...
                        prow_l = prow
                        if N_PARTS > 1:  # reloaded per layer (a load after the stores below is not hoisted out
                            # of the loops): the row addresses of every part are then never live at once
                            prow_l = tl.load(prow_ptr + rows * prow_s, mask=sel, other=0).to(tl.int64)
                        x_row = x_ptrs[layer * PROBE_SUM] + prow_l * x_s0[layer * PROBE_SUM]
                        for h0 in range(h_lo, h_hi, BLOCK_H):
                            h = h0 + offs_h
                            hm = h < h_hi
                            xm = sel[:, None] & hm[None, :]
                            x = tl.load(x_row[:, None] + h[None, :] * x_s1[layer * PROBE_SUM], mask=xm,
                                        other=0.0).to(tl.float32)
                            for j in tl.static_range(layer * PROBE_SUM + 1, (layer + 1) * PROBE_SUM):
                                # the layer's other parts, summed in fp32
                                x += tl.load(x_ptrs[j] + prow_l[:, None] * x_s0[j] + h[None, :] * x_s1[j], mask=xm,
                                             other=0.0).to(tl.float32)
                            w = tl.load(w1_k + f[None, :] * w1_s0 + (layer * H + h)[:, None] * w1_s1,
                                        mask=hm[:, None] & fm[None, :], other=0.0)
                            acc = tl.dot(x, w, acc, input_precision=DOT_PREC)
                    tl.store(out_row[:, None] + f[None, :], acc, mask=sel[:, None] & fm[None, :])


@_jit
def latch_kernel(
    prow_ptr, prow_s,  # probe_rows [B]
    pmask_ptr, pmask_s,  # probe_mask [S] bool
    hh_ptr, hh_s0, hh_s1,  # head_hidden [M, H]
    hrow_ptr, hrow_s,  # head_rows [B]
    lat_ptr, lat_s,  # latched [S] bool, in place
    pout_ptr, pout_s,  # p_out [S] fp32
    rtau_ptr, rtau_s,  # row_tau [S] fp32 (read only when has_row_tau; else any pointer, never dereferenced)
    rprobe_ptr, rprobe_s,  # row_probe [S] int (read only when HAS_ROW_PROBE)
    srow_ptr, srow_s,  # state_rows [B] int (read only when HAS_STATE_ROWS)
    b1_ptr, b1_sp, b1_s, w2_ptr, w2_sp, w2_s, b2_ptr, b2_s,  # b1 [P, F], w2 [P, F], b2 [P] fp32
    bt_ptr, bt_s0, bt_s1,  # Bt [R, H]
    part_ptr, part_s0,  # launch 1's partial sums [B, n_h_splits * F]
    t_ptr, t_s0,  # fp32 scratch [B, R]: t = Bt g of the rows to steer
    B, H, F, R, P, N, M, S, n_h_splits,
    tau,
    nan_latches, has_row_tau,  # 0/1 at run time (scalar branches: one compiled variant for both)
    HAS_ROW_PROBE: tl.constexpr,
    HAS_STATE_ROWS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Launch 2, program (row block i, rank slice j): the latch of every row of the block (each
    program of the block computes it, from launch 1's partial sums, in the same order: they agree),
    stored by ``j == 0``; then ``t[b, Rj] = Bt[Rj, :] g_b`` for the block's rows to steer (one
    ``tl.dot`` of the block's head rows against each Bt tile)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    rsplit = tl.program_id(1)
    rm = rows < B
    st, sok = _state_of(srow_ptr, srow_s, rows, rm, S, HAS_STATE_ROWS)
    # a row whose state entry is out of range has no latch to read: steered exactly when nan_latches
    latch = (tl.load(lat_ptr + st * lat_s, mask=sok, other=0) != 0) & sok
    if HAS_STATE_ROWS:  # branch-free (a run-time branch here made ptxas spill on sm_90)
        latch = latch | (((rm & ~sok).to(tl.int32) * nan_latches) != 0)
    probed = (tl.load(pmask_ptr + st * pmask_s, mask=sok, other=0) != 0) & sok
    p_val = tl.zeros([BLOCK_B], dtype=tl.float32)
    p_write = probed & (rows < 0)  # nothing yet
    if tl.max(probed.to(tl.int32), axis=0) > 0:
        prow = tl.load(prow_ptr + rows * prow_s, mask=probed, other=0).to(tl.int64)
        good = probed & (prow >= 0) & (prow < N)
        k = tl.zeros([BLOCK_B], dtype=tl.int64)
        if HAS_ROW_PROBE:
            k = tl.load(rprobe_ptr + st * rprobe_s, mask=probed, other=0).to(tl.int64)
            good = good & (k >= 0) & (k < P)
            k = tl.minimum(tl.maximum(k, 0), P - 1)  # addresses stay in bounds
        # NaN where the probe row or probe index is out of range (added to the logit below)
        k_nan = tl.where(good | ~probed, 0.0, float("nan"))
        offs_f = tl.arange(0, BLOCK_F)
        s = tl.zeros([BLOCK_B], dtype=tl.float32)
        for f0 in range(0, F, BLOCK_F):
            f = f0 + offs_f
            fm = f < F
            m2 = good[:, None] & fm[None, :]
            hid = tl.zeros([BLOCK_B, BLOCK_F], dtype=tl.float32)
            for j in range(0, n_h_splits):
                hid += tl.load(part_ptr + rows[:, None] * part_s0 + j * F + f[None, :], mask=m2, other=0.0)
            pm2 = probed[:, None] & fm[None, :]
            hid += tl.load(b1_ptr + k[:, None] * b1_sp + f[None, :] * b1_s, mask=pm2, other=0.0)
            hid = tl.where(hid < 0.0, 0.0, hid)  # relu; NaN stays NaN
            w2 = tl.load(w2_ptr + k[:, None] * w2_sp + f[None, :] * w2_s, mask=pm2, other=0.0)
            s += tl.sum(tl.where(pm2, hid * w2, 0.0), axis=1)
        s = s + tl.load(b2_ptr + k * b2_s, mask=probed, other=0.0) + k_nan
        p = 1.0 / (1.0 + tl.exp(-s))
        thr = tl.zeros([BLOCK_B], dtype=tl.float32) + tau
        if has_row_tau != 0:
            thr = tl.load(rtau_ptr + st * rtau_s, mask=probed, other=0.0)
        fire = p > thr
        if nan_latches != 0:
            fire = fire | (p != p)
        latch = latch | (fire & probed)
        p_val = p
        p_write = probed
        if rsplit == 0:
            tl.store(lat_ptr + st * lat_s, latch, mask=probed)
    hrow = tl.load(hrow_ptr + rows * hrow_s, mask=latch, other=0).to(tl.int64)
    head_ok = (hrow >= 0) & (hrow < M)
    bad_head = latch & ~head_ok  # nothing to steer with: no logits writes, p_out = NaN
    steer = latch & head_ok
    if rsplit == 0:
        tl.store(pout_ptr + st * pout_s, tl.where(bad_head, float("nan"), p_val), mask=(p_write | bad_head) & sok)
    # t of every row (zero for rows not steered here): the blend reads t for every row whose state entry is
    # latched, and with a state entry repeated across rows (not a call the stores make; undefined) a row can find
    # its entry latched by another row -- it then gets (1 + eps) z, never the scratch's uninitialised memory
    if tl.max(steer.to(tl.int32), axis=0) > 0:
        hrow = tl.where(steer, hrow, 0)
        g_row = hh_ptr + hrow * hh_s0
        r = rsplit * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = r < R
        offs_h = tl.arange(0, BLOCK_H)
        acc = tl.zeros([BLOCK_B, BLOCK_R], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            h = h0 + offs_h
            hm = h < H
            g = tl.load(g_row[:, None] + h[None, :] * hh_s1, mask=steer[:, None] & hm[None, :], other=0.0)
            bt = tl.load(bt_ptr + r[None, :] * bt_s0 + h[:, None] * bt_s1, mask=hm[:, None] & rmask[None, :],
                         other=0.0)
            acc = tl.dot(g.to(tl.float32), bt.to(tl.float32), acc, input_precision=DOT_PREC)
        tl.store(t_ptr + rows[:, None] * t_s0 + r[None, :], acc, mask=rm[:, None] & rmask[None, :])
    else:
        r = rsplit * BLOCK_R + tl.arange(0, BLOCK_R)
        tl.store(t_ptr + rows[:, None] * t_s0 + r[None, :], tl.zeros([BLOCK_B, BLOCK_R], dtype=tl.float32),
                 mask=rm[:, None] & (r < R)[None, :])


@triton.jit
def _store_logits(ptrs, out, mask, OUT_BF16: tl.constexpr):
    if OUT_BF16:  # explicit round-to-nearest-even, as torch does (the interpreter truncates)
        ub = out.to(tl.uint32, bitcast=True)
        ub = (ub + 0x7FFF + ((ub >> 16) & 1)) >> 16
        ub = tl.where(out != out, 0x7FC0, ub)
        tl.store(ptrs, ub.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptrs, out.to(ptrs.dtype.element_ty), mask=mask)


@_jit
def blend_kernel(
    hrow_ptr, hrow_s,  # head_rows [B]
    lat_ptr, lat_s,  # latched [S] bool (after launch 2)
    srow_ptr, srow_s,  # state_rows [B] int (read only when HAS_STATE_ROWS)
    lg_ptr, lg_s0, lg_s1,  # logits [B, V], in place
    u_ptr, u_s0, u_s1,  # U [V, R]
    t_ptr, t_s0,  # launch 2's t [B, R] fp32
    B, V, R, M, S, tiles_per_program,
    one_plus_eps, eps,
    nan_latches,
    BLOCK_B: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_R: tl.constexpr,
    U_IN_REGS: tl.constexpr,
    BLOCK_ANY: tl.constexpr,
    OUT_BF16: tl.constexpr,
    HAS_STATE_ROWS: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Launch 3, program p: vocabulary tiles ``p * tiles_per_program ...`` (``BLOCK_V`` entries
    each). Unless no row is latched (one flag load per ``BLOCK_ANY`` rows, then return), for each
    tile: the U tile ``[BLOCK_R, BLOCK_V]`` is loaded once (r <= ``BLOCK_R``), then for each row
    block holding a row to steer: ``z <- (1+eps) z + eps T U^T`` with one ``tl.dot``; logits of
    rows not steered are never loaded or stored. For r > ``BLOCK_R`` (the full-rank head) the
    dot runs over r chunks, re-reading the tile's U chunks per row block (from L2)."""
    pid = tl.program_id(0)
    offs_any = tl.arange(0, BLOCK_ANY)
    n_lat = 0
    for c in range(0, B, BLOCK_ANY):
        rr = (c + offs_any).to(tl.int64)
        sa, oka = _state_of(srow_ptr, srow_s, rr, rr < B, S, HAS_STATE_ROWS)
        la = (tl.load(lat_ptr + sa * lat_s, mask=oka, other=0) != 0) & oka
        if HAS_STATE_ROWS:  # branch-free (a run-time branch here made ptxas spill on sm_90)
            la = la | ((((rr < B) & ~oka).to(tl.int32) * nan_latches) != 0)
        n_lat += tl.sum(la.to(tl.int32), axis=0)
    if n_lat > 0:
        offs_v = tl.arange(0, BLOCK_V)
        offs_b = tl.arange(0, BLOCK_B)
        offs_r = tl.arange(0, BLOCK_R)
        rmask = offs_r < R
        for i in range(0, tiles_per_program):
            v = (pid * tiles_per_program + i).to(tl.int64) * BLOCK_V + offs_v
            vm = v < V
            if U_IN_REGS:  # the tile, once, for every row block below
                ut = tl.load(u_ptr + v[None, :] * u_s0 + offs_r[:, None] * u_s1, mask=rmask[:, None] & vm[None, :],
                             other=0.0).to(tl.float32)
            for b0 in range(0, B, BLOCK_B):
                rows = b0 + offs_b.to(tl.int64)
                if HAS_STATE_ROWS:
                    st = tl.load(srow_ptr + rows * srow_s, mask=rows < B, other=0).to(tl.int64)
                    sok = (rows < B) & (st >= 0) & (st < S)
                    lat = (tl.load(lat_ptr + tl.where(sok, st, 0) * lat_s, mask=sok, other=0) != 0) & sok
                    lat = lat | ((((rows < B) & ~sok).to(tl.int32) * nan_latches) != 0)  # (branch-free, as above)
                else:
                    lat = (tl.load(lat_ptr + rows * lat_s, mask=rows < B, other=0) != 0) & (rows < B)
                if tl.max(lat.to(tl.int32), axis=0) > 0:
                    hrow = tl.load(hrow_ptr + rows * hrow_s, mask=lat, other=0)
                    steer = lat & (hrow >= 0) & (hrow < M)
                    t_row = t_ptr + rows * t_s0
                    if U_IN_REGS:
                        t = tl.load(t_row[:, None] + offs_r[None, :], mask=steer[:, None] & rmask[None, :], other=0.0)
                        acc = tl.dot(t, ut, input_precision=DOT_PREC)
                    else:
                        acc = tl.zeros([BLOCK_B, BLOCK_V], dtype=tl.float32)
                        for r0 in range(0, R, BLOCK_R):
                            r = (r0 + offs_r).to(tl.int64)  # r * u_s1 passes 2^31 for a full-rank head at large V
                            rm = r < R
                            t = tl.load(t_row[:, None] + r[None, :], mask=steer[:, None] & rm[None, :], other=0.0)
                            uc = tl.load(u_ptr + v[None, :] * u_s0 + r[:, None] * u_s1, mask=rm[:, None] & vm[None, :],
                                         other=0.0)
                            acc = tl.dot(t, uc.to(tl.float32), acc, input_precision=DOT_PREC)
                    m2 = steer[:, None] & vm[None, :]
                    ptrs = lg_ptr + rows[:, None] * lg_s0 + v[None, :] * lg_s1
                    z = tl.load(ptrs, mask=m2, other=0.0).to(tl.float32)
                    _store_logits(ptrs, one_plus_eps * z + eps * acc, m2, OUT_BF16)


# ----------------------------------------------------------------------------- launcher
def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise AssertionError(f"steer_step_triton: {msg}")


MAX_PARTS = 8  # probe input tensors a call may pass (probe_hidden + probe_extra): 4 layers x (hidden, residual)
MAX_LAYERS = 4


def probe_layers(probe_hidden, probe_extra=(), probe_sum: int = 1) -> int:
    """``k``, the layers the probe reads: ``(1 + len(probe_extra)) / probe_sum`` (checked)."""
    n = 1 + len(probe_extra)
    _check(probe_sum in (1, 2), f"probe_sum must be 1 or 2, got {probe_sum}")
    _check(n % probe_sum == 0, f"probe_sum={probe_sum} must divide the {n} probe input tensors")
    _check(n // probe_sum <= MAX_LAYERS, f"the probe reads at most {MAX_LAYERS} layers, got {n // probe_sum}")
    return n // probe_sum


def _check_inputs(probe_hidden, probe_rows, probe_mask, head_hidden, head_rows, logits, latched, p_out,
                  W1, b1, w2, b2, U, Bt, row_tau=None, row_probe=None, state_rows=None, probe_extra=(),
                  probe_sum=1) -> None:
    """Every shape/dtype/device precondition, up front (shapes and dtypes only: no device sync)."""
    _check(logits.dim() == 2, f"logits must be [B, V], got {tuple(logits.shape)}")
    B, V = logits.shape
    S = B  # length of the per-request tensors
    if state_rows is not None:
        _check(state_rows.dim() == 1 and state_rows.shape[0] == B and state_rows.dtype in _INDEX,
               f"state_rows must be int32/int64 [B={B}], got {state_rows.dtype} {tuple(state_rows.shape)}")
        _check(state_rows.device == logits.device, f"state_rows must be on {logits.device}, got {state_rows.device}")
        _check(latched.dim() == 1 and latched.shape[0] >= 1, "with state_rows, latched must be a 1-D table [S >= 1]")
        S = latched.shape[0]
    _check(probe_hidden.dim() == 2 and head_hidden.dim() == 2, "probe_hidden and head_hidden must be 2-D [rows, H]")
    H = probe_hidden.shape[1]
    _check(head_hidden.shape[1] == H, f"head_hidden has H={head_hidden.shape[1]}, probe_hidden H={H}")
    D = probe_layers(probe_hidden, probe_extra, probe_sum) * H  # the probe's input width
    for i, t in enumerate(probe_extra):
        _check(t.dim() == 2 and tuple(t.shape) == tuple(probe_hidden.shape) and t.dtype == probe_hidden.dtype
               and t.device == probe_hidden.device,
               f"probe_extra[{i}] must be [N, H] = {tuple(probe_hidden.shape)} of {probe_hidden.dtype} on "
               f"{probe_hidden.device}, got {t.dtype} {tuple(t.shape)} on {t.device}")
    if row_probe is None:
        _check(W1.dim() == 2 and W1.shape[1] == D, f"W1 must be [F, H={H}] per layer, k={D // H}: [F, {D}], got {tuple(W1.shape)}")
        F = W1.shape[0]
        _check(b1.dim() == 1 and b1.shape[0] == F and w2.dim() == 1 and w2.shape[0] == F, f"b1 and w2 must be [F={F}]")
        _check(b2.numel() == 1, "b2 must have one element")
    else:
        _check(W1.dim() == 3 and W1.shape[2] == D and W1.shape[0] >= 1,
               f"with row_probe, W1 must be stacked [P, F, H={H}] per layer, k={D // H}: [P, F, {D}], got {tuple(W1.shape)}")
        P, F = W1.shape[0], W1.shape[1]
        _check(tuple(b1.shape) == (P, F) and tuple(w2.shape) == (P, F) and b2.dim() == 1 and b2.shape[0] == P,
               f"stacked probes need b1 and w2 [P={P}, F={F}] and b2 [P={P}]")
        _check(row_probe.dim() == 1 and row_probe.shape[0] == S and row_probe.dtype in _INDEX,
               f"row_probe must be int32/int64 [{S}], got {row_probe.dtype} {tuple(row_probe.shape)}")
        _check(row_probe.device == logits.device, f"row_probe must be on {logits.device}, got {row_probe.device}")
    _check(U.dim() == 2 and U.shape[0] == V, f"U must be [V={V}, r], got {tuple(U.shape)}")
    r = U.shape[1]
    _check(Bt.dim() == 2 and tuple(Bt.shape) == (r, H), f"Bt must be [r={r}, H={H}], got {tuple(Bt.shape)}")
    for name, t in (("probe_rows", probe_rows), ("head_rows", head_rows)):
        _check(t.dim() == 1 and t.shape[0] == B, f"{name} must be [B={B}]")
        _check(t.dtype in _INDEX, f"{name} must be int32 or int64, got {t.dtype}")
    for name, t in (("probe_mask", probe_mask), ("latched", latched)):
        _check(t.dim() == 1 and t.shape[0] == S and t.dtype == torch.bool, f"{name} must be bool [{S}]")
    _check(p_out.dim() == 1 and p_out.shape[0] == S and p_out.dtype == torch.float32, f"p_out must be float32 [{S}]")
    for name, t in (("probe_hidden", probe_hidden), ("head_hidden", head_hidden), ("logits", logits), ("U", U),
                    ("Bt", Bt)):
        _check(t.dtype in _FLOATS, f"{name} must be float32/float16/bfloat16, got {t.dtype}")
    for name, t in (("W1", W1), ("b1", b1), ("w2", w2), ("b2", b2)):
        _check(t.dtype == torch.float32, f"{name} must be float32, got {t.dtype}")
    dev = logits.device
    for t in (probe_hidden, probe_rows, probe_mask, head_hidden, head_rows, latched, p_out, W1, b1, w2, b2, U, Bt):
        _check(t.device == dev, f"all tensors must be on {dev}, found one on {t.device}")
    if row_tau is not None:
        _check(row_tau.dim() == 1 and row_tau.shape[0] == S and row_tau.dtype == torch.float32,
               f"row_tau must be float32 [{S}], got {row_tau.dtype} {tuple(row_tau.shape)}")
        _check(row_tau.device == dev, f"row_tau must be on {dev}, got {row_tau.device}")


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """What the launcher picks for one call, from sizes alone: tiles (constexprs) and grids.

    Launch 1 (probe): grid ``(row_blocks, h_splits)``, ``h_per_split`` hidden entries each.
    Launch 2 (latch, t): grid ``(row_blocks, r_splits)``, ``block_rt`` ranks each.
    Launch 3 (blend): grid ``(blend_programs,)``, ``tiles_per_program`` vocabulary tiles of
    ``block_v`` entries each; ``u_in_regs``: r <= ``block_r``, one U tile per vocabulary tile.
    """

    block_b: int
    block_h: int
    block_f: int
    row_blocks: int
    h_splits: int
    h_per_split: int
    block_rt: int
    r_splits: int
    block_v: int
    block_r: int
    u_in_regs: bool
    n_tiles: int
    tiles_per_program: int
    blend_programs: int


def plan_launch(B: int, V: int, H: int, F: int, R: int, *, sm_count: int | None = None,
                block_v: int | None = None, h_splits: int | None = None,
                tiles_per_program: int | None = None) -> LaunchPlan:
    """The launcher's tiling and grids for sizes alone (pure: no tensors, no device queries).

    ``sm_count``: the GPU's SM count (the CUDA rules below); None: the interpreter's rules (two
    hidden splits and two vocabulary tiles per blend program where the sizes allow, so those
    paths stay exercised). ``block_v`` / ``h_splits`` / ``tiles_per_program`` override the choice
    (tests, tuning). ``launch_configs`` calls this; the AOT compile tests and
    ``benchmarks/aot_resources.py`` call it too, so they compile what the launcher launches.
    """
    row_blocks = triton.cdiv(B, BLOCK_B) if B > 0 else 0
    block_h = max(16, min(BLOCK_H, triton.next_power_of_2(max(H, 1))))
    block_f = max(16, min(64, triton.next_power_of_2(max(F, 1))))
    h_chunks = max(1, triton.cdiv(H, block_h))
    if h_splits is None:
        if sm_count is not None:
            # about PROBE_WAVES x SMs programs, each reading >= MIN_H_PER_SPLIT columns of W1
            most = max(1, triton.cdiv(H, MIN_H_PER_SPLIT))
            h_splits = min(most, max(1, triton.cdiv(PROBE_WAVES * sm_count, max(row_blocks, 1))))
        else:
            h_splits = min(2, h_chunks)
    h_splits = max(1, min(int(h_splits), h_chunks))
    h_per_split = block_h * triton.cdiv(h_chunks, h_splits)
    h_splits = max(1, triton.cdiv(H, h_per_split))  # no empty split
    # t's rank slices: 16 for r <= 16, else 32 (32 x 64 fp32 Bt tiles; the full-rank head: R / 32 slices)
    block_rt = 16 if R <= 16 else 32
    r_splits = max(1, triton.cdiv(R, block_rt))
    # a vocabulary that is not a multiple of 16 (unaligned logit rows and r-major U columns: scalar
    # loads, a 64-bit address each) with 16 < r <= 64 takes the chunked path: the tile held across row
    # blocks spilled there on sm_90 (128 registers); the chunk is re-read per row block from L1/L2
    u_in_regs = R <= 16 or (R <= MAX_R_IN_REGISTERS and V % 16 == 0)
    block_r = max(16, triton.next_power_of_2(R)) if u_in_regs else MAX_R_IN_REGISTERS
    if block_v is None:
        # 64 x 16 U tiles for r <= 16, 32 x 64 above (and 64-rank chunks of the full-rank head):
        # tf32x3 dots split each operand in two, 128 x 16 took 83-137 registers, 16 x 64 152-162
        block_v = 64 if block_r <= 16 else 32
    n_tiles = triton.cdiv(V, block_v) if V > 0 else 0
    if tiles_per_program is None:
        if sm_count is not None:  # one tile per program (the hardware balances) until the grid is huge
            tiles_per_program = max(1, n_tiles // (BLEND_WAVES * sm_count))
        else:
            tiles_per_program = 2
    tiles_per_program = max(1, int(tiles_per_program))
    blend_programs = triton.cdiv(n_tiles, tiles_per_program) if n_tiles else 0
    return LaunchPlan(BLOCK_B, block_h, block_f, row_blocks, h_splits, h_per_split, block_rt, r_splits, block_v,
                      block_r, u_in_regs, n_tiles, tiles_per_program, blend_programs)


@dataclasses.dataclass
class Launch:
    """One kernel launch of a call: ``kernel[grid](*args, **meta)``."""

    name: str  # "probe", "latch" or "blend"
    kernel: object
    grid: tuple
    args: tuple
    meta: dict


def scratch_shape(plan: LaunchPlan, B: int, F: int, R: int) -> tuple[int, int]:
    """The one fp32 scratch a call allocates: ``[B, R + h_splits * F]`` (``t``, then launch 1's
    partial sums). Sized from shapes only (no data-dependent allocation: CUDA-graph capturable)."""
    return (B, R + plan.h_splits * F)


def launch_configs(probe_hidden, probe_rows, probe_mask, head_hidden, head_rows, logits, latched, p_out,
                   W1, b1, w2, b2, U, Bt, tau, eps, nan_latches=False, row_tau=None, row_probe=None,
                   state_rows=None, probe_extra=(), probe_sum=1, *, block_v=None, h_splits=None, tiles_per_program=None, sm_count=None,
                   scratch=None) -> list[Launch]:
    """The call's launches, in order (probe, latch, blend; none when ``B == 0``, no blend when
    ``V == 0``); no launch, no sync. Allocates the fp32 scratch (``torch.empty``, sized from shapes)
    unless ``scratch`` is given.

    ``sm_count``: plan for a GPU with that many SMs instead of asking the device (ahead-of-time
    compiles and cost models use it with ``meta`` tensors); by default CUDA tensors ask their
    device and other tensors get the interpreter's plan.
    """
    B, V = logits.shape
    if B == 0:
        return []
    H = probe_hidden.shape[1]
    F = W1.shape[-2]
    P = W1.shape[0] if W1.dim() == 3 else 1
    R = U.shape[1]
    N, M = probe_hidden.shape[0], head_hidden.shape[0]
    if sm_count is None and logits.device.type == "cuda":
        index = logits.device.index if logits.device.index is not None else torch.cuda.current_device()
        sm_count = _sm_count(index)
    plan = plan_launch(B, V, H, F, R, sm_count=sm_count, block_v=block_v, h_splits=h_splits,
                       tiles_per_program=tiles_per_program)
    if scratch is None:
        scratch = torch.empty(scratch_shape(plan, B, F, R), device=logits.device, dtype=torch.float32)
    t_buf, part = scratch[:, :R], scratch[:, R:]
    has_row_tau = row_tau is not None
    rtau = row_tau if has_row_tau else p_out  # never dereferenced without has_row_tau
    has_row_probe = row_probe is not None
    rprobe = row_probe if has_row_probe else probe_rows  # never dereferenced without HAS_ROW_PROBE
    has_state_rows = state_rows is not None
    srow = state_rows if has_state_rows else probe_rows  # never dereferenced without HAS_STATE_ROWS
    S = latched.shape[0] if has_state_rows else B
    stacked = W1.dim() == 3
    w1_sp, b1_sp, w2_sp = (W1.stride(0), b1.stride(0), w2.stride(0)) if stacked else (0, 0, 0)
    b2_s = b2.stride(0) if stacked else 0
    common = dict(BLOCK_B=plan.block_b, DOT_PREC=DOT_PRECISION, num_stages=NUM_STAGES)
    # the probe's input tensors in 8 slots (a slot past the parts repeats probe_hidden, never read)
    parts = [probe_hidden, *(probe_extra or ())]
    n_parts = len(parts)
    _check(1 <= n_parts <= MAX_PARTS and probe_sum in (1, 2) and n_parts % probe_sum == 0,
           f"{n_parts} probe input tensors with probe_sum={probe_sum}")
    slots = []
    for t in parts[1:] + [probe_hidden] * (MAX_PARTS - n_parts):
        slots += [t, t.stride(0), t.stride(1)]
    parts_meta = dict(N_PARTS=n_parts, PROBE_SUM=probe_sum) if n_parts > 1 else {}
    probe = Launch("probe", probe_kernel, (plan.row_blocks, plan.h_splits), (
        probe_hidden, probe_hidden.stride(0), probe_hidden.stride(1),
        *slots,
        probe_rows, probe_rows.stride(0),
        probe_mask, probe_mask.stride(0),
        rprobe, rprobe.stride(0),
        srow, srow.stride(0),
        W1, w1_sp, W1.stride(-2), W1.stride(-1),
        part, part.stride(0),
        B, H, F, P, N, S, plan.h_per_split,
    ), dict(HAS_ROW_PROBE=has_row_probe, HAS_STATE_ROWS=has_state_rows, BLOCK_H=plan.block_h, BLOCK_F=plan.block_f,
            num_warps=PROBE_WARPS, **parts_meta, **common))
    latch = Launch("latch", latch_kernel, (plan.row_blocks, plan.r_splits), (
        probe_rows, probe_rows.stride(0),
        probe_mask, probe_mask.stride(0),
        head_hidden, head_hidden.stride(0), head_hidden.stride(1),
        head_rows, head_rows.stride(0),
        latched, latched.stride(0),
        p_out, p_out.stride(0),
        rtau, rtau.stride(0),
        rprobe, rprobe.stride(0),
        srow, srow.stride(0),
        b1, b1_sp, b1.stride(-1), w2, w2_sp, w2.stride(-1), b2, b2_s,
        Bt, Bt.stride(0), Bt.stride(1),
        part, part.stride(0),
        t_buf, t_buf.stride(0),
        B, H, F, R, P, N, M, S, plan.h_splits,
        float(tau),
        int(bool(nan_latches)), int(has_row_tau),
    ), dict(HAS_ROW_PROBE=has_row_probe, HAS_STATE_ROWS=has_state_rows, BLOCK_H=plan.block_h, BLOCK_F=plan.block_f,
            BLOCK_R=plan.block_rt,
            num_warps=NUM_WARPS, **common))
    out = [probe, latch]
    if plan.blend_programs:
        out.append(Launch("blend", blend_kernel, (plan.blend_programs,), (
            head_rows, head_rows.stride(0),
            latched, latched.stride(0),
            srow, srow.stride(0),
            logits, logits.stride(0), logits.stride(1),
            U, U.stride(0), U.stride(1),
            t_buf, t_buf.stride(0),
            B, V, R, M, S, plan.tiles_per_program,
            float(1.0 + float(eps)), float(eps),
            int(bool(nan_latches)),
        ), dict(BLOCK_V=plan.block_v, HAS_STATE_ROWS=has_state_rows, BLOCK_R=plan.block_r, U_IN_REGS=plan.u_in_regs,
                BLOCK_ANY=BLOCK_ANY,
                OUT_BF16=logits.dtype == torch.bfloat16,
                num_warps=BLEND_WARPS_WIDE if plan.u_in_regs and plan.block_r > 16 else NUM_WARPS, **common)))
    return out


KERNELS = {"probe": probe_kernel, "latch": latch_kernel, "blend": blend_kernel}


def interpreting() -> bool:
    """True when Triton was imported in interpreter mode (TRITON_INTERPRET=1 before ``import triton``).

    Triton reads the variable when ``triton.language`` is imported (its builtins are jit
    functions decorated at import), not at launch: setting it later has no effect.
    """
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(probe_kernel, InterpretedFunction)


def check_device(device: torch.device) -> None:
    if device.type == "cpu" and not interpreting():
        raise RuntimeError(
            "steer_step_triton: CPU tensors need Triton's interpreter; set TRITON_INTERPRET=1 before "
            "triton is first imported (or use the C++ op / reference on CPU)"
        )


def run_launches(launches: list[Launch], wrap=None) -> None:
    """Launch each in order on the current stream; ``wrap`` (``torch.library.wrap_triton``) wraps
    the kernels for ``torch.compile``."""
    for ln in launches:
        k = ln.kernel if wrap is None else wrap(ln.kernel)
        k[ln.grid](*ln.args, **ln.meta)


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
    state_rows: torch.Tensor | None = None,
    probe_extra=(),
    probe_sum: int = 1,
    *,
    block_v: int | None = None,
    h_splits: int | None = None,
    tiles_per_program: int | None = None,
) -> None:
    """Run the three launches (same arguments and semantics as ``steer_step_reference``,
    ``row_tau`` and ``row_probe`` included).

    ``block_v`` / ``h_splits`` / ``tiles_per_program`` override the tiling (tests, tuning).
    """
    probe_extra = list(probe_extra or ())
    _check_inputs(probe_hidden, probe_rows, probe_mask, head_hidden, head_rows, logits, latched, p_out,
                  W1, b1, w2, b2, U, Bt, row_tau, row_probe, state_rows, probe_extra, probe_sum)
    if logits.shape[0] == 0:
        return
    check_device(logits.device)
    launches = launch_configs(probe_hidden, probe_rows, probe_mask, head_hidden, head_rows, logits, latched, p_out,
                              W1, b1, w2, b2, U, Bt, tau, eps, nan_latches, row_tau, row_probe, state_rows,
                              probe_extra, probe_sum, block_v=block_v,
                              h_splits=h_splits, tiles_per_program=tiles_per_program)
    if logits.device.type == "cuda":
        with torch.cuda.device(logits.device):
            run_launches(launches)
    else:
        run_launches(launches)
