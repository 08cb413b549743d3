"""Bitwise identical forward and backward from run to run, and across thread counts (CPU)."""

import pytest
import torch

import fastap
from fastap.testing import random_problem


def run(problem, device):
    problem = problem.to(device)
    scores = problem.scores.detach().requires_grad_()
    loss = fastap.ap_loss(scores, problem.relevance, **problem.kwargs())
    loss.backward()
    return loss.detach(), scores.grad


def test_repeat_is_bitwise_identical(device):
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        problem = random_problem(
            129, 1031, with_ignore=True, relevance_form="ref_labels", dtype=dtype, seed=4
        )
        first = run(problem, device)
        for _ in range(3):
            again = run(problem, device)
            assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize(
    "num_queries, num_candidates, with_ignore",
    # (rows of more than 65536 candidates run as pieces in parallel, whose sums the forward adds
    # in piece order: still bitwise whatever the threads)
    [(200, 517, False), (3, 200_001, True)],
)
def test_thread_count_does_not_change_results(num_queries, num_candidates, with_ignore):
    problem = random_problem(
        num_queries, num_candidates, dtype=torch.float32, with_ignore=with_ignore, seed=5
    )
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run(problem, "cpu")
        torch.set_num_threads(max(2, threads))
        multi = run(problem, "cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single[0], multi[0]) and torch.equal(single[1], multi[1])
