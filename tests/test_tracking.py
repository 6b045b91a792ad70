"""convnets.tracking against real stores: a SQLite file in tmp_path and a real mlflow server."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import mlflow
import pytest
from conftest import (
    BARRIER_TIMEOUT_S,
    BARRIER_WAIT,
    CLI_ENV,
    REPO,
    free_port,
    release_when_ready,
    sqlite_store,
)
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
from omegaconf import OmegaConf

import convnets.config  # noqa: F401  (registers the schemas)
from convnets.config import flatten
from convnets.errors import TrackingError
from convnets.tracking import (
    SHORTENED,
    Tracker,
    epoch_metrics,
    redact,
    sqlite_path,
    to_params,
)


@pytest.fixture
def store(tmp_path):
    return sqlite_store(tmp_path)


def log_epoch(tracker: Tracker, run_id: str, step: int, logs: dict) -> None:
    """One epoch's metrics as the MLflow recorder sends them: the run's per-epoch metrics of
    Keras's logs, one store call."""
    tracker.log_steps(run_id, [(step, int(time.time() * 1000), epoch_metrics(logs))])


def test_flatten_and_params():
    flat = flatten({"model": {"layers": [{"filters": 8}, {"filters": 16}], "head": {"dense": []}}})
    assert flat == {
        "model.layers.0.filters": 8,
        "model.layers.1.filters": 16,
        "model.head.dense": [],
    }
    params = to_params({"a": None, "b": 1.5, "c": "x" * 10_000})
    assert params["a"] == "None" and params["b"] == "1.5"
    assert len(params["c"]) == MAX_PARAM_VAL_LENGTH and params["c"].endswith(SHORTENED)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("https://alice:s3cret@mlflow.example.org:5000", "https://mlflow.example.org:5000"),
        ("tracking.uri=http://tok@h/x a=1", "tracking.uri=http://h/x a=1"),
        ("postgresql://u:p@db/mlflow", "postgresql://db/mlflow"),
        ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
    ],
)
def test_redact_credentials(text, shown):
    assert redact(text) == shown


def test_sqlite_artifacts_live_beside_the_database(tmp_path, store):
    tracker = Tracker(store)
    tracker.check_store()
    experiment = tracker.client.get_experiment(tracker.experiment_id("my study/1"))
    assert experiment.name == "my study/1"
    assert experiment.artifact_location == (tmp_path / "mlruns" / "my_study_1").as_uri()
    assert tracker.experiment_id("my study/1") == experiment.experiment_id  # get, not create
    assert sqlite_path("sqlite:///rel/m.db") is not None and sqlite_path("http://h") is None


def test_run_status_and_failure_reason(store):
    tracker = Tracker(store)
    experiment_id = tracker.experiment_id("statuses")
    with tracker.run(experiment_id=experiment_id, run_name="ok") as ok:
        log_epoch(tracker, ok.info.run_id, 1, {"loss": 0.5, "lr": 0.1, "ignored": 3.0})
    with pytest.raises(ValueError), tracker.run(experiment_id=experiment_id) as bad:
        raise ValueError("boom")
    with pytest.raises(KeyboardInterrupt), tracker.run(experiment_id=experiment_id) as killed:
        raise KeyboardInterrupt
    dump = "Incompatible shapes: [64] vs. [32]\n" + "\t [[{{node gradient_tape/...}}]]\n" * 200
    with pytest.raises(RuntimeError), tracker.run(experiment_id=experiment_id) as dumped:
        raise RuntimeError(dump)  # as TensorFlow's errors read: kilobytes of graph

    client = MlflowClient(store)
    ok_run = client.get_run(ok.info.run_id)
    assert ok_run.info.status == "FINISHED"
    assert ok_run.data.metrics == {"loss": 0.5, "lr": 0.1}
    assert [m.step for m in client.get_metric_history(ok.info.run_id, "loss")] == [1]
    failed = client.get_run(bad.info.run_id)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["failure_reason"] == "ValueError: boom"
    assert client.get_run(killed.info.run_id).info.status == "KILLED"
    reason = client.get_run(dumped.info.run_id).data.tags["failure_reason"]
    assert reason == "RuntimeError: Incompatible shapes: [64] vs. [32]"  # its first line only


def test_long_config_values_are_recorded_not_fatal(tmp_path, store):
    """A 7000-character model name and a 300-layer stack: params shortened, nothing fails."""
    layers = "[" + ",".join("{filters:8}" for _ in range(300)) + "]"
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"model.name={'n' * 7000}", f"model.layers={layers}"])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    tracker = Tracker(store)
    with tracker.run(experiment_id=tracker.experiment_id("long")) as active:
        tracker.log_params(flatten(resolved))
    params = MlflowClient(store).get_run(active.info.run_id).data.params
    assert params["model.name"].startswith("nnn") and params["model.name"].endswith(SHORTENED)
    assert params["model.layers.299.filters"] == "8"
    assert len([k for k in params if k.startswith("model.layers.")]) == 300 * 11


