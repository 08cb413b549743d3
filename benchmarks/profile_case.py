"""The workload that benchmarks/gpu_check.sh profiles with Nsight Compute (its `profile` step):
one forward and one backward of the score-matrix op, labels, Q = 20, N = M = 8192, in float32
then bfloat16 (the fast kernels of issue 3's targets). Each kernel runs once after a warm-up pass
that ncu skips (--launch-skip), so that the profile holds exactly four kernels in this order.
benchmarks/profile_table.py turns ncu's CSV into the table that tests the model of
docs/design.md, section 5 (which of issue, shared/L1 and DRAM binds)."""

import argparse

import torch

import fastap

SIZE, NUM_BINS, DTYPES = 8192, 20, (torch.float32, torch.bfloat16)


def one_pass(scores: torch.Tensor, labels: torch.Tensor) -> None:
    scores = scores.detach().requires_grad_()
    loss = fastap.ap_loss(scores, labels=labels, num_bins=NUM_BINS, exclude_self=True)
    loss.backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=SIZE)
    args = parser.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    labels = torch.randint(0, args.size // 4, (args.size,), generator=g, device="cuda")
    for dtype in DTYPES:  # warm-up: the launches that --launch-skip passes over
        one_pass(torch.rand(64, 64, generator=g, device="cuda", dtype=dtype), labels[:64])
    for dtype in DTYPES:
        scores = torch.rand(args.size, args.size, generator=g, device="cuda") * 2 - 1
        one_pass(scores.to(dtype), labels)
    torch.cuda.synchronize()
    print(f"profile case done: {args.size} x {args.size}, Q = {NUM_BINS}, float32 then bfloat16")


if __name__ == "__main__":
    main()
