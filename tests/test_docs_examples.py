"""The examples the README shows: its one-screen example prints exactly what the README shows
under it, and examples/quickstart.py trains (held-out mAP rises well above its start)."""

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def example_and_output() -> tuple[str, str]:
    section = README.read_text(encoding="utf-8").split("\n## Example\n", 1)[1]
    found = re.search(r"```python\n(.*?)```\s*\nprints\s*\n\s*```\n(.*?)```", section, re.S)
    assert found, "README.md: the Example section needs a python block, 'prints', and the output"
    return found.group(1), found.group(2)


def test_readme_example_prints_its_documented_output():
    code, expected = example_and_output()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, f"{README.name} (Example)", "exec"), {"__name__": "__main__"})
    assert printed.getvalue() == expected


def test_quickstart_trains():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--steps", "100"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    held_out = [float(v) for v in re.findall(r"held-out mAP ([\d.]+)", result.stdout)]
    assert len(held_out) == 2, result.stdout  # before training and after step 100
    assert held_out[0] < 0.2 and held_out[1] > 0.5, result.stdout
