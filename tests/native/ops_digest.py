"""Digests of fastap's CPU results on fixed inputs, to compare machines: .ci/aarch64_qemu.sh runs
it on x86-64 and on aarch64 and the lines must match.

The inputs are made from integers (torch.randint, the same on every machine) by exact operations.
Line `ops`: the per-query AP of every variant and its gradient by the scores, computed by fastap's
kernels alone, for float32, float64, float16 and bfloat16 scores, labels and a dense relevance
matrix, an ignore mask and exclude_self. Line `loss`: ap_loss and its gradient, whose weighted mean
is torch's own arithmetic (its reductions may round differently on another instruction set).

    python tests/native/ops_digest.py
"""

from __future__ import annotations

import hashlib

import torch

import fastap


def exact_scores(n: int, m: int, seed: int) -> torch.Tensor:
    """Scores in [-1, 1), multiples of 2^-10: exact in float64, float32 and float16; bfloat16
    rounds some of them, the same way everywhere."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1024, 1024, (n, m), generator=g).double() / 1024


def bits(tensor: torch.Tensor) -> bytes:
    return tensor.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


def problems():
    g = torch.Generator().manual_seed(0)
    for seed, (n, m, classes) in enumerate([(7, 13, 3), (33, 65, 5), (130, 257, 9), (5, 2000, 4)]):
        scores = exact_scores(n, m, seed)
        labels = torch.randint(0, classes, (n,), generator=g)
        ref_labels = torch.randint(0, classes, (m,), generator=g)
        ignore = torch.randint(0, 8, (n, m), generator=g) == 0
        relevance = torch.randint(0, 3, (n, m), generator=g) == 0
        upstream = torch.randint(-64, 64, (n,), generator=g).double() / 64
        yield scores, labels, ref_labels, ignore, relevance, upstream


def main() -> None:
    ops, loss = hashlib.sha256(), hashlib.sha256()
    for scores, labels, ref_labels, ignore, relevance, upstream in problems():
        square = scores.shape[0] == scores.shape[1]
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            for variant in ("ap_q", "tie_aware", "tie_aware_simplified"):
                forms = [
                    dict(labels=labels, ref_labels=ref_labels, ignore=ignore),
                    dict(relevance=relevance, num_bins=17, score_range=(-0.8, 0.9)),
                    dict(labels=labels, ref_labels=labels, exclude_self=True) if square else None,
                ]
                for form in filter(None, forms):
                    form = dict(form)
                    relevance_matrix = form.pop("relevance", None)
                    leaf = scores.to(dtype).requires_grad_()
                    ap = fastap.average_precision(leaf, relevance_matrix, variant=variant, **form)
                    (grad,) = torch.autograd.grad(ap, leaf, upstream.to(ap.dtype))
                    for tensor in (ap, grad):
                        ops.update(bits(tensor))
                    leaf = scores.to(dtype).requires_grad_()
                    value = fastap.ap_loss(leaf, relevance_matrix, variant=variant, **form)
                    (grad,) = torch.autograd.grad(value, leaf)
                    for tensor in (value, grad):
                        loss.update(bits(tensor))
    print("ops", ops.hexdigest()[:16])
    print("loss", loss.hexdigest()[:16])


if __name__ == "__main__":
    main()
