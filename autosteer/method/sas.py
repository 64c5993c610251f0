"""Safety Awareness Score (SAS): which layer separates harmful from benign most consistently.

For pairs ``(x_i, y_i)`` (harmful, benign) and layer ``l``:
``delta_i = h_l(x_i) - h_l(y_i)`` and ``SAS(l) = mean_{i<j} cos(delta_i, delta_j)``.
With unit vectors ``u_i`` the pairwise mean is ``(||sum_i u_i||^2 - n) / (n (n - 1))``: O(n d).
"""
from __future__ import annotations

import torch


def safety_awareness_score(harmful: torch.Tensor, benign: torch.Tensor) -> torch.Tensor:
    """SAS per layer from paired states ``[n, L, H]`` (row i of both tensors is pair i) -> ``[L]``."""
    if harmful.shape != benign.shape or harmful.dim() != 3:
        raise ValueError(f"SAS needs paired [n, L, H] states, got {tuple(harmful.shape)} and {tuple(benign.shape)}")
    n = harmful.shape[0]
    if n < 2:
        raise ValueError("SAS needs at least 2 pairs")
    delta = (harmful.double() - benign.double())
    unit = delta / delta.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    total = unit.sum(dim=0)  # [L, H]
    return ((total.pow(2).sum(-1) - n) / (n * (n - 1))).float()


def random_pairs(n_harmful: int, n_benign: int, n_pairs: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices pairing harmful and benign prompts at random (the fallback when no minimal pairs exist)."""
    n = min(n_pairs, n_harmful, n_benign)
    return torch.randperm(n_harmful, generator=generator)[:n], torch.randperm(n_benign, generator=generator)[:n]
