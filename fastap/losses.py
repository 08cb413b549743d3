"""nn.Module front ends called the way pytorch-metric-learning losses are called:
``loss(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None)``."""

from __future__ import annotations

import torch

from fastap._validation import (
    MAX_NUM_BINS,
    check_bins,
    check_embedding_matrix,
    check_finite_rows,
    check_int,
    check_labels,
    check_variant,
    checks_values_of,
    in_common_dtype,
    is_integer_tensor,
    type_name,
)
from fastap.cosine import cosine_scores
from fastap.embeddings import constant_to_compile, histograms_from_embeddings
from fastap.functional import (
    DEFAULT_NUM_BINS,
    DEFAULT_SCORE_RANGE,
    ap_from_histograms,
    average_precision_and_validity,
)
from fastap.ops import histogram_dtype


def miner_weights(
    indices_tuple,
    num_queries: int,
    device,
    dtype: torch.dtype = torch.float32,
    num_references: int | None = None,
) -> torch.Tensor:
    """Per-query weights from a miner's output, as pytorch-metric-learning computes them: each
    query's number of appearances in the tuples (only as anchor when a reference set is used),
    divided by the largest such number. No tuple (or only empty ones): all ones. In `dtype`
    (the losses pass float64 for float64 embeddings, else float32).

    indices_tuple: (anchors, positives, negatives) or (anchors1, positives, anchors2, negatives),
    1-D integer tensors of batch indices; with a reference set (num_references rows; None: the
    batch is its own), the positives and negatives index its rows. Whether they lie in range is
    a check of values (fastap.set_value_checks): under torch.compile an index outside fails in
    the indexing, or (positives and negatives into a reference set, which the weights do not
    read) not at all.
    """
    if indices_tuple is None:
        return torch.ones(num_queries, device=device, dtype=dtype)
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4):
        raise ValueError(
            "fastap: indices_tuple must be (anchors, positives, negatives) or "
            "(anchors1, positives, anchors2, negatives)"
        )
    for t in indices_tuple:
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or not is_integer_tensor(t):
            raise TypeError("fastap: indices_tuple must hold 1-D integer tensors")
        if t.device.type == "meta" and torch.device(device).type != "meta":
            raise ValueError(
                f"fastap: indices_tuple is on the meta device, which holds no indices, and the "
                f"embeddings on {device}"
            )
    if all(t.numel() == 0 for t in indices_tuple):
        return torch.ones(num_queries, device=device, dtype=dtype)
    counted = indices_tuple
    if num_references is not None:  # only the anchors
        anchors = (0,) if len(indices_tuple) == 3 else (0, 2)
        counted = [indices_tuple[i] for i in anchors]
        references = [t for i, t in enumerate(indices_tuple) if i not in anchors]
        reference_indices = torch.cat([as_index(t, device) for t in references])
        _check_indices(reference_indices, num_references, "ref_emb")
    indices = torch.cat([as_index(t, device) for t in counted])
    _check_indices(indices, num_queries, "the batch")
    # index_add_ rather than bincount: its output has num_queries entries whatever the values,
    # which torch.compile(fullgraph=True) can trace.
    counts = torch.zeros(num_queries, device=device, dtype=dtype).index_add_(
        0, indices, torch.ones(indices.shape, device=device, dtype=dtype)
    )
    return counts / counts.max().clamp_min(1) if num_queries else counts


def as_index(t: torch.Tensor, device) -> torch.Tensor:
    """A miner's index tensor as int64 on ``device`` (torch's min and max, which the checks take,
    have no kernels for uint16 to uint64; a uint64 index of 2**63 or more wraps to a negative one,
    which the checks refuse)."""
    return t.to(device=device, dtype=torch.int64)


def _check_indices(indices: torch.Tensor, size: int, rows: str) -> None:
    if checks_values_of(indices) and indices.numel():
        if int(indices.min()) < 0 or int(indices.max()) >= size:
            raise ValueError(f"fastap: indices_tuple holds indices outside [0, {size}) ({rows})")


def check_batch(embeddings, labels, owner: str) -> torch.Tensor:
    """A batch of embeddings [B, D] and its labels [B], checked (with value checks on, finite);
    the labels as int64."""
    check_embedding_matrix(embeddings, "embeddings", owner)
    check_finite_rows(embeddings, "embeddings", owner)
    return check_labels(
        labels, "labels", embeddings.shape[0], "row of embeddings", embeddings, "embeddings", owner
    )


