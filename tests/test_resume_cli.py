"""Resume across machines and processes, through the real CLI: a checkpoint folder that is not
here is refused (never retrained from epoch 1 into the same run), a copy is named with the
runtime key ``checkpoint_dir=``, and a run still training is not resumed by a second process."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest
from conftest import sqlite_store, start_training, train_cli, wait_for_epochs
from mlflow.tracking import MlflowClient

import convnets

TINY = "model.layers=[{filters:8},{filters:8,pool:max}]"
EPOCHS = 40  # long enough that the first process still trains when the second starts


def error_lines(result) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return [x for x in result.stderr.splitlines() if x.startswith("error: ")]


@pytest.mark.slow
def test_resume_refuses_a_live_run_and_a_missing_folder_and_takes_a_copy(tmp_path):
    uri = sqlite_store(tmp_path)
    client = MlflowClient(uri)  # the schema exists before the training opens the store
    proc = start_training(
        TINY,
        f"trainer.epochs={EPOCHS}",
        "trainer.verbose=0",
        f"tracking.uri={uri}",
        f"hydra.run.dir={tmp_path / 'out'}",
    )
    try:
        run_id = wait_for_epochs(proc, tmp_path / "out", 1)
        folder = Path(client.get_run(run_id).data.tags["checkpoint_dir"])
        live = train_cli(f"resume={run_id}", f"tracking.uri={uri}")  # while it trains
        assert live.returncode == 1
        [line] = error_lines(live)
        assert line.startswith(f"error: resume={run_id}: the run is still training: process ")
        assert str(folder) in line
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert client.get_run(run_id).info.status == "KILLED"
    history = client.get_metric_history(run_id, "loss")

    copy = tmp_path / "copied"  # as another machine would get it
    shutil.move(folder, copy)
    missing = train_cli(f"resume={run_id}", f"tracking.uri={uri}")
    assert missing.returncode == 1
    assert error_lines(missing) == [
        f"error: resume={run_id}: its checkpoint folder {folder} is not on this machine (the "
        "run trained elsewhere, or the folder was deleted); copy the folder here and add "
        f"checkpoint_dir=<the copy>, or train the run again as a new run with "
        f"reproduce={run_id}"
    ]
    assert not folder.exists()  # nothing created at the other machine's path
    assert client.get_metric_history(run_id, "loss") == history  # the store as it was

    # The refusals above are the command's; the resume that trains runs in this process.
    with pytest.raises(convnets.ConfigError, match="a resumed run keeps its experiment and its"):
        convnets.train([f"resume={run_id}", f"tracking.uri={uri}", "tracking.experiment=other"])
    resumed = convnets.train(
        [f"resume={run_id}", f"tracking.uri={uri}", f"checkpoint_dir={copy}", "trainer.verbose=0"],
        output_dir=tmp_path / "resumed",
    )
    assert resumed.run_id == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert sorted(steps) == list(range(1, EPOCHS + 1))
    assert "checkpoint_dir" not in run.data.params  # where a copy lives is not what trained
    assert run.data.tags["checkpoint_dir"] == str(copy)  # where its files are from now on
    assert not (copy / "training.lock").exists()
