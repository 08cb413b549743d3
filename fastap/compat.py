"""Drop-in replacements with the call signature of the authors' loss modules (Revaud et al.,
"Learning with Average Precision", ICCV 2019, dirtorch's ``APLoss`` and ``TAPLoss``):

    loss = APLoss(nq=25, min=0, max=1)(x, label, qw=None, ret='1-mAP')

``x`` [N, M] scores, ``label`` [N, M] 0/1 relevance. Same defaults and the same values wherever
theirs is defined; they run on fastap's fused kernels instead of N x Q x M tensors. Where theirs
gives NaN (a query without positives) these give a finite answer: such a query has AP 0 with
``ret='AP'`` and is left out of the mean with ``ret='1-mAP'``. With query weights ``qw`` the loss
is, as theirs, ``1 - mean(qw * AP)`` (over the queries with a positive).

They live here because ``fastap.APLoss`` is the pytorch-metric-learning-style module.
"""

from __future__ import annotations

import math
import numbers
import re

import torch

from fastap._validation import (
    MAX_NUM_BINS,
    check_bool,
    check_query_weights,
    integer_value,
    real_value,
    type_name,
)
from fastap.functional import average_precision_and_validity, weights_over_largest

# fastap's names of the arguments, and theirs here (in the messages of the checks).
_THEIR_NAMES = {
    "scores": "x",
    "relevance": "label",
    "query_weights": "qw",
    "score_range": "min and max",
}


def _in_their_terms(error: Exception) -> Exception:
    """`error`, raised by a check of fastap's, with the arguments named as this module's callers
    know them (x, label, qw, nq, min and max), and without advice that does not apply here."""
    message = str(error).replace("fastap: ", "fastap.compat: ", 1)
    message = message.replace("mask such entries with `ignore` or fix", "fix")
    message = re.sub(r"\bscores contain\b", "x contains", message)
    message = re.sub(r"\bwith (\d+) bins\b", r"with nq = \1 bins", message)
    message = re.sub(
        r"\b(scores|relevance|query_weights|score_range)\b(?! are binned)",
        lambda found: _THEIR_NAMES[found.group(1)],
        message,
    )
    return type(error)(message)


def _weighted_mean(
    ap: torch.Tensor, has_positive: torch.Tensor, qw: torch.Tensor, count: torch.Tensor
) -> torch.Tensor:
    """mean(qw * AP) over the queries with a positive, in the dtype of `ap`: the products summed
    in the weights' dtype (at least that of `ap`) over the largest weight that counts
    (weights_over_largest), so that the mean is infinite only where its value is beyond the
    dtype of `ap`."""
    dtype = torch.promote_types(ap.dtype, qw.dtype)
    scaled, largest = weights_over_largest(qw.to(dtype), has_positive)
    total = (scaled * ap.to(dtype)).sum()
    return (largest * (total / count.clamp_min(1).to(dtype))).to(ap.dtype)


