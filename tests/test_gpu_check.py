"""benchmarks/gpu_check.sh's own logic, run here with stand-ins for the GPU machine's programs.

The script runs once per GPU session, in two device calls with no time for a second try, so its
bash (which steps run, in what order, what one step's outcome adds or leaves out after it, the
budget, the hand-over from call 1 to call 2, the summary written after every step) must be right
before it gets there. Here python, nvidia-smi, compute-sanitizer, ncu, nvcc and cuobjdump are one
stand-in (FAKE below) that records each call and answers as a test tells it; the steps' real work
is tested elsewhere (tests/test_benchmarks.py runs the benchmark scripts)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None,
    reason="needs bash and coreutils' timeout",
)

# The stand-in: records "name args [FASTAP_* settings]" in $FAKE_CALLS, then acts on the first of
# $FAKE_RULES (a JSON list of [substring of the call, action]) whose substring the call contains:
# {"exit": n}, {"sleep": s}, {"print": text} and {"write": [path, text]}, any of them together, or
# {"segfault": true} (a read of address 0, after the others).
# nvidia-smi names an H200; nvcc's program is the stand-in again; a benchmark prints a table.
FAKE = """#!{python}
import json, os, sys, time
name = os.path.basename(sys.argv[0])
settings = sorted(f"{{k}}={{v}}" for k, v in os.environ.items()
                  if k in ("FASTAP_WGMMA", "FASTAP_NVCC_FLAGS", "FASTAP_CUDA"))
if os.environ.get("LD_PRELOAD"):
    settings.append("LD_PRELOAD=" + os.path.basename(os.environ["LD_PRELOAD"]))
call = " ".join([name, *sys.argv[1:], *settings])
with open(os.environ["FAKE_CALLS"], "a") as calls:
    calls.write(call + "\\n")
if name == "nvidia-smi":
    print("NVIDIA H200, 580.00, 143771 MiB")
if name == "nvcc":  # (its program: the stand-in again)
    os.symlink(os.path.realpath(sys.argv[0]), sys.argv[sys.argv.index("-o") + 1])
for pattern, action in json.loads(os.environ.get("FAKE_RULES", "[]")):
    if pattern in call:
        if "write" in action:
            path, text = action["write"]
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
        if "print" in action:
            print(action["print"], flush=True)
        if "sleep" in action:
            time.sleep(action["sleep"])
        if action.get("segfault"):
            import ctypes
            ctypes.string_at(0)
        sys.exit(action.get("exit", 0))
if "bench_" in call:
    print("| case | ms |\\n|---|---|\\n| " + name + " | 1.0 |")
"""
PROGRAMS = ("python", "nvidia-smi", "compute-sanitizer", "ncu", "nvcc", "cuobjdump")


class Machine:
    """A copy of the script in a directory of its own, with the stand-ins first on PATH."""

    def __init__(self, root: Path):
        self.repo = root / "repo"
        (self.repo / "benchmarks").mkdir(parents=True)
        for name in ("gpu_check.sh", "crash_backtrace.c"):
            shutil.copy(ROOT / "benchmarks" / name, self.repo / "benchmarks")
        self.bin = root / "bin"
        self.bin.mkdir()
        fake = self.bin / "fake"
        fake.write_text(FAKE.format(python=sys.executable))
        fake.chmod(0o755)
        for program in PROGRAMS:
            (self.bin / program).symlink_to(fake)
        self.out = root / "out"
        self.calls_file = root / "calls.txt"
        self.tmp = root / "tmp"  # (its TMPDIR)
        self.tmp.mkdir()

    def run(self, *args: str, rules=(), env=None, wait=True):
        self.calls_file.write_text("")
        if self.out.exists():
            shutil.rmtree(self.out)
        environment = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("FASTAP_", "WGMMA"))},
            "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}",
            "PYTHON": str(self.bin / "python"),
            "OUT": str(self.out),
            "TMPDIR": str(self.tmp),
            "FAKE_CALLS": str(self.calls_file),
            "FAKE_RULES": json.dumps([list(rule) for rule in rules]),
            **(env or {}),
        }
        command = ["bash", str(self.repo / "benchmarks" / "gpu_check.sh"), *args]
        if not wait:
            return subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, text=True)
        return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=120)

    def scratch(self) -> list[str]:
        """What the script left in its TMPDIR."""
        return sorted(str(path.relative_to(self.tmp)) for path in self.tmp.rglob("*"))

    def calls(self) -> list[str]:
        return self.calls_file.read_text().splitlines()

    def summary(self) -> dict[str, str]:
        """Each step's result in summary.md, in the order the steps ran."""
        text = (self.out / "summary.md").read_text()
        rows = text.split("== summary", 1)[1].splitlines()[2:]
        return {row.split()[0]: row.split()[1] for row in rows if row.strip()}


