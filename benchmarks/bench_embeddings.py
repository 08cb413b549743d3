"""The loss from embeddings: fastap.APLoss (forms the N x N score matrix) against
fastap.ap_loss_from_embeddings (block by block, no score matrix), forward + backward, D = 128,
time and peak extra memory, each from a fresh process (see bench_ap_loss.py for the method).

    python benchmarks/bench_embeddings.py --sizes 2048 4096 8192
"""

from __future__ import annotations

import argparse

from bench_ap_loss import environment, fmt, measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--num-bins", type=int, default=20)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    env = environment(args.device)
    print(
        f"# {env['date']}, {env['device']}, torch {env['torch']}, commit {env['commit']}, "
        f"{args.dtype}, Q = {args.num_bins}, D = 128, fwd+bwd, in-batch (N = M)"
    )
    print("| N = M | fastap.APLoss (score matrix) | ap_loss_from_embeddings (blocks) |")
    print("|---|---|---|")
    for n in args.sizes:
        common = (n, args.num_bins, args.dtype, args.device, args.repeats, args.timeout)
        matrix = measure("fastap_aploss_emb", *common)
        blocked = measure("fastap_blocked_emb", *common)
        print(f"| {n} | {fmt(matrix)} | {fmt(blocked)} |", flush=True)


if __name__ == "__main__":
    main()
