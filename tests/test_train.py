"""``convnets.train`` in this process: the MLflow record, reproduce, failures, a remote server,
the default config's accuracy. Each test trains a tiny stack on the bundled digits into a
SQLite store in tmp. The command line's own contract (exit codes, ``error:`` lines, signals,
what loads before TensorFlow) is tested through real processes in test_train_cli.py."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import mlflow  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402
from conftest import sqlite_store  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

import convnets  # noqa: E402
from convnets.architecture import analysis_to_dict  # noqa: E402
from convnets.errors import ConfigError  # noqa: E402
from convnets.tracking import model_name  # noqa: E402

TINY = "model.layers=[{filters:8},{filters:8,pool:max}]"
EPOCHS = 3
EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "lr")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """One deterministic tiny run shared by the record and reproduce tests."""
    tmp = tmp_path_factory.mktemp("record")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run = convnets.train(
            [
                TINY,
                f"trainer.epochs={EPOCHS}",
                "optimizer.lr=0.01",  # this 802-parameter stack barely moves in 3 epochs at 1e-3
                "trainer.deterministic=true",
                "trainer.verbose=0",
                f"tracking.uri={sqlite_store(tmp)}",
            ],
            output_dir=tmp / "out",
        )
    client = MlflowClient(sqlite_store(tmp))
    return {
        "tmp": tmp,
        "uri": sqlite_store(tmp),
        "run": run,
        "run_id": run.run_id,
        "client": client,
        "stdout": printed.getvalue(),
    }


@pytest.mark.slow
@pytest.mark.xdist_group("recorded")  # one worker trains the shared run once
def test_the_full_record(recorded):
    client, run_id = recorded["client"], recorded["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "digits"  # the dataset's
    assert (
        run.info.run_name
        == "simple_cnn-digits-layers=[{filters:8},{filters:8,pool:max}]…"  # <= 60 characters
    )
    returned = recorded["run"]  # the value convnets.train returned is the record
    assert returned.experiment_id == run.info.experiment_id
    assert returned.metrics == run.data.metrics and returned.params == run.data.params
    assert returned.model_path == Path(run.data.tags["checkpoint_dir"]) / "model.keras"
    assert returned.model_path.is_file()

    params = run.data.params
    assert params["model.layers.0.filters"] == "8"
    assert params["model.layers.1.pool"] == "max"
    assert "model.layers.0.kernel_size" not in params  # unset: falls back to layer_defaults
    assert params["model.layer_defaults.kernel_size"] == "3"
    assert params["trainer.epochs"] == str(EPOCHS)
    assert params["optimizer.name"] == "adam" and params["optimizer.lr"] == "0.01"
    assert params["dataset.name"] == "digits" and params["tracking.uri"] == recorded["uri"]
    assert "reproduce" not in params and "resume" not in params
    # the stack's shape, groupable in MLflow's charts (they group by params and tags only)
    assert params["depth"] == "2" and params["receptive_field"] == run.data.tags["receptive_field"]

    for key in EPOCH_METRICS:
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1)), key
    lrs = [m.value for m in client.get_metric_history(run_id, "lr")]
    assert lrs == [pytest.approx(1e-2)] * EPOCHS

    # Final metrics; the architecture numbers equal what `python -m convnets.inspect` prints.
    # (startup_s, process start -> first training step, is a process's: checked in
    # test_train_cli.py on a run of its own process.)
    analysis = analysis_to_dict(convnets.inspect([TINY]))
    metrics = run.data.metrics
    assert metrics["param_count"] == analysis["param_count"] == 8 * 9 + 4 * 8 * 2 + 8 * 8 * 9 + 90
    assert metrics["receptive_field"] == analysis["receptive_field"] == 6
    assert metrics["macs"] == analysis["macs"]
    assert 0.3 < metrics["test_accuracy"] <= 1 and metrics["test_loss"] > 0
    assert 1 <= metrics["effective_receptive_field"] <= 8
    assert metrics["train_time_s"] > 0 and metrics["images_per_sec"] > 0
    assert metrics["epochs_completed"] == EPOCHS
    # The best epoch: the lowest val_loss, a higher val_accuracy breaking a tie.
    val_loss = {m.step: m.value for m in client.get_metric_history(run_id, "val_loss")}
    val_accuracy = {m.step: m.value for m in client.get_metric_history(run_id, "val_accuracy")}
    best = min(sorted(val_loss), key=lambda epoch: (val_loss[epoch], -val_accuracy[epoch]))
    assert metrics["best_epoch"] == best
    assert metrics["best_val_accuracy"] == val_accuracy[best]
    # restore_best (the default): the epoch tested is the best one, whatever the last one says
    assert metrics["selected_val_accuracy"] == val_accuracy[best]
    assert run.data.tags["best_epoch_criterion"] == "min val_loss (ties: max val_accuracy)"
    summary = recorded["stdout"].strip().splitlines()[-1]
    assert summary.startswith(f"done: test_accuracy={metrics['test_accuracy']:.4f} params=")
    assert f"run={run_id}" in summary and "mlflow ui --backend-store-uri" in summary

    tags = run.data.tags
    assert tags["dataset"] == "digits" and tags["model"] == "simple_cnn"
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", tags["git_commit"])
    assert tags["git_dirty"] in ("true", "false", "unknown")
    assert f"trainer.epochs={EPOCHS}" in tags["hydra_overrides"]
    assert tags["version.tensorflow"] and tags["version.keras"] and tags["version.mlflow"]
    assert os.path.isfile(os.path.join(tags["checkpoint_dir"], "state.json"))
    assert tags["model_uri"] == f"runs:/{run_id}/{model_name(run.info.run_name)}"

    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "layers.txt", "layers.json", "training_curves.png"} <= artifacts
    local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, tracking_uri=recorded["uri"]))
    config = yaml.safe_load((local / "config.yaml").read_text())
    assert config["model"]["layers"] == [{"filters": 8}, {"filters": 8, "pool": "max"}]
    assert config["trainer"]["epochs"] == EPOCHS and config["trainer"]["deterministic"] is True
    assert json.loads((local / "layers.json").read_text())["param_count"] == analysis["param_count"]
    assert "block2_pool" in (local / "layers.txt").read_text()
    assert (local / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.xdist_group("recorded")  # one worker trains the shared run once
def test_logged_model_loads_with_mlflow_tensorflow(recorded):
    import mlflow.tensorflow
    import numpy as np

    mlflow.set_tracking_uri(recorded["uri"])
    model_uri = recorded["client"].get_run(recorded["run_id"]).data.tags["model_uri"]
    assert recorded["run"].model_uri == model_uri
    model = mlflow.tensorflow.load_model(model_uri)
    probabilities = np.asarray(model.predict(np.zeros((2, 8, 8, 1), "float32"), verbose=0))
    assert probabilities.shape == (2, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    info = mlflow.models.get_model_info(model_uri)
    assert info.signature.inputs.to_dict() == [  # digits' pixel values 0..16, as float32
        {"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": (-1, 8, 8, 1)}}
    ]


@pytest.mark.slow
@pytest.mark.xdist_group("recorded")  # one worker trains the shared run once
def test_reproduce_is_identical_when_deterministic(recorded, capsys):
    original = recorded["run_id"]
    # No trainer.verbose=0: a reproduce takes the recorded config (verbose=0 already) as is.
    returned = convnets.train(
        [f"reproduce={original}", f"tracking.uri={recorded['uri']}"],
        output_dir=recorded["tmp"] / "reproduce",
    )
    new = returned.run_id
    assert new != original
    assert f"reproduce {original}: identical" in capsys.readouterr().out
    client = recorded["client"]
    run, source = client.get_run(new), client.get_run(original)
    assert run.info.status == "FINISHED"
    assert run.info.experiment_id == source.info.experiment_id
    assert run.data.tags["reproduces"] == original
    assert run.data.tags["reproduce_verdict"] == "identical"
    assert returned.tags["reproduce_verdict"] == "identical"
    assert run.data.metrics["reproduce_delta_test_loss"] == 0.0
    assert run.data.metrics["reproduce_delta_test_accuracy"] == 0.0
    assert run.data.metrics["test_loss"] == source.data.metrics["test_loss"]
    assert run.data.params == source.data.params


@pytest.mark.slow
@pytest.mark.xdist_group("recorded")  # one worker trains the shared run once
def test_reproduce_refuses_other_overrides(recorded):
    client, experiment_id = recorded["client"], recorded["run"].experiment_id
    runs_before = len(client.search_runs([experiment_id]))
    with pytest.raises(convnets.ConfigError) as refused:
        convnets.train(
            [
                f"reproduce={recorded['run_id']}",
                "trainer.epochs=7",
                f"tracking.uri={recorded['uri']}",
            ],
            output_dir=recorded["tmp"] / "refused",
        )
    line = str(refused.value)
    assert "trainer.epochs=7" in line and "distribute.*, trainer.verbose, tracking.*" in line
    assert len(client.search_runs([experiment_id])) == runs_before  # nothing recorded


@pytest.mark.slow
def test_nan_loss_ends_the_run_failed(tmp_path):
    with pytest.raises(convnets.TrainingFailed) as failed:
        convnets.train(
            [
                TINY,
                "optimizer=sgd",
                "optimizer.lr=1e6",
                "trainer.epochs=3",
                "trainer.verbose=0",
                f"tracking.uri={sqlite_store(tmp_path)}",
            ],
            output_dir=tmp_path / "out",
        )
    reason = str(failed.value)
    assert re.match(r"training loss became nan at epoch \d", reason)
    client = MlflowClient(sqlite_store(tmp_path))
    [run] = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"] == reason


@pytest.mark.slow
def test_a_network_no_pixel_affects_has_no_effective_receptive_field(tmp_path):
    """A learning rate that kills every ReLU in one epoch (the run still finishes, at chance):
    the ERF is undefined there, and 0 px would rank the dead network the smallest field."""
    run = convnets.train(
        ["model.layers=[{filters:4},{filters:4,pool:max}]", "optimizer.lr=3.0",
         "trainer.seed=0", "trainer.epochs=1", "trainer.verbose=0", "tracking.log_model=false",
         f"tracking.uri={sqlite_store(tmp_path)}"],
        output_dir=tmp_path / "out",
    )  # fmt: skip
    recorded = MlflowClient(sqlite_store(tmp_path)).get_run(run.run_id).data
    assert "effective_receptive_field" not in recorded.metrics
    assert recorded.tags["erf_undefined"].startswith("the centre unit's gradient is zero")
    assert recorded.metrics["receptive_field"] == 6 and "test_accuracy" in recorded.metrics


@pytest.mark.slow
@pytest.mark.xdist_group("mlflow_server")  # one worker starts the server once
def test_remote_server_run(mlflow_server, tmp_path, capsys):
    """A run recorded through a real `mlflow server` (artifacts proxied by the server)."""
    returned = convnets.train(
        [TINY, "trainer.epochs=1", "trainer.verbose=0", f"tracking.uri={mlflow_server}"],
        output_dir=tmp_path,
    )
    run_id = returned.run_id
    assert returned.ui_url.startswith(f"{mlflow_server}/#/experiments/")
    assert f"{mlflow_server}/#/experiments/" in capsys.readouterr().out
    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "val_accuracy")] == [1]
    assert {"config.yaml", "training_curves.png"} <= {a.path for a in client.list_artifacts(run_id)}
    import mlflow.tensorflow

    mlflow.set_tracking_uri(mlflow_server)
    model_uri = run.data.tags["model_uri"]  # runs:/<run_id>/<the run's name>
    assert returned.model_uri == model_uri
    assert mlflow.tensorflow.load_model(model_uri).output_shape == (None, 10)


@pytest.mark.slow
def test_default_config_reaches_95_percent_on_digits(tmp_path):
    started = time.monotonic()
    returned = convnets.train(
        ["trainer.verbose=0", f"tracking.uri={sqlite_store(tmp_path)}"], output_dir=tmp_path
    )
    elapsed = time.monotonic() - started
    run = MlflowClient(sqlite_store(tmp_path)).get_run(returned.run_id)
    print(f"default run: test_accuracy={run.data.metrics['test_accuracy']:.4f} in {elapsed:.0f}s")
    assert run.data.metrics["test_accuracy"] >= 0.95
    assert returned.test_accuracy == run.data.metrics["test_accuracy"]


def test_an_invalid_stack_is_refused_before_anything_is_recorded(tmp_path):
    with pytest.raises(ConfigError) as refused:
        convnets.train(
            [
                "model.layers.1.stride=2",
                "model.layers.1.dilation=2",
                f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",  # none: refused before
            ],
            output_dir=tmp_path / "out",
        )
    assert str(refused.value) == (
        "model.layers[1]: stride 2 with dilation 2 is not supported (Keras refuses "
        "stride > 1 together with dilation > 1); set stride: 1 or dilation: 1"
    )
    assert not (tmp_path / "mlflow.db").exists()  # nothing half-written


def test_a_crop_padding_larger_than_half_the_image_warns(tmp_path, capsys):
    """40 pixels of padding around 8x8 digits: the run trained at chance without a word."""
    convnets.train(
        [TINY, "dataset.augment.random_crop_padding=5", "trainer.epochs=1", "trainer.verbose=0",
         "tracking.log_model=false", f"tracking.uri={sqlite_store(tmp_path)}"],
        output_dir=tmp_path / "run",
    )  # fmt: skip
    assert (
        "warning: dataset.augment.random_crop_padding=5 on 8x8 images: a random crop is then "
        "largely padding; CIFAR's usual is 4 on 32x32, about 1 here"
    ) in capsys.readouterr().err
