"""The benchmark scripts that benchmarks/gpu_check.sh runs on the GPU machine, run here on the CPU
at toy sizes: a Python error in one of them then fails CI instead of costing the GPU session a
step. The figures themselves are not checked (the CPU's are in benchmarks/RESULTS.md), only that
the scripts run, write the rows they promise, and that plot_results.py draws them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def python(*argv: str) -> subprocess.CompletedProcess:
    """Python with these arguments in benchmarks/, which (and the repository) it imports from."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCHMARKS.parent), str(BENCHMARKS)])}
    return subprocess.run(
        [sys.executable, *argv],
        cwd=BENCHMARKS,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def run(script: str, *args: str) -> str:
    done = python(str(BENCHMARKS / script), *args)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def table_rows(output: str) -> list[list[str]]:
    """The cells of a markdown table's body rows."""
    return [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in output.splitlines()
        if line.startswith("| ") and not line.startswith("|---")
    ][1:]


# Runs every script given with --help in this one process (a process each took seconds of torch's
# import), printing the exit code of each.
HELP_OF_EACH = """
import contextlib, io, runpy, sys
for script in sys.argv[1:]:
    sys.argv = [script, "--help"]
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            runpy.run_path(script, run_name="__main__")
        code = "no exit"
    except SystemExit as exited:
        code = exited.code
    print(script, code, printed.getvalue().startswith("usage:"))
"""


def test_every_script_explains_its_arguments():
    """--help prints a usage and exits 0 before any work (plot_results.py once failed on it with
    a TypeError from its positional arguments)."""
    scripts = sorted(p.name for p in BENCHMARKS.glob("*.py") if "__main__" in p.read_text())
    assert len(scripts) >= 9
    done = python("-c", HELP_OF_EACH, *scripts)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.splitlines() == [f"{script} 0 True" for script in scripts]


def plot(path: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    image = tmp_path / "plot.png"
    run("plot_results.py", str(path), str(image))
    assert image.stat().st_size > 10_000


def test_bench_kernels_appends_its_rows_and_plots(tmp_path):
    results = tmp_path / "kernels.json"
    common = ("--repeats", "2", "--json", str(results))
    run("bench_kernels.py", "--shapes", "40x48", "64x64", "--dtypes", "float32", "bfloat16",
        *common)  # fmt: skip
    out = run("bench_kernels.py", "--shapes", "32x64", "--relevance", "dense", "ignore",
              "--reference-max", "0", *common)  # fmt: skip
    assert len(table_rows(out)) == 2
    rows = json.loads(results.read_text())["rows"]
    assert [(r["n"], r["m"], r["dtype"], r["relevance"]) for r in rows] == [
        (40, 48, "float32", "labels"),
        (40, 48, "bfloat16", "labels"),
        (64, 64, "float32", "labels"),
        (64, 64, "bfloat16", "labels"),
        (32, 64, "float32", "dense"),
        (32, 64, "float32", "ignore"),
    ]
    for r in rows:
        assert min(r["fwd"], r["bwd"], r["loss"], r["loss_device"]) > 0
        element = 4 if r["dtype"] == "float32" else 2
        mask = 2 if r["relevance"] in ("dense", "ignore") else 0  # a bool N x M matrix, read twice
        assert r["floor_bytes"] == r["n"] * r["m"] * (3 * element + mask)
        assert r["peak_bytes"] is None  # measured on CUDA only
    # The reference in fp32 within --reference-max, never in bf16, not at all with 0.
    assert [r["reference"] is not None for r in rows] == [True, False, True, False, False, False]
    plot(results, tmp_path)


def test_bench_embeddings_runs_its_cases_and_the_peers(tmp_path):
    results = tmp_path / "embeddings.json"
    cases = ["matrix", "reference"]
    out = run("bench_embeddings.py", "--sizes", "48", "80", "--dim", "12", "--repeats", "2",
              "--peer-max", "48", "--cases", *cases, "--json", str(results))  # fmt: skip
    assert [row[0] for row in table_rows(out)] == ["48", "80"]
    rows = json.loads(results.read_text())["rows"]
    assert set(rows[0]) == {"n", *cases}
    assert set(rows[1]) == {"n", "matrix"}  # the reference: not run above --peer-max
    assert "not run (--peer-max)" in out
    for row in rows:
        for case in set(row) - {"n"}:
            assert row[case]["ms"] > 0 and row[case]["peak_bytes"] >= 0, row[case]
    plot(results, tmp_path)


def test_bench_ap_loss_measures_fastap(tmp_path):
    results = tmp_path / "loss.json"
    run("bench_ap_loss.py", "--sizes", "48", "--reference-max", "0", "--repeats", "2",
        "--json", str(results))  # fmt: skip
    (row,) = json.loads(results.read_text())["rows"]
    assert row["fastap"]["ms"] > 0 and row["fastap"]["peak_bytes"] >= 0, row["fastap"]
    assert row["reference"] == {"error": "skipped (--reference-max)"}
    plot(results, tmp_path)


def test_bench_variants_and_ap_formula_run():
    out = run("bench_variants.py", "--n", "64", "--dim", "8", "--repeats", "2")
    assert len(table_rows(out)) >= 4
    out = run("bench_ap_formula.py", "--rows", "16", "40", "--repeats", "2")
    assert len(table_rows(out)) >= 2


def test_bench_import_times_both_and_says_whether_dynamo_came_with_fastap():
    out = run("bench_import.py", "--repeats", "1")
    assert [row[0] for row in table_rows(out)] == ["import torch", "import fastap"]
    assert all(float(row[1]) > 0 for row in table_rows(out))
    assert "import fastap imports torch._dynamo: False" in out


def test_bench_cpu_shapes_runs_each_case_against_the_regular_one(tmp_path):
    results = tmp_path / "shapes.json"
    peak = ("--peak",) if os.access("/proc/self/clear_refs", os.W_OK) else ()
    out = run("bench_cpu_shapes.py", "--size", "32", "--rounds", "2", "--cases", "float16",
              "few candidates", "transposed scores", *peak, "--json", str(results))  # fmt: skip
    assert [row[0] for row in table_rows(out)] == [
        "regular", "float16", "few candidates", "transposed scores",
    ]  # fmt: skip
    rows = json.loads(results.read_text())["rows"]
    assert [(r["n"], r["m"]) for r in rows] == [(32, 32), (32, 32), (64, 16), (32, 32)]
    assert rows[0]["per_score"] == 1.0 and all(r["ms"] > 0 for r in rows)
    if peak:
        assert all(r["peak_bytes"] >= 0 for r in rows)


def test_bench_cpu_shapes_cases_name_their_shape_and_variant():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_cpu_shapes
    finally:
        sys.path.remove(str(BENCHMARKS))
    for name, shape, variant in [
        ("regular", (8, 8), None),
        ("tie_aware", (8, 8), "tie_aware"),
        ("few candidates", (4, 16), None),
        ("few candidates, tie_aware", (4, 16), "tie_aware"),
        ("few candidates, tie_aware_simplified", (4, 16), "tie_aware_simplified"),
        ("few candidates, Q = 100", (4, 16), None),
        ("few candidates, Q = 100, tie_aware", (4, 16), "tie_aware"),
    ]:
        scores, relevance, kwargs = bench_cpu_shapes.case_inputs(name, 8)
        assert scores.shape == shape and relevance is None
        assert kwargs.get("variant") == variant, name
        assert kwargs["num_bins"] == (100 if "Q = 100" in name else 20), name


def test_warm_up_bounds(monkeypatch):
    """timing.warm_up: on the CPU a second of calls, at least one and at most 100; on CUDA 0.2 s
    of calls, each synchronised, at least one and at most 10,000."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import timing
    finally:
        sys.path.remove(str(BENCHMARKS))
    clock = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    calls: list[str] = []

    def call(seconds: float):
        def fn():
            calls.append("call")
            clock[0] += seconds

        return fn

    timing.warm_up(call(0.001), "cpu")
    assert len(calls) == 100
    calls.clear()
    timing.warm_up(call(0.3), "cpu")
    assert len(calls) == 4  # 0.3, 0.6, 0.9, 1.2 s
    calls.clear()
    timing.warm_up(call(5.0), "cpu")
    assert len(calls) == 1
    calls.clear()
    monkeypatch.setattr(timing.torch.cuda, "synchronize", lambda: calls.append("sync"))
    timing.warm_up(call(0.03), "cuda")
    assert calls == ["call", "sync"] * 7  # 0.21 s
    calls.clear()
    timing.warm_up(call(0.4), "cuda")
    assert calls == ["call", "sync"]
    calls.clear()
    timing.warm_up(call(1e-5), "cuda")
    assert calls == ["call", "sync"] * 10_000
