"""The AP math in plain PyTorch, written the direct way: an N x Q x M tensor of triangular bin
weights, differentiated by autograd. It is the oracle of the tests and the baseline of the
benchmarks, never a fallback of the fused ops (it needs O(N * Q * M) memory).

The arguments and answers are those of :mod:`fastap.functional` with its value checks off
(``fastap.set_value_checks(False)``, the answers under ``torch.compile``); arguments are not
validated here. As there, float16/bfloat16 scores are binned in float32, an ignored or excluded
entry's score is never read (a NaN there changes nothing), and a query with a non-finite counted
score gets NaN histograms (so its AP is NaN when it has a positive).
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
    self_offset: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense [N, M] float masks: which entries are positives, and which count at all."""
    if relevance is None:
        assert labels is not None, "relevance or labels"
        candidates = labels if ref_labels is None else ref_labels
        relevance = labels[:, None] == candidates[None, :]
    valid = torch.ones_like(scores, dtype=torch.bool)
    if ignore is not None:
        valid &= ~ignore.bool()
    if exclude_self:
        rows = torch.arange(scores.shape[0], device=scores.device)
        valid[rows, rows + (self_offset or 0)] = False
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
    self_offset: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n, p, positives): [N, Q] soft counts of all counted candidates and of the positives, and
    [N] the number of counted positives."""
    work = scores if scores.dtype == torch.float64 else scores.float()
    positive, valid = relevance_and_valid(
        work, relevance, labels, ref_labels, ignore, exclude_self, self_offset
    )
    counted = valid.bool()
    binned = torch.where(counted, work, torch.full_like(work, lo))  # (others: weight 0 below)
    weights = bin_weights(binned, num_bins, lo, hi) * valid[:, None, :]
    n = weights.sum(-1)
    p = (weights * positive[:, None, :]).sum(-1)
    poisoned = (counted & ~torch.isfinite(work)).any(1, keepdim=True)
    n, p = (torch.where(poisoned, torch.full_like(h, float("nan")), h) for h in (n, p))
    return n, p, (positive * valid).sum(-1).detach()


def ap_from_histograms(
    n: torch.Tensor, p: torch.Tensor, positives: torch.Tensor, variant: str = "ap_q"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(AP [N], has_positive [N]), written bin by bin from the paper's definitions; 0 without
    positives.

    ap_q:       AP_i = sum_k (P_k / N_k) (p_k / P_{Q-1})
    tie_aware:  AP_T of the paper, exact; tie_aware_simplified: its simplified form.
    """
    num_bins = n.shape[1]
    has_positive = positives > 0
    terms = []
    cum_n = torch.zeros_like(n[:, 0])
    cum_p = torch.zeros_like(p[:, 0])
    for k in range(num_bins):
        prev_n, prev_p = cum_n, cum_p
        cum_n = cum_n + n[:, k]
        cum_p = cum_p + p[:, k]
        if variant == "ap_q":
            safe_n = torch.where(cum_n > 0, cum_n, torch.ones_like(cum_n))
            terms.append(cum_p / safe_n * p[:, k])
        elif variant == "tie_aware_simplified":
            terms.append(p[:, k] * (prev_p + cum_p + 1) / (prev_n + cum_n + 1))
        elif variant == "tie_aware":
            eps = 1e-8
            ratio = torch.relu(p[:, k] - 1) / (torch.relu(n[:, k] - 1) + eps)
            within = n[:, k] * ratio
            after = (prev_p + 1 - ratio * (prev_n + 1)) * torch.log((cum_n + 1) / (prev_n + 1))
            terms.append(p[:, k] * (within + after) / (n[:, k] + eps))
        else:
            raise ValueError(f"unknown variant {variant!r}")
    total = torch.stack(terms, -1).sum(-1)
    denominator = cum_p if variant == "ap_q" else positives.to(n.dtype)
    safe = torch.where(has_positive, denominator, torch.ones_like(denominator))
    return torch.where(has_positive, total / safe, torch.zeros_like(total)), has_positive


def _ap_and_validity(
    scores, relevance, labels, ref_labels, num_bins, score_range, ignore, exclude_self,
    self_offset, variant,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    lo, hi = score_range
    histograms = soft_histogram(
        scores, relevance, labels, ref_labels, ignore, exclude_self, num_bins, lo, hi, self_offset
    )
    return ap_from_histograms(*histograms, variant)


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
    self_offset: int | None = None,
    variant: str = "ap_q",
) -> torch.Tensor:
    """Per-query AP, as :func:`fastap.average_precision`."""
    return _ap_and_validity(
        scores, relevance, labels, ref_labels, num_bins, score_range, ignore, exclude_self,
        self_offset, variant,
    )[0]  # fmt: skip


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
    self_offset: int | None = None,
    variant: str = "ap_q",
    query_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """1 - weighted mean AP over queries with a positive, as :func:`fastap.ap_loss`."""
    ap, has_positive = _ap_and_validity(
        scores, relevance, labels, ref_labels, num_bins, score_range, ignore, exclude_self,
        self_offset, variant,
    )  # fmt: skip
    weights = has_positive.to(ap.dtype)
    if query_weights is not None:
        # Over the largest weight that counts (a constant to autograd; the loss does not change),
        # so that weights near the ends of their dtype's range neither overflow nor underflow.
        counted = torch.where(has_positive, query_weights, torch.zeros_like(query_weights))
        largest = float(counted.detach().abs().max()) if counted.numel() else 0.0
        weights = weights * (counted / (largest if largest > 0 else 1.0)).to(ap.dtype)
    # A total that is not positive (0, or below with value checks off) gives 0, as
    # fastap.functional.weighted_loss does. (Detached: a test, not part of the graph.)
    if not float(weights.detach().sum()) > 0.0:
        return (ap * 0).sum()
    return 1 - (weights * ap).sum() / weights.sum()
