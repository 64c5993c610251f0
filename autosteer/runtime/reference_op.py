"""The per-decode-step work of AutoSteer in plain PyTorch: the reference every kernel must match.

One call per decode step (and once at prefill) does, for each sequence ``b`` of the batch:

1. **gather**: ``x_b = probe_hidden[probe_rows[b]]`` -- the residual stream entering decoder
   block ``L`` at this sequence's newest token. ``probe_hidden`` is a flat ``[N, H]`` tensor
   (any row stride), so Hugging Face's ``[B, T, H]`` (flattened) and servers' varlen
   ``[total_tokens, H]`` layouts both fit.
   **Several layers, (hidden, residual) pairs** (``probe_extra``, ``probe_sum``): with
   ``parts = [probe_hidden, *probe_extra]`` (``n`` tensors, each ``[N, H]``, probe_hidden's dtype
   and device, any strides), ``probe_sum`` in {1, 2} dividing ``n`` and ``k = n // probe_sum``
   layers (``1 <= k <= 4``), layer ``l``'s state at row ``i`` is
   ``sum_{j < probe_sum} float32(parts[l * probe_sum + j][i])`` (summed in fp32: a serving engine
   holds each layer's residual stream as ``hidden + residual``), and ``x_b`` is the concatenation
   of the ``k`` layers' states at row ``probe_rows[b]``: ``k * H`` fp32 values. The op reads the
   parts itself, so a step needs no ``cat`` and no ``add`` of its own. The default
   (``probe_extra = []``, ``probe_sum = 1``) is the single tensor above.
2. **probe** (only where ``probe_mask[b]``):
   ``p_b = sigmoid(w2 . relu(W1 x_b + b1) + b2)`` in fp32, written to ``p_out[b]``; ``W1`` is
   ``[F, k * H]``.
3. **latch**: ``latched[b] |= p_b > tau_b`` with ``tau_b = row_tau[b]`` when the optional
   per-row threshold ``row_tau`` (fp32 ``[B]``) is given, else the scalar ``tau`` for every row
   (``tau`` is then ignored): serving engines mix rows probing a generated token with rows
   probing their last prompt token, which monitor mode thresholds differently.
   **Several probes**: when the probe weights are stacked -- ``W1 [P, F, k * H]``, ``b1 [P, F]``,
   ``w2 [P, F]``, ``b2 [P]`` -- the optional ``row_probe`` (int32/int64 ``[B]``, values in
   ``[0, P)``) picks the probe of each row: monitor mode scores prompt tokens with the prefill
   probe and generated tokens with its own monitor probe, still in one call. A NaN score
   latches only when ``nan_latches`` (fail closed), whatever the threshold; otherwise it leaves
   the latch as it was (fail open). Rows not probed keep their latch and their ``p_out`` entry.
4. **blend** (only rows latched after step 3), in place on ``logits[b, :]``:
   ``z' = (1 + eps) * z + eps * U (Bt g_b)`` with ``g_b = head_hidden[head_rows[b]]`` the final
   normed hidden state (the input of ``lm_head``), computed in fp32 and cast back to the
   logits' dtype. This is the exact LM-Steer identity ``E (g + eps S g)`` for
   ``S = I + A B^T`` with ``U = E A`` (``[V, r]``, precomputed once) and ``Bt = B^T``
   (``[r, H]``); a full ``S`` is the case ``A = S - I``, ``Bt = I``. ``-inf`` logits stay
   ``-inf`` (never NaN) because the delta is finite.

Rows that are not latched receive **no writes**: their logits stay bit-identical.

**Per-request state by index** (``state_rows``, optional int32/int64 ``[B]``): when given, the
per-request tensors -- ``probe_mask``, ``latched``, ``p_out``, ``row_tau`` and ``row_probe`` -- are
read and written at ``state_rows[b]`` instead of ``b``: they are tables of any length ``S`` (a
serving engine's per-request slot tables), and ``state_rows`` maps this call's rows to their
entries (distinct entries; a repeated one is not checked and its result is undefined). The
per-row inputs of this call (``probe_rows``, ``head_rows``, ``logits``) stay indexed by ``b``.
Entries not named by ``state_rows`` are never read or written. An entry outside ``[0, S)`` raises
here and in the C++ kernel; the Triton kernel cannot raise: such a row reads and writes no state
and is steered exactly when ``nan_latches`` (its latch is unknown: the fail-closed policy decides).
"""
from __future__ import annotations

import torch


def refusal_basis(E: torch.Tensor, A: torch.Tensor, *, device=None, block_rows: int = 16384) -> torch.Tensor:
    """``U = E A`` ([V, r] fp32), the op's precomputed refusal-logit basis, for output embedding ``E``
    ([V, H], any float dtype) and the Refusal Head's ``A`` ([H, r]).

    Computed over blocks of ``block_rows`` vocabulary rows, so no fp32 copy of the whole ``E`` is
    made (for a 128k x 4096 bf16 embedding that copy would be 2 GiB, at start-up, on a GPU the
    weights already fill). Stored r-major -- ``[r, V]`` memory viewed as ``[V, r]`` -- so a
    vocabulary block of ``U`` is a contiguous run per rank, which both kernels read fastest.
    """
    if E.dim() != 2 or A.dim() != 2 or E.shape[1] != A.shape[0]:
        raise ValueError(f"refusal_basis: E [V, H] and A [H, r] expected, got {tuple(E.shape)} and {tuple(A.shape)}")
    device = E.device if device is None else torch.device(device)
    At = A.detach().to(device=device, dtype=torch.float32).t()
    V = E.shape[0]
    Ut = torch.empty(At.shape[0], V, dtype=torch.float32, device=device)
    with torch.no_grad():
        for i in range(0, V, block_rows):
            block = E[i: i + block_rows].detach().to(device=device, dtype=torch.float32)
            Ut[:, i: i + block.shape[0]] = At @ block.t()
    return Ut.t()


