"""Summarises `ptxas -v` output (from nvcc -Xptxas -v) per kernel: registers and spills, and
fails when a kernel that must not spill does, or when any kernel has static shared memory.

The launchers (csrc/cuda/*.cu) raise the limit of dynamic shared memory of each kernel that uses
it to the device's whole opt-in limit (cudaFuncAttributeMaxDynamicSharedMemorySize), which CUDA
accepts only while that limit plus the kernel's static shared memory fits: one `__shared__` array
in such a kernel would make its every launch fail on the GPU. No kernel needs one, so none may
have one (one rule, without a list of the kernels it concerns).

Usage: python .ci/ptxas_report.py LOG [LOG ...] [--no-spills REGEX]
The logs are nvcc's stderr; lines that are not ptxas's report are ignored. Kernel names are
demangled with c++filt where it is installed and shortened to the template they instantiate.
"""

import argparse
import re
import shutil
import subprocess
import sys

ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\w+)'")
SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
REGISTERS = re.compile(r"Used (\d+) registers")
STATIC_SHARED = re.compile(r"(\d+) bytes smem")


def parse(text):
    """[{name (mangled), arch, registers, stores, loads (spill bytes), smem (static shared
    bytes)}], in the log's order."""
    kernels, current = [], None
    for line in text.splitlines():
        if m := ENTRY.search(line):
            current = {"name": m.group(1), "arch": m.group(2), "stores": 0, "loads": 0, "smem": 0}
            kernels.append(current)
        elif current is not None and (m := SPILLS.search(line)):
            current["stores"], current["loads"] = int(m.group(2)), int(m.group(3))
        elif current is not None and (m := REGISTERS.search(line)):
            current["registers"] = int(m.group(1))
            if m := STATIC_SHARED.search(line):
                current["smem"] = int(m.group(1))
    return kernels


def demangle(names):
    if not names or shutil.which("c++filt") is None:
        return list(names)
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    return out.stdout.splitlines()


def short(name):
    # "void fastap::embedding::k<__half, true>(args...)" -> "embedding::k<__half, true>"
    name = re.sub(r"^void ", "", name)
    name = name.split("(", 1)[0]
    return name.removeprefix("fastap::")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+")
    parser.add_argument("--no-spills", default=None, help="kernels (regex) that must not spill")
    args = parser.parse_args()
    kernels = []
    for path in args.logs:
        with open(path) as f:
            kernels += parse(f.read())
    names = demangle([k["name"] for k in kernels])
    rows = sorted(zip((short(n) for n in names), kernels), key=lambda row: row[0])
    print(f"{'kernel':72s} {'arch':6s} {'regs':>4s} {'spill st/ld (B)':>15s}")
    failures, static_shared = [], []
    for name, k in rows:
        spills = f"{k['stores']}/{k['loads']}"
        print(f"{name[:72]:72s} {k['arch']:6s} {k.get('registers', '?'):>4} {spills:>15s}")
        if args.no_spills and re.search(args.no_spills, name) and (k["stores"] or k["loads"]):
            failures.append(name)
        if k["smem"]:
            static_shared.append(f"{name} ({k['smem']} B, {k['arch']})")
    if not kernels:
        sys.exit("error: no ptxas report in the logs (was nvcc run with -Xptxas -v?)")
    if failures:
        sys.exit(f"error: these kernels must not spill registers: {', '.join(failures)}")
    if static_shared:
        sys.exit(
            "error: static shared memory, which the launchers' dynamic limit (the device's whole "
            f"opt-in limit) leaves no room for: {', '.join(static_shared)}"
        )


if __name__ == "__main__":
    main()
