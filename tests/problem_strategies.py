"""Random AP problems for hypothesis, and their comparison with the reference, shared by the
tests that fuzz the ops: the CPU op against the reference (test_properties.py), the CUDA kernels
on a GPU (test_cuda.py) and in the CPU emulation (test_cuda_emulation.py)."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

import fastap
from fastap import reference
from fastap._validation import SCORE_DTYPES
from fastap.testing import RELEVANCE_FORMS, Problem, random_problem


@st.composite
def kernel_problems(draw) -> tuple[Problem, int]:
    """(problem, self_offset): any relevance form and score dtype; rows from empty to past one
    forward chunk (4096), of whole 16-byte vectors or not (the fast and the general kernels);
    narrow and wide ranges, Q from 2 to 100, ties, an ignore mask; square or not, with self
    exclusion at any offset where the queries are a slice of the candidates (query i is candidate
    i + self_offset)."""
    n = draw(st.integers(1, 130))
    m = draw(st.integers(0, 1100) | st.sampled_from([8, 64, 256, 4096, 4104]))
    if draw(st.booleans()):
        m = n
    lo, width = draw(st.floats(-3, 1)), draw(st.floats(0.01, 4))
    problem = random_problem(
        n, m, num_bins=draw(st.integers(2, 100)), score_range=(lo, lo + width),
        relevance_form=draw(st.sampled_from(RELEVANCE_FORMS)), num_classes=draw(st.integers(1, 5)),
        with_ignore=draw(st.booleans()), ties=draw(st.booleans()),
        dtype=draw(st.sampled_from(SCORE_DTYPES)), seed=draw(st.integers(0, 2**31 - 1)),
    )  # fmt: skip
    self_offset = 0
    if n <= m and draw(st.booleans()):
        problem.exclude_self = True
        self_offset = draw(st.integers(0, m - n))
    return problem, self_offset


def conditioning(problem: Problem) -> float:
    """How much a rounding of the scores moves their bin positions: a narrow range far from 0
    amplifies it by max(|lo|, |hi|) / (hi - lo). The fp64 tolerances scale with it."""
    lo, hi = problem.score_range
    return max(1.0, max(abs(lo), abs(hi)) / (hi - lo))


def tie_aware_conditioning(n: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """[N]: how much the gradient of the exact AP_T amplifies a rounding of its histograms
    (n, p: [N, Q]). Its ratio of relu(p_k - 1) to relu(n_k - 1) + 1e-8 takes the differences
    p_k - 1 and n_k - 1, whose relative rounding error grows to x / (x - 1) for a bin that holds
    just over one candidate; 1 where no bin does."""
    factors = [torch.where(x > 1, x / (x - 1 + 1e-8), torch.ones_like(x)) for x in (n, p)]
    return torch.maximum(*factors).amax(1)


def gradient_scale(expected: torch.Tensor, floor: float = 1.0) -> float:
    """What a gradient's rounding error is relative to: every term of it is O(its largest
    entry), and for gradients of scores at least O(1 / delta) = (Q - 1) / (hi - lo) (the floor)."""
    return max(floor, expected.abs().max().item() if expected.numel() else 0.0)


def assert_gradients_close(
    grad: torch.Tensor, expected: torch.Tensor, atol: float, floor: float = 1.0, msg=None
) -> None:
    """grad equals expected to atol relative to gradient_scale(expected, floor)."""
    scale = gradient_scale(expected, floor)
    torch.testing.assert_close(grad / scale, expected / scale, rtol=0, atol=atol, msg=msg)


def reference_tolerance(
    problem: Problem, variant: str = "ap_q", self_offset: int | None = None
) -> torch.Tensor:
    """[N] float64: how far from the reference a float64 problem's AP may be, row by row: 1e-12
    scaled by the problem's conditioning, and for the exact AP_T by that of its formula too."""
    tolerance = torch.full(
        (problem.scores.shape[0],), 1e-12 * conditioning(problem), dtype=torch.float64
    )
    if variant == "tie_aware":
        lo, hi = problem.score_range
        n, p, _ = reference.soft_histogram(
            problem.scores, problem.relevance, problem.labels, problem.ref_labels,
            problem.ignore, problem.exclude_self, problem.num_bins, lo, hi, self_offset,
        )  # fmt: skip
        tolerance *= tie_aware_conditioning(n.detach(), p.detach())
    return tolerance


def check_against_reference(
    problem: Problem, device: str = "cpu", variant: str = "ap_q", self_offset: int | None = None
) -> None:
    """fastap.average_precision on `device` against the N x Q x M reference on the CPU, on a
    float64 problem: the values, and the gradients of a weighted sum of them, to 1e-12 scaled by
    the problem's conditioning (for the exact AP_T, row by row, by that of its formula too)."""
    assert problem.scores.dtype == torch.float64
    options = dict(variant=variant, self_offset=self_offset)
    on_device = problem.to(device)
    scores = on_device.scores.detach().requires_grad_()
    ref_scores = problem.scores.detach().requires_grad_()
    ours = fastap.average_precision(scores, on_device.relevance, **on_device.kwargs(), **options)
    ref = reference.average_precision(ref_scores, problem.relevance, **problem.kwargs(), **options)
    lo, hi = problem.score_range
    tolerance = reference_tolerance(problem, variant, self_offset)
    error = (ours.detach().cpu() - ref.detach()).abs()
    assert (error <= tolerance).all(), (
        f"AP off by {(error / tolerance).max().item():.3g} tolerances"
    )
    weights = torch.arange(1, ref.shape[0] + 1, dtype=ref.dtype)
    (ours * weights.to(device)).sum().backward()
    (ref * weights).sum().backward()
    scale = gradient_scale(ref_scores.grad, (problem.num_bins - 1) / (hi - lo))
    error = ((scores.grad.cpu() - ref_scores.grad) / scale).abs()
    assert (error <= tolerance[:, None]).all(), (
        f"gradients off by up to {(error / tolerance[:, None]).max().item():.3g} tolerances"
    )