def steer_step_reference(
    probe_hidden: torch.Tensor,  # [N, H] float, any row stride
    probe_rows: torch.Tensor,  # [B] int32/int64, row of probe_hidden per sequence
    probe_mask: torch.Tensor,  # [B] bool, run the probe for this row at this step
    head_hidden: torch.Tensor,  # [M, H] float, lm_head input rows
    head_rows: torch.Tensor,  # [B] int32/int64, row of head_hidden per sequence
    logits: torch.Tensor,  # [B, V] float, modified in place
    latched: torch.Tensor,  # [B] bool, modified in place
    p_out: torch.Tensor,  # [B] float32, written where probe_mask
    W1: torch.Tensor,  # [F, H] float32
    b1: torch.Tensor,  # [F] float32
    w2: torch.Tensor,  # [F] float32
    b2: torch.Tensor,  # [1] float32
    U: torch.Tensor,  # [V, r] float
    Bt: torch.Tensor,  # [r, H] float
    tau: float,
    eps: float,
    nan_latches: bool = False,
    row_tau: torch.Tensor | None = None,  # [B] float32, per-row threshold replacing tau
    row_probe: torch.Tensor | None = None,  # [B] int32/int64, probe of each row (stacked weights only)
    state_rows: torch.Tensor | None = None,  # [B] int32/int64: entry of the per-request tensors per row
    probe_extra=(),  # more [N, H] tensors: the probe reads [probe_hidden, *probe_extra] (see step 1)
    probe_sum: int = 1,  # 1 or 2 consecutive parts summed (in fp32) per layer
) -> None:
    """Gather + probe + latch + refusal-logit blend; see the module docstring for the exact semantics."""
    B = logits.shape[0]
    if B == 0:
        return
    parts = [probe_hidden, *(probe_extra or ())]
    if probe_sum not in (1, 2) or len(parts) % probe_sum or not 1 <= len(parts) // probe_sum <= 4:
        raise ValueError(f"probe_sum must be 1 or 2 and divide the {len(parts)} probe input tensor(s) into 1 to 4 "
                         f"layers, got probe_sum={probe_sum}")
    if state_rows is not None:  # the same work on row-ordered copies of the named entries, written back
        s = state_rows.long()
        S = latched.shape[0]
        if int(s.min()) < 0 or int(s.max()) >= S:
            raise IndexError(f"state_rows values must be in [0, {S}), got {s.tolist()}")
        lat, po = latched[s].clone(), p_out[s].clone()
        steer_step_reference(probe_hidden, probe_rows, probe_mask[s], head_hidden, head_rows, logits, lat, po,
                             W1, b1, w2, b2, U, Bt, tau, eps, nan_latches,
                             None if row_tau is None else row_tau[s], None if row_probe is None else row_probe[s],
                             None, probe_extra, probe_sum)
        latched[s] = lat
        p_out[s] = po  # (entries not probed: their own value back)
        return
    probe_rows = probe_rows.long()
    head_rows = head_rows.long()
    mask = probe_mask.bool()
    if bool(mask.any()):
        sel = probe_rows[mask]
        if len(parts) == 1:
            x = probe_hidden.index_select(0, sel).float()
        else:  # the k layers' states, each the fp32 sum of probe_sum parts, concatenated
            layers = []
            for lo in range(0, len(parts), probe_sum):
                st = parts[lo].index_select(0, sel).float()
                for t in parts[lo + 1: lo + probe_sum]:
                    st = st + t.index_select(0, sel).float()
                layers.append(st)
            x = torch.cat(layers, dim=1)
        if row_probe is None:
            hid = torch.relu(x @ W1.float().t() + b1.float())
            p = torch.sigmoid(hid @ w2.float() + b2.float().reshape(()))
        else:
            k = row_probe.long()[mask]
            if k.numel() and (int(k.min()) < 0 or int(k.max()) >= W1.shape[0]):
                raise IndexError(f"row_probe values must be in [0, {W1.shape[0]}), got {k.tolist()}")
            hid = torch.relu(torch.einsum("nfh,nh->nf", W1.float()[k], x) + b1.float()[k])
            p = torch.sigmoid((hid * w2.float()[k]).sum(1) + b2.float().reshape(-1)[k])
        p_out[mask] = p
        fire = p > (tau if row_tau is None else row_tau[mask].float())
        if nan_latches:
            fire = fire | torch.isnan(p)
        latched[mask] = latched[mask] | fire
    rows = latched.nonzero().flatten()
    if rows.numel() == 0:
        return
    g = head_hidden.index_select(0, head_rows[rows]).float()
    delta = (g @ Bt.float().t()) @ U.float().t()  # [n, V]
    z = logits.index_select(0, rows).float()
    logits[rows] = ((1.0 + eps) * z + eps * delta).to(logits.dtype)
