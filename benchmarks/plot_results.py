"""Plot a benchmark JSON (from bench_ap_loss.py --json or bench_embeddings.py --json) as time
and peak memory against N; a case that ran out of memory is a dotted vertical line at that N.

python benchmarks/plot_results.py benchmarks/results/cpu_q20_fp32.json docs/images/bench_cpu.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

SERIES = {
    "scores": [
        ("fastap", "fastap.ap_loss (scores)", "C0", "-"),
        ("reference", "reference.ap_loss (scores, N x Q x M)", "C1", "-"),
        ("fastap_emb", "fastap.FastAPLoss (embeddings)", "C0", "--"),
        ("pml", "PML FastAPLoss (embeddings)", "C3", "--"),
    ],
    "embeddings": [
        ("matrix", "fastap.APLoss (score matrix)", "C1", "-"),
        ("blockwise", "from embeddings, blockwise", "C2", "--"),
        ("fused", "from embeddings, fused kernel", "C0", "-"),
        ("fused_wgmma", "fused, on wgmma", "C4", "-."),
        ("floor", "4 matmuls (floor)", "k", ":"),
    ],
}


def main(path: str, out: str) -> None:
    with open(path) as f:
        data = json.load(f)
    env, rows = data["env"], data["rows"]
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    kind = data.get("kind", "scores")
    for key, label, color, style in SERIES[kind]:
        for r in rows:
            if "out of memory" in r.get(key, {}).get("error", ""):
                ax_time.axvline(r["n"], color=color, linestyle=":", label=f"{label}: out of memory")
        points = [(r["n"], r[key]) for r in rows if key in r and "ms" in r[key]]
        if not points:
            continue
        ns = [n for n, _ in points]
        ax_time.plot(ns, [m["ms"] for _, m in points], style, color=color, marker="o", label=label)
        mem = [(n, m["peak_bytes"] / 2**20) for n, m in points if "peak_bytes" in m]
        ax_mem.plot([n for n, _ in mem], [v for _, v in mem], style, color=color, marker="o")
    for ax, ylabel in ((ax_time, "forward + backward (ms)"), (ax_mem, "peak extra memory (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N = M")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_time.legend(fontsize=8)
    args = data["args"]
    dim = f", D = {args['dim']}" if "dim" in args else ""
    fig.suptitle(
        f"AP loss, {args['dtype']}, Q = {args['num_bins']}{dim}: {env['device']}, "
        f"torch {env['torch']}, commit {env['commit']}, {env['date']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
