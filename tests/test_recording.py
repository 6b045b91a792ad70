"""A job told to a recorder in memory: the same record the MLflow store gets (what the run is,
each epoch once, its results, how it ended), without a store."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

import convnets  # noqa: E402
from convnets.recording import MemoryRecorder  # noqa: E402

TINY = [
    "model.layers=[{filters:8},{filters:8,pool:max}]",
    "trainer.verbose=0",
    "tracking.log_model=false",
]


pytestmark = pytest.mark.slow  # each test trains (in this process)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("memory")
    cwd = os.getcwd()
    os.chdir(folder)  # a store, if one were opened, would appear here
    try:
        recorder = MemoryRecorder()
        run = convnets.train(
            [*TINY, "trainer.epochs=2", "optimizer.lr=0.01", "trainer.deterministic=true"],
            output_dir=folder / "out",
            recorder=recorder,
        )
    finally:
        os.chdir(cwd)
    return folder, recorder, run


def test_a_run_in_memory_is_the_record_it_returns(recorded):
    folder, recorder, run = recorded
    record = recorder.runs[run.run_id]
    assert record.status == "FINISHED" and run.tracking_uri == "memory:"
    assert run.metrics == record.metrics and run.params == record.params
    assert sorted(record.epochs) == [1, 2]  # each epoch once, numbered from 1
    assert record.metrics["val_loss"] == record.epochs[2]["val_loss"]
    assert record.params["trainer.epochs"] == "2" and record.params["depth"] == "2"
    assert record.tags["checkpoint_dir"] == str(folder / "out" / "checkpoints" / run.run_id)
    assert {"config.yaml", "layers.txt", "layers.json", "training_curves.png"} <= set(
        record.artifacts
    )
    assert run.test_accuracy > 0.2 and run.model_path.is_file()  # chance: 0.1
    assert not list(folder.glob("mlflow.db*")) and not (folder / "mlruns").exists()


def test_reproduce_reads_the_run_from_the_same_recorder(recorded):
    folder, recorder, run = recorded
    again = convnets.train(
        [f"reproduce={run.run_id}"], output_dir=folder / "again", recorder=recorder
    )
    assert again.run_id != run.run_id
    assert again.tags["reproduces"] == run.run_id
    assert again.tags["reproduce_verdict"] == "identical"  # deterministic, same machine
    assert again.metrics["reproduce_delta_test_accuracy"] == 0.0
    # How the original recorded itself is part of its config: no model logged, as then.
    assert again.params["tracking.log_model"] == "False" and again.model_uri is None


def test_a_run_that_fails_ends_failed_with_its_reason(tmp_path):
    recorder = MemoryRecorder()
    with pytest.raises(convnets.TrainingFailed) as failed:
        convnets.train(
            [*TINY, "optimizer=sgd", "optimizer.lr=1e6", "trainer.epochs=3"],
            output_dir=tmp_path,
            recorder=recorder,
        )
    [record] = recorder.runs.values()
    assert record.status == "FAILED"
    assert record.tags["failure_reason"] == str(failed.value)
    assert str(failed.value).startswith("training loss became nan at epoch")


def test_a_job_stopped_before_its_run_opens_says_nothing_was_recorded(
    tmp_path, monkeypatch, capsys
):
    """Ctrl-C or SIGTERM while the job loads its data: no run exists yet, so the line says so
    rather than naming a run (``run None``) that was never recorded."""
    from convnets import data

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "load_data", stopped)
    recorder = MemoryRecorder()
    with pytest.raises(KeyboardInterrupt):
        convnets.train([*TINY, "trainer.epochs=1"], output_dir=tmp_path, recorder=recorder)
    assert recorder.runs == {}
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "interrupted before the run was recorded: nothing recorded"


def test_a_store_whose_disk_is_full_is_named_so():
    """SQLite says ENOSPC as text ("database or disk is full"): the line said the store
    "stopped answering", and to wait until it answered."""
    from mlflow.exceptions import MlflowException

    from convnets.recording import MlflowRecorder

    recorder = MlflowRecorder("sqlite:////data/mlflow.db")
    recorder.run_id, recorder._resumable = "0" * 32, True
    full = MlflowException("(sqlite3.OperationalError) database or disk is full")
    line = str(recorder._lost(full))
    assert "the MLflow store ran out of disk space during run 0000" in line
    assert "once its disk has room, finish the run with: " in line
    assert "stopped answering" not in str(recorder._lost(full))
    assert "stopped answering" in str(recorder._lost(MlflowException("connection refused")))


def test_a_stop_signal_dropped_after_the_last_step_still_ends_the_run_killed(tmp_path):
    """A SIGTERM whose exception Python dropped (raised inside a finalizer) while the test
    split was evaluated or the results logged: training no longer asks after steps, and the
    run went on to FINISHED as if nothing had been sent."""
    import inspect
    import signal

    from omegaconf import OmegaConf

    from convnets import api, job
    from convnets.errors import Interrupted

    def stop_requested():  # what convnets.cli keeps; the trainer asks after every batch
        after_training = inspect.stack()[1].function == "_stop_if_requested"
        return signal.SIGTERM if after_training else None

    cfg, _ = api._compose("train", [*TINY, "trainer.epochs=1"])
    OmegaConf.resolve(cfg)
    recorder = MemoryRecorder()
    context = job.JobContext(overrides=(), output_dir=tmp_path, stop_requested=stop_requested)
    with pytest.raises(Interrupted):
        job.train(cfg, context, recorder)
    [record] = recorder.runs.values()
    assert record.status == "KILLED" and record.tags["failure_reason"] == "interrupted (SIGTERM)"
    assert (tmp_path / "checkpoints" / record.run_id / "state.json").is_file()  # kept
