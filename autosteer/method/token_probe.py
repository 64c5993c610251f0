"""The pooled gate's second probe: a token-level probe whose prompt score is its highest token's
(``FitConfig.pooling = "last_token|max"``, docs/method.md 7k and 7l).

A harmful request reworded (past tense, a hypothetical, an indirect ask) or buried in a long prompt still
contains the request's own words; the state at the last prompt token may not show it, one token's state
often does. The probe has the form of the gate probe (``sigmoid(w2 . relu(W1 h + b1) + b2)`` on the gate
layers' states side by side, ``[k*H]``) but reads every prompt token from position ``skip`` on (the tokens
every prompt of the fit shares, the chat header and system prompt, are left out); a prompt's score is the
highest of its tokens'. It is trained as a multiple-instance learner: the prompt's label on its max token.
The served gate fires when either probe's probability passes tau (one threshold on the higher of the two,
set by the fit's false-positive budget on the union's out-of-fold scores).
"""
from __future__ import annotations

import time

import torch

from .probe import Probe


@torch.no_grad()
def prompt_token_states(model, tokenizer, prompts: list[str], fmt, layers: list[int], batch_size: int = 16,
                        skip: int | None = None, progress: bool = False):
    """Every prompt's states entering ``layers`` at each token from position ``skip`` on:
    ``(states [T, k, H] fp16, tokens [M], starts [n + 1], skip)``; prompt i's token states are
    ``states[tokens[starts[i]:starts[i + 1]]]``, in order. ``skip=None``: the number of tokens every prompt
    shares (the chat template's system turn). Prompts sharing a longer prefix (one jailbreak template) run it
    once into a KV cache, by the last-token extraction's driver (``hidden_states.prefix_group_forwards``), and
    share its rows. Text prompts only."""
    from ..prompting import common_prefix_len, encode_one
    from .hidden_states import prefix_group_forwards

    if any(not isinstance(p, str) for p in prompts):
        raise ValueError("the pooled gate reads text prompts only (an image prompt has no token states to pool here)")
    seqs = [encode_one(tokenizer, t, fmt) for t in prompts]
    if skip is None:  # what every prompt shares, each keeping at least its last token
        skip = min(min(common_prefix_len(seqs[0], s), len(s) - 1) for s in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows: list[torch.Tensor] = []
    n_rows = 0
    own: list[list[torch.Tensor]] = [[] for _ in seqs]

    def keep(st: torch.Tensor) -> torch.Tensor:
        nonlocal n_rows
        rows.append(st.to(torch.float16).clone())
        n_rows += len(st)
        return torch.arange(n_rows - len(st), n_rows)

    prefix_rows: dict[int, list[torch.Tensor]] = {}  # id(group members) -> the group prefix's rows from skip on
    t0, done = time.time(), 0
    forwards = prefix_group_forwards(model, seqs, layers, batch_size, pad, tail=0,
                                     read=lambda h, _last: h.detach().float().cpu())
    for kind, p, members, b, got in forwards:
        if kind == "prefix":
            prefix_rows[id(members)] = [keep(torch.stack([got[layer][0, skip:p] for layer in layers], 1))] if p > skip else []
            continue
        st = torch.stack([got[layer] for layer in layers], 2)  # [B, W, k, H]
        for r, i in enumerate(b):
            own[i] = prefix_rows.get(id(members), []) + [keep(st[r, max(0, skip - p):len(seqs[i]) - p])]
        done += len(b)
        if progress and done % 500 < len(b):
            print(f"  token states {done}/{len(seqs)} ({time.time() - t0:.0f} s, {n_rows} rows)", flush=True)
    tokens = [torch.cat(o) for o in own]
    starts = torch.tensor([0] + [len(t) for t in tokens]).cumsum(0)
    return torch.cat(rows), torch.cat(tokens), starts, skip


class Bags:
    """Prompts as bags of token features ``Z [T, d]`` (``tokens``/``starts`` as :func:`prompt_token_states`')."""

    def __init__(self, Z: torch.Tensor, tokens: torch.Tensor, starts: torch.Tensor):
        if len(starts) < 1 or bool((starts[1:] <= starts[:-1]).any()):
            raise ValueError("every prompt needs at least one token to pool (a prompt no longer than the shared prefix?)")
        self.Z, self.tokens, self.starts = Z, tokens, starts
        self.lengths = starts[1:] - starts[:-1]

    def __len__(self) -> int:
        return len(self.lengths)

    def rows(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token features of prompts ``idx`` and, per token, its prompt's position in ``idx``."""
        idx = idx.flatten()
        tok = torch.cat([self.tokens[int(self.starts[i]):int(self.starts[i + 1])] for i in idx.tolist()])
        return self.Z[tok].float(), torch.repeat_interleave(torch.arange(len(idx)), self.lengths[idx])

    def mean(self, idx: torch.Tensor) -> torch.Tensor:
        """Each prompt's mean token features ``[n, d]``."""
        z, seg = self.rows(idx)
        n = len(idx.flatten())
        return torch.zeros(n, z.shape[1]).index_add_(0, seg, z) / self.lengths[idx.flatten()][:, None]

    def last(self, idx: torch.Tensor) -> torch.Tensor:
        """Each prompt's last token's features ``[n, d]``."""
        return self.Z[self.tokens[self.starts[idx.flatten() + 1] - 1]].float()


def max_logits(probe: Probe, z: torch.Tensor, seg: torch.Tensor, n: int) -> torch.Tensor:
    """``[n]``: per prompt, the highest token logit of ``probe`` over its tokens ``z [t, d]`` (``seg``: each
    token's prompt in ``0..n-1``)."""
    s = probe.logit(z)
    return torch.full((n,), float("-inf"), dtype=s.dtype).scatter_reduce(0, seg, s, "amax", include_self=False)


class BagScorer:
    """A token probe reading :class:`Bags` (features already standardised): ``score(idx)`` is each prompt's
    max-token probability, the form :func:`autosteer.method.fit.out_of_fold_scores` calls."""

    def __init__(self, probe: Probe, bags: Bags):
        self.probe, self.bags = probe, bags

    def score(self, idx: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z, seg = self.bags.rows(idx)
            return torch.sigmoid(max_logits(self.probe, z, seg, len(idx.flatten())))


def standardise(states: torch.Tensor, sample: int = 60_000, seed: int = 0,
                chunk: int = 200_000) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Z [T, k*H] fp32, mu, sd)``: token states ``[T, k, H]`` standardised per feature, with the mean and
    spread of a random sample of ``sample`` tokens (label-free, so every fold may share it)."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(states), generator=g)[:sample]
    s = states[pick].flatten(1).float()
    mu, sd = s.mean(0), s.std(0).clamp_min(1e-6)
    Z = torch.cat([(states[i:i + chunk].flatten(1).float() - mu) / sd for i in range(0, len(states), chunk)])
    return Z, mu, sd


def train_max_probe(bags: Bags, rows: torch.Tensor, y: torch.Tensor, hidden: int = 64, epochs: int = 30,
                    batch: int = 64, lr: float = 1e-3, weight_decay: float = 1e-2, seed: int = 0) -> BagScorer:
    """Multiple-instance training on the prompts ``rows`` of ``bags`` (labels ``y`` per row): binary
    cross-entropy on each prompt's max token logit, the classes balanced as the gate probe balances them,
    AdamW on mini-batches of ``batch`` prompts, ``epochs`` passes. The probe reads ``bags``' (standardised)
    features; :func:`unstandardise` gives the served probe on raw states."""
    g = torch.Generator().manual_seed(seed)
    d = bags.Z.shape[1]
    W1 = (torch.randn(hidden, d, generator=g) / d ** 0.5).requires_grad_()
    b1 = torch.zeros(hidden, requires_grad=True)
    w2 = (torch.randn(hidden, generator=g) / hidden ** 0.5).requires_grad_()
    b2 = torch.zeros(1, requires_grad=True)
    y = y.float()
    pos_weight = ((1 - y).sum() / y.sum().clamp_min(1)).clamp(0.1, 10.0)
    opt = torch.optim.AdamW([W1, b1, w2, b2], lr=lr, weight_decay=weight_decay)
    probe = Probe(W1, b1, w2, b2)
    for _ in range(epochs):
        for b in torch.randperm(len(rows), generator=g).split(batch):
            z, seg = bags.rows(rows[b])
            logit = max_logits(probe, z, seg, len(b))
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, y[b], pos_weight=pos_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return BagScorer(Probe(W1.detach(), b1.detach(), w2.detach(), b2.detach()), bags)


def unstandardise(probe: Probe, mu: torch.Tensor, sd: torch.Tensor) -> Probe:
    """The same probe on raw states: ``W1 ((h - mu) / sd) = (W1 / sd) h - (W1 / sd) mu``."""
    W1 = probe.W1 / sd
    return Probe(W1.contiguous(), (probe.b1 - W1 @ mu).contiguous(), probe.w2.contiguous(), probe.b2.reshape(1).contiguous())


def pooled_scores(probe: Probe, parts: list[torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """What the served pooled gate reads: ``[B]`` max-token probabilities of ``probe`` (on raw states) over the
    tokens ``keep [B, T]`` marks, from the gate layers' inputs ``parts`` (each ``[B, T, H]``, the pack's order).
    A row with no token kept scores 0 (nothing to pool); a non-finite token logit makes the row's score NaN, so
    the caller's NaN policy decides it (a NaN would otherwise lose every ``amax``)."""
    B, T = keep.shape
    h = torch.cat([p.reshape(B * T, -1).float() for p in parts], dim=1)
    s = probe.logit(h).view(B, T)
    bad = (~torch.isfinite(s) & keep).any(1)
    s = s.masked_fill(~keep, float("-inf"))
    p = torch.sigmoid(s.amax(1))
    return p.masked_fill(bad, float("nan"))
