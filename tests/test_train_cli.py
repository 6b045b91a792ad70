"""``python train.py``'s own contract through real processes: exit statuses, one-line refusals
(before TensorFlow loads where they can be), SIGKILL and Ctrl-C, a profiler around the command.
Runs go into a SQLite store in tmp. The record, reproduce and failures of a run in this process
(``convnets.train``): test_train.py."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # the resume in this process

import json  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from conftest import CLI_ENV, REPO, free_port, imported, sqlite_store, train_cli, wait_for_epochs  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

import convnets  # noqa: E402
from convnets.errors import ConvnetsError  # noqa: E402

TINY = "model.layers=[{filters:8},{filters:8,pool:max}]"
EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "lr")
RUN_ID = re.compile(r"run=([0-9a-f]{32})")


def run_id_of(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found = RUN_ID.findall(result.stdout)
    assert found, result.stdout[-2000:]
    return found[-1]


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize("key", ["reproduce", "resume"])
def test_unknown_run_id_is_one_line(tmp_path, monkeypatch, key):
    result = train_cli(
        f"{key}=0123456789abcdef", f"tracking.uri={sqlite_store(tmp_path)}", importtime=True
    )
    assert result.returncode != 0
    [line] = error_lines(result)
    assert line.startswith(f"error: {key}=0123456789abcdef: no such run in sqlite:")
    assert "tensorflow" not in imported(result)  # refused before TensorFlow loads
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)  # the default store, sqlite:///mlflow.db: none there
    with pytest.raises(ConvnetsError, match=f"there is no MLflow store at {empty / 'mlflow.db'}"):
        convnets.train([f"{key}=0123456789abcdef"])
    assert not (empty / "mlflow.db").exists()  # looking a run up created no empty store


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


@pytest.mark.slow
def test_kill_after_epoch_two_then_resume_finishes_the_same_run(tmp_path):
    epochs = 30
    uri = sqlite_store(tmp_path)
    args = [TINY, f"trainer.epochs={epochs}", "trainer.verbose=0", f"tracking.uri={uri}"]
    client = MlflowClient(uri)  # the schema exists before the training opens the store
    proc = subprocess.Popen(
        [sys.executable, "train.py", *args, f"hydra.run.dir={tmp_path / 'first'}"],
        cwd=REPO,
        env=CLI_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        run_id = wait_for_epochs(proc, tmp_path / "first", 2)
        proc.kill()  # SIGKILL: no handler runs, the run stays RUNNING
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "training ended before it could be killed"
    assert client.get_run(run_id).info.status == "RUNNING"

    # The kill needs a process of its own; the resume is the record's, so it runs here.
    resumed = convnets.train(
        [f"resume={run_id}", f"tracking.uri={uri}"], output_dir=tmp_path / "second"
    )
    assert resumed.run_id == run_id
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
    uri = sqlite_store(tmp_path)
    client = MlflowClient(uri)  # the schema exists before the training opens the store
    proc = subprocess.Popen(
        [sys.executable, "train.py", TINY, "trainer.epochs=50", "trainer.verbose=0",
         f"tracking.uri={uri}", f"hydra.run.dir={tmp_path / 'out'}"],
        cwd=REPO,
        env=CLI_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        run_id = wait_for_epochs(proc, tmp_path / "out", 1)
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
def test_a_profiled_run_leaves_a_loadable_profile(tmp_path):
    """A command ends through Python's normal exit: a profiler (or any wrapper) around it
    writes its result, and the exit status is the command's."""
    import pstats

    profile = tmp_path / "prof.out"
    result = subprocess.run(
        [sys.executable, "-m", "cProfile", "-o", str(profile), "train.py", TINY]
        + ["trainer.epochs=1", "trainer.verbose=0", "tracking.log_model=false"]
        + [f"tracking.uri={sqlite_store(tmp_path)}", f"hydra.run.dir={tmp_path / 'out'}"],
        cwd=REPO,
        env=CLI_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    run_id = run_id_of(result)
    stats = pstats.Stats(str(profile))
    assert any("job.py" in filename for filename, _, _ in stats.stats)
    # A whole process, so its startup_s (process start -> first training step) is recorded.
    metrics = MlflowClient(sqlite_store(tmp_path)).get_run(run_id).data.metrics
    assert 0 < metrics["startup_s"] < 300

    # `python -m cProfile` itself exits 0 whatever the script's status (profile._Utils.runctx
    # swallows SystemExit), so the refused command runs under a profiler that lets it through.
    refused_profile = tmp_path / "refused.out"
    wrapper = (
        "import cProfile, runpy, sys\n"
        "profiler = cProfile.Profile()\n"
        "sys.argv = sys.argv[1:]  # train.py and its overrides\n"
        "try:\n"
        "    profiler.runcall(runpy.run_path, sys.argv[0], run_name='__main__')\n"
        "finally:\n"
        f"    profiler.dump_stats({str(refused_profile)!r})\n"
    )
    refused = subprocess.run(
        [sys.executable, "-c", wrapper, "train.py"]
        + ["trainer.epochs=0", f"hydra.run.dir={tmp_path / 'out2'}"],
        cwd=REPO,
        env=CLI_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2 and error_lines(refused)
    assert pstats.Stats(str(refused_profile)).stats  # written on the way out
