"""The fused op's AP_Q values against the pure-PyTorch reference."""

import itertools
import math

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


# Rows longer than a piece (csrc/cpu/soft_histogram.cpp, RowPieces: 65536 candidates, or 64 Q)
# are split into pieces that run in parallel, their sums added in piece order.
PIECE = 65536


@pytest.mark.parametrize("form", ["labels", "dense", "labels+ignore"])
def test_rows_longer_than_a_piece_match_the_reference(device, form):
    """Gradients too; the queries' own candidates (self_offset) straddle a piece boundary, and the
    rows end in a part piece."""
    num_queries, num_candidates, num_bins = 12, 2 * PIECE + 77, 5
    self_offset = PIECE - num_queries // 2
    g = torch.Generator().manual_seed(7)
    scores = 2.4 * torch.rand(num_queries, num_candidates, generator=g, dtype=torch.float64) - 1.2
    kwargs = dict(num_bins=num_bins, exclude_self=True, self_offset=self_offset)
    relevance = None
    if form == "dense":
        relevance = torch.rand(num_queries, num_candidates, generator=g) < 0.3
    else:
        kwargs["labels"] = torch.randint(0, 3, (num_queries,), generator=g)
        kwargs["ref_labels"] = torch.randint(0, 3, (num_candidates,), generator=g)
    if form.endswith("ignore"):
        kwargs["ignore"] = torch.rand(num_queries, num_candidates, generator=g) < 0.2
    kwargs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kwargs.items()}
    relevance = None if relevance is None else relevance.to(device)
    ours_scores = scores.to(device, copy=True).requires_grad_()
    ours = fastap.ap_loss(ours_scores, relevance, **kwargs)
    ours.backward()
    ref_scores = scores.detach().clone().requires_grad_()
    cpu = {k: v.cpu() if torch.is_tensor(v) else v for k, v in kwargs.items()}
    ref = reference.ap_loss(ref_scores, None if relevance is None else relevance.cpu(), **cpu)
    ref.backward()
    torch.testing.assert_close(ours.cpu(), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours_scores.grad.cpu(), ref_scores.grad, rtol=0, atol=1e-12)
    own = ours_scores.grad[torch.arange(num_queries), self_offset + torch.arange(num_queries)]
    assert bool((own == 0).all())


