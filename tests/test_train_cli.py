"""``python train.py`` end to end through the real CLI: the MLflow record, reproduce, resume,
failures. Each test trains a tiny stack on the bundled digits into a SQLite store in tmp."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import CLI_ENV, REPO, free_port, imported, train_cli, wait_for_epochs
from mlflow.tracking import MlflowClient

from convnets.tracking import model_name

TINY = "model.layers=[{filters:8},{filters:8,pool:max}]"
EPOCHS = 3
EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "lr")
RUN_ID = re.compile(r"run=([0-9a-f]{32})")


def store_uri(path) -> str:
    return f"sqlite:///{path / 'mlflow.db'}"


def run_id_of(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found = RUN_ID.findall(result.stdout)
    assert found, result.stdout[-2000:]
    return found[-1]


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """One deterministic tiny run shared by the record and reproduce tests."""
    tmp = tmp_path_factory.mktemp("record")
    result = train_cli(
        TINY,
        f"trainer.epochs={EPOCHS}",
        "optimizer.lr=0.01",  # this 802-parameter stack barely moves in 3 epochs at 1e-3
        "trainer.deterministic=true",
        "trainer.verbose=0",
        f"tracking.uri={store_uri(tmp)}",
        f"hydra.run.dir={tmp / 'out'}",
    )
    run_id = run_id_of(result)
    client = MlflowClient(store_uri(tmp))
    return {"tmp": tmp, "uri": store_uri(tmp), "run_id": run_id, "client": client, "out": result}


@pytest.mark.slow
@pytest.mark.xdist_group("recorded")  # one worker trains the shared run once
def test_the_full_record(recorded):
    client, run_id = recorded["client"], recorded["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "digits"  # the dataset's
    assert (
        run.info.run_name
        == f"simple_cnn-digits-layers=[{{filters:8}},{{filters:8,pool:max}}],epochs={EPOCHS},lr=0.01,deterministic=true"
    )

    params = run.data.params
    assert params["model.layers.0.filters"] == "8"
    assert params["model.layers.1.pool"] == "max"
    assert "model.layers.0.kernel_size" not in params  # unset: falls back to layer_defaults
    assert params["model.layer_defaults.kernel_size"] == "3"
    assert params["trainer.epochs"] == str(EPOCHS)
    assert params["optimizer.name"] == "adam" and params["optimizer.lr"] == "0.01"
    assert params["dataset.name"] == "digits" and params["tracking.uri"] == recorded["uri"]
    assert "reproduce" not in params and "resume" not in params

    for key in EPOCH_METRICS:
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1)), key
    lrs = [m.value for m in client.get_metric_history(run_id, "lr")]
    assert lrs == [pytest.approx(1e-2)] * EPOCHS

    # Final metrics; the architecture numbers equal what `python -m convnets.inspect` prints.
    inspect = subprocess.run(
        [sys.executable, "-m", "convnets.inspect", TINY, "format=json"],
        cwd=REPO,
        env=CLI_ENV,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    analysis = json.loads(inspect.stdout)
    metrics = run.data.metrics
    assert metrics["param_count"] == analysis["param_count"] == 8 * 9 + 4 * 8 * 2 + 8 * 8 * 9 + 90
    assert metrics["receptive_field"] == analysis["receptive_field"] == 6
    assert metrics["macs"] == analysis["macs"]
    assert 0.3 < metrics["test_accuracy"] <= 1 and metrics["test_loss"] > 0
    assert 1 <= metrics["effective_receptive_field"] <= 8
    assert metrics["train_time_s"] > 0 and metrics["images_per_sec"] > 0
    assert 0 < metrics["startup_s"] < 300  # process start -> first training step
    assert metrics["epochs_completed"] == EPOCHS
    best = max(m.value for m in client.get_metric_history(run_id, "val_accuracy"))
    assert metrics["best_val_accuracy"] == best
    summary = recorded["out"].stdout.strip().splitlines()[-1]
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
    model = mlflow.tensorflow.load_model(model_uri)
    probabilities = np.asarray(model.predict(np.zeros((2, 8, 8, 1), "float32"), verbose=0))
    assert probabilities.shape == (2, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    info = mlflow.models.get_model_info(model_uri)
    assert info.signature.inputs.to_dict() == [  # digits as stored: uint8 pixels 0..16
        {"type": "tensor", "tensor-spec": {"dtype": "uint8", "shape": (-1, 8, 8, 1)}}
    ]


@pytest.mark.slow
@pytest.mark.xdist_group("recorded")  # one worker trains the shared run once
def test_reproduce_is_identical_when_deterministic(recorded):
    original = recorded["run_id"]
    result = train_cli(
        f"reproduce={original}",
        f"tracking.uri={recorded['uri']}",
        f"hydra.run.dir={recorded['tmp'] / 'reproduce'}",
    )
    new = run_id_of(result)
    assert new != original
    assert f"reproduce {original}: identical" in result.stdout
    client = recorded["client"]
    run, source = client.get_run(new), client.get_run(original)
    assert run.info.status == "FINISHED"
    assert run.info.experiment_id == source.info.experiment_id
    assert run.data.tags["reproduces"] == original
    assert run.data.tags["reproduce_verdict"] == "identical"
    assert run.data.metrics["reproduce_delta_test_loss"] == 0.0
    assert run.data.metrics["reproduce_delta_test_accuracy"] == 0.0
    assert run.data.metrics["test_loss"] == source.data.metrics["test_loss"]
    assert run.data.params == source.data.params


@pytest.mark.slow
@pytest.mark.xdist_group("recorded")  # one worker trains the shared run once
def test_reproduce_refuses_other_overrides(recorded):
    result = train_cli(
        f"reproduce={recorded['run_id']}", "trainer.epochs=7", f"tracking.uri={recorded['uri']}"
    )
    assert result.returncode != 0
    [line] = error_lines(result)
    assert "trainer.epochs=7" in line and "distribute.*, trainer.verbose, tracking.*" in line


@pytest.mark.parametrize("key", ["reproduce", "resume"])
def test_unknown_run_id_is_one_line(tmp_path, key):
    result = train_cli(
        f"{key}=0123456789abcdef", f"tracking.uri={store_uri(tmp_path)}", importtime=True
    )
    assert result.returncode != 0
    [line] = error_lines(result)
    assert line.startswith(f"error: {key}=0123456789abcdef: no such run in sqlite:")
    assert "tensorflow" not in imported(result)  # refused before TensorFlow loads


def test_unreachable_server_fails_with_one_line(tmp_path):
    """MLflow alone would retry for minutes (a hang: the subprocess timeout ends it); how many
    seconds the refusal takes is measured by benchmarks/failfast.py."""
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = train_cli(f"tracking.uri={uri}", f"hydra.run.dir={tmp_path}", timeout=240)
    assert result.returncode != 0
    [line] = error_lines(result)
    assert line.startswith(f"error: tracking.uri={uri}: the MLflow store cannot be used")
    assert not (tmp_path / "checkpoints").exists()  # nothing half-written


def test_an_override_without_a_key_is_one_line():
    """Hydra fails on it deep in its defaults list with a ValueError and a traceback."""
    result = train_cli("=3")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: =3: an override needs a key before '=' (key=value, group=option, ~key)"
    ]


def test_an_invalid_stack_is_refused_before_anything_is_recorded(tmp_path):
    result = train_cli(
        "model.layers.1.stride=2",
        "model.layers.1.dilation=2",
        f"tracking.uri={store_uri(tmp_path)}",
        f"hydra.run.dir={tmp_path / 'out'}",
    )
    assert result.returncode == 2
    assert error_lines(result) == [
        "error: model.layers[1]: stride 2 with dilation 2 is not supported (Keras refuses "
        "stride > 1 together with dilation > 1); set stride: 1 or dilation: 1"
    ]
    assert not (tmp_path / "mlflow.db").exists()  # nothing half-written


@pytest.mark.slow
def test_nan_loss_ends_the_run_failed(tmp_path):
    result = train_cli(
        TINY,
        "optimizer=sgd",
        "optimizer.lr=1e6",
        "trainer.epochs=3",
        "trainer.verbose=0",
        f"tracking.uri={store_uri(tmp_path)}",
        f"hydra.run.dir={tmp_path / 'out'}",
    )
    assert result.returncode != 0
    [line] = error_lines(result)
    assert re.match(r"error: training loss became nan at epoch \d", line)
    client = MlflowClient(store_uri(tmp_path))
    [run] = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"] == line.removeprefix("error: ")


@pytest.mark.slow
def test_kill_after_epoch_two_then_resume_finishes_the_same_run(tmp_path):
    epochs = 30
    uri = store_uri(tmp_path)
    args = [TINY, f"trainer.epochs={epochs}", "trainer.verbose=0", f"tracking.uri={uri}"]
    proc = subprocess.Popen(
        [sys.executable, "train.py", *args, f"hydra.run.dir={tmp_path / 'first'}"],
        cwd=REPO,
        env=CLI_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = MlflowClient(uri)
    try:
        run_id = wait_for_epochs(proc, client, 2)
        proc.kill()  # SIGKILL: no handler runs, the run stays RUNNING
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "training ended before it could be killed"
    assert client.get_run(run_id).info.status == "RUNNING"

    result = train_cli(
        f"resume={run_id}", f"tracking.uri={uri}", f"hydra.run.dir={tmp_path / 'second'}"
    )
    assert run_id_of(result) == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumed"] == "true"
    for key in EPOCH_METRICS:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == list(range(1, epochs + 1)), key  # every epoch exactly once
    assert run.data.metrics["epochs_completed"] == epochs
    assert "test_accuracy" in run.data.metrics
    assert len(client.search_runs([run.info.experiment_id])) == 1


@pytest.mark.slow
def test_ctrl_c_ends_the_run_killed_and_keeps_the_checkpoint(tmp_path):
    uri = store_uri(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "train.py", TINY, "trainer.epochs=50", "trainer.verbose=0",
         f"tracking.uri={uri}", f"hydra.run.dir={tmp_path / 'out'}"],
        cwd=REPO,
        env=CLI_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    client = MlflowClient(uri)
    try:
        run_id = wait_for_epochs(proc, client, 1)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    checkpoint = Path(run.data.tags["checkpoint_dir"])
    assert json.loads((checkpoint / "state.json").read_text())["epoch"] >= 1
    [line] = [x for x in stderr.splitlines() if x.startswith("interrupted: ")]
    assert line == (
        f"interrupted: run {run_id} recorded KILLED; checkpoint kept in {checkpoint}; "
        f"continue with: python train.py resume={run_id} tracking.uri={uri}"
    )


@pytest.mark.slow
@pytest.mark.xdist_group("mlflow_server")  # one worker starts the server once
def test_remote_server_run(mlflow_server, tmp_path):
    """A run recorded through a real `mlflow server` (artifacts proxied by the server)."""
    result = train_cli(
        TINY,
        "trainer.epochs=1",
        "trainer.verbose=0",
        f"tracking.uri={mlflow_server}",
        f"hydra.run.dir={tmp_path}",
    )
    run_id = run_id_of(result)
    assert f"{mlflow_server}/#/experiments/" in result.stdout
    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "val_accuracy")] == [1]
    assert {"config.yaml", "training_curves.png"} <= {a.path for a in client.list_artifacts(run_id)}
    import mlflow.tensorflow

    mlflow.set_tracking_uri(mlflow_server)
    model_uri = run.data.tags["model_uri"]  # runs:/<run_id>/<the run's name>
    assert mlflow.tensorflow.load_model(model_uri).output_shape == (None, 10)


@pytest.mark.slow
def test_default_config_reaches_95_percent_on_digits(tmp_path):
    started = time.monotonic()
    result = train_cli(
        "trainer.verbose=0", f"tracking.uri={store_uri(tmp_path)}", f"hydra.run.dir={tmp_path}"
    )
    elapsed = time.monotonic() - started
    run = MlflowClient(store_uri(tmp_path)).get_run(run_id_of(result))
    print(f"default run: test_accuracy={run.data.metrics['test_accuracy']:.4f} in {elapsed:.0f}s")
    assert run.data.metrics["test_accuracy"] >= 0.95


@pytest.mark.slow
def test_a_profiled_run_leaves_a_loadable_profile(tmp_path):
    """A command ends through Python's normal exit: a profiler (or any wrapper) around it
    writes its result, and the exit status is the command's."""
    import pstats

    profile = tmp_path / "prof.out"
    result = subprocess.run(
        [sys.executable, "-m", "cProfile", "-o", str(profile), "train.py", TINY]
        + ["trainer.epochs=1", "trainer.verbose=0", "tracking.log_model=false"]
        + [f"tracking.uri={store_uri(tmp_path)}", f"hydra.run.dir={tmp_path / 'out'}"],
        cwd=REPO,
        env=CLI_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    run_id_of(result)
    stats = pstats.Stats(str(profile))
    assert any("job.py" in filename for filename, _, _ in stats.stats)
    refused = subprocess.run(
        [sys.executable, "-m", "cProfile", "-o", str(tmp_path / "refused.out"), "train.py"]
        + ["trainer.epochs=0", f"hydra.run.dir={tmp_path / 'out2'}"],
        cwd=REPO,
        env=CLI_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2 and error_lines(refused)
