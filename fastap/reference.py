"""The AP_Q math in plain PyTorch, written the direct way: an N x Q x M tensor of triangular bin
weights, differentiated by autograd. It is the oracle of the tests and the baseline of the
benchmarks, never a fallback of the fused ops (it needs O(N * Q * M) memory).

The arguments and answers are those of :mod:`fastap.functional`; arguments are not validated here.
"""

from __future__ import annotations

import torch


def relevance_and_valid(
    scores: torch.Tensor,
    relevance: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    ignore: torch.Tensor | None = None,
    exclude_self: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense [N, M] float masks: which entries are positives, and which count at all."""
    if relevance is None:
        candidates = labels if ref_labels is None else ref_labels
        relevance = labels[:, None] == candidates[None, :]
    valid = torch.ones_like(scores, dtype=torch.bool)
    if ignore is not None:
        valid &= ~ignore.bool()
    if exclude_self:
        valid &= ~torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    return (relevance != 0).to(scores.dtype), valid.to(scores.dtype)


def bin_weights(scores: torch.Tensor, num_bins: int, lo: float, hi: float) -> torch.Tensor:
    """[N, Q, M] triangular weights w_k(s) = max(0, 1 - |clamp(s, lo, hi) - c_k| / delta)."""
    delta = (hi - lo) / (num_bins - 1)
    centres = hi - delta * torch.arange(num_bins, dtype=scores.dtype, device=scores.device)
    clamped = scores.clamp(lo, hi)
    return torch.relu(1 - (clamped[:, None, :] - centres[None, :, None]).abs() / delta)


def soft_histogram(
    scores: torch.Tensor,
    relevance: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    ignore: torch.Tensor | None = None,
    exclude_self: bool = False,
    num_bins: int = 20,
    lo: float = -1.0,
    hi: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, p), each [N, Q]: soft counts of all counted candidates, and of the positives."""
    positive, valid = relevance_and_valid(
        scores, relevance, labels, ref_labels, ignore, exclude_self
    )
    weights = bin_weights(scores, num_bins, lo, hi) * valid[:, None, :]
    return weights.sum(-1), (weights * positive[:, None, :]).sum(-1)


def ap_from_histograms(n: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(AP [N], has_positive [N]): AP_i = sum_k (P_k / N_k) (p_k / Npos); 0 without positives."""
    precision_at_bin = []
    cum_n = torch.zeros_like(n[:, 0])
    cum_p = torch.zeros_like(p[:, 0])
    for k in range(n.shape[1]):
        cum_n = cum_n + n[:, k]
        cum_p = cum_p + p[:, k]
        safe_n = torch.where(cum_n > 0, cum_n, torch.ones_like(cum_n))
        precision_at_bin.append(cum_p / safe_n)
    num_positives = cum_p
    has_positive = num_positives > 0.5
    safe_positives = torch.where(has_positive, num_positives, torch.ones_like(num_positives))
    ap = (torch.stack(precision_at_bin, -1) * p).sum(-1) / safe_positives
    return ap, has_positive


def average_precision(
    scores: torch.Tensor,
    relevance: torch.Tensor | None = None,
    *,
    labels: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    num_bins: int = 20,
    score_range: tuple[float, float] = (-1.0, 1.0),
    ignore: torch.Tensor | None = None,
    exclude_self: bool = False,
) -> torch.Tensor:
    """Per-query AP_Q, as :func:`fastap.average_precision`."""
    n, p = soft_histogram(
        scores, relevance, labels, ref_labels, ignore, exclude_self, num_bins, *score_range
    )
    return ap_from_histograms(n, p)[0]


def ap_loss(
    scores: torch.Tensor,
    relevance: torch.Tensor | None = None,
    *,
    labels: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    num_bins: int = 20,
    score_range: tuple[float, float] = (-1.0, 1.0),
    ignore: torch.Tensor | None = None,
    exclude_self: bool = False,
    query_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """1 - weighted mean AP over queries with a positive, as :func:`fastap.ap_loss`."""
    n, p = soft_histogram(
        scores, relevance, labels, ref_labels, ignore, exclude_self, num_bins, *score_range
    )
    ap, has_positive = ap_from_histograms(n, p)
    weights = has_positive.to(ap.dtype)
    if query_weights is not None:
        weights = weights * query_weights.to(ap.dtype)
    if float(weights.sum()) == 0.0:
        return (ap * 0).sum()
    return 1 - (weights * ap).sum() / weights.sum()