def test_many_bins_rows_are_the_sums_of_their_parts(device):
    """With many bins a CPU piece is 64 Q candidates (Q = 1500: 96000): histograms add over
    candidates, so a row's are those of its parts, each binned on its own in one piece. On CUDA,
    whose shared memory holds a few hundred float64 bins (Q = 1500 is refused there:
    test_cuda.py's large-bins test), Q = 100: a row of 49 chunks of 4096 candidates, summed from
    their partial histograms, against parts that end inside chunks."""
    num_queries, num_candidates = 3, 200_001
    num_bins = 1500 if device == "cpu" else 100
    g = torch.Generator().manual_seed(8)
    scores = 2.2 * torch.rand(num_queries, num_candidates, generator=g, dtype=torch.float64) - 1.1
    labels = torch.randint(0, 2, (num_queries,), generator=g)
    ref_labels = torch.randint(0, 2, (num_candidates,), generator=g)
    scores, labels, ref_labels = scores.to(device), labels.to(device), ref_labels.to(device)
    args = (None, False, num_bins, -1.0, 1.0, 0)
    n, p, positives = torch.ops.fastap.soft_histogram(scores, None, labels, ref_labels, *args)
    bounds = [0, 60_000, 130_000, num_candidates]
    parts = [
        torch.ops.fastap.soft_histogram(
            scores[:, a:b].contiguous(), None, labels, ref_labels[a:b], *args
        )
        for a, b in zip(bounds, bounds[1:])
    ]
    torch.testing.assert_close(n, sum(part[0] for part in parts), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(p, sum(part[1] for part in parts), rtol=1e-12, atol=1e-9)
    assert torch.equal(positives, sum(part[2] for part in parts))


@pytest.mark.parametrize("num_candidates", [1, 7, 39, 40, 41, 200])
@pytest.mark.parametrize("crowded", [False, True])
def test_rows_short_for_their_bins_match_the_reference(device, num_candidates, crowded):
    """Rows of fewer candidates than bins, or a few times as many (Q = 20), with the scores
    spread or crowded into three bins (consecutive candidates adding to the same sums, in the
    CPU op's sub-histograms too), an ignore mask and the queries' own candidates left out."""
    num_queries, num_bins = 45, 20
    g = torch.Generator().manual_seed(num_candidates)
    scores = 2.4 * torch.rand(num_queries, num_candidates, generator=g, dtype=torch.float64) - 1.2
    if crowded:
        scores = 0.3 + 0.1 * scores / 1.2  # within (0.2, 0.4): bins 6 to 8 of 20 over (-1, 1)
    labels = torch.randint(0, 3, (num_queries,), generator=g)
    ref_labels = torch.randint(0, 3, (num_candidates,), generator=g)
    ignore = torch.rand(num_queries, num_candidates, generator=g) < 0.2
    exclude_self = num_candidates >= num_queries
    args = (labels, ref_labels, ignore, exclude_self, num_bins, -1.0, 1.0, 0)
    expected = reference.soft_histogram(scores, None, *args)
    on_device = [t.to(device) if torch.is_tensor(t) else t for t in args]
    got = torch.ops.fastap.soft_histogram(scores.to(device), None, *on_device)
    torch.testing.assert_close(got[0].cpu(), expected[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(got[1].cpu(), expected[1], rtol=0, atol=1e-12)
    assert torch.equal(got[2].cpu(), expected[2])


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
    ref_rounded = ref_rounded.cpu()
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
    # (Sliced on the device: .to() of a strided tensor with gaps makes it contiguous.)
    strided = torch.randn(40, 80, dtype=torch.float64).to(device)[:, ::2]
    assert not strided.is_contiguous()
    labels = torch.arange(40) % 3
    a = fastap.average_precision(strided, labels=labels.to(device))
    b = fastap.average_precision(strided.contiguous(), labels=labels.to(device))
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


def test_labels_of_any_integer_dtype_compare_by_value(device):
    # Labels are compared by value across dtypes: int8 -56 is not uint8 200, uint64 5 is int64 5,
    # and bool labels are the classes 0 and 1.
    scores = torch.rand(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    scores = scores.to(device)
    labels = torch.tensor([5, -56, 0, 1], device=device)
    ref_labels = torch.tensor([200, -56, 5, 0, 1, 1], device=device)
    expected = fastap.average_precision(scores, labels[:, None] == ref_labels[None, :])
    assert (expected > 0).all()  # (every query has a positive)
    for ref_dtype in (torch.int16, torch.int64):
        got = fastap.average_precision(
            scores, labels=labels.to(torch.int8), ref_labels=ref_labels.to(ref_dtype)
        )
        assert torch.equal(got, expected)
    # uint8 200 is not int8 -56 (the same bits).
    as_uint8 = fastap.average_precision(
        scores, labels=labels.to(torch.int8), ref_labels=ref_labels.to(torch.uint8)
    )
    assert as_uint8[1] == 0 and torch.equal(as_uint8[[0, 2, 3]], expected[[0, 2, 3]])
    unsigned = torch.tensor([5, 7, 0, 1], device=device)
    got = fastap.average_precision(
        scores, labels=unsigned.to(torch.uint64), ref_labels=ref_labels.to(torch.int32)
    )
    want = fastap.average_precision(scores, unsigned[:, None] == ref_labels[None, :])
    assert torch.equal(got, want)
    binary = torch.tensor([True, False, True, True], device=device)
    binary_ref = torch.tensor([False, True, True, False, True, False], device=device)
    got = fastap.average_precision(scores, labels=binary, ref_labels=binary_ref)
    want = fastap.average_precision(scores, labels=binary.long(), ref_labels=binary_ref.long())
    assert torch.equal(got, want)


def test_labels_equal_dense_relevance(device):
    # Bitwise, because both forms take the same kernel here: on CUDA, label rows of whole pairs
    # of candidates (M even) would take the fast kernels, which add in another lane order.
    problem = random_problem(23, 31, relevance_form="ref_labels", seed=8).to(device)
    dense = problem.labels[:, None] == problem.ref_labels[None, :]
    a = fastap.average_precision(
        problem.scores, labels=problem.labels, ref_labels=problem.ref_labels
    )
    b = fastap.average_precision(problem.scores, dense)
    assert torch.equal(a, b)


def _op_level_cases(n, m, dtype, seed):
    """Scores in [-1.2, 1.2] (some beyond the bin range), labels of 3 classes, an ignore mask,
    histogram gradients; and every relevance form of the op for them: (dense, with_ignore,
    self_offset), with self_offset None for no exclude_self."""
    g = torch.Generator().manual_seed(seed)
    scores = (torch.rand(n, m, generator=g, dtype=torch.float64) * 2.4 - 1.2).to(dtype)
    labels = torch.randint(0, 3, (n,), generator=g)
    ref_labels = torch.randint(0, 3, (m,), generator=g)
    ignore = torch.rand(n, m, generator=g) < 0.2
    grads = [torch.randn(n, 20, generator=g, dtype=torch.float64).to(dtype) for _ in range(2)]
    offsets = [None] + ([m - n] if m >= n else [])
    forms = list(itertools.product((False, True), (False, True), offsets))
    return scores, labels, ref_labels, ignore, grads, forms


def _op_args(labels, ref_labels, ignore, form, device):
    dense, with_ignore, offset = form
    relevance = (labels[:, None] == ref_labels[None, :], None, None) if dense else (
        None, labels, ref_labels)  # fmt: skip
    args = (*relevance, ignore if with_ignore else None)
    options = (offset is not None, 20, -1.0, 1.0, offset or 0)
    return tuple(None if t is None else t.to(device) for t in args), options


# (70, 70): the self column at 0 (first row), 63 and 64 (a block edge); (9, 130) and (4, 257):
# several blocks and a partial one, the self column near the end; (3, 1): one candidate.
# (70, 70), (9, 130) and (8, 136): rows of whole pairs, which on CUDA take the fast label kernels.
OP_SHAPES = [(3, 1), (5, 7), (70, 70), (9, 130), (4, 257), (8, 136)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", OP_SHAPES)
def test_every_relevance_form_at_op_level_matches_reference(device, shape, dtype):
    # The kernels are compiled once per relevance form (labels or dense; ignore mask or not) and
    # take a row in blocks of candidates, split at the query's own column: each form, with and
    # without exclude_self, against the pure-PyTorch reference, forward and backward.
    n, m = shape
    scores, labels, ref_labels, ignore, (grad_n, grad_p), forms = _op_level_cases(
        n, m, dtype, seed=n * 1000 + m
    )
    tolerance = 1e-12 if dtype == torch.float64 else 2e-5
    for form in forms:
        args, options = _op_args(labels, ref_labels, ignore, form, device)
        ours = torch.ops.fastap.soft_histogram(scores.to(device), *args, *options)
        ref_scores = scores.double().requires_grad_()
        ref_args = tuple(None if t is None else t.cpu() for t in args)
        exclude_self, num_bins, lo, hi, offset = options
        ref = reference.soft_histogram(
            ref_scores, *ref_args, exclude_self, num_bins, lo, hi, offset if exclude_self else None
        )
        for a, b in zip(ours[:2], ref[:2]):
            torch.testing.assert_close(a.cpu().double(), b.detach(), rtol=0, atol=tolerance)
        assert torch.equal(ours[2].cpu(), ref[2].long()), form
        grad = torch.ops.fastap.soft_histogram_backward(
            grad_n.to(device), grad_p.to(device), scores.to(device), *args, *options
        )
        (ref_grad,) = torch.autograd.grad(
            (ref[0] * grad_n.double()).sum() + (ref[1] * grad_p.double()).sum(), ref_scores
        )
        torch.testing.assert_close(grad.cpu().double(), ref_grad, rtol=0, atol=tolerance * 10)


@pytest.mark.parametrize("shape", OP_SHAPES)
def test_every_relevance_form_at_op_level_with_non_finite_scores(device, shape):
    # A non-finite score that counts poisons its row's histograms (NaN) and gets a NaN gradient;
    # one that is ignored or sits at the excluded self column counts nowhere and gets 0; the
    # other rows are untouched.
    n, m = shape
    scores, labels, ref_labels, ignore, (grad_n, grad_p), forms = _op_level_cases(
        n, m, torch.float32, seed=n * 1000 + m
    )
    clean = scores.clone()
    for i, bad in zip(range(n), [float("nan"), float("inf"), float("-inf")] * n):
        scores[i, (7 * i + 3) % m] = bad  # counted unless ignored (or self)
        if i % 3 == 2:
            ignore[i, (7 * i + 3) % m] = True  # ignored where there is a mask
    if m >= n:
        scores[0, m - n] = float("nan")  # row 0's own column when excluded
    for form in forms:
        args, options = _op_args(labels, ref_labels, ignore, form, device)
        excluded = torch.zeros(n, m, dtype=torch.bool)
        if form[1]:
            excluded |= ignore
        if form[2] is not None:
            excluded[torch.arange(n), torch.arange(n) + form[2]] = True
        counted_non_finite = ~torch.isfinite(scores) & ~excluded
        poisoned = counted_non_finite.any(dim=1)
        n_hist, p_hist, positives = (
            t.cpu() for t in torch.ops.fastap.soft_histogram(scores.to(device), *args, *options)
        )
        clean_hist = torch.ops.fastap.soft_histogram(clean.to(device), *args, *options)
        assert torch.equal(torch.isnan(n_hist).any(dim=1), poisoned), form
        assert torch.isnan(n_hist[poisoned]).all() and torch.isnan(p_hist[poisoned]).all()
        torch.testing.assert_close(n_hist[~poisoned], clean_hist[0].cpu()[~poisoned])
        torch.testing.assert_close(p_hist[~poisoned], clean_hist[1].cpu()[~poisoned])
        assert torch.equal(positives, clean_hist[2].cpu())
        grad = torch.ops.fastap.soft_histogram_backward(
            grad_n.to(device), grad_p.to(device), scores.to(device), *args, *options
        ).cpu()
        clean_grad = torch.ops.fastap.soft_histogram_backward(
            grad_n.to(device), grad_p.to(device), clean.to(device), *args, *options
        ).cpu()
        assert torch.equal(torch.isnan(grad), counted_non_finite), form
        assert grad[excluded].eq(0).all()
        finite = torch.isfinite(scores)
        assert torch.equal(grad[finite], clean_grad[finite])


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


def test_non_contiguous_label_vectors(device):
    # histogram_inputs.cpp: labels / ref_labels of any strides are made contiguous before the
    # kernels read them as plain arrays.
    g = torch.Generator().manual_seed(0)
    scores = (torch.rand(7, 20, generator=g, dtype=torch.float64) * 2 - 1).to(device)
    # (Sliced on the device: .to() of a strided tensor with gaps makes it contiguous.)
    labels = torch.randint(0, 3, (14,), generator=g).to(device)[::2]
    ref_labels = torch.randint(0, 3, (40,), generator=g).to(device)[::2]
    assert not labels.is_contiguous() and not ref_labels.is_contiguous()
    results = []
    for lab, ref in ((labels, ref_labels), (labels.contiguous(), ref_labels.contiguous())):
        s = scores.detach().clone().requires_grad_()
        ap = fastap.average_precision(s, labels=lab, ref_labels=ref)
        (grad,) = torch.autograd.grad(ap.sum(), s)
        results.append((ap, grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    expected = reference.average_precision(
        scores.cpu(), labels=labels.cpu().contiguous(), ref_labels=ref_labels.cpu().contiguous()
    )
    torch.testing.assert_close(results[0][0].cpu(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_scores_with_a_range_they_cannot_represent(device, dtype):
    # The bin grid of fp16/bf16 scores is built in float32 from the float64 range: -0.3 and 1.7
    # are not fp16/bf16 numbers, and a grid built from the rounded ends is off.
    problem = random_problem(50, 300, score_range=(-0.3, 1.7), dtype=torch.float64, seed=11)
    rounded = problem.with_scores(problem.scores.to(dtype))
    p = rounded.to(device)
    ours = fastap.average_precision(*p.args(), **p.kwargs())
    ref = reference.average_precision(
        rounded.scores.double(), rounded.relevance, **rounded.kwargs()
    )
    torch.testing.assert_close(ours.cpu().double(), ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("num_bins", [20, 2**16, 2**20])
def test_ap_q_of_a_split_positive_hand_computed(num_bins):
    # A negative at 0.9 above a positive at 0.3, alone in their bins: the positive's weight w in
    # its upper bin counts at precision w / (1 + w) there, the rest at 1/2 (docs/training.md):
    # AP_Q stays below AP = 1/2 however many bins.
    scores = torch.tensor([[0.9, 0.3]], dtype=torch.float64)
    relevance = torch.tensor([[False, True]])
    position = (0.3 + 1) * (num_bins - 1) / 2  # in bin spacings above -1
    w = position - math.floor(position)
    expected = w * w / (1 + w) + (1 - w) / 2
    got = fastap.average_precision(scores, relevance, num_bins=num_bins)
    assert got.item() == pytest.approx(expected, rel=1e-9)
    assert got.item() < 0.5 - 0.05
