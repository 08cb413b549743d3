"""Exact retrieval evaluation metrics in plain PyTorch (no quantization, no gradients).

- :func:`average_precision`: exact AP of every row of a score matrix, with a choice of tie handling.
- :func:`retrieval_metrics`: mAP, recall@k and mAP@R of embeddings (cosine similarity), computed
  chunk by chunk of queries, so that only a ``chunk_size x M`` block of scores ever exists.
- :func:`revisited_map`: the revisited Oxford/Paris protocol (Radenovic et al., CVPR 2018): mAP and
  mP@k for the Easy, Medium and Hard setups.

Everything runs on CPU or CUDA tensors alike (the device of the inputs) and returns float64
values (tensors) or Python floats. Formulas and conventions: docs/metrics.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from fastap._validation import (
    UINT64,
    WIDE_UNSIGNED,
    check_bool,
    check_embedding_matrix,
    check_finite_rows,
    check_int,
    check_labels,
    dense_tensor,
    integer_value,
    type_name,
)
from fastap.cosine import autocast_off, unit_rows

__all__ = ["TIES", "average_precision", "retrieval_metrics", "revisited_map"]

TIES = ("average", "pessimistic", "optimistic")
METRICS = ("map", "recall", "map_at_r")

# The default chunk of queries keeps one chunk's score matrix near this many bytes.
_CHUNK_BYTES = 256 * 2**20


# --------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------


def _tensor(value, name: str) -> torch.Tensor:
    return _with_values(dense_tensor(value, name), name)


def _with_values(t: torch.Tensor, name: str) -> torch.Tensor:
    """The metrics are exact values computed from the inputs' values: a meta tensor has none."""
    if t.device.type == "meta":
        raise ValueError(
            f"fastap: {name} is on the meta device, which holds no values (the metrics read them)"
        )
    return t


def _same_device(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"fastap: {name} is on {t.device} but {ref_name} is on {ref.device}")


def _check_ties(ties) -> str:
    if not isinstance(ties, str):
        raise TypeError(f"fastap: ties must be a str, one of {TIES}, got {type_name(ties)}")
    if ties not in TIES:
        raise ValueError(f"fastap: ties must be one of {TIES}, got {ties!r}")
    return ties


