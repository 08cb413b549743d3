"""The score-matrix op: forward, backward and forward+backward time, peak memory, achieved
bandwidth against the device's copy bandwidth measured in the same run, and the speed-up over the
reference.

Bytes that must move (the floor): the forward reads S (N M s bytes, s = element size) and the
backward reads S and writes dS (2 N M s), plus the labels (8 (N + M) bytes, negligible), or with
--relevance dense an N x M bool relevance matrix read by both (2 N M bytes more), and with
--relevance ignore the labels and an N x M bool ignore mask (1 candidate in 16 left out; 2 N M
bytes more). Labels take the fast CUDA kernels (16-byte loads) when rows hold whole 16-byte
vectors; a dense matrix or an ignore mask takes the general ones (docs/design.md, section 3).
Achieved bandwidth = those bytes / device time (below); the copy bandwidth is that of
`dst.copy_(src)` on a 1 GiB tensor (bytes read + written / time).
Timing: CUDA events (or perf_counter on CPU), median of --repeats after a warm-up.

    python benchmarks/bench_kernels.py --device cuda --shapes 8192x8192 32768x32768 256x1000000 \
        --num-bins 10 20 50 --dtypes float32 bfloat16

Columns: fwd and bwd time the two ops alone (on scores that do not require a gradient, so without
autograd's wrapper; on CUDA calls back to back); loss, fastap.ap_loss forward and backward through
autograd, one call between two events (what a training step sees: host overhead and the value
checks' host sync included); device, the same back to back without the value checks (the device's
time when the host keeps ahead of it); graph (CUDA), the same captured in a CUDA graph and replayed
back to back: the device's time with no host work per call, from which the bandwidth is taken where
it was measured (else from device); peak, the extra memory of one loss call (CUDA), beside the size
of dS; reference, one call of the pure-PyTorch reference's loss ("out of memory" where it does not
fit), and its speed-up over loss.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
from bench_ap_loss import environment, write_json
from timing import cuda_peak_extra_bytes, median_ms, time_once_ms, warm_up

import fastap


def copy_bandwidth(device: str, repeats: int) -> float:
    """GB/s of a plain device copy (bytes read + written)."""
    size = 2**28 if device.startswith("cuda") else 2**25  # floats: 1 GiB on GPU, 128 MiB on CPU
    src = torch.empty(size, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, repeats)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def back_to_back_ms(fn, device: str, repeats: int, calls: int = 20) -> float:
    """Milliseconds per call of `calls` calls issued back to back between one pair of CUDA events
    (median of `repeats` such runs, after a warm-up): the device's time per call whenever the host
    issues the calls faster than the device runs them."""
    warm_up(fn, device)
    runs = [time_once_ms(lambda: [fn() for _ in range(calls)], device) for _ in range(repeats)]
    return statistics.median(runs) / calls


def graph_replay_ms(fn, repeats: int) -> float | None:
    """Milliseconds per replay of fn captured in a CUDA graph, replays back to back: the device's
    time with no host work per call. None where the capture fails (the reason goes to stderr),
    so that the other columns of the row are kept."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capturing stream, as torch asks
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return back_to_back_ms(graph.replay, "cuda", repeats)
    except RuntimeError as error:
        print(f"(CUDA graph capture failed: {error})", file=sys.stderr)
        return None


