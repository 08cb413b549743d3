"""Builds fastap and its extension fastap._C.

The C++ (CPU) kernels are always built. The CUDA kernels are built when a CUDA toolkit is found
(CUDA_HOME / nvcc) and the installed torch is a CUDA build; this is decided from the toolkit, never
from torch.cuda.is_available(), so a GPU-less build host still builds them (for the architectures
it is told: FASTAP_CUDA_ARCH). Switches:
  FASTAP_CUDA=1   build the CUDA kernels or fail (no toolkit or a CPU-only torch is an error)
  FASTAP_CUDA=0   CPU kernels only (unset or empty: auto, as above)
  FASTAP_CUDA_ARCH  e.g. "9.0" or "8.0;9.0" (else TORCH_CUDA_ARCH_LIST, else torch's default, the
                  visible GPUs': so one of them is needed where none is visible);
                  "9.0a" also builds the fused kernels' wgmma path (FASTAP_WGMMA=1 picks it)
  FASTAP_NVCC_FLAGS  more nvcc flags, separated by spaces (e.g. "-lineinfo" for a profile)
  CUDA_HOME       the toolkit (else the one the nvcc on PATH belongs to, as nvcc reports it)
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile


def cuda_switch() -> str:
    """FASTAP_CUDA as "on", "off" or "auto" (also where it is set but empty)."""
    switch = os.environ.get("FASTAP_CUDA", "").strip().lower() or "auto"
    if switch in ("1", "on", "yes", "true"):
        return "on"
    if switch in ("0", "off", "no", "false"):
        return "off"
    if switch != "auto":
        raise RuntimeError(f"FASTAP_CUDA must be 0, 1 or auto, got {switch!r}")
    return "auto"


def toolkit_of_nvcc_on_path():
    """The CUDA toolkit folder of the nvcc on PATH, as nvcc itself reports it, or None.

    torch takes the parent of nvcc's folder as CUDA_HOME when CUDA_HOME is not set; where nvcc is
    a wrapper script outside its toolkit (/usr/local/bin/nvcc, say) that folder has no CUDA
    libraries and the link fails (cannot find -lcudart). `nvcc -dryrun` prints where it runs."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or not shutil.which("nvcc"):
        return None
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "empty.cu")
        open(source, "w").close()
        try:
            run = subprocess.run(
                ["nvcc", "-dryrun", "-c", source, "-o", os.path.join(folder, "empty.o")],
                capture_output=True,
                text=True,
                timeout=60,
            )
        except (OSError, subprocess.SubprocessError):
            return None
    for line in (run.stdout + run.stderr).splitlines():
        if line.startswith("#$ _HERE_="):
            return os.path.dirname(os.path.normpath(line.split("=", 1)[1].strip()))
    return None


if cuda_switch() != "off":
    _toolkit = toolkit_of_nvcc_on_path()
    if _toolkit:
        os.environ["CUDA_HOME"] = _toolkit  # read by torch.utils.cpp_extension when imported

from setuptools import find_packages, setup  # noqa: E402

# The commands that build or install, which need torch (any other, as the metadata and the source
# distribution, goes without, for the requirement torch>=2.5: pip's isolated build environment,
# its default, asks for them before it builds, and `python -m build --sdist` runs sdist there).
# torch is deliberately not among the build requirements of pyproject.toml, so that such an
# environment does not fetch a torch of its own.
BUILD_COMMANDS = ("build", "bdist", "install", "develop", "editable")

try:
    import torch
    from torch.utils.cpp_extension import (
        CUDA_HOME,
        BuildExtension,
        CppExtension,
        CUDAExtension,
    )
except ImportError:
    if any(arg.startswith(BUILD_COMMANDS) for arg in sys.argv[1:]):
        sys.exit(
            "fastap: building fastap needs torch in the environment that builds it: its "
            "extension is compiled against that torch's headers, and the package then requires "
            "that torch version. Install torch first (pip install torch==<version>), then build "
            "without pip's build isolation, which would hide it: pip install "
            "--no-build-isolation . (or -e . in a checkout)."
        )
    torch = None

ROOT = os.path.dirname(os.path.abspath(__file__))


