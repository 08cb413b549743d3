"""nn.Module front ends of the AP loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastap.functional import DEFAULT_NUM_BINS, DEFAULT_SCORE_RANGE, ap_loss


class APLoss(torch.nn.Module):
    """The listwise AP_Q loss on embeddings, called like a pytorch-metric-learning loss.

    ``loss(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None)``

    Scores are cosine similarities of the L2-normalised embeddings. Without ``ref_emb`` the batch
    is its own database: each embedding is a query ranked against all the others (its
    self-match is excluded). With ``ref_emb`` [M, D] and ``ref_labels`` [M], every embedding is a
    query ranked against the reference set.

    Args:
        num_bins: Q >= 2 (default 20).
        score_range: (lo, hi) of the bins (default (-1, 1), the range of cosine similarity).
    """

    def __init__(self, num_bins: int = DEFAULT_NUM_BINS, score_range=DEFAULT_SCORE_RANGE):
        super().__init__()
        self.num_bins = num_bins
        self.score_range = tuple(score_range)

    def extra_repr(self) -> str:
        return f"num_bins={self.num_bins}, score_range={self.score_range}"

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple=None,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if indices_tuple is not None:
            raise NotImplementedError("fastap.APLoss: indices_tuple is not supported yet")
        _check_embeddings(embeddings, "embeddings")
        queries = F.normalize(embeddings, dim=1)
        if ref_emb is None:
            if ref_labels is not None:
                raise ValueError("fastap.APLoss: ref_labels was given without ref_emb")
            scores = queries @ queries.T
            return ap_loss(
                scores,
                labels=labels,
                num_bins=self.num_bins,
                score_range=self.score_range,
                exclude_self=True,
            )
        _check_embeddings(ref_emb, "ref_emb")
        if ref_labels is None:
            raise ValueError("fastap.APLoss: ref_emb needs ref_labels (one label per row)")
        if ref_emb.shape[1] != embeddings.shape[1]:
            raise ValueError(
                "fastap.APLoss: embeddings and ref_emb must have the same dimension, got "
                f"{embeddings.shape[1]} and {ref_emb.shape[1]}"
            )
        scores = queries @ F.normalize(ref_emb, dim=1).T
        return ap_loss(
            scores,
            labels=labels,
            ref_labels=ref_labels,
            num_bins=self.num_bins,
            score_range=self.score_range,
        )


def _check_embeddings(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fastap.APLoss: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"fastap.APLoss: {name} must be 2-D (batch x dim), got {list(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"fastap.APLoss: {name} must be floating point, got {t.dtype}")
