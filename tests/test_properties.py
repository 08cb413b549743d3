"""Property-based tests (hypothesis): the fused op equals the reference on random problems, and
AP_Q keeps the invariants of AP."""

import torch
from hypothesis import given
from hypothesis import strategies as st

import fastap
from fastap import reference
from fastap.testing import RELEVANCE_FORMS, random_problem

from problem_strategies import check_against_reference, conditioning

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