#: score_matrix_limit="auto" (the default) off CUDA: 1 GiB of scores. On the CPU the paths from
#: the embeddings take about the time of the score matrix in-batch, 1.2 to 1.4x against a
#: database, in a fraction of the memory (benchmarks/RESULTS.md).
AUTO_SCORE_MATRIX_LIMIT = 2**30
#: score_matrix_limit="auto" on a CUDA device: this fraction of its memory (1/16: 8.8 GB of scores
#: on a 141 GB H200, 1.5 GB on a 24 GB GPU). There the score matrix is the faster path wherever it
#: fits (H200, 2026-12-04: 4.92 ms for the op at 32768^2 in fp32, where the path from fp32
#: embeddings took 64.6 ms; bf16, D = 256: 3.73 against 9.19 ms at 16384), and the scores and
#: their gradient then hold at most an eighth of the device.
AUTO_SCORE_MATRIX_SHARE_OF_GPU = 16


@constant_to_compile
def gpu_memory_bytes(index: int) -> int:
    """The memory of CUDA device ``index`` in bytes: all of it, not what is free at the moment,
    so that which path a batch takes does not depend on what else is allocated."""
    return int(torch.cuda.get_device_properties(index).total_memory)


def check_score_matrix_limit(value, owner: str):
    """score_matrix_limit: "auto" or bytes (an int >= 0); TypeError or ValueError naming it."""
    if isinstance(value, str):
        if value == "auto":
            return value
        raise ValueError(
            f"{owner}: score_matrix_limit must be 'auto' or an int (bytes), got {value!r}"
        )
    try:
        return check_int(value, "score_matrix_limit", 0, owner, " (bytes)")
    except TypeError:
        raise TypeError(
            f"{owner}: score_matrix_limit must be an int (bytes) or 'auto', got {type_name(value)}"
        ) from None


def score_matrix_limit_bytes(limit, device: torch.device) -> int:
    """The bytes of scores above which the embedding losses compute from the embeddings, for a
    batch on ``device``: ``limit`` itself, or for "auto" 1/16 of a CUDA device's memory and 1 GiB
    elsewhere (AUTO_SCORE_MATRIX_SHARE_OF_GPU, AUTO_SCORE_MATRIX_LIMIT)."""
    if limit != "auto":
        return limit
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return gpu_memory_bytes(index) // AUTO_SCORE_MATRIX_SHARE_OF_GPU
    return AUTO_SCORE_MATRIX_LIMIT


def _limit_repr(limit) -> str:
    return "" if limit == "auto" else f", score_matrix_limit={limit!r}"