def build_cuda() -> bool:
    switch = cuda_switch()
    found = CUDA_HOME is not None and torch.version.cuda is not None
    if switch == "on" and not found:
        # (torch's CUDA_HOME is None with a CPU-only torch whatever the toolkit: say which lacks)
        toolkit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or shutil.which("nvcc")
        reasons = []
        if torch.version.cuda is None:
            reasons.append(
                f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None): "
                "install a CUDA build of torch"
            )
        if not toolkit:
            reasons.append("no CUDA toolkit was found: set CUDA_HOME, or put nvcc on PATH")
        elif CUDA_HOME is None and torch.version.cuda is not None:
            reasons.append(f"torch found no CUDA toolkit at {toolkit}")
        raise RuntimeError(
            "fastap: FASTAP_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(reasons)
        )
    return switch == "on" or (switch == "auto" and found)


#: A compute capability (8.0, 9.0a, 10.0f), or one of torch's names for a generation (Hopper),
#: with +PTX for the PTX too: the entries of FASTAP_CUDA_ARCH / TORCH_CUDA_ARCH_LIST.
ARCH_ENTRY = re.compile(r"(\d+\.\d+[af]?|[A-Za-z]+)(\+PTX)?")


def cuda_arch_list() -> str:
    """The architectures to build the CUDA kernels for (TORCH_CUDA_ARCH_LIST's form): from
    FASTAP_CUDA_ARCH, else TORCH_CUDA_ARCH_LIST, else torch's default, the GPUs of this machine;
    without a GPU there is none, and torch's choice fails with an IndexError: an error here
    names the variable to set instead."""
    name = "FASTAP_CUDA_ARCH" if os.environ.get("FASTAP_CUDA_ARCH") else "TORCH_CUDA_ARCH_LIST"
    arches = os.environ.get(name, "").strip()
    if not arches:
        if torch.cuda.device_count() == 0:
            raise RuntimeError(
                "fastap: no GPU is visible to choose the CUDA architectures from: set "
                "FASTAP_CUDA_ARCH to those of the GPUs to run on (e.g. '8.0;9.0', or '9.0a' for "
                "an H100/H200 with the wgmma path), or FASTAP_CUDA=0 for the CPU kernels alone"
            )
        return ""
    entries = arches.replace(" ", ";").split(";")
    if not all(ARCH_ENTRY.fullmatch(entry) for entry in entries if entry):
        raise RuntimeError(
            f"fastap: {name} must list compute capabilities separated by ';' or spaces (e.g. "
            f"'8.0;9.0', '9.0a', '8.6+PTX'), got {arches!r}"
        )
    return arches


def nvcc_extra_flags() -> list:
    """FASTAP_NVCC_FLAGS, split on whitespace; and FASTAP_BUILD_WGMMA where the architectures
    include 9.0a (the fused kernels' wgmma path, csrc/cuda/wgmma.cuh)."""
    flags = os.environ.get("FASTAP_NVCC_FLAGS", "").split()
    arches = os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(" ", ";").split(";")
    if any(arch.strip().startswith("9.0a") for arch in arches):
        flags.append("-DFASTAP_BUILD_WGMMA")
    return flags


