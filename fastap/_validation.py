"""Argument checks of the public API: every bad input becomes a ValueError or TypeError that names
the argument, before any kernel runs.

Checks of shapes, dtypes and devices cost nothing and always run. Checks of values (relevance and
ignore entries other than 0/1, negative or non-finite query weights, non-finite scores and
embeddings, miners' indices out of range) read the
data, so they run in eager mode only, and can be turned off there with set_value_checks(False);
under torch.compile (and for tensors batched by torch.func.vmap, which cannot be read back) they
are skipped (values are then taken as documented: nonzero relevance is a positive, nonzero ignore
ignores, a query with a non-finite score has AP NaN).
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
import threading
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import numpy as np
import torch

SCORE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
VARIANTS = ("ap_q", "tie_aware", "tie_aware_simplified")


def type_name(value) -> str:
    """The name of value's type for a message: ``int``, ``numpy.bool``, ``torch.Tensor``."""
    t = type(value)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


# The largest value of an int argument: the operators take them as int64.
INT64_MAX = 2**63 - 1


def check_int(value, name: str, minimum: int, owner: str = "fastap", what: str = "") -> int:
    """An integer argument from `minimum` to 2**63 - 1 (the operators' int64), as a Python int:
    an int or a numpy integer (any numbers.Integral), not a bool, a float or a tensor. TypeError
    for another type, ValueError outside the range, each naming the argument (`what`: its unit,
    if any)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be an int{what}, got {type_name(value)}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{owner}: {name} must be at least {minimum}{what}, got {value}")
    if value > INT64_MAX:
        raise ValueError(f"{owner}: {name} must be at most 2**63 - 1 (an int64){what}, got {value}")
    return value


def check_bool(value, name: str, owner: str = "fastap", allow_none: bool = False):
    """A flag argument: a Python bool (or None, with allow_none), not a number or a numpy bool;
    TypeError naming the argument otherwise."""
    if isinstance(value, bool) or (allow_none and value is None):
        return value
    what = "a bool or None" if allow_none else "a bool"
    raise TypeError(f"{owner}: {name} must be {what}, got {type_name(value)}")


def integer_value(value) -> int:
    """operator.index(value) for an int, a numpy integer or a 0-d integer tensor; TypeError for
    anything else (a bool, a float, a tensor of another shape or dtype), for the caller to word."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError("a bool")
    if isinstance(value, torch.Tensor) and (value.dim() != 0 or value.dtype == torch.bool):
        raise TypeError("not a 0-d integer tensor")
    return operator.index(value)


def real_value(value) -> float:
    """float(value) for a real number (an int, a float, a numpy number, a 0-d real tensor, or a
    symbolic float of torch.compile), +-infinity for one beyond float64's range (10**400);
    TypeError for anything else float() would take (a bool, a string), for the caller to word."""
    if isinstance(value, (bool, np.bool_, str, bytes, bytearray)):
        raise TypeError("not a number")
    if isinstance(value, torch.Tensor) and (
        value.dim() != 0 or value.dtype == torch.bool or value.is_complex() or value.is_meta
    ):
        raise TypeError("not a 0-d real tensor with a value")
    try:
        return float(value)
    except OverflowError:  # an int (or a Fraction) beyond float64's range: infinite as a float
        return math.inf if value > 0 else -math.inf
    except (TypeError, ValueError):
        raise TypeError("not a number") from None


def check_variant(variant, owner: str = "fastap") -> str:
    if not isinstance(variant, str):
        raise TypeError(
            f"{owner}: variant must be a str, one of {VARIANTS}, got {type_name(variant)}"
        )
    if variant not in VARIANTS:
        raise ValueError(f"{owner}: variant must be one of {VARIANTS}, got {variant!r}")
    return variant


class _ValueChecks(threading.local):
    """The mode of set_value_checks, per thread like torch's grad mode."""

    enabled = True


_value_checks = _ValueChecks()


def checking_values() -> bool:
    """Whether data-dependent checks run: in eager mode unless set_value_checks(False) turned them
    off in this thread; never while torch.compile traces."""
    return not torch.compiler.is_compiling() and _value_checks.enabled


def checks_values_of(t: torch.Tensor) -> bool:
    """Whether the data-dependent checks read the values of `t`: as checking_values(), and only
    where it has values one by one (a tensor on the meta device has none, and torch.func.vmap
    cannot read a batched tensor's back: their checks are skipped, as under torch.compile)."""
    return checking_values() and t.device.type != "meta" and not batched_by_vmap(t)


