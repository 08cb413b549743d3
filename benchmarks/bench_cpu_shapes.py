"""The score-matrix loss on other shapes and inputs, each against the regular case:
`fastap.ap_loss` forward + backward to dL/dscores (value checks on, as a training step runs it;
torch.autograd.grad, as the op that made the scores would receive it), the time per
score relative to the regular case, N = M = --size float32 scores with int64 labels and Q = 20
(docs/design.md, section 5, "Other shapes and inputs on the CPU").

The cases run interleaved, one call of each per round after a warm-up of each, so that the
machine's drifts fall on all of them alike; a case's time is the median of its rounds. With
--peak, each case also runs once in a process of its own, which reports the rise of its resident
high-water mark over that call (Linux: /proc/self/clear_refs and VmHWM), beside the size of dS.

    python benchmarks/bench_cpu_shapes.py --size 4096 --rounds 15 --peak
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

import torch
from bench_ap_loss import environment, write_json
from timing import cpu_peak_extra_bytes, time_once_ms, warm_up

import fastap


def regular(n: int, m: int, dtype=torch.float32, seed: int = 0):
    """Scores in (-1, 1) and labels of 10 classes."""
    g = torch.Generator().manual_seed(seed)
    scores = (2 * torch.rand(n, m, generator=g) - 1).to(dtype)
    labels = torch.randint(0, 10, (n,), generator=g)
    ref_labels = torch.randint(0, 10, (m,), generator=g)
    return scores, labels, ref_labels


def case_inputs(name: str, size: int):
    """(scores [N, M] leaf, positional relevance or None, keyword arguments of ap_loss)."""
    n = m = size
    if name == "few rows":
        n, m = 1, size * size
    elif name.startswith("few candidates"):  # also with a variant: "few candidates, tie_aware"
        n, m = size * size // 16, 16
    elif name == "tiny":
        n = m = 8
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
    scores, labels, ref_labels = regular(n, m, dtype.get(name, torch.float32))
    kwargs = dict(labels=labels, ref_labels=ref_labels, num_bins=20)
    relevance = None
    variant = name.split(", ")[-1]
    if variant in ("tie_aware", "tie_aware_simplified"):
        kwargs["variant"] = variant
    if name == "Q = 2":
        kwargs["num_bins"] = 2
    elif "Q = 100" in name:  # also "few candidates, Q = 100" (more bins than candidates)
        kwargs["num_bins"] = 100
    elif name == "int32 labels":
        kwargs.update(labels=labels.int(), ref_labels=ref_labels.int())
    elif name == "strided labels":
        kwargs.update(labels=labels.repeat_interleave(2)[::2])
    elif name.endswith("relevance"):
        relevance = labels[:, None] == ref_labels[None, :]
        relevance = relevance.to({"bool": torch.bool, "uint8": torch.uint8}.get(name.split()[0],
                                 torch.float32))  # fmt: skip
        kwargs = dict(num_bins=20)
    elif name == "bool ignore mask":
        g = torch.Generator().manual_seed(1)
        kwargs["ignore"] = torch.rand(n, m, generator=g) < 1 / 16
    elif name == "transposed scores":
        scores = scores.t().contiguous().t()
    elif name == "sliced scores":
        wider = torch.cat([scores, scores[:, : m // 2]], 1)
        scores = wider[:, :m]
    return scores.requires_grad_(), relevance, kwargs


CASES = [
    "regular",
    "float16",
    "bfloat16",
    "float64",
    "Q = 2",
    "Q = 100",
    "tie_aware",
    "int32 labels",
    "strided labels",
    "bool relevance",
    "uint8 relevance",
    "float32 relevance",
    "bool ignore mask",
    "transposed scores",
    "sliced scores",
    "few rows",
    "few candidates",
    "few candidates, tie_aware",
    "few candidates, tie_aware_simplified",
    "few candidates, Q = 100",
    "few candidates, Q = 100, tie_aware",
    "tiny",
]


def loss_step(scores, relevance, kwargs, held: list):
    """One forward + backward, dL/dscores by torch.autograd.grad: what the op that made the
    scores would receive (a leaf's .grad would add autograd's copy of a strided gradient into the
    leaf's own layout, which a matrix product upstream does not need). The gradient goes into
    `held`, which the caller empties between calls, outside the timing (freeing it is not the
    loss's work)."""

    def step():
        loss = fastap.ap_loss(scores, relevance, **kwargs)
        held.append(torch.autograd.grad(loss, scores)[0])

    return step


def peak_of_one_call(name: str, size: int) -> int:
    """Bytes by which one call raises this process's peak resident set (dS, kept, included)."""
    scores, relevance, kwargs = case_inputs(name, size)
    held: list = []
    loss_step(*case_inputs("tiny", size), held)()  # what a process loads once, not measured
    return cpu_peak_extra_bytes(loss_step(scores, relevance, kwargs, held))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    parser.add_argument("--peak", action="store_true", help="also each case's peak (Linux)")
    parser.add_argument("--peak-of", choices=CASES, help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    if args.peak_of:
        print(peak_of_one_call(args.peak_of, args.size))
        return
    cases = list(dict.fromkeys(["regular", *args.cases]))
    steps, shapes, ds_bytes = {}, {}, {}
    held: list = []
    for name in cases:
        scores, relevance, kwargs = case_inputs(name, args.size)
        step = loss_step(scores, relevance, kwargs, held)
        steps[name] = step
        shapes[name] = tuple(scores.shape)
        ds_bytes[name] = scores.numel() * scores.element_size()

        def warm_step(step=step):
            step()
            held.clear()

        warm_up(warm_step, "cpu")
    times = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name in cases:
            times[name].append(time_once_ms(steps[name], "cpu"))
            held.clear()
    env = environment("cpu")
    print(
        f"# {env['date']}, CPU ({torch.get_num_threads()} threads), torch {torch.__version__}, "
        f"commit {env['commit']}; ap_loss forward + backward, median of {args.rounds} "
        f"interleaved rounds; per score: against the regular case ({args.size} x {args.size} "
        "float32, labels, Q = 20)"
    )
    header = "| case | N x M | ms | per score |" + (" peak MB (dS MB) |" if args.peak else "")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")

    def per_score(name: str) -> float:
        return statistics.median(times[name]) / (shapes[name][0] * shapes[name][1])

    rows = []
    for name in cases:
        ms = statistics.median(times[name])
        row = dict(case=name, n=shapes[name][0], m=shapes[name][1], ms=ms,
                   per_score=per_score(name) / per_score("regular"))  # fmt: skip
        line = f"| {name} | {row['n']} x {row['m']} | {ms:.3g} | {row['per_score']:.2f} |"
        if args.peak:
            child = subprocess.run(
                [sys.executable, __file__, "--size", str(args.size), "--peak-of", name],
                capture_output=True, text=True, check=True, env=os.environ,
            )  # fmt: skip
            row["peak_bytes"] = int(child.stdout.split()[-1])
            line += f" {row['peak_bytes'] / 2**20:.0f} ({ds_bytes[name] / 2**20:.0f}) |"
        rows.append(row)
        print(line, flush=True)
    if args.json:
        write_json(args.json, {"kind": "cpu_shapes", "env": env, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
