"""Shared inputs and checks for the steer_step kernel tests (C++, Triton, torch op).

``make_case`` builds one call's arguments with a controlled layout (strided / transposed views),
row indexing (varlen prefill, decode, repeated rows), latch / probe-mask pattern, NaN hidden
states and -inf / huge logits. ``check_against_reference`` runs the reference on a copy and
compares a kernel's in-place results with it:

- ``latched``: exactly; ``p_out``: untouched entries bit-exactly (sentinel), probed entries to
  1e-5 (fp32 sums in a different order), NaN where the reference has NaN;
- logits of rows that end unlatched: bit-exactly equal to the input (zero writes);
- latched rows: same NaN/inf pattern; finite values by relative error ||ref-out||/||ref||
  (fp32) or, for fp16/bf16 logits, the flash-attention oracle: the kernel's max error against
  an fp32 reference is at most twice the error of the reference run in the low precision;
- with a per-row threshold (``make_case(row_tau=True)``), independently of the reference: the
  rows that fire only because of their own threshold are latched, the rows that the scalar
  ``tau`` would have latched but their own threshold does not are left unlatched;
- with stacked probes (``make_case(row_probe=True)``: two probe weight sets and a probe index
  per row), independently of the reference: every probed row's score is its own probe's
  (fp64 oracle), and some row's score differs from what the other probe would give.
- with a probe reading several layers (``make_case(layers=k, probe_sum=s)``: ``probe_extra`` holds
  ``k * s - 1`` more ``[N, H]`` tensors in rotating layouts, ``W1`` is ``[F, k H]``),
  independently of the reference (``assert_parts_scores``): every probed row's score is the fp64
  score of its concatenated layer states, and the extra tensors change some score.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from autosteer.runtime.reference_op import steer_step_reference

ARG_NAMES = ("probe_hidden", "probe_rows", "probe_mask", "head_hidden", "head_rows", "logits", "latched", "p_out",
             "W1", "b1", "w2", "b2", "U", "Bt")
P_SENTINEL = -7.25
LAYOUTS = ("contig", "sliced", "transposed", "indexed")
ROW_MODES = ("random", "varlen", "decode", "repeat", "hf_flat")
LATCH_MODES = ("none", "all", "mixed")
MASK_MODES = ("all", "none", "mixed")


@dataclass
class Case:
    args: dict
    tau: float
    eps: float
    nan_latches: bool
    info: dict = field(default_factory=dict)
    row_tau: torch.Tensor | None = None  # [B] float32 per-row thresholds (passed only when set)
    row_probe: torch.Tensor | None = None  # [B] probe index per row, with stacked [2, ...] probe weights
    probe_extra: tuple = ()  # more [N, H] probe input tensors (make_case(layers=..., probe_sum=...))
    probe_sum: int = 1

    @property
    def multi_part(self) -> bool:
        return bool(self.probe_extra) or self.probe_sum != 1

    def call_args(self, args: dict | None = None) -> tuple:
        a = self.args if args is None else args
        tail = () if self.row_tau is None else (self.row_tau,)
        if self.row_probe is not None:
            tail = (self.row_tau, self.row_probe)
        if self.multi_part:
            tail = (self.row_tau, self.row_probe, None, list(self.probe_extra), self.probe_sum)
        return tuple(a[n] for n in ARG_NAMES) + (self.tau, self.eps, self.nan_latches) + tail

    def clone(self) -> dict:
        """Fresh copies of the mutated tensors (same layout), the rest shared."""
        out = dict(self.args)
        for n in ("logits", "latched", "p_out"):
            t = self.args[n]
            c = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
            c.copy_(t)
            out[n] = c
        return out

    def __repr__(self) -> str:
        return f"Case({self.info})"


def _layout(x: torch.Tensor, layout: str, gen: torch.Generator) -> torch.Tensor:
    """The same values as ``x`` [n, H] in a given memory layout."""
    n, H = x.shape
    if layout == "contig":
        return x.contiguous()
    if layout == "sliced":  # row stride > H, offset into the storage
        base = torch.randn(n, H + 7, generator=gen).to(x.dtype).to(x.device)
        view = base[:, 3:3 + H]
    elif layout == "transposed":  # stride (1, n)
        view = torch.empty(H, n, dtype=x.dtype, device=x.device).t()
    elif layout == "indexed":  # a [n, 3, H] buffer indexed at [:, 1]: stride (3H, 1), offset H
        view = torch.randn(n, 3, H, generator=gen).to(x.dtype).to(x.device)[:, 1]
    else:
        raise ValueError(layout)
    view.copy_(x)
    return view


def _rows(mode: str, B: int, n_min: int, gen: torch.Generator, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """(rows [B], number of rows of the hidden buffer)."""
    if mode == "decode":  # one token per sequence, rows in order
        return torch.arange(B, dtype=dtype), max(B, n_min)
    if mode == "varlen":  # flattened prefill: last token of each sequence = cu_seqlens[1:] - 1
        lens = torch.randint(1, 6, (B,), generator=gen)
        cu = torch.zeros(B + 1, dtype=torch.int64)
        cu[1:] = torch.cumsum(lens, 0)
        return (cu[1:] - 1).to(dtype), max(int(cu[-1]), n_min)
    if mode == "hf_flat":  # [B, T, H] flattened, last position
        T = 4
        return (torch.arange(B) * T + T - 1).to(dtype), max(B * T, n_min)
    if mode == "repeat":  # several sequences read the same row
        n = max(2, n_min)
        return torch.randint(0, 2, (B,), generator=gen).to(dtype), n
    n = max(B + 3, n_min)
    return torch.randint(0, n, (B,), generator=gen).to(dtype), n


def _pattern(mode: str, B: int, gen: torch.Generator) -> torch.Tensor:
    if mode == "all":
        return torch.ones(B, dtype=torch.bool)
    if mode == "none":
        return torch.zeros(B, dtype=torch.bool)
    m = torch.rand(B, generator=gen) < 0.5
    if B >= 2:
        m[0], m[1] = True, False
    return m


def probe_state(parts, probe_sum: int, rows: torch.Tensor) -> torch.Tensor:
    """The probe input at ``rows``: the layers' states (``probe_sum`` consecutive parts summed in fp32),
    concatenated -- written independently of the reference (an explicit ``cat`` of fp32 sums)."""
    rows = rows.long().cpu()
    layers = []
    for lo in range(0, len(parts), probe_sum):
        acc = parts[lo].cpu().float()[rows]
        for t in parts[lo + 1: lo + probe_sum]:
            acc = acc + t.cpu().float()[rows]
        layers.append(acc)
    return torch.cat(layers, dim=1)


def _probe_scores64(x: torch.Tensor, W1, b1, w2, b2, row_probe=None) -> torch.Tensor:
    """fp64 probe scores of rows ``x [n, H]``; stacked weights: row ``i`` uses probe ``row_probe[i]``."""
    x = x.double()
    if row_probe is None:
        h = torch.relu(x @ W1.double().t() + b1.double())
        return torch.sigmoid(h @ w2.double() + b2.double().reshape(()))
    k = row_probe.long().cpu()
    h = torch.relu(torch.einsum("nfh,nh->nf", W1.double().cpu()[k], x.cpu()) + b1.double().cpu()[k])
    return torch.sigmoid((h * w2.double().cpu()[k]).sum(1) + b2.double().cpu()[k])


def safe_tau(p: torch.Tensor, target: float = 0.5, margin: float = 2e-4) -> float:
    """A threshold near ``target`` at least ``margin`` away from every finite score in ``p``."""
    vals = sorted(set(float(v) for v in p.flatten().tolist() if math.isfinite(v)))
    if not vals or all(abs(v - target) >= margin for v in vals):
        return target
    edges = [-1.0] + vals + [2.0]
    best, best_d = target, -1.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        if hi - lo < 2 * margin:
            continue
        mid = min(max((lo + hi) / 2, 1e-3), 1 - 1e-3)
        if mid - lo < margin or hi - mid < margin:
            continue
        d = -abs(mid - target)
        if d > best_d:
            best, best_d = mid, d
    return best


def make_case(
    B: int = 3,
    H: int = 37,
    V: int = 101,
    r: int | str = 8,
    F: int = 16,
    dtype: torch.dtype = torch.float32,
    *,
    seed: int = 0,
    device: str = "cpu",
    probe_layout: str = "contig",
    head_layout: str = "contig",
    logits_layout: str = "contig",
    row_mode: str = "random",
    rows_dtype: torch.dtype = torch.int64,
    latch_mode: str = "mixed",
    mask_mode: str = "mixed",
    fire_rate: float = 0.5,
    nan_probe_rows: bool = False,
    nan_head_rows: bool = False,
    special_logits: bool = False,
    nan_latches: bool = False,
    eps: float = 0.1,
    row_tau: bool = False,
    row_tau_layout: str = "contig",
    row_probe: bool = False,
    weights_layout: str = "contig",
    layers: int = 1,
    probe_sum: int = 1,
) -> Case:
    gen = torch.Generator().manual_seed(seed)
    n_parts = layers * probe_sum
    full_s = r == "full"
    R = H if full_s else int(r)

    probe_rows, N = _rows(row_mode, B, 1, gen, rows_dtype)
    head_rows, M = _rows(row_mode if row_mode != "random" else "decode", B, 1, gen, rows_dtype)
    x = torch.randn(N, H, generator=gen).to(dtype)
    g = torch.randn(M, H, generator=gen).to(dtype)
    # the probe's other input tensors (drawn only for a multi-part case: single-part cases keep their values)
    parts = [x] + [torch.randn(N, H, generator=gen).to(dtype) for _ in range(n_parts - 1)]
    probe_mask = _pattern(mask_mode, B, gen)
    latched = _pattern(latch_mode, B, gen)

    P = 2 if row_probe else None  # stacked: two probes (monitor mode's prefill and monitor probes)
    lead = () if P is None else (P,)
    W1 = torch.randn(*lead, F, layers * H, generator=gen) / math.sqrt(layers * H)
    b1 = 0.1 * torch.randn(*lead, F, generator=gen)
    w2 = 2.0 * torch.randn(*lead, F, generator=gen) / math.sqrt(F)
    b2 = 0.5 * torch.randn(P or 1, generator=gen)
    kp = None
    if row_probe:
        kp = torch.randint(0, P, (B,), generator=gen).to(rows_dtype)
        if B >= 2:  # both probes in use
            kp[0], kp[1] = 0, 1
    if full_s:  # S = I + A B^T with B^T = I: U = E A is [V, H]
        U = (torch.randn(V, H, generator=gen) / math.sqrt(H)).to(dtype)
        Bt = torch.eye(H).to(dtype)
    else:
        U = (torch.randn(V, R, generator=gen) / math.sqrt(max(R, 1))).to(dtype)
        Bt = (torch.randn(R, H, generator=gen) / math.sqrt(H)).to(dtype)

    nan_rows = []
    if nan_probe_rows and B > 0:
        probed = [b for b in range(B) if probe_mask[b]]
        nan_rows = probed[: max(1, len(probed) // 2)]
        for b in nan_rows:  # (a multi-part case: in its last part, so that the NaN comes from probe_extra)
            parts[-1][int(probe_rows[b])] = float("nan")
    if nan_head_rows and B > 0:
        g[int(head_rows[0])] = float("nan")

    logits = (3.0 * torch.randn(B, V, generator=gen)).to(dtype)
    if special_logits and B > 0 and V >= 4:
        big = {torch.float32: 3e38, torch.float16: 6e4, torch.bfloat16: 3e38}[dtype]
        logits[:, 0] = float("-inf")
        logits[:, 1] = big
        logits[:, 2] = -big
        logits[0, 3] = float("-inf")
    if B > 0 and V >= 1:  # NaN sentinel in rows that start unlatched: must come back bit-identical
        for b in range(B):
            if not latched[b] and not probe_mask[b]:
                logits[b, V - 1] = float("nan")

    # threshold at a safe distance from every score (fp32 kernels must agree on the latch)
    if B > 0:
        xs = probe_state(parts, probe_sum, probe_rows)
        p64 = _probe_scores64(xs, W1, b1, w2, b2, kp)
        finite = p64[torch.isfinite(p64)]
        q = torch.quantile(finite, 1 - fire_rate).item() if finite.numel() else 0.5
        tau = safe_tau(p64, min(max(q, 0.01), 0.99))
    else:
        tau = 0.5
    rt, rt_info = None, {}
    if row_tau:
        tau, rt, rt_info = _row_thresholds(p64 if B > 0 else torch.zeros(0, dtype=torch.float64), probe_mask, latched,
                                           tau, nan_latches, seed, gen)

    p_out = torch.full((B,), P_SENTINEL)
    dev = torch.device(device)
    args = dict(
        probe_hidden=_layout(x.to(dev), probe_layout, gen),
        probe_rows=probe_rows.to(dev),
        probe_mask=probe_mask.to(dev),
        head_hidden=_layout(g.to(dev), head_layout, gen),
        head_rows=head_rows.to(dev),
        logits=_layout(logits.to(dev), logits_layout, gen),
        latched=latched.to(dev),
        p_out=p_out.to(dev),
        W1=W1.to(dev), b1=b1.to(dev), w2=w2.to(dev), b2=b2.to(dev),
        U=U.to(dev), Bt=Bt.to(dev),
    )
    extra = []
    for j, t in enumerate(parts[1:], 1):  # the other parts in rotating layouts (transposed ones included)
        extra.append(_layout(t.to(dev), LAYOUTS[(LAYOUTS.index(probe_layout) + j) % len(LAYOUTS)], gen))
    if weights_layout == "strided":  # the same probe weights as strided views (kernels must follow strides)
        for n in ("W1", "b1", "w2", "b2"):
            t = args[n]
            lead, last = tuple(t.shape[:-1]), 3 * t.shape[-1] + 1
            if row_probe and lead:  # the probe axis strided too
                buf = torch.full((2 * lead[0], *lead[1:], last), float("nan"), device=dev)[::2]
            else:
                buf = torch.full((*lead, last), float("nan"), device=dev)
            args[n] = buf[..., 1::3]
            args[n].copy_(t)
    elif weights_layout != "contig":
        raise ValueError(weights_layout)
    info = dict(B=B, H=H, V=V, r=r, dtype=str(dtype).replace("torch.", ""), seed=seed, probe_layout=probe_layout,
                head_layout=head_layout, logits_layout=logits_layout, row_mode=row_mode, latch=latch_mode,
                mask=mask_mode, nan_rows=nan_rows, special=special_logits, nan_latches=nan_latches,
                weights_layout=weights_layout)
    if n_parts > 1 or probe_sum != 1:
        info.update(layers=layers, probe_sum=probe_sum)
        if B > 0:  # fp64 scores of the full input, and with the extra tensors zeroed (they must matter)
            zeroed = [parts[0]] + [torch.zeros_like(t) for t in parts[1:]]
            info.update(p64_parts=p64.tolist(), p64_first_part_only=_probe_scores64(
                probe_state(zeroed, probe_sum, probe_rows), W1, b1, w2, b2, kp).tolist())
    if rt is not None:
        if row_tau_layout == "strided":  # column 1 of a [B, 2] buffer: stride 2, offset 1
            buf = torch.full((B, 2), float("nan"), dtype=torch.float32, device=dev)
            buf[:, 1] = rt.to(dev)
            rt = buf[:, 1]
        elif row_tau_layout == "contig":
            rt = rt.to(dev)
        else:
            raise ValueError(row_tau_layout)
        info.update(row_tau_layout=row_tau_layout, **rt_info)
    if kp is not None:
        p_sel = p64 if B > 0 else torch.zeros(0, dtype=torch.float64)
        other = _probe_scores64(xs, W1, b1, w2, b2, 1 - kp.long()) if B > 0 else torch.zeros(0)
        info.update(row_probe=kp.tolist(), p64=p_sel.tolist(), p64_other_probe=other.tolist())
        kp = kp.to(dev)
    return Case(args=args, tau=float(tau), eps=float(eps), nan_latches=nan_latches, info=info, row_tau=rt,
                row_probe=kp, probe_extra=tuple(extra), probe_sum=probe_sum)


def _row_thresholds(p64, probe_mask, latched, tau, nan_latches, seed, gen):
    """(scalar tau, row_tau [B] fp32, info) for a per-row threshold case.

    The scalar ``tau`` is moved to split the rows that can still latch (probed, unlatched, finite
    score) in two; then the first of them below ``tau`` gets a threshold under its score (it
    fires only because of its own threshold) and the first above ``tau`` one over its score (it
    does not fire only because of its own threshold); the others get a random side. Every
    threshold is at least 2e-3 away from the score. Rows not probed get -1 (it would fire any
    score), NaN rows -1 without ``nan_latches`` and 2 with it (the threshold must not matter).
    """
    B = p64.shape[0]
    eligible = [b for b in range(B) if probe_mask[b] and not latched[b] and math.isfinite(float(p64[b]))]
    ev = sorted(float(p64[b]) for b in eligible)
    if len(ev) >= 2:
        k = len(ev) // 2
        tau = safe_tau(p64, (ev[k - 1] + ev[k]) / 2)
    elif len(ev) == 1:
        tau = safe_tau(p64, ev[0] + (0.1 if seed % 2 == 0 else -0.1))
    rt = torch.empty(B, dtype=torch.float32)
    forced_fire = forced_block = False
    for b in range(B):
        p = float(p64[b])
        if not probe_mask[b]:
            rt[b] = -1.0
        elif not math.isfinite(p):
            rt[b] = 2.0 if nan_latches else -1.0
        else:
            m = 2e-3 + 0.2 * float(torch.rand((), generator=gen))
            below = float(torch.rand((), generator=gen)) < 0.5
            if b in eligible and p < tau and not forced_fire:
                below, forced_fire = True, True
            elif b in eligible and p > tau and not forced_block:
                below, forced_block = False, True
            rt[b] = p - m if below else p + m
    fire_only = [b for b in eligible if float(p64[b]) < tau and float(p64[b]) > float(rt[b])]
    block_only = [b for b in eligible if float(p64[b]) > tau and float(p64[b]) < float(rt[b])]
    return tau, rt, dict(row_tau_fire_only=fire_only, row_tau_block_only=block_only)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _upcast(args: dict) -> dict:
    out = dict(args)
    for n in ("probe_hidden", "head_hidden", "U", "Bt"):
        out[n] = args[n].float()
    out["logits"] = args["logits"].float()
    out["latched"] = args["latched"].clone()
    out["p_out"] = args["p_out"].clone()
    return out


def run_reference(case: Case, args: dict | None = None) -> dict:
    a = case.clone() if args is None else args
    steer_step_reference(*case.call_args(a))
    return a


def check_against_reference(case: Case, out: dict, *, fp32_rtol: float = 1e-5) -> None:
    """``out``: the arguments (a ``case.clone()``) after the kernel ran on them."""
    inp = case.args
    ref = run_reference(case)
    ctx = repr(case)

    # latch and scores
    assert torch.equal(out["latched"].cpu(), ref["latched"].cpu()), f"latched differs {ctx}:\n{out['latched']}\n{ref['latched']}"
    if case.row_tau is not None:  # the per-row threshold decided these rows, not the scalar tau
        lat_out = out["latched"].cpu()
        fire_only, block_only = case.info["row_tau_fire_only"], case.info["row_tau_block_only"]
        assert bool(lat_out[fire_only].all()), f"rows {fire_only} must latch on their own threshold {ctx}"
        assert not bool(lat_out[block_only].any()), f"rows {block_only} must not latch (own threshold) {ctx}"
    mask = inp["probe_mask"].cpu()
    po, pr, p0 = out["p_out"].cpu(), ref["p_out"].cpu(), inp["p_out"].cpu()
    assert torch.equal(_bits(po[~mask]), _bits(p0[~mask])), f"p_out written where probe_mask is False {ctx}"
    assert torch.equal(torch.isnan(po[mask]), torch.isnan(pr[mask])), f"p_out NaN pattern differs {ctx}: {po} {pr}"
    fin = mask & ~torch.isnan(pr)
    if fin.any():
        err = (po[fin] - pr[fin]).abs().max().item()
        assert err <= 1e-5, f"p_out error {err} {ctx}: {po} vs {pr}"

    # logits
    lat = ref["latched"].cpu()
    lo, lr, l0 = out["logits"].cpu(), ref["logits"].cpu(), inp["logits"].cpu()
    if (~lat).any():
        assert torch.equal(_bits(lo[~lat]), _bits(l0[~lat])), f"an unlatched row was written {ctx}"
    if not lat.any():
        return
    a, b = lo[lat].double(), lr[lat].double()
    assert torch.equal(torch.isnan(a), torch.isnan(b)), f"NaN pattern differs {ctx}: {int(torch.isnan(a).sum())} vs {int(torch.isnan(b).sum())}"
    inf_a, inf_b = torch.isinf(a), torch.isinf(b)
    assert torch.equal(inf_a, inf_b) and torch.equal(a[inf_a], b[inf_b]), f"inf pattern differs {ctx}"
    neg_inf_in = torch.isneginf(l0[lat].double())
    assert torch.isneginf(a[neg_inf_in]).all(), f"-inf logits did not stay -inf {ctx}"
    finite = torch.isfinite(a) & torch.isfinite(b)
    if not finite.any():
        return
    if lo.dtype == torch.float32:
        num = (a[finite] - b[finite]).norm().item()
        den = b[finite].norm().item()
        rel = num / max(den, 1e-30)
        assert rel <= fp32_rtol, f"relative error {rel:.3e} > {fp32_rtol} {ctx}"
    else:
        # flash-attention oracle against an fp32 run of the reference on the same (upcast) inputs
        ref32 = _upcast(inp)
        steer_step_reference(*case.call_args(ref32))
        c = ref32["logits"].cpu()[lat].double()
        ok = finite & torch.isfinite(c)
        err_kernel = (a[ok] - c[ok]).abs().max().item() if ok.any() else 0.0
        err_ref = (b[ok] - c[ok]).abs().max().item() if ok.any() else 0.0
        floor = 1e-6 * max(1.0, c[ok].abs().max().item() if ok.any() else 1.0)
        assert err_kernel <= 2 * err_ref + floor, (
            f"low-precision error {err_kernel:.3e} > 2 x reference error {err_ref:.3e} {ctx}")


# ----------------------------------------------------------------------------- shared grids
SHAPES = ((37, 101), (64, 256), (96, 130))  # (H, V): odd sizes; H=96 with r="full" exceeds 64 (Triton scratch path)
RANKS = (1, 8, "full")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BATCHES = (0, 1, 3, 17)


def variant(i: int) -> dict:
    """Deterministic rotation of the secondary options, so the grid covers each of them."""
    return dict(
        probe_layout=LAYOUTS[i % len(LAYOUTS)],
        head_layout=LAYOUTS[(i // 2) % len(LAYOUTS)],
        logits_layout=("contig", "sliced")[(i // 3) % 2],
        row_mode=ROW_MODES[i % len(ROW_MODES)],
        rows_dtype=(torch.int64, torch.int32)[i % 2],
        latch_mode=LATCH_MODES[(i // 2) % len(LATCH_MODES)],
        mask_mode=MASK_MODES[i % len(MASK_MODES)],
        seed=i,
    )


def grid_params():
    out = []
    i = 0
    for B in BATCHES:
        for H, V in SHAPES:
            for r in RANKS:
                for dt in DTYPES:
                    out.append((B, H, V, r, dt, i))
                    i += 1
    return out


def grid_id(p) -> str:
    B, H, V, r, dt, i = p
    return f"B{B}-H{H}-V{V}-r{r}-{str(dt).replace('torch.', '')}"


def fuzz_examples(default: int) -> int:
    import os

    return int(os.environ.get("AUTOSTEER_FUZZ_EXAMPLES", default))


def fuzz_case_strategy(max_B: int = 20, max_H: int = 80, max_V: int = 300, parts: bool = False):
    """A hypothesis strategy drawing ``make_case`` keyword arguments (``parts``: also the layers and
    ``probe_sum`` of a multi-part probe; off, the strategy draws exactly what it drew before)."""
    from hypothesis import strategies as st

    more = dict(layers=st.integers(1, 4), probe_sum=st.sampled_from((1, 2))) if parts else {}
    return st.fixed_dictionaries(dict(**more,
        B=st.integers(0, max_B),
        H=st.integers(1, max_H),
        V=st.integers(1, max_V),
        r=st.one_of(st.integers(1, 20), st.just("full")),
        F=st.integers(1, 40),
        dtype=st.sampled_from(DTYPES),
        seed=st.integers(0, 2**31 - 1),
        probe_layout=st.sampled_from(LAYOUTS),
        head_layout=st.sampled_from(LAYOUTS),
        logits_layout=st.sampled_from(("contig", "sliced", "transposed")),
        row_mode=st.sampled_from(ROW_MODES),
        rows_dtype=st.sampled_from((torch.int32, torch.int64)),
        latch_mode=st.sampled_from(LATCH_MODES),
        mask_mode=st.sampled_from(MASK_MODES),
        fire_rate=st.floats(0.0, 1.0),
        nan_probe_rows=st.booleans(),
        special_logits=st.booleans(),
        nan_latches=st.booleans(),
        eps=st.sampled_from((0.1, 0.5, 1.0, -0.3)),
        row_tau=st.booleans(),
        row_tau_layout=st.sampled_from(("contig", "strided")),
        row_probe=st.booleans(),
    ))


def assert_row_probe_scores(case, out: dict, both: bool = True) -> None:
    """Independently of the reference: each probed row's score is its own probe's (fp64 oracle),
    and the case is decisive -- some probed row's score would differ under the other probe, and
    (``both``) probed rows use each of the two probes."""
    mask = case.args["probe_mask"].cpu()
    p64, other = torch.tensor(case.info["p64"]), torch.tensor(case.info["p64_other_probe"])
    po = out["p_out"].cpu().double()
    fin = mask & torch.isfinite(p64)
    assert fin.any(), case
    if both:
        used = {int(k) for k, f in zip(case.info["row_probe"], fin.tolist()) if f}
        assert used == {0, 1}, f"vacuous: probed rows use probes {used} only {case}"
    assert (po[fin] - p64[fin]).abs().max().item() <= 1e-5, f"a row was scored by the wrong probe {case}: {po} vs {p64}"
    assert (other[fin] - p64[fin]).abs().max().item() > 1e-3, f"vacuous: both probes agree on every row {case}"


def assert_parts_scores(case, out: dict) -> None:
    """Independently of the reference, for a multi-part case: every probed row's score is the fp64 score of
    its concatenated layer states (``probe_state``), and the case is decisive -- zeroing the extra tensors
    would change some probed row's score."""
    mask = case.args["probe_mask"].cpu()
    p64, first = torch.tensor(case.info["p64_parts"]), torch.tensor(case.info["p64_first_part_only"])
    po = out["p_out"].cpu().double()
    fin = mask & torch.isfinite(p64)
    assert fin.any(), case
    assert (po[fin] - p64[fin]).abs().max().item() <= 1e-5, f"a row's score is not its layers' {case}: {po} vs {p64}"
    assert (first[fin] - p64[fin]).abs().max().item() > 1e-3, f"vacuous: the extra tensors change no score {case}"


