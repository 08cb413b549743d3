import faulthandler
import os
import sys
import tempfile
import zlib

# Set before torch loads its OpenMP runtime, which reads it once. Each pytest-xdist worker (and
# each suite CI runs beside another) has torch's whole thread pool, one thread per core, so the
# threads outnumber the cores; by default an OpenMP thread that runs out of work spins on its core
# for a while before it sleeps, holding that core from the other workers' threads: 6 files of the
# suite took 36 s with 59 s of CPU on 2 cores, and 30 s with 48 s when the threads sleep at once.
# (Only the waiting changes, not what is computed; an OMP_WAIT_POLICY already set is kept.)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=60,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=300)
# A long random search (docs/design.md, section 6): 4000 examples a test, 1333 for the emulation's.
settings.register_profile(
    "search", deadline=None, max_examples=4000, suppress_health_check=list(HealthCheck)
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _seeded_rng(request):
    # Each test draws from torch's generator seeded by its own id, so a failure on CI replays
    # here with the same numbers, and no test's outcome depends on the tests that ran before it.
    # FASTAP_TEST_SEED=k draws other numbers (a sweep over k finds tests that pass by luck).
    salt = os.environ.get("FASTAP_TEST_SEED", "")
    torch.manual_seed(zlib.crc32((salt + request.node.nodeid).encode()))


@pytest.fixture(autouse=True)
def _time_limit():
    # FASTAP_TEST_TIMEOUT=s (benchmarks/gpu_check.sh sets it): a test still running after s seconds
    # (a kernel that never returns) prints every thread's stack, which names the test, and ends
    # the run, instead of holding the whole GPU step until its limit.
    seconds = float(os.environ.get("FASTAP_TEST_TIMEOUT", "0"))
    if seconds <= 0:
        yield
        return
    faulthandler.dump_traceback_later(seconds, exit=True, file=sys.__stderr__)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def machine_memory():
    """For a test that takes much of the machine's memory (tests/test_large_index.py: about 11 GB
    on the CPU): it holds a lock machine-wide while it runs, so that no two such tests hold their
    memory at once, whether in two pytest-xdist workers or in two suites run side by side (CI runs
    the oldest torch's suite beside the README's). Where fcntl is missing (Windows), no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(os.path.join(tempfile.gettempdir(), "fastap-tests-machine-memory.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