def loaded_libstdcxx():
    """The path of the C++ standard library (libstdc++) that this process loaded with torch, on
    Linux; None where there is none (another platform, another C++ library) or it is not known.

    The extension links it by that path (host_compiler_flags). A compiler copied out of its own
    tree can hold a libstdc++.so that is a dangling link (its relative target was not copied: seen
    on the GPU machine's image, /opt/gcc, whose g++ passes -B to that copied folder); the linker
    then takes libstdc++.a, which sits beside it, and the extension carries a copy of the C++
    library of its own whose locale nobody initialised. Every number in a C++ error message went
    through that copy: there an error of the CUDA ops crashed the process (a segmentation fault
    in std::ostream::_M_insert<long>), here the number went missing from the message. Named by
    its path, the library torch runs with is the one linked, dynamically, whatever the compiler's
    own folder holds (tests/test_setup.py builds with such a compiler)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            for line in maps:
                path = line.split(maxsplit=5)[-1].strip()
                if os.path.basename(path).startswith("libstdc++.so") and os.path.isfile(path):
                    return path
    except OSError:
        pass
    return None


def host_compiler_flags() -> tuple:
    """(compile flags, link flags) of the C++ compiler for this platform.

    The CPU kernels split their rows with at::parallel_for, which runs in parallel only where the
    extension is compiled with the OpenMP of torch's own parallel backend: -fopenmp with gcc
    (Linux, what CI builds), /openmp with MSVC (Windows). Apple's clang has no -fopenmp; there,
    and where torch's backend is not OpenMP, the build goes without it and the CPU kernels run on
    one thread (same results)."""
    msvc = sys.platform == "win32"
    # -fwrapv: CPython's own builds pass it to extensions, and GCC 12 vectorises the CPU
    # backward's first pass for float16 scores with an ignore mask only with it (signed overflow
    # defined); it is named here so that the kernels do not depend on how Python was built.
    # -ffp-contract=off: no multiply and add fused into one rounding where the programme has two.
    # g++ fuses by default wherever the target has FMA (in C++ even in ISO mode: AVX-512, every
    # aarch64), and so does clang: fused, the CPU row formula's lanes (csrc/cpu/ap_formula.cpp)
    # gave other bits than the single rows (tests/test_native_lanes.py builds them every way).
    # -Wno-psabi: g++ notes for each function that passes 32 or 64 bytes of those lanes by value
    # that GCC 4.5 passed them otherwise; none of them crosses a library boundary.
    compile_flags = ["/O2"] if msvc else ["-O3", "-fwrapv", "-ffp-contract=off", "-Wno-psabi"]
    link_flags = []
    openmp = "parallel backend: OpenMP" in torch.__config__.parallel_info()
    if openmp and sys.platform != "darwin":
        compile_flags.append("/openmp" if msvc else "-fopenmp")
        if not msvc:
            link_flags.append("-fopenmp")
    else:
        print("fastap: no OpenMP: the CPU kernels will run on one thread", file=sys.stderr)
    libstdcxx = None if msvc else loaded_libstdcxx()
    if libstdcxx:
        link_flags.append(libstdcxx)
    return compile_flags, link_flags


def extension():
    sources = [*sorted(glob.glob("csrc/*.cpp")), *sorted(glob.glob("csrc/cpu/*.cpp"))]
    cxx_flags, link_flags = host_compiler_flags()
    if not build_cuda():
        return CppExtension(
            "fastap._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    arches = cuda_arch_list()
    if arches:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arches
    return CUDAExtension(
        "fastap._C",
        # (the launchers, .cu, for nvcc; their torch side, cuda_ops.cpp, for the host compiler)
        sources + sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu")),
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", "--expt-relaxed-constexpr", *nvcc_extra_flags()],
        },
        extra_link_args=link_flags,
    )


def torch_requirement() -> str:
    """The torch this build compiles fastap._C against, to its minor version: the compiled
    extension loads only with the torch whose headers and ABI it was built with, so a wheel (or
    an install from source) tells pip that, and a later torch upgrade says the extension needs a
    rebuild instead of failing at import."""
    if torch is None:  # (metadata or an sdist alone: BUILD_COMMANDS)
        return "torch>=2.5"
    major, minor = torch.__version__.split(".")[:2]
    if (int(major), int(minor)) < (2, 5):
        raise RuntimeError(f"fastap needs torch >= 2.5 to build against, found {torch.__version__}")
    return f"torch=={major}.{minor}.*"


setup(
    name="fastap",
    version="0.1.0",
    description="Listwise Average Precision loss for PyTorch with fused C++/CUDA kernels",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["fastap", "fastap.*"]),
    package_data={"fastap": ["py.typed"]},  # typed (PEP 561)
    ext_modules=[] if torch is None else [extension()],
    cmdclass={} if torch is None else {"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=[torch_requirement(), "numpy"],
    # pytorch-metric-learning: the FastAPLoss parity tests; scikit-learn and matplotlib: the
    # training example test (each skipped where it is not installed)
    extras_require={
        "test": [
            "pytest",
            "pytest-xdist",
            "hypothesis",
            "ruff",
            "mypy",
            "ninja",
            "pytorch-metric-learning",
            "scikit-learn",
            "matplotlib",
        ],
        "bench": ["matplotlib", "pytorch-metric-learning"],
        # examples/train.py: the digits data set and the plot (pillow only for --data)
        "examples": ["scikit-learn", "matplotlib"],
    },
    zip_safe=False,
)
