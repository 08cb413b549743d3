"""The training example (examples/train.py) runs end to end, writes its plot and report, and
resumes from its checkpoints instead of training again."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "train.py"
ROW = re.compile(
    r"^\| (\w+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$",
    re.MULTILINE,
)


def run_example(out: Path, *extra: str) -> str:
    command = [sys.executable, str(EXAMPLE), "--out", str(out), "--batch-size", "128"]
    result = subprocess.run(
        [*command, "--loss", "fastap,triplet", *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def results(text: str) -> dict[str, tuple[float, ...]]:
    return {m[0]: tuple(float(v) for v in m[1:]) for m in ROW.findall(text)}


def test_train_example_runs_reports_and_resumes(tmp_path):
    out = tmp_path / "run"
    first = run_example(out, "--epochs", "1")
    assert "fastap     epoch   1/1" in first and "triplet    epoch   1/1" in first
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    table = results(report)
    assert set(table) == {"fastap", "triplet"}
    for epochs, map_before, map_after, r1_before, r1_after, seconds in table.values():
        assert epochs == 1
        assert all(0 < v <= 1 for v in (map_before, map_after, r1_before, r1_after))
        assert seconds >= 0
    assert table["fastap"][1] == table["triplet"][1]  # same initial weights: same start
    assert results(first) == table  # the table printed is the table of the report

    # Same --out, same settings: both losses are finished, nothing is trained again.
    second = run_example(out, "--epochs", "1")
    assert second.count("not trained again") == 2
    assert "epoch   1/1" not in second
    assert results(second) == table

    # More epochs: each loss resumes after its first epoch and trains only the second.
    third = run_example(out, "--epochs", "2")
    assert "fastap: resuming" in third and "after epoch 1/2" in third
    assert "epoch   1/2" not in third and "epoch   0/2" not in third
    assert "fastap     epoch   2/2" in third and "triplet    epoch   2/2" in third
    resumed = results(third)
    assert {name: row[0] for name, row in resumed.items()} == {"fastap": 2, "triplet": 2}
    assert {name: row[1] for name, row in resumed.items()} == {
        name: row[1] for name, row in table.items()
    }


@pytest.mark.parametrize(
    "option, message",
    [
        (("--data", "no/such/folder"), "--data: no/such/folder is not a directory"),
        (("--device", "nonsense"), "--device nonsense: "),
        (("--device", "meta"), "--device meta: a meta device holds no data"),
        (("--batch-size", "1"), "--batch-size is too small"),
        (("--batch-size", "16"), "--batch-size must be at least twice --samples-per-class"),
        (("--lr", "-1"), "--lr must be a positive number, got -1.0"),
        (("--margin", "nan"), "--margin must be a non-negative number, got nan"),
        (("--image-size", "0"), "--image-size must be at least 1"),
        (("--num-bins", "2000000"), "--num-bins: at most 2^20"),
        (("--seed", str(2**64)), "--seed must be in [0, 2^63)"),
        (("--out", "/proc/no/such"), "--out /proc/no/such: "),
        (("--loss", "fastap,fastap"), "--loss: a comma-separated list of distinct names"),
    ]
    + ([] if torch.cuda.is_available() else [(("--device", "cuda"), "--device cuda: ")]),
)
def test_train_example_refuses_bad_options_before_any_work(
    tmp_path, monkeypatch, capsys, option, message
):
    # (its argument parsing in this process: a subprocess each took seconds of torch's import)
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE)])  # (argparse names the program after it)
    with pytest.raises(SystemExit) as exited:
        load_script(EXAMPLE).parse_args(["--out", str(out), *option])
    assert exited.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"train.py: error: {message}") and len(last) < 300, last
    assert not out.exists()  # (nothing written, no data loaded)


def load_script(path: Path):
    """An example script as a module (its main() not run)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "option, message",
    [
        (("--steps", "-5"), "--steps must not be negative, got -5"),
        (("--batch-size", "1"), "--batch-size must be at least 2, got 1"),
        (("--device", "nonsense"), "--device nonsense: "),
    ],
)
def test_quickstart_refuses_bad_options(monkeypatch, capsys, option, message):
    quickstart = ROOT / "examples" / "quickstart.py"
    monkeypatch.setattr(sys, "argv", [str(quickstart), *option])
    with pytest.raises(SystemExit) as exited:
        load_script(quickstart).main()
    assert exited.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"quickstart.py: error: {message}")
