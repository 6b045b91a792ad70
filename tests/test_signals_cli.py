"""Preemption through the real CLI: SIGTERM and SIGHUP (what Slurm, Kubernetes and a closed
terminal send) stop a run as Ctrl-C does: the checkpoint kept, the run KILLED with the signal's
name, the resume command printed, exit status 128 + the signal; resume then finishes it."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from conftest import signal_after_epochs, sqlite_store, start_training
from mlflow.tracking import MlflowClient

import convnets

TINY = "model.layers=[{filters:8},{filters:8,pool:max}]"


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_stop_signal_ends_the_run_killed_and_resume_finishes_it(tmp_path, stop):
    uri = sqlite_store(tmp_path)
    client = MlflowClient(uri)  # the schema exists before the training opens the store
    proc = start_training(
        TINY,
        "trainer.epochs=30",
        "trainer.verbose=0",
        f"tracking.uri={uri}",
        f"hydra.run.dir={tmp_path / 'out'}",
    )
    run_id, stderr = signal_after_epochs(proc, tmp_path / "out", 2, stop)
    assert proc.returncode == 128 + stop, stderr[-3000:]
    assert "Traceback" not in stderr
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["failure_reason"] == f"interrupted ({stop.name})"
    checkpoint = Path(run.data.tags["checkpoint_dir"])
    epoch = json.loads((checkpoint / "state.json").read_text())["epoch"]
    assert epoch >= 2
    [line] = [x for x in stderr.splitlines() if x.startswith("interrupted")]
    assert line == (
        f"interrupted by {stop.name}: run {run_id} recorded KILLED; checkpoint kept in "
        f"{checkpoint}; continue with: python train.py resume={run_id} tracking.uri={uri}"
    )
    if stop != signal.SIGTERM:
        return
    # The stop needed a process; the resume that finishes the run trains in this one.
    resumed = convnets.train(
        [f"resume={run_id}", f"tracking.uri={uri}", "trainer.verbose=0"],
        output_dir=tmp_path / "resumed",
    )
    assert resumed.run_id == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert "failure_reason" not in run.data.tags  # the reason it stopped no longer holds
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert sorted(steps) == list(range(1, 31))  # every epoch once: the resume went on


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "fresh_process"])
def test_a_stopped_sweep_ends_its_parent_killed_like_its_job(tmp_path, launcher):
    """SIGTERM reaches the sweep's process alone: a job in a process of its own gets it from
    the sweep (it was treated as Ctrl-C: exit 130, the job ended by a KeyboardInterrupt)."""
    uri = sqlite_store(tmp_path)
    client = MlflowClient(uri)  # the schema exists before the training opens the store
    proc = start_training(
        "-m",
        f"hydra/launcher={launcher}",
        TINY,
        "trainer.epochs=40",
        "trainer.verbose=0",
        "trainer.seed=0,1",
        f"tracking.uri={uri}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    try:
        deadline = time.monotonic() + 240
        # The first job has committed its first epoch's checkpoint (the training writes it;
        # the store's metrics could lag behind under load, see signal_after_epochs).
        while not list((tmp_path / "sweep").glob("*/checkpoints/*/state.json")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143
    runs = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
    [job] = [r for r in runs if r.data.tags.get("sweep_role") != "parent"]
    assert (parent.info.status, job.info.status) == ("KILLED", "KILLED")
    assert parent.data.tags["failure_reason"] == "interrupted (SIGTERM)"
    assert job.data.tags["failure_reason"] == "interrupted (SIGTERM)"