# MLflow's own retries on an unreachable server take minutes; the tracker gives up after
# http_timeout_s. This bound (20x that) tells the two apart without timing the test; the
# seconds it takes are measured by benchmarks/failfast.py.
@pytest.mark.timeout(120, method="signal")  # fails this test only
def test_unreachable_server_fails_instead_of_retrying():
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(TrackingError, match=r"tracking.uri=http://127\.0\.0\.1:\d+: the MLflow"):
        Tracker(uri, http_timeout_s=5).check_store()


def test_unknown_run_id_is_one_clear_line(store):
    tracker = Tracker(store)
    tracker.check_store()
    with pytest.raises(TrackingError, match="reproduce=0123abcd: no such run"):
        tracker.load_config("0123abcd", key="reproduce")


RACER = BARRIER_WAIT + textwrap.dedent(
    """
    import time
    from convnets.tracking import Tracker, epoch_metrics
    tracker = Tracker(sys.argv[1])
    tracker.check_store()
    experiment_id = tracker.experiment_id("race")
    with tracker.run(experiment_id=experiment_id, run_name=name) as run:
        tracker.log_params({"name": name, "model.layers.0.filters": 8})
        for epoch in (1, 2, 3):
            logs = epoch_metrics({"loss": 1.0 / epoch, "val_accuracy": 0.1})
            tracker.log_steps(run.info.run_id, [(epoch, int(time.time() * 1000), logs)])
        tracker.log_metrics({"test_accuracy": 0.5})
        import mlflow
        mlflow.log_text(name, "config.yaml")
    """
)


@pytest.mark.slow
def test_four_fresh_processes_land_in_the_right_experiment(tmp_path, store):
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    names = [f"job{i}" for i in range(4)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, store, str(barrier), name, str(BARRIER_TIMEOUT_S)],
            cwd=REPO,
            env=CLI_ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in names
    ]
    release_when_ready(procs, barrier, names)
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(outputs)

    client = MlflowClient(store)
    experiments = {e.name: e.experiment_id for e in client.search_experiments()}
    runs = client.search_runs([experiments["race"]])
    assert sorted(r.info.run_name for r in runs) == ["job0", "job1", "job2", "job3"]
    if "Default" in experiments:
        assert client.search_runs([experiments["Default"]]) == []
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.params == {"name": run.info.run_name, "model.layers.0.filters": "8"}
        assert run.data.metrics == {"loss": 1 / 3, "val_accuracy": 0.1, "test_accuracy": 0.5}
        history = client.get_metric_history(run.info.run_id, "loss")
        assert sorted(m.step for m in history) == [1, 2, 3]
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.yaml"]


@pytest.mark.slow
@pytest.mark.xdist_group("mlflow_server")  # one worker starts the server once
def test_real_server_store(mlflow_server):
    """The tracker against a real `mlflow server`: experiment, run, params, metrics, artifact."""
    tracker = Tracker(mlflow_server, http_timeout_s=5)
    tracker.check_store()
    experiment_id = tracker.experiment_id("remote")
    assert tracker.experiment_id("remote") == experiment_id
    with tracker.run(experiment_id=experiment_id, run_name="remote-run") as active:
        tracker.log_params({"tracking.uri": "http://bob:pw@example.org", "trainer.epochs": 2})
        log_epoch(tracker, active.info.run_id, 1, {"loss": 1.0, "accuracy": 0.5})
        log_epoch(tracker, active.info.run_id, 2, {"loss": 0.5, "accuracy": 0.75})
        mlflow.log_text("trainer:\n  epochs: 2\n", "config.yaml")
    assert tracker.history(active.info.run_id) == {"loss": [1.0, 0.5], "accuracy": [0.5, 0.75]}
    run = tracker.get_run(active.info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"tracking.uri": "http://example.org", "trainer.epochs": "2"}
    assert OmegaConf.to_container(tracker.load_config(active.info.run_id)) == {
        "trainer": {"epochs": 2}
    }


def test_a_schema_created_by_another_program_at_once_is_waited_for(tmp_path, monkeypatch):
    """Another MLflow program creating the same fresh SQLite file makes MLflow's own creation
    fail ("table ... already exists"); opening again once the other is done succeeds. When the
    failure stays, the file is broken and the line says what to do with it."""
    import sqlalchemy.exc

    import convnets.tracking as tracking

    lost = sqlalchemy.exc.OperationalError("CREATE TABLE", {}, Exception("table x already exists"))
    failures = iter([lost, lost])
    real = tracking.MlflowClient

    def client_losing_twice(tracking_uri):
        if (err := next(failures, None)) is not None:
            raise err
        return real(tracking_uri=tracking_uri)

    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    monkeypatch.setattr(tracking, "MlflowClient", client_losing_twice)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert Tracker(uri).client.search_experiments()  # the default experiment

    def always_losing(tracking_uri):
        raise lost

    monkeypatch.setattr(tracking, "MlflowClient", always_losing)
    with pytest.raises(TrackingError, match=r"schema is broken: two programs created .* delete"):
        Tracker(uri)
    monkeypatch.setattr(tracking, "MlflowClient", lambda tracking_uri: 1 / 0)
    with pytest.raises(TrackingError, match=r"cannot be used \(ZeroDivisionError"):
        Tracker(uri)  # any other failure is not waited on


