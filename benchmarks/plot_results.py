"""Plot a benchmark JSON (from bench_ap_loss.py, bench_embeddings.py or bench_kernels.py --json)
as time and peak memory against N; a case that ran out of memory is a dotted vertical line at the
first N where it did. Of bench_kernels.py's rows, the square ones with labels at Q = 20.

python benchmarks/plot_results.py benchmarks/results/cpu_q20_fp32.json docs/images/bench_cpu.png
"""

from __future__ import annotations

import argparse
import json

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
        ("reference", "reference (score matrix, N x Q x N)", "C5", "--"),
        ("pml", "PML FastAPLoss", "C3", "--"),
    ],
    "kernels": [
        ("float32", "fastap.ap_loss, fp32 (device time)", "C0", "-"),
        ("float32_eager", "fastap.ap_loss, fp32 (one eager call)", "C0", ":"),
        ("bfloat16", "fastap.ap_loss, bf16 (device time)", "C2", "-"),
        ("reference", "reference.ap_loss, fp32 (N x Q x M)", "C1", "-"),
        ("floor", "floor: read S twice, write dS (fp32), at copy bandwidth", "k", ":"),
        ("dS", "memory of dS (fp32)", "k", ":"),
    ],
}


def kernel_rows(data: dict) -> list[dict]:
    """bench_kernels.py's square, labels, Q = 20 rows as one row per N with a result per series."""
    by_n: dict[int, dict] = {}
    for r in data["rows"]:
        if r["n"] != r["m"] or r["relevance"] != "labels" or r["num_bins"] != 20:
            continue
        row = by_n.setdefault(r["n"], {"n": r["n"]})
        # (the device's time: from a CUDA graph where one was captured)
        device_ms = r.get("loss_graph") or r["loss_device"]
        row[r["dtype"]] = {"ms": device_ms, "peak_bytes": r["peak_bytes"]}
        if r["dtype"] == "float32":
            row["float32_eager"] = {"ms": r["loss"]}
            copy_gb_s = r.get("copy_gb_s", data["env"]["copy_gb_s"])  # (its own run's)
            row["floor"] = {"ms": r["floor_bytes"] / copy_gb_s / 1e6}
            row["dS"] = {"peak_bytes": r["n"] * r["m"] * 4}
            ref = r["reference"]
            if ref is not None:
                row["reference"] = {"ms": ref} if ref != "out of memory" else {"error": ref}
    return [by_n[n] for n in sorted(by_n)]


def main(path: str, out: str) -> None:
    with open(path) as f:
        data = json.load(f)
    env, rows = data["env"], data["rows"]
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    kind = data.get("kind", "scores")
    if kind == "kernels":
        rows = kernel_rows(data)
    for key, label, color, style in SERIES[kind]:
        out_of_memory = [r["n"] for r in rows if "out of memory" in r.get(key, {}).get("error", "")]
        if out_of_memory:  # the first N at which it ran out
            ax_time.axvline(
                min(out_of_memory), color=color, linestyle=":", label=f"{label}: out of memory"
            )
        times = [(r["n"], r[key]["ms"]) for r in rows if "ms" in r.get(key, {})]
        if times:
            ax_time.plot(*zip(*times), style, color=color, marker="o", label=label)
        memory = [
            (r["n"], r[key]["peak_bytes"] / 2**20)
            for r in rows
            if r.get(key, {}).get("peak_bytes") is not None
        ]
        if memory:  # labelled here when the time plot has no line of it
            ax_mem.plot(*zip(*memory), style, color=color, marker="o",
                        label=None if times else label)  # fmt: skip
    for ax, ylabel in ((ax_time, "forward + backward (ms)"), (ax_mem, "peak extra memory (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N = M")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_time.legend(fontsize=8)
    if ax_mem.get_legend_handles_labels()[0]:
        ax_mem.legend(fontsize=8)
    args = data["args"]
    if kind == "kernels":
        what = "score-matrix op (fastap.ap_loss), labels, Q = 20"
    else:
        dim = f", D = {args['dim']}" if "dim" in args else ""
        what = f"AP loss, {args['dtype']}, Q = {args['num_bins']}{dim}"
    fig.suptitle(
        f"{what}: {env['device']}, torch {env['torch']}, commit {env['commit']}, {env['date']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", help="a benchmark's JSON results")
    parser.add_argument("png", help="where to write the plot")
    args = parser.parse_args()
    main(args.json, args.png)
