"""The fused op's AP_Q values against the pure-PyTorch reference."""

import itertools

import pytest
import torch

import fastap
from fastap import reference
from fastap.testing import RELEVANCE_FORMS, random_problem

SHAPES = [(1, 1), (1, 7), (5, 5), (13, 29), (64, 3), (97, 97), (31, 257)]


def fastap_and_reference(problem, device):
    problem = problem.to(device)
    ours = fastap.average_precision(*problem.args(), **problem.kwargs())
    ref = reference.average_precision(
        problem.scores.double(), problem.relevance, **problem.kwargs()
    )
    return ours, ref


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("form", RELEVANCE_FORMS)
def test_matches_reference_float64(device, shape, form):
    for seed, (with_ignore, exclude_self) in enumerate(itertools.product([False, True], repeat=2)):
        problem = random_problem(
            *shape,
            relevance_form=form,
            with_ignore=with_ignore,
            exclude_self=exclude_self,
            num_bins=2 + 7 * seed,
            seed=seed,
        )
        ours, ref = fastap_and_reference(problem, device)
        assert ours.dtype == torch.float64 and ours.shape == (shape[0],)
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("num_bins", [2, 3, 10, 25, 100])
def test_matches_reference_float32(device, num_bins):
    problem = random_problem(
        77, 191, num_bins=num_bins, score_range=(-0.3, 1.7), dtype=torch.float32, seed=num_bins
    )
    ours, ref = fastap_and_reference(problem, device)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("num_bins", [5, 20])
def test_ties(device, num_bins):
    problem = random_problem(40, 60, num_bins=num_bins, ties=True, with_ignore=True, seed=3)
    ours, ref = fastap_and_reference(problem, device)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


def test_scores_exactly_on_bin_centres_and_range_ends(device):
    # Q = 5 over [-1, 1]: centres 1, 0.5, 0, -0.5, -1 are exact in binary.
    scores = torch.tensor([[1.0, 0.5, 0.0, -0.5, -1.0, 2.0, -3.0, 0.25]], dtype=torch.float64)
    relevance = torch.tensor([[1, 0, 1, 0, 1, 0, 1, 1]], dtype=torch.bool)
    ours = fastap.average_precision(scores.to(device), relevance.to(device), num_bins=5)
    ref = reference.average_precision(scores, relevance, num_bins=5)
    torch.testing.assert_close(ours.cpu(), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["all_positive", "all_negative", "all_ignored"])
def test_degenerate_rows(device, kind):
    problem = random_problem(9, 14, relevance_form="dense", seed=5)
    if kind == "all_positive":
        problem.relevance = torch.ones_like(problem.relevance)
    elif kind == "all_negative":
        problem.relevance[2:5] = False
    else:
        problem.ignore = torch.zeros_like(problem.relevance)
        problem.ignore[3] = True
    ours, ref = fastap_and_reference(problem, device)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    if kind == "all_positive":
        assert torch.allclose(ours, torch.ones_like(ours))
    else:
        assert (ours[2:5] if kind == "all_negative" else ours[3:4]).eq(0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_scores(device, dtype):
    """fp16/bf16 scores accumulate in fp32; the error is that of rounding the scores themselves,
    so compare with the fp64 reference on the same rounded scores, and bound the total error
    by twice the error of the reference run on the low-precision scores."""
    problem = random_problem(50, 300, dtype=torch.float64, seed=11)
    rounded = problem.scores.to(dtype)
    ours, ref_rounded = fastap_and_reference(problem.with_scores(rounded), device)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.cpu().double(), ref_rounded, rtol=0, atol=2e-6)
    exact = reference.average_precision(problem.scores, problem.relevance, **problem.kwargs())
    ref_error = (ref_rounded - exact).abs().max()
    assert (ours.cpu().double() - exact).abs().max() <= 2 * ref_error + 2e-6


def test_non_contiguous_inputs(device):
    problem = random_problem(40, 40, relevance_form="dense", with_ignore=True, seed=2)
    contiguous = fastap.average_precision(*problem.to(device).args(), **problem.to(device).kwargs())
    transposed = problem.with_scores(problem.scores.T.contiguous().T)
    transposed.relevance = problem.relevance.T.contiguous().T
    transposed.ignore = problem.ignore.T.contiguous().T
    assert not transposed.scores.is_contiguous()
    ours = fastap.average_precision(*transposed.to(device).args(), **transposed.to(device).kwargs())
    assert torch.equal(ours, contiguous)
    strided = torch.randn(40, 80, dtype=torch.float64)[:, ::2]
    labels = torch.arange(40) % 3
    a = fastap.average_precision(strided.to(device), labels=labels.to(device))
    b = fastap.average_precision(strided.contiguous().to(device), labels=labels.to(device))
    assert torch.equal(a, b)


def test_relevance_of_other_dtypes(device):
    problem = random_problem(12, 17, relevance_form="dense", seed=4)
    expected = fastap.average_precision(*problem.to(device).args(), **problem.to(device).kwargs())
    for dtype in (torch.uint8, torch.int32, torch.float32):
        as_dtype = problem.to(device)
        as_dtype.relevance = as_dtype.relevance.to(dtype)
        assert torch.equal(
            fastap.average_precision(*as_dtype.args(), **as_dtype.kwargs()), expected
        )


def test_labels_equal_dense_relevance(device):
    problem = random_problem(23, 31, relevance_form="ref_labels", seed=8).to(device)
    dense = problem.labels[:, None] == problem.ref_labels[None, :]
    a = fastap.average_precision(
        problem.scores, labels=problem.labels, ref_labels=problem.ref_labels
    )
    b = fastap.average_precision(problem.scores, dense)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(3, 1), (5, 7), (9, 130), (4, 257)])
