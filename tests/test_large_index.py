"""More than 2^31 score entries: offsets are 64-bit (CPU here; CUDA on the GPU machine)."""

import pytest
import torch

import fastap


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.usefixtures("machine_memory")
def test_more_than_2_31_entries(device):
    # Each row repeats one small pattern K times. AP_Q is homogeneous of degree 0 in the histograms,
    # so every row's AP equals the pattern's, and its gradient is the pattern's divided by K.
    repeats = 2**24 + 1
    g = torch.Generator().manual_seed(0)
    pattern = (2.4 * torch.rand(2, 64, generator=g) - 1.2).to(torch.bfloat16)
    pattern_relevance = torch.rand(2, 64, generator=g) < 0.3
    small = pattern.double().requires_grad_()
    expected = fastap.average_precision(small, pattern_relevance)
    expected.sum().backward()

    # About 11 GB in all: bf16 scores and their gradient (4.3 GB each), a bool relevance (2.1 GB).
    scores = pattern.to(device).repeat(1, repeats)
    assert scores.numel() > 2**31
    scores.requires_grad_()
    relevance = pattern_relevance.to(device).repeat(1, repeats)
    ap = fastap.average_precision(scores, relevance)
    del relevance
    torch.testing.assert_close(ap.cpu().double(), expected.detach(), rtol=0, atol=1e-6)
    ap.sum().backward()
    tail = scores.grad[:, -64:].cpu().double() * repeats
    del scores
    torch.testing.assert_close(tail, small.grad, rtol=1e-2, atol=1e-6)