def measure_case(scores, relevance, labels, ref_labels, ignore, q, device, repeats, with_reference):
    """The times in ms of one problem (relevance from `labels`/`ref_labels`, or from the dense
    `relevance` matrix when it is not None; the `ignore` mask or None): fwd and bwd (the two ops
    alone, back to back), loss (fastap.ap_loss forward and backward through autograd, one call
    between two events: what a training step sees, host overhead and the value checks' host sync
    included), loss_device (the same without the value checks, back to back: the device's time
    when the host keeps ahead), loss_graph (CUDA: the same replayed from a CUDA graph; None on
    the CPU or where capture failed), reference (the pure-PyTorch reference's loss, one call; None
    when not run, "out of memory" when it did not fit); and peak_bytes, the extra memory of one
    loss call."""
    op = torch.ops.fastap
    if relevance is not None:
        labels = ref_labels = None
    op_args = (relevance, labels, ref_labels, ignore, False, q, -1.0, 1.0)
    # (The ops on scores that require a gradient would go through the autograd wrapper that
    # torch.library.register_autograd installs: host work that is not the op's.)
    plain = scores.detach()
    hist = op.soft_histogram(plain, *op_args)
    grad_n, grad_p = torch.randn_like(hist[0]), torch.randn_like(hist[1])

    def forward():
        op.soft_histogram(plain, *op_args)

    def backward():
        op.soft_histogram_backward(grad_n, grad_p, plain, *op_args)

    def loss(loss_fn=fastap.ap_loss):
        value = loss_fn(
            scores, relevance, labels=labels, ref_labels=ref_labels, ignore=ignore, num_bins=q
        )
        return torch.autograd.grad(value, scores)

    def unchecked_loss():
        with fastap.set_value_checks(False):
            loss()

    cuda = device.startswith("cuda")
    result = {
        # (back to back on CUDA, where a single op's launch is comparable to its run time)
        "fwd": (back_to_back_ms if cuda else median_ms)(forward, device, repeats),
        "bwd": (back_to_back_ms if cuda else median_ms)(backward, device, repeats),
        "loss": median_ms(loss, device, repeats),
        "loss_device": back_to_back_ms(unchecked_loss, device, max(1, repeats // 4)),
        # CUDA only (after the warm-ups above); bench_ap_loss.py measures the CPU's resident set.
        "loss_graph": graph_replay_ms(unchecked_loss, max(1, repeats // 4)) if cuda else None,
        "peak_bytes": cuda_peak_extra_bytes(loss) if cuda else None,
        "reference": None,
    }
    if with_reference:
        try:
            result["reference"] = median_ms(
                lambda: loss(fastap.reference.ap_loss), device, max(1, repeats // 5)
            )
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if "out of memory" not in str(error):  # OutOfMemoryError's says so too
                raise
            result["reference"] = "out of memory"
        # (After the except block: its traceback held the reference's partial tensors.)
        if result["reference"] == "out of memory":
            torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", nargs="+", default=["1024x1024", "4096x4096"])
    parser.add_argument("--num-bins", type=int, nargs="+", default=[20])
    parser.add_argument("--dtypes", nargs="+", default=["float32"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--reference-max", type=int, default=2**24, help="largest N*M for it")
    parser.add_argument(
        "--relevance", nargs="+", default=["labels"], choices=["labels", "dense", "ignore"]
    )
    parser.add_argument(
        "--json", help="also write the rows here, after each one, after the rows it holds already"
    )  # fmt: skip
    args = parser.parse_args()
    device = args.device
    copy = copy_bandwidth(device, args.repeats)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    env = {**environment(device), "device": name, "copy_gb_s": copy}
    print(
        f"# {env['date']}, {name}, torch {torch.__version__}, copy bandwidth {copy:.0f} GB/s; "
        f"times in ms (median of {args.repeats}); fwd, bwd: the ops alone (CUDA: back to back); "
        "loss: fastap.ap_loss forward+backward, one call (host overhead and the value checks' sync "
        "included); device: the same back to back without the checks; graph: the same replayed "
        "from a CUDA graph; GB/s = floor bytes / graph (or device); peak: extra memory of one "
        "loss call, against dS; reference: one call, speed-up over loss"
    )
    print(
        "| N x M | relevance | dtype | Q | fwd | bwd | loss | device | graph | GB/s | % of copy "
        "| peak MB (dS MB) | reference | speed-up |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    if args.json and os.path.exists(args.json):  # several runs, one file (benchmarks/gpu_check.sh)
        with open(args.json) as f:
            rows = json.load(f)["rows"]
    for shape in args.shapes:
        n, m = (int(v) for v in shape.split("x"))
        g = torch.Generator(device="cpu").manual_seed(0)
        labels = torch.randint(0, max(2, n // 8), (n,), generator=g).to(device)
        ref_labels = torch.randint(0, max(2, n // 8), (m,), generator=g).to(device)
        for form in args.relevance:
            relevance = ignore = None
            if form == "dense":
                relevance = labels[:, None] == ref_labels[None, :]
            if form == "ignore":
                ignore = torch.rand(n, m, generator=g).lt(1 / 16).to(device)
            for dtype_name in args.dtypes:
                dtype = getattr(torch, dtype_name)
                scores = (2 * torch.rand(n, m, device=device) - 1).to(dtype).requires_grad_()
                for q in args.num_bins:
                    with_reference = n * m <= args.reference_max and dtype != torch.bfloat16
                    r = measure_case(
                        scores, relevance, labels, ref_labels, ignore, q, device, args.repeats,
                        with_reference,
                    )  # fmt: skip
                    floor_bytes = (
                        n * m * (3 * scores.element_size() + (2 if form != "labels" else 0))
                    )
                    graph = r["loss_graph"]
                    achieved = floor_bytes / (graph or r["loss_device"]) / 1e6
                    ref = r["reference"]
                    if ref is None or isinstance(ref, str):  # not run, or out of memory
                        ref_cells = f"{ref or '-'} | -"
                    else:
                        ref_cells = f"{ref:.2f} | {ref / r['loss']:.0f}x"
                    grad_mb = n * m * scores.element_size() / 2**20
                    peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}"
                    print(
                        f"| {n} x {m} | {form} | {dtype_name} | {q} | {r['fwd']:.3f} | "
                        f"{r['bwd']:.3f} | {r['loss']:.3f} | {r['loss_device']:.3f} | "
                        f"{'-' if graph is None else f'{graph:.3f}'} | {achieved:.0f} | "
                        f"{100 * achieved / copy:.0f}% | {peak} ({grad_mb:.0f}) | "
                        f"{ref_cells} |",
                        flush=True,
                    )
                    rows.append(
                        {"n": n, "m": m, "relevance": form, "dtype": dtype_name, "num_bins": q,
                         "floor_bytes": floor_bytes, "copy_gb_s": copy, **r}
                    )  # fmt: skip
                    if args.json:
                        # (env and args: this run's; each row keeps the copy bandwidth of
                        # the run that measured it, the one its GB/s was taken against)
                        data = {"kind": "kernels", "env": env, "args": vars(args), "rows": rows}
                        write_json(args.json, data)
                del scores
            del relevance


if __name__ == "__main__":
    main()
