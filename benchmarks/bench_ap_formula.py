"""The O(N Q) part of the loss, AP from the histograms, forward + backward: the fused op
(fastap::ap_from_histograms, one kernel each way) against the same formulas as vectorised
PyTorch operations (cumsum, where, division: some thirty small kernels with their autograd), the
way fastap computed it before the op. On a GPU the difference is mostly launch overhead.

    python benchmarks/bench_ap_formula.py --device cpu --rows 8192
    python benchmarks/bench_ap_formula.py --device cuda --rows 8192 65536
"""

from __future__ import annotations

import argparse

import torch
from timing import median_ms

import fastap
from fastap.functional import ap_from_histograms

EPS = 1e-8


def _safe(x):
    return torch.where(x > 0, x, torch.ones_like(x))


def _previous(cumulative):
    return torch.nn.functional.pad(cumulative[:, :-1], (1, 0))


def torch_formula(n, p, positives, variant):
    """AP per query in vectorised PyTorch operations (the formulas of csrc/ap_formula.h)."""
    cum_n, cum_p = n.cumsum(-1), p.cumsum(-1)
    count = positives.to(n.dtype)
    if variant == "ap_q":
        ap = (cum_p / _safe(cum_n) * p).sum(-1) / _safe(cum_p[:, -1])
    else:
        prev_n, prev_p = _previous(cum_n), _previous(cum_p)
        if variant == "tie_aware_simplified":
            per_bin = p * (prev_p + cum_p + 1) / (prev_n + cum_n + 1)
        else:
            ratio = torch.relu(p - 1) / (torch.relu(n - 1) + EPS)
            spread = (prev_p + 1 - ratio * (prev_n + 1)) * torch.log((cum_n + 1) / (prev_n + 1))
            per_bin = p * (n * ratio + spread) / (n + EPS)
        ap = per_bin.sum(-1) / _safe(count)
    return torch.where(count > 0, ap, torch.zeros_like(ap))


def ap_from_histograms_only(n, p, positives, variant):
    return ap_from_histograms(n, p, positives, variant)[0]


def pass_of(formula, n, p, positives, variant):
    """One forward + backward of `formula` on fresh leaves."""

    def run():
        a, b = n.clone().requires_grad_(), p.clone().requires_grad_()
        formula(a, b, positives, variant).sum().backward()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, nargs="+", default=[8192])
    parser.add_argument("--num-bins", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    q = args.num_bins
    print(f"# fwd+bwd of AP from histograms [N, {q}], float32, {args.device}, torch "
          f"{torch.__version__}; median of {args.repeats}, ms")  # fmt: skip
    print("| N | variant | fused op | PyTorch ops | speed-up |")
    print("|---|---|---|---|---|")
    for rows in args.rows:
        positives = torch.randint(1, 5, (rows,), generator=g)
        p = torch.rand(rows, q, generator=g)
        p = p / p.sum(1, keepdim=True) * positives[:, None]
        n = p + 10 * torch.rand(rows, q, generator=g)
        n, p, positives = (t.to(args.device) for t in (n, p, positives))
        for variant in fastap.VARIANTS:
            fused = pass_of(ap_from_histograms_only, n, p, positives, variant)
            vectorised = pass_of(torch_formula, n, p, positives, variant)
            times = [median_ms(fn, args.device, args.repeats) for fn in (fused, vectorised)]
            print(f"| {rows} | {variant} | {times[0]:.3f} | {times[1]:.3f} | "
                  f"{times[1] / times[0]:.1f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
