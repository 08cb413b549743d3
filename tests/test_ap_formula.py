"""fastap::ap_from_histograms and its backward (csrc/ap_formula.h: the O(N Q) formula of every
variant in one kernel) against the bin-by-bin formulas of fastap.reference and their autograd
gradients, on random histograms with empty bins, rows without positives and both dtypes."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastap
from fastap import reference
from fastap.ops import ApFromHistograms

VARIANTS = fastap.VARIANTS


def random_histograms(rows, bins, seed, dtype=torch.float64, device="cpu"):
    """Histograms as the binning makes them: each positive spreads mass 1 over the bins, so p sums
    to the exact count of positives (0 to 3, some rows 0); n = p plus the negatives' mass; some
    bins empty, the leading ones included."""
    g = torch.Generator().manual_seed(seed)
    positives = torch.randint(0, 4, (rows,), generator=g)
    empty = torch.rand(rows, bins, generator=g) < 0.3
    empty[:, 0] |= torch.rand(rows, generator=g) < 0.5
    empty[:, -1] = False  # somewhere to put the mass
    shares = torch.rand(rows, bins, generator=g, dtype=torch.float64).masked_fill(empty, 0)
    p = shares / shares.sum(1, keepdim=True) * positives[:, None]
    negatives = torch.rand(rows, bins, generator=g, dtype=torch.float64).masked_fill(empty, 0)
    n = p + 2 * negatives
    return n.to(device, dtype), p.to(device, dtype), positives.to(device)


def reference_with_grads(n, p, positives, variant, grad_ap):
    n = n.detach().clone().requires_grad_()
    p = p.detach().clone().requires_grad_()
    ap, _ = reference.ap_from_histograms(n, p, positives, variant)
    grad_n, grad_p = torch.autograd.grad(ap, (n, p), grad_ap)
    return ap.detach(), grad_n, grad_p


def check_against_reference(n, p, positives, variant, seed=0, tol=1e-10):
    g = torch.Generator().manual_seed(seed)
    grad_ap = torch.randn(n.shape[0], generator=g, dtype=n.dtype).to(n.device)
    ap = torch.ops.fastap.ap_from_histograms(n, p, positives, variant)
    grad_n, grad_p = torch.ops.fastap.ap_from_histograms_backward(grad_ap, n, p, positives, variant)
    expected = reference_with_grads(n, p, positives, variant, grad_ap)
    for got, want in zip((ap, grad_n, grad_p), expected):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rows,bins", [(1, 2), (9, 7), (33, 20), (5, 101)])
def test_equals_reference_and_its_autograd(device, variant, rows, bins):
    check_against_reference(*random_histograms(rows, bins, seed=bins, device=device), variant)


@given(
    rows=st.integers(0, 6),
    bins=st.integers(2, 40),
    seed=st.integers(0, 2**16),
    variant=st.sampled_from(VARIANTS),
)
def test_equals_reference_property(rows, bins, seed, variant):
    check_against_reference(*random_histograms(rows, bins, seed), variant, seed=seed)


@pytest.mark.parametrize("variant", VARIANTS)
def test_float32_close_to_float64(device, variant):
    n, p, positives = random_histograms(40, 20, seed=3, device=device)
    ap64 = torch.ops.fastap.ap_from_histograms(n, p, positives, variant)
    ap32 = torch.ops.fastap.ap_from_histograms(n.float(), p.float(), positives, variant)
    assert ap32.dtype == torch.float32
    torch.testing.assert_close(ap32.double(), ap64, rtol=1e-5, atol=1e-6)


def test_tie_aware_float32_on_long_rows_close_to_float64(device):
    """AP_T's log((N_k + 1) / (N_{k-1} + 1)) is taken as log1p(n_k / (N_{k-1} + 1)): down a row of
    a million candidates the ratio is within 1e-2 of 1, and the logarithm of the rounded float32
    ratio lost the AP to 1.7e-6 and dAP/dn to 1.2e-4 of its largest entry (most of dS: every
    negative's slope is a difference of dAP/dn). Now 3e-7 and 3e-6."""
    g = torch.Generator().manual_seed(0)
    n = 10000 * (0.9 + 0.2 * torch.rand(8, 100, generator=g, dtype=torch.float64))
    p = torch.zeros(8, 100, dtype=torch.float64)
    p[:, [47, 48, 67, 68, 81, 82]] = torch.tensor([0.72, 0.28, 0.23, 0.77, 0.71, 0.29]).double()
    n, p, positives = n.float().to(device), p.float().to(device), torch.full((8,), 3, device=device)
    got = [torch.ops.fastap.ap_from_histograms(n, p, positives, "tie_aware")]
    got += torch.ops.fastap.ap_from_histograms_backward(
        torch.ones(8, device=device), n, p, positives, "tie_aware"
    )
    want = [torch.ops.fastap.ap_from_histograms(n.double(), p.double(), positives, "tie_aware")]
    want += torch.ops.fastap.ap_from_histograms_backward(
        torch.ones(8, dtype=torch.float64, device=device), n.double(), p.double(), positives,
        "tie_aware",
    )  # fmt: skip
    ap_error = ((got[0].double() - want[0]).abs() / want[0]).max().item()
    assert ap_error < 1e-6
    for got_grad, want_grad in zip(got[1:], want[1:]):
        error = (got_grad.double() - want_grad).abs().amax(1) / want_grad.abs().amax(1)
        assert error.max().item() < 2e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_rows_without_positives_give_zero_and_no_gradient(variant):
    n, p, positives = random_histograms(6, 9, seed=5)
    positives[::2] = 0
    ap = torch.ops.fastap.ap_from_histograms(n, p, positives, variant)
    grad_n, grad_p = torch.ops.fastap.ap_from_histograms_backward(
        torch.ones(6, dtype=n.dtype), n, p, positives, variant
    )
    assert (ap[::2] == 0).all() and (grad_n[::2] == 0).all() and (grad_p[::2] == 0).all()
    assert (ap[1::2] != 0).any()


def _float32_rows(variant, n, p, positives, grad_ap):
    return (
        torch.ops.fastap.ap_from_histograms(n, p, positives, variant),
        *torch.ops.fastap.ap_from_histograms_backward(grad_ap, n, p, positives, variant),
    )


CPU_CAPABILITIES = ("default", "avx2", "avx512")


@pytest.mark.parametrize("variant", VARIANTS)
def test_float32_rows_the_same_bits_with_every_cpu_capability(variant, monkeypatch):
    """The CPU op takes float32 rows 4 (baseline), 8 (AVX2) or 16 (AVX-512) at a time, the widest
    that the processor has unless FASTAP_CPU_CAPABILITY caps it: every width gives the same bits,
    on rows split over threads, with blocks short of their width, rows without positives and
    empty bins. (A capability the processor lacks runs the widest it has: on this machine's
    kind, an AVX-512 one, each is its own path.)"""
    n, p, positives = random_histograms(1237, 13, seed=8, dtype=torch.float32)
    n[:, 3] *= 300  # bins of many candidates, where log1p's argument is large
    grad_ap = torch.randn(1237, generator=torch.Generator().manual_seed(1))
    results = {}
    for capability in CPU_CAPABILITIES:
        monkeypatch.setenv("FASTAP_CPU_CAPABILITY", capability)
        results[capability] = _float32_rows(variant, n, p, positives, grad_ap)
    monkeypatch.delenv("FASTAP_CPU_CAPABILITY")
    results["unset"] = _float32_rows(variant, n, p, positives, grad_ap)
    assert all(t.isfinite().all() for t in results["default"])
    for capability, got in results.items():
        for got_tensor, want in zip(got, results["default"]):
            assert torch.equal(got_tensor, want), capability


@pytest.mark.parametrize("variant", VARIANTS)
def test_float32_rows_in_lanes_equal_rows_one_at_a_time(variant):
    """Rows of more than 1024 bins go one at a time (the lanes' scratch grows with the bins).
    Empty bins at the end change neither the AP nor the gradient in the other bins, so 13 bins
    padded to 1100 give the one-at-a-time results of the same rows, which the lanes must equal,
    bit for bit."""
    n, p, positives = random_histograms(45, 13, seed=9, dtype=torch.float32)
    grad_ap = torch.randn(45, generator=torch.Generator().manual_seed(2))
    in_lanes = _float32_rows(variant, n, p, positives, grad_ap)
    pad = torch.nn.functional.pad
    one_at_a_time = _float32_rows(variant, pad(n, (0, 1087)), pad(p, (0, 1087)), positives, grad_ap)
    assert torch.equal(in_lanes[0], one_at_a_time[0])
    for got, want in zip(in_lanes[1:], one_at_a_time[1:]):
        assert torch.equal(got, want[:, :13])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unknown_cpu_capability_is_named(monkeypatch, dtype):
    n, p, positives = random_histograms(3, 5, seed=1, dtype=dtype)
    monkeypatch.setenv("FASTAP_CPU_CAPABILITY", "avx9000")
    with pytest.raises(ValueError, match=r"FASTAP_CPU_CAPABILITY must be .* got 'avx9000'"):
        torch.ops.fastap.ap_from_histograms(n, p, positives, "ap_q")


def test_hand_computed_quantized():
    # Two bins: n = (2, 2), p = (1, 1): AP_Q = (1/2 * 1 + 2/4 * 1) / 2 = 0.5. With p = (2, 0):
    # (2/2 * 2) / 2 = 1.
    n = torch.tensor([[2.0, 2.0], [2.0, 2.0]], dtype=torch.float64)
    p = torch.tensor([[1.0, 1.0], [2.0, 0.0]], dtype=torch.float64)
    ap = torch.ops.fastap.ap_from_histograms(n, p, torch.tensor([2, 2]), "ap_q")
    torch.testing.assert_close(ap, torch.tensor([0.5, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradcheck(variant):
    g = torch.Generator().manual_seed(7)
    # Away from the formula's kinks (n or p exactly 1, empty bins).
    n = (1.5 + torch.rand(4, 6, generator=g, dtype=torch.float64)).requires_grad_()
    p = n.detach() * (0.6 + 0.3 * torch.rand(4, 6, generator=g, dtype=torch.float64))
    p.requires_grad_()
    positives = torch.tensor([3, 1, 0, 5])
    assert torch.autograd.gradcheck(
        lambda a, b: ApFromHistograms.apply(a, b, positives, variant), (n, p)
    )


def test_opcheck(device):
    n, p, positives = random_histograms(7, 5, seed=2, dtype=torch.float32, device=device)
    for variant in VARIANTS:
        args = (n, p, positives, variant)
        torch.library.opcheck(torch.ops.fastap.ap_from_histograms.default, args)
        grad_ap = torch.randn(7, device=device)
        torch.library.opcheck(
            torch.ops.fastap.ap_from_histograms_backward.default,
            (grad_ap, n, p, positives, variant),
        )


@pytest.mark.parametrize(
    "args,error,match",
    [
        ((torch.rand(3), torch.rand(3), torch.ones(3), "ap_q"), ValueError, "n must be 2-D"),
        ((torch.rand(3, 4), torch.rand(3, 5), torch.ones(3), "ap_q"), ValueError, "p must have"),
        (
            (torch.rand(3, 4), torch.rand(3, 4).double(), torch.ones(3), "ap_q"),
            TypeError,
            "p must have the dtype",
        ),
        ((torch.rand(3, 4).half(),) * 2 + (torch.ones(3), "ap_q"), TypeError, "float32 or float64"),
        ((torch.rand(3, 4), torch.rand(3, 4), torch.ones(2), "ap_q"), ValueError, "positives"),
        ((torch.rand(3, 4), torch.rand(3, 4), torch.ones(3), "map"), ValueError, "variant"),
    ],
)
def test_bad_arguments_are_named(args, error, match):
    with pytest.raises(error, match=match):
        torch.ops.fastap.ap_from_histograms(*args)


def test_backward_checks_grad_ap():
    n, p = torch.rand(3, 4), torch.rand(3, 4)
    with pytest.raises(ValueError, match="grad_ap must have shape"):
        torch.ops.fastap.ap_from_histograms_backward(torch.ones(4), n, p, torch.ones(3), "ap_q")
    for dtype in (torch.int64, torch.bool, torch.complex64):
        with pytest.raises(TypeError, match="grad_ap must be a floating-point tensor"):
            torch.ops.fastap.ap_from_histograms_backward(
                torch.ones(3, dtype=dtype), n, p, torch.ones(3), "ap_q"
            )


@pytest.mark.parametrize("variant", VARIANTS)
def test_floating_counts_are_rounded(variant):
    n, p, positives = random_histograms(8, 6, seed=9)
    expected = torch.ops.fastap.ap_from_histograms(n, p, positives, variant)
    for counts in (
        positives.float() + 0.3,
        positives.double() - 0.3,
        positives.half(),
        positives.bfloat16(),
        positives.int(),
    ):
        got = torch.ops.fastap.ap_from_histograms(n, p, counts, variant)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_floating_positive_counts_are_rounded_and_clamped():
    """Floating counts are rounded; beyond 2^53 (inf included) they are clamped, not wrapped
    around to a negative int64 (which read as "no positives"); NaN counts as 0, as negative ones
    do. fastap.functional.ap_from_histograms says which rows have a positive by the same rule."""
    n = torch.tensor([[2.0, 1.0, 1.0]]).repeat(8, 1)
    p = torch.tensor([[1.0, 0.0, 1.0]]).repeat(8, 1)
    counts = torch.tensor([2.0, 1.6, 1e30, float("inf"), 2.0**63, 0.4, float("nan"), -5.0])
    ap, has_positive = fastap.functional.ap_from_histograms(n, p, counts, "ap_q")
    # AP_Q divides by P_{Q-1}, so every row with a positive has the same AP: 1/2 (1/2 + 2/4).
    assert ap.tolist() == [0.5] * 5 + [0.0] * 3
    assert has_positive.tolist() == [True] * 5 + [False] * 3
    # The tie-aware variants divide by the count itself: the clamped one, 2^53.
    simplified = torch.ops.fastap.ap_from_histograms(n, p, counts, "tie_aware_simplified")
    expected = torch.ops.fastap.ap_from_histograms(
        n[:1], p[:1], torch.tensor([2]), "tie_aware_simplified"
    )
    assert simplified[0] == expected[0] and simplified[1] == expected[0]
    for row in (2, 3, 4):
        torch.testing.assert_close(simplified[row], expected[0] * 2 / 2.0**53, rtol=1e-6, atol=0)
    # The same in the 16-bit dtypes, whose largest finite values are far below 2^53.
    for dtype in (torch.float16, torch.bfloat16):
        short = counts[[0, 3, 5, 6, 7]].to(dtype)  # 2, inf, 0.4, NaN, -5
        ap, has_positive = fastap.functional.ap_from_histograms(n[:5], p[:5], short, "ap_q")
        assert ap.tolist() == [0.5, 0.5, 0.0, 0.0, 0.0]
        assert has_positive.tolist() == [True, True, False, False, False]
        simplified = torch.ops.fastap.ap_from_histograms(
            n[:5], p[:5], short, "tie_aware_simplified"
        )
        assert simplified[0] == expected[0]
        torch.testing.assert_close(simplified[1], expected[0] * 2 / 2.0**53, rtol=1e-6, atol=0)
