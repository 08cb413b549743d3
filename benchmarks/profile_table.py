"""Condenses Nsight Compute's CSV (`ncu --csv --page details`, the `profile` step of
benchmarks/gpu_check.sh over benchmarks/profile_case.py) into one row per kernel: time, the
throughput of DRAM, of L1/shared memory and of the SM as a share of their peaks, how busy the
issue slots were, occupancy, registers, and the warp instructions executed per 32 candidates,
which is what .ci/sass_report.py predicts from the SASS (its hot block plus the work around it).
Whichever unit sits near 100% binds (docs/design.md, section 5, says which we expect).

Usage: python benchmarks/profile_table.py PROFILE_CSV [--candidates N_TIMES_M] [--title TEXT]
"""

from __future__ import annotations

import argparse
import csv
import io
import sys

# (column, metric name in ncu's details page)
COLUMNS = (
    ("us", "Duration"),
    ("DRAM %", "DRAM Throughput"),
    ("L1/shared %", "L1/TEX Cache Throughput"),
    ("SM %", "Compute (SM) Throughput"),
    ("issue busy %", "Issue Slots Busy"),
    ("occupancy %", "Achieved Occupancy"),
    ("regs", "Registers Per Thread"),
)
# ncu's time units, in microseconds: older releases spell them out, newer ones (2025.x) abbreviate.
TIME_UNITS = {
    "nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6,
    "ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6,
}  # fmt: skip


def number(text: str) -> float | None:
    """A metric's value; None for what ncu prints where it could not collect one ("n/a")."""
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def kernels(rows):
    """{launch id: (kernel name, {metric: (unit, value)})} in launch order."""
    found = {}
    for row in rows:
        metrics = found.setdefault(row["ID"], (row["Kernel Name"], {}))[1]
        metrics[row["Metric Name"]] = (row.get("Metric Unit", ""), row["Metric Value"])
    return found


DTYPES = (
    ("BFloat16", "bf16"),
    ("bfloat16", "bf16"),
    ("Half", "fp16"),
    ("half", "fp16"),
    ("double", "fp64"),
    ("float", "fp32"),
)


def template_arguments(name: str) -> list[str]:
    """A kernel's template arguments, its flags as "true" and "false": ncu prints a bool
    argument as 1 or 0 (2026-12-04, on the H200: soft_histogram_kernel<float, float, 1, 0>),
    cuobjdump and the sources as true or false."""
    if "<" not in name:
        return []
    args = name[name.index("<") + 1 : name.index(">")].split(",")
    return [{"1": "true", "0": "false"}.get(arg.strip(), arg.strip()) for arg in args]


def short(name: str) -> str:
    dtype = next((label for key, label in DTYPES if key in name), "?")
    args = template_arguments(name)
    if "embedding_histogram" in name:
        # the fused kernels: <dtype[, wgmma]> and <dtype, own is query[, wgmma]>
        if "backward" not in name:
            wgmma = len(args) > 1 and args[1] == "true"
            return f"fused forward {dtype}" + (" (wgmma)" if wgmma else "")
        wgmma = len(args) > 2 and args[2] == "true"
        own = "dQ" if len(args) > 1 and args[1] == "true" else "dDB"
        return f"fused backward {dtype} {own}" + (" (wgmma)" if wgmma else "")
    # the score-matrix kernels: <scalar, accumulator, kFast, kDense>
    op = "backward" if "backward" in name else "forward"
    path = "fast" if args[-2:] == ["true", "false"] else "general"
    return f"{op} {dtype} {path}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv")
    parser.add_argument("--candidates", type=float, default=8192.0 * 8192.0)
    parser.add_argument("--title", help="a heading printed above the table")
    args = parser.parse_args()
    with open(args.csv) as f:
        text = f.read()
    start = text.find('"ID"')  # ncu may print its own lines before the table
    if start < 0:
        print(text[-2000:])
        print("no ncu table in the file", file=sys.stderr)
        return 1
    found = kernels(csv.DictReader(io.StringIO(text[start:])))
    if args.title:
        print(f"### {args.title}")
    header = ["kernel", *(c for c, _ in COLUMNS), "instr / 32 cand"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, metrics in found.values():
        cells = [short(name)]
        for _, metric in COLUMNS:
            unit, text = metrics.get(metric, ("", ""))
            value = number(text)
            if value is None:
                cells.append("-")
                continue
            scale = TIME_UNITS.get(unit, 1.0) if metric == "Duration" else 1.0
            cells.append(f"{value * scale:.1f}")
        executed = number(metrics.get("Executed Instructions", ("", ""))[1])
        cells.append("-" if executed is None else f"{executed / (args.candidates / 32):.1f}")
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