def _check_chunk_size(chunk_size, row_bytes: int) -> int:
    """The number of query rows per chunk: chunk_size, or rows worth ~256 MB of scores."""
    if chunk_size is None:
        return max(1, _CHUNK_BYTES // max(1, row_bytes))
    return check_int(chunk_size, "chunk_size", 1, what=" (or None)")


def _check_positive_ints(values, name: str) -> tuple[int, ...]:
    """A sequence of positive ints (duplicates dropped, order kept)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(
            f"fastap: {name} must be a sequence of positive ints, got {type_name(values)}"
        )
    out: list[int] = []
    for value in values:
        try:
            v = integer_value(value)  # ints, numpy and 0-d torch integers
        except TypeError:
            raise TypeError(
                f"fastap: {name} must be a sequence of positive ints, got an element {value!r}"
            ) from None
        if v < 1:
            raise ValueError(f"fastap: {name} must hold positive ints, got {v}")
        if v not in out:
            out.append(v)
    return tuple(out)


# The floating dtypes torch.sort takes (not float8 or float4).
_SORTABLE_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_scores(scores, name: str = "scores") -> torch.Tensor:
    scores = _tensor(scores, name)
    if scores.dim() != 2:
        raise ValueError(
            f"fastap: {name} must be 2-D (queries x database), got shape {list(scores.shape)}"
        )
    if scores.dtype == torch.bool or scores.is_complex():
        raise TypeError(
            f"fastap: {name} must be a real (floating or integer) tensor, got {scores.dtype}"
        )
    if scores.is_floating_point() and scores.dtype not in _SORTABLE_FLOATS:
        raise TypeError(
            f"fastap: {name} of dtype {scores.dtype} cannot be ranked (torch does not sort "
            f"float8 or float4); pass {name}.float()"
        )
    return scores


def _check_no_nan(chunk: torch.Tensor, name: str = "scores") -> None:
    """Scores are checked for NaN chunk by chunk (no [N, M] temporary)."""
    if chunk.is_floating_point() and chunk.numel() > 0 and bool(torch.isnan(chunk).any()):
        raise ValueError(f"fastap: {name} contain NaN")


def _check_mask(value, name: str, scores: torch.Tensor) -> torch.Tensor:
    """An [N, M] bool or 0/1 tensor shaped like scores (values are checked chunk by chunk)."""
    t = _tensor(value, name)
    _same_device(t, name, scores, "scores")
    if t.shape != scores.shape:
        raise ValueError(
            f"fastap: {name} must have the shape of scores {list(scores.shape)}, "
            f"got {list(t.shape)}"
        )
    if t.is_complex():
        raise TypeError(f"fastap: {name} must be bool or hold 0/1 values, got dtype {t.dtype}")
    return t


def _mask_chunk(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dtype == torch.bool:
        return t
    if t.numel() > 0 and not bool(((t == 0) | (t == 1)).all()):
        raise ValueError(f"fastap: {name} must hold only 0 and 1 (or be a bool tensor)")
    return t != 0


def _check_embeddings(value, name: str) -> torch.Tensor:
    t = _with_values(check_embedding_matrix(value, name), name)
    check_finite_rows(t, name, always=True)
    return t


# --------------------------------------------------------------------------------------------
# the ranking core
# --------------------------------------------------------------------------------------------


def _ap_sums(
    sorted_scores: torch.Tensor,
    positive: torch.Tensor,
    valid: torch.Tensor | None,
    ties: str,
    cutoff: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sums of rel(k) * precision@k over the ranks k of rows sorted by descending score.

    Args:
        sorted_scores: [n, M] each row sorted in descending order (ties in any order).
        positive: [n, M] bool, aligned with sorted_scores.
        valid: [n, M] bool, aligned; False = removed from the ranking (ignored). None: all valid.
        ties: the tie rule. The term at rank k (1-based, among the valid entries) is rel(k) *
            precision@k in the order where tied positives follow ("pessimistic") or precede
            ("optimistic") their tied negatives, or its expectation over the uniformly random
            orders of each tie group ("average").
        cutoff: optional [n] integer: also sum the terms of the ranks k <= cutoff.

    Returns:
        ([n] float64 sum over all ranks, [n] float64 sum over k <= cutoff or None).
        sum / Npos is AP; with cutoff = R = Npos, sum_top / R is mAP@R.
    """
    n = sorted_scores.shape[0]
    device = sorted_scores.device
    pos = positive if valid is None else positive & valid
    # Ties matter only in a tie group holding both a positive and a negative: within such a
    # group two neighbours differ in `pos`. Float32 scores of a large database nearly always
    # tie somewhere, but mostly among negatives; rows with a mixed tie group are redone below.
    mixed = ((sorted_scores[:, 1:] == sorted_scores[:, :-1]) & (pos[:, 1:] != pos[:, :-1])).any(
        dim=1
    )

    # Without mixed ties every order gives the positives the same ranks: the term at the j-th
    # positive (1-based), of rank k, is j / k. Computed at the positives only (nonzero lists
    # them row by row, in rank order).
    rows, cols = pos.nonzero(as_tuple=True)
    counts = pos.sum(dim=1)
    first = torch.cumsum(counts, dim=0) - counts  # where each row starts in `rows`
    j = torch.arange(1, rows.numel() + 1, device=device) - first[rows]
    if valid is None:
        k = cols + 1
    else:
        k = torch.cumsum(valid, dim=1, dtype=torch.int32)[rows, cols]
    values = j.double() / k
    del j, cols
    zeros = torch.zeros(n, dtype=torch.float64, device=device)
    total = zeros.index_add(0, rows, values)
    top = None
    if cutoff is not None:
        top = zeros.index_add(0, rows, values.masked_fill_(k > cutoff[rows], 0.0))
    del rows, k, values

    if bool(mixed.any()):
        # The tie-aware computation needs ~40 bytes per entry: run it on the rows that need
        # it, a quarter of the chunk's entries at a time.
        redo = mixed.nonzero().squeeze(1)
        block = max(1, n // 4)
        for lo in range(0, redo.numel(), block):
            idx = redo[lo : lo + block]
            sub_total, sub_top = _tied_ap_sums(
                sorted_scores[idx],
                positive[idx],
                None if valid is None else valid[idx],
                ties,
                None if cutoff is None else cutoff[idx],
            )
            total[idx] = sub_total
            if top is not None:
                assert sub_top is not None  # a cutoff gives both
                top[idx] = sub_top
    return total, top


def _tied_ap_sums(
    sorted_scores: torch.Tensor,
    positive: torch.Tensor,
    valid: torch.Tensor | None,
    ties: str,
    cutoff: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """_ap_sums for rows with ties, by tie groups (same arguments and answer).

    Dense over the rows: about 40 bytes of temporaries per entry (int32 group statistics, the
    float64 terms and the casts between them), freed as soon as they are used.
    """
    n, m = sorted_scores.shape
    device = sorted_scores.device
    pos = positive if valid is None else positive & valid
    same = sorted_scores[:, 1:] == sorted_scores[:, :-1]
    if valid is None:
        rank = torch.arange(1, m + 1, dtype=torch.int32, device=device).expand(n, m)
        # divide by a float64 row, broadcast: no [n, M] cast of rank
        divisor = torch.arange(1, m + 1, dtype=torch.float64, device=device).expand(n, m)
    else:
        rank = torch.cumsum(valid, dim=1, dtype=torch.int32)
        divisor = rank
    # Tie groups: maximal runs of equal scores; gid = the group of each position.
    start = torch.ones((n, m), dtype=torch.bool, device=device)
    start[:, 1:] = ~same
    del same
    gid = torch.cumsum(start, dim=1)
    del start
    gid -= 1
    # Per group (at the group's index): c = its valid entries, c+ = its valid positives; their
    # exclusive cumulative sums over the groups are C, C+ (those of the groups before it).
    # All four are gathered back to every position of the group.
    size_g = torch.zeros((n, m), dtype=torch.int32, device=device)
    if valid is None:
        size_g.scatter_add_(1, gid, torch.ones((), dtype=torch.int32, device=device).expand(n, m))
    else:
        size_g.scatter_add_(1, gid, valid.to(torch.int32))
    c = size_g.gather(1, gid)
    before = torch.cumsum(size_g, dim=1, dtype=torch.int32)
    before -= size_g
    del size_g
    i = rank - before.gather(1, gid)  # the position inside the group, 1..c
    del before
    pos_g = torch.zeros((n, m), dtype=torch.int32, device=device)
    pos_g.scatter_add_(1, gid, pos.to(torch.int32))
    cp = pos_g.gather(1, gid)
    pos_before = torch.cumsum(pos_g, dim=1, dtype=torch.int32)
    pos_before -= pos_g
    del pos_g
    pos_before = pos_before.gather(1, gid)
    del gid
    if ties == "average":
        # The position holds a positive with probability c+/c; given that, the i - 1 positions
        # before it in the group hold (i - 1)(c+ - 1)/(c - 1) positives on average:
        # term = (c+/c) * (C+ + 1 + (i - 1)(c+ - 1)/(c - 1)) / k.
        terms = (cp - 1).double()
        terms.div_((c - 1).clamp_min(1)).mul_(i - 1)  # 0 for c = 1 (then i = 1)
        del i
        terms.add_(pos_before + 1)
        del pos_before
        terms.mul_(cp)
        del cp
        terms.div_(c)  # c = 0 only in all-invalid groups
        del c
    elif ties == "optimistic":
        # The c+ positives fill the first c+ positions of the group: term = (C+ + i) / k.
        terms = (pos_before + i).double().masked_fill_(i > cp, 0.0)
    else:
        # The c - c+ negatives come first: term = (C+ + i - (c - c+)) / k.
        negatives = c - cp
        terms = (pos_before + i - negatives).double().masked_fill_(i <= negatives, 0.0)
    terms.div_(divisor)
    if valid is not None:  # clears the invalid positions (and any 0/0 there)
        terms.masked_fill_(~valid, 0.0)
    total = terms.sum(dim=1)
    top = None
    if cutoff is not None:
        top = terms.masked_fill_(rank > cutoff[:, None], 0.0).sum(dim=1)
    return total, top


# --------------------------------------------------------------------------------------------
# 1. AP of a score matrix
# --------------------------------------------------------------------------------------------


def average_precision(
    scores: torch.Tensor,
    relevance: torch.Tensor,
    ignore: torch.Tensor | None = None,
    ties: str = "average",
    *,
    return_valid: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact Average Precision of every query row of a score matrix.

    AP = (1 / Npos) * sum over the positives of the precision at the positive's rank, in the
    ranking of the row by descending score with the ignored entries removed.

    Args:
        scores: [N, M] real tensor (floating or integer; NaN not allowed, +-inf allowed;
            not float8 or float4, which torch cannot sort).
            Row i: query i's score of each database entry, higher = better.
        relevance: [N, M] bool (or 0/1 in any real dtype): entry j is a positive of query i.
        ignore: optional [N, M] bool (or 0/1): entries removed from the ranking entirely (they
            count neither as positives nor as negatives). Default None: nothing ignored.
        ties: how entries with equal scores are ordered. "average" (default): the expected AP
            over all orders of each tie group, equally likely (exact, in closed form).
            "pessimistic": each positive after the negatives it ties with (the lowest AP).
            "optimistic": each positive before them (the highest AP). Without ties all three are
            the plain AP.
        return_valid: if True, also return has_positive.
        chunk_size: rows processed at a time (the sort and its temporaries are chunk_size x M).
            Default None: about 256 MB of scores per chunk.

    Returns:
        ap: [N] float64 on the device of scores. A query without positives (after ``ignore``)
            gets 0.
        has_positive: [N] bool, only with return_valid=True: whether the query has at least one
            (non-ignored) positive, i.e. whether its AP is meaningful. Average AP over these
            queries: ``ap[has_positive].mean()``.
    """
    scores = _check_scores(scores)
    relevance = _check_mask(relevance, "relevance", scores)
    if ignore is not None:
        ignore = _check_mask(ignore, "ignore", scores)
    ties = _check_ties(ties)
    check_bool(return_valid, "return_valid")
    n, m = scores.shape
    chunk = _check_chunk_size(chunk_size, m * scores.element_size())

    ap = torch.zeros(n, dtype=torch.float64, device=scores.device)
    has_positive = torch.zeros(n, dtype=torch.bool, device=scores.device)
    if m > 0:
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            _check_no_nan(scores[lo:hi])
            sorted_scores, order = torch.sort(scores[lo:hi], dim=1, descending=True)
            positive = _mask_chunk(relevance[lo:hi], "relevance").gather(1, order)
            valid = None
            if ignore is not None:
                valid = ~_mask_chunk(ignore[lo:hi], "ignore").gather(1, order)
                positive &= valid
            del order
            total, _ = _ap_sums(sorted_scores, positive, valid, ties)
            del sorted_scores
            num_pos = positive.sum(dim=1)
            ap[lo:hi] = total / num_pos.clamp_min(1)
            has_positive[lo:hi] = num_pos > 0
    if return_valid:
        return ap, has_positive
    return ap


# --------------------------------------------------------------------------------------------
# 2. mAP / recall@k / mAP@R of embeddings
# --------------------------------------------------------------------------------------------


def _recall_hits(
    scores: torch.Tensor,
    kth: torch.Tensor,
    positive: torch.Tensor,
    k: int,
    ties: str,
) -> torch.Tensor:
    """[n] float64: P(at least one positive among the k best) under the tie rule.

    scores: [n, M] (excluded entries at -inf), kth: [n] the k-th largest score of each row,
    positive: [n, M] bool (False at excluded entries).
    """
    kth = kth[:, None]
    above = scores > kth
    tied = scores == kth
    pos_above = (above & positive).sum(dim=1)
    num_above = above.sum(dim=1)
    del above
    c = tied.sum(dim=1)  # >= 1: the k-th entry itself
    cp = (tied & positive).sum(dim=1)
    take = k - num_above  # 1..c: how many of the tie group fall in the top k
    negatives = c - cp
    if ties == "optimistic":
        in_group = cp > 0
    elif ties == "pessimistic":
        in_group = take > negatives
    else:
        return torch.where(pos_above > 0, 1.0, _chance_of_a_positive(c, cp, take))
    return ((pos_above > 0) | in_group).double()


#: Columns of the product terms that _chance_of_a_positive sums at a time (memory: rows x this).
_TERMS_AT_A_TIME = 4096


def _chance_of_a_positive(c: torch.Tensor, cp: torch.Tensor, take: torch.Tensor) -> torch.Tensor:
    """[n] float64: 1 - C(c - cp, take) / C(c, take), the chance that `take` entries drawn
    without replacement from a group of `c`, `cp` of them positives, hold a positive.

    The ratio is prod_{i < a} (1 - b / (c - i)) with a = min(take, cp), b = max(take, cp) (the
    draw's and the positives' roles swap), summed as log1p terms and turned back with expm1: exact
    to float64's rounding, where the difference of log-gamma values of c (about 1.3e7 at c = 1e6,
    so 2e-9 apart) left a relative error of 1e-3 in a chance of 1e-6. 0 exactly without a
    positive (no term), 1 where the group's negatives are fewer than the draw.
    """
    c64, cp64, take64 = c.double(), cp.double(), take.double()
    certain = take > c - cp  # every draw of `take` holds a positive
    a = torch.where(certain, 0, torch.minimum(take, cp))
    b = torch.maximum(take64, cp64)[:, None]
    log_none = torch.zeros_like(c64)
    terms = int(a.max()) if a.numel() else 0
    for start in range(0, terms, _TERMS_AT_A_TIME):
        i = torch.arange(start, min(terms, start + _TERMS_AT_A_TIME), device=c.device)
        # (c - i > b for every counted term: a + b = take + cp <= c where not certain)
        term = torch.log1p(-b / (c64[:, None] - i.double()))
        log_none += torch.where(i < a[:, None], term, 0.0).sum(dim=1)
    return torch.where(certain, 1.0, -torch.expm1(log_none))


def retrieval_metrics(
    queries: torch.Tensor,
    database: torch.Tensor | None = None,
    *,
    labels: torch.Tensor,
    ref_labels: torch.Tensor | None = None,
    ks: Sequence[int] = (1, 5, 10),
    metrics: Sequence[str] = METRICS,
    chunk_size: int | None = None,
    exclude_self: bool | None = None,
    ties: str = "average",
) -> dict[str, float]:
    """mAP, recall@k and mAP@R of embeddings, retrieved by cosine similarity, chunk by chunk.

    Scores are the cosine similarities of the L2-normalised embeddings (computed in float32, or
    in float64 if queries or database is float64, also inside a ``torch.autocast`` block). The
    database entries with the query's label are its positives.

    Args:
        queries: [N, D] floating (finite).
        database: [M, D] floating, same D and device. Default None: the queries are their own
            database (M = N).
        labels: [N] integer (or bool) labels of the queries, on the device of queries.
        ref_labels: [M] integer (or bool) labels of the database entries, on the device of
            database. Labels compare by value across dtypes (docs/api.md).
            Required with ``database``; must be None without it (then it is ``labels``).
        ks: the k of recall@k, positive ints. Default (1, 5, 10). Only used for "recall". A k
            beyond the number of candidates of a query (M, or M - 1 with exclude_self) retrieves
            them all (recall 1 for every query that counts); the key stays "recall@k".
        metrics: any of "map", "recall", "map_at_r". Default all three.
        chunk_size: queries per chunk; one chunk's [chunk_size, M] score matrix (plus the sort's
            temporaries) is all that exists at a time. Default None: about 256 MB of scores.
        exclude_self: query i does not retrieve database entry i (neither as positive nor as
            negative). Default None: True without ``database``, False with it. True with a
            ``database`` needs M == N (database entry i is query i).
        ties: tie rule for equal scores, as in :func:`average_precision` ("average": expectation
            over the random orders of tied entries; "pessimistic"; "optimistic"). It applies to
            all three metrics, recall@k included (a tie group straddling rank k).

    Returns:
        dict of Python floats, keys in this order: "map" (mean AP), "recall@k" for each k in ks
        (the fraction of queries with at least one positive among their k nearest entries),
        "map@r" (Musgrave et al. 2020: with R = the query's number of positives,
        (1/R) * sum_{i<=R} P(i) rel(i)), and "num_queries" (int: how many queries were averaged).
        Only the requested metrics appear. Queries without any positive are left out of every
        average; if none has one, the metrics are NaN and num_queries is 0.
    """
    queries = _check_embeddings(queries, "queries")
    n = queries.shape[0]
    labels = check_labels(labels, "labels", n, "row of queries", queries, "queries", always=True)
    if database is None:
        if ref_labels is not None:
            raise ValueError(
                "fastap: ref_labels goes with database; without database the queries are the "
                "database and labels are their labels"
            )
        database, ref_labels = queries, labels
        if exclude_self is None:
            exclude_self = True
    else:
        database = _check_embeddings(database, "database")
        _same_device(database, "database", queries, "queries")
        if database.shape[1] != queries.shape[1]:
            raise ValueError(
                f"fastap: database must have the dimension of queries ({queries.shape[1]}), "
                f"got shape {list(database.shape)}"
            )
        if ref_labels is None:
            raise ValueError("fastap: ref_labels (one label per database row) is required")
        ref_labels = check_labels(
            ref_labels,
            "ref_labels",
            database.shape[0],
            "row of database",
            database,
            "database",
            always=True,
        )
        if exclude_self is None:
            exclude_self = False
    check_bool(exclude_self, "exclude_self", allow_none=True)
    m = database.shape[0]
    if exclude_self and m != n:
        raise ValueError(
            f"fastap: exclude_self needs as many database rows as queries, got {m} and {n}"
        )
    if isinstance(metrics, str):
        metrics = (metrics,)
    try:
        metrics = tuple(metrics)
    except TypeError:
        raise TypeError(
            f"fastap: metrics must be a sequence of names among {METRICS}, got {type_name(metrics)}"
        ) from None
    if len(metrics) == 0:
        raise ValueError(f"fastap: metrics must name at least one of {METRICS}")
    for name in metrics:
        if not isinstance(name, str):  # (an array would be compared element by element)
            raise TypeError(
                f"fastap: metrics must be names among {METRICS}, got an item of type "
                f"{type_name(name)}"
            )
        if name not in METRICS:
            raise ValueError(f"fastap: metrics must be among {METRICS}, got {name!r}")
    ties = _check_ties(ties)
    ks = _check_positive_ints(ks, "ks")
    want_recall = "recall" in metrics
    want_map = "map" in metrics
    want_map_r = "map_at_r" in metrics
    num_candidates = m - 1 if exclude_self else m
    if want_recall:
        if not ks:
            raise ValueError("fastap: ks must not be empty when recall is requested")
    # A k beyond the number of candidates retrieves them all.
    ks_eff = [min(k, num_candidates) for k in ks]

    # Exact evaluation: the scores in the dtype named above, also inside an autocast block
    # (which would compute them in bf16 / fp16 and make ties of them).
    with autocast_off(queries.device):
        dtype = torch.float64 if torch.float64 in (queries.dtype, database.dtype) else torch.float32
        q = unit_rows(queries.to(dtype))
        db = unit_rows(database.to(dtype))
        # Rows that are identical (after normalisation) must tie: a matrix product may round
        # the scores of identical columns differently, by the position of the column and the
        # number of rows multiplied at once (one chunk), and so break their tie one way or the
        # other. The scores of the distinct rows alone, then a column per database row.
        distinct, column_of = torch.unique(db, dim=0, return_inverse=True)
        if distinct.shape[0] == m:
            distinct, column_of = db, None
        chunk = _check_chunk_size(chunk_size, m * torch.finfo(dtype).bits // 8)
        device = queries.device
        zero = torch.zeros((), dtype=torch.float64, device=device)
        total_map, total_map_r = zero.clone(), zero.clone()
        total_recall = torch.zeros(len(ks), dtype=torch.float64, device=device)
        counted_total = torch.zeros((), dtype=torch.int64, device=device)

        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            scores = q[lo:hi] @ distinct.T
            if column_of is not None:
                scores = scores[:, column_of]
            positive = labels[lo:hi, None] == ref_labels[None, :]
            if exclude_self:
                rows = torch.arange(hi - lo, device=device)
                scores[rows, rows + lo] = -math.inf
                positive[rows, rows + lo] = False
            num_pos = positive.sum(dim=1)
            counted = num_pos > 0
            counted_total += counted.sum()

            if want_map or want_map_r:
                scores, order = torch.sort(scores, dim=1, descending=True)
                positive = positive.gather(1, order)
                del order
                # Now sorted. The excluded self entry (-inf, not a positive) is last in its row,
                # where it changes no rank of a candidate: no validity mask needed.
                if want_recall and num_candidates > 0:
                    kth = scores[:, : max(ks_eff)]
                    for j, k in enumerate(ks_eff):
                        hits = _recall_hits(scores, kth[:, k - 1], positive, k, ties)
                        total_recall[j] += hits[counted].sum()
                total, top = _ap_sums(
                    scores, positive, None, ties, cutoff=num_pos if want_map_r else None
                )
                del scores, positive
                denom = num_pos.clamp_min(1).double()
                if want_map:
                    total_map += (total / denom)[counted].sum()
                if want_map_r:
                    assert top is not None  # a cutoff was given
                    total_map_r += (top / denom)[counted].sum()
            elif want_recall and num_candidates > 0:
                kth = torch.topk(scores, max(ks_eff), dim=1).values
                for j, k in enumerate(ks_eff):
                    hits = _recall_hits(scores, kth[:, k - 1], positive, k, ties)
                    total_recall[j] += hits[counted].sum()
                del scores, positive

    count = int(counted_total)

    def mean(total: torch.Tensor) -> float:
        return float(total) / count if count > 0 else math.nan

    out: dict[str, float] = {}
    if want_map:
        out["map"] = mean(total_map)
    if want_recall:
        for j, k in enumerate(ks):
            out[f"recall@{k}"] = mean(total_recall[j])
    if want_map_r:
        out["map@r"] = mean(total_map_r)
    out["num_queries"] = count
    return out


# --------------------------------------------------------------------------------------------
# 3. revisited Oxford / Paris
# --------------------------------------------------------------------------------------------

_GND_KEYS = ("easy", "hard", "junk")
# setup -> (positive lists, ignored lists)
_SETUPS = {
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}


def _gnd_indices(value, where: str) -> torch.Tensor:
    """One list of database indices of the ground truth as a 1-D int64 CPU tensor."""
    beyond_int64 = ValueError(f"fastap: {where} holds an index beyond int64")
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as error:
        if "Overflow" in str(error):  # (a Python int beyond int64)
            raise beyond_int64 from None
        try:  # a list of numpy integers, which torch takes only as an array (uint64 ones)
            t = torch.as_tensor(np.asarray(value))
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"fastap: {where} must be a list or array of database indices, got "
                f"{type_name(value)}"
            ) from None
    if t.dim() != 1:
        # (a number alone, or a nested list, which flattening would silently merge)
        shape = "a single number" if t.dim() == 0 else f"shape {list(t.shape)}"
        raise ValueError(
            f"fastap: {where} must be a flat (1-D) list of database indices, got {shape}"
        )
    if t.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"fastap: {where} must hold integer indices, got dtype {t.dtype}")
    unsigned_64 = t.dtype == UINT64
    t = t.to(device="cpu", dtype=torch.int64)
    if bool((t < 0).any()):
        # (uint64 indices of 2**63 and more wrap onto negative ones)
        if unsigned_64:
            raise beyond_int64
        raise ValueError(f"fastap: {where} holds a negative index")
    return t


def revisited_map(
    scores: torch.Tensor,
    ground_truth: Sequence[Mapping[str, Sequence[int]]],
    kappas: Sequence[int] = (1, 5, 10),
    *,
    is_ranking: bool = False,
    chunk_size: int | None = None,
) -> dict[str, dict[str, float]]:
    """mAP and mP@k of the revisited Oxford and Paris protocol (Radenovic et al., CVPR 2018).

    For each setup, each query's ranking of the database is cut down by removing its ignored
    images, and on that junk-free ranking, with r_0 < r_1 < ... the 0-based ranks of its n
    positives:

    - AP (trapezoidal rule) = (1/n) * sum_j (p0_j + p1_j) / 2, with p0_j = 1 if r_j == 0 else
      j / r_j, and p1_j = (j + 1) / (r_j + 1).
    - P@k as in the protocol's reference evaluation: with L the 1-based rank of the last
      positive (= r_{n-1} + 1) and k' = min(k, L), P@k = (number of positives among the first
      k') / k'. That is the plain precision at k when L >= k, and n / L (the precision at the
      last positive) when all positives are within the first k. (0 if a partial ranking holds
      no positive.)

    Setups: Easy (positives: easy; ignored: junk + hard), Medium (positives: easy + hard;
    ignored: junk), Hard (positives: hard; ignored: junk + easy).

    Args:
        scores: [num_queries, num_database] real tensor, higher = better; the ranking is its
            descending sort, ties broken by the lower database index first (a stable sort).
            With is_ranking=True: [num_queries, R] integer tensor, row q = the database indices
            in ranked order, best first (note: the protocol's reference code takes ranks as
            [num_database, num_queries]; pass its transpose). R may be less than the database
            size; positives missing from the ranking are never retrieved (they still count in n).
            The database is the images up to the largest index named by the ranking or the
            ground truth, or only the named images where that is fewer (a stray large index).
        ground_truth: one mapping per query with keys "easy", "hard" and "junk", each a flat
            (1-D) list / array / tensor of 0-based database indices: the "gnd" entries of the
            dataset's ground-truth file. Lists are taken as sets (duplicates count once); an
            index in both a positive and an ignored list of a setup counts as a positive.
        kappas: the k of mP@k, positive ints. Default (1, 5, 10).
        is_ranking: whether ``scores`` is a ranking (see above). Default False.
        chunk_size: queries ranked at a time. Default None: about 256 MB of scores per chunk
            (with a ranking: 8 bytes per database image, per query; see is_ranking above).

    Returns:
        {"easy": {...}, "medium": {...}, "hard": {...}}, each {"map": float, "mp@k": float for
        each k in kappas, "num_queries": int}. Values are fractions in [0, 1] (papers report
        percentages: multiply by 100). A query whose positive set is empty in a setup (e.g. no
        hard images) is skipped in that setup, and num_queries counts the others; a setup with
        no query left has NaN values.
    """
    check_bool(is_ranking, "is_ranking")
    name = "scores (a ranking)" if is_ranking else "scores"
    scores = _tensor(scores, "scores")
    if scores.dim() != 2:
        raise ValueError(
            f"fastap: {name} must be 2-D (queries x database), got shape {list(scores.shape)}"
        )
    if is_ranking:
        if scores.dtype == torch.bool or scores.is_floating_point() or scores.is_complex():
            raise TypeError(f"fastap: {name} must be an integer tensor, got dtype {scores.dtype}")
        unsigned_64 = scores.dtype == UINT64
        if scores.dtype in WIDE_UNSIGNED:  # (no comparison or sort kernels in torch: as int64)
            scores = scores.to(torch.int64)
        if scores.numel() > 0:
            if bool((scores < 0).any()):
                what = "an index of 2**63 or more" if unsigned_64 else "a negative database index"
                raise ValueError(f"fastap: {name} holds {what}")
            sorted_ranking = torch.sort(scores, dim=1).values
            if bool((sorted_ranking[:, 1:] == sorted_ranking[:, :-1]).any()):
                raise ValueError(f"fastap: {name} repeats a database index within a row")
            del sorted_ranking
    else:
        scores = _check_scores(scores)
    if isinstance(ground_truth, (str, bytes, Mapping)) or not isinstance(ground_truth, Sequence):
        raise TypeError(
            "fastap: ground_truth must be a list with one dict per query, got "
            f"{type_name(ground_truth)}"
        )
    num_queries = scores.shape[0]
    if len(ground_truth) != num_queries:
        raise ValueError(
            f"fastap: ground_truth must have one entry per query (row of scores, {num_queries}), "
            f"got {len(ground_truth)}"
        )
    kappas = _check_positive_ints(kappas, "kappas")

    gnd: list[dict[str, torch.Tensor]] = []
    largest = -1
    for qi, entry in enumerate(ground_truth):
        if not isinstance(entry, Mapping):
            raise TypeError(
                f"fastap: ground_truth[{qi}] must be a dict with keys {_GND_KEYS}, got "
                f"{type_name(entry)}"
            )
        lists = {}
        for key in _GND_KEYS:
            if key not in entry:
                raise ValueError(f"fastap: ground_truth[{qi}] has no key {key!r}")
            lists[key] = _gnd_indices(entry[key], f"ground_truth[{qi}][{key!r}]")
            if lists[key].numel() > 0:
                largest = max(largest, int(lists[key].max()))
        gnd.append(lists)

    device = scores.device
    if is_ranking:
        # The database is known only by the indices that the ranking and the ground truth name.
        # The masks below have a column per index up to the largest; where that is more columns
        # than there are names (a stray large index), the named images are numbered densely (in
        # order) first, so that memory follows the input, not the largest index.
        num_database = max(largest + 1, int(scores.max()) + 1 if scores.numel() > 0 else 0)
        num_names = scores.numel() + sum(t.numel() for lists in gnd for t in lists.values())
        if num_database > num_names:
            named = torch.cat(
                [scores.reshape(-1).to(torch.int64)]
                + [t.to(device) for lists in gnd for t in lists.values()]
            ).unique()
            scores = torch.searchsorted(named, scores.to(torch.int64).contiguous())
            named = named.cpu()
            gnd = [{key: torch.searchsorted(named, t) for key, t in lists.items()} for lists in gnd]
            num_database = named.numel()
    else:
        num_database = scores.shape[1]
        if largest >= num_database:
            raise ValueError(
                f"fastap: ground_truth holds database index {largest}, but scores has only "
                f"{num_database} columns"
            )
    # (a ranking's chunk also holds masks over the database, which may be wider than the ranking)
    chunk = _check_chunk_size(chunk_size, max(1, scores.shape[1], num_database) * 8)

    totals = {s: torch.zeros(1 + len(kappas), dtype=torch.float64) for s in _SETUPS}
    counts = dict.fromkeys(_SETUPS, 0)
    for lo in range(0, num_queries, chunk):
        hi = min(num_queries, lo + chunk)
        if is_ranking:
            ranking = scores[lo:hi].to(torch.int64)
        else:
            _check_no_nan(scores[lo:hi])
            ranking = torch.sort(scores[lo:hi], dim=1, descending=True, stable=True).indices
        # Per query of the chunk, the membership of every database image in each list.
        member = {}
        for key in _GND_KEYS:
            per_query = [gnd[q][key] for q in range(lo, hi)]
            rows = torch.cat([torch.full_like(t, q) for q, t in enumerate(per_query)]).to(device)
            cols = torch.cat(per_query).to(device)
            mask = torch.zeros((hi - lo, num_database), dtype=torch.bool, device=device)
            mask[rows, cols] = True
            member[key] = mask
        for setup, (pos_keys, ign_keys) in _SETUPS.items():
            positive = member[pos_keys[0]].clone()
            for key in pos_keys[1:]:
                positive |= member[key]
            ignored = member[ign_keys[0]].clone()
            for key in ign_keys[1:]:
                ignored |= member[key]
            num_pos = positive.sum(dim=1)
            ranked_pos = positive.gather(1, ranking)
            kept = ~(ignored & ~positive).gather(1, ranking)
            del positive, ignored
            ap, precisions = _trapezoid_ap(ranked_pos, kept, num_pos, kappas)
            use = num_pos > 0
            counts[setup] += int(use.sum())
            totals[setup][0] += ap[use].sum().cpu()
            if kappas:
                totals[setup][1:] += precisions[use].sum(dim=0).cpu()

    out: dict[str, dict[str, float]] = {}
    for setup in _SETUPS:
        cnt = counts[setup]
        values = (totals[setup] / cnt).tolist() if cnt > 0 else [math.nan] * (1 + len(kappas))
        res: dict[str, float] = {"map": values[0]}
        for j, k in enumerate(kappas):
            res[f"mp@{k}"] = values[1 + j]
        res["num_queries"] = cnt
        out[setup] = res
    return out


def _trapezoid_ap(
    ranked_pos: torch.Tensor, kept: torch.Tensor, num_pos: torch.Tensor, kappas: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Trapezoidal AP [n] and protocol P@k [n, len(kappas)] (float64) of ranked rows.

    ranked_pos, kept: [n, R] bool in ranked order (positive; not ignored); num_pos: [n] the
    number of positives (including any missing from the ranking). Rows without positives get 0.
    The float work runs on the positives only (few per query in these datasets).
    """
    n = ranked_pos.shape[0]
    is_pos = ranked_pos & kept
    rows, cols = is_pos.nonzero(as_tuple=True)
    # 0-based rank in the junk-free ranking, and index among the positives, of each positive
    r = torch.cumsum(kept, dim=1, dtype=torch.int32)[rows, cols].double() - 1
    j = torch.cumsum(is_pos, dim=1, dtype=torch.int32)[rows, cols].double() - 1
    counts = is_pos.sum(dim=1)
    del is_pos
    p0 = torch.where(r == 0, 1.0, j / r.clamp_min(1))
    p1 = (j + 1) / (r + 1)
    zeros = torch.zeros(n, dtype=torch.float64, device=ranked_pos.device)
    ap = zeros.index_add(0, rows, (p0 + p1) / 2) / num_pos.clamp_min(1).double()
    one_based = r + 1
    # nonzero lists the positives row by row in rank order: a row's last one ends its run.
    last = zeros  # 0: no positive ranked
    if rows.numel() > 0:
        ends = (torch.cumsum(counts, dim=0) - 1).clamp_min(0)
        last = torch.where(counts > 0, one_based[ends], 0.0)
    precisions = []
    for k in kappas:
        # (last is at most the row's width: a k beyond it, up to any int, takes that instead)
        kq = last.clamp(max=min(k, ranked_pos.shape[1]))
        found = zeros.index_add(0, rows, (one_based <= kq[rows]).double())
        precisions.append(torch.where(kq > 0, found / kq.clamp_min(1), 0.0))
    if precisions:
        return ap, torch.stack(precisions, dim=1)
    return ap, zeros[:, None][:, :0]
