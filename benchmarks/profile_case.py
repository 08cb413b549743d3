"""The workloads that benchmarks/gpu_check.sh profiles with Nsight Compute (its `profile` step).

Default: one forward and one backward of the score-matrix op, labels, Q = 20, N = M = 8192, in
float32 then bfloat16 (the fast kernels of issue 3's targets): four kernels.
--embeddings: one forward and backward of the fused loss from embeddings, bf16, D = 256, labels,
Q = 20, N = M = 16384: the fused forward, then the backward's dQ and dDB passes, three kernels.

Each kernel runs once after a warm-up pass that ncu skips (--launch-skip), so that the profile
holds exactly those kernels in this order. benchmarks/profile_table.py turns ncu's CSV into the
table that tests the model of docs/design.md, sections 3b and 5 (which of issue, shared/L1 and
DRAM binds)."""

import argparse

import torch

import fastap

SIZE, NUM_BINS, DTYPES = 8192, 20, (torch.float32, torch.bfloat16)
EMBEDDING_SIZE, EMBEDDING_DIM = 16384, 256


def one_pass(scores: torch.Tensor, labels: torch.Tensor) -> None:
    scores = scores.detach().requires_grad_()
    loss = fastap.ap_loss(scores, labels=labels, num_bins=NUM_BINS, exclude_self=True)
    loss.backward()


def one_embedding_pass(embeddings: torch.Tensor, labels: torch.Tensor) -> None:
    embeddings = embeddings.detach().requires_grad_()
    loss = fastap.ap_loss_from_embeddings(
        embeddings, labels=labels, num_bins=NUM_BINS, backend="fused"
    )
    loss.backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--embeddings", action="store_true", help="the fused kernels")
    args = parser.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    if args.embeddings:
        size = args.size or EMBEDDING_SIZE
        labels = torch.randint(0, size // 4, (size,), generator=g, device="cuda")
        embeddings = torch.randn(size, EMBEDDING_DIM, generator=g, device="cuda")
        embeddings = embeddings.to(torch.bfloat16)
        one_embedding_pass(embeddings[:64], labels[:64])  # warm-up: skipped by --launch-skip
        one_embedding_pass(embeddings, labels)
        torch.cuda.synchronize()
        print(f"profile case done: embeddings {size} x {EMBEDDING_DIM}, bf16, Q = {NUM_BINS}")
        return
    size = args.size or SIZE
    labels = torch.randint(0, size // 4, (size,), generator=g, device="cuda")
    for dtype in DTYPES:  # warm-up: the launches that --launch-skip passes over
        one_pass(torch.rand(64, 64, generator=g, device="cuda", dtype=dtype), labels[:64])
    for dtype in DTYPES:
        scores = torch.rand(size, size, generator=g, device="cuda") * 2 - 1
        one_pass(scores.to(dtype), labels)
    torch.cuda.synchronize()
    print(f"profile case done: {size} x {size}, Q = {NUM_BINS}, float32 then bfloat16")


if __name__ == "__main__":
    main()
