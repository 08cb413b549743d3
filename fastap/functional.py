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
    check_variant,
    raise_if_poisoned,
)

DEFAULT_NUM_BINS = 20
DEFAULT_SCORE_RANGE = (-1.0, 1.0)


def ap_from_histograms(
    n: torch.Tensor, p: torch.Tensor, num_positives: torch.Tensor, variant: str = "ap_q"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query AP from the soft histograms.

    Args:
        n: [N, Q] soft counts of all (non-ignored) candidates per bin, bin 0 = top of the ranking.
        p: [N, Q] soft counts of the positives per bin.
        num_positives: [N] exact number of positives of each query (integer or floating; floating
            counts are rounded to the nearest integer, a NaN count is 0).
        variant: "ap_q" (the quantized AP of the paper), "tie_aware" (AP_T) or
            "tie_aware_simplified" (AP_T's simplified form).
    Returns:
        (ap [N], has_positive [N] bool). A query without positives gets ap = 0 and no gradient.
    """
    ap = ops.ap_from_histograms(n, p, num_positives, variant)  # (which checks the variant)
    # The op's rule for which rows have a positive (csrc/ap_inputs.cpp): floating counts rounded
    # in float64 (float8 has no round), integer ones as int64 (uint16 to uint64 have no
    # comparison kernels; uint64 counts of 2**63 or more wrap to negative ones, as in the op).
    # NaN > 0 is False.
    if num_positives.is_floating_point():
        counts = num_positives.to(torch.float64).round()
    else:
        counts = num_positives.to(torch.int64)
    return ap, counts > 0


def _histograms(source: str, *arguments) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's (n, p, positives) for the arguments of check_histogram_args; `source` is what
    the caller was given ("scores" or "embeddings"), which an error about non-finite scores
    names."""
    args = check_histogram_args(*arguments)
    n, p, positives = ops.soft_histogram_of_checked_args(
        args.scores,
        args.relevance,
        args.labels,
        args.ref_labels,
        args.ignore,
        args.exclude_self,
        args.num_bins,
        args.lo,
        args.hi,
        args.self_offset,
    )
    raise_if_poisoned(n, source)
    return n, p, positives


def average_precision_and_validity(
    scores: torch.Tensor,
    relevance: torch.Tensor | None = None,
    *,
    labels: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    num_bins: int = DEFAULT_NUM_BINS,
    score_range: tuple[float, float] = DEFAULT_SCORE_RANGE,
    ignore: torch.Tensor | None = None,
    exclude_self: bool = False,
    self_offset: int | None = None,
    variant: str = "ap_q",
    scores_from: str = "scores",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ap [N], has_positive [N] bool): :func:`average_precision` and which queries have one.
    ``scores_from="embeddings"``: the caller computed the scores from embeddings (an error about
    non-finite scores then names those)."""
    check_variant(variant)
    n, p, positives = _histograms(
        scores_from,
        scores,
        relevance,
        labels,
        ref_labels,
        ignore,
        exclude_self,
        num_bins,
        score_range,
        self_offset,
    )
    return ap_from_histograms(n, p, positives, variant)


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
    self_offset: int | None = None,
    variant: str = "ap_q",
) -> torch.Tensor:
    """Quantized Average Precision (AP_Q, Revaud et al. 2019) of every query, differentiable.

    Args:
        scores: [N, M] float32/float64/float16/bfloat16, any strides; row i holds query i's
            similarity to each of M candidates (higher = more similar).
        relevance: [N, M] bool (or 0/1 of any real dtype): relevance[i, j] says candidate j is a
            positive of query i. Give either this or ``labels``.
        labels: [N] integer (or bool) labels of the queries; candidate j is a positive of query i
            when ``labels[i] == ref_labels[j]``, by value across dtypes (uint64 labels of 2**63
            or more are refused). The N x M relevance matrix is never built.
        ref_labels: [M] integer (or bool) labels of the candidates; defaults to ``labels`` (then
            N == M).
        num_bins: Q >= 2 histogram bins (default 20, as for cosine scores in the literature).
        score_range: (lo, hi) covered by the bins (default (-1, 1), the range of cosine scores).
            Scores outside it count in the end bins and get no gradient.
        ignore: [N, M] bool (or 0/1): entries that count nowhere (neither as positive nor as
            negative), e.g. junk images.
        exclude_self: ignore the diagonal (in-batch retrieval, the query is also a candidate).
        self_offset: with ``exclude_self``, query i's own entry is candidate i + self_offset,
            for queries that are a slice of the candidates (then N + self_offset <= M). Default
            None: the diagonal of a square matrix.
        variant: "ap_q" (default, the paper's quantized AP), "tie_aware" (AP_T, which treats
            the candidates in one bin as tied) or "tie_aware_simplified"; see docs/design.md.
    Returns:
        [N] AP of ``variant`` (AP_Q by default) per query, float32 (float64 for float64
        scores), on the device of scores.
        A query without positives (after ``ignore``/``exclude_self``) has no AP and gets 0 here,
        with zero gradient; ``ap_loss`` leaves such queries out.
    Raises:
        ValueError/TypeError naming the argument for bad input; ValueError when a non-ignored
        score is NaN or infinite (in eager mode; under torch.compile that query's AP is NaN).
    """
    return average_precision_and_validity(
        scores,
        relevance,
        labels=labels,
        ref_labels=ref_labels,
        num_bins=num_bins,
        score_range=score_range,
        ignore=ignore,
        exclude_self=exclude_self,
        self_offset=self_offset,
        variant=variant,
    )[0]


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
    self_offset: int | None = None,
    variant: str = "ap_q",
    query_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The AP loss: 1 - the weighted mean AP (of ``variant``, AP_Q by default) over the queries
    that have at least one positive.

    Arguments as for :func:`average_precision`, plus
        query_weights: [N] finite non-negative floating weights (default: all 1). The loss is
            1 - sum_i w_i AP_i / sum_i w_i over the queries i with a positive.
    Returns:
        A scalar, float32 (float64 for float64 scores). Never NaN: a batch without any query that
        has a positive (or whose weights sum to 0) gives 0, with an all-zero gradient.
    """
    ap, has_positive = average_precision_and_validity(
        scores,
        relevance,
        labels=labels,
        ref_labels=ref_labels,
        num_bins=num_bins,
        score_range=score_range,
        ignore=ignore,
        exclude_self=exclude_self,
        self_offset=self_offset,
        variant=variant,
    )
    if query_weights is not None:
        query_weights = check_query_weights(query_weights, scores)
    return weighted_loss(ap, has_positive, query_weights)


def weights_over_largest(
    query_weights: torch.Tensor, has_positive: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(w / largest, largest), in the weights' dtype: the weights of the queries with a positive
    (the others' set to 0: they count nowhere, so however large, they must not shrink the weights
    that count to zeros, nor meet an AP of 0 as infinity) over the largest of them (1 if it is
    0), which is detached: w = largest * (w / largest) with the gradient of w alone. Finite
    weights near the top of their range then neither overflow nor sum to infinity."""
    weights = torch.where(has_positive, query_weights, 0)
    largest = weights.detach().abs().amax() if weights.numel() else weights.new_zeros(())
    largest = torch.where(largest > 0, largest, 1)
    return weights / largest, largest


def weighted_loss(
    ap: torch.Tensor, has_positive: torch.Tensor, query_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """1 - sum_i w_i AP_i / sum_i w_i over the queries with a positive (w = 1 by default);
    0 with a zero gradient when there is none or the weights sum to 0.

    The loss does not change when every weight is scaled by one factor, so the weights are taken
    over the largest that counts (weights_over_largest), in their own dtype, before they meet
    float32 scores' AP (where weights beyond float32's range would be infinite)."""
    weights = has_positive.to(ap.dtype)
    if query_weights is not None:
        scaled, _ = weights_over_largest(query_weights, has_positive)
        weights = weights * scaled.to(ap.dtype)
    total = weights.sum()
    valid = total > 0
    mean_ap = (weights * ap).sum() / torch.where(valid, total, torch.ones_like(total))
    return torch.where(valid, 1 - mean_ap, torch.zeros_like(mean_ap))