def test_label_rows_equal_dense_rows_at_op_level(device, shape, dtype):
    # The kernels are compiled once per relevance form, and take a row in blocks of candidates
    # split at the query's own column. Labels and the dense relevance matrix of the same labels
    # must agree, also with non-finite scores (which poison a row's histograms and get a NaN
    # gradient, unless they sit at the excluded self column) and with the self column first,
    # last, or anywhere in a block.
    n, m = shape
    generator = torch.Generator().manual_seed(n * 1000 + m)
    scores = (torch.rand(n, m, generator=generator, dtype=torch.float64) * 2.4 - 1.2).to(dtype)
    labels = torch.randint(0, 3, (n,), generator=generator)
    ref_labels = torch.randint(0, 3, (m,), generator=generator)
    for i, bad in zip(range(1, n, 2), [float("nan"), float("inf"), float("-inf")]):
        scores[i, (7 * i) % m] = bad
    # Row 0's own column (with self_offset m - n: the last candidate of the last row) holds a NaN.
    self_offset = m - n if m >= n else None
    if self_offset is not None:
        scores[0, self_offset] = float("nan")
    dense = labels[:, None] == ref_labels[None, :]
    grad_n = torch.randn(n, 20, generator=generator, dtype=torch.float64).to(scores.dtype)
    grad_p = torch.randn(n, 20, generator=generator, dtype=torch.float64).to(scores.dtype)
    cases = [(False, 0)] + ([(True, self_offset)] if self_offset is not None else [])
    scores, labels, ref_labels, dense = (t.to(device) for t in (scores, labels, ref_labels, dense))
    grad_n, grad_p = grad_n.to(device), grad_p.to(device)
    for exclude_self, offset in cases:
        options = (exclude_self, 20, -1.0, 1.0, offset)
        by_labels = torch.ops.fastap.soft_histogram(scores, None, labels, ref_labels, None, *options)
        by_dense = torch.ops.fastap.soft_histogram(scores, dense, None, None, None, *options)
        tolerance = 1e-12 if dtype == torch.float64 else 1e-5
        for a, b in zip(by_labels[:2], by_dense[:2]):
            torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance, equal_nan=True)
        assert torch.equal(by_labels[2], by_dense[2])
        excluded = torch.zeros(n, m, dtype=torch.bool, device=device)
        if exclude_self:
            excluded[torch.arange(n), torch.arange(n) + offset] = True
        counted_non_finite = ~torch.isfinite(scores) & ~excluded
        assert torch.equal(torch.isnan(by_labels[0]).any(dim=1), counted_non_finite.any(dim=1))
        assert counted_non_finite[1:6:2].any(dim=1).all()  # the rows given a non-finite score
        grad_labels = torch.ops.fastap.soft_histogram_backward(
            grad_n, grad_p, scores, None, labels, ref_labels, None, *options
        )
        grad_dense = torch.ops.fastap.soft_histogram_backward(
            grad_n, grad_p, scores, dense, None, None, None, *options
        )
        torch.testing.assert_close(grad_labels, grad_dense, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(torch.isnan(grad_labels), counted_non_finite)
        assert grad_labels[excluded].eq(0).all()


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0)])
def test_empty(device, shape):
    scores = torch.empty(shape, dtype=torch.float32, device=device, requires_grad=True)
    relevance = torch.empty(shape, dtype=torch.bool, device=device)
    ap = fastap.average_precision(scores, relevance)
    assert ap.shape == (shape[0],) and ap.eq(0).all()
    loss = fastap.ap_loss(scores, relevance)
    loss.backward()
    assert loss.item() == 0.0 and scores.grad.shape == shape


@pytest.mark.parametrize("form", RELEVANCE_FORMS)
def test_positive_counts_are_exact(device, form):
    problem = random_problem(
        31, 31, relevance_form=form, with_ignore=True, exclude_self=True, seed=6
    ).to(device)
    labels = problem.labels
    ref_labels = problem.ref_labels
    if labels is not None and ref_labels is None:
        ref_labels = labels
    *_, positives = torch.ops.fastap.soft_histogram(
        problem.scores, problem.relevance, labels, ref_labels, problem.ignore, True, 20, -1.0, 1.0
    )
    *_, expected = reference.soft_histogram(
        problem.scores, problem.relevance, problem.labels, problem.ref_labels, problem.ignore, True
    )
    assert positives.dtype == torch.int64
    assert torch.equal(positives.cpu(), expected.cpu().long())


def _subnormals_flushed():
    # The smallest normal double divided by 1024 is a subnormal, or 0 under flush-to-zero.
    return 2.2250738585072014e-308 / 1024 == 0.0


def test_fastap_keeps_subnormal_floats():
    """Loading or running the extension must not change the process's floating-point state (a
    library built with -ffast-math turns on flush-to-zero for everyone when it is loaded)."""
    assert not _subnormals_flushed(), "subnormals were already flushed when this test started"
    problem = random_problem(17, 17, relevance_form="labels", seed=5)
    scores = problem.scores.detach().clone().requires_grad_()
    fastap.ap_loss(scores, labels=problem.labels, num_bins=10).backward()
    fastap.ap_loss_from_embeddings(
        torch.nn.functional.normalize(torch.randn(9, 4), dim=1), labels=torch.arange(9) % 3
    )
    assert not _subnormals_flushed()