def assert_row_tau_decisive(case):
    """The case must have rows whose latch only the per-row threshold decides (else the test is vacuous)."""
    fire_only, block_only = case.info["row_tau_fire_only"], case.info["row_tau_block_only"]
    if case.info["B"] >= 2 and case.info["mask"] == "all":
        assert fire_only and block_only, case
    elif case.info["B"] >= 1:
        assert fire_only or block_only, case


# ----------------------------------------------------------------------------- per-request state by index
STATE_NAMES = ("probe_mask", "latched", "p_out")  # the per-request tensors among ARG_NAMES


@dataclass
class StateCase:
    """A :class:`Case` with its per-request tensors scattered into tables of ``S`` entries (a serving store's
    slot tables): row ``b`` lives at entry ``state_rows[b]``; the other entries hold values no row may touch."""

    case: Case
    state_rows: torch.Tensor  # [B]
    tables: dict  # name -> [S] table (probe_mask, latched, p_out, and row_tau / row_probe when the case has them)

    def clone_args(self) -> tuple[dict, dict]:
        """(argument dict for the call, fresh tables): the mutated tables copied, the case's tensors shared."""
        t = {n: v.clone() for n, v in self.tables.items()}
        a = self.case.clone()
        a.update({n: t[n] for n in STATE_NAMES})
        return a, t

    def call_args(self, a: dict, tables: dict) -> tuple:
        c = self.case
        return (tuple(a[n] for n in ARG_NAMES) + (c.tau, c.eps, c.nan_latches, tables.get("row_tau"),
                                                  tables.get("row_probe"), self.state_rows)
                + ((list(c.probe_extra), c.probe_sum) if c.multi_part else ()))

    def rows_of(self, a: dict) -> dict:
        """The call's results in the row order of :attr:`case` (for ``check_against_reference``)."""
        s = self.state_rows.long().cpu()
        out = dict(a)
        for n in STATE_NAMES:
            out[n] = a[n].cpu()[s].to(a[n].device)
        return out

    def assert_others_untouched(self, a: dict) -> None:
        s = self.state_rows.long().cpu()
        keep = torch.ones(self.tables["latched"].shape[0], dtype=torch.bool)
        keep[s] = False
        for n in ("latched", "p_out"):
            assert torch.equal(_bits(a[n].cpu()[keep]) if n == "p_out" else a[n].cpu()[keep],
                               _bits(self.tables[n].cpu()[keep]) if n == "p_out" else self.tables[n].cpu()[keep]), \
                f"{n} written at an entry no row names {self.case}"