def test_an_experiment_another_machine_creates_meanwhile_is_the_one_used(store):
    """Between our look-up and our create another machine's process creates the experiment
    (no lock spans machines): the store refuses ours and theirs is used."""
    tracker = Tracker(store)
    theirs = MlflowClient(store).create_experiment("shared")
    looked_up, calls = tracker.client.get_experiment_by_name, []

    def look_up(name):  # our first look-up ran before their create
        calls.append(name)
        return None if len(calls) == 1 else looked_up(name)

    tracker.client.get_experiment_by_name = look_up
    assert tracker.experiment_id("shared") == theirs
    assert [e.name for e in MlflowClient(store).search_experiments()].count("shared") == 1


def test_a_folder_store_is_refused_with_the_database_to_use_instead(tmp_path):
    """MLflow's file backend (file:///..., ./mlruns) refuses new runs; its own message was cut
    before the fix and followed by a hint to start a server."""
    with pytest.raises(TrackingError) as refused:
        Tracker(f"file://{tmp_path}/mlruns").check_store()
    assert str(refused.value) == (
        f"tracking.uri=file://{tmp_path}/mlruns: MLflow no longer records runs in a folder store "
        "(its file backend is in maintenance mode); record in a SQLite database instead: "
        "tracking.uri=sqlite:///<folder>/mlflow.db"
    )


@pytest.mark.timeout(60, method="signal")  # MLflow retried opening a folder for 105 s
@pytest.mark.parametrize("memory", ["sqlite://", "sqlite:///:memory:"])
def test_an_in_memory_or_folder_sqlite_store_is_refused_at_once(tmp_path, memory):
    with pytest.raises(TrackingError, match="an in-memory SQLite store keeps nothing"):
        Tracker(memory)
    with pytest.raises(TrackingError) as refused:
        Tracker(f"sqlite:///{tmp_path}")
    assert str(refused.value) == (
        f"tracking.uri=sqlite:///{tmp_path}: {tmp_path} is a folder; name the database file in "
        f"it, e.g. tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"
    )


def test_processes_setting_the_same_new_tags_on_one_run_at_once_all_succeed(store):
    """A search's parent is shared: every process joining it sets its ``process`` and
    heartbeat tags at about the same moment. Setting a tag that does not exist yet is a
    read-then-insert in MLflow's SQL store; the writers that lose the insert must not fail."""
    import threading

    tracker = Tracker(store)
    run_id = tracker.client.create_run(tracker.client.create_experiment("shared")).info.run_id
    errors: list[BaseException] = []
    for round_ in range(4):  # each round a key no writer has set yet
        start = threading.Barrier(6)

        def write(writer: int, round_: int = round_, start: threading.Barrier = start) -> None:
            start.wait()
            try:
                tracker.set_tags_on(run_id, {f"process_{round_}": writer, f"beat_{round_}": 1})
            except Exception as err:  # noqa: BLE001 - every failure is the finding
                errors.append(err)

        writers = [threading.Thread(target=write, args=(n,)) for n in range(6)]
        for thread in writers:
            thread.start()
        for thread in writers:
            thread.join()
    assert errors == []
    tags = tracker.client.get_run(run_id).data.tags
    assert all(tags[f"process_{n}"] in {str(w) for w in range(6)} for n in range(4))


@pytest.mark.parametrize(
    ("text", "wrong"),
    [("a: [1\n", "is not readable YAML at line 2"),
     ("- a list\n", "is not a run's config (it is not a mapping)")],
)  # fmt: skip
def test_a_rerun_of_a_damaged_recorded_config_names_the_artifact(tmp_path, text, wrong):
    """reproduce= reads the run's config.yaml artifact through a temporary copy: the refusal
    names the artifact, not that copy (gone by the time it is read)."""
    import convnets
    from convnets.errors import ConfigError

    uri = sqlite_store(tmp_path)
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    (tmp_path / "config.yaml").write_text(text)
    client.log_artifact(run_id, str(tmp_path / "config.yaml"))
    with pytest.raises(ConfigError) as refused:
        convnets.train([f"reproduce={run_id}", f"tracking.uri={uri}"], output_dir=tmp_path / "o")
    assert str(refused.value) == (
        f"reproduce={run_id}: its config.yaml artifact {wrong}, so the run cannot be rerun "
        "from its record"
    )
