"""The benchmark scripts start, and roofline.py's smallest run prints its JSON summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = (
    "pipeline.py",
    "overhead.py",
    "sweep.py",
    "roofline.py",
    "failfast.py",
    "search.py",
    "onednn.py",
)


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=BENCHMARKS.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    proc = _run(str(BENCHMARKS / script), "--help", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout


@pytest.mark.slow
def test_roofline_smoke_prints_summary():
    proc = _run(str(BENCHMARKS / "roofline.py"), "--smoke", timeout=180)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["peak_flops"] > 0
    assert summary["precision"] == "float32" and summary["jit"] is False
    (stack,) = summary["stacks"].values()
    for key in ("images_per_sec", "macs_per_image", "achieved_flops", "fraction_of_peak"):
        assert stack[key] > 0, key
