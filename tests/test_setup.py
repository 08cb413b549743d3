"""setup.py's decisions and messages, before anything is compiled: what a build without torch
(pip's default isolated build) does, and how the CUDA switches are read."""

from __future__ import annotations

import os
import shutil
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

# Loads setup.py's functions without running setup(), then prints cuda_arch_list()'s answer, or
# its error, for each "NAME=VALUE" argument (VALUE empty: neither variable set), in one process.
ARCH_LISTS = """
import os, runpy, setuptools, sys
setuptools.setup = lambda **kwargs: None
cuda_arch_list = runpy.run_path("setup.py")["cuda_arch_list"]
for case in sys.argv[1:]:
    name, value = case.split("=", 1)
    for variable in ("FASTAP_CUDA_ARCH", "TORCH_CUDA_ARCH_LIST"):
        os.environ.pop(variable, None)
    if value:
        os.environ[name] = value
    try:
        print("arches:", cuda_arch_list())
    except RuntimeError as error:
        print("error:", error)
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


def assert_answers(done: subprocess.CompletedProcess, cases: dict) -> None:
    """One line printed for each case, each starting with what the case expects."""
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == len(cases)
    for line, expected in zip(lines, cases.values()):
        assert line.startswith(expected), (line, expected)


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


# Loads setup.py's functions without running setup(), then prints what FASTAP_CUDA=VALUE makes
# of the CUDA kernels (build_cuda()'s answer, or its error) for each VALUE argument.
CUDA_SWITCHES = """
import os, runpy, setuptools, sys
setuptools.setup = lambda **kwargs: None
build_cuda = runpy.run_path("setup.py")["build_cuda"]
for value in sys.argv[1:]:
    os.environ["FASTAP_CUDA"] = value
    try:
        print("build:", build_cuda())
    except RuntimeError as error:
        print("error:", error)
"""


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU-only torch")
def test_cuda_required_with_a_cpu_torch_says_that_torch_is_the_reason():
    cases = {
        "1": f"error: fastap: FASTAP_CUDA=1 but the CUDA kernels cannot be built: torch "
        f"{torch.__version__} is a CPU-only build",
        "yes": "error: fastap: FASTAP_CUDA=1 but",
        "": "build: False",  # empty: as unset, auto (no CUDA torch here)
        "0": "build: False",
        "maybe": "error: FASTAP_CUDA must be 0, 1 or auto, got 'maybe'",
    }
    assert_answers(run(CUDA_SWITCHES, *cases), cases)


@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="needs a machine without a GPU")
def test_cuda_architectures_are_checked_and_needed_without_a_gpu():
    cases = {
        "FASTAP_CUDA_ARCH=9.0a": "arches: 9.0a",
        "FASTAP_CUDA_ARCH=8.0;9.0": "arches: 8.0;9.0",
        "FASTAP_CUDA_ARCH=8.6+PTX Hopper": "arches: 8.6+PTX Hopper",
        "TORCH_CUDA_ARCH_LIST=9.0": "arches: 9.0",
        "FASTAP_CUDA_ARCH=9.0,8.0": "error: fastap: FASTAP_CUDA_ARCH must list compute "
        "capabilities separated by ';'",
        "TORCH_CUDA_ARCH_LIST=sm_90": "error: fastap: TORCH_CUDA_ARCH_LIST must list compute "
        "capabilities separated by ';'",
        # torch would choose the visible GPUs' and fail with an IndexError
        "FASTAP_CUDA_ARCH=": "error: fastap: no GPU is visible to choose the CUDA architectures "
        "from: set FASTAP_CUDA_ARCH",
    }
    assert_answers(run(ARCH_LISTS, *cases), cases)


# Loads setup.py's functions without running setup(), then prints the link flags it gives the
# host compiler, one per line.
LINK_FLAGS = """
import runpy, setuptools
setuptools.setup = lambda **kwargs: None
print("\\n".join(runpy.run_path("setup.py")["host_compiler_flags"]()[1]))
"""

# A function of the C++ library that formats a number: an ostream's insertion of a long.
FORMATS_A_NUMBER = """
#include <sstream>
#include <string>
extern "C" int digits_of(long value) {
  std::ostringstream text;
  text << value;
  return static_cast<int>(text.str().size());
}
"""
LONG_INSERTION = "_ZNSo9_M_insertIlEERSoT_"  # std::ostream::_M_insert<long>, libstdc++'s own


def dynamic_symbols(library: Path, *options: str) -> list:
    done = subprocess.run(["nm", "-D", *options, str(library)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # (without the version: "_ZNSo9_M_insertIlEERSoT_@GLIBCXX_3.4.9" where it is undefined)
    return [line.split()[-1].split("@")[0] for line in done.stdout.splitlines() if line.strip()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="libstdc++ and ELF: Linux")
@pytest.mark.skipif(shutil.which("g++") is None or shutil.which("nm") is None, reason="no g++/nm")
def test_a_compiler_whose_libstdcxx_link_dangles_still_links_the_shared_library(tmp_path):
    """The GPU machine's image has a g++ copied out of its tree (a wrapper passing -B to a copied
    folder) whose libstdc++.so is a dangling relative link: the linker took the libstdc++.a beside
    it, and the extension's C++ error messages crashed. Such a compiler is made here from the
    system's g++, and a small library that formats a number is linked with it: without setup.py's
    link flags it carries libstdc++'s code (the fault, reproduced); with them it takes it from the
    shared library that torch loaded, and formats the number."""
    static_library = subprocess.run(
        ["g++", "-print-file-name=libstdc++.a"], capture_output=True, text=True
    ).stdout.strip()
    if not os.path.isabs(static_library) or not os.path.isfile(static_library):
        pytest.skip("this g++ has no libstdc++.a")
    folder = tmp_path / "copied-compiler"
    folder.mkdir()
    (folder / "libstdc++.a").symlink_to(static_library)
    (folder / "libstdc++.so").symlink_to("../../../x86_64-linux-gnu/libstdc++.so.6")  # dangles
    assert not (folder / "libstdc++.so").exists()
    source = tmp_path / "formats.cpp"
    source.write_text(FORMATS_A_NUMBER)

    def link(name: str, *flags: str) -> Path:
        library = tmp_path / name
        command = ["g++", f"-B{folder}/", "-shared", "-fPIC", "-O1", str(source), *flags]
        done = subprocess.run(
            [*command, "-o", str(library)], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        return library

    fault = link("without.so")
    assert LONG_INSERTION in dynamic_symbols(fault, "--defined-only")  # libstdc++ copied in
    flags = run(LINK_FLAGS)
    assert flags.returncode == 0, flags.stderr
    fixed = link("with.so", *flags.stdout.split())
    assert LONG_INSERTION not in dynamic_symbols(fixed, "--defined-only")
    assert LONG_INSERTION in dynamic_symbols(fixed, "--undefined-only")  # from libstdc++.so.6
    loads = "import ctypes, sys; print(ctypes.CDLL(sys.argv[1]).digits_of(-1234567))"
    done = subprocess.run([sys.executable, "-c", loads, str(fixed)], capture_output=True, text=True)
    assert (done.returncode, done.stdout.strip()) == (0, "8"), done.stderr
