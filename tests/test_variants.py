"""The tie-aware variants (AP_T exact and simplified) against the reference and hand values."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastap
from fastap import reference
from fastap.testing import RELEVANCE_FORMS, random_problem

from problem_strategies import check_against_reference

TIE_AWARE = ["tie_aware", "tie_aware_simplified"]


def hand_tie_aware(n, p, num_positives, simplified):
    """AP_T of one query, term by term with Python floats (the formula of the paper/SPEC)."""
    total, cum_n, cum_p = 0.0, 0.0, 0.0
    for n_k, p_k in zip(n, p):
        prev_n, prev_p = cum_n, cum_p
        cum_n, cum_p = cum_n + n_k, cum_p + p_k
        if simplified:
            total += p_k * (prev_p + cum_p + 1) / (prev_n + cum_n + 1)
        else:
            ratio = max(p_k - 1, 0) / (max(n_k - 1, 0) + 1e-8)
            log = math.log((cum_n + 1) / (prev_n + 1))
            total += p_k * (n_k * ratio + (prev_p + 1 - ratio * (prev_n + 1)) * log) / (n_k + 1e-8)
    return total / num_positives


@pytest.mark.parametrize("variant", TIE_AWARE)
def test_hand_computed(device, variant):
    # Q = 3 over [0, 1]; n = [1.0, 1.2, 0.8], p = [0.8, 0.4, 0.8], 2 positives (see
    # test_reference.test_bin_weights_hand_computed). A second query with ties: two positives and
    # one negative all on the top bin centre, one positive on the bottom one.
    scores = torch.tensor([[0.9, 0.6, 0.1, 0.5], [1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    relevance = torch.tensor([[1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    ignore = torch.tensor([[0, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    simplified = variant == "tie_aware_simplified"
    expected = [
        hand_tie_aware([1.0, 1.2, 0.8], [0.8, 0.4, 0.8], 2, simplified),
        hand_tie_aware([3.0, 0.0, 1.0], [2.0, 0.0, 1.0], 3, simplified),
    ]
    if simplified:
        assert expected[0] == pytest.approx((0.8 * 1.8 / 2 + 0.4 * 3.0 / 4.2 + 0.8 * 4.2 / 6.2) / 2)
    ap = fastap.average_precision(
        scores.to(device),
        relevance.to(device),
        num_bins=3,
        score_range=(0.0, 1.0),
        ignore=ignore.to(device),
        variant=variant,
    )
    torch.testing.assert_close(
        ap.cpu(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("variant", TIE_AWARE)
@pytest.mark.parametrize("form", RELEVANCE_FORMS)
@pytest.mark.parametrize("shape", [(1, 5), (17, 17), (40, 123)])
def test_matches_reference(device, variant, form, shape):
    for seed, num_bins in enumerate([2, 9, 25, 100]):
        problem = random_problem(
            *shape,
            num_bins=num_bins,
            relevance_form=form,
            with_ignore=seed % 2 == 0,
            exclude_self=seed >= 2,
            ties=seed == 3,
            seed=seed,
        )
        results = []
        for fn, dev in ((fastap.average_precision, device), (reference.average_precision, "cpu")):
            p = problem.to(dev)
            scores = p.scores.detach().requires_grad_()
            ap = fn(scores, p.relevance, variant=variant, **p.kwargs())
            (grad,) = torch.autograd.grad((ap * torch.arange(len(ap), device=dev)).sum(), scores)
            results.append((ap.detach().cpu(), grad.cpu()))
        torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-12)
        torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=1e-10)


@pytest.mark.parametrize("variant", TIE_AWARE)
def test_float32_matches_reference(device, variant):
    problem = random_problem(70, 301, num_bins=25, score_range=(0.0, 1.0), dtype=torch.float32)
    ours = fastap.average_precision(
        *problem.to(device).args(), variant=variant, **problem.to(device).kwargs()
    )
    ref = reference.average_precision(
        problem.scores.double(), problem.relevance, variant=variant, **problem.kwargs()
    )
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.cpu().double(), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", TIE_AWARE)
def test_gradcheck(device, variant):
    problem = random_problem(
        6, 13, num_bins=5, relevance_form="ref_labels", with_ignore=True, kink_free=True, seed=2
    ).to(device)
    scores = problem.scores.detach().requires_grad_()

    def loss(s):
        return fastap.ap_loss(s, problem.relevance, variant=variant, **problem.kwargs())

    assert torch.autograd.gradcheck(loss, (scores,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("variant", TIE_AWARE)
def test_queries_without_positives_and_loss(device, variant):
    problem = random_problem(12, 30, relevance_form="dense", seed=3)
    problem.relevance[4] = False
    problem = problem.to(device)
    scores = problem.scores.detach().requires_grad_()
    ap = fastap.average_precision(scores, problem.relevance, variant=variant, **problem.kwargs())
    assert ap[4] == 0 and torch.isfinite(ap).all()
    loss = fastap.ap_loss(scores, problem.relevance, variant=variant, **problem.kwargs())
    keep = torch.ones(12, dtype=torch.bool, device=device)
    keep[4] = False
    torch.testing.assert_close(loss, 1 - ap[keep].mean(), rtol=0, atol=1e-12)
    loss.backward()
    assert torch.isfinite(scores.grad).all() and scores.grad[4].eq(0).all()


def test_unknown_variant():
    with pytest.raises(ValueError, match="variant must be one of"):
        fastap.ap_loss(torch.rand(3, 3), labels=torch.arange(3), variant="smooth")


@given(
    st.builds(
        random_problem,
        st.integers(1, 60),
        st.integers(1, 150),
        num_bins=st.integers(2, 60),
        relevance_form=st.sampled_from(RELEVANCE_FORMS),
        with_ignore=st.booleans(),
        exclude_self=st.booleans(),
        ties=st.booleans(),
        seed=st.integers(0, 2**31 - 1),
    ),
    st.sampled_from(TIE_AWARE),
)
def test_property_matches_reference(problem, variant):
    check_against_reference(problem, variant=variant)  # values and gradients
    ours = fastap.average_precision(
        problem.scores, problem.relevance, variant=variant, **problem.kwargs()
    )
    assert (ours >= -1e-12).all()
