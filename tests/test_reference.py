"""The pure-PyTorch reference against hand-computed values and invariants of AP_Q."""

import warnings

import pytest
import torch

import fastap
from fastap import reference


def test_bin_weights_hand_computed():
    # Q = 3 over [0, 1]: centres 1, 0.5, 0 (delta 0.5).
    scores = torch.tensor([[0.9, 0.6, 0.1, 1.3, -0.2, 0.5]], dtype=torch.float64)
    w = reference.bin_weights(scores, 3, 0.0, 1.0)[0].T  # M x Q
    expected = torch.tensor(
        [[0.8, 0.2, 0.0], [0.2, 0.8, 0.0], [0.0, 0.2, 0.8], [1, 0, 0], [0, 0, 1], [0, 1, 0]],
        dtype=torch.float64,
    )
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-12)


def test_ap_hand_computed():
    # n = [1.0, 1.2, 0.8], p = [0.8, 0.4, 0.8] (see test_bin_weights_hand_computed), Npos = 2:
    # AP = (0.8/1.0 * 0.8 + 1.2/2.2 * 0.4 + 2.0/3.0 * 0.8) / 2
    scores = torch.tensor([[0.9, 0.6, 0.1]], dtype=torch.float64)
    relevance = torch.tensor([[True, False, True]])
    ap = reference.average_precision(scores, relevance, num_bins=3, score_range=(0.0, 1.0))
    expected = (0.8 / 1.0 * 0.8 + 1.2 / 2.2 * 0.4 + 2.0 / 3.0 * 0.8) / 2
    assert ap.item() == pytest.approx(expected, abs=1e-14)


def test_weights_sum_to_one_and_touch_two_bins():
    scores = torch.linspace(-1.5, 1.5, 301, dtype=torch.float64)[None]
    w = reference.bin_weights(scores, 7, -1.0, 1.0)
    torch.testing.assert_close(w.sum(1), torch.ones_like(scores), rtol=0, atol=1e-12)
    assert int((w > 0).sum(1).max()) <= 2


def test_perfect_and_inverted_rankings():
    # Positives in the top bin, negatives in the bottom bin (Q = 2, scores on the centres): AP = 1.
    scores = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=torch.float64)
    relevance = torch.tensor([[1, 1, 0, 0]])
    assert reference.average_precision(scores, relevance, num_bins=2).item() == 1.0
    # Inverted: n = [2, 2], p = [0, 2], so AP = (2 / 4) * 2 / 2 = 0.5.
    assert reference.average_precision(-scores, relevance, num_bins=2).item() == 0.5


def test_query_without_positives_and_ignore():
    scores = torch.tensor([[0.5, 0.2], [0.5, 0.2]], dtype=torch.float64, requires_grad=True)
    relevance = torch.tensor([[0, 0], [1, 0]])
    ap = reference.average_precision(scores, relevance)
    assert ap[0].item() == 0.0 and ap[1].item() > 0
    loss = reference.ap_loss(scores, relevance)
    assert loss.item() == pytest.approx(1 - ap[1].item())
    # Ignoring the only negative of query 1 leaves a perfect ranking.
    ignore = torch.tensor([[False, False], [False, True]])
    assert reference.average_precision(scores, relevance, ignore=ignore)[1].item() == 1.0


