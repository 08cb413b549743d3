"""A small CUDA forward+backward over every relevance form and dtype, for compute-sanitizer."""

import torch

import fastap
from fastap.testing import RELEVANCE_FORMS, random_problem

for form in RELEVANCE_FORMS:
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for num_bins in (2, 20, 100):
            problem = random_problem(
                37,
                37,
                num_bins=num_bins,
                relevance_form=form,
                with_ignore=True,
                exclude_self=True,
                dtype=dtype,
                seed=num_bins,
            ).to("cuda")
            scores = problem.scores.detach().requires_grad_()
            fastap.ap_loss(scores, problem.relevance, **problem.kwargs()).backward()
torch.cuda.synchronize()
print("sanitizer case done")