class _EmbeddingAPLoss(torch.nn.Module):
    """Shared call logic: embeddings -> cosine scores -> per-query AP -> PML-style reduction:
    the mean of w_i (1 - AP_i) over the queries that have a positive, w from indices_tuple."""

    num_bins: int
    score_range: tuple[float, float]
    variant: str
    #: Above this many bytes of N x M scores, the loss is computed from the embeddings without
    #: forming the score matrix (fastap.ap_loss_from_embeddings: block by block, or the fused CUDA
    #: kernel; a fraction of the memory). "auto": score_matrix_limit_bytes.
    score_matrix_limit: int | str = "auto"

    def histogram_bins(self) -> int:
        """The number of triangular bins of the soft histograms (FastAP: num_bins + 1)."""
        return self.num_bins

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple=None,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        owner = f"fastap.{type(self).__name__}"
        check_batch(embeddings, labels, owner)
        if ref_emb is None:
            if ref_labels is not None:
                raise ValueError(f"{owner}: ref_labels was given without ref_emb")
            database, database_labels = embeddings, None
        else:
            check_embedding_matrix(ref_emb, "ref_emb", owner)
            check_finite_rows(ref_emb, "ref_emb", owner)
            if ref_labels is None:
                raise ValueError(f"{owner}: ref_emb needs ref_labels (one label per row)")
            if ref_emb.shape[1] != embeddings.shape[1]:
                raise ValueError(
                    f"{owner}: embeddings and ref_emb must have the same dimension, got "
                    f"{embeddings.shape[1]} and {ref_emb.shape[1]}"
                )
            if ref_emb.device != embeddings.device:
                raise ValueError(
                    f"{owner}: embeddings and ref_emb must be on the same device, got "
                    f"{embeddings.device} and {ref_emb.device}"
                )
            embeddings, ref_emb = in_common_dtype(embeddings, ref_emb)
            check_labels(ref_labels, "ref_labels", ref_emb.shape[0], "row of ref_emb", embeddings,
                         "embeddings", owner)  # fmt: skip
            database, database_labels = ref_emb, ref_labels
        weights = miner_weights(
            indices_tuple,
            embeddings.shape[0],
            embeddings.device,
            histogram_dtype(embeddings.dtype),  # the loss's
            None if ref_emb is None else ref_emb.shape[0],
        )
        per_query, valid = self.per_query_loss(
            embeddings, database, labels, database_labels, exclude_self=ref_emb is None
        )
        return mean_over_valid(per_query * weights.to(per_query), valid)

    def per_query_loss(
        self,
        queries: torch.Tensor,
        database: torch.Tensor,
        labels: torch.Tensor,
        ref_labels: torch.Tensor | None,
        *,
        exclude_self: bool = False,
        self_offset: int | None = None,
        ignore: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 - AP_i [N], has_positive [N]) of the queries ranked against the database by cosine
        similarity: the building block that the distributed and cross-batch-memory helpers share.
        ``ref_labels=None`` means in-batch: the database is the queries (the same tensor) and the
        labels are theirs. Above ``score_matrix_limit`` bytes of scores, computed from the
        embeddings without the score matrix (fastap.ap_loss_from_embeddings, backend "auto": the
        same values in fp32 and fp64, and under torch.autocast; bf16/fp16 embeddings on a GPU, or
        autocast there, take the fused kernel, whose scores are fp32 sums rather than scores
        rounded to bf16/fp16).
        """
        same_set = ref_labels is None
        if same_set and database is not queries:
            raise ValueError(
                "fastap: per_query_loss needs ref_labels for a database other than the queries"
            )
        if exclude_self and self_offset is None and queries.shape[0] != database.shape[0]:
            # (Checked before the switch: the embeddings path would take self_offset = 0, the
            # score-matrix path refuses, so the answer would depend on the batch's size.)
            raise ValueError(
                "fastap: exclude_self needs a square scores matrix (the candidates are the "
                f"queries), got shape {[queries.shape[0], database.shape[0]]}; give self_offset "
                "when the queries are a slice of the candidates"
            )
        # (Read at each call, as the attribute may be set after construction: checked as there.)
        limit = score_matrix_limit_bytes(
            check_score_matrix_limit(self.score_matrix_limit, f"fastap.{type(self).__name__}"),
            queries.device,
        )
        score_bytes = queries.shape[0] * database.shape[0] * max(4, queries.element_size())
        if ignore is None and score_bytes > limit:
            n, p, positives = histograms_from_embeddings(
                queries,
                None if same_set else database,
                labels=labels,
                ref_labels=None if same_set else ref_labels,
                num_bins=self.histogram_bins(),
                score_range=self.score_range,
                exclude_self=exclude_self,
                self_offset=self_offset,
            )
            ap, has_positive = ap_from_histograms(n, p, positives, self.variant)
            return 1 - ap, has_positive
        cosine = cosine_scores(queries, database)
        ap, has_positive = average_precision_and_validity(
            cosine,
            labels=labels,
            ref_labels=ref_labels,
            num_bins=self.histogram_bins(),
            score_range=self.score_range,
            ignore=ignore,
            exclude_self=exclude_self,
            self_offset=self_offset,
            variant=self.variant,
            scores_from="embeddings",
        )
        return 1 - ap, has_positive


def mean_over_valid(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The mean of `values` over the entries where `valid`; 0 (with a zero gradient) if none."""
    mask = valid.to(values.dtype)
    count = mask.sum()
    total = (mask * values).sum()
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