def test_reference_loss_takes_weights_that_require_grad_without_a_warning():
    scores = torch.rand(3, 4, dtype=torch.float64)
    weights = torch.rand(3, dtype=torch.float64, requires_grad=True)
    labels, ref_labels = torch.tensor([0, 1, 0]), torch.tensor([0, 1, 1, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = reference.ap_loss(
            scores, labels=labels, ref_labels=ref_labels, query_weights=weights
        )
    loss.backward()
    assert weights.grad is not None and weights.grad.abs().sum() > 0


def test_reference_loss_takes_weights_at_the_ends_of_their_range():
    """Equal weights give the unweighted loss, at the ends of float64's range too (the sums
    overflowed to inf / inf = NaN at 1e308, or each w_i AP_i underflowed to 0 or to the smallest
    subnormal at 5e-324), as fastap.ap_loss's do; and weights scaled exactly by 2^+-1000 give
    the loss of the unscaled ones."""
    g = torch.Generator().manual_seed(5)
    scores = torch.rand(5, 7, generator=g, dtype=torch.float64)
    labels, ref_labels = torch.randint(0, 2, (5,), generator=g), torch.randint(0, 2, (7,))
    kwargs = {"labels": labels, "ref_labels": ref_labels}
    unweighted = reference.ap_loss(scores, **kwargs)
    for weight in (1e308, 5e-324):
        weights = torch.full((5,), weight, dtype=torch.float64)
        for loss in (reference.ap_loss, fastap.ap_loss):
            got = loss(scores, **kwargs, query_weights=weights)
            torch.testing.assert_close(got, unweighted, rtol=1e-12, atol=0)
    weights = torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    expected = reference.ap_loss(scores, **kwargs, query_weights=weights)
    for scale in (2.0**1000, 2.0**-1000):
        got = reference.ap_loss(scores, **kwargs, query_weights=weights * scale)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_answers_are_the_library_ones_with_value_checks_off(dtype):
    """Awkward scores as fastap.functional answers them with its value checks off: half
    precision binned in float32, NaN in ignored and excluded entries unread, a counted
    non-finite score poisoning its query (AP NaN with a positive, 0 without one)."""
    g = torch.Generator().manual_seed(3)
    scores = (torch.rand(6, 9, generator=g) * 2.4 - 1.2).to(dtype)  # some outside the range
    relevance = torch.rand(6, 9, generator=g) < 0.4
    relevance[:, 0] = True
    relevance[3] = False  # query 3: no positive
    ignore = torch.rand(6, 9, generator=g) < 0.2
    ignore[0, 4], ignore[1, 0] = True, False
    scores[0, 4] = float("nan")  # ignored
    scores[5, 7] = float("nan")  # query 5's own entry (self_offset 2), excluded
    options = dict(num_bins=7, score_range=(-1.0, 1.0), exclude_self=True, self_offset=2)
    for poison in (None, (1, 0), (3, 8)):  # a counted inf in a query with / without a positive
        s = scores.clone()
        if poison is not None:
            s[poison] = float("inf")
        with fastap.set_value_checks(False):
            want = fastap.average_precision(s, relevance, ignore=ignore, **options)
            want_loss = fastap.ap_loss(s, relevance, ignore=ignore, **options)
        got = reference.average_precision(s, relevance, ignore=ignore, **options)
        got_loss = reference.ap_loss(s, relevance, ignore=ignore, **options)
        assert got.dtype == want.dtype == got_loss.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6, equal_nan=True)
        assert got[1].isnan().item() == (poison == (1, 0))
        assert got_loss.isnan().item() == (poison == (1, 0)) and got[3].item() == 0.0


def test_weights_whose_total_is_not_positive_give_the_library_answer_with_value_checks_off():
    """Without value checks, weights are used as given: a total of 0 or below (or NaN) gives a
    loss of 0 in fastap.functional, and the reference answers alike."""
    scores = torch.tensor([[0.9, 0.1, 0.4], [0.2, 0.8, 0.5]], dtype=torch.float64)
    relevance = torch.tensor([[True, False, False], [True, False, True]])
    for weights in ([1.0, -2.0], [-1.0, 0.0], [1.0, -1.0], [float("nan"), 1.0], [0.5, 0.25]):
        w = torch.tensor(weights, dtype=torch.float64)
        with fastap.set_value_checks(False):
            want = fastap.ap_loss(scores, relevance, num_bins=5, query_weights=w)
        got = reference.ap_loss(scores, relevance, num_bins=5, query_weights=w)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, equal_nan=True)
        assert (got.item() == 0.0) == (not w.sum().item() > 0), weights
