"""Property-based tests (hypothesis): the fused op equals the reference on random problems, and
AP_Q keeps the invariants of AP."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import fastap
from fastap import reference
from fastap.testing import RELEVANCE_FORMS, random_problem

from problem_strategies import (
    assert_gradients_close,
    check_against_reference,
    conditioning,
    reference_tolerance,
)

problems = st.builds(
    random_problem,
    st.integers(1, 120),
    st.integers(1, 300),
    num_bins=st.integers(2, 100),
    score_range=st.tuples(st.floats(-3, 1), st.floats(0.01, 4)).map(lambda r: (r[0], r[0] + r[1])),
    relevance_form=st.sampled_from(RELEVANCE_FORMS),
    num_classes=st.integers(1, 6),
    with_ignore=st.booleans(),
    exclude_self=st.booleans(),
    ties=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)


@given(problems)
def test_values_and_gradients_match_reference(problem):
    check_against_reference(problem)


@given(problems, st.integers(0, 2**31 - 1))
def test_invariants(problem, seed):
    ap = fastap.average_precision(problem.scores, problem.relevance, **problem.kwargs())
    assert ((ap >= -1e-12) & (ap <= 1 + 1e-12)).all()
    # Permuting the candidates (columns, with everything attached to them) changes nothing.
    if problem.exclude_self:
        return
    perm = torch.randperm(problem.scores.shape[1], generator=torch.Generator().manual_seed(seed))
    permuted = problem.with_scores(problem.scores[:, perm])
    if problem.relevance is not None:
        permuted.relevance = problem.relevance[:, perm]
    if problem.ref_labels is not None:
        permuted.ref_labels = problem.ref_labels[perm]
    elif problem.labels is not None:
        return  # square labels-only problems tie columns to rows
    if problem.ignore is not None:
        permuted.ignore = problem.ignore[:, perm]
    permuted_ap = fastap.average_precision(permuted.scores, permuted.relevance, **permuted.kwargs())
    torch.testing.assert_close(permuted_ap, ap, rtol=0, atol=1e-12 * conditioning(problem))


@given(problems)
def test_loss_is_one_minus_mean_ap_of_valid_queries(problem):
    ap = fastap.average_precision(problem.scores, problem.relevance, **problem.kwargs())
    loss = fastap.ap_loss(problem.scores, problem.relevance, **problem.kwargs())
    ref = reference.ap_loss(problem.scores, problem.relevance, **problem.kwargs())
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-12 * conditioning(problem))
    assert torch.isfinite(loss)
    assert -1e-12 <= loss.item() <= 1 + 1e-12 and ap.min() >= 0


@given(
    problems,
    st.sampled_from(fastap.VARIANTS),
    st.integers(-30, 30),
    st.floats(0, 1),
    st.integers(0, 2**31 - 1),
)
def test_weighted_loss_matches_reference(problem, variant, exponent, zero_share, seed):
    """Query weights of any scale (10^-30 to 10^30), some of them 0, on every variant: the loss
    and its gradient are the reference's (whose weights are divided by the largest that
    counts, as fastap's are)."""
    g = torch.Generator().manual_seed(seed)
    n = problem.scores.shape[0]
    weights = torch.rand(n, generator=g, dtype=torch.float64) * 10.0**exponent
    weights[torch.rand(n, generator=g) < zero_share] = 0
    scores = problem.scores.detach().requires_grad_()
    ref_scores = problem.scores.detach().requires_grad_()
    options = dict(problem.kwargs(), variant=variant, query_weights=weights)
    loss = fastap.ap_loss(scores, problem.relevance, **options)
    ref = reference.ap_loss(ref_scores, problem.relevance, **options)
    tolerance = reference_tolerance(problem, variant).max().item()
    torch.testing.assert_close(loss, ref, rtol=0, atol=tolerance)
    loss.backward()
    ref.backward()
    lo, hi = problem.score_range
    assert_gradients_close(
        scores.grad, ref_scores.grad, tolerance, floor=(problem.num_bins - 1) / (hi - lo)
    )


def layout(t: torch.Tensor | None, kind: str) -> torch.Tensor | None:
    """The values of t in another memory layout: "transposed" (column-major), "strided" (every
    other element of a larger tensor, at an offset) or "contiguous"."""
    if t is None or kind == "contiguous":
        return t
    if kind == "transposed":
        return t.T.contiguous().T if t.dim() == 2 else t
    wide = torch.zeros((*t.shape[:-1], 2 * t.shape[-1] + 1), dtype=t.dtype)
    wide[..., 1::2] = t
    return wide[..., 1::2]


@given(
    problems,
    st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]),
    st.lists(st.sampled_from(["contiguous", "transposed", "strided"]), min_size=4, max_size=4),
)
def test_memory_layouts_change_nothing(problem, dtype, kinds):
    """Non-contiguous scores, relevance, ignore mask and label vectors (column-major, strided, at
    an offset) give the bits of their contiguous copies, forward and backward, in every dtype."""
    problem = problem.with_scores(problem.scores.to(dtype))
    viewed = problem.with_scores(layout(problem.scores, kinds[0]))
    viewed.relevance = layout(problem.relevance, kinds[1])
    viewed.ignore = layout(problem.ignore, kinds[2])
    viewed.labels = layout(problem.labels, kinds[3])
    viewed.ref_labels = layout(problem.ref_labels, kinds[3])
    results = []
    for p in (problem, viewed):
        scores = p.scores.detach().requires_grad_()
        ap = fastap.average_precision(scores, p.relevance, **p.kwargs())
        (grad,) = torch.autograd.grad((ap * torch.arange(1.0, len(ap) + 1)).sum(), scores)
        results.append((ap, grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
