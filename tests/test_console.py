"""What a newcomer's first ``python train.py`` prints: the progress and the ``done:`` line, not
library start-up chatter (CUDA stubs, absl, MLflow's schema creation, matplotlib)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import CLI_ENV, REPO

NOISE = ("absl", "cudart", "cuInit", "cpu_feature_guard", "INFO", "database tables", "font cache")


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
    noisy = [line for line in lines if any(word in line for word in NOISE)]
    assert not noisy, noisy
    assert lines[-1].startswith("done: test_accuracy="), lines
    assert any(line.startswith("1/1") or "accuracy:" in line for line in lines[:-1]), lines