@pytest.fixture
def machine(tmp_path):
    return Machine(tmp_path)


def python_calls(machine: Machine, needle: str) -> list[str]:
    return [call for call in machine.calls() if call.startswith("python") and needle in call]


def test_call_one_runs_its_steps_in_order_and_tries_the_wgmma_path_once(machine):
    done = machine.run("1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert list(machine.summary().items()) == [
        (step, "ok")
        for step in [
            "build",
            "smoke",
            "smoke_wgmma",
            "tests",
            "tests_wgmma",
            "kernels",
            "variants",
            "embeddings",
        ]
    ]
    summary = (machine.out / "summary.md").read_text()
    assert "wgmma path: ok" in summary
    assert "NVIDIA H200" in summary
    assert "== kernels ==" in summary and "== embeddings ==" in summary
    assert done.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])  # the table is last
    # The build against the machine's torch, with the kernels for sm_90a.
    assert python_calls(machine, "setup.py build_ext --inplace") == [
        "python setup.py build_ext --inplace FASTAP_CUDA=1"
    ]
    # The wgmma path alone once, then in its own test process; the other tests leave it out.
    assert len(python_calls(machine, "--wgmma only")) == 1
    assert len(python_calls(machine, "-k cuda and not wgmma")) == 1
    assert len(python_calls(machine, "-k cuda and wgmma")) == 1
    (d256,) = python_calls(machine, "--dim 256")
    assert "fused_wgmma" in d256
    # Nothing of call 2's.
    assert not [c for c in machine.calls() if c.startswith(("compute-sanitizer", "ncu", "nvcc"))]
    with tarfile.open(machine.out / "logs.tar.gz") as logs:
        names = {Path(name).name for name in logs.getnames()}
    assert {"build.log", "smoke_wgmma.log", "tests.log", "kernels.md", "embeddings.md"} <= names
    assert sorted(p.name for p in machine.out.iterdir()) == ["logs.tar.gz", "summary.md"]
    assert machine.scratch() == []  # (its logs, before they were packed, are gone)


def test_a_wgmma_path_absent_from_the_build_is_left_out_after(machine):
    done = machine.run("1", rules=[("--wgmma only", {"exit": 3})])
    assert done.returncode == 0
    steps = machine.summary()
    assert steps["smoke_wgmma"] == "FAILED(3)"
    assert "tests_wgmma" not in steps and "memcheck_wgmma" not in steps
    assert "wgmma path: off" in (machine.out / "summary.md").read_text()
    (d256,) = python_calls(machine, "--dim 256")
    assert "fused_wgmma" not in d256 and "fused" in d256


def test_a_failing_wgmma_path_is_named_by_memcheck_and_left_out(machine):
    # (memcheck runs the same failing case, and fails too, as it would on the GPU)
    done = machine.run("1", rules=[("sanitizer_case.py --wgmma only", {"exit": 1})])
    assert done.returncode == 0
    steps = machine.summary()
    assert steps["smoke_wgmma"] == "FAILED(1)"
    assert steps["memcheck_wgmma"] == "FAILED(1)"
    assert "tests_wgmma" not in steps
    (memcheck,) = [c for c in machine.calls() if c.startswith("compute-sanitizer")]
    assert "--tool memcheck" in memcheck and "--wgmma only" in memcheck


def test_a_failing_smoke_runs_memcheck_before_the_tests(machine):
    done = machine.run("1", rules=[("--wgmma without", {"exit": 1})])
    assert done.returncode == 0
    steps = list(machine.summary())
    assert steps[:4] == ["build", "smoke", "smoke_wgmma", "memcheck"]
    assert steps.index("memcheck") < steps.index("tests")
    (memcheck,) = [c for c in machine.calls() if c.startswith("compute-sanitizer")]
    assert "--wgmma with" in memcheck  # (the wgmma path passed alone, so memcheck runs it too)


def test_a_failed_fused_test_rebuilds_with_the_api_loads_and_call_two_keeps_that_build(machine):
    failed = "FAILED tests/test_cuda_embeddings.py::test_fused_matches[bf16] - AssertionError"
    # The rebuild leaves the flag in build/, as setup.py's build does in its ninja file.
    flag_file = str(machine.repo / "build" / "build.ninja")
    rules = [
        ("-k cuda and not wgmma", {"print": failed, "exit": 1}),
        (
            "FASTAP_NVCC_FLAGS=-DFASTAP_WMMA_API_ACCESS",
            {"write": [flag_file, "nvcc_flags = -DFASTAP_WMMA_API_ACCESS"]},
        ),
    ]
    done = machine.run("1", rules=rules)
    assert done.returncode == 0
    steps = machine.summary()
    assert steps["tests"] == "FAILED(1)" and steps["api_access"] == "ok"
    assert list(steps).index("api_access") == list(steps).index("tests_wgmma") + 1
    assert python_calls(machine, "tests/test_cuda_embeddings.py -k not wgmma")
    assert (machine.repo / "build" / ".fastap_wmma_api_access").exists()
    # Call 2 on the same machine builds (and so measures) the same extension, and says so.
    done = machine.run("2", "300", env={"WGMMA": "ok"})
    assert done.returncode == 0
    assert python_calls(machine, "setup.py build_ext") == [
        "python setup.py build_ext --inplace FASTAP_CUDA=1 "
        "FASTAP_NVCC_FLAGS=-DFASTAP_WMMA_API_ACCESS"
    ]
    summary = (machine.out / "summary.md").read_text()
    assert "extension built with -DFASTAP_WMMA_API_ACCESS" in summary


