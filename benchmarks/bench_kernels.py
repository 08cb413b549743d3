"""The fused ops alone: forward, backward and forward+backward time, achieved bandwidth against
the device's copy bandwidth measured in the same run, and the speed-up over the reference.

Bytes that must move (the floor): the forward reads S (N M s bytes, s = element size) and the
backward reads S and writes dS (2 N M s), plus the labels (8 (N + M) bytes, negligible), or with
--relevance dense an N x M bool relevance matrix read by both (2 N M bytes more). Labels take the
fast CUDA kernels (16-byte loads) when rows hold whole 16-byte vectors; a dense matrix takes the
general ones (docs/design.md, section 3). Achieved
bandwidth = those bytes / time; the copy bandwidth is that of `dst.copy_(src)` on a 1 GiB tensor
(bytes read + written / time). Timing: CUDA events (or perf_counter on CPU), median of --repeats
after a warm-up.

    python benchmarks/bench_kernels.py --device cuda --shapes 8192x8192 32768x32768 256x1000000 \
        --num-bins 10 20 50 --dtypes float32 bfloat16
"""

from __future__ import annotations

import argparse
import time

import torch
from timing import median_ms

import fastap


def copy_bandwidth(device: str, repeats: int) -> float:
    """GB/s of a plain device copy (bytes read + written)."""
    size = 2**28 if device.startswith("cuda") else 2**25  # floats: 1 GiB on GPU, 128 MiB on CPU
    src = torch.empty(size, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, repeats)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def measure_case(scores, relevance, labels, ref_labels, q, device, repeats, with_reference):
    """(fwd, bwd, fwd+bwd, reference fwd+bwd or None) in ms for one problem: relevance from
    `labels`/`ref_labels`, or from the dense `relevance` matrix when it is not None."""
    op = torch.ops.fastap
    if relevance is not None:
        labels = ref_labels = None
    op_args = (relevance, labels, ref_labels, None, False, q, -1.0, 1.0)
    hist = op.soft_histogram(scores, *op_args)
    grad_n, grad_p = torch.randn_like(hist[0]), torch.randn_like(hist[1])

    def forward():
        op.soft_histogram(scores, *op_args)

    def backward():
        op.soft_histogram_backward(grad_n, grad_p, scores, *op_args)

    def both(loss_fn=fastap.ap_loss):
        loss = loss_fn(scores, relevance, labels=labels, ref_labels=ref_labels, num_bins=q)
        torch.autograd.grad(loss, scores)

    reference = None
    if with_reference:
        reference = median_ms(lambda: both(fastap.reference.ap_loss), device, max(1, repeats // 5))
    return (
        median_ms(forward, device, repeats),
        median_ms(backward, device, repeats),
        median_ms(both, device, repeats),
        reference,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", nargs="+", default=["1024x1024", "4096x4096"])
    parser.add_argument("--num-bins", type=int, nargs="+", default=[20])
    parser.add_argument("--dtypes", nargs="+", default=["float32"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--reference-max", type=int, default=2**24, help="largest N*M for it")
    parser.add_argument("--relevance", nargs="+", default=["labels"], choices=["labels", "dense"])
    args = parser.parse_args()
    device = args.device
    copy = copy_bandwidth(device, args.repeats)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    print(
        f"# {time.strftime('%Y-%m-%d')}, {name}, torch {torch.__version__}, "
        f"copy bandwidth {copy:.0f} GB/s; times in ms (median of {args.repeats}); "
        "GB/s = floor bytes / time"
    )
    print(
        "| N x M | relevance | dtype | Q | fwd | bwd | fwd+bwd | fwd+bwd GB/s | % of copy "
        "| reference | speed-up |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        n, m = (int(v) for v in shape.split("x"))
        g = torch.Generator(device="cpu").manual_seed(0)
        labels = torch.randint(0, max(2, n // 8), (n,), generator=g).to(device)
        ref_labels = torch.randint(0, max(2, n // 8), (m,), generator=g).to(device)
        for form in args.relevance:
            relevance = None
            if form == "dense":
                relevance = labels[:, None] == ref_labels[None, :]
            for dtype_name in args.dtypes:
                dtype = getattr(torch, dtype_name)
                scores = (2 * torch.rand(n, m, device=device) - 1).to(dtype).requires_grad_()
                for q in args.num_bins:
                    with_reference = n * m <= args.reference_max and dtype != torch.bfloat16
                    fwd, bwd, total, ref = measure_case(
                        scores, relevance, labels, ref_labels, q, device, args.repeats,
                        with_reference,
                    )  # fmt: skip
                    floor_bytes = (
                        n * m * (3 * scores.element_size() + (2 if relevance is not None else 0))
                    )
                    achieved = floor_bytes / total / 1e6
                    ref_cells = "- | -" if ref is None else f"{ref:.2f} | {ref / total:.0f}x"
                    print(
                        f"| {n} x {m} | {form} | {dtype_name} | {q} | {fwd:.3f} | {bwd:.3f} | "
                        f"{total:.3f} | {achieved:.0f} | {100 * achieved / copy:.0f}% | "
                        f"{ref_cells} |",
                        flush=True,
                    )
                del scores
            del relevance


if __name__ == "__main__":
    main()