def state_case(case: Case, extra: int = 5, *, seed: int = 0, dtype: torch.dtype = torch.int64) -> StateCase:
    """Scatter ``case``'s per-request tensors into tables of ``B + extra`` entries at random distinct entries.
    The other entries are set so that touching them shows: latched True with ``probe_mask`` True (a kernel that
    read them would probe / steer something), ``p_out`` a sentinel, odd thresholds and probe indices."""
    gen = torch.Generator().manual_seed(1000 + seed)
    B = case.args["logits"].shape[0]
    dev = case.args["logits"].device
    S = B + extra
    perm = torch.randperm(S, generator=gen)[:B]
    tables = {"probe_mask": torch.ones(S, dtype=torch.bool), "latched": torch.ones(S, dtype=torch.bool),
              "p_out": torch.full((S,), P_SENTINEL - 1.0, dtype=torch.float32)}
    for n in STATE_NAMES:
        tables[n][perm] = case.args[n].cpu()
    if case.row_tau is not None:
        tables["row_tau"] = torch.full((S,), -1.0)
        tables["row_tau"][perm] = case.row_tau.cpu()
    if case.row_probe is not None:
        tables["row_probe"] = torch.zeros(S, dtype=case.row_probe.dtype)
        tables["row_probe"][perm] = case.row_probe.cpu()
    tables = {n: t.to(dev) for n, t in tables.items()}
    return StateCase(case, perm.to(dtype).to(dev), tables)


def check_state_case(sc: StateCase, a: dict) -> None:
    """``a``: the arguments after a kernel ran on them with ``state_rows``. The results equal the reference's
    on the row-ordered case, entries no row names are untouched, and the reference called with ``state_rows``
    gives the same as the reference on rows (the contract's two forms agree)."""
    check_against_reference(sc.case, sc.rows_of(a))
    sc.assert_others_untouched(a)
    ra, rt = sc.clone_args()
    steer_step_reference(*sc.call_args(ra, rt))
    rows = run_reference(sc.case)
    got = sc.rows_of(ra)
    for n in ("latched", "p_out", "logits"):
        assert torch.equal(_bits(got[n].cpu()) if got[n].is_floating_point() else got[n].cpu(),
                           _bits(rows[n].cpu()) if rows[n].is_floating_point() else rows[n].cpu()), \
            f"the reference with state_rows differs from the reference on rows: {n} {sc.case}"