def without_transform_wrappers(t: torch.Tensor) -> torch.Tensor | None:
    """`t` without the wrappers of the torch.func transforms (grad, vjp, ...): its values, which
    may outlive the transform; None where vmap batched it (a batch of values, which cannot be
    read back one by one)."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            return None
        t = functorch.get_unwrapped(t)
    return t


def batched_by_vmap(t: torch.Tensor) -> bool:
    """Whether `t` is (or wraps, under other torch.func transforms) a tensor batched by
    torch.func.vmap, whose values cannot be read back one by one."""
    return without_transform_wrappers(t) is None


def values_of_one_batch(tensors: dict, owner: str, refusal: str) -> list[torch.Tensor]:
    """The tensors' values without the torch.func transforms' wrappers, for what takes one batch
    (a memory, the collectives); a ValueError naming the first that vmap batched, saying why it
    is refused (`refusal`)."""
    values = []
    for name, t in tensors.items():
        value = without_transform_wrappers(t)
        if value is None:
            raise ValueError(f"{owner}: {name} batched by torch.func.vmap {refusal}")
        values.append(value)
    return values


class set_value_checks:
    """Turns fastap's checks of input values on or off in this thread: ``set_value_checks(False)``
    on its own sets the mode, ``with set_value_checks(False): ...`` sets it for the block and
    restores the previous mode after, and ``@set_value_checks(False)`` does so for every call of
    the function it decorates (like ``torch.set_grad_enabled``).

    The checks (non-finite scores and embeddings, relevance and ignore entries other than 0/1,
    negative or non-finite query weights, miners' indices out of range, uint64 labels of 2**63 or
    more) read values back to the host: on CUDA
    one synchronisation with the device per call, which stalls an eager training loop's queue of
    launches and cannot happen inside CUDA graph capture. Without them the answers are those under
    torch.compile: a query that holds a non-finite, counted score has AP NaN (so the loss is NaN),
    nonzero relevance is a positive, nonzero ignore ignores, query weights are used as given, and
    uint64 labels of 2**63 or more wrap onto negative int64 labels. Shapes, dtypes and devices are
    always checked (that costs nothing). The exact metrics of fastap.metrics, which rank the
    values and hand back Python floats or value tensors, check their scores, embeddings and masks
    in either mode.
    """

    def __init__(self, mode: bool) -> None:
        if not isinstance(mode, bool):
            raise TypeError(f"fastap: set_value_checks(mode): mode must be a bool, got {mode!r}")
        self.mode = mode
        self.previous = _value_checks.enabled
        _value_checks.enabled = mode

    def __enter__(self) -> set_value_checks:
        return self

    def __exit__(self, *exc_info) -> None:
        _value_checks.enabled = self.previous

    def __call__(self, function):
        """As a decorator: the mode is set on each call of `function` only (the mode that
        creating this object set is undone here, at decoration)."""
        _value_checks.enabled = self.previous
        mode = self.mode

        @functools.wraps(function)
        def with_mode(*args, **kwargs):
            with set_value_checks(mode):
                return function(*args, **kwargs)

        return with_mode


@dataclass
class HistogramArgs:
    """The normalised arguments of one soft-histogram call (what the kernels accept)."""

    scores: torch.Tensor  # [N, M] floating
    relevance: torch.Tensor | None  # [N, M] bool or uint8
    labels: torch.Tensor | None  # [N] int64
    ref_labels: torch.Tensor | None  # [M] int64
    ignore: torch.Tensor | None  # [N, M] bool or uint8
    exclude_self: bool
    num_bins: int
    lo: float
    hi: float
    self_offset: int = 0  # resolved: with exclude_self, candidate i + self_offset is query i


def dense_tensor(value, name: str, owner: str = "fastap") -> torch.Tensor:
    """A torch.Tensor of the strided (dense) layout, which the ops and metrics read; TypeError
    naming the argument for anything else (a sparse or nested tensor met torch's own errors about
    memory formats)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type_name(value)}")
    if value.layout != torch.strided:
        raise TypeError(
            f"{owner}: {name} must be a dense (strided) tensor, got layout {value.layout} "
            "(.to_dense() makes one)"
        )
    return value


def _check_device(t: torch.Tensor, name: str, scores: torch.Tensor, what: str = "scores") -> None:
    if t.device != scores.device:
        raise ValueError(f"fastap: {name} is on {t.device} but {what} is on {scores.device}")


