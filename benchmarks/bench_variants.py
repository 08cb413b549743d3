"""Forward+backward time of each loss variant relative to AP_Q, measured in one process with the
runs interleaved (the variants differ only in the O(N Q) formula after the shared kernels).

    python benchmarks/bench_variants.py --device cpu --n 4096
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from timing import time_once_ms, warm_up

import fastap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--num-bins", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    n, device = args.n, args.device
    labels = torch.randint(0, max(2, n // 8), (n,), generator=g).to(device)
    scores = (2 * torch.rand(n, n, generator=g) - 1).to(device).requires_grad_()
    embeddings = torch.randn(n, args.dim, generator=g).to(device).requires_grad_()

    def on_scores(variant):
        def run():
            loss = fastap.ap_loss(
                scores, labels=labels, num_bins=args.num_bins, exclude_self=True, variant=variant
            )
            torch.autograd.grad(loss, scores)

        return run

    def on_embeddings(loss_fn):
        def run():
            torch.autograd.grad(loss_fn(embeddings, labels), embeddings)

        return run

    cases = {
        "ap_q (scores)": on_scores("ap_q"),
        "tie_aware (scores)": on_scores("tie_aware"),
        "tie_aware_simplified (scores)": on_scores("tie_aware_simplified"),
        "APLoss ap_q (embeddings)": on_embeddings(fastap.APLoss(args.num_bins)),
        "FastAPLoss (embeddings)": on_embeddings(fastap.FastAPLoss(args.num_bins - 1)),
    }
    times = {name: [] for name in cases}
    for fn in cases.values():
        warm_up(fn, device)
    for _ in range(args.repeats):
        for name, fn in cases.items():
            times[name].append(time_once_ms(fn, device))
    print(
        f"# {time.strftime('%Y-%m-%d')}, {device}, torch {torch.__version__}, N = M = {n}, "
        f"Q = {args.num_bins}, D = {args.dim}, fwd+bwd, median of {args.repeats} interleaved runs"
    )
    print("| case | time | relative to the AP_Q case of its kind |")
    print("|---|---|---|")
    base = {"scores": statistics.median(times["ap_q (scores)"])}
    base["embeddings"] = statistics.median(times["APLoss ap_q (embeddings)"])
    for name, values in times.items():
        median = statistics.median(values)
        kind = "embeddings" if "embeddings" in name else "scores"
        print(f"| {name} | {median:.1f} ms | {median / base[kind]:.2f}x |")


if __name__ == "__main__":
    main()
