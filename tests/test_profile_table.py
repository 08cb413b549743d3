"""benchmarks/profile_table.py, which condenses Nsight Compute's CSV in the GPU check, on a CSV
of ncu's details-page format written here (the GPU machine is the only place ncu runs)."""

import csv
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "profile_table.py"
FORWARD = "void fastap::soft_histogram_kernel<c10::BFloat16, float, true, false>(...)"
BACKWARD = "void fastap::soft_histogram_backward_kernel<float, float, true, false>(...)"


def write_profile(path, launches):
    fields = ["ID", "Process ID", "Kernel Name", "Section Name", "Metric Name", "Metric Unit",
              "Metric Value"]  # fmt: skip
    with open(path, "w", newline="") as f:
        f.write("==PROF== Connected to process 1234\n")  # ncu's own lines come first
        writer = csv.DictWriter(f, fieldnames=fields, quoting=csv.QUOTE_ALL)
        writer.writeheader()
        for launch_id, (name, metrics) in enumerate(launches):
            for metric, (unit, value) in metrics.items():
                writer.writerow({"ID": launch_id, "Process ID": 1234, "Kernel Name": name,
                                 "Section Name": "s", "Metric Name": metric, "Metric Unit": unit,
                                 "Metric Value": value})  # fmt: skip


def run(path, candidates, *extra):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(path), "--candidates", str(candidates), *extra],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return result


def kernel_labels(path, names, *extra) -> tuple[str, list[str]]:
    """The first line printed and each row's kernel label, for a profile of the named kernels."""
    write_profile(path, [(name, {"Duration": ("usecond", "1.0")}) for name in names])
    result = run(path, 32, *extra)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    rows = [line.split(" | ")[0].removeprefix("| ") for line in lines if line.startswith("| ")]
    return lines[0], rows[1:]  # (less the header row)


def test_one_row_per_kernel_in_launch_order(tmp_path):
    path = tmp_path / "profile.csv"
    write_profile(path, [
        (FORWARD, {"Duration": ("msecond", "0.05"), "DRAM Throughput": ("%", "61.5"),
                   "L1/TEX Cache Throughput": ("%", "92.25"), "Executed Instructions":
                   ("inst", "1,600")}),
        (BACKWARD, {"Duration": ("usecond", "130.0"), "Registers Per Thread": ("", "40")}),
    ])  # fmt: skip
    result = run(path, 64 * 32)  # 64 groups of 32 candidates
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert rows[1].split(" | ")[:4] == ["| forward bf16 fast", "50.0", "61.5", "92.2"]
    assert rows[1].rstrip(" |").endswith("25.0")  # 1600 instructions / 64 groups of 32
    backward = [cell.strip() for cell in rows[2].strip("| ").split(" | ")]
    assert backward[0] == "backward fp32 fast"
    assert backward[1] == "130.0" and backward[7] == "40.0" and backward[8] == "-"


def test_a_file_without_the_table_fails_and_shows_its_end(tmp_path):
    path = tmp_path / "profile.csv"
    path.write_text("==ERROR== the profiler could not connect\n")
    result = run(path, 1)
    assert result.returncode == 1
    assert "could not connect" in result.stdout and "no ncu table" in result.stderr


def test_fused_kernels_are_named_by_pass(tmp_path):
    path = tmp_path / "profile.csv"
    kernel = "void fastap::embedding::embedding_histogram"
    names = [
        f"{kernel}_kernel<__nv_bfloat16, false>(...)",
        f"{kernel}_backward_kernel<__nv_bfloat16, true, false>(...)",
        f"{kernel}_backward_kernel<float, false, false>(...)",
        f"{kernel}_kernel<__half, true>(...)",
        f"{kernel}_backward_kernel<__nv_bfloat16, true, true>(...)",
        f"{kernel}_backward_kernel<__nv_bfloat16, false, true>(...)",
    ]
    title, rows = kernel_labels(path, names, "--title", "fused, 64^2")
    assert title == "### fused, 64^2"
    expected = [
        "fused forward bf16",
        "fused backward bf16 dQ",
        "fused backward fp32 dDB",
        "fused forward fp16 (wgmma)",
        "fused backward bf16 dQ (wgmma)",
        "fused backward bf16 dDB (wgmma)",
    ]
    assert rows == expected


def test_kernel_names_as_ncu_prints_them_on_the_gpu(tmp_path):
    """ncu prints a kernel's bool template arguments as 1 and 0: the names below are those of the
    H200 run's CSVs (2026-12-04), whose tables came out labelled "general" for the fast kernels
    and "dDB" for every fused backward, without "(wgmma)", when only true and false were read."""
    path = tmp_path / "profile.csv"
    names = [
        "void soft_histogram_kernel<float, float, 1, 0>(const T1 *, long, ...)",
        "void soft_histogram_backward_kernel<c10::BFloat16, float, 1, 0>(const T1 *, ...)",
        "void soft_histogram_kernel<float, float, 0, 1>(const T1 *, long, ...)",
        "void embedding_histogram_kernel<__nv_bfloat16, 0>(const T1 *, long, ...)",
        "void embedding_histogram_backward_kernel<__nv_bfloat16, 1, 0>(const T1 *, long, ...)",
        "void embedding_histogram_backward_kernel<__nv_bfloat16, 0, 1>(const T1 *, long, ...)",
        "void embedding_histogram_kernel<__nv_bfloat16, 1>(const T1 *, long, ...)",
    ]
    _, rows = kernel_labels(path, names)
    expected = [
        "forward fp32 fast",
        "backward bf16 fast",
        "forward fp32 general",
        "fused forward bf16",
        "fused backward bf16 dQ",
        "fused backward bf16 dDB (wgmma)",
        "fused forward bf16 (wgmma)",
    ]
    assert rows == expected


def test_abbreviated_time_units(tmp_path):
    """Newer ncu releases (2025.x, the GPU machine's) abbreviate the units: ms, us, ns."""
    path = tmp_path / "profile.csv"
    write_profile(path, [
        (FORWARD, {"Duration": ("ms", "1.25")}),
        (BACKWARD, {"Duration": ("ns", "900")}),
        (FORWARD, {"Duration": ("us", "7.5")}),
    ])  # fmt: skip
    result = run(path, 1)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    durations = [row.split(" | ")[1] for row in rows[1:]]
    assert durations == ["1250.0", "0.9", "7.5"]


def test_values_ncu_could_not_collect_are_dashes(tmp_path):
    """ncu prints "n/a" for a metric it could not collect: that cell is a dash, the rest stays."""
    path = tmp_path / "profile.csv"
    write_profile(path, [
        (FORWARD, {"Duration": ("us", "n/a"), "DRAM Throughput": ("%", "61.5"),
                   "Executed Instructions": ("inst", "n/a")}),
    ])  # fmt: skip
    result = run(path, 1)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    cells = [cell.strip() for cell in rows[1].strip("| ").split(" | ")]
    assert cells[1] == "-" and cells[2] == "61.5" and cells[-1] == "-"
