"""The safety prober: ``p(x) = sigmoid(w2 . relu(W1 h + b1) + b2)`` on one layer's states (or on several
layers' states concatenated, ``h`` of width ``k * H``: a pack's ``layers``).

Trained with binary cross-entropy (harmful = 1) in fp32. Inputs are standardised during
training and the standardisation is folded back into ``W1``/``b1`` exactly, so the served probe
is the plain MLP of the paper on raw hidden states.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Probe:
    W1: torch.Tensor  # [F, H] (several layers: [F, k * H])
    b1: torch.Tensor  # [F]
    w2: torch.Tensor  # [F]
    b2: torch.Tensor  # [1]

    def logit(self, h: torch.Tensor) -> torch.Tensor:
        """The pre-sigmoid score ``w2 . relu(W1 h + b1) + b2`` of states ``[..., H]`` (fp32, on ``h``'s device)."""
        d = h.device
        return torch.relu(h.float() @ self.W1.t().to(d) + self.b1.to(d)) @ self.w2.to(d) + self.b2.to(d)

    def score(self, h: torch.Tensor) -> torch.Tensor:
        """Probability of 'harmful' for states ``[..., H]`` (fp32)."""
        return torch.sigmoid(self.logit(h))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"probe.W1": self.W1, "probe.b1": self.b1, "probe.w2": self.w2, "probe.b2": self.b2}


def train_probe(
    x: torch.Tensor,
    y: torch.Tensor,
    hidden: int = 64,
    epochs: int = 300,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    seed: int = 0,
    batch_size: int | None = None,
    sample_weight: torch.Tensor | None = None,
) -> Probe:
    """AdamW on standardised inputs; returns the probe on raw inputs.

    ``sample_weight`` (``[n]``, >= 0): per-example loss weights (default: all 1); the harmful
    class is reweighted on top so both classes weigh the same in total.

    ``batch_size=None`` (default): full batch, one step per epoch. A number: shuffled
    mini-batches of that size (the paper's setting is 8), one pass over the data per epoch.
    """
    g = torch.Generator().manual_seed(seed)
    x = x.float()
    y = y.float()
    mu = x.mean(0)
    sd = x.std(0).clamp_min(1e-6)
    xs = (x - mu) / sd
    d = x.shape[1]
    W1 = (torch.randn(hidden, d, generator=g) / d ** 0.5).requires_grad_()
    b1 = torch.zeros(hidden, requires_grad=True)
    w2 = (torch.randn(hidden, generator=g) / hidden ** 0.5).requires_grad_()
    b2 = torch.zeros(1, requires_grad=True)
    sw = torch.ones(len(y)) if sample_weight is None else sample_weight.float().reshape(-1)
    if sw.shape[0] != len(y) or bool((sw < 0).any()) or not bool(torch.isfinite(sw).all()):
        raise ValueError("sample_weight must hold one finite weight >= 0 per example")
    pos = (sw * y).sum().clamp_min(1e-6)
    pos_weight = (((sw * (1 - y)).sum()) / pos).clamp(0.1, 10.0)  # balance classes (by total weight)
    opt = torch.optim.AdamW([W1, b1, w2, b2], lr=lr, weight_decay=weight_decay)
    n = len(y)
    for _ in range(epochs):
        batches = [None] if not batch_size or batch_size >= n else torch.randperm(n, generator=g).split(batch_size)
        for idx in batches:
            xb, yb, wb = (xs, y, sw) if idx is None else (xs[idx], y[idx], sw[idx])
            logit = torch.relu(xb @ W1.t() + b1) @ w2 + b2
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, yb, weight=wb, pos_weight=pos_weight,
                                                                        reduction="sum") / wb.sum().clamp_min(1e-6)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        W1r = W1 / sd  # fold the standardisation: W1 ((h - mu) / sd) = (W1 / sd) h - (W1 / sd) mu
        b1r = b1 - W1r @ mu
    return Probe(W1r.detach().contiguous(), b1r.detach().contiguous(), w2.detach().contiguous(), b2.detach().contiguous())


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (ties count half)."""
    scores = scores.double()
    labels = labels.bool()
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    gt = (pos[:, None] > neg[None, :]).double().sum()
    eq = (pos[:, None] == neg[None, :]).double().sum()
    return float((gt + 0.5 * eq) / (len(pos) * len(neg)))


def roc_curve(scores: torch.Tensor, labels: torch.Tensor) -> tuple[list[float], list[float], list[float]]:
    """(fpr, tpr, thresholds) at every distinct score, highest threshold first."""
    scores = scores.double()
    labels = labels.bool()
    th = torch.unique(scores).flip(0)
    P, N = max(int(labels.sum()), 1), max(int((~labels).sum()), 1)
    fpr, tpr = [0.0], [0.0]
    for t in th:
        pred = scores >= t
        tpr.append(float((pred & labels).sum()) / P)
        fpr.append(float((pred & ~labels).sum()) / N)
    return fpr, tpr, [float("inf")] + th.tolist()


def calibrate_threshold(benign_scores: torch.Tensor, target_fpr: float, min_exceed: int = 0) -> float:
    """Smallest threshold whose false-positive rate on these benign scores is at most ``target_fpr``
    (the gate fires when ``p > tau``); ``min_exceed`` benign scores may exceed it whatever the rate."""
    s = torch.sort(benign_scores.double(), descending=True).values
    k = max(min_exceed, int(target_fpr * len(s)))  # at most k benign scores may exceed tau
    if len(s) == 0:
        return 0.5
    return float(s[min(k, len(s) - 1)])
