"""Quickstart: train a small embedding network with fastap.APLoss on generated data.

The data are 48 classes of 64-dimensional points (see make_data). The network learns on 32
classes and is evaluated on the 16 classes it never saw: exact mean Average Precision and
recall@1 of retrieving same-class points by cosine similarity. Runs in a few seconds on two CPU
cores.

    python examples/quickstart.py [--steps 300] [--batch-size 256] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch

import fastap


def make_data(generator: torch.Generator, classes=48, per_class=50):
    """Class identity lives in 8 of 64 dimensions, buried under 56 dimensions of larger nuisance
    noise, then rotated and squashed. What transfers to new classes is learning to ignore the
    nuisance: exactly what a retrieval embedding must do."""
    means = torch.randn(classes, 8, generator=generator)
    labels = torch.arange(classes).repeat_interleave(per_class)
    signal = means[labels] + 0.3 * torch.randn(len(labels), 8, generator=generator)
    nuisance = 1.5 * torch.randn(len(labels), 56, generator=generator)
    rotation, _ = torch.linalg.qr(torch.randn(64, 64, generator=generator))
    return torch.tanh(0.5 * torch.cat([signal, nuisance], 1) @ rotation), labels


def exact_map_and_recall_at_1(embeddings: torch.Tensor, labels: torch.Tensor):
    """Exact (not quantized) mAP and recall@1, each point a query against all the others."""
    e = torch.nn.functional.normalize(embeddings, dim=1)
    scores = e @ e.T
    scores.fill_diagonal_(-float("inf"))  # a query does not retrieve itself
    order = scores.argsort(dim=1, descending=True)[:, :-1]
    hits = (labels[order] == labels[:, None]).float()
    precision = hits.cumsum(1) / torch.arange(1, hits.shape[1] + 1)
    ap = (precision * hits).sum(1) / hits.sum(1)
    return ap.mean().item(), hits[:, 0].mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.steps < 0:
        parser.error(f"--steps must not be negative, got {args.steps}")
    if args.batch_size < 2:
        parser.error(f"--batch-size must be at least 2, got {args.batch_size}")
    try:  # (a device this torch or machine lacks fails here, with its reason)
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as error:
        parser.error(f"--device {args.device}: {str(error).splitlines()[0]}")
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    points, labels = make_data(generator)
    train = labels < 32
    train_x, train_y = points[train].to(args.device), labels[train].to(args.device)
    test_x, test_y = points[~train].to(args.device), labels[~train].to(args.device)
    print(
        f"data: {len(train_y)} training points of 32 classes, "
        f"{len(test_y)} held-out points of 16 other classes"
    )

    model = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32)
    ).to(args.device)
    loss_fn = fastap.APLoss(num_bins=20)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    print(f"loss: {loss_fn}")

    def evaluate(step: int, loss: float | None) -> None:
        with torch.no_grad():
            mean_ap, recall = exact_map_and_recall_at_1(model(test_x), test_y)
        shown = "  -   " if loss is None else f"{loss:.4f}"
        print(f"step {step:4d}  loss {shown}  held-out mAP {mean_ap:.4f}  recall@1 {recall:.4f}")

    evaluate(0, None)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = torch.randint(0, len(train_y), (args.batch_size,), device=args.device)
        loss = loss_fn(model(train_x[batch]), train_y[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 100 == 0 or step == args.steps:
            evaluate(step, loss.item())
    print(
        f"trained {args.steps} steps of batch {args.batch_size} in "
        f"{time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    main()
