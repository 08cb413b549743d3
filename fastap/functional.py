"""The functional API: per-query quantized Average Precision (AP_Q) and the AP loss.

Both run on the fused soft-histogram kernels (fastap.ops) and never build an N x Q x M tensor:
the kernels reduce each query row to two Q-bin histograms, and the AP formula below works on those
N x Q tensors with ordinary (differentiable) torch operations.
"""

from __future__ import annotations

import torch

from fastap import ops
from fastap._validation import (
    check_histogram_args,
    check_query_weights,
    raise_if_poisoned,
)

DEFAULT_NUM_BINS = 20
DEFAULT_SCORE_RANGE = (-1.0, 1.0)


def ap_from_histograms(n: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AP_Q of each query from its histograms.

    Args:
        n: [N, Q] soft counts of all (non-ignored) candidates per bin, bin 0 = top of the ranking.
        p: [N, Q] soft counts of the positives per bin.
    Returns:
        (ap [N], has_positive [N] bool). ap = sum_k (P_k / N_k) * p_k / Npos with P, N the
        cumulative sums over bins; a query without positives gets ap = 0 (and no gradient).
    """
    cum_n = n.cumsum(-1)
    cum_p = p.cumsum(-1)
    num_positives = cum_p[:, -1]
    has_positive = num_positives > 0.5  # a count of positives, exact up to rounding
    # Bins with N_k = 0 also have p_k = 0; dividing by 1 there keeps values and gradients finite.
    precision = cum_p / torch.where(cum_n > 0, cum_n, torch.ones_like(cum_n))
    recall_step = (
        p / torch.where(has_positive, num_positives, torch.ones_like(num_positives))[:, None]
    )
    return (precision * recall_step).sum(-1), has_positive


def _histograms(
    scores, relevance, labels, ref_labels, ignore, exclude_self, num_bins, score_range
) -> tuple[torch.Tensor, torch.Tensor]:
    args = check_histogram_args(
        scores, relevance, labels, ref_labels, ignore, exclude_self, num_bins, score_range
    )
    n, p = ops.soft_histogram(
        args.scores,
        args.relevance,
        args.labels,
        args.ref_labels,
        args.ignore,
        args.exclude_self,
        args.num_bins,
        args.lo,
        args.hi,
    )
    raise_if_poisoned(n)
    return n, p


def average_precision(
    scores: torch.Tensor,
    relevance: torch.Tensor | None = None,
    *,
    labels: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    num_bins: int = DEFAULT_NUM_BINS,
    score_range: tuple[float, float] = DEFAULT_SCORE_RANGE,
    ignore: torch.Tensor | None = None,
    exclude_self: bool = False,
) -> torch.Tensor:
    """Quantized Average Precision (AP_Q, Revaud et al. 2019) of every query, differentiable.

    Args:
        scores: [N, M] float32/float64/float16/bfloat16, any strides; row i holds query i's
            similarity to each of M candidates (higher = more similar).
        relevance: [N, M] bool (or 0/1 of any real dtype): relevance[i, j] says candidate j is a
            positive of query i. Give either this or ``labels``.
        labels: [N] integer labels of the queries; candidate j is a positive of query i when
            ``labels[i] == ref_labels[j]``. The N x M relevance matrix is never built.
        ref_labels: [M] integer labels of the candidates; defaults to ``labels`` (then N == M).
        num_bins: Q >= 2 histogram bins (default 20, as for cosine scores in the literature).
        score_range: (lo, hi) covered by the bins (default (-1, 1), the range of cosine scores).
            Scores outside it count in the end bins and get no gradient.
        ignore: [N, M] bool (or 0/1): entries that count nowhere (neither as positive nor as
            negative), e.g. junk images.
        exclude_self: ignore the diagonal (in-batch retrieval, the query is also a candidate).
    Returns:
        [N] AP_Q per query, float32 (float64 for float64 scores), on the device of scores.
        A query without positives (after ``ignore``/``exclude_self``) has no AP and gets 0 here,
        with zero gradient; ``ap_loss`` leaves such queries out.
    Raises:
        ValueError/TypeError naming the argument for bad input; ValueError when a non-ignored
        score is NaN or infinite (in eager mode; under torch.compile that query's AP is NaN).
    """
    n, p = _histograms(
        scores, relevance, labels, ref_labels, ignore, exclude_self, num_bins, score_range
    )
    return ap_from_histograms(n, p)[0]


def ap_loss(
    scores: torch.Tensor,
    relevance: torch.Tensor | None = None,
    *,
    labels: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    num_bins: int = DEFAULT_NUM_BINS,
    score_range: tuple[float, float] = DEFAULT_SCORE_RANGE,
    ignore: torch.Tensor | None = None,
    exclude_self: bool = False,
    query_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The AP loss: 1 - the weighted mean AP_Q over the queries that have at least one positive.

    Arguments as for :func:`average_precision`, plus
        query_weights: [N] finite non-negative floating weights (default: all 1). The loss is
            1 - sum_i w_i AP_i / sum_i w_i over the queries i with a positive.
    Returns:
        A scalar, float32 (float64 for float64 scores). Never NaN: a batch without any query that
        has a positive (or whose weights sum to 0) gives 0, with an all-zero gradient.
    """
    n, p = _histograms(
        scores, relevance, labels, ref_labels, ignore, exclude_self, num_bins, score_range
    )
    ap, has_positive = ap_from_histograms(n, p)
    weights = has_positive.to(ap.dtype)
    if query_weights is not None:
        weights = weights * check_query_weights(query_weights, scores).to(ap.dtype)
    total = weights.sum()
    valid = total > 0
    mean_ap = (weights * ap).sum() / torch.where(valid, total, torch.ones_like(total))
    return torch.where(valid, 1 - mean_ap, torch.zeros_like(mean_ap))