def _their_weights(qw, x: torch.Tensor):
    """qw as the authors' ``ap *= qw`` takes it: a real number or a 0-d tensor weighs every
    query alike, and integer weights count as floating ones (in the dtype of x, float32 at
    least). Anything else goes to fastap's check as it is (bool refused there)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    if isinstance(qw, numbers.Real) and not isinstance(qw, bool):  # (numpy's bool is no Real)
        qw = torch.tensor(float(qw), dtype=dtype, device=x.device)
    if isinstance(qw, torch.Tensor):
        if not qw.is_floating_point() and not qw.is_complex() and qw.dtype != torch.bool:
            qw = qw.to(dtype)
        if qw.dim() == 0:
            qw = qw.expand(x.shape[0])
    return qw


class APLoss(torch.nn.Module):
    """Quantized AP loss with the authors' signature: ``nq`` bins over ``[min, max]``."""

    variant = "ap_q"

    def __init__(self, nq: int = 25, min: float = 0, max: float = 1):
        super().__init__()
        try:
            nq = integer_value(nq)  # an int, numpy integer or 0-d integer tensor; not a float
        except TypeError:
            raise TypeError(
                f"fastap.compat: nq (the number of bins) must be an int, got {nq!r}"
            ) from None
        if nq < 2:
            raise ValueError(f"fastap.compat: nq (the number of bins) must be at least 2, got {nq}")
        if nq > MAX_NUM_BINS:
            raise ValueError(
                f"fastap.compat: nq (the number of bins) must be at most 2^20 = {MAX_NUM_BINS}, "
                f"got {nq}"
            )
        try:
            lo, hi = real_value(min), real_value(max)
        except (TypeError, ValueError):
            raise TypeError(
                f"fastap.compat: min and max must be numbers, got min={min!r}, max={max!r}"
            ) from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(
                f"fastap.compat: min and max must be finite with min < max, got {min} and {max}"
            )
        self.nq = nq
        # (As Python floats: numpy scalars and 0-d tensors, taken above, would be traced as
        # tensors by torch.compile, where comparing them cannot be guarded.)
        self.min = lo
        self.max = hi

    def extra_repr(self) -> str:
        return f"nq={self.nq}, min={self.min}, max={self.max}"

    def forward(self, x: torch.Tensor, label: torch.Tensor, qw=None, ret: str = "1-mAP"):
        """x: [N, M] scores, label: [N, M] relevance (bool or 0/1 of any dtype), qw: optional [N]
        query weights. ret="1-mAP" (default): the scalar 1 - the (qw-weighted) mean AP over the
        queries with a positive (0 where none has one); ret="AP": the [N] AP per query (0 for a
        query without positives, where the authors' gives NaN). docs/migration.md."""
        if not isinstance(ret, str):  # (a numpy array would compare element by element)
            raise TypeError(
                f"fastap.compat: ret must be the str '1-mAP' or 'AP', got {type_name(ret)}"
            )
        if ret not in ("1-mAP", "AP"):
            raise ValueError(f"fastap.compat: ret must be '1-mAP' or 'AP', got {ret!r}")
        if ret == "AP" and qw is not None:
            raise ValueError("fastap.compat: qw (query weights) only applies to ret='1-mAP'")
        if isinstance(x, torch.Tensor) and isinstance(label, torch.Tensor):
            if x.dim() != 2 or label.shape != x.shape:
                raise ValueError(
                    "fastap.compat: x must be an N x M score matrix and label its N x M relevance, "
                    f"got x {list(x.shape)} and label {list(label.shape)}"
                )
        try:
            ap, has_positive = average_precision_and_validity(
                x,
                label,
                num_bins=self.nq,
                score_range=(self.min, self.max),
                variant=self.variant,
            )
            qw = None if qw is None else check_query_weights(_their_weights(qw, x), x)
        except (TypeError, ValueError) as error:
            raise _in_their_terms(error) from None
        if ret == "AP":
            return ap
        valid = has_positive.to(ap.dtype)
        count = valid.sum()
        if qw is None:
            mean_ap = (valid * ap).sum() / count.clamp_min(1)
        else:
            mean_ap = _weighted_mean(ap, has_positive, qw, count)
        return torch.where(count > 0, 1 - mean_ap, torch.zeros_like(mean_ap))


class TAPLoss(APLoss):
    """Tie-aware AP loss with the authors' signature (``simplified`` picks their simplified
    formula)."""

    def __init__(self, nq: int = 25, min: float = 0, max: float = 1, simplified: bool = False):
        super().__init__(nq=nq, min=min, max=max)
        check_bool(simplified, "simplified", "fastap.compat")
        self.simplified = simplified

    @property
    def variant(self) -> str:  # type: ignore[override]
        """Read from ``simplified`` at each call, so that setting it takes effect, as theirs."""
        check_bool(self.simplified, "simplified", "fastap.compat")
        return "tie_aware_simplified" if self.simplified else "tie_aware"

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, simplified={self.simplified}"