CRASHED = (
    "[gw3] node down: Not properly terminated\n"
    "[gw3] [ 65%] FAILED tests/test_cuda_embeddings.py::test_wide[bf16]\n"
    "worker 'gw3' crashed while running 'tests/test_cuda_embeddings.py::test_wide[bf16]'\n"
    "FAILED tests/test_cuda_embeddings.py::test_wide[bf16] - worker 'gw3' crashed"
)


@pytest.mark.parametrize("with_a_failure", [False, True])
def test_a_crashed_fused_test_alone_does_not_rebuild_with_the_api_loads(machine, with_a_failure):
    """A test whose process crashed (xdist's "worker crashed") failed in host code, not in the
    fused kernels' loads: the first GPU run's rebuild for such a crash had every later step
    measure the other extension. A fused test that failed as a test still sets it off."""
    text = CRASHED
    if with_a_failure:
        text += "\nFAILED tests/test_cuda_embeddings.py::test_fused_matches[bf16] - AssertionError"
    done = machine.run("1", rules=[("-k cuda and not wgmma", {"print": text, "exit": 1})])
    assert done.returncode == 0, done.stdout + done.stderr
    steps = machine.summary()
    assert steps["tests"] == "FAILED(1)"
    assert ("api_access" in steps) == with_a_failure
    assert steps["kernels"] == "ok"


@pytest.mark.skipif(shutil.which("gcc") is None, reason="builds crash_backtrace.c with gcc")
def test_a_crash_writes_its_native_frames_to_the_log(machine):
    """benchmarks/crash_backtrace.c, preloaded into the smoke and test processes: a segmentation
    fault there leaves the native frames in the step's log, after faulthandler's Python ones."""
    done = machine.run("1", rules=[("sanitizer_case.py --wgmma without", {"segfault": True})])
    assert done.returncode == 0, done.stdout + done.stderr
    assert machine.summary()["smoke"].startswith("FAILED(")
    with tarfile.open(machine.out / "logs.tar.gz") as logs:
        member = next(m for m in logs.getmembers() if m.name.endswith("smoke.log"))
        log = logs.extractfile(member).read().decode()
    assert "crash_backtrace: signal 11" in log
    assert "libc.so" in log and "crash_backtrace: #1 " in log
    # Preloaded into the smoke and test processes, not into the sanitizers', which handle the
    # process's signals themselves (memcheck runs here because the smoke failed).
    preload = "LD_PRELOAD=crash_backtrace.so"
    for needle in ("--wgmma without", "-m pytest"):
        calls = python_calls(machine, needle)
        assert calls and all(preload in call for call in calls), (needle, calls)
    sanitizers = [c for c in machine.calls() if c.startswith("compute-sanitizer")]
    assert sanitizers and not any(preload in call for call in sanitizers)


def test_api_access_fails_when_the_rebuild_drops_the_flag(machine):
    failed = "FAILED tests/test_cuda_embeddings.py::test_fused_matches[bf16] - AssertionError"
    done = machine.run("1", rules=[("-k cuda and not wgmma", {"print": failed, "exit": 1})])
    assert done.returncode == 0
    assert machine.summary()["api_access"] == "FAILED(1)"
    assert not (machine.repo / "build" / ".fastap_wmma_api_access").exists()


