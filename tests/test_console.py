"""What a newcomer's first ``python train.py`` prints: the devices, the progress and the
``done:`` line, not the libraries' start-up chatter (MLflow's schema creation, matplotlib's font
cache, Python-level INFO logs). TensorFlow's native start-up lines are its own to print: they
are written before its log level applies, and hiding them (stderr to /dev/null) would also hide
a broken CUDA set-up on a GPU machine."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import CLI_ENV, REPO

NOISE = ("INFO", "database tables", "font cache", "cpu_feature_guard")
# What TensorFlow 2.21 writes natively before its log level applies (absl not yet initialised).
TENSORFLOW_NATIVE = ("absl::InitializeLog", "I0000 ", "W0000 ", "E0000 ")


@pytest.mark.slow
def test_a_first_run_prints_only_progress_and_the_done_line(tmp_path):
    env = {k: v for k, v in CLI_ENV.items() if k not in ("TF_CPP_MIN_LOG_LEVEL",)}
    env.pop("MLFLOW_LOGGING_LEVEL", None)
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "train.py"),
            "trainer.epochs=1",
            "trainer.verbose=2",
            "tracking.log_model=false",
            "model.layers=[{filters:4,pool:max}]",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,  # a fresh folder: the store is created on this run
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "mlflow.db").is_file()
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    native = [line for line in lines if any(word in line for word in TENSORFLOW_NATIVE)]
    ours = [line for line in lines if line not in native]
    noisy = [line for line in ours if any(word in line for word in NOISE)]
    assert not noisy, noisy
    assert ours[0].startswith("devices: 1 replica on ") and "CPU:0" in ours[0], ours
    assert ours[-1].startswith("done: test_accuracy="), ours
    assert any(line.startswith("1/1") or "accuracy:" in line for line in ours[:-1]), ours
