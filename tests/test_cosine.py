"""fastap.cosine.unit_rows: F.normalize where that is exact, and unit rows where F.normalize
over- or underflows; the embedding front ends' losses at the ends of the range."""

from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F

import fastap
from fastap.cosine import UNSCALED_RANGE, cosine_scores, unit_rows
from fastap.metrics import retrieval_metrics


def rows(n, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (13, 129), (0, 5)])
def test_is_f_normalize_bitwise_in_the_unscaled_range(dtype, shape):
    x = rows(*shape, dtype=dtype) * 3.7
    assert torch.equal(unit_rows(x), F.normalize(x, dim=1))
    lo, hi = UNSCALED_RANGE
    edges = torch.tensor([[lo, -lo / 2], [hi, hi / 3]], dtype=dtype)  # largest entry at the ends
    assert torch.equal(unit_rows(edges), F.normalize(edges, dim=1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_rows_are_normalised_in_float32(dtype):
    # 1e4 entries: a float16 row's norm passes 65504 (F.normalize then gives zeros); a
    # bfloat16 row's norm is no longer rounded to 8 bits before the division.
    x = (rows(6, 64) * 1e4).to(dtype)
    if dtype == torch.float16:
        assert (F.normalize(x, dim=1) == 0).any(dim=1).all()
    unit = unit_rows(x)
    assert unit.dtype == dtype
    assert torch.equal(unit, F.normalize(x.float(), dim=1).to(dtype))
    norms = unit.double().norm(dim=1)
    assert (norms - 1).abs().max() < 64 * 2 * torch.finfo(dtype).eps  # rounding of each entry


def times_power_of_two(t, k):
    """t * 2^k, in two exact steps (2.0**k alone overflows a Python float beyond 1023)."""
    return t * 2.0 ** (k // 2) * 2.0 ** (k - k // 2)


@pytest.mark.parametrize(
    "dtype, exponent",
    [(torch.float32, 70), (torch.float32, -50), (torch.float32, -120), (torch.float32, -135),
     (torch.float64, 600), (torch.float64, -600), (torch.float64, -1040), (torch.float16, -20),
     (torch.bfloat16, 100), (torch.bfloat16, -133)],
)  # fmt: skip
def test_rows_beyond_the_range_come_out_as_their_direction(dtype, exponent):
    # x * 2^k is exact, and its direction is x's: F.normalize(x * 2^k) overflows (inf norm,
    # zeros) or underflows (eps clamp: a short row, or zeros) for these k.
    x = rows(5, 9, dtype=torch.float64, seed=exponent % 7)
    scaled = times_power_of_two(x, exponent).to(dtype)
    assert torch.isfinite(scaled).all() and (scaled != 0).any(dim=1).all()
    expected = F.normalize(times_power_of_two(scaled.double(), -exponent), dim=1)
    tolerance = {torch.float64: 1e-15, torch.float32: 1e-6}.get(dtype, 1e-2)
    torch.testing.assert_close(unit_rows(scaled).double(), expected, rtol=0, atol=tolerance)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 flush mode")
def test_huge_rows_with_denormals_flushed():
    # 1 / largest would be subnormal for these rows, and flushed to 0 (a zero row)
    x = torch.tensor([[3e38, 1e38, 0.0], [-2e38, 0.0, 2e38]])
    expected = F.normalize(x.double(), dim=1).float()
    torch.set_flush_denormal(True)
    try:
        unit = unit_rows(x)
    finally:
        torch.set_flush_denormal(False)
    torch.testing.assert_close(unit, expected, rtol=0, atol=1e-7)


def test_no_columns():
    assert unit_rows(torch.zeros(3, 0)).shape == (3, 0)


def test_zero_rows_stay_zero_and_non_finite_rows_are_nan():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [float("inf"), 1.0], [float("nan"), 1.0]])
    unit = unit_rows(x)
    assert torch.equal(unit[:2], torch.tensor([[0.0, 0.0], [0.6, 0.8]]))
    assert unit[2:].isnan().all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_zero_rows_get_a_zero_gradient(dtype):
    """A zero row's gradient is 0 (F.normalize's is the gradient / 1e-12: inf in float16); the
    other rows' are F.normalize's, and so are the losses' on a batch that holds a zero row."""
    x = rows(5, 4, dtype=torch.float64, seed=2)
    x[2] = 0
    weights = rows(5, 4, dtype=torch.float64, seed=3)
    ours = x.to(dtype).requires_grad_()
    (grad,) = torch.autograd.grad((unit_rows(ours).double() * weights).sum(), ours)
    plain = x.to(dtype).float().requires_grad_()
    (expected,) = torch.autograd.grad((F.normalize(plain, dim=1).double() * weights).sum(), plain)
    assert torch.equal(grad[2], torch.zeros_like(grad[2]))
    others = [0, 1, 3, 4]
    torch.testing.assert_close(grad[others], expected[others].to(dtype))
    embeddings = x.to(dtype).requires_grad_()
    labels = torch.tensor([0, 0, 1, 1, 0])
    fastap.APLoss()(embeddings, labels).backward()
    assert embeddings.grad.isfinite().all() and not embeddings.grad[2].any()


def test_gradient_is_the_normalisation_s():
    x = rows(6, 5, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(unit_rows, (x,))
    # A row far beyond the range: the scale is a constant to autograd, so the gradient at
    # x * 2^k is 2^-k times the gradient of F.normalize at x.
    weights = rows(6, 5, dtype=torch.float64, seed=1)
    for k in (80, -80):
        big = (x.detach() * 2.0**k).requires_grad_()
        (grad,) = torch.autograd.grad((unit_rows(big) * weights).sum(), big)
        plain = x.detach().clone().requires_grad_()
        (expected,) = torch.autograd.grad((F.normalize(plain, dim=1) * weights).sum(), plain)
        torch.testing.assert_close(grad, expected * 2.0**-k, rtol=1e-13, atol=0)


def test_cosine_scores():
    q, db = rows(4, 6, seed=2), rows(9, 6, seed=3)
    assert torch.equal(cosine_scores(q, db), F.normalize(q, dim=1) @ F.normalize(db, dim=1).T)
    # Two dtypes: in the wider one, as every other entry point on embeddings takes them.
    for narrow in (torch.float16, torch.bfloat16):
        assert torch.equal(cosine_scores(q.to(narrow), db), cosine_scores(q.to(narrow).float(), db))
    assert torch.equal(cosine_scores(q, db.double()), cosine_scores(q.double(), db.double()))


def test_bad_input_is_named():
    x = rows(4, 6)
    for bad, error, match in [
        (None, TypeError, "unit_rows: x must be a torch.Tensor, got None"),
        (x[0], ValueError, r"unit_rows: x must be 2-D \(rows x dim\), got \[6\]"),
        (x.long(), TypeError, "unit_rows: x must be floating point .* got torch.int64"),
        (x.to_sparse(), TypeError, "unit_rows: x must be a dense"),
    ]:
        with pytest.raises(error, match=match):
            unit_rows(bad)
    for queries, database, error, match in [
        (x, None, TypeError, "cosine_scores: database must be a torch.Tensor, got None"),
        (x.int(), x, TypeError, "cosine_scores: queries must be floating point .* got torch.int32"),
        (x, x[:, :5], ValueError, r"same dimension and device, got \[4, 6\] on cpu and \[4, 5\]"),
        (x, x[None], ValueError, r"cosine_scores: database must be 2-D .* got \[1, 4, 6\]"),
    ]:
        with pytest.raises(error, match=match):
            cosine_scores(queries, database)


LABELS = torch.tensor([0, 0, 1, 1, 2, 2, 3, 0, 1])


@pytest.mark.parametrize(
    "dtype, scale",
    [(torch.float16, 1e4), (torch.float32, 1e25), (torch.float32, 1e-25), (torch.float64, 1e-200)],
)
def test_embedding_losses_do_not_depend_on_the_scale(dtype, scale):
    e = rows(9, 64, dtype=torch.float64, seed=5)
    scaled = (e * scale).to(dtype)
    assert torch.isfinite(scaled).all()
    tolerance = 2e-3 if dtype == torch.float16 else 1e-5
    for loss_fn in (fastap.APLoss(), fastap.FastAPLoss()):
        torch.testing.assert_close(
            loss_fn(scaled, LABELS).double(), loss_fn(e, LABELS), rtol=0, atol=tolerance
        )
    torch.testing.assert_close(
        fastap.ap_loss_from_embeddings(scaled, labels=LABELS, block_size=4).double(),
        fastap.ap_loss_from_embeddings(e, labels=LABELS),
        rtol=0,
        atol=tolerance,
    )
    # (the metrics rank in float32 at least: the same ranking as the unscaled rows')
    assert retrieval_metrics(scaled, labels=LABELS) == pytest.approx(
        retrieval_metrics(e.to(dtype), labels=LABELS), abs=1e-12
    )
