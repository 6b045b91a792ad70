"""An MLflow store that stops answering while a run trains: training goes on, each epoch is
kept and sent once the store answers again, and a store still gone at the end leaves the
epochs in the run's folder with one line saying how to finish the run and send them.

The outbox and the recorder are tested without a server (a store whose sending is made to
fail); the end-to-end tests stop a real ``mlflow server`` mid-training and start it again on
the same port and database."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import (
    CLI_ENV,
    free_port,
    sqlite_store,
    start_mlflow_server,
    start_training,
    stop_process_group,
    wait_for_epochs,
    wait_until_serving,
)
from mlflow.tracking import MlflowClient

import convnets
from convnets import checkpoints
from convnets.errors import TrackingError
from convnets.outbox import UNSENT_FILE, Epoch, Outbox, read_unsent
from convnets.recording import Definition, MlflowRecorder
from convnets.tracking import EPOCH_METRICS, _bounded_http
from convnets.upload import main as upload_main


class Store:
    """A ``send`` for an outbox that fails while ``down`` is set; what it sent, call by call."""

    def __init__(self, down: bool = True):
        self.down = threading.Event()
        if down:
            self.down.set()
        self.calls: list[list[Epoch]] = []

    def send(self, epochs: list[Epoch]) -> None:
        if self.down.is_set():
            raise ConnectionError("connection refused")
        self.calls.append(list(epochs))


def epochs(*steps: int) -> list[Epoch]:
    return [Epoch.now(step, {"loss": 1.0 / step}) for step in steps]


def test_the_outbox_keeps_the_epochs_while_sending_fails_and_sends_each_once_when_it_works():
    store, told = Store(), []
    box = Outbox(
        store.send,
        failing=lambda err: told.append(("failing", str(err))),
        recovered=lambda count: told.append(("recovered", count)),
        first_retry_s=0.01,
        max_retry_s=0.05,
    )
    started = time.perf_counter()
    for epoch in epochs(1, 2, 3):
        box.put(epoch)
    assert time.perf_counter() - started < 0.1  # put never waits on the store
    assert not box.flush(0.3)  # a few failed tries later: all still kept
    assert [e.step for e in box.pending()] == [1, 2, 3]
    assert isinstance(box.error, ConnectionError)
    store.down.clear()
    assert box.flush(5)
    sent = [e.step for call in store.calls for e in call]
    assert sent == [1, 2, 3]  # in order, each once
    assert told == [("failing", "connection refused"), ("recovered", 3)]
    assert box.error is None
    box.put(epochs(4)[0])
    assert box.flush(5) and store.calls[-1][0].step == 4
    assert box.close(0) == []


def test_closing_an_outbox_whose_store_never_answers_hands_back_every_epoch():
    store = Store()
    box = Outbox(store.send, first_retry_s=0.01, max_retry_s=0.05)
    kept = epochs(1, 2)
    for epoch in kept:
        box.put(epoch)
    started = time.perf_counter()
    assert box.close(0.2) == kept
    assert time.perf_counter() - started < 2
    with pytest.raises(RuntimeError):
        box.put(epochs(3)[0])
    box._thread.join(2)
    assert not box._thread.is_alive()


def test_a_bounded_block_in_one_thread_is_not_undone_by_another_ending(monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    entered, release = threading.Event(), threading.Event()

    def sender():
        with _bounded_http(3):
            entered.set()
            release.wait(5)

    thread = threading.Thread(target=sender)
    thread.start()
    entered.wait(5)
    with _bounded_http(3):
        pass  # the main thread's block ends while the sender's is open
    assert os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES") == "0"
    release.set()
    thread.join(5)
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # restored by the last one


# ---------------------------------------------------------------- the recorder


def recorder_on(tmp_path: Path, store: Store, **options) -> MlflowRecorder:
    """An MLflow recorder on a SQLite store whose epochs go through ``store`` (failing while
    it is down) before they reach the database."""
    recorder = MlflowRecorder(sqlite_store(tmp_path), **options)
    real = recorder.tracker.log_steps

    def log_steps(run_id, steps):
        store.send([Epoch(step, stamp, dict(metrics)) for step, stamp, metrics in steps])
        real(run_id, steps)

    recorder.tracker.log_steps = log_steps
    return recorder


def plan_of(recorder: MlflowRecorder) -> SimpleNamespace:
    """What the recorder reads of a plan to open a run."""
    return SimpleNamespace(
        experiment_id=recorder.experiment_id("outage"),
        run_name=lambda: "outage",
        resuming=False,
        source=None,
        context=SimpleNamespace(sweep=None),
    )


DEFINITION = Definition({"trainer.epochs": 3}, {}, {}, {}, "digits", "sklearn:digits", {})


def test_a_recorder_keeps_training_going_while_its_store_is_down_and_ends_with_every_epoch(
    tmp_path, capsys
):
    store = Store()
    recorder = recorder_on(tmp_path, store)
    with recorder.run(plan_of(recorder), {}) as run_id:
        recorder.log_definition(DEFINITION)
        recorder.set_folder(tmp_path / "run")
        started = time.perf_counter()
        for step in (1, 2, 3):
            recorder.log_epoch(step, {"loss": 1.0 / step, "lr": 0.1, "not_an_epoch_metric": 7})
        assert time.perf_counter() - started < 0.1
        assert recorder.logged_epochs() == {1, 2, 3}  # the queued ones count as logged
        time.sleep(0.5)
        store.down.clear()  # back: the results wait until the store has every epoch
        recorder.log_metrics({"test_accuracy": 0.5})
    client = recorder.tracker.client
    assert client.get_run(run_id).info.status == "FINISHED"
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert "not_an_epoch_metric" not in client.get_run(run_id).data.metrics
    assert not (tmp_path / "run" / UNSENT_FILE).exists()
    deadline = time.monotonic() + 5
    while any(t.name == "epoch-sender" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the outbox's thread outlived its run"
        time.sleep(0.05)
    err = capsys.readouterr().err
    assert "the MLflow store stopped answering (ConnectionError: connection refused)" in err
    assert "answers again: the 3 epochs it missed are sent" in err


def test_a_store_still_down_at_the_end_leaves_the_epochs_in_the_run_folder_and_one_line(
    tmp_path, capsys
):
    store = Store()
    recorder = recorder_on(tmp_path, store, outage_wait_s=0.3)
    with pytest.raises(TrackingError) as lost, recorder.run(plan_of(recorder), {}) as run_id:
        recorder.log_definition(DEFINITION)
        recorder.set_folder(tmp_path / "run")
        for step in (1, 2):
            recorder.log_epoch(step, {"loss": 1.0 / step})
        recorder.log_metrics({"test_accuracy": 0.5})
    unsent = tmp_path / "run" / UNSENT_FILE
    message = str(lost.value)
    assert message.startswith(
        f"tracking.uri={recorder.shown_uri}: the MLflow store did not answer at the end of run "
        f"{run_id} within tracking.outage_wait_s=0.3 (ConnectionError: connection refused); "
        f"the epochs it did not get are kept in {unsent}; once it answers, finish the run "
        f"with: python "
    )
    assert message.endswith(f"or send only them with: python -m convnets.upload {unsent}")
    assert "\n" not in message
    assert [(r, e.step, e.metrics) for r, _, e in read_unsent(unsent)] == [
        (run_id, 1, {"loss": 1.0}),
        (run_id, 2, {"loss": 0.5}),
    ]
    assert "warning: run" not in capsys.readouterr().err  # the error's line says it all
    client = recorder.tracker.client
    assert client.get_metric_history(run_id, "loss") == []
    assert "test_accuracy" not in client.get_run(run_id).data.metrics  # never half a result

    store.down.clear()  # the store is back: the file is sent, once however often it is given
    assert upload_main([str(unsent)]) == 0
    assert upload_main([str(unsent)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (
        f"uploaded: 2 metric values to run {run_id} in {recorder.shown_uri} (0 of the file's "
        "it had already)"
    )
    assert out[1].startswith("uploaded: 0 metric values") and out[1].endswith(
        "(2 of the file's it had already)"
    )
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [
        (1, 1.0),
        (2, 0.5),
    ]


def test_an_interrupted_run_with_epochs_unsent_says_where_they_are(tmp_path, capsys):
    store = Store()
    recorder = recorder_on(tmp_path, store, outage_wait_s=0.3)
    with pytest.raises(KeyboardInterrupt), recorder.run(plan_of(recorder), {}) as run_id:
        recorder.set_folder(tmp_path / "run")
        recorder.log_epoch(1, {"loss": 1.0})
        time.sleep(0.2)  # the outbox has tried and failed: no wait at the end
        raise KeyboardInterrupt
    unsent = tmp_path / "run" / UNSENT_FILE
    [line] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning: run")]
    assert line == (
        f"warning: run {run_id}: the MLflow store did not get every epoch; they are kept in "
        f"{unsent}; send them with: python -m convnets.upload {unsent}"
    )
    assert recorder.tracker.client.get_run(run_id).info.status == "KILLED"


def test_upload_refuses_what_it_cannot_send_in_one_line(tmp_path, capsys):
    bad = tmp_path / UNSENT_FILE
    bad.write_text("not json\n")
    assert upload_main([str(bad)]) == 2
    assert upload_main([str(tmp_path / "missing.jsonl")]) == 2
    assert upload_main([str(bad), "tracking.uri=http://alice:secret@host:5000"]) == 2
    assert upload_main([str(bad), "trainer.epochs=3"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (
        f"error: {bad}: line 1 is not an unsent epoch (Expecting value: line 1 column 1 "
        f"(char 0)); give the run's {UNSENT_FILE}"
    )
    assert err[1].startswith(f"error: {tmp_path / 'missing.jsonl'}: cannot be read (")
    assert (
        err[2].startswith("error: tracking.uri: a URI with user:password@")
        and "secret" not in err[2]
    )
    assert err[3] == "error: trainer.epochs=3: only tracking.uri=<store> may follow the file"


# ---------------------------------------------------------------- a real server, stopped


TINY = "model.layers=[{filters:8},{filters:8,pool:max}]"
HTTP_TIMEOUT_S = 2  # the outage outlasts the client's bounded retries three times over
OUTAGE_S = 6
EPOCHS = 40  # 10-20 s of training for two runs at once on 2 cores: the server returns mid-run
RUN_ID = re.compile(r"run=([0-9a-f]{32})")


def start_server(root: Path, port: int) -> subprocess.Popen:
    """``mlflow server`` on ``root/mlflow.db`` at ``port`` (again on the same database and port
    when called again), serving once this returns."""
    sqlite_store(root)  # a ready schema: the server starts without migrating
    log = root / "server.log"
    with open(log, "a") as out:
        proc = start_mlflow_server(f"sqlite:///{root / 'mlflow.db'}", root, port, out)
    wait_until_serving(proc, f"http://127.0.0.1:{port}/health", log, 120)
    return proc


def checkpointed_epoch(folder: Path) -> int:
    return (checkpoints.read_state(folder) or {"epoch": 0})["epoch"]


@pytest.mark.slow
def test_the_server_stopped_for_6_s_mid_training_costs_no_epoch_and_no_training_time(tmp_path):
    """The undisturbed run of the same config trains at the same time, against a second server
    of the same kind on this machine, so that both see the same load from whatever else runs
    here: one after the other, on a shared 2-core machine, the undisturbed run alone once took
    37.7 s against 27.5 s for the disturbed one."""
    port = free_port()
    server, calm_server = start_server(tmp_path / "a", port), None
    common = [TINY, f"trainer.epochs={EPOCHS}", "trainer.verbose=0", "tracking.log_model=false",
              f"tracking.http_timeout_s={HTTP_TIMEOUT_S}"]  # fmt: skip
    try:
        calm_port = free_port()  # the first one is taken now: another one
        calm_server = start_server(tmp_path / "b", calm_port)
        url, calm_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{calm_port}"
        calm = start_training(
            *common, f"tracking.uri={calm_url}", f"hydra.run.dir={tmp_path / 'calm'}"
        )
        proc = start_training(
            *common, f"tracking.uri={url}", f"hydra.run.dir={tmp_path / 'outage'}"
        )
        try:
            client = MlflowClient(url)
            run_id = wait_for_epochs(proc, tmp_path / "outage", 1)
            folder = tmp_path / "outage" / "checkpoints" / run_id
            stop_process_group(server)
            stopped_at = checkpointed_epoch(folder)
            time.sleep(OUTAGE_S)
            trained_meanwhile = checkpointed_epoch(folder) - stopped_at
            server = start_server(tmp_path / "a", port)
            _, stderr = proc.communicate(timeout=300)
            calm_out, calm_err = calm.communicate(timeout=300)
        finally:
            for training in (proc, calm):
                if training.poll() is None:
                    training.kill()
        assert calm.returncode == 0, calm_err[-3000:]
        assert proc.returncode == 0, stderr[-3000:]
        assert "Traceback" not in stderr
        assert trained_meanwhile > 0  # training went on while the server was down
        assert "the MLflow store stopped answering" in stderr  # the outbox saw the outage
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        for key in EPOCH_METRICS:
            steps = [m.step for m in client.get_metric_history(run_id, key)]
            assert sorted(steps) == list(range(1, EPOCHS + 1)), key  # every epoch, each once
        assert not (folder / UNSENT_FILE).exists()
        calm_run = MlflowClient(calm_url).get_run(RUN_ID.findall(calm_out)[-1])
        calm_s = calm_run.data.metrics["train_time_s"]
        outage_s = run.data.metrics["train_time_s"]
        print(f"train_time_s: undisturbed {calm_s:.2f}, server stopped {OUTAGE_S} s {outage_s:.2f}")
        assert abs(outage_s - calm_s) <= 0.25 * calm_s, (calm_s, outage_s)
    finally:
        for each in (server, calm_server):
            if each is not None and each.poll() is None:
                stop_process_group(each)


@pytest.mark.slow
def test_a_server_still_down_at_the_end_is_one_line_and_the_run_is_finished_later(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path, port)
    try:
        client = MlflowClient(url)
        proc = start_training(
            TINY,
            "trainer.epochs=8",
            "trainer.verbose=0",
            "tracking.log_model=false",
            "tracking.outage_wait_s=2",
            f"tracking.uri={url}",
            f"hydra.run.dir={tmp_path / 'out'}",
        )
        try:
            run_id = wait_for_epochs(proc, tmp_path / "out", 1)
            stop_process_group(server)
            _, stderr = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 1, stderr[-3000:]
        assert "Traceback" not in stderr, stderr[-3000:]
        [line] = [x for x in stderr.splitlines() if x.startswith("error: ")]
        unsent = tmp_path / "out" / "checkpoints" / run_id / UNSENT_FILE
        resume = f"python train.py resume={run_id} tracking.uri={url}"
        assert line.startswith(
            f"error: tracking.uri={url}: the MLflow store did not answer at the end of run "
            f"{run_id} within tracking.outage_wait_s=2 ("
        )
        assert line.endswith(
            f"the epochs it did not get are kept in {unsent}; once it answers, finish the run "
            f"with: {resume} (which sends them too), or send only them with: python -m "
            f"convnets.upload {unsent}"
        )
        kept = sorted(e.step for _, _, e in read_unsent(unsent))
        assert kept and max(kept) == 8

        server = start_server(tmp_path, port)  # back: the line's commands finish the run
        sent = subprocess.run(
            [sys.executable, "-m", "convnets.upload", str(unsent)],
            cwd=tmp_path, capture_output=True, text=True, timeout=120,
            env=CLI_ENV,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr[-3000:]
        assert sent.stdout.startswith(f"uploaded: {5 * len(kept)} metric values to run {run_id}")
        # Its end was never recorded: said, with the command that records it, not left silent.
        assert sent.stderr.strip().splitlines()[-1] == (
            f"warning: run {run_id} is still RUNNING: its epochs are in, but its test metrics "
            "and model were never recorded (the store was gone when it ended); finish it with: "
            f"{resume}"
        )
        assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(
            range(1, 9)
        )
        # The line's resume, with its overrides as train.py takes them, in this process.
        resumed = convnets.train(
            [*resume.split()[2:], "trainer.verbose=0"], output_dir=tmp_path / "resumed"
        )
        assert resumed.run_id == run_id
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
        for key in EPOCH_METRICS:  # the resume sent nothing twice
            steps = [m.step for m in client.get_metric_history(run_id, key)]
            assert sorted(steps) == list(range(1, 9)), key
    finally:
        if server.poll() is None:
            stop_process_group(server)
