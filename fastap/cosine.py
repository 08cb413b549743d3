"""Cosine similarity of embeddings, as every fastap entry point on embeddings computes it.

``unit_rows`` is ``F.normalize(x, dim=1)`` made safe for any finite input:

- it computes in float32 (float64 for float64 embeddings) and casts the unit rows back, so that
  a float16 row whose norm passes 65504, float16's largest value (entries of 2000 in a row of
  3000, say), is not divided by an infinite norm into zeros, and a bfloat16 row's norm is not
  rounded to 8 bits;
- a row whose largest entry lies outside [2^-30, 2^50] in magnitude is first divided by that
  entry, so that the sum of its squares neither overflows nor underflows (nor falls under
  ``F.normalize``'s eps of 1e-12, below which a row would come out shorter than 1). Every other
  row is scaled by exactly 1: float32 and float64 rows in that range are ``F.normalize``'s,
  bitwise;
- an all-zero row stays zero (its cosine with everything is 0) and gets a zero gradient (its
  direction is undefined; F.normalize would give it the gradient divided by its eps of 1e-12, which
  overflows float16), and a row with a NaN or an infinity comes out NaN, which the losses report
  as an error.

The scale is a constant to autograd (``normalize(c x) = normalize(x)`` for every c > 0), so the
gradient is that of the normalisation itself (but for zero rows, above).

Under ``torch.autocast`` the scores are the product of the unit rows cast to autocast's dtype, as
autocast runs ``unit_queries @ unit_database.T`` (``autocast_product_dtype``); the computations
from embeddings take their inputs in that dtype, so that every path bins the same scores and
differentiates what it binned.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from fastap._validation import check_rows, in_common_dtype

#: The largest entries of the rows that are normalised as they are; others are scaled first.
UNSCALED_RANGE = (2.0**-30, 2.0**50)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """The rows of the 2-D tensor ``x`` scaled to unit L2 norm, in ``x``'s dtype (see the module
    docstring for how it differs from ``F.normalize`` at the ends of the range)."""
    check_rows(x, "x", "fastap.cosine.unit_rows")
    if x.shape[-1] == 0:  # no entries to take the largest of
        return F.normalize(x, dim=1)
    work = x if x.dtype == torch.float64 else x.float()
    largest = work.detach().abs().amax(dim=1, keepdim=True)
    smallest_unscaled, largest_unscaled = UNSCALED_RANGE
    rescale = (largest > 0) & ((largest < smallest_unscaled) | (largest > largest_unscaled))
    # A division, not a multiplication by 1 / largest, which overflows for a subnormal largest
    # entry (and is flushed to 0 for a huge one under torch.set_flush_denormal). Zero rows are
    # divided by 1; an infinite entry gives inf / inf = NaN, as it should.
    work = work / torch.where(rescale, largest, torch.ones_like(largest))
    # A zero row's direction is undefined: it stays zero with a zero gradient (F.normalize's would
    # be the gradient divided by its eps of 1e-12, which overflows float16).
    unit = F.normalize(work, dim=1)
    unit = torch.where(largest == 0, torch.zeros_like(unit), unit)
    return unit.to(x.dtype)


def cosine_scores(queries: torch.Tensor, database: torch.Tensor) -> torch.Tensor:
    """[N, M] cosine similarities of the rows of ``queries`` [N, D] and ``database`` [M, D], in
    the wider of their dtypes."""
    owner = "fastap.cosine.cosine_scores"
    check_rows(queries, "queries", owner)
    check_rows(database, "database", owner)
    if (database.shape[1], database.device) != (queries.shape[1], queries.device):
        raise ValueError(
            f"{owner}: queries and database must have the same dimension and device, got "
            f"{list(queries.shape)} on {queries.device} and {list(database.shape)} on "
            f"{database.device}"
        )
    if database is not queries:
        queries, database = in_common_dtype(queries, database)
    unit_queries = unit_rows(queries)
    unit_database = unit_queries if database is queries else unit_rows(database)
    return unit_queries @ unit_database.T


#: The devices of fastap's kernels, whose autocast state the paths from embeddings read: a fixed
#: list, as torch.compile cannot trace torch.amp.is_autocast_available in torch 2.5 (meta tensors
#: have no autocast; other devices have no fastap kernels).
AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")


def autocast_product_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype that an enabled ``torch.autocast`` on ``x``'s device casts ``x`` to for a matrix
    product, or None (autocast off there, or ``x`` not one it casts: float64 and integer tensors
    stay as they are)."""
    device_type = x.device.type
    if device_type not in AUTOCAST_DEVICE_TYPES or not torch.is_autocast_enabled(device_type):
        return None
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_off(device: torch.device):
    """A context in which ``torch.autocast`` is off on ``device`` (any device with an autocast in
    eager mode, as fastap.metrics may run on one; under torch.compile those of fastap's kernels)."""
    if device.type in AUTOCAST_DEVICE_TYPES or (
        not torch.compiler.is_compiling() and torch.amp.is_autocast_available(device.type)
    ):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()
