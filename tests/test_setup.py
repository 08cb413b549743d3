"""setup.py's decisions and messages, before anything is compiled: what a build without torch
(pip's default isolated build) does, and how the CUDA switches are read."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

# Runs setup.py with the given arguments, with torch made unimportable (as in an isolated build
# environment that does not have it) when the first argument says so.
RUN_SETUP = """
import runpy, sys
if sys.argv[1] == "no-torch":
    sys.modules["torch"] = None  # import torch then raises ImportError
sys.argv = ["setup.py", *sys.argv[2:]]
runpy.run_path("setup.py", run_name="__main__")
"""

# Loads setup.py's functions without running setup(), then prints cuda_arch_list()'s answer.
ARCH_LIST = """
import runpy, setuptools
setuptools.setup = lambda **kwargs: None
print("arches:", runpy.run_path("setup.py")["cuda_arch_list"]())
"""


def run(code: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "FASTAP_CUDA": "0", **env}
    for name in ("FASTAP_CUDA_ARCH", "TORCH_CUDA_ARCH_LIST"):
        if name not in env:
            environment.pop(name, None)
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_build_without_torch_stops_and_says_how_to_build():
    for command in ("bdist_wheel", "build_ext", "editable_wheel", "develop", "install"):
        done = run(RUN_SETUP, "no-torch", command)
        assert done.returncode != 0
        assert "building fastap needs torch in the environment that builds it" in done.stderr
        assert "pip install --no-build-isolation ." in done.stderr


def test_metadata_and_sdist_need_no_torch(tmp_path):
    """What pip's isolated environment runs before a build, and `python -m build --sdist`."""
    done = run(RUN_SETUP, "no-torch", "--version")
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "0.1.0"
    done = run(RUN_SETUP, "no-torch", "egg_info", "--egg-base", str(tmp_path))
    assert done.returncode == 0, done.stderr
    requires = (tmp_path / "fastap.egg-info" / "requires.txt").read_text().splitlines()
    assert requires[:2] == ["torch>=2.5", "numpy"]
    # With torch, the requirement is the minor version built against.
    done = run(RUN_SETUP, "torch", "egg_info", "--egg-base", str(tmp_path))
    assert done.returncode == 0, done.stderr
    requires = (tmp_path / "fastap.egg-info" / "requires.txt").read_text().splitlines()
    major, minor = torch.__version__.split(".")[:2]
    assert requires[0] == f"torch=={major}.{minor}.*"


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU-only torch")
def test_cuda_required_with_a_cpu_torch_says_that_torch_is_the_reason():
    for on in ("1", "yes"):
        done = run(RUN_SETUP, "torch", "--version", FASTAP_CUDA=on)
        assert done.returncode != 0
        assert f"torch {torch.__version__} is a CPU-only build" in done.stderr
    done = run(RUN_SETUP, "torch", "--version", FASTAP_CUDA="")  # empty: as unset, auto
    assert done.returncode == 0, done.stderr
    done = run(RUN_SETUP, "torch", "--version", FASTAP_CUDA="maybe")
    assert "FASTAP_CUDA must be 0, 1 or auto, got 'maybe'" in done.stderr


@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="needs a machine without a GPU")
def test_cuda_architectures_are_checked_and_needed_without_a_gpu():
    for value, expected in (("9.0a", "9.0a"), ("8.0;9.0", "8.0;9.0"), ("8.6+PTX Hopper", None)):
        done = run(ARCH_LIST, FASTAP_CUDA_ARCH=value)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"arches: {expected or value}"
    done = run(ARCH_LIST, TORCH_CUDA_ARCH_LIST="9.0")
    assert done.stdout.strip() == "arches: 9.0"
    for name, value in (("FASTAP_CUDA_ARCH", "9.0,8.0"), ("TORCH_CUDA_ARCH_LIST", "sm_90")):
        done = run(ARCH_LIST, **{name: value})
        assert f"{name} must list compute capabilities separated by ';'" in done.stderr
    done = run(ARCH_LIST)  # torch would choose the visible GPUs' and fail with an IndexError
    assert "no GPU is visible to choose the CUDA architectures from: set FASTAP_CUDA_ARCH" in (
        done.stderr
    )