def test_call_two_runs_the_rest_with_call_ones_wgmma_outcome(machine):
    done = machine.run("2", "300", env={"WGMMA": "ok"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert list(machine.summary().items()) == [
        (step, "ok")
        for step in [
            "build",
            "memcheck",
            "racecheck",
            "sass",
            "probe",
            "profile",
            "loss",
            "example",
        ]
    ]
    assert not python_calls(machine, "--wgmma only")  # (call 1 tried it)
    sanitizers = [c for c in machine.calls() if c.startswith("compute-sanitizer")]
    assert len(sanitizers) == 2 and all("--wgmma with" in c for c in sanitizers)
    (probe,) = [c for c in machine.calls() if c.startswith("nvcc")]
    assert "arch=compute_90a,code=sm_90a benchmarks/mma_probe.cu" in probe
    assert "mma_probe" in machine.calls()  # (and ran what it built)
    profiles = [c for c in machine.calls() if c.startswith("ncu")]
    assert len(profiles) == 3 and profiles[-1].endswith("--embeddings FASTAP_WGMMA=1")
    assert all("--clock-control none" in c for c in profiles)

    done = machine.run("2", "300", env={"WGMMA": "off"})
    assert done.returncode == 0
    assert len([c for c in machine.calls() if c.startswith("ncu")]) == 2
    assert all("--wgmma without" in c for c in machine.calls() if c.startswith("compute-sanitizer"))


def test_a_step_is_held_to_what_is_left_of_the_budget_and_none_starts_late(machine):
    # 27 s: the build's 240 s limit becomes 11 or 12 s (what is left less 15), so a build that
    # hangs is ended there; with under 25 s left no step starts; the summary still comes back.
    start = time.monotonic()
    done = machine.run("2", "27", env={"WGMMA": "ok"}, rules=[("setup.py", {"sleep": 100})])
    assert time.monotonic() - start < 24
    assert done.returncode == 0
    steps = machine.summary()
    assert steps.pop("build") in ("TIMEOUT(11s)", "TIMEOUT(12s)")
    assert set(steps.values()) == {"SKIPPED(budget)"} and len(steps) == 7
    assert not [c for c in machine.calls() if c.startswith(("compute-sanitizer", "ncu"))]


def test_steps_call_one_had_no_time_for_go_on_to_call_two(machine):
    # Call 1 in 30 s with a smoke step of 6: under 25 s are left after it, so the tests and the
    # benchmarks are skipped; call 2 runs them, after its sanitizers and before its profiles.
    done = machine.run("1", env={"BUDGET": "30"}, rules=[("--wgmma without", {"sleep": 6})])
    assert done.returncode == 0
    steps = machine.summary()
    assert steps["smoke"] == "ok" and steps["tests"] == "SKIPPED(budget)"
    carried = (machine.repo / "build" / ".gpu_check_carried").read_text().split()
    assert carried == ["tests", "kernels", "variants", "embeddings"]
    done = machine.run("2", "300", env={"WGMMA": "off"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "carried from call 1: tests kernels variants embeddings" in done.stdout
    assert list(machine.summary()) == [
        "build",
        "memcheck",
        "racecheck",
        "tests",
        "kernels",
        "variants",
        "embeddings",
        "sass",
        "probe",
        "profile",
        "loss",
        "example",
    ]
    assert set(machine.summary().values()) == {"ok"}
    # A call 1 that runs to its end leaves nothing to carry.
    machine.run("1")
    assert (machine.repo / "build" / ".gpu_check_carried").read_text().split() == []
    done = machine.run("2", "300", env={"WGMMA": "ok"})
    assert "carried from call 1" not in done.stdout
    assert "tests" not in machine.summary()


def test_a_call_ended_from_outside_keeps_its_summary(machine):
    process = machine.run("1", rules=[("-k cuda and not wgmma", {"sleep": 60})], wait=False)
    deadline = time.monotonic() + 60
    while not python_calls(machine, "-k cuda and not wgmma"):
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 143
    steps = machine.summary()
    assert steps["build"] == "ok" and steps["tests"] == "INTERRUPTED"
    assert "kernels" not in steps
    assert machine.scratch() == []


def test_carried_wheels_go_to_a_site_of_the_runs_own_that_goes_with_it(machine):
    (machine.repo / ".whl").mkdir()
    (machine.repo / ".whl" / "peer-1.0-py3-none-any.whl").write_text("")
    done = machine.run("2", "300", env={"WGMMA": "ok"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "carried wheels: peer-1.0-py3-none-any.whl" in done.stdout
    (install,) = python_calls(machine, "pip install")
    assert "--no-index --no-deps" in install
    target = install.split("--target ", 1)[1].split()[0]
    assert Path(target).parent.parent == machine.tmp
    # The example wrote its output under the same directory; nothing of either is left.
    (example,) = python_calls(machine, "examples/train.py")
    assert Path(example.split("--out ", 1)[1].split()[0]).parent == Path(target).parent
    assert machine.scratch() == []


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["3"], {}, "usage"),
        (["2", "soon"], {}, "BUDGET must be whole seconds"),
        (["2", "300"], {"WGMMA": "maybe"}, "WGMMA must be ok, failed or off"),
    ],
)
def test_bad_arguments_are_refused_before_anything_runs(machine, args, env, message):
    done = machine.run(*args, env=env)
    assert done.returncode == 2
    assert message in done.stderr
    assert machine.calls() == []