class APLoss(_EmbeddingAPLoss):
    """The listwise AP loss on embeddings (Revaud et al. 2019), pytorch-metric-learning style.

    ``loss(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None)``

    Scores are cosine similarities of the L2-normalised embeddings. Without ``ref_emb`` the batch
    is its own database: each embedding is a query ranked against all the others (its self-match
    excluded). With ``ref_emb`` [M, D] and ``ref_labels`` [M] each embedding is a query ranked
    against that reference set. ``indices_tuple`` (a miner's pairs or triplets) weights the
    queries as pytorch-metric-learning does. The loss is the mean of w_i (1 - AP_i) over the
    queries that have a positive (w_i = 1 without a miner), 0 if there is none.

    Args:
        num_bins: Q >= 2 (default 20).
        score_range: (lo, hi) of the bins (default (-1, 1), the range of cosine similarity).
        variant: "ap_q" (default), "tie_aware" or "tie_aware_simplified".
        score_matrix_limit: above this many bytes of N x M scores (each counted at 4 bytes, or
            the embeddings' element size if larger) the loss is computed from the embeddings,
            never holding the score matrix (see fastap.ap_loss_from_embeddings). "auto" (the
            default): 1/16 of the memory of the batch's CUDA device, 1 GiB elsewhere.
    """

    def __init__(
        self,
        num_bins: int = DEFAULT_NUM_BINS,
        score_range: tuple[float, float] = DEFAULT_SCORE_RANGE,
        variant: str = "ap_q",
        score_matrix_limit: int | str = "auto",
    ):
        super().__init__()
        check_variant(variant, "fastap.APLoss")
        self.num_bins, lo, hi = check_bins(num_bins, score_range)  # bad bins fail here, not later
        self.score_range = (lo, hi)
        self.variant = variant
        self.score_matrix_limit = check_score_matrix_limit(score_matrix_limit, "fastap.APLoss")

    def extra_repr(self) -> str:
        text = f"num_bins={self.num_bins}, score_range={self.score_range}, variant={self.variant!r}"
        return text + _limit_repr(self.score_matrix_limit)


def _check_fastap_num_bins(num_bins) -> int:
    owner = "fastap.FastAPLoss"
    num_bins = check_int(num_bins, "num_bins", 1, owner)
    if num_bins >= MAX_NUM_BINS:
        raise ValueError(
            f"{owner}: num_bins must be below 2^20 (FastAP takes num_bins + 1 bins), got {num_bins}"
        )
    return num_bins


class FastAPLoss(_EmbeddingAPLoss):
    """FastAP (Cakir et al., CVPR 2019) with pytorch-metric-learning's semantics and call.

    Squared Euclidean distances d of the L2-normalised embeddings, in [0, 4], are binned into
    ``num_bins + 1`` triangular bins centred at 4 l / num_bins (smaller distance = higher rank);
    self-pairs are excluded and queries without positives dropped. Since d = 2 - 2 cos is an
    affine function of the cosine similarity, and triangular binning commutes with affine maps,
    this is exactly AP_Q on cosine scores over (-1, 1) with num_bins + 1 bins: it runs on the same
    fused kernels without forming the distance matrix. Unlike pytorch-metric-learning's
    FastAPLoss, ``ref_emb``/``ref_labels`` are supported.

    Args:
        num_bins: number of bin intervals (default 10, as in pytorch-metric-learning). As there,
            the attribute ``num_bins`` holds it and ``num_edges`` is ``num_bins + 1``, the bins
            of the histograms (read from ``num_bins`` at each call, so that setting it takes
            effect as a new module's would).
        score_matrix_limit: as for :class:`APLoss`.
    """

    def __init__(self, num_bins: int = 10, score_matrix_limit: int | str = "auto"):
        super().__init__()
        owner = "fastap.FastAPLoss"
        self.score_matrix_limit = check_score_matrix_limit(score_matrix_limit, owner)
        self.num_bins = _check_fastap_num_bins(num_bins)
        self.score_range = (-1.0, 1.0)
        self.variant = "ap_q"

    @property
    def num_edges(self) -> int:
        """The bins of the histograms: num_bins + 1 (pytorch-metric-learning's name)."""
        return self.num_bins + 1

    def histogram_bins(self) -> int:
        # (num_bins may have been set after construction: checked as the constructor checks it,
        # rather than as num_bins + 1 bins by the histograms' check.)
        return _check_fastap_num_bins(self.num_bins) + 1

    def extra_repr(self) -> str:
        return f"num_bins={self.num_bins}" + _limit_repr(self.score_matrix_limit)
