"""Time of `import fastap` in a fresh process, beside `import torch` alone.

Each is a new Python process, timed from its start to its exit (what a script, a test's
subprocess or a DataLoader worker started by "spawn" pays); the median of --repeats, the two
interleaved. Also says whether `import fastap` imported torch._dynamo (over a second on its own,
which fastap leaves to the first use of fastap.distributed and fastap.memory).

    python benchmarks/bench_import.py --repeats 9

The fastap imported is the one Python finds from the current folder (PYTHONPATH for another
checkout).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

STATEMENTS = {
    "import torch": "import torch",
    "import fastap": "import fastap",
}
DYNAMO_CHECK = "import sys, fastap; print('torch._dynamo' in sys.modules)"


def seconds(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9, help="processes of each (median)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    times: dict[str, list[float]] = {name: [] for name in STATEMENTS}
    for _ in range(args.repeats):
        for name, code in STATEMENTS.items():
            times[name].append(seconds(code))
    dynamo = subprocess.run(
        [sys.executable, "-c", DYNAMO_CHECK], check=True, capture_output=True, text=True
    ).stdout.strip()
    import torch

    python = sys.version.split()[0]
    print(f"# torch {torch.__version__}, Python {python}, {args.repeats} processes each")
    print("| statement | median s (process start to exit) |")
    print("|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.2f} |")
    print(f"import fastap imports torch._dynamo: {dynamo}")


if __name__ == "__main__":
    main()