def _check_mask(value, name: str, scores: torch.Tensor) -> torch.Tensor:
    """An N x M 0/1 matrix (bool, integer or floating) as a bool or uint8 tensor, the two dtypes
    the kernels read (an entry that is not 0 counts as 1 in both)."""
    t = dense_tensor(value, name)
    _check_device(t, name, scores)
    if t.shape != scores.shape:
        raise ValueError(
            f"fastap: {name} must have the shape of scores {list(scores.shape)}, "
            f"got {list(t.shape)}"
        )
    if t.dtype == torch.bool:
        return t
    if t.is_complex():
        raise TypeError(f"fastap: {name} must be bool or hold 0/1 values, got dtype {t.dtype}")
    check = checks_values_of(t) and t.numel() > 0
    message = f"fastap: {name} must hold only 0 and 1 (or be a bool tensor)"
    if t.dtype == torch.uint8:
        # Taken as it is, its values checked by one reduction: no N x M temporary, no copy.
        if check and int(t.amax()) > 1:
            raise ValueError(message)
        return t
    nonzero = t != 0
    if check:  # entries that are neither 0 nor 1 (NaN included), with one N x M temporary
        stray = t != 1
        stray &= nonzero
        if bool(stray.any()):
            raise ValueError(message)
    return nonzero


def is_integer_tensor(t: torch.Tensor) -> bool:
    """An integer dtype: not floating, complex or bool."""
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def check_rows(value, name: str, owner: str = "fastap") -> torch.Tensor:
    """A 2-D tensor of rows (rows x dim) of a floating dtype the kernels take (float32, float64,
    float16, bfloat16)."""
    dense_tensor(value, name, owner)
    if value.dim() != 2:
        raise ValueError(f"{owner}: {name} must be 2-D (rows x dim), got {list(value.shape)}")
    if value.dtype not in SCORE_DTYPES:
        raise TypeError(
            f"{owner}: {name} must be floating point (float32, float64, float16 or bfloat16), "
            f"got {value.dtype}"
        )
    return value


def check_embedding_matrix(value, name: str, owner: str = "fastap") -> torch.Tensor:
    """check_rows, and at least one column: embeddings."""
    check_rows(value, name, owner)
    if value.shape[1] == 0:
        raise ValueError(f"{owner}: {name} must have at least one column, got {list(value.shape)}")
    return value


def check_finite_rows(
    value: torch.Tensor, name: str, owner: str = "fastap", always: bool = False
) -> None:
    """With value checks on (or `always`: fastap.metrics, which check in either mode), a
    ValueError naming the first row of the embeddings `value` that holds a NaN or an infinity
    (its scores would be NaN, and so the loss)."""
    if not (always or checks_values_of(value)) or value.numel() == 0:
        return
    bad_rows = ~torch.isfinite(value).all(dim=1)
    if bool(bad_rows.any()):
        row = int(bad_rows.nonzero()[0, 0])
        raise ValueError(
            f"{owner}: {name} contain NaN or infinity (first in row {row}); fix them upstream"
        )


# (torch.uint64 exists from torch 2.3 on.)
UINT64 = getattr(torch, "uint64", None)

#: uint16, uint32 and uint64 (torch 2.3 on): dtypes that torch holds and converts but, unlike
#: uint8, has few kernels for (no comparisons, min, max or sorts).
WIDE_UNSIGNED = tuple(
    getattr(torch, name) for name in ("uint16", "uint32", "uint64") if hasattr(torch, name)
)


