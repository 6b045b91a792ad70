"""The suite's own harness: a test worker that dies (an abort in TensorFlow's native code, a
segfault) fails the run at once, naming the test, instead of hanging it."""

import os
import re
import subprocess
import sys
import time

import pytest
from conftest import REPO

CRASH = "CONVNETS_TEST_WORKER_CRASH"  # opt-in: only the nested run below sets it
crash_only = pytest.mark.skipif(os.environ.get(CRASH) != "1", reason=f"runs with {CRASH}=1 only")


@crash_only
@pytest.mark.xdist_group("crash")
def test_worker_crash():
    time.sleep(0.5)
    os.abort()


@crash_only
@pytest.mark.xdist_group("crash")
@pytest.mark.parametrize("i", range(3))
def test_grouped_with_the_crash(i):
    time.sleep(0.5)


@crash_only
@pytest.mark.parametrize("i", range(4))
def test_elsewhere(i):
    time.sleep(0.5)


@pytest.mark.skipif(os.environ.get(CRASH) == "1", reason="not inside its own nested run")
def test_a_crashed_worker_fails_the_run_promptly():
    """The project's pytest configuration (pyproject.toml) on two workers: the worker that
    aborts is not replaced (xdist's replacement left the run idle forever); the run ends
    failed, names the test, and still runs the tests of other workers. (The tests queued behind
    the crash in its own xdist group are not run: the run has failed anyway.)"""
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/test_harness.py", "-p", "no:cacheprovider"]
        + ["--numprocesses=2", "--durations=0"],
        cwd=REPO,
        env={**os.environ, CRASH: "1", "PYTEST_ADDOPTS": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - start
    assert result.returncode == 1, result.stdout[-3000:]
    assert "crashed while running 'tests/test_harness.py::test_worker_crash" in result.stdout
    assert elapsed < 60
    tail = result.stdout.strip().splitlines()[-1]
    # the other worker's tests ran; which ones it had depends on the scheduling
    assert re.search(r"1 failed, [1-7] passed", tail), tail