def check_labels(
    value,
    name: str,
    length: int,
    per: str,
    like: torch.Tensor,
    like_name: str,
    owner: str = "fastap",
    always: bool = False,
):
    """A 1-D integer (or bool) label tensor with one label per `per` (`length` of them), on the
    device of `like` (called `like_name` in the message); returned as int64, by value: labels of
    any two integer dtypes are equal where their values are. `always`: check the values of uint64
    labels in either value-check mode (fastap.metrics, which check in either mode)."""
    t = dense_tensor(value, name, owner)
    if t.device != like.device:
        raise ValueError(f"{owner}: {name} is on {t.device} but {like_name} is on {like.device}")
    if not (is_integer_tensor(t) or t.dtype == torch.bool):
        hint = f" (labels held as floats: pass {name}.long())" if t.is_floating_point() else ""
        raise TypeError(
            f"{owner}: {name} must be an integer or bool tensor, got dtype {t.dtype}{hint}"
        )
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(
            f"{owner}: {name} must be 1-D with one label per {per} ({length}), "
            f"got shape {list(t.shape)}"
        )
    labels = t.to(torch.int64)
    # uint64 values of 2**63 and more have no int64 of the same value: .to wraps them onto the
    # negative labels of signed dtypes (2**64 - 1 onto -1), so they are refused. (A check of the
    # values, for uint64 labels alone: like the other value checks, not under
    # set_value_checks(False) or torch.compile, where they wrap; `always` keeps it for the
    # metrics, which check in either mode.)
    checked = always or checks_values_of(t)
    if t.dtype == UINT64 and checked and bool((labels < 0).any()):
        raise ValueError(
            f"{owner}: {name} holds uint64 values of 2**63 or more, which int64 labels cannot "
            f"hold; where every label tensor is uint64, pass {name}.view(torch.int64)"
        )
    return labels


FLOAT32_MAX = torch.finfo(torch.float32).max


def in_common_dtype(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two embedding sets of float dtypes, both in the wider one (as their product needs)."""
    if a.dtype == b.dtype:
        return a, b
    common = torch.promote_types(a.dtype, b.dtype)
    return a.to(common), b.to(common)


#: The most bins the kernels take (csrc/histogram_inputs.cpp checks the same bound).
MAX_NUM_BINS = 2**20


def _finite(x: float) -> bool:
    # Comparisons rather than math.isfinite: torch.compile(dynamic=True) may trace a float
    # argument as a symbolic float, which takes comparisons (and guards on them) but not math.
    return abs(x) < math.inf


def check_bins(num_bins, score_range, dtype: torch.dtype | None = None) -> tuple[int, float, float]:
    """(num_bins, lo, hi), checked. With the dtype of the scores (or embeddings), the grid of the
    kernels (csrc/binning.h; csrc/histogram_inputs.cpp checks the same): float64 scores are
    binned in float64, where hi - lo and (num_bins - 1) / (hi - lo) must be finite; all others in
    float32, where lo, hi, hi - lo and (num_bins - 1) / (hi - lo) must be finite and lo and hi
    must stay apart."""
    num_bins = check_int(num_bins, "num_bins", 2)
    if num_bins > MAX_NUM_BINS:
        raise ValueError(f"fastap: num_bins must be at most 2^20 = {MAX_NUM_BINS}, got {num_bins}")
    if isinstance(score_range, (str, bytes, Mapping, AbstractSet)):  # not an ordered pair
        raise TypeError(
            f"fastap: score_range must be a pair of numbers (lo, hi), got {score_range!r}"
        )
    try:
        lo, hi = (real_value(v) for v in score_range)
    except (TypeError, ValueError):
        raise TypeError(
            f"fastap: score_range must be a pair of numbers (lo, hi), got {score_range!r}"
        ) from None
    if not (_finite(lo) and _finite(hi) and lo < hi):
        raise ValueError(f"fastap: score_range must be finite with lo < hi, got ({lo}, {hi})")
    if dtype is None:
        return num_bins, lo, hi
    if dtype == torch.float64:
        if not (_finite(hi - lo) and _finite((num_bins - 1) / (hi - lo))):
            raise ValueError(
                f"fastap: score_range ({lo}, {hi}) with {num_bins} bins does not fit float64: "
                "hi - lo and (num_bins - 1) / (hi - lo) must be finite"
            )
        return num_bins, lo, hi
    extremes = (abs(lo), abs(hi), hi - lo, (num_bins - 1) / (hi - lo))
    if max(extremes) > FLOAT32_MAX:
        raise ValueError(
            f"fastap: score_range ({lo}, {hi}) with {num_bins} bins does not fit float32, in "
            f"which {dtype} scores are binned: |lo|, |hi|, hi - lo and (num_bins - 1) / "
            "(hi - lo) must be at most 3.4e38 (float64 scores are binned in float64)"
        )
    # (Not while torch.compile traces, which in torch 2.5 cannot trace numpy's rounding: the
    # kernels' own check of the same refuses such a range when the compiled graph runs.)
    if not torch.compiler.is_compiling() and float(np.float32(lo)) >= float(np.float32(hi)):
        raise ValueError(
            f"fastap: score_range ({lo!r}, {hi!r}) has ends that round to the same float32, in "
            f"which {dtype} scores are binned"
        )
    return num_bins, lo, hi


def check_histogram_args(
    scores,
    relevance,
    labels,
    ref_labels,
    ignore,
    exclude_self,
    num_bins,
    score_range,
    self_offset=None,
) -> HistogramArgs:
    scores = dense_tensor(scores, "scores")
    if scores.dim() != 2:
        raise ValueError(
            f"fastap: scores must be 2-D (queries x candidates), got shape {list(scores.shape)}"
        )
    if scores.dtype not in SCORE_DTYPES:
        raise TypeError(
            f"fastap: scores must be float32, float64, float16 or bfloat16, got {scores.dtype}"
        )
    num_queries, num_candidates = scores.shape
    num_bins, lo, hi = check_bins(num_bins, score_range, scores.dtype)
    check_bool(exclude_self, "exclude_self")
    if self_offset is None:
        if exclude_self and num_queries != num_candidates:
            raise ValueError(
                "fastap: exclude_self needs a square scores matrix (the candidates are the "
                f"queries), got shape {list(scores.shape)}; give self_offset when the queries "
                "are a slice of the candidates"
            )
        self_offset = 0
    else:
        self_offset = check_int(self_offset, "self_offset", 0)
        if not exclude_self:
            raise ValueError("fastap: self_offset only applies with exclude_self=True")
        if num_queries + self_offset > num_candidates:
            raise ValueError(
                "fastap: exclude_self with self_offset needs candidate i + self_offset for every "
                f"query i, got scores of shape {list(scores.shape)} and self_offset {self_offset}"
            )

    if (relevance is None) == (labels is None):
        raise ValueError(
            "fastap: give exactly one of relevance (N x M) and labels (N), got "
            + ("both" if relevance is not None else "neither")
        )
    if relevance is not None:
        if ref_labels is not None:
            raise ValueError("fastap: ref_labels goes with labels, not with relevance")
        relevance = _check_mask(relevance, "relevance", scores)
    else:
        labels = check_labels(
            labels, "labels", num_queries, "query (row of scores)", scores, "scores"
        )
        if ref_labels is None:
            if num_queries != num_candidates:
                raise ValueError(
                    "fastap: labels without ref_labels means the candidates are the queries, "
                    f"which needs a square scores matrix, got shape {list(scores.shape)}; "
                    "pass ref_labels (one label per column of scores)"
                )
        else:
            ref_labels = check_labels(
                ref_labels,
                "ref_labels",
                num_candidates,
                "candidate (column of scores)",
                scores,
                "scores",
            )
    if ignore is not None:
        ignore = _check_mask(ignore, "ignore", scores)
    return HistogramArgs(
        scores, relevance, labels, ref_labels, ignore, exclude_self, num_bins, lo, hi, self_offset
    )


def check_query_weights(query_weights, scores: torch.Tensor, what: str = "scores") -> torch.Tensor:
    """[N] weights beside `scores` [N, ...] (`what`: the caller's name for that tensor)."""
    t = dense_tensor(query_weights, "query_weights")
    _check_device(t, "query_weights", scores, what)
    if not t.is_floating_point():
        raise TypeError(f"fastap: query_weights must be floating point, got dtype {t.dtype}")
    if t.dim() != 1 or t.shape[0] != scores.shape[0]:
        raise ValueError(
            f"fastap: query_weights must be 1-D with one weight per query ({scores.shape[0]}), "
            f"got shape {list(t.shape)}"
        )
    if checks_values_of(t) and t.numel() > 0 and not bool((torch.isfinite(t) & (t >= 0)).all()):
        raise ValueError("fastap: query_weights must be finite and non-negative")
    return t


def raise_if_poisoned(n: torch.Tensor, source: str = "scores") -> None:
    """The kernels make a row's histogram NaN when it holds a non-finite, non-ignored score.
    `source`: what the caller was given, "scores" or "embeddings" (the message names it)."""
    if not checks_values_of(n) or n.numel() == 0:
        return
    bad_rows = torch.isnan(n[:, 0])
    if bool(bad_rows.any()):
        row = int(bad_rows.nonzero()[0, 0])
        if source == "embeddings":
            raise ValueError(
                "fastap: embeddings contain NaN or infinity (first seen in the scores of query "
                f"row {row}: in its embedding or in a database row); fix them upstream"
            )
        raise ValueError(
            f"fastap: scores contain NaN or infinity (first in query row {row}); mask such entries "
            "with `ignore` or fix them upstream"
        )
